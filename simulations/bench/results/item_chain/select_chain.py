"""Score saved models of the README's best ML-100K command with every (chain-window, chain-decay,
chain-weight) of a small grid, on the validation and test splits (the selection behind chain-weight = 0.8).

    PYTHONPATH=. python simulations/bench/results/item_chain/select_chain.py 0,1,2,3,4 MODELDIR OUT.json

MODELDIR holds ``bl_sS.json.pt``: the state dicts ``simulations.bench.centralised`` saves with
``save_models.patch`` applied and ``FEDREC_BLEND=MODELDIR/bl_sS.json.pt`` (the README command, seed S).
"""

import json
import sys

import numpy as np
import torch

from common.config import resolve_config
from common.item_chain import item_chain
from common.metrics import means_and_errors, ranking_sums, split_scores, target_ranks
from common.partners import split_population
from common.task import new_model

CHAINS = [(5, 0.5), (10, 0.5), (10, 0.7), (20, 0.8), (20, 0.7), (50, 0.9)]
WEIGHTS = [0.0, 0.25, 0.5, 0.8, 1.2]


def main(seeds: str, models: str, out: str) -> None:
    torch.set_num_threads(1)
    res = {}
    for seed in (int(s) for s in seeds.split(",")):
        cfg = resolve_config(None, {"dataset": "../shared/data/ml-100k", "dp": False, "tied-output": True,
                                    "history-windows": True, "reverse-histories": True, "label-smoothing": 0.1,
                                    "item-init": "cooccurrence", "seed": seed})
        data, _ = split_population(cfg)
        model = new_model(cfg, data.num_items)
        model.load_state_dict(torch.load(f"{models}/bl_s{seed}.json.pt"))
        model.eval()
        for split in ("valid", "test"):
            batches = list(split_scores(model, data, split=split, max_len=50, tie_orders=16))
            logp = torch.log_softmax(torch.cat([b[0] for b in batches]).double(), dim=1).numpy()
            histories = [h for b in batches for h in b[1]]
            targets = np.concatenate([b[2] for b in batches])
            for window, decay in CHAINS:
                chain = item_chain(data.train_sequences(), data.num_items + 1, window=window, decay=decay, weight=1.0)
                chain_logp = chain.log_probs(histories)
                for w in WEIGHTS:
                    ranks = target_ranks(torch.as_tensor(logp + w * chain_logp), histories, targets)
                    res[f"{seed}|{split}|{window}|{decay}|{w}"] = means_and_errors(ranking_sums(ranks, (10,)))["ndcg@10"]
    with open(out, "w") as f:
        json.dump(res, f, indent=0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
