"""Central DP (server/central_dp.py): the aggregate's noise, the clipping bound, refusals, Flower's accountant.

The wrappers are driven the way Flower's strategy loop drives them (configure_train, then
aggregate_train on reply messages), with a stand-in Grid; no simulation is started.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.app import central_dp_clipping_mod
from common.config import resolve_config
from common.errors import ConfigError
from server.central_dp import CentralDPClientClipping, CentralDPServerClipping, PrivacyReportingStrategy, with_privacy
from server.privacy_report import PrivacyReport

DIM = 20_000  # noise samples per round and partner-free coordinate


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; pretend to be one."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """Just enough of a Grid for FedAvg.configure_train: ``n`` connected partners."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def _strategy(tmp_path, n: int, **overrides):
    cfg = resolve_config(None, {"min-nodes": n, **overrides})
    report = PrivacyReport(tmp_path, cfg)
    return with_privacy(FedAvg(min_train_nodes=n, min_available_nodes=n), cfg, report), report


def _reply(msg: Message, weights: np.ndarray, num_examples: int = 10) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": num_examples, "epsilon": 0.0, "delta": 0.0}),
        "privacy": ConfigRecord({"partner": f"partner-{msg.metadata.dst_node_id}"}),
    })
    return Message(content, reply_to=msg)


def _round(strategy, server_round: int, n: int, global_w: np.ndarray, updates: list[np.ndarray | None], weights=None):
    """Configure one round for ``n`` partners, reply with global + update (None = refuse), aggregate."""
    arrays = ArrayRecord({"w": Array(global_w)})
    msgs = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), FakeGrid(n)))
    replies = []
    for i, (msg, upd) in enumerate(zip(msgs, updates)):
        if upd is None:
            replies.append(Message(Error(code=400, reason="budget exhausted: epsilon 8.000 of 8"), reply_to=msg))
        else:
            replies.append(_reply(msg, global_w + upd, (weights or [10] * n)[i]))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else arrays["w"].numpy()


@pytest.mark.parametrize("side", ["server", "client"])
def test_aggregate_noise_has_the_configured_std(tmp_path, side):
    # Prepare: 4 partners send the same update of norm 5, clipped to C = 1 (on the server, or
    # here by hand as fixedclipping_mod would on the client); sigma = 2 -> std = 2 * 1 / 4.
    n, sigma, clip = 4, 2.0, 1.0
    strategy, _ = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma,
                                            "central-clipping-norm": clip, "central-clipping": side})
    assert isinstance(strategy, CentralDPServerClipping if side == "server" else CentralDPClientClipping)
    rng = np.random.default_rng(1)
    direction = rng.normal(size=DIM).astype(np.float32)
    update = 5.0 * direction / np.linalg.norm(direction)
    sent = update if side == "server" else update * clip / np.linalg.norm(update)
    numpy_before = np.random.get_state()[1].copy()  # Flower's own wrappers draw from numpy's global MT

    # Execute: three rounds
    residuals = []
    for r in (1, 2, 3):
        out = _round(strategy, r, n, np.zeros(DIM, np.float32), [sent] * n)
        residuals.append(out - update * clip / np.linalg.norm(update))
    noise = np.concatenate(residuals).astype(np.float64)

    # Assert: sample std within 5 standard errors of sigma*C/n (SE of a std ~ std / sqrt(2N))
    expected = sigma * clip / n
    se = expected / math.sqrt(2 * noise.size)
    assert abs(noise.std() - expected) < 5 * se, (noise.std(), expected)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(noise.size)
    # ... drawn from the CSPRNG (server/central_dp.py), not numpy's global Mersenne Twister
    np.testing.assert_array_equal(np.random.get_state()[1], numpy_before)
    kurtosis = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert abs(kurtosis - 3.0) < 0.1  # Gaussian tails (3 rounds x 20,000 draws: SE ~0.02)


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_refusal_counts_as_a_zero_update_over_the_partners_sampled(tmp_path, side):
    # Prepare: 4 sampled, one refuses (budget): Flower's own wrapper would skip the round. The
    # release is (sum of the 3 clipped updates) / 4 + N(0, (sigma C / 4)^2): the sum's sensitivity to
    # one partner is C whoever replies. Before, the mean of the 3 got noise sigma C / 3: a mean over a
    # data-dependent count has sensitivity up to 2C / m (a researcher review)
    n, sigma, clip = 4, 2.0, 1.0
    strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma,
                                                 "central-clipping": side})
    rng = np.random.default_rng(3)
    updates = [0.5 * v / np.linalg.norm(v) for v in rng.normal(size=(3, DIM)).astype(np.float32)]  # norm 0.5 < C
    start = rng.normal(size=DIM).astype(np.float32)

    # Execute
    out = _round(strategy, 1, n, start, [updates[0], None, updates[1], updates[2]])

    # Assert: by hand, in float64
    assert out is not None
    noise = out.astype(np.float64) - (start.astype(np.float64) + np.sum(updates, axis=0, dtype=np.float64) / n)
    expected = sigma * clip / n
    assert abs(noise.std() - expected) < 5 * expected / math.sqrt(2 * DIM), (noise.std(), expected)
    assert abs(noise.mean()) < 5 * expected / math.sqrt(DIM)
    refused = [p for p in report.partners.values() if "refused" in p]
    assert len(refused) == 1 and refused[0]["refused"][0]["reason"].startswith("budget exhausted")
    assert (report.central_rounds[0]["partners"], report.central_rounds[0]["sampled"]) == (3, 4)


def test_server_side_clipping_bounds_every_update_and_weighs_partners_equally(tmp_path):
    # Prepare: no noise, updates of norms 0.3, 1, 4 and 40 with unequal example counts
    n, clip = 4, 1.0
    strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": 0.0,
                                            "central-clipping-norm": clip})
    seen = []
    inner_aggregate = strategy.strategy.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        seen.extend(r.content["arrays"]["w"].numpy().copy() for r in replies)
        return inner_aggregate(server_round, replies)

    strategy.strategy.aggregate_train = spy
    rng = np.random.default_rng(2)
    updates = []
    for norm in (0.3, 1.0, 4.0, 40.0):
        v = rng.normal(size=DIM)
        updates.append((norm * v / np.linalg.norm(v)).astype(np.float32))
    global_w = rng.normal(size=DIM).astype(np.float32)

    # Execute
    out = _round(strategy, 1, n, global_w, updates, weights=[1, 10, 100, 1000])

    # Assert: every update the aggregator sees is within C; small ones untouched; plain mean
    norms = [np.linalg.norm(w.astype(np.float64) - global_w) for w in seen]
    assert all(x <= clip * (1 + 1e-5) for x in norms), norms
    assert norms[0] == pytest.approx(0.3, rel=1e-4)
    clipped = [u * min(1.0, clip / np.linalg.norm(u)) for u in updates]
    np.testing.assert_allclose(out, global_w + np.mean(clipped, axis=0), atol=1e-5)
    # No noise, so no guarantee, and the sentence says why (it said "noised but not accounted")
    assert "clipped but not noised (central-noise-multiplier = 0), so not DP" in report.guarantee()


def test_client_mod_clips_only_when_the_run_asks_for_it(tmp_path):
    # Prepare: the client-side wrapper injects the clipping norm into the train config
    clip = 0.5
    overrides = {"dp-mode": "central", "central-clipping": "client", "central-clipping-norm": clip, "min-nodes": 1}
    strategy, _ = _strategy(tmp_path, 1, **{k: v for k, v in overrides.items() if k != "min-nodes"})
    global_w = np.zeros(100, np.float32)
    msg = next(iter(strategy.configure_train(1, ArrayRecord({"w": Array(global_w)}), ConfigRecord({}), FakeGrid(1))))
    big = np.full(100, 3.0, np.float32)  # norm 30
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def handler(m: Message, ctx: Context) -> Message:
        return _reply(m, global_w + big)

    # Execute
    clipped = central_dp_clipping_mod(overrides)(msg, context, handler)
    untouched = central_dp_clipping_mod({**overrides, "dp-mode": "local"})(msg, context, handler)

    # Assert
    assert np.linalg.norm(clipped.content["arrays"]["w"].numpy()) == pytest.approx(clip, rel=1e-5)
    assert np.linalg.norm(untouched.content["arrays"]["w"].numpy()) == pytest.approx(30.0, rel=1e-5)


@pytest.mark.parametrize("side", ["server", "client"])
def test_an_unchanged_model_is_sent_and_aggregated_unclipped(tmp_path, side):
    # Prepare: partner 1 sends the global model back exactly (update of norm 0; Flower's own clipping
    # divides by that norm), partner 2 an update of norm 4 that is clipped to C = 1; no noise
    n, clip = 2, 1.0
    overrides = {"dp-mode": "central", "central-noise-multiplier": 0.0, "central-clipping-norm": clip,
                 "central-clipping": side}
    strategy, report = _strategy(tmp_path, n, **overrides)
    rng = np.random.default_rng(3)
    global_w = rng.normal(size=DIM).astype(np.float32)
    v = rng.normal(size=DIM)
    moved = (4.0 * v / np.linalg.norm(v)).astype(np.float32)
    arrays = ArrayRecord({"w": Array(global_w)})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid(n)))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    mod = central_dp_clipping_mod({**overrides, "min-nodes": n})

    # Execute: each partner's reply goes through the client mod (a pass-through for server-side clipping)
    replies = [mod(m, context, lambda m_, _c, u=u: _reply(m_, global_w + u)) for m, u in zip(msgs, [0 * moved, moved])]
    out, _ = strategy.aggregate_train(1, replies)

    # Assert: the unchanged reply left the partner as the global model itself, and the aggregate is
    # the plain mean of (0, clipped update): nothing divided by zero, the round was not lost
    assert np.array_equal(replies[0].content["arrays"]["w"].numpy(), global_w)
    expected = global_w + (moved * clip / np.linalg.norm(moved)) / 2
    np.testing.assert_allclose(out["w"].numpy(), expected, atol=1e-5)
    assert report.central_rounds[0]["partners"] == 2


def test_organisation_level_epsilon_matches_dp_accounting(tmp_path):
    from dp_accounting import dp_event, rdp

    # Prepare
    n, sigma, rounds = 3, 1.5, 4
    strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma})
    update = np.full(10, 0.1, np.float32)

    # Execute
    for r in range(1, rounds + 1):
        _round(strategy, r, n, np.zeros(10, np.float32), [update] * n)

    # Assert: Gaussian mechanism with noise multiplier sigma, composed once per round, no amplification
    epsilons = [r["epsilon"] for r in report.central_rounds]
    assert epsilons == sorted(epsilons) and len(epsilons) == rounds
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), rounds)
    assert epsilons[-1] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
    assert (tmp_path / "privacy.json").is_file()
    assert "for any one partner's whole contribution" in report.guarantee()


def test_local_mode_logs_refusals_and_aggregates_the_rest(tmp_path):
    strategy, report = _strategy(tmp_path, 3)
    assert isinstance(strategy, PrivacyReportingStrategy)
    upd = np.ones(10, np.float32)
    out = _round(strategy, 1, 3, np.zeros(10, np.float32), [upd, None, 3 * upd])
    np.testing.assert_allclose(out, 2 * upd)  # FedAvg of the two that trained (equal weights here)
    assert sum("refused" in p for p in report.partners.values()) == 1


def test_bad_central_settings_are_one_clear_error(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="central-clipping"):
        _strategy(tmp_path, 2, **{"dp-mode": "central", "central-clipping": "middle"})
    with pytest.raises(ConfigError, match="dp-mode"):
        _strategy(tmp_path, 2, **{"dp-mode": "global"})


def test_resumed_server_keeps_counting_central_releases(tmp_path):
    from dp_accounting import dp_event, rdp

    # Prepare: a server process makes 2 releases, a resumed one (same run directory) 2 more
    n, sigma = 3, 1.5
    update = np.full(10, 0.1, np.float32)
    for first_round in (1, 3):
        strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma})
        for r in (first_round, first_round + 1):
            _round(strategy, r, n, np.zeros(10, np.float32), [update] * n)

    # Assert: the last epsilon accounts for all 4 releases, not just this process' 2
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), 4)
    assert [r["round"] for r in report.central_rounds] == [1, 2, 3, 4]
    assert report.central_rounds[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)


def test_more_partners_joining_later_keeps_the_accounting(tmp_path):
    from dp_accounting import dp_event, rdp

    strategy, report = _strategy(tmp_path, 2, **{"dp-mode": "central", "central-noise-multiplier": 2.0})
    update = np.full(10, 0.1, np.float32)
    for r, n in ((1, 2), (2, 4), (3, 4)):  # two more partners connect before round 2
        _round(strategy, r, n, np.zeros(10, np.float32), [update] * n)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(2.0), 3)
    assert [r["partners"] for r in report.central_rounds] == [2, 4, 4]
    assert report.central_rounds[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)


def test_tied_copies_leave_the_server_as_one_table_with_half_the_noise_variance(tmp_path):
    # Prepare: "a" and "b" are one tied Parameter (SASRec's item table and output layer), "c" is not;
    # 4 partners send the same update (identical copies), central DP noises each copy independently
    from server.rounds import RoundControl, retie

    n, sigma, clip = 4, 2.0, 1.0
    inner, _ = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma,
                                         "central-clipping-norm": clip, "central-clipping": "client"})
    strategy = RoundControl(inner, min_nodes=n, node_wait_timeout=5.0, tied=[("a", "b")])
    rng = np.random.default_rng(2)
    upd = rng.normal(size=DIM).astype(np.float32)
    upd *= 0.5 * clip / np.linalg.norm(np.concatenate([upd, upd, upd]))  # whole update inside the clip
    zero = np.zeros(DIM, np.float32)
    global_arrays = ArrayRecord({k: Array(zero) for k in "abc"})
    np.random.seed(3)
    # Execute
    msgs = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), FakeGrid(n)))
    replies = []
    for msg in msgs:
        content = RecordDict({
            "arrays": ArrayRecord({k: Array(zero + upd) for k in "abc"}),
            "metrics": MetricRecord({"num-examples": 10, "epsilon": 0.0, "delta": 0.0}),
            "privacy": ConfigRecord({"partner": f"partner-{msg.metadata.dst_node_id}"})})
        replies.append(Message(content, reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: one table again (what partners load), holding the copies' mean: noise std sigma*C/n/sqrt(2)
    a, b, c = (arrays[k].numpy().astype(np.float64) - upd for k in "abc")
    assert np.array_equal(a, b)
    expected = sigma * clip / n
    se = expected / math.sqrt(2 * DIM)
    assert abs(c.std() - expected) < 5 * se  # the untied array keeps the full noise
    assert abs(a.std() - expected / math.sqrt(2)) < 5 * se
    # nothing to do for equal copies or an untied model: the record passes through unchanged
    assert retie(global_arrays, [("a", "b")]) is global_arrays and retie(arrays, []) is arrays


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_resume_with_privacy_json_lost_continues_from_the_checkpoint_copy(tmp_path, damage):
    from dp_accounting import dp_event, rdp

    # Prepare: 2 releases; the checkpoint keeps a copy of privacy.json (server/resume.py privacy_summary)
    n, sigma = 3, 1.5
    update = np.full(10, 0.1, np.float32)
    strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma})
    for r in (1, 2):
        _round(strategy, r, n, np.zeros(10, np.float32), [update] * n)
    checkpoint_copy = json.loads((tmp_path / "privacy.json").read_text())
    if damage == "deleted":
        (tmp_path / "privacy.json").unlink()
    else:
        (tmp_path / "privacy.json").write_text("{not json")
    # Execute: the resumed process (server/app.py: restore hands it the checkpoint's copy)
    strategy, report = _strategy(tmp_path, n, **{"dp-mode": "central", "central-noise-multiplier": sigma})
    report.adopt_checkpoint_copy(checkpoint_copy)
    for r in (3, 4):
        _round(strategy, r, n, np.zeros(10, np.float32), [update] * n)
    # Assert: 4 releases accounted (the lost file would have restarted epsilon at 2 releases' worth)
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), 4)
    assert [r["round"] for r in report.central_rounds] == [1, 2, 3, 4]
    assert report.central_rounds[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.01)
    # a file that is ahead of (or equal to) the checkpoint is kept as it is
    report.adopt_checkpoint_copy(checkpoint_copy)
    assert len(report.central_rounds) == 4


def test_central_noise_leaves_the_models_public_buffers_alone(tmp_path):
    # A genre table (or frozen item-text table) is a buffer no partner trains: noising it each round
    # added nothing to the guarantee and piled up noise on public metadata
    cfg = resolve_config(None, {"min-nodes": 2, "dp-mode": "central", "central-noise-multiplier": 1.0,
                                "central-clipping": "client"})
    strategy = with_privacy(FedAvg(min_train_nodes=2, min_available_nodes=2), cfg, PrivacyReport(tmp_path, cfg),
                            public=["genres"])
    genres = np.eye(4, dtype=np.float32)
    arrays = ArrayRecord({"w": Array(np.zeros(1000, np.float32)), "genres": Array(genres)})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid(2)))
    replies = []
    for msg in msgs:
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(np.zeros(1000, np.float32)), "genres": Array(genres)}),
            "metrics": MetricRecord({"num-examples": 10, "epsilon": 0.0, "delta": 0.0}),
            "privacy": ConfigRecord({"partner": f"partner-{msg.metadata.dst_node_id}"}),
        })
        replies.append(Message(content, reply_to=msg))
    out, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(out["genres"].numpy(), genres)
    assert abs(out["w"].numpy().std() - 1.0 * 1.0 / 2) < 0.05  # the trained weights are noised as before


def _reply_with_privacy(msg: Message, weights: np.ndarray, epsilon: float, target: float, delta: float = 1e-5) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(weights.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": 10, "epsilon": epsilon, "delta": delta if epsilon else 0.0,
                                 "target-epsilon": target}),
        "privacy": ConfigRecord({"partner": f"partner-{msg.metadata.dst_node_id}"}),
    })
    return Message(content, reply_to=msg)


def test_the_guarantee_states_the_largest_delta_not_the_worst_partners(tmp_path):
    # The worst epsilon is at delta 1e-6 (a max-delta floor), another partner's at 1e-5: "at most (e, d)"
    # must hold for both, so d is 1e-5 (a review: taking the worst partner's delta passed every test)
    strategy, report = _strategy(tmp_path, 2)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord({}),
                                         FakeGrid(2)))
    replies = [_reply_with_privacy(msgs[0], np.ones(4), 7.5, 8.0, delta=1e-6),
               _reply_with_privacy(msgs[1], np.ones(4), 3.0, 8.0, delta=1e-5)]
    strategy.aggregate_train(1, replies)
    assert "at most (7.500, 1e-05)" in report.guarantee()


@pytest.mark.parametrize("delta,partners", [(0.5, 2), (0.1, 10)])
def test_central_dp_refuses_a_delta_of_one_over_the_partners(tmp_path, delta, partners):
    # A review: central DP accepted target-delta 0.5 with 2 partners and stated "(2.439, 0.5)-DP"
    cfg = resolve_config(None, {"dp-mode": "central", "target-delta": delta, "min-nodes": partners})
    with pytest.raises(ConfigError, match=f"at least 1 / {partners} partners"):
        with_privacy(FedAvg(min_train_nodes=partners, min_available_nodes=partners), cfg, PrivacyReport(tmp_path, cfg))
    from server.app import initial_model

    with pytest.raises(ConfigError, match="under central DP"):  # also before the run starts (fedrec-server check)
        initial_model({**cfg, "synthetic-users": 50, "synthetic-items": 20})
    ok = resolve_config(None, {"dp-mode": "central", "target-delta": delta / 2 if partners == 2 else 0.09,
                               "min-nodes": partners})
    with_privacy(FedAvg(min_train_nodes=partners, min_available_nodes=partners), ok, PrivacyReport(tmp_path, ok))


@pytest.mark.parametrize("mode", ["off", "local"])
def test_the_guarantee_names_partners_floors_and_their_own_targets(tmp_path, mode):
    # Partner 1's node config max-epsilon = 4 forced DP-SGD (or lowered the run's 8); partner 2 followed the run
    strategy, report = _strategy(tmp_path, 2, **{"dp-mode": mode})
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord({}),
                                         FakeGrid(2)))
    second = (7.5, 8.0) if mode == "local" else (0.0, 0.0)
    replies = [_reply_with_privacy(msgs[0], np.ones(4), 3.9, 4.0), _reply_with_privacy(msgs[1], np.ones(4), *second)]
    strategy.aggregate_train(1, replies)
    sentence = report.guarantee()
    if mode == "off":
        assert "1 of 2 partners trained with local DP-SGD by their own node config" in sentence
        assert "(3.900, 1e-05)" in sentence and "targets 4)" in sentence and "carry no local DP" in sentence
    else:
        assert "(7.500, 1e-05)" in sentence and "targets 4, 8)" in sentence
    written = json.loads((tmp_path / "privacy.json").read_text())
    floored = f"partner-{msgs[0].metadata.dst_node_id}"  # FedAvg samples the nodes in a random order
    assert written["partners"][floored]["epsilon"] == 3.9  # also listed when the run itself is off


def test_two_partners_with_one_label_are_listed_apart(tmp_path):
    # A review: two organisations with the same data-identity sent one label; the second reply's epsilon 2.0
    # overwrote the first's 7.5 and the guarantee read "at most (2.000, ...) over 1 partners"
    strategy, report = _strategy(tmp_path, 2)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord({}),
                                         FakeGrid(2)))
    replies = [_reply_with_privacy(m, np.ones(4), eps, 8.0) for m, eps in zip(msgs, (7.5, 2.0))]
    for r in replies:
        r.content["privacy"]["partner"] = "partner-same"
    strategy.aggregate_train(1, replies)
    assert sorted(p["epsilon"] for p in report.partners.values()) == [2.0, 7.5]
    assert "at most (7.500, 1e-05) over 2 partners" in report.guarantee()
    # the next round: the same two nodes keep their own entries
    strategy.aggregate_train(2, replies[::-1])
    assert len(report.partners) == 2
    # a noised evaluation reply of the node listed apart lands in its own entry too
    apart = next(p for p in report.partners if "@node-" in p)
    node = report.partners[apart]["node-id"]
    evaluation = _reply_with_privacy(next(m for m in msgs if m.metadata.dst_node_id == node), np.ones(4), 2.5, 8.0)
    evaluation.content["privacy"]["partner"] = "partner-same"
    report.note_evaluation(2, [evaluation])
    assert report.partners[apart]["epsilon"] == 2.5 and len(report.partners) == 2


def test_one_label_in_different_rounds_or_paths_never_lowers_the_spend(tmp_path):
    # A review: nodes sharing a label answered in different rounds (sampling, a refusal) or one was rejected;
    # the later, smaller epsilon overwrote the larger and the guarantee understated the spend
    report, reply, msgs = _one_label_replies(tmp_path)

    report.note_unaggregated(1, reply(0, 3.0), "rejected: norm")  # the larger spend arrives first, rejected
    report.screen(1, [reply(1, 1.0)])
    report.screen(2, [reply(1, 1.2)])
    assert max(p["epsilon"] for p in report.partners.values()) == 3.0
    assert "at most (3.000," in report.guarantee()


def test_a_node_listed_apart_stays_apart_when_it_answers_alone(tmp_path):
    # Mutation audit: the apart node answering a later round alone went into the other partner's entry
    report, reply, msgs = _one_label_replies(tmp_path)

    report.screen(1, [reply(0, 1.0), reply(1, 2.0)])
    apart = next(label for label in report.partners if "@node-" in label)
    i = next(i for i, m in enumerate(msgs) if f"@node-{m.metadata.dst_node_id}" in apart)
    keeper = dict(report.partners["partner-same"])
    report.screen(2, [reply(i, 6.0)])
    assert report.partners[apart]["rounds-trained"] == [1, 2] and report.partners[apart]["epsilon"] == 6.0
    assert report.partners["partner-same"]["epsilon"] == keeper["epsilon"]
    assert report.partners["partner-same"]["rounds-trained"] == keeper["rounds-trained"]


def _one_label_replies(tmp_path):
    """Two nodes whose replies carry one partner label (the same data-identity): (report, reply(i, epsilon), msgs)."""
    strategy, report = _strategy(tmp_path, 2)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord({}),
                                         FakeGrid(2)))

    def reply(i: int, eps: float) -> Message:
        r = _reply_with_privacy(msgs[i], np.ones(4), eps, 8.0)
        r.content["privacy"]["partner"] = "partner-same"
        return r

    return report, reply, msgs


@pytest.mark.parametrize("aggregation,accounted", [("fedavg", True), ("fedprox", True), ("fedadam", False),
                                                   ("median", False), ("trimmed-mean", False)])
def test_central_dp_states_an_epsilon_only_for_what_the_accountant_covers(tmp_path, aggregation, accounted):
    # A test audit: with `account = noise > 0` (any aggregation) every test passed, and a median's or
    # FedAdam's release would have been stated as (epsilon, delta)-DP by an accountant for the mean
    from server.strategy_factory import aggregation_strategy

    n = 4
    cfg = resolve_config(None, {"min-nodes": n, "dp-mode": "central", "aggregation": aggregation})
    report = PrivacyReport(tmp_path, cfg)
    strategy = with_privacy(aggregation_strategy(cfg), cfg, report)
    update = np.full(DIM, 0.5 / math.sqrt(DIM), np.float32)
    assert _round(strategy, 1, n, np.zeros(DIM, np.float32), [update] * n) is not None
    # what lies outside the guarantee, as local runs say it (a privacy review)
    assert "evaluation results" in report.as_dict()["central"]["outside"]
    if accounted:  # one release at sigma = 1, no amplification: Opacus' RDP analysis, independently
        from opacus.accountants.analysis import rdp as opacus_rdp

        orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
        rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=1.0, steps=1, orders=orders)
        expected, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=report.central["delta"])
        assert report.central["epsilon"] == pytest.approx(expected, rel=0.02)
        assert "noised but not accounted" not in report.guarantee()
        # for one user: the same release at half the noise multiplier (sensitivity 2C), also stated
        rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=0.5, steps=1, orders=orders)
        per_user, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=report.central["delta"])
        assert report.as_dict()["central"]["epsilon-per-user"] == pytest.approx(per_user, rel=0.02)
        assert f"({per_user:.3f}, 1e-05)-DP for any one user of a partner" in report.guarantee()
    else:
        assert report.central["epsilon"] is None and report.central["accountant"] == "none"
        assert "noised but not accounted" in report.guarantee()
