"""Benchmark helpers (simulations/bench/dp_step.py): batch shape, ratios, one tiny measurement."""

from __future__ import annotations

import pytest
import torch

from simulations.bench.dp_step import peak_memory, synthetic_batch, table, time_modes


def test_synthetic_batch_is_left_padded_with_lengths_in_range():
    inputs, targets = synthetic_batch(50, 20, 7, seed=1)
    lengths = (inputs > 0).sum(1)
    assert lengths.min() >= 2 and lengths.max() <= 20 and lengths.float().std() > 0
    assert torch.equal(inputs > 0, targets > 0)
    # left padding: once a position is real, every later one is too
    assert torch.all((inputs > 0).int().diff(dim=1) >= 0)
    assert inputs.max() <= 7


def test_table_ratios_are_against_nonprivate_of_the_same_catalogue():
    rows = [
        {"mode": "nonprivate", "items": 10, "tied": False, "best_s": 2.0, "median_s": 2.0, "peak_extra_mb": 100.0},
        {"mode": "fused", "items": 10, "tied": False, "best_s": 3.0, "median_s": 3.0, "peak_extra_mb": 125.0},
        {"mode": "nonprivate", "items": 99, "tied": False, "best_s": 10.0, "median_s": 10.0, "peak_extra_mb": 50.0},
        {"mode": "hooks", "items": 99, "tied": False, "best_s": 40.0, "median_s": 40.0, "peak_extra_mb": "failed: OOM"},
    ]
    lines = table(rows).splitlines()
    assert "| 1.50x |" in lines[3] and "| 1.25x |" in lines[3]
    assert "| 4.00x |" in lines[5] and "failed: OOM" in lines[5]


@pytest.mark.slow
def test_every_mode_runs_a_step():
    modes = ["nonprivate", "fused", "fused-secure", "ghost", "hooks"]
    times = time_modes(modes, items=20, batch=3, length=5, steps=1, tied=False, device="cpu")
    assert set(times) == set(modes) and all(len(t) == 1 and t[0] > 0 for t in times.values())
    # hooks materialises per-user output gradients: 8 x 20001 x 64 floats, 41 MB, beyond malloc's reuse
    assert peak_memory("hooks", items=20000, batch=8, length=5, tied=False, device="cpu") > 30.0
