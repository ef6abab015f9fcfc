"""Why an item was recommended: leave-one-out influence of each history item on its score.

The influence of history item ``h`` on recommended item ``j`` is
``score_j(history) - score_j(history without h)``, computed with the same model that
ranked ``j``: for SASRec one forward over the history and the history without its last item,
then only the states each removal changes (``client/loo_forward.py``); for other models one
batched forward pass over the history with each item removed in turn.
A positive influence means the item raised ``j``'s score: the reason names the items with
the largest positive influence. An item the user had several times is listed once, with the
influence of its most influential event (removing that one event, not all of them). Nothing is
invented: removing the first named item's event lowers ``j``'s score by exactly the reported
influence. With ``time-features`` and the events' timestamps given, a removal is the event never
having happened: the next event's time gap is re-derived from the timestamps (its gap to the event
before the removed one), and each variant runs through the model (the shared-prefix path keeps every
recorded gap, a counterfactual that differed in sign for a few percent of named reasons: a review).

Only the last ``max_len`` items are inputs of the model, so only they can have influence;
removing one lets the next older item enter the window, as it would in the real history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from client.loo_forward import SharedStates, loo_hidden, shared_states, supported
from common.item_chain import ItemChain
from common.models.context import model_inputs, time_gap_buckets
from common.models.sasrec import SASRec

MAX_REASONS = 2  # items named in the one-line reason


@dataclass
class Influence:
    index: int  # item index in the catalogue (1-based)
    name: str
    influence: float  # score units of the ranking (logits; with an item chain, the blend's log-probabilities)
    item_id: str | None = None  # the raw id: titles are not unique (ML-100K has ids sharing one)


@dataclass
class Explanation:
    because: list[Influence]  # positive influences, largest first (up to `keep`; the reason names MAX_REASONS)
    reason: str

    def to_dict(self) -> dict:
        return {"reason": self.reason,
                "because": [{"item_id": b.item_id, "item": b.name, "influence": round(b.influence, 6)}
                            for b in self.because]}


def history_states(model: torch.nn.Module, history: np.ndarray, gaps: np.ndarray | None,
                   max_len: int) -> SharedStates | None:
    """One forward over ``history`` and ``history[:-1]`` that :func:`leave_one_out` builds on
    (``final[0]``: the history's hidden state, for its scores); None if the model has no fast path."""
    history = np.asarray(history, dtype=np.int64)
    if not len(history) or not supported(model):
        return None
    gaps = np.zeros_like(history) if gaps is None else np.asarray(gaps, dtype=np.int64)
    # NOTE: a removed item's successor keeps its own recorded gap (the time it actually happened after its
    # predecessor), so a variant's columns after the removed one are the full history's, gaps included
    return shared_states(model, model_inputs(model, [history], max_len, [gaps]),
                         model_inputs(model, [history[:-1]], max_len, [gaps[:-1]]))


@torch.inference_mode()
def leave_one_out(model: torch.nn.Module, history: np.ndarray, gaps: np.ndarray | None, targets: list[int],
                  max_len: int, *, states: SharedStates | None = None,
                  times: np.ndarray | None = None, chain: ItemChain | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions, influence): the history positions that are model inputs (the last ``max_len``)
    and a (positions, targets) matrix of ``score(history) - score(history without that position)``.

    ``states``: :func:`history_states` of this same history, if already computed. ``times``: the
    events' timestamps; a ``time-features`` model then re-derives a variant's gaps from them. ``chain``: the
    partner's item chain the ranking blends in (common/item_chain.py): scores are then the blend's, so a
    removal also changes what the chain reads from the user's recent items."""
    history = np.asarray(history, dtype=np.int64)
    gaps = np.zeros_like(history) if gaps is None else np.asarray(gaps, dtype=np.int64)
    positions = np.arange(max(0, len(history) - max_len), len(history))
    rederive = times is not None and bool(getattr(model, "time_features", False))
    if not rederive:
        states = states if states is not None else history_states(model, history, gaps, max_len)
    if states is not None and not rederive:  # the variants share prefixes: each state computed once (loo_forward)
        hidden = loo_hidden(model, states, (max_len - len(history) + positions).tolist())
        scores = (_target_scores(model, hidden, targets) if chain is None
                  else _blended(model.output(hidden), _variants(history, positions), targets, chain))
        return positions, (scores[:1] - scores[1:]).cpu().numpy()
    variants = _variants(history, positions)
    variant_gaps = [gaps] + ([time_gap_buckets(np.delete(np.asarray(times, dtype=np.int64), p)) for p in positions]
                             if rederive else [np.delete(gaps, p) for p in positions])
    inputs = model_inputs(model, variants, max_len, variant_gaps)
    if chain is not None:
        full = model.output(model.hidden(inputs, last_only=True)[:, -1]) if isinstance(model, SASRec) else model.score(inputs)
        scores = _blended(full, variants, targets, chain)
    elif isinstance(model, SASRec):
        scores = _target_scores(model, model.hidden(inputs, last_only=True)[:, -1], targets)
    else:
        scores = model.score(inputs)[:, targets]
    return positions, (scores[:1] - scores[1:]).cpu().numpy()


def _variants(history: np.ndarray, positions: np.ndarray) -> list[np.ndarray]:
    """The history, then the history without each of ``positions`` in turn."""
    return [history] + [np.delete(history, p) for p in positions]


def _blended(full: torch.Tensor, variants: list[np.ndarray], targets: list[int], chain: ItemChain) -> torch.Tensor:
    """(rows, targets) of :meth:`ItemChain.blend` for each variant's full-catalogue model scores ``full``."""
    return chain.blend(full, variants)[:, targets]


def _target_scores(model: SASRec, hidden: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """(rows, targets) scores from final hidden states (rows, dim), as ``score()[:, targets]``."""
    if isinstance(model.output, torch.nn.Linear) and model.output.bias is None:
        return hidden @ model.output.weight[targets].T  # without scoring the whole catalogue for every row
    return model.output(hidden)[:, targets]


def explain_items(model: torch.nn.Module, history: np.ndarray, gaps: np.ndarray | None, targets: list[int],
                  max_len: int, *, name: Callable[[int], str], item_id: Callable[[int], str] | None = None,
                  keep: int = 5, states: SharedStates | None = None, times: np.ndarray | None = None,
                  chain: ItemChain | None = None) -> list[Explanation]:
    """One :class:`Explanation` per target item index; ``name(index)`` labels a history item and
    ``item_id(index)`` gives its raw id; ``states``: :func:`history_states` of this history, if already computed;
    ``times``: the events' timestamps and ``chain`` the partner's item chain (see :func:`leave_one_out`)."""
    if not targets:
        return []
    positions, influence = leave_one_out(model, history, gaps, targets, max_len, states=states, times=times, chain=chain)
    out = []
    for col in range(len(targets)):
        order = np.argsort(-influence[:, col], kind="stable")
        top: list[Influence] = []
        for r in order:
            item = int(history[positions[r]])
            if influence[r, col] <= 0 or len(top) == keep:
                break
            if all(t.index != item for t in top):  # strongest first: a repeated item's first row is its largest
                top.append(Influence(item, name(item), float(influence[r, col]), item_id(item) if item_id else None))
        reason = _reason(top)
        if hasattr(model, "item_text"):  # item-features text / id+text: say which watched item's text is closest
            from common.models.text_sasrec import closest_in_text

            if (close := closest_in_text(model, history, targets[col])) is not None:
                reason += f"; its title and genres are closest to {name(close[0])} (text similarity {close[1]:.2f})"
        out.append(Explanation(top, reason))
    return out


def _reason(top: list[Influence]) -> str:
    names = list(dict.fromkeys(t.name for t in top))[:MAX_REASONS]  # two ids sharing a title: named once
    if not names:
        # "from your history as a whole" was often untrue: an empty history scored such items higher (a review)
        return "no single item you watched raises its score (removing any one of them would not lower it)"
    return "because you watched " + " and ".join(names)
