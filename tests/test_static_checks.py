"""Static checks a unit test can miss: an undefined name in a rarely run branch (a model loader,
an error path) is a NameError only when a user reaches it. Ruff's pyflakes rules (F) find them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_rules_pass_on_every_package():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: it is a dev dependency (pip install -e '.[dev]')")
    result = subprocess.run([ruff, "check", "--no-cache", "--select", "F", "common", "client", "server",
                             "simulations", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
