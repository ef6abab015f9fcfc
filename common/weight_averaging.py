"""Averaged weights: a training call returns an exponential moving average of its iterates (``ema-decay``).

After every optimiser step ``avg <- decay * avg + (1 - decay) * w``, started at zero and divided by
``1 - decay ** steps`` at the end (Adam's bias correction), so the result is the weighted mean

    sum_k (1 - decay) * decay ** (n - k) * w_k / (1 - decay ** n)

of the call's n iterates w_1..w_n: close to the last ~1/(1 - decay) of them in a long call, their plain
mean in a call shorter than that, and w_1 itself after one step. The weights are then set to it.

Why: averaging the iterates of (DP-)SGD cancels part of the step noise the final iterate carries;
under DP it is post-processing of the noised iterates (De et al., 2022), so it costs no privacy.
Why not ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``: its average starts at
the first iterate, whose weight stays ``decay ** (n - 1)``, so a partner with fewer steps per round
than the window would send back nearly its first step every round and stop learning. It also
deep-copies the model, Opacus' hooks included.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError


class IterateAverage:
    """The bias-corrected exponential moving average of ``model``'s trainable parameters over the steps
    :meth:`update` is called after; ``decay`` 0 keeps nothing and leaves the model as trained."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ConfigError(f"ema-decay = {decay!r} must be in [0, 1) (0 = no averaging)")
        self.decay = float(decay)
        self._params = [p for p in model.parameters() if p.requires_grad] if decay else []
        self._average = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        # the total weight 1 - decay ** steps, kept with the same float32 decay as the average: a float64
        # correction of a float32 recursion drifts once a call is longer than the window (a review)
        self._weight = torch.zeros((), dtype=torch.float32)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (call after every optimiser step)."""
        if not self._params:
            return
        self._weight.mul_(self.decay).add_(1.0 - self.decay)
        for param, average in zip(self._params, self._average):
            average.mul_(self.decay).add_(param.detach().float(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def apply(self) -> None:
        """Set the model's trainable parameters to the average; a no-op before the first step or when off."""
        if not self._weight:  # off, or no step yet
            return
        for param, average in zip(self._params, self._average):
            param.copy_(average / self._weight)
