"""The per-user gradients Opacus clips equal back-propagating each user's sequence alone.

This catches a weight used outside its module (e.g. a tied output layer computed
functionally), which Opacus silently drops from the per-sample gradient.
"""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from common.models import SASRec
from common.dp_sgd import resolve_grad_sample_mode
from common.objectives import SequenceLoss

V, T, B = 20, 6, 4


def batch():
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, V + 1, (B, T), generator=g)
    seq[0, :2] = 0  # a left-padded user
    tgt = torch.randint(1, V + 1, (B, T), generator=g)
    tgt[0, :2] = 0
    return seq, tgt


def model(tied: bool) -> SASRec:
    torch.manual_seed(0)
    return SASRec(V, max_len=T, dim=8, num_blocks=1, num_heads=2, dropout=0.0, tied_output=tied)


def per_user_grads(m: SASRec, seq, tgt) -> list[dict[str, torch.Tensor]]:
    """Reference: one backward pass per user, no Opacus."""
    out = []
    loss_fn = SequenceLoss(reduction="sum")
    params = dict(m.named_parameters())
    for i in range(B):
        loss = loss_fn(m(seq[i:i + 1]), tgt[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append(dict(zip(params, grads)))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_hooks_per_sample_gradients_match_per_user_backprop(tied):
    m = model(tied)
    seq, tgt = batch()
    reference = per_user_grads(m, seq, tgt)
    gsm = GradSampleModule(m, loss_reduction="sum")
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    checked = 0
    for name, p in m.named_parameters():
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked >= 10
    gsm._close()


def test_ghost_clipping_norms_match_per_user_backprop_untied():
    m = model(tied=False)
    seq, tgt = batch()
    reference = per_user_grads(m, seq, tgt)
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in reference])
    gsm = GradSampleModuleFastGradientClipping(m, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), ref_norms, atol=1e-4, rtol=1e-4)


def test_ghost_clipping_rejects_tied_weights_so_auto_uses_fused():
    m = model(tied=True)
    seq, tgt = batch()
    gsm = GradSampleModuleFastGradientClipping(m, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    with pytest.raises(NotImplementedError, match="tying"):
        SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    # Our per-user clipping handles both (tests/test_fused_clipping.py checks it against this file's reference).
    assert resolve_grad_sample_mode(model(tied=True), "auto") == "fused"
    assert resolve_grad_sample_mode(model(tied=False), "auto") == "fused"
