/* Reference and fast int8 kernels: plain loops over pointers, a params struct per op kind.
 *
 * Layout is HWC, batch-free (one sample per call), as in fedtiny/ir.py. Every kernel returns a
 * fedtiny_status and has a `_scratch_bytes()` companion giving the scratch buffer it needs (0 if none);
 * the code generator sizes one static scratch buffer from those numbers. Kernels never allocate, never
 * print, and never read an input after writing the output buffer (inputs and outputs do not overlap).
 * The definition of every kernel is the Python code in fedtiny/kernels.py.
 */
#ifndef FEDTINY_KERNELS_H
#define FEDTINY_KERNELS_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    FEDTINY_OK = 0,
    FEDTINY_ERR_PARAMS = 1,  /* a kernel got a shape it does not handle (wrong kernel picked) */
    FEDTINY_ERR_KIND = 2,    /* unknown op kind in the op table */
    FEDTINY_ERR_SCRATCH = 3  /* the scratch buffer is smaller than a kernel needs */
} fedtiny_status;

/* conv2d: y = requantize(sum((x - in_zero_point) * w) + bias). Padding bottom/right follows from out_h/out_w. */
typedef struct {
    int32_t in_h, in_w, in_c;
    int32_t out_h, out_w, out_c;
    int32_t kernel_h, kernel_w;
    int32_t stride_h, stride_w;
    int32_t pad_top, pad_left;
    int32_t groups;
    int32_t in_zero_point, out_zero_point;
    int32_t act_min, act_max;
    const int8_t *weight;      /* (out_c, kernel_h, kernel_w, in_c / groups), symmetric per output channel */
    const int32_t *bias;       /* (out_c), at scale s_x * s_w */
    const int32_t *multiplier; /* (out_c), Q31 */
    const int32_t *shift;      /* (out_c) */
    /* Training: rows [0, sram_rows) of the weight are read from weight_sram (the trainable copy in the arena),
     * the rest from `weight` (flash); a non-NULL bias_sram replaces `bias`. Inference leaves these zero. */
    const int8_t *weight_sram;
    const int32_t *bias_sram;
    int32_t sram_rows;
} fedtiny_conv2d_params;

/* add: TFLite's quantized ADD of two tensors of the same shape. */
typedef struct {
    int32_t size; /* elements */
    int32_t a_zero_point, b_zero_point, out_zero_point;
    int32_t left_shift;
    int32_t a_multiplier, a_shift, b_multiplier, b_shift;
    int32_t out_multiplier, out_shift;
    int32_t act_min, act_max;
} fedtiny_add_params;

/* avgpool2d / maxpool2d: quantization unchanged, windows over valid (unpadded) elements. */
typedef struct {
    int32_t in_h, in_w, channels;
    int32_t out_h, out_w;
    int32_t kernel_h, kernel_w;
    int32_t stride_h, stride_w;
    int32_t pad_top, pad_left;
    int32_t zero_point; /* of input and output (avgpool averages x - zero_point; maxpool ignores it) */
} fedtiny_pool2d_params;

/* clamp: a ReLU that could not be fused. Also the params of the activation mask (training). */
typedef struct {
    int32_t size;
    int32_t act_min, act_max;
} fedtiny_clamp_params;

/* lut: any elementwise function of an int8 value (sigmoid, hardswish, LeakyReLU, x * c), as its table; the
 * training step's derivative table holds f'(x) * 2^grad_shift at each input value. */
typedef struct {
    int32_t size;
    const int8_t *table;       /* 256 entries: y for x = -128..127 */
    const int16_t *grad_table; /* 256 entries, |v| < 2^15 */
    int32_t grad_shift;
} fedtiny_lut_params;

/* cat: inputs side by side along one axis of (H, W, C), each through its requantization table (TFLite's
 * CONCATENATION; the identity table where an input's quantization is the output's). */
#define FEDTINY_CAT_MAX_INPUTS 5
typedef struct {
    int32_t n_inputs;
    int32_t outer;                         /* the product of the axes before the concatenation axis */
    int32_t inner[FEDTINY_CAT_MAX_INPUTS]; /* each input's elements per outer index: its axis x the axes after */
    const int8_t *tables;                  /* n_inputs x 256: y for x = -128..127 */
} fedtiny_cat_params;

/* mul: TFLite's quantized MUL, y = requantize((a - a_zero_point)(b - b_zero_point)); an axis of a or b of size 1
 * broadcasts over the output's. Training: s_b ~ a_grad_m 2^-a_grad_shift (for a's gradient), s_a likewise. */
typedef struct {
    int32_t out_h, out_w, out_c;
    int32_t a_h, a_w, a_c, b_h, b_w, b_c;
    int32_t a_zero_point, b_zero_point, out_zero_point;
    int32_t multiplier, shift;
    int32_t act_min, act_max;
    int32_t a_grad_m, a_grad_shift, b_grad_m, b_grad_shift;
} fedtiny_mul_params;

/* Reference convolution: any groups (dense, depthwise, grouped), strides and padding. */
fedtiny_status fedtiny_conv2d(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch);
size_t fedtiny_conv2d_scratch_bytes(const fedtiny_conv2d_params *p);

/* ==== fast forward kernels (fedtiny_kernels_fwd_fast.c) ===================================================
 * The reference's integers by construction (exact int32 sums, the same requantization, once per output), in
 * fewer instructions: on the Cortex-M4 (__ARM_FEATURE_DSP) each window becomes an int16 column with the zero point
 * removed once, then two MACs per SMLAD (weights widened by SXTB16); on the host the same loops in plain C for
 * gcc's vectorizer. fedtiny.device_memory chooses them (kernel_of) and states their scratch. */

/* Any conv (groups, strides, padding; 1x1 and linear layers too): 2 output pixels x 2 channels per step over
 * two int16 columns (the scratch: 2 x the window rounded up to 4 values, then 16 bytes of requantization per
 * output channel). A linear layer (1 x 1 on a 1 x 1 map, groups 1) takes its own path: one column, four rows per
 * pass, then each channel's requantization, its form decided per channel (the same scratch holds its sums). */
fedtiny_status fedtiny_conv2d_fast(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch);
size_t fedtiny_conv2d_fast_scratch_bytes(const fedtiny_conv2d_params *p);

/* Depthwise (groups == in_c == out_c): channel by channel over its padded int16 input plane, two taps per SMLAD
 * (the scratch: the plane and the channel's kernel, rows padded to an even number of taps). */
fedtiny_status fedtiny_conv2d_depthwise(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y,
                                        void *scratch);
size_t fedtiny_conv2d_depthwise_scratch_bytes(const fedtiny_conv2d_params *p);

/* TFLite's quantized ADD (fedtiny_add's integers) over pointers, its params read once per call. */
fedtiny_status fedtiny_add_fast(const fedtiny_add_params *p, const int8_t *a, const int8_t *b, int8_t *y);
size_t fedtiny_add_fast_scratch_bytes(const fedtiny_add_params *p);

/* ==== end of the fast forward kernels ===================================================================== */

fedtiny_status fedtiny_add(const fedtiny_add_params *p, const int8_t *a, const int8_t *b, int8_t *y);
size_t fedtiny_add_scratch_bytes(const fedtiny_add_params *p);

/* Mean of the valid elements in real units (x - zero_point), ties rounded to even (see kernels.avgpool2d). */
fedtiny_status fedtiny_avgpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_avgpool2d_scratch_bytes(const fedtiny_pool2d_params *p);

fedtiny_status fedtiny_maxpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_maxpool2d_scratch_bytes(const fedtiny_pool2d_params *p);

fedtiny_status fedtiny_clamp(const fedtiny_clamp_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_clamp_scratch_bytes(const fedtiny_clamp_params *p);
fedtiny_status fedtiny_lut(const fedtiny_lut_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_lut_scratch_bytes(const fedtiny_lut_params *p);
/* cat: x[i] (outer x inner[i]) -> y (outer x sum of inner); at most FEDTINY_CAT_MAX_INPUTS inputs. */
fedtiny_status fedtiny_cat(const fedtiny_cat_params *p, const int8_t *const *x, int8_t *y);
size_t fedtiny_cat_scratch_bytes(const fedtiny_cat_params *p);
fedtiny_status fedtiny_mul(const fedtiny_mul_params *p, const int8_t *a, const int8_t *b, int8_t *y);
size_t fedtiny_mul_scratch_bytes(const fedtiny_mul_params *p);

/* ==== training: backward kernels and updates (docs/numerics.md) ==========================================
 * A gradient is int16 values g plus one power-of-two exponent e (real = g * 2^e). Kernels take the exponent
 * of their input gradient and return the one of their output; the executor keeps exponents in a table. Every
 * sum is exact; kernels whose result must be narrowed (max |acc| over the whole tensor first) sum into a scratch
 * of one value per output element (their _scratch_bytes()): int32 where the compiler proved |sum| < 2^31 from
 * the shapes (the pooling gradients, fedtiny.device_memory.accumulator_bound), else int64. Updates take 32 random
 * bits per updated element in C order from the SplitMix64 counter *rng_counter, two elements per draw
 * (fedtiny_update_bits), and advance it by their draws. */

/* Gradient mask of an op with a fused clamp: g passes where act_min < y < act_max. In place allowed. */
typedef struct {
    int32_t size;
    int32_t act_min, act_max;
} fedtiny_grad_mask_params;

/* Softmax cross-entropy gradient from int8 logits: exp_table[i] = round(2^15 exp(-s_y i)), i = 0..255. */
typedef struct {
    int32_t classes;
    const uint16_t *exp_table;
} fedtiny_loss_params;

/* Mean-squared-error gradient: dL/dy_k = c (y_q,k - t_q,k) with c = 2 s_y / K = m 2^(exponent - 15). */
typedef struct {
    int32_t size;     /* K, the output's values */
    int32_t m;        /* in [2^14, 2^15) */
    int32_t exponent;
} fedtiny_mse_params;

/* conv2d input gradient (transposed conv): ws[o] = round(s_w[o] 2^k); weights as the forward pass reads them.
 * recompute 0: one pass, an int64 scratch per input element; 1: the compiler's choice when that does not fit the
 * budget: each input pixel's sums gathered twice (peak, then narrow), an int64 scratch per input channel. */
typedef struct {
    const fedtiny_conv2d_params *conv;
    const int32_t *ws; /* (out_c) */
    int32_t k;
    int32_t recompute;
} fedtiny_conv2d_input_grad_params;

/* In-place QAS update of weight rows [0, channels) or of the whole bias: per output channel (m, shift). */
typedef struct {
    const fedtiny_conv2d_params *conv;
    int32_t channels;
    const int32_t *m;     /* (channels) for weights, (out_c) for biases */
    const int32_t *shift;
    int32_t block; /* the fast weight update: positions summed in int32, even; the compiler proved
                    * block x 2^15 x max |x - zero point| < 2^31 (fedtiny.device_memory.weight_update_block) */
} fedtiny_conv2d_update_params;

/* softmax cross-entropy: logits (classes) int8 -> g (classes) int16, exponent -15; *label_q15 = the label's
 * Q15 probability (for the host's loss). */
fedtiny_status fedtiny_softmax_cross_entropy_grad(const fedtiny_loss_params *p, const int8_t *logits, int32_t label,
                                                  int16_t *g, int32_t *e, int32_t *label_q15);
size_t fedtiny_softmax_cross_entropy_grad_scratch_bytes(const fedtiny_loss_params *p);

/* mean squared error: y (size) int8 and target (size) int8 in y's quantization -> g (size) int16, exponent
 * exponent - 15 + narrowing; *squared_error = sum (y - t)^2 (for the host's loss). */
fedtiny_status fedtiny_mse_grad(const fedtiny_mse_params *p, const int8_t *y, const int8_t *target, int16_t *g,
                                int32_t *e, int64_t *squared_error);
size_t fedtiny_mse_grad_scratch_bytes(const fedtiny_mse_params *p);

/* conv2d backward: g_y (out_h, out_w, out_c) int16 -> g_x (in_h, in_w, in_c) int16. */
fedtiny_status fedtiny_conv2d_input_grad(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                         int16_t *g_x, int32_t *e_x, void *scratch);
size_t fedtiny_conv2d_input_grad_scratch_bytes(const fedtiny_conv2d_input_grad_params *p);

/* Weight sums S[o, kh, kw, c] = sum g_y[o] (x - zx), then rows = clamp(rows - delta(S), -127, 127). */
fedtiny_status fedtiny_conv2d_weight_update(const fedtiny_conv2d_update_params *p, const int16_t *g_y, int32_t e_y,
                                            const int8_t *x, int8_t *rows, uint64_t *rng_counter);
size_t fedtiny_conv2d_weight_update_scratch_bytes(const fedtiny_conv2d_update_params *p);

/* Bias sums S[o] = sum g_y[o], then bias = clamp(bias - delta(S), int32). */
fedtiny_status fedtiny_conv2d_bias_update(const fedtiny_conv2d_update_params *p, const int16_t *g_y, int32_t e_y,
                                          int32_t *bias, uint64_t *rng_counter);
size_t fedtiny_conv2d_bias_update_scratch_bytes(const fedtiny_conv2d_update_params *p);

/* Sum of a fan-out's gradients, folded left to right as kernels.add_grads: n parts of `size` elements. */
fedtiny_status fedtiny_grad_add(int32_t size, int32_t n, const int16_t *const *parts, const int32_t *exponents,
                                int16_t *g, int32_t *e);
size_t fedtiny_grad_add_scratch_bytes(int32_t size);

/* avgpool2d backward: g_y (out_h, out_w, c) -> g_x (in_h, in_w, c), exponent e_y - 15 + narrowing. */
fedtiny_status fedtiny_avgpool2d_input_grad(const fedtiny_pool2d_params *p, const int16_t *g_y, int32_t e_y,
                                            int16_t *g_x, int32_t *e_x, void *scratch);
size_t fedtiny_avgpool2d_input_grad_scratch_bytes(const fedtiny_pool2d_params *p);

/* maxpool2d backward: each output's g to the first maximum of its window (row-major). */
fedtiny_status fedtiny_maxpool2d_input_grad(const fedtiny_pool2d_params *p, const int16_t *g_y, int32_t e_y,
                                            const int8_t *x, int16_t *g_x, int32_t *e_x, void *scratch);
size_t fedtiny_maxpool2d_input_grad_scratch_bytes(const fedtiny_pool2d_params *p);

/* lut backward: g_x = narrow(g_y * grad_table[x + 128]) (products below 2^30, so two passes need no scratch),
 * exponent e_y - grad_shift + narrowing. g_x may be g_y. */
fedtiny_status fedtiny_lut_input_grad(const fedtiny_lut_params *p, const int16_t *g_y, int32_t e_y, const int8_t *x,
                                      int16_t *g_x, int32_t *e_x);
size_t fedtiny_lut_input_grad_scratch_bytes(const fedtiny_lut_params *p);

/* Which input of a cat or mul a gradient step is for. */
typedef struct {
    const fedtiny_cat_params *cat;
    int32_t input;
} fedtiny_cat_input_grad_params;

typedef struct {
    const fedtiny_mul_params *mul;
    int32_t input;
} fedtiny_mul_input_grad_params;

/* cat backward: input `input`'s part of g_y, copied unchanged (exponent e_y). */
fedtiny_status fedtiny_cat_input_grad(const fedtiny_cat_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                      int16_t *g_x, int32_t *e_x);
size_t fedtiny_cat_input_grad_scratch_bytes(const fedtiny_cat_input_grad_params *p);

/* mul backward for input a (b likewise): g_a = narrow(sum over the axes a broadcasts along of
 * g_y (b - b_zero_point) a_grad_m), exponent e_y - a_grad_shift + narrowing; each sum formed twice (peak, then
 * narrow), so no scratch. `other` is the other input's int8 values. */
fedtiny_status fedtiny_mul_input_grad(const fedtiny_mul_input_grad_params *p, const int16_t *g_y, int32_t e_y,
                                      const int8_t *other, int16_t *g_x, int32_t *e_x);
size_t fedtiny_mul_input_grad_scratch_bytes(const fedtiny_mul_input_grad_params *p);

/* Bit i of mask byte i/8 (LSB first) = act_min < y[i] < act_max. */
fedtiny_status fedtiny_activation_mask(const fedtiny_grad_mask_params *p, const int8_t *y, uint8_t *bits);
size_t fedtiny_activation_mask_scratch_bytes(const fedtiny_grad_mask_params *p);

/* g passes where the saved bit (or the kept output y) says the clamp let the value through. */
fedtiny_status fedtiny_grad_mask_bits(const fedtiny_grad_mask_params *p, const int16_t *g, const uint8_t *bits,
                                      int16_t *out);
fedtiny_status fedtiny_grad_mask(const fedtiny_grad_mask_params *p, const int16_t *g, const int8_t *y, int16_t *out);
size_t fedtiny_grad_mask_scratch_bytes(const fedtiny_grad_mask_params *p);

/* ==== fast backward kernels (fedtiny_kernels_bwd_fast.c) ==================================================
 * The reference training kernels' results bit for bit, faster: operands transposed once into contiguous int16
 * vectors in the scratch, then dot products of int16 pairs (SMLAD on a Cortex-M4 with the DSP extension; vector
 * code from gcc -O3 on the host). The code generator picks them (fedtiny.device_memory.step_kernel) unless the
 * budget asks for the reference kernels' smaller scratch. */

/* fedtiny_conv2d_weight_update for any conv; scratch: (channels + min(16, row length rounded up to even)) x positions
 * (rounded up to even) int16. */
fedtiny_status fedtiny_conv2d_weight_update_fast(const fedtiny_conv2d_update_params *p, const int16_t *g_y,
                                                 int32_t e_y, const int8_t *x, int8_t *rows, uint64_t *rng_counter,
                                                 void *scratch);
size_t fedtiny_conv2d_weight_update_fast_scratch_bytes(const fedtiny_conv2d_update_params *p);

/* fedtiny_conv2d_input_grad of a depthwise conv (groups == in_c == out_c) in one pass; scratch: the reference's
 * int64 per input element, then kernel_h x kernel_w x in_c int32. */
fedtiny_status fedtiny_conv2d_input_grad_depthwise(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y,
                                                   int32_t e_y, int16_t *g_x, int32_t *e_x, void *scratch);
size_t fedtiny_conv2d_input_grad_depthwise_scratch_bytes(const fedtiny_conv2d_input_grad_params *p);

/* fedtiny_conv2d_input_grad of a pointwise conv (1 x 1, stride 1, no padding, groups 1, out_c <= 511) without
 * transposing g_y: per pixel two SMLAD dot products over output channels of each term's 15-bit halves; scratch:
 * the reference's int64 per input element, then 8 bytes per pixel and output-channel pair, then 8 per pair. */
fedtiny_status fedtiny_conv2d_input_grad_pointwise(const fedtiny_conv2d_input_grad_params *p, const int16_t *g_y,
                                                   int32_t e_y, int16_t *g_x, int32_t *e_x, void *scratch);
size_t fedtiny_conv2d_input_grad_pointwise_scratch_bytes(const fedtiny_conv2d_input_grad_params *p);

/* fedtiny_conv2d_bias_update for outputs of at most 65,535 positions: int32 sums eight channels at a time, two
 * biases per draw; scratch: int32 per output channel. */
fedtiny_status fedtiny_conv2d_bias_update_fast(const fedtiny_conv2d_update_params *p, const int16_t *g_y,
                                               int32_t e_y, int32_t *bias, uint64_t *rng_counter, void *scratch);
size_t fedtiny_conv2d_bias_update_fast_scratch_bytes(const fedtiny_conv2d_update_params *p);

#endif /* FEDTINY_KERNELS_H */
