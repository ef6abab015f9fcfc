"""Item embeddings from the items' text (``item-init = "text"``): a public start for SASRec's id table.

The catalogue's frozen sentence-encoder vectors (``common.item_text``: title and genres through
``item-text-model``, or the coordinator's published ``item-text-features`` file) are centred and
projected on their top ``embedding-dim`` principal components; those rows, scaled to SASRec's
default row size, replace the random id embeddings before round 1. Items whose titles say alike
start close together; training then proceeds as usual, the rows are ordinary trainable weights.

Privacy: the start is a function of public catalogue metadata and the pretrained encoder only, no
partner's data, so it is allowed under every DP mode and with SecAgg+ and leaves the guarantee
unchanged (it is fixed before any mechanism runs). Unlike ``item-features = "text"`` the model keeps
SASRec's architecture: nothing is added to what partners train, clip or send.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError


def text_item_embeddings(features: np.ndarray, dim: int) -> np.ndarray:
    """(V+1, ``dim``) float32 rows for the V items of ``features`` (V, D): the centred features'
    coordinates on their top principal components, scaled so the items' rows have a mean squared norm
    of 1 (that of SASRec's default N(0, 1/dim) rows). Row 0 (padding) is 0; with fewer than ``dim``
    components (D or V smaller) the remaining columns are 0."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or not len(feats) or not np.isfinite(feats).all():
        raise ConfigError(f"item-init = \"text\": the item text features must be a finite (items x dims) table, "
                          f"got shape {feats.shape}")
    # All in torch (LAPACK and BLAS): NumPy's OpenBLAS SVD once spun for 13 minutes in the ServerApp's thread of
    # a simulation (not reproduced alone); torch's runs in every partner's training already
    centred = torch.from_numpy(feats) - torch.from_numpy(feats).mean(dim=0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    k = min(dim, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0)  # components the items span
    if k == 0:  # identical vectors (or one item): every row would be 0, a start worse than random
        raise ConfigError(f"item-init = \"text\": the {len(feats)} item text vectors are all the same, so they "
                          "tell no item from another; use item-init = \"random\"")
    rows = torch.zeros(len(feats) + 1, dim, dtype=torch.float64)
    rows[1:, :k] = centred @ vt[:k].T
    rows[1:] *= torch.sqrt(len(feats) / (rows[1:] ** 2).sum())
    return rows.numpy().astype(np.float32)


def describe_text_start(start: Mapping[str, Any]) -> str:
    """The line that reports a text start (``initialise_from_text``'s record): the ServerApp logs it, check prints it."""
    return (f"item-init: item embeddings from the PCA of the item texts ({start['item-text-source']}, "
            f"{start['item-text-dims']} dims)")


def untied_output_note(cfg: Mapping[str, Any]) -> str | None:
    """One line when ``item-init = "text"`` sets only the input rows (``tied-output = false``), else None."""
    if cfg.get("item-init") != "text" or cfg.get("tied-output"):
        return None
    return ("item-init = \"text\" with tied-output = false starts only the input rows; the output layer stays "
            "random (under DP on ML-100K this gained nothing measurable: docs/models.md); set tied-output = true")


def initialise_from_text(model: torch.nn.Module, cfg: Mapping[str, Any], items: np.ndarray) -> dict[str, Any]:
    """Set ``model.item_emb`` (SASRec's id table; the tied output shares it) from the text features of
    ``items`` (the run's catalogue, in the model's order). Returns what was used, for provenance.
    One-line :class:`ConfigError` when the catalogue has no texts (no metadata beside ``dataset`` and
    no published ``item-text-features``)."""
    from common.data.attributes import metadata_path
    from common.item_text import catalogue_text_features

    if not cfg.get("item-text-features") and metadata_path(str(cfg["dataset"])) is None:
        raise ConfigError(f"item-init = \"text\" needs item titles, but dataset {str(cfg['dataset'])!r} has no "
                          "metadata beside it (u.item, movies.dat or movies.csv); publish features with "
                          "`fedrec-server item-text` and set item-text-features, or use item-init = \"random\"")
    features, _ = catalogue_text_features(cfg, items)
    weight = model.item_emb.weight
    if len(features) != weight.shape[0] - 1:
        raise ConfigError(f"item-init = \"text\": {len(features)} text vectors for a catalogue of "
                          f"{weight.shape[0] - 1} items")
    rows = text_item_embeddings(features, weight.shape[1])
    with torch.no_grad():
        weight.copy_(torch.from_numpy(rows).to(weight.dtype))
    source = str(cfg.get("item-text-features") or cfg.get("item-text-model"))
    return {"item-init": "text", "item-text-source": source, "item-text-dims": int(features.shape[1])}
