"""The vectorised RDP (common/fast_rdp.py) against Opacus' own scalar implementation."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp
from opacus.accountants.utils import get_noise_multiplier

from common.fast_rdp import rdp_per_step
from common.privacy import calibrate_noise, calibrate_noise_after, epsilon_of

ORDERS = RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("q", [1e-3, 0.02, 1 / 6, 1 / 3, 0.5, 0.9])
@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.45, 4.0, 12.0])
def test_rdp_curve_equals_opacus(q: float, sigma: float) -> None:
    ours = rdp_per_step(q, sigma, ORDERS)
    theirs = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS))
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    finite = np.isfinite(theirs)
    # Same series, summed in a different order: rounding differences, largest at the order 1.1
    # (log A is divided by alpha - 1 = 0.1) and for tiny RDP values (A is ~1); at most ~5e-9 relative
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-7, atol=1e-12)


def test_degenerate_mechanisms_match_opacus() -> None:
    for q, sigma in [(0.0, 1.0), (1.0, 2.0), (0.3, 0.0)]:
        ours = rdp_per_step(q, sigma, ORDERS)
        theirs = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ORDERS), dtype=float)
        np.testing.assert_array_equal(ours, theirs)


def test_epsilon_of_a_history_equals_opacus_accountant() -> None:
    history = [(1.3, 1 / 3, 30), (0.9, 0.05, 200), (2.5, 0.5, 7)]
    acc = RDPAccountant()
    acc.history = list(history)
    for delta in (1e-5, 1e-3):
        assert epsilon_of(history, delta) == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)


@pytest.mark.parametrize("eps,delta,q,steps", [(8.0, 1e-5, 1 / 3, 30), (1.0, 1e-5, 1 / 6, 60), (4.0, 1e-4, 0.02, 500)])
def test_calibration_equals_opacus_search(eps: float, delta: float, q: float, steps: int) -> None:
    sigma = calibrate_noise(target_epsilon=eps, target_delta=delta, sample_rate=q, total_steps=steps)
    assert sigma == get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                         epsilon_tolerance=0.005)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert eps - 0.005 <= acc.get_epsilon(delta=delta) <= eps


def test_calibration_after_spend_stays_within_budget_by_opacus() -> None:
    spent = [(1.2, 0.2, 40)]
    sigma = calibrate_noise_after(spent, target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25, total_steps=24)
    acc = RDPAccountant()
    acc.history = spent + [(sigma, 0.25, 24)]
    assert 8.0 - 0.005 <= acc.get_epsilon(delta=1e-5) <= 8.0
    acc.history = spent + [(sigma * 0.98, 0.25, 24)]  # a little less noise would pass the budget
    assert acc.get_epsilon(delta=1e-5) > 8.0


def test_prv_at_sample_rate_1_is_accounted_without_numpy_warnings():
    # an evaluation's noised sums are a Gaussian mechanism at rate 1; Opacus' PRV took log(1 - 1) and numpy printed
    # "divide by zero" twice under the epsilon planner's table (a journey review)
    import warnings

    from common.privacy import epsilon_of

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eps = epsilon_of([(5.0, 1.0, 1), (1.3, 0.25, 40)], 1e-5, "prv")
    assert 0 < eps < epsilon_of([(5.0, 1.0, 1), (1.3, 0.25, 40)], 1e-5, "rdp") * 1.5
