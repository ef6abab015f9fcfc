"""Reading a run directory's JSON files, and writing strict JSON: shared by the coordinator's report
(server/run_status.py) and the researcher's tools (simulations/run_claims.py, simulations/bench)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from common.errors import DataError


CHECKPOINT_NAME = "checkpoint.pt"  # in a run directory: what resume=true continues (server/checkpoint.py)

def read_json_object(path: Path) -> dict:
    """A run file's JSON object; a corrupt or foreign file is one :class:`DataError` line."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def metrics_lines(path: Path) -> list[dict]:
    """``metrics.jsonl``'s rounds; a line cut short (a server killed mid-write) is skipped with a
    warning, as the claim comes from ``privacy.json`` and only the last NDCG@10 from here."""
    path = Path(path)
    if not path.exists():
        return []
    lines, bad = [], 0
    for text in path.read_bytes().splitlines():  # bytes: a line that is not UTF-8 is one unreadable line (a review)
        try:
            line = json.loads(text) if text.strip() else None
        except ValueError:  # UnicodeDecodeError included
            bad += 1
            continue
        if isinstance(line, dict):
            lines.append(line)
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return lines


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: strict JSON (a parser refuses the
    bare ``Infinity`` Python writes, and jq turns it into 1.8e308)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value
