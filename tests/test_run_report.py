"""The server's run record: partners' ranking sums combine into exact means and standard errors."""

from __future__ import annotations

import json
import math

import numpy as np
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
    assert "test users)" in summary and "CI" not in summary
