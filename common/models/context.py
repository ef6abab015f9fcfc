"""Context inputs of SASRec (``time-features``, ``genre-features``): time gaps and item genres.

Time: each history position carries the gap (seconds) to the user's previous
interaction, bucketed on a log2 scale; a model with ``time_features`` takes inputs of
shape (batch, length, 2): channel 0 item indices, channel 1 gap buckets. Gaps are always
computed on the full history *before* truncating to ``max_len``, so training, evaluation
and serving give a position the same bucket.

Genres: a (V+1, G) multi-hot matrix from the item metadata (MovieLens ``u.item`` /
``movies.dat``), rows normalised to sum 1; the model projects it with an ``nn.Linear``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from common.data.loaders import load_item_titles
from common.errors import ConfigError
from common.metrics import pad_left

NUM_TIME_BUCKETS = 32  # 0 = padding / unknown, 1 = first interaction, 2.. = 2 + floor(log2(1 + gap seconds))


def time_gap_buckets(timestamps: np.ndarray) -> np.ndarray:
    """Bucket per interaction of its gap to the previous one (unix seconds in, ints out)."""
    ts = np.asarray(timestamps, dtype=np.int64)
    if len(ts) == 0:
        return np.zeros(0, dtype=np.int64)
    gaps = np.diff(ts).clip(min=0).astype(np.float64)
    buckets = 2 + np.floor(np.log2(1.0 + gaps)).astype(np.int64)
    return np.concatenate([[1], np.minimum(buckets, NUM_TIME_BUCKETS - 1)])


def model_inputs(model: torch.nn.Module, histories: Sequence[np.ndarray], max_len: int,
                 gaps: Sequence[np.ndarray] | None = None) -> torch.Tensor:
    """The input tensor ``model`` expects for left-padded ``histories`` (item indices).

    (batch, max_len) item indices; for a model with ``time_features`` (batch, max_len, 2)
    whose channel 1 holds ``gaps``: per history, its :func:`time_gap_buckets` sliced the
    same way as the history (same length). Without ``gaps`` the channel is 0 (unknown).
    """
    items = pad_left(histories, max_len)
    if not getattr(model, "time_features", False):
        return items
    buckets = torch.zeros_like(items) if gaps is None else pad_left(gaps, max_len)
    return torch.stack([items, buckets], dim=-1)


def history_gaps(sequences: Sequence[np.ndarray], timestamps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`time_gap_buckets` of each full sequence, as a prefix-aligned list (slice like the items)."""
    return [time_gap_buckets(t)[: len(s)] for s, t in zip(sequences, timestamps)]


def item_genre_matrix(catalogue: np.ndarray, metadata: str | os.PathLike) -> torch.Tensor:
    """(V+1, G) float rows summing to 1 over each item's genres (padding and unknown items: 0)."""
    titles = load_item_titles(metadata)
    names = sorted({g for _, genres in titles.values() for g in genres})
    if not names:
        raise ConfigError(f"genre-features: no genres found in {metadata}")
    column = {g: j for j, g in enumerate(names)}
    matrix = np.zeros((len(catalogue) + 1, len(names)), dtype=np.float32)
    for row, item in enumerate(np.asarray(catalogue, dtype=str).tolist(), start=1):
        genres = titles.get(item, ("", []))[1]
        for g in genres:
            matrix[row, column[g]] = 1.0 / len(genres)
    return torch.from_numpy(matrix)
