"""Every ``python -m simulations.*`` command answers a user mistake with one line and status 2."""

from __future__ import annotations

import pytest

from simulations import audit, baselines, cold_start, fault_injection, local_grid, run, sweep


@pytest.mark.parametrize("main,argv", [
    (baselines.main, ["--dataset", "/no/such/data"]),
    (audit.main, ["/no/such/run"]),
    (cold_start.main, ["--dataset", "/no/such/data", "--item-features", "id"]),
    (sweep.main, ["/no/such/sweep.toml"]),
    (run.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (local_grid.main, ["--num-partners", "2", "--run-config", "dataset='/no/such/data'"]),
    (run.main, ["--run-config", "no-such-knob=1"]),
    (fault_injection.main, ["--local", "--faults", "0:melt@1"]),
])
def test_a_user_mistake_is_one_error_line(main, argv, capsys) -> None:  # noqa: ANN001
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
