"""A categorical attribute per user, used to skew partitions (non-IID partners).

MovieLens: the user's dominant genre (most frequent genre over the training items, from
``u.item``/``movies.dat``). Data without item metadata (the synthetic log): the user's
dominant item cluster, clusters found by k-means on item factors of the user-item matrix.
Only training items count, so the attribute never looks at validation/test targets.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from common.data.loaders import load_item_titles, resolve_data_path
from common.data.sequences import SequenceData


def dominant_genre(data: SequenceData, genres: dict[str, list[str]]) -> np.ndarray:
    """Per user, the genre appearing most often over its training items (ties: alphabetical).

    ``genres`` maps raw item id -> genre names; users without any genre get ``"unknown"``.
    """
    out = []
    for seq in data.train_sequences():
        counts: Counter[str] = Counter()
        for idx in seq.tolist():
            counts.update(genres.get(str(data.catalogue[idx - 1]), []))
        if not counts:
            out.append("unknown")
            continue
        best = max(counts.values())
        out.append(min(g for g, c in counts.items() if c == best))
    return np.array(out, dtype=str)


def item_clusters(data: SequenceData, num_clusters: int = 8, *, dim: int = 16, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Cluster id per item index 0..V (0 = padding gets -1): k-means on truncated-SVD item factors."""
    rows, cols = [], []
    for u, seq in enumerate(data.train_sequences()):
        rows.extend([u] * len(seq))
        cols.extend(seq.tolist())
    matrix = np.zeros((data.num_users, data.num_items + 1), dtype=np.float32)
    matrix[rows, cols] = 1.0
    _, s, vt = np.linalg.svd(matrix - matrix.mean(axis=0), full_matrices=False)
    k = min(dim, len(s))
    factors = (vt[:k].T * s[:k])[1:]  # (V, k): drop the padding column
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    factors = factors / np.maximum(norms, 1e-9)  # cosine geometry: popularity should not decide the cluster
    rng = np.random.default_rng(seed)
    num_clusters = min(num_clusters, len(factors))
    centres = factors[rng.choice(len(factors), size=num_clusters, replace=False)]
    for _ in range(iters):
        labels = np.argmax(factors @ centres.T, axis=1)
        for c in range(num_clusters):
            members = factors[labels == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    return np.concatenate([[-1], np.argmax(factors @ centres.T, axis=1)])


def dominant_cluster(data: SequenceData, num_clusters: int = 8, *, seed: int = 0) -> np.ndarray:
    """Per user, the item cluster appearing most often over its training items (ties: lowest id)."""
    clusters = item_clusters(data, num_clusters, seed=seed)
    out = []
    for seq in data.train_sequences():
        counts = np.bincount(clusters[seq], minlength=num_clusters) if len(seq) else np.zeros(num_clusters, int)
        out.append(f"cluster-{int(np.argmax(counts))}")
    return np.array(out, dtype=str)


def metadata_path(dataset: str | os.PathLike) -> Path | None:
    """The item metadata file beside a MovieLens log (``u.item``, ``movies.dat``), if any."""
    if str(dataset) == "synthetic":
        return None
    p = resolve_data_path(dataset)
    folder = p if p.is_dir() else p.parent
    for name in ("u.item", "movies.dat", "movies.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def user_attribute(data: SequenceData, dataset: str | os.PathLike, *, seed: int = 0) -> tuple[np.ndarray, str]:
    """(attribute per user, what it is): dominant genre when metadata exists, else dominant item cluster."""
    meta = metadata_path(dataset)
    if meta is not None:
        genres = {item: g for item, (_, g) in load_item_titles(meta).items()}
        if genres:
            return dominant_genre(data, genres), "dominant genre"
    return dominant_cluster(data, seed=seed), "dominant item cluster"
