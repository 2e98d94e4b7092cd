/* Fast forward kernels (see the "fast forward kernels" block of fedtiny_kernels.h): the same integers as the
 * reference fedtiny_conv2d by construction, in fewer instructions.
 *
 * - Every sum is exact in int32, as the reference's: a term |x - zp| |w| is at most 255 * 128 = 32,640, and the
 *   compiler proves window * 32,640 < 2^31 for every conv (fedtiny.device_memory.check_accumulators). Wrapping
 *   int32 arithmetic (SMLAD's too) gives the exact sum whenever the sum itself fits.
 * - Requantization does the reference's multiply-shift once per output with the same rounding: the saturating
 *   add of the bias (QADD), the saturating left shift, the rounding doubling high multiply, which for a
 *   multiplier other than INT32_MIN is floor((v m + 2^30) / 2^31) (gemmlowp's nudge and truncation toward zero
 *   come to the same for either sign), and the rounding right shift of fedtiny_arith.h. A conv with a multiplier
 *   of INT32_MIN (never made by the quantizer) runs the reference kernel.
 * - On the Cortex-M4 (__ARM_FEATURE_DSP), CMSIS-NN style: each input window becomes an int16 column with the zero
 *   point removed once, then two MACs per SMLAD, the weights widened four at a time by SXTB16. SXTB16 yields
 *   weights (0, 2) and (1, 3) of a word, so the column keeps each full block of four values in the order
 *   (0, 2, 1, 3). Elsewhere (the host, gcc -O3) the same loops in plain C, in natural order, for the vectorizer.
 */
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
static int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

static const int8_t *weight_row(const fedtiny_conv2d_params *p, int32_t oc, int32_t row_len)
{
    return oc < p->sram_rows ? p->weight_sram + oc * row_len : p->weight + oc * row_len;
}

/* ---- requantization --------------------------------------------------------------------------------------- */

/* One output channel's requantization constants, loaded once per channel. */
typedef struct {
    int32_t bias, multiplier, left, right;
    int32_t zero_point, act_min, act_max;
} requant;

static requant requant_of(const fedtiny_conv2d_params *p, int32_t oc)
{
    requant r;
    r.bias = p->bias_sram != NULL ? p->bias_sram[oc] : p->bias[oc];
    r.multiplier = p->multiplier[oc];
    r.left = p->shift[oc] > 0 ? p->shift[oc] : 0;
    r.right = p->shift[oc] > 0 ? 0 : -p->shift[oc];
    r.zero_point = p->out_zero_point;
    r.act_min = p->act_min;
    r.act_max = p->act_max;
    return r;
}

/* fedtiny_requantize((int64_t)acc + bias, ...) for a multiplier other than INT32_MIN. */
static inline int8_t requantize(int32_t acc, const requant *r)
{
    int32_t v, y;
#if FAST_DSP
    v = __qadd(acc, r->bias);
#else
    v = (int32_t)fedtiny_clamp_i32_64((int64_t)acc + r->bias);
#endif
    if (r->left > 0) {
        v = (int32_t)fedtiny_clamp_i32_64((int64_t)v * ((int64_t)1 << r->left));
    }
    v = (int32_t)(((int64_t)v * r->multiplier + ((int64_t)1 << 30)) >> 31);
    y = fedtiny_rounding_divide_by_pot(v, r->right) + r->zero_point;
    y = y < r->act_min ? r->act_min : y;
    return (int8_t)(y > r->act_max ? r->act_max : y);
}

/* The fast requantization's one exception (see the top of the file). */
static int any_min_multiplier(const fedtiny_conv2d_params *p)
{
    int32_t oc;
    for (oc = 0; oc < p->out_c; oc++) {
        if (p->multiplier[oc] == INT32_MIN) {
            return 1;
        }
    }
    return 0;
}

/* ---- conv2d, fast general: one int16 column per output pixel, 2 pixels x 2 channels per step ------------ */

#if FAST_DSP
static inline int32_t read_s8x4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4); /* one LDR: the M4 loads unaligned words */
    return v;
}

static inline int32_t read_s16x2(const int16_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void write_s16x2(int16_t *p, int32_t v) { memcpy(p, &v, 4); }

/* Bytes 1 and 3 of v to 0 and 2 (gcc folds this into SXTB16's rotation). */
static inline int32_t ror8(int32_t v) { return (int32_t)(((uint32_t)v >> 8) | ((uint32_t)v << 24)); }

/* Column position of window value i: within the full blocks of four, (0, 2, 1, 3) (bits 0 and 1 swapped). */
static inline int32_t column_pos(int32_t i, int32_t full)
{
    return i < full ? i ^ (((i ^ (i >> 1)) & 1) * 3) : i;
}
#else
static inline int32_t column_pos(int32_t i, int32_t full)
{
    (void)full;
    return i;
}
#endif

/* Column values [i, i + n) from n int8 inputs (zero point removed). */
static void column_run(const int8_t *xp, int32_t n, int32_t zp, int16_t *col, int32_t i, int32_t full)
{
#if FAST_DSP
    const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
    for (; n > 0 && (i & 3) != 0; n--, i++) {
        col[column_pos(i, full)] = (int16_t)(*xp++ - zp);
    }
    for (; n >= 4 && i + 4 <= full; n -= 4, i += 4, xp += 4) {
        const int32_t v = read_s8x4(xp);
        write_s16x2(col + i, __ssub16(__sxtb16(v), zp2));           /* values 0, 2 */
        write_s16x2(col + i + 2, __ssub16(__sxtb16(ror8(v)), zp2)); /* values 1, 3 */
    }
#endif
    for (; n > 0; n--, i++) {
        col[column_pos(i, full)] = (int16_t)(*xp++ - zp);
    }
}

static void column_zeros(int32_t n, int16_t *col, int32_t i, int32_t full)
{
    for (; n > 0; n--, i++) {
        col[column_pos(i, full)] = 0;
    }
}

/* The window of output pixel `pixel`, group g: len = kernel_h * kernel_w * cin_g values, padding as 0. */
static void load_window(const fedtiny_conv2d_params *p, const int8_t *x, int32_t pixel, int32_t g, int32_t cin_g,
                        int16_t *col)
{
    const int32_t oy = pixel / p->out_w;
    const int32_t ox = pixel - oy * p->out_w;
    const int32_t iy0 = oy * p->stride_h - p->pad_top;
    const int32_t ix0 = ox * p->stride_w - p->pad_left;
    const int32_t kx_lo = min_i32(p->kernel_w, max_i32(0, -ix0));
    const int32_t kx_hi = max_i32(kx_lo, min_i32(p->kernel_w, p->in_w - ix0));
    const int32_t row = p->kernel_w * cin_g;
    const int32_t full = (p->kernel_h * row) & ~3;
    int32_t ky, kx, i = 0;
    for (ky = 0; ky < p->kernel_h; ky++, i += row) {
        const int32_t iy = iy0 + ky;
        const int8_t *xp;
        if (iy < 0 || iy >= p->in_h) {
            column_zeros(row, col, i, full);
            continue;
        }
        xp = x + (iy * p->in_w + ix0 + kx_lo) * p->in_c + g * cin_g;
        column_zeros(kx_lo * cin_g, col, i, full);
        if (p->groups == 1) { /* the valid taps of a row are one run of the input */
            column_run(xp, (kx_hi - kx_lo) * cin_g, p->in_zero_point, col, i + kx_lo * cin_g, full);
        } else {
            for (kx = kx_lo; kx < kx_hi; kx++, xp += p->in_c) {
                column_run(xp, cin_g, p->in_zero_point, col, i + kx * cin_g, full);
            }
        }
        column_zeros((p->kernel_w - kx_hi) * cin_g, col, i + kx_hi * cin_g, full);
    }
}

/* Column stride: the window's length rounded up to 4 values (8 bytes: both columns stay word-aligned). */
static int32_t column_stride(const fedtiny_conv2d_params *p)
{
    return (p->kernel_h * p->kernel_w * (p->in_c / p->groups) + 3) & ~3;
}

size_t fedtiny_conv2d_fast_scratch_bytes(const fedtiny_conv2d_params *p)
{
    return 2u * (size_t)column_stride(p) * sizeof(int16_t);
}

/* acc[0..3] = (column 0, row 0), (column 0, row 1), (column 1, row 0), (column 1, row 1) dot products of len
 * values; row1 may be row0 and c1 may be c0. */
static inline void dot_2x2(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int32_t len,
                           int32_t *acc)
{
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, i = 0;
#if FAST_DSP
    for (; i + 4 <= len; i += 4) {
        const int32_t u = read_s8x4(w0 + i), v = read_s8x4(w1 + i);
        const int32_t u02 = __sxtb16(u), u13 = __sxtb16(ror8(u));
        const int32_t v02 = __sxtb16(v), v13 = __sxtb16(ror8(v));
        const int32_t x02 = read_s16x2(c0 + i), x13 = read_s16x2(c0 + i + 2);
        const int32_t z02 = read_s16x2(c1 + i), z13 = read_s16x2(c1 + i + 2);
        a00 = __smlad(u02, x02, a00);
        a00 = __smlad(u13, x13, a00);
        a01 = __smlad(v02, x02, a01);
        a01 = __smlad(v13, x13, a01);
        a10 = __smlad(u02, z02, a10);
        a10 = __smlad(u13, z13, a10);
        a11 = __smlad(v02, z02, a11);
        a11 = __smlad(v13, z13, a11);
    }
#endif
    for (; i < len; i++) {
        const int32_t x0 = c0[i], x1 = c1[i], k0 = w0[i], k1 = w1[i];
        a00 += x0 * k0;
        a01 += x0 * k1;
        a10 += x1 * k0;
        a11 += x1 * k1;
    }
    acc[0] = a00;
    acc[1] = a01;
    acc[2] = a10;
    acc[3] = a11;
}

/* x (in_h, in_w, in_c) -> y (out_h, out_w, out_c), any groups, strides and padding (1x1 and linear included). */
fedtiny_status fedtiny_conv2d_fast(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t cin_g = p->groups > 0 ? p->in_c / p->groups : 0;
    const int32_t cout_g = p->groups > 0 ? p->out_c / p->groups : 0;
    const int32_t len = p->kernel_h * p->kernel_w * cin_g;
    const int32_t pixels = p->out_h * p->out_w;
    const int32_t cout = p->out_c;
    int16_t *col0 = (int16_t *)scratch;
    int16_t *col1 = col0 + column_stride(p);
    int32_t pixel, g, oc;
    if (p->groups < 1 || cin_g * p->groups != p->in_c || cout_g * p->groups != p->out_c || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    if (any_min_multiplier(p)) {
        return fedtiny_conv2d(p, x, y, scratch);
    }
    for (pixel = 0; pixel < pixels; pixel += 2) {
        const int32_t two = pixel + 1 < pixels; /* an odd last pixel: column 1 is column 0, written once */
        int8_t *y0 = y + pixel * cout;
        int8_t *y1 = y0 + cout;
        for (g = 0; g < p->groups; g++) {
            const int32_t oc_end = (g + 1) * cout_g;
            load_window(p, x, pixel, g, cin_g, col0);
            if (two) {
                load_window(p, x, pixel + 1, g, cin_g, col1);
            }
            for (oc = g * cout_g; oc < oc_end; oc += 2) {
                const int32_t pair = oc + 1 < oc_end; /* an odd last channel: row 1 is row 0, written once */
                const requant r0 = requant_of(p, oc);
                int32_t acc[4];
                dot_2x2(weight_row(p, oc, len), weight_row(p, pair ? oc + 1 : oc, len), col0, two ? col1 : col0,
                        len, acc);
                y0[oc] = requantize(acc[0], &r0);
                if (two) {
                    y1[oc] = requantize(acc[2], &r0);
                }
                if (pair) {
                    const requant r1 = requant_of(p, oc + 1);
                    y0[oc + 1] = requantize(acc[1], &r1);
                    if (two) {
                        y1[oc + 1] = requantize(acc[3], &r1);
                    }
                }
            }
        }
    }
    return FEDTINY_OK;
}

/* ---- conv2d, fast depthwise: groups == in_c == out_c ------------------------------------------------------ */

/* Per channel, its padded input plane as int16 (zero point removed, padding 0) and its kernel as int16 with each
 * row padded to an even number of taps (a zero weight), so that every pair of taps is one SMLAD. */
typedef struct {
    int32_t plane_h, plane_w, taps_w; /* plane rows and columns, kernel row length (even) */
} depthwise_shape;

static depthwise_shape depthwise_shape_of(const fedtiny_conv2d_params *p)
{
    depthwise_shape s;
    s.taps_w = (p->kernel_w + 1) & ~1;
    s.plane_h = (p->out_h - 1) * p->stride_h + p->kernel_h;
    s.plane_w = (p->out_w - 1) * p->stride_w + s.taps_w;
    return s;
}

size_t fedtiny_conv2d_depthwise_scratch_bytes(const fedtiny_conv2d_params *p)
{
    const depthwise_shape s = depthwise_shape_of(p);
    if (p->out_h < 1 || p->out_w < 1) {
        return 0;
    }
    return ((size_t)p->kernel_h * (size_t)s.taps_w + (size_t)s.plane_h * (size_t)s.plane_w) * sizeof(int16_t);
}

/* x (in_h, in_w, c) -> y (out_h, out_w, c); weight (c, kernel_h, kernel_w, 1) */
fedtiny_status fedtiny_conv2d_depthwise(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t c_n = p->in_c;
    const int32_t taps = p->kernel_h * p->kernel_w;
    const depthwise_shape s = depthwise_shape_of(p);
    int16_t *kernel = (int16_t *)scratch;           /* kernel_h x taps_w, even: the plane stays word-aligned */
    int16_t *plane = kernel + p->kernel_h * s.taps_w; /* plane_h x plane_w */
    const int32_t col_lo = min_i32(s.plane_w, max_i32(0, p->pad_left));
    const int32_t col_hi = max_i32(col_lo, min_i32(s.plane_w, p->pad_left + p->in_w));
    int32_t c, r, q, ky, kx, oy, ox;
    if (p->groups != c_n || p->out_c != c_n || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    if (p->out_h < 1 || p->out_w < 1) {
        return FEDTINY_OK;
    }
    if (any_min_multiplier(p)) {
        return fedtiny_conv2d(p, x, y, scratch);
    }
    for (c = 0; c < c_n; c++) {
        const int8_t *wc = weight_row(p, c, taps);
        const requant rq = requant_of(p, c);
        int8_t *yp = y + c;
        for (ky = 0; ky < p->kernel_h; ky++) {
            for (kx = 0; kx < s.taps_w; kx++) {
                kernel[ky * s.taps_w + kx] = (int16_t)(kx < p->kernel_w ? wc[ky * p->kernel_w + kx] : 0);
            }
        }
        for (r = 0; r < s.plane_h; r++) {
            const int32_t iy = r - p->pad_top;
            int16_t *pr = plane + r * s.plane_w;
            if (iy < 0 || iy >= p->in_h) {
                for (q = 0; q < s.plane_w; q++) {
                    pr[q] = 0;
                }
                continue;
            }
            {
                const int8_t *xp = x + (iy * p->in_w + col_lo - p->pad_left) * c_n + c;
                for (q = 0; q < col_lo; q++) {
                    pr[q] = 0;
                }
                for (; q < col_hi; q++, xp += c_n) {
                    pr[q] = (int16_t)(*xp - p->in_zero_point);
                }
                for (; q < s.plane_w; q++) {
                    pr[q] = 0;
                }
            }
        }
        for (oy = 0; oy < p->out_h; oy++) {
            const int16_t *top = plane + oy * p->stride_h * s.plane_w;
            for (ox = 0; ox < p->out_w; ox++, yp += c_n) {
                const int16_t *win = top + ox * p->stride_w;
                int32_t acc = 0;
                for (ky = 0; ky < p->kernel_h; ky++) {
                    const int16_t *xr = win + ky * s.plane_w;
                    const int16_t *kr = kernel + ky * s.taps_w;
#if FAST_DSP
                    for (kx = 0; kx < s.taps_w; kx += 2) {
                        acc = __smlad(read_s16x2(xr + kx), read_s16x2(kr + kx), acc);
                    }
#else
                    for (kx = 0; kx < s.taps_w; kx++) {
                        acc += (int32_t)xr[kx] * kr[kx];
                    }
#endif
                }
                *yp = requantize(acc, &rq);
            }
        }
    }
    return FEDTINY_OK;
}
