"""Update validation: every training reply is checked against the global model before aggregation.

``ValidatingStrategy`` wraps any ``flwr.serverapp.strategy`` strategy (composition, like
Flower's DP wrappers): it remembers the global arrays sent in ``configure_train``, rejects
replies that are malformed, non-finite, too far from the global model or that claim an
implausible number of examples, logs each rejection with the partner's node id, and hands
the rest to the inner strategy. A round with fewer than ``min_train_nodes`` valid replies
fails cleanly: the global model stays as it was and the run continues.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


@dataclass(frozen=True)
class UpdateBounds:
    """What a plausible training reply looks like.

    Parameters
    ----------
    max_update_norm : float
        Largest accepted L2 norm of ``new - global`` over all arrays (parameter units);
        ``0`` disables the bound.
    max_num_examples : int
        Largest accepted ``num-examples`` (users trained on); FedAvg weights by it, so an
        inflated count would let one partner dominate the average.
    weight_key : str
        The metric FedAvg weights by.
    """

    max_update_norm: float = 100.0
    max_num_examples: int = 1_000_000
    weight_key: str = "num-examples"


def check_update(content: RecordDict, global_arrays: dict[str, np.ndarray], bounds: UpdateBounds) -> str | None:
    """The reason ``content`` must not be aggregated, or ``None`` when it is acceptable.

    Checks, in order: exactly one ArrayRecord and one MetricRecord; the same array keys,
    shapes and dtypes as ``global_arrays``; all values finite; ``||new - global||_2`` within
    ``bounds.max_update_norm``; finite metrics; ``num-examples`` a positive whole number no
    larger than ``bounds.max_num_examples``.
    """
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} "
                f"and {len(content.metric_records)}")
    if next(iter(content.array_records)) != ARRAYS_RECORD:
        return f"its ArrayRecord is not named {ARRAYS_RECORD!r}"
    arrays = next(iter(content.array_records.values()))
    missing = sorted(set(global_arrays) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(global_arrays))
    if missing or extra:
        return f"array keys differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for key, reference in global_arrays.items():
        try:
            value = arrays[key].numpy()
        except Exception as exc:  # a malformed Array cannot be decoded; say what, not its bytes
            return f"array {key!r} cannot be decoded ({type(exc).__name__})"
        if value.shape != reference.shape:
            return f"array {key!r} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        if value.dtype != reference.dtype:
            return f"array {key!r} has dtype {value.dtype}, expected {reference.dtype}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"array {key!r} has non-finite values (NaN or inf)"
        diff = value.astype(np.float64) - reference.astype(np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = math.sqrt(squared)
    if bounds.max_update_norm > 0 and norm > bounds.max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm = {bounds.max_update_norm:g}"
    problem = metrics_problem(content)
    if problem:
        return problem
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get(bounds.weight_key)
    if n is None or isinstance(n, list):
        return f"metric {bounds.weight_key!r} is missing or not a single number"
    if n <= 0 or n != int(n) or n > bounds.max_num_examples:
        return f"{bounds.weight_key} = {n:g} is not a whole number in [1, {bounds.max_num_examples}] (max-num-examples)"
    return None


def metrics_problem(content: RecordDict) -> str | None:
    """Why a reply's metrics cannot be aggregated (not exactly one MetricRecord, a non-finite value), or None."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    if next(iter(content.metric_records)) != METRICS_RECORD:
        # Flower compares replies' metrics under the first reply's record name: another name raised
        # InconsistentMessageReplies out of the strategy, and the ServerApp stopped (a review)
        return f"its MetricRecord is not named {METRICS_RECORD!r}"
    for key, value in next(iter(content.metric_records.values())).items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return f"metric {key!r} is not finite"
    return None


def metrics_digest(content: RecordDict) -> str:
    """SHA-256 over a reply's metric records (keys sorted): a stable order for evaluation sums."""
    h = hashlib.sha256()
    for record in content.metric_records.values():
        for key in sorted(record.keys()):
            h.update(f"{key}={record[key]!r};".encode())
    return h.hexdigest()


def content_digest(content: RecordDict) -> str:
    """SHA-256 over a reply's arrays: a stable order for aggregation, whatever order replies arrived in."""
    h = hashlib.sha256()
    for record in content.array_records.values():
        for key in sorted(record.keys()):
            h.update(key.encode())
            h.update(record[key].data)
    return h.hexdigest()


class ValidatingStrategy(Strategy):
    """Reject bad training replies before ``inner`` aggregates them.

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy (FedAvg, FedAdam, median, ...); all calls are delegated.
    bounds : UpdateBounds
        Norm and example-count limits, see :func:`check_update`.
    min_train_nodes : int
        Fewest valid replies a round may aggregate; with fewer the round fails and the
        global model is kept.
    """

    def __init__(self, inner: Strategy, *, bounds: UpdateBounds, min_train_nodes: int,
                 on_unaggregated: Callable[[int, Message, str], None] | None = None,
                 on_rejected_evaluation: Callable[[int, Message], None] | None = None) -> None:
        if min_train_nodes < 1:
            raise ValueError("min_train_nodes must be at least 1")
        self.inner = inner
        # Told of every received update that is not aggregated (the privacy report counts its spend)
        self.on_unaggregated = on_unaggregated
        # Told of every rejected evaluation reply (a noised one spent budget: the privacy report counts it)
        self.on_rejected_evaluation = on_rejected_evaluation
        self.bounds = bounds
        self.min_train_nodes = min_train_nodes
        self.rejections: list[dict[str, Any]] = []  # {"round", "node", "reason"}, for the run directory
        self.failed_rounds: list[int] = []
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        """Log the validation settings, then the inner strategy's."""
        log(INFO, "\t├──> Update validation (keys, shapes, dtypes, finite values):")
        log(INFO, "\t│\t├── max-update-norm: %s", self.bounds.max_update_norm or "off")
        log(INFO, "\t│\t├── max-num-examples: %d", self.bounds.max_num_examples)
        log(INFO, "\t│\t└── min valid replies per round: %d", self.min_train_nodes)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the replies must be compared with, then delegate."""
        self._global = {key: array.numpy() for key, array in arrays.items()}
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop invalid replies (logged with node id); aggregate the rest if enough remain."""
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        valid: list[Message] = []
        for msg in (m for m in replies if not m.has_error()):
            reason = check_update(msg.content, self._global, self.bounds)
            if reason is None:
                valid.append(msg)
            else:
                self._reject(server_round, msg, reason, update=True)
        valid = self._consistent_metric_keys(server_round, valid, updates=True)
        if len(valid) < self.min_train_nodes:
            self.failed_rounds.append(server_round)
            if self.on_unaggregated is not None:  # refusals too: the privacy report lists them
                for msg in valid + errors:
                    self.on_unaggregated(server_round, msg, "round failed: too few valid updates")
            log(ERROR, "round %d failed: %d valid update(s) of %d replies (%d error replies), min-nodes = %d; "
                "the global model is kept", server_round, len(valid), len(replies), len(errors), self.min_train_nodes)
            return None, None
        # A fixed order (by content) makes the floating-point sum independent of arrival order.
        valid.sort(key=lambda m: content_digest(m.content))
        return self.inner.aggregate_train(server_round, valid + errors)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop evaluation replies with non-finite metrics or odd keys; delegate the rest."""
        kept = []
        for msg in replies:
            problem = None if msg.has_error() else metrics_problem(msg.content)
            if problem:
                self._reject(server_round, msg, f"evaluation: {problem}", evaluation=True)
                continue
            kept.append(msg)
        ok = self._consistent_metric_keys(server_round, _without_simulation_keys([m for m in kept if not m.has_error()]))
        # A fixed order (by content), as for updates: the float sums are the same whatever order replies arrive in
        ok.sort(key=lambda m: metrics_digest(m.content))
        return self.inner.aggregate_evaluate(server_round, ok + [m for m in kept if m.has_error()])

    # -- internals ---------------------------------------------------------------------------
    def _consistent_metric_keys(self, server_round: int, replies: list[Message], *, updates: bool = False) -> list[Message]:
        """Keep replies whose metric keys are the most common set (Flower refuses to mix key sets).

        An update's optional metrics (:data:`OPTIONAL_TRAIN_METRICS`, which a deployed partner under local DP
        keeps) do not count, and move to a ``ConfigRecord`` (:data:`OPTIONAL_METRICS_KEY`) where the run
        report reads them: in a run where a partner's own ``max-epsilon`` forces DP-SGD on it and the others
        train without, the other partners' updates were rejected for their extra loss."""
        if not replies:
            return replies
        if updates:
            for msg in replies:
                if OPTIONAL_METRICS_KEY in msg.content:  # only this strategy writes it: a partner's own is dropped
                    # (check_update let through one MetricRecord named "metrics": this one is another record)
                    del msg.content[OPTIONAL_METRICS_KEY]
                record = next(iter(msg.content.metric_records.values()))
                moved = {key: record.pop(key) for key in OPTIONAL_TRAIN_METRICS if key in record}
                if moved:
                    msg.content[OPTIONAL_METRICS_KEY] = ConfigRecord(moved)
        keysets = [frozenset(next(iter(m.content.metric_records.values())).keys()) for m in replies]
        common, _ = Counter(keysets).most_common(1)[0]
        kept = []
        for msg, keys in zip(replies, keysets):
            if keys == common:
                kept.append(msg)
            else:
                self._reject(server_round, msg, f"metric keys {sorted(keys)} differ from the other partners'",
                             update=updates, evaluation=not updates)
        return kept

    def _reject(self, server_round: int, msg: Message, reason: str, *, update: bool = False,
                evaluation: bool = False) -> None:
        """Log and list a dropped reply; ``update``: a training reply, whose release counts for privacy;
        ``evaluation``: an evaluation reply (a noised one counts too)."""
        node = int(msg.metadata.src_node_id)
        log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, reason)
        self.rejections.append({"round": server_round, "node": node, "reason": reason})
        if update and self.on_unaggregated is not None:
            self.on_unaggregated(server_round, msg, reason)
        if evaluation and not msg.has_error() and self.on_rejected_evaluation is not None:
            self.on_rejected_evaluation(server_round, msg)


ARRAYS_RECORD, METRICS_RECORD = "arrays", "metrics"  # the record names of a reply (client/app.py)
# Training metrics a partner may keep to itself (client/app.py: with a noised user count, its loss and time)
OPTIONAL_TRAIN_METRICS = ("train-loss", "seconds")
OPTIONAL_METRICS_KEY = "optional-metrics"  # where ValidatingStrategy puts them, for server/run_report.py
SIMULATION_ONLY_METRICS = ("partition-id", "rec-items@")  # evaluation keys a deployed partner does not send


def _without_simulation_keys(replies: list[Message]) -> list[Message]:
    """Evaluation replies with the simulation-only keys removed from all of them when some lack them:
    a deployed partner (own log) beside simulated ones used to be rejected every round for its key
    set, and Flower refuses to mix key sets. That round then has no coverage or per-partner spread."""
    records = [next(iter(m.content.metric_records.values())) for m in replies if m.content.metric_records]
    optional = {k for r in records for k in r.keys() if k.startswith(SIMULATION_ONLY_METRICS)}
    if not optional or all(optional <= set(r.keys()) for r in records):
        return replies
    for record in records:
        for key in optional & set(record.keys()):
            del record[key]
    return replies
