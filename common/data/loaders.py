"""Read interaction logs (CSV, Parquet, MovieLens raw formats) into validated arrays.

Every user mistake becomes one :class:`DataError` line naming the file; rows that are
dropped (unparseable ids or timestamps, duplicates) are counted in ``Interactions.dropped``
and logged, never silently discarded.
"""

from __future__ import annotations

import decimal
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.event_store import is_event_store, read_event_store
from common.errors import DataError

LOG = logging.getLogger("fedrec.data")

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp")
# Column spellings of common public logs, mapped to ours.
COLUMN_ALIASES = {
    "userid": "user_id", "user": "user_id", "uid": "user_id",
    "itemid": "item_id", "movieid": "item_id", "item": "item_id", "iid": "item_id",
    "time": "timestamp", "ts": "timestamp",
}
DATA_DIR_ENV = "FEDREC_DATA_DIR"


@dataclass
class Interactions:
    """A validated interaction log: one row per (user, item, timestamp) event, in file order.

    Ids are kept as strings so that partner logs with non-numeric ids work unchanged.
    """

    user: np.ndarray  # str ids
    item: np.ndarray  # str ids
    timestamp: np.ndarray  # int64 unix seconds
    rating: np.ndarray | None
    source: str
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)


def resolve_data_path(path: str | os.PathLike) -> Path:
    """Resolve ``path`` directly, or relative to ``$FEDREC_DATA_DIR`` when it is not found."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    base = os.environ.get(DATA_DIR_ENV)
    if base and not p.is_absolute():
        # then its trailing parts: the shipped configs' "../shared/data/ml-100k" is "ml-100k" under a data
        # folder kept elsewhere, and the hint to set $FEDREC_DATA_DIR did not make them run (a docs review)
        for tail in (Path(*p.parts[i:]) for i in range(len(p.parts)) if i == 0 or ".." not in p.parts[i:]):
            if (Path(base) / tail).exists():
                return Path(base) / tail
    # an absolute path is never looked up under $FEDREC_DATA_DIR: the hint would send a partner astray (a review)
    hint = ("" if p.is_absolute() else f" (also looked in ${DATA_DIR_ENV}={base})" if base
            else f" (set ${DATA_DIR_ENV} to a folder of data sets)")
    raise DataError(f"{path}: no such file or directory{hint}")


def load_interactions(path: str | os.PathLike) -> Interactions:
    """Load an interaction log from a file or a MovieLens folder.

    Accepted: CSV/TSV with a header naming ``user_id,item_id,timestamp[,rating]`` (common
    aliases such as ``userId``/``movieId`` work), Parquet with those columns, MovieLens 100K
    ``u.data``, MovieLens 1M ``ratings.dat`` (``::``-separated, also the partial
    ``ratings.users_1-2999.dat``), ml-latest ``ratings.csv``, or a folder holding one of these.
    """
    p = resolve_data_path(path)
    if p.is_dir():
        p = _log_file_in_folder(p)
    try:
        frame = _read_frame(p)
    except DataError:
        raise
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{p}: cannot be read as an interaction log ({first})",
                        public=f"{p.name}: cannot be read as an interaction log") from None  # the parser quotes rows
    return _validate(frame, str(p))


def log_files(dataset: str | os.PathLike) -> list[Path]:
    """The files a data set is read from (its log and the metadata beside it); [] for synthetic."""
    if str(dataset) == "synthetic":
        return []
    from common.data.attributes import metadata_path

    p = resolve_data_path(dataset)
    meta = metadata_path(dataset)
    return [_log_file_in_folder(p) if p.is_dir() else p, *([meta] if meta else [])]


LOG_FILE_NAMES = ("u.data", "ratings.dat", "ratings.users_1-2999.dat", "ratings.csv", "interactions.csv",
                  "interactions.parquet", "events.csv")  # what a folder given as a log is searched for, in order


def _log_file_in_folder(folder: Path) -> Path:
    for name in LOG_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no interaction log found (expected one of {', '.join(LOG_FILE_NAMES)}; "
                    "or give the log file itself)")


def _read_frame(p: Path) -> pd.DataFrame:
    name = p.name.lower()
    if p.stat().st_size == 0:
        raise DataError(f"{p}: file is empty")
    if name.endswith(".parquet"):
        return pd.read_parquet(p)
    if is_event_store(p):  # a partner's SQLite event store (serving feedback), common/data/event_store.py
        return read_event_store(p)
    if name == "u.data":
        frame = pd.read_csv(p, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                            dtype=str, keep_default_na=False)
        if not isinstance(frame.index, pd.RangeIndex):  # more fields than names: pandas made the first the index
            raise DataError(f"{p}: its lines have {4 + frame.index.nlevels} tab-separated fields; u.data has 4 "
                            "(user id, item id, rating, timestamp)")
        if len(frame) and (frame["item_id"] == "").all() and frame["user_id"].str.contains(r"\s").all():
            # one field per line: another separator (a partner journey: "31468 missing-id" named no cause)
            raise DataError(f"{p}: its lines have no tabs; u.data is tab-separated (user id, item id, rating, "
                            "timestamp)")
        return frame
    if name.endswith(".dat"):
        # NOTE: pandas' multi-character separators need the slow python engine; a tab
        # (absent from MovieLens fields) lets the C parser read ML-1M 10x faster.
        text = p.read_text(encoding="latin-1").replace("::", "\t")
        frame = pd.read_csv(io.StringIO(text), sep="\t", header=None, dtype=str, keep_default_na=False)
        if frame.shape[1] < 4:
            raise DataError(f"{p}: expected UserID::MovieID::Rating::Timestamp, found {frame.shape[1]} field(s)")
        frame = frame.iloc[:, :4]
        frame.columns = ["user_id", "item_id", "rating", "timestamp"]
        return frame
    sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".tsv.bz2", ".tsv.xz", ".tsv.zst")) else ","  # pandas unpacks by suffix
    frame = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    # pandas renames a repeated header name (item_id, item_id.1) and the copy was dropped unseen: the header as written
    header = pd.read_csv(p, sep=sep, dtype=str, header=None, nrows=1, keep_default_na=False, skipinitialspace=True)
    if not isinstance(frame.index, pd.RangeIndex) and _row_names(frame.index):
        frame = frame.reset_index(drop=True)  # R's write.table: a first unnamed column of row numbers, aligned
    elif not isinstance(frame.index, pd.RangeIndex):
        # Rows with more fields than the header: pandas made the first field(s) the index and read every column
        # shifted by one (a review: user = item id, item = timestamp, "ok"). Empty extra fields are a trailing
        # separator on every row, a common export habit: read without them
        extra, names = frame.index.nlevels, header.shape[1]
        rows = pd.read_csv(p, sep=sep, dtype=str, header=None, skiprows=1, keep_default_na=False, skipinitialspace=True)
        if not (rows.iloc[:, names:] == "").all().all():
            raise DataError(f"{p}: its rows have {names + extra} fields and its header names {names}; give every "
                            "column a name in the header, or remove the extra fields")
        frame = rows.iloc[:, :names]
    frame.columns = [_canonical(c) for c in header.iloc[0].tolist()]
    return frame


def _row_names(index: pd.Index) -> bool:
    """The first field of every row counts the rows (1..n or 0..n-1): row names, not a shifted user id."""
    if index.nlevels != 1:
        return False
    numbers = pd.to_numeric(pd.Series(index), errors="coerce")
    if numbers.isna().any() or not np.isfinite(numbers.to_numpy(dtype=float)).all():  # "inf" counts nothing
        return False
    start = int(numbers.iloc[0]) if len(numbers) else 0
    return start in (0, 1) and (numbers.to_numpy() == np.arange(start, start + len(numbers))).all()


def _canonical(column: object) -> str:
    c = str(column).strip().lower()
    return COLUMN_ALIASES.get(c.replace("_", ""), c)


def _validate(frame: pd.DataFrame, source: str) -> Interactions:
    # Aliases can collide (userId and user_id); pandas would then return a frame, not a column.
    twice = sorted({str(c) for c in frame.columns[frame.columns.duplicated()] if c in (*REQUIRED_COLUMNS, "rating")})
    if twice:
        raise DataError(f"{source}: more than one column means {', '.join(twice)} (the same name twice, or e.g. "
                        "userId and user_id); keep one")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        found = [" ".join(str(c).split()) for c in frame.columns]
        # One column holding the separator the file's name did not announce (a comma-separated .tsv, a tab .csv)
        other = next((name for sep, name in ((",", "comma"), ("\t", "tab")) if len(found) == 1 and sep in str(frame.columns[0])), None)
        hint = f"; the header is {other}-separated: name the file .csv for commas, .tsv for tabs" if other else ""
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; expected user_id,item_id,timestamp[,rating] "
            f"(found {', '.join(found) or 'none'}){hint}",  # one line
            # a headerless log's "columns" are its first data row: the coordinator sees none of it
            public=f"{Path(source).name}: missing column(s) {', '.join(missing)}; expected user_id,item_id,timestamp"
                   f"[,rating] in a header line{hint}",
        )
    if len(frame) == 0:
        raise DataError(f"{source}: no rows")
    dropped: dict[str, int] = {}
    # NOTE: NUL characters go too: numpy's fixed-width strings drop trailing NULs, so "\x00" would become "".
    user, bad_user = _id_text(frame["user_id"])
    item, bad_item = _id_text(frame["item_id"])
    user = user.str.replace("\x00", "", regex=False).str.strip()
    item = item.str.replace("\x00", "", regex=False).str.strip()
    ts = _parse_timestamps(frame["timestamp"])
    bad_id = bad_user | bad_item
    _count(dropped, "bad-id", int(bad_id.sum()))
    ok = (user != "") & (item != "") & (user.str.lower() != "nan") & (item.str.lower() != "nan")
    _count(dropped, "missing-id", int((~ok & ~bad_id).sum()))
    ts = ts.mask(_far_future(ts.where(ok), source))  # a few rows past the year 5000: bad timestamps
    bad_ts = ts.isna() & ok
    _count(dropped, "bad-timestamp", int(bad_ts.sum()))
    ok &= ~ts.isna()
    rating = None
    if "rating" in frame.columns:
        r = pd.to_numeric(frame["rating"], errors="coerce")
        # A blank rating is an unrated event (a view beside rated ones): kept, its rating NaN. Nothing trains on
        # ratings, and dropping them lost half of a mixed log's events (a partner journey); "abc" is still bad
        blank = frame["rating"].isna() | (frame["rating"].astype(str).str.strip() == "")
        # NOTE: finite as float64 is not enough: ratings are stored as float32 (3.5e38 overflows to inf)
        with np.errstate(over="ignore"):
            bad_r = ~blank & (r.isna() | ~np.isfinite(r.to_numpy(dtype=float, na_value=np.nan).astype(np.float32)))
        _count(dropped, "bad-rating", int((bad_r & ok).sum()))
        ok &= ~bad_r
        rating = r[ok].to_numpy(dtype=np.float32)
    if not ok.any():
        reasons = ", ".join(f"{v} {k}" for k, v in dropped.items())
        first_bad = frame["timestamp"][bad_ts].iloc[0] if bad_ts.any() else None
        hint = (f"; timestamps are Unix seconds, ISO 8601 dates (2023-02-12T10:00:00Z) or a datetime column, "
                f"not {str(first_bad)[:40]!r}" if first_bad is not None else "")
        raise DataError(f"{source}: no valid rows ({reasons}){hint}")
    # The same event twice (a log exported or appended twice): kept, each user's test item would be a copy
    # of the validation item and every metric inflated (HR@10 0.07 -> 0.60 for EASE on a doubled log)
    kept = np.flatnonzero(ok.to_numpy())  # by position: among valid rows only, whatever the frame's index
    events = pd.DataFrame({"u": user.to_numpy(), "i": item.to_numpy(), "t": ts.to_numpy()}).iloc[kept]
    twin = np.zeros(len(frame), dtype=bool)
    twin[kept[events.duplicated().to_numpy()]] = True
    _count(dropped, "duplicate", int(twin.sum()))
    ok &= ~twin
    if rating is not None:
        rating = pd.to_numeric(frame["rating"], errors="coerce")[ok].to_numpy(dtype=np.float32)
    data = Interactions(
        user=user[ok].to_numpy(dtype=str),
        item=item[ok].to_numpy(dtype=str),
        timestamp=ts[ok].to_numpy(dtype=np.int64),
        rating=rating,
        source=source,
        dropped=dropped,
    )
    if dropped:
        LOG.warning("%s: dropped %s", source, ", ".join(f"{v} rows ({k})" for k, v in dropped.items()))
    return data


def _id_text(column: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(ids as text, mask of values that cannot be an id). A missing value (None, NaN) is "" and dropped as
    missing; an integral float (a Parquet column with one null is stored as float) is its integer (28.0 read as
    "28.0" matched no catalogue id); booleans, lists, fractional floats are no ids. (A review: with one null in a
    Parquet id column, pandas kept NaN, numpy made the column 1 character wide, and every id became its first digit.)"""
    if pd.api.types.is_bool_dtype(column):
        return pd.Series("", index=column.index), pd.Series(True, index=column.index)
    if pd.api.types.is_integer_dtype(column) or pd.api.types.infer_dtype(column, skipna=False) == "string":
        # (pandas' own string type keeps a missing value as NaN through astype(str): filled first)
        return column.astype(object).fillna("").astype(str), pd.Series(False, index=column.index)
    text = column.astype(object).map(_one_id)
    bad = text.isna()
    return text.fillna(""), bad


def _one_id(value: object) -> str | None:
    """One id as text ("" when missing), None when the value cannot be an id."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating, decimal.Decimal)):  # Decimal: Spark / Oracle decimal(38, 0) columns
        finite = value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)
        return str(int(value)) if finite and value == int(value) else None
    if isinstance(value, bytes):  # a BINARY column not marked as UTF-8 (pandas decoded it before)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
# Seconds since 1970 above this are past the year 5000: a log in milliseconds (1.7e12 today), microseconds
# or nanoseconds, which were read as seconds (a partner journey: a Parquet datetime column became 8.8e14)
MAX_SECONDS = 1e11


def _parse_timestamps(column: pd.Series) -> pd.Series:
    """Whole seconds since 1970 (as floats): Unix seconds (a fraction is rounded; events within one second
    keep the file's order), dates as text in ISO 8601 (``2023-02-12T10:00:00Z``, ``2023-02-12 10:00``,
    offsets, a comma decimal, ``2023/02/12``), with a trailing `` UTC``/`` GMT`` (BigQuery's CSV) or in RFC 2822
    (``Sun, 12 Feb 2023 10:00:00 GMT``), or a datetime column (Parquet, pandas; a zone-less one is UTC).
    Dates are floored to the second. Unparseable values become NaN. Other date texts are not guessed:
    ``12/02/2023`` is December or February, and pandas' "mixed" format read each row its own way (a
    partner journey: a third of a day-first log moved up to 323 days, reported as "ok")."""
    if pd.api.types.is_bool_dtype(column):  # True / False is no time (CSV's "True" was refused already)
        return pd.Series(np.nan, index=column.index)
    if pd.api.types.is_datetime64_any_dtype(column):  # its own unit (ns, us, ms), not seconds
        return ((pd.to_datetime(column, utc=True) - EPOCH) // pd.Timedelta(seconds=1)).astype(float)
    if column.dtype == object:
        column = column.map(lambda v: None if isinstance(v, (bool, np.bool_)) else v)
    numeric = pd.to_numeric(column, errors="coerce")
    as_float = numeric.astype(float)
    # Beyond +-2**62 it cannot be an int64 time (1e303 became INT64_MIN for every row: all tied)
    finite = numeric.where(np.isfinite(as_float) & (as_float.abs() < 2.0**62)).astype(float)
    if finite.notna().all():
        return finite.round()
    text = column.astype(str).where(finite.isna()).str.strip()
    iso = (text.str.replace(r"\s+(?:UTC|GMT)$", "+00:00", regex=True)
               .str.replace(r"(\d{2}:\d{2}:\d{2}),(\d+)", r"\1.\2", regex=True)
               .str.replace(r"^(\d{4})/(\d{1,2})/(\d{1,2})", r"\1-\2-\3", regex=True))  # year first: unambiguous
    dates = pd.to_datetime(iso, errors="coerce", utc=True, format="ISO8601")
    rfc = pd.to_datetime(text.where(dates.isna()), errors="coerce", utc=True, format="%a, %d %b %Y %H:%M:%S %Z")
    seconds = (dates.fillna(rfc) - EPOCH) // pd.Timedelta(seconds=1)
    return finite.round().fillna(seconds.astype(float))


def _far_future(ts: pd.Series, source: str) -> pd.Series:
    """Rows whose time is past :data:`MAX_SECONDS`; :class:`DataError` when most rows are (the log's unit is
    not seconds: no row is guessed into another unit)."""
    far = ts > MAX_SECONDS
    valid = int(ts.notna().sum())
    if valid and int(far.sum()) * 2 > valid:
        example = float(ts[far].iloc[0])
        unit = "milliseconds" if example < 1e14 else "microseconds" if example < 1e17 else "nanoseconds"
        raise DataError(f"{source}: timestamps look like {unit} since 1970 (e.g. {example:.0f}), not seconds: give Unix "
                        "seconds or ISO 8601 dates")
    return far


def _count(dropped: dict[str, int], reason: str, n: int) -> None:
    if n:
        dropped[reason] = dropped.get(reason, 0) + n


def load_item_titles(path: str | os.PathLike) -> dict[str, tuple[str, list[str]]]:
    """Item id -> (title, genres) from MovieLens ``u.item`` or ``movies.dat`` (both Latin-1).

    ``path`` may be the file or its folder. Returns an empty dict when the folder has no
    metadata file (metadata is optional).
    """
    p = resolve_data_path(path)
    if p.is_dir():
        for name in ("u.item", "movies.dat", "movies.csv"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            return {}
    if p.name == "u.item":
        genres = _ml100k_genres(p.parent / "u.genre")
        out: dict[str, tuple[str, list[str]]] = {}
        for line in p.read_text(encoding="latin-1").splitlines():
            parts = line.split("|")
            if len(parts) < 5:
                continue
            flags = parts[5:]
            out[parts[0]] = (parts[1], [g for g, f in zip(genres, flags) if f == "1"])
        if not out:
            raise DataError(f"{p}: not item metadata; no line has u.item's fields (id|title|date|...|genre flags)")
        return out
    if p.suffix == ".dat":
        out = {}
        for number, line in enumerate(p.read_text(encoding="latin-1").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != 3:  # ratings.dat has 4 fields, users.dat 5: not titles
                raise DataError(f"{p}: not item metadata; line {number} has {len(parts)} '::' fields, movies.dat "
                                "has 3 (MovieID::Title::Genres)")
            out[parts[0]] = (parts[1], [g for g in parts[2].split("|") if g])
        return out
    try:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: not item metadata ({exc})") from None
    if "title" not in frame.columns:  # e.g. an interaction log (u.data) given by mistake: no titles to read
        raise DataError(f"{p}: not item metadata; expected u.item, movies.dat or a CSV with a title column "
                        f"(and movieId, genres), found columns {list(frame.columns)[:5]}")
    id_col = "movieId" if "movieId" in frame.columns else frame.columns[0]
    genres_col = frame["genres"] if "genres" in frame.columns else pd.Series([""] * len(frame))
    return {i: (t, [g for g in gs.split("|") if g]) for i, t, gs in zip(frame[id_col], frame["title"], genres_col)}


def _ml100k_genres(path: Path) -> list[str]:
    if not path.is_file():
        return [f"genre-{i}" for i in range(19)]
    return [line.split("|")[0] for line in path.read_text(encoding="latin-1").splitlines() if "|" in line]
