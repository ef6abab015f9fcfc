"""Non-neural reference points on a data set, full ranking, history excluded:
most popular, EASE (item-item linear autoencoder) and a decayed first-order Markov chain;
with ``--blend-model``, a trained model alone and blended with a co-occurrence chain.

    python -m simulations.baselines --dataset ../shared/data/ml-100k
    python -m simulations.baselines --dataset ../shared/data/ml-100k --blend-model runs/RUN

Every model learns from the training histories only (every item but the last two of each
user, as SASRec trains); at evaluation it scores the catalogue from the user's history for the
split (``test``: everything before the last item), like SASRec's input. They say what the data
gives without a neural model: the bar a sequential recommender must clear.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from common.data import SequenceData, build_sequences, load_interactions
from common.cli_args import positive_int
from common.cli_args import seed as seed_arg
from common.config import DEFAULTS
from common.errors import ConfigError, DataError
from common.item_chain import item_chain
from common.metrics import evaluate_ranking, means_and_errors, ndcg_gains, ranking_sums, split_scores, target_ranks
from common.models import Popularity
from common.partners import holdout_positions
from common.task import training_view  # (common.partners imports common.task already)
from simulations.cli import user_errors_exit


def _binary_matrix(histories: Sequence[np.ndarray], width: int) -> np.ndarray:
    x = np.zeros((len(histories), width), dtype=np.float64)
    for row, h in enumerate(histories):
        x[row, np.asarray(h, dtype=np.int64)] = 1.0
    return x


def ease_weights(train: Sequence[np.ndarray], width: int, l2: float) -> np.ndarray:
    """EASE (Steck, 2019): item-item weights B minimising ||X - XB||² + l2·||B||² with diag(B) = 0.

    Closed form: P = (XᵀX + l2·I)⁻¹, B = I - P·diag(1/diag(P)). ``width`` = catalogue + padding
    column 0 (never interacted, so its row and column stay 0).
    """
    x = _binary_matrix(train, width)
    p = np.linalg.inv(x.T @ x + l2 * np.eye(width))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    return b


def markov_transitions(train: Sequence[np.ndarray], width: int) -> np.ndarray:
    """Counts of item a followed directly by item b in the training histories: M[a, b]."""
    m = np.zeros((width, width), dtype=np.float64)
    for s in train:
        s = np.asarray(s, dtype=np.int64)
        np.add.at(m, (s[:-1], s[1:]), 1.0)
    return m


def markov_scores(histories: Sequence[np.ndarray], transitions: np.ndarray, *, window: int, decay: float,
                  tie_break: np.ndarray) -> np.ndarray:
    """Score_b = Σ_j decay^j · M[h_{-1-j}, b] over the last ``window`` items (j = 0 the latest),
    plus ``tie_break`` (a tiny popularity term, so users with no transitions still get a ranking)."""
    out = np.tile(tie_break.astype(np.float64), (len(histories), 1))
    for row, h in enumerate(histories):
        recent = np.asarray(h, dtype=np.int64)[::-1][:window]
        if len(recent):
            out[row] += (decay ** np.arange(len(recent))) @ transitions[recent]
    return out


def _metrics(scores: np.ndarray, histories, targets, ks) -> dict[str, float]:
    ranks = target_ranks(torch.as_tensor(scores), histories, targets)
    return means_and_errors(ranking_sums(ranks, ks))


def reference_metrics(data: SequenceData, *, split: str = "test", ks: tuple[int, ...] = (10,),
                      ease_l2: float = 200.0, markov_window: int = 10, markov_decay: float = 0.7) -> dict[str, dict]:
    """HR@K/NDCG@K of popularity, EASE and the decayed Markov chain on ``data``'s ``split``."""
    width = data.num_items + 1
    train = data.train_sequences()
    histories, targets = data.eval_cases(split)
    counts = data.item_counts().astype(np.float64)
    pop = means_and_errors(evaluate_ranking(Popularity(torch.as_tensor(data.item_counts())), data,
                                           split=split, max_len=1, ks=ks))
    ease = _binary_matrix(histories, width) @ ease_weights(train, width, ease_l2)
    markov = markov_scores(histories, markov_transitions(train, width), window=markov_window,
                           decay=markov_decay, tie_break=1e-6 * counts / max(counts.max(), 1.0))
    return {
        "popularity": pop,
        "ease": {"l2": ease_l2, **_metrics(ease, histories, targets, ks)},
        "markov": {"window": markov_window, "decay": markov_decay, **_metrics(markov, histories, targets, ks)},
    }


def ndcg_per_user(scores: np.ndarray | torch.Tensor, histories: Sequence[np.ndarray], targets: np.ndarray,
                  k: int = 10) -> np.ndarray:
    """Each user's NDCG@k (full ranking, history excluded; common.metrics' rank rule)."""
    return ndcg_gains(target_ranks(torch.as_tensor(scores), histories, targets), k)


def paired_ratio(model: np.ndarray, baseline: np.ndarray, *, resamples: int = 2000,
                 seed: int = 0) -> dict[str, float | list[float]]:
    """mean(model) / mean(baseline) over the same users, with a 95% paired-bootstrap interval
    (users drawn with replacement, both means from the same draw): "k x popularity" with how
    much it would move on another draw of test users."""
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if model.shape != baseline.shape or len(model) < 2:
        raise ValueError("paired_ratio needs two equally long per-user arrays of at least 2 users")
    draws = np.random.default_rng(seed).integers(0, len(model), size=(resamples, len(model)))
    ratios = model[draws].mean(axis=1) / np.maximum(baseline[draws].mean(axis=1), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"ratio": float(model.mean() / max(baseline.mean(), 1e-12)), "ratio-ci95": [float(lo), float(hi)]}


def blend_with_model(data: SequenceData, model: torch.nn.Module, *, max_len: int, ks: tuple[int, ...] = (10,),
                     tie_orders: int = 1,
                     chains: Sequence[tuple[int, float]] = ((5, 0.5), (10, 0.7), (20, 0.8)),
                     weights: Sequence[float] = (0.0, 0.25, 0.5, 0.8, 1.2, 1.6, 2.5)) -> dict[str, dict]:
    """How far a trained model is from what it and the co-occurrence chain give together.

    Score = log-softmax(model) + w · log P_chain; (window, decay, w) chosen on the validation split
    by NDCG@10 (w = 0 is the model alone, so the blend never does worse there), then reported on
    the test split beside the model and the chosen chain alone. A research probe: the chain's
    counts are plain (not DP) and centralised here.
    """
    width = data.num_items + 1
    counts = data.item_counts().astype(np.float64)
    # the chain a partner holding every user blends in with chain-weight > 0 (common/item_chain.py)
    chains_of = {(window, decay): item_chain(data.train_sequences(), width, window=window, decay=decay, weight=1.0)
                 for window, decay in chains}

    def parts(split: str):
        batches = list(split_scores(model, data, split=split, max_len=max_len, tie_orders=tie_orders))
        logits = torch.cat([b[0] for b in batches])
        histories = [h for b in batches for h in b[1]]
        targets = np.concatenate([b[2] for b in batches])
        return torch.log_softmax(logits.double(), dim=1).numpy(), histories, targets

    chosen, best = None, -1.0
    valid = parts("valid")
    for window, decay in chains:
        chain = chains_of[window, decay].log_probs(valid[1])
        for w in weights:
            score = _metrics(valid[0] + w * chain, valid[1], valid[2], (10,))["ndcg@10"]
            if score > best:
                chosen, best = (window, decay, w), score
    window, decay, w = chosen
    model_scores, histories, targets = parts("test")
    chain = chains_of[window, decay].log_probs(histories)
    popularity = ndcg_per_user(np.broadcast_to(counts, (len(targets), width)).copy(), histories, targets)
    return {
        "model": {**_metrics(model_scores, histories, targets, ks),
                  "valid-ndcg@10": _metrics(*valid, (10,))["ndcg@10"],  # the model alone on the validation split
                  "ndcg@10-vs-popularity": paired_ratio(ndcg_per_user(model_scores, histories, targets), popularity)},
        "cooccurrence": {"window": window, "decay": decay, **_metrics(chain, histories, targets, ks)},
        "blend": {"weight": w, "valid-ndcg@10": best, **_metrics(model_scores + w * chain, histories, targets, ks),
                  "ndcg@10-vs-popularity": paired_ratio(ndcg_per_user(model_scores + w * chain, histories, targets),
                                                        popularity)},
    }


def last_step_ties(data: SequenceData, *, within_s: float = 60.0) -> dict[str, float]:
    """Share of users whose test item has the same timestamp as the item before it, and the share
    within ``within_s`` seconds of it: where the order of the last two is arbitrary, "next" is too."""
    gaps = np.array([float(t[-1]) - float(t[-2]) for t in data.timestamps])
    return {"test-same-timestamp-as-previous": float((gaps == 0).mean()),
            f"test-within-{within_s:g}s-of-previous": float((gaps <= within_s).mean())}


UNKNOWN_SHARE_REFUSED = 0.1  # a log with more of its events on items the model lacks is another data set


def _model_data(dataset: str, trained) -> SequenceData:  # noqa: ANN001 (client.recommend.GlobalModel)
    """``dataset``'s users over ``trained``'s catalogue; ``synthetic`` is rebuilt from the model's own
    config. :class:`DataError` when the log is not the model's data set (a model trained on 50
    synthetic items scored ML-100K over its items 1-50 and printed normal-looking numbers)."""
    if dataset == "synthetic":
        from common.task import federation_data

        return federation_data({**DEFAULTS, **trained.config})
    log = load_interactions(dataset)
    known = np.isin(np.asarray(log.item).astype(str), trained.catalogue.astype(str))
    if len(log) and (1.0 - known.mean()) > UNKNOWN_SHARE_REFUSED:
        raise DataError(f"--dataset {dataset}: {int((~known).sum())} of {len(log)} events are on items that "
                        f"--blend-model {trained.path} does not know (it was trained on "
                        f"{trained.config.get('dataset')!r}, {len(trained.catalogue)} items); give its data set")
    return training_view(trained.config, build_sequences(log, trained.catalogue))


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="interaction log, MovieLens folder, or synthetic (the built-in set)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--ease-l2", type=float, default=200.0, help="EASE's L2 weight (lambda)")
    parser.add_argument("--markov-window", type=int, default=10, help="last items the Markov chain looks at")
    parser.add_argument("--markov-decay", type=float, default=0.7, help="weight ratio of each older item")
    parser.add_argument("--blend-model", default=None,
                        help="a run directory or model.pt: also report it blended with the co-occurrence chain")
    parser.add_argument("--tie-orders", type=positive_int, default=None,
                        help="with --blend-model: score tied history items as the mean over N random orders "
                             "(default: the model's tie-orders)")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="leave out the users a simulation with this holdout-fraction and --seed holds out "
                             "(the sweeps' 0.2), so the baselines see the same users and split as its runs")
    parser.add_argument("--seed", type=seed_arg, default=int(DEFAULTS["seed"]), help="the run seed (with --holdout-fraction)")
    parser.add_argument("--train-on-validation", action="store_true",
                        help="the references also learn from each user's validation item, as a run with "
                             "train-on-validation = true trains (score the test split)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.holdout_fraction < 1.0:
        parser.error(f"--holdout-fraction must be in [0, 1), got {args.holdout_fraction}")
    if args.holdout_fraction and args.blend_model:
        parser.error("--holdout-fraction applies to the references; --blend-model scores the whole log")
    for name, value in (("--ease-l2", args.ease_l2), ("--markov-decay", args.markov_decay)):
        if not (value > 0 and math.isfinite(value)):
            parser.error(f"{name} must be a positive number, got {value}")
    if args.markov_window < 1:
        parser.error(f"--markov-window must be at least 1, got {args.markov_window}")
    if args.train_on_validation and (args.split == "valid" or args.blend_model):
        parser.error("--train-on-validation scores the test split of the references (a --blend-model run's own "
                     "config says what it trained on)")
    if args.blend_model:
        from client.recommend import load_global_model

        trained = load_global_model(args.blend_model)
        if trained.config.get("model", "sasrec") != "sasrec":
            raise ConfigError(f"--blend-model {trained.path}: a {trained.config.get('model')} model; "
                              "the blend scores histories, which needs a SASRec model file")
        data = _model_data(args.dataset, trained)
        orders = args.tie_orders or int(trained.config.get("tie-orders", DEFAULTS["tie-orders"]))
        blend = blend_with_model(data, trained.model, max_len=int(trained.config["max-seq-len"]), ks=(5, 10, 20),
                                 tie_orders=orders)
        print(json.dumps({"model-file": str(trained.path), "tie-orders": orders, **blend}, indent=2))
        return 0
    if args.dataset == "synthetic":  # the built-in set of the default runs (its size and seed: the defaults)
        from common.task import federation_data

        data = federation_data({**DEFAULTS, "seed": args.seed})
    else:
        data = build_sequences(load_interactions(args.dataset))
    data = training_view({"train-on-validation": args.train_on_validation}, data)
    if args.holdout_fraction:  # the members a simulation trains on: same holdout draw (common/partners.py)
        members = np.setdiff1d(np.arange(data.num_users), holdout_positions(data.num_users, args.holdout_fraction, args.seed))
        if len(members) == 0:
            raise DataError(f"--holdout-fraction {args.holdout_fraction} leaves no user of {args.dataset}")
        data = data.subset(members)
    out = reference_metrics(data, split=args.split, ks=(5, 10, 20), ease_l2=args.ease_l2,
                            markov_window=args.markov_window, markov_decay=args.markov_decay)
    print(json.dumps({**out, "timestamps": last_step_ties(data)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
