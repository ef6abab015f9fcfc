"""lr-schedule: per-epoch learning rates over the whole run, applied to Adam each epoch."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError
from common.models import SASRec
from common.training import epoch_learning_rates, train_local


def test_constant_is_the_learning_rate_every_epoch() -> None:
    cfg = resolve_config(None, {"learning-rate": 0.003, "local-epochs": 4})
    assert epoch_learning_rates(cfg, 1) == epoch_learning_rates(cfg, 5) == [0.003] * 4


def test_cosine_follows_one_curve_across_rounds() -> None:
    cfg = resolve_config(None, {"lr-schedule": "cosine", "learning-rate": 0.002, "local-epochs": 10,
                                "num-server-rounds": 3})
    rates = [r for rnd in (1, 2, 3) for r in epoch_learning_rates(cfg, rnd)]
    # independent: the textbook cosine annealing from 0.002 towards 0 over 30 epochs
    expected = [0.001 * (1 + math.cos(math.pi * k / 30)) for k in range(30)]
    assert rates == pytest.approx(expected)
    assert rates[0] == pytest.approx(0.002) and 0 < rates[-1] < 0.00001
    assert all(a > b for a, b in zip(rates, rates[1:]))  # strictly decreasing, no restart between rounds


def test_unknown_schedule_is_one_config_error() -> None:
    cfg = resolve_config(None, {"lr-schedule": "linear"})
    with pytest.raises(ConfigError, match="lr-schedule = 'linear'"):
        epoch_learning_rates(cfg, 1)
    from server.strategy_factory import build_strategy

    with pytest.raises(ConfigError, match="lr-schedule"):
        build_strategy(cfg)


class _Recorder(torch.optim.Adam):
    seen: list[float] = []

    def step(self, closure=None):  # noqa: ANN001, ANN201
        _Recorder.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_training_steps_with_each_epochs_rate(small_data, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.optim, "Adam", _Recorder)
    _Recorder.seen = []
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0)
    result = train_local(model, small_data, epochs=3, batch_size=100, learning_rate=0.5, max_len=10,
                         learning_rates=[0.03, 0.02, 0.01])
    per_epoch = result.steps // 3
    assert _Recorder.seen == [0.03] * per_epoch + [0.02] * per_epoch + [0.01] * per_epoch
    with pytest.raises(ValueError, match="2 entries for 3 epochs"):
        train_local(model, small_data, epochs=3, batch_size=100, learning_rate=0.5, max_len=10, learning_rates=[1, 2])
