"""Scoring a history whose last items share a timestamp: average over their possible orders.

Events logged in the same second have no order (in ML-100K 44% of users' test items share their
second with the item before them); the log's file order inside such a tie says nothing about the
user. A sequential model trained with ``shuffle-ties`` has seen every tie in random orders, so
scoring one arbitrary order asks it about an order that does not exist. The prediction that
matches what is known is the mixture over orders: P(next | history) averaged over uniformly random
orders of each tie (Monte Carlo, ``orders`` draws). Only ties that reach into the model's window
(the last ``max_len`` items) can change its input, so users without one are scored once.

Scores come back as log-probabilities (log of the mean softmax); for a user scored once that is
``log_softmax`` of the model's scores, the same ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.data.ties import tie_runs

# Evaluation is reproducible: the orders are drawn from a fixed stream (nothing private depends on it).
ORDER_SEED = 20_260_101


def window_tie_runs(histories: Sequence[np.ndarray], timestamps: Sequence[np.ndarray],
                    max_len: int) -> list[list[tuple[int, int]]]:
    """Per history, the (start, stop) runs of equal timestamps that reach into its last ``max_len``
    items (``timestamps[u]`` aligned with ``histories[u]``, possibly longer: its prefix is used)."""
    runs = []
    for h, t in zip(histories, timestamps):
        first = len(h) - max_len
        runs.append([(a, b) for a, b in tie_runs(np.asarray(t)[:len(h)]) if b > first])
    return runs


def batch_scorer(histories: Sequence[np.ndarray], timestamps: Sequence[np.ndarray], *, max_len: int,
                 orders: int) -> Callable[..., torch.Tensor]:
    """``scores(score, start, batch)`` for consecutive batches of ``histories`` (one evaluation pass):
    the model's scores when ``orders`` <= 1, else :func:`order_averaged_scores` with the ties of each
    window."""
    runs = window_tie_runs(histories, timestamps, max_len) if orders > 1 else None

    def scores(score: Callable[[list[int], list[np.ndarray]], torch.Tensor], start: int,
               batch: list[np.ndarray]) -> torch.Tensor:
        if runs is None:
            return score(list(range(len(batch))), batch)
        return order_averaged_scores(score, batch, runs[start:start + len(batch)], orders=orders)

    return scores


def order_averaged_scores(score: Callable[[list[int], list[np.ndarray]], torch.Tensor],
                          histories: Sequence[np.ndarray], runs: Sequence[Sequence[tuple[int, int]]], *,
                          orders: int, seed: int = ORDER_SEED) -> torch.Tensor:
    """log mean_o softmax(score(rows, histories in order o)), o over ``orders`` random orders of each
    history's tie ``runs`` (rows without a run, or ``orders`` <= 1: log_softmax of one pass).

    ``score(rows, histories)`` returns (len(rows), V+1) scores for those rows of the batch. Each
    row draws its orders from its own stream, seeded by ``seed`` and the history itself: a user's
    score does not depend on the batch, the partner or the position it is evaluated in, so the
    partners' summed metrics equal one evaluation of all users (a shared stream made them differ).
    """
    everyone = list(range(len(histories)))
    out = torch.log_softmax(score(everyone, list(histories)).double(), dim=1)
    tied = [i for i in everyone if runs[i]]
    if orders <= 1 or not tied:
        return out
    rngs = {i: np.random.default_rng([seed, *np.asarray(histories[i], dtype=np.int64).tolist()]) for i in tied}
    total = torch.zeros(len(tied), out.shape[1], dtype=torch.float64)
    for _ in range(orders):
        shuffled = []
        for i in tied:
            h = np.array(histories[i], copy=True)
            for a, b in runs[i]:
                h[a:b] = h[a:b][rngs[i].permutation(b - a)]
            shuffled.append(h)
        total += torch.softmax(score(tied, shuffled).double(), dim=1)
    out[tied] = torch.log(total / orders)
    return out
