"""On-device training cost: executed Cortex-M4 instructions per training step, MACs, memory, host speed.

Per zoo model (random init with random BatchNorm statistics, quantized on random calibration data, as in
tests/test_ctrainer.py) and scheme: exact executed instructions per training step of the M4 firmware under QEMU
(mps2-an386, our TCG plugin, counted between the markers around each step), MACs per step counted from the plan
(forward + input gradients + weight-gradient sums + bias sums), instructions per MAC, the latency that would give
at 216 MHz assuming 1 instruction per cycle, and the ratio to the paper's 5.1 cycles/MAC (546 ms per image,
23M-MAC MCUNet, 216 MHz Cortex-M7); the device RAM of the step as `fedtiny compile` counts it against the
linker's (the runtime's sections in the map plus the stack the firmware paints); the whole firmware's RAM / flash
(with its newlib, 4 KB heap and 4 KB stack); host training speed of the C build (ctypes), the Python
reference Trainer and PyTorch fp32 batch-1 SGD (the float model, every parameter, one thread).

Then each zoo model's forward pass alone on the M4, with the reference and the fast kernels, and where the fast one's
instructions go by op group (first conv, pointwise and general convs, depthwise, linear, add, pooling).

    python benchmarks/bench_device.py [--steps 5] [--host-seconds 2]
Prints Markdown tables and writes them as BENCHMARKS.md's device section.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn

from fedtiny import zoo
from fedtiny.interpreter import quantize_input
from fedtiny.zoo import randomize_batchnorm
from fedtiny.compiler import compile_plan
from fedtiny.quantize import quantize
from fedtiny.scheme import REFERENCE_SPARSE, parse
from fedtiny import device_memory
from fedtiny_device import codegen, cruntime, footprint, profile
from fedtiny_device.trainer import Trainer

from report import capture, provenance, single_thread, write_section

SECTION = "## Device: training on a Cortex-M4 (QEMU) and on the host in C (issue 4)"

MODELS = {"sensor_cnn": ((1, 256), 4), "mobilenet": ((1, 8, 8), 10), "mlp": ((30,), 2)}
SCHEMES = {"sensor_cnn": (REFERENCE_SPARSE["sensor_cnn"], "full"), "mobilenet": ("sparse:4:-3@1/4", "full"),
           "mlp": ("classifier", "full")}
CLOCK_HZ = 216e6
PAPER_CYCLES_PER_MAC = 0.546 * 216e6 / 23e6  # 5.13: MCUNet, 546 ms per training image, 23M MACs, 216 MHz M7


def case(name: str, n: int = 200):
    shape, classes = MODELS[name]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.build(name, shape, classes), rng)
    graph = quantize(model, rng.normal(0.0, 1.0, (64,) + shape).astype(np.float32), name=name)
    x_float = rng.normal(0.0, 1.0, (n,) + shape).astype(np.float32)
    return model, graph, x_float, quantize_input(graph, x_float), rng.integers(0, classes, n)


def rate(run_one, n_items: int, seconds: float) -> float:
    """Samples per second: repeat run_one (which trains n_items samples) for at least `seconds`."""
    run_one()  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_one()
        done += n_items
    return done / (time.perf_counter() - start)


def torch_rate(model: nn.Module, x_float, labels, seconds: float) -> float:
    model = model.eval()  # BatchNorm frozen (as folded on the device); every parameter trains
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = [torch.from_numpy(x[None]) for x in x_float]
    ys = [torch.tensor([int(y)]) for y in labels]

    def run():
        for x, y in zip(xs, ys):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return rate(run, len(xs), seconds)


def bench(name: str, scheme: str, args, cache) -> dict:
    model, graph, x_float, x, labels = case(name)
    plan = compile_plan(graph, parse(scheme, graph))
    macs = codegen.count_train_macs(plan)
    elf = cruntime.build_train_firmware(plan, x[: args.steps], labels[: args.steps], steps=args.steps,
                                        cache_dir=cache)
    run = cruntime.run_counted(elf, timeout=600, cache_dir=cache)
    if run.result.returncode != 0:
        raise RuntimeError(f"{name} {scheme}: the firmware failed: {run.result.stdout}{run.result.stderr}")
    counts = run.totals
    usage = cruntime.memory_usage(elf)
    linked = footprint.runtime_sections(elf.parent / footprint.TRAIN_MAP)
    insns = counts["region"] / counts["regions"]
    ctrainer = cruntime.CTrainer(plan, 0, cache_dir=cache)
    py = Trainer(plan, 0)
    py_n = 20
    row = dict(model=name, scheme=scheme, macs=macs["total"], forward_macs=macs["forward"], insns=insns,
               device_ram=plan.memory_report(), linked_ram=linked["ram"] + footprint.step_stack_bytes(run.result.stdout),
               ram=usage["ram"],
               flash=usage["flash"],
               c_sps=rate(lambda: ctrainer.steps(x, labels), len(x), args.host_seconds),
               py_sps=rate(lambda: [py.step(xi, int(yi)) for xi, yi in zip(x[:py_n], labels[:py_n])], py_n,
                           args.host_seconds))
    row["torch_sps"] = torch_rate(model, x_float[:50], labels[:50], args.host_seconds) if scheme == "full" else None
    return row


def table(rows) -> str:
    lines = ["| model | scheme | MACs/step (fwd) | M4 insns/step | insns/MAC | ms/step @216 MHz, 1 insn/cycle "
             "| vs paper 5.1 cycles/MAC | device RAM B: compile (arena + scratch + stack + statics) / linker "
             "| firmware RAM / flash B | host C steps/s "
             "| Python Trainer steps/s | PyTorch fp32 steps/s | C / Python | C / PyTorch |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ipm, d = r["insns"] / r["macs"], r["device_ram"]
        torch_text = f"{r['torch_sps']:,.0f}" if r["torch_sps"] else "-"
        vs_torch = f"{r['c_sps'] / r['torch_sps']:.1f}x" if r["torch_sps"] else "-"
        lines.append(
            f"| {r['model']} | {r['scheme']} | {r['macs']:,} ({r['forward_macs']:,}) | {r['insns']:,.0f} | {ipm:.1f} "
            f"| {1e3 * r['insns'] / CLOCK_HZ:.2f} | {ipm / PAPER_CYCLES_PER_MAC:.1f}x "
            f"| {d['device_ram_bytes']:,} ({d['arena_bytes']:,} + {d['scratch_bytes']:,} + {d['stack_bytes']:,} + "
            f"{d['runtime_static_bytes']:,}) / {r['linked_ram']:,} | {r['ram']:,} / {r['flash']:,} | {r['c_sps']:,.0f} "
            f"| {r['py_sps']:,.0f} | {torch_text} | {r['c_sps'] / r['py_sps']:.0f}x | {vs_torch} |")
    return "\n".join(lines)


# ---- the forward pass alone (issue 15): every zoo model, reference and fast kernels, and where the fast one goes --

def forward_kind(graph, op) -> str:
    """The group a forward op's instructions are reported under."""
    if op.kind != "conv2d":
        return {"add": "add", "avgpool2d": "pooling", "maxpool2d": "pooling"}.get(op.kind, op.kind)
    oh, ow, _ = graph.tensors[op.outputs[0]].shape
    cin = graph.tensors[op.inputs[0]].shape[2]
    if oh * ow == 1:
        return "linear (one output pixel)"
    if device_memory.conv_kernel(graph, op) == "conv2d_depthwise":
        return "depthwise"
    if op.inputs[0] == graph.inputs[0] and cin <= 4:
        return "first conv (few input channels)"
    return "pointwise and general conv"


def forward(name: str, cache) -> dict:
    """Instructions of one inference with each kernel set (the inference firmware, mean of 2 samples), and the
    fast forward by op group (the profiling firmware of the model's first scheme: its forward steps)."""
    _, graph, _, x, labels = case(name, 4)
    macs = codegen.count_macs(graph)
    row = dict(model=name, shape=MODELS[name][0], macs=macs)
    for label, fast in (("reference", False), ("fast", True)):
        counts = cruntime.count_instructions(cruntime.build_firmware(graph, x[:2], fast=fast, cache_dir=cache),
                                             timeout=600, cache_dir=cache)
        row[label] = counts["region"] / counts["regions"]
    plan = compile_plan(graph, parse(SCHEMES[name][0], graph))
    result = profile.profile(plan, x[:2], labels[:2], steps=2, cache_dir=cache)
    groups: dict[str, list] = {}
    for step, insns, step_macs in zip(plan.steps, result.per_op, result.macs):
        if step.kind == "forward":
            g = groups.setdefault(forward_kind(plan.graph, plan.graph.ops[step.attrs["op"]]), [0.0, 0])
            g[0] += insns
            g[1] += step_macs
    row["groups"] = groups
    return row


def forward_table(rows) -> str:
    kinds = ["first conv (few input channels)", "pointwise and general conv", "depthwise", "linear (one output pixel)",
             "add", "pooling"]
    lines = ["| model | MACs | reference kernels: insns/MAC | fast: insns/MAC | "
             + " | ".join(f"{k}: insns (per MAC)" for k in kinds) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(kinds)]
    for r in rows:
        cells = []
        for k in kinds:
            insns, macs = r["groups"].get(k, (0, 0))
            cells.append("-" if not insns else f"{insns:,.0f}" + (f" ({insns / macs:.2f})" if macs else ""))
        lines.append(f"| {r['model']} {r['shape']} | {r['macs']:,} | {r['reference'] / r['macs']:.2f} "
                     f"| **{r['fast'] / r['macs']:.2f}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps the firmware runs (counted)")
    parser.add_argument("--host-seconds", type=float, default=2.0, help="time per host speed measurement")
    args = parser.parse_args()
    single_thread()
    import tempfile
    from pathlib import Path
    cache = Path(tempfile.mkdtemp(prefix="bench_device_"))
    rows = [bench(name, scheme, args, cache) for name in MODELS for scheme in SCHEMES[name]]
    forward_rows = [forward(name, cache) for name in MODELS]
    print(provenance(f"python benchmarks/bench_device.py --steps {args.steps} --host-seconds {args.host_seconds}") + "\n")
    print(table(rows))
    print(f"\n- M4 instructions: executed instructions per training step (QEMU 7.2 mps2-an386, arm-none-eabi-gcc "
          f"-O2, our TCG plugin between the markers around fedtiny_model_train_step, mean of {args.steps} steps); "
          "exact counts, not cycles. Latency assumes 1 instruction per cycle at 216 MHz (no wait states, no "
          "multi-cycle instructions: optimistic for an M4, roughly right for the M7's dual issue).\n"
          "- Device RAM: Plan.memory_report() (arena + C kernels' scratch + step stack + runtime statics) / the "
          "linker's: the runtime objects' .data and .bss in the firmware's map plus the step's painted peak stack. "
          "Firmware RAM / flash: the whole test firmware (arm-none-eabi-size), with newlib's printf and semihosting, "
          "a 4 KB heap and a 4 KB stack.\n"
          "- MACs: forward convs + input gradients (a transposed conv costs its forward) + weight-gradient sums of "
          "the trainable rows + bias sums (additions); per-element updates are not counted.\n"
          f"- Paper: 546 ms per training image for a 23M-MAC model on a 216 MHz Cortex-M7 = "
          f"{PAPER_CYCLES_PER_MAC:.2f} cycles/MAC; the column is our instructions/MAC over that.\n"
          "- Host: batch 1, one thread; C = the generated C (gcc -O2) through ctypes, 200 samples per call; "
          "PyTorch = the float model (BatchNorm frozen), SGD on every parameter, only for `full`.")
    print("\n### The forward pass of every zoo model on the M4, reference and fast kernels (issue 15)\n")
    print(forward_table(forward_rows))
    print("\n- Whole inference: the inference firmware (`codegen` with and without `--reference`), instructions "
          "between the markers around `fedtiny_model_run`, mean of 2 samples, over the model's conv MACs. By group: "
          "the fast kernels' forward steps in the profiling firmware of the model's first scheme above (what "
          "`fedtiny profile PLAN` prints per layer; each count includes its call through `fedtiny_invoke`), with "
          "instructions per MAC where the group has MACs. Issue 15's target: at most 2.5 for every zoo model.\n"
          f"- Against the paper's {PAPER_CYCLES_PER_MAC:.1f} cycles/MAC (MCUNet training, Cortex-M7) and CMSIS-NN's "
          "1-2 cycles/MAC for int8 convolutions on the M4/M7 (Lai et al. 2018, as issue 15 quotes it): instructions "
          "are a lower bound on M4 cycles (loads take 2, taken branches 2-4).")


if __name__ == "__main__":
    with capture() as out:
        main()
    write_section(SECTION, f"{SECTION}\n\n{out.getvalue()}")
