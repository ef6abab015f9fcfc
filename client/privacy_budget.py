"""A partner's privacy budget for one run: where its ledger is, the run's noise, the pre-round check.

Policy on top of :class:`client.privacy_ledger.PrivacyLedger`: the noise multiplier is
calibrated once per run for the partner's target (epsilon, delta) over all planned rounds x
local epochs (and, with ``evaluation-noise-multiplier`` > 0, every planned noised evaluation
reply; with ``item-prior = "popularity"``, the run's one noised item histogram), taking
earlier runs' spend in the same ledger into account; before each round and each
noised evaluation the partner checks that it keeps its whole-ledger epsilon within the target and
refuses with ``budget exhausted: epsilon X of Y`` otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log as flwr_log

from client.partner_identity import (ledger_path, local_label, public_fingerprint,
                                     refuse_a_default_ledger_left_behind, simulated_label)
from client.partner_policy import max_epsilon, partner_delta, shares_item_histogram
from client.privacy_ledger import Calibration, PrivacyLedger
from common.data.sequences import SequenceData
from common.errors import PrivacyError
from common.per_user_clipping import expected_batch
from common.privacy import (CALIBRATION_TOLERANCE, Mechanism, calibrate_noise_after, default_delta, dp_noise_seed,
                            epsilon_of, stated_epsilon, steps_per_epoch)
from common.item_prior import planned_prior, prior_mechanism, refuse_unaffordable_prior
from common.private_count import count_mechanism, count_noise, noised_count
from common.private_evaluation import evaluation_mechanism, planned_evaluations, refuse_unaffordable_evaluations
from common.task import NAMED
from common.training import DPSettings, user_count_for_training

LOG = logging.getLogger("fedrec.client")
STATE_KEY = "privacy-ledger"  # context.state record: which ledger this client has written to
EPSILON_SLACK = 1e-9  # float noise between the calibration's and the ledger's accounting


def _refuse_no_room_beside_evaluations(ledger: PrivacyLedger, spent_or_planned: list[Mechanism], evals: int,
                                       noise: float, target: float, delta: float, accountant: str, label: str) -> None:
    """A budget the run's planned noised evaluations would use up is refused with the real spend and
    what the evaluations add (it said "epsilon X already spent" with the planned ones counted in)."""
    if not evals:
        return
    with_evaluations = epsilon_of(spent_or_planned, delta, accountant)
    if with_evaluations < target:
        return
    spent = ledger.epsilon(delta, accountant)
    if spent >= target:  # spent before this run: said without the planned evaluations, which are not spent
        # (the calibration's refusal counted them in, and the coordinator's report takes this number as the spend)
        raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(spent)} of {target:g} already spent")
    raise PrivacyError(f"{label}: budget exhausted: epsilon {stated_epsilon(spent)} of {target:g} already spent, and the {evals} "
                       f"noised evaluations this run plans at evaluation-noise-multiplier {noise:g} would bring it to "
                       f"{with_evaluations:.3f}, leaving nothing for training; raise evaluation-noise-multiplier or "
                       "evaluate-every, or use a new ledger budget")


def _plan_for(users: int, batch: int, label: str, *, noised: bool = False) -> tuple[float, int]:
    """(sample rate, steps per epoch) for ``users`` at ``batch``; a partner too small is refused with its label.

    A noised count (common/private_count.py) is never refused: a low draw (3 standard deviations below
    38 users gave 8, a deployment test) would lock the partner out of the whole run, as its count stands
    for the run. Its plan takes at least 2 steps an epoch (rate 1/2 at most), which any true count keeps
    DP at (Poisson sampling needs no count), and only the partner's own log says the count was low."""
    if noised:
        steps = max(2, math.ceil(max(users, 1) / batch))
        if users <= batch:
            LOG.warning("%s: the noised user count %d is not more than batch-size %d: training at 2 steps an "
                        "epoch (sample rate 1/2); a smaller batch-size suits a partner this small", label, users, batch)
        return 1.0 / steps, steps
    try:
        return steps_per_epoch(users, batch)
    except PrivacyError as exc:
        raise PrivacyError(f"{label}: {exc}") from None


LARGEST_PLANNED_POPULATION = 10**8  # users: the count's room is checked at default_delta of this many (1e-9)


def _public_users(ledger: PrivacyLedger, run: str, exact: int, data: SequenceData, cfg: Mapping[str, Any],
                  context: Context, label: str) -> int:
    """The user count this run's replies are computed from: the one released for ``run`` earlier (a
    resumed run), else a new noised count of the log's users recorded on the ledger now (before anything
    computed from it leaves), else ``exact`` (a simulated partition, or a run calibrated before counts were
    noised). A run with no room for the count and the planned noised evaluations at any user count is
    refused before the count is drawn, so it spends nothing; what depends on the count (a meaningless delta)
    is refused after the draw."""
    released = ledger.public_count(run)
    if released is not None:
        return released
    noise = count_noise(cfg, context.node_config)
    if not noise or ledger.calibration(run) is not None:
        return exact
    # The count covers every user of the log: training users and the evaluated ones (noised evaluation
    # sums are divided by it). Nothing before the draw may depend on the exact count: a refusal that did
    # would tell the coordinator about it with no noise and no record (a privacy review: target-delta =
    # 1/100.5 refused 101 users and never 100). So this check takes the largest delta any count could give
    # (default_delta(1) = 1e-5, capped as the partner caps it), which only makes it refuse less; a
    # meaningless delta or a budget too small for DP-SGD is refused after the draw, on the noised count.
    # A delta that follows the population (the default, or max-epsilon's cap) is 0.1 / users above 10^4 users:
    # on a ledger no run calibrated yet (nothing spent), the count checked at 1e-5 could take it past the target
    # at the partner's real delta (1.118 of max-epsilon 1 at 100,000 users: a red-team review), so there the
    # room is checked at the smallest delta the run may end at. A ledger with runs is accounted at the
    # smallest delta they calibrated at (accounting_delta), which already follows their noised counts.
    population = data.num_users
    run_delta = float(cfg["target-delta"])
    delta = partner_delta(run_delta or default_delta(1), context.node_config, 1)
    follows_users = not run_delta or (max_epsilon(context.node_config) is not None
                                      and "max-delta" not in context.node_config)
    if follows_users and not ledger.target_epsilons():
        delta = min(delta, default_delta(LARGEST_PLANNED_POPULATION))
    delta = ledger.accounting_delta(delta)
    refuse_unaffordable_evaluations(cfg, delta)
    evals = planned_evaluations(cfg)
    # an item histogram (item-prior) is planned before the count is drawn too
    prior = _planned_prior(cfg, ledger, run, context.node_config)
    planned = ([count_mechanism(noise)] + prior
               + [evaluation_mechanism(float(cfg.get("evaluation-noise-multiplier", 0.0)))] * evals)
    target = float(cfg["target-epsilon"])
    after = ledger.epsilon(delta, str(cfg["accountant"]), extra=planned)
    if after >= target - CALIBRATION_TOLERANCE:  # as the calibration refuses: no room left for DP-SGD (a review)
        evaluations = f" and the {evals} planned noised evaluations" if evals else ""
        histogram = " and item histogram" if prior else ""
        hint = (f"; the item histogram's share: raise item-prior-noise-multiplier ({prior[0][0]:g} now) or "
                "target-epsilon, or use item-prior = none" if prior else "")
        raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(ledger.epsilon(delta, str(cfg['accountant'])))} of "
                           f"{target:g} ({label}; its noised user count{histogram}{evaluations} alone would reach "
                           f"{after:.3f} at count-noise-multiplier {noise:g}, ledger {ledger.path}){hint}")
    seed = dp_noise_seed(int(cfg["seed"]), 0, int(context.node_config.get("partition-id", context.node_id)), 2)
    value = noised_count(population, noise, seed=seed)
    ledger.record_count(run=run, value=value, mechanism=count_mechanism(noise), accountant=str(cfg["accountant"]))
    # Only here does the partner see both numbers (Flower's logger: shown by a flwr-clientapp process)
    flwr_log(INFO, "%s: user count released for run %s: %d (%d users plus Gaussian noise of std %g, once per run; "
             "the plan and every reply use it)", label, run, value, population, noise)
    return value


def _planned_prior(cfg: Mapping[str, Any], ledger: PrivacyLedger, run: str,
                   node_config: Mapping[str, Any]) -> list[Mechanism]:
    """[the item histogram's mechanism] when this run uses item-prior = "popularity", this partner shares
    it (node config ``share-item-histogram``) and has not released it yet (then it is on the ledger's
    history already), else []."""
    if ledger.releases(run, "item-prior") or not shares_item_histogram(node_config):
        return []
    return planned_prior(cfg)


def _guarantee_changes(cal: Calibration, target: float, delta: float, accountant: str) -> tuple[str, str] | None:
    """(ledger's, requested) guarantee as text when target-epsilon, delta or accountant differ, else None."""
    if math.isclose(cal.target_epsilon, target) and math.isclose(cal.target_delta, delta) and cal.accountant == accountant:
        return None
    return (f"target-epsilon {cal.target_epsilon:g} at delta {cal.target_delta:.2g} ({cal.accountant})",
            f"{target:g} at delta {delta:.2g} ({accountant})")


class PartnerBudget:
    """The DP state of one partner in one run; open it with :meth:`open` at the start of a round."""

    def __init__(self, ledger: PrivacyLedger, calibration: Calibration, *, run: str, label: str, users: int,
                 public_fingerprint: str = "", ledger_name_public: bool = True, count_is_noised: bool = False) -> None:
        self.ledger = ledger
        self.calibration = calibration
        self.run = run
        self.label = label
        self.users = users  # the public count: noised when count_is_noised, else the exact one
        # This run's user count was released noised (common/private_count.py): the exact count must not leave
        # in anything else (the training loss and time are functions of it, so they stay here: client/app.py)
        self.count_is_noised = count_is_noised
        self.public_fingerprint = public_fingerprint  # what replies carry (module function public_fingerprint)
        # the partner named its ledger file (node config ledger-path), or a simulated partition's: no content hash
        self.ledger_name_public = ledger_name_public

    @classmethod
    def open(cls, cfg: Mapping[str, Any], context: Context, data: SequenceData, run: str) -> PartnerBudget:
        """Open (or create) this partner's ledger and fix the run's noise, once.

        Raises :class:`PrivacyError` for a partner too small for its batch size or target, and
        for a ledger that is corrupt, foreign, or gone after this client (or, by its marker, anyone)
        wrote to it; node config ``ledger-reset`` = the marker's id acknowledges a deleted ledger.
        """
        # Until the ledger is open its key is unknown: a simulated partner names itself, a real one says
        # "this partner" (a label keyed otherwise would name it differently from its replies; a review)
        label = simulated_label(context.node_config) or "this partner"
        exact_users = user_count_for_training(data)
        batch = int(cfg["batch-size"])
        eval_noise = float(cfg.get("evaluation-noise-multiplier", 0.0))
        evals = planned_evaluations(cfg)
        path = ledger_path(cfg, context.node_config, run, local_label(context.node_config, data))
        refuse_a_default_ledger_left_behind(path, context.node_config, data)
        # Noised evaluation sums cover every user of the log, also those too short to train on
        population = max(exact_users, data.num_users) if evals else exact_users
        if not count_noise(cfg, context.node_config):  # an exact count: checked before any ledger is made
            _plan_for(exact_users, batch, label)
            partner_delta(float(cfg["target-delta"]) or default_delta(population), context.node_config, population)

        # A ledger this client already wrote to must still be there: never start afresh.
        state = context.state.config_records.get(STATE_KEY, ConfigRecord())
        used_before = str(state.get("path", "")) == str(path) and int(state.get("steps", 0)) > 0
        # A ledger deleted while no client remembered it: its marker refuses a silent new start
        reset = str(context.node_config.get("ledger-reset", ""))
        ledger = PrivacyLedger(path, data.fingerprint(), create=not used_before, reset=reset,
                               named=data.identity.startswith(NAMED),
                               adopt=data.content_fingerprint() if data.identity else "",  # named or a store
                               mirror=simulated_label(context.node_config) is None)  # see PrivacyLedger.mirror
        try:  # keyed with the ledger's own secret: the same label after a resume of this run
            if used_before and (held := ledger.spend_marks()) < int(state["steps"]):
                # restored from an older copy together with its marker (client/ledger_file.py cannot tell then)
                raise PrivacyError(f"privacy ledger {path} holds less spend than this client recorded in it ({held} "
                                   f"steps and other releases, {int(state['steps'])} recorded): an older copy "
                                   "restored forgets spend already released; restore its newest copy")
            ledger.record_max_epsilon(max_epsilon(context.node_config))  # a fine-tune, which never sees it, keeps to it
            public = public_fingerprint(context, data, key=ledger.label_key(), run=run)
            label = simulated_label(context.node_config) or f"partner-{public}"
        except BaseException:
            ledger.close()
            raise
        if ledger.created:
            # a real partner's ledger in the run directory restarts at zero spend with every run; a simulated
            # partner's (partition-id) is meant to live with its run
            per_run = (not context.node_config.get("ledger-path") and not cfg.get("ledger-dir")
                       and "partition-id" not in context.node_config)
            LOG.warning("%s: new privacy ledger %s (no spend recorded before)%s", label, path,
                        "; it lives in this run's directory, so another run starts from zero: set node config "
                        "ledger-path to one file that every run uses" if per_run else "")

        try:  # the ledger is locked while open: close it on every way out but success
            # Every number of the plan comes from the user count the replies may tell: the noised one
            users = _public_users(ledger, run, exact_users, data, cfg, context, label)
            noised = ledger.public_count(run) is not None
            rate, steps = _plan_for(users, batch, label, noised=noised)
            steps_per_round = int(cfg["local-epochs"]) * steps
            if noised:
                population = max(users, 1)  # the noised count stands in for the evaluated users too (docs/privacy.md)
            delta = partner_delta(float(cfg["target-delta"]) or default_delta(population), context.node_config,
                                  population)
            cal = ledger.calibration(run)
            if cal is None:
                planned = int(cfg["num-server-rounds"])
                target = float(cfg["target-epsilon"])
                refuse_unaffordable_evaluations(cfg, ledger.accounting_delta(delta))
                # The planned noised evaluations (and the item histogram of item-prior = "popularity", if this run
                # has not released it yet) are spent as if already on the ledger: DP-SGD gets the rest
                # [] once released (then on the history, checked as spent) or declined by the partner
                prior = _planned_prior(cfg, ledger, run, context.node_config)
                spent_or_planned = ledger.history() + prior + [evaluation_mechanism(eval_noise)] * evals
                if prior:
                    refuse_unaffordable_prior(cfg, ledger.accounting_delta(delta), spent=ledger.history(), label=label)
                _refuse_no_room_beside_evaluations(ledger, spent_or_planned, evals, eval_noise, target,
                                                   ledger.accounting_delta(delta), str(cfg["accountant"]), label)
                try:  # planned at the delta the ledger will be accounted at (delta below)
                    noise = calibrate_noise_after(
                        spent_or_planned, target_epsilon=target, target_delta=ledger.accounting_delta(delta),
                        sample_rate=rate,
                        total_steps=planned * steps_per_round, accountant=str(cfg["accountant"]))
                except PrivacyError as exc:
                    evaluations = f" + {evals} evaluations at noise {eval_noise:g}" if evals else ""
                    raise PrivacyError(f"{label} ({users} users, batch-size {batch}, {planned} rounds x "
                                       f"{steps_per_round} steps{evaluations}): {exc}") from None
                cal = Calibration(noise, target, delta, str(cfg["accountant"]), rate, steps_per_round, planned,
                                  eval_noise, evals)
                ledger.save_calibration(run, cal)
            elif (cal.sample_rate, cal.steps_per_round) != (rate, steps_per_round):
                raise PrivacyError(f"{label}: batch-size or local-epochs changed mid-run (ledger {path} planned "
                                   f"{cal.steps_per_round} steps at rate {cal.sample_rate:.4g} per round); start a new run")
            elif cal.evaluation_noise != eval_noise:
                raise PrivacyError(f"{label}: evaluation-noise-multiplier changed mid-run (ledger {path} planned "
                                   f"{cal.evaluation_noise:g}, this run asks for {eval_noise:g}); start a new run")
            elif changed := _guarantee_changes(cal, float(cfg["target-epsilon"]), delta, str(cfg["accountant"])):
                # The run name is found in the ledger (a resumed run, or another run given the same name):
                # its calibration would silently replace this run's stated guarantee
                raise PrivacyError(f"{label}: run {run!r} in ledger {path} was calibrated for {changed[0]}, this run asks "
                                   f"for {changed[1]}; give a new run-name (the ledger's spend still counts)")
        except BaseException:
            ledger.close()
            raise
        return cls(ledger, cal, run=run, label=label, users=users, count_is_noised=noised,
                   public_fingerprint=public,
                   ledger_name_public=bool(context.node_config.get("ledger-path"))
                   or "partition-id" in context.node_config)

    @property
    def delta(self) -> float:
        """The delta the whole ledger is accounted at (:meth:`PrivacyLedger.accounting_delta`)."""
        return self.ledger.accounting_delta(self.calibration.target_delta)

    @property
    def accountant(self) -> str:
        return self.calibration.accountant

    def spent(self) -> float:
        """Epsilon of the whole ledger so far."""
        return self.ledger.epsilon(self.delta, self.accountant)

    def check_next_round(self) -> None:
        """Refuse (``budget exhausted: epsilon X of Y``) when one more round would pass the target."""
        self._check_next(self.calibration.round_mechanism(), "round")

    def check_next_evaluation(self) -> None:
        """Refuse (``budget exhausted: ...``) when one more noised evaluation reply would pass the target."""
        self._check_next(self.calibration.evaluation_mechanism(), "noised evaluation")

    def _check_next(self, mechanism: Mechanism, what: str) -> None:
        target = self.calibration.target_epsilon
        after = self.ledger.epsilon(self.delta, self.accountant, extra=[mechanism])
        if after > target + EPSILON_SLACK:
            raise PrivacyError(f"budget exhausted: epsilon {stated_epsilon(self.spent())} of {target:g} "
                               f"({self.label}; one more {what} would reach {after:.3f}, ledger {self.ledger.path})")

    def dp_settings(self, cfg: Mapping[str, Any], noise_seed: int | None = None) -> DPSettings:
        """This round's DP-SGD settings; ``noise_seed`` None = noise from OS entropy (see
        :func:`common.dp_sgd.seed_dp_randomness`)."""
        steps = self.calibration.steps_per_round // int(cfg["local-epochs"])
        # Steps and the optimiser's expected batch from the public count (:meth:`open`): the update is
        # divided by it, so the exact count would scale what leaves
        return DPSettings(self.calibration.noise_multiplier, float(cfg["max-grad-norm"]), self.accountant,
                          str(cfg["grad-sample-mode"]), noise_seed, steps_per_epoch=steps,
                          expected_batch=expected_batch(self.users, steps))

    def record(self, context: Context, server_round: int, mechanisms: list[Mechanism]) -> float:
        """Write the round's spend to the ledger (before the reply leaves) and return the new epsilon."""
        self.ledger.record(run=self.run, server_round=server_round, mechanisms=mechanisms, accountant=self.accountant)
        self._remember(context)
        return self.spent()

    def record_item_prior(self, context: Context, noise_multiplier: float) -> float:
        """Write the run's one noised item histogram (common/item_prior.py) to the ledger, before it leaves;
        the new epsilon. A second for the same run, or one the target has no room for, is refused."""
        if self.ledger.releases(self.run, "item-prior"):
            raise PrivacyError(f"{self.label}: run {self.run!r} already released its item histogram (ledger "
                               f"{self.ledger.path}); it is sent once per run")
        mechanism = prior_mechanism(noise_multiplier)
        self._check_next(mechanism, "item histogram")
        self.ledger.record(run=self.run, server_round=0, mechanisms=[mechanism], accountant=self.accountant,
                           kind="item-prior")
        self._remember(context)
        return self.spent()

    def record_evaluation(self, context: Context, server_round: int) -> float:
        """Write one noised evaluation reply's spend to the ledger (before the reply leaves); the new epsilon."""
        self.ledger.record(run=self.run, server_round=server_round, mechanisms=[self.calibration.evaluation_mechanism()],
                           accountant=self.accountant, kind="evaluate")
        self._remember(context)
        return self.spent()

    def _remember(self, context: Context) -> None:
        """Node state: this client has written to this ledger (so it must never be found missing)."""
        context.state.config_records[STATE_KEY] = ConfigRecord(
            {"path": str(self.ledger.path), "steps": self.ledger.spend_marks()})

    def metrics(self, epsilon: float) -> dict[str, float]:
        """Numbers for the reply's MetricRecord (every partner sends the same keys); ``dp-users`` is the
        public count (noised for a deployed partner: common/private_count.py)."""
        cal = self.calibration
        return {
            "epsilon": epsilon,
            "delta": self.delta,  # the ledger's accounting delta: the epsilon above holds at it, which may be
            # smaller than this run's target-delta when an earlier run on the ledger promised a smaller one
            "target-epsilon": cal.target_epsilon,
            "noise-multiplier": cal.noise_multiplier,
            "sample-rate": cal.sample_rate,
            "ledger-steps": self.ledger.total_steps(),
            "ledger-rounds": self.ledger.rounds_trained(),
            "ledger-evaluations": self.ledger.evaluations_recorded(),
            "dp-users": self.users,
        }

    def details(self) -> dict[str, str]:
        """Strings for the reply's ConfigRecord: who this is and which ledger file holds its spend."""
        return {
            "partner": self.label,
            "accountant": self.accountant,
            "fingerprint": self.public_fingerprint,  # not the content hash (public_fingerprint)
            # the file name the partner chose (an absolute path names its folders); a default one holds the
            # data's content hash (local_label)
            "ledger-path": self.ledger.path.name if self.ledger_name_public else "default (ledger-dir or the run directory)",
            "ledger-created": str(self.ledger.created).lower(),
            "run": self.run,
        }

    def close(self) -> None:
        self.ledger.close()


NO_LOCAL_DP_METRICS = {"epsilon": 0.0, "delta": 0.0, "target-epsilon": 0.0, "noise-multiplier": 0.0,
                       "sample-rate": 0.0, "ledger-steps": 0, "ledger-rounds": 0, "ledger-evaluations": 0, "dp-users": 0}
