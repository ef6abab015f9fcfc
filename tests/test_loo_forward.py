"""client/loo_forward.py: the shared-prefix leave-one-out forward equals the model run on each variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.explain import leave_one_out
from client.loo_forward import loo_hidden, shared_states, supported
from common.metrics import pad_left
from common.models.context import model_inputs, time_gap_buckets
from common.models.sasrec import SASRec

MAX_LEN = 12
NUM_ITEMS = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(**kwargs) -> SASRec:
    torch.manual_seed(3)
    model = SASRec(NUM_ITEMS, max_len=MAX_LEN, dropout=0.3, **kwargs)
    with torch.no_grad():  # non-zero biases and norms: a dropped bias term would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _text_model() -> SASRec:
    from common.models.text_sasrec import TextSASRec

    torch.manual_seed(4)
    table = torch.nn.functional.normalize(torch.randn(NUM_ITEMS + 1, 8), dim=1)
    table[0] = 0
    return TextSASRec(NUM_ITEMS, table, item_features="id+text", max_len=MAX_LEN, dim=16, num_blocks=2).eval()


MODELS = {
    "1 block": lambda: _model(dim=16, num_blocks=1),
    "2 blocks": lambda: _model(dim=16, num_blocks=2),
    "3 blocks, 4 heads, untied": lambda: _model(dim=32, num_blocks=3, num_heads=4, tied_output=False),
    "2 heads, time gaps": lambda: _model(dim=16, num_blocks=2, num_heads=2, time_features=True),
    "genres": lambda: _model(dim=16, num_blocks=2, item_genres=torch.rand(NUM_ITEMS + 1, 5)),
    "text": _text_model,
}


def _one_at_a_time(model: torch.nn.Module, history: np.ndarray, gaps: np.ndarray, targets: list[int]) -> np.ndarray:
    """score(history) - score(history without p) for each input position p, one model call per variant."""
    positions = range(max(0, len(history) - MAX_LEN), len(history))
    with torch.inference_mode():
        base = model.score(model_inputs(model, [history], MAX_LEN, [gaps]))[0, targets]
        rows = [base - model.score(model_inputs(model, [np.delete(history, p)], MAX_LEN,
                                                [np.delete(gaps, p)]))[0, targets] for p in positions]
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length", [1, 2, MAX_LEN, MAX_LEN + 1, 30])
def test_leave_one_out_equals_the_model_on_each_variant(name, length):
    # Prepare
    model = MODELS[name]()
    rng = np.random.default_rng(length)
    history = rng.integers(1, NUM_ITEMS + 1, length)
    history[-1] = history[0]  # an item seen twice
    gaps = time_gap_buckets(np.sort(rng.integers(0, 10**7, length)))
    targets = [1, 9, 23]
    assert supported(model)

    # Execute
    positions, influence = leave_one_out(model, history, gaps, targets, MAX_LEN)

    # Assert
    assert positions.tolist() == list(range(max(0, length - MAX_LEN), length))
    np.testing.assert_allclose(influence, _one_at_a_time(model, history, gaps, targets), atol=2e-5)


def test_any_subset_of_columns_and_the_full_history_row():
    model = MODELS["2 blocks"]()
    history = np.arange(1, 21)
    full, without_last = pad_left([history], MAX_LEN), pad_left([history[:-1]], MAX_LEN)
    columns = [0, 4, 5, 11]

    hidden = loo_hidden(model, shared_states(model, full, without_last), columns)

    window = history[-MAX_LEN:]
    expected = [model.hidden(full)[0, -1]] + [
        model.hidden(pad_left([np.delete(history, len(history) - MAX_LEN + q)], MAX_LEN))[0, -1] for q in columns]
    assert window[columns].tolist() == [9, 13, 14, 20]
    torch.testing.assert_close(hidden, torch.stack(expected).detach(), atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="ascend"):
        loo_hidden(model, shared_states(model, full, without_last), [5, 4])


def test_a_model_in_training_mode_takes_the_plain_path_and_agrees():
    model = MODELS["2 blocks"]()
    model.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # training mode without randomness: the plain batched path is deterministic
    model.train()
    assert not supported(model)
    history = np.arange(1, 16)
    gaps = np.zeros_like(history)

    _, influence = leave_one_out(model, history, gaps, [3, 30], MAX_LEN)

    model.eval()
    np.testing.assert_allclose(influence, _one_at_a_time(model, history, gaps, [3, 30]), atol=2e-5)
