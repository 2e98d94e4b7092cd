"""What a model costs on a device: flash for constants, SRAM for inference activations, and a printable graph."""

import numpy as np

from .arena import ArenaPlan, Buffer, plan_arena
from .ir import Graph


def flash_bytes(graph: Graph) -> int:
    """Constant tensors plus per-channel requantization parameters (int32 multiplier and shift) and each lut's
    tables (256 int8 values, 256 int16 derivatives)."""
    params = sum(8 * len(op.attrs["multiplier"]) for op in graph.ops if op.kind == "conv2d")
    tables = sum(256 * (1 + 2) for op in graph.ops if op.kind == "lut")
    return sum(t.nbytes for t in graph.constants) + params + tables


def storage_of(graph: Graph) -> dict[str, str]:
    """Activation name -> the buffer holding its bytes: a reshape's output is its input's bytes, renamed."""
    root = {name: name for name in graph.inputs}
    for op in graph.ops:
        out = op.outputs[0]
        root[out] = root[op.inputs[0]] if op.kind == "reshape" else out
    return root


def inference_arena(graph: Graph) -> ArenaPlan:
    """Plan the activations of one inference (batch 1) into an arena; its size is the SRAM peak."""
    root = storage_of(graph)
    first: dict[str, int] = {root[n]: -1 for n in graph.inputs}
    last: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for name in op.inputs:
            if name in root:
                last[root[name]] = i
        first.setdefault(root[op.outputs[0]], i)
    for name in graph.outputs:
        last[root[name]] = len(graph.ops)
    buffers = [Buffer(b, graph.tensors[b].nbytes, first[b], last.get(b, first[b])) for b in first]
    return plan_arena(buffers)


def _fmt_scale(scale: np.ndarray) -> str:
    if len(scale) == 1:
        return f"{scale[0]:.3g}"
    return f"{scale.min():.3g}..{scale.max():.3g} ({len(scale)} ch)"


def describe(graph: Graph) -> str:
    lines = [f"model {graph.meta.get('name', '?')}: input {graph.inputs[0]} {graph.tensors[graph.inputs[0]].shape}"
             f" (H, W, C), output {graph.outputs[0]}"]
    header = f"{'#':>3} {'op':<10} {'output':<22} {'shape':<14} {'s_y':>9} {'z_y':>5} {'weight':<16} {'s_w':<24} {'from'}"
    lines += [header, "-" * len(header)]
    for i, op in enumerate(graph.ops):
        y = graph.tensors[op.outputs[0]]
        w = graph.tensors[op.inputs[1]] if op.kind == "conv2d" else None
        extra = (f"groups={op.attrs['groups']} stride={op.attrs['stride']}" if op.kind == "conv2d" else
                 op.attrs["function"] if op.kind == "lut" else "")
        lines.append(f"{i:>3} {op.kind:<10} {y.name[:22]:<22} {str(tuple(y.shape)):<14} {y.scale[0]:>9.3g} "
                     f"{y.zero_point:>5} {str(w.shape) if w else '':<16} {_fmt_scale(w.scale) if w else '':<24} "
                     f"{op.origin} {extra}")
    arena = inference_arena(graph)
    n_params = sum(int(np.prod(t.shape)) for t in graph.constants)
    lines += ["", f"parameters: {n_params}", f"flash (int8 weights, int32 biases, requant params, tables): {flash_bytes(graph)} bytes",
              f"SRAM peak for inference activations (batch 1, planned arena): {arena.size} bytes"]
    return "\n".join(lines)
