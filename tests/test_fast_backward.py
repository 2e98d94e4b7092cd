"""The fast backward kernels (device_runtime/c/fedtiny_kernels_bwd_fast.c) on random conv chains, against the
Python trainer: `full` plans of test_fast_kernels' random chains (general, grouped, 1x1 and depthwise convs with
odd channel counts, strides and padding) train bit for bit on the host (plain-C paths) and on the Cortex-M4 under
QEMU (SMLAD paths), with every conv's weight update on the fast kernel and every depthwise input gradient on
fedtiny_conv2d_input_grad_depthwise. tests/test_cruntime.py holds the fast weight update to the reference kernel
and the Python update on 96 random single calls; tests/test_ctrainer.py trains every zoo model and scheme.
"""

import numpy as np

from fedtiny import device_memory
from fedtiny.compiler import compile_plan
from fedtiny.scheme import parse
from fedtiny_device import codegen, cruntime
from fedtiny_device.trainer import Trainer

from test_cruntime import cache, need  # noqa: F401 (cache: its session fixture, builds shared)
from test_fast_kernels import random_case


def full_plan(seed: int):
    graph, x = random_case(seed)
    labels = np.random.default_rng(seed).integers(0, 5, len(x))
    return compile_plan(graph, parse("full", graph)), x, labels


def python_steps(plan, x, labels, seed: int) -> Trainer:
    trainer = Trainer(plan, seed)
    for xi, yi in zip(x, labels):
        trainer.step(xi, int(yi))
    return trainer


def test_full_plans_of_random_convs_train_on_the_host_like_python(cache):
    need("gcc", "make")
    for seed in (1,):  # seed 0's plan: the M4 test below
        plan, x, labels = full_plan(seed)
        kernels = {device_memory.step_kernel(plan, s) for s in plan.steps}
        assert {"conv2d_input_grad_depthwise", "conv2d_input_grad_pointwise", "conv2d_weight_update_fast"} <= kernels, \
            kernels
        expected = python_steps(plan, x, labels, seed=3)
        trainer = cruntime.CTrainer(plan, seed=3, cache_dir=cache)
        trainer.steps(x, labels)
        actual = trainer.trainable_state()
        for name, want in expected.trainable_state().items():
            assert np.array_equal(actual[name], want), f"seed {seed}: {name}"
        assert trainer.rng_counter == expected.rng_counter == (3 << 40) + len(x) * codegen.draws_per_step(plan)


def test_a_full_plan_of_random_convs_trains_on_the_m4_like_python(cache):
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    plan, x, labels = full_plan(0)
    expected = python_steps(plan, x, labels, seed=11)
    elf = cruntime.build_train_firmware(plan, x, labels, seed=11, steps=len(x), cache_dir=cache)
    model_c = (elf.parent / "model.c").read_text()
    assert "FEDTINY_OP_CONV2D_INPUT_GRAD_DEPTHWISE" in model_c and "FEDTINY_OP_CONV2D_INPUT_GRAD_POINTWISE" in model_c
    result = cruntime.run_qemu(elf, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cruntime.parse_train_result(result.stdout) == (
        len(x), cruntime.trainable_digest(plan, expected.trainable_state()), expected.rng_counter)


def test_a_tight_budget_takes_the_reference_input_gradient_of_a_depthwise_conv():
    """The budget's fallback (choose_recompute) covers the depthwise kernel: with recompute set, the step runs the
    reference kernel's one-pixel scratch."""
    plan, _, _ = full_plan(0)
    depthwise = [s for s in plan.steps if device_memory.step_kernel(plan, s) == "conv2d_input_grad_depthwise"]
    x, w = (plan.graph.tensors[n] for n in plan.graph.ops[depthwise[0].attrs["op"]].inputs[:2])
    h, width, c = x.shape
    assert device_memory.step_scratch_bytes(plan, depthwise[0]) == 8 * h * width * c + 4 * w.data.size
    depthwise[0].attrs["recompute"] = True
    assert device_memory.step_kernel(plan, depthwise[0]) == "conv2d_input_grad"
    assert device_memory.step_scratch_bytes(plan, depthwise[0]) == 8 * c


def test_the_weight_update_block_is_the_largest_the_int32_bound_allows():
    """device_memory proves each int32 block of the fast weight update (block x 2^15 x max |x - zx| < 2^31),
    takes the longest even block that holds, and the generated C hands it to the kernel."""
    for zx in (-128, -3, 0, 127):
        block, widest = device_memory.weight_update_block(zx), max(abs(-128 - zx), abs(127 - zx))
        assert block % 2 == 0 and block * 2**15 * widest < 2**31 <= (block + 2) * 2**15 * widest, zx
    assert device_memory.weight_update_block(-128) == 256 and device_memory.weight_update_block(0) == 510
    plan, _, _ = full_plan(0)
    device_memory.check_accumulators(plan)
    updates = [s for s in plan.steps if s.kind == "conv2d_weight_update"]
    model_c = codegen.render_plan(plan)[1]
    for step in updates:
        zx = plan.graph.tensors[plan.graph.ops[step.attrs["op"]].inputs[0]].zero_point
        assert device_memory.accumulator_bound(plan, step) < 2**31
        assert f".block = {device_memory.weight_update_block(zx)}," in model_c


def test_pointwise_input_gradients_take_the_fast_kernel_within_its_bound():
    """A 1 x 1, stride 1, unpadded conv's input gradient runs fedtiny_conv2d_input_grad_pointwise (its int32
    half-sums hold for out_c <= 511), with the reference's int64 per input element plus 8 bytes per pixel and
    output-channel pair plus 8 per pair of scratch; the budget's recompute takes it back to the reference."""
    plan, _, _ = full_plan(0)
    pointwise = [s for s in plan.steps if device_memory.step_kernel(plan, s) == "conv2d_input_grad_pointwise"]
    assert pointwise
    op = plan.graph.ops[pointwise[0].attrs["op"]]
    (h, width, c), cout = plan.graph.tensors[op.inputs[0]].shape, plan.graph.tensors[op.inputs[1]].shape[0]
    assert device_memory.is_pointwise(plan.graph, op)
    pairs = (cout + 1) // 2
    assert device_memory.step_scratch_bytes(plan, pointwise[0]) == 8 * h * width * c + 8 * h * width * pairs + 8 * pairs
    pointwise[0].attrs["recompute"] = True
    assert device_memory.step_kernel(plan, pointwise[0]) == "conv2d_input_grad"
    wide = plan.graph.tensors[op.inputs[1]]
    original = wide.shape
    wide.shape = (device_memory.POINTWISE_MAX_OUT_C + 1,) + tuple(original[1:])
    try:
        assert not device_memory.is_pointwise(plan.graph, op)
    finally:
        wide.shape = original
