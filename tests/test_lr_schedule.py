"""lr-schedule: per-epoch learning rates over the whole run, applied to Adam each epoch."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError
from common.models import SASRec
from common.training import train_local
from common.objectives import epoch_learning_rates


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


@pytest.mark.parametrize("mode", [None, "fused", "hooks", "ghost"])
def test_training_steps_with_each_epochs_rate(small_data, monkeypatch, mode) -> None:  # noqa: ANN001
    from common.training import DPSettings

    monkeypatch.setattr(torch.optim, "Adam", _Recorder)
    _Recorder.seen = []
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0, tied_output=mode != "ghost")
    dp = None if mode is None else DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)
    result = train_local(model, small_data, epochs=3, batch_size=100, learning_rate=0.5, max_len=10, dp=dp,
                         learning_rates=[0.03, 0.02, 0.01])
    per_epoch = result.steps // 3  # Poisson sampling: every epoch still takes the same number of steps
    assert result.steps == 3 * per_epoch
    # the Adam that steps (inside Opacus' DPOptimizer under DP) sees each epoch's rate
    assert _Recorder.seen == [0.03] * per_epoch + [0.02] * per_epoch + [0.01] * per_epoch
    with pytest.raises(ValueError, match="2 entries for 3 epochs"):
        train_local(model, small_data, epochs=3, batch_size=100, learning_rate=0.5, max_len=10, learning_rates=[1, 2])


def test_fedprox_pull_follows_the_rate(small_data, monkeypatch) -> None:  # noqa: ANN001
    import common.training as training

    factors = []
    real_step = training.ProximalAnchor.step

    def spy(self) -> None:  # noqa: ANN001
        factors.append(self.factor)
        real_step(self)

    monkeypatch.setattr(training.ProximalAnchor, "step", spy)
    model = SASRec(small_data.num_items, dim=8, max_len=10, num_blocks=1, dropout=0.0)
    train_local(model, small_data, epochs=2, batch_size=100, learning_rate=0.5, max_len=10,
                learning_rates=[0.04, 0.01], proximal_mu=0.5)
    assert sorted(set(factors), reverse=True) == pytest.approx([0.02, 0.005])


def test_partner_app_trains_with_the_rounds_rates(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from flwr.app import ArrayRecord, Context, RecordDict

    from client.app import make_client_app
    from common.task import new_model, partner_data
    from tests.test_client_training import NODE, TINY, send

    monkeypatch.setattr(torch.optim, "Adam", _Recorder)
    overrides = {**TINY, "run-dir": str(tmp_path), "dp": False, "lr-schedule": "cosine", "local-epochs": 2}
    cfg = resolve_config(None, overrides)
    context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
    _Recorder.seen = []
    send(make_client_app(overrides), "train", arrays, context, 2)
    assert sorted(set(_Recorder.seen), reverse=True) == pytest.approx(epoch_learning_rates(cfg, 2))
