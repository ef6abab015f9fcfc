"""Training examples of a sequential recommender: one (input, target) pair per user, or per
window / backwards reading of a history for non-private training."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import TensorDataset

from common.data.sequences import SequenceData
from common.metrics import pad_left


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
