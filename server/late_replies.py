"""Replies that arrive after ``round-timeout``: still a release, so still in the privacy report.

Flower's ``send_and_receive`` returns what arrived within the timeout and forgets the rest; a
partner that trained but answered late has released an update (and spent privacy budget) that
the coordinator's ``privacy.json`` would never mention. :class:`LateReplyGrid` wraps the grid
the strategy uses: it remembers every training message left unanswered at its timeout, keeps
pulling those ids during later exchanges, and hands each late reply to a callback (the privacy
report lists it under ``not-aggregated`` with reason ``late``). At the end of the run
:meth:`LateReplyGrid.finish` collects once more and reports what never came back. With noised
evaluation (``evaluation-noise-multiplier`` > 0) an evaluation reply spends budget too, so
evaluation messages are tracked as well when ``on_late_evaluation`` is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run

LateCallback = Callable[[int, Message], None]
UnansweredCallback = Callable[[int, int], None]


def _round_of(msg: Message) -> int | None:
    """The round Flower's strategies write into each message's ``config`` (``server-round``);
    None for messages without one (SecAgg+'s stage messages)."""
    config = msg.content.config_records.get("config")
    value = config.get("server-round") if config is not None else None
    return int(value) if isinstance(value, int) else None


def _from_its_node(reply: Message, node: int | None) -> None:
    """An error the SuperLink made for a message it could not deliver or whose reply expired comes from the
    SuperLink (node 1), not from the partner: named after the partner it was sent to, so the privacy report
    lists that partner (a review: a phantom partner "node-1" refused, the real one was in no list)."""
    if node and reply.has_error() and int(reply.metadata.src_node_id) == SUPERLINK_NODE_ID:
        reply.metadata.__dict__["_src_node_id"] = node  # (Metadata has no setter for it)


class LateReplyGrid(Grid):
    """A grid that tracks training messages unanswered at their timeout (see module docstring).

    Parameters
    ----------
    grid : Grid
        The grid Flower gave the ServerApp; every call is passed on to it.
    on_late : callable(server_round, reply)
        Called once per late, non-error training reply.
    on_unanswered : callable(server_round, node_id), optional
        Called by :meth:`finish` for each training message still without a reply.
    on_late_evaluation : callable(server_round, reply), optional
        Called once per late evaluation reply, a refusal included (PrivacyReport.note_evaluation lists it
        as a refusal to evaluate, no spend); evaluation messages are tracked only when it is given (noised
        evaluation, whose replies spend budget).
    """

    def __init__(self, grid: Grid, on_late: LateCallback, on_unanswered: UnansweredCallback | None = None,
                 on_late_evaluation: LateCallback | None = None) -> None:
        self._grid = grid
        self._on_late = on_late
        self._on_unanswered = on_unanswered
        self._on_late_evaluation = on_late_evaluation
        self._tracked = (MessageType.TRAIN,) + ((MessageType.EVALUATE,) if on_late_evaluation else ())
        self._pending: dict[str, tuple[int, int, str]] = {}  # message id -> (round, destination node, type)
        self._round = 0  # the latest round a message named
        # Flower's in-memory grid polls every 0.1 s, its HTTP grid every 3 s; 1 s where not stated
        self.pull_interval = float(getattr(grid, "pull_interval", 1.0))

    # -- plain delegation ----------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    # -- the exchange, with memory of what is still out ------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's loop (push, then pull until every reply is in or ``timeout`` s passed), also
        pulling earlier rounds' unanswered training messages on every poll."""
        messages = list(messages)
        training: dict[str, tuple[int, int, str]] = {}
        for msg in messages:
            self._round = _round_of(msg) or self._round
        ids = list(self._grid.push_messages(messages))
        destinations = {msg_id: int(msg.metadata.dst_node_id) for msg, msg_id in zip(messages, ids) if msg_id}
        for msg, msg_id in zip(messages, ids):
            # Only messages that carry a round's work (FedAvg's config names the round); SecAgg+'s key set-up
            # and unmasking messages carry none: a partner gone before unmasking was still aggregated (its
            # self-mask is rebuilt from the others' shares), and listing it as silent would be false
            if msg_id and msg.metadata.message_type in self._tracked and _round_of(msg) is not None:
                training[msg_id] = (self._round, int(msg.metadata.dst_node_id), msg.metadata.message_type)
        waiting = {i for i in ids if i}
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while True:
            self.collect_late()
            got = list(self._grid.pull_messages(waiting))
            for reply in got:
                _from_its_node(reply, destinations.get(reply.metadata.reply_to_message_id))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.pull_interval)
        self._pending.update({i: training[i] for i in waiting if i in training})  # out past the timeout
        return replies

    def collect_late(self) -> int:
        """Pull replies to earlier exchanges' unanswered training messages; returns how many came."""
        late_ids = set(self._pending)
        if not late_ids:
            return 0
        got = list(self._grid.pull_messages(late_ids))
        for reply in got:
            server_round, node, kind = self._pending.pop(reply.metadata.reply_to_message_id, (0, 0, MessageType.TRAIN))
            _from_its_node(reply, node)
            if reply.has_error():
                # It released nothing, but it answered: a late refusal (e.g. a partner whose reply hold it refused
                # itself) is reported as the refusal it is; dropped here, the partner was in no list at all (a journey).
                # A late refusal to evaluate likewise (evaluations are tracked only with on_late_evaluation)
                (self._on_late if kind == MessageType.TRAIN else self._on_late_evaluation)(server_round, reply)
                continue
            if kind == MessageType.EVALUATE:
                log(WARNING, "round %d: node %d replied to its evaluation after round-timeout: its noised sums "
                    "are not combined, its spend is recorded", server_round, int(reply.metadata.src_node_id))
                self._on_late_evaluation(server_round, reply)  # type: ignore[misc] (tracked only with it)
            else:
                self._on_late(server_round, reply)
        return len(got)

    def finish(self) -> list[tuple[int, int]]:
        """End of the run: collect once more; report (round, node) of training messages never answered."""
        self.collect_late()
        unanswered = sorted({(r, n) for r, n, kind in self._pending.values() if kind == MessageType.TRAIN})
        for server_round, node in unanswered:  # (a set: SecAgg+ sends several per round)
            log(WARNING, "round %d: node %d never replied to its training message; if it trained, the spend is "
                "in its own ledger only", server_round, node)
            if self._on_unanswered is not None:
                self._on_unanswered(server_round, node)
        for server_round, node in sorted({(r, n) for r, n, kind in self._pending.values() if kind != MessageType.TRAIN}):
            log(WARNING, "round %d: node %d never replied to its evaluation message; if it sent noised sums, the "
                "spend is in its own ledger only", server_round, node)
        self._pending.clear()
        return unanswered
