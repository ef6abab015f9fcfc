"""Round checkpoints: one checksummed file per run, replaced atomically after every round.

A checkpoint holds what a restarted ServerApp needs to continue exactly where the last
complete round left off: the global model, the round number, the aggregating strategy's
state (e.g. FedAdam's moments ``m_t``/``v_t``), the per-round metrics so far, the privacy
summary, the rejected updates, and a fingerprint of the model shape, the item catalogue
and the run config. Loading refuses a file whose checksum does not match (corrupt or
truncated) or whose fingerprint differs from the restarted run's (a different model,
catalogue or config), each with one clear line.

File layout: one header line ``FEDREC-CHECKPOINT 1 <sha256 of payload>\\n``, then the
payload (``torch.save`` of tensors and JSON text, loaded with ``weights_only=True`` so
that a checkpoint can never run code).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy

from common.config import DEFAULTS
from common.errors import CheckpointError
from common.item_text import record_mismatch
from common.files import write_private_bytes
from common.run_files import CHECKPOINT_NAME  # noqa: F401 -- its home is light: `report` needs no torch

MAGIC = b"FEDREC-CHECKPOINT"
VERSION = 1
# Config keys that may change between a run and its resumption (how, not what, is trained).
OPERATIONAL_KEYS = frozenset({
    "resume", "run-dir", "run-name", "round-timeout", "node-wait-timeout", "device", "num-server-rounds",
    "init-model",  # only a fresh run reads it; a resume starts from the checkpoint
})
# Strategy attributes that are scratch space, rebuilt every round (FedOpt's copy of the global model).
SCRATCH_ATTRIBUTES = frozenset({"current_arrays"})


@dataclass
class Checkpoint:
    """Everything needed to continue a federation after round ``round``."""

    round: int
    arrays: dict[str, torch.Tensor]  # the global model after ``round``
    fingerprint: dict[str, Any]
    strategy_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines 1..round
    privacy: dict[str, Any] = field(default_factory=dict)
    rejections: list[dict[str, Any]] = field(default_factory=list)


def fingerprint(cfg: Mapping[str, Any], catalogue: np.ndarray, arrays: Mapping[str, torch.Tensor],
                text_table: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What must not change across a resume: array names/shapes/dtypes, catalogue, training config, and a text
    model's frozen table (``text_table``, :func:`common.item_text.table_record`: not among the arrays)."""
    catalogue_sha = hashlib.sha256("\n".join(map(str, catalogue)).encode()).hexdigest()
    return {**({"item-text": dict(text_table)} if text_table else {}),
        "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        "catalogue-sha256": catalogue_sha,
        "catalogue-size": len(catalogue),
        "config": {k: v for k, v in sorted(cfg.items()) if k not in OPERATIONAL_KEYS} | _schedule_length(cfg),
    }


def _schedule_length(cfg: Mapping[str, Any]) -> dict[str, int]:
    """A learning-rate schedule's length is part of what is trained: with one, ``num-server-rounds``
    (otherwise free to change on resume) fixes the curve, so a changed length is refused."""
    if str(cfg.get("lr-schedule", "constant")) == "constant":
        return {}
    return {"lr-schedule-epochs": int(cfg["num-server-rounds"]) * int(cfg["local-epochs"])}


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` naming what differs between two fingerprints."""
    # The catalogue first: a grown catalogue also changes an id+text model's array shapes, and the catalogue
    # is the cause to name (the arrays message sent the user to the model config)
    if saved["catalogue-sha256"] != current["catalogue-sha256"]:
        raise CheckpointError(f"{path}: the checkpoint was trained on a different item catalogue "
                              f"({saved['catalogue-size']} items, now {current['catalogue-size']}); resume with "
                              "its catalogue, or start a new run from its model with init-model")
    if saved["arrays"] != current["arrays"]:
        names = sorted(set(saved["arrays"]) | set(current["arrays"]))
        first = next(k for k in names if saved["arrays"].get(k) != current["arrays"].get(k))
        raise CheckpointError(
            f"{path}: the checkpointed model has different arrays (first difference: {first!r} "
            f"{saved['arrays'].get(first)} vs now {current['arrays'].get(first)}); "
            "resume with the model config it was trained with")
    if why := record_mismatch(saved.get("item-text"), current.get("item-text"), current["config"]):
        raise CheckpointError(f"{path}: {why}; resume with the file it was trained with, or start a new run "
                              "from its model with init-model")
    # A knob added by a newer version is compatible while it keeps its default (the old behaviour).
    keys = sorted(k for k in set(saved["config"]) | set(current["config"])
                  if saved["config"].get(k) != current["config"].get(k)
                  and not (k not in saved["config"] and current["config"].get(k) == DEFAULTS.get(k)))
    if keys:
        shown = ", ".join(f"{k} = {saved['config'].get(k)!r} (now {current['config'].get(k)!r})" for k in keys[:4])
        raise CheckpointError(f"{path}: run config differs from the checkpointed run: {shown}; "
                              "resume with the same config or start a new run")


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (write, fsync, rename), mode 0600."""
    payload = {
        "round": int(ckpt.round),
        "arrays": {k: v.detach().cpu().contiguous() for k, v in ckpt.arrays.items()},
        "strategy": {name: {k: torch.from_numpy(np.array(v)) for k, v in d.items()}
                     for name, d in ckpt.strategy_state.items()},
        "json": json.dumps({"fingerprint": ckpt.fingerprint, "rounds": ckpt.rounds,
                            "privacy": ckpt.privacy, "rejections": ckpt.rejections}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = b"%s %d %s\n" % (MAGIC, VERSION, hashlib.sha256(body).hexdigest().encode())
    return write_private_bytes(run_dir / CHECKPOINT_NAME, header + body)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and verify ``run_dir/checkpoint.pt``; a missing, truncated or altered file is refused."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (resume = true needs a run that "
                              "completed at least one round)")
    raw = path.read_bytes()
    header, _, body = raw.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 3 or parts[0] != MAGIC:
        raise CheckpointError(f"{path}: not a fedrec checkpoint (bad header)")
    if parts[1] != str(VERSION).encode():
        raise CheckpointError(f"{path}: checkpoint format {parts[1].decode(errors='replace')} is not supported "
                              f"(this version reads {VERSION})")
    if hashlib.sha256(body).hexdigest().encode() != parts[2]:
        raise CheckpointError(f"{path}: checksum mismatch, the checkpoint is corrupt or truncated; "
                              "restore it from a backup or start a new run")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
        meta = json.loads(payload["json"])
        return Checkpoint(
            round=int(payload["round"]),
            arrays=dict(payload["arrays"]),
            fingerprint=meta["fingerprint"],
            strategy_state={n: {k: v.numpy() for k, v in d.items()} for n, d in payload["strategy"].items()},
            rounds=meta["rounds"],
            privacy=meta["privacy"],
            rejections=meta["rejections"],
        )
    except Exception as exc:  # checksum matched, so this is a format problem, not corruption
        raise CheckpointError(f"{path}: unreadable checkpoint payload ({type(exc).__name__})") from None


def strategy_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """A strategy's learned state: every public attribute holding named arrays.

    For FedAdam/FedYogi/FedAdagrad these are the moments ``m_t`` and ``v_t``; FedAvg,
    median, trimmed mean and Krum keep none. ``current_arrays`` is skipped: FedOpt
    rebuilds it from the global model at the start of every round.
    """
    state: dict[str, dict[str, np.ndarray]] = {}
    for name, value in vars(strategy).items():
        if name.startswith("_") or name in SCRATCH_ATTRIBUTES or not isinstance(value, dict) or not value:
            continue
        if all(isinstance(v, np.ndarray) for v in value.values()):
            state[name] = {k: np.array(v) for k, v in value.items()}
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Put saved arrays back on ``strategy``; an attribute it does not have is a mismatch."""
    for name, arrays in state.items():
        if not hasattr(strategy, name):
            raise CheckpointError(f"checkpointed strategy state {name!r} does not exist on "
                                  f"{type(strategy).__name__}; was the run started with another aggregation?")
        setattr(strategy, name, {k: np.array(v) for k, v in arrays.items()})
