"""A partner's own privacy floor: node config keys that no run config can lower.

The coordinator writes the run config, and with it ``dp-mode``, ``target-epsilon`` and
``target-delta``. Without a floor of its own, a partner would train without DP-SGD, or spend any
epsilon, because a coordinator (curious, careless, or with a typo) asked for it. A partner sets
its floor on its own SuperNode, e.g.
``flower-supernode ... --node-config 'data-path="..." max-epsilon=4.0 max-delta=1e-6'``:

- ``max-epsilon``: this partner trains only with local DP-SGD (a run with ``dp-mode`` ``off`` or
  ``central`` gets it anyway: ``local`` or ``both`` for this partner, at ``max-epsilon``), and its
  whole-ledger epsilon stays within min(the run's ``target-epsilon``, ``max-epsilon``);
- ``max-delta``: its delta is min(the run's, ``max-delta``); with ``max-epsilon`` alone, min(the
  run's, ``default_delta(users)``). ``max-delta`` alone has no budget to force DP-SGD at: a run
  without local DP-SGD is refused (the partner expects a guarantee it would not get).

- ``share-evaluation = false``: the partner answers no evaluation round (its hit and NDCG sums are
  computed on its users without noise and are in no ledger); ``"noised"``: it answers only runs
  whose ``evaluation-noise-multiplier`` > 0 (sums under DP, on its ledger: common/private_evaluation.py).
- ``share-item-histogram = false``: the partner sends no noised item histogram for a run with
  ``item-prior = "popularity"`` (common/item_prior.py): it refuses the query before drawing anything,
  and its DP-SGD is calibrated without the histogram, so it keeps that share of its budget.

``max-epsilon`` caps the partner's ledger, so a real partner (no ``partition-id``: not a
simulation) must also set ``ledger-path``: otherwise the ledger lives where the run config says,
and a new run could start from zero spend.

Not a floor, but checked here with the other keys: ``partner-state-dir``, the folder this partner
keeps its round-to-round training state in (MF's user factors, kept Adam moments:
client/partner_state.py), so that a resumed run continues them; without it the state is kept beside
``ledger-path`` (``<ledger-path>.state/``), else in memory only.

The effective targets are what the ledger calibrates for and what each reply reports
(``target-epsilon``, ``delta``), so the coordinator sees every partner's actual guarantee.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError, PrivacyError
from common.files import file_in_the_way
from common.privacy import (ONE_USER_MANY_EXAMPLES, default_delta, dp_mode, refuse_meaningless_delta, uses_central_dp,
                            uses_local_dp)

LOG = logging.getLogger("fedrec.client")
# Every node config key this app reads (Flower's simulation sets the partition ones)
NODE_CONFIG_KEYS = ("data-path", "data-identity", "ledger-path", "ledger-reset", "max-epsilon", "max-delta",
                    "share-evaluation", "share-item-histogram", "reply-after-seconds", "partner-state-dir",
                    "catalogue-fingerprint", "partition-id", "num-partitions")
MAX_REPLY_HOLD = 43_200.0  # s: Flower's default message time-to-live; a reply held longer arrives expired


# Words of a privacy setting: an unknown node config key made of one is a partner's floor that
# would be ignored in silence (``max-eps``, ``epsilon-cap``, ``maxEps``, ``privacy.budget``), never
# another app's harmless knob. Long words count inside a run-together token too; the short ones
# only alone or beside a modifier (``maxeps``), as "eps" / "dp" sit inside unrelated words.
PRIVACY_WORDS = frozenset({"eps", "epsilon", "delta", "dp", "privacy", "private", "budget", "ledger", "noise",
                           "clip", "clipping", "sigma"})
_LONG_PRIVACY_WORDS = tuple(w for w in PRIVACY_WORDS if len(w) >= 5)
_MODIFIERS = ("max", "min", "cap", "limit", "target")
# Run config keys that set privacy (the coordinator's; a partner caps them with max-epsilon / max-delta)
_PRIVACY_RUN_KEYS = frozenset({"max-grad-norm", "accountant", "secure-aggregation", "item-prior"})
# What a partner shares: an unknown share-* key is a partner declining something, to be refused, never ignored
_SHARING_KEYS = tuple(k for k in NODE_CONFIG_KEYS if k.startswith("share-"))
_IGNORED_WARNED: set[str] = set()  # unknown keys already warned about (the check runs every round)


def _words(key: str) -> list[str]:
    """``maxEps`` / ``max_eps`` / ``max.eps`` -> ["max", "eps"] (Flower flattens dotted node config keys)."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", str(key).strip())
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def _names_privacy(words: list[str]) -> bool:
    for word in words:
        if word in PRIVACY_WORDS or any(long in word for long in _LONG_PRIVACY_WORDS):
            return True
        if any(word in (f"{m}{s}", f"{s}{m}") for m in _MODIFIERS for s in ("eps", "dp")):
            return True
    return False


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Refuse a node config key whose value this app would ignore in silence while the partner
    believes it holds: one typo or abbreviation away from a key this app reads (``max-epsilion``,
    ``max-eps``), a privacy key of the run config (the coordinator's to set, e.g. ``target-epsilon``),
    or any other key naming a privacy setting however it is written; and refuse a malformed cap.
    Other unknown keys (``data``, ``seed``) may be another app's and pass."""
    from common.config import DEFAULTS  # run config keys (a light module: no torch)

    for key in node_config:
        if key in NODE_CONFIG_KEYS:
            continue
        words = _words(key)
        plain = "-".join(words)
        # An abbreviation keeps a known key's first words ("max-eps"); a lone word ("data", "max") may be another app's
        near = [k for k in NODE_CONFIG_KEYS if plain == k or ("-" in plain and k.startswith(plain))]
        near = near or difflib.get_close_matches(plain, NODE_CONFIG_KEYS, n=1, cutoff=0.8)
        if near:
            raise ConfigError(f"node config key {_shown(key)} is unknown; did you mean {near[0]}?")
        if len(words) > 1 and words[0] == "share":  # share-item-prior=false would still send the histogram (a review)
            raise ConfigError(f"node config key {_shown(key)} is unknown; what a partner shares is set by "
                              f"{' and '.join(_SHARING_KEYS)}")
        privacy = _names_privacy(words)
        if plain in DEFAULTS and (privacy or plain in _PRIVACY_RUN_KEYS):
            raise ConfigError(f"node config key {_shown(key)} is a run config key, set by the coordinator's run config; "
                              "a partner caps its privacy with max-epsilon and max-delta")
        if privacy:
            raise ConfigError(f"node config key {_shown(key)} names a privacy setting this app does not read; "
                              f"the node config keys are {', '.join(NODE_CONFIG_KEYS)}")
        if key not in _IGNORED_WARNED:  # another app's, or a typo (data=, identity=) the partner should see
            _IGNORED_WARNED.add(key)
            LOG.warning("node config key %s is not one this app reads, so it is ignored (another app's? this app "
                        "reads %s)", _shown(key), ", ".join(NODE_CONFIG_KEYS))
    for key, example in _TEXT_KEYS.items():
        _text(node_config, key, example)
    catalogue_pin(node_config)
    max_epsilon(node_config)
    _cap(node_config, "max-delta", 1.0)
    shares_evaluation(node_config)
    shares_item_histogram(node_config)
    reply_after_seconds(node_config)
    partner_state_dir(node_config)


# Keys whose value is text (a path, a name): Flower reads an unquoted 5 or true as a number or a bool
_TEXT_KEYS = {"data-path": '"/data/log.csv"', "data-identity": '"shop-events"', "ledger-path": '"/data/ledger.sqlite"',
              "ledger-reset": '"<the id its refusal names>"', "catalogue-fingerprint": '"<what data check prints>"'}
_PIN = re.compile(r"[0-9a-f]{16}")  # common/data/catalogue.py catalogue_fingerprint: 16 hex digits


def _text(node_config: Mapping[str, Any], key: str, example: str) -> str | None:
    """Node config ``key`` as text, None when unset; a number or bool (``ledger-path=5`` made a ledger named 5
    in the working folder; a review) is a :class:`ConfigError`."""
    value = node_config.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"node config {key} = {value!r} is not text; give it in quotes, e.g. {key}={example}")
    return value


def catalogue_pin(node_config: Mapping[str, Any]) -> str | None:
    """Node config ``catalogue-fingerprint`` (lower case), None when unset. Set but empty (an unset shell
    variable) or not 16 hex digits (a typo) is refused: either pinned nothing, in silence, or failed at the
    first round as "another item list"."""
    value = _text(node_config, "catalogue-fingerprint", _TEXT_KEYS["catalogue-fingerprint"])
    if value is None:
        return None
    pin = value.strip().lower()
    if not _PIN.fullmatch(pin):
        raise ConfigError(f"node config catalogue-fingerprint = {value!r} is not a catalogue fingerprint (16 hex "
                          "digits, as `fedrec-client data check` prints); copy it again, or leave the key out")
    return pin


def partner_state_dir(node_config: Mapping[str, Any]) -> Path | None:
    """Node config ``partner-state-dir`` as a folder (``~`` expanded), None when unset; a value that is
    no path (Flower parses ``true`` or ``0`` as a bool or int) or a folder a file stands in is a
    :class:`ConfigError`, since every round would otherwise fail to save its state, warned only."""
    value = node_config.get("partner-state-dir")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"node config partner-state-dir = {value!r} is not a folder; give a path in quotes, "
                          "e.g. partner-state-dir=\"/data/fedrec-state\"")
    folder = Path(value.strip()).expanduser()
    if file := file_in_the_way(folder):
        raise ConfigError(f"node config partner-state-dir = {value!r}: {file} is a file, not a folder; give the "
                          "folder this partner keeps its round-to-round state in")
    return folder


def reply_after_seconds(node_config: Mapping[str, Any]) -> float | None:
    """Node config ``reply-after-seconds``: every training and evaluation reply of this partner leaves
    that long after its message arrived (None: as soon as it is ready). How long a round takes grows
    with the number of users; a reply held to a fixed time tells the coordinator nothing of it, as long
    as the work finishes within the hold."""
    return _cap(node_config, "reply-after-seconds", MAX_REPLY_HOLD)


def check_reply_hold(node_config: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Refuse a hold the coordinator never waits for: each reply would come after the run's
    ``round-timeout``, not aggregated, while the training's spend is recorded all the same."""
    hold, timeout = reply_after_seconds(node_config), float(cfg.get("round-timeout", 0.0))
    if hold is not None and timeout > 0 and hold >= timeout:
        raise ConfigError(f"node config reply-after-seconds = {hold:g} is not below the round-timeout {timeout:g} of "
                          "this run: every reply would come late and not be aggregated, while its spend is recorded")


_SHARING = {"true": "any", "1": "any", "false": "none", "0": "none", "noised": "noised"}


def shares_evaluation(node_config: Mapping[str, Any]) -> str:
    """Node config ``share-evaluation`` (default true) as ``any``, ``none`` or ``noised``. Evaluation
    replies carry hit and NDCG sums computed on the partner's users: in clear, outside any ledger,
    unless the run's ``evaluation-noise-multiplier`` > 0; ``false`` sends none, ``noised`` only noised ones."""
    raw = node_config.get("share-evaluation", True)
    text = str(raw).strip().lower()
    if text not in _SHARING:
        raise ConfigError(f"node config share-evaluation = {raw!r} must be true, false or noised")
    return _SHARING[text]


def shares_item_histogram(node_config: Mapping[str, Any]) -> bool:
    """Node config ``share-item-histogram`` (default true): whether this partner answers an ``item-prior``
    query with its noised item histogram (a DP release on its ledger, inside its target)."""
    raw = node_config.get("share-item-histogram", True)
    sharing = _SHARING.get(str(raw).strip().lower())  # share-evaluation's words, less "noised"
    if sharing not in ("any", "none"):
        raise ConfigError(f"node config share-item-histogram = {raw!r} must be true or false")
    return sharing == "any"


def refuse_evaluation_unless_shared(node_config: Mapping[str, Any], evaluation_noise: float = 0.0) -> None:
    """:class:`PrivacyError` (the server logs it and combines the others) if this partner shares no
    evaluation, or only noised evaluation and the run's ``evaluation_noise`` is 0."""
    sharing = shares_evaluation(node_config)
    if sharing == "none":
        raise PrivacyError("this partner's node config share-evaluation = false: it sends no evaluation metrics, "
                           "which are computed on its users without noise")
    if sharing == "noised" and not evaluation_noise > 0:
        # one apostrophe at most: the reply sanitiser reads a pair as quotes around a data value
        raise PrivacyError("this partner's node config share-evaluation = noised: it sends evaluation sums only "
                           "with DP noise, and the evaluation-noise-multiplier of this run is 0")


def _shown(key: str) -> str:
    """A key name as the coordinator may read it: bare when it is a plain name (the reply sanitiser
    removes quoted text as a possible data value, and the coordinator saw "key <value> is unknown")."""
    return key if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", key) else repr(key)


def _cap(node_config: Mapping[str, Any], key: str, upper: float) -> float | None:
    if key not in node_config:
        return None
    raw = node_config[key]
    try:
        value = math.nan if isinstance(raw, bool) else float(raw)  # float(True) would be a cap of 1
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value < upper:
        # in words, not "(0, inf)": the reply sanitiser drops parenthesised text, and the coordinator read
        # "must be a number in" (a review)
        below = "" if math.isinf(upper) else f" and below {upper:g}"
        raise ConfigError(f"node config {key} = {raw!r} must be a number above 0{below}")
    return value


def max_epsilon(node_config: Mapping[str, Any]) -> float | None:
    """The partner's ``max-epsilon`` (None: the run's target applies)."""
    return _cap(node_config, "max-epsilon", math.inf)


def partner_delta(delta: float, node_config: Mapping[str, Any], users: int) -> float:
    """The delta this partner trains at: the run's (already resolved), or less. ``max-delta`` caps
    it; with ``max-epsilon`` and no ``max-delta`` the cap is ``default_delta(users)`` (at most 1e-5
    and 0.1 / users), else a run asking for delta 0.5 would calibrate almost no noise and account
    the partner's whole ledger at that delta, giving back spent budget. The result is refused when
    meaningless (at least 1 / users: :func:`common.privacy.refuse_meaningless_delta`)."""
    cap = _cap(node_config, "max-delta", 1.0)
    if cap is None and max_epsilon(node_config) is not None:
        cap = default_delta(users)
    return refuse_meaningless_delta(delta if cap is None else min(delta, cap), users)


def refuse_a_cap_without_ledger(node_config: Mapping[str, Any]) -> None:
    """A deployed partner's ``max-epsilon`` needs ``ledger-path``: else the ledger would live where the run
    config says (run-dir, ledger-dir), the coordinator's choice, so every new run could start from zero spend."""
    cap = max_epsilon(node_config)
    if cap is not None and not str(node_config.get("ledger-path", "")).strip() and "partition-id" not in node_config:
        raise ConfigError(f"node config max-epsilon = {cap:g} caps this partner's privacy ledger, so it needs "
                          "node config ledger-path = the one ledger file every run uses")


def apply_partner_policy(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` as this partner will train it: local DP-SGD forced on and the epsilon target capped
    by node config ``max-epsilon`` (unchanged without it). ``max-delta`` is checked here and applied
    where the delta is resolved (:func:`partner_delta`)."""
    check_node_config(node_config)
    cap = max_epsilon(node_config)
    out = dict(cfg)
    if cap is None:
        if "max-delta" in node_config and not uses_local_dp(dp_mode(cfg)):
            # The partner asked for a delta, so it expects DP-SGD; without an epsilon there is no budget to force
            # it at, and training without DP would leave max-delta a promise nothing keeps
            raise PrivacyError(f"this partner's node config sets max-delta but not max-epsilon, and the run has no "
                               f"local DP-SGD, dp-mode {dp_mode(cfg)}: set max-epsilon too to have DP-SGD forced "
                               "at that budget, or remove max-delta to train as the run asks")
        return out
    refuse_a_cap_without_ledger(node_config)
    mode = dp_mode(cfg)
    if not uses_local_dp(mode):
        out.update({"dp": True, "dp-mode": "both" if uses_central_dp(mode) else "local", "target-epsilon": cap})
        if many := [k for k in ONE_USER_MANY_EXAMPLES if cfg.get(k)]:
            # no parentheses: the sanitiser (client/safe_errors.py) drops them from the server's copy
            raise PrivacyError(f"this partner's node config max-epsilon = {cap:g} allows only local DP-SGD, and the "
                               f"run sets {many[0]} = true, which makes one user several examples; DP-SGD needs "
                               "one example per user, so the coordinator must turn it off")
        LOG.warning("the run asks for dp-mode = %s; node config max-epsilon = %g: training with local DP-SGD "
                    "(dp-mode %s for this partner) at epsilon <= %g", mode, cap, out["dp-mode"], cap)
    elif float(cfg["target-epsilon"]) > cap:
        out["target-epsilon"] = cap
        LOG.warning("the run asks for target-epsilon = %g; node config max-epsilon = %g applies",
                    float(cfg["target-epsilon"]), cap)
    from common.config_checks import check_values  # imports pandas; client.app must load without it

    check_values(out)  # the run was checked without DP-SGD: e.g. ghost clipping cannot clip a tied output
    return out
