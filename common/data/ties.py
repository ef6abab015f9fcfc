"""Items rated in the same second have no order: shuffle them within their tie each epoch.

A log's timestamps often tie (in ML-100K 44% of users' test items share their second with the
item before them); a stable sort then orders a tie by file position, an order that says nothing
about the user. Trained on one fixed arbitrary order, a sequential model learns it as if it were
behaviour. :func:`shuffle_within_ties` gives training a fresh random order inside every tie, so the model
sees each tie as the unordered set it is ("Sequence or Pseudo-Sequence?", Woolridge et al., 2021).

Only the training prefix moves (every item but the last two); the validation and test items, and
so the leave-one-out split, never change. Timestamps stay as they are: inside a tie they are equal,
so the time-gap features of each position are unchanged too. Each user's sequence is permuted on
its own (one user stays one example), so user-level DP accounting is unaffected.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.data.sequences import SequenceData


def training_tie_groups(data: SequenceData) -> list[np.ndarray | None]:
    """Per user, a group label for each training item (every item but the last two), equal within a
    tie and increasing along the sequence; ``None`` for a user without ties. The validation and test
    items stay in place, so a tie reaching into them is cut at the split."""
    groups: list[np.ndarray | None] = []
    for seq, times in zip(data.sequences, data.timestamps):
        train = np.asarray(times[:max(len(seq) - 2, 0)])
        labels = np.concatenate(([0], np.cumsum(train[1:] != train[:-1]))) if len(train) > 1 else None
        groups.append(labels if labels is not None and labels[-1] < len(train) - 1 else None)
    return groups


def shuffle_within_ties(data: SequenceData, rng: np.random.Generator,
                        groups: list[np.ndarray | None] | None = None) -> SequenceData:
    """``data`` with each user's training items permuted at random within their timestamp ties.

    ``groups``: :func:`training_tie_groups` of ``data``, when the caller shuffles the same data
    every epoch (timestamps never move, so the ties are found once).
    """
    groups = training_tie_groups(data) if groups is None else groups
    sequences = []
    for seq, labels in zip(data.sequences, groups):
        if labels is not None:
            seq = seq.copy()
            # sort by (tie, random key): an item alone in its group keeps its place, a tie is permuted
            seq[:len(labels)] = seq[:len(labels)][np.lexsort((rng.random(len(labels)), labels))]
        sequences.append(seq)
    return dataclasses.replace(data, sequences=sequences)
