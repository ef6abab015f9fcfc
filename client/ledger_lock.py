"""The exclusive lock a privacy ledger holds while it is open.

The budget check, the training and the record of its spend are one step, so two trainings on one
ledger (two runs, or a fine-tune during a round) must not both pass the check on the same spend.
flock on two files: ``.<ledger>.lock`` beside the real file (a ledger opened through a symbolic link
takes the same lock) and, once it exists, the ledger file itself (a hard link, another name for the
same file, has a lock file of its own name).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from client.ledger_file import unwritable
from common.errors import PrivacyError


class LedgerLock:
    """Locks for the ledger at ``path``; :meth:`acquire` waits up to ``wait`` seconds, then refuses
    with :class:`PrivacyError` (in use by another training). :meth:`release` is safe to repeat."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._file_lock_fd: int | None = None  # the ledger file's own lock (hard links share it)

    def acquire(self, wait: float, create: bool) -> None:
        if not self.path.parent.is_dir():
            if not create:
                return  # nothing to guard: opening reports the missing ledger
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock sits beside the real file: a ledger opened through a symbolic link (a fine-tune's
        # --ledger-path linking to the supernode's ledger) takes the same lock (a review overspent that way)
        real = self.path.resolve()
        try:
            fd = os.open(real.parent / f".{real.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise unwritable(self.path, exc) from None
        deadline = time.monotonic() + wait
        self._lock_fd = self._flock(fd, deadline, wait)
        self.lock_file(deadline, wait)

    def lock_file(self, deadline: float = 0.0, wait: float = 0.0) -> None:
        """Lock the ledger file itself too, once it exists (by default without waiting): a hard link (another
        name for the same file) has a lock file of its own name, and two trainings through the two names both
        spent (a review). flock, not SQLite's fcntl locks: closing this descriptor (after the connection, in
        close) releases nothing of SQLite's."""
        real = self.path.resolve()
        try:
            file_fd = os.open(real, os.O_RDONLY) if self._file_lock_fd is None and real.is_file() else None
        except OSError:
            file_fd = None
        if file_fd is not None:
            try:
                self._file_lock_fd = self._flock(file_fd, deadline, wait)
            except BaseException:
                self.release()
                raise

    def _flock(self, fd: int, deadline: float, wait: float) -> int:
        """``fd``, exclusively locked (waiting until ``deadline``); closed and refused past it."""
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise PrivacyError(
                        f"privacy ledger {self.path} is in use by another training (another run or a fine-tune "
                        f"on this ledger) and stayed locked for {wait:g} s; two trainings at once would both "
                        "spend from the same budget, so this one does not start: try again when it has finished") from None
                time.sleep(0.1)

    def release(self) -> None:
        for name in ("_file_lock_fd", "_lock_fd"):  # closing a descriptor releases its lock
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
