"""A deployed partner's replies are computed from a noised user count (common/private_count.py).

Before, the sample rate, steps, noise multiplier, ``dp-users`` and FedAvg weight of every reply were
functions of the exact user count, and the training loss was sent as it was: a coordinator knowing every
other user of a partner could tell from them whether one more user is in its log. Now the count is
released once per run under the Gaussian mechanism and recorded on the ledger; everything else is
computed from it. Epsilons are checked against Google's dp_accounting (an independent implementation).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from client.privacy_budget import PartnerBudget
from client.privacy_ledger import PrivacyLedger
from common.config import resolve_config
from common.errors import PrivacyError
from common.private_count import count_mechanism, noised_count
from common.task import new_model, partner_data
from common.training import user_count_for_training
from tests.conftest import dp_accounting_epsilon, flower_message

TINY = {"max-seq-len": 10, "embedding-dim": 8, "num-blocks": 1, "local-epochs": 1, "batch-size": 8,
        "num-server-rounds": 2, "synthetic-users": 120, "synthetic-items": 30}


def _deployed(tmp_path: Path, users: int = 100, **overrides) -> tuple[dict, dict]:
    """(config, node config) of a partner with its own CSV log and ledger, as a SuperNode runs it."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "\n".join(
        f"u{u},i{(u * 7 + k * 3) % 30},{1000 + k}" for u in range(users) for k in range(6)) + "\n")
    catalogue = tmp_path / "catalogue.txt"
    catalogue.write_text("\n".join(f"i{i}" for i in range(30)) + "\n")
    overrides = {**TINY, "catalogue": str(catalogue), "run-dir": str(tmp_path / "runs"), **overrides}
    return overrides, {"data-path": str(log), "ledger-path": str(tmp_path / "ledger.sqlite")}


def _context(node: dict, run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=7, node_config=dict(node), state=RecordDict(), run_config={})


def test_noised_counts_are_gaussian_around_the_count():
    seeded = np.array([noised_count(200, 10.0, seed=s) for s in range(3000)])
    assert abs(seeded.mean() - 200) < 3 * 10 / math.sqrt(3000)
    assert 9.5 < seeded.std() < 10.5
    secure = np.array([noised_count(200, 10.0) for _ in range(600)])  # the CSPRNG a deployed partner uses
    assert abs(secure.mean() - 200) < 4 * 10 / math.sqrt(600) and 8.8 < secure.std() < 11.2
    assert len(set(secure.tolist())) > 20  # not one value drawn again and again
    # at least 1 (post-processing): a count of 0 sent num-examples 0, which update validation rejects every round
    assert min(noised_count(2, 10.0, seed=s) for s in range(200)) == 1
    with pytest.raises(ValueError):
        noised_count(5, 0.0)


def test_a_deployed_reply_is_computed_from_the_noised_count_only(tmp_path, monkeypatch, caplog):
    from common.privacy import REPRODUCIBLE_NOISE_ENV

    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")  # a count that differs from the exact one, every time
    overrides, node = _deployed(tmp_path)
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    exact = user_count_for_training(data)
    app = make_client_app(overrides)
    context = _context(node)
    arrays = ArrayRecord(new_model(cfg, data.num_items).state_dict())
    replies = []
    caplog.set_level("INFO", logger="flwr")
    for server_round in (1, 2):
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round,
                                                                       "run-name": "acme-run"})})
        reply = app(flower_message(content, "train"), context)
        assert not reply.has_error(), reply.error
        replies.append(reply.content["metrics"])
        arrays = reply.content["arrays"]
    with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
        public = ledger.public_count("acme-run")
        history = ledger.history()
    assert public is not None and public != exact and abs(public - exact) < 60  # noise std 10
    # The partner's own log (Flower's logger, which a flwr-clientapp process shows) says what was kept and released
    assert caplog.text.count("(kept here: not sent)") == 2
    assert f"user count released for run acme-run: {public} ({data.num_users} users plus Gaussian noise" in caplog.text
    for metrics in replies:
        assert "train-loss" not in metrics  # a function of the users' data outside the DP-SGD noise
        assert "seconds" not in metrics  # the time grows with the true number of users sampled
        assert metrics["dp-users"] == metrics["num-examples"] == public  # the FedAvg weight too
        steps = math.ceil(public / 8)
        assert metrics["sample-rate"] == pytest.approx(1 / steps)
        assert metrics["steps"] == steps  # the plan's steps, from the public count
    # The ledger holds one count, released before the first round; training at rate 1/steps follows it
    assert history[0] == count_mechanism(10.0) and len(history) == 3
    assert [h[1:] for h in history[1:]] == [(1 / math.ceil(public / 8), math.ceil(public / 8))] * 2
    # The reported epsilon is the whole ledger's: checked against dp_accounting (RDP orders differ: 1%)
    assert replies[-1]["epsilon"] == pytest.approx(dp_accounting_epsilon(history, replies[-1]["delta"]), rel=0.01)
    assert replies[-1]["epsilon"] <= 8.0 + 1e-6 and replies[-1]["epsilon"] > 7.5  # calibrated with the count in
    assert replies[-1]["delta"] == pytest.approx(min(1e-5, 0.1 / public))  # the default delta from it too


def test_a_resumed_run_reuses_its_count_and_a_new_run_draws_one(tmp_path):
    overrides, node = _deployed(tmp_path)
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    first = PartnerBudget.open(cfg, _context(node), data, "run-1")
    users = first.users
    first.close()
    resumed = PartnerBudget.open(cfg, _context(node, run_id=2), data, "run-1")  # a fresh process, same run
    assert resumed.users == users and resumed.ledger.history() == [count_mechanism(10.0)]
    resumed.close()
    other = PartnerBudget.open(cfg, _context(node, run_id=3), data, "run-2")
    assert other.ledger.history() == [count_mechanism(10.0)] * 2  # each run's count is spent
    assert other.ledger.public_count("run-2") == other.users
    other.close()


def test_a_simulated_partition_uses_its_exact_size_unless_asked(tmp_path):
    overrides = {**TINY, "run-dir": str(tmp_path)}
    node = {"partition-id": 0, "num-partitions": 2}
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    exact = PartnerBudget.open(cfg, _context(node), data, "sim")
    assert exact.users == user_count_for_training(data) and exact.ledger.history() == []
    assert not exact.count_is_noised
    exact.close()
    cfg = resolve_config(None, {**overrides, "simulated-count-noise": True, "count-noise-multiplier": 5.0})
    noised = PartnerBudget.open(cfg, _context(node), data, "sim-noised")
    assert noised.count_is_noised and noised.ledger.history() == [count_mechanism(5.0)]
    noised.close()


@pytest.mark.parametrize("target", [0.2, 0.38])
def test_no_count_is_drawn_when_it_would_pass_the_budget(tmp_path, target):
    # One Gaussian release at noise 10 alone is worth epsilon 0.375 at delta 1e-5: a target of 0.2
    # cannot afford it, and the partner refuses before drawing (so nothing is released or recorded). At 0.38 the
    # count fits, but leaves less than the calibration's tolerance for DP-SGD: the run was refused after the draw
    overrides, node = _deployed(tmp_path, **{"target-epsilon": target})
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    delta = min(1e-5, 0.1 / user_count_for_training(data))
    assert dp_accounting_epsilon([count_mechanism(10.0)], delta) > 0.2
    with pytest.raises(PrivacyError, match=rf"^budget exhausted: epsilon 0\.000 of {target:g} .*noised user count alone"):
        PartnerBudget.open(cfg, _context(node), data, "run-1")
    with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
        assert ledger.history() == [] and ledger.public_count("run-1") is None


@pytest.mark.parametrize("mode", ["fused", "hooks", "ghost"])
def test_training_samples_at_the_plans_rate_not_the_datas(mode):
    # The plan says 5 steps an epoch (rate 1/5) and expected batch 7 while the data alone would give
    # ceil(100 / 8) = 13 steps: the sampler, the optimiser and the accountant all follow the plan
    from common.data import build_sequences, generate_synthetic
    from common.models import SASRec
    from common.training import DPSettings, train_local

    data = build_sequences(generate_synthetic(num_users=110, num_items=20, mean_length=7, seed=0))
    users = user_count_for_training(data)
    torch.manual_seed(0)
    model = SASRec(data.num_items, max_len=6, dim=8, num_blocks=1, num_heads=2, dropout=0.0,
                   tied_output=mode != "ghost")
    result = train_local(model, data, epochs=4, batch_size=8, learning_rate=0.01, max_len=6,
                         dp=DPSettings(1.0, 1.0, "rdp", mode, 1, steps_per_epoch=5, expected_batch=7))
    assert math.ceil(users / 8) != 5
    assert result.steps == 20
    assert result.mechanisms == [(1.0, 0.2, 20)]


def test_the_poisson_loader_and_optimiser_follow_the_plan():
    # Without setting the sampler's own rate, 5 steps were run at the data's rate 1/13 while the ledger
    # recorded 1/5: the accountant and the sampling disagreed
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.per_user_clipping import make_fused_private

    dataset = TensorDataset(torch.arange(100))
    model = torch.nn.Linear(2, 2)
    engine = PrivacyEngine()
    optimizer, loader = make_fused_private(engine, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                           data_loader=DataLoader(dataset, batch_size=8), noise_multiplier=1.0,
                                           max_grad_norm=1.0, steps=5, batch=7)
    assert optimizer.expected_batch_size == 7
    torch.manual_seed(0)
    sizes = [len(batch[0]) for _ in range(200) for batch in loader]
    assert len(sizes) == 200 * 5
    assert abs(np.mean(sizes) - 100 / 5) < 0.5  # rate 1/5: 20 users a step on average, not 100 / 13


def test_the_count_costs_little_beside_dp_sgd():
    # The README's numbers: the count alone, and what it adds at the noise calibrated without it
    from common.privacy import calibrate_noise_after, epsilon_of, steps_per_epoch

    alone = epsilon_of([count_mechanism(10.0)], 1e-5)
    assert alone == pytest.approx(0.375, abs=5e-4)
    assert alone == pytest.approx(dp_accounting_epsilon([count_mechanism(10.0)], 1e-5), rel=0.01)
    for users, batch, rounds, target, before, with_count, recalibrated in (
            (200, 64, 5, 8.0, 1.0791, 8.015, 1.0806), (200, 8, 5, 1.0, 2.109, 1.076, 2.250)):
        rate, steps = steps_per_epoch(users, batch)
        plan = {"target_epsilon": target, "target_delta": 1e-5, "sample_rate": rate, "total_steps": rounds * steps,
                "accountant": "rdp"}
        sigma = calibrate_noise_after([], **plan)
        assert sigma == pytest.approx(before, abs=6e-4)
        assert epsilon_of([count_mechanism(10.0), (sigma, rate, rounds * steps)], 1e-5) == pytest.approx(with_count,
                                                                                                         abs=6e-4)
        assert calibrate_noise_after([count_mechanism(10.0)], **plan) == pytest.approx(recalibrated, abs=6e-4)


def test_a_low_draw_trains_at_two_steps_instead_of_locking_the_partner_out(tmp_path, monkeypatch, caplog):
    # A deployment test drew 8 for 38 users (3 standard deviations): "only 8 users ... not more than batch-size 8"
    # refused every round of the run, since a run keeps its count. Any rate is DP; the plan takes 2 steps an epoch
    import client.privacy_budget as privacy_budget

    monkeypatch.setattr(privacy_budget, "noised_count", lambda count, noise, seed=None: 3)
    overrides, node = _deployed(tmp_path)
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    with caplog.at_level("WARNING", logger="fedrec.client"):
        budget = PartnerBudget.open(cfg, _context(node), data, "run-1")
    assert budget.users == 3 and budget.calibration.sample_rate == 0.5 and budget.calibration.steps_per_round == 2
    settings = budget.dp_settings(cfg)
    assert (settings.steps_per_epoch, settings.expected_batch) == (2, 1)
    budget.close()
    assert "noised user count 3 is not more than batch-size 8" in caplog.text


def test_no_count_is_drawn_past_the_partners_own_cap_at_a_larger_run_delta(tmp_path):
    # A review: the check before the draw used the run's target-delta 1e-3 (count alone: epsilon 0.236) while the
    # partner's max-epsilon caps delta at the default 1e-5 (0.375): the count was drawn, then the run refused at
    # "epsilon 0.375 of 0.36", past the partner's own cap
    from client.partner_policy import apply_partner_policy

    overrides, node = _deployed(tmp_path, **{"target-delta": 1e-3})
    node["max-epsilon"] = 0.36
    cfg = apply_partner_policy(resolve_config(None, overrides), node)
    data = partner_data(cfg, node)
    assert dp_accounting_epsilon([count_mechanism(10.0)], 1e-3) < 0.36 < dp_accounting_epsilon([count_mechanism(10.0)], 1e-5)
    with pytest.raises(PrivacyError, match="budget exhausted: epsilon 0.000 of 0.36"):
        PartnerBudget.open(cfg, _context(node), data, "run-1")
    with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
        assert ledger.history() == []


def test_a_deployed_noised_evaluation_divides_by_the_noised_count_of_all_its_users(tmp_path):
    # The count covers every user of the log (noised evaluation sums cover users too short to train on too):
    # the reply's num-users is that count, never the exact number of evaluated users
    overrides, node = _deployed(tmp_path, **{"evaluation-noise-multiplier": 5.0})
    rows = [f"short{u},i{u % 30},{3000 + k}" for u in range(9) for k in range(3)]  # 3 events: no training pair
    with open(node["data-path"], "a") as fh:
        fh.write("\n".join(rows) + "\n")
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    assert data.num_users > user_count_for_training(data)
    app = make_client_app(overrides)
    content = RecordDict({"arrays": ArrayRecord(new_model(cfg, data.num_items).state_dict()),
                          "config": ConfigRecord({"server-round": 1, "run-name": "acme-run"})})
    reply = app(flower_message(content, "evaluate"), _context(node))
    assert not reply.has_error(), reply.error
    with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
        public = ledger.public_count("acme-run")
        kinds = [h for h in ledger.history()]
    assert reply.content["metrics"]["num-users"] == public == reply.content["metrics"]["dp-users"]
    assert kinds == [count_mechanism(10.0), (5.0, 1.0, 1)]  # the count, then the noised evaluation


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_wrapped_training_divides_by_the_plans_batch(mode):
    # A review: with only steps and mechanisms checked, dividing by the data's users // steps again passed
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.models import SASRec
    from common.dp_sgd import DPSettings, opacus_private

    model = SASRec(20, max_len=6, dim=8, num_blocks=1, num_heads=2, dropout=0.0, tied_output=mode == "hooks")
    loader = DataLoader(TensorDataset(torch.zeros(100, 6, dtype=torch.long), torch.zeros(100, 6, dtype=torch.long)),
                        batch_size=8)
    dp = DPSettings(1.0, 1.0, "rdp", mode, 1, steps_per_epoch=5, expected_batch=7)
    prepared = opacus_private(PrivacyEngine(), model, torch.optim.Adam(model.parameters()), loader,
                              torch.nn.CrossEntropyLoss(), dp, mode)
    optimizer, dp_loader = prepared[1], prepared[-1]
    assert optimizer.expected_batch_size == 7
    assert dp_loader.batch_sampler.sample_rate == 0.2 and dp_loader.batch_sampler.steps == 5
    torch.manual_seed(0)
    sizes = [len(batch[0]) for _ in range(100) for batch in dp_loader]
    assert len(sizes) == 500 and abs(np.mean(sizes) - 20) < 0.7


def test_a_deployed_partner_is_told_once_that_clear_evaluation_leaves_its_guarantee(tmp_path, caplog):
    overrides, node = _deployed(tmp_path)
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    app = make_client_app(overrides)
    context = _context(node)
    content = RecordDict({"arrays": ArrayRecord(new_model(cfg, data.num_items).state_dict()),
                          "config": ConfigRecord({"server-round": 1, "run-name": "acme-run"})})
    with caplog.at_level("WARNING", logger="fedrec.client"):
        for _ in range(2):
            reply = app(flower_message(content, "evaluate"), context)
            assert not reply.has_error(), reply.error
    assert caplog.text.count("exact number of evaluated users, outside its DP guarantee") == 1
    assert reply.content["metrics"]["num-users"] == data.num_users  # in clear, as the warning says


@pytest.mark.parametrize("users", [100, 101])
def test_nothing_before_the_draw_depends_on_the_exact_count(tmp_path, users):
    # A privacy review: target-delta = 1/100.5 was checked against the exact count before the draw, so 101
    # users were always refused, unrecorded, and 100 never: a coordinator knowing 100 users learned with
    # certainty whether one more was there. Now both draw and record their count; the delta is refused (or
    # not) on the noised count, a release the ledger holds
    overrides, node = _deployed(tmp_path, users=users, **{"target-delta": 1 / 100.5})
    cfg = resolve_config(None, overrides)
    data = partner_data(cfg, node)
    assert data.num_users == users
    try:
        PartnerBudget.open(cfg, _context(node), data, "run-1").close()
    except PrivacyError as exc:
        assert "at least 1 /" in str(exc) and "the number of users of this partner" not in str(exc)
    with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
        assert ledger.history() == [count_mechanism(10.0)] and ledger.public_count("run-1") is not None


def test_the_check_before_the_draw_takes_no_delta_from_the_exact_count_of_a_large_partner(tmp_path):
    # With target-delta 0 (auto) the delta is default_delta(users), below 1e-5 past 10,000 users: the check before
    # the draw must take default_delta(1) all the same, or a budget near the count's cost is refused unrecorded for
    # 20,000 users (epsilon 0.392 at their delta) and drawn for 10,000 (0.375), telling the coordinator which it is
    # (a fresh ledger's room is now checked at the smallest delta a run may end at, default_delta(10^8): both
    # sizes are refused before the draw, the same decision, which is what this test is about)
    histories = []
    for users in (20_000, 10_000):
        (tmp_path / str(users)).mkdir()
        overrides, node = _deployed(tmp_path / str(users), users=users,
                                    **{"target-delta": 0.0, "target-epsilon": 0.39})
        cfg = resolve_config(None, overrides)
        data = partner_data(cfg, node)
        with contextlib.suppress(PrivacyError):  # refused before or after the draw, or not: the same for both
            PartnerBudget.open(cfg, _context(node), data, "run-1").close()
        with PrivacyLedger(node["ledger-path"], data.fingerprint()) as ledger:
            histories.append(ledger.history())
    assert histories[0] == histories[1]


def test_the_counts_room_is_checked_at_the_smallest_delta_the_run_may_end_at(tmp_path):
    # Above 10^4 users the default delta (and max-epsilon's cap) is 0.1 / users, below the 1e-5 the room for the
    # count was checked at: the count was drawn, recorded, and the ledger ended past max-epsilon (a red-team review)
    from client.privacy_budget import PartnerBudget
    from common.privacy import default_delta, epsilon_of
    from common.task import partner_data

    users = 20_000
    lo, hi = 0.5, 50.0  # the count's noise for which it alone costs 0.99 at 1e-5 (the old check passed it)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if epsilon_of([(mid, 1.0, 1)], 1e-5, "rdp") > 0.99 else (lo, mid)
    sigma = hi
    assert epsilon_of([(sigma, 1.0, 1)], default_delta(users), "rdp") > 1.0  # at the partner's delta: past the cap
    overrides, node = _deployed(tmp_path, users=users, **{"count-noise-multiplier": sigma, "target-epsilon": 1.0})
    node = {**node, "max-epsilon": 1.0}
    cfg = resolve_config(None, overrides)
    with pytest.raises(PrivacyError, match="budget exhausted"):
        PartnerBudget.open(cfg, _context(node), partner_data(cfg, node), "run-1")
    with PrivacyLedger(Path(node["ledger-path"]), partner_data(cfg, node).fingerprint()) as ledger:
        assert ledger.history() == [] and ledger.epsilon(default_delta(users)) <= 1.0  # refused before the draw
