"""What a simulation's config is refused for, found before Ray and the apps start.

The ServerApp and every partner check the same things themselves (a deployment has no preflight), but a
simulation found them only after partitioning and Ray's start (about 14 s in): a coordinator-side refusal
such as ``dp-mode="central" target-delta=0.5`` ended the run there, and a partition too small for
``batch-size`` was refused by its partner in every round; when too few partners could train, every round
failed and the run ended with the initial model. :func:`check_simulation` says so in one line first, and
:func:`partners_unable_to_train` names the partners that will refuse while the others train.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError, EmptyPartitionError, FedRecError, PrivacyError
from common.files import file_in_the_way
from common.partners import simulated_partner
from common.privacy import (calibrate_noise_after, default_delta, dp_mode, refuse_meaningless_delta, steps_per_epoch,
                            uses_local_dp)
from common.item_prior import planned_prior, refuse_unaffordable_prior
from common.private_evaluation import evaluation_mechanism, planned_evaluations
from common.training import user_count_for_training


def _unreachable(cfg: Mapping[str, Any], users: int, delta: float, evals: int, plans: dict) -> str | None:
    """Why a partner of ``users`` exact users with a fresh ledger cannot calibrate its noise (the target
    epsilon is out of reach at its sample rate and steps), None when it can; ``plans`` caches by plan."""
    rate, steps = steps_per_epoch(users, int(cfg["batch-size"]))
    per_round = int(cfg["local-epochs"]) * steps
    key = (rate, per_round, delta)
    if key not in plans:
        noise = float(cfg.get("evaluation-noise-multiplier", 0.0))
        try:  # as client/privacy_budget.py plans it: the item histogram and planned noised evaluations first,
            # DP-SGD gets the rest
            with warnings.catch_warnings():  # Opacus' "optimal order is the largest alpha" of the search's low noises
                warnings.simplefilter("ignore", UserWarning)
                refuse_unaffordable_prior(cfg, delta)
                calibrate_noise_after(planned_prior(cfg) + [evaluation_mechanism(noise)] * evals,
                                      target_epsilon=float(cfg["target-epsilon"]),
                                      target_delta=delta, sample_rate=rate, total_steps=int(cfg["num-server-rounds"])
                                      * per_round, accountant=str(cfg["accountant"]))
            plans[key] = None
        except PrivacyError as exc:
            plans[key] = str(exc)
    if plans[key] is None:
        return None
    return f"({users} users, batch-size {cfg['batch-size']}, {cfg['num-server-rounds']} rounds x {per_round} steps): {plans[key]}"


def partners_unable_to_train(cfg: Mapping[str, Any], num_partners: int) -> dict[int, str]:
    """``{partition id: why}`` for each simulated partner that would refuse every round before training: no
    users, no user with a training example, or under local DP a ``target-delta`` meaningless for its users,
    and with the partition's exact size (the simulation's default) too few users for ``batch-size`` or a
    target epsilon its fresh ledger cannot reach (a ledger with earlier spend may refuse more: not read here).
    Raises :class:`FedRecError` for a data set or partitioning that cannot be split this way at all."""
    local = uses_local_dp(dp_mode(cfg))
    # a noised count is not refused for its size and plans with the noised number (client/privacy_budget.py)
    exact = not bool(cfg.get("simulated-count-noise", False))
    delta = float(cfg["target-delta"])
    evals = planned_evaluations(cfg)
    plans: dict = {}
    unable: dict[int, str] = {}
    for pid in range(num_partners):
        try:
            data = simulated_partner(cfg, pid, num_partners)
        except EmptyPartitionError:
            unable[pid] = "no users"
            continue
        users = user_count_for_training(data)
        if users == 0:
            unable[pid] = f"no user with a training example among its {data.num_users} users"
        elif local:
            try:
                if exact:
                    steps_per_epoch(users, int(cfg["batch-size"]))
                # the population a partner checks the delta against: before drawing a noised count, every user
                # of its log; with the exact count, its training users (and evaluated ones when noised sums go out)
                population = data.num_users if not exact else max(users, data.num_users) if evals else users
                used = refuse_meaningless_delta(delta or default_delta(population), population)
                if exact and (why := _unreachable(cfg, users, used, evals, plans)):
                    raise PrivacyError(why)
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
    if cfg.get("init-model") and not cfg.get("resume"):  # else every partner's start waits for Ray to find it missing
        from server.add_items import model_file

        if not (source := model_file(str(cfg["init-model"]))).is_file():
            raise ConfigError(f"init-model = {str(cfg['init-model'])!r}: {source} does not exist; give a run "
                              "directory or its model.pt")
    if cfg.get("item-init") == "cooccurrence" and not cfg.get("resume"):  # else refused inside the ServerApp
        from common.task import catalogue
        from server.item_init import check_catalogue_size

        check_catalogue_size(len(catalogue(cfg)))
    if cfg.get("item-init") == "text" and not cfg.get("resume"):  # the texts, read (cached) before Ray starts
        from common.task import catalogue, new_model
        from common.text_init import initialise_from_text

        items = catalogue(cfg)
        initialise_from_text(new_model(cfg, len(items)), cfg, items)
    if uses_local_dp(dp_mode(cfg)) and cfg.get("ledger-dir") and (file := file_in_the_way(str(cfg["ledger-dir"]))):
        # every simulated partner would refuse every round opening its ledger there (client/privacy_budget.py)
        raise ConfigError(f"ledger-dir = {str(cfg['ledger-dir'])!r}: {file} is a file, not a folder; give the folder "
                          "the ledgers are kept in")
    unable = partners_unable_to_train(cfg, num_partners)
    able = num_partners - len(unable)
    if able < min_nodes:
        # cross-device under local DP: DP-SGD's refusals are the cause when, without them, enough partners would
        # train (empty partitions aside, which dp-mode off does not mend: a review); name the fix, not a symptom
        empty = sum(why.startswith("no user") for why in unable.values())
        if cfg.get("partitioning") == "cross-device" and uses_local_dp(dp_mode(cfg)) and num_partners - empty >= min_nodes:
            raise ConfigError(f'partitioning = "cross-device" gives each partner one user, and local DP-SGD cannot '
                              f'sample a batch of users from one (dp-mode = {dp_mode(cfg)!r}); use dp-mode = "off" or '
                              f'"central" (partner-level DP on the aggregate)')
        pid, why = next(iter(unable.items()))
        raise FedRecError(f"{len(unable)} of {num_partners} simulated partners cannot train (partner-{pid}: "
                          f"{why}), leaving {able}, fewer than min-nodes = {min_nodes}: every round would fail")
    return unable


def resumable(cfg: Mapping[str, Any]) -> Path:
    """The run directory ``resume = true`` continues, after the ServerApp's own checks of its checkpoint (the
    config, catalogue and model fingerprints, as ``fedrec-server check`` does): a changed knob is refused in
    one line before Ray starts, not ~10 s later inside the ServerApp (a doc audit)."""
    from server.app import initial_model
    from server.resume import resumable_checkpoint, run_fingerprint

    items, model, _ = initial_model(dict(cfg))
    return resumable_checkpoint(cfg, run_fingerprint(cfg, items, model))[0]


def preflight(cfg: Mapping[str, Any], num_partners: int) -> None:
    """What simulations.run and simulations.local_grid check before any work: :func:`check_simulation`
    (a :class:`FedRecError` line) and one warning line naming the partners that will refuse every round."""
    if unable := describe_unable(check_simulation(cfg, num_partners), num_partners):
        print(unable, file=sys.stderr, flush=True)


def describe_unable(unable: Mapping[int, str], num_partners: int) -> str:
    """One line naming the partners that will refuse every round (empty when none)."""
    if not unable:
        return ""
    pid, why = next(iter(unable.items()))
    names = ", ".join(f"partner-{p}" for p in sorted(unable))
    return (f"warning: {len(unable)} of {num_partners} simulated partners will refuse every round ({names}); "
            f"partner-{pid}: {why}")
