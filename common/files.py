"""Local files with exact permissions: private ledgers, checkpoints, stores and keys (0600), public certificates.

A partner's ledger or a coordinator's checkpoint says something about the data it was
computed from, so nothing here is ever created world- or group-readable, not even for
the instant between creation and a later ``chmod``.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from common.errors import ConfigError

PRIVATE_FILE_MODE = 0o600  # owner read/write only
PRIVATE_DIR_MODE = 0o700  # owner only


def write_private_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (write-then-rename) with mode 0600.

    The temporary file is created with ``O_EXCL`` and mode 0600 in the same folder, synced
    to disk and renamed over ``path``; a crash leaves either the old file or the new one,
    never a mix. Returns ``path``. The temporary name is random as well as per process: a
    crash can leave one behind, and a restart with the same process id (normal in a fresh
    container) must not be refused by it.
    """
    return _write_then_rename(Path(path), data, PRIVATE_FILE_MODE)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write-then-rename so that a crash never leaves a half-written file (a run directory's
    config, summary, report, model). The file gets the umask's mode, like ``Path.write_bytes``
    (run directories are 0700); the temporary name is per process and random, as in
    :func:`write_private_bytes`. Returns ``path``."""
    return _write_then_rename(Path(path), data, None)


def _write_then_rename(target: Path, data: bytes, mode: int | None) -> Path:
    """``data`` into a fresh temporary file beside ``target`` (``mode`` exactly, else the umask's),
    synced, then renamed over ``target``; the folder is synced so the rename survives a crash."""
    tmp = _staged(target, data, mode)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(target.parent)
    return target


def _staged(target: Path, data: bytes, mode: int | None) -> Path:
    """A fresh, synced temporary file beside ``target`` holding ``data`` (removed if writing fails)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # the umask may have removed bits, never added: make it exact
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def ensure_private(path: str | os.PathLike) -> Path:
    """Restrict an existing file to 0600 (a folder to 0700); e.g. after SQLite created a ledger.

    A path that does not exist yet is created empty with mode 0600, so that a store opened
    afterwards (SQLite, ``open(..., "a")``) inherits the mode instead of the umask's.
    """
    p = Path(path)
    if p.is_dir():
        os.chmod(p, PRIVATE_DIR_MODE)
    elif p.exists():
        os.chmod(p, PRIVATE_FILE_MODE)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    return p


def file_in_the_way(folder: str | os.PathLike) -> Path | None:
    """The file that stands where ``folder`` or one of its parents should be a folder, else None."""
    folder = Path(folder).absolute()
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def is_private(path: str | os.PathLike) -> bool:
    """True when neither the group nor others have any permission on ``path``."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def _sync_folder(folder: Path) -> None:
    # NOTE: the rename itself is durable only once the folder entry is synced (POSIX).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- credentials: exact modes from creation, never overwritten by accident -----------------
PRIVATE_MODE = PRIVATE_FILE_MODE  # private keys, same as ledgers
PUBLIC_MODE = 0o644  # certificates and public keys


CREDENTIALS_HINT = "the old credentials stop working"


def refuse_folder(folder: Path, *, option: str = "--out", holds: str = "") -> None:
    """One clear line when ``folder`` (an output folder, created if missing) is a file or under one;
    ``holds`` says what goes in it."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                what = f"{option} {folder} is a file" if p == folder else f"{option} {folder}: {p} is a file"
                raise ConfigError(f"{what}; {option} must be a folder" + (f" (for {holds})" if holds else ""))
            return


def refuse_unwritable(path: Path) -> None:
    """One clear line when ``path`` cannot be a file: it is a folder, or a parent of it is a file."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{path}: {parent} is a file, not a folder; give a file path in a folder")
            return


def refuse_unwritable_folder(folder: Path, what: str, note: str = "") -> None:
    """Make ``folder`` (and its parents) and write a temporary file in it, before long work whose result goes
    there; one clear line naming ``what`` (e.g. ``--out x.pt``), then ``note``, where it cannot be made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{what}: cannot write in {folder} ({exc.strerror or exc})" + (f"; {note}" if note else "")) \
            from None


def refuse_existing(paths: list[Path], *, force: bool, hint: str = "") -> None:
    """One clear line when any of ``paths`` exists and ``force`` is not set (checked before writing
    any), or is a folder or under a file (whatever ``force``); ``hint`` says what overwriting would break."""
    for p in paths:
        refuse_unwritable(Path(p))
        if p.exists() and not force:
            raise ConfigError(f"{p} already exists; pass --force to overwrite it" + (f" ({hint})" if hint else ""))


# Files SQLite and fedrec keep beside a file (its write-ahead log and shared memory, a rollback journal, a
# ledger's marker): written over, an event store loses events not yet merged, a ledger its marker
SIDECARS = ("-wal", "-shm", "-journal", ".created")


def refuse_overwriting_inputs(out: str | os.PathLike, inputs: list[Path], *, flag: str = "--out") -> None:
    """One line when ``out`` is one of the command's own ``inputs`` or a file kept beside one (:data:`SIDECARS`,
    a ledger's ``.<name>.lock``): never overwritten, not even with --force (a catalogue written over the log
    it was read from leaves no log)."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        real = Path(given).resolve()
        beside = {real.with_name(real.name + s) for s in SIDECARS} | {real.with_name(f".{real.name}.lock")}
        if real == target:
            raise ConfigError(f"{flag} {out} is this command's input ({given}); choose another file")
        if target in beside:
            raise ConfigError(f"{flag} {out} is a file kept beside this command's input {given}; choose another file")


def write_file(path: Path, data: bytes, *, mode: int, force: bool, hint: str = "") -> None:
    """Create ``path`` with permissions ``mode``; refuse to overwrite unless ``force`` (``hint``:
    see :func:`refuse_existing`)."""
    # O_EXCL + mode (in _staged): a private key is never readable by others, not even for an instant.
    write_files([(path, data, mode)], force=force, hint=hint)


def write_files(files: list[tuple[Path, bytes, int]], *, force: bool, hint: str = "") -> None:
    """:func:`write_file` for a set that only works together (a CA and the certificate it signed):
    every file is written beside its target before any is renamed into place, so a full disk leaves
    the folder as it was, not half a set that a rerun would call existing credentials."""
    refuse_existing([path for path, _, _ in files], force=force, hint=hint)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_staged(path, data, mode), path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:  # renames in one folder need no space
        os.replace(tmp, path)
    for folder in {path.parent for _, path in staged}:
        _sync_folder(folder)
