"""Incremental update: a partner fine-tunes the global model on its newest events, between rounds.

The fine-tuned model stays with the partner (it serves its own users; nothing is sent to
the federation) and is reported separately from the global model: HR@10/NDCG@10 of both
on the fine-tuned users' held-out last items. Training is DP-SGD (one sample = one user's
whole history) and its mechanisms go to the partner's **same** privacy ledger as its
federated rounds, so the partner's whole-ledger epsilon covers both; a fine-tune that
would push the ledger past ``target_epsilon`` is refused before it runs, and it leaves
that much less budget for later rounds (whose pre-round check sees the same ledger).

Units: ``since`` unix seconds; epsilon/delta as in (epsilon, delta)-DP per user.
"""

from __future__ import annotations

import copy
import io
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from client.privacy_ledger import Calibration, PrivacyLedger
from client.recommend import GlobalModel, load_global_model
from common.data.event_store import is_event_store, store_identity
from common.config import DEFAULTS
from common.data.loaders import load_interactions, resolve_data_path
from common.data.sequences import SequenceData, build_sequences
from common.item_text import table_record
from common.errors import ConfigError, FedRecError, PrivacyError
from common.metrics import evaluate_ranking, means_from_sums
from common.privacy import (Mechanism, default_delta, epsilon_of, refuse_meaningless_delta, stated_epsilon,
                            steps_per_epoch)
from common.files import (PRIVATE_MODE, refuse_existing, refuse_overwriting_inputs, refuse_unwritable_folder,
                          write_file)
from common.task import NAMED, with_data_identity
from common.training import (DPSettings, TrainResult, refuse_non_sequence_model, train_local,
                             user_count_for_training)
from common.objectives import objective_options

ACCOUNTANT = "rdp"
DEFAULT_TARGET_EPSILON = 8.0  # a ledger no run has calibrated yet (the federation's default target)


def finetune_partner(*, model: str | os.PathLike, data_path: str | os.PathLike, ledger_path: str | os.PathLike,
                     out: str | os.PathLike | None = None, since: int | None = None, epochs: int = 1,
                     batch_size: int = 16, learning_rate: float = 1e-3, noise_multiplier: float = 1.0,
                     target_epsilon: float | None = None, target_delta: float = 0.0, max_grad_norm: float = 1.0,
                     dp: bool = True, seed: int = 0, exclude_seen: bool | None = None,
                     shuffle_ties: bool | None = None, force: bool = False, data_identity: str = "") -> dict[str, Any]:
    """Fine-tune ``model`` on the users of ``data_path`` with events at or after ``since``
    (default: the model file's time) and write it to ``out``; returns the report.

    ``exclude_seen``/``shuffle_ties``: ``None`` takes the global model's own run settings
    (``exclude-seen``, ``shuffle-ties`` in its config; the defaults for older files), so the
    fine-tune continues the objective the model was trained with. ``target_epsilon`` ``None``: the
    strictest target of the runs on the ledger (8 for a new ledger), never a looser default.

    Raises :class:`PrivacyError` when the ledger has no room for it (or too few recent users
    for ``batch_size``), :class:`DataError` for a bad model or log, :class:`ConfigError` for an
    ``out`` that exists (unless ``force``), is a directory or is one of the inputs: all checked
    before anything is trained or recorded in the ledger.
    """
    out_path = Path(out) if out else Path(ledger_path).with_name("partner-finetuned.pt")
    _check_out_path(out_path, inputs=(model, data_path, ledger_path), force=force)
    if dp and not Path(ledger_path).parent.is_dir():  # a mistyped path made its folders and a zero-spend ledger (a review)
        raise PrivacyError(f"--ledger-path {ledger_path}: the folder {Path(ledger_path).parent} does not exist; give the "
                           "ledger the SuperNode uses (its node config ledger-path)")
    gm = load_global_model(model)
    refuse_non_sequence_model(gm.model, f"finetune {gm.path}")  # before the ledger is touched
    objective = _objective(gm.config, exclude_seen=exclude_seen, shuffle_ties=shuffle_ties)
    since = int(gm.version) if since is None else int(since)
    data, recent, recent_count = _recent_users_data(gm, data_path, since, data_identity)
    orders = int(gm.config.get("tie-orders", DEFAULTS["tie-orders"]))  # scored as federated evaluation scores

    # The global model's quality on these users, for the separate report
    before = _hr_ndcg(gm.model, recent, gm.max_len, orders)
    tuned = copy.deepcopy(gm.model)

    users = user_count_for_training(recent)
    delta = target_delta or finetune_default_delta(user_count_for_training(data))
    spend = None
    if dp:
        refuse_meaningless_delta(delta, user_count_for_training(data))  # it would re-account the whole ledger
        rate, steps = steps_per_epoch(users, batch_size)
        spend = _check_budget(ledger_path, data, (noise_multiplier, rate, epochs * steps), delta=delta,
                              target_epsilon=target_epsilon,
                              what=f"{epochs} epoch(s), {users} users, noise {noise_multiplier:g}")
    settings = DPSettings(noise_multiplier, max_grad_norm, ACCOUNTANT, "auto") if dp else None
    # Unique: two fine-tunes within one second shared a name and the second failed after training
    run = f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    result = _train_and_record(tuned, recent, spend, run, epochs=epochs, batch_size=batch_size,
                               learning_rate=learning_rate, max_len=gm.max_len, dp=settings, seed=seed, **objective)

    report = {
        "global-model": str(gm.path),
        "finetuned-model": str(out_path),
        "since": since,
        "users": recent_count,
        "train-users": users,
        "epochs": epochs,
        "steps": result.steps,
        "train-loss": result.loss,
        "global": before,
        "finetuned": _hr_ndcg(tuned, recent, gm.max_len, orders),
        **_privacy_fields(spend, result, noise_multiplier=noise_multiplier, ledger_path=ledger_path, run=run),
    }
    _save_finetuned(out_path, tuned, gm, report)
    return report


def _objective(config: dict[str, Any], *, exclude_seen: bool | None, shuffle_ties: bool | None) -> dict[str, Any]:
    """The global model's own objective settings (its config's), but for those given here."""
    objective = objective_options({**DEFAULTS, **config})  # files older than a knob: its default
    given = (("exclude_seen", exclude_seen), ("shuffle_ties", shuffle_ties))
    objective.update({k: v for k, v in given if v is not None})
    return objective


def _recent_users_data(gm: GlobalModel, data_path: str | os.PathLike, since: int,
                       data_identity: str) -> tuple[SequenceData, SequenceData, int]:
    """The partner's data set, its users with events at or after ``since``, and how many they are."""
    log = load_interactions(data_path)
    # The same data set (and fingerprint) as the partner's supernode builds for its ledger
    data = build_sequences(log, gm.catalogue)
    if is_event_store(data_path):
        data.identity = store_identity(resolve_data_path(data_path))
    data = with_data_identity(data, str(data_path), data_identity)  # node config data-identity, if the partner set one
    recent_users = set(log.user[log.timestamp >= since].tolist())
    rows = [u for u, uid in enumerate(data.user_ids.tolist()) if uid in recent_users]
    if not rows:
        raise PrivacyError(f"{data_path}: no user has events at or after {since} (unix seconds); nothing to fine-tune")
    return data, data.subset(rows, name=f"{data.name} (events since {since})"), len(rows)


def _hr_ndcg(model: torch.nn.Module, recent: SequenceData, max_len: int, orders: int) -> dict[str, float]:
    """HR@10 and NDCG@10 on ``recent``'s held-out last items."""
    means = means_from_sums(evaluate_ranking(model, recent, split="test", max_len=max_len, tie_orders=orders))
    return {"hr@10": means.get("hr@10", 0.0), "ndcg@10": means.get("ndcg@10", 0.0)}


def finetune_default_delta(users: int) -> float:
    """``default_delta(users)`` rounded down to a power of ten. It becomes a calibration row, and a SuperNode's
    later replies state the ledger's smallest delta: 0.1 / users from the exact count told the coordinator that
    count (a red-team review); a power of ten says only its order of magnitude, which the noised count says
    anyway, and a smaller delta is only stricter."""
    return 10.0 ** math.floor(math.log10(default_delta(users)) + 1e-9)


@dataclass
class _LedgerSpend:
    """A DP fine-tune's place on the partner's ledger, checked against its budget before training."""

    ledger: PrivacyLedger  # open (locked) until the fine-tune is recorded
    planned: Mechanism  # (noise multiplier, sample rate, steps)
    target_epsilon: float
    delta: float  # the smallest a run on the ledger promised
    total: float | None = None  # the ledger's epsilon with the fine-tune recorded
    fresh: bool = False  # the ledger held no spend before this fine-tune (new, or left empty by a refusal)


def _check_budget(ledger_path: str | os.PathLike, data: SequenceData, planned: Mechanism, *, delta: float,
                  target_epsilon: float | None, what: str) -> _LedgerSpend:
    """Open the partner's ledger and refuse a fine-tune (``what``, spending ``planned``) that would pass its budget."""
    ledger = PrivacyLedger(ledger_path, data.fingerprint(), create=True, named=data.identity.startswith(NAMED),
                           adopt=data.content_fingerprint() if data.identity else "")
    # A mistyped --ledger-path would otherwise check an empty budget in silence; also when a refused attempt
    # made the ledger and a retry finds it there, empty (a review)
    fresh = ledger.created or ledger.spend_marks() == 0
    if fresh:
        print(f"warning: {'new privacy ledger' if ledger.created else 'privacy ledger'} {ledger_path} holds no "
              "spend yet; if this partner already trained, give the ledger its federated training uses",
              file=sys.stderr)
    try:  # the ledger is locked while open: close it on every way out but training
        cap = ledger.max_epsilon()  # the SuperNode's node config max-epsilon caps every spend on its ledger
        if target_epsilon is not None and cap is not None and target_epsilon > cap:
            raise PrivacyError(f"--target-epsilon {target_epsilon:g} is above this partner's max-epsilon {cap:g} "
                               f"(its SuperNode's node config, recorded in ledger {ledger_path}): a fine-tune spends "
                               "from the same budget; give at most that")
        if target_epsilon is None:  # a partner budgeted at 2 by its runs could fine-tune on to 8 before
            target_epsilon = min([*ledger.target_epsilons(), *([cap] if cap is not None else [])],
                                 default=DEFAULT_TARGET_EPSILON)
        delta = ledger.accounting_delta(delta)  # ... and at the smallest delta its runs promised
        spent = ledger.epsilon(delta, ACCOUNTANT)
        after = ledger.epsilon(delta, ACCOUNTANT, extra=[planned])
        if after > target_epsilon:
            raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(spent)} of {target_epsilon:g} spent; this "
                               f"fine-tune ({what}) would reach {after:.3f} "
                               f"(ledger {ledger_path}); raise --noise-multiplier or wait for a new budget")
    except BaseException:
        ledger.close()
        raise
    return _LedgerSpend(ledger, planned, target_epsilon, delta, fresh=fresh)


def _train_and_record(tuned: torch.nn.Module, recent: SequenceData, spend: _LedgerSpend | None, run: str,
                      **train_options: Any) -> TrainResult:
    """Train ``tuned`` in place; with DP record the spend as ledger run ``run`` and close the ledger."""
    try:
        result = train_local(tuned, recent, **train_options)
        if spend is not None:
            noise_multiplier, rate, steps = spend.planned
            # Recorded before the model is written: every released fine-tuned model is on the ledger
            spend.ledger.save_calibration(run, Calibration(noise_multiplier, spend.target_epsilon, spend.delta,
                                                           ACCOUNTANT, rate, steps, 1))
            spend.ledger.record(run=run, server_round=0, mechanisms=result.mechanisms, accountant=ACCOUNTANT)
            spend.total = spend.ledger.epsilon(spend.delta, ACCOUNTANT)
    finally:
        if spend is not None:
            spend.ledger.close()
    return result


def _privacy_fields(spend: _LedgerSpend | None, result: TrainResult, *, noise_multiplier: float,
                    ledger_path: str | os.PathLike, run: str) -> dict[str, Any]:
    """The report's privacy part: what the fine-tune spent and where it is recorded."""
    dp = spend is not None
    return {
        "dp": dp,
        "noise-multiplier": noise_multiplier if dp else 0.0,
        # None (JSON null) without DP: no guarantee; Infinity is not JSON that strict parsers read
        "epsilon-finetune": epsilon_of(result.mechanisms, spend.delta, ACCOUNTANT) if dp else None,
        "epsilon-ledger": spend.total if dp else None,
        "target-epsilon": spend.target_epsilon if dp else None,
        "delta": spend.delta if dp else None,
        "ledger": str(ledger_path) if dp else None,
        "ledger-run": run if dp else None,
        "ledger-created": bool(dp and spend.fresh),  # no spend before this fine-tune
    }


def _save_finetuned(out_path: Path, tuned: torch.nn.Module, gm: GlobalModel, report: dict[str, Any]) -> None:
    """The fine-tuned model file, in the global model's format with the report beside the weights."""
    buf = io.BytesIO()
    text = table_record(tuned, gm.config, gm.catalogue)  # checked when the file is served (client/recommend.py)
    torch.save({"state_dict": tuned.state_dict(), "catalogue": gm.catalogue.tolist(), "config": gm.config,
                "finetune": report, **({"item-text": text} if text else {})}, buf)
    write_file(out_path, buf.getvalue(), mode=PRIVATE_MODE, force=True)  # trained on private data; checked above


def _files_read(p: Path) -> set[Path]:
    """The files an input path stands for: itself, or in a folder the log the loader reads there and
    every model a run folder holds (a review: --force wrote over a folder's u.data and a run's model.pt)."""
    out = {p.resolve()}
    if p.is_dir():
        from common.data.loaders import log_files

        out |= {f.resolve() for f in p.glob("model.pt")} | {f.resolve() for f in p.glob("*/model.pt")}
        try:
            out |= {f.resolve() for f in log_files(p)}
        except FedRecError:
            pass  # not a data folder
    return out


def _check_out_path(out: Path, *, inputs: tuple, force: bool) -> None:
    """Refuse an ``out`` that would lose something, before the fine-tune spends any budget: one of
    the inputs (the global model, the log, the ledger; never, even with --force), a directory, an
    unwritable folder, or an existing file without ``force``."""
    refuse_overwriting_inputs(out, [f for given in inputs for f in _files_read(Path(given))])
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name, e.g. {out / 'partner-finetuned.pt'}")
    parent = out.parent if str(out.parent) else Path(".")
    # Made and tried now: a folder that could not be made, or written, failed only after the spend was recorded,
    # losing the model the budget paid for (a review: --out /proc/x/out.pt)
    refuse_unwritable_folder(parent, f"--out {out}", "nothing was trained or spent")
    refuse_existing([out], force=force, hint="an earlier fine-tuned model")
