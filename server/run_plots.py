"""A run directory's plots (matplotlib, headless): ``rounds.png`` and ``partners.png``.

- ``rounds.png``: HR@K and NDCG@K of the global model per evaluated round;
- ``partners.png``: each partner's own NDCG@K in the last evaluated round (partition id order).

The ServerApp draws them when a run ends (``flwr run`` as well as simulations), so every run
directory has them, as DESIGN.md's run directory lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_rounds(run_dir: Path, rounds: Sequence[dict[str, Any]], top_k: int = 10) -> list[Path]:
    """Draw the run's plots from its ``metrics.jsonl`` lines; returns the files written ([] when no
    round was evaluated)."""
    import matplotlib

    matplotlib.use("Agg")  # no screen on a server
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    hr, ndcg = f"hr@{top_k}", f"ndcg@{top_k}"
    evaluated = [line for line in rounds if line.get(ndcg) is not None]  # evaluate-every: others are null
    if not evaluated:
        return []
    out = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in (hr, ndcg):
        done = [line for line in evaluated if line.get(key) is not None]
        ax.plot([line["round"] for line in done], [line[key] for line in done], marker="o", label=key.upper())
    ax.set_xlabel("round")
    ax.set_ylabel("test metric")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_title(run_dir.name, fontsize=8)
    spent = [line for line in rounds if line.get("epsilon")]  # local DP: the worst partner's epsilon so far
    if spent:
        twin = ax.twinx()
        twin.plot([line["round"] for line in spent], [line["epsilon"] for line in spent], color="grey",
                  linestyle="--", marker=".", label="epsilon (worst partner)")
        twin.set_ylabel("epsilon")
        twin.set_ylim(bottom=0)
        handles, labels = ax.get_legend_handles_labels()
        more, more_labels = twin.get_legend_handles_labels()
        ax.legend(handles + more, labels + more_labels, fontsize=8)
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "rounds.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "rounds.png")
    last = evaluated[-1]
    partners, ticks, xlabel = partner_bars(last, ndcg)
    if partners:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(range(len(partners)), partners)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8 if len(ticks) > 10 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"NDCG@{top_k} (round {last['round']})")
        ax.set_ylim(0, max(max(partners) * 1.15, 0.01))  # all zeros drew a -0.04..0.04 axis
        fig.tight_layout()
        fig.savefig(run_dir / "partners.png", dpi=110)
        plt.close(fig)
        out.append(run_dir / "partners.png")
    return out


def partner_bars(line: dict[str, Any], ndcg: str = "ndcg@10") -> tuple[list[float], list[str], str]:
    """One round's per-partner NDCG as bars: (values, one tick label per bar or none past 25 bars,
    x label). Simulated partners are named by their partition id, so a round that evaluated a sample
    (``fraction-evaluate`` < 1) names the partners it evaluated; it drew 0..k-1 under "partition id"."""
    values = [float(v) for v in line.get(f"partner-{ndcg}") or []]
    ids = line.get(f"partner-{ndcg}-ids") or []
    named = len(ids) == len(values) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ticks = [str(i) for i in ids] if named else [str(k + 1) for k in range(len(values))]
    xlabel = f"partner ({'partition id' if named else 'in partition order'}; {len(values)} evaluated)"
    return values, ticks if len(values) <= 25 else [], xlabel
