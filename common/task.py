"""What a round needs on either side: the federation's data set, one partner's data, a fresh model.

Data is loaded and partitioned once per process (cached), not once per round.
"""

from __future__ import annotations

import dataclasses

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from common.data.catalogue import catalogue_fingerprint, load_catalogue
from common.data.event_store import is_event_store, store_identity
from common.data.loaders import load_interactions, resolve_data_path
from common.data.sequences import SequenceData, build_sequences
from common.data.synthetic import generate_synthetic
from common.errors import ConfigError, DataError
from common.models import build_model


@functools.lru_cache(maxsize=4)
def _federation_data(dataset: str, users: int, items: int, seed: int, published: str) -> SequenceData:
    catalogue = _published_catalogue(published) if published else None
    if dataset == "synthetic":
        log, name = generate_synthetic(num_users=users, num_items=items, seed=seed), "synthetic"
    else:
        log, name = load_interactions(dataset), str(resolve_data_path(dataset))
    return build_sequences(log, catalogue, name=name)


def federation_data(cfg: Mapping[str, Any]) -> SequenceData:
    """The whole data set a simulation partitions (``dataset`` = ``synthetic`` or a path), over the
    published ``catalogue`` when one is set (items outside it dropped and counted), as a deployed
    partner's log is: simulated partners once indexed the data set's own catalogue while the server
    built and released the model over the published one, so ``model.pt`` could name the wrong items."""
    data = _federation_data(str(cfg["dataset"]), int(cfg["synthetic-users"]), int(cfg["synthetic-items"]),
                            int(cfg["seed"]), str(cfg.get("catalogue") or ""))
    return training_view(cfg, data)


def training_view(cfg: Mapping[str, Any], data: SequenceData) -> SequenceData:
    """``data`` as the run trains on it: with ``train-on-validation`` each user's validation item is
    training data too (the final fit, once settings were chosen on it); the test item never is."""
    if cfg.get("train-on-validation") and data.validation_held_out:
        return dataclasses.replace(data, validation_held_out=False)
    return data


def catalogue(cfg: Mapping[str, Any]) -> np.ndarray:
    """The ordered item ids the federation agreed on: the published ``catalogue`` file when set
    (deployment), else derived from the data set (simulation)."""
    if cfg.get("catalogue"):
        return _published_catalogue(str(cfg["catalogue"]))
    return federation_data(cfg).catalogue


@functools.lru_cache(maxsize=4)
def _published_catalogue(path: str) -> np.ndarray:
    return load_catalogue(path)


def clear_data_caches() -> None:
    """Forget the data sets and catalogues this process loaded (:func:`common.partners.clear_data_caches`)."""
    _federation_data.cache_clear()
    _published_catalogue.cache_clear()
    _partner_log.cache_clear()


@functools.lru_cache(maxsize=16)
def _partner_log(path: str, version: tuple[int, int], catalogue_key: tuple[str, ...]) -> SequenceData:
    data = build_sequences(load_interactions(path), np.array(catalogue_key, dtype=str))
    if is_event_store(path):
        data.identity = store_identity(resolve_data_path(path))
    return data


NAMED = "named:"  # prefix of an identity the partner gave (data-identity), not an event store's


def with_data_identity(data: SequenceData, path: str, identity: str) -> SequenceData:
    """``data`` under the partner's own name for its log (node config ``data-identity``): a CSV or
    Parquet log is otherwise identified by its content, so a log that gained events is "another
    data set" to its privacy ledger. With a name, the ledger (and the partner label) stay the same
    as the log grows; the partner asserts that it is the same population, whose spend keeps counting.
    An event store has an identity of its own and refuses a second one."""
    identity = identity.strip()
    if not identity:
        return data
    if is_event_store(path):
        raise ConfigError("data-identity is for a CSV or Parquet log: an event store keeps its own identity "
                          "as it grows; drop data-identity")
    if len(identity) > 200 or any(ord(c) < 32 for c in identity):
        raise ConfigError("data-identity must be a short name of at most 200 characters, without control characters")
    return dataclasses.replace(data, identity=f"{NAMED}{identity}")


def _file_version(path: str) -> tuple[int, ...]:
    """(mtime ns, size) of the log, and of an event store's write-ahead log: a log that changed (an
    event store receiving feedback) is read again. In WAL mode a commit lands in ``<store>-wal`` and
    the store file itself only changes at a checkpoint."""
    try:
        p = resolve_data_path(path)
        st = p.stat()
    except (OSError, DataError):
        return (0, 0)  # the loader reports the problem
    extra: tuple[int, ...] = ()
    if is_event_store(path):
        try:
            wal = p.with_name(p.name + "-wal").stat()
            extra = (wal.st_mtime_ns, wal.st_size)
        except OSError:
            pass  # no write-ahead log (closed, or a store in the rollback journal)
    return (st.st_mtime_ns, st.st_size, *extra)


def _refuse_another_catalogue(items: np.ndarray, node_config: Mapping[str, Any]) -> None:
    """Node config ``catalogue-fingerprint`` pins the item list a partner agreed to (``fedrec-client data check``
    prints it). The coordinator chooses the run's catalogue, and how a log fits a chosen one (which items are
    in it, whether any user has enough of them) tells about the log outside any DP mechanism."""
    pinned = str(node_config.get("catalogue-fingerprint", "") or "").strip().lower()  # its form: client.partner_policy
    if pinned and catalogue_fingerprint(items) != pinned:
        raise ConfigError(f"node config catalogue-fingerprint = {pinned}: the run's catalogue has fingerprint "
                          f"{catalogue_fingerprint(items)}, another item list than this partner agreed to; nothing "
                          "was read from its log")


def partner_data(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> SequenceData:
    """One partner's users: its own log (``data-path`` in node config) or a simulated partition."""
    if node_config.get("data-path"):
        path = str(node_config["data-path"])
        if not cfg.get("catalogue") and str(cfg["dataset"]) == "synthetic":
            # else a real log was numbered by the built-in demo catalogue (its other items dropped as unknown)
            raise ConfigError("a partner's data-path needs the federation's published catalogue: run config "
                              "catalogue = \"<file>\" (written by `fedrec-server catalogue`)")
        items = catalogue(cfg)
        _refuse_another_catalogue(items, node_config)  # before the log is read: its fit would tell about it
        data = _partner_log(path, _file_version(path), tuple(items.tolist()))
        return training_view(cfg, with_data_identity(data, path, str(node_config.get("data-identity", "") or "")))
    try:
        pid = int(node_config["partition-id"])
        n = int(node_config["num-partitions"])
    except (KeyError, ValueError):
        raise ConfigError("node config needs data-path (a partner's log) or partition-id and num-partitions (simulation)") from None
    from common.partners import simulated_partner  # lazy: common.partners imports this module

    return simulated_partner(cfg, pid, n)


def new_model(cfg: Mapping[str, Any], num_items: int) -> torch.nn.Module:
    """A freshly initialised model, identical for the same seed on every machine."""
    torch.manual_seed(int(cfg["seed"]))
    genres = _item_genres(cfg) if cfg.get("genre-features") else None
    try:
        return build_model(dict(cfg), num_items, item_genres=genres)
    except (MemoryError, RuntimeError) as exc:  # e.g. embedding-dim = 10**8: the allocator's traceback, not a line
        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
            raise
        raise ConfigError(f"the model does not fit in memory ({num_items} items, embedding-dim {cfg['embedding-dim']}, "
                          f"max-seq-len {cfg['max-seq-len']}); lower them") from None


def _item_genres(cfg: Mapping[str, Any]) -> torch.Tensor | None:
    """``genre-features``: the catalogue's genre matrix from the metadata beside ``dataset`` (None if absent)."""
    from common.data.attributes import metadata_path
    from common.models.context import item_genre_matrix

    meta = metadata_path(str(cfg["dataset"]))
    return None if meta is None else item_genre_matrix(catalogue(cfg), meta)
