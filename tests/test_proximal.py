"""FedProx's proximal step: exact arithmetic, and it keeps local training closer to the global model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.config import resolve_config
from common.errors import ConfigError
from common.proximal import ProximalAnchor
from common.task import new_model
from common.training import train_local


def test_one_step_moves_lr_times_mu_of_the_way_back():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
    anchor = ProximalAnchor(layer, mu=0.5, learning_rate=0.1)
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[2.0, 4.0]]))  # a local step away from the anchor
    anchor.step()
    # w = anchor + d - 0.05 * d
    torch.testing.assert_close(layer.weight, torch.tensor([[1.0 + 2.0 * 0.95, -2.0 + 4.0 * 0.95]]))


def test_bad_mu_is_a_config_error():
    with pytest.raises(ConfigError, match="proximal-mu"):
        ProximalAnchor(nn.Linear(1, 1), mu=-1.0, learning_rate=0.1)
    with pytest.raises(ConfigError, match="overshoot"):
        ProximalAnchor(nn.Linear(1, 1), mu=20.0, learning_rate=0.1)


def distance_after_training(data, mu: float) -> float:
    cfg = resolve_config(None, {"embedding-dim": 16, "num-blocks": 1, "max-seq-len": 20, "dropout": 0.0})
    model = new_model(cfg, data.num_items)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, data, epochs=2, batch_size=32, learning_rate=0.01, max_len=20, seed=1, proximal_mu=mu)
    return float(sum(((model.state_dict()[k] - start[k]) ** 2).sum() for k in start) ** 0.5)


def test_proximal_term_keeps_the_update_closer_to_the_global_model(small_data):
    free, pulled = distance_after_training(small_data, 0.0), distance_after_training(small_data, 10.0)
    assert 0 < pulled < 0.8 * free
