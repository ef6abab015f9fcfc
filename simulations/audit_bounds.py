"""What a membership attack's scores say against a DP claim: TPR at low FPR and an epsilon lower bound.

AUC averages over every threshold and cannot be compared with (epsilon, delta). A DP guarantee
bounds every test at once: for any threshold, with false-positive rate a and false-negative rate
b, (epsilon, delta)-DP for one user requires ``1 - b <= e^epsilon * a + delta`` and
``1 - a <= e^epsilon * b + delta`` (Kairouz et al. 2015). So

- :func:`tpr_at_fpr` reports the attack's TPR at a low FPR (Carlini et al. 2022);
- :func:`epsilon_lower_bound` turns one threshold's error rates into the smallest epsilon
  consistent with them at 95% confidence (Jagielski et al. 2020; Nasr et al. 2021): the
  threshold is chosen on one random half of the users and its error rates are bounded with
  Clopper-Pearson intervals on the other half, so choosing it costs no confidence.

Caveat, stated with every result: the members were trained in one model, so their outcomes are
not independent trials as the binomial intervals assume; Steinke et al. (2023) show one run can
still audit when inclusion is random (here: the seeded holdout draw), with a somewhat looser
analysis. A bound above the claimed epsilon means the claim or the audit is wrong; a bound below
it proves nothing about the claim (the attack may be weak).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided upper ``1 - alpha`` confidence limit of a rate seen as ``errors`` of ``trials``."""
    if trials <= 0:
        return 1.0
    if errors >= trials:
        return 1.0
    return float(beta.ppf(1 - alpha, errors + 1, trials - errors))


def _bound(fpr: float, fnr: float, delta: float) -> float:
    """The epsilon that rates (fpr, fnr) force under (epsilon, delta)-DP; 0 when they force none."""
    values = [0.0]
    for err_a, err_b in ((fpr, fnr), (fnr, fpr)):
        if err_a > 0 and 1 - delta - err_b > 0:
            values.append(math.log((1 - delta - err_b) / err_a))
    return max(values)


def _error_counts(members: np.ndarray, nonmembers: np.ndarray, threshold: float) -> tuple[int, int]:
    """(false positives, false negatives) of 'member when score >= threshold'."""
    return int((nonmembers >= threshold).sum()), int((members < threshold).sum())


def epsilon_lower_bound(members: np.ndarray, nonmembers: np.ndarray, delta: float, *, confidence: float = 0.95,
                        seed: int = 0) -> dict:
    """Smallest epsilon consistent with the attack at ``confidence`` (scores: higher = member).

    Returns ``{"epsilon-lower-bound", "confidence", "threshold", "fpr-upper", "fnr-upper",
    "evaluated-members", "evaluated-non-members"}``. Each group is split in random halves
    (``seed``); the threshold maximising the bound on the first halves (with the same intervals,
    so a threshold seen on a few users is not chosen for its zero errors) is evaluated on the
    second. Each of the two Clopper-Pearson limits has ``(1 - confidence) / 2``.
    """
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError("the epsilon lower bound needs at least two members and two non-members")
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(members), rng.permutation(nonmembers)
    pick_m, test_m = m[: len(m) // 2], m[len(m) // 2:]
    pick_n, test_n = n[: len(n) // 2], n[len(n) // 2:]
    alpha = (1 - confidence) / 2

    def limited(mem: np.ndarray, non: np.ndarray, threshold: float) -> tuple[float, float, float]:
        fp, fn = _error_counts(mem, non, threshold)
        fpr, fnr = clopper_pearson_upper(fp, len(non), alpha), clopper_pearson_upper(fn, len(mem), alpha)
        return _bound(fpr, fnr, delta), fpr, fnr

    candidates = np.unique(np.concatenate([pick_m, pick_n, [np.inf]]))
    threshold = max(candidates.tolist(), key=lambda t: limited(pick_m, pick_n, t)[0])
    bound, fpr, fnr = limited(test_m, test_n, threshold)
    return {"epsilon-lower-bound": bound, "confidence": confidence, "threshold": float(threshold),
            "fpr-upper": fpr, "fnr-upper": fnr, "evaluated-members": len(test_m),
            "evaluated-non-members": len(test_n)}


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> dict:
    """The attack's TPR with at most ``fpr`` of the non-members flagged (scores: higher = member), and
    the FPR reached. Descriptive: with a few hundred non-members a 1% FPR rests on a few users, so the
    comparison with the claim is :func:`epsilon_lower_bound`'s, which bounds both rates."""
    members, nonmembers = np.asarray(members, float), np.asarray(nonmembers, float)
    ordered = np.sort(nonmembers)[::-1]
    allowed = int(math.floor(fpr * len(ordered)))
    # flag scores above the (allowed + 1)-th largest non-member score: at most `allowed` non-members pass
    cut = ordered[allowed] if allowed < len(ordered) else -np.inf
    return {"fpr-target": fpr, "fpr": float((nonmembers > cut).sum() / len(nonmembers)),
            "tpr": float((members > cut).sum() / len(members))}
