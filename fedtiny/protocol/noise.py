"""A device's differential-privacy noise: discrete Gaussian integers added to its clipped delta (the uplink
pipeline's noise step, update.uplink), in integer arithmetic only so that a C node can draw the same bits.

The noise is exact: the discrete Gaussian N_Z(0, s) (P[x] proportional to exp(-x^2 / 2s), s = sigma^2 an integer
in LSB^2) is sampled by rejection from a discrete Laplace, with every Bernoulli(exp(-n/d)) decided on uniform
integers (Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020, Algorithms
1-3). Integers added to integer deltas keep the sum of many devices' updates exact (what secure aggregation in
Z/2^k needs), and a shift by an integer delta is what the discrete Gaussian's privacy guarantee is about.

Randomness: 64-bit little-endian words of a ChaCha20 keystream (RFC 8439; the node has it in Monocypher), keyed
by a 32-byte noise key the device keeps secret, nonce = the coordinator's run (u32 LE) + the round (u64 LE),
block counter from 0: a round is noised once per run (a retrained round after a reboot draws the same noise for
the same delta), and a new run never reuses a round's noise on another delta. Noise
whose generator someone else can predict protects nothing, so this is a stream cipher, not the SplitMix64 stream
the training order uses (SplitMix64 can be run backwards from its outputs).

Per trainable buffer row (axis 0) the noise has standard deviation `sigma` in real units: in LSB of that row,
s = ceil((sigma / scale)^2) (rounded up: never less noise than asked). Buffers in the plan's order, rows in order,
elements in C order, one discrete Gaussian each. The noised value is then clamped to what the DELTA may carry
(weights [-255, 255], biases int32): a post-processing step, which costs no privacy.

In C: fedtiny_wire_discrete_gaussian and fedtiny_wire_row_sigma2 (device_runtime/c/fedtiny_wire.c), the same
draws from the same words in 128-bit integer arithmetic (uniform bounds (|y| t - s)^2 and 2 s t^2 k reach 2^90
for s near MAX_SIGMA2), checked against this module by tests/test_privacy.py; the C node's uplink adds them from the same ChaCha20 words
(fedtiny_noise.c, Monocypher's crypto_chacha20_ietf with this key and nonce; tests/test_cnode_conformance.py).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

NOISE_KEY_MESSAGE = b"fedtiny dp noise key v1"
WEIGHT_DELTA_LIMIT = 255  # what a decoder accepts for an int8 weight's delta (requantize.rebuild)
# The largest sigma^2 in LSB^2 (sigma 2^20 LSB): (|y| t - s)^2 and 2 s t^2 then stay within the 128 bits the C
# node computes them in (fedtiny_wire_discrete_gaussian), for any |y| below 2^31 (beyond: probability exp(-2^10)).
MAX_SIGMA2 = 1 << 40


def noise_key(identity_secret: bytes) -> bytes:
    """A device's 32-byte noise key from its 64-byte identity secret: keyed BLAKE2b of a fixed message
    (Monocypher's crypto_blake2b_keyed on the node). Secret as the identity is, and the same after a reboot."""
    return hashlib.blake2b(NOISE_KEY_MESSAGE, key=identity_secret[:64], digest_size=32).digest()


class NoiseStream:
    """64-bit words of the ChaCha20 keystream for (key, run, round)."""

    BLOCK = 4096  # bytes of keystream made at a time

    def __init__(self, key: bytes, run: int, round_: int) -> None:
        if len(key) != 32:
            raise ValueError("a noise key is 32 bytes")
        # cryptography's 16-byte ChaCha20 nonce: the block counter (u32 LE) then RFC 8439's 12-byte nonce
        nonce = (0).to_bytes(4, "little") + (run & 0xFFFFFFFF).to_bytes(4, "little") + \
            (round_ & (2**64 - 1)).to_bytes(8, "little")
        self._keystream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._words: list[int] = []
        self.used = 0  # words drawn so far

    def word(self) -> int:
        if not self._words:
            block = self._keystream.update(bytes(self.BLOCK))
            self._words = np.frombuffer(block, "<u8").tolist()[::-1]
        self.used += 1
        return self._words.pop()


def uniform_below(stream: NoiseStream, bound: int) -> int:
    """A uniform integer in [0, bound) (bound >= 1, any width): ceil(bits / 64) words, the first the least
    significant, masked to the bound's bit length, rejected while not below bound."""
    if bound < 1:
        raise ValueError(f"bound {bound} is below 1")
    bits = (bound - 1).bit_length()
    if bits == 0:
        return 0
    while True:
        x = 0
        for i in range((bits + 63) // 64):
            x |= stream.word() << (64 * i)
        x &= (1 << bits) - 1
        if x < bound:
            return x


def bernoulli_exp_fraction(stream: NoiseStream, n: int, d: int) -> bool:
    """True with probability exp(-n/d), 0 <= n <= d (CKS Algorithm 1): K = 1, 2, ... while a Bernoulli(n / (d K))
    comes up true; true when the K it stopped at is odd."""
    k = 1
    while uniform_below(stream, d * k) < n:
        k += 1
    return k % 2 == 1


def bernoulli_exp(stream: NoiseStream, n: int, d: int) -> bool:
    """True with probability exp(-n/d) for any n >= 0, d >= 1: exp(-1) once per whole unit, then the fraction."""
    while n > d:
        if not bernoulli_exp_fraction(stream, 1, 1):
            return False
        n -= d
    return bernoulli_exp_fraction(stream, n, d)


def discrete_laplace(stream: NoiseStream, t: int) -> int:
    """P[x] proportional to exp(-|x| / t), t >= 1 an integer (CKS Algorithm 2 with s = 1)."""
    while True:
        u = uniform_below(stream, t)
        if not bernoulli_exp(stream, u, t):
            continue
        v = 0
        while bernoulli_exp(stream, 1, 1):
            v += 1
        x = u + t * v
        negative = uniform_below(stream, 2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def discrete_gaussian(stream: NoiseStream, sigma2: int) -> int:
    """P[x] proportional to exp(-x^2 / (2 sigma2)), sigma2 >= 1 an integer (CKS Algorithm 3): a discrete Laplace
    of scale t = floor(sqrt(sigma2)) + 1, kept with probability exp(-(|y| - sigma2/t)^2 / (2 sigma2))
    = exp(-(|y| t - sigma2)^2 / (2 sigma2 t^2))."""
    if not 1 <= sigma2 <= MAX_SIGMA2:
        raise ValueError(f"sigma^2 {sigma2} LSB^2 is not in [1, 2^40]")
    t = math.isqrt(sigma2) + 1
    while True:
        y = discrete_laplace(stream, t)
        if bernoulli_exp(stream, (abs(y) * t - sigma2) ** 2, 2 * sigma2 * t * t):
            return y


def row_sigma2(sigma: float, scale: float) -> int:
    """s = ceil((sigma / scale)^2) in LSB^2 (at least 1): float64 division and product, exact in C too.
    ValueError beyond MAX_SIGMA2 (noise that large drowns the row anyway)."""
    s = sigma / scale
    if not s * s <= MAX_SIGMA2:
        raise ValueError(f"noise sigma {sigma} is {s:.3g} LSB of a row of scale {scale:.3g}: more than 2^20 LSB")
    return max(1, math.ceil(s * s))


def add_noise(delta: dict[str, np.ndarray], scales: dict[str, np.ndarray], sigma: float, stream: NoiseStream,
              limits: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """delta plus discrete Gaussian noise of standard deviation `sigma` (real units) per element, each value then
    clamped to what a DELTA carries; unchanged if sigma is 0. Buffers in `scales` order (the plan's).

    limits (secure aggregation: secagg.value_bounds): clamp buffer b's values to [-limits[b], limits[b]] instead,
    and return int64. Those bounds lie NOISE_TAIL standard deviations beyond the clipped delta, so the clamp
    almost never acts, and the survivors' sum is then a sum of discrete Gaussians (distributed DP's accounting)
    rather than of values cut at a DELTA's +-255 (fedtiny_wire_noise_delta in C)."""
    if not sigma > 0:
        return delta
    out = {}
    for name, row_scale in scales.items():
        d = np.asarray(delta[name])
        rows = d.reshape(len(row_scale), -1)
        noised = np.empty(rows.shape, np.int64)
        for r, scale in enumerate(np.asarray(row_scale, np.float64).tolist()):
            s = row_sigma2(sigma, scale)
            noised[r] = [v + discrete_gaussian(stream, s) for v in rows[r].tolist()]
        if limits is not None:
            out[name] = np.clip(noised, -limits[name], limits[name]).reshape(d.shape)
            continue
        limit = WEIGHT_DELTA_LIMIT if d.dtype == np.int16 else np.iinfo(d.dtype).max
        out[name] = np.clip(noised, -limit, limit).astype(d.dtype).reshape(d.shape)
    return out
