"""C code generation: an int8 `Graph` -> model.c / model.h for the portable C runtime in device_runtime/c/.

The generated model is data, not code: const weights, biases and requantization parameters (flash), one
params struct per op, a const op table (kind + params + arena offsets) and one static arena whose offsets
come from `fedtiny.inspect.inference_arena`, so the SRAM the device uses is the planner's number. A reshape
emits nothing: its output is its input's bytes (`storage_of`). The generator picks the concrete kernel per op
(`kernel_of`); the scratch each kernel needs is fedtiny.device_memory's rule (the Python statement of the C
`_scratch_bytes()` companions, which `fedtiny_graph_check` re-checks on the device).
"""

import shutil
from pathlib import Path

import click
import numpy as np

from fedtiny import device_memory
from fedtiny.arith import update_draws
from fedtiny.inspect import inference_arena, storage_of
from fedtiny.interpreter import quantize_input, quantize_target
from fedtiny.ir import Graph, Op

RUNTIME_FILES = ("fedtiny_arith.h", "fedtiny_kernels.h", "fedtiny_kernels.c", "fedtiny_kernels_fwd_fast.c",
                 "fedtiny_kernels_bwd_fast.c", "fedtiny_runtime.h",
                 "fedtiny_runtime.c", "fedtiny_boot.h", "fedtiny_boot.c", "fedtiny_samples.h", "firmware_main.c",
                 "firmware_train.c", "fedtiny_train_job.h", "fedtiny_train_job.c", "firmware_train_job.c",
                 "firmware_profile.c", "fedtiny_m4.ld", "Makefile")
GENERATED_FILES = ("model.h", "model.c", "samples.c")


def runtime_dir() -> Path:
    """device_runtime/c/, the C runtime sources (package data of fedtiny_device, beside this module)."""
    return Path(__file__).resolve().parent / "c"


# ---- kernel choice and scratch sizes ------------------------------------------------------------------------

# Both are fedtiny.device_memory's (the compiler's budget check counts the same scratch): here they become C names.

def kernel_of(graph: Graph, op: Op, fast: bool = True) -> str | None:
    """The C op kind that runs an IR op (None: no op, a reshape's output aliases its input)."""
    kernel = device_memory.kernel_of(graph, op, fast)
    return None if kernel is None else f"FEDTINY_OP_{kernel.upper()}"


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


def _render_conv2d(graph: Graph, op: Op, name: str, extra: dict | None = None) -> str:
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
    fields.update(extra or {})
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


def _render_lut(graph: Graph, op: Op, name: str) -> str:
    decls = (_c_array("int8_t", f"{name}_table", op.attrs["table"])
             + _c_array("int16_t", f"{name}_grad_table", op.attrs["grad_table"]))
    fields = dict(size=int(np.prod(graph.tensors[op.outputs[0]].shape)), table=f"{name}_table",
                  grad_table=f"{name}_grad_table", grad_shift=op.attrs["grad_shift"])
    return decls + _struct("fedtiny_lut_params", f"{name}_params", fields)


def _render_cat(graph: Graph, op: Op, name: str) -> str:
    axis, shapes = op.attrs["axis"], [graph.tensors[n].shape for n in op.inputs]
    inner = [int(np.prod(shape[axis:])) for shape in shapes]
    fields = dict(n_inputs=len(shapes), outer=int(np.prod(shapes[0][:axis])),
                  inner="{" + ", ".join(map(str, inner)) + "}", tables=f"{name}_tables")
    return (_c_array("int8_t", f"{name}_tables", op.attrs["tables"])
            + _struct("fedtiny_cat_params", f"{name}_params", fields))


def _render_mul(graph: Graph, op: Op, name: str) -> str:
    (a, b), y = (graph.tensors[n] for n in op.inputs), graph.tensors[op.outputs[0]]
    fields = dict(out_h=y.shape[0], out_w=y.shape[1], out_c=y.shape[2], a_h=a.shape[0], a_w=a.shape[1],
                  a_c=a.shape[2], b_h=b.shape[0], b_w=b.shape[1], b_c=b.shape[2], a_zero_point=a.zero_point,
                  b_zero_point=b.zero_point, out_zero_point=y.zero_point)
    fields.update({k: _c_int(op.attrs[k]) for k in ("multiplier", "shift", "act_min", "act_max", "a_grad_m",
                                                     "a_grad_shift", "b_grad_m", "b_grad_shift")})
    return _struct("fedtiny_mul_params", f"{name}_params", fields)


# IR op kind -> renderer of its const data and params struct
RENDER = {"conv2d": _render_conv2d, "add": _render_add, "avgpool2d": _render_pool2d,
          "maxpool2d": _render_pool2d, "clamp": _render_clamp, "lut": _render_lut, "cat": _render_cat,
          "mul": _render_mul}


def _banner(graph: Graph) -> str:
    return f"/* Generated by fedtiny_device.codegen from model '{graph.meta.get('name', 'model')}'. Do not edit. */\n"


def render_model(graph: Graph, fast: bool = True) -> tuple[str, str]:
    """(model.h, model.c) source text."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError("codegen needs a graph with exactly one input and one output")
    plan = inference_arena(graph)
    root = storage_of(graph)
    offset = {name: plan.offsets[root[name]] for name in root}
    x, y = graph.tensors[graph.inputs[0]], graph.tensors[graph.outputs[0]]
    scratch = device_memory.graph_scratch_bytes(graph, fast)
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
        f"    {offset[graph.inputs[0]]}, {x.nbytes}, {offset[graph.outputs[0]]}, {y.nbytes},\n"
        "    0, 0, 0, /* no exponent table or train state: inference only */\n};\n\n"
        "fedtiny_status fedtiny_model_run(const int8_t *input, int8_t *output)\n{\n"
        "    return fedtiny_run(&fedtiny_model_graph, input, output);\n}\n\n"
        "fedtiny_status fedtiny_model_run_batch(const int8_t *inputs, int8_t *outputs, uint32_t n)\n{\n"
        "    uint32_t i;\n    for (i = 0; i < n; i++) {\n"
        "        fedtiny_status status = fedtiny_model_run(inputs + i * FEDTINY_MODEL_INPUT_BYTES,\n"
        "                                                  outputs + i * FEDTINY_MODEL_OUTPUT_BYTES);\n"
        "        if (status != FEDTINY_OK) {\n            return status;\n        }\n    }\n"
        "    return FEDTINY_OK;\n}\n")
    return header, source


def _checked_samples(graph: Graph, samples: np.ndarray | None) -> np.ndarray:
    """int8 samples (N, H, W, C) for the firmware's flash; None -> one sample of input zero points."""
    x = graph.tensors[graph.inputs[0]]
    if samples is None:
        samples = np.full((1,) + tuple(x.shape), x.zero_point, dtype=np.int8)
    samples = np.asarray(samples)
    if samples.dtype != np.int8 or tuple(samples.shape[1:]) != tuple(x.shape) or len(samples) == 0:
        raise ValueError(f"samples must be int8 of shape (N, {', '.join(map(str, x.shape))}), "
                         f"got {samples.dtype} {samples.shape}")
    return samples


def render_samples(graph: Graph, samples: np.ndarray | None) -> str:
    """samples.c: int8 samples (N, H, W, C) in flash for the firmware; None -> one sample of zero points."""
    samples = _checked_samples(graph, samples)
    return (_banner(graph) + "#include \"fedtiny_samples.h\"\n\n"
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


# ---- training plans -----------------------------------------------------------------------------------------
# A plan (fedtiny.compiler) becomes the same kind of op table: its forward ops, then one row per training step.
# Frozen weights stay `const` (flash); the trainable rows and biases live in the arena at the plan's offsets and
# the forward conv reads them there (params.weight_sram / bias_sram). Gradient exponents sit in a static int32
# table, one per gradient buffer; each training step's fedtiny_train_step_params holds their indexes.

# plan step kind -> C op kind (forward steps take the inference kernel choice)
TRAIN_STEP_KIND = {
    "mask_bits": "FEDTINY_OP_MASK_BITS",
    "loss_grad": "FEDTINY_OP_LOSS_GRAD",  # FEDTINY_OP_MSE_GRAD for an MSE plan
    "grad_add": "FEDTINY_OP_GRAD_ADD",
    "grad_mask": "FEDTINY_OP_GRAD_MASK",  # FEDTINY_OP_GRAD_MASK_BITS when the plan saved a bit mask
    "conv2d_input_grad": "FEDTINY_OP_CONV2D_INPUT_GRAD",
    "conv2d_weight_update": "FEDTINY_OP_CONV2D_WEIGHT_UPDATE",
    "conv2d_bias_update": "FEDTINY_OP_CONV2D_BIAS_UPDATE",
    "avgpool2d_input_grad": "FEDTINY_OP_AVGPOOL2D_INPUT_GRAD",
    "maxpool2d_input_grad": "FEDTINY_OP_MAXPOOL2D_INPUT_GRAD",
    "lut_input_grad": "FEDTINY_OP_LUT_INPUT_GRAD",
    "cat_input_grad": "FEDTINY_OP_CAT_INPUT_GRAD",
    "mul_input_grad": "FEDTINY_OP_MUL_INPUT_GRAD",
}

def gradient_buffers(plan) -> list[str]:
    """The plan's gradient buffers in order of first write: index i is entry i of the C exponent table."""
    names: list[str] = []
    for s in plan.steps:
        for name in s.writes:
            if name.startswith("grad:") and name not in names:
                names.append(name)
    return names


def state_layout(plan) -> tuple[dict[str, int], int]:
    """The trainable state as one byte string (fedtiny_wire's layout, what fedtiny_model_load_state reads): the
    plan's trainable buffers in trainable_buffers() order, back to back, each at a 4-byte-aligned offset (zero
    padding after int8 rows), little-endian. Returns (buffer -> offset, total bytes)."""
    offsets, end = {}, 0
    for name in plan.trainable_buffers():
        offsets[name] = end
        end += -(-plan.buffers[name].nbytes // 4) * 4
    return offsets, end


def draws_per_step(plan) -> int:
    """Random draws one training step takes from the node's splitmix64 counter: one per two elements each weight
    and bias update writes (arith.update_draws; a fixed number per plan, so a round's draws are steps x this)."""
    return sum(update_draws(int(np.prod(plan.buffers[s.writes[0]].shape))) for s in plan.steps
               if s.kind in ("conv2d_weight_update", "conv2d_bias_update"))


def step_macs(plan, step) -> int:
    """Multiply-accumulates of one plan step: a forward conv's output elements x window; its input gradient the
    same (a transposed conv); weight-gradient sums trainable rows x window x positions; bias sums out_c x
    positions (additions). Other steps (pooling, masks, the loss, the per-element update) count none."""
    if step.kind not in ("forward", "conv2d_input_grad", "conv2d_weight_update", "conv2d_bias_update"):
        return 0
    graph = plan.graph
    op = graph.ops[step.attrs["op"]]
    if op.kind != "conv2d":
        return 0
    oh, ow, cout = graph.tensors[op.outputs[0]].shape
    _, kh, kw, cin_g = graph.tensors[op.inputs[1]].shape
    if step.kind == "conv2d_weight_update":
        return oh * ow * step.attrs["channels"] * kh * kw * cin_g
    if step.kind == "conv2d_bias_update":
        return oh * ow * cout
    return oh * ow * cout * kh * kw * cin_g


def count_train_macs(plan) -> dict[str, int]:
    """Multiply-accumulates of one training step by kind (step_macs): forward, input gradients, weight-gradient
    sums and bias sums."""
    kinds = dict(forward="forward", conv2d_input_grad="input_grad", conv2d_weight_update="weight_grad",
                 conv2d_bias_update="bias_grad")
    macs = dict.fromkeys(kinds.values(), 0)
    for s in plan.steps:
        if s.kind in kinds:
            macs[kinds[s.kind]] += step_macs(plan, s)
    return dict(macs, total=sum(macs.values()))


def _mask_bounds(step, op) -> dict:
    """The exclusive int8 bounds inside which a mask lets gradients pass: the step's own (mask_min, mask_max)
    when the compiler set them, else the op's clamp bounds."""
    return dict(act_min=step.attrs.get("mask_min", op.attrs["act_min"]),
                act_max=step.attrs.get("mask_max", op.attrs["act_max"]))


def _arena_ptr(ctype: str, offset: int) -> str:
    return f"(const {ctype} *)(const void *)&arena.bytes[{offset}]"


def _step_params(name: str, kernel: str, size: int = 0, grad_in=(), grad_out: int = 0) -> str:
    fields = dict(kernel=kernel, size=size, grad_in="{" + ", ".join(str(i) for i in grad_in or (0,)) + "}",
                  grad_out=grad_out)
    return _struct("fedtiny_train_step_params", name, fields)


def render_plan(plan, fast: bool = True) -> tuple[str, str]:
    """(model.h, model.c) for a training plan: fedtiny_model_train_init / _train_step / _train_batch."""
    graph = plan.graph
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError("codegen needs a graph with exactly one input and one output")
    t, off, storage = graph.tensors, plan.offsets, plan.storage
    buf_off = lambda name: off[storage.get(name, name)]
    grads = gradient_buffers(plan)
    gi = {name: i for i, name in enumerate(grads)}
    if len(grads) > 255:
        raise ValueError("more than 255 gradient buffers")
    x, y = t[graph.inputs[0]], t[graph.outputs[0]]
    scratch = device_memory.plan_scratch_bytes(plan, fast)
    trainable = plan.trainable_buffers()

    decls = []
    for i, op in enumerate(graph.ops):
        if op.kind == "reshape":
            continue
        name = f"op{i}"
        extra = {}
        if op.kind == "conv2d":
            w_train, b_train = f"train:{op.inputs[1]}", f"train:{op.inputs[2]}"
            if w_train in plan.buffers:
                extra.update(weight_sram=_arena_ptr("int8_t", off[w_train]), sram_rows=plan.buffers[w_train].shape[0])
            if b_train in plan.buffers:
                extra["bias_sram"] = _arena_ptr("int32_t", off[b_train])
        shapes = " + ".join(str(tuple(t[n].shape)) for n in op.inputs if not t[n].is_constant)
        decls.append(f"/* op {i}: {op.kind} {op.origin}: {shapes} -> {tuple(t[op.outputs[0]].shape)} */\n"
                     + (_render_conv2d(graph, op, name, extra) if op.kind == "conv2d" else RENDER[op.kind](graph, op, name)))

    rows, forward_rows = [], []
    for j, s in enumerate(plan.steps):
        name = f"step{j}"
        op = graph.ops[s.attrs["op"]] if "op" in s.attrs else None
        i = s.attrs.get("op")
        note = f"/* step {j}: {s.kind} {', '.join(s.reads)} -> {', '.join(s.writes)} */\n"
        if s.kind == "forward":
            kind = kernel_of(graph, op, fast)
            ins = [n for n in op.inputs if not t[n].is_constant]
            operands, params = [buf_off(n) for n in ins] + [buf_off(op.outputs[0])], f"op{i}_params"
            n_in = len(ins)
        else:
            kind = TRAIN_STEP_KIND[s.kind]
            text = ""
            size = 0
            g_in = [gi[n] for n in s.reads if n in gi]
            g_out = gi.get(s.writes[0], 0)
            if s.kind == "mask_bits":
                text = _struct("fedtiny_grad_mask_params", f"{name}_mask", dict(
                    size=int(np.prod(t[op.outputs[0]].shape)), **_mask_bounds(s, op)))
                kernel, ins = f"&{name}_mask", s.reads
            elif s.kind == "grad_mask":
                kind = "FEDTINY_OP_GRAD_MASK_BITS" if s.attrs.get("bits") else "FEDTINY_OP_GRAD_MASK"
                size = int(np.prod(t[op.outputs[0]].shape))
                text = _struct("fedtiny_grad_mask_params", f"{name}_mask", dict(size=size, **_mask_bounds(s, op)))
                kernel, ins = f"&{name}_mask", s.reads
            elif s.kind == "loss_grad" and plan.loss == "mse":
                kind = "FEDTINY_OP_MSE_GRAD"
                text = _struct("fedtiny_mse_params", f"{name}_mse", dict(
                    size=int(np.prod(y.shape)), m=s.attrs["m"], exponent=s.attrs["exponent"]))
                kernel, ins = f"&{name}_mse", s.reads
            elif s.kind == "loss_grad":
                text = (_c_array("uint16_t", "exp_table", plan.exp_table)
                        + _struct("fedtiny_loss_params", f"{name}_loss",
                                  dict(classes=int(np.prod(y.shape)), exp_table="exp_table")))
                kernel, ins = f"&{name}_loss", s.reads
            elif s.kind == "grad_add":
                if len(s.reads) > 5:
                    raise ValueError(f"grad_add of {len(s.reads)} gradients: the C runtime sums at most 5")
                tensor = s.writes[0][len("grad:"):].split("@")[0].split("~")[0]
                size = int(np.prod(t[tensor].shape))
                kernel, ins = "0", s.reads
            elif s.kind == "conv2d_input_grad":
                ws, k = plan.backprop_scale[i]
                text = (_c_array("int32_t", f"{name}_ws", ws)
                        + _struct("fedtiny_conv2d_input_grad_params", f"{name}_grad",
                                  dict(conv=f"&op{i}_params", ws=f"{name}_ws", k=k,
                                       recompute=int(s.attrs.get("recompute", False)))))
                kernel, ins = f"&{name}_grad", s.reads[:1]
                kind = f"FEDTINY_OP_{device_memory.step_kernel(plan, s, fast).upper()}"  # depthwise or reference
            elif s.kind in ("conv2d_weight_update", "conv2d_bias_update"):
                upd = plan.updates[i]
                weights = s.kind == "conv2d_weight_update"
                kind = f"FEDTINY_OP_{device_memory.step_kernel(plan, s, fast).upper()}"  # fast or reference
                m, sh = (upd.weight_m, upd.weight_shift) if weights else (upd.bias_m, upd.bias_shift)
                text = (_c_array("int32_t", f"{name}_m", m) + _c_array("int32_t", f"{name}_shift", sh)
                        + _struct("fedtiny_conv2d_update_params", f"{name}_update", dict(
                            conv=f"&op{i}_params", channels=upd.channels if weights else len(m),
                            m=f"{name}_m", shift=f"{name}_shift",
                            block=device_memory.weight_update_block(t[op.inputs[0]].zero_point) if weights else 0)))
                kernel, ins = f"&{name}_update", s.reads[:2] if weights else s.reads[:1]
            elif s.kind == "avgpool2d_input_grad":
                kernel, ins = f"&op{i}_params", s.reads[:1]
            elif s.kind in ("maxpool2d_input_grad", "lut_input_grad"):
                kernel, ins = f"&op{i}_params", s.reads[:2]
            elif s.kind in ("cat_input_grad", "mul_input_grad"):
                which = s.kind.split("_")[0]
                text = _struct(f"fedtiny_{which}_input_grad_params", f"{name}_{which}",
                               {which: f"&op{i}_params", "input": s.attrs["input"]})
                kernel, ins = f"&{name}_{which}", s.reads
            else:
                raise ValueError(f"unknown plan step {s.kind!r}")
            decls.append(note + text + _step_params(f"{name}_params", kernel, size, g_in, g_out))
            note = ""
            operands, params, n_in = [off[n] for n in ins] + [off[s.writes[0]]], f"{name}_params", len(ins)
        if len(operands) > 6:
            raise ValueError(f"step {j} ({s.kind}) has {len(operands)} operands; the runtime takes at most 6")
        rows.append(f"    {{{kind}, {n_in}, 1, {{{', '.join(map(str, operands))}}}, &{params}}}, /* {j}: {s.kind} */")
        if s.kind == "forward":
            forward_rows.append(rows[-1])

    init = []
    state_offsets, state_bytes = state_layout(plan)
    for b in trainable:
        tensor = b[len("train:"):]
        i = next(k for k, op in enumerate(graph.ops) if tensor in op.inputs and op.kind == "conv2d")
        src = f"op{i}_weight" if graph.ops[i].inputs[1] == tensor else f"op{i}_bias"
        init.append(f"    {{{off[b]}, {plan.buffers[b].nbytes}, {state_offsets[b]}, (const void *){src}}}, /* {b} */")
    mse = plan.loss == "mse"
    if mse:  # a target of the output's K values per sample instead of a class label
        step_decl = (
            "/* One training step on one sample: input (H, W, C) int8 and its int8 target (the output's values in\n"
            " * (H, W, C) order, in the output's quantization). */\n"
            "fedtiny_status fedtiny_model_train_step(const int8_t *input, const int8_t *target);\n"
            "/* n steps back to back (the host binding's entry point); squared_error[i] gets each step's sum of\n"
            " * (y - t)^2 when not NULL. */\n"
            "fedtiny_status fedtiny_model_train_batch(const int8_t *inputs, const int8_t *targets, uint32_t n,\n"
            "                                         int64_t *squared_error);\n")
        step_def = (
            "fedtiny_status fedtiny_model_train_step(const int8_t *input, const int8_t *target)\n{\n"
            "    return fedtiny_train_step_target(&fedtiny_model_graph, input, target);\n}\n\n"
            "fedtiny_status fedtiny_model_train_batch(const int8_t *inputs, const int8_t *targets, uint32_t n,\n"
            "                                         int64_t *squared_error)\n{\n"
            "    uint32_t i;\n    for (i = 0; i < n; i++) {\n"
            "        fedtiny_status status = fedtiny_model_train_step(inputs + i * FEDTINY_MODEL_INPUT_BYTES,\n"
            "                                                         targets + i * FEDTINY_MODEL_OUTPUT_BYTES);\n"
            "        if (status != FEDTINY_OK) {\n            return status;\n        }\n"
            "        if (squared_error != 0) {\n            squared_error[i] = state.squared_error;\n        }\n"
            "    }\n    return FEDTINY_OK;\n}\n\n")
    else:
        step_decl = (
            "/* One training step on one sample: input (H, W, C) int8 and its class label. */\n"
            "fedtiny_status fedtiny_model_train_step(const int8_t *input, int32_t label);\n"
            "/* n steps back to back (the host binding's entry point); label_q15[i] gets each step's Q15 label\n"
            " * probability when not NULL. */\n"
            "fedtiny_status fedtiny_model_train_batch(const int8_t *inputs, const int32_t *labels, uint32_t n,\n"
            "                                         int32_t *label_q15);\n")
        step_def = (
            "fedtiny_status fedtiny_model_train_step(const int8_t *input, int32_t label)\n{\n"
            "    return fedtiny_train_step(&fedtiny_model_graph, input, label);\n}\n\n"
            "fedtiny_status fedtiny_model_train_batch(const int8_t *inputs, const int32_t *labels, uint32_t n,\n"
            "                                         int32_t *label_q15)\n{\n"
            "    uint32_t i;\n    for (i = 0; i < n; i++) {\n"
            "        fedtiny_status status = fedtiny_model_train_step(inputs + i * FEDTINY_MODEL_INPUT_BYTES, labels[i]);\n"
            "        if (status != FEDTINY_OK) {\n            return status;\n        }\n"
            "        if (label_q15 != 0) {\n            label_q15[i] = state.label_q15;\n        }\n    }\n"
            "    return FEDTINY_OK;\n}\n\n")
    if not forward_rows:
        raise ValueError("a training plan without forward steps")
    macs = count_train_macs(plan)
    trainable_bytes = sum(plan.buffers[b].nbytes for b in trainable)
    guard = "FEDTINY_MODEL_H"
    banner = _banner(graph).replace(". Do not edit.", f", training plan '{plan.scheme}'. Do not edit.")
    header = (
        banner + f"#ifndef {guard}\n#define {guard}\n\n#include <stdint.h>\n\n#include \"fedtiny_runtime.h\"\n\n"
        "#define FEDTINY_MODEL_TRAINING 1\n"
        f"#define FEDTINY_MODEL_LOSS_MSE {int(mse)}\n"
        f"#define FEDTINY_MODEL_INPUT_H {x.shape[0]}\n#define FEDTINY_MODEL_INPUT_W {x.shape[1]}\n"
        f"#define FEDTINY_MODEL_INPUT_C {x.shape[2]}\n#define FEDTINY_MODEL_INPUT_BYTES {x.nbytes}\n"
        f"#define FEDTINY_MODEL_OUTPUT_BYTES {y.nbytes}\n#define FEDTINY_MODEL_ARENA_BYTES {plan.arena_size}\n"
        f"#define FEDTINY_MODEL_SCRATCH_BYTES {scratch}\n#define FEDTINY_MODEL_N_OPS {len(rows)}\n"
        f"#define FEDTINY_MODEL_N_GRADIENTS {len(grads)}\n#define FEDTINY_MODEL_N_TRAINABLE {len(trainable)}\n"
        f"#define FEDTINY_MODEL_TRAINABLE_BYTES {trainable_bytes}\n"
        f"#define FEDTINY_MODEL_STATE_BYTES {state_bytes} /* the trainable state in fedtiny_wire's layout */\n"
        f"#define FEDTINY_MODEL_OUTPUT_SCALE {float(y.scale[0]).hex()} /* s_y, for the MSE loss */\n"
        f"#define FEDTINY_MODEL_DRAWS_PER_STEP {draws_per_step(plan)}u /* random draws of one training step */\n"
        f"#define FEDTINY_MODEL_MACS {macs['forward']}UL\n#define FEDTINY_MODEL_TRAIN_MACS {macs['total']}UL\n\n"
        "extern const fedtiny_graph fedtiny_model_graph;\n\n"
        "/* Copy the trainable rows and biases from flash into the arena; counter = (seed mod 2^24) << 40. */\n"
        "void fedtiny_model_train_init(uint32_t seed);\n"
        + step_decl +
        "/* The trainable rows and biases from / to a state in fedtiny_wire's layout (FEDTINY_MODEL_STATE_BYTES:\n"
        " * buffers back to back in the plan's order, each at a 4-byte-aligned offset; store zeroes the padding). */\n"
        "void fedtiny_model_load_state(const uint8_t *saved);\n"
        "void fedtiny_model_store_state(uint8_t *saved);\n"
        "/* The forward pass alone with the current trainable rows: input (H, W, C) int8 -> output int8. */\n"
        "fedtiny_status fedtiny_model_predict(const int8_t *input, int8_t *output);\n"
        "/* The arena (FEDTINY_MODEL_ARENA_BYTES: the trainable rows and every tensor of a step) and the kernels'\n"
        " * scratch (FEDTINY_MODEL_SCRATCH_BYTES: nothing kept from one kernel call to the next). While no model\n"
        " * call runs a caller may use both, if it loads a state (fedtiny_model_load_state) before the next one. */\n"
        "uint8_t *fedtiny_model_arena(void);\n"
        "uint8_t *fedtiny_model_scratch(void);\n"
        "uint64_t fedtiny_model_rng_counter(void);\n"
        "void fedtiny_model_set_rng_counter(uint64_t counter);\n"
        "/* FNV-1a 32 over the trainable buffers' bytes, in the plan's buffer order. */\n"
        "uint32_t fedtiny_model_trainable_digest(void);\n\n"
        f"#endif /* {guard} */\n")
    source = (
        banner + "#include \"model.h\"\n\n#include <string.h>\n\n"
        "/* the union aligns the arena and scratch to 8 bytes, as the planner assumes */\n"
        f"static union {{ uint64_t align; uint8_t bytes[{max(1, plan.arena_size)}]; }} arena;\n"
        f"static union {{ uint64_t align; uint8_t bytes[{max(1, scratch)}]; }} scratch;\n"
        f"static int32_t exponents[{max(1, len(grads))}]; /* "
        + ", ".join(f"{k}: {n}" for k, n in enumerate(grads)) + " */\n"
        "static fedtiny_train_state state;\n\n"
        + "\n".join(decls) + "\n"
        f"static const fedtiny_op ops[{len(rows)}] = {{\n" + "\n".join(rows) + "\n};\n\n"
        "const fedtiny_graph fedtiny_model_graph = {\n"
        f"    ops, {len(rows)}, arena.bytes, {plan.arena_size}, scratch.bytes, {scratch},\n"
        f"    {buf_off(graph.inputs[0])}, {x.nbytes}, {buf_off(graph.outputs[0])}, {y.nbytes},\n"
        f"    exponents, {max(1, len(grads))}, &state,\n}};\n\n"
        "/* the forward rows alone (fedtiny_model_predict): an inference graph over the same arena */\n"
        f"static const fedtiny_op forward_ops[{len(forward_rows)}] = {{\n" + "\n".join(forward_rows) + "\n};\n\n"
        "static const fedtiny_graph forward_graph = {\n"
        f"    forward_ops, {len(forward_rows)}, arena.bytes, {plan.arena_size}, scratch.bytes, {scratch},\n"
        f"    {buf_off(graph.inputs[0])}, {x.nbytes}, {buf_off(graph.outputs[0])}, {y.nbytes},\n"
        "    0, 0, 0,\n};\n\n"
        "/* trainable buffers: arena offset, bytes, offset in the state layout, initial values in flash */\n"
        "static const struct { uint32_t offset, bytes, state_offset; const void *initial; } trainables["
        f"{max(1, len(init))}] = {{\n" + ("\n".join(init) or "    {0, 0, 0},") + "\n};\n\n"
        "void fedtiny_model_train_init(uint32_t seed)\n{\n    uint32_t i;\n"
        f"    for (i = 0; i < {len(init)}u; i++) {{\n"
        "        memcpy(arena.bytes + trainables[i].offset, trainables[i].initial, trainables[i].bytes);\n    }\n"
        "    state.rng_counter = (uint64_t)(seed & 0xFFFFFFu) << 40;\n}\n\n"
        + step_def +
        "void fedtiny_model_load_state(const uint8_t *saved)\n{\n    uint32_t i;\n"
        f"    for (i = 0; i < {len(init)}u; i++) {{\n"
        "        memcpy(arena.bytes + trainables[i].offset, saved + trainables[i].state_offset, trainables[i].bytes);\n"
        "    }\n}\n\n"
        "void fedtiny_model_store_state(uint8_t *saved)\n{\n    uint32_t i;\n"
        f"    memset(saved, 0, {state_bytes}u);\n"
        f"    for (i = 0; i < {len(init)}u; i++) {{\n"
        "        memcpy(saved + trainables[i].state_offset, arena.bytes + trainables[i].offset, trainables[i].bytes);\n"
        "    }\n}\n\n"
        "fedtiny_status fedtiny_model_predict(const int8_t *input, int8_t *output)\n{\n"
        "    return fedtiny_run(&forward_graph, input, output);\n}\n\n"
        "uint8_t *fedtiny_model_arena(void) { return arena.bytes; }\n"
        "uint8_t *fedtiny_model_scratch(void) { return scratch.bytes; }\n"
        "uint64_t fedtiny_model_rng_counter(void) { return state.rng_counter; }\n"
        "void fedtiny_model_set_rng_counter(uint64_t counter) { state.rng_counter = counter; }\n\n"
        "uint32_t fedtiny_model_trainable_digest(void)\n{\n    uint32_t h = 2166136261u, i, j;\n"
        f"    for (i = 0; i < {len(init)}u; i++) {{\n"
        "        for (j = 0; j < trainables[i].bytes; j++) {\n"
        "            h = (h ^ arena.bytes[trainables[i].offset + j]) * 16777619u;\n        }\n    }\n"
        "    return h;\n}\n")
    return header, source


def render_train_samples(plan, samples: np.ndarray | None, labels: np.ndarray | None, seed: int = 0,
                         steps: int | None = None) -> str:
    """samples.c for the training firmware: int8 samples (N, H, W, C) and labels (N,) in flash; step i trains on
    sample i mod N. None -> one sample of input zero points with label 0. For an MSE plan `labels` are the int8
    targets (N, K) (or (N, *output shape)), emitted as fedtiny_targets; None -> targets of output zero points."""
    graph = plan.graph
    samples = _checked_samples(graph, samples)
    out = graph.tensors[graph.outputs[0]]
    classes = int(np.prod(out.shape))
    if plan.loss == "mse":
        targets = np.full((len(samples), classes), out.zero_point, dtype=np.int8) if labels is None else \
            np.asarray(labels)
        if targets.dtype != np.int8 or targets.size != len(samples) * classes:
            raise ValueError(f"targets must be int8 of shape ({len(samples)}, {classes}), got {targets.dtype} "
                             f"{targets.shape}")
        labels_c = _c_array("int8_t", "fedtiny_targets", targets)
    else:
        labels = np.zeros(len(samples), dtype=np.int32) if labels is None else np.asarray(labels).astype(np.int32)
        if labels.shape != (len(samples),) or labels.min() < 0 or labels.max() >= classes:
            raise ValueError(f"labels must be {len(samples)} class indexes in 0..{classes - 1}")
        labels_c = _c_array("int32_t", "fedtiny_labels", labels)
    steps = len(samples) if steps is None else int(steps)
    return (_banner(graph) + "#include \"fedtiny_samples.h\"\n\n"
            f"const uint32_t fedtiny_n_samples = {len(samples)};\n"
            f"const uint32_t fedtiny_train_steps = {steps};\n"
            f"const uint32_t fedtiny_train_seed = {int(seed) & 0xFFFFFF};\n"
            + _c_array("int8_t", "fedtiny_samples", samples).replace("static const", "const")
            + labels_c.replace("static const", "const"))


def generate_plan(plan, out_dir: str | Path, samples: np.ndarray | None = None, labels: np.ndarray | None = None,
                  seed: int = 0, steps: int | None = None, fast: bool = True) -> Path:
    """Write a training plan's model.c, model.h, samples.c (samples + labels), the runtime and the Makefile
    (targets host and m4-train)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, source = render_plan(plan, fast)
    (out / "model.h").write_text(header)
    (out / "model.c").write_text(source)
    (out / "samples.c").write_text(render_train_samples(plan, samples, labels, seed, steps))
    src = runtime_dir()
    for name in RUNTIME_FILES:
        shutil.copyfile(src / name, out / name)
    return out


def file_kind(path: str | Path) -> bytes:
    """The container kind of a fedtiny file (b"MODL", b"PLAN"), from its fixed header."""
    from fedtiny.fileformat import MAGIC, FileFormatError

    with open(path, "rb") as f:
        head = f.read(10)
    if len(head) < 10 or head[:4] != MAGIC:
        raise FileFormatError(f"{path}: not a fedtiny file")
    return head[6:10]


@click.command("codegen")
@click.argument("model_file", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for model.c, model.h, samples.c, the runtime sources and the Makefile.")
@click.option("--samples", "samples_file", type=click.Path(dir_okay=False, exists=True),
              help="A .npy of samples for the firmware: int8 (N, H, W, C), or float in the model's own layout.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, exists=True),
              help="Training plans: a .npy of class labels (N,) for the samples; for an MSE plan, targets: int8 "
                   "(N, K), or float in the model's own output layout.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training plans: the node's random seed.")
@click.option("--steps", type=int, default=None, help="Training plans: steps the firmware runs (default: N).")
@click.option("--reference", is_flag=True, help="Use the reference conv kernel everywhere (no fast paths).")
@click.option("--node", is_flag=True, help="Training plans: the whole node firmware of one fleet member (protocol, "
              "crypto, persisted state, modem link, training; target m4-node). Needs --fleet-dir and --device.")
@click.option("--fleet-dir", type=click.Path(file_okay=False, exists=True),
              help="With --node: the `fedtiny keys` folder (or the device's own folder of it) holding the device.")
@click.option("--device", help="With --node: the fleet member's name; its identity goes into the firmware.")
@click.option("--chunk-size", type=int, default=1024, show_default=True,
              help="With --node: the largest MQTT payload the node sends and takes (its modem's limit).")
def codegen_command(model_file: str, out_dir: str, samples_file: str | None, labels_file: str | None, seed: int,
                    steps: int | None, reference: bool, node: bool, fleet_dir: str | None, device: str | None,
                    chunk_size: int) -> None:
    """Generate C sources and a Makefile for a quantized model (targets host, m4) or a training plan
    (targets host, m4-train); the file's container kind decides which. With --node, a training plan becomes the
    firmware project of one fleet member (target m4-node)."""
    from fedtiny.fileformat import FileFormatError
    from fedtiny.modelfile import load_model
    from fedtiny.planfile import KIND as PLAN_KIND
    from fedtiny.planfile import load_plan

    try:
        is_plan = file_kind(model_file) == PLAN_KIND
        plan = load_plan(model_file) if is_plan else None
        graph = plan.graph if is_plan else load_model(model_file)
    except FileFormatError as err:
        raise click.ClickException(str(err)) from err
    samples = None
    if samples_file:
        samples = np.load(samples_file)
        if samples.dtype != np.int8:
            samples = quantize_input(graph, samples)
    labels = np.load(labels_file) if labels_file else None
    if is_plan and plan.loss == "mse" and labels is not None and labels.dtype != np.int8:
        labels = quantize_target(graph, labels)
    if node:
        _write_node(plan if is_plan else None, out_dir, fleet_dir, device, samples, labels, seed, chunk_size)
        return
    try:
        if is_plan:
            out = generate_plan(plan, out_dir, samples, labels, seed, steps, fast=not reference)
        else:
            out = generate(graph, out_dir, samples, fast=not reference)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if is_plan:
        macs = count_train_macs(plan)
        click.echo(f"wrote {out}: training plan '{plan.scheme}', {len(plan.steps)} steps, arena {plan.arena_size} "
                   f"bytes, scratch {device_memory.plan_scratch_bytes(plan, not reference)} bytes, {macs['total']} MACs per "
                   f"step; run `make -C {out} host` or `make -C {out} m4-train`")
        return
    arena = inference_arena(graph)
    click.echo(f"wrote {out}: {len(graph.ops)} ops, arena {arena.size} bytes, scratch "
               f"{device_memory.graph_scratch_bytes(graph, not reference)} bytes, {count_macs(graph)} MACs; "
               f"run `make -C {out} host` or `make -C {out} m4`")


# ---- the node's plan descriptor (fedtiny_node_plan in fedtiny_node.h) -------------------------------------------

WIRE_DTYPES = {"int8": 1, "int32": 3}  # FEDTINY_WIRE_DTYPE_INT8 / _INT32: what a trainable buffer is


def node_plan_source(plan, name: str = "fedtiny_node_plan_data") -> str:
    """C source defining `const fedtiny_node_plan <name>`: what the C node must know of a training plan. Per
    trainable buffer (tensor id order) its dtype, rows, inner size and per-row scales (update.row_scales, as
    hexadecimal float literals: the C doubles are Python's bit for bit); update.delta_limits; the plan hash;
    and the numbers JOIN and STATUS announce. The firmware and the host library (fedtiny_device.cnode) both
    compile it."""
    from fedtiny.planfile import plan_hash
    from fedtiny.protocol.update import delta_limits, row_scales

    scales = row_scales(plan)
    parts = [f"/* Generated by fedtiny_device.codegen.node_plan_source: the node's plan ({plan.scheme}). */\n",
             '#include "fedtiny_node.h"\n\n']
    rows = []
    for i, buffer_name in enumerate(plan.trainable_buffers()):
        buffer = plan.buffers[buffer_name]
        shape = tuple(buffer.shape)
        inner = int(np.prod(shape[1:], dtype=np.int64))
        hexed = [float(v).hex() for v in scales[buffer_name]]
        values = ",\n    ".join(", ".join(hexed[j:j + 4]) for j in range(0, len(hexed), 4))
        parts.append(f"static const double {name}_scales_{i}[{len(hexed)}] = {{ /* {buffer_name} */\n"
                     f"    {values}\n}};\n")
        rows.append(f"    {{{WIRE_DTYPES[np.dtype(buffer.dtype).name]}u, {shape[0]}u, {inner}u, {name}_scales_{i}}},\n")
    limits = delta_limits(plan)
    parts.append(f"static const fedtiny_wire_tensor {name}_tensors[{len(rows)}] = {{\n{''.join(rows)}}};\n")
    parts.append(f"static const fedtiny_wire_plan {name}_wire = {{{name}_tensors, {len(rows)}u, "
                 f"{limits.max_body}u, {limits.max_entries}u, {limits.max_elements}u}};\n")
    digest = ", ".join(f"0x{b:02x}" for b in plan_hash(plan))
    free = max(0, int(plan.budget - plan.reserve - plan.arena_size))
    parts.append(f"const fedtiny_node_plan {name} = {{&{name}_wire, {{{digest}}}, {int(plan.arena_size)}u, "
                 f"{int(plan.memory_report()['flash_bytes'])}u, {free}u}};\n")
    return "".join(parts)


def _write_node(plan, out_dir: str, fleet_dir: str | None, device: str | None, samples, labels, seed: int,
                chunk_size: int) -> None:
    from fedtiny.protocol.chunking import MAX_CHUNK_PAYLOAD, MIN_CHUNK_PAYLOAD

    from . import node_project

    if plan is None:
        raise click.UsageError("--node needs a training plan (fedtiny compile MODEL -o PLAN.ftp)")
    if not fleet_dir or not device:
        raise click.UsageError("--node needs --fleet-dir and --device")
    if not MIN_CHUNK_PAYLOAD <= chunk_size <= 65535 - 300 or chunk_size > MAX_CHUNK_PAYLOAD:
        raise click.UsageError(f"--chunk-size {chunk_size}: must be {MIN_CHUNK_PAYLOAD}..{65535 - 300} bytes "
                               f"(one modem frame carries one chunk and its topic)")
    try:
        folder = node_project.device_folder(fleet_dir, device)
        project = node_project.files(plan, folder, device, samples, labels, seed, chunk_size=chunk_size)
    except (ValueError, KeyError) as err:
        raise click.ClickException(str(err)) from err
    out = node_project.write(out_dir, project)
    sizes = node_project.buffer_sizes(plan, chunk_size)
    click.echo(f"wrote {out}: node {device} ({len(project)} files; node_config.c holds its secret key), plan "
               f"'{plan.scheme}', arena {plan.arena_size} B, message buffers {sizes['reassembly'] + sizes['upload']} B;"
               f" run `make -C {out} m4-node`")
