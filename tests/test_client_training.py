"""The ClientApp's train/evaluate handlers: DP-SGD changes weights, epsilon composes over rounds
and equals what Opacus' accountant gives for the whole history of the run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict  # noqa: F401
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from common.config import resolve_config
from common.task import new_model, partner_data
from common.training import user_count_for_training
from tests.conftest import flower_message

TINY = {
    "synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16,
    "num-blocks": 1, "local-epochs": 1, "batch-size": 16, "num-server-rounds": 3,
}
NODE = {"partition-id": 0, "num-partitions": 2}


def send(app, kind: str, arrays: ArrayRecord, context: Context, server_round: int) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    msg = flower_message(content, kind)
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply


def test_dp_training_changes_weights_and_epsilon_composes(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path), "local-epochs": 2}  # (a review: the plan ignoring epochs passed at 1)
    cfg = resolve_config(None, overrides)
    app = make_client_app(overrides)
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    data = partner_data(cfg, NODE)
    arrays = ArrayRecord(new_model(cfg, data.num_items).state_dict())
    epsilons = []
    for rnd in (1, 2, 3):
        reply = send(app, "train", arrays, context, rnd)
        new = reply.content["arrays"]
        changed = [k for k in arrays if not np.allclose(arrays[k].numpy(), new[k].numpy())]
        assert len(changed) >= len(list(arrays.keys())) // 2
        arrays = new
        epsilons.append(reply.content["metrics"]["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]

    # Independent recomputation: Opacus' RDP accountant over the whole run's steps.
    metrics = reply.content["metrics"]
    users = user_count_for_training(data)
    steps = math.ceil(users / TINY["batch-size"])
    acc = RDPAccountant()
    acc.history = [(float(metrics["noise-multiplier"]), 1.0 / steps, steps * overrides["local-epochs"] * 3)]
    expected = acc.get_epsilon(delta=float(metrics["delta"]))
    assert math.isclose(epsilons[-1], expected, rel_tol=1e-6)
    # Calibrated for the planned 3 rounds: the last round lands on the target.
    assert epsilons[-1] <= cfg["target-epsilon"] * 1.01
    assert epsilons[-1] > cfg["target-epsilon"] * 0.9


def test_evaluate_reports_sums_and_counts(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path), "dp": False}
    cfg = resolve_config(None, overrides)
    app = make_client_app(overrides)
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    data = partner_data(cfg, NODE)
    torch.manual_seed(0)
    reply = send(app, "evaluate", ArrayRecord(new_model(cfg, data.num_items).state_dict()), context, 1)
    m = reply.content["metrics"]
    assert m["num-users"] == data.num_users
    assert 0 <= m["ndcg@10-sum"] <= m["hit@10-sum"] <= m["num-users"]


def test_bad_partition_is_an_error_reply_not_a_crash(tmp_path):
    app = make_client_app({**TINY, "run-dir": str(tmp_path)})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 7, "num-partitions": 2}, state=RecordDict(), run_config={})
    msg = flower_message(RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({})}), "train")
    reply = app(msg, context)
    assert reply.has_error() and "partition-id 7 is outside 0..1" in reply.error.reason


def test_every_planned_step_runs_and_is_accounted_at_the_planned_rate():
    # 742 users at batch 8: the plan is rate 1/93 over 93 steps. Opacus' sampler runs int(1/rate)
    # steps, and 1/(1/93) is 92.999... in floating point: 92 steps recorded at rate 1/92, so the
    # ledger over-stated the spend and a partner refused its last planned round.
    from common.privacy import steps_per_epoch
    from common.training import DPSettings, train_local

    assert int(1 / (1 / 93)) == 92  # the floating-point fact behind it
    cfg = resolve_config(None, {"synthetic-users": 920, "synthetic-items": 30, "embedding-dim": 8, "num-blocks": 1,
                                "max-seq-len": 10})
    data = partner_data(cfg, {"partition-id": 0, "num-partitions": 1})
    rate, steps = steps_per_epoch(user_count_for_training(data), 8)
    assert steps == 93
    for mode in ("fused", "hooks"):  # our loader; Opacus' make_private (ghost shares that code path)
        model = new_model(cfg, data.num_items)
        result = train_local(model, data, epochs=1, batch_size=8, learning_rate=1e-3, max_len=10,
                             dp=DPSettings(1.0, 1.0, "rdp", mode, 1), device="cpu")
        assert result.steps == 93, mode
        assert [(m[1], m[2]) for m in result.mechanisms] == [(rate, 93)], mode


def test_batch_size_one_divides_by_one_user_not_zero():
    # Opacus' int(users * (1 / steps)) is int(49 * (1/49)) = 0: the noised sum was divided by 0, every
    # weight became NaN and the round's epsilon was spent on an update the server refuses
    from common.data import build_sequences, generate_synthetic
    from common.models import SASRec
    from common.per_user_clipping import expected_batch
    from common.training import DPSettings, train_local

    assert int(49 * (1 / 49)) == 0 and expected_batch(49, 49) == 1
    assert int(392 * (1 / 49)) == 7 and expected_batch(392, 49) == 8  # one short before
    data = next(d for n in range(49, 80)
                if user_count_for_training(d := build_sequences(generate_synthetic(num_users=n, num_items=15,
                                                                                   mean_length=7, seed=0))) == 49)
    for mode in ("fused", "hooks", "ghost"):
        torch.manual_seed(0)
        model = SASRec(data.num_items, max_len=6, dim=8, num_blocks=1, num_heads=2, dropout=0.0, tied_output=False)
        train_local(model, data, epochs=1, batch_size=1, learning_rate=0.01, max_len=6,
                    dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, noise_seed=1))
        assert all(torch.isfinite(p).all() for p in model.parameters()), mode


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_partner_refuses_a_model_built_on_another_catalogue(tmp_path, kind):
    # A coordinator walkthrough: a partner whose catalogue file was reordered trained every item row
    # on the wrong item without a word; a shorter one failed inside torch's load_state_dict.
    from common.data.catalogue import catalogue_fingerprint
    from common.task import catalogue

    overrides = {**TINY, "run-dir": str(tmp_path), "dp": False}
    cfg = resolve_config(None, overrides)
    app = make_client_app(overrides)
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
    items = catalogue(cfg)
    for fingerprint, accepted in ((catalogue_fingerprint(items), True), (catalogue_fingerprint(items[::-1]), False),
                                  (catalogue_fingerprint(items[:-1]), False)):
        context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
        config = ConfigRecord({"server-round": 1, "catalogue-fingerprint": fingerprint})
        reply = app(flower_message(RecordDict({"arrays": arrays, "config": config}), kind), context)
        assert reply.has_error() != accepted
        if not accepted:
            assert reply.error.reason.startswith("the item catalogue at this partner is not the one of the coordinator")
            assert reply.error.code == 400  # the partner can fix it


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_partner_refuses_a_model_reading_other_item_text_features(tmp_path, kind):
    # A review: the frozen text table is not sent, so a partner holding an outdated or differently
    # encoded features file of the same width trained on other inputs without any error
    import numpy as np

    from common.item_text import save_features, table_fingerprint
    from common.task import catalogue

    items = catalogue(resolve_config(None, TINY))
    path = save_features(tmp_path / "text.npz", items, np.random.default_rng(0).normal(size=(len(items), 8)),
                         model="m", texts=[f"item {i}" for i in items])
    overrides = {**TINY, "run-dir": str(tmp_path), "dp": False, "item-features": "text", "item-text-features": str(path)}
    cfg = resolve_config(None, overrides)
    model = new_model(cfg, len(items))
    arrays, ours = ArrayRecord(model.state_dict()), table_fingerprint(model)
    assert ours is not None and table_fingerprint(new_model(resolve_config(None, TINY), len(items))) is None
    app = make_client_app(overrides)
    for fingerprint, accepted in ((ours, True), ("0123456789abcdef", False)):
        context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
        config = ConfigRecord({"server-round": 1, "item-text-fingerprint": fingerprint})
        reply = app(flower_message(RecordDict({"arrays": arrays, "config": config}), kind), context)
        assert reply.has_error() != accepted, reply.error.reason if reply.has_error() else ""
        if not accepted:
            assert reply.error.reason.startswith("the item text features at this partner")
            assert reply.error.code == 400


def test_a_partner_refuses_item_text_encoded_otherwise_but_not_last_bit_noise(tmp_path):
    # Features encoded locally from the metadata were not checked at all (their last bits differ between
    # machines, so no exact fingerprint): another encoder or metadata file trained on other inputs unseen
    import numpy as np

    from common.item_text import SKETCH_TOLERANCE, save_features, sketch_differs, table_sketch
    from common.task import catalogue

    items = catalogue(resolve_config(None, TINY))
    table = np.random.default_rng(0).normal(size=(len(items), 8))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    path = save_features(tmp_path / "text.npz", items, table, model="m", texts=[f"item {i}" for i in items])
    overrides = {**TINY, "run-dir": str(tmp_path), "dp": False, "item-features": "text", "item-text-features": str(path)}
    model = new_model(resolve_config(None, overrides), len(items))
    ours = table_sketch(model)
    assert len(ours) == 32 * 4 and table_sketch(new_model(resolve_config(None, TINY), len(items))) is None
    noisy = [x + 1e-6 for x in ours]  # another machine's last bits
    other = np.random.default_rng(1).normal(size=table.shape)  # another encoder
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    elsewhere = save_features(tmp_path / "other.npz", items, other, model="m2", texts=[f"item {i}" for i in items])
    theirs = table_sketch(new_model(resolve_config(None, {**overrides, "item-text-features": str(elsewhere)}), len(items)))
    assert sketch_differs(ours, noisy, SKETCH_TOLERANCE[False]) is None
    assert sketch_differs(ours, theirs, SKETCH_TOLERANCE[True]) > 10 * SKETCH_TOLERANCE[False]
    app = make_client_app(overrides)
    arrays = ArrayRecord(model.state_dict())
    for sketch, accepted in ((noisy, True), (theirs, False)):
        context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
        config = ConfigRecord({"server-round": 1, "item-text-sketch": sketch})
        reply = app(flower_message(RecordDict({"arrays": arrays, "config": config}), "train"), context)
        assert reply.has_error() != accepted, reply.error.reason if reply.has_error() else ""
        if not accepted:
            assert reply.error.reason.startswith("the item text features encoded at this partner differ")
            assert reply.error.reason.endswith("beyond the tolerance 0.001: another encoder version; use the "
                                               "features file the coordinator publishes, item-text-features")
