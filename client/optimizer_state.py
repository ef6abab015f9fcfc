"""A partner's Adam state carried from one round to the next (``keep-optimizer-state``).

Without it every round starts Adam from zero moments, so each round's first steps are taken
with bias-corrected but uninformed step sizes; with one partner (the centralised-equivalent run)
this is the only difference from uninterrupted training. The state lives in the node's
``context.state`` (per partner, never sent to the server). It is keyed by the model's parameter
order, which the model definition fixes; a state that does not fit the current model (another
architecture or catalogue) is dropped with a warning rather than failing the round.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context

if TYPE_CHECKING:  # torch loads when a state is read, not with this module
    from torch import nn

LOG = logging.getLogger("fedrec.client")
KEY = "optimizer-state"


def load_optimizer_state(context: Context, model: nn.Module) -> dict | None:
    """The Adam state saved by this partner's previous round, or None (first round / mismatch)."""
    record = context.state.config_records.get(KEY)
    if record is None or "adam" not in record:
        return None
    import torch

    state = torch.load(io.BytesIO(record["adam"]), map_location="cpu", weights_only=True)
    shapes = [tuple(p.shape) for p in model.parameters()]
    fits = all(int(k) < len(shapes) and tuple(v["exp_avg"].shape) == shapes[int(k)] for k, v in state.get("state", {}).items())
    if not fits:
        LOG.warning("dropping the stored optimizer state: it was made for a model of other shapes")
        return None
    return state


def save_optimizer_state(context: Context, state: dict | None) -> None:
    """Keep ``state`` (``TrainResult.optimizer_state``) for this partner's next round."""
    if state is None:
        return
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    context.state[KEY] = ConfigRecord({"adam": buffer.getvalue()})
