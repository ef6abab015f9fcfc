"""Privacy wrappers around the server's strategy: refusal logging for local DP, Flower's central DP.

``dp-mode`` local/off: :class:`PrivacyReportingStrategy` records each partner's privacy numbers
and logs partners that refuse to train (budget exhausted), then lets the inner strategy
aggregate the others. central/both: Flower's ``DifferentialPrivacy{Server,Client}SideFixedClipping``
(clip each partner's update to ``central-clipping-norm``, sum, divide by the partners sampled,
add Gaussian noise with std ``central-noise-multiplier * clipping-norm / partners sampled``) with Flower's RDP accountant
when the inner strategy is plain FedAvg; refusals are screened out first, since Flower's
wrapper would otherwise skip the whole round on any error reply. The noise itself comes from a
CSPRNG (common/secure_noise.py), not numpy's global Mersenne Twister as in Flower's wrappers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.common.logger import log
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.errors import ConfigError
from common.privacy import default_delta, dp_mode, uses_central_dp
from common.secure_noise import SecureGaussian
from server.privacy_report import PrivacyReport

# Central DP's sensitivity argument needs the plain mean of clipped updates, so the inner
# FedAvg weighs every partner by this key, set to 1 on each accepted reply.
UNIT_WEIGHT_KEY = "central-dp-weight"


class PrivacyReportingStrategy(Strategy):
    """Delegates everything to ``strategy``; records privacy numbers and drops refusals before aggregation."""

    def __init__(self, strategy: Strategy, report: PrivacyReport) -> None:
        super().__init__()
        self.strategy = strategy
        self.report = report

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.report.screen(server_round, list(replies))
        result = self.strategy.aggregate_train(server_round, valid)
        self.report.write()
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.report.note_evaluation(server_round, replies)  # noised sums spent from the ledgers
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class _CentralDP:
    """What our central DP wrappers add to Flower's: refusal screening, a fixed denominator (the
    partners sampled) so that a partner that refuses counts as zero rather than skipping the round,
    a lazily sized accountant, and the per-round report."""

    report: PrivacyReport
    accountant: RdpAccountant | None
    num_sampled_clients: int
    noise_multiplier: float
    clipping_norm: float
    strategy: Strategy

    def _setup(self, report: PrivacyReport, *, account: bool, delta: float, side: str,
               public: Collection[str] = ()) -> None:
        self.report = report
        self._public = frozenset(public)
        self._account = account
        self._delta = delta
        self._side = side
        self._population = 0
        self._sampled = self._averaged = 0  # partners sampled for / averaged in the round
        self._current = ArrayRecord()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.report.note_evaluation(server_round, replies)  # noised sums spent from the ledgers (dp-mode both)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._population = max(self._population, len(list(grid.get_node_ids())))
        self._current = arrays  # the global weights the updates are measured from
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def _prepare_accounting(self, server_round: int, messages: Iterable[Message]) -> Iterable[Message]:
        messages = list(messages)
        if messages:
            self.num_sampled_clients = self._sampled = len(messages)
            too_small = self.accountant is not None and self.accountant.config.population_size < len(messages)
            if self._account and (self.accountant is None or too_small):
                # NOTE: no amplification by sampling: partners are not a random sample of a
                # population, so the population size is only metadata for Flower's accountant
                # (rebuilt, with every release so far replayed, if more partners join later).
                population = max(self._population, len(messages))
                self.accountant = RdpAccountant(PrivacyConfig(
                    target_delta=self._delta, population_size=population,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION))
                # Releases already made (before a resume, or before the rebuild) still count
                for earlier in self.report.central_rounds:
                    if earlier.get("epsilon") is not None:
                        self.accountant.compose(GaussianPrivacyEvent(
                            noise_multiplier=float(earlier.get("noise-multiplier", self.noise_multiplier)),
                            sample_size=min(int(earlier["partners"]), population), population_size=population))
        return super()._prepare_accounting(server_round, messages)  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """The Gaussian mechanism on the sum of clipped updates over a fixed denominator: global +
        (sum of the m updates averaged) / n + N(0, std^2) per weight, std = multiplier x clip / n,
        n the partners sampled for the round (the coordinator's choice, fixed before any reply), so a
        sampled partner that refuses or drops out counts as a zero update. The sum's sensitivity to
        one partner's update (present, or absent as zero) is clip, whatever m is; dividing by the
        data-dependent m, as before, gave a mean whose sensitivity is up to 2 clip / m with a noise
        that also moved with m, more than the accountant's add/remove-one Gaussian assumes (a
        researcher review). McMahan et al. 2018's fixed-denominator estimator, Flower's own wrapper
        at m = n (with accounting it skips a round with any missing reply). The noise is drawn from
        :class:`SecureGaussian` (a ChaCha20 stream keyed from the OS, four draws per value against
        floating-point attacks); Flower draws it from numpy's global Mersenne Twister: no secret key,
        and open to those attacks on the released model."""
        averaged = self._averaged
        sampled = max(self._sampled, averaged, 1)
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, sampled)
        source = SecureGaussian()
        noised = {}
        for key, array in aggregated_arrays.items():
            if key in self._public:  # no partner trains it, so it adds nothing to any update's norm
                noised[key] = array
                continue
            values = torch.from_numpy(np.array(array.numpy()))
            if averaged < sampled:  # the mean of m updates -> their sum / n
                current = torch.from_numpy(np.array(self._current[key].numpy())).to(values.dtype)
                values = current + (values - current) * (averaged / sampled)
            noised[key] = Array((values + source.noise_like(values, std)).numpy())
        log(INFO, "aggregate_train: central DP noise with %.4f stdev added (CSPRNG)", std)
        return ArrayRecord(noised)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = self.report.screen(server_round, list(replies))
        for msg in valid:
            next(iter(msg.content.metric_records.values()))[UNIT_WEIGHT_KEY] = 1.0
        # Flower's reply check (strict under accounting) compares the replies with this count; the
        # noise uses the sampled count (_add_noise_to_aggregated_arrays)
        self._averaged = self.num_sampled_clients = max(1, len(valid))
        # Weigh partners equally for this mean only (evaluation keeps its own weights)
        weight_key = getattr(self.strategy, "weighted_by_key", None)
        if weight_key is not None:
            self.strategy.weighted_by_key = UNIT_WEIGHT_KEY
        try:
            arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        finally:
            if weight_key is not None:
                self.strategy.weighted_by_key = weight_key
        spent = self.privacy_spent() if arrays is not None else None  # type: ignore[attr-defined]
        if arrays is not None:
            self.report.note_central(
                server_round, noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm,
                clipping=self._side, partners=len(valid), sampled=max(self._sampled, len(valid)),
                epsilon=spent.epsilon if spent else None, delta=spent.delta if spent else None)
        self.report.write()
        return arrays, metrics


def clip_update_inplace(new: list[np.ndarray], old: list[np.ndarray], clipping_norm: float) -> bool:
    """Flower's ``compute_clip_model_update``: scale ``new - old`` to L2 norm <= ``clipping_norm`` and
    write ``old + clipped`` back into ``new``. An exactly unchanged update (norm 0) is within any bound
    and is left as it is; returns False then.

    NOTE: Flower 1.42 computes ``clipping_norm / norm`` and raises ZeroDivisionError on a zero
    update (a partner with nothing to train on, an optimiser that made no step), failing the round.
    """
    if get_norm([np.subtract(x, y) for x, y in zip(new, old, strict=True)]) == 0.0:
        return False
    compute_clip_model_update(param1=new, param2=old, clipping_norm=clipping_norm)
    return True


class _ZeroSafeServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping with :func:`clip_update_inplace` per reply."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies:
            if reply.has_error():
                continue  # Flower's checks below decide what an error reply means
            for name, record in list(reply.content.array_records.items()):
                arrays = record.to_numpy_ndarrays()
                if clip_update_inplace(arrays, current, self.clipping_norm):
                    reply.content[name] = ArrayRecord(dict(zip(record.keys(), (Array(np.asarray(v)) for v in arrays),
                                                               strict=True)))
        # NOTE: the replies are clipped now; the rest of Flower's server-side aggregate_train (reply
        # checks, aggregation, noise, accounting) is exactly its client-side one, which never clips.
        return DifferentialPrivacyClientSideFixedClipping.aggregate_train(self, server_round, replies)


class CentralDPServerClipping(_CentralDP, _ZeroSafeServerSideClipping):
    """Flower's server-side fixed clipping + Gaussian noise, with our screening and reporting."""


class CentralDPClientClipping(_CentralDP, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (partners run ``fixedclipping_mod``) + Gaussian noise."""


def central_delta(cfg: dict[str, Any]) -> float:
    """The delta of central DP's accountant: ``target-delta``, or the default for ``min-nodes``
    partners. :class:`ConfigError` when it is at least 1 / ``min-nodes``: the unit is one partner,
    and such a guarantee allows releasing one partner's update outright (partners refuse the same
    for their users under local DP, but under central DP no partner checks it)."""
    partners = max(int(cfg["min-nodes"]), 1)
    delta = float(cfg["target-delta"]) or default_delta(partners)
    if delta >= 1.0 / partners:
        raise ConfigError(f"target-delta = {delta:g} is at least 1 / {partners} partners (min-nodes): under central DP "
                          "such a guarantee allows releasing one partner's update outright; use target-delta = 0 "
                          "for the default")
    return delta


def with_privacy(strategy: Strategy, cfg: dict[str, Any], report: PrivacyReport,
                 public: Collection[str] = ()) -> Strategy:
    """Wrap ``strategy`` for the run's ``dp-mode`` (see the module docstring). ``public``: arrays
    central DP leaves un-noised, the model's buffers (public metadata such as the genre table or
    frozen item-text features, which no partner trains; noise would pile up on them round after round)."""
    mode = dp_mode(cfg)
    if not uses_central_dp(mode):
        return PrivacyReportingStrategy(strategy, report)
    delta = central_delta(cfg)
    side = str(cfg["central-clipping"])  # side, noise and norm: ranges checked when cfg was resolved
    noise, clip = float(cfg["central-noise-multiplier"]), float(cfg["central-clipping-norm"])
    # Flower's accountant covers exactly FedAvg's (uniformly weighted) mean with positive noise.
    account = noise > 0 and isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train
    cls = CentralDPServerClipping if side == "server" else CentralDPClientClipping
    wrapped = cls(strategy, noise, clip, max(int(cfg["min-nodes"]), 1))
    wrapped._setup(report, account=account, delta=delta, side=side, public=public)
    return wrapped
