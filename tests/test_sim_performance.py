"""Simulation cost knobs (evaluate-every, fraction-evaluate), per-process noise calibration and
the federation benchmark's helpers and centralised reference run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from common.config import resolve_config
from common.errors import ConfigError
from common.evaluation import evaluates_round
from server.rounds import RoundControl
from server.strategy_factory import build_strategy, unwrap
from simulations.bench.federation import run_config_args, steady, table


def test_evaluation_schedule_every_nth_round_and_always_the_last():
    assert [r for r in range(1, 11) if evaluates_round(r, 3, 10)] == [3, 6, 9, 10]
    assert [r for r in range(1, 5) if evaluates_round(r, 1, 4)] == [1, 2, 3, 4]
    assert [r for r in range(1, 6) if evaluates_round(r, 10, 5)] == [5]


class RecordingInner:
    """Stands in for the validating/aggregating strategies: records what reaches it."""

    def __init__(self) -> None:
        self.configured: list[int] = []
        self.aggregated: list[int] = []

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: ANN001
        self.configured.append(server_round)
        return ["message"]

    def aggregate_evaluate(self, server_round, replies):  # noqa: ANN001
        self.aggregated.append(server_round)
        return {"ndcg@10": 0.1}


class TwoNodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_round_control_sends_no_evaluation_between_scheduled_rounds():
    inner = RecordingInner()
    # A resumed run: this process' rounds 1..4 are the federation's rounds 3..6, the last is 6
    control = RoundControl(inner, first_round=3, min_nodes=2, node_wait_timeout=5, evaluate_every=2, last_round=6)
    sent = {r: list(control.configure_evaluate(r, None, None, TwoNodes())) for r in range(1, 5)}
    metrics = {r: control.aggregate_evaluate(r, []) for r in range(1, 5)}
    assert inner.configured == [4, 6] and inner.aggregated == [4, 6]  # federation rounds 4 and 6
    assert sent == {1: [], 2: ["message"], 3: [], 4: ["message"]}
    assert metrics[1] is None and metrics[2] == {"ndcg@10": 0.1}


def test_a_resume_at_an_odd_round_keeps_the_federations_evaluation_schedule():
    """After a resume at an odd round, evaluate-every counts the federation's rounds, not this process'
    (a mutation audit: the test above resumes at an even offset, where both schedules coincide)."""
    inner = RecordingInner()
    # This process' rounds 1..4 are the federation's rounds 2..5; evaluate every 2nd and the last (5)
    control = RoundControl(inner, first_round=2, min_nodes=2, node_wait_timeout=5, evaluate_every=2, last_round=5)
    sent = {r: list(control.configure_evaluate(r, None, None, TwoNodes())) for r in range(1, 5)}
    metrics = {r: control.aggregate_evaluate(r, []) for r in range(1, 5)}
    assert inner.configured == [2, 4, 5] and inner.aggregated == [2, 4, 5]
    assert [r for r, m in sent.items() if m] == [1, 3, 4]
    assert [r for r, m in metrics.items() if m is not None] == [1, 3, 4]


def test_fraction_evaluate_and_evaluate_every_reach_the_strategy():
    strategy = build_strategy(resolve_config(None, {"fraction-evaluate": 0.25, "evaluate-every": 3, "num-server-rounds": 7}))
    assert unwrap(strategy).fraction_evaluate == 0.25
    assert (strategy.evaluate_every, strategy.last_round) == (3, 7)
    for bad in ({"fraction-evaluate": 1.5}, {"fraction-evaluate": -0.1}, {"evaluate-every": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_strategy(resolve_config(None, bad))


def test_noise_calibration_is_computed_once_per_process_and_equals_opacus():
    from opacus.accountants.utils import get_noise_multiplier

    from common.privacy import _calibrated_noise, calibrate_noise

    args = dict(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.01, total_steps=15)
    _calibrated_noise.cache_clear()
    first = calibrate_noise(**args)
    second = calibrate_noise(**args)
    assert _calibrated_noise.cache_info().misses == 1 and _calibrated_noise.cache_info().hits == 1
    assert first == second == pytest.approx(get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=0.01, steps=15, epsilon_tolerance=0.005))


def test_bench_run_config_round_trips_through_flowers_parser():
    overrides = {"dataset": "../shared/data/ml-100k", "num-server-rounds": 10, "fraction-evaluate": 0.05,
                 "tied-output": False, "run-dir": "/tmp/x y"}
    flag, value = run_config_args(overrides)
    assert flag == "--run-config" and parse_config_args([value]) == overrides


def test_bench_steady_round_is_the_median_without_first_and_last():
    assert steady([90.0, 5.0, 7.0, 6.0, 30.0]) == 6.0
    assert steady([90.0, 30.0]) is None
    row = {"dp-mode": "off", "partners": 5, "federated_s": 130.0, "centralised_s": 100.0, "ratio": 1.3,
           "federated_round_s": 8.0, "centralised_round_s": 10.0, "round_ratio": 0.8,
           "federated_phases_s": {"before_server": 10, "round_1": 50, "rounds_2_to_R": 60, "after_last_round": 10}}
    assert "| ray | off | 5 | 130.0 | 100.0 | 1.30x | 8.0 | 10.0 | 0.80x | 10 / 50 / 60 / 10 |" in table([row])


def test_bench_times_the_in_process_engine_from_its_run_directory(tmp_path):
    """``--engines local``: simulations.local_grid in a fresh process, its rounds read back from
    the run directory it prints, phases adding up to the whole run."""
    from simulations.bench.federation import federated

    over = {"synthetic-users": 60, "synthetic-items": 30, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
            "num-server-rounds": 3, "local-epochs": 1, "batch-size": 8, "dp-mode": "off", "run-dir": str(tmp_path / "runs")}
    out = federated(over, 2, tmp_path, engine="local")
    assert len(out["round_s"]) == 3 and all(r > 0 for r in out["round_s"])
    assert Path(out["run_dir"]).parent == tmp_path / "runs" and (Path(out["run_dir"]) / "metrics.jsonl").exists()
    assert sum(out["phases_s"].values()) == pytest.approx(out["wall_s"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown engine"):
        federated(over, 2, tmp_path, engine="dask")


def test_centralised_reference_calibrates_for_all_users_and_follows_the_schedule():
    from common.partners import split_population
    from common.privacy import calibrate_noise
    from simulations.bench.centralised import run

    over = {"synthetic-users": 120, "synthetic-items": 30, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
            "num-server-rounds": 3, "local-epochs": 1, "batch-size": 4, "evaluate-every": 2, "dp-mode": "local"}
    out = run(over, threads=1)
    data, _ = split_population(resolve_config(None, over))
    steps = math.ceil(sum(len(h) >= 2 for h in data.train_sequences()) / 4)  # Poisson steps of one epoch
    # calibrate_noise equals Opacus' search (test above); here the plan's arguments are what is checked
    expected = calibrate_noise(target_epsilon=8.0, target_delta=1e-5, sample_rate=1 / steps, total_steps=3 * steps)
    assert out["noise_multiplier"] == pytest.approx(expected) and out["sample_rate"] == pytest.approx(1 / steps)
    assert len(out["train_s"]) == 3 and out["users"] == data.num_users
    # rounds 2 and 3 evaluate, round 1 does not (evaluate-every 2, and always the last round)
    assert [point["round"] for point in out["quality_curve"]] == [2, 3] and len(out["eval_s"]) == 3
    assert 0.0 <= out["final_metrics"]["ndcg@10"] <= out["final_metrics"]["hr@10"] <= 1.0
    assert not any(key.startswith("valid-") for key in out["quality_curve"][-1])  # only when asked
    # a knob DP cannot honour is refused, as the server refuses it, not silently dropped
    for knob in ("history-windows", "reverse-histories"):
        with pytest.raises(ConfigError, match=f"{knob} = true needs dp = false"):
            run({**over, knob: True}, threads=1)


def test_centralised_reference_scores_the_validation_split_when_asked(monkeypatch):
    """--validation: each evaluated round also reports the second-last item's HR/NDCG from the
    same evaluation as the test split's (tests/test_evaluation.py checks the split by brute force)."""
    import common.evaluation
    from common.metrics import means_from_sums
    from simulations.bench.centralised import run

    real, calls = common.evaluation.evaluate_model, []

    def recording(*args, **kwargs):
        sums = real(*args, **kwargs)
        calls.append((kwargs.get("split", "test"), means_from_sums({k: v for k, v in sums.items() if not k.startswith("rec-items")})))
        return sums

    monkeypatch.setattr(common.evaluation, "evaluate_model", recording)
    over = {"synthetic-users": 80, "synthetic-items": 30, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
            "num-server-rounds": 2, "local-epochs": 1, "dp": False}
    curve = run(over, threads=1, validation=True)["quality_curve"]
    assert [split for split, _ in calls] == ["test", "valid"] * 2
    for point, (_, test), (_, valid) in zip(curve, calls[0::2], calls[1::2]):
        assert point["ndcg@10"] == test["ndcg@10"] and point["hr@10"] == test["hr@10"]
        assert point["valid-ndcg@10"] == valid["ndcg@10"] and point["valid-hr@10"] == valid["hr@10"]
    assert [p["valid-ndcg@10"] for p in curve] != [p["ndcg@10"] for p in curve]  # another target, not a copy


def test_simulation_evaluates_on_schedule_and_on_a_sample(tmp_path):
    # The real ServerApp and ClientApps in process (the schedule and the sample are the server's
    # strategy; Flower's Ray engine is covered by tests/test_simulation_e2e.py): 3 s instead of 27 s
    import json

    from simulations.local_grid import run_local

    overrides = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16,
                 "num-blocks": 1, "num-server-rounds": 3, "local-epochs": 1, "batch-size": 16, "dp": False,
                 "evaluate-every": 2, "fraction-evaluate": 0.5, "run-dir": str(tmp_path), "run-name": "sched"}
    run_dir = run_local(overrides, 4)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["ndcg@10"] is None and rounds[0]["eval-users"] is None  # round 1: no evaluation
    assert rounds[1]["ndcg@10"] is not None and rounds[2]["ndcg@10"] is not None  # round 2 and the last
    # half of the 4 partners evaluate (about 75 of the 150 users), all 4 train
    assert 40 <= rounds[2]["eval-users"] <= 110 and rounds[2]["num-partners"] == 4
