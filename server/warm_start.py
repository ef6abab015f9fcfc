"""Start a run from a released global model (``init-model``) instead of fresh weights.

Use it to continue training a model with more rounds or other knobs, or to train a ``text`` /
``id+text`` model further after its catalogue grew (``fedrec-server add-items`` serves new items
at once; a run started from the old weights then learns them). The architecture must be the
run's; an ``id`` model or MF needs the very same catalogue (its rows are the items), a text model
the same catalogue or one with items appended (their ID rows start at zero, as in serving).

Privacy: the starting weights are public input, like the fresh initialisation they replace; what
they were trained on is accounted where they were trained. A partner whose ledger holds that
earlier run has its spend counted there; a model trained outside this federation's ledgers, or
without DP on private data, brings whatever leaks it carries into every model after it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.errors import ConfigError, DataError

# Knobs that decide the weights' names and shapes: a start model must have the run's values
ARCHITECTURE = ("model", "embedding-dim", "num-blocks", "num-heads", "tied-output", "item-features",
                "time-features", "genre-features", "max-seq-len")


def warm_start(model: torch.nn.Module, catalogue: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    """Load ``cfg['init-model']`` into ``model`` (the run's freshly built model over ``catalogue``);
    returns the start model's record for ``privacy.json`` (path, items, its dp-mode and the guarantee
    its run stated). One :class:`ConfigError` line for a model that cannot start this run."""
    from common.privacy import dp_mode

    from common.item_text import int8_encoded
    from common.model_file import read_model_file
    from server.add_items import check_old_text_rows, grown_catalogue, model_file, trained_text_table

    source = model_file(str(cfg["init-model"]))
    try:
        blob = read_model_file(source)
    except DataError as exc:
        raise ConfigError(f"init-model: {exc}") from None
    saved, old = blob["config"], np.asarray(blob["catalogue"], dtype=str)
    differ = [f"{k} = {saved.get(k)!r} there, {cfg.get(k)!r} here" for k in ARCHITECTURE
              if k in saved and saved.get(k) != cfg.get(k)]
    if differ:
        raise ConfigError(f"init-model {source}: another architecture ({'; '.join(differ)}); "
                          "set those knobs as the model was trained")
    added = 0
    if old.tolist() != np.asarray(catalogue, dtype=str).tolist():
        if str(cfg.get("item-features", "id")) == "id":
            raise ConfigError(f"init-model {source}: its catalogue ({len(old)} items) is not this run's ({len(catalogue)}); "
                              "an id/MF model's rows are its items, so only a text or id+text model can start "
                              "over a grown catalogue")
        if cfg.get("genre-features", False):
            raise ConfigError(f"init-model {source}: its catalogue ({len(old)} items) is not this run's ({len(catalogue)}) "
                              "and genre-features = true: its genre table is not rebuilt for new items")
        try:
            added = len(grown_catalogue(old, np.asarray(catalogue, dtype=str),
                                        cfg.get("catalogue") or f"from dataset {cfg.get('dataset')}"))
        except DataError as exc:
            raise ConfigError(f"init-model {source}: {exc}") from None
    if str(cfg.get("item-features", "id")) != "id":
        try:  # the old items' text rows must be those the weights were fitted to
            check_old_text_rows(trained_text_table(blob, source), model.item_text.table[1:].numpy(), old,
                                cfg.get("item-text-features") or "encoded from the metadata", int8_encoded(saved))
        except DataError as exc:
            raise ConfigError(f"init-model: {exc}") from None
    try:
        model.load_state_dict(blob["state_dict"])  # a text model pads the new items' ID rows with zeros
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"init-model {source}: its weights do not fit this run's model ({first})") from None
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise ConfigError(f"init-model {source}: weights contain NaN or infinite values; start from another model")
    # items added to the model after training (fedrec-server add-items) have zero ID rows, as the ones added here
    grown = sum(int(step.get("added", 0)) for step in blob.get("added-items", []) if isinstance(step, dict))
    record: dict[str, Any] = {"path": str(source), "items": len(old), "added-items": added + grown}
    try:
        record["dp-mode"] = dp_mode(saved)
    except ConfigError:
        record["dp-mode"] = "unknown"
    report = source.parent / "privacy.json"  # beside a run directory's model.pt
    try:
        import json

        record["guarantee"] = str(json.loads(report.read_text()).get("guarantee", ""))
    except (OSError, ValueError, AttributeError):
        record["guarantee"] = ""
    return record
