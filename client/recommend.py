"""Top-K recommendations for one of a partner's users from the latest global model.

The model file is a run directory's ``model.pt`` (``server/run_report.py``: state dict,
catalogue, run config). A user's history comes from the partner's own log or event store
and never leaves the partner. Items the user has already seen are excluded; a user with no
usable history (unknown, or only items outside the catalogue) gets the partner's most
popular items, labelled ``cold_start``.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from client.explain import Explanation, explain_items, history_states
from common.data.loaders import Interactions
from common.errors import DataError, FedRecError
from common.item_chain import ItemChain, chain_from_config
from common.item_text import record_mismatch, table_record
from common.model_file import read_model_file
from common.models import build_model
from common.models.context import model_inputs, time_gap_buckets


LOG = logging.getLogger("fedrec.recommend")


class HistorySource(Protocol):
    """Where users' histories come from: an :class:`~common.data.event_store.EventStore` or a :class:`LogHistory`."""

    def history(self, user_id: str) -> tuple[list[str], np.ndarray]: ...

    def item_counts(self) -> dict[str, int]: ...

    def all_histories(self) -> list[list[str]]: ...


class LogHistory:
    """Histories from an interaction log already in memory (the ``recommend`` CLI on a CSV/MovieLens log)."""

    def __init__(self, log: Interactions) -> None:
        # Stable sort: ties at one timestamp keep file order, as in common/data/sequences.py
        order = np.lexsort((np.arange(len(log)), log.timestamp, log.user))
        self._users, self._items, self._times = log.user[order], log.item[order], log.timestamp[order]
        uniq, first, counts = np.unique(self._users, return_index=True, return_counts=True)
        self._start = {u: (int(f), int(f + c)) for u, f, c in zip(uniq.tolist(), first, counts)}

    def history(self, user_id: str) -> tuple[list[str], np.ndarray]:
        lo, hi = self._start.get(str(user_id), (0, 0))
        return self._items[lo:hi].tolist(), self._times[lo:hi]

    def all_histories(self) -> list[list[str]]:
        return [self._items[lo:hi].tolist() for lo, hi in self._start.values()]

    def item_counts(self) -> dict[str, int]:
        items, counts = np.unique(self._items, return_counts=True)
        return dict(zip(items.tolist(), counts.tolist()))

    def unknown_user_hint(self, user_id: str) -> str | None:
        """None if the log has ``user_id``; else a line saying so, naming a likely intended id
        (spaces or leading zeros typed by mistake, or the closest spelling)."""
        user = str(user_id)
        if user in self._start:
            return None
        stripped = user.strip()
        candidates = [c for c in (stripped, stripped.lstrip("0") or "0") if c in self._start]
        candidates = candidates or difflib.get_close_matches(stripped, list(self._start), n=1, cutoff=0.85)
        hint = f" (did you mean {candidates[0]!r}?)" if candidates else ""
        return f"warning: user {user!r} has no events in this log{hint}; showing the cold-start list"


def catalogue_mismatch(gm: "GlobalModel", counts: dict[str, int]) -> str | None:
    """A warning line when more than :data:`MISMATCH_WARNING` of the events (``counts``: item id ->
    events) are items the model does not know: another federation's model, or a log with other item
    ids. Those events are left out of every history, so recommendations quietly ignore them."""
    from client.data_check import MISMATCH_WARNING  # one threshold for `data check` and serving

    total = sum(counts.values())
    unknown = {i: c for i, c in counts.items() if i not in gm.index}
    share = sum(unknown.values()) / total if total else 0.0
    if share <= MISMATCH_WARNING:
        return None
    return (f"warning: {100.0 * share:.0f}% of the events (those on {len(unknown)} of the log's {len(counts)} items) "
            f"are on items not in the catalogue of {gm.path} ({len(gm.catalogue)} items) and are ignored: is it this "
            "federation's model?")


def titles_mismatch(gm: "GlobalModel", titles: dict[str, str], source: object) -> str | None:
    """A warning line when ``titles`` (from ``source``) name fewer than half of the model's items: another
    catalogue's metadata, or a cut file; every other title prints as "-" without a word (a serving review)."""
    if not titles:
        return None
    named = sum(1 for item in gm.catalogue.tolist() if item in titles)
    if named < 0.5 * len(gm.catalogue):
        return (f"warning: metadata {source} has titles for {named} of the {len(gm.catalogue)} items of {gm.path}: "
                "is it this catalogue's item metadata? the others print without a title")
    if str(gm.config.get("item-features", "id")) in ("text", "id+text"):  # the model knows its items' texts
        from common.item_text import catalogue_text_features, texts_name_other_items

        try:
            _, texts = catalogue_text_features(gm.config, gm.catalogue)  # read when the model loaded: cached
        except FedRecError:
            return None
        if found := texts_name_other_items(gm.catalogue, texts, titles):
            # another data set's metadata named every reason wrongly, without a word (an explanations review)
            return f"warning: metadata {source}: {found}, the texts {gm.path} was built on: is it this catalogue's?"
    return None


@dataclass
class GlobalModel:
    """A loaded global model: the network, its catalogue and where it came from."""

    model: torch.nn.Module
    catalogue: np.ndarray  # raw item ids; item index i+1 <-> catalogue[i]
    config: dict[str, Any]
    path: Path
    version: float  # the file's modification time (unix seconds): a newer file is a newer model
    index: dict[str, int] = field(default_factory=dict)

    @property
    def max_len(self) -> int:
        return int(self.config.get("max-seq-len", 50))


_AGGREGATED: dict[tuple[str, int, int], int | None] = {}  # (file, mtime, size) -> rounds-aggregated
_PASSED_OVER: set[tuple[str, int, int]] = set()  # untrained files already warned about (serve checks every few s)


def _file_id(file: Path) -> tuple[str, int, int]:
    st = file.stat()
    return str(file), st.st_mtime_ns, st.st_size


def rounds_aggregated(file: Path) -> int | None:
    """How many rounds of its run had aggregated an update when ``file`` was written (0: the run's initial
    model, every round failed); None for a file that does not say (written before it did, or unreadable:
    loading it says what is wrong)."""
    key = _file_id(file)
    if key not in _AGGREGATED:
        try:
            value = read_model_file(file).get("rounds-aggregated")
        except DataError:
            value = None
        _AGGREGATED[key] = int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    return _AGGREGATED[key]


def find_model_file(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a file; in a folder its ``model.pt``, else the newest ``*/model.pt`` of a run
    that aggregated an update (a folder of run directories: the latest trained model; a run whose every
    round failed left its initial model there, which was served as the newest)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "model.pt").is_file():
            return p / "model.pt"
        candidates = sorted((c for c in p.glob("*/model.pt") if c.is_file()), key=lambda c: c.stat().st_mtime,
                            reverse=True)
        for file in candidates:
            if rounds_aggregated(file) != 0:
                return file
            if (key := _file_id(file)) not in _PASSED_OVER:
                _PASSED_OVER.add(key)
                LOG.warning("passing over %s: no round of its run aggregated an update (it is the initial model)", file)
        if candidates:
            raise DataError(f"{p}: no trained model: every model.pt under it is from a run in which no round "
                            f"aggregated an update (newest: {candidates[0]})")
        raise DataError(f"{p}: no model.pt in this folder or its run directories (train a run first)")
    if p.exists():  # a device, a pipe: os.path.exists, not is_file
        raise DataError(f"model {p}: not a regular file (give a run directory or its model.pt)")
    raise DataError(f"model {p}: no such file or directory")


def load_global_model(path: str | os.PathLike) -> GlobalModel:
    """Load ``model.pt`` (or the newest one under a folder); a bad file is one :class:`DataError` line."""
    file = find_model_file(path)
    version = file.stat().st_mtime
    blob = read_model_file(file)  # a foreign or corrupt file: one DataError line
    if blob.get("rounds-aggregated") == 0:  # asked for by name (a folder scan passes over it)
        LOG.warning("model %s: no round of its run aggregated an update, so it is the run's initial (untrained) "
                    "model", file)
    state, catalogue, config = blob["state_dict"], np.asarray(blob["catalogue"], dtype=str), blob["config"]
    missing = [k for k in ("model", "max-seq-len", "embedding-dim") if k not in config]
    if config.get("model", "sasrec") == "sasrec":
        missing += [k for k in ("num-blocks", "num-heads", "dropout", "tied-output") if k not in config]
    if missing:  # an older version's file: its config lacks knobs this version builds the model from
        raise DataError(f"model {file}: its config lacks {', '.join(missing)} (a model file from an older version?); "
                        "train it again with this version")
    try:
        if not isinstance(state, dict):
            raise TypeError(f"state_dict is a {type(state).__name__}, not a mapping of weights")
        try:
            model = build_model(config, len(catalogue), item_genres=state.get("item_genres"), catalogue=catalogue)
        except DataError as exc:
            if not config.get("item-text-features"):
                raise
            # "set item-text-features" is run-config advice: serving reads the path stored in model.pt (a review)
            raise DataError(f"model {file}: a text model, whose item texts are read from item-text-features = "
                            f"{config['item-text-features']!r} in its config: put the coordinator's published file "
                            f"at that path ({exc})") from None
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        # torch's first line is only a header ("Error(s) in loading state_dict for X:"): name the first mismatch too
        first = "; ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(exc).__name__)
        hint = (" (a text model: is item-text-features the file it was trained with?)"
                if config.get("item-features", "id") != "id" else "")
        raise DataError(f"model {file}: weights do not match its config ({first}){hint}") from None
    # the frozen text table is rebuilt from the features file or metadata the config names, not stored
    if why := record_mismatch(blob.get("item-text"), table_record(model, config, catalogue), config):
        raise DataError(f"model {file}: {why}; serve it with the file it was trained with")
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise DataError(f"model {file}: weights contain NaN or infinite values (a diverged or corrupt model); "
                        "use an earlier round's model or train again")
    model.eval()
    index = {item: i + 1 for i, item in enumerate(catalogue.tolist())}
    return GlobalModel(model, catalogue, config, file, version, index)


@dataclass
class Recommendation:
    item_id: str
    title: str | None
    score: float
    explanation: Explanation | None = None


@dataclass
class RecommendationList:
    user_id: str
    items: list[Recommendation]
    cold_start: bool
    strategy: str  # "model", or for cold start "popularity" ("catalogue-order" when this partner has no counts)
    history_length: int  # the user's events, all of them (including items outside the catalogue)
    popular: int = 0  # cold start: how many items are ranked by popularity (the rest fill up in catalogue order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "cold_start": self.cold_start,
            "strategy": self.strategy,
            "history_length": self.history_length,
            "items": [
                {"rank": r, "item_id": rec.item_id, "title": rec.title, "score": round(rec.score, 6),
                 **({"explanation": rec.explanation.to_dict()} if rec.explanation is not None else {})}
                for r, rec in enumerate(self.items, start=1)
            ],
        }


class Recommender:
    """Scores a user's history with a :class:`GlobalModel`; ``titles`` maps item id -> title.

    ``use_chain`` false: rank by the model alone even when its run config blends in the partner's item chain
    (the partner's opt-out, ``--no-chain``). ``chain_refresh_s``: new events enter the chain at most this
    often (a rebuild reads the whole store: about 0.3 s at 100,000 events, on the server's event loop)."""

    def __init__(self, model: GlobalModel, titles: dict[str, str] | None = None, *, use_chain: bool = True,
                 chain_refresh_s: float = 0.0) -> None:
        self.gm = model
        self.titles = titles or {}
        self.use_chain = use_chain
        self.chain_refresh_s = chain_refresh_s
        # (source and its event count, when last checked, the chain)
        self._chain: tuple[tuple, float, ItemChain | None] | None = None

    def title(self, item_id: str) -> str | None:
        return self.titles.get(item_id)

    def chain(self, source: HistorySource) -> ItemChain | None:
        """The partner's item chain over every history in ``source`` when the model's run config blends one
        in (``chain-weight`` > 0; common/item_chain.py), as its evaluation did; rebuilt when ``source`` has
        new events. Serving has no held-out items: every event counts."""
        if (not self.use_chain or float(self.gm.config.get("chain-weight", 0.0)) <= 0
                or self.gm.config.get("model", "sasrec") != "sasrec"):
            return None  # (MF ignores the chain knobs, as its evaluation does)
        now = time.monotonic()
        if self._chain is not None and self._chain[0][0] == id(source) and now - self._chain[1] < self.chain_refresh_s:
            return self._chain[2]  # checked within the refresh window: no store query on the request's path
        key = (id(source), source.count() if hasattr(source, "count") else None)
        if self._chain is None or self._chain[0] != key:
            index = self.gm.index
            histories = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in source.all_histories()]
            self._chain = (key, now, chain_from_config(self.gm.config, histories, len(self.gm.catalogue) + 1))
        else:
            self._chain = (key, now, self._chain[2])  # unchanged: the next check one window from now
        return self._chain[2]

    @torch.inference_mode()
    def recommend(self, user_id: str, source: HistorySource, k: int = 10, *, explain: bool = True,
                  popularity: dict[str, int] | None = None) -> RecommendationList:
        """Top ``k`` unseen items for ``user_id``; ``popularity`` (item id -> count) for cold start
        defaults to ``source.item_counts()``."""
        items, times = source.history(user_id)
        known = [(self.gm.index[i], t) for i, t in zip(items, times.tolist()) if i in self.gm.index]
        if not known:
            return self._cold_start(user_id, items, k, popularity if popularity is not None else source.item_counts())
        history = np.array([i for i, _ in known], dtype=np.int64)
        known_times = np.array([t for _, t in known], dtype=np.int64)
        gaps = time_gap_buckets(known_times)
        model = self.gm.model
        # With explanations, one forward serves both the scores and the leave-one-out variants (client/explain.py)
        states = history_states(model, history, gaps, self.gm.max_len) if explain else None
        if states is not None:
            scores = model.output(states.final[:1])[0].clone()
        else:
            scores = model.score(model_inputs(model, [history], self.gm.max_len, [gaps]))[0].clone()
        if (chain := self.chain(source)) is not None:  # ranked as evaluated: model and the partner's own chain
            scores = chain.blend(scores.unsqueeze(0), [history])[0]
        scores[0] = float("-inf")
        scores[torch.as_tensor(history)] = float("-inf")  # exclude everything seen, not only the last max-len
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k).indices.tolist()
        explanations = explain_items(model, history, gaps, top, self.gm.max_len, name=lambda i: self._label(i),
                                     item_id=self._item, states=states, times=known_times,
                                     chain=chain) if explain else [None] * len(top)
        recs = [Recommendation(self._item(i), self.title(self._item(i)), float(scores[i]), e)
                for i, e in zip(top, explanations)]
        return RecommendationList(str(user_id), recs, cold_start=False, strategy="model", history_length=len(items))

    def _item(self, index: int) -> str:
        return str(self.gm.catalogue[index - 1])

    def _label(self, index: int) -> str:
        item = self._item(index)
        return self.title(item) or f"item {item}"

    def _cold_start(self, user_id: str, seen: list[str], k: int, counts: dict[str, int]) -> RecommendationList:
        """Most popular catalogue items at this partner that the user has not seen (ties: catalogue order)."""
        seen_set = set(seen)
        ranked = sorted(((c, -self.gm.index[i], i) for i, c in counts.items()
                         if i in self.gm.index and i not in seen_set),
                        reverse=True)
        recs = [Recommendation(i, self.title(i), float(c)) for c, _, i in ranked[:k]]
        popular = len(recs)
        if len(recs) < k:  # a partner with few events: fill up in catalogue order
            taken = seen_set | {r.item_id for r in recs}
            fill = [i for i in self.gm.catalogue.tolist() if i not in taken][: k - len(recs)]
            recs += [Recommendation(i, self.title(i), 0.0) for i in fill]
        # no counts on catalogue items at this partner: "popularity" would misname a list in catalogue order
        strategy = "popularity" if popular or not recs else "catalogue-order"
        return RecommendationList(str(user_id), recs, cold_start=True, strategy=strategy, history_length=len(seen),
                                  popular=popular)


def load_titles(metadata: str | os.PathLike | None) -> dict[str, str]:
    """Item id -> title from MovieLens metadata (``u.item``, ``movies.dat``, or their folder); {} if none."""
    if not metadata:
        return {}
    from common.data.loaders import load_item_titles

    try:
        titles = {item: title for item, (title, _) in load_item_titles(metadata).items()}
    except (UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"metadata {metadata}: not MovieLens item metadata (u.item / movies.dat): {exc}") from None
    if not titles:  # a folder without u.item / movies.dat, or a CSV without rows: every title would print as "-"
        raise DataError(f"metadata {metadata}: no item titles found (expected u.item, movies.dat or a CSV with a "
                        "title column)")
    return titles


def format_table(result: RecommendationList) -> str:
    """A readable table: rank, item, title, score and the one-line reason."""
    warm = f"{len(result.items)} recommendations from {result.history_length} events"
    if not result.items and not result.cold_start:  # "0 recommendations" and no word why (a review)
        warm += " (the user has had every item of the catalogue: none is left to recommend)"
    head = f"user {result.user_id}: " + (_cold_start_head(result) if result.cold_start else warm)
    # a cold-start list's score is the item's event count at this partner, not a model score (a review)
    score = "events" if result.cold_start else "score"
    lines = [head, f"{'rank':>4}  {'item':>8}  {score:>9}  title / reason"]
    for r, rec in enumerate(result.items, start=1):
        lines.append(f"{r:>4}  {rec.item_id:>8}  {rec.score:>9.3f}  {rec.title or '-'}")
        if rec.explanation is not None:
            lines.append(f"{'':>27}{rec.explanation.reason}")
    return "\n".join(lines)


def _cold_start_head(result: RecommendationList) -> str:
    """Why the user is cold and what the list is ordered by (cold start means no event on a catalogue item)."""
    n = result.history_length
    why = "no events" if n == 0 else f"{n} event{'s' if n != 1 else ''}, none on an item in the model's catalogue"
    if result.popular >= len(result.items):
        order = "popularity at this partner"
    elif result.popular:
        order = f"popularity at this partner, then catalogue order for the last {len(result.items) - result.popular}"
    else:
        order = "catalogue order: this partner has no events on the model's items to rank by popularity"
    return f"cold start ({why}; {order})"
