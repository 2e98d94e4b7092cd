/* Integer fixed-point arithmetic shared by every kernel: the C form of fedtiny/arith.py.
 *
 * TFLite / gemmlowp semantics: a real multiplier M in (0, 2^31) is a Q31 int32 `multiplier` and a
 * power-of-two `shift` (positive = left). Every function here must match arith.py bit for bit.
 */
#ifndef FEDTINY_ARITH_H
#define FEDTINY_ARITH_H

#include <stdint.h>

/* (a * b * 2 + 2^31) >> 32, rounded half away from zero; the one overflow case saturates. */
static inline int32_t fedtiny_saturating_rounding_doubling_high_mul(int32_t a, int32_t b)
{
    int64_t ab;
    int64_t nudge;
    if (a == INT32_MIN && b == INT32_MIN) {
        return INT32_MAX;
    }
    ab = (int64_t)a * (int64_t)b;
    nudge = ab >= 0 ? (int64_t)(1 << 30) : (int64_t)(1 - (1 << 30));
    /* C's division truncates toward zero, as arith.py spells out. */
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
}

/* x / 2^exponent rounded to nearest, ties away from zero; exponent in [0, 31]. */
static inline int32_t fedtiny_rounding_divide_by_pot(int32_t x, int32_t exponent)
{
    const uint32_t mask = (uint32_t)(((uint64_t)1 << exponent) - 1u);
    const uint32_t remainder = (uint32_t)x & mask;
    const uint32_t threshold = (mask >> 1) + (uint32_t)(x < 0);
    return (x >> exponent) + (int32_t)(remainder > threshold); /* >> of a negative int is arithmetic on gcc */
}

/* Apply a quantized multiplier to x. x is int64 so that sums of two int32 terms saturate as in arith.py
 * (which clips x << left to int32) instead of wrapping. */
static inline int32_t fedtiny_multiply_by_quantized_multiplier(int64_t x, int32_t multiplier, int32_t shift)
{
    const int32_t left = shift > 0 ? shift : 0;
    const int32_t right = shift > 0 ? 0 : -shift;
    int64_t shifted = x * ((int64_t)1 << left);
    if (shifted > INT32_MAX) {
        shifted = INT32_MAX;
    } else if (shifted < INT32_MIN) {
        shifted = INT32_MIN;
    }
    return fedtiny_rounding_divide_by_pot(
        fedtiny_saturating_rounding_doubling_high_mul((int32_t)shifted, multiplier), right);
}

/* int32/int64 accumulator -> int8: fixed-point multiply, add the output zero point, clamp (kernels.requantize). */
static inline int8_t fedtiny_requantize(int64_t acc, int32_t multiplier, int32_t shift, int32_t zero_point,
                                        int32_t act_min, int32_t act_max)
{
    int64_t y = (int64_t)fedtiny_multiply_by_quantized_multiplier(acc, multiplier, shift) + zero_point;
    if (y < act_min) {
        y = act_min;
    }
    if (y > act_max) {
        y = act_max;
    }
    return (int8_t)y;
}


/* ---- training arithmetic (arith.py: narrow_to_int16, stochastic_update, splitmix64) ---------------------- */

#define FEDTINY_GRAD_MAX 32767

/* x / 2^exponent rounded to nearest, ties away from zero, on int64; exponent in [0, 62]. */
static inline int64_t fedtiny_rounding_divide_by_pot64(int64_t x, int32_t exponent)
{
    const uint64_t mask = ((uint64_t)1 << exponent) - 1u;
    const uint64_t remainder = (uint64_t)x & mask;
    const uint64_t threshold = (mask >> 1) + (uint64_t)(x < 0);
    return (x >> exponent) + (int64_t)(remainder > threshold);
}

/* The narrowing shift for a tensor whose largest |acc| is peak: max(0, bitlen(peak) - 15). */
static inline int32_t fedtiny_narrow_shift(uint64_t peak)
{
    int32_t bits = 0;
    while (peak != 0u) {
        bits++;
        peak >>= 1;
    }
    return bits > 15 ? bits - 15 : 0;
}

/* One accumulator -> int16 gradient value with the tensor's narrowing shift. */
static inline int16_t fedtiny_narrow_one(int64_t acc, int32_t shift)
{
    int64_t v = shift ? fedtiny_rounding_divide_by_pot64(acc, shift) : acc;
    if (v > FEDTINY_GRAD_MAX) {
        v = FEDTINY_GRAD_MAX;
    } else if (v < -FEDTINY_GRAD_MAX) {
        v = -FEDTINY_GRAD_MAX;
    }
    return (int16_t)v;
}

static inline uint64_t fedtiny_abs64(int64_t v) { return v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v; }

/* Draw number `index` (1, 2, ...) after `counter` of the SplitMix64 counter stream. */
static inline uint64_t fedtiny_splitmix64(uint64_t counter_plus_index)
{
    uint64_t z = counter_plus_index * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline int64_t fedtiny_clamp_i32_64(int64_t v)
{
    return v > INT32_MAX ? INT32_MAX : (v < INT32_MIN ? INT32_MIN : v);
}

/* delta = total * m * 2^-k with k = 15 - shift - e, rounded stochastically with random bits (k > 0), or
 * clamp(total * m, int32) << -k clamped to int32 (k <= 0). Sums wrap as numpy's int64 would. */
static inline int64_t fedtiny_stochastic_delta(int64_t total, int32_t m, int32_t k, uint64_t bits)
{
    const int64_t product = (int64_t)((uint64_t)total * (uint64_t)(int64_t)m);
    if (k > 0) {
        const int32_t right = k < 62 ? k : 62;
        const uint64_t r = bits & (((uint64_t)1 << right) - 1u);
        return (int64_t)((uint64_t)product + r) >> right;
    }
    return fedtiny_clamp_i32_64(fedtiny_clamp_i32_64(product) * ((int64_t)1 << (-k < 31 ? -k : 31)));
}

#endif /* FEDTINY_ARITH_H */
