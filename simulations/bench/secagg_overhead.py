"""SecAgg+ overhead: wall time per round with and without secure aggregation, same model and partners.

    python -m simulations.bench.secagg_overhead --partners 5 --rounds 3

Runs the real ServerApp and ClientApps (default model and config: SASRec, DP-SGD) on the
in-process ``LocalGrid`` (simulations/local_grid.py), partners one after the other, so
the difference between the two modes is SecAgg+'s own cost (key agreement, Shamir shares,
masking, unmasking: 3 extra message exchanges per round) without process start-up or
network time. Round 1 also pays data loading and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from simulations.flower_env import set_flower_env

set_flower_env()


def round_seconds(run_dir: Path) -> list[float]:
    """Per-round wall time (s) from metrics.jsonl, whose 'seconds' are cumulative since the run began."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cumulative = [float(x["seconds"]) for x in lines]
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def measure(partners: int, rounds: int, extra: dict) -> dict[str, list[float]]:
    """Per-round seconds for plain FedAvg and for SecAgg+ (same seed, data, model)."""
    from simulations.local_grid import run_local

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        for mode, secure in (("plain", False), ("secagg", True)):
            overrides = {**extra, "num-server-rounds": rounds, "secure-aggregation": secure,
                         "run-dir": tmp, "run-name": mode}
            t0 = time.perf_counter()
            run_dir = run_local(overrides, partners)
            out[mode] = round_seconds(run_dir)
            print(f"{mode}: {time.perf_counter() - t0:.1f} s in all, rounds {[round(s, 1) for s in out[mode]]}",
                  file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    from flwr.common.config import parse_config_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partners", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (round 1 includes data loading)")
    parser.add_argument("--run-config", action="append", default=[], help="config overrides for both modes")
    args = parser.parse_args(argv)
    extra = parse_config_args(args.run_config) if args.run_config else {}
    times = measure(args.partners, args.rounds, extra)
    later = {m: (sum(t[1:]) / len(t[1:]) if len(t) > 1 else t[0]) for m, t in times.items()}
    print("| mode | round 1 (s) | later rounds, mean (s) |\n|---|---|---|")
    for mode, t in times.items():
        print(f"| {mode} | {t[0]:.1f} | {later[mode]:.1f} |")
    print(f"\nSecAgg+ overhead per round (later rounds): {later['secagg'] - later['plain']:+.1f} s "
          f"({100.0 * (later['secagg'] / later['plain'] - 1.0):+.0f}%), {args.partners} partners")
    return 0


if __name__ == "__main__":
    sys.exit(main())
