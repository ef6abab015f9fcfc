"""Local training of a sequential recommender, plain or with Opacus DP-SGD (one sample = one user)."""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.sequences import SequenceData
from common.data.ties import shuffle_within_ties, training_tie_runs
from common.errors import ConfigError, PrivacyError
from common.metrics import drop_seen, pad_left, seen_items
from common.per_user_clipping import (exact_poisson_steps, expected_batch, fused_clipped_backward, make_fused_private,
                                      supports_fused)
from common.privacy import Mechanism, refuse_many_examples_per_user
from common.proximal import ProximalAnchor
from common.secure_noise import draw_securely


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


def objective_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``train_local``'s training-objective keywords from a run config (``exclude-seen``, ``shuffle-ties``,
    ``label-smoothing``): one place, so every trainer (partners, fine-tune, benches) follows the same knobs."""
    return {"exclude_seen": bool(cfg["exclude-seen"]), "shuffle_ties": bool(cfg["shuffle-ties"]),
            "label_smoothing": float(cfg.get("label-smoothing", 0.0))}


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


def window_bounds(length: int, max_len: int) -> list[tuple[int, int]]:
    """(start, end) slices cutting a history of ``length`` items from its end into windows of
    ``max_len + 1`` items overlapping by one, so every item but the first is a target exactly
    once; windows shorter than 2 are dropped."""
    out, end = [], length
    while end >= 2:
        out.append((max(0, end - max_len - 1), end))
        end -= max_len
    return out


def split_into_windows(history: np.ndarray, max_len: int) -> list[np.ndarray]:
    """The history cut into the windows of :func:`window_bounds`."""
    return [history[a:b] for a, b in window_bounds(len(history), max_len)]


def read_backwards(data: SequenceData) -> SequenceData:
    """``data`` with each user's training items in reverse order (validation and test items stay last).

    Timestamps become ``-t`` reversed, so they still rise and each time gap is the real gap between
    the two neighbours."""
    cut = [len(h) for h in data.train_sequences()]  # the split's own rule for what is training
    return dataclasses.replace(
        data,
        sequences=[np.concatenate([s[:n][::-1], s[n:]]) for s, n in zip(data.sequences, cut)],
        timestamps=[np.concatenate([-t[:n][::-1], t[n:]]) for t, n in zip(data.timestamps, cut)],
    )


def training_pairs(data: SequenceData, max_len: int, *, time_features: bool = False,
                   windows: bool = False, backwards: bool = False) -> TensorDataset:
    """One (input, target) pair per user with at least two training items: inputs are the
    history shifted by one, left-padded to ``max_len``; with ``time_features`` inputs are
    (users, max_len, 2), channel 1 the time-gap buckets (common/models/context.py).

    ``windows`` (non-private training only: a DP example must be one user) adds a pair for every
    earlier ``max_len`` window of a longer history, so the whole history is trained on, not just its end.

    ``backwards`` (non-private training only, for the same reason) adds the pairs of every history
    read backwards (:func:`read_backwards`): items rated in one sitting come in an arbitrary order,
    so "what goes with what" holds in both directions.
    """
    if backwards:
        forward = training_pairs(data, max_len, time_features=time_features, windows=windows)
        reverse = training_pairs(read_backwards(data), max_len, time_features=time_features, windows=windows)
        return TensorDataset(*(torch.cat([f, r]) for f, r in zip(forward.tensors, reverse.tensors)))
    train = data.train_sequences()
    if windows:
        bounds = [(u, a, b) for u, h in enumerate(train) for a, b in window_bounds(len(h), max_len)]
        inputs = pad_left([train[u][a:b - 1] for u, a, b in bounds], max_len)
        if time_features:  # a window's gaps are sliced from the whole history's (its first item keeps its real gap)
            from common.models.context import history_gaps

            gaps = history_gaps(train, data.timestamps)
            inputs = torch.stack([inputs, pad_left([gaps[u][a:b - 1] for u, a, b in bounds], max_len)], dim=-1)
        return TensorDataset(inputs, pad_left([train[u][a + 1:b] for u, a, b in bounds], max_len))
    keep = data.trainable_users().tolist()
    histories = [train[u][-(max_len + 1):] for u in keep]
    inputs = pad_left([h[:-1] for h in histories], max_len)
    if time_features:
        from common.models.context import history_gaps

        gaps = history_gaps([train[u] for u in keep], [data.timestamps[u] for u in keep])
        inputs = torch.stack([inputs, pad_left([g[-(max_len + 1):][:-1] for g in gaps], max_len)], dim=-1)
    targets = pad_left([h[1:] for h in histories], max_len)
    return TensorDataset(inputs, targets)


@dataclass
class DPSettings:
    """DP-SGD parameters of one training call (units: noise as a multiple of the clip norm)."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    grad_sample_mode: str = "auto"  # auto | fused | hooks | ghost
    noise_seed: int | None = None  # None: noise from a CSPRNG (common/secure_noise.py); int: simulations only


def seed_dp_randomness(noise_seed: int | None) -> torch.Generator:
    """Seed torch's global generator, from which dropout draws its masks (and Opacus its Gaussian
    noise when ``noise_seed`` is an int); returns the generator for the data loader, from which
    Opacus' Poisson sampler draws each step's users when ``noise_seed`` is an int.

    Why: the trainer seeds torch from the run config's ``seed`` (model init, shuffles), which the
    coordinator chooses; randomness drawn from that stream could be regenerated by the
    coordinator, and every partner would draw the same. ``None`` reseeds from the OS's entropy
    (``secrets``), and noise and batches then come from a CSPRNG instead
    (:mod:`common.secure_noise`), so only dropout draws from torch; an int is for simulations only.
    """
    seed = secrets.randbits(62) if noise_seed is None else noise_seed
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1)


@dataclass
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    mechanisms: list[Mechanism]  # what this call spent; append to the ledger
    seconds: float
    optimizer_state: dict | None = None  # Adam's state after the call (moments, step counts)


def resolve_grad_sample_mode(model: nn.Module, requested: str) -> str:
    """``auto``: our fused per-user clipping for SASRec (common/per_user_clipping.py, tied or
    not), else Opacus ghost clipping unless the model ties weights across modules.

    NOTE: Opacus' ghost clipping refuses one Parameter used by two modules (the tied
    SASRec output layer: "Parameter tying is not supported"); hooks mode accumulates the
    per-sample gradients of both uses correctly (tests/test_per_sample_gradients.py).
    """
    if requested == "fused" and not supports_fused(model):
        raise ConfigError(f"grad-sample-mode = fused needs SASRec, not {type(model).__name__}; use auto, ghost or hooks")
    if requested != "auto":
        return requested
    if supports_fused(model):
        return "fused"
    return "hooks" if getattr(model, "tied_output", False) else "ghost"


def opacus_private(engine, model: nn.Module, optimizer, loader: DataLoader, criterion: nn.Module,  # noqa: ANN001
                   dp: DPSettings, mode: str) -> tuple:
    """Opacus' ``make_private`` with Poisson sampling, unwrapped model and the run's noise:
    returns (hooks, optimizer, criterion, loader); the criterion is Opacus' wrapper in ghost mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure_mode and full-backward-hook notices
        prepared = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=mode, wrap_model=False,
        )
    # Exactly len(loader) steps at rate 1/len(loader), as planned (Opacus' int(1/rate) loses one for
    # ~7% of step counts): the sampler, the optimiser's expected batch and the accountant's hook
    steps = len(loader)
    dp_optimizer, dp_loader = prepared[1], prepared[-1]
    rate = exact_poisson_steps(dp_loader, steps)
    dp_optimizer.expected_batch_size = expected_batch(len(dp_loader.dataset), steps)
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=rate))
    if dp.noise_seed is None:
        draw_securely(dp_optimizer, dp_loader)
    if mode == "ghost":
        return prepared
    hooks, optimizer, loader = prepared
    return hooks, optimizer, criterion, loader


def run_epochs(
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[..., torch.Tensor],
    *,
    epochs: int,
    before_epoch: Callable[[], None] = lambda: None,
    before_empty_step: Callable[[], None] = lambda: None,
    after_step: Callable[[], None] = lambda: None,
    hooks=None,  # noqa: ANN001 -- Opacus' GradSampleModule hooks, removed at the end
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


def empty_batch_gradients(model: nn.Module, mode: str) -> Callable[[], None]:
    """For ``run_epochs``' ``before_empty_step`` under DP: the zero gradient Opacus' optimiser noises
    when Poisson sampling drew no user (fused and ghost clipping read ``p.grad``, hooks mode
    ``p.grad_sample``, here with zero users)."""

    def fill() -> None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if p.requires_grad else None
            if mode == "hooks" and p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    return fill


def spent_mechanisms(engine) -> list[Mechanism]:  # noqa: ANN001 -- an Opacus PrivacyEngine or None
    """What the engine's accountant recorded, as ledger rows (noise, sample rate, steps); [] without DP."""
    if engine is None:
        return []
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]


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
    time_features = getattr(model, "time_features", False)
    dataset = training_pairs(data, max_len, time_features=time_features, windows=history_windows,
                             backwards=reverse_histories)
    if len(dataset) == 0:
        raise PrivacyError(f"{data.name}: no user has two or more training interactions")
    model.to(device).train()
    proximal = ProximalAnchor(model, mu=proximal_mu, learning_rate=learning_rate)
    optimizer = adam = torch.optim.Adam(model.parameters(), lr=learning_rate)
    if optimizer_state:
        adam.load_state_dict(optimizer_state)
        for group in adam.param_groups:  # this call's learning rate, not the stored one
            group["lr"] = learning_rate
    # Under DP the Poisson sampler (Opacus takes the loader's generator), noise and dropout draw
    # from a seed the coordinator cannot know (seed_dp_randomness); the run seed only without DP
    sampler = seed_dp_randomness(dp.noise_seed) if dp is not None else torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampler)
    criterion: nn.Module = SequenceLoss(label_smoothing=label_smoothing)
    hooks = None
    engine = None
    if dp is not None:
        from opacus import PrivacyEngine

        mode = resolve_grad_sample_mode(model, dp.grad_sample_mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode and full-backward-hook notices
            engine = PrivacyEngine(accountant=dp.accountant)
        if mode == "fused":  # our clipping, Opacus' loader/noise/accountant (common/per_user_clipping.py)
            optimizer, loader = make_fused_private(engine, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm)
            if dp.noise_seed is None:
                draw_securely(optimizer, loader)
        else:
            hooks, optimizer, criterion, loader = opacus_private(engine, model, optimizer, loader, criterion, dp, mode)
    fused = engine is not None and mode == "fused"

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
            loss = criterion(drop_seen(logits, inputs, targets) if exclude_seen else logits, targets)
        loss.backward()
        return loss

    tie_rng = np.random.default_rng(seed)
    ties = training_tie_runs(data) if shuffle_ties else []

    def reorder_ties() -> None:  # the loaders (Opacus' too) read dataset.tensors at every batch
        fresh = training_pairs(shuffle_within_ties(data, tie_rng, ties), max_len, time_features=time_features,
                               windows=history_windows, backwards=reverse_histories)
        dataset.tensors = fresh.tensors

    has_ties = any(ties)  # no ties: nothing to redraw
    epoch_rates = iter(learning_rates or [])

    def before_epoch() -> None:
        if has_ties:
            reorder_ties()
        if learning_rates is not None:  # Adam itself steps under every wrapper (Opacus', fused)
            rate = next(epoch_rates)
            for group in adam.param_groups:
                group["lr"] = rate
            proximal.factor = rate * proximal_mu  # FedProx's pull follows the same rate

    loss, steps = run_epochs(loader, optimizer, batch_loss, epochs=epochs, hooks=hooks, after_step=proximal.step,
                             before_epoch=before_epoch,
                             before_empty_step=empty_batch_gradients(model, mode) if engine else lambda: None)
    model.eval()
    return TrainResult(loss=loss, steps=steps, num_examples=len(dataset), mechanisms=spent_mechanisms(engine),
                       seconds=time.perf_counter() - start, optimizer_state=adam.state_dict())


def user_count_for_training(data: SequenceData) -> int:
    """Users that contribute a training example (the DP population size)."""
    return len(data.trainable_users())
