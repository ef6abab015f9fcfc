"""SASRec's optional context inputs: time-gap buckets and item genres (common/models/context.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from common.config import resolve_config
from common.models import SASRec, build_model
from common.models.context import NUM_TIME_BUCKETS, item_genre_matrix, time_gap_buckets
from common.objectives import SequenceLoss
from common.training_pairs import training_pairs

V, T, B, G = 20, 6, 4, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_gap_buckets_by_hand():
    # gaps: (first), 0 s, 1 s, 63 s, -64 s (clock skew counts as 0)
    assert time_gap_buckets(np.array([100, 100, 101, 164, 100])).tolist() == [1, 2, 3, 8, 2]
    assert time_gap_buckets(np.array([0, 10**12])).tolist() == [1, NUM_TIME_BUCKETS - 1]
    assert time_gap_buckets(np.array([], dtype=np.int64)).tolist() == []


def test_training_inputs_carry_each_items_own_gap(small_data):
    pairs = training_pairs(small_data, 8, time_features=True)
    plain = training_pairs(small_data, 8)
    inputs, targets = pairs.tensors
    assert inputs.shape == (*plain.tensors[0].shape, 2)
    assert torch.equal(inputs[..., 0], plain.tensors[0]) and torch.equal(targets, plain.tensors[1])
    # First user: the input's last real position is the second-last training item, with its gap
    train = small_data.sequences[0][:-2]
    expected = time_gap_buckets(small_data.timestamps[0])[: len(train)][-2]
    assert int(inputs[0, -1, 1]) == int(expected)
    assert int(inputs[0, -1, 0]) == int(train[-2])


def test_default_config_leaves_the_model_unchanged():
    cfg = resolve_config(None, {"embedding-dim": 8})
    base = build_model(cfg, V)
    assert not any(k.startswith(("time_emb", "genre_proj", "item_genres")) for k in base.state_dict())
    with_both = build_model({**cfg, "time-features": True, "genre-features": True}, V, item_genres=torch.ones(V + 1, G))
    assert {"time_emb.weight", "genre_proj.weight", "item_genres"} <= set(with_both.state_dict())
    with pytest.raises(Exception, match="genre-features"):
        build_model({**cfg, "genre-features": True}, V)


def _model() -> SASRec:
    torch.manual_seed(0)
    genres = torch.rand(V + 1, G)
    genres[0] = 0
    return SASRec(V, max_len=T, dim=8, num_blocks=1, num_heads=2, dropout=0.0, tied_output=False,
                  time_features=True, item_genres=genres)


def _batch():
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, V + 1, (B, T), generator=g)
    gaps = torch.randint(1, NUM_TIME_BUCKETS, (B, T), generator=g)
    items[0, :2], gaps[0, :2] = 0, 0
    tgt = torch.randint(1, V + 1, (B, T), generator=g)
    tgt[0, :2] = 0
    return torch.stack([items, gaps], dim=-1), tgt


def _per_user_grads(m, seq, tgt):
    params = dict(m.named_parameters())
    out = []
    for i in range(B):
        loss = SequenceLoss(reduction="sum")(m(seq[i:i + 1]), tgt[i:i + 1])
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return out


def test_opacus_per_sample_gradients_cover_the_context_layers():
    m = _model()
    seq, tgt = _batch()
    reference = _per_user_grads(m, seq, tgt)
    gsm = GradSampleModule(m, loss_reduction="sum")
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    for name, p in m.named_parameters():
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], atol=1e-5, rtol=1e-4)
    assert reference[1]["time_emb.weight"].abs().sum() > 0 and reference[1]["genre_proj.weight"].abs().sum() > 0
    gsm._close()


def test_ghost_clipping_norms_cover_the_context_layers():
    m = _model()
    seq, tgt = _batch()
    reference = _per_user_grads(m, seq, tgt)
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in reference])
    gsm = GradSampleModuleFastGradientClipping(m, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), ref_norms, atol=1e-4, rtol=1e-4)


def test_the_gap_channel_changes_the_scores():
    m = _model().eval()
    seq, _ = _batch()
    zeroed = seq.clone()
    zeroed[..., 1] = 0
    assert not torch.allclose(m.score(seq), m.score(zeroed))


def test_genre_matrix_from_movielens_metadata(ml100k_dir):
    catalogue = np.array(["1", "2", "999999"])
    matrix = item_genre_matrix(catalogue, ml100k_dir)
    assert matrix.shape[0] == 4 and matrix.shape[1] >= 18
    assert matrix[0].sum() == 0 and matrix[3].sum() == 0  # padding, an item without metadata
    assert matrix[1].sum() == pytest.approx(1.0) and (matrix[1] > 0).sum() == 3  # Toy Story: 3 genres


def test_dp_training_and_both_evaluations_use_the_gap_channel(small_data):
    small_data = small_data.subset(range(64))
    from common.evaluation import evaluate_model
    from common.metrics import evaluate_ranking
    from common.training import DPSettings, train_local

    cfg = resolve_config(None, {"embedding-dim": 8, "num-blocks": 1, "time-features": True, "genre-features": True})
    genres = torch.rand(small_data.num_items + 1, G)
    m = build_model(cfg, small_data.num_items, item_genres=genres)
    before = m.time_emb.weight.detach().clone()
    result = train_local(m, small_data, epochs=1, batch_size=16, learning_rate=0.01, max_len=10,
                         dp=DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, noise_seed=0))
    # no noise: the gap embedding moves only if DP training's gradient reaches it
    assert result.steps > 0 and result.mechanisms and not torch.equal(before, m.time_emb.weight)
    ranked = evaluate_ranking(m, small_data, split="test", max_len=10)
    federated = evaluate_model(m, small_data, max_len=10, top_k=10)
    assert federated["ndcg@10-sum"] == pytest.approx(ranked["ndcg@10-sum"])
    m.time_features = False  # the same weights without the gap channel rank differently
    without = evaluate_ranking(m, small_data, split="test", max_len=10)
    assert without["ndcg@10-sum"] != pytest.approx(ranked["ndcg@10-sum"])
