/* Reference and fast int8 kernels (see fedtiny_kernels.h). The Python definitions are in
 * device_runtime/kernels.py; tests/test_cruntime.py checks every kernel here against them bit for bit. */
#include "fedtiny_kernels.h"

#include "fedtiny_arith.h"

static int32_t min_i32(int32_t a, int32_t b) { return a < b ? a : b; }
static int32_t max_i32(int32_t a, int32_t b) { return a > b ? a : b; }

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
                        wp = p->weight + ((oc * p->kernel_h + ky) * p->kernel_w + kx) * cin_g;
                        for (ic = 0; ic < cin_g; ic++) {
                            acc += ((int32_t)xp[ic] - p->in_zero_point) * (int32_t)wp[ic];
                        }
                    }
                }
                y[(oy * p->out_w + ox) * p->out_c + oc] =
                    fedtiny_requantize((int64_t)acc + p->bias[oc], p->multiplier[oc], p->shift[oc],
                                       p->out_zero_point, p->act_min, p->act_max);
            }
        }
    }
    return FEDTINY_OK;
}

/* ---- conv2d, fast pointwise: 1x1 kernel, groups 1, no padding ----------------------------------------- */

size_t fedtiny_conv2d_1x1_scratch_bytes(const fedtiny_conv2d_params *p)
{
    return 2u * (size_t)p->in_c * sizeof(int16_t); /* two input pixels as int16, zero point removed */
}

static void load_pixel(const fedtiny_conv2d_params *p, const int8_t *x, int32_t pixel, int16_t *col)
{
    const int32_t oy = pixel / p->out_w;
    const int32_t ox = pixel - oy * p->out_w;
    const int8_t *xp = x + (oy * p->stride_h * p->in_w + ox * p->stride_w) * p->in_c;
    int32_t i;
    for (i = 0; i < p->in_c; i++) {
        col[i] = (int16_t)((int32_t)xp[i] - p->in_zero_point);
    }
}

static int8_t requantize_channel(const fedtiny_conv2d_params *p, int32_t acc, int32_t oc)
{
    return fedtiny_requantize((int64_t)acc + p->bias[oc], p->multiplier[oc], p->shift[oc], p->out_zero_point,
                              p->act_min, p->act_max);
}

/* x (in_h, in_w, in_c) -> y (out_h, out_w, out_c); weight (out_c, in_c) */
fedtiny_status fedtiny_conv2d_1x1(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch)
{
    const int32_t cin = p->in_c;
    const int32_t cout = p->out_c;
    const int32_t pixels = p->out_h * p->out_w;
    int16_t *col0 = (int16_t *)scratch;
    int16_t *col1 = col0 + cin;
    int32_t pixel, oc, i;
    if (p->kernel_h != 1 || p->kernel_w != 1 || p->groups != 1 || p->pad_top != 0 || p->pad_left != 0 ||
        scratch == NULL) {
        return FEDTINY_ERR_PARAMS;
    }
    for (pixel = 0; pixel < pixels; pixel += 2) {
        const int32_t two = pixel + 1 < pixels; /* an odd last pixel is computed twice, written once */
        int8_t *y0 = y + pixel * cout;
        int8_t *y1 = y0 + cout;
        load_pixel(p, x, pixel, col0);
        load_pixel(p, x, two ? pixel + 1 : pixel, col1);
        for (oc = 0; oc + 2 <= cout; oc += 2) {
            const int8_t *w0 = p->weight + oc * cin;
            const int8_t *w1 = w0 + cin;
            int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0; /* a<pixel><channel> */
            for (i = 0; i < cin; i++) {
                const int32_t x0 = col0[i], x1 = col1[i];
                const int32_t k0 = w0[i], k1 = w1[i];
                a00 += x0 * k0;
                a01 += x0 * k1;
                a10 += x1 * k0;
                a11 += x1 * k1;
            }
            y0[oc] = requantize_channel(p, a00, oc);
            y0[oc + 1] = requantize_channel(p, a01, oc + 1);
            if (two) {
                y1[oc] = requantize_channel(p, a10, oc);
                y1[oc + 1] = requantize_channel(p, a11, oc + 1);
            }
        }
        if (oc < cout) { /* odd last channel */
            const int8_t *w0 = p->weight + oc * cin;
            int32_t a0 = 0, a1 = 0;
            for (i = 0; i < cin; i++) {
                a0 += (int32_t)col0[i] * w0[i];
                a1 += (int32_t)col1[i] * w0[i];
            }
            y0[oc] = requantize_channel(p, a0, oc);
            if (two) {
                y1[oc] = requantize_channel(p, a1, oc);
            }
        }
    }
    return FEDTINY_OK;
}

/* ---- conv2d, fast depthwise: groups == in_c == out_c ----------------------------------------------- */

size_t fedtiny_conv2d_depthwise_scratch_bytes(const fedtiny_conv2d_params *p)
{
    (void)p;
    return 0;
}

/* x (in_h, in_w, c) -> y (out_h, out_w, c); weight (c, kernel_h, kernel_w, 1) */
fedtiny_status fedtiny_conv2d_depthwise(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y,
                                        void *scratch)
{
    const int32_t c_n = p->in_c;
    const int32_t taps = p->kernel_h * p->kernel_w;
    const int32_t row = p->in_w * c_n;
    int32_t oy, ox, c, ky, kx;
    (void)scratch;
    if (p->groups != c_n || p->out_c != c_n) {
        return FEDTINY_ERR_PARAMS;
    }
    for (oy = 0; oy < p->out_h; oy++) {
        const int32_t iy0 = oy * p->stride_h - p->pad_top;
        const int32_t ky_lo = max_i32(0, -iy0);
        const int32_t ky_hi = min_i32(p->kernel_h, p->in_h - iy0);
        for (ox = 0; ox < p->out_w; ox++) {
            const int32_t ix0 = ox * p->stride_w - p->pad_left;
            const int32_t kx_lo = max_i32(0, -ix0);
            const int32_t kx_hi = min_i32(p->kernel_w, p->in_w - ix0);
            int8_t *yp = y + (oy * p->out_w + ox) * c_n;
            for (c = 0; c < c_n; c++) {
                const int8_t *wc = p->weight + c * taps;
                int32_t acc = 0;
                for (ky = ky_lo; ky < ky_hi; ky++) {
                    const int8_t *xp = x + (iy0 + ky) * row + (ix0 + kx_lo) * c_n + c;
                    const int8_t *wp = wc + ky * p->kernel_w + kx_lo;
                    for (kx = kx_lo; kx < kx_hi; kx++) {
                        acc += ((int32_t)*xp - p->in_zero_point) * (int32_t)*wp++;
                        xp += c_n;
                    }
                }
                yp[c] = requantize_channel(p, acc, c);
            }
        }
    }
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
