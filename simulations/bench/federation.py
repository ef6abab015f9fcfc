"""Federated simulation wall time against centralised training on the same data and epochs,
and cross-device throughput (one client per user).

    nice -n 5 python -m simulations.bench.federation                    # 5 and 20 partners, DP off and on
    nice -n 5 python -m simulations.bench.federation --cross-device ../shared/data/ml-100k

Federated: ``simulations.run.run_federation`` (Flower's simulation engine on Ray, one CPU per
client so every core trains), timed from the call to its return, Ray start-up and the run
directory included, and per steady round: rounds after the first (which includes starting
the client actors), from the round times in metrics.jsonl.
Centralised: ``train_local`` on every user of the same data for rounds x local-epochs epochs
with the same batch size, learning rate and DP kind (noise multiplier 1.0 when DP is on), plus
the same per-round validation ranking over all users that the federation runs on its partners.
Cross-device: ML-100K (or any log) with ``partitioning = cross-device`` (one partner per user),
``--clients-per-round`` sampled per round, DP off; throughput = client trainings per steady round second.
Writes simulations/bench/results/federation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from simulations.flower_env import set_flower_env

set_flower_env()

RESULTS = Path(__file__).parent / "results"


def _round_marks(run_dir: Path) -> list[float]:
    """Cumulative seconds from the ServerApp's start to the end of each round (metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [float(x["seconds"]) for x in lines if "seconds" in x]


def federated(overrides: dict, partners: int) -> dict:
    """Wall time of the whole simulation (Ray start-up included) and the steady round time
    (rounds after the first, whose time includes starting the client actors)."""
    from simulations.run import run_federation

    start = time.perf_counter()
    run_dir = run_federation(overrides, partners)
    marks = _round_marks(run_dir)
    steady = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
    return {"wall_s": time.perf_counter() - start, "rounds_s": marks[-1] if marks else None,
            "steady_round_s": steady, "run_dir": str(run_dir)}


def centralised(overrides: dict) -> dict:
    """The same model, data, epochs and DP kind trained on one machine without Flower."""
    from common.config import resolve_config
    from common.metrics import evaluate_ranking
    from common.partners import split_population
    from common.task import new_model
    from common.training import DPSettings, train_local

    start = time.perf_counter()
    cfg = resolve_config(None, overrides)
    data, _ = split_population(cfg)
    model = new_model(cfg, data.num_items)
    dp = None if cfg["dp-mode"] == "off" else DPSettings(noise_multiplier=1.0, max_grad_norm=float(cfg["max-grad-norm"]),
                                                           grad_sample_mode=str(cfg["grad-sample-mode"]))
    rounds = []
    for rnd in range(int(cfg["num-server-rounds"])):
        begin = time.perf_counter()
        train_local(model, data, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                    learning_rate=float(cfg["learning-rate"]), max_len=int(cfg["max-seq-len"]), dp=dp, seed=rnd)
        evaluate_ranking(model, data, split="valid", max_len=int(cfg["max-seq-len"]))
        rounds.append(time.perf_counter() - begin)
    return {"wall_s": time.perf_counter() - start, "round_s": sorted(rounds)[len(rounds) // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partners", default="5,20", help='partner counts ("" = cross-device only)')
    parser.add_argument("--dp", default="off,local", help="dp-mode values to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--run-config", default="", help='extra overrides, e.g. "synthetic-users=2000"')
    parser.add_argument("--cross-device", default="", help="interaction log for the cross-device measurement (e.g. ML-100K)")
    parser.add_argument("--clients-per-round", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of this process (centralised run, server-side work); 0 = torch's default. "
                             "Client actors get one per CPU share from Ray (simulations/resources.py)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from flwr.common.config import parse_config_args

    base = {"num-server-rounds": args.rounds, "local-epochs": args.local_epochs, "run-dir": "runs/bench",
            **(parse_config_args([args.run_config]) if args.run_config else {})}
    rows = []
    for mode in [m for m in args.dp.split(",") if m and args.partners]:
        central = centralised({**base, "dp-mode": mode})
        print(json.dumps({"setting": "centralised", "dp-mode": mode, **central}), flush=True)
        for partners in [int(x) for x in args.partners.split(",")]:
            fed = federated({**base, "dp-mode": mode}, partners)
            steady = fed["steady_round_s"]
            row = {"dp-mode": mode, "partners": partners, "federated_s": fed["wall_s"], "federated_rounds_s": fed["rounds_s"],
                   "centralised_s": central["wall_s"], "ratio": fed["wall_s"] / central["wall_s"],
                   "federated_round_s": steady, "centralised_round_s": central["round_s"],
                   "round_ratio": steady / central["round_s"] if steady else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    cross = None
    if args.cross_device:
        from common.config import resolve_config
        from common.task import federation_data

        users = federation_data(resolve_config(None, {**base, "dataset": args.cross_device})).num_users
        over = {**base, "dataset": args.cross_device, "partitioning": "cross-device", "local-epochs": 1, "dp-mode": "off",
                "fraction-train": args.clients_per_round / users, "min-nodes": 1}
        fed = federated(over, users)
        cross = {"clients": users, "clients_per_round": args.clients_per_round, "rounds": args.rounds,
                 "wall_s": fed["wall_s"], "rounds_s": fed["rounds_s"], "steady_round_s": fed["steady_round_s"],
                 # steady rounds; every round also evaluates on all clients (fraction_evaluate = 1, server/strategy_factory.py)
                 "client_trainings_per_s": args.clients_per_round / steady if (steady := fed["steady_round_s"]) else None,
                 "client_calls_per_s": (args.clients_per_round + users) / steady if steady else None}
        print(json.dumps(cross), flush=True)
    print("\n| DP | partners | federated total (s) | centralised total (s) | ratio | federated round (s) | centralised round (s) | ratio |"
          "\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        steady = (f"{r['federated_round_s']:.1f} | {r['centralised_round_s']:.1f} | {r['round_ratio']:.2f}x"
                  if r["round_ratio"] else "- | - | -")
        print(f"| {r['dp-mode']} | {r['partners']} | {r['federated_s']:.1f} | {r['centralised_s']:.1f} | {r['ratio']:.2f}x | {steady} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": os.cpu_count(), "threads": args.threads, "load_average_at_end": os.getloadavg(), "command": " ".join(sys.argv), **base}
    name = "federation.json" if rows else "federation-cross-device.json"
    (RESULTS / name).write_text(json.dumps({"settings": meta, "rows": rows, "cross_device": cross}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
