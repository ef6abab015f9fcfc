"""item-init = "cooccurrence": item-pair counts, their spectral embeddings, the partners' query and the
coordinator's start (common/cooccurrence.py, client/item_counts.py, server/item_init.py)."""

from __future__ import annotations

import json
import math
import time

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
from tests.conftest import flower_message, recording_client_app

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
    # one partner's counts, however large, would set the start: no robust sum (a review)
    ({"aggregation": "median"}, "so one partner sets the start; aggregation = 'median' expects malicious partners"),
    ({"aggregation": "krum", "num-malicious-nodes": 1, "min-nodes": 4}, "aggregation = 'krum' expects malicious"),
    ({"item-init": "svd"}, "item-init = 'svd' is unknown"),
    ({"item-init-window": 0}, "item-init-window = 0 must be at least 1"),
])
def test_a_run_that_would_send_counts_it_should_not_is_refused_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, {**TINY, **change})


def _query(cfg_overrides: dict, node: dict, fingerprint: str | None = None) -> Message:
    app = make_client_app(cfg_overrides)
    cfg = resolve_config(None, {**cfg_overrides, "item-init": "random", "dp": False})  # (any valid config: data only)
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


@pytest.mark.parametrize("floor, said", [
    ({"max-epsilon": 4.0}, "sets max-epsilon, and sends no item-pair counts, which no DP protects"),
    # max-delta alone also promises DP: this partner refuses to train in such a run, so it sends nothing (a review)
    ({"max-delta": 1e-6}, "sets max-delta, and sends no item-pair counts"),
    ({"share-evaluation": False}, "shares no clear evaluation sums"),
    ({"share-evaluation": "noised"}, "shares no clear evaluation sums"),
])
def test_a_partner_with_a_floor_sends_no_counts(tmp_path, floor, said):
    reply = _query({**TINY, "run-dir": str(tmp_path)}, {"partition-id": 0, "num-partitions": 2, **floor})
    assert reply.has_error() and said in reply.error.reason and not reply.has_content()  # an error carries no counts
    assert "\n" not in reply.error.reason.strip() and "Traceback" not in reply.error.reason


@pytest.mark.parametrize("run, said", [
    ({"item-init": "random"}, "sent only for item-init = cooccurrence"),  # a query the run never asked for
    ({"dp": True}, "needs dp-mode"),  # the partner's own run config is checked, whatever the query says
    ({"secure-aggregation": True}, "secure-aggregation = true is meant to prevent"),
])
def test_a_partner_answers_only_a_run_that_asks_for_counts_without_dp(tmp_path, run, said):
    reply = _query({**TINY, "run-dir": str(tmp_path), **run}, {"partition-id": 0, "num-partitions": 2})
    assert reply.has_error() and said in reply.error.reason


def test_another_catalogue_or_a_hold_past_the_timeout_is_refused_at_once(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path)}
    other = _query(overrides, {"partition-id": 0, "num-partitions": 2}, fingerprint="0" * 16)
    assert other.has_error() and "is not the one of the coordinator" in other.error.reason
    # a hold the coordinator never waits for: refused at once, as for training (it came late, unexplained)
    started = time.monotonic()
    held = _query({**overrides, "round-timeout": 2.0}, {"partition-id": 0, "num-partitions": 2,
                                                         "reply-after-seconds": 3.0})
    assert held.has_error() and "reply-after-seconds = 3 is not below the round-timeout 2" in held.error.reason
    assert time.monotonic() - started < 2.0


def test_the_window_reaches_the_partner(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path), "item-init-window": 2}
    node = {"partition-id": 1, "num-partitions": 2}
    sent = _query(overrides, node).content.array_records["item-counts"].to_numpy_ndarrays()[0]
    data = partner_data(resolve_config(None, overrides), node)
    assert np.array_equal(sent, cooccurrence_counts(data, 2)) and not np.array_equal(sent, cooccurrence_counts(data, 10))


def test_too_large_a_catalogue_is_refused_before_anything_is_sent():
    from server.item_init import check_catalogue_size

    check_catalogue_size(3706)  # ML-1M: a 55 MB table per partner
    with pytest.raises(ConfigError, match="with 20000 items: each partner would send a 20001 x 20001 table"):
        check_catalogue_size(20_000)


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


def test_round_1_trains_from_the_counts_and_a_resume_asks_nothing(tmp_path):
    from simulations.local_grid import run_local

    overrides = {**TINY, "run-dir": str(tmp_path), "run-name": "cooc"}
    spy, sent = recording_client_app(overrides)

    run_dir = run_local(overrides, 2, client_apps=[spy, spy])
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-init"] == "cooccurrence" and start["partners-counted"] == 2
    # round 1's global model holds the spectral rows of both partners' counts (not the random start)
    cfg = resolve_config(None, overrides)
    counts = sum(cooccurrence_counts(partner_data(cfg, {"partition-id": i, "num-partitions": 2}), 10).astype(np.float64)
                 for i in range(2))
    first_train = next(content for kind, content in sent if kind == MessageType.TRAIN)
    rows = first_train["arrays"].to_torch_state_dict()["item_emb.weight"]
    assert torch.allclose(rows, torch.from_numpy(spectral_item_embeddings(counts, 8, seed=int(cfg["seed"]))), atol=1e-6)
    # a resume continues the checkpoint's weights: no partner is asked again
    sent.clear()
    run_local({**overrides, "resume": True, "num-server-rounds": 2}, 2, client_apps=[spy, spy])
    assert [kind for kind, _ in sent if kind == MessageType.QUERY] == [] and sent
    resumed = json.loads((run_dir / "provenance.json").read_text())["starts"][1]
    assert "item-init" not in resumed
