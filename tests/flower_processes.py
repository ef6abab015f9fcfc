"""Flower processes for end-to-end tests: each in its own process group, killed as a group.

SIGKILL to the group is a real crash (no cleanup, no atexit) and reaches Ray's processes too
(they stay in the group); ``kill_group`` then checks that nothing of the group survived.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from simulations.flower_env import PROJECT_ROOT, set_flower_env

DEADLINE_S = 900  # generous: only a hang should ever reach it


def start(module: str, run_config: str, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, **set_flower_env(), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", module, *args, "--run-config", run_config]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group, Ray's processes included


def group_alive(pgid: int) -> list[int]:
    """PIDs still in process group ``pgid`` (zombies excluded)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for _ in range(100):  # children re-parented to init die a moment later
        if not group_alive(proc.pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {proc.pid} survived SIGKILL: {group_alive(proc.pid)}")


def run_to_end(proc: subprocess.Popen, log: Path) -> None:
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    finally:
        kill_group(proc)  # nothing of it may outlive the test, even on success
    assert rc == 0, log.read_text()[-3000:]


def kill_after_round(proc: subprocess.Popen, metrics: Path, rounds: int, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rounds:
            kill_group(proc)
            return
        if proc.poll() is not None:
            kill_group(proc)
            raise AssertionError(f"exited before round {rounds}: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError("round 2 never completed")
