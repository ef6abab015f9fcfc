"""The prepared GPU check (simulations/bench/gpu_check.py) runs its checks on the CPU here, so it works
the day a session is lent a GPU; on CUDA it compares each path with the CPU."""

from __future__ import annotations

import json

import pytest

from simulations.bench import gpu_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_check_passes_on_the_cpu_and_the_report_says_so(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["check"] for r in report["checks"]] == [name for name, _ in gpu_check.CHECKS]
    assert len(report["checks"]) == 7 and all(r["passed"] for r in report["checks"])
    fused = next(r["detail"] for r in report["checks"] if r["check"] == "dp-train-fused")
    assert "10 steps" in fused  # 2 epochs x ceil(35 users / 8)
    assert capsys.readouterr().out.count("PASS") == 7


def test_a_failing_check_is_a_fail_row_and_exit_1_and_the_others_still_run(monkeypatch, capsys):
    def broken(device):
        raise AssertionError("per-user norms differ")

    monkeypatch.setattr(gpu_check, "CHECKS", [("broken", broken), gpu_check.CHECKS[-1]])
    assert gpu_check.main(["--device", "cpu"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  broken" in printed and "per-user norms differ" in printed
    assert "PASS  evaluation-matches-cpu" in printed


def test_a_device_this_machine_lacks_is_one_line(capsys):
    assert gpu_check.main(["--device", "cuda:7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: device = 'cuda:7'") and "\n" not in err
