"""ClientApp: local DP-SGD training and full-ranking evaluation on a partner's private log."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from time import monotonic, sleep
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log as flwr_log

from client.central_clipping import central_dp_clipping_mod
from client.partner_policy import (apply_partner_policy, check_node_config, check_reply_hold,
                                   refuse_evaluation_unless_shared, reply_after_seconds)
from client.safe_errors import error_reply, sanitising_mod
from client.secure_aggregation import make_secure_aggregation_mod
from common.config import resolve_config
from common.privacy import dp_mode, uses_local_dp

if TYPE_CHECKING:  # for annotations only: importing this module loads neither (see below)
    from torch import nn

    from common.data.sequences import SequenceData

# NOTE: torch, Opacus and pandas are imported inside the handlers. A SuperNode starts one
# ClientApp process per message, and SecAgg+'s key set-up and unmasking messages (three of
# five per round) are answered by Flower's mod without ever reaching a handler.

LOG = logging.getLogger("fedrec.client")
USER_ERROR = 400  # Error code for a problem the partner can fix (data, config, budget)


def make_client_app(overrides: dict | None = None) -> ClientApp:
    """A ClientApp whose config is pyproject defaults + run config + ``overrides``."""
    app = ClientApp(mods=[sanitising_mod])  # no exception text reaches the server (client/safe_errors.py)

    # SecAgg+ outermost: central-DP clipping and DP-SGD happen before the update is masked
    @app.train(mods=[make_secure_aggregation_mod(overrides), central_dp_clipping_mod(overrides)])
    def train(msg: Message, context: Context) -> Message:
        # The partner's own privacy floor (node config max-epsilon/max-delta) over the coordinator's config
        return _answer(msg, context, "training", _train, lambda: apply_partner_policy(
            resolve_config(context.run_config, overrides), context.node_config))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer(msg, context, "evaluation", _evaluate_checked, lambda: checked_config(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:  # item-init = "cooccurrence", item-prior = "popularity"
        # the node config's floors refuse the counts (client/item_counts.py) and cap the histogram's spend
        return _answer(msg, context, "item query", _item_query, lambda: checked_config(context))

    def checked_config(context: Context) -> dict:
        check_node_config(context.node_config)
        return resolve_config(context.run_config, overrides)

    return app


def _answer(msg: Message, context: Context, what: str, handle: Callable[[Message, Context, dict], Message],
            config: Callable[[], dict]) -> Message:
    """``handle``'s reply to ``msg`` under ``config()``, or a sanitised error reply (the server sees
    no exception text: client/safe_errors.py), held for the node's ``reply-after-seconds``; a
    refusal of that hold itself is sent at once (_HOLD_NOTE)."""
    started, hold = monotonic(), True
    try:
        cfg = config()
        hold = False
        check_reply_hold(context.node_config, cfg)
        hold = True
        reply = handle(msg, context, cfg)
    except Exception as exc:  # noqa: BLE001 -- a partner's mistake is one line at the server, never a crash
        reply = error_reply(msg, exc, context)
    return _hold(msg, reply, context, started, what) if hold else reply


def _item_query(msg: Message, context: Context, cfg: dict) -> Message:
    # imported for this message only
    config = msg.content.config_records.get("config")
    if config is not None and config.get("query") == "item-popularity":  # client/item_histogram.py QUERY
        from client.item_histogram import item_histogram_reply

        return item_histogram_reply(msg, context, cfg)
    from client.item_counts import item_counts_reply

    return item_counts_reply(msg, context, cfg)


# _HOLD_NOTE: held, that refusal arrived after round-timeout and the coordinator never saw it (a journey review)


def _hold(msg: Message, reply: Message, context: Context, started: float, work: str) -> Message:
    """``reply``, sent no earlier than node config ``reply-after-seconds`` after the message arrived: its
    arrival time then no longer tells how long the work took (which grows with the number of users). It is
    made again after the hold: a reply's metadata (``created_at``, ``ttl``) is stamped when it is made and
    reaches the coordinator as it is, so the one made before the hold still told the time (a review)."""
    try:
        hold = reply_after_seconds(context.node_config)
    except Exception:  # noqa: BLE001 -- a malformed value: the reply already says so (check_node_config)
        return reply
    if hold is None:
        return reply
    took = monotonic() - started
    # Work longer than the hold (the coordinator sets its size: model, epochs) waits for the next whole multiple
    # of it, so the reply tells only that multiple, not the time itself (a red-team review)
    until = hold * max(1, math.ceil(took / hold))
    if took >= hold:  # Flower's logger: a flwr-clientapp process shows it
        flwr_log(WARNING, "%s took %.1f s, longer than node config reply-after-seconds = %g: the reply waits until "
                 "%g s, which tells the coordinator the work took over %g s; raise reply-after-seconds", work, took,
                 hold, until, until - hold)
    sleep(max(0.0, until - took))
    return Message(reply.error, reply_to=msg) if reply.has_error() else Message(reply.content, reply_to=msg)


def _evaluate_checked(msg: Message, context: Context, cfg: dict) -> Message:
    """Evaluate after the partner's node config checks: what it shares, and its cap when noised sums spend."""
    refuse_evaluation_unless_shared(context.node_config, float(cfg["evaluation-noise-multiplier"]))
    if float(cfg["evaluation-noise-multiplier"]) > 0:  # spends from the ledger: the same budget as training
        cfg = apply_partner_policy(cfg, context.node_config)
    else:
        _warn_clear_evaluation_once(cfg, context)
    return _evaluate(msg, context, cfg)


def _train(msg: Message, context: Context, cfg: dict) -> Message:
    from client.optimizer_state import load_optimizer_state, save_optimizer_state
    from client.private_factors import mf_trainer
    from client.partner_identity import partner_label
    from client.privacy_budget import NO_LOCAL_DP_METRICS, PartnerBudget
    from common.privacy import dp_noise_seed
    from common.training import train_local
    from common.objectives import epoch_learning_rates, objective_options

    data, model, device = _round_inputs(msg, context, cfg)  # this partner's data and the global weights
    server_round = int(msg.content["config"].get("server-round", 1))

    # Open this partner's privacy ledger; refuse to train if the round would pass the budget
    budget = None
    if uses_local_dp(dp_mode(cfg)):
        budget = PartnerBudget.open(cfg, context, data, _run_name(msg, cfg, context))
    try:
        if budget is not None:
            budget.check_next_round()

        # Train (DP-SGD with the run's calibrated noise when local DP is on)
        trainer = mf_trainer(context) if cfg["model"] == "mf" else train_local  # MF: user factors stay here
        keep_adam = bool(cfg["keep-optimizer-state"]) and cfg["model"] != "mf"  # client/optimizer_state.py
        # Noise from OS entropy unless this partner's own environment asks for reproducible noise
        noise_seed = dp_noise_seed(int(cfg["seed"]), server_round,
                                   int(context.node_config.get("partition-id", context.node_id)))
        if noise_seed is not None and budget is not None and "partition-id" not in context.node_config:
            LOG.warning("FEDREC_REPRODUCIBLE_DP_NOISE is set: this partner's DP noise follows the run seed, "
                        "which the coordinator knows; unset it outside simulations")
        result = trainer(
            model, data, epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
            learning_rate=float(cfg["learning-rate"]), max_len=int(cfg["max-seq-len"]),
            dp=budget.dp_settings(cfg, noise_seed) if budget else None, device=device,
            seed=int(cfg["seed"]) * 1000 + server_round,
            **_proximal(msg),
            **({} if cfg["model"] == "mf" else {"history_windows": bool(cfg["history-windows"]),
                                                "reverse_histories": bool(cfg["reverse-histories"]),
                                                "learning_rates": epoch_learning_rates(cfg, server_round),
                                                **objective_options(cfg)}),
            **({"optimizer_state": load_optimizer_state(context, model)} if keep_adam else {}),
        )
        # Record the spend on the ledger before anything leaves or is kept (Adam's moments are
        # functions of this round's noised steps); epsilon is over the whole ledger
        privacy = budget.metrics(budget.record(context, server_round, result.mechanisms)) if budget else NO_LOCAL_DP_METRICS
        if keep_adam:
            save_optimizer_state(context, result.optimizer_state)
        if keeps_private_state(cfg):  # for a resume in a new process (client/partner_state.py)
            from client.partner_state import RunIdentity, save_partner_state

            save_partner_state(context, _state_file(msg, context, cfg), server_round, RunIdentity.of(msg.content["config"]))
        details = budget.details() if budget else {"partner": partner_label(context.node_config, data, context)}
        noised_count = budget is not None and budget.count_is_noised
        if "num-partitions" in context.node_config:  # a simulation: how many ways its users were split
            details["num-partitions"] = str(int(context.node_config["num-partitions"]))
    finally:
        if budget is not None:
            budget.close()

    # Reply: with a noised user count (a deployed partner under local DP) the FedAvg weight is that count, and
    # the training loss and time (functions of the users' data, or of their number, outside the DP-SGD noise)
    # stay here (the server takes both as optional: server/validation.py OPTIONAL_TRAIN_METRICS)
    metrics = MetricRecord({
        **({} if noised_count else {"train-loss": result.loss, "seconds": result.seconds}),
        "num-examples": budget.users if budget is not None else result.num_examples,
        **privacy,
        "steps": result.steps,
    })
    if noised_count:  # Flower's logger: a flwr-clientapp process shows its INFO lines, not ours (a journey review)
        flwr_log(INFO, "%s: round %d trained, loss %.4f in %.1f s (kept here: not sent)", budget.label, server_round,
                 result.loss, result.seconds)
    # data-source: the coordinator's summary says what the model was trained on (the run config's
    # dataset is only read by simulated partners)
    source = "own log" if context.node_config.get("data-path") else "simulated partition"
    content = RecordDict({"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": metrics,
                          "privacy": ConfigRecord({**details, "dp-mode": dp_mode(cfg), "data-source": source})})
    return Message(content, reply_to=msg)


CLEAR_EVALUATION_WARNED = "clear-evaluation-warned"  # context.state record: the warning below was given


def _warn_clear_evaluation_once(cfg: dict, context: Context) -> None:
    """Tell a deployed partner under local DP, once per run in its own log, that a clear evaluation reply
    leaves its DP guarantee: exact sums and the exact number of evaluated users (its training replies
    carry only its noised count: common/private_count.py)."""
    if "partition-id" in context.node_config or CLEAR_EVALUATION_WARNED in context.state.config_records:
        return
    try:  # local DP as this partner trains (its own max-epsilon may force it on)
        if not uses_local_dp(dp_mode(apply_partner_policy(cfg, context.node_config))):
            return
    except Exception:  # noqa: BLE001 -- its training refuses in one line; evaluation goes on as before
        return
    context.state.config_records[CLEAR_EVALUATION_WARNED] = ConfigRecord({"warned": True})
    LOG.warning("this partner answers evaluation in clear (evaluation-noise-multiplier = 0): the reply carries exact "
                "HR/NDCG sums and the exact number of evaluated users, outside its DP guarantee; node config "
                "share-evaluation=\"noised\" (or false) keeps them here")


def _round_inputs(msg: Message, context: Context, cfg: dict) -> tuple:
    """(this partner's data, the model holding the message's global weights, the device) for a train or
    evaluate message, after checking the message's catalogue and item-text table against this partner's."""
    from common.task import new_model, partner_data
    from common.training import pick_device

    data = partner_data(cfg, context.node_config)
    check_same_catalogue(msg, data)
    device = pick_device(cfg["device"])
    model = new_model(cfg, data.num_items)
    check_same_item_text(msg, model, cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    if keeps_private_state(cfg):  # a resumed run: MF's user factors / Adam's moments from this partner's file
        from client.partner_state import RunIdentity, restore_partner_state

        restore_partner_state(context, _state_file(msg, context, cfg), int(msg.content["config"].get("server-round", 1)),
                              RunIdentity.of(msg.content["config"]))
    return data, model, device


def keeps_private_state(cfg: Mapping[str, Any]) -> bool:
    """Whether this run's partners keep state between rounds (client/partner_state.py)."""
    return cfg["model"] == "mf" or bool(cfg["keep-optimizer-state"])


def _state_file(msg: Message, context: Context, cfg: dict):  # noqa: ANN202 -- a Path or None
    from client.partner_state import state_file

    return state_file(cfg, context.node_config, _run_name(msg, cfg, context))


def _run_name(msg: Message, cfg: dict, context: Context) -> str:
    """The run's name in this partner's ledger: the coordinator's run directory (sent with training and
    evaluation messages), else the run config's, else Flower's run id."""
    return str(msg.content["config"].get("run-name", "")) or cfg["run-name"] or f"flwr-run-{context.run_id}"


def _proximal(msg: Message) -> dict:
    """FedProx: the server's proximal-mu, passed on only when set (aggregation = fedprox)."""
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    return {"proximal_mu": mu} if mu else {}


def _evaluate(msg: Message, context: Context, cfg: dict) -> Message:
    from client.private_factors import evaluate_partner

    data, model, device = _round_inputs(msg, context, cfg)
    model.to(device)
    sums = evaluate_partner(model, data, context, cfg, device)  # HR/NDCG@5,10,20, coverage, popularity
    if float(cfg["evaluation-noise-multiplier"]) > 0:
        return _noised_evaluation_reply(msg, context, cfg, data, sums)
    metrics = MetricRecord({**sums, "num-examples": int(sums["num-users"])})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _noised_evaluation_reply(msg: Message, context: Context, cfg: dict, data, sums: dict) -> Message:  # noqa: ANN001
    """The top-K hit and NDCG sums under the Gaussian mechanism (common/private_evaluation.py),
    spent from this partner's ledger before the reply leaves, like a training round."""
    from client.privacy_budget import PartnerBudget
    from common.privacy import dp_noise_seed
    from common.private_evaluation import noised_evaluation_sums

    server_round = int(msg.content["config"].get("server-round", 1))
    budget = PartnerBudget.open(cfg, context, data, _run_name(msg, cfg, context))
    try:
        budget.check_next_evaluation()
        # 4 parts: never the seed of this round's training noise (3 parts) in a reproducible simulation
        seed = dp_noise_seed(int(cfg["seed"]), server_round,
                             int(context.node_config.get("partition-id", context.node_id)), 1)
        released = noised_evaluation_sums(sums, float(cfg["evaluation-noise-multiplier"]), int(cfg["top-k"]),
                                          seed=seed)
        privacy = budget.metrics(budget.record_evaluation(context, server_round))
        details = budget.details()
        if budget.count_is_noised:  # the exact count of evaluated users stays here (common/private_count.py)
            released["num-users"] = float(budget.users)
    finally:
        budget.close()
    if "partition-id" in sums:  # simulations: the per-partner NDCG spread
        released["partition-id"] = sums["partition-id"]
    metrics = MetricRecord({**released, "num-examples": int(released["num-users"]), **privacy})
    return Message(RecordDict({"metrics": metrics, "privacy": ConfigRecord({**details, "dp-mode": dp_mode(cfg)})}),
                   reply_to=msg)


def check_same_catalogue(msg: Message, data: SequenceData) -> None:
    """Refuse a round whose global model was built on another catalogue than this partner's: row i
    of the item table is item i of the catalogue, so a reordered file trains every row on the
    wrong item without any error, and a shorter one fails deep in torch. The coordinator sends
    its catalogue's fingerprint with every round (server/app.py); an older server sends none."""
    from common.data.catalogue import catalogue_fingerprint
    from common.errors import DataError

    config = msg.content.config_records.get("config")
    expected = config.get("catalogue-fingerprint") if config is not None else None
    if expected is None:
        return
    mine = catalogue_fingerprint(data.catalogue)
    if mine != expected:
        # no apostrophes: the reply sanitiser reads them as quotes around a data value (client/safe_errors.py)
        raise DataError(f"the item catalogue at this partner ({len(data.catalogue)} items, fingerprint {mine}) is not "
                        f"the one of the coordinator (fingerprint {expected}): the run catalogue file here differs "
                        "from the file the coordinator published; fetch it again")


def check_same_item_text(msg: Message, model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Refuse a round whose global model reads other item text features than this partner's: the
    frozen text table is not sent (it is public and rebuilt from the published file), so a partner
    holding an outdated or differently encoded file of the same width would train on other inputs
    without any error. The coordinator sends the table's fingerprint (server/app.py)."""
    from common.errors import DataError
    from common.item_text import SKETCH_TOLERANCE, local_text_key, sketch_differs, table_fingerprint, table_sketch

    config = msg.content.config_records.get("config")
    expected = config.get("item-text-fingerprint") if config is not None else None
    key = config.get("item-text-key") if config is not None else None
    if key is not None and local_text_key(cfg) not in (None, key):
        raise DataError("the item texts or text encoder at this partner differ from the coordinator ones: another "
                        "metadata file, for example an outdated one after the catalogue grew, or another "
                        "item-text-model or item-text-quantize; use the features file the coordinator publishes, "
                        "item-text-features")
    sketch = config.get("item-text-sketch") if config is not None else None
    if sketch is not None and (mine_sketch := table_sketch(model)) is not None:
        # the same texts and encoder at each end: equal up to machine noise, or another encoder version
        tolerance = SKETCH_TOLERANCE[bool(cfg.get("item-text-quantize", False))]
        gap = sketch_differs(mine_sketch, list(sketch), tolerance)
        if gap is not None:
            raise DataError(f"the item text features encoded at this partner differ from the coordinator ones by "
                            f"{gap:.3g}, beyond the tolerance {tolerance:g}: another encoder version; use the "
                            "features file the coordinator publishes, item-text-features")
    mine = table_fingerprint(model)
    if expected is None or mine is None or mine == expected:
        return
    raise DataError(f"the item text features at this partner (fingerprint {mine}) are not the ones of the "
                    f"coordinator (fingerprint {expected}): the item-text-features file here differs from the "
                    "file the coordinator published; fetch it again")


app = make_client_app()
