"""Update validation, robust aggregation options and round control, on hand-made Flower messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from common.config import resolve_config
from common.errors import ConfigError, FederationError
from server.rounds import RoundControl, wait_for_nodes
from server.strategy_factory import AGGREGATIONS, aggregation_strategy, build_strategy, unwrap
from server.validation import UpdateBounds, ValidatingStrategy, check_update
from simulations.fault_injection import corrupt

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

GLOBAL = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32), "b": np.array([0.5, -0.5], dtype=np.float32)}
# Three honest partners: small moves away from the global model, different sizes.
HONEST = [
    ({"w": GLOBAL["w"] + 0.1, "b": GLOBAL["b"] - 0.2}, 10),
    ({"w": GLOBAL["w"] - 0.3, "b": GLOBAL["b"] + 0.1}, 30),
    ({"w": GLOBAL["w"] * 1.05, "b": GLOBAL["b"]}, 60),
]
MALICIOUS_NODE = 666


class NodesOnly:
    """The part of a Flower Grid that sampling uses."""

    def __init__(self, n: int) -> None:
        self.ids = list(range(101, 101 + n))

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def content(arrays: dict[str, np.ndarray], examples: float, **metrics: float) -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"train-loss": 1.0, "num-examples": examples, **metrics}),
    })


def reply(node: int, body: RecordDict | Error) -> Message:
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(body, reply_to=ins)


def honest_replies() -> list[Message]:
    return [reply(101 + i, content(a, n)) for i, (a, n) in enumerate(HONEST)]


def global_record() -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})


def validating(inner=None, min_nodes: int = 2, max_norm: float = 100.0) -> ValidatingStrategy:
    inner = inner or FedAvg(min_train_nodes=min_nodes, min_available_nodes=min_nodes)
    strategy = ValidatingStrategy(inner, bounds=UpdateBounds(max_update_norm=max_norm, max_num_examples=10_000),
                                  min_train_nodes=min_nodes)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    return strategy


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def bad_reply(kind: str) -> Message:
    """Partner 1's honest reply, poisoned by ``kind``."""
    arrays, n = HONEST[0]
    honest = content(arrays, n)
    if kind in ("nan", "shape", "scale", "examples"):
        return reply(MALICIOUS_NODE, corrupt(honest, global_record(), kind))
    bad = {k: v.copy() for k, v in arrays.items()}
    if kind == "inf":
        bad["b"][1] = np.inf
        return reply(MALICIOUS_NODE, content(bad, n))
    if kind == "dtype":
        bad["w"] = bad["w"].astype(np.float64)
        return reply(MALICIOUS_NODE, content(bad, n))
    if kind == "missing-key":
        return reply(MALICIOUS_NODE, content({"w": bad["w"]}, n))
    if kind == "extra-key":
        return reply(MALICIOUS_NODE, content({**bad, "backdoor": np.ones(3, np.float32)}, n))
    if kind == "reshaped":  # as many values in another shape (a mutation audit: a size check let it through)
        return reply(MALICIOUS_NODE, content({**bad, "b": bad["b"].reshape(2, 1).copy()}, n))
    if kind == "one-too-many-examples":  # the bound itself is allowed, one more is not
        return reply(MALICIOUS_NODE, content(bad, 10_001))
    if kind == "list-examples":  # a list where one number belongs (a mutation audit: it crashed the round)
        return reply(MALICIOUS_NODE, content(bad, [5, 5]))
    if kind == "zero-examples":
        return reply(MALICIOUS_NODE, content(bad, 0))
    if kind == "fractional-examples":
        return reply(MALICIOUS_NODE, content(bad, 2.5))
    if kind == "nan-loss":
        return reply(MALICIOUS_NODE, content(bad, n, **{"train-loss": float("nan")}))
    if kind == "extra-metric":
        return reply(MALICIOUS_NODE, content(bad, n, sneaky=1.0))
    if kind == "two-array-records":
        body = content(bad, n)
        body["more"] = ArrayRecord({"x": Array(np.zeros(1, np.float32))})
        return reply(MALICIOUS_NODE, body)
    raise AssertionError(kind)


FAULTS = ["nan", "inf", "shape", "reshaped", "dtype", "scale", "examples", "one-too-many-examples", "missing-key",
          "extra-key", "zero-examples", "list-examples",
          "fractional-examples", "nan-loss", "extra-metric", "two-array-records"]


@pytest.mark.parametrize("kind", FAULTS)
def test_each_bad_update_is_rejected_and_fedavg_equals_the_run_without_it(kind):
    # Prepare
    with_bad = validating()
    without = validating()
    replies = honest_replies()

    # Execute
    arrays, metrics = with_bad.aggregate_train(1, replies[:1] + [bad_reply(kind)] + replies[1:])
    reference, ref_metrics = without.aggregate_train(1, honest_replies())

    # Assert: rejected with the node id, result bit-identical to the run without that partner
    assert [r["node"] for r in with_bad.rejections] == [MALICIOUS_NODE]
    assert with_bad.rejections[0]["round"] == 1 and with_bad.rejections[0]["reason"]
    got, ref = as_numpy(arrays), as_numpy(reference)
    assert all(np.array_equal(got[k], ref[k]) for k in GLOBAL)
    assert dict(metrics) == dict(ref_metrics)


def test_an_update_at_exactly_max_num_examples_is_accepted():
    """max-num-examples is the largest accepted count, not the first refused one (a mutation audit: only one more
    than the bound was tried)."""
    arrays, _ = HONEST[0]
    assert check_update(content(arrays, 10_000), GLOBAL, UpdateBounds(max_num_examples=10_000)) is None


def test_fedavg_result_is_the_example_weighted_mean_computed_independently():
    arrays, _ = validating().aggregate_train(1, honest_replies())
    total = sum(n for _, n in HONEST)
    for key in GLOBAL:
        expected = sum(a[key].astype(np.float64) * n for a, n in HONEST) / total
        np.testing.assert_allclose(as_numpy(arrays)[key], expected, rtol=1e-6)


def test_result_does_not_depend_on_arrival_order():
    forward, _ = validating().aggregate_train(1, honest_replies())
    backward, _ = validating().aggregate_train(1, honest_replies()[::-1])
    assert all(np.array_equal(as_numpy(forward)[k], as_numpy(backward)[k]) for k in GLOBAL)


def test_evaluation_sums_do_not_depend_on_arrival_order():
    # A review: three reruns of one seeded simulation gave bit-identical models but metrics.jsonl differing
    # in the last digits, since evaluation sums were added in arrival order
    def fsum_in_order(contents, _weight_key):
        total = 0.0
        for c in contents:
            total += float(c["metrics"]["hit-sum"])
        return MetricRecord({"hit-sum": total})

    values = [0.1, 0.2, 0.3, 1e16, -1e16, 0.7]
    replies = [reply(101 + i, RecordDict({"metrics": MetricRecord({"hit-sum": v, "num-examples": 10})}))
               for i, v in enumerate(values)]
    inner = FedAvg(min_train_nodes=2, min_available_nodes=2, evaluate_metrics_aggr_fn=fsum_in_order)
    forward = validating(inner).aggregate_evaluate(1, replies)["hit-sum"]
    inner = FedAvg(min_train_nodes=2, min_available_nodes=2, evaluate_metrics_aggr_fn=fsum_in_order)
    backward = validating(inner).aggregate_evaluate(1, replies[::-1])["hit-sum"]
    assert forward == backward


def test_norm_bound_uses_distance_to_the_global_model():
    # ||honest[1] - global|| = sqrt(4 * 0.09 + 2 * 0.01) = 0.616...
    update = content(*HONEST[1])
    assert check_update(update, GLOBAL, UpdateBounds(max_update_norm=0.62)) is None
    reason = check_update(update, GLOBAL, UpdateBounds(max_update_norm=0.61))
    assert reason is not None and "0.6164" in reason
    assert check_update(update, GLOBAL, UpdateBounds(max_update_norm=0.0)) is None  # 0 = no bound


def test_each_round_bounds_updates_by_the_global_model_it_sent():
    """Round 2's updates are measured from round 2's global model, not round 1's: a model that moved far in
    round 1 must not get every honest update of round 2 rejected (a mutation audit: all tests ran one round)."""
    strategy = validating(max_norm=1.0)  # round 1 was configured with GLOBAL
    moved = {k: v + 10.0 for k, v in GLOBAL.items()}
    list(strategy.configure_train(2, ArrayRecord({k: Array(v) for k, v in moved.items()}), ConfigRecord(), NodesOnly(3)))
    replies = [reply(101 + i, content({k: moved[k] + (a[k] - GLOBAL[k]) for k in GLOBAL}, n))
               for i, (a, n) in enumerate(HONEST)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None and strategy.rejections == []
    far = reply(MALICIOUS_NODE, content(HONEST[0][0], 10))  # near round 1's model: 10 per value from round 2's
    strategy.aggregate_train(2, [far] + replies[:2])
    assert [r["node"] for r in strategy.rejections] == [MALICIOUS_NODE]


def test_too_few_valid_updates_fail_the_round_and_keep_the_model():
    strategy = validating(min_nodes=3)
    replies = honest_replies()[:2] + [bad_reply("nan")]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.failed_rounds == [1]


def test_error_replies_are_not_counted_as_valid_and_do_not_crash():
    strategy = validating(min_nodes=2)
    replies = honest_replies()[:2] + [reply(103, Error(code=400, reason="budget exhausted"))]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = (HONEST[0][0]["b"] * 10 + HONEST[1][0]["b"] * 30) / 40
    np.testing.assert_allclose(as_numpy(arrays)["b"], expected, rtol=1e-6)
    assert strategy.rejections == []


def test_evaluation_replies_with_non_finite_metrics_are_dropped():
    strategy = validating()
    good = [reply(101 + i, RecordDict({"metrics": MetricRecord({"hit-sum": float(i), "num-examples": 10})}))
            for i in range(2)]
    bad = reply(MALICIOUS_NODE, RecordDict({"metrics": MetricRecord({"hit-sum": float("nan"), "num-examples": 10})}))
    metrics = strategy.aggregate_evaluate(1, good + [bad])
    assert metrics["hit-sum"] == pytest.approx(0.5)
    assert [r["node"] for r in strategy.rejections] == [MALICIOUS_NODE]


@pytest.mark.parametrize("name", ["median", "trimmed-mean", "krum"])
def test_robust_aggregations_run_after_validation(name):
    cfg = resolve_config(None, {"aggregation": name, "min-nodes": 3, "trim-fraction": 0.0})
    strategy = validating(aggregation_strategy(cfg), min_nodes=3)
    arrays, _ = strategy.aggregate_train(1, honest_replies() + [bad_reply("nan")])
    got = as_numpy(arrays)
    if name == "median":
        expected = {k: np.median([a[k] for a, _ in HONEST], axis=0) for k in GLOBAL}
    elif name == "trimmed-mean":
        expected = {k: np.mean([a[k] for a, _ in HONEST], axis=0) for k in GLOBAL}  # beta 0: plain mean
    else:  # Krum picks one partner's update unchanged
        expected = next(a for a, _ in HONEST if np.array_equal(a["w"], got["w"]))
    for key in GLOBAL:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-6)


def test_a_trim_fraction_that_trims_nothing_says_so(caplog, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)  # Flower's logger keeps records to itself
    cfg = resolve_config(None, {"aggregation": "trimmed-mean", "min-nodes": 3, "trim-fraction": 0.2})
    strategy = validating(aggregation_strategy(cfg), min_nodes=3)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, honest_replies())
    got = as_numpy(arrays)
    for key in GLOBAL:  # int(0.2 x 3) = 0 cut from each end: the plain mean
        np.testing.assert_allclose(got[key], np.mean([a[key] for a, _ in HONEST], axis=0), rtol=1e-6)
    assert any("trim-fraction 0.2 of 3 updates trims none" in r.getMessage() and "needs 5 or more" in r.getMessage()
               for r in caplog.records)


def test_a_trimmed_mean_that_trims_leaves_the_outlier_out():
    # Every other trimmed-mean test trimmed nothing (trim-fraction 0, or 3 updates): an aggregator that never
    # trimmed read as a working one
    # Prepare: the three honest partners, two more, and one outlier (well inside the norm bound) among six;
    # int(0.2 x 6) = 1 update cut from each end of every coordinate
    updates = [a for a, _ in HONEST] + [
        {"w": GLOBAL["w"] + 0.2, "b": GLOBAL["b"] + 0.3},
        {"w": GLOBAL["w"] - 0.1, "b": GLOBAL["b"] - 0.1},
        {"w": GLOBAL["w"] + 20.0, "b": GLOBAL["b"] - 20.0},
    ]
    replies = [reply(101 + i, content(a, 10 * (i + 1))) for i, a in enumerate(updates)]
    cfg = resolve_config(None, {"aggregation": "trimmed-mean", "min-nodes": 3, "trim-fraction": 0.2})
    strategy = validating(aggregation_strategy(cfg), min_nodes=3)

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: per coordinate, sort the six values and average the middle four (unweighted)
    got = as_numpy(arrays)
    assert strategy.rejections == []
    for key in GLOBAL:
        stacked = np.sort(np.stack([a[key].astype(np.float64) for a in updates]), axis=0)
        np.testing.assert_allclose(got[key], stacked[1:-1].mean(axis=0), rtol=1e-6)
        assert not np.allclose(got[key], stacked.mean(axis=0), rtol=1e-3)  # not the plain mean


def test_every_aggregation_option_builds_and_bad_ones_are_one_clear_line():
    for name in AGGREGATIONS:
        build_strategy(resolve_config(None, {"aggregation": name, "min-nodes": 3, "proximal-mu": 0.1}))
    with pytest.raises(ConfigError, match="aggregation = 'fedsgd' is unknown"):
        build_strategy(resolve_config(None, {"aggregation": "fedsgd"}))
    with pytest.raises(ConfigError, match="needs min-nodes >= 4"):
        build_strategy(resolve_config(None, {"aggregation": "krum", "num-malicious-nodes": 1, "min-nodes": 3}))
    with pytest.raises(ConfigError, match="trim-fraction"):
        build_strategy(resolve_config(None, {"aggregation": "trimmed-mean", "trim-fraction": 0.5}))


def test_fraction_train_samples_partners_but_never_fewer_than_min_nodes():
    """fraction-train samples that share of the connected partners for training, and never fewer than min-nodes
    (fewer would fail every round in validation); a mutation audit: neither reached a test."""
    for knobs, sent in (({"fraction-train": 0.5, "min-nodes": 2}, 4), ({"fraction-train": 0.1, "min-nodes": 3}, 3)):
        strategy = build_strategy(resolve_config(None, knobs))
        assert len(list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(8)))) == sent, knobs
    # Evaluation likewise: a small fraction-evaluate still asks min-nodes partners, and 0 asks none
    for fraction, sent in ((0.1, 3), (0.0, 0)):
        strategy = build_strategy(resolve_config(None, {"fraction-evaluate": fraction, "min-nodes": 3}))
        assert len(list(strategy.configure_evaluate(1, global_record(), ConfigRecord(), NodesOnly(8)))) == sent


def test_the_run_configs_max_num_examples_bounds_the_updates():
    """max-num-examples from the run config reaches validation: a partner claiming more users is rejected (a
    mutation audit: the suite only built bounds by hand)."""
    strategy = build_strategy(resolve_config(None, {"max-num-examples": 40, "min-nodes": 2}))
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    arrays, _ = strategy.aggregate_train(1, honest_replies())  # 10, 30 and 60 examples
    assert arrays is not None and [r["node"] for r in strategy.inner.rejections] == [103]


def test_each_aggregations_own_knobs_reach_it():
    """server-learning-rate is FedAdam's step (learning-rate is the partners'), num-malicious-nodes is Krum's f
    (a mutation audit: swapped or dropped, every test still passed)."""
    adam = unwrap(build_strategy(resolve_config(None, {"aggregation": "fedadam", "server-learning-rate": 0.05,
                                                      "learning-rate": 0.003})))
    assert (adam.eta, adam.eta_l) == (0.05, 0.003)
    krum = unwrap(build_strategy(resolve_config(None, {"aggregation": "krum", "num-malicious-nodes": 2, "min-nodes": 5})))
    assert krum.num_malicious_nodes == 2
    # and the model's tied weights reach round control, which makes their copies one table again
    assert build_strategy(resolve_config(None, {}), tied=[("a", "b")]).tied == [("a", "b")]


def test_fedprox_sends_proximal_mu_to_clients():
    strategy = build_strategy(resolve_config(None, {"aggregation": "fedprox", "proximal-mu": 0.25}))
    messages = list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(2)))
    assert messages and all(m.content["config"]["proximal-mu"] == 0.25 for m in messages)


def test_node_wait_gives_up_with_a_clear_error():
    with pytest.raises(FederationError, match="only 1 of the 2 partners needed .* node-wait-timeout = 0.05 s"):
        wait_for_nodes(NodesOnly(1), 2, timeout=0.05, poll=0.01)
    assert wait_for_nodes(NodesOnly(3), 2, timeout=0.05) == 3


def test_node_wait_returns_as_soon_as_enough_partners_connect():
    """A partner connecting after the first check starts the round at the next poll, not at the end of
    node-wait-timeout (a mutation audit: sleeping the whole time left passed every test)."""
    import time

    class Arriving(NodesOnly):
        def get_node_ids(self) -> list[int]:
            ids = super().get_node_ids()
            self.ids.append(self.ids[-1] + 1)  # one more partner at every look
            return ids

    started = time.monotonic()
    assert wait_for_nodes(Arriving(1), 3, timeout=10.0, poll=0.01) == 3
    assert time.monotonic() - started < 5.0


def test_evaluation_waits_for_partners_at_most_node_wait_timeout():
    """Partners gone between training and evaluation fail the run with the node-wait line; Flower's own
    sampler would wait for them forever (a mutation audit: only training's wait was tested)."""
    class Sends(FedAvg):  # stands in for the aggregation: sends at once, whoever is connected
        def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN202
            return ["message"]

    strategy = RoundControl(Sends(), min_nodes=2, node_wait_timeout=0.05)
    with pytest.raises(FederationError, match="only 1 of the 2 partners needed"):
        list(strategy.configure_evaluate(1, global_record(), ConfigRecord(), NodesOnly(1)))


def test_retie_merges_every_diverging_group_even_when_another_is_equal():
    """Two tied Parameters, one with equal copies and one whose copies central noise moved apart: the
    second still leaves the server as one table (a mutation audit: "any group equal" skipped it)."""
    from server.rounds import retie

    same = np.arange(3, dtype=np.float32)
    arrays = ArrayRecord({"a": Array(same), "b": Array(same.copy()),
                          "c": Array(np.zeros(3, np.float32)), "d": Array(np.full(3, 2.0, np.float32))})
    out = retie(arrays, [("a", "b"), ("c", "d")])
    assert np.array_equal(out["c"].numpy(), np.ones(3, np.float32))
    assert np.array_equal(out["d"].numpy(), out["c"].numpy())
    assert np.array_equal(out["a"].numpy(), same)


def test_round_control_continues_round_numbers_after_a_resume():
    seen = []

    class Recording(FedAvg):
        def aggregate_train(self, server_round, replies):
            seen.append(server_round)
            return super().aggregate_train(server_round, replies)

    strategy = RoundControl(Recording(), first_round=3, min_nodes=2, node_wait_timeout=1.0)
    messages = list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(2)))
    strategy.aggregate_train(2, honest_replies())
    assert {m.content["config"]["server-round"] for m in messages} == {3}  # the clients' seeds continue
    assert seen == [4] and strategy.federation_round(1) == 3


def test_updates_that_are_not_aggregated_still_count_in_the_privacy_report(tmp_path):
    # Prepare: a real privacy report fed by validation, as server/app.py wires it
    from server.privacy_report import PrivacyReport

    cfg = resolve_config(None, {"max-update-norm": 1.0})
    report = PrivacyReport(tmp_path, cfg)
    strategy = build_strategy(cfg, on_unaggregated=report.note_unaggregated).inner  # the ValidatingStrategy
    assert isinstance(strategy, ValidatingStrategy)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    big = {"w": GLOBAL["w"] + 5.0, "b": GLOBAL["b"]}  # norm 10 > max-update-norm 1: rejected
    privacy = {"epsilon": 7.5, "delta": 1e-5}
    # Execute: round 1 rejects node 101's large update and fails (one valid update of min 2)
    replies = [reply(101, content(big, 10, **privacy)), reply(102, content(HONEST[0][0], 10, epsilon=2.0, delta=1e-5))]
    assert strategy.aggregate_train(1, replies) == (None, None)
    # Assert: both releases are in the report, and the guarantee states the larger epsilon
    entries = {p["node-id"]: p for p in report.partners.values()}
    assert entries[101]["epsilon"] == 7.5 and "max-update-norm" in entries[101]["not-aggregated"][0]["reason"]
    assert entries[102]["epsilon"] == 2.0 and entries[102]["not-aggregated"][0]["reason"].startswith("round failed")
    assert "rounds-trained" not in entries[101]
    assert "(7.500," in report.guarantee()
    assert (tmp_path / "privacy.json").is_file()
    # a later rejected reply claiming a lower epsilon does not lower the recorded spend
    list(strategy.configure_train(2, global_record(), ConfigRecord(), NodesOnly(3)))
    strategy.aggregate_train(2, [reply(101, content(big, 10, epsilon=1.0, delta=1e-5))])
    assert entries[101]["epsilon"] == 7.5 and len(entries[101]["not-aggregated"]) == 2


def test_updates_a_robust_aggregator_leaves_out_still_count_in_the_privacy_report(tmp_path):
    # Prepare: Krum (keeps one update) behind the privacy report, wired as server/app.py does
    from server.central_dp import with_privacy
    from server.privacy_report import PrivacyReport

    from server.run_report import RunRecorder

    cfg = resolve_config(None, {"aggregation": "krum", "num-malicious-nodes": 1, "min-nodes": 4})
    report = PrivacyReport(tmp_path, cfg)
    recorder = RunRecorder(tmp_path, cfg, np.array(["a"] * 3))
    strategy = build_strategy(cfg, wrap_aggregation=lambda inner: with_privacy(inner, cfg, report),
                              on_unaggregated=report.note_unaggregated,
                              train_metrics_aggr_fn=recorder.aggregate_train_metrics)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(4)))
    updates = [(a, n) for a, n in HONEST] + [({"w": GLOBAL["w"] + 0.3, "b": GLOBAL["b"]}, 10)]
    replies = [reply(101 + i, content(a, n, epsilon=1.0 + i, delta=1e-5)) for i, (a, n) in enumerate(updates)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # The round's line counts every partner that trained and its worst epsilon (Flower passes on
    # the selected update's metrics only: num-partners 1 and that partner's epsilon)
    assert metrics["num-partners"] == 4 and metrics["epsilon"] == 4.0
    # Assert: one partner's update was kept unchanged, yet all four releases are in the report
    got = as_numpy(arrays)
    assert sum(np.array_equal(a["w"], got["w"]) for a, _ in updates) == 1
    entries = {p["node-id"]: p for p in report.partners.values()}
    assert sorted(entries) == [101, 102, 103, 104]
    assert [entries[n]["epsilon"] for n in sorted(entries)] == [1.0, 2.0, 3.0, 4.0]
    assert all(e["rounds-trained"] == [1] for e in entries.values())
    assert "(4.000," in report.guarantee()


@pytest.mark.parametrize("knobs, message", [
    ({"aggregation": "krum", "num-malicious-nodes": 1, "min-nodes": 3}, "needs min-nodes >= 4"),
    # SecAgg+ refused median only after the run directory existed (a review, eleventh session)
    ({"aggregation": "median", "secure-aggregation": True}, "needs individual updates"),
])
def test_a_strategy_the_server_cannot_build_leaves_no_run_directory(tmp_path, knobs, message):
    from common.errors import ConfigError
    from simulations.local_grid import run_local

    overrides = {**knobs, "synthetic-users": 40, "synthetic-items": 20, "run-dir": str(tmp_path), "run-name": "refused"}
    with pytest.raises(ConfigError, match=message):
        run_local(overrides, 3)
    assert not (tmp_path / "refused").exists()


def test_a_run_in_which_no_round_aggregated_says_so_at_the_end(tmp_path, caplog, monkeypatch):
    import logging

    from simulations.local_grid import run_local

    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
    overrides = {"dp": False, "max-update-norm": 1e-9, "synthetic-users": 60, "synthetic-items": 20,
                 "embedding-dim": 8, "num-blocks": 1, "max-seq-len": 10, "batch-size": 8, "min-nodes": 2,
                 "run-dir": str(tmp_path), "run-name": "rejected", "tie-orders": 1}
    with caplog.at_level(logging.ERROR, logger="flwr"):
        run_local(overrides, 2)  # every update is over the bound: rejected
    assert any(r.getMessage().startswith("no round aggregated an update:") for r in caplog.records)


def test_refusals_in_a_failed_round_reach_the_privacy_report(tmp_path):
    # Every partner refuses (e.g. budget exhausted): the round fails before any aggregation
    from server.privacy_report import PrivacyReport

    cfg = resolve_config(None, {"min-nodes": 2})
    report = PrivacyReport(tmp_path, cfg)
    strategy = build_strategy(cfg, on_unaggregated=report.note_unaggregated).inner
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(2)))
    refusals = [reply(101 + i, Error(code=400, reason="budget exhausted: epsilon 8.000 of 8")) for i in range(2)]
    assert strategy.aggregate_train(1, refusals) == (None, None)
    entries = {p["node-id"]: p for p in json.loads((tmp_path / "privacy.json").read_text())["partners"].values()}
    assert sorted(entries) == [101, 102]
    assert all(e["refused"] == [{"round": 1, "reason": "budget exhausted: epsilon 8.000 of 8"}] for e in entries.values())
    # A refusal released nothing new; the spend it states is the ledger's whole one (earlier rounds or runs, the
    # report's unit): listed as the partner's epsilon, marked as taken from the refusal (eighteenth session)
    assert all((e["epsilon"], e["epsilon-from"]) == (8.0, "refusal in round 1") for e in entries.values())


def test_a_refusal_in_a_round_that_aggregates_reaches_the_privacy_report(tmp_path):
    """A partner that refuses (budget exhausted) while the others' updates are aggregated is listed as refused in
    privacy.json: validation passes error replies on to the privacy wrapper (a mutation audit: only a round in
    which every partner refused was tested)."""
    from server.central_dp import with_privacy
    from server.privacy_report import PrivacyReport

    cfg = resolve_config(None, {"min-nodes": 2})
    report = PrivacyReport(tmp_path, cfg)
    strategy = build_strategy(cfg, wrap_aggregation=lambda inner: with_privacy(inner, cfg, report),
                              on_unaggregated=report.note_unaggregated)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    replies = honest_replies()[:2] + [reply(103, Error(code=400, reason="budget exhausted: epsilon 8.000 of 8"))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    entries = {p["node-id"]: p for p in report.partners.values()}
    assert entries[103]["refused"] == [{"round": 1, "reason": "budget exhausted: epsilon 8.000 of 8"}]
    assert entries[101]["rounds-trained"] == [1] and "refused" not in entries[101]


def test_an_evaluation_refusal_reaches_the_privacy_report_and_no_evaluation_counts_as_an_update(tmp_path):
    """A partner that refuses to evaluate is listed under refused-evaluation in privacy.json, and an evaluation
    reply rejected for a NaN is never reported as an update that was not aggregated (a mutation audit)."""
    from server.central_dp import with_privacy
    from server.privacy_report import PrivacyReport

    cfg = resolve_config(None, {"min-nodes": 2})
    report = PrivacyReport(tmp_path, cfg)
    unaggregated = []
    strategy = build_strategy(cfg, wrap_aggregation=lambda inner: with_privacy(inner, cfg, report),
                              on_unaggregated=lambda r, m, why: unaggregated.append(m.metadata.src_node_id))
    good = [reply(101 + i, RecordDict({"metrics": MetricRecord({"hit-sum": 1.0, "num-examples": 10})}))
            for i in range(2)]
    nan = reply(103, RecordDict({"metrics": MetricRecord({"hit-sum": float("nan"), "num-examples": 10})}))
    refusal = reply(104, Error(code=400, reason="budget exhausted"))
    assert strategy.aggregate_evaluate(1, good + [nan, refusal])["hit-sum"] == pytest.approx(1.0)
    entries = {p["node-id"]: p for p in report.partners.values()}
    assert entries[104]["refused-evaluation"] == [{"round": 1, "reason": "budget exhausted"}]
    assert unaggregated == [] and [r["node"] for r in strategy.inner.rejections] == [103]


def test_an_evaluation_reply_rejected_for_its_keys_is_passed_on():
    # Mutation audit: a noised reply rejected for its key set spent budget; the privacy report must hear of it
    seen = []
    strategy = ValidatingStrategy(FedAvg(min_train_nodes=2, min_available_nodes=2),
                                  bounds=UpdateBounds(max_update_norm=100.0, max_num_examples=10_000), min_train_nodes=2,
                                  on_rejected_evaluation=lambda r, m: seen.append((r, m.metadata.src_node_id)))
    common = {"hit-sum": 1.0, "num-examples": 10}
    replies = [reply(101, RecordDict({"metrics": MetricRecord(common)})),
               reply(102, RecordDict({"metrics": MetricRecord(common)})),
               reply(103, RecordDict({"metrics": MetricRecord({**common, "odd-key": 1.0})}))]
    strategy.aggregate_evaluate(4, replies)
    assert seen == [(4, 103)]


def test_a_partner_that_keeps_its_loss_is_aggregated_beside_those_that_send_one(tmp_path):
    # A deployed partner under local DP keeps its loss and time (client/app.py). In a run where one partner's own
    # max-epsilon forces DP-SGD and the others train without, the key sets differed and the minority was rejected
    from server.run_report import RunRecorder

    cfg = resolve_config(None, {"min-nodes": 3})
    recorder = RunRecorder(tmp_path, cfg, np.array(["a"] * 3))
    strategy = build_strategy(cfg, train_metrics_aggr_fn=recorder.aggregate_train_metrics)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    replies = [reply(101 + i, content(a, n, seconds=2.0)) for i, (a, n) in enumerate(HONEST[:2])]
    kept = content(HONEST[2][0], HONEST[2][1])
    kept["metrics"].pop("train-loss")
    replies.append(reply(103, kept))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-partners"] == 3  # none rejected for its keys
    assert metrics["train-loss"] == pytest.approx(1.0)  # the two that sent one (content() sends 1.0)


def test_a_partners_own_optional_metrics_record_is_dropped(tmp_path):
    # A review: a reply carrying its own "optional-metrics" record (train-loss "abc") crashed the server's
    # aggregation, and 1e300 became the round's loss; only update validation writes that record
    from server.run_report import RunRecorder
    from server.validation import OPTIONAL_METRICS_KEY

    cfg = resolve_config(None, {"min-nodes": 3})
    recorder = RunRecorder(tmp_path, cfg, np.array(["a"] * 3))
    strategy = build_strategy(cfg, train_metrics_aggr_fn=recorder.aggregate_train_metrics)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    replies = []
    for i, (arrays, n) in enumerate(HONEST):
        body = content(arrays, n)
        if i == 2:
            body["metrics"].pop("train-loss")
            body[OPTIONAL_METRICS_KEY] = ConfigRecord({"train-loss": 1e300})
        replies.append(reply(101 + i, body))
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics["num-partners"] == 3 and metrics["train-loss"] == pytest.approx(1.0)
    # and the run report reads a number or nothing from that record (a string crashed float())
    from server.run_report import _optional

    odd = RecordDict({"metrics": MetricRecord({"num-examples": 5}), OPTIONAL_METRICS_KEY: ConfigRecord({"train-loss": "abc"})})
    assert _optional(odd, odd["metrics"], "train-loss") is None


@pytest.mark.parametrize("name", ["m", "optional-metrics"])
def test_a_reply_with_other_record_names_is_rejected_not_a_crash(name):
    # A review: a MetricRecord named otherwise passed validation and Flower raised InconsistentMessageReplies out
    # of the strategy (the ServerApp stopped); named "optional-metrics" it was deleted and next() raised StopIteration
    cfg = resolve_config(None, {"min-nodes": 2})
    strategy = build_strategy(cfg)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    replies = honest_replies()
    odd = replies[2].content
    replies[2].content = RecordDict({"arrays": odd["arrays"], name: odd["metrics"]})
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = (HONEST[0][0]["b"] * 10 + HONEST[1][0]["b"] * 30) / 40  # the two others only
    np.testing.assert_allclose(as_numpy(arrays)["b"], expected, rtol=1e-6)


@pytest.mark.parametrize("first", [True, False])
def test_a_reply_whose_array_record_has_another_name_is_rejected_not_a_crash(first):
    """An update whose ArrayRecord is not named "arrays" is rejected with its node id; the round aggregates the
    others (a mutation audit: only the MetricRecord's name was tested)."""
    cfg = resolve_config(None, {"min-nodes": 2})
    strategy = build_strategy(cfg)
    list(strategy.configure_train(1, global_record(), ConfigRecord(), NodesOnly(3)))
    replies = honest_replies()
    odd = replies[2].content
    replies[2].content = RecordDict({"weights": odd["arrays"], "metrics": odd["metrics"]})
    arrays, _ = strategy.aggregate_train(1, replies[::-1] if first else replies)
    expected = (HONEST[0][0]["b"] * 10 + HONEST[1][0]["b"] * 30) / 40  # the two others only
    np.testing.assert_allclose(as_numpy(arrays)["b"], expected, rtol=1e-6)
    assert [r["node"] for r in strategy.inner.rejections] == [103]


def test_an_evaluation_reply_with_another_record_name_is_dropped_not_a_crash():
    strategy = validating()
    good = [reply(101 + i, RecordDict({"metrics": MetricRecord({"hit-sum": float(i), "num-examples": 10})}))
            for i in range(2)]
    odd = reply(MALICIOUS_NODE, RecordDict({"m": MetricRecord({"hit-sum": 5.0, "num-examples": 10})}))
    metrics = strategy.aggregate_evaluate(1, [odd] + good)  # first: Flower compared the others under its name
    assert metrics["hit-sum"] == pytest.approx(0.5)
    assert [r["node"] for r in strategy.rejections] == [MALICIOUS_NODE]
