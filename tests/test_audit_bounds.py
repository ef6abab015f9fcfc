"""The audit's TPR at low FPR and epsilon lower bound, checked against closed forms and by simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
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
