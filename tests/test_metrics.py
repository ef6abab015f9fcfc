"""Full-ranking HR@K/NDCG@K against a brute-force computation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from common.metrics import means_and_errors, means_from_sums, ranking_sums, standard_errors, target_ranks


def brute_force(scores: np.ndarray, history: list[int], target: int, k: int) -> tuple[float, float]:
    candidates = [i for i in range(1, len(scores)) if i not in history or i == target]
    rank = sorted(candidates, key=lambda i: -scores[i]).index(target)  # continuous scores: no ties
    if rank < k:
        return 1.0, 1.0 / math.log2(rank + 2)
    return 0.0, 0.0


def test_against_brute_force():
    rng = np.random.default_rng(0)
    n_items, k = 30, 5
    scores = rng.normal(size=(40, n_items + 1)).astype(np.float32)
    histories = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 10), replace=False) for _ in range(40)]
    targets = np.array([rng.integers(1, n_items + 1) for _ in range(40)])
    ranks = target_ranks(torch.from_numpy(scores), histories, targets)
    assert not ranks[:, 1].any()  # continuous scores: no ties
    sums = ranking_sums(ranks, ks=(k,))
    expected = [brute_force(scores[u], list(histories[u]), int(targets[u]), k) for u in range(40)]
    assert sums["hit@5-sum"] == sum(e[0] for e in expected)
    assert math.isclose(sums["ndcg@5-sum"], sum(e[1] for e in expected), rel_tol=1e-9)
    means = means_from_sums(sums)
    assert math.isclose(means["hr@5"], sum(e[0] for e in expected) / 40)


def test_nan_scores_never_rank_a_target_first():
    # A diverged model scores NaN: its targets rank last, not first (NaN compares False)
    scores = torch.full((2, 6), float("nan"))
    # last among its candidates (3 and 4 others; the target's own NaN once counted above itself too)
    assert target_ranks(scores, [np.array([1]), np.array([], dtype=np.int64)], np.array([2, 3])).tolist() == [[3, 0], [4, 0]]
    # a NaN candidate counts above a finite target; finite scores rank as before
    one = torch.tensor([[0.0, 0.1, 0.5, float("nan"), 0.2, 0.3]])
    assert target_ranks(one, [np.array([], dtype=np.int64)], np.array([4])).tolist() == [[3, 0]]  # items 2, 3 (NaN), 5


def test_history_items_are_excluded():
    scores = torch.tensor([[0.0, 9.0, 8.0, 1.0, 0.5]])
    # Items 1 and 2 score highest but were seen: the target (3) ranks first.
    assert target_ranks(scores, [np.array([1, 2])], np.array([3])).tolist() == [[0, 0]]
    assert target_ranks(scores, [np.array([])], np.array([3])).tolist() == [[2, 0]]


def _every_tie_break(scores: np.ndarray, history: list[int], target: int, k: int) -> tuple[float, float]:
    """Mean hit/NDCG over every order of the candidates tied with the target (enumerated)."""
    candidates = [i for i in range(1, len(scores)) if i not in history or i == target]
    better = sum(1 for i in candidates if scores[i] > scores[target])
    block = [i for i in candidates if scores[i] == scores[target]]
    hits = gains = 0.0
    orders = list(itertools.permutations(block))
    for order in orders:
        rank = better + order.index(target)
        hits += rank < k
        gains += 1.0 / math.log2(rank + 2) if rank < k else 0.0
    return hits / len(orders), gains / len(orders)


def test_tied_scores_count_at_their_expected_value_under_a_random_tie_break():
    # Popularity ranks by counts, many equal: the target must not win every tie it is in
    rng = np.random.default_rng(5)
    n_items, users, k = 12, 60, 5
    scores = rng.integers(0, 4, size=(users, n_items + 1)).astype(np.float32)
    histories = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 5), replace=False) for _ in range(users)]
    targets = np.array([rng.integers(1, n_items + 1) for _ in range(users)])
    ranks = target_ranks(torch.from_numpy(scores), histories, targets)
    assert ranks[:, 1].max() >= 2  # the case has real ties
    sums = ranking_sums(ranks, ks=(k,))
    expected = [_every_tie_break(scores[u], list(histories[u]), int(targets[u]), k) for u in range(users)]
    assert math.isclose(sums["hit@5-sum"], sum(e[0] for e in expected), rel_tol=1e-9)
    assert math.isclose(sums["hit@5-sqsum"], sum(e[0] ** 2 for e in expected), rel_tol=1e-9)
    assert math.isclose(sums["ndcg@5-sum"], sum(e[1] for e in expected), rel_tol=1e-9)
    assert math.isclose(sums["ndcg@5-sqsum"], sum(e[1] ** 2 for e in expected), rel_tol=1e-9)


def test_a_constant_model_scores_what_chance_gives():
    # Strictly-higher ranks gave every target rank 0 here: HR@10 1.0 for a model that knows nothing
    scores = torch.zeros(3, 101)
    histories = [np.arange(1, 21), np.array([], dtype=np.int64), np.array([7])]
    sums = ranking_sums(target_ranks(scores, histories, np.array([50, 50, 7])), ks=(10,))
    assert math.isclose(sums["hit@10-sum"], 10 / 80 + 10 / 100 + 10 / 100, rel_tol=1e-12)


def test_partner_sums_combine_to_the_global_figure():
    ranks = np.array([0, 3, 12, 1, 7, 40])
    whole = means_from_sums(ranking_sums(ranks))
    a, b = ranking_sums(ranks[:2]), ranking_sums(ranks[2:])
    merged = means_from_sums({key: a[key] + b[key] for key in a})
    assert merged == whole


def _per_user_values(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    hits = np.array([1.0 if r < k else 0.0 for r in ranks])
    gains = np.array([1.0 / math.log2(r + 2) if r < k else 0.0 for r in ranks])
    return hits, gains


def test_standard_errors_match_the_per_user_values():
    ranks = np.random.default_rng(3).integers(0, 40, size=57)
    errors = standard_errors(ranking_sums(ranks, ks=(5, 10)))
    for k in (5, 10):
        hits, gains = _per_user_values(ranks, k)
        assert math.isclose(errors[f"hr@{k}-se"], hits.std(ddof=1) / math.sqrt(len(ranks)), rel_tol=1e-9)
        assert math.isclose(errors[f"ndcg@{k}-se"], gains.std(ddof=1) / math.sqrt(len(ranks)), rel_tol=1e-9)
    assert errors["ndcg@10-se"] > 0


def test_partner_sums_combine_to_the_global_standard_error():
    ranks = np.random.default_rng(4).integers(0, 30, size=80)
    parts = [ranking_sums(ranks[a:b]) for a, b in ((0, 11), (11, 50), (50, 80))]
    merged = {key: sum(p[key] for p in parts) for key in parts[0]}
    whole = means_and_errors(ranking_sums(ranks))
    combined = means_and_errors(merged)
    assert combined.keys() == whole.keys() and {"hr@10", "ndcg@10", "hr@10-se", "ndcg@10-se"} <= whole.keys()
    for key in whole:
        assert math.isclose(combined[key], whole[key], rel_tol=1e-9), key


def test_standard_error_needs_two_users():
    assert standard_errors(ranking_sums(np.array([0]))) == {}
    assert standard_errors(ranking_sums(np.array([0, 0]))) == {"hr@10-se": 0.0, "ndcg@10-se": 0.0}


def test_standard_errors_use_fractional_hits_squares():
    ranks = np.array([[0, 3], [12, 0], [2, 9], [8, 5]])  # (above, tied): expected hits 1, 0, 8/10, 2/6
    hits = np.array([1.0, 0.0, 0.8, 1 / 3])
    error = standard_errors(ranking_sums(ranks, ks=(10,)))["hr@10-se"]
    assert math.isclose(error, hits.std(ddof=1) / 2.0, rel_tol=1e-9)
