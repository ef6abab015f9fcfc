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


def set_simulation_env() -> dict[str, str]:
    """:func:`set_flower_env` plus reproducible DP noise for the simulated partners
    (``FEDREC_REPRODUCIBLE_DP_NOISE=1`` unless the caller set it): one researcher plays coordinator
    and every partner, so nobody is left to hide the noise from, and a rerun repeats its numbers.
    Real partners (SuperNodes, also those simulations.deployment starts) draw OS entropy."""
    from common.privacy import REPRODUCIBLE_NOISE_ENV

    env = set_flower_env()
    os.environ.setdefault(REPRODUCIBLE_NOISE_ENV, "1")
    return {**env, REPRODUCIBLE_NOISE_ENV: os.environ[REPRODUCIBLE_NOISE_ENV]}

