"""Central DP with clipping on the partner: Flower's ``fixedclipping_mod``, safe for an unchanged model.

Used when the run says ``dp-mode`` central/both and ``central-clipping = client``: the update
(new - global weights) is clipped to the server's clipping norm before it leaves the partner.

NOTE: Flower 1.42's clipping computes ``clipping_norm / ||update||`` and raises
ZeroDivisionError when a partner sends the global model back unchanged (nothing to train on,
an optimiser that made no step). A zero update is within any bound, so it is sent as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, get_norm

from common.config import resolve_config
from common.errors import FedRecError
from common.privacy import dp_mode, uses_central_dp


class _Unchanged(Exception):
    """The handler replied with the global weights unchanged: nothing to clip."""

    def __init__(self, reply: Message) -> None:
        super().__init__("unchanged update")
        self.reply = reply


def is_unchanged(sent: Message, reply: Message) -> bool:
    """True when ``reply``'s one ArrayRecord equals ``sent``'s (same keys, update of L2 norm 0)."""
    if reply.has_error() or len(sent.content.array_records) != 1 or len(reply.content.array_records) != 1:
        return False
    old = next(iter(sent.content.array_records.values()))
    new = next(iter(reply.content.array_records.values()))
    if list(old.keys()) != list(new.keys()):
        return False  # Flower's mod replies with its own error for that
    return get_norm([np.subtract(new[k].numpy(), old[k].numpy()) for k in old.keys()]) == 0.0


def central_dp_clipping_mod(overrides: Mapping[str, Any] | None = None) -> Mod:
    """The train mod: Flower's ``fixedclipping_mod`` when the run asks for client-side clipping
    (``dp-mode`` central/both, ``central-clipping = client``), else a pass-through."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            cfg = resolve_config(context.run_config, overrides)
            clip_here = uses_central_dp(dp_mode(cfg)) and cfg["central-clipping"] == "client"
        except FedRecError:
            clip_here = False  # the handler itself replies with the config error
        if not clip_here:
            return call_next(msg, context)

        # Flower's mod wants exactly one ConfigRecord; under SecAgg+ the train message also holds the
        # protocol's stage record (server/secagg_protocol.py), which refused every round of central DP
        # with SecAgg+. It is set aside while Flower's mod checks the message, and back for the handler.
        aside = {key: record for key, record in msg.content.config_records.items()
                 if KEY_CLIPPING_NORM not in record} if len(msg.content.config_records) > 1 else {}

        def train_then_check(inner: Message, ctx: Context) -> Message:
            for key, record in aside.items():
                inner.content[key] = record
            reply = call_next(inner, ctx)
            if is_unchanged(inner, reply):
                raise _Unchanged(reply)
            return reply

        for key in aside:
            del msg.content[key]
        # Flower's mod checks the message before training and clips the reply after it
        try:
            return fixedclipping_mod(msg, context, train_then_check)
        except _Unchanged as unchanged:
            return unchanged.reply
        finally:
            for key, record in aside.items():
                msg.content[key] = record

    return mod
