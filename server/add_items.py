"""Add items to a trained text model's catalogue, for serving, without training again.

A ``text`` / ``id+text`` model (``common/models/text_sasrec.py``) scores an item through the
frozen embedding of its public text, so an item published after training can be recommended at
once: its text row joins the frozen table and, in ``id+text``, its learned ID rows start at zero.
An ``id`` model or MF has nothing to score a new item with and is refused.

The result is a new ``model.pt`` over the grown catalogue. Partners serve it as any model
(``fedrec-client recommend`` / ``serve``, whose watcher reloads a replaced file), and ``POST /events``
accepts the new items from then on. The weights are unchanged, so every old item keeps its score.

ID rows are matched by position: the grown catalogue must be the old one, in the same order,
with the new items appended (``fedrec-server catalogue`` sorts by id, which can move old rows).
The features file must give the old items the very embeddings the model was trained with.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.catalogue import catalogue_fingerprint, load_catalogue
from common.errors import DataError
from common.model_file import read_model_file
from common.files import PUBLIC_MODE, refuse_existing, refuse_overwriting_inputs, write_file

# Old items' text rows must be these embeddings to float32 rounding: another encoder, precision or
# title would shift what every learned weight was fitted to.
ROW_TOLERANCE = 1e-5


def model_file(path: str | os.PathLike) -> Path:
    """``path``, or the ``model.pt`` in it when it is a (run) directory."""
    p = Path(path).expanduser()
    return p / "model.pt" if p.is_dir() else p


def grown_catalogue(old: np.ndarray, new: np.ndarray, catalogue_path: str | os.PathLike) -> np.ndarray:
    """The items ``new`` appends to ``old``; a one-line error unless ``new`` starts with ``old`` in order."""
    for i, (was, now) in enumerate(zip(old.tolist(), new.tolist())):
        if was != now:
            raise DataError(f"catalogue {catalogue_path}: line {i + 1} is {now!r} where the model's catalogue has {was!r}; "
                            "keep the model's catalogue in its order and append the new items at the end")
    if len(new) < len(old):
        raise DataError(f"catalogue {catalogue_path}: {len(new)} items, fewer than the model's {len(old)}; "
                        "items cannot be removed from a trained model (filter them when serving)")
    added = new[len(old):]
    if len(added) == 0:
        raise DataError(f"catalogue {catalogue_path}: the same {len(old)} items as the model; nothing to add")
    return added


def trained_text_table(blob: dict[str, Any], source: Path) -> np.ndarray:
    """The (items, dims) frozen text table a saved text model was trained with, rebuilt from its own
    config (its features file or metadata); one error line when that cannot be done here."""
    from common.item_text import record_mismatch, table_record
    from common.models import build_model

    config, old = blob["config"], np.asarray(blob["catalogue"], dtype=str)
    try:  # the genre table is a buffer in the state dict: the saved one, as serving loads it
        trained = build_model(config, len(old), item_genres=blob["state_dict"].get("item_genres"), catalogue=old)
        trained.load_state_dict(blob["state_dict"])
    except Exception as exc:  # noqa: BLE001 -- a missing/other features file surfaces as any of several errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"model {source}: cannot be rebuilt with its own text features ({first}); "
                        "run this where the model can be served") from None
    if why := record_mismatch(blob.get("item-text"), table_record(trained, config, old), config):
        raise DataError(f"model {source}: {why}; the old items' rows must be those its weights were fitted to: "
                        "restore that file (or metadata) first")
    return trained.item_text.table[1:].numpy()


def check_old_text_rows(table: np.ndarray, embeddings: np.ndarray, old: np.ndarray, features: Any,
                        int8: bool = False) -> None:
    """Refuse ``embeddings`` (new catalogue order, old items first) unless the old items' rows are
    ``table``'s, the ones the weights were fitted to (another encoder, precision or title is not).
    ``int8``: the table came from the int8 encoder, which cannot give them again for a grown catalogue."""
    if table.shape[1] != embeddings.shape[1]:
        raise DataError(f"item text features {features}: {embeddings.shape[1]} dims, the model was trained "
                        f"with {table.shape[1]}; encode the new catalogue with the model's encoder")
    gap = np.abs(table - embeddings[: len(old)]).max(axis=1)
    if float(gap.max()) > ROW_TOLERANCE and int8:
        # Its activations are quantized per batch, and batches are drawn from the whole catalogue: an item's
        # vector depends on the items encoded with it (0.047 apart for ML-100K grown by 82 items: a review)
        raise DataError(f"item text features {features}: old items' embeddings differ from the model's (largest "
                        f"difference {float(gap.max()):.2g}, item {str(old[int(gap.argmax())])!r}): the model's table "
                        "came from the int8 encoder (item-text-quantize), whose vectors depend on the other items "
                        "encoded with them, so a grown catalogue cannot reproduce them; a model meant to grow needs "
                        "the float encoder (item-text-quantize = false, the default)")
    if float(gap.max()) > ROW_TOLERANCE:
        raise DataError(f"item text features {features}: old items' embeddings differ from the model's "
                        f"(largest difference {float(gap.max()):.2g}, item {str(old[int(gap.argmax())])!r}); "
                        "encode the grown catalogue with the model's encoder and the same titles")


def add_items(model_path: str | os.PathLike, catalogue_path: str | os.PathLike, features_path: str | os.PathLike,
              out: str | os.PathLike, *, force: bool = False) -> dict[str, Any]:
    """Write ``out``: the model at ``model_path`` over the catalogue in ``catalogue_path`` (the model's
    own catalogue with items appended), text rows from ``features_path``. Returns a summary."""
    from common.item_text import int8_encoded, load_features, table_record
    from common.models import build_model

    source = model_file(model_path)
    out = Path(out)
    refuse_existing([out], force=force, hint="partners serving it will reload the new file")
    # the model itself may be replaced (serve reloads it); the catalogue and features it is built from not
    refuse_overwriting_inputs(out, [Path(catalogue_path), Path(features_path)])
    blob = read_model_file(source)
    config, old = blob["config"], np.asarray(blob["catalogue"], dtype=str)
    features = str(config.get("item-features", "id"))
    if config.get("model", "sasrec") != "sasrec" or features not in ("text", "id+text"):
        what = "an MF model" if config.get("model") == "mf" else f"an item-features = {features!r} model"
        raise DataError(f"model {source}: {what} has no representation for items it was not trained on; "
                        "new items need a model trained with item-features = \"text\" or \"id+text\"")
    if config.get("genre-features", False):
        raise DataError(f"model {source}: genre-features = true; adding items would need the new items' genres "
                        "in its genre table, which this command does not rebuild")
    new = load_catalogue(catalogue_path)
    added = grown_catalogue(old, new, catalogue_path)
    embeddings, _ = load_features(features_path, new)  # every item, old and new, must be in the file

    check_old_text_rows(trained_text_table(blob, source), embeddings, old, features_path, int8_encoded(config))

    # absolute: the files are read wherever the model is served or grown again (a relative path held only
    # in the folder this command ran in: a coordinator review)
    grown_config = {**config, "catalogue": str(Path(catalogue_path).resolve()),
                    "item-text-features": str(Path(features_path).resolve())}
    grown = build_model(grown_config, len(new), catalogue=new)
    grown.load_state_dict(blob["state_dict"])  # TextSASRec pads the new items' ID rows with zeros
    provenance = {"from-catalogue": catalogue_fingerprint(old), "added": len(added),
                  "previous": blob.get("added-items", [])}
    buf = io.BytesIO()
    torch.save({"state_dict": grown.state_dict(), "catalogue": new.tolist(), "config": grown_config,
                "added-items": [*provenance.pop("previous"), provenance], "item-text": table_record(grown),
                **({"rounds-aggregated": blob["rounds-aggregated"]} if "rounds-aggregated" in blob else {})}, buf)
    write_file(out, buf.getvalue(), mode=PUBLIC_MODE, force=force, hint="partners serving it will reload the new file")
    return {"model": str(out), "items": len(new), "added": len(added), "first-added": str(added[0]),
            "fingerprint": catalogue_fingerprint(new), "item-features": features,
            "catalogue": grown_config["catalogue"], "item-text-features": grown_config["item-text-features"]}
