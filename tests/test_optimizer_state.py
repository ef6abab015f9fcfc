"""keep-optimizer-state: a partner's Adam moments carried from one round to the next."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from flwr.app import Context, RecordDict

from client.optimizer_state import load_optimizer_state, save_optimizer_state
from common.models.sasrec import SASRec
from common.training import DPSettings, train_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(num_items: int, dim: int = 16) -> SASRec:
    torch.manual_seed(0)
    return SASRec(num_items, max_len=12, dim=dim, num_blocks=1, dropout=0.0)


def _train(model, data, **kwargs):  # noqa: ANN001, ANN202
    # One batch holding every user: the data order cannot differ between calls
    return train_local(model, data, batch_size=1000, learning_rate=0.01, max_len=12, seed=7, **kwargs)


def test_two_calls_with_carried_state_equal_one_uninterrupted_call(small_data) -> None:
    once = _model(small_data.num_items)
    _train(once, small_data, epochs=3)

    carried = _model(small_data.num_items)
    first = _train(carried, small_data, epochs=1)
    second = _train(carried, small_data, epochs=2, optimizer_state=first.optimizer_state)
    assert second.optimizer_state["state"][0]["step"].item() == 3  # Adam's step count went on

    fresh = _model(small_data.num_items)
    _train(fresh, small_data, epochs=1)
    _train(fresh, small_data, epochs=2)  # moments restarted: a different trajectory

    # Compare what the models predict: the key half of the attention bias gets a zero gradient in
    # exact arithmetic, so Adam turns rounding noise there into steps of any sign (no effect on scores)
    from common.metrics import pad_left

    histories = pad_left([s[:-1] for s in small_data.sequences[:50]], 12)
    scores = {name: m.eval().score(histories) for name, m in [("once", once), ("carried", carried), ("fresh", fresh)]}
    torch.testing.assert_close(scores["carried"], scores["once"], rtol=1e-4, atol=1e-4)
    assert (scores["fresh"] - scores["once"]).abs().max() > 1e-2


def test_state_survives_the_node_state_round_trip(small_data) -> None:
    model = _model(small_data.num_items)
    result = _train(model, small_data, epochs=1)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert load_optimizer_state(context, model) is None  # first round: nothing stored
    save_optimizer_state(context, result.optimizer_state)
    loaded = load_optimizer_state(context, model)
    for k, v in result.optimizer_state["state"].items():
        torch.testing.assert_close(loaded["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
    assert loaded["param_groups"][0]["lr"] == result.optimizer_state["param_groups"][0]["lr"]


def test_a_state_for_other_shapes_is_dropped_with_a_warning(small_data, caplog) -> None:
    model = _model(small_data.num_items)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    save_optimizer_state(context, _train(model, small_data, epochs=1).optimizer_state)
    with caplog.at_level(logging.WARNING, logger="fedrec.client"):
        assert load_optimizer_state(context, _model(small_data.num_items, dim=8)) is None
    assert "other shapes" in caplog.text


def test_dp_training_continues_from_a_carried_state(small_data) -> None:
    model = _model(small_data.num_items)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    kwargs = dict(batch_size=50, learning_rate=0.01, max_len=12, dp=dp)
    first = train_local(model, small_data, epochs=1, seed=1, **kwargs)
    before = copy.deepcopy(first.optimizer_state["state"][0]["step"])
    second = train_local(model, small_data, epochs=1, seed=2, optimizer_state=first.optimizer_state, **kwargs)
    assert second.optimizer_state["state"][0]["step"].item() == before.item() + second.steps


def test_a_state_for_a_model_with_fewer_parameters_is_dropped_not_a_crash() -> None:
    # Same dimension, one block fewer: the first parameters fit, the state's later indices lie past the model's
    # last parameter (an IndexError in the round before the index was checked)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    deeper = SASRec(30, max_len=12, dim=16, num_blocks=2, dropout=0.0)
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros(p.shape)}
               for i, p in enumerate(deeper.parameters())}  # what Adam keeps after a step (its first step is slow)
    save_optimizer_state(context, {"state": moments, "param_groups": []})
    assert load_optimizer_state(context, _model(30)) is None


def test_a_round_without_a_state_keeps_the_one_before() -> None:
    # save_optimizer_state(None) stores nothing: a stored None made the next round's load fail
    model = _model(30)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    adam = torch.optim.Adam(model.parameters())
    save_optimizer_state(context, adam.state_dict())
    save_optimizer_state(context, None)
    assert load_optimizer_state(context, model) == adam.state_dict()
