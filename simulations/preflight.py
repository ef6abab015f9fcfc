"""What a simulation's config is refused for, found before Ray and the apps start.

The ServerApp and every partner check the same things themselves (a deployment has no preflight), but a
simulation found them only after partitioning and Ray's start (about 14 s in): a coordinator-side refusal
such as ``dp-mode="central" target-delta=0.5`` ended the run there, and a partition too small for
``batch-size`` was refused by its partner in every round; when too few partners could train, every round
failed and the run ended with the initial model. :func:`check_simulation` says so in one line first, and
:func:`partners_unable_to_train` names the partners that will refuse while the others train.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError, DataError, FedRecError, PrivacyError
from common.partners import simulated_partner
from common.privacy import default_delta, dp_mode, refuse_meaningless_delta, steps_per_epoch, uses_local_dp
from common.private_evaluation import planned_evaluations
from common.training import user_count_for_training


def partners_unable_to_train(cfg: Mapping[str, Any], num_partners: int) -> dict[int, str]:
    """``{partition id: why}`` for each simulated partner that would refuse every round before training:
    no users, no user with a training example, or (local DP with the partition's exact size, the
    simulation's default) too few users for ``batch-size`` or a ``target-delta`` meaningless for them.
    Raises :class:`FedRecError` for a data set or partitioning that cannot be split this way at all."""
    local = uses_local_dp(dp_mode(cfg))
    exact = not bool(cfg.get("simulated-count-noise", False))  # a noised count is never refused (client/privacy_budget.py)
    batch, delta = int(cfg["batch-size"]), float(cfg["target-delta"])
    evaluated = planned_evaluations(cfg) > 0
    unable: dict[int, str] = {}
    for pid in range(num_partners):
        try:
            data = simulated_partner(cfg, pid, num_partners)
        except DataError as exc:
            if "has no users" not in str(exc):
                raise
            unable[pid] = "no users"
            continue
        users = user_count_for_training(data)
        if users == 0:
            unable[pid] = f"no user with a training example among its {data.num_users} users"
        elif local and exact:
            try:
                steps_per_epoch(users, batch)
                population = max(users, data.num_users) if evaluated else users
                refuse_meaningless_delta(delta or default_delta(population), population)
            except PrivacyError as exc:
                unable[pid] = str(exc)
    return unable


def check_simulation(cfg: Mapping[str, Any], num_partners: int) -> dict[int, str]:
    """Refuse (one :class:`FedRecError` line) a simulation whose config the ServerApp would refuse, that waits
    for more partners than it has, or in which fewer than ``min-nodes`` partners can train (every round
    would fail). Returns :func:`partners_unable_to_train` for the caller to name."""
    from server.app import check_run_config  # flwr and torch: after the cheap checks of resolve_config

    min_nodes = int(cfg["min-nodes"])
    if min_nodes > num_partners:
        raise ConfigError(f"min-nodes = {min_nodes} but the simulation has {num_partners} partners: every round would "
                          f"wait node-wait-timeout and fail; lower min-nodes or raise --num-partners")
    check_run_config(cfg)
    unable = partners_unable_to_train(cfg, num_partners)
    able = num_partners - len(unable)
    if able < min_nodes:
        pid, why = next(iter(unable.items()))
        raise FedRecError(f"{len(unable)} of {num_partners} simulated partners cannot train ({'partner-' + str(pid)}: "
                          f"{why}), leaving {able}, fewer than min-nodes = {min_nodes}: every round would fail")
    return unable


def describe_unable(unable: Mapping[int, str], num_partners: int) -> str:
    """One line naming the partners that will refuse every round (empty when none)."""
    if not unable:
        return ""
    pid, why = next(iter(unable.items()))
    names = ", ".join(f"partner-{p}" for p in sorted(unable))
    return (f"warning: {len(unable)} of {num_partners} simulated partners will refuse every round ({names}); "
            f"partner-{pid}: {why}")
