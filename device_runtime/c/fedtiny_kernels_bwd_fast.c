/* Fast backward kernels (see fedtiny_kernels.h, "fast backward kernels"): the same results as the reference
 * fedtiny_conv2d_weight_update / fedtiny_conv2d_input_grad bit for bit, by construction:
 * - every sum is exact in any order; int32 partial sums only over blocks whose bound holds for any shape
 *   (FAST_WEIGHT_BLOCK positions, FAST_INPUT_BLOCK output channels), added into int64 totals;
 * - an update draws the random number of its weight's index (the reference's counter + 1 + index in C order), so
 *   the order in which weights are finished does not matter.
 * The operands are laid out as contiguous int16 vectors in the scratch first (a transposition that costs one pass
 * over the data, not one per MAC), so the inner loops are dot products of int16 pairs: SMLAD on the Cortex-M4
 * (ACLE, __ARM_FEATURE_DSP), and loops gcc -O3 vectorizes (pmaddwd) on the host. */
#include <string.h>

#include "fedtiny_kernels.h"

#include "fedtiny_arith.h"

#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#include <arm_acle.h>
#define FAST_DSP 1
#else
#define FAST_DSP 0
#endif

/* Positions summed in int32 before a weight sum is added to its int64 total: |g| <= 2^15 and |x - zx| <= 255,
 * so 256 * 2^15 * 255 < 2^31. Even, so that a block of int16 pairs never splits a pair. */
#define FAST_WEIGHT_BLOCK 256
/* Output channels summed in int32 in the input gradient: |half of g ws| <= 2^15 and |w| <= 128, 2^15 * 2^7 * 256
 * = 2^30 < 2^31. */
#define FAST_INPUT_BLOCK 256

static int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
static int32_t even(int32_t n) { return n + (n & 1); }

/* sum a0[i] b[i] and sum a1[i] b[i] over n (even) int16 values, exact in int32 within the block bounds above;
 * b is loaded once for both. */
static void dot16x2(const int16_t *a0, const int16_t *a1, const int16_t *b, int32_t n, int32_t *s0, int32_t *s1)
{
    int32_t acc0 = 0, acc1 = 0, i;
#if FAST_DSP
    for (i = 0; i < n; i += 2) {
        uint32_t p0, p1, pb;
        memcpy(&p0, a0 + i, sizeof p0);
        memcpy(&p1, a1 + i, sizeof p1);
        memcpy(&pb, b + i, sizeof pb);
        acc0 = __smlad(p0, pb, acc0);
        acc1 = __smlad(p1, pb, acc1);
    }
#else
    for (i = 0; i < n; i++) {
        acc0 += (int32_t)a0[i] * b[i];
        acc1 += (int32_t)a1[i] * b[i];
    }
#endif
    *s0 = acc0;
    *s1 = acc1;
}

/* The valid output columns [lo, hi) of kernel column kx: 0 <= ox * stride - pad + kx < in (ceil / floor divisions
 * of non-negative numbers only). */
static void valid_range(int32_t out, int32_t in, int32_t stride, int32_t pad, int32_t k, int32_t *lo, int32_t *hi)
{
    const int32_t first = pad - k; /* ox * stride >= first */
    const int32_t last = in + pad - k - 1; /* ox * stride <= last */
    *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
    *hi = last < 0 ? 0 : min_i32(out, last / stride + 1);
    if (*hi < *lo) {
        *hi = *lo;
    }
}

static int conv_groups_ok(const fedtiny_conv2d_params *c)
{
    return c->groups >= 1 && (c->in_c / c->groups) * c->groups == c->in_c &&
           (c->out_c / c->groups) * c->groups == c->out_c;
}

/* ---- weight update ------------------------------------------------------------------------------------------ */

/* g columns of the trainable rows (channels x P2 int16) and one input column (P2 int16), P2 = positions rounded up
 * to even. */
size_t fedtiny_conv2d_weight_update_fast_scratch_bytes(const fedtiny_conv2d_update_params *p)
{
    const int32_t p2 = even(p->conv->out_h * p->conv->out_w);
    return (size_t)(p->channels + 1) * (size_t)p2 * sizeof(int16_t);
}

/* Input column of tap (ky, kx) and input channel ch: col[oy * out_w + ox] = x[iy, ix, ch] - zx where the tap
 * falls inside the input, 0 in the padding (and in the even-rounding slot). */
static void input_column(const fedtiny_conv2d_params *c, const int8_t *x, int32_t ky, int32_t kx, int32_t ch,
                         int16_t *col, int32_t p2)
{
    const int32_t out_w = c->out_w, in_c = c->in_c, zx = c->in_zero_point, sw = c->stride_w;
    int32_t ox_lo, ox_hi, oy, ox;
    valid_range(c->out_w, c->in_w, c->stride_w, c->pad_left, kx, &ox_lo, &ox_hi);
    memset(col, 0, (size_t)p2 * sizeof(int16_t));
    for (oy = 0; oy < c->out_h; oy++) {
        const int32_t iy = oy * c->stride_h - c->pad_top + ky;
        const int8_t *xp;
        int16_t *cp = col + oy * out_w;
        if (iy < 0 || iy >= c->in_h || ox_hi <= ox_lo) {
            continue;
        }
        xp = x + (iy * c->in_w + ox_lo * sw - c->pad_left + kx) * in_c + ch;
        for (ox = ox_lo; ox < ox_hi; ox++) {
            cp[ox] = (int16_t)((int32_t)*xp - zx);
            xp += sw * in_c;
        }
    }
}

/* The in-place update of one weight from its finished sum: the reference's arithmetic and its draw, number
 * `index` + 1 after the call's counter. */
static int8_t updated_weight(int8_t w, int64_t sum, int32_t m, int32_t k, uint64_t counter, int32_t index)
{
    const int64_t v =
        (int64_t)w - fedtiny_stochastic_delta(sum, m, k, fedtiny_splitmix64(counter + 1u + (uint64_t)index));
    return (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
}

/* Sums of rows o0 and o1 (o1 may be o0) against one input column, in blocks of FAST_WEIGHT_BLOCK positions. */
static void weight_sums(const int16_t *g0, const int16_t *g1, const int16_t *col, int32_t p2, int64_t *s0, int64_t *s1)
{
    int64_t t0 = 0, t1 = 0;
    int32_t b;
    for (b = 0; b < p2; b += FAST_WEIGHT_BLOCK) {
        int32_t a0, a1;
        dot16x2(g0 + b, g1 + b, col + b, min_i32(FAST_WEIGHT_BLOCK, p2 - b), &a0, &a1);
        t0 += a0;
        t1 += a1;
    }
    *s0 = t0;
    *s1 = t1;
}

/* Any conv (groups, strides, padding). Per group: the g columns of its trainable rows, then per tap (ky, kx, ic)
 * its input column once, dotted with every row's g column (two rows at a time). */
fedtiny_status fedtiny_conv2d_weight_update_fast(const fedtiny_conv2d_update_params *p, const int16_t *g_y,
                                                 int32_t e_y, const int8_t *x, int8_t *rows, uint64_t *rng_counter,
                                                 void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t cin_g = c->in_c / c->groups, cout_g = c->out_c / c->groups;
    const int32_t taps = c->kernel_h * c->kernel_w, row_len = taps * cin_g;
    const int32_t positions = c->out_h * c->out_w, p2 = even(positions), out_c = c->out_c;
    const uint64_t counter = *rng_counter;
    int16_t *gcols = (int16_t *)scratch;
    int16_t *col = gcols + (size_t)p->channels * (size_t)p2;
    int32_t o, i, group, tap, ic;
    if (!conv_groups_ok(c) || p->channels > c->out_c || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    for (o = 0; o < p->channels; o++) { /* g transposed: row o's gradient at every position, contiguous */
        int16_t *gc = gcols + (size_t)o * (size_t)p2;
        const int16_t *gp = g_y + o;
        for (i = 0; i < positions; i++) {
            gc[i] = gp[i * out_c];
        }
        if (p2 > positions) {
            gc[positions] = 0;
        }
    }
    for (group = 0; group * cout_g < p->channels; group++) {
        const int32_t o_lo = group * cout_g, o_hi = min_i32(p->channels, o_lo + cout_g);
        for (tap = 0; tap < taps; tap++) {
            const int32_t ky = tap / c->kernel_w, kx = tap - ky * c->kernel_w;
            for (ic = 0; ic < cin_g; ic++) {
                const int32_t w_index = tap * cin_g + ic; /* within a row */
                input_column(c, x, ky, kx, group * cin_g + ic, col, p2);
                for (o = o_lo; o < o_hi; o += 2) {
                    const int32_t o1 = min_i32(o + 1, o_hi - 1);
                    int64_t s0, s1;
                    weight_sums(gcols + (size_t)o * (size_t)p2, gcols + (size_t)o1 * (size_t)p2, col, p2, &s0, &s1);
                    rows[o * row_len + w_index] = updated_weight(rows[o * row_len + w_index], s0, p->m[o],
                                                                 15 - p->shift[o] - e_y, counter,
                                                                 o * row_len + w_index);
                    if (o1 != o) {
                        rows[o1 * row_len + w_index] = updated_weight(rows[o1 * row_len + w_index], s1, p->m[o1],
                                                                      15 - p->shift[o1] - e_y, counter,
                                                                      o1 * row_len + w_index);
                    }
                }
            }
        }
    }
    *rng_counter = counter + (uint64_t)p->channels * (uint64_t)row_len;
    return FEDTINY_OK;
}
