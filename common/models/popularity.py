"""Most-popular baseline: the same score for every user, from training interaction counts."""

from __future__ import annotations

import torch
from torch import nn


class Popularity(nn.Module):
    """Scores items by how often they appear in training histories (a sanity baseline)."""

    def __init__(self, item_counts: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("counts", item_counts.float())

    @torch.no_grad()
    def score(self, histories: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(histories.shape[0], -1).clone()
