"""What a training plan takes on the device, counted the way the linker counts it.

RAM  = the arena (fedtiny.arena: every tensor of a step and the trainable rows)
     + the C kernels' scratch (one buffer, the largest any kernel of the step asks for)
     + the runtime's static data (the gradient exponent table and the train state)
     + the stack a training step needs (step_stack_bytes: the deepest of its kernels' frames).
Flash = the plan's constants as the code generator emits them (weights, biases, requantization and update
        constants, params structs, op tables) + the code of the C runtime (RUNTIME_CODE_BYTES).

This module is the one statement of the kernels' scratch rules (TFLite Micro style: a kernel states the
scratch it needs for a given shape), used by the compiler's budget check and by the code generator
(fedtiny_device.codegen) that sizes the scratch buffer; each rule mirrors a `*_scratch_bytes()` companion in
device_runtime/c/fedtiny_kernels.c, which `fedtiny_graph_check` re-checks on the device. It also proves, at
compile time, the bounds that let a kernel accumulate in int32 instead of int64 (`accumulator_bound`).
tests/test_device_memory.py builds the Cortex-M4 firmware of every zoo model and scheme and holds these
figures to within 5 % of the linker's. A node that adds device noise or does secure aggregation needs more RAM
beside the training step (privacy_ram_bytes, secagg_buffer_bytes; tests/test_firmware_secagg.py holds them to the
node firmware's linker map).
"""

import numpy as np

from .ir import Graph, Op

INT32_LIMIT = 2**31  # an int32 accumulator holds |sum| < 2^31
GRAD_ABS_MAX = 2**15  # |g| of an int16 gradient value (-32768 is representable)

# The stack of a training step on the Cortex-M4 (arm-none-eabi-gcc 12.2, -O2), from gcc -fstack-usage: the
# frames of fedtiny_train_step and fedtiny_invoke (STEP_STACK_BASE, with the call's slack), then the deepest of the
# plan's kernels: its invoke glue's frame + the kernel's + its helpers' (narrow_tensor32: 56). The kernels keep
# no arrays on the stack, so the depth does not grow with the model. tests/test_device_memory.py paints the stack
# (fedtiny_stack_paint/peak in fedtiny_boot.c; firmware_train.c prints the peak) for every zoo model and scheme
# and checks measured <= rule; regenerate the table when a kernel's frame changes.
STEP_STACK_BASE = 40
KERNEL_STACK_BYTES = {
    "conv2d": 4 + 88, "add": 4 + 56,
    # fedtiny_kernels_fwd_fast.c: conv2d_fast + load_window + column_run; depthwise + newlib's memset; add_fast +
    # the reference add it hands unusual params to
    "conv2d_fast": 4 + 288 + 96 + 32, "conv2d_depthwise": 4 + 216 + 16, "add_fast": 4 + 80 + 56,
    "avgpool2d": 4 + 72, "maxpool2d": 4 + 56, "clamp": 4 + 8, "lut": 4 + 8, "lut_input_grad": 24 + 72,
    "mask_bits": 4 + 24, "loss_grad": 32 + 56, "mse_grad": 32 + 80, "grad_add": 80 + 88, "grad_mask": 8 + 20,
    "grad_mask_bits": 8 + 8, "conv2d_input_grad": 24 + 216, "conv2d_weight_update": 24 + 152,
    "conv2d_bias_update": 16 + 80, "avgpool2d_input_grad": 24 + 216 + 56, "maxpool2d_input_grad": 32 + 160 + 56,
    "cat": 40 + 32, "mul": 4 + 56, "cat_input_grad": 24 + 32, "mul_input_grad": 24 + 216,
    # fedtiny_kernels_bwd_fast.c: its glue, frame (a chunk's sums), update_run32; the depthwise and pointwise input
    # gradients + narrow_sums (28); the bias update
    "conv2d_weight_update_fast": 32 + 568 + 64, "conv2d_input_grad_depthwise": 24 + 136 + 28,
    "conv2d_input_grad_pointwise": 24 + 128 + 28, "conv2d_bias_update_fast": 16 + 112,
}

# The code of the C runtime a training firmware links (fedtiny_kernels.c, fedtiny_runtime.c and the generated
# model.c's functions), on the Cortex-M4 with arm-none-eabi-gcc -O2 -ffunction-sections and --gc-sections: the
# executor's table reaches every kernel, so the linked code does not depend on the plan. Measured from the
# linker's map (tests/test_device_memory.py keeps it within 5 %); update it when the kernels change.
# Measured 2026-11-30: 17,010 with the fast forward kernels (fedtiny_kernels_fwd_fast.c: 3,196), + 1,572 for the
# fast weight update (fedtiny_kernels_bwd_fast.c); 22,088 with the fast add, the one-pixel conv path, the
# one-multiply requantization and the depthwise kernel specialised by row length (branch fastfwd2); + 1,580 for
# two weights per draw and the depthwise input gradient (branch fastbwd2); + 4,932 for the requantization by
# SMMLAR in two inlined forms, the block-wise stores and the depthwise kernels unrolled for 3 x 3 and 1 x 5
# (branch fastfwd3: fedtiny_kernels_fwd_fast.c 6,596 -> 11,528 B of .text); + 4,292 for the weight update's chunks
# and depthwise plane, the pointwise input gradient and the fast bias update (branch fastbwd3); + 2,252 for the
# linear layers' own path (linear_fast, branch kernels: 35,144 in the mlp classifier plan's map).
RUNTIME_CODE_BYTES = 35_144

# sizeof of the runtime's structs on the Cortex-M4 (32-bit pointers), as fedtiny_kernels.h / fedtiny_runtime.h
# declare them: what each op, step and table costs in flash.
_STRUCT_BYTES = dict(conv2d_params=96, add_params=52, pool2d_params=48, clamp_params=12, lut_params=16, op=32,
                     cat_params=32, mul_params=84, operand_grad_params=8,
                     step_params=16,
                     grad_mask_params=12, loss_params=8, mse_params=12, input_grad_params=16, update_params=20,
                     graph=52, trainable_entry=16, train_state=32)


def _elements(graph: Graph, name: str) -> int:
    return int(np.prod(graph.tensors[name].shape, dtype=np.int64))


# ---- kernel choice --------------------------------------------------------------------------------------------

def conv_kernel(graph: Graph, op: Op, fast: bool = True) -> str:
    """The C kernel that runs a conv2d: "conv2d_depthwise" (groups == Cin == Cout) or "conv2d_fast" (any other:
    fedtiny_kernels_fwd_fast.c), or the reference "conv2d" (every conv when `fast` is off)."""
    cout = graph.tensors[op.inputs[1]].shape[0]
    cin = graph.tensors[op.inputs[0]].shape[2]
    if not fast:
        return "conv2d"
    return "conv2d_depthwise" if op.attrs["groups"] == cin == cout else "conv2d_fast"


# forward op kinds with a fast kernel beside the reference one (fedtiny_kernels_fwd_fast.c), besides conv2d
FAST_FORWARD = {"add": "add_fast"}


def kernel_of(graph: Graph, op: Op, fast: bool = True) -> str | None:
    """The C kernel of a forward op (None for a reshape, which is no op: its output is its input's bytes)."""
    if op.kind == "conv2d":
        return conv_kernel(graph, op, fast)
    if fast and op.kind in FAST_FORWARD:
        return FAST_FORWARD[op.kind]
    return None if op.kind == "reshape" else op.kind


# ---- scratch ----------------------------------------------------------------------------------------------------

# C kernel -> its scratch bytes for an op (fedtiny_kernels.c's *_scratch_bytes()); a kernel not listed takes none
def _conv_fast_scratch(graph: Graph, op: Op) -> int:
    # two int16 columns of one output pixel's window, each rounded up to 4 values, and each output channel's
    # requantization (channel_requant: 4 int32)
    cout, kh, kw, cin_g = graph.tensors[op.inputs[1]].shape
    return 2 * 2 * (-(-kh * kw * cin_g // 4) * 4) + 16 * cout


def _depthwise_scratch(graph: Graph, op: Op) -> int:
    # one channel's padded int16 input plane and its int16 kernel, rows padded to an even number of taps
    _, kh, kw, _ = graph.tensors[op.inputs[1]].shape
    oh, ow, _ = graph.tensors[op.outputs[0]].shape
    (sh, sw), taps_w = op.attrs["stride"], kw + kw % 2
    return 2 * (kh * taps_w + ((oh - 1) * sh + kh) * ((ow - 1) * sw + taps_w))


FORWARD_SCRATCH = {"conv2d_fast": _conv_fast_scratch, "conv2d_depthwise": _depthwise_scratch}

def windows_disjoint(op: Op) -> bool:
    """A pooling op whose windows do not overlap (stride >= kernel: a global average pool, a 2 x 2 / 2 max pool):
    each input element gets at most one window's gradient, so its gradient kernel needs no accumulator."""
    (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
    return sh >= kh and sw >= kw


def _pool_grad_scratch(graph: Graph, op: Op) -> int:
    # int32 sums where windows overlap: accumulator_bound proves |sum| < 2^31 at compile time (check_accumulators)
    return 0 if windows_disjoint(op) else 4 * _elements(graph, op.inputs[0])


def _input_grad_scratch(graph: Graph, op: Op, step) -> int:
    """A conv's input gradient sums in int64 (a term reaches 2^15 * 2^15 * 2^7: no int32 bound holds): one per
    input element in one pass, or, with the step's `recompute` (set by the compiler when that does not fit the
    budget: choose_recompute), one per input channel, each pixel's sums computed twice."""
    h, w, c = graph.tensors[op.inputs[0]].shape
    return 8 * c * (1 if step.attrs.get("recompute") else h * w)


def _input_grad_depthwise_scratch(graph: Graph, op: Op, step) -> int:
    """The depthwise input gradient's int64 sum per input element and its table of ws W, int32 per weight."""
    h, w, c = graph.tensors[op.inputs[0]].shape
    return 8 * h * w * c + 4 * graph.tensors[op.inputs[1]].data.size


def _input_grad_pointwise_scratch(graph: Graph, op: Op, step) -> int:
    """The pointwise input gradient's int64 sum per input element, each pixel's split terms (8 bytes per output
    channel pair) and two input channels' weights (8 bytes per output channel pair)."""
    h, w, c = graph.tensors[op.inputs[0]].shape
    pairs = -(-graph.tensors[op.inputs[1]].shape[0] // 2)
    return 8 * h * w * c + 8 * h * w * pairs + 8 * pairs


# weights of a row the fast weight update sums together before updating them (fedtiny_kernels_bwd_fast.c)
UPDATE_CHUNK = 16


def _weight_update_fast_scratch(graph: Graph, op: Op, step) -> int:
    """The fast weight update's g columns of the trainable rows and the input columns of one chunk of a row (at
    most UPDATE_CHUNK, the row's length rounded up to even), int16 per output position (rounded up to even); for a
    depthwise conv whose sums fit one int32 block, at least one channel's padded input plane."""
    oh, ow, _ = graph.tensors[op.outputs[0]].shape
    row_len, p2 = conv_window(graph, op), oh * ow + (oh * ow) % 2
    columns = min(UPDATE_CHUNK, row_len + row_len % 2) * p2
    cout, kh, kw, _ = graph.tensors[op.inputs[1]].shape
    cin = graph.tensors[op.inputs[0]].shape[2]
    if op.attrs["groups"] == cin == cout and p2 <= weight_update_block(weight_update_x_zero_point_of(graph, op)):
        (sh, sw) = op.attrs["stride"]  # a depthwise update reads one channel's padded input plane instead (rows by phase)
        columns = max(columns, ((oh - 1) * sh + kh) * -(-((ow - 1) * sw + kw) // sw) * sw)
    return 2 * (step.attrs["channels"] * p2 + columns)


# a training step's C kernel (step_kernel) -> its scratch bytes (graph, op, step)
STEP_SCRATCH = {
    "conv2d_input_grad": _input_grad_scratch,
    "avgpool2d_input_grad": lambda graph, op, step: _pool_grad_scratch(graph, op),
    "maxpool2d_input_grad": lambda graph, op, step: _pool_grad_scratch(graph, op),
    "conv2d_weight_update_fast": _weight_update_fast_scratch,
    "conv2d_input_grad_depthwise": _input_grad_depthwise_scratch,
    "conv2d_input_grad_pointwise": _input_grad_pointwise_scratch,
    "conv2d_bias_update_fast": lambda graph, op, step: 4 * graph.tensors[op.inputs[1]].shape[0],  # int32 sums
}


def op_scratch_bytes(graph: Graph, op: Op, fast: bool = True) -> int:
    rule = FORWARD_SCRATCH.get(kernel_of(graph, op, fast))
    return rule(graph, op) if rule else 0


def graph_scratch_bytes(graph: Graph, fast: bool = True) -> int:
    """The scratch of one inference: the largest any of its kernels needs (one buffer, reused op after op)."""
    return max((op_scratch_bytes(graph, op, fast) for op in graph.ops), default=0)


def step_scratch_bytes(plan, step, fast: bool = True) -> int:
    graph = plan.graph
    if step.kind == "forward":
        return op_scratch_bytes(graph, graph.ops[step.attrs["op"]], fast)
    rule = STEP_SCRATCH.get(step_kernel(plan, step, fast))
    return rule(graph, graph.ops[step.attrs["op"]], step) if rule else 0


def plan_scratch_bytes(plan, fast: bool = True) -> int:
    """The scratch of a training step: the largest any of its kernels needs."""
    return max((step_scratch_bytes(plan, s, fast) for s in plan.steps), default=0)


def choose_recompute(plan, available: int, fast: bool = True) -> None:
    """When the plan's RAM exceeds `available`, switch conv input-gradient steps to their recompute form (a
    scratch of one pixel, twice the MACs) and fast weight updates to the reference kernel (no scratch, slower),
    largest scratch first, until it fits or none is left: memory is traded for time only where the budget asks
    for it."""
    def pixels(step) -> int:
        h, w, _ = plan.graph.tensors[plan.graph.ops[step.attrs["op"]].inputs[0]].shape
        return h * w

    # an input of one pixel (a linear layer's) would take the same scratch twice as slowly
    candidates = sorted((s for s in plan.steps if (s.kind == "conv2d_input_grad" and pixels(s) > 1)
                         or step_kernel(plan, s, fast) in ("conv2d_weight_update_fast", "conv2d_bias_update_fast")),
                        key=lambda s: -step_scratch_bytes(plan, s, fast))
    for step in candidates:
        if plan_footprint(plan, fast)["device_ram_bytes"] <= available:
            return
        step.attrs["recompute"] = True


# ---- accumulator bounds -----------------------------------------------------------------------------------------

def _windows(op: Op, graph: Graph) -> list[tuple[int, int, int, int]]:
    """Per pooling window: its valid rows [y0, y1) and columns [x0, x1) of the input."""
    h, w, _ = graph.tensors[op.inputs[0]].shape
    oh, ow, _ = graph.tensors[op.outputs[0]].shape
    (kh, kw), (sh, sw), (top, left) = op.attrs["kernel"], op.attrs["stride"], op.attrs["padding"][:2]
    windows = []
    for oy in range(oh):
        y0, y1 = max(0, oy * sh - top), min(h, oy * sh - top + kh)
        for ox in range(ow):
            x0, x1 = max(0, ox * sw - left), min(w, ox * sw - left + kw)
            windows.append((y0, y1, x0, x1))
    return windows


def accumulator_bound(plan, step) -> int:
    """An upper bound on |sum| of one exact int32 accumulator of a step, from the tensor sizes, the zero points and
    the int16 gradient range: a pooling input gradient's (avgpool adds g * round(2^15 / count) once per window
    that covers an element, maxpool adds g at most once per covering window) or one block of the fast weight
    update's (weight_update_block positions of g (x - zero point))."""
    graph = plan.graph
    op = graph.ops[step.attrs["op"]]
    if step.kind == "conv2d_weight_update":
        zx = weight_update_x_zero_point(plan, step)
        return weight_update_block(zx) * GRAD_ABS_MAX * max(abs(-128 - zx), abs(127 - zx))
    h, w, _ = graph.tensors[op.inputs[0]].shape
    per_element = np.zeros((h, w), dtype=np.int64)
    for y0, y1, x0, x1 in _windows(op, graph):
        count = max(0, y1 - y0) * max(0, x1 - x0)
        if count:
            per_element[y0:y1, x0:x1] += (32768 + count // 2) // count if step.kind == "avgpool2d_input_grad" else 1
    return GRAD_ABS_MAX * int(per_element.max(initial=0))


def weight_update_block(x_zero_point: int) -> int:
    """Positions the fast weight update sums in int32 before adding them into int64: the most, and even (the
    kernel's int16 pairs), for which block x 2^15 x max |x - zero point| < 2^31 (256 for the widest inputs, 510
    for a zero point of 0). The generated C passes it to the kernel (fedtiny_conv2d_update_params.block)."""
    widest = max(abs(-128 - x_zero_point), abs(127 - x_zero_point))
    return (INT32_LIMIT - 1) // (GRAD_ABS_MAX * widest) // 2 * 2


def weight_update_x_zero_point(plan, step) -> int:
    return weight_update_x_zero_point_of(plan.graph, plan.graph.ops[step.attrs["op"]])


def weight_update_x_zero_point_of(graph: Graph, op: Op) -> int:
    return graph.tensors[op.inputs[0]].zero_point


# |x - zero point| * |w| of one int8 conv term: 255 * 128
CONV_TERM_MAX = 255 * 128


def conv_window(graph: Graph, op: Op) -> int:
    """Terms of one conv output's sum: kernel_h * kernel_w * Cin / groups."""
    _, kh, kw, cin_g = graph.tensors[op.inputs[1]].shape
    return kh * kw * cin_g


def check_accumulators(plan) -> None:
    """Raise ValueError if a kernel that sums in int32 could overflow for this plan's shapes: a forward conv's sum
    (every conv kernel, reference and fast, sums in int32: window * 255 * 128 < 2^31), a pooling gradient's or a
    block of the fast weight update's."""
    for i, op in enumerate(plan.graph.ops):
        if op.kind == "conv2d" and conv_window(plan.graph, op) * CONV_TERM_MAX >= INT32_LIMIT:
            raise ValueError(f"op {i} (conv2d {op.origin}): a window of {conv_window(plan.graph, op):,} terms could "
                             f"sum past 2^31 (the C kernels sum in int32); split it into smaller convolutions")
    for j, s in enumerate(plan.steps):
        if s.kind == "conv2d_weight_update" and accumulator_bound(plan, s) >= INT32_LIMIT:
            raise ValueError(f"step {j} (conv2d_weight_update): a block of its sums could reach "
                             f"{accumulator_bound(plan, s):,} (the fast kernel sums blocks in int32)")
        pooling = s.kind in ("avgpool2d_input_grad", "maxpool2d_input_grad")
        if pooling and not windows_disjoint(plan.graph.ops[s.attrs["op"]]):
            bound = accumulator_bound(plan, s)
            if bound >= INT32_LIMIT:
                raise ValueError(f"step {j} ({s.kind}): its windows overlap so much that an input gradient could "
                                 f"reach {bound:,} (the C kernel sums in int32, below 2^31); use a pooling stride "
                                 "closer to its kernel size")


# ---- stack ----------------------------------------------------------------------------------------------------

def step_kernel(plan, step, fast: bool = True) -> str:
    """The C kernel that runs a plan step (KERNEL_STACK_BYTES' keys)."""
    if step.kind == "forward":
        return kernel_of(plan.graph, plan.graph.ops[step.attrs["op"]], fast)
    if step.kind == "grad_mask" and step.attrs.get("bits"):
        return "grad_mask_bits"
    if step.kind == "loss_grad" and plan.loss == "mse":
        return "mse_grad"
    if step.kind == "conv2d_weight_update" and fast and not step.attrs.get("recompute"):
        return "conv2d_weight_update_fast"  # fedtiny_kernels_bwd_fast.c; `recompute`: the budget's choice
    if step.kind == "conv2d_bias_update" and fast and not step.attrs.get("recompute"):
        oh, ow, _ = plan.graph.tensors[plan.graph.ops[step.attrs["op"]].outputs[0]].shape
        if oh * ow <= BIAS_FAST_MAX_POSITIONS:
            return "conv2d_bias_update_fast"  # fedtiny_kernels_bwd_fast.c
    if step.kind == "conv2d_input_grad" and fast and not step.attrs.get("recompute"):
        op = plan.graph.ops[step.attrs["op"]]
        if conv_kernel(plan.graph, op) == "conv2d_depthwise":
            return "conv2d_input_grad_depthwise"  # fedtiny_kernels_bwd_fast.c
        if is_pointwise(plan.graph, op):
            return "conv2d_input_grad_pointwise"  # fedtiny_kernels_bwd_fast.c
    return step.kind


# the fast bias update's int32 sums: positions x 2^15 < 2^31
BIAS_FAST_MAX_POSITIONS = 65_535

# the pointwise input gradient's int32 half-sums: out_c x 2^15 x 2^7 < 2^31 (POINTWISE_MAX_OUT_C in the C)
POINTWISE_MAX_OUT_C = 511


def is_pointwise(graph: Graph, op: Op) -> bool:
    """A 1 x 1 conv with stride 1, no padding and groups 1 (its input gradient needs no window arithmetic), whose
    output channels keep the fast pointwise input gradient's int32 half-sums exact."""
    cout, kh, kw, _ = graph.tensors[op.inputs[1]].shape
    return (kh, kw) == (1, 1) and tuple(op.attrs["stride"]) == (1, 1) and not any(op.attrs["padding"]) \
        and op.attrs["groups"] == 1 and cout <= POINTWISE_MAX_OUT_C


def step_stack_bytes(plan, fast: bool = True) -> int:
    """The stack a training step needs: STEP_STACK_BASE + the deepest of its kernels, rounded up to 8 bytes."""
    deepest = max((KERNEL_STACK_BYTES[step_kernel(plan, s, fast)] for s in plan.steps), default=0)
    return -(-(STEP_STACK_BASE + deepest) // 8) * 8


# ---- the whole footprint ----------------------------------------------------------------------------------------

def gradient_count(plan) -> int:
    """Gradient buffers of the plan: one exponent each in the runtime's table."""
    return len({name for s in plan.steps for name in s.writes if name.startswith("grad:")})


def runtime_static_bytes(plan) -> int:
    """The runtime's RAM besides arena and scratch: the exponent table (int32 per gradient) and the train state."""
    return 4 * max(1, gradient_count(plan)) + _STRUCT_BYTES["train_state"]


def _op_constant_bytes(graph: Graph, op: Op) -> int:
    if op.kind == "conv2d":
        cout = graph.tensors[op.inputs[1]].shape[0]
        weights = graph.tensors[op.inputs[1]].nbytes
        return weights + 4 * cout * 3 + _STRUCT_BYTES["conv2d_params"]  # bias, multiplier, shift
    if op.kind == "lut":  # 256 int8 values and 256 int16 derivatives
        return 256 + 2 * 256 + _STRUCT_BYTES["lut_params"]
    if op.kind == "cat":  # a 256-entry int8 requantization table per input
        return 256 * len(op.inputs) + _STRUCT_BYTES["cat_params"]
    return {"add": _STRUCT_BYTES["add_params"], "avgpool2d": _STRUCT_BYTES["pool2d_params"],
            "maxpool2d": _STRUCT_BYTES["pool2d_params"], "clamp": _STRUCT_BYTES["clamp_params"],
            "mul": _STRUCT_BYTES["mul_params"]}.get(op.kind, 0)


def _step_constant_bytes(plan, step) -> int:
    b = _STRUCT_BYTES
    if step.kind == "forward":
        return b["op"] * 2  # its row in the training table and in the forward-only table
    extra = {"mask_bits": b["grad_mask_params"], "grad_mask": b["grad_mask_params"], "grad_add": 0,
             "avgpool2d_input_grad": 0, "maxpool2d_input_grad": 0, "lut_input_grad": 0,
             "cat_input_grad": b["operand_grad_params"], "mul_input_grad": b["operand_grad_params"]}.get(step.kind)
    if step.kind == "loss_grad":
        extra = b["mse_params"] if plan.loss == "mse" else b["loss_params"] + 2 * len(plan.exp_table)
    elif step.kind == "conv2d_input_grad":
        extra = b["input_grad_params"] + 4 * len(plan.backprop_scale[step.attrs["op"]][0])
    elif step.kind in ("conv2d_weight_update", "conv2d_bias_update"):
        update = plan.updates[step.attrs["op"]]
        m = update.weight_m if step.kind == "conv2d_weight_update" else update.bias_m
        extra = b["update_params"] + 8 * len(m)
    return b["op"] + b["step_params"] + extra


def constant_flash_bytes(plan) -> int:
    """The plan's constants as the generated model.c holds them in flash: every weight and bias (the trainable
    rows' initial values too), requantization and update constants, params structs and the op tables."""
    graph = plan.graph
    ops = sum(_op_constant_bytes(graph, op) for op in graph.ops)
    steps = sum(_step_constant_bytes(plan, s) for s in plan.steps)
    tables = 2 * _STRUCT_BYTES["graph"] + _STRUCT_BYTES["trainable_entry"] * max(1, len(plan.trainable_buffers()))
    return ops + steps + tables


def plan_footprint(plan, fast: bool = True) -> dict[str, int]:
    """RAM and flash of a training plan on the device, by part (see the module's docstring)."""
    scratch = plan_scratch_bytes(plan, fast)
    static = runtime_static_bytes(plan)
    constants = constant_flash_bytes(plan)
    stack = step_stack_bytes(plan, fast)
    return dict(arena_bytes=plan.arena_size, scratch_bytes=scratch, runtime_static_bytes=static,
                stack_bytes=stack, device_ram_bytes=plan.arena_size + scratch + static + stack,
                constant_flash_bytes=constants, code_flash_bytes=RUNTIME_CODE_BYTES,
                device_flash_bytes=constants + RUNTIME_CODE_BYTES)


def describe(plan, fast: bool = True) -> list[str]:
    """The memory report `fedtiny compile` prints: RAM and flash by part, against the budget."""
    report = plan.memory_report()
    biggest = max(plan.steps, key=lambda s: step_scratch_bytes(plan, s, fast))
    scratch_of = f" (for {biggest.kind} of op {biggest.attrs['op']})" if report["scratch_bytes"] else ""
    available = plan.budget - plan.reserve
    return [
        f"device RAM: {report['device_ram_bytes']:,} B of {available:,} B (budget {plan.budget:,} B minus "
        f"{plan.reserve:,} B reserved for the network stack)",
        f"  arena {report['arena_bytes']:,} B (trainable rows and biases {report['trainable_sram_bytes']:,} B, "
        f"activations and gradients {report['activation_and_gradient_bytes']:,} B)",
        f"  kernel scratch {report['scratch_bytes']:,} B{scratch_of}",
        *([f"  {recomputed} conv input gradient(s) recompute their sums to fit the budget (less scratch, twice "
           "their MACs)"] if (recomputed := sum(1 for s in plan.steps if s.attrs.get("recompute"))) else []),
        f"  stack {report['stack_bytes']:,} B, runtime statics {report['runtime_static_bytes']:,} B",
        (f"personalised model kept between rounds: {report['personal_model_bytes']:,} B more RAM"
         if report["personal_model_bytes"] else
         "no personalised model kept between rounds: the budget does not hold its copy beside the training step "
         "(the device predicts with the global model)"),
        f"device flash: {report['device_flash_bytes']:,} B",
        f"  constants {report['constant_flash_bytes']:,} B (weights, biases, requantization and update constants, "
        f"op tables), runtime code {report['code_flash_bytes']:,} B",
    ]


# ---- a node's privacy buffers (device_runtime/c/firmware_node.c, fedtiny_device.node_project) -------------------

# sizeof(fedtiny_node_secagg) on the Cortex-M4 (fedtiny_node_secagg.h): one round's secrets, its 64 neighbours' ids,
# keys, share keys and held shares, the unmask request, the trained round's numbers, bounds and moduli of 64
# buffers, and the 5.2 KB stage buffer (the sealed SECAGG_SHARES to 64 neighbours). It does not depend on the plan;
# tests/test_node_memory.py holds it to the linker's symbol. Update it when the struct changes.
NODE_SECAGG_STATE_BYTES = 15_532


def _trainable_elements(plan) -> int:
    return sum(int(np.prod(plan.buffers[n].shape, dtype=np.int64)) for n in plan.trainable_buffers())


def secagg_buffer_bytes(plan) -> tuple[int, int]:
    """(upload, reassembly) a secure-aggregation node needs at least: the largest sealed masked DELTA (every value
    at 32 bits: messages.MaskedDelta's head, a modulus byte per buffer padded to 4, 4 bytes per element), and the
    largest stage downlink (SECAGG_PEERS of 64 neighbours) behind the largest TASK; the C node's
    fedtiny_node_sizes_secagg_of. A plain node's buffers (update.max_delta_envelope_bytes,
    downlink_reassembly_bytes) may be larger: the node takes the larger of each."""
    from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, TAG_SIZE
    from fedtiny.protocol.messages import MaskedDelta
    from fedtiny.protocol.secagg import MAX_STAGE_ENVELOPE
    from fedtiny.protocol.update import MAX_TASK_ENVELOPE

    head = -(-(MaskedDelta.HEAD.size + len(plan.trainable_buffers())) // 4) * 4
    masked = HEADER_SIZE + head + 4 * _trainable_elements(plan) + TAG_SIZE + SIGNATURE_SIZE
    return masked, MAX_STAGE_ENVELOPE + MAX_TASK_ENVELOPE


def privacy_ram_bytes(plan, noise: bool, secagg: bool) -> dict[str, int]:
    """The RAM a node of this plan adds for device noise (the sent delta as int32 while its noise is added: the
    values buffer) and for secure aggregation (the values buffer, where it is also masked, and the round's state);
    the larger message buffers of secure aggregation are node_project.buffer_sizes'. Zeros for what is not asked."""
    values = 4 * _trainable_elements(plan) if noise or secagg else 0
    return dict(noise_values_bytes=values, secagg_state_bytes=NODE_SECAGG_STATE_BYTES if secagg else 0)
