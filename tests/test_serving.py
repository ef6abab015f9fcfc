"""Partner serving: recommendations, leave-one-out explanations, the HTTP API and its event store."""

from __future__ import annotations

import json
import socket
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from client.explain import leave_one_out
from client.recommend import LogHistory, Recommender, find_model_file, load_global_model
from common.config import resolve_config
from common.data import build_sequences, generate_synthetic, load_interactions
from common.data.event_store import EventStore
from common.data.loaders import Interactions
from common.errors import ConfigError, DataError
from common.metrics import pad_left
from common.task import new_model
from common.training import train_local
from simulations.deployment import free_port

CFG = {"embedding-dim": 16, "num-blocks": 1, "max-seq-len": 20, "dropout": 0.0, "seed": 5}


def save_model(path: Path, model: torch.nn.Module, catalogue: np.ndarray, cfg: dict) -> Path:
    """model.pt exactly as the server writes it (server/run_report.py)."""
    from flwr.app import ArrayRecord

    from server.run_report import RunRecorder

    path.mkdir(parents=True, exist_ok=True)
    RunRecorder(path, cfg, catalogue).save_model(ArrayRecord(model.state_dict()))
    return path / "model.pt"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def log():
    return generate_synthetic(num_users=150, num_items=50, mean_length=12, seed=7)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, log):
    """A small SASRec trained for a few epochs (no DP) and saved as a run directory's model.pt."""
    data = build_sequences(log)
    cfg = resolve_config(None, CFG)
    model = new_model(cfg, data.num_items)
    train_local(model, data, epochs=8, batch_size=32, learning_rate=0.01, max_len=20, seed=1)
    run = tmp_path_factory.mktemp("run")
    save_model(run, model, data.catalogue, cfg)
    return run, data


def test_recommendations_exclude_seen_and_follow_model_scores(trained, log):
    # Prepare
    run, data = trained
    gm = load_global_model(run)
    source = LogHistory(log)
    user = str(data.user_ids[3])

    # Execute
    result = Recommender(gm, {"1": "Item One"}).recommend(user, source, 5, explain=False)

    # Assert: the top 5 unseen items by an independent full-catalogue scoring
    seen = [gm.index[i] for i in source.history(user)[0]]
    scores = gm.model.score(pad_left([np.array(seen)], 20))[0]
    scores[[0, *seen]] = float("-inf")
    expected = [str(data.catalogue[i - 1]) for i in torch.topk(scores, 5).indices.tolist()]
    assert [r.item_id for r in result.items] == expected
    assert not set(expected) & set(source.history(user)[0])
    assert not result.cold_start and result.strategy == "model"


def test_removing_the_top_explaining_item_lowers_that_items_score(trained, log):
    # Prepare
    run, data = trained
    gm = load_global_model(run)
    source = LogHistory(log)
    checked = multi = 0
    for user in data.user_ids[:10].tolist():
        result = Recommender(gm).recommend(user, source, 3, explain=True)
        history = np.array([gm.index[i] for i in source.history(user)[0]])
        for rec in result.items:
            if not rec.explanation.because:
                continue
            top = rec.explanation.because[0]
            target = gm.index[rec.item_id]
            # Execute: drop the top explaining item from the history and rescore independently
            without = np.delete(history, np.flatnonzero(history == top.index)[0])
            full = float(gm.model.score(pad_left([history], 20))[0, target])
            reduced = float(gm.model.score(pad_left([without], 20))[0, target])
            # Assert: the score falls, by the influence the explanation reports
            assert reduced < full
            assert full - reduced == pytest.approx(top.influence, abs=1e-4)
            assert rec.explanation.reason.startswith("because you watched " + top.name)
            # Assert: the reasons are the strongest ones, strongest first. Leave-one-out influences
            # computed independently: one plain forward per removed history item (the last 20 are inputs)
            loo = [(int(history[p]), full - float(gm.model.score(pad_left([np.delete(history, p)], 20))[0, target]))
                   for p in range(max(0, len(history) - 20), len(history))]
            assert top.influence == pytest.approx(max(i for _, i in loo), abs=1e-4)
            listed = [b.influence for b in rec.explanation.because]
            assert listed == sorted(listed, reverse=True)
            expected = sorted((x for x in loo if x[1] > 0), key=lambda x: -x[1])[:len(listed)]
            assert [b.index for b in rec.explanation.because] == [i for i, _ in expected]
            assert listed == pytest.approx([i for _, i in expected], abs=1e-4)
            multi += len(listed) > 1
            checked += 1
    assert checked >= 10
    assert multi >= 5  # the order is only checked where several reasons are listed


def test_a_repeated_history_item_is_one_reason_with_its_item_id(trained):
    # A journey review: "because" listed Star Wars twice (one entry per event) and without an id, though
    # ML-100K has titles shared by two ids
    run, data = trained
    gm = load_global_model(run)
    a, b, c = data.catalogue[:3].tolist()
    log = load_interactions_from_rows([("bob", item, t) for t, item in enumerate([a, b, a, a, c], start=1)])
    result = Recommender(gm).recommend("bob", LogHistory(log), 20)
    history = np.array([gm.index[i] for i in (a, b, a, a, c)])
    full = gm.model.score(pad_left([history], 20))[0]
    repeated = 0
    for rec in result.items:
        because = rec.explanation.because
        assert len({x.index for x in because}) == len(because)  # each item once
        assert [x["item_id"] for x in rec.explanation.to_dict()["because"]] == [x.item_id for x in because]
        for x in because:
            assert x.item_id == str(gm.catalogue[x.index - 1])
            # its influence: that of its most influential event (removing that one event drops the score by it)
            drops = [float(full[gm.index[rec.item_id]] - gm.model.score(pad_left([np.delete(history, p)], 20))[0,
                     gm.index[rec.item_id]]) for p in np.flatnonzero(history == x.index)]
            assert x.influence == pytest.approx(max(drops), abs=1e-4)
            repeated += x.item_id == a
    assert repeated >= 3  # the check above saw the repeated item


def load_interactions_from_rows(rows: list[tuple[str, str, int]]) -> Interactions:

    user, item, ts = zip(*rows)
    return Interactions(np.array(user), np.array(item), np.array(ts, dtype=np.int64), None, "test")


def test_leave_one_out_matches_one_removal_at_a_time(trained):
    run, _ = trained
    gm = load_global_model(run)
    history = np.array([3, 9, 4, 17, 22, 5])
    positions, influence = leave_one_out(gm.model, history, None, [7, 11], 20)
    base = gm.model.score(pad_left([history], 20))[0]
    for row, p in enumerate(positions):
        reduced = gm.model.score(pad_left([np.delete(history, p)], 20))[0]
        assert influence[row].tolist() == pytest.approx((base[[7, 11]] - reduced[[7, 11]]).tolist(), abs=1e-5)


def test_unknown_user_gets_labelled_popularity(trained, log):
    run, _ = trained
    gm = load_global_model(run)
    result = Recommender(gm).recommend("no-such-user", LogHistory(log), 4)
    items, counts = np.unique(log.item, return_counts=True)
    order = sorted(zip(counts.tolist(), [-gm.index[i] for i in items.tolist()], items.tolist()), reverse=True)
    assert result.cold_start and result.strategy == "popularity"
    assert [r.item_id for r in result.items] == [i for _, _, i in order[:4]]


def test_a_cold_start_header_says_why_and_what_the_list_is_ordered_by(trained, log, tmp_path, capsys):
    # A journey review: every event outside the catalogue printed "popularity at this partner; 2 known events",
    # though none is known and nothing at the partner ranks the list (catalogue order at score 0)
    from client.cli import main

    run, data = trained
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("user_id,item_id,timestamp\nbob,9999,100\nbob,abc,200\n")
    args = ["recommend", "--model", str(run), "--data-path", str(unknown), "--user", "bob", "--k", "3"]
    assert main(args) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head == ("user bob: cold start (2 events, none on an item in the model's catalogue; catalogue order: "
                    "this partner has no events on the model's items to rank by popularity)")
    assert main([*args, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "catalogue-order" and [i["item_id"] for i in out["items"]] == data.catalogue[:3].tolist()
    # One catalogue item has an event (another user's): it ranks first, the rest fill up in catalogue order
    one = tmp_path / "one.csv"
    one.write_text(f"user_id,item_id,timestamp\nbob,9999,100\nann,{data.catalogue[5]},200\n")
    assert main([*args[:4], str(one), *args[5:], "--no-explain"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == ("user bob: cold start (1 event, none on an item in the model's "
                                                       "catalogue; popularity at this partner, then catalogue order "
                                                       "for the last 2)")
    assert main([*args[:4], str(one), "--user", "carol", "--k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "user carol: cold start (no events; popularity at this partner)"


def test_bad_model_file_is_one_clear_error(tmp_path):
    from common.errors import DataError

    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(DataError, match=r"not a fedrec model file \(expected state_dict, catalogue, config; "
                                        r"not a torch.save archive: another format, or a copy cut short\)"):
        load_global_model(tmp_path)
    (tmp_path / "model.pt").write_text("hello\nworld\n")  # torch read it as a legacy pickle: "missing 101"
    with pytest.raises(DataError, match=r"config; not a torch.save archive: another format, or a copy cut short\)$"):
        load_global_model(tmp_path)
    with zipfile.ZipFile(tmp_path / "model.pt", "w") as archive:  # a zip, not torch's
        archive.writestr("x/data.pkl", b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"config; a damaged torch.save archive: RuntimeError: Expected "):
        load_global_model(tmp_path)  # torch's own words say whose they are (a review: "...; pop from empty list)")
    import torch

    torch.save({"state_dict": {}, "catalogue": []}, tmp_path / "model.pt")
    with pytest.raises(DataError, match=r"config; missing 'config'\)"):
        load_global_model(tmp_path)
    with pytest.raises(DataError, match="model /dev/null: not a regular file"):  # it said "no such file"
        load_global_model("/dev/null")
    # A commit review: what a readable torch file holds is not "damaged", and an unreadable one is not "another format"
    from common.model_file import read_model_file

    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(DataError, match=r"config; it holds a Tensor\)$"):  # it said "a damaged ...: IndexError"
        read_model_file(tmp_path / "tensor.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(DataError, match=r"folder.pt: cannot read it \(Is a directory\)$"):
        read_model_file(tmp_path / "folder.pt")
    torch.save({"state_dict": {}, "catalogue": 5, "config": {}}, tmp_path / "odd.pt")
    with pytest.raises(DataError, match="its catalogue or config has the wrong form"):
        read_model_file(tmp_path / "odd.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no model.pt"):
        load_global_model(tmp_path / "empty")
    # A checkpoint given as the model: one line (the file's first text line was cut mid-quote), with a hint
    (tmp_path / "checkpoint.pt").write_text("FEDREC-CHECKPOINT 1 e5a6\n{'a': 1}\n")
    with pytest.raises(DataError, match="give the run directory or its model.pt") as err:
        load_global_model(tmp_path / "checkpoint.pt")
    assert "\n" not in str(err.value)


def test_a_model_file_that_would_run_code_is_refused_without_running_it(trained, tmp_path):
    # model.pt comes from the coordinator: loading it must not execute what a tampered pickle names
    from common.errors import DataError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    run, _ = trained
    blob = torch.load(run / "model.pt", weights_only=True)
    torch.save({**blob, "config": {**blob["config"], "x": Payload()}}, tmp_path / "model.pt")
    with pytest.raises(DataError, match="not a fedrec model file"):
        load_global_model(tmp_path / "model.pt")
    assert not marker.exists()


def test_a_foreign_model_file_error_never_advises_an_unsafe_load(trained, tmp_path, capsys):
    # A journey review: u.item given as --model quoted torch's "Re-running torch.load with weights_only set to
    # False will likely succeed", advice that runs whatever code a tampered file names
    from client.cli import main

    class Payload:
        def __reduce__(self):
            return (print, ("x",))

    text, tampered = tmp_path / "u.item", tmp_path / "tampered.pt"
    text.write_text("1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|0|0|0\n")
    blob = torch.load(trained[0] / "model.pt", weights_only=True)
    torch.save({**blob, "config": {**blob["config"], "x": Payload()}}, tampered)
    for file, says in ((text, "not a torch.save archive"), (tampered, "loading them could run code")):
        assert main(["recommend", "--model", str(file), "--data-path", str(text), "--user", "1"]) == 2
        err = capsys.readouterr().err
        assert says in err and "weights_only" not in err and "UnpicklingError" not in err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_a_model_file_from_an_older_version_says_so(trained, tmp_path):
    from common.errors import DataError

    run, _ = trained
    blob = torch.load(find_model_file(run), weights_only=False)
    del blob["config"]["tied-output"]
    torch.save(blob, tmp_path / "model.pt")
    with pytest.raises(DataError, match=r"its config lacks tied-output \(a model file from an older version\?\)"):
        load_global_model(tmp_path)


def test_model_with_nan_weights_is_refused_not_served(trained, tmp_path):
    from common.errors import DataError

    run, _ = trained
    blob = torch.load(find_model_file(run), weights_only=False)
    key = next(k for k, v in blob["state_dict"].items() if v.is_floating_point())
    blob["state_dict"][key] = blob["state_dict"][key].clone().fill_(float("nan"))
    torch.save(blob, tmp_path / "model.pt")
    with pytest.raises(DataError, match="NaN or infinite"):
        load_global_model(tmp_path)


def test_event_store_is_a_training_log_that_grows(tmp_path, log):
    # Prepare: a store holding the log, used as a partner's data-path
    from common.task import partner_data

    store_path = tmp_path / "events.sqlite"
    with EventStore(store_path, create=True) as store:
        store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), [None] * len(log)))
    catalogue = build_sequences(log).catalogue
    (tmp_path / "catalogue.txt").write_text("\n".join(catalogue.tolist()) + "\n")
    cfg = resolve_config(None, {"dataset": "synthetic", "catalogue": str(tmp_path / "catalogue.txt")})
    node = {"data-path": str(store_path)}
    # without the published catalogue the log would be numbered by the demo data set's: refused
    with pytest.raises(ConfigError, match="data-path needs the federation's published catalogue"):
        partner_data({**cfg, "catalogue": ""}, node)
    before = partner_data({**cfg, "synthetic-users": 150, "synthetic-items": 50, "seed": 7}, node)

    # Execute: one more event for the first user, later than all others
    user = str(before.user_ids[0])
    new_item = next(i for i in catalogue.tolist() if i not in set(log.item[log.user == user].tolist()))
    time.sleep(0.01)
    with EventStore(store_path) as store:
        store.add(user, new_item, timestamp=int(log.timestamp.max()) + 10)
    after = partner_data({**cfg, "synthetic-users": 150, "synthetic-items": 50, "seed": 7}, node)

    # Assert: the store is private; the next round sees the event; the data set keeps its identity (same ledger)
    from common.files import is_private

    assert is_private(store_path)
    assert str(after.catalogue[after.sequences[0][-1] - 1]) == new_item
    assert len(after.sequences[0]) == len(before.sequences[0]) + 1
    assert after.fingerprint() == before.fingerprint()





@pytest.mark.parametrize("explain", [False, True])
def test_an_mf_model_recommends_with_and_without_explanations(tmp_path, log, explain):
    # Prepare: an MF model file (its fold-in of a user needs autograd; serving scores in inference mode)
    data = build_sequences(log)
    cfg = resolve_config(None, {**CFG, "model": "mf", "mf-fold-in-steps": 5})
    model = new_model(cfg, data.num_items)
    gm = load_global_model(save_model(tmp_path / "mf", model, data.catalogue, cfg))
    source = LogHistory(log)
    user = str(data.user_ids[3])
    # Execute
    result = Recommender(gm).recommend(user, source, 5, explain=explain)
    # Assert: five unseen items ranked by the MF scores of the user's folded-in factors
    seen = [gm.index[i] for i in source.history(user)[0]]
    scores = gm.model.score(pad_left([np.array(seen)], 20))[0]
    scores[[0, *seen]] = float("-inf")
    assert [r.item_id for r in result.items] == [str(data.catalogue[i - 1]) for i in torch.topk(scores, 5).indices.tolist()]
    assert all((r.explanation is not None) == explain for r in result.items)

def test_event_store_refuses_another_applications_sqlite_file_and_leaves_it_alone(tmp_path):
    import sqlite3

    foreign = tmp_path / "crm.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    before = foreign.read_bytes()
    for create in (False, True):
        with pytest.raises(DataError, match="SQLite file of another application .*customers"):
            EventStore(foreign, create=create)
    assert foreign.read_bytes() == before  # no tables added
    EventStore(tmp_path / "new.sqlite", create=True).close()  # a new file and ...
    EventStore(tmp_path / "new.sqlite").close()  # ... an existing event store still open

def test_event_store_history_cache_sees_every_write(tmp_path):
    # Prepare: a serving store that has read two users' histories (now cached), and a second connection
    path = tmp_path / "events.sqlite"
    store = EventStore(path, create=True, cached_users=2)
    store.add_many([("u1", "a", 10, None), ("u1", "b", 20, None), ("u2", "c", 5, None)])
    assert store.history("u1")[0] == ["a", "b"] and store.history("u2")[0] == ["c"]

    # Execute / Assert: its own event, another process' event, an import, the LRU bound
    store.add("u1", "x", timestamp=15)
    assert store.history("u1")[0] == ["a", "x", "b"]
    with EventStore(path) as other:
        other.add("u2", "y", timestamp=1)
    assert store.history("u2")[0] == ["y", "c"]
    assert store.history("u2")[1].tolist() == [1, 5]
    store.add_many([("u1", "z", 30, None)])
    assert store.history("u1")[0] == ["a", "x", "b", "z"]
    store.history("u3")
    assert len(store._cache) == 2
    items, _ = store.history("u1")
    items.append("mutated by a caller")
    assert store.history("u1")[0] == ["a", "x", "b", "z"]
    # Cold-start popularity (trigger-kept counts) saw every write too, the other process's included
    assert store.item_counts() == {"a": 1, "b": 1, "c": 1, "x": 1, "y": 1, "z": 1}
    store.close()


def test_the_same_event_twice_is_stored_once_as_training_reads_it(tmp_path):
    # A diff review: the loader dropped repeated events for training while serving read them twice
    import sqlite3

    path = tmp_path / "events.sqlite"
    with EventStore(path, create=True) as store:
        assert store.add_many([("u", "a", 1, None), ("u", "b", 2, None), ("u", "a", 1, None)]) == 2
        assert store.add_many([("u", "b", 2, None), ("u", "c", 3, None)]) == 1
        first = store.add("u", "d", timestamp=4)
        assert store.add("u", "d", timestamp=4) == first  # a retried POST gets the same event back
        assert store.add("u", "d", timestamp=5) != first  # the same item later is a new event
        assert store.history("u")[0] == ["a", "b", "c", "d", "d"] and store.count() == 5
        assert store.item_counts() == {"a": 1, "b": 1, "c": 1, "d": 2}
    with sqlite3.connect(path) as conn:  # a store written by an older version, with a repeat in it
        conn.execute("INSERT INTO events (user_id, item_id, timestamp, event, recorded) VALUES ('u', 'a', 1, 'x', 0)")
    with EventStore(path) as store:
        assert store.history("u")[0] == ["a", "b", "c", "d", "d"]
    assert len(load_interactions(path).user) == 5


def test_a_store_made_before_item_counts_gets_them_from_its_events(tmp_path):
    import sqlite3

    path = tmp_path / "events.sqlite"
    with EventStore(path, create=True) as store:
        store.add_many([("u1", "a", 1, None), ("u2", "a", 2, None), ("u2", "b", 3, None)])
    with sqlite3.connect(path) as conn:  # as an older version left it: no counts table, no triggers
        conn.executescript("DROP TRIGGER item_counts_insert; DROP TRIGGER item_counts_delete; DROP TABLE item_counts;")
    with EventStore(path) as store:
        assert store.item_counts() == {"a": 2, "b": 1}
        store.add("u3", "b", timestamp=4)
        assert store.item_counts() == {"a": 2, "b": 2}

def test_recommend_cli_json_and_table(trained, log, tmp_path, capsys):
    from client.cli import main

    run, data = trained
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in zip(log.user, log.item, log.timestamp)))
    user = str(data.user_ids[0])
    args = ["recommend", "--model", str(run), "--data-path", str(csv), "--user", user]
    assert main([*args, "--k", "3", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["items"]) == 3 and out["items"][0]["explanation"]["reason"]
    assert main(["recommend", "--model", str(run), "--data-path", str(csv), "--user", user, "--k", "2"]) == 0
    assert "because you watched" in capsys.readouterr().out
    assert main(["recommend", "--model", str(tmp_path / "nothing"), "--data-path", str(csv), "--user", user]) == 2
    assert "error:" in capsys.readouterr().err
    # A user id the fixed log lacks is most likely a typo: the cold-start list comes with a warning naming the id
    assert main([*args[:-1], " " + user, "--k", "2"]) == 0
    assert f"warning: user ' {user}' has no events in this log (did you mean '{user}'?)" in capsys.readouterr().err
    assert main([*args, "--k", "2"]) == 0 and "warning" not in capsys.readouterr().err
    # --metadata that gives no titles (a folder without u.item / movies.dat) is refused, not "-" for every title
    empty = tmp_path / "no-metadata"
    empty.mkdir()
    assert main([*args, "--k", "2", "--metadata", str(empty)]) == 2
    assert "no item titles found" in capsys.readouterr().err
    # Titles of another catalogue: every title printed "-" without a word (a serving review); the model's own: quiet
    other, own = tmp_path / "other" / "u.item", tmp_path / "own" / "u.item"
    for path, ids in ((other, ["9001", "9002"]), (own, data.catalogue.tolist())):
        path.parent.mkdir()
        path.write_text("".join(f"{i}|Film {i} (1999)|01-Jan-1999||http://x|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                for i in ids), encoding="latin-1")
    assert main([*args, "--k", "2", "--metadata", str(other)]) == 0
    assert f"has titles for 0 of the {len(data.catalogue)} items" in capsys.readouterr().err
    assert main([*args, "--k", "2", "--metadata", str(own)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_recommend_on_the_built_in_synthetic_log_of_a_quick_start_model(trained, monkeypatch, tmp_path, capsys):
    # An onboarding review: `make run` trains on synthetic data, and `--data-path synthetic` was "no such file"
    from client.cli import main
    from client.recommend import LogHistory, Recommender

    run, data = trained  # its config: synthetic-users 1000, synthetic-items 300, seed 5 (CFG)
    monkeypatch.chdir(tmp_path)  # no file named "synthetic" here
    gm = load_global_model(run)
    expected = generate_synthetic(num_users=int(gm.config["synthetic-users"]),
                                  num_items=int(gm.config["synthetic-items"]), seed=int(gm.config["seed"]))
    user = str(expected.user[0])
    assert main(["recommend", "--model", str(run), "--data-path", "synthetic", "--user", user, "--k", "3",
                 "--format", "json", "--no-explain"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_hand = Recommender(gm).recommend(user, LogHistory(expected), 3, explain=False)
    assert [r["item_id"] for r in out["items"]] == [r.item_id for r in by_hand.items]
    assert out["history_length"] == by_hand.history_length > 0


def test_recommend_on_synthetic_refuses_a_model_trained_on_another_dataset(trained, monkeypatch, tmp_path, capsys):
    # A journey review: an ML-100K model over a rebuilt synthetic log printed nonsense with exit 0
    from client.cli import main

    run, _ = trained
    monkeypatch.chdir(tmp_path)
    blob = torch.load(run / "model.pt", weights_only=True)
    torch.save({**blob, "config": {**blob["config"], "dataset": "/data/ml-100k"}}, tmp_path / "model.pt")
    assert main(["recommend", "--model", str(tmp_path / "model.pt"), "--data-path", "synthetic", "--user", "7"]) == 2
    out, err = capsys.readouterr()
    assert not out and err == (f"error: model {tmp_path / 'model.pt'} was trained on /data/ml-100k, not synthetic "
                               "data; give this partner's own log with --data-path\n")
    # a deployed run's model keeps dataset = "synthetic" (only simulated partners read it) beside its published
    # catalogue, and was taken for the built-in data (a partner review)
    torch.save({**blob, "config": {**blob["config"], "catalogue": "/srv/catalogue.txt"}}, tmp_path / "model.pt")
    assert main(["recommend", "--model", str(tmp_path / "model.pt"), "--data-path", "synthetic", "--user", "7"]) == 2
    assert "trained over the published catalogue /srv/catalogue.txt" in capsys.readouterr().err


# -- the HTTP API on a real uvicorn server ------------------------------------------------------


@pytest.fixture
def api(trained, log, tmp_path):
    """uvicorn serving the API on 127.0.0.1 in a thread; stopped after the test."""
    import uvicorn

    from client.serve import create_app

    run, _ = trained
    model_dir = tmp_path / "runs" / "r1"
    model_dir.mkdir(parents=True)
    (model_dir / "model.pt").write_bytes((run / "model.pt").read_bytes())
    store = EventStore(tmp_path / "events.sqlite", create=True)
    store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), [None] * len(log)))
    app = create_app(model=tmp_path / "runs", store=store, reload_interval=0.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield client, store, tmp_path
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        store.close()


def test_api_round_trip_feedback_is_stored_and_excluded(api, trained):
    client, store, tmp_path = api
    _, data = trained
    user = str(data.user_ids[2])

    first = client.get(f"/users/{user}/recommendations", params={"k": 5})
    assert first.status_code == 200
    body = first.json()
    assert not body["cold_start"] and len(body["items"]) == 5
    assert all(item["explanation"]["reason"] for item in body["items"])
    top = body["items"][0]["item_id"]

    now = int(time.time())  # (later than the log; a day ahead of the server's clock is refused)
    posted = client.post("/events", json={"user_id": user, "item_id": top, "timestamp": now})
    assert posted.status_code == 201

    with EventStore(tmp_path / "events.sqlite") as reader:  # a second connection: the row is committed
        items, times = reader.history(user)
    assert items[-1] == top and times[-1] == now
    # The same user, item and second again with another rating: said to be a duplicate, not "201 stored" (a review)
    again = client.post("/events", json={"user_id": user, "item_id": top, "timestamp": now, "rating": 5})
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["id"] == posted.json()["id"]

    again = client.get(f"/users/{user}/recommendations", params={"k": 5, "explain": "false"}).json()
    assert top not in [item["item_id"] for item in again["items"]]
    assert "explanation" not in again["items"][0]
    assert client.get("/health").json()["events"] == store.count()


def test_api_cold_start_user_is_labelled_and_learns_from_events(api, trained):
    client, _, _ = api
    _, data = trained
    cold = client.get("/users/brand-new/recommendations", params={"k": 3}).json()
    assert cold["cold_start"] and cold["strategy"] == "popularity" and len(cold["items"]) == 3
    slash = client.get("/users/team%2F7/recommendations", params={"k": 3})  # an id with "/" was a 404
    assert slash.status_code == 200 and slash.json()["user_id"] == "team/7"
    item = str(data.catalogue[0])
    assert client.post("/events", json={"user_id": "brand-new", "item_id": item}).status_code == 201
    warm = client.get("/users/brand-new/recommendations", params={"k": 3}).json()
    assert not warm["cold_start"] and item not in [i["item_id"] for i in warm["items"]]
    assert warm["items"][0]["explanation"]["because"][0]["item"] == f"item {item}"


@pytest.mark.parametrize("request_args, field", [
    (("GET", "/users/1/recommendations", {"params": {"k": 0}}), "k"),
    (("GET", "/users/1/recommendations", {"params": {"k": "ten"}}), "k"),
    (("GET", "/users/1/recommendations", {"params": {"explain": "maybe"}}), "explain"),
    (("POST", "/events", {"json": {"user_id": "1"}}), "item_id"),
    (("POST", "/events", {"json": {"user_id": "", "item_id": "1"}}), "user_id"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "no-such-item"}}), "item_id"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": -5}}), "timestamp"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": 10**29}}), "timestamp"),  # was a 500
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": True}}), "timestamp"),  # was 1970
    (("POST", "/events", {"content": b"{not json", "headers": {"content-type": "application/json"}}), "not valid JSON"),
    # 201 must mean the event trains: the log reader drops or merges these (review, eleventh session)
    (("POST", "/events", {"json": {"user_id": " 1", "item_id": "1"}}), "user_id: Value error, must not start"),
    (("POST", "/events", {"json": {"user_id": "a\x00", "item_id": "1"}}), "user_id: Value error, must not"),
    (("POST", "/events", {"json": {"user_id": "NaN", "item_id": "1"}}), "reads as a missing id"),
    # a journey review: GET answered ids POST refuses with a silent cold-start list
    (("GET", "/users/42%20/recommendations", {}), "user_id: Value error, must not start or end with spaces"),
    (("GET", "/users/42%00/recommendations", {}), "user_id: Value error, must not start or end with spaces"),
    (("GET", "/users/nan/recommendations", {}), "user_id: Value error, 'nan' reads as a missing id"),
    # a serving review: an empty id and bytes that are not UTF-8 answered a cold-start list
    (("GET", "/users//recommendations", {}), "user_id: Value error, must not be empty"),
    (("GET", "/users/%FF%FE/recommendations", {}), "user_id: Value error, must be UTF-8 text"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": 2**62}}), "timestamp"),
    # a serving review: a time in milliseconds was stored, and stayed the user's last event for good
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": int(time.time() * 1000)}}),
     "more than a day in the future (milliseconds? give unix seconds)"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "timestamp": int(time.time()) + 10**8}}),
     "more than a day in the future"),
    # {"detail": ...} from Starlette before, not the documented {"error": ...}
    (("POST", "/events", {"content": b'{"user_id": "\xff", "item_id": "1"}',
                          "headers": {"content-type": "application/json"}}), "not valid UTF-8 JSON"),
    (("GET", "/no/such/path", {}), "no such endpoint: /no/such/path"),
    # a serving review: 201, then the training log reader dropped a rating beyond float32's range
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "rating": 1e39}}), "float32"),
    # a serving review: a 200 MB body was read whole into memory (Content-Length, or chunked)
    (("POST", "/events", {"content": b'{"user_id": "1", "item_id": "1", "pad": "' + b"x" * 70_000 + b'"}',
                          "headers": {"content-type": "application/json"}}), "body: over 65536 bytes"),
    (("POST", "/events", {"content": iter([b'{"user_id": "1", "item_id": "1", "pad": "', b"x" * 70_000, b'"}']),
                          "headers": {"content-type": "application/json"}}), "body: over 65536 bytes"),
    (("DELETE", "/events", {}), "Method Not Allowed"),
    # a misspelt field was dropped in silence: the rating lost, or the event stored at "now"
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "ratng": 4}}),
     "ratng: not a field of an event (user_id, item_id, timestamp, rating, event)"),
    (("POST", "/events", {"json": {"user_id": "1", "item_id": "1", "time": 881250949}}), "time: not a field"),
    # a bad-input review: curl -d sends a form type, and the answer was "Input should be a valid dictionary"
    (("POST", "/events", {"content": b'{"user_id": "1", "item_id": "1"}',
                          "headers": {"content-type": "application/x-www-form-urlencoded"}}),
     "send it with Content-Type: application/json (this request: application/x-www-form-urlencoded)"),
    (("POST", "/events", {"content": b'{"user_id": "1", "item_id": "1"}'}), "Content-Type: application/json"),
])
def test_api_bad_requests_get_4xx_with_a_clear_message(api, request_args, field):
    client, store, _ = api
    before = store.count()
    method, url, kwargs = request_args
    response = client.request(method, url, **kwargs)
    assert 400 <= response.status_code < 500
    assert field in response.json()["error"]
    assert store.count() == before


def test_a_slow_store_read_does_not_freeze_other_requests(api, trained):
    # A serving review: the recommendations endpoint ran on the event loop, so while another process held
    # SQLite's exclusive lock (an import committing) every request waited, /health and 404s included
    import sqlite3

    client, _, tmp_path = api
    lock = sqlite3.connect(tmp_path / "events.sqlite", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    waiting = threading.Thread(target=lambda: client.get("/users/new-user/recommendations", params={"k": 3}))
    try:
        waiting.start()
        time.sleep(0.5)  # the request is now waiting for the lock
        start = time.monotonic()
        assert client.get("/no/such/path").status_code == 404
        elapsed = time.monotonic() - start
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        waiting.join(timeout=30)
    assert elapsed < 3.0, elapsed  # it took the lock's whole wait (30 s) before


def test_api_responses_are_not_cached_and_the_bearer_scheme_is_case_insensitive(trained, tmp_path):
    from fastapi.testclient import TestClient

    from client.serve import create_app

    run, _ = trained
    token = "t" * 20
    with EventStore(tmp_path / "e.sqlite", create=True) as store, TestClient(
            create_app(model=run, store=store, api_token=token)) as client:
        for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme name is case-insensitive
            response = client.get("/users/u/recommendations", headers={"Authorization": f"{scheme} {token}"})
            assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
        assert client.get("/health", headers={"Authorization": f"Basic {token}"}).status_code == 401
        assert client.get("/health", headers={"Authorization": f"Bearer {token}x"}).status_code == 401


def test_api_hot_reloads_a_newer_model(api, trained):
    client, _, tmp_path = api
    run, data = trained
    before = client.get("/health").json()["model"]
    cfg = resolve_config(None, CFG)
    other = new_model({**cfg, "seed": 99}, data.num_items)  # different weights, same catalogue
    time.sleep(0.02)
    save_model(tmp_path / "runs" / "r2", other, data.catalogue, cfg)
    after = client.get("/health").json()["model"]
    assert after["path"].endswith("r2/model.pt") and after["version"] > before["version"] and after["reloads"] == 1
    user = str(data.user_ids[0])
    served = client.get(f"/users/{user}/recommendations", params={"k": 3, "explain": "false"}).json()
    assert served["model_version"] == after["version"]


def test_an_event_for_an_item_of_a_newer_model_is_taken_without_a_get_first(api, trained):
    # POST /events checked the item against the model loaded at the last GET: after add-items an event for a
    # new item got a 422 until some GET reloaded (a review)
    client, store, tmp_path = api
    run, data = trained
    cfg = resolve_config(None, CFG)
    catalogue = np.append(data.catalogue, "published-today")  # the newer model knows one more item
    time.sleep(0.02)
    save_model(tmp_path / "runs" / "r2", new_model(cfg, data.num_items + 1), catalogue, cfg)
    posted = client.post("/events", json={"user_id": str(data.user_ids[0]), "item_id": "published-today"})
    assert posted.status_code == 201, posted.text
    assert client.get("/health").json()["model"]["path"].endswith("r2/model.pt")


def test_a_rollback_to_an_older_model_file_is_served(trained, tmp_path):
    # A serving review: a backup restored with its old time (mv, cp -p, rsync -a) was never loaded
    import os

    from fastapi.testclient import TestClient

    from client.serve import create_app

    run, data = trained
    cfg = resolve_config(None, CFG)
    backup = save_model(tmp_path / "backup", new_model({**cfg, "seed": 99}, data.num_items), data.catalogue, cfg)
    os.utime(backup, (1_000_000_000, 1_000_000_000))  # an old file
    served = tmp_path / "srv" / "model.pt"
    served.parent.mkdir()
    served.write_bytes((run / "model.pt").read_bytes())
    with EventStore(tmp_path / "e.sqlite", create=True) as store, TestClient(
            create_app(model=served, store=store, reload_interval=0.0)) as client:
        assert client.get("/health").json()["model"]["version"] > 1_000_000_000
        tmp = served.with_name("incoming.pt")
        tmp.write_bytes(backup.read_bytes())
        os.utime(tmp, (1_000_000_000, 1_000_000_000))
        os.replace(tmp, served)
        health = client.get("/health").json()["model"]
        assert health["version"] == 1_000_000_000 and health["reloads"] == 1
        # Another model with the very same time (cp -p, rsync -a, coarse timestamps): loaded too (a diff review)
        tmp.write_bytes((run / "model.pt").read_bytes())
        os.utime(tmp, ns=(1_000_000_000 * 10**9, 1_000_000_000 * 10**9))
        os.replace(tmp, served)
        assert client.get("/health").json()["model"]["reloads"] == 2


def test_api_refuses_to_switch_to_another_catalogues_model(api, trained):
    client, _, tmp_path = api
    _, data = trained
    before = client.get("/health").json()["model"]
    cfg = resolve_config(None, CFG)
    foreign = np.array([f"other-{i}" for i in range(len(data.catalogue))])
    time.sleep(0.02)
    save_model(tmp_path / "runs" / "foreign", new_model(cfg, len(foreign)), foreign, cfg)
    health = client.get("/health").json()["model"]
    assert health["version"] == before["version"] and health["reloads"] == 0
    assert f"lacks {len(data.catalogue)} of the {len(data.catalogue)} items" in health["last_error"]


def test_api_reads_while_a_write_waits_and_a_busy_store_is_a_503(api, trained):
    import sqlite3

    client, store, tmp_path = api
    _, data = trained
    user, item = str(data.user_ids[0]), str(data.catalogue[0])
    blocker = sqlite3.connect(tmp_path / "events.sqlite", isolation_level=None)
    try:
        # A POST waits for another process's write lock: a GET is served meanwhile (it froze behind it before)
        store._conn.execute("PRAGMA busy_timeout = 30000")
        blocker.execute("BEGIN IMMEDIATE")
        posted: dict = {}
        writer = threading.Thread(target=lambda: posted.update(r=client.post("/events", json={"user_id": user,
                                                                                              "item_id": item})))
        writer.start()
        time.sleep(0.3)  # the POST is now waiting for SQLite's lock (held until the ROLLBACK below)
        read = client.get(f"/users/{user}/recommendations", params={"k": 3, "explain": "false"})
        assert read.status_code == 200 and writer.is_alive()
        blocker.execute("ROLLBACK")
        writer.join(timeout=30)
        assert posted["r"].status_code == 201
        # Held past SQLite's wait: a JSON 503 (a plain-text 500 before), nothing stored
        store._conn.execute("PRAGMA busy_timeout = 200")
        blocker.execute("BEGIN IMMEDIATE")
        busy = client.post("/events", json={"user_id": user, "item_id": item, "timestamp": 123})  # a new event
        assert busy.status_code == 503 and "busy" in busy.json()["error"]
    finally:
        if blocker.in_transaction:
            blocker.execute("ROLLBACK")
        blocker.close()


def test_api_keeps_serving_when_a_new_file_has_the_right_keys_but_no_weights(api, trained):
    client, _, tmp_path = api
    run, data = trained
    before = client.get("/health").json()["model"]
    blob = torch.load(run / "model.pt", weights_only=False)
    blob["state_dict"] = None  # fedrec's layout, unusable payload (was an AttributeError: a 500 per request)
    time.sleep(0.02)
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    torch.save(blob, tmp_path / "runs" / "broken" / "model.pt")
    user = str(data.user_ids[0])
    response = client.get(f"/users/{user}/recommendations", params={"k": 3, "explain": "false"})
    assert response.status_code == 200 and response.json()["model_version"] == before["version"]
    health = client.get("/health").json()["model"]
    assert health["version"] == before["version"] and "not a mapping of weights" in health["last_error"]
    # The bad file removed: the error is over (it stayed in /health while the good model served; a review)
    import shutil

    shutil.rmtree(tmp_path / "runs" / "broken")
    health = client.get("/health").json()["model"]
    assert health["version"] == before["version"] and health["last_error"] is None


# -- incremental update: DP fine-tune on the newest events, on the partner's ledger --------------


def test_finetune_spends_on_the_same_ledger_and_refuses_past_the_budget(trained, log, tmp_path, capsys):
    from opacus.accountants import RDPAccountant

    from client.finetune import finetune_partner
    from client.privacy_ledger import Calibration, PrivacyLedger
    from common.errors import PrivacyError

    # Prepare: the partner's store, then new events for 40 users after the model was published
    run, data = trained
    store_path, since = store_with_new_events(tmp_path, log, data)
    ledger = tmp_path / "ledger.sqlite"

    # Execute
    report = finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=2,
                              batch_size=8, noise_multiplier=1.2, target_epsilon=20.0, seed=3)

    # Assert: a new ledger is announced (a mistyped path checked an empty budget in silence)
    assert report["ledger-created"] and f"warning: new privacy ledger {ledger}" in capsys.readouterr().err
    # the ledger holds exactly this fine-tune, and its epsilon is Opacus' for that history
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        history = opened.history()
    steps = -(-report["train-users"] // 8)
    assert sum(n for _, _, n in history) == 2 * steps == report["steps"]
    assert all(s == 1.2 and q == pytest.approx(1 / steps) for s, q, _ in history)
    acc = RDPAccountant()
    acc.history = [(s, q, n) for s, q, n in history]
    assert report["epsilon-ledger"] == pytest.approx(acc.get_epsilon(report["delta"]), rel=1e-3)
    assert report["users"] == 40 and set(report["global"]) == set(report["finetuned"]) == {"hr@10", "ndcg@10"}
    tuned = load_global_model(report["finetuned-model"])
    assert not torch.equal(tuned.model.item_emb.weight, load_global_model(run).model.item_emb.weight)

    # A second fine-tune that would pass a lower budget is refused and spends nothing
    with pytest.raises(PrivacyError, match="budget exhausted"):
        finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=2, batch_size=8,
                         noise_multiplier=1.2, target_epsilon=report["epsilon-ledger"] + 0.01, force=True)
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        assert opened.history() == history
        # a federated run on this ledger was budgeted at epsilon 2 (its calibration says so) ...
        opened.save_calibration("federated", Calibration(1.0, 2.0, 1e-5, "rdp", 0.1, 10, 1))
    # ... so a fine-tune without --target-epsilon keeps to 2 (it took a default of 8 before)
    with pytest.raises(PrivacyError, match=r"budget exhausted: epsilon \d+\.\d+ of 2 spent"):
        finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=2, batch_size=8,
                         noise_multiplier=1.2, force=True)
    # ... and a delta of 1 / users or more (which would re-account the ledger as nearly unspent) is refused
    with pytest.raises(PrivacyError, match="target-delta = 0.5 is at least 1 /"):
        finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=2, batch_size=8,
                         noise_multiplier=1.2, target_epsilon=1000.0, target_delta=0.5, force=True)
    # ... and the spend is stated at the smallest delta a run on this ledger promised, not the default
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        opened.save_calibration("strict", Calibration(1.0, 1000.0, 1e-9, "rdp", 0.1, 10, 1))
    strict = finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=1,
                              batch_size=8, noise_multiplier=1.2, target_epsilon=1000.0, force=True)
    assert strict["delta"] == 1e-9


def test_finetune_keeps_to_the_supernodes_max_epsilon_and_warns_of_an_empty_ledger_on_retry(trained, log, tmp_path,
                                                                                           capsys):
    # The node config max-epsilon capped federated rounds only: `finetune --target-epsilon 20` spent the same
    # ledger past it. And a refused first fine-tune made the ledger, so a retry no longer said it was new (a review)
    from client.finetune import finetune_partner
    from client.privacy_ledger import PrivacyLedger
    from common.errors import PrivacyError

    run, data = trained
    store_path, since = store_with_new_events(tmp_path, log, data)
    ledger = tmp_path / "ledger.sqlite"
    options = dict(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=1, batch_size=8, force=True)
    with pytest.raises(PrivacyError, match="budget exhausted"):  # a first attempt, refused: it leaves the ledger
        finetune_partner(**options, noise_multiplier=0.5, target_epsilon=0.01)
    assert ledger.exists()
    capsys.readouterr()
    report = finetune_partner(**options, noise_multiplier=5.0, target_epsilon=20.0)
    assert report["ledger-created"] and f"privacy ledger {ledger} holds no spend yet" in capsys.readouterr().err
    spent = report["epsilon-ledger"]
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        opened.record_max_epsilon(spent + 1.0)  # what the partner's SuperNode records (tests/test_privacy_ledger.py)
        history = opened.history()
    with pytest.raises(PrivacyError, match=rf"--target-epsilon 20 is above this partner's max-epsilon {spent + 1:g}"):
        finetune_partner(**options, noise_multiplier=5.0, target_epsilon=20.0)
    again = finetune_partner(**options, noise_multiplier=5.0)  # no target: the cap is the budget
    assert again["target-epsilon"] == pytest.approx(spent + 1.0) and not again["ledger-created"]
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        assert len(opened.history()) == len(history) + 1  # the refusal spent nothing, the second one is recorded


def store_with_new_events(tmp_path: Path, log, data) -> tuple[Path, int]:  # noqa: ANN001
    """The partner's event store: its log, then one new event for each of 40 users after the model
    was published. Returns (store path, the first new event's timestamp)."""
    store_path = tmp_path / "events.sqlite"
    since = int(log.timestamp.max()) + 1
    with EventStore(store_path, create=True) as store:
        store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), [None] * len(log)))
        for n, user in enumerate(data.user_ids[:40].tolist()):
            store.add(user, str(data.catalogue[n % data.num_items]), timestamp=since + n)
    return store_path, since


def report_fingerprint(store_path: Path, run: Path) -> str:
    """The fingerprint the partner's supernode would give this store (common/task.py)."""
    from common.task import partner_data

    catalogue = load_global_model(run).catalogue
    (run / "catalogue.txt").write_text("\n".join(catalogue.tolist()) + "\n")
    cfg = resolve_config(None, {"catalogue": str(run / "catalogue.txt")})
    return partner_data(cfg, {"data-path": str(store_path)}).fingerprint()


# -- the feedback loop through the ClientApp: a store as data-path, one ledger across rounds ------


@pytest.mark.slow
def test_clientapp_trains_next_round_on_feedback_with_the_same_ledger(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from client.app import make_client_app
    from client.privacy_ledger import PrivacyLedger
    from common.task import partner_data
    from tests.conftest import flower_message

    # Prepare: a partner whose data-path is its event store, a published catalogue, its own ledger
    log = generate_synthetic(num_users=64, num_items=30, mean_length=8, seed=2)
    store_path, ledger = tmp_path / "events.sqlite", tmp_path / "ledger.sqlite"
    with EventStore(store_path, create=True) as store:
        store.add_many(zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist(), [None] * len(log)))
    catalogue = build_sequences(log).catalogue
    (tmp_path / "catalogue.txt").write_text("\n".join(catalogue.tolist()) + "\n")
    overrides = {**CFG, "catalogue": str(tmp_path / "catalogue.txt"), "local-epochs": 1, "batch-size": 8,
                 "num-server-rounds": 3, "run-dir": str(tmp_path / "runs")}
    cfg = resolve_config(None, overrides)
    node = {"data-path": str(store_path), "ledger-path": str(ledger)}
    app = make_client_app(overrides)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    arrays = ArrayRecord(new_model(cfg, len(catalogue)).state_dict())

    def train(server_round: int):
        msg = flower_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}))
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        return reply.content["metrics"]

    # The serving API holds the store open throughout: in WAL mode its commits stay in events.sqlite-wal
    # (a diff review: a ClientApp process keyed its cached log on the store file alone and missed them)
    serving = EventStore(store_path)
    first = train(1)
    # Execute: feedback arrives between rounds (a new user with 4 events via the API's store)
    time.sleep(0.01)
    for n, item in enumerate(catalogue[:4].tolist()):
        serving.add("new-user", item, timestamp=2_000_000_000 + n)
    second = train(2)
    serving.close()

    # Assert: round 2 trained on one more user (the ClientApp's cached log holds it), and both rounds are on one
    # ledger; the replies say the run's noised user count, not the new one (common/private_count.py)
    assert partner_data(cfg, node).user_ids.tolist().count("new-user") == 1
    assert second["num-examples"] == first["num-examples"] == second["dp-users"]
    with PrivacyLedger(ledger, partner_data(cfg, node).fingerprint()) as opened:
        assert opened.rounds_trained() == 2
    assert second["epsilon"] > first["epsilon"]


@pytest.mark.slow
def test_serve_command_runs_uvicorn_and_stops_on_sigterm(trained, log, tmp_path):
    import subprocess
    import sys

    run, data = trained
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in zip(log.user, log.item, log.timestamp)))
    port = free_port()
    cmd = [sys.executable, "-m", "client.cli", "serve", "--model", str(run), "--store", str(tmp_path / "e.sqlite"),
           "--import-log", str(csv), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    health = client.get("/health")
                    break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1]
                    time.sleep(0.2)
            assert health.json()["events"] == len(log)
            user = str(data.user_ids[0])
            assert len(client.get(f"/users/{user}/recommendations").json()["items"]) == 10
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=20)
    # NOTE: uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (exit status -15)
    assert server.returncode in (0, -15) and f"imported {len(log)} events" in out

    # A model path that does not exist: one error line, exit status 2, no server
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing"), "--store", str(tmp_path / "other.sqlite")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: model") and "Traceback" not in bad.stderr
    assert not (tmp_path / "other.sqlite").exists()


def test_a_log_mostly_outside_the_models_catalogue_is_warned_about(trained, log, tmp_path, capsys):
    from client.cli import main
    from client.recommend import catalogue_mismatch

    run, data = trained
    gm = load_global_model(run)
    counts = {str(i): 10 for i in data.catalogue}
    assert catalogue_mismatch(gm, counts) is None
    assert catalogue_mismatch(gm, {**counts, **{f"other-{i}": 10 for i in range(len(counts) // 4)}}) is None  # 20%
    warning = catalogue_mismatch(gm, {**counts, **{f"other-{i}": 10 for i in range(len(counts))}})
    assert warning.startswith(f"warning: 50% of the events (those on {len(counts)} of the log's {2 * len(counts)} "
                              "items) are on items not in")
    # the CLI: another federation's log (item ids shifted out of the catalogue for most events)
    other = tmp_path / "other.csv"
    other.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i if n % 3 == 0 else 'x' + str(i)},{t}" for n, (u, i, t) in enumerate(zip(log.user, log.item, log.timestamp))))
    assert main(["recommend", "--model", str(run), "--data-path", str(other), "--user", str(log.user[0]), "--k", "3"]) == 0
    assert "are on items not in the catalogue of" in capsys.readouterr().err


def test_a_restarted_serve_keeps_the_titles_it_was_filled_with(trained, log, tmp_path, monkeypatch, capsys):
    # The README's restart (no --import-log the second time) served ids only: titles were looked up beside --import-log
    import client.serve
    from client.cli import main

    run, data = trained
    served = []
    monkeypatch.setattr(client.serve, "serve", lambda app, **kw: served.append(app.state.watcher.titles))
    csv, movies = tmp_path / "log.csv", tmp_path / "movies.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in zip(log.user, log.item, log.timestamp)))
    movies.write_text("movieId,title,genres\n" + "\n".join(f"{i},Film {i},Drama" for i in data.catalogue))
    store = tmp_path / "events.sqlite"
    base = ["serve", "--model", str(run), "--store", str(store), "--port", str(free_port())]
    assert main([*base, "--import-log", str(csv), "--metadata", str(movies)]) == 0
    assert main(base) == 0  # the restart
    item = str(data.catalogue[0])
    assert served[0][item] == served[1][item] == f"Film {item}"
    # recommend on the store finds them too
    user = str(data.user_ids[0])
    assert main(["recommend", "--model", str(run), "--data-path", str(store), "--user", user, "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["items"][0]["title"].startswith("Film ")
    # titles file gone: a warning, ids only, still serving
    movies.unlink()
    assert main(base) == 0
    assert served[2] == {} and "are gone" in capsys.readouterr().err


def test_serve_loads_the_model_once_and_refuses_a_store_in_a_missing_folder(trained, tmp_path, monkeypatch, capsys):
    import client.recommend
    import client.serve
    from client.cli import main

    run, _ = trained
    loads, served = [], []
    real = client.recommend.load_global_model
    monkeypatch.setattr(client.serve, "load_global_model", lambda path: loads.append(path) or real(path))
    monkeypatch.setattr(client.serve, "serve", lambda app, **kw: served.append(app))
    store = tmp_path / "events.sqlite"
    assert main(["serve", "--model", str(run), "--store", str(store), "--port", str(free_port())]) == 0
    assert len(served) == 1 and len(loads) == 1  # the start's check and the API share one load
    capsys.readouterr()
    # a mistyped folder: one line, and nothing made
    typo = tmp_path / "evnets" / "events.sqlite"
    assert main(["serve", "--model", str(run), "--store", str(typo), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert f"the folder {typo.parent} does not exist" in err and len(err.splitlines()) == 1, err
    assert not typo.parent.exists() and len(served) == 1


def test_api_token_guards_every_endpoint_and_the_store(trained, log, tmp_path):
    from fastapi.testclient import TestClient

    from client.serve import create_app

    run, data = trained
    store = EventStore(tmp_path / "events.sqlite", create=True)
    token = "t" * 20
    app = create_app(model=run, store=store, api_token=token)
    user, item = str(data.user_ids[0]), str(data.catalogue[0])
    event = {"user_id": user, "item_id": item, "timestamp": 1}
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer " + "x" * 20}, {"Authorization": token}):
            assert client.get("/health", headers=headers).status_code == 401
            assert client.get(f"/users/{user}/recommendations", headers=headers).status_code == 401
            refused = client.post("/events", json=event, headers=headers)
            assert refused.status_code == 401 and "API token" in refused.json()["error"]
            assert refused.headers["www-authenticate"] == "Bearer"
        assert store.count() == 0  # nothing written by an unauthenticated request
        good = {"Authorization": f"Bearer {token}"}
        assert client.get("/health", headers=good).status_code == 200
        assert client.post("/events", json=event, headers=good).status_code == 201
        assert len(client.get(f"/users/{user}/recommendations", headers=good).json()["items"]) == 10
    assert store.count() == 1
    store.close()


def test_serve_refuses_a_network_host_without_a_token_before_creating_anything(trained, tmp_path, monkeypatch, capsys):
    from client.cli import main

    run, _ = trained
    store = tmp_path / "e.sqlite"
    base = ["serve", "--model", str(run), "--store", str(store)]
    monkeypatch.delenv("FEDREC_API_TOKEN", raising=False)
    assert main([*base, "--host", "0.0.0.0"]) == 2
    assert "--api-token-file" in capsys.readouterr().err
    (tmp_path / "short").write_text("abc\n")
    assert main([*base, "--host", "0.0.0.0", "--api-token-file", str(tmp_path / "short")]) == 2
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.setenv("FEDREC_API_TOKEN", "é" * 20)  # no client could send it: headers arrive as latin-1
    assert main([*base, "--host", "0.0.0.0"]) == 2
    assert "printable ASCII" in capsys.readouterr().err
    monkeypatch.delenv("FEDREC_API_TOKEN")
    assert main([*base, "--api-token-file", str(tmp_path / "missing")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main([*base, "--tls-certfile", str(tmp_path / "short")]) == 2
    assert "go together" in capsys.readouterr().err
    # PEM files that are not a certificate and its key: one line before anything starts (uvicorn's SSLError
    # came as a traceback after "serving ..." was printed; a bad-input review)
    from server.credentials import create_server_credentials

    creds = create_server_credentials(tmp_path / "certs", hosts=["localhost"])
    for cert, key, says in [(tmp_path / "short", tmp_path / "short", "not a PEM certificate and private key"),
                            (creds.server_cert, creds.ca_key, "the key is not the certificate's")]:
        assert main([*base, "--tls-certfile", str(cert), "--tls-keyfile", str(key)]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    with socket.socket() as taken:  # a port another server holds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main([*base, "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err
    assert main([*base, "--host", "no-such-host.invalid", "--no-auth"]) == 2
    assert "not an address of this machine" in capsys.readouterr().err
    assert not store.exists()
    # "::" with the port held on IPv4 only: uvicorn (asyncio, IPV6_V6ONLY) can bind it, so the check must not refuse
    from client.serving_cli import _check_port_free

    with socket.socket() as v4:
        v4.bind(("0.0.0.0", 0))
        v4.listen()
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 on this machine")
        _check_port_free("::", v4.getsockname()[1])


def test_server_cpu_is_read_from_proc_as_the_process_spends_it():
    # The latency bench's per-request server CPU is a difference of these readings
    import os

    from simulations.bench.serve_latency import cpu_seconds

    before, clock = cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - clock < 0.3:  # spend 0.3 s of CPU in this process
        pass
    spent = cpu_seconds(os.getpid()) - before
    assert 0.2 <= spent <= time.process_time() - clock + 0.05
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process (pid_max is at most 2**22)


@pytest.mark.slow
def test_latency_benchmark_measures_every_setting_over_http(tmp_path, capsys):
    from simulations.bench import serve_latency

    out = tmp_path / "serve_latency.json"
    args = ["--synthetic-users", "40", "--requests", "6", "--warmup", "2", "--chunk", "3", "--out", str(out)]
    assert serve_latency.main(args) == 0

    result = json.loads(out.read_text())
    assert [r["request"] for r in result["rows"]] == ["explain=false", "explain=true", "floor"]
    for row in result["rows"]:
        assert row["n"] == 6 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["server_cpu_ms_per_request"] >= 0
    assert "load average" in result["load"]["uptime_before"] and result["settings"]["users"] == 40
    assert "p99 ms" in capsys.readouterr().out


def test_finetune_trains_with_the_objective_the_model_was_trained_with(trained, log, tmp_path, monkeypatch):
    import client.finetune as finetune
    from common.training import train_local as real_train_local

    run, data = trained
    seen: list[tuple[bool, bool]] = []

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003
        seen.append((kwargs["exclude_seen"], kwargs["shuffle_ties"]))
        return real_train_local(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_local", spy)
    blob = torch.load(run / "model.pt", weights_only=False)
    blob["config"] = {**blob["config"], "exclude-seen": False, "shuffle-ties": True}
    other = tmp_path / "other"
    other.mkdir()
    torch.save(blob, other / "model.pt")
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())))
    for model, expected in ((run, (True, True)), (other, (False, True))):
        finetune.finetune_partner(model=model, data_path=csv, ledger_path=tmp_path / "l.sqlite", since=0,
                                  epochs=1, batch_size=8, dp=False, force=True)
        assert seen[-1] == expected
    finetune.finetune_partner(model=other, data_path=csv, ledger_path=tmp_path / "l.sqlite", since=0, epochs=1,
                              batch_size=8, dp=False, exclude_seen=True, shuffle_ties=False, force=True)
    assert seen[-1] == (True, False)  # an explicit choice wins


def test_finetune_never_overwrites_its_inputs_and_checks_out_before_spending(trained, log, tmp_path):
    from client.finetune import finetune_partner
    from common.errors import ConfigError

    run, _ = trained
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())))
    ledger, kept = tmp_path / "ledger.sqlite", tmp_path / "kept.pt"
    kept.write_bytes(b"an earlier model")
    log_bytes, model_bytes = csv.read_bytes(), (run / "model.pt").read_bytes()
    args = dict(model=run, data_path=csv, ledger_path=ledger, since=0, epochs=1, batch_size=8)
    for out, message in ((csv, "is this command's input"), (run / "model.pt", "is this command's input"),
                         (run, "is this command's input"), (tmp_path, "is a directory"),
                         (kept, "already exists; pass --force"),
                         # a folder that cannot be made (under a file; in /proc) failed after the spend was recorded
                         (kept / "sub" / "out.pt", "cannot write in .*nothing was trained or spent"),
                         (Path("/proc/fedrec-no-such-folder/out.pt"), "cannot write in /proc/fedrec-no-such-folder")):
        with pytest.raises(ConfigError, match=message):
            finetune_partner(**args, out=out, force=out != kept)  # --force never makes an input writable
    with pytest.raises(ConfigError, match="is this command's input"):
        finetune_partner(**args, out=csv, force=True)
    # Inputs given as folders: the file the loader reads there (a finetune review: --force wrote a model over a
    # MovieLens folder's u.data, and over the newest model.pt of a folder of runs)
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in
                                          zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())))
    for inputs, out in (({"data_path": folder}, folder / "u.data"), ({"model": run.parent}, run / "model.pt")):
        with pytest.raises(ConfigError, match="is this command's input"):
            finetune_partner(**{**args, **inputs}, out=out, force=True)
    # Files kept beside an input: a store's write-ahead log, a ledger's marker and lock (a review: --force wrote a
    # model over an event store's -wal, losing events not yet merged, and over a ledger's marker)
    for out in (csv.with_name(csv.name + "-wal"), ledger.with_name(ledger.name + ".created"),
                tmp_path / f".{ledger.name}.lock"):
        with pytest.raises(ConfigError, match="is a file kept beside this command's input"):
            finetune_partner(**args, out=out, force=True)
        assert not out.exists()
    # Nothing was trained, spent or written
    assert not ledger.exists() and csv.read_bytes() == log_bytes and (run / "model.pt").read_bytes() == model_bytes
    assert kept.read_bytes() == b"an earlier model" and (folder / "u.data").read_text().startswith(str(log.user[0]))


def test_tools_that_train_sequence_models_refuse_mf_in_one_line_before_writing(tmp_path, log):
    from client import finetune
    from common.errors import ConfigError
    from simulations.cold_start import main as cold_start_main

    data = build_sequences(log)
    cfg = resolve_config(None, {**CFG, "model": "mf"})
    run = save_model(tmp_path / "mf", new_model(cfg, data.num_items), data.catalogue, cfg).parent
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())))
    ledger = tmp_path / "ledger.sqlite"
    with pytest.raises(ConfigError, match='finetune .*model = "mf" is not supported here'):
        finetune.finetune_partner(model=run, data_path=csv, ledger_path=ledger, since=0, epochs=1, batch_size=8)
    assert not ledger.exists()  # refused before the ledger was created
    with pytest.raises(ConfigError, match='training: model = "mf" is not supported here'):
        train_local(new_model(cfg, data.num_items), data, epochs=1, batch_size=8, learning_rate=0.01, max_len=20)
    assert cold_start_main(["--dataset", "synthetic", "--item-features", "id", "--epochs", "1", "--run-config",
                            'synthetic-users=60 synthetic-items=20 batch-size=8 model="mf"']) == 2


def test_two_finetunes_in_one_second_are_two_runs_on_the_ledger(trained, log, tmp_path, monkeypatch):
    # Run names had one-second resolution: the second fine-tune of a second, with another plan,
    # was refused ("already calibrated ... mid-run") after it had trained
    import client.finetune as finetune
    from client.privacy_ledger import PrivacyLedger

    run, data = trained
    store_path, since = store_with_new_events(tmp_path, log, data)
    monkeypatch.setattr(finetune.time, "strftime", lambda *_: "20260101-000000")
    ledger = tmp_path / "ledger.sqlite"
    for epochs in (1, 2):
        finetune.finetune_partner(model=run, data_path=store_path, ledger_path=ledger, since=since, epochs=epochs,
                                  batch_size=8, noise_multiplier=1.2, target_epsilon=50.0, force=True)
    with PrivacyLedger(ledger, report_fingerprint(store_path, run)) as opened:
        assert len({r for r, *_ in opened._query("SELECT run FROM calibrations")}) == 2


def test_finetune_cli_without_dp_refuses_dp_flags_and_prints_strict_json(trained, log, tmp_path, capsys):
    from client.cli import main

    run, _ = trained
    csv = tmp_path / "log.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(
        f"{u},{i},{t}\n" for u, i, t in zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())))
    base = ["finetune", "--model", str(run), "--data-path", str(csv), "--ledger-path", str(tmp_path / "l.sqlite"),
            "--since", "0", "--batch-size", "8", "--no-dp"]
    # A noise or budget flag beside --no-dp would be ignored: the partner would believe it holds
    for extra, named in ((["--noise-multiplier", "5"], "--noise-multiplier"), (["--target-epsilon", "0.1"], "--target-epsilon"),
                         (["--target-delta", "1e-7", "--max-grad-norm", "2"], "--target-delta and --max-grad-norm")):
        assert main([*base, *extra, "--out", str(tmp_path / "x.pt")]) == 2
        assert f"so {named} would have no effect" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    assert main([*base, "--out", str(tmp_path / "nodp.pt")]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["dp"] is False and report["epsilon-finetune"] is None and report["ledger"] is None


def test_finetune_on_a_named_csv_log_uses_the_supernodes_ledger_as_the_log_grows(trained, log, tmp_path):
    from client.finetune import finetune_partner
    from client.privacy_ledger import PrivacyLedger
    from common.errors import ConfigError
    from common.task import partner_data

    # Prepare: the partner's CSV log with 40 new events after the model, named "acme" on its supernode
    run, data = trained
    since = int(log.timestamp.max()) + 1
    csv = tmp_path / "log.csv"
    lines = [f"{u},{i},{t}" for u, i, t in zip(log.user.tolist(), log.item.tolist(), log.timestamp.tolist())]
    lines += [f"{u},{data.catalogue[n % data.num_items]},{since + n}" for n, u in enumerate(data.user_ids[:40].tolist())]
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(lines) + "\n")
    ledger = tmp_path / "ledger.sqlite"
    report_fingerprint(csv, run)  # writes the run's catalogue.txt
    cfg = resolve_config(None, {"catalogue": str(run / "catalogue.txt")})
    supernode = partner_data(cfg, {"data-path": str(csv), "data-identity": "acme"}).fingerprint()

    # Execute: a fine-tune, then the log grows by one event and the partner fine-tunes again
    first = finetune_partner(model=run, data_path=csv, ledger_path=ledger, since=since, batch_size=8,
                             target_epsilon=20.0, data_identity="acme")
    with open(csv, "a") as fh:
        fh.write(f"{data.user_ids[0]},{data.catalogue[1]},{since + 100}\n")
    second = finetune_partner(model=run, data_path=csv, ledger_path=ledger, since=since, batch_size=8,
                              target_epsilon=20.0, data_identity="acme", force=True)

    # Assert: one ledger, under the supernode's fingerprint for the named log, holding both fine-tunes
    with PrivacyLedger(ledger, supernode) as opened:
        assert sum(n for _, _, n in opened.history()) == first["steps"] + second["steps"]
    # An event store has its own identity: a second one is refused before anything is spent
    (tmp_path / "s").mkdir()
    store, _ = store_with_new_events(tmp_path / "s", log, data)
    with pytest.raises(ConfigError, match="data-identity is for a CSV or Parquet log"):
        finetune_partner(model=run, data_path=store, ledger_path=tmp_path / "s" / "ledger.sqlite", since=since,
                         data_identity="acme")
    assert not (tmp_path / "s" / "ledger.sqlite").exists()


def test_serve_with_a_file_that_is_not_a_model_leaves_no_store_behind(tmp_path, capsys):
    # A journey review: u.item as --model was found (it exists), the store was created, then the load failed
    from client.cli import main

    text, store = tmp_path / "u.item", tmp_path / "s2.sqlite"
    text.write_text("1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|0|0|0\n")
    assert main(["serve", "--model", str(text), "--store", str(store), "--port", str(free_port())]) == 2
    assert "not a fedrec model file" in capsys.readouterr().err and not store.exists()


def test_a_bad_input_to_serve_leaves_no_store_behind(trained, log, tmp_path, monkeypatch, capsys):
    # A bad-input review: a bad --metadata was found after the import had filled the store (the next start then
    # skipped the import), and a bad --import-log turned the store file into an empty store
    import client.serve
    from client.cli import main

    run, _ = trained
    monkeypatch.setattr(client.serve, "serve", lambda app, **kw: None)
    csv, garbage = tmp_path / "log.csv", tmp_path / "garbage.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in zip(log.user, log.item, log.timestamp)))
    garbage.write_text("a,b\n1,2\n")
    store = tmp_path / "events.sqlite"
    base = ["serve", "--model", str(run), "--store", str(store), "--port", str(free_port())]
    assert main([*base, "--import-log", str(csv), "--metadata", str(garbage)]) == 2
    assert "garbage.csv" in capsys.readouterr().err and not store.exists()
    assert main([*base, "--import-log", str(garbage)]) == 2
    assert not store.exists()
    store.write_bytes(b"")  # an empty file given as the store: left as it was
    assert main([*base, "--import-log", str(garbage)]) == 2
    assert store.read_bytes() == b""
    assert main([*base, "--import-log", str(csv)]) == 0 and EventStore(store).count() > 0


def test_get_serves_a_user_id_longer_than_post_accepts(trained, tmp_path):
    # A review: GET took POST's 200-character limit, but an imported log has none: such a user got a 422
    from fastapi.testclient import TestClient

    from client.serve import create_app
    from common.data.event_store import EventStore

    run, data = trained
    long_id = "u" * 250
    store = EventStore(tmp_path / "events.sqlite", create=True)
    store.add_many([(long_id, str(data.catalogue[3]), 1, None), (long_id, str(data.catalogue[5]), 2, None)])
    with TestClient(create_app(model=run, store=store, titles={})) as client:
        answer = client.get(f"/users/{long_id}/recommendations?k=2")
    assert answer.status_code == 200 and answer.json()["user_id"] == long_id, answer.text
    assert answer.json()["strategy"] == "model"


def test_a_run_whose_every_round_failed_is_passed_over_by_name_and_folder(trained, tmp_path, caplog):
    # `recommend` / `serve --model runs` took the newest model.pt, and a run in which no round aggregated an
    # update leaves its initial (random) model there: a serving partner switched to it (a partner review)
    from flwr.app import ArrayRecord

    from server.run_report import RunRecorder

    run, data = trained
    cfg = resolve_config(None, CFG)
    good = tmp_path / "runs" / "r1"
    good.mkdir(parents=True)
    (good / "model.pt").write_bytes((run / "model.pt").read_bytes())
    for name, partners in (("r2", [1.0, None]), ("r3", [None, None])):
        time.sleep(0.02)
        (tmp_path / "runs" / name).mkdir()
        recorder = RunRecorder(tmp_path / "runs" / name, cfg, data.catalogue)
        recorder.rounds = [{"round": r + 1, "num-partners": n} for r, n in enumerate(partners)]
        recorder.save_model(ArrayRecord(new_model({**cfg, "seed": 99}, data.num_items).state_dict()))
    with caplog.at_level("WARNING", logger="fedrec.recommend"):
        assert find_model_file(tmp_path / "runs") == tmp_path / "runs" / "r2" / "model.pt"  # one round aggregated
        (tmp_path / "runs" / "r2" / "model.pt").unlink()
        assert find_model_file(tmp_path / "runs") == good / "model.pt"  # the newest trained model
        load_global_model(tmp_path / "runs" / "r3")  # asked for by name: loaded, with a warning
    warned = [r.getMessage() for r in caplog.records]
    assert any("passing over" in m and "r3" in m for m in warned)
    assert any("initial (untrained) model" in m and "r3" in m for m in warned)
    (good / "model.pt").unlink()
    with pytest.raises(DataError, match="no trained model: every model.pt under it is from a run in which no round"):
        find_model_file(tmp_path / "runs")


def test_a_finetunes_default_delta_tells_only_the_order_of_magnitude_of_the_users():
    # It is saved as a calibration, and a SuperNode's later replies state the ledger's smallest delta: 0.1 / users
    # of the exact count told the coordinator that count, which the noised count hides (a red-team review)
    from client.finetune import finetune_default_delta

    assert [finetune_default_delta(n) for n in (3, 10_000, 12_345, 19_992, 20_000, 100_000)] == [
        1e-5, 1e-5, 1e-6, 1e-6, 1e-6, 1e-6]
    assert all(finetune_default_delta(n) <= min(1e-5, 0.1 / n) for n in range(1, 300_000, 977))  # never looser


def test_a_damaged_event_store_is_a_json_503_not_a_plain_500(api, monkeypatch):
    # A store overwritten in its middle answered "500 Internal Server Error" in plain text, /health too (a review)
    import sqlite3

    client, store, _ = api
    assert client.get("/users/1/recommendations").status_code == 200

    def damaged(*a, **k):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(store, "history", damaged)
    store._cache.clear()
    reply = client.get("/users/1/recommendations")
    assert reply.status_code == 503 and "is damaged (database disk image is malformed)" in reply.json()["error"]


def test_an_empty_file_is_made_a_private_store_only_where_a_store_is_asked_for(tmp_path):
    # A touched file was filled with users' events at its 0644; a reader (recommend) made it a store (a review)
    import stat

    from common.errors import DataError

    empty = tmp_path / "events.sqlite"
    empty.touch()
    empty.chmod(0o644)
    with pytest.raises(DataError, match="an empty file, not an event store"):
        EventStore(empty)
    assert empty.stat().st_size == 0
    with EventStore(empty, create=True) as store:
        store.add("u", "i", timestamp=1)
    assert stat.S_IMODE(empty.stat().st_mode) == 0o600


def test_a_model_file_cut_short_is_said_to_be_so(trained, tmp_path):
    # torch's OSError(22) on a cut file read "cannot read it (Invalid argument)", as if a permission problem (a review)
    from client.recommend import load_global_model
    from common.errors import DataError

    run, _ = trained
    whole = (run / "model.pt").read_bytes()
    cut = tmp_path / "model.pt"
    for size in (len(whole) // 4, len(whole) // 2, len(whole) - 100):
        cut.write_bytes(whole[:size])
        with pytest.raises(DataError, match=r"model .*model.pt: (cut short or damaged|not a fedrec model file .*cut short)"):
            load_global_model(cut)


def test_a_time_features_models_influence_is_the_event_never_having_happened():
    # An explanations review: removals kept every recorded time gap, and for a few percent of named reasons
    # the score rose when the event was removed with the next gap re-derived from the timestamps
    from common.models.context import model_inputs, time_gap_buckets
    from common.models.sasrec import SASRec

    torch.manual_seed(0)
    model = SASRec(30, max_len=8, dim=16, num_blocks=1, dropout=0.0, time_features=True).eval()
    rng = np.random.default_rng(0)
    history = rng.integers(1, 31, size=11)
    times = np.cumsum(rng.integers(0, 5000, size=11))
    gaps = time_gap_buckets(times)
    targets = [2, 7, 19]
    positions, influence = leave_one_out(model, history, gaps, targets, 8, times=times)
    assert positions.tolist() == list(range(3, 11))
    base = model.score(model_inputs(model, [history], 8, [gaps]))[0]
    moved = 0
    for row, p in enumerate(positions):
        without = np.delete(history, p)
        rederived = model.score(model_inputs(model, [without], 8, [time_gap_buckets(np.delete(times, p))]))[0]
        kept = model.score(model_inputs(model, [without], 8, [np.delete(gaps, p)]))[0]
        assert influence[row].tolist() == pytest.approx((base[targets] - rederived[targets]).tolist(), abs=1e-5)
        moved += not torch.allclose(rederived[targets], kept[targets], atol=1e-4)
    assert moved  # the two counterfactuals differ here, so the test tells them apart


def test_a_table_says_why_it_is_empty_and_what_a_cold_start_score_counts():
    # An explanations review: "user a: 0 recommendations from 40 events" with no reason, and a cold-start
    # "score" column of event counts (583.0, 509.0) that said nothing of what it held
    from client.recommend import Recommendation, RecommendationList, format_table

    empty = format_table(RecommendationList("a", [], cold_start=False, strategy="model", history_length=40))
    assert empty.splitlines()[0] == ("user a: 0 recommendations from 40 events (the user has had every item of "
                                     "the catalogue: none is left to recommend)")
    cold = format_table(RecommendationList("b", [Recommendation("7", "Heat", 583.0)], cold_start=True,
                                           strategy="popularity", history_length=0, popular=1))
    assert cold.splitlines()[1].split() == ["rank", "item", "events", "title", "/", "reason"]
    assert "583.000" in cold
