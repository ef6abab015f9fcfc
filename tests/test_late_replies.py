"""A training reply that arrives after round-timeout still released an update: privacy.json says so.

The real ServerApp runs in process on a LocalGrid that holds back replies: one partner's round-1
reply reaches the SuperLink only after the round's timeout (it comes with the next exchange),
another partner's round-2 reply never arrives. Flower's own send_and_receive forgets both.
"""

from __future__ import annotations

import json

import pytest

from flwr.app import Message

from simulations.local_grid import FIRST_NODE_ID, LocalGrid, run_local

TINY = {"synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16, "num-blocks": 1,
        "batch-size": 10, "local-epochs": 1, "num-server-rounds": 2, "min-nodes": 2, "round-timeout": 0.2}
LATE, SILENT = FIRST_NODE_ID + 1, FIRST_NODE_ID + 2


class HoldingGrid(LocalGrid):
    """LATE's round-1 training reply is released at the next push (after round 1's timeout);
    SILENT's round-2 training reply is never released."""

    def __init__(self, apps) -> None:  # noqa: ANN001
        super().__init__(apps)
        self.held: dict[str, Message] = {}
        self.late_reply: Message | None = None

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        self.round = messages[0].content.config_records["config"]["server-round"] if messages else None
        released, self.held = self.held, {}
        ids = list(super().push_messages(messages))
        self._replies.update(released)
        for msg_id in ids:
            reply = self._replies[msg_id]
            key = (reply.metadata.src_node_id, reply.metadata.message_type, self.round)
            if key == (LATE, "train", 1):
                self.held[msg_id] = self.late_reply = self._replies.pop(msg_id)
            elif key == (SILENT, "train", 2):
                self._replies.pop(msg_id)
        return ids


def test_late_and_missing_replies_are_in_the_privacy_report(tmp_path, monkeypatch):
    grids = []

    def holding_grid(apps):  # noqa: ANN001, ANN202
        grids.append(HoldingGrid(apps))
        return grids[-1]

    monkeypatch.setattr("simulations.local_grid.LocalGrid", holding_grid)
    run_dir = run_local({**TINY, "run-dir": str(tmp_path), "run-name": "late",
                         "ledger-dir": str(tmp_path / "ledgers")}, 3)

    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num-partners"]) for r in rounds] == [(1, 2), (2, 2)]  # neither was waited for
    partners = {p["node-id"]: p for p in json.loads((run_dir / "privacy.json").read_text())["partners"].values()}
    late, silent = partners[LATE], partners[SILENT]
    # The late reply was not aggregated, but its release and its numbers are on record
    assert late["not-aggregated"] == [{"round": 1, "reason": "late: arrived after round-timeout"}]
    assert late["rounds-trained"] == [2]
    reply_epsilon = grids[0].late_reply.content.metric_records["metrics"]["epsilon"]
    assert 0 < reply_epsilon < late["epsilon"]  # round 2's spend came on top of the late round's
    # The reply that never came is listed; nothing else is invented for that partner
    assert silent["no-reply"] == [2] and silent["rounds-trained"] == [1] and "not-aggregated" not in silent
    assert "no-reply" not in late and "not-aggregated" not in partners[FIRST_NODE_ID]


def test_an_older_late_reply_never_lowers_the_recorded_spend(tmp_path):
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.config import resolve_config
    from server.privacy_report import PrivacyReport

    LocalGrid([])  # sets the task identity Flower's Message needs outside its runtimes
    report = PrivacyReport(tmp_path, resolve_config(None, {}))

    def reply(epsilon: float, rounds: int) -> Message:
        content = RecordDict({"metrics": MetricRecord({"epsilon": epsilon, "delta": 1e-5, "ledger-rounds": rounds,
                                                       "ledger-steps": 5 * rounds}),
                              "privacy": ConfigRecord({"partner": "p"})})
        msg = Message(content, dst_node_id=7, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 7
        return msg

    report.screen(3, [reply(6.0, 3)])
    report.note_late(2, reply(5.0, 2))  # round 2's reply, arriving after round 3's
    entry = report.as_dict()["partners"]["p"]
    assert (entry["epsilon"], entry["ledger-rounds"], entry["ledger-steps"]) == (6.0, 3, 15)
    assert entry["not-aggregated"] == [{"round": 2, "reason": "late: arrived after round-timeout"}]


def test_the_stated_bound_takes_the_largest_delta_of_the_partners(tmp_path):
    # A partner with a larger epsilon may account at a smaller delta (its max-delta, or an earlier run's promise):
    # "at most (e, d)" took the worst-epsilon partner's delta, which the other partner's pair exceeds
    from common.config import resolve_config
    from server.privacy_report import PrivacyReport

    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    report.partners = {"a": {"partner": "a", "epsilon": 4.0, "delta": 1e-6, "target-epsilon": 4.0},
                       "b": {"partner": "b", "epsilon": 3.9, "delta": 1e-5, "target-epsilon": 8.0}}
    assert "at most (4.000, 1e-05) over 2 partners (worst: a; targets 4, 8)" in report.guarantee()


class HoldingEvaluationGrid(LocalGrid):
    """LATE's round-1 evaluation reply is released at the next push (after round 1's timeout)."""

    def __init__(self, apps) -> None:  # noqa: ANN001
        super().__init__(apps)
        self.held: dict[str, Message] = {}

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        messages = list(messages)
        current = messages[0].content.config_records["config"]["server-round"] if messages else None
        released, self.held = self.held, {}
        ids = list(super().push_messages(messages))
        self._replies.update(released)
        for msg_id in ids:
            reply = self._replies[msg_id]
            if (reply.metadata.src_node_id, reply.metadata.message_type, current) == (LATE, "evaluate", 1):
                self.held[msg_id] = self._replies.pop(msg_id)
        return ids


def test_a_late_noised_evaluation_reply_is_in_the_privacy_report(tmp_path, monkeypatch):
    # A review: only training messages were tracked, so a noised evaluation answered after round-timeout spent
    # budget that privacy.json never showed
    from dp_accounting import dp_event, rdp

    monkeypatch.setattr("simulations.local_grid.LocalGrid", HoldingEvaluationGrid)
    run_dir = run_local({**TINY, "run-dir": str(tmp_path), "run-name": "lateeval", "evaluation-noise-multiplier": 3.0,
                         "ledger-dir": str(tmp_path / "ledgers")}, 3)
    partners = {p["node-id"]: p for p in json.loads((run_dir / "privacy.json").read_text())["partners"].values()}
    late = partners[LATE]
    assert late["ledger-evaluations"] == 2 and sorted(late["rounds-evaluated"]) == [1, 2]
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(late["sample-rate"], dp_event.GaussianDpEvent(late["noise-multiplier"])),
                int(late["ledger-steps"]))
    acc.compose(dp_event.GaussianDpEvent(3.0), 2)
    assert late["epsilon"] == pytest.approx(acc.get_epsilon(late["delta"]), rel=0.01)


def test_an_unanswered_evaluation_is_not_reported_as_a_missing_training_reply():
    # Mutation audit: with noised evaluation, an evaluation message never answered was listed as no-reply
    from flwr.app import ConfigRecord, MessageType, RecordDict

    from server.late_replies import LateReplyGrid

    LocalGrid([])

    class Silent:
        pull_interval = 0.0

        def push_messages(self, messages):  # noqa: ANN001, ANN202
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):  # noqa: ANN001, ANN202
            return []

    unanswered = []
    grid = LateReplyGrid(Silent(), lambda r, m: None, lambda r, n: unanswered.append((r, n)),
                         on_late_evaluation=lambda r, m: None)
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 2})}), dst_node_id=5,
                  message_type=MessageType.EVALUATE)
    grid.send_and_receive([msg], timeout=0.0)
    assert grid.finish() == [] and unanswered == []


def test_a_budget_refusal_raises_the_partner_spend_to_its_ledger(tmp_path):
    # After a coordinator crash, a redone round is refused with the ledger's whole spend, which includes the
    # update sent before the crash; the report kept round 1's epsilon. Other refusals change nothing.
    from flwr.app import Error, RecordDict

    from common.config import resolve_config
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    report = PrivacyReport(tmp_path, resolve_config(None, {"target-delta": 1e-6}))

    def refusal(node: int, reason: str) -> Message:
        msg = Message(Error(code=0, reason=reason), reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    report.partners = {"p": {"partner": "p", "node-id": 7, "epsilon": 6.49, "delta": 1e-7}}
    report.node_labels = {7: "p"}
    report.screen(2, [refusal(7, "budget exhausted: epsilon 7.997 of 8 (p; one more round would reach 9.1)"),
                      refusal(8, "budget exhausted: epsilon 3.500 of 4 already spent"),
                      refusal(9, "too few users for the target epsilon")])
    partners = report.as_dict()["partners"]
    assert (partners["p"]["epsilon"], partners["p"]["delta"]) == (7.997, 1e-7)  # its own delta kept
    assert (partners["node-8"]["epsilon"], partners["node-8"]["delta"]) == (3.5, 1e-6)  # the run's delta
    assert "epsilon" not in partners["node-9"]
    assert "at most (7.997, 1e-06) over 2 partners" in report.guarantee()
    report.screen(3, [refusal(7, "budget exhausted: epsilon 7.000 of 8 (an older number)")])
    assert report.as_dict()["partners"]["p"]["epsilon"] == 7.997  # never lowered


def test_a_refusal_at_the_default_delta_and_a_resume_without_local_dp_are_stated_rightly(tmp_path):
    # A review: with target-delta 0 (partners default to min(1e-5, 0.1 / users)) the refusal's entry stated
    # "(7.997, 0)"; a reply's own epsilon later left "epsilon-from: refusal" behind; and a resumed run
    # without local DP said a partner's ledger held spend it never had
    from flwr.app import ConfigRecord, Error, MetricRecord, RecordDict

    from common.config import resolve_config
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    refusal = Message(Error(code=0, reason="budget exhausted: epsilon 7.900 of 8 already spent"),
                      reply_to=Message(RecordDict(), dst_node_id=7, message_type="train"))
    refusal.metadata.__dict__["_src_node_id"] = 7
    report.screen(2, [refusal])
    assert "at most (7.900, 1e-05) over 1 partner (" in report.guarantee()
    assert report.partners["node-7"]["epsilon-from"] == "refusal in round 2"
    reply = Message(RecordDict({"metrics": MetricRecord({"epsilon": 7.98, "delta": 1e-5}),
                                "privacy": ConfigRecord({"partner": "node-7"})}), dst_node_id=7, message_type="train")
    reply.metadata.__dict__["_src_node_id"] = 7
    report.screen(3, [reply])
    assert report.partners["node-7"]["epsilon"] == 7.98 and "epsilon-from" not in report.partners["node-7"]
    report.note_resumed(3)
    assert "The run was resumed" in report.guarantee()

    for mode in ("off", "central"):
        plain = PrivacyReport(tmp_path / mode, resolve_config(None, {"dp-mode": mode}))
        plain.partners = {"p": {"partner": "p", "node-id": 1, "epsilon": 0.0, "delta": 0.0}}  # no DP-SGD: 0
        plain.note_resumed(1)
        assert "resumed" not in plain.guarantee()


def test_a_partner_without_a_ledger_keeps_its_entry_through_a_resume(tmp_path):
    # A review: a partner without local DP keys its label with a secret of its Flower run, which a resume
    # renews, so the resumed run listed it twice (and `fedrec-server report` showed two partners)
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from common.config import resolve_config
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    cfg = resolve_config(None, {"dp-mode": "central"})

    def reply(label: str, node: int) -> Message:
        msg = Message(RecordDict({"metrics": MetricRecord({"epsilon": 0.0, "delta": 0.0}),
                                  "privacy": ConfigRecord({"partner": label})}), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    before = PrivacyReport(tmp_path, cfg)
    before.screen(1, [reply("partner-aaaa", 101), reply("partner-cccc", 102)])
    before.write()
    resumed = PrivacyReport(tmp_path, cfg)  # the resumed run's report continues the file
    resumed.screen(2, [reply("partner-bbbb", 101), reply("partner-cccc", 102), reply("partner-dddd", 103)])
    partners = resumed.as_dict()["partners"]
    assert sorted(partners) == ["partner-aaaa", "partner-cccc", "partner-dddd"]  # a new node is a new partner
    assert partners["partner-aaaa"]["rounds-trained"] == [1, 2]


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_late_refusal_is_reported_as_the_refusal_it_is(tmp_path, kind):
    # A journey review: a refusal that came after round-timeout was dropped (an error "released nothing"), and the
    # partner was in no list at all: not refused, not no-reply, absent from privacy.json and fedrec-server report.
    # The same held for a late refusal to evaluate (noised evaluation tracks late evaluation replies).
    from flwr.app import ConfigRecord, Error, MessageType, RecordDict

    from common.config import resolve_config
    from server.late_replies import LateReplyGrid
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=5,
                   message_type=MessageType.TRAIN if kind == "train" else MessageType.EVALUATE)
    late = Message(Error(code=400, reason="this partner holds its replies too long"), reply_to=sent)
    late.metadata.__dict__["_src_node_id"] = 5
    late.metadata.__dict__["_reply_to_message_id"] = "m0"

    class Slow:
        pull_interval = 0.0
        pulls = 0

        def push_messages(self, messages):  # noqa: ANN001, ANN202
            return [f"m{i}" for i, _ in enumerate(messages)]

        def pull_messages(self, ids):  # noqa: ANN001, ANN202
            self.pulls += 1
            return [late] if self.pulls > 1 and "m0" in set(ids) else []

    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    unanswered = []
    grid = LateReplyGrid(Slow(), report.note_late, lambda r, n: unanswered.append((r, n)),
                         on_late_evaluation=lambda r, m: report.note_evaluation(r, [m]))
    assert grid.send_and_receive([sent], timeout=0.0) == []  # the round's timeout passed
    assert grid.finish() == [] and unanswered == []  # the late refusal came in: answered, not silent
    listed = "refused" if kind == "train" else "refused-evaluation"
    assert report.as_dict()["partners"]["node-5"][listed] == [
        {"round": 1, "reason": "this partner holds its replies too long"}]


@pytest.mark.parametrize("late", [True, False])
def test_an_error_the_superlink_made_names_the_partner_and_is_no_refusal(tmp_path, late):
    # A review: Flower's own error for an unreachable partner (or its expired reply) comes from the SuperLink,
    # node 1: privacy.json gained a phantom partner "node-1" that "refused", and the real one was in no list
    from flwr.app import ConfigRecord, MessageType, RecordDict
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from common.config import resolve_config
    from server.late_replies import LateReplyGrid
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7777,
                   message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = "m0"
    error = create_message_error_unavailable_res_message(sent.metadata, "msg_unavail")

    class Grid:
        pull_interval = 0.0
        pulls = 0

        def push_messages(self, messages):  # noqa: ANN001, ANN202
            return ["m0"]

        def pull_messages(self, ids):  # noqa: ANN001, ANN202
            self.pulls += 1
            return [error] if (self.pulls > 1 or not late) and "m0" in set(ids) else []

    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    grid = LateReplyGrid(Grid(), report.note_late, report.note_unanswered)
    replies = list(grid.send_and_receive([sent], timeout=0.0))
    report.screen(1, replies)  # what the strategy does with the round's replies
    grid.finish()
    partners = report.as_dict()["partners"]
    assert list(partners) == ["node-7777"] and partners["node-7777"]["no-reply"] == [1]
    assert "refused" not in partners["node-7777"]


class Releasing:
    """A grid whose reply to the first message ("m1") arrives only during the second exchange; later
    messages are answered at once."""

    pull_interval = 0.0

    def __init__(self, reply_body) -> None:  # noqa: ANN001
        self.sent: dict[str, Message] = {}
        self.reply_body = reply_body

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for msg in messages:
            ids.append(f"m{len(self.sent) + 1}")
            self.sent[ids[-1]] = msg
        return ids

    def pull_messages(self, ids):  # noqa: ANN001, ANN201
        out = []
        for msg_id in set(ids):
            if msg_id == "m1" and len(self.sent) < 2:
                continue  # still out
            reply = Message(self.reply_body(), reply_to=self.sent[msg_id])
            reply.metadata.__dict__["_src_node_id"] = self.sent[msg_id].metadata.dst_node_id
            reply.metadata.__dict__["_reply_to_message_id"] = msg_id
            out.append(reply)
        return out


def _round_message(server_round: int, message_type: str, node: int = 5) -> Message:
    from flwr.app import ConfigRecord, RecordDict

    return Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node,
                   message_type=message_type)


def test_a_late_reply_is_reported_during_the_next_round_not_only_at_the_end():
    """A round-1 update arriving during round 2 reaches the privacy report then (so privacy.json and the next
    checkpoint carry it if the coordinator stops later), not only when the run ends (a mutation audit: the
    end-of-run collection alone passed the end-to-end test)."""
    from flwr.app import MessageType, MetricRecord, RecordDict

    from server.late_replies import LateReplyGrid

    LocalGrid([])
    late = []
    grid = LateReplyGrid(Releasing(lambda: RecordDict({"metrics": MetricRecord({"epsilon": 1.0})})),
                         lambda r, m: late.append((r, m.metadata.src_node_id)))
    assert grid.send_and_receive([_round_message(1, MessageType.TRAIN)], timeout=0.0) == []
    assert late == []
    assert len(grid.send_and_receive([_round_message(2, MessageType.TRAIN, node=6)], timeout=0.0)) == 1
    assert late == [(1, 5)]  # before finish()
    assert grid.finish() == [] and late == [(1, 5)]


def test_a_late_evaluation_reply_without_noised_evaluation_is_not_tracked_and_no_crash():
    """Without noised evaluation (no on_late_evaluation) an evaluation reply spends nothing: one that arrives
    after round-timeout is ignored, neither a crash of the ServerApp nor a training release (a mutation audit:
    tracking every message type called the missing callback)."""
    from flwr.app import MessageType, MetricRecord, RecordDict

    from server.late_replies import LateReplyGrid

    LocalGrid([])
    late, unanswered = [], []
    grid = LateReplyGrid(Releasing(lambda: RecordDict({"metrics": MetricRecord({"hit@10-sum": 1.0})})),
                         lambda r, m: late.append(r), lambda r, n: unanswered.append((r, n)))
    assert grid.send_and_receive([_round_message(1, MessageType.EVALUATE)], timeout=0.0) == []
    grid.send_and_receive([_round_message(2, MessageType.TRAIN, node=6)], timeout=0.0)
    assert grid.finish() == [] and late == [] and unanswered == []


def test_a_late_evaluation_refusal_is_no_training_refusal(tmp_path):
    """With noised evaluation, a partner's refusal to evaluate that arrives after round-timeout released nothing:
    it is not reported as a training refusal nor as an evaluation spend (a mutation audit), but as the refusal
    to evaluate it is (it was dropped, and the partner in no list)."""
    from flwr.app import Error, MessageType

    from common.config import resolve_config
    from server.late_replies import LateReplyGrid
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    late, late_evaluations = [], []

    def on_late_evaluation(server_round, msg):  # noqa: ANN001, ANN202
        late_evaluations.append(server_round)
        report.note_evaluation(server_round, [msg])

    grid = LateReplyGrid(Releasing(lambda: Error(code=400, reason="budget exhausted")), lambda r, m: late.append(r),
                         on_late_evaluation=on_late_evaluation)
    assert grid.send_and_receive([_round_message(1, MessageType.EVALUATE)], timeout=0.0) == []
    grid.send_and_receive([_round_message(2, MessageType.EVALUATE, node=6)], timeout=0.0)
    assert grid.finish() == [] and late == [] and late_evaluations == [1]
    (entry,) = report.as_dict()["partners"].values()
    assert entry["refused-evaluation"] == [{"round": 1, "reason": "budget exhausted"}]
    assert "epsilon" not in entry and "rounds-evaluated" not in entry


def test_an_evaluation_error_the_superlink_made_is_no_refusal_to_evaluate(tmp_path):
    # A late evaluation error now reaches note_evaluation (it was dropped): the SuperLink's own error for an
    # unreachable partner or an expired reply is no refusal, so the partner is not listed as refusing
    from flwr.app import ConfigRecord, MessageType, RecordDict
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from common.config import resolve_config
    from server.late_replies import _from_its_node
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=7,
                   message_type=MessageType.EVALUATE)
    sent.metadata.__dict__["_message_id"] = "m0"
    error = create_message_error_unavailable_res_message(sent.metadata, "msg_unavail")
    _from_its_node(error, 7)  # as the grid wrapper names it
    report = PrivacyReport(tmp_path, resolve_config(None, {}))
    report.note_evaluation(1, [error])
    assert "refused-evaluation" not in report.partners.get("node-7", {})


def test_a_stated_epsilon_is_rounded_up_never_below_the_accountants():
    # A privacy review: 7.99746 was stated "7.997", and a refusal's text is the report's only record of a spend
    import random

    from common.privacy import stated_epsilon

    assert (stated_epsilon(7.99746), stated_epsilon(7.997), stated_epsilon(8.0), stated_epsilon(0.0)) == \
        ("7.998", "7.997", "8.000", "0.000")
    rng = random.Random(0)
    for eps in [rng.uniform(0, 20) for _ in range(2000)]:
        assert eps <= float(stated_epsilon(eps)) < eps + 0.001


def test_a_training_message_never_answered_raises_the_bound_to_the_partners_target(tmp_path, capsys):
    # A privacy review: a reply that came after the run ended left privacy.json at 6.972 for a partner whose
    # ledger held 7.9997; the partner may have trained in any round it did not answer, up to its target
    from common.config import resolve_config
    from server.cli import main as server_cli
    from server.privacy_report import PrivacyReport

    LocalGrid([])
    report = PrivacyReport(tmp_path, resolve_config(None, {"num-server-rounds": 3}))
    report.partners = {"a": {"partner": "a", "node-id": 7, "epsilon": 6.9723, "delta": 1e-5, "target-epsilon": 8.0},
                       "b": {"partner": "b", "node-id": 8, "epsilon": 7.9, "delta": 1e-5, "target-epsilon": 8.0}}
    report.node_labels = {7: "a", 8: "b"}
    assert "at most (7.900, 1e-05) over 2 partners (worst: b; targets 8)" in report.guarantee()
    report.note_unanswered(1, 7)
    assert ("at most (8.000, 1e-05) over 2 partners (worst: a, which did not answer round 1: it may have trained "
            "then, up to its target; targets 8)") in report.guarantee()
    assert report.partners["a"]["epsilon"] == 6.9723  # the reported figure is kept as reported
    report.note_unanswered(2, 9)  # a partner that answered nothing at all
    assert "1 partner (node-9) answered no training message: any round they trained is on their ledgers" in \
        report.guarantee()
    # the coordinator's report says the same per partner
    (tmp_path / "config.json").write_text(json.dumps({"num-server-rounds": 3}))
    report.write()
    server_cli(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert "a: epsilon 6.972 (delta 1e-05), up to its target 8 if it trained in a round it did not answer" in out
