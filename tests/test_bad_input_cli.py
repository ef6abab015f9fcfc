"""Command-line mistakes found by a bad-input review: one line (exit 2), or an honest exit status."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import resolve_config
from common.data.catalogue import load_catalogue
from common.errors import ConfigError, DataError


@pytest.mark.parametrize("knob, value, says", [
    ("synthetic-items", 10**12, "synthetic-items = 1000000000000 must be at most 1,000,000"),
    ("synthetic-users", 100_000_000, "synthetic-users = 100000000 must be at most 1,000,000"),
    ("dataset", "", "dataset = '' is empty"),
])
def test_knobs_that_cannot_work_are_one_line(knob, value, says):
    with pytest.raises(ConfigError, match=says):
        resolve_config(None, {knob: value})


def test_a_ledger_dir_that_is_a_file_names_the_knob(tmp_path, capsys):
    from client.partner_identity import ledger_path
    from common.errors import PrivacyError
    from server.cli import main

    file = tmp_path / "notes.txt"
    file.write_text("x")
    cfg = resolve_config(None, {"ledger-dir": str(file / "ledgers")})
    with pytest.raises(PrivacyError, match=r"run config ledger-dir = .*notes.txt is a file, not a folder"):
        ledger_path(cfg, {}, "run", "partner-1")
    assert main(["check", "--run-config", f'ledger-dir="{file}"']) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["fedrec-client", "finetune", "--model", "m", "--data-path", "d", "--ledger-path", "l", "--seed", str(2**70)],
    ["cold_start", "--seed", str(2**70)],
    ["baselines", "--seed", "-1"],
])
def test_a_seed_out_of_range_is_a_usage_error(command, capsys):
    if command[0] == "fedrec-client":
        from client.cli import main
    elif command[0] == "cold_start":
        from simulations.cold_start import main
    else:
        from simulations.baselines import main
    with pytest.raises(SystemExit) as exit_:
        main(command[1:])
    assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err


def test_a_catalogue_with_a_header_line_is_refused(tmp_path):
    path = tmp_path / "catalogue.txt"
    path.write_text("item_id\n1\n2\n")
    with pytest.raises(DataError, match="first line 'item_id' is a column name"):
        load_catalogue(path)
    path.write_text("# item_id\n1\n2\n")
    assert load_catalogue(path).tolist() == ["1", "2"]


def test_finetune_refuses_a_ledger_path_in_a_missing_folder(tmp_path):
    from client.finetune import finetune_partner
    from common.errors import PrivacyError

    with pytest.raises(PrivacyError, match="does not exist; give the ledger the SuperNode uses"):
        finetune_partner(model=tmp_path / "m.pt", data_path=tmp_path / "log.csv",
                         ledger_path=tmp_path / "typo" / "ledger.sqlite", out=tmp_path / "out.pt")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("aggregated, code", [(0, 3), (2, 0)])
def test_a_simulation_where_no_round_aggregated_exits_non_zero(tmp_path, monkeypatch, capsys, aggregated, code):
    # A review: every partner refused (batch-size above its users), the server logged "no round aggregated an
    # update", and simulations.run exited 0 as if the run had trained a model
    import json

    import simulations.run as run_module

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "num-partners": aggregated}) + "\n")
    (run_dir / "summary.md").write_text("# summary\n")
    monkeypatch.setattr(run_module, "run_federation", lambda *a, **k: run_dir)
    assert run_module.main(["--num-partners", "2"]) == code
    assert ("no round aggregated an update" in capsys.readouterr().err) == bool(code)


def test_a_catalogue_whose_first_item_is_named_item_is_written_and_read(tmp_path):
    from common.data.catalogue import save_catalogue

    items = np.array(["item", "item-1", "item-2"])
    assert load_catalogue(save_catalogue(items, tmp_path / "c.txt")).tolist() == items.tolist()
    with pytest.raises(DataError, match="reads as a column name"):
        save_catalogue(np.array(["item_id", "x"]), tmp_path / "d.txt")


def test_finetune_without_dp_never_checks_the_ledger_folder(tmp_path):
    from client.finetune import finetune_partner

    with pytest.raises(DataError, match="m.pt"):  # the missing model, not the ledger folder
        finetune_partner(model=tmp_path / "m.pt", data_path=tmp_path / "log.csv", dp=False,
                         ledger_path=tmp_path / "typo" / "ledger.sqlite", out=tmp_path / "out.pt")


def test_a_device_given_as_the_catalogue_is_not_called_missing():
    with pytest.raises(DataError, match="/dev/null: not a regular file"):
        load_catalogue("/dev/null")


def test_an_infinite_target_epsilon_says_how_to_turn_dp_sgd_off():
    with pytest.raises(ConfigError, match='for no DP-SGD set dp-mode = "off"'):
        resolve_config(None, {"target-epsilon": float("inf")})


def test_the_cold_start_probe_checks_titles_and_variants_before_training(capsys, monkeypatch):
    # Without titles the id variant trained in full and the first text one failed (a research-CLI review)
    from simulations import cold_start

    monkeypatch.setattr(cold_start, "run_cold_start", lambda *a, **k: pytest.fail("it trained"))
    assert cold_start.main(["--dataset", "synthetic", "--epochs", "1"]) == 2
    assert "--dataset synthetic: no item titles beside it" in capsys.readouterr().err
    assert cold_start.main(["--dataset", "synthetic", "--item-features", "id", "idd", "--epochs", "1"]) == 2
    assert "--item-features idd: use id, text, id+text" in capsys.readouterr().err
