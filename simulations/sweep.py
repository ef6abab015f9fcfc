"""Experiment sweeps: a grid of federated simulations, one CSV row per run, resumable.

    nice -n 5 python -m simulations.sweep simulations/configs/privacy_utility_ml100k.toml

A config (TOML) has three tables::

    [sweep]                        # how to run
    output = "simulations/results/x.csv"   # the CSV (plots are written beside it)
    runs-dir = "runs/sweeps/x"     # run directories of the single runs
    seeds = [1, 2, 3]              # every cell runs once per seed
    [fixed]                        # run-config keys shared by all cells (any key of [tool.flwr.app.config])
    dataset = "../shared/data/ml-100k"
    [grid]                         # run-config keys -> lists of values; the cells are their product
    target-epsilon = [1, 8, "inf"] # "inf" = no DP-SGD at the partners (docs/research.md)
    model = ["sasrec", "mf"]
    num-partners = [5]             # not a run-config key: the number of simulated partners

Each run is a separate ``python -m simulations.run`` process (Flower's simulation engine
starts and stops its own Ray instance there, so one run's Ray state, caches or crash
cannot leak into the next), started in the repository root: relative paths (``output``,
``runs-dir``, a [fixed] ``dataset``) are under the repository root wherever the sweep starts.
A run whose ``run-id`` (a hash of its full configuration) is already in the CSV is skipped,
so re-running the command resumes the sweep.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.cli_args import non_negative_int
from common.config import DEFAULTS
from common.errors import ConfigError, FedRecError
from common.files import atomic_write_text, refuse_unwritable_folder
from common.provenance import code_version
from simulations.cli import NOTHING_AGGREGATED, user_errors_exit
from simulations.run_claims import claimed_privacy, metrics_lines
from simulations.run_stop import Stopped, sigterm_stops, signals_deferred, stop_run  # noqa: F401 (re-exported)
from simulations.sweep_spec import (  # noqa: F401 (re-exported: tests and callers use sweep.<name>)
    PROJECT_ROOT,
    SWEEP_KEYS,
    SWEEP_ONLY,
    check_run,
    expand,
    is_no_dp,
    load_sweep,
    project_path,
    run_config,
    run_id,
    run_name,
    run_overrides,
    unused_budget_keys,
)
from simulations.sweep_table import METRICS, RUN_COLUMNS, results_table

ROUND_LINE = re.compile(r"round (\d+): HR@")
ERROR_LINE = re.compile(r"(?:[\w.-]+: )?error: ")  # ours ("error: ...") and argparse's ("run.py: error: ...")


def _config_arg(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value}"
    return f'{key}="{value}"'


def finished_runs(csv_path: Path, retry_failed: bool = False) -> set[str]:
    """Run ids already in the CSV (failed ones too unless ``retry_failed``)."""
    if not csv_path.exists():
        return set()
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "run-id" not in (reader.fieldnames or []):
            raise ConfigError(f"{csv_path}: not a sweep results file (no run-id column); choose another output")
        return {r["run-id"] for r in reader if not (retry_failed and r.get("status") != "ok")}


def _recorded_rows(csv_path: Path, columns: list[str]) -> tuple[list[list[str]], bool]:
    """The rows of an existing results file and whether it predates the commit column; a file with other
    columns (another sweep's) is a :class:`ConfigError`."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0] if rows else []
    older = header == [c for c in columns if c != "commit"]  # written before the commit column: gains it, empty
    if header != columns and not older:
        raise ConfigError(f"{csv_path}: its columns differ from this sweep's; use another output file")
    return rows, older


def check_results_file(csv_path: Path, columns: list[str]) -> None:
    """Before the first run: the results file is this sweep's (or new) and can be written, so a mistake in
    ``output`` does not surface after a run's minutes, its row lost (a research-CLI review)."""
    if csv_path.exists():
        _recorded_rows(csv_path, columns)
        if not os.access(csv_path, os.W_OK):
            raise ConfigError(f"output {csv_path}: not allowed to write it")
        return
    refuse_unwritable_folder(csv_path.parent, f"output {csv_path}")


def append_row(csv_path: Path, row: dict[str, Any], columns: list[str]) -> None:
    """Append one row (header first if the file is new); a changed column set is an error. A row
    for a run id already in the file as failed (``--retry-failed``) replaces that row."""
    new = not csv_path.exists()
    if not new:
        rows, older = _recorded_rows(csv_path, columns)
        header = rows[0] if rows else []
        kept = [r for r in rows[1:] if not (r and r[0] == row["run-id"])]
        if older:
            header, kept = columns, [[*r, ""] for r in kept]
        if older or len(kept) < len(rows) - 1:  # the retried run's failed row(s): rewrite without them, atomically
            buf = io.StringIO(newline="")
            csv.writer(buf).writerows([header, *kept])
            atomic_write_text(csv_path, buf.getvalue())
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow({c: row.get(c, "") for c in columns})


def columns_of(spec: Mapping[str, Any]) -> list[str]:
    config_keys = sorted({*spec["fixed"], *spec["grid"], "seed", "num-partners"})
    # commit: the code a row was measured with (each run directory's provenance.json has it too, but the
    # run directories are not kept with the committed CSVs); "+dirty" with uncommitted changes to tracked files
    return [*RUN_COLUMNS[:2], *config_keys, *METRICS, *RUN_COLUMNS[2:]]


def commit_label() -> str:
    """This checkout's commit for the CSV's ``commit`` column ('' outside a git checkout)."""
    version = code_version()
    return f"{version['commit'][:12]}{'+dirty' if version.get('dirty') else ''}" if version.get("commit") else ""


def stopped_run_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a stopped sweep's run left, else None: its directory has one only after a round ended,
    and a run that ended (every planned round logged, its summary written) is finished, not stopped (a CSV
    moved away to measure the code at hand "resumed" every finished run: no round left, old numbers, new
    commit; a researcher review)."""
    from server.checkpoint import CHECKPOINT_NAME  # (torch: imported when a sweep runs, not for --table)
    from server.run_status import run_status

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        return path if run_status(run_dir)["status"] == "incomplete" else None
    except (FedRecError, ValueError, OSError):  # damaged files: its resume says what is wrong, in its row
        return path


def set_aside(runs_dir: Path, name: str, label: str = "failed") -> Path:
    """Rename a run's directory (and its log) to the first free ``<name>-<label>[-N]``, so the run can start
    again from round 1 under its own name while what it left stays readable; returns the new directory."""
    stem = f"{name}-{label}"
    n, aside = 1, runs_dir / stem
    while aside.exists() or aside.with_suffix(".log").exists():
        n += 1
        aside = runs_dir / f"{stem}-{n}"
    (runs_dir / name).rename(aside)
    if (log := runs_dir / f"{name}.log").exists():
        log.rename(runs_dir / f"{aside.name}.log")
    return aside


def execute(run: Mapping[str, Any], spec: Mapping[str, Any], rid: str,
            on_round: Callable[[int], None] | None = None, from_round_one: bool = False) -> dict[str, Any]:
    """Run one simulation in a subprocess; returns its CSV row (``status`` ok or the failure). A run a stopped
    sweep left with a checkpoint continues from it, unless ``from_round_one`` (``--restart-failed``), which
    sets that directory aside first."""
    runs_dir = spec["runs-dir"]
    runs_dir.mkdir(parents=True, exist_ok=True)
    name = run_name(spec, rid)
    overrides = run_config(run, spec, rid)
    resuming = stopped_run_checkpoint(runs_dir / name) is not None
    if resuming and from_round_one:
        set_aside(runs_dir, name, "failed")
        resuming = False
    elif not resuming and (runs_dir / name).exists():
        # a run that ended but is in no CSV (the CSV was moved away), or one stopped before its first round
        # ended: it starts afresh under its own name (it went on as <name>-2, its log after the old one's)
        set_aside(runs_dir, name, "earlier")
    if resuming:  # a stopped sweep left this run part-done: continue it (its ledgers, its rounds) in its directory
        overrides["resume"] = True
    cmd = [sys.executable, "-m", "simulations.run", "--num-partners", str(int(run["num-partners"]))]
    for key, value in overrides.items():
        cmd += ["--run-config", _config_arg(key, value)]
    log_path = runs_dir / f"{name}.log"
    start = time.perf_counter()
    run_dir, last_error = None, ""
    with open(log_path, "a" if resuming else "w") as log:  # a resumed run's log goes on after its first part
        # One math thread per process: Ray runs one client per core, and on a shared machine a second
        # OpenMP thread per process spins against the others (measured 60x slower MF steps).
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        timed_out = threading.Event()
        proc: subprocess.Popen | None = None
        timer: threading.Timer | None = None

        def expire() -> None:  # a timer, not a check per output line: a silent hang is stopped too
            timed_out.set()
            stop_run(proc)

        try:
            # A stop while the run starts waits until proc is known: between the child's start and the
            # try, a SIGTERM ended the sweep alone and left the simulation running (a loaded test run)
            with signals_deferred():
                proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env, start_new_session=True)  # its own group: Ray stops with it
                timer = threading.Timer(spec["timeout"], expire)
                timer.daemon = True
                timer.start()
            for line in proc.stdout:
                log.write(line)
                if (m := ROUND_LINE.search(line)) and on_round:
                    on_round(int(m.group(1)))
                if line.startswith("run directory: "):
                    run_dir = Path(line.split(": ", 1)[1].strip())
                if ERROR_LINE.match(line) or "ERROR" in line:
                    last_error = line.strip()[-300:]
            proc.wait()
        except KeyboardInterrupt:
            if proc is not None:
                stop_run(proc)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if timed_out.is_set():
            last_error = f"timed out after {spec['timeout']:.0f} s"
    row: dict[str, Any] = {**run, "run-id": rid, "seconds": round(time.perf_counter() - start, 1)}
    # (exit 3: the run ended but no round aggregated an update; its spend is still read below, a review)
    if run_dir is None or proc.returncode not in (0, NOTHING_AGGREGATED) or not (run_dir / "metrics.jsonl").exists():
        row["status"] = f"failed (exit {proc.returncode}): {last_error or 'see ' + str(log_path)}"
        return row
    lines = metrics_lines(run_dir / "metrics.jsonl")
    last = lines[-1] if lines else {}
    row.update({k: last.get(k) for k in METRICS})
    # rounds: those that aggregated an update (a resumed DP run can lose its last round to the budget the
    # interrupted round spent: "ok" with rounds 3 hid that the model had 2 rounds of training; a review)
    aggregated = sum(x.get("num-partners") is not None for x in lines)
    row.update({"status": "ok", "rounds": aggregated, "run-dir": str(run_dir)})
    # The run's stated guarantee (privacy.json, as the audit reads it): the last metrics line has
    # local DP only, so a central-DP run read as epsilon 0. target-epsilon = "inf" only drops the local
    # budget: a central-DP run keeps the coordinator's epsilon (it read "inf", i.e. no DP)
    try:
        saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() \
            else run_overrides(run)
        claim = claimed_privacy(run_dir, saved)
    except (ValueError, FedRecError) as exc:  # one run's damaged files fail that row, not the sweep
        row["status"] = f"failed: unreadable run files ({exc})"
        return row
    row["epsilon"], row["delta"] = ("inf", "") if claim["epsilon"] == math.inf else (claim["epsilon"], claim["delta"])
    if proc.returncode == NOTHING_AGGREGATED or not any(x.get("num-partners") is not None for x in lines):
        # Every round failed (e.g. every update rejected): the model is the untrained one, whose scores would be
        # averaged with the others' by anyone reading the CSV (a researcher journey); its spend stays on record
        row["status"] = f"failed: no round aggregated an update (see {log_path})"
        row.update({k: None for k in METRICS if k not in ("epsilon", "delta")})
    return row


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="sweep config (TOML), e.g. simulations/configs/privacy_utility_ml100k.toml")
    retry = parser.add_mutually_exclusive_group()
    retry.add_argument("--retry-failed", action="store_true",
                       help="run again the runs recorded as failed (one that left a checkpoint continues after its "
                            "last finished round)")
    retry.add_argument("--restart-failed", action="store_true",
                       help="run again the runs recorded as failed, each from round 1 (a directory one left is "
                            "renamed <name>-failed, its log beside it)")
    parser.add_argument("--max-runs", type=non_negative_int, default=0, help="stop after this many new runs (0 = all)")
    parser.add_argument("--check", action="store_true",
                        help="check every run's config and the results file, print the plan, and run nothing")
    parser.add_argument("--no-plots", action="store_true", help="skip the sweep's PNG plots (each run directory has its own, drawn by the ServerApp)")
    parser.add_argument("--table", metavar="METRIC", help="only print a markdown table of METRIC (e.g. ndcg@10) from the CSV")
    args = parser.parse_args(argv)
    if args.table:
        try:
            print(results_table(load_sweep(args.config, check_data=False)["output"], args.table))
        except (FedRecError, OSError, KeyError, ValueError) as exc:  # ValueError: a damaged cell (a review)
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    spec = load_sweep(args.config)
    with sigterm_stops():
        try:
            run_sweep(spec, args.retry_failed or args.restart_failed, args.max_runs, restart=args.restart_failed,
                      check_only=args.check)
            if args.check:  # a dry run a researcher can trust before hours of runs (a docs review: none existed)
                print(f"check: every run's config and {spec['output']} are fine; nothing was run")
                return 0
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as Stopped: the run in progress is already stopped
            print(f"stopped: the run in progress is not recorded; {spec['output']} keeps the finished ones "
                  "(run the command again to resume: that run continues after its last finished round, if any; "
                  "under local DP the round in progress is already on its partners' ledgers, so it may end a round "
                  "short of its plan: its rounds column counts the rounds that aggregated)", file=sys.stderr)
            return 128 + (signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT)
    if not args.no_plots and spec["output"].exists():
        from simulations.plots import plot_sweep

        try:
            plots = plot_sweep(spec["output"])
        except (ValueError, TypeError, KeyError) as exc:  # a cell or a run's files edited or damaged (a review)
            print(f"error: no plots: {spec['output']} or a run directory it names has a damaged value "
                  f"({type(exc).__name__}: {exc}); the results are kept", file=sys.stderr)
            return 2
        for path in plots:
            print(f"plot: {path}")
        if not plots:  # it drew nothing in silence (a journey review)
            print(f"no plots: no run in {spec['output']} finished with status ok")
    print(f"results: {spec['output']}")
    return 0


def run_sweep(spec: Mapping[str, Any], retry_failed: bool, max_runs: int, restart: bool = False, *,
              check_only: bool = False) -> None:
    """Every run of ``spec`` not yet in its results file (at most ``max_runs`` if set), one row each;
    ``restart``: a failed run starts again from round 1 rather than from a checkpoint it left;
    ``check_only``: print the plan and run nothing."""
    from tqdm import tqdm

    runs = list(expand(spec))
    columns = columns_of(spec)
    recorded = finished_runs(spec["output"])  # (a file with no run-id column is said to be no sweep's first)
    check_results_file(spec["output"], columns)
    failed_ids = recorded - finished_runs(spec["output"], retry_failed=True)
    done = recorded - failed_ids if retry_failed else recorded
    commit = commit_label()
    todo = [(run_id(r), r) for r in runs if run_id(r) not in done]
    failed = 0 if retry_failed else len({run_id(r) for r in runs} & failed_ids)
    print(f"{spec['name']}: {len(runs)} runs ({len(runs) // len(spec['seeds'])} cells x {len(spec['seeds'])} seeds), "
          f"{len(runs) - len(todo)} already in {spec['output']}"
          + (f" ({failed} of them failed: --retry-failed runs them again after their last finished round, "
             "--restart-failed from round 1)" if failed else "") + f", {len(todo)} to run")
    if max_runs:
        todo = todo[:max_runs]
    if check_only:
        return
    with tqdm(total=len(todo), desc="runs", unit="run", position=0) as bar:
        for rid, run in todo:
            rounds_total = int(run.get("num-server-rounds", DEFAULTS["num-server-rounds"]))
            from_round_one = restart and rid in failed_ids
            checkpoint = stopped_run_checkpoint(spec["runs-dir"] / run_name(spec, rid))
            if checkpoint is not None and from_round_one:
                bar.write(f"restarting {checkpoint.parent.name} from round 1 (the directory and log it left are "
                          f"renamed {checkpoint.parent.name}-failed, or -failed-2, ... where that is taken)")
            elif checkpoint is not None:
                bar.write(f"resuming {checkpoint.parent.name} from {checkpoint} (a stopped sweep's run; its "
                          "seconds column counts this part only)")
            with tqdm(total=rounds_total, desc=f"  {run.get('model', DEFAULTS['model'])} "
                      f"eps={run.get('target-epsilon', '-')} seed={run['seed']}", unit="round", position=1,
                      leave=False) as rounds:
                row = {**execute(run, spec, rid, on_round=lambda r: rounds.update(r - rounds.n),
                                 from_round_one=from_round_one), "commit": commit}
            with signals_deferred():  # a stop now lands after the row, not inside it
                append_row(spec["output"], row, columns)
            bar.set_postfix_str(f"last: {row['status'][:40]} ndcg@10={row.get('ndcg@10')}")
            bar.update(1)


if __name__ == "__main__":
    sys.exit(main())
