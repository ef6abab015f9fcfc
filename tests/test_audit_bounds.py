"""The audit's TPR at low FPR and epsilon lower bound, checked against closed forms and by simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from common.errors import DataError
from simulations.audit import start_model_check
from simulations.audit_bounds import clopper_pearson_upper, epsilon_lower_bound, tpr_at_fpr


def test_clopper_pearson_limits_match_the_binomial_tail():
    # zero errors of n: the closed form 1 - alpha^(1/n); otherwise the limit p solves P(Bin(n, p) <= k) = alpha
    assert clopper_pearson_upper(0, 50, 0.025) == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-9)
    for errors, trials in ((3, 40), (17, 100), (99, 100)):
        upper = clopper_pearson_upper(errors, trials, 0.05)
        assert binom.cdf(errors, trials, upper) == pytest.approx(0.05, rel=1e-6)
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0


def test_a_perfect_attack_gives_the_bound_its_sample_size_allows():
    # Separated scores: no error on the evaluated halves (50 + 50), so both limits are 1 - 0.025^(1/50) and
    # epsilon >= log((1 - delta - a) / a) by hand
    members, nonmembers = np.arange(100, 200, dtype=float), np.arange(100, dtype=float)
    out = epsilon_lower_bound(members, nonmembers, 1e-5, seed=4)
    a = 1 - 0.025 ** (1 / 50)
    assert out["epsilon-lower-bound"] == pytest.approx(math.log((1 - 1e-5 - a) / a), rel=1e-9)
    assert (out["evaluated-members"], out["evaluated-non-members"]) == (50, 50)


def test_an_attack_that_knows_nothing_bounds_nothing_at_the_stated_confidence():
    # Scores independent of membership: the 95% bound must be 0 in at least 95% of draws
    rng = np.random.default_rng(0)
    bounds = [epsilon_lower_bound(rng.normal(size=200), rng.normal(size=100), 1e-5, seed=i)["epsilon-lower-bound"]
              for i in range(200)]
    assert np.mean(np.array(bounds) > 0) <= 0.05


def test_a_dp_attack_stays_below_its_epsilon():
    # Scores from the optimal test against epsilon-DP randomised response (P(flag | member) = e^eps / (1 + e^eps)):
    # its true rates sit exactly on the epsilon-1 boundary, so the 95% lower bound must fall short of 1
    rng = np.random.default_rng(1)
    p = math.exp(1.0) / (1 + math.exp(1.0))
    members = (rng.random(4000) < p).astype(float)
    nonmembers = (rng.random(4000) < 1 - p).astype(float)
    out = epsilon_lower_bound(members, nonmembers, 0.0, seed=2)
    assert 0.6 < out["epsilon-lower-bound"] < 1.0


def upper_by_hand(errors: int, trials: int, alpha: float) -> float:
    """The one-sided Clopper-Pearson limit by inverting the binomial tail: P(Bin(trials, p) <= errors) = alpha."""
    if errors >= trials:
        return 1.0
    return brentq(lambda p: binom.cdf(errors, trials, p) - alpha, 0.0, 1.0, xtol=1e-15, rtol=1e-13)


def held_out_halves(members: np.ndarray, nonmembers: np.ndarray, seed: int):
    """The split epsilon_lower_bound draws: members then non-members permuted by one seeded generator, first
    halves pick the threshold, second halves are evaluated."""
    rng = np.random.default_rng(seed)
    m, n = rng.permutation(members), rng.permutation(nonmembers)
    return m[: len(m) // 2], m[len(m) // 2:], n[: len(n) // 2], n[len(n) // 2:]


def test_a_low_threshold_attack_is_bounded_by_the_second_dp_inequality():
    # Only the inequality 1 - fpr <= e^eps * fnr + delta sees an attack that flags every member and most
    # non-members (no false negative, many false positives); an audit checking only 1 - fnr <= e^eps * fpr + delta
    # reported a fraction of this bound
    # Prepare: every member scores 1, 60 of 100 non-members score 1 too, the other 40 score 0
    members, nonmembers, delta, seed = np.ones(100), np.r_[np.zeros(40), np.ones(60)], 1e-5, 3
    _, test_m, _, test_n = held_out_halves(members, nonmembers, seed)
    fp, fn = int((test_n >= 1.0).sum()), int((test_m < 1.0).sum())
    fpr_up, fnr_up = upper_by_hand(fp, 50, 0.025), 1 - 0.025 ** (1 / 50)
    low_threshold, high_threshold = math.log((1 - delta - fpr_up) / fnr_up), math.log((1 - delta - fnr_up) / fpr_up)
    assert fn == 0 and 20 <= fp <= 40 and low_threshold > high_threshold + 0.5  # the asymmetry this test needs

    # Execute
    out = epsilon_lower_bound(members, nonmembers, delta, seed=seed)

    # Assert
    assert out["threshold"] == 1.0
    assert out["fpr-upper"] == pytest.approx(fpr_up, rel=1e-9)
    assert out["fnr-upper"] == pytest.approx(fnr_up, rel=1e-9)
    assert out["epsilon-lower-bound"] == pytest.approx(low_threshold, rel=1e-9)


def test_the_threshold_is_evaluated_on_the_held_out_halves_not_the_ones_that_chose_it():
    # An attack that separates the picking halves perfectly and knows nothing on the others: evaluating the chosen
    # threshold on the users that chose it would report the sample-size bound (about 2.6) for an attack worth 0
    # Prepare: scores placed by the seeded split itself (members high / non-members low on the picking halves;
    # the same 50 scores for both groups on the evaluated halves)
    seed, delta = 5, 1e-5
    rng = np.random.default_rng(seed)
    order_m, order_n = rng.permutation(100), rng.permutation(100)
    shared = 50.0 + 2 * np.arange(50)
    members, nonmembers = np.empty(100), np.empty(100)
    members[order_m[:50]], members[order_m[50:]] = 100.0 + np.arange(50), shared
    nonmembers[order_n[:50]], nonmembers[order_n[50:]] = np.arange(50.0), shared
    pick_m, test_m, pick_n, test_n = held_out_halves(members, nonmembers, seed)
    assert pick_m.min() >= 100 and pick_n.max() < 50  # the picking halves do separate
    assert sorted(test_m) == sorted(test_n) == sorted(shared)

    # Execute
    out = epsilon_lower_bound(members, nonmembers, delta, seed=seed)

    # Assert: the only threshold with no error on the picking halves, and its rates on the evaluated halves
    assert out["threshold"] == 100.0
    fp, fn = int((test_n >= out["threshold"]).sum()), int((test_m < out["threshold"]).sum())
    assert (fp, fn) == (25, 25)
    fpr_up, fnr_up = upper_by_hand(fp, 50, 0.025), upper_by_hand(fn, 50, 0.025)
    assert out["fpr-upper"] == pytest.approx(fpr_up, rel=1e-9)
    assert out["fnr-upper"] == pytest.approx(fnr_up, rel=1e-9)
    assert max(0.0, math.log((1 - delta - fnr_up) / fpr_up), math.log((1 - delta - fpr_up) / fnr_up)) == 0.0
    assert out["epsilon-lower-bound"] == 0.0


def test_tpr_at_fpr_by_hand():
    nonmembers = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    members = np.array([0.95, 0.85, 0.5, 0.05])
    assert tpr_at_fpr(members, nonmembers, 0.1) == {"fpr-target": 0.1, "fpr": 0.1, "tpr": 0.25}  # above 0.9
    assert tpr_at_fpr(members, nonmembers, 0.05) == {"fpr-target": 0.05, "fpr": 0.0, "tpr": 0.0}  # above 1.0
    assert tpr_at_fpr(members, nonmembers, 0.3)["tpr"] == 0.5  # above 0.7


def test_a_run_started_from_a_model_that_trained_on_its_holdout_is_not_audited(tmp_path):
    # A review: a DP run (epsilon 1) started from a non-DP model whose run had trained on 60 of its 90 held-out
    # users read AUC 0.67 and an epsilon bound of 2 as this run's leak
    start = tmp_path / "start"
    start.mkdir()
    (start / "config.json").write_text(json.dumps({"dataset": "synthetic"}))
    (start / "holdout.json").write_text(json.dumps({"user-ids": [1, 2, 3]}))
    cfg = {"dataset": "synthetic", "init-model": str(start / "model.pt")}
    with pytest.raises(DataError, match=r"2 of its 4 held-out users were trained on by its init-model"):
        start_model_check(tmp_path, cfg, {1, 2, 8, 9})
    assert start_model_check(tmp_path, cfg, {1, 3})["note"].startswith("every run in its chain")
    (start / "holdout.json").unlink()
    with pytest.raises(DataError, match="whose training users are unknown"):
        start_model_check(tmp_path, cfg, {1, 3})
    (start / "config.json").write_text(json.dumps({"dataset": "/data/other"}))
    assert "another data set" in start_model_check(tmp_path, cfg, {1, 3})["note"]
    assert start_model_check(tmp_path, {"dataset": "synthetic"}, {1}) is None


def test_the_start_model_check_follows_chains_and_paths(tmp_path, monkeypatch):
    # A review: a start run given the same file by another path read as "another data set", and a start run
    # that had itself started from a model trained on everyone passed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ml.csv").write_text("")
    runs = {name: tmp_path / name for name in ("a0", "b", "c")}
    for path in runs.values():
        path.mkdir()
    (runs["a0"] / "config.json").write_text(json.dumps({"dataset": "ml.csv"}))
    (runs["a0"] / "holdout.json").write_text(json.dumps({"user-ids": []}))  # trained on every user
    (runs["b"] / "config.json").write_text(json.dumps({"dataset": str(tmp_path / "ml.csv"),
                                                       "init-model": str(runs["a0"])}))
    (runs["b"] / "holdout.json").write_text(json.dumps({"user-ids": [1, 2, 3]}))
    this = {"dataset": str(tmp_path / "ml.csv"), "init-model": str(runs["b"] / "model.pt")}
    with pytest.raises(DataError, match=r"3 of its 3 held-out users were trained on by its init-model .*a0"):
        start_model_check(runs["c"], this, {1, 2, 3})
    with pytest.raises(DataError, match="2 of its 2 held-out users"):  # the same file by another path
        start_model_check(runs["c"], {"dataset": str(tmp_path / "ml.csv"), "init-model": str(runs["a0"])}, {1, 2})


def test_the_audit_refuses_a_model_copied_from_another_run():
    # An MF model without DP copied into a SASRec run's folder was audited as SASRec at epsilon 8 (a review)
    from pathlib import Path

    from common.errors import DataError
    from simulations.audit import _refuse_another_runs_model

    run = {"model": "sasrec", "dp": True, "target-epsilon": 8.0, "seed": 1, "num-server-rounds": 5}
    _refuse_another_runs_model(Path("r"), dict(run), run)  # its own model
    _refuse_another_runs_model(Path("r"), {"model": "sasrec"}, run)  # a key the file does not record: no claim
    with pytest.raises(DataError, match=r"model.pt is not this run's model: its model is 'mf', config.json's 'sasrec'"):
        _refuse_another_runs_model(Path("r"), {**run, "model": "mf", "dp": False}, run)
