"""ServerApp: FedAvg over partners' DP-SGD updates with federated full-ranking evaluation."""

from __future__ import annotations

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.config import resolve_config
from common.task import catalogue, new_model
from server.central_dp import with_privacy
from server.privacy_report import PrivacyReport
from server.run_report import RunRecorder, new_run_dir


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """A ServerApp whose config is pyproject defaults + run config + ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(context.run_config, overrides)

        # Build the initial global model over the agreed catalogue
        items = catalogue(cfg)
        model = new_model(cfg, len(items))
        run_dir = new_run_dir(cfg["run-dir"], cfg["run-name"])
        recorder = RunRecorder(run_dir, cfg, items, top_k=int(cfg["top-k"]))
        privacy = PrivacyReport(run_dir, cfg)
        log(INFO, "run directory: %s", run_dir)

        # FedAvg; evaluation sums are combined exactly by the recorder
        min_nodes = int(cfg["min-nodes"])
        strategy = FedAvg(
            fraction_train=float(cfg["fraction-train"]),
            fraction_evaluate=1.0,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes,
            min_available_nodes=min_nodes,
            train_metrics_aggr_fn=recorder.aggregate_train_metrics,
            evaluate_metrics_aggr_fn=recorder.aggregate_evaluate_metrics,
        )
        # Privacy (server/central_dp.py): log partners that refuse (budget), central DP if configured
        strategy = with_privacy(strategy, cfg, privacy)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=int(cfg["num-server-rounds"]),
            timeout=float(cfg["round-timeout"]),
            train_config=ConfigRecord({"run-name": run_dir.name}),  # names the run in partners' ledgers
            evaluate_fn=recorder.end_round,
        )
        log(INFO, "privacy report: %s", privacy.write())
        log(INFO, "summary: %s", recorder.write_summary(guarantee=privacy.guarantee()))

    return app


app = make_server_app()
