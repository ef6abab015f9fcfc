"""A partner's evaluation sums under the Gaussian mechanism (run config ``evaluation-noise-multiplier``).

An evaluation reply adds, over the partner's test users, each user's hit and NDCG gain at
top-K; each lies in [0, 1] and depends on that user's own history and the (public) global model
only. Adding or removing one user therefore moves the pair (hit sum, NDCG sum) by at most 1 per
coordinate, at most sqrt(2) in L2. Adding N(0, (sigma sqrt 2)^2) to each sum is the Gaussian
mechanism with noise multiplier sigma: its Renyi DP at order alpha is alpha / (2 sigma^2), exactly
one DP-SGD step at sample rate 1. Opacus' accountants take it as the mechanism ``(sigma, 1.0, 1)``,
so a partner's ledger composes it with its training (client/privacy_budget.py).

Released: ``hit@K-sum`` and ``ndcg@K-sum`` (noised) and ``num-users``, a count sent in clear like
the training replies' example counts (docs/privacy.md "Not protected"). Not released: the sums at other
K, the sums of squares, the popularity sum and the recommended items, which would each need
noise of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.privacy import Mechanism

SENSITIVITY = math.sqrt(2.0)  # L2 bound on one user's (hit, NDCG) contribution


def evaluation_mechanism(noise_multiplier: float) -> Mechanism:
    """What one noised evaluation reply spends, in a ledger's (noise, sample rate, steps) terms."""
    return (float(noise_multiplier), 1.0, 1)


def planned_evaluations(cfg: Mapping[str, Any], through: int | None = None) -> int:
    """Noised evaluation replies a partner may send in rounds 1..``through`` (default: the whole
    run): one per evaluated round (``evaluate-every``, the last round always); none without
    ``evaluation-noise-multiplier`` or with ``fraction-evaluate = 0``."""
    from common.evaluation import evaluates_round  # lazy: it needs torch, this module only numpy

    if float(cfg.get("evaluation-noise-multiplier", 0.0)) <= 0 or float(cfg.get("fraction-evaluate", 1.0)) <= 0:
        return 0
    rounds, every = int(cfg["num-server-rounds"]), int(cfg["evaluate-every"])
    return sum(evaluates_round(r, every, rounds) for r in range(1, min(rounds, through or rounds) + 1))


def refuse_unaffordable_evaluations(cfg: Mapping[str, Any], delta: float) -> None:
    """:class:`ConfigError` when the run's planned noised evaluations alone reach ``target-epsilon``
    at ``delta`` (no DP-SGD noise could fit beside them; it read "budget exhausted ... already
    spent" on a fresh ledger). The coordinator checks at the largest default delta, 1e-5, which
    gives the smallest epsilon, so what it lets pass may still be refused by a small partner."""
    from common.errors import ConfigError
    from common.privacy import epsilon_of

    evals = planned_evaluations(cfg)
    if not evals:
        return
    noise, target = float(cfg["evaluation-noise-multiplier"]), float(cfg["target-epsilon"])
    spent = epsilon_of([evaluation_mechanism(noise)] * evals, delta, str(cfg.get("accountant", "rdp")))
    if spent >= target:
        raise ConfigError(f"{evals} planned noised evaluations at evaluation-noise-multiplier {noise:g} alone reach "
                          f"epsilon {spent:.3f} at delta {delta:.2g}, the whole target-epsilon {target:g}: raise "
                          "evaluation-noise-multiplier or evaluate-every")


def released_keys(top_k: int) -> tuple[str, str]:
    """The two sums a noised reply carries."""
    return (f"hit@{top_k}-sum", f"ndcg@{top_k}-sum")


def noised_evaluation_sums(sums: Mapping[str, float], noise_multiplier: float, top_k: int,
                           *, seed: int | None = None) -> dict[str, float]:
    """``sums`` (``common.evaluation`` test sums) reduced to what may leave: the top-K hit and NDCG
    sums plus N(0, (``noise_multiplier`` x sqrt 2)^2) each, and ``num-users``.

    The noise comes from the CSPRNG of ``common.secure_noise`` (nobody can regenerate and subtract
    it); ``seed`` (a simulation asking for reproducible noise) draws it from NumPy instead.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"evaluation noise multiplier must be a positive number, got {noise_multiplier!r}")
    std = noise_multiplier * SENSITIVITY
    if seed is None:
        import torch

        from common.secure_noise import SecureGaussian

        draws = SecureGaussian().noise_like(torch.zeros(2, dtype=torch.float64), std).numpy()
    else:
        draws = np.random.default_rng(seed).normal(0.0, std, size=2)
    out = {key: float(sums[key]) + float(noise) for key, noise in zip(released_keys(top_k), draws)}
    out["num-users"] = float(sums["num-users"])
    return out


def clamp_noised_sums(sums: Mapping[str, float]) -> dict[str, float]:
    """Combined sums with each ``-sum`` kept within [0, num-users] (each user adds 0..1): noise can
    push a small sum below zero. Post-processing of released values, so no privacy cost."""
    users = float(sums.get("num-users", 0.0))
    return {key: min(max(float(value), 0.0), users) if key.endswith("-sum") else value for key, value in sums.items()}
