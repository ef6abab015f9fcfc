"""pyproject's [tool.flwr.app.config] and common.config.DEFAULTS must not drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import DEFAULTS, resolve_config
from common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_config_equals_defaults():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert table == DEFAULTS


def test_components_point_at_server_and_client():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert "federations" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]


def test_overrides_are_typed_and_unknown_keys_rejected():
    cfg = resolve_config({"num-server-rounds": "7", "dp": "false"}, {"learning-rate": 1})
    assert cfg["num-server-rounds"] == 7 and cfg["dp"] is False and cfg["learning-rate"] == 1.0
    with pytest.raises(ConfigError, match="unknown config key 'epochs'"):
        resolve_config({"epochs": 3})
    with pytest.raises(ConfigError, match="num-server-rounds = 'many' is not a valid int"):
        resolve_config({"num-server-rounds": "many"})
