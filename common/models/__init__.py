"""Recommenders: plain ``nn.Module``s with ``score(histories) -> scores over the catalogue``."""

import numpy as np
import torch

from common.models.popularity import Popularity
from common.models.sasrec import SASRec

__all__ = ["Popularity", "SASRec", "build_model"]


def build_model(config: dict, num_items: int, item_genres: torch.Tensor | None = None,
                catalogue: np.ndarray | None = None) -> torch.nn.Module:
    """The recommender named by ``config['model']`` for a catalogue of ``num_items``.

    ``item_genres`` (V+1, G): SASRec's genre input when ``genre-features`` is on (common/models/context.py).
    ``catalogue``: the item ids a saved model was built on (its text table follows them), else the run's.
    """
    from common.errors import ConfigError

    name = config["model"]
    if config.get("genre-features", False) and item_genres is None:
        raise ConfigError("genre-features = true needs item metadata (u.item, movies.dat or movies.csv beside the dataset)")
    if name == "sasrec":
        if config.get("item-features", "id") != "id":  # frozen text-encoder item features
            from common.models.text_sasrec import build_text_sasrec

            return build_text_sasrec(config, num_items, item_genres=item_genres if config.get("genre-features", False) else None,
                                     catalogue=catalogue)
        return SASRec(
            num_items,
            max_len=int(config["max-seq-len"]),
            dim=int(config["embedding-dim"]),
            num_blocks=int(config["num-blocks"]),
            num_heads=int(config["num-heads"]),
            dropout=float(config["dropout"]),
            tied_output=bool(config["tied-output"]),
            time_features=bool(config.get("time-features", False)),
            item_genres=item_genres if config.get("genre-features", False) else None,
            item_prior=config.get("item-prior", "none") == "popularity",
        )
    if name == "mf":
        from common.models.mf import MatrixFactorization

        return MatrixFactorization(
            num_items,
            dim=int(config["embedding-dim"]),
            fold_in_steps=int(config.get("mf-fold-in-steps", 20)),
            l2=float(config.get("mf-l2", 1e-3)),
            max_len=int(config["max-seq-len"]),
        )
    raise ConfigError(f"model = {name!r} is unknown; available: sasrec, mf")
