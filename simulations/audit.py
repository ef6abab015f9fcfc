"""Membership-inference audit of a released global model (``model.pt`` in a run directory).

    python -m simulations.audit runs/<run>           # needs a run with holdout-fraction > 0
    python -m simulations.audit runs/sweeps/<sweep>/*/ --out audits.json   # several: unusable ones skipped

Members are the users the federation trained on (two or more training items, i.e. the
DP samples); non-members are the held-out users listed in ``holdout.json``, never
trained on. The attacker holds a candidate user's training history and the released
model, and scores membership by

- **loss**: the model's training loss on the user's history (lower = member; Yeom et al.);
  for MF the attacker first fits the user's factor against the released item factors;
- **calibrated loss**: loss minus the same history's loss under a population popularity
  model (difficulty calibration, Watson et al. 2022): users with easy, popular histories
  no longer look like members.

Attack AUC (0.5 = no better than chance) with a bootstrap 95% interval, next to the
epsilon the run claims. A DP guarantee of (epsilon, delta) bounds any attack's TPR at
FPR x by e^epsilon * x + delta, so only small epsilon forces AUC near 0.5. So each attack
also reports its TPR at 1% and 10% FPR and the smallest epsilon its error rates are consistent
with at 95% confidence (``simulations/audit_bounds.py``): a bound above the claimed epsilon
means the claim or the audit is wrong. A run started from ``init-model`` is audited only when
its held-out users were held out from the start model's run too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from common.cli_args import output_file, positive_int
from common.config import DEFAULTS, resolve_config
from common.data.sequences import SequenceData
from common.errors import DataError, FedRecError
from common.files import atomic_write_text
from common.metrics import pad_left
from common.run_files import finite_or_null
from common.task import federation_data, new_model
from simulations.audit_bounds import epsilon_lower_bound, tpr_at_fpr
from simulations.bench import write_results
from simulations.cli import user_errors_exit
from simulations.run_claims import claimed_privacy, read_json_object


LOW_FPRS = (0.01, 0.1)  # TPR reported at these FPRs (a few hundred non-members: 0.1% would rest on none)


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    m, n = len(member_scores), len(nonmember_scores)
    if m == 0 or n == 0:
        raise DataError("the audit needs at least one member and one non-member")
    ranks = rankdata(np.concatenate([member_scores, nonmember_scores]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def bootstrap_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray, *, rounds: int = 1000,
                  seed: int = 0) -> tuple[float, float, float]:
    """(AUC, 2.5th, 97.5th percentile) over ``rounds`` resamples of members and non-members."""
    rng = np.random.default_rng(seed)
    values = [auc(rng.choice(member_scores, len(member_scores)), rng.choice(nonmember_scores, len(nonmember_scores)))
              for _ in range(rounds)]
    return auc(member_scores, nonmember_scores), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


@torch.no_grad()
def user_losses(model: torch.nn.Module, data: SequenceData, max_len: int, batch_size: int = 256, *,
                exclude_seen: bool = False, label_smoothing: float = 0.0) -> np.ndarray:
    """Per-user training loss of ``model`` on each user's training history: the training objective,
    with the time-gap input of a ``time-features`` model, ``exclude_seen``'s softmax and
    ``label_smoothing`` (the run's ``exclude-seen`` and ``label-smoothing``). Every user of ``data``
    needs two or more training items."""
    from common.metrics import drop_seen
    from common.models.mf import MatrixFactorization, MultinomialLoss
    from common.objectives import SequenceLoss
    from common.training_pairs import training_pairs

    model.eval()
    train = data.train_sequences()
    out = []
    if isinstance(model, MatrixFactorization):
        for start in range(0, len(train), batch_size):
            items = pad_left([h[-max_len:] for h in train[start:start + batch_size]], max_len)
            out.append(MultinomialLoss("none")(model(model.fit_users(items)), items).numpy())
        return np.concatenate(out) if out else np.zeros(0)
    pairs = training_pairs(data, max_len, time_features=bool(getattr(model, "time_features", False)))
    inputs, targets = pairs.tensors
    if len(targets) != len(train):
        raise DataError("the audit scores only users with two or more training items")
    for start in range(0, len(targets), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        logits = model(x)
        out.append(SequenceLoss("none", label_smoothing)(drop_seen(logits, x, y) if exclude_seen else logits, y).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def popularity_losses(data: SequenceData, counts: np.ndarray, max_len: int) -> np.ndarray:
    """Per-user mean -log p(item) under add-one smoothed item popularity ``counts`` (0..V)."""
    p = (counts[1:] + 1.0) / (counts[1:].sum() + len(counts) - 1)
    logp = np.concatenate([[0.0], np.log(p)])
    return np.array([-logp[h[-max_len:]].mean() if len(h) else 0.0 for h in data.train_sequences()])


def _missing(name: str) -> str:
    """Why a run directory lacks ``name``: no model.pt is a run that never finished (a sweep's timed-out
    or stopped run has only config.json), not a run without a holdout."""
    if name == "model.pt":
        return "run not finished (no model.pt)"
    return f"no {name} (run with holdout-fraction > 0 through simulations.run/sweep)"


def start_model_check(run_dir: Path, saved_cfg: dict, held: set) -> dict | None:
    """A run started from ``init-model``: its held-out users are non-members only if every run in its chain
    of start models held them out too (on the same data set); otherwise its AUC reads a start model's leak
    beside this run's epsilon (a review measured AUC 0.67 and an epsilon bound of 2 beside a claim of 1).
    Returns what audit.json records of the start model, or None."""
    source = saved_cfg.get("init-model")
    if not source:
        return None
    record: dict = {"path": str(source)}
    seen: set[Path] = set()
    cfg = saved_cfg
    while source:
        start_dir = Path(str(source)).expanduser()
        start_dir = (start_dir if start_dir.is_dir() else start_dir.parent).resolve()
        if start_dir in seen:
            break
        seen.add(start_dir)
        start_cfg = read_json_object(start_dir / "config.json") if (start_dir / "config.json").is_file() else {}
        if start_cfg and not _same_data(start_cfg.get("dataset"), cfg.get("dataset")):
            # (a data set named by another path is the same data only if it resolves to the same file)
            record["note"] = f"{start_dir} trained on another data set ({start_cfg.get('dataset')}); its users are " \
                             "taken to be other people"
            return record
        start_holdout = start_dir / "holdout.json"
        if not start_holdout.is_file():
            raise DataError(f"{run_dir}: started from init-model {source}, whose training users are unknown (no "
                            "holdout.json beside it), so held-out users cannot be called non-members; audit the run "
                            "that trained the start model instead")
        start_held = read_json_object(start_holdout).get("user-ids")
        trained_before = len(held - set(start_held if isinstance(start_held, list) else []))
        if trained_before:
            raise DataError(f"{run_dir}: {trained_before} of its {len(held)} held-out users were trained on by its "
                            f"init-model {source}, so they are not non-members; audit a run whose holdout the start "
                            "model's run held out as well (the same seed and at most its holdout-fraction)")
        source, cfg = start_cfg.get("init-model"), start_cfg  # that run's own start model, if any
    record["note"] = "every run in its chain of start models held out every user this run holds out"
    return record


def _same_data(a: object, b: object) -> bool:
    """Two config ``dataset`` values name the same data: equal, or resolving to the same path."""
    if a == b:
        return True
    if not a or not b or "synthetic" in (a, b):
        return False
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


# What a run's model.pt must share with its config.json to be that run's model (and its epsilon the model's)
_MODEL_KEYS = ("model", "embedding-dim", "num-blocks", "max-seq-len", "dp", "dp-mode", "target-epsilon", "seed")


def _refuse_another_runs_model(run_dir: Path, model_cfg: dict, saved_cfg: dict) -> None:
    """A model.pt copied from another run was audited under this run's model name and epsilon (an MF model
    without DP reported as SASRec at epsilon 8; a research-CLI review)."""
    differ = [k for k in _MODEL_KEYS if k in model_cfg and k in saved_cfg and model_cfg[k] != saved_cfg[k]]
    if differ:
        k = differ[0]
        raise DataError(f"{run_dir}: model.pt is not this run's model: its {k} is {model_cfg[k]!r}, config.json's "
                        f"{saved_cfg[k]!r}; audit the run directory it came from")


def run_audit(run_dir: Path, *, max_members: int = 2000, rounds: int = 1000, seed: int = 0) -> dict:
    """Both attacks on ``run_dir``'s model; writes and returns ``audit.json``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():  # it read "no config.json (run with holdout-fraction > 0 ...)" (a journey review)
        raise DataError(f"{run_dir}: no such run directory")
    for name in ("config.json", "model.pt", "holdout.json"):
        if not (run_dir / name).is_file():
            raise DataError(f"{run_dir}: {_missing(name)}")
    saved_cfg = read_json_object(run_dir / "config.json")
    try:  # keys of older versions dropped; an error names the file it came from (a research-CLI review)
        cfg = resolve_config(None, {k: v for k, v in saved_cfg.items() if k in DEFAULTS})
    except FedRecError as exc:
        raise DataError(f"{run_dir / 'config.json'}: {exc}") from None
    holdout = read_json_object(run_dir / "holdout.json")
    if not isinstance(holdout.get("user-ids"), list):
        raise DataError(f"{run_dir / 'holdout.json'}: no user-ids list (written by simulations.run with holdout-fraction > 0)")
    held = set(holdout["user-ids"])
    if not held:
        raise DataError(f"{run_dir}: holdout.json lists no user (holdout-fraction was 0)")
    start = start_model_check(run_dir, saved_cfg, held)
    from client.recommend import load_global_model

    trained = load_global_model(run_dir / "model.pt")  # a corrupt, foreign or NaN file: one DataError line
    _refuse_another_runs_model(run_dir, trained.config, saved_cfg)
    try:
        data = federation_data(cfg)
    except FedRecError as exc:  # e.g. a sweep run's relative dataset path, audited from another folder
        raise DataError(f"{run_dir / 'config.json'}: {exc}") from None
    if trained.catalogue.tolist() != data.catalogue.tolist():
        raise DataError(f"{run_dir}: the model's catalogue differs from the data set's; was the data changed?")
    model = trained.model
    max_len = int(cfg["max-seq-len"])
    eligible = np.isin(np.arange(data.num_users), data.trainable_users())
    is_held = np.array([u in held for u in data.user_ids.tolist()])
    members = np.flatnonzero(eligible & ~is_held)
    nonmembers = np.flatnonzero(eligible & is_held)
    rng = np.random.default_rng(seed)
    subsampled = len(members) > max_members
    if subsampled:
        members = np.sort(rng.choice(members, max_members, replace=False))
    if len(members) < 2 or len(nonmembers) < 2:  # the epsilon lower bound splits each group in halves
        raise DataError(f"{run_dir}: the audit needs at least two members and two non-members, and has "
                        f"{len(members)} and {len(nonmembers)}; raise --max-members, or the run's holdout-fraction")
    subset = data.subset(np.concatenate([members, nonmembers]))
    m = len(members)
    objective = {"exclude_seen": bool(cfg["exclude-seen"]), "label_smoothing": float(cfg.get("label-smoothing", 0.0))}
    loss = user_losses(model, subset, max_len, **objective)
    calibrated = loss - popularity_losses(subset, data.item_counts(), max_len)
    # Control: the same attacks on the initial global model (same seed, trained on nobody) should give
    # AUC ~0.5; a gap from 0.5 there would be a bias of the attack or of the member/non-member split.
    initial = new_model(cfg, data.num_items)  # the run's start unless item-init or init-model set it (control_model)
    control = user_losses(initial, subset, max_len, **objective)
    control_calibrated = control - popularity_losses(subset, data.item_counts(), max_len)
    result = {"run": run_dir.name, "model": cfg["model"], "members": m, "non-members": len(nonmembers),
              "control": control_model(saved_cfg),
              # what a rerun needs to repeat these numbers (a reproducibility review)
              "options": {"bootstrap-rounds": rounds, "max-members": max_members, "seed": seed,
                          "members-subsampled": bool(subsampled)}}
    if start is not None:
        result["init-model"] = start
    claim = claimed_privacy(run_dir, cfg)
    dp = math.isfinite(claim["epsilon"])  # no DP: null, not a bare Infinity (strict JSON parsers refuse it)
    result.update({"dp": dp, "epsilon": claim["epsilon"] if dp else None, "delta": claim["delta"] if dp else None,
                   "ndcg@10": claim["ndcg@10"]})
    for name, score in (("loss", -loss), ("calibrated", -calibrated),
                        ("control-loss", -control), ("control-calibrated", -control_calibrated)):
        value, low, high = bootstrap_auc(score[:m], score[m:], rounds=rounds, seed=seed)
        result[f"auc-{name}"], result[f"auc-{name}-ci"] = value, [low, high]
    for name, score in (("loss", -loss), ("calibrated", -calibrated)):
        result[f"tpr-{name}"] = [tpr_at_fpr(score[:m], score[m:], f) for f in LOW_FPRS]
        # at the claim's delta (the run's target-delta without DP: the bound then says what a claim would need)
        result[f"epsilon-lower-bound-{name}"] = epsilon_lower_bound(
            score[:m], score[m:], float(result["delta"] if dp else cfg["target-delta"]), seed=seed)
    atomic_write_text(run_dir / "audit.json", json.dumps(finite_or_null(result), indent=1, allow_nan=False))
    return result


def control_model(saved_cfg: dict) -> str:
    """What the control's model is. A run that started from ``item-init`` rows (co-occurrence counts of the
    partners' users, or the item texts) or from an ``init-model`` did not start from the seed's random model,
    and the audit does not rebuild that start: its control is a fresh random model, and says so."""
    starts = [f"item-init = {saved_cfg['item-init']}"] if saved_cfg.get("item-init", "random") != "random" else []
    starts += ["init-model"] if saved_cfg.get("init-model") else []
    if not starts:
        return "initial model, trained on nobody"
    return f"a fresh random model, not the run's start ({', '.join(starts)}), which the audit does not rebuild"


def format_result(r: dict) -> str:
    eps = "none (no DP)" if not r["dp"] else f"{r['epsilon']:.2f} (delta {r['delta']:.1g})"
    bounds = "  ".join(f"{name} {r[f'epsilon-lower-bound-{name}']['epsilon-lower-bound']:.2f}"
                       for name in ("loss", "calibrated"))
    tpr = "  ".join(f"{name} {x['tpr']:.3f} at FPR {x['fpr']:.3f}" for name in ("loss", "calibrated")
                    for x in r[f"tpr-{name}"][:1])
    return (f"{r['run']}: model {r['model']}, epsilon {eps}, {r['members']} members vs {r['non-members']} non-members\n"
            f"  loss attack        AUC {r['auc-loss']:.3f}  95% CI [{r['auc-loss-ci'][0]:.3f}, {r['auc-loss-ci'][1]:.3f}]\n"
            f"  calibrated attack  AUC {r['auc-calibrated']:.3f}  95% CI [{r['auc-calibrated-ci'][0]:.3f}, "
            f"{r['auc-calibrated-ci'][1]:.3f}]\n"
            f"  control ({r.get('control', 'initial model, trained on nobody')}): loss AUC {r['auc-control-loss']:.3f}, "
            f"calibrated AUC {r['auc-control-calibrated']:.3f}\n"
            f"  TPR at low FPR: {tpr}\n"
            f"  epsilon lower bound (95%, threshold chosen on half the users): {bounds}")


def audit_all(run_dirs: list[Path], **options: int) -> list[dict]:
    """Audit each run directory and print its result. One directory alone fails with its error; of
    several (a sweep's ``runs-dir/*/``), an unusable one is a warning line and is skipped (the first
    one stopped the audit of all, without --out), unless none is left."""
    results = []
    for run_dir in run_dirs:
        try:
            results.append(run_audit(run_dir, **options))
        except (FedRecError, OSError) as exc:
            if len(run_dirs) == 1:
                raise
            text = str(exc) if str(run_dir) in str(exc) else f"{run_dir}: {exc}"
            print(f"warning: skipped {text}", file=sys.stderr)
            continue
        print(format_result(results[-1]))
    if not results:
        raise DataError(f"none of the {len(run_dirs)} run directories could be audited (see the warnings above)")
    return results


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run directories (with model.pt, config.json, holdout.json)")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the CI (default 1000)")
    parser.add_argument("--max-members", type=positive_int, default=2000, help="members sampled for the attack (default 2000)")
    parser.add_argument("--out", type=output_file, help="also write every audited run's result, in order, as one JSON list here")
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small batches: a second thread only spins on a shared machine
    results = audit_all([Path(d) for d in args.run_dirs], max_members=args.max_members, rounds=args.bootstrap)
    if args.out:
        skipped = len(args.run_dirs) - len(results)
        if skipped and args.out.exists():  # it replaced a whole table with the runs left (a research-CLI review)
            raise DataError(f"--out {args.out} exists and was not replaced: {skipped} of the {len(args.run_dirs)} "
                            "run directories were skipped (warnings above), so it would lose their earlier results; "
                            "give another file")
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
