"""A partner's private state file (client/partner_state.py): where it lives, what a round takes from it.

The end-to-end check (a crashed and resumed MF / keep-optimizer-state run equals an uninterrupted one
bit for bit) is tests/test_resume.py; these pin the rules around it.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.optimizer_state import KEY as OPTIMIZER_KEY
from client.partner_state import RunIdentity, restore_partner_state, save_partner_state, state_file
from client.partner_policy import check_node_config
from client.private_factors import META_KEY, STATE_KEY
from common.errors import ConfigError


def a_context(node_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(), run_config={})


def with_state(factors: torch.Tensor, adam: bytes = b"moments") -> Context:
    context = a_context()
    context.state.array_records[STATE_KEY] = ArrayRecord({"factors": factors})
    context.state.config_records[META_KEY] = ConfigRecord({"users": "abc"})
    context.state.config_records[OPTIMIZER_KEY] = ConfigRecord({"adam": adam})
    return context


RUN = RunIdentity("run-a", "start-1", 0)  # a fresh run's first start
RESUMED = RunIdentity("run-a", "start-2", 2)  # the same run, resumed from its round-2 checkpoint


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
    # a folder the partner names for it comes first, the file named by a hash of the run and the partner's log:
    # two SuperNodes of one machine may share the folder
    kept = {"partner-state-dir": f" {tmp_path / 'kept'} ", "ledger-path": str(ledger), "data-path": "/data/a.csv"}
    named = state_file(cfg, kept, "../../etc/evil")
    assert named.parent == tmp_path / "kept" and "evil" not in named.name and ".." not in named.name
    assert named != state_file(cfg, {**kept, "data-path": "/data/b.csv"}, "../../etc/evil")
    assert named != state_file(cfg, kept, "other-run")
    assert state_file(cfg, {"partner-state-dir": " ", "data-path": "/data/log.csv"}, "myrun") is None
    assert state_file(cfg, {"partner-state-dir": "~/s", "data-path": "/d.csv"}, "r").parent == Path("~/s").expanduser()


@pytest.mark.parametrize("value", [True, False, 0, 3.5])
def test_a_partner_state_dir_that_is_no_path_is_refused(value):
    # Flower's node config parser makes partner-state-dir=true a bool, =0 an int: no folder named "False"
    with pytest.raises(ConfigError, match="partner-state-dir = .* is not a folder; give a path in quotes"):
        check_node_config({"partner-state-dir": value})


def test_a_folder_the_partner_names_keeps_its_mode(tmp_path):
    # only a folder made here is made private: a shared or home folder named as partner-state-dir keeps its mode
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    save_partner_state(with_state(torch.ones(1, 1)), shared / "x.pt", 1, RUN)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "x.pt").stat().st_mode) == 0o600
    made = tmp_path / "made" / "x.pt"
    save_partner_state(with_state(torch.ones(1, 1)), made, 1, RUN)
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700


def test_a_resumed_round_takes_the_saved_state_and_the_files_are_private(tmp_path):
    path = tmp_path / "ledger.sqlite.state" / "x.pt"
    factors = torch.randn(5, 3)
    save_partner_state(with_state(factors), path, 2, RUN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    resumed = a_context()
    assert restore_partner_state(resumed, path, 3, RESUMED)
    assert torch.equal(factors_in(resumed), factors)
    assert resumed.state.config_records[META_KEY]["users"] == "abc"
    assert resumed.state.config_records[OPTIMIZER_KEY]["adam"] == b"moments"


def test_only_state_of_this_run_from_a_round_its_checkpoint_holds_counts(tmp_path):
    path = tmp_path / "s" / "x.pt"
    first, lost = torch.zeros(2, 2), torch.ones(2, 2)
    save_partner_state(with_state(first), path, 2, RUN)
    save_partner_state(with_state(lost), path, 3, RUN)  # round 3: the coordinator crashed before checkpointing it
    # after the resume (checkpoint: round 2) round 3 is redone, or this partner is next sampled in round 5:
    # the state of round 2, never the lost round 3's
    for server_round in (3, 5):
        again = a_context()
        assert restore_partner_state(again, path, server_round, RESUMED)
        assert torch.equal(factors_in(again), first)
    # what this start saved counts from its next round on, and the file keeps round 2's entry behind it
    save_partner_state(with_state(torch.full((2, 2), 4.0)), path, 4, RESUMED)
    later = a_context()
    assert restore_partner_state(later, path, 5, RESUMED) and torch.equal(factors_in(later), torch.full((2, 2), 4.0))
    crashed_again = RunIdentity("run-a", "start-3", 3)  # a second crash before round 4 was checkpointed
    assert restore_partner_state(a := a_context(), path, 4, crashed_again) and torch.equal(factors_in(a), first)
    # a fresh run under the reused name (another run token) inherits nothing, in any round
    fresh = RunIdentity("run-b", "start-9", 0)
    for server_round in (1, 2, 7):
        assert not restore_partner_state(a_context(), path, server_round, fresh)
    # nor once that run is resumed, before this partner trained in it
    assert not restore_partner_state(a_context(), path, 7, RunIdentity("run-b", "start-10", 6))
    # a partner that still holds its state in memory keeps it
    live = with_state(torch.full((2, 2), 7.0))
    assert not restore_partner_state(live, path, 5, RESUMED)
    assert torch.equal(factors_in(live), torch.full((2, 2), 7.0))


def test_a_partner_holding_only_its_adam_moments_keeps_them(tmp_path):
    # keep-optimizer-state without MF: context.state holds a ConfigRecord only, and it is newer than any file
    path = tmp_path / "x.pt"
    save_partner_state(with_state(torch.ones(1, 1), adam=b"saved"), path, 1, RUN)
    live = a_context()
    live.state.config_records[OPTIMIZER_KEY] = ConfigRecord({"adam": b"live"})
    assert not restore_partner_state(live, path, 2, RUN)
    assert live.state.config_records[OPTIMIZER_KEY]["adam"] == b"live" and STATE_KEY not in live.state.array_records


def test_without_a_run_token_nothing_is_saved_or_restored(tmp_path):
    # an older coordinator, a lost provenance.json, or a ClientApp called directly (tests, tools)
    assert RunIdentity.of({"run-name": "x", "server-round": 2}) is None
    path = tmp_path / "x.pt"
    save_partner_state(with_state(torch.ones(1, 1)), path, 1, None)
    assert not path.exists()
    save_partner_state(with_state(torch.ones(1, 1)), path, 1, RUN)
    assert not restore_partner_state(a_context(), path, 2, None)
    assert RunIdentity.of({"run-token": "t", "server-start": "s", "resumed-after": 3}) == RunIdentity("t", "s", 3)


def test_a_failed_write_warns_and_the_round_goes_on(tmp_path, caplog):
    # the round's spend is on the ledger before the save: failing the round then cost budget for nothing
    ledger_state = tmp_path / "ledger.sqlite.state"
    ledger_state.write_text("a file where the folder should be")
    with caplog.at_level("WARNING"):
        save_partner_state(with_state(torch.ones(1, 1)), ledger_state / "x.pt", 1, RUN)
    assert "could not save this partner's round-to-round state" in caplog.text


def test_a_write_cut_short_by_a_crash_is_cleaned_up_by_the_next_save(tmp_path):
    folder = tmp_path / "partner-state"
    folder.mkdir()
    mine, other = folder / ".partner-0.pt.4242.9f3e.tmp", folder / ".partner-1.pt.4243.aaaa.tmp"
    mine.write_bytes(b"half")
    other.write_bytes(b"another partner's write in progress")
    save_partner_state(with_state(torch.ones(1, 1)), folder / "partner-0.pt", 1, RUN)
    assert not mine.exists() and other.exists()


def test_a_damaged_state_file_costs_the_warm_start_not_the_round(tmp_path, caplog):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a torch file")
    context = a_context()
    with caplog.at_level("WARNING"):
        assert not restore_partner_state(context, path, 3, RUN)
    assert "unreadable" in caplog.text and "starts again" in caplog.text
    save_partner_state(with_state(torch.ones(1, 1)), path, 3, RUN)  # and the next save replaces it
    assert restore_partner_state(a_context(), path, 4, RUN)


def test_malformed_entries_in_a_readable_file_are_skipped_not_a_failed_round(tmp_path):
    # a file torch reads but whose entries are not this module's (another version's, an edited one): the
    # well-formed entry still serves, the others are passed over instead of failing the round
    path = tmp_path / "x.pt"
    save_partner_state(with_state(torch.ones(1, 1)), path, 1, RUN)
    good = torch.load(path, weights_only=True)["entries"][0]
    torch.save({"entries": ["junk", {"run": "run-a", "round": "1"}, good]}, path)
    assert restore_partner_state(again := a_context(), path, 2, RUN) and torch.equal(factors_in(again), torch.ones(1, 1))


def test_nothing_to_keep_writes_nothing(tmp_path):
    path = tmp_path / "s" / "x.pt"
    save_partner_state(a_context(), path, 1, RUN)
    assert not path.exists() and not path.parent.exists()


def _deployed_mf(tmp_path, node: dict) -> tuple:
    """A deployed MF partner (its own CSV log, no partition-id) and the messages of one run."""
    from client.app import make_client_app
    from common.config import resolve_config
    from common.task import new_model, partner_data

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"u{u},i{(u * 7 + k * 3) % 30},{1000 + k}" for u in range(40) for k in range(6)) + "\n")
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    overrides = {"model": "mf", "dp": False, "embedding-dim": 8, "local-epochs": 1, "batch-size": 8, "max-seq-len": 10,
                 "num-server-rounds": 3, "catalogue": str(catalogue), "run-dir": str(tmp_path / "runs")}
    node = {"data-path": str(log), **node}
    cfg = resolve_config(None, overrides)
    model = new_model(cfg, partner_data(cfg, node).num_items)
    return make_client_app(overrides), node, ArrayRecord(model.state_dict())


def _train(app, node: dict, arrays: ArrayRecord, context: Context, server_round: int, run: RunIdentity):
    from tests.conftest import flower_message

    config = ConfigRecord({"server-round": server_round, "run-token": run.run_token, "server-start": run.server_start,
                           "resumed-after": run.resumed_after})
    return app(flower_message(RecordDict({"arrays": arrays, "config": config}), "train"), context)


def test_a_deployed_partner_naming_a_state_dir_continues_its_factors_after_a_resume(tmp_path, caplog):
    # Without ledger-path a deployed partner kept MF's user factors in memory only; node config
    # partner-state-dir gives it a private folder for them, so the round after a resume continues them
    folder = tmp_path / "partner-state"
    app, node, arrays = _deployed_mf(tmp_path, {"partner-state-dir": str(folder)})
    first = a_context(node)
    reply = _train(app, node, arrays, first, 1, RUN)
    assert not reply.has_error(), reply.error
    saved = list(folder.iterdir())
    assert len(saved) == 1 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(saved[0].stat().st_mode) == 0o600

    resumed = a_context(node)  # a new process: context.state is empty
    with caplog.at_level("INFO"):
        after_resume = _train(app, node, reply.content["arrays"], resumed, 2, RunIdentity("run-a", "start-2", 1))
    assert not after_resume.has_error(), after_resume.error
    assert "restored this partner's private state from round 1" in caplog.text
    # round 2 after the resume is round 2 of the uninterrupted partner, to the bit
    uninterrupted = _train(app, node, reply.content["arrays"], first, 2, RUN)
    assert torch.equal(factors_in(resumed), factors_in(first))
    for key, array in uninterrupted.content["arrays"].items():
        assert np.array_equal(array.numpy(), after_resume.content["arrays"][key].numpy())
    # and without the folder (nor a ledger-path) nothing is written anywhere: memory only
    (tmp_path / "plain").mkdir()
    app, node, arrays = _deployed_mf(tmp_path / "plain", {})
    assert not _train(app, node, arrays, a_context(node), 1, RUN).has_error()
    assert not list((tmp_path / "plain").rglob("*.pt"))


def test_a_state_dir_where_a_file_stands_is_one_line_before_training(tmp_path):
    (tmp_path / "St Mary Hospital").write_text("a file")
    app, node, arrays = _deployed_mf(tmp_path, {"partner-state-dir": str(tmp_path / "St Mary Hospital" / "state")})
    reply = _train(app, node, arrays, a_context(node), 1, RUN)
    assert reply.has_error()
    assert "node config partner-state-dir" in reply.error.reason and "is a file, not a folder" in reply.error.reason
    assert "\n" not in reply.error.reason.strip() and "Traceback" not in reply.error.reason
    assert "St Mary" not in reply.error.reason  # the coordinator's copy names none of the partner's folders
