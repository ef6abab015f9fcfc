"""Secure aggregation (SecAgg+) as a strategy wrapper: the server only ever sees the sum of updates.

    RoundControl( SecureAggregation( ValidatingStrategy( <privacy>( FedAvg ) ) ) )

``configure_train`` runs SecAgg+'s key set-up with the partners the inner strategy sampled,
then sends the inner strategy's train messages with the forwarded key shares. Partners
(``client/secure_aggregation.py``) train as usual, turn their new weights into a scaled delta
``(new - global) * secagg-delta-scale`` and return it masked. ``aggregate_train`` unmasks
only the example-weighted mean delta and hands every contributing partner's reply to the
inner strategy with that same aggregate as its weights and the partner's own metrics, so
FedAvg, validation (of the aggregate), central DP noise and the run report work unchanged.

What does not work on a sum, and is refused up front: robust aggregation (median,
trimmed mean, Krum) and server-side central-DP clipping (clip on the clients instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import ConfigError
from common.privacy import dp_mode, uses_central_dp
from server.secagg_protocol import SecAggPlusParams, SecAggPlusRound

ARRAYS_KEY = "arrays"  # the record names our ClientApp uses
METRICS_KEY = "metrics"
# Aggregations that compare individual updates; secure aggregation only ever reveals their sum.
NEEDS_INDIVIDUAL_UPDATES = ("median", "trimmed-mean", "krum")


class SecureAggregation(Strategy):
    """Run each training round under SecAgg+; everything else is delegated to ``inner``.

    Parameters
    ----------
    inner : Strategy
        The wrapped strategy; it samples partners and aggregates (identical) aggregates.
    params : SecAggPlusParams
        Shares, threshold, clipping range, max weight, per-stage timeout (s).
    delta_scale : float
        Partners send ``(new - global) * delta_scale``; the server divides it out again.
    """

    def __init__(self, inner: Strategy, params: SecAggPlusParams, *, delta_scale: float,
                 on_unaggregated: Callable[[int, Message, str], None] | None = None) -> None:
        if not delta_scale > 0:
            raise ConfigError(f"secagg-delta-scale = {delta_scale:g} must be > 0")
        self.inner = inner
        # Told of every reply of a round whose unmasking failed (refusals, masked updates): the privacy
        # report lists them (by default the inner ValidatingStrategy's hook)
        self.on_unaggregated = on_unaggregated if on_unaggregated is not None else getattr(inner, "on_unaggregated", None)
        self.params = params
        self.delta_scale = float(delta_scale)
        self._round: SecAggPlusRound | None = None
        self._global: ArrayRecord | None = None
        # (partner, content or None for an error) exactly as the last round's replies arrived; tests inspect it
        self.last_received: list[tuple[int, RecordDict | None]] = []

    def summary(self) -> None:
        """Log the SecAgg+ settings, then the inner strategy's."""
        p = self.params
        log(INFO, "\t├──> SecAgg+: shares %.2f of sampled, threshold %.2f of shares, clipping range %g, "
            "max weight %g, delta scale %g", p.num_shares, p.threshold, p.clipping_range, p.max_weight, self.delta_scale)
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._round, self._global = None, arrays
        if not messages:
            return []
        # Key set-up with the sampled partners before anyone trains
        rnd = SecAggPlusRound(self.params, grid, server_round, sampled={m.metadata.dst_node_id for m in messages})
        if not rnd.setup_and_share_keys():
            log(WARNING, "round %d: no training (secure aggregation set-up failed: %s)", server_round, rnd.failure)
            return []
        self._round = rnd
        return [
            Message(rnd.collect_content(m.metadata.dst_node_id, m.content), dst_node_id=m.metadata.dst_node_id,
                    message_type=MessageType.TRAIN, group_id=str(server_round))
            for m in messages if m.metadata.dst_node_id in rnd.shared
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.last_received = [(m.metadata.src_node_id, None if m.has_error() else _shallow_copy(m.content)) for m in replies]
        rnd, self._round = self._round, None
        if rnd is None or self._global is None:
            return None, None
        mean = rnd.unmask(replies)
        if mean is None:
            log(WARNING, "round %d: global model kept (secure aggregation failed: %s)", server_round, rnd.failure)
            # The replies never reach the inner strategy: their refusals and released (masked) updates would
            # be missing from privacy.json and fedrec-server report (a partner journey review: every partner
            # refused with "budget exhausted", and privacy.json had no partners at all)
            if self.on_unaggregated is not None:
                for msg in replies:
                    self.on_unaggregated(server_round, msg, f"round failed: secure aggregation failed ({rnd.failure})")
            return None, None
        aggregate = self._apply(mean)
        peaks = [float(c[METRICS_KEY].get("secagg-peak", 0.0)) for _, c in self.last_received
                 if c is not None and METRICS_KEY in c.metric_records]
        if peaks:  # evidence that nothing was clipped (partners refuse above 100%)
            log(INFO, "round %d: largest value sent under SecAgg+ was %.1f%% of secagg-clipping-range",
                server_round, 100.0 * max(peaks))
        # Every contributor's reply now carries the aggregate (never its own update) + its metrics
        stand_ins = []
        for msg in replies:
            if msg.has_error():
                stand_ins.append(msg)  # refusals stay visible to the privacy report
            elif msg.metadata.src_node_id in rnd.active:
                metrics = msg.content.metric_records.get(METRICS_KEY, MetricRecord())
                content = RecordDict({ARRAYS_KEY: aggregate, METRICS_KEY: metrics})
                if "privacy" in msg.content.config_records:  # who this is, for the privacy report
                    content["privacy"] = msg.content.config_records["privacy"]
                msg.content = content
                stand_ins.append(msg)
        return self.inner.aggregate_train(server_round, stand_ins)

    def _apply(self, mean: list[np.ndarray]) -> ArrayRecord:
        """The new global weights: global + mean scaled delta / delta_scale, in the global dtypes."""
        assert self._global is not None
        keys = list(self._global.keys())
        if len(mean) != len(keys):
            raise ValueError(f"secure aggregate has {len(mean)} arrays, the model {len(keys)}")
        out = ArrayRecord()
        for key, delta in zip(keys, mean):
            old = self._global[key].numpy()
            out[key] = Array((old.astype(np.float64) + delta.reshape(old.shape) / self.delta_scale).astype(old.dtype))
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _shallow_copy(content: RecordDict) -> RecordDict:
    out = RecordDict()
    for key, record in content.items():
        out[key] = record
    return out


def secagg_params(cfg: Mapping[str, Any], *, timeout: float | None) -> SecAggPlusParams:
    """SecAgg+ settings from the run config; one clear line for values SecAgg+ cannot use."""
    aggregation = str(cfg.get("aggregation", "fedavg"))
    if aggregation in NEEDS_INDIVIDUAL_UPDATES:
        raise ConfigError(f"aggregation = {aggregation!r} needs individual updates, which secure aggregation hides; "
                          "use fedavg, fedprox or fedadam with secure-aggregation = true")
    if uses_central_dp(dp_mode(cfg)) and str(cfg.get("central-clipping", "server")) == "server":
        raise ConfigError("central DP with central-clipping = \"server\" clips individual updates, which secure "
                          "aggregation hides; set central-clipping = \"client\" (clipping happens before masking)")
    try:
        return SecAggPlusParams(
            num_shares=float(cfg["secagg-num-shares"]), threshold=float(cfg["secagg-threshold"]),
            clipping_range=float(cfg["secagg-clipping-range"]), max_weight=float(cfg["secagg-max-weight"]),
            timeout=timeout,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def with_secure_aggregation(inner: Strategy, cfg: Mapping[str, Any]) -> Strategy:
    """``inner`` wrapped in SecAgg+ when ``secure-aggregation = true``, else ``inner`` itself."""
    if not cfg["secure-aggregation"]:
        return inner
    params = secagg_params(cfg, timeout=float(cfg["round-timeout"]))
    return SecureAggregation(inner, params, delta_scale=float(cfg["secagg-delta-scale"]))
