"""ClientApp: local DP-SGD training and full-ranking evaluation on a partner's private log."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import resolve_config
from common.errors import FedRecError
from common.metrics import evaluate_ranking
from common.privacy import calibrate_noise, default_delta, epsilon_of, history_from_json, history_to_json, steps_per_epoch
from common.task import new_model, partner_data
from common.training import DPSettings, pick_device, train_local, user_count_for_training

LOG = logging.getLogger("fedrec.client")
USER_ERROR = 400  # Error code for a problem the partner can fix (data, config, budget)


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp whose config is pyproject defaults + run config + ``overrides``."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        try:
            return _train(msg, context, resolve_config(context.run_config, overrides))
        except FedRecError as exc:
            return Message(Error(code=USER_ERROR, reason=str(exc)), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            return _evaluate(msg, context, resolve_config(context.run_config, overrides))
        except FedRecError as exc:
            return Message(Error(code=USER_ERROR, reason=str(exc)), reply_to=msg)

    return app


def _train(msg: Message, context: Context, cfg: dict) -> Message:
    # Load this partner's data and the global weights
    data = partner_data(cfg, context.node_config)
    device = pick_device(cfg["device"])
    model = new_model(cfg, data.num_items)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    server_round = int(msg.content["config"].get("server-round", 1))

    # Restore the privacy state: every mechanism this partner ever ran
    state = context.state.config_records.get("privacy", ConfigRecord())
    history = history_from_json(str(state.get("history", "[]")))
    dp = None
    delta = 0.0
    if cfg["dp"]:
        users = user_count_for_training(data)
        delta = cfg["target-delta"] or default_delta(users)
        rate, steps = steps_per_epoch(users, int(cfg["batch-size"]))
        planned = int(cfg["num-server-rounds"]) * int(cfg["local-epochs"]) * steps
        # Calibrated once for the whole planned run, then reused every round.
        noise = float(state["noise-multiplier"]) if "noise-multiplier" in state else calibrate_noise(
            target_epsilon=float(cfg["target-epsilon"]), target_delta=delta,
            sample_rate=rate, total_steps=planned, accountant=cfg["accountant"],
        )
        dp = DPSettings(noise, float(cfg["max-grad-norm"]), cfg["accountant"], cfg["grad-sample-mode"])

    # Train (DP-SGD when enabled)
    result = train_local(
        model, data, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
        learning_rate=float(cfg["learning-rate"]), max_len=int(cfg["max-seq-len"]), dp=dp,
        device=device, seed=int(cfg["seed"]) * 1000 + server_round,
    )

    # Account over the whole history, then persist it
    history += result.mechanisms
    epsilon = epsilon_of(history, delta, cfg["accountant"]) if dp else 0.0
    if dp:
        context.state.config_records["privacy"] = ConfigRecord(
            {"history": history_to_json(history), "noise-multiplier": dp.noise_multiplier, "delta": delta}
        )

    # Reply
    metrics = MetricRecord({
        "train-loss": result.loss,
        "num-examples": result.num_examples,
        "epsilon": epsilon,
        "delta": delta,
        "noise-multiplier": dp.noise_multiplier if dp else 0.0,
        "steps": result.steps,
        "seconds": result.seconds,
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": metrics}), reply_to=msg)


def _evaluate(msg: Message, context: Context, cfg: dict) -> Message:
    data = partner_data(cfg, context.node_config)
    device = pick_device(cfg["device"])
    model = new_model(cfg, data.num_items).to(device)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    sums = evaluate_ranking(model, data, split="test", max_len=int(cfg["max-seq-len"]), ks=(int(cfg["top-k"]),), device=device)
    metrics = MetricRecord({**sums, "num-examples": int(sums["num-users"])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


app = make_client_app()
