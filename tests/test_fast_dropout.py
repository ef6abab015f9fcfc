"""FastDropout behaves as nn.Dropout: rate, scaling, gradient, eval identity, seeding."""

from __future__ import annotations

import pytest
import torch

from common.models.fast_dropout import FastDropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_drop_rate_and_expectation(p: float) -> None:
    torch.manual_seed(0)
    out = FastDropout(p).train()(torch.ones(400_003))  # odd size: the last 64-bit draw is partly used
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # binomial sd ~0.0008 at this size
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, kept[0].item()))  # one scale for every kept element
    assert abs(kept[0].item() - 1 / (1 - p)) < 1e-3
    assert abs(out.mean().item() - 1.0) < 0.01


def test_eval_mode_and_p_zero_are_the_identity() -> None:
    x = torch.randn(3, 5, 7)
    assert FastDropout(0.3).eval()(x) is x
    assert FastDropout(0.0).train()(x) is x


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 16, requires_grad=True)
    layer = FastDropout(0.25).train()
    out = layer(x)
    out.sum().backward()
    kept = out.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() * (1 / (1 - 0.25)))


def test_masks_follow_torch_manual_seed_and_differ_between_calls() -> None:
    layer = FastDropout(0.5).train()
    x = torch.ones(2, 50)
    torch.manual_seed(7)
    a, b = layer(x), layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), a)
    assert not torch.equal(a, b)


def test_it_is_an_nn_dropout_whose_rate_can_be_changed() -> None:
    layer = FastDropout(0.5).train()
    assert isinstance(layer, torch.nn.Dropout)
    layer.p = 0.0  # as code that silences dropout layers does
    x = torch.randn(4, 9)
    assert layer(x) is x


def test_rates_outside_zero_one_are_refused() -> None:
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            FastDropout(p)
