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

/* fedtiny_multiply_by_quantized_multiplier(x, multiplier, shift) for an int32 x and a multiplier other than
 * INT32_MIN (the quantizer never makes it), shift in [-31, 31]: the same integer for every such input, in one
 * 64-bit multiply-add (SMLAL on the M4) and three shifts and adds instead of two roundings. For right = -shift
 * >= 2, with p = x m and X = floor((p + 2^30) / 2^31) the doubling high multiply:
 *   Y = rounding_divide_by_pot(X, right) = floor((X + 2^(right-1) - [X < 0]) / 2^right)   (ties away from zero)
 *     = floor((S + 2^(30+right)) / 2^(31+right)),  S = p + 2^30 - [X < 0] 2^31   (floor(floor(a/b)/d) = floor(a/bd))
 *     = (T + 1) >> 1,  T = floor(S / 2^(30+right)) = (S >> 32) >> (right - 2)
 * and [X < 0] may be read as [x ^ m < 0]: X < 0 implies p < 0, X > 0 implies p > 0, and for X = 0 either choice
 * gives Y = 0. |S| < 2^62, so T + 1 cannot overflow. right = 1 is the high word of S + 2^31, right = 0 is X;
 * a left shift (a real multiplier of 1 or more) takes the reference's steps. tests/test_fast_forward.py checks it against the reference on the edges of the
 * int32 range at every shift, on the host and the M4. */
static inline int32_t fedtiny_multiply_by_quantized_multiplier_i32(int32_t x, int32_t multiplier, int32_t shift)
{
    if (shift <= -2) {
        const int32_t addend = (int32_t)(0x40000000u - ((uint32_t)(x ^ multiplier) & 0x80000000u)); /* +-2^30 */
        const int64_t sum = (int64_t)x * multiplier + addend;
        return (((int32_t)(sum >> 32) >> (-shift - 2)) + 1) >> 1;
    }
    if (shift == -1) { /* Y = floor((S + 2^31) / 2^32): the high word, the addend 2^30 + (1 - [x ^ m < 0]) 2^31 */
        const uint32_t addend = 0xC0000000u - ((uint32_t)(x ^ multiplier) & 0x80000000u);
        return (int32_t)(((int64_t)x * multiplier + (int64_t)addend) >> 32);
    }
    if (shift == 0) { /* X itself, which fits int32 when m != INT32_MIN */
        return (int32_t)(((int64_t)x * multiplier + ((int64_t)1 << 30)) >> 31);
    }
    return fedtiny_multiply_by_quantized_multiplier((int64_t)x, multiplier, shift);
}

/* The fast kernels' requantization (fedtiny_kernels_fwd_fast.c) in four instructions on the M4: for an int32 x
 * with |x| < 2^29, a multiplier m in [0, 2^31), r = -shift in [1, 22] and an output zero point zp in [-128, 127],
 *   fedtiny_multiply_by_quantized_multiplier(x, m, -r) + zp = (SMMLAR(2x, m, a + [x < 0 ? -1 : 0])) >> r,
 *   a = fedtiny_requant_addend(r, zp) = 2^(r-1) + zp 2^r,
 * where SMMLAR(u, v, w) = floor((w 2^32 + u v + 2^31) / 2^32). Why: the doubling high multiply is
 * X = floor((p + 2^30) / 2^31) for p = x m of either sign (truncating (p + 1 - 2^30) / 2^31 toward zero is that
 * floor when p < 0), and the rounding divide by 2^r (ties away from zero) of X is, as in the derivation of
 * fedtiny_multiply_by_quantized_multiplier_i32, floor((p + 2^30 - [x < 0] 2^31 + 2^(30+r)) / 2^(31+r)); with
 * R = floor((2p + 2^31) / 2^32) = SMMLAR(2x, m, 0) that is floor((R + [x < 0 ? -1 : 0] + 2^(r-1)) / 2^r), and
 * adding zp 2^r inside the floor adds zp. Bounds: |R| <= 2^29 + 1 and |a| < 2^29 + 2^21, so nothing wraps.
 * The kernels pass 2x directly (their sums are of doubled terms); tests/test_fast_forward.py checks it against
 * the reference on the edges of its range at every shift, on the host and the M4. */
static inline int32_t fedtiny_requant_addend(int32_t r, int32_t zero_point)
{
    return (int32_t)(((uint32_t)1 << (r - 1)) + (uint32_t)zero_point * ((uint32_t)1 << r));
}

static inline int32_t fedtiny_requantize_doubled(int32_t x2, int32_t multiplier, int32_t r, int32_t addend)
{
    const int32_t a = addend + (x2 >> 31);
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
    int32_t high;
    __asm__("smmlar %0, %1, %2, %3" : "=r"(high) : "r"(x2), "r"(multiplier), "r"(a));
#else
    const int32_t high = (int32_t)((int64_t)(((uint64_t)(uint32_t)a << 32) + (uint64_t)((int64_t)x2 * multiplier)
                                             + 0x80000000u) >> 32);
#endif
    return high >> r;
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


/* ---- training arithmetic (arith.py: narrow_to_int16, stochastic_update, update_bits, splitmix64) ---------- */

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

/* The 32 rounding bits of element `index` of an update whose draws follow `counter` (arith.update_bits): the low
 * (even index) or high (odd index) half of draw index / 2 + 1. */
static inline uint32_t fedtiny_update_bits(uint64_t counter, uint32_t index)
{
    const uint64_t draw = fedtiny_splitmix64(counter + 1u + (index >> 1));
    return (index & 1u) ? (uint32_t)(draw >> 32) : (uint32_t)draw;
}

/* Draws an update of n elements takes from the counter (arith.update_draws): one per two elements. */
static inline uint64_t fedtiny_update_draws(uint32_t n) { return ((uint64_t)n + 1u) >> 1; }

/* delta = total * m * 2^-k with k = 15 - shift - e (arith.stochastic_update). k > 0: with P = total * m, k at
 * most 62, s = max(k - 32, 0) and t = k - s, delta = floor((floor(P / 2^s) + (bits >> (32 - t))) / 2^t), rounded
 * stochastically by the top t of the 32 random bits. k <= 0: clamp(P, int32) << -k clamped to int32. Sums wrap as
 * numpy's int64 would. */
static inline int64_t fedtiny_stochastic_delta(int64_t total, int32_t m, int32_t k, uint32_t bits)
{
    const int64_t product = (int64_t)((uint64_t)total * (uint64_t)(int64_t)m);
    if (k > 0) {
        const int32_t right = k < 62 ? k : 62;
        const int32_t s = right > 32 ? right - 32 : 0, t = right - s;
        return (int64_t)((uint64_t)(product >> s) + (uint64_t)(bits >> (32 - t))) >> t;
    }
    return fedtiny_clamp_i32_64(fedtiny_clamp_i32_64(product) * ((int64_t)1 << (-k < 31 ? -k : 31)));
}

/* ---- what a round reports and the order it trains in (arith.py: uniform_below, order_key,
 * cross_entropy_loss_q24) ------------------------------------------------------------------------------------ */

/* An unbiased draw in [0, bound) (1 <= bound < 2^32) from the splitmix64 stream after *counter (advanced past
 * the draws used): Lemire's multiply-and-reject on the high 32 bits of each draw. */
static inline uint32_t fedtiny_uniform_below(uint64_t *counter, uint32_t bound)
{
    const uint32_t threshold = (uint32_t)(0u - bound) % bound; /* 2^32 mod bound */
    for (;;) {
        const uint64_t product = (fedtiny_splitmix64(*counter + 1u) >> 32) * (uint64_t)bound;
        *counter += 1u;
        if ((uint32_t)product >= threshold) {
            return (uint32_t)(product >> 32);
        }
    }
}

#define FEDTINY_ORDER_DOMAIN 0x6665646F72646572ull /* "fedorder" */

/* The splitmix64 counter an epoch's permutation draws from: H(H(H(DOMAIN ^ seed) ^ round) ^ epoch), with
 * H(x) = fedtiny_splitmix64(x + 1), the first draw after counter x. */
static inline uint64_t fedtiny_order_key(uint64_t seed, uint64_t round, uint64_t epoch)
{
    uint64_t key = fedtiny_splitmix64((FEDTINY_ORDER_DOMAIN ^ seed) + 1u);
    key = fedtiny_splitmix64((key ^ round) + 1u);
    return fedtiny_splitmix64((key ^ epoch) + 1u);
}

#define FEDTINY_LOSS_FRACTION_BITS 24
#define FEDTINY_LN2_Q32 2977044472ull /* round(ln(2) * 2^32) */

/* -ln(q / 2^15) in Q24 for the label's Q15 probability q (clamped to [1, 2^15]), integers only: log2(q) =
 * e + log2(m) with m = q / 2^e in [1, 2) in Q30, whose fraction bits come from squaring m (24 bits, truncated),
 * then (15 - log2 q) * ln 2 rounded to Q24. The loss is this / 2^24, exact in a double. */
static inline uint32_t fedtiny_cross_entropy_loss_q24(int32_t label_q15)
{
    const uint32_t q = label_q15 < 1 ? 1u : (label_q15 > 32768 ? 32768u : (uint32_t)label_q15);
    uint32_t e = 0, fraction = 0, i;
    uint64_t m, d;
    while ((q >> (e + 1u)) != 0u) {
        e++;
    }
    m = (uint64_t)q << (30u - e);
    for (i = 0; i < FEDTINY_LOSS_FRACTION_BITS; i++) {
        m = (m * m) >> 30;
        fraction <<= 1;
        if (m >= ((uint64_t)1 << 31)) {
            m >>= 1;
            fraction |= 1u;
        }
    }
    d = ((uint64_t)15 << FEDTINY_LOSS_FRACTION_BITS) - (((uint64_t)e << FEDTINY_LOSS_FRACTION_BITS) | fraction);
    return (uint32_t)((d * FEDTINY_LN2_Q32 + ((uint64_t)1 << 31)) >> 32);
}

#endif /* FEDTINY_ARITH_H */
