"""C runtime: generated C on the host == the Python interpreter (exact int8), fast kernels == reference kernels,
the Cortex-M4 firmware under QEMU prints the interpreter's digests, an over-budget model fails to link, and the
instruction-counting plugin is deterministic.

Tests that need gcc / arm-none-eabi-gcc / qemu-system-arm skip when a tool is missing, unless CI=true.
"""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from fedtiny import interpreter, kernels, zoo
from fedtiny.arith import stochastic_update, update_bits
from fedtiny.zoo import randomize_batchnorm
from fedtiny.inspect import inference_arena
from fedtiny.modelfile import save_model
from fedtiny.quantize import quantize
from fedtiny_device import codegen, cruntime

ZOO_CASES = {"sensor_cnn": ((3, 128), 5), "mobilenet": ((3, 16, 16), 10), "mlp": ((30,), 2)}


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {', '.join(missing)} is missing")
        pytest.skip(f"needs {', '.join(missing)}")


class Mixed(nn.Module):
    """Ops the zoo does not use: grouped conv, padded max/avg pooling, an unfused ReLU (clamp), a real reshape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=1, padding=1)
        self.grouped = nn.Conv2d(8, 8, (3, 2), stride=(2, 1), padding=(1, 0), groups=2)
        self.maxpool = nn.MaxPool2d(3, stride=1, padding=1)
        self.avgpool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8 * 3 * 3, 6)

    def forward(self, x):
        y = torch.relu(self.maxpool(self.grouped(self.conv(x))))
        return self.fc(torch.flatten(self.avgpool(y), 1))


def make_case(name: str, seed: int = 0):
    """(graph, int8 test inputs) for a zoo model or "mixed", quantized with random calibration data."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if name == "mixed":
        shape, model = (4, 10, 7), Mixed().eval()
    else:
        shape, classes = ZOO_CASES[name]
        model = randomize_batchnorm(zoo.build(name, shape, classes), rng)
    calib = rng.normal(0.0, 1.0, (64,) + shape).astype(np.float32)
    graph = quantize(model, calib, name=name)
    x = interpreter.quantize_input(graph, rng.normal(0.0, 1.0, (16,) + shape).astype(np.float32))
    return graph, x


def assert_equal_int8(actual, expected, what):
    if not np.array_equal(actual, expected):
        bad = np.argwhere(actual != expected)
        lines = [f"{tuple(i)}: C {actual[tuple(i)]} != Python {expected[tuple(i)]}" for i in bad[:20]]
        pytest.fail(f"{what}: {len(bad)} of {actual.size} values differ\n" + "\n".join(lines))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", [*ZOO_CASES, "mixed"])
def test_host_c_matches_interpreter(name, fast, cache):
    need("gcc", "make")
    graph, x = make_case(name)
    expected = interpreter.run(graph, x)
    actual = cruntime.CModel(graph, fast=fast, cache_dir=cache).run(x)
    assert_equal_int8(actual, expected, f"{name} ({'fast' if fast else 'reference'} kernels)")


def test_mixed_model_uses_every_kernel_kind():
    graph, _ = make_case("mixed")
    header, source = codegen.render_model(graph)
    for kind in ("FEDTINY_OP_CONV2D_FAST", "FEDTINY_OP_MAXPOOL2D", "FEDTINY_OP_CLAMP", "FEDTINY_OP_AVGPOOL2D"):
        assert kind in source, kind
    assert "FEDTINY_OP_CONV2D," in codegen.render_model(graph, fast=False)[1]
    mobilenet, _ = make_case("mobilenet")
    assert "FEDTINY_OP_ADD" in codegen.render_model(mobilenet)[1]
    assert "FEDTINY_OP_CONV2D_DEPTHWISE" in codegen.render_model(mobilenet)[1]


def random_conv_case(rng, depthwise=False, pointwise=False):
    h, w = rng.integers(1, 9, 2)
    if depthwise:
        cin = int(rng.integers(1, 12))
        groups, cout = cin, cin
        kh, kw = (int(k) for k in rng.integers(1, 6, 2))
    elif pointwise:
        cin, cout, groups, kh, kw = int(rng.integers(1, 40)), int(rng.integers(1, 20)), 1, 1, 1
    else:
        groups = int(rng.integers(1, 4))
        cin, cout = groups * int(rng.integers(1, 5)), groups * int(rng.integers(1, 5))
        kh, kw = (int(k) for k in rng.integers(1, 5, 2))
    stride = [int(s) for s in rng.integers(1, 4, 2)]
    padding = [0, 0, 0, 0] if pointwise else [int(p) for p in rng.integers(0, 3, 4)]
    h, w = max(int(h), kh - padding[0] - padding[2]), max(int(w), kw - padding[1] - padding[3])
    n = 3
    x = rng.integers(-128, 128, (n, h, w, cin), dtype=np.int8)
    weight = rng.integers(-127, 128, (cout, kh, kw, cin // groups), dtype=np.int8)
    bias = rng.integers(-20000, 20000, cout).astype(np.int32)
    bias[0] = rng.choice([2**31 - 1, -(2**31), 5])  # saturation of the int64 accumulator path
    attrs = dict(x_zero_point=int(rng.integers(-128, 128)), y_zero_point=int(rng.integers(-128, 128)),
                 stride=stride, padding=padding, groups=groups,
                 multiplier=[int(m) for m in rng.integers(2**30, 2**31, cout)],
                 shift=[int(s) for s in rng.integers(-31, 8, cout)],
                 act_min=int(rng.integers(-128, 0)), act_max=int(rng.integers(0, 128)))
    return x, weight, bias, attrs


def test_fast_kernels_match_reference_kernels(cache):
    need("gcc", "make")
    lib = cruntime.KernelLibrary(cache)
    rng = np.random.default_rng(1)
    for i in range(300):
        kind = ("general", "depthwise", "pointwise")[i % 3]
        x, weight, bias, attrs = random_conv_case(rng, depthwise=kind == "depthwise", pointwise=kind == "pointwise")
        expected = kernels.conv2d(x, weight, bias, **attrs)
        what = f"case {i} {kind}: x {x.shape} w {weight.shape} {attrs['stride']} {attrs['padding']}"
        assert_equal_int8(lib.conv2d("reference", x, weight, bias, **attrs), expected, f"reference, {what}")
        assert_equal_int8(lib.conv2d("fast", x, weight, bias, **attrs), expected, f"fast, {what}")
        if kind == "depthwise":
            assert_equal_int8(lib.conv2d("depthwise", x, weight, bias, **attrs), expected, f"depthwise, {what}")


def test_fast_kernel_refuses_wrong_shape(cache):
    need("gcc", "make")
    lib = cruntime.KernelLibrary(cache)
    x, weight, bias, attrs = random_conv_case(np.random.default_rng(2))
    weight = np.zeros((2, 3, 3, x.shape[3]), dtype=np.int8)
    attrs.update(groups=1, multiplier=[1 << 30] * 2, shift=[0, 0])
    with pytest.raises(RuntimeError, match="status 1"):
        lib.conv2d("depthwise", x, weight, bias[:2], **attrs)


def test_codegen_writes_arena_and_flash_tables(tmp_path):
    graph, x = make_case("sensor_cnn")
    out = codegen.generate(graph, tmp_path / "gen", x[:2])
    for name in codegen.RUNTIME_FILES + codegen.GENERATED_FILES:
        assert (out / name).exists(), name
    header = (out / "model.h").read_text()
    source = (out / "model.c").read_text()
    assert f"#define FEDTINY_MODEL_ARENA_BYTES {inference_arena(graph).size}\n" in header
    assert f"#define FEDTINY_MODEL_MACS {codegen.count_macs(graph)}UL" in header
    assert "static const int8_t op0_weight[" in source and "static union" in source
    assert "reshape" not in re.sub(r"/\*.*?\*/", "", source)  # aliases emit no op
    assert "const uint32_t fedtiny_n_samples = 2;" in (out / "samples.c").read_text()


def test_codegen_command(tmp_path):
    """`fedtiny codegen`, through the `fedtiny` group, which loads the command from fedtiny_device on use."""
    from fedtiny.cli import main

    graph, x = make_case("mlp")
    save_model(graph, tmp_path / "m.ftm")
    np.save(tmp_path / "s.npy", x[:3])
    result = CliRunner().invoke(main, ["codegen", str(tmp_path / "m.ftm"), "-o", str(tmp_path / "out"),
                                       "--samples", str(tmp_path / "s.npy")])
    assert result.exit_code == 0, result.output
    assert "arena" in result.output and (tmp_path / "out" / "Makefile").exists()
    assert "fedtiny_n_samples = 3;" in (tmp_path / "out" / "samples.c").read_text()


def test_m4_firmware_under_qemu_prints_interpreter_digests(cache):
    need("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm", "make")
    graph, x = make_case("sensor_cnn")
    samples = x[:5]
    elf = cruntime.build_firmware(graph, samples, cache_dir=cache)
    result = cruntime.run_qemu(elf, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cruntime.parse_digests(result.stdout) == cruntime.digests(interpreter.run(graph, samples))
    usage = cruntime.memory_usage(elf)
    arena = inference_arena(graph).size
    assert arena <= usage[".bss"] and usage["ram"] <= 256 * 1024
    print(f"\nsensor_cnn on M4: RAM {usage['ram']} B (arena {arena} B), flash {usage['flash']} B")


def test_over_budget_arena_fails_to_link(cache):
    need("arm-none-eabi-gcc", "make")
    model = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1)).eval()
    calib = np.random.default_rng(3).normal(size=(4, 1, 40000)).astype(np.float32)
    graph = quantize(model, calib, name="too_big")
    assert inference_arena(graph).size > 256 * 1024
    with pytest.raises(cruntime.BuildError, match=r"region .RAM. overflowed"):
        cruntime.build_firmware(graph, cache_dir=cache)


def test_plugin_instruction_count_is_deterministic(cache):
    need("gcc", "arm-none-eabi-gcc", "qemu-system-arm", "make")
    graph, x = make_case("sensor_cnn")
    macs = codegen.count_macs(graph)
    counts = {}
    for fast in (True, False):
        elf = cruntime.build_firmware(graph, x[:2], fast=fast, cache_dir=cache)
        first = cruntime.count_instructions(elf, timeout=60, cache_dir=cache)
        second = cruntime.count_instructions(elf, timeout=60, cache_dir=cache)
        assert first == second
        assert first["regions"] == 2 and 0 < first["region"] < first["total"]
        counts[fast] = first["region"] / first["regions"]
    print(f"\nsensor_cnn: {macs} MACs/inference; fast {counts[True]:.0f} insns/inference "
          f"({counts[True] / macs:.2f}/MAC), reference {counts[False]:.0f} ({counts[False] / macs:.2f}/MAC)")
    assert counts[True] < counts[False]


def random_update_case(rng, i: int):
    """A conv (random_conv_case: general, depthwise or pointwise) with a random output gradient, trainable rows,
    update constants and exponent: k = 15 - shift - e_y takes both signs. Every fourth case has a long output
    (more than one int32 block of positions) and extreme values (|g| = 32767, |x - zx| = 255)."""
    kind = ("general", "depthwise", "pointwise")[i % 3]
    x, weight, bias, attrs = random_conv_case(rng, depthwise=kind == "depthwise", pointwise=kind == "pointwise")
    x = x[0]
    cout, kh, kw, _ = weight.shape
    if i % 4 == 3:
        attrs.update(stride=[1, 1], padding=[0, 0, 0, 0], x_zero_point=127)
        x = np.full((kh, 700, x.shape[2]), -128, dtype=np.int8)
        x[:, ::7] = rng.integers(-128, 128, x[:, ::7].shape)
    (top, left, bottom, right), (sh, sw) = attrs["padding"], attrs["stride"]
    oh, ow = (x.shape[0] + top + bottom - kh) // sh + 1, (x.shape[1] + left + right - kw) // sw + 1
    g_y = rng.integers(-32767, 32768, (oh, ow, cout)).astype(np.int16)
    if i % 4 == 3:
        g_y[:] = 32767
    g_y[rng.random(g_y.shape) < 0.2] = 0
    channels = int(rng.integers(1, cout + 1))
    m, shift = rng.integers(2**14, 2**15, channels), rng.integers(-12, 4, channels)
    return x, weight, dict(attrs, bias=bias), g_y, int(rng.integers(-30, 10)), weight[:channels], m, shift, kind


def python_weight_update(x, weight, attrs, g_y, e_y, rows, m, shift, counter) -> np.ndarray:
    """The Python trainer's update (kernels.conv2d_weight_grad, arith.stochastic_update on arith.update_bits)."""
    sums = kernels.conv2d_weight_grad(g_y[None], x[None], attrs["x_zero_point"], weight.shape[1:3], attrs["stride"],
                                      attrs["padding"], attrs["groups"], len(rows))
    per_row = (slice(None), None, None, None)
    delta = stochastic_update(sums, np.asarray(m)[per_row], np.asarray(shift)[per_row], e_y,
                              update_bits(counter, sums.size))
    return np.clip(rows.astype(np.int64) - delta, -127, 127).astype(np.int8)


def test_fast_weight_update_matches_the_reference_kernel(cache):
    """fedtiny_conv2d_weight_update_fast == fedtiny_conv2d_weight_update == the Python update byte for byte (rows
    and random counter) on random shapes, groups, strides, paddings, zero points and exponents (odd and even row
    lengths and counters, so weight pairs share a draw or straddle two), built as the simulator builds (-O3
    -march=native)."""
    need("gcc", "make")
    lib = cruntime.KernelLibrary(cache)
    rng = np.random.default_rng(5)
    changed = 0
    for i in range(96):
        x, weight, attrs, g_y, e_y, rows, m, shift, kind = random_update_case(rng, i)
        counter = int(rng.integers(0, 2**63))
        expected, expected_counter = lib.weight_update("reference", x, weight, attrs, g_y, e_y, rows, m, shift, counter)
        actual, actual_counter = lib.weight_update("fast", x, weight, attrs, g_y, e_y, rows, m, shift, counter)
        what = f"case {i} {kind}: x {x.shape} w {weight.shape} rows {len(rows)} {attrs['stride']} {attrs['padding']}"
        assert_equal_int8(actual, expected, what)
        assert_equal_int8(expected, python_weight_update(x, weight, attrs, g_y, e_y, rows, m, shift, counter), what)
        assert actual_counter == expected_counter == counter + (rows.size + 1) // 2, what
        changed += int(not np.array_equal(expected, rows))
    assert changed > 60, "the updates changed too few rows to tell kernels apart"


def test_the_build_cache_keeps_the_most_recently_used_builds(tmp_path):
    """The build cache stays bounded: past `keep` builds the least recently used go, and a build found in the cache
    counts as used (make_cached touches it), so what a run keeps using survives."""
    def build(name, used):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".built").write_text("")
        os.utime(tmp_path / name / ".built", (used, used))

    for i in range(5):
        build(f"b{i}-host", 1000 + i)
    (tmp_path / ".b9-host-tmp").mkdir()  # another process's build in progress
    files = {"Makefile": "host:\n\tfalse\n"}  # never run: the build is found
    found, built = cruntime._build_dir(files, "host", tmp_path)
    build(found.name, 999)
    assert cruntime.make_cached(files, "host", "lib.so", tmp_path) == found / "lib.so"  # a hit, touched
    cruntime.evict_builds(tmp_path, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".b9-host-tmp", found.name, "b3-host", "b4-host"])
