"""Export an int8 Graph as an ONNX QDQ model, so that onnxruntime (an implementation nobody here wrote) can
check the interpreter. Needs the `dev` extra (onnx, onnxruntime).

Every int8 tensor appears as int8 in ONNX and is dequantized before the float op and quantized after it,
with our scales and zero points; onnxruntime picks its own integer kernels (QLinearConv, ...) or runs in float.
ONNX works in NCHW: our (H, W, C) map is (N, C, H, W) there, a vector (1, 1, F) is (N, F, 1, 1).
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ir import Graph, Op


def to_onnx(graph: Graph) -> onnx.ModelProto:
    nodes, inits = [], {}

    def const(name, arr):
        inits.setdefault(name, numpy_helper.from_array(np.asarray(arr), name))
        return name

    def qparams(tname):
        t = graph.tensors[tname]
        return (const(f"{tname}.s", np.float32(t.scale[0])), const(f"{tname}.z", np.int8(t.zero_point)))

    dequantized = set()

    def dq(tname):
        if tname not in dequantized:  # a tensor read by two ops (a residual) is dequantized once
            s, z = qparams(tname)
            nodes.append(helper.make_node("DequantizeLinear", [tname, s, z], [f"{tname}.f"]))
            dequantized.add(tname)
        return f"{tname}.f"

    def q(float_name, tname):
        s, z = qparams(tname)
        nodes.append(helper.make_node("QuantizeLinear", [float_name, s, z], [tname]))

    def activation(float_name, op):
        """Our fused clamp [act_min, act_max] as a float Clip before quantizing (exact for ReLU/ReLU6 bounds)."""
        t = graph.tensors[op.outputs[0]]
        lo, hi = ((np.array([op.attrs[k]]) - t.zero_point) * t.scale[0] for k in ("act_min", "act_max"))
        out = f"{float_name}.act"
        nodes.append(helper.make_node("Clip", [float_name, const(f"{out}.lo", lo.astype(np.float32).reshape(())),
                                               const(f"{out}.hi", hi.astype(np.float32).reshape(()))], [out]))
        return out

    for op in graph.ops:
        y = op.outputs[0]
        if op.kind == "conv2d":
            w, b = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
            wq = const(f"{w.name}.q", w.data.transpose(0, 3, 1, 2))  # OHWI -> OIHW
            ws = const(f"{w.name}.s", w.scale.astype(np.float32))
            wz = const(f"{w.name}.z", np.zeros(len(w.scale), np.int8))
            nodes.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [f"{w.name}.f"], axis=0))
            # An int32 bias dequantized at s_x * s_w lets onnxruntime fuse DQ-Conv-Q into its integer QLinearConv.
            bq = const(f"{b.name}.q", b.data.astype(np.int32))
            bs = const(f"{b.name}.s", (b.scale).astype(np.float32))
            bz = const(f"{b.name}.z", np.zeros(len(b.scale), np.int32))
            bias = f"{b.name}.f"
            nodes.append(helper.make_node("DequantizeLinear", [bq, bs, bz], [bias], axis=0))
            pt, pl, pb, pr = op.attrs["padding"]
            nodes.append(helper.make_node("Conv", [dq(op.inputs[0]), f"{w.name}.f", bias], [f"{y}.conv"],
                                          kernel_shape=list(w.shape[1:3]), strides=op.attrs["stride"],
                                          pads=[pt, pl, pb, pr], group=op.attrs["groups"]))
            q(activation(f"{y}.conv", op), y)
        elif op.kind == "add":
            nodes.append(helper.make_node("Add", [dq(op.inputs[0]), dq(op.inputs[1])], [f"{y}.sum"]))
            q(activation(f"{y}.sum", op), y)
        elif op.kind in ("avgpool2d", "maxpool2d"):
            pt, pl, pb, pr = op.attrs["padding"]
            kind = "AveragePool" if op.kind == "avgpool2d" else "MaxPool"
            extra = dict(count_include_pad=0) if kind == "AveragePool" else {}
            nodes.append(helper.make_node(kind, [dq(op.inputs[0])], [f"{y}.pool"], kernel_shape=op.attrs["kernel"],
                                          strides=op.attrs["stride"], pads=[pt, pl, pb, pr], **extra))
            q(f"{y}.pool", y)
        elif op.kind == "reshape":  # the same bytes in HWC order, as the device keeps them
            nodes.append(helper.make_node("Transpose", [op.inputs[0]], [f"{y}.nhwc"], perm=[0, 2, 3, 1]))
            shape = const(f"{y}.shape", np.array([-1, *graph.tensors[y].shape], np.int64))
            nodes.append(helper.make_node("Reshape", [f"{y}.nhwc", shape], [f"{y}.hwc"]))
            nodes.append(helper.make_node("Transpose", [f"{y}.hwc"], [y], perm=[0, 3, 1, 2]))
        elif op.kind == "clamp":
            q(activation(dq(op.inputs[0]), op), y)
        elif op.kind == "lut":  # the float function itself: onnxruntime computes it independently of our table
            name, _, params = op.attrs["function"].partition("(")
            args = [float(v) for v in params.rstrip(")").split(",") if v.strip()]
            x = dq(op.inputs[0])
            if name in ("gelu", "gelu_tanh"):  # opset 19 has no Gelu: its formula, with Erf or Tanh
                nodes.extend(_gelu_nodes(x, f"{y}.f", name == "gelu_tanh", const))
            elif name == "affine":
                scaled = f"{y}.scaled"
                nodes.append(helper.make_node("Mul", [x, const(f"{y}.a", np.float32(args[0]))], [scaled]))
                nodes.append(helper.make_node("Add", [scaled, const(f"{y}.b", np.float32(args[1]))], [f"{y}.f"]))
            else:
                onnx_op, attrs = {"sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}),
                                  "hardsigmoid": ("HardSigmoid", dict(alpha=1 / 6, beta=0.5)),
                                  "hardswish": ("HardSwish", {}),
                                  "leaky_relu": ("LeakyRelu", dict(alpha=args[0] if args else 0.01))}[name]
                nodes.append(helper.make_node(onnx_op, [x], [f"{y}.f"], **attrs))
            q(f"{y}.f", y)
        elif op.kind == "cat":  # each input dequantized with its own scale, quantized once with the output's
            nodes.append(helper.make_node("Concat", [dq(n) for n in op.inputs], [f"{y}.cat"],
                                          axis=(2, 3, 1)[op.attrs["axis"]]))
            q(f"{y}.cat", y)
        elif op.kind == "mul":
            nodes.append(helper.make_node("Mul", [dq(op.inputs[0]), dq(op.inputs[1])], [f"{y}.product"]))
            q(activation(f"{y}.product", op), y)
        else:
            raise ValueError(f"no ONNX export for op {op.kind}")

    def io(name):
        h, w, c = graph.tensors[name].shape
        return helper.make_tensor_value_info(name, TensorProto.INT8, ["N", c, h, w])

    model = helper.make_model(helper.make_graph(nodes, graph.meta.get("name", "model"), [io(n) for n in graph.inputs],
                                                [io(graph.outputs[0])], list(inits.values())),
                              opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    return model


def _gelu_nodes(x: str, out: str, tanh: bool, const) -> list:
    """x * 0.5 (1 + erf(x / sqrt 2)), or with tanh(sqrt(2 / pi) (x + 0.044715 x^3)) for approximate='tanh'."""
    f32 = lambda v: np.float32(v)
    if tanh:
        inner = [helper.make_node("Mul", [x, x], [f"{out}.x2"]),
                 helper.make_node("Mul", [f"{out}.x2", x], [f"{out}.x3"]),
                 helper.make_node("Mul", [f"{out}.x3", const(f"{out}.c", f32(0.044715))], [f"{out}.cx3"]),
                 helper.make_node("Add", [x, f"{out}.cx3"], [f"{out}.poly"]),
                 helper.make_node("Mul", [f"{out}.poly", const(f"{out}.k", f32(np.sqrt(2 / np.pi)))], [f"{out}.arg"]),
                 helper.make_node("Tanh", [f"{out}.arg"], [f"{out}.t"])]
    else:
        inner = [helper.make_node("Mul", [x, const(f"{out}.k", f32(1 / np.sqrt(2)))], [f"{out}.arg"]),
                 helper.make_node("Erf", [f"{out}.arg"], [f"{out}.t"])]
    return inner + [helper.make_node("Add", [f"{out}.t", const(f"{out}.one", f32(1.0))], [f"{out}.1t"]),
                    helper.make_node("Mul", [x, f"{out}.1t"], [f"{out}.x1t"]),
                    helper.make_node("Mul", [f"{out}.x1t", const(f"{out}.half", f32(0.5))], [out])]


def single_op_graph(graph: Graph, op: Op) -> Graph:
    """The graph of one op, its activations as inputs: checks a kernel on exactly the inputs ours saw."""
    names = op.inputs + op.outputs
    return Graph({n: graph.tensors[n] for n in names}, [op],
                 [n for n in op.inputs if not graph.tensors[n].is_constant], list(op.outputs), dict(graph.meta))


def session_options():
    """onnxruntime's options for the check: one thread, and int8 QDQ groups fused into its integer kernels.

    Without "session.qdqisint8allowed" onnxruntime on x86 (QDQIsInt8Allowed() is false there) leaves a
    DequantizeLinear -> Conv -> QuantizeLinear group with int8 activations unfused and convolves in float32, in
    kernels chosen per CPU (FMA3 or AVX-512F, NCHWc blocks of 8 or 16 channels): their summation order, and so
    an output next to a rounding boundary, depends on the CPU. With it the group becomes QLinearConv<int8_t>,
    whose int32 products are exact on every x86 CPU: MLAS has no symmetric int8-activation conv on x86
    (ConvSymS8S8Dispatch is ARM-only), so it runs the S8S8 GEMM (the portable kernel, or VPDPBSSD where AVX-VNNI-
    INT8 exists), never the uint8 x int8 VPMADDUBSW kernels that add pairs in saturating int16 on CPUs without
    VNNI; and it requantizes in float32 (acc * scale, round to nearest even), the same instructions on every CPU.
    ("session.x64quantprecision", the documented cure for that saturation, turns weights into uint8, which an
    int8-activation QLinearConv does not take.)"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.qdqisint8allowed", "1")
    return options


def run_onnxruntime(graph: Graph, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run the exported graph with onnxruntime on int8 (N, H, W, C) inputs; returns int8 (N, H, W, C)."""
    import onnxruntime as ort

    session = ort.InferenceSession(to_onnx(graph).SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    feeds = {name: np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for name, x in inputs.items()}
    return session.run(None, feeds)[0].transpose(0, 2, 3, 1)
