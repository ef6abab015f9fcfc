"""PrivacyLedger: a partner's persistent record of every DP-SGD mechanism it ran (SQLite).

The ledger is the single source of a partner's privacy spend: epsilon is always computed
from all of its rows, so spend composes across rounds, runs and process restarts. One
ledger belongs to one data set (its fingerprint); it is never reset or silently recreated.
Creating a ledger also writes a marker beside it (``<ledger>.created``): a ledger deleted later,
with its marker left, is refused as deleted instead of starting afresh as on a first run.
An open ledger holds an exclusive lock (``.<ledger>.lock`` beside it) until it is closed: the
budget check, the training and the record of its spend are one step, so two trainings on one
ledger (two runs, or a fine-tune during a round) cannot both pass the check on the same spend.

Units: ``noise_multiplier`` is the Gaussian noise std as a multiple of the per-user clipping
norm; ``sample_rate`` the Poisson probability of one user per step; ``steps`` counts noisy
optimizer steps; epsilon and delta as in (epsilon, delta)-DP for one user's whole history.
A row's ``kind`` is ``train`` (DP-SGD), ``evaluate`` (a noised evaluation reply, one Gaussian
mechanism at sample rate 1: common/private_evaluation.py), ``count`` (a deployed partner's noised
user count, once per run: common/private_count.py) or ``item-prior`` (a noised item histogram, once per
run: common/item_prior.py); epsilon counts every row.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from client.ledger_file import (ROWS_DIGEST, SCHEMA_VERSION, advance_marker, check_against_marker,  # noqa: F401
                                create_ledger, deleted_ledger_marker, finish_interrupted_creation, give_marker_id,
                                marker_path, mirror_path, read_marker, refuse_what_is_not_a_ledger, rows_digest,
                                unwritable, upgrade)
from client.ledger_lock import LedgerLock
from common.errors import PrivacyError
from common.files import ensure_private
from common.privacy import Mechanism, epsilon_of

LOG = logging.getLogger("fedrec.ledger")

LOCK_WAIT_SECONDS = 60.0  # how long an opening waits for another training's lock before refusing
INSERT_ROW = ("INSERT INTO batches (run, server_round, noise_multiplier, sample_rate, steps, accountant, fingerprint, "
              "recorded, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
COUNT_KEY = "public-users:"  # meta key + run: the noised user count released for that run (record_count)
MAX_EPSILON_KEY = "max-epsilon"  # meta key: the partner's node config max-epsilon, '' for none (record_max_epsilon)

@dataclass(frozen=True)
class Calibration:
    """The noise chosen for one run: ``target_epsilon`` is reached after ``planned_rounds`` rounds
    and, when ``evaluation_noise`` > 0, ``planned_evaluations`` noised evaluation replies."""

    noise_multiplier: float
    target_epsilon: float
    target_delta: float
    accountant: str
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    evaluation_noise: float = 0.0
    planned_evaluations: int = 0

    def round_mechanism(self) -> Mechanism:
        """What one round of local training spends."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    def evaluation_mechanism(self) -> Mechanism:
        """What one noised evaluation reply spends (common/private_evaluation.py)."""
        return (self.evaluation_noise, 1.0, 1)


class PrivacyLedger:
    """One partner's privacy ledger file.

    Accounts rows of Gaussian mechanisms (noise multiplier sigma, Poisson sample rate q per step, steps);
    :meth:`epsilon` composes all rows at the :meth:`accounting_delta` (the smallest of the delta asked and
    every calibrated run's target); the unit is one user's whole interaction history at this partner.

    Opening checks the file: a ledger that is not a SQLite ledger, has a bad schema or
    impossible rows is *corrupt*; one written for another data set is *foreign*. Both raise
    :class:`PrivacyError` naming the file, and the file is left untouched. A missing file is
    created (atomically, so a crash never leaves a half-made ledger) only with ``create=True``,
    and only if no marker says it existed before: ``reset`` must then be that marker's id, the
    operator's explicit acknowledgement that the spend recorded in the lost ledger is forgotten.

    The handle holds the ledger's lock from opening to :meth:`close`; another opening waits up to
    ``lock_wait`` seconds for it, then raises :class:`PrivacyError` (in use by another training).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, *, create: bool = True, reset: str = "",
                 lock_wait: float | None = None, named: bool = False, adopt: str = "", mirror: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.named = named  # the data set is named by the partner (data-identity): a mismatch is another name
        # adopt: the content fingerprint of the data at hand when it has an identity of its own (a data-identity,
        # an event store). A ledger written under exactly that content is this data's, before it had the name:
        # it is rebound to the name and keeps its spend (a partner naming its log, or moving it into an event
        # store, started again from zero spend under a new ledger; a review)
        self.adopt = adopt if adopt != fingerprint else ""
        self.adopted_from = ""
        # a copy of its marker outside the folder (client/ledger_file.py mirror_path); a simulated partner's ledger
        # lives and goes with its run directory, so none
        self.mirror = mirror
        self.created = False
        self._lock = LedgerLock(self.path)
        self._marker_id: str | None = None  # the file's own copy of its marker's id (advance_marker)
        # A folder, or a path under a file, is a mistake in ledger-path: say so (it read as a corrupt or
        # deleted ledger, and a folder given as the ledger was made 0700)
        if self.path.is_dir():
            raise PrivacyError(f"ledger-path {self.path} is a directory; give the ledger file, e.g. "
                               f"{self.path / 'ledger.sqlite'}")
        if any(parent.exists() and not parent.is_dir() for parent in self.path.parents):
            raise PrivacyError(f"ledger-path {self.path}: a folder on the way is a file; give a path in a folder")
        if self.path.is_symlink() and not self.path.exists():  # its marker is beside the target, never read here
            raise PrivacyError(f"ledger-path {self.path} is a symbolic link to {os.readlink(self.path)}, which does not "
                               "exist; restore the ledger there, or give the ledger file itself as ledger-path")
        refuse_what_is_not_a_ledger(self.path)
        self._lock.acquire(LOCK_WAIT_SECONDS if lock_wait is None else lock_wait, create)
        try:
            self._open(create, reset)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, create: bool, reset: str) -> None:
        if not self.path.exists():
            if not create:
                raise PrivacyError(f"privacy ledger {self.path} is missing; restore it from a backup "
                                   "(a partner's spend is never reset)")
            earlier = read_marker(self.path, mirror=self.mirror)
            # (a marker that counted rows belonged to a ledger that held spend: never replaced by an empty one)
            if (earlier is not None and not earlier.get("rows")
                    and finish_interrupted_creation(self.path, self.fingerprint, str(earlier.get("id")))):
                self.created = True
                self._lock.lock_file()  # it exists now (a review: a hard link got in meanwhile)
                self._conn = self._open_checked()
                return
            if earlier is not None and (not reset or reset != earlier.get("id")):
                said = deleted_ledger_marker(self.path, earlier)
                raise PrivacyError(f"privacy ledger {self.path} was deleted ({said}); restore it from a backup, or set "
                                   f"node config ledger-reset=\"{earlier.get('id')}\" to start a new one, which forgets "
                                   "the spend already released"
                                   + (f" (ledger-reset is {reset!r} now)" if reset else ""))
            create_ledger(self.path, self.fingerprint, mirror=self.mirror)
            self.created = True
            self._lock.lock_file()
        else:
            try:
                ensure_private(self.path)
            except OSError as exc:  # a ledger created before it was made 0600 and not ours: leave it
                if exc.errno not in (errno.EPERM, errno.EACCES):
                    raise unwritable(self.path, exc) from None
        self._conn = self._open_checked()

    # -- reading ---------------------------------------------------------------------------
    def history(self) -> list[Mechanism]:
        """Every mechanism ever recorded, in order."""
        rows = self._query("SELECT noise_multiplier, sample_rate, steps FROM batches ORDER BY id")
        return [(float(s), float(q), int(n)) for s, q, n in rows]

    def epsilon(self, delta: float, accountant: str = "rdp", extra: Iterable[Mechanism] = ()) -> float:
        """Epsilon of the whole ledger at ``delta`` (plus ``extra`` mechanisms not yet run)."""
        return epsilon_of(self.history() + list(extra), delta, accountant)

    def calibration(self, run: str) -> Calibration | None:
        """The noise fixed for ``run``, if it has one (a restarted client reuses it)."""
        rows = self._query(
            "SELECT noise_multiplier, target_epsilon, target_delta, accountant, sample_rate, steps_per_round, "
            "planned_rounds, evaluation_noise, planned_evaluations FROM calibrations WHERE run = ?", (run,))
        if not rows:
            return None
        s, eps, delta, acc, q, steps, rounds, eval_noise, evals = rows[0]
        return Calibration(float(s), float(eps), float(delta), str(acc), float(q), int(steps), int(rounds),
                           float(eval_noise), int(evals))

    def target_epsilons(self) -> list[float]:
        """The target epsilon of every run calibrated on this ledger. A federated run's pre-round check
        caps the whole ledger at its own run's target (a later run may ask for more; a partner's
        ``max-epsilon`` caps every run); a fine-tune defaults to the smallest of them."""
        return [float(r[0]) for r in self._query("SELECT target_epsilon FROM calibrations")]

    def accounting_delta(self, delta: float) -> float:
        """The delta to account this ledger at for a training that asks for ``delta``: the smallest
        of it and every run calibrated here. A larger one would report the same history as a
        smaller epsilon, so a later run or fine-tune could spend past an earlier run's promise."""
        return min([delta, *(float(r[0]) for r in self._query("SELECT target_delta FROM calibrations"))])

    def rounds_trained(self, run: str | None = None) -> int:
        """Rounds of recorded spend (of one run, or of all runs): a round trained again after a
        crash and resume spent again and counts again (one :meth:`record` call is one round)."""
        key = "run || ':' || server_round || ':' || recorded"
        if run is None:
            return int(self._query(f"SELECT COUNT(DISTINCT {key}) FROM batches WHERE kind = 'train'")[0][0])
        return int(self._query(f"SELECT COUNT(DISTINCT {key}) FROM batches WHERE kind = 'train' AND run = ?",
                               (run,))[0][0])

    def total_steps(self) -> int:
        """DP-SGD steps over all runs (noised evaluations are not steps)."""
        return int(self._query("SELECT COALESCE(SUM(steps), 0) FROM batches WHERE kind = 'train'")[0][0])

    def evaluations_recorded(self, run: str | None = None) -> int:
        """Noised evaluation replies recorded (of one run, or of all runs)."""
        if run is None:
            return int(self._query("SELECT COUNT(*) FROM batches WHERE kind = 'evaluate'")[0][0])
        return int(self._query("SELECT COUNT(*) FROM batches WHERE kind = 'evaluate' AND run = ?", (run,))[0][0])

    def spend_marks(self) -> int:
        """DP-SGD steps plus one per other recorded release (noised evaluation, user count, item histogram):
        grows with every record, so a client that remembers it can tell an older copy of the ledger."""
        return int(self._query("SELECT COALESCE(SUM(CASE WHEN kind = 'train' THEN steps ELSE 1 END), 0) "
                               "FROM batches")[0][0])

    def releases(self, run: str, kind: str) -> int:
        """Rows of ``kind`` recorded for ``run`` (e.g. whether its item histogram was released)."""
        return int(self._query("SELECT COUNT(*) FROM batches WHERE kind = ? AND run = ?", (kind, run))[0][0])

    def label_key(self) -> str:
        """A random secret of this ledger (kept in its ``meta``, made at first use), with which the partner
        keys the fingerprint it sends (client/partner_identity.py public_fingerprint): never sent itself."""
        found = self._query("SELECT value FROM meta WHERE key = 'label-key'")
        if found:
            return str(found[0][0])
        key = secrets.token_hex(16)
        try:
            with self._conn:
                self._conn.execute("INSERT INTO meta VALUES ('label-key', ?)", (key,))
        except sqlite3.DatabaseError as exc:
            raise PrivacyError(f"privacy ledger {self.path} could not be written ({exc}); nothing was released, "
                               "free space or make the ledger writable and try again") from None
        return key

    def max_epsilon(self) -> float | None:
        """The partner's ``max-epsilon`` as its SuperNode last recorded it (:meth:`record_max_epsilon`); None
        when no SuperNode with a cap opened this ledger. A fine-tune spends from the same ledger and stays under it."""
        found = self._query("SELECT value FROM meta WHERE key = ?", (MAX_EPSILON_KEY,))
        return float(found[0][0]) if found and found[0][0] else None

    def record_max_epsilon(self, cap: float | None) -> None:
        """Keep the SuperNode's node config ``max-epsilon`` (None: no cap now) with the ledger it caps, so
        ``fedrec-client finetune``, which never sees the node config, keeps to it too."""
        value = "" if cap is None else repr(float(cap))
        found = self._query("SELECT value FROM meta WHERE key = ?", (MAX_EPSILON_KEY,))
        if (found[0][0] if found else "") != value:
            self._write(INSERT_ROW, [], meta={MAX_EPSILON_KEY: value})

    def public_count(self, run: str) -> int | None:
        """The noised user count released for ``run`` (:meth:`record_count`); None when it has none
        (no count noise, or a run calibrated before counts were noised: its exact count stands)."""
        found = self._query("SELECT value FROM meta WHERE key = ?", (COUNT_KEY + run,))
        return int(found[0][0]) if found else None

    # -- writing ---------------------------------------------------------------------------
    def record_count(self, *, run: str, value: int, mechanism: Mechanism, accountant: str) -> None:
        """Record the noised user count of ``run``: its spend row (kind ``count``) and its value, in one
        transaction, before anything computed from it leaves. A run has one (a second is refused)."""
        if self.public_count(run) is not None:
            raise PrivacyError(f"privacy ledger {self.path}: run {run!r} already released its user count")
        s, q, n = mechanism
        row = (run, 0, float(s), float(q), int(n), accountant, self.fingerprint, time.time(), "count")
        self._write(INSERT_ROW, [row], meta={COUNT_KEY + run: str(int(value))})

    def save_calibration(self, run: str, cal: Calibration) -> None:
        """Fix the noise of ``run``; a second, different calibration for the same run is refused."""
        old = self.calibration(run)
        if old is not None:
            if old != cal:
                raise PrivacyError(f"privacy ledger {self.path}: run {run!r} is already calibrated with "
                                   f"noise {old.noise_multiplier:.4g}; refusing to change it mid-run")
            return
        self._write(
            "INSERT INTO calibrations (run, noise_multiplier, target_epsilon, target_delta, accountant, "
            "sample_rate, steps_per_round, planned_rounds, recorded, evaluation_noise, planned_evaluations) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run, cal.noise_multiplier, cal.target_epsilon, cal.target_delta, cal.accountant,
              cal.sample_rate, cal.steps_per_round, cal.planned_rounds, time.time(), cal.evaluation_noise,
              cal.planned_evaluations)])

    def record(self, *, run: str, server_round: int, mechanisms: Iterable[Mechanism], accountant: str,
               kind: str = "train") -> None:
        """Append what one round's training (``kind`` train), one noised evaluation reply (``evaluate``)
        or one noised item histogram (``item-prior``) spent, in one transaction (all rows or none).

        Called before the reply leaves the client, so every released update or sum is on the ledger.
        """
        if kind not in ("train", "evaluate", "item-prior"):
            raise ValueError(f"unknown ledger row kind {kind!r}")
        now = time.time()  # one time for the round's rows: rounds_trained counts (run, round, time)
        rows = [(run, int(server_round), float(s), float(q), int(n), accountant, self.fingerprint, now, kind)
                for s, q, n in mechanisms]
        for _, _, s, q, n, *_ in rows:
            if not (s > 0 and 0 < q <= 1 and n >= 0):
                raise ValueError(f"not a DP mechanism: noise {s}, sample rate {q}, steps {n}")
        self._write(INSERT_ROW, rows)

    def _write(self, sql: str, rows: list[tuple], meta: dict[str, str] | None = None) -> None:
        """One transaction (with ``meta`` entries and the rows' new digest); a write SQLite refuses (disk
        full, a read-only file) is one line, and the caller releases nothing (the spend is recorded
        before any reply leaves)."""
        try:
            with self._conn:
                self._conn.executemany(sql, rows)
                for key, value in (meta or {}).items():
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (ROWS_DIGEST, rows_digest(self._conn)))
        except sqlite3.DatabaseError as exc:
            raise PrivacyError(f"privacy ledger {self.path} could not be written ({exc}); nothing was released, "
                               "free space or make the ledger writable and try again") from None
        # a restored older copy is refused (client/ledger_file.py)
        advance_marker(self._conn, self.path, self._marker_id, mirror=self.mirror)

    def close(self) -> None:
        self._conn.close()
        self._lock.release()

    def __del__(self) -> None:  # a handle dropped without close() must not keep the ledger locked
        with contextlib.suppress(Exception):
            self._lock.release()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _open_checked(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "batches" not in tables and "events" in tables:  # data-path and ledger-path swapped or mixed up
                conn.close()
                raise PrivacyError(f"{self.path} is an event store (the partner's interaction log), not a privacy "
                                   "ledger; give the ledger's own file as ledger-path / --ledger-path")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            bad = conn.execute(
                "SELECT COUNT(*) FROM batches WHERE NOT (noise_multiplier > 0 AND sample_rate > 0 "
                "AND sample_rate <= 1 AND steps >= 0)").fetchone()[0]
            conn.execute("SELECT run, noise_multiplier FROM calibrations LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            raise PrivacyError(f"privacy ledger {self.path} is corrupt ({exc}); restore it from a backup "
                               "(a partner's spend is never reset)") from None
        if meta.get("schema-version") not in ("1", "2", str(SCHEMA_VERSION)) or "fingerprint" not in meta or bad:
            conn.close()
            raise PrivacyError(f"privacy ledger {self.path} is corrupt (schema {meta.get('schema-version')!r}, "
                               f"{bad} impossible rows); restore it from a backup (a partner's spend is never reset)")
        if meta["fingerprint"] != self.fingerprint and self.adopt and meta["fingerprint"] == self.adopt:
            self.adopted_from = meta["fingerprint"]  # rebound at the end, once the checks below pass
        elif meta["fingerprint"] != self.fingerprint:
            conn.close()
            # A CSV/Parquet log is identified by its content, so a log that gained events is "another data set":
            # a new ledger would forget the spend recorded for the same users (an event store keeps one identity)
            # (one apostrophe at most: the reply sanitiser reads a pair as quotes around a data value)
            if self.named:
                raise PrivacyError(f"privacy ledger {self.path} was written for another data set (fingerprint "
                                   f"{meta['fingerprint']}, this log named by data-identity is {self.fingerprint}): "
                                   "it was written under another data-identity, or under the content of the log "
                                   "before it was named; give the data-identity it was written under (a new "
                                   "ledger-path starts again from zero spend)")
            raise PrivacyError(f"privacy ledger {self.path} belongs to another data set (fingerprint "
                               f"{meta['fingerprint']}, the data of this partner is {self.fingerprint}); if this is a "
                               "log that gained events, keep the spend of its users: feed new events to an event store "
                               "(data-path = events.sqlite) instead, or name the log with node config data-identity; "
                               "either takes this ledger over in its first round while the events are those the "
                               "ledger was written for; a new ledger-path starts again from zero spend for them")
        if meta["schema-version"] in ("1", "2"):
            upgrade(conn, meta["schema-version"], self.path)
        elif meta.get(ROWS_DIGEST) != rows_digest(conn):
            conn.close()
            raise PrivacyError(f"privacy ledger {self.path} is corrupt (its rows no longer match their digest: changed "
                               "outside the ledger, or damaged on disk); restore it from a backup (a partner's spend is "
                               "never reset)")
        try:
            check_against_marker(conn, self.path, meta, mirror=self.mirror)
        except PrivacyError:
            conn.close()
            raise
        self._marker_id = meta.get("marker-id") or give_marker_id(conn, self.path, mirror=self.mirror)
        advance_marker(conn, self.path, self._marker_id, mirror=self.mirror)
        if self.adopted_from:
            self._conn = conn
            self._write(INSERT_ROW, [], meta={"fingerprint": self.fingerprint,
                                              f"adopted-{int(time.time())}": self.adopted_from})
            LOG.warning("privacy ledger %s: written for this data before it had its own identity (content "
                        "fingerprint %s); it now belongs to %s and keeps its spend", self.path, self.adopted_from,
                        self.fingerprint)
        return conn

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise PrivacyError(f"privacy ledger {self.path} cannot be read ({exc})") from None
