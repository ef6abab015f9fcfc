"""SASRec's last hidden state for a history and each of its leave-one-out variants, without
recomputing what the variants share.

Removing the item in column ``q`` of the (left-padded, ``max_len``-wide) input leaves
columns ``> q`` as they were and shifts the older items one column to the right, the next
older item entering column 0. So variant ``q`` holds, in columns ``<= q``, exactly ``S``,
the history without its *last* item, and in columns ``> q`` the full history ``O``.
Attention is causal, so at every layer the variant's states in columns ``<= q`` are ``S``'s:
only columns ``> q`` ("fresh" tokens, half of them) need computing. In the first block a
fresh token's query, keys and values are ``O``'s or ``S``'s (they depend on the token
alone), so its projections run on ``2 * max_len`` tokens and attention is a softmax over
those ``2 * max_len`` keys with a per-token mask. The last block needs the last column's
query only, and never forms the fresh tokens' keys and values (the projections are moved
onto the query and the attention-weighted sum). About a fifth of the arithmetic of running
every variant through the model, the same numbers up to float rounding
(``tests/test_loo_forward.py`` checks against the model run on each variant).

The embeddings and ``O``/``S``'s per-layer states come from the model's own forward (hooks
on its blocks), so item/time/genre/text inputs and the position scheme are whatever
:class:`~common.models.sasrec.SASRec` does; only the block arithmetic is repeated here, and
:func:`supported` limits it to the block classes it repeats.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.nn import functional as F

from common.models.sasrec import CausalSelfAttention, SASRec, TransformerBlock

_HOOKS = threading.Lock()  # forward hooks belong to the module: one capture at a time


def supported(model: torch.nn.Module) -> bool:
    """Whether :func:`loo_hidden` repeats this model's arithmetic (SASRec blocks, eval mode)."""
    return (isinstance(model, SASRec) and not model.training and len(model.blocks) > 0
            and all(type(b) is TransformerBlock and type(b.attn) is CausalSelfAttention for b in model.blocks))


@dataclass(frozen=True)
class SharedStates:
    """One forward of the model over ``full`` (O) and ``without_last`` (S), model inputs of width T."""

    full: torch.Tensor  # (1, T) or (1, T, 2)
    without_last: torch.Tensor
    block_inputs: list[torch.Tensor]  # per block, its input states (2, T, dim): row 0 O, row 1 S
    final: torch.Tensor  # (2, dim) final hidden states of the last column: O's and S's


@torch.inference_mode()
def shared_states(model: SASRec, full: torch.Tensor, without_last: torch.Tensor) -> SharedStates:
    """Run the model once over O and S, keeping each block's input (``final[0]`` gives O's scores)."""
    captured: list[torch.Tensor] = []
    with _HOOKS:
        handles = [b.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for b in model.blocks]
        try:
            final = model.hidden(torch.cat([full, without_last]), last_only=True)[:, -1]
        finally:
            for h in handles:
                h.remove()
    return SharedStates(full, without_last, captured, final)


@torch.inference_mode()
def loo_hidden(model: SASRec, shared: SharedStates, columns: list[int]) -> torch.Tensor:
    """(1 + len(columns), dim) final hidden states: row 0 for O, row 1 + r for O with the item
    in column ``columns[r]`` removed. Columns ascend; each holds an item."""
    t = shared.full.shape[1]
    if any(b <= a for a, b in zip(columns, columns[1:])) or (columns and not 0 <= columns[0] <= columns[-1] < t):
        raise ValueError(f"columns must ascend within 0..{t - 1}: {columns}")
    inner = [q for q in columns if q != t - 1]  # column T - 1's variant is S itself
    rows = [shared.final[:1]]
    if inner:
        pad_o, pad_s = (_items(x)[0] == 0 for x in (shared.full, shared.without_last))
        layout = _layout(t, tuple(inner), tuple(pad_o.tolist()), tuple(pad_s.tolist()))
        rows.append(_variants_hidden(model, shared.block_inputs, layout))
    if len(inner) < len(columns):
        rows.append(shared.final[1:])
    return torch.cat(rows)


def _items(x: torch.Tensor) -> torch.Tensor:
    return x[..., 0] if x.dim() == 3 else x


@dataclass(frozen=True)
class _Layout:
    """Which tokens each variant computes and what they may attend to; depends only on T, the
    removed columns and where the padding is, so it is cached."""

    fresh: torch.Tensor  # (n, T) bool: variant r computes column i itself (i > its removed column)
    row_of: torch.Tensor  # (N,) variant of each fresh token, row-major (as fresh.nonzero())
    col_of: torch.Tensor  # (N,) column of each fresh token
    last: torch.Tensor  # (n,) index of each variant's last column among the fresh tokens
    flat: torch.Tensor  # (N,) each fresh token's index in a flattened (n, T)
    first_bias: torch.Tensor  # (N, 2T) 0 / -inf over the first block's keys [S's T; O's T]
    last_bias: torch.Tensor  # (n, T) 0 / -inf over the last column's keys
    allowed: torch.Tensor  # (n, T, T) bool: the model's own mask per variant (middle blocks)


@lru_cache(maxsize=512)
def _layout(t: int, cols: tuple[int, ...], pad_o: tuple[bool, ...], pad_s: tuple[bool, ...]) -> _Layout:
    col = torch.arange(t)
    q = torch.tensor(cols)
    fresh = col[None, :] > q[:, None]
    row_of, col_of = fresh.nonzero().unbind(1)
    pad_o_t, pad_s_t = torch.tensor(pad_o), torch.tensor(pad_s)
    key_pad = torch.where(fresh, pad_o_t[None], pad_s_t[None])
    # The model's mask: earlier non-padding keys, and every query sees itself
    allowed = (torch.ones(t, t, dtype=torch.bool).tril() & ~key_pad[:, None, :]) | torch.eye(t, dtype=torch.bool)
    q_tok, i_tok = q[row_of][:, None], col_of[:, None]  # a fresh token's removed column and own column
    from_s = (col[None] <= q_tok) & ~pad_s_t[None]  # S's keys in the shared columns
    from_o = (((col[None] > q_tok) & (col[None] <= i_tok)) & ~pad_o_t[None]) | (col[None] == i_tok)
    first_allowed = torch.cat([from_s, from_o], dim=1)
    last_allowed = allowed[:, -1]
    return _Layout(fresh, row_of, col_of, fresh.sum(1).cumsum(0) - 1, row_of * t + col_of, _bias(first_allowed),
                   _bias(last_allowed), allowed)


def _bias(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


def _variants_hidden(model: SASRec, block_inputs: list[torch.Tensor], layout: _Layout) -> torch.Tensor:
    """Final hidden (n, dim) of the variants in ``layout`` from O's and S's block inputs."""
    blocks = list(model.blocks)
    x_o = block_inputs[0][0]
    if len(blocks) == 1:
        x = x_o[layout.col_of]
    else:
        x = _first_block(blocks[0], x_o, block_inputs[0][1], layout)
        for layer in range(1, len(blocks) - 1):
            x = _middle_block(blocks[layer], x, block_inputs[layer][1], layout)
    return model.final_norm(_last_block(blocks[-1], x, block_inputs[-1][1], layout))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, d) -> (heads, N, d / heads)."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def _feed_forward(block: TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    return x + block.ff2(torch.relu(block.ff1(block.norm2(x))))


def _first_block(block: TransformerBlock, x_o: torch.Tensor, x_s: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Block 1 for the fresh tokens (N, d): queries are O's, keys and values S's or O's."""
    attn, t, d = block.attn, x_o.shape[0], x_o.shape[1]
    h = attn.num_heads
    q, k, v = attn.qkv(block.norm1(torch.cat([x_s, x_o]))).split(d, dim=-1)  # (2T, d) each, S's rows first
    logits = (_heads(q[t:], h) @ _heads(k, h).transpose(1, 2)) / math.sqrt(d // h)  # (heads, T, 2T)
    p = torch.softmax(logits.index_select(1, layout.col_of) + layout.first_bias, dim=-1)  # (heads, N, 2T)
    # out(sum_j p_j v_j) = sum_j p_j out_h(v_j) + bias: project the 2T values, not the N outputs
    projected = _heads(v, h) @ attn.out.weight.view(d, h, d // h).permute(1, 2, 0)  # (heads, 2T, d)
    y = p @ projected
    return _feed_forward(block, x_o.index_select(0, layout.col_of) + (y.sum(0) if h > 1 else y[0]) + attn.out.bias)


def _middle_block(block: TransformerBlock, x: torch.Tensor, x_s: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """A block between the first and the last: each variant's (T, T) attention, S's states in its shared columns."""
    attn, (n, t), d = block.attn, layout.fresh.shape, x.shape[1]
    h = attn.num_heads
    fresh = layout.fresh[..., None]
    qkv = torch.where(fresh, x.new_zeros(n, t, 3 * d).masked_scatter(fresh, attn.qkv(block.norm1(x))),
                      attn.qkv(block.norm1(x_s))[None])
    q, k, v = qkv.view(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
    att = ((q @ k.transpose(-1, -2)) / math.sqrt(d // h)).masked_fill(~layout.allowed[:, None], float("-inf"))
    y = (torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(n, t, d)
    return _feed_forward(block, x + attn.out(y[layout.fresh]))


def _last_block(block: TransformerBlock, x: torch.Tensor, x_s: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The last block for each variant's last column only: (n, d). Keys are S's in the shared
    columns and the variant's own fresh tokens after them.

    The fresh tokens' keys and values are never formed: q . (W_k u + b_k) = (W_k^T q) . u + q . b_k,
    and sum_j p_j (W_v u_j + b_v) = W_v (sum_j p_j u_j) + b_v sum_j p_j, for normalised states u.
    """
    attn, fresh, d = block.attn, layout.fresh, x.shape[1]
    h, (n, t), row_of = attn.num_heads, fresh.shape, layout.row_of
    w_q, w_k, w_v = (w.view(h, d // h, d) for w in attn.qkv.weight.split(d))  # per head (d/h, d)
    b_q, b_k, b_v = (b.view(h, 1, d // h) for b in attn.qkv.bias.split(d))
    _, k_s, v_s = attn.qkv(block.norm1(x_s)).split(d, dim=-1)
    u = block.norm1(x)  # (N, d)
    q = u.index_select(0, layout.last) @ w_q.transpose(1, 2) + b_q  # (heads, n, d/h)
    scale = math.sqrt(d // h)
    logits = q @ _heads(k_s, h).transpose(1, 2)  # (heads, n, T), right in the shared columns
    q_k = q @ w_k  # (heads, n, d): the query moved onto the normalised states
    fresh_logits = (q_k.index_select(1, row_of) * u).sum(-1) + (q * b_k).sum(-1).index_select(1, row_of)
    logits = logits.view(h, -1).index_copy_(1, layout.flat, fresh_logits).view(h, n, t)
    p = torch.softmax(logits / scale + layout.last_bias, dim=-1)
    p_fresh = p.view(h, -1).index_select(1, layout.flat)  # (heads, N)
    y = p.masked_fill(fresh, 0.0) @ _heads(v_s, h)  # the shared columns' values: (heads, n, d/h)
    mixed = u.new_zeros(h, n, d).index_add_(1, row_of, p_fresh[..., None] * u)  # sum_j p_j u_j per variant
    y = y + mixed @ w_v.transpose(1, 2) + b_v * p.masked_fill(~fresh, 0.0).sum(-1, keepdim=True)
    return _feed_forward(block, x.index_select(0, layout.last) + F.linear(y.transpose(0, 1).reshape(n, d),
                                                                         attn.out.weight, attn.out.bias))
