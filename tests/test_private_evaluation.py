"""Noised evaluation sums (evaluation-noise-multiplier): what leaves, how much noise, what it costs.

The spend is checked against computations that share no code with ours: Google's dp_accounting
(RDP) for training + evaluation, the closed-form Renyi DP of the Gaussian mechanism, and the exact
(epsilon, delta) curve of the Gaussian mechanism (Balle & Wang 2018) for the PRV accountant.
"""

from __future__ import annotations

import json
import math
import sqlite3
import warnings

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from client.app import make_client_app
from client.privacy_budget import PartnerBudget
from client.privacy_ledger import PrivacyLedger
from common.config import resolve_config
from common.errors import ConfigError, PrivacyError
from common.privacy import epsilon_of
from common.private_evaluation import clamp_noised_sums, evaluation_mechanism, noised_evaluation_sums, planned_evaluations
from common.task import new_model, partner_data
from tests.conftest import flower_message
from tests.test_client_training import NODE, TINY

SUMS = {"hit@10-sum": 30.0, "ndcg@10-sum": 12.5, "hit@10-sqsum": 30.0, "ndcg@10-sqsum": 4.0, "hit@5-sum": 20.0,
        "ndcg@5-sum": 9.0, "pop@10-sum": 55.0, "rec-items@10": [1, 2, 3], "num-users": 200.0}


def _dp_accounting_epsilon(training: list[tuple[float, float, int]], evaluations: list[float], delta: float) -> float:
    """Google's RDP accountant over Poisson-sampled DP-SGD steps plus unsampled Gaussian releases."""
    acc = rdp.RdpAccountant()
    for sigma, q, steps in training:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    for sigma in evaluations:
        acc.compose(dp_event.GaussianDpEvent(sigma))
    return acc.get_epsilon(delta)


def test_a_noised_reply_carries_only_the_top_k_sums_and_the_count():
    out = noised_evaluation_sums(SUMS, 2.0, 10)
    assert set(out) == {"hit@10-sum", "ndcg@10-sum", "num-users"}
    assert out["num-users"] == 200.0
    assert out["hit@10-sum"] != SUMS["hit@10-sum"] and out["ndcg@10-sum"] != SUMS["ndcg@10-sum"]


@pytest.mark.parametrize("seeded", [True, False])
def test_the_noise_has_std_sigma_times_sqrt_2(seeded):
    # Prepare: 3000 replies of the same sums at noise multiplier 2 (std 2 sqrt 2 = 2.83 per sum)
    draws = np.array([[noised_evaluation_sums(SUMS, 2.0, 10, seed=i if seeded else None)[k] - SUMS[k]
                       for k in ("hit@10-sum", "ndcg@10-sum")] for i in range(3000)])
    # Assert: mean 0, std 2.83 (5% tolerance is about 4 standard errors of a std over 3000 draws)
    assert np.abs(draws.mean(axis=0)).max() < 0.2
    assert draws.std(axis=0) == pytest.approx([2.0 * math.sqrt(2.0)] * 2, rel=0.05)
    assert abs(np.corrcoef(draws.T)[0, 1]) < 0.1  # the two sums get independent noise


def test_noise_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        noised_evaluation_sums(SUMS, 0.0, 10)


def test_combined_sums_are_kept_within_zero_and_the_user_count():
    assert clamp_noised_sums({"hit@10-sum": -3.0, "ndcg@10-sum": 250.0, "num-users": 200.0}) == {
        "hit@10-sum": 0.0, "ndcg@10-sum": 200.0, "num-users": 200.0}


@pytest.mark.parametrize("sigma,count", [(5.0, 5), (10.0, 3), (3.0, 1)])
def test_rdp_of_evaluations_is_the_gaussian_mechanisms_closed_form(sigma, count):
    # Renyi DP of `count` Gaussian releases at noise multiplier sigma: count * alpha / (2 sigma^2) at
    # every order alpha, turned into epsilon by the conversion Opacus uses (Balle et al. 2020, Thm 21)
    from opacus.accountants import RDPAccountant

    delta = 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp_curve = count * alphas / (2 * sigma**2)
    expected = np.min(rdp_curve + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1))
    assert epsilon_of([evaluation_mechanism(sigma)] * count, delta, "rdp") == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("sigma,count", [(5.0, 5), (3.0, 1)])
def test_prv_of_evaluations_is_the_exact_gaussian_curve(sigma, count):
    # `count` Gaussian releases at sigma = one at sigma / sqrt(count); its exact delta(epsilon) (Balle & Wang 2018)
    s, delta = sigma / math.sqrt(count), 1e-5
    exact = brentq(lambda e: norm.cdf(-e * s + 1 / (2 * s)) - math.exp(e) * norm.cdf(-e * s - 1 / (2 * s)) - delta,
                   0.0, 50.0)
    with warnings.catch_warnings():  # Opacus' PRV takes log(1 - q) = log(0) at q = 1 (harmless: -inf)
        warnings.simplefilter("ignore")
        prv = epsilon_of([evaluation_mechanism(sigma)] * count, delta, "prv")
    assert exact <= prv + 1e-6 and prv == pytest.approx(exact, abs=0.02)  # PRV's own error bound is 0.01


def test_planned_evaluations_follow_the_schedule():
    cfg = resolve_config(None, {"num-server-rounds": 5, "evaluation-noise-multiplier": 4.0})
    assert planned_evaluations(cfg) == 5
    assert planned_evaluations({**cfg, "evaluate-every": 2}) == 3  # rounds 2, 4 and the last, 5
    assert planned_evaluations({**cfg, "evaluate-every": 2}, through=3) == 1
    assert planned_evaluations({**cfg, "fraction-evaluate": 0.0}) == 0
    assert planned_evaluations({**cfg, "evaluation-noise-multiplier": 0.0}) == 0


def test_the_knob_needs_local_dp_and_a_number_at_least_zero():
    with pytest.raises(ConfigError, match="evaluation-noise-multiplier = 2.0 needs dp-mode"):
        resolve_config(None, {"evaluation-noise-multiplier": 2.0, "dp-mode": "central"})
    with pytest.raises(ConfigError, match="evaluation-noise-multiplier"):
        resolve_config(None, {"evaluation-noise-multiplier": 2.0, "dp": False})
    with pytest.raises(ConfigError, match="evaluation-noise-multiplier = -1.0 must be a number >= 0"):
        resolve_config(None, {"evaluation-noise-multiplier": -1.0})


def _budget(tmp_path, run_config: dict):
    cfg = resolve_config(None, {**TINY, "run-dir": str(tmp_path), **run_config})
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    return cfg, context, PartnerBudget.open(cfg, context, partner_data(cfg, NODE), "r")


def test_training_noise_is_calibrated_for_the_planned_evaluations_too(tmp_path):
    # Prepare: the same partner and run, with and without 3 noised evaluations at sigma 3
    _, _, plain = _budget(tmp_path / "plain", {"num-server-rounds": 3})
    cfg, context, noised = _budget(tmp_path / "noised", {"num-server-rounds": 3, "evaluation-noise-multiplier": 3.0})
    plain.close()
    cal = noised.calibration
    # Execute: the run as planned, training then evaluation each round
    for r in (1, 2, 3):
        noised.check_next_round()
        noised.record(context, r, [cal.round_mechanism()])
        noised.check_next_evaluation()
        eps = noised.record_evaluation(context, r)
    # Assert: more training noise than without evaluations; the whole run ends at the target, and the
    # ledger's epsilon is dp_accounting's for 3 rounds of DP-SGD plus 3 Gaussian releases
    assert cal.noise_multiplier > plain.calibration.noise_multiplier
    assert (cal.evaluation_noise, cal.planned_evaluations) == (3.0, 3)
    expected = _dp_accounting_epsilon([(cal.noise_multiplier, cal.sample_rate, cal.steps_per_round)] * 3, [3.0] * 3,
                                      noised.delta)
    assert eps == pytest.approx(expected, rel=0.01)
    assert eps == pytest.approx(cfg["target-epsilon"], rel=0.01) and eps <= cfg["target-epsilon"] + 1e-9
    # A fourth evaluation would pass the target: refused, and nothing recorded
    with pytest.raises(PrivacyError, match="budget exhausted: .*one more noised evaluation"):
        noised.check_next_evaluation()
    assert (noised.ledger.rounds_trained(), noised.ledger.evaluations_recorded(), noised.ledger.total_steps()) == (
        3, 3, 3 * cal.steps_per_round)
    noised.close()


def test_a_changed_evaluation_noise_mid_run_is_refused(tmp_path):
    cfg, _, budget = _budget(tmp_path, {"evaluation-noise-multiplier": 3.0})
    budget.close()
    with pytest.raises(PrivacyError, match="evaluation-noise-multiplier changed mid-run"):
        _budget(tmp_path, {"evaluation-noise-multiplier": 4.0})


def _evaluate_once(tmp_path, run: dict, node: dict | None = None, context: Context | None = None):
    overrides = {**TINY, "run-dir": str(tmp_path), **run}
    cfg = resolve_config(None, overrides)
    context = context or Context(run_id=1, node_id=1, node_config={**NODE, **(node or {})}, state=RecordDict(),
                                 run_config={})
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
    config = ConfigRecord({"server-round": 1, "run-name": "evalrun"})
    return make_client_app(overrides)(flower_message(RecordDict({"arrays": arrays, "config": config}), "evaluate"),
                                      context)


def test_a_partner_spends_and_reports_a_noised_evaluation(tmp_path):
    # Execute: one evaluation message to a fresh partner, sums noised at sigma 4
    reply = _evaluate_once(tmp_path, {"evaluation-noise-multiplier": 4.0})
    # Assert: only the top-K sums and counts left, with the ledger's numbers; the ledger has one
    # evaluation row, and the reported epsilon is dp_accounting's for one Gaussian release
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    sums = {k for k in metrics if k.endswith(("-sum", "-sqsum")) or k.startswith("rec-items")}
    assert sums == {"hit@10-sum", "ndcg@10-sum"}
    assert metrics["ledger-evaluations"] == 1 and metrics["ledger-steps"] == 0
    assert metrics["epsilon"] == pytest.approx(_dp_accounting_epsilon([], [4.0], metrics["delta"]), rel=0.01)
    assert reply.content["privacy"]["run"] == "evalrun"
    ledger = tmp_path / "evalrun" / "ledgers" / "partner-0.sqlite"
    rows = sqlite3.connect(ledger).execute("SELECT kind, noise_multiplier, sample_rate, steps FROM batches").fetchall()
    assert rows == [("evaluate", 4.0, 1.0, 1)]
    # Without the knob the same partner sends its sums in clear and spends nothing
    clear = _evaluate_once(tmp_path / "clear", {})
    assert "ndcg@20-sum" in clear.content["metrics"] and "epsilon" not in clear.content["metrics"]
    assert not (tmp_path / "clear" / "evalrun").exists()


def test_a_partner_with_its_budget_spent_refuses_to_evaluate(tmp_path):
    # Prepare: the run's planned evaluation (1 round) already spent, so one more passes the target
    overrides = {"num-server-rounds": 1, "evaluation-noise-multiplier": 4.0}
    first = _evaluate_once(tmp_path, overrides)
    assert not first.has_error()
    # Execute / Assert: with the training round on the ledger too, the next evaluation would pass the target
    cfg = resolve_config(None, {**TINY, "run-dir": str(tmp_path), **overrides})
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    budget = PartnerBudget.open(cfg, context, partner_data(cfg, NODE), "evalrun")
    budget.record(context, 1, [budget.calibration.round_mechanism()])
    budget.close()
    again = _evaluate_once(tmp_path, overrides)
    assert again.has_error() and again.error.reason.startswith("budget exhausted: epsilon ")
    ledger = tmp_path / "evalrun" / "ledgers" / "partner-0.sqlite"
    kinds = sqlite3.connect(ledger).execute("SELECT kind FROM batches ORDER BY id").fetchall()
    assert kinds == [("evaluate",), ("train",)]  # the refused evaluation recorded nothing


def test_a_schema_1_ledger_is_upgraded_and_keeps_its_spend(tmp_path):
    # Prepare: a ledger as written before noised evaluations existed (schema 1), with two rounds of spend
    path = tmp_path / "ledger.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE calibrations (run TEXT PRIMARY KEY, noise_multiplier REAL NOT NULL, target_epsilon REAL NOT NULL,
            target_delta REAL NOT NULL, accountant TEXT NOT NULL, sample_rate REAL NOT NULL,
            steps_per_round INTEGER NOT NULL, planned_rounds INTEGER NOT NULL, recorded REAL NOT NULL);
        CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, server_round INTEGER NOT NULL,
            noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL, accountant TEXT NOT NULL,
            fingerprint TEXT NOT NULL, recorded REAL NOT NULL);
        INSERT INTO meta VALUES ('schema-version', '1'), ('fingerprint', 'fp'), ('created', '0');
        INSERT INTO calibrations VALUES ('old', 1.2, 8.0, 1e-5, 'rdp', 0.25, 4, 2, 0);
        INSERT INTO batches VALUES (NULL, 'old', 1, 1.2, 0.25, 4, 'rdp', 'fp', 1.0), (NULL, 'old', 2, 1.2, 0.25, 4, 'rdp', 'fp', 2.0);
    """)
    conn.close()
    # Execute
    with PrivacyLedger(path, "fp") as ledger:
        cal = ledger.calibration("old")
        history, rounds, steps = ledger.history(), ledger.rounds_trained(), ledger.total_steps()
        ledger.record(run="new", server_round=1, mechanisms=[evaluation_mechanism(5.0)], accountant="rdp",
                      kind="evaluate")
        evaluations = ledger.evaluations_recorded()
    # Assert: the old spend is intact and counted as training; the new evaluation is on the ledger
    assert history == [(1.2, 0.25, 4), (1.2, 0.25, 4)] and (rounds, steps, evaluations) == (2, 8, 1)
    assert (cal.evaluation_noise, cal.planned_evaluations, cal.planned_rounds) == (0.0, 0, 2)
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema-version'").fetchone() == ("3",)


def test_a_partner_evaluated_before_it_trained_remembers_its_ledger(tmp_path):
    # Its node state says it wrote to the ledger, so a ledger deleted with its marker is missing, not new
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    assert not _evaluate_once(tmp_path, {"evaluation-noise-multiplier": 4.0}, context=context).has_error()
    ledger = tmp_path / "evalrun" / "ledgers" / "partner-0.sqlite"
    ledger.unlink()
    ledger.with_name(ledger.name + ".created").unlink()
    again = _evaluate_once(tmp_path, {"evaluation-noise-multiplier": 4.0}, context=context)
    assert again.has_error() and "is missing" in again.error.reason and not ledger.exists()


def test_a_partners_floor_holds_when_evaluation_calibrates_the_run(tmp_path):
    # The first message of the run is an evaluation: the ledger's calibration must already obey max-epsilon
    reply = _evaluate_once(tmp_path, {"evaluation-noise-multiplier": 4.0}, {"max-epsilon": 2.0})
    assert not reply.has_error(), reply.error
    assert reply.content["metrics"]["target-epsilon"] == 2.0


def test_an_older_evaluation_reply_never_lowers_the_recorded_spend(tmp_path):
    from flwr.app import Message, MetricRecord

    from server.privacy_report import PrivacyReport
    from simulations.local_grid import LocalGrid

    LocalGrid([])  # sets the task identity Flower's Message needs outside its runtimes
    report = PrivacyReport(tmp_path, resolve_config(None, {"evaluation-noise-multiplier": 3.0}))

    def reply(epsilon: float, evaluations: int) -> Message:
        content = RecordDict({"metrics": MetricRecord({"epsilon": epsilon, "delta": 1e-5, "ledger-evaluations": evaluations,
                                                       "num-examples": 7}),
                              "privacy": ConfigRecord({"partner": "partner-0"})})
        return Message(content, dst_node_id=5, message_type="evaluate")

    report.note_evaluation(2, [reply(5.0, 2)])
    report.note_evaluation(1, [reply(4.0, 1)])  # round 1's reply, late
    entry = report.partners["partner-0"]
    assert (entry["epsilon"], entry["ledger-evaluations"], entry["rounds-evaluated"]) == (5.0, 2, [2, 1])
    report.note_evaluation(3, [reply(6.0, 3)])
    assert report.partners["partner-0"]["epsilon"] == 6.0


def _replies(values: list[tuple[dict, float]]):
    from flwr.app import Message, MessageType, MetricRecord

    from simulations.local_grid import LocalGrid

    LocalGrid([])
    out = []
    for node, (metrics, epsilon) in enumerate(values, start=101):
        ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
        body = RecordDict({"metrics": MetricRecord({**metrics, "epsilon": epsilon, "delta": 1e-5}),
                           "privacy": ConfigRecord({"partner": f"partner-{node}"})})
        out.append(Message(body, reply_to=ins))
    return out


def test_a_rejected_noised_evaluation_reply_still_counts_and_own_log_partners_mix_with_simulated(tmp_path):
    # A review: a deployed partner (no partition-id) beside simulated ones was rejected every round for its
    # key set, and a rejected noised reply, which spent budget, never reached privacy.json
    from server.privacy_report import PrivacyReport
    from server.run_report import RunRecorder
    from server.strategy_factory import build_strategy
    from server.central_dp import with_privacy

    cfg = resolve_config(None, {"evaluation-noise-multiplier": 3.0, "min-nodes": 2})
    report = PrivacyReport(tmp_path, cfg)
    recorder = RunRecorder(tmp_path, cfg, np.array([str(i) for i in range(20)]))
    strategy = build_strategy(cfg, evaluate_metrics_aggr_fn=recorder.aggregate_evaluate_metrics,
                              wrap_aggregation=lambda inner: with_privacy(inner, cfg, report),
                              on_rejected_evaluation=lambda r, m: report.note_evaluation(r, [m]))
    sums = {"hit@10-sum": 5.0, "ndcg@10-sum": 2.0, "num-users": 50.0, "num-examples": 50}
    replies = _replies([({**sums, "partition-id": 0}, 3.0), ({**sums, "partition-id": 1}, 3.0), (sums, 7.9),
                        ({**sums, "hit@10-sum": float("nan")}, 6.5)])
    metrics = strategy.inner.aggregate_evaluate(1, replies)
    assert metrics["num-users"] == 150.0  # the own-log partner is combined, the NaN one is not
    assert {p: e["epsilon"] for p, e in report.partners.items()} == {
        "partner-101": 3.0, "partner-102": 3.0, "partner-103": 7.9, "partner-104": 6.5}
    assert report.partners["partner-104"]["rounds-evaluated"] == [1]
    assert metrics["epsilon"] == 7.9


@pytest.mark.slow
def test_a_simulation_with_noised_evaluation_reports_the_whole_spend(tmp_path):
    from tests.flower_processes import run_to_end, start

    # Execute: 3 partners, 2 rounds, each round trained and evaluated with noise 3
    overrides = {**{k: v for k, v in TINY.items() if k != "min-nodes"}, "num-server-rounds": 2, "min-nodes": 2,
                 "run-dir": str(tmp_path / "runs"), "run-name": "noised", "evaluation-noise-multiplier": 3.0}
    run_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    log = tmp_path / "simulation.log"
    (tmp_path / "runs" / "noised").mkdir(parents=True)  # taken: the run is "noised-2", which evaluation must name too
    run_to_end(start("simulations.run", run_config, log, "--num-partners", "3"), log)
    run_dir = tmp_path / "runs" / "noised-2"

    # Assert: each partner's epsilon is dp_accounting's for 2 DP-SGD rounds + 2 Gaussian releases
    report = json.loads((run_dir / "privacy.json").read_text())
    worst = []
    for p in report["partners"].values():
        steps = int(p["ledger-steps"]) // 2
        assert p["ledger-evaluations"] == 2 and p["rounds-evaluated"] == [1, 2]
        for r in (1, 2):
            worst.append((r, _dp_accounting_epsilon([(p["noise-multiplier"], p["sample-rate"], steps)] * r, [3.0] * r,
                                                    p["delta"])))
        assert p["epsilon"] == pytest.approx(worst[-1][1], rel=0.01)
    assert report["local"]["evaluation-noise-multiplier"] == 3.0 and "noised evaluation sums" in report["guarantee"]
    # metrics.jsonl: each round's epsilon includes that round's evaluation; only top-K numbers were combined
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in rounds:
        assert line["epsilon"] == pytest.approx(max(e for r, e in worst if r == line["round"]), rel=0.01)
        assert 0 <= line["hr@10"] <= 1 and 0 <= line["ndcg@10"] <= 1
        assert line["ndcg@10-noise-se"] == pytest.approx(3.0 * math.sqrt(2) * math.sqrt(3) / line["eval-users"])
        assert "ndcg@10-se" not in line  # the users' spread is unknown under noise
        assert "ndcg@20" not in line and "coverage@10" not in line and "popularity@10" not in line
    assert "noised for DP" in (run_dir / "summary.md").read_text()


def test_the_epsilon_plan_spends_the_planned_evaluations():
    from simulations.epsilon_plan import plan

    cfg = resolve_config(None, {**TINY, "num-server-rounds": 3, "evaluation-noise-multiplier": 3.0})
    (row,) = plan(cfg, 1, [3])
    expected = _dp_accounting_epsilon([(row["noise-multiplier"], row["sample-rate"], row["steps-per-round"])] * 3,
                                      [3.0] * 3, row["delta"])
    assert row["evaluations"] == 3 and row["eps-rdp@3"] == pytest.approx(expected, rel=0.01)
    # every other round evaluated: rounds 2 and 3 (the last); after round 1 no evaluation has been spent
    cfg2 = {**cfg, "evaluate-every": 2}
    (row,) = plan(cfg2, 1, [1, 3])
    training = (row["noise-multiplier"], row["sample-rate"], row["steps-per-round"])
    assert row["eps-rdp@1"] == pytest.approx(_dp_accounting_epsilon([training], [], row["delta"]), rel=0.01)
    assert row["eps-rdp@3"] == pytest.approx(_dp_accounting_epsilon([training] * 3, [3.0] * 2, row["delta"]), rel=0.01)
    assert row["eps-rdp@3"] == pytest.approx(cfg["target-epsilon"], rel=0.01)


def test_server_check_says_how_evaluation_sums_travel(tmp_path, capsys):
    from server.cli import main as server_main

    base = f'run-dir="{tmp_path}" synthetic-users=60 synthetic-items=20'
    assert server_main(["check", "--run-config", f"{base} evaluation-noise-multiplier=2.0 evaluate-every=2"]) == 0
    assert "noised (evaluation-noise-multiplier 2), 3 evaluations planned" in capsys.readouterr().out
    assert server_main(["check", "--run-config", base]) == 0
    assert "sums and their exact number of evaluated users in clear, outside the DP guarantee" in capsys.readouterr().out
    assert server_main(["check", "--run-config", f'{base} evaluation-noise-multiplier=2.0 dp-mode="central"']) == 2
    assert "needs dp-mode" in capsys.readouterr().err


def test_evaluations_that_alone_spend_the_budget_are_refused_in_one_line(tmp_path, capsys):
    # A review: a fresh ledger read "budget exhausted: epsilon 61.868 of 8 already spent"
    from common.private_evaluation import refuse_unaffordable_evaluations
    from server.cli import main as server_main
    from simulations.epsilon_plan import main as plan_main

    cfg = resolve_config(None, {"evaluation-noise-multiplier": 0.3, "num-server-rounds": 5})
    with pytest.raises(ConfigError, match="5 planned noised evaluations at evaluation-noise-multiplier 0.3 alone reach"):
        refuse_unaffordable_evaluations(cfg, 1e-5)
    refuse_unaffordable_evaluations({**cfg, "evaluation-noise-multiplier": 5.0}, 1e-5)  # affordable: no error
    assert plan_main(["--num-partners", "1", "--rounds", "5", "--run-config",
                      "evaluation-noise-multiplier=0.3 synthetic-users=200 synthetic-items=40"]) == 2
    assert "alone reach" in capsys.readouterr().err
    base = f'run-dir="{tmp_path}" synthetic-users=60 synthetic-items=20'
    assert server_main(["check", "--run-config", f"{base} evaluation-noise-multiplier=0.3"]) == 2
    assert "raise evaluation-noise-multiplier or evaluate-every" in capsys.readouterr().err
    reply = _evaluate_once(tmp_path, {"evaluation-noise-multiplier": 0.3})
    assert reply.has_error() and "alone reach" in reply.error.reason


def test_a_spent_ledger_is_told_its_real_spend_and_what_the_evaluations_add(tmp_path):
    # A deployment review: "budget exhausted: epsilon 8.311 of 8 already spent" while the ledger held 7.998
    # (the new run's planned evaluations were counted as spent)
    from common.privacy import stated_epsilon

    cfg, context, budget = _budget(tmp_path, {"num-server-rounds": 2, "evaluation-noise-multiplier": 3.0})
    for r in (1, 2):
        budget.record(context, r, [budget.calibration.round_mechanism()])
        budget.record_evaluation(context, r)
    spent = budget.spent()
    budget.close()
    cfg2 = resolve_config(None, {**TINY, "run-dir": str(tmp_path), "num-server-rounds": 2,
                                 "evaluation-noise-multiplier": 3.0, "ledger-dir": str(tmp_path / "r" / "ledgers")})
    with pytest.raises(PrivacyError, match=f"epsilon {stated_epsilon(spent)} of 8 already spent, and the 2 noised evaluations"):
        PartnerBudget.open(cfg2, context, partner_data(cfg2, NODE), "second-run")


def test_an_evaluation_refusal_is_logged_and_listed(tmp_path, caplog):
    # A deployment review: a partner refusing evaluation (share-evaluation) showed only as Flower's INFO line
    from flwr.app import Error, Message, MessageType

    from server.privacy_report import PrivacyReport
    from simulations.local_grid import LocalGrid

    LocalGrid([])
    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    ins = Message(RecordDict(), dst_node_id=7, message_type=MessageType.EVALUATE)
    refusal = Message(Error(code=400, reason="this partner sends no evaluation metrics"), reply_to=ins)
    report.note_evaluation(3, [refusal])
    assert report.partners["node-7"]["refused-evaluation"] == [
        {"round": 3, "reason": "this partner sends no evaluation metrics"}]
    assert json.loads((tmp_path / "privacy.json").read_text())["partners"]["node-7"]["refused-evaluation"]


def test_summary_of_a_run_where_nobody_trained_names_no_data(tmp_path):
    import torch
    from flwr.app import ArrayRecord

    from server.run_report import RunRecorder

    recorder = RunRecorder(tmp_path, {"dataset": "synthetic", "model": "sasrec", "dp": True}, np.array(["a"] * 5))
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))  # every partner refused
    text = recorder.write_summary(guarantee="No partner completed a DP-SGD round.").read_text()
    assert "- data: none: no partner trained" in text and "or every partner refused" in text


def test_a_ledger_spent_before_the_run_gets_no_advice_about_evaluations(tmp_path):
    cfg, context, budget = _budget(tmp_path, {"num-server-rounds": 2, "evaluation-noise-multiplier": 3.0})
    for r in range(1, 6):  # more than planned: past the target before the next run
        budget.record(context, r, [budget.calibration.round_mechanism()])
    spent = budget.spent()
    budget.close()
    cfg2 = resolve_config(None, {**TINY, "run-dir": str(tmp_path), "num-server-rounds": 2,
                                 "evaluation-noise-multiplier": 3.0, "ledger-dir": str(tmp_path / "r" / "ledgers")})
    with pytest.raises(PrivacyError, match="already spent") as err:
        PartnerBudget.open(cfg2, context, partner_data(cfg2, NODE), "second-run")
    assert "evaluation-noise-multiplier" not in str(err.value)
    # the number is the ledger's spend, not with the planned evaluations counted in: the coordinator's report
    # takes it as the partner's epsilon (a review: 10.279 stated for a ledger at 9.999)
    assert f"budget exhausted: epsilon {spent:.3f} of 8 already spent" in str(err.value)


def test_an_evaluation_reply_keeps_the_training_count_and_combined_sums_stay_in_range(tmp_path):
    # Mutation audit: privacy.json showed the evaluated users as num-examples; unclamped noised sums gave HR < 0
    from flwr.app import Message, MessageType, MetricRecord

    from server.privacy_report import PrivacyReport
    from server.run_report import RunRecorder
    from simulations.local_grid import LocalGrid

    LocalGrid([])
    cfg = resolve_config(None, {"evaluation-noise-multiplier": 2.0})
    report = PrivacyReport(tmp_path, cfg)

    def reply(kind: str, metrics: dict) -> Message:
        ins = Message(RecordDict(), dst_node_id=9, message_type=kind)
        body = RecordDict({"metrics": MetricRecord({"epsilon": 3.0, "delta": 1e-5, **metrics}),
                           "privacy": ConfigRecord({"partner": "partner-9"})})
        return Message(body, reply_to=ins)

    report.screen(1, [reply(MessageType.TRAIN, {"num-examples": 120})])
    report.note_evaluation(1, [reply(MessageType.EVALUATE, {"num-examples": 80, "num-users": 80.0})])
    assert report.partners["partner-9"]["num-examples"] == 120

    (tmp_path / "run").mkdir()
    recorder = RunRecorder(tmp_path / "run", cfg, np.array([str(i) for i in range(10)]))
    records = [RecordDict({"m": MetricRecord({"hit@10-sum": -5.0, "ndcg@10-sum": 14.0, "num-users": 10.0,
                                              "epsilon": 3.5, "delta": 1e-5})}) for _ in range(3)]
    out = recorder.aggregate_evaluate_metrics(records, "num-examples")
    assert out["hr@10"] == 0.0 and out["ndcg@10"] == 1.0  # -15 and 42 of 30 users, clamped to [0, 30]
    # the noise's standard error on a combined mean: sigma sqrt 2 sqrt(partners) / users
    assert out["ndcg@10-noise-se"] == pytest.approx(2.0 * math.sqrt(2) * math.sqrt(3) / 30.0)
    # the round's epsilon is the evaluation's when it came after training
    import torch
    from flwr.app import ArrayRecord

    recorder.aggregate_train_metrics([RecordDict({"m": MetricRecord({"num-examples": 5, "train-loss": 1.0,
                                                                     "epsilon": 3.0, "delta": 1e-5})})], "num-examples")
    recorder.aggregate_evaluate_metrics(records, "num-examples")
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    assert recorder.rounds[-1]["epsilon"] == 3.5


def test_the_evaluation_delta_counts_users_too_short_to_train(tmp_path):
    # Mutation audit: noised sums cover all 60 users, 40 of them trainable; delta 0.02 >= 1/60 is meaningless
    from common.data.sequences import SequenceData

    seqs = [np.arange(1, 9) for _ in range(40)] + [np.arange(1, 4) for _ in range(20)]
    data = SequenceData(catalogue=np.array([str(i) for i in range(20)]), user_ids=np.array([str(u) for u in range(60)]),
                        sequences=seqs, timestamps=[np.arange(len(s)) for s in seqs])
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    base = {"batch-size": 10, "target-delta": 0.02, "ledger-dir": str(tmp_path / "l")}
    with pytest.raises(PrivacyError, match="target-delta"):
        PartnerBudget.open(resolve_config(None, {**base, "evaluation-noise-multiplier": 3.0}), context, data, "r1")
    PartnerBudget.open(resolve_config(None, base), context, data, "r2").close()  # without noised sums: 1/40 counts
