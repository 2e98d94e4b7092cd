"""The device's memory as the compiler counts it (fedtiny.device_memory) against the linker's and the device's own.

- every zoo model x every scheme kind: the Cortex-M4 training firmware's map gives the C runtime's RAM (arena,
  scratch, exponent table, train state) and flash (constants and code); with the stack the firmware measures
  (painted) added, `Plan.memory_report()`'s device_ram_bytes and device_flash_bytes are within 5 % of them,
  and the compile-time stack rule covers the measured stack;
- a long-input model whose one-pass kernel scratch exceeds its arena: the compiler makes its conv input
  gradients recompute their sums where the budget asks for it (bit-exact in C), and refuses (compile_plan and
  `fedtiny compile`, exit 2, naming arena, scratch and stack) a budget that even so does not fit although the
  arena alone does; the linker agrees (the one-pass plan does not link into 256 KB, the compiler's plan does);
- the pooling gradients: no scratch where windows do not overlap, int32 sums where they do (the compile-time
  bound, and a refusal where it cannot hold), the host C bit-exact with the Python trainer either way.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fedtiny import device_memory
from fedtiny.cli import main
from fedtiny.compiler import BudgetError, compile_plan
from fedtiny.interpreter import quantize_input
from fedtiny.modelfile import save_model
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny_device import cruntime, footprint
from fedtiny_device.trainer import Trainer

from test_ctrainer import MODELS, SCHEMES, m4_training_run
from test_cruntime import need

TOLERANCE = 0.05


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_time_memory_matches_the_linker(name, scheme, cache):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    plan, elf, result = m4_training_run(name, scheme, cache)  # test_ctrainer's build and run, shared
    assert result.returncode == 0, result.stdout + result.stderr
    stack = footprint.step_stack_bytes(result.stdout)
    linked = footprint.runtime_sections(elf.parent / footprint.TRAIN_MAP)
    report = plan.memory_report()
    assert 0 < stack <= report["stack_bytes"], (stack, report["stack_bytes"])
    ram = linked["ram"] + stack
    assert abs(report["device_ram_bytes"] - ram) <= TOLERANCE * ram, (report, linked, stack)
    assert abs(report["device_flash_bytes"] - linked["flash"]) <= TOLERANCE * linked["flash"], (report, linked)
    # the parts: arena and scratch are the firmware's own buffers, byte for byte
    assert linked["ram"] == report["arena_bytes"] + report["scratch_bytes"] + report["runtime_static_bytes"]


LONG = 4096  # samples of the long input


@pytest.fixture(scope="module")
def long_input():
    """A 1-D conv model on 4096 samples: its backward kernels' scratch (8 B per input element of a conv's input
    gradient) is larger than its whole arena."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 5, padding=2), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4))
    calibration = np.random.default_rng(0).normal(0, 1, (16, 1, LONG)).astype(np.float32)
    return quantize(model.eval(), calibration, name="long_input")


def test_a_plan_whose_ram_does_not_fit_is_refused_at_compile(long_input, tmp_path):
    """`full` on the long input: one pass of its conv input gradients needs a scratch larger than its arena. Under
    the default 256 KB budget (64 KB reserved) the compiler switches them to recomputing their sums (a scratch of
    one pixel); with a budget that leaves only the arena and a few hundred bytes, it refuses, naming arena,
    scratch and stack, although the arena alone fits."""
    graph = long_input
    one_pass = compile_plan(graph, parse("full", graph), budget=1 << 30, reserve=0).memory_report()
    assert one_pass["scratch_bytes"] > one_pass["arena_bytes"]
    assert one_pass["arena_bytes"] <= 192 * 1024 < one_pass["device_ram_bytes"]
    fitted = compile_plan(graph, parse("full", graph))
    assert any(s.attrs.get("recompute") for s in fitted.steps)
    assert fitted.memory_report()["device_ram_bytes"] <= 192 * 1024
    # one pixel of 8 channels for the input gradients; the fast forward conv's two columns and sums are the rest
    forward = max(device_memory.op_scratch_bytes(graph, op) for op in graph.ops)
    assert fitted.memory_report()["scratch_bytes"] == max(8 * 8, forward)
    budget = one_pass["arena_bytes"] + 64 * 1024 + 100  # the arena fits, arena + scratch + stack does not
    with pytest.raises(BudgetError, match=r"arena \d+ B .*kernel scratch \d+ B \(for step \d+, \w+\), stack \d+ B.*"
                                          r"already recompute"):
        compile_plan(graph, parse("full", graph), budget=budget, reserve=64 * 1024)
    save_model(graph, tmp_path / "long.ftm")
    refused = CliRunner().invoke(main, ["compile", str(tmp_path / "long.ftm"), "--scheme", "full", "--budget",
                                        str(budget), "--reserve", "64KB"])
    assert refused.exit_code == 2, refused.output
    assert "kernel scratch" in refused.output and "Traceback" not in refused.output
    fits = CliRunner().invoke(main, ["compile", str(tmp_path / "long.ftm"), "--scheme", "full"])
    assert fits.exit_code == 0, fits.output
    assert f"device RAM: {fitted.memory_report()['device_ram_bytes']:,} B" in fits.output
    assert "recompute their sums to fit the budget" in fits.output


def test_recomputed_input_gradients_train_like_python(long_input, cache):
    need("gcc", "make")
    graph = long_input
    plan = compile_plan(graph, parse("full", graph))
    assert any(s.attrs.get("recompute") for s in plan.steps)
    rng = np.random.default_rng(2)
    x = quantize_input(graph, rng.normal(0, 1, (4, 1, LONG)).astype(np.float32))
    python, c = Trainer(plan, 7), cruntime.CTrainer(plan, 7, cache_dir=cache)
    for xi, yi in zip(x, rng.integers(0, 4, len(x))):
        python.step(xi, int(yi))
        c.step(xi, int(yi))
    for name, values in python.trainable_state().items():
        assert np.array_equal(c.trainable_state()[name], values), name


def test_the_linker_agrees(long_input, cache):
    """The one-pass plan does not link into 256 KB (which compile_plan would have refused); the plan compile_plan
    makes for a 256 KB device without reserve links, and its RAM is the compiler's within 5 %."""
    need("arm-none-eabi-gcc", "make")
    graph = long_input
    one_pass = compile_plan(graph, parse("full", graph), budget=1 << 30, reserve=0)
    assert one_pass.arena_size < 256 * 1024 < one_pass.memory_report()["device_ram_bytes"]
    with pytest.raises(cruntime.BuildError, match="region `RAM' overflowed"):
        cruntime.build_train_firmware(one_pass, cache_dir=cache)
    plan = compile_plan(graph, parse("full", graph), budget=256 * 1024, reserve=0)
    elf = cruntime.build_train_firmware(plan, cache_dir=cache)
    linked = footprint.runtime_sections(elf.parent / footprint.TRAIN_MAP)
    report = plan.memory_report()
    assert linked["ram"] == report["arena_bytes"] + report["scratch_bytes"] + report["runtime_static_bytes"]


def _pool_plan(kernel: int, stride: int, size: int, pool=nn.AvgPool2d, padding: int = 0):
    torch.manual_seed(0)
    extra = dict(count_include_pad=False) if pool is nn.AvgPool2d else {}
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), pool(kernel, stride, padding=padding, **extra),
                          nn.Flatten(), nn.LazyLinear(3))
    x = np.random.default_rng(0).normal(0, 1, (8, 1, size, size)).astype(np.float32)
    model(torch.from_numpy(x))
    graph = quantize(model.eval(), x, name="pool")
    return graph, compile_plan(graph, parse("full", graph), budget=1 << 30, reserve=0)


@pytest.mark.parametrize("pool, kernel, stride, padding", [
    (nn.AvgPool2d, 2, 2, 0), (nn.AvgPool2d, 3, 1, 1), (nn.AvgPool2d, 3, 2, 1), (nn.AvgPool2d, 8, 8, 0),
    (nn.MaxPool2d, 2, 2, 0), (nn.MaxPool2d, 3, 1, 1), (nn.MaxPool2d, 3, 3, 1), (nn.MaxPool2d, 3, 2, 0)])
def test_pooling_gradients_in_c_match_python(pool, kernel, stride, padding, cache):
    """Disjoint windows (stride >= kernel) take no scratch, overlapping ones an int32 per input element; the C
    trainer stays the Python trainer's bit for bit for 30 steps."""
    need("gcc", "make")
    graph, plan = _pool_plan(kernel, stride, 8, pool, padding)
    step = next(s for s in plan.steps if s.kind.endswith("pool2d_input_grad"))
    assert device_memory.step_scratch_bytes(plan, step) == (0 if stride >= kernel else 4 * 8 * 8 * 3)
    rng = np.random.default_rng(1)
    x = quantize_input(graph, rng.normal(0, 1, (30, 1, 8, 8)).astype(np.float32))
    labels = rng.integers(0, 3, 30)
    python, c = Trainer(plan, 5), cruntime.CTrainer(plan, 5, cache_dir=cache)
    for xi, yi in zip(x, labels):
        python.step(xi, int(yi))
        c.step(xi, int(yi))
    for name, values in python.trainable_state().items():
        assert np.array_equal(c.trainable_state()[name], values), name


@pytest.mark.parametrize("pool", [nn.AvgPool2d, nn.MaxPool2d])
def test_pooling_gradient_bound(pool):
    graph, plan = _pool_plan(3, 1, 8, pool)
    step = next(s for s in plan.steps if s.kind.endswith("pool2d_input_grad"))
    bound = device_memory.accumulator_bound(plan, step)
    if pool is nn.MaxPool2d:  # the centre element is in 3 x 3 windows: at most 9 values of |g| <= 2^15
        assert bound == 9 * 2**15
    else:  # 9 windows of 9 elements: round(2^15 / 9) = 3641 each
        assert bound == 2**15 * 9 * 3641
    assert bound < 2**31


def test_an_overflowing_int32_accumulator_is_refused(monkeypatch):
    """No pooling layer PyTorch builds gets near 2^31 (a 3 x 3 max pool: 9 * 2^15), so the refusal is checked
    with gradients 2^13 times wider than int16: then 9 windows reach 9 * 2^28 >= 2^31."""
    graph, _ = _pool_plan(3, 1, 8, nn.MaxPool2d)
    monkeypatch.setattr(device_memory, "GRAD_ABS_MAX", 2**28)
    with pytest.raises(ValueError, match=r"maxpool2d_input_grad.*int32"):
        compile_plan(graph, parse("full", graph), budget=1 << 30, reserve=0)
