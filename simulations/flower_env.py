"""Environment Flower needs wherever it starts here: no telemetry, no update checks, a local FLWR_HOME."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def set_flower_env() -> dict[str, str]:
    """Set (without overriding the caller's choices) and return Flower's environment."""
    env = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(PROJECT_ROOT / ".flwr"),
        "RAY_DEDUP_LOGS": "0",
        "RAY_usage_stats_enabled": "0",
    }
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in env}
