"""Node config ``reply-after-seconds``: a partner's replies leave at a fixed time after their message.

How long a round takes grows with the partner's number of users (a helper measured 0.17 s against 0.42 s
for 178 against 1,770 users on one plan): with the noised user count, the reply's time was the last
number that still followed the exact count. Held to a fixed time, it tells nothing while the work fits.
"""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

import client.app as client_app
from client.app import make_client_app
from client.partner_policy import check_node_config, check_reply_hold
from common.config import resolve_config
from common.errors import ConfigError
from common.task import new_model, partner_data
from tests.conftest import flower_message
from tests.test_private_count import _context, _deployed


@pytest.fixture()
def slept(monkeypatch):
    """The holds the app asked for, in seconds (nothing really sleeps)."""
    calls: list[float] = []
    monkeypatch.setattr(client_app, "sleep", calls.append)
    return calls


def _round(tmp_path, node_extra: dict, kind: str = "train", *, sent: list | None = None, **overrides):
    overrides, node = _deployed(tmp_path, **overrides)
    node = {**node, **node_extra}
    cfg = resolve_config(None, overrides)
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, node).num_items).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "run-name": "hold"})})
    msg = flower_message(content, kind)
    if sent is not None:
        sent.append(msg)
    return make_client_app(overrides)(msg, _context(node))


@pytest.mark.parametrize("kind, refused", [("train", False), ("evaluate", False), ("train", True)])
def test_the_reply_is_stamped_after_the_hold(tmp_path, kind, refused):
    # A review: the reply was made before the hold, and its created_at / ttl (stamped when a reply is made and
    # passed on to the coordinator as they are) still told how long the work took
    sent: list = []
    reply = _round(tmp_path, {"reply-after-seconds": 1.0}, kind, sent=sent, **({"target-delta": 0.5} if refused else {}))
    assert reply.has_error() == refused
    stamped = reply.metadata.created_at - sent[0].metadata.created_at
    assert stamped >= 1.0  # really slept here: the stamp is the time after the hold
    assert sent[0].metadata.ttl - reply.metadata.ttl == pytest.approx(stamped, abs=0.05)


def test_a_hold_past_the_round_timeout_is_refused_before_any_work(tmp_path, slept):
    reply = _round(tmp_path, {"reply-after-seconds": 30.0}, "train", **{"round-timeout": 20.0})
    assert reply.has_error() and "is not below the round-timeout 20 of this run" in reply.error.reason
    assert slept == []  # sent at once: held, it came after round-timeout and the coordinator never saw it
    evaluated = _round(tmp_path, {"reply-after-seconds": 30.0}, "evaluate", **{"round-timeout": 20.0})
    assert evaluated.has_error() and "is not below the round-timeout" in evaluated.error.reason and slept == []
    # a hold of exactly the timeout is late too (a mutation audit: "hold > timeout" survived)
    with pytest.raises(ConfigError, match="is not below the round-timeout 20"):
        check_reply_hold({"reply-after-seconds": 20.0}, {"round-timeout": 20.0})
    check_reply_hold({"reply-after-seconds": 19.5}, {"round-timeout": 20.0})
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing trained, nothing spent


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_reply_is_held_to_the_partners_time(tmp_path, slept, kind):
    reply = _round(tmp_path, {"reply-after-seconds": 300.0}, kind)
    assert not reply.has_error(), reply.error
    assert len(slept) == 1 and 290.0 < slept[0] < 300.0  # the rest of the 300 s after the work


def test_a_refusal_is_held_too_and_no_hold_without_the_key(tmp_path, slept):
    refused = _round(tmp_path, {"reply-after-seconds": 300.0}, "train", **{"target-delta": 0.5})
    assert refused.has_error() and len(slept) == 1 and slept[0] > 290.0  # a refusal's time says nothing either
    (tmp_path / "plain").mkdir()
    assert not _round(tmp_path / "plain", {}, "train").has_error() and len(slept) == 1


def test_work_past_the_hold_waits_for_its_next_multiple_and_is_said_in_the_partners_log(tmp_path, slept, caplog,
                                                                                       monkeypatch):
    # Work longer than the hold was sent the moment it ended, so a coordinator that made the work long (a large
    # model) read the partner's work time, which grows with its users, from the reply (a red-team review)
    clock = iter([100.0, 125.0])  # the message arrives at 100 s, the work ends at 125 s: 25 s against a 10 s hold
    monkeypatch.setattr(client_app, "monotonic", lambda: next(clock))
    caplog.set_level("WARNING", logger="flwr")
    reply = _round(tmp_path, {"reply-after-seconds": 10.0}, "train")
    assert not reply.has_error() and slept == [pytest.approx(5.0)]  # sent at 30 s, the next multiple of 10
    assert "longer than node config reply-after-seconds = 10: the reply waits until 30 s" in caplog.text


@pytest.mark.parametrize("value", [0, -5, "soon", 1e9, 43_200, True, float("nan"), float("inf")])
def test_a_malformed_hold_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match="node config reply-after-seconds"):
        check_node_config({"reply-after-seconds": value})
