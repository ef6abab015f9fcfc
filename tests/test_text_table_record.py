"""A text model's frozen item text table is rebuilt from its features file or metadata whenever it is loaded:
model files and checkpoints record it, and a table that is not the one trained with is refused (a review:
a features file republished at the same path changed a served model's scores, a resume and add-items unseen)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from client.recommend import load_global_model
from common.config import resolve_config
from common.errors import CheckpointError, DataError
from common.item_text import record_mismatch, save_features, table_record
from server.cli import main as server_main

OLD, NEW = ["10", "20", "30"], ["40"]


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def republish(path, catalogue, emb, model="enc") -> None:
    """Write a features file over ``path`` as `item-text --force` does, with a later modification time."""
    before = os.stat(path).st_mtime_ns if path.exists() else 0
    save_features(path, np.array(catalogue), emb, model=model, texts=list(catalogue))
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@pytest.fixture()
def served(tmp_path):
    """A run's model.pt of an id+text model over OLD, saved the ServerApp's way (RunRecorder)."""
    from flwr.app import ArrayRecord

    from common.models import build_model
    from server.run_report import RunRecorder

    emb = unit_rows(len(OLD) + len(NEW), seed=3)
    republish(tmp_path / "text.npz", OLD, emb[:3])
    (tmp_path / "catalogue.txt").write_text("\n".join(OLD) + "\n")
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue.txt"), "item-features": "id+text",
                                "item-text-features": str(tmp_path / "text.npz"), "embedding-dim": 8,
                                "max-seq-len": 5, "num-blocks": 1, "dropout": 0.0})
    model = build_model(cfg, len(OLD), catalogue=np.array(OLD))
    run = tmp_path / "run"
    run.mkdir()
    RunRecorder(run, dict(cfg), np.array(OLD), text_table=table_record(model)).save_model(ArrayRecord(model.state_dict()))
    return tmp_path, emb


def test_a_republished_features_file_is_refused_when_the_model_is_served(served):
    tmp_path, emb = served
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["item-text"]["fingerprint"]
    load_global_model(tmp_path / "run")  # the file it was trained with
    moved = emb[:3].copy()
    moved[1] = -moved[1]  # one title fixed and re-encoded: every score through item 20 moves
    republish(tmp_path / "text.npz", OLD, moved)
    with pytest.raises(DataError, match=r"item-text-features .*text.npz is not the file it was trained with .*"
                                        r"serve it with the file it was trained with"):
        load_global_model(tmp_path / "run")
    # add-items rebuilds the trained table the same way: its old rows would have been checked against the new file
    republish(tmp_path / "text_v2.npz", OLD + NEW, np.vstack([moved, emb[3:]]))
    (tmp_path / "catalogue_v2.txt").write_text("\n".join(OLD + NEW) + "\n")
    assert server_main(["add-items", "--model", str(tmp_path / "run"), "--catalogue", str(tmp_path / "catalogue_v2.txt"),
                        "--item-text-features", str(tmp_path / "text_v2.npz"), "--out", str(tmp_path / "grown.pt")]) == 2
    assert not (tmp_path / "grown.pt").exists()


def test_a_grown_model_records_its_table_and_a_model_without_a_record_still_loads(served, capsys):
    tmp_path, emb = served
    republish(tmp_path / "text_v2.npz", OLD + NEW, emb)
    (tmp_path / "catalogue_v2.txt").write_text("\n".join(OLD + NEW) + "\n")
    assert server_main(["add-items", "--model", str(tmp_path / "run"), "--catalogue", str(tmp_path / "catalogue_v2.txt"),
                        "--item-text-features", str(tmp_path / "text_v2.npz"), "--out", str(tmp_path / "grown.pt")]) == 0
    grown = torch.load(tmp_path / "grown.pt", weights_only=True)
    assert grown["item-text"] == table_record(load_global_model(tmp_path / "grown.pt").model)
    # A model saved before models recorded their table (or by hand) is served as before
    del grown["item-text"]
    torch.save(grown, tmp_path / "old.pt")
    assert load_global_model(tmp_path / "old.pt").catalogue.tolist() == OLD + NEW


def test_locally_encoded_tables_are_compared_up_to_machine_noise():
    # No published file: the texts encoded from the metadata differ in their last bits between machines
    table = np.random.default_rng(0).normal(size=(50, 6))

    class Text:
        def __init__(self, rows):
            self.table = torch.as_tensor(np.vstack([np.zeros((1, 6)), rows]), dtype=torch.float32)

    class Model:
        def __init__(self, rows):
            self.item_text = Text(rows)

    trained = table_record(Model(table))
    local = {"dataset": "/data/shop", "item-text-features": ""}
    assert record_mismatch(trained, table_record(Model(table + 1e-6)), local) is None
    assert "encoded from the metadata beside dataset '/data/shop' are not those it was trained with" in \
        record_mismatch(trained, table_record(Model(table + 0.05)), local)
    # int8 tables get the int8 tolerance
    assert record_mismatch(trained, table_record(Model(table + 1e-3)), {**local, "item-text-quantize": True}) is None
    assert record_mismatch(trained, table_record(Model(table + 1e-3)), local) is not None
    # a published file is compared exactly
    assert record_mismatch(trained, table_record(Model(table + 1e-6)), {"item-text-features": "t.npz"}) is not None
    assert record_mismatch(None, table_record(Model(table + 1)), local) is None  # nothing recorded


def test_a_resume_with_another_text_table_is_refused():
    from server.checkpoint import check_compatible, fingerprint

    cfg = resolve_config(None, {"item-features": "text", "item-text-features": "t.npz"})
    arrays = {"w": torch.zeros(2)}
    saved = fingerprint(cfg, np.array(OLD), arrays, {"fingerprint": "aaaa", "sketch": [0.0]})
    check_compatible(saved, fingerprint(cfg, np.array(OLD), arrays, {"fingerprint": "aaaa", "sketch": [0.0]}), "ckpt")
    with pytest.raises(CheckpointError, match="t.npz is not the file it was trained with .*resume with the file"):
        check_compatible(saved, fingerprint(cfg, np.array(OLD), arrays, {"fingerprint": "bbbb", "sketch": [0.0]}), "ckpt")
    # a checkpoint written before checkpoints recorded the table resumes as before
    check_compatible(fingerprint(cfg, np.array(OLD), arrays), fingerprint(cfg, np.array(OLD), arrays, {"fingerprint": "b"}), "c")


def test_an_int8_model_that_cannot_grow_says_why(tmp_path, capsys):
    # The int8 encoder quantizes activations per batch: a grown catalogue's batches give every old item another
    # vector (0.047 apart on ML-100K), and the refusal advised what had been done ("use the model's encoder")
    from common.models import build_model

    emb = unit_rows(4, seed=5)
    republish(tmp_path / "t1.npz", OLD, emb[:3], model="enc+int8-dynamic")
    shifted = emb.copy()
    shifted[:3] += 0.01
    republish(tmp_path / "t2.npz", OLD + NEW, shifted, model="enc+int8-dynamic")
    (tmp_path / "c1.txt").write_text("\n".join(OLD) + "\n")
    (tmp_path / "c2.txt").write_text("\n".join(OLD + NEW) + "\n")
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "c1.txt"), "item-features": "text",
                                "item-text-features": str(tmp_path / "t1.npz"), "embedding-dim": 8, "max-seq-len": 5})
    model = build_model(cfg, 3, catalogue=np.array(OLD))
    torch.save({"state_dict": model.state_dict(), "catalogue": OLD, "config": dict(cfg)}, tmp_path / "m.pt")
    assert server_main(["add-items", "--model", str(tmp_path / "m.pt"), "--catalogue", str(tmp_path / "c2.txt"),
                        "--item-text-features", str(tmp_path / "t2.npz"), "--out", str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err
    assert "came from the int8 encoder (item-text-quantize)" in err and "needs the float encoder" in err, err


def test_blank_titles_and_unreadable_features_files_say_what_they_are(tmp_path):
    from common.item_text import item_texts, load_features

    texts = item_texts(np.array(["1", "2", "3"]), {"1": ("  ", ["Comedy"]), "2": ("Heat (1995)", []), "3": ("", [])})
    assert texts == ["Item 1. Genres: Comedy.", "Heat (1995).", "Item 3."]  # was ". Genres: Comedy." and "."
    with pytest.raises(DataError, match="/dev/null: not a regular file"):
        load_features("/dev/null", np.array(OLD))
    (tmp_path / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n")
    with pytest.raises(DataError, match=r"not a features file from `fedrec-server item-text` \(not an .npz archive\)") as exc:
        load_features(tmp_path / "u.item", np.array(OLD))
    assert "allow_pickle" not in str(exc.value) and "unsafe" not in str(exc.value)


def test_an_edited_title_in_the_metadata_is_refused_when_the_model_is_served(tmp_path, monkeypatch):
    # A review: one edited title moves its row by 0.1-0.2, far inside the sketch tolerance (60 of 60 unseen);
    # the record keeps the exact key of the texts and encoder, as partners compare it every round
    import time

    from flwr.app import ArrayRecord

    from common.models import build_model
    from server.run_report import RunRecorder

    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [f"{u},{i},{t}" for u in range(1, 7) for t, i in enumerate((1, 2, 3, 5))]
    (folder / "ratings.csv").write_text("userId,movieId,timestamp\n" + "\n".join(rows) + "\n")
    movies = "movieId,title,genres\n1,Alien (1979),Horror|Sci-Fi\n2,Aliens (1986),Action|Sci-Fi\n3,Emma (1996),Comedy\n5,Heat (1995),Crime\n"
    (folder / "movies.csv").write_text(movies)
    cfg = resolve_config(None, {"dataset": str(folder), "item-features": "text", "embedding-dim": 8, "max-seq-len": 4})
    items = np.array(["1", "2", "3", "5"])
    model = build_model(cfg, len(items), catalogue=items)
    (tmp_path / "run").mkdir()
    recorder = RunRecorder(tmp_path / "run", dict(cfg), items, text_table=table_record(model, cfg, items))
    recorder.save_model(ArrayRecord(model.state_dict()))
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["item-text"]["text-key"]
    load_global_model(tmp_path / "run")
    time.sleep(0.01)
    (folder / "movies.csv").write_text(movies.replace("Emma (1996)", "Emma Returns (1996)"))
    with pytest.raises(DataError, match=r"the item texts encoded from the metadata beside dataset .* are not those it "
                                        r"was trained with \(another title, metadata file or encoder\)"):
        load_global_model(tmp_path / "run")


def test_a_half_copied_features_file_is_one_line(tmp_path):
    from common.item_text import load_features

    save_features(tmp_path / "t.npz", np.array(OLD), unit_rows(3, seed=1), model="enc", texts=OLD)
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"half.npz: not a features file from `fedrec-server item-text`"):
        load_features(tmp_path / "half.npz", np.array(OLD))
