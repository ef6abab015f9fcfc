"""``fedrec-server report RUN_DIR``: a status a coordinator's script can test (flwr run --stream exits 0)."""

from __future__ import annotations

import json

import pytest

from server.cli import main as server_cli
from simulations.local_grid import run_local

TINY = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
        "local-epochs": 1, "batch-size": 8, "num-server-rounds": 2}


@pytest.mark.slow
def test_the_report_tells_a_complete_run_from_one_with_rounds_nobody_trained_and_an_unfinished_one(tmp_path, capsys):
    base = {**TINY, "run-dir": str(tmp_path / "runs"), "run-name": "r", "ledger-dir": str(tmp_path / "ledgers")}
    run_dir = run_local(base, 2)

    # Complete: every planned round aggregated updates
    assert server_cli(["report", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"run r ({run_dir}): complete, 2 of 2 rounds logged")
    assert "partner-0: epsilon 7.99" in text and "trained in rounds 1,2" in text
    assert server_cli(["report", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    final = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["final"]["ndcg@10"] == final["ndcg@10"] and report["failed-rounds"] == []
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert report["guarantee"] == privacy["guarantee"]
    assert report["partners"]["partner-1"]["epsilon"] == privacy["partners"]["partner-1"]["epsilon"]

    # A third round on spent budgets: every partner refuses, the run "completes" with a round that trained nobody
    run_local({**base, "num-server-rounds": 3, "resume": True}, 2)
    assert server_cli(["report", str(run_dir)]) == 3
    text = capsys.readouterr().out
    assert "failed rounds, 3 of 3 rounds logged" in text and "rounds that aggregated no update: 3" in text
    assert "refused 1x (" in text and "budget exhausted" in text

    # Unfinished: a crash before the last round's files (here: summary.md lost), or fewer rounds logged
    (run_dir / "summary.md").unlink()
    assert server_cli(["report", str(run_dir)]) == 3
    assert "incomplete" in capsys.readouterr().out


def test_the_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert server_cli(["report", str(tmp_path / "missing")]) == 2  # a typo said "not a run directory" (a review)
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such directory"
    assert server_cli(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a run directory (no config.json; the ServerApp " \
                                              "writes one when a run starts)"
    (tmp_path / "config.json").write_text("{half")
    assert server_cli(["report", str(tmp_path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"num-server-rounds": "five"}))  # a traceback (a review)
    assert server_cli(["report", str(tmp_path)]) == 2
    assert "config.json: num-server-rounds or top-k is not a whole number ('five', None)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"num-server-rounds": 3}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"round": 1, "num-partners": 2, "ndcg@10": 0.1}) + "\n{\"rou")
    assert server_cli(["report", str(tmp_path)]) == 3  # a crash mid-line: the whole lines count
    out = capsys.readouterr().out
    assert "incomplete, 1 of 3 rounds logged" in out and "no privacy.json" in out
    # no checkpoint: resume=true would be refused, so the report does not advise it (a coordinator review)
    assert "no checkpoint to resume from; start it again" in out and "resume=true" not in out
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert server_cli(["report", str(tmp_path)]) == 3
    assert "resume with --run-config 'run-name=" in capsys.readouterr().out
    # a coordinator review: bytes that are not UTF-8 were a UnicodeDecodeError traceback; {} read "2 of 0 rounds"
    with (tmp_path / "metrics.jsonl").open("ab") as fh:
        fh.write(b"\n\xff\xfe{}\n")
    (tmp_path / "privacy.json").write_text(json.dumps({"a": 1}))
    assert server_cli(["report", str(tmp_path)]) == 3
    captured = capsys.readouterr()
    assert "incomplete, 1 of 3 rounds logged" in captured.out and "skipped 2 unreadable line(s)" in captured.err
    assert "privacy.json states no guarantee: the file was edited or damaged" in captured.out
    (tmp_path / "config.json").write_text("{}")
    assert server_cli(["report", str(tmp_path)]) == 2
    assert "config.json: no num-server-rounds; not a run's config" in capsys.readouterr().err


def test_the_report_reads_damaged_numbers_other_k_and_partners_without_dp(tmp_path, capsys, monkeypatch):
    # A review: a NaN made --json a traceback, `report .` had no run name, top-k = 20 runs showed @10,
    # and a partner without local DP read "epsilon 0.000", i.e. perfect privacy
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num-server-rounds": 1, "top-k": 20}))
    (run / "metrics.jsonl").write_text('{"round": 1, "num-partners": 2, "hr@20": NaN, "ndcg@20": 0.25, '
                                       '"eval-users": NaN}\n')
    (run / "privacy.json").write_text(json.dumps({"guarantee": "No differential privacy.", "partners": {
        "p": {"epsilon": 0.0, "delta": 0.0, "noise-multiplier": 0.0, "rounds-trained": [1],
              "not-aggregated": [{"round": 1, "reason": "update norm 12 above max-update-norm 5"}]}}}))
    for name in ("summary.md", "model.pt"):
        (run / name).write_text("x")
    monkeypatch.chdir(run)
    assert server_cli(["report", "."]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run r ({run}): complete") and "HR@20 -, NDCG@20 0.2500, 0 test users" in out
    assert "p: no local DP, trained in rounds 1; 1 update(s) not aggregated (update norm 12" in out
    assert server_cli(["report", ".", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert report["final"]["hr@20"] is None and report["partners"]["p"]["epsilon"] is None
    (run / "metrics.jsonl").write_text('{"round": 1, "num-partners": 2}\n')  # fraction-evaluate = 0
    assert server_cli(["report", "."]) == 0 and "no round was evaluated" in capsys.readouterr().out


def test_a_partner_refused_before_any_reply_is_not_said_to_run_without_dp(tmp_path, capsys):
    # A journey review: a local-DP partner that refused in its first round read "no local DP" in the report
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num-server-rounds": 1}))
    (run / "metrics.jsonl").write_text('{"round": 1, "num-partners": 1}\n')
    (run / "privacy.json").write_text(json.dumps({"guarantee": "g", "partners": {
        "node-5": {"refused": [{"round": 1, "reason": "privacy ledger is behind what was recorded in it"}]},
        "p": {"epsilon": 0.0, "rounds-trained": [1]}}}))
    for name in ("summary.md", "model.pt"):
        (run / name).write_text("x")
    server_cli(["report", str(run)])
    out = capsys.readouterr().out
    assert "node-5: epsilon unknown (no reply with privacy numbers), trained in rounds none; refused 1x" in out
    assert "p: no local DP, trained in rounds 1" in out


def _finished_run(tmp_path, lines: list[str], partners: dict | None = None):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num-server-rounds": len(lines)}))
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (run / "privacy.json").write_text(json.dumps({"guarantee": "g", "partners": partners or {}}))
    for name in ("summary.md", "model.pt"):
        (run / name).write_text("x")
    return run


def test_the_status_needs_every_final_file_and_an_update_in_every_round(tmp_path, capsys):
    """A script's exit status: 0 only with every round aggregated and summary.md and model.pt written; a round
    that aggregated nothing (num-partners null) or a lost final file is exit 3 (a mutation audit: only the
    end-to-end test, on a real run, pinned these)."""
    run = _finished_run(tmp_path, ['{"round": 1, "num-partners": 2, "hr@10": 0.5, "ndcg@10": 0.25}',
                                   '{"round": 2, "num-partners": 2, "hr@10": 0.75, "ndcg@10": 0.5}'])
    assert server_cli(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "complete, 2 of 2" in out and "final evaluation (round 2): HR@10 0.7500, NDCG@10 0.5000" in out
    for name in ("model.pt", "summary.md"):
        (run / name).rename(run / f"{name}.away")
        assert server_cli(["report", str(run)]) == 3, name
        assert "incomplete, 2 of 2 rounds logged" in capsys.readouterr().out
        (run / f"{name}.away").rename(run / name)
    (run / "metrics.jsonl").write_text('{"round": 1, "num-partners": 2}\n{"round": 2, "num-partners": null}\n')
    assert server_cli(["report", str(run)]) == 3
    out = capsys.readouterr().out
    assert "failed rounds, 2 of 2 rounds logged" in out and "rounds that aggregated no update: 2" in out


def test_a_spend_stated_by_a_refusal_is_shown_as_the_partners_epsilon(tmp_path, capsys):
    """privacy.json takes a refusing partner's epsilon from its refusal (no noise multiplier on record): the report
    shows that epsilon, not "epsilon unknown" (a mutation audit)."""
    run = _finished_run(tmp_path, ['{"round": 1, "num-partners": 1}'], {
        "node-7": {"epsilon": 7.997, "delta": 1e-5, "epsilon-from": "refusal in round 1",
                   "refused": [{"round": 1, "reason": "ledger busy"},
                               {"round": 1, "reason": "budget exhausted: epsilon 7.997 of 8"}]},
        "p": {"epsilon": 0.0, "rounds-trained": [1], "refused": [{"round": 1, "reason": "ledger busy"}]}})
    server_cli(["report", str(run)])
    out = capsys.readouterr().out
    # the latest refusal is the one that says where the partner stands
    assert "node-7: epsilon 7.997 (delta 1e-05), trained in rounds none; refused 2x (budget exhausted" in out
    assert "p: no local DP, trained in rounds 1; refused 1x (ledger busy)" in out  # it replied: not "unknown"


def _run_files(run_dir, *, rounds: int, planned: int, finished: bool, dp: bool) -> None:
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"num-server-rounds": planned, "dp": dp,
                                                      "dp-mode": "local" if dp else "off"}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "num-partners": 2}) + "\n"
                                                   for r in range(1, rounds + 1)))
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    if finished:
        (run_dir / "summary.md").write_text("done")
        (run_dir / "model.pt").write_bytes(b"x")


def test_the_stop_line_of_a_simulation_says_what_a_resume_would_do(tmp_path, monkeypatch):
    # Ctrl-C while Ray shut down after the last round said "incomplete ... continue it with resume=true" (a journey
    # review: the resume then ran 0 rounds); and under local DP a resume retrains the round in progress, whose
    # spend is on the ledgers already, so it may end a round short
    from simulations.run import _interrupted_message

    monkeypatch.delenv("FEDREC_MAKE_RUN", raising=False)
    _run_files(tmp_path / "done", rounds=2, planned=2, finished=True, dp=True)
    line = _interrupted_message(tmp_path / "done", named=True)
    assert line.startswith("stopped after the run ended:") and "complete, 2 of 2 rounds logged (nothing to resume)" in line
    _run_files(tmp_path / "dp", rounds=1, planned=3, finished=False, dp=True)
    line = _interrupted_message(tmp_path / "dp", named=True)
    assert "is incomplete" in line and "--run-config 'resume=true' added" in line and "a round short" in line
    _run_files(tmp_path / "plain", rounds=1, planned=3, finished=False, dp=False)
    line = _interrupted_message(tmp_path / "plain", named=False)
    assert "resume=true run-name=\"plain\"" in line and "ledgers" not in line
    # started by `make run`, which takes no --run-config: the hint is its RUN_CONFIG (a researcher review)
    monkeypatch.setenv("FEDREC_MAKE_RUN", "1")  # the Makefile's run target sets it
    monkeypatch.setenv("RUN_CONFIG", "num-server-rounds=3")
    line = _interrupted_message(tmp_path / "plain", named=False)
    assert "continue it with make run RUN_CONFIG='num-server-rounds=3 resume=true run-name=\"plain\"'" in line
