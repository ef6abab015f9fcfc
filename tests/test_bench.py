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



# Each benchmark's first piece of real work, replaced so that a value the parser lets through fails
# here at once (instead of a Flower start, a training epoch or a traceback minutes later).
_WORK = {"centralised": ["run"], "dp_step": ["time_modes", "peak_memory"], "dropout": ["_median_seconds"],
         "federation": ["centralised", "federated"], "secagg_overhead": ["measure"], "serve_latency": ["prepare"],
         "context_features": ["run_variant"], "item_text_encoding": ["token_stats"]}
_NEEDED = {"centralised": ["--out", "{tmp}/c.json"], "context_features": ["--data", "{tmp}"]}  # required arguments


@pytest.mark.parametrize("module, flag, value", [
    ("centralised", "--threads", "-1"),
    ("dp_step", "--steps", "0"), ("dp_step", "--batch", "0"), ("dp_step", "--items", "abc"),
    ("dp_step", "--items", "3706,0"), ("dp_step", "--length", "-3"), ("dp_step", "--threads", "-1"),
    ("dropout", "--repeats", "0"), ("dropout", "--threads", "0"), ("dropout", "--dim", "abc"),
    ("federation", "--rounds", "-1"), ("federation", "--partners", "abc"), ("federation", "--partners", "5,0"),
    ("federation", "--central-threads", "-1"), ("federation", "--local-epochs", "0"),
    ("federation", "--batch-size", "0"), ("federation", "--evaluate-every", "-1"),
    ("federation", "--clients-per-round", "0"), ("federation", "--cross-device-rounds", "0"),
    ("secagg_overhead", "--partners", "0"), ("secagg_overhead", "--rounds", "0"),
    ("serve_latency", "--requests", "-5"), ("serve_latency", "--chunk", "0"),
    ("serve_latency", "--warmup", "-1"), ("serve_latency", "--synthetic-users", "0"),
    ("context_features", "--seeds", "-1"),
    ("item_text_encoding", "--threads", "0"), ("item_text_encoding", "--batch-size", "0"),
    ("item_text_encoding", "--limit", "-1"),
])
def test_a_bad_count_is_one_argparse_error_before_any_work(module, flag, value, tmp_path, monkeypatch, capsys):
    # Was: tracebacks (numpy, torch, int("abc")), a run of 0 steps dividing by zero, or Flower
    # started with 0 partners and waited minutes
    import importlib

    bench = importlib.import_module(f"simulations.bench.{module}")
    for name in _WORK[module]:
        monkeypatch.setattr(bench, name, lambda *a, _n=name, **k: pytest.fail(f"{module}.{_n} started"))
    needed = [a.replace("{tmp}", str(tmp_path)) for a in _NEEDED.get(module, [])]
    with pytest.raises(SystemExit) as stop:
        bench.main([*needed, f"{flag}={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f": error: argument {flag}: " in err[-1], err  # argparse's usage line, then this one


@pytest.mark.parametrize("flag, value, said", [
    ("--run-config", "{bad", "is not JSON"), ("--run-config", "[1]", "give a JSON object"),
    ("--engines", "ray,bogus", "unknown engine 'bogus'"), ("--dp", "off,bogus", "unknown dp-mode 'bogus'"),
])
def test_the_federation_benchmark_checks_its_settings_before_any_run(flag, value, said, monkeypatch, capsys):
    # A bad engine or dp-mode failed after the centralised runs (minutes), bad JSON was a traceback, and each left a
    # /tmp/fedbench-* folder (a research-CLI review)
    from simulations.bench import federation

    for name in _WORK["federation"]:
        monkeypatch.setattr(federation, name, lambda *a, _n=name, **k: pytest.fail(f"federation.{_n} started"))
    monkeypatch.setattr(federation.tempfile, "mkdtemp", lambda **k: pytest.fail("a work folder was made"))
    assert federation.main([f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag}") and said in err[0]


def test_the_serving_benchmark_reads_its_model_before_starting_a_server(tmp_path, capsys):
    # A missing model was a RuntimeError traceback ("server did not start") after the store's import (a review)
    from simulations.bench import serve_latency

    assert serve_latency.main(["--model", str(tmp_path / "none.pt"), "--out", ""]) == 2
    assert capsys.readouterr().err.strip() == f"error: model {tmp_path / 'none.pt'}: no such file or directory"
