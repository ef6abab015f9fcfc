"""What produced a run: code version, package versions, command and environment switches.

``config.json`` holds every knob, but a researcher reproducing a number also needs the code it
ran (git commit, and whether the working tree had uncommitted changes), the library versions
(torch, Flower, Opacus change numerics between releases), the command line, and whether DP noise
was drawn reproducibly (``FEDREC_REPRODUCIBLE_DP_NOISE``). Each process start of a run appends
one entry to ``provenance.json`` (a resumed run may have run on other code).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.files import atomic_write_text

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedrec", "torch", "flwr", "opacus", "numpy", "cryptography")
ENV_SWITCHES = ("FEDREC_REPRODUCIBLE_DP_NOISE", "FEDREC_DATA_DIR", "OMP_NUM_THREADS")


def code_version(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """``{"commit": ..., "dirty": bool}`` of the git checkout at ``root``; ``{"commit": None}`` when it
    is not one (an installed wheel) or git is missing."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != Path(root).resolve():  # e.g. a Flower app unpacked inside another checkout
            return _not_a_checkout(root)
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return _not_a_checkout(root)
    return {"commit": commit, "dirty": bool(status.strip())}


def _not_a_checkout(root: Path) -> dict[str, Any]:
    """No commit; under ``flwr run`` the code is a Flower app unpacked as ``<FLWR_HOME>/apps/<app>``,
    whose folder name (publisher, name, version and hash of the app bundle) identifies it."""
    root = Path(root)
    return {"commit": None, **({"flower-app": root.name} if root.parent.name == "apps" else {})}


SECRET_FLAGS = ("--token", "--token-file")  # Flower passes the ServerApp a per-run token on its command line


def redacted(argv: list[str]) -> list[str]:
    """``argv`` with the values of secret flags replaced: a token must not be written into the run directory."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("<redacted>")
            hide = False
        elif arg in SECRET_FLAGS:
            out.append(arg)
            hide = True
        elif arg.startswith(tuple(f"{flag}=" for flag in SECRET_FLAGS)):
            out.append(arg.split("=", 1)[0] + "=<redacted>")
        else:
            out.append(arg)
    return out


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance_entry(**extra: Any) -> dict[str, Any]:
    """One start of a run: time, code, versions, python, platform, command, environment switches."""
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": redacted(list(sys.argv)),
        "environment": {k: os.environ[k] for k in ENV_SWITCHES if k in os.environ},
        **extra,
    }


def run_token(run_dir: Path) -> str | None:
    """The random ``run-token`` of the run's first start (the same across its resumes, another for a fresh
    run under a reused name), or None when ``provenance.json`` is gone or holds none."""
    try:
        starts = json.loads((Path(run_dir) / "provenance.json").read_text()).get("starts", [])
        token = starts[0].get("run-token") if starts and isinstance(starts[0], dict) else None
    except (OSError, ValueError, AttributeError):
        return None
    return token if isinstance(token, str) and token else None


def append_provenance(run_dir: Path, **extra: Any) -> Path:
    """Add this start's entry to ``run_dir/provenance.json`` (``{"starts": [...]}``); an unreadable
    file is replaced rather than failing the run (it only documents the run)."""
    path = Path(run_dir) / "provenance.json"
    starts: list = []
    try:
        earlier = json.loads(path.read_text())
        starts = list(earlier.get("starts", [])) if isinstance(earlier, dict) else []
    except (OSError, ValueError):
        pass
    starts.append(provenance_entry(**extra))
    return atomic_write_text(path, json.dumps({"starts": starts}, indent=2))
