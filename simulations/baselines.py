"""Non-learned reference points on a data set: most-popular and random, full ranking, history excluded.

    python -m simulations.baselines --dataset ../shared/data/ml-100k
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from common.data import build_sequences, load_interactions
from common.metrics import evaluate_ranking, means_from_sums
from common.models import Popularity
from simulations.cli import user_errors_exit


def popularity_metrics(dataset: str, *, split: str = "test", ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """HR@K/NDCG@K of the most-popular ranking (counts from training histories only)."""
    data = build_sequences(load_interactions(dataset))
    model = Popularity(torch.as_tensor(data.item_counts()))
    return means_from_sums(evaluate_ranking(model, data, split=split, max_len=1, ks=ks))


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="interaction log or MovieLens folder")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    args = parser.parse_args(argv)
    print(json.dumps({"popularity": popularity_metrics(args.dataset, split=args.split, ks=(5, 10, 20))}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
