"""Reference interpreter: runs an int8 graph with the integer kernels, on a batch of samples at once.

Inputs and outputs are int8 tensors (N, H, W, C) with the graph's scales; `quantize_input` and `dequantize`
convert from and to the float model's world.
"""

import numpy as np

from . import kernels
from .ir import Graph, Op, to_hwc


def _conv2d(graph: Graph, op: Op, x, weight, bias):
    a = op.attrs
    return kernels.conv2d(
        x, weight, bias,
        x_zero_point=graph.tensors[op.inputs[0]].zero_point, y_zero_point=graph.tensors[op.outputs[0]].zero_point,
        stride=a["stride"], padding=a["padding"], groups=a["groups"], multiplier=a["multiplier"], shift=a["shift"],
        act_min=a["act_min"], act_max=a["act_max"])


def _add(graph: Graph, op: Op, a, b):
    t = graph.tensors
    return kernels.add(a, b, a_zero_point=t[op.inputs[0]].zero_point, b_zero_point=t[op.inputs[1]].zero_point,
                       y_zero_point=t[op.outputs[0]].zero_point,
                       **{k: v for k, v in op.attrs.items() if k != "activation"})


def _mul(graph: Graph, op: Op, a, b):
    t, at = graph.tensors, op.attrs
    return kernels.mul(a, b, a_zero_point=t[op.inputs[0]].zero_point, b_zero_point=t[op.inputs[1]].zero_point,
                       y_zero_point=t[op.outputs[0]].zero_point, multiplier=at["multiplier"], shift=at["shift"],
                       act_min=at["act_min"], act_max=at["act_max"])


def _reshape(graph: Graph, op: Op, x):
    return x.reshape((x.shape[0],) + tuple(graph.tensors[op.outputs[0]].shape))


FORWARD = {
    "conv2d": _conv2d,
    "add": _add,
    "avgpool2d": lambda graph, op, x: kernels.avgpool2d(x, zero_point=graph.tensors[op.inputs[0]].zero_point,
                                                        **op.attrs),
    "maxpool2d": lambda graph, op, x: kernels.maxpool2d(x, **op.attrs),
    "reshape": _reshape,
    "clamp": lambda graph, op, x: kernels.clamp(x, act_min=op.attrs["act_min"], act_max=op.attrs["act_max"]),
    "lut": lambda graph, op, x: kernels.lut(x, op.attrs["table"]),
    "cat": lambda graph, op, *xs: kernels.cat(xs, axis=op.attrs["axis"], tables=op.attrs["tables"]),
    "mul": _mul,
}


def run(graph: Graph, x: np.ndarray, keep: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """Run the graph on int8 input x of shape (N, *input_shape). Returns the int8 output, or every tensor if keep."""
    (input_name,) = graph.inputs
    expected = tuple(graph.tensors[input_name].shape)
    if x.dtype != np.int8 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"input must be int8 of shape (N, {', '.join(map(str, expected))}), got {x.dtype} {x.shape}")
    values = {input_name: x}
    for op in graph.ops:
        args = [graph.tensors[n].data if graph.tensors[n].is_constant else values[n] for n in op.inputs]
        values[op.outputs[0]] = FORWARD[op.kind](graph, op, *args)
    return values if keep else values[graph.outputs[0]]


def standardize_input(graph: Graph, x_raw: np.ndarray) -> np.ndarray:
    """A user's raw samples as the model's float input: the per-feature standardization the host applied to its
    data before pretraining (model meta "input_standardization": mean and std per feature, for (N, F) data), or
    the samples unchanged for a model without one. For data from outside a run (`fedtiny evaluate`, the
    coordinator's --heldout); a simulation's own splits are standardized already."""
    x = np.asarray(x_raw, dtype=np.float32)
    stats = graph.meta.get("input_standardization")
    if stats is None:
        return x
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    if x.shape[1:] != mean.shape:
        raise ValueError(f"samples of shape {x.shape[1:]} do not fit the model's {mean.shape[0]} features")
    return ((x - mean) / std).astype(np.float32)


def quantize_input(graph: Graph, x_float: np.ndarray) -> np.ndarray:
    """Float samples in the PyTorch model's layout (N, C, L) / (N, C, H, W) / (N, F) -> int8 (N, H, W, C)."""
    t = graph.tensors[graph.inputs[0]]
    x = to_hwc(np.asarray(x_float, dtype=np.float32))
    if tuple(x.shape[1:]) != tuple(t.shape):
        raise ValueError(f"input of shape {x_float.shape} does not fit the model's input {t.shape} (H, W, C)")
    # Round half to even, as ONNX QuantizeLinear and numpy do; the device receives already-quantized samples.
    q = np.round(x.astype(np.float64) / float(t.scale[0])) + t.zero_point
    return np.clip(q, -128, 127).astype(np.int8)


def quantize_target(graph: Graph, t_float: np.ndarray) -> np.ndarray:
    """Float regression targets in the PyTorch model's output layout (N, F) / (N, C, L) / (N, C, H, W) -> int8
    (N, K) in the output's quantization, K = the output's values in (H, W, C) order: the MSE loss's targets.
    Rounds half to even as quantize_input; targets beyond the output's int8 range saturate."""
    t = graph.tensors[graph.outputs[0]]
    values = to_hwc(np.asarray(t_float, dtype=np.float64))
    if tuple(values.shape[1:]) != tuple(t.shape):
        raise ValueError(f"targets of shape {np.shape(t_float)} do not fit the model's output {t.shape} (H, W, C)")
    q = np.round(values / float(t.scale[0])) + t.zero_point
    return np.clip(q, -128, 127).astype(np.int8).reshape(len(values), -1)


def dequantize(graph: Graph, name: str, q: np.ndarray) -> np.ndarray:
    t = graph.tensors[name]
    return (q.astype(np.float64) - t.zero_point) * t.scale


def predict(graph: Graph, x_float: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class predictions for float samples (argmax of the int8 logits)."""
    out = [run(graph, quantize_input(graph, x_float[i:i + batch])) for i in range(0, len(x_float), batch)]
    return np.concatenate(out).reshape(len(x_float), -1).argmax(axis=1)
