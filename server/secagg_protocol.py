"""The server's side of one SecAgg+ round on Flower's Message API.

Flower 1.42 ships SecAgg+ for the legacy workflow only (``SecAggPlusWorkflow``, which needs a
``LegacyContext`` and a legacy ``Strategy``). This module runs the same four stages with
``grid.send_and_receive`` so that the rest of our Message-API server stays as it is. It is
protocol orchestration only: every cryptographic step (Shamir share recombination, key
agreement, mask generation, quantisation) is Flower's own
(``flwr.common.secure_aggregation``), and the client side is Flower's unchanged
``secaggplus_mod``; the message formats are those of ``SecAggPlusWorkflow``.

Stages: ``setup`` (partners create key pairs), ``share_keys`` (the server forwards public keys;
partners return encrypted Shamir shares of their secrets for their neighbours),
``collect_masked_vectors`` (the ordinary train message plus forwarded shares; partners train
and return only their masked, quantised update), ``unmask`` (partners return the shares the
server needs to remove the masks of the sum, including those of partners that dropped out).

Two deliberate differences from ``SecAggPlusWorkflow`` (1.42): a partner that drops out before
it has distributed its shares is left out of the unmask stage (Flower would ask for shares that
do not exist and abort the round), and the pairwise masks of a partner that dropped out are
removed only for neighbours whose vectors are in the sum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.logger import log
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key


@dataclass(frozen=True)
class SecAggPlusParams:
    """SecAgg+ settings (Flower's defaults for the quantiser and the modulus).

    ``num_shares`` and ``threshold`` are fractions: of the sampled partners, and of the
    shares needed to unmask. ``clipping_range`` bounds every quantised value to
    [-clipping_range, clipping_range]; ``max_weight`` is the example count at which a
    partner's FedAvg weight is 1. ``timeout`` (s) bounds each stage's wait for replies.
    """

    num_shares: float = 1.0
    threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.num_shares <= 1.0:
            raise ValueError(f"secagg-num-shares = {self.num_shares:g} must be a fraction in (0, 1]")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"secagg-threshold = {self.threshold:g} must be a fraction in (0, 1]")
        if self.clipping_range <= 0 or self.max_weight <= 0:
            raise ValueError("secagg-clipping-range and secagg-max-weight must be > 0")
        if self.modulus_range <= self.quantization_range or bin(self.modulus_range).count("1") != 1:
            raise ValueError("the SecAgg+ modulus must be a power of 2 larger than the quantisation range")

    def shares_and_threshold(self, num_sampled: int) -> tuple[int, int]:
        """Shares per partner and shares needed to unmask, by ``SecAggPlusWorkflow``'s rules."""
        shares = round(self.num_shares * num_sampled)
        if shares < num_sampled and shares % 2 == 0:
            shares += 1  # SecAgg+ wants an odd number of neighbours (symmetric ring)
        if shares <= 2:
            shares = num_sampled
        return shares, max(round(self.threshold * shares), 2)


@dataclass
class SecAggPlusRound:
    """One round's protocol state; the server never holds a partner's unmasked vector."""

    params: SecAggPlusParams
    grid: Grid
    server_round: int
    sampled: set[int]
    num_shares: int = 0
    threshold: int = 0
    neighbours: dict[int, set[int]] = field(default_factory=dict)
    public_keys: dict[int, list[bytes]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # partners whose shares went out (share_keys done)
    forward_srcs: dict[int, list[int]] = field(default_factory=dict)
    forward_ciphertexts: dict[int, list[bytes]] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)  # partners whose masked vectors are in the sum
    failure: str = ""

    # -- stages 0 and 1: before training -----------------------------------------------------
    def setup_and_share_keys(self) -> bool:
        """Run ``setup`` and ``share_keys``; False (with ``failure`` set) when too few partners remain."""
        n = len(self.sampled)
        if n < 2:
            self._fail(f"secure aggregation needs at least 2 partners, {n} sampled")
            return False
        self.num_shares, self.threshold = self.params.shares_and_threshold(n)
        order = list(self.sampled)
        random.shuffle(order)  # neighbourhoods must not be predictable by the partners
        half = self.num_shares >> 1
        self.neighbours = {nid: {order[(i + o) % n] for o in range(-half, half + 1)} for i, nid in enumerate(order)}
        setup = ConfigRecord({
            Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: self.num_shares,
            Key.THRESHOLD: self.threshold, Key.CLIPPING_RANGE: float(self.params.clipping_range),
            Key.TARGET_RANGE: int(self.params.quantization_range), Key.MOD_RANGE: int(self.params.modulus_range),
            Key.MAX_WEIGHT: float(self.params.max_weight),
        })
        replies = self._send({nid: setup for nid in self.sampled})
        for nid, rec in replies.items():
            self.public_keys[nid] = [cast(bytes, rec[Key.PUBLIC_KEY_1]), cast(bytes, rec[Key.PUBLIC_KEY_2])]
        if not self._enough(set(replies), "setup"):
            return False

        # Forward each partner its neighbours' public keys; collect encrypted shares for them
        alive = set(replies)
        configs = {}
        for nid in alive:
            rec = ConfigRecord({str(m): self.public_keys[m] for m in self.neighbours[nid] & alive})
            rec[Key.STAGE] = Stage.SHARE_KEYS
            configs[nid] = rec
        replies = self._send(configs)
        self.shared = set(replies)
        self.forward_srcs = {nid: [] for nid in self.shared}
        self.forward_ciphertexts = {nid: [] for nid in self.shared}
        for src, rec in replies.items():
            for dst, ctxt in zip(cast(list[int], rec[Key.DESTINATION_LIST]), cast(list[bytes], rec[Key.CIPHERTEXT_LIST])):
                if dst in self.forward_srcs:
                    self.forward_srcs[dst].append(src)
                    self.forward_ciphertexts[dst].append(ctxt)
        return self._enough(self.shared, "share_keys")

    # -- stage 2: the train message ------------------------------------------------------------
    def collect_content(self, nid: int, content: RecordDict) -> RecordDict:
        """``content`` (the ordinary train message) plus this partner's forwarded key shares."""
        out = RecordDict()
        for key, record in content.items():
            out[key] = record
        out[RECORD_KEY_CONFIGS] = ConfigRecord({
            Key.STAGE: Stage.COLLECT_MASKED_VECTORS,
            Key.CIPHERTEXT_LIST: self.forward_ciphertexts[nid],
            Key.SOURCE_LIST: self.forward_srcs[nid],
        })
        return out

    # -- stage 3: after training -----------------------------------------------------------------
    def unmask(self, replies: list[Message]) -> list[np.ndarray] | None:
        """Sum the masked vectors in ``replies``, run ``unmask``, return the weighted mean vector.

        The mean is sum_i w_i x_i / sum_i w_i over the partners whose masked vectors arrived,
        with w_i their quantised example weight; None (with ``failure`` set) when too few
        shares arrive to remove the masks.
        """
        masked: list[np.ndarray] | None = None
        active: set[int] = set()
        for msg in replies:
            nid = msg.metadata.src_node_id
            if msg.has_error():  # a refusal (budget, too few users, an update SecAgg+ would clip): say why
                log(WARNING, "secure aggregation round %d: partner %d sent no masked update: %s", self.server_round,
                    nid, msg.error.reason)
                continue
            if nid not in self.shared or RECORD_KEY_CONFIGS not in msg.content.config_records:
                continue
            vec = [bytes_to_ndarray(b) for b in cast(list[bytes], msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])]
            masked = vec if masked is None else parameters_addition(masked, vec)
            active.add(nid)
        if masked is None:
            self._fail("no partner returned a masked update")
            return None
        if not self._enough(active, "collect_masked_vectors"):
            return None
        masked = parameters_mod(masked, self.params.modulus_range)
        dead = self.shared - active  # their pairwise masks are in the others' vectors
        if dead:
            log(WARNING, "secure aggregation round %d: %d partner(s) dropped out after sharing keys; "
                "their masks are removed with the others' shares", self.server_round, len(dead))

        # Ask the survivors for the shares that remove the masks
        configs = {
            nid: ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(self.neighbours[nid] & active),
                               Key.DEAD_NODE_ID_LIST: list(self.neighbours[nid] & dead)})
            for nid in active
        }
        collected: dict[int, list[bytes]] = {nid: [] for nid in active | dead}
        for rec in self._send(configs).values():
            for owner, share in zip(cast(list[int], rec[Key.NODE_ID_LIST]), cast(list[bytes], rec[Key.SHARE_LIST])):
                if owner in collected:
                    collected[owner].append(share)
        shapes = get_parameters_shape(masked)
        for nid, shares in collected.items():
            if len(shares) < self.threshold:
                self._fail(f"only {len(shares)} of the {self.threshold} shares needed to unmask partner {nid} arrived")
                return None
            secret = combine_shares(shares)
            if nid in active:  # the partner's own (self) mask, from its seed
                masked = parameters_subtraction(masked, pseudo_rand_gen(secret, self.params.modulus_range, shapes))
                continue
            # A dropped partner's pairwise masks, from its reconstructed private key
            for other in self.neighbours[nid] & active:
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(self.public_keys[other][0]))
                mask = pseudo_rand_gen(key, self.params.modulus_range, shapes)
                masked = parameters_addition(masked, mask) if nid > other else parameters_subtraction(masked, mask)
        total = parameters_mod(masked, self.params.modulus_range)
        q_weight, total = factor_extract(total)
        mean = dequantize(total, self.params.clipping_range, self.params.quantization_range)
        # Each quantised value was shifted by +clipping_range; dequantize removed one shift.
        offset = -(len(active) - 1) * self.params.clipping_range
        scale = self.params.quantization_range / float(q_weight)
        log(INFO, "secure aggregation round %d: summed %d masked updates (%d dropped out)",
            self.server_round, len(active), len(dead))
        self.active = active
        return [(vec + offset) * scale for vec in mean]

    # -- helpers -------------------------------------------------------------------------------
    def _send(self, configs: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """One stage: send ``configs``, return each answering partner's config record."""
        msgs = [
            # A copy per partner: secaggplus_mod pops keys from the record it receives
            Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(rec))}), dst_node_id=nid, message_type=MessageType.TRAIN,
                    group_id=str(self.server_round))
            for nid, rec in configs.items()
        ]
        out: dict[int, ConfigRecord] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.params.timeout):
            if reply.has_error():
                log(WARNING, "secure aggregation: partner %d failed a stage: %s", reply.metadata.src_node_id,
                    reply.error.reason)
                continue
            if RECORD_KEY_CONFIGS not in reply.content.config_records:
                log(WARNING, "secure aggregation: partner %d replied without SecAgg+ data (is its ClientApp "
                    "missing the secure aggregation mod?)", reply.metadata.src_node_id)
                continue
            out[reply.metadata.src_node_id] = reply.content.config_records[RECORD_KEY_CONFIGS]
        return out

    def _enough(self, alive: set[int], stage: str) -> bool:
        for nid in self.sampled:
            if len(self.neighbours[nid] & alive) < self.threshold:
                self._fail(f"after stage {stage} only {len(alive)} of {len(self.sampled)} partners remain, "
                           f"fewer than the {self.threshold} needed (secagg-threshold)")
                return False
        return True

    def _fail(self, reason: str) -> None:
        self.failure = reason
        log(WARNING, "secure aggregation round %d aborted: %s", self.server_round, reason)
