"""ema-decay: a training call ends at the bias-corrected moving average of its iterates, checked against
the weighted mean computed in NumPy from the iterates of the same run recorded without averaging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import common.training as training
from common.config import resolve_config
from common.errors import ConfigError
from common.models import SASRec
from common.objectives import objective_options
from common.training import DPSettings, train_local
from common.weight_averaging import IterateAverage


def expected_average(iterates: list[np.ndarray], decay: float) -> np.ndarray:
    """sum_k (1 - d) d^(n - k) w_k / (1 - d^n), k = 1..n, written out term by term."""
    n = len(iterates)
    weights = [(1 - decay) * decay ** (n - k) for k in range(1, n + 1)]
    return sum(w * x for w, x in zip(weights, iterates)) / sum(weights)


def test_average_of_given_iterates_matches_the_weighted_mean():
    layer = nn.Linear(3, 2)
    average = IterateAverage(layer, 0.8)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(5):
        values = rng.normal(size=(2, 3))
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(values))
        seen.append(values)
        average.update()
    average.apply()
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected_average(seen, 0.8), rtol=1e-5, atol=1e-6)


def test_one_step_gives_that_step_and_no_step_changes_nothing():
    layer = nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    IterateAverage(layer, 0.99).apply()  # no update yet: the weights stay
    torch.testing.assert_close(layer.weight, before)
    average = IterateAverage(layer, 0.99)
    with torch.no_grad():
        layer.weight.add_(1.0)
    after = layer.weight.detach().clone()
    average.update()
    average.apply()  # the bias correction makes a one-step average that step exactly, not 1% of it
    torch.testing.assert_close(layer.weight, after)


def test_frozen_parameters_are_left_alone():
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    average = IterateAverage(layer, 0.5)
    for shift in (1.0, 2.0):
        with torch.no_grad():
            layer.weight.add_(shift)
            layer.bias.add_(shift)  # moved by hand: the average must not undo it
        average.update()
    bias = layer.bias.detach().clone()
    average.apply()
    torch.testing.assert_close(layer.bias, bias)


class RecordingAverage(IterateAverage):
    """Records the trainable weights after every step and applies nothing: the run without averaging."""

    runs: list[list[list[np.ndarray]]] = []

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, 0.0)
        self._model_params = [p for p in model.parameters() if p.requires_grad]
        self.iterates: list[list[np.ndarray]] = []
        RecordingAverage.runs.append(self.iterates)

    def update(self) -> None:
        self.iterates.append([p.detach().numpy().copy() for p in self._model_params])


def sasrec(data) -> SASRec:
    torch.manual_seed(1)
    return SASRec(data.num_items, max_len=10, dim=8, num_blocks=1, num_heads=1, dropout=0.1, tied_output=True)


@pytest.mark.parametrize(("dp", "mu"), [(None, 0.0), (DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=7), 0.0),
                                        (None, 5.0)], ids=["plain", "dp", "fedprox"])
def test_train_local_ends_at_the_average_of_the_iterates_of_the_same_run(dp, mu, small_data, monkeypatch):
    decay = 0.9
    kwargs = dict(epochs=2, batch_size=32, learning_rate=0.01, max_len=10, seed=3, dp=dp, proximal_mu=mu)
    monkeypatch.setattr(RecordingAverage, "runs", [])
    with monkeypatch.context() as patch:
        patch.setattr(training, "IterateAverage", RecordingAverage)
        last = sasrec(small_data)
        recorded = train_local(last, small_data, **kwargs)
    (iterates,) = RecordingAverage.runs
    averaged = sasrec(small_data)
    out = train_local(averaged, small_data, ema_decay=decay, **kwargs)
    assert len(iterates) == out.steps > 5
    assert out.loss == pytest.approx(recorded.loss)  # the same trajectory: averaging only sets the end point
    assert out.mechanisms == recorded.mechanisms  # and spends nothing more (post-processing)
    last_params = [p for p in last.parameters() if p.requires_grad]
    for recorded_value, trained in zip(iterates[-1], last_params):  # recorded after every step (FedProx's pull too)
        np.testing.assert_array_equal(recorded_value, trained.detach().numpy())
    params = [p for p in averaged.parameters() if p.requires_grad]
    for i, param in enumerate(params):
        np.testing.assert_allclose(param.detach().numpy(), expected_average([step[i] for step in iterates], decay),
                                   rtol=1e-4, atol=1e-5)
    moved = max(float(np.abs(a.detach().numpy() - b.detach().numpy()).max())
                for a, b in zip(params, last_params))
    assert moved > 1e-3  # the average is not the last iterate


def test_the_knob_reaches_the_trainers_and_bad_values_are_one_line():
    assert objective_options(resolve_config(None, {"ema-decay": 0.99}))["ema_decay"] == 0.99
    assert objective_options(resolve_config(None, {}))["ema_decay"] == 0.0
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="ema-decay"):
            resolve_config(None, {"ema-decay": bad})
    with pytest.raises(ConfigError, match=r"ema-decay = 1\.5 must be in \[0, 1\)"):
        IterateAverage(nn.Linear(2, 2), 1.5)
