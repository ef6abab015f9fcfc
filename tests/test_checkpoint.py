"""Checkpoints: atomic, private, checksummed; refused when corrupt or mismatched; FedAdam resumes exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from common.config import resolve_config
from common.errors import CheckpointError, ConfigError
from common.files import ensure_private, is_private, write_private_bytes
from common.task import new_model
from server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    check_compatible,
    fingerprint,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from server.resume import start_run
from server.strategy_factory import build_strategy, unwrap

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

TINY = {"synthetic-users": 60, "synthetic-items": 20, "max-seq-len": 8, "embedding-dim": 8, "num-blocks": 1}
CATALOGUE = np.array([str(i) for i in range(1, 21)])


def tiny(**extra):
    cfg = resolve_config(None, {**TINY, **extra})
    return cfg, new_model(cfg, len(CATALOGUE))


def a_checkpoint(cfg, model, round_=2) -> Checkpoint:
    state = model.state_dict()
    rounds = [{"round": r, "train-loss": 1.0 / r, "epsilon": 0.5 * r, "delta": 1e-5} for r in range(1, round_ + 1)]
    return Checkpoint(round=round_, arrays=state, fingerprint=fingerprint(cfg, CATALOGUE, state),
                      strategy_state={"2.m_t": {"w": np.arange(4, dtype=np.float32)}}, rounds=rounds,
                      privacy={"epsilon-by-round": [0.5, 1.0]}, rejections=[{"round": 1, "node": 7, "reason": "NaN"}])


def test_roundtrip_keeps_everything_and_the_file_is_private(tmp_path):
    cfg, model = tiny()
    save_checkpoint(tmp_path, a_checkpoint(cfg, model))
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and [r["round"] for r in loaded.rounds] == [1, 2]
    assert all(torch.equal(loaded.arrays[k], v) for k, v in model.state_dict().items())
    assert np.array_equal(loaded.strategy_state["2.m_t"]["w"], np.arange(4))
    assert loaded.rejections[0]["node"] == 7 and loaded.privacy["epsilon-by-round"] == [0.5, 1.0]
    assert is_private(tmp_path / CHECKPOINT_NAME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "header", "header-fields"])
def test_a_corrupt_checkpoint_is_refused(tmp_path, damage):
    cfg, model = tiny()
    path = save_checkpoint(tmp_path, a_checkpoint(cfg, model))
    raw = bytearray(path.read_bytes())
    if damage == "flip-byte":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "header":
        raw[:6] = b"PICKLE"
    else:  # the checksum field lost: one line, not an IndexError (a mutation audit)
        raw = raw[:len(b"FEDREC-CHECKPOINT 1")] + raw[raw.index(b"\n"):]
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch|not a fedrec checkpoint"):
        load_checkpoint(tmp_path)


class _RunsCode:
    """A pickle that creates a directory when loaded: what weights_only=True must refuse to run."""

    def __init__(self, path) -> None:  # noqa: ANN001
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return os.mkdir, (self.path,)


def test_a_checkpoint_of_another_format_or_holding_code_is_refused_without_running_it(tmp_path):
    """A checkpoint whose checksum matches is still refused when it is another format version, or when its
    payload would run code on load (a mutation audit: neither the version check nor weights_only was tested)."""
    import hashlib
    import io

    cfg, model = tiny()
    path = save_checkpoint(tmp_path, a_checkpoint(cfg, model))
    header, _, body = path.read_bytes().partition(b"\n")
    path.write_bytes(header.replace(b" 1 ", b" 2 ", 1) + b"\n" + body)
    with pytest.raises(CheckpointError, match="checkpoint format 2 is not supported"):
        load_checkpoint(tmp_path)
    buf = io.BytesIO()
    torch.save({"round": 1, "arrays": {}, "strategy": {}, "json": _RunsCode(tmp_path / "ran")}, buf)
    body = buf.getvalue()
    path.write_bytes(b"FEDREC-CHECKPOINT 1 " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(CheckpointError, match="unreadable checkpoint payload"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_mismatched_model_catalogue_or_config_is_refused_with_what_differs(tmp_path):
    cfg, model = tiny()
    saved = fingerprint(cfg, CATALOGUE, model.state_dict())
    other_cfg, other_model = tiny(**{"embedding-dim": 16})
    with pytest.raises(CheckpointError, match=r"different arrays \(first difference: 'blocks\.0\.attn\.out\.bias' \[\[8\].* vs now \[\[16\]"):
        check_compatible(saved, fingerprint(other_cfg, CATALOGUE, other_model.state_dict()), tmp_path)
    with pytest.raises(CheckpointError, match="different item catalogue"):
        check_compatible(saved, fingerprint(cfg, CATALOGUE[::-1], model.state_dict()), tmp_path)
    # A grown catalogue changes an id+text model's shapes too: the catalogue is named, not the arrays (a review)
    _, grown = tiny(**{"embedding-dim": 16})
    with pytest.raises(CheckpointError, match=r"different item catalogue .*start a new run from its model with init-model"):
        check_compatible(saved, fingerprint(cfg, np.array([*CATALOGUE, "new"]), grown.state_dict()), tmp_path)
    lr_cfg = resolve_config(None, {**TINY, "learning-rate": 0.1})
    with pytest.raises(CheckpointError, match="learning-rate = 0.002 \\(now 0.1\\)"):
        check_compatible(saved, fingerprint(lr_cfg, CATALOGUE, model.state_dict()), tmp_path)
    # A knob added by a newer version is fine at its default, not otherwise
    older = {**saved, "config": {k: v for k, v in saved["config"].items() if k != "top-k"}}
    check_compatible(older, saved, tmp_path)
    with pytest.raises(CheckpointError, match="top-k = None \\(now 20\\)"):
        check_compatible(older, fingerprint(resolve_config(None, {**TINY, "top-k": 20}), CATALOGUE, model.state_dict()),
                         tmp_path)
    # How the run is operated may change: timeouts, more rounds, the resume flag itself
    ops = resolve_config(None, {**TINY, "round-timeout": 5.0, "num-server-rounds": 9, "resume": True,
                                     "run-name": "run"})
    check_compatible(saved, fingerprint(ops, CATALOGUE, model.state_dict()), tmp_path)


def test_start_run_resumes_and_cuts_metrics_back_to_the_checkpoint(tmp_path):
    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 4})
    run_dir = tmp_path / "r"
    run_dir.mkdir(mode=0o755)  # made before run directories were private
    os.chmod(run_dir, 0o755)
    save_checkpoint(run_dir, a_checkpoint(cfg, model, round_=2))
    # A crash after round 3 was logged but before it was checkpointed: round 3 must not count twice
    lines = [json.dumps({"round": r}) for r in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / ".model.pt.4242.beef.tmp").write_bytes(b"half a model")  # the crash was mid-write
    (run_dir / "summary.md").write_text("# Run r\n- rounds: 2\n")  # an earlier start's, ended at round 2
    start = start_run({**cfg, "resume": True}, CATALOGUE, model)
    assert not (run_dir / ".model.pt.4242.beef.tmp").exists()
    assert not (run_dir / "summary.md").exists()  # until the resumed run ends, it is not finished
    assert (start.first_round, start.num_rounds) == (3, 2)
    assert [json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert run_dir.stat().st_mode & 0o777 == 0o700  # the resumed run's files are the coordinator's only


def test_a_resume_brings_rejections_json_up_to_the_checkpoint(tmp_path):
    # A reliability review: the checkpoint is written before rejections.json, so a crash between the two in
    # the last round left the file behind, and a resume with no round left never wrote it again
    from server.resume import restore
    from server.run_report import RunRecorder

    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 2})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    import dataclasses

    # its rejections: round 1, node 7 (FedAvg: no strategy state)
    save_checkpoint(run_dir, dataclasses.replace(a_checkpoint(cfg, model, round_=2), strategy_state={}))
    start = start_run({**cfg, "resume": True}, CATALOGUE, model)
    assert start.num_rounds == 0 and not (run_dir / "rejections.json").exists()
    restore(start, RunRecorder(run_dir, cfg, CATALOGUE), build_strategy(cfg, first_round=3))
    assert json.loads((run_dir / "rejections.json").read_text()) == [{"round": 1, "node": 7, "reason": "NaN"}]
    assert is_private(run_dir / "rejections.json")


def test_a_resume_with_privacy_json_lost_restores_the_checkpoints_copy(tmp_path):
    """privacy.json lost in a crash (written after the checkpoint): the resumed run's privacy report continues
    from the checkpoint's copy, so no partner's spend or central release before the crash is forgotten (a
    mutation audit: restore's adoption of the copy was tested only by calling the report directly)."""
    import dataclasses

    from server.privacy_report import PrivacyReport
    from server.resume import restore
    from server.run_report import RunRecorder

    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 3})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    copy = {"partners": {"p": {"partner": "p", "node-id": 7, "epsilon": 2.5, "delta": 1e-5, "rounds-trained": [1, 2]}}}
    ckpt = a_checkpoint(cfg, model, round_=2)
    save_checkpoint(run_dir, dataclasses.replace(ckpt, strategy_state={}, privacy={**ckpt.privacy, "privacy.json": copy}))
    start = start_run({**cfg, "resume": True}, CATALOGUE, model)
    report = PrivacyReport(run_dir, {**cfg, "resume": True})
    restore(start, RunRecorder(run_dir, cfg, CATALOGUE), build_strategy(cfg, first_round=3), report)
    assert report.as_dict()["partners"]["p"]["epsilon"] == 2.5
    assert report.resumed_after == [2]


def test_the_first_checkpoint_after_a_resume_carries_everything_forward(tmp_path):
    """Resume after round 2, then checkpoint round 3: it is numbered 3, holds metrics for rounds 1..3, the
    restored FedAdam moments, the rejections made before the crash and a copy of privacy.json; a crash right
    after it loses nothing from before the first crash (a mutation audit: only the end-to-end resume pinned
    this, and not the rejections or the privacy copy)."""
    from server.privacy_report import PrivacyReport
    from server.resume import RoundCheckpointer, restore
    from server.run_report import RunRecorder

    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 4, "aggregation": "fedadam"})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    save_checkpoint(run_dir, a_checkpoint(cfg, model, round_=2))  # moments "2.m_t", a rejection of node 7
    start = start_run({**cfg, "resume": True}, CATALOGUE, model)
    report = PrivacyReport(run_dir, {**cfg, "resume": True})
    recorder = RunRecorder(run_dir, cfg, CATALOGUE)
    strategy = build_strategy(cfg, first_round=start.first_round)
    restore(start, recorder, strategy, report)
    report.write()  # (the round's replies write it)
    RoundCheckpointer(start, recorder, strategy, cfg)(1, start.arrays)  # this process' round 1
    saved = load_checkpoint(run_dir)
    assert saved.round == 3 and [r["round"] for r in saved.rounds] == [1, 2, 3]
    assert list(saved.strategy_state) == ["2.m_t"]
    assert np.array_equal(saved.strategy_state["2.m_t"]["w"], np.arange(4))
    assert saved.rejections == [{"round": 1, "node": 7, "reason": "NaN"}]
    assert saved.privacy["privacy.json"]["resumed-after"] == [2]


def test_start_run_refuses_to_resume_nothing(tmp_path):
    with pytest.raises(ConfigError, match="resume = true needs run-name"):  # refused when the config is read
        tiny(**{"run-dir": str(tmp_path), "resume": True})
    cfg, model = tiny(**{"run-dir": str(tmp_path)})
    cfg = {**cfg, "resume": True}
    with pytest.raises(ConfigError, match="resume = true needs run-name"):  # and by the server itself
        start_run(cfg, CATALOGUE, model)
    with pytest.raises(CheckpointError, match="no such run directory"):
        start_run({**cfg, "run-name": "ghost"}, CATALOGUE, model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        start_run({**cfg, "run-name": "empty"}, CATALOGUE, model)
    # A checkpoint whose history lacks a round would resume with a metrics.jsonl missing it (a mutation audit)
    import dataclasses

    full, model = tiny(**{"run-dir": str(tmp_path), "run-name": "gap", "num-server-rounds": 3})
    (tmp_path / "gap").mkdir()
    ckpt = a_checkpoint(full, model, round_=2)
    save_checkpoint(tmp_path / "gap", dataclasses.replace(ckpt, rounds=ckpt.rounds[1:]))
    with pytest.raises(CheckpointError, match=r"metrics for rounds 1\.\.2 are incomplete"):
        start_run({**full, "resume": True}, CATALOGUE, model)


def test_a_resume_keeps_the_rounds_the_partners_noise_was_planned_for(tmp_path):
    from server.privacy_report import PrivacyReport

    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 3})
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    save_checkpoint(run_dir, a_checkpoint(cfg, model, round_=3))
    PrivacyReport(run_dir, cfg).write()  # the run as it started: noise planned for 3 rounds
    # Fewer rounds than completed would run nothing and rewrite the run's record: refused
    with pytest.raises(ConfigError, match=r"num-server-rounds = 1: .* already completed round 3; resume with "
                                          r"num-server-rounds 3 \(finish its files\) or more"):
        start_run({**cfg, "resume": True, "num-server-rounds": 1}, CATALOGUE, model)
    assert start_run({**cfg, "resume": True}, CATALOGUE, model).num_rounds == 0  # finishes a run's write-up
    # Extended to 5 rounds: privacy.json still states the plan the partners calibrated for, and says so
    local = PrivacyReport(run_dir, {**cfg, "resume": True, "num-server-rounds": 5}).as_dict()["local"]
    assert local["planned-rounds"] == 3 and local["num-server-rounds"] == 5
    assert "calibrated for the 3 rounds first planned" in local["note"]
    assert "note" not in PrivacyReport(run_dir, cfg).as_dict()["local"]
    # A resume that only finishes the files sends no round: its guarantee names none as possibly sent (it
    # said "an update sent in round 4 before the stop" of a run that had ended; a review)
    from server.resume import restore
    from server.run_report import RunRecorder

    start = start_run({**cfg, "resume": True}, CATALOGUE, model)
    report = PrivacyReport(run_dir, {**cfg, "resume": True})
    restore(start, RunRecorder(run_dir, cfg, CATALOGUE), build_strategy({**cfg, "aggregation": "fedadam"}), report)
    assert report.resumed_after == [] and "resumed" not in report.guarantee()



def test_simulation_refuses_to_resume_nothing_before_starting_ray(tmp_path, monkeypatch):
    # It printed the partition table and Ray's warnings and failed inside the ServerApp ~30 s later
    import flwr.simulation

    from simulations.run import run_federation

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("Ray was started"))
    base = {"run-dir": str(tmp_path), "resume": True, "synthetic-users": 60, "synthetic-items": 20}
    with pytest.raises(CheckpointError, match="no such run directory to resume"):
        run_federation({**base, "run-name": "myrun"}, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        run_federation({**base, "run-name": "empty"}, 2)


def test_simulation_refuses_a_changed_config_before_starting_ray(tmp_path, monkeypatch):
    # A doc audit: the one-line refusal came after Ray had started (~10 s and its warnings first)
    import flwr.simulation

    from simulations.local_grid import run_local
    from simulations.run import run_federation

    cfg = {"synthetic-users": 60, "synthetic-items": 20, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
           "local-epochs": 1, "batch-size": 8, "num-server-rounds": 1, "run-dir": str(tmp_path), "run-name": "r",
           "dp": False, "min-nodes": 1}
    run_local(cfg, 2)
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: pytest.fail("Ray was started"))
    more = {**cfg, "num-server-rounds": 2, "resume": True}
    with pytest.raises(CheckpointError, match=r"run config differs from the checkpointed run: learning-rate = 0\.002 "
                                              r"\(now 0\.01\)"):
        run_federation({**more, "learning-rate": 0.01}, 2)
    started = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: started.append(kw))
    run_federation(more, 2)  # the same config passes the check and reaches Ray
    assert len(started) == 1


def test_a_resume_under_another_run_dir_is_refused_when_partners_keep_default_ledgers_there(tmp_path, monkeypatch):
    # A deployed partner without ledger-path keeps its ledger at <run-dir>/<run>/ledgers on its machine: a resume
    # under another run-dir made it start this run's budget again from zero (9.32 of 8: a red-team review)
    import shutil

    import flwr.simulation

    from simulations.local_grid import run_local
    from simulations.run import run_federation

    cfg = {"synthetic-users": 60, "synthetic-items": 20, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
           "local-epochs": 1, "batch-size": 8, "num-server-rounds": 1, "run-dir": str(tmp_path / "a"),
           "run-name": "r", "min-nodes": 1, "target-epsilon": 8.0}
    run_local(cfg, 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the coordinator moved its run folder
    started = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: started.append(kw))
    more = {**cfg, "num-server-rounds": 2, "resume": True}
    with pytest.raises(ConfigError, match=r"started with run-dir = '.*/a'.*resume with run-dir = '.*/a'"):
        run_federation({**more, "run-dir": str(tmp_path / "b")}, 2)
    assert not started
    run_federation(more, 2)  # the run-dir it started with passes the check and reaches Ray
    assert len(started) == 1


class TwoNodes:
    def get_node_ids(self):
        return [11, 12]


def fedadam_round(strategy, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One FedAdam round; partner updates depend on the server-round they receive, like clients' seeds."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), TwoNodes()))
    replies = []
    for msg in messages:
        i = msg.metadata.dst_node_id - 11  # by node, not by the (random) sampling order
        r = msg.content["config"]["server-round"]  # as a client sees it (its seed)
        new = {k: v.numpy() + np.float32(0.01 * (i + 1) * r) for k, v in arrays.items()}
        body = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                           "metrics": MetricRecord({"num-examples": 5 + i, "train-loss": 1.0})})
        replies.append(Message(body, reply_to=Message(RecordDict(), dst_node_id=msg.metadata.dst_node_id,
                                                      message_type=MessageType.TRAIN)))
    out, _ = strategy.aggregate_train(server_round, replies)
    return out


def test_fedadam_moments_survive_a_checkpoint_so_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = resolve_config(None, {"aggregation": "fedadam", "server-learning-rate": 0.05})
    start = ArrayRecord({"w": Array(np.linspace(-1, 1, 6, dtype=np.float32))})

    # Uninterrupted: rounds 1..4
    straight = build_strategy(cfg)
    arrays = start
    for r in range(1, 5):
        arrays = fedadam_round(straight, r, arrays)

    # Interrupted after round 2: checkpoint the moments, restore them into a new process' strategy
    first = build_strategy(cfg)
    mid = start
    for r in (1, 2):
        mid = fedadam_round(first, r, mid)
    state = strategy_state(unwrap(first))
    assert set(state) == {"m_t", "v_t"}
    fp = {"arrays": {}, "catalogue-sha256": "", "catalogue-size": 0, "config": {}}
    save_checkpoint(tmp_path, Checkpoint(round=2, arrays=mid.to_torch_state_dict(), fingerprint=fp,
                                         strategy_state=state))
    loaded = load_checkpoint(tmp_path)
    resumed = build_strategy(cfg, first_round=3)
    restore_strategy_state(unwrap(resumed), loaded.strategy_state)
    arrays2 = ArrayRecord(loaded.arrays)
    for local in (1, 2):
        arrays2 = fedadam_round(resumed, local, arrays2)

    # Forgetting the moments gives a different model: the check above can fail
    forgetful = build_strategy(cfg, first_round=3)
    arrays3 = ArrayRecord(loaded.arrays)
    for local in (1, 2):
        arrays3 = fedadam_round(forgetful, local, arrays3)

    assert np.array_equal(arrays["w"].numpy(), arrays2["w"].numpy())
    assert not np.allclose(arrays["w"].numpy(), arrays3["w"].numpy())


def test_private_file_helpers(tmp_path):
    path = write_private_bytes(tmp_path / "ledger.bin", b"secret")
    assert path.read_bytes() == b"secret" and is_private(path)
    write_private_bytes(path, b"second")  # replaces atomically, stays private
    assert path.read_bytes() == b"second" and is_private(path)
    loose = tmp_path / "store.sqlite"
    loose.write_bytes(b"")
    os.chmod(loose, 0o644)
    assert not is_private(loose)
    assert is_private(ensure_private(loose))
    assert is_private(ensure_private(tmp_path / "new" / "ledger.sqlite"))  # created empty, 0600


def test_more_rounds_on_resume_are_refused_when_they_would_bend_a_schedule(tmp_path):
    _, model = tiny()
    cosine = resolve_config(None, {**TINY, "lr-schedule": "cosine", "num-server-rounds": 3})
    saved = fingerprint(cosine, CATALOGUE, model.state_dict())
    check_compatible(saved, fingerprint(dict(cosine), CATALOGUE, model.state_dict()), tmp_path)
    longer = resolve_config(None, {**TINY, "lr-schedule": "cosine", "num-server-rounds": 5})
    with pytest.raises(CheckpointError, match="lr-schedule-epochs"):
        check_compatible(saved, fingerprint(longer, CATALOGUE, model.state_dict()), tmp_path)


def test_fedadam_global_model_keeps_float32_so_partners_float32_replies_pass_every_round():
    # Partners train and reply in float32 whatever they receive, as the ClientApp does
    cfg = resolve_config(None, {"aggregation": "fedadam", "server-learning-rate": 0.05})
    strategy = build_strategy(cfg)
    arrays = ArrayRecord({"w": Array(np.linspace(-1, 1, 6, dtype=np.float32))})
    for r in range(1, 4):
        messages = list(strategy.configure_train(r, arrays, ConfigRecord(), TwoNodes()))
        replies = []
        for msg in messages:
            i = msg.metadata.dst_node_id - 11
            new = (arrays["w"].numpy() + 0.01 * (i + 1)).astype(np.float32)
            body = RecordDict({"arrays": ArrayRecord({"w": Array(new)}),
                               "metrics": MetricRecord({"num-examples": 5 + i, "train-loss": 1.0})})
            replies.append(Message(body, reply_to=Message(RecordDict(), dst_node_id=msg.metadata.dst_node_id,
                                                          message_type=MessageType.TRAIN)))
        out, _ = strategy.aggregate_train(r, replies)
        # Before: round 1 returned float64 (FedAdam's arithmetic), and round 2 rejected both replies
        assert out is not None, f"round {r} aggregated nothing"
        assert out["w"].numpy().dtype == np.float32
        assert not np.array_equal(out["w"].numpy(), arrays["w"].numpy())
        arrays = out


def test_fedrec_server_check_refuses_what_the_serverapp_would_before_flwr_run(tmp_path, capsys, monkeypatch):
    # Under flwr run a ServerApp refusal reaches the coordinator as Flower's traceback (and exit 0):
    # `fedrec-server check` runs the same checks first, one line each, and creates nothing
    from common.cli_args import parse_run_config
    from server.app import initial_model
    from server.cli import main as server_main

    base = f'run-dir="{tmp_path}" synthetic-users=60 synthetic-items=20 max-seq-len=8 embedding-dim=8 num-blocks=1'
    assert server_main(["check", "--run-config", base]) == 0
    out = capsys.readouterr().out
    assert "20 items" in out and f"a new run directory under {tmp_path}" in out and "ok:" in out
    assert list(tmp_path.iterdir()) == []
    # A run to resume: its checkpoint was made with this config
    cfg = resolve_config(None, parse_run_config(f'{base} run-name="r"'))
    items, model, _ = initial_model(cfg)
    state = model.state_dict()
    (tmp_path / "r").mkdir(mode=0o755)
    os.chmod(tmp_path / "r", 0o755)
    save_checkpoint(tmp_path / "r", Checkpoint(round=2, arrays=state, fingerprint=fingerprint(cfg, items, state),
                                               rounds=[{"round": 1}, {"round": 2}]))
    assert server_main(["check", "--run-config", f'{base} run-name="r" resume=true']) == 0
    assert f"resumes {tmp_path / 'r'} after round 2 of 5" in capsys.readouterr().out
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o755  # check changes nothing, not even the mode
    # a run directory this user cannot write (another owner, a read-only mount; root passes os.access, so faked):
    # check said "ok" and the resumed run died on its first write (a coordinator review)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "r") else real_access(p, mode))
    assert server_main(["check", "--run-config", f'{base} run-name="r" resume=true']) == 2
    assert "cannot write in the run directory" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", real_access)
    wider = base.replace("embedding-dim=8", "embedding-dim=16")  # another model than the checkpointed one
    # A relative run-dir is resolved in the SuperLink's folder under flwr run: check says so (a deployment review)
    monkeypatch.chdir(tmp_path.parent)
    relative = base.replace(f'run-dir="{tmp_path}"', f'run-dir="{tmp_path.name}/elsewhere"')
    assert server_main(["check", "--run-config", relative]) == 0
    assert "is relative: under flwr run the ServerApp resolves it in the SuperLink's working folder" in capsys.readouterr().out
    assert server_main(["check", "--run-config", f'{relative} run-name="r" resume=true']) == 2
    assert "no such run directory to resume (run-dir = " in capsys.readouterr().err
    for run_config, says in [(f'{wider} run-name="r" resume=true', "different arrays"),
                             (f'{base} run-name="ghost" resume=true', "no such run directory to resume"),
                             (f'{base} run-name="r" resume=true num-server-rounds=1', "already completed round 2"),
                             (f"{base} aggregation='nope'", "aggregation = 'nope' is unknown"),
                             (f'{base} catalogue="/no/such/catalogue.txt"', "no such file")]:
        assert server_main(["check", "--run-config", run_config]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_resume_warns_when_partners_state_starts_again(tmp_path, caplog):
    # MF's private user factors and kept Adam moments live at each partner; a deployed partner without a
    # partner-state-dir or ledger-path has no state file (client/partner_state.py), so its rounds after a resume differ from an
    # uninterrupted run's: the coordinator's log says which partners restore the state and which do not
    from server.resume import partner_state_lost_on_resume

    assert partner_state_lost_on_resume({"model": "sasrec"}) == ""
    assert "Adam moments" in partner_state_lost_on_resume({"model": "sasrec", "keep-optimizer-state": True})
    cfg, model = tiny(**{"run-dir": str(tmp_path), "run-name": "r", "num-server-rounds": 4, "keep-optimizer-state": True})
    (tmp_path / "r").mkdir()
    save_checkpoint(tmp_path / "r", a_checkpoint(cfg, model, round_=2))
    with caplog.at_level("WARNING"):
        start_run({**cfg, "resume": True}, CATALOGUE, model)
    assert ("the partners' Adam moments (keep-optimizer-state) start again at deployed partners that set "
            "neither partner-state-dir nor ledger-path") in caplog.text
