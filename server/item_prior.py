"""``item-prior = "popularity"``: before round 1, the global model's frozen per-item score offset from the
partners' noised item histograms (common/item_prior.py; partners answer in client/item_histogram.py).

A fresh run only: a resumed run continues from its checkpoint's weights, offset included. Each histogram
is already DP when it arrives (the partner noised it and recorded the spend on its ledger), so the sum and
the offsets are post-processing.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.errors import DataError
from common.item_prior import check_histogram, prior_offsets, set_item_prior
from server.privacy_report import PrivacyReport
from server.rounds import wait_for_nodes

QUERY = "item-popularity"  # as client/item_histogram.py (server and client never import each other)
HISTOGRAM_KEY = "item-histogram"


def popularity_prior(grid: Grid, cfg: Mapping[str, Any], model: torch.nn.Module, run_name: str,
                     same_inputs: Mapping[str, Any], privacy: PrivacyReport) -> dict[str, Any]:
    """Ask every connected partner (after ``min-nodes`` have connected) for its noised item histogram under
    run ``run_name`` (the ledger run its spend is recorded under), sum the valid replies and set ``model``'s
    output offsets from the sum; ``privacy`` lists every partner's release or refusal (privacy.json). Returns
    what happened, for provenance. With no valid reply the offsets stay 0 (warned): the model is then plain SASRec."""
    wait_for_nodes(grid, int(cfg["min-nodes"]), float(cfg["node-wait-timeout"]))
    nodes = sorted(grid.get_node_ids())
    config = ConfigRecord({"query": QUERY, "server-round": 0, "run-name": run_name, **same_inputs})
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
    num_items = model.output.weight.shape[0] - 1
    histograms, refused = [], []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():  # one the SuperLink made (undeliverable, expired) names no partner
            who = "the SuperLink" if node == SUPERLINK_NODE_ID else f"partner {node}"
            refused.append(f"{who}: {reply.error.reason}")
            continue
        try:
            record = reply.content.array_records.get(HISTOGRAM_KEY)
            if record is None or len(record) != 1:
                raise DataError(f"partner {node}: the reply holds no {HISTOGRAM_KEY} array")
            histogram = record.to_numpy_ndarrays()[0]
            check_histogram(histogram, num_items, f"partner {node}")
        except DataError as err:
            refused.append(str(err))
            continue
        histograms.append(histogram)
    answered = {int(reply.metadata.src_node_id) for reply in replies}
    privacy.note_item_histograms(replies, [node for node in nodes if node not in answered])
    unanswered = len(nodes) - len(replies)
    for reason in refused:
        log(WARNING, "item-prior: %s", reason)
    if not histograms:
        log(WARNING, "item-prior = popularity: no partner sent an item histogram (%d refused, %d unanswered); the "
            "model has no popularity offset", len(refused), unanswered)
        return {"item-prior": "none (no partner sent a histogram)", "partners-in-prior": 0}
    offsets = prior_offsets(histograms)
    set_item_prior(model, offsets)
    log(INFO, "item-prior: popularity offsets from the noised item histograms of %d partner(s) (noise multiplier %g "
        "each; %d refused, %d unanswered); offsets range %.2f-%.2f", len(histograms),
        float(cfg["item-prior-noise-multiplier"]), len(refused), unanswered, float(np.min(offsets[1:])),
        float(np.max(offsets)))
    return {"item-prior": "popularity", "partners-in-prior": len(histograms), "partners-refused-prior": len(refused),
            "partners-unanswered-prior": unanswered}
