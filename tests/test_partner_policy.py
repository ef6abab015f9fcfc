"""A partner's own privacy floor (client/partner_policy.py): node config max-epsilon / max-delta
hold whatever the coordinator's run config asks for."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from client.partner_policy import NODE_CONFIG_KEYS, apply_partner_policy, check_node_config, partner_delta
from common.config import resolve_config
from common.errors import ConfigError, PrivacyError
from common.task import new_model, partner_data
from tests.conftest import flower_message
from tests.test_client_training import NODE, TINY


def _send_once(tmp_path, run: dict, node: dict, kind: str = "train"):
    """One round-1 ``kind`` message to a fresh partner app with this run config and node config."""
    overrides = {**TINY, "run-dir": str(tmp_path), **run}
    cfg = resolve_config(None, overrides)
    context = Context(run_id=1, node_id=1, node_config={**NODE, **node}, state=RecordDict(), run_config={})
    arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
    msg = flower_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), kind)
    return make_client_app(overrides)(msg, context)


@pytest.mark.parametrize("run", [{"dp": False}, {"dp-mode": "off"}, {"dp-mode": "central"}, {"target-epsilon": 50.0}])
def test_a_run_cannot_switch_off_or_loosen_a_partners_dp(tmp_path, run):
    # The coordinator asks for no local DP, or epsilon 50; the partner's node config says at most 2
    reply = _send_once(tmp_path, run, {"max-epsilon": 2.0})
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["target-epsilon"] == 2.0 and 0 < metrics["epsilon"] <= 2.0 + 1e-9
    assert metrics["noise-multiplier"] > 0
    assert reply.content["privacy"]["dp-mode"] == ("both" if run.get("dp-mode") == "central" else "local")
    # Without the floor the same run config is obeyed (so the check above can fail)
    plain = _send_once(tmp_path / "plain", run, {})
    assert plain.content["metrics"]["target-epsilon"] == (50.0 if "target-epsilon" in run else 0.0)


def test_a_stricter_run_target_stays_and_max_delta_lowers_delta(tmp_path):
    reply = _send_once(tmp_path, {"target-epsilon": 1.0, "target-delta": 1e-5}, {"max-epsilon": 4.0, "max-delta": 1e-7})
    metrics = reply.content["metrics"]
    assert metrics["target-epsilon"] == 1.0 and metrics["delta"] == pytest.approx(1e-7)


@pytest.mark.parametrize("run", [{"dp": False}, {"dp-mode": "central"}])
def test_max_delta_alone_refuses_a_run_without_local_dp(tmp_path, run):
    # It trained without DP-SGD, leaving max-delta a promise nothing kept (noted in the fifteenth session)
    reply = _send_once(tmp_path, run, {"max-delta": 1e-6})
    assert reply.has_error() and "max-delta but not max-epsilon" in reply.error.reason
    # With local DP-SGD in the run it only caps delta
    ok = _send_once(tmp_path / "local", {}, {"max-delta": 1e-6})
    assert not ok.has_error() and ok.content["metrics"]["delta"] == pytest.approx(1e-6)


def test_forced_dp_refuses_several_examples_per_user_in_one_line(tmp_path):
    reply = _send_once(tmp_path, {"dp": False, "history-windows": True}, {"max-epsilon": 2.0})
    assert reply.has_error() and "history-windows" in reply.error.reason and "max-epsilon" in reply.error.reason


@pytest.mark.parametrize("node", [{"max-epsilon": "lots"}, {"max-epsilon": 0.0}, {"max-epsilon": -1.0},
                                  {"max-epsilon": True}, {"max-delta": 1.0}, {"max-delta": "nan"}])
def test_malformed_caps_are_one_config_error(node):
    from client.safe_errors import safe_reason

    with pytest.raises(ConfigError, match="node config max-") as refused:
        apply_partner_policy(resolve_config(None, {}), node)
    # what the coordinator reads ends with the range, in words: "(0, inf)" was cut as a parenthesis (a review)
    below = " and below 1" if "max-delta" in node else ""
    assert safe_reason(refused.value).endswith(f" must be a number above 0{below}")


def test_policy_unit_rules():
    cfg = resolve_config(None, {"target-epsilon": 8.0})
    assert apply_partner_policy(cfg, {}) == cfg
    assert apply_partner_policy(cfg, {**NODE, "max-epsilon": 3.0})["target-epsilon"] == 3.0
    # a cap just below the run's target holds too (a mutation audit: "target > cap + 1" survived the 3-vs-8 case)
    assert apply_partner_policy(cfg, {**NODE, "max-epsilon": 7.9})["target-epsilon"] == 7.9
    assert apply_partner_policy(cfg, {**NODE, "max-epsilon": 8.0})["target-epsilon"] == 8.0
    assert partner_delta(1e-5, {}, 100) == 1e-5 and partner_delta(1e-5, {"max-delta": 1e-6}, 100) == 1e-6
    assert partner_delta(1e-7, {"max-delta": 1e-6}, 100) == 1e-7
    # max-epsilon alone: delta at most the default for the partner's users (min(1e-5, 0.1 / users))
    assert partner_delta(0.5, {"max-epsilon": 4.0}, 100) == 1e-5
    assert partner_delta(0.5, {"max-epsilon": 4.0}, 1_000_000) == pytest.approx(1e-7)
    for node in ({}, {"max-delta": 0.5}):  # a meaningless delta is refused, even the partner's own cap
        with pytest.raises(PrivacyError, match="at least 1 / 100 users"):
            partner_delta(0.01, node, 100)
    with pytest.raises(PrivacyError, match="reverse-histories"):
        apply_partner_policy(resolve_config(None, {"dp": False, "reverse-histories": True}), {**NODE, "max-epsilon": 1.0})


@pytest.mark.parametrize("typo", ["max-epsilion", "max_epsilon", "data_path", "ledger-pth", "max-eps", "MAX-DELTA"])
def test_a_mistyped_node_config_key_is_refused_not_ignored(tmp_path, typo):
    # Ignoring "max-epsilion = 1" would train at the run's epsilon 8 in silence
    reply = _send_once(tmp_path, {}, {typo: "1"})
    assert reply.has_error() and "did you mean" in reply.error.reason
    assert f"key {typo} is unknown" in reply.error.reason  # the coordinator reads the key (it saw <value>)
    assert _send_once(tmp_path / "other", {}, {"other-apps-key": "1"}).has_error() is False


@pytest.mark.parametrize(("key", "says"), [("target-epsilon", "run config key"), ("dp-mode", "run config key"),
                                          ("epsilon", "privacy setting"), ("privacy-budget", "privacy setting"),
                                          ("noise_multiplier", "privacy setting"), ("central_noise_multiplier", "run config key"), ("ledger", "privacy setting"), ("epsilon-cap", "privacy setting")])
def test_a_misplaced_or_unknown_privacy_key_in_the_node_config_is_refused(key, says):
    # A partner who writes its cap under a name this app does not read would train at the run's epsilon
    with pytest.raises(ConfigError, match=says):
        check_node_config({key: 4.0})
    check_node_config({"log-level": "debug", "gpu-memory": 4})  # another app's keys pass


@pytest.mark.parametrize("key", ["maxeps", "maxEps", "epsiloncap", "epsilon.cap", "dp.max", "privacy.budget",
                                 "noiseMultiplier", "max-grad-norm"])
def test_run_together_or_dotted_privacy_keys_are_refused_too(key):
    # A review: splitting on "-" alone let these through, ignored while the partner believed its cap held
    # (Flower flattens a dotted --node-config key such as epsilon.cap=1 to "epsilon.cap")
    with pytest.raises(ConfigError, match="privacy setting|run config key|did you mean"):
        check_node_config({key: 1.0})


@pytest.mark.parametrize(("key", "says"), [("share-item-prior", "share-evaluation and share-item-histogram"),
                                          ("share_popularity", "what a partner shares"), ("shareEval", "did you mean"),
                                          ("item-prior", "run config key")])
def test_an_unknown_sharing_key_is_refused_naming_the_sharing_keys(key, says):
    # A review: share-item-prior=false passed in silence and the partner sent its histogram all the same
    with pytest.raises(ConfigError, match=says):
        check_node_config({key: False})


@pytest.mark.parametrize("key", ["data", "max", "share", "seed", "device", "steps", "deps-dir"])
def test_other_apps_plain_keys_pass(key, caplog, monkeypatch):
    # ... and the rules do not catch another app's ordinary keys: a lone word, or a run config key that is not privacy
    from client import partner_policy

    monkeypatch.setattr(partner_policy, "_IGNORED_WARNED", set())  # (another test may have warned already)
    with caplog.at_level("WARNING", logger="fedrec.client"):
        check_node_config({key: 1})
        check_node_config({key: 1})  # every round: said once
    # but the partner's log says it is ignored: data= or identity= for data-path / data-identity passed unseen
    said = [r.getMessage() for r in caplog.records if "is not one this app reads" in r.getMessage()]
    assert said == [f"node config key {key} is not one this app reads, so it is ignored (another app's? this app "
                    f"reads {', '.join(NODE_CONFIG_KEYS)})"]


def test_a_real_partner_with_a_floor_needs_its_own_ledger_path(tmp_path):
    # Without ledger-path the ledger lives under the coordinator's run-dir / ledger-dir: each run anew
    cfg = resolve_config(None, {})
    for node in ({}, {"ledger-path": ""}, {"ledger-path": "  "}):
        with pytest.raises(ConfigError, match="ledger-path"):
            apply_partner_policy(cfg, {"data-path": "log.csv", "max-epsilon": 2.0, **node})
    assert apply_partner_policy(cfg, {"data-path": "log.csv", "ledger-path": str(tmp_path / "l.sqlite"),
                                      "max-epsilon": 2.0})["target-epsilon"] == 2.0


def test_a_large_run_delta_cannot_buy_back_a_floored_partners_budget(tmp_path):
    # The coordinator asks for delta 0.5: almost no noise, and the ledger re-accounted at 0.5
    reply = _send_once(tmp_path, {"target-delta": 0.5}, {"max-epsilon": 4.0})
    metrics = reply.content["metrics"]
    assert metrics["delta"] <= 1e-5 and 0 < metrics["epsilon"] <= 4.0 + 1e-9
    calm = _send_once(tmp_path / "calm", {}, {"max-epsilon": 4.0}).content["metrics"]
    assert metrics["noise-multiplier"] == pytest.approx(calm["noise-multiplier"])
    # Without a floor a meaningless delta is refused in one line
    plain = _send_once(tmp_path / "plain", {"target-delta": 0.5}, {})
    assert plain.has_error() and "target-delta" in plain.error.reason


def test_forcing_dp_rechecks_the_run_config_in_one_line(tmp_path):
    # dp off + ghost clipping + tied output passes the coordinator's checks (no DP-SGD there) but
    # cannot run once the partner forces DP-SGD: one line naming the knob, not an internal error
    reply = _send_once(tmp_path, {"dp-mode": "off", "grad-sample-mode": "ghost", "tied-output": True},
                        {"max-epsilon": 4.0})
    assert reply.has_error() and reply.error.code == 400 and "cannot clip tied-output" in reply.error.reason


@pytest.mark.parametrize("value", [False, "false", 0])
def test_a_partner_can_keep_its_evaluation_sums_to_itself(tmp_path, value):
    reply = _send_once(tmp_path, {"dp": False}, {"share-evaluation": value}, kind="evaluate")
    assert reply.has_error() and reply.error.code == 400 and "share-evaluation = false" in reply.error.reason
    shared = _send_once(tmp_path, {"dp": False}, {"share-evaluation": True}, kind="evaluate")
    assert not shared.has_error() and shared.content["metrics"]["num-users"] > 0
    with pytest.raises(ConfigError, match="share-evaluation"):
        apply_partner_policy(resolve_config(None, {}), {**NODE, "share-evaluation": "sometimes"})


def test_a_partner_can_share_only_noised_evaluation_sums(tmp_path):
    # A run that sends sums in clear is refused in one line; a run with noised evaluation is answered
    clear = _send_once(tmp_path, {}, {"share-evaluation": "noised"}, kind="evaluate")
    assert clear.has_error() and clear.error.code == 400 and "share-evaluation = noised" in clear.error.reason
    noised = _send_once(tmp_path / "noised", {"evaluation-noise-multiplier": 4.0}, {"share-evaluation": "Noised"},
                        kind="evaluate")
    assert not noised.has_error(), noised.error
    assert noised.content["metrics"]["ledger-evaluations"] == 1 and "ndcg@20-sum" not in noised.content["metrics"]


def test_a_later_run_with_a_larger_delta_cannot_spend_past_an_earlier_promise(tmp_path):
    # Run 1 promises (4, 1e-6) and spends it; run 2 asks for (4, 1e-5) on the same ledger. At 1e-5
    # the same history reads as a smaller epsilon, so run 2 used to find budget left and train on
    ledger = {"ledger-path": str(tmp_path / "ledger.sqlite")}
    first = _send_once(tmp_path / "r1", {"num-server-rounds": 1, "target-epsilon": 4.0, "target-delta": 1e-6,
                                          "run-name": "one"}, ledger)
    assert not first.has_error() and first.content["metrics"]["epsilon"] == pytest.approx(4.0, abs=0.01)
    second = _send_once(tmp_path / "r2", {"num-server-rounds": 1, "target-epsilon": 4.0, "target-delta": 1e-5,
                                           "run-name": "two"}, ledger)
    assert second.has_error() and "epsilon" in second.error.reason, second.content["metrics"]
    # A later run with room (target 8) trains, and its reply states the delta the ledger is accounted at
    # (run 1's 1e-6), not its own 1e-5: the epsilon it reports holds at 1e-6 (a review)
    third = _send_once(tmp_path / "r3", {"num-server-rounds": 1, "target-epsilon": 8.0, "target-delta": 1e-5,
                                          "run-name": "three"}, ledger)
    assert not third.has_error(), third.error
    assert third.content["metrics"]["delta"] == 1e-6 and third.content["metrics"]["epsilon"] <= 8.0 + 1e-9


def test_a_simulated_partner_is_not_told_to_set_a_ledger_path(tmp_path, caplog):
    # An onboarding review: make run printed five "set node config ledger-path to one file that every run uses",
    # advice for a real partner; a simulated partner's ledger is meant to live with its run
    assert not _send_once(tmp_path, {}, {}).has_error()
    assert "new privacy ledger" in caplog.text and "set node config ledger-path" not in caplog.text


def test_a_pinned_catalogue_fingerprint_refuses_another_catalogue_before_the_log_is_read(tmp_path):
    # The coordinator chooses the run's catalogue; a log's fit to a chosen one told the coordinator which item ids
    # the partner's users have (one-item catalogues), outside any DP mechanism (a red-team review)
    from client.safe_errors import safe_reason
    from common.data.catalogue import catalogue_fingerprint
    from common.errors import DataError

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},i{(u + k) % 30},{k}\n" for u in range(40)
                                                          for k in range(5)))
    agreed, probe = tmp_path / "agreed.txt", tmp_path / "probe.txt"
    agreed.write_text("".join(f"i{i}\n" for i in range(30)))
    probe.write_text("x1\nx2\n")
    pin = catalogue_fingerprint(__import__("numpy").array([f"i{i}" for i in range(30)]))
    node = {"data-path": str(log), "catalogue-fingerprint": pin}
    cfg = resolve_config(None, {"catalogue": str(probe)})
    with pytest.raises(ConfigError, match=f"catalogue-fingerprint = {pin}: the run's catalogue has fingerprint"):
        partner_data(cfg, {**node, "data-path": str(tmp_path / "absent.csv")})  # refused before the log is read
    assert partner_data(resolve_config(None, {"catalogue": str(agreed)}), node).num_users == 40
    # Without the pin the log is read against the probe; the reply keeps the advice but not the log's item count
    with pytest.raises(DataError, match=r"none of its item ids \(30 distinct\)") as caught:
        partner_data(cfg, {"data-path": str(log)})
    assert "30" not in safe_reason(caught.value) and "published catalogue" in safe_reason(caught.value)


@pytest.mark.parametrize(("node", "said"), [
    ({"ledger-path": 5}, r"ledger-path = 5 is not text; give it in quotes, e\.g\. ledger-path=\"/data/ledger"),
    ({"data-identity": True}, "data-identity = True is not text"),
    ({"catalogue-fingerprint": ""}, "catalogue-fingerprint = '' is not a catalogue fingerprint"),
    ({"catalogue-fingerprint": "3f2a9c"}, "16 hex digits, as `fedrec-client data check` prints"),
    ({"catalogue-fingerprint": 4}, "catalogue-fingerprint = 4 is not text"),
])
def test_node_config_values_that_are_no_path_or_no_fingerprint_are_refused(node, said):
    # ledger-path=5 (unquoted) made a ledger named "5" in the working folder; an empty fingerprint (an unset
    # shell variable) pinned nothing in silence; a short one failed only at the first round (a review)
    with pytest.raises(ConfigError, match=said):
        check_node_config(node)


def test_a_catalogue_fingerprint_in_capitals_is_the_same_pin(tmp_path):
    from common.data.catalogue import catalogue_fingerprint

    items = [f"i{i}" for i in range(30)]
    (tmp_path / "agreed.txt").write_text("".join(f"{i}\n" for i in items))
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},i{(u + k) % 30},{k}\n" for u in range(40)
                                                          for k in range(5)))
    pin = catalogue_fingerprint(__import__("numpy").array(items)).upper()
    node = {"data-path": str(log), "catalogue-fingerprint": f" {pin} "}
    check_node_config(node)
    assert partner_data(resolve_config(None, {"catalogue": str(tmp_path / "agreed.txt")}), node).num_users == 40
