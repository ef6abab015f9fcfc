"""SASRec shapes, causal masking (no future leakage), padding and tied weights."""

from __future__ import annotations

import torch

from common.models import Popularity, SASRec


def make(tied=True, **kw):
    torch.manual_seed(0)
    return SASRec(25, max_len=8, dim=16, num_blocks=2, num_heads=2, dropout=0.0, tied_output=tied, **kw).eval()


def test_shapes_and_score():
    m = make()
    seq = torch.randint(1, 26, (4, 8))
    assert m(seq).shape == (4, 8, 26)
    assert m.score(seq).shape == (4, 26)
    assert torch.allclose(m.score(seq), m(seq)[:, -1])


def test_no_future_leakage():
    m = make()
    seq = torch.randint(1, 26, (1, 8))
    changed = seq.clone()
    changed[0, 5:] = torch.randint(1, 26, (3,))
    a, b = m(seq), m(changed)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-5)  # positions before the change see nothing of it
    assert not torch.allclose(a[0, 5:], b[0, 5:])


def test_padding_is_ignored():
    m = make()
    seq = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]])
    other_pad_emb = m.item_emb.weight.detach().clone()
    out1 = m.score(seq)
    with torch.no_grad():
        m.item_emb.weight[0] += 1.0  # padding row must not matter
    out2 = m.score(seq)
    with torch.no_grad():
        m.item_emb.weight.copy_(other_pad_emb)
    # Column 0 of the scores uses the padding row itself; all real items are unaffected.
    assert torch.allclose(out1[:, 1:], out2[:, 1:], atol=1e-5)


def test_the_number_of_leading_pads_does_not_change_scores():
    # The padding row is zeroed before attention, so the test above cannot see the key-padding mask.
    # After a block, padded positions hold nonzero states (biases), so only the mask keeps real
    # positions from attending to them. Positions are right-aligned (SASRec.hidden: the last item is
    # always position max_len - 1), so the real items sit at the same positions in all three.
    m = make()
    with torch.no_grad():
        histories = [torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7]]), torch.tensor([[0, 3, 4, 5, 6, 7]]),
                     torch.tensor([[3, 4, 5, 6, 7]])]
        scores = [m.score(h) for h in histories]
        hidden = [m.hidden(h)[:, -5:] for h in histories]  # every real position, not only the last
    for s, h in zip(scores[1:], hidden[1:]):
        torch.testing.assert_close(s, scores[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(h, hidden[0], atol=1e-5, rtol=0)


def test_tied_output_shares_one_parameter():
    tied, untied = make(True), make(False)
    assert tied.output.weight is tied.item_emb.weight
    assert untied.output.weight is not untied.item_emb.weight
    assert sum(p.numel() for p in tied.parameters()) < sum(p.numel() for p in untied.parameters())


def test_tied_copies_that_differ_load_as_their_mean():
    # Prepare: central DP noises the two copies of the tied table independently
    state = make().state_dict()
    a, b = torch.randn_like(state["item_emb.weight"]), torch.randn_like(state["output.weight"])
    state["item_emb.weight"], state["output.weight"] = a, b
    # Execute
    tied, untied = make(), make(tied=False)
    tied.load_state_dict(state)
    untied.load_state_dict(state)
    # Assert: the tie survives, holding the mean (not whichever copy loaded last); untied keeps both
    assert tied.output.weight is tied.item_emb.weight
    torch.testing.assert_close(tied.item_emb.weight.detach(), (a + b) / 2)
    torch.testing.assert_close(untied.item_emb.weight.detach(), a)
    torch.testing.assert_close(untied.output.weight.detach(), b)
    # equal copies load exactly (no DP, local DP)
    state["output.weight"] = a.clone()
    tied.load_state_dict(state)
    assert torch.equal(tied.item_emb.weight.detach(), a)


def test_popularity_scores_are_counts():
    pop = Popularity(torch.tensor([0, 5, 1, 9]))
    assert pop.score(torch.zeros(2, 3, dtype=torch.long)).tolist() == [[0, 5, 1, 9]] * 2


def test_positions_only_loss_equals_full_sequence_loss():
    from common.objectives import SequenceLoss, positions_only_loss

    m = make(tied=False)
    seq = torch.randint(1, 26, (3, 8))
    tgt = torch.randint(1, 26, (3, 8))
    seq[0, :3] = 0
    tgt[0, :3] = 0
    full = SequenceLoss()(m(seq), tgt)
    fast = positions_only_loss(m, seq, tgt)
    torch.testing.assert_close(fast, full)
    g_full = torch.autograd.grad(full, m.item_emb.weight)[0]
    g_fast = torch.autograd.grad(positions_only_loss(m, seq, tgt), m.item_emb.weight)[0]
    torch.testing.assert_close(g_fast, g_full)
