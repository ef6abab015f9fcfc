"""Metrics beyond accuracy against brute force: HR/NDCG@5,10,20, coverage, popularity, per-partner
spread; and the membership-inference AUC against pairwise counting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data.sequences import SequenceData
from common.evaluation import combine_partner_metrics, item_popularity, recommendation_metrics
from simulations.audit import auc, bootstrap_auc


def random_data(num_users: int, num_items: int, seed: int) -> SequenceData:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(np.arange(1, num_items + 1), size=int(rng.integers(3, 9)), replace=False) for _ in range(num_users)]
    return SequenceData(np.arange(1, num_items + 1).astype(str), np.arange(num_users).astype(str), seqs, seqs)


def brute_force(scores: np.ndarray, data: SequenceData, k: int, split: str = "test") -> dict:
    """Sort each user's candidates explicitly (catalogue minus padding and history, target kept);
    ``split`` "valid": the second last item is the target, everything before it the history."""
    cut = 1 if split == "test" else 2
    hits, ndcgs, pops, items = [], [], [], set()
    pop = np.zeros(data.num_items + 1)
    for s in data.sequences:
        for i in set(s[:-2].tolist()):
            pop[i] += 1
    pop /= data.num_users
    for u, seq in enumerate(data.sequences):
        history, target = set(seq[:-cut].tolist()), int(seq[-cut])
        candidates = [i for i in range(1, data.num_items + 1) if i not in history or i == target]
        ordered = sorted(candidates, key=lambda i: -scores[u, i])
        rank = sum(1 for i in candidates if scores[u, i] > scores[u, target])
        hits.append(rank < k)
        ndcgs.append(1 / math.log2(rank + 2) if rank < k else 0.0)
        top = [i for i in ordered if i not in history][:k]  # the top-K list excludes everything seen
        pops.append(np.mean([pop[i] for i in top]))
        items.update(top)
    return {"hr": np.mean(hits), "ndcg": np.mean(ndcgs), "pop": np.mean(pops), "items": items}


@pytest.mark.parametrize("split", ["test", "valid"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_match_brute_force_at_every_k(seed, split):
    data = random_data(40, 30, seed)
    scores = np.random.default_rng(seed + 10).normal(size=(data.num_users, data.num_items + 1))
    got = recommendation_metrics(lambda a, b, h: torch.tensor(scores[a:b]), data, top_k=10, batch_size=7, split=split)
    n = got["num-users"]
    assert n == data.num_users
    for k in (5, 10, 20):
        want = brute_force(scores, data, k, split)
        assert got[f"hit@{k}-sum"] / n == pytest.approx(want["hr"])
        assert got[f"ndcg@{k}-sum"] / n == pytest.approx(want["ndcg"])
    want = brute_force(scores, data, 10, split)
    assert got["pop@10-sum"] / n == pytest.approx(want["pop"])
    assert set(got["rec-items@10"]) == want["items"]


def test_popularity_is_the_share_of_users_with_the_item():
    seqs = [np.array([1, 2, 9, 9]), np.array([2, 2, 9, 9]), np.array([3, 9, 9])]
    data = SequenceData(np.array(list("abcdefghi")), np.array(["x", "y", "z"]), seqs, seqs)
    pop = item_popularity(data)
    assert pop[1] == pytest.approx(1 / 3) and pop[2] == pytest.approx(2 / 3) and pop[9] == 0.0


def test_partners_combine_into_coverage_and_spread():
    records = [
        {"num-users": 10.0, "ndcg@10-sum": 2.0, "rec-items@10": [1, 2, 3], "partition-id": 1},
        {"num-users": 5.0, "ndcg@10-sum": 2.5, "rec-items@10": [3, 4], "partition-id": 0},
    ]
    got = combine_partner_metrics(records, num_items=8, top_k=10)
    assert got["coverage@10"] == pytest.approx(4 / 8)
    assert got["partner-ndcg@10"] == [0.5, 0.2]  # ordered by partition id
    assert got["partner-ndcg@10-std"] == pytest.approx(np.std([0.5, 0.2]))
    assert got["partner-ndcg@10-min"] == pytest.approx(0.2) and got["partner-ndcg@10-max"] == pytest.approx(0.5)


def test_auc_equals_pairwise_counting_with_ties():
    rng = np.random.default_rng(4)
    members, non = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 20).astype(float)
    pairs = [(1.0 if m > x else 0.5 if m == x else 0.0) for m in members for x in non]
    assert auc(members, non) == pytest.approx(np.mean(pairs))
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small = bootstrap_auc(rng.normal(0.5, 1, 30), rng.normal(0, 1, 30), rounds=300)
    large = bootstrap_auc(rng.normal(0.5, 1, 600), rng.normal(0, 1, 600), rounds=300)
    for value, low, high in (small, large):
        assert low <= value <= high
    assert large[2] - large[1] < small[2] - small[1]
    assert 0.55 < large[0] < 0.75  # Phi(0.5 / sqrt 2) = 0.638


def _gaussian_epsilon(sigma: float, releases: int, delta: float = 1e-5) -> float:
    """Google's dp_accounting (independent of the code under test): Gaussian releases, RDP."""
    from dp_accounting import dp_event, rdp

    acc = rdp.RdpAccountant()
    acc.compose(dp_event.GaussianDpEvent(sigma), releases)
    return acc.get_epsilon(delta)


# Central DP's 2 releases at noise multiplier 1.5: for one partner (the sum moves by C) and for one user (a
# user changes its partner's clipped update into another: the sum moves by up to 2C, multiplier 0.75)
PARTNER_LEVEL, USER_LEVEL = _gaussian_epsilon(1.5, 2), _gaussian_epsilon(0.75, 2)


@pytest.mark.parametrize("mode,local_eps,expected", [
    ("local", 7.5, 7.5),  # the partners' user-level epsilon (the worst partner's)
    ("central", 0.0, USER_LEVEL),  # a privacy review: it took the partner-level epsilon, 2.2-2.4x too small
    ("both", 7.5, 7.5),  # both hold: the smaller
    ("both", 30.0, USER_LEVEL),
])
def test_audit_reads_the_runs_own_privacy_claim(tmp_path, mode, local_eps, expected):
    import json

    from simulations.run_claims import claimed_privacy

    assert 4.4 < PARTNER_LEVEL < 4.5 and 2 * PARTNER_LEVEL < USER_LEVEL < 30  # the two units differ more than 2x
    # The last round failed (every partner refused: epsilon null) and its line was cut short by a crash
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"round": 1, "epsilon": local_eps - 1, "delta": 1e-5, "ndcg@10": 0.1, "num-partners": 3}) + "\n"
        + json.dumps({"round": 2, "epsilon": None, "delta": None, "ndcg@10": None}) + "\n" + '{"round": 3, "epsi')
    partners = {"p0": {"epsilon": local_eps, "delta": 1e-5}, "p1": {"epsilon": local_eps - 2, "delta": 1e-5}}
    central = {"epsilon": PARTNER_LEVEL, "delta": 1e-5, "rounds": [
        {"round": r, "partners": 3, "epsilon": e, "noise-multiplier": 1.5}
        for r, e in ((1, _gaussian_epsilon(1.5, 1)), (2, PARTNER_LEVEL))]}
    (tmp_path / "privacy.json").write_text(json.dumps({"central": central, "partners": partners if local_eps else {}}))
    claim = claimed_privacy(tmp_path, {"dp": True, "dp-mode": mode})
    assert claim["epsilon"] == pytest.approx(expected, rel=1e-3) and claim["delta"] == 1e-5 and claim["ndcg@10"] == 0.1
    if local_eps:  # an epsilon edited into text: one line naming the file, not a traceback (a review)
        from common.errors import DataError

        (tmp_path / "privacy.json").write_text(json.dumps({"central": central, "partners": {"p0": {"epsilon": "abc"}}}))
        if mode != "central":
            with pytest.raises(DataError, match=r"privacy.json: an epsilon or delta is not a number"):
                claimed_privacy(tmp_path, {"dp": True, "dp-mode": mode})
        (tmp_path / "privacy.json").write_text(json.dumps({"central": central, "partners": partners}))
    assert claimed_privacy(tmp_path, {"dp": False, "dp-mode": "local"})["epsilon"] == float("inf")
    if mode == "central":
        # a round aggregated with no accounted epsilon (central noise 0, FedAdam): no claim, not 0 (a commit review)
        (tmp_path / "privacy.json").write_text(json.dumps({"central": {"epsilon": None, "rounds": [
            {"round": 1, "partners": 3, "epsilon": None, "noise-multiplier": 0.0}]}, "partners": {}}))
        assert claimed_privacy(tmp_path, {"dp": True, "dp-mode": mode})["epsilon"] == float("inf")
        # every round failed: only the initial model was released, epsilon 0 (a failed sweep row read inf: "no DP")
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "epsilon": None, "ndcg@10": 0.01}) + "\n")
        (tmp_path / "privacy.json").write_text(json.dumps({"central": {"epsilon": None}, "partners": {}}))
        assert claimed_privacy(tmp_path, {"dp": True, "dp-mode": mode})["epsilon"] == 0.0
        assert claimed_privacy(tmp_path, {"dp": True, "dp-mode": "off"})["epsilon"] == float("inf")
    if mode == "local" and local_eps:  # the worst epsilon at a smaller delta: the claim takes the largest delta
        partners["p0"]["delta"] = 1e-7
        (tmp_path / "privacy.json").write_text(json.dumps({"partners": partners}))
        assert claimed_privacy(tmp_path, {"dp": True, "dp-mode": mode})["delta"] == 1e-5


def test_audit_loss_is_the_training_objective_with_time_gaps_and_seen_items_left_out():
    from common.metrics import pad_left
    from common.models.context import history_gaps
    from common.models.sasrec import SASRec
    from simulations.audit import user_losses

    # Two users with the same items (one repeated) at different paces: a time-features model tells them apart
    seq = np.array([3, 5, 3, 7, 2, 9, 4])
    data = SequenceData(np.arange(1, 11).astype(str), np.array(["a", "b"]), [seq, seq],
                        [np.arange(7) * 60, np.arange(7) * 86400 * 30])
    torch.manual_seed(0)
    model = SASRec(10, max_len=8, dim=8, num_blocks=1, num_heads=2, dropout=0.0, time_features=True).eval()
    got = user_losses(model, data, 8, exclude_seen=True)
    smoothed = user_losses(model, data, 8, exclude_seen=True, label_smoothing=0.25)

    # Independent: one user at a time, each position's softmax over the items not yet seen (its target
    # kept); with label smoothing s: (1 - s) x -log p(target) + s x the mean -log p over those candidates
    train = data.train_sequences()
    gaps = history_gaps(train, data.timestamps)
    for u, h in enumerate(train):
        x = torch.stack([pad_left([h[:-1]], 8), pad_left([gaps[u][:-1]], 8)], dim=-1)
        with torch.no_grad():
            logits = model(x)[0, -(len(h) - 1):]
        for s, loss in ((0.0, got[u]), (0.25, smoothed[u])):
            losses = []
            for j, row in enumerate(logits):
                target = int(h[j + 1])
                candidates = sorted((set(range(1, 11)) - set(h[:j + 1].tolist())) | {target})
                logp = torch.log_softmax(row[candidates], dim=0)
                losses.append(-((1 - s) * logp[candidates.index(target)] + s * logp.mean()).item())
            assert loss == pytest.approx(np.mean(losses), rel=1e-5)
    assert abs(got[0] - got[1]) > 1e-4  # the gaps reached the model
    assert abs(smoothed[0] - got[0]) > 1e-3  # and the smoothing reached the loss


def test_audit_tells_memorised_members_from_held_out_users(tmp_path, one_torch_thread):
    """run_audit on a run directory built as simulations.run builds one, with a model that memorised
    its members (no DP, many epochs): the attacks must score members above the held-out users, and
    the control (the same seed's untrained model) must not. Only bounds 0 <= AUC <= 1 were checked
    before, which a flipped score sign or swapped members/non-members pass."""
    import json

    from flwr.app import ArrayRecord

    from common.config import resolve_config
    from common.partners import split_population
    from common.task import new_model
    from common.training import train_local
    from server.run_report import RunRecorder
    from simulations.audit import run_audit
    from simulations.population import write_population

    # Prepare: config.json and model.pt as the server writes them, holdout.json as simulations.run does
    cfg = resolve_config(None, {"dataset": "synthetic", "synthetic-users": 200, "synthetic-items": 200,
                                "holdout-fraction": 0.5, "seed": 3, "max-seq-len": 20, "embedding-dim": 32,
                                "num-blocks": 1, "dropout": 0.0, "dp": False})
    write_population(tmp_path, cfg, 2)
    members, held = split_population(cfg)  # the real split: the same users holdout.json lists
    assert json.loads((tmp_path / "holdout.json").read_text())["user-ids"] == held.user_ids.tolist()
    model = new_model(cfg, members.num_items)
    train_local(model, members, epochs=15, batch_size=32, learning_rate=0.01, max_len=20, seed=1,
                exclude_seen=bool(cfg["exclude-seen"]))
    RunRecorder(tmp_path, cfg, members.catalogue).save_model(ArrayRecord(model.state_dict()))

    # Execute
    result = run_audit(tmp_path, rounds=200, seed=3)

    # Assert: members are the trained users, non-members the held-out ones
    assert result["members"] == len(members.trainable_users()) and result["non-members"] == len(held.trainable_users())
    # Measured: auc-loss 0.964, auc-calibrated 0.970; controls 0.509 and 0.469 (100 members, 100 non-members)
    assert result["auc-loss"] > 0.85 and result["auc-calibrated"] > 0.85
    assert result["auc-loss-ci"][0] > 0.75
    for name in ("control-loss", "control-calibrated"):
        assert 0.35 < result[f"auc-{name}"] < 0.65, (name, result[f"auc-{name}"])
    # audit.json records what a rerun needs to repeat it
    text = (tmp_path / "audit.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"audit.json is not strict JSON: {c}"))
    assert saved["options"] == {"bootstrap-rounds": 200, "max-members": 2000, "seed": 3, "members-subsampled": False}
    assert saved["control"] == "initial model, trained on nobody"  # a random start: the control is the run's start
    # No DP: no epsilon (it was a bare Infinity), and an attack this strong needs a large epsilon to explain it
    assert (saved["dp"], saved["epsilon"], saved["delta"]) == (False, None, None)
    assert saved["epsilon-lower-bound-loss"]["epsilon-lower-bound"] > 1.0
    assert [x["fpr-target"] for x in saved["tpr-loss"]] == [0.01, 0.1] and saved["tpr-loss"][1]["tpr"] > 0.3
    # One member cannot be split in halves for the bound: one line naming the fix (a ValueError traceback; a review)
    from common.errors import DataError

    with pytest.raises(DataError, match="at least two members and two non-members, and has 1 and"):
        run_audit(tmp_path, rounds=20, seed=3, max_members=1)


def test_real_partners_without_partition_ids_stay_apart_in_the_spread():
    # A mutation audit: every record without a partition-id could have merged into one partner's NDCG
    from common.evaluation import combine_partner_metrics

    records = [{"num-users": 2.0, "ndcg@10-sum": 1.0}, {"num-users": 4.0, "ndcg@10-sum": 1.0}]
    out = combine_partner_metrics(records, num_items=10)
    assert sorted(out["partner-ndcg@10"]) == [0.25, 0.5]


def test_one_users_central_epsilon_reads_runs_recorded_before_rounds_named_their_multiplier():
    # A review: rounds without "noise-multiplier" (older runs) raised KeyError in the audit and the sweep
    from common.privacy import central_epsilon_per_user

    old = {"epsilon": PARTNER_LEVEL, "delta": 1e-5, "noise-multiplier": 1.5,
           "rounds": [{"round": 1, "partners": 3, "epsilon": 2.0}, {"round": 2, "partners": 3, "epsilon": PARTNER_LEVEL}]}
    epsilon, delta = central_epsilon_per_user(old)
    assert epsilon == pytest.approx(USER_LEVEL, rel=1e-3) and delta == 1e-5
    del old["noise-multiplier"]
    assert central_epsilon_per_user(old) is None  # no multiplier anywhere: no claim rather than a guess


def test_the_audits_control_says_when_it_is_not_the_runs_start():
    # A run started from item-init rows (the partners' co-occurrence counts) or an init-model: a fresh random
    # model was reported as "the initial model, trained on nobody" (a review)
    from simulations.audit import control_model, format_result

    assert control_model({"item-init": "random"}) == "initial model, trained on nobody"
    note = control_model({"item-init": "cooccurrence", "init-model": "runs/a/model.pt"})
    assert note.startswith("a fresh random model, not the run's start (item-init = cooccurrence, init-model)")
    row = {"run": "r", "model": "sasrec", "dp": False, "members": 2, "non-members": 2, "control": note,
           **{f"auc-{k}": 0.5 for k in ("loss", "calibrated", "control-loss", "control-calibrated")},
           **{f"auc-{k}-ci": [0.4, 0.6] for k in ("loss", "calibrated")},
           **{f"epsilon-lower-bound-{k}": {"epsilon-lower-bound": 0.0} for k in ("loss", "calibrated")},
           **{f"tpr-{k}": [{"tpr": 0.01, "fpr": 0.01}] for k in ("loss", "calibrated")}}
    assert f"control ({note})" in format_result(row)
