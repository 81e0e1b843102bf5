"""Gaussian noise for DP-SGD: N(0, std²) per coordinate, std = σ·C, made on the host.

Threats and the defence chosen
------------------------------
1. Predictable randomness. The default :class:`SecureNoise` draws its bits from the
   ChaCha20 keystream (RFC 7539, OpenSSL via ``cryptography``) under a fresh 256-bit key
   from the kernel (``os.urandom``); the key is replaced after 2**30 bytes and in a
   forked child (a child must never replay its parent's noise). ChaCha20 rather than
   AES-CTR: it is constant-time in software, so it is both fast and safe on Arm boards
   without AES instructions (Raspberry Pi 4), and it is what the kernel's own CSPRNG uses.
   Measured on a 2-core x86_64 (AMD EPYC, AVX2) VM: ChaCha20 2.4 GB/s, AES-CTR 5.4 GB/s;
   the sampler below costs more than either.
2. Floating-point attacks on the sampler (Mironov 2012; Jin et al. 2022, "Are We There
   Yet?"; Holohan & Braghin 2021, "Secure Random Sampling in Differential Privacy"): a
   sampler whose outputs form a sparse, irregular set of floats lets an observer of
   ``x + noise`` test which ``x`` could have produced it, or invert the sampler. Defence:
   - every uniform carries 52 random bits, built exactly in float64 as the odd multiples
     of 2**-52 in (-1, 1), so 0 and ±1 never occur, the set is symmetric, and nothing is
     rounded;
   - standard normals come from Marsaglia's polar method in float64 (no trigonometric
     functions; its rejections are independent of the accepted values, so the running
     time says nothing about the noise — unlike the discrete samplers Jin et al. time);
   - each output is the Holohan–Braghin sum of two independent normals from two
     different polar pairs, scaled by std/√2 in float64, which makes inverting the
     sampler from one output a 2**52-candidate search per coordinate;
   - the result is rounded to float32 once, at the end. Near any float32 value the
     float64 sums are ~2**29 times denser than float32 itself, so every float32 value
     the ideal Gaussian can produce is produced with very nearly the ideal probability:
     the float32 output is a faithful discretisation of N(0, std²), which is what
     defeats the reachable-set test of the floating-point attacks.
   A discrete Gaussian (Canonne, Kamath, Steinke 2020) was not chosen: its exact
   samplers loop a data-dependent number of times (the timing channel of Jin et al.),
   are far slower in numpy, and buy exactness only if the gradient sum is put on the
   same integer grid, which the float32 training graph does not do.
   What remains: the graph adds float32 noise to a float32 gradient sum, and where the
   noise binade is coarser than the sum's (cancellation) the low bits of the sum can
   show through that one addition. :meth:`NoiseSource.gaussian64` returns the noise
   before its final rounding for a graph that adds in float64 and rounds once.
3. Speed. The trainer asks for noise every step for every LoRA parameter. Work is done in
   chunks that stay in cache, into reused buffers: ~30–37 M float32 samples/s on one
   core of the VM above (``python -m lorad.trainer.noise`` prints the figure).

:class:`SeededNoise` uses the same sampler on numpy's PCG64 bits, for reproducible tests
only; it says so with ``secure = False`` and the config layer refuses it in production.
"""

from __future__ import annotations

import math
import os
import threading
import time
from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["NoiseSource", "SecureNoise", "SeededNoise"]

# Outputs per chunk: a few float64 work arrays of this size stay in a 512 KiB L2 cache.
_CHUNK = 1 << 14
# Polar attempts per chunk: acceptance is π/4, and 12 standard deviations of the
# binomial count of accepted pairs make a second round (correct, only slower) rare.
_ACCEPT = math.pi / 4


def _attempts(need: int) -> int:
    return int(need / _ACCEPT + 12 * math.sqrt(need * (1 - _ACCEPT)) / _ACCEPT) + 16


_ATTEMPTS = _attempts(_CHUNK + 1)
_REKEY_BYTES = 1 << 30


def _check_n(n: int) -> int:
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0):
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return int(n)


class NoiseSource(ABC):
    """Gaussian noise N(0, std²) as float32; see the module docstring for the defence."""

    #: False for sources that are predictable (tests); production config refuses them.
    secure: bool

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bits64 = np.empty(2 * _ATTEMPTS, dtype=np.uint64)
        self._s = np.empty(_ATTEMPTS)
        self._tmp = np.empty(_ATTEMPTS)
        self._sum = np.empty(_CHUNK)

    def gaussian(self, n: int, std: float) -> npt.NDArray[np.float32]:
        """``n`` independent N(0, std²) samples, rounded to float32 from float64."""
        out = np.empty(_check_n(n), dtype=np.float32)
        self._fill(out, std)
        return out

    def gaussian64(self, n: int, std: float) -> npt.NDArray[np.float64]:
        """The same samples before their final rounding, for an addition done in float64."""
        out = np.empty(_check_n(n), dtype=np.float64)
        self._fill(out, std)
        return out

    def laplace64(self, n: int, scale: float) -> npt.NDArray[np.float64]:
        """``n`` independent Laplace(0, scale) samples: scale·ln(u₁/u₂) for two uniforms in
        (0, 1) made as above (odd multiples of 2**-53, so neither is 0). For the scheduler's
        start test, which releases one comparison, never a noisy value."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        count = _check_n(n)
        with self._lock:
            words = self._words(2 * count)
        u = ((words >> np.uint64(11)).astype(np.float64) * 2.0 + 1.0) * 2.0**-54
        return float(scale) * np.log(u[:count] / u[count:])

    def _fill(self, out: npt.NDArray[np.float32] | npt.NDArray[np.float64], std: float) -> None:
        if not (isinstance(std, (int, float, np.floating)) and math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        scale = float(std) / math.sqrt(2.0)
        n = out.size
        with self._lock:
            for start in range(0, n, _CHUNK):
                k = min(_CHUNK, n - start)
                zx, zy = self._normal_pairs(k + 1)
                # Cross pairs: x-normal of pair i plus y-normal of pair i+1, so the two
                # summands never come from one polar draw (whose sum is a single polar
                # sample in disguise). All 2(k+1) normals are independent.
                chunk = self._sum[:k]
                np.add(zx[:k], zy[1 : k + 1], out=chunk)
                chunk *= scale
                out[start : start + k] = chunk  # the one rounding, when out is float32

    def _normal_pairs(self, need: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        xs: list[npt.NDArray[np.float64]] = []
        ys: list[npt.NDArray[np.float64]] = []
        have = 0
        while have < need:
            x, y = self._polar_round(min(_attempts(need - have), _ATTEMPTS))
            xs.append(x)
            ys.append(y)
            have += x.size
        if len(xs) == 1:
            return xs[0][:need], ys[0][:need]
        return np.concatenate(xs)[:need], np.concatenate(ys)[:need]

    def _polar_round(
        self, attempts: int
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """One vectorised round of Marsaglia's polar method over ``attempts`` pairs."""
        bits = self._bits64[: 2 * attempts]
        # 52 random mantissa bits under the exponent of 1.0 give v = 1 + k·2**-52 in [1, 2)
        # without an int→float conversion. Each step below is exact in float64 and ends at
        # u = (2k+1)·2**-52 - 1: symmetric (k ↔ 2**52-1-k negates u), never 0 or ±1.
        np.right_shift(self._words(2 * attempts), np.uint64(12), out=bits)
        np.bitwise_or(bits, np.uint64(0x3FF0000000000000), out=bits)
        u = bits.view(np.float64)
        u -= 1.5
        u += 2.0**-53
        u *= 2.0
        x, y = u[:attempts], u[attempts:]
        s, tmp = self._s[:attempts], self._tmp[:attempts]
        np.multiply(x, x, out=s)
        np.multiply(y, y, out=tmp)
        s += tmp
        keep = np.flatnonzero(s < 1.0)
        sk = s.take(keep)
        # factor = sqrt(-2 ln s / s); s > 2**-104 here, so the factor is finite.
        factor = np.log(sk)
        factor *= -2.0
        factor /= sk
        np.sqrt(factor, out=factor)
        zx = x.take(keep)
        zx *= factor
        zy = y.take(keep)
        zy *= factor
        return zx, zy

    @abstractmethod
    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        """``count`` uniformly random 64-bit words."""


class SecureNoise(NoiseSource):
    """The production source: ChaCha20 keystream under a kernel-random key."""

    secure = True

    def __init__(self) -> None:
        super().__init__()
        self._zeros = bytes(16 * _ATTEMPTS)
        self._buf = bytearray(16 * _ATTEMPTS)
        self._rekey()

    def _rekey(self) -> None:
        # A fresh random key makes a fixed nonce safe: no (key, nonce) pair ever repeats.
        key = os.urandom(32)
        self._encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
        self._pid = os.getpid()
        self._used = 0

    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        nbytes = 8 * count
        if self._pid != os.getpid() or self._used + nbytes > _REKEY_BYTES:
            self._rekey()
        self._used += nbytes
        # Keystream XOR zeros is the keystream.
        self._encryptor.update_into(memoryview(self._zeros)[:nbytes], self._buf)
        return np.frombuffer(self._buf, dtype=np.uint64, count=count)

    def __repr__(self) -> str:
        return "SecureNoise(chacha20, os.urandom key)"


class SeededNoise(NoiseSource):
    """Reproducible noise for tests: the same sampler on PCG64 bits. Never for production."""

    secure = False

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self._bits = np.random.PCG64(seed)

    def _words(self, count: int) -> npt.NDArray[np.uint64]:
        return self._bits.random_raw(count)

    def __repr__(self) -> str:
        return f"SeededNoise(seed={self.seed}) [predictable: tests only, not secure]"


def _measure(seconds: float = 2.0) -> float:
    """float32 samples per second of SecureNoise on this core."""
    source = SecureNoise()
    n = 1 << 22
    source.gaussian(n, 1.0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        source.gaussian(n, 1.0)
        done += n
    return done / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"SecureNoise: {_measure() / 1e6:.1f} M float32 samples/s")
