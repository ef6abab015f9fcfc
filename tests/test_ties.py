"""Tie shuffling (common/data/ties.py, ``shuffle-ties``): only tied training items move, and training sees it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from common.data import ties
from common.data.ties import shuffle_within_ties, training_tie_runs
from common.models import SASRec
from common.training import DPSettings, train_local

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tie_runs(timestamps: np.ndarray) -> list[tuple[int, int]]:
    """Reference: (start, stop) of every run of two or more equal consecutive timestamps, by a plain scan."""
    runs, start = [], 0
    for i in range(1, len(timestamps) + 1):
        if i == len(timestamps) or timestamps[i] != timestamps[start]:
            if i - start > 1:
                runs.append((start, i))
            start = i
    return runs


def test_tie_runs_of_the_training_items_only(small_data) -> None:  # noqa: ANN001
    rng = np.random.default_rng(4)
    for _ in range(200):  # the library's vectorised runs equal a plain scan
        t = np.sort(rng.integers(0, 6, size=rng.integers(0, 12)))
        assert ties.tie_runs(t) == tie_runs(t)
    times = [np.array(t) for t in ([1, 2, 2, 2, 3, 4, 4, 5, 9, 9], [1, 2, 3, 3, 3], [1, 2, 3, 4], [5, 5, 5])]
    data = dataclasses.replace(small_data.subset(range(4)), timestamps=times,
                               sequences=[np.arange(1, len(t) + 1) for t in times])
    # the last two items of each user (validation, test) are the split's, never part of a run
    assert training_tie_runs(data) == [[(1, 4), (5, 7)], [], [], []]


def _tied(data, width: int):  # noqa: ANN001 -- coarser clocks make ties
    return dataclasses.replace(data, timestamps=[np.arange(len(t)) // width for t in data.timestamps])


def test_only_tied_training_items_move_and_the_split_stays(small_data) -> None:  # noqa: ANN001
    data = _tied(small_data, 3)
    out = shuffle_within_ties(data, np.random.default_rng(0))
    moved = 0
    for before, after, times in zip(data.sequences, out.sequences, data.timestamps):
        assert after[-2:].tolist() == before[-2:].tolist()  # validation and test items never move
        train = len(before) - 2
        runs = tie_runs(times[:train])
        in_run = np.zeros(len(before), dtype=bool)
        for a, b in runs:
            assert sorted(after[a:b].tolist()) == sorted(before[a:b].tolist())  # a tie keeps its items
            in_run[a:b] = True
        assert (after[~in_run] == before[~in_run]).all()  # untied items keep their place
        moved += int((after != before).any())
    assert moved > len(data.sequences) // 2  # with runs of 3 most users see a new order
    again = shuffle_within_ties(data, np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip(out.sequences, again.sequences))  # seeded: reproducible
    untied = shuffle_within_ties(small_data, np.random.default_rng(0))  # distinct timestamps: nothing moves
    assert all((a == b).all() for a, b in zip(untied.sequences, small_data.sequences))


def _train(data, shuffle: bool, dp: DPSettings | None = None, **variant) -> torch.Tensor:  # noqa: ANN001, ANN003
    torch.manual_seed(0)
    model = SASRec(data.num_items, dim=16, max_len=20, num_blocks=1, dropout=0.0,
                   time_features=variant.pop("time_features", False), tied_output=variant.pop("tied", True))
    train_local(model, data, epochs=3, batch_size=32, learning_rate=0.01, max_len=20, dp=dp, seed=1,
                shuffle_ties=shuffle, **variant)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _dp(mode: str) -> DPSettings:
    return DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode=mode, noise_seed=0)  # same batches


@pytest.mark.parametrize("dp,variant", [
    (None, {}),
    (None, {"history_windows": True}),
    (None, {"time_features": True}),
    (_dp("fused"), {}),
    (_dp("hooks"), {}),
    (_dp("ghost"), {"tied": False}),
], ids=["plain", "windows", "time-gaps", "fused-dp", "hooks-dp", "ghost-dp"])
def test_training_reads_the_reordered_ties(small_data, dp, variant) -> None:  # noqa: ANN001
    tied = _tied(small_data, 3)
    # without ties the option changes nothing; with ties every loader (Opacus' Poisson loader
    # under DP, each grad-sample mode) trains on new orders, so the weights differ
    assert torch.equal(_train(small_data, False, dp, **variant), _train(small_data, True, dp, **variant))
    assert not torch.allclose(_train(tied, False, dp, **variant), _train(tied, True, dp, **variant))


def test_time_gaps_inside_a_tie_do_not_move(small_data) -> None:  # noqa: ANN001
    from common.training_pairs import training_pairs

    tied = _tied(small_data, 3)
    before = training_pairs(tied, 20, time_features=True).tensors[0]
    after = training_pairs(shuffle_within_ties(tied, np.random.default_rng(1)), 20, time_features=True).tensors[0]
    assert torch.equal(before[..., 1], after[..., 1]) and not torch.equal(before[..., 0], after[..., 0])


@pytest.mark.parametrize("noise_seed, secret", [(None, True), (0, False)], ids=["partner", "reproducible-simulation"])
def test_a_partner_draws_its_tie_orders_from_a_secret_stream_under_dp(small_data, monkeypatch, noise_seed, secret):
    # A review: the tie orders of every user came from one stream seeded by the run seed, which the coordinator
    # knows; one more user shifted every later user's orders, so the clipped sum moved by 8.9x max-grad-norm
    # instead of at most 1x. Under DP a partner's stream is now secret; without DP, or with the simulation's
    # reproducible noise (the researcher knows everything anyway), the run seed still repeats a run.
    drawn = []
    real = ties.shuffle_within_ties

    def spy(data, rng, runs=None):  # noqa: ANN001, ANN202
        drawn.append(rng.bit_generator.state["state"]["state"])  # the stream's state as the epoch starts
        return real(data, rng, runs)

    monkeypatch.setattr("common.training.shuffle_within_ties", spy)
    tied = _tied(small_data, 3)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="fused", noise_seed=noise_seed)
    states = []
    for _ in range(2):
        drawn.clear()
        _train(tied, True, dp)
        states.append(list(drawn))
    from_run_seed = np.random.default_rng(1).bit_generator.state["state"]["state"]  # _train's seed = 1
    assert (states[0] != states[1]) == secret and (states[0][0] != from_run_seed) == secret
    drawn.clear()
    _train(tied, True, None)  # no DP: the run seed, as before
    assert drawn[0] == from_run_seed
