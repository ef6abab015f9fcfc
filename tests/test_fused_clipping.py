"""Fused per-user clipping (common/per_user_clipping.py) against one-user-at-a-time back-propagation
and against Opacus' own DP-SGD path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from common.data import build_sequences, generate_synthetic
from common.errors import ConfigError
from common.models import SASRec
from common.per_user_clipping import fused_clipped_backward, make_fused_private
from common.dp_sgd import DPSettings, resolve_grad_sample_mode
from common.training import train_local
from common.objectives import SequenceLoss

V, T, B, D = 30, 7, 5, 8


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, V + 1, (B, T), generator=g)
    seq[:, :3] = torch.randint(1, 4, (B, 3), generator=g)  # repeated items within a user (embedding rows add up)
    tgt = torch.randint(1, V + 1, (B, T), generator=g)
    for user, pad in enumerate([0, 2, 5, 6, 1]):  # left padding of various lengths, one user with one position
        seq[user, :pad] = 0
        tgt[user, :pad] = 0
    return seq, tgt


def sasrec(tied: bool, dropout: float = 0.0) -> SASRec:
    torch.manual_seed(0)
    return SASRec(V, max_len=T, dim=D, num_blocks=2, num_heads=2, dropout=dropout, tied_output=tied)


def reference(m: SASRec, seq: torch.Tensor, tgt: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Each user's gradient by its own backward pass through the full (unfused) forward."""
    params = dict(m.named_parameters())
    out = []
    for i in range(B):
        loss = SequenceLoss(reduction="sum")(m(seq[i:i + 1]), tgt[i:i + 1])
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True))))
    return [{k: (g if g is not None else torch.zeros_like(params[k])) for k, g in r.items()} for r in out]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("ghost_below", [0.0, math.inf, 4.0, None], ids=["materialise", "ghost", "mixed", "auto"])
def test_norms_and_clipped_sum_match_per_user_backprop(tied, ghost_below):
    # Prepare
    m = sasrec(tied)
    seq, tgt = batch()
    ref = reference(m, seq, tgt)
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in ref])
    clip = float(ref_norms.median())  # some users clipped, some not
    # Execute
    out = fused_clipped_backward(m, seq, tgt, max_grad_norm=clip, ghost_below=ghost_below)
    # Assert
    torch.testing.assert_close(out.norms, ref_norms, atol=1e-5, rtol=1e-4)
    factors = (clip / (ref_norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    for name, p in m.named_parameters():
        expected = sum(factors[i] * ref[i][name] for i in range(B))
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=name)


class _LargestCatalogueTensor(TorchDispatchMode):
    """Records the largest tensor produced that has both a catalogue (V + 1) and an embedding (D) axis."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and V + 1 in t.shape and D in t.shape:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("tied", [True, False])
def test_no_dense_batch_by_catalogue_by_dim_tensor(tied):
    seq, tgt = batch()
    m = sasrec(tied)
    with _LargestCatalogueTensor() as fused:
        fused_clipped_backward(m, seq, tgt, max_grad_norm=1.0, ghost_below=0.0)  # materialising: the worst case
    assert fused.largest <= 2 * (V + 1) * D  # one user's matrix (+ its gradient), never B of them
    # The probe does see Opacus' dense per-sample gradient (so the bound above can fail).
    from opacus import GradSampleModule

    gsm = GradSampleModule(sasrec(tied), loss_reduction="sum")
    with _LargestCatalogueTensor() as hooks:
        SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    gsm._close()
    assert hooks.largest >= B * (V + 1) * D


def test_noise_is_opacus_noise_on_the_clipped_sum():
    # Prepare: a one-batch loader so the expected batch size is B.
    m = sasrec(tied=False)
    seq, tgt = batch()
    sigma, clip = 2.0, 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
    opt, _ = make_fused_private(engine, optimizer=torch.optim.SGD(m.parameters(), lr=0.0), data_loader=DataLoader(
        TensorDataset(seq, tgt), batch_size=B), noise_multiplier=sigma, max_grad_norm=clip)
    fused_clipped_backward(m, seq, tgt, max_grad_norm=clip)
    clipped = torch.cat([p.grad.flatten().clone() for p in m.parameters()])
    # Execute
    opt.step()
    # Assert: p.grad = (clipped sum + N(0, (sigma * clip)^2)) / B, accountant stepped once at q = 1
    noise = torch.cat([p.grad.flatten() for p in m.parameters()]) * B - clipped
    assert abs(noise.std().item() / (sigma * clip) - 1) < 0.1  # thousands of coordinates
    assert abs(noise.mean().item()) < 0.1 * sigma * clip
    assert engine.accountant.history == [(sigma, 1.0, 1)]


@pytest.mark.parametrize("tied", [True, False])
def test_train_local_fused_equals_opacus_hooks_without_noise(tied, small_data):
    """Same Poisson batches, same clipping, no noise: the same model and the same accountant history."""
    results = {}
    for mode in ("fused", "hooks"):
        m = SASRec(small_data.num_items, max_len=10, dim=D, num_blocks=1, num_heads=2, dropout=0.0, tied_output=tied)
        m.load_state_dict(sasrec_state(small_data.num_items, tied))
        out = train_local(m, small_data, epochs=1, batch_size=40, learning_rate=0.01, max_len=10, seed=3,
                          dp=DPSettings(noise_multiplier=0.0, max_grad_norm=0.3, grad_sample_mode=mode, noise_seed=0))
        results[mode] = (m.state_dict(), out)
    fused_state, fused = results["fused"]
    hooks_state, hooks = results["hooks"]
    batches = math.ceil(fused.num_examples / 40)
    assert fused.mechanisms == hooks.mechanisms == [(0.0, 1 / batches, batches)]
    assert fused.loss == pytest.approx(hooks.loss, rel=1e-5)
    for name, value in fused_state.items():
        if name.endswith("attn.qkv.bias"):
            # The key bias cannot change attention (softmax is shift-invariant): its true gradient is
            # 0 and Adam turns float round-off of either implementation into steps; compare q and v.
            value, other = torch.cat([value[:D], value[2 * D:]]), torch.cat([hooks_state[name][:D], hooks_state[name][2 * D:]])
        else:
            other = hooks_state[name]
        torch.testing.assert_close(value, other, atol=2e-5, rtol=1e-4, msg=name)


def sasrec_state(num_items: int, tied: bool) -> dict:
    torch.manual_seed(5)
    return SASRec(num_items, max_len=10, dim=D, num_blocks=1, num_heads=2, dropout=0.0, tied_output=tied).state_dict()


@pytest.mark.parametrize(("mode", "tied"), [("fused", True), ("fused", False), ("hooks", True), ("hooks", False),
                                            ("ghost", False)])
def test_empty_poisson_batches_are_noisy_steps(mode, tied):
    # 4 users, expected batch 1: about a third of the Poisson batches are empty (noise only)
    data = build_sequences(generate_synthetic(num_users=4, num_items=12, mean_length=6, seed=0), name="tiny")
    m = SASRec(data.num_items, max_len=6, dim=D, num_blocks=1, num_heads=1, dropout=0.0, tied_output=tied)
    out = train_local(m, data, epochs=6, batch_size=1, learning_rate=0.01, max_len=6, seed=0,
                      dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
    users = out.num_examples
    assert out.steps == 6 * users and out.mechanisms == [(1.0, 1 / users, 6 * users)]
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_auto_picks_fused_for_sasrec_and_refuses_it_elsewhere():
    assert resolve_grad_sample_mode(sasrec(tied=True), "auto") == "fused"
    assert resolve_grad_sample_mode(sasrec(tied=False), "auto") == "fused"
    assert resolve_grad_sample_mode(sasrec(tied=False), "ghost") == "ghost"
    with pytest.raises(ConfigError, match="fused"):
        resolve_grad_sample_mode(torch.nn.Sequential(torch.nn.Embedding(5, 2)), "fused")
    assert resolve_grad_sample_mode(torch.nn.Sequential(torch.nn.Embedding(5, 2)), "auto") == "ghost"


@pytest.mark.parametrize("tied", [True, False])
def test_context_inputs_time_gaps_and_genres(tied):
    """SASRec with time-gap buckets (inputs (batch, length, 2)) and genre projection."""
    from common.models.context import NUM_TIME_BUCKETS

    torch.manual_seed(0)
    genres = torch.rand(V + 1, 4)
    m = SASRec(V, max_len=T, dim=D, num_blocks=1, num_heads=2, dropout=0.0, tied_output=tied,
               time_features=True, item_genres=genres)
    seq, tgt = batch()
    gaps = torch.randint(1, NUM_TIME_BUCKETS, seq.shape, generator=torch.Generator().manual_seed(2)).masked_fill(seq == 0, 0)
    inputs = torch.stack([seq, gaps], dim=-1)
    params = dict(m.named_parameters())
    ref = []
    for i in range(B):
        loss = SequenceLoss(reduction="sum")(m(inputs[i:i + 1]), tgt[i:i + 1])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        ref.append({k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(params, grads)})
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in ref])
    out = fused_clipped_backward(m, inputs, tgt, max_grad_norm=float(ref_norms.median()))
    torch.testing.assert_close(out.norms, ref_norms, atol=1e-5, rtol=1e-4)
    for name, p in m.named_parameters():
        expected = sum(out.factors[i] * ref[i][name] for i in range(B))
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_output_layer_with_bias():
    m = sasrec(tied=False)
    m.output = torch.nn.Linear(D, V + 1, bias=True)  # per-user bias gradients: sums of G over positions
    seq, tgt = batch()
    ref = reference(m, seq, tgt)
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in ref])
    out = fused_clipped_backward(m, seq, tgt, max_grad_norm=float(ref_norms.median()))
    torch.testing.assert_close(out.norms, ref_norms, atol=1e-5, rtol=1e-4)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, sum(out.factors[i] * ref[i][name] for i in range(B)), atol=1e-5, rtol=1e-4)
