"""SASRec: a causal self-attention sequential recommender written for Opacus.

Attention is built from ``nn.Linear``/``nn.LayerNorm`` (Opacus rejects
``nn.MultiheadAttention`` and ``DPMultiheadAttention`` has no causal mask). The output
layer is tied to the item embedding through an ``nn.Linear`` that *shares the embedding's
Parameter*, so both uses go through modules Opacus hooks see: Opacus accumulates the two
per-sample gradient contributions of the shared weight (checked in
``tests/test_per_sample_gradients.py`` against one-user-at-a-time back-propagation).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.models.context import NUM_TIME_BUCKETS
from common.models.fast_dropout import FastDropout  # nn.Dropout's CPU mask cost a quarter of an epoch


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from plain linear layers."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding-dim {dim} must be divisible by num-heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = FastDropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        if last_only:  # only the last position's output is wanted (inference, client/explain.py)
            q, allowed = q[:, :, -1:], allowed[:, -1:]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)
        att = att.masked_fill(~allowed[:, None], float("-inf"))
        att = self.dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, q.shape[2], d)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Pre-norm attention + feed-forward block with residual connections."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, dim)
        self.ff2 = nn.Linear(dim, dim)
        self.dropout = FastDropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        attended = self.dropout(self.attn(self.norm1(x), allowed, last_only))
        x = (x[:, -1:] if last_only else x) + attended
        return x + self.dropout(self.ff2(self.dropout(torch.relu(self.ff1(self.norm2(x))))))


class SASRec(nn.Module):
    """Scores the whole catalogue after each position of a left-padded item sequence.

    Item index 0 is padding. ``forward(seq)`` returns logits of shape (batch, length,
    num_items + 1); column 0 is never a valid target.
    """

    def __init__(
        self,
        num_items: int,
        *,
        max_len: int = 50,
        dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        tied_output: bool = True,
        time_features: bool = False,
        item_genres: torch.Tensor | None = None,
        item_prior: bool = False,
    ) -> None:
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_dropout = FastDropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(dim)
        # item-prior: a per-item score offset set by the coordinator (common/item_prior.py), frozen, so no
        # partner trains, clips or noises it; it travels with the weights and adds to every score
        self.output = nn.Linear(dim, num_items + 1, bias=item_prior)
        if item_prior:
            nn.init.zeros_(self.output.bias)
            self.output.bias.requires_grad_(False)
        self.tied_output = tied_output
        # Context inputs (common/models/context.py), off by default: gap buckets and item genres
        self.time_features = time_features
        self.time_emb = nn.Embedding(NUM_TIME_BUCKETS, dim, padding_idx=0) if time_features else None
        self.genre_proj = None
        if item_genres is not None:
            self.register_buffer("item_genres", item_genres.float())  # public metadata; travels with the weights
            self.genre_proj = nn.Linear(item_genres.shape[1], dim, bias=False)
        nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
        if tied_output:
            self.output.weight = self.item_emb.weight  # one Parameter, two modules

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        if self.tied_output:
            merge_tied_copies(state_dict, f"{prefix}item_emb.weight", f"{prefix}output.weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hidden(self, seq: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        """Hidden states (batch, length, dim); ``last_only``: the last position's, (batch, 1, dim),
        with the final block computed for that position alone (same numbers, less work)."""
        gaps = None
        if seq.dim() == 3:  # (batch, length, 2): item indices and time-gap buckets
            seq, gaps = seq[..., 0], seq[..., 1]
        b, t = seq.shape
        pad = seq == 0
        # Right-aligned positions: the last item is always position max_len - 1, so a batch
        # whose leading all-padding columns were trimmed (common/objectives.py: trim_padding) scores the same.
        positions = torch.arange(self.max_len - t, self.max_len, device=seq.device).expand(b, t).contiguous()
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        if self.time_emb is not None and gaps is not None:
            x = x + self.time_emb(gaps)
        if self.genre_proj is not None:
            x = x + self.genre_proj(self.item_genres[seq])
        x = self.emb_dropout(x) * (~pad).unsqueeze(-1)
        causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
        # Keys: earlier non-padding positions; every query may see itself so no row is empty.
        allowed = (causal & ~pad[:, None, :]) | torch.eye(t, dtype=torch.bool, device=seq.device)
        for n, block in enumerate(self.blocks):
            x = block(x, allowed, last_only and n == len(self.blocks) - 1)
        return self.final_norm(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(seq))

    @torch.no_grad()
    def score(self, histories: torch.Tensor) -> torch.Tensor:
        """Scores over item indices 0..V for the next item after each left-padded history."""
        return self.output(self.hidden(histories)[:, -1])


def merge_tied_copies(state_dict: dict, *keys: str) -> None:
    """Give every copy of a tied Parameter in ``state_dict`` the copies' mean.

    A tied weight travels once per module that uses it. Central DP noises (and SecAgg+ rounds)
    each copy independently, so aggregated copies can differ; loading them one after the other
    would keep only the last. Their mean is post-processing of what was released and halves the
    noise variance; equal copies (no DP, local DP) are unchanged.
    """
    copies = [state_dict[k] for k in keys if k in state_dict]
    if len(copies) > 1 and any(not torch.equal(copies[0], c) for c in copies[1:]):
        mean = torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in copies]).mean(dim=0).to(copies[0].dtype)
        for k in keys:
            if k in state_dict:
                state_dict[k] = mean


def tied_key_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Groups of ``model.state_dict()`` keys that are one tensor (a tied Parameter), e.g.
    ``("item_emb.weight", "output.weight")`` for SASRec with ``tied-output``."""
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(key)
    return [tuple(keys) for keys in by_tensor.values() if len(keys) > 1]

