"""PNG plots of runs and sweeps (matplotlib, headless).

- ``plot_run(run_dir)``: redraws ``rounds.png`` (HR@10/NDCG@10 per round) and ``partners.png``
  (final NDCG@10 of each partner), which the ServerApp draws in every run directory.
- ``plot_sweep(csv)``: beside the CSV, ``<stem>_ndcg_vs_epsilon.png`` (mean over seeds,
  each seed a dot, bars = min..max), ``<stem>_rounds.png`` (NDCG@10 per round, mean over
  seeds, per configuration) and ``<stem>_partners.png`` (per-partner NDCG@10 spread).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from simulations.run_claims import as_epsilon, metrics_lines, run_epsilon  # noqa: E402
from simulations.sweep_table import METRICS, RUN_COLUMNS  # noqa: E402

IGNORED = {*RUN_COLUMNS, "seed", "target-epsilon"}


def _rounds(run_dir: Path) -> list[dict]:
    """The run's rounds; a line cut short by a crash mid-write is skipped with a warning (it stopped the sweep)."""
    return metrics_lines(Path(run_dir) / "metrics.jsonl")


def plot_run(run_dir: Path) -> list[Path]:
    """Redraw one run's ``rounds.png`` / ``partners.png`` (the ServerApp draws them when the run ends:
    ``server/run_plots.py``) from its ``metrics.jsonl``; returns the files written."""
    from server.run_plots import plot_rounds

    config = Path(run_dir) / "config.json"
    try:
        top_k = int(json.loads(config.read_text()).get("top-k", 10)) if config.exists() else 10
    except (ValueError, TypeError, AttributeError):
        top_k = 10  # an unreadable config: the default cut-off, as the metrics lines are still plotted
    return plot_rounds(Path(run_dir), _rounds(run_dir), top_k)


def _label(row: pd.Series, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys) or "all"


def plot_sweep(csv_path: Path) -> list[Path]:
    """The sweep's three plots beside ``csv_path``; returns the files written."""
    csv_path = Path(csv_path)
    frame = pd.read_csv(csv_path, dtype={"target-epsilon": str})
    frame = frame[frame["status"] == "ok"]
    if frame.empty:
        return []
    varying = [c for c in frame.columns if c not in IGNORED and c not in _metric_columns(frame)
               and frame[c].nunique(dropna=False) > 1]
    groups = frame.groupby(varying, dropna=False) if varying else [((), frame)]
    written = []
    stem = csv_path.with_suffix("")

    if "target-epsilon" not in frame.columns:  # a sweep that does not vary it ran at the default (no plot was drawn)
        from common.config import DEFAULTS

        frame = frame.assign(**{"target-epsilon": DEFAULTS["target-epsilon"]})
    epsilons = frame.apply(run_epsilon, axis=1)
    finite = [e for e in epsilons if math.isfinite(e)]
    fmax = max(finite) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, g in groups:
        xs = epsilons[g.index].map(lambda e: e if math.isfinite(e) else fmax * 2)
        stats = g.assign(x=xs).groupby("x")["ndcg@10"].agg(["mean", "min", "max"]).sort_index()
        line = ax.errorbar(stats.index, stats["mean"], yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                           marker="o", capsize=3, label=_label(g.iloc[0], varying))
        ax.scatter(xs, g["ndcg@10"], s=10, alpha=0.5, color=line[0].get_color())
    ticks = sorted({e if math.isfinite(e) else fmax * 2 for e in epsilons})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, ["no DP" if t == fmax * 2 else f"{t:g}" for t in ticks])
    stated = any(e != as_epsilon(t) for e, t in zip(epsilons, frame["target-epsilon"]) if math.isfinite(e))
    # two lines: one did not fit the figure (a journey review); with central DP alone the x values are the coordinator's
    ax.set_xlabel("epsilon per user: per partner (local DP),\nor the coordinator's stated one (central DP alone)"
                  if stated else "target epsilon per partner (user-level)")
    ax.set_ylabel("NDCG@10 (test, full ranking)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(f"{stem}_ndcg_vs_epsilon.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    per_config = [c for c in frame.columns if c not in IGNORED and c not in _metric_columns(frame) and frame[c].nunique(dropna=False) > 1]
    config_keys = per_config + (["target-epsilon"] if "target-epsilon" in frame.columns else [])
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    partners: dict[str, list[float]] = defaultdict(list)
    gone = [str(row["run-dir"]) for _, row in frame.iterrows() if not Path(str(row["run-dir"])).is_dir()]
    if gone:  # their rounds were left out of the curves in silence (a research-CLI review)
        print(f"warning: {len(gone)} of the {len(frame)} runs' directories are gone (e.g. {gone[0]}): the round "
              "curves and per-partner plots leave them out", file=sys.stderr)
    for _, row in frame.iterrows():
        label = _label(row, config_keys)
        lines = _rounds(Path(str(row["run-dir"])))
        for x in lines:  # a round without evaluation (evaluate-every, failed) has no point, not 0
            if x.get("ndcg@10") is not None:
                curves[label][x["round"]].append(x["ndcg@10"])
        if lines:
            partners[label].extend(lines[-1].get("partner-ndcg@10") or [])
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, by_round in curves.items():
            rs = sorted(by_round)
            ax.plot(rs, [sum(by_round[r]) / len(by_round[r]) for r in rs], marker=".", label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers (it drew 1.2, 1.4)
        ax.set_ylabel("NDCG@10 (mean over seeds)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = Path(f"{stem}_rounds.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    if any(partners.values()):
        labels = [k for k, v in partners.items() if v]
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4))
        ax.boxplot([partners[k] for k in labels])
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=60, ha="right", fontsize=6)
        ax.set_ylabel("partner NDCG@10 (final, all seeds)")
        fig.tight_layout()
        path = Path(f"{stem}_partners.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _metric_columns(frame: pd.DataFrame) -> set[str]:
    return set(METRICS) & set(frame.columns)
