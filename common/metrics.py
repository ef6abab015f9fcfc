"""Full-ranking evaluation: HR@K and NDCG@K over the whole catalogue, history excluded.

Every catalogue item except padding and the items already in the user's history is a
candidate (the held-out target stays a candidate even if it was seen before). A target's
place is the candidates scored strictly higher plus those tied with it, and HR/NDCG are their
expected values when ties are broken at random (a constant model gets what chance gives, not
HR@10 1.0; popularity's equal counts no longer all rank in the target's favour). Sums and counts are
returned so that partners' results combine into exactly the all-users figure; NDCG's sum of
squares rides along so the combined figure also has its standard error over users (how much
the mean would move on another draw of test users: on ML-100K's 943 users about +-0.008 NDCG@10
at 0.12, larger than most tuning differences).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from common.data.sequences import SequenceData
from common.tie_scoring import batch_scorer


def pad_left(histories: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """Left-pad (with item 0) or truncate to the last ``max_len`` items."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, h in enumerate(histories):
        h = h[-max_len:]
        if len(h):
            out[row, -len(h):] = h
    return torch.from_numpy(out)


def target_ranks(scores: torch.Tensor, histories: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """(users, 2) ints per target among candidates (catalogue minus padding and history): column 0
    the candidates scored strictly higher, column 1 the other candidates tied with it. Under a
    random tie-break the target's 0-based rank is uniform on [above, above + tied]. Float64 scores
    are compared as float64 (a baseline's tiny tie-breaking term would vanish in float32)."""
    scores = scores.detach().clone() if scores.dtype == torch.float64 else scores.detach().float().clone()
    t = torch.as_tensor(targets, dtype=torch.long)
    rows = torch.arange(len(t))
    target_scores = scores[rows, t].clone()  # kept: a target seen before is still a candidate
    # A NaN score is no evidence: a NaN target ranks below every candidate, a NaN candidate above
    # the target (comparisons with NaN are all False, which made a NaN model rank every target first)
    target_scores = torch.nan_to_num(target_scores, nan=float("-inf")).unsqueeze(1)
    scores = torch.nan_to_num(scores, nan=float("inf"))
    candidate = torch.ones_like(scores, dtype=torch.bool)
    candidate[:, 0] = False
    for row, h in enumerate(histories):
        if len(h):
            candidate[row, torch.as_tensor(h, dtype=torch.long)] = False
    candidate[rows, t] = False  # the target itself is neither above nor tied
    above = ((scores > target_scores) & candidate).sum(dim=1)
    tied = ((scores == target_scores) & candidate).sum(dim=1)
    return torch.stack([above, tied], dim=1).cpu().numpy()


def _above_and_tied(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain 0-based ranks (no ties) or :func:`target_ranks`' (above, tied) pairs."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.ndim == 2:
        return ranks[:, 0], ranks[:, 1]
    return ranks, np.zeros_like(ranks)


def hit_values(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's expected hit@k: the chance its target lands in the top k when ties break at random."""
    above, tied = _above_and_tied(ranks)
    return np.clip(k - above, 0, tied + 1) / (tied + 1.0)


def seen_items(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, length, length + 1) item indices each position's softmax leaves out under
    ``exclude-seen``: the padding column 0 and the items at or before that position in the user's
    own input (the history that evaluation and serving never recommend), except that position's
    target (a repeated item stays a valid target); unused slots hold 0."""
    items = inputs[..., 0] if inputs.dim() == 3 else inputs  # (b, t, 2): item and time-gap channels
    b, t = items.shape
    later = torch.ones(t, t, dtype=torch.bool, device=items.device).triu(1)
    seen = items[:, None, :].expand(b, t, t).masked_fill(later, 0)
    seen = seen.masked_fill(seen == targets[:, :, None], 0)
    return torch.cat([seen.new_zeros(b, t, 1), seen], dim=-1)


def drop_seen(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` (batch, length, V+1) with each position's :func:`seen_items` set to -inf: the
    cross-entropy then ranks the target only against items the user could still be recommended,
    as full-ranking evaluation with the history excluded does."""
    return logits.scatter(-1, seen_items(inputs, targets), float("-inf"))


def ndcg_gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's expected NDCG@k: the mean of 1 / log2(rank + 2) (0 outside the top k) over the
    0-based ranks its target takes when ties break at random (one rank when nothing ties)."""
    above, tied = _above_and_tied(ranks)
    discounts = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))])  # sum over ranks < m
    first, last = np.minimum(above, k), np.minimum(above + tied + 1, k)
    return (discounts[last] - discounts[first]) / (tied + 1.0)


def ranking_sums(ranks: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """``hit@K-sum``/``ndcg@K-sum`` over users plus ``num-users``; divide by ``num-users`` for means.
    ``ranks``: :func:`target_ranks`' (above, tied) pairs, or plain 0-based ranks.

    ``hit@K-sqsum``/``ndcg@K-sqsum`` (sums of squared per-user values) are additive too:
    :func:`standard_errors` turns the combined sums into each mean's standard error."""
    out: dict[str, float] = {"num-users": float(len(ranks))}
    for k in ks:
        hit = hit_values(ranks, k)
        gain = ndcg_gains(ranks, k)
        out[f"hit@{k}-sum"] = float(hit.sum())
        out[f"hit@{k}-sqsum"] = float((hit * hit).sum())
        out[f"ndcg@{k}-sum"] = float(gain.sum())
        out[f"ndcg@{k}-sqsum"] = float((gain * gain).sum())
    return out


def means_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Turn combined sums into HR@K/NDCG@K means."""
    n = sums.get("num-users", 0.0)
    out = {}
    for key, value in sums.items():
        if key.endswith("-sum"):
            name = key[: -len("-sum")].replace("hit@", "hr@")
            out[name] = value / n if n else 0.0
    return out


def standard_errors(sums: dict[str, float]) -> dict[str, float]:
    """``hr@K-se``/``ndcg@K-se``: the standard error over users of each mean of
    :func:`means_from_sums` (sample standard deviation / sqrt(users)); a 95% confidence
    interval is the mean +- 1.96 se. Each mean needs its ``-sqsum`` (a record without ``hit@K-sqsum``,
    from before ties were broken at random, had 0/1 hits: its sum is its sum of squares); with
    fewer than two users, no entries."""
    n = float(sums.get("num-users", 0.0))
    out: dict[str, float] = {}
    if n < 2:
        return out
    for key, total in sums.items():
        if not key.endswith("-sum"):
            continue
        if key[:-4] + "-sqsum" in sums:
            squares = sums[key[:-4] + "-sqsum"]
        elif key.startswith("hit@"):
            squares = total  # 0/1 hits
        else:
            continue
        mean = total / n
        variance = max(squares - n * mean * mean, 0.0) / (n - 1)
        out[key[:-4].replace("hit@", "hr@") + "-se"] = float(np.sqrt(variance / n))
    return out


def means_and_errors(sums: dict[str, float]) -> dict[str, float]:
    """:func:`means_from_sums` plus :func:`standard_errors` of the same sums."""
    return {**means_from_sums(sums), **standard_errors(sums)}


def history_scorer(model: torch.nn.Module, *, max_len: int, device: str | torch.device = "cpu",
                   gaps: Sequence[np.ndarray] | None = None,
                   offset: int = 0) -> Callable[[list[int], list[np.ndarray]], torch.Tensor]:
    """``score(rows, histories)``: the model's catalogue scores (on CPU) for ``histories``, which are
    rows ``offset + rows`` of a split; ``gaps`` (the split's time-gap buckets) for a model with time
    features. The form :func:`common.tie_scoring.order_averaged_scores` calls."""

    def score(rows: list[int], histories: list[np.ndarray]) -> torch.Tensor:
        if gaps is None:
            return model.score(pad_left(histories, max_len).to(device)).cpu()
        from common.models.context import model_inputs

        return model.score(model_inputs(model, histories, max_len, [gaps[offset + r] for r in rows]).to(device)).cpu()

    return score


@torch.no_grad()
def split_scores(
    model: torch.nn.Module,
    data: SequenceData,
    *,
    split: str = "test",
    max_len: int = 50,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tie_orders: int = 1,
) -> Iterator[tuple[torch.Tensor, list[np.ndarray], np.ndarray]]:
    """(catalogue scores on CPU, histories, targets) of ``data``'s ``split``, ``batch_size`` users at a time.

    ``tie_orders`` > 1: log-probabilities averaged over that many random orders of the tied items
    in each history's window (``common.tie_scoring``); else the model's raw scores.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    histories, targets = data.eval_cases(split)
    gaps = None
    if getattr(model, "time_features", False):  # time-gap input channel (common/models/context.py)
        from common.models.context import history_gaps

        gaps = history_gaps(histories, data.timestamps)
    scores = batch_scorer(histories, data.timestamps, max_len=max_len, orders=tie_orders)
    try:
        for start in range(0, len(targets), batch_size):
            h = histories[start:start + batch_size]

            score = history_scorer(model, max_len=max_len, device=device, gaps=gaps, offset=start)
            yield scores(score, start, h), h, targets[start:start + batch_size]
    finally:
        if was_training:
            model.train()


def evaluate_ranking(
    model: torch.nn.Module,
    data: SequenceData,
    *,
    split: str = "test",
    max_len: int = 50,
    ks: Sequence[int] = (10,),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    tie_orders: int = 1,
) -> dict[str, float]:
    """Ranking sums (see :func:`ranking_sums`) of ``model`` on ``data``'s ``split`` targets."""
    ranks = [target_ranks(scores, h, t) for scores, h, t in
             split_scores(model, data, split=split, max_len=max_len, batch_size=batch_size, device=device,
                          tie_orders=tie_orders)]
    return ranking_sums(np.concatenate(ranks) if ranks else np.zeros((0, 2), dtype=np.int64), ks)
