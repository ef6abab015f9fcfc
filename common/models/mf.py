"""Matrix factorisation with private user factors (the federated MF baseline).

The federated model holds only item factors and item biases (one ``nn.Linear``: weight =
item factors, bias = item biases), so the weights a partner sends never contain a user
factor. User factors live at the partner (``client/private_factors.py``) and are refit
locally with the item factors fixed ("fold-in"); a user the model never saw gets a
factor fitted from its history in :meth:`MatrixFactorization.score`.

Likelihood: a user's training items under a softmax over the whole catalogue
(multinomial MF), so one DP-SGD sample is one user. A user is their last ``max-seq-len``
training items (``max_len``), in training, fold-in and evaluation alike, as SASRec's window;
a ``max-seq-len`` above the longest history gives an MF over every interaction.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.sequences import SequenceData
from common.errors import PrivacyError
from common.metrics import pad_left

if TYPE_CHECKING:  # common.training imports the models
    from common.dp_sgd import DPSettings
    from common.training import TrainResult


class MultinomialLoss(nn.Module):
    """Mean negative log-likelihood of each user's items under softmax(logits); one value per user
    with ``reduction="none"`` (Opacus ghost clipping sets that attribute)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)  # (b, V+1)
        valid = targets != 0
        picked = logp.gather(1, targets) * valid
        per_user = -picked.sum(dim=1) / valid.sum(dim=1).clamp(min=1)
        if self.reduction == "none":
            return per_user
        return per_user.sum() if self.reduction == "sum" else per_user.mean()


class MatrixFactorization(nn.Module):
    """Item factors and biases over item indices 0..V (0 = padding, never recommended).

    ``forward(user_factors)`` gives logits (batch, V+1).
    """

    def __init__(self, num_items: int, *, dim: int = 64, fold_in_steps: int = 20, l2: float = 1e-3, max_len: int = 50) -> None:
        super().__init__()
        self.num_items = num_items
        self.dim = dim
        self.fold_in_steps = fold_in_steps
        self.l2 = l2
        self.max_len = max_len
        self.items = nn.Linear(dim, num_items + 1)
        nn.init.normal_(self.items.weight, std=dim**-0.5)
        nn.init.zeros_(self.items.bias)

    def forward(self, user_factors: torch.Tensor) -> torch.Tensor:
        return self.items(user_factors)

    def fit_users(self, histories: torch.Tensor, init: torch.Tensor | None = None, steps: int | None = None,
                  lr: float = 0.1) -> torch.Tensor:
        """User factors (n, dim) maximising the likelihood of ``histories`` (left-padded item
        indices, 0 = padding) with item factors fixed; ``l2`` keeps them small."""
        steps = self.fold_in_steps if steps is None else steps
        # The fold-in is an optimisation: it needs autograd even when the caller scores under
        # torch.inference_mode() (serving does), and inference-mode tensors cannot be saved for
        # backward, so inputs are cloned outside it.
        with torch.inference_mode(False), torch.enable_grad():
            weight, bias = self.items.weight.detach().clone(), self.items.bias.detach().clone()
            histories = histories.clone()
            factors = (init.detach().clone() if init is not None
                       else torch.zeros(len(histories), self.dim, device=weight.device))
            factors.requires_grad_(True)
            optimiser = torch.optim.Adam([factors], lr=lr)
            loss_fn = MultinomialLoss("sum")
            for _ in range(steps):
                optimiser.zero_grad()
                loss = loss_fn(factors @ weight.T + bias, histories) + self.l2 * (factors**2).sum()
                loss.backward()
                optimiser.step()
        return factors.detach()

    @torch.no_grad()
    def score_users(self, user_factors: torch.Tensor) -> torch.Tensor:
        """Scores over item indices 0..V for known user factors."""
        return self.items(user_factors)

    @torch.no_grad()
    def score(self, histories: torch.Tensor) -> torch.Tensor:
        """Scores over item indices 0..V for users unseen by this model: fit their factors first."""
        return self.items(self.fit_users(histories))


def mf_examples(data: SequenceData, max_len: int) -> tuple[np.ndarray, torch.Tensor]:
    """(user positions, left-padded training items) of the users that are DP samples.

    The same users as ``common.training.user_count_for_training`` (``data.trainable_users()``),
    so the sample rate used for accounting matches the data.
    """
    train = data.train_sequences()
    users = data.trainable_users()
    return users, pad_left([train[u] for u in users], max_len)


def train_mf_local(
    model: MatrixFactorization,
    data: SequenceData,
    user_factors: torch.Tensor | None,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_len: int,
    dp: DPSettings | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> tuple[TrainResult, torch.Tensor]:
    """Train item factors with (DP-)SGD and refit private user factors; returns (TrainResult, factors).

    Each epoch: refit all user factors with items fixed (local, never sent), then one pass
    of (Poisson-sampled, per-user clipped, noised with ``dp``) Adam steps on the item
    factors and biases with user factors fixed. A user's per-sample gradient depends only
    on that user's data and the current public item factors, so clipping bounds it.
    ``user_factors`` (num_users x dim, rows in ``data`` order) warm-starts the fit.
    ``proximal_mu`` > 0 (FedProx) pulls the item factors toward the received global ones after
    every step, as for SASRec (common/proximal.py).
    """
    from common.proximal import ProximalAnchor
    from common.dp_sgd import (empty_batch_gradients, opacus_private, resolve_grad_sample_mode, seed_dp_randomness,
                               spent_mechanisms)
    from common.training import TrainResult, run_epochs  # lazy: training imports models

    start = time.perf_counter()
    torch.manual_seed(seed)
    users, targets = mf_examples(data, max_len)
    if len(users) == 0:
        raise PrivacyError(f"{data.name}: no user has two or more training interactions")
    all_histories = pad_left(data.train_sequences(), max_len).to(device)
    model.to(device).train()
    factors = user_factors.to(device) if user_factors is not None else torch.zeros(data.num_users, model.dim, device=device)
    dataset = TensorDataset(torch.from_numpy(users), targets)
    proximal = ProximalAnchor(model, mu=proximal_mu, learning_rate=learning_rate)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    # Poisson batches and noise nobody else can regenerate under DP (common/dp_sgd.py)
    sampler = seed_dp_randomness(dp.noise_seed) if dp is not None else torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampler)
    criterion: nn.Module = MultinomialLoss()
    hooks = engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        mode = resolve_grad_sample_mode(model, dp.grad_sample_mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=dp.accountant)
        hooks, optimizer, criterion, loader = opacus_private(engine, model, optimizer, loader, criterion, dp, mode)

    def refit_users() -> None:  # each epoch: user factors for the current item factors (never sent)
        nonlocal factors
        factors = model.fit_users(all_histories, init=factors)

    def batch_loss(idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        loss = criterion(model(factors[idx.to(device)]), tgt.to(device))
        loss.backward()
        return loss

    loss, steps = run_epochs(loader, optimizer, batch_loss, epochs=epochs, hooks=hooks, before_epoch=refit_users,
                             after_step=proximal.step,
                             before_empty_step=empty_batch_gradients(model, mode) if engine else lambda: None)
    factors = model.fit_users(all_histories, init=factors)  # match the final item factors
    model.eval()
    result = TrainResult(loss=loss, steps=steps, num_examples=len(users), mechanisms=spent_mechanisms(engine),
                         seconds=time.perf_counter() - start)
    return result, factors.cpu()
