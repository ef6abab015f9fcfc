"""Item embeddings from item co-occurrence (``item-init = "cooccurrence"``): a spectral start for SASRec.

Each partner counts, over its users' training sequences (never a validation or test item), how often
two items appear at most ``window`` positions apart; the coordinator sums the partners' counts (the
sum equals the counts of all users at once), takes the positive pointwise mutual information (PPMI)
of the pairs and initialises the item embedding table with its truncated SVD, ``U_k sqrt(S_k)``
(items that co-occur often start close together). Training then proceeds as usual.

Privacy: the counts are statistics of a partner's users outside any DP mechanism, so the config
checks allow this start only where the run itself protects nothing (``dp-mode = "off"``, no SecAgg+).
"""

from __future__ import annotations

import numpy as np
import torch

from common.data.sequences import SequenceData
from common.errors import DataError


def cooccurrence_counts(data: SequenceData, window: int) -> np.ndarray:
    """(V+1, V+1) float32 symmetric counts of item pairs at most ``window`` apart in each user's training
    sequence (``train_sequences``: the validation and test items are never counted); row/column 0 (padding) stay 0."""
    size = data.num_items + 1
    counts = np.zeros((size, size), dtype=np.float64)
    for history in data.train_sequences():
        history = np.asarray(history, dtype=np.int64)
        for offset in range(1, min(window, len(history) - 1) + 1):
            before, after = history[:-offset], history[offset:]
            np.add.at(counts, (before, after), 1.0)
            np.add.at(counts, (after, before), 1.0)
    counts[0, :] = counts[:, 0] = 0.0
    return counts.astype(np.float32)


def check_counts(counts: np.ndarray, num_items: int, who: str) -> None:
    """Refuse counts that are not a (V+1, V+1) table of finite, non-negative, symmetric numbers (one line)."""
    size = num_items + 1
    if counts.shape != (size, size):
        raise DataError(f"{who}: item-pair counts of shape {counts.shape}, expected ({size}, {size}) for the "
                        f"catalogue of {num_items} items")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise DataError(f"{who}: item-pair counts hold negative, NaN or infinite values")
    if not np.allclose(counts, counts.T):
        raise DataError(f"{who}: item-pair counts are not symmetric")


def spectral_item_embeddings(counts: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(V+1, dim) rows: ``U_k sqrt(S_k)`` of the counts' PPMI, scaled so the counted items' rows have a mean
    squared norm of 1 (that of SASRec's default N(0, 1/dim) rows); items never counted get N(0, 1/dim)
    rows drawn from ``seed``; row 0 (padding) is 0."""
    counts = counts.astype(np.float64)
    total, row = counts.sum(), counts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / np.outer(row, row))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    u, s, _ = np.linalg.svd(ppmi, full_matrices=False)
    k = min(dim, len(s))
    emb = np.zeros((len(counts), dim))
    emb[:, :k] = u[:, :k] * np.sqrt(s[:k])
    counted = row > 0
    counted[0] = False
    if counted.any() and (energy := (emb[counted] ** 2).sum()) > 0:
        emb[counted] *= np.sqrt(counted.sum() / energy)
    never = ~counted
    never[0] = False
    emb[never] = np.random.default_rng(seed).normal(0.0, dim ** -0.5, size=(int(never.sum()), dim))
    emb[0] = 0.0
    return emb.astype(np.float32)


def initialise_item_embeddings(model: torch.nn.Module, counts: np.ndarray, seed: int) -> None:
    """Set ``model.item_emb`` (SASRec's id table; the tied output shares it) to the spectral rows of ``counts``."""
    weight = model.item_emb.weight
    rows = spectral_item_embeddings(counts, weight.shape[1], seed)
    with torch.no_grad():
        weight.copy_(torch.from_numpy(rows).to(weight.dtype))
