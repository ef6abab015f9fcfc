"""The privacy ledger and budget (client/privacy_ledger.py, client/privacy_budget.py).

Epsilon is checked against Google's dp-accounting (independent of Opacus): RDP within 1%
relative, PRV against dp-accounting's PLD accountant within 2% (both are numerical
approximations of the same tight privacy curve; they agree to ~0.2% here).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from dp_accounting import dp_event, pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.app import Context, RecordDict

from client.partner_identity import partner_label
from client.privacy_budget import PartnerBudget
from client.privacy_ledger import PrivacyLedger
from common.config import resolve_config
from common.errors import PrivacyError
from common.privacy import calibrate_noise_after, epsilon_of
from common.private_count import count_mechanism

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
HISTORIES = [
    [(1.1, 0.05, 40)],
    [(1.0083, 1 / 3, 9), (1.5, 0.1, 50)],
    [(0.9, 0.1, 30), (2.0, 0.02, 100), (0.9, 0.1, 30)],
    [(0.8, 0.1, 30), (3.0, 0.1, 30)],  # two runs at one batch size, other noise: PRV must not merge them
]


def _rdp_epsilon(history, delta=DELTA) -> float:
    acc = rdp.RdpAccountant()
    for sigma, q, steps in history:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _pld_epsilon(history, delta=DELTA) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _ledger_with(path: Path, history) -> None:
    """A ledger holding ``history``, one round per mechanism, over two runs."""
    with PrivacyLedger(path, "fp") as ledger:
        for i, mech in enumerate(history):
            ledger.record(run="a" if i % 2 == 0 else "b", server_round=i + 1, mechanisms=[mech], accountant="rdp")


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1, **node_config},
                   state=RecordDict(), run_config={})


def _cfg(tmp_path: Path, **overrides) -> dict:
    return resolve_config(None, {"ledger-dir": str(tmp_path / "ledgers"), "batch-size": 32,
                                 "num-server-rounds": 4, "local-epochs": 1, **overrides})


def _partner_log(tmp_path: Path) -> tuple[Path, Path]:
    """(log, catalogue) of a deployed partner: 60 users of 6 interactions over 30 items."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"u{u},i{(u * 7 + k) % 30},{1000 + k}" for u in range(60) for k in range(6)) + "\n")
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    return log, catalogue


@pytest.mark.parametrize("history", HISTORIES)
def test_ledger_epsilon_matches_dp_accounting_rdp(tmp_path, history):
    _ledger_with(tmp_path / "l.sqlite", history)
    with PrivacyLedger(tmp_path / "l.sqlite", "fp") as reopened:  # a fresh handle reads the file
        assert reopened.history() == [(float(s), float(q), int(n)) for s, q, n in history]
        assert reopened.epsilon(DELTA, "rdp") == pytest.approx(_rdp_epsilon(history), rel=0.01)


@pytest.mark.parametrize("history", HISTORIES[1:])
def test_ledger_epsilon_matches_dp_accounting_pld_for_prv(tmp_path, history):
    _ledger_with(tmp_path / "l.sqlite", history)
    with PrivacyLedger(tmp_path / "l.sqlite", "fp") as ledger:
        assert ledger.epsilon(DELTA, "prv") == pytest.approx(_pld_epsilon(history), rel=0.02)


def test_calibration_after_earlier_spend_lands_on_the_target():
    spent = [(1.2, 0.1, 60)]
    sigma = calibrate_noise_after(spent, target_epsilon=8.0, target_delta=DELTA, sample_rate=0.2, total_steps=40)
    total = _rdp_epsilon(spent + [(sigma, 0.2, 40)])
    assert 8.0 - 0.01 <= total <= 8.0 * 1.01, (sigma, total)
    assert _rdp_epsilon(spent) < 8.0 - 0.5  # the earlier spend alone leaves room


def test_a_round_trained_again_after_a_resume_counts_again(tmp_path):
    # A review: rounds were counted as distinct (run, round), so a round redone after a crash (it spent again,
    # and epsilon counts it) showed ledger-rounds 2 beside the steps of 3
    with PrivacyLedger(tmp_path / "l.sqlite", "fp") as ledger:
        for server_round in (1, 2, 2):
            ledger.record(run="r", server_round=server_round, mechanisms=[(1.0, 0.1, 5), (1.1, 0.1, 1)],
                          accountant="rdp")
        ledger.record(run="other", server_round=1, mechanisms=[(1.0, 0.1, 5)], accountant="rdp")
        assert ledger.rounds_trained() == 4 and ledger.rounds_trained("r") == 3 and ledger.total_steps() == 23


def test_budget_stops_training_after_the_planned_rounds(tmp_path, small_data):
    # Prepare: a partner planning 4 rounds at epsilon 8
    cfg, context = _cfg(tmp_path), _context()
    trained, epsilons = 0, []

    # Execute: try 6 rounds, recording what each round would spend
    for server_round in range(1, 7):
        budget = PartnerBudget.open(cfg, context, small_data, "run-1")
        try:
            budget.check_next_round()
        except PrivacyError as exc:
            refusal = str(exc)
            budget.close()
            break
        epsilons.append(budget.record(context, server_round, [budget.calibration.round_mechanism()]))
        trained += 1
        budget.close()

    # Assert: exactly the planned rounds ran; epsilon rose to (not past) the target
    assert trained == 4
    assert epsilons == sorted(epsilons) and epsilons[-1] <= 8.0
    assert re.match(r"^budget exhausted: epsilon \d+\.\d{3} of 8 ", refusal), refusal
    with PrivacyLedger(tmp_path / "ledgers" / "partner-0.sqlite", small_data.fingerprint()) as ledger:
        assert _rdp_epsilon(ledger.history()) == pytest.approx(epsilons[-1], rel=0.01)
        assert epsilons[-1] >= 8.0 - 0.01


@pytest.mark.parametrize("margin,refused", [(1e-6, True), (-1e-6, False)])
def test_a_round_that_would_pass_the_target_by_a_hair_is_refused(tmp_path, margin, refused):
    # The pre-round check allows float noise only (a review: a slack of 0.05 passed every test)
    from client.privacy_ledger import Calibration

    ledger = PrivacyLedger(tmp_path / "l.sqlite", "fp")
    ledger.record(run="r", server_round=1, mechanisms=[(1.1, 0.1, 40)], accountant="rdp")
    # the threshold, not the accounting, is under test here (the accounting: dp_accounting tests above)
    after = epsilon_of([(1.1, 0.1, 40), (1.1, 0.1, 40)], DELTA, "rdp")
    cal = Calibration(1.1, after - margin, DELTA, "rdp", 0.1, 40, 2)
    budget = PartnerBudget(ledger, cal, run="r", label="partner-0", users=100)
    try:
        if refused:
            with pytest.raises(PrivacyError, match="budget exhausted"):
                budget.check_next_round()
        else:
            budget.check_next_round()
    finally:
        budget.close()


def test_a_second_run_composes_with_the_first(tmp_path, small_data):
    # Run "a" trains 2 of its 4 planned rounds; run "b" on the same ledger plans 4 rounds in what is left
    cfg, context = _cfg(tmp_path), _context()
    for run, rounds in (("a", 2), ("b", 4)):
        for r in range(1, rounds + 1):
            budget = PartnerBudget.open(cfg, context, small_data, run)
            budget.check_next_round()
            budget.record(context, r, [budget.calibration.round_mechanism()])
            budget.close()
    budget = PartnerBudget.open(cfg, context, small_data, "b")
    with pytest.raises(PrivacyError, match="budget exhausted"):
        budget.check_next_round()
    history = budget.ledger.history()
    budget.close()

    # Six rounds recorded, noise of "b" larger than "a", total within the target per dp-accounting
    assert len(history) == 6 and history[-1][0] > history[0][0]
    assert 8.0 - 0.02 <= _rdp_epsilon(history) <= 8.0 * 1.01


def test_a_run_name_found_with_another_guarantee_is_refused(tmp_path, small_data):
    # Run "exp" (target 8) trained a round; a new run given the same name asks for target 2: reusing
    # the ledger's calibration would train it on to epsilon 8 while its config states 2
    cfg, context = _cfg(tmp_path), _context()
    budget = PartnerBudget.open(cfg, context, small_data, "exp")
    budget.record(context, 1, [budget.calibration.round_mechanism()])
    budget.close()
    for change, said in (({"target-epsilon": 2.0}, "asks for 2 at delta"), ({"accountant": "prv"}, "(prv)"),
                         ({"target-delta": 1e-6}, "asks for 8 at delta 1e-06")):  # a smaller delta: a stronger promise
        with pytest.raises(PrivacyError, match=r"run 'exp' in ledger .* was calibrated for target-epsilon 8 .*"
                                               + re.escape(said)):
            PartnerBudget.open({**cfg, **change}, _context(), small_data, "exp")
    PartnerBudget.open(cfg, _context(), small_data, "exp").close()  # the same guarantee resumes


def test_a_ledger_path_that_is_a_folder_or_under_a_file_says_so(tmp_path):
    # They read as a corrupt ledger (and the folder was made 0700) or as a deleted one "created in 1970"
    folder = tmp_path / "ledgers"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(PrivacyError, match=r"ledger-path .*ledgers is a directory; give the ledger file"):
        PrivacyLedger(folder, "fp")
    assert folder.stat().st_mode & 0o777 == 0o755
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PrivacyError, match="a folder on the way is a file"):
        PrivacyLedger(tmp_path / "afile" / "l.sqlite", "fp")


def test_a_file_that_is_no_ledger_is_named_so_and_left_untouched(tmp_path, monkeypatch):
    # The log or a model given as ledger-path read as "corrupt: restore it from a backup", after the file
    # was made 0600 and a lock file left beside it (a review); a 0-byte file alike
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n1,2,3\n")
    log.chmod(0o644)
    with pytest.raises(PrivacyError, match=f"^{re.escape(str(log))} is not a privacy ledger \\(not an SQLite"):
        PrivacyLedger(log, "fp")
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(PrivacyError, match="is an empty file \\(0 bytes\\), not a ledger"):
        PrivacyLedger(empty, "fp")
    assert log.stat().st_mode & 0o777 == 0o644 and log.read_text().endswith("1,2,3\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite", "log.csv"]  # no lock, no marker
    # a real ledger this user may not write is refused before anything trains (the tests run as root,
    # for whom every file is writable: the permission is what os.access says)
    ledger = tmp_path / "l.sqlite"
    PrivacyLedger(ledger, "fp").close()
    import client.ledger_file as ledger_file

    monkeypatch.setattr(ledger_file.os, "access", lambda path, mode: not (mode & os.W_OK and str(path) == str(ledger)))
    with pytest.raises(PrivacyError, match="l.sqlite is read-only for this user"):
        PrivacyLedger(ledger, "fp")


def test_corrupt_ledger_is_reported_and_left_untouched(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a ledger at all" * 100)
    empty_db = tmp_path / "other.sqlite"
    sqlite3.connect(empty_db).execute("CREATE TABLE t (x)").connection.commit()
    bad_rows = tmp_path / "bad.sqlite"
    _ledger_with(bad_rows, [(1.0, 0.1, 10)])
    with sqlite3.connect(bad_rows) as conn:
        conn.execute("UPDATE batches SET noise_multiplier = -1")
    for path in (empty_db, bad_rows):
        before = path.read_bytes()
        with pytest.raises(PrivacyError, match=f"privacy ledger {re.escape(str(path))} is corrupt"):
            PrivacyLedger(path, "fp")
        assert path.read_bytes() == before
    # the partner's event store given as the ledger (the two .sqlite files mixed up): said so, left alone
    from common.data.event_store import EventStore

    with EventStore(tmp_path / "events.sqlite", create=True) as store:
        store.add("u", "i", timestamp=1)
    before = (tmp_path / "events.sqlite").read_bytes()
    with pytest.raises(PrivacyError, match="is an event store .* not a privacy ledger"):
        PrivacyLedger(tmp_path / "events.sqlite", "fp")
    assert (tmp_path / "events.sqlite").read_bytes() == before



def test_a_ledger_is_readable_by_its_owner_only(tmp_path):
    import stat

    old_umask = os.umask(0o022)  # the usual umask: files 0644 unless asked otherwise
    try:
        fresh = tmp_path / "new.sqlite"
        PrivacyLedger(fresh, "fp").close()
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
        # a ledger created before this rule (0644) is made private when next opened
        older = tmp_path / "older.sqlite"
        _ledger_with(older, [(1.0, 0.1, 10)])
        os.chmod(older, 0o644)
        PrivacyLedger(older, "fp").close()
        assert stat.S_IMODE(older.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)

def test_ledger_of_another_data_set_is_refused(tmp_path):
    from client.safe_errors import safe_reason

    _ledger_with(tmp_path / "l.sqlite", [(1.0, 0.1, 10)])
    with pytest.raises(PrivacyError, match="belongs to another data set .*feed new events to an event store .*starts again from zero spend") as err:
        PrivacyLedger(tmp_path / "l.sqlite", "other-fingerprint")
    # What the coordinator sees keeps the advice whole (two apostrophes read as a quoted value and cut it)
    reason = safe_reason(err.value, [tmp_path / "l.sqlite"])
    assert "<value>" not in reason and "gained events" in reason and "data-identity" in reason, reason


def test_a_named_csv_log_keeps_its_ledger_as_it_grows(tmp_path):
    # A partner's CSV log is identified by its content: after new events its ledger was "another data set".
    # Node config data-identity names it, so the ledger (and its spend) follow the log
    from common.task import partner_data

    log = tmp_path / "log.csv"
    rows = [f"u{u},i{(u * 7 + k) % 30},{1000 + k}" for u in range(60) for k in range(6)]
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    cfg = _cfg(tmp_path, **{"catalogue": str(catalogue), "batch-size": 8, "num-server-rounds": 2})
    node = {"data-path": str(log), "ledger-path": str(tmp_path / "ledger.sqlite"), "data-identity": "acme-log"}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    budget = PartnerBudget.open(cfg, context, partner_data(cfg, node), "run-1")
    budget.record(context, 1, [budget.calibration.round_mechanism()])
    history = budget.ledger.history()
    budget.close()
    os.utime(log, ns=(1, 1))  # (a changed mtime makes the loader read the log again)
    with open(log, "a") as fh:  # the log grows: a new event for every user
        fh.write("\n".join(f"u{u},i{(u + 3) % 30},{2000 + u}" for u in range(60)) + "\n")
    grown = partner_data(cfg, node)
    assert sum(len(s) for s in grown.sequences) == 60 * 7
    budget = PartnerBudget.open(cfg, Context(run_id=2, node_id=1, node_config=node, state=RecordDict(), run_config={}),
                                grown, "run-2")
    # the spend of run-1 is kept; run-2 adds only its noised user count (common/private_count.py)
    assert budget.ledger.history() == history + [count_mechanism(cfg["count-noise-multiplier"])]
    assert budget.ledger.rounds_trained() == 1
    budget.close()
    # Without the name the grown log is another data set to the same ledger (as before)
    unnamed = {**node, "data-identity": ""}
    with pytest.raises(PrivacyError, match="belongs to another data set .*data-identity"):
        PartnerBudget.open(cfg, context, partner_data(cfg, unnamed), "run-3")
    # Another name on the same ledger: told it was written under another data-identity
    renamed = {**node, "data-identity": "acme-log-v2"}
    with pytest.raises(PrivacyError, match="written under another data-identity"):
        PartnerBudget.open(cfg, context, partner_data(cfg, renamed), "run-4")
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="data-identity must be a short name"):
        partner_data(cfg, {**node, "data-identity": "x" * 201})


def test_ledger_deleted_after_use_is_reported_not_recreated(tmp_path, small_data):
    cfg, context = _cfg(tmp_path), _context()
    budget = PartnerBudget.open(cfg, context, small_data, "run-1")
    assert budget.ledger.created
    budget.record(context, 1, [budget.calibration.round_mechanism()])
    path = budget.ledger.path
    budget.close()
    path.unlink()
    with pytest.raises(PrivacyError, match="is missing"):
        PartnerBudget.open(cfg, context, small_data, "run-1")
    assert not path.exists()


def test_ledger_deleted_between_client_restarts_is_refused_unless_acknowledged(tmp_path, small_data):
    # Prepare: a partner spends one round, then its ledger file is deleted and its client restarted
    # (a fresh context: no client process remembers the ledger)
    cfg = _cfg(tmp_path)
    budget = PartnerBudget.open(cfg, _context(), small_data, "run-1")
    budget.record(_context(), 1, [budget.calibration.round_mechanism()])
    path, spent = budget.ledger.path, budget.spent()
    budget.close()
    marker = json.loads(path.with_name(path.name + ".created").read_text())
    path.unlink()

    # Execute / Assert: refused with one line naming the file and the acknowledgement; nothing recreated
    with pytest.raises(PrivacyError) as refused:
        PartnerBudget.open(cfg, _context(), small_data, "run-1")
    text = str(refused.value)
    assert "\n" not in text and str(path) in text and "was deleted" in text
    assert f'ledger-reset="{marker["id"]}"' in text
    assert not path.exists()
    with pytest.raises(PrivacyError, match=r"was deleted.*\(ledger-reset is 'yes' now\)$"):  # no acknowledgement
        PartnerBudget.open(cfg, _context(**{"ledger-reset": "yes"}), small_data, "run-1")

    # The operator acknowledges this deletion: a new, empty ledger with a new marker
    budget = PartnerBudget.open(cfg, _context(**{"ledger-reset": marker["id"]}), small_data, "run-1")
    assert budget.ledger.created and budget.ledger.total_steps() == 0 and spent > 0 == budget.spent()
    budget.record(_context(), 2, [budget.calibration.round_mechanism()])
    budget.close()
    renewed = json.loads(path.with_name(path.name + ".created").read_text())
    assert renewed["id"] != marker["id"]
    # ... which does not acknowledge a later deletion
    path.unlink()
    with pytest.raises(PrivacyError, match="was deleted"):
        PartnerBudget.open(cfg, _context(**{"ledger-reset": marker["id"]}), small_data, "run-1")


@pytest.mark.parametrize(("marker", "said"), [
    ('{"id": "abc123", "created": "abc"}', r'its marker l.sqlite.created does not say when it was created\); .*ledger-reset="abc123"'),
    ('{"id": "abc1', r'its marker l.sqlite.created is there but cannot be read, so its id is lost\); .*"unreadable-marker"'),
    ("[1, 2]", "its marker l.sqlite.created is there but cannot be read"),
])
def test_a_deleted_ledger_with_a_damaged_marker_is_refused_in_one_line(tmp_path, marker, said):
    # A hand-edited time was a ValueError traceback (a 500 through the ClientApp); an unreadable marker
    # was "created at 1970" (a review)
    path = tmp_path / "l.sqlite"
    path.with_name("l.sqlite.created").write_text(marker)
    with pytest.raises(PrivacyError, match=f"^privacy ledger .*l.sqlite was deleted \\({said}"):
        PrivacyLedger(path, "fp", mirror=False)
    assert not path.exists()


def test_node_config_ledger_path_wins(tmp_path, small_data):
    budget = PartnerBudget.open(_cfg(tmp_path), _context(**{"ledger-path": str(tmp_path / "mine.sqlite")}),
                                small_data, "r")
    assert budget.ledger.path == tmp_path / "mine.sqlite"
    budget.close()


def test_small_partner_gets_the_numbers(tmp_path, small_data):
    users = sum(len(s) >= 4 for s in small_data.sequences)  # >= 2 training items
    with pytest.raises(PrivacyError, match=rf"only {users} users .* not more than batch-size 500"):
        PartnerBudget.open(_cfg(tmp_path, **{"batch-size": 500}), _context(), small_data, "r")
    # as many users as the batch size is one step per epoch at sample rate 1 too (it was let through)
    with pytest.raises(PrivacyError, match=rf"not more than batch-size {users}: .*sample rate 1.* at most {users // 4}"):
        PartnerBudget.open(_cfg(tmp_path, **{"batch-size": users}), _context(), small_data, "r")
    with pytest.raises(PrivacyError,
                       match=rf"partner-0 \({users} users, batch-size 32, 4 rounds.*cannot reach epsilon=0.05"):
        PartnerBudget.open(_cfg(tmp_path, **{"target-epsilon": 0.05}), _context(), small_data, "r")


# -- a client process restarted mid-run ----------------------------------------------------------
TINY = {"synthetic-users": 120, "synthetic-items": 30, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
        "batch-size": 10, "local-epochs": 1, "num-server-rounds": 3}


def train_rounds(overrides: dict, rounds: list[int]) -> list[tuple[float, float, int]]:
    """Call the ClientApp's train handler for ``rounds`` with a fresh Context (as a new process has);
    returns (epsilon, noise multiplier, ledger steps) per round."""
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import _train
    from common.task import new_model

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = resolve_config(None, overrides)
    context = _context(**{"num-partitions": 3})
    model = new_model(cfg, cfg["synthetic-items"])
    out = []
    for r in rounds:
        msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                  "config": ConfigRecord({"server-round": r, "run-name": "restart"})}),
                      dst_node_id=1, message_type="train")
        m = _train(msg, context, cfg).content["metrics"]
        out.append((m["epsilon"], m["noise-multiplier"], m["ledger-steps"]))
    return out


_RESTART = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
from test_privacy_ledger import train_rounds
print("RESULT" + json.dumps(train_rounds(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))
"""


@pytest.mark.slow
def test_restarted_client_continues_from_its_ledger(tmp_path):
    # Execute: rounds 1-2 here, round 3 in a new process on the same ledger; reference: 1-3 here
    restarted_cfg = {**TINY, "ledger-dir": str(tmp_path / "restarted")}
    first = train_rounds(restarted_cfg, [1, 2])
    proc = subprocess.run([sys.executable, "-c", _RESTART, json.dumps(restarted_cfg), "[3]", str(ROOT / "tests")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = [tuple(x) for x in json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])]
    reference = train_rounds({**TINY, "ledger-dir": str(tmp_path / "reference")}, [1, 2, 3])

    # Assert: epsilon never goes down, the restart reused the run's noise and continued the steps
    restarted = first + second
    assert [e for e, _, _ in restarted] == sorted(e for e, _, _ in restarted)
    for got, want in zip(restarted, reference):
        assert got == pytest.approx(want, rel=1e-9)
    assert second[0][2] == 3 * first[0][2]  # steps continue from the ledger, not from zero
    fingerprint = _partner_fingerprint(TINY)
    with PrivacyLedger(tmp_path / "restarted" / "partner-0.sqlite", fingerprint) as ledger:
        assert ledger.rounds_trained() == 3
        assert restarted[-1][0] == pytest.approx(_rdp_epsilon(ledger.history()), rel=0.01)
        assert restarted[-1][0] <= 8.0


def _partner_fingerprint(overrides: dict) -> str:
    from common.task import partner_data

    return partner_data(resolve_config(None, overrides), {"partition-id": 0, "num-partitions": 3}).fingerprint()


mechanisms = st.lists(st.tuples(st.floats(0.6, 5.0), st.floats(0.01, 0.5), st.integers(1, 200)), min_size=1, max_size=4)


@settings(max_examples=10, deadline=None)
@given(history=mechanisms)
def test_ledger_epsilon_never_decreases_and_ignores_order(history):
    import tempfile

    with tempfile.TemporaryDirectory() as folder, PrivacyLedger(Path(folder) / "l.sqlite", "fp") as ledger:
        epsilons = []
        for i, mech in enumerate(history):
            ledger.record(run="r", server_round=i + 1, mechanisms=[mech], accountant="rdp")
            epsilons.append(ledger.epsilon(DELTA, "rdp"))
        assert all(b >= a for a, b in zip(epsilons, epsilons[1:]))
        assert epsilon_of(list(reversed(ledger.history())), DELTA, "rdp") == pytest.approx(epsilons[-1], rel=1e-9)


def test_two_trainings_on_one_ledger_never_both_spend_the_same_budget(tmp_path, small_data, monkeypatch):
    # Two runs (or a fine-tune during a round) on one ledger both passed the check on the old spend and
    # both recorded: epsilon 9.997 of 8. The open ledger is now locked from check to record.
    import client.privacy_ledger as ledger_module

    monkeypatch.setattr(ledger_module, "LOCK_WAIT_SECONDS", 0.3)
    cfg = _cfg(tmp_path, **{"num-server-rounds": 1})
    first = PartnerBudget.open(cfg, _context(), small_data, "r1")
    first.check_next_round()
    with pytest.raises(PrivacyError, match=r"is in use by another training .* stayed locked for 0.3 s"):
        PartnerBudget.open(cfg, _context(), small_data, "r2")
    first.record(_context(), 1, [first.calibration.round_mechanism()])
    first.close()
    # Once the first has recorded, the second sees its spend: nothing is left for a second run
    with pytest.raises(PrivacyError, match="budget exhausted: epsilon 8.000 of 8 already spent"):
        PartnerBudget.open(cfg, _context(), small_data, "r2")  # its calibration finds no budget left
    with PrivacyLedger(tmp_path / "ledgers" / "partner-0.sqlite", small_data.fingerprint()) as ledger:
        assert len(ledger.history()) == 1 and _rdp_epsilon(ledger.history()) <= 8.0 * 1.01  # one round, not two


def test_a_ledger_is_never_left_without_its_marker(tmp_path, monkeypatch):
    # A crash between placing the ledger and writing its marker left a ledger without one: deleting it
    # later read as a first run (budget reset). The marker is now written first.
    import client.ledger_file as ledger_module

    def crash(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(ledger_module, "write_private_bytes", crash)
    path = tmp_path / "l.sqlite"
    with pytest.raises(OSError, match="killed"):
        PrivacyLedger(path, "fp")
    assert not path.exists()
    monkeypatch.undo()
    with PrivacyLedger(path, "fp") as ledger:  # the lock was released; a normal creation works
        assert ledger.created and ledger_module.read_marker(path) is not None


def test_a_leftover_temporary_file_of_a_crashed_writer_does_not_block_writing(tmp_path):
    from common.files import write_private_bytes

    target = tmp_path / "checkpoint.pt"
    (tmp_path / f".checkpoint.pt.{os.getpid()}.tmp").write_bytes(b"half")  # a killed writer with this pid
    write_private_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"


def test_a_read_only_ledger_folder_is_one_line(tmp_path, monkeypatch):
    # The lock file cannot be made in a read-only folder: that was a PermissionError traceback
    real_open = os.open

    def no_write_here(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_write_here)
    with pytest.raises(PrivacyError, match=r"privacy ledger .*l.sqlite: its folder is not writable"):
        PrivacyLedger(tmp_path / "l.sqlite", "fp")


def test_the_accounting_delta_is_the_smallest_any_run_promised(tmp_path):
    # A mutation audit: min -> max here was only caught by end-to-end tests elsewhere
    with PrivacyLedger(tmp_path / "l.sqlite", "fp", create=True) as ledger:
        assert ledger.accounting_delta(1e-5) == 1e-5  # nothing calibrated yet
        from client.privacy_ledger import Calibration

        ledger.save_calibration("a", Calibration(noise_multiplier=1.0, target_epsilon=8.0, target_delta=1e-7,
                                                 accountant="rdp", sample_rate=0.1, steps_per_round=10,
                                                 planned_rounds=1))
        assert ledger.accounting_delta(1e-5) == 1e-7 and ledger.accounting_delta(1e-9) == 1e-9


def test_a_ledger_opened_through_a_symbolic_link_takes_the_same_lock(tmp_path, monkeypatch):
    # The lock was named after the path as given: a fine-tune whose --ledger-path linked to the
    # supernode's ledger passed the budget check beside a running round and both spent (8.455 of 8)
    import client.privacy_ledger as ledger_module

    monkeypatch.setattr(ledger_module, "LOCK_WAIT_SECONDS", 0.2)
    real = tmp_path / "a" / "l.sqlite"
    (tmp_path / "b").mkdir()
    with PrivacyLedger(real, "fp") as first:
        link = tmp_path / "b" / "l.sqlite"
        link.symlink_to(real)
        with pytest.raises(PrivacyError, match="is in use by another training"):
            PrivacyLedger(link, "fp")
        first.record(run="r", server_round=1, mechanisms=[(1.0, 0.1, 10)], accountant="rdp")
    with PrivacyLedger(link, "fp") as second:  # released: the link opens the same ledger
        assert len(second.history()) == 1


def test_a_ledger_opened_through_a_hard_link_takes_the_same_lock(tmp_path, monkeypatch):
    # Twentieth session (a review): a hard link is another name for the same file, with a lock file of its own
    # name; both names opened at once, so two trainings could spend from one budget together
    import client.privacy_ledger as ledger_module

    monkeypatch.setattr(ledger_module, "LOCK_WAIT_SECONDS", 0.2)
    real, other = tmp_path / "a" / "l.sqlite", tmp_path / "b" / "l.sqlite"
    other.parent.mkdir()
    with PrivacyLedger(real, "fp") as created:  # the handle that created it holds the file's lock too (a review)
        os.link(real, other)
        with pytest.raises(PrivacyError, match="is in use by another training"):
            PrivacyLedger(other, "fp")
        assert created.created
    with PrivacyLedger(real, "fp") as first:
        with pytest.raises(PrivacyError, match="is in use by another training"):
            PrivacyLedger(other, "fp")
        first.record(run="r", server_round=1, mechanisms=[(1.0, 0.1, 10)], accountant="rdp")
    with PrivacyLedger(other, "fp") as second:  # released: the other name opens the same ledger, spend and all
        assert len(second.history()) == 1
        with pytest.raises(PrivacyError, match="is in use by another training"):
            PrivacyLedger(real, "fp")


@pytest.mark.parametrize("code", [30, 13])  # EROFS (a read-only mount), EACCES
def test_a_ledger_on_a_read_only_file_system_is_one_line(tmp_path, monkeypatch, code):
    # Only PermissionError was caught: a read-only mount's OSError (errno 30) reached the partner as
    # an internal error and the finetune command as a traceback
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(PrivacyError, match=r"l.sqlite: its folder is not writable \(" + os.strerror(code)):
        PrivacyLedger(tmp_path / "l.sqlite", "fp")


def test_a_write_the_database_refuses_is_one_line_and_records_nothing(tmp_path):
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path, "fp") as ledger:
        ledger._conn.execute("PRAGMA query_only = ON")  # what a read-only file or a full disk looks like to SQLite
        with pytest.raises(PrivacyError, match=r"could not be written \(.*\); nothing was released"):
            ledger.record(run="r", server_round=1, mechanisms=[(1.0, 0.1, 10)], accountant="rdp")
    with PrivacyLedger(path, "fp") as ledger:
        assert ledger.history() == []


def test_a_creation_cut_short_after_its_marker_is_finished_not_refused(tmp_path, monkeypatch):
    # Killed between writing the marker and linking the new ledger in: every start after said the ledger
    # "was deleted" (it never held any spend) until the operator set ledger-reset. The made ledger is
    # now linked in; one that holds spend, or belongs to another marker, is still refused.
    import client.privacy_ledger as ledger_module

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for SIGKILL: the finally clause's clean-up must not run either

    path = tmp_path / "l.sqlite"
    monkeypatch.setattr(ledger_module.os, "link", killed)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: None)
    with pytest.raises(KeyboardInterrupt):
        PrivacyLedger(path, "fp")
    monkeypatch.undo()
    leftovers = list(tmp_path.glob(".l.sqlite.*.tmp"))
    assert not path.exists() and ledger_module.read_marker(path) is not None and len(leftovers) == 1
    with PrivacyLedger(path, "fp") as ledger:
        assert ledger.created and ledger.history() == []
    assert not leftovers[0].exists()
    # A leftover with spend in it is not a cut-short creation: the deleted ledger stays refused
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(run="r", server_round=1, mechanisms=[(1.0, 0.1, 10)], accountant="rdp")
    os.link(path, tmp_path / ".l.sqlite.999.tmp")
    path.unlink()
    with pytest.raises(PrivacyError, match="was deleted"):
        PrivacyLedger(path, "fp")


def test_a_spend_row_changed_on_disk_is_refused_as_corrupt(tmp_path):
    # A crash review: one flipped exponent bit turned a noise multiplier 0.7 into 1.4 and epsilon 16.40 into
    # 4.15, in range, so every check passed. The rows now carry a digest, checked at every opening.
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(run="r", server_round=1, mechanisms=[(0.7, 0.1, 100)], accountant="rdp")
        spent = ledger.epsilon(DELTA, "rdp")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE batches SET noise_multiplier = 1.4")
    with pytest.raises(PrivacyError, match=r"is corrupt \(its rows no longer match their digest"):
        PrivacyLedger(path, "fp")
    with sqlite3.connect(path) as conn:  # restored from a backup: opens again with its spend
        conn.execute("UPDATE batches SET noise_multiplier = 0.7")
    with PrivacyLedger(path, "fp") as ledger:
        assert ledger.epsilon(DELTA, "rdp") == spent == pytest.approx(_rdp_epsilon([(0.7, 0.1, 100)]), rel=0.02)


def test_a_ledger_written_before_the_digest_gets_one_and_is_checked_from_then_on(tmp_path):
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(run="r", server_round=1, mechanisms=[(0.7, 0.1, 100)], accountant="rdp")
    with sqlite3.connect(path) as conn:  # as the seventeenth session's code wrote it: schema 2, no digest
        conn.execute("DELETE FROM meta WHERE key = 'rows-sha256'")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema-version'")
    with PrivacyLedger(path, "fp") as ledger:
        assert len(ledger.history()) == 1
    with sqlite3.connect(path) as conn:
        # Upgraded to schema 3, which older code refuses: it would write rows the digest does not know, and the
        # next opening would call the ledger corrupt and advise a backup that forgets them (a review)
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema-version'").fetchone() == ("3",)
        conn.execute("DELETE FROM batches")  # a row removed: less spend
    with pytest.raises(PrivacyError, match="no longer match their digest"):
        PrivacyLedger(path, "fp")
    with sqlite3.connect(path) as conn:  # schema 3 without its digest is damaged, not old
        conn.execute("DELETE FROM meta WHERE key = 'rows-sha256'")
    with pytest.raises(PrivacyError, match="no longer match their digest"):
        PrivacyLedger(path, "fp")


def test_a_symbolic_link_to_a_missing_ledger_is_one_line_and_writes_nothing(tmp_path):
    # A review: a FileExistsError traceback, and a new marker beside the link whose id led nowhere
    link = tmp_path / "l.sqlite"
    link.symlink_to(tmp_path / "gone" / "l.sqlite")
    with pytest.raises(PrivacyError, match=r"is a symbolic link to .*gone/l.sqlite, which does not exist"):
        PrivacyLedger(link, "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.sqlite"]


@pytest.mark.parametrize("leftover", ["its own", "another marker", "another data set", "not a ledger of ours"])
def test_only_the_creation_its_marker_names_is_finished(tmp_path, leftover):
    # A temporary ledger that is not the one the marker was written for (a creation killed before its marker,
    # beside an older ledger's marker; another data set; a marker's own temporary file) must not be linked
    # in: that would replace a deleted ledger that held spend with an empty one
    import client.privacy_ledger as ledger_module

    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path, "fp") as ledger:
        ledger.record(run="r", server_round=1, mechanisms=[(1.0, 0.1, 10)], accountant="rdp")
    marker = ledger_module.read_marker(path)
    path.unlink()  # deleted (or never linked in): its marker stays
    name = ".l.sqlite.created.123.x.tmp" if leftover == "not a ledger of ours" else ".l.sqlite.123.tmp"
    _empty_ledger(tmp_path / name, "other-id" if leftover == "another marker" else marker["id"],
                  "fp2" if leftover == "another data set" else "fp")
    if leftover == "its own":  # what a creation cut short between marker and link leaves: finished
        # ... but not in place of a ledger whose marker counted its spend rows (twentieth session)
        with pytest.raises(PrivacyError, match="was deleted"):
            PrivacyLedger(path, "fp")
        import json

        fresh = {k: v for k, v in marker.items() if k not in ("rows", "rows-sha256")}  # as creation writes it
        for written in (ledger_module.marker_path(path), ledger_module.mirror_path(path)):  # creation writes both
            written.write_text(json.dumps(fresh))
        with PrivacyLedger(path, "fp") as ledger:
            assert ledger.created and ledger.history() == []
        return
    with pytest.raises(PrivacyError, match="was deleted"):
        PrivacyLedger(path, "fp")
    assert not path.exists()


def _empty_ledger(path: Path, marker_id: str, fingerprint: str) -> Path:
    """An empty ledger as _create makes it, tied to ``marker_id``."""
    import client.ledger_file as ledger_module

    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(ledger_module.SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema-version", "3"), ("fingerprint", fingerprint),
                                                            ("created", "0"), ("marker-id", marker_id),
                                                            ("rows-sha256", ledger_module.rows_digest(conn))])
    conn.close()
    return path


def test_a_deployed_partner_never_sends_the_hash_of_its_data(tmp_path):
    # A plain log's fingerprint hashes its content, and it reached the coordinator as the partner's label,
    # its "fingerprint" and its default ledger file name: with every other user's history known, a coordinator
    # could test whether one more user is in the log, which no DP guarantee survives. It is now keyed with a
    # secret kept in the ledger and the run name: one label through the run and its resumes, nothing about the
    # content; the ledger file on the partner's disk keeps its content-derived name, so its spend carries over.
    from common.task import partner_data

    log, catalogue = _partner_log(tmp_path)
    cfg = _cfg(tmp_path, **{"catalogue": str(catalogue), "batch-size": 8, "num-server-rounds": 2,
                            "ledger-dir": str(tmp_path / "ledgers")})
    node = {"data-path": str(log)}
    data = partner_data(cfg, node)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    budget = PartnerBudget.open(cfg, context, data, "run-1")
    budget.record(context, 1, [budget.calibration.round_mechanism()])
    details, label = budget.details(), budget.label
    budget.close()
    assert data.fingerprint() not in json.dumps(details) and data.fingerprint() not in label
    assert details["ledger-path"].startswith("default") and details["fingerprint"] in label
    assert budget.ledger.path.name == f"partner-{data.fingerprint()}.sqlite"  # local only
    again = PartnerBudget.open(cfg, context, data, "run-1")  # the next round of the run: the same label
    assert again.label == label
    again.close()
    other_run = Context(run_id=2, node_id=1, node_config=node, state=RecordDict(), run_config={})
    resumed = PartnerBudget.open(cfg, other_run, data, "run-1")  # a resume: a new flwr run, fresh context.state
    assert resumed.label == label  # (it was listed twice in privacy.json: a review)
    resumed.close()
    second = PartnerBudget.open(cfg, other_run, data, "run-2")  # another run: another label, the same ledger
    assert second.label != label and second.ledger.rounds_trained() == 1
    second.close()
    # A batch size larger than the (noised) count is not refused: the plan takes 2 steps an epoch
    # (tests/test_private_count.py)
    small = PartnerBudget.open({**cfg, "batch-size": 500}, other_run, data, "run-3")
    assert small.calibration.sample_rate == 0.5 and small.label.startswith("partner-")
    small.close()
    named = {**node, "data-identity": "acme-log"}  # a name is not content: sent as before
    named_data = partner_data(cfg, named)
    assert partner_label(named, named_data, other_run) == f"partner-{named_data.fingerprint()}"


def test_a_ledger_written_under_a_logs_content_follows_it_into_a_name_or_an_event_store(tmp_path, caplog):
    # A partner that trained on a plain CSV log (ledger keyed by its content) and then named it, or moved it
    # into an event store as the serving guide says, was refused by its ledger ("another data set"), and the
    # only way on was a new ledger: the same users' spend started again from zero (a partner review)
    from common.data.event_store import EventStore
    from common.task import partner_data

    log = tmp_path / "log.csv"
    rows = [(f"u{u}", f"i{(u * 7 + k) % 30}", 1000 + k) for u in range(60) for k in range(6)]
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(f"{u},{i},{t}" for u, i, t in rows) + "\n")
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    cfg = _cfg(tmp_path, **{"catalogue": str(catalogue), "batch-size": 8, "num-server-rounds": 2})
    node = {"data-path": str(log), "ledger-path": str(tmp_path / "ledger.sqlite")}

    def spend(node_config: dict, run: str) -> list:
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        budget = PartnerBudget.open(cfg, context, partner_data(cfg, node_config), run)
        try:
            budget.record(context, 1, [budget.calibration.round_mechanism()])
            return budget.ledger.history()
        finally:
            budget.close()

    first = spend(node, "run-1")  # unnamed: the ledger is the content's
    store = EventStore(tmp_path / "events.sqlite", create=True)
    store.add_many((u, i, t, None) for u, i, t in rows)  # the same events, nothing new yet
    store.close()
    moved = {**node, "data-path": str(tmp_path / "events.sqlite")}
    with caplog.at_level("WARNING", logger="fedrec.ledger"):
        second = spend(moved, "run-2")
    assert second[:len(first)] == first and len(second) > len(first)  # run-1's spend kept, run-2's added
    assert any("keeps its spend" in r.getMessage() for r in caplog.records)
    # the store now owns the ledger: it grows and keeps it; the old log is another data set to it now
    store = EventStore(tmp_path / "events.sqlite")
    store.add_many((f"u{u}", "i3", 3000 + u, None) for u in range(60))
    store.close()
    assert spend(moved, "run-3")[:len(second)] == second
    with pytest.raises(PrivacyError, match="belongs to another data set"):
        spend(node, "run-4")
    # a log named for the first time after it grew is not the content the ledger was written for: refused
    other = {**node, "ledger-path": str(tmp_path / "other.sqlite")}
    spend(other, "run-5")
    os.utime(log, ns=(1, 1))
    with open(log, "a") as fh:
        fh.write("\n".join(f"u{u},i{(u + 3) % 30},{2000 + u}" for u in range(60)) + "\n")
    with pytest.raises(PrivacyError, match="before it was named"):
        spend({**other, "data-identity": "acme-log"}, "run-6")


def test_a_default_ledger_left_behind_by_naming_the_log_is_named_not_replaced(tmp_path):
    # With no ledger-path the ledger file is named after the data's identity; naming the log (data-identity)
    # changed that name, so a fresh ledger started the same users' spend from zero beside the old one
    from common.task import partner_data

    log, catalogue = _partner_log(tmp_path)
    cfg = _cfg(tmp_path, **{"catalogue": str(catalogue), "batch-size": 8, "num-server-rounds": 2})
    node = {"data-path": str(log)}  # a deployed partner (no partition-id) on the default ledger file

    def open_budget(node_config: dict) -> PartnerBudget:
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
        return PartnerBudget.open(cfg, context, partner_data(cfg, node_config), "run-1")

    budget = open_budget(node)
    budget.record(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}), 1,
                  [budget.calibration.round_mechanism()])
    written, history = budget.ledger.path, budget.ledger.history()
    budget.close()
    named = {**node, "data-identity": "acme-log"}
    with pytest.raises(PrivacyError, match=re.escape(f'ledger-path="{written}"')):
        open_budget(named)
    assert sorted(p.name for p in written.parent.glob("*.sqlite")) == [written.name]  # no new ledger was made
    budget = open_budget({**named, "ledger-path": str(written)})  # as the message says: the spend is kept
    assert budget.ledger.history()[:len(history)] == history
    budget.close()


def test_the_supernodes_max_epsilon_is_kept_with_its_ledger(tmp_path, small_data):
    # fedrec-client finetune never sees the node config; the cap travels with the ledger it caps
    cfg = _cfg(tmp_path)
    capped = _context(**{"max-epsilon": 3.0, "ledger-path": str(tmp_path / "l.sqlite")})
    PartnerBudget.open(cfg, capped, small_data, "run-1").close()
    with PrivacyLedger(tmp_path / "l.sqlite", small_data.fingerprint()) as ledger:
        assert ledger.max_epsilon() == 3.0
    uncapped = _context(**{"ledger-path": str(tmp_path / "l.sqlite")})
    PartnerBudget.open(cfg, uncapped, small_data, "run-1").close()  # the partner lifted its cap
    with PrivacyLedger(tmp_path / "l.sqlite", small_data.fingerprint()) as ledger:
        assert ledger.max_epsilon() is None


def test_a_deployed_partners_ledger_has_a_marker_copy_outside_its_folder_and_a_simulated_ones_not(tmp_path,
                                                                                                small_data):
    # A simulated partner's ledger lives and goes with its run directory (a sweep sets a failed run aside and
    # runs it again under its name): a copy of its marker elsewhere would refuse that rerun as a deleted ledger
    from client.ledger_file import mirror_path

    cfg = _cfg(tmp_path)
    simulated = _context(**{"ledger-path": str(tmp_path / "sim.sqlite")})
    PartnerBudget.open(cfg, simulated, small_data, "run-1").close()
    assert (tmp_path / "sim.sqlite.created").exists() and not mirror_path(tmp_path / "sim.sqlite").exists()
    deployed = Context(run_id=1, node_id=1, node_config={"ledger-path": str(tmp_path / "dep.sqlite")},
                       state=RecordDict(), run_config={})
    PartnerBudget.open({**cfg, "count-noise-multiplier": 10.0}, deployed, small_data, "run-1").close()
    assert mirror_path(tmp_path / "dep.sqlite").exists()
