"""Reference integer kernels, the living definition of what the C runtime computes.

Every kernel takes int8 numpy arrays with a leading batch axis, (N, H, W, C), plus the op's attributes, and
returns exactly what the C kernel returns for each sample. Integer sums are computed as float64 matrix
products: every product and partial sum is an integer far below 2^53, so the result is exact whatever
order BLAS adds in, and fast.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .arith import multiply_by_quantized_multiplier


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - kernel) // stride + 1


def _windows(x, kernel, stride, padding, pad_value):
    """(N, H, W, C) -> (N, OH, OW, KH, KW, C) views of each receptive field, padding filled with pad_value."""
    top, left, bottom, right = padding
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    win = sliding_window_view(x, tuple(kernel), axis=(1, 2))  # (N, OH', OW', C, KH, KW)
    win = win[:, :: stride[0], :: stride[1]]
    return win.transpose(0, 1, 2, 4, 5, 3)


def requantize(acc, multiplier, shift, zero_point, act_min, act_max):
    """int32 accumulators -> int8: per-channel fixed-point multiply (last axis), add zero point, clamp."""
    y = multiply_by_quantized_multiplier(acc, np.asarray(multiplier), np.asarray(shift)) + zero_point
    return np.clip(y, act_min, act_max).astype(np.int8)


def conv2d_accumulate(x, x_zero_point, weight, bias, stride, padding, groups):
    """int32 accumulators sum((x - zx) * w) + b of a grouped 2D convolution: (N,H,W,Cin) -> (N,OH,OW,Cout)."""
    cout, kh, kw, cin_g = weight.shape
    # Padding holds the real value 0, i.e. x_zero_point, so it adds nothing once the offset is removed.
    patches = _windows(x.astype(np.float64) - x_zero_point, (kh, kw), stride, padding, 0.0)
    n, oh, ow = patches.shape[:3]
    patches = patches.reshape(n, oh, ow, kh, kw, groups, cin_g)
    w = weight.astype(np.float64).reshape(groups, cout // groups, kh, kw, cin_g)
    acc = np.einsum("nhwijgc,goijc->nhwgo", patches, w, optimize=True).reshape(n, oh, ow, cout)
    return acc.astype(np.int64) + bias.astype(np.int64)


def conv2d(x, weight, bias, *, x_zero_point, y_zero_point, stride, padding, groups, multiplier, shift,
           act_min, act_max):
    acc = conv2d_accumulate(x, x_zero_point, weight, bias, stride, padding, groups)
    return requantize(acc, multiplier, shift, y_zero_point, act_min, act_max)


def add(a, b, *, a_zero_point, b_zero_point, y_zero_point, left_shift, a_multiplier, a_shift, b_multiplier,
        b_shift, out_multiplier, out_shift, act_min, act_max):
    """TFLite's quantized ADD: both inputs rescaled to a common 2*max(s_a, s_b) / 2^left_shift grid."""
    a_scaled = multiply_by_quantized_multiplier((a.astype(np.int64) - a_zero_point) << left_shift, a_multiplier, a_shift)
    b_scaled = multiply_by_quantized_multiplier((b.astype(np.int64) - b_zero_point) << left_shift, b_multiplier, b_shift)
    return requantize(a_scaled + b_scaled, out_multiplier, out_shift, y_zero_point, act_min, act_max)


def avgpool2d(x, *, zero_point, kernel, stride, padding):
    """Mean over each window's valid (unpadded) elements, quantization unchanged.

    Windows of 2^k elements hit exact halves often, so ties round to even in real units (unbiased, and what
    dequantize-average-quantize does in ONNX): with s = sum(x - zero_point) over n elements,
    q = floor(s / n), r = s - q * n, round up if 2r > n or (2r == n and q is odd), then add the zero point.
    """
    sums = _windows(x.astype(np.int64) - zero_point, kernel, stride, padding, 0).sum(axis=(3, 4))
    ones = np.ones((1,) + x.shape[1:3] + (1,), dtype=np.int64)
    counts = _windows(ones, kernel, stride, padding, 0).sum(axis=(3, 4))
    q = sums // counts
    twice_r = 2 * (sums - q * counts)
    q = q + ((twice_r > counts) | ((twice_r == counts) & (q % 2 == 1)))
    return np.clip(q + zero_point, -128, 127).astype(np.int8)


def maxpool2d(x, *, kernel, stride, padding):
    return _windows(x, kernel, stride, padding, -128).max(axis=(3, 4)).astype(np.int8)


def clamp(x, *, act_min, act_max):
    return np.clip(x, act_min, act_max).astype(np.int8)
