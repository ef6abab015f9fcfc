"""The server's run record: partners' ranking sums combine into exact means and standard errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from common.metrics import ranking_sums
from server.run_report import RunRecorder


def test_partner_replies_give_the_all_users_mean_and_its_confidence_interval(tmp_path):
    ranks = np.random.default_rng(0).integers(0, 25, size=64)
    replies = [RecordDict({"metrics": MetricRecord({**ranking_sums(part, ks=(10,)), "partition-id": pid})})
               for pid, part in enumerate((ranks[:20], ranks[20:]))]
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    out = recorder.aggregate_evaluate_metrics(replies, "num-examples")

    gains = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0)
    hits = (ranks < 10).astype(float)
    assert math.isclose(out["ndcg@10"], gains.mean(), rel_tol=1e-9)
    assert math.isclose(out["ndcg@10-se"], gains.std(ddof=1) / math.sqrt(64), rel_tol=1e-9)
    assert math.isclose(out["hr@10-se"], hits.std(ddof=1) / math.sqrt(64), rel_tol=1e-9)

    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isclose(line["ndcg@10-se"], out["ndcg@10-se"])
    summary = recorder.write_summary().read_text()
    assert f"NDCG@10 +-{1.96 * out['ndcg@10-se']:.4f}" in summary


def test_summary_without_evaluation_claims_no_interval(tmp_path):
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))  # no partner evaluated this round
    summary = recorder.write_summary().read_text()
    # fraction-evaluate = 0: no made-up 0.0000 (metrics.jsonl has null)
    assert "final HR@10, NDCG@10: n/a (no round was evaluated" in summary and "0.0000" not in summary
    assert "CI" not in summary


def test_summary_names_the_last_evaluated_round(tmp_path):
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    ranks = np.array([0, 3, 40])
    recorder.aggregate_evaluate_metrics([RecordDict({"metrics": MetricRecord(ranking_sums(ranks, ks=(10,)))})],
                                        "num-examples")
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    recorder.end_round(2, ArrayRecord({"w": torch.zeros(2)}))  # evaluate-every = 2 style: round 2 not evaluated
    summary = recorder.write_summary().read_text()
    expected = (1.0 + 1.0 / math.log2(5.0)) / 3
    assert f"NDCG@10: {expected:.4f}" in summary and "round 1, the last evaluated" in summary


def test_run_dirs_named_finds_suffixed_copies_only(tmp_path):
    from server.run_report import new_run_dir, run_dirs_named

    first, second = new_run_dir(tmp_path, "exp"), new_run_dir(tmp_path, "exp")
    (tmp_path / "exp-long").mkdir()
    (tmp_path / "experiment").mkdir()
    assert second.name == "exp-2"
    assert run_dirs_named(tmp_path, "exp") == {first, second}
    assert run_dirs_named(tmp_path / "absent", "exp") == set()
    # the coordinator's run files (metrics, privacy report, model) are not for other accounts
    assert all(d.stat().st_mode & 0o777 == 0o700 for d in (first, second))


def test_local_grid_returns_the_directory_it_created_when_the_name_is_taken(tmp_path):
    import json

    from simulations.local_grid import run_local

    tiny = {"num-server-rounds": 1, "synthetic-users": 40, "synthetic-items": 20, "max-seq-len": 8, "dp": False,
            "embedding-dim": 8, "num-blocks": 1, "batch-size": 8, "local-epochs": 1, "run-dir": str(tmp_path),
            "run-name": "same", "min-nodes": 2}
    first = run_local(tiny, 2)
    second = run_local(tiny, 2)
    assert (first.name, second.name) == ("same", "same-2")
    assert json.loads((second / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 1


def test_round_line_says_n_a_and_no_dp_instead_of_zeros(tmp_path, monkeypatch):
    from server import run_report

    printed = []
    monkeypatch.setattr(run_report, "log", lambda level, msg, *args: printed.append(msg % args))
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))  # failed round, no evaluation
    plain = recorder.aggregate_train_metrics([RecordDict({"m": MetricRecord({"num-examples": 5, "train-loss": 2.5,
                                                                             "epsilon": 0.0, "delta": 0.0})})], "num-examples")
    assert "epsilon" not in plain and "delta" not in plain  # Flower logs this record: no 'epsilon': 0.0 there
    recorder.end_round(2, ArrayRecord({"w": torch.zeros(2)}))  # trained without DP, not evaluated
    recorder.aggregate_train_metrics([RecordDict({"m": MetricRecord({"num-examples": 5, "train-loss": 2.0,
                                                                     "epsilon": 1.25, "delta": 1e-5})})], "num-examples")
    recorder.end_round(3, ArrayRecord({"w": torch.zeros(2)}))
    rounds = [line for line in printed if line.startswith("round ")]
    assert rounds[0] == "round 1: HR@10 n/a  NDCG@10 n/a  epsilon n/a  loss n/a"
    assert rounds[1] == "round 2: HR@10 n/a  NDCG@10 n/a  no local DP  loss 2.5000"
    assert rounds[2] == "round 3: HR@10 n/a  NDCG@10 n/a  epsilon 1.250 (delta 1e-05)  loss 2.0000"
    # no local DP is null, not 0.0 (which a plot of metrics.jsonl read as perfect privacy; a reproducibility review)
    assert [json.loads(x)["epsilon"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [None, None, 1.25]


def test_summary_says_what_the_partners_trained_on(tmp_path):
    # A deployment review: partners on their own logs got "data: synthetic" (the run config's unused default)
    cfg = {"dataset": "synthetic", "catalogue": "/pub/catalogue.txt", "model": "sasrec", "dp": False}
    recorder = RunRecorder(tmp_path, cfg, np.array(["a"] * 30))
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    own = recorder.write_summary(data_sources=["own log", "own log"]).read_text()
    assert "- data: each partner's own log (2 partners; catalogue /pub/catalogue.txt)" in own
    mixed = recorder.write_summary(data_sources=["own log", "simulated partition"]).read_text()
    assert "1 partner's own log and 1 simulated partition of synthetic" in mixed
    assert "- data: synthetic," in recorder.write_summary(data_sources=["simulated partition"] * 3).read_text()


def test_a_mean_loss_is_over_the_partners_who_sent_one(tmp_path):
    # A deployed partner under local DP keeps its training loss (client/app.py): counting it as 0 made
    # the round's loss a weighted mean with zeros in it, and a round where nobody sent one read as loss 0
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec"}, np.array(["a"] * 30))
    mixed = recorder.aggregate_train_metrics([
        RecordDict({"m": MetricRecord({"num-examples": 30, "train-loss": 3.0, "epsilon": 1.0, "delta": 1e-5})}),
        RecordDict({"m": MetricRecord({"num-examples": 10, "train-loss": 1.0, "epsilon": 1.0, "delta": 1e-5})}),
        RecordDict({"m": MetricRecord({"num-examples": 60, "epsilon": 2.0, "delta": 1e-5})}),
    ], "num-examples")
    assert mixed["train-loss"] == pytest.approx((3.0 * 30 + 1.0 * 10) / 40) and mixed["num-examples"] == 100
    kept = recorder.aggregate_train_metrics([
        RecordDict({"m": MetricRecord({"num-examples": 60, "epsilon": 2.0, "delta": 1e-5})})], "num-examples")
    assert "train-loss" not in kept
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["train-loss"] is None and line["epsilon"] == 2.0


def test_summary_of_a_run_where_no_round_aggregated_says_so(tmp_path):
    # A researcher journey: every partner refused, and summary.md gave the initial model's HR/NDCG as the result
    recorder = RunRecorder(tmp_path, {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    recorder.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    assert "no round aggregated an update: the model is the initial one" in recorder.write_summary().read_text()
    (tmp_path / "t").mkdir()
    trained = RunRecorder(tmp_path / "t", {"dataset": "x", "model": "sasrec", "dp": False}, np.array(["a"] * 30))
    trained.aggregate_train_metrics([RecordDict({"metrics": MetricRecord({"num-examples": 5})})], "num-examples")
    trained.end_round(1, ArrayRecord({"w": torch.zeros(2)}))
    assert "no round aggregated" not in trained.write_summary().read_text()
