"""Noise: right distribution (bounds that cannot flake), float32, secure by default."""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
from scipy import stats  # type: ignore[import-untyped]

from lorad.trainer.noise import NoiseSource, SecureNoise, SeededNoise

N = 2_000_000
STD = 2.5


def _check_moments(x: np.ndarray, std: float) -> None:
    """6-sigma bounds on the mean and variance estimates (false alarm ~2e-9 each)."""
    n = x.size
    x64 = x.astype(np.float64)
    assert abs(x64.mean()) < 6 * std / math.sqrt(n)
    # Var of the sample variance of a normal is 2σ⁴/(n-1).
    assert abs(x64.var(ddof=1) - std**2) < 6 * std**2 * math.sqrt(2 / (n - 1))


def test_seeded_distribution() -> None:
    x = SeededNoise(1234).gaussian(N, STD)
    assert x.dtype == np.float32 and x.shape == (N,)
    _check_moments(x, STD)
    # Fixed seed: the outcome is deterministic; a broken sampler fails it decisively.
    assert stats.kstest(x.astype(np.float64) / STD, "norm").pvalue > 1e-3


def test_secure_distribution() -> None:
    source = SecureNoise()
    assert source.secure is True
    x = source.gaussian(N, STD)
    assert x.dtype == np.float32 and x.shape == (N,)
    _check_moments(x, STD)
    # Unseeded, so a huge margin: under H0 sqrt(n)·D follows Kolmogorov's law and
    # P(sqrt(n)·D > 3.5) ≈ 1e-10; a wrong shape of the distribution still fails it.
    d = stats.kstest(x.astype(np.float64) / STD, "norm").statistic
    assert math.sqrt(N) * d < 3.5


def test_outputs_are_uncorrelated_neighbours() -> None:
    # Neighbouring outputs share a polar pair's index range; they must still be independent.
    x = SeededNoise(7).gaussian(N, 1.0).astype(np.float64)
    r = np.corrcoef(x[:-1], x[1:])[0, 1]
    assert abs(r) < 6 / math.sqrt(N)


def test_low_mantissa_bits_are_uniform() -> None:
    # A porous floating-point sampler (the attacks of Mironov / Jin et al.) shows up as
    # non-uniform low bits of the float32 outputs; ours are a rounding of a dense float64.
    x = SeededNoise(99).gaussian(N, 1.0)
    x = x[np.abs(x) > 2.0**-10]  # skip the tiny values whose float32 grid is finer still
    low = x.view(np.uint32) & 0xF
    counts = np.bincount(low, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_seeded_is_reproducible_and_announces_itself() -> None:
    a = SeededNoise(5).gaussian(1000, 1.0)
    b = SeededNoise(5).gaussian(1000, 1.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, SeededNoise(6).gaussian(1000, 1.0))
    assert SeededNoise(5).secure is False
    assert "not secure" in repr(SeededNoise(5))


def test_secure_sources_differ() -> None:
    assert not np.array_equal(SecureNoise().gaussian(64, 1.0), SecureNoise().gaussian(64, 1.0))


def _draw_in_child(source: NoiseSource, queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(source.gaussian(64, 1.0).tobytes())


def test_forked_child_does_not_replay_parent_noise() -> None:
    source = SecureNoise()
    source.gaussian(10, 1.0)
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    child = ctx.Process(target=_draw_in_child, args=(source, queue))
    child.start()
    child_bytes = queue.get(timeout=30)
    child.join(timeout=30)
    assert child_bytes != source.gaussian(64, 1.0).tobytes()


class _Words(NoiseSource):
    """The real sampler on given bits: PCG64's, or their bitwise complement."""

    secure = False

    def __init__(self, seed: int, complement: bool) -> None:
        super().__init__()
        self._bits = np.random.PCG64(seed)
        self._complement = complement

    def _words(self, count: int) -> np.ndarray:
        words = self._bits.random_raw(count)
        return ~words if self._complement else words


def test_uniforms_are_exactly_symmetric() -> None:
    # Complemented bits mirror every uniform (k -> 2**52-1-k), so the polar method must
    # accept the same pairs and return exactly the negated noise: no bias, no rounding.
    x = _Words(11, complement=False).gaussian64(50_000, 1.0)
    y = _Words(11, complement=True).gaussian64(50_000, 1.0)
    assert np.array_equal(x, -y)


def test_gaussian64_is_the_unrounded_noise() -> None:
    x64 = SeededNoise(3).gaussian64(1000, 1.0)
    x32 = SeededNoise(3).gaussian(1000, 1.0)
    assert x64.dtype == np.float64
    assert np.array_equal(x64.astype(np.float32), x32)


def test_edges() -> None:
    source = SeededNoise(0)
    assert source.gaussian(0, 1.0).shape == (0,)
    assert not source.gaussian(1000, 0.0).any()
    assert source.gaussian(np.int64(3), 1.0).shape == (3,)  # type: ignore[arg-type]
    # Sizes across the chunk boundary are produced whole.
    assert SeededNoise(1).gaussian(40_000, 1.0).shape == (40_000,)


@pytest.mark.parametrize(("n", "std", "word"), [(-1, 1.0, "n"), (1.5, 1.0, "n"), (True, 1.0, "n"),
                                                (3, -1.0, "std"), (3, math.nan, "std"),
                                                (3, math.inf, "std")])
def test_validation(n: int, std: float, word: str) -> None:
    with pytest.raises(ValueError, match=f"^{word} must be"):
        SeededNoise(0).gaussian(n, std)
