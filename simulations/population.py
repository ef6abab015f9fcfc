"""Who is in a simulation: partition statistics (printed by the runner) and the held-out users.

``holdout.json`` in the run directory lists the raw ids of users never trained on (the
non-members of ``simulations.audit``); ``partitions.json`` the partners' statistics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.data.partition import format_statistics
from common.files import atomic_write_text
from common.partners import simulated_statistics, split_population


def describe_partners(cfg: Mapping[str, Any], num_partners: int) -> str:
    """One line: partner sizes and attribute skew of this configuration."""
    stats = simulated_statistics(cfg, num_partners)
    return format_statistics(stats, label=f"partitioning {cfg['partitioning']}: ")


def refuse_another_partner_count(run_dir: Path, num_partners: int) -> None:
    """Resuming a simulation: one line unless ``num_partners`` is the count its partners trained with
    (``privacy.json``: each reply names its ``num-partitions``). Another count splits the same users
    another way, so users move to partners whose ledgers hold none of their earlier spend, and the
    run's epsilon would restart low while those users' real loss keeps adding up."""
    from common.errors import FedRecError
    from simulations.run_claims import read_json_object

    report = Path(run_dir) / "privacy.json"
    partners = (read_json_object(report).get("partners") or {}) if report.is_file() else {}
    counts = sorted({str(p["num-partitions"]) for p in partners.values() if isinstance(p, dict) and p.get("num-partitions")})
    split = Path(run_dir) / "partitions.json"  # a finished run of an older version: its split, written at the end
    if not counts and split.is_file():
        recorded = read_json_object(split).get("partners")
        counts = [str(recorded)] if isinstance(recorded, int) else []
    if counts and counts != [str(num_partners)]:
        raise FedRecError(f"{run_dir} was trained by {' / '.join(counts)} simulated partners, not {num_partners}: "
                          f"resume with --num-partners {counts[-1]} (another count splits the users another way, "
                          "and partners' ledgers would miss their earlier spend)")


def write_population(run_dir: Path, cfg: Mapping[str, Any], num_partners: int) -> None:
    """Write ``holdout.json`` and ``partitions.json`` into ``run_dir``."""
    population, held = split_population(cfg)
    atomic_write_text(run_dir / "holdout.json", json.dumps({
        "holdout-fraction": float(cfg.get("holdout-fraction", 0.0)),
        "seed": int(cfg["seed"]),
        "members": len(population.user_ids),
        "user-ids": held.user_ids.tolist(),
    }))
    stats = simulated_statistics(cfg, num_partners)
    atomic_write_text(run_dir / "partitions.json", json.dumps({"partitioning": cfg["partitioning"], **stats}, indent=1))
