"""Effect of SASRec's context inputs (time gaps, genres) on ML-100K NDCG@10, centralised and non-private.

    nice -n 5 python -m simulations.bench.context_features --data ../shared/data/ml-100k --epochs 30 --seeds 0 1

Trains one model per (variant, seed) on all users' training histories (leave-one-out
split), picks the epoch with the best validation NDCG@10 (checked every ``--eval-every``
epochs) and reports that epoch's test HR@10/NDCG@10 (full ranking, history excluded).
Centralised and without DP so that the inputs' effect is not hidden by DP noise; the
variants share everything else (seed, hyper-parameters, data).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from common.config import resolve_config
from common.data import SequenceData, build_sequences, load_interactions
from common.data.attributes import metadata_path
from common.metrics import evaluate_ranking, means_from_sums
from common.models import build_model
from common.models.context import item_genre_matrix
from common.training import train_local
from common.objectives import objective_options
from common.cli_args import non_negative_int, parse_run_config, positive_int
from common.cli_errors import user_errors_exit

VARIANTS = {
    "base": {},
    "time": {"time-features": True},
    "genre": {"genre-features": True},
    "time+genre": {"time-features": True, "genre-features": True},
}


def run_variant(data: SequenceData, genres: torch.Tensor, overrides: dict, *, seed: int, epochs: int, eval_every: int,
                cfg_base: dict) -> dict:
    cfg = resolve_config(None, {**cfg_base, **overrides, "seed": seed})
    torch.manual_seed(seed)
    model = build_model(cfg, data.num_items, item_genres=genres)
    max_len = int(cfg["max-seq-len"])
    best = {"valid-ndcg@10": -1.0}
    start = time.perf_counter()
    for epoch in range(eval_every, epochs + 1, eval_every):
        train_local(model, data, epochs=eval_every, batch_size=int(cfg["batch-size"]),
                    learning_rate=float(cfg["learning-rate"]), max_len=max_len, seed=seed * 1000 + epoch,
                    **objective_options(cfg))
        valid = means_from_sums(evaluate_ranking(model, data, split="valid", max_len=max_len))
        if valid["ndcg@10"] > best["valid-ndcg@10"]:
            test = means_from_sums(evaluate_ranking(model, data, split="test", max_len=max_len))
            best = {"epoch": epoch, "valid-ndcg@10": valid["ndcg@10"], "test-hr@10": test["hr@10"],
                    "test-ndcg@10": test["ndcg@10"]}
    return {**best, "seconds": round(time.perf_counter() - start, 1)}


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an ML-100K folder (u.data + u.item)")
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--eval-every", type=positive_int, default=5)
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--run-config", default="", help='extra knobs, e.g. "embedding-dim=64 dropout=0.2"')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {"dropout": 0.2, "learning-rate": 0.002, "batch-size": 128}
    if args.run_config:  # Flower's parser, as every other command reads --run-config
        base.update(parse_run_config(args.run_config))
    data = build_sequences(load_interactions(args.data))
    genres = item_genre_matrix(data.catalogue, metadata_path(args.data))
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            result = {"variant": name, "seed": seed, **run_variant(data, genres, VARIANTS[name], seed=seed,
                                                                    epochs=args.epochs, eval_every=args.eval_every,
                                                                    cfg_base=base)}
            rows.append(result)
            print(json.dumps(result), flush=True)
    print("\n| variant | test NDCG@10 (mean over seeds) | test HR@10 | best epoch(s) |")
    print("|---|---|---|---|")
    for name in args.variants:
        mine = [r for r in rows if r["variant"] == name]
        ndcg, hr = np.mean([r["test-ndcg@10"] for r in mine]), np.mean([r["test-hr@10"] for r in mine])
        print(f"| {name} | {ndcg:.4f} | {hr:.4f} "
              f"| {', '.join(str(r['epoch']) for r in mine)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
