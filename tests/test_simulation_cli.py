"""Every ``python -m simulations.*`` command answers a user mistake with one line and status 2."""

from __future__ import annotations

import pytest

from simulations import audit, baselines, cold_start, deployment, epsilon_plan, fault_injection, local_grid, run, sweep
from simulations.bench import centralised, context_features


@pytest.mark.parametrize("main,argv", [
    (baselines.main, ["--dataset", "/no/such/data"]),
    (audit.main, ["/no/such/run"]),
    (cold_start.main, ["--dataset", "/no/such/data", "--item-features", "id"]),
    (sweep.main, ["/no/such/sweep.toml"]),
    (run.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (local_grid.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (run.main, ["--run-config", "no-such-knob=1"]),
    (fault_injection.main, ["--local", "--faults", "0:melt@1"]),
    (deployment.main, ["--run-config", "foo=1"]),
    (deployment.main, ["--run-config", "dataset='/some/real/data'"]),
    (local_grid.main, ["--run-config", "resume=true"]),
    (context_features.main, ["--data", "/no/such/data"]),
    (centralised.main, ["--overrides", '{"dataset": "/no/such/data"}', "--out", "/tmp/unused.json"]),
    (centralised.main, ["--overrides", "{not json", "--out", "/tmp/unused.json"]),
    # a local DP-SGD noise plan for a run without local DP (eleventh session, a review)
    (epsilon_plan.main, ["--num-partners", "2", "--rounds", "1", "--run-config", 'dp-mode="central"']),
])
def test_a_user_mistake_is_one_error_line(main, argv, capsys) -> None:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_every_command_main_is_wrapped():
    """Each ``python -m`` entry point under simulations/ goes through common.cli_errors."""
    import importlib
    import pkgutil

    import simulations
    import simulations.bench

    unwrapped = []
    for package in (simulations, simulations.bench):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            main = getattr(module, "main", None)
            if main is not None and not hasattr(main, "__wrapped__"):
                unwrapped.append(module.__name__)
    assert unwrapped == []
