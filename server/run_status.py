"""``fedrec-server report RUN_DIR``: where a run stands, read from its directory, with an exit status.

``flwr run --stream`` exits 0 whatever the run's outcome, and a ServerApp's refusal reaches the
coordinator as Flower's log; a script needs a status it can test. The report reads only files the
ServerApp wrote (``config.json``, ``metrics.jsonl``, ``privacy.json``, ``summary.md``, ``model.pt``):

- **complete** (exit 0): every planned round logged, each one aggregated at least one update, and the
  run's final files written;
- **incomplete** (exit 3): fewer rounds logged than planned (running, stopped or crashed: resume it
  with ``resume = true``), or no ``summary.md``;
- **failed rounds** (exit 3): rounds in which no partner's update was aggregated (every partner
  refused, e.g. an exhausted budget, or every update was rejected); the partners' reasons are listed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.cli_errors import RUN_NOT_COMPLETE
from common.errors import DataError
from common.run_files import CHECKPOINT_NAME, finite_or_null, metrics_lines, read_json_object

INCOMPLETE = RUN_NOT_COMPLETE  # the exit status of a run that is not complete (a user mistake is 2)


def _partner(p: dict[str, Any]) -> dict[str, Any]:
    """One partner's line: epsilon only for a partner that trained with local DP-SGD (0.0 read as perfect privacy)."""
    local = float(p.get("noise-multiplier") or 0) > 0 or float(p.get("epsilon") or 0) > 0
    return {"epsilon": p.get("epsilon") if local else None, "delta": p.get("delta") if local else None,
            "target-epsilon": p.get("target-epsilon") if local else None,
            "rounds-trained": p.get("rounds-trained", []),
            "refused": [r.get("reason") for r in p.get("refused", [])],
            "refused-evaluation": len(p.get("refused-evaluation", [])), "no-reply": p.get("no-reply", []),
            "not-aggregated": [r.get("reason") for r in p.get("not-aggregated", [])]}


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything :func:`format_status` prints, as plain JSON-ready values."""
    run_dir = Path(run_dir).expanduser().resolve()  # (`report .` from inside the run had no name)
    if not run_dir.exists():  # it read "not a run directory (no config.json ...)" (a review)
        raise DataError(f"{run_dir}: no such directory")
    if not (run_dir / "config.json").is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.json; the ServerApp writes one when a run starts)")
    cfg = read_json_object(run_dir / "config.json")
    if "num-server-rounds" not in cfg:  # `{}` read "complete, 2 of 0 rounds logged" (a coordinator review)
        raise DataError(f"{run_dir / 'config.json'}: no num-server-rounds; not a run's config (edited or damaged)")
    try:
        planned, k = int(cfg.get("num-server-rounds", 0)), int(cfg.get("top-k", 10))
    except (TypeError, ValueError):  # a traceback (a research-CLI review)
        raise DataError(f"{run_dir / 'config.json'}: num-server-rounds or top-k is not a whole number "
                        f"({cfg.get('num-server-rounds')!r}, {cfg.get('top-k')!r}); the file was edited or "
                        "damaged") from None
    rounds = [finite_or_null(r) for r in metrics_lines(run_dir / "metrics.jsonl") if "round" in r]
    failed = [r["round"] for r in rounds if not r.get("num-partners")]
    evaluated = [r for r in rounds if r.get(f"ndcg@{k}") is not None]
    has_privacy = (run_dir / "privacy.json").is_file()
    privacy = read_json_object(run_dir / "privacy.json") if has_privacy else {}
    partners = privacy.get("partners", {}) if isinstance(privacy.get("partners"), dict) else {}
    finished = (run_dir / "summary.md").is_file() and (run_dir / "model.pt").is_file()
    if len(rounds) < planned or not finished:
        status = "incomplete"
    elif failed:
        status = "failed rounds"
    else:
        status = "complete"
    last = evaluated[-1] if evaluated else None
    return finite_or_null({
        "run": run_dir.name, "path": str(run_dir), "status": status, "rounds-logged": len(rounds),
        "rounds-planned": planned, "failed-rounds": failed, "top-k": k,
        "final": None if last is None else {key: last.get(key) for key in ("round", f"hr@{k}", f"ndcg@{k}", "eval-users")},
        "guarantee": privacy.get("guarantee") if has_privacy else None, "privacy-json": has_privacy,
        "checkpoint": (run_dir / CHECKPOINT_NAME).is_file(),
        "partners": {label: _partner(p) for label, p in sorted(partners.items()) if isinstance(p, dict)},
    })


def _number(value: Any, digits: int = 3) -> str:
    return "-" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:.{digits}f}"


def format_status(status: dict[str, Any]) -> str:
    """The report for a person: one status line, the final metrics, the guarantee, one line per partner."""
    lines = [f"run {status['run']} ({status['path']}): {status['status']}, {status['rounds-logged']} of "
             f"{status['rounds-planned']} rounds logged"]
    if status["failed-rounds"]:
        lines.append(f"  rounds that aggregated no update: {', '.join(map(str, status['failed-rounds']))}")
    if status["status"] == "incomplete" and status["checkpoint"]:
        lines.append("  (running, stopped or crashed: resume with --run-config 'run-name=\"%s\" resume=true')"
                     % status["run"])
    elif status["status"] == "incomplete":  # resume refuses a run without one (a coordinator review)
        lines.append("  (running, or stopped before its first checkpoint: no checkpoint to resume from; start it again)")
    final, k = status["final"], status["top-k"]
    if final:
        lines.append(f"  final evaluation (round {final['round']}): HR@{k} {_number(final[f'hr@{k}'], 4)}, "
                     f"NDCG@{k} {_number(final[f'ndcg@{k}'], 4)}, {int(final.get('eval-users') or 0)} test users")
    else:
        lines.append("  no round was evaluated (fraction-evaluate = 0, or every evaluation failed)")
    if status["guarantee"]:
        lines.append(f"  {status['guarantee']}")
    elif not status["privacy-json"]:
        lines.append("  no privacy.json: no round has reported yet, or a run of an older version")
    else:  # the ServerApp always states one, "no DP" included
        lines.append("  privacy.json states no guarantee: the file was edited or damaged")
    for label, p in status["partners"].items():
        trained = ",".join(map(str, p.get("rounds-trained") or [])) or "none"
        extra = [f"refused {len(p['refused'])}x ({p['refused'][-1]})" if p["refused"] else "",
                 f"no reply in rounds {','.join(map(str, p['no-reply']))}" if p["no-reply"] else "",
                 f"{len(p['not-aggregated'])} update(s) not aggregated ({p['not-aggregated'][-1]})"
                 if p["not-aggregated"] else "",
                 f"refused {p['refused-evaluation']} evaluation(s)" if p["refused-evaluation"] else ""]
        # A partner refused before any reply with its numbers may well run local DP (a journey review: "no local DP")
        unknown = p["epsilon"] is None and not p.get("rounds-trained") and (p["refused"] or p["no-reply"])
        spent = ("epsilon unknown (no reply with privacy numbers)" if unknown else "no local DP" if p["epsilon"] is None
                 else f"epsilon {_number(p['epsilon'])} (delta {p.get('delta') or '-'})"
                 + (f", up to its target {p['target-epsilon']:g} if it trained in a round it did not answer"
                    if p["no-reply"] and p.get("target-epsilon") else ""))
        lines.append(f"  {label}: {spent}, trained in rounds {trained}" + "".join(f"; {e}" for e in extra if e))
    return "\n".join(lines)
