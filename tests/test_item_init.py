"""item-init = "cooccurrence": item-pair counts, their spectral embeddings, the partners' query and the
coordinator's start (common/cooccurrence.py, client/item_counts.py, server/item_init.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client.app import make_client_app
from common.config import resolve_config
from common.cooccurrence import cooccurrence_counts, spectral_item_embeddings
from common.data import build_sequences, generate_synthetic
from common.data.catalogue import catalogue_fingerprint
from common.errors import ConfigError
from common.task import federation_data, new_model, partner_data
from tests.conftest import flower_message

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"synthetic-users": 60, "synthetic-items": 25, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
        "local-epochs": 1, "batch-size": 8, "num-server-rounds": 1, "dp": False, "item-init": "cooccurrence"}


def small_data():
    return build_sequences(generate_synthetic(num_users=30, num_items=15, seed=3), name="tiny")


def test_counts_are_the_pairs_within_the_window_of_training_items_only():
    data = small_data()
    window = 3
    expected = np.zeros((data.num_items + 1,) * 2)
    for seq in data.sequences:
        train = list(seq[:-2])  # the validation and test items are never counted
        for i in range(len(train)):
            for j in range(len(train)):
                if i != j and abs(i - j) <= window:
                    expected[train[i], train[j]] += 1
    counts = cooccurrence_counts(data, window)
    assert counts.dtype == np.float32 and np.array_equal(counts, expected)
    assert counts[0].sum() == 0 and counts[:, 0].sum() == 0
    # a validation or test item the training part never holds is never counted
    held = {int(s[-1]) for s in data.sequences} | {int(s[-2]) for s in data.sequences}
    only_held = held - {int(i) for s in data.sequences for i in s[:-2]}
    assert all(counts[i].sum() == 0 for i in only_held)


def test_the_partners_counts_sum_to_the_counts_of_all_users_at_once(tmp_path):
    cfg = resolve_config(None, {**TINY, "run-dir": str(tmp_path)})
    parts = [partner_data(cfg, {"partition-id": i, "num-partitions": 3}) for i in range(3)]
    assert sum(p.num_users for p in parts) == federation_data(cfg).num_users
    summed = sum(cooccurrence_counts(p, 10).astype(np.float64) for p in parts)
    assert np.array_equal(summed, cooccurrence_counts(federation_data(cfg), 10))


def _ppmi_by_hand(counts: np.ndarray) -> np.ndarray:
    total, rows = counts.sum(), counts.sum(axis=1)
    out = np.zeros_like(counts, dtype=np.float64)
    for i in range(len(counts)):
        for j in range(len(counts)):
            if counts[i, j] > 0:
                out[i, j] = max(0.0, math.log(counts[i, j] * total / (rows[i] * rows[j])))
    return out


def test_spectral_rows_are_the_scaled_svd_of_the_ppmi():
    data = small_data()
    counts = cooccurrence_counts(data, 4)
    dim = 6
    rows = spectral_item_embeddings(counts, dim, seed=0)
    assert rows.shape == (data.num_items + 1, dim) and not rows[0].any()
    counted = counts.sum(axis=1) > 0
    assert math.isclose(float((rows[counted] ** 2).sum(axis=1).mean()), 1.0, rel_tol=1e-4)
    # independently: PPMI by hand, its SVD; each column equals U_k sqrt(S_k) times one scale, up to sign
    u, s, _ = np.linalg.svd(_ppmi_by_hand(counts.astype(np.float64)))
    reference = u[:, :dim] * np.sqrt(s[:dim])
    scale = math.sqrt(counted.sum() / (reference[counted] ** 2).sum())
    for k in range(dim):
        col = reference[:, k] * scale
        assert min(np.abs(rows[:, k] - col).max(), np.abs(rows[:, k] + col).max()) < 1e-4


def test_items_never_counted_start_random_and_reproducibly():
    counts = np.zeros((6, 6), dtype=np.float32)
    counts[1, 2] = counts[2, 1] = 4.0
    counts[2, 3] = counts[3, 2] = 1.0
    a, b = spectral_item_embeddings(counts, 4, seed=5), spectral_item_embeddings(counts, 4, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, spectral_item_embeddings(counts, 4, seed=6))
    assert np.abs(a[4:]).sum() > 0 and not a[0].any()  # items 4, 5 were never counted: random rows, not 0


@pytest.mark.parametrize("change, message", [
    ({"dp": True}, "needs dp-mode = \"off\" \\(this run: local\\)"),
    ({"dp": True, "dp-mode": "central"}, "needs dp-mode = \"off\" \\(this run: central\\)"),
    ({"secure-aggregation": True}, "send item-pair counts in clear, which secure-aggregation"),
    ({"model": "mf"}, "needs model = \"sasrec\" with item-features = \"id\""),
    ({"item-features": "text"}, "needs model = \"sasrec\" with item-features = \"id\""),
    ({"init-model": "runs/r"}, "starts the item embeddings from counts, init-model = 'runs/r' from a trained model"),
    ({"item-init": "svd"}, "item-init = 'svd' is unknown"),
    ({"item-init-window": 0}, "item-init-window = 0 must be at least 1"),
])
def test_a_run_that_would_send_counts_it_should_not_is_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, {**TINY, **change})


def _query(cfg_overrides: dict, node: dict, fingerprint: str | None = None) -> Message:
    app = make_client_app(cfg_overrides)
    cfg = resolve_config(None, cfg_overrides)
    config = {"query": "item-cooccurrence", "server-round": 0,
              "catalogue-fingerprint": fingerprint or catalogue_fingerprint(partner_data(cfg, node).catalogue)}
    msg = flower_message(RecordDict({"config": ConfigRecord(config)}), MessageType.QUERY)
    return app(msg, Context(run_id=1, node_id=3, node_config=node, state=RecordDict(), run_config={}))


def test_a_partner_answers_the_query_with_its_own_counts(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path)}
    node = {"partition-id": 1, "num-partitions": 2}
    reply = _query(overrides, node)
    assert not reply.has_error(), reply.error
    sent = reply.content.array_records["item-counts"].to_numpy_ndarrays()[0]
    data = partner_data(resolve_config(None, overrides), node)
    assert np.array_equal(sent, cooccurrence_counts(data, 10))
    assert reply.content.metric_records["metrics"]["num-users"] == data.num_users


def test_a_partner_with_a_dp_floor_or_another_catalogue_sends_no_counts(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path)}
    floor = _query(overrides, {"partition-id": 0, "num-partitions": 2, "max-epsilon": 4.0})
    assert floor.has_error() and "sends no item-pair counts, which no DP protects" in floor.error.reason
    other = _query(overrides, {"partition-id": 0, "num-partitions": 2}, fingerprint="0" * 16)
    assert other.has_error() and "is not the one of the coordinator" in other.error.reason
    for reply in (floor, other):
        assert "\n" not in reply.error.reason.strip() and "Traceback" not in reply.error.reason


def test_the_coordinator_starts_from_the_spectral_rows_of_the_summed_counts(tmp_path, caplog):
    from server.item_init import cooccurrence_start
    from simulations.local_grid import LocalGrid

    overrides = {**TINY, "run-dir": str(tmp_path)}
    cfg = resolve_config(None, overrides)
    whole = federation_data(cfg)
    good = make_client_app(overrides)

    def wrong_shape(msg: Message, context: Context) -> Message:  # a partner whose reply would break the sum
        return Message(RecordDict({"item-counts": ArrayRecord(numpy_ndarrays=[np.ones((3, 3), np.float32)])}),
                       reply_to=msg)

    grid = LocalGrid([good, good, wrong_shape])
    model = new_model(cfg, whole.num_items)
    inputs = {"catalogue-fingerprint": catalogue_fingerprint(whole.catalogue), "run-name": "r"}
    with caplog.at_level("WARNING"):
        summary = cooccurrence_start(grid, cfg, model, inputs)
    assert summary == {"item-init": "cooccurrence", "partners-counted": 2, "partners-refused": 1,
                       "partners-unanswered": 0}
    assert "item-pair counts of shape (3, 3), expected" in caplog.text
    # partners 0 and 1 of 3 counted: their users' counts, the third partner's left out
    two = [partner_data(cfg, {"partition-id": i, "num-partitions": 3}) for i in (0, 1)]
    counts = sum(cooccurrence_counts(p, 10).astype(np.float64) for p in two)
    expected = torch.from_numpy(spectral_item_embeddings(counts, 8, seed=int(cfg["seed"])))
    assert torch.allclose(model.item_emb.weight.detach(), expected, atol=1e-6)


def test_without_any_counts_the_model_keeps_its_random_start(tmp_path, caplog):
    from server.item_init import cooccurrence_start
    from simulations.local_grid import LocalGrid

    overrides = {**TINY, "run-dir": str(tmp_path)}
    cfg = resolve_config(None, overrides)
    model = new_model(cfg, federation_data(cfg).num_items)
    before = model.item_emb.weight.detach().clone()
    with caplog.at_level("WARNING"):
        summary = cooccurrence_start(LocalGrid([make_client_app(overrides)] * 2), cfg, model,
                                     {"catalogue-fingerprint": "0" * 16})  # both refuse: another catalogue
    assert summary["partners-counted"] == 0 and torch.equal(model.item_emb.weight.detach(), before)
    assert "no partner sent item-pair counts" in caplog.text


def test_a_simulated_run_starts_from_the_counts_and_says_so(tmp_path):
    from simulations.local_grid import run_local

    run_dir = run_local({**TINY, "run-dir": str(tmp_path), "run-name": "cooc"}, 2)
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-init"] == "cooccurrence" and start["partners-counted"] == 2
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds[-1]["num-partners"] == 2
