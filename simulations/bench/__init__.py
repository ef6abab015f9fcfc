"""Short benchmarks (minutes on a laptop CPU); each prints the numbers the README quotes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


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


def write_results(path: str | Path, result: dict | list) -> Path:
    """Write a benchmark's results as indented JSON (creating the folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_or_null(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")
    return path
