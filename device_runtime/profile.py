"""`fedtiny profile PLAN`: where a training step's instructions go on the Cortex-M4, by step kind and by layer.

The plan's profiling firmware (firmware_profile.c, `make m4-profile`) runs a few training steps whole, then the
same steps op by op, each between the instruction-count markers; under QEMU with the TCG plugin
(c/tools/insn_count.c, through cruntime.run_counted) every marked region's executed instructions are exact and
identical from run to run. Per op of the table (one per plan step) we average over the steps, and divide by the
step's multiply-accumulates (codegen.step_macs) where it has any. The projected time assumes one cycle per
instruction, which the M4 reaches for ALU and MAC instructions; loads, taken branches and divisions take 2-12,
so the real time is longer: a lower bound.
"""

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from . import codegen, cruntime

PROFILE_ELF = "fedtiny_profile.elf"

# plan step kind -> the group `fedtiny profile` reports it under
STEP_GROUPS = {
    "forward": "forward", "mask_bits": "forward (masks saved)", "loss_grad": "loss gradient",
    "grad_mask": "activation masks", "grad_add": "gradient sums (fan-out)", "conv2d_input_grad": "input gradients",
    "avgpool2d_input_grad": "input gradients (pooling)", "maxpool2d_input_grad": "input gradients (pooling)",
    "conv2d_weight_update": "weight updates", "conv2d_bias_update": "bias updates",
    "lut_input_grad": "input gradients (lookup tables)", "cat_input_grad": "input gradients (concatenation)",
    "mul_input_grad": "input gradients (products)",
}


@dataclass
class Profile:
    steps: int  # training steps run
    per_step: float  # instructions of a whole step (mean over the steps)
    per_op: list[float]  # instructions of each plan step (mean), in plan order
    macs: list[int]  # multiply-accumulates of each plan step


def build_profile_firmware(plan, samples: np.ndarray | None = None, labels: np.ndarray | None = None,
                           steps: int = 2, seed: int = 0, cache_dir: Path | None = None) -> Path:
    files = cruntime.plan_sources(plan, samples, labels, seed, steps)
    return cruntime.make_cached(files, "m4-profile", PROFILE_ELF, cache_dir,
                                prebuilt=cruntime.build_m4_kernels(cache_dir=cache_dir))


def profile(plan, samples: np.ndarray | None = None, labels: np.ndarray | None = None, steps: int = 2,
            seed: int = 0, cache_dir: Path | None = None, timeout: float = 600) -> Profile:
    """Run the plan's profiling firmware under QEMU with the instruction counter. RuntimeError if it fails."""
    elf = build_profile_firmware(plan, samples, labels, steps, seed, cache_dir)
    run = cruntime.run_counted(elf, timeout=timeout, cache_dir=cache_dir)
    n_ops = len(plan.steps)
    if run.result.returncode != 0 or len(run.each) != steps * (1 + n_ops):
        raise RuntimeError(f"the profiling firmware failed (exit {run.result.returncode}, {len(run.each)} regions "
                           f"for {steps} x (1 + {n_ops})): {run.result.stdout}{run.result.stderr}")
    whole = run.each[:steps]
    ops = np.array(run.each[steps:], dtype=np.float64).reshape(steps, n_ops)
    return Profile(steps, float(np.mean(whole)), [float(v) for v in ops.mean(axis=0)],
                   [codegen.step_macs(plan, s) for s in plan.steps])


def _layer_name(plan, step) -> str:
    op = plan.graph.ops[step.attrs["op"]] if "op" in step.attrs else None
    if op is None:
        return "loss"
    return f"op {step.attrs['op']:>2} {op.kind} {op.origin}"


def report(plan, result: Profile, clock_mhz: float) -> list[str]:
    """The lines `fedtiny profile` prints."""
    def row(name: str, insns: float, macs: int) -> str:
        per_mac = f"{insns / macs:8.2f}" if macs else f"{'-':>8}"
        ms = insns / (clock_mhz * 1e3)
        return f"  {name:<44} {insns:>13,.0f} {macs:>11,} {per_mac} {ms:>10.3f}"

    header = f"  {'':<44} {'instructions':>13} {'MACs':>11} {'per MAC':>8} {'ms @' + format(clock_mhz, 'g'):>10}"
    total_macs = sum(result.macs)
    lines = [f"plan '{plan.scheme}' ({plan.loss}): {len(plan.steps)} steps in the op table, Cortex-M4 under QEMU "
             f"(mps2-an386), mean of {result.steps} training steps",
             f"whole step: {result.per_step:,.0f} instructions, {total_macs:,} MACs, "
             f"{result.per_step / max(1, total_macs):.2f} instructions per MAC; at {clock_mhz:g} MHz and one "
             f"cycle per instruction (a lower bound) {result.per_step / (clock_mhz * 1e3):.2f} ms per step",
             "", "by step kind:", header]
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    layers: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for step, insns, macs in zip(plan.steps, result.per_op, result.macs):
        g = groups[STEP_GROUPS.get(step.kind, step.kind)]
        g[0] += insns
        g[1] += macs
        layer = layers[_layer_name(plan, step)]
        layer[0] += insns
        layer[1] += macs
    for name, (insns, macs) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(row(name, insns, int(macs)))
    lines += ["", "by layer (forward and backward steps of each op):", header]
    for name, (insns, macs) in layers.items():
        lines.append(row(name, insns, int(macs)))
    lines += ["", "(an op's count includes its call through fedtiny_invoke: a few dozen instructions)"]
    return lines


@click.command("profile")
@click.argument("plan_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--clock", "clock_mhz", default=216.0, show_default=True, type=float,
              help="The device's clock in MHz, for the projected time.")
@click.option("--steps", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Training steps to run (on zero-point samples, label 0); the figures are their mean.")
def profile_command(plan_file: str, clock_mhz: float, steps: int) -> None:
    """Run a training plan's step on the Cortex-M4 under QEMU and print its instructions and instructions per MAC,
    by step kind and by layer, with the projected time at --clock. Needs arm-none-eabi-gcc (with newlib), make and
    qemu-system-arm."""
    import shutil

    from fedtiny.cli import UserError
    from fedtiny.fileformat import FileFormatError
    from fedtiny.planfile import load_plan

    if not clock_mhz > 0:
        raise UserError(f"--clock {clock_mhz:g}: must be a positive number of MHz")
    missing = [tool for tool in ("arm-none-eabi-gcc", "make", "qemu-system-arm") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"fedtiny profile needs {', '.join(missing)} (apt-get install gcc-arm-none-eabi "
                        "libnewlib-arm-none-eabi qemu-system-arm make)")
    try:
        plan = load_plan(plan_file)
    except FileFormatError as err:
        raise UserError(str(err)) from err
    try:
        result = profile(plan, steps=steps)
    except (cruntime.BuildError, RuntimeError) as err:
        raise click.ClickException(" ".join(str(err).split())[:500]) from err
    for line in report(plan, result, clock_mhz):
        click.echo(line)
