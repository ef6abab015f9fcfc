"""Range checks of the run configuration's values: one clear line when a knob cannot work.

Why here and not where each knob is used: the server and every partner resolve the same run
config; a value that only fails inside a partner's training (a negative learning rate, a batch
of 0, a dropout of 1.5) used to surface as a traceback per partner per round while the server
"completed" the run with the untrained model. Checked once, when the config is resolved, every
process refuses it before anything starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from common.data.partition import SCHEMES as PARTITION_SCHEMES
from common.errors import ConfigError

POSITIVE_INTS = ("num-server-rounds", "min-nodes", "max-seq-len", "embedding-dim", "num-blocks", "num-heads",
                 "local-epochs", "batch-size", "top-k", "evaluate-every", "max-num-examples", "synthetic-users",
                 "synthetic-items", "mf-fold-in-steps", "tie-orders", "item-init-window", "chain-window")
NON_NEGATIVE_INTS = ("num-malicious-nodes", "seed")
# Checked whether or not their feature is on in this run (central DP, FedProx, trimmed mean): a bad value
# was accepted silently until someone switched the feature on
POSITIVE_FLOATS = ("round-timeout", "learning-rate", "max-grad-norm", "node-wait-timeout", "secagg-clipping-range",
                   "secagg-max-weight", "secagg-delta-scale", "server-learning-rate", "dirichlet-alpha",
                   "central-clipping-norm", "count-noise-multiplier", "item-prior-noise-multiplier")
# (fraction-evaluate, 0 = no evaluation, is checked where the server builds its strategy)
NON_NEGATIVE_FLOATS = ("max-update-norm", "mf-l2", "central-noise-multiplier", "size-skew-power", "proximal-mu",
                       "evaluation-noise-multiplier", "chain-weight")
MAX_EPSILON = 100.0  # target-epsilon above this is refused (see check_values)
MAX_SEQ_LEN = 10_000
MAX_SYNTHETIC = 1_000_000  # synthetic-users / synthetic-items: 1e12 items asked numpy for 7 TiB (a review)
FRACTIONS = ("fraction-train", "secagg-num-shares", "secagg-threshold")  # in (0, 1]
MODELS = ("sasrec", "mf")  # common/models/__init__.py: new_model
ITEM_FEATURES = ("id", "text", "id+text")  # common/item_text.py
CHOICES = {
    "model": MODELS,  # (a typo was found inside every simulated partner, after Ray's start: a journey review)
    "item-features": ITEM_FEATURES,
    "accountant": ("rdp", "prv"),
    "grad-sample-mode": ("auto", "fused", "hooks", "ghost"),
    "central-clipping": ("server", "client"),
    "item-init": ("random", "cooccurrence", "text"),
    "item-prior": ("none", "popularity"),
    "partitioning": PARTITION_SCHEMES,  # (a bad one was refused by every partner, every round, run "completed")
}


def check_values(cfg: Mapping[str, Any]) -> None:
    """:class:`ConfigError` naming the first knob whose value cannot work (see the module docstring)."""

    def bad(key: str, need: str) -> ConfigError:
        return ConfigError(f"{key} = {cfg[key]!r} {need}")

    for key in POSITIVE_INTS:
        if key in cfg and cfg[key] < 1:
            raise bad(key, "must be at least 1")
    for key in NON_NEGATIVE_INTS:
        if key in cfg and cfg[key] < 0:
            raise bad(key, "must be >= 0")
    for key in POSITIVE_FLOATS:
        if key in cfg and not (math.isfinite(cfg[key]) and cfg[key] > 0):
            raise bad(key, "must be a positive number")
    for key in NON_NEGATIVE_FLOATS:
        if key in cfg and not (math.isfinite(cfg[key]) and cfg[key] >= 0):
            raise bad(key, "must be a number >= 0")
    for key in FRACTIONS:
        if key in cfg and not 0 < cfg[key] <= 1:
            raise bad(key, "must be in (0, 1]")
    for key, allowed in CHOICES.items():
        if key in cfg and cfg[key] not in allowed:
            raise bad(key, f"is unknown; use one of {', '.join(allowed)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg["device"])):  # (pick_device has no mps)
        raise bad("device", "is not a device; use auto, cpu, cuda or cuda:N")
    if not 0 <= cfg["dropout"] < 1:
        raise bad("dropout", "must be in [0, 1)")
    if not 0 <= cfg["label-smoothing"] < 1:
        raise bad("label-smoothing", "must be in [0, 1) (the share of a target's weight spread over the other items)")
    if not 0 < cfg["chain-decay"] <= 1:
        raise bad("chain-decay", "must be in (0, 1] (the weight of each older item in the chain's sum)")
    if not 0 <= cfg.get("ema-decay", 0.0) < 1:
        raise bad("ema-decay", "must be in [0, 1) (the moving average's decay per step; 0 = no averaging)")
    if cfg["embedding-dim"] % cfg["num-heads"]:
        raise ConfigError(f"embedding-dim = {cfg['embedding-dim']} must be divisible by num-heads = {cfg['num-heads']}")
    if not (math.isfinite(cfg["target-epsilon"]) and cfg["target-epsilon"] > 0):
        raise bad("target-epsilon", "must be a finite positive number (the privacy budget); for no DP-SGD set "
                  'dp-mode = "off" (a sweep\'s target-epsilon = "inf" does that)')
    if cfg["target-epsilon"] > MAX_EPSILON:  # PRV's grid hung (1000) or asked for 3 TiB (1e8): a review
        raise bad("target-epsilon", f"is above {MAX_EPSILON:g}, where a guarantee says nothing (e^{MAX_EPSILON:g}) and "
                  "the accountants break down; for no DP set dp = false")
    if cfg.get("max-seq-len", 1) > MAX_SEQ_LEN:
        raise bad("max-seq-len", f"must be at most {MAX_SEQ_LEN} (the model keeps a position row for each)")
    if not str(cfg.get("dataset", "synthetic")).strip():  # it read as ".: no interaction log found" (a review)
        raise bad("dataset", "is empty; use synthetic, ml-100k, ml-1m or a path to a log")
    for key in ("synthetic-users", "synthetic-items"):
        if cfg.get(key, 1) > MAX_SYNTHETIC:
            raise bad(key, f"must be at most {MAX_SYNTHETIC:,} (the built-in generator holds them in memory)")
    if cfg.get("seed", 0) >= 2 ** 63:  # torch.manual_seed takes a 64-bit signed integer
        raise bad("seed", "must be below 2**63")
    if "trim-fraction" in cfg and not 0 <= cfg["trim-fraction"] < 0.5:
        raise bad("trim-fraction", "must be in [0, 0.5) (trimmed-mean's cut at each end)")
    if "holdout-fraction" in cfg and not 0 <= cfg["holdout-fraction"] < 1:
        raise bad("holdout-fraction", "must be in [0, 1) (the share of users never trained on)")
    if not 0 <= cfg["target-delta"] < 1:
        raise bad("target-delta", "must be in [0, 1) (0 = min(1e-5, 0.1 / users))")
    _check_combinations(cfg)
    if cfg["resume"] and not cfg["run-name"]:  # else an automatic name would be "no such run to resume"
        raise ConfigError("resume = true needs run-name = <name of the run directory under run-dir> to resume")
    _check_run_name(str(cfg.get("run-name", "")))


def _check_run_name(name: str) -> None:
    """``run-name`` is one directory name under ``run-dir``: a path ("/etc", "../x", "a/b") put the
    model, metrics, privacy report and checkpoints where the coordinator never chose."""
    if name and (name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name)):
        raise ConfigError(f"run-name = {name!r} must be one directory name under run-dir (no '/', '\\', '..' "
                          "or control characters); set run-dir for the folder")
    # new_run_dir may add "-NN", and file systems take 255 bytes a name: "File name too long" mid-run (a review)
    if len(name.encode("utf-8")) > 200:
        raise ConfigError(f"run-name is {len(name.encode('utf-8'))} bytes long; give at most 200")


def _check_combinations(cfg: Mapping[str, Any]) -> None:
    """Knobs that each pass alone but cannot work together (each used to fail inside every partner,
    every round, or be dropped silently, while the run "completed")."""
    model, features = cfg.get("model", "sasrec"), cfg.get("item-features", "id")
    from common.privacy import dp_mode, uses_local_dp  # lazy: common.privacy needs numpy, config must not

    local_dp = uses_local_dp(dp_mode(cfg))
    mode = cfg.get("grad-sample-mode", "auto") if local_dp else "auto"  # it only chooses how DP-SGD clips
    if mode == "fused" and (model != "sasrec" or features != "id"):
        raise ConfigError(f"grad-sample-mode = \"fused\" needs model = \"sasrec\" with item-features = \"id\" "
                          f"(this run: {model}, {features}); use auto, ghost or hooks")
    if mode == "ghost" and cfg.get("tied-output") and model == "sasrec" and features in ("id", "id+text"):
        raise ConfigError("grad-sample-mode = \"ghost\" cannot clip tied-output = true (Opacus' ghost clipping "
                          "refuses one weight in two layers); use auto, fused or hooks")
    pull = float(cfg.get("learning-rate", 0.0)) * float(cfg.get("proximal-mu", 0.0))
    if cfg.get("aggregation") == "fedprox" and pull >= 1:  # common/proximal.py refused it in every partner, every round
        raise ConfigError(f"proximal-mu = {cfg['proximal-mu']!r} with learning-rate = {cfg['learning-rate']!r}: "
                          f"each local step pulls learning-rate x proximal-mu = {pull:g} of the way back to the "
                          "global model, which must be < 1 (the pull would overshoot)")
    if float(cfg.get("evaluation-noise-multiplier", 0.0)) > 0 and not local_dp:
        # the noised sums are accounted on each partner's ledger, which only local DP-SGD keeps
        raise ConfigError(f"evaluation-noise-multiplier = {cfg['evaluation-noise-multiplier']!r} needs dp-mode = "
                          f"\"local\" or \"both\" (this run: {dp_mode(cfg)}): partners account the noised "
                          "evaluation sums on their privacy ledgers")
    if float(cfg.get("evaluation-noise-multiplier", 0.0)) > 0 and float(cfg.get("chain-weight", 0.0)) > 0 \
            and model == "sasrec":  # (MF ignores the chain)
        # noised sums assume a user moves only their own hit and NDCG; the chain's counts move everyone's scores
        raise ConfigError("chain-weight > 0 with evaluation-noise-multiplier > 0: a user's item pairs change the "
                          "chain other users are scored with, so one user could move many noised sums; set one to 0")
    if cfg.get("item-init", "random") != "random":
        _check_item_start(cfg, model, features)
    if cfg.get("item-prior", "none") != "none":
        _check_item_prior(cfg, model, features)
    if not cfg.get("dp", True) and cfg.get("dp-mode") in ("central", "both"):
        raise ConfigError(f"dp = false turns all DP off, but dp-mode = {cfg['dp-mode']!r} asks for it; "
                          "set dp-mode = \"off\" (dp = false is its older name) or drop dp = false")


# What each item-init other than random starts SASRec's id table from (common/cooccurrence.py, common/text_init.py)
_ITEM_STARTS = {"cooccurrence": "counts", "text": "the item texts"}


def _check_item_start(cfg: Mapping[str, Any], model: str, features: str) -> None:
    """An ``item-init`` that sets SASRec's id table before round 1: only that table exists to set, and only
    once. ``cooccurrence`` also has partners send item-pair counts outside any DP mechanism and in clear, so
    only runs that protect nothing; ``text`` reads public texts only, so any DP mode."""
    from common.privacy import dp_mode  # lazy, as above

    init = str(cfg["item-init"])
    if model != "sasrec" or features != "id":
        raise ConfigError(f"item-init = \"{init}\" sets SASRec's item id embeddings: it needs model = \"sasrec\" "
                          f"with item-features = \"id\" (this run: {model}, {features})")
    if cfg.get("init-model"):  # both would set the item table: the start would overwrite the trained rows
        raise ConfigError(f"item-init = \"{init}\" starts the item embeddings from {_ITEM_STARTS[init]}, init-model = "
                          f"{str(cfg['init-model'])!r} from a trained model: set one of them")
    if init != "cooccurrence":
        return
    if dp_mode(cfg) != "off":
        raise ConfigError(f"item-init = \"cooccurrence\" has partners send item-pair counts that no DP protects, "
                          f"so it needs dp-mode = \"off\" (this run: {dp_mode(cfg)}); use item-init = \"text\" "
                          "(public item texts) or \"random\" under DP")
    robust = cfg.get("aggregation") in ("median", "trimmed-mean", "krum") or int(cfg.get("num-malicious-nodes", 0)) > 0
    if robust:  # one partner's counts, however large, would set the start: the sum has no robust form here
        raise ConfigError(f"item-init = \"cooccurrence\" sums the partners' counts as sent, so one partner sets the "
                          f"start; aggregation = {cfg.get('aggregation')!r} expects malicious partners: use "
                          "item-init = \"text\" or \"random\" with robust aggregation")
    if cfg.get("secure-aggregation"):
        raise ConfigError("item-init = \"cooccurrence\" has partners send item-pair counts in clear, which "
                          "secure-aggregation = true is meant to prevent; use item-init = \"text\" or \"random\" with SecAgg+")


def _check_item_prior(cfg: Mapping[str, Any], model: str, features: str) -> None:
    """``item-prior = "popularity"`` (common/item_prior.py): each partner releases one noised item histogram,
    accounted on its own ledger, so local DP only; sent in clear and summed as sent, so no SecAgg+ and no
    robust aggregation; it sets SASRec's frozen output bias, which central DP's noise would move."""
    from common.privacy import dp_mode  # lazy, as above

    if model != "sasrec" or features != "id":
        raise ConfigError(f"item-prior = \"popularity\" offsets the scores of SASRec's output layer: it needs "
                          f"model = \"sasrec\" with item-features = \"id\" (this run: {model}, {features})")
    if dp_mode(cfg) != "local":
        raise ConfigError(f"item-prior = \"popularity\" has each partner release a noised item histogram accounted "
                          f"on its own privacy ledger, which needs dp-mode = \"local\" (this run: {dp_mode(cfg)})")
    if cfg.get("init-model"):
        raise ConfigError(f"item-prior = \"popularity\" sets the output bias before round 1; init-model = "
                          f"{str(cfg['init-model'])!r} starts from a trained model without one: set one of them")
    robust = cfg.get("aggregation") in ("median", "trimmed-mean", "krum")
    if robust or int(cfg.get("num-malicious-nodes", 0)) > 0:
        expects = (f"aggregation = {cfg.get('aggregation')!r}" if robust
                   else f"num-malicious-nodes = {cfg['num-malicious-nodes']!r}")
        raise ConfigError(f"item-prior = \"popularity\" sums the partners' histograms as sent, so one partner could "
                          f"set every item's offset; {expects} expects malicious partners: use item-prior = \"none\" "
                          "with robust aggregation")
    if cfg.get("secure-aggregation"):
        raise ConfigError("item-prior = \"popularity\" has partners send their noised item histograms in clear, "
                          "which secure-aggregation = true is meant to prevent; use item-prior = \"none\" with SecAgg+")
