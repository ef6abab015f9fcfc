"""A partner's private state file (client/partner_state.py): where it lives, what a round takes from it.

The end-to-end check (a crashed and resumed MF / keep-optimizer-state run equals an uninterrupted one
bit for bit) is tests/test_resume.py; these pin the rules around it.
"""

from __future__ import annotations

import stat

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.optimizer_state import KEY as OPTIMIZER_KEY
from client.partner_state import restore_partner_state, save_partner_state, state_file
from client.private_factors import META_KEY, STATE_KEY


def a_context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(), run_config={})


def with_state(factors: torch.Tensor, adam: bytes = b"moments") -> Context:
    context = a_context()
    context.state.array_records[STATE_KEY] = ArrayRecord({"factors": factors})
    context.state.config_records[META_KEY] = ConfigRecord({"users": "abc"})
    context.state.config_records[OPTIMIZER_KEY] = ConfigRecord({"adam": adam})
    return context


def factors_in(context: Context) -> torch.Tensor:
    return context.state.array_records[STATE_KEY].to_torch_state_dict()["factors"]


def test_where_the_file_lives(tmp_path):
    cfg = {"run-dir": str(tmp_path / "runs")}
    simulated = state_file(cfg, {"partition-id": 2}, "myrun")
    assert simulated == tmp_path / "runs" / "myrun" / "partner-state" / "partner-2.pt"
    # A partner naming its ledger keeps the file beside it, named by a hash: the coordinator's run name
    # never becomes a path at the partner
    ledger = tmp_path / "secure" / "ledger.sqlite"
    deployed = state_file(cfg, {"ledger-path": str(ledger), "partition-id": 2}, "../../etc/evil")
    assert deployed.parent == tmp_path / "secure" / "ledger.sqlite.state"
    assert "evil" not in deployed.name and ".." not in deployed.name
    assert deployed != state_file(cfg, {"ledger-path": str(ledger)}, "other-run")
    assert state_file(cfg, {"data-path": "/data/log.csv"}, "myrun") is None  # memory only


def test_a_resumed_round_takes_the_saved_state_and_the_files_are_private(tmp_path):
    path = tmp_path / "ledger.sqlite.state" / "x.pt"
    factors = torch.randn(5, 3)
    save_partner_state(with_state(factors), path, server_round=2)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    resumed = a_context()
    assert restore_partner_state(resumed, path, server_round=3)
    assert torch.equal(factors_in(resumed), factors)
    assert resumed.state.config_records[META_KEY]["users"] == "abc"
    assert resumed.state.config_records[OPTIMIZER_KEY]["adam"] == b"moments"


def test_only_state_from_an_earlier_round_is_taken_and_never_over_a_live_one(tmp_path):
    path = tmp_path / "s" / "x.pt"
    first, second = torch.zeros(2, 2), torch.ones(2, 2)
    save_partner_state(with_state(first), path, server_round=1)
    save_partner_state(with_state(second), path, server_round=2)
    # round 2 trained again after a crash: the state from before it, not its own
    again = a_context()
    assert restore_partner_state(again, path, server_round=2)
    assert torch.equal(factors_in(again), first)
    # a fresh run under a reused run name (round 1) inherits nothing
    fresh = a_context()
    assert not restore_partner_state(fresh, path, server_round=1)
    assert STATE_KEY not in fresh.state.array_records
    # a partner that still holds its state in memory keeps it
    live = with_state(torch.full((2, 2), 7.0))
    assert not restore_partner_state(live, path, server_round=3)
    assert torch.equal(factors_in(live), torch.full((2, 2), 7.0))


def test_a_damaged_state_file_costs_the_warm_start_not_the_round(tmp_path, caplog):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a torch file")
    context = a_context()
    with caplog.at_level("WARNING"):
        assert not restore_partner_state(context, path, server_round=3)
    assert "unreadable" in caplog.text and "starts again" in caplog.text
    save_partner_state(with_state(torch.ones(1, 1)), path, server_round=3)  # and the next save replaces it
    assert restore_partner_state(a_context(), path, server_round=4)


def test_nothing_to_keep_writes_nothing(tmp_path):
    path = tmp_path / "s" / "x.pt"
    save_partner_state(a_context(), path, server_round=1)
    assert not path.exists() and not path.parent.exists()
