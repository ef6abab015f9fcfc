"""End-to-end deployment on 127.0.0.1: real flower-superlink (TLS, node authentication, database),
real flower-supernode processes each on its own log, real ``flwr run``.

One federation (SuperLink + three registered partners + a fourth that will be killed) serves
the module, and one SecAgg+ run covers TLS, node authentication, the partners' own logs and
ledgers, and a partner dying mid-round (one run instead of two: each run costs a ServerApp start
and a ClientApp process per partner and message); a short run checks item-init's query message.
Tests run in file order and the last one restarts the SuperLink. Every process is stopped by the fixture, also when a test fails
(simulations/deployment.py kills whole process trees).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from types import SimpleNamespace

import pytest

from common.config import resolve_config
from common.data.catalogue import save_catalogue
from common.task import catalogue
from simulations.deployment import LocalFederation, write_partner_logs

pytestmark = pytest.mark.slow

TINY = {
    "synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
    "local-epochs": 1, "batch-size": 8, "seed": 42,
}
# Explicit timeouts: a round waits at most ROUND_TIMEOUT s for replies, a run at most RUN_TIMEOUT s.
ROUND_TIMEOUT = 240.0  # generous: a dead partner is detected by its missed heartbeats (<= 60 s) well before
RUN_TIMEOUT = 900.0
VICTIM_HEARTBEAT_S = 10  # flwr.common.constant.HEARTBEAT_MIN_INTERVAL: the SuperLink refuses less
SECAGG_TRAIN_MESSAGES = 4  # per round: key set-up, key sharing, training (masked update), unmasking


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    fed = LocalFederation(root)
    try:
        # The coordinator publishes the catalogue; each partner holds its own log
        cat = save_catalogue(catalogue(resolve_config(None, TINY)), root / "catalogue.txt")
        logs = write_partner_logs(root / "data", 4, users=150, items=40, seed=42)
        fed.start_superlink()
        nodes = {}
        # Register first, then start: `nodes[fed.register(key)] = fed.start_supernode(...)` (as this
        # was written) starts the node first (Python evaluates the right-hand side first), so its
        # first activation found no such node and it lived on retries; on a loaded machine the
        # registration came after its 15 s of retries and it exited ("Failed to activate SuperNode")
        for i in range(3):
            private, public = fed.partner_keys(f"partner-{i + 1}")
            ledger = root / f"ledger-{i + 1}.sqlite"  # the partner's own privacy ledger (README's node config)
            node_id = fed.register(public)
            floor = {"max-epsilon": 4.0} if i == 0 else {}  # partner 1's own privacy floor (README)
            nodes[node_id] = fed.start_supernode(f"partner-{i + 1}", private, logs[i], **{"ledger-path": ledger}, **floor)
        # A fourth registered partner, to be killed mid-round (SIGKILL: no goodbye to the SuperLink)
        # It sends heartbeats at Flower's shortest allowed interval (10 s, a sitecustomize on its PYTHONPATH sets
        # HEARTBEAT_DEFAULT_INTERVAL before Flower reads it) instead of the default 30 s: the SuperLink declares it
        # dead 20 s after its last heartbeat instead of 60 s, by the same code path; the run waited for that alone
        private, public = fed.partner_keys("victim")
        fed.register(public)
        fast = root / "fast-heartbeat"
        fast.mkdir()
        (fast / "sitecustomize.py").write_text(f"import flwr.common.constant as c\nc.HEARTBEAT_DEFAULT_INTERVAL = "
                                               f"{VICTIM_HEARTBEAT_S}\n")
        env = fed.env
        fed.env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(fast), env.get("PYTHONPATH")]))}
        try:
            victim = fed.start_supernode("victim", private, logs[3])
        finally:
            fed.env = env
        yield SimpleNamespace(fed=fed, root=root, catalogue=cat, logs=logs, nodes=nodes, victim=victim)
    finally:
        fed.close()


def _run_config(env, name: str, **extra) -> dict:
    return {**TINY, "catalogue": str(env.catalogue), "run-dir": str(env.root / "runs"), "run-name": name,
            "round-timeout": ROUND_TIMEOUT, "node-wait-timeout": 120.0, **extra}


def _rounds(env, name: str, res) -> list[dict]:
    path = env.root / "runs" / name / "metrics.jsonl"
    assert path.exists(), f"run {name} wrote no metrics:\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ledger_rounds(path) -> int:
    """Rounds with DP-SGD spend recorded in a partner's ledger file."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(DISTINCT run || ':' || server_round) FROM batches "
                                "WHERE kind = 'train'").fetchone()[0])


def _ledger_target(path) -> float:
    """The target epsilon a partner's ledger calibrated its one run for."""
    with sqlite3.connect(path) as conn:
        return float(conn.execute("SELECT target_epsilon FROM calibrations").fetchone()[0])


def test_secure_run_over_tls_with_node_auth_survives_a_partner_killed_mid_round(federation):
    env, fed, victim = federation, federation.fed, federation.victim
    # TLS on the SuperLink's one HTTP port (Fleet, Control and Runtime APIs)
    assert "Uvicorn running on https://" in fed.superlink.output()
    for node in [*env.nodes.values(), victim]:  # all four activated: all four will be sampled
        assert node.wait_for("SuperNode ID:", timeout=120), node.output()[-2000:]

    # A SuperNode whose key was never registered tries to join while the run goes on
    rogue_key, _ = fed.partner_keys("rogue")
    rogue = fed.start_supernode("rogue", rogue_key, env.logs[0], max_retries=2, max_wait_time=15)  # gives up soon

    # The registered partners train 2 rounds under SecAgg+; the victim dies while training in round 1.
    # min-nodes 3: after the victim dies, evaluation and round 2 must not wait for a fourth partner.
    outcome = {}
    config = _run_config(env, "secagg", **{"num-server-rounds": 2, "min-nodes": 3, "secure-aggregation": True})
    runner = threading.Thread(target=lambda: outcome.update(res=fed.run(config, timeout=RUN_TIMEOUT)))
    runner.start()
    try:
        # SecAgg+ sends 'train' messages for setup, share_keys, then the real training: kill at the third
        assert victim.wait_for("Receiving: train message", timeout=RUN_TIMEOUT, count=3), victim.output()[-2000:]
        victim.stop(signal.SIGKILL, grace=5)
    finally:
        runner.join(timeout=RUN_TIMEOUT)
    assert not runner.is_alive()
    res = outcome["res"]

    # The unregistered SuperNode was turned away
    rogue.popen.wait(timeout=120)
    assert rogue.popen.returncode != 0
    assert "Failed to activate SuperNode" in rogue.output()

    # Both rounds aggregated the three survivors
    rounds = _rounds(env, "secagg", res)
    assert [r["round"] for r in rounds] == [1, 2], res.stdout[-3000:]
    assert all(r["num-partners"] == 3 for r in rounds), res.stdout[-3000:]
    assert all(r["eval-users"] > 0 for r in rounds)
    run_dir = env.root / "runs" / "secagg"
    assert (run_dir / "config.json").exists() and (run_dir / "model.pt").exists()
    assert (run_dir / "rounds.png").exists() and (run_dir / "partners.png").exists()  # drawn by the ServerApp
    assert "- data: each partner's own log (" in (run_dir / "summary.md").read_text()  # not the unused dataset
    assert json.loads((run_dir / "config.json").read_text())["catalogue"] == str(env.catalogue)
    # The server unmasked the sum of the three survivors, removing the dead partner's masks
    assert "summed 3 masked updates (1 dropped out)" in res.stdout
    # Nothing was clipped: a partner would have refused (error reply) instead of sending
    assert "would clip" not in res.stdout and "budget exhausted" not in res.stdout
    assert "largest value sent under SecAgg+ was" in res.stdout
    # Each partner trained on its own file in both rounds and kept its privacy ledger where its node config said
    for i, proc in enumerate(env.nodes.values()):
        assert proc.output().count("Receiving: train message") == 2 * SECAGG_TRAIN_MESSAGES
        # its own log says what it kept and released (a journey review: an INFO line of ours was never shown)
        # (a flwr-clientapp process prints each of Flower's lines twice: through its console and its own handler)
        log_text = proc.output()
        assert all(f"round {r} trained, loss " in log_text for r in (1, 2)) and "(kept here: not sent)" in log_text
        assert "user count released for run secagg: " in log_text
        assert _ledger_rounds(env.root / f"ledger-{i + 1}.sqlite") == 2
    # Partner 1's node config max-epsilon = 4 held against the run's target-epsilon = 8
    assert [_ledger_target(env.root / f"ledger-{i}.sqlite") for i in (1, 2, 3)] == [4.0, 8.0, 8.0]

    # Eighteenth session: no reply carried a hash of a partner's data (its label and fingerprint are keyed), and
    # the coordinator's report says where the run stands, as a script would read it after `flwr run --stream`
    from common.task import partner_data
    from server.cli import main as server_cli

    cfg = resolve_config(None, {**TINY, "catalogue": str(env.catalogue)})
    content = [partner_data(cfg, {"data-path": str(log)}).fingerprint() for log in env.logs]
    for i in (1, 2, 3):  # the very hashes the partners computed (their ledgers are written for them)
        with sqlite3.connect(env.root / f"ledger-{i}.sqlite") as conn:
            assert conn.execute("SELECT value FROM meta WHERE key = 'fingerprint'").fetchone()[0] == content[i - 1]
    text = (run_dir / "privacy.json").read_text()
    assert not any(fingerprint in text for fingerprint in content)
    # Nineteenth session: each partner released its user count once, noised, on its ledger, and every count the
    # coordinator holds is that one; no partner sent its training loss
    public = []
    for i in (1, 2, 3):
        with sqlite3.connect(env.root / f"ledger-{i}.sqlite") as conn:
            assert conn.execute("SELECT noise_multiplier, sample_rate, steps FROM batches WHERE kind = 'count'"
                                ).fetchall() == [(10.0, 1.0, 1)]
            public.append(int(conn.execute("SELECT value FROM meta WHERE key LIKE 'public-users:%'").fetchone()[0]))
    partners = json.loads(text)["partners"].values()
    assert sorted(int(p["dp-users"]) for p in partners if "dp-users" in p) == sorted(public)
    assert all(r["train-loss"] is None for r in rounds)
    assert server_cli(["report", str(run_dir)]) == 0


def test_item_init_counts_reach_the_coordinator_and_a_partner_with_a_floor_refuses(federation):
    # item-init = cooccurrence over real SuperNodes: the pre-round query message, each partner's counts
    # over TLS, and partner 1's node config max-epsilon = 4 (it expects DP) refusing in one line
    env, fed = federation, federation.fed
    config = _run_config(env, "item-init", **{"num-server-rounds": 1, "min-nodes": 2, "dp": False,
                                              "item-init": "cooccurrence"})
    res = fed.run(config, timeout=RUN_TIMEOUT)
    rounds = _rounds(env, "item-init", res)
    assert [r["round"] for r in rounds] == [1] and rounds[0]["ndcg@10"] is not None, res.stdout[-3000:]
    start = json.loads((env.root / "runs" / "item-init" / "provenance.json").read_text())["starts"][0]
    # partners 2 and 3 counted (the victim too, when this test runs without the one that kills it)
    assert start["item-init"] == "cooccurrence" and start["partners-counted"] >= 2, res.stdout[-3000:]
    assert start["partners-refused"] == 1
    assert "expects DP, its node config sets max-epsilon" in res.stdout
    for proc in list(env.nodes.values())[1:]:
        assert "Sending: query message" in proc.output()


def test_item_prior_histograms_are_released_once_on_each_partners_ledger(federation):
    # item-prior = popularity over real SuperNodes under local DP: each partner's noised histogram over TLS,
    # recorded on its own ledger (beside its noised user count) before it leaves, and listed by the coordinator
    env, fed = federation, federation.fed
    # target 30: partners 2 and 3 keep their ledgers across this module's runs, and the SecAgg+ run (when it ran
    # first) spent their target 8; partner 1's own max-epsilon = 4 then leaves it nothing, so it refuses
    config = _run_config(env, "item-prior", **{"num-server-rounds": 1, "min-nodes": 2, "item-prior": "popularity",
                                               "target-epsilon": 30.0})
    res = fed.run(config, timeout=RUN_TIMEOUT)
    rounds = _rounds(env, "item-prior", res)
    assert [r["round"] for r in rounds] == [1] and 0 < rounds[0]["epsilon"] <= 30.0, res.stdout[-3000:]
    run_dir = env.root / "runs" / "item-prior"
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-prior"] == "popularity" and start["partners-in-prior"] >= 2, res.stdout[-3000:]
    released = {}
    for i in (1, 2, 3):  # their own ledgers (node config ledger-path): one histogram at most, for this run
        with sqlite3.connect(env.root / f"ledger-{i}.sqlite") as conn:
            released[i] = conn.execute("SELECT noise_multiplier, sample_rate, steps FROM batches WHERE kind = "
                                       "'item-prior' AND run = 'item-prior'").fetchall()
    assert released[2] == released[3] == [(2.0, 1.0, 1)] and released[1] in ([], [(2.0, 1.0, 1)])
    partners = json.loads((run_dir / "privacy.json").read_text())["partners"].values()
    listed = sum(p.get("item-histogram") == "released before round 1" for p in partners)
    assert listed == start["partners-in-prior"]


def test_superlink_restart_keeps_registered_nodes(federation):
    fed = federation.fed
    before = fed.registered_nodes()
    assert set(federation.nodes) <= before and len(before) == 4  # three partners and the victim
    fed.superlink.stop()
    fed.start_superlink()
    assert fed.registered_nodes() == before
