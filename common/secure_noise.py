"""DP-SGD Gaussian noise and Poisson batches from a cryptographically secure generator.

Opacus draws its noise with ``torch.normal`` from torch's Mersenne Twister unless
``secure_mode`` is on, and ``secure_mode`` needs ``torchcsprng``, which is unmaintained and has
no wheel for current torch. A partner's noise is what keeps its users' gradients private, so a
real partner draws it here instead: from a ChaCha20 keystream (``cryptography``) keyed with 256
bits from the operating system, turned into standard normals by Box-Muller in float64.

Like Opacus' ``secure_mode`` each noise value is the sum of four independent N(0, std^2) draws
divided by two (still N(0, std^2)), which defeats the floating-point attacks on Gaussian
samplers (Holohan & Braghin 2021, section 5.1; the attack on Opacus in arXiv:2112.05307).

The Poisson sampler's draws come from the same kind of stream (:func:`sample_securely`): the
amplification by subsampling in the accountant assumes nobody knows which users a step used.

The distributions, and so the privacy accounting, are the ones Opacus assumes: N(0, (sigma C)^2)
per coordinate, each user in each step independently with probability q. Only the source of
randomness changes: nothing about it can be predicted from torch's seed, the run config or
earlier draws. (Dropout masks stay torch's: DP-SGD's guarantee holds for any per-user gradient,
randomised or not, so they need no secrecy.)
"""

from __future__ import annotations

import functools
import math
import os
import types
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the server imports this module for central DP and never loads Opacus
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_DRAWS = 4  # as Opacus' secure_mode: sum of 4 draws / 2 has the variance of one draw
_MANTISSA = (1 << 52) - 1
_ONE = 0x3FF0000000000000  # the bits of float64 1.0


class SecureGaussian:
    """Standard normal samples from ChaCha20 keystreams, one per :meth:`uniform` call, each under a
    fresh 256-bit key from ``os.urandom`` with its 32-bit block counter starting at 0.

    Why a key per call: the counter covers 2^32 blocks (256 GiB) and ``cryptography`` refuses to
    wrap it. One stream for a whole training call, with a random counter start (the first 4 bytes
    of a random 16-byte nonce), failed with probability bytes drawn / 2^38: about 3% per 100 DP
    steps at 37,060 items. Keys are never reused, so the all-zero nonce is safe.
    """

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 uniforms in (0, 1]: 52 random mantissa bits under the exponent of 1.0
        give [1, 2); two minus that keeps log() finite. In place in one buffer (the keystream is
        written into it and its bits become the floats where they lie): a large catalogue draws
        millions per step."""
        buf = bytearray(8 * n)
        stream = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
        stream.update_into(buf, buf)  # zeros XOR keystream = the keystream
        bits = torch.frombuffer(buf, dtype=torch.int64)
        bits.bitwise_right_shift_(12).bitwise_and_(_MANTISSA).bitwise_or_(_ONE)
        return bits.view(torch.float64).neg_().add_(2.0)

    def standard_normal(self, n: int) -> torch.Tensor:
        """``n`` independent N(0, 1) float64 values (Box-Muller: both outputs of each pair used),
        computed in the uniforms' own buffer: [r cos(a) for each pair, then r sin(a) for each pair]."""
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = u[:pairs].log_().mul_(-2.0).sqrt_()
        angle = u[pairs:].mul_(2.0 * math.pi)
        cosine = torch.cos(angle)
        angle.sin_().mul_(radius)
        radius.mul_(cosine)
        return u[:n]

    def noise_like(self, reference: torch.Tensor, std: float) -> torch.Tensor:
        """N(0, std^2) noise of ``reference``'s shape, dtype and device (sum of 4 draws / 2)."""
        n = reference.numel()
        if std == 0 or n == 0:  # frombuffer refuses an empty buffer
            return torch.zeros_like(reference)
        # Each value sums 4 consecutive normals: 4 different Box-Muller pairs (both halves of a pair
        # are in different values), as Opacus sums 4 independent draws
        total = self.standard_normal(_DRAWS * n).view(n, _DRAWS).sum(dim=1)
        noise = total.mul_(std / math.sqrt(_DRAWS)).view(reference.shape)
        return noise.to(device=reference.device, dtype=reference.dtype)


def draw_noise_securely(optimizer: DPOptimizer) -> None:
    """Make an Opacus ``DPOptimizer`` add its Gaussian noise from :class:`SecureGaussian`.

    Replaces only the noise source of ``add_noise``; clipping, the noise scale
    (``noise_multiplier * max_grad_norm``), averaging and the accountant hook stay Opacus'.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    source = SecureGaussian()

    def add_noise(self) -> None:  # noqa: ANN001 - mirrors DPOptimizer.add_noise (opacus 1.6)
        multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = source.noise_like(p.summed_grad, multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = types.MethodType(add_noise, optimizer)


@functools.cache
def secure_sampler_class() -> type:
    """Opacus' Poisson batch sampler (``steps`` batches, each user in with probability
    ``sample_rate``) drawing its uniforms from :class:`SecureGaussian`'s stream. Built on first use:
    the server imports this module for central DP and never needs Opacus."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class SecurePoissonSampler(UniformWithReplacementSampler):
        _source: SecureGaussian

        def __iter__(self):  # noqa: ANN204 - as UniformWithReplacementSampler.__iter__ (opacus 1.6)
            for _ in range(self.steps):
                # uniforms in (0, 1] with 52 random bits: P(u < q) = q up to 2^-52
                yield (self._source.uniform(self.num_samples) < self.sample_rate).nonzero().reshape(-1).tolist()

    return SecurePoissonSampler


def draw_securely(optimizer: DPOptimizer, loader: DPDataLoader) -> None:
    """A real partner's DP-SGD: noise (:func:`draw_noise_securely`) and Poisson batches
    (:func:`sample_securely`) from the CSPRNG; everything else stays Opacus'."""
    draw_noise_securely(optimizer)
    sample_securely(loader)


def sample_securely(loader: DPDataLoader) -> None:
    """Make an Opacus Poisson ``loader`` draw each step's users from a CSPRNG (not torch's
    Mersenne Twister). Rate, step count and batch semantics stay the sampler's own.

    The sampler's class is swapped in place because a ``DataLoader`` refuses a new
    ``batch_sampler`` once built.
    """
    sampler = loader.batch_sampler
    secure = secure_sampler_class()
    if type(sampler) is not secure.__base__:
        raise TypeError(f"expected Opacus' Poisson sampler, got {type(sampler).__name__}")
    sampler.__class__ = secure
    sampler._source = SecureGaussian()
