"""Simulated partners: the held-out (never trained on) users, then the partition of the rest.

``holdout-fraction`` removes a seeded random share of users *before* partitioning; they
are never trained on or evaluated in the federation and serve as the non-members of the
membership-inference audit (``simulations/audit.py``). The catalogue stays the full one.
Partitions are computed once per process and configuration (cached), not once per round.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

from common.data.attributes import user_attribute
from common.data.partition import partition_statistics, partition_users
from common.data.sequences import SequenceData
from common.errors import ConfigError, DataError, EmptyPartitionError
from common.task import federation_data


def holdout_positions(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the held-out users: ``round(fraction * num_users)`` drawn with ``seed``."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"holdout-fraction must be in [0, 1), got {fraction}")
    count = int(round(fraction * num_users))
    # A distinct stream from the partitioning's, so changing the fraction does not reshuffle partners.
    perm = np.random.default_rng([seed, 7919]).permutation(num_users)
    return np.sort(perm[:count])


def split_population(cfg: Mapping[str, Any]) -> tuple[SequenceData, SequenceData]:
    """(training population, held-out users) of the federation's data set."""
    data = federation_data(cfg)
    held = holdout_positions(data.num_users, float(cfg.get("holdout-fraction", 0.0)), int(cfg["seed"]))
    keep = np.setdiff1d(np.arange(data.num_users), held)
    if len(keep) == 0:
        raise DataError("holdout-fraction leaves no user to train on")
    return data.subset(keep), data.subset(held, name=f"{data.name}[held out]")


@functools.lru_cache(maxsize=8)
def _partitions(key: tuple, num_partitions: int) -> tuple[SequenceData, list[np.ndarray], np.ndarray | None]:
    cfg = dict(key)
    population, _ = split_population(cfg)
    scheme = str(cfg["partitioning"])
    attribute = user_attribute(population, str(cfg["dataset"]), seed=int(cfg["seed"]))[0] if scheme == "dirichlet" else None
    parts = partition_users(population, num_partitions, scheme=scheme, seed=int(cfg["seed"]),
                            alpha=float(cfg.get("dirichlet-alpha", 0.5)), size_power=float(cfg.get("size-skew-power", 2.0)),
                            attribute=attribute)
    return population, parts, attribute


def clear_data_caches() -> None:
    """Forget the data sets and partitions this process loaded (a long-lived process that only checked them)."""
    from common import task

    _partitions.cache_clear()
    task.clear_data_caches()


_KEYS = ("dataset", "synthetic-users", "synthetic-items", "seed", "catalogue", "holdout-fraction", "partitioning",
         "dirichlet-alpha", "size-skew-power", "train-on-validation")


def _key(cfg: Mapping[str, Any]) -> tuple:
    return tuple((k, cfg[k]) for k in _KEYS if k in cfg)


def simulated_partner(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> SequenceData:
    """The users of simulated partner ``partition_id`` (held-out users excluded)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    population, parts, _ = _partitions(_key(cfg), num_partitions)
    users = parts[partition_id]
    if len(users) == 0:
        raise EmptyPartitionError(f"partition {partition_id} of {num_partitions} ({cfg['partitioning']}) has no users")
    return population.subset(users, name=f"{population.name}[partition {partition_id}/{num_partitions}]")


def simulated_statistics(cfg: Mapping[str, Any], num_partitions: int) -> dict:
    """:func:`common.data.partition.partition_statistics` of the simulation's partners.

    The attribute (dominant genre / item cluster) is computed even for non-skewed schemes
    so that IID and skewed partitions can be compared on the same scale.
    """
    population, parts, attribute = _partitions(_key(cfg), num_partitions)
    if attribute is None:
        attribute, _ = user_attribute(population, str(cfg["dataset"]), seed=int(cfg["seed"]))
    return partition_statistics(parts, attribute)
