"""The run config starts from the app's pyproject.toml, as `flwr run` reads it (a coordinator review:
`fedrec-server check` and the simulations used the built-in defaults, so an edit of the file went unchecked
or ignored), and the operator mistakes around it are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

import common.cli_args as cli_args
from common.cli_args import app_run_config, edited_keys, parse_run_config, with_app_config
from common.config import DEFAULTS, resolve_config
from common.errors import ConfigError
from server.cli import main as server_main

ROOT = Path(__file__).resolve().parents[1]
SMALL = "synthetic-users=60 synthetic-items=40 num-server-rounds=1"


def _app(folder: Path, edit: str) -> Path:
    """A copy of this project's pyproject.toml with one config line replaced (``key = value``)."""
    key = edit.split("=")[0].strip()
    lines = [edit if line.split("=")[0].strip() == key and "=" in line else line
             for line in (ROOT / "pyproject.toml").read_text().splitlines()]
    assert edit in lines
    folder.mkdir(exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def test_this_projects_table_is_the_defaults_and_is_read_flat():
    table = app_run_config(ROOT)
    assert set(table) == set(DEFAULTS)
    assert edited_keys(table) == []
    assert app_run_config(ROOT / "tests") == {}  # no pyproject.toml there


def test_check_reads_the_apps_pyproject_and_names_its_edits(tmp_path, capsys):
    app = _app(tmp_path / "app", "num-server-rounds = 7")
    assert server_main(["check", "--app", str(app), "--run-config", "synthetic-users=60 synthetic-items=40"]) == 0
    out = capsys.readouterr().out
    assert "(edited: num-server-rounds), then --run-config" in out
    assert "7 rounds" in out
    # --run-config still overrides the file
    assert server_main(["check", "--app", str(app), "--run-config", SMALL]) == 0
    assert "1 rounds" in capsys.readouterr().out


def test_check_refuses_a_bad_value_in_the_apps_pyproject(tmp_path, capsys):
    app = _app(tmp_path / "app", "learning-rate = -1.0")
    assert server_main(["check", "--app", str(app), "--run-config", SMALL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "learning-rate" in err and len(err.strip().splitlines()) == 1
    # before, check said "ok" here: it read the built-in defaults
    (app / "pyproject.toml").write_text("[tool.flwr.app\n")
    assert server_main(["check", "--app", str(app), "--run-config", SMALL]) == 2
    err = capsys.readouterr().err
    assert "not a TOML file flwr run can read" in err and len(err.strip().splitlines()) == 1


def test_check_in_a_folder_without_an_app_says_what_it_checked_against(tmp_path, capsys):
    assert server_main(["check", "--app", str(tmp_path), "--run-config", SMALL]) == 0
    assert "holds no Flower app's pyproject.toml: checked against the built-in defaults" in capsys.readouterr().out


def test_the_simulations_start_from_the_projects_pyproject(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_args, "PROJECT_ROOT", _app(tmp_path / "app", "learning-rate = 0.003"))
    merged = with_app_config({"seed": 3})
    assert merged["learning-rate"] == 0.003 and merged["seed"] == 3
    assert "(edited: learning-rate)" in capsys.readouterr().out
    assert with_app_config({"learning-rate": 0.01})["learning-rate"] == 0.01  # --run-config wins
    capsys.readouterr()
    monkeypatch.setattr(cli_args, "PROJECT_ROOT", ROOT)
    assert with_app_config({}) == app_run_config(ROOT)
    assert capsys.readouterr().out == ""  # the shipped file: nothing to say


def test_check_notes_a_forgotten_resume(tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    config = f'{SMALL} run-dir="{tmp_path / "runs"}" run-name="r1"'
    assert server_main(["check", "--run-config", config]) == 0
    assert "add resume=true" not in capsys.readouterr().out
    (run / "checkpoint.pt").write_bytes(b"x")
    assert server_main(["check", "--run-config", config]) == 0
    assert "without resume=true this run starts afresh in a new directory beside it" in capsys.readouterr().out


def test_a_run_dir_under_home_is_expanded_not_made_a_folder_named_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = resolve_config(None, {"run-dir": "~/runs", "ledger-dir": "~/ledgers"})
    assert cfg["run-dir"] == str(tmp_path / "runs") and cfg["ledger-dir"] == str(tmp_path / "ledgers")
    with pytest.raises(ConfigError, match="no such home folder"):
        resolve_config(None, {"run-dir": "~no-such-user-here/runs"})


@pytest.mark.parametrize("text, says", [
    ("num-server-rounds=3,local-epochs=1", "separate key=value pairs with spaces, not commas"),
    ("target-epsilon=8,0", "is not a number; write decimals with a point: target-epsilon=8.0"),
    ("dataset=/tmp/x.txt", 'put text in double quotes: dataset="/tmp/x.txt"'),
])
def test_an_unreadable_value_gets_the_advice_that_fits_it(text, says):
    with pytest.raises(ConfigError, match=None) as exc:
        parse_run_config(text)
    assert says in str(exc.value)


def test_a_run_config_file_with_the_pyproject_header_says_to_drop_it(tmp_path):
    # a coordinator review: "unknown config key 'tool.flwr.app.config.num-server-rounds'" and 90 key names
    toml = tmp_path / "run.toml"
    toml.write_text("[tool.flwr.app.config]\nnum-server-rounds = 3\n")
    with pytest.raises(ConfigError) as exc:
        resolve_config(None, parse_run_config(str(toml)))
    assert str(exc.value) == ("unknown config key 'tool.flwr.app.config.num-server-rounds': a run config file is "
                              "flat; write 'num-server-rounds' without the [tool.flwr.app.config] table header")


def test_a_run_name_too_long_for_a_folder_is_refused_before_the_run():
    # check said "ok", and the ServerApp failed with "File name too long" (a coordinator review)
    with pytest.raises(ConfigError, match="run-name is 300 bytes long; give at most 200"):
        resolve_config(None, {"run-name": "a" * 300})
    assert resolve_config(None, {"run-name": "a" * 200})["run-name"] == "a" * 200


def test_check_notes_secure_aggregation_with_a_single_partner_round(tmp_path, capsys):
    # a coordinator review: check said "ok", and any round with one partner then failed in the SecAgg+ protocol
    assert server_main(["check", "--run-config", f"{SMALL} secure-aggregation=true min-nodes=1"]) == 0
    assert "secure-aggregation needs at least 2 partners in a round; with min-nodes = 1" in capsys.readouterr().out
    assert server_main(["check", "--run-config", f"{SMALL} secure-aggregation=true min-nodes=2"]) == 0
    assert "needs at least 2 partners" not in capsys.readouterr().out
