"""The published item catalogue: one item id per line, in the order the model indexes them.

The coordinator exports it once (``fedrec-server catalogue``) and publishes it with the run
config (``catalogue = "PATH"``); every partner and the server then build models over the
same ordered list, whatever items each partner's own log happens to contain.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.files import PUBLIC_MODE, write_file

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_catalogue_path(path: str | os.PathLike) -> Path:
    """``path`` as given, else relative to the app's folder (where ``flwr run`` ships the project)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_absolute() and (PROJECT_ROOT / p).is_file():
        return PROJECT_ROOT / p
    if p.is_dir():
        raise DataError(f"catalogue {path}: a directory; give the catalogue file itself (one item id per line, "
                        "`fedrec-server catalogue` writes it)")
    if p.exists():  # a device or a pipe (/dev/null read as "no such file": a review)
        raise DataError(f"catalogue {path}: not a regular file; give the catalogue file itself (one item id per line)")
    raise DataError(f"catalogue {path}: no such file; copy the coordinator's published catalogue there "
                    "or set the catalogue config key to where it is")


# Column names a header line would hold; "item" or "id" alone may be a real item id (a review: a catalogue
# fedrec-server catalogue wrote, sorted with "item" first, was refused)
HEADER_NAMES = ("itemid", "movieid")


def load_catalogue(path: str | os.PathLike) -> np.ndarray:
    """Item ids (str) in file order; blank lines and ``#`` comments are ignored, duplicates are an error."""
    p = resolve_catalogue_path(path)
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Notepad) is not part of the first id
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"catalogue {p}: cannot be read ({exc})") from None
    items = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not items:
        raise DataError(f"catalogue {p}: no item ids (expected one item id per line)")
    if items[0].lower().replace("_", "") in HEADER_NAMES:  # a column name taken for an item (a review: "ok", 31 of 30)
        raise DataError(f"catalogue {p}: its first line {items[0]!r} is a column name; a catalogue has one item id "
                        "per line and no header (or make it a # comment)")
    seen: set[str] = set()
    for i in items:
        if i in seen:
            raise DataError(f"catalogue {p}: item id {i!r} appears more than once")
        seen.add(i)
    return np.array(items, dtype=str)


def save_catalogue(items: np.ndarray, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``items`` one per line (refuses to overwrite unless ``force``); returns the path."""
    p = Path(path)
    if len(items) and str(items[0]).lower().replace("_", "") in HEADER_NAMES:  # load_catalogue would refuse it
        raise DataError(f"catalogue {p}: the first item id {str(items[0])!r} reads as a column name; rename that item")
    text = "\n".join(np.asarray(items, dtype=str).tolist()) + "\n"
    write_file(p, text.encode("utf-8"), mode=PUBLIC_MODE, force=force,
               hint="partners must run with the catalogue the global model was built on")
    return p


def catalogue_fingerprint(items: np.ndarray) -> str:
    """A short hash that two parties compare to know they hold the same catalogue."""
    return hashlib.sha256("\x1f".join(np.asarray(items, dtype=str).tolist()).encode()).hexdigest()[:16]
