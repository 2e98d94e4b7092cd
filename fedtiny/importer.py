"""Import the int8 models people already have: a full-integer TFLite model, or an int8 QDQ or QOperator ONNX model
(onnxruntime's quantize_static; uint8 activations, QUInt8, become int8 ones by subtracting 128 from values and zero
points, which is exact) -> fedtiny's `Graph`.

TFLite's integer semantics are the IR's (channels-last, int8 activations with a zero point, int8 weights
symmetric per output channel, int32 biases at s_x * s_w, requantization by a Q31 multiplier and shift), so an
import is a translation, not a re-quantization: weights, biases and zero points are copied, and every
requantization constant is derived from the float32 scales in the file exactly as TFLite's kernels derive it
(double(s_x) * double(s_w) / double(s_y) through QuantizeMultiplier, ADD's 2^20 headroom, fused ReLU/ReLU6 bounds
rounded in float32), so that fedtiny's kernels reproduce TFLite's int8 results (LiteRT 2.3's reference
FULLY_CONNECTED rounds once where its convolutions and fedtiny round twice: a logit in a few hundred is one step
away).

Op mapping (TFLite builtin -> IR):
  CONV_2D, DEPTHWISE_CONV_2D (groups = input channels), FULLY_CONNECTED (a 1x1 conv on (1, 1, F))  -> conv2d
  MAX_POOL_2D, AVERAGE_POOL_2D -> maxpool2d, avgpool2d (a fused activation becomes a clamp)
  MEAN over the spatial axes (Keras GlobalAveragePooling) -> a depthwise conv2d over the whole map with equal
      weights and TFLite's mean multiplier (fedtiny's avgpool2d keeps the input's grid, and a second rounding
      after it would differ from TFLite's mean in half the outputs)
  RESHAPE, EXPAND_DIMS, SQUEEZE -> reshape (bytes unchanged), or nothing when the (H, W, C) shape is the same
  ADD -> add; MUL -> mul (broadcasting unit axes); CONCATENATION -> cat (each input requantized by a table)
A QUANTIZE right after a float input, and a SOFTMAX and/or DEQUANTIZE at the very end, are dropped with a note:
the device receives int8 samples, and training works on the logits (the predicted class is the same). Anything
else is refused with UnsupportedOpError naming the op and its index.

ONNX QDQ: Conv, Gemm, MaxPool, AveragePool, GlobalAveragePool, Add, Mul, Concat, Sigmoid, Tanh (a lut) and
Flatten/Reshape/Squeeze/Unsqueeze, each
between DequantizeLinear inputs and one QuantizeLinear output (int8, per-tensor activations; int8 symmetric
weights, per channel or not; int32 biases), become the same IR ops with the same constants as TFLite's. ONNX
defines such a graph in float between the QDQ pairs, so fedtiny's fixed-point results differ from it by a
rounding now and then (tests/test_import.py checks each op and the predicted classes). A Softmax at the very
end is dropped with a note, as in a TFLite model.

ONNX QOperator (quantize_static's QuantFormat.QOperator): QLinearConv, QGemm, QLinearMatMul (of a vector by a
constant), QLinearAdd, QLinearMul, QLinearConcat, QLinearSigmoid, QLinearAveragePool, QLinearGlobalAveragePool, and
MaxPool/Flatten/Reshape/Squeeze/Unsqueeze on int8 tensors, their quantization parameters being the node's inputs,
are first rewritten into the QDQ graph they compute (DequantizeLinear, the float op, QuantizeLinear) and then
imported by the QDQ path: one mapping, the same constants. An average pool onto another grid than its input's
(QLinearAveragePool has its own output scale) becomes a depthwise conv with equal weights, one rounding, as
GlobalAveragePool does. Any other QLinear* node is refused by name.
"""

import math
from pathlib import Path

import numpy as np

from .arith import quantize_multiplier
from .ir import CAT_MAX_INPUTS, Graph, GraphError, Op, Tensor, validate
from .quantize import (ADD_LEFT_SHIFT, UnsupportedOpError, elementwise, grad_scale, hwc_axis, lut_tables,
                       requantize_table)


class ModelImportError(ValueError):
    """A file that cannot be read as a model of the format its name says (or a reader that is not installed)."""


def import_model(path: str | Path) -> tuple[Graph, list[str]]:
    """(graph, notes) of a .tflite or .onnx file; notes are lines for the user about what was dropped or added."""
    path = Path(path)
    if path.suffix.lower() not in (".tflite", ".onnx"):
        raise ModelImportError(f"{path}: not a model fedtiny can import (a full-integer .tflite or an int8 QDQ or "
                               "QOperator .onnx file)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelImportError(f"{path}: cannot read: {err.strerror or err}") from err
    if path.suffix.lower() == ".tflite":
        return import_tflite(data, name=path.stem, source=str(path))
    return import_onnx(data, name=path.stem, source=str(path))


# --- TFLite ----------------------------------------------------------------------------------------------------

_INT8, _INT32, _FLOAT32 = 9, 2, 0  # tflite.TensorType
_SAME = 0  # tflite.Padding
_ACT_NONE, _ACT_RELU, _ACT_RELU6 = 0, 1, 3  # tflite.ActivationFunctionType
_RESHAPES = ("RESHAPE", "EXPAND_DIMS", "SQUEEZE")


class _TFLiteTensor:
    def __init__(self, model, t):
        self.name = t.Name().decode(errors="replace")
        self.shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        self.type = t.Type()
        q = t.Quantization()
        scale = q.ScaleAsNumpy() if q is not None and q.ScaleLength() else np.zeros(0, np.float32)
        self.scale = np.asarray(scale, dtype=np.float32).astype(np.float64)  # float32 in the file: exact
        zp = q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else np.zeros(0, np.int64)
        self.zero_points = np.asarray(zp, dtype=np.int64)
        self.quantized_dimension = q.QuantizedDimension() if q is not None else 0
        buffer = model.Buffers(t.Buffer())
        self.data = None
        if buffer is not None and buffer.DataLength():
            dtype = {_INT8: np.int8, _INT32: np.int32, _FLOAT32: np.float32}.get(self.type)
            if dtype is not None:
                self.data = np.frombuffer(buffer.DataAsNumpy().tobytes(), dtype=dtype).reshape(self.shape)

    @property
    def zero_point(self) -> int:
        return int(self.zero_points[0]) if len(self.zero_points) else 0


def _round_away(x: float) -> int:
    """TfLiteRound: round half away from zero."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TFLite's SAME padding (ComputePaddingWithOffset): (before, after), the odd pixel after."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _GraphBuilder:
    """The IR graph an importer builds: int8 activations, and conv2d/add ops with their requantization constants
    derived from float scales as TFLite derives them (double(s_x) * double(s_w) / double(s_y), QuantizeMultiplier)."""

    def __init__(self):
        self.notes: list[str] = []
        self.graph_tensors: dict[str, Tensor] = {}
        self.graph_ops: list[Op] = []

    def _declare(self, name: str, shape, scale: float, zero_point: int) -> str:
        self.graph_tensors[name] = Tensor(name, tuple(int(d) for d in shape), "int8", np.array([float(scale)]),
                                          int(zero_point))
        return name

    def _quant(self, name: str) -> tuple[float, int]:
        t = self.graph_tensors[name]
        return float(t.scale[0]), t.zero_point

    def _emit(self, kind: str, inputs: list[str], output: str, attrs: dict, origin: str):
        self.graph_ops.append(Op(kind, inputs, [output], attrs, origin))

    def _add_conv(self, x: str, y: str, weight: np.ndarray, s_w: np.ndarray, bias: np.ndarray | None,
                  stride, padding, groups: int, bounds: tuple[int, int, str], origin: str):
        """conv2d with weight (Cout, KH, KW, Cin/groups) int8 and the file's per-channel (or one) weight scale."""
        cout = weight.shape[0]
        s_w = np.broadcast_to(s_w, (cout,)).astype(np.float64)
        (s_x, _), (s_y, _) = self._quant(x), self._quant(y)
        # TFLite (PopulateConvolutionQuantizationParams): double(s_x) * double(s_w[c]) / double(s_y)
        mult, shift = zip(*(quantize_multiplier(s_x * float(s) / s_y) for s in s_w))
        act_min, act_max, activation = bounds
        if bias is None:
            bias = np.zeros(cout, np.int32)
        w_name, b_name = f"{y}.weight", f"{y}.bias"
        self.graph_tensors[w_name] = Tensor(w_name, weight.shape, "int8", s_w.copy(), 0,
                                            np.ascontiguousarray(weight, dtype=np.int8))
        self.graph_tensors[b_name] = Tensor(b_name, (cout,), "int32", s_x * s_w, 0,
                                            np.ascontiguousarray(bias, dtype=np.int32).reshape(cout))
        self._emit("conv2d", [x, w_name, b_name], y,
                   dict(stride=list(stride), padding=list(padding), groups=groups, multiplier=list(mult),
                        shift=list(shift), act_min=act_min, act_max=act_max, activation=activation), origin)

    def _add_add(self, a: str, b: str, y: str, bounds: tuple[int, int, str], origin: str):
        """TFLite's int8 ADD (add.cc): both inputs rescaled onto 2 max(s_a, s_b) / 2^20, then onto s_y."""
        (s_a, _), (s_b, _), (s_y, _) = self._quant(a), self._quant(b), self._quant(y)
        twice_max = 2 * max(s_a, s_b)
        (am, ash), (bm, bsh) = quantize_multiplier(s_a / twice_max), quantize_multiplier(s_b / twice_max)
        om, osh = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * s_y))
        act_min, act_max, activation = bounds
        self._emit("add", [a, b], y, dict(left_shift=ADD_LEFT_SHIFT, a_multiplier=am, a_shift=ash, b_multiplier=bm,
                                          b_shift=bsh, out_multiplier=om, out_shift=osh, act_min=act_min,
                                          act_max=act_max, activation=activation), origin)

    def _add_cat(self, inputs: list[str], y: str, axis: int, origin: str):
        """TFLite's CONCATENATION: each input requantized to the output's grid (a copy where they agree)."""
        s_y, z_y = self._quant(y)
        self._emit("cat", list(inputs), y, dict(axis=axis, tables=[requantize_table(*self._quant(x), s_y, z_y)
                                                                   for x in inputs]), origin)

    def _add_mul(self, a: str, b: str, y: str, bounds: tuple[int, int, str], origin: str):
        """TFLite's int8 MUL (mul.cc): (a - z_a)(b - z_b) requantized by double(s_a) * double(s_b) / double(s_y)."""
        (s_a, _), (s_b, _), (s_y, _) = self._quant(a), self._quant(b), self._quant(y)
        m, shift = quantize_multiplier(s_a * s_b / s_y)
        (am, ash), (bm, bsh) = grad_scale(s_b), grad_scale(s_a)
        act_min, act_max, activation = bounds
        self._emit("mul", [a, b], y, dict(multiplier=m, shift=shift, act_min=act_min, act_max=act_max,
                                          activation=activation, a_grad_m=am, a_grad_shift=ash, b_grad_m=bm,
                                          b_grad_shift=bsh), origin)

    def _broadcasts(self, a: str, b: str) -> bool:
        return all(p == q or 1 in (p, q) for p, q in zip(self.graph_tensors[a].shape, self.graph_tensors[b].shape))

    def _finish(self, input_name: str, output_name: str, input_shape, name: str, source: str, fmt: str) -> Graph:
        if not self.graph_ops:
            raise UnsupportedOpError(f"{source}: the model has no op fedtiny could import")
        meta = dict(name=name, input_shape=[int(d) for d in input_shape], classes=None, source=fmt)
        graph = Graph(self.graph_tensors, self.graph_ops, [input_name], [output_name], meta)
        try:
            validate(graph)
        except GraphError as err:
            raise UnsupportedOpError(f"{source}: the imported graph is invalid: {err}") from err
        return graph


class _TFLiteImporter(_GraphBuilder):
    def __init__(self, data: bytes, name: str, source: str):
        super().__init__()
        try:
            import tflite
        except ModuleNotFoundError as err:
            raise ModelImportError("reading .tflite files needs the `tflite` package: pip install "
                                   "'fedtiny[import]'") from err
        self.tflite = tflite
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ModelImportError(f"{source}: not a TFLite model (no TFL3 flatbuffer identifier)")
        try:
            self.model = tflite.Model.GetRootAsModel(data, 0)
            if self.model.SubgraphsLength() < 1:
                raise ModelImportError(f"{source}: the TFLite model has no subgraph")
            self.subgraph = self.model.Subgraphs(0)
            self.tensors = [_TFLiteTensor(self.model, self.subgraph.Tensors(i))
                            for i in range(self.subgraph.TensorsLength())]
            self.ops = [self.subgraph.Operators(i) for i in range(self.subgraph.OperatorsLength())]
            self.op_names = [self._op_name(op) for op in self.ops]
        except ModelImportError:
            raise
        except Exception as err:  # a damaged flatbuffer fails anywhere with any error
            raise ModelImportError(f"{source}: damaged TFLite model ({type(err).__name__}: {err})") from err
        self.name, self.source = name, source
        self.name_of: dict[int, str] = {}  # TFLite tensor index -> IR tensor name

    def _op_name(self, op) -> str:
        code = self.model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == 32:  # CUSTOM
            return f"CUSTOM {code.CustomCode().decode(errors='replace')}"
        return self.tflite.utils.BUILTIN_OPCODE2NAME.get(builtin, f"builtin {builtin}")

    def _options(self, op, cls_name: str):
        table = op.BuiltinOptions()
        options = getattr(self.tflite, cls_name)()
        if table is not None:
            options.Init(table.Bytes, table.Pos)
        return options

    # -- tensors --

    def _refuse(self, i: int, why: str):
        raise UnsupportedOpError(f"{self.source}: TFLite op {i} ({self.op_names[i]}): {why}")

    def _hwc(self, i: int, idx: int) -> tuple[int, int, int]:
        shape = self.tensors[idx].shape
        if not shape or shape[0] != 1 or len(shape) > 4:
            self._refuse(i, f"tensor {self.tensors[idx].name!r} has shape {shape}; fedtiny takes one sample of "
                            "rank 2 (1, F), 3 (1, L, C) or 4 (1, H, W, C)")
        if len(shape) == 2:
            return (1, 1, shape[1])
        if len(shape) == 3:
            return (1, shape[1], shape[2])
        return shape[1:]

    def _activation(self, i: int, idx: int) -> str:
        """The IR name of activation tensor idx, declared on first use (int8, one scale and zero point)."""
        if idx in self.name_of:
            return self.name_of[idx]
        t = self.tensors[idx]
        if t.type != _INT8 or len(t.scale) != 1:
            kind = "int8" if t.type == _INT8 else f"type {t.type} (not int8)"
            self._refuse(i, f"tensor {t.name!r} is {kind} with {len(t.scale)} scales; fedtiny imports "
                            "full-integer models (int8 activations, one scale per tensor): convert with "
                            "TFLITE_BUILTINS_INT8 and a representative dataset")
        name = f"t{idx}"
        self.graph_tensors[name] = Tensor(name, self._hwc(i, idx), "int8", t.scale.copy(), t.zero_point)
        self.name_of[idx] = name
        return name

    def _input(self, i: int, idx: int) -> str:
        if idx not in self.name_of:
            self._refuse(i, f"input {self.tensors[idx].name!r} is a constant or comes from an op fedtiny "
                            "dropped; only activations computed by the model are supported here")
        return self.name_of[idx]

    def _act_bounds(self, i: int, fused: int, y: str) -> tuple[int, int, str]:
        """TFLite's CalculateActivationRangeQuantized: quantize(f) = zp + TfLiteRound(f / scale) in float32."""
        s_y, z_y = self._quant(y)
        if fused == _ACT_NONE:
            return -128, 127, "none"
        if fused == _ACT_RELU:
            return max(-128, z_y), 127, "relu"
        if fused == _ACT_RELU6:
            return max(-128, z_y), min(127, z_y + _round_away(float(np.float32(6.0) / np.float32(s_y)))), "relu6"
        self._refuse(i, f"fused activation {fused} is not supported (only RELU and RELU6)")

    # -- ops --

    def _conv(self, i: int, x: str, y: str, weight: np.ndarray, s_w: np.ndarray, bias: np.ndarray | None,
              stride, padding, groups: int, fused: int, origin: str):
        self._add_conv(x, y, weight, s_w, bias, stride, padding, groups, self._act_bounds(i, fused, y), origin)

    def _weights(self, i: int, idx: int, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.tensors[idx]
        if t.data is None or t.type != _INT8:
            self._refuse(i, f"weights {t.name!r} must be constant int8")
        if np.any(t.zero_points != 0):
            self._refuse(i, f"weights {t.name!r} have non-zero zero points (fedtiny's weights are symmetric)")
        if len(t.scale) not in (1, t.shape[channel_axis]) or (len(t.scale) > 1
                                                               and t.quantized_dimension != channel_axis):
            self._refuse(i, f"weights {t.name!r} are quantized along axis {t.quantized_dimension}, not per output "
                            "channel")
        return t.data, t.scale

    def _bias(self, i: int, op) -> np.ndarray | None:
        if op.InputsLength() < 3 or op.Inputs(2) < 0:
            return None
        t = self.tensors[op.Inputs(2)]
        if t.data is None or t.type != _INT32:
            self._refuse(i, f"bias {t.name!r} must be constant int32")
        return t.data.reshape(-1)

    def _padding(self, code: int, hw: tuple[int, int], kernel, stride) -> list[int]:
        if code != _SAME:
            return [0, 0, 0, 0]
        (top, bottom), (left, right) = (_same_padding(hw[k], kernel[k], stride[k]) for k in (0, 1))
        return [top, left, bottom, right]

    def _check_dilation(self, i: int, options):
        if options.DilationHFactor() != 1 or options.DilationWFactor() != 1:
            self._refuse(i, "dilation other than 1 is not supported")

    def _same_quant(self, i: int, x: str, y_idx: int):
        t = self.tensors[y_idx]
        if len(t.scale) != 1 or float(t.scale[0]) != self._quant(x)[0] or t.zero_point != self._quant(x)[1]:
            self._refuse(i, "input and output quantization differ (fedtiny's op keeps the input's)")

    def convert(self) -> Graph:
        sub = self.subgraph
        if sub.InputsLength() != 1 or sub.OutputsLength() != 1:
            raise UnsupportedOpError(f"{self.source}: fedtiny imports models with one input and one output, this one "
                                     f"has {sub.InputsLength()} and {sub.OutputsLength()}")
        first, last = 0, len(self.ops)
        graph_input, graph_output = sub.Inputs(0), sub.Outputs(0)
        if last and self.op_names[0] == "QUANTIZE" and self.ops[0].Inputs(0) == graph_input \
                and self.tensors[graph_input].type == _FLOAT32:
            graph_input = self.ops[0].Outputs(0)
            first = 1
            self.notes.append("dropped the input QUANTIZE (op 0): fedtiny feeds the model int8 samples, quantized "
                              "on the host with the same scale and zero point")
        while last > first and self.ops[last - 1].Outputs(0) == graph_output \
                and self.op_names[last - 1] in ("DEQUANTIZE", "SOFTMAX"):
            last -= 1
            graph_output = self.ops[last].Inputs(0)
            what = ("fedtiny trains on the logits; the predicted class is the same"
                    if self.op_names[last] == "SOFTMAX" else "fedtiny's output is the int8 tensor before it")
            self.notes.append(f"dropped the final {self.op_names[last]} (op {last}): {what}")
        input_name = self._activation(first, graph_input)
        for i in range(first, last):
            self._convert_op(i)
        if graph_output not in self.name_of:
            raise UnsupportedOpError(f"{self.source}: the model's output is not computed by an op fedtiny imports")
        output_name = self.name_of[graph_output]
        in_shape = self.tensors[graph_input].shape[1:]
        input_shape = (in_shape[-1],) + tuple(in_shape[:-1]) if len(in_shape) > 1 else tuple(in_shape)
        return self._finish(input_name, output_name, input_shape, self.name, self.source, "tflite")

    def _convert_op(self, i: int):
        op, kind = self.ops[i], self.op_names[i]
        origin = f"tflite op {i} {kind}"
        ins = [op.Inputs(k) for k in range(op.InputsLength())]
        if op.OutputsLength() != 1:
            self._refuse(i, "ops with more than one output are not supported")
        out = op.Outputs(0)
        if kind == "CONV_2D":
            o = self._options(op, "Conv2DOptions")
            self._check_dilation(i, o)
            x = self._input(i, ins[0])
            w, s_w = self._weights(i, ins[1], 0)
            if self.graph_tensors[x].shape[2] % w.shape[3]:
                self._refuse(i, f"filter {w.shape} does not fit the input's {self.graph_tensors[x].shape[2]} channels")
            y = self._activation(i, out)
            stride = (o.StrideH(), o.StrideW())
            padding = self._padding(o.Padding(), self.graph_tensors[x].shape[:2], w.shape[1:3], stride)
            self._conv(i, x, y, w, s_w, self._bias(i, op), stride, padding,
                       self.graph_tensors[x].shape[2] // w.shape[3], o.FusedActivationFunction(), origin)
        elif kind == "DEPTHWISE_CONV_2D":
            o = self._options(op, "DepthwiseConv2DOptions")
            self._check_dilation(i, o)
            x = self._input(i, ins[0])
            w, s_w = self._weights(i, ins[1], 3)  # (1, KH, KW, Cin * multiplier)
            cin = self.graph_tensors[x].shape[2]
            if w.shape[0] != 1 or w.shape[3] % cin:
                self._refuse(i, f"filter {w.shape} does not fit the input's {cin} channels")
            y = self._activation(i, out)
            stride = (o.StrideH(), o.StrideW())
            padding = self._padding(o.Padding(), self.graph_tensors[x].shape[:2], w.shape[1:3], stride)
            # output channel c * multiplier + m reads input channel c: groups = Cin, one input channel per group
            self._conv(i, x, y, w.transpose(3, 1, 2, 0), s_w, self._bias(i, op), stride, padding, cin,
                       o.FusedActivationFunction(), origin)
        elif kind == "FULLY_CONNECTED":
            o = self._options(op, "FullyConnectedOptions")
            x = self._input(i, ins[0])
            w, s_w = self._weights(i, ins[1], 0)  # (Cout, F)
            if o.WeightsFormat() != 0 or w.ndim != 2 or int(np.prod(self.graph_tensors[x].shape)) != w.shape[1]:
                self._refuse(i, f"weights {w.shape} do not fit an input of {self.graph_tensors[x].shape} "
                                "(one sample, flattened)")
            if self.graph_tensors[x].shape != (1, 1, w.shape[1]):  # TFLite flattens (H, W, C) in the IR's order
                flat = f"{x}.flat"
                self.graph_tensors[flat] = Tensor(flat, (1, 1, w.shape[1]), "int8",
                                                  self.graph_tensors[x].scale.copy(), self.graph_tensors[x].zero_point)
                self._emit("reshape", [x], flat, {}, f"{origin} (flatten)")
                x = flat
            y = self._activation(i, out)
            if self.graph_tensors[y].shape != (1, 1, w.shape[0]):
                self._refuse(i, f"output shape {self.tensors[out].shape} is not one vector of {w.shape[0]}")
            self._conv(i, x, y, w[:, None, None, :], s_w, self._bias(i, op), (1, 1), (0, 0, 0, 0), 1,
                       o.FusedActivationFunction(), origin)
        elif kind in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            o = self._options(op, "Pool2DOptions")
            x = self._input(i, ins[0])
            self._same_quant(i, x, out)
            kernel, stride = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
            padding = self._padding(o.Padding(), self.graph_tensors[x].shape[:2], kernel, stride)
            y = self._activation(i, out)
            act_min, act_max, activation = self._act_bounds(i, o.FusedActivationFunction(), y)
            pooled = y if activation == "none" else f"{y}.pooled"
            if pooled != y:
                self.graph_tensors[pooled] = Tensor(pooled, self.graph_tensors[y].shape, "int8",
                                                    self.graph_tensors[y].scale.copy(), self.graph_tensors[y].zero_point)
            ir_kind = "maxpool2d" if kind == "MAX_POOL_2D" else "avgpool2d"
            self._emit(ir_kind, [x], pooled, dict(kernel=list(kernel), stride=list(stride), padding=padding), origin)
            if pooled != y:
                self._emit("clamp", [pooled], y, dict(act_min=act_min, act_max=act_max, activation=activation),
                           f"{origin} (fused {activation})")
        elif kind == "MEAN":
            self._mean(i, op, ins, out, origin)
        elif kind in _RESHAPES:
            x = self._input(i, ins[0])
            if int(np.prod(self.tensors[out].shape)) != int(np.prod(self.graph_tensors[x].shape)):
                self._refuse(i, f"reshapes {self.graph_tensors[x].shape} to {self.tensors[out].shape}: sizes differ")
            self._same_quant(i, x, out)
            if self._hwc(i, out) == self.graph_tensors[x].shape:
                self.name_of[out] = x  # the same (H, W, C) map: nothing to do
            else:
                self._emit("reshape", [x], self._activation(i, out), {}, origin)
        elif kind == "ADD":
            o = self._options(op, "AddOptions")
            a, b = self._input(i, ins[0]), self._input(i, ins[1])
            if self.graph_tensors[a].shape != self.graph_tensors[b].shape:
                self._refuse(i, f"inputs of shapes {self.graph_tensors[a].shape} and {self.graph_tensors[b].shape}:"
                                " broadcasting is not supported")
            y = self._activation(i, out)
            self._add_add(a, b, y, self._act_bounds(i, o.FusedActivationFunction(), y), origin)
        elif kind == "CONCATENATION":
            o = self._options(op, "ConcatenationOptions")
            xs = [self._input(i, k) for k in ins]
            rank = len(self.tensors[out].shape)
            # TFLite is channels-last: (1, F), (1, L, C), (1, H, W, C)
            axis = {2: {1: 2}, 3: {1: 1, 2: 2}, 4: {1: 0, 2: 1, 3: 2}}.get(rank, {}).get(o.Axis() % max(rank, 1))
            if axis is None or not 2 <= len(xs) <= CAT_MAX_INPUTS or o.FusedActivationFunction() != _ACT_NONE:
                self._refuse(i, f"concatenates {len(xs)} tensors along axis {o.Axis()} of rank {rank}; fedtiny takes "
                                f"2 to {CAT_MAX_INPUTS} along a non-batch axis, without a fused activation")
            self._add_cat(xs, self._activation(i, out), axis, origin)
        elif kind == "MUL":
            o = self._options(op, "MulOptions")
            a, b = self._input(i, ins[0]), self._input(i, ins[1])
            if len(self.tensors[ins[0]].shape) != len(self.tensors[ins[1]].shape) or not self._broadcasts(a, b):
                self._refuse(i, f"inputs of shapes {self.tensors[ins[0]].shape} and {self.tensors[ins[1]].shape}: "
                                "each axis must be equal, or 1 in one of them, at the same rank")
            y = self._activation(i, out)
            self._add_mul(a, b, y, self._act_bounds(i, o.FusedActivationFunction(), y), origin)
        else:
            where = ("; fedtiny drops a SOFTMAX only at the very end" if kind == "SOFTMAX" else "")
            self._refuse(i, f"not supported (fedtiny imports CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, "
                            f"MAX_POOL_2D, AVERAGE_POOL_2D, MEAN, RESHAPE, EXPAND_DIMS, SQUEEZE, ADD, MUL, "
                            f"CONCATENATION){where}")

    def _mean(self, i: int, op, ins: list[int], out: int, origin: str):
        """MEAN over the spatial axes as a depthwise conv whose window is the whole map, with TFLite's integers.

        TFLite's int8 MEAN (reference_ops::QuantizedMeanOrSum, the path of Keras' GlobalAveragePooling layers)
        sums S = sum(x - z_x) over the n positions and requantizes once with QuantizeMultiplier(s_x / s_y) with 1/n
        folded in: k = min(floor(log2 n), 32, 31 + shift), multiplier (M << k) // n, shift - k. As a conv: every
        weight is q (real weight 1/n, scale 1/(q n)), so acc = q * S, and the multiplier is that folded
        multiplier / q; with q a divisor of it (one in 64..127 is looked for) the product is the same integer
        and the output is TFLite's bit for bit; otherwise the nearest multiplier is taken (off by one step on
        rare ties). The weights are ordinary conv weights: a scheme that trains this layer may change them."""
        x = self._input(i, ins[0])
        rank = len(self.tensors[ins[0]].shape)
        axes = self.tensors[ins[1]].data
        if axes is None:
            self._refuse(i, "the axes must be a constant")
        axes = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
        spatial = {1} if rank == 3 else {1, 2} if rank == 4 else None
        if axes != spatial:
            self._refuse(i, f"averages over axes {sorted(axes)} of a rank-{rank} tensor; fedtiny averages over "
                            "the spatial axes only (global average pooling)")
        h, w, c = self.graph_tensors[x].shape
        y = self._activation(i, out)
        if self.graph_tensors[y].shape != (1, 1, c):
            self._refuse(i, f"output shape {self.tensors[out].shape} is not one value per channel")
        n = h * w
        (s_x, _), (s_y, _) = self._quant(x), self._quant(y)
        m, shift = quantize_multiplier(s_x / s_y)
        k = min(n.bit_length() - 1, 32, 31 + shift)
        folded, shift = (m << k) // n, shift - k
        q = min(range(127, 63, -1), key=lambda d: (abs(folded - d * round(folded / d)), -d))
        self._conv(i, x, y, np.full((c, h, w, 1), q, np.int8), np.full(c, 1.0 / (q * n)), None,
                   (1, 1), (0, 0, 0, 0), c, _ACT_NONE, origin)
        attrs = self.graph_ops[-1].attrs
        attrs["multiplier"], attrs["shift"] = [round(folded / q)] * c, [shift] * c
        self.notes.append(f"MEAN (op {i}) is imported as a depthwise {h}x{w} conv with equal weights (the mean, "
                          "requantized as TFLite does); a scheme that trains it may change its weights")


def import_tflite(data: bytes, name: str = "model", source: str = "<bytes>") -> tuple[Graph, list[str]]:
    """A full-integer TFLite flatbuffer -> (fedtiny Graph named `name`, notes for the user); errors name `source`."""
    importer = _TFLiteImporter(data, name, source)
    graph = importer.convert()
    return graph, importer.notes


# --- ONNX (QDQ and QOperator, as onnxruntime's quantize_static writes them) -------------------------------------------


# QOperator node -> (the float op it computes, where its inputs are: "x" the (value, scale, zero point) triples to
# dequantize, "w" the weight's triple (dequantized along "w_axis"), "b" the int32 bias, "y" the output's scale)
_QOPERATOR = {
    "QLinearConv": ("Conv", dict(x=[0, 3], w=3, w_axis=0, b=8, y=6)),
    "QGemm": ("Gemm", dict(x=[0, 3], w=3, b=6, y=7)),  # weight axis: 0 with transB, else 1
    "QLinearMatMul": ("Gemm", dict(x=[0, 3], w=3, w_axis=1, y=6)),
    "QLinearAdd": ("Add", dict(x=[0, 3], y=6)),
    "QLinearMul": ("Mul", dict(x=[0, 3], y=6)),
    "QLinearConcat": ("Concat", dict(y=0)),
    "QLinearSigmoid": ("Sigmoid", dict(x=[0], y=3)),
    "QLinearAveragePool": ("AveragePool", dict(x=[0], y=3)),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", dict(x=[0], y=3)),
}
_INT8_PASSING = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze")  # int8 in, int8 out on the same grid


class _OnnxImporter(_GraphBuilder):
    """A QDQ graph: every activation is a QuantizeLinear -> DequantizeLinear pair around float ops, weights and
    biases are DequantizeLinear of int8 / int32 initializers. Each float op between them becomes its integer op on
    the QuantizeLinear's int8 tensor. quantize_static removes a ReLU after a conv or add and lets the output's
    range start at 0 (zero point -128) instead: such an output is imported with a fused ReLU."""

    def __init__(self, data: bytes, name: str, source: str):
        super().__init__()
        try:
            import onnx
            from onnx import numpy_helper
        except ModuleNotFoundError as err:
            raise ModelImportError("reading .onnx files needs the `onnx` package: pip install onnx") from err
        try:
            self.model = onnx.load_model_from_string(data)
            self.nodes = list(self.model.graph.node)
            self.init = {t.name: numpy_helper.to_array(t) for t in self.model.graph.initializer}
        except Exception as err:  # protobuf's DecodeError and friends
            raise ModelImportError(f"{source}: not an ONNX model ({type(err).__name__}: {err})") from err
        self.attr = onnx.helper.get_attribute_value
        self.name, self.source = name, source
        # (index, op type) of the node in the file each node of self.nodes comes from: a QOperator node becomes
        # several QDQ ones, and messages, origins and tensor names (n<index>) speak of the file's node
        self.node_origin = [(i, node.op_type) for i, node in enumerate(self.nodes)]
        self._qdq_from_qoperator(onnx)
        self.act: dict[str, str] = {}  # float tensor (a DequantizeLinear's output) -> IR int8 tensor
        self.const: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # DequantizeLinear'd initializer -> (ints, scale)
        self.consumers: dict[str, list] = {}
        for node in self.nodes:
            for name_in in node.input:
                self.consumers.setdefault(name_in, []).append(node)
        self.flattened_from: dict[str, tuple[int, int, int]] = {}
        try:  # every tensor's shape, for reshapes
            inferred = onnx.shape_inference.infer_shapes(self.model).graph
        except Exception:  # noqa: BLE001  (a model onnx cannot infer: reshapes are refused below)
            inferred = self.model.graph
        self.dims = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
                     for v in [*inferred.value_info, *inferred.input, *inferred.output]}

    def _refuse(self, i: int, why: str):
        index, op_type = self.node_origin[i]
        raise UnsupportedOpError(f"{self.source}: ONNX node {index} ({op_type} "
                                 f"{self.nodes[i].name or self.nodes[i].output[0]}): {why}")

    def _qdq_from_qoperator(self, onnx):
        """Rewrite a QOperator graph (quantize_static's QuantFormat.QOperator: QLinearConv, QGemm, QLinearAdd, ...
        on int8 tensors, their quantization parameters as inputs) into the QDQ graph it computes: each QLinear node
        becomes DequantizeLinear of its inputs, the float op, QuantizeLinear onto its output's parameters, and an
        int8 MaxPool/Flatten/Reshape keeps its input's. The QDQ path then imports it with the same constants. A QDQ
        model passes unchanged."""
        helper = onnx.helper
        quantized: dict[str, tuple[str, str]] = {}  # int8 tensor -> (scale, zero point) initializer names
        for node in self.nodes:
            if node.op_type == "QuantizeLinear":
                quantized[node.output[0]] = (node.input[1], node.input[2] if len(node.input) > 2 else "")
        if not any(n.op_type in _QOPERATOR or n.op_type.startswith("QLinear") for n in self.nodes):
            return
        nodes, origin = [], []

        def dq(x: str, scale: str, zp: str, k: int, axis: int | None = None) -> str:
            """DequantizeLinear of x for input k of node i (a name of its own: x may feed several nodes)."""
            out = f"{x}_dequantized_{i}_{k}"
            nodes.append(helper.make_node("DequantizeLinear", [x, scale] + ([zp] if zp else []), [out],
                                          name=f"{x}_dequantize_{i}_{k}", **({} if axis is None else dict(axis=axis))))
            return out

        def bias(b: str, x_scale: str, w_scale: str, k: int) -> str:
            if not b:
                return ""
            if b not in self.init or x_scale not in self.init or w_scale not in self.init:
                return b  # not a constant: the Conv/Gemm below refuses it by name
            scale = f"{b}_scale"  # int32 biases are on s_x * s_w (only their integers are imported)
            self.init[scale] = (np.float32(self.init[x_scale]) * np.asarray(self.init[w_scale], np.float32)).reshape(-1)
            return dq(b, scale, "", k, axis=0 if self.init[scale].size > 1 else None)

        for i, node in enumerate(self.nodes):
            op, ins, name, attrs = node.op_type, list(node.input), node.name, self._attrs(node)
            spec = _QOPERATOR.get(op)
            if spec is None and op.startswith("QLinear"):
                self._refuse(i, f"QOperator node not supported (fedtiny imports {', '.join(sorted(_QOPERATOR))}, "
                                f"and MaxPool, Flatten, Reshape, Squeeze, Unsqueeze on int8 tensors)")
            start = len(nodes)
            if spec is not None:
                float_op, layout = spec
                if attrs.pop("channels_last", 0):
                    self._refuse(i, "channels_last is not supported")
                y_scale, y_zp = (ins[layout["y"]], ins[layout["y"] + 1]) if len(ins) > layout["y"] + 1 else ("", "")
                if not y_scale:
                    self._refuse(i, "its output is float (fedtiny imports int8 outputs)")
                if op == "QLinearConcat":  # (y scale, y zero point, then a triple per input)
                    float_ins = [dq(ins[j], ins[j + 1], ins[j + 2], j) for j in range(2, len(ins), 3)]
                else:
                    w_axis = 1 - int(attrs.get("transB", 0)) if op == "QGemm" else layout.get("w_axis")
                    float_ins = [dq(ins[j], ins[j + 1], ins[j + 2], j, axis=w_axis if j == layout.get("w") else None)
                                 for j in layout["x"]]
                    if "b" in layout:
                        float_ins.append(bias(ins[layout["b"]] if len(ins) > layout["b"] else "", ins[1],
                                              ins[layout["w"] + 1], layout["b"]))
                # MatMul(A, B) of a vector A with a constant B is Gemm(A, B) without transB (and without bias:
                # quantize_static's QLinearAdd of the bias after it is refused as an Add of a constant)
                y_float = f"{node.output[0]}_float"
                nodes.append(helper.make_node(float_op, float_ins, [y_float], name=name, **attrs))
                nodes.append(helper.make_node("QuantizeLinear", [y_float, y_scale, y_zp], [node.output[0]],
                                              name=f"{node.output[0]}_quantize"))
                quantized[node.output[0]] = (y_scale, y_zp)
            elif op in _INT8_PASSING and ins and ins[0] in quantized:
                scale, zp = quantized[ins[0]]
                y_float = f"{node.output[0]}_float"
                x_float = dq(ins[0], scale, zp, 0)
                nodes.append(helper.make_node(op, [x_float] + ins[1:], [y_float], name=name, **attrs))
                nodes.append(helper.make_node("QuantizeLinear", [y_float, scale] + ([zp] if zp else []),
                                              [node.output[0]], name=f"{node.output[0]}_quantize"))
                quantized[node.output[0]] = (scale, zp)
            else:
                nodes.append(node)
            origin += [(i, op)] * (len(nodes) - start)
        self.nodes, self.node_origin = nodes, origin
        graph = self.model.graph
        del graph.node[:]
        graph.node.extend(nodes)
        known = {t.name for t in graph.initializer}
        graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in self.init.items()
                                 if n not in known)

    def _attrs(self, node) -> dict:
        return {a.name: self.attr(a) for a in node.attribute}

    def _qparams(self, i: int, node) -> tuple[float, int]:
        scale, zp = self.init.get(node.input[1]), self.init.get(node.input[2]) if len(node.input) > 2 else 0
        if scale is None or np.size(scale) != 1 or (zp is not None and np.asarray(zp).dtype not in (np.int8, np.uint8)):
            self._refuse(i, "activations must be int8 or uint8 with one constant scale and zero point (QInt8 or "
                            "QUInt8, per tensor)")
        if zp is not None and np.asarray(zp).dtype == np.uint8:
            # uint8 u on scale s, zero point z is the int8 u - 128 on scale s, zero point z - 128: the same real
            # values, every kernel's result shifted alike (exact), so a QUInt8 model runs as an int8 one
            return float(np.float32(scale)), int(zp) - 128
        return float(np.float32(scale)), int(zp if zp is not None else 0)

    @staticmethod
    def _hwc(shape) -> tuple[int, int, int]:
        s = tuple(int(d) for d in shape[1:])
        return {1: lambda: (1, 1, s[0]), 2: lambda: (1, s[1], s[0]), 3: lambda: (s[1], s[2], s[0])}[len(s)]()

    def _output(self, i: int, node) -> tuple[str, int, int]:
        """The int8 tensor node's output becomes: (IR name, scale, zero point) of the one QuantizeLinear reading it."""
        readers = self.consumers.get(node.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            self._refuse(i, "its output must go to exactly one QuantizeLinear (a QDQ model, all int8)")
        q = readers[0]
        scale, zp = self._qparams(self.nodes.index(q), q)
        return q.output[0], scale, zp

    def _bounds(self, zp: int) -> tuple[int, int, str]:
        return (-128, 127, "relu") if zp == -128 else (-128, 127, "none")

    def _weight(self, i: int, name: str, channel_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.const:
            self._refuse(i, f"{name!r} must be a DequantizeLinear of a constant")
        ints, scale = self.const[name]
        if ints.dtype != np.int8:
            self._refuse(i, f"weights {name!r} are {ints.dtype}, not int8")
        return ints, scale

    def convert(self) -> Graph:
        graph = self.model.graph
        inits = set(self.init)
        inputs = [t for t in graph.input if t.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedOpError(f"{self.source}: fedtiny imports models with one input and one output")
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) not in (2, 3, 4) or min(dims[1:]) < 1:
            raise UnsupportedOpError(f"{self.source}: input {inputs[0].name!r} has shape {dims}; fedtiny takes "
                                     "(N, F), (N, C, L) or (N, C, H, W) with fixed sizes")
        input_name = None
        q_of: dict[str, str] = {}  # a QuantizeLinear's int8 output -> IR tensor
        for i, node in enumerate(self.nodes):
            op = node.op_type
            if op == "QuantizeLinear":
                if node.input[0] == inputs[0].name:
                    scale, zp = self._qparams(i, node)
                    input_name = q_of[node.output[0]] = self._declare("input", self._hwc(dims), scale, zp)
                elif node.output[0] not in q_of:
                    self._refuse(i, "quantizes a tensor no imported op computed")
            elif op == "DequantizeLinear":
                if node.input[0] in self.init:
                    scale = np.asarray(self.init[node.input[1]], np.float32).astype(np.float64).reshape(-1)
                    zp = self.init.get(node.input[2]) if len(node.input) > 2 else None
                    if zp is not None and np.any(np.asarray(zp) != 0):
                        self._refuse(i, "weights and biases must be symmetric (zero point 0)")
                    self.const[node.output[0]] = (self.init[node.input[0]], scale)
                elif node.input[0] in q_of:
                    self.act[node.output[0]] = q_of[node.input[0]]
                else:
                    self._refuse(i, "dequantizes a tensor that is neither a constant nor an imported int8 tensor")
            elif op == "Constant":
                continue  # an axes list (Unsqueeze's): its reader takes its shape from shape inference
            elif op == "Softmax" and node.input[0] in self.act and node.output[0] == graph.output[0].name:
                self.act[node.output[0]] = self.act[node.input[0]]
                self.notes.append(f"dropped the final Softmax (node {i}): fedtiny trains on the logits; the predicted "
                                  "class is the same")
            else:
                y_q, scale, zp = self._output(i, node)
                q_of[y_q] = self._convert_node(i, node, scale, zp)
        if graph.output[0].name not in self.act:
            raise UnsupportedOpError(f"{self.source}: the output {graph.output[0].name!r} is not the "
                                     "DequantizeLinear of an imported int8 tensor")
        if input_name is None:
            raise UnsupportedOpError(f"{self.source}: the input is not quantized by a QuantizeLinear (not a QDQ model)")
        input_shape = dims[1:]
        return self._finish(input_name, self.act[graph.output[0].name], input_shape, self.name, self.source, "onnx")

    def _in(self, i: int, name: str) -> str:
        if name not in self.act:
            self._refuse(i, f"input {name!r} is not a DequantizeLinear of an int8 activation")
        return self.act[name]

    def _convert_node(self, i: int, node, scale: float, zp: int) -> str:
        op, a = node.op_type, self._attrs(node)
        index, file_op = self.node_origin[i]
        origin = f"onnx node {index} {file_op}"
        y = f"n{index}"
        if op == "Conv":
            x = self._in(i, node.input[0])
            w, s_w = self._weight(i, node.input[1])
            if any(d != 1 for d in a.get("dilations", [1])) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                self._refuse(i, "dilation other than 1 and auto_pad are not supported")
            one_d = w.ndim == 3
            w = w[:, :, None, :] if one_d else w  # (Cout, Cin/g, KH, KW)
            pads = a.get("pads", [0] * (2 if one_d else 4))
            padding = [0, pads[0], 0, pads[1]] if one_d else [pads[0], pads[1], pads[2], pads[3]]
            strides = a.get("strides", [1] * (1 if one_d else 2))
            stride = (1, strides[0]) if one_d else tuple(strides)
            h, w_, c = self.graph_tensors[x].shape
            kh, kw = w.shape[2:]
            out = ((h + padding[0] + padding[2] - kh) // stride[0] + 1, (w_ + padding[1] + padding[3] - kw) // stride[1] + 1,
                   w.shape[0])
            self._declare(y, out, scale, zp)
            bias = self.const[node.input[2]][0] if len(node.input) > 2 and node.input[2] else None
            self._add_conv(x, y, w.transpose(0, 2, 3, 1), s_w, bias, stride, padding, int(a.get("group", 1)),
                           self._bounds(zp), origin)
        elif op == "Gemm":
            x = self._in(i, node.input[0])
            w, s_w = self._weight(i, node.input[1])
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
                self._refuse(i, "only alpha = beta = 1 without transA is supported")
            w = w if a.get("transB", 0) else w.T  # (N, K)
            if x in self.flattened_from:  # ONNX flattened (C, H, W); the device's bytes are in (H, W, C) order
                fh, fw, fc = self.flattened_from[x]
                w = w.reshape(-1, fc, fh, fw).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
            if self.graph_tensors[x].shape != (1, 1, w.shape[1]):
                self._refuse(i, f"input {self.graph_tensors[x].shape} is not a vector of {w.shape[1]}")
            self._declare(y, (1, 1, w.shape[0]), scale, zp)
            bias = self.const[node.input[2]][0] if len(node.input) > 2 and node.input[2] else None
            self._add_conv(x, y, w[:, None, None, :], s_w, bias, (1, 1), (0, 0, 0, 0), 1, self._bounds(zp), origin)
        elif op in ("MaxPool", "AveragePool"):
            x = self._in(i, node.input[0])
            if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1])) or \
                    (op == "AveragePool" and a.get("count_include_pad", 0) and any(a.get("pads", []))):
                self._refuse(i, "ceil_mode, dilation and count_include_pad with padding are not supported")
            k = a["kernel_shape"]
            one_d = len(k) == 1
            kernel = (1, k[0]) if one_d else tuple(k)
            strides = a.get("strides", [1] * len(k))
            stride = (1, strides[0]) if one_d else tuple(strides)
            pads = a.get("pads", [0] * 2 * len(k))
            padding = [0, pads[0], 0, pads[1]] if one_d else list(pads)
            h, w_, c = self.graph_tensors[x].shape
            self._declare(y, ((h + padding[0] + padding[2] - kernel[0]) // stride[0] + 1,
                              (w_ + padding[1] + padding[3] - kernel[1]) // stride[1] + 1, c), scale, zp)
            if (scale, zp) == self._quant(x):
                self._emit("maxpool2d" if op == "MaxPool" else "avgpool2d", [x], y,
                           dict(kernel=list(kernel), stride=list(stride), padding=padding), origin)
            elif op == "AveragePool" and not any(padding):
                # onto another grid (QOperator's QLinearAveragePool has its own output scale): the mean as a
                # depthwise conv with equal weights, one rounding onto the output's grid, as GlobalAveragePool below
                n = kernel[0] * kernel[1]
                self._add_conv(x, y, np.full((c, *kernel, 1), 127, np.int8), np.full(c, 1.0 / (127.0 * n)), None,
                               stride, (0, 0, 0, 0), c, (-128, 127, "none"), origin)
            else:
                self._refuse(i, "input and output quantization differ (fedtiny's pools keep the input's; an "
                                "average pool onto another grid is imported without padding only)")
        elif op == "GlobalAveragePool":
            x = self._in(i, node.input[0])
            h, w_, c = self.graph_tensors[x].shape
            self._declare(y, (1, 1, c), scale, zp)
            # the mean as a depthwise conv over the whole map (real weight 1/n): one rounding onto the output's grid
            self._add_conv(x, y, np.full((c, h, w_, 1), 127, np.int8), np.full(c, 1.0 / (127.0 * h * w_)), None,
                           (1, 1), (0, 0, 0, 0), c, (-128, 127, "none"), origin)
        elif op == "Add":
            a_in, b_in = self._in(i, node.input[0]), self._in(i, node.input[1])
            if self.graph_tensors[a_in].shape != self.graph_tensors[b_in].shape:
                self._refuse(i, "broadcasting is not supported")
            self._declare(y, self.graph_tensors[a_in].shape, scale, zp)
            self._add_add(a_in, b_in, y, self._bounds(zp), origin)
        elif op == "Concat":
            xs = [self._in(i, n) for n in node.input]
            rank = len(self.dims.get(node.output[0], ()))
            axis = hwc_axis(a.get("axis", 0), rank) if rank else None
            if axis is None or not 2 <= len(xs) <= CAT_MAX_INPUTS:
                self._refuse(i, f"concatenates {len(xs)} tensors along axis {a.get('axis')} of rank {rank}; fedtiny "
                                f"takes 2 to {CAT_MAX_INPUTS} along a non-batch axis")
            shape = list(self.graph_tensors[xs[0]].shape)
            shape[axis] = sum(self.graph_tensors[x].shape[axis] for x in xs)
            self._declare(y, shape, scale, zp)
            self._add_cat(xs, y, axis, origin)
        elif op == "Mul":
            a_in, b_in = self._in(i, node.input[0]), self._in(i, node.input[1])
            ranks = {len(self.dims.get(n, ())) for n in node.input}
            if len(ranks) != 1 or not self._broadcasts(a_in, b_in):
                self._refuse(i, "each axis of the two inputs must be equal, or 1 in one of them, at the same rank")
            self._declare(y, tuple(max(p, q) for p, q in zip(self.graph_tensors[a_in].shape,
                                                              self.graph_tensors[b_in].shape)), scale, zp)
            self._add_mul(a_in, b_in, y, self._bounds(zp), origin)
        elif op in ("Sigmoid", "Tanh"):  # a lut: the function's table from the two grids, as the quantizer makes it
            x = self._in(i, node.input[0])
            self._declare(y, self.graph_tensors[x].shape, scale, zp)
            function = op.lower()
            self._emit("lut", [x], y, dict(lut_tables(*elementwise(function), *self._quant(x), scale, zp),
                                           function=function), origin)
        elif op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            x = self._in(i, node.input[0])
            if (scale, zp) != self._quant(x):
                self._refuse(i, "input and output quantization differ")
            src, dims = self.graph_tensors[x].shape, self.dims.get(node.output[0])
            if not dims or dims[0] != 1 or not 2 <= len(dims) <= 4 or int(np.prod(dims)) != int(np.prod(src)):
                self._refuse(i, f"output shape {dims} is not one sample of the input's {int(np.prod(src))} values")
            out = self._hwc(dims)
            if len(dims) == 2 and src[:2] != (1, 1):  # a flatten of ONNX's (C, H, W): the next Gemm reorders
                self.flattened_from[y] = src
            elif len(dims) > 2 and out != src and not (src[2] == out[2] and src[0] * src[1] == out[0] * out[1]):
                self._refuse(i, f"reshapes a {src} (H, W, C) map to {out}: only flattening to (N, features) or "
                                "adding/removing unit axes is supported")
            if out == src:
                return x
            self._declare(y, out, scale, zp)
            self._emit("reshape", [x], y, {}, origin)
        else:
            self._refuse(i, "not supported (fedtiny imports Conv, Gemm, MaxPool, AveragePool, GlobalAveragePool, "
                            "Add, Mul, Concat, Sigmoid, Tanh, Flatten, Reshape, Squeeze, Unsqueeze between "
                            "QuantizeLinear/DequantizeLinear pairs)")
        return y


def import_onnx(data: bytes, name: str = "model", source: str = "<bytes>") -> tuple[Graph, list[str]]:
    """An int8 QDQ or QOperator ONNX model (onnxruntime's quantize_static) -> (fedtiny Graph named `name`, notes)."""
    importer = _OnnxImporter(data, name, source)
    graph = importer.convert()
    return graph, importer.notes
