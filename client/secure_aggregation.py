"""The partner's side of SecAgg+: Flower's ``secaggplus_mod`` around our train handler.

Train messages that carry SecAgg+ stage configs go through Flower's unchanged
``secaggplus_mod`` (key agreement, Shamir shares, masking: all Flower's). At the stage where
it needs the update, our handler trains as usual (DP-SGD clipping and noise happen there,
so before masking), and this module turns its reply into what SecAgg+ quantises: the
scaled delta ``(new - global) * secagg-delta-scale``. SecAgg+ clips every value to
+-``secagg-clipping-range`` before quantising; a partner whose weighted, scaled delta would
be clipped refuses with one clear line instead of sending a silently distorted update, and
every reply reports ``secagg-peak`` (largest value as a fraction of the range) so the run
log shows the headroom.

A partner whose run config says ``secure-aggregation = true`` also refuses plain train
messages: its update never leaves unmasked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod  # NOTE: 1.42 exports it only on the legacy path
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from common.config import resolve_config
from common.errors import FedRecError
from common.privacy import dp_mode, uses_central_dp

USER_ERROR = 400  # same code as client/app.py: a problem the partner or coordinator can fix
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
PRIVACY_KEY = "privacy"  # the partner's label and ledger details (client/app.py)


class SecureAggregationError(FedRecError):
    """An update cannot be sent under secure aggregation as configured."""


class _Refused(Exception):
    """The train handler replied with an error (e.g. privacy budget); pass it on unchanged."""

    def __init__(self, reply: Message) -> None:
        super().__init__("refused")
        self.reply = reply


def scaled_delta(global_arrays: ArrayRecord, new_arrays: ArrayRecord, scale: float) -> list[np.ndarray]:
    """``(new - global) * scale`` per array, in the global record's order (float64)."""
    out = []
    for key in global_arrays.keys():
        if key not in new_arrays:
            raise SecureAggregationError(f"the trained model has no array {key!r}; cannot send a delta")
        old = global_arrays[key].numpy().astype(np.float64)
        new = new_arrays[key].numpy().astype(np.float64)
        out.append((new - old) * scale)
    return out


def quantiser_peak(deltas: list[np.ndarray], num_examples: int, state: Mapping[str, Any]) -> float:
    """Largest |value| SecAgg+ will quantise, as a fraction of its clipping range (> 1 means clipped).

    ``secaggplus_mod`` multiplies the update by the partner's quantised weight
    ``round(num_examples / max_weight * Q) / Q`` before clipping; this mirrors it.
    """
    target = int(state["target_range"])
    weight = round(num_examples / float(state["max_weight"]) * target) / target
    peak = max((float(np.max(np.abs(d))) for d in deltas if d.size), default=0.0) * weight
    return peak / float(state["clipping_range"])


def masking_weight(num_examples: int, state: Mapping[str, Any], *, equal: bool) -> int:
    """The example weight this partner hands SecAgg+, whose sum is the weighted mean of the updates.

    ``equal`` (central DP): every partner hands the same weight (``max_weight``'s integer part,
    so SecAgg+'s quantised ratio stays near 1): the central noise is calibrated for the plain
    mean of clipped updates (sensitivity clip / partners); weighting by examples would give a
    large partner more than that and the reported epsilon would understate its loss.
    """
    return max(1, int(float(state["max_weight"]))) if equal else num_examples


def make_secure_aggregation_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """The mod for ``@app.train(mods=[...])``; ``overrides`` as for ``make_client_app``."""

    def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        try:
            cfg = resolve_config(context.run_config, overrides)
        except FedRecError as exc:
            return Message(Error(code=USER_ERROR, reason=str(exc)), reply_to=msg)
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            if cfg["secure-aggregation"]:
                reason = ("this partner sends updates only under secure aggregation (secure-aggregation = true) "
                          "but the server sent a plain train message")
                return Message(Error(code=USER_ERROR, reason=reason), reply_to=msg)
            return call_next(msg, context)

        scale = float(cfg["secagg-delta-scale"])
        central = uses_central_dp(dp_mode(cfg))  # equal weights: see masking_weight

        def train_and_prepare(inner_msg: Message, ctx: Context) -> Message:
            # Train as usual (DP-SGD inside), then hand SecAgg+ the scaled delta to mask
            reply = call_next(inner_msg, ctx)
            if reply.has_error():
                raise _Refused(reply)
            deltas = scaled_delta(inner_msg.content[ARRAYS_KEY], reply.content[ARRAYS_KEY], scale)
            metrics = reply.content.metric_records.get(METRICS_KEY, MetricRecord())
            state = ctx.state.config_records[RECORD_KEY_STATE]
            num_examples = masking_weight(int(metrics.get("num-examples", 0)), state, equal=central)
            peak = quantiser_peak(deltas, num_examples, state)
            if not np.isfinite(peak) or peak > 1.0:
                raise SecureAggregationError(
                    f"secure aggregation would clip this update (largest weighted scaled value is {peak:.3g} x "
                    f"secagg-clipping-range); lower secagg-delta-scale or raise secagg-clipping-range")
            metrics["secagg-peak"] = peak
            fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), num_examples, {})
            content = compat.fitres_to_recorddict(fitres, keep_input=False)
            content[METRICS_KEY] = metrics
            if PRIVACY_KEY in reply.content.config_records:
                content[PRIVACY_KEY] = reply.content.config_records[PRIVACY_KEY]
            return Message(content, reply_to=inner_msg)

        try:
            out = secaggplus_mod(msg, context, train_and_prepare)
        except _Refused as refused:
            return refused.reply
        except FedRecError as exc:
            return Message(Error(code=USER_ERROR, reason=str(exc)), reply_to=msg)
        except (KeyError, TypeError, ValueError) as exc:
            # A protocol violation (wrong stage order, too few neighbours): abort this round only
            return Message(Error(code=USER_ERROR, reason=f"secure aggregation aborted: {exc}"), reply_to=msg)
        # Keep only what the server needs: the masked vector (stage configs), the metrics and who
        # this partner is for the privacy report (label, ledger, fingerprint: sent in clear anyway)
        kept = RecordDict()
        for key in (RECORD_KEY_CONFIGS, METRICS_KEY, PRIVACY_KEY):
            if key in out.content:
                kept[key] = out.content[key]
        return Message(kept, reply_to=msg)

    return secure_aggregation_mod
