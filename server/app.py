"""ServerApp: aggregates partners' (DP-SGD) updates with the configured strategy (``aggregation``:
fedavg, fedprox, fedadam, median, trimmed-mean or krum; server/strategy_factory.py), with
federated full-ranking evaluation."""

from __future__ import annotations

import dataclasses
import secrets
from logging import ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.config import ignored_knobs, resolve_config
from common.data.catalogue import catalogue_fingerprint
from common.item_text import local_text_key, table_fingerprint, table_record, table_sketch
from common.private_evaluation import refuse_unaffordable_evaluations
from common.provenance import append_provenance, run_token
from common.models.sasrec import tied_key_groups
from common.task import catalogue, new_model
from common.privacy import default_delta, dp_mode, uses_central_dp
from common.text_init import describe_text_start, initialise_from_text, untied_output_note
from server.central_dp import central_delta, with_privacy
from server.item_init import check_catalogue_size, cooccurrence_start
from server.item_prior import popularity_prior
from server.late_replies import LateReplyGrid
from server.privacy_report import PrivacyReport
from server.resume import RoundCheckpointer, restore, start_run
from server.run_report import RunRecorder
from server.secure_aggregation import with_secure_aggregation
from server.strategy_factory import build_strategy, check_strategy_config


def initial_model(cfg: dict) -> tuple[np.ndarray, torch.nn.Module, dict | None]:
    """The agreed catalogue and the initial global model over it, after refusing (one line each)
    what the strategy cannot run: every check the ServerApp makes before its run directory exists,
    also run by ``fedrec-server check`` before ``flwr run``. The third value is the ``init-model``
    record (None for fresh weights, and on resume, which starts from its checkpoint)."""
    items = catalogue(cfg)
    model = new_model(cfg, len(items))
    check_run_config(cfg)
    if cfg["item-features"] in ("text", "id+text") or cfg["item-init"] == "text":
        from common.item_text import published_texts_mismatch

        if warning := published_texts_mismatch(cfg, items):
            log(WARNING, "%s", warning)
    if cfg["item-init"] == "cooccurrence":
        check_catalogue_size(len(items))  # each partner's table grows with its square
    start = None
    if cfg["init-model"] and not cfg["resume"]:
        from server.warm_start import warm_start

        start = warm_start(model, items, cfg)
        grown = f" + {start['added-items']} new items" if start["added-items"] else ""
        log(INFO, "init-model: starting from %s (%d items%s; trained with dp-mode %s)", start["path"],
            start["items"], grown, start["dp-mode"])
        if start["dp-mode"] not in ("local", "both") or not start["guarantee"]:
            log(WARNING, "init-model %s (dp-mode %s%s): what it learned from its training data is not covered "
                "by this run's guarantee (privacy.json says so)", start["path"], start["dp-mode"],
                "" if start["guarantee"] else ", no privacy.json beside it")
    return items, model, start


def check_run_config(cfg: dict) -> None:
    """Refuse (one line each) a run config the strategy cannot run; needs neither catalogue nor model, so a
    simulation runs it before Ray starts (simulations/preflight.py)."""
    check_strategy_config(cfg)
    if uses_central_dp(dp_mode(cfg)):
        central_delta(cfg)  # a delta of 1 / partners or more is refused before the run starts
    # noised evaluations that alone spend the budget: refused here (partners would refuse every round), at the
    # largest delta a partner can default to, which gives the smallest epsilon
    refuse_unaffordable_evaluations(cfg, float(cfg["target-delta"]) or default_delta(1))


def _dataset_text(dataset: str) -> str:
    """The run's ``dataset`` as an absolute path when it is one here (config.json keeps it as given)."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if dataset != "synthetic" and path.exists() else dataset


def partner_state_keys(run_token: str | None, resumed_after: int) -> dict[str, str | int]:
    """What partners take their saved round-to-round state by (client/partner_state.py): the run's token
    (None when a resumed run's provenance.json lost it: nothing is restored then), this start's token (state
    saved since this start counts), and the last round the resumed checkpoint holds (0: a fresh run)."""
    return {"run-token": run_token or "", "server-start": secrets.token_hex(16), "resumed-after": resumed_after}


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp whose config is pyproject defaults + run config + ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(context.run_config, overrides)
        if ignored := ignored_knobs(cfg):
            verb = "changes" if len(ignored) == 1 else "change"
            log(WARNING, "%s %s nothing in this run (model = %s, item-features = %s%s, aggregation = %s, "
                "partitioning = %s)", ", ".join(ignored), verb, cfg["model"], cfg["item-features"],
                ", published item-text-features" if cfg["item-text-features"] else "", cfg["aggregation"],
                cfg["partitioning"])

        items, model, start_model = initial_model(cfg)  # before a run directory exists
        fingerprint = catalogue_fingerprint(items)
        # Every round names the inputs partners must hold: the catalogue, and a published features file's table
        # (encoded locally, texts may differ in the last bits between machines: only the published file is checked)
        text = table_fingerprint(model) if cfg["item-text-features"] else None
        same_inputs = {"catalogue-fingerprint": fingerprint, **({"item-text-fingerprint": text} if text else {})}
        if not text and (sketch := table_sketch(model)) is not None:  # encoded here: texts exactly, vectors roughly
            same_inputs.update({"item-text-key": local_text_key(cfg), "item-text-sketch": sketch})
        # A fresh run directory, or the last checkpoint of run-name when resume = true (server/resume.py)
        item_start = {}
        if cfg["item-init"] == "cooccurrence" and not cfg["resume"]:  # a resume continues its checkpoint's weights
            item_start = cooccurrence_start(grid, cfg, model, same_inputs)  # before start_run takes the weights
        elif cfg["item-init"] == "text" and not cfg["resume"]:  # public texts: no partner is asked
            item_start = initialise_from_text(model, cfg, items)
            log(INFO, "%s", describe_text_start(item_start))
            if note := untied_output_note(cfg):
                log(WARNING, "%s", note)
        start = start_run(cfg, items, model)
        run_dir = start.run_dir
        privacy = PrivacyReport(run_dir, cfg)
        if cfg["item-prior"] == "popularity" and start.checkpoint is None:  # a resume keeps its checkpoint's offsets
            # asked under the run directory's name: partners record its spend under the run their rounds use
            item_start.update(popularity_prior(grid, cfg, model, run_dir.name, same_inputs, privacy))
            start = dataclasses.replace(start, arrays=ArrayRecord(model.state_dict()))
        recorder = RunRecorder(run_dir, cfg, items, top_k=int(cfg["top-k"]), text_table=table_record(model, cfg, items))
        # code, versions and command of this start (a resume appends its own): provenance.json
        # a fresh run's first entry carries the run-token partners key their round-to-round state by
        token = run_token(run_dir) if start.checkpoint else secrets.token_hex(16)
        append_provenance(run_dir, **{"first-round": start.first_round, "catalogue-fingerprint": fingerprint,
                                      "dataset (simulated partners)": _dataset_text(str(cfg["dataset"])),
                                      **item_start,
                                      **({} if start.checkpoint else {"run-token": token})})
        same_inputs.update(partner_state_keys(token, start.first_round - 1))
        if start_model is not None:
            privacy.note_start_model(start_model)
        log(INFO, "run directory: %s", run_dir)

        # Aggregation (fedavg, fedadam, median, ...) under update validation and bounded node waits
        # (server/strategy_factory.py); evaluation sums are combined exactly by the recorder.
        # Privacy (server/central_dp.py): log partners that refuse (budget), central DP if configured
        strategy = build_strategy(
            cfg, first_round=start.first_round,
            train_metrics_aggr_fn=recorder.aggregate_train_metrics,
            evaluate_metrics_aggr_fn=recorder.aggregate_evaluate_metrics,
            wrap_aggregation=lambda inner: with_privacy(inner, cfg, privacy,  # buffers: public, never trained
                                                        public=[name for name, _ in model.named_buffers()]),
            tied=tied_key_groups(model),  # one table again after per-copy noise (server/rounds.py: retie)
            on_unaggregated=privacy.note_unaggregated,  # a rejected update was still released
            on_rejected_evaluation=lambda r, m: privacy.note_evaluation(r, [m]),  # noised sums spent budget too
        )
        # SecAgg+ (server/secure_aggregation.py): below round control, so everything under it sees only the sum
        strategy.inner = with_secure_aggregation(strategy.inner, cfg)
        restore(start, recorder, strategy, privacy)
        # Replies after round-timeout still released an update: the privacy report lists them
        noised = float(cfg["evaluation-noise-multiplier"]) > 0  # noised evaluation replies spend budget too
        grid = LateReplyGrid(grid, privacy.note_late, privacy.note_unanswered,
                             on_late_evaluation=(lambda r, m: privacy.note_evaluation(r, [m])) if noised else None)
        strategy.start(
            grid=grid,
            initial_arrays=start.arrays,
            num_rounds=start.num_rounds,
            timeout=float(cfg["round-timeout"]),
            # run-name names the run in partners' ledgers; partners refuse another catalogue (client/app.py)
            train_config=ConfigRecord({"run-name": run_dir.name, **same_inputs}),
            evaluate_config=ConfigRecord({"run-name": run_dir.name, **same_inputs}),  # noised sums: same ledger run
            evaluate_fn=RoundCheckpointer(start, recorder, strategy, cfg),  # records, then checkpoints
        )
        grid.finish()
        if recorder.rounds and not any(r.get("num-partners") for r in recorder.rounds):
            log(ERROR, "no round aggregated an update: %s is the initial model (see the refusals and rejected "
                "updates above)", run_dir / "model.pt")
        log(INFO, "privacy report: %s", privacy.write())
        sources = [str(p["data-source"]) for p in privacy.partners.values() if p.get("data-source")]
        log(INFO, "summary: %s", recorder.write_summary(guarantee=privacy.guarantee(), data_sources=sources))
        try:
            from server.run_plots import plot_rounds

            for path in plot_rounds(run_dir, recorder.rounds, recorder.top_k):
                log(INFO, "plot: %s", path)
        except Exception as exc:  # noqa: BLE001 -- a plot is a convenience: never fail a finished run for it
            log(WARNING, "plots not drawn (%s: %s); metrics.jsonl has every number", type(exc).__name__, exc)

    return app


app = make_server_app()
