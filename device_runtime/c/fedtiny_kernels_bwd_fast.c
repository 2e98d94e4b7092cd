/* Fast backward kernels (see fedtiny_kernels.h, "fast backward kernels"): the same results as the reference
 * fedtiny_conv2d_weight_update / fedtiny_conv2d_input_grad bit for bit, by construction:
 * - every sum is exact in any order; int32 partial sums only over blocks of positions whose bound the compiler
 *   proved (params->block: block x 2^15 x max |x - zx| < 2^31, an even number so that a block of int16 pairs
 *   never splits a pair), added into int64 totals;
 * - an update takes the rounding bits of its weight's index in C order (fedtiny_update_bits: the low or high half
 *   of draw index / 2 + 1 after the call's counter), so the order in which weights are finished does not matter;
 *   a chunk of a row is finished together, two weights per draw, the rounding in one SMLAL per weight.
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

static int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
static int32_t even(int32_t n) { return n + (n & 1); }

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

/* Weights of a row whose sums are formed together (2 rows x UPDATE_CHUNK columns) before their updates run in one
 * tight loop over the row (its rounding constants in registers, one draw per two weights). */
#define UPDATE_CHUNK 16

static int32_t update_columns(int32_t row_len) { return min_i32(UPDATE_CHUNK, even(row_len)); }

/* The input plane of one channel a depthwise update reads (padding included): the rows the outputs' windows
 * cover, each row's columns split by phase (column px at [px % stride_w][px / stride_w]) so that every tap reads a
 * contiguous run; plane_width is one row's int16 values, stride_w phases of plane_phase each. */
static int32_t plane_rows(const fedtiny_conv2d_params *c) { return (c->out_h - 1) * c->stride_h + c->kernel_h; }
static int32_t plane_phase(const fedtiny_conv2d_params *c)
{
    return ((c->out_w - 1) * c->stride_w + c->kernel_w + c->stride_w - 1) / c->stride_w;
}
static int32_t plane_width(const fedtiny_conv2d_params *c) { return plane_phase(c) * c->stride_w; }

/* A depthwise conv (groups == in_c == out_c) whose sums fit int32 (one block of positions): each weight's column
 * is used by one row only, so the update reads a padded int16 plane of the channel instead of building columns. */
static int depthwise_update(const fedtiny_conv2d_update_params *p)
{
    const fedtiny_conv2d_params *c = p->conv;
    return c->groups == c->in_c && c->out_c == c->in_c && even(c->out_h * c->out_w) <= p->block;
}

/* g columns of the trainable rows (channels x P2 int16) and the input columns of one chunk of a row
 * (update_columns x P2 int16), P2 = positions rounded up to even. */
size_t fedtiny_conv2d_weight_update_fast_scratch_bytes(const fedtiny_conv2d_update_params *p)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t p2 = even(c->out_h * c->out_w), row_len = c->kernel_h * c->kernel_w * (c->in_c / c->groups);
    int32_t columns = update_columns(row_len) * p2;
    if (depthwise_update(p)) { /* or one channel's input plane, if larger */
        const int32_t plane = plane_rows(c) * plane_width(c);
        columns = columns > plane ? columns : plane;
    }
    return (size_t)((size_t)p->channels * (size_t)p2 + (size_t)columns) * sizeof(int16_t);
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

/* The column of weight w of a row (w = tap * cin_g + ic) in group `group`. */
static void weight_column(const fedtiny_conv2d_params *c, const int8_t *x, int32_t group, int32_t w, int16_t *col,
                          int32_t p2)
{
    const int32_t cin_g = c->in_c / c->groups, tap = w / cin_g, ky = tap / c->kernel_w;
    input_column(c, x, ky, tap - ky * c->kernel_w, group * cin_g + (w - tap * cin_g), col, p2);
}

/* A row's rounding constants (fedtiny_stochastic_delta with k = 15 - shift - e_y): for k >= 32 the rounding takes
 * all 32 bits and s = min(k, 62) - 32 is in [0, 30]. */
typedef struct {
    int32_t m, k, s;
} row_rounding;

static row_rounding rounding_of(const fedtiny_conv2d_update_params *p, int32_t o, int32_t e_y)
{
    row_rounding r;
    r.m = p->m[o];
    r.k = 15 - p->shift[o] - e_y;
    r.s = r.k > 32 ? (r.k < 62 ? r.k : 62) - 32 : 0;
    return r;
}

/* w - delta clamped to [-127, 127], for any int32 delta: QSUB and SSAT on the M4 (int32: the caller stores a byte). */
static inline int32_t clamped_weight(int32_t w, int32_t delta)
{
#if FAST_DSP
    const int32_t v = __ssat(__qsub(w, delta), 8);
#else
    const int64_t d = (int64_t)w - delta;
    const int32_t v = (int32_t)(d > 127 ? 127 : d);
#endif
    return v < -127 ? -127 : v;
}

/* The high word of hi:lo + a b (SMLAL; gcc builds it from three multiplies when the addend is not a product). */
static inline int32_t multiply_add_high(uint32_t lo, int32_t hi, int32_t a, int32_t b)
{
#if FAST_DSP
    __asm__("smlal %0, %1, %2, %3" : "+r"(lo), "+r"(hi) : "r"(a), "r"(b));
    return hi;
#else
    return (int32_t)(((int64_t)(((uint64_t)(uint32_t)hi << 32) | lo) + (int64_t)a * b) >> 32);
#endif
}

/* The update of a weight from an int32 sum S when k >= 32 (the usual case), fedtiny_stochastic_delta's integers
 * in one multiply-add: with P = S m and u the 32 bits, delta = floor((floor(P / 2^s) + u) / 2^32)
 * = floor((P + u 2^s) / 2^(32 + s)) = ((P + u 2^s) >> 32) >> s, and |P| + u 2^s < 2^46 + 2^62 cannot overflow
 * (|S| < 2^31, m < 2^15): u 2^s as its two words, then SMLAL, then the high word's shift. s_inverse = 31 - s keeps
 * u's high word a defined shift when s = 0. */
static inline int32_t updated_weight32(int32_t w, int32_t sum, int32_t m, int32_t s, int32_t s_inverse,
                                       uint32_t bits)
{
    return clamped_weight(w, multiply_add_high(bits << s, (int32_t)((bits >> 1) >> s_inverse), sum, m) >> s);
}

/* The reference's update of one weight from any sum: the int64 sums of long outputs, and k <= 0. */
static int8_t updated_weight64(int8_t w, int64_t sum, const row_rounding *r, uint32_t bits)
{
    const int64_t v = (int64_t)w - fedtiny_stochastic_delta(sum, r->m, r->k, bits);
    return (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
}

/* A weight's update from an int32 sum when k < 32: 0 < k (large updates, e.g. a classifier's) takes the top k
 * bits r of u, delta = (P + r) >> k (|delta| < 2^46, clamped to +-255 before the weight's clamp, which it cannot
 * change); k <= 0 the reference's. */
static int8_t updated_weight_small_k(int8_t w, int32_t sum, const row_rounding *r, uint32_t bits)
{
    if (r->k > 0) {
        const int64_t delta = ((int64_t)(bits >> (32 - r->k)) + (int64_t)sum * r->m) >> r->k;
        return (int8_t)clamped_weight(w, (int32_t)(delta > 255 ? 255 : (delta < -255 ? -255 : delta)));
    }
    return updated_weight64(w, sum, r, bits);
}

/* SplitMix64's output function: the draw after counter c is mix(c * golden) (fedtiny_splitmix64), so a run of
 * draws steps z by the golden ratio instead of multiplying. */
#define SPLITMIX_GOLDEN 0x9E3779B97F4A7C15ull
static inline uint64_t splitmix_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Update the n weights w[0..n) of one row, layer indexes index .. index + n - 1 (C order), from their int32 sums:
 * weight i takes the low (i even) or high (i odd) half of draw i / 2 + 1 after the call's counter
 * (fedtiny_update_bits), so two weights share each draw. */
static void update_run32(int8_t *w, const int32_t *sums, int32_t n, uint32_t index, const row_rounding *r,
                         uint64_t counter)
{
    const int32_t m = r->m, s = r->s, s_inverse = 31 - r->s;
    uint64_t z = (counter + 1u + (index >> 1)) * SPLITMIX_GOLDEN; /* the draw of weight index's pair */
    int32_t j = 0;
    if (r->k < 32) { /* the same walk through the draws, each weight through updated_weight_small_k */
        uint64_t draw = (index & 1u) ? splitmix_mix(z) : 0;
        for (j = 0; j < n; j++) {
            uint32_t bits;
            if (((index + (uint32_t)j) & 1u) == 0) {
                draw = splitmix_mix(z);
                bits = (uint32_t)draw;
            } else {
                bits = (uint32_t)(draw >> 32);
                z += SPLITMIX_GOLDEN;
            }
            w[j] = updated_weight_small_k(w[j], sums[j], r, bits);
        }
        return;
    }
    if (n > 0 && (index & 1u)) { /* the high half of a draw the weight before it took the low half of */
        w[0] = (int8_t)updated_weight32(w[0], sums[0], m, s, s_inverse, (uint32_t)(splitmix_mix(z) >> 32));
        z += SPLITMIX_GOLDEN;
        j = 1;
    }
    for (; j + 1 < n; j += 2) {
        const uint64_t draw = splitmix_mix(z);
        z += SPLITMIX_GOLDEN;
        w[j] = (int8_t)updated_weight32(w[j], sums[j], m, s, s_inverse, (uint32_t)draw);
        w[j + 1] = (int8_t)updated_weight32(w[j + 1], sums[j + 1], m, s, s_inverse, (uint32_t)(draw >> 32));
    }
    if (j < n) {
        w[j] = (int8_t)updated_weight32(w[j], sums[j], m, s, s_inverse, (uint32_t)splitmix_mix(z));
    }
}

/* The same from int64 sums (outputs longer than one int32 block). */
static void update_run64(int8_t *w, const int64_t *sums, int32_t n, uint32_t index, const row_rounding *r,
                         uint64_t counter)
{
    int32_t j;
    for (j = 0; j < n; j++) {
        w[j] = updated_weight64(w[j], sums[j], r, fedtiny_update_bits(counter, index + (uint32_t)j));
    }
}

/* sum a0[i] b0[i], a0[i] b1[i], a1[i] b0[i], a1[i] b1[i] over n (even) int16 values into s[0..3], exact in int32
 * within a block of positions; each operand is loaded once for two products. */
static void dot16x4(const int16_t *a0, const int16_t *a1, const int16_t *b0, const int16_t *b1, int32_t n,
                    int32_t *s)
{
    int32_t acc00 = 0, acc01 = 0, acc10 = 0, acc11 = 0, i;
#if FAST_DSP
    for (i = 0; i < n; i += 2) {
        uint32_t p0, p1, q0, q1;
        memcpy(&p0, a0 + i, sizeof p0);
        memcpy(&p1, a1 + i, sizeof p1);
        memcpy(&q0, b0 + i, sizeof q0);
        memcpy(&q1, b1 + i, sizeof q1);
        acc00 = __smlad(p0, q0, acc00);
        acc01 = __smlad(p0, q1, acc01);
        acc10 = __smlad(p1, q0, acc10);
        acc11 = __smlad(p1, q1, acc11);
    }
#else
    for (i = 0; i < n; i++) {
        acc00 += (int32_t)a0[i] * b0[i];
        acc01 += (int32_t)a0[i] * b1[i];
        acc10 += (int32_t)a1[i] * b0[i];
        acc11 += (int32_t)a1[i] * b1[i];
    }
#endif
    s[0] = acc00;
    s[1] = acc01;
    s[2] = acc10;
    s[3] = acc11;
}

/* sum a[i] b[i] over n int16 values (any alignment: the M4 loads words unaligned), exact in int32 within a block
 * of positions: SMLAD on the M4. */
static int32_t dot16(const int16_t *a, const int16_t *b, int32_t n)
{
    int32_t acc = 0, i = 0;
#if FAST_DSP
    for (; i + 1 < n; i += 2) {
        uint32_t u, v;
        memcpy(&u, a + i, sizeof u);
        memcpy(&v, b + i, sizeof v);
        acc = __smlad(u, v, acc);
    }
#endif
    for (; i < n; i++) {
        acc += (int32_t)a[i] * b[i];
    }
    return acc;
}

/* Depthwise (depthwise_update): per channel its input plane (x - zx, 0 in the padding, columns by phase) once,
 * then each tap's sum output row by output row, a dot product of the g row and the contiguous run of the tap's
 * phase, UPDATE_CHUNK taps at a time, and their updates. */
static void depthwise_weight_update(const fedtiny_conv2d_update_params *p, const int16_t *gcols, int32_t p2,
                                    int32_t e_y, const int8_t *x, int8_t *rows, uint64_t counter, int16_t *plane)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t taps = c->kernel_h * c->kernel_w, ph = plane_rows(c), pw = plane_width(c), phase = plane_phase(c);
    const int32_t in_c = c->in_c, zx = c->in_zero_point, sh = c->stride_h, sw = c->stride_w, out_w = c->out_w;
    const int32_t px_lo = c->pad_left, px_hi = min_i32(c->pad_left + c->in_w, pw); /* plane columns inside x */
    int32_t ch, py, px, t0, j, oy;
    for (ch = 0; ch < p->channels; ch++) {
        const int16_t *gc = gcols + (size_t)ch * (size_t)p2;
        const row_rounding r = rounding_of(p, ch, e_y);
        memset(plane, 0, (size_t)ph * (size_t)pw * sizeof(int16_t));
        for (py = 0; py < ph; py++) {
            const int32_t iy = py - c->pad_top;
            const int8_t *xp = x + ((size_t)iy * (size_t)c->in_w + (size_t)(px_lo - c->pad_left)) * (size_t)in_c + ch;
            int16_t *row = plane + py * pw;
            if (iy < 0 || iy >= c->in_h) {
                continue;
            }
            for (px = px_lo; px < px_hi; px++) {
                row[(px % sw) * phase + px / sw] = (int16_t)((int32_t)*xp - zx);
                xp += in_c;
            }
        }
        for (t0 = 0; t0 < taps; t0 += UPDATE_CHUNK) {
            const int32_t n = min_i32(UPDATE_CHUNK, taps - t0);
            int32_t sums[UPDATE_CHUNK];
            for (j = 0; j < n; j++) {
                const int32_t ky = (t0 + j) / c->kernel_w, kx = (t0 + j) - ky * c->kernel_w;
                const int16_t *pr = plane + ky * pw + (kx % sw) * phase + kx / sw;
                int32_t sum = 0;
                for (oy = 0; oy < c->out_h; oy++) {
                    sum += dot16(gc + oy * out_w, pr + oy * sh * pw, out_w);
                }
                sums[j] = sum;
            }
            update_run32(rows + ch * taps + t0, sums, n, (uint32_t)(ch * taps + t0), &r, counter);
        }
    }
}

/* Any conv (groups, strides, padding). Per group, per chunk of a row's weights: their input columns once, then for
 * every two rows the 2 x n sums (dot products of int16 columns, two columns at a time) and the two rows' updates
 * in C order. When the output is longer than one int32 block (params->block positions), the sums are added
 * block by block into int64. */
fedtiny_status fedtiny_conv2d_weight_update_fast(const fedtiny_conv2d_update_params *p, const int16_t *g_y,
                                                 int32_t e_y, const int8_t *x, int8_t *rows, uint64_t *rng_counter,
                                                 void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t cin_g = c->in_c / c->groups, cout_g = c->out_c / c->groups;
    const int32_t row_len = c->kernel_h * c->kernel_w * cin_g, chunk = update_columns(row_len);
    const int32_t positions = c->out_h * c->out_w, p2 = even(positions), out_c = c->out_c;
    const int one_block = p2 <= p->block; /* every sum exact in int32 (the compiler's bound) */
    const int linear = c->in_h == 1 && c->in_w == 1 && c->kernel_h == 1 && c->kernel_w == 1 && c->pad_top == 0 &&
                       c->pad_left == 0 && positions == 1; /* a linear layer: weight w of group g reads x[g cin_g + w] */
    const uint64_t counter = *rng_counter;
    int16_t *gcols = (int16_t *)scratch;
    int16_t *xcols = gcols + (size_t)p->channels * (size_t)p2;
    int32_t o, i, group, w0, j;
    if (!conv_groups_ok(c) || p->channels > c->out_c || scratch == NULL || p->block < 2 || (p->block & 1)) {
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
    if (depthwise_update(p)) {
        depthwise_weight_update(p, gcols, p2, e_y, x, rows, counter, xcols);
        *rng_counter = counter + fedtiny_update_draws((uint32_t)(p->channels * row_len));
        return FEDTINY_OK;
    }
    for (group = 0; group * cout_g < p->channels; group++) {
        const int32_t o_lo = group * cout_g, o_hi = min_i32(p->channels, o_lo + cout_g);
        for (w0 = 0; w0 < row_len; w0 += chunk) {
            const int32_t n = min_i32(chunk, row_len - w0);
            for (j = 0; j < n; j++) {
                if (linear) { /* the one input value of each weight */
                    xcols[(size_t)j * (size_t)p2] = (int16_t)((int32_t)x[group * cin_g + w0 + j] - c->in_zero_point);
                } else {
                    weight_column(c, x, group, w0 + j, xcols + (size_t)j * (size_t)p2, p2);
                }
            }
            for (o = o_lo; o < o_hi; o += 2) {
                const int32_t o1 = min_i32(o + 1, o_hi - 1);
                const int16_t *g0 = gcols + (size_t)o * (size_t)p2, *g1 = gcols + (size_t)o1 * (size_t)p2;
                const row_rounding r0 = rounding_of(p, o, e_y);
                union { /* the chunk's sums of the two rows: int32 in one block, else int64 */
                    int32_t s32[2][UPDATE_CHUNK];
                    int64_t s64[2][UPDATE_CHUNK];
                } u;
                int32_t(*s32)[UPDATE_CHUNK] = u.s32, s[4], b;
                int64_t(*s64)[UPDATE_CHUNK] = u.s64;
                for (j = 0; positions == 1 && j < n; j++) { /* a linear layer: each sum is one product */
                    s32[0][j] = (int32_t)g0[0] * xcols[(size_t)j * (size_t)p2];
                    s32[1][j] = (int32_t)g1[0] * xcols[(size_t)j * (size_t)p2];
                }
                for (j = 0; positions > 1 && j < n; j += 2) {
                    const int16_t *x0 = xcols + (size_t)j * (size_t)p2;
                    const int16_t *x1 = j + 1 < n ? x0 + p2 : x0;
                    if (one_block) {
                        dot16x4(g0, g1, x0, x1, p2, s);
                        s32[0][j] = s[0], s32[1][j] = s[2];
                        s32[0][j + 1] = s[1], s32[1][j + 1] = s[3]; /* a spare slot when j + 1 == n */
                    } else {
                        s64[0][j] = s64[0][j + 1] = s64[1][j] = s64[1][j + 1] = 0;
                        for (b = 0; b < p2; b += p->block) {
                            dot16x4(g0 + b, g1 + b, x0 + b, x1 + b, min_i32(p->block, p2 - b), s);
                            s64[0][j] += s[0], s64[1][j] += s[2];
                            s64[0][j + 1] += s[1], s64[1][j + 1] += s[3];
                        }
                    }
                }
                if (one_block) {
                    update_run32(rows + o * row_len + w0, s32[0], n, (uint32_t)(o * row_len + w0), &r0, counter);
                } else {
                    update_run64(rows + o * row_len + w0, s64[0], n, (uint32_t)(o * row_len + w0), &r0, counter);
                }
                if (o1 != o) {
                    const row_rounding r1 = rounding_of(p, o1, e_y);
                    if (one_block) {
                        update_run32(rows + o1 * row_len + w0, s32[1], n, (uint32_t)(o1 * row_len + w0), &r1,
                                     counter);
                    } else {
                        update_run64(rows + o1 * row_len + w0, s64[1], n, (uint32_t)(o1 * row_len + w0), &r1,
                                     counter);
                    }
                }
            }
        }
    }
    *rng_counter = counter + fedtiny_update_draws((uint32_t)(p->channels * row_len));
    return FEDTINY_OK;
}

/* ---- depthwise input gradient -------------------------------------------------------------------------------- */

/* The int64 sum of every input element (|sum| < 2^37 x taps), then a table of ws[c] W[c, tap] (int32: |ws| < 2^15,
 * |W| <= 128). */
size_t fedtiny_conv2d_input_grad_depthwise_scratch_bytes(const fedtiny_conv2d_input_grad_params *p)
{
    const fedtiny_conv2d_params *c = p->conv;
    return (size_t)c->in_h * (size_t)c->in_w * (size_t)c->in_c * sizeof(int64_t) +
           (size_t)c->kernel_h * (size_t)c->kernel_w * (size_t)c->in_c * sizeof(int32_t);
}

/* Narrow a tensor of exact sums, each |acc| < 2^62, to int16 with one shift (fedtiny_kernels.c's narrow_tensor);
 * returns the shift. fedtiny_narrow_one's rounding (half away from zero) as one add: (acc + 2^(shift - 1) -
 * [acc < 0]) >> shift, which cannot overflow below 2^62. */
static int32_t narrow_sums(const int64_t *acc, int32_t n, int16_t *g)
{
    uint64_t peak = 0;
    int32_t i, shift;
    int64_t half;
    for (i = 0; i < n; i++) {
        const uint64_t a = fedtiny_abs64(acc[i]);
        peak = a > peak ? a : peak;
    }
    shift = fedtiny_narrow_shift(peak);
    half = shift ? (int64_t)1 << (shift - 1) : 0;
    for (i = 0; i < n; i++) {
        const int64_t v = shift ? (acc[i] + half - (acc[i] < 0)) >> shift : acc[i];
        g[i] = (int16_t)(v > FEDTINY_GRAD_MAX ? FEDTINY_GRAD_MAX : (v < -FEDTINY_GRAD_MAX ? -FEDTINY_GRAD_MAX : v));
    }
    return shift;
}

/* The outputs whose window covers input row (or column) i at tap k: o stride = i + pad - k, 0 <= o < out. -1 if
 * none. */
static int32_t covering_output(int32_t i, int32_t pad, int32_t k, int32_t stride, int32_t out)
{
    const int32_t t = i + pad - k;
    int32_t o;
    if (t < 0) {
        return -1;
    }
    o = t / stride;
    return o * stride == t && o < out ? o : -1;
}

/* Depthwise (groups == in_c == out_c), one pass: each input element's sum gathered from the outputs whose window
 * covers it, acc[iy, ix, c] = sum over taps of g_y[oy, ox, c] (ws[c] W[c, ky, kx]) (a 64-bit multiply-accumulate
 * of int32 operands per term, channels innermost so the window arithmetic is paid once per pixel and tap), then
 * narrowed: the reference's exact sums, so its result bit for bit. */
fedtiny_status fedtiny_conv2d_input_grad_depthwise(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y,
                                                   int32_t e_y, int16_t *g_x, int32_t *e_x, void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t ch = c->in_c, taps = c->kernel_h * c->kernel_w, n = c->in_h * c->in_w * ch;
    int64_t *acc = (int64_t *)scratch;
    int32_t *wsw = (int32_t *)(acc + n);
    int32_t o, tap, iy, ix, ky, kx, i;
    if (c->groups != ch || c->out_c != ch || scratch == NULL || p->recompute) {
        return FEDTINY_ERR_PARAMS;
    }
    for (o = 0; o < ch; o++) {
        const int8_t *w = (o < c->sram_rows ? c->weight_sram : c->weight) + o * taps;
        for (tap = 0; tap < taps; tap++) {
            wsw[tap * ch + o] = p->ws[o] * w[tap];
        }
    }
    for (iy = 0; iy < c->in_h; iy++) {
        for (ix = 0; ix < c->in_w; ix++) {
            int64_t *ap = acc + (iy * c->in_w + ix) * ch;
            for (i = 0; i < ch; i++) {
                ap[i] = 0;
            }
            for (ky = 0; ky < c->kernel_h; ky++) {
                const int32_t oy = covering_output(iy, c->pad_top, ky, c->stride_h, c->out_h);
                if (oy < 0) {
                    continue;
                }
                for (kx = 0; kx < c->kernel_w; kx++) {
                    const int32_t ox = covering_output(ix, c->pad_left, kx, c->stride_w, c->out_w);
                    const int16_t *gp;
                    const int32_t *wp;
                    if (ox < 0) {
                        continue;
                    }
                    gp = g_y + (oy * c->out_w + ox) * ch;
                    wp = wsw + (ky * c->kernel_w + kx) * ch;
                    for (i = 0; i < ch; i++) {
                        ap[i] += (int64_t)gp[i] * wp[i];
                    }
                }
            }
        }
    }
    *e_x = e_y - p->k + narrow_sums(acc, n, g_x);
    return FEDTINY_OK;
}

/* ---- pointwise input gradient -------------------------------------------------------------------------------- */

/* A pointwise conv (1 x 1 kernel, stride 1, no padding, groups 1: g_x's pixels are g_y's) whose out_c keeps each
 * half-sum below 2^31: out_c x 2^15 x 2^7 < 2^31. */
#define POINTWISE_MAX_OUT_C 511

static int pointwise_ok(const fedtiny_conv2d_params *c)
{
    return c->kernel_h == 1 && c->kernel_w == 1 && c->stride_h == 1 && c->stride_w == 1 && c->pad_top == 0 &&
           c->pad_left == 0 && c->groups == 1 && c->out_h == c->in_h && c->out_w == c->in_w &&
           c->out_c <= POINTWISE_MAX_OUT_C;
}

/* The reference's int64 sum per input element, then per pixel and output-channel pair the split terms (2 x 2
 * int16), then two input channels' weights as int16 pairs over output-channel pairs (out_c rounded up to even). */
size_t fedtiny_conv2d_input_grad_pointwise_scratch_bytes(const fedtiny_conv2d_input_grad_params *p)
{
    const fedtiny_conv2d_params *c = p->conv;
    const size_t pixels = (size_t)c->in_h * (size_t)c->in_w, o2 = (size_t)even(c->out_c);
    return pixels * (size_t)c->in_c * sizeof(int64_t) + pixels * o2 * 2u * sizeof(int16_t) + o2 * 2u * sizeof(int16_t);
}

static uint32_t pack16(int32_t lo, int32_t hi) { return (uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16); }

/* The dot product of two pairs of int16 pairs, added: SMLAD on the M4. */
static inline int32_t dual_mac(uint32_t a, uint32_t b, int32_t acc)
{
#if FAST_DSP
    return __smlad(a, b, acc);
#else
    return acc + (int32_t)(int16_t)(a & 0xFFFFu) * (int16_t)(b & 0xFFFFu) +
           (int32_t)(int16_t)(a >> 16) * (int16_t)(b >> 16);
#endif
}

/* Two 32-bit words from *p, which moves past them: one post-indexed LDRD on the M4 (gcc splits the load in two). */
static inline void load_two(const uint32_t **p, uint32_t *a, uint32_t *b)
{
#if FAST_DSP
    __asm__ volatile("ldrd %0, %1, [%2], #8" : "=r"(*a), "=r"(*b), "+r"(*p) : : "memory");
#else
    *a = (*p)[0];
    *b = (*p)[1];
    *p += 2;
#endif
}

/* One output-channel pair of a pixel against two input channels: the split terms (th pair, tl pair) and the two
 * channels' weight pairs, four dot products. */
static inline void pointwise_step(const uint32_t **tp, const uint32_t **wp, int32_t *h0, int32_t *l0, int32_t *h1,
                                  int32_t *l1)
{
    uint32_t th, tl, w0, w1;
    load_two(tp, &th, &tl);
    load_two(wp, &w0, &w1);
    *h0 = dual_mac(th, w0, *h0);
    *l0 = dual_mac(tl, w0, *l0);
    *h1 = dual_mac(th, w1, *h1);
    *l1 = dual_mac(tl, w1, *l1);
}

/* g_x[p, c] = narrow(sum over o of t[p, o] W[o, c]), t = g_y[p, o] ws[o] (|t| <= 2^30), transpose-free: each term
 * split as t = th 2^15 + tl (th = t >> 15 and tl = t & 0x7FFF, both int16), so that the sums over o are two int32
 * dot products of int16 pairs, h = sum th W and l = sum tl W (|th W|, |tl W| <= 2^22, out_c <= 511 of them), and
 * the exact sum is h 2^15 + l: the reference's (which skips the zero terms, which add nothing), hence its
 * narrowing bit for bit. The split terms are formed once per pixel and output channel (the scratch), the weights of
 * two input channels are laid out as int16 pairs over output-channel pairs once per channel pair; then for each
 * pixel, two input channels at a time, four SMLADs per two output channels. */
fedtiny_status fedtiny_conv2d_input_grad_pointwise(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y,
                                                   int32_t e_y, int16_t *g_x, int32_t *e_x, void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t pixels = c->in_h * c->in_w, in_c = c->in_c, out_c = c->out_c, pairs = even(out_c) / 2;
    int64_t *acc = (int64_t *)scratch;
    uint32_t *terms = (uint32_t *)(acc + (size_t)pixels * (size_t)in_c); /* [pixel][pair]: th pair, tl pair */
    uint32_t *wpairs = terms + (size_t)pixels * (size_t)pairs * 2u;    /* [pair]: channel c0's, channel c1's */
    int16_t *w16 = (int16_t *)(void *)wpairs;
    int32_t px, o, q, ch;
    if (!pointwise_ok(c) || scratch == NULL || p->recompute) {
        return FEDTINY_ERR_PARAMS;
    }
#if !FAST_DSP && !defined(FEDTINY_HOST_SPLIT_PATHS)
    /* Without SMLAD the split halves double the multiplies, while the reference skips the zero terms and gcc
     * vectorizes its inner loop: on the host the reference is the faster way to the same integers (its scratch,
     * one int64 per input element, is the head of this kernel's). */
    (void)terms, (void)wpairs, (void)w16, (void)px, (void)o, (void)q, (void)ch;
    return fedtiny_conv2d_input_grad(p, g_y, e_y, g_x, e_x, scratch);
#endif
    for (px = 0; px < pixels; px++) {
        const int16_t *gp = g_y + (size_t)px * (size_t)out_c;
        uint32_t *tp = terms + (size_t)px * (size_t)pairs * 2u;
        for (q = 0; q < pairs; q++) {
            const int32_t o0 = 2 * q, o1 = 2 * q + 1;
            const int32_t t0 = (int32_t)gp[o0] * p->ws[o0], t1 = o1 < out_c ? (int32_t)gp[o1] * p->ws[o1] : 0;
            tp[2 * q] = pack16(t0 >> 15, t1 >> 15); /* >> of a negative int is arithmetic on gcc */
            tp[2 * q + 1] = pack16(t0 & 0x7FFF, t1 & 0x7FFF);
        }
    }
    for (ch = 0; ch < in_c; ch += 2) {
        const int32_t ch1 = ch + 1 < in_c ? ch + 1 : ch;
        if (out_c & 1) { /* the odd channel's partner in the last pair */
            w16[2 * out_c - 1] = w16[2 * out_c + 1] = 0;
        }
        for (o = 0; o < out_c; o++) { /* weight pairs: [pair][channel ch's pair, channel ch1's pair] */
            const int8_t *row = (o < c->sram_rows ? c->weight_sram : c->weight) + (size_t)o * (size_t)in_c + ch;
            int16_t *wq = w16 + 4 * (o >> 1) + (o & 1);
            wq[0] = row[0];
            wq[2] = row[ch1 - ch];
        }
        for (px = 0; px < pixels; px++) {
            const uint32_t *tp = terms + (size_t)px * (size_t)pairs * 2u, *wp = wpairs;
            int32_t h0 = 0, l0 = 0, h1 = 0, l1 = 0;
            int64_t *ap = acc + (size_t)px * (size_t)in_c + ch;
            const uint32_t *const end = tp + 2 * pairs;
            if (pairs & 1) {
                pointwise_step(&tp, &wp, &h0, &l0, &h1, &l1);
            }
            while (tp != end) { /* two steps per pass */
                pointwise_step(&tp, &wp, &h0, &l0, &h1, &l1);
                pointwise_step(&tp, &wp, &h0, &l0, &h1, &l1);
            }
            ap[0] = (int64_t)h0 * 32768 + l0;
            if (ch1 != ch) {
                ap[1] = (int64_t)h1 * 32768 + l1;
            }
        }
    }
    *e_x = e_y - p->k + narrow_sums(acc, pixels * in_c, g_x);
    return FEDTINY_OK;
}

/* ---- bias update ----------------------------------------------------------------------------------------------- */

/* The bias sums in int32 (the compiler chooses this kernel for outputs of at most 65,535 positions: |sum| <
 * 2^15 x positions < 2^31), one per output channel. */
size_t fedtiny_conv2d_bias_update_fast_scratch_bytes(const fedtiny_conv2d_update_params *p)
{
    return (size_t)p->conv->out_c * sizeof(int32_t);
}

/* sums[0..8) = the sums over `positions` rows of g (row stride `stride` int16) of 8 adjacent channels: the eight
 * accumulators stay in registers, each row's channels read as four words. */
static void channel_sums8(const int16_t *g, int32_t stride, int32_t positions, int32_t *sums)
{
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0, i;
    for (i = 0; i < positions; i++, g += stride) {
        uint32_t w[4];
        memcpy(w, g, sizeof w);
        a0 += (int16_t)w[0], a1 += (int32_t)w[0] >> 16;
        a2 += (int16_t)w[1], a3 += (int32_t)w[1] >> 16;
        a4 += (int16_t)w[2], a5 += (int32_t)w[2] >> 16;
        a6 += (int16_t)w[3], a7 += (int32_t)w[3] >> 16;
    }
    sums[0] = a0, sums[1] = a1, sums[2] = a2, sums[3] = a3, sums[4] = a4, sums[5] = a5, sums[6] = a6, sums[7] = a7;
}

/* fedtiny_conv2d_bias_update's integers: the sums eight channels at a time over the output rows (int32, exact),
 * then each bias's update from the reference's fedtiny_stochastic_delta with the bits of its index, two biases per
 * draw (the draws stepped by the golden increment). */
fedtiny_status fedtiny_conv2d_bias_update_fast(const fedtiny_conv2d_update_params *p, const int16_t *g_y,
                                               int32_t e_y, int32_t *bias, uint64_t *rng_counter, void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t positions = c->out_h * c->out_w, out_c = c->out_c;
    const uint64_t counter = *rng_counter;
    int32_t *sums = (int32_t *)scratch;
    uint64_t z = (counter + 1u) * SPLITMIX_GOLDEN, draw = 0;
    int32_t o, i;
    if (scratch == NULL || positions > 65535) {
        return FEDTINY_ERR_PARAMS;
    }
#if !FAST_DSP && !defined(FEDTINY_HOST_SPLIT_PATHS)
    /* measured slower than the reference on the host (x86, gcc -O3): the same integers the faster way there */
    (void)sums, (void)z, (void)draw, (void)o, (void)i;
    return fedtiny_conv2d_bias_update(p, g_y, e_y, bias, rng_counter);
#endif
    for (o = 0; o + 8 <= out_c; o += 8) {
        channel_sums8(g_y + o, out_c, positions, sums + o);
    }
    for (; o < out_c; o++) {
        int32_t sum = 0;
        for (i = 0; i < positions; i++) {
            sum += g_y[i * out_c + o];
        }
        sums[o] = sum;
    }
    for (o = 0; o < out_c; o++) {
        uint32_t bits;
        if ((o & 1) == 0) {
            draw = splitmix_mix(z);
            z += SPLITMIX_GOLDEN;
            bits = (uint32_t)draw;
        } else {
            bits = (uint32_t)(draw >> 32);
        }
        bias[o] = (int32_t)fedtiny_clamp_i32_64(
            (int64_t)bias[o] - fedtiny_stochastic_delta(sums[o], p->m[o], 15 - p->shift[o] - e_y, bits));
    }
    *rng_counter = counter + fedtiny_update_draws((uint32_t)out_c);
    return FEDTINY_OK;
}
