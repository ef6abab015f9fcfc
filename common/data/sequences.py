"""Catalogue, per-user time-ordered sequences and the leave-one-out split (SASRec protocol).

Items are indexed 1..V in catalogue order; index 0 is padding. Ties at the same timestamp
are broken by a stable sort that keeps the original file order, which decides which item
is held out for test (in ML-100K 415 of 943 users have several items at their last
timestamp).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from common.data.loaders import Interactions
from common.errors import DataError

LOG = logging.getLogger("fedrec.data")
MIN_INTERACTIONS = 3  # one train item at least, plus validation and test


@dataclass
class SequenceData:
    """Users' item sequences over a shared catalogue.

    ``sequences[u]`` holds 1-based item indices in time order; the last item is the test
    target, the second last the validation target, the rest the training history. With
    ``validation_held_out`` false (run config ``train-on-validation``) the validation item is
    training data too: the final fit once settings were chosen on it; the test item never is.
    """

    catalogue: np.ndarray  # raw item ids (str); item index i+1 <-> catalogue[i]
    user_ids: np.ndarray  # raw user ids (str)
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray]
    dropped: dict[str, int] = field(default_factory=dict)
    name: str = "data"
    identity: str = ""  # a growing source's permanent id (event store); "" = identified by content
    validation_held_out: bool = True

    @property
    def num_items(self) -> int:
        return len(self.catalogue)

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    def subset(self, users: np.ndarray | list[int], name: str | None = None) -> SequenceData:
        """The same catalogue restricted to the users at positions ``users``."""
        idx = np.asarray(users, dtype=np.int64)
        return SequenceData(
            catalogue=self.catalogue,
            user_ids=self.user_ids[idx],
            sequences=[self.sequences[i] for i in idx],
            timestamps=[self.timestamps[i] for i in idx],
            dropped=dict(self.dropped),
            name=name or self.name,
            validation_held_out=self.validation_held_out,
        )

    @property
    def held_out_items(self) -> int:
        """Items at the end of each sequence that are not training data: validation and test, or test only."""
        return 2 if self.validation_held_out else 1

    def train_sequences(self) -> list[np.ndarray]:
        """Training histories: every item but the last two (validation, test), or but the last one
        when the validation item is training data (``validation_held_out`` false)."""
        return [s[:-self.held_out_items] for s in self.sequences]

    def eval_cases(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(history, target) per user: ``valid`` predicts the second last item from the
        training history, ``test`` predicts the last item from everything before it."""
        if split == "valid":
            if not self.validation_held_out:
                raise DataError(f"{self.name}: the validation items are training data here (train-on-validation = "
                                "true), so they cannot score a model; choose settings with train-on-validation = "
                                "false, or score the test split")
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences], dtype=np.int64)
        if split == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences], dtype=np.int64)
        raise ValueError(f"unknown split {split!r}; use 'valid' or 'test'")

    def fingerprint(self) -> str:
        """A short hash of catalogue and sequences: identifies this data set in ledgers and checkpoints.

        A growing event store is one data set for its whole life (its ledger keeps counting
        as events arrive), so its fingerprint hashes the store's id, not the content.
        """
        if self.identity:
            return hashlib.sha256(f"identity:{self.identity}".encode()).hexdigest()[:16]
        return self.content_fingerprint()

    def content_fingerprint(self) -> str:
        """The hash of catalogue and sequences whatever the identity: what a plain log's ledger was written
        under, so a partner who names its log (or moves it into an event store) can show that a ledger is
        that data's (client/privacy_ledger.py, ``adopt``)."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.catalogue.tolist()).encode())
        for uid, seq in zip(self.user_ids.tolist(), self.sequences):
            h.update(str(uid).encode())
            h.update(np.ascontiguousarray(seq, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def trainable_users(self) -> np.ndarray:
        """Positions of the users that make a training example: two or more training items (an
        input and the item after it). They are the DP population: every trainer, the accountant's
        sample rate, the audit and a partner's data check count these users."""
        return np.array([u for u, s in enumerate(self.sequences) if len(s) - self.held_out_items >= 2], dtype=np.int64)

    def item_counts(self) -> np.ndarray:
        """Interactions per item index in the training histories (index 0 = padding, always 0)."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for s in self.train_sequences():
            np.add.at(counts, s, 1)
        return counts


def make_catalogue(items: np.ndarray) -> np.ndarray:
    """Ordered unique item ids: numeric order when every id is an integer, else lexicographic."""
    uniq = np.unique(items.astype(str))
    try:
        order = np.argsort(uniq.astype(np.int64), kind="stable")
        return uniq[order]
    except (ValueError, OverflowError):  # not all integers, or one beyond int64 (a review: a traceback)
        return uniq


def build_sequences(
    log: Interactions,
    catalogue: np.ndarray | None = None,
    *,
    min_interactions: int = MIN_INTERACTIONS,
    name: str | None = None,
) -> SequenceData:
    """Group a log into per-user time-ordered sequences over ``catalogue``.

    Items missing from the catalogue and users with fewer than ``min_interactions`` events
    are dropped and counted (logged as a warning). Raises :class:`DataError` when no user
    is left.
    """
    catalogue = make_catalogue(log.item) if catalogue is None else np.asarray(catalogue, dtype=str)
    dropped = dict(log.dropped)
    lookup = {iid: i + 1 for i, iid in enumerate(catalogue.tolist())}
    item_idx = np.fromiter((lookup.get(i, 0) for i in log.item.tolist()), dtype=np.int64, count=len(log))
    known = item_idx > 0
    if (~known).any():
        dropped["unknown-item"] = int((~known).sum())
    users, user_codes = np.unique(log.user[known], return_inverse=True)
    ts = log.timestamp[known]
    items = item_idx[known]
    # Stable: ties at one timestamp keep file order.
    order = np.lexsort((np.arange(len(ts)), ts, user_codes))
    bounds = np.flatnonzero(np.diff(user_codes[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    seqs, times, kept = [], [], []
    short = 0
    for g in groups:
        if len(g) < min_interactions:
            short += 1
            continue
        seqs.append(items[g])
        times.append(ts[g])
        kept.append(user_codes[g[0]])
    if short:
        dropped["short-user"] = short
    label = name or log.source
    if len(log) and not known.any():  # blame the catalogue, not the log's users
        # counts in parentheses: a partner's error reply drops them (client/safe_errors.py), as a coordinator
        # that chose the catalogue learnt the partner's distinct items from them (a red-team review)
        raise DataError(f"{label}: none of its item ids ({len(np.unique(log.item))} distinct) is in the catalogue "
                        f"({len(catalogue)} ids, the first {str(catalogue[0])[:40]!r}): is that the federation's "
                        "published catalogue (one item id per line), and are these the same item ids?")
    if not seqs:
        raise DataError(f"{label}: no user has at least {min_interactions} interactions with catalogue items")
    if "unknown-item" in dropped or short:
        LOG.warning("%s: dropped %d interactions with items not in the catalogue and %d users with fewer than %d interactions",
                    label, dropped.get("unknown-item", 0), short, min_interactions)
    user_ids = users[np.array(kept, dtype=np.int64)]
    # Numeric user order when possible so partitions are stable across id spellings.
    try:
        order_u = np.argsort(user_ids.astype(np.int64), kind="stable")
    except (ValueError, OverflowError):
        order_u = np.argsort(user_ids, kind="stable")
    return SequenceData(
        catalogue=catalogue,
        user_ids=user_ids[order_u],
        sequences=[seqs[i] for i in order_u],
        timestamps=[times[i] for i in order_u],
        dropped=dropped,
        name=label,
    )
