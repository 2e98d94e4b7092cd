"""Post-training quantization: a float PyTorch module -> an int8 integer-only `Graph`.

Three passes, each a plain loop:
  lower      trace the module with torch.fx, fold BatchNorm into the conv before it, fuse ReLU/ReLU6 into
             the op before it, and turn every supported module into a float op in the IR's HWC layout;
  calibrate  run the float ops on calibration samples and record each activation's range;
  quantize   weights int8 symmetric per output channel, activations int8 asymmetric per tensor, biases int32
             at s_x * s_w, requantization as a Q31 multiplier + shift (TFLite's semantics).
An op outside the supported set is refused with its name and module path.
"""

import linecache
import math
import operator
import os
import re
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .arith import quantize_multiplier
from .arith import quantize_multiplier_q15
from .ir import CAT_MAX_INPUTS, Graph, Op, Tensor, to_hwc, validate
from .kernels import _windows

ADD_LEFT_SHIFT = 20  # TFLite's headroom for rescaling both ADD inputs onto a common grid


class UnsupportedOpError(ValueError):
    """The model uses an op (or an op setting) that fedtiny cannot run on a device."""


@dataclass
class FloatOp:
    kind: str
    inputs: list[str]
    output: str
    origin: str
    attrs: dict = field(default_factory=dict)
    weight: np.ndarray | None = None  # (Cout, KH, KW, Cin/groups), float64
    bias: np.ndarray | None = None
    act: tuple[float, float] | None = None  # fused clamp in real units: ReLU (0, inf), ReLU6 (0, 6)


@dataclass
class FloatGraph:
    ops: list[FloatOp]
    shapes: dict[str, tuple[int, ...]]  # HWC shape of every activation
    input: str
    output: str
    input_shape: tuple[int, ...]  # the PyTorch model's sample shape, without batch


def _hwc(shape: torch.Size) -> tuple[int, ...]:
    """A PyTorch activation shape (N, C, L) / (N, C, H, W) / (N, F) -> the device's (H, W, C)."""
    s = tuple(shape[1:])
    if len(s) == 1:
        return (1, 1, s[0])
    if len(s) == 2:
        return (1, s[1], s[0])
    if len(s) == 3:
        return (s[1], s[2], s[0])
    raise UnsupportedOpError(f"activations of rank {len(shape)} are not supported (shape {tuple(shape)})")


def _pair(v, one_d: bool, unit: int = 1) -> tuple[int, int]:
    """A PyTorch size/stride/padding as (H, W); a 1D op's H is a unit (1 for sizes and strides, 0 for padding)."""
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return (unit, v[0]) if one_d else (v[0], v[-1])


def _describe(node: fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _source_line(node: fx.Node) -> str:
    """' (FILE:LINE: code)', the user's line that made this node (the first frame outside torch), or ''."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in ', node.stack_trace or "")
    for path, line in frames:
        if f"{os.sep}torch{os.sep}" not in path:
            code = linecache.getline(path, int(line)).strip()
            return f" ({os.path.basename(path)}:{line}{': ' + code if code else ''})"
    return ""


# Functional pooling: parameter names in PyTorch's order, so positional and keyword uses read the same way.
_POOL_FUNCTIONS = {
    "max_pool1d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool1d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"),
    "adaptive_avg_pool1d": ("input", "output_size"),
    "adaptive_avg_pool2d": ("input", "output_size"),
}
_POOL_MODULES = {nn.MaxPool1d: "max_pool1d", nn.MaxPool2d: "max_pool2d", nn.AvgPool1d: "avg_pool1d",
                 nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d",
                 nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d"}


def _pool_call(node: fx.Node, mod) -> tuple[str, dict] | None:
    """(function name, its settings) for a pooling module or functional call, else None."""
    if mod is not None:
        name = _POOL_MODULES.get(type(mod))
        return None if name is None else (name, {p: getattr(mod, p) for p in _POOL_FUNCTIONS[name][1:]
                                                 if hasattr(mod, p)})
    name = getattr(node.target, "__name__", None) if node.op == "call_function" else None
    if name not in _POOL_FUNCTIONS:
        return None
    settings = dict(zip(_POOL_FUNCTIONS[name][1:], node.args[1:]), **node.kwargs)
    return name, settings


def _ceil_extra(size: int, kernel: int, stride: int, pad: int) -> int:
    """Extra end padding that makes floor-mode pooling give ceil_mode's output size (PyTorch's rule: the last
    window must start inside the input or its left padding)."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if (out - 1) * stride >= size + pad:
        out -= 1
    return max(0, (out - 1) * stride + kernel - (size + 2 * pad))


def _same_padding(kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """padding='same' at stride 1 as (top, left, bottom, right): PyTorch puts the odd pixel at the end."""
    (kh, kw) = kernel
    return (kh - 1) // 2, (kw - 1) // 2, kh - 1 - (kh - 1) // 2, kw - 1 - (kw - 1) // 2


def hwc_axis(dim: int, rank: int) -> int | None:
    """The (H, W, C) axis of dimension `dim` of a rank-`rank` activation in PyTorch's (and ONNX's) channels-first
    layout, batch first: None for the batch."""
    dim = dim % rank
    if dim == 0 or not 2 <= rank <= 4:
        return None
    return {2: {1: 2}, 3: {1: 2, 2: 1}, 4: {1: 2, 2: 0, 3: 1}}[rank][dim]


def _dims(dim, rank: int) -> set[int]:
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return {d % rank for d in dims}


def lower(model: nn.Module, input_shape: tuple[int, ...]) -> FloatGraph:
    """Trace `model` on samples of `input_shape` (no batch axis) into float ops with BN folded, ReLU fused."""
    try:
        return _lower(model, input_shape, stack_traces=False)
    except UnsupportedOpError:
        # again with each node's stack, so that the refusal names the line of forward() that used the op: fx's
        # stack filter imports torch._dynamo, torch.export and torch._inductor (6 s of CPU here), which a model
        # that lowers never needs (every `fedtiny simulate` checks its model this way before pretraining)
        return _lower(model, input_shape, stack_traces=True)


def _lower(model: nn.Module, input_shape: tuple[int, ...], stack_traces: bool) -> FloatGraph:
    model = model.eval()
    tracer = fx.Tracer()
    tracer.record_stack_traces = stack_traces
    try:
        traced = fx.GraphModule(model, tracer.trace(model))
    except Exception as err:  # fx raises many types for data-dependent control flow
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
        where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno}: {frames[-1].line})" if frames else ""
        raise UnsupportedOpError(f"cannot trace the model with torch.fx{where}: {' '.join(str(err).split())}") \
            from err
    if sum(node.op == "placeholder" for node in traced.graph.nodes) != 1:
        raise UnsupportedOpError("models with more than one input are not supported")
    ShapeProp(traced).propagate(torch.zeros((1,) + tuple(input_shape)))
    modules = dict(traced.named_modules())
    ops: list[FloatOp] = []
    shapes: dict[str, tuple[int, ...]] = {}
    tensor_of: dict[str, str] = {}  # fx node name -> IR tensor name (aliases for folded/fused nodes)
    last_node: dict[str, fx.Node] = {}  # IR tensor name -> the fx node that currently stands for it
    producer: dict[str, FloatOp] = {}
    flattened_from: dict[str, tuple[int, ...]] = {}
    graph_input = graph_output = None

    def origin(node):
        return node.target if node.op == "call_module" else f"{node.name} ({_describe(node, modules)})"

    def emit(op: FloatOp, node: fx.Node):
        ops.append(op)
        shapes[op.output] = _hwc(node.meta["tensor_meta"].shape)
        tensor_of[node.name] = op.output
        last_node[op.output] = node
        producer[op.output] = op

    def alias(node: fx.Node, src: str):
        tensor_of[node.name] = src
        last_node[src] = node

    def sole_user(name: str) -> bool:
        return len(last_node[name].users) == 1

    def fuse_act(node: fx.Node, src: str, lo: float, hi: float):
        prev = producer.get(src)
        if prev is not None and prev.kind in ("conv2d", "add", "mul") and prev.act is None and sole_user(src):
            prev.act = (lo, hi)
            alias(node, src)
        else:
            emit(FloatOp("clamp", [src], node.name, origin(node), act=(lo, hi)), node)

    for node in traced.graph.nodes:
        args = [tensor_of.get(a.name, a) if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "placeholder":
            if graph_input is not None:
                raise UnsupportedOpError("models with more than one input are not supported")
            graph_input = node.name
            tensor_of[node.name] = node.name
            last_node[node.name] = node
            shapes[node.name] = _hwc(node.meta["tensor_meta"].shape)
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise UnsupportedOpError("models must return exactly one tensor")
            graph_output = tensor_of[node.args[0].name]
            continue
        if "tensor_meta" not in node.meta:  # x.size(0), x.shape[0], ...: a number the tracer saw, not a tensor
            continue
        if node.op == "get_attr":
            raise UnsupportedOpError(f"parameters used directly in forward() are not supported ({node.target})")
        mod = modules.get(node.target) if node.op == "call_module" else None
        fn = node.target

        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            one_d = isinstance(mod, nn.Conv1d)
            if mod.padding_mode != "zeros" or any(d != 1 for d in mod.dilation):
                raise UnsupportedOpError(f"{type(mod).__name__} at {node.target}: only zero padding and dilation 1")
            w = mod.weight.detach().double().numpy()
            w = w[:, :, None, :].transpose(0, 2, 3, 1) if one_d else w.transpose(0, 2, 3, 1)
            if mod.padding == "same":  # PyTorch allows it at stride 1 only
                padding = list(_same_padding(w.shape[1:3]))
            else:
                ph, pw = (0, 0) if mod.padding == "valid" else _pair(mod.padding, one_d, unit=0)
                padding = [ph, pw, ph, pw]
            b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(w.shape[0])
            emit(FloatOp("conv2d", [args[0]], node.name, node.target, dict(stride=list(_pair(mod.stride, one_d)),
                 padding=padding, groups=mod.groups), weight=w, bias=b), node)
        elif isinstance(mod, nn.Linear):
            src = args[0]
            h, w_, c = shapes[src]
            if (h, w_) != (1, 1):
                raise UnsupportedOpError(f"Linear at {node.target} needs a flattened input, got a {h}x{w_}x{c} map")
            w = mod.weight.detach().double().numpy()
            if src in flattened_from:  # PyTorch flattened (C, H, W); the device's bytes are in (H, W, C) order
                fh, fw, fc = flattened_from[src]
                w = w.reshape(-1, fc, fh, fw).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            b = mod.bias.detach().double().numpy() if mod.bias is not None else np.zeros(w.shape[0])
            emit(FloatOp("conv2d", [src], node.name, node.target, dict(stride=[1, 1], padding=[0, 0, 0, 0], groups=1),
                 weight=w[:, None, None, :], bias=b), node)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            src = args[0]
            prev = producer.get(src)
            if prev is None or prev.kind != "conv2d" or prev.act is not None or not sole_user(src):
                raise UnsupportedOpError(f"{type(mod).__name__} at {node.target} must directly follow a conv or "
                                         "linear layer whose output nothing else reads, so that it can be folded")
            if mod.running_mean is None or mod.running_var is None:
                raise UnsupportedOpError(f"{type(mod).__name__} at {node.target} has no running statistics "
                                         "(track_running_stats=False); only inference-mode batch norm can be folded")
            gamma = mod.weight.detach().double() if mod.weight is not None else torch.ones_like(mod.running_var).double()
            beta = mod.bias.detach().double().numpy() if mod.bias is not None else 0.0
            scale = (gamma / torch.sqrt(mod.running_var.double() + mod.eps)).numpy()
            prev.weight = prev.weight * scale[:, None, None, None]
            prev.bias = (prev.bias - mod.running_mean.double().numpy()) * scale + beta
            prev.origin = f"{prev.origin}+{node.target}"
            alias(node, src)
        elif isinstance(mod, nn.ReLU) or fn in (F.relu, torch.relu) or (node.op == "call_method" and fn == "relu"):
            fuse_act(node, args[0], 0.0, float("inf"))
        elif isinstance(mod, nn.ReLU6) or fn is F.relu6:
            fuse_act(node, args[0], 0.0, 6.0)
        elif isinstance(mod, (nn.Identity, nn.Dropout)):
            alias(node, args[0])
        elif (pool := _pool_call(node, mod)) is not None:
            _lower_pool(*pool, node, _describe(node, modules), origin(node), args[0], shapes, emit)
        elif isinstance(mod, nn.Flatten) or (mod is None and fn in _RESHAPES):
            if isinstance(mod, nn.Flatten) or fn in (torch.flatten, "flatten"):
                start, end = ((mod.start_dim, mod.end_dim) if mod is not None else
                              (node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0),
                               node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)))
                if start != 1 or end != -1:
                    raise UnsupportedOpError(f"flatten at {origin(node)} must flatten everything but the batch axis "
                                             f"(start_dim=1, end_dim=-1), got {start}, {end}{_source_line(node)}")
            src, out = args[0], tuple(node.meta["tensor_meta"].shape)
            if len(out) == 2 and out[1] == int(np.prod(shapes[src])):  # (batch, features): a flatten
                if shapes[src][:2] == (1, 1):
                    alias(node, src)
                else:
                    emit(FloatOp("reshape", [src], node.name, origin(node)), node)
                    flattened_from[node.name] = shapes[src]
            elif _same_bytes(tuple(node.args[0].meta["tensor_meta"].shape), out):  # unit axes added or removed
                if _hwc(out) == shapes[src]:
                    alias(node, src)
                else:
                    emit(FloatOp("reshape", [src], node.name, origin(node)), node)
            else:
                raise UnsupportedOpError(
                    f"{_describe(node, modules)} at {origin(node)} reshapes a {shapes[src]} (H, W, C) map to "
                    f"{out[1:]}: only flattening to (batch, features) or adding/removing unit axes is "
                    f"supported{_source_line(node)}")
        elif mod is None and fn in (torch.mean, "mean"):
            src, rank = args[0], len(node.args[0].meta["tensor_meta"].shape)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dim is None or rank < 3 or _dims(dim, rank) != set(range(2, rank)):
                raise UnsupportedOpError(f"mean at {origin(node)}: only the mean over every spatial axis (global "
                                         f"average pooling) is supported, not dim={dim}{_source_line(node)}")
            h, w_, _ = shapes[src]
            emit(FloatOp("avgpool2d", [src], node.name, origin(node),
                         dict(kernel=[h, w_], stride=[h, w_], padding=[0, 0, 0, 0])), node)
        elif (function := _elementwise(node, mod, args)) is not None:
            emit(FloatOp("lut", [args[0] if isinstance(args[0], str) else args[1]], node.name, origin(node),
                         dict(function=function)), node)
        elif mod is None and fn in (torch.cat, torch.concat, torch.concatenate):
            inputs = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
            rank = len(node.meta["tensor_meta"].shape)
            axis = hwc_axis(dim, rank)
            if axis is None or not 2 <= len(inputs) <= CAT_MAX_INPUTS or not all(isinstance(a, fx.Node)
                                                                                for a in inputs):
                raise UnsupportedOpError(f"cat at {origin(node)}: only 2 to {CAT_MAX_INPUTS} tensors along a "
                                         f"channel or spatial axis are supported, not dim={dim}{_source_line(node)}")
            emit(FloatOp("cat", [tensor_of[a.name] for a in inputs], node.name, origin(node), dict(axis=axis)), node)
        elif (fn in (operator.mul, torch.mul) or (node.op == "call_method" and fn == "mul")) and len(args) == 2 \
                and all(isinstance(a, str) for a in args) and not node.kwargs:
            ranks = {len(a.meta["tensor_meta"].shape) for a in node.args}
            a, b = shapes[args[0]], shapes[args[1]]
            if len(ranks) != 1 or any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
                raise UnsupportedOpError(f"mul at {origin(node)}: the product of a {a} and a {b} (H, W, C) map; "
                                         "each axis must be equal or 1 in one of them, at the same rank"
                                         f"{_source_line(node)}")
            emit(FloatOp("mul", list(args), node.name, origin(node)), node)
        elif fn in (operator.add, torch.add) or (node.op == "call_method" and fn == "add"):
            if len(args) != 2 or not all(isinstance(a, str) for a in args) or node.kwargs:
                raise UnsupportedOpError(f"add at {origin(node)}: only the sum of two tensors is supported")
            if shapes[args[0]] != shapes[args[1]]:
                raise UnsupportedOpError(f"add at {origin(node)}: broadcasting {shapes[args[0]]} + {shapes[args[1]]}")
            emit(FloatOp("add", list(args), node.name, origin(node)), node)
        else:
            where = node.target if node.op == "call_module" else node.name
            raise UnsupportedOpError(f"unsupported op {_describe(node, modules)} at {where}{_source_line(node)}; "
                                     "supported: conv1d/conv2d (incl. depthwise), linear, batch norm after conv, "
                                     "ReLU/ReLU6, LeakyReLU, sigmoid, tanh, hardsigmoid, hardswish, the sum of two "
                                     "tensors, the product of two tensors (broadcasting unit axes), torch.cat, GELU, "
                                     "adding/subtracting/multiplying/dividing by a number, avg/max pool "
                                     "(modules or functions), global avg pool and mean over the spatial axes, "
                                     "flatten/view/reshape to (batch, features), squeeze and unsqueeze of unit axes")
    return FloatGraph(ops, shapes, graph_input, graph_output, tuple(input_shape))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x):
    """GELU's tanh approximation, PyTorch's approximate='tanh'."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x**3)))


def _gelu_tanh_grad(x):
    t = np.tanh(_GELU_C * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


# Elementwise functions of one value (each a `lut` op), by the name its `function` attr carries, with parameters:
# name -> (params) -> (f, f') on float64 arrays in real units. f' is PyTorch's choice where f has a kink
# (LeakyReLU at 0: the negative slope; hardswish at +-3: the inner piece).
ELEMENTWISE = {
    "sigmoid": lambda: (_sigmoid, lambda x: _sigmoid(x) * (1.0 - _sigmoid(x))),
    "tanh": lambda: (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "hardsigmoid": lambda: (lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
                            lambda x: np.where(np.abs(x) < 3.0, 1.0 / 6.0, 0.0)),
    "hardswish": lambda: (lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
                          lambda x: np.where(x < -3.0, 0.0, np.where(x > 3.0, 1.0, (2.0 * x + 3.0) / 6.0))),
    "leaky_relu": lambda slope: (lambda x: np.where(x > 0, x, slope * x), lambda x: np.where(x > 0, 1.0, slope)),
    "gelu": lambda: (lambda x: x * _normal_cdf(x),
                     lambda x: _normal_cdf(x) + x * np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)),
    "gelu_tanh": lambda: (_gelu_tanh, _gelu_tanh_grad),
    "affine": lambda slope, offset: (lambda x: slope * x + offset, lambda x: np.full_like(x, slope)),
}


def elementwise(function: str) -> tuple:
    """(f, f') of a lut op's `function` attr: "sigmoid", "leaky_relu(0.1)", "affine(0.5, -0.25)" (x * 0.5 - 0.25)."""
    name, _, params = function.partition("(")
    return ELEMENTWISE[name](*(float(v) for v in params.rstrip(")").split(",") if v.strip()))


_ELEMENTWISE_MODULES = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid",
                        nn.Hardswish: "hardswish"}
_ELEMENTWISE_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
                          F.hardsigmoid: "hardsigmoid", F.hardswish: "hardswish", "sigmoid": "sigmoid",
                          "tanh": "tanh"}
# x OP c or c OP x with a number c (an affine function of the tensor operand)
_ARITHMETIC = {operator.add: "add", torch.add: "add", "add": "add", operator.sub: "sub", torch.sub: "sub",
               "sub": "sub", operator.mul: "mul", torch.mul: "mul", "mul": "mul", operator.truediv: "div",
               torch.div: "div", "div": "div"}


def _elementwise(node: fx.Node, mod, args: list) -> str | None:
    """The lut `function` when the node is an elementwise function of one tensor, else None."""
    fn = node.target
    if mod is not None:
        if isinstance(mod, nn.GELU):
            return "gelu_tanh" if mod.approximate == "tanh" else "gelu"
        if isinstance(mod, nn.LeakyReLU):
            return f"leaky_relu({float(mod.negative_slope)!r})"
        return _ELEMENTWISE_MODULES.get(type(mod))
    if fn is F.gelu:
        return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"
    if fn is F.leaky_relu or fn == "leaky_relu":
        return f"leaky_relu({float(args[1] if len(args) > 1 else node.kwargs.get('negative_slope', 0.01))!r})"
    if fn in _ELEMENTWISE_FUNCTIONS and len(args) == 1:
        return _ELEMENTWISE_FUNCTIONS[fn]
    op = _ARITHMETIC.get(fn) if not node.kwargs else None
    if op is None or len(args) != 2 or [isinstance(a, str) for a in args].count(True) != 1:
        return None
    c = args[1] if isinstance(args[0], str) else args[0]
    if not isinstance(c, (int, float)) or isinstance(c, bool):
        return None
    c, tensor_first = float(c), isinstance(args[0], str)
    if op == "div" and (not tensor_first or c == 0):
        return None  # c / x (or a division by zero): refused by the caller
    # every entry is evaluated: "div"'s guard keeps x * 0 from dividing by zero
    slope = {"add": 1.0, "sub": 1.0 if tensor_first else -1.0, "mul": c, "div": 1.0 / c if c else 0.0}[op]
    offset = {"add": c, "sub": -c if tensor_first else c, "mul": 0.0, "div": 0.0}[op]
    return f"affine({slope!r}, {offset!r})"


def lut_tables(f, df, x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> dict:
    """The lut op's attrs: y for each int8 x (round half to even, saturated), and f' at each x's real value in
    Q(grad_shift), grad_shift chosen so that the largest |f'| uses 15 bits (docs/numerics.md)."""
    real = x_scale * (np.arange(-128, 128) - x_zero)
    table = np.clip(np.round(f(real) / y_scale) + y_zero, -128, 127).astype(int)
    slope = np.asarray(df(real), dtype=np.float64)
    peak = float(np.abs(slope).max())
    shift = 14 - int(np.floor(np.log2(peak))) if peak > 0 else 0
    grad = np.round(slope * 2.0**shift)
    if np.abs(grad).max() >= 2**15:  # rounded up to 2^15
        shift -= 1
        grad = np.round(slope * 2.0**shift)
    return dict(table=table.tolist(), grad_table=grad.astype(int).tolist(), grad_shift=shift)


def requantize_table(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> list[int]:
    """The int8 value of each int8 x on another grid: clamp(round(s_x (x - z_x) / s_y) + z_y) (round half to even, in
    float64), the identity when the grids are the same (a cat input's table)."""
    return lut_tables(lambda x: x, np.ones_like, x_scale, x_zero, y_scale, y_zero)["table"]


def grad_scale(scale: float) -> tuple[int, int]:
    """A mul input's scale for the other input's gradient: (m, k) with m in [2^14, 2^15] and scale ~ m 2^-k."""
    m, exponent = quantize_multiplier_q15(scale)
    return m, 15 - exponent


_RESHAPES = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
             "flatten", "view", "reshape", "squeeze", "unsqueeze")


def _same_bytes(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a PyTorch reshape from `before` to `after` (batch axis first) keeps the device's (H, W, C) bytes in
    place, so that it costs nothing: compare where each element lands in both layouts."""
    if len(before) < 2 or len(after) < 2 or len(after) > 4 or before[0] != after[0]:
        return False
    order = np.arange(int(np.prod(before))).reshape(before)
    return bool(np.array_equal(to_hwc(order).ravel(), to_hwc(order.reshape(after)).ravel()))


def _lower_pool(name: str, settings: dict, node: fx.Node, what: str, where: str, src: str, shapes: dict,
                emit) -> None:
    """A pooling module or function (`what`, at module path or node `where`) as avgpool2d/maxpool2d; ceil_mode
    becomes extra end padding."""
    one_d, is_max = name.endswith("1d"), name.startswith("max")
    h, w, _ = shapes[src]
    if name.startswith("adaptive"):
        size = settings["output_size"]
        if any(s not in (1, None) for s in (size if isinstance(size, (tuple, list)) else (size,))):
            raise UnsupportedOpError(f"{what} at {where}: only output size 1 (global pooling){_source_line(node)}")
        emit(FloatOp("avgpool2d", [src], node.name, where,
                     dict(kernel=[h, w], stride=[h, w], padding=[0, 0, 0, 0])), node)
        return
    kernel = _pair(settings["kernel_size"], one_d)
    stride = _pair(settings.get("stride") or settings["kernel_size"], one_d)
    ph, pw = _pair(settings.get("padding", 0), one_d, unit=0)
    if is_max and _pair(settings.get("dilation", 1), one_d) != (1, 1):
        raise UnsupportedOpError(f"{what} at {where}: dilation is not supported{_source_line(node)}")
    if settings.get("return_indices"):
        raise UnsupportedOpError(f"{what} at {where}: return_indices is not supported{_source_line(node)}")
    if settings.get("divisor_override") is not None:
        raise UnsupportedOpError(f"{what} at {where}: divisor_override is not supported{_source_line(node)}")
    if not is_max and (ph or pw) and settings.get("count_include_pad", True):
        raise UnsupportedOpError(f"{what} at {where}: padded average pooling must set count_include_pad=False (the "
                                 f"device averages valid elements only){_source_line(node)}")
    eh, ew = (_ceil_extra(h, kernel[0], stride[0], ph), _ceil_extra(w, kernel[1], stride[1], pw)) \
        if settings.get("ceil_mode") else (0, 0)
    emit(FloatOp("maxpool2d" if is_max else "avgpool2d", [src], node.name, where,
                 dict(kernel=list(kernel), stride=list(stride), padding=[ph, pw, ph + eh, pw + ew])), node)


def _float_forward_op(op: FloatOp, x: list[np.ndarray]) -> np.ndarray:
    """Float reference of each lowered op on (N, H, W, C) float64 arrays (used for calibration and tests)."""
    if op.kind == "conv2d":
        cout, kh, kw, cin_g = op.weight.shape
        g = op.attrs["groups"]
        patches = _windows(x[0], (kh, kw), op.attrs["stride"], op.attrs["padding"], 0.0)
        n, oh, ow = patches.shape[:3]
        patches = patches.reshape(n, oh, ow, kh, kw, g, cin_g)
        y = np.einsum("nhwijgc,goijc->nhwgo", patches, op.weight.reshape(g, cout // g, kh, kw, cin_g),
                      optimize=True).reshape(n, oh, ow, cout) + op.bias
    elif op.kind == "add":
        y = x[0] + x[1]
    elif op.kind == "avgpool2d":
        sums = _windows(x[0], op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"], 0.0).sum(axis=(3, 4))
        ones = np.ones((1,) + x[0].shape[1:3] + (1,))
        y = sums / _windows(ones, op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"], 0.0).sum(axis=(3, 4))
    elif op.kind == "maxpool2d":
        y = _windows(x[0], op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"], -np.inf).max(axis=(3, 4))
    elif op.kind == "reshape":
        y = x[0]  # float_forward gives it the output's shape
    elif op.kind == "lut":
        y = elementwise(op.attrs["function"])[0](x[0])
    elif op.kind == "cat":
        y = np.concatenate(x, axis=op.attrs["axis"] + 1)
    elif op.kind == "mul":
        y = x[0] * x[1]
    else:  # clamp
        y = x[0]
    if op.act is not None:
        y = np.clip(y, *op.act)
    return y


def float_forward(fg: FloatGraph, x_hwc: np.ndarray) -> dict[str, np.ndarray]:
    values = {fg.input: x_hwc.astype(np.float64)}
    for op in fg.ops:
        y = _float_forward_op(op, [values[i] for i in op.inputs])
        values[op.output] = y.reshape((len(y),) + tuple(fg.shapes[op.output]))
    return values


def _asymmetric(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return scale, zero_point


def _activation(act) -> str:
    """The fused activation's name; training masks its bounds, not plain int8 saturation."""
    if act is None:
        return "none"
    return "relu" if np.isinf(act[1]) else "relu6"


def _act_bounds(act, scale, zero_point) -> tuple[int, int]:
    if act is None:
        return -128, 127
    lo = max(-128, zero_point + int(np.round(act[0] / scale)))
    hi = 127 if np.isinf(act[1]) else min(127, zero_point + int(np.round(act[1] / scale)))
    return lo, hi


def quantize(model: nn.Module, calibration: np.ndarray, *, name: str = "model", classes=None) -> Graph:
    """Quantize `model` with float calibration samples in its own layout (N, ...) into an int8 Graph."""
    calibration = np.asarray(calibration, dtype=np.float32)
    fg = lower(model, calibration.shape[1:])
    values = float_forward(fg, to_hwc(calibration))
    qparams: dict[str, tuple[float, int]] = {fg.input: _asymmetric(values[fg.input].min(), values[fg.input].max())}
    tensors = {fg.input: Tensor(fg.input, fg.shapes[fg.input], "int8", np.array([qparams[fg.input][0]]),
                                qparams[fg.input][1])}
    ops: list[Op] = []
    for fop in fg.ops:
        y = fop.output
        if fop.kind in ("avgpool2d", "maxpool2d", "reshape", "clamp"):
            qparams[y] = qparams[fop.inputs[0]]  # these ops move or select values: the grid stays the same
        else:
            qparams[y] = _asymmetric(values[y].min(), values[y].max())
        s_y, z_y = qparams[y]
        tensors[y] = Tensor(y, fg.shapes[y], "int8", np.array([s_y]), z_y)
        act_min, act_max = _act_bounds(fop.act, s_y, z_y)
        attrs = dict(fop.attrs)
        inputs = list(fop.inputs)
        if fop.kind == "conv2d":
            s_x = qparams[fop.inputs[0]][0]
            w_max = np.abs(fop.weight).reshape(len(fop.weight), -1).max(axis=1)
            s_w = np.where(w_max > 0, w_max / 127.0, 1.0 / 127.0)
            w_q = np.clip(np.round(fop.weight / s_w[:, None, None, None]), -127, 127).astype(np.int8)
            b_q = np.clip(np.round(fop.bias / (s_x * s_w)), -(2**31), 2**31 - 1).astype(np.int32)
            mult, shift = zip(*(quantize_multiplier(s_x * s / s_y) for s in s_w))
            tensors[f"{y}.weight"] = Tensor(f"{y}.weight", w_q.shape, "int8", s_w, 0, w_q)
            tensors[f"{y}.bias"] = Tensor(f"{y}.bias", b_q.shape, "int32", s_x * s_w, 0, b_q)
            inputs += [f"{y}.weight", f"{y}.bias"]
            attrs.update(multiplier=list(mult), shift=list(shift), act_min=act_min, act_max=act_max,
                         activation=_activation(fop.act))
        elif fop.kind == "add":
            s_a, s_b = qparams[fop.inputs[0]][0], qparams[fop.inputs[1]][0]
            twice_max = 2 * max(s_a, s_b)
            (am, ash), (bm, bsh) = quantize_multiplier(s_a / twice_max), quantize_multiplier(s_b / twice_max)
            om, osh = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_y))
            attrs = dict(left_shift=ADD_LEFT_SHIFT, a_multiplier=am, a_shift=ash, b_multiplier=bm, b_shift=bsh,
                         out_multiplier=om, out_shift=osh, act_min=act_min, act_max=act_max,
                         activation=_activation(fop.act))
        elif fop.kind == "clamp":
            attrs = dict(act_min=act_min, act_max=act_max, activation=_activation(fop.act))
        elif fop.kind == "cat":
            attrs["tables"] = [requantize_table(*qparams[x], s_y, z_y) for x in fop.inputs]
        elif fop.kind == "mul":
            (s_a, _), (s_b, _) = qparams[fop.inputs[0]], qparams[fop.inputs[1]]
            m, sh = quantize_multiplier(s_a * s_b / s_y)
            (am, ash), (bm, bsh) = grad_scale(s_b), grad_scale(s_a)
            attrs = dict(multiplier=m, shift=sh, act_min=act_min, act_max=act_max, activation=_activation(fop.act),
                         a_grad_m=am, a_grad_shift=ash, b_grad_m=bm, b_grad_shift=bsh)
        elif fop.kind == "lut":
            attrs.update(lut_tables(*elementwise(fop.attrs["function"]), *qparams[fop.inputs[0]], s_y, z_y))
        ops.append(Op(fop.kind, inputs, [y], attrs, str(fop.origin)))
    meta = dict(name=name, input_shape=list(fg.input_shape),
                classes=[str(c) for c in classes] if classes is not None else None)
    graph = Graph(tensors, ops, [fg.input], [fg.output], meta)
    validate(graph)
    return graph
