"""`fedrec-server add-items`: a trained text model serves items published after training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.recommend import load_global_model
from common.config import resolve_config
from common.item_text import save_features
from server.cli import main as server_main

OLD = ["10", "20", "30"]
NEW = ["40", "50"]
DIM = 6


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture()
def trained(tmp_path):
    """An id+text model (tied IDs) with non-zero ID rows, saved as a run's model.pt, and the
    coordinator's files for the grown catalogue: old items first, new ones appended."""
    from common.models import build_model

    emb = unit_rows(len(OLD) + len(NEW), seed=3)
    save_features(tmp_path / "text_v1.npz", np.array(OLD), emb[:3], model="enc", texts=OLD)
    save_features(tmp_path / "text_v2.npz", np.array(OLD + NEW), emb, model="enc", texts=OLD + NEW)
    (tmp_path / "catalogue_v1.txt").write_text("\n".join(OLD) + "\n")
    (tmp_path / "catalogue_v2.txt").write_text("\n".join(OLD + NEW) + "\n")
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue_v1.txt"), "item-features": "id+text",
                                "item-text-features": str(tmp_path / "text_v1.npz"), "tied-output": True,
                                "embedding-dim": 8, "max-seq-len": 5, "num-blocks": 1, "dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, len(OLD), catalogue=np.array(OLD))
    with torch.no_grad():
        model.item_emb.ids.weight[1:].normal_()  # learned ID rows: the new items must not borrow any
    torch.save({"state_dict": model.state_dict(), "catalogue": OLD, "config": dict(cfg)}, tmp_path / "model.pt")
    return tmp_path, model.eval(), emb


def grow(tmp_path, *extra: str, catalogue: str = "catalogue_v2.txt", features: str = "text_v2.npz") -> int:
    return server_main(["add-items", "--model", str(tmp_path), "--catalogue", str(tmp_path / catalogue),
                        "--item-text-features", str(tmp_path / features), "--out", str(tmp_path / "model_v2.pt"), *extra])


def test_new_items_are_scored_by_their_text_and_old_scores_are_unchanged(trained, capsys):
    tmp_path, before, emb = trained
    assert grow(tmp_path) == 0
    assert "added 2 items (first '40')" in capsys.readouterr().out
    served = load_global_model(tmp_path / "model_v2.pt")
    assert served.catalogue.tolist() == OLD + NEW and served.index["50"] == 5
    histories = torch.tensor([[0, 0, 1, 3, 2]])
    after = served.model.score(histories)
    assert after.shape == (1, len(OLD + NEW) + 1)
    torch.testing.assert_close(after[:, : len(OLD) + 1], before.score(histories))  # weights unchanged
    # A new item's score, computed by hand: query(h) . text[new] (its ID rows are zero)
    h = before.hidden(histories)[:, -1]
    by_hand = before.output.query(h) @ torch.as_tensor(emb[len(OLD):]).T
    torch.testing.assert_close(after[:, len(OLD) + 1:], by_hand)
    assert not served.model.item_emb.ids.weight[len(OLD) + 1:].any()
    # As a new item enters a history, the model reads it through its text
    longer = torch.tensor([[0, 1, 3, 2, 4]])
    assert not torch.equal(served.model.score(longer)[:, 1:4], after[:, 1:4])
    # Serving: a partner's event on a new item counts in the history, and explanations run
    from client.recommend import LogHistory, Recommender
    from common.data.loaders import Interactions

    log = Interactions(user=np.array(["u", "u"]), item=np.array(["10", "40"]), timestamp=np.array([1, 2]), rating=None, source="events")
    recs = Recommender(served).recommend("u", LogHistory(log), k=3)
    assert not recs.cold_start and recs.history_length == 2
    assert {r.item_id for r in recs.items}.isdisjoint({"10", "40"}) and len(recs.items) == 3


def test_the_grown_model_names_its_files_by_absolute_path(trained, monkeypatch, capsys):
    # a coordinator review: run from the files' folder with relative names, the model was unservable elsewhere
    tmp_path, _, _ = trained
    monkeypatch.chdir(tmp_path)
    assert server_main(["add-items", "--model", ".", "--catalogue", "catalogue_v2.txt", "--item-text-features",
                        "text_v2.npz", "--out", "model_v2.pt"]) == 0
    assert f"partners need {tmp_path / 'catalogue_v2.txt'} and {tmp_path / 'text_v2.npz'}" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path.parent)
    served = load_global_model(tmp_path / "model_v2.pt")
    assert served.config["catalogue"] == str(tmp_path / "catalogue_v2.txt")
    assert served.config["item-text-features"] == str(tmp_path / "text_v2.npz")


def test_the_grown_model_records_what_was_added_after_earlier_additions(trained):
    """model.pt keeps every add-items step (the earlier ones, then this one with its count): a run started from
    it states how many items have untrained ID rows (a mutation audit)."""
    from common.data.catalogue import catalogue_fingerprint

    tmp_path, _, _ = trained
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**blob, "added-items": [{"from-catalogue": "x", "added": 5}], "rounds-aggregated": 4},
               tmp_path / "model.pt")
    assert grow(tmp_path) == 0
    grown = torch.load(tmp_path / "model_v2.pt", weights_only=True)
    assert grown["rounds-aggregated"] == 4  # still a trained model to `serve --model runs`
    assert grown["added-items"] == [{"from-catalogue": "x", "added": 5},
                                    {"from-catalogue": catalogue_fingerprint(np.array(OLD)), "added": len(NEW)}]


def test_refusals_name_the_problem_and_write_nothing(trained, capsys):
    tmp_path, _, emb = trained

    def refused(*args, **kw) -> str:
        assert grow(tmp_path, *args, **kw) == 2
        assert not (tmp_path / "model_v2.pt").exists()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        return err

    (tmp_path / "sorted.txt").write_text("10\n15\n20\n30\n")  # an id sorting between old ones moves rows
    assert "line 2 is '15' where the model's catalogue has '20'; keep the model's catalogue" in refused(catalogue="sorted.txt")
    assert "nothing to add" in refused(catalogue="catalogue_v1.txt", features="text_v1.npz")
    (tmp_path / "fewer.txt").write_text("10\n20\n")  # the model's first items only (a mutation audit)
    assert "2 items, fewer than the model's 3; items cannot be removed" in refused(catalogue="fewer.txt")
    assert "are missing" in refused(features="text_v1.npz")  # features lack the new items
    moved = emb.copy()
    moved[1] = -moved[1]  # item 20 re-encoded differently
    save_features(tmp_path / "other.npz", np.array(OLD + NEW), moved, model="enc", texts=OLD + NEW)
    err = refused(features="other.npz")
    assert "old items' embeddings differ from the model's" in err and "item '20'" in err
    nudged = emb.copy()
    nudged[len(OLD) - 1] += 2e-5  # the last old item, just past the tolerance (a mutation audit: only a big move was tried)
    save_features(tmp_path / "nudged.npz", np.array(OLD + NEW), nudged, model="enc", texts=OLD + NEW)
    assert "item '30'" in refused(features="nudged.npz")
    one = emb.copy()
    one[len(OLD) - 1, 0] += 2e-5  # one value of one row: every value counts, not a row's average
    save_features(tmp_path / "one.npz", np.array(OLD + NEW), one, model="enc", texts=OLD + NEW)
    assert "item '30'" in refused(features="one.npz")
    wide = np.concatenate([emb, emb[:, :2]], axis=1)  # another encoder's width: one line, not a traceback
    save_features(tmp_path / "wide.npz", np.array(OLD + NEW), wide, model="enc", texts=OLD + NEW)
    assert f"{DIM + 2} dims, the model was trained with {DIM}" in refused(features="wide.npz")


def test_an_id_model_is_refused_and_an_existing_file_is_kept(trained, capsys):
    tmp_path, _, _ = trained
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    from common.models import build_model

    cfg = {**blob["config"], "item-features": "id"}
    torch.save({"state_dict": build_model(cfg, len(OLD)).state_dict(), "catalogue": OLD, "config": cfg},
               tmp_path / "id.pt")
    assert server_main(["add-items", "--model", str(tmp_path / "id.pt"), "--catalogue", str(tmp_path / "catalogue_v2.txt"),
                        "--item-text-features", str(tmp_path / "text_v2.npz"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "has no representation for items it was not trained on" in capsys.readouterr().err
    # A genre table has no rows for the new items: refused before anything is built (a mutation audit)
    torch.save({**blob, "config": {**blob["config"], "genre-features": True}}, tmp_path / "genres.pt")
    assert server_main(["add-items", "--model", str(tmp_path / "genres.pt"), "--catalogue",
                        str(tmp_path / "catalogue_v2.txt"), "--item-text-features", str(tmp_path / "text_v2.npz"),
                        "--out", str(tmp_path / "x.pt")]) == 2
    assert "genre-features = true; adding items would need the new items' genres" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
    # Never written over its own catalogue or features file, even with --force (only the model may be replaced)
    for target in ("catalogue_v2.txt", "text_v2.npz"):
        before = (tmp_path / target).read_bytes()
        assert server_main(["add-items", "--model", str(tmp_path), "--catalogue", str(tmp_path / "catalogue_v2.txt"),
                            "--item-text-features", str(tmp_path / "text_v2.npz"), "--out", str(tmp_path / target),
                            "--force"]) == 2
        assert "is this command's input" in capsys.readouterr().err and (tmp_path / target).read_bytes() == before
    (tmp_path / "model_v2.pt").write_bytes(b"served")
    assert grow(tmp_path) == 2 and "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "model_v2.pt").read_bytes() == b"served"
    assert grow(tmp_path, "--force") == 0
    assert load_global_model(tmp_path / "model_v2.pt").catalogue.tolist() == OLD + NEW


def test_titles_of_another_data_set_are_warned_about_for_a_text_model(trained):
    # An explanations review: ML-1M titles beside an ML-100K text model named every reason wrongly, in silence
    from client.recommend import titles_mismatch

    tmp_path, _, _ = trained
    gm = load_global_model(tmp_path / "model.pt")  # its item texts are "10", "20", "30"
    assert titles_mismatch(gm, {"10": "10", "20": "20", "30": "30"}, "meta") is None
    assert titles_mismatch(gm, {"10": "10", "20": "Jumanji (1995)", "30": "30"}, "meta") is None  # one of three
    warning = titles_mismatch(gm, {"10": "Jumanji (1995)", "20": "Heat (1995)", "30": "30"}, "meta")
    assert warning == (f"warning: metadata meta: for 2 of the 3 items with a title there the item text does not begin "
                       f"with it (item 10: '10' against 'Jumanji (1995)'), the texts {gm.path} was built on: is it "
                       "this catalogue's?")


def test_published_texts_of_another_data_set_are_named_when_a_run_starts(tmp_path):
    from common.item_text import published_texts_mismatch

    data = tmp_path / "ml"
    data.mkdir()
    (data / "u.data").write_text("".join(f"{u}\t{i}\t4\t{100 + i}\n" for u in (1, 2, 3) for i in (1, 2, 3)))
    (data / "u.item").write_text("1|GoldenEye (1995)|01-Jan-1995||x|" + "|".join("0" * 19) + "\n"
                                 "2|Four Rooms (1995)|01-Jan-1995||x|" + "|".join("0" * 19) + "\n"
                                 "3|Get Shorty (1995)|01-Jan-1995||x|" + "|".join("0" * 19) + "\n")
    items, emb = np.array(["1", "2", "3"]), unit_rows(3, seed=1)
    cfg = {"dataset": str(data), "item-text-features": str(tmp_path / "f.npz")}
    save_features(tmp_path / "f.npz", items, emb, model="enc",
                  texts=["Toy Story (1995).", "Jumanji (1995).", "Get Shorty (1995). Genres: Comedy."])
    assert "2 of the 3 items with a title there the item text does not begin with it (item 1: 'Toy Story (1995).' " \
           "against 'GoldenEye (1995)')" in published_texts_mismatch(cfg, items)
    save_features(tmp_path / "g.npz", items, emb, model="enc",
                  texts=["GoldenEye (1995).", "Four Rooms (1995).", "Get Shorty (1995). Genres: Comedy."])
    assert published_texts_mismatch({**cfg, "item-text-features": str(tmp_path / "g.npz")}, items) is None
    # the ServerApp's start (and fedrec-server check) says so
    import logging

    from server.app import initial_model

    flwr_log = logging.getLogger("flwr")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    flwr_log.addHandler(handler)
    try:
        initial_model(resolve_config(None, {**cfg, "item-features": "text", "embedding-dim": 8, "max-seq-len": 5}))
    finally:
        flwr_log.removeHandler(handler)
    assert any("encoded from another data set's titles?" in line for line in seen)


def test_a_served_text_models_missing_features_file_names_the_path_in_its_config(trained):
    # An explanations review: serving said "... or set item-text-features to where it is", which recommend and
    # serve cannot: the path is stored in model.pt
    from common.errors import DataError

    tmp_path, _, _ = trained
    (tmp_path / "text_v1.npz").unlink()
    with pytest.raises(DataError) as exc:
        load_global_model(tmp_path / "model.pt")
    assert str(exc.value).startswith(f"model {tmp_path / 'model.pt'}: a text model, whose item texts are read from "
                                     f"item-text-features = '{tmp_path / 'text_v1.npz'}' in its config: put the "
                                     "coordinator's published file at that path (")
