"""The training objective of SASRec: full-softmax next-item cross-entropy per user, its options
(``exclude-seen``, ``label-smoothing``), the learning-rate schedule, and padding trimming."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from common.metrics import seen_items


def objective_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train_local``'s training-objective keywords from a run config (``exclude-seen``, ``shuffle-ties``,
    ``label-smoothing``, ``ema-decay``): one place, so every trainer (partners, fine-tune, benches) follows
    the same knobs."""
    return {"exclude_seen": bool(cfg["exclude-seen"]), "shuffle_ties": bool(cfg["shuffle-ties"]),
            "label_smoothing": float(cfg.get("label-smoothing", 0.0)), "ema_decay": float(cfg.get("ema-decay", 0.0))}


def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy of ``logits`` (rows, catalogue + 1) against ``targets`` (rows,), with
    ``smoothing`` of the target's weight spread evenly over the real items it competes with (the
    finite logits of columns 1.., so items ``exclude-seen`` masked stay out):
    (1 - s) * -log p(target) + s * mean over those items of -log p(item). 0 = plain cross-entropy."""
    if not smoothing:
        return nn.functional.cross_entropy(logits, targets, reduction="none")
    logp = torch.log_softmax(logits, dim=-1)
    competing = torch.isfinite(logits)
    competing[:, 0] = False  # the padding column is never a recommendation
    spread = -logp.masked_fill(~competing, 0.0).sum(dim=1) / competing.sum(dim=1).clamp(min=1)
    return (1.0 - smoothing) * -logp.gather(1, targets.unsqueeze(1)).squeeze(1) + smoothing * spread


LR_SCHEDULES = ("constant", "cosine")


def epoch_learning_rates(cfg: Mapping[str, Any], server_round: int) -> list[float]:
    """Round ``server_round``'s per-epoch learning rates under ``lr-schedule``.

    ``constant``: ``learning-rate`` throughout. ``cosine``: annealed over the run's
    ``num-server-rounds x local-epochs`` epochs, ``learning-rate * (1 + cos(pi * k / K)) / 2`` at epoch
    k of K counted from round 1, so every partner follows the same curve whichever rounds it trains
    in. A function of public knobs only: no privacy cost.
    """
    schedule, base = str(cfg["lr-schedule"]), float(cfg["learning-rate"])
    epochs = int(cfg["local-epochs"])
    if schedule == "constant":
        return [base] * epochs
    if schedule != "cosine":
        raise ConfigError(f"lr-schedule = {schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    total = max(int(cfg["num-server-rounds"]) * epochs, 1)
    first = (int(server_round) - 1) * epochs
    return [base * (1 + math.cos(math.pi * min(k, total - 1) / total)) / 2 for k in range(first, first + epochs)]


class SequenceLoss(nn.Module):
    """Full-softmax cross-entropy of next-item prediction, averaged over each user's positions.

    ``reduction="none"`` gives one loss per user (shape ``(batch,)``), which is what
    Opacus' ghost clipping needs for a per-user clipping unit.
    """

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        b, t, v = logits.shape
        if self.label_smoothing:  # padding targets score 0, computed only at real positions
            flat, real = targets.reshape(b * t), (targets.reshape(b * t) != 0).nonzero().squeeze(1)
            ce = logits.new_zeros(b * t).index_put(
                (real,), smoothed_cross_entropy(logits.reshape(b * t, v)[real], flat[real], self.label_smoothing))
        else:
            ce = nn.functional.cross_entropy(logits.reshape(b * t, v), targets.reshape(b * t), ignore_index=0,
                                             reduction="none")
        valid = (targets != 0).sum(dim=1).clamp(min=1)
        per_user = ce.view(b, t).sum(dim=1) / valid
        if self.reduction == "none":
            return per_user
        if self.reduction == "sum":
            return per_user.sum()
        return per_user.mean()


def positions_only_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                        exclude_seen: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """The :class:`SequenceLoss` objective, scoring the catalogue only at real (non-padding)
    positions: same value and gradient, a fraction of the cost for short histories.
    ``exclude_seen``: the objective of :func:`drop_seen`; ``label_smoothing``: :func:`smoothed_cross_entropy`'s.

    Non-private training only: Opacus needs the (batch, length, ...) layout to attribute
    gradients to users.
    """
    mask = targets > 0
    logits = model.output(model.hidden(inputs)[mask])
    if exclude_seen:
        logits = logits.scatter(-1, seen_items(inputs, targets)[mask], float("-inf"))
    ce = smoothed_cross_entropy(logits, targets[mask], label_smoothing)
    owner = torch.arange(len(targets), device=targets.device).unsqueeze(1).expand_as(targets)[mask]
    per_user = torch.zeros(len(targets), device=ce.device, dtype=ce.dtype).index_add_(0, owner, ce)
    return (per_user / mask.sum(dim=1).clamp(min=1)).mean()


def trim_padding(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding for every row of a left-padded batch.

    Same loss and gradients (SASRec's positions are right-aligned and padding is masked; with
    dropout the random masks are drawn on the smaller shape, so runs differ bit for bit), but
    attention and feed-forward cost follow the batch's longest history instead of ``max_len``.
    """
    items = inputs[..., 0] if inputs.dim() == 3 else inputs  # (b, t, 2): item and time-gap channels
    used = (items != 0).any(dim=0).nonzero()
    first = int(used[0]) if len(used) else items.shape[1] - 1
    if first == 0:
        return inputs, targets
    return inputs[:, first:].contiguous(), targets[:, first:].contiguous()
