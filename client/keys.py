"""A partner's SuperNode authentication key pair (ECDSA P-384, OpenSSH format).

The coordinator registers the public key (``flwr supernode register KEY.pub``); the
partner starts ``flower-supernode --auth-supernode-private-key KEY`` and the SuperLink
accepts only nodes whose signature verifies against a registered key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError
from common.files import CREDENTIALS_HINT, PRIVATE_MODE, PUBLIC_MODE, refuse_existing, refuse_folder, write_files

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class NodeKeys:
    """Paths of a partner's key pair."""

    private_key: Path  # stays with the partner: flower-supernode --auth-supernode-private-key
    public_key: Path  # sent to the coordinator: flwr supernode register


def create_node_keys(out: str | os.PathLike, *, name: str, force: bool = False) -> NodeKeys:
    """Write ``NAME`` (private, 0600) and ``NAME.pub`` (public) in ``out``; refuse to overwrite unless ``force``."""
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (it becomes a file name)")
    root = Path(out)
    refuse_folder(root, holds=f"{name} and {name}.pub")
    keys = NodeKeys(root / name, root / f"{name}.pub")
    refuse_existing([keys.private_key, keys.public_key], force=force, hint=CREDENTIALS_HINT)
    # P-384: a NIST curve, which `flwr supernode register` requires.
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # a pair: written as a set, so a full disk cannot leave a private key without its public half
    write_files([(keys.private_key, private, PRIVATE_MODE), (keys.public_key, public + f" {name}\n".encode(), PUBLIC_MODE)],
                force=force, hint=CREDENTIALS_HINT)
    return keys
