"""Sweeps: grid expansion and the no-DP cell, and a tiny real sweep that resumes where it stopped."""

from __future__ import annotations

import csv
import json
import signal

import pytest

from simulations import sweep, sweep_spec, sweep_table

TINY = """
[sweep]
output = "{out}/results.csv"
runs-dir = "{out}/runs"
seeds = [1, 2]
[fixed]
synthetic-users = 150
synthetic-items = 40
max-seq-len = 20
embedding-dim = 16
num-blocks = 1
num-server-rounds = 1
local-epochs = 1
batch-size = 8
holdout-fraction = 0.2
[grid]
model = ["mf"]
target-epsilon = ["inf"]
num-partners = [2]
"""


def write_config(tmp_path, text=TINY):
    path = tmp_path / "tiny.toml"
    path.write_text(text.format(out=tmp_path))
    return path


def test_grid_expands_to_cells_times_seeds_with_stable_ids(tmp_path):
    spec = sweep.load_sweep(write_config(tmp_path, TINY.replace('target-epsilon = ["inf"]', 'target-epsilon = [1, 8, "inf"]')))
    runs = list(sweep.expand(spec))
    assert len(runs) == 3 * 2
    assert len({sweep.run_id(r) for r in runs}) == 6
    assert sweep.run_id(runs[0]) == sweep.run_id(dict(reversed(list(runs[0].items()))))
    no_dp = sweep.run_overrides(runs[-1])
    assert no_dp["dp"] is False and "target-epsilon" not in no_dp and "num-partners" not in no_dp
    assert sweep.run_overrides(runs[0])["target-epsilon"] == 1
    # "inf" is no local DP budget: central DP stays as asked (it was dropped with dp = false)
    assert sweep.run_overrides({"target-epsilon": "inf", "dp-mode": "both"}) == {"dp-mode": "central"}
    assert sweep.run_overrides({"target-epsilon": "inf", "dp-mode": "central"}) == {"dp-mode": "central"}
    assert sweep.run_overrides({"target-epsilon": "inf"}) == {"dp": False, "dp-mode": "off"}
    # "infinity" was refused and the message said to write "inf" (a docs review)
    assert sweep.run_overrides({"target-epsilon": "Infinity"}) == {"dp": False, "dp-mode": "off"}


def test_relative_sweep_paths_are_under_the_repository_root_from_any_directory(tmp_path, monkeypatch, capsys):
    # They were under the current directory, while the runs start in the repository root: a sweep
    # started from another folder wrote a new CSV there and ran everything again
    calls = []
    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: calls.append(run) or pytest.fail("nothing to run"))
    monkeypatch.setattr(sweep, "PROJECT_ROOT", tmp_path / "repo")
    monkeypatch.setattr(sweep_spec, "PROJECT_ROOT", tmp_path / "repo")  # where the config's paths are resolved
    (tmp_path / "repo").mkdir()
    config = write_config(tmp_path, TINY.replace("{out}/results.csv", "results/r.csv").replace("{out}/runs", "runs/x"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = sweep.load_sweep(config)
    assert spec["output"] == tmp_path / "repo" / "results" / "r.csv"
    assert spec["runs-dir"] == tmp_path / "repo" / "runs" / "x"
    (tmp_path / "abs").mkdir()
    absolute = sweep.load_sweep(write_config(tmp_path / "abs"))  # an absolute path stays as written
    assert absolute["output"] == tmp_path / "abs" / "results.csv" and absolute["runs-dir"] == tmp_path / "abs" / "runs"
    columns = sweep.columns_of(spec)
    for run in sweep.expand(spec):  # both runs already recorded in the repository's results file
        sweep.append_row(spec["output"], {**run, "run-id": sweep.run_id(run), "status": "ok"}, columns)
    assert sweep.main([str(config), "--no-plots"]) == 0 and calls == []
    first = capsys.readouterr().out.splitlines()[0]
    assert f"2 already in {spec['output']}, 0 to run" in first  # the absolute results path, at the start


def test_a_rerun_says_which_recorded_runs_failed_and_that_nothing_could_be_plotted(tmp_path, monkeypatch, capsys):
    # A sweep whose runs had all failed printed "2 already in ..., 0 to run" and drew nothing in silence
    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: pytest.fail("nothing to run"))
    spec = sweep.load_sweep(config := write_config(tmp_path))
    columns = sweep.columns_of(spec)
    for run in sweep.expand(spec):
        sweep.append_row(spec["output"], {**run, "run-id": sweep.run_id(run), "status": "failed: timed out"}, columns)
    assert sweep.main([str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 already in" in out and ("(2 of them failed: --retry-failed runs them again after their last finished "
                                      "round, --restart-failed from round 1), 0 to run") in out
    assert f"no plots: no run in {spec['output']} finished with status ok" in out


def test_unknown_key_is_a_clear_error(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key 'epsilon'"):
        sweep.load_sweep(write_config(tmp_path, TINY.replace("target-epsilon", "epsilon")))



@pytest.mark.parametrize("seeds", ['["a", "b"]', "[]", "7", "[1.5]", "[true]"])
def test_seeds_that_are_not_integers_are_a_clear_error(tmp_path, seeds):
    from common.errors import ConfigError

    text = TINY.replace("seeds = [1, 2]", f"seeds = {seeds}")
    assert f"seeds = {seeds}" in text
    with pytest.raises(ConfigError, match="seeds must be a non-empty list of integers"):
        sweep.load_sweep(write_config(tmp_path, text))

@pytest.mark.parametrize("text, message", [
    (TINY.replace("[fixed]", "fixed = 3\n[fixed]"), "unknown \\[sweep\\] key 'fixed'"),
    ("sweep = 5\n", "sweep must be a \\[sweep\\] table"),
    (TINY.replace("seeds = [1, 2]", 'seeds = [1, 2]\nrun-timeout = "abc"'), "run-timeout must be a positive number"),
    (TINY + "[grids]\nmodel = [\"mf\"]\n", "unknown table or key 'grids'"),
])
def test_malformed_sweep_files_are_one_line(tmp_path, text, message):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        sweep.load_sweep(write_config(tmp_path, text))


def test_undecodable_sweep_file_and_foreign_output_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[sweep]\noutput = \"\xff\xfe\"\n")
    assert sweep.main([str(bad), "--no-plots"]) == 2
    assert "cannot read sweep config" in capsys.readouterr().err
    config = write_config(tmp_path)
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")  # someone else's CSV at the output path
    assert sweep.main([str(config), "--no-plots"]) == 2
    assert "not a sweep results file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([str(config), "--max-runs", "-1"])  # it dropped the last run instead


def test_check_prints_the_plan_and_runs_nothing(tmp_path, monkeypatch, capsys):
    # a docs review: no dry run existed, and --max-runs 0 (which looks like one) runs the whole grid
    calls = []
    monkeypatch.setattr(sweep, "execute", lambda *a, **k: calls.append(a) or {})
    config = write_config(tmp_path)
    assert sweep.main([str(config), "--check"]) == 0
    out = capsys.readouterr().out
    assert "0 already in" in out and "to run" in out and "check: every run's config and" in out
    assert calls == [] and not (tmp_path / "results.csv").exists()
    bad = write_config(tmp_path, TINY.replace("num-server-rounds = 1", 'num-server-rounds = "two"'))
    assert sweep.main([str(bad), "--check"]) == 2  # a bad value is found without running
    assert "num-server-rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_sweep_runs_records_and_resumes(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    results = tmp_path / "results.csv"

    # Execute: one real run through Flower's simulation engine, then stop
    assert sweep.main([str(config), "--max-runs", "1"]) == 0
    rows = list(csv.DictReader(open(results)))
    assert len(rows) == 1 and rows[0]["status"] == "ok", rows
    first = rows[0]
    assert 0.0 <= float(first["ndcg@10"]) <= float(first["hr@10"]) <= 1.0
    assert float(first["hr@5"]) <= float(first["hr@10"]) <= float(first["hr@20"])
    assert first["epsilon"] == "inf" and first["rounds"] == "1"
    # the code it was measured with: the sweep's checkout (the CSV outlives the run directories)
    start = json.loads((tmp_path / "runs" / f"tiny-{first['run-id']}" / "provenance.json").read_text())["starts"][0]
    assert first["commit"] and first["commit"].split("+")[0] == (start["code"]["commit"] or "")[:12]
    run_dir = tmp_path / "runs" / f"tiny-{first['run-id']}"
    assert json.loads((run_dir / "holdout.json").read_text())["user-ids"]
    assert (run_dir / "rounds.png").is_file() and (tmp_path / "results_ndcg_vs_epsilon.png").is_file()

    # The released model can be audited: members vs the held-out users of holdout.json
    from simulations import audit as audit_cli

    combined = tmp_path / "audits.json"
    assert audit_cli.main([str(run_dir), "--bootstrap", "50", "--out", str(combined)]) == 0
    (audit,) = json.loads(combined.read_text())  # the --out list: one result per run directory
    assert audit == json.loads((run_dir / "audit.json").read_text())
    assert audit["members"] > 0 and audit["non-members"] > 0 and (audit["dp"], audit["epsilon"]) == (False, None)
    for name in ("loss", "calibrated"):
        low, high = audit[f"auc-{name}-ci"]
        assert 0.0 <= low <= audit[f"auc-{name}"] <= high <= 1.0

    # Resume: only the missing seed runs (recorded here instead of simulated)
    calls = []

    def fake_execute(run, spec, rid, on_round=None, from_round_one=False):
        calls.append(run["seed"])
        return {**run, "run-id": rid, "status": "ok"}

    monkeypatch.setattr(sweep, "execute", fake_execute)
    assert sweep.main([str(config), "--no-plots"]) == 0
    assert calls == [2]
    assert sweep.main([str(config), "--no-plots"]) == 0
    assert calls == [2]  # nothing left
    rows = list(csv.DictReader(open(results)))
    assert [r["seed"] for r in rows] == ["1", "2"] and rows[0] == first


def test_results_table_averages_seeds_per_epsilon(tmp_path):
    path = tmp_path / "r.csv"
    # (commit: rows measured before the column existed have none; it is provenance, never a row of the table)
    path.write_text("run-id,status,model,seed,target-epsilon,ndcg@10,commit\n"
                    "a,ok,mf,1,8,0.1,\nb,ok,mf,2,8,0.3,abc\nc,ok,mf,1,inf,0.5,abc\n"
                    "d,failed (exit 1): x,mf,2,inf,,\ne,ok,sasrec,1,1,0.2,\n")
    table = sweep_table.results_table(path).splitlines()
    assert table[0] == "| model | eps=1 | eps=8 | eps=inf |"
    assert table[2] == "| mf | - | 0.2000 ± 0.1414 (n=2) | 0.5000 (n=1) |"  # sample std: sqrt(0.02 / 1)
    assert table[3].startswith("| sasrec | 0.2000 (n=1) | - |")


def test_results_table_puts_a_central_dp_run_under_the_epsilon_it_states(tmp_path):
    # Under its target "inf" a central-DP run sat in the no-DP column (noted in the fifteenth session)
    path = tmp_path / "r.csv"
    path.write_text("run-id,status,dp-mode,seed,target-epsilon,epsilon,ndcg@10\n"
                    "a,ok,off,1,inf,inf,0.5\nb,ok,central,1,inf,4.7285,0.3\nc,ok,central,2,inf,4.7285,0.1\n"
                    "d,ok,local,1,8,7.9969,0.2\ne,ok,off,2,8,inf,0.7\n")  # e: dp off beside a fixed target
    table = sweep_table.results_table(path).splitlines()
    assert table[0] == "| dp-mode | eps=4.73 (central) | eps=8 | eps=inf |"
    assert table[2:] == ["| central | 0.2000 ± 0.1414 (n=2) | - | - |", "| local | - | 0.2000 (n=1) | - |",
                         "| off | - | - | 0.6000 ± 0.1414 (n=2) |"]


def test_results_table_of_an_infinite_metric_shows_no_nan_spread(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("run-id,status,model,seed,target-epsilon,epsilon\na,ok,mf,1,inf,inf\nb,ok,mf,2,inf,inf\n")
    assert sweep_table.results_table(path, metric="epsilon").splitlines()[2] == "| all | inf (n=2) |"  # (it said inf ± nan)


def test_results_table_of_a_sweep_without_epsilon_has_one_column(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("run-id,status,model,seed,ndcg@10\na,ok,mf,1,0.1\nb,ok,mf,2,0.3\nc,ok,sasrec,1,0.5\n")
    table = sweep_table.results_table(path).splitlines()
    assert table[0] == "| model | eps=(not set) |"
    assert table[2:] == ["| mf | 0.2000 ± 0.1414 (n=2) |", "| sasrec | 0.5000 (n=1) |"]


@pytest.mark.parametrize("content, problem", [
    (b"", "is empty"),
    (bytes(range(256)) * 4, "is not a sweep results CSV"),
    (b"run-id,model,ndcg@10\na,mf,0.1\n", "no 'status' column"),
    (b"run-id,status,model,seed\na,ok,mf,1\n", "no 'ndcg@10' column"),
    # a hand-edited cell was a pandas ValueError traceback (a researcher review)
    (b"run-id,status,model,seed,ndcg@10\na,ok,mf,1,0.1\nb,ok,mf,2,abc\n", "run b has ndcg@10 = 'abc', not a number"),
])
def test_table_of_a_damaged_results_csv_is_one_error_line_naming_it(tmp_path, capsys, content, problem):
    # Was: pandas EmptyDataError / UnicodeDecodeError tracebacks, or only "error: 'status'"
    config = write_config(tmp_path)
    results = tmp_path / "results.csv"
    results.write_bytes(content)
    assert sweep.main([str(config), "--table", "ndcg@10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {results}") and problem in err[0], err


def fake_python(tmp_path, monkeypatch, script: str) -> None:
    """The sweep's runs start ``sys.executable -m simulations.run``: make that a shell ``script``."""
    import sys

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))


def test_a_run_that_hangs_silently_is_stopped_at_the_timeout(tmp_path, monkeypatch):
    # A "python" that prints nothing and never ends: the old per-line check never fired
    fake_python(tmp_path, monkeypatch, "exec sleep 60\n")
    spec = sweep.load_sweep(write_config(tmp_path))
    spec["timeout"] = 1.0
    run = next(iter(sweep.expand(spec)))
    row = sweep.execute(run, spec, sweep.run_id(run))  # returns (the fake would sleep 60 s) ...
    assert row["status"].startswith("failed") and "timed out after 1 s" in row["status"]


def group_is_gone(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    # simulations.run (Flower's SIGTERM handler) may not end on SIGTERM: the sweep waited on it forever
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    fake_python(tmp_path, monkeypatch, f"echo $$ > {pid_file}\ntrap '' TERM\nexec sleep 60\n")
    monkeypatch.setattr("simulations.run_stop.STOP_GRACE_S", 0.5)
    spec = sweep.load_sweep(write_config(tmp_path))
    spec["timeout"] = 1.0
    run = next(iter(sweep.expand(spec)))
    start = time.monotonic()
    try:
        row = sweep.execute(run, spec, sweep.run_id(run))
        assert time.monotonic() - start < 30  # not the child's 60 s: it was killed, not waited for
        assert row["status"].startswith("failed") and "timed out after 1 s" in row["status"]
        assert group_is_gone(int(pid_file.read_text()))
    finally:
        if pid_file.exists() and not group_is_gone(int(pid_file.read_text())):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_sigterm_to_the_sweep_stops_its_running_simulation_too(tmp_path):
    # `kill <sweep pid>` ended the sweep alone: the simulation and its Ray processes ran on, orphaned
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    config = write_config(tmp_path)
    code = (f"import sys; sys.executable = {str(fake)!r}; from simulations.sweep import main; "
            f"sys.exit(main([{str(config)!r}, '--no-plots']))")
    sweep_proc = subprocess.Popen([sys.executable, "-c", code], cwd=sweep.PROJECT_ROOT, stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            assert sweep_proc.poll() is None, sweep_proc.stderr.read()
            time.sleep(0.1)
        child = int(pid_file.read_text())
        sweep_proc.send_signal(signal.SIGTERM)
        _, err = sweep_proc.communicate(timeout=60)
        assert group_is_gone(child)
        assert sweep_proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith("stopped: "), err
        assert not (tmp_path / "results.csv").exists()  # the stopped run is not a row: it runs again on resume
    finally:
        sweep_proc.kill()
        sweep_proc.wait()
        if pid_file.exists() and pid_file.read_text().strip() and not group_is_gone(int(pid_file.read_text())):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _finished_run(tmp_path, monkeypatch, *, lines, privacy, config, cell=None, exit_status=0):
    """A fake `python -m simulations.run` that only prints the run directory it "wrote"."""
    import sys

    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "privacy.json").write_text(json.dumps(privacy))
    (run_dir / "config.json").write_text(json.dumps(config))
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!/bin/sh\necho 'run directory: {run_dir}'\nexit {exit_status}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    spec = sweep.load_sweep(write_config(tmp_path))
    run = next(iter(sweep.expand(spec)))
    return sweep.execute({**run, **(cell or {"target-epsilon": 8.0})}, spec, sweep.run_id(run))


def test_a_central_dp_run_records_the_coordinators_epsilon(tmp_path, monkeypatch):
    # The last metrics line holds local DP only (0 under central DP); the guarantee is in privacy.json
    line = {"round": 1, "ndcg@10": 0.2, "hr@10": 0.4, "epsilon": 0.0, "delta": 0.0, "num-partners": 2.0}
    # two releases at noise multiplier 1 (partner-level 7.0774); for one user at 0.5 (sensitivity 2C): the sweep's unit
    rounds = [{"round": r, "partners": 2, "epsilon": e, "noise-multiplier": 1.0} for r, e in ((1, 4.7285), (2, 7.0774))]
    row = _finished_run(tmp_path, monkeypatch, lines=[line],
                        privacy={"central": {"epsilon": 7.0774, "delta": 1e-5, "rounds": rounds}},
                        config={"dp": True, "dp-mode": "central"})
    assert row["status"] == "ok" and row["delta"] == 1e-5 and row["ndcg@10"] == 0.2
    assert row["epsilon"] == pytest.approx(_dp_accounting_gaussian(0.5, 2), rel=1e-3)


def _dp_accounting_gaussian(sigma: float, releases: int, delta: float = 1e-5) -> float:
    """Google's dp_accounting, independent of the code under test."""
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), releases)
    return acc.get_epsilon(delta)


def test_a_run_whose_every_round_failed_is_a_failed_row(tmp_path, monkeypatch):
    failed = {"epsilon": None, "train-loss": None, "num-partners": None, "ndcg@10": 0.144}
    # simulations.run exits 3 then (twentieth session): still a finished run whose spend is read (a review)
    row = _finished_run(tmp_path, monkeypatch, lines=[{"round": 1, **failed}, {"round": 2, **failed}],
                        privacy={"partners": {"p0": {"epsilon": 7.998, "delta": 1e-5}}},
                        config={"dp": True, "dp-mode": "local"}, exit_status=3)
    assert row["status"].startswith("failed: no round aggregated an update")
    assert row["epsilon"] == 7.998  # the spend is still on record
    assert row["ndcg@10"] is None  # the untrained model's score is no result (a researcher journey)


def test_a_retried_run_replaces_its_failed_row(tmp_path):
    path, columns = tmp_path / "r.csv", ["run-id", "status", "ndcg@10"]
    sweep.append_row(path, {"run-id": "a", "status": "ok", "ndcg@10": 0.1}, columns)
    sweep.append_row(path, {"run-id": "b", "status": "failed (exit 2): no such file"}, columns)
    assert sweep.finished_runs(path, retry_failed=True) == {"a"}
    sweep.append_row(path, {"run-id": "b", "status": "ok", "ndcg@10": 0.3}, columns)
    rows = list(csv.DictReader(open(path)))
    assert [(r["run-id"], r["status"], r["ndcg@10"]) for r in rows] == [("a", "ok", "0.1"), ("b", "ok", "0.3")]


def test_a_results_file_from_before_the_commit_column_gains_it(tmp_path, monkeypatch):
    from common.errors import ConfigError

    # Rows measured before the column existed keep an empty commit; resuming such a sweep was no error
    path, columns = tmp_path / "r.csv", ["run-id", "status", "ndcg@10", "commit"]
    path.write_text("run-id,status,ndcg@10\na,ok,0.1\n")
    sweep.append_row(path, {"run-id": "b", "status": "ok", "ndcg@10": 0.3, "commit": "abc123"}, columns)
    assert path.read_text().splitlines() == ["run-id,status,ndcg@10,commit", "a,ok,0.1,", "b,ok,0.3,abc123"]
    path.write_text("run-id,status,hr@10\na,ok,0.1\n")  # another sweep's file is still refused
    with pytest.raises(ConfigError, match="its columns differ from this sweep"):
        sweep.append_row(path, {"run-id": "b", "status": "ok"}, columns)
    monkeypatch.setattr(sweep, "code_version", lambda: {"commit": "0123456789abcdef", "dirty": True})
    assert sweep.commit_label() == "0123456789ab+dirty"
    monkeypatch.setattr(sweep, "code_version", lambda: {"commit": None})
    assert sweep.commit_label() == ""


def test_the_rounds_plot_leaves_out_rounds_without_evaluation(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from simulations.plots import plot_sweep

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "ndcg@10": None}) + "\n"
                                           + json.dumps({"round": 2, "ndcg@10": 0.15}) + "\n")
    path = tmp_path / "r.csv"
    path.write_text(f"run-id,status,model,seed,target-epsilon,ndcg@10,run-dir\na,ok,mf,1,8,0.15,{run_dir}\n")
    drawn = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: drawn.append([list(map(float, x)) for x in a[:2]])
                        or real_plot(self, *a, **k))
    plot_sweep(path)
    assert [[2.0], [0.15]] in drawn and not any(0.0 in ys for _, ys in (d for d in drawn if len(d) == 2))


def test_the_plots_do_not_split_seeds_by_commit(tmp_path, monkeypatch):
    # A review: a resumed sweep's rows (with a commit) and its older rows (without) drew two lines,
    # "commit=nan" and "commit=95e52f1cddf9", for one configuration
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from simulations import plots

    path = tmp_path / "r.csv"
    path.write_text("run-id,status,model,seed,target-epsilon,ndcg@10,run-dir,commit\n"
                    f"a,ok,mf,1,8,0.1,{tmp_path},\nb,ok,mf,2,8,0.3,{tmp_path},95e52f1cddf9\n"
                    f"c,ok,sasrec,1,8,0.2,{tmp_path},95e52f1cddf9\n")
    labels = []
    real = Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: labels.append(k.get("label")) or real(self, *a, **k))
    plots.plot_sweep(path)
    assert sorted(labels) == ["model=mf", "model=sasrec"]


def test_a_run_with_damaged_files_fails_its_row_not_the_sweep(tmp_path, monkeypatch):
    line = {"round": 1, "ndcg@10": 0.2, "epsilon": 7.0, "delta": 1e-5, "num-partners": 2.0}
    row = _finished_run(tmp_path, monkeypatch, lines=[line], privacy={}, config={"dp": True, "dp-mode": "local"})
    assert row["status"] == "ok"
    (tmp_path / "done" / "privacy.json").write_text("{cut sho")
    spec = sweep.load_sweep(write_config(tmp_path))
    run = next(iter(sweep.expand(spec)))
    row = sweep.execute({**run, "target-epsilon": 8.0}, spec, sweep.run_id(run))
    assert row["status"].startswith("failed: unreadable run files") and "privacy.json" in row["status"]


@pytest.mark.parametrize("text, message", [
    (TINY.replace('model = ["mf"]', 'model = ["mf"]\nseed = [1, 2, 3]'), r"\[grid\] seed would be replaced .*\[sweep\] as seeds"),
    (TINY.replace("[fixed]", "[fixed]\nseed = 7"), r"\[fixed\] seed would be replaced"),
    (TINY.replace("[fixed]", '[fixed]\nrun-dir = "elsewhere"'), r"run-dir is set by the sweep .*remove run-dir from \[fixed\]"),
    (TINY.replace("[fixed]", '[fixed]\nrun-name = "mine"'), r"run-name is set by the sweep"),
    (TINY.replace('model = ["mf"]', 'model = ["mf"]\nrun-name = ["a", "b"]'), r"remove run-name from \[grid\]"),
    # [fixed]'s value was dropped in silence (a research-CLI review)
    (TINY.replace("[fixed]", '[fixed]\nmodel = "sasrec"'), r"model is in both \[fixed\] and \[grid\]"),
])
def test_keys_the_sweep_overwrites_are_refused(tmp_path, text, message):
    # They were overwritten in every run: a [grid] seed gave identical runs under one run id
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        sweep.load_sweep(write_config(tmp_path, text))


def test_a_fixed_seed_without_sweep_seeds_is_the_one_seed(tmp_path):
    spec = sweep.load_sweep(write_config(tmp_path, TINY.replace("seeds = [1, 2]\n", "").replace("[fixed]", "[fixed]\nseed = 7")))
    assert [r["seed"] for r in sweep.expand(spec)] == [7]


def test_a_value_of_the_wrong_type_is_one_line_before_any_run(tmp_path, monkeypatch, capsys):
    # It was a ValueError traceback from the progress bar's int(num-server-rounds)
    calls = []
    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: calls.append(run))
    config = write_config(tmp_path, TINY.replace("num-server-rounds = 1", 'num-server-rounds = "two"'))
    assert sweep.main([str(config), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {config}: num-server-rounds = 'two' is not a valid int"] and calls == []


@pytest.mark.parametrize("line, message", [
    ('learning-rate = [0.01, -1]', "learning-rate = -1.0 must be a positive number"),  # the second cell only
    ('num-partners = [2, 0]', "num-partners = 0 must be a whole number of partners"),
    ('history-windows = [true]', "history-windows = true needs dp = false"),  # model=mf with target-epsilon 8
    ('dp-mode = ["centrall"]', "dp-mode = 'centrall' is unknown"),
])
def test_every_cell_is_checked_as_the_run_would_check_it(tmp_path, line, message):
    from common.errors import ConfigError

    text = TINY.replace('target-epsilon = ["inf"]', "target-epsilon = [8]").replace("num-partners = [2]\n", "")
    with pytest.raises(ConfigError, match=message):
        sweep.load_sweep(write_config(tmp_path, f"{text}{line}\n"))


def test_a_failed_runs_row_gives_the_runners_argparse_error(tmp_path, monkeypatch):
    # simulations.run's own argument errors are argparse's "run.py: error: ..."; the row said only "see <log>"
    fake_python(tmp_path, monkeypatch, "echo 'usage: run.py [-h]'\necho 'run.py: error: argument --num-gpus: bad' >&2\nexit 2\n")
    spec = sweep.load_sweep(write_config(tmp_path))
    run = next(iter(sweep.expand(spec)))
    row = sweep.execute(run, spec, sweep.run_id(run))
    assert row["status"] == "failed (exit 2): run.py: error: argument --num-gpus: bad"


@pytest.mark.parametrize("mode", ["central", "both"])
def test_a_central_dp_run_without_a_local_budget_records_the_coordinators_epsilon(tmp_path, monkeypatch, mode):
    # target-epsilon = "inf" drops local DP only; the row said epsilon inf (no DP) beside a finite guarantee
    line = {"round": 1, "ndcg@10": 0.2, "epsilon": 0.0, "delta": 0.0, "num-partners": 2.0}
    central = {"epsilon": 4.729, "delta": 1e-5, "rounds": [{"round": 1, "epsilon": 4.729, "noise-multiplier": 1.0}]}
    row = _finished_run(tmp_path, monkeypatch, lines=[line], privacy={"central": central},
                        config={"dp": True, "dp-mode": "central"}, cell={"target-epsilon": "inf", "dp-mode": mode})
    assert row["status"] == "ok" and row["delta"] == 1e-5
    assert row["epsilon"] == pytest.approx(_dp_accounting_gaussian(0.5, 1), rel=1e-3)  # for one user (10.73)


def test_a_run_without_any_dp_records_epsilon_inf(tmp_path, monkeypatch):
    line = {"round": 1, "ndcg@10": 0.2, "epsilon": None, "num-partners": 2.0}
    row = _finished_run(tmp_path, monkeypatch, lines=[line], privacy={}, config={"dp": False, "dp-mode": "off"},
                        cell={"target-epsilon": "inf"})
    assert row["status"] == "ok" and (row["epsilon"], row["delta"]) == ("inf", "")


def test_the_epsilon_plot_draws_central_dp_at_its_stated_epsilon_not_at_no_dp(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from simulations.plots import plot_sweep

    path = tmp_path / "r.csv"
    path.write_text("run-id,status,dp-mode,seed,target-epsilon,epsilon,ndcg@10,run-dir\n"
                    f"a,ok,central,1,inf,4.729,0.1,{tmp_path}\nb,ok,off,1,inf,inf,0.3,{tmp_path}\n"
                    f"c,ok,local,1,8,7.998,0.05,{tmp_path}\n"
                    # a central-DP run beside a [fixed] target-epsilon it never had (a review): at its stated 2.3
                    f"d,ok,central,1,8,2.3,0.2,{tmp_path}\n")
    ticks, points = [], []
    real_ticks, real_scatter = Axes.set_xticks, Axes.scatter
    monkeypatch.setattr(Axes, "set_xticks", lambda self, t, labels=None, **k: ticks.append(list(labels))
                        or real_ticks(self, t, labels, **k))
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, **k: points.extend(zip(map(float, x), map(float, y)))
                        or real_scatter(self, x, y, **k))
    plot_sweep(path)
    assert ticks == [["2.3", "4.729", "8", "no DP"]]
    assert sorted(points) == [(2.3, 0.2), (4.729, 0.1), (8.0, 0.05), (16.0, 0.3)]  # no DP at twice the largest finite


@pytest.mark.parametrize("fixed, grid, message", [
    ('dp-mode = "central"', "target-epsilon = [1, 8]", r"\[grid\] target-epsilon varies, .*dp-mode central or off"),
    ('dp-mode = "central"', 'target-epsilon = [8, "inf"]', "target-epsilon varies"),
    ("dp = false", "target-epsilon = [1, 8]", "target-epsilon varies"),
    ("", 'target-epsilon = [8]\ndp-mode = ["local", "central"]', None),  # no budget to compare: allowed
    ("", 'target-epsilon = [1, 8]\ndp-mode = ["local", "off"]', "target-epsilon varies"),
    ("", 'target-epsilon = [1, 8, "inf"]\ndp-mode = ["local", "both"]', None),  # every run has DP-SGD (or "inf" drops it)
    ('dp-mode = "central"', "target-delta = [1e-5, 1e-6]", None),  # central DP accounts at target-delta
    ("", 'target-epsilon = [8, "inf"]\ntarget-delta = [1e-5, 1e-6]', r"target-delta varies, .*DP at all"),
    ("", 'central-noise-multiplier = [0.5, 2.0]\ndp-mode = ["local", "central"]', r"central-noise-multiplier varies"),
    ('dp-mode = "both"', "central-noise-multiplier = [0.5, 2.0]", None),
])
def test_a_grid_over_a_budget_some_runs_ignore_is_refused(tmp_path, fixed, grid, message):
    # dp-mode central ignores target-epsilon: its cells were one run each time over, plotted at x = the target
    from common.errors import ConfigError

    text = TINY.replace("[fixed]", f"[fixed]\n{fixed}").replace('target-epsilon = ["inf"]', grid)
    if message is None:
        assert sweep.load_sweep(write_config(tmp_path, text))["grid"]
    else:
        with pytest.raises(ConfigError, match=message):
            sweep.load_sweep(write_config(tmp_path, text))


def test_plots_skip_a_metrics_line_cut_short_by_a_crash(tmp_path, capsys):
    from simulations.plots import plot_run, plot_sweep

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "ndcg@10": 0.1, "partner-ndcg@10": [0.1, 0.2]})
                                           + '\n{"round": 2, "ndcg@1')  # JSONDecodeError stopped the whole sweep
    path = tmp_path / "r.csv"
    path.write_text(f"run-id,status,model,seed,target-epsilon,ndcg@10,run-dir\na,ok,mf,1,8,0.1,{run_dir}\n")
    assert plot_run(run_dir) == [run_dir / "rounds.png", run_dir / "partners.png"]
    assert [p.name for p in plot_sweep(path)] == ["r_ndcg_vs_epsilon.png", "r_rounds.png", "r_partners.png"]
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().err


def _timed_out_run(path):
    """A sweep's run directory after its run-timeout: config.json only (model.pt comes at the end)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model": "mf"}))
    return path


def test_the_audit_of_an_unfinished_run_says_so(tmp_path, capsys):
    # It blamed the holdout: "no model.pt (run with holdout-fraction > 0 ...)"
    from simulations import audit

    run_dir = _timed_out_run(tmp_path / "run")
    assert audit.main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_dir}: run not finished (no model.pt)"]


def test_the_audit_of_a_sweeps_run_directories_skips_the_unusable_ones(tmp_path, monkeypatch, capsys):
    # runs-dir/*/ stopped at the first timed-out run, with no --out file
    from simulations import audit

    result = {"run": "good", "model": "mf", "dp": False, "epsilon": None, "delta": None, "members": 3, "non-members": 2,
              **{f"auc-{n}": 0.5 for n in ("loss", "calibrated", "control-loss", "control-calibrated")},
              **{f"auc-{n}-ci": [0.4, 0.6] for n in ("loss", "calibrated")},
              **{f"tpr-{n}": [{"fpr-target": 0.01, "fpr": 0.0, "tpr": 0.0}] for n in ("loss", "calibrated")},
              **{f"epsilon-lower-bound-{n}": {"epsilon-lower-bound": 0.0} for n in ("loss", "calibrated")}}
    real_audit = audit.run_audit
    monkeypatch.setattr(audit, "run_audit", lambda d, **k: dict(result) if d.name == "good" else real_audit(d, **k))
    late, good, empty = _timed_out_run(tmp_path / "late"), tmp_path / "good", tmp_path / "empty"
    good.mkdir()
    empty.mkdir()
    out = tmp_path / "audits.json"
    assert audit.main([str(late), str(good), str(empty), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [f"warning: skipped {late}: run not finished (no model.pt)",
                                                  f"warning: skipped {empty}: no config.json (run with holdout-fraction "
                                                  "> 0 through simulations.run/sweep)"]
    assert captured.out.startswith("good: model mf") and json.loads(out.read_text()) == [result]
    assert captured.out.count("good: model mf") == 1  # its header line was printed twice
    # An existing --out is not replaced by the runs left after skips: it lost a whole table (a research-CLI review)
    assert audit.main([str(late), str(good), "--out", str(out)]) == 2
    assert "exists and was not replaced: 1 of the 2 run directories were skipped" in capsys.readouterr().err
    assert json.loads(out.read_text()) == [result]
    out.unlink()
    assert audit.main([str(late), str(empty), "--out", str(out)]) == 2  # none left: an error, no --out
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1] == "error: none of the 2 run directories could be audited (see the warnings above)"
    assert not out.exists()


def test_a_signal_during_a_deferred_block_waits_for_its_end_even_with_other_threads():
    # A review: a blocked signal went to another thread (numpy's, tqdm's, the run timer) and Python ran the
    # handler in the main thread inside the block, so a second Ctrl-C cut a run's stop short
    import os
    import threading
    import time

    started = threading.Event()
    other = threading.Thread(target=lambda: (started.set(), time.sleep(2)), daemon=True)
    other.start()  # a thread whose signal mask was set before the block
    started.wait()
    finished = False
    with pytest.raises(KeyboardInterrupt):
        with sweep.signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)  # the handler would run here without the deferral
            finished = True
    assert finished


def _pid_gone(pid: int, wait_s: float = 5.0) -> bool:
    import os
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_stop_kills_what_the_run_left_in_its_group_and_is_not_cut_short(tmp_path, monkeypatch):
    # Mutation audit: SIGKILL only after a timeout left a Ray-like grandchild alive after a clean exit;
    # stop_run without signal deferral let a second Ctrl-C skip the SIGKILL
    import os
    import subprocess
    import threading

    from simulations import run_stop

    monkeypatch.setattr(run_stop, "STOP_GRACE_S", 1.0)
    pid_file = tmp_path / "grandchild.pid"
    script = f"sh -c \"trap '' TERM; exec sleep 60\" & echo $! > {pid_file}; trap 'exit 0' TERM; while true; do sleep 0.1; done"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    while not pid_file.exists() or not pid_file.read_text().strip():
        pass
    import time

    time.sleep(0.2)  # the traps are set
    run_stop.stop_run(proc)  # the child exits on SIGTERM at once; the grandchild ignores it
    assert _pid_gone(int(pid_file.read_text()))

    ready = tmp_path / "ready"
    stubborn = subprocess.Popen(["sh", "-c", f"trap '' TERM; echo 1 > {ready}; exec sleep 60"], start_new_session=True)
    while not ready.exists():  # SIGTERM before the trap would end it at once
        pass
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # a second Ctrl-C mid-stop
    with pytest.raises(KeyboardInterrupt):
        run_stop.stop_run(stubborn)
    assert _pid_gone(stubborn.pid)


def test_sigterm_stops_restores_the_previous_handler():
    from simulations import run_stop

    before = signal.getsignal(signal.SIGTERM)
    with run_stop.sigterm_stops():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_sweep_that_does_not_vary_the_target_still_plots_ndcg_against_epsilon(tmp_path):
    # A researcher journey: with target-epsilon left at its default, the epsilon plot was skipped in silence
    from simulations.plots import plot_sweep

    path = tmp_path / "r.csv"
    path.write_text("run-id,status,dp-mode,batch-size,ndcg@10,epsilon,run-dir\n"
                    "a,ok,local,8,0.1,7.9999,\nb,ok,central,8,0.2,16.513,\n")
    assert "r_ndcg_vs_epsilon.png" in [p.name for p in plot_sweep(path)]


def test_a_stop_while_a_run_starts_stops_that_run_too(tmp_path, monkeypatch):
    # A SIGTERM between the child's start and the try that stops it ended the sweep alone, and the
    # simulation ran on (a loaded test run hit it); the stop now waits until the run is known
    import os
    import subprocess
    import sys
    import threading

    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    started = []
    real_popen, real_start = subprocess.Popen, threading.Timer.start
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])

    def start_then_sigterm(timer):
        real_start(timer)
        os.kill(os.getpid(), signal.SIGTERM)  # the user's `kill <sweep pid>`, at the worst moment

    monkeypatch.setattr(threading.Timer, "start", start_then_sigterm)
    spec = sweep.load_sweep(write_config(tmp_path))
    run = next(iter(sweep.expand(spec)))
    try:
        with sweep.sigterm_stops(), pytest.raises(sweep.Stopped):
            sweep.execute(run, spec, sweep.run_id(run))
        assert len(started) == 1 and started[0].poll() is not None and group_is_gone(started[0].pid)
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_partner_plot_names_the_partners_a_sampled_round_evaluated():
    # A researcher journey: with fraction-evaluate < 1 the bars sat at 0..k-1 under "partition id"
    from flwr.app import MetricRecord

    from common.evaluation import combine_partner_metrics
    from server.run_plots import partner_bars

    records = [{"num-users": 2.0, "ndcg@10-sum": 0.5, "partition-id": 31},
               {"num-users": 4.0, "ndcg@10-sum": 0.4, "partition-id": 7}]
    line = combine_partner_metrics(records, num_items=10)
    assert line["partner-ndcg@10"] == [0.1, 0.25] and line["partner-ndcg@10-ids"] == [7, 31]
    assert partner_bars(line) == ([0.1, 0.25], ["7", "31"], "partner (partition id; 2 evaluated)")
    real = combine_partner_metrics([{"num-users": 2.0, "ndcg@10-sum": 0.5}], num_items=10)  # no partition id: -1
    assert real["partner-ndcg@10-ids"] == [-1]
    MetricRecord(real)  # what the ServerApp logs it in: no null in a list
    assert partner_bars(real) == ([0.25], ["1"], "partner (in partition order; 1 evaluated)")
    many = {"partner-ndcg@10": [0.1] * 30, "partner-ndcg@10-ids": list(range(30))}
    assert partner_bars(many)[1] == []  # no 30 overlapping labels


def test_a_stopped_run_with_a_checkpoint_is_resumed_in_its_own_directory(tmp_path, monkeypatch):
    # A sweep stopped mid-run left runs/<name>/checkpoint.pt; the rerun started that run afresh as <name>-2
    args = tmp_path / "args.txt"
    fake_python(tmp_path, monkeypatch, f'for a in "$@"; do echo "$a" >> {args}; done\necho second part\n')
    spec = sweep.load_sweep(write_config(tmp_path))
    run = next(iter(sweep.expand(spec)))
    rid = sweep.run_id(run)
    name = sweep.run_name(spec, rid)

    sweep.execute(run, spec, rid)  # nothing left behind: a fresh run
    assert "resume=true" not in args.read_text().splitlines()
    args.unlink()

    (spec["runs-dir"] / name).mkdir(parents=True)
    (spec["runs-dir"] / name / "checkpoint.pt").write_bytes(b"round 1")
    (spec["runs-dir"] / f"{name}.log").write_text("first part\n")
    sweep.execute(run, spec, rid)
    given = args.read_text().splitlines()
    assert "resume=true" in given and f'run-name="{name}"' in given
    assert (spec["runs-dir"] / f"{name}.log").read_text() == "first part\nsecond part\n"  # its log goes on


def test_restart_failed_starts_a_failed_run_from_round_one_and_keeps_what_it_left(tmp_path, monkeypatch):
    # --retry-failed continued a failed run from its checkpoint, so a run that failed the same way each time
    # (a bad round, a bug since fixed) could only start afresh once its directory was deleted by hand
    args = tmp_path / "args.txt"
    fake_python(tmp_path, monkeypatch, f'for a in "$@"; do echo "$a" >> {args}; done\necho new part\n')
    spec = sweep.load_sweep(write_config(tmp_path))
    first, second = list(sweep.expand(spec))
    columns = sweep.columns_of(spec)
    for run in (first, second):  # both left a checkpoint; only the first is recorded, as failed
        name = sweep.run_name(spec, sweep.run_id(run))
        (spec["runs-dir"] / name).mkdir(parents=True)
        (spec["runs-dir"] / name / "checkpoint.pt").write_bytes(b"round 2")
        (spec["runs-dir"] / f"{name}.log").write_text("old part\n")
    sweep.append_row(spec["output"], {**first, "run-id": sweep.run_id(first), "status": "failed (exit 1): x"}, columns)
    (spec["runs-dir"] / f"{sweep.run_name(spec, sweep.run_id(first))}-failed").mkdir()  # an earlier restart's

    assert sweep.main([str(spec["output"].parent / "tiny.toml"), "--restart-failed", "--no-plots"]) == 0
    given = args.read_text().split("--num-partners")[1:]  # one command per run, in sweep order
    name = sweep.run_name(spec, sweep.run_id(first))
    assert "resume=true" not in given[0] and f'run-name="{name}"' in given[0]  # from round 1, under its own name
    assert "resume=true" in given[1]  # a stopped run nobody recorded as failed still continues
    aside = spec["runs-dir"] / f"{name}-failed-2"  # -failed was taken
    assert (aside / "checkpoint.pt").read_bytes() == b"round 2"
    assert (spec["runs-dir"] / f"{name}-failed-2.log").read_text() == "old part\n"
    assert (spec["runs-dir"] / f"{name}.log").read_text() == "new part\n"
    with pytest.raises(SystemExit):  # one or the other
        sweep.main([str(spec["output"].parent / "tiny.toml"), "--restart-failed", "--retry-failed"])


def test_rounds_counts_the_rounds_that_aggregated(tmp_path, monkeypatch):
    # A DP run resumed after a stop can lose its last round to the budget the interrupted round spent:
    # its row said ok with rounds 3 while round 3 aggregated nothing (a researcher review)
    ok = {"epsilon": 3.9, "train-loss": 1.0, "num-partners": 2.0, "ndcg@10": 0.2}
    refused = {**ok, "num-partners": None, "train-loss": None}
    row = _finished_run(tmp_path, monkeypatch, lines=[{"round": 1, **ok}, {"round": 2, **ok}, {"round": 3, **refused}],
                        privacy={"partners": {"p0": {"epsilon": 3.997, "delta": 1e-5}}},
                        config={"dp": True, "dp-mode": "local"})
    assert row["status"] == "ok" and row["rounds"] == 2


def _ended_run(run_dir, rounds: int = 2, logged: int = 2) -> None:
    """A run directory as the ServerApp leaves it: config, ``logged`` of ``rounds`` rounds, checkpoint, and
    the summary and model it writes when the run ends."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"num-server-rounds": rounds}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "num-partners": 2}) + "\n"
                                                   for r in range(1, logged + 1)))
    (run_dir / "checkpoint.pt").write_bytes(b"round %d" % logged)
    if logged == rounds:
        (run_dir / "summary.md").write_text("done\n")
        (run_dir / "model.pt").write_bytes(b"model")


def test_a_finished_or_never_started_run_outside_the_csv_starts_afresh(tmp_path, monkeypatch):
    # The docs say to move the CSV away to measure the code at hand: every finished run was then "resumed"
    # (no round left, the old numbers under the new commit); a run stopped in its first round left a
    # directory, so the rerun trained as <name>-2 with its log after the old one's (a researcher review)
    args = tmp_path / "args.txt"
    fake_python(tmp_path, monkeypatch, f'for a in "$@"; do echo "$a" >> {args}; done\necho new part\n')
    spec = sweep.load_sweep(write_config(tmp_path))
    first, second = list(sweep.expand(spec))
    names = [sweep.run_name(spec, sweep.run_id(r)) for r in (first, second)]
    _ended_run(spec["runs-dir"] / names[0])
    (spec["runs-dir"] / names[1]).mkdir()  # stopped before its first round ended: no checkpoint
    (spec["runs-dir"] / names[1] / "config.json").write_text("{}")
    for name in names:
        (spec["runs-dir"] / f"{name}.log").write_text("old part\n")
    assert sweep.stopped_run_checkpoint(spec["runs-dir"] / names[0]) is None  # finished, not stopped

    for run in (first, second):
        sweep.execute(run, spec, sweep.run_id(run))
    given = args.read_text()
    assert "resume=true" not in given and all(f'run-name="{n}"' in given for n in names)
    assert (spec["runs-dir"] / f"{names[0]}-earlier" / "summary.md").is_file()  # what it left stays readable
    assert (spec["runs-dir"] / f"{names[1]}-earlier" / "config.json").is_file()
    for name in names:
        assert (spec["runs-dir"] / f"{name}.log").read_text() == "new part\n"
        assert (spec["runs-dir"] / f"{name}-earlier.log").read_text() == "old part\n"
    _ended_run(tmp_path / "stopped", rounds=3, logged=2)  # a round left: that one is resumed
    assert sweep.stopped_run_checkpoint(tmp_path / "stopped") == tmp_path / "stopped" / "checkpoint.pt"


@pytest.mark.parametrize("change", [("seeds = [1, 2]", "seeds = [1, 1]"),
                                    ('target-epsilon = ["inf"]', "target-epsilon = [8, 8.0]")])
def test_a_run_listed_twice_is_refused(tmp_path, change):
    # It was two rows under two run ids, the second "resuming" the first's finished run (a researcher review)
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="the run at seed 1 is listed twice"):
        sweep.load_sweep(write_config(tmp_path, TINY.replace(*change)), check_data=False)


def test_a_results_file_that_is_not_this_sweeps_is_refused_before_the_first_run(tmp_path, monkeypatch, capsys):
    # Another sweep's CSV, or a folder that cannot be made, failed only when the first run's row was written,
    # after its minutes and losing it (a research-CLI review)
    from common.errors import ConfigError

    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: pytest.fail("nothing may run"))
    spec = sweep.load_sweep(config := write_config(tmp_path))
    spec["output"].write_text("run-id,status,hr@10\na,ok,0.1\n")
    assert sweep.main([str(config), "--no-plots"]) == 2
    assert "its columns differ from this sweep's" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write in"):
        sweep.check_results_file(blocker / "r.csv", sweep.columns_of(spec))


def test_a_damaged_results_cell_is_one_line_for_the_plots_and_the_table(tmp_path, monkeypatch, capsys):
    spec = sweep.load_sweep(config := write_config(tmp_path))
    columns = sweep.columns_of(spec)
    for run in sweep.expand(spec):
        sweep.append_row(spec["output"], {**run, "run-id": sweep.run_id(run), "status": "ok", "ndcg@10": "x",
                                          "epsilon": "abc"}, columns)
    monkeypatch.setattr(sweep, "execute", lambda run, *a, **k: pytest.fail("nothing to run"))
    assert sweep.main([str(config)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("runs:")]  # tqdm's bar
    assert len(err) == 1 and err[0].startswith("error: no plots:") and "the results are kept" in err[0]
    assert sweep.main([str(config), "--table", "ndcg@10"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_plots_say_when_runs_directories_are_gone(tmp_path, capsys):
    # Their rounds were left out of the curves in silence (a research-CLI review)
    import matplotlib

    matplotlib.use("Agg")
    from simulations.plots import plot_sweep

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "ndcg@10": 0.15}) + "\n")
    path = tmp_path / "r.csv"
    path.write_text("run-id,status,model,seed,target-epsilon,ndcg@10,run-dir\n"
                    f"a,ok,mf,1,8,0.15,{run_dir}\nb,ok,mf,2,8,0.12,{tmp_path / 'deleted'}\n")
    assert plot_sweep(path)
    assert f"1 of the 2 runs' directories are gone (e.g. {tmp_path / 'deleted'})" in capsys.readouterr().err
    path.write_text("run-id,status,model,seed,target-epsilon,ndcg@10,run-dir\n" f"a,ok,mf,1,8,0.15,{run_dir}\n")
    assert plot_sweep(path) and "gone" not in capsys.readouterr().err
