"""C code generation: an int8 `Graph` -> model.c / model.h for the portable C runtime in device_runtime/c/.

The generated model is data, not code: const weights, biases and requantization parameters (flash), one
params struct per op, a const op table (kind + params + arena offsets) and one static arena whose offsets
come from `fedtiny.inspect.inference_arena`, so the SRAM the device uses is the planner's number. A reshape
emits nothing: its output is its input's bytes (`storage_of`). The generator picks the concrete kernel per op
(`KERNEL_CHOICE`); each kernel kind states its scratch bytes (`SCRATCH_BYTES`, the Python mirror of the C
`_scratch_bytes()` companions, which `fedtiny_graph_check` re-checks on the device).
"""

import shutil
from pathlib import Path

import click
import numpy as np

from .inspect import inference_arena, storage_of
from .ir import Graph, Op

RUNTIME_FILES = ("fedtiny_arith.h", "fedtiny_kernels.h", "fedtiny_kernels.c", "fedtiny_runtime.h",
                 "fedtiny_runtime.c", "firmware_main.c", "fedtiny_m4.ld", "Makefile")
GENERATED_FILES = ("model.h", "model.c", "samples.c")


def runtime_dir() -> Path:
    """device_runtime/c/, the C runtime sources (package data of fedtiny_device)."""
    import fedtiny_device

    return Path(fedtiny_device.__file__).resolve().parent / "c"


# ---- kernel choice and scratch sizes ------------------------------------------------------------------------

def _conv_kernel(graph: Graph, op: Op, fast: bool) -> str:
    cout, kh, kw, _ = graph.tensors[op.inputs[1]].shape
    cin = graph.tensors[op.inputs[0]].shape[2]
    groups = op.attrs["groups"]
    if fast and (kh, kw) == (1, 1) and groups == 1 and not any(op.attrs["padding"]):
        return "FEDTINY_OP_CONV2D_1X1"
    if fast and groups == cin == cout:
        return "FEDTINY_OP_CONV2D_DEPTHWISE"
    return "FEDTINY_OP_CONV2D"


# IR op kind -> the C op kind that runs it (None: no op, the output aliases the input)
KERNEL_CHOICE = {
    "conv2d": _conv_kernel,
    "add": lambda graph, op, fast: "FEDTINY_OP_ADD",
    "avgpool2d": lambda graph, op, fast: "FEDTINY_OP_AVGPOOL2D",
    "maxpool2d": lambda graph, op, fast: "FEDTINY_OP_MAXPOOL2D",
    "clamp": lambda graph, op, fast: "FEDTINY_OP_CLAMP",
    "reshape": lambda graph, op, fast: None,
}

# C op kind -> scratch bytes, mirroring each kernel's _scratch_bytes() in fedtiny_kernels.c
SCRATCH_BYTES = {
    "FEDTINY_OP_CONV2D_1X1": lambda graph, op: 2 * 2 * graph.tensors[op.inputs[0]].shape[2],
}


def kernel_of(graph: Graph, op: Op, fast: bool = True) -> str | None:
    return KERNEL_CHOICE[op.kind](graph, op, fast)


def scratch_bytes(graph: Graph, fast: bool = True) -> int:
    kinds = [(op, kernel_of(graph, op, fast)) for op in graph.ops]
    return max([SCRATCH_BYTES[k](graph, op) for op, k in kinds if k in SCRATCH_BYTES], default=0)


def count_macs(graph: Graph) -> int:
    """Multiply-accumulates of one inference: every conv2d's output elements times its window size."""
    macs = 0
    for op in graph.ops:
        if op.kind == "conv2d":
            oh, ow, cout = graph.tensors[op.outputs[0]].shape
            _, kh, kw, cin_g = graph.tensors[op.inputs[1]].shape
            macs += oh * ow * cout * kh * kw * cin_g
    return macs


# ---- rendering ----------------------------------------------------------------------------------------------

def _c_int(v: int) -> str:
    v = int(v)
    return "(-2147483647 - 1)" if v == -(2**31) else str(v)


def _c_array(ctype: str, name: str, values, per_line: int = 24) -> str:
    vals = [_c_int(v) for v in np.asarray(values).reshape(-1).tolist()]
    rows = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    body = ",\n    ".join(rows)
    return f"static const {ctype} {name}[{len(vals)}] = {{\n    {body}\n}};\n"


def _struct(ctype: str, name: str, fields: dict) -> str:
    body = "".join(f"    .{k} = {v},\n" for k, v in fields.items())
    return f"static const {ctype} {name} = {{\n{body}}};\n"


def _render_conv2d(graph: Graph, op: Op, name: str) -> str:
    t, a = graph.tensors, op.attrs
    x, w, b, y = t[op.inputs[0]], t[op.inputs[1]], t[op.inputs[2]], t[op.outputs[0]]
    cout, kh, kw, _ = w.shape
    decls = (_c_array("int8_t", f"{name}_weight", w.data) + _c_array("int32_t", f"{name}_bias", b.data)
             + _c_array("int32_t", f"{name}_multiplier", a["multiplier"])
             + _c_array("int32_t", f"{name}_shift", a["shift"]))
    fields = dict(in_h=x.shape[0], in_w=x.shape[1], in_c=x.shape[2], out_h=y.shape[0], out_w=y.shape[1],
                  out_c=cout, kernel_h=kh, kernel_w=kw, stride_h=a["stride"][0], stride_w=a["stride"][1],
                  pad_top=a["padding"][0], pad_left=a["padding"][1], groups=a["groups"],
                  in_zero_point=x.zero_point, out_zero_point=y.zero_point, act_min=a["act_min"],
                  act_max=a["act_max"], weight=f"{name}_weight", bias=f"{name}_bias",
                  multiplier=f"{name}_multiplier", shift=f"{name}_shift")
    return decls + _struct("fedtiny_conv2d_params", f"{name}_params", fields)


def _render_add(graph: Graph, op: Op, name: str) -> str:
    t, a = graph.tensors, op.attrs
    fields = dict(size=int(np.prod(t[op.outputs[0]].shape)), a_zero_point=t[op.inputs[0]].zero_point,
                  b_zero_point=t[op.inputs[1]].zero_point, out_zero_point=t[op.outputs[0]].zero_point)
    fields.update({k: _c_int(a[k]) for k in ("left_shift", "a_multiplier", "a_shift", "b_multiplier", "b_shift",
                                             "out_multiplier", "out_shift", "act_min", "act_max")})
    return _struct("fedtiny_add_params", f"{name}_params", fields)


def _render_pool2d(graph: Graph, op: Op, name: str) -> str:
    x, y, a = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]], op.attrs
    fields = dict(in_h=x.shape[0], in_w=x.shape[1], channels=x.shape[2], out_h=y.shape[0], out_w=y.shape[1],
                  kernel_h=a["kernel"][0], kernel_w=a["kernel"][1], stride_h=a["stride"][0],
                  stride_w=a["stride"][1], pad_top=a["padding"][0], pad_left=a["padding"][1],
                  zero_point=x.zero_point)
    return _struct("fedtiny_pool2d_params", f"{name}_params", fields)


def _render_clamp(graph: Graph, op: Op, name: str) -> str:
    fields = dict(size=int(np.prod(graph.tensors[op.outputs[0]].shape)), act_min=op.attrs["act_min"],
                  act_max=op.attrs["act_max"])
    return _struct("fedtiny_clamp_params", f"{name}_params", fields)


# IR op kind -> renderer of its const data and params struct
RENDER = {"conv2d": _render_conv2d, "add": _render_add, "avgpool2d": _render_pool2d,
          "maxpool2d": _render_pool2d, "clamp": _render_clamp}


def _banner(graph: Graph) -> str:
    return f"/* Generated by fedtiny.codegen from model '{graph.meta.get('name', 'model')}'. Do not edit. */\n"


def render_model(graph: Graph, fast: bool = True) -> tuple[str, str]:
    """(model.h, model.c) source text."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError("codegen needs a graph with exactly one input and one output")
    plan = inference_arena(graph)
    root = storage_of(graph)
    offset = {name: plan.offsets[root[name]] for name in root}
    x, y = graph.tensors[graph.inputs[0]], graph.tensors[graph.outputs[0]]
    scratch = scratch_bytes(graph, fast)
    decls, rows = [], []
    for i, op in enumerate(graph.ops):
        kind = kernel_of(graph, op, fast)
        if kind is None:
            continue
        name = f"op{i}"
        shapes = " + ".join(str(tuple(graph.tensors[n].shape)) for n in op.inputs if not graph.tensors[n].is_constant)
        decls.append(f"/* op {i}: {op.kind} {op.origin}: {shapes} -> {tuple(graph.tensors[op.outputs[0]].shape)}, "
                     f"{kind} */\n" + RENDER[op.kind](graph, op, name))
        ins = [n for n in op.inputs if not graph.tensors[n].is_constant]
        offs = ", ".join(str(offset[n]) for n in ins + op.outputs)
        rows.append(f"    {{{kind}, {len(ins)}, {len(op.outputs)}, {{{offs}}}, &{name}_params}},")
    guard = "FEDTINY_MODEL_H"
    header = (
        _banner(graph) + f"#ifndef {guard}\n#define {guard}\n\n#include <stdint.h>\n\n#include \"fedtiny_runtime.h\"\n\n"
        f"#define FEDTINY_MODEL_INPUT_H {x.shape[0]}\n#define FEDTINY_MODEL_INPUT_W {x.shape[1]}\n"
        f"#define FEDTINY_MODEL_INPUT_C {x.shape[2]}\n#define FEDTINY_MODEL_INPUT_BYTES {x.nbytes}\n"
        f"#define FEDTINY_MODEL_OUTPUT_BYTES {y.nbytes}\n#define FEDTINY_MODEL_ARENA_BYTES {plan.size}\n"
        f"#define FEDTINY_MODEL_SCRATCH_BYTES {scratch}\n#define FEDTINY_MODEL_N_OPS {len(rows)}\n"
        f"#define FEDTINY_MODEL_MACS {count_macs(graph)}UL\n\n"
        "extern const fedtiny_graph fedtiny_model_graph;\n\n"
        "/* One sample: input (H, W, C) int8 -> output int8. */\n"
        "fedtiny_status fedtiny_model_run(const int8_t *input, int8_t *output);\n"
        "/* n samples back to back (the host binding's entry point). */\n"
        "fedtiny_status fedtiny_model_run_batch(const int8_t *inputs, int8_t *outputs, uint32_t n);\n\n"
        f"#endif /* {guard} */\n")
    ops = "\n".join(rows) if rows else "    {0, 0, 0, {0}, 0},"
    source = (
        _banner(graph) + "#include \"model.h\"\n\n" + "\n".join(decls) + "\n"
        f"static const fedtiny_op ops[{max(1, len(rows))}] = {{\n{ops}\n}};\n\n"
        "/* the union aligns the arena and scratch to 8 bytes, as the planner assumes */\n"
        f"static union {{ uint64_t align; uint8_t bytes[{max(1, plan.size)}]; }} arena;\n"
        f"static union {{ uint64_t align; uint8_t bytes[{max(1, scratch)}]; }} scratch;\n\n"
        "const fedtiny_graph fedtiny_model_graph = {\n"
        f"    ops, {len(rows)}, arena.bytes, {plan.size}, scratch.bytes, {scratch},\n"
        f"    {offset[graph.inputs[0]]}, {x.nbytes}, {offset[graph.outputs[0]]}, {y.nbytes},\n}};\n\n"
        "fedtiny_status fedtiny_model_run(const int8_t *input, int8_t *output)\n{\n"
        "    return fedtiny_run(&fedtiny_model_graph, input, output);\n}\n\n"
        "fedtiny_status fedtiny_model_run_batch(const int8_t *inputs, int8_t *outputs, uint32_t n)\n{\n"
        "    uint32_t i;\n    for (i = 0; i < n; i++) {\n"
        "        fedtiny_status status = fedtiny_model_run(inputs + i * FEDTINY_MODEL_INPUT_BYTES,\n"
        "                                                  outputs + i * FEDTINY_MODEL_OUTPUT_BYTES);\n"
        "        if (status != FEDTINY_OK) {\n            return status;\n        }\n    }\n"
        "    return FEDTINY_OK;\n}\n")
    return header, source


def render_samples(graph: Graph, samples: np.ndarray | None) -> str:
    """samples.c: int8 samples (N, H, W, C) in flash for the firmware; None -> one sample of zero points."""
    x = graph.tensors[graph.inputs[0]]
    if samples is None:
        samples = np.full((1,) + tuple(x.shape), x.zero_point, dtype=np.int8)
    samples = np.asarray(samples)
    if samples.dtype != np.int8 or tuple(samples.shape[1:]) != tuple(x.shape) or len(samples) == 0:
        raise ValueError(f"samples must be int8 of shape (N, {', '.join(map(str, x.shape))}), "
                         f"got {samples.dtype} {samples.shape}")
    return (_banner(graph) + "#include <stdint.h>\n\n"
            f"const uint32_t fedtiny_n_samples = {len(samples)};\n"
            + _c_array("int8_t", "fedtiny_samples", samples).replace("static const", "const"))


def generate(graph: Graph, out_dir: str | Path, samples: np.ndarray | None = None, fast: bool = True) -> Path:
    """Write model.c, model.h, samples.c, the runtime sources and the Makefile into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, source = render_model(graph, fast)
    (out / "model.h").write_text(header)
    (out / "model.c").write_text(source)
    (out / "samples.c").write_text(render_samples(graph, samples))
    src = runtime_dir()
    for name in RUNTIME_FILES:
        shutil.copyfile(src / name, out / name)
    return out


@click.command("codegen")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for model.c, model.h, samples.c, the runtime sources and the Makefile.")
@click.option("--samples", "samples_file", type=click.Path(dir_okay=False, exists=True),
              help="A .npy of samples for the firmware: int8 (N, H, W, C), or float in the model's own layout.")
@click.option("--reference", is_flag=True, help="Use the reference conv kernel everywhere (no fast paths).")
def codegen_command(model_file: str, out_dir: str, samples_file: str | None, reference: bool) -> None:
    """Generate C sources and a Makefile (targets host, m4) for a quantized model."""
    from .fileformat import FileFormatError
    from .modelfile import load_model

    try:
        graph = load_model(model_file)
    except FileFormatError as err:
        raise click.ClickException(str(err)) from err
    samples = None
    if samples_file:
        samples = np.load(samples_file)
        if samples.dtype != np.int8:
            from fedtiny_device.interpreter import quantize_input

            samples = quantize_input(graph, samples)
    try:
        out = generate(graph, out_dir, samples, fast=not reference)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    plan = inference_arena(graph)
    click.echo(f"wrote {out}: {len(graph.ops)} ops, arena {plan.size} bytes, scratch "
               f"{scratch_bytes(graph, not reference)} bytes, {count_macs(graph)} MACs; "
               f"run `make -C {out} host` or `make -C {out} m4`")
