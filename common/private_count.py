"""A partner's user count under the Gaussian mechanism: the one number its DP-SGD plan is public for.

Why: the sample rate, the steps per round, the noise calibrated from them, the default delta and
the FedAvg weight are all functions of the partner's user count. Sent as they were, they told the
coordinator that count exactly, and a coordinator who knows every other user of a partner could
then tell from it whether one more user is in the log: the user-level guarantee of DP-SGD did not
cover what the replies said beside the model.

A deployed partner with local DP draws ``noised count = round(count + N(0, sigma^2))`` once per run
(``count-noise-multiplier`` = sigma, in users) and records it on its ledger as one Gaussian mechanism
(noise sigma, sample rate 1, one step: adding or removing one user moves the count by 1). Every
number a reply carries is then computed from that count and the noised model only (post-processing),
so the whole reply is covered by the ledger's (epsilon, delta). Poisson sampling at rate 1/steps
keeps its guarantee whatever the true count is; only the expected batch is off by the noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.privacy import Mechanism


def count_mechanism(noise_multiplier: float) -> Mechanism:
    """What one noised count spends: the Gaussian mechanism at sensitivity 1 (one user), no sampling."""
    return (float(noise_multiplier), 1.0, 1)


def noised_count(count: int, noise_multiplier: float, *, seed: int | None = None) -> int:
    """``count`` + N(0, ``noise_multiplier``^2), rounded, at least 1 (rounding and the floor are
    post-processing; a count of 0 made every update of the run invalid, ``num-examples`` 0, and divided
    the noised sum by one user). The noise comes from the CSPRNG of ``common.secure_noise``; ``seed`` (a
    simulation asking for reproducible noise) draws it from NumPy instead."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"count noise multiplier must be a positive number, got {noise_multiplier!r}")
    if seed is None:
        import torch

        from common.secure_noise import SecureGaussian

        draw = float(SecureGaussian().noise_like(torch.zeros(1, dtype=torch.float64), noise_multiplier)[0])
    else:
        draw = float(np.random.default_rng(seed).normal(0.0, noise_multiplier))
    return max(1, round(count + draw))


def count_noise(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> float:
    """The noise multiplier of this partner's user count, 0 for the exact count.

    A deployed partner (no ``partition-id``) always noises it. A simulated partition's size was made by
    the coordinator's own partitioner, which knows it, so a simulation uses it exactly unless
    ``simulated-count-noise`` asks to simulate a deployment's noised count."""
    if "partition-id" in node_config and not bool(cfg.get("simulated-count-noise", False)):
        return 0.0
    return float(cfg.get("count-noise-multiplier", 10.0))
