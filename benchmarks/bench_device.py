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

    python benchmarks/bench_device.py [--steps 5] [--host-seconds 2]
Prints a Markdown table (it does not write BENCHMARKS.md).
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
from fedtiny_device import codegen, cruntime, footprint
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


if __name__ == "__main__":
    with capture() as out:
        main()
    write_section(SECTION, f"{SECTION}\n\n{out.getvalue()}")
