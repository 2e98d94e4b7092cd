"""Training plans on disk: the model graph plus steps, buffers and arena offsets, in the fedtiny container
(kind PLAN). Loading re-checks the plan as the compiler left it: known steps, every buffer placed, and no two
buffers alive at once sharing a byte, so a damaged or hand-edited plan cannot corrupt a device's memory."""

import hashlib
from dataclasses import asdict
from pathlib import Path

from .arena import ArenaPlan, check_plan
from .compiler import LOSSES, BufferSpec, LayerUpdate, Plan, Step, buffer_lifetimes
from .fileformat import FileFormatError, dumps, load, save
from .modelfile import _header as model_header
from .modelfile import graph_from

KIND = b"PLAN"
STEP_KINDS = ("forward", "mask_bits", "loss_grad", "grad_add", "grad_mask", "conv2d_input_grad",
              "conv2d_weight_update", "conv2d_bias_update", "avgpool2d_input_grad", "maxpool2d_input_grad",
              "lut_input_grad", "cat_input_grad", "mul_input_grad")


def _header(plan: Plan) -> dict:
    return dict(
        model=model_header(plan.graph),
        plan=dict(scheme=plan.scheme, lr=plan.lr, qas=plan.qas, budget=plan.budget, reserve=plan.reserve,
                  arena_size=plan.arena_size, exp_table=plan.exp_table, storage=plan.storage, offsets=plan.offsets,
                  steps=[asdict(s) for s in plan.steps],
                  buffers={n: dict(shape=list(b.shape), dtype=b.dtype, persistent=b.persistent)
                           for n, b in plan.buffers.items()},
                  updates=[asdict(u) for u in plan.updates.values()],
                  backprop_scale=[[op, ws, k] for op, (ws, k) in plan.backprop_scale.items()]))


def save_plan(plan: Plan, path: str | Path) -> None:
    save(path, KIND, _header(plan), {t.name: t.data for t in plan.graph.constants})


def plan_hash(plan: Plan) -> bytes:
    """SHA-256 of the plan's file bytes: the identity a device announces in JOIN and the coordinator checks."""
    return hashlib.sha256(dumps(KIND, _header(plan), {t.name: t.data for t in plan.graph.constants})).digest()


def load_plan(path: str | Path) -> Plan:
    header, arrays = load(path, KIND)
    source = str(path)
    graph = graph_from(header.get("model", {}), arrays, source) if "model" in header else None
    try:
        if graph is None:
            raise KeyError("model")
        p = header["plan"]
        steps = [Step(s["kind"], list(s["reads"]), list(s["writes"]), dict(s["attrs"])) for s in p["steps"]]
        buffers = {n: BufferSpec(tuple(b["shape"]), b["dtype"], bool(b["persistent"])) for n, b in p["buffers"].items()}
        plan = Plan(graph, p["scheme"], steps, buffers, dict(p["storage"]), {k: int(v) for k, v in p["offsets"].items()},
                    int(p["arena_size"]), {u["op"]: LayerUpdate(**u) for u in p["updates"]},
                    {int(op): (list(ws), int(k)) for op, ws, k in p["backprop_scale"]}, list(p["exp_table"]),
                    float(p["lr"]), bool(p["qas"]), int(p["budget"]), int(p["reserve"]))
        for s in steps:
            if s.kind not in STEP_KINDS:
                raise ValueError(f"unknown step {s.kind!r}")
            for name in s.reads + s.writes:
                if name not in buffers and name not in graph.tensors:
                    raise ValueError(f"step {s.kind} uses {name!r}, which is neither a buffer nor a model tensor")
            if "op" in s.attrs and not 0 <= s.attrs["op"] < len(graph.ops):
                raise ValueError(f"step {s.kind} names op {s.attrs['op']}, which does not exist")
        if set(buffers) - set(plan.offsets):
            raise ValueError(f"buffers without an arena offset: {sorted(set(buffers) - set(plan.offsets))}")
        loss_steps = [s for s in steps if s.kind == "loss_grad"]
        if len(loss_steps) != 1:
            raise ValueError(f"a plan needs exactly one loss_grad step, found {len(loss_steps)}")
        if plan.loss not in LOSSES:
            raise ValueError(f"unknown loss {plan.loss!r}")
        if plan.loss == "mse":
            m, exponent = loss_steps[0].attrs["m"], loss_steps[0].attrs["exponent"]
            if not (isinstance(m, int) and isinstance(exponent, int) and 2**14 <= m < 2**15):
                raise ValueError(f"the MSE constant must be m in [2^14, 2^15) and an integer exponent, "
                                 f"got {m}, {exponent}")
        elif len(plan.exp_table) != 256:
            raise ValueError("the softmax table must have 256 entries")
        check_plan(ArenaPlan(plan.offsets, plan.arena_size, buffer_lifetimes(plan)))
    except FileFormatError:
        raise
    except (AssertionError, KeyError, TypeError, ValueError) as err:
        raise FileFormatError(f"{source}: invalid training plan: {err}") from err
    return plan
