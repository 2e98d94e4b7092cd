"""The fast forward kernels (device_runtime/c/fedtiny_kernels_fwd_fast.c) on the Cortex-M4, where they take their
DSP path (SXTB16, SMLAD, QADD), against the Python interpreter:

- a chain of convolutions of random shapes (general, grouped, depthwise, 1x1 and linear; odd channel counts and
  window lengths; strides, padding) runs in the M4 inference
  firmware under QEMU and prints the interpreter's digests, and its host build (the plain-C path) gives the
  interpreter's int8 outputs;
- the firmware really contains SMLAD, SXTB16 and QADD (objdump);
- fedtiny.device_memory's scratch rule of each fast kernel is the C companion's, byte for byte (the generated
  FEDTINY_MODEL_SCRATCH_BYTES is checked by fedtiny_graph_check on every invoke).

tests/test_cruntime.py holds the host kernels to the reference on 300 random shapes; tests/test_ctrainer.py trains
every zoo model and scheme with the fast kernels on, host and M4, bit for bit with the Python trainer.
"""

import functools
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from fedtiny import device_memory, interpreter
from fedtiny.quantize import quantize
from fedtiny_device import codegen, cruntime

from test_cruntime import assert_equal_int8, need


class RandomConvs(nn.Module):
    """Five convolutions whose shapes come from a seed: every kernel choice of device_memory.conv_kernel."""

    def __init__(self, rng: np.random.Generator, cin: int, size: list[int]):
        super().__init__()
        layers, c = [], cin
        for kind in ("general", "depthwise", "grouped", "pointwise", "depthwise"):
            k = [int(min(v, n)) for v, n in zip(rng.integers(1, 6, 2), size)]
            stride = [int(v) if min(size) >= 6 else 1 for v in rng.integers(1, 3, 2)]
            padding = [int(rng.integers(0, (kk + 1) // 2 + 1)) for kk in k]
            if kind == "pointwise":
                k, padding, groups, out = [1, 1], [0, 0], 1, int(rng.integers(3, 21))
            elif kind == "depthwise":
                groups, out = c, c
            elif kind == "grouped":
                groups = int(rng.choice([g for g in (2, 3) if c % g == 0] or [1]))
                out = groups * int(rng.integers(1, 4))
            else:
                groups, out = 1, int(rng.integers(3, 12))
            layers += [nn.Conv2d(c, out, k, stride, padding, groups=groups), nn.ReLU()]
            size = [(n + 2 * q - kk) // s + 1 for n, q, kk, s in zip(size, padding, k, stride)]
            c = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@functools.cache
def random_case(seed: int):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    shape = (int(rng.integers(1, 6)), int(rng.integers(9, 17)), int(rng.integers(9, 17)))
    model = RandomConvs(rng, shape[0], list(shape[1:])).eval()
    graph = quantize(model, rng.normal(0.0, 1.0, (32,) + shape).astype(np.float32), name=f"random{seed}")
    x = interpreter.quantize_input(graph, rng.normal(0.0, 1.5, (6,) + shape).astype(np.float32))
    return graph, x


def kernels_used(graph) -> set[str]:
    return {device_memory.kernel_of(graph, op) for op in graph.ops if op.kind == "conv2d"}


@pytest.mark.parametrize("seed", [0])  # one M4 build: about 10 s idle, 35 s on the loaded 2-core machine
def test_random_convs_on_the_m4_and_the_host_match_the_interpreter(seed, cache):
    need("gcc", "arm-none-eabi-gcc", "qemu-system-arm", "make")
    graph, x = random_case(seed)
    assert kernels_used(graph) == {"conv2d_fast", "conv2d_depthwise"}
    expected = interpreter.run(graph, x)
    assert_equal_int8(cruntime.CModel(graph, cache_dir=cache).run(x), expected, f"seed {seed}, host")
    elf = cruntime.build_firmware(graph, x, cache_dir=cache)
    result = cruntime.run_qemu(elf, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cruntime.parse_digests(result.stdout) == cruntime.digests(expected), f"seed {seed}, M4"


def dsp_instructions(elf) -> dict[str, int]:
    text = subprocess.run(["arm-none-eabi-objdump", "-d", str(elf)], capture_output=True, text=True,
                          check=True).stdout
    words = [line.split("\t")[2].split()[0] for line in text.splitlines() if line.count("\t") >= 2]
    return {name: words.count(name) for name in ("smlad", "sxtb16", "qadd")}


def test_the_m4_firmware_contains_smlad(cache):
    """The DSP path is compiled in (the issue found no SMLAD, SMLALD or SXTB16 in any firmware)."""
    need("arm-none-eabi-gcc", "arm-none-eabi-objdump", "make")
    graph, x = random_case(0)
    counts = dsp_instructions(cruntime.build_firmware(graph, x, cache_dir=cache))
    assert counts["smlad"] >= 8 and counts["sxtb16"] >= 4 and counts["qadd"] >= 1, counts


def test_scratch_rules_are_the_c_companions(cache):
    """device_memory's rule for every fast conv of the random chains = the C _scratch_bytes() of its params."""
    need("gcc", "make")
    lib = cruntime.KernelLibrary(cache)
    for seed in (0, 1):
        graph, _ = random_case(seed)
        for op in graph.ops:
            if op.kind != "conv2d":
                continue
            kernel = device_memory.kernel_of(graph, op)
            impl = "depthwise" if kernel == "conv2d_depthwise" else "fast"
            assert device_memory.op_scratch_bytes(graph, op) == lib.scratch_bytes(impl, graph, op), (seed, op.origin)
    assert "FEDTINY_OP_CONV2D_DEPTHWISE" in codegen.render_model(graph)[1]
