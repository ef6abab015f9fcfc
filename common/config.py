"""Run configuration: the defaults of ``[tool.flwr.app.config]`` and their validation.

``pyproject.toml`` is the source users edit; this mirror exists because Flower's
``run_simulation`` hands apps an empty ``run_config``. A test keeps the two identical.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    # Federation
    "num-server-rounds": 5,
    "fraction-train": 1.0,
    "min-nodes": 2,
    "round-timeout": 600.0,
    "seed": 42,
    # Data
    "dataset": "synthetic",
    "partitioning": "iid",
    "dirichlet-alpha": 0.5,
    "size-skew-power": 2.0,
    "holdout-fraction": 0.0,
    "synthetic-users": 1000,
    "synthetic-items": 300,
    "max-seq-len": 50,
    "catalogue": "",  # published catalogue file (one item id per line); "" = derive from the data set
    # Model
    "model": "sasrec",
    "embedding-dim": 64,
    "num-blocks": 2,
    "num-heads": 1,
    "dropout": 0.2,
    "tied-output": False,
    "item-init": "random",  # random | cooccurrence (common/cooccurrence.py; dp-mode off only) | text (common/text_init.py)
    "item-init-window": 10,
    "item-prior": "none",  # none | popularity (common/item_prior.py; dp-mode local only)
    "item-prior-noise-multiplier": 2.0,  # the noised item histogram's std, in units of one user (L2 norm 1)
    # Item understanding (common/item_text.py, common/models/text_sasrec.py)
    "item-features": "id",
    "item-text-model": "all-MiniLM-L6-v2",
    "item-text-features": "",
    "item-text-quantize": False,
    "mf-fold-in-steps": 20,
    "mf-l2": 0.001,
    # Context inputs of SASRec (common/models/context.py)
    "time-features": False,
    "genre-features": False,
    # Local training
    "local-epochs": 2,
    "history-windows": False,  # dp = false only: every max-seq-len window of a history is an example
    "reverse-histories": False,  # dp = false only: also train on every history read backwards
    "train-on-validation": False,  # each user's validation item is training data too (common/data/sequences.py)
    "keep-optimizer-state": False,  # a partner continues its Adam moments from its previous round
    "exclude-seen": True,  # the training softmax leaves out each user's earlier items, as evaluation does
    "shuffle-ties": True,  # items with equal timestamps get a fresh random order every epoch (common/data/ties.py)
    "label-smoothing": 0.0,  # SASRec: this share of each target's weight spread over the items it competes with
    "ema-decay": 0.0,  # SASRec: a round's weights = the moving average of its iterates (common/weight_averaging.py)
    "batch-size": 64,
    "learning-rate": 0.002,
    "lr-schedule": "constant",  # constant | cosine (annealed over all rounds' epochs)
    "device": "auto",
    # DP-SGD
    "dp": True,
    "target-epsilon": 8.0,
    "target-delta": 0.0,
    "max-grad-norm": 1.0,
    "accountant": "rdp",
    # the user count a deployed partner's plan and replies are computed from (common/private_count.py)
    "count-noise-multiplier": 10.0,
    "simulated-count-noise": False,
    "grad-sample-mode": "auto",
    # Privacy mode, ledger, central DP (client/privacy_budget.py, server/central_dp.py)
    "dp-mode": "local",
    "ledger-dir": "",
    "central-noise-multiplier": 1.0,
    "central-clipping-norm": 1.0,
    "central-clipping": "server",
    # SecAgg+ (server/secure_aggregation.py, client/secure_aggregation.py)
    "secure-aggregation": False,
    "secagg-num-shares": 1.0,
    "secagg-threshold": 0.67,
    "secagg-clipping-range": 8.0,
    "secagg-max-weight": 1000.0,
    "secagg-delta-scale": 100.0,
    # Evaluation
    "top-k": 10,
    # evaluation: a history whose last items share a timestamp is scored as the mean over N random
    # orders of them (1 = file order; common/tie_scoring.py)
    "tie-orders": 16,
    # > 0: a partner ranks by the model's log-probabilities plus this x its own item chain's (common/item_chain.py)
    "chain-weight": 0.0,
    "chain-window": 20,  # the chain looks at a user's last N items ...
    "chain-decay": 0.8,  # ... each step back weighted this much less
    "fraction-evaluate": 1.0,  # share of partners evaluating in a round (cross-device: a sample)
    "evaluate-every": 1,  # federated evaluation every N rounds (the last round always)
    # > 0: partners add Gaussian noise to their evaluation sums and account it (common/private_evaluation.py)
    "evaluation-noise-multiplier": 0.0,
    # Output
    "run-dir": "runs",
    "run-name": "",
    # Reliability (server/validation.py, server/checkpoint.py, server/strategy_factory.py)
    "aggregation": "fedavg",
    "proximal-mu": 0.0,
    "server-learning-rate": 0.01,
    "trim-fraction": 0.2,
    "num-malicious-nodes": 0,
    "max-update-norm": 100.0,
    "max-num-examples": 1000000,
    "node-wait-timeout": 300.0,
    "resume": False,
    "init-model": "",  # start from a released model.pt (server/warm_start.py); "" = fresh weights
}


def resolve_config(run_config: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then ``run_config`` (from Flower), then ``overrides``; unknown keys are an error."""
    cfg = dict(DEFAULTS)
    for source in (run_config or {}), (overrides or {}):
        for key, value in source.items():
            if key not in DEFAULTS:
                import difflib  # a typo gets its key first, not a list of 100 to search (a review)

                near = difflib.get_close_matches(str(key), list(DEFAULTS), n=1, cutoff=0.8)
                hint = f"did you mean {near[0]!r}? " if near else ""
                table, _, bare = str(key).rpartition(".")
                if table and bare in DEFAULTS:  # a TOML file written with its pyproject header (a review)
                    raise ConfigError(f"unknown config key {key!r}: a run config file is flat; write {bare!r} "
                                      f"without the [{table}] table header")
                raise ConfigError(f"unknown config key {key!r}; {hint}known keys: {', '.join(sorted(DEFAULTS))}")
            cfg[key] = _coerce(key, value)
    for key in ("run-dir", "ledger-dir"):  # "~/runs" made a folder named "~" in the working folder (a review)
        if str(cfg[key]).startswith("~"):
            cfg[key] = os.path.expanduser(str(cfg[key]))
            if cfg[key].startswith("~"):
                raise ConfigError(f"{key} = {cfg[key]!r}: no such home folder here; give the full path")
    from common.config_checks import check_values  # range checks live beside, to keep this module the table

    check_values(cfg)
    return cfg


def _coerce(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if isinstance(value, bool):
            raise ValueError  # true as a number: int(True) = 1 would run silently (learning-rate = 1.0)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError  # 2.5 rounds: int() would silently make it 2
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} = {value!r} is not a valid {type(default).__name__}") from None


# Knobs a model never reads: set away from their default they change nothing but config.json
_IGNORED_BY = {
    "mf": ("item-features", "time-features", "genre-features", "tied-output", "num-blocks", "num-heads", "dropout",
           "keep-optimizer-state", "history-windows", "reverse-histories", "exclude-seen", "shuffle-ties", "label-smoothing",
           "ema-decay", "lr-schedule", "tie-orders", "item-init-window", "chain-weight", "chain-window", "chain-decay"),
    "sasrec": ("mf-fold-in-steps", "mf-l2"),
}


# The knobs only one aggregation or partitioning reads (num-malicious-nodes is Krum's f, not a fault
# injector: simulations.fault_injection makes partners malicious)
_READ_ONLY_BY = {
    ("aggregation", "proximal-mu"): "fedprox", ("aggregation", "server-learning-rate"): "fedadam",
    ("aggregation", "trim-fraction"): "trimmed-mean", ("aggregation", "num-malicious-nodes"): "krum",
    ("partitioning", "dirichlet-alpha"): "dirichlet", ("partitioning", "size-skew-power"): "size-skew",
}


def ignored_knobs(cfg: Mapping[str, Any]) -> list[str]:
    """Knobs of ``cfg`` set away from their default that its ``model``, ``aggregation`` or
    ``partitioning`` ignores (the server warns once, ``fedrec-server check`` notes them)."""
    ignored = list(_IGNORED_BY.get(str(cfg.get("model", "sasrec")), ()))
    ignored += [knob for (choice, knob), reader in _READ_ONLY_BY.items() if cfg.get(choice, DEFAULTS[choice]) != reader]
    # Central DP's knobs without central DP (the local ones stay: a partner's max-epsilon may force DP-SGD on)
    from common.privacy import dp_mode, uses_central_dp  # lazy: common.config stays free of numpy

    if not uses_central_dp(dp_mode(cfg)):
        ignored += ["central-noise-multiplier", "central-clipping-norm", "central-clipping"]
    # The encoder knobs only matter where item texts get encoded: not for id-only items, and not
    # beside a published features file (its encoder is the one the coordinator used)
    texts = cfg.get("item-features", "id") != "id" or cfg.get("item-init") == "text"
    if not texts or cfg.get("item-text-features"):
        ignored += ["item-text-model", "item-text-quantize"]
    if cfg.get("item-init", "random") != "cooccurrence":
        ignored += ["item-init-window"]
    if cfg.get("item-prior", "none") != "popularity":
        ignored += ["item-prior-noise-multiplier"]
    return [k for k in dict.fromkeys(ignored) if k in cfg and cfg[k] != DEFAULTS[k]]
