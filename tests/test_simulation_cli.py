"""Every ``python -m simulations.*`` command answers a user mistake with one line and status 2."""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest

from simulations import audit, baselines, cold_start, deployment, epsilon_plan, fault_injection, local_grid, run, sweep
from simulations.bench import centralised, context_features


@pytest.mark.parametrize("main,argv", [
    (baselines.main, ["--dataset", "/no/such/data"]),
    (audit.main, ["/no/such/run"]),
    (cold_start.main, ["--dataset", "/no/such/data", "--item-features", "id"]),
    # DP there is --epsilon's: dp=true trained without DP in silence (a simulation-features journey)
    (cold_start.main, ["--dataset", "synthetic", "--item-features", "id", "--run-config", "dp=true"]),
    # a fault the run cannot inject (partition 9 of 4)
    (fault_injection.main, ["--local", "--faults", "9:nan@1"]),
    (sweep.main, ["/no/such/sweep.toml"]),
    (run.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (local_grid.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (run.main, ["--run-config", "no-such-knob=1"]),
    (fault_injection.main, ["--local", "--faults", "0:melt@1"]),
    (deployment.main, ["--run-config", "foo=1"]),
    (deployment.main, ["--run-config", "dataset='/some/real/data'"]),
    (local_grid.main, ["--run-config", "resume=true"]),
    (context_features.main, ["--data", "/no/such/data"]),
    (centralised.main, ["--overrides", '{"dataset": "/no/such/data"}', "--out", "/tmp/unused.json"]),
    (centralised.main, ["--overrides", "{not json", "--out", "/tmp/unused.json"]),
    # a local DP-SGD noise plan for a run without local DP (eleventh session, a review)
    (epsilon_plan.main, ["--num-partners", "2", "--rounds", "1", "--run-config", 'dp-mode="central"']),
])
def test_a_user_mistake_is_one_error_line(main, argv, capsys) -> None:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_every_command_main_is_wrapped():
    """Each ``python -m`` entry point under simulations/ goes through common.cli_errors."""
    import importlib
    import pkgutil

    import simulations
    import simulations.bench

    unwrapped = []
    for package in (simulations, simulations.bench):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            main = getattr(module, "main", None)
            if main is not None and not hasattr(main, "__wrapped__"):
                unwrapped.append(module.__name__)
    assert unwrapped == []


@pytest.mark.parametrize("bad", ["folder", "under-a-file"])
def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, bad):
    # A review: audit --out / dp_step --out failed only after every audit or measurement had run
    from simulations.bench import dp_step

    (tmp_path / "file").write_text("x")
    out = str(tmp_path) if bad == "folder" else str(tmp_path / "file" / "a.json")
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: pytest.fail("audited before checking --out"))
    monkeypatch.setattr(dp_step, "time_modes", lambda *a, **k: pytest.fail("measured before checking --out"))
    for main, argv in ((audit.main, ["/some/run", "--out", out]), (dp_step.main, ["--out", out]),
                       (centralised.main, ["--out", out])):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "--out" in err and ("is a folder" if bad == "folder" else "is not a folder") in err


def test_output_file_accepts_new_files_in_new_folders(tmp_path):
    from common.cli_args import output_file

    assert output_file(str(tmp_path / "new" / "deeper" / "r.json")) == tmp_path / "new" / "deeper" / "r.json"
    assert not (tmp_path / "new").exists()  # checked, not created


def test_benchmark_modes_and_baseline_holdout_mistakes_are_one_line(tmp_path, capsys):
    from simulations.bench import dp_step

    with pytest.raises(SystemExit) as stop:
        dp_step.main(["--modes", "fused,fused-securee"])
    assert stop.value.code == 2 and "unknown fused-securee" in capsys.readouterr().err
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{t},{t}\n" for u in range(3) for t in range(4)))
    assert baselines.main(["--dataset", str(log), "--holdout-fraction", "0.9"]) == 2
    assert "leaves no user" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        baselines.main(["--dataset", str(log), "--holdout-fraction", "0.2", "--blend-model", str(tmp_path)])


def test_the_runner_reports_a_run_whose_metrics_end_in_a_line_cut_short(tmp_path, monkeypatch, capsys):
    # A server killed mid-write leaves half a line: the runner printed a JSONDecodeError traceback
    import simulations.run as runner

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1, "ndcg@10": 0.1, "num-partners": 2}\n{"round": 2, "ndc')
    (run_dir / "summary.md").write_text("# summary\n")
    monkeypatch.setattr(runner, "run_federation", lambda *a, **k: run_dir)
    assert runner.main(["--num-partners", "2"]) == 0
    out, err = capsys.readouterr()
    assert "run directory: " in out and "skipped 1 unreadable line" in err


@pytest.mark.parametrize("main,argv", [
    (local_grid.main, ["--num-partners", "-2"]),  # waited node-wait-timeout (300 s) for "0 of 2" partners
    (local_grid.main, ["--num-partners", "0"]),
    (fault_injection.main, ["--local", "--num-partners", "0"]),
    (fault_injection.main, ["--local", "--sleep-seconds", "-5"]),
])
def test_impossible_numbers_are_refused_by_the_argument_parser(main, argv, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [2, 15])
def test_an_interrupt_is_one_stopped_line_with_the_shell_exit_status(signum, capsys):
    # Before: Ctrl-C in any command (a preflight, a data check) printed a KeyboardInterrupt traceback
    from common.cli_errors import user_errors_exit
    from simulations.run_stop import Stopped

    @user_errors_exit
    def main(argv: list[str] | None = None) -> int:
        raise Stopped if signum == 15 else KeyboardInterrupt

    assert main([]) == 128 + signum
    assert capsys.readouterr().err == f"stopped ({'SIGTERM' if signum == 15 else 'SIGINT'})\n"


@pytest.mark.parametrize(("error", "said"), [
    # An event store damaged after it opened was a traceback and exit 1 from recommend and serve (a serving review)
    (sqlite3.DatabaseError("database disk image is malformed"), "is damaged (database disk image is malformed); rest"),
    (sqlite3.OperationalError("database is locked"), "is busy or unavailable (database is locked); try again"),
    # fedrec-server certs on a full disk, catalogue on a read-only mount: OSError tracebacks (a coordinator review)
    (OSError(errno.ENOSPC, "No space left on device"), "error: cannot write: No space left on device; free space"),
    (OSError(errno.EROFS, "Read-only file system", "runs/r1"), "error: cannot write 'runs/r1': Read-only file system"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300), "File name too long"),
])
def test_a_damaged_sqlite_file_or_a_full_disk_is_one_line(error, said, capsys):
    from common.cli_errors import user_errors_exit

    @user_errors_exit
    def main(argv: list[str] | None = None) -> int:
        raise error

    assert main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and said in err[0]


def test_an_os_error_that_is_no_user_mistake_still_surfaces():
    from common.cli_errors import user_errors_exit

    @user_errors_exit
    def main(argv: list[str] | None = None) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        main([])


def test_output_into_a_reader_that_left_ends_without_a_traceback():
    # `fedrec-server report --json RUN | head` printed a BrokenPipeError traceback (twice: once more at exit)
    import subprocess
    import sys

    script = ("import sys\nfrom common.cli_errors import user_errors_exit\n"
              "@user_errors_exit\ndef main(argv=None):\n    for i in range(10**6):\n        print(i)\n    return 0\n"
              "sys.exit(main())\n")
    res = subprocess.run(f"{sys.executable} -c '{script}' | head -1", shell=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.stdout == "0\n" and res.stderr == ""


def test_an_audit_of_a_folder_that_is_not_there_says_so(capsys):
    # it said "no config.json (run with holdout-fraction > 0 ...)" for a mistyped path (a journey review)
    assert audit.main(["/no/such/run"]) == 2
    assert capsys.readouterr().err.strip() == "error: /no/such/run: no such run directory"
