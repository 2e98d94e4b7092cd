"""Reference integer kernels, the living definition of what the C runtime computes.

Every kernel takes int8 numpy arrays with a leading batch axis, (N, H, W, C), plus the op's attributes, and
returns exactly what the C kernel returns for each sample. Integer sums are computed as float64 matrix
products: every product and partial sum is an integer far below 2^53, so the result is exact whatever
order BLAS adds in, and fast.

Each op's backward kernels follow its forward kernel. Gradients are int16 with a power-of-two exponent per
tensor (real = g * 2^e); backward kernels return exact int64 sums plus the exponent they carry, and
`narrow_to_int16` turns those into the next gradient (docs/numerics.md).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .arith import multiply_by_quantized_multiplier, narrow_to_int16


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


def conv2d_weight_grad(g_y, x, x_zero_point, kernel, stride, padding, groups, channels):
    """Exact sums S[o, kh, kw, c] = sum over positions of g_y[o] * (x - zx) for output channels [0, channels).

    g_y (1, OH, OW, Cout) int16, x (1, H, W, Cin) int8 -> int64 (channels, KH, KW, Cin/groups).
    Real dL/dW = S * 2^e_y * s_x.
    """
    kh, kw = kernel
    cin_g = x.shape[3] // groups
    patches = _windows(x.astype(np.float64) - x_zero_point, (kh, kw), stride, padding, 0.0)[0]
    oh, ow = patches.shape[:2]
    patches = patches.reshape(oh * ow, kh, kw, groups, cin_g)
    g = g_y[0, :, :, :channels].reshape(oh * ow, channels).astype(np.float64)
    if groups == 1:
        sums = g.T @ patches.reshape(oh * ow, kh * kw * cin_g)
    else:  # each output channel o sees only its group's input channels
        group_of = np.arange(channels) // (g_y.shape[3] // groups)
        sums = np.einsum("po,pijoc->oijc", g, patches[:, :, :, group_of, :], optimize=True)
    return sums.reshape(channels, kh, kw, cin_g).astype(np.int64)


def conv2d_bias_grad(g_y, channels):
    """Exact sums S[o] = sum over positions of g_y[o]: (1, OH, OW, Cout) int16 -> int64 (channels,)."""
    return g_y[0, :, :, :channels].astype(np.int64).sum(axis=(0, 1))


def conv2d_input_grad(g_y, weight, weight_scale_q, input_shape, stride, padding, groups):
    """Exact sums dX[h, w, c] = sum over (o, kh, kw) of g_y[o] * ws[o] * W[o, kh, kw, c] (a transposed conv).

    ws = weight_scale_q: s_w as integers ws[o] = round(s_w[o] * 2^K) (K chosen at compile time), so the real
    gradient is dX * 2^(e_y - K). g_y (1, OH, OW, Cout) int16 -> int64 (1, H, W, Cin).
    """
    cout, kh, kw, cin_g = weight.shape
    _, oh, ow, _ = g_y.shape
    h, w, cin = input_shape
    t = g_y[0].astype(np.float64) * np.asarray(weight_scale_q, dtype=np.float64)  # exact: < 2^31
    og = cout // groups
    cols = np.einsum("pqgo,goijc->pqijgc", t.reshape(oh, ow, groups, og),
                     weight.astype(np.float64).reshape(groups, og, kh, kw, cin_g), optimize=True)
    cols = cols.reshape(oh, ow, kh, kw, cin).astype(np.int64)
    top, left, bottom, right = padding
    padded = np.zeros((h + top + bottom, w + left + right, cin), dtype=np.int64)
    sh, sw = stride
    for i in range(kh):
        for j in range(kw):
            padded[i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += cols[:, :, i, j]
    return padded[top:top + h, left:left + w][None]


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


def avgpool2d_input_grad(g_y, input_shape, kernel, stride, padding):
    """Exact sums dX[h, w, c] = sum over windows containing (h, w) of g_y * round(2^15 / count); real = dX * 2^(e_y - 15).

    count is the window's number of valid elements; round(2^15 / count) = (2^15 + count // 2) // count.
    """
    h, w, c = input_shape
    ones = np.ones((1, h, w, 1), dtype=np.int64)
    counts = _windows(ones, kernel, stride, padding, 0).sum(axis=(3, 4))[0]  # (OH, OW, 1)
    t = g_y[0].astype(np.int64) * ((32768 + counts // 2) // counts)
    top, left, bottom, right = padding
    padded = np.zeros((h + top + bottom, w + left + right, c), dtype=np.int64)
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, t.shape[:2]
    for i in range(kh):
        for j in range(kw):
            padded[i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += t
    return padded[top:top + h, left:left + w][None]


def maxpool2d(x, *, kernel, stride, padding):
    return _windows(x, kernel, stride, padding, -128).max(axis=(3, 4)).astype(np.int8)


def maxpool2d_input_grad(g_y, x, kernel, stride, padding):
    """Route each output's gradient to the first maximum of its window (row-major scan, padding never wins)."""
    (kh, kw), (sh, sw) = kernel, stride
    top, left, bottom, right = padding
    _, h, w, c = x.shape
    win = _windows(x.astype(np.int16), kernel, stride, padding, -129)[0]  # below every int8: padding never wins
    oh, ow = win.shape[:2]
    first_max = win.reshape(oh, ow, kh * kw, c).argmax(axis=2)  # argmax returns the first maximum
    padded = np.zeros((h + top + bottom, w + left + right, c), dtype=np.int64)
    rows = np.arange(oh)[:, None, None] * sh + first_max // kw
    cols = np.arange(ow)[None, :, None] * sw + first_max % kw
    np.add.at(padded, (rows, cols, np.arange(c)[None, None, :]), g_y[0].astype(np.int64))
    return padded[top:top + h, left:left + w][None]


def clamp(x, *, act_min, act_max):
    return np.clip(x, act_min, act_max).astype(np.int8)


def lut(x, table):
    """Any elementwise function of an int8 value, as its 256-entry table (entry x + 128)."""
    return np.asarray(table, dtype=np.int8)[x.astype(np.int16) + 128]


def lut_input_grad(g_y, x, grad_table):
    """dL/dx = dL/dy * f'(x): exact int64 products of the int16 gradient and the Q(grad_shift) derivative table
    entry of each input value (|product| < 2^30); narrowed by the caller with exponent e_y - grad_shift."""
    return g_y.astype(np.int64) * np.asarray(grad_table, dtype=np.int64)[x.astype(np.int64) + 128]


def cat(xs, *, axis, tables):
    """Concatenation along axis 0, 1 or 2 of (H, W, C): each input through its requantization table (entry x + 128;
    the identity where its quantization is the output's), then side by side, as TFLite's CONCATENATION."""
    return np.concatenate([np.asarray(table, dtype=np.int8)[x.astype(np.int16) + 128] for x, table in zip(xs, tables)],
                          axis=axis + 1)


def cat_input_grad(g_y, input_shapes, axis: int, k: int):
    """Input k's part of the output gradient, unchanged (the requantization is the identity in real units;
    saturation passes straight through as everywhere): the same exponent, nothing to narrow."""
    start = sum(shape[axis] for shape in input_shapes[:k])
    return np.take(g_y, np.arange(start, start + input_shapes[k][axis]), axis=axis + 1)


def mul(a, b, *, a_zero_point, b_zero_point, y_zero_point, multiplier, shift, act_min, act_max):
    """TFLite's quantized MUL: (a - z_a)(b - z_b) requantized by s_a s_b / s_y; an axis of size 1 broadcasts."""
    acc = (a.astype(np.int64) - a_zero_point) * (b.astype(np.int64) - b_zero_point)
    return requantize(acc, multiplier, shift, y_zero_point, act_min, act_max)


def mul_input_grad(g_y, other, other_zero_point, m: int, input_shape):
    """dL/da = dL/dy * s_b (b - z_b) for an input a of `input_shape` (H, W, C), with s_b ~ m 2^-k (a compile-
    time constant): exact int64 sums g_y (b - z_b) m over the axes a broadcasts along (|term| < 2^38), narrowed
    by the caller with exponent e_y - k."""
    acc = g_y.astype(np.int64) * ((other.astype(np.int64) - other_zero_point) * m)
    axes = tuple(i for i in range(1, 4) if input_shape[i - 1] == 1 and acc.shape[i] != 1)
    return acc.sum(axis=axes, keepdims=True) if axes else acc


def activation_mask(y, mask_min, mask_max):
    """Where the fused activation let the value through (mask_min < y < mask_max): the gradient passes there only.

    The compiler sets the bounds from the activation (ReLU: its real-zero bound; ReLU6: also its upper bound) and
    puts -129 / 128 where there is none, so int8 saturation passes gradients straight through: masking it
    would freeze a saturated wrong logit forever."""
    return (y > mask_min) & (y < mask_max)


def add_grads(g_a, e_a: int, g_b, e_b: int) -> tuple[np.ndarray, int]:
    """Sum two gradients of one tensor (a fan-out, e.g. a residual): align to the smaller exponent, add exactly,
    narrow. A term more than 40 binary orders smaller than the other is below int16 resolution and dropped."""
    if e_a < e_b:
        g_a, e_a, g_b, e_b = g_b, e_b, g_a, e_a
    d = e_a - e_b  # g_a has the larger exponent
    if d > 40:
        return g_a, e_a
    acc = (g_a.astype(np.int64) << d) + g_b.astype(np.int64)
    g, s = narrow_to_int16(acc)
    return g, e_b + s


def softmax_cross_entropy_grad(logits, label: int, exp_table) -> tuple[np.ndarray, int]:
    """dL/dz = softmax(z) - onehot(label) in Q15 (exponent -15), from int8 logits and a compile-time table
    exp_table[i] = round(2^15 * exp(-s_y * i)), i = 0..255. Integer only: p = (e * 2^15 + E/2) // E."""
    q = logits.reshape(-1).astype(np.int64)
    e = np.asarray(exp_table, dtype=np.int64)[q.max() - q]
    total = int(e.sum())
    p = (e * 32768 + total // 2) // total
    p[label] -= 32768
    return np.clip(p, -32767, 32767).astype(np.int16).reshape(logits.shape), -15


def mse_grad(y, target, m: int, exponent: int) -> tuple[np.ndarray, int]:
    """dL/dy = 2 (y - t) / K of the mean squared error, from the int8 output and the int8 target in the output's
    quantization: d = y_q - t_q exactly, times the compile-time constant 2 s_y / K = m * 2^(exponent - 15),
    narrowed like every backward sum. Returns (g, exponent) with g shaped like y."""
    d = y.reshape(-1).astype(np.int64) - np.asarray(target).reshape(-1).astype(np.int64)
    g, s = narrow_to_int16(d * m)
    return g.reshape(y.shape), exponent - 15 + s
