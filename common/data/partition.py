"""Assign users to partner organisations (simulation only; real partners bring their own logs).

Schemes (``partitioning`` config key):

- ``iid``: shuffled users in near-equal groups.
- ``dirichlet``: label skew over a user attribute (dominant genre / item cluster): each
  attribute value's users are split over partners with proportions ~ Dir(``dirichlet-alpha``)
  (flwr-datasets' ``DirichletPartitioner``; smaller alpha = more skew).
- ``size-skew``: partner ``i`` (1-based) gets users in proportion to ``i ** size-skew-power``,
  so a few partners are large and many small (flwr-datasets' ``IdToSizeFncPartitioner``).
- ``cross-device``: one partner per user (``num-partitions`` must equal the number of users).

Every scheme is deterministic in ``seed`` and puts every user in exactly one partition.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from common.data.sequences import SequenceData
from common.errors import DataError, EmptyPartitionError

SCHEMES = ("iid", "dirichlet", "size-skew", "cross-device")


def iid_partition(num_users: int, num_partitions: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle users and split them into ``num_partitions`` near-equal groups (sorted indices)."""
    if num_partitions < 1:
        raise DataError(f"num-partitions must be at least 1, got {num_partitions}")
    if num_users < num_partitions:
        raise DataError(f"cannot split {num_users} users into {num_partitions} partitions: some would be empty")
    perm = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def _users_dataset(attribute: np.ndarray, seed: int):
    """A Hugging Face dataset with one row per user (its position and attribute), for flwr-datasets."""
    from datasets import Dataset

    return Dataset.from_dict({"user": np.arange(len(attribute)), "attribute": attribute.astype(str).tolist()})


def dirichlet_partition(attribute: np.ndarray, num_partitions: int, *, alpha: float = 0.5, seed: int = 0,
                        min_partition_size: int = 1) -> list[np.ndarray]:
    """Label skew over ``attribute`` (one value per user) via flwr-datasets' DirichletPartitioner."""
    from flwr_datasets.partitioner import DirichletPartitioner

    if alpha <= 0:
        raise DataError(f"dirichlet-alpha must be > 0, got {alpha}")
    if len(attribute) < num_partitions * max(min_partition_size, 1):
        raise DataError(f"cannot split {len(attribute)} users into {num_partitions} partitions of at least {min_partition_size}")
    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="attribute", alpha=alpha,
                                min_partition_size=min_partition_size, self_balancing=True, shuffle=True, seed=seed)
    part.dataset = _users_dataset(attribute, seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # retries below min_partition_size are reported by the error below
            return [np.sort(np.asarray(part.load_partition(i)["user"], dtype=np.int64)) for i in range(num_partitions)]
    except ValueError as exc:
        raise DataError(f"dirichlet partitioning failed ({exc}); raise dirichlet-alpha or use fewer partners") from None


def size_skew_sizes(num_users: int, num_partitions: int, power: float) -> list[int]:
    """Partition sizes proportional to ``i ** power`` (i = 1..n), floored, remainder to the last.

    Same rule as flwr-datasets' ``IdToSizeFncPartitioner`` (which this module uses).
    """
    units = np.linspace(1, num_partitions, num_partitions) ** power
    sizes = np.array(units / units.sum() * num_users, dtype=np.int64)
    sizes[-1] += num_users - sizes.sum()
    return sizes.tolist()


def size_skew_partition(num_users: int, num_partitions: int, *, power: float = 2.0, seed: int = 0) -> list[np.ndarray]:
    """A few large partners and many small: sizes from :func:`size_skew_sizes`, users shuffled first."""
    from flwr_datasets.partitioner import IdToSizeFncPartitioner

    if num_partitions < 1:
        raise DataError(f"num-partitions must be at least 1, got {num_partitions}")
    if min(size_skew_sizes(num_users, num_partitions, power)) < 1:
        raise DataError(f"size-skew-power {power} leaves a partner of {num_partitions} without users "
                        f"({num_users} users); lower the power or use fewer partners")
    part = IdToSizeFncPartitioner(num_partitions=num_partitions, partition_id_to_size_fn=lambda x: x ** power)
    # The partitioner assigns contiguous ranges, so shuffle users first.
    perm = np.random.default_rng(seed).permutation(num_users)
    part.dataset = _users_dataset(np.zeros(num_users), seed).select(perm.tolist())
    return [np.sort(np.asarray(part.load_partition(i)["user"], dtype=np.int64)) for i in range(num_partitions)]


def cross_device_partition(num_users: int, num_partitions: int) -> list[np.ndarray]:
    """One partner per user, in user order."""
    if num_partitions != num_users:
        raise DataError(f"cross-device partitioning needs one partner per user: {num_users} partners, got {num_partitions}")
    return [np.array([u], dtype=np.int64) for u in range(num_users)]


def partition_users(data: SequenceData, num_partitions: int, *, scheme: str = "iid", seed: int = 0,
                    alpha: float = 0.5, size_power: float = 2.0, attribute: np.ndarray | None = None) -> list[np.ndarray]:
    """User positions per partition; every user is in exactly one partition.

    ``attribute`` (one value per user) is required by ``dirichlet``; see
    :func:`common.data.attributes.user_attribute`.
    """
    if scheme == "iid":
        return iid_partition(data.num_users, num_partitions, seed=seed)
    if scheme == "dirichlet":
        if attribute is None or len(attribute) != data.num_users:
            raise DataError("dirichlet partitioning needs one attribute value per user")
        return dirichlet_partition(attribute, num_partitions, alpha=alpha, seed=seed)
    if scheme == "size-skew":
        return size_skew_partition(data.num_users, num_partitions, power=size_power, seed=seed)
    if scheme == "cross-device":
        return cross_device_partition(data.num_users, num_partitions)
    raise DataError(f"unknown partitioning {scheme!r}; available: {', '.join(SCHEMES)}")


def partition_statistics(parts: list[np.ndarray], attribute: np.ndarray | None = None) -> dict:
    """Sizes (users per partner: min/median/max) and, with ``attribute``, how skewed partners are.

    ``attribute-share`` is each partner's share of its most common attribute value (1.0 =
    one value only); ``attribute-tv`` is the mean total-variation distance between a
    partner's attribute distribution and the whole population's (0 = IID).
    """
    sizes = np.array([len(p) for p in parts])
    stats: dict = {"partners": len(parts), "users": int(sizes.sum()), "size-min": int(sizes.min()),
                   "size-median": float(np.median(sizes)), "size-max": int(sizes.max()), "sizes": sizes.tolist()}
    if attribute is not None and len(parts):
        values, codes = np.unique(attribute, return_inverse=True)
        overall = np.bincount(codes, minlength=len(values)) / len(codes)
        shares, tvs = [], []
        for p in parts:
            if len(p) == 0:
                continue
            dist = np.bincount(codes[p], minlength=len(values)) / len(p)
            shares.append(float(dist.max()))
            tvs.append(0.5 * float(np.abs(dist - overall).sum()))
        stats.update({"attribute-values": len(values), "attribute-share-mean": float(np.mean(shares)),
                      "attribute-tv-mean": float(np.mean(tvs))})
    return stats


def format_statistics(stats: dict, label: str = "") -> str:
    """One readable line of :func:`partition_statistics`."""
    line = (f"{label}{stats['partners']} partners, {stats['users']} users; users per partner "
            f"min {stats['size-min']} / median {stats['size-median']:g} / max {stats['size-max']}")
    if "attribute-tv-mean" in stats:
        line += (f"; attribute skew: top-value share {stats['attribute-share-mean']:.2f}, "
                 f"TV distance to population {stats['attribute-tv-mean']:.2f} ({stats['attribute-values']} values)")
    return line


def load_partition(data: SequenceData, partition_id: int, num_partitions: int, *, scheme: str = "iid", seed: int = 0,
                   **options: Any) -> SequenceData:
    """The users of one partner; a clear error for an id out of range or an empty partition.

    ``options`` go to :func:`partition_users` (``alpha``, ``size_power``, ``attribute``).
    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    parts = partition_users(data, num_partitions, scheme=scheme, seed=seed, **options)
    users = parts[partition_id]
    if len(users) == 0:
        raise EmptyPartitionError(f"partition {partition_id} of {num_partitions} ({scheme}) has no users")
    return data.subset(users, name=f"{data.name}[partition {partition_id}/{num_partitions}]")
