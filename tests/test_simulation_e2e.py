"""End to end: the main job's code path (Flower simulation engine, 2 rounds) on synthetic data and ML-100K."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ("synthetic-users=150 synthetic-items=40 max-seq-len=20 embedding-dim=16 num-blocks=1 "
        "num-server-rounds=2 local-epochs=1 batch-size=16")


def run_main_job(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """Run ``python -m simulations.run`` in its own process group and kill the group on any exit."""
    proc = subprocess.Popen([sys.executable, "-m", "simulations.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env={**os.environ})
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # Ray workers started by the job die with it
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_round_dp_simulation_on_synthetic_data(tmp_path):
    res = run_main_job(["--num-partners", "3", "--run-config", f"{TINY} run-dir='{tmp_path}' run-name='syn'"])
    assert res.returncode == 0, res.stdout[-3000:]
    run_dir = tmp_path / "syn"
    rounds = read_metrics(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 8.0 * 1.01
    assert all(0 <= r["ndcg@10"] <= r["hr@10"] <= 1 for r in rounds)
    assert rounds[-1]["eval-users"] > 100
    for name in ("config.json", "metrics.jsonl", "model.pt", "summary.md", "rounds.png", "partners.png"):
        assert (run_dir / name).is_file(), name
    assert "round 2: HR@10" in res.stdout


@pytest.mark.slow
def test_two_round_simulation_on_movielens_100k(tmp_path, ml100k_dir):
    cfg = (f"dataset='{ml100k_dir}' max-seq-len=20 embedding-dim=16 num-blocks=1 num-server-rounds=2 "
           f"local-epochs=1 batch-size=64 dp=false run-dir='{tmp_path}' run-name='ml'")
    res = run_main_job(["--num-partners", "2", "--run-config", cfg])
    assert res.returncode == 0, res.stdout[-3000:]
    rounds = read_metrics(tmp_path / "ml")
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[-1]["eval-users"] == 943


def test_bad_dataset_path_is_one_clear_line(tmp_path):
    res = run_main_job(["--num-partners", "2", "--run-config", f"dataset='{tmp_path}/missing.csv' run-dir='{tmp_path}'"], timeout=120)
    assert res.returncode == 2
    assert "missing.csv: no such file or directory" in res.stdout
    assert "Traceback" not in res.stdout


def test_unknown_config_key_is_one_clear_line(tmp_path):
    res = run_main_job(["--run-config", "num-rounds=3"], timeout=120)
    assert res.returncode == 2 and "unknown config key 'num-rounds'" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_one_ctrl_c_or_kill_stops_a_simulation_and_its_ray_processes(tmp_path, how):
    # Before: the ServerApp thread waited out round-timeout (600 s) after Ctrl-C, and the interpreter
    # waited for it; the terminal sends SIGINT to the whole process group, Ray's processes included.
    # `kill PID` (SIGTERM to the process alone) met Ray's own handlers, which aborted the run (SIGABRT)
    import time

    cfg = f"{TINY.replace('num-server-rounds=2', 'num-server-rounds=50')} run-dir='{tmp_path}' run-name='stop'"
    proc = subprocess.Popen([sys.executable, "-m", "simulations.run", "--num-partners", "3", "--run-config", cfg],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ})
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "round 1: HR@10" in line:
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=150)  # far below round-timeout
        assert proc.returncode == (130 if how == "ctrl-c" else 143), rest[-3000:]
        assert "Traceback" not in rest, rest[-3000:]
        # the run was named on the command line: the hint adds resume=true alone (run-name twice is refused)
        assert f"stopped: {tmp_path / 'stop'} is incomplete" in rest and "--run-config 'resume=true' added" in rest
        assert (tmp_path / "stop" / "partitions.json").is_file()  # what the audit and a resume's report read
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Ray's actors end once their owner has gone
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("processes of the stopped simulation are still running")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
