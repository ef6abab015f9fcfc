"""The MF baseline: only item factors and biases are federated, user factors stay in the partner's
state, training learns, DP-SGD treats one user as one sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.app import make_client_app
from client.private_factors import STATE_KEY, load_user_factors
from common.config import resolve_config
from common.evaluation import evaluate_model
from common.models import build_model
from common.models.mf import MatrixFactorization, MultinomialLoss, train_mf_local
from common.privacy import steps_per_epoch
from common.task import new_model, partner_data
from common.training import DPSettings, user_count_for_training
from tests.conftest import flower_message

TINY = {"model": "mf", "synthetic-users": 150, "synthetic-items": 40, "max-seq-len": 20, "embedding-dim": 16,
        "num-blocks": 1, "local-epochs": 2, "batch-size": 16, "num-server-rounds": 2, "dp-mode": "off", "dp": False}


@pytest.fixture(autouse=True)
def one_thread():
    """NOTE: on the shared 2-core machine, torch's second thread spins against other jobs (60x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_federated_weights_hold_no_user_factor():
    small = build_model(resolve_config(None, {**TINY}), 40)
    assert isinstance(small, MatrixFactorization)
    assert set(small.state_dict()) == {"items.weight", "items.bias"}
    assert small.state_dict()["items.weight"].shape == (41, 16)  # items x dim, whatever the number of users


def test_loss_is_the_mean_negative_log_likelihood_per_user():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    targets = torch.tensor([[0, 1, 3]])  # padding ignored
    logp = torch.log_softmax(logits, dim=-1)[0]
    want = -(logp[1] + logp[3]) / 2
    assert MultinomialLoss("none")(logits, targets).item() == pytest.approx(want.item())


def test_training_learns_and_private_factors_beat_fold_in_from_nothing(small_data):
    torch.manual_seed(0)
    model = MatrixFactorization(small_data.num_items, dim=16, max_len=20)
    before = evaluate_model(model, small_data, max_len=20)
    result, factors = train_mf_local(model, small_data, None, epochs=15, batch_size=32, learning_rate=0.02, max_len=20)
    after = evaluate_model(model, small_data, max_len=20, user_factors=factors)
    assert factors.shape == (small_data.num_users, 16)
    assert result.mechanisms == [] and result.num_examples == user_count_for_training(small_data)
    assert after["ndcg@10-sum"] > 1.3 * before["ndcg@10-sum"], (before["ndcg@10-sum"], after["ndcg@10-sum"])


def test_dp_training_samples_users_at_the_accounted_rate(small_data):
    model = MatrixFactorization(small_data.num_items, dim=8, max_len=20)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    result, _ = train_mf_local(model, small_data, None, epochs=2, batch_size=32, learning_rate=0.01, max_len=20, dp=dp)
    rate, steps = steps_per_epoch(user_count_for_training(small_data), 32)
    assert sum(n for _, _, n in result.mechanisms) == 2 * steps == result.steps
    assert all(q == pytest.approx(rate) and s == 1.0 for s, q, _ in result.mechanisms)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batches_are_noisy_steps(mode):
    # 4 users, expected batch 1: about a third of the Poisson batches are empty (noise only)
    from common.data import build_sequences, generate_synthetic

    data = build_sequences(generate_synthetic(num_users=4, num_items=12, mean_length=6, seed=0), name="tiny")
    model = MatrixFactorization(data.num_items, dim=4, max_len=6)
    result, _ = train_mf_local(model, data, None, epochs=6, batch_size=1, learning_rate=0.01, max_len=6, seed=0,
                               dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode))
    users = result.num_examples
    assert result.steps == 6 * users and result.mechanisms == [(1.0, 1 / users, 6 * users)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_client_keeps_user_factors_in_its_state_and_sends_only_items():
    app = make_client_app(TINY)
    cfg = resolve_config(None, TINY)
    node = {"partition-id": 0, "num-partitions": 2}
    data = partner_data(cfg, node)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    arrays = ArrayRecord(new_model(cfg, data.num_items).state_dict())
    for server_round in (1, 2):
        msg = flower_message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}))
        reply = app(msg, context)
        assert not reply.has_error(), reply.error
        assert set(reply.content["arrays"].keys()) == {"items.weight", "items.bias"}
        factors = load_user_factors(context, data, 16)
        assert factors is not None and factors.shape == (data.num_users, 16)
        assert STATE_KEY in context.state.array_records
        arrays = reply.content["arrays"]
    msg = flower_message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), "evaluate")
    metrics = app(msg, context).content["metrics"]
    assert metrics["num-users"] == data.num_users and metrics["partition-id"] == 0
    assert 0.0 <= metrics["ndcg@10-sum"] <= metrics["num-users"]
    # The evaluation refits the private factors against the global model, warm-started from the stored
    # ones (fitted to the partner's own item factors before aggregation): the same sums as doing so directly
    from common.metrics import pad_left

    model = new_model(cfg, data.num_items)
    model.load_state_dict(arrays.to_torch_state_dict())
    stored = load_user_factors(context, data, 16)
    histories = pad_left(data.train_sequences(), 20)
    refit = model.fit_users(histories, init=stored)
    direct = evaluate_model(model, data, max_len=20, user_factors=refit)
    assert metrics["ndcg@10-sum"] == pytest.approx(direct["ndcg@10-sum"])

    def fold_in_objective(factors: torch.Tensor) -> float:
        return float(MultinomialLoss("sum")(model.score_users(factors), histories) + model.l2 * (factors**2).sum())

    assert fold_in_objective(refit) < fold_in_objective(stored)  # the stored ones do not fit the global model
    assert np.isfinite(metrics["pop@10-sum"])


def test_fedprox_pulls_the_item_factors_toward_the_global_model():
    # aggregation = fedprox sends proximal-mu with each train message; MF trains through the same
    # loop as SASRec (common.training.run_epochs), so FedProx's pull applies to its item factors too
    app = make_client_app(TINY)
    cfg = resolve_config(None, TINY)
    node = {"partition-id": 0, "num-partitions": 2}
    data = partner_data(cfg, node)
    arrays = ArrayRecord(new_model(cfg, data.num_items).state_dict())
    start = arrays.to_torch_state_dict()
    distance = {}
    for mu in (0.0, 100.0):  # learning-rate 0.002 x 100: each step pulls 20% of the way back
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
        config = ConfigRecord({"server-round": 1, **({"proximal-mu": mu} if mu else {})})
        reply = app(flower_message(RecordDict({"arrays": arrays, "config": config})), context)
        assert not reply.has_error(), reply.error
        new = reply.content["arrays"].to_torch_state_dict()
        distance[mu] = float(sum(((new[k] - start[k]) ** 2).sum() for k in start) ** 0.5)
    assert 0 < distance[100.0] < 0.5 * distance[0.0], distance


def test_ghost_clipping_norms_are_per_user_gradient_norms():
    """The clipping unit is one user: Opacus' per-sample norms equal one-user-at-a-time back-propagation."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    torch.manual_seed(0)
    m = MatrixFactorization(12, dim=4)
    factors = torch.randn(5, 4)
    targets = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 7], [8, 9, 1], [0, 2, 11]])
    reference = []
    for i in range(5):
        grads = torch.autograd.grad(MultinomialLoss("sum")(m(factors[i:i + 1]), targets[i:i + 1]), list(m.parameters()))
        reference.append(torch.sqrt(sum((g**2).sum() for g in grads)))
    gsm = GradSampleModuleFastGradientClipping(m, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
    MultinomialLoss("sum")(gsm(factors), targets).backward()
    torch.testing.assert_close(gsm.get_norm_sample(), torch.stack(reference), atol=1e-5, rtol=1e-4)


def test_stored_factors_of_other_users_or_another_dimension_start_afresh(small_data):
    # A changed log (same number of users, others among them) or embedding-dim: stored rows would be
    # attached to the wrong users or fail the model, so they are not used
    from client.private_factors import save_user_factors

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    mine, others = small_data.subset(list(range(100))), small_data.subset(list(range(100, 200)))
    save_user_factors(context, mine, torch.ones(100, 16))
    assert load_user_factors(context, mine, 16) is not None
    assert load_user_factors(context, others, 16) is None
    assert load_user_factors(context, mine, 8) is None
