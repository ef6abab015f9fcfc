"""SecAgg+ on the Message API, in process: the server wrapper (server/secure_aggregation.py) against
Flower's own ``secaggplus_mod`` on the clients (client/secure_aggregation.py), through a grid that
delivers messages to in-process ClientApps. Real Flower crypto, no network; toy partners whose
'training' adds a known delta, and one test with the real apps (DP-SGD) on simulations.local_grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from client.secure_aggregation import make_secure_aggregation_mod
from common.config import resolve_config
from common.errors import ConfigError
from common.task import catalogue, new_model
from server.secagg_protocol import SecAggPlusParams
from server.secure_aggregation import SecureAggregation, secagg_params

SHAPES = {"emb.weight": (7, 3), "block.bias": (3,), "out": (2, 2, 2)}
SCALE = 100.0
CLIP = 8.0
Q = 2**22
MAX_WEIGHT = 1000.0


@pytest.fixture(autouse=True)
def _server_identity():
    # Messages created outside a running ServerApp need a task identity (Flower sets it in a real run).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _arrays(rng: np.random.Generator, spread: float) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * spread).astype(np.float32) for k, s in SHAPES.items()}


class Partner:
    """A ClientApp whose 'training' adds a known delta, behind our SecAgg+ mod; records what it sent."""

    def __init__(self, node_id: int, delta: dict[str, np.ndarray], num_examples: int, overrides: dict) -> None:
        self.node_id = node_id
        self.delta = delta
        self.num_examples = num_examples
        self.context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(), run_config={})
        self.sent: list[RecordDict] = []
        self.app_errors: list[str] = []
        self.app = ClientApp()

        @self.app.train(mods=[make_secure_aggregation_mod(overrides)])
        def train(msg: Message, context: Context) -> Message:
            new = ArrayRecord({k: Array(msg.content["arrays"][k].numpy() + d) for k, d in self.delta.items()})
            metrics = MetricRecord({"num-examples": self.num_examples, "train-loss": float(node_id)})
            return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    def handle(self, msg: Message) -> Message:
        reply = self.app(msg, self.context)
        if reply.has_content():
            self.sent.append(reply.content)
        else:
            self.app_errors.append(reply.error.reason)
        return reply


class InProcessGrid:
    """Delivers each message to its partner; partners in ``drop_after`` stop answering after that many train messages."""

    def __init__(self, partners: list[Partner], drop_after: dict[int, int] | None = None) -> None:
        self.partners = {p.node_id: p for p in partners}
        self.drop_after = drop_after or {}
        self.seen: dict[int, int] = {}

    def get_node_ids(self):
        return list(self.partners)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            self.seen[nid] = self.seen.get(nid, 0) + 1
            if nid in self.drop_after and self.seen[nid] > self.drop_after[nid]:
                continue  # a partner that went away: no reply at all (the stage's timeout passes)
            replies.append(self.partners[nid].handle(msg))
        return replies


def _federation(n: int, seed: int = 0, spread: float = 0.01, examples=None, overrides=None):
    rng = np.random.default_rng(seed)
    overrides = {"secure-aggregation": True, "secagg-delta-scale": SCALE, **(overrides or {})}
    examples = examples or [int(x) for x in rng.integers(20, 400, size=n)]
    partners = [Partner(101 + i, _arrays(rng, spread), examples[i], overrides) for i in range(n)]
    global_arrays = ArrayRecord({k: Array(v) for k, v in _arrays(rng, 1.0).items()})
    return partners, global_arrays


def _secure_round(partners, global_arrays, *, drop_after=None, threshold=0.67):
    grid = InProcessGrid(partners, drop_after)
    inner = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    strategy = SecureAggregation(
        inner, SecAggPlusParams(num_shares=1.0, threshold=threshold, clipping_range=CLIP, max_weight=MAX_WEIGHT),
        delta_scale=SCALE,
    )
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid))
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(1, replies)
    return strategy, arrays, metrics, grid


def _fedavg(partners, global_arrays) -> dict[str, np.ndarray]:
    """Plain FedAvg of the partners' new weights, computed here independently (float64)."""
    total = sum(p.num_examples for p in partners)
    return {k: global_arrays[k].numpy().astype(np.float64)
            + sum(p.num_examples * p.delta[k].astype(np.float64) for p in partners) / total for k in SHAPES}


def _tolerance(partners) -> float:
    """Bound on SecAgg+'s error in weight units: each partner's stochastic rounding moves a value by
    < one quantisation step 2C/Q; the sum is divided by the summed weights, then by the delta scale;
    quantising the weights themselves adds a relative 1/(w_i Q) at most (negligible, included)."""
    weights = [round(p.num_examples / MAX_WEIGHT * Q) / Q for p in partners]
    step = 2 * CLIP / Q
    return len(partners) * step / sum(weights) / SCALE + 1e-6


def test_aggregate_equals_fedavg_within_quantisation_error():
    # Prepare
    partners, global_arrays = _federation(4, seed=1)

    # Execute
    strategy, arrays, metrics, _ = _secure_round(partners, global_arrays)

    # Assert
    expected = _fedavg(partners, global_arrays)
    tol = _tolerance(partners)
    for k in SHAPES:
        assert np.max(np.abs(arrays[k].numpy() - expected[k])) <= tol
    # ... and it is not merely the global model: the deltas are ~1000x the tolerance
    assert max(np.max(np.abs(expected[k] - global_arrays[k].numpy())) for k in SHAPES) > 100 * tol


def test_under_central_dp_partners_weigh_equally_whatever_their_examples():
    # Prepare: very unequal partners; central DP's noise is sized for the plain mean (clip / m)
    central = {"dp-mode": "central", "central-clipping": "client"}
    partners, global_arrays = _federation(3, seed=4, examples=[900, 50, 50], overrides=central)
    # Execute
    _, arrays, _, _ = _secure_round(partners, global_arrays)
    # Assert: the plain mean of the deltas (independent float64), not FedAvg's 900:50:50 weighting
    plain = {k: global_arrays[k].numpy().astype(np.float64) + np.mean([p.delta[k] for p in partners], axis=0)
             for k in SHAPES}
    tol = 2 * CLIP / Q / SCALE + 1e-6
    for k in SHAPES:
        assert np.max(np.abs(arrays[k].numpy() - plain[k])) <= tol
    weighted = _fedavg(partners, global_arrays)
    assert max(np.max(np.abs(weighted[k] - plain[k])) for k in SHAPES) > 100 * tol


def test_server_never_holds_an_individual_update():
    partners, global_arrays = _federation(4, seed=2)
    strategy, arrays, _, _ = _secure_round(partners, global_arrays)
    received = strategy.last_received  # the replies as they reached the server, before unmasking
    assert sorted(nid for nid, _ in received) == [p.node_id for p in partners]
    for _, content in received:
        # No weights, no deltas: only the masked vector (stage configs) and metrics
        assert set(content.keys()) == {RECORD_KEY_CONFIGS, "metrics"}
        assert not content.array_records
        vector = np.concatenate([bytes_to_ndarray(b).ravel() for b in content[RECORD_KEY_CONFIGS]["masked_params"]])
        # An unmasked quantised value lies in [0, Q); masked ones are uniform over [0, 2^32).
        assert np.mean(vector >= Q) > 0.9
        assert set(content["metrics"].keys()) >= {"num-examples", "secagg-peak"}
    # What the inner strategy got instead: the aggregate, not any partner's weights
    assert arrays is not None
    for p in partners:
        own = global_arrays["out"].numpy() + p.delta["out"]
        assert not np.allclose(arrays["out"].numpy(), own, atol=1e-6)


def test_masked_vectors_hide_the_update():
    # Two rounds with identical deltas: masks are fresh each round, so the masked vectors differ
    partners, global_arrays = _federation(3, seed=3)
    first = dict(_secure_round(partners, global_arrays)[0].last_received)[101][RECORD_KEY_CONFIGS]["masked_params"]
    second = dict(_secure_round(partners, global_arrays)[0].last_received)[101][RECORD_KEY_CONFIGS]["masked_params"]
    assert first != second


def test_one_of_four_dropping_out_still_completes():
    # Prepare: partner 104 shares its keys, then never returns a masked vector (dies while training)
    partners, global_arrays = _federation(4, seed=4)

    # Execute: setup (1) and share_keys (2) answered, train/collect (3) not
    strategy, arrays, _, _ = _secure_round(partners, global_arrays, drop_after={104: 2})

    # Assert: FedAvg over the three survivors, the dropped partner's masks removed
    survivors = partners[:3]
    expected = _fedavg(survivors, global_arrays)
    assert arrays is not None
    for k in SHAPES:
        assert np.max(np.abs(arrays[k].numpy() - expected[k])) <= _tolerance(survivors)


def test_dropout_before_sharing_keys_is_left_out():
    # Flower 1.42's workflow would ask for shares a partner that died at setup never made
    partners, global_arrays = _federation(4, seed=5)
    _, arrays, _, _ = _secure_round(partners, global_arrays, drop_after={102: 1})
    survivors = [p for p in partners if p.node_id != 102]
    expected = _fedavg(survivors, global_arrays)
    for k in SHAPES:
        assert np.max(np.abs(arrays[k].numpy() - expected[k])) <= _tolerance(survivors)


def test_too_many_dropouts_keep_the_global_model(caplog):
    partners, global_arrays = _federation(4, seed=6)
    # threshold 0.67 of 4 shares = 3: two partners gone is one too many
    _, arrays, metrics, _ = _secure_round(partners, global_arrays, drop_after={101: 2, 102: 2})
    assert arrays is None and metrics is None
    # ... and the round stops at the stage that counts them, not later when unmasking runs short of shares
    # (a mutation audit: an off-by-one in that count was only backed up by the unmask failure)
    assert "after stage collect_masked_vectors only 2 of 4 partners remain" in caplog.text


def test_no_value_is_clipped_and_peak_is_reported():
    partners, global_arrays = _federation(4, seed=7, spread=0.01)
    strategy, _, _, _ = _secure_round(partners, global_arrays)
    for nid, content in strategy.last_received:
        partner = next(p for p in partners if p.node_id == nid)
        # Independent: largest |delta| x scale x quantised weight, over the clipping range
        w = round(partner.num_examples / MAX_WEIGHT * Q) / Q
        sent = [(global_arrays[k].numpy() + d).astype(np.float64) - global_arrays[k].numpy() for k, d in partner.delta.items()]
        peak = max(float(np.max(np.abs(d))) for d in sent) * SCALE * w / CLIP
        assert content["metrics"]["secagg-peak"] == pytest.approx(peak, rel=1e-6)
        assert content["metrics"]["secagg-peak"] < 1.0


def test_update_that_would_be_clipped_is_refused_not_clipped(caplog):
    # deltas ~1.0 x scale 100 x weight ~0.4 >> clipping range 8
    partners, global_arrays = _federation(4, seed=8, spread=1.0, examples=[400, 400, 400, 400])
    strategy, arrays, _, _ = _secure_round(partners, global_arrays)
    assert arrays is None  # nobody sent a (clipped) masked vector
    assert [content for _, content in strategy.last_received] == [None] * 4  # four error replies
    assert all("would clip" in p.app_errors[-1] for p in partners)
    # The coordinator learns why (a deployment review: it only saw "no partner returned a masked update")
    said = [r.getMessage() for r in caplog.records if "sent no masked update" in r.getMessage()]
    assert len(said) == 4 and all("would clip" in line for line in said)


def test_partner_requiring_secagg_refuses_plain_train_message():
    partners, global_arrays = _federation(2, seed=9)
    msg = Message(RecordDict({"arrays": global_arrays, "config": ConfigRecord({})}), dst_node_id=101, message_type="train")
    reply = partners[0].handle(msg)
    assert reply.has_error() and "only under secure aggregation" in reply.error.reason


def test_config_refuses_what_a_sum_cannot_do():
    with pytest.raises(ConfigError, match="individual updates"):
        secagg_params(resolve_config(None, {"secure-aggregation": True, "aggregation": "median"}), timeout=10)
    with pytest.raises(ConfigError, match="central-clipping"):
        secagg_params(resolve_config(None, {"secure-aggregation": True, "dp-mode": "central"}), timeout=10)
    with pytest.raises(ConfigError, match="secagg-threshold"):
        secagg_params(resolve_config(None, {"secagg-threshold": 1.5}), timeout=10)
    params = secagg_params(resolve_config(None, {"dp-mode": "central", "central-clipping": "client"}), timeout=10)
    assert params.shares_and_threshold(5) == (5, 3)


def test_config_reads_the_effective_dp_mode():
    # dp-mode off (or dp = false): no central clipping to refuse
    for off in ({"dp-mode": "off"}, {"dp": False, "dp-mode": "off"}, {"dp": False}):
        params = secagg_params(resolve_config(None, {"secure-aggregation": True, **off}), timeout=10)
        assert params.shares_and_threshold(4) == (4, 3)
    # dp = false with dp-mode central contradicts itself: refused when resolved (it silently meant "off")
    with pytest.raises(ConfigError, match="dp = false turns all DP off"):
        resolve_config(None, {"secure-aggregation": True, "dp": False, "dp-mode": "central"})
    # both = local + central: server-side clipping is refused as for central
    with pytest.raises(ConfigError, match="central-clipping"):
        secagg_params(resolve_config(None, {"secure-aggregation": True, "dp-mode": "both"}), timeout=10)
    # an unknown mode is the shared one-line error, not silently "no central DP"
    with pytest.raises(ConfigError, match="dp-mode = 'centrol' is unknown"):
        secagg_params(resolve_config(None, {"secure-aggregation": True, "dp-mode": "centrol"}), timeout=10)


@pytest.mark.slow
def test_real_apps_secure_round_matches_plain_round(tmp_path):
    """The whole stack (our ServerApp with validation and privacy report, our ClientApp with DP-SGD)
    on the in-process LocalGrid: one round with SecAgg+ gives the plain round's global model
    within quantisation error (same seeds, so the partners' updates are the same; were training not
    deterministic, the two models would differ far beyond the tolerance and the test would fail)."""
    import torch

    from simulations.local_grid import run_local

    tiny = {"num-server-rounds": 1, "synthetic-users": 90, "synthetic-items": 30, "max-seq-len": 10,
            "embedding-dim": 8, "num-blocks": 1, "batch-size": 8, "local-epochs": 1, "run-dir": str(tmp_path)}
    models = {}
    for name, secure in (("plain", False), ("secure", True)):
        run_dir = run_local({**tiny, "secure-aggregation": secure, "run-name": name}, 3)
        models[name] = torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]
        assert [json.loads(x)["num-partners"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [3]
        # privacy.json names partners by their label and ledger under SecAgg+ too, not node-<id>
        partners = json.loads((run_dir / "privacy.json").read_text())["partners"]
        assert sorted(partners) == ["partner-0", "partner-1", "partner-2"], sorted(partners)
        # the ledger's file name only: an absolute path would name the partner's folders
        assert all(p["ledger-path"] == f"{label}.sqlite" for label, p in partners.items()), partners
    cfg = resolve_config(None, tiny)
    initial = new_model(cfg, len(catalogue(cfg))).state_dict()
    # 3 partners of ~30 users: weights ~0.03 each, so the SecAgg+ error bound is
    # 3 * 2C/Q / sum(weights) / scale ~ 1.3e-6; allow sum(weights) down to 0.05, plus float32 rounding
    tol = 3 * (2 * CLIP / Q) / 0.05 / SCALE + 1e-6
    moved = 0.0
    for key, plain in models["plain"].items():
        assert torch.max(torch.abs(models["secure"][key] - plain)).item() <= tol
        moved = max(moved, torch.max(torch.abs(plain - initial[key])).item())
    assert moved > 100 * tol  # the round changed the model far beyond the tolerance


def test_a_failed_secure_round_still_tells_the_privacy_report_of_every_reply(caplog):
    # A partner journey review: every partner refused ("budget exhausted") under SecAgg+, unmasking failed, and
    # the replies never reached the inner strategy: privacy.json listed no partner and fedrec-server report no reason
    partners, global_arrays = _federation(4, seed=8, spread=1.0, examples=[400, 400, 400, 400])  # all refuse
    told: list[tuple[int, int, str]] = []
    grid = InProcessGrid(partners)
    inner = FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    strategy = SecureAggregation(
        inner, SecAggPlusParams(num_shares=1.0, threshold=0.67, clipping_range=CLIP, max_weight=MAX_WEIGHT),
        delta_scale=SCALE, on_unaggregated=lambda rnd, msg, reason: told.append((rnd, msg.metadata.src_node_id, reason)))
    replies = grid.send_and_receive(list(strategy.configure_train(1, global_arrays, ConfigRecord({}), grid)))
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert sorted(node for _, node, _ in told) == [101, 102, 103, 104]
    assert all(rnd == 1 and reason.startswith("round failed: secure aggregation failed") for rnd, _, reason in told)


def test_the_servers_secure_strategy_reports_to_the_privacy_hook():
    from common.config import resolve_config
    from server.strategy_factory import build_strategy

    def hook(rnd, msg, reason):  # noqa: ANN001, ANN202
        pass

    from server.secure_aggregation import with_secure_aggregation

    cfg = resolve_config(None, {"secure-aggregation": True})
    strategy = build_strategy(cfg, on_unaggregated=hook)
    strategy.inner = with_secure_aggregation(strategy.inner, cfg)  # as server/app.py wraps it
    assert isinstance(strategy.inner, SecureAggregation) and strategy.inner.on_unaggregated is hook


class PushPullGrid(InProcessGrid):
    """The same delivery through push/pull (as a real grid), so LateReplyGrid can wrap it."""

    pull_interval = 0.0

    def __init__(self, partners, drop_after=None) -> None:  # noqa: ANN001
        super().__init__(partners, drop_after)
        self._replies: dict[str, Message] = {}
        self._count = 0

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for msg in messages:
            self._count += 1
            msg_id = f"m{self._count}"
            msg.metadata.__dict__["_message_id"] = msg_id
            for reply in self.send_and_receive([msg]):
                self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, ids):  # noqa: ANN001, ANN201
        out = []
        for msg_id in list(ids):
            if msg_id in self._replies:
                reply = self._replies.pop(msg_id)
                reply.metadata.__dict__["_reply_to_message_id"] = msg_id
                out.append(reply)
        return out


def test_a_partner_gone_before_unmasking_is_aggregated_and_not_listed_as_silent():
    # A partner that sent its masked update and went away before unmasking is in the aggregate (SecAgg+
    # rebuilds its self-mask from the others' shares); the unanswered unmask message is no training
    # message: before, the run's end listed the partner under no-reply ("never replied to its training
    # message") for a round it was aggregated in
    from server.late_replies import LateReplyGrid

    partners, global_arrays = _federation(4, seed=9)
    inner_grid = PushPullGrid(partners, drop_after={104: 3})  # setup, share keys, collect answered
    late, unanswered = [], []
    grid = LateReplyGrid(inner_grid, lambda r, m: late.append(r), lambda r, n: unanswered.append((r, n)))
    strategy = SecureAggregation(
        FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2),
        SecAggPlusParams(num_shares=1.0, threshold=0.5, clipping_range=CLIP, max_weight=MAX_WEIGHT, timeout=0.0),
        delta_scale=SCALE)
    config = ConfigRecord({"server-round": 1})
    replies = grid.send_and_receive(list(strategy.configure_train(1, global_arrays, config, grid)), timeout=0.0)
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = _fedavg(partners, global_arrays)  # all four, 104 included
    for k in SHAPES:
        assert np.max(np.abs(arrays[k].numpy() - expected[k])) <= _tolerance(partners)
    assert grid.finish() == [] and unanswered == [] and late == []


def test_a_partner_gone_while_training_under_secagg_is_listed_as_silent():
    # ... while the message that carried its training work, never answered, is still listed
    from server.late_replies import LateReplyGrid

    partners, global_arrays = _federation(4, seed=9)
    unanswered = []
    grid = LateReplyGrid(PushPullGrid(partners, drop_after={104: 2}), lambda r, m: None,
                         lambda r, n: unanswered.append((r, n)))
    strategy = SecureAggregation(
        FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2),
        SecAggPlusParams(num_shares=1.0, threshold=0.5, clipping_range=CLIP, max_weight=MAX_WEIGHT, timeout=0.0),
        delta_scale=SCALE)
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord({"server-round": 1}), grid))
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages, timeout=0.0))
    assert arrays is not None and grid.finish() == [(1, 104)] and unanswered == [(1, 104)]


@pytest.mark.parametrize("mode", ["central", "both"])
def test_real_apps_central_dp_with_client_clipping_under_secagg_aggregates_every_partner(tmp_path, mode):
    # A researcher journey: Flower's fixedclipping_mod wants one ConfigRecord, and the SecAgg+ train
    # message holds two, so every partner refused every round and the run kept the initial model
    import torch

    from simulations.local_grid import run_local

    tiny = {"num-server-rounds": 2, "synthetic-users": 90, "synthetic-items": 30, "max-seq-len": 10,
            "embedding-dim": 8, "num-blocks": 1, "batch-size": 8, "local-epochs": 1, "run-dir": str(tmp_path),
            "secure-aggregation": True, "dp-mode": mode, "central-clipping": "client", "run-name": mode}
    run_dir = run_local(tiny, 3)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["num-partners"] for r in rounds] == [3, 3]
    central = json.loads((run_dir / "privacy.json").read_text())["central"]
    assert [(r["round"], r["partners"]) for r in central["rounds"]] == [(1, 3), (2, 3)]
    assert 0 < central["rounds"][0]["epsilon"] < central["rounds"][1]["epsilon"] == central["epsilon"]
    cfg = resolve_config(None, tiny)
    initial = new_model(cfg, len(catalogue(cfg))).state_dict()
    trained = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert max(torch.max(torch.abs(trained[k] - initial[k])).item() for k in initial) > 1e-3
