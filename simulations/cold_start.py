"""Cold-start benchmark: can a model recommend items it never saw in training?

    python -m simulations.cold_start --dataset ../shared/data/ml-100k --item-features id text id+text

Protocol: a random ``--cold-fraction`` of the catalogue's items is removed from every
training sequence (the model never sees an interaction with them). For each user who
interacted with a cold item *after* at least one warm item, the case is (the warm items
before that first cold interaction, the cold item). HR@K is reported two ways:

- among the cold items only (the question "which new item next?"): random = K / #cold;
- over the full catalogue minus the history: random ~ K / V.

The cold items are *added to the catalogue after training*: during training their text rows
are zero (so full-softmax training cannot push them down as negatives) and afterwards their ID
rows are those a newly added item gets. Training is central and non-private by default
(``--epsilon`` adds DP-SGD at user level): the question is whether the *item representation*
generalises, not how the federation runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.cli_args import open_fraction, parse_run_config, positive_float, positive_int
from common.cli_args import seed as seed_arg
from common.config import resolve_config
from common.data.sequences import SequenceData
from common.errors import ConfigError
from common.metrics import hit_values, pad_left, target_ranks
from simulations.cli import user_errors_exit


@dataclass
class ColdSplit:
    """Training data without the cold items, and the cold evaluation cases."""

    train: SequenceData  # same catalogue, cold items removed from every sequence
    cold_items: np.ndarray  # 1-based item indices never seen in training
    histories: list[np.ndarray]  # warm items before each case's first cold interaction
    targets: np.ndarray  # that cold item


def hold_out_items(data: SequenceData, *, fraction: float, seed: int, min_history: int = 1) -> ColdSplit:
    """Remove a random ``fraction`` of the interacted items from training (see the module docstring)."""
    seen = np.unique(np.concatenate(data.sequences))
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(seen, size=max(1, int(round(fraction * len(seen)))), replace=False))
    is_cold = np.zeros(data.num_items + 1, dtype=bool)
    is_cold[cold] = True
    keep_users, sequences, timestamps, histories, targets = [], [], [], [], []
    for u, (seq, ts) in enumerate(zip(data.sequences, data.timestamps)):
        first = np.flatnonzero(is_cold[seq])
        if len(first) and first[0] >= min_history:
            histories.append(seq[: first[0]])
            targets.append(seq[first[0]])
        warm = ~is_cold[seq]
        if warm.sum() >= 3:  # one training item plus validation and test
            keep_users.append(u)
            sequences.append(seq[warm])
            timestamps.append(ts[warm])
    train = SequenceData(catalogue=data.catalogue, user_ids=data.user_ids[keep_users], sequences=sequences,
                         timestamps=timestamps, dropped=dict(data.dropped), name=f"{data.name} (warm items)")
    return ColdSplit(train, cold, histories, np.array(targets, dtype=np.int64))


@torch.no_grad()
def cold_hit_rates(model: torch.nn.Module, split: ColdSplit, *, k: int = 10, max_len: int = 50,
                   batch_size: int = 256) -> dict[str, float]:
    """HR@k of the cold targets among the cold items and over the full catalogue (history excluded),
    ties counted at their expected value under a random tie-break (``common.metrics.target_ranks``:
    a model scoring items alike, e.g. cold items with the same text, gets what chance gives)."""
    model.eval()
    among_cold, full = 0.0, 0.0
    warm = np.ones(split.train.num_items + 1, dtype=bool)
    warm[split.cold_items] = False
    for start in range(0, len(split.targets), batch_size):
        hist = split.histories[start:start + batch_size]
        target = split.targets[start:start + batch_size]
        scores = model.score(pad_left([h[-max_len:] for h in hist], max_len)).float()
        full += float(hit_values(target_ranks(scores, hist, target), k).sum())
        scores[:, torch.as_tensor(warm)] = float("-inf")  # below every cold item: out of the cold ranking
        among_cold += float(hit_values(target_ranks(scores, hist, target), k).sum())
    n = max(len(split.targets), 1)
    return {"cases": len(split.targets), "cold-items": len(split.cold_items), f"hr@{k}-among-cold": among_cold / n,
            "random-among-cold": min(1.0, k / len(split.cold_items)), f"hr@{k}-full": full / n,
            "random-full": k / split.train.num_items}


def run_cold_start(overrides: dict, *, fraction: float, epochs: int, epsilon: float | None, seed: int = 0) -> dict:
    """Train one model on the warm items (central, DP-SGD when ``epsilon``) and measure the cold cases."""
    from common.models.text_sasrec import trainable_parameters
    from common.privacy import calibrate_noise, default_delta, steps_per_epoch
    from common.task import federation_data, new_model
    from common.training import DPSettings, refuse_non_sequence_model, train_local, user_count_for_training
    from common.objectives import objective_options

    cfg = resolve_config(None, overrides)
    split = hold_out_items(federation_data(cfg), fraction=fraction, seed=seed)
    model = new_model(cfg, split.train.num_items)
    refuse_non_sequence_model(model, "cold start")
    dp = None
    if epsilon is not None:
        users = user_count_for_training(split.train)
        rate, steps = steps_per_epoch(users, int(cfg["batch-size"]))
        delta = float(cfg["target-delta"]) or default_delta(users)  # --run-config target-delta was ignored (a review)
        sigma = calibrate_noise(target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                                total_steps=epochs * steps, accountant=str(cfg["accountant"]))
        # A research run on the researcher's own data: reproducible noise (partners draw OS entropy)
        dp = DPSettings(noise_multiplier=sigma, max_grad_norm=float(cfg["max-grad-norm"]), noise_seed=seed)
    cold = torch.as_tensor(split.cold_items)
    fresh = {name: p.detach()[cold].clone() for name, p in _catalogue_rows(model).items()}
    text = getattr(model, "item_text", None)
    real_text = text.table[cold].clone() if text is not None else None
    if text is not None:
        text.table[cold] = 0.0  # not in the catalogue yet: a zero text row gets no score gradient
    start = time.perf_counter()
    result = train_local(model, split.train, epochs=epochs, batch_size=int(cfg["batch-size"]),
                         learning_rate=float(cfg["learning-rate"]), max_len=int(cfg["max-seq-len"]), dp=dp, seed=seed,
                         **objective_options(cfg))
    # The cold items join the catalogue now: their text rows arrive, their ID rows are those of a new item
    # (id: a fresh initialisation; id+text: zero, as TextSASRec._load_from_state_dict gives an added item).
    with torch.no_grad():
        if text is not None:
            text.table[cold] = real_text
        for name, p in _catalogue_rows(model).items():
            p[cold] = 0.0 if text is not None else fresh[name]
    out = cold_hit_rates(model, split, k=int(cfg["top-k"]), max_len=int(cfg["max-seq-len"]))
    return {"item-features": cfg["item-features"], "epsilon": epsilon, "epochs": epochs, "train-loss": round(result.loss, 4),
            "trainable-parameters": trainable_parameters(model), "train-seconds": round(time.perf_counter() - start, 1), **out}


def _catalogue_rows(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's per-item parameter tables (rows indexed by item): ID embeddings and ID output rows."""
    return {name: p for name, p in model.named_parameters()
            if name in ("item_emb.weight", "output.weight", "item_emb.ids.weight", "output.ids.weight")}


def _check_titles(dataset: str, variants: list[str], extra: dict) -> None:
    """Before any training: the text variants need the item titles beside ``dataset`` (or a published features
    file); without them the ``id`` variant trained in full and the first text one failed (a research-CLI review)."""
    from common.config_checks import ITEM_FEATURES
    from common.data.attributes import metadata_path
    from common.data.loaders import load_item_titles

    if unknown := [f for f in variants if f not in ITEM_FEATURES]:
        raise ConfigError(f"--item-features {unknown[0]}: use {', '.join(ITEM_FEATURES)}")
    text = [f for f in variants if f != "id"]
    if not text or extra.get("item-text-features"):
        return
    meta = metadata_path(dataset)
    if meta is None or not load_item_titles(meta):
        raise ConfigError(f"--dataset {dataset}: no item titles beside it (u.item, movies.dat or movies.csv), which "
                          f"--item-features {text[0]} needs; give a MovieLens folder, or only --item-features id")


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a MovieLens folder with titles (u.item / movies.dat)")
    parser.add_argument("--item-features", nargs="+", default=["id", "text", "id+text"])
    parser.add_argument("--cold-fraction", type=open_fraction, default=0.1, help="share of interacted items held out (default 0.1)")
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--epsilon", type=positive_float, default=None, help="central DP-SGD at this epsilon (default: no DP)")
    parser.add_argument("--run-config", default="", help='extra knobs, e.g. "embedding-dim=32 max-seq-len=50"; '
                        "its seed sets the model's initialisation")
    parser.add_argument("--seed", type=seed_arg, default=0,
                        help="seed of the cold-item split, the batch order and the DP noise (default 0); repeat "
                             "with other seeds for the spread")
    args = parser.parse_args(argv)

    extra = parse_run_config(args.run_config)
    # DP here is --epsilon's (central DP-SGD on the researcher's data): the federation's switches would be
    # dropped in silence (a simulation-features journey: dp=true trained without DP)
    if ignored := sorted(set(extra) & {"dp", "dp-mode", "target-epsilon"}):
        raise ConfigError(f"--run-config {', '.join(ignored)}: the cold-start probe's DP is --epsilon (central "
                          "DP-SGD at that epsilon, target-delta from --run-config); drop these knobs")
    _check_titles(args.dataset, args.item_features, extra)
    for features in args.item_features:
        row = run_cold_start({**extra, "dataset": args.dataset, "item-features": features},
                             fraction=args.cold_fraction, epochs=args.epochs, epsilon=args.epsilon, seed=args.seed)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
