"""Text-aware SASRec: exact per-user gradients under Opacus, frozen features, catalogue growth, cold start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping

from common.data.sequences import SequenceData
from common.models import SASRec
from common.models.text_sasrec import TextSASRec, item_text_table, trainable_parameters
from common.dp_sgd import resolve_grad_sample_mode
from common.training import train_local
from common.objectives import SequenceLoss
from simulations.cold_start import cold_hit_rates, hold_out_items

V, T, B, D = 20, 6, 4, 12


def table(num_items: int = V, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return item_text_table(torch.nn.functional.normalize(torch.randn(num_items, D, generator=g), dim=1))


def model(mode: str, num_items: int = V, text: torch.Tensor | None = None) -> TextSASRec:
    torch.manual_seed(0)
    text = table(num_items) if text is None else text
    return TextSASRec(num_items, text, item_features=mode, max_len=T, dim=8, num_blocks=1, num_heads=2, dropout=0.0)


def batch():
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, V + 1, (B, T), generator=g)
    seq[0, :2] = 0  # a left-padded user
    tgt = torch.randint(1, V + 1, (B, T), generator=g)
    tgt[0, :2] = 0
    return seq, tgt


def per_user_grads(m: torch.nn.Module, seq, tgt) -> list[dict[str, torch.Tensor]]:
    """Reference: one backward pass per user, no Opacus."""
    params = dict(m.named_parameters())
    out = []
    for i in range(B):
        loss = SequenceLoss(reduction="sum")(m(seq[i:i + 1]), tgt[i:i + 1])
        out.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    return out


@pytest.mark.parametrize("mode", ["text", "id+text"])
def test_hooks_per_sample_gradients_match_per_user_backprop(mode):
    # Prepare
    m = model(mode)
    seq, tgt = batch()
    reference = per_user_grads(m, seq, tgt)
    # Execute
    gsm = GradSampleModule(m, loss_reduction="sum")
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    # Assert: every trainable weight, including the input projection and the output query
    names = [n for n, _ in m.named_parameters()]
    assert {"item_emb.project.weight", "output.query.weight"} <= set(names)
    for name, p in m.named_parameters():
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], atol=1e-5, rtol=1e-4)
    gsm._close()


@pytest.mark.parametrize("mode", ["text", "id+text"])
def test_ghost_clipping_norms_match_per_user_backprop(mode):
    m = model(mode)
    seq, tgt = batch()
    reference = per_user_grads(m, seq, tgt)
    ref_norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in r.values())) for r in reference])
    gsm = GradSampleModuleFastGradientClipping(m, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), ref_norms, atol=1e-4, rtol=1e-4)
    assert resolve_grad_sample_mode(m, "auto") in ("ghost", "hooks")  # never the tied-only path


def test_tied_id_rows_share_one_parameter_with_exact_per_user_gradients():
    # Prepare: id+text with tied-output -> the output's ID rows are the input's ID rows
    torch.manual_seed(0)
    m = TextSASRec(V, table(), item_features="id+text", max_len=T, dim=8, num_blocks=1, num_heads=2,
                   dropout=0.0, tied_output=True)
    seq, tgt = batch()
    reference = per_user_grads(m, seq, tgt)  # named_parameters lists the shared Parameter once
    # Execute
    gsm = GradSampleModule(m, loss_reduction="sum")
    SequenceLoss(reduction="sum")(gsm(seq), tgt).backward()
    # Assert: one Parameter, both uses' per-user gradients summed (Opacus' hooks), ghost avoided
    assert m.output.ids.weight is m.item_emb.ids.weight and m.tied_output
    assert "output.ids.weight" not in dict(m.named_parameters())
    for name, p in m.named_parameters():
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], atol=1e-5, rtol=1e-4)
    gsm._close()
    assert resolve_grad_sample_mode(m, "auto") == "hooks"
    # text alone has no ID rows to tie: the flag is ignored there
    assert not TextSASRec(V, table(), item_features="text", max_len=T, dim=8, tied_output=True).tied_output



def test_tied_id_text_model_loads_its_own_state_and_merges_differing_copies():
    # Prepare: a tied id+text model with trained weights; a state whose two ID copies differ
    torch.manual_seed(1)
    make = lambda: TextSASRec(V, table(), item_features="id+text", max_len=T, dim=8, num_blocks=1,  # noqa: E731
                              num_heads=2, dropout=0.0, tied_output=True)
    old = make()
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = old.state_dict()
    differing = {k: v.clone() for k, v in state.items()}
    differing["output.ids.weight"] = differing["item_emb.ids.weight"] + 1.0
    # Execute
    same, merged = make(), make()
    same.load_state_dict(state)
    merged.load_state_dict(differing)
    # Assert: its own file loads unchanged (scores equal); differing copies load as their mean, still one table
    seq, _ = batch()
    torch.testing.assert_close(same.score(seq), old.score(seq))
    torch.testing.assert_close(merged.item_emb.ids.weight, state["item_emb.ids.weight"] + 0.5)
    assert merged.output.ids.weight is merged.item_emb.ids.weight

def test_text_table_is_frozen_and_never_sent():
    m = model("text")
    before = m.item_text.table.clone()
    seq, tgt = batch()
    SequenceLoss()(m(seq), tgt).backward()
    assert all("table" not in n for n, _ in m.named_parameters())
    assert not any("item_text" in k or "table" in k for k in m.state_dict())
    torch.testing.assert_close(m.item_text.table, before)
    # No catalogue-sized parameter: far fewer trainable weights than the ID model of the same size
    idm = SASRec(200, max_len=T, dim=8, num_blocks=1, num_heads=2, dropout=0.0, tied_output=False)
    big_text = model("text", num_items=200)
    assert trainable_parameters(big_text) == trainable_parameters(model("text"))
    assert trainable_parameters(big_text) < trainable_parameters(idm)


@pytest.mark.parametrize("mode", ["text", "id+text"])
def test_new_catalogue_items_load_old_weights_and_keep_old_scores(mode):
    # Prepare: weights trained on V items; the coordinator then adds 5 items (their text rows appended)
    old = model(mode)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grown_text = torch.cat([old.item_text.table, table(5, seed=9)[1:]])
    new = model(mode, num_items=V + 5, text=grown_text)
    # Execute
    new.load_state_dict(old.state_dict())
    seq, _ = batch()
    # Assert: old items score as before; new items get finite scores from their text
    torch.testing.assert_close(new.score(seq)[:, : V + 1], old.score(seq), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(new.score(seq)[:, V + 1:]).all()
    if mode == "id+text":
        assert new.item_emb.ids.weight[V + 1:].abs().sum() == 0
        assert new.output.ids.weight[V + 1:].abs().sum() == 0


def topic_data(num_users: int = 240, topics: int = 6, per_topic: int = 10, length: int = 10, seed: int = 0):
    """Users who stay in one topic; an item's text is its topic centre plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, D))
    items = np.repeat(np.arange(topics), per_topic)  # topic of item index i+1
    text = centres[items] + 0.3 * rng.normal(size=(len(items), D))
    sequences = []
    for u in range(num_users):
        members = np.flatnonzero(items == u % topics) + 1
        sequences.append(rng.choice(members, size=length, replace=False).astype(np.int64))
    n = len(items)
    data = SequenceData(catalogue=np.array([str(i) for i in range(1, n + 1)]), user_ids=np.array([str(u) for u in range(num_users)]),
                        sequences=sequences, timestamps=[np.arange(length, dtype=np.int64)] * num_users, name="topics")
    return data, item_text_table(torch.nn.functional.normalize(torch.as_tensor(text, dtype=torch.float32), dim=1))


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread only spins against other processes on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["id", "text"])
def test_cold_items_are_recommended_through_text_only(mode, one_thread):
    # Prepare: 12 of 60 items never appear in training
    data, text = topic_data()
    split = hold_out_items(data, fraction=0.2, seed=1)
    assert len(split.cold_items) == 12 and len(split.targets) > 100
    trained = set(np.concatenate(split.train.sequences).tolist())
    assert trained.isdisjoint(split.cold_items.tolist())
    torch.manual_seed(0)
    kwargs = dict(max_len=T, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
    m = TextSASRec(data.num_items, text, item_features="text", **kwargs) if mode == "text" else \
        SASRec(data.num_items, tied_output=False, **kwargs)
    # Execute
    train_local(m, split.train, epochs=15, batch_size=32, learning_rate=0.01, max_len=T, seed=0)
    rates = cold_hit_rates(m, split, k=3, max_len=T)
    # Assert: 2 of the 12 cold items share the user's topic; random top-3 hits 3/12 = 0.25
    if mode == "text":
        assert rates["hr@3-among-cold"] > 0.8
    else:
        assert abs(rates["hr@3-among-cold"] - rates["random-among-cold"]) < 0.15


def test_a_model_scoring_every_item_alike_gets_chance_among_the_cold_items():
    # Cold items with the same text score alike: a strict ">" ranked the target first among its ties (HR 1.0)
    data, _ = topic_data()
    split = hold_out_items(data, fraction=0.2, seed=1)

    class Constant(torch.nn.Module):
        def score(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(inputs), data.num_items + 1)

    rates = cold_hit_rates(Constant(), split, k=3, max_len=T)
    assert rates["hr@3-among-cold"] == pytest.approx(rates["random-among-cold"])  # 3 of 12 cold items
    histories = [len(set(h.tolist())) for h in split.histories]
    expected_full = np.mean([3 / (data.num_items - n) for n in histories])  # the catalogue minus the user's history
    assert rates["hr@3-full"] == pytest.approx(expected_full)


def test_explanations_of_a_text_model_name_the_closest_title():
    from client.explain import explain_items

    # Prepare: item 7's text is a near copy of item 3's, so of the history {1, 2, 7} it is closest to target 3
    text = table()
    text[7] = torch.nn.functional.normalize(text[3] + 0.05 * text[1], dim=0)
    m = model("text", text=text)
    history = np.array([1, 2, 7])
    # Execute
    (expl,) = explain_items(m, history, None, [3], T, name=lambda i: f"item-{i}")
    # Assert: the influences are real score differences, and the text note names item 7
    full = m.score(torch.tensor([[0, 0, 0, 1, 2, 7]]))[0, 3]
    for b in expl.because:
        without = m.score(torch.tensor([[0, 0, 0, 0] + [h for h in history.tolist() if h != b.index]]))[0, 3]
        assert abs(float(full - without) - b.influence) < 1e-4
    assert "closest to item-7" in expl.reason


def test_text_model_uses_time_gaps_and_genres_with_exact_per_user_gradients():
    # Prepare: text items plus both context inputs (time-gap buckets, a genre matrix)
    torch.manual_seed(0)
    genres = torch.zeros(V + 1, 3)
    genres[1:, 0], genres[1::2, 1] = 1.0, 1.0
    genres[1:] /= genres[1:].sum(1, keepdim=True)
    m = TextSASRec(V, table(), item_features="id+text", max_len=T, dim=8, num_blocks=1, num_heads=2, dropout=0.0,
                   time_features=True, item_genres=genres)
    seq, tgt = batch()
    gaps = torch.randint(1, 8, seq.shape, generator=torch.Generator().manual_seed(2)) * (seq > 0)
    inputs = torch.stack([seq, gaps], dim=-1)
    # Assert: gap buckets and genres change the scores (neither is silently ignored)
    base = m(inputs)
    assert not torch.allclose(base, m(torch.stack([seq, gaps + (seq > 0)], dim=-1)))
    with torch.no_grad():
        m.genre_proj.weight.mul_(2.0)
    assert not torch.allclose(base, m(inputs))
    # Per-user gradients of every weight, time and genre projections included, match Opacus hooks
    params = dict(m.named_parameters())
    assert {"time_emb.weight", "genre_proj.weight", "item_emb.project.weight"} <= set(params)
    reference = []
    for i in range(B):
        loss = SequenceLoss(reduction="sum")(m(inputs[i:i + 1]), tgt[i:i + 1])
        reference.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    gsm = GradSampleModule(m, loss_reduction="sum")
    SequenceLoss(reduction="sum")(gsm(inputs), tgt).backward()
    for name, p in m.named_parameters():
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], reference[i][name], atol=1e-5, rtol=1e-4)
    gsm._close()
    # A grown catalogue keeps its rebuilt genre matrix when loading the old weights
    grown_genres = torch.cat([genres, torch.tensor([[0.0, 0.0, 1.0]])])
    grown = TextSASRec(V + 1, torch.cat([table(), table(1, seed=9)[1:]]), item_features="id+text", max_len=T, dim=8,
                       num_blocks=1, num_heads=2, dropout=0.0, time_features=True, item_genres=grown_genres)
    grown.load_state_dict(m.state_dict())
    torch.testing.assert_close(grown.item_genres, grown_genres)
    torch.testing.assert_close(grown(inputs)[..., : V + 1], m(inputs), atol=1e-5, rtol=1e-5)
