"""Metrics beyond accuracy: HR/NDCG at several K, catalogue coverage, popularity bias, per-partner spread.

A partner computes, from the same full-ranking scores as ``common.metrics`` (history
excluded), additive sums plus the distinct items it recommended in its top-K lists; the
server combines them (:func:`combine_partner_metrics`):

- ``hr@K``/``ndcg@K`` for K in :data:`KS`: exact all-users means (sums / users).
- ``coverage@K``: distinct items in anyone's top-K list / catalogue size.
- ``popularity@K``: mean over users of the mean popularity of their top-K items, where an
  item's popularity is the share of the partner's users with it in their training history
  (0..1; higher = more popularity bias).
- ``partner-ndcg@K``: each partner's own NDCG@K (by ``partition-id``) and their spread
  (std, min, max; fairness across partners).

NOTE: the recommended-item list is metadata about the partner's users that DP does not
cover (as the HR/NDCG sums and NDCG's sum of squares are not); it only leaves the partner in
evaluation replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from common.data.sequences import SequenceData
from common.item_chain import ItemChain
from common.metrics import history_scorer, ranking_sums, target_ranks
from common.tie_scoring import batch_scorer

KS = (5, 10, 20)


def _mask_seen(scores: torch.Tensor, histories: Sequence[np.ndarray]) -> torch.Tensor:
    scores = scores.detach().float().clone()
    scores[:, 0] = float("-inf")
    for row, h in enumerate(histories):
        if len(h):
            scores[row, torch.as_tensor(h, dtype=torch.long)] = float("-inf")
    return scores


def item_popularity(data: SequenceData) -> np.ndarray:
    """Share of ``data``'s users with each item index (0..V) in their training history."""
    seen = np.zeros(data.num_items + 1, dtype=np.float64)
    for h in data.train_sequences():
        seen[np.unique(h)] += 1.0
    return seen / max(data.num_users, 1)


def recommendation_metrics(
    score_batch: Callable[[int, int, list[np.ndarray]], torch.Tensor],
    data: SequenceData,
    *,
    ks: Sequence[int] = KS,
    top_k: int = 10,
    batch_size: int = 256,
    split: str = "test",
) -> dict[str, float | list[int]]:
    """``split`` sums for ``data`` (``"test"``, or ``"valid"`` for choosing settings): ranking sums at
    ``ks``, ``pop@K-sum`` and the distinct recommended items ``rec-items@K`` (item indices), K = ``top_k``.

    ``score_batch(start, stop, histories)`` returns scores (rows, V+1) for users
    ``start:stop`` of ``data`` (their ``split`` histories given).
    """
    ks = sorted(set(ks) | {top_k})
    histories, targets = data.eval_cases(split)
    popularity = item_popularity(data)
    ranks, pop_sum, items = [], 0.0, set()
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        h = histories[start:stop]
        scores = score_batch(start, stop, h).cpu()
        ranks.append(target_ranks(scores, h, targets[start:stop]))
        top = torch.topk(_mask_seen(scores, h), k=min(top_k, scores.shape[1] - 1), dim=1).indices.numpy()
        pop_sum += float(popularity[top].mean(axis=1).sum())
        items.update(top.ravel().tolist())
    sums: dict[str, float | list[int]] = dict(ranking_sums(np.concatenate(ranks) if ranks else np.zeros((0, 2), np.int64), ks))
    sums[f"pop@{top_k}-sum"] = pop_sum
    sums[f"rec-items@{top_k}"] = sorted(int(i) for i in items)
    return sums


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data: SequenceData, *, max_len: int, top_k: int = 10,
                   device: str | torch.device = "cpu", user_factors: torch.Tensor | None = None,
                   tie_orders: int = 1, split: str = "test", chain: ItemChain | None = None) -> dict:
    """:func:`recommendation_metrics` of ``model.score`` (or of known private ``user_factors``,
    rows in ``data`` order, for a model with ``score_users``). ``tie_orders`` > 1: a history whose
    last items share a timestamp is scored as the mean over that many random orders of them
    (``common.tie_scoring``; sequence models only). ``split``: ``"test"`` or ``"valid"``.
    ``chain``: the scores blended with this item chain's (:meth:`ItemChain.blend`; common/item_chain.py)."""
    model.eval()
    histories = data.eval_cases(split)[0]
    gaps = None
    if getattr(model, "time_features", False):  # time-gap input channel (common/models/context.py)
        from common.models.context import history_gaps

        gaps = history_gaps(histories, data.timestamps)
    scores = batch_scorer(histories, data.timestamps, max_len=max_len, orders=tie_orders if user_factors is None else 1)

    def score_batch(start: int, stop: int, h: list[np.ndarray]) -> torch.Tensor:
        if user_factors is not None:
            return model.score_users(user_factors[start:stop].to(device))
        out = scores(history_scorer(model, max_len=max_len, device=device, gaps=gaps, offset=start), start, h)
        return out if chain is None else chain.blend(out, h)

    return recommendation_metrics(score_batch, data, top_k=top_k, split=split)


def combine_partner_metrics(records: Iterable[Mapping], num_items: int, top_k: int = 10) -> dict[str, float | list[float]]:
    """Coverage and per-partner NDCG spread from the partners' evaluation records.

    ``records`` are the partners' metric records (key -> value); the additive means are
    combined elsewhere (``common.metrics.means_from_sums``).
    """
    records = list(records)
    items: set[int] = set()
    per_partner: dict[int, float] = {}
    for n, record in enumerate(records):
        items.update(int(i) for i in record.get(f"rec-items@{top_k}", []) or [])
        users = float(record.get("num-users", 0.0))
        if users:
            pid = int(record.get("partition-id", -1 - n))
            per_partner[pid] = float(record.get(f"ndcg@{top_k}-sum", 0.0)) / users
    values = np.array([per_partner[p] for p in sorted(per_partner)])
    out: dict[str, float | list[float]] = {}
    if any(f"rec-items@{top_k}" in record for record in records):  # simulated partners only (client/private_factors.py)
        out[f"coverage@{top_k}"] = len(items - {0}) / max(num_items, 1)
    if len(values):
        out.update({
            f"partner-ndcg@{top_k}": values.round(6).tolist(),
            # whose they are: simulated partners' partition ids (a real partner sends none: -1; a
            # MetricRecord holds no null), so a plot of a sampled round names the partners evaluated
            f"partner-ndcg@{top_k}-ids": [max(p, -1) for p in sorted(per_partner)],
            f"partner-ndcg@{top_k}-std": float(values.std()),
            f"partner-ndcg@{top_k}-min": float(values.min()),
            f"partner-ndcg@{top_k}-max": float(values.max()),
        })
    return out


def evaluates_round(server_round: int, every: int, last_round: int = 0) -> bool:
    """Evaluation schedule (``evaluate-every``): every ``every``-th round and always ``last_round``
    (the run's final round, so its summary has numbers). Shared by the federated server
    (server/rounds.py) and the centralised benchmark run, so both evaluate equally often."""
    return server_round % every == 0 or server_round == last_round
