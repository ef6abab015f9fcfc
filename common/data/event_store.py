"""A partner's local event store (SQLite): new interactions recorded by the serving API.

The store is an interaction log like any other: ``load_interactions("events.sqlite")``
reads it (``common/data/loaders.py``), so a partner that points ``data-path`` at its store
trains the next federated round on the feedback its users gave since the last one.

One table ``events(id, user_id, item_id, timestamp, rating, event, recorded)``; ``id``
orders events that share a timestamp (arrival order, as file order does for a CSV log).
``meta`` holds a random ``store-id`` that names the store for as long as it exists: the
data grows, so its identity (privacy ledger, checkpoints) must not be a hash of the content.

Units: ``timestamp`` and ``recorded`` are unix seconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError
from common.files import ensure_private

SCHEMA_VERSION = "1"
SUFFIXES = (".sqlite", ".sqlite3", ".db")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,   -- unix seconds of the interaction
    rating REAL,                  -- optional explicit feedback
    event TEXT NOT NULL DEFAULT 'interaction',
    recorded REAL NOT NULL        -- unix seconds when the store received it
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp, id);
"""


def is_event_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an event store (by its suffix; the file need not exist yet)."""
    return Path(path).suffix.lower() in SUFFIXES


class EventStore:
    """Read and append a partner's events; safe to share between threads (one lock).

    ``create=True`` makes a missing file; otherwise a missing or foreign file is a
    :class:`DataError` naming it. The last ``cached_users`` histories read are kept in memory
    (the serving API reads a user's history on every request): an event added through this
    store drops its user's entry, and a commit by any other connection (another process
    appending, an import) drops them all (SQLite's ``PRAGMA data_version``).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = False, cached_users: int = 4096) -> None:
        self.path = Path(path)
        self._cache: OrderedDict[str, tuple[tuple[str, ...], np.ndarray]] = OrderedDict()
        self._cache_size = cached_users
        self._data_version = -1
        if not self.path.exists() and not create:
            raise DataError(f"event store {self.path}: no such file "
                            "(create it with `fedrec-client serve --store PATH`)")
        if not self.path.exists():
            ensure_private(self.path)  # users' interactions: owner-only from the first byte (SQLite keeps the mode)
        self._lock = threading.Lock()
        try:
            # NOTE: one connection shared by the API's worker threads, serialised by the lock.
            self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not {"meta", "events"} <= tables:  # another application's database: add nothing to it
                self._conn.close()
                raise DataError(f"event store {self.path}: an SQLite file of another application (tables: "
                                f"{', '.join(sorted(tables)[:5])}); give a new file name or an existing event store")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema-version', ?)", (SCHEMA_VERSION,))
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('store-id', ?)", (uuid.uuid4().hex,))
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise DataError(f"event store {self.path}: not a usable SQLite event store ({exc})") from None
        if meta.get("schema-version") != SCHEMA_VERSION:
            self._conn.close()
            raise DataError(f"event store {self.path}: schema {meta.get('schema-version')!r}, "
                            f"expected {SCHEMA_VERSION}")
        self.store_id = meta["store-id"]

    # -- writing ---------------------------------------------------------------------------
    def add(self, user_id: str, item_id: str, *, timestamp: int | None = None, rating: float | None = None,
            event: str = "interaction") -> int:
        """Append one event (``timestamp`` defaults to now); returns its id."""
        now = time.time()
        with self._lock, self._conn:
            cur = self._conn.execute(
                "INSERT INTO events (user_id, item_id, timestamp, rating, event, recorded) VALUES (?, ?, ?, ?, ?, ?)",
                (str(user_id), str(item_id), int(now if timestamp is None else timestamp), rating, event, now))
            self._cache.pop(str(user_id), None)  # this connection's own commits leave data_version as it is
            return int(cur.lastrowid)

    def add_many(self, rows: Iterable[tuple[str, str, int, float | None]]) -> int:
        """Append (user, item, timestamp, rating) rows in one transaction; returns how many."""
        now = time.time()
        data = [(str(u), str(i), int(t), None if r is None else float(r), "interaction", now) for u, i, t, r in rows]
        with self._lock, self._conn:
            self._conn.executemany(
                "INSERT INTO events (user_id, item_id, timestamp, rating, event, recorded) "
                "VALUES (?, ?, ?, ?, ?, ?)", data)
            self._cache.clear()
        return len(data)

    # -- reading ---------------------------------------------------------------------------
    def history(self, user_id: str) -> tuple[list[str], np.ndarray]:
        """(item ids, timestamps) of one user's events in time order (ties: arrival order)."""
        user_id = str(user_id)
        with self._lock:
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:  # another connection committed: any history may have changed
                self._cache.clear()
                self._data_version = version
            hit = self._cache.get(user_id)
            if hit is None:
                rows = self._conn.execute(
                    "SELECT item_id, timestamp FROM events WHERE user_id = ? ORDER BY timestamp, id",
                    (user_id,)).fetchall()
                times = np.array([r[1] for r in rows], dtype=np.int64)
                times.flags.writeable = False  # shared by every caller until the user's next event
                hit = self._cache[user_id] = (tuple(r[0] for r in rows), times)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(user_id)
        return list(hit[0]), hit[1]

    def item_counts(self) -> dict[str, int]:
        """Events per item id over all users (the popularity used for cold start)."""
        with self._lock:
            return dict(self._conn.execute("SELECT item_id, COUNT(*) FROM events GROUP BY item_id").fetchall())

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def frame(self, *, since: int | None = None) -> pd.DataFrame:
        """All events (or those with ``timestamp >= since``) as a log frame, in arrival order.

        ``rating`` is present only when every selected event has one (a log mixing rated
        and unrated rows would have its unrated rows dropped as bad ratings).
        """
        where, args = ("WHERE timestamp >= ?", (int(since),)) if since is not None else ("", ())
        with self._lock:
            frame = pd.read_sql_query(f"SELECT user_id, item_id, timestamp, rating FROM events {where} ORDER BY id",
                                      self._conn, params=args)
        if frame["rating"].isna().any() or len(frame) == 0:
            frame = frame.drop(columns="rating")
        return frame.astype({"user_id": str, "item_id": str})

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_event_store(path: str | os.PathLike) -> pd.DataFrame:
    """The hook ``load_interactions`` uses: an existing store's events as a raw log frame."""
    with EventStore(path) as store:
        frame = store.frame()
    if len(frame) == 0:
        raise DataError(f"event store {path}: no events yet")
    return frame.astype(str)


def store_identity(path: str | os.PathLike) -> str:
    """The store's permanent id (``store-id`` in ``meta``), stable while events are added."""
    with EventStore(path) as store:
        return store.store_id
