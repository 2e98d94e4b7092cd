/* Fast forward kernels (see the "fast forward kernels" block of fedtiny_kernels.h): the same integers as the
 * reference fedtiny_conv2d and fedtiny_add by construction, in fewer instructions.
 *
 * - Every sum is exact in int32: the kernels sum doubled terms 2 (x - zp) w (the int16 columns and depthwise
 *   kernels hold them), starting from 2 x bias; a term is at most 2 * 255 * 128, and a window of fewer than
 *   2^30 / 32,640 terms keeps the doubled sum below 2^31 (larger windows run the reference kernel).
 * - Requantization is the reference's integer once per output, in one of two forms per layer (channel_requant):
 *   the fast form, fedtiny_arith.h's fedtiny_requantize_doubled (ADD, SMMLAR, ASR, SSAT) when every channel has a
 *   multiplier >= 0, a shift in [-22, -1] and |bias| + the window's bound < 2^29 (as quantized models do); else
 *   the general form: half the sum plus the bias, saturated (QADD), then fedtiny_multiply_by_quantized_multiplier_i32.
 *   The activation clamp follows (four outputs at once with SSUB8/SEL where they are stored together). A conv with
 *   a multiplier of INT32_MIN (never made by the quantizer) runs the reference kernel.
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

static inline const int8_t *weight_row(const fedtiny_conv2d_params *p, int32_t oc, int32_t row_len)
{
    return oc < p->sram_rows ? p->weight_sram + oc * row_len : p->weight + oc * row_len;
}

/* ---- requantization ------------------------------------------------------------------------------------- */

/* The output's zero point and clamp, the clamp taken before the zero point is added (so that no int32 sum can
 * overflow): copied out of the params once per call (every int8 store may alias the params struct, so the
 * compiler would reload its fields after each one). */
typedef struct {
    int32_t zero_point, lo, hi; /* lo = act_min - zero_point, hi = act_max - zero_point */
} output_range;

static inline output_range output_range_of(const fedtiny_conv2d_params *p)
{
    output_range o;
    o.zero_point = p->out_zero_point;
    o.lo = p->act_min - p->out_zero_point;
    o.hi = p->act_max - p->out_zero_point;
    return o;
}

/* fedtiny_requantize((int64_t)acc + bias, multiplier, shift, ...) for a multiplier other than INT32_MIN: the
 * saturating add of the bias (QADD), then fedtiny_arith.h's one-multiply form of the multiply-shift. */
static inline int8_t requantize(int32_t acc, int32_t bias, int32_t multiplier, int32_t shift, output_range o)
{
    int32_t v;
#if FAST_DSP
    v = __qadd(acc, bias);
#else
    v = (int32_t)fedtiny_clamp_i32_64((int64_t)acc + bias);
#endif
    v = fedtiny_multiply_by_quantized_multiplier_i32(v, multiplier, shift);
    v = v < o.lo ? o.lo : (v > o.hi ? o.hi : v);
    return (int8_t)(v + o.zero_point);
}

static inline int32_t bias_of(const fedtiny_conv2d_params *p, int32_t oc)
{
    return p->bias_sram != NULL ? p->bias_sram[oc] : p->bias[oc];
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

/* ---- requantization by output channel, read once per block of outputs ------------------------------------ */

/* One output channel's requantization. The fast form (fedtiny_arith.h's fedtiny_requantize_doubled, four
 * instructions per output on the M4): the kernels sum doubled terms 2 (x - zp) w, starting from bias2 = 2 bias,
 * then shift = r = -(the params' shift) and addend = fedtiny_requant_addend(r, output zero point). The general form,
 * for a layer where some channel is outside the fast form's range: bias2 = 0, addend = the bias, shift = the
 * params' shift; half the doubled sum plus the bias, saturated (the reference's int64 sum clamped to int32), then
 * fedtiny_multiply_by_quantized_multiplier_i32 and the zero point. */
typedef struct {
    int32_t bias2, multiplier, shift, addend;
} channel_requant;

/* |2 sum| of a window of `window` terms stays below 2^31: the doubled sums need window * 255 * 128 < 2^30. */
static int doubled_sums_fit(int32_t window) { return window < (1 << 30) / 32640; }

/* Output channel oc's requantization in the general form. */
static inline channel_requant requant_of(const fedtiny_conv2d_params *p, int32_t oc)
{
    channel_requant e;
    e.multiplier = p->multiplier[oc];
    e.bias2 = 0;
    e.shift = p->shift[oc];
    e.addend = bias_of(p, oc);
    return e;
}

/* Whether a channel takes the fast form: a multiplier >= 0, r = -shift in [1, 22] and |bias| + window * 255 * 128
 * < 2^29 (|bias| < room), so that |sum + bias| < 2^29, the fast form's range. */
static inline int fits_fast_form(int32_t bias, int32_t multiplier, int32_t r, int32_t room)
{
    return multiplier >= 0 && r >= 1 && r <= 22 && bias > -room && bias < room;
}

/* |bias| must stay below this for a window of `window` terms (doubled_sums_fit: window * 32640 < 2^30). */
static inline int32_t bias_room(int32_t window) { return (1 << 29) - window * 32640; }

/* Output channel oc's requantization in the fast form. */
static inline channel_requant requant_fast_of(const fedtiny_conv2d_params *p, int32_t oc)
{
    channel_requant e;
    e.multiplier = p->multiplier[oc];
    e.bias2 = 2 * bias_of(p, oc);
    e.shift = -p->shift[oc];
    e.addend = fedtiny_requant_addend(e.shift, p->out_zero_point);
    return e;
}

/* 1 if every output channel takes the fast form. */
static int fast_form_fits(const fedtiny_conv2d_params *p, int32_t window)
{
    const int32_t room = bias_room(window), out_c = p->out_c;
    const int32_t *bias = p->bias_sram != NULL ? p->bias_sram : p->bias, *multiplier = p->multiplier;
    const int32_t *shift = p->shift;
    int32_t oc;
    for (oc = 0; oc < out_c; oc++) {
        if (!fits_fast_form(bias[oc], multiplier[oc], -shift[oc], room)) {
            return 0;
        }
    }
    return 1;
}

/* The table of every output channel's requantization; 1 if all take the fast form, else the table holds the
 * general form. One pass while the channels fit. */
static int requant_table(const fedtiny_conv2d_params *p, int32_t window, channel_requant *t)
{
    const int32_t room = bias_room(window);
    const int32_t *bias = p->bias_sram != NULL ? p->bias_sram : p->bias, *multiplier = p->multiplier;
    const int32_t *shift = p->shift, zero_point = p->out_zero_point, out_c = p->out_c;
    int32_t oc;
    for (oc = 0; oc < out_c; oc++, t++) {
        const int32_t b = bias[oc], m = multiplier[oc], r = -shift[oc];
        if (!fits_fast_form(b, m, r, room)) {
            break;
        }
        t->bias2 = 2 * b;
        t->multiplier = m;
        t->shift = r;
        t->addend = fedtiny_requant_addend(r, zero_point);
    }
    if (oc == out_c) {
        return 1;
    }
    for (t -= oc, oc = 0; oc < out_c; oc++) {
        t[oc] = requant_of(p, oc);
    }
    return 0;
}

static inline int32_t saturate_int8(int32_t v)
{
#if FAST_DSP
    return __ssat(v, 8);
#else
    return v < -128 ? -128 : (v > 127 ? 127 : v);
#endif
}

/* A doubled sum -> the output value with its zero point, saturated to int8 (the activation clamp comes after:
 * it lies inside int8, so clamping the saturated value is clamping the value). */
static inline __attribute__((always_inline)) int32_t requant_one(int32_t sum2, const channel_requant *e, int fast,
                                                                 int32_t zero_point)
{
    int32_t v;
    if (fast) {
        return saturate_int8(fedtiny_requantize_doubled(sum2, e->multiplier, e->shift, e->addend));
    }
#if FAST_DSP
    v = __qadd(sum2 >> 1, e->addend);
#else
    v = (int32_t)fedtiny_clamp_i32_64((int64_t)(sum2 >> 1) + e->addend);
#endif
    v = fedtiny_multiply_by_quantized_multiplier_i32(v, e->multiplier, e->shift);
    v = v < -256 ? -256 : (v > 255 ? 255 : v); /* keeps v + zero point from wrapping; saturated below anyway */
    return saturate_int8(v + zero_point);
}

/* The activation clamp [act_min, act_max] (inside int8) of four outputs packed as bytes, the first in the low byte;
 * lo4, hi4: the bounds in every byte. On the M4 two SSUB8 + SEL pairs (the byte-wise max, then min). */
static inline uint32_t clamp4(uint32_t v, uint32_t lo4, uint32_t hi4)
{
#if FAST_DSP
    uint32_t t;
    __asm__("ssub8 %1, %0, %2\n\tsel %0, %0, %2\n\tssub8 %1, %3, %0\n\tsel %0, %0, %3"
            : "+r"(v), "=&r"(t)
            : "r"(lo4), "r"(hi4));
    return v;
#else
    uint32_t out = 0;
    int32_t i;
    for (i = 0; i < 32; i += 8) {
        const int32_t b = (int8_t)(v >> i), lo = (int8_t)(lo4 >> i), hi = (int8_t)(hi4 >> i);
        out |= (uint32_t)(uint8_t)(b < lo ? lo : (b > hi ? hi : b)) << i;
    }
    return out;
#endif
}

/* Four int8 values (in int32) as bytes, the first in the low byte (three BFI on the M4; gcc spells it in nine). */
static inline uint32_t pack4(int32_t b0, int32_t b1, int32_t b2, int32_t b3)
{
#if FAST_DSP
    uint32_t v = (uint32_t)b0;
    __asm__("bfi %0, %1, #8, #8\n\tbfi %0, %2, #16, #8\n\tbfi %0, %3, #24, #8" : "+r"(v) : "r"(b1), "r"(b2), "r"(b3));
    return v;
#endif
    return ((uint32_t)b0 & 0xFFu) | (((uint32_t)b1 & 0xFFu) << 8) | (((uint32_t)b2 & 0xFFu) << 16)
           | ((uint32_t)b3 << 24);
}

/* The output's zero point and activation bounds, also in every byte of a word (for clamp4): copied out of the
 * params once per call (every int8 store may alias the params struct, so the compiler would reload its fields). */
typedef struct {
    int32_t zero_point, act_min, act_max;
    uint32_t lo4, hi4;
} output_bounds;

static inline output_bounds output_bounds_of(const fedtiny_conv2d_params *p)
{
    output_bounds o;
    o.zero_point = p->out_zero_point;
    o.act_min = p->act_min;
    o.act_max = p->act_max;
    o.lo4 = ((uint32_t)p->act_min & 0xFFu) * 0x01010101u;
    o.hi4 = ((uint32_t)p->act_max & 0xFFu) * 0x01010101u;
    return o;
}

static inline int8_t clamp1(int32_t v, const output_bounds *o)
{
    return (int8_t)(v < o->act_min ? o->act_min : (v > o->act_max ? o->act_max : v));
}

static inline void store_u32(int8_t *p, uint32_t v) { memcpy(p, &v, 4); /* one STR: the M4 stores unaligned */ }
static inline void store_u16(int8_t *p, uint32_t v)
{
    const uint16_t h = (uint16_t)v;
    memcpy(p, &h, 2);
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

/* Bytes 1 and 3 of v, sign-extended to halfwords (SXTB16 with its rotation, which gcc does not fold). */
static inline int32_t sxtb16_ror8(int32_t v)
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

/* The two columns interleave by blocks of four values (column 0's, then column 1's: one pointer walks both);
 * within a full block the order is (0, 2, 1, 3) (bits 0 and 1 swapped), the last, partial block is in order. */
static inline int32_t column_pos(int32_t i, int32_t slot, int32_t full, int32_t stride)
{
    (void)stride;
    return ((i >> 2) << 3) + (slot << 2) + (i < full ? (i & 3) ^ ((((i & 3) ^ ((i & 3) >> 1)) & 1) * 3) : (i & 3));
}
#else
/* Two plain columns, one after the other. */
static inline int32_t column_pos(int32_t i, int32_t slot, int32_t full, int32_t stride)
{
    (void)full;
    return slot * stride + i;
}
#endif

/* Where one pixel's window goes: the scratch, its slot (0 or 1), the length of the full blocks, the stride. */
typedef struct {
    int16_t *col;
    int32_t slot, full, stride;
} column;

/* Column values [i, i + n) from n int8 inputs: 2 (x - zero point), the doubled terms of the fast requantization. */
static void column_run(const int8_t *xp, int32_t n, int32_t zp, const column *c, int32_t i)
{
#if FAST_DSP
    const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
    for (; n > 0 && (i & 3) != 0; n--, i++) {
        c->col[column_pos(i, c->slot, c->full, c->stride)] = (int16_t)(2 * (*xp++ - zp));
    }
    for (; n >= 4 && i + 4 <= c->full; n -= 4, i += 4, xp += 4) {
        const int32_t v = read_s8x4(xp);
        int16_t *block = c->col + ((i >> 2) << 3) + (c->slot << 2);
        const int32_t d02 = __ssub16(__sxtb16(v), zp2), d13 = __ssub16(sxtb16_ror8(v), zp2);
        write_s16x2(block, __sadd16(d02, d02));     /* values 0, 2 */
        write_s16x2(block + 2, __sadd16(d13, d13)); /* values 1, 3 */
    }
#endif
    for (; n > 0; n--, i++) {
        c->col[column_pos(i, c->slot, c->full, c->stride)] = (int16_t)(2 * (*xp++ - zp));
    }
}

static void column_zeros(int32_t n, const column *c, int32_t i)
{
    for (; n > 0; n--, i++) {
        c->col[column_pos(i, c->slot, c->full, c->stride)] = 0;
    }
}

/* The window of output pixel `pixel`, group g: kernel_h * kernel_w * cin_g values, padding as 0. */
static void load_window(const fedtiny_conv2d_params *p, const int8_t *x, int32_t pixel, int32_t g, int32_t cin_g,
                        const column *c)
{
    const int32_t oy = pixel / p->out_w;
    const int32_t ox = pixel - oy * p->out_w;
    const int32_t iy0 = oy * p->stride_h - p->pad_top;
    const int32_t ix0 = ox * p->stride_w - p->pad_left;
    const int32_t kx_lo = min_i32(p->kernel_w, max_i32(0, -ix0));
    const int32_t kx_hi = max_i32(kx_lo, min_i32(p->kernel_w, p->in_w - ix0));
    const int32_t row = p->kernel_w * cin_g;
    int32_t ky, kx, i = 0;
    if (p->kernel_h == 1 && p->kernel_w == 1 && p->groups == 1 && iy0 >= 0 && iy0 < p->in_h && ix0 >= 0
        && ix0 < p->in_w) { /* a 1 x 1 conv's window inside the input: one run of it */
        column_run(x + (iy0 * p->in_w + ix0) * p->in_c, row, p->in_zero_point, c, 0);
        return;
    }
    for (ky = 0; ky < p->kernel_h; ky++, i += row) {
        const int32_t iy = iy0 + ky;
        const int8_t *xp;
        if (iy < 0 || iy >= p->in_h) {
            column_zeros(row, c, i);
            continue;
        }
        xp = x + (iy * p->in_w + ix0 + kx_lo) * p->in_c + g * cin_g;
        column_zeros(kx_lo * cin_g, c, i);
        if (p->groups == 1) { /* the valid taps of a row are one run of the input */
            column_run(xp, (kx_hi - kx_lo) * cin_g, p->in_zero_point, c, i + kx_lo * cin_g);
        } else {
            for (kx = kx_lo; kx < kx_hi; kx++, xp += p->in_c) {
                column_run(xp, cin_g, p->in_zero_point, c, i + kx * cin_g);
            }
        }
        column_zeros((p->kernel_w - kx_hi) * cin_g, c, i + kx_hi * cin_g);
    }
}

/* Column stride: the window's length rounded up to 4 values (8 bytes: the columns stay word-aligned). */
static int32_t column_stride(const fedtiny_conv2d_params *p)
{
    return (p->kernel_h * p->kernel_w * (p->in_c / p->groups) + 3) & ~3;
}

/* Two columns, then the requantization table of the output channels. */
size_t fedtiny_conv2d_fast_scratch_bytes(const fedtiny_conv2d_params *p)
{
    return 2u * (size_t)column_stride(p) * sizeof(int16_t) + (size_t)p->out_c * sizeof(channel_requant);
}

/* The dot products of weight rows w0, w1 (len values) with the two columns at col, added to the sums:
 * *a00 = (column 0, row 0), *a01 = (column 0, row 1), *a10 = (column 1, row 0), *a11 = (column 1, row 1). */
static inline void dot_2x2(const int8_t *w0, const int8_t *w1, const int16_t *col, int32_t len, int32_t stride,
                           int32_t *a00, int32_t *a01, int32_t *a10, int32_t *a11)
{
    int32_t s00 = *a00, s01 = *a01, s10 = *a10, s11 = *a11;
#if FAST_DSP
    const int8_t *end = w0 + (len & ~3);
    const int32_t rest = len & 3;
    (void)stride;
    for (; w0 != end; w0 += 4, w1 += 4, col += 8) {
        const int32_t u = read_s8x4(w0), v = read_s8x4(w1);
        const int32_t u02 = __sxtb16(u), u13 = sxtb16_ror8(u);
        const int32_t v02 = __sxtb16(v), v13 = sxtb16_ror8(v);
        const int32_t x02 = read_s16x2(col), x13 = read_s16x2(col + 2);
        const int32_t z02 = read_s16x2(col + 4), z13 = read_s16x2(col + 6);
        s00 = __smlad(u02, x02, s00);
        s00 = __smlad(u13, x13, s00);
        s01 = __smlad(v02, x02, s01);
        s01 = __smlad(v13, x13, s01);
        s10 = __smlad(u02, z02, s10);
        s10 = __smlad(u13, z13, s10);
        s11 = __smlad(v02, z02, s11);
        s11 = __smlad(v13, z13, s11);
    }
    if (rest >= 2) { /* two weights as one halfword: bytes 0 and 2 of h | h << 8 are w[0] and w[1] */
        uint16_t h0, h1;
        int32_t u, v, x, z;
        memcpy(&h0, w0, 2);
        memcpy(&h1, w1, 2);
        u = __sxtb16((int32_t)(h0 | ((uint32_t)h0 << 8)));
        v = __sxtb16((int32_t)(h1 | ((uint32_t)h1 << 8)));
        x = read_s16x2(col);
        z = read_s16x2(col + 4);
        s00 = __smlad(u, x, s00);
        s01 = __smlad(v, x, s01);
        s10 = __smlad(u, z, s10);
        s11 = __smlad(v, z, s11);
    }
    if (rest & 1) {
        const int32_t k0 = w0[rest - 1], k1 = w1[rest - 1], x0 = col[rest - 1], x1 = col[4 + rest - 1];
        s00 += x0 * k0;
        s01 += x0 * k1;
        s10 += x1 * k0;
        s11 += x1 * k1;
    }
#else
    const int16_t *c0 = col, *c1 = col + stride;
    int32_t i;
    for (i = 0; i < len; i++) {
        const int32_t x0 = c0[i], x1 = c1[i], k0 = w0[i], k1 = w1[i];
        s00 += x0 * k0;
        s01 += x0 * k1;
        s10 += x1 * k0;
        s11 += x1 * k1;
    }
#endif
    *a00 = s00;
    *a01 = s01;
    *a10 = s10;
    *a11 = s11;
}

/* A pixel alone (a linear layer's one output pixel, or an odd last pixel): the dot products of four weight rows
 * with column 0 at col, added to a[0..3]; each column word is loaded once for the four rows. */
static inline void dot_4x1(const int8_t *w0, const int8_t *w1, const int8_t *w2, const int8_t *w3, const int16_t *col,
                           int32_t len, int32_t *a)
{
    int32_t s0 = a[0], s1 = a[1], s2 = a[2], s3 = a[3];
#if FAST_DSP
    int32_t quads = len >> 2;
    const int32_t rest = len & 3;
    if (quads != 0) {
        /* Written out: four row pointers, the column, the count, four sums and four temporaries take all 14
         * registers, and gcc spills pointers inside the loop when it keeps copies for the tail (24 instructions
         * per 16 MACs here, 33 as gcc compiled it). */
        int32_t x02, x13, w, t;
        __asm__("1:\n\t"
                "ldr %[x13], [%[col], #4]\n\t"
                "ldr %[x02], [%[col]], #16\n\t"
                "ldr %[w], [%[w0]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s0], %[t], %[x02], %[s0]\n\t"
                "smlad %[s0], %[w], %[x13], %[s0]\n\t"
                "ldr %[w], [%[w1]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s1], %[t], %[x02], %[s1]\n\t"
                "smlad %[s1], %[w], %[x13], %[s1]\n\t"
                "ldr %[w], [%[w2]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s2], %[t], %[x02], %[s2]\n\t"
                "smlad %[s2], %[w], %[x13], %[s2]\n\t"
                "ldr %[w], [%[w3]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s3], %[t], %[x02], %[s3]\n\t"
                "smlad %[s3], %[w], %[x13], %[s3]\n\t"
                "subs %[n], %[n], #1\n\t"
                "bne 1b"
                : [s0] "+r"(s0), [s1] "+r"(s1), [s2] "+r"(s2), [s3] "+r"(s3), [w0] "+r"(w0), [w1] "+r"(w1),
                  [w2] "+r"(w2), [w3] "+r"(w3), [col] "+r"(col), [n] "+r"(quads), [x02] "=&r"(x02),
                  [x13] "=&r"(x13), [w] "=&r"(w), [t] "=&r"(t)
                :
                : "cc", "memory");
    }
    if (rest >= 2) { /* the partial block is in natural order: two weights as one halfword, as in dot_2x2 */
        const int32_t x = read_s16x2(col);
        uint16_t h;
        memcpy(&h, w0, 2);
        s0 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s0);
        memcpy(&h, w1, 2);
        s1 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s1);
        memcpy(&h, w2, 2);
        s2 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s2);
        memcpy(&h, w3, 2);
        s3 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s3);
    }
    if (rest & 1) {
        const int32_t x = col[rest - 1];
        s0 += x * w0[rest - 1];
        s1 += x * w1[rest - 1];
        s2 += x * w2[rest - 1];
        s3 += x * w3[rest - 1];
    }
#else
    int32_t i;
    for (i = 0; i < len; i++) {
        const int32_t x = col[i];
        s0 += x * w0[i];
        s1 += x * w1[i];
        s2 += x * w2[i];
        s3 += x * w3[i];
    }
#endif
    a[0] = s0;
    a[1] = s1;
    a[2] = s2;
    a[3] = s3;
}

/* 2 pixels x 2 channels: rows oc and oc1 (oc1 = oc for a group's odd last channel) with the two columns, from the
 * channels' bias2, requantized and clamped; outputs at y0 + oc, y0 + oc1 (pixel 0) and y1 + ... (pixel 1). */
static inline __attribute__((always_inline)) void block_2x2(const fedtiny_conv2d_params *p, const column *c,
                                                            int32_t len, const channel_requant *table, int32_t oc,
                                                            int32_t oc1, int fast, const output_bounds *o,
                                                            int8_t *y0, int8_t *y1)
{
    const channel_requant *e0 = table + oc, *e1 = table + oc1;
    int32_t a00 = e0->bias2, a01 = e1->bias2, a10 = e0->bias2, a11 = e1->bias2;
    dot_2x2(weight_row(p, oc, len), weight_row(p, oc1, len), c->col, len, c->stride, &a00, &a01, &a10, &a11);
    a00 = requant_one(a00, e0, fast, o->zero_point);
    a10 = requant_one(a10, e0, fast, o->zero_point);
    if (oc1 != oc) {
        const uint32_t v = clamp4(pack4(a00, requant_one(a01, e1, fast, o->zero_point), a10,
                                        requant_one(a11, e1, fast, o->zero_point)), o->lo4, o->hi4);
        store_u16(y0 + oc, v);
        store_u16(y1 + oc, v >> 16);
    } else {
        y0[oc] = clamp1(a00, o);
        y1[oc] = clamp1(a10, o);
    }
}

/* The output pixel `pixel` alone: its window once per group, four channels per pass, requantized into y0 (a
 * group's last pass repeats its last row where it has fewer than four left, and stores only its own outputs); the
 * channels' requantization straight from the params (each is used once: a table costs more than it saves). */
static inline __attribute__((always_inline)) void one_pixel(const fedtiny_conv2d_params *p, const int8_t *x,
                                                            int32_t pixel, const column *c, int fast,
                                                            const output_bounds *o, int8_t *y0)
{
    const int32_t cin_g = p->in_c / p->groups, cout_g = p->out_c / p->groups;
    const int32_t len = p->kernel_h * p->kernel_w * cin_g;
    int32_t g, oc, i;
    for (g = 0; g < p->groups; g++) {
        const int32_t last = (g + 1) * cout_g - 1;
        load_window(p, x, pixel, g, cin_g, c);
        for (oc = g * cout_g; oc <= last; oc += 4) {
            const int32_t o1 = oc + 1 < last ? oc + 1 : last, o2 = oc + 2 < last ? oc + 2 : last;
            const int32_t o3 = oc + 3 < last ? oc + 3 : last;
            const channel_requant e0 = fast ? requant_fast_of(p, oc) : requant_of(p, oc);
            const channel_requant e1 = fast ? requant_fast_of(p, o1) : requant_of(p, o1);
            const channel_requant e2 = fast ? requant_fast_of(p, o2) : requant_of(p, o2);
            const channel_requant e3 = fast ? requant_fast_of(p, o3) : requant_of(p, o3);
            int32_t a[4];
            a[0] = e0.bias2;
            a[1] = e1.bias2;
            a[2] = e2.bias2;
            a[3] = e3.bias2;
            dot_4x1(weight_row(p, oc, len), weight_row(p, o1, len), weight_row(p, o2, len), weight_row(p, o3, len),
                    c->col, len, a);
            a[0] = requant_one(a[0], &e0, fast, o->zero_point);
            a[1] = requant_one(a[1], &e1, fast, o->zero_point);
            a[2] = requant_one(a[2], &e2, fast, o->zero_point);
            a[3] = requant_one(a[3], &e3, fast, o->zero_point);
            if (oc + 3 <= last) {
                store_u32(y0 + oc, clamp4(pack4(a[0], a[1], a[2], a[3]), o->lo4, o->hi4));
            } else {
                for (i = 0; oc + i <= last; i++) {
                    y0[oc + i] = clamp1(a[i], o);
                }
            }
        }
    }
}

/* ---- conv2d, fast linear: a 1 x 1 conv on a 1 x 1 map, groups 1 (a linear layer) -------------------------- */

/* The input as one int16 column of doubled terms 2 (x - zero point); on the M4 each full block of four in the
 * order (0, 2, 1, 3) (SXTB16's halves), the last, partial block in order. */
static void linear_column(const int8_t *x, int32_t n, int32_t zp, int16_t *col)
{
#if FAST_DSP
    const int32_t zp2 = (int32_t)(((uint32_t)zp & 0xFFFFu) | ((uint32_t)zp << 16));
    const int8_t *end = x + (n & ~3);
    for (; x != end; x += 4, col += 4) {
        const int32_t v = read_s8x4(x);
        const int32_t d02 = __ssub16(__sxtb16(v), zp2), d13 = __ssub16(sxtb16_ror8(v), zp2);
        write_s16x2(col, __sadd16(d02, d02));
        write_s16x2(col + 2, __sadd16(d13, d13));
    }
    n &= 3;
#endif
    for (; n > 0; n--) {
        *col++ = (int16_t)(2 * (*x++ - zp));
    }
}

/* The dot products of four weight rows with the column (len values) -> s[0..3]. */
static inline __attribute__((always_inline)) void linear_dot4(const int8_t *w0, const int8_t *w1, const int8_t *w2,
                                                              const int8_t *w3, const int16_t *col, int32_t len,
                                                              int32_t *s)
{
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if FAST_DSP
    int32_t quads = len >> 2;
    const int32_t rest = len & 3;
    if (quads != 0) {
        /* Written out, as dot_4x1 (14 registers); the column's four values in one LDRD: 23 instructions per 16
         * MACs. */
        int32_t x02, x13, w, t;
        __asm__("1:\n\t"
                "ldrd %[x02], %[x13], [%[col]], #8\n\t"
                "ldr %[w], [%[w0]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s0], %[t], %[x02], %[s0]\n\t"
                "smlad %[s0], %[w], %[x13], %[s0]\n\t"
                "ldr %[w], [%[w1]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s1], %[t], %[x02], %[s1]\n\t"
                "smlad %[s1], %[w], %[x13], %[s1]\n\t"
                "ldr %[w], [%[w2]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s2], %[t], %[x02], %[s2]\n\t"
                "smlad %[s2], %[w], %[x13], %[s2]\n\t"
                "ldr %[w], [%[w3]], #4\n\t"
                "sxtb16 %[t], %[w]\n\t"
                "sxtb16 %[w], %[w], ror #8\n\t"
                "smlad %[s3], %[t], %[x02], %[s3]\n\t"
                "smlad %[s3], %[w], %[x13], %[s3]\n\t"
                "subs %[n], %[n], #1\n\t"
                "bne 1b"
                : [s0] "+r"(s0), [s1] "+r"(s1), [s2] "+r"(s2), [s3] "+r"(s3), [w0] "+r"(w0), [w1] "+r"(w1),
                  [w2] "+r"(w2), [w3] "+r"(w3), [col] "+r"(col), [n] "+r"(quads), [x02] "=&r"(x02),
                  [x13] "=&r"(x13), [w] "=&r"(w), [t] "=&r"(t)
                :
                : "cc", "memory");
    }
    if (rest >= 2) { /* two weights as one halfword: bytes 0 and 2 of h | h << 8 are w[0] and w[1] */
        const int32_t x = read_s16x2(col);
        uint16_t h;
        memcpy(&h, w0, 2);
        s0 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s0);
        memcpy(&h, w1, 2);
        s1 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s1);
        memcpy(&h, w2, 2);
        s2 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s2);
        memcpy(&h, w3, 2);
        s3 = __smlad(__sxtb16((int32_t)(h | ((uint32_t)h << 8))), x, s3);
    }
    if (rest & 1) {
        const int32_t x = col[rest - 1];
        s0 += x * w0[rest - 1];
        s1 += x * w1[rest - 1];
        s2 += x * w2[rest - 1];
        s3 += x * w3[rest - 1];
    }
#else
    int32_t i;
    for (i = 0; i < len; i++) {
        const int32_t x = col[i];
        s0 += x * w0[i];
        s1 += x * w1[i];
        s2 += x * w2[i];
        s3 += x * w3[i];
    }
#endif
    s[0] = s0;
    s[1] = s1;
    s[2] = s2;
    s[3] = s3;
}

static inline int32_t saturating_add(int32_t a, int32_t b)
{
#if FAST_DSP
    return __qadd(a, b);
#else
    return (int32_t)fedtiny_clamp_i32_64((int64_t)a + b);
#endif
}

/* The reference's requantization of an exact sum (as fedtiny_conv2d), with the zero point, saturated to int8: the
 * linear layer's channels outside the fast form (out of line: it would take the loop's registers). */
static __attribute__((noinline)) int32_t requantize_reference(int32_t sum, int32_t bias, int32_t m, int32_t s,
                                                                 int32_t zero_point)
{
    return fedtiny_requantize((int64_t)sum + bias, m, s, zero_point, -128, 127);
}

/* Output channel (bias b, multiplier m, shift s)'s value from its doubled dot product d2 (no bias yet), with the
 * output zero point, saturated to int8 (k = 1 + 2 zero point). Each channel decides its form itself, on its own
 * sum (a linear layer uses each channel once, so a table or a per-layer check would cost as much again): the fast
 * form when the multiplier is >= 0, r = -s is in [1, 22] and |d2 + 2 b| < 2^30 (saturated: |sum + bias| < 2^29, its
 * range; the addend is k << (r - 1)); else the reference's requantization of the exact sum d2 / 2 + b, which also
 * covers a multiplier of INT32_MIN. */
static inline __attribute__((always_inline)) int32_t linear_output(int32_t d2, int32_t b, int32_t m, int32_t s,
                                                                   int32_t k, int32_t zero_point)
{
    const int32_t rm1 = ~s; /* r - 1 */
    const int32_t v = saturating_add(d2, saturating_add(b, b));
    if (__builtin_expect((uint32_t)(rm1 | (m >> 31)) < 22u && (uint32_t)v + 0x40000000u < 0x80000000u, 1)) {
        return saturate_int8(fedtiny_requantize_doubled(v, m, rm1 + 1, (int32_t)((uint32_t)k << rm1)));
    }
    return requantize_reference(d2 >> 1, b, m, s, zero_point);
}

/* The dot products of `rows` consecutive weight rows from w with the column -> sums[0..rows), four rows per pass;
 * a partial last pass repeats its last row and writes up to sums[rows + 2]. */
static void linear_rows(const int8_t *w, int32_t rows, int32_t len, const int16_t *col, int32_t *sums)
{
    for (; rows >= 4; rows -= 4, w += 4 * len, sums += 4) {
        linear_dot4(w, w + len, w + 2 * len, w + 3 * len, col, len, sums);
    }
    if (rows > 0) {
        const int8_t *w1 = rows > 1 ? w + len : w, *w2 = rows > 2 ? w + 2 * len : w1;
        linear_dot4(w, w1, w2, w2, col, len, sums);
    }
}

/* x (1, 1, in_c) -> y (1, 1, out_c): the input's column once; the dot products into the scratch (up to 4 x
 * (out_c + 3) bytes), then four outputs per pass (clamped and stored as one word; the last ones one by one). */
static __attribute__((noinline)) void linear_fast(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y,
                                                  int16_t *col, int32_t *sums)
{
    const int32_t len = p->in_c, n = p->out_c, k = 1 + 2 * p->out_zero_point, zp = p->out_zero_point;
    const int32_t *bias = p->bias_sram != NULL ? p->bias_sram : p->bias, *mult = p->multiplier, *shift = p->shift;
    const output_bounds o = output_bounds_of(p);
    int32_t oc;
    linear_column(x, len, p->in_zero_point, col);
    /* the rows in SRAM first: a partial last pass of theirs writes sums that the rows in flash then overwrite */
    linear_rows(p->weight_sram, min_i32(p->sram_rows, n), len, col, sums);
    linear_rows(p->weight + max_i32(p->sram_rows, 0) * len, n - max_i32(p->sram_rows, 0), len, col,
                sums + max_i32(p->sram_rows, 0));
    for (oc = 0; oc + 4 <= n; oc += 4, sums += 4, bias += 4, mult += 4, shift += 4) {
        const int32_t v0 = linear_output(sums[0], bias[0], mult[0], shift[0], k, zp);
        const int32_t v1 = linear_output(sums[1], bias[1], mult[1], shift[1], k, zp);
        const int32_t v2 = linear_output(sums[2], bias[2], mult[2], shift[2], k, zp);
        const int32_t v3 = linear_output(sums[3], bias[3], mult[3], shift[3], k, zp);
        store_u32(y + oc, clamp4(pack4(v0, v1, v2, v3), o.lo4, o.hi4));
    }
    for (; oc < n; oc++, sums++, bias++, mult++, shift++) {
        y[oc] = clamp1(linear_output(sums[0], bias[0], mult[0], shift[0], k, zp), &o);
    }
}

static int is_linear(const fedtiny_conv2d_params *p)
{
    return p->groups == 1 && p->in_h == 1 && p->in_w == 1 && p->out_h == 1 && p->out_w == 1 && p->kernel_h == 1
           && p->kernel_w == 1 && p->pad_top == 0 && p->pad_left == 0;
}

/* The whole conv with the table's form (fast: a constant at each call site, so each form is its own loop). */
static inline __attribute__((always_inline)) void conv_fast_body(const fedtiny_conv2d_params *p, const int8_t *x,
                                                                 int8_t *y, column *c0, column *c1,
                                                                 const channel_requant *table, int fast)
{
    const int32_t cin_g = p->in_c / p->groups, cout_g = p->out_c / p->groups;
    const int32_t len = p->kernel_h * p->kernel_w * cin_g;
    const int32_t pixels = p->out_h * p->out_w, cout = p->out_c;
    const output_bounds o = output_bounds_of(p);
    int32_t pixel, g, oc;
    for (pixel = 0; pixel + 1 < pixels; pixel += 2) {
        int8_t *y0 = y + pixel * cout;
        int8_t *y1 = y0 + cout;
        for (g = 0; g < p->groups; g++) {
            const int32_t oc_end = (g + 1) * cout_g;
            load_window(p, x, pixel, g, cin_g, c0);
            load_window(p, x, pixel + 1, g, cin_g, c1);
            for (oc = g * cout_g; oc + 1 < oc_end; oc += 2) {
                block_2x2(p, c0, len, table, oc, oc + 1, fast, &o, y0, y1);
            }
            if (oc < oc_end) { /* an odd last channel: row 1 is row 0 */
                block_2x2(p, c0, len, table, oc, oc, fast, &o, y0, y1);
            }
        }
    }
    if (pixel < pixels) { /* an odd last pixel (or a linear layer's only one) */
        one_pixel(p, x, pixel, c0, fast, &o, y + pixel * cout);
    }
}

/* x (in_h, in_w, in_c) -> y (out_h, out_w, out_c), any groups, strides and padding (1x1 and linear included). */
fedtiny_status fedtiny_conv2d_fast(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t cin_g = p->groups > 0 ? p->in_c / p->groups : 0;
    const int32_t cout_g = p->groups > 0 ? p->out_c / p->groups : 0;
    const int32_t len = p->kernel_h * p->kernel_w * cin_g;
    column c0, c1;
    channel_requant *table;
    if (is_linear(p) && scratch != NULL && doubled_sums_fit(p->in_c)) {
        /* the column, then a sum per output channel, rounded up to four (the scratch has 16 bytes per channel) */
        linear_fast(p, x, y, (int16_t *)scratch, (int32_t *)scratch + column_stride(p) / 2);
        return FEDTINY_OK;
    }
    if (p->groups < 1 || cin_g * p->groups != p->in_c || cout_g * p->groups != p->out_c || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    if (!doubled_sums_fit(len)) {
        return fedtiny_conv2d(p, x, y, scratch);
    }
    if (any_min_multiplier(p)) {
        return fedtiny_conv2d(p, x, y, scratch);
    }
    c0.col = c1.col = (int16_t *)scratch;
    c0.full = c1.full = len & ~3;
    c0.stride = c1.stride = column_stride(p);
    c0.slot = 0;
    c1.slot = 1;
    table = (channel_requant *)(c0.col + 2 * c0.stride); /* 2 x stride int16: a multiple of 16 bytes */
    /* a linear layer (one output pixel) reads no table */
    if (p->out_h * p->out_w > 1 ? requant_table(p, len, table) : fast_form_fits(p, len)) {
        conv_fast_body(p, x, y, &c0, &c1, table, 1);
    } else {
        conv_fast_body(p, x, y, &c0, &c1, table, 0);
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

/* One kernel row's taps (pairs of int16 taps and weights, at most 5 pairs unrolled, then a loop). */
static inline int32_t taps_row(const int16_t *xr, const int16_t *kr, int32_t pairs, int32_t acc)
{
#if FAST_DSP
    switch (pairs) {
    default:
        for (; pairs > 5; pairs--, xr += 2, kr += 2) {
            acc = __smlad(read_s16x2(xr), read_s16x2(kr), acc);
        }
        /* fall through */
    case 5: acc = __smlad(read_s16x2(xr + 8), read_s16x2(kr + 8), acc); /* fall through */
    case 4: acc = __smlad(read_s16x2(xr + 6), read_s16x2(kr + 6), acc); /* fall through */
    case 3: acc = __smlad(read_s16x2(xr + 4), read_s16x2(kr + 4), acc); /* fall through */
    case 2: acc = __smlad(read_s16x2(xr + 2), read_s16x2(kr + 2), acc); /* fall through */
    case 1: acc = __smlad(read_s16x2(xr), read_s16x2(kr), acc);
    }
#else
    int32_t k;
    for (k = 0; k < 2 * pairs; k++) {
        acc += (int32_t)xr[k] * kr[k];
    }
#endif
    return acc;
}

/* One channel's outputs from its plane and doubled kernel (yp: its first output; outputs are in_c apart). */
static inline __attribute__((always_inline)) void depthwise_channel(const fedtiny_conv2d_params *p,
                                                                    const depthwise_shape *s, const int16_t *plane,
                                                                    const int16_t *kernel, int32_t kernel_h,
                                                                    int32_t pairs, const channel_requant e,
                                                                    int fast, const output_bounds *o, int8_t *yp)
{
    const int32_t c_n = p->in_c, stride_w = p->stride_w, plane_w = s->plane_w;
    const int32_t taps_w = s->taps_w, out_w = p->out_w;
    int32_t oy, ox, ky;
    for (oy = 0; oy < p->out_h; oy++) {
        const int16_t *win = plane + oy * p->stride_h * plane_w;
        for (ox = 0; ox < out_w; ox++, yp += c_n, win += stride_w) {
            int32_t acc = e.bias2;
#pragma GCC unroll 3
            for (ky = 0; ky < kernel_h; ky++) { /* unrolled where kernel_h is a constant 3 or 1 */
                acc = taps_row(win + ky * plane_w, kernel + ky * taps_w, pairs, acc);
            }
            *yp = clamp1(requant_one(acc, &e, fast, o->zero_point), o);
        }
    }
}

/* x (in_h, in_w, c) -> y (out_h, out_w, c); weight (c, kernel_h, kernel_w, 1). The kernel is doubled (2 w fits
 * int16), so that the sums are the doubled ones of the fast requantization (see conv2d_fast). */
fedtiny_status fedtiny_conv2d_depthwise(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t c_n = p->in_c;
    const int32_t taps = p->kernel_h * p->kernel_w;
    const depthwise_shape s = depthwise_shape_of(p);
    const int32_t pairs = s.taps_w / 2;
    const output_bounds o = output_bounds_of(p);
    int16_t *kernel = (int16_t *)scratch;           /* kernel_h x taps_w, even: the plane stays word-aligned */
    int16_t *plane = kernel + p->kernel_h * s.taps_w; /* plane_h x plane_w */
    const int32_t col_lo = min_i32(s.plane_w, max_i32(0, p->pad_left));
    const int32_t col_hi = max_i32(col_lo, min_i32(s.plane_w, p->pad_left + p->in_w));
    const int32_t row_lo = min_i32(s.plane_h, max_i32(0, p->pad_top));
    const int32_t row_hi = max_i32(row_lo, min_i32(s.plane_h, p->pad_top + p->in_h));
    int32_t c, r, q, ky, kx, fast;
    if (p->groups != c_n || p->out_c != c_n || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    if (p->out_h < 1 || p->out_w < 1) {
        return FEDTINY_OK;
    }
    if (any_min_multiplier(p) || !doubled_sums_fit(taps)) {
        return fedtiny_conv2d(p, x, y, scratch);
    }
    fast = fast_form_fits(p, taps);
    for (q = 0; q < s.plane_h * s.plane_w; q++) {
        plane[q] = 0; /* the padding, the same for every channel */
    }
    for (c = 0; c < c_n; c++) {
        const int8_t *wc = weight_row(p, c, taps);
        const channel_requant e = fast ? requant_fast_of(p, c) : requant_of(p, c);
        int8_t *yp = y + c;
        for (ky = 0; ky < p->kernel_h; ky++) {
            for (kx = 0; kx < s.taps_w; kx++) {
                kernel[ky * s.taps_w + kx] = (int16_t)(kx < p->kernel_w ? 2 * wc[ky * p->kernel_w + kx] : 0);
            }
        }
        for (r = row_lo; r < row_hi; r++) { /* the valid part; the padding stays the zeros written above */
            const int8_t *xp = x + ((r - p->pad_top) * p->in_w + col_lo - p->pad_left) * c_n + c;
            int16_t *pr = plane + r * s.plane_w;
            for (q = col_lo; q < col_hi; q++, xp += c_n) {
                pr[q] = (int16_t)(*xp - p->in_zero_point);
            }
        }
        /* Constant rows and pairs per row where they are known (3 x 3 and 1 x 5 kernels: the taps unrolled, the
         * kernel's pairs held in registers for the channel), a constant pairs per row elsewhere. */
        if (!fast) { /* the general form, one loop for every kernel */
            depthwise_channel(p, &s, plane, kernel, p->kernel_h, pairs, e, 0, &o, yp);
        } else if (p->kernel_h == 3 && pairs == 2) {
            depthwise_channel(p, &s, plane, kernel, 3, 2, e, 1, &o, yp);
        } else if (p->kernel_h == 1 && pairs == 3) {
            depthwise_channel(p, &s, plane, kernel, 1, 3, e, 1, &o, yp);
        } else if (pairs == 1) {
            depthwise_channel(p, &s, plane, kernel, p->kernel_h, 1, e, 1, &o, yp);
        } else if (pairs == 2) {
            depthwise_channel(p, &s, plane, kernel, p->kernel_h, 2, e, 1, &o, yp);
        } else {
            depthwise_channel(p, &s, plane, kernel, p->kernel_h, pairs, e, 1, &o, yp);
        }
    }
    return FEDTINY_OK;
}

/* ---- add, fast: TFLite's quantized ADD over pointers with its params hoisted -------------------------------- */

size_t fedtiny_add_fast_scratch_bytes(const fedtiny_add_params *p)
{
    (void)p;
    return 0;
}

/* The reference's integers (fedtiny_add): each input's (x - zero point) << left_shift fits int32 when left_shift <=
 * 23 (|x - zero point| <= 255), so its rescaling is fedtiny_multiply_by_quantized_multiplier_i32; the sum's int64
 * clamp to int32 is a saturating add (QADD), which a left output shift saturates the same way; then the output's
 * multiply-shift and clamp. Other params (a larger left_shift, a multiplier of INT32_MIN) run the reference. */
fedtiny_status fedtiny_add_fast(const fedtiny_add_params *p, const int8_t *a, const int8_t *b, int8_t *y)
{
    const int32_t n = p->size, left = p->left_shift, a_zp = p->a_zero_point, b_zp = p->b_zero_point;
    const int32_t am = p->a_multiplier, ash = p->a_shift, bm = p->b_multiplier, bsh = p->b_shift;
    const int32_t om = p->out_multiplier, osh = p->out_shift;
    const output_range o = {p->out_zero_point, p->act_min - p->out_zero_point, p->act_max - p->out_zero_point};
    const int8_t *end = a + n;
    int32_t scale;
    if (left < 0 || left > 23 || am == INT32_MIN || bm == INT32_MIN || om == INT32_MIN) {
        return fedtiny_add(p, a, b, y);
    }
    scale = (int32_t)1 << left;
    for (; a != end; a++, b++, y++) {
        const int32_t as = fedtiny_multiply_by_quantized_multiplier_i32((*a - a_zp) * scale, am, ash);
        const int32_t bs = fedtiny_multiply_by_quantized_multiplier_i32((*b - b_zp) * scale, bm, bsh);
        *y = requantize(as, bs, om, osh, o); /* the sum's saturating add, the output's multiply-shift and clamp */
    }
    return FEDTINY_OK;
}
