"""Privacy math shared by client and server: noise calibration and epsilon from a mechanism history.

Units: ``epsilon`` and ``delta`` as in (epsilon, delta)-DP; ``sample_rate`` is the Poisson
sampling probability of one user per step; ``steps`` counts noisy optimizer steps. The
unit of privacy is one user's whole interaction history at one partner (user-level DP).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from common.errors import ConfigError, PrivacyError

# NOTE: Opacus (and so torch) is imported inside the functions that account: dp_mode and
# the other config helpers are used where no accounting happens (SecAgg+ key set-up messages
# each start a ClientApp process, and an Opacus import costs seconds there).

ACCOUNTANTS = ("rdp", "prv")
# Where noise is added: local = DP-SGD at each partner (user-level), central = Flower's DP
# wrapper on the aggregate (partner-level), both, or off. ``dp = false`` forces "off".
DP_MODES = ("local", "central", "both", "off")
# One step of a history: (noise_multiplier, sample_rate, num_steps), Opacus' own format.
Mechanism = tuple[float, float, int]
# A history within this of the target leaves no room for more steps (calibrate_noise_after refuses)
CALIBRATION_TOLERANCE = 0.005


def default_delta(num_users: int) -> float:
    """A delta well below 1/num_users (the usual requirement for a meaningful guarantee)."""
    return min(1e-5, 0.1 / max(num_users, 1))


def refuse_meaningless_delta(delta: float, num_users: int) -> float:
    """``delta`` back, or :class:`PrivacyError` when it is at least 1 / ``num_users``: an
    (epsilon, delta) guarantee with such a delta allows releasing one user's data outright, and an
    accountant asked at it would report a ledger's spend as smaller than it is."""
    if delta >= 1.0 / max(num_users, 1):
        raise PrivacyError(f"target-delta = {delta:g} is at least 1 / {num_users} users: such a guarantee allows "
                           "releasing one user's data outright; use target-delta = 0 for the default")
    return delta


def dp_mode(cfg: Mapping[str, Any]) -> str:
    """The effective ``dp-mode`` of a run config; the older ``dp = false`` switch means "off"."""
    mode = str(cfg.get("dp-mode", "local"))
    if mode not in DP_MODES:
        raise ConfigError(f"dp-mode = {mode!r} is unknown; use one of {', '.join(DP_MODES)}")
    return mode if cfg.get("dp", True) else "off"


def uses_local_dp(mode: str) -> bool:
    """DP-SGD at each partner (user-level guarantee, ledger, budget)."""
    return mode in ("local", "both")


ONE_USER_MANY_EXAMPLES = ("history-windows", "reverse-histories")


def refuse_many_examples_per_user(cfg: Mapping[str, Any], *, local_dp: bool | None = None) -> None:
    """:class:`ConfigError` if a knob that makes one user several examples is on with local DP:
    a DP-SGD example (the clipping unit the accountant counts) must be one whole user.

    ``cfg`` needs only the knobs of :data:`ONE_USER_MANY_EXAMPLES`; ``local_dp`` (when the caller
    knows it, e.g. the trainer) replaces reading it from ``cfg``'s dp settings."""
    if local_dp is None:
        local_dp = uses_local_dp(dp_mode(cfg))
    if local_dp:
        for knob in ONE_USER_MANY_EXAMPLES:
            if cfg.get(knob):
                raise ConfigError(f"{knob} = true needs dp = false (a DP-SGD example must be one whole user)")


# A partner's own environment (never the run config, which the coordinator writes) may ask for
# reproducible DP noise; simulations.run sets it for its simulated partners.
REPRODUCIBLE_NOISE_ENV = "FEDREC_REPRODUCIBLE_DP_NOISE"


def dp_noise_seed(*parts: int) -> int | None:
    """The noise seed of one partner's training call: ``None`` (fresh OS entropy) unless this
    process' environment sets ``FEDREC_REPRODUCIBLE_DP_NOISE=1``, then a function of ``parts``
    (run seed, round, partner) so a simulation repeats itself and its partners' noise differs."""
    if os.environ.get(REPRODUCIBLE_NOISE_ENV, "") not in ("1", "true"):
        return None
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63)
    return seed


def uses_central_dp(mode: str) -> bool:
    """Flower's central DP wrapper on the aggregate (partner-level guarantee)."""
    return mode in ("central", "both")


def steps_per_epoch(num_users: int, batch_size: int) -> tuple[float, int]:
    """(sample_rate, steps) of one epoch of Poisson sampling with expected ``batch_size``.

    Matches Opacus' ``make_private``: steps = ceil(users / batch) and sample_rate = 1/steps.
    A partner with no more users than ``batch_size`` would sample everyone every step (one step
    per epoch, no amplification by sampling, sample rate 1): a :class:`PrivacyError` says so with
    the numbers, and a batch size that gives more than one step when there is one.
    """
    if num_users < 1:
        raise PrivacyError("no users to train on")
    if num_users <= batch_size:
        fix = (f"set batch-size to at most {max(1, num_users // 4)} (a few steps per epoch) or join more users"
               if num_users >= 2 else "join more users (one user is sampled in every step whatever the batch size)")
        raise PrivacyError(
            f"only {num_users} user{'' if num_users == 1 else 's'} with training data, not more than batch-size {batch_size}: every user would be "
            f"in every DP-SGD step (sample rate 1, no privacy amplification); {fix}"
        )
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
        return _calibrated_noise(float(target_epsilon), float(target_delta), float(sample_rate), int(total_steps), accountant)
    except ValueError as exc:
        raise PrivacyError(
            f"cannot reach epsilon={target_epsilon} at delta={target_delta:g} with sample rate {sample_rate:.3g} "
            f"over {total_steps} steps ({exc}); use fewer rounds/epochs, a smaller batch or more users"
        ) from None


@functools.lru_cache(maxsize=256)
def _calibrated_noise(target_epsilon: float, target_delta: float, sample_rate: float, total_steps: int,
                      accountant: str) -> float:
    """Opacus' search, cached per process (the partners a simulation actor serves mostly share
    (rate, steps, delta), e.g. IID partitions). For RDP the same search runs on the vectorised
    RDP of common/fast_rdp.py (a whole search at rate 1/3: 0.23 s against Opacus' 2.67 s, docs/performance.md)."""
    from opacus.accountants.utils import get_noise_multiplier

    if accountant == "rdp":
        return _opacus_noise_search(lambda sigma: epsilon_of([(sigma, sample_rate, total_steps)], target_delta),
                                    target_epsilon, epsilon_tolerance=0.005)
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                                      steps=total_steps, accountant=accountant, epsilon_tolerance=0.005))


def _opacus_noise_search(eps: Callable[[float], float], target_epsilon: float, epsilon_tolerance: float) -> float:
    """Opacus' ``get_noise_multiplier`` search (same bracket, bisection and stopping rule) over an
    ``eps(sigma)`` of our own: the smallest noise found whose epsilon is at most ``target_epsilon``,
    within ``epsilon_tolerance`` of it."""
    eps_high = float("inf")
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = eps(sigma_high)
        if sigma_high > 1e6:  # Opacus' MAX_SIGMA
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2
        e = eps(sigma)
        if e < target_epsilon:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high


def calibrate_noise_after(
    history: Iterable[Mechanism],
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = CALIBRATION_TOLERANCE,
) -> float:
    """Like :func:`calibrate_noise`, but the new steps come after an already spent ``history``.

    Finds (by bisection; epsilon falls as noise grows) the smallest noise multiplier, within
    ``epsilon_tolerance``, for which history + ``total_steps`` new steps stay within
    ``target_epsilon``. This is how a ledger that carries spend from earlier runs plans a new run.
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return calibrate_noise(target_epsilon=target_epsilon, target_delta=target_delta,
                               sample_rate=sample_rate, total_steps=total_steps, accountant=accountant)
    spent = epsilon_of(history, target_delta, accountant)
    if spent >= target_epsilon - epsilon_tolerance:
        raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(spent)} of {target_epsilon:g} already spent")

    def eps(sigma: float) -> float:
        return epsilon_of(history + [(sigma, sample_rate, total_steps)], target_delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:  # unreachable in practice: epsilon tends to the spent part as noise grows
            raise PrivacyError(f"cannot fit {total_steps} more steps in the remaining budget "
                               f"{target_epsilon - spent:.3f} of {target_epsilon:g}")
    for _ in range(60):  # hi stays feasible throughout
        mid = (lo + hi) / 2
        e = eps(mid)
        if e > target_epsilon:
            lo = mid
        else:
            hi = mid
            if e >= target_epsilon - epsilon_tolerance:
                break
    return hi


def stated_epsilon(epsilon: float) -> str:
    """``epsilon`` as a stated spend or bound: 3 decimals rounded *up* (7.99746 is "7.998", not "7.997"), so
    a figure read back from the text, as the coordinator's report reads a refusal's, is never below the
    accountant's (a privacy review)."""
    return f"{math.ceil(round(float(epsilon) * 1000, 6)) / 1000:.3f}"


def epsilon_of(history: Iterable[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by a whole history of mechanisms at ``delta`` (0 for an empty history)."""
    _check_accountant(accountant)
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    if accountant == "rdp":
        # Same math as Opacus' RDPAccountant; RDP is linear in steps, so one step's curve is cached
        # (the ledger re-accounts the same mechanisms every round and calibration bisects).
        rdp = sum(n * _rdp_one_step(s, q) for s, q, n in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(accountant)
    acc.history = _merge(history)
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q) = -inf for a sample rate of 1 (exact)
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP curve at Opacus' default orders (vectorised; equal to Opacus' compute_rdp,
    tests/test_fast_rdp.py)."""
    from opacus.accountants import RDPAccountant

    from common.fast_rdp import rdp_per_step

    return rdp_per_step(sample_rate, noise_multiplier, RDPAccountant.DEFAULT_ALPHAS)


def _merge(history: list[Mechanism]) -> list[Mechanism]:
    """Merge consecutive identical mechanisms (same noise and rate): accounting is unchanged, PRV is faster."""
    merged: list[list] = []
    for s, q, n in history:
        if merged and merged[-1][0] == s and merged[-1][1] == q:
            merged[-1][2] += n
        else:
            merged.append([s, q, n])
    return [(s, q, n) for s, q, n in merged]


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant = {name!r} is unknown; use one of {', '.join(ACCOUNTANTS)}")


def central_epsilon_per_user(central: Mapping[str, Any]) -> tuple[float, float] | None:
    """(epsilon, delta) for one *user* from central DP's releases, or None when they were not accounted.

    Central DP's own epsilon (``privacy.json`` ``central.epsilon``) is for one partner's whole update
    present or absent (zeroed): the sum moves by at most the clipping norm C. One user added or removed at
    a partner changes that partner's clipped update into another clipped update, which moves the sum by
    up to 2C: the same Gaussian releases at half their noise multiplier. Taking the partner-level figure
    for a user stated about 2-3x too small an epsilon (2.45x at sigma 1, 5 rounds) (a privacy review). Opacus' RDP analysis over the
    recorded releases (q = 1: no amplification), at central DP's delta."""
    if central.get("epsilon") is None:
        return None
    rounds = [r for r in central.get("rounds") or [] if r.get("epsilon") is not None]
    # a run from before the rounds recorded their multiplier: the run's (a review: KeyError on old runs)
    sigmas = [r.get("noise-multiplier", central.get("noise-multiplier")) for r in rounds]
    if not rounds or any(s is None for s in sigmas):
        return None
    from opacus.accountants.analysis import rdp as opacus_rdp

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))
    total = sum(opacus_rdp.compute_rdp(q=1.0, noise_multiplier=float(s) / 2, steps=1, orders=orders) for s in sigmas)
    delta = float(central.get("delta") or 0.0)
    epsilon, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=total, delta=delta)
    return float(epsilon), delta
