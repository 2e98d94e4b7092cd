"""Reference trainer: executes a training plan's steps, batch 1, inside one fixed-size arena.

Every plan buffer (activations, saved masks, gradients, the SRAM copies of trainable rows) is a view into
`self.arena` at the offset the compiler chose, so a planning mistake corrupts values here exactly as it would
on the device. The state a node keeps between steps is the trainable buffers plus the random counter.
"""

import numpy as np

from fedtiny import kernels
from fedtiny.arith import cross_entropy_loss, narrow_to_int16, stochastic_update, update_bits, update_draws
from fedtiny.compiler import Plan, train_name
from fedtiny.interpreter import FORWARD
from fedtiny.ir import DTYPES, Graph


def mse_target(plan: Plan, target) -> np.ndarray:
    """One MSE target as the flat int8 K values the device reads (the output's shape or flat K accepted)."""
    out = plan.graph.tensors[plan.graph.outputs[0]]
    t = np.asarray(target)
    if t.dtype != np.int8 or t.size != int(np.prod(out.shape)):
        raise ValueError(f"an MSE target must be int8 with the output's {int(np.prod(out.shape))} values "
                         f"(shape {out.shape} or flat), got {t.dtype} {t.shape}; see quantize_target")
    return t.reshape(-1)


def mse_loss(plan: Plan, squared_error: int) -> float:
    """mean((s_y d)^2) on the host from the exact sum of d^2 (d = y_q - t_q): the same float operations for the
    Python and the C trainer, which reports only that sum."""
    out = plan.graph.tensors[plan.graph.outputs[0]]
    s_y = float(out.scale[0])
    return s_y * s_y * squared_error / int(np.prod(out.shape))


class Trainer:
    def __init__(self, plan: Plan, seed: int = 0):
        self.plan = plan
        self.graph = plan.graph
        self.arena = np.zeros(plan.arena_size, dtype=np.uint8)
        # A node's random stream: counter-based, so node `seed` never overlaps another's for 2^40 draws.
        self.rng_counter = (seed & 0xFFFFFF) << 40
        self.exponent: dict[str, int] = {}  # power-of-two exponent of each gradient buffer
        self.record: dict[str, np.ndarray] | None = None  # set to a dict to collect real-valued gradients (tests)
        self.last_label_q15 = 0  # cross-entropy plans: the label's Q15 probability after the last step
        self.last_label_probability = 0.0
        self.last_loss = 0.0  # MSE plans: the last step's loss
        for name in plan.trainable_buffers():  # initial trainable rows come from the model
            self.view(name)[...] = self._constant(name)[: self.plan.buffers[name].shape[0]]

    # --- memory -------------------------------------------------------------------------------------------
    def view(self, name: str, shape=None) -> np.ndarray:
        name = self.plan.storage.get(name, name)
        spec = self.plan.buffers[name]
        offset = self.plan.offsets[name]
        arr = self.arena[offset: offset + spec.nbytes].view(DTYPES[spec.dtype])
        return arr.reshape(shape if shape is not None else spec.shape)

    def _constant(self, train_buffer: str) -> np.ndarray:
        return self.graph.tensors[train_buffer[len("train:"):]].data

    def _param(self, name: str) -> np.ndarray:
        """A weight or bias as the device sees it: trainable rows from SRAM, the rest from flash."""
        data = self.graph.tensors[name].data
        if train_name(name) not in self.plan.buffers:
            return data
        rows = self.view(train_name(name))
        return np.concatenate([rows, data[len(rows):]]) if len(rows) < len(data) else rows

    def _act(self, name: str) -> np.ndarray:
        return self.view(name, (1,) + tuple(self.graph.tensors[name].shape))

    def _grad(self, buffer: str, tensor: str) -> np.ndarray:
        return self.view(buffer, (1,) + tuple(self.graph.tensors[tensor].shape))

    def _store_grad(self, buffer: str, acc: np.ndarray, exponent: int) -> None:
        g, extra = narrow_to_int16(acc)
        self.view(buffer)[...] = g.reshape(self.plan.buffers[buffer].shape)
        self.exponent[buffer] = exponent + extra

    def _random(self, count: int) -> np.ndarray:
        """32 rounding bits for each of an update's `count` elements (arith.update_bits), advancing the counter."""
        bits = update_bits(self.rng_counter, count)
        self.rng_counter += update_draws(count)
        return bits

    # --- one training step --------------------------------------------------------------------------------
    def step(self, x: np.ndarray, label) -> float:
        """Train on one int8 sample (H, W, C) with its class label (cross-entropy), or with its int8 target of the
        output's K values (MSE: the output's shape or flat). Returns the loss: -ln of the label's Q15 probability
        (arith.cross_entropy_loss, exact in integers), or mean((s_y * (y_q - t_q))^2) (mse_loss)."""
        (input_name,) = self.graph.inputs
        self.view(input_name)[...] = x.reshape(self.graph.tensors[input_name].shape)
        if self.plan.loss == "mse":
            self.target = mse_target(self.plan, label)
        else:
            self.label = int(label)
        for s in self.plan.steps:
            getattr(self, f"_{s.kind}")(s)
        if self.plan.loss == "mse":
            return self.last_loss
        return cross_entropy_loss(self.last_label_q15)

    def steps(self, xs: np.ndarray, labels: np.ndarray) -> list[float]:
        """step on each sample in turn; each step's loss (cruntime.CTrainer.steps does the same in one C call)."""
        return [self.step(x, label) for x, label in zip(xs, labels)]

    def _forward(self, s):
        op = self.graph.ops[s.attrs["op"]]
        args = [self._param(n) if self.graph.tensors[n].is_constant else self._act(n) for n in op.inputs]
        self._act(op.outputs[0])[...] = FORWARD[op.kind](self.graph, op, *args)

    def _mask_bits(self, s):
        op = self.graph.ops[s.attrs["op"]]
        y = self._act(op.outputs[0])
        mask = kernels.activation_mask(y, s.attrs["mask_min"], s.attrs["mask_max"])
        self.view(s.writes[0])[...] = np.packbits(mask.reshape(-1), bitorder="little")

    def _loss_grad(self, s):
        if s.attrs.get("loss", "cross_entropy") == "mse":
            y = self._act(s.reads[0])
            g, e = kernels.mse_grad(y, self.target, s.attrs["m"], s.attrs["exponent"])
            d = y.reshape(-1).astype(np.int64) - self.target.astype(np.int64)
            self.last_loss = mse_loss(self.plan, int((d * d).sum()))
            self.view(s.writes[0])[...] = g.reshape(self.plan.buffers[s.writes[0]].shape)
            self.exponent[s.writes[0]] = e
            self._note(s.writes[0], s.reads[0])
            return
        logits = self._act(s.reads[0])
        g, e = kernels.softmax_cross_entropy_grad(logits, self.label, self.plan.exp_table)
        self.last_label_q15 = int(g.reshape(-1)[self.label]) + 32768
        self.last_label_probability = self.last_label_q15 / 32768
        self.view(s.writes[0])[...] = g.reshape(self.plan.buffers[s.writes[0]].shape)
        self.exponent[s.writes[0]] = e
        self._note(s.writes[0], s.reads[0])

    def _grad_add(self, s):
        tensor = self._tensor_of(s.writes[0])
        g, e = self._grad(s.reads[0], tensor), self.exponent[s.reads[0]]
        for other in s.reads[1:]:
            g, e = kernels.add_grads(g, e, self._grad(other, tensor), self.exponent[other])
        self._grad(s.writes[0], tensor)[...] = g
        self.exponent[s.writes[0]] = e

    def _grad_mask(self, s):
        op = self.graph.ops[s.attrs["op"]]
        y = op.outputs[0]
        if s.attrs.get("bits"):
            n = int(np.prod(self.graph.tensors[y].shape))
            mask = np.unpackbits(self.view(s.reads[1]), count=n, bitorder="little").astype(bool)
        else:
            mask = kernels.activation_mask(self._act(y), s.attrs["mask_min"], s.attrs["mask_max"])
        g = self._grad(s.reads[0], y)
        self._grad(s.writes[0], y)[...] = np.where(mask.reshape(g.shape), g, 0)
        self.exponent[s.writes[0]] = self.exponent[s.reads[0]]

    def _conv2d_input_grad(self, s):
        i = s.attrs["op"]
        op = self.graph.ops[i]
        ws, k = self.plan.backprop_scale[i]
        x = self.graph.tensors[op.inputs[0]]
        acc = kernels.conv2d_input_grad(self._grad(s.reads[0], op.outputs[0]), self._param(op.inputs[1]), ws, x.shape,
                                        op.attrs["stride"], op.attrs["padding"], op.attrs["groups"])
        self._store_grad(s.writes[0], acc, self.exponent[s.reads[0]] - k)
        self._note(s.writes[0], x.name)

    def _conv2d_weight_update(self, s):
        i = s.attrs["op"]
        op, upd = self.graph.ops[i], self.plan.updates[i]
        x = self.graph.tensors[op.inputs[0]]
        w = self.graph.tensors[op.inputs[1]]
        g_y, e = self._grad(s.reads[0], op.outputs[0]), self.exponent[s.reads[0]]
        sums = kernels.conv2d_weight_grad(g_y, self._act(x.name), x.zero_point, w.shape[1:3], op.attrs["stride"],
                                          op.attrs["padding"], op.attrs["groups"], upd.channels)
        if self.record is not None:
            self.record[w.name] = sums * 2.0**e * float(x.scale[0])
        per_channel = (slice(None),) + (None,) * 3
        delta = stochastic_update(sums, np.asarray(upd.weight_m)[per_channel], np.asarray(upd.weight_shift)[per_channel],
                                  e, self._random(sums.size))
        rows = self.view(train_name(w.name))
        rows[...] = np.clip(rows.astype(np.int64) - delta, -127, 127)

    def _conv2d_bias_update(self, s):
        i = s.attrs["op"]
        op, upd = self.graph.ops[i], self.plan.updates[i]
        b = self.graph.tensors[op.inputs[2]]
        g_y, e = self._grad(s.reads[0], op.outputs[0]), self.exponent[s.reads[0]]
        sums = kernels.conv2d_bias_grad(g_y, len(b.data))
        if self.record is not None:
            self.record[b.name] = sums * 2.0**e
        delta = stochastic_update(sums, np.asarray(upd.bias_m), np.asarray(upd.bias_shift), e, self._random(sums.size))
        bias = self.view(train_name(b.name))
        bias[...] = np.clip(bias.astype(np.int64) - delta, -(2**31), 2**31 - 1)

    def _avgpool2d_input_grad(self, s):
        op = self.graph.ops[s.attrs["op"]]
        x = self.graph.tensors[op.inputs[0]]
        acc = kernels.avgpool2d_input_grad(self._grad(s.reads[0], op.outputs[0]), x.shape, op.attrs["kernel"],
                                           op.attrs["stride"], op.attrs["padding"])
        self._store_grad(s.writes[0], acc, self.exponent[s.reads[0]] - 15)
        self._note(s.writes[0], x.name)

    def _maxpool2d_input_grad(self, s):
        op = self.graph.ops[s.attrs["op"]]
        x = op.inputs[0]
        acc = kernels.maxpool2d_input_grad(self._grad(s.reads[0], op.outputs[0]), self._act(x), op.attrs["kernel"],
                                           op.attrs["stride"], op.attrs["padding"])
        self._store_grad(s.writes[0], acc, self.exponent[s.reads[0]])
        self._note(s.writes[0], x)

    def _lut_input_grad(self, s):
        op = self.graph.ops[s.attrs["op"]]
        x = op.inputs[0]
        acc = kernels.lut_input_grad(self._grad(s.reads[0], op.outputs[0]), self._act(x), op.attrs["grad_table"])
        self._store_grad(s.writes[0], acc, self.exponent[s.reads[0]] - op.attrs["grad_shift"])
        self._note(s.writes[0], x)

    def _cat_input_grad(self, s):
        op, k = self.graph.ops[s.attrs["op"]], s.attrs["input"]
        shapes = [self.graph.tensors[n].shape for n in op.inputs]
        g = kernels.cat_input_grad(self._grad(s.reads[0], op.outputs[0]), shapes, op.attrs["axis"], k)
        self._grad(s.writes[0], op.inputs[k])[...] = g
        self.exponent[s.writes[0]] = self.exponent[s.reads[0]]
        self._note(s.writes[0], op.inputs[k])

    def _mul_input_grad(self, s):
        op, k = self.graph.ops[s.attrs["op"]], s.attrs["input"]
        x, other = (self.graph.tensors[n] for n in (op.inputs[k], op.inputs[1 - k]))
        m, shift = (op.attrs[f"{'ab'[k]}_grad_{part}"] for part in ("m", "shift"))
        acc = kernels.mul_input_grad(self._grad(s.reads[0], op.outputs[0]), self._act(other.name), other.zero_point,
                                     m, x.shape)
        self._store_grad(s.writes[0], acc, self.exponent[s.reads[0]] - shift)
        self._note(s.writes[0], x.name)

    # --- helpers ------------------------------------------------------------------------------------------
    def _tensor_of(self, buffer: str) -> str:
        return buffer[len("grad:"):].split("@")[0].split("~")[0]

    def _note(self, buffer: str, tensor: str) -> None:
        if self.record is not None:
            self.record[buffer] = self._grad(buffer, tensor).astype(np.float64) * 2.0 ** self.exponent[buffer]

    # --- state a node keeps and exchanges -----------------------------------------------------------------
    def trainable_state(self) -> dict[str, np.ndarray]:
        """The trainable rows/biases (buffer name -> copy), the only values a round changes."""
        return {name: self.view(name).copy() for name in self.plan.trainable_buffers()}

    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        for name in self.plan.trainable_buffers():
            self.view(name)[...] = state[name]

    def export_graph(self) -> Graph:
        """The model with the trained values in place of the original weights and biases."""
        return self.plan.graph_with(self.trainable_state())
