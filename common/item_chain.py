"""A partner's own item chain, blended into a sequence model's scores where the partner ranks for its users.

On MovieLens most of what a sequential model finds is "what is rated next to what": films are
rated in sittings whose order says little, so a first-order chain that counts a -> b and b -> a
alike is a strong ranker on its own (``simulations.baselines``). With ``chain-weight`` w > 0 a
partner ranks its users' candidates by

    log softmax(model scores) + w * log P_chain(item | the user's last ``chain-window`` items),

where P_chain is the decayed sum of the partner's neighbour counts from the user's recent items
(weight ``chain-decay``^j for the j-th most recent), each user's row normalised to 1.

**Privacy: nothing leaves the partner.** The counts are taken from the partner's own training
histories (never a validation or test item) when it evaluates, and only change how it ranks for
its own users; no model parameter is trained on them and no count is sent. So the chain spends no
budget: a partner's replies carry what they carried before (evaluation sums, and under DP a model
trained by DP-SGD). As with MF's user factors, each partner scores with its own part: a
one-partner federation scores with the chain of all users, five partners each with that of theirs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Users with no counted neighbour still get a ranking: a popularity term far below any count
TIE_BREAK_SCALE = 1e-6
UNSEEN_POPULARITY = 0.5  # the popularity, in events, of an item no training history at the partner holds
LOG_FLOOR = 1e-12  # keeps the log finite (the padding column has probability 0)


@dataclass(frozen=True)
class ItemChain:
    """Symmetric neighbour counts of one partner's training histories (CSR rows over item indices)
    and the blend's knobs: ``window`` recent items, ``decay`` per step back, ``weight`` in the blend."""

    indptr: np.ndarray  # (width + 1,) row starts
    indices: np.ndarray  # neighbour item of each stored count
    counts: np.ndarray  # float64 count of each (row item, neighbour) pair, both orders summed
    tie_break: np.ndarray  # (width,) tiny popularity term
    window: int
    decay: float
    weight: float

    def log_probs(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(rows, width) float64: log P_chain(item | each history's last ``window`` items)."""
        out = np.tile(self.tie_break, (len(histories), 1))
        for row, h in enumerate(histories):
            recent = np.asarray(h, dtype=np.int64)[::-1][:self.window]
            for step, item in enumerate(recent):
                a, b = self.indptr[item], self.indptr[item + 1]
                out[row, self.indices[a:b]] += self.decay ** step * self.counts[a:b]
        return np.log(out / out.sum(axis=1, keepdims=True) + LOG_FLOOR)

    def blend(self, scores: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """``scores`` (rows, width) turned into log-probabilities plus ``weight`` x the chain's (float64)."""
        model = torch.log_softmax(scores.detach().double().cpu(), dim=1)
        return model + self.weight * torch.from_numpy(self.log_probs(histories))


def item_chain(train: Sequence[np.ndarray], width: int, *, window: int, decay: float, weight: float) -> ItemChain:
    """The chain of ``train`` (training histories of item indices < ``width``), stored sparse: a
    partner's pairs are a small share of the catalogue squared."""
    rows, cols = [], []
    for s in train:
        s = np.asarray(s, dtype=np.int64)
        rows += [s[:-1], s[1:]]
        cols += [s[1:], s[:-1]]
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    pairs, counts = np.unique(row * width + col, return_counts=True)
    indptr = np.searchsorted(pairs // width, np.arange(width + 1))
    popularity = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in train] or [np.zeros(0, np.int64)]),
                             minlength=width)[:width].astype(np.float64)
    # an item no training history holds counts as half an event: just below the least popular counted item
    # without a neighbour, not at the log floor, where the blend would never recommend an item new to the partner
    popularity = np.maximum(popularity, UNSEEN_POPULARITY)
    popularity[0] = 0.0  # padding
    return ItemChain(indptr=indptr, indices=pairs % width, counts=counts.astype(np.float64),
                     tie_break=TIE_BREAK_SCALE * popularity / max(popularity.max(), 1.0),
                     window=int(window), decay=float(decay), weight=float(weight))


def chain_from_config(cfg: Mapping[str, Any], train: Sequence[np.ndarray], width: int) -> ItemChain | None:
    """The partner's chain under the run config's ``chain-*`` knobs; ``None`` when ``chain-weight`` is 0."""
    weight = float(cfg.get("chain-weight", 0.0))
    if weight <= 0:
        return None
    return item_chain(train, width, window=int(cfg["chain-window"]), decay=float(cfg["chain-decay"]), weight=weight)
