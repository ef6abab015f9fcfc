"""FedProx's proximal term, applied as a decoupled step toward the global model.

FedProx (Li et al., 2020) adds ``mu/2 * ||w - w_global||^2`` to each partner's loss. We do
not add it to the loss: under DP-SGD Opacus clips and noises per-sample gradients only,
so a data-independent term in the loss would be silently dropped from the update (hooks
mode) or confuse ghost clipping's per-user norms. Instead, after every optimiser step,

    w <- w - learning_rate * mu * (w - w_global)

the gradient step of the proximal term itself, decoupled from Adam's scaling the way
AdamW decouples weight decay. It reads only the current weights and the public global
model, so it costs no privacy, and it behaves the same with and without DP.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError


class ProximalAnchor:
    """Pulls ``model``'s parameters toward the values they had when the anchor was made.

    Parameters
    ----------
    model : nn.Module
        The local model, holding the global weights at construction time.
    mu : float
        FedProx's proximal weight (``proximal-mu``); 0 disables the pull.
    learning_rate : float
        The local learning rate; the pull per step is ``learning_rate * mu`` of the distance.
    """

    def __init__(self, model: nn.Module, *, mu: float, learning_rate: float) -> None:
        if mu < 0:
            raise ConfigError(f"proximal-mu = {mu:g} must be >= 0")
        self.factor = float(learning_rate) * float(mu)
        if self.factor >= 1:
            raise ConfigError(f"learning-rate * proximal-mu = {self.factor:g} must be < 1 (the pull would overshoot)")
        self._pairs = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad] if mu > 0 else []

    @torch.no_grad()
    def step(self) -> None:
        """One proximal step: move every parameter ``factor`` of the way back to the anchor."""
        for param, anchor in self._pairs:
            param.sub_(self.factor * (param - anchor))
