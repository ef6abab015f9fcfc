"""Fused DP-SGD gradient for SASRec: every user's gradient clipped, in one forward and one backward.

Why not Opacus here: its ghost clipping refuses the tied output layer ("Parameter tying is not
supported") and gets the output layer's per-user norm from (length x length) Gram matrices over
the catalogue (batch * length^2 * catalogue multiply-adds, more than the whole non-private step
at length 200); its hooks mode stores a dense (batch x catalogue x dim) per-sample gradient and
scores every padding position.

What this does (book-keeping ghost clipping, Bu et al. 2023, specialised to SASRec):

1. Forward once through the body (embeddings, attention blocks, final norm), forward hooks
   keeping each parametrised module's input and output; the catalogue is scored only at real
   (non-padding) positions, like ``common.objectives.positions_only_loss``, and the softmax
   cross-entropy gradient G = (softmax - onehot) / n_u is formed in closed form, in place, in the
   one (positions x catalogue) buffer of the scores (autograd would hold three such buffers).
2. Backward once from the output layer's input with ``torch.autograd.grad`` with respect to the
   body modules' *outputs*: autograd then skips every weight-gradient product, so this pass
   costs only the activation gradients.
3. Per user u, from the inputs and output gradients:
   - small layers (attention and feed-forward ``nn.Linear``, ``nn.LayerNorm``): the per-user
     gradient itself, (batch x parameter size), a few MB;
   - embeddings (item when untied, position): sparse per-user rows, one per (user, item) pair;
   - the catalogue matrix (the output layer, which *is* the item embedding when tied): one user
     at a time, G_u^T A_u (catalogue x dim) plus, when tied, the user's item-embedding rows, so
     no (batch x catalogue x dim) tensor ever exists.
4. c_u = min(1, C / (||g_u|| + 1e-6)) (Opacus' rule) and ``p.grad = sum_u c_u g_u``, the sum
   Opacus' ``DPOptimizerFastGradientClipping`` expects before it adds noise and averages.

The catalogue matrix's clipped sum is accumulated inside the per-user loop, so its weight
gradient costs what the non-private backward spends on it; the extra work is the small layers'
per-user products and one (catalogue x dim) norm and add per user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.errors import ConfigError
from common.metrics import seen_items

if TYPE_CHECKING:  # Opacus loads only when a call trains with DP
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

CLIP_EPS = 1e-6  # Opacus' denominator guard in max_grad_norm / (norm + eps)


@dataclass
class ClippedBatch:
    """What one fused step measured; ``p.grad`` holds the clipped sum."""

    loss: torch.Tensor  # (batch,) per-user mean cross-entropy, detached
    norms: torch.Tensor  # (batch,) per-user gradient L2 norm before clipping
    factors: torch.Tensor  # (batch,) clipping factors c_u in (0, 1]


def supports_fused(model: nn.Module) -> bool:
    """Whether ``model`` exposes SASRec's ``hidden(seq)`` and an ``output`` ``nn.Linear``."""
    return hasattr(model, "hidden") and isinstance(getattr(model, "output", None), nn.Linear)


class _Capture:
    """Forward hooks keeping (module, input, output) for every module that owns a trainable Parameter."""

    def __init__(self, model: nn.Module, *, skip: nn.Module) -> None:
        self.records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.handles = []
        for name, module in model.named_modules():
            if module is skip or not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if not isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding)):
                raise ConfigError(f"grad-sample-mode = fused supports Linear, LayerNorm and Embedding layers, "
                                  f"not {type(module).__name__} ({name}); use grad-sample-mode = ghost")
            self.handles.append(module.register_forward_hook(self._keep))

    def _keep(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.records.append((module, args[0].detach(), output))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _dense_per_user(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-user gradients (batch, *param.shape) of a small layer seen as (batch, length, features)."""
    out: dict[nn.Parameter, torch.Tensor] = {}
    if isinstance(module, nn.Linear):
        if module.weight.requires_grad:
            out[module.weight] = torch.einsum("bto,bti->boi", gy, x)
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = gy.sum(1)
    else:  # LayerNorm: recompute the normalised input rather than keep another activation
        xhat = nn.functional.layer_norm(x, module.normalized_shape, eps=module.eps)
        if module.weight is not None and module.weight.requires_grad:
            out[module.weight] = (gy * xhat).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            out[module.bias] = gy.sum(1)
    return out


def _embedding_rows(module: nn.Embedding, ids: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse per-user gradient of an embedding: (user, row, vector) with one entry per distinct
    (user, row), repeated uses of an item by one user summed; the padding row gets none."""
    b = ids.shape[0]
    users = torch.arange(b, device=ids.device).view(b, *([1] * (ids.dim() - 1))).expand_as(ids).reshape(-1)
    rows = ids.reshape(-1)
    vecs = gy.reshape(-1, gy.shape[-1])
    if module.padding_idx is not None:
        keep = rows != module.padding_idx
        users, rows, vecs = users[keep], rows[keep], vecs[keep]
    keys, inverse = torch.unique(users * module.num_embeddings + rows, return_inverse=True)
    summed = torch.zeros(len(keys), vecs.shape[1], device=vecs.device, dtype=vecs.dtype).index_add_(0, inverse, vecs)
    return keys // module.num_embeddings, keys % module.num_embeddings, summed


def fused_clipped_backward(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                           max_grad_norm: float, ghost_below: float | None = None,
                           exclude_seen: bool = False, label_smoothing: float = 0.0) -> ClippedBatch:
    """Set ``p.grad`` of every trainable parameter to the sum over users of their clipped gradients.

    ``inputs``/``targets``: (batch, length) left-padded item indices, 0 = padding; a user's loss is
    the mean cross-entropy over its real positions (``SequenceLoss``). ``max_grad_norm`` is the
    per-user L2 clipping bound C (same units as the gradient). ``ghost_below``: users with fewer
    real positions get the catalogue norm by Gram matrices instead of materialising it (default
    V*D/(V+D), where the two cost the same; tests force either way). ``exclude_seen``: each
    position's softmax leaves out the user's earlier items (``common.metrics.drop_seen``).
    ``label_smoothing``: the objective of ``common.objectives.smoothed_cross_entropy``.
    """
    if not supports_fused(model):
        raise ConfigError("grad-sample-mode = fused needs a SASRec-like model (hidden() and an output Linear)")
    b = inputs.shape[0]
    catalogue = model.output.weight
    # Forward through the body: every parametrised module's input/output recorded.
    head_module = model.output
    capture = _Capture(model, skip=head_module)
    try:
        mask = targets > 0
        counts = mask.sum(1)
        hidden = model.hidden(inputs)[mask]  # (rows, dim): real positions only, grouped by user
    finally:
        capture.close()
    owner = torch.arange(b, device=inputs.device).unsqueeze(1).expand_as(targets)[mask]
    # The output layer and its softmax gradient in closed form, in place on one (rows x catalogue)
    # buffer: autograd would keep logits, log-probabilities and their gradient (three such buffers).
    with torch.no_grad():
        a = hidden.detach()
        scores = a @ head_module.weight.T
        if head_module.bias is not None:
            scores += head_module.bias
        if exclude_seen:  # their probabilities, and so their gradient, become exactly 0
            scores.scatter_(1, seen_items(inputs, targets)[mask], float("-inf"))
        rows = torch.arange(len(scores), device=scores.device)
        target_score = scores[rows, targets[mask]]
        if label_smoothing:  # the items a target competes with: finite scores of real items
            competing = torch.isfinite(scores)
            competing[:, 0] = False
            spread_to = competing.to(scores.dtype).div_(competing.sum(dim=1, keepdim=True).clamp(min=1))
            target_score = (1.0 - label_smoothing) * target_score + label_smoothing * (
                scores.nan_to_num(neginf=0.0) * spread_to).sum(dim=1)
        top = scores.max(dim=1).values
        probs = scores.sub_(top[:, None]).exp_()
        total = probs.sum(dim=1)
        ce = total.log() - (target_score - top)  # cross-entropy of each real position (smoothed: its mixture)
        weight = 1.0 / counts.clamp(min=1).to(ce.dtype)[owner]  # a user's loss is its mean over positions
        per_user = torch.zeros(b, device=ce.device, dtype=ce.dtype).index_add_(0, owner, ce * weight)
        g_out = probs.div_(total[:, None])
        g_out[rows, targets[mask]] -= 1.0 - label_smoothing
        if label_smoothing:
            g_out.sub_(spread_to.mul_(label_smoothing))
        g_out.mul_(weight[:, None])  # d(sum of per-user losses) / d scores
        g_hidden = g_out @ head_module.weight
    records = capture.records
    # Backward through the body to module outputs only: no weight-gradient products are computed here.
    grads = torch.autograd.grad(hidden, [r[2] for r in records], grad_outputs=g_hidden, allow_unused=True)
    head = (a, g_out) if len(a) else None  # (A, G) of the output layer, rows grouped by user

    dense: dict[nn.Parameter, torch.Tensor] = {}
    if head_module.bias is not None and head_module.bias.requires_grad:  # (batch, catalogue): per-user sums of G
        dense[head_module.bias] = torch.zeros(b, g_out.shape[1], device=g_out.device, dtype=g_out.dtype).index_add_(0, owner, g_out)
    sparse: dict[nn.Parameter, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for (module, x, _), gy in zip(records, grads):
        if gy is None:
            continue
        if isinstance(module, nn.Embedding):
            sparse.setdefault(module.weight, []).append(_embedding_rows(module, x, gy))
        else:
            if x.dim() != 3:
                raise ConfigError(f"grad-sample-mode = fused expects (batch, length, features) inputs, got {tuple(x.shape)}")
            for p, g in _dense_per_user(module, x, gy).items():
                dense[p] = dense[p] + g if p in dense else g

    # Squared per-user norms of everything but the catalogue matrix.
    sq = torch.zeros(b, device=inputs.device, dtype=per_user.dtype)
    for g in dense.values():
        sq += g.pow(2).flatten(1).sum(1)
    merged: dict[nn.Parameter, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for p, parts in sparse.items():
        users, rows, vecs = (torch.cat(t) for t in zip(*parts))
        if len(parts) > 1:  # one module called twice: merge duplicate (user, row) pairs
            keys, inverse = torch.unique(users * p.shape[0] + rows, return_inverse=True)
            vecs = torch.zeros(len(keys), vecs.shape[1], device=vecs.device, dtype=vecs.dtype).index_add_(0, inverse, vecs)
            users, rows = keys // p.shape[0], keys % p.shape[0]
        merged[p] = (users, rows, vecs)
        if p is not catalogue:
            sq.index_add_(0, users, vecs.pow(2).sum(1))

    # The catalogue matrix, one user at a time; clip factors are final once its norm is known.
    factors = torch.ones(b, device=inputs.device, dtype=sq.dtype)
    norms = torch.zeros(b, device=inputs.device, dtype=sq.dtype)
    head_grad = _catalogue_clipped_sum(catalogue, head, merged.get(catalogue), counts, sq, factors, norms,
                                       max_grad_norm, ghost_below) if catalogue.requires_grad else None
    if not catalogue.requires_grad:
        norms.copy_(sq.sqrt())
        factors.copy_((max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0))

    # Clipped sums of the rest.
    for p, g in dense.items():
        p.grad = torch.einsum("b,b...->...", factors, g).contiguous()
    for p, (users, rows, vecs) in merged.items():
        if p is catalogue:
            continue
        p.grad = torch.zeros_like(p).index_add_(0, rows, vecs * factors[users].unsqueeze(1))
    if head_grad is not None:
        catalogue.grad = head_grad
    for p in model.parameters():  # parameters the loss does not reach (e.g. unused positions)
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    return ClippedBatch(loss=per_user.detach(), norms=norms, factors=factors)


def exact_poisson_steps(loader: DPDataLoader, steps: int) -> float:
    """Make Opacus' Poisson ``loader`` run exactly ``steps`` batches per epoch at rate 1/``steps``;
    returns that rate.

    Opacus sets rate = 1/len(loader) and then steps = int(1/rate), which floating point makes one
    fewer for about 7% of step counts (1/(1/93) = 92.99999...): 92 steps, and ``make_private``'s
    accountant then records rate 1/92 for them. The privacy plan (common/privacy.py
    steps_per_epoch) is rate 1/93 over 93 steps; without this, the ledger disagreed with it and a
    partner refused its last planned round (the over-stated history went past the target).
    """
    loader.batch_sampler.steps = steps
    loader.batch_sampler.sample_rate = 1.0 / steps  # the same unless the plan's steps are not len(loader)
    loader.sample_rate = 1.0 / steps
    return 1.0 / steps


def expected_batch(users: int, steps: int) -> int:
    """The expected Poisson batch the optimiser divides the noised sum by: users / steps, rounded down
    as Opacus does, but in integers. Opacus' int(users * (1 / steps)) is 0 for 49 users at 49 steps
    (batch-size 1: every weight NaN, the round's epsilon spent) and one short for about 500 (users,
    batch) pairs below 5,000 users (392 users at batch 8: 7)."""
    return max(1, users // steps)


def make_fused_private(engine: PrivacyEngine, *, optimizer: torch.optim.Optimizer,
                       data_loader: torch.utils.data.DataLoader, noise_multiplier: float, max_grad_norm: float,
                       steps: int | None = None,
                       batch: int | None = None) -> tuple[DPOptimizerFastGradientClipping, DPDataLoader]:
    """Opacus' own Poisson loader, noise-adding optimizer and accountant hook, wired exactly as
    ``PrivacyEngine.make_private(poisson_sampling=True, grad_sample_mode="ghost")`` wires them
    (sample rate 1 / len(loader), expected batch = users // len(loader)), so the accountant's
    history is Opacus' own; only the per-user clipping is ours (:func:`fused_clipped_backward`),
    and the step count is exact (:func:`exact_poisson_steps`). ``steps`` and ``batch`` (the plan's, from
    a public user count: common/private_count.py) replace len(loader) and users // steps.

    Returns ``(optimizer, data_loader)``.
    """
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizerFastGradientClipping

    if engine.dataset is None:
        engine.dataset = data_loader.dataset
    loader = DPDataLoader.from_data_loader(data_loader, generator=engine.secure_rng)
    steps = steps or len(data_loader)
    sample_rate = exact_poisson_steps(loader, steps)
    dp_optimizer = DPOptimizerFastGradientClipping(
        optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=batch or expected_batch(len(loader.dataset), steps), loss_reduction="mean",
        generator=engine.secure_rng if engine.secure_mode else None, secure_mode=engine.secure_mode,
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp_optimizer, loader


def _catalogue_clipped_sum(catalogue: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None,
                           tied: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, counts: torch.Tensor,
                           sq_rest: torch.Tensor, factors: torch.Tensor, norms: torch.Tensor,
                           max_grad_norm: float, ghost_below: float | None) -> torch.Tensor:
    """Sum over users of c_u times their catalogue-matrix gradient, filling ``norms``/``factors``.

    User u's gradient is M_u = G_u^T A_u (+ its item-embedding rows S_u at items r_u when tied),
    A_u (n_u x dim) the output layer's inputs and G_u (n_u x catalogue) its output gradients.
    Its squared norm is taken whichever way is cheaper for n_u positions:
    - ghost (n_u < V*D/(V+D)): <G G^T, A A^T> + 2 <G[:, r], A S^T> + ||S||^2, n_u^2 (V + D)
      multiply-adds, no (V x D) matrix; these users' clipped sum is one matmul at the end;
    - materialised: M_u itself (n_u*V*D, the share of the non-private weight gradient), whose
      norm is read off and which is added straight into the sum.
    """
    v, d = catalogue.shape
    threshold = v * d / (v + d) if ghost_below is None else ghost_below
    grad = torch.zeros_like(catalogue)
    counts_l = counts.tolist()
    starts_l = (torch.cumsum(counts, 0) - counts).tolist()
    empty = catalogue.new_zeros(0, dtype=torch.long), catalogue.new_zeros(0, d)
    if tied is not None:  # tied rows grouped by user
        order = torch.argsort(tied[0], stable=True)
        t_users, t_rows, t_vecs = (t[order] for t in tied)
        bounds = torch.searchsorted(t_users, torch.arange(len(counts) + 1, device=t_users.device)).tolist()
    ghost_users: list[int] = []
    for u, (s, n) in enumerate(zip(starts_l, counts_l)):
        a_u, g_u = (head[0][s:s + n], head[1][s:s + n]) if head is not None else (None, None)
        rows, vecs = (t_rows[bounds[u]:bounds[u + 1]], t_vecs[bounds[u]:bounds[u + 1]]) if tied is not None else empty
        own = None
        if n < threshold:
            total = sq_rest[u] + vecs.pow(2).sum()
            if n:
                total = total + ((g_u @ g_u.T) * (a_u @ a_u.T)).sum()
                if len(rows):
                    total = total + 2 * (g_u[:, rows] * (a_u @ vecs.T)).sum()
            ghost_users.append(u)
        else:
            own = g_u.T @ a_u
            if len(rows):
                own.index_add_(0, rows, vecs)
            flat = own.view(-1)
            total = sq_rest[u] + torch.dot(flat, flat)
        norms[u] = total.clamp(min=0).sqrt()
        factors[u] = (max_grad_norm / (norms[u] + CLIP_EPS)).clamp(max=1.0)
        if own is not None:
            grad.add_(own, alpha=float(factors[u]))
    if ghost_users and head is not None:
        idx = torch.tensor(ghost_users, device=counts.device)
        owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        keep = torch.zeros(len(counts), dtype=factors.dtype, device=counts.device)
        keep[idx] = 1.0
        scale = (factors * keep)[owner]  # c_u on ghost users' rows, 0 on the materialised ones (already added)
        # Scale the (rows x dim) side, never copy the (rows x catalogue) one; gather rows only when few are ghost.
        rows_g = keep[owner] > 0
        if 2 * int(rows_g.sum()) < len(owner):
            grad.addmm_(head[1][rows_g].T, head[0][rows_g] * scale[rows_g, None])
        else:
            grad.addmm_(head[1].T, head[0] * scale[:, None])
        if tied is not None:
            sel = torch.isin(t_users, idx)
            grad.index_add_(0, t_rows[sel], t_vecs[sel] * factors[t_users[sel], None])
    return grad
