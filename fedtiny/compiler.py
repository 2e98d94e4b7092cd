"""The training compiler: int8 graph + update scheme -> a training plan that fits the device's memory.

Passes, in order:
  1. trainable  which layers update which weight rows and biases (the scheme), and the SRAM copies of those;
  2. autodiff   walk the graph backwards applying one rule per op (BACKWARD below); a gradient is made only
                for tensors that lie between a trainable tensor and the loss, so frozen paths are pruned;
  3. saving     a forward activation stays alive only if a backward step reads it; where a backward step
                needs only where a ReLU/clamp let values through, one bit per element is saved instead;
  4. updates    each weight/bias update is placed right after its gradient sums, in place, so no gradient
                buffer of a parameter ever exists; QAS factors and learning rate are folded into integers;
  5. planning   every buffer of the step (forward, backward, update) gets an offset in one arena by lifetime;
                the device's RAM (arena + the C kernels' scratch + runtime statics + stack, fedtiny.device_memory)
                must fit the budget minus the reserve: where it does not, conv input gradients recompute their sums
                instead of keeping them (less scratch, more time); else compilation fails naming those parts.
The plan's steps are what the reference trainer (fedtiny_device.trainer) and the C runtime execute.
"""

import ast
import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .arena import ArenaPlan, Buffer, check_plan, plan_arena
from .arith import quantize_multiplier_q15
from .device_memory import check_accumulators, choose_recompute, plan_footprint, step_scratch_bytes
from .ir import DTYPES, Graph, Tensor
from .scheme import Scheme, layers

LOSSES = ("cross_entropy", "mse")
TRAINING_SOURCES = ("arith.py", "kernels.py", "scheme.py", "compiler.py")  # what decides a plan's integer training


def code_digest(source: str) -> str:
    """A digest of Python source's syntax tree without its docstrings: the same for a changed comment, docstring or
    layout, different for changed code."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@lru_cache(maxsize=1)
def training_semantics() -> str:
    """A digest of the code that decides what int8 training computes from a graph (the arithmetic and its rounding
    draw, the kernels, the scheme, the backward rules and update constants; the C runtime equals them by test).
    Caches of training results (the lr trials, the scheme search) key on it: a changed rounding or update rule
    must never reuse scores the old one gave, or a warm machine and a fresh one choose differently; a reworded
    comment or message keeps them."""
    folder = Path(__file__).parent
    parts = [f"{name}:{code_digest((folder / name).read_text())}" for name in TRAINING_SOURCES]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16]


DEFAULT_BUDGET = 256 * 1024
DEFAULT_RESERVE = 64 * 1024  # network stack (MQTT client, TLS/PSK, ChaCha20-Poly1305), the rest of the firmware
# and its stack; the training step's own RAM (arena, scratch, runtime statics, step stack) is the plan's


class BudgetError(ValueError):
    """The plan does not fit the device's memory budget."""


def _size(n: int) -> str:
    return f"{n // 1024} KB" if n % 1024 == 0 else f"{n:,} bytes"


def reserve_for(budget: int, reserve: int | None = None) -> tuple[int, str | None]:
    """The SRAM a plan leaves for the network stack and firmware stack, and a note when the default was scaled.

    A given `reserve` must be below the budget. Without one: DEFAULT_RESERVE, but at most a quarter of the
    budget, so a small device (64 KB: 16 KB reserved, 48 KB to train in) gets a plan instead of an error.
    """
    if budget <= 0:
        raise BudgetError(f"the budget must be positive, got {budget} bytes")
    if reserve is not None:
        if not 0 <= reserve < budget:
            raise BudgetError(f"the reserve ({_size(reserve)}) must be smaller than the budget ({_size(budget)}): "
                              "lower the reserve or raise the budget")
        return reserve, None
    scaled = min(DEFAULT_RESERVE, budget // 4)
    if scaled == DEFAULT_RESERVE:
        return scaled, None
    return scaled, (f"reserve {_size(scaled)}: a quarter of the {_size(budget)} budget, as the default "
                    f"{_size(DEFAULT_RESERVE)} does not fit (--reserve sets it)")


@dataclass
class Step:
    kind: str
    reads: list[str]
    writes: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class BufferSpec:
    shape: tuple[int, ...]
    dtype: str
    persistent: bool = False  # trainable copies live across steps

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(DTYPES[self.dtype]).itemsize


@dataclass
class LayerUpdate:
    """Integer constants of one trainable layer (graph op index `op`)."""
    op: int
    channels: int  # weight rows [0, channels) train
    bias: bool
    weight_m: list[int]  # per output channel: weight delta = S_w * m * 2^(shift - 15 + e_grad)
    weight_shift: list[int]
    bias_m: list[int]
    bias_shift: list[int]


@dataclass
class Plan:
    graph: Graph
    scheme: str
    steps: list[Step]
    buffers: dict[str, BufferSpec]
    storage: dict[str, str]  # activation -> the buffer holding its bytes (a reshape's output is its input's)
    offsets: dict[str, int]
    arena_size: int
    updates: dict[int, LayerUpdate]
    backprop_scale: dict[int, tuple[list[int], int]]  # conv op -> (ws[o] = round(s_w[o] * 2^K), K)
    exp_table: list[int]  # round(2^15 * exp(-s_logits * i)), i = 0..255, for the softmax gradient (empty for MSE)
    lr: float
    qas: bool
    budget: int
    reserve: int

    @property
    def loss(self) -> str:
        """The loss the plan trains with, from its loss_grad step (plans from before MSE mean cross-entropy)."""
        step = next(s for s in self.steps if s.kind == "loss_grad")
        return step.attrs.get("loss", "cross_entropy")

    def trainable_buffers(self) -> list[str]:
        return [name for name, spec in self.buffers.items() if spec.persistent]

    def initial_state(self) -> dict[str, np.ndarray]:
        """The trainable state a freshly flashed device starts from (model version 0): the model's own values."""
        return {name: np.array(self.graph.tensors[name[len("train:"):]].data[: self.buffers[name].shape[0]],
                               dtype=DTYPES[self.buffers[name].dtype]) for name in self.trainable_buffers()}

    def graph_with(self, state: dict[str, np.ndarray]) -> Graph:
        """The model with trainable rows and biases taken from `state` (the rest stays as flashed)."""
        tensors = dict(self.graph.tensors)
        for name, rows in state.items():
            t = self.graph.tensors[name[len("train:"):]]
            data = t.data.copy()
            data[: len(rows)] = rows
            tensors[t.name] = Tensor(t.name, t.shape, t.dtype, t.scale, t.zero_point, data)
        g = self.graph
        return Graph(tensors, g.ops, g.inputs, g.outputs, dict(g.meta))

    def memory_report(self) -> dict:
        """The device's RAM and flash for this plan, by part (fedtiny.device_memory.plan_footprint: arena, C
        scratch, runtime statics and stack; constants and code), with the budget, and the RAM of the device's
        personalised model (`personal_model_bytes`, 0 where the budget does not hold it). `flash_bytes` is the smaller
        figure a node announces in JOIN (frozen constants and the plan's integer constants, without code or the
        trainable rows' initial values)."""
        trainable = sum(self.buffers[b].nbytes for b in self.trainable_buffers())
        frozen = sum(t.nbytes for t in self.graph.constants) - trainable
        params = sum(8 * len(op.attrs["multiplier"]) for op in self.graph.ops if op.kind == "conv2d")
        update_consts = sum(4 * (len(u.weight_m) + len(u.bias_m)) * 2 for u in self.updates.values())
        footprint = plan_footprint(self)
        # The device's personalised model (protocol.device.NodeState.personal): a copy of the trainable state in the
        # state layout (each buffer 4-byte aligned, codegen.state_layout), held in RAM beside the training step for
        # as long as the device lives. Kept where the budget holds both, else none (0): such a device predicts with
        # the global model. No plan is refused for it.
        personal = sum(-(-self.buffers[b].nbytes // 4) * 4 for b in self.trainable_buffers())
        if footprint["device_ram_bytes"] + personal > self.budget - self.reserve:
            personal = 0
        return dict(footprint, trainable_sram_bytes=trainable, personal_model_bytes=personal,
                    activation_and_gradient_bytes=self.arena_size - trainable,
                    flash_bytes=frozen + params + update_consts + 2 * len(self.exp_table),
                    budget_bytes=self.budget, reserve_bytes=self.reserve)


def grad_name(tensor: str) -> str:
    return f"grad:{tensor}"


def train_name(tensor: str) -> str:
    return f"train:{tensor}"


def _trainable(graph: Graph, scheme: Scheme) -> dict[int, tuple[int, bool]]:
    """graph op index -> (trainable weight rows, bias trains) for every layer that trains anything."""
    layer_ops = layers(graph)
    result = {}
    for layer, i in enumerate(layer_ops):
        cout = graph.tensors[graph.ops[i].inputs[1]].shape[0]
        rows, bias = scheme.weight_channels(layer, cout), scheme.trains_bias(layer, len(layer_ops))
        if rows or bias:
            result[i] = (rows, bias)
    return result


def _update_constants(graph: Graph, i: int, rows: int, bias: bool, lr: float, qas: bool) -> LayerUpdate:
    """QAS: delta_Wq = lr * G_W / s_w and delta_bq = lr * G_b / (s_x s_w): the fp32 SGD step in integer units,
    which is the paper's G_W * s_w^-2 and G_b * (s_w s_x)^-2 on the int tensors' own gradients. Without QAS
    the int tensors take their raw gradients (G_Wq = s_w G_W, G_bq = s_x s_w G_b), as naive int8 SGD does."""
    op = graph.ops[i]
    s_x = float(graph.tensors[op.inputs[0]].scale[0])
    s_w = graph.tensors[op.inputs[1]].scale
    # Weight sums are S_w = sum g * (x - zx) at scale 2^e * s_x; bias sums S_b = sum g at scale 2^e.
    w_factor = lr * s_x / s_w if qas else lr * s_x * s_w * s_w
    b_factor = lr / (s_x * s_w) if qas else lr * s_x * s_w
    wq = [quantize_multiplier_q15(float(f)) for f in w_factor[:rows]]
    bq = [quantize_multiplier_q15(float(f)) for f in b_factor] if bias else []
    return LayerUpdate(i, rows, bias, [m for m, _ in wq], [s for _, s in wq], [m for m, _ in bq], [s for _, s in bq])


def _backprop_scale(s_w: np.ndarray) -> tuple[list[int], int]:
    """s_w as integers with 15 bits for the largest: ws[o] = round(s_w[o] * 2^K)."""
    _, exponent = np.frexp(float(s_w.max()))
    k = 15 - int(exponent)
    return [int(v) for v in np.round(s_w * 2.0**k).astype(np.int64)], k


def mse_constant(s_y: float, k: int) -> tuple[int, int]:
    """dL/dy_k = 2 (y_k - t_k) / K = c d_k with c = 2 s_y / K and d_k = y_q - t_q: c as (m, exponent) with m in
    [2^14, 2^15) and c ~= m 2^(exponent - 15), the same 15-bit form as the update factors."""
    return quantize_multiplier_q15(2.0 * s_y / k)


def mask_bounds(op) -> tuple[int, int] | None:
    """Exclusive int8 bounds inside which the op's activation passes gradients, or None if it has no activation.
    ReLU clips at real zero (act_min); ReLU6 also at real six (act_max); int8 saturation is straight-through."""
    activation = op.attrs.get("activation", "none")
    if activation == "none":
        return None
    return op.attrs["act_min"], op.attrs["act_max"] if activation == "relu6" else 128


def _autodiff(graph: Graph, trainable: dict[int, tuple[int, bool]]) -> tuple[list[Step], set[str]]:
    """Backward steps for the tensors between trainable tensors and the loss. Returns (steps, masked outputs)."""
    needs_grad: set[str] = set()
    for i, op in enumerate(graph.ops):
        if i in trainable or any(name in needs_grad for name in op.inputs):
            needs_grad.add(op.outputs[0])
    contributions: dict[str, list[str]] = defaultdict(list)
    shared: dict[str, int] = defaultdict(int)  # a gradient buffer handed to several tensors must not be masked in place
    steps: list[Step] = []
    out = graph.outputs[0]
    steps.append(Step("loss_grad", [out], [grad_name(out)]))
    contributions[out].append(grad_name(out))

    def hand_on(tensor: str, buffer: str):
        if tensor in needs_grad:
            contributions[tensor].append(buffer)
            shared[buffer] += 1

    for i in reversed(range(len(graph.ops))):
        op = graph.ops[i]
        y = op.outputs[0]
        if y not in needs_grad:
            continue
        parts = contributions.pop(y)
        g_y = parts[0]
        if len(parts) > 1:  # a fan-out: sum what each reader sent back
            g_y = grad_name(y)
            steps.append(Step("grad_add", parts, [g_y]))
        bounds = mask_bounds(op)
        if bounds is not None:
            masked = g_y if shared[g_y] <= 1 else f"{grad_name(y)}~masked"
            steps.append(Step("grad_mask", [g_y, y], [masked], dict(op=i, mask_min=bounds[0], mask_max=bounds[1])))
            g_y = masked
        x = op.inputs[0]
        if op.kind == "conv2d":
            rows, bias = trainable.get(i, (0, False))
            w_train = [train_name(op.inputs[1])] if rows else []
            if x in needs_grad:
                g_x = f"{grad_name(x)}@{i}"
                steps.append(Step("conv2d_input_grad", [g_y] + w_train, [g_x], dict(op=i)))
                hand_on(x, g_x)
            if rows:
                steps.append(Step("conv2d_weight_update", [g_y, x] + w_train, w_train, dict(op=i, channels=rows)))
            if bias:
                b_train = [train_name(op.inputs[2])]
                steps.append(Step("conv2d_bias_update", [g_y] + b_train, b_train, dict(op=i)))
        elif op.kind in ("avgpool2d", "maxpool2d"):
            g_x = f"{grad_name(x)}@{i}"
            reads = [g_y, x] if op.kind == "maxpool2d" else [g_y]
            steps.append(Step(f"{op.kind}_input_grad", reads, [g_x], dict(op=i)))
            hand_on(x, g_x)
        elif op.kind == "lut":
            g_x = f"{grad_name(x)}@{i}"
            steps.append(Step("lut_input_grad", [g_y, x], [g_x], dict(op=i)))
            hand_on(x, g_x)
        elif op.kind == "cat":  # each input gets its part of the gradient
            for k, name in enumerate(op.inputs):
                if name in needs_grad:
                    g_x = f"{grad_name(name)}@{i}.{k}"
                    steps.append(Step("cat_input_grad", [g_y], [g_x], dict(op=i, input=k)))
                    hand_on(name, g_x)
        elif op.kind == "mul":  # each input's gradient is g_y times the other input's real value
            for k, name in enumerate(op.inputs):
                if name in needs_grad:
                    g_x = f"{grad_name(name)}@{i}.{k}"
                    steps.append(Step("mul_input_grad", [g_y, op.inputs[1 - k]], [g_x], dict(op=i, input=k)))
                    hand_on(name, g_x)
        else:  # add, clamp, reshape: the (masked) gradient passes on unchanged to every input
            for name in op.inputs:
                hand_on(name, g_y)
    return steps, needs_grad


def compile_plan(graph: Graph, scheme: Scheme, *, lr: float = 0.05, qas: bool = True, budget: int = DEFAULT_BUDGET,
                 reserve: int | None = None, loss: str = "cross_entropy") -> Plan:
    """loss: "cross_entropy" (class labels, logits of shape (1, 1, K)) or "mse" (int8 targets in the output's
    quantization, any output shape: the flattened output is the K values)."""
    reserve, _ = reserve_for(budget, reserve)  # the default rule, as the CLI's; a given one must be below budget
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    out = graph.tensors[graph.outputs[0]]
    if loss == "cross_entropy" and out.shape[:2] != (1, 1):
        raise ValueError(f"cross-entropy training needs logits of shape (1, 1, K), got {out.shape}")
    trainable = _trainable(graph, scheme)
    backward, _ = _autodiff(graph, trainable)
    s_y = float(out.scale[0])
    if loss == "mse":  # backward[0] is the loss_grad step; its attrs carry the loss and its constants
        m, exponent = mse_constant(s_y, int(np.prod(out.shape)))
        backward[0].attrs.update(loss="mse", m=m, exponent=exponent)
        exp_table = []  # the softmax table is only for cross-entropy
    else:
        backward[0].attrs["loss"] = "cross_entropy"
        exp_table = [int(v) for v in np.round(32768 * np.exp(-s_y * np.arange(256)))]

    # Saving: the mask of an op's clamp is read from its int8 output if a backward step keeps that output
    # anyway (a weight update's input, the logits); otherwise one bit per element is saved in the forward pass.
    kept_by_backward = {name for s in backward if s.kind != "grad_mask" for name in s.reads
                        if name in graph.tensors}
    bit_masked = set()
    for s in backward:
        if s.kind == "grad_mask" and s.reads[1] not in kept_by_backward:
            y = s.reads[1]
            s.reads[1] = f"{y}.mask"
            s.attrs["bits"] = True
            bit_masked.add(y)

    alias = {n: n for n in graph.inputs}
    forward = []
    for i, op in enumerate(graph.ops):
        y = op.outputs[0]
        if op.kind == "reshape":
            alias[y] = alias[op.inputs[0]]  # same bytes, new shape: no step, no buffer
            continue
        alias[y] = y
        rows, _ = trainable.get(i, (0, False))
        train_reads = [train_name(n) for n, used in ((op.inputs[1], rows), (op.inputs[2], trainable.get(i, (0, False))[1]))
                       if used] if op.kind == "conv2d" else []
        forward.append(Step("forward", [n for n in op.inputs if n in alias] + train_reads, [y], dict(op=i)))
        if y in bit_masked:
            lo, hi = mask_bounds(op)
            forward.append(Step("mask_bits", [y], [f"{y}.mask"], dict(op=i, mask_min=lo, mask_max=hi)))
    steps = forward + backward
    for s in steps:  # every name a step touches, resolved to the buffer that holds its bytes
        s.reads = [alias.get(n, n) for n in s.reads]
        s.writes = [alias.get(n, n) for n in s.writes]

    buffers: dict[str, BufferSpec] = {}
    for name in alias.values():
        buffers[name] = BufferSpec(graph.tensors[name].shape, "int8")
    for y in bit_masked:
        buffers[f"{y}.mask"] = BufferSpec((math.ceil(int(np.prod(graph.tensors[y].shape)) / 8),), "uint8")
    for s in backward:
        for name in s.writes:
            if name.startswith("grad:"):
                tensor = name[len("grad:"):].split("@")[0].split("~")[0]
                buffers.setdefault(name, BufferSpec(graph.tensors[tensor].shape, "int16"))
    updates, backprop_scale = {}, {}
    for i, (rows, bias) in trainable.items():
        op = graph.ops[i]
        w, b = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
        if rows:
            buffers[train_name(w.name)] = BufferSpec((rows,) + tuple(w.shape[1:]), "int8", persistent=True)
        if bias:
            buffers[train_name(b.name)] = BufferSpec(tuple(b.shape), "int32", persistent=True)
        updates[i] = _update_constants(graph, i, rows, bias, lr, qas)
    for s in backward:
        if s.kind == "conv2d_input_grad":
            op = graph.ops[s.attrs["op"]]
            backprop_scale[s.attrs["op"]] = _backprop_scale(graph.tensors[op.inputs[1]].scale)

    plan = Plan(graph, scheme.name, steps, buffers, alias, {}, 0, updates, backprop_scale, exp_table,
                lr, qas, budget, reserve)
    arena = plan_arena(buffer_lifetimes(plan))
    check_plan(arena)
    plan.offsets, plan.arena_size = arena.offsets, arena.size
    check_accumulators(plan)
    choose_recompute(plan, budget - reserve)
    if plan_footprint(plan)["device_ram_bytes"] > budget - reserve:
        raise BudgetError(_over_budget_message(plan, arena))
    return plan


def buffer_lifetimes(plan: Plan) -> list[Buffer]:
    """Each buffer's [first, last] step; trainable copies live through the whole step (and between steps)."""
    first, last = {}, {}
    for index, step in enumerate(plan.steps):
        for name in step.writes + step.reads:
            first.setdefault(name, index)
            last[name] = index
    end = len(plan.steps) - 1
    return [Buffer(n, b.nbytes, 0 if b.persistent else first.get(n, 0), end if b.persistent else last.get(n, 0))
            for n, b in plan.buffers.items()]


def _over_budget_message(plan: Plan, arena: ArenaPlan) -> str:
    ram = plan_footprint(plan)
    peak = arena.peak_step()
    live = sorted(arena.live_at(peak), key=lambda b: -b.size)[:5]
    names = ", ".join(f"{b.name} ({b.size} B)" for b in live)
    biggest = max(range(len(plan.steps)), key=lambda j: step_scratch_bytes(plan, plan.steps[j]))
    return (f"the training plan needs {ram['device_ram_bytes']} bytes of RAM but the budget leaves "
            f"{plan.budget - plan.reserve} ({plan.budget} minus {plan.reserve} reserved for the network stack): "
            f"arena {ram['arena_bytes']} B (at its peak, step {peak}, {plan.steps[peak].kind}, the largest live "
            f"tensors are {names}), kernel scratch {ram['scratch_bytes']} B (for step {biggest}, "
            f"{plan.steps[biggest].kind}), stack {ram['stack_bytes']} B, runtime statics "
            f"{ram['runtime_static_bytes']} B"
            + ("; conv input gradients already recompute their sums" if any(s.attrs.get("recompute") for s in
                                                                            plan.steps) else "")
            + ". Train fewer layers or channels, or raise --budget.")
