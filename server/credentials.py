"""TLS credentials for the SuperLink: a private CA and a server certificate with SANs.

Everything cryptographic is done by the ``cryptography`` package; this module only
chooses parameters (ECDSA P-384 keys, SHA-256 signatures, validity in days) and writes
files with safe permissions: private keys 0600, certificates 0644, never overwritten
unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.files import CREDENTIALS_HINT, PRIVATE_MODE, PUBLIC_MODE, refuse_existing, refuse_folder, write_files

@dataclass(frozen=True)
class ServerCredentials:
    """Paths of the files ``create_server_credentials`` wrote."""

    ca_cert: Path  # give to every partner (their --root-certificates)
    ca_key: Path  # keep offline: it can mint certificates the partners trust
    server_cert: Path  # flower-superlink --ssl-certfile
    server_key: Path  # flower-superlink --ssl-keyfile


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    # A DNS name (RFC 1123 labels; "*." for a wildcard): a typo here makes every partner's TLS check fail
    if host.rsplit(".", 1)[-1].isdigit():  # no top-level label is all digits: 10.0.0.256 is a mistyped IP (a review)
        raise ConfigError(f"--host {host!r} is not an IP address (four numbers 0-255, or IPv6) nor a DNS name")
    if not host.isascii():
        try:
            ascii_form = f": {host.encode('idna').decode('ascii')}"
        except UnicodeError:
            ascii_form = ""
        raise ConfigError(f"--host {host!r}: give a name with accents in its ASCII (punycode) form{ascii_form}")
    if not re.fullmatch(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
                        host) or len(host) > 253:
        raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def create_server_credentials(
    out: str | os.PathLike, *, hosts: list[str], days: int = 365, organisation: str = "fedrec federation",
    force: bool = False,
) -> ServerCredentials:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (valid ``days`` days) in ``out``.

    ``hosts`` are the DNS names and IP addresses the SuperLink is reached at; partners'
    TLS checks fail for any other name, so list every one (e.g. ``localhost``, ``127.0.0.1``
    and the public name).
    """
    if not hosts:
        raise ConfigError("give at least one --host (the name or IP partners use to reach the SuperLink)")
    names = [_san(h) for h in hosts]  # checked before anything is written
    if not 1 <= days <= 36500:
        raise ConfigError(f"--days = {days} must be between 1 and 36500 (100 years)")
    root = Path(out)
    refuse_folder(root, holds="ca.crt, ca.key, server.crt and server.key")
    paths = ServerCredentials(root / "ca.crt", root / "ca.key", root / "server.crt", root / "server.key")
    refuse_existing([paths.ca_key, paths.ca_cert, paths.server_key, paths.server_cert], force=force,
                    hint=CREDENTIALS_HINT)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    # Certificate authority: signs the server certificate; partners trust only this.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                         x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    # SuperLink server certificate: the SANs are what TLS clients check.
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                                 x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    write_files([(paths.ca_key, _pem_key(ca_key), PRIVATE_MODE),
                 (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE),
                 (paths.server_key, _pem_key(server_key), PRIVATE_MODE),
                 (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)],
                force=force, hint=CREDENTIALS_HINT)
    return paths
