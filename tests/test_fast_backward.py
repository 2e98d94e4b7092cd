"""The fast backward kernels (device_runtime/c/fedtiny_kernels_bwd_fast.c) on random conv chains, against the
Python trainer: `full` plans of test_fast_kernels' random chains (general, grouped, 1x1 and depthwise convs with
odd channel counts, strides and padding) train bit for bit on the host (plain-C paths) and on the Cortex-M4 under
QEMU (SMLAD paths), with every conv's weight update on the fast kernel and every depthwise input gradient on
fedtiny_conv2d_input_grad_depthwise. tests/test_cruntime.py holds the fast weight update to the reference kernel
and the Python update on 96 random single calls; tests/test_ctrainer.py trains every zoo model and scheme.
"""

import ctypes

import numpy as np

from fedtiny import device_memory
from fedtiny.compiler import compile_plan
from fedtiny.scheme import parse
from fedtiny_device import codegen, cruntime
from fedtiny_device.trainer import Trainer

from test_cruntime import need
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
        assert {"conv2d_input_grad_depthwise", "conv2d_input_grad_pointwise", "conv2d_weight_update_fast",
                "conv2d_bias_update_fast"} <= kernels, kernels
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
    assert all(f"FEDTINY_OP_CONV2D_{kind}" in model_c
               for kind in ("INPUT_GRAD_DEPTHWISE", "INPUT_GRAD_POINTWISE", "BIAS_UPDATE_FAST"))
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


class InputGradParams(ctypes.Structure):
    """Mirror of fedtiny_conv2d_input_grad_params in fedtiny_kernels.h."""
    _fields_ = [("conv", ctypes.c_void_p), ("ws", ctypes.c_void_p), ("k", ctypes.c_int32),
                ("recompute", ctypes.c_int32)]


def input_grad(lib, fn: str, x_shape, weight, sram_rows, ws, g_y, scratch_fn=None):
    """One input-gradient kernel call on the host library: (g_x, e_x), e_y = 0 and k = 0."""
    h, w, cin = x_shape
    cout = weight.shape[0]
    keep = [np.ascontiguousarray(weight, dtype=np.int8), np.ascontiguousarray(ws, dtype=np.int32),
            np.ascontiguousarray(g_y, dtype=np.int16), np.zeros(cout, dtype=np.int32)]
    sram = np.ascontiguousarray(weight[:sram_rows], dtype=np.int8)
    flash = np.ascontiguousarray(np.where(np.arange(cout)[:, None] < sram_rows, 99, weight.reshape(cout, -1)),
                                 dtype=np.int8)  # rows in SRAM are read from the SRAM copy, never from flash
    keep += [sram, flash]
    conv = cruntime.Conv2dParams(h, w, cin, h, w, cout, 1, 1, 1, 1, 0, 0, 1, 0, 0, -128, 127, flash.ctypes.data,
                                 keep[3].ctypes.data, keep[3].ctypes.data, keep[3].ctypes.data, sram.ctypes.data, 0,
                                 sram_rows)
    p = InputGradParams(ctypes.addressof(conv), keep[1].ctypes.data, 0, 0)
    getattr(lib, fn + "_scratch_bytes").restype = ctypes.c_size_t
    getattr(lib, fn + "_scratch_bytes").argtypes = [ctypes.POINTER(InputGradParams)]
    getattr(lib, fn).argtypes = [ctypes.POINTER(InputGradParams), ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
                                 ctypes.POINTER(ctypes.c_int32), ctypes.c_void_p]
    scratch = np.zeros(int(getattr(lib, fn + "_scratch_bytes")(ctypes.byref(p))) + 8, dtype=np.uint8)
    g_x, e_x = np.zeros((h, w, cin), dtype=np.int16), ctypes.c_int32(0)
    status = getattr(lib, fn)(ctypes.byref(p), keep[2].ctypes.data, 0, g_x.ctypes.data, ctypes.byref(e_x),
                              scratch.ctypes.data + (-scratch.ctypes.data) % 8)
    assert status == 0, (fn, status)
    return g_x, e_x.value


SPLIT_MAKEFILE = b"""libsplit.so: fedtiny_kernels.c fedtiny_kernels_fwd_fast.c fedtiny_kernels_bwd_fast.c fedtiny_kernels.h \\
\tfedtiny_arith.h
\tgcc -std=c99 -Wall -Wextra -Werror -O2 -fPIC -shared -DFEDTINY_HOST_SPLIT_PATHS -o $@ fedtiny_kernels.c \\
\t\tfedtiny_kernels_fwd_fast.c fedtiny_kernels_bwd_fast.c
"""


def split_path_library(cache):
    """The kernels on the host with the M4's arithmetic in the kernels whose host build hands the call to the
    reference (FEDTINY_HOST_SPLIT_PATHS): the pointwise input gradient's split halves, the bias update's sums."""
    rt = codegen.runtime_dir()
    files = {n: (rt / n).read_bytes() for n in cruntime.KERNEL_FILES if n != "Makefile"}
    return ctypes.CDLL(str(cruntime.make_cached(files | {"Makefile": SPLIT_MAKEFILE}, "libsplit.so", "libsplit.so",
                                                cache)))


def test_the_pointwise_input_gradient_is_the_reference_at_the_extremes(cache):
    """fedtiny_conv2d_input_grad_pointwise == fedtiny_conv2d_input_grad (g_x and its exponent) on random 1 x 1
    shapes (odd and even channel counts, SRAM rows), with the extremes of its int32 half-sums: |g| = 32767 or
    -32768, ws = 2^15, W = -128 / 127 at out_c = 511, and many zero gradients (ReLU masks)."""
    need("gcc", "make")
    lib = split_path_library(cache)
    rng = np.random.default_rng(7)
    for i in range(40):
        h, w = (int(v) for v in rng.integers(1, 5, 2))
        cin = int(rng.integers(1, 20))
        cout = device_memory.POINTWISE_MAX_OUT_C if i % 8 == 7 else int(rng.integers(1, 40))
        weight = rng.integers(-128, 128, (cout, 1, 1, cin)).astype(np.int8)
        ws = rng.integers(1, 2**15 + 1, cout)
        g_y = rng.integers(-32768, 32768, (h, w, cout)).astype(np.int16)
        if i % 4 == 3:  # every term at its largest, one sign
            weight[:] = -128 if i % 8 == 7 else 127
            ws[:] = 2**15
            g_y[:] = -32768 if i % 8 == 7 else 32767
        else:
            g_y[rng.random(g_y.shape) < 0.5] = 0
        sram_rows = int(rng.integers(0, cout + 1))
        want = input_grad(lib, "fedtiny_conv2d_input_grad", (h, w, cin), weight, sram_rows, ws, g_y)
        got = input_grad(lib, "fedtiny_conv2d_input_grad_pointwise", (h, w, cin), weight, sram_rows, ws, g_y)
        assert got[1] == want[1] and np.array_equal(got[0], want[0]), f"case {i}: {(h, w, cin, cout, sram_rows)}"


def bias_update(lib, fn: str, g_y, bias, m, shift, e_y: int, counter: int):
    """One bias-update kernel call on the host library: (bias after, counter after)."""
    h, w, cout = g_y.shape
    conv = cruntime.Conv2dParams(h, w, 1, h, w, cout, 1, 1, 1, 1, 0, 0, 1, 0, 0, -128, 127)
    m, shift = (np.ascontiguousarray(a, dtype=np.int32) for a in (m, shift))
    p = cruntime.UpdateParams(ctypes.addressof(conv), 0, m.ctypes.data, shift.ctypes.data, 0)
    g_y, bias, c = np.ascontiguousarray(g_y, dtype=np.int16), np.array(bias, dtype=np.int32), ctypes.c_uint64(counter)
    args = [ctypes.POINTER(cruntime.UpdateParams), ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint64)]
    getattr(lib, fn).argtypes = args + ([ctypes.c_void_p] if fn.endswith("fast") else [])
    scratch = np.zeros(cout, dtype=np.int32)
    extra = [scratch.ctypes.data] if fn.endswith("fast") else []
    assert getattr(lib, fn)(ctypes.byref(p), g_y.ctypes.data, e_y, bias.ctypes.data, ctypes.byref(c), *extra) == 0
    return bias, c.value


def test_the_fast_bias_update_is_the_reference(cache):
    """fedtiny_conv2d_bias_update_fast == fedtiny_conv2d_bias_update (biases and counter) on random shapes (channel
    counts on both sides of its 8-channel blocks, odd and even counters), exponents of both signs of k and the
    largest sums: |g| = 32767 over 65,535 positions, next to int32's edges."""
    need("gcc", "make")
    lib = split_path_library(cache)
    rng = np.random.default_rng(9)
    for i in range(40):
        cout = int(rng.integers(1, 30))
        h, w = (1, device_memory.BIAS_FAST_MAX_POSITIONS) if i % 10 == 9 else tuple(int(v) for v in rng.integers(1, 9, 2))
        g_y = rng.integers(-32767, 32768, (h, w, cout)).astype(np.int16)
        if i % 10 == 9:
            g_y[:] = 32767 if i % 20 == 9 else -32767
        bias = rng.integers(-(2**31), 2**31, cout)
        bias[0] = 2**31 - 1
        m, shift = rng.integers(2**14, 2**15, cout), rng.integers(-12, 4, cout)
        e_y, counter = int(rng.integers(-40, 20)), int(rng.integers(0, 2**63))
        want = bias_update(lib, "fedtiny_conv2d_bias_update", g_y, bias, m, shift, e_y, counter)
        got = bias_update(lib, "fedtiny_conv2d_bias_update_fast", g_y, bias, m, shift, e_y, counter)
        assert got[1] == want[1] and np.array_equal(got[0], want[0]), f"case {i}: {(h, w, cout, e_y)}"
