"""Short benchmarks (minutes on a laptop CPU); each prints the numbers the README and docs/ quote."""

from __future__ import annotations

import json
from pathlib import Path

from common.run_files import finite_or_null

RESULTS = Path(__file__).parent / "results"


def write_results(path: str | Path, result: dict | list) -> Path:
    """Write a benchmark's results as indented JSON (creating the folder) and say where."""
    from common.files import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomically: a failed write (a full disk) keeps the earlier results whole
    atomic_write_text(path, json.dumps(finite_or_null(result), indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")
    return path
