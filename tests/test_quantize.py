"""The quantizer's contract: what it refuses (naming op and module path), and the numbers it produces.

Weights int8 symmetric per output channel, biases int32 at s_x * s_w, activations int8 asymmetric covering the
calibration range, saturation instead of wraparound, BatchNorm folded without changing the float function.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.ir import GraphError, to_hwc
from fedtiny.zoo import randomize_batchnorm
from fedtiny.quantize import UnsupportedOpError, float_forward, lower, quantize
from fedtiny.zoo import build
from fedtiny.interpreter import dequantize, quantize_input, run


def _samples(shape, n=64, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=(n,) + tuple(shape))).astype(np.float32)


def _to_torch_layout(hwc, like):
    """(N, H, W, C) -> the layout of the PyTorch tensor `like`: (N, C, H, W) / (N, C, L) / (N, F)."""
    if like.ndim == 4:
        return hwc.transpose(0, 3, 1, 2)
    if like.ndim == 3:
        return hwc[:, 0].transpose(0, 2, 1)
    return hwc.reshape(len(hwc), -1)


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------

class SoftplusHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Sequential(nn.Linear(8, 2), nn.Softplus())

    def forward(self, x):
        return self.head(self.body(x))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv1d(2, 3, 1)
        self.right = nn.Conv1d(2, 3, 1)

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], 0)  # along the batch axis: the device has none


class SoftmaxInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.Softmax(dim=1)

    def forward(self, x):
        return self.act(self.fc(x))


class Dilated(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2))

    def forward(self, x):
        return self.stem(x)


class NormFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.norm(x))


class NormAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.block(x)


class PaddedAvgPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True)

    def forward(self, x):
        return self.pool(self.conv(x))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x, y):
        return self.fc(x) + y


# name -> (model, sample shape, words the error must contain: the op and where it is)
REFUSED = {
    "softplus in a Sequential": (SoftplusHead(), (6,), ["Softplus", "head.1"]),
    "torch.cat along the batch axis": (Concat(), (2, 8), ["cat", "dim=0"]),
    "softmax inside the model": (SoftmaxInside(), (6,), ["Softmax", "act"]),
    "conv2d dilation 2": (Dilated(), (2, 9, 9), ["Conv2d", "stem.0", "dilation"]),
    "batch norm on the input": (NormFirst(), (6,), ["BatchNorm1d", "norm"]),
    "batch norm after a relu": (NormAfterRelu(), (2, 6, 6), ["BatchNorm2d", "block.2"]),
    "avgpool padding count_include_pad": (PaddedAvgPool(), (2, 6, 6), ["AvgPool2d", "pool", "count_include_pad"]),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_unsupported_op_is_refused_with_op_and_module_path(case):
    model, shape, words = REFUSED[case]
    with pytest.raises(UnsupportedOpError) as err:
        quantize(model.eval(), _samples(shape, n=8))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_model_with_two_inputs_is_refused():
    with pytest.raises(UnsupportedOpError, match="more than one input"):
        quantize(TwoInputs().eval(), _samples((6,), n=8))


# Settings that once let another exception type escape: each must work or be an UnsupportedOpError.
def _gap(model, shape, raises, what):
    return pytest.param(model, shape, id=what)


GAPS = [
    _gap(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False)), (2, 6, 6), AttributeError,
         "BatchNorm affine=False (weight is None)"),
    _gap(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), (2, 6, 6), AttributeError,
         "BatchNorm track_running_stats=False (running_mean is None)"),
    _gap(nn.Sequential(nn.Conv2d(2, 4, 1), nn.Flatten(1, 2)), (2, 6, 6), GraphError,
         "Flatten with end_dim != -1 (lowered as a full flatten)"),
]


@pytest.mark.parametrize("model, shape", GAPS)
def test_batchnorm_and_flatten_variants_work_or_are_refused(model, shape):
    x = _samples(shape, n=8)
    try:
        quantize(model.eval(), x)
    except UnsupportedOpError:
        return
    fg = lower(model, shape)  # accepted: then it must compute the same function
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(_to_torch_layout(float_forward(fg, to_hwc(x))[fg.output], ref), ref, atol=1e-5)


def test_avgpool_divisor_override_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.AvgPool2d(2, divisor_override=3)).eval()
    with pytest.raises(UnsupportedOpError, match="AvgPool2d"):
        quantize(model, _samples((2, 6, 6), n=8))


def test_untraceable_model_is_refused():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(UnsupportedOpError, match="torch.fx"):
        quantize(DataDependent().eval(), _samples((4,), n=8))


# ---------------------------------------------------------------------------------------------------------------
# Weights and biases
# ---------------------------------------------------------------------------------------------------------------

def _single_conv_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight[2] *= 20.0  # channels of very different magnitude: per-channel scales must differ
        model[0].weight[4] *= 0.01
        model[0].bias.uniform_(-2.0, 2.0)
    x = _samples((3, 7, 7))
    return model, quantize(model, x), x


def test_weights_symmetric_per_channel_use_the_full_int8_range():
    model, graph, _ = _single_conv_graph()
    (op,) = graph.ops
    w = graph.tensors[op.inputs[1]]
    w_float = model[0].weight.detach().double().numpy().transpose(0, 2, 3, 1)  # OIHW -> OHWI, as the IR
    max_abs = np.abs(w_float).reshape(6, -1).max(axis=1)
    assert w.dtype == "int8" and w.data.dtype == np.int8 and w.zero_point == 0
    assert w.data.shape == (6, 3, 3, 3)
    np.testing.assert_allclose(w.scale, max_abs / 127.0, rtol=1e-12)
    np.testing.assert_array_equal(np.abs(w.data.astype(np.int64)).reshape(6, -1).max(axis=1), 127)
    assert w.data.min() >= -127  # symmetric: -128 is never used
    np.testing.assert_array_equal(w.data, np.round(w_float / w.scale[:, None, None, None]))
    assert w.scale.max() / w.scale.min() > 1000  # one scale per channel, not one per tensor


def test_all_zero_weight_channel_gets_a_finite_scale():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0.0
    graph = quantize(model, _samples((4,)))
    w = graph.tensors[graph.ops[0].inputs[1]]
    assert np.all(np.isfinite(w.scale)) and np.all(w.scale > 0)
    np.testing.assert_array_equal(w.data[1], 0)


def test_bias_is_int32_at_input_scale_times_weight_scale():
    model, graph, _ = _single_conv_graph()
    (op,) = graph.ops
    x, w, b = (graph.tensors[n] for n in op.inputs)
    s_x = x.scale[0]
    assert b.dtype == "int32" and b.data.dtype == np.int32 and b.zero_point == 0
    np.testing.assert_allclose(b.scale, s_x * w.scale, rtol=1e-12)
    bias = model[0].bias.detach().double().numpy()
    np.testing.assert_array_equal(b.data, np.round(bias / (s_x * w.scale)))


# ---------------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------------

def test_activation_qparams_are_asymmetric_and_cover_the_calibration_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 30, 5))
    model = randomize_batchnorm(model)
    x = _samples((2, 32), n=128) + 0.7  # an input whose range is not centred on zero
    graph = quantize(model, x)
    fg = lower(model, x.shape[1:])
    values = float_forward(fg, to_hwc(x))
    assert len(graph.activations) >= 4
    asymmetric = 0
    for t in graph.activations:
        s, z = float(t.scale[0]), t.zero_point
        assert t.dtype == "int8" and len(t.scale) == 1 and s > 0
        assert -128 <= z <= 127 and isinstance(z, int)
        lo, hi = min(values[t.name].min(), 0.0), max(values[t.name].max(), 0.0)  # 0 is always representable
        assert (-128 - z) * s <= lo + s / 2 and (127 - z) * s >= hi - s / 2, (t.name, lo, hi, s, z)
        assert s <= (hi - lo) / 255 * (1 + 1e-9), (t.name, s)  # and not wider than needed: no wasted codes
        asymmetric += z not in (0, -128)
    assert asymmetric, "some tensor with negative and positive values must use a non-trivial zero point"
    # the ReLU output holds only non-negative values: all 256 codes go to [0, max]
    relu_out = graph.ops[0].outputs[0]
    assert graph.tensors[relu_out].zero_point == -128


def _calibration_with_unit_range(features, n=64):
    """Small random samples plus +-1 on one feature at a time: the input range is [-1, 1], but no calibration
    sample moves many features at once, so sign-aligned inputs drive every layer far beyond its range."""
    eye = np.eye(features, dtype=np.float32)
    return np.concatenate([_samples((features,), n=n, scale=0.05), eye, -eye])


def test_inputs_far_outside_calibration_saturate_without_wraparound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 6)).eval()
    graph = quantize(model, _calibration_with_unit_range(32))
    w = model[0].weight.detach().numpy()
    signs = np.sign(np.random.default_rng(1).normal(size=(250, 32))).astype(np.float32)
    x = 100.0 * np.concatenate([np.sign(w), -np.sign(w), signs])  # 100x the input range
    q_in = quantize_input(graph, x)
    zp_in = graph.tensors[graph.inputs[0]].zero_point
    assert set(np.unique(q_in).tolist()) == {-128, 127}
    with torch.no_grad():  # what the float model computes on the clamped inputs
        ref = model(torch.as_tensor(dequantize(graph, graph.inputs[0], q_in).reshape(len(x), -1),
                                    dtype=torch.float32)).numpy()
    out = run(graph, q_in).reshape(len(x), -1).astype(np.int64)
    o = graph.tensors[graph.outputs[0]]
    lo, hi = (-128 - o.zero_point) * o.scale[0], (127 - o.zero_point) * o.scale[0]
    margin = 0.1 * (hi - lo)  # beyond the rounding noise of 32 int8 products
    above, below = ref > hi + margin, ref < lo - margin
    assert above.sum() > 50 and below.sum() > 50 and zp_in in range(-128, 128)
    np.testing.assert_array_equal(out[above], 127)
    np.testing.assert_array_equal(out[below], -128)


def test_saturation_through_hidden_layers_keeps_the_sign():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():  # all weights and biases positive: the function only grows with its inputs
        for layer in (model[0], model[2]):
            layer.weight.abs_()
            layer.bias.abs_()
    graph = quantize(model, _calibration_with_unit_range(32))
    x = np.full((4, 32), 1000.0, np.float32)
    values = run(graph, quantize_input(graph, x), keep=True)
    for op in graph.ops:  # every layer is driven past its calibrated range: all at the top code, none wrapped
        np.testing.assert_array_equal(values[op.outputs[0]], 127, err_msg=op.origin)
    values = run(graph, quantize_input(graph, -x), keep=True)
    hidden, out = (values[op.outputs[0]] for op in graph.ops)
    np.testing.assert_array_equal(hidden, graph.ops[0].attrs["act_min"])  # ReLU floor, not a wrapped 127
    assert out.max() < 127


def test_quantize_input_clamps_extreme_values():
    graph = quantize(nn.Sequential(nn.Linear(3, 2)).eval(), _samples((3,)))
    q = quantize_input(graph, np.array([[1e9, -1e9, 0.0]], np.float32))
    assert q.dtype == np.int8
    assert q[0, 0, 0, 0] == 127 and q[0, 0, 0, 1] == -128


# ---------------------------------------------------------------------------------------------------------------
# Lowering: BatchNorm folding, ReLU / ReLU6 fusion
# ---------------------------------------------------------------------------------------------------------------

FOLDS = {
    "conv1d + bn": (nn.Sequential(nn.Conv1d(2, 5, 7, bias=False), nn.BatchNorm1d(5)), (2, 40)),
    "conv2d + bn + relu": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()), (3, 8, 8)),
    "depthwise + bn + relu6": (nn.Sequential(nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=False), nn.BatchNorm2d(6),
                                             nn.ReLU6()), (6, 9, 9)),
    "linear + bn1d": (nn.Sequential(nn.Linear(10, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)), (10,)),
    "zoo sensor_cnn": (build("sensor_cnn", (1, 64), 4), (1, 64)),
    "zoo mobilenet": (build("mobilenet", (1, 8, 8), 10), (1, 8, 8)),
}


@pytest.mark.parametrize("case", list(FOLDS), ids=list(FOLDS))
def test_batchnorm_folding_preserves_the_float_function(case):
    model, shape = FOLDS[case]
    model = randomize_batchnorm(model)
    fg = lower(model, shape)
    n_bn = sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())
    n_conv = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules())
    assert n_bn > 0
    assert sum(op.kind == "conv2d" for op in fg.ops) == n_conv  # BN left no op of its own
    assert all(op.kind != "clamp" for op in fg.ops)  # every ReLU fused into the op before it
    x = _samples(shape, n=16)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).double().numpy()
    got = _to_torch_layout(float_forward(fg, to_hwc(x))[fg.output], ref)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_relu6_fused_bounds_become_act_min_and_act_max():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6()).eval()
    x = _samples((2, 8, 8), scale=10.0)  # pre-activations far beyond 6, so the output range is exactly [0, 6]
    graph = quantize(model, x)
    (op,) = graph.ops
    y = graph.tensors[op.outputs[0]]
    assert op.attrs["act_min"] == y.zero_point  # real 0
    assert op.attrs["act_max"] == y.zero_point + round(6.0 / y.scale[0])  # real 6
    assert abs((op.attrs["act_max"] - y.zero_point) * y.scale[0] - 6.0) <= y.scale[0] / 2
    out = dequantize(graph, op.outputs[0], run(graph, quantize_input(graph, x * 5)))
    assert out.min() >= 0.0 and out.max() <= 6.0 + 1e-9


def test_unfused_relu6_clamps_at_six_on_its_input_grid():
    class PoolThenRelu6(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return F.relu6(self.pool(self.conv(x)))  # after a pool: nothing to fuse into, a clamp op

    torch.manual_seed(0)
    model = PoolThenRelu6().eval()
    x = _samples((2, 8, 8), scale=10.0)
    graph = quantize(model, x)
    clamp = graph.ops[-1]
    assert clamp.kind == "clamp"
    t = graph.tensors[clamp.inputs[0]]
    assert graph.tensors[clamp.outputs[0]].scale[0] == t.scale[0]
    assert clamp.attrs["act_min"] == t.zero_point
    assert clamp.attrs["act_max"] == t.zero_point + round(6.0 / t.scale[0]) < 127  # the pool range exceeds 6
    out = dequantize(graph, clamp.outputs[0], run(graph, quantize_input(graph, x)))
    assert out.min() >= 0.0 and out.max() <= 6.0 + t.scale[0] / 2


def test_user_module_from_supported_ops_quantizes_and_runs():
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv1d(c, c, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm1d(c)

        def forward(self, x):
            return F.relu(x + self.bn(self.conv(x)))

    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv1d(3, 8, 5, stride=2, padding=2)
            self.block = Block(8)
            self.pool = nn.MaxPool1d(2)
            self.drop = nn.Dropout(0.2)
            self.out = nn.Linear(8 * 8, 4)

        def forward(self, x):
            x = F.relu6(self.stem(x))
            x = self.pool(self.block(x))
            return self.out(self.drop(torch.flatten(x, 1)))

    torch.manual_seed(0)
    model = randomize_batchnorm(UserNet())
    x = _samples((3, 32), n=128)
    graph = quantize(model, x, name="user", classes=["a", "b", "c", "d"])
    assert [op.kind for op in graph.ops] == ["conv2d", "conv2d", "add", "maxpool2d", "reshape", "conv2d"]
    assert graph.meta["name"] == "user" and graph.meta["classes"] == ["a", "b", "c", "d"]
    assert graph.ops[1].origin == "block.conv+block.bn"  # module paths survive into the graph
    assert graph.ops[-1].origin == "out"
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    got = dequantize(graph, graph.outputs[0], run(graph, quantize_input(graph, x))).reshape(ref.shape)
    out_scale = graph.tensors[graph.outputs[0]].scale[0]
    err = np.abs(got - ref) / out_scale
    assert err.mean() < 2.0 and err.max() < 12, (err.mean(), err.max())
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9
