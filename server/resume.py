"""Start or resume a run: its directory, the model to start from, and the checkpoint after each round.

Fresh run (``resume = false``): a new run directory, the freshly initialised model, rounds
1..num-server-rounds. Resumed run (``resume = true``, ``run-name`` naming the directory under
``run-dir``): the last checkpoint is verified (checksum, model shape, catalogue, config), its
model and strategy state are restored, ``metrics.jsonl`` is cut back to exactly the
checkpointed rounds (a crash between logging a round and checkpointing it must not count that
round twice), and the run continues with round ``checkpoint + 1``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from common.errors import CheckpointError, ConfigError
from common.files import ensure_private, write_private_bytes
from common.item_text import table_record
from common.privacy import dp_mode, uses_local_dp
from server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    check_compatible,
    fingerprint,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.privacy_report import PrivacyReport
from server.rounds import RoundControl
from server.run_report import RunRecorder, new_run_dir
from server.validation import ValidatingStrategy


@dataclass
class RunStart:
    """Where this process starts: the run directory, the global model and the rounds left."""

    run_dir: Path
    arrays: ArrayRecord
    first_round: int  # federation round number of this process' first round
    num_rounds: int  # rounds this process runs
    fingerprint: dict[str, Any]
    checkpoint: Checkpoint | None = None


def resumable_run_dir(cfg: Mapping[str, Any]) -> Path:
    """The run directory ``resume = true`` continues; one line if there is none (a simulation asks
    before it starts Ray)."""
    if not cfg["run-name"]:
        raise ConfigError("resume = true needs run-name = <name of the run directory under run-dir> to resume")
    run_dir = Path(cfg["run-dir"]) / str(cfg["run-name"])
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory to resume")
    if not (run_dir / CHECKPOINT_NAME).is_file():
        load_checkpoint(run_dir)  # its one-line refusal
    return run_dir


def _refuse_moving_default_ledgers(cfg: Mapping[str, Any], run_dir: Path) -> None:
    """A deployed partner without node config ``ledger-path`` keeps its ledger at ``<run-dir>/<run>/ledgers/`` on
    its own machine (``ledger-dir`` unset). ``run-dir`` may change on resume (it says where, not what), but
    under another one such a partner found no ledger and spent this run's whole budget again (9.32 against a
    target of 8, by Opacus over both ledgers: a red-team review)."""
    if cfg.get("ledger-dir") or not uses_local_dp(dp_mode(cfg)):
        return
    try:
        started = json.loads((run_dir / "config.json").read_text()).get("run-dir")
    except (OSError, ValueError, AttributeError):
        return  # no record of where it started: the checkpoint alone is checked
    if started is not None and str(started) != str(cfg["run-dir"]):
        raise ConfigError(f"run-dir = {str(cfg['run-dir'])!r}: {run_dir.name} started with run-dir = {str(started)!r}, "
                          "and a deployed partner without node config ledger-path keeps its privacy ledger under "
                          "run-dir on its own machine: under another one it would spend this run's budget again from "
                          f"zero; resume with run-dir = {str(started)!r} (a symbolic link can stand for a moved folder)")


def run_fingerprint(cfg: Mapping[str, Any], catalogue: np.ndarray, model: torch.nn.Module) -> dict[str, Any]:
    """The fingerprint a checkpoint of this config, catalogue and initial model carries (and a resume must match)."""
    return fingerprint(cfg, catalogue, model.state_dict(), table_record(model, cfg, catalogue))


def resumable_checkpoint(cfg: Mapping[str, Any], fp: Mapping[str, Any]) -> tuple[Path, Checkpoint]:
    """The run directory and verified checkpoint ``resume = true`` continues from, for a run whose
    model, catalogue and config have fingerprint ``fp``; one line naming what does not fit.
    Writes nothing there (``fedrec-server check`` asks it before ``flwr run``)."""
    run_dir = resumable_run_dir(cfg)
    ckpt = load_checkpoint(run_dir)
    check_compatible(ckpt.fingerprint, fp, run_dir / CHECKPOINT_NAME)
    _refuse_moving_default_ledgers(cfg, run_dir)
    if [line.get("round") for line in ckpt.rounds] != list(range(1, ckpt.round + 1)):
        raise CheckpointError(f"{run_dir / CHECKPOINT_NAME}: metrics for rounds 1..{ckpt.round} are incomplete")
    if int(cfg["num-server-rounds"]) < ckpt.round:  # equal: finishes the write-up of a run that ended mid-way
        raise ConfigError(f"num-server-rounds = {cfg['num-server-rounds']}: {run_dir} already completed round "
                          f"{ckpt.round}; resume with num-server-rounds {ckpt.round} (finish its files) or more "
                          "(continue it)")
    return run_dir, ckpt


def start_run(cfg: Mapping[str, Any], catalogue: np.ndarray, model: torch.nn.Module) -> RunStart:
    """A fresh run, or the continuation of ``run-dir/run-name`` when ``resume`` is set."""
    state = model.state_dict()
    fp = run_fingerprint(cfg, catalogue, model)
    total = int(cfg["num-server-rounds"])
    if not cfg["resume"]:
        run_dir = new_run_dir(cfg["run-dir"], cfg["run-name"])
        return RunStart(run_dir, ArrayRecord(state), 1, total, fp)
    run_dir, ckpt = resumable_checkpoint(cfg, fp)
    ensure_private(run_dir)  # 0700, also for a run directory made before new_run_dir did that
    # A crash mid-write leaves its temporary file (common/files.py: .<name>.<pid>.<random>.tmp); this process
    # is the run's only writer now, so none of them is anyone's work in progress
    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    # the summary of the run so far: rewritten when the resumed run ends, so until then the run reads as
    # unfinished (`fedrec-server report` said "complete" after a resume killed before its summary: a review)
    (run_dir / "summary.md").unlink(missing_ok=True)
    _rewrite_metrics(run_dir, ckpt.rounds)
    left = max(total - ckpt.round, 0)
    if left == 0:
        log(WARNING, "%s already completed round %d of %d; nothing left to run", run_dir, ckpt.round, total)
    log(INFO, "resuming %s after round %d: %d round(s) left", run_dir, ckpt.round, left)
    if lost := partner_state_lost_on_resume(cfg):
        log(WARNING, "%s; such partners' rounds after the resume differ from an uninterrupted run's", lost)
    return RunStart(run_dir, ArrayRecord(ckpt.arrays), ckpt.round + 1, left, fp, ckpt)


def partner_state_lost_on_resume(cfg: Mapping[str, Any]) -> str:
    """What partners keep between rounds (never sent, so never checkpointed here) and which of them start
    it again after a resume in a new process; "" when nothing. Simulated partners and deployed partners
    that name a state folder or their ledger (node config ``partner-state-dir``, ``ledger-path``) restore
    it from a file of their own (client/partner_state.py); the coordinator cannot see which kind a
    deployed partner is."""
    kept = []
    if cfg["model"] == "mf":
        kept.append("MF's private user factors")
    if cfg.get("keep-optimizer-state"):
        kept.append("the partners' Adam moments (keep-optimizer-state)")
    if not kept:
        return ""
    return (f"{' and '.join(kept)} start again at deployed partners that set neither partner-state-dir nor ledger-path "
            "(simulated partners and partners with either restore them from their state file)")


def restore(start: RunStart, recorder: RunRecorder, strategy: Strategy, privacy: PrivacyReport | None = None) -> None:
    """Hand a resumed run's history to the recorder and the privacy report (the checkpoint's copy
    of privacy.json where the file is lost) and its learned state to the strategies."""
    if start.checkpoint is None:
        return
    recorder.restore(start.checkpoint.rounds)
    if privacy is not None:
        privacy.adopt_checkpoint_copy((start.checkpoint.privacy or {}).get("privacy.json"))
        if start.num_rounds > 0:  # (a resume that only finishes the files of a finished run sends nothing)
            privacy.note_resumed(start.first_round - 1)
    for level, saved in _by_level(start.checkpoint.strategy_state).items():
        chain = _chain(strategy)
        if level >= len(chain):
            raise CheckpointError(f"checkpointed strategy state for wrapper level {level} has no strategy to go to")
        restore_strategy_state(chain[level], saved)
    validating = _find(strategy, ValidatingStrategy)
    if validating is not None:
        validating.rejections = list(start.checkpoint.rejections)
    if start.checkpoint.rejections:  # a crash between the checkpoint and this file left it behind the checkpoint
        write_rejections(start.run_dir, list(start.checkpoint.rejections))


def write_rejections(run_dir: Path, rejections: list[dict[str, Any]]) -> None:
    """``rejections.json``: every rejected update so far (0600: it names partners' nodes)."""
    write_private_bytes(run_dir / "rejections.json", json.dumps(rejections, indent=1).encode())


class RoundCheckpointer:
    """Plugs into ``Strategy.start`` as ``evaluate_fn``: records each round, then checkpoints it.

    Flower calls it with this process' round numbers (0 = before training, ignored); the
    :class:`RoundControl` turns them into the federation's.
    """

    def __init__(self, start: RunStart, recorder: RunRecorder, strategy: RoundControl, cfg: Mapping[str, Any]) -> None:
        self.start = start
        self.recorder = recorder
        self.strategy = strategy
        self.cfg = cfg

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:
            return None
        server_round = self.strategy.federation_round(local_round)
        self.recorder.end_round(server_round, arrays)
        validating = _find(self.strategy, ValidatingStrategy)
        rejections = list(validating.rejections) if validating else []
        ckpt = Checkpoint(
            round=server_round,
            arrays=arrays.to_torch_state_dict(),
            fingerprint=self.start.fingerprint,
            strategy_state=_all_state(self.strategy),
            rounds=list(self.recorder.rounds),
            privacy=privacy_summary(self.start.run_dir, self.recorder.rounds, self.cfg),
            rejections=rejections,
        )
        save_checkpoint(self.start.run_dir, ckpt)
        if rejections:
            write_rejections(self.start.run_dir, rejections)
        return None


def privacy_summary(run_dir: Path, rounds: list[dict[str, Any]], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy spent so far: worst-partner (epsilon, delta) per round, plus privacy.json if written."""
    summary: dict[str, Any] = {
        "dp": bool(cfg.get("dp")),
        "dp-mode": cfg.get("dp-mode"),
        "epsilon-by-round": [line.get("epsilon") for line in rounds],
        "delta": rounds[-1].get("delta") if rounds else None,
    }
    report = run_dir / "privacy.json"
    if report.is_file():
        try:
            summary["privacy.json"] = json.loads(report.read_text())
        except (OSError, json.JSONDecodeError):
            summary["privacy.json"] = None  # being rewritten right now; the next round's checkpoint has it
    return summary


# -- strategy chains -------------------------------------------------------------------------
def _chain(strategy: Strategy) -> list[Strategy]:
    """The wrapper chain, outermost first (ours hold ``inner``, Flower's DP wrappers ``strategy``)."""
    chain = [strategy]
    while True:
        inner = getattr(chain[-1], "inner", None) or getattr(chain[-1], "strategy", None)
        if not isinstance(inner, Strategy):
            return chain
        chain.append(inner)


def _find(strategy: Strategy, kind: type) -> Any:
    return next((s for s in _chain(strategy) if isinstance(s, kind)), None)


def _all_state(strategy: Strategy) -> dict[str, dict[str, np.ndarray]]:
    """Learned arrays of every level of the chain, keyed ``"<level>.<attribute>"``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for level, s in enumerate(_chain(strategy)):
        for name, arrays in strategy_state(s).items():
            out[f"{level}.{name}"] = arrays
    return out


def _by_level(state: Mapping[str, Mapping[str, np.ndarray]]) -> dict[int, dict[str, Mapping[str, np.ndarray]]]:
    out: dict[int, dict[str, Mapping[str, np.ndarray]]] = {}
    for key, arrays in state.items():
        level, _, name = key.partition(".")
        out.setdefault(int(level), {})[name] = arrays
    return out


def _rewrite_metrics(run_dir: Path, rounds: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line) + "\n" for line in rounds)
    write_private_bytes(run_dir / "metrics.jsonl", text.encode())
