"""Integer fixed-point arithmetic shared by every kernel (the C runtime implements the same functions).

Semantics follow TFLite's reference kernels (gemmlowp): a real multiplier M in (0, 2^31) is stored as a
Q31 int32 `multiplier` in [2^30, 2^31) and a power-of-two `shift` (positive = left), and applied as
`rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x << max(shift, 0), multiplier), max(-shift, 0))`.
All functions take and return numpy int64 arrays (or scalars) holding int32 values, but the last section's
(a round's order and reported loss), which work on Python ints.
"""

from functools import lru_cache

import numpy as np

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def saturating_rounding_doubling_high_mul(a, b):
    """(a * b * 2 + 2^31) >> 32 with round-half-away-from-zero, as gemmlowp's SaturatingRoundingDoublingHighMul."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    total = ab + nudge
    # C's int64 division by 2^31 truncates toward zero; an arithmetic shift would floor.
    high = np.where(total >= 0, total >> 31, -((-total) >> 31))
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x, exponent):
    """x / 2^exponent rounded to nearest, ties away from zero (gemmlowp's RoundingDivideByPOT)."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x, multiplier, shift):
    """Apply a quantized real multiplier (multiplier, shift) to int32 values x."""
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(x << left, INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Split a positive real multiplier into (Q31 multiplier, shift), as TFLite's QuantizeMultiplier.

    Computed in float64 with frexp, which is exact and identical on every IEEE machine, so a device that
    re-derives a multiplier gets the same integers as the host.
    """
    if real < 0:
        raise ValueError(f"multiplier must be non-negative, got {real}")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = np.frexp(real)
    q = int(np.floor(float(mantissa) * (1 << 31) + 0.5))  # round half away from zero (mantissa > 0)
    if q == 1 << 31:
        q //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0
    if exponent > 30:
        raise ValueError(f"multiplier {real} is too large for the int32 fixed-point format")
    return q, int(exponent)


# --- training arithmetic -------------------------------------------------------------------------------------
# Gradients are int16 values g with one power-of-two exponent e per tensor: real value = g * 2^e.
# Every sum is an exact integer (int64), so any summation order gives the same bits; see docs/numerics.md.

GRAD_MAX = 32767


def narrow_to_int16(acc) -> tuple[np.ndarray, int]:
    """Exact int64 accumulators -> (int16 values, extra exponent s): the smallest s >= 0 with |round(acc / 2^s)|
    <= 32767 (ties away from zero; a value rounding to 32768 saturates)."""
    acc = np.asarray(acc, dtype=np.int64)
    peak = int(np.abs(acc).max(initial=0))
    shift = max(0, peak.bit_length() - 15)
    out = rounding_divide_by_pot(acc, shift) if shift else acc
    return np.clip(out, -GRAD_MAX, GRAD_MAX).astype(np.int16), shift


def quantize_multiplier_q15(real: float) -> tuple[int, int]:
    """A positive real as (m, shift), m in [2^14, 2^15): real ~= m * 2^(shift - 15). 15 bits keep
    gradient-sum * m inside int64 (see docs/numerics.md); the learning-rate factor needs no more precision."""
    if real <= 0:
        raise ValueError(f"update factor must be positive, got {real}")
    mantissa, exponent = np.frexp(real)
    m = int(np.floor(float(mantissa) * (1 << 15) + 0.5))
    if m == 1 << 15:
        m //= 2
        exponent += 1
    return m, int(exponent)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(counter: int, count: int) -> np.ndarray:
    """Outputs counter+1 ... counter+count of SplitMix64 (Steele, Lea, Flood 2014), a counter-based generator:
    output i = mix(seed + i * golden), so a device and the simulator draw the same bits without shared state."""
    with np.errstate(over="ignore"):
        z = np.uint64(counter) * _GOLDEN + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def update_draws(count: int) -> int:
    """Draws of the splitmix64 stream an update of `count` elements takes: one per two elements."""
    return (count + 1) // 2


def update_bits(counter: int, count: int) -> np.ndarray:
    """32 random bits per element of an update of `count` elements (in C order), from the stream after `counter`:
    element i takes the low (i even) or high (i odd) half of draw i // 2 + 1. Half the draws of one per element,
    and 32 bits are all a rounding needs to stay unbiased to 2^-32 of an LSB (stochastic_update)."""
    draws = splitmix64(counter, update_draws(count))
    halves = np.stack([draws & np.uint64(0xFFFFFFFF), draws >> np.uint64(32)], axis=1).reshape(-1)
    return halves[:count].astype(np.uint32)


def stochastic_update(total, m: np.ndarray, shift, exponent: int, random_bits: np.ndarray) -> np.ndarray:
    """delta = total * m * 2^(shift - 15 + exponent), rounded stochastically with 32 random bits u per element.

    With P = total * m and k = 15 - shift - exponent > 0 (at most 62): s = max(k - 32, 0), t = k - s,
    delta = floor((floor(P / 2^s) + floor(u / 2^(32 - t))) / 2^t): r = the top t bits of u is uniform in [0, 2^t),
    so E[delta] = floor(P / 2^s) / 2^t, which is P / 2^k exactly when k <= 32 and within 2^-32 of an LSB below it
    otherwise; an update smaller than one LSB still moves the weight with the right probability. The two shifts
    keep every step in 32-bit halves on the device (P >> s, then a 32-bit add and the high word).
    k <= 0: delta = clamp(P, int32) << -k, clamped to int32 (no randomness).

    total: exact int64 gradient sums (broadcast against per-channel m, shift); random_bits: uint32, one per element
    (update_bits). Sums wrap as int64 would.
    """
    product = np.asarray(total, dtype=np.int64) * np.asarray(m, dtype=np.int64)
    k = 15 - np.asarray(shift, dtype=np.int64) - exponent
    k = np.broadcast_to(k, product.shape)
    right = np.clip(k, 1, 62)
    s = np.maximum(right - 32, 0)
    t = right - s
    u = random_bits.reshape(product.shape).astype(np.uint64)
    r = (u >> (np.uint64(32) - t.astype(np.uint64))).astype(np.int64)
    with np.errstate(over="ignore"):
        down = ((product >> s) + r) >> t
    up = np.clip(product, -(2**31), 2**31 - 1) << np.clip(-k, 0, 31)
    return np.where(k > 0, down, np.clip(up, -(2**31), 2**31 - 1))


# ---- what a round reports and the order it trains in: exactly reproducible on the device ----------------------

MASK64 = (1 << 64) - 1


def splitmix64_one(counter: int) -> int:
    """Output counter+1 of splitmix64 (one draw, as a Python int): mix((counter + 1) * golden)."""
    z = ((counter + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def uniform_below(counter: int, bound: int) -> tuple[int, int]:
    """An unbiased draw in [0, bound) (1 <= bound < 2^32) from the splitmix64 stream after `counter`, by
    Lemire's multiply-and-reject on the high 32 bits of each draw: x * bound = hi * 2^32 + lo, rejected while
    lo < 2^32 mod bound. Returns (value, the counter after the draws it used)."""
    if not 1 <= bound < 1 << 32:
        raise ValueError(f"bound must be in [1, 2^32), got {bound}")
    threshold = (1 << 32) % bound
    while True:
        product = (splitmix64_one(counter) >> 32) * bound
        counter = (counter + 1) & MASK64
        if product & 0xFFFFFFFF >= threshold:
            return product >> 32, counter


ORDER_DOMAIN = 0x6665646F72646572  # "fedorder": keeps the order's stream apart from the training rounding bits


def order_key(seed: int, round_: int, epoch: int) -> int:
    """The splitmix64 counter an epoch's permutation draws from: H(H(H(ORDER_DOMAIN ^ seed) ^ round) ^ epoch),
    H = splitmix64_one, every input taken mod 2^64."""
    key = splitmix64_one(ORDER_DOMAIN ^ (seed & MASK64))
    key = splitmix64_one(key ^ (round_ & MASK64))
    return splitmix64_one(key ^ (epoch & MASK64))


LOSS_FRACTION_BITS = 24
LN2_Q32 = 2977044472  # round(ln(2) * 2^32)


def cross_entropy_loss_q24(label_q15: int) -> int:
    """-ln(q / 2^15) in Q24 for the label's Q15 probability q (clamped to [1, 2^15]), in integers only, so the
    device computes the same bits: log2(q) = e + log2(m), m = q / 2^e in [1, 2) in Q30, whose fraction bits
    come one by one from squaring m (a bit is 1 when m^2 >= 2, then m^2 / 2 goes on), 24 of them, truncated;
    then (15 - log2 q) * ln 2 rounded to Q24. Below 2e-7 from the exact value (tests/test_ctrain_job.py)."""
    q = min(max(int(label_q15), 1), 1 << 15)
    e = q.bit_length() - 1
    m = q << (30 - e)
    fraction = 0
    for _ in range(LOSS_FRACTION_BITS):
        m = (m * m) >> 30
        fraction <<= 1
        if m >= 1 << 31:
            m >>= 1
            fraction |= 1
    d = (15 << LOSS_FRACTION_BITS) - ((e << LOSS_FRACTION_BITS) | fraction)
    return (d * LN2_Q32 + (1 << 31)) >> 32


@lru_cache(maxsize=1 << 16)  # 2^15 + 1 distinct values after clamping; a training step asks for one each
def cross_entropy_loss(label_q15: int) -> float:
    """The reported cross-entropy loss of a step, -ln(q / 2^15), as cross_entropy_loss_q24 / 2^24 (exact)."""
    return cross_entropy_loss_q24(label_q15) / (1 << LOSS_FRACTION_BITS)


def mean_loss(losses) -> float:
    """A round's loss: the float64 sum of the step losses in step order, divided by their number (0.0 for none);
    a plain loop, not numpy's pairwise sum, so the device's sequential sum gives the same bits."""
    total = 0.0
    for loss in losses:
        total += float(loss)
    return total / len(losses) if len(losses) else 0.0
