"""SASRec whose items are represented by a frozen pretrained text embedding (``item-features``).

``item-features``:

- ``id``: plain :class:`~common.models.sasrec.SASRec` (a learned row per item, input and output);
- ``text``: item vector = ``project(text[i])``; scores = ``query(h) . text[i]``. No parameter
  depends on the catalogue, so a model trained without an item still scores it (cold start),
  and partners can add catalogue items between rounds without any table to retrain;
- ``id+text``: both, summed; ID rows of items added later start at zero, so a new item is
  scored by its text until it has interactions.

Opacus: the text table is a *non-persistent buffer* (never trained, never sent with the
weights: partners rebuild it from the published features file). Every trainable weight sits in
an ``nn.Linear``/``nn.Embedding`` used through its own forward, so per-sample gradients (hooks)
and per-sample norms (ghost clipping) are exact; the product with the frozen table has no
parameter and needs no hook (checked in ``tests/test_text_sasrec.py`` against one-user-at-a-time
back-propagation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from common.models.sasrec import SASRec, merge_tied_copies


class FrozenItemText(nn.Module):
    """The (V+1, D) text table, row 0 = padding (zeros); shared by input and output."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().float().contiguous(), persistent=False)

    @property
    def text_dim(self) -> int:
        return int(self.table.shape[1])

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.table[seq]


class TextItemEmbedding(nn.Module):
    """Input item vectors: ``project(text[i])`` (+ a learned ID row with ``with_ids``).

    Exposes ``embedding_dim`` so :meth:`SASRec.hidden` uses it as it uses ``nn.Embedding``.
    """

    def __init__(self, text: FrozenItemText, dim: int, num_items: int, *, with_ids: bool) -> None:
        super().__init__()
        self.text = text
        self.embedding_dim = dim
        self.project = nn.Linear(text.text_dim, dim)
        # Unit-norm text rows -> projected coordinates with the ID table's scale (std dim^-0.5)
        nn.init.normal_(self.project.weight, std=dim**-0.5)
        nn.init.zeros_(self.project.bias)
        self.ids = nn.Embedding(num_items + 1, dim, padding_idx=0) if with_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.1 * dim**-0.5)  # text leads, IDs learn the residual
            with torch.no_grad():
                self.ids.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        x = self.project(self.text(seq))
        return x if self.ids is None else x + self.ids(seq)


class TextItemScores(nn.Module):
    """Output scores over item indices 0..V: ``query(h) . text[i]`` (+ ``ids(h)[i]`` with IDs)."""

    def __init__(self, text: FrozenItemText, dim: int, num_items: int, *, with_ids: bool) -> None:
        super().__init__()
        self.text = text
        self.query = nn.Linear(dim, text.text_dim)
        self.ids = nn.Linear(dim, num_items + 1, bias=False) if with_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.1 * dim**-0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The frozen table enters as a constant: only ``query`` (an nn.Linear Opacus hooks) is trained.
        scores = self.query(h) @ self.text.table.T
        return scores if self.ids is None else scores + self.ids(h)


class TextSASRec(SASRec):
    """SASRec with items represented through a frozen text table (see the module docstring).

    ``item_text``: (V+1, D) float, row 0 padding; rows are the encoder's unit-norm embeddings.
    """

    def __init__(self, num_items: int, item_text: torch.Tensor, *, item_features: str = "text", **kwargs: Any) -> None:
        if item_features not in ("text", "id+text"):
            raise ValueError(f"item_features must be 'text' or 'id+text', not {item_features!r}")
        if item_text.shape[0] != num_items + 1:
            raise ValueError(f"item_text has {item_text.shape[0]} rows; expected num_items + 1 = {num_items + 1}")
        tie_ids = bool(kwargs.get("tied_output", False)) and item_features == "id+text"
        kwargs["tied_output"] = False  # the text side of the output has its own query projection
        super().__init__(num_items, **kwargs)
        dim = self.pos_emb.embedding_dim
        with_ids = item_features == "id+text"
        self.item_features = item_features
        self.item_text = FrozenItemText(item_text)
        self.item_emb = TextItemEmbedding(self.item_text, dim, num_items, with_ids=with_ids)
        self.output = TextItemScores(self.item_text, dim, num_items, with_ids=with_ids)
        if tie_ids:
            # One ID Parameter in two modules, as SASRec ties its output: Opacus' hooks add both
            # uses' per-sample gradients (ghost clipping refuses ties, so "auto" picks hooks).
            self.output.ids.weight = self.item_emb.ids.weight
        self.tied_output = tie_ids

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Catalogue grown since these weights were trained: the new items' ID rows start at zero
        # (they are scored by text alone), the old rows are kept.
        for key in (f"{prefix}item_emb.ids.weight", f"{prefix}output.ids.weight"):
            stored = state_dict.get(key)
            if stored is not None and stored.shape[0] < self.num_items + 1:
                grown = stored.new_zeros((self.num_items + 1, stored.shape[1]))
                grown[: stored.shape[0]] = stored
                state_dict[key] = grown
        if self.tied_output:
            merge_tied_copies(state_dict, f"{prefix}item_emb.ids.weight", f"{prefix}output.ids.weight")
        # The genre matrix is public metadata rebuilt for the current catalogue: keep the rebuilt one
        genres = state_dict.get(f"{prefix}item_genres")
        if genres is not None and getattr(self, "item_genres", None) is not None and genres.shape != self.item_genres.shape:
            state_dict[f"{prefix}item_genres"] = self.item_genres
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def item_text_table(embeddings: torch.Tensor | Any) -> torch.Tensor:
    """(V, D) catalogue embeddings -> the (V+1, D) table with the zero padding row 0."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    return torch.cat([emb.new_zeros((1, emb.shape[1])), emb])


def build_text_sasrec(config: Mapping[str, Any], num_items: int, item_genres: torch.Tensor | None = None,
                      catalogue: np.ndarray | None = None) -> TextSASRec:
    """The ``item-features = text | id+text`` SASRec, its text table from ``common.item_text``.

    Combines with the context inputs like the ID model: ``time-features`` (gap buckets) and
    ``item_genres`` (the genre matrix when ``genre-features`` is on) are added to the projected
    text vectors in :meth:`SASRec.hidden`.
    """
    from common.errors import ConfigError
    from common.item_text import catalogue_text_features, check_item_features

    mode = check_item_features(str(config["item-features"]))
    # a saved model's own catalogue: the text table is not in its state dict, and the run config's
    # catalogue file on a serving machine may be another version (reordered, grown)
    embeddings, _ = catalogue_text_features(config, catalogue)
    if len(embeddings) != num_items:
        raise ConfigError(f"item text features cover {len(embeddings)} items but the model has {num_items}; "
                          "publish features for the current catalogue")
    return TextSASRec(
        num_items,
        item_text_table(embeddings),
        item_features=mode,
        max_len=int(config["max-seq-len"]),
        dim=int(config["embedding-dim"]),
        num_blocks=int(config["num-blocks"]),
        num_heads=int(config["num-heads"]),
        dropout=float(config["dropout"]),
        tied_output=bool(config.get("tied-output", False)),
        time_features=bool(config.get("time-features", False)),
        item_genres=item_genres,
    )


def trainable_parameters(model: nn.Module) -> int:
    """Parameters DP-SGD clips and noises (frozen buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def closest_in_text(model: TextSASRec, history: Any, target: int) -> tuple[int, float] | None:
    """(history item index, cosine) of the history item whose frozen text embedding is closest to
    ``target``'s: what the text features contribute to an explanation. None for an empty history."""
    items = torch.as_tensor(sorted({int(i) for i in history if int(i) > 0 and int(i) != int(target)}), dtype=torch.long)
    if len(items) == 0:
        return None
    table = model.item_text.table
    sims = torch.nn.functional.cosine_similarity(table[items], table[int(target)].unsqueeze(0), dim=1)
    best = int(torch.argmax(sims))
    return int(items[best]), float(sims[best])
