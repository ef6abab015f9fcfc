"""Privacy math shared by client and server: noise calibration and epsilon from a mechanism history.

Units: ``epsilon`` and ``delta`` as in (epsilon, delta)-DP; ``sample_rate`` is the Poisson
sampling probability of one user per step; ``steps`` counts noisy optimizer steps. The
unit of privacy is one user's whole interaction history at one partner (user-level DP).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.errors import ConfigError, PrivacyError

ACCOUNTANTS = ("rdp", "prv")
# One step of a history: (noise_multiplier, sample_rate, num_steps), Opacus' own format.
Mechanism = tuple[float, float, int]


def default_delta(num_users: int) -> float:
    """A delta well below 1/num_users (the usual requirement for a meaningful guarantee)."""
    return min(1e-5, 0.1 / max(num_users, 1))


def steps_per_epoch(num_users: int, batch_size: int) -> tuple[float, int]:
    """(sample_rate, steps) of one epoch of Poisson sampling with expected ``batch_size``.

    Matches Opacus' ``make_private``: steps = ceil(users / batch) and sample_rate = 1/steps.
    """
    if num_users < 1:
        raise PrivacyError("no users to train on")
    steps = max(1, math.ceil(num_users / max(batch_size, 1)))
    return 1.0 / steps, steps


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
) -> float:
    """Noise multiplier so that ``total_steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    Raises :class:`PrivacyError` with the numbers when no noise level reaches the target.
    """
    _check_accountant(accountant)
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ConfigError(f"target-epsilon must be > 0 and delta in (0, 1); got epsilon={target_epsilon}, delta={target_delta}")
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        ))
    except ValueError as exc:
        raise PrivacyError(
            f"cannot reach epsilon={target_epsilon} at delta={target_delta:g} with sample rate {sample_rate:.3g} "
            f"over {total_steps} steps ({exc}); use fewer rounds/epochs, a smaller batch or more users"
        ) from None


def epsilon_of(history: Iterable[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a whole history of mechanisms at ``delta`` (0 for an empty history)."""
    _check_accountant(accountant)
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = _merge(history)
    return float(acc.get_epsilon(delta=delta))


def _merge(history: list[Mechanism]) -> list[Mechanism]:
    """Merge consecutive identical mechanisms (same noise and rate): accounting is unchanged, PRV is faster."""
    merged: list[list] = []
    for s, q, n in history:
        if merged and merged[-1][0] == s and merged[-1][1] == q:
            merged[-1][2] += n
        else:
            merged.append([s, q, n])
    return [(s, q, n) for s, q, n in merged]


def history_to_json(history: Iterable[Mechanism]) -> str:
    return json.dumps([[float(s), float(q), int(n)] for s, q, n in history])


def history_from_json(text: str) -> list[Mechanism]:
    return [(float(s), float(q), int(n)) for s, q, n in json.loads(text or "[]")]


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant = {name!r} is unknown; use one of {', '.join(ACCOUNTANTS)}")
