"""Trimming all-padding columns from a left-padded batch changes cost, never results."""

import numpy as np
import torch

from common.metrics import pad_left
from common.models.sasrec import SASRec
from common.objectives import positions_only_loss, trim_padding


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    # As common.training_pairs.training_pairs builds them: input i and target i are both padding or both items
    histories = [torch.arange(1, 8).numpy(), torch.arange(3, 7).numpy(), torch.arange(2, 5).numpy()]
    return pad_left([h[:-1] for h in histories], 11), pad_left([h[1:] for h in histories], 11)


def test_trim_drops_only_columns_padded_in_every_row() -> None:
    inputs, targets = _batch()
    short_in, short_t = trim_padding(inputs, targets)
    assert short_in.shape[1] == 6  # longest input history: 6 items (7 minus the last)
    assert torch.equal(short_in, inputs[:, -6:]) and torch.equal(short_t, targets[:, -6:])
    assert (inputs[:, :-6] == 0).all()


def test_trimmed_batch_has_the_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = SASRec(10, max_len=11, dim=8, num_blocks=2, dropout=0.0).eval()
    inputs, targets = _batch()
    full = positions_only_loss(model, inputs, targets)
    full_grads = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
    short = positions_only_loss(model, *trim_padding(inputs, targets))
    short_grads = torch.autograd.grad(short, list(model.parameters()), allow_unused=True)
    assert torch.allclose(full, short, atol=1e-6)
    for g_full, g_short in zip(full_grads, short_grads):
        if g_full is None:
            assert g_short is None
        else:
            assert torch.allclose(g_full, g_short, atol=1e-6)


def test_time_feature_channel_is_trimmed_with_the_items() -> None:
    inputs, targets = _batch()
    stacked = torch.stack([inputs, inputs * 0 + 1], dim=-1)  # gap channel non-zero everywhere
    short_in, _ = trim_padding(stacked, targets)
    assert short_in.shape == (3, 6, 2)


def test_history_windows_cover_every_target_once() -> None:
    from common.training_pairs import split_into_windows

    history = np.arange(1, 24)  # 23 items: 22 targets
    windows = split_into_windows(history, 5)
    targets = np.concatenate([w[1:] for w in windows])
    assert sorted(targets.tolist()) == list(range(2, 24))  # each target once, nothing invented
    assert all(2 <= len(w) <= 6 for w in windows)
    for w in windows:  # every window is a contiguous slice of the history
        start = int(np.flatnonzero(history == w[0])[0])
        assert np.array_equal(history[start:start + len(w)], w)


def test_history_windows_are_refused_with_dp() -> None:
    import pytest

    from common.data.sequences import build_sequences
    from common.data.synthetic import generate_synthetic
    from common.errors import ConfigError
    from common.training import DPSettings, train_local

    data = build_sequences(generate_synthetic(num_users=20, num_items=15, seed=0), name="tiny")
    model = SASRec(data.num_items, max_len=6, dim=8, num_blocks=1)
    with pytest.raises(ConfigError, match="history-windows"):
        train_local(model, data, epochs=1, batch_size=4, learning_rate=0.01, max_len=6,
                    dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), history_windows=True)
    out = train_local(model, data, epochs=1, batch_size=4, learning_rate=0.01, max_len=3, history_windows=True)
    assert out.num_examples > sum(len(h) >= 2 for h in data.train_sequences())  # long histories give extra windows


def test_history_windows_carry_time_gaps_sliced_from_the_whole_history(small_data) -> None:
    from common.models.context import history_gaps
    from common.training_pairs import training_pairs, window_bounds

    max_len = 6
    plain = training_pairs(small_data, max_len, time_features=True).tensors
    windowed = training_pairs(small_data, max_len, time_features=True, windows=True).tensors
    assert windowed[0].shape[1:] == (max_len, 2)
    train = small_data.train_sequences()
    gaps = history_gaps(train, small_data.timestamps)
    row, last_rows = 0, []
    for u, h in enumerate(train):
        for n, (a, b) in enumerate(window_bounds(len(h), max_len)):
            width = b - 1 - a
            np.testing.assert_array_equal(windowed[0][row, -width:, 0].numpy(), h[a:b - 1])
            np.testing.assert_array_equal(windowed[0][row, -width:, 1].numpy(), gaps[u][a:b - 1])
            np.testing.assert_array_equal(windowed[1][row, -width:].numpy(), h[a + 1:b])
            if n == 0:
                last_rows.append(row)  # the window ending at the history's end
            row += 1
    assert row == len(windowed[0]) > len(plain[0])
    # Its newest window is exactly the single pair the user gets without windows
    torch.testing.assert_close(windowed[0][last_rows], plain[0])
    torch.testing.assert_close(windowed[1][last_rows], plain[1])
