"""A partner's private round-to-round state on disk, so that a resumed run continues as an uninterrupted one.

What a partner keeps between rounds lives in its ClientApp's ``context.state``: MF's user factors
(``client/private_factors.py``) and, with ``keep-optimizer-state``, its Adam moments
(``client/optimizer_state.py``). A resumed run is a new Flower run in a new process, so that memory is
empty. After each training round (after its spend is on the ledger) the partner also writes these
records to a file of its own, and a round that finds them missing from ``context.state`` takes them
from the file. Nothing here is ever sent.

Where the file lives (one per run name, the name the coordinator sends with every message):

* a partner that names a folder for it (node config ``partner-state-dir``): there, the file named by a
  hash of the run name and the partner's ``data-path`` (a coordinator's name never becomes a path
  here, and partners of one machine may share the folder); a folder made here is 0700, one that
  exists keeps its mode;
* else a partner that names its ledger (node config ``ledger-path``): in ``<ledger-path>.state/``,
  mode 0700, the file named by a hash of the run name;
* a simulated partition: ``<run-dir>/<run>/partner-state/partner-<partition-id>.pt`` beside the run's
  ledgers, removed with the run directory;
* any other partner keeps the state in memory only, and it starts again after a resume (the
  coordinator's log says so).

Which saved state counts is decided by what the coordinator sends with every message (server/app.py
``partner_state_keys``): the run's token (the same across its resumes, another for a fresh run under
a reused name), its own start's token, and ``resumed-after``, the last round its checkpoint holds. An
entry counts when it is of this run, from an earlier round, and either saved since this start of the
coordinator or from a round its checkpoint holds: a round the coordinator lost in a crash (redone
after the resume, perhaps with other partners sampled) never counts. The file keeps the newest entry
and the one a restore would take before it. Without a run token (an older coordinator, a lost
``provenance.json``, a ClientApp called directly) nothing is saved or restored.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context

from client.optimizer_state import KEY as OPTIMIZER_KEY
from client.partner_policy import partner_state_dir
from client.private_factors import META_KEY, STATE_KEY
from common.files import PRIVATE_DIR_MODE, ensure_private, write_private_bytes

LOG = logging.getLogger("fedrec.client")
RECORDS = (STATE_KEY, META_KEY, OPTIMIZER_KEY)  # the context.state records a resumed round needs


@dataclass(frozen=True)
class RunIdentity:
    """What the coordinator sends for this: the run's token, its start's token, ``resumed-after``."""

    run_token: str
    server_start: str
    resumed_after: int

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> RunIdentity | None:
        """From a message's ConfigRecord; None without a run token."""
        token = str(config.get("run-token", "") or "")
        if not token:
            return None
        return cls(token, str(config.get("server-start", "")), int(config.get("resumed-after", 0)))

    def counts(self, entry: Mapping[str, Any], server_round: int) -> bool:
        """Whether a saved entry may serve ``server_round`` (module docstring)."""
        return (entry.get("run") == self.run_token and entry["round"] < server_round
                and (entry.get("start") == self.server_start or entry["round"] <= self.resumed_after))


def state_file(cfg: Mapping[str, Any], node_config: Mapping[str, Any], run: str) -> Path | None:
    """This partner's state file for run ``run``, or None where the state stays in memory only."""
    if (folder := partner_state_dir(node_config)) is not None:
        # the folder may serve several partners (SuperNodes) of one machine: the file is this one's log and run
        log = str(Path(str(node_config.get("data-path", ""))).expanduser().absolute())
        owner = log if node_config.get("data-path") else f"partition-{node_config.get('partition-id', '')}"
        return folder / f"{_hashed(run + chr(0) + owner)}.pt"
    if node_config.get("ledger-path"):
        ledger = Path(str(node_config["ledger-path"]))
        return ledger.with_name(ledger.name + ".state") / f"{_hashed(run)}.pt"
    if "partition-id" in node_config:
        return Path(str(cfg["run-dir"])) / run / "partner-state" / f"partner-{int(node_config['partition-id'])}.pt"
    return None


def _hashed(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _records(context: Context) -> dict[str, dict[str, Any]]:
    """The private records as plain data: an ArrayRecord as tensors, a ConfigRecord as its values."""
    out: dict[str, dict[str, Any]] = {}
    for key in RECORDS:
        if (arrays := context.state.array_records.get(key)) is not None:
            out[key] = {"arrays": arrays.to_torch_state_dict()}
        elif (config := context.state.config_records.get(key)) is not None:
            out[key] = {"config": dict(config)}
    return out


def _read(path: Path) -> list[dict[str, Any]]:
    """The saved entries, newest first; [] for a missing or unreadable file (warned: the state starts again)."""
    import torch

    if not path.is_file():
        return []
    try:
        entries = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)["entries"]
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("round"), int)]
    except Exception as err:  # noqa: BLE001 -- a damaged file costs the warm start, never the round
        LOG.warning("partner state %s is unreadable (%s); the private state starts again", path, type(err).__name__)
        return []


def _counting(path: Path, run: RunIdentity, server_round: int) -> dict[str, Any] | None:
    """The newest saved entry that may serve ``server_round``, or None."""
    return next((e for e in _read(path) if run.counts(e, server_round)), None)


def save_partner_state(context: Context, path: Path | None, server_round: int, run: RunIdentity | None) -> None:
    """Write this round's private records to ``path``, with the entry a restore would take before them.
    A failed write is a warning: the state stays in memory and only a later resume loses it (the round's
    spend is on the ledger already, so failing the round would cost budget for nothing)."""
    if path is None or run is None or not (records := _records(context)):
        return
    import torch

    try:
        if not path.parent.is_dir():  # a folder made here is private; one the partner named keeps its own mode
            path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            ensure_private(path.parent)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a write cut short by a crash (this file's only)
            stale.unlink(missing_ok=True)
        before = _counting(path, run, server_round)
        entry = {"round": server_round, "run": run.run_token, "start": run.server_start, "records": records}
        buffer = io.BytesIO()
        torch.save({"entries": [entry, *([before] if before else [])]}, buffer)
        write_private_bytes(path, buffer.getvalue())
    except OSError as err:
        LOG.warning("could not save this partner's round-to-round state to %s (%s); it stays in memory, and a "
                    "resume in a new process would start it again", path, err)


def restore_partner_state(context: Context, path: Path | None, server_round: int, run: RunIdentity | None) -> bool:
    """Put the newest saved state that counts for ``server_round`` into an empty ``context.state``;
    True when something was restored. A context that already holds any record keeps its own."""
    if path is None or run is None:
        return False
    if any(k in context.state.array_records or k in context.state.config_records for k in RECORDS):
        return False
    if (entry := _counting(path, run, server_round)) is None:
        return False
    for key, record in entry["records"].items():
        if key not in RECORDS:
            continue
        if "arrays" in record:
            context.state.array_records[key] = ArrayRecord(record["arrays"])
        else:
            context.state.config_records[key] = ConfigRecord(record["config"])
    LOG.info("restored this partner's private state from round %d (%s)", entry["round"], path)
    return True
