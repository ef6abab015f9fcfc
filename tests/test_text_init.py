"""``item-init = "text"``: SASRec's id table starts from the PCA of the public item-text vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app.message_type import MessageType

from common.config import ignored_knobs, resolve_config
from common.errors import ConfigError
from common.item_text import save_features
from common.task import catalogue, new_model
from common.text_init import initialise_from_text, text_item_embeddings
from tests.conftest import recording_client_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"synthetic-users": 60, "synthetic-items": 25, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
        "local-epochs": 1, "batch-size": 8, "num-server-rounds": 1, "tied-output": True, "item-init": "text"}


def _principal_coordinates_by_eigh(features: np.ndarray, dim: int) -> np.ndarray:
    """An independent computation: eigenvectors of the covariance (not the SVD), largest first."""
    centred = features - features.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1][:dim]
    return centred @ vectors[:, order]


def test_rows_are_the_principal_coordinates_scaled_to_sasrecs_row_size():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 12)) @ np.diag(np.linspace(3.0, 0.1, 12))  # distinct variances
    rows = text_item_embeddings(features, 5)
    assert rows.shape == (31, 5) and rows.dtype == np.float32
    assert not rows[0].any()  # padding
    expected = _principal_coordinates_by_eigh(features, 5)
    expected *= np.sqrt(30 / (expected ** 2).sum())  # mean squared row norm 1
    signs = np.sign((rows[1:] * expected).sum(axis=0))  # a component's sign is arbitrary
    np.testing.assert_allclose(rows[1:], expected * signs, atol=1e-5)
    assert np.isclose((rows[1:].astype(np.float64) ** 2).sum(axis=1).mean(), 1.0, atol=1e-5)


def test_fewer_components_than_dimensions_leave_the_other_columns_zero():
    # 4 items spanning a plane of a 3-d space: 2 components, whatever dim asks for
    features = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 2.0, 1.0]])
    rows = text_item_embeddings(features, 6)
    assert np.abs(rows[1:, :2]).sum(axis=0).min() > 0.1
    assert not rows[:, 2:].any()


def test_vectors_that_tell_no_item_apart_are_refused_not_turned_into_zero_rows():
    for same in (np.ones((4, 3)), np.ones((1, 3))):
        with pytest.raises(ConfigError, match=r"item text vectors are all the same, so they tell no item"):
            text_item_embeddings(same, 4)


@pytest.mark.parametrize("bad", [np.full((3, 2), np.nan), np.zeros((0, 4)), np.zeros(5)])
def test_features_that_are_not_a_finite_table_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match=r"^item-init = \"text\": the item text features must be a finite"):
        text_item_embeddings(bad, 4)


def _published(tmp_path, cfg: dict) -> dict:
    """A published features file for the run's catalogue (as `fedrec-server item-text` writes one), its items
    in another order than the catalogue's; the vectors in catalogue order are kept beside it (vectors.npy)."""
    items = catalogue(resolve_config(None, cfg))
    emb = np.random.default_rng(1).normal(size=(len(items), 16)).astype(np.float32)
    order = np.random.default_rng(2).permutation(len(items))
    save_features(tmp_path / "text.npz", items[order], emb[order], model="m", texts=[f"title {i}" for i in items[order]])
    np.save(tmp_path / "vectors.npy", emb)
    return {**cfg, "item-text-features": str(tmp_path / "text.npz")}


def _features(tmp_path) -> np.ndarray:
    """The vectors of _published in catalogue order (not read back through the features file)."""
    return np.load(tmp_path / "vectors.npy")


def test_the_id_table_and_its_tied_output_start_from_the_texts(tmp_path):
    cfg = resolve_config(None, _published(tmp_path, TINY))
    items = catalogue(cfg)
    model = new_model(cfg, len(items))
    record = initialise_from_text(model, cfg, items)
    expected = text_item_embeddings(_features(tmp_path), 8)
    torch.testing.assert_close(model.item_emb.weight.detach(), torch.from_numpy(expected))
    assert model.output.weight is model.item_emb.weight
    assert record == {"item-init": "text", "item-text-source": str(tmp_path / "text.npz"), "item-text-dims": 16}


def test_allowed_under_every_dp_mode_and_refused_where_it_cannot_apply():
    for mode in ("local", "central", "both", "off"):
        resolve_config(None, {**TINY, "dp-mode": mode, "secure-aggregation": mode == "central"})
    with pytest.raises(ConfigError, match=r"it needs model = \"sasrec\" with item-features = \"id\" \(this run: mf, id"):
        resolve_config(None, {**TINY, "model": "mf"})
    with pytest.raises(ConfigError, match=r"item-init = \"text\" sets SASRec's item id embeddings: .*\(this run: sasrec, id\+text\)"):
        resolve_config(None, {**TINY, "item-features": "id+text"})
    with pytest.raises(ConfigError, match="init-model = 'runs/x' from a trained model: set one of them"):
        resolve_config(None, {**TINY, "init-model": "runs/x"})
    # the encoder knobs matter now, though the model itself has no text input
    assert "item-text-model" not in ignored_knobs(resolve_config(None, {**TINY, "item-text-model": "other"}))
    assert "item-text-model" in ignored_knobs(resolve_config(None, {**TINY, "item-init": "random",
                                                                    "item-text-model": "other"}))


def test_a_catalogue_without_texts_is_a_one_line_error():
    cfg = resolve_config(None, TINY)  # synthetic: no titles beside it, no published file
    items = catalogue(cfg)
    with pytest.raises(ConfigError, match=r"^item-init = \"text\" needs item titles, but dataset 'synthetic' has no metadata"):
        initialise_from_text(new_model(cfg, len(items)), cfg, items)


def test_round_1_trains_from_the_texts_under_local_dp_and_a_resume_keeps_its_weights(tmp_path, monkeypatch):
    from simulations.local_grid import run_local

    overrides = {**_published(tmp_path, TINY), "run-dir": str(tmp_path), "run-name": "text", "dp": True,
                 "min-nodes": 2}
    spy, sent = recording_client_app(overrides)

    run_dir = run_local(overrides, 2, client_apps=[spy, spy])
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-init"] == "text" and start["item-text-dims"] == 16
    assert [kind for kind, _ in sent if kind == MessageType.QUERY] == []  # public: no partner is asked
    first_train = next(content for kind, content in sent if kind == MessageType.TRAIN)
    rows = first_train["arrays"].to_torch_state_dict()["item_emb.weight"]
    assert torch.allclose(rows, torch.from_numpy(text_item_embeddings(_features(tmp_path), 8)), atol=1e-6)
    # DP-SGD ran on that start: the partners' replies carry a spent epsilon
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epsilon"] > 0
    # a resume continues the checkpoint's weights: the text start is not computed again
    sent.clear()
    with monkeypatch.context() as patch:
        def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("a resume set the item table from the texts again")
        patch.setattr("server.app.initialise_from_text", refuse)
        run_local({**overrides, "resume": True, "num-server-rounds": 2}, 2, client_apps=[spy, spy])
    resumed_rows = next(content for kind, content in sent if kind == MessageType.TRAIN)["arrays"]
    assert not torch.allclose(resumed_rows.to_torch_state_dict()["item_emb.weight"], rows)
    assert "item-init" not in json.loads((run_dir / "provenance.json").read_text())["starts"][1]


def test_the_coordinators_check_reads_the_texts_and_refuses_a_catalogue_without_them(tmp_path, capsys):
    from server.cli import main

    assert main(["check", "--run-config", 'item-init="text" synthetic-items=25']) == 2
    assert 'item-init = "text" needs item titles' in capsys.readouterr().err
    published = _published(tmp_path, TINY)
    assert main(["check", "--run-config", f'item-init="text" synthetic-users=60 synthetic-items=25 '
                 f'embedding-dim=8 item-text-features="{published["item-text-features"]}"']) == 0
    assert "item-init: item embeddings from the PCA of the item texts" in capsys.readouterr().out


def test_a_simulation_without_texts_is_refused_before_ray_starts():
    from simulations.preflight import preflight

    with pytest.raises(ConfigError, match=r"^item-init = \"text\" needs item titles, but dataset 'synthetic' has no metadata"):
        preflight(resolve_config(None, TINY), 2)


def test_an_untied_output_layer_is_named_once_by_check(tmp_path, capsys):
    from server.cli import main

    published = _published(tmp_path, TINY)["item-text-features"]
    base = f'item-init="text" synthetic-users=60 synthetic-items=25 embedding-dim=8 item-text-features="{published}"'
    assert main(["check", "--run-config", f"{base} tied-output=false"]) == 0
    assert "note: item-init = \"text\" with tied-output = false starts only the input rows" in capsys.readouterr().out
    assert main(["check", "--run-config", f"{base} tied-output=true"]) == 0
    assert "tied-output = false" not in capsys.readouterr().out
