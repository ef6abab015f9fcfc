"""``item-prior = "popularity"``: a frozen per-item score offset from the partners' noised item histograms.

The release's sensitivity is checked by removing users, its noise by its spread, the offsets against a
sum computed here from the partners' actual replies, and every partner's whole-ledger epsilon (histogram
plus DP-SGD) against Google's dp_accounting, an independent accountant.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
from flwr.app.message_type import MessageType

from common.config import ignored_knobs, resolve_config
from common.errors import ConfigError, DataError
from common.item_prior import (check_histogram, noised_histogram, prior_mechanism, prior_offsets, set_item_prior,
                               unit_histogram)
from common.models.sasrec import SASRec
from common.training import train_local
from common.task import new_model, federation_data
from tests.conftest import dp_accounting_epsilon, recording_client_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"synthetic-users": 60, "synthetic-items": 25, "max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1,
        "local-epochs": 1, "batch-size": 8, "num-server-rounds": 1, "tied-output": True, "item-prior": "popularity",
        "item-prior-noise-multiplier": 2.0}


def test_one_user_moves_the_histogram_by_exactly_one_in_l2():
    rng = np.random.default_rng(0)
    users = [rng.integers(0, 21, size=rng.integers(1, 15)) for _ in range(30)]  # 0 is padding, repeats count once
    full = unit_histogram(users, 20)
    for k in range(len(users)):
        without = unit_histogram(users[:k] + users[k + 1:], 20)
        assert np.linalg.norm(full - without) == pytest.approx(1.0 if (users[k] > 0).any() else 0.0)
    # each cell: the users holding the item, each weighted 1 / sqrt(its distinct items)
    sets = [set(u[u > 0].tolist()) for u in users]
    expected = [sum(1 / np.sqrt(len(s)) for s in sets if i in s) for i in range(21)]
    assert np.allclose(full, expected) and full[0] == 0


def test_the_noise_has_the_configured_spread_and_a_seed_repeats_it():
    zero = np.zeros(20_000)
    drawn = noised_histogram(zero, 3.0, seed=1)
    assert drawn.dtype == np.float32 and abs(drawn.std() - 3.0) < 0.1 and abs(drawn.mean()) < 0.1
    assert np.array_equal(drawn, noised_histogram(zero, 3.0, seed=1))
    secure = noised_histogram(zero, 3.0)  # the CSPRNG of common.secure_noise
    assert abs(secure.std() - 3.0) < 0.1 and not np.array_equal(secure, drawn)
    with pytest.raises(ValueError, match="positive"):
        noised_histogram(zero, 0.0)


def test_offsets_are_the_log_of_the_clipped_sum_and_bad_replies_are_refused():
    a, b = np.array([5.0, 3.0, -4.0, 0.5]), np.array([1.0, 1.0, 1.0, -2.0])
    assert np.allclose(prior_offsets([a, b]), [0.0, np.log(5.0), 0.0, 0.0])
    with pytest.raises(DataError, match=r"^partner 3: item histogram of shape \(3,\), expected \(4,\)"):
        check_histogram(np.zeros(3), 3, "partner 3")
    with pytest.raises(DataError, match="NaN"):
        check_histogram(np.array([0.0, np.nan, 1.0, 1.0]), 3, "partner 3")


def test_the_offset_is_frozen_adds_to_every_score_and_dp_sgd_leaves_it_alone():
    torch.manual_seed(0)
    model = SASRec(20, max_len=6, dim=8, num_blocks=1, item_prior=True)
    offsets = np.linspace(0.0, 3.0, 21).astype(np.float32)
    set_item_prior(model, offsets)
    assert all(p is not model.output.bias for p in model.parameters() if p.requires_grad)
    model.eval()
    seq = torch.tensor([[0, 3, 5, 7, 2, 9]])
    plain = model.output.weight @ model.hidden(seq)[0, -1]
    assert torch.allclose(model(seq)[0, -1], plain + torch.from_numpy(offsets), atol=1e-5)
    with pytest.raises(DataError, match="item-prior needs a SASRec model built with"):
        set_item_prior(SASRec(20, max_len=6, dim=8, num_blocks=1), offsets)


@pytest.mark.parametrize("mode", ["fused", "hooks", "ghost"])
def test_dp_sgd_trains_the_rest_and_never_moves_the_offset(mode):
    from common.training import DPSettings

    cfg = resolve_config(None, {**TINY, "dp": True, "tied-output": mode != "ghost"})  # ghost refuses a tied weight
    data = federation_data(cfg)
    model = new_model(cfg, data.num_items)
    set_item_prior(model, np.arange(data.num_items + 1, dtype=np.float32) / 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, data, epochs=1, batch_size=8, learning_rate=0.01, max_len=10, seed=0,
                dp=DPSettings(1.0, 1.0, "rdp", mode, 0))
    after = model.state_dict()
    assert torch.equal(after["output.bias"], before["output.bias"])
    assert not torch.equal(after["item_emb.weight"], before["item_emb.weight"])


@pytest.mark.parametrize(("change", "message"), [
    ({"model": "mf"}, r"needs model = \"sasrec\" with item-features = \"id\" \(this run: mf, id\)"),
    ({"dp": False, "dp-mode": "off"}, r"needs dp-mode = \"local\" \(this run: off\)"),
    ({"dp-mode": "central"}, r"needs dp-mode = \"local\" \(this run: central\)"),
    ({"secure-aggregation": True}, "which secure-aggregation = true is meant to prevent"),
    ({"aggregation": "median"}, "one partner could set every item's offset; aggregation = 'median' expects"),
    ({"aggregation": "krum", "num-malicious-nodes": 1}, "aggregation = 'krum' expects malicious partners"),
    ({"num-malicious-nodes": 1}, "num-malicious-nodes = 1 expects malicious partners"),
    ({"dp-mode": "both"}, r"needs dp-mode = \"local\" \(this run: both\)"),
    ({"init-model": "runs/x/model.pt"}, "init-model = 'runs/x/model.pt' starts from a trained model"),
])
def test_refused_where_it_cannot_apply_in_one_line(change, message):
    with pytest.raises(ConfigError, match=r"^item-prior = \"popularity\" .*" + message):
        resolve_config(None, {**TINY, **change})


def test_its_noise_knob_is_checked_and_noted_as_ignored_without_it(tmp_path, capsys):
    from server.cli import main

    assert "item-prior-noise-multiplier" in ignored_knobs(resolve_config(None, {"item-prior-noise-multiplier": 3.0}))
    with pytest.raises(ConfigError, match="item-prior-noise-multiplier"):
        resolve_config(None, {**TINY, "item-prior-noise-multiplier": 0.0})
    # the coordinator's check refuses a target the histogram alone uses up, and states the release otherwise
    base = f"dp=true tied-output=true item-prior='popularity' run-dir='{tmp_path}'"
    assert main(["check", "--run-config", base + " target-epsilon=2.0"]) != 0
    assert "item-prior-noise-multiplier 2 would bring it to 2.1" in capsys.readouterr().err
    assert main(["check", "--run-config", base]) == 0
    assert "item-prior: each partner releases one item histogram, Gaussian noise of std 2" in capsys.readouterr().out


def test_partners_release_one_noised_histogram_each_and_the_ledgers_account_it(tmp_path, monkeypatch):
    """A 2-partner local-DP run: one query per partner under the run's ledger name, the round-1 model's
    offsets are the log of the sum of what the partners actually sent, each ledger holds one histogram row,
    and each partner's whole-ledger epsilon (histogram + DP-SGD) is dp_accounting's and within the target."""
    from client.item_histogram import HISTOGRAM_KEY
    from simulations.local_grid import run_local

    monkeypatch.setenv("FEDREC_REPRODUCIBLE_DP_NOISE", "1")
    overrides = {**TINY, "run-dir": str(tmp_path), "run-name": "prior", "dp": True, "min-nodes": 2,
                 "target-epsilon": 4.0}
    spy, sent = recording_client_app(overrides)
    released = []

    def keep_replies(msg, context):  # noqa: ANN001, ANN202
        reply = spy(msg, context)
        if msg.metadata.message_type == MessageType.QUERY:
            released.append(reply.content.array_records[HISTOGRAM_KEY].to_numpy_ndarrays()[0])
        return reply

    run_dir = run_local(overrides, 2, client_apps=[keep_replies, keep_replies])
    queries = [content["config"] for kind, content in sent if kind == MessageType.QUERY]
    assert [(q["query"], q["run-name"]) for q in queries] == [("item-popularity", run_dir.name)] * 2
    first_train = next(content for kind, content in sent if kind == MessageType.TRAIN)
    bias = first_train["arrays"].to_torch_state_dict()["output.bias"]
    assert len(released) == 2 and torch.allclose(bias, torch.from_numpy(prior_offsets(released)))
    assert not np.allclose(released[0], released[1])  # each partner its own users and noise
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-prior"] == "popularity" and start["partners-in-prior"] == 2

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epsilons = []
    for path in sorted((run_dir / "ledgers").glob("*.sqlite")):
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT noise_multiplier, sample_rate, steps, kind, run FROM batches ORDER BY id").fetchall()
        assert [(kind, run) for *_, kind, run in rows if kind == "item-prior"] == [("item-prior", run_dir.name)]
        assert tuple(rows[0][:3]) == prior_mechanism(2.0) and rows[0][3] == "item-prior"  # before any DP-SGD step
        epsilons.append(dp_accounting_epsilon([tuple(r[:3]) for r in rows], metrics[-1]["delta"]))
    assert len(epsilons) == 2
    assert metrics[-1]["epsilon"] == pytest.approx(max(epsilons), rel=0.01)
    # DP-SGD was calibrated on what the target left after the histogram: the whole ledger ends at the target
    assert 3.9 < max(epsilons) <= 4.0 + 1e-6
    # the run's stated guarantee names the histogram as inside it
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert privacy["guarantee"].startswith("Each partner's training and item histogram are (epsilon, delta)-DP")
    assert "std 2" in privacy["local"]["item-histogram"]
    assert sorted(p.get("item-histogram") for p in privacy["partners"].values()) == ["released before round 1"] * 2

    # a resume asks nothing (no second release) and trains on from the checkpoint's offsets; FedAvg's float32
    # mean of the partners' identical offsets may move them in the last bits only
    sent.clear()
    released.clear()
    run_local({**overrides, "resume": True, "num-server-rounds": 2}, 2, client_apps=[keep_replies, keep_replies])
    assert [kind for kind, _ in sent if kind == MessageType.QUERY] == [] and released == []
    resumed = next(content for kind, content in sent if kind == MessageType.TRAIN)["arrays"].to_torch_state_dict()
    assert torch.allclose(resumed["output.bias"], bias, atol=1e-5)
    assert "item-prior" not in json.loads((run_dir / "provenance.json").read_text())["starts"][1]


def test_a_partner_that_refuses_the_histogram_is_listed_in_the_privacy_report(tmp_path):
    from simulations.local_grid import run_local

    overrides = {**TINY, "run-dir": str(tmp_path), "run-name": "refused", "dp": True, "min-nodes": 2,
                 "target-epsilon": 2.0}  # noise 2 alone is epsilon 2.2: every partner refuses
    run_dir = run_local(overrides, 2)
    partners = json.loads((run_dir / "privacy.json").read_text())["partners"]
    assert len(partners) == 2
    for entry in partners.values():
        assert "item-histogram" not in entry
        first = entry["refused"][0]
        assert first["round"] == 0 and "budget exhausted: epsilon 0.000 of 2" in first["reason"]
    start = json.loads((run_dir / "provenance.json").read_text())["starts"][0]
    assert start["item-prior"] == "none (no partner sent a histogram)"


def test_a_partner_that_refused_the_histogram_and_then_trains_is_listed_once(tmp_path):
    """Its round-0 refusal carries no label (node-<id>); its first training reply names it: privacy.json then
    holds one entry with both (a review found the partner listed twice), and the text says who released one."""
    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

    from server.privacy_report import PrivacyReport
    from simulations.local_grid import LocalGrid

    LocalGrid([])  # the task identity Flower's Message needs outside its runtimes
    cfg = resolve_config(None, {**TINY, "dp": True})
    report = PrivacyReport(tmp_path, cfg)
    refusal = Message(Error(code=0, reason="this partner's node config share-item-histogram = false: it sends no "
                                           "item histogram"),
                      reply_to=Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY))
    refusal.metadata.__dict__["_src_node_id"] = 7
    report.note_item_histograms([refusal], [])
    assert list(report.partners) == ["node-7"]
    reply = Message(RecordDict({"metrics": MetricRecord({"epsilon": 3.2, "delta": 1e-5}),
                                "privacy": ConfigRecord({"partner": "partner-acme"})}), dst_node_id=7,
                    message_type=MessageType.TRAIN)
    reply.metadata.__dict__["_src_node_id"] = 7
    report.screen(1, [reply])
    report.write()
    partners = json.loads((tmp_path / "privacy.json").read_text())["partners"]
    assert list(partners) == ["partner-acme"]
    assert partners["partner-acme"]["epsilon"] == 3.2 and partners["partner-acme"]["node-id"] == 7
    assert [r["round"] for r in partners["partner-acme"]["refused"]] == [0]
    assert "share-item-histogram = false" in partners["partner-acme"]["refused"][0]["reason"]
    local = json.loads((tmp_path / "privacy.json").read_text())["local"]
    assert "each partner that sent one" in local["item-histogram"]


def _deployed_partner(tmp_path, **overrides):
    """(client app, context, config overrides) of a SuperNode's partner with its own log (100 users) and ledger."""
    from flwr.app import Context, RecordDict

    from client.app import make_client_app

    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"u{u},i{(u * 7 + k * 3) % 30},{1000 + k}" for u in range(100) for k in range(6)) + "\n")
    (tmp_path / "catalogue.txt").write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    overrides = {**TINY, "num-server-rounds": 2, "dp": True, "catalogue": str(tmp_path / "catalogue.txt"),
                 "run-dir": str(tmp_path / "runs"), **overrides}
    node = {"data-path": str(log), "ledger-path": str(tmp_path / "ledger.sqlite")}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    return make_client_app(overrides), context, overrides


def _ask_for_histogram(app, context):  # noqa: ANN001, ANN202
    from flwr.app import ConfigRecord, RecordDict

    from tests.conftest import flower_message

    query = RecordDict({"config": ConfigRecord({"query": "item-popularity", "server-round": 0, "run-name": "acme"})})
    return app(flower_message(query, "query"), context)


def test_a_target_the_histogram_alone_would_use_up_is_refused_naming_its_noise(tmp_path):
    """Refused before anything is drawn or recorded (not even the deployed partner's noised count), with the
    spend first ("budget exhausted: epsilon S of T": the coordinator's report reads it) and the knob to turn."""
    from flwr.app import Context, RecordDict

    from client.privacy_budget import PartnerBudget
    from common.errors import PrivacyError
    from common.task import partner_data

    app, context, overrides = _deployed_partner(tmp_path, **{"target-epsilon": 2.0})  # noise 2 alone: epsilon 2.2
    reply = _ask_for_histogram(app, context)
    assert reply.has_error() and reply.error.reason.startswith("budget exhausted: epsilon 0.000 of 2")
    assert "raise item-prior-noise-multiplier or target-epsilon" in reply.error.reason
    with sqlite3.connect(context.node_config["ledger-path"]) as db:  # nothing released, nothing recorded
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
    # a simulated partner (exact count): the calibration's refusal names the histogram, not "already spent"
    cfg = resolve_config(None, {**TINY, "dp": True, "target-epsilon": 2.0, "run-dir": str(tmp_path / "sim")})
    simulated = {"partition-id": 0, "num-partitions": 1}
    sim_context = Context(run_id=1, node_id=3, node_config=simulated, state=RecordDict(), run_config={})
    with pytest.raises(PrivacyError, match=r"^partner-0: budget exhausted: epsilon 0\.000 of 2 spent, and the item "
                                           r"histogram .* at item-prior-noise-multiplier 2 would bring it to 2\.1"):
        PartnerBudget.open(cfg, sim_context, partner_data(cfg, simulated), "sim-run")


def test_a_deployed_partner_records_its_histogram_once_beside_its_noised_count(tmp_path):
    """A SuperNode's partner (own log, own ledger, noised user count): the query's reply is recorded on the
    ledger before it leaves, a second query for the same run is refused, and the first round's reply states
    the whole ledger's epsilon (count + histogram + DP-SGD) as dp_accounting computes it, within the target."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client.item_histogram import HISTOGRAM_KEY
    from common.private_count import count_mechanism
    from tests.conftest import flower_message

    app, context, overrides = _deployed_partner(tmp_path)
    node = context.node_config
    reply = _ask_for_histogram(app, context)
    assert not reply.has_error(), reply.error
    histogram = reply.content.array_records[HISTOGRAM_KEY].to_numpy_ndarrays()[0]
    assert histogram.shape == (31,) and histogram.dtype == np.float32
    # the client remembers the ledger's releases (count + histogram): an older copy restored is refused later
    assert context.state.config_records["privacy-ledger"]["steps"] == 2
    again = _ask_for_histogram(app, context)
    assert again.has_error() and "already released its item histogram" in again.error.reason

    cfg = resolve_config(None, overrides)
    arrays = ArrayRecord(new_model(cfg, 30).state_dict())
    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1, "run-name": "acme"})})
    trained = app(flower_message(train, "train"), context)
    assert not trained.has_error(), trained.error
    with sqlite3.connect(node["ledger-path"]) as db:
        rows = db.execute("SELECT noise_multiplier, sample_rate, steps, kind FROM batches ORDER BY id").fetchall()
    assert [r[3] for r in rows] == ["count", "item-prior", "train"]
    assert tuple(rows[0][:3]) == count_mechanism(10.0) and tuple(rows[1][:3]) == prior_mechanism(2.0)
    metrics = trained.content["metrics"]
    history = [tuple(r[:3]) for r in rows]
    assert metrics["epsilon"] == pytest.approx(dp_accounting_epsilon(history, metrics["delta"]), rel=0.01)
    assert reply.content["metrics"]["epsilon"] == pytest.approx(dp_accounting_epsilon(history[:2], metrics["delta"]),
                                                                rel=0.01)
    assert metrics["epsilon"] < 8.0  # one of two planned rounds: below the target the plan reaches at round 2


def test_a_partner_that_declines_the_histogram_refuses_the_query_and_keeps_its_share_for_training(tmp_path,
                                                                                                    monkeypatch):
    """Node config share-item-histogram = false: the query is refused in one line before anything is drawn
    (the ledger stays empty, not even the noised count), and DP-SGD is calibrated without the histogram, so
    the two planned rounds reach the target (a histogram planned but never sent would leave its share unspent).
    A malformed value is refused as node config."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from client.partner_policy import check_node_config
    from tests.conftest import flower_message

    import common.item_prior

    app, context, overrides = _deployed_partner(tmp_path)
    context.node_config["share-item-histogram"] = False
    with monkeypatch.context() as patched:  # refused before any histogram is computed or noised
        for name in ("unit_histogram", "noised_histogram"):
            patched.setattr(common.item_prior, name, lambda *a, **k: pytest.fail("a histogram was computed"))
        reply = _ask_for_histogram(app, context)
    assert reply.has_error() and "share-item-histogram = false: it sends no item histogram" in reply.error.reason
    assert not (tmp_path / "ledger.sqlite").exists()  # nothing drawn, nothing recorded: no ledger opened

    cfg = resolve_config(None, overrides)
    arrays = ArrayRecord(new_model(cfg, 30).state_dict())
    for server_round in (1, 2):
        train = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round,
                                                                      "run-name": "acme"})})
        trained = app(flower_message(train, "train"), context)
        assert not trained.has_error(), trained.error
        arrays = trained.content["arrays"]
    with sqlite3.connect(context.node_config["ledger-path"]) as db:
        rows = db.execute("SELECT noise_multiplier, sample_rate, steps, kind FROM batches ORDER BY id").fetchall()
    assert [r[3] for r in rows] == ["count", "train", "train"]
    metrics = trained.content["metrics"]
    assert metrics["epsilon"] == pytest.approx(dp_accounting_epsilon([tuple(r[:3]) for r in rows], metrics["delta"]),
                                               rel=0.01)
    assert 7.9 < metrics["epsilon"] <= 8.0 + 1e-6
    with pytest.raises(ConfigError, match="share-item-histogram = 'maybe' must be true or false"):
        check_node_config({"share-item-histogram": "maybe"})

    # A target the histogram alone would use up (noise 2: epsilon 2.17) still trains a partner that declines it:
    # the check before its noised user count is drawn plans no histogram either (a review)
    (tmp_path / "small").mkdir()
    app, context, _ = _deployed_partner(tmp_path / "small", **{"target-epsilon": 2.0})
    context.node_config["share-item-histogram"] = False
    train = RecordDict({"arrays": ArrayRecord(new_model(cfg, 30).state_dict()),
                        "config": ConfigRecord({"server-round": 1, "run-name": "acme"})})
    trained = app(flower_message(train, "train"), context)
    assert not trained.has_error(), trained.error
    assert 0 < trained.content["metrics"]["epsilon"] < 2.0


def test_the_simulation_preflight_and_epsilon_plan_count_the_histogram_as_partners_do():
    """Both plan DP-SGD as client/privacy_budget.py does: after the histogram. The plan's epsilon after the
    last round is dp_accounting's over [histogram, DP-SGD]; a target the histogram alone uses up is refused
    before Ray starts, naming item-prior-noise-multiplier."""
    from simulations import preflight
    from simulations.epsilon_plan import plan

    cfg = resolve_config(None, {**TINY, "dp": True, "num-server-rounds": 3, "target-epsilon": 6.0})
    with_prior, without = plan(cfg, 2, [3])[0], plan({**cfg, "item-prior": "none"}, 2, [3])[0]
    assert with_prior["noise-multiplier"] > without["noise-multiplier"]  # the histogram's share is not DP-SGD's
    history = [prior_mechanism(2.0), (with_prior["noise-multiplier"], with_prior["sample-rate"],
                                      3 * with_prior["steps-per-round"])]
    assert with_prior["eps-rdp@3"] == pytest.approx(dp_accounting_epsilon(history, with_prior["delta"]), rel=0.01)
    assert with_prior["eps-rdp@3"] == pytest.approx(6.0, abs=0.01)
    refused = preflight.partners_unable_to_train({**cfg, "target-epsilon": 2.0}, 2)
    assert len(refused) == 2 and all("budget exhausted: epsilon 0.000 of 2 spent, and the item histogram" in why
                                     and "item-prior-noise-multiplier 2 would bring it to 2.1" in why
                                     for why in refused.values())
    assert preflight.partners_unable_to_train({**cfg, "target-epsilon": 2.0, "item-prior-noise-multiplier": 4.0}, 2) == {}
