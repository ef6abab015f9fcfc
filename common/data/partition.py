"""Assign users to partner organisations (simulation only; real partners bring their own logs)."""

from __future__ import annotations

import numpy as np

from common.data.sequences import SequenceData
from common.errors import DataError


def iid_partition(num_users: int, num_partitions: int, *, seed: int = 0) -> list[np.ndarray]:
    """Shuffle users and split them into ``num_partitions`` near-equal groups (sorted indices)."""
    if num_partitions < 1:
        raise DataError(f"num-partitions must be at least 1, got {num_partitions}")
    if num_users < num_partitions:
        raise DataError(f"cannot split {num_users} users into {num_partitions} partitions: some would be empty")
    perm = np.random.default_rng(seed).permutation(num_users)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def partition_users(data: SequenceData, num_partitions: int, *, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """User positions per partition; every user is in exactly one partition."""
    if scheme == "iid":
        return iid_partition(data.num_users, num_partitions, seed=seed)
    raise DataError(f"unknown partitioning {scheme!r}; available: iid")


def load_partition(data: SequenceData, partition_id: int, num_partitions: int, *, scheme: str = "iid", seed: int = 0) -> SequenceData:
    """The users of one partner; a clear error for an id out of range or an empty partition."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    parts = partition_users(data, num_partitions, scheme=scheme, seed=seed)
    users = parts[partition_id]
    if len(users) == 0:
        raise DataError(f"partition {partition_id} of {num_partitions} ({scheme}) has no users")
    return data.subset(users, name=f"{data.name}[partition {partition_id}/{num_partitions}]")
