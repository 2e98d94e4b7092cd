"""The one IR: an int8 graph of integer ops, shared by the quantizer, the compiler, the interpreter and codegen.

Layout is channels-last and batch-free, as on the device: every activation is (H, W, C). A 1D signal of
length L is (1, L, C); a vector of F features is (1, 1, F). So one `conv2d` op covers conv1d, conv2d,
depthwise, pointwise and linear (a 1x1 conv on a 1x1 map), and `reshape` never moves data.

Ops and their attributes (all ints or lists of ints, so the graph serializes to JSON as it is):
  conv2d    inputs (x, weight, bias) -> y. weight (Cout, KH, KW, Cin/groups) int8, symmetric per output channel;
            bias int32 at scale s_x * s_w. attrs: stride [sh, sw], padding [top, left, bottom, right], groups,
            multiplier [Cout], shift [Cout] (requantization s_x*s_w/s_y), act_min, act_max (fused ReLU/ReLU6).
            activation: "none" | "relu" | "relu6", the fused function act_min/act_max implement.
  add       inputs (a, b) -> y. TFLite's ADD: attrs left_shift, a_multiplier, a_shift, b_multiplier, b_shift,
            out_multiplier, out_shift, act_min, act_max.
  avgpool2d inputs (x,) -> y, same quantization as x. attrs kernel [kh, kw], stride, padding.
  maxpool2d inputs (x,) -> y, same quantization as x. attrs kernel, stride, padding.
  reshape   inputs (x,) -> y, same quantization and bytes, y's (H, W, C) of the same size (a flatten of an HWC
            map, or unit axes added or removed).
  clamp     inputs (x,) -> y, same quantization; attrs act_min, act_max (a ReLU that could not be fused).
  lut       inputs (x,) -> y, any elementwise function of one int8 value (sigmoid, hardswish, LeakyReLU, x * c):
            attrs table [256] (y for x = -128..127), grad_table [256] (f'(x) * 2^grad_shift at each x's real value,
            |v| < 2^15), grad_shift, function (what it computes, for people: "sigmoid", "leaky_relu(0.01)", ...).
  cat       inputs (x1, ..., xn), 2 <= n <= 5 -> y, concatenated along `axis` (0, 1, 2 of (H, W, C); the other
            axes equal). attrs axis, tables [n][256]: each input requantized to y's scale and zero point by its
            table (y = T_i[x + 128], the identity where the quantization is the same: TFLite's CONCATENATION).
  mul       inputs (a, b) -> y, the product of two tensors (TFLite's MUL): each axis of a and b is y's or 1
            (broadcast, e.g. a squeeze-and-excitation gate (1, 1, C) over an (H, W, C) map). attrs multiplier,
            shift (s_a s_b / s_y), act_min, act_max, activation; training: a_grad_m, a_grad_shift (s_b ~ m 2^-shift,
            for a's gradient) and b_grad_m, b_grad_shift (s_a, for b's).
"""

from dataclasses import dataclass, field

import numpy as np

# op kind -> (number of inputs, attributes it must carry)
OP_SIGNATURES = {
    "conv2d": (3, ("stride", "padding", "groups", "multiplier", "shift", "act_min", "act_max", "activation")),
    "add": (2, ("left_shift", "a_multiplier", "a_shift", "b_multiplier", "b_shift", "out_multiplier", "out_shift",
                "act_min", "act_max", "activation")),
    "avgpool2d": (1, ("kernel", "stride", "padding")),
    "maxpool2d": (1, ("kernel", "stride", "padding")),
    "reshape": (1, ()),
    "clamp": (1, ("act_min", "act_max", "activation")),
    "lut": (1, ("table", "grad_table", "grad_shift", "function")),
    "cat": (None, ("axis", "tables")),
    "mul": (2, ("multiplier", "shift", "act_min", "act_max", "activation", "a_grad_m", "a_grad_shift", "b_grad_m",
                "b_grad_shift")),
}
CAT_MAX_INPUTS = 5  # the C runtime's operand table holds 5 inputs and the output
ACTIVATIONS = ("none", "relu", "relu6")  # the fused function; act_min/act_max are its int8 bounds
OP_KINDS = tuple(OP_SIGNATURES)
DTYPES = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "uint8": np.uint8}


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray  # float64, one value per tensor or one per output channel (axis 0)
    zero_point: int = 0
    data: np.ndarray | None = None  # set for constants (weights, biases), None for activations

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize

    @property
    def is_constant(self) -> bool:
        return self.data is not None


@dataclass
class Op:
    kind: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    origin: str = ""  # the PyTorch module path this op came from, for errors and `fedtiny inspect`


@dataclass
class Graph:
    tensors: dict[str, Tensor]
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    meta: dict = field(default_factory=dict)

    def producer(self, name: str) -> Op | None:
        return next((op for op in self.ops if name in op.outputs), None)

    def consumers(self, name: str) -> list[Op]:
        return [op for op in self.ops if name in op.inputs]

    @property
    def constants(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.is_constant]

    @property
    def activations(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if not t.is_constant]


def to_hwc(x: np.ndarray) -> np.ndarray:
    """Samples in PyTorch layout (N, F) / (N, C, L) / (N, C, H, W) -> the device's (N, H, W, C)."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x[:, None, None, :]
    if x.ndim == 3:
        return x.transpose(0, 2, 1)[:, None]
    if x.ndim == 4:
        return x.transpose(0, 2, 3, 1)
    raise ValueError(f"samples must have shape (N, F), (N, C, L) or (N, C, H, W), got {x.shape}")


class GraphError(ValueError):
    """A graph that breaks the IR's rules (unknown op, dangling tensor, bad shape)."""


def validate(graph: Graph) -> None:
    """Check that ops are known, in topological order, and that every tensor is defined once and used sanely."""
    defined = set(graph.inputs) | {t.name for t in graph.constants}
    for name in graph.inputs + graph.outputs:
        if name not in graph.tensors:
            raise GraphError(f"graph input/output {name!r} has no tensor")
    for op in graph.ops:
        if op.kind not in OP_KINDS:
            raise GraphError(f"unknown op {op.kind!r} (from {op.origin or 'unknown module'})")
        arity, required = OP_SIGNATURES[op.kind]
        if arity is None and not 2 <= len(op.inputs) <= CAT_MAX_INPUTS:
            raise GraphError(f"op {op.kind} ({op.origin}) takes 2 to {CAT_MAX_INPUTS} inputs, got {len(op.inputs)}")
        if (arity is not None and len(op.inputs) != arity) or len(op.outputs) != 1:
            raise GraphError(f"op {op.kind} ({op.origin}) takes {arity} inputs and 1 output, "
                             f"got {len(op.inputs)} and {len(op.outputs)}")
        missing = [a for a in required if a not in op.attrs]
        if missing:
            raise GraphError(f"op {op.kind} ({op.origin}) lacks attributes {missing}")
        if op.attrs.get("activation", "none") not in ACTIVATIONS:
            raise GraphError(f"op {op.kind} ({op.origin}) has unknown activation {op.attrs['activation']!r}")
        for name in op.inputs:
            if name not in graph.tensors:
                raise GraphError(f"op {op.kind} ({op.origin}) reads undefined tensor {name!r}")
            if name not in defined:
                raise GraphError(f"op {op.kind} ({op.origin}) reads {name!r} before it is computed")
        for name in op.outputs:
            if name not in graph.tensors:
                raise GraphError(f"op {op.kind} ({op.origin}) writes undefined tensor {name!r}")
            if name in defined:
                raise GraphError(f"tensor {name!r} is written twice")
            defined.add(name)
    for name in graph.outputs:
        if name not in defined:
            raise GraphError(f"graph output {name!r} is never computed")
    for op in graph.ops:
        for key in ("stride", "kernel"):
            if key in op.attrs and (len(op.attrs[key]) != 2 or min(op.attrs[key]) < 1):
                raise GraphError(f"op {op.kind} ({op.origin}) has invalid {key} {op.attrs[key]}")
        if "padding" in op.attrs and (len(op.attrs["padding"]) != 4 or min(op.attrs["padding"]) < 0):
            raise GraphError(f"op {op.kind} ({op.origin}) has invalid padding {op.attrs['padding']}")
        _check_shapes(graph, op)
    for t in graph.tensors.values():
        if t.dtype not in DTYPES:
            raise GraphError(f"tensor {t.name!r} has unknown dtype {t.dtype!r}")
        if t.data is not None and tuple(t.data.shape) != tuple(t.shape):
            raise GraphError(f"tensor {t.name!r} data shape {t.data.shape} does not match {t.shape}")
        if t.data is not None and t.data.dtype != np.dtype(DTYPES[t.dtype]):
            raise GraphError(f"tensor {t.name!r} stores {t.data.dtype} but declares {t.dtype}")
        if t.data is None and (len(t.shape) != 3 or min(t.shape) < 1 or t.dtype != "int8"):
            raise GraphError(f"activation {t.name!r} must be int8 of shape (H, W, C), got {t.dtype} {t.shape}")
        if t.dtype == "int8" and not -128 <= t.zero_point <= 127:
            raise GraphError(f"tensor {t.name!r} has zero point {t.zero_point} outside int8")
        scale = np.asarray(t.scale)
        if scale.ndim != 1 or len(scale) not in (1, t.shape[0]) or not np.all(np.isfinite(scale) & (scale > 0)):
            raise GraphError(f"tensor {t.name!r} needs one positive scale or one per channel, got {scale.tolist()}")


def output_shape(graph: Graph, op: Op) -> tuple[int, ...]:
    """The (H, W, C) shape an op produces from its inputs' shapes and attributes."""
    h, w, c = graph.tensors[op.inputs[0]].shape
    if op.kind in ("conv2d", "avgpool2d", "maxpool2d"):
        kh, kw = graph.tensors[op.inputs[1]].shape[1:3] if op.kind == "conv2d" else op.attrs["kernel"]
        (sh, sw), (pt, pl, pb, pr) = op.attrs["stride"], op.attrs["padding"]
        c = graph.tensors[op.inputs[1]].shape[0] if op.kind == "conv2d" else c
        return ((h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, c)
    if op.kind == "cat":
        shapes = [graph.tensors[n].shape for n in op.inputs]
        out = list(shapes[0])
        out[op.attrs["axis"]] = sum(s[op.attrs["axis"]] for s in shapes)
        return tuple(out)
    if op.kind == "mul":  # each axis: both inputs' size, or 1 in one of them
        return tuple(max(a, b) for a, b in zip(graph.tensors[op.inputs[0]].shape, graph.tensors[op.inputs[1]].shape))
    if op.kind == "reshape":  # any (H, W, C) of the same size: the quantizer only emits byte-preserving ones
        out = tuple(graph.tensors[op.outputs[0]].shape)
        return out if len(out) == 3 and int(np.prod(out)) == h * w * c else (1, 1, h * w * c)
    return (h, w, c)


def _check_shapes(graph: Graph, op: Op) -> None:
    t = graph.tensors
    if op.kind == "conv2d":
        x, weight, bias = (t[n] for n in op.inputs)
        cout, _, _, cin_g = weight.shape if len(weight.shape) == 4 else (0, 0, 0, 0)
        groups = op.attrs["groups"]
        if (len(weight.shape) != 4 or weight.dtype != "int8" or bias.dtype != "int32" or bias.shape != (cout,)
                or groups < 1 or x.shape[2] != cin_g * groups or cout % groups
                or len(op.attrs["multiplier"]) != cout or len(op.attrs["shift"]) != cout):
            raise GraphError(f"conv2d ({op.origin}): weight {weight.shape}, bias {bias.shape}, groups {groups} "
                             f"do not fit input {x.shape}")
    if op.kind == "lut" and (len(op.attrs["table"]) != 256 or len(op.attrs["grad_table"]) != 256
                             or not all(-128 <= v <= 127 for v in op.attrs["table"])
                             or not all(abs(v) < 2**15 for v in op.attrs["grad_table"])):
        raise GraphError(f"lut ({op.origin}): needs 256 int8 table entries and 256 gradient entries below 2^15")
    if op.kind == "cat":
        axis, shapes = op.attrs["axis"], [t[n].shape for n in op.inputs]
        if (axis not in (0, 1, 2) or len(op.attrs["tables"]) != len(op.inputs)
                or any(len(table) != 256 or not all(-128 <= v <= 127 for v in table) for table in op.attrs["tables"])
                or any(s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:] for s in shapes)):
            raise GraphError(f"cat ({op.origin}): inputs {shapes} along axis {axis} need equal other axes and one "
                             "256-entry int8 table each")
    if op.kind == "mul":
        a, b = t[op.inputs[0]].shape, t[op.inputs[1]].shape
        if any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
            raise GraphError(f"mul ({op.origin}): input shapes {a} and {b} do not broadcast")
    if op.kind == "add" and t[op.inputs[0]].shape != t[op.inputs[1]].shape:
        raise GraphError(f"add ({op.origin}): input shapes {t[op.inputs[0]].shape} and {t[op.inputs[1]].shape} differ")
    expected = output_shape(graph, op)
    if tuple(t[op.outputs[0]].shape) != expected or min(expected) < 1:
        raise GraphError(f"{op.kind} ({op.origin}) produces {expected}, but its output tensor is "
                         f"{t[op.outputs[0]].shape}")
