"""provenance.json: what produced a run (code, versions, command), one entry per process start."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from common.provenance import PROJECT_ROOT, append_provenance, code_version
from simulations.local_grid import run_local

TINY = {"synthetic-users": 80, "synthetic-items": 30, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
        "batch-size": 10, "local-epochs": 1, "num-server-rounds": 1, "min-nodes": 2, "dp": False}


def test_a_run_directory_says_what_produced_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_REPRODUCIBLE_DP_NOISE", "1")
    run_dir = run_local({**TINY, "run-dir": str(tmp_path), "run-name": "prov"}, 2)
    (entry,) = json.loads((run_dir / "provenance.json").read_text())["starts"]
    assert entry["packages"]["torch"] == torch.__version__.split("+")[0] or entry["packages"]["torch"] == torch.__version__
    assert entry["packages"]["flwr"] and entry["packages"]["opacus"]
    assert entry["command"] == sys.argv and entry["first-round"] == 1
    assert entry["dataset (simulated partners)"] == "synthetic"
    assert entry["environment"]["FEDREC_REPRODUCIBLE_DP_NOISE"] == "1"
    assert len(entry["catalogue-fingerprint"]) == 16
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert entry["code"]["commit"] == head.stdout.strip() and isinstance(entry["code"]["dirty"], bool)


def test_each_start_appends_and_a_broken_file_is_replaced(tmp_path):
    (tmp_path / "provenance.json").write_text("{not json")
    append_provenance(tmp_path, **{"first-round": 1})
    append_provenance(tmp_path, **{"first-round": 4})  # a resume
    starts = json.loads((tmp_path / "provenance.json").read_text())["starts"]
    assert [s["first-round"] for s in starts] == [1, 4]


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert code_version(tmp_path) == {"commit": None}


def test_code_inside_another_checkout_has_no_commit(tmp_path):
    # A review: a Flower app unpacked under FLWR_HOME inside some git checkout got that checkout's commit
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "add", "f"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x"],
                   check=True)
    (tmp_path / "new_module.py").write_text("x")  # untracked: not "dirty" (the README: tracked files)
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "f").write_text("changed")
    assert code_version(tmp_path)["dirty"] is True
    app = tmp_path / "apps" / "fedrec"
    app.mkdir(parents=True)
    assert code_version(app) == {"commit": None, "flower-app": "fedrec"}
    assert code_version(tmp_path)["commit"]  # the checkout itself has one


def test_the_serverapps_token_is_not_written():
    # A deployment review: Flower passes the ServerApp a per-run token on its command line
    from common.provenance import redacted

    argv = ["flwr-serverapp", "--token", "abc123", "--insecure", "--token-file=/x/t", "--run-once"]
    assert redacted(argv) == ["flwr-serverapp", "--token", "<redacted>", "--insecure", "--token-file=<redacted>",
                              "--run-once"]
