"""The MF baseline's private user factors: kept in the partner's ``context.state``, never sent.

Only item factors and biases travel (``common.models.mf``). The user factors are stored
with a fingerprint of the partner's users, so a changed log starts them afresh instead of
silently attaching factors to the wrong users.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from common.data.sequences import SequenceData
from common.evaluation import evaluate_model
from common.item_chain import chain_from_config
from common.models.mf import MatrixFactorization, train_mf_local

STATE_KEY = "mf-user-factors"
META_KEY = "mf-user-factors-users"  # one RecordDict namespace: a distinct key per record


def _users_key(data: SequenceData) -> str:
    return hashlib.sha256("\x1f".join(map(str, data.user_ids.tolist())).encode()).hexdigest()[:16]


def load_user_factors(context: Context, data: SequenceData, dim: int) -> torch.Tensor | None:
    """This partner's user factors (rows in ``data`` order), or ``None`` before its first round."""
    arrays = context.state.array_records.get(STATE_KEY)
    meta = context.state.config_records.get(META_KEY)
    if arrays is None or meta is None or meta.get("users") != _users_key(data):
        return None
    factors = arrays.to_torch_state_dict()["factors"]
    return factors if tuple(factors.shape) == (data.num_users, dim) else None


def save_user_factors(context: Context, data: SequenceData, factors: torch.Tensor) -> None:
    context.state.array_records[STATE_KEY] = ArrayRecord({"factors": factors.detach().cpu()})
    context.state.config_records[META_KEY] = ConfigRecord({"users": _users_key(data)})


def mf_trainer(context: Context) -> Callable[..., Any]:
    """A drop-in for ``common.training.train_local`` that keeps the user factors in ``context.state``."""

    def train(model: MatrixFactorization, data: SequenceData, **kwargs: Any):
        result, factors = train_mf_local(model, data, load_user_factors(context, data, model.dim), **kwargs)
        save_user_factors(context, data, factors)
        return result

    return train


def evaluate_partner(model: torch.nn.Module, data: SequenceData, context: Context, cfg: Mapping[str, Any],
                     device: torch.device | str = "cpu") -> dict:
    """Evaluation sums (``common.evaluation``) plus ``partition-id``; MF refits the private factors
    against the model being evaluated, warm-started from the stored ones (from zero when this
    partner has not trained yet): the stored factors were fitted to the partner's own item factors
    before aggregation, so the global model scored with them as they are reads 2-6% low."""
    factors = None
    if isinstance(model, MatrixFactorization):
        from common.metrics import pad_left

        stored = load_user_factors(context, data, model.dim)
        factors = model.fit_users(pad_left(data.train_sequences(), model.max_len).to(device),
                                  init=None if stored is None else stored.to(device)).cpu()
    # the partner's own item chain (never sent): SASRec only, like the other sequence-scoring knobs
    chain = None if factors is not None else chain_from_config(cfg, data.train_sequences(), data.num_items + 1)
    sums = evaluate_model(model, data, max_len=int(cfg["max-seq-len"]), top_k=int(cfg["top-k"]), device=device,
                          user_factors=factors, tie_orders=int(cfg["tie-orders"]), chain=chain)
    pid = context.node_config.get("partition-id")
    if pid is not None:
        sums["partition-id"] = int(pid)
    else:
        # A real partner keeps its recommended item ids: a small partner's top-K lists (seen items left out)
        # are close to the complement of its users' histories. Catalogue coverage is a simulation metric.
        sums = {k: v for k, v in sums.items() if not k.startswith("rec-items@")}
    return sums
