"""Centralised reference run for the federation benchmark: the same model, data, epochs, DP and
evaluation schedule as a simulation, trained in one process without Flower.

    python -m simulations.bench.centralised --out central.json \
        --overrides '{"dataset": "../shared/data/ml-100k", "num-server-rounds": 10, "local-epochs": 1}'

One ``train_local`` call per "round" over every user of the (holdout-less) population, each
``local-epochs`` epochs (as each partner does in a round; Adam's state carried over with
``keep-optimizer-state``), evaluated on the test split of all
users with the simulation's schedule (``evaluate-every``, last round always). DP on: one noise
multiplier calibrated for the whole population at ``target-epsilon`` over all rounds, i.e.
user-level DP-SGD exactly as one partner holding every user would run it. Writes a JSON of
phase times (seconds, ``time.perf_counter``): imports, data, calibration, each round's training
and evaluation. ``simulations/bench/federation.py`` runs this as a subprocess and times it from
the outside, so interpreter start and imports count as they do for ``simulations.run``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from common.cli_args import non_negative_int, output_file  # noqa: E402
from common.cli_errors import user_errors_exit  # noqa: E402
from simulations.bench import write_results  # noqa: E402


def run(overrides: dict, *, threads: int = 0, validation: bool = False) -> dict:
    """Train and evaluate as described in the module docstring; returns the phase times.
    ``validation``: each evaluated round also scores the validation split (second last item), so
    settings can be chosen without looking at the test split."""
    import torch

    from common.config import resolve_config
    from common.errors import ConfigError
    from common.evaluation import evaluate_model, evaluates_round
    from common.partners import split_population
    from common.privacy import (calibrate_noise, default_delta, dp_mode, refuse_many_examples_per_user,
                                steps_per_epoch, uses_local_dp)
    from common.task import new_model
    from common.training import DPSettings, refuse_non_sequence_model, train_local, user_count_for_training
    from common.objectives import epoch_learning_rates, objective_options

    if threads:
        torch.set_num_threads(threads)
    out: dict = {"threads": torch.get_num_threads(), "imports_s": time.perf_counter() - _T0}
    cfg = resolve_config(None, overrides)
    if validation and cfg["train-on-validation"]:
        raise ConfigError("--validation scores the validation items, which train-on-validation = true trains on; "
                          "drop one of the two")
    refuse_many_examples_per_user(cfg)  # as the server does: never train something else than asked
    begin = time.perf_counter()
    data, _ = split_population(cfg)
    model = new_model(cfg, data.num_items)
    refuse_non_sequence_model(model, "the centralised benchmark")
    if cfg["item-init"] == "cooccurrence":  # as the coordinator does (server/item_init.py)
        from common.cooccurrence import cooccurrence_counts, initialise_item_embeddings

        counts = cooccurrence_counts(data, int(cfg["item-init-window"]))
        initialise_item_embeddings(model, counts, seed=int(cfg["seed"]))
    elif cfg["item-init"] == "text":  # as the coordinator does (server/app.py)
        from common.text_init import initialise_from_text

        initialise_from_text(model, cfg, data.catalogue)
    out["data_s"] = time.perf_counter() - begin
    rounds, epochs, batch = int(cfg["num-server-rounds"]), int(cfg["local-epochs"]), int(cfg["batch-size"])
    dp = None
    if uses_local_dp(dp_mode(cfg)):
        begin = time.perf_counter()
        users = user_count_for_training(data)
        rate, steps = steps_per_epoch(users, batch)
        delta = float(cfg["target-delta"]) or default_delta(users)
        noise = calibrate_noise(target_epsilon=float(cfg["target-epsilon"]), target_delta=delta, sample_rate=rate,
                                total_steps=rounds * epochs * steps, accountant=str(cfg["accountant"]))
        # A benchmark on the researcher's own data: reproducible noise (partners draw OS entropy)
        dp = DPSettings(noise, float(cfg["max-grad-norm"]), str(cfg["accountant"]), str(cfg["grad-sample-mode"]))
        out.update(calibration_s=time.perf_counter() - begin, noise_multiplier=noise, sample_rate=rate)
    from common.item_chain import chain_from_config

    chain = chain_from_config(cfg, data.train_sequences(), data.num_items + 1)  # as the one partner holding everyone
    train_s, eval_s, metrics, curve = [], [], {}, []
    adam = None  # keep-optimizer-state: Adam's moments go on from round to round, as a partner's do
    for rnd in range(1, rounds + 1):
        begin = time.perf_counter()
        result = train_local(model, data, epochs=epochs, batch_size=batch, learning_rate=float(cfg["learning-rate"]),
                             max_len=int(cfg["max-seq-len"]), seed=int(cfg["seed"]) * 1000 + rnd,
                             dp=dp and dataclasses.replace(dp, noise_seed=int(cfg["seed"]) * 1000 + rnd),  # fresh each round
                             history_windows=bool(cfg["history-windows"]),
                             reverse_histories=bool(cfg["reverse-histories"]), optimizer_state=adam,
                             learning_rates=epoch_learning_rates(cfg, rnd),
                             **objective_options(cfg))
        adam = result.optimizer_state if cfg["keep-optimizer-state"] else None
        train_s.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        if evaluates_round(rnd, int(cfg["evaluate-every"]), rounds):
            sums = evaluate_model(model, data, max_len=int(cfg["max-seq-len"]), top_k=int(cfg["top-k"]),
                                  tie_orders=int(cfg["tie-orders"]), chain=chain)
            metrics = _means(sums)
            # time to quality: cumulative training seconds at each evaluated round
            point = {"round": rnd, "train_s_cumulative": sum(train_s), "ndcg@10": metrics.get("ndcg@10"),
                     "hr@10": metrics.get("hr@10")}
            if validation:
                valid = evaluate_model(model, data, max_len=int(cfg["max-seq-len"]), top_k=int(cfg["top-k"]),
                                       tie_orders=int(cfg["tie-orders"]), split="valid", chain=chain)
                point.update({f"valid-{k}": _means(valid).get(k) for k in ("ndcg@10", "hr@10")})
            curve.append(point)
        eval_s.append(time.perf_counter() - begin)
    out.update(train_s=train_s, eval_s=eval_s, round_s=[t + e for t, e in zip(train_s, eval_s)],
               users=data.num_users, final_metrics=metrics, quality_curve=curve, inside_s=time.perf_counter() - _T0)
    return out


def _means(sums: dict) -> dict:
    """HR@K/NDCG@K means of one evaluation's sums (its recommended-item list left out)."""
    from common.metrics import means_from_sums

    return means_from_sums({k: v for k, v in sums.items() if not k.startswith("rec-items")})


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", default="{}", help='run config overrides as JSON, e.g. {"local-epochs": 1}')
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch intra-op threads; 0 = torch's default (all cores)")
    parser.add_argument("--out", required=True, type=output_file, help="JSON file for the phase times")
    parser.add_argument("--validation", action="store_true",
                        help="also score the validation split each evaluated round (valid-ndcg@10, valid-hr@10 in quality_curve)")
    args = parser.parse_args(argv)
    from common.errors import ConfigError

    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--overrides is not JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ConfigError('--overrides must be a JSON object, e.g. {"local-epochs": 1}')
    # NOTE: no Flower import here: the centralised run should not pay for it
    result = run(overrides, threads=args.threads, validation=args.validation)
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
