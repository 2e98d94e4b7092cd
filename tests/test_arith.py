"""Fixed-point arithmetic against exact big-integer definitions (TFLite / gemmlowp semantics)."""

from fractions import Fraction

import numpy as np
import pytest

from fedtiny.arith import (INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier, quantize_multiplier,
                                  rounding_divide_by_pot, saturating_rounding_doubling_high_mul)


def round_half_away(fr: Fraction) -> int:
    return int(fr + Fraction(1, 2)) if fr >= 0 else -int(-fr + Fraction(1, 2))


def test_doubling_high_mul_matches_exact_rounding():
    rng = np.random.default_rng(0)
    a = rng.integers(INT32_MIN, INT32_MAX, 2000, endpoint=True)
    b = rng.integers(1 << 30, INT32_MAX, 2000, endpoint=True)
    got = saturating_rounding_doubling_high_mul(a, b)
    want = [round_half_away(Fraction(int(x) * int(y), 1 << 31)) for x, y in zip(a, b)]
    assert got.tolist() == want


def test_doubling_high_mul_saturates_the_one_overflow():
    assert saturating_rounding_doubling_high_mul(INT32_MIN, INT32_MIN) == INT32_MAX


@pytest.mark.parametrize("exponent", [0, 1, 2, 7, 20, 31])
def test_rounding_divide_by_pot_rounds_half_away_from_zero(exponent):
    x = np.arange(-3000, 3000) * 997 + 13
    got = rounding_divide_by_pot(x, exponent)
    assert got.tolist() == [round_half_away(Fraction(int(v), 1 << exponent)) for v in x]


def test_ties_go_away_from_zero():
    assert rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 1).tolist() == [3, -3, 3, -3, 4, -4]


@pytest.mark.parametrize("real", [1e-6, 0.0007, 0.25, 0.5, 0.999999999, 1.0, 3.7, 1234.5])
def test_quantize_multiplier_represents_the_real_value(real):
    q, shift = quantize_multiplier(real)
    assert (1 << 30) <= q < (1 << 31)
    assert abs(q * 2.0 ** (shift - 31) - real) <= real * 2**-30


def test_quantize_multiplier_edges():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(1e-12) == (0, 0)  # below 2^-31: the product is always 0
    with pytest.raises(ValueError):
        quantize_multiplier(-1.0)
    with pytest.raises(ValueError):
        quantize_multiplier(2.0**40)


def test_multiply_by_quantized_multiplier_is_close_to_real_product():
    rng = np.random.default_rng(1)
    x = rng.integers(-(1 << 20), 1 << 20, 5000)
    for real in (0.001, 0.37, 1.5):
        q, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier(x, q, shift)
        assert np.abs(got - x * real).max() <= 1.0


def test_left_shift_saturates_instead_of_wrapping():
    # x << left is clamped to int32 before the Q31 multiply (the C runtime does the same), so an overflowing
    # accumulator never wraps to the other sign: INT32_MAX * 4.0 gives INT32_MAX * 0.5, not a negative number.
    q, shift = quantize_multiplier(4.0)
    assert multiply_by_quantized_multiplier(np.array([INT32_MAX, INT32_MIN]), q, shift).tolist() == [2**30, -(2**30)]


def test_stochastic_update_is_unbiased_and_exact_when_whole():
    from fedtiny.arith import stochastic_update, update_bits

    n = 20000
    # S * m * 2^(shift - 15 + e) = 3 * 16384 * 2^(0 - 15 - 2) = 0.375 LSB per element
    delta = stochastic_update(np.full(n, 3), np.array([16384]), np.array([0]), -2, update_bits(7, n))
    assert set(np.unique(delta)) == {0, 1}
    assert abs(delta.mean() - 0.375) < 0.02
    negative = stochastic_update(np.full(n, -3), np.array([16384]), np.array([0]), -2, update_bits(8, n))
    assert abs(negative.mean() + 0.375) < 0.02
    whole = stochastic_update(np.array([5, -5]), np.array([16384]), np.array([1]), 0, update_bits(9, 2))
    assert whole.tolist() == [5, -5]  # 5 * 2^14 * 2^(1 - 15) = 5: no rounding, no randomness


@pytest.mark.parametrize("k", [7, 32, 37, 45])
def test_stochastic_update_rounds_up_with_the_fraction_as_probability(k):
    """Over evenly spaced values of the bits that decide (every one of the 2^t when k < 13), the rounding goes up
    as often as the fraction says: unbiased for k <= 32; for k > 32 the expectation is floor(P / 2^(k - 32)) / 2^32,
    within 2^-32 of an LSB of P / 2^k. The weights' k is 35-45 in the default sensor_cnn plan."""
    from fedtiny.arith import stochastic_update

    t = min(k, 32)
    levels = min(2**t, 4096)  # evenly spaced tops of the bits: exact proportions when 2^t divides into them
    tops = np.arange(levels, dtype=np.uint64) * np.uint64(2**t // levels)
    bits = (tops << np.uint64(32 - t)).astype(np.uint32)
    m, shift, e = 2**14 + 12345, 15 - k, 0  # k = 15 - shift - e
    for total in (3, -3, 987_654_321, -(2**27) + 17):
        p, s = total * m, max(k - 32, 0)
        delta = stochastic_update(np.full(levels, total), np.array([m]), np.array([shift]), e, bits)
        assert set(np.unique(delta)) <= {p >> k, (p >> k) + 1}
        mean = Fraction(int(delta.sum()), levels)
        expected = Fraction(p >> s, 2**t)  # E[delta] over uniform 32-bit draws
        assert mean == expected if levels == 2**t else abs(mean - expected) <= Fraction(1, levels)
        if k <= 32:
            assert expected == Fraction(p, 2**k)  # unbiased
        else:
            assert 0 <= Fraction(p, 2**k) - expected < Fraction(1, 2**32)


def test_update_bits_are_two_halves_of_each_draw():
    from fedtiny.arith import splitmix64, update_bits, update_draws

    draws = splitmix64(41, 3)
    halves = [int(d) & 0xFFFFFFFF for d in draws], [int(d) >> 32 for d in draws]
    assert update_bits(41, 5).tolist() == [halves[0][0], halves[1][0], halves[0][1], halves[1][1], halves[0][2]]
    assert [update_draws(n) for n in (0, 1, 2, 5)] == [0, 1, 1, 3]
    bits = update_bits(3, 200_000)  # the 32-bit values are uniform: each top bit set about half the time
    for b in (31, 16, 0):
        assert abs(((bits >> b) & 1).mean() - 0.5) < 0.005


def test_splitmix64_matches_the_published_sequence():
    from fedtiny.arith import splitmix64

    # SplitMix64 seeded with 0: the reference implementation's first outputs
    assert splitmix64(0, 2).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
