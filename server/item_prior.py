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
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.item_prior import check_histogram, prior_offsets, set_item_prior
from server.partner_query import ask_partners
from server.privacy_report import PrivacyReport

QUERY = "item-popularity"  # as client/item_histogram.py (server and client never import each other)
HISTOGRAM_KEY = "item-histogram"


def popularity_prior(grid: Grid, cfg: Mapping[str, Any], model: torch.nn.Module, run_name: str,
                     same_inputs: Mapping[str, Any], privacy: PrivacyReport) -> dict[str, Any]:
    """Ask every connected partner (after ``min-nodes`` have connected) for its noised item histogram under
    run ``run_name`` (the ledger run its spend is recorded under), sum the valid replies and set ``model``'s
    output offsets from the sum; ``privacy`` lists every partner's release or refusal (privacy.json). Returns
    what happened, for provenance. With no valid reply the offsets stay 0 (warned): the model is then plain SASRec."""
    num_items = model.output.weight.shape[0] - 1
    config = {"query": QUERY, "server-round": 0, "run-name": run_name, **same_inputs}
    answers = ask_partners(grid, cfg, config, HISTOGRAM_KEY,
                           lambda histogram, who: check_histogram(histogram, num_items, who), "item-prior")
    privacy.note_item_histograms(answers.replies, answers.unanswered)
    refused, unanswered = len(answers.refused), len(answers.unanswered)
    if not answers.arrays:
        log(WARNING, "item-prior = popularity: no partner sent an item histogram (%d refused, %d unanswered); the "
            "model has no popularity offset", refused, unanswered)
        return {"item-prior": "none (no partner sent a histogram)", "partners-in-prior": 0}
    offsets = prior_offsets(answers.arrays)
    set_item_prior(model, offsets)
    log(INFO, "item-prior: popularity offsets from the noised item histograms of %d partner(s) (noise multiplier %g "
        "each; %d refused, %d unanswered); offsets range %.2f-%.2f", len(answers.arrays),
        float(cfg["item-prior-noise-multiplier"]), refused, unanswered, float(np.min(offsets[1:])),
        float(np.max(offsets)))
    return {"item-prior": "popularity", "partners-in-prior": len(answers.arrays), "partners-refused-prior": refused,
            "partners-unanswered-prior": unanswered}
