"""A partner's answer to the coordinator's ``item-init = "cooccurrence"`` query: its item-pair counts.

The coordinator sums every partner's counts and starts the global model's item embeddings from them
(common/cooccurrence.py). The counts are statistics of this partner's users that no DP mechanism
protects, so a partner sends them only for a run that protects nothing anyway (``dp-mode = "off"``,
no SecAgg+), and never when its own node config asks for DP (``max-epsilon``, ``max-delta``) or
keeps its evaluation sums (``share-evaluation`` false or noised).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from common.errors import PrivacyError
from common.privacy import dp_mode

QUERY = "item-cooccurrence"  # the query's name in its config record ("query")
COUNTS_KEY = "item-counts"  # the reply's ArrayRecord: one (V+1, V+1) float32 array


def item_counts_reply(msg: Message, context: Context, cfg: dict) -> Message:
    """The reply to a ``QUERY`` message: this partner's counts over its training sequences (never a
    validation or test item) and its number of users, after the same catalogue check as a round."""
    from client.app import check_same_catalogue  # lazy: client.app registers this handler
    from client.partner_policy import shares_evaluation
    from common.cooccurrence import cooccurrence_counts
    from common.task import partner_data

    config = msg.content.config_records.get("config")
    asked = config.get("query") if config is not None else None
    if asked != QUERY:
        raise PrivacyError(f"this partner answers no query {asked!r}; it answers {QUERY!r} and 'item-popularity' only")
    floor = [key for key in ("max-epsilon", "max-delta") if key in context.node_config]
    if floor:  # either key promises DP for what this partner sends (client/partner_policy.py)
        raise PrivacyError(f"this partner expects DP, its node config sets {floor[0]}, and sends no item-pair counts, "
                           "which no DP protects; the coordinator can use item-init = random")
    if shares_evaluation(context.node_config) != "any":  # it keeps even its clear hit sums: the counts say more
        raise PrivacyError("this partner shares no clear evaluation sums, its node config sets share-evaluation, and "
                           "sends no item-pair counts either; the coordinator can use item-init = random")
    if dp_mode(cfg) != "off" or cfg["secure-aggregation"] or cfg["item-init"] != "cooccurrence":
        raise PrivacyError(f"item-pair counts are sent only for item-init = cooccurrence with dp-mode off and no "
                           f"SecAgg+; this run has item-init {cfg['item-init']}, dp-mode {dp_mode(cfg)}, "
                           f"secure-aggregation {bool(cfg['secure-aggregation'])}")
    data = partner_data(cfg, context.node_config)
    check_same_catalogue(msg, data)
    counts = cooccurrence_counts(data, int(cfg["item-init-window"]))
    content = RecordDict({COUNTS_KEY: ArrayRecord(numpy_ndarrays=[counts]),
                          "metrics": MetricRecord({"num-users": data.num_users})})
    return Message(content, reply_to=msg)
