"""exclude-seen: the training softmax leaves out each user's earlier items, plain and DP alike,
checked against a softmax over explicitly listed candidates (Python sets, no shared code)."""

from __future__ import annotations

import math

import pytest
import torch

from common.models import SASRec
from common.per_user_clipping import fused_clipped_backward
from common.training import DPSettings, train_local
from common.objectives import positions_only_loss

V, T, B, D = 30, 7, 5, 8


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(1, V + 1, (B, T), generator=g)
    seq[:, :3] = torch.randint(1, 4, (B, 3), generator=g)  # repeated items within a user
    tgt = torch.cat([seq[:, 1:], torch.randint(1, V + 1, (B, 1), generator=g)], dim=1)  # next item, as in training
    tgt[0, 0] = seq[0, 0]  # a target the user already had: must stay a valid target
    for user, pad in enumerate([0, 2, 5, 6, 1]):
        seq[user, :pad] = 0
        tgt[user, :pad] = 0
    return seq, tgt


def sasrec(tied: bool) -> SASRec:
    torch.manual_seed(0)
    return SASRec(V, max_len=T, dim=D, num_blocks=2, num_heads=2, dropout=0.0, tied_output=tied)


def reference_user_loss(m: SASRec, seq: torch.Tensor, tgt: torch.Tensor, user: int,
                        smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the user's real positions of -log softmax over {1..V} minus the items at or before
    the position, plus the target; with ``smoothing`` s: (1 - s) times that plus s times the mean of
    -log softmax over those same candidates (label smoothing over the items the target competes with)."""
    logits = m(seq[user:user + 1])[0]
    terms = []
    for pos in range(T):
        target = int(tgt[user, pos])
        if target == 0:
            continue
        seen = {int(i) for i in seq[user, :pos + 1]} - {0}
        candidates = sorted((set(range(1, V + 1)) - seen) | {target})
        row = logits[pos, candidates]
        terms.append(torch.logsumexp(row, 0) - (1 - smoothing) * logits[pos, target] - smoothing * row.mean())
    return torch.stack(terms).mean()


def test_plain_loss_is_softmax_over_unseen_items():
    m = sasrec(tied=True)
    seq, tgt = batch()
    expected = torch.stack([reference_user_loss(m, seq, tgt, u) for u in range(B)]).mean()
    got = positions_only_loss(m, seq, tgt, exclude_seen=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got)
    # and it is a different objective from the plain one (the test can fail)
    assert abs(float(positions_only_loss(m, seq, tgt)) - float(expected)) > 1e-3


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_label_smoothing_spreads_over_the_same_candidates_plain_and_opacus_criterion(smoothing):
    from common.metrics import drop_seen
    from common.objectives import SequenceLoss

    m = sasrec(tied=True)
    seq, tgt = batch()
    expected = torch.stack([reference_user_loss(m, seq, tgt, u, smoothing) for u in range(B)])
    torch.testing.assert_close(positions_only_loss(m, seq, tgt, exclude_seen=True, label_smoothing=smoothing),
                               expected.mean(), atol=1e-5, rtol=1e-5)
    per_user = SequenceLoss(reduction="none", label_smoothing=smoothing)(drop_seen(m(seq), seq, tgt), tgt)
    torch.testing.assert_close(per_user, expected, atol=1e-5, rtol=1e-5)  # the loss Opacus' hooks/ghost paths clip
    per_user.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)  # -inf columns: no NaN
    if smoothing:  # a different objective from the plain one (the test can fail)
        assert abs(float(expected.mean()) - float(positions_only_loss(m, seq, tgt, exclude_seen=True))) > 1e-3


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("ghost_below", [0.0, math.inf], ids=["materialise", "ghost"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_fused_dp_clipping_uses_the_same_objective(tied, ghost_below, smoothing):
    m = sasrec(tied)
    seq, tgt = batch()
    params = dict(m.named_parameters())
    ref = []
    for u in range(B):
        grads = torch.autograd.grad(reference_user_loss(m, seq, tgt, u, smoothing), list(params.values()),
                                    allow_unused=True)
        ref.append({k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(params, grads)})
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in ref])
    clip = float(ref_norms.median())
    out = fused_clipped_backward(m, seq, tgt, max_grad_norm=clip, ghost_below=ghost_below, exclude_seen=True,
                                 label_smoothing=smoothing)
    torch.testing.assert_close(out.norms, ref_norms, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, torch.stack([reference_user_loss(m, seq, tgt, u, smoothing)
                                                      for u in range(B)]).detach(), atol=1e-5, rtol=1e-5)
    factors = (clip / (ref_norms + 1e-6)).clamp(max=1.0)
    for name, p in m.named_parameters():
        expected = sum(factors[i] * ref[i][name] for i in range(B))
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_opacus_hooks_path_trains_as_fused_does(small_data):
    """The Opacus criterion path (logits masked before SequenceLoss) and the fused path: same
    Poisson batches, clipping, no noise, so the same model."""
    states = {}
    for mode, exclude, smoothing in (("fused", True, 0.0), ("hooks", True, 0.0), ("plain-hooks", False, 0.0),
                                     ("smooth-fused", True, 0.2), ("smooth-hooks", True, 0.2)):
        torch.manual_seed(5)
        m = SASRec(small_data.num_items, max_len=10, dim=D, num_blocks=1, num_heads=2, dropout=0.0, tied_output=True)
        train_local(m, small_data, epochs=1, batch_size=40, learning_rate=0.01, max_len=10, seed=3, exclude_seen=exclude,
                    label_smoothing=smoothing,
                    dp=DPSettings(noise_multiplier=0.0, max_grad_norm=0.3, noise_seed=0,  # the same Poisson batches
                                  grad_sample_mode=mode.removeprefix("plain-").removeprefix("smooth-")))
        states[mode] = m.state_dict()
    # the flag reaches the Opacus path: without it the same run ends elsewhere
    assert not torch.allclose(states["hooks"]["item_emb.weight"], states["plain-hooks"]["item_emb.weight"], atol=1e-4)
    assert not torch.allclose(states["hooks"]["item_emb.weight"], states["smooth-hooks"]["item_emb.weight"], atol=1e-4)
    for fused, hooks in (("fused", "hooks"), ("smooth-fused", "smooth-hooks")):
        for name, value in states[fused].items():
            if name.endswith("attn.qkv.bias"):  # key bias: true gradient 0, Adam amplifies round-off (test_fused_clipping)
                continue
            torch.testing.assert_close(value, states[hooks][name], atol=2e-5, rtol=1e-4, msg=f"{fused}: {name}")
