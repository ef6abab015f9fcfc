"""How a round starts: bounded waiting for partners, and round numbers that continue across a resume.

Flower's ``Strategy.start`` numbers rounds 1..num_rounds and its node sampler waits forever
for ``min_available_nodes``. ``RoundControl`` wraps a strategy so that

* round ``r`` of this process is round ``first_round - 1 + r`` of the federation, for the
  inner strategy (FedAdam's bias correction), the ``server-round`` sent to clients (their
  seeds) and the run directory; and
* each sampling step waits at most ``node_wait_timeout`` seconds for enough partners, then
  fails with one clear line instead of hanging; and
* a tied weight's copies in the new global model are made one again (:func:`retie`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import FederationError
from common.models.sasrec import merge_tied_copies
from common.evaluation import evaluates_round


def wait_for_nodes(grid: Grid, needed: int, timeout: float, *, poll: float = 1.0) -> int:
    """Wait until ``needed`` nodes are connected; returns how many are. Raises after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FederationError(
                f"only {connected} of the {needed} partners needed (min-nodes) connected within "
                f"node-wait-timeout = {timeout:g} s; start more SuperNodes or lower min-nodes"
            )
        log(INFO, "waiting for partners: %d connected, %d needed (%.0f s left)", connected, needed, left)
        time.sleep(min(poll, left))
    return connected


def retie(arrays: ArrayRecord, groups: Sequence[Sequence[str]]) -> ArrayRecord:
    """``arrays`` with every group of tied keys (one Parameter in the model) set to the group's mean.

    Why: a tied weight travels once per module using it, and central DP noises (SecAgg+ rounds)
    each copy independently. Partners load one table (common/models/sasrec.py: merge_tied_copies);
    if the server kept diverging copies, each partner's next update would contain the gap between
    them, noise-sized, which clipping then scales the real update down to nothing. The mean is
    post-processing of the released aggregate: no privacy cost.
    """
    groups = [g for g in groups if len(g) > 1 and all(k in arrays for k in g)]
    if not groups or all(all(np.array_equal(arrays[g[0]].numpy(), arrays[k].numpy()) for k in g[1:]) for g in groups):
        return arrays
    merged = {k: torch.from_numpy(arrays[k].numpy()) for g in groups for k in g}
    for g in groups:
        merge_tied_copies(merged, *g)  # the one rule partners load with
    out = ArrayRecord()
    for key in arrays.keys():
        out[key] = Array(merged[key].numpy()) if key in merged else arrays[key]
    return out


def keep_dtypes(arrays: ArrayRecord, dtypes: dict[str, np.dtype]) -> ArrayRecord:
    """``arrays`` with each array cast back to the dtype the global model had when it was sent.

    Why: Flower's FedAdam computes in float64 (NumPy 2 keeps a float64 scalar's precision), so its
    new global model came back float64; partners train and reply in float32, and update
    validation then refused every reply of round 2 onwards (dtype mismatch)."""
    if not any(key in dtypes and arrays[key].numpy().dtype != dtypes[key] for key in arrays.keys()):
        return arrays
    out = ArrayRecord()
    for key in arrays.keys():
        a = arrays[key]
        out[key] = Array(a.numpy().astype(dtypes[key])) if key in dtypes and a.numpy().dtype != dtypes[key] else a
    return out


class RoundControl(Strategy):
    """Offset round numbers and bound the wait for partners; everything else is delegated.

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy (typically a :class:`server.validation.ValidatingStrategy`).
    first_round : int
        The federation's number for this process' round 1 (1 for a fresh run, last
        checkpointed round + 1 when resuming).
    min_nodes : int
        Partners that must be connected before a round samples (Flower's
        ``max(min_available_nodes, min_train_nodes)``).
    node_wait_timeout : float
        Seconds to wait for ``min_nodes`` partners before failing the run.
    evaluate_every, last_round : int
        Federated evaluation only every ``evaluate_every``-th federation round and at
        ``last_round`` (:func:`evaluates_round`); other rounds send no evaluation messages.
    tied : sequence of key groups
        State-dict keys that are one Parameter in the model (:func:`retie`).
    """

    def __init__(self, inner: Strategy, *, first_round: int = 1, min_nodes: int, node_wait_timeout: float,
                 evaluate_every: int = 1, last_round: int = 0, tied: Sequence[Sequence[str]] = ()) -> None:
        if first_round < 1:
            raise ValueError("first_round must be at least 1")
        if node_wait_timeout <= 0:
            raise ValueError("node_wait_timeout must be positive (seconds)")
        if evaluate_every < 1:
            raise ValueError("evaluate_every must be at least 1")
        self.inner = inner
        self.offset = first_round - 1
        self.min_nodes = min_nodes
        self.node_wait_timeout = node_wait_timeout
        self.evaluate_every = evaluate_every
        self.last_round = last_round
        self.tied = [tuple(g) for g in tied]
        self.sent_dtypes: dict[str, np.dtype] = {}  # the global model's dtypes as last sent (keep_dtypes)

    def federation_round(self, local_round: int) -> int:
        """The federation's round number of this process' round ``local_round``."""
        return local_round + self.offset

    def summary(self) -> None:
        """Log the round settings, then the inner strategy's."""
        log(INFO, "\t├──> Rounds: first round %d, wait for %d partners at most %g s",
            self.offset + 1, self.min_nodes, self.node_wait_timeout)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout)
        self.sent_dtypes = {key: arrays[key].numpy().dtype for key in arrays.keys()}
        return self.inner.configure_train(self.federation_round(server_round), arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(self.federation_round(server_round), replies)
        if arrays is None:
            return None, metrics
        return retie(keep_dtypes(arrays, self.sent_dtypes), self.tied), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not evaluates_round(self.federation_round(server_round), self.evaluate_every, self.last_round):
            return []  # no evaluation this round (evaluate-every); metrics.jsonl gets null HR/NDCG
        wait_for_nodes(grid, self.min_nodes, self.node_wait_timeout)
        return self.inner.configure_evaluate(self.federation_round(server_round), arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not evaluates_round(self.federation_round(server_round), self.evaluate_every, self.last_round):
            return None
        return self.inner.aggregate_evaluate(self.federation_round(server_round), replies)
