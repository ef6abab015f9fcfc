"""The run directory: config.json, metrics.jsonl (one line per round), model.pt, summary.md."""

from __future__ import annotations

import json
import math
import os
import time
from logging import INFO
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common.logger import log

from common.evaluation import combine_partner_metrics
from common.private_evaluation import SENSITIVITY, clamp_noised_sums
from common.files import atomic_write_bytes, atomic_write_text
from common.metrics import means_and_errors, means_from_sums
from common.privacy import stated_epsilon
from server.validation import OPTIONAL_METRICS_KEY


def new_run_dir(base: str | os.PathLike, name: str = "") -> Path:
    """A fresh directory under ``base`` named ``name`` or a timestamp (never reused)."""
    stem = name or time.strftime("%Y%m%d-%H%M%S")
    root = Path(base)
    path = root / stem
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stem}-{n}"
    path.mkdir(parents=True, mode=0o700)  # the coordinator's private files (metrics, privacy report, model)
    return path



def run_dirs_named(base: str | os.PathLike, name: str) -> set[Path]:
    """The directories :func:`new_run_dir` has made under ``base`` for ``name`` (name, name-2, ...):
    compare before and after a run to find the one it created."""
    root = Path(base)
    if not root.is_dir():
        return set()
    return {p for p in root.iterdir() if p.is_dir() and (p.name == name or (
        p.name.startswith(f"{name}-") and p.name[len(name) + 1:].isdigit()))}


def created_run_dir(base: str | os.PathLike, name: str, before: set[Path]) -> Path | None:
    """The newest directory for ``name`` that was not in ``before`` (:func:`run_dirs_named` taken
    before a run): the one the run created, suffixed when the name was taken; None if none."""
    created = sorted(run_dirs_named(base, name) - before, key=lambda p: p.stat().st_mtime)
    return created[-1] if created else None


def _optional(content: RecordDict, metrics: MetricRecord, key: str) -> float | None:
    """An optional training metric of one reply: in its MetricRecord, or where update validation moved it."""
    moved = content.config_records.get(OPTIONAL_METRICS_KEY)
    value = metrics.get(key, moved.get(key) if moved is not None else None)
    # (update validation checked a MetricRecord's values, not a record's: a number or nothing)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class RunRecorder:
    """Collects each round's aggregated train and evaluation metrics and writes the run directory.

    Its two aggregation functions plug into any ``flwr.serverapp.strategy`` strategy;
    ``end_round`` plugs in as ``evaluate_fn`` (Flower calls it after every round).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], catalogue: np.ndarray, top_k: int = 10,
                 text_table: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.text_table = text_table  # a text model's frozen table, recorded in model.pt (common/item_text.py)
        self.config = config
        self.catalogue = catalogue
        self.top_k = top_k
        self.rounds: list[dict[str, Any]] = []
        self._train: dict[str, float] = {}
        self._eval: dict[str, float] = {}
        self._t0 = time.perf_counter()
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))

    def restore(self, rounds: list[dict[str, Any]]) -> None:
        """Continue a resumed run (server/resume.py): earlier rounds count in the summary and wall time."""
        self.rounds = list(rounds)
        if rounds:
            self._t0 = time.perf_counter() - float(rounds[-1].get("seconds") or 0.0)

    # -- plugged into the strategy ---------------------------------------------------------
    def aggregate_train_metrics(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        """Example-weighted mean loss; the worst (largest) epsilon over partners; summed examples."""
        replies = [c for c in contents if c.metric_records]
        metrics = [next(iter(c.metric_records.values())) for c in replies]
        # A deployed partner under local DP keeps its loss (client/app.py): the mean is over those who sent one,
        # and a round where none did has no loss (null in metrics.jsonl, "n/a" in the log), not a made-up 0.
        # Update validation moved the losses beside the metrics (server/validation.py OPTIONAL_METRICS_KEY)
        losses = [(float(m.get(weight_key, 0)), value) for c, m in zip(replies, metrics)
                  if (value := _optional(c, m, "train-loss")) is not None and math.isfinite(value)]
        weight = sum(w for w, _ in losses)
        epsilon = max((float(m.get("epsilon", 0.0)) for m in metrics), default=0.0)
        out = {
            **({"train-loss": sum(w * x for w, x in losses) / weight if weight else 0.0}
               if losses or not metrics else {}),
            # Without local DP (off, or central: its epsilon is the server's, privacy.json) no epsilon at
            # all: Flower's end-of-run log printed the partners' 'epsilon': 0.0, read as perfect privacy
            **({"epsilon": epsilon, "delta": max(float(m.get("delta", 0.0)) for m in metrics)} if epsilon > 0 else {}),
            # NOTE: central DP weighs partners uniformly, so the weights are not always example counts
            "num-examples": float(sum(float(m.get("num-examples", 0)) for m in metrics)),
            "num-partners": float(len(metrics)),
        }
        self._train = out
        return MetricRecord(out)

    def aggregate_evaluate_metrics(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        """Sum the partners' ranking sums and counts: the result equals evaluating all users at once
        (with ``evaluation-noise-multiplier`` > 0, plus the partners' Gaussian noise: see :meth:`_noised`)."""
        records = [r for c in contents for r in c.metric_records.values()]
        sums: dict[str, float] = {}
        for record in records:
            for key, value in record.items():
                if key.endswith(("-sum", "-sqsum")) or key == "num-users":
                    sums[key] = sums.get(key, 0.0) + float(value)
        noise = float(self.config.get("evaluation-noise-multiplier", 0.0))
        if noise > 0:
            sums = clamp_noised_sums(sums)
            records = [clamp_noised_sums(dict(r)) for r in records]
        # Under noise the users' spread is not known (no sums of squares): only the noise's error is stated
        means = means_from_sums(sums) if noise > 0 else means_and_errors(sums)
        out = {**means, "num-users": sums.get("num-users", 0.0)}
        # Coverage and per-partner NDCG spread (not additive): common/evaluation.py
        out.update(combine_partner_metrics(records, len(self.catalogue), self.top_k))
        if noise > 0:
            out.update(self._noised(records, noise, sums.get("num-users", 0.0)))
        self._eval = out
        return MetricRecord(out)

    def _noised(self, records: list, noise: float, users: float) -> dict[str, float]:
        """What noised evaluation replies add: the standard error of the noise in each combined mean
        (``-noise-se``: each partner's sum carries N(0, (noise x sqrt 2)^2)), and the worst partner's
        epsilon after its evaluation reply (its ledger recorded the reply before sending it)."""
        k = self.top_k
        out: dict[str, float] = {}
        if users:
            se = noise * SENSITIVITY * math.sqrt(len(records)) / users
            out.update({f"hr@{k}-noise-se": se, f"ndcg@{k}-noise-se": se})
        epsilons = [float(r["epsilon"]) for r in records if "epsilon" in r]
        if epsilons:
            out["epsilon"] = max(epsilons)
            out["delta"] = max(float(r.get("delta", 0.0)) for r in records)
        return out

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Log one JSON line and a readable line per round; keep the latest global model."""
        if server_round == 0:
            return None
        k = self.top_k
        # A noised evaluation spends after training: the round's epsilon is the later, larger one
        spent = [d for d in (self._train, self._eval) if d.get("epsilon") is not None]
        line = {
            "round": server_round,
            f"hr@{k}": self._eval.get(f"hr@{k}"),
            f"ndcg@{k}": self._eval.get(f"ndcg@{k}"),
            "epsilon": max((float(d["epsilon"]) for d in spent), default=None),
            "delta": max((float(d["delta"]) for d in spent if d.get("delta") is not None), default=None),
            "train-loss": self._train.get("train-loss"),
            "num-partners": self._train.get("num-partners"),
            "eval-users": self._eval.get("num-users"),
            "seconds": round(time.perf_counter() - self._t0, 2),
        }
        if not line["epsilon"]:  # no local DP: null, not 0.0, which a plot reads as perfect privacy (a review)
            line["epsilon"] = line["delta"] = None
        line.update({key: v for key, v in self._eval.items() if key not in line and key != "num-users"})  # HR/NDCG@5,20...
        self.rounds.append(line)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(line) + "\n")
        self.save_model(arrays)
        se = line.get(f"ndcg@{k}-se")
        interval = "" if se is None else f" (+-{1.96 * se:.4f}, 95% CI over users)"
        if line.get(f"ndcg@{k}-noise-se") is not None:
            interval = f" (+-{1.96 * line[f'ndcg@{k}-noise-se']:.4f}, 95% of the DP noise)"
        # n/a where metrics.jsonl has null (no evaluation this round, a failed round): never a made-up 0
        def shown(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        privacy = (f"epsilon {line['epsilon']:.3f} (delta {shown(line['delta'], '.2g')})" if line["epsilon"]
                   else "no local DP" if line["train-loss"] is not None else "epsilon n/a")
        log(INFO, "round %d: HR@%d %s  NDCG@%d %s%s  %s  loss %s", server_round, k, shown(line[f"hr@{k}"], ".4f"),
            k, shown(line[f"ndcg@{k}"], ".4f"), interval, privacy, shown(line["train-loss"], ".4f"))
        self._train, self._eval = {}, {}
        return None

    # -- outputs -----------------------------------------------------------------------------
    def save_model(self, arrays: ArrayRecord) -> None:
        import io

        buf = io.BytesIO()
        # rounds-aggregated: 0 marks the initial model of a run whose every round failed, which partners'
        # `recommend` / `serve --model runs` then pass over (they served it as the newest model; a review)
        aggregated = {"rounds-aggregated": sum(1 for r in self.rounds if r.get("num-partners"))} if self.rounds else {}
        torch.save({"state_dict": arrays.to_torch_state_dict(), "catalogue": self.catalogue.tolist(),
                    "config": self.config, **aggregated,
                    **({"item-text": self.text_table} if self.text_table else {})}, buf)
        atomic_write_bytes(self.run_dir / "model.pt", buf.getvalue())

    def _data_text(self, sources: Sequence[str]) -> str:
        """What the partners trained on: the run config's ``dataset`` is only read by simulated partners;
        a deployed partner trains on its own log (node config ``data-path``)."""
        own = sum(1 for s in sources if s == "own log")
        catalogue = self.config.get("catalogue") or f"from {self.config.get('dataset')}"
        if own and own == len(sources):
            return f"each partner's own log ({own} partners; catalogue {catalogue})"
        if own:
            sim = len(sources) - own
            owners = "partners' own logs" if own > 1 else "partner's own log"
            return (f"{own} {owners} and {sim} simulated partition{'s' if sim > 1 else ''} of "
                    f"{self.config.get('dataset')} (catalogue {catalogue})")
        if not sources and not any(r.get("num-partners") for r in self.rounds):
            # no partner trained: the run config's dataset would name data nobody used (a deployment review)
            return "none: no partner trained (their refusals are in privacy.json)"
        return str(self.config.get("dataset"))

    def _interval_text(self, line: dict[str, Any]) -> str:
        """'; 95% CI over users: ...' from a round's standard errors ('' when it has none)."""
        k = self.top_k
        hr, ndcg = line.get(f"hr@{k}-se"), line.get(f"ndcg@{k}-se")
        if line.get(f"ndcg@{k}-noise-se") is not None:
            noise = 1.96 * line[f"ndcg@{k}-noise-se"]
            return (f"; evaluation sums noised for DP (evaluation-noise-multiplier "
                    f"{self.config.get('evaluation-noise-multiplier')}): 95% of the noise within +-{noise:.4f}")
        if hr is None or ndcg is None:
            return ""
        return f"; 95% CI over users: HR@{k} +-{1.96 * hr:.4f}, NDCG@{k} +-{1.96 * ndcg:.4f}"

    def _final_metrics_text(self) -> str:
        """The last evaluated round's HR/NDCG line; "n/a" when no round was evaluated (it said 0.0000)."""
        k = self.top_k
        evaluated = [r for r in self.rounds if r.get(f"ndcg@{k}") is not None]
        if not evaluated:
            return (f"- final HR@{k}, NDCG@{k}: n/a (no round was evaluated: fraction-evaluate or evaluate-every, or "
                    "every partner refused; see the log and privacy.json)")
        line = evaluated[-1]
        which = "" if line is self.rounds[-1] else f", round {line.get('round')}, the last evaluated"
        return (f"- final HR@{k}: {line[f'hr@{k}']:.4f}, NDCG@{k}: {line[f'ndcg@{k}']:.4f} "
                f"(full ranking over {len(self.catalogue)} items, history excluded, {int(line.get('eval-users') or 0)} "
                f"test users{which}{self._interval_text(line)})")

    def write_summary(self, guarantee: str | None = None, data_sources: Sequence[str] = ()) -> Path:
        """summary.md; ``guarantee`` is the privacy sentence (server/privacy_report.py); ``data_sources``
        each partner's ``data-source`` ("own log" or "simulated partition"), as its replies said."""
        last = self.rounds[-1] if self.rounds else {}
        cfg = self.config
        if guarantee:
            pass
        elif cfg.get("dp"):
            guarantee = (f"Each partner's training is ({stated_epsilon(last.get('epsilon') or 0)}, {last.get('delta') or 0:.2g})-DP "
                         "for any one of its users' whole interaction history (user-level DP-SGD; worst partner shown).")
        else:
            guarantee = "No differential privacy: the released model carries no formal guarantee (dp = false)."
        text = "\n".join([
            f"# Run {self.run_dir.name}",
            "",
            guarantee,
            "",
            f"- data: {self._data_text(data_sources)}, model: {cfg.get('model')}, rounds: {len(self.rounds)}",
            self._final_metrics_text(),
            f"- wall time: {last.get('seconds', 0):.1f} s",
            # (a researcher journey read the metrics above as the result of such a run)
            *([] if any(r.get("num-partners") for r in self.rounds) or not self.rounds else [
                "- **no round aggregated an update: the model is the initial one** (the partners' refusals and the "
                "rejected updates are in privacy.json)"]),
            "",
        ])
        return atomic_write_text(self.run_dir / "summary.md", text)
