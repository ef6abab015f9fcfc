"""``item-init = "cooccurrence"``: before round 1, the global model's item embeddings from the partners'
summed item-pair counts (common/cooccurrence.py; partners answer in client/item_counts.py).

A fresh run only: a resumed run continues from its checkpoint's weights. The counts travel in clear and
outside any DP mechanism, so the config checks allow this only with ``dp-mode = "off"`` and no SecAgg+.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.cooccurrence import check_counts, initialise_item_embeddings
from common.errors import ConfigError
from server.partner_query import ask_partners

QUERY = "item-cooccurrence"  # as client/item_counts.py (server and client never import each other)
COUNTS_KEY = "item-counts"
MAX_ITEMS = 10_000  # a (V+1)^2 float32 table: 400 MB per partner at this size, held and decomposed here


def check_catalogue_size(num_items: int) -> None:
    """One line for a catalogue whose count tables would not fit: every partner sends (V+1)^2 numbers."""
    if num_items > MAX_ITEMS:
        gigabytes = 4 * (num_items + 1) ** 2 / 1e9
        raise ConfigError(f"item-init = \"cooccurrence\" with {num_items} items: each partner would send a "
                          f"{num_items + 1} x {num_items + 1} table ({gigabytes:.1f} GB); it takes at most "
                          f"{MAX_ITEMS} items, use item-init = \"random\"")


def cooccurrence_start(grid: Grid, cfg: Mapping[str, Any], model: torch.nn.Module,
                       same_inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Ask every connected partner (after ``min-nodes`` have connected) for its item-pair counts, sum
    the valid replies and set ``model``'s item embeddings from the sum. Returns what happened, for
    provenance: partners that counted, partners refused or unanswered. With no valid reply the model
    keeps its random start (warned)."""
    num_items = model.item_emb.weight.shape[0] - 1
    answers = ask_partners(grid, cfg, {"query": QUERY, "server-round": 0, **same_inputs}, COUNTS_KEY,
                           lambda counts, who: check_counts(counts, num_items, who), "item-init")
    refused, unanswered = len(answers.refused), len(answers.unanswered)
    if not answers.arrays:
        log(WARNING, "item-init = cooccurrence: no partner sent item-pair counts (%d refused, %d unanswered); "
            "the item embeddings keep their random start", refused, unanswered)
        return {"item-init": "random (no partner sent counts)", "partners-counted": 0}
    total = np.sum([counts.astype(np.float64) for counts in answers.arrays], axis=0)
    initialise_item_embeddings(model, total, seed=int(cfg["seed"]))
    log(INFO, "item-init: item embeddings from the co-occurrence counts of %d partner(s) (window %d; %d pairs "
        "counted; %d refused, %d unanswered)", len(answers.arrays), int(cfg["item-init-window"]), int(total.sum() // 2),
        refused, unanswered)
    return {"item-init": "cooccurrence", "partners-counted": len(answers.arrays), "partners-refused": refused,
            "partners-unanswered": unanswered}
