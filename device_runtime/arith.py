"""Integer fixed-point arithmetic shared by every kernel (the C runtime implements the same functions).

Semantics follow TFLite's reference kernels (gemmlowp): a real multiplier M in (0, 2^31) is stored as a
Q31 int32 `multiplier` in [2^30, 2^31) and a power-of-two `shift` (positive = left), and applied as
`rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x << max(shift, 0), multiplier), max(-shift, 0))`.
All functions take and return numpy int64 arrays (or scalars) holding int32 values.
"""

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
