"""Write credential files safely: exact permissions from creation, never overwriting by accident."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import ConfigError

PRIVATE_MODE = 0o600  # private keys: owner read/write only
PUBLIC_MODE = 0o644  # certificates and public keys


def refuse_existing(paths: list[Path], *, force: bool) -> None:
    """One clear line when any of ``paths`` exists and ``force`` is not set (checked before writing any)."""
    for p in paths:
        if p.exists() and not force:
            raise ConfigError(f"{p} already exists; pass --force to overwrite it (the old credentials stop working)")


def write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Create ``path`` with permissions ``mode``; refuse to overwrite unless ``force``."""
    refuse_existing([path], force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL + mode: a private key is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # the umask may have removed bits we asked for
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
