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
    with pytest.raises(ConfigError, match="unknown config key 'epochs'; known keys: ") as far:
        resolve_config({"epochs": 3})
    assert "did you mean" not in str(far.value)
    with pytest.raises(ConfigError, match="unknown config key 'num-server-rouds'; did you mean 'num-server-rounds'"):
        resolve_config({"num-server-rouds": 3})
    with pytest.raises(ConfigError, match="num-server-rounds = 'many' is not a valid int"):
        resolve_config({"num-server-rounds": "many"})


@pytest.mark.parametrize("overrides, knob", [
    ({"learning-rate": -1}, "learning-rate"), ({"batch-size": 0}, "batch-size"), ({"target-epsilon": 0}, "target-epsilon"),
    ({"accountant": "gdp"}, "accountant"), ({"grad-sample-mode": "xyz"}, "grad-sample-mode"), ({"device": "tpu"}, "device"),
    ({"fraction-train": 1.5}, "fraction-train"), ({"fraction-train": 0}, "fraction-train"),
    ({"num-server-rounds": 2.5}, "num-server-rounds"), ({"max-seq-len": 0}, "max-seq-len"), ({"dropout": 1.5}, "dropout"), ({"label-smoothing": 1.0}, "label-smoothing"),
    ({"label-smoothing": -0.1}, "label-smoothing"),
    ({"embedding-dim": 63, "num-heads": 2}, "embedding-dim"), ({"target-delta": 2.0}, "target-delta"),
    ({"max-grad-norm": float("nan")}, "max-grad-norm"), ({"synthetic-items": -5}, "synthetic-items"),
    # tenth session (a review): these were refused only inside every partner, every round, and the run "completed"
    ({"partitioning": "bogus"}, "partitioning"), ({"dirichlet-alpha": -1}, "dirichlet-alpha"),
    ({"dirichlet-alpha": 0}, "dirichlet-alpha"), ({"holdout-fraction": 1.0}, "holdout-fraction"),
    ({"holdout-fraction": -0.5}, "holdout-fraction"), ({"size-skew-power": float("inf")}, "size-skew-power"),
    ({"seed": -1}, "seed"), ({"learning-rate": True}, "learning-rate"), ({"num-server-rounds": True}, "num-server-rounds"),
    # eleventh session (a review): combinations every partner refused each round, or that were silently dropped
    ({"tied-output": True, "grad-sample-mode": "ghost"}, "grad-sample-mode"),
    ({"model": "mf", "grad-sample-mode": "fused"}, "grad-sample-mode"),
    ({"item-features": "text", "grad-sample-mode": "fused"}, "grad-sample-mode"), ({"device": "mps"}, "device"),
    ({"dp": False, "dp-mode": "central"}, "dp"), ({"dp": False, "dp-mode": "both"}, "dp"),
    # ranges of features that are off in this run (were checked only once switched on)
    ({"central-clipping": "bogus"}, "central-clipping"), ({"central-clipping-norm": -3.0}, "central-clipping-norm"),
    ({"trim-fraction": 0.9}, "trim-fraction"), ({"proximal-mu": -0.5}, "proximal-mu"),
    ({"aggregation": "fedprox", "proximal-mu": 1000.0}, "proximal-mu"),  # lr 0.002 x 1000 = 2: every partner refused
    # fifteenth session (a review): a path as run-name put the run's files outside run-dir
    ({"run-name": "/tmp/x/escaped"}, "run-name"), ({"run-name": "../e2"}, "run-name"), ({"run-name": "a/b"}, "run-name"),
    ({"run-name": ".."}, "run-name"), ({"run-name": "a\\b"}, "run-name"),
])
def test_values_that_cannot_work_are_one_line_naming_the_knob(overrides, knob):
    with pytest.raises(ConfigError, match=f"^{knob} = ") as err:
        resolve_config(None, overrides)
    assert "\n" not in str(err.value)


def test_every_default_and_edge_value_passes():
    resolve_config(None, {})  # the shipped defaults
    resolve_config(None, {"dropout": 0.0, "fraction-train": 1.0, "target-delta": 0.0, "device": "cuda:1",
                          "num-server-rounds": 3.0, "central-noise-multiplier": 0.0, "num-malicious-nodes": 0,
                          "fraction-evaluate": 0.0})  # 0 = no federated evaluation (server/strategy_factory.py)
    # grad-sample-mode only chooses how DP-SGD clips: without local DP any value is harmless
    resolve_config(None, {"dp-mode": "central", "tied-output": True, "grad-sample-mode": "ghost"})
    resolve_config(None, {"dp": False, "model": "mf", "grad-sample-mode": "fused"})
    resolve_config(None, {"run-name": "20261202-043209-sasrec-5p-eps8.v2"})


def test_run_config_text_flower_would_skip_is_one_error_line(tmp_path):
    from common.cli_args import parse_run_config

    assert parse_run_config(["dp=false num-server-rounds=3", "dataset='a b'"]) == {
        "dp": False, "num-server-rounds": 3, "dataset": "a b"}
    assert parse_run_config(None) == {} and parse_run_config("") == {}
    for bad, token in (("dp", "dp"), ("embedding-dim 64", "embedding-dim"), ("a=1 oops b=2", "oops")):
        with pytest.raises(ConfigError, match=f"--run-config: '{token}' is not key=value"):
            parse_run_config([bad])
    toml = tmp_path / "c.toml"
    toml.write_text("num-server-rounds = 4\n")
    assert parse_run_config([str(toml)]) == {"num-server-rounds": 4}
    with pytest.raises(ConfigError, match="TOML file cannot be combined"):
        parse_run_config([str(toml), "dp=false"])
    for twice in (["embedding-dim=16 embedding-dim=32"], ["embedding-dim=16", "dp=false embedding-dim=32"]):
        with pytest.raises(ConfigError, match="--run-config: embedding-dim is given more than once"):
            parse_run_config(twice)
    # A TOML file Flower cannot read or flatten (a syntax error, a sweep file's lists): its traceback (a review)
    (tmp_path / "bad.toml").write_text("model = \n")
    (tmp_path / "sweep.toml").write_text("[grid]\nseed = [1, 2]\n")
    for name in ("bad.toml", "sweep.toml"):
        with pytest.raises(ConfigError, match=f"--run-config .*{name}: not a flat TOML file of run config keys"):
            parse_run_config([str(tmp_path / name)])
    # Unquoted text: Flower's "invalid format" named no key (a bad-input review)
    with pytest.raises(ConfigError, match=r'--run-config: catalogue=/tmp/x.txt is not a number.*catalogue="/tmp/x.txt"'):
        parse_run_config(["dp=false catalogue=/tmp/x.txt"])


def test_knobs_the_model_ignores_are_named():
    # model = "mf" with SASRec's knobs trained as if they were not there, and config.json recorded them
    from common.config import ignored_knobs

    assert ignored_knobs(resolve_config(None, {"model": "mf"})) == []
    assert ignored_knobs(resolve_config(None, {"model": "mf", "time-features": True, "dropout": 0.5,
                                               "item-features": "text"})) == ["item-features", "time-features", "dropout"]
    assert ignored_knobs(resolve_config(None, {"mf-l2": 0.5})) == ["mf-l2"]
    # the encoder knobs only count where texts are encoded, not beside a published features file
    encoder = {"item-text-model": "other-encoder", "item-text-quantize": True}
    assert ignored_knobs(resolve_config(None, encoder)) == ["item-text-model", "item-text-quantize"]
    assert ignored_knobs(resolve_config(None, {**encoder, "item-features": "text"})) == []
    assert ignored_knobs(resolve_config(None, {**encoder, "item-features": "text", "item-text-features": "f.npz"})) == [
        "item-text-model", "item-text-quantize"]
    # knobs only one aggregation or partitioning reads (fifteenth session, a review)
    for knob, value, choice, reader in (("proximal-mu", 0.5, "aggregation", "fedprox"),
                                        ("server-learning-rate", 1.0, "aggregation", "fedadam"),
                                        ("trim-fraction", 0.4, "aggregation", "trimmed-mean"),
                                        ("num-malicious-nodes", 2, "aggregation", "krum"),
                                        ("dirichlet-alpha", 0.1, "partitioning", "dirichlet"),
                                        ("size-skew-power", 3.0, "partitioning", "size-skew")):
        assert ignored_knobs(resolve_config(None, {knob: value})) == [knob]
        assert ignored_knobs(resolve_config(None, {knob: value, choice: reader, "min-nodes": 5})) == []
    central = {"central-noise-multiplier": 2.0, "central-clipping-norm": 0.5, "central-clipping": "client"}
    assert ignored_knobs(resolve_config(None, central)) == list(central)  # dp-mode local: no central DP
    assert ignored_knobs(resolve_config(None, {**central, "dp-mode": "both"})) == []


@pytest.mark.parametrize("override, says", [
    ({"target-epsilon": 1000.0}, "target-epsilon = 1000.0 is above 100, where a guarantee says nothing"),
    ({"max-seq-len": 100_000_000}, "max-seq-len = 100000000 must be at most 10000"),
    ({"seed": 10 ** 20}, "seed = 100000000000000000000 must be below 2\\*\\*63"),
])
def test_values_beyond_what_the_machinery_computes_are_one_line(override, says):
    # A bad-input review: PRV calibration hung at target-epsilon 1000 (3 TiB at 1e8), a huge max-seq-len and a
    # seed past int64 were tracebacks from the allocator and torch.manual_seed
    with pytest.raises(ConfigError, match=says):
        resolve_config(None, override)
    resolve_config(None, {"target-epsilon": 100.0, "max-seq-len": 10_000, "seed": 2 ** 63 - 1})  # the limits pass


def test_a_model_too_large_for_memory_is_one_line(monkeypatch):
    from common.task import new_model

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr("common.task.build_model", no_memory)
    with pytest.raises(ConfigError, match=r"the model does not fit in memory \(40 items, embedding-dim 64"):
        new_model(resolve_config(None, {}), 40)
