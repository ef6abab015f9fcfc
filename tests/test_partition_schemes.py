"""Partition schemes (iid, dirichlet, size-skew, cross-device) and held-out users: every user in
exactly one partner, sizes as requested, skew where asked, deterministic in the seed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import resolve_config
from common.data.attributes import dominant_genre
from common.data.partition import partition_statistics, partition_users, size_skew_partition, size_skew_sizes
from common.data.sequences import SequenceData
from common.errors import DataError
from common.partners import holdout_positions, simulated_partner, split_population

TINY = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1}


def assert_exact_cover(parts: list[np.ndarray], num_users: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == num_users, "a user is missing or in two partners"
    assert sorted(joined.tolist()) == list(range(num_users))


def fake_data(num_users: int) -> SequenceData:
    seqs = [np.array([1, 2, 3]) for _ in range(num_users)]
    return SequenceData(np.array(["a", "b", "c"]), np.arange(num_users).astype(str), seqs, seqs)


@settings(max_examples=25, deadline=None)
@given(users=st.integers(10, 300), parts=st.integers(1, 10), seed=st.integers(0, 10_000))
def test_iid_covers_every_user_once_with_near_equal_sizes(users, parts, seed):
    got = partition_users(fake_data(users), parts, scheme="iid", seed=seed)
    assert_exact_cover(got, users)
    sizes = [len(p) for p in got]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=15, deadline=None)
@given(users=st.integers(100, 400), parts=st.integers(2, 6), power=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 99))
def test_size_skew_sizes_are_as_requested(users, parts, power, seed):
    got = size_skew_partition(users, parts, power=power, seed=seed)
    assert_exact_cover(got, users)
    # Independent statement of the rule: share of partner i = i^p / sum_j j^p, floored; the rest to the last.
    weights = np.array([(i + 1) ** power for i in range(parts)], dtype=float)
    expected = [int(np.floor(w / weights.sum() * users)) for w in weights]
    expected[-1] += users - sum(expected)
    assert [len(p) for p in got] == expected == size_skew_sizes(users, parts, power)
    assert len(got[-1]) > len(got[0])  # a few large, many small


def test_size_skew_refuses_an_empty_partner():
    with pytest.raises(DataError, match="without users"):
        size_skew_partition(12, 10, power=3.0)


def test_dirichlet_covers_users_is_seeded_and_skews_the_attribute():
    rng = np.random.default_rng(0)
    attribute = rng.choice(["drama", "comedy", "action", "horror"], size=400)
    data = fake_data(400)
    skewed = partition_users(data, 5, scheme="dirichlet", seed=3, alpha=0.1, attribute=attribute)
    again = partition_users(data, 5, scheme="dirichlet", seed=3, alpha=0.1, attribute=attribute)
    iid = partition_users(data, 5, scheme="iid", seed=3)
    assert_exact_cover(skewed, 400)
    assert all((a == b).all() for a, b in zip(skewed, again))
    tv_skewed = partition_statistics(skewed, attribute)["attribute-tv-mean"]
    tv_iid = partition_statistics(iid, attribute)["attribute-tv-mean"]
    assert tv_skewed > 2 * tv_iid, (tv_skewed, tv_iid)


def test_cross_device_is_one_partner_per_user():
    got = partition_users(fake_data(7), 7, scheme="cross-device")
    assert [p.tolist() for p in got] == [[u] for u in range(7)]
    with pytest.raises(DataError, match="one partner per user"):
        partition_users(fake_data(7), 3, scheme="cross-device")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(DataError, match="available: iid, dirichlet"):
        partition_users(fake_data(5), 2, scheme="zipf")


def test_statistics_report_sizes_and_skew():
    parts = [np.array([0, 1, 2]), np.array([3])]
    stats = partition_statistics(parts, np.array(["a", "a", "a", "b"]))
    assert stats["sizes"] == [3, 1] and stats["size-min"] == 1 and stats["size-max"] == 3
    # population: a=3/4, b=1/4; partner 0 all a: TV 1/4; partner 1 all b: TV 3/4
    assert stats["attribute-tv-mean"] == pytest.approx(0.5)
    assert stats["attribute-share-mean"] == pytest.approx(1.0)


def test_dominant_genre_counts_training_items_only():
    catalogue = np.array(["10", "20", "30", "40"])
    # items: 1->"10" (Drama), 2->"20" (Comedy|Drama), 3->"30" (Comedy), 4->"40" (Horror)
    genres = {"10": ["Drama"], "20": ["Comedy", "Drama"], "30": ["Comedy"], "40": ["Horror"]}
    seqs = [np.array([1, 2, 4, 4]),  # train [1, 2]: Drama 2, Comedy 1 (the horror items are valid/test)
            np.array([3, 2, 1, 1]),  # train [3, 2]: Comedy 2, Drama 1
            np.array([1, 3, 4, 4])]  # train [1, 3]: tie Comedy/Drama -> alphabetical
    data = SequenceData(catalogue, np.array(["u1", "u2", "u3"]), seqs, seqs)
    assert dominant_genre(data, genres).tolist() == ["Drama", "Comedy", "Comedy"]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "size-skew"])
def test_held_out_users_are_in_no_partner_and_the_rest_in_exactly_one(scheme):
    cfg = resolve_config(None, {**TINY, "holdout-fraction": 0.2, "partitioning": scheme, "seed": 5})
    population, held = split_population(cfg)
    total = population.num_users + held.num_users
    assert held.num_users == round(0.2 * total)
    partners = [simulated_partner(cfg, i, 3) for i in range(3)]
    ids = np.concatenate([p.user_ids for p in partners])
    assert sorted(ids.tolist()) == sorted(population.user_ids.tolist())
    assert not set(ids.tolist()) & set(held.user_ids.tolist())


def test_holdout_positions_are_seeded_and_checked():
    assert (holdout_positions(100, 0.1, 1) == holdout_positions(100, 0.1, 1)).all()
    assert not (holdout_positions(100, 0.1, 1) == holdout_positions(100, 0.1, 2)).all()
    assert len(holdout_positions(100, 0.0, 1)) == 0
    with pytest.raises(Exception, match="holdout-fraction"):
        holdout_positions(100, 1.0, 1)
