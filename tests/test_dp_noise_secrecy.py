"""DP-SGD noise is drawn from OS entropy: nobody who knows the run config (the coordinator writes
it, seed included) can regenerate and subtract a partner's noise. Only the partner's own
environment can ask for reproducible noise (simulations do, for repeatable numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from client.app import make_client_app
from common.config import resolve_config
from common.models import SASRec
from common.models.mf import MatrixFactorization, train_mf_local
from common.privacy import REPRODUCIBLE_NOISE_ENV, dp_noise_seed
from common.secure_noise import SecureGaussian, draw_noise_securely, sample_securely, secure_sampler_class
from common.task import new_model, partner_data
from common.training import DPSettings, train_local
from tests.test_client_training import NODE, TINY, send

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def _train(small_data, kind: str, noise_seed: int | None, noise: float = 1.0) -> np.ndarray:
    torch.manual_seed(0)
    dp = DPSettings(noise_multiplier=noise, max_grad_norm=1.0, grad_sample_mode=kind, noise_seed=noise_seed)
    common = dict(epochs=1, batch_size=32, learning_rate=0.01, max_len=10, dp=dp, seed=7)
    if kind == "mf":
        model = MatrixFactorization(small_data.num_items, dim=8, max_len=10)
        dp.grad_sample_mode = "auto"
        train_mf_local(model, small_data, None, **common)
    else:
        model = SASRec(small_data.num_items, max_len=10, dim=8, num_blocks=1, dropout=0.0, tied_output=True)
        train_local(model, small_data, **common)
    return _weights(model)


@pytest.mark.parametrize("kind", ["fused", "hooks", "mf"])
def test_same_seed_and_data_draw_fresh_noise_unless_a_noise_seed_is_given(small_data, kind):
    # Same data, same run seed, same initial weights: only the noise (and Poisson batches) can differ
    fresh = [_train(small_data, kind, None) for _ in range(2)]
    seeded = [_train(small_data, kind, 123) for _ in range(2)]
    assert not np.allclose(fresh[0], fresh[1])  # unpredictable from the run config
    np.testing.assert_array_equal(seeded[0], seeded[1])  # a noise seed repeats itself exactly
    assert not np.allclose(seeded[0], fresh[0])


@pytest.mark.parametrize("kind", ["fused", "hooks", "mf"])
def test_poisson_batches_are_secret_too(small_data, kind):
    # No noise at all: only the sampled users can differ. The sampler used to take the loader's
    # generator, seeded from the run config: the coordinator knew every step's users.
    fresh = [_train(small_data, kind, None, noise=0.0) for _ in range(2)]
    assert not np.allclose(fresh[0], fresh[1])
    np.testing.assert_array_equal(_train(small_data, kind, 9, noise=0.0), _train(small_data, kind, 9, noise=0.0))


def test_noise_seed_comes_only_from_the_partners_environment(monkeypatch):
    monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    assert dp_noise_seed(42, 1, 0) is None
    monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")
    assert dp_noise_seed(42, 1, 0) == dp_noise_seed(42, 1, 0)
    # simulated partners and rounds draw different noise (the old rule gave every partner one stream)
    assert len({dp_noise_seed(42, r, p) for r in (1, 2) for p in (0, 1, 2)}) == 6


@pytest.mark.parametrize("reproducible", [False, True])
def test_a_partner_app_replies_with_noise_the_run_config_does_not_fix(tmp_path, monkeypatch, reproducible):
    # Prepare: the same partner (data, global model, run config, round) trains twice, fresh ledgers
    if reproducible:
        monkeypatch.setenv(REPRODUCIBLE_NOISE_ENV, "1")
    else:
        monkeypatch.delenv(REPRODUCIBLE_NOISE_ENV, raising=False)
    replies = []
    for attempt in range(2):
        overrides = {**TINY, "run-dir": str(tmp_path / str(attempt))}
        cfg = resolve_config(None, overrides)
        context = Context(run_id=1, node_id=1, node_config=dict(NODE), state=RecordDict(), run_config={})
        arrays = ArrayRecord(new_model(cfg, partner_data(cfg, NODE).num_items).state_dict())
        # Execute
        reply = send(make_client_app(overrides), "train", arrays, context, 1)
        replies.append(np.concatenate([a.numpy().ravel() for a in reply.content["arrays"].values()]))
    # Assert: a real partner's two updates differ by their noise; a simulated one repeats itself
    assert np.array_equal(replies[0], replies[1]) == reproducible


def test_secure_gaussian_is_standard_normal():
    # 400k draws against the normal law computed independently (math.erf), and the moments
    z = SecureGaussian().standard_normal(400_001)
    assert z.shape == (400_001,) and z.dtype == torch.float64
    z = z.numpy()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.005
    assert abs(np.mean(z**4) - 3.0) < 0.05  # normal kurtosis (a uniform or a clipped law fails)
    for k in (0.5, 1.0, 2.0, 3.0):
        assert abs(np.mean(np.abs(z) < k) - math.erf(k / math.sqrt(2))) < 0.004, k
    pairs = len(z) // 2 + 1  # [cos outputs, sin outputs]: a Box-Muller pair is z[j], z[pairs + j]
    assert abs(np.corrcoef(z[: pairs - 1], z[pairs:])[0, 1]) < 0.01
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01  # neighbours
    assert len(np.unique(z)) == len(z)  # no value reused


def test_secure_uniforms_cover_zero_to_one_without_zero():
    u = SecureGaussian().uniform(200_000).numpy()
    assert u.min() > 0.0 and u.max() <= 1.0 and abs(u.mean() - 0.5) < 0.003
    assert np.allclose(np.histogram(u, bins=10, range=(0, 1))[0] / len(u), 0.1, atol=0.003)  # flat


def test_secure_noise_has_the_requested_scale_shape_and_type():
    source = SecureGaussian()
    reference = torch.zeros(300, 500, dtype=torch.float32)
    noise = source.noise_like(reference, std=2.5)
    assert noise.shape == reference.shape and noise.dtype == torch.float32
    assert abs(noise.std().item() - 2.5) < 0.03 and abs(noise.mean().item()) < 0.03
    assert not torch.equal(noise, source.noise_like(reference, std=2.5))  # the stream moves on
    assert not torch.equal(noise, SecureGaussian().noise_like(reference, std=2.5))  # fresh key, fresh noise
    assert torch.equal(source.noise_like(reference, std=0.0), reference)
    assert source.noise_like(torch.zeros(0, 4), std=1.0).shape == (0, 4)  # an empty parameter
    flat = noise.ravel().double().numpy()
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01 and len(np.unique(flat)) > 0.99 * len(flat)


def test_secure_noise_sums_four_draws_against_floating_point_attacks(monkeypatch):
    # Opacus' secure_mode defence (Holohan & Braghin 2021): each value is 4 draws summed / 2
    asked = []
    draw = SecureGaussian.standard_normal
    monkeypatch.setattr(SecureGaussian, "standard_normal", lambda self, n: asked.append(n) or draw(self, n))
    noise = SecureGaussian().noise_like(torch.zeros(1000, dtype=torch.float64), std=3.0)
    assert asked == [4000] and abs(noise.std().item() - 3.0) < 0.25


def _dp_optimizer(secure: bool):
    from opacus.optimizers import DPOptimizer

    layer = torch.nn.Linear(200, 100)
    optimizer = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=1.5, max_grad_norm=2.0,
                            expected_batch_size=1)
    if secure:
        draw_noise_securely(optimizer)
    for p in optimizer.params:
        p.summed_grad = torch.zeros_like(p)
    return layer, optimizer


@pytest.mark.parametrize("secure", [False, True])
def test_secure_noise_leaves_torchs_generator_alone_and_keeps_opacus_scale(secure):
    # Opacus draws from torch's global Mersenne Twister; the secure source must not touch it
    layer, optimizer = _dp_optimizer(secure)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    optimizer.add_noise()
    assert torch.equal(torch.get_rng_state(), before) == secure
    noise = layer.weight.grad
    assert abs(noise.std().item() - 1.5 * 2.0) < 0.05  # std = noise_multiplier x max_grad_norm, as accounted


@pytest.mark.parametrize("kind", ["fused", "hooks", "mf"])
@pytest.mark.parametrize("noise_seed", [None, 5])
def test_partners_draw_secure_noise_and_simulations_seeded_noise(small_data, monkeypatch, kind, noise_seed):
    calls = []
    draw = SecureGaussian.noise_like
    monkeypatch.setattr(SecureGaussian, "noise_like", lambda self, *a, **k: calls.append(1) or draw(self, *a, **k))
    _train(small_data, kind, noise_seed)
    assert bool(calls) == (noise_seed is None)


def _poisson_loader(users: int, rate_steps: int):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    plain = DataLoader(TensorDataset(torch.arange(users)), batch_size=max(1, users // rate_steps))
    return DPDataLoader.from_data_loader(plain, generator=torch.Generator().manual_seed(0))


def test_secure_poisson_batches_have_opacus_law_and_leave_torch_alone():
    # Each user in each step independently with probability q = 1/steps, exactly `steps` batches
    users, steps, epochs = 500, 20, 40
    loader = _poisson_loader(users, steps)
    loader.batch_sampler.steps = steps
    rate = loader.batch_sampler.sample_rate
    opacus_stream = loader.batch_sampler.generator.get_state()  # what Opacus' own sampler draws from
    sample_securely(loader)
    assert type(loader.batch_sampler) is secure_sampler_class()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    taken = np.zeros((epochs * steps, users), dtype=bool)
    for e in range(epochs):
        batches = list(loader.batch_sampler)
        assert len(batches) == steps == len(loader.batch_sampler)
        for s, batch in enumerate(batches):
            taken[e * steps + s, batch] = True
    assert torch.equal(torch.get_rng_state(), before)  # no draw from torch's Mersenne Twisters
    assert torch.equal(loader.batch_sampler.generator.get_state(), opacus_stream)
    n = taken.size
    assert abs(taken.mean() - rate) < 6 * math.sqrt(rate * (1 - rate) / n)
    per_user = taken.sum(axis=0)  # Binomial(800, q): mean 40, variance 38
    assert abs(per_user.var() - epochs * steps * rate * (1 - rate)) < 0.25 * epochs * steps * rate
    sizes = taken.sum(axis=1)  # Binomial(500, q)
    assert abs(sizes.var() - users * rate * (1 - rate)) < 0.3 * users * rate
    lag = np.corrcoef(taken[:-1].ravel(), taken[1:].ravel())[0, 1]  # successive steps independent
    assert abs(lag) < 6 / math.sqrt(n)


def test_secure_poisson_sampling_refuses_a_sampler_it_does_not_know():
    from torch.utils.data import DataLoader

    with pytest.raises(TypeError, match="Poisson sampler"):
        sample_securely(DataLoader(list(range(10)), batch_size=2))


@pytest.mark.parametrize("kind", ["fused", "hooks", "mf"])
@pytest.mark.parametrize("noise_seed", [None, 5])
def test_partners_draw_secure_batches_and_simulations_seeded_batches(small_data, monkeypatch, kind, noise_seed):
    batches = []
    draw = secure_sampler_class().__iter__

    def spy(self):  # noqa: ANN001, ANN202
        for batch in draw(self):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(secure_sampler_class(), "__iter__", spy)
    _train(small_data, kind, noise_seed)
    assert bool(batches) == (noise_seed is None)


def test_every_draw_gets_a_fresh_key_and_a_counter_from_zero(monkeypatch):
    # One stream per training call with a random 32-bit block counter start ran out of counter at
    # random (cryptography refuses to wrap it): ~3% per 100 DP steps at 37,060 items
    import common.secure_noise as secure_noise

    made = []
    real = secure_noise.algorithms.ChaCha20
    monkeypatch.setattr(secure_noise.algorithms, "ChaCha20", lambda key, nonce: made.append((key, nonce)) or real(key, nonce))
    source = SecureGaussian()
    source.uniform(10)
    source.noise_like(torch.zeros(100), 1.0)
    assert len(made) == 2 and made[0][0] != made[1][0]  # a new 256-bit key for every call
    assert all(len(key) == 32 and nonce[:4] == bytes(4) for key, nonce in made)  # 2^32 blocks ahead of each


def test_each_noise_value_sums_draws_of_four_different_box_muller_pairs(monkeypatch):
    # standard_normal(m) returns [r cos a for m/2 pairs, then r sin a]: value j must not take both
    # halves of one pair (Opacus sums 4 independent draws)
    monkeypatch.setattr(SecureGaussian, "standard_normal", lambda self, m: torch.arange(m, dtype=torch.float64))
    n = 6
    out = SecureGaussian().noise_like(torch.zeros(n, dtype=torch.float64), std=2.0)  # std / 2 = 1: the raw sums
    pairs = 4 * n // 2
    for j, value in enumerate(out.tolist()):
        members = [4 * j + k for k in range(4)]
        assert value == sum(members)
        assert len({m % pairs for m in members}) == 4  # four different pairs
