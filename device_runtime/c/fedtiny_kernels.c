/* The reference int8 kernels and the training kernels (see fedtiny_kernels.h; the fast forward kernels are in
 * fedtiny_kernels_fwd_fast.c). The Python definitions are in
 * fedtiny/kernels.py; tests/test_cruntime.py checks every kernel here against them bit for bit. */
#include "fedtiny_kernels.h"

#include "fedtiny_arith.h"

static int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
static int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

/* Weight row oc (row_len int8 values): the trainable SRAM copy for rows [0, sram_rows), else flash. */
static const int8_t *weight_row(const fedtiny_conv2d_params *p, int32_t oc, int32_t row_len)
{
    return oc < p->sram_rows ? p->weight_sram + oc * row_len : p->weight + oc * row_len;
}

static int32_t bias_of(const fedtiny_conv2d_params *p, int32_t oc)
{
    return p->bias_sram != NULL ? p->bias_sram[oc] : p->bias[oc];
}

/* Narrow a whole tensor of exact sums to int16 (arith.narrow_to_int16); returns the extra exponent. */
static int32_t narrow_tensor(const int64_t *acc, int32_t n, int16_t *g)
{
    uint64_t peak = 0;
    int32_t i, shift;
    for (i = 0; i < n; i++) {
        const uint64_t a = fedtiny_abs64(acc[i]);
        peak = a > peak ? a : peak;
    }
    shift = fedtiny_narrow_shift(peak);
    for (i = 0; i < n; i++) {
        g[i] = fedtiny_narrow_one(acc[i], shift);
    }
    return shift;
}

/* The same for int32 sums: kernels whose |sum| < 2^31 the compiler proved from the shapes
 * (fedtiny.device_memory.accumulator_bound), at half the scratch. */
static int32_t narrow_tensor32(const int32_t *acc, int32_t n, int16_t *g)
{
    uint64_t peak = 0;
    int32_t i, shift;
    for (i = 0; i < n; i++) {
        const uint64_t a = fedtiny_abs64(acc[i]);
        peak = a > peak ? a : peak;
    }
    shift = fedtiny_narrow_shift(peak);
    for (i = 0; i < n; i++) {
        g[i] = fedtiny_narrow_one(acc[i], shift);
    }
    return shift;
}

static void zero_i64(int64_t *a, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) {
        a[i] = 0;
    }
}

static void zero_i32(int32_t *a, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) {
        a[i] = 0;
    }
}

/* ---- conv2d, reference: any groups, strides, padding ------------------------------------------------ */

size_t fedtiny_conv2d_scratch_bytes(const fedtiny_conv2d_params *p)
{
    (void)p;
    return 0;
}

/* x (in_h, in_w, in_c) -> y (out_h, out_w, out_c) */
fedtiny_status fedtiny_conv2d(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t cin_g = p->in_c / p->groups;
    const int32_t cout_g = p->out_c / p->groups;
    int32_t oy, ox, oc, ky, kx, ic;
    (void)scratch;
    if (p->groups < 1 || cin_g * p->groups != p->in_c || cout_g * p->groups != p->out_c) {
        return FEDTINY_ERR_PARAMS;
    }
    for (oy = 0; oy < p->out_h; oy++) {
        for (ox = 0; ox < p->out_w; ox++) {
            for (oc = 0; oc < p->out_c; oc++) {
                const int32_t g = oc / cout_g;
                int32_t acc = 0;
                for (ky = 0; ky < p->kernel_h; ky++) {
                    const int32_t iy = oy * p->stride_h - p->pad_top + ky;
                    if (iy < 0 || iy >= p->in_h) {
                        continue; /* padding holds the zero point: it adds nothing */
                    }
                    for (kx = 0; kx < p->kernel_w; kx++) {
                        const int32_t ix = ox * p->stride_w - p->pad_left + kx;
                        const int8_t *xp;
                        const int8_t *wp;
                        if (ix < 0 || ix >= p->in_w) {
                            continue;
                        }
                        xp = x + (iy * p->in_w + ix) * p->in_c + g * cin_g;
                        wp = weight_row(p, oc, p->kernel_h * p->kernel_w * cin_g) + (ky * p->kernel_w + kx) * cin_g;
                        for (ic = 0; ic < cin_g; ic++) {
                            acc += ((int32_t)xp[ic] - p->in_zero_point) * (int32_t)wp[ic];
                        }
                    }
                }
                y[(oy * p->out_w + ox) * p->out_c + oc] =
                    fedtiny_requantize((int64_t)acc + bias_of(p, oc), p->multiplier[oc], p->shift[oc],
                                       p->out_zero_point, p->act_min, p->act_max);
            }
        }
    }
    return FEDTINY_OK;
}

/* ---- conv2d backward: input gradient, weight and bias updates -------------------------------------------- */

size_t fedtiny_conv2d_input_grad_scratch_bytes(const fedtiny_conv2d_input_grad_params *p)
{
    const size_t pixels = p->recompute ? 1u : (size_t)p->conv->in_h * (size_t)p->conv->in_w;
    return pixels * (size_t)p->conv->in_c * sizeof(int64_t);
}

/* The exact gradient sums of one input pixel (iy, ix), gathered from every output whose window covers it:
 * acc[c] = sum g_y[oy, ox, o] ws[o] W[o, ky, kx, c] over oy stride_h = iy + pad_top - ky (and the same in x). */
static void input_grad_pixel(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y, int32_t iy, int32_t ix,
                             int64_t *acc)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t cin_g = c->in_c / c->groups;
    const int32_t cout_g = c->out_c / c->groups;
    const int32_t row_len = c->kernel_h * c->kernel_w * cin_g;
    int32_t ky, kx, oc, ic;
    zero_i64(acc, c->in_c);
    for (ky = 0; ky < c->kernel_h; ky++) {
        const int32_t ty = iy + c->pad_top - ky;
        const int32_t oy = ty / c->stride_h;
        if (ty < 0 || ty % c->stride_h != 0 || oy >= c->out_h) {
            continue;
        }
        for (kx = 0; kx < c->kernel_w; kx++) {
            const int32_t tx = ix + c->pad_left - kx;
            const int32_t ox = tx / c->stride_w;
            const int16_t *gp;
            if (tx < 0 || tx % c->stride_w != 0 || ox >= c->out_w) {
                continue;
            }
            gp = g_y + (oy * c->out_w + ox) * c->out_c;
            for (oc = 0; oc < c->out_c; oc++) {
                const int32_t t = (int32_t)gp[oc] * p->ws[oc]; /* |t| < 2^30 */
                const int8_t *wp;
                int64_t *ap;
                if (t == 0) {
                    continue;
                }
                wp = weight_row(c, oc, row_len) + (ky * c->kernel_w + kx) * cin_g;
                ap = acc + (oc / cout_g) * cin_g;
                for (ic = 0; ic < cin_g; ic++) {
                    ap[ic] += (int64_t)t * wp[ic];
                }
            }
        }
    }
}

/* The recompute form: every pixel's sums twice (first for the peak, then narrowed into g_x), in a scratch of one
 * pixel: twice the MACs, 8 * in_c bytes instead of 8 per input element. */
static int32_t input_grad_recomputed(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y, int16_t *g_x,
                                     int64_t *acc)
{
    const fedtiny_conv2d_params *c = p->conv;
    uint64_t peak = 0;
    int32_t pass, shift = 0, iy, ix, ic;
    for (pass = 0; pass < 2; pass++) {
        for (iy = 0; iy < c->in_h; iy++) {
            for (ix = 0; ix < c->in_w; ix++) {
                int16_t *gp = g_x + (iy * c->in_w + ix) * c->in_c;
                input_grad_pixel(p, g_y, iy, ix, acc);
                for (ic = 0; ic < c->in_c; ic++) {
                    if (pass == 0) {
                        const uint64_t a = fedtiny_abs64(acc[ic]);
                        peak = a > peak ? a : peak;
                    } else {
                        gp[ic] = fedtiny_narrow_one(acc[ic], shift);
                    }
                }
            }
        }
        shift = fedtiny_narrow_shift(peak);
    }
    return shift;
}

/* g_y (out_h, out_w, out_c) -> g_x (in_h, in_w, in_c): acc[iy, ix, c] += g_y[o] ws[o] W[o, ky, kx, c] over the
 * window of every output (a transposed conv, scattered into the int64 scratch), then narrowed; with recompute,
 * gathered pixel by pixel twice instead (input_grad_recomputed). */
fedtiny_status fedtiny_conv2d_input_grad(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                         int16_t *g_x, int32_t *e_x, void *scratch)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t cin_g = c->in_c / c->groups;
    const int32_t cout_g = c->out_c / c->groups;
    const int32_t row_len = c->kernel_h * c->kernel_w * cin_g;
    const int32_t n = c->in_h * c->in_w * c->in_c;
    int64_t *acc = (int64_t *)scratch;
    int32_t oy, ox, oc, ky, kx, ic;
    if (c->groups < 1 || cin_g * c->groups != c->in_c || cout_g * c->groups != c->out_c || scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    if (p->recompute) {
        *e_x = e_y - p->k + input_grad_recomputed(p, g_y, g_x, acc);
        return FEDTINY_OK;
    }
    zero_i64(acc, n);
    for (oy = 0; oy < c->out_h; oy++) {
        for (ox = 0; ox < c->out_w; ox++) {
            const int16_t *gp = g_y + (oy * c->out_w + ox) * c->out_c;
            for (oc = 0; oc < c->out_c; oc++) {
                const int32_t t = (int32_t)gp[oc] * p->ws[oc]; /* |t| < 2^30 */
                const int8_t *wrow;
                if (t == 0) {
                    continue;
                }
                wrow = weight_row(c, oc, row_len);
                for (ky = 0; ky < c->kernel_h; ky++) {
                    const int32_t iy = oy * c->stride_h - c->pad_top + ky;
                    if (iy < 0 || iy >= c->in_h) {
                        continue; /* padding: its gradient is dropped */
                    }
                    for (kx = 0; kx < c->kernel_w; kx++) {
                        const int32_t ix = ox * c->stride_w - c->pad_left + kx;
                        int64_t *ap;
                        const int8_t *wp;
                        if (ix < 0 || ix >= c->in_w) {
                            continue;
                        }
                        ap = acc + (iy * c->in_w + ix) * c->in_c + (oc / cout_g) * cin_g;
                        wp = wrow + (ky * c->kernel_w + kx) * cin_g;
                        for (ic = 0; ic < cin_g; ic++) {
                            ap[ic] += (int64_t)t * wp[ic];
                        }
                    }
                }
            }
        }
    }
    *e_x = e_y - p->k + narrow_tensor(acc, n, g_x);
    return FEDTINY_OK;
}

size_t fedtiny_conv2d_weight_update_scratch_bytes(const fedtiny_conv2d_update_params *p)
{
    (void)p;
    return 0;
}

/* rows (channels, kernel_h, kernel_w, in_c / groups) in the arena, updated in place; x (in_h, in_w, in_c). Each
 * weight's sum is finished before its update, so no gradient of a parameter is ever stored. */
fedtiny_status fedtiny_conv2d_weight_update(const fedtiny_conv2d_update_params *p, const int16_t *g_y, int32_t e_y,
                                            const int8_t *x, int8_t *rows, uint64_t *rng_counter)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t cin_g = c->in_c / c->groups;
    const int32_t cout_g = c->out_c / c->groups;
    const uint64_t counter = *rng_counter;
    uint32_t index = 0; /* of the weight in C order: its rounding bits (fedtiny_update_bits) */
    int32_t o, ky, kx, ic, oy, ox;
    if (c->groups < 1 || cin_g * c->groups != c->in_c || cout_g * c->groups != c->out_c || p->channels > c->out_c) {
        return FEDTINY_ERR_PARAMS;
    }
    for (o = 0; o < p->channels; o++) {
        const int32_t k = 15 - p->shift[o] - e_y;
        const int8_t *xg = x + (o / cout_g) * cin_g;
        for (ky = 0; ky < c->kernel_h; ky++) {
            for (kx = 0; kx < c->kernel_w; kx++) {
                for (ic = 0; ic < cin_g; ic++) {
                    int64_t sum = 0;
                    int64_t w;
                    for (oy = 0; oy < c->out_h; oy++) {
                        const int32_t iy = oy * c->stride_h - c->pad_top + ky;
                        if (iy < 0 || iy >= c->in_h) {
                            continue;
                        }
                        for (ox = 0; ox < c->out_w; ox++) {
                            const int32_t ix = ox * c->stride_w - c->pad_left + kx;
                            if (ix < 0 || ix >= c->in_w) {
                                continue;
                            }
                            sum += (int64_t)g_y[(oy * c->out_w + ox) * c->out_c + o] * /* SMLAL */
                                   ((int32_t)xg[(iy * c->in_w + ix) * c->in_c + ic] - c->in_zero_point);
                        }
                    }
                    w = (int64_t)*rows -
                        fedtiny_stochastic_delta(sum, p->m[o], k, fedtiny_update_bits(counter, index++));
                    *rows++ = (int8_t)(w > 127 ? 127 : (w < -127 ? -127 : w));
                }
            }
        }
    }
    *rng_counter = counter + fedtiny_update_draws(index);
    return FEDTINY_OK;
}

size_t fedtiny_conv2d_bias_update_scratch_bytes(const fedtiny_conv2d_update_params *p)
{
    (void)p;
    return 0;
}

/* bias (out_c) int32 in the arena, updated in place. */
fedtiny_status fedtiny_conv2d_bias_update(const fedtiny_conv2d_update_params *p, const int16_t *g_y, int32_t e_y,
                                          int32_t *bias, uint64_t *rng_counter)
{
    const fedtiny_conv2d_params *c = p->conv;
    const int32_t positions = c->out_h * c->out_w;
    const uint64_t counter = *rng_counter;
    int32_t o, i;
    for (o = 0; o < c->out_c; o++) {
        int64_t sum = 0;
        for (i = 0; i < positions; i++) {
            sum += g_y[i * c->out_c + o]; /* |sum| < 2^15 * positions */
        }
        bias[o] = (int32_t)fedtiny_clamp_i32_64((int64_t)bias[o] - fedtiny_stochastic_delta(
            sum, p->m[o], 15 - p->shift[o] - e_y, fedtiny_update_bits(counter, (uint32_t)o)));
    }
    *rng_counter = counter + fedtiny_update_draws((uint32_t)c->out_c);
    return FEDTINY_OK;
}

/* ---- add ---------------------------------------------------------------------------------------------- */

size_t fedtiny_add_scratch_bytes(const fedtiny_add_params *p)
{
    (void)p;
    return 0;
}

/* a, b, y: (size) */
fedtiny_status fedtiny_add(const fedtiny_add_params *p, const int8_t *a, const int8_t *b, int8_t *y)
{
    const int32_t scale = (int32_t)1 << p->left_shift;
    int32_t i;
    for (i = 0; i < p->size; i++) {
        const int32_t a_scaled = fedtiny_multiply_by_quantized_multiplier(
            (int64_t)((int32_t)a[i] - p->a_zero_point) * scale, p->a_multiplier, p->a_shift);
        const int32_t b_scaled = fedtiny_multiply_by_quantized_multiplier(
            (int64_t)((int32_t)b[i] - p->b_zero_point) * scale, p->b_multiplier, p->b_shift);
        y[i] = fedtiny_requantize((int64_t)a_scaled + b_scaled, p->out_multiplier, p->out_shift,
                                  p->out_zero_point, p->act_min, p->act_max);
    }
    return FEDTINY_OK;
}

/* A fan-out's gradients (kernels.add_grads, folded left to right): align to the smaller exponent, add exactly,
 * narrow; a term more than 40 binary orders below the other is dropped. Two passes per fold (peak, then store),
 * so no scratch; g may be any of the parts' buffers or another. */
size_t fedtiny_grad_add_scratch_bytes(int32_t size)
{
    (void)size;
    return 0;
}

fedtiny_status fedtiny_grad_add(int32_t size, int32_t n, const int16_t *const *parts, const int32_t *exponents,
                                int16_t *g, int32_t *e)
{
    const int16_t *cur;
    int32_t cur_e, j, i;
    if (n < 1) {
        return FEDTINY_ERR_PARAMS;
    }
    cur = parts[0];
    cur_e = exponents[0];
    for (j = 1; j < n; j++) {
        const int16_t *a = cur, *b = parts[j];
        int32_t ea = cur_e, eb = exponents[j], d, shift;
        uint64_t peak = 0;
        if (ea < eb) { /* a has the larger exponent */
            const int16_t *t = a;
            const int32_t te = ea;
            a = b;
            b = t;
            ea = eb;
            eb = te;
        }
        d = ea - eb;
        if (d > 40) {
            cur = a;
            cur_e = ea;
            continue;
        }
        for (i = 0; i < size; i++) {
            const uint64_t v = fedtiny_abs64((int64_t)a[i] * ((int64_t)1 << d) + b[i]);
            peak = v > peak ? v : peak;
        }
        shift = fedtiny_narrow_shift(peak);
        for (i = 0; i < size; i++) {
            g[i] = fedtiny_narrow_one((int64_t)a[i] * ((int64_t)1 << d) + b[i], shift);
        }
        cur = g;
        cur_e = eb + shift;
    }
    if (cur != g) {
        for (i = 0; i < size; i++) {
            g[i] = cur[i];
        }
    }
    *e = cur_e;
    return FEDTINY_OK;
}

/* ---- pooling ------------------------------------------------------------------------------------------ */

size_t fedtiny_avgpool2d_scratch_bytes(const fedtiny_pool2d_params *p)
{
    (void)p;
    return 0;
}

/* floor(sum / count), then round half to even: up if 2r > n, or 2r == n and the quotient is odd; then add the
 * zero point and saturate. sum is of x - zero_point. */
static int8_t mean_half_even(int32_t sum, int32_t count, int32_t zero_point)
{
    int32_t q, twice_r;
    if (count == 0) {
        return (int8_t)zero_point;
    }
    q = sum / count;
    if (sum % count != 0 && sum < 0) {
        q -= 1; /* C truncates toward zero; floor it */
    }
    twice_r = 2 * (sum - q * count);
    if (twice_r > count || (twice_r == count && (q & 1))) {
        q += 1;
    }
    return (int8_t)max_i32(-128, min_i32(127, q + zero_point));
}

/* x (in_h, in_w, c) -> y (out_h, out_w, c) */
fedtiny_status fedtiny_avgpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y)
{
    int32_t oy, ox, c, iy, ix;
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            const int32_t count = max_i32(0, iy_hi - iy_lo) * max_i32(0, ix_hi - ix_lo);
            for (c = 0; c < p->channels; c++) {
                int32_t sum = 0;
                for (iy = iy_lo; iy < iy_hi; iy++) {
                    for (ix = ix_lo; ix < ix_hi; ix++) {
                        sum += (int32_t)x[(iy * p->in_w + ix) * p->channels + c] - p->zero_point;
                    }
                }
                y[(oy * p->out_w + ox) * p->channels + c] = mean_half_even(sum, count, p->zero_point);
            }
        }
    }
    return FEDTINY_OK;
}

/* Windows that do not overlap (stride >= kernel, e.g. a global average pool): every input element gets at most
 * one window's gradient, so the pooling gradients need no accumulator and no scratch. */
static int pool_windows_disjoint(const fedtiny_pool2d_params *p)
{
    return p->stride_h >= p->kernel_h && p->stride_w >= p->kernel_w;
}

static void zero_i16(int16_t *a, int32_t n)
{
    int32_t i;
    for (i = 0; i < n; i++) {
        a[i] = 0;
    }
}

size_t fedtiny_avgpool2d_input_grad_scratch_bytes(const fedtiny_pool2d_params *p)
{
    return pool_windows_disjoint(p) ? 0 : (size_t)p->in_h * (size_t)p->in_w * (size_t)p->channels * sizeof(int32_t);
}

/* Disjoint windows: g_x = narrow(g * recip) directly, after a first pass for the peak (zero outside windows). */
static int32_t avgpool2d_input_grad_disjoint(const fedtiny_pool2d_params *p, const int16_t *g_y, int16_t *g_x)
{
    uint64_t peak = 0;
    int32_t pass, shift = 0, oy, ox, c, iy, ix;
    zero_i16(g_x, p->in_h * p->in_w * p->channels);
    for (pass = 0; pass < 2; pass++) {
        for (oy = 0; oy < p->out_h; oy++) {
            const int32_t iy0 = oy * p->stride_h - p->pad_top;
            const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
            for (ox = 0; ox < p->out_w; ox++) {
                const int32_t ix0 = ox * p->stride_w - p->pad_left;
                const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
                const int32_t count = max_i32(0, iy_hi - iy_lo) * max_i32(0, ix_hi - ix_lo);
                const int32_t recip = count ? (32768 + count / 2) / count : 0;
                const int16_t *gp = g_y + (oy * p->out_w + ox) * p->channels;
                if (count == 0) {
                    continue;
                }
                for (c = 0; c < p->channels && pass == 0; c++) {
                    const uint64_t v = fedtiny_abs64((int64_t)gp[c] * recip);
                    peak = v > peak ? v : peak;
                }
                for (c = 0; c < p->channels && pass == 1; c++) { /* one narrowing per window and channel */
                    const int16_t v = fedtiny_narrow_one((int64_t)gp[c] * recip, shift);
                    for (iy = iy_lo; iy < iy_hi; iy++) {
                        int16_t *xp = g_x + (iy * p->in_w + ix_lo) * p->channels + c;
                        for (ix = ix_lo; ix < ix_hi; ix++) {
                            *xp = v;
                            xp += p->channels;
                        }
                    }
                }
            }
        }
        shift = fedtiny_narrow_shift(peak);
    }
    return shift;
}

/* g_y (out_h, out_w, c) -> g_x (in_h, in_w, c): each output's g * round(2^15 / count) added to its window's
 * valid inputs, narrowed with exponent e_y - 15. Overlapping windows sum in an int32 scratch: the compiler
 * proved |sum| < 2^31 for the shapes (fedtiny.device_memory.accumulator_bound). */
fedtiny_status fedtiny_avgpool2d_input_grad(const fedtiny_pool2d_params *p, const int16_t *g_y, int32_t e_y,
                                            int16_t *g_x, int32_t *e_x, void *scratch)
{
    const int32_t n = p->in_h * p->in_w * p->channels;
    int32_t *acc = (int32_t *)scratch;
    int32_t oy, ox, c, iy, ix;
    if (pool_windows_disjoint(p)) {
        *e_x = e_y - 15 + avgpool2d_input_grad_disjoint(p, g_y, g_x);
        return FEDTINY_OK;
    }
    if (scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    zero_i32(acc, n);
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            const int32_t count = max_i32(0, iy_hi - iy_lo) * max_i32(0, ix_hi - ix_lo);
            const int32_t recip = count ? (32768 + count / 2) / count : 0;
            const int16_t *gp = g_y + (oy * p->out_w + ox) * p->channels;
            for (iy = iy_lo; iy < iy_hi; iy++) {
                for (ix = ix_lo; ix < ix_hi; ix++) {
                    int32_t *ap = acc + (iy * p->in_w + ix) * p->channels;
                    for (c = 0; c < p->channels; c++) {
                        ap[c] += (int32_t)gp[c] * recip;
                    }
                }
            }
        }
    }
    *e_x = e_y - 15 + narrow_tensor32(acc, n, g_x);
    return FEDTINY_OK;
}

size_t fedtiny_maxpool2d_scratch_bytes(const fedtiny_pool2d_params *p)
{
    (void)p;
    return 0;
}

/* x (in_h, in_w, c) -> y (out_h, out_w, c); padding counts as -128 */
fedtiny_status fedtiny_maxpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y)
{
    int32_t oy, ox, c, iy, ix;
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            for (c = 0; c < p->channels; c++) {
                int32_t m = -128;
                for (iy = iy_lo; iy < iy_hi; iy++) {
                    for (ix = ix_lo; ix < ix_hi; ix++) {
                        m = max_i32(m, x[(iy * p->in_w + ix) * p->channels + c]);
                    }
                }
                y[(oy * p->out_w + ox) * p->channels + c] = (int8_t)m;
            }
        }
    }
    return FEDTINY_OK;
}

size_t fedtiny_maxpool2d_input_grad_scratch_bytes(const fedtiny_pool2d_params *p)
{
    return pool_windows_disjoint(p) ? 0 : (size_t)p->in_h * (size_t)p->in_w * (size_t)p->channels * sizeof(int32_t);
}

/* The first maximum of a window's valid inputs in row-major order (its index in x), or -1 if it has none. */
static int32_t window_argmax(const fedtiny_pool2d_params *p, const int8_t *x, int32_t iy_lo, int32_t iy_hi,
                             int32_t ix_lo, int32_t ix_hi, int32_t c)
{
    int32_t best = -129, at = -1, iy, ix;
    for (iy = iy_lo; iy < iy_hi; iy++) {
        for (ix = ix_lo; ix < ix_hi; ix++) {
            const int32_t i = (iy * p->in_w + ix) * p->channels + c;
            if (x[i] > best) {
                best = x[i];
                at = i;
            }
        }
    }
    return at;
}

/* Disjoint windows: each window's g lands alone on its maximum; the peak is the largest |g| of a window with
 * a valid input. */
static int32_t maxpool2d_input_grad_disjoint(const fedtiny_pool2d_params *p, const int16_t *g_y, const int8_t *x,
                                             int16_t *g_x)
{
    uint64_t peak = 0;
    int32_t shift, oy, ox, c;
    zero_i16(g_x, p->in_h * p->in_w * p->channels);
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            if (iy_hi <= iy_lo || ix_hi <= ix_lo) {
                continue;
            }
            for (c = 0; c < p->channels; c++) {
                const uint64_t v = fedtiny_abs64(g_y[(oy * p->out_w + ox) * p->channels + c]);
                peak = v > peak ? v : peak;
            }
        }
    }
    shift = fedtiny_narrow_shift(peak);
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            for (c = 0; c < p->channels; c++) {
                const int32_t at = window_argmax(p, x, iy_lo, iy_hi, ix_lo, ix_hi, c);
                if (at >= 0) {
                    g_x[at] = fedtiny_narrow_one(g_y[(oy * p->out_w + ox) * p->channels + c], shift);
                }
            }
        }
    }
    return shift;
}

/* Each output's g goes to the first maximum of its window's valid inputs in row-major order; exponent e_y.
 * Overlapping windows sum in an int32 scratch: at most one g per covering window, which the compiler bounded
 * below 2^31. */
fedtiny_status fedtiny_maxpool2d_input_grad(const fedtiny_pool2d_params *p, const int16_t *g_y, int32_t e_y,
                                            const int8_t *x, int16_t *g_x, int32_t *e_x, void *scratch)
{
    const int32_t n = p->in_h * p->in_w * p->channels;
    int32_t *acc = (int32_t *)scratch;
    int32_t oy, ox, c;
    if (pool_windows_disjoint(p)) {
        *e_x = e_y + maxpool2d_input_grad_disjoint(p, g_y, x, g_x);
        return FEDTINY_OK;
    }
    if (scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    zero_i32(acc, n);
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t iy_lo = max_i32(0, iy0), iy_hi = min_i32(p->in_h, iy0 + p->kernel_h);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t ix_lo = max_i32(0, ix0), ix_hi = min_i32(p->in_w, ix0 + p->kernel_w);
            for (c = 0; c < p->channels; c++) {
                const int32_t at = window_argmax(p, x, iy_lo, iy_hi, ix_lo, ix_hi, c);
                if (at >= 0) {
                    acc[at] += g_y[(oy * p->out_w + ox) * p->channels + c];
                }
            }
        }
    }
    *e_x = e_y + narrow_tensor32(acc, n, g_x);
    return FEDTINY_OK;
}

/* ---- clamp -------------------------------------------------------------------------------------------- */

size_t fedtiny_clamp_scratch_bytes(const fedtiny_clamp_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_clamp(const fedtiny_clamp_params *p, const int8_t *x, int8_t *y)
{
    int32_t i;
    for (i = 0; i < p->size; i++) {
        y[i] = (int8_t)max_i32(p->act_min, min_i32(p->act_max, x[i]));
    }
    return FEDTINY_OK;
}

size_t fedtiny_lut_scratch_bytes(const fedtiny_lut_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_lut(const fedtiny_lut_params *p, const int8_t *x, int8_t *y)
{
    int32_t i;
    for (i = 0; i < p->size; i++) {
        y[i] = p->table[x[i] + 128];
    }
    return FEDTINY_OK;
}

size_t fedtiny_lut_input_grad_scratch_bytes(const fedtiny_lut_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_lut_input_grad(const fedtiny_lut_params *p, const int16_t *g_y, int32_t e_y, const int8_t *x,
                                      int16_t *g_x, int32_t *e_x)
{
    int32_t i, shift;
    uint64_t peak = 0;
    for (i = 0; i < p->size; i++) {
        const uint64_t v = fedtiny_abs64((int64_t)g_y[i] * p->grad_table[x[i] + 128]);
        peak = v > peak ? v : peak;
    }
    shift = fedtiny_narrow_shift(peak);
    for (i = 0; i < p->size; i++) {
        g_x[i] = fedtiny_narrow_one((int64_t)g_y[i] * p->grad_table[x[i] + 128], shift);
    }
    *e_x = e_y - p->grad_shift + shift;
    return FEDTINY_OK;
}

/* ---- cat and mul ------------------------------------------------------------------------------------------ */

size_t fedtiny_cat_scratch_bytes(const fedtiny_cat_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_cat(const fedtiny_cat_params *p, const int8_t *const *x, int8_t *y)
{
    int32_t o, i, j;
    if (p->n_inputs < 2 || p->n_inputs > FEDTINY_CAT_MAX_INPUTS) {
        return FEDTINY_ERR_PARAMS;
    }
    for (o = 0; o < p->outer; o++) {
        for (i = 0; i < p->n_inputs; i++) {
            const int8_t *src = x[i] + o * p->inner[i];
            const int8_t *table = p->tables + 256 * i;
            for (j = 0; j < p->inner[i]; j++) {
                *y++ = table[src[j] + 128];
            }
        }
    }
    return FEDTINY_OK;
}

size_t fedtiny_cat_input_grad_scratch_bytes(const fedtiny_cat_input_grad_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_cat_input_grad(const fedtiny_cat_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                      int16_t *g_x, int32_t *e_x)
{
    const fedtiny_cat_params *c = p->cat;
    int32_t o, i, j, start = 0, row = 0;
    for (i = 0; i < c->n_inputs; i++) {
        start += i < p->input ? c->inner[i] : 0;
        row += c->inner[i];
    }
    for (o = 0; o < c->outer; o++) {
        for (j = 0; j < c->inner[p->input]; j++) {
            *g_x++ = g_y[o * row + start + j];
        }
    }
    *e_x = e_y;
    return FEDTINY_OK;
}

size_t fedtiny_mul_scratch_bytes(const fedtiny_mul_params *p)
{
    (void)p;
    return 0;
}

/* Index of output position (y, x, c) in an input of shape (h, w, ch) that broadcasts its unit axes. */
static int32_t broadcast_index(int32_t y, int32_t x, int32_t c, int32_t h, int32_t w, int32_t ch)
{
    return ((h == 1 ? 0 : y) * w + (w == 1 ? 0 : x)) * ch + (ch == 1 ? 0 : c);
}

fedtiny_status fedtiny_mul(const fedtiny_mul_params *p, const int8_t *a, const int8_t *b, int8_t *y)
{
    int32_t oy, ox, oc;
    for (oy = 0; oy < p->out_h; oy++) {
        for (ox = 0; ox < p->out_w; ox++) {
            for (oc = 0; oc < p->out_c; oc++) {
                const int32_t va = a[broadcast_index(oy, ox, oc, p->a_h, p->a_w, p->a_c)] - p->a_zero_point;
                const int32_t vb = b[broadcast_index(oy, ox, oc, p->b_h, p->b_w, p->b_c)] - p->b_zero_point;
                *y++ = fedtiny_requantize((int64_t)va * vb, p->multiplier, p->shift, p->out_zero_point, p->act_min,
                                          p->act_max);
            }
        }
    }
    return FEDTINY_OK;
}

size_t fedtiny_mul_input_grad_scratch_bytes(const fedtiny_mul_input_grad_params *p)
{
    (void)p;
    return 0;
}

/* The exact sum for input element (y, x, c) of shape (h, w, ch): over every output position it broadcasts to. */
static int64_t mul_grad_sum(const fedtiny_mul_params *p, const int16_t *g_y, const int8_t *other, int32_t other_zero,
                            int32_t m, const int32_t *in, const int32_t *os, int32_t y, int32_t x, int32_t c)
{
    const int32_t y0 = in[0] == 1 ? 0 : y, y1 = in[0] == 1 ? p->out_h : y + 1;
    const int32_t x0 = in[1] == 1 ? 0 : x, x1 = in[1] == 1 ? p->out_w : x + 1;
    const int32_t c0 = in[2] == 1 ? 0 : c, c1 = in[2] == 1 ? p->out_c : c + 1;
    int32_t oy, ox, oc;
    int64_t sum = 0;
    for (oy = y0; oy < y1; oy++) {
        for (ox = x0; ox < x1; ox++) {
            for (oc = c0; oc < c1; oc++) {
                const int32_t v = other[broadcast_index(oy, ox, oc, os[0], os[1], os[2])] - other_zero;
                sum += (int64_t)g_y[(oy * p->out_w + ox) * p->out_c + oc] * ((int64_t)v * m);
            }
        }
    }
    return sum;
}

fedtiny_status fedtiny_mul_input_grad(const fedtiny_mul_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                      const int8_t *other, int16_t *g_x, int32_t *e_x)
{
    const fedtiny_mul_params *q = p->mul;
    const int32_t a_shape[3] = {q->a_h, q->a_w, q->a_c}, b_shape[3] = {q->b_h, q->b_w, q->b_c};
    const int32_t *in = p->input == 0 ? a_shape : b_shape, *os = p->input == 0 ? b_shape : a_shape;
    const int32_t other_zero = p->input == 0 ? q->b_zero_point : q->a_zero_point;
    const int32_t m = p->input == 0 ? q->a_grad_m : q->b_grad_m;
    int32_t y, x, c, pass, shift = 0;
    uint64_t peak = 0;
    for (pass = 0; pass < 2; pass++) { /* the peak, then the narrowed values: no scratch */
        int16_t *out = g_x;
        for (y = 0; y < in[0]; y++) {
            for (x = 0; x < in[1]; x++) {
                for (c = 0; c < in[2]; c++) {
                    const int64_t sum = mul_grad_sum(q, g_y, other, other_zero, m, in, os, y, x, c);
                    if (pass == 0) {
                        const uint64_t v = fedtiny_abs64(sum);
                        peak = v > peak ? v : peak;
                    } else {
                        *out++ = fedtiny_narrow_one(sum, shift);
                    }
                }
            }
        }
        shift = fedtiny_narrow_shift(peak);
    }
    *e_x = e_y - (p->input == 0 ? q->a_grad_shift : q->b_grad_shift) + shift;
    return FEDTINY_OK;
}

/* ---- clamp masks and the loss (training) ------------------------------------------------------------------ */

size_t fedtiny_activation_mask_scratch_bytes(const fedtiny_grad_mask_params *p)
{
    (void)p;
    return 0;
}

/* y (size) int8 -> bits (ceil(size / 8)), bit i of byte i/8, LSB first; unused high bits are 0. */
fedtiny_status fedtiny_activation_mask(const fedtiny_grad_mask_params *p, const int8_t *y, uint8_t *bits)
{
    int32_t i;
    for (i = 0; i < p->size; i += 8) {
        const int32_t n = min_i32(8, p->size - i);
        uint32_t byte = 0;
        int32_t b;
        for (b = 0; b < n; b++) {
            byte |= (uint32_t)(y[i + b] > p->act_min && y[i + b] < p->act_max) << b;
        }
        bits[i >> 3] = (uint8_t)byte;
    }
    return FEDTINY_OK;
}

size_t fedtiny_grad_mask_scratch_bytes(const fedtiny_grad_mask_params *p)
{
    (void)p;
    return 0;
}

fedtiny_status fedtiny_grad_mask_bits(const fedtiny_grad_mask_params *p, const int16_t *g, const uint8_t *bits,
                                      int16_t *out)
{
    int32_t i;
    for (i = 0; i < p->size; i++) {
        out[i] = ((bits[i >> 3] >> (i & 7)) & 1u) ? g[i] : (int16_t)0;
    }
    return FEDTINY_OK;
}

fedtiny_status fedtiny_grad_mask(const fedtiny_grad_mask_params *p, const int16_t *g, const int8_t *y, int16_t *out)
{
    int32_t i;
    for (i = 0; i < p->size; i++) {
        out[i] = (y[i] > p->act_min && y[i] < p->act_max) ? g[i] : (int16_t)0;
    }
    return FEDTINY_OK;
}

size_t fedtiny_softmax_cross_entropy_grad_scratch_bytes(const fedtiny_loss_params *p)
{
    (void)p;
    return 0;
}

/* d_k = max(q) - q_k, E_k = T[d_k], Z = sum E_k, p_k = floor((E_k 2^15 + floor(Z / 2)) / Z),
 * g_k = clamp(p_k - 2^15 [k == label], -32767, 32767), exponent -15. */
fedtiny_status fedtiny_softmax_cross_entropy_grad(const fedtiny_loss_params *p, const int8_t *logits, int32_t label,
                                                  int16_t *g, int32_t *e, int32_t *label_q15)
{
    int32_t k, top = -128;
    int64_t total = 0;
    if (label < 0 || label >= p->classes) {
        return FEDTINY_ERR_PARAMS;
    }
    for (k = 0; k < p->classes; k++) {
        top = max_i32(top, logits[k]);
    }
    for (k = 0; k < p->classes; k++) {
        total += p->exp_table[top - logits[k]];
    }
    for (k = 0; k < p->classes; k++) {
        int64_t v = ((int64_t)p->exp_table[top - logits[k]] * 32768 + total / 2) / total;
        if (k == label) {
            v -= 32768;
        }
        g[k] = (int16_t)(v > FEDTINY_GRAD_MAX ? FEDTINY_GRAD_MAX : (v < -FEDTINY_GRAD_MAX ? -FEDTINY_GRAD_MAX : v));
    }
    *label_q15 = (int32_t)g[label] + 32768;
    *e = -15;
    return FEDTINY_OK;
}

size_t fedtiny_mse_grad_scratch_bytes(const fedtiny_mse_params *p)
{
    (void)p;
    return 0;
}

/* d_k = y_k - t_k, acc_k = d_k m, narrowed to int16 with exponent exponent - 15 + shift. Two passes (peak, then
 * store) recompute the products instead of keeping them, so no scratch. */
fedtiny_status fedtiny_mse_grad(const fedtiny_mse_params *p, const int8_t *y, const int8_t *target, int16_t *g,
                                int32_t *e, int64_t *squared_error)
{
    int32_t k, shift;
    uint64_t peak = 0;
    int64_t sum = 0;
    if (target == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    for (k = 0; k < p->size; k++) {
        const int64_t d = (int64_t)y[k] - target[k];
        const uint64_t v = fedtiny_abs64(d * p->m);
        peak = v > peak ? v : peak;
        sum += d * d;
    }
    shift = fedtiny_narrow_shift(peak);
    for (k = 0; k < p->size; k++) {
        g[k] = fedtiny_narrow_one(((int64_t)y[k] - target[k]) * p->m, shift);
    }
    *squared_error = sum;
    *e = p->exponent - 15 + shift;
    return FEDTINY_OK;
}
