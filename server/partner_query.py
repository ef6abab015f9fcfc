"""One ``query`` message to every connected partner before round 1, and the one array each valid reply holds.

Used by the item starts that ask partners for a statistic: ``item-init = "cooccurrence"`` (item-pair counts,
server/item_init.py) and ``item-prior = "popularity"`` (noised item histograms, server/item_prior.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.errors import DataError
from server.rounds import wait_for_nodes


@dataclass
class Answers:
    """What the partners answered: every reply, the valid arrays (in reply order) and why the others were left out."""

    nodes: list[int]
    replies: list[Message]
    arrays: list[np.ndarray]
    refused: list[str]

    @property
    def unanswered(self) -> list[int]:
        answered = {int(reply.metadata.src_node_id) for reply in self.replies}
        return [node for node in self.nodes if node not in answered]


def ask_partners(grid: Grid, cfg: Mapping[str, Any], config: Mapping[str, Any], key: str,
                 check: Callable[[np.ndarray, str], None], what: str) -> Answers:
    """Send ``config`` as a query to every partner connected once ``min-nodes`` have, wait up to ``round-timeout``,
    and keep the ``key`` array of each reply that ``check(array, "partner N")`` accepts; an error reply or a
    refused array is logged as ``what: reason`` (one line each) and listed in ``refused``."""
    wait_for_nodes(grid, int(cfg["min-nodes"]), float(cfg["node-wait-timeout"]))
    nodes = sorted(grid.get_node_ids())
    record = ConfigRecord(dict(config))
    messages = [Message(RecordDict({"config": record}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
    arrays, refused = [], []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():  # one the SuperLink made (undeliverable, expired) names no partner (server/late_replies.py)
            who = "the SuperLink" if node == SUPERLINK_NODE_ID else f"partner {node}"
            refused.append(f"{who}: {reply.error.reason}")
            continue
        try:
            found = reply.content.array_records.get(key)
            if found is None or len(found) != 1:
                raise DataError(f"partner {node}: the reply holds no {key} array")
            array = found.to_numpy_ndarrays()[0]
            check(array, f"partner {node}")
        except DataError as err:
            refused.append(str(err))
            continue
        arrays.append(array)
    for reason in refused:
        log(WARNING, "%s: %s", what, reason)
    return Answers(nodes, replies, arrays, refused)
