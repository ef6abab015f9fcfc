"""End to end: a partner whose budget runs out stops at the right round; the federation carries on.

One Flower simulation (3 partners, 2 rounds, dp-mode both with client-side clipping) covers the
ledger, the refusal reply, the server's screening inside Flower's central DP wrapper,
fixedclipping_mod, privacy.json and the guarantee in summary.md.
"""

from __future__ import annotations

import json

import pytest
from dp_accounting import dp_event, rdp
from flwr.app import Context, RecordDict

from client.privacy_budget import PartnerBudget
from common.config import resolve_config
from common.task import partner_data
from tests.flower_processes import run_to_end, start

TINY = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
        "batch-size": 10, "local-epochs": 1, "num-server-rounds": 2, "min-nodes": 2}


@pytest.mark.slow
def test_exhausted_partner_stops_and_the_run_completes(tmp_path):
    # Prepare: partner 0 already spent one of this run's two planned rounds (e.g. before a restart)
    overrides = {**TINY, "run-dir": str(tmp_path / "runs"), "run-name": "budget",
                 "ledger-dir": str(tmp_path / "ledgers"),
                 "dp-mode": "both", "central-clipping": "client", "central-noise-multiplier": 0.5}
    cfg = resolve_config(None, overrides)
    node = {"partition-id": 0, "num-partitions": 3}
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    budget = PartnerBudget.open(cfg, context, partner_data(cfg, node), "budget")
    budget.record(context, 0, [budget.calibration.round_mechanism()])
    budget.close()

    # Execute: the simulation in its own process group, killed whole at the end (Ray included)
    run_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    log = tmp_path / "simulation.log"
    run_to_end(start("simulations.run", run_config, log, "--num-partners", "3"), log)
    run_dir = tmp_path / "runs" / "budget"

    # Assert: partner 0 trained round 1 only and refused round 2 with the budget message
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert [r["num-partners"] for r in rounds] == [3, 2]
    report = json.loads((run_dir / "privacy.json").read_text())
    partners = report["partners"]
    assert partners["partner-0"]["rounds-trained"] == [1]
    (refusal,) = partners["partner-0"]["refused"]
    assert refusal["round"] == 2 and refusal["reason"].startswith("budget exhausted: epsilon ")
    assert partners["partner-1"]["rounds-trained"] == partners["partner-2"]["rounds-trained"] == [1, 2]
    assert partners["partner-0"]["ledger-created"] == "false"  # seeded before the run
    assert partners["partner-1"]["ledger-created"] == partners["partner-2"]["ledger-created"] == "true"

    # Every partner's final epsilon is within target, and equals dp-accounting on its mechanism
    for p in partners.values():
        acc = rdp.RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(p["sample-rate"], dp_event.GaussianDpEvent(p["noise-multiplier"])),
                    int(p["ledger-steps"]))
        assert p["epsilon"] == pytest.approx(acc.get_epsilon(p["delta"]), rel=0.01)
        assert p["epsilon"] <= cfg["target-epsilon"]

    # Central DP: two accounted releases, and the guarantee sentence in summary.md
    assert [r["partners"] for r in report["central"]["rounds"]] == [3, 2]
    assert report["central"]["rounds"][1]["epsilon"] > report["central"]["rounds"][0]["epsilon"] > 0
    summary = (run_dir / "summary.md").read_text()
    assert report["guarantee"] in summary and "user" in report["guarantee"]
