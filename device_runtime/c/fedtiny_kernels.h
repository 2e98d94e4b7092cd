/* Reference and fast int8 kernels: plain loops over pointers, a params struct per op kind.
 *
 * Layout is HWC, batch-free (one sample per call), as in fedtiny/ir.py. Every kernel returns a
 * fedtiny_status and has a `_scratch_bytes()` companion giving the scratch buffer it needs (0 if none);
 * the code generator sizes one static scratch buffer from those numbers. Kernels never allocate, never
 * print, and never read an input after writing the output buffer (inputs and outputs do not overlap).
 * The definition of every kernel is the Python code in device_runtime/kernels.py.
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

/* clamp: a ReLU that could not be fused. */
typedef struct {
    int32_t size;
    int32_t act_min, act_max;
} fedtiny_clamp_params;

/* Reference convolution: any groups (dense, depthwise, grouped), strides and padding. */
fedtiny_status fedtiny_conv2d(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch);
size_t fedtiny_conv2d_scratch_bytes(const fedtiny_conv2d_params *p);

/* Fast pointwise (1x1, groups 1, no padding, any stride; also linear layers): 2 pixels x 2 channels per
 * step over an int16 copy of the two input pixels with the zero point removed. */
fedtiny_status fedtiny_conv2d_1x1(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y, void *scratch);
size_t fedtiny_conv2d_1x1_scratch_bytes(const fedtiny_conv2d_params *p);

/* Fast depthwise (groups == in_c == out_c): window bounds computed once per output pixel, no checks per tap. */
fedtiny_status fedtiny_conv2d_depthwise(const fedtiny_conv2d_params *p, const int8_t *x, int8_t *y,
                                        void *scratch);
size_t fedtiny_conv2d_depthwise_scratch_bytes(const fedtiny_conv2d_params *p);

fedtiny_status fedtiny_add(const fedtiny_add_params *p, const int8_t *a, const int8_t *b, int8_t *y);
size_t fedtiny_add_scratch_bytes(const fedtiny_add_params *p);

/* Mean of the valid elements in real units (x - zero_point), ties rounded to even (see kernels.avgpool2d). */
fedtiny_status fedtiny_avgpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_avgpool2d_scratch_bytes(const fedtiny_pool2d_params *p);

fedtiny_status fedtiny_maxpool2d(const fedtiny_pool2d_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_maxpool2d_scratch_bytes(const fedtiny_pool2d_params *p);

fedtiny_status fedtiny_clamp(const fedtiny_clamp_params *p, const int8_t *x, int8_t *y);
size_t fedtiny_clamp_scratch_bytes(const fedtiny_clamp_params *p);

#endif /* FEDTINY_KERNELS_H */
