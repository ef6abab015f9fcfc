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
from client.partner_policy import check_node_config
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


def _round(tmp_path, node_extra: dict, kind: str = "train", **overrides):
    overrides, node = _deployed(tmp_path, **overrides)
    node = {**node, **node_extra}
    cfg = resolve_config(None, overrides)
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, node).num_items).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "run-name": "hold"})})
    return make_client_app(overrides)(flower_message(content, kind), _context(node))


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_a_reply_is_held_to_the_partners_time(tmp_path, slept, kind):
    reply = _round(tmp_path, {"reply-after-seconds": 600.0}, kind)
    assert not reply.has_error(), reply.error
    assert len(slept) == 1 and 590.0 < slept[0] < 600.0  # the rest of the 600 s after the work


def test_a_refusal_is_held_too_and_no_hold_without_the_key(tmp_path, slept):
    refused = _round(tmp_path, {"reply-after-seconds": 600.0}, "train", **{"target-delta": 0.5})
    assert refused.has_error() and len(slept) == 1 and slept[0] > 590.0  # a refusal's time says nothing either
    (tmp_path / "plain").mkdir()
    assert not _round(tmp_path / "plain", {}, "train").has_error() and len(slept) == 1


def test_work_past_the_hold_is_said_in_the_partners_log(tmp_path, slept, caplog):
    caplog.set_level("WARNING", logger="flwr")
    reply = _round(tmp_path, {"reply-after-seconds": 1e-6}, "train")
    assert not reply.has_error() and slept == []
    assert "longer than node config reply-after-seconds = 1e-06" in caplog.text


@pytest.mark.parametrize("value", [0, -5, "soon", 1e9, True])
def test_a_malformed_hold_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match="node config reply-after-seconds"):
        check_node_config({"reply-after-seconds": value})
