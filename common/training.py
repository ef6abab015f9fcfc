"""Local training of a sequential recommender, plain or with Opacus DP-SGD (one sample = one user)."""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.sequences import SequenceData
from common.data.ties import shuffle_within_ties, training_tie_runs
from common.errors import ConfigError, PrivacyError
from common.metrics import drop_seen
from common.dp_sgd import DPSettings, Steppers, empty_batch_gradients, make_steppers, spent_mechanisms
from common.per_user_clipping import fused_clipped_backward
from common.privacy import Mechanism, refuse_many_examples_per_user
from common.objectives import SequenceLoss, positions_only_loss, trim_padding
from common.proximal import ProximalAnchor
from common.training_pairs import training_pairs
from common.weight_averaging import IterateAverage

if TYPE_CHECKING:  # Opacus loads only when a call trains with DP
    from opacus.grad_sample.gsm_base import AbstractGradSampleHooks


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as asked.

    A CUDA device this machine does not have is a :class:`ConfigError` naming the knob, not a
    CUDA traceback on the first tensor moved there.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device = {requested!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(f"device = {requested!r} but this machine has {count} CUDA device(s); "
                              "use device = 'auto' or 'cpu'")
    elif device.type != "cpu":
        raise ConfigError(f"device = {requested!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return device


@dataclass
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    mechanisms: list[Mechanism]  # what this call spent; append to the ledger
    seconds: float
    optimizer_state: dict | None = None  # Adam's state after the call (moments, step counts)


def run_epochs(
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[..., torch.Tensor],
    *,
    epochs: int,
    before_epoch: Callable[[], None] = lambda: None,
    before_empty_step: Callable[[], None] = lambda: None,
    after_step: Callable[[], None] = lambda: None,
    hooks: AbstractGradSampleHooks | None = None,  # removed at the end
) -> tuple[float, int]:
    """The loop every local trainer shares: ``epochs`` passes over ``loader``, one optimiser step per batch.

    ``batch_loss(*batch)`` returns the batch's loss with its gradients already in ``p.grad``
    (``backward`` done, or the fused DP clipper's sum). An empty Poisson batch (DP) still takes
    a step, the noise alone, after ``before_empty_step``. ``after_step`` runs after every step
    (FedProx's pull). Opacus' ``hooks`` are removed at the end, also on an error.
    Returns (mean loss over the non-empty batches, optimiser steps taken).
    """
    total, batches, steps = 0.0, 0, 0
    try:
        for _ in range(epochs):
            before_epoch()
            for batch in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(batch[0]) == 0:  # an empty Poisson batch still counts as a noisy step
                    before_empty_step()
                    optimizer.step()
                    after_step()
                    steps += 1
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss = batch_loss(*batch)
                optimizer.step()
                after_step()
                total += float(loss.item())
                batches += 1
                steps += 1
    finally:
        if hooks is not None:
            hooks.cleanup()
    return total / max(batches, 1), steps


def refuse_non_sequence_model(model: nn.Module, what: str) -> None:
    """One :class:`ConfigError` line where a tool trains with :func:`train_local`, which trains
    sequence models (SASRec, text SASRec) only; MF trains with common/models/mf.py (federated runs)."""
    if not hasattr(model, "hidden"):
        raise ConfigError(f"{what}: model = \"mf\" is not supported here (it trains only in federated runs, "
                          "common/models/mf.py); use model = \"sasrec\"")


def train_local(
    model: nn.Module,
    data: SequenceData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    max_len: int,
    dp: DPSettings | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    proximal_mu: float = 0.0,
    history_windows: bool = False,
    reverse_histories: bool = False,
    learning_rates: list[float] | None = None,
    optimizer_state: dict | None = None,
    exclude_seen: bool = False,
    shuffle_ties: bool = False,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``data``'s users.

    ``history_windows`` (only without ``dp``): every ``max_len`` window of a history is an example
    (:func:`training_pairs`); with DP an example must stay one user, so it is an error there.
    ``reverse_histories`` (only without ``dp``, likewise): each history is also trained on read
    backwards (``training_pairs(backwards=True)``).

    ``proximal_mu`` > 0 (FedProx) pulls the weights toward the received global model after
    every step (common/proximal.py; no privacy cost).

    ``exclude_seen`` (``exclude-seen`` in the config): each position's softmax leaves out the
    items already in the user's history (:func:`drop_seen`), plain and DP alike.

    ``label_smoothing`` (``label-smoothing``): the share of each target's weight spread evenly over
    the items it competes with (:func:`smoothed_cross_entropy`), plain and DP alike.

    ``shuffle_ties`` (``shuffle-ties``): before every epoch, items with equal timestamps are put in a
    fresh random order within their tie (common/data/ties.py); the split never changes.

    ``ema_decay`` (``ema-decay``) > 0: the model ends at the bias-corrected exponential moving average
    of this call's iterates instead of the last one (:class:`IterateAverage`; no privacy cost).

    ``learning_rates``: one per epoch (:func:`epoch_learning_rates`), in place of ``learning_rate``.

    ``optimizer_state``: an Adam state from an earlier call (``TrainResult.optimizer_state``) to
    continue from, instead of fresh moments; with DP the moments are functions of noised
    gradients only (post-processing, no privacy cost).

    With ``dp``, each step Poisson-samples users (expected ``batch_size``), clips each
    user's gradient to ``max_grad_norm`` and adds Gaussian noise; ``mechanisms`` lists
    (noise_multiplier, sample_rate, steps) for the privacy ledger.
    """
    start = time.perf_counter()
    refuse_non_sequence_model(model, "training")
    torch.manual_seed(seed)
    if learning_rates is not None and len(learning_rates) != epochs:
        raise ValueError(f"learning_rates has {len(learning_rates)} entries for {epochs} epochs")
    refuse_many_examples_per_user({"history-windows": history_windows, "reverse-histories": reverse_histories},
                                  local_dp=dp is not None)
    # How histories become examples: here and after every tie reshuffle
    make_pairs = partial(training_pairs, max_len=max_len, time_features=getattr(model, "time_features", False),
                         windows=history_windows, backwards=reverse_histories)
    dataset = make_pairs(data)
    if len(dataset) == 0:
        raise PrivacyError(f"{data.name}: no user has two or more training interactions")
    model.to(device).train()
    proximal = ProximalAnchor(model, mu=proximal_mu, learning_rate=learning_rate)
    adam = _adam(model, learning_rate, optimizer_state)
    steppers = make_steppers(model, adam, dataset, SequenceLoss(label_smoothing=label_smoothing), dp,
                             batch_size=batch_size, seed=seed)
    batch_loss = _batch_loss(model, steppers, dp, device, exclude_seen=exclude_seen, label_smoothing=label_smoothing)
    reorder_ties = _tie_reorderer(data, dataset, make_pairs, dp, seed, shuffle_ties=shuffle_ties)
    set_epoch_rate = _epoch_rate_setter(learning_rates, adam, proximal, proximal_mu)
    average = IterateAverage(model, ema_decay)

    def after_step() -> None:
        proximal.step()
        average.update()

    def before_epoch() -> None:
        reorder_ties()
        set_epoch_rate()

    no_users = empty_batch_gradients(model, steppers.mode) if steppers.engine else lambda: None
    loss, steps = run_epochs(steppers.loader, steppers.optimizer, batch_loss, epochs=epochs, hooks=steppers.hooks,
                             after_step=after_step, before_epoch=before_epoch, before_empty_step=no_users)
    average.apply()
    model.eval()
    return TrainResult(loss=loss, steps=steps, num_examples=len(dataset), mechanisms=spent_mechanisms(steppers.engine),
                       seconds=time.perf_counter() - start, optimizer_state=adam.state_dict())


def _adam(model: nn.Module, learning_rate: float, optimizer_state: dict | None) -> torch.optim.Adam:
    """A fresh Adam, or one continuing from ``optimizer_state`` at this call's learning rate."""
    adam = torch.optim.Adam(model.parameters(), lr=learning_rate)
    if optimizer_state:
        adam.load_state_dict(optimizer_state)
        for group in adam.param_groups:  # this call's learning rate, not the stored one
            group["lr"] = learning_rate
    return adam


def _batch_loss(model: nn.Module, steppers: Steppers, dp: DPSettings | None, device: torch.device | str, *,
                exclude_seen: bool, label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``run_epochs``' ``batch_loss``: the batch's loss, its gradients left in ``p.grad``."""
    fused = steppers.mode == "fused"  # "" without DP

    def batch_loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs, targets = trim_padding(inputs.to(device), targets.to(device))
        if fused:  # sets p.grad to the sum of per-user clipped gradients
            return fused_clipped_backward(model, inputs, targets, max_grad_norm=dp.max_grad_norm,
                                          exclude_seen=exclude_seen, label_smoothing=label_smoothing).loss.mean()
        if dp is None and hasattr(model, "hidden"):
            loss = positions_only_loss(model, inputs, targets, exclude_seen=exclude_seen,
                                       label_smoothing=label_smoothing)
        else:
            logits = model(inputs)
            loss = steppers.criterion(drop_seen(logits, inputs, targets) if exclude_seen else logits, targets)
        loss.backward()
        return loss

    return batch_loss


def _tie_reorderer(data: SequenceData, dataset: TensorDataset, make_pairs: Callable[[SequenceData], TensorDataset],
                   dp: DPSettings | None, seed: int, *, shuffle_ties: bool) -> Callable[[], None]:
    """Before each epoch: ``dataset`` rebuilt with ``data``'s ties in a fresh order; a no-op without ties."""
    # Tie orders: the run seed, which the coordinator knows, only without DP or with reproducible simulation
    # noise. One stream serves every user, so from the run seed one more user shifts every later user's
    # orders: a coordinator knowing the seed and the other users' histories saw most examples change, and
    # the clipped sum move by 8.9x max-grad-norm (a review). A secret stream keeps them each uniformly random.
    tie_rng = np.random.default_rng(secrets.randbits(128) if dp is not None and dp.noise_seed is None else seed)
    ties = training_tie_runs(data) if shuffle_ties else []
    if not any(ties):  # no ties: nothing to redraw
        return lambda: None

    def reorder_ties() -> None:  # the loaders (Opacus' too) read dataset.tensors at every batch
        dataset.tensors = make_pairs(shuffle_within_ties(data, tie_rng, ties)).tensors

    return reorder_ties


def _epoch_rate_setter(learning_rates: list[float] | None, adam: torch.optim.Adam, proximal: ProximalAnchor,
                       proximal_mu: float) -> Callable[[], None]:
    """Before each epoch: the next of ``learning_rates``, for Adam and FedProx's pull; a no-op without them."""
    if learning_rates is None:
        return lambda: None
    epoch_rates = iter(learning_rates)

    def set_epoch_rate() -> None:  # Adam itself steps under every wrapper (Opacus', fused)
        rate = next(epoch_rates)
        for group in adam.param_groups:
            group["lr"] = rate
        proximal.factor = rate * proximal_mu  # FedProx's pull follows the same rate

    return set_epoch_rate


def user_count_for_training(data: SequenceData) -> int:
    """Users that contribute a training example (the DP population size)."""
    return len(data.trainable_users())
