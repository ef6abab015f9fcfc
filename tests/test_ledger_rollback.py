"""A privacy ledger restored from an older copy, or replaced by another, is refused (client/ledger_file.py).

A crash review restored a deployed partner's ledger from the copy taken after round 1 of 3: the partner
trained on, its replies said epsilon 7.006 and then 7.997 of 8, while four updates had left it (epsilon
8.85 over what it released, by Google's dp_accounting). A fresh ledger put in place of a used one for the
same data read as zero spend. The marker beside each ledger now counts its rows and their digest after
every write, and the file carries its marker's id; the node state catches a copy restored with its marker.
"""

from __future__ import annotations

import json
import shutil

import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

import client.ledger_file as ledger_file
from client.app import make_client_app
from client.privacy_ledger import PrivacyLedger
from common.config import resolve_config
from common.errors import PrivacyError
from common.task import new_model, partner_data
from tests.conftest import flower_message
from tests.test_private_count import _context, _deployed

ROW = dict(run="r", mechanisms=[(1.0, 0.1, 10)], accountant="rdp")


def _ledger_with_rounds(path, rounds: int) -> None:
    with PrivacyLedger(path, "fp") as ledger:
        for server_round in range(1, rounds + 1):
            ledger.record(server_round=server_round, **ROW)


def _refused_after_restoring(backup, path) -> None:
    """The older copy ``backup`` put back at ``path`` is refused at its next opening."""
    shutil.copy(backup, path)
    with pytest.raises(PrivacyError, match="is behind what was recorded"):
        PrivacyLedger(path, "fp")


def test_an_older_copy_is_refused_and_the_newest_opens(tmp_path):
    path = tmp_path / "l.sqlite"
    _ledger_with_rounds(path, 1)
    shutil.copy(path, tmp_path / "backup")
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    shutil.copy(path, tmp_path / "newest")
    shutil.copy(tmp_path / "backup", path)
    with pytest.raises(PrivacyError, match=r"is behind what was recorded in it: it holds 1 spend rows.*the first 2"):
        PrivacyLedger(path, "fp")
    shutil.copy(tmp_path / "newest", path)
    with PrivacyLedger(path, "fp") as ledger:
        assert len(ledger.history()) == 2


def test_another_ledger_in_its_place_is_refused(tmp_path):
    # A fresh ledger for the same data, made elsewhere and copied in: its own marker id, no spend
    path, other = tmp_path / "l.sqlite", tmp_path / "elsewhere" / "l.sqlite"
    _ledger_with_rounds(path, 2)
    PrivacyLedger(other, "fp").close()
    shutil.copy(other, path)
    marker = json.loads(ledger_file.marker_path(path).read_text())
    with pytest.raises(PrivacyError, match=rf"is not the ledger created here .*ledger-reset=\"{marker['id']}\""):
        PrivacyLedger(path, "fp")


def test_a_marker_left_behind_by_a_crash_catches_up(tmp_path, monkeypatch):
    # Killed between the ledger's commit and the marker's update: the ledger is ahead (the safe side), opens,
    # and its marker catches up, so a later rollback is still caught
    path = tmp_path / "l.sqlite"
    _ledger_with_rounds(path, 1)
    shutil.copy(path, tmp_path / "backup")
    writes = []

    def failing(target, data):  # noqa: ANN001, ANN202
        writes.append(target)
        raise OSError("killed")

    monkeypatch.setattr(ledger_file, "write_private_bytes", failing)
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    assert writes and json.loads(ledger_file.marker_path(path).read_text())["rows"] == 1
    monkeypatch.undo()
    with PrivacyLedger(path, "fp") as ledger:
        assert len(ledger.history()) == 2
    assert json.loads(ledger_file.marker_path(path).read_text())["rows"] == 2
    _refused_after_restoring(tmp_path / "backup", path)


def test_a_lost_marker_is_written_again_from_the_ledgers_own_id(tmp_path):
    path = tmp_path / "l.sqlite"
    _ledger_with_rounds(path, 1)
    marker = json.loads(ledger_file.marker_path(path).read_text())
    shutil.copy(path, tmp_path / "backup")
    ledger_file.marker_path(path).unlink()
    _ledger_with_rounds(path, 0)  # an opening, nothing recorded
    again = json.loads(ledger_file.marker_path(path).read_text())
    assert again["id"] == marker["id"] and again["rows"] == 1 and again["fingerprint"] == "fp"
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    _refused_after_restoring(tmp_path / "backup", path)


@pytest.mark.parametrize("with_marker", [False, True])
def test_a_partner_refuses_to_train_on_a_restored_ledger(tmp_path, with_marker):
    # The review's case, through the real ClientApp: restored after round 1 of 3, round 3 is refused
    # (with its marker restored too, the node state of this run still knows what was recorded)
    overrides, node = _deployed(tmp_path, **{"num-server-rounds": 3})
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    app, context = make_client_app(overrides), _context(node)
    ledger = tmp_path / "ledger.sqlite"
    arrays = ArrayRecord(new_model(cfg, data.num_items).state_dict())
    epsilons = []
    for server_round in (1, 2, 3):
        if server_round == 2:
            shutil.copy(ledger, tmp_path / "backup")
            shutil.copy(ledger_file.marker_path(ledger), tmp_path / "backup.created")
        if server_round == 3:
            shutil.copy(tmp_path / "backup", ledger)
            if with_marker:
                shutil.copy(tmp_path / "backup.created", ledger_file.marker_path(ledger))
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round,
                                                                       "run-name": "acme"})})
        reply = app(flower_message(content, "train"), context)
        if server_round < 3:
            assert not reply.has_error(), reply.error
            epsilons.append(reply.content["metrics"]["epsilon"])
            continue
        assert reply.has_error()  # nothing trained, nothing sent
        # with its marker restored too, the marker's copy outside the folder still knows what was recorded
        # (client/ledger_file.py mirror_path; before it, only this run's node state did)
        assert "is behind what was recorded" in reply.error.reason
    shutil.copy(tmp_path / "backup", tmp_path / "check.sqlite")
    with PrivacyLedger(tmp_path / "check.sqlite", data.fingerprint()) as restored:  # a copy: no marker beside it
        assert len(restored.history()) == 2  # the count and round 1: round 2 was released and is missing there
    assert epsilons[1] > epsilons[0] > 0


@pytest.mark.parametrize("broken", ["[]", "0", "true", "{not json"])
def test_a_broken_marker_is_written_again_and_guards_from_then_on(tmp_path, broken, caplog):
    # A review: a marker of valid JSON that is not an object raised AttributeError at every opening; an
    # unreadable one turned the check off for good
    path = tmp_path / "l.sqlite"
    _ledger_with_rounds(path, 1)
    marker = json.loads(ledger_file.marker_path(path).read_text())
    shutil.copy(path, tmp_path / "backup")
    ledger_file.marker_path(path).write_text(broken)
    ledger_file.mirror_path(path).write_text(broken)  # its copy too (either alone is read from the other)
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    assert "could not be read; written again from the ledger's id" in caplog.text
    assert json.loads(ledger_file.marker_path(path).read_text())["id"] == marker["id"]
    assert json.loads(ledger_file.mirror_path(path).read_text())["id"] == marker["id"]
    _refused_after_restoring(tmp_path / "backup", path)


def test_a_ledger_made_before_marker_ids_gets_one_and_is_guarded(tmp_path):
    import sqlite3

    path = tmp_path / "l.sqlite"
    _ledger_with_rounds(path, 1)
    with sqlite3.connect(path) as conn:  # as older code made it: no id of its marker, and no marker
        conn.execute("DELETE FROM meta WHERE key = 'marker-id'")
    conn.close()
    ledger_file.marker_path(path).unlink()
    shutil.copy(path, tmp_path / "backup")
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    marker = json.loads(ledger_file.marker_path(path).read_text())
    assert marker["rows"] == 2 and len(marker["id"]) == 12
    shutil.copy(tmp_path / "backup", path)  # the older copy has no id: it is the marker's rows that tell
    with pytest.raises(PrivacyError, match="is behind what was recorded"):
        PrivacyLedger(path, "fp")


def test_a_restored_or_deleted_ledger_folder_is_refused_by_the_markers_copy_outside_it(tmp_path):
    # A backup of the whole folder (ledger and marker together) restored, or the folder deleted, forgot spend
    # already released: a new Flower run (fresh node state) trained on from the older spend (9.64 against a
    # target of 8, by Opacus over the released rows) or from zero (a red-team review)
    folder = tmp_path / "ledgers"
    path = folder / "l.sqlite"
    _ledger_with_rounds(path, 1)
    shutil.copytree(folder, tmp_path / "backup")  # the nightly backup of the folder
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(server_round=2, **ROW)
    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "backup", folder)  # restored, marker and all
    with pytest.raises(PrivacyError, match="is behind what was recorded"):
        PrivacyLedger(path, "fp")
    shutil.rmtree(folder)  # or gone altogether
    with pytest.raises(PrivacyError, match="was deleted"):
        PrivacyLedger(path, "fp")
    assert not path.exists()


def test_the_markers_copy_is_never_made_under_a_home_folder_that_does_not_exist(tmp_path, monkeypatch, caplog):
    # HOME=/nonexistent (a service user) made that folder, with .local/state under it (a review)
    home = tmp_path / "no-such-home"
    monkeypatch.delenv(ledger_file.STATE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    assert ledger_file.mirror_path(tmp_path / "l.sqlite") is None
    with caplog.at_level("WARNING"), PrivacyLedger(tmp_path / "l.sqlite", "fp"):
        pass
    assert not home.exists() and "could not be written" in caplog.text
    home.mkdir()  # a home that exists gets the copy
    assert str(ledger_file.mirror_path(tmp_path / "l.sqlite")).startswith(str(home / ".local" / "state" / "fedrec"))
