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

# Events per item, kept by triggers whoever writes (this API, an import, another process): cold-start
# popularity reads a catalogue-sized table instead of grouping every event (71 ms at 100k events).
# A store made before the table existed gets it, filled from its events, in one transaction.
_ITEM_COUNTS = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS item_counts (item_id TEXT PRIMARY KEY, n INTEGER NOT NULL);
DELETE FROM item_counts;
INSERT INTO item_counts SELECT item_id, COUNT(*) FROM events GROUP BY item_id;
CREATE TRIGGER IF NOT EXISTS item_counts_insert AFTER INSERT ON events BEGIN
    INSERT INTO item_counts VALUES (NEW.item_id, 1) ON CONFLICT(item_id) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS item_counts_delete AFTER DELETE ON events BEGIN
    UPDATE item_counts SET n = n - 1 WHERE item_id = OLD.item_id;
END;
COMMIT;
"""


def is_event_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an event store (by its suffix; the file need not exist yet)."""
    return Path(path).suffix.lower() in SUFFIXES


class EventStore:
    """Read and append a partner's events; safe to share between threads (a read and a write
    connection, each under its own lock, so reads never queue behind a write waiting for SQLite).

    ``create=True`` makes a missing file; otherwise a missing or foreign file is a
    :class:`DataError` naming it. The last ``cached_users`` histories read are kept in memory
    (the serving API reads a user's history on every request); any commit, through this store's
    write connection or another process (an import), drops them (SQLite's ``PRAGMA data_version``
    on the read connection).
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
            if not self.path.parent.is_dir():  # a mistyped folder would be made in silence, the events kept there
                raise DataError(f"event store {self.path}: the folder {self.path.parent} does not exist; create it "
                                "or give a path in an existing folder")
            ensure_private(self.path)  # users' interactions: owner-only from the first byte (SQLite keeps the mode)
        elif self.path.is_file() and self.path.stat().st_size == 0:
            # An empty file (touched beforehand) was filled with events at its 0644, and a reader (recommend) made
            # it a store (a serving review): a new store only where one is asked for, and owner-only
            if not create:
                raise DataError(f"event store {self.path}: an empty file, not an event store; give the store "
                                "`fedrec-client serve --store` keeps")
            ensure_private(self.path)
        # NOTE: two connections, each shared by the API's threads under its own lock: a write waiting for
        # another process's lock (SQLite waits up to 30 s) must not hold up reads, which SQLite allows meanwhile.
        self._lock = threading.Lock()  # the write connection
        self._read_lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and not {"meta", "events"} <= tables:  # another application's database: add nothing to it
                self._conn.close()
                raise DataError(f"event store {self.path}: an SQLite file of another application (tables: "
                                f"{', '.join(sorted(tables)[:5])}); give a new file name or an existing event store",
                                public=f"event store {self.path.name}: an SQLite file of another application")
            with self._conn:
                self._conn.executescript(_SCHEMA)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema-version', ?)", (SCHEMA_VERSION,))
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('store-id', ?)", (uuid.uuid4().hex,))
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            triggers = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            if meta.get("schema-version") == SCHEMA_VERSION and "item_counts_insert" not in triggers:
                self._conn.executescript(_ITEM_COUNTS)
        except sqlite3.DatabaseError as exc:
            raise DataError(f"event store {self.path}: not a usable SQLite event store ({exc})",
                            public=f"event store {self.path.name}: not a usable SQLite event store") from None
        if meta.get("schema-version") != SCHEMA_VERSION:
            self._conn.close()
            raise DataError(f"event store {self.path}: schema {meta.get('schema-version')!r}, "
                            f"expected {SCHEMA_VERSION}")
        self.store_id = meta["store-id"]
        # WAL: readers never wait for a writer, not even while another process commits a large import (in
        # the default rollback journal a serving read waited up to 30 s for that exclusive lock). Persistent in
        # the file; SQLite gives the -wal/-shm files the store's own mode. A store another process holds open
        # may refuse the switch: it then keeps its journal and still works.
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            pass
        self._read = sqlite3.connect(self.path, timeout=30, check_same_thread=False)

    # -- writing ---------------------------------------------------------------------------
    def add(self, user_id: str, item_id: str, *, timestamp: int | None = None, rating: float | None = None,
            event: str = "interaction") -> int:
        """Append one event (``timestamp`` defaults to now); returns its id. The same event again (user,
        item and timestamp: a retried POST) is not stored twice, as a log's loader drops it: its first id."""
        return self.add_once(user_id, item_id, timestamp=timestamp, rating=rating, event=event)[0]

    def add_once(self, user_id: str, item_id: str, *, timestamp: int | None = None, rating: float | None = None,
                 event: str = "interaction") -> tuple[int, bool]:
        """:meth:`add`, and whether the event is new (False: the first event of that user, item and time is kept,
        with its own rating and kind, so the caller can say this one was not stored)."""
        now = time.time()
        with self._lock, self._conn:
            same = self._conn.execute(
                "SELECT id FROM events WHERE user_id = ? AND timestamp = ? AND item_id = ? ORDER BY id LIMIT 1",
                (str(user_id), int(now if timestamp is None else timestamp), str(item_id))).fetchone()
            if same is not None:
                return int(same[0]), False
            cur = self._conn.execute(
                "INSERT INTO events (user_id, item_id, timestamp, rating, event, recorded) VALUES (?, ?, ?, ?, ?, ?)",
                (str(user_id), str(item_id), int(now if timestamp is None else timestamp), rating, event, now))
            return int(cur.lastrowid), True  # the read connection sees the commit in data_version: caches drop

    def add_many(self, rows: Iterable[tuple[str, str, int, float | None]]) -> int:
        """Append (user, item, timestamp, rating) rows in one transaction; returns how many were new
        (an event already in the store, or twice in ``rows``, is stored once: see :meth:`add`)."""
        now = time.time()
        data = [(str(u), str(i), int(t), None if r is None else float(r), "interaction", now, str(u), str(i), int(t))
                for u, i, t, r in rows]
        with self._lock, self._conn:
            cur = self._conn.executemany(
                "INSERT INTO events (user_id, item_id, timestamp, rating, event, recorded) SELECT ?, ?, ?, ?, ?, ? "
                "WHERE NOT EXISTS (SELECT 1 FROM events WHERE user_id = ? AND item_id = ? AND timestamp = ?)", data)
            added = max(int(cur.rowcount), 0)
        return added

    def set_meta(self, key: str, value: str) -> None:
        """Remember a setting with the store (e.g. ``metadata-path``: where the item titles are)."""
        if key in ("schema-version", "store-id"):
            raise ValueError(f"meta {key!r} is the store's own")
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def get_meta(self, key: str) -> str | None:
        with self._read_lock:
            row = self._read.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- reading ---------------------------------------------------------------------------
    def history(self, user_id: str) -> tuple[list[str], np.ndarray]:
        """(item ids, timestamps) of one user's events in time order (ties: arrival order)."""
        user_id = str(user_id)
        with self._read_lock:
            version = self._read.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:  # another connection committed: any history may have changed
                self._cache.clear()
                self._data_version = version
            hit = self._cache.get(user_id)
            if hit is None:
                # one row per event: a store written before add() refused repeats may hold the same event twice
                rows = self._read.execute(
                    "SELECT item_id, timestamp FROM events WHERE user_id = ? GROUP BY timestamp, item_id "
                    "ORDER BY timestamp, MIN(id)", (user_id,)).fetchall()
                times = np.array([r[1] for r in rows], dtype=np.int64)
                times.flags.writeable = False  # shared by every caller until the user's next event
                hit = self._cache[user_id] = (tuple(r[0] for r in rows), times)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(user_id)
        return list(hit[0]), hit[1]

    def all_histories(self) -> list[list[str]]:
        """Every user's item ids in time order (ties: arrival order), one event once, as :meth:`history` gives each."""
        with self._read_lock:
            rows = self._read.execute("SELECT user_id, item_id FROM events GROUP BY user_id, timestamp, item_id "
                                      "ORDER BY user_id, timestamp, MIN(id)").fetchall()
        out: dict[str, list[str]] = {}
        for user, item in rows:
            out.setdefault(user, []).append(item)
        return list(out.values())

    def item_counts(self) -> dict[str, int]:
        """Events per item id over all users (the popularity used for cold start), as of now."""
        with self._read_lock:
            return dict(self._read.execute("SELECT item_id, n FROM item_counts WHERE n > 0").fetchall())

    def count(self) -> int:
        with self._read_lock:
            return int(self._read.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def frame(self, *, since: int | None = None) -> pd.DataFrame:
        """All events (or those with ``timestamp >= since``) as a log frame, in arrival order.

        ``rating`` is present only when every selected event has one (a log mixing rated
        and unrated rows would have its unrated rows dropped as bad ratings).
        """
        where, args = ("WHERE timestamp >= ?", (int(since),)) if since is not None else ("", ())
        with self._read_lock:
            frame = pd.read_sql_query(f"SELECT user_id, item_id, timestamp, rating FROM events {where} ORDER BY id",
                                      self._read, params=args)
        if frame["rating"].isna().any() or len(frame) == 0:
            frame = frame.drop(columns="rating")
        return frame.astype({"user_id": str, "item_id": str})

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._conn.close()
            self._read.close()

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
