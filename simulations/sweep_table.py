"""The sweep's results table: one metric as a markdown table, mean +- std over seeds per epsilon."""

from __future__ import annotations

import math
from pathlib import Path

from common.errors import DataError

METRICS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "coverage@10", "pop@10",
           "partner-ndcg@10-std", "partner-ndcg@10-min", "partner-ndcg@10-max", "epsilon", "delta", "train-loss")
# Columns of a results row that describe the run, not its configuration (never a table row or plot line);
# commit: the code it was measured with (eighteenth session)
RUN_COLUMNS = ("run-id", "status", "rounds", "seconds", "run-dir", "commit")


def _column(row) -> str:  # noqa: ANN001 -- a pandas row
    """A results-table column: the target epsilon, or for a run without a local budget the epsilon it
    states, marked (central DP), so a column never mixes the two kinds of claim."""
    from simulations.run_claims import as_epsilon, run_epsilon

    if str(row["target-epsilon"]) == "(not set)":
        return "(not set)"
    stated = run_epsilon(row)
    if stated == as_epsilon(row["target-epsilon"]):
        return str(row["target-epsilon"])
    return "inf" if math.isinf(stated) else f"{stated:.3g} (central)"  # no DP at all: the no-DP column


def results_table(csv_path: Path, metric: str = "ndcg@10") -> str:
    """A markdown table of ``metric``: rows = the varying config keys but epsilon, columns = epsilon
    (the target per partner; a central-DP run's stated epsilon, marked), cells = mean +- std over
    seeds (n = number of finished seeds)."""
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no results file; run the sweep first (it writes its rows there)")
    try:
        frame = pd.read_csv(csv_path, dtype={"target-epsilon": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path} is empty; run the sweep again to write its rows") from None
    except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{csv_path} is not a sweep results CSV ({type(exc).__name__}); "
                        "move it away and run the sweep again") from None
    if "status" not in frame.columns:
        raise DataError(f"{csv_path} has no 'status' column, so it is not a sweep results CSV; "
                        "move it away and run the sweep again")
    if metric not in frame.columns:
        known = ", ".join(m for m in METRICS if m in frame.columns) or "none"
        raise DataError(f"{csv_path} has no {metric!r} column (metrics there: {known})")
    frame = frame[frame["status"] == "ok"]
    if frame.empty:
        return "(no finished run)"
    values = pd.to_numeric(frame[metric], errors="coerce")
    if len(bad := frame[values.isna() & frame[metric].notna()]):  # a hand-edited or damaged cell: pandas' traceback
        row = bad.iloc[0]
        raise DataError(f"{csv_path}: run {row.get('run-id', '?')} has {metric} = {str(row[metric])[:40]!r}, not a "
                        "number; mend or remove that row")
    frame = frame.assign(**{metric: values})
    if "target-epsilon" not in frame.columns:  # a sweep that does not vary or fix epsilon: one column
        frame = frame.assign(**{"target-epsilon": "(not set)"})
    skip = {*RUN_COLUMNS, "seed", "target-epsilon", *METRICS}
    rows = [c for c in frame.columns if c not in skip and frame[c].nunique(dropna=False) > 1]

    def order(e: object) -> float:
        try:
            return float(e)  # "inf" too
        except (TypeError, ValueError):
            return math.inf

    # A run without a local budget (central DP alone) sits in the column of the epsilon it states, as in the
    # plot: under its target "inf" it looked like a run without any DP
    frame = frame.assign(column=[_column(row) for _, row in frame.iterrows()])
    eps = sorted(frame["column"].unique(), key=lambda c: order(c.split(" ")[0]))
    lines = [f"| {' / '.join(rows) or 'config'} | " + " | ".join(f"eps={e}" for e in eps) + " |",
             "|---" * (len(eps) + 1) + "|"]
    for key, g in (frame.groupby(rows) if rows else [("all", frame)]):
        cells = []
        for e in eps:
            v = g[g["column"] == e][metric].astype(float)
            if len(v) and not all(map(math.isfinite, v)):  # e.g. epsilon of runs without DP: no spread to show
                cells.append(f"{v.mean():.4f} (n={len(v)})")
                continue
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f} (n={len(v)})" if len(v) > 1 else
                         f"{v.mean():.4f} (n=1)" if len(v) else "-")  # sample std (n - 1)
        label = " / ".join(map(str, key if isinstance(key, tuple) else (key,)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
