"""Items rated in the same second have no order: shuffle them within their tie each epoch.

A log's timestamps often tie (in ML-100K 44% of users' test items share their second with the
item before them); a stable sort then orders a tie by file position, an order that says nothing
about the user. Trained on one fixed arbitrary order, a sequential model learns it as if it were
behaviour. :func:`shuffle_within_ties` gives training a fresh random order inside every tie, so the model
sees each tie as the unordered set it is ("Sequence or Pseudo-Sequence?", Woolridge et al., 2021).

Only the training prefix moves (every item but the last two); the validation and test items, and
so the leave-one-out split, never change. Timestamps stay as they are: inside a tie they are equal,
so the time-gap features of each position are unchanged too. Each user's sequence is permuted on
its own (one user stays one example), but from one stream for all users: under DP that stream must
be secret (common/training.py draws it from the OS's entropy then), since from a known seed one
more user shifts every later user's orders, and then one user changes many examples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.data.sequences import SequenceData


def tie_runs(timestamps: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every run of two or more equal consecutive timestamps."""
    t = np.asarray(timestamps)
    if len(t) < 2:
        return []
    change = np.flatnonzero(t[1:] != t[:-1]) + 1
    starts = np.concatenate(([0], change))
    stops = np.concatenate((change, [len(t)]))
    return [(int(a), int(b)) for a, b in zip(starts, stops) if b - a > 1]


def training_tie_runs(data: SequenceData) -> list[list[tuple[int, int]]]:
    """Per user, the tie runs of the training items (every item but the last two): the validation
    and test items stay in place, so a tie reaching into them is cut at the split. (With
    ``train-on-validation`` the validation item is a training target too, but it keeps its place:
    the test item's history is the recorded one.)"""
    return [tie_runs(times[:len(seq) - 2]) if len(seq) > 3 else [] for seq, times in zip(data.sequences, data.timestamps)]


def shuffle_within_ties(data: SequenceData, rng: np.random.Generator,
                        runs: list[list[tuple[int, int]]] | None = None) -> SequenceData:
    """``data`` with each user's training items permuted at random within their timestamp ties.

    ``runs``: :func:`training_tie_runs` of ``data``, when the caller shuffles the same data every
    epoch (timestamps never move, so the ties are found once).
    """
    runs = training_tie_runs(data) if runs is None else runs
    sequences = []
    for seq, user_runs in zip(data.sequences, runs):
        if user_runs:
            seq = seq.copy()
            for a, b in user_runs:
                seq[a:b] = seq[a:b][rng.permutation(b - a)]
        sequences.append(seq)
    return dataclasses.replace(data, sequences=sequences)
