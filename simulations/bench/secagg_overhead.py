"""SecAgg+ overhead: wall time per round with and without secure aggregation, same model and partners.

    python -m simulations.bench.secagg_overhead --partners 5 --rounds 2

Runs the real ServerApp and ClientApps (default model and config: SASRec, DP-SGD) on the
in-process ``LocalGrid`` (simulations/local_grid.py), partners one after the other, so
SecAgg+ costs what its own work costs (key agreement, Shamir shares, masking, unmasking:
3 extra message exchanges per round) without process start-up or network time. Two
measures: wall time per round of each mode (noisy on a shared machine), and the time spent
inside the protocol itself (server stages and the partners' masking, timed directly), which
does not depend on how long training took. A discarded plain run goes first (data loading,
partitions, noise calibration and imports are cached per process), so both measured modes run
warm; before, the plain run paid for them and "protocol time / plain round" was 0.3% on a
loaded machine where the same work is 5-10% of a warm round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from simulations.flower_env import set_flower_env
from common.cli_errors import user_errors_exit
from common.run_files import metrics_lines

set_flower_env()


def round_seconds(run_dir: Path) -> list[float]:
    """Per-round wall time (s) from metrics.jsonl, whose 'seconds' are cumulative since the run began."""
    lines = metrics_lines(run_dir / "metrics.jsonl")  # a line cut short by a crash is skipped, not fatal
    cumulative = [float(x["seconds"]) for x in lines]
    return [b - a for a, b in zip([0.0] + cumulative[:-1], cumulative)]


def instrument() -> dict[str, float]:
    """Time SecAgg+'s own work (seconds, summed over rounds); returns the live totals."""
    import client.secure_aggregation as client_side
    from server.secagg_protocol import SecAggPlusRound

    totals: dict[str, float] = defaultdict(float)

    def timed(name: str, label: str) -> None:
        original = getattr(SecAggPlusRound, name)

        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - t0

        setattr(SecAggPlusRound, name, wrapper)

    # In process, these include the partners' handling of stages 0, 1 and 3 (they run inline).
    timed("setup_and_share_keys", "setup + share keys")
    timed("unmask", "unmask")
    original_mod = client_side.secaggplus_mod

    def timed_mod(msg, ctx, call_next):  # noqa: ANN001, ANN202
        training = [0.0]

        def timed_next(m, c):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()
            try:
                return call_next(m, c)
            finally:
                training[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        reply = original_mod(msg, ctx, timed_next)
        if training[0] > 0:  # the collect stage: masking, minus the training it wraps
            totals["partners' masking"] += time.perf_counter() - t0 - training[0]
        return reply

    client_side.secaggplus_mod = timed_mod
    return totals


def measure(partners: int, rounds: int, extra: dict) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-round seconds for plain FedAvg and for SecAgg+ (same seed, data, model), and protocol totals."""
    from simulations.local_grid import run_local

    totals = instrument()
    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as tmp:
        run_local({**extra, "num-server-rounds": rounds, "run-dir": tmp, "run-name": "warm-up"}, partners)
        for mode, secure in (("plain", False), ("secagg", True)):
            overrides = {**extra, "num-server-rounds": rounds, "secure-aggregation": secure,
                         "run-dir": tmp, "run-name": mode}
            t0 = time.perf_counter()
            out[mode] = round_seconds(run_local(overrides, partners))
            print(f"{mode}: {time.perf_counter() - t0:.1f} s in all, rounds {[round(s, 1) for s in out[mode]]}",
                  file=sys.stderr)
    return out, dict(totals)


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    from common.cli_args import parse_run_config, positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partners", type=positive_int, default=5)
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds per mode (after a discarded warm-up run)")
    parser.add_argument("--run-config", action="append", default=[], help="config overrides for both modes")
    args = parser.parse_args(argv)
    extra = parse_run_config(args.run_config)
    times, totals = measure(args.partners, args.rounds, extra)
    print("| mode | seconds per round (warm: after a discarded plain run) |\n|---|---|")
    for mode, t in times.items():
        print(f"| {mode} | {', '.join(f'{s:.1f}' for s in t)} |")
    protocol = sum(totals.values()) / args.rounds
    plain = sum(times["plain"]) / args.rounds
    print(f"\nSecAgg+ protocol time per round, {args.partners} partners: {protocol:.2f} s "
          f"({', '.join(f'{k} {v / args.rounds:.2f} s' for k, v in totals.items())}); "
          f"{100.0 * protocol / plain:.1f}% of a plain round ({plain:.1f} s)")
    secagg = sum(times["secagg"]) / args.rounds
    print(f"wall time per round: plain {plain:.1f} s, SecAgg+ {secagg:.1f} s ({100.0 * (secagg / plain - 1.0):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
