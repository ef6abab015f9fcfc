"""Scoring histories whose last items share a timestamp: the mean over random orders of them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError
from common.evaluation import evaluate_model
from common.metrics import evaluate_ranking
from common.models import SASRec
from common.tie_scoring import order_averaged_scores, window_tie_runs

V = 6


def last_item_scores(rows: list[int], histories: list[np.ndarray]) -> torch.Tensor:
    """A toy model that is sure the next item is the last item + 1: its softmax is one-hot-like."""
    out = torch.full((len(histories), V + 1), -40.0)
    for r, h in enumerate(histories):
        out[r, int(h[-1]) % V + 1] = 40.0
    return out


def test_mixture_over_orders_of_a_tie_at_the_end():
    # Prepare: user 0 ends with a tie of items 2, 3 (either may be last); user 1 has no tie
    histories = [np.array([1, 2, 3]), np.array([4, 5])]
    runs = window_tie_runs(histories, [np.array([0, 5, 5]), np.array([0, 1])], max_len=3)
    calls = []

    def score(rows, hs):  # noqa: ANN001, ANN202
        calls.append(list(rows))
        return last_item_scores(rows, hs)

    # Execute
    logp = order_averaged_scores(score, histories, runs, orders=400, seed=1)
    p = logp.exp()
    # Assert: user 0's next item is 3 or 4 with probability 1/2 each (the two orders); user 1 is scored
    # once, as log-softmax (item 6 certain); only the tied user is re-scored
    assert runs == [[(1, 3)], []]
    assert p[0, 3].item() == pytest.approx(0.5, abs=0.1) and p[0, 4].item() == pytest.approx(0.5, abs=0.1)
    assert p[0, 3].item() + p[0, 4].item() == pytest.approx(1.0, abs=1e-9)
    assert p[1, 6].item() == pytest.approx(1.0) and torch.allclose(logp.exp().sum(1), torch.ones(2, dtype=torch.float64))
    assert calls[0] == [0, 1] and all(c == [0] for c in calls[1:]) and len(calls) == 401


def test_ties_outside_the_window_and_one_order_change_nothing():
    histories = [np.array([1, 2, 3, 4, 5])]
    times = [np.array([0, 0, 1, 2, 3])]  # tie of the first two items; the model sees the last 3
    assert window_tie_runs(histories, times, max_len=3) == [[]]
    assert window_tie_runs(histories, times, max_len=4) == [[(0, 2)]]  # item 2 is in a 4-item window
    one = order_averaged_scores(last_item_scores, histories, [[(0, 2)]], orders=1, seed=0)
    torch.testing.assert_close(one, torch.log_softmax(last_item_scores([0], histories).double(), 1))


def _tied(data, width: int):  # noqa: ANN001 -- a coarser clock makes ties
    return dataclasses.replace(data, timestamps=[np.arange(len(t)) // width for t in data.timestamps])


def test_evaluation_with_orders_is_reproducible_and_equal_without_ties(small_data):  # noqa: ANN001
    torch.manual_seed(0)
    model = SASRec(small_data.num_items, max_len=10, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
    # No ties (distinct timestamps): the same sums as one order, in both evaluation paths
    plain = evaluate_model(model, small_data, max_len=10)
    assert evaluate_model(model, small_data, max_len=10, tie_orders=8) == plain
    assert evaluate_ranking(model, small_data, max_len=10, tie_orders=8) == evaluate_ranking(model, small_data,
                                                                                            max_len=10)
    # Ties: the orders change the scores, identically on every call (fixed draw), and both paths agree
    tied = _tied(small_data, 3)
    once = evaluate_model(model, tied, max_len=10)
    mixed = evaluate_model(model, tied, max_len=10, tie_orders=8)
    assert mixed != once and evaluate_model(model, tied, max_len=10, tie_orders=8) == mixed
    ranked = evaluate_ranking(model, tied, max_len=10, ks=(10,), tie_orders=8)
    assert ranked["ndcg@10-sum"] == pytest.approx(mixed["ndcg@10-sum"])


def test_tie_orders_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="tie-orders"):
        resolve_config({"tie-orders": 0})
    assert resolve_config({"tie-orders": 16})["tie-orders"] == 16


def test_partner_evaluation_follows_the_tie_orders_knob(small_data):  # noqa: ANN001
    from flwr.app import Context, RecordDict

    from client.private_factors import evaluate_partner

    torch.manual_seed(0)
    model = SASRec(small_data.num_items, max_len=10, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
    tied = _tied(small_data, 4)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    cfg = resolve_config({"max-seq-len": 10})
    assert cfg["tie-orders"] == 16  # the default
    def shared(sums: dict) -> dict:  # what a real partner sends (client/private_factors.py keeps rec-items)
        return {k: v for k, v in sums.items() if not k.startswith("rec-items@")}

    by_default = evaluate_partner(model, tied, context, cfg)
    assert by_default == shared(evaluate_model(model, tied, max_len=10, tie_orders=16))
    assert evaluate_partner(model, tied, context, {**cfg, "tie-orders": 1}) == shared(evaluate_model(model, tied, max_len=10))
    assert by_default != evaluate_model(model, tied, max_len=10)


def test_partners_summed_equal_all_users_at_once_with_orders(small_data):  # noqa: ANN001
    # The server adds partners' sums: each user's orders must not depend on who else is evaluated
    # with it (one shared draw stream per pass made 3 partners' NDCG@10 0.2700 against 0.2512 at once)
    torch.manual_seed(0)
    model = SASRec(small_data.num_items, max_len=10, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
    tied = _tied(small_data, 3)
    whole = evaluate_model(model, tied, max_len=10, tie_orders=8)
    users = np.random.default_rng(0).permutation(tied.num_users)
    parts = [evaluate_model(model, tied.subset(np.sort(p)), max_len=10, tie_orders=8)
             for p in np.array_split(users, 3)]
    for key in ("num-users", "hit@10-sum", "ndcg@10-sum", "ndcg@10-sqsum"):
        assert sum(p[key] for p in parts) == pytest.approx(whole[key], abs=1e-9), key
