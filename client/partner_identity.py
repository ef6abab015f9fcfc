"""Who a partner is: the public label the coordinator knows it by, the local label that names its
default ledger file, and where that ledger lives. The label sent is keyed with a secret, so the
coordinator cannot test which users a partner holds from it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from common.data.sequences import SequenceData
from common.errors import PrivacyError
from common.files import file_in_the_way

LABEL_KEY = "partner-label-key"  # context.state record: this node's secret for its public label (one run)


def simulated_label(node_config: Mapping[str, Any]) -> str | None:
    """``partner-<partition-id>`` for a simulated partner (its name is public), else None."""
    return f"partner-{int(node_config['partition-id'])}" if "partition-id" in node_config else None


def local_label(node_config: Mapping[str, Any], data: SequenceData) -> str:
    """``partner-<partition-id>`` in simulation, else ``partner-<data fingerprint>``: names the default
    ledger file on this partner's disk, stable across runs; never sent (see :func:`partner_label`)."""
    return simulated_label(node_config) or _data_label(data.fingerprint())


def _data_label(fingerprint: str) -> str:
    """A deployed partner's local label: the data fingerprint its default ledger file is named by."""
    return f"partner-{fingerprint}"


def public_fingerprint(context: Context, data: SequenceData, *, key: str | None = None, run: str = "") -> str:
    """What the coordinator learns of this partner's data identity. A log named by ``data-identity`` or an
    event store is identified by its name or store id, not its content; a plain log's fingerprint hashes
    its content, and sent as it was, it let a coordinator who knows every other user's history test
    whether one more user is in it (no DP guarantee survives that). It is sent keyed with a secret: the
    ledger's (``key``, kept on the partner's disk) with the ``run`` name, so a resumed run keeps its label
    and other runs cannot be linked; without a ledger, one this node draws per run series (``context.state``)."""
    if data.identity:
        return data.fingerprint()
    if key is None:
        record = context.state.config_records.get(LABEL_KEY)
        if record is None or not record.get("key"):
            record = ConfigRecord({"key": secrets.token_hex(16)})
            context.state.config_records[LABEL_KEY] = record
        key = str(record["key"])
    message = f"{run}\x1f{data.fingerprint()}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:16]


def partner_label(node_config: Mapping[str, Any], data: SequenceData, context: Context) -> str:
    """The name the coordinator knows a partner without a ledger by (no local DP): ``partner-<partition-id>``
    in simulation, else ``partner-<public fingerprint>`` keyed with this Flower run's secret; a partner
    with a ledger keys it with the ledger's (:meth:`PartnerBudget.open`)."""
    return simulated_label(node_config) or f"partner-{public_fingerprint(context, data)}"


def ledger_path(cfg: Mapping[str, Any], node_config: Mapping[str, Any], run: str, label: str) -> Path:
    """Node config ``ledger-path`` when the partner set it; else ``ledger-dir`` (run config);
    else ``<run-dir>/<run>/ledgers``, i.e. inside the run's directory."""
    if node_config.get("ledger-path"):
        return Path(str(node_config["ledger-path"]))
    if cfg.get("ledger-dir"):
        folder = Path(str(cfg["ledger-dir"]))
        if file := file_in_the_way(folder):
            # (it read "ledger-path partner-1.sqlite: a folder on the way is a file", naming neither: a review)
            raise PrivacyError(f"run config ledger-dir = {str(folder)!r}: {file} is a file, not a folder; give the "
                               "folder the ledgers are kept in")
        return folder / f"{label}.sqlite"
    return Path(str(cfg["run-dir"])) / run / "ledgers" / f"{label}.sqlite"


def refuse_a_default_ledger_left_behind(path: Path, node_config: Mapping[str, Any], data: SequenceData) -> None:
    """A deployed partner on the default ledger file whose log is now named (``data-identity``) or an event
    store gets a new default file name (it follows the identity), so a fresh ledger would start the same
    users' spend from zero while the one written under the log's content sits beside it: refuse, naming it."""
    if node_config.get("ledger-path") or not data.identity or simulated_label(node_config) or path.exists():
        return
    left = path.with_name(f"{_data_label(data.content_fingerprint())}{path.suffix}")
    if left.exists():
        raise PrivacyError(f"privacy ledger {left} was written for this data before it was named (data-identity) or "
                           f"moved into an event store, and the default ledger file now is {path.name}; set node "
                           f"config ledger-path=\"{left}\" to keep its spend (a new ledger would start from zero)")
