"""Each simulated partner's own item chain alone (no model): 5 IID partners of ML-100K, window 20, decay 0.8, test NDCG@10 summed over partners.

    PYTHONPATH=. python simulations/bench/results/item_chain/chain_alone.py   # from the repository root
"""
import torch
from common.config import resolve_config
from common.partners import simulated_partner
from common.item_chain import item_chain
from common.metrics import ranking_sums, target_ranks, means_from_sums
for seed in (42, 1, 2):
    cfg = resolve_config(None, {"dataset": "../shared/data/ml-100k", "seed": seed})
    tot = None
    for p in range(5):
        d = simulated_partner(cfg, p, 5)
        h, t = d.eval_cases("test")
        ch = item_chain(d.train_sequences(), d.num_items + 1, window=20, decay=0.8, weight=1.0)
        sums = ranking_sums(target_ranks(torch.as_tensor(ch.log_probs(h)), h, t), (10,))
        tot = sums if tot is None else {k: tot[k] + sums[k] for k in tot}
    print(seed, {k: round(v, 4) for k, v in means_from_sums(tot).items() if "10" in k and "sq" not in k})
