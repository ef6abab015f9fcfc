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
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch

from client.privacy_ledger import Calibration, PrivacyLedger
from client.recommend import load_global_model
from common.data.event_store import is_event_store, store_identity
from common.config import DEFAULTS
from common.data.loaders import load_interactions, resolve_data_path
from common.data.sequences import build_sequences
from common.item_text import table_record
from common.errors import ConfigError, FedRecError, PrivacyError
from common.metrics import evaluate_ranking, means_from_sums
from common.privacy import default_delta, epsilon_of, refuse_meaningless_delta, steps_per_epoch
from common.files import PRIVATE_MODE, refuse_existing, refuse_overwriting_inputs, write_file
from common.task import NAMED, with_data_identity
from common.training import DPSettings, refuse_non_sequence_model, train_local, user_count_for_training
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
    objective = objective_options({**DEFAULTS, **gm.config})  # files older than a knob: its default
    objective.update({k: v for k, v in (("exclude_seen", exclude_seen), ("shuffle_ties", shuffle_ties)) if v is not None})
    since = int(gm.version) if since is None else int(since)
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
    recent = data.subset(rows, name=f"{data.name} (events since {since})")
    max_len = gm.max_len
    orders = int(gm.config.get("tie-orders", DEFAULTS["tie-orders"]))  # scored as federated evaluation scores

    # The global model's quality on these users, for the separate report
    before = means_from_sums(evaluate_ranking(gm.model, recent, split="test", max_len=max_len, tie_orders=orders))
    tuned = copy.deepcopy(gm.model)

    ledger = None
    settings = None
    users = user_count_for_training(recent)
    delta = target_delta or default_delta(user_count_for_training(data))
    if dp:
        refuse_meaningless_delta(delta, user_count_for_training(data))  # it would re-account the whole ledger
        rate, steps = steps_per_epoch(users, batch_size)
        planned = (noise_multiplier, rate, epochs * steps)
        ledger = PrivacyLedger(ledger_path, data.fingerprint(), create=True, named=data.identity.startswith(NAMED))
        if ledger.created:  # a mistyped --ledger-path would otherwise check an empty budget in silence
            print(f"warning: new privacy ledger {ledger_path} (no spend recorded before); if this partner "
                  "already trained, give the ledger its federated training uses", file=sys.stderr)
        try:  # the ledger is locked while open: close it on every way out but training
            if target_epsilon is None:  # a partner budgeted at 2 by its runs could fine-tune on to 8 before
                target_epsilon = min(ledger.target_epsilons(), default=DEFAULT_TARGET_EPSILON)
            delta = ledger.accounting_delta(delta)  # ... and at the smallest delta its runs promised
            spent = ledger.epsilon(delta, ACCOUNTANT)
            after = ledger.epsilon(delta, ACCOUNTANT, extra=[planned])
            if after > target_epsilon:
                raise PrivacyError(f"budget exhausted: epsilon {spent:.3f} of {target_epsilon:g} spent; this "
                                   f"fine-tune ({epochs} epoch(s), {users} users, noise {noise_multiplier:g}) "
                                   f"would reach {after:.3f} "
                                   f"(ledger {ledger_path}); raise --noise-multiplier or wait for a new budget")
        except BaseException:
            ledger.close()
            raise
        settings = DPSettings(noise_multiplier, max_grad_norm, ACCOUNTANT, "auto")
    # Unique: two fine-tunes within one second shared a name and the second failed after training
    run = f"finetune-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    try:
        result = train_local(tuned, recent, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                             max_len=max_len, dp=settings, seed=seed, **objective)
        if ledger is not None:
            # Recorded before the model is written: every released fine-tuned model is on the ledger
            ledger.save_calibration(run, Calibration(noise_multiplier, target_epsilon, delta, ACCOUNTANT,
                                                     planned[1], planned[2], 1))
            ledger.record(run=run, server_round=0, mechanisms=result.mechanisms, accountant=ACCOUNTANT)
            total = ledger.epsilon(delta, ACCOUNTANT)
    finally:
        if ledger is not None:
            ledger.close()

    after_metrics = means_from_sums(evaluate_ranking(tuned, recent, split="test", max_len=max_len, tie_orders=orders))
    report = {
        "global-model": str(gm.path),
        "finetuned-model": str(out_path),
        "since": since,
        "users": len(rows),
        "train-users": users,
        "epochs": epochs,
        "steps": result.steps,
        "train-loss": result.loss,
        "global": {"hr@10": before.get("hr@10", 0.0), "ndcg@10": before.get("ndcg@10", 0.0)},
        "finetuned": {"hr@10": after_metrics.get("hr@10", 0.0), "ndcg@10": after_metrics.get("ndcg@10", 0.0)},
        "dp": dp,
        "noise-multiplier": noise_multiplier if dp else 0.0,
        # None (JSON null) without DP: no guarantee; Infinity is not JSON that strict parsers read
        "epsilon-finetune": epsilon_of(result.mechanisms, delta, ACCOUNTANT) if dp else None,
        "epsilon-ledger": total if dp else None,
        "target-epsilon": target_epsilon if dp else None,
        "delta": delta if dp else None,
        "ledger": str(ledger_path) if dp else None,
        "ledger-run": run if dp else None,
        "ledger-created": bool(ledger is not None and ledger.created),
    }
    buf = io.BytesIO()
    text = table_record(tuned, gm.config, gm.catalogue)  # checked when the file is served (client/recommend.py)
    torch.save({"state_dict": tuned.state_dict(), "catalogue": gm.catalogue.tolist(), "config": gm.config,
                "finetune": report, **({"item-text": text} if text else {})}, buf)
    write_file(out_path, buf.getvalue(), mode=PRIVATE_MODE, force=True)  # trained on private data; checked above
    return report


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
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {out}: cannot write to {parent}")
    refuse_existing([out], force=force, hint="an earlier fine-tuned model")
