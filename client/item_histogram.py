"""A partner's answer to the coordinator's ``item-prior = "popularity"`` query: its noised item histogram.

Each user's distinct training items, weighted so the user's vector has L2 norm 1, summed over the
partner's users, plus Gaussian noise of std ``item-prior-noise-multiplier`` on every cell
(common/item_prior.py). Before it leaves, the partner records that Gaussian mechanism on its privacy
ledger (once per run, checked against its target like a round), and its DP-SGD is calibrated on what the
target leaves after it (client/privacy_budget.py). Local DP only: the histogram is this partner's release.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common.errors import PrivacyError
from common.privacy import dp_mode, uses_local_dp

QUERY = "item-popularity"  # the query's name in its config record ("query"), as server/item_prior.py
HISTOGRAM_KEY = "item-histogram"  # the reply's ArrayRecord: one (V+1,) float32 array


def item_histogram_reply(msg: Message, context: Context, cfg: dict) -> Message:
    """The reply to a ``QUERY`` message: the noised histogram of this partner's training sequences (never
    a validation or test item) and its whole-ledger epsilon after it, after the catalogue check of a round."""
    from client.app import _run_name, check_same_catalogue  # lazy: client.app registers this handler
    from client.partner_policy import apply_partner_policy, shares_item_histogram
    from client.privacy_budget import PartnerBudget
    from common.item_prior import noised_histogram, unit_histogram
    from common.privacy import dp_noise_seed
    from common.task import partner_data

    cfg = apply_partner_policy(cfg, context.node_config)  # the partner's max-epsilon caps this release too
    if cfg["item-prior"] != "popularity" or not uses_local_dp(dp_mode(cfg)):
        raise PrivacyError(f"a noised item histogram is sent only for item-prior = popularity under local DP; this "
                           f"run has item-prior {cfg['item-prior']}, dp-mode {dp_mode(cfg)}")
    if not shares_item_histogram(context.node_config):  # before anything is drawn: nothing spent
        raise PrivacyError("this partner's node config share-item-histogram = false: it sends no item histogram "
                           "(nothing drawn, nothing spent); the prior is built from the other partners")
    data = partner_data(cfg, context.node_config)
    check_same_catalogue(msg, data)
    noise = float(cfg["item-prior-noise-multiplier"])
    # Noise from OS entropy unless this partner's environment asks for reproducible noise (simulations)
    seed = dp_noise_seed(int(cfg["seed"]), 0, int(context.node_config.get("partition-id", context.node_id)), 3)
    histogram = noised_histogram(unit_histogram(data.train_sequences(), data.num_items), noise, seed=seed)
    budget = PartnerBudget.open(cfg, context, data, _run_name(msg, cfg, context))
    try:
        epsilon = budget.record_item_prior(context, noise)  # on the ledger before the histogram leaves
        metrics, details = budget.metrics(epsilon), budget.details()  # as a training reply: the coordinator's report
    finally:
        budget.close()
    content = RecordDict({HISTOGRAM_KEY: ArrayRecord(numpy_ndarrays=[histogram]), "metrics": MetricRecord(metrics),
                          "privacy": ConfigRecord({**details, "dp-mode": dp_mode(cfg)})})
    return Message(content, reply_to=msg)
