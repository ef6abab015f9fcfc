"""``init-model``: a run starts from a released model's weights (server/warm_start.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import resolve_config
from common.errors import ConfigError
from common.item_text import save_features
from server.app import initial_model
from server.resume import start_run

BASE = {"synthetic-users": 60, "synthetic-items": 20, "max-seq-len": 8, "embedding-dim": 8, "num-blocks": 1}


def released(tmp_path, cfg: dict, items: np.ndarray, model: torch.nn.Module, name: str = "old"):
    """``model`` saved as a finished run's model.pt (server/run_report.py's format)."""
    from flwr.app import ArrayRecord

    from server.run_report import RunRecorder

    run = tmp_path / name
    run.mkdir()
    RunRecorder(run, cfg, items).save_model(ArrayRecord(model.state_dict()))
    return run


def trained_like(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights no fresh initialisation gives: a start from them is recognisable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model


def test_a_run_starts_from_the_released_weights(tmp_path):
    cfg = resolve_config(None, {**BASE, "run-dir": str(tmp_path / "runs")})
    items, model, _ = initial_model(cfg)
    run = released(tmp_path, cfg, items, trained_like(model))
    items2, warm, record = initial_model({**cfg, "init-model": str(run), "learning-rate": 0.01})  # other knobs may differ
    start = start_run({**cfg, "init-model": str(run)}, items2, warm)
    sent = start.arrays.to_torch_state_dict()  # what round 1 sends to the partners
    for key, value in model.state_dict().items():
        torch.testing.assert_close(sent[key], value)
    fresh = initial_model(cfg)[1].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in model.state_dict().items())  # not the default start
    # A resumed run starts from its checkpoint: the init model is not read again (it may be gone)
    items3, resumed, none = initial_model({**cfg, "init-model": str(tmp_path / "gone"), "resume": True, "run-name": "r"})
    assert all(torch.equal(fresh[k], v) for k, v in resumed.state_dict().items()) and none is None
    # ... and a resume that drops init-model continues the same run (it is not part of what was trained)
    from server.checkpoint import fingerprint

    state = warm.state_dict()
    assert (fingerprint({**cfg, "init-model": str(run)}, items2, state)
            == fingerprint({**cfg, "init-model": ""}, items2, state))


def test_a_start_model_trained_without_dp_is_named_in_the_guarantee(tmp_path, caplog):
    # A diff review: privacy.json and summary.md stated the partners' guarantee for "every global model" of a
    # run whose first model had been trained without DP
    from server.privacy_report import PrivacyReport

    cfg = resolve_config(None, {**BASE, "dp-mode": "off"})
    items, model, _ = initial_model(cfg)
    run = released(tmp_path, cfg, items, model)
    (run / "privacy.json").write_text('{"guarantee": "No differential privacy."}')
    local = resolve_config(None, BASE)
    _, _, record = initial_model({**local, "init-model": str(run)})
    assert record == {"path": str(run / "model.pt"), "items": len(items), "added-items": 0, "dp-mode": "off",
                      "guarantee": "No differential privacy."}
    assert "init-model" in caplog.text and "(dp-mode off): what it learned from its training data is not covered" \
        in caplog.text
    report = PrivacyReport(tmp_path, local)
    report.note_start_model(record)
    assert "trained with dp-mode off: what that model learned from its training data is not covered" in report.guarantee()
    # A start model with its own (central) guarantee: quoted, not called uncovered, no ledger clause (a diff review)
    central = PrivacyReport(tmp_path / "c", resolve_config(None, {**BASE, "dp-mode": "off"}))
    central.note_start_model({**record, "dp-mode": "central", "guarantee": "The global models are (4.7, 1e-05)-DP."})
    said = central.guarantee()
    assert "trained with dp-mode central; its training data is covered by that run's own guarantee (The global " \
           "models are (4.7, 1e-05)-DP)." in said and "ledgers" not in said
    for unknown in ({"dp-mode": "unknown", "guarantee": "x"}, {"dp-mode": "local", "guarantee": ""}):
        central.note_start_model({**record, **unknown})  # nothing to point to: not covered (a diff review)
        assert "not covered by this guarantee" in central.guarantee()
    assert "trained with dp-mode local, but no privacy.json beside it states that run's guarantee" in central.guarantee()
    report.write()
    assert PrivacyReport(tmp_path, local).as_dict()["init-model"]["dp-mode"] == "off"  # kept on resume


def test_a_model_that_cannot_start_this_run_is_one_line(tmp_path):
    cfg = resolve_config(None, BASE)
    items, model, _ = initial_model(cfg)
    run = released(tmp_path, cfg, items, model)
    cases = [
        ({"embedding-dim": 16}, "another architecture (embedding-dim = 8 there, 16 here)"),
        # no weight's shape depends on it: only the architecture check stands between it and a silent load
        ({"num-heads": 2}, "another architecture (num-heads = 1 there, 2 here)"),
        ({"synthetic-items": 25}, "its catalogue (20 items) is not this run's (25)"),
        ({"init-model": str(tmp_path / "nope.pt")}, "init-model: model"),
    ]
    for change, says in cases:
        with pytest.raises(ConfigError) as err:
            initial_model({**cfg, "init-model": str(run), **change})
        assert says in str(err.value) and "\n" not in str(err.value)
    # The same items in another order: an id model's rows would score the wrong items (a mutation audit: only a
    # catalogue of another size was tried)
    (tmp_path / "reordered").mkdir()
    torch.save({"state_dict": model.state_dict(), "catalogue": items[::-1].tolist(), "config": dict(cfg)},
               tmp_path / "reordered" / "model.pt")
    with pytest.raises(ConfigError, match=r"its catalogue \(20 items\) is not this run's \(20\)"):
        initial_model({**cfg, "init-model": str(tmp_path / "reordered")})
    # A model saved before a knob existed starts a run that keeps the knob's default (the weights decide)
    (tmp_path / "older").mkdir()
    torch.save({"state_dict": model.state_dict(), "catalogue": items.tolist(),
                "config": {k: v for k, v in cfg.items() if k != "time-features"}}, tmp_path / "older" / "model.pt")
    assert initial_model({**cfg, "init-model": str(tmp_path / "older")})[2]["items"] == len(items)
    (tmp_path / "nan").mkdir()
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    next(t for t in broken.values() if t.is_floating_point()).fill_(float("nan"))
    torch.save({"state_dict": broken, "catalogue": items.tolist(), "config": dict(cfg)}, tmp_path / "nan" / "model.pt")
    with pytest.raises(ConfigError, match="NaN or infinite"):
        initial_model({**cfg, "init-model": str(tmp_path / "nan")})


def test_a_text_model_starts_over_a_grown_catalogue(tmp_path):
    old, new = ["10", "20", "30"], ["10", "20", "30", "40"]
    emb = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    save_features(tmp_path / "text.npz", np.array(new), emb, model="enc", texts=new)
    (tmp_path / "v1.txt").write_text("\n".join(old) + "\n")
    (tmp_path / "v2.txt").write_text("\n".join(new) + "\n")
    text = {**BASE, "item-features": "id+text", "item-text-features": str(tmp_path / "text.npz")}
    cfg = resolve_config(None, {**text, "catalogue": str(tmp_path / "v1.txt")})
    items, model, _ = initial_model(cfg)
    run = released(tmp_path, cfg, items, trained_like(model))
    grown_cfg = resolve_config(None, {**text, "catalogue": str(tmp_path / "v2.txt"), "init-model": str(run)})
    items2, warm, record = initial_model(grown_cfg)
    assert items2.tolist() == new
    assert (record["items"], record["added-items"]) == (3, 1)  # privacy.json: the start model's items, and the new
    torch.testing.assert_close(warm.item_emb.ids.weight[:4], model.item_emb.ids.weight)  # old rows kept
    assert not warm.item_emb.ids.weight[4].any()  # the new item's ID row starts at zero
    for key, value in model.state_dict().items():  # every other weight as released
        if ".ids." not in key:
            torch.testing.assert_close(warm.state_dict()[key], value)
    # Re-encoded old items (another encoder or title) would not be what the weights were fitted to
    moved = emb.copy()
    moved[0] *= -1
    save_features(tmp_path / "other.npz", np.array(new), moved, model="enc", texts=new)
    with pytest.raises(ConfigError, match="old items' embeddings differ from the model's .* item '10'"):
        initial_model({**grown_cfg, "item-text-features": str(tmp_path / "other.npz")})
    # A model grown by add-items counts its added items too (they also have zero ID rows; a scenario review)
    blob = torch.load(run / "model.pt", weights_only=True)
    torch.save({**blob, "added-items": [{"from-catalogue": "x", "added": 5}]}, run / "model.pt")
    assert initial_model(grown_cfg)[2]["added-items"] == 1 + 5
    # A catalogue that moves old items is refused: ID rows follow positions
    (tmp_path / "sorted.txt").write_text("10\n15\n20\n30\n")
    save_features(tmp_path / "s.npz", np.array(["10", "15", "20", "30"]), emb, model="enc", texts=new)
    with pytest.raises(ConfigError, match=r"catalogue \S*sorted.txt: line 2 is '15' where the model's catalogue has '20'"):
        initial_model({**grown_cfg, "catalogue": str(tmp_path / "sorted.txt"), "item-text-features": str(tmp_path / "s.npz")})


def test_a_text_model_with_genre_features_starts_a_run(tmp_path, ml100k_dir):
    # A diff review: rebuilding the saved text model to compare its text rows left out its genre table, so
    # every text model with genre-features was refused as "cannot be rebuilt"
    from common.task import catalogue

    cfg = resolve_config(None, {**BASE, "dataset": str(ml100k_dir), "item-features": "text", "genre-features": True})
    items = catalogue(cfg)
    emb = np.random.default_rng(1).normal(size=(len(items), 6)).astype(np.float32)
    save_features(tmp_path / "text.npz", items, emb, model="enc", texts=items.tolist())
    cfg["item-text-features"] = str(tmp_path / "text.npz")
    items, model, _ = initial_model(cfg)
    run = released(tmp_path, cfg, items, trained_like(model))
    _, warm, record = initial_model({**cfg, "init-model": str(run)})
    assert record["items"] == len(items)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[key], value)
    # Over a grown catalogue its genre table would lack the new items: refused in one line (a mutation audit)
    (tmp_path / "fewer.txt").write_text("\n".join(items[:-1].tolist()) + "\n")
    smaller = released(tmp_path, {**cfg, "catalogue": str(tmp_path / "fewer.txt")}, items[:-1],
                       initial_model({**cfg, "catalogue": str(tmp_path / "fewer.txt")})[1], name="fewer")
    with pytest.raises(ConfigError, match="genre-features = true: its genre table is not rebuilt for new items"):
        initial_model({**cfg, "init-model": str(smaller)})
