"""``item-prior = "popularity"``: a fixed per-item score offset from the partners' noised item histograms.

Why: user-level DP-SGD at a few hundred users per partner learns the item ranking slowly, and what it
cannot learn in a few rounds is the plainest signal of all, how popular each item is (on ML-100K the text
start under DP scored below the popularity baseline). Popularity is one number per item, so it can be
released once under the Gaussian mechanism for far less than DP-SGD would spend learning it.

The mechanism (one per partner and run, before round 1): each user contributes the set of distinct items
in its training sequences (never a validation or test item), each with weight ``1 / sqrt(n)`` for ``n``
such items, so every user's vector has L2 norm 1 and adding or removing one user moves the histogram by
at most 1 in L2. Gaussian noise of std ``sigma`` (``item-prior-noise-multiplier``) on every cell makes the
release (epsilon, delta)-DP for each user as the Gaussian mechanism with noise multiplier ``sigma``,
sample rate 1, one step: the partner records exactly that on its privacy ledger before the histogram
leaves, and its DP-SGD is calibrated on what the target leaves after it.

The coordinator sums the histograms and sets SASRec's output-layer bias, frozen (no partner trains or
clips it), to ``log(1 + max(0, sum))``: every score of the model is its learned score plus that offset,
so training learns what popularity does not explain. The bias is post-processing of the releases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.errors import DataError
from common.privacy import Mechanism


def prior_mechanism(noise_multiplier: float) -> Mechanism:
    """What one noised histogram spends: the Gaussian mechanism at L2 sensitivity 1 (one user), no sampling."""
    return (float(noise_multiplier), 1.0, 1)


def planned_prior(cfg: Mapping[str, Any]) -> list[Mechanism]:
    """[the item histogram's mechanism] for a run with ``item-prior = "popularity"``, else []: what a partner's
    DP-SGD plan counts as spent before round 1 (client/privacy_budget.py, the simulation preflight, epsilon_plan)."""
    if cfg.get("item-prior", "none") != "popularity":
        return []
    return [prior_mechanism(float(cfg["item-prior-noise-multiplier"]))]


def refuse_unaffordable_prior(cfg: Mapping[str, Any], delta: float, *, spent: Sequence[Mechanism] = (),
                              label: str = "") -> None:
    """:class:`PrivacyError` when the planned item histogram, after ``spent`` (a ledger's history; a fresh
    ledger: nothing), would reach ``target-epsilon`` at ``delta`` and leave nothing for DP-SGD. The message
    starts "budget exhausted: epsilon S of T" (the coordinator's privacy report reads the spend from it) and
    names the knob; the calibration alone said "epsilon X already spent" of a histogram not yet released."""
    from common.errors import PrivacyError
    from common.privacy import CALIBRATION_TOLERANCE, epsilon_of, stated_epsilon

    prior = planned_prior(cfg)
    if not prior:
        return
    accountant, target = str(cfg["accountant"]), float(cfg["target-epsilon"])
    with_prior = epsilon_of(list(spent) + prior, delta, accountant)
    if with_prior < target - CALIBRATION_TOLERANCE:
        return
    already = epsilon_of(list(spent), delta, accountant) if spent else 0.0
    if already >= target:  # spent before this run: said without the histogram, which is not spent
        raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(already)} of {target:g} already spent")
    raise PrivacyError(f"{label + ': ' if label else ''}budget exhausted: epsilon {stated_epsilon(already)} of {target:g} spent, "
                       f"and the item histogram of item-prior = popularity at item-prior-noise-multiplier "
                       f"{prior[0][0]:g} would bring it to {with_prior:.3f} at delta {delta:.2g} before any training; "
                       "raise item-prior-noise-multiplier or target-epsilon, or use item-prior = none")


def unit_histogram(sequences: Iterable[np.ndarray], num_items: int) -> np.ndarray:
    """(V+1,) float64: the sum over users of their distinct items (0 = padding skipped), each user's
    vector scaled to L2 norm 1. A user without items adds nothing."""
    total = np.zeros(num_items + 1, dtype=np.float64)
    for seq in sequences:
        items = np.unique(np.asarray(seq, dtype=np.int64))
        items = items[items > 0]
        if len(items):
            total[items] += 1.0 / np.sqrt(len(items))
    return total


def noised_histogram(histogram: np.ndarray, noise_multiplier: float, *, seed: int | None = None) -> np.ndarray:
    """``histogram`` + N(0, ``noise_multiplier``^2) on every cell (float32 to send). Noise from the CSPRNG
    of ``common.secure_noise``; ``seed`` (a simulation asking for reproducible noise) draws it from NumPy."""
    if not (np.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"item-prior noise multiplier must be a positive number, got {noise_multiplier!r}")
    if seed is None:
        from common.secure_noise import SecureGaussian

        noise = SecureGaussian().noise_like(torch.zeros(len(histogram), dtype=torch.float64), noise_multiplier).numpy()
    else:
        noise = np.random.default_rng(seed).normal(0.0, noise_multiplier, size=len(histogram))
    return (histogram + noise).astype(np.float32)


def check_histogram(histogram: np.ndarray, num_items: int, who: str) -> None:
    """:class:`DataError` unless ``histogram`` is a finite (V+1,) vector (its cells may be negative: noise)."""
    if histogram.shape != (num_items + 1,):
        raise DataError(f"{who}: item histogram of shape {histogram.shape}, expected ({num_items + 1},) for the "
                        f"catalogue of {num_items} items")
    if not np.isfinite(histogram).all():
        raise DataError(f"{who}: item histogram holds NaN or infinite values")


def prior_offsets(histograms: Sequence[np.ndarray]) -> np.ndarray:
    """(V+1,) float32 offsets ``log(1 + max(0, sum))`` of the summed histograms; padding (0) gets 0."""
    total = np.sum(np.stack([np.asarray(h, dtype=np.float64) for h in histograms]), axis=0)
    offsets = np.log1p(np.clip(total, 0.0, None))
    offsets[0] = 0.0
    return offsets.astype(np.float32)


def set_item_prior(model: torch.nn.Module, offsets: np.ndarray) -> None:
    """Copy ``offsets`` into SASRec's frozen output bias (built with ``item-prior = "popularity"``)."""
    bias = getattr(getattr(model, "output", None), "bias", None)
    if bias is None or bias.requires_grad or bias.shape != (len(offsets),):
        raise DataError("item-prior needs a SASRec model built with item-prior = \"popularity\" (a frozen output "
                        f"bias of {len(offsets)} items)")
    with torch.no_grad():
        bias.copy_(torch.from_numpy(np.asarray(offsets, dtype=np.float32)).to(bias.dtype))
