"""RDP of the sampled Gaussian mechanism at all orders at once (vectorised over the orders).

Same formulas, same series and same stopping rule as Opacus' ``accountants/analysis/rdp.py``
(Mironov et al. 2019, section 3.3), evaluated with numpy for all orders at once instead of one
Python loop per order and term. Opacus' scalar loops take 0.1-0.45 s per noise level at sample rates
near 1/3 (its 150 default orders, tens of thousands of series terms), so its noise search
(``get_noise_multiplier``, ~15 noise levels) took 2.7 s at rate 1/3 x 30 steps; on this curve 0.23 s
(``common.privacy.calibrate_noise``, measured side by side; docs/performance.md).

Units: ``q`` is the Poisson sampling rate per step, ``sigma`` the noise multiplier (noise std
over the clipping norm), the result is RDP per step at each order (multiply by the steps).
Equality with Opacus' ``compute_rdp`` is tested in ``tests/test_fast_rdp.py``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

_STOP = -30.0  # Opacus stops a fractional order's series once both new terms are below e^-30


def rdp_per_step(q: float, sigma: float, orders: np.ndarray | list[float]) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of ``orders`` (may be inf)."""
    alphas = np.asarray(orders, dtype=np.float64)
    if q == 0:
        return np.zeros_like(alphas)
    if sigma == 0:
        return np.full_like(alphas, np.inf)
    if q == 1.0:
        return alphas / (2 * sigma**2)
    out = np.full_like(alphas, np.inf)
    finite = np.isfinite(alphas)
    is_int = finite & (alphas == np.floor(alphas))
    frac = finite & ~is_int
    if is_int.any():
        out[is_int] = _log_a_int(q, sigma, alphas[is_int]) / (alphas[is_int] - 1)
    if frac.any():
        out[frac] = _log_a_frac(q, sigma, alphas[frac]) / (alphas[frac] - 1)
    return out


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_alpha for integer orders: the finite binomial sum over i = 0..alpha, all orders as
    one (orders x i) matrix (binom(alpha, i) = 0 beyond alpha gives a -inf term, i.e. none)."""
    i = np.arange(int(alphas.max()) + 1, dtype=np.float64)[None, :]
    a = alphas[:, None]
    with np.errstate(divide="ignore"):
        terms = np.log(special.binom(a, i)) + i * math.log(q) + (a - i) * math.log(1 - q) + (i * i - i) / (2 * sigma**2)
    return special.logsumexp(terms, axis=1)


def _log_a_frac(q: float, sigma: float, alphas: np.ndarray, block: int = 512) -> np.ndarray:
    """log A_alpha for fractional orders: Opacus' signed series, each order summed up to and
    including the first i whose two terms are both below e^-30 (Opacus' stopping rule).

    The terms are computed in blocks of i for the orders still running, so the work follows the
    total number of terms (tens of thousands at sample rates near 1/2), not orders x the longest series.
    """
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q, sqrt2_sigma = math.log(q), math.log(1 - q), math.sqrt(2) * sigma
    pieces: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in alphas]
    running = np.arange(len(alphas))
    start = 0
    while len(running):
        i = np.arange(start, start + block, dtype=np.float64)[None, :]
        a = alphas[running][:, None]
        coef = special.binom(a, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        j = a - i
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / sqrt2_sigma)
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / sqrt2_sigma)
        log_s0 = log_coef + i * log_q + j * log_1q + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_coef + j * log_q + i * log_1q + (j * j - j) / (2 * sigma**2) + log_e1
        below = np.maximum(log_s0, log_s1) < _STOP
        done = below.any(axis=1)
        last = np.where(done, below.argmax(axis=1), block - 1)  # inclusive: Opacus adds, then checks
        for row, k in enumerate(running):
            n = last[row] + 1
            pieces[k].append((np.sign(coef[row, :n]), log_s0[row, :n], log_s1[row, :n]))
        running = running[~done]
        start += block
    out = np.empty(len(alphas))
    for k, parts in enumerate(pieces):
        sign = np.concatenate([p[0] for p in parts])
        out[k] = np.logaddexp(_signed_log_sum(np.concatenate([p[1] for p in parts]), sign),
                              _signed_log_sum(np.concatenate([p[2] for p in parts]), sign))
    return out


def _signed_log_sum(log_terms: np.ndarray, sign: np.ndarray) -> float:
    """log(sum(sign * exp(log_terms))); the sum must be positive (Opacus raises as here)."""
    top = float(np.max(log_terms))
    if top == -np.inf:
        return -np.inf
    total = float(np.sum(sign * np.exp(log_terms - top)))
    if total <= 0:
        raise ValueError("The result of subtraction must be non-negative.")
    return top + math.log(total)


def _log_erfc(x: float | np.ndarray) -> np.ndarray:
    return math.log(2) + special.log_ndtr(-np.asarray(x) * 2**0.5)
