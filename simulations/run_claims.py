"""What a finished run directory claims: its rounds (``metrics.jsonl``) and the privacy guarantee
it states (``privacy.json``), read the same way by the audit and the sweep's results table."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.privacy import central_epsilon_per_user, dp_mode, uses_central_dp, uses_local_dp
from common.run_files import metrics_lines, read_json_object  # noqa: F401 (also read from here by the tools)


def as_epsilon(value: object) -> float:
    """A results CSV's epsilon cell as a number ("inf", empty, "none": no DP, infinity)."""
    text = str(value).strip().lower()
    return math.inf if text in ("inf", "none", "", "nan") else float(text)


def run_epsilon(row: Mapping[str, Any]) -> float:
    """A sweep row's epsilon for plots and tables: its target epsilon per partner; without a local
    budget (target "inf", or no DP-SGD at the partners whatever target it lists: dp-mode central)
    the epsilon it states (central DP: the coordinator's), so only a run with no DP at all is "no DP"."""
    target = as_epsilon(row["target-epsilon"])
    local = str(row.get("dp-mode", "local")).strip().lower() in ("local", "both", "nan", "")
    if str(row.get("dp", True)).strip().lower() in ("false", "0"):
        local = False
    return target if math.isfinite(target) and local else as_epsilon(row.get("epsilon", "inf"))


def claimed_privacy(run_dir: Path, cfg: dict) -> dict:
    """The run's claim for one user against those who see its released models (the audit's attacker):
    the worst partner's local (user-level, whole-ledger) epsilon from ``privacy.json`` and, under central
    DP, :func:`central_epsilon_per_user`; the smaller one when both hold (two bounds on the same
    neighbouring logs). Without ``privacy.json`` (older runs): the largest epsilon ``metrics.jsonl``
    recorded (a failed last round records none, which once read as "no DP"). A DP run in which no round
    aggregated an update released only its initial model: epsilon 0. Otherwise no claim: inf."""
    lines = metrics_lines(run_dir / "metrics.jsonl")
    report = read_json_object(run_dir / "privacy.json") if (run_dir / "privacy.json").exists() else None
    claims = []
    mode = dp_mode(cfg)  # dp = false: off
    if uses_local_dp(mode):
        source = "privacy.json" if report is not None else "metrics.jsonl"
        try:  # a value that is no number was a traceback that stopped an audit of several runs (a review)
            if report is not None:
                partners = (report.get("partners") or {}).values()
                spent = [(float(p["epsilon"]), float(p.get("delta") or 0.0)) for p in partners
                         if isinstance(p, dict) and float(p.get("epsilon") or 0) > 0]
            else:
                spent = [(float(x["epsilon"]), float(x.get("delta") or 0.0)) for x in lines
                         if float(x.get("epsilon") or 0) > 0]
        except (TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{run_dir / source}: an epsilon or delta is not a number ({exc}); the file was edited "
                            "or damaged") from None
        if spent:  # the largest epsilon and the largest delta: partners may account at different deltas
            claims.append((max(e for e, _ in spent), max(d for _, d in spent)))
    if uses_central_dp(mode) and report is not None:
        if (per_user := central_epsilon_per_user(report.get("central") or {})) is not None:
            claims.append(per_user)
    if not claims and mode != "off" and not any(x.get("num-partners") for x in lines):
        # DP on and no round aggregated (every round failed): the model is the initial one, trained on nobody.
        # Only then 0: a round aggregated without an accounted epsilon (central noise 0, FedAdam) claims nothing
        claims.append((0.0, 0.0))
    eps, delta = min(claims) if claims else (float("inf"), 0.0)
    evaluated = [x for x in lines if x.get("ndcg@10") is not None]
    return {"epsilon": eps, "delta": delta, "ndcg@10": evaluated[-1]["ndcg@10"] if evaluated else None}



def refuse_untrained(run_dir: Path, lines: list[dict]) -> int:
    """``NOTHING_AGGREGATED`` (3) after one ``error:`` line when no round of ``lines`` aggregated an update
    (every partner refused or was rejected: the model is the initial one, and exit 0 read as done), else 0."""
    from simulations.cli import NOTHING_AGGREGATED

    if any(line.get("num-partners") for line in lines):
        return 0
    print(f"error: no round aggregated an update: {run_dir / 'model.pt'} is the initial model (the partners' "
          f"refusals are in {run_dir / 'privacy.json'})", file=sys.stderr)
    return NOTHING_AGGREGATED
