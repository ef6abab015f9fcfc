"""Fault injection end to end: poisoned updates, a crashing partner and a hung partner.

In process (LocalGrid): a partner sending NaN, a wrong shape and a 1000x-scaled update in
rounds 1-3 leaves the global model bit-identical to a run where that partner only fails.
On Flower's simulation engine (Ray, subprocess): the same partner plus one that sleeps past
the round timeout and one that crashes with data in its exception; the run completes.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.flower_processes import run_to_end, start

from common.errors import FederationError
from simulations.fault_injection import make_faulty_client_app, parse_faults
from simulations.local_grid import run_local

TINY = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
        "dp": False, "local-epochs": 1, "num-server-rounds": 3, "min-nodes": 2,
        "max-update-norm": 10.0}  # honest updates here measure ~0.1-0.2; 1000x ~115


def final_model(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_malicious_partner_has_no_effect_on_fedavg(tmp_path, caplog):
    # Prepare: partner 3 poisons every round; in the reference it crashes every round instead
    poisoned = {**TINY, "run-dir": str(tmp_path), "run-name": "poisoned"}
    reference = {**TINY, "run-dir": str(tmp_path), "run-name": "reference"}
    bad = make_faulty_client_app(poisoned, parse_faults("3:nan@1 3:shape@2 3:scale@3"))
    absent = make_faulty_client_app(reference, parse_faults("3:crash@1 3:crash@2 3:crash@3"))

    # Execute
    run_local(poisoned, 4, client_apps=[bad] * 4)
    run_local(reference, 4, client_apps=[absent] * 4)

    # Assert: each poisoned update rejected (with its node id), the model as if the partner were absent
    rejections = json.loads((tmp_path / "poisoned" / "rejections.json").read_text())
    assert [(r["round"], r["node"]) for r in rejections] == [(1, 1004), (2, 1004), (3, 1004)]
    reasons = " | ".join(r["reason"] for r in rejections)
    assert "non-finite" in reasons and "has shape" in reasons and "exceeds max-update-norm" in reasons
    a, b = final_model(tmp_path / "poisoned"), final_model(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in b)
    lines = [json.loads(x) for x in (tmp_path / "poisoned" / "metrics.jsonl").read_text().splitlines()]
    assert [line["num-partners"] for line in lines] == [3, 3, 3]
    # The reference partner's crash reached the server sanitised; its details stayed in the partner's log
    server = "\n".join(r.getMessage() for r in caplog.records if r.name == "flwr")
    assert "ValueError: internal error at the partner" in server and "u-4711" not in server
    partner = "\n".join(str(r.exc_info[1]) for r in caplog.records if r.name == "fedrec.client" and r.exc_info)
    assert "u-4711" in partner


@pytest.mark.slow
def test_hung_crashing_and_poisoning_partners_do_not_stop_a_simulation(tmp_path):
    # Round 1 is a clean warm-up: it includes starting Ray's actors, which on a busy machine can
    # itself outlast the round timeout (the round then fails cleanly, which is fine here).
    # Round 2: partner 0 sends NaN, partner 3 sleeps 30 s, past the 25 s round timeout (a tiny honest
    # round takes a few seconds; the sleeper wakes before round 3 needs its Ray actor back). Its reply can
    # come no sooner than 30 s after round 2 sent it the message, whatever the load: it always misses the
    # round; and the run ends only once the sleeper has woken, so each second of sleep is a second of test.
    # Round 3: partner 0 sends a wrong shape, partner 1 crashes with "user data" in the exception.
    # Round 4: partner 0 sends a 1000x-scaled update.
    faults = "0:nan@2 3:sleep@2 0:shape@3 1:crash@3 0:scale@4"
    config = " ".join(f"{k}={json.dumps(v)}" for k, v in {**TINY, "num-server-rounds": 4}.items())
    config += f' round-timeout=25.0 run-dir="{tmp_path}" run-name="faulty"'
    log = tmp_path / "sim.log"
    run_to_end(start("simulations.fault_injection", config, log, "--num-partners", "4", "--faults", faults,
                     "--sleep-seconds", "30"), log)

    lines = [json.loads(x) for x in (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert lines[1]["num-partners"] == 2  # partner 0 rejected, partner 3 still asleep: round 2 did not wait
    assert lines[2]["num-partners"] == 2 and lines[3]["num-partners"] == 3
    rejections = json.loads((tmp_path / "faulty" / "rejections.json").read_text())
    reasons = {r["round"]: r["reason"] for r in rejections}
    assert "non-finite" in reasons[2] and "has shape" in reasons[3] and "exceeds max-update-norm" in reasons[4]
    assert len({r["node"] for r in rejections}) == 1  # always the same partner
    text = log.read_text()
    # The crash reached the server as a sanitised reason: the exception's data never left the partner
    # (Ray prefixes the partners' own log lines with "(ClientAppActor pid=...)"; the rest is the server's)
    server_lines = [x for x in text.splitlines() if "ClientAppActor" not in x]
    assert any("ValueError: internal error at the partner" in x for x in server_lines)
    assert not any("u-4711" in x for x in server_lines)
    assert any("u-4711" in x for x in text.splitlines() if "ClientAppActor" in x)  # the partner's log has it


def test_too_few_partners_fail_the_run_with_one_line_instead_of_waiting_forever(tmp_path):
    overrides = {**TINY, "min-nodes": 3, "node-wait-timeout": 0.5, "run-dir": str(tmp_path), "run-name": "lonely"}
    with pytest.raises(FederationError, match=r"only 2 of the 3 partners needed \(min-nodes\) connected within "
                                              r"node-wait-timeout = 0.5 s"):
        run_local(overrides, 2)
    assert not (tmp_path / "lonely" / "checkpoint.pt").exists()  # nothing was trained, nothing to resume


def test_a_partner_crashing_under_secure_aggregation_is_a_dropout(tmp_path):
    # SecAgg+'s set-up messages carry no round config: the fault plan must pass them through
    overrides = {**TINY, "secure-aggregation": True, "num-server-rounds": 2, "synthetic-users": 120,
                 "run-dir": str(tmp_path), "run-name": "secagg-crash"}
    app = make_faulty_client_app(overrides, parse_faults("2:crash@1"))
    run_dir = run_local(overrides, 4, client_apps=[app] * 4)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num-partners"]) for r in rounds] == [(1, 3), (2, 4)]


def test_a_fault_the_run_cannot_inject_is_refused():
    # A simulation-features journey: "9:nan@1 0:scale@7" in a 3-partner, 1-round run injected nothing, and the
    # clean run read as a defence that held
    from common.errors import ConfigError

    assert parse_faults("0:nan@1 2:scale@1", num_partners=3, num_rounds=1) == {0: {1: "nan"}, 2: {1: "scale"}}
    for text, says in (("9:nan@1", "partition 9 is outside 0..2"), ("0:scale@7", "round 7 is outside 1..1"),
                       ("0:nan@1 0:scale@1", "partition 0 already has a fault in round 1")):
        with pytest.raises(ConfigError, match=says):
            parse_faults(text, num_partners=3, num_rounds=1)
