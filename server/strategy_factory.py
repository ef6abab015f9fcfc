"""The server's strategy stack, built from the run config.

    RoundControl( ValidatingStrategy( <aggregation> ) )

``aggregation`` picks the inner strategy from ``flwr.serverapp.strategy``. Every option
except ``fedavg``/``fedprox``/``fedadam`` needs the individual updates (median, trimmed
mean and Krum compare partners), and so does update validation: none of this works on
the single sum that secure aggregation reveals (see docs/deployment.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from common.errors import ConfigError
from server.rounds import RoundControl
from server.validation import UpdateBounds, ValidatingStrategy

AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "median", "trimmed-mean", "krum")

MetricsFn = Callable[[list[RecordDict], str], MetricRecord]


class TrimmedMean(FedTrimmedAvg):
    """Flower's FedTrimmedAvg, saying when it trims nothing: scipy's ``trim_mean`` cuts
    int(trim-fraction x n) updates from each end, none below 1 / trim-fraction replies (the
    default 0.2 trims nothing with fewer than 5 partners), which made the knob silently a mean."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        n = sum(1 for r in replies if not r.has_error())
        if self.beta > 0 and n and int(self.beta * n) == 0:
            log(WARNING, "round %d: trim-fraction %g of %d updates trims none (it cuts int(%g x n) from each end; "
                "needs %d or more): this round is a plain unweighted mean", server_round, self.beta, n, self.beta,
                int(1 / self.beta - 1e-9) + 1)
        return super().aggregate_train(server_round, replies)


class KrumReportingAll(Krum):
    """Flower's Krum, with the round's training metrics over every partner that trained: Flower
    passes only the selected update's metrics on, so metrics.jsonl recorded one partner (its
    epsilon instead of the worst, num-partners 1)."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [r.content for r in replies if not r.has_error()]
        if arrays is not None and valid:
            metrics = self.train_metrics_aggr_fn(valid, self.weighted_by_key)
        return arrays, metrics


def aggregation_strategy(
    cfg: Mapping[str, Any], *, train_metrics_aggr_fn: MetricsFn | None = None,
    evaluate_metrics_aggr_fn: MetricsFn | None = None,
) -> Strategy:
    """The inner (aggregating) strategy named by ``cfg["aggregation"]``."""
    name = str(cfg["aggregation"])
    min_nodes = int(cfg["min-nodes"])
    fraction_evaluate = float(cfg["fraction-evaluate"])
    if not 0.0 <= fraction_evaluate <= 1.0:
        raise ConfigError(f"fraction-evaluate = {fraction_evaluate:g} must be in [0, 1] (0 = no federated evaluation)")
    common = dict(
        fraction_train=float(cfg["fraction-train"]),
        fraction_evaluate=fraction_evaluate,  # cross-device: evaluate on a sample, not on every client
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        train_metrics_aggr_fn=train_metrics_aggr_fn,
        evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
    )
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(cfg["proximal-mu"]))  # >= 0: checked when cfg was resolved
    if name == "fedadam":
        # eta_l is only reported by Flower, the clients' rate is learning-rate.
        return FedAdam(**common, eta=float(cfg["server-learning-rate"]), eta_l=float(cfg["learning-rate"]))
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed-mean":
        return TrimmedMean(**common, beta=float(cfg["trim-fraction"]))  # in [0, 0.5): checked when resolved
    if name == "krum":
        f = int(cfg["num-malicious-nodes"])
        # Krum scores each update by its n - f - 2 nearest neighbours: needs n > f + 2.
        if f < 0 or min_nodes < f + 3:
            raise ConfigError(f"krum with num-malicious-nodes = {f} needs min-nodes >= {f + 3} (has {min_nodes})")
        return KrumReportingAll(**common, num_malicious_nodes=f)
    raise ConfigError(f"aggregation = {name!r} is unknown; choose one of {', '.join(AGGREGATIONS)}")



def check_strategy_config(cfg: Mapping[str, Any]) -> None:
    """Refuse what the server's strategy cannot run (aggregation knobs, lr-schedule, examples per
    user under DP) with one :class:`ConfigError` line, before any partner trains (else every
    partner would fail every round) and before server/app.py creates the run directory."""
    from common.privacy import refuse_many_examples_per_user
    from common.objectives import epoch_learning_rates

    aggregation_strategy(cfg)
    epoch_learning_rates(cfg, 1)  # an unknown lr-schedule
    refuse_many_examples_per_user(cfg)
    if cfg["secure-aggregation"]:  # a strategy SecAgg+ cannot serve (it left a run directory behind)
        from server.secure_aggregation import secagg_params

        secagg_params(cfg, timeout=float(cfg["round-timeout"]))

def build_strategy(
    cfg: Mapping[str, Any], *, first_round: int = 1, train_metrics_aggr_fn: MetricsFn | None = None,
    evaluate_metrics_aggr_fn: MetricsFn | None = None, wrap_aggregation: Callable[[Strategy], Strategy] | None = None,
    tied: Sequence[Sequence[str]] = (), on_unaggregated: Callable[[int, Message, str], None] | None = None,
    on_rejected_evaluation: Callable[[int, Message], None] | None = None,
) -> RoundControl:
    """The full stack: round control over update validation over the chosen aggregation.

    ``wrap_aggregation`` may wrap the aggregating strategy (e.g. central DP), so that
    validation sees the partners' raw updates before any clipping or noise.
    """
    min_nodes = int(cfg["min-nodes"])
    max_norm = float(cfg["max-update-norm"])
    max_examples = int(cfg["max-num-examples"])  # ranges checked when cfg was resolved (common/config_checks.py)
    inner = aggregation_strategy(
        cfg, train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn
    )
    if wrap_aggregation is not None:
        inner = wrap_aggregation(inner)
    validating = ValidatingStrategy(
        inner, bounds=UpdateBounds(max_update_norm=max_norm, max_num_examples=max_examples), min_train_nodes=min_nodes,
        on_unaggregated=on_unaggregated, on_rejected_evaluation=on_rejected_evaluation,
    )
    wait = float(cfg["node-wait-timeout"])
    check_strategy_config(cfg)
    every = int(cfg["evaluate-every"])
    return RoundControl(validating, first_round=first_round, min_nodes=min_nodes, node_wait_timeout=wait,
                        evaluate_every=every, last_round=int(cfg["num-server-rounds"]), tied=tied)


def unwrap(strategy: Strategy) -> Strategy:
    """The innermost (aggregating) strategy under wrappers holding it as ``inner`` (ours) or
    ``strategy`` (Flower's DP wrappers)."""
    while True:
        inner = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
        if not isinstance(inner, Strategy):
            return strategy
        strategy = inner
