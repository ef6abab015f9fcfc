"""Federated simulation wall time against centralised training on the same data and epochs,
and cross-device throughput (one client per user).

    nice -n 5 python -m simulations.bench.federation --dataset ../shared/data/ml-100k \
        --rounds 10 --local-epochs 1 --partners 5,20 --dp off,local
    nice -n 5 python -m simulations.bench.federation --partners "" --cross-device ../shared/data/ml-100k

Both sides run as fresh processes timed from the outside (interpreter start and imports count
on both): federated = ``python -m simulations.run`` (Flower's simulation engine on Ray, one CPU
per client so every core trains; its run directory, model, population files and plots are
written as always) and, with ``--engines ray,local``, ``python -m simulations.local_grid`` (the
same ServerApp and ClientApps in one process, partners trained one after another with all
cores, no Ray); centralised = ``python -m simulations.bench.centralised`` (``train_local``
over all users, one call of ``local-epochs`` epochs per round). Same data, model, batch size,
learning rate, total epochs, DP target (centralised: one noise multiplier for all users at the
same target epsilon) and evaluation schedule (``evaluate-every``: full-ranking test metrics of
all users, on both sides).

The centralised reference is the fastest of ``--central-threads`` (under load, 2 intra-op threads
on 2 cores were 3x slower than 1), with ``--bracket`` the mean of a run before and one after the
federated runs (the shared machine's load drifts). Reported: whole-run wall time and ratio; steady-state round (median of rounds 2..R-1: no
start-up, no final evaluation) and ratio; and the federated run's phases: start-up before the
ServerApp (imports, data check), round 1 (Ray start, client actors importing torch/Opacus/Flower,
data, noise calibration, first training), rounds 2..R, and the tail (Ray shutdown, population
files, plots). ``--profile`` adds fresh-process timings of the round-1 ingredients.
Cross-device: ``partitioning = cross-device`` (one partner per user), ``--clients-per-round``
trained and ``--clients-per-round`` evaluated per round (``fraction-evaluate``); throughput =
client calls per steady round second. Writes simulations/bench/results/federation*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simulations.flower_env import set_flower_env
from common.cli_args import non_negative_int, non_negative_ints, output_file, positive_int, positive_ints_or_none
from common.cli_errors import user_errors_exit
from common.run_files import metrics_lines

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[2]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def run_config_args(overrides: dict) -> list[str]:
    """``--run-config`` arguments of ``simulations.run`` for ``overrides`` (TOML values)."""
    return ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in overrides.items())]


def round_marks(run_dir: Path) -> list[float]:
    """Seconds from the ServerApp's start to the end of each round (metrics.jsonl)."""
    lines = metrics_lines(run_dir / "metrics.jsonl")  # [] before the first round; a cut-short line is skipped
    return [float(x["seconds"]) for x in lines if "seconds" in x]


def steady(rounds: list[float]) -> float | None:
    """Median of rounds 2..R-1 (seconds): after start-up, before the final evaluation."""
    middle = rounds[1:-1]
    return statistics.median(middle) if middle else None


def _timed(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """(start, end) in ``time.time`` seconds and the output of ``cmd``; raises on failure."""
    from simulations.run_stop import sigterm_stops, stop_run

    start = time.time()
    # A session of its own: on Ctrl-C or SIGTERM (``timeout``) its whole group (the simulation's Ray
    # processes) is stopped; subprocess.run killed the child alone and left Ray's agents running, and
    # without the SIGTERM handler a killed bench left its child running (a commit review)
    with sigterm_stops():
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **set_flower_env()}, start_new_session=True)
        try:
            out, _ = proc.communicate()
        except BaseException:
            stop_run(proc)
            raise
    end = time.time()
    log.write_text(out)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); log: {log}")
    return start, end, out


ENGINES = ("ray", "local")  # Flower's simulation engine; simulations.local_grid (in process, partners in turn)


def federated(overrides: dict, partners: int, workdir: Path, *, cpus_per_client: float = 1.0,
              engine: str = "ray") -> dict:
    """One ``simulations.run`` (``engine = "ray"``) or ``simulations.local_grid`` (``"local"``)
    process: whole wall time, round times and phases (seconds)."""
    if engine == "ray":
        cmd = [sys.executable, "-m", "simulations.run", "--num-partners", str(partners),
               "--cpus-per-client", str(cpus_per_client), *run_config_args(overrides)]
    elif engine == "local":
        cmd = [sys.executable, "-m", "simulations.local_grid", "--num-partners", str(partners), *run_config_args(overrides)]
    else:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    start, end, out = _timed(cmd, workdir / f"fed-{engine}-{overrides.get('dp-mode')}-{partners}.log")
    found = re.findall(r"run directory: (\S+)\n", out)
    run_dir = Path(found[-1]) if found else None
    marks = round_marks(run_dir) if run_dir else []
    if not marks:
        raise RuntimeError(f"no rounds recorded by {run_dir}")
    server_start = (run_dir / "config.json").stat().st_mtime  # RunRecorder writes it when the ServerApp starts
    rounds = [marks[0]] + [b - a for a, b in zip(marks, marks[1:])]
    return {"wall_s": end - start, "round_s": rounds, "steady_round_s": steady(rounds), "run_dir": str(run_dir),
            "phases_s": {"before_server": server_start - start, "round_1": marks[0], "rounds_2_to_R": marks[-1] - marks[0],
                         "after_last_round": end - server_start - marks[-1]}}


def centralised(overrides: dict, workdir: Path, *, threads: int = 0, tag: str = "") -> dict:
    """One ``simulations.bench.centralised`` process: whole wall time plus its own phase times."""
    out = workdir / f"central-{overrides.get('dp-mode')}-{threads}{tag}.json"
    cmd = [sys.executable, "-m", "simulations.bench.centralised", "--threads", str(threads), "--out", str(out),
           "--overrides", json.dumps(overrides)]
    start, end, _ = _timed(cmd, out.with_suffix(".log"))
    inner = json.loads(out.read_text())
    return {"wall_s": end - start, "steady_round_s": steady(inner["round_s"]), **inner}


def profile_startup(workdir: Path, overrides: dict, partners: int) -> dict:
    """Fresh-process times (s) of round 1's fixed ingredients: the clients' imports, Ray start/stop,
    one partner's noise calibration (partner 0 of ``partners``, DP plan of ``overrides``)."""
    from common.config import resolve_config
    from common.partners import simulated_partner
    from common.privacy import default_delta, steps_per_epoch
    from common.training import user_count_for_training

    cfg = resolve_config(None, overrides)
    users = user_count_for_training(simulated_partner(cfg, 0, partners))
    rate, steps = steps_per_epoch(users, int(cfg["batch-size"]))
    plan = dict(target_epsilon=float(cfg["target-epsilon"]), target_delta=float(cfg["target-delta"]) or default_delta(users),
                sample_rate=rate, total_steps=int(cfg["num-server-rounds"]) * int(cfg["local-epochs"]) * steps)
    # Opacus (and so torch) imported first: a partner process has them already; this times the search
    calibration = ("import time; import opacus.accountants, scipy.special; from common.privacy import calibrate_noise; "
                   "t = time.perf_counter(); "
                   f"calibrate_noise(**{plan!r}); print(time.perf_counter() - t)")
    imports = ("import time; t = time.perf_counter(); import client.app; from client.private_factors import mf_trainer; "
               "from client.privacy_budget import PartnerBudget; import common.training, common.task; "
               "print(time.perf_counter() - t)")
    ray_cycle = ("import time; t = time.perf_counter(); import ray; from simulations.resources import backend_config; "
                 "ray.init(**backend_config()['init_args']); u = time.perf_counter(); ray.shutdown(); "
                 "print(u - t, time.perf_counter() - u)")
    out: dict = {"calibration_plan": {**plan, "partners": partners, "users": users}}
    for name, code in (("client_imports_s", imports), ("ray_init_and_shutdown_s", ray_cycle),
                       ("partner_calibration_s", calibration)):
        _, _, text = _timed([sys.executable, "-c", code], workdir / f"profile-{name}.log")
        out[name] = [float(x) for x in text.strip().splitlines()[-1].split()]
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of the rows written by :func:`main`."""
    lines = ["| engine | DP | partners | federated whole run (s) | centralised whole run (s) | ratio | federated steady round (s) "
             "| centralised steady round (s) | ratio | fed. before server / round 1 / rounds 2..R / after (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ph = r["federated_phases_s"]
        steady_cols = (f"{r['federated_round_s']:.1f} | {r['centralised_round_s']:.1f} | {r['round_ratio']:.2f}x"
                       if r["round_ratio"] else "- | - | -")
        lines.append(f"| {r.get('engine', 'ray')} | {r['dp-mode']} | {r['partners']} | {r['federated_s']:.1f} | {r['centralised_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {steady_cols} | {ph['before_server']:.0f} / {ph['round_1']:.0f} / "
                     f"{ph['rounds_2_to_R']:.0f} / {ph['after_last_round']:.0f} |")
    return "\n".join(lines)


def compare(central: dict, fed: dict, mode: str, partners: int, engine: str = "ray") -> dict:
    """One row: the federated run against the (fastest) centralised run of the same DP mode."""
    steady_f, steady_c = fed["steady_round_s"], central["steady_round_s"]
    return {"engine": engine, "dp-mode": mode, "partners": partners, "federated_s": fed["wall_s"], "centralised_s": central["wall_s"],
            "ratio": fed["wall_s"] / central["wall_s"], "federated_round_s": steady_f, "centralised_round_s": steady_c,
            "round_ratio": steady_f / steady_c if steady_f and steady_c else None,
            "federated_phases_s": fed["phases_s"], "federated_round_1_s": fed["round_s"][0],
            "centralised_threads": central["threads"], "centralised_calibration_s": central.get("calibration_s"),
            "centralised_s_before_after": central.get("wall_s_before_after"),
            "run_dir": fed["run_dir"], "load_average": os.getloadavg()}


def _check_arguments(args: argparse.Namespace) -> dict:
    """The ``--run-config`` overrides; a malformed one, an unknown engine or dp-mode is a ConfigError."""
    from common.errors import ConfigError
    from common.privacy import DP_MODES

    try:
        extra = json.loads(args.run_config)
    except ValueError as exc:
        raise ConfigError(f"--run-config {args.run_config!r} is not JSON ({exc})") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"--run-config {args.run_config!r}: give a JSON object, e.g. '{{\"embedding-dim\": 32}}'")
    for engine in args.engines.split(","):
        if engine not in ENGINES:
            raise ConfigError(f"--engines: unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    for mode in (m for m in args.dp.split(",") if m):
        if mode not in DP_MODES:
            raise ConfigError(f"--dp: unknown dp-mode {mode!r}; use one of {', '.join(DP_MODES)}")
    return extra


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/data/ml-100k", help="data set of both sides")
    parser.add_argument("--partners", type=positive_ints_or_none, default="5,20", help='partner counts ("" = cross-device only)')
    parser.add_argument("--dp", default="off,local", help="dp-mode values to compare")
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--local-epochs", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="32: 20 partners of ML-100K have ~47 users each")
    parser.add_argument("--evaluate-every", type=non_negative_int, default=0, help="0 = only after the last round (both sides)")
    parser.add_argument("--central-threads", type=non_negative_ints, default="1",
                        help="torch threads of the centralised run, each measured; the faster is the reference (0 = all cores)")
    parser.add_argument("--run-config", default="{}", help='extra overrides for both sides, JSON')
    parser.add_argument("--engines", default="ray",
                        help='federated engines to time: "ray" (simulations.run) and/or "local" (simulations.local_grid)')
    parser.add_argument("--bracket", action="store_true",
                        help="run the centralised reference again after the federated runs and use the mean of both")
    parser.add_argument("--profile", action="store_true", help="also time the round-1 ingredients in fresh processes")
    parser.add_argument("--cross-device", default="", help="interaction log for the cross-device measurement (e.g. ML-100K)")
    parser.add_argument("--clients-per-round", type=positive_int, default=40)
    parser.add_argument("--cross-device-rounds", type=positive_int, default=4)
    parser.add_argument("--out", type=output_file, default=None,
                        help="results file (default simulations/bench/results/federation[-cross-device].json)")
    args = parser.parse_args(argv)
    extra = _check_arguments(args)  # before any work or folder: a typo failed after the centralised runs (a review)
    workdir = Path(tempfile.mkdtemp(prefix="fedbench-"))
    base = {"dataset": args.dataset, "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
            "batch-size": args.batch_size, "evaluate-every": args.evaluate_every or args.rounds,
            "run-dir": str(workdir / "runs"), **extra}
    meta = {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "command": " ".join(sys.argv), **base}
    rows, centrals = [], []
    for mode in [m for m in args.dp.split(",") if m and args.partners]:
        over = {**base, "dp-mode": mode}
        runs = [centralised(over, workdir, threads=t) for t in args.central_threads]
        for c in runs:
            centrals.append({"dp-mode": mode, **{k: v for k, v in c.items() if k != "final_metrics"}})
            print(json.dumps({"centralised": mode, "threads": c["threads"], "wall_s": round(c["wall_s"], 1),
                              "steady_round_s": c["steady_round_s"], "final": c["final_metrics"]}), flush=True)
        central = min(runs, key=lambda c: c["wall_s"])
        feds = [(p, e, federated(over, p, workdir, engine=e)) for e in args.engines.split(",")
                for p in args.partners]
        if args.bracket:  # the machine's load drifts: the reference is the mean of a run before and after
            again = centralised(over, workdir, threads=central["threads"], tag="after")
            centrals.append({"dp-mode": mode, "bracket": "after", **{k: v for k, v in again.items() if k != "final_metrics"}})
            central = {**central, "wall_s": (central["wall_s"] + again["wall_s"]) / 2,
                       "steady_round_s": (central["steady_round_s"] + again["steady_round_s"]) / 2,
                       "wall_s_before_after": [central["wall_s"], again["wall_s"]]}
        for partners, engine, fed in feds:
            rows.append(compare(central, fed, mode, partners, engine))
            print(json.dumps(rows[-1]), flush=True)
    cross = None
    if args.cross_device:
        from common.config import resolve_config
        from common.task import federation_data

        users = federation_data(resolve_config(None, {"dataset": args.cross_device})).num_users
        share = args.clients_per_round / users
        over = {**base, "dataset": args.cross_device, "partitioning": "cross-device", "dp-mode": "off",
                "num-server-rounds": args.cross_device_rounds, "evaluate-every": 1, "fraction-train": share,
                "fraction-evaluate": share, "min-nodes": 1}
        fed = federated(over, users, workdir)
        per_round = fed["steady_round_s"]
        cross = {"clients": users, "clients_per_round": args.clients_per_round, "rounds": args.cross_device_rounds,
                 "wall_s": fed["wall_s"], "round_s": fed["round_s"], "steady_round_s": per_round,
                 "phases_s": fed["phases_s"],
                 # a steady round = clients_per_round trainings + clients_per_round evaluations
                 "client_trainings_per_s": args.clients_per_round / per_round if per_round else None,
                 "client_calls_per_s": 2 * args.clients_per_round / per_round if per_round else None}
        print(json.dumps(cross), flush=True)
    first = args.partners[0] if args.partners else 5
    profile = profile_startup(workdir, {**base, "dp-mode": "local"}, first) if args.profile else None
    if rows:
        print("\n" + table(rows))
    meta["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / ("federation.json" if rows or not cross else "federation-cross-device.json")
    path.write_text(json.dumps({"settings": meta, "rows": rows, "centralised": centrals, "cross_device": cross,
                                "profile": profile}, indent=2) + "\n")
    print(f"\nwrote {path} (logs and run directories in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
