"""The privacy ledger's file: its schema, its atomic creation beside a marker, its integrity.

What :class:`client.privacy_ledger.PrivacyLedger` stands on, kept apart from its accounting: a new
ledger is made under a temporary name and linked in after its marker is written (a crash never leaves
a ledger without a marker); a creation cut short between the two is finished, not refused; the spend
rows carry a SHA-256 digest (SQLite keeps no checksum), checked at every opening; older schemas are
upgraded in one transaction.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path

from common.errors import PrivacyError
from common.files import ensure_private, write_private_bytes

SCHEMA_VERSION = 3  # 2: batches.kind, calibrations.evaluation_noise/planned_evaluations; 3: meta rows-sha256
MARKER_SUFFIX = ".created"  # <ledger>.created: this ledger existed (id, fingerprint, unix time)
ROWS_DIGEST = "rows-sha256"  # meta key: the digest of the batches rows (rows_digest), updated with every write
STATE_DIR_ENV = "FEDREC_STATE_DIR"  # where copies of ledger markers live (mirror_path)
UNREADABLE = "unreadable-marker"  # read_marker's id for a marker that exists but cannot be read
LOG = logging.getLogger("fedrec.client")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE calibrations (
    run TEXT PRIMARY KEY,            -- one noise level per run, fixed before its first round
    noise_multiplier REAL NOT NULL,
    target_epsilon REAL NOT NULL,
    target_delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    sample_rate REAL NOT NULL,
    steps_per_round INTEGER NOT NULL,
    planned_rounds INTEGER NOT NULL,
    recorded REAL NOT NULL,          -- unix time, seconds
    evaluation_noise REAL NOT NULL DEFAULT 0,        -- 0: evaluation sums sent in clear
    planned_evaluations INTEGER NOT NULL DEFAULT 0   -- noised evaluations the noise was calibrated for
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    accountant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    recorded REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'train'  -- train (DP-SGD steps) | evaluate (a noised evaluation reply) | count (a noised user count) | item-prior (a noised item histogram)
);
"""
# A schema-1 ledger (before noised evaluation) gains the new columns when opened; its rows keep their meaning
MIGRATE_1_TO_2 = """
ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'train';
ALTER TABLE calibrations ADD COLUMN evaluation_noise REAL NOT NULL DEFAULT 0;
ALTER TABLE calibrations ADD COLUMN planned_evaluations INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '2' WHERE key = 'schema-version';
"""


def finish_interrupted_creation(path: Path, fingerprint: str, marker_id: str) -> bool:
    """A crash between writing the marker and linking the new ledger in (:func:`create_ledger`) left a
    marker, no ledger and the made ledger under its temporary name: that ledger never held a row of
    spend, so finishing the link loses nothing (it was refused as deleted, locking the partner out)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if not tmp.name[len(path.name) + 2:-4].isdigit():
            continue  # .<name>.<pid>.tmp only (the marker's own temporary files are named otherwise)
        try:
            conn = sqlite3.connect(f"file:{tmp}?mode=ro", uri=True)
            try:
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                rows = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            continue
        if meta.get("marker-id") == marker_id and meta.get("fingerprint") == fingerprint and rows == 0:
            os.link(tmp, path)
            tmp.unlink(missing_ok=True)
            return True
    return False


def create_ledger(path: Path, fingerprint: str, *, mirror: bool = True) -> None:
    """Make an empty ledger for data ``fingerprint`` at ``path`` beside its marker (the caller holds the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = {"id": uuid.uuid4().hex[:12], "fingerprint": fingerprint, "created": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    ensure_private(tmp)  # 0600 before SQLite writes a byte (it keeps the mode; else the umask's 0644)
    conn = sqlite3.connect(tmp)
    try:
        with conn:
            conn.executescript(SCHEMA)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema-version", str(SCHEMA_VERSION)),
                ("fingerprint", fingerprint),
                ("created", str(marker["created"])),
                ("marker-id", marker["id"]),  # ties it to its marker (finish_interrupted_creation)
                (ROWS_DIGEST, rows_digest(conn)),
            ])
    finally:
        conn.close()
    # The marker first: a crash between the two steps leaves a marker without a ledger (refused as
    # deleted: the safe side), never a ledger without a marker (whose later deletion would read as a
    # first run and reset the budget). The lock keeps a second creator out meanwhile.
    try:
        write_marker(path, marker, mirror=mirror)
        # NOTE: link-then-unlink, not replace: never overwrite a ledger some process already uses.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def upgrade(conn: sqlite3.Connection, version: str, path: Path) -> None:
    """Schema 1 (before noised evaluation) or 2 (before the rows' digest) to 3, in one transaction under
    the ledger's lock, so a crash leaves the older schema whole. Its rows are taken as they are and
    checked from then on; older code refuses schema 3 instead of writing rows the digest does not know."""
    try:
        conn.execute("BEGIN")
        if version == "1":
            for statement in filter(str.strip, MIGRATE_1_TO_2.split(";")):
                conn.execute(statement)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema-version'", (str(SCHEMA_VERSION),))
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (ROWS_DIGEST, rows_digest(conn)))
        conn.commit()
    except sqlite3.DatabaseError as exc:
        conn.rollback()
        conn.close()
        raise PrivacyError(f"privacy ledger {path} could not be upgraded to schema {SCHEMA_VERSION} "
                           f"({exc}); it is unchanged") from None


def rows_digest(conn: sqlite3.Connection, limit: int = -1) -> str:
    """SHA-256 over every spend row in order (the first ``limit`` only, when >= 0): SQLite keeps no checksum
    of its own, so a flipped bit in a noise multiplier (a crash review: 0.7 -> 1.4 read as epsilon 16.40 ->
    4.15) passed every check."""
    digest = hashlib.sha256()
    for row in conn.execute("SELECT id, run, server_round, noise_multiplier, sample_rate, steps, accountant, "
                            "fingerprint, recorded, kind FROM batches ORDER BY id LIMIT ?", (limit,)):
        digest.update(repr(row).encode())
    return digest.hexdigest()


def check_against_marker(conn: sqlite3.Connection, path: Path, meta: dict[str, str], *, mirror: bool = True) -> None:
    """Refuse a ledger that is not the one its marker was written for, or that is behind what the marker
    says was recorded in it (:func:`advance_marker`): a ledger restored from an older copy, or a fresh one put
    in its place, forgot spend already released, and the partner trained past its budget on it (a crash
    review: restored after round 1 of 3, four updates left at epsilon 8.85 while the replies said 7.997).
    A marker restored with its ledger is told by its copy outside the folder (:func:`read_marker` takes the
    one that says more was recorded)."""
    real = path.resolve()
    marker = read_marker(real, mirror=mirror)
    if marker is None or marker.get("id") == UNREADABLE:
        return
    file_id, marker_id, name = meta.get("marker-id"), str(marker.get("id")), marker_path(real).name
    reset = f'remove it and set node config ledger-reset="{marker_id}" to start a new one, which forgets the spend already released'
    if file_id and file_id != marker_id:
        raise PrivacyError(f"privacy ledger {path} is not the ledger created here (its id {file_id}, its marker "
                           f"{name} says {marker_id}): another ledger put in its place forgets the spend recorded in "
                           f"this one; restore the ledger created here, or {reset}")
    rows, digest = marker.get("rows"), marker.get(ROWS_DIGEST)
    if isinstance(rows, int) and isinstance(digest, str):
        have = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
        if have < rows or rows_digest(conn, rows) != digest:
            raise PrivacyError(f"privacy ledger {path} is behind what was recorded in it: it holds {have} spend rows, "
                               f"and its marker {name} says the first {rows} were different or more (an older copy "
                               f"restored forgets spend already released); restore its newest copy, or {reset}")


def give_marker_id(conn: sqlite3.Connection, path: Path, *, mirror: bool = True) -> str | None:
    """The id of a ledger made before ledgers carried their marker's id: its marker's, or a new one (no marker
    or an unreadable one), stored in its ``meta`` so that its marker can count its rows from now on (a review:
    such a ledger never got a marker, and an older copy restored over it opened). None if it cannot be stored."""
    marker = read_marker(path.resolve(), mirror=mirror)
    known = marker is not None and marker.get("id") != UNREADABLE
    new_id = str(marker["id"]) if known else uuid.uuid4().hex[:12]
    try:
        with conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('marker-id', ?)", (new_id,))
    except sqlite3.DatabaseError as exc:
        LOG.warning("privacy ledger %s: no id could be stored for its marker (%s)", path, exc)
        return None
    return new_id


def advance_marker(conn: sqlite3.Connection, path: Path, meta_id: str | None, *, mirror: bool = True) -> None:
    """Write the ledger's row count and digest into its marker, after each committed write (and at opening:
    a crash between the two leaves the marker behind, the safe side). A ledger whose marker is gone gets
    it back from its own id, and so does one whose marker cannot be read. A ledger without an id of its own
    (made before markers had one) is given one first (:func:`give_marker_id`)."""
    real = path.resolve()
    marker = read_marker(real, mirror=mirror)
    if marker is None or marker.get("id") == UNREADABLE:
        if not meta_id:
            return
        if marker is not None:
            LOG.warning("privacy ledger %s: its marker %s could not be read; written again from the ledger's id",
                        path, marker_path(real).name)
        found = conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()
        marker = {"id": meta_id, "fingerprint": found[0] if found else "", "created": time.time()}
    rows = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    if (marker.get("rows") == rows and marker.get(ROWS_DIGEST)
            and _read_one(marker_path(real)) == marker and (not mirror or marker == _read_one(mirror_path(real)))):
        return  # both copies up to date (a ledger made before the mirror gets its copy here)
    marker.update({"rows": rows, ROWS_DIGEST: rows_digest(conn)})
    try:
        write_marker(real, marker, mirror=mirror)
    except OSError as exc:  # the spend is on the ledger; only the check against a restored older copy waits
        LOG.warning("privacy ledger %s: its marker %s could not be updated (%s); a restored older copy of the "
                    "ledger would not be noticed until it is", path, marker_path(real).name, exc)


def unwritable(path: Path, exc: OSError) -> Exception:
    """A ledger whose folder or file cannot be written (permissions, a read-only file system): one line."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PrivacyError(f"privacy ledger {path}: its folder is not writable ({os.strerror(exc.errno)}; the ledger "
                            "records every round's spend there); give a ledger-path in a writable folder")
    return exc


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def refuse_what_is_not_a_ledger(path: Path) -> None:
    """Refuse an existing ``path`` this process cannot use as a ledger, before anything touches it: a file
    that is no SQLite database (the log or the model given as ledger-path: calling it a corrupt ledger "to
    restore from a backup", after making it 0600 and locking it, misled; a review), one it may not read, or
    one it may not write (the refusal came only after a whole fine-tune had trained)."""
    if not path.is_file():
        return
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except PermissionError:
        raise PrivacyError(f"privacy ledger {path} cannot be read by this user (permission denied); run as the "
                           "user who owns it, or give its ledger-path") from None
    if not head:
        raise PrivacyError(f"privacy ledger {path} is an empty file (0 bytes), not a ledger: if it was this partner's "
                           "ledger, restore it from a backup; else check ledger-path / --ledger-path") from None
    if head != SQLITE_HEADER:
        raise PrivacyError(f"{path} is not a privacy ledger (not an SQLite database): check ledger-path / "
                           "--ledger-path, which names the ledger's own file (never the log or a model)")
    if not os.access(path, os.W_OK):
        raise PrivacyError(f"privacy ledger {path} is read-only for this user; every spend is recorded there, so "
                           "make it writable or run as the user who owns it")


def marker_path(ledger: Path) -> Path:
    """Where the marker of the ledger at ``ledger`` lives: beside it."""
    return ledger.with_name(ledger.name + MARKER_SUFFIX)


def mirror_path(ledger: Path) -> Path | None:
    """A copy of the marker outside the ledger's folder, keyed by the ledger's real path: a backup of the whole
    folder restored (ledger and marker together), or the folder deleted, forgot spend already released, and only
    the node state of one Flower run noticed (a red-team review). ``$FEDREC_STATE_DIR``, else
    ``$XDG_STATE_HOME/fedrec``, else ``~/.local/state/fedrec``; None where there is no home folder to tell."""
    try:
        base = os.environ.get(STATE_DIR_ENV) or str(
            Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "fedrec")
        if not (os.environ.get(STATE_DIR_ENV) or os.environ.get("XDG_STATE_HOME") or Path.home().is_dir()):
            return None  # a HOME that does not exist (a service user): never made up, as a review found
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (an arbitrary container user)
        return None
    key = hashlib.sha256(str(ledger.resolve()).encode()).hexdigest()[:24]
    return Path(base).expanduser() / "ledger-markers" / f"{key}{MARKER_SUFFIX}"


def _read_one(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        marker = None
    # the ledger existed; its id is lost (valid JSON that is not an object raised on .get at every opening)
    return marker if isinstance(marker, dict) else {"id": UNREADABLE}


def deleted_ledger_marker(ledger: Path, marker: dict) -> str:
    """What ``marker`` (:func:`read_marker`'s, of a ledger that is gone) says, for the refusal: when it was made."""
    if marker.get("id") == UNREADABLE:
        return f"its marker {marker_path(ledger).name} is there but cannot be read, so its id is lost"
    made = marker.get("created")
    if not isinstance(made, (int, float)) or isinstance(made, bool) or not 0 <= made < 2**40:  # hand-edited
        return f"its marker {marker_path(ledger).name} does not say when it was created"
    return f"its marker {marker_path(ledger).name} says it was created at " \
           f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(made))} UTC"


def read_marker(ledger: Path, *, mirror: bool = True) -> dict | None:
    """The marker of a ledger that was created at ``ledger`` (``None``: never created there): the one beside it
    or its mirror (:func:`mirror_path`), whichever says more was recorded (for the same ledger id)."""
    beside, copy = _read_one(marker_path(ledger)), _read_one(mirror_path(ledger)) if mirror else None
    if copy is None or copy.get("id") == UNREADABLE:
        return beside
    if beside is None or beside.get("id") == UNREADABLE:
        return copy
    if beside.get("id") != copy.get("id"):
        return beside  # another ledger made here since (ledger-reset): its own marker says what it holds
    rows = [m.get("rows") if isinstance(m.get("rows"), int) else -1 for m in (beside, copy)]
    return copy if rows[1] > rows[0] else beside


def write_marker(ledger: Path, marker: dict, *, mirror: bool = True) -> None:
    """Write ``marker`` beside the ledger (an OSError is the caller's) and to its mirror (a warning if not)."""
    data = json.dumps(marker).encode()
    write_private_bytes(marker_path(ledger), data)
    if not mirror:
        return
    copy = mirror_path(ledger)
    try:
        if copy is None:
            raise OSError("no home folder; set " + STATE_DIR_ENV)
        copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_bytes(copy, data)
    except OSError as exc:
        LOG.warning("privacy ledger %s: the copy of its marker at %s could not be written (%s); a backup of the "
                    "ledger's whole folder restored would not be noticed (set %s to a writable folder)", ledger,
                    copy, exc, STATE_DIR_ENV)
