"""C training runtime: the generated C of a training plan == the Python reference Trainer, bit for bit.

- host C (ctypes CTrainer) vs Trainer after 100 steps, every zoo model x every scheme kind: identical trainable
  state (every buffer) and random counter;
- the Cortex-M4 firmware under QEMU (mps2-an386), every zoo model x every scheme kind, runs the same 100 steps
  on samples in flash and prints the digest of the Python Trainer's final state, within 256 KB RAM / 1 MB flash
  (the same Python run as the host test's: one reference per case, the slowest part of both);
- CTrainer instances sharing one build keep separate states; `fedtiny codegen` takes a plan file.

Tests that need gcc / arm-none-eabi-gcc / qemu-system-arm skip when a tool is missing, unless CI=true.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.interpreter import quantize_input
from fedtiny.planfile import save_plan
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny_device import codegen, cruntime
from fedtiny_device.trainer import Trainer

from fedtiny.zoo import randomize_batchnorm

from test_cruntime import need

STEPS = 100
SEED = 7  # the trainers' (stochastic rounding)
MODELS = {"sensor_cnn": ((1, 256), 4), "mobilenet": ((1, 8, 8), 10), "mlp": ((30,), 2)}
SPARSE = {"sensor_cnn": "sparse:3:-2@1/2", "mobilenet": "sparse:4:-3@1/4", "mlp": "sparse:2:-2@1/2"}
SCHEMES = ("classifier", "bias", "last:2", "full", "sparse")


_CASES = {}


def make_case(name: str, seed: int = 0):
    """(graph, int8 samples, labels): random-init model with random BN statistics, quantized on random calibration
    data; STEPS samples from the same distribution with random labels."""
    if name not in _CASES:
        shape, classes = MODELS[name]
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        model = randomize_batchnorm(zoo.build(name, shape, classes), rng)
        graph = quantize(model, rng.normal(0.0, 1.0, (64,) + shape).astype(np.float32), name=name)
        x = quantize_input(graph, rng.normal(0.0, 1.0, (STEPS,) + shape).astype(np.float32))
        _CASES[name] = graph, x, rng.integers(0, classes, STEPS)
    return _CASES[name]


def scheme_spec(name: str, scheme: str) -> str:
    return SPARSE[name] if scheme == "sparse" else scheme


_TRAINED = {}


def trained_case(name: str, scheme: str):
    """(plan, int8 samples, labels, the Python Trainer after STEPS steps from SEED) of a zoo case and scheme, once
    per session: the reference the host C and the M4 firmware are both checked against."""
    if (name, scheme) not in _TRAINED:
        graph, x, labels = make_case(name)
        plan = compile_plan(graph, parse(scheme_spec(name, scheme), graph))
        _TRAINED[name, scheme] = plan, x, labels, python_reference(plan, x, labels, SEED)
    return _TRAINED[name, scheme]


def python_reference(plan, x, labels, seed):
    trainer = Trainer(plan, seed)
    for xi, yi in zip(x, labels):
        trainer.step(xi, int(yi))
    return trainer


def assert_same_state(actual: dict, expected: dict, what: str):
    assert list(actual) == list(expected), what
    for name in expected:
        a, e = actual[name], expected[name]
        if not np.array_equal(a, e):
            bad = np.argwhere(a != e)
            lines = [f"{tuple(i)}: C {a[tuple(i)]} != Python {e[tuple(i)]}" for i in bad[:10]]
            pytest.fail(f"{what}, {name}: {len(bad)} of {e.size} values differ\n" + "\n".join(lines))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(MODELS))
def test_host_c_training_matches_python_trainer(name, scheme, cache):
    need("gcc", "make")
    plan, x, labels, expected = trained_case(name, scheme)
    trainer = cruntime.CTrainer(plan, seed=SEED, cache_dir=cache)
    losses = [trainer.step(xi, int(yi)) for xi, yi in zip(x, labels)]
    assert_same_state(trainer.trainable_state(), expected.trainable_state(), f"{name} {scheme}")
    assert trainer.rng_counter == expected.rng_counter
    assert trainer.last_label_probability == expected.last_label_probability
    assert np.isfinite(losses).all()
    changed = any(not np.array_equal(v, Trainer(plan, SEED).trainable_state()[k])
                  for k, v in trainer.trainable_state().items())
    assert changed, "100 steps changed nothing: the test would not see a wrong update"


def test_ctrainers_sharing_a_build_keep_their_own_state(cache):
    """Two nodes on one plan (one shared library) interleaved == two Python trainers; state loads round-trip."""
    need("gcc", "make")
    graph, x, labels = make_case("sensor_cnn")
    plan = compile_plan(graph, parse("last:2", graph))
    py = [Trainer(plan, 1), Trainer(plan, 2)]
    c = [cruntime.CTrainer(plan, 1, cache_dir=cache), cruntime.CTrainer(plan, 2, cache_dir=cache)]
    for i in range(20):
        for node in (0, 1):
            xi, yi = x[(i + 7 * node) % len(x)], int(labels[(i + 3 * node) % len(x)])
            assert c[node].step(xi, yi) == py[node].step(xi, yi)
    for node in (0, 1):
        assert_same_state(c[node].trainable_state(), py[node].trainable_state(), f"node {node}")
        assert c[node].rng_counter == py[node].rng_counter
    c[0].load_trainable_state(py[1].trainable_state())
    c[0].rng_counter = py[1].rng_counter
    py[0].load_trainable_state(py[1].trainable_state())
    py[0].rng_counter = py[1].rng_counter
    c[0].steps(x[:5], labels[:5])
    for xi, yi in zip(x[:5], labels[:5]):
        py[0].step(xi, int(yi))
    assert_same_state(c[0].trainable_state(), py[0].trainable_state(), "after load")
    assert c[0].rng_counter == py[0].rng_counter
    assert_same_state(c[1].trainable_state(), py[1].trainable_state(), "untouched node")


def test_ctrainers_training_in_threads_keep_their_own_state(cache):
    """Node agents train in threads and ctypes releases the GIL: eight trainers of one build, trained at once,
    end exactly where eight Python trainers do one after another."""
    import threading

    need("gcc", "make")
    graph, x, labels = make_case("sensor_cnn")
    plan = compile_plan(graph, parse("sparse:8:-2@1/2", graph))
    trainers = [cruntime.CTrainer(plan, seed, cache_dir=cache) for seed in range(8)]

    def train(trainer):
        for xi, yi in zip(x[:40], labels[:40]):
            trainer.step(xi, int(yi))

    threads = [threading.Thread(target=train, args=(t,)) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, trainer in enumerate(trainers):
        assert_same_state(trainer.trainable_state(), python_reference(plan, x[:40], labels[:40], seed).trainable_state(),
                          f"thread {seed}")


def test_threads_waiting_for_two_libraries_all_get_a_copy(cache, monkeypatch):
    """More threads than copies, on two libraries at once (one copy each): a released copy wakes a waiter of its own
    library, so every thread finishes, and each trainer ends where the same trainer alone does."""
    import threading

    need("gcc", "make")
    graph, x, labels = make_case("sensor_cnn")
    plans = [compile_plan(graph, parse(scheme, graph)) for scheme in ("sparse:8:-2@1/2", "bias")]
    assert len({str(cruntime.build_plan_host(plan, cache_dir=cache)) for plan in plans}) == 2
    monkeypatch.setattr(cruntime, "MAX_COPIES", 1)
    trainers = [cruntime.CTrainer(plan, seed, cache_dir=cache) for plan in plans for seed in range(4)]

    def train(trainer):
        for i in range(0, 40, 4):  # many short calls: many releases and waits
            trainer.steps(x[i:i + 4], labels[i:i + 4])

    threads = [threading.Thread(target=train, args=(t,), daemon=True) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a thread still waits for a copy that was released"
    for trainer in trainers:
        alone = cruntime.CTrainer(trainer.plan, int(trainers.index(trainer) % 4), cache_dir=cache)
        train(alone)
        assert_same_state(trainer.trainable_state(), alone.trainable_state(), "threaded against alone")


def compiled_constants_training(plan, x, labels, seed: int, cache) -> bytes:
    """The trainable state (fedtiny_wire's layout) after training on x with the plan's update constants compiled
    into the library (codegen.render_plan's default, as the firmware builds it), through bare ctypes."""
    import ctypes

    files = cruntime.plan_sources(plan, with_samples=False)
    assert "set_update_constants" not in files["model.c"]
    lib = ctypes.CDLL(str(cruntime.make_cached(files, "host-train-job", cruntime.TRAIN_JOB_LIB, cache,
                                               prebuilt=cruntime.build_host_kernels(cache))))
    lib.fedtiny_model_train_init.argtypes = [ctypes.c_uint32]
    lib.fedtiny_model_train_batch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p]
    lib.fedtiny_model_store_state.argtypes = [ctypes.c_void_p]
    lib.fedtiny_model_train_init(seed)
    x, labels = np.ascontiguousarray(x, dtype=np.int8), np.ascontiguousarray(labels, dtype=np.int32)
    assert lib.fedtiny_model_train_batch(x.ctypes.data, labels.ctypes.data, len(x), None) == 0
    out = ctypes.create_string_buffer(codegen.state_layout(plan)[1])
    lib.fedtiny_model_store_state(out)
    return out.raw


def test_one_library_serves_every_lr_with_the_compiled_constants_bits(cache):
    """The host library takes the update constants (which carry the lr) as data: plans compiled at two lrs share
    one build, and trainers of both, interleaved on it and in two threads, end byte for byte where a library with
    each lr's constants compiled in ends."""
    import threading

    need("gcc", "make")
    graph, x, labels = make_case("sensor_cnn")
    plans = [compile_plan(graph, parse("sparse:3:-2@1/2", graph), lr=lr) for lr in (0.01, 0.1)]
    assert codegen.update_constants(plans[0]) != codegen.update_constants(plans[1])
    assert len({str(cruntime.build_plan_host(plan, cache_dir=cache)) for plan in plans}) == 1
    trainers = [cruntime.CTrainer(plan, 5, cache_dir=cache) for plan in plans]
    for i in range(0, 60, 10):  # interleaved on one copy of the library
        for trainer in trainers:
            trainer.steps(x[i:i + 10], labels[i:i + 10])

    def train_rest(trainer):
        trainer.steps(x[60:], labels[60:])

    threads = [threading.Thread(target=train_rest, args=(t,)) for t in trainers]  # at once: two copies
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    states = [cruntime.pack_state(plan, t.trainable_state()) for plan, t in zip(plans, trainers)]
    assert states[0] != states[1], "the two lrs trained alike: the test would not see constants ignored"
    for plan, state in zip(plans, states):
        assert state == compiled_constants_training(plan, x, labels, 5, cache), f"lr {plan.lr}"


_M4_RUNS = {}


def m4_training_run(name: str, scheme: str, cache):
    """(plan, elf, QEMU's result) of the Cortex-M4 training firmware for a zoo case and scheme: STEPS steps on the
    case's samples. Built and run once per session: test_device_memory reads this same run's linker map and
    measured stack (an M4 build per zoo model and scheme was the slowest part of both files)."""
    if (name, scheme) not in _M4_RUNS:
        plan, x, labels, _ = trained_case(name, scheme)
        elf = cruntime.build_train_firmware(plan, x, labels, seed=SEED, steps=STEPS, cache_dir=cache)
        _M4_RUNS[name, scheme] = plan, elf, cruntime.run_qemu(elf, timeout=60)
    return _M4_RUNS[name, scheme]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_m4_firmware_trains_like_python_under_qemu(name, scheme, cache):
    need("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm", "make")
    plan, elf, result = m4_training_run(name, scheme, cache)
    expected = trained_case(name, scheme)[3]
    assert result.returncode == 0, result.stdout + result.stderr
    assert cruntime.parse_train_result(result.stdout) == (
        STEPS, cruntime.trainable_digest(plan, expected.trainable_state()), expected.rng_counter)
    usage = cruntime.memory_usage(elf)
    assert plan.arena_size <= usage[".bss"]
    assert usage["ram"] <= 256 * 1024 and usage["flash"] <= 1024 * 1024
    print(f"\n{name} {scheme} on M4: RAM {usage['ram']} B (arena {plan.arena_size} B, scratch "
          f"{plan.memory_report()['scratch_bytes']} B), flash {usage['flash']} B")


def test_m4_training_firmware_runs_the_fast_weight_update_with_smlad(cache):
    """The `full` firmware's op table calls the fast weight update (fedtiny_kernels_bwd_fast.c), whose sums are
    SMLAD instructions (ACLE __smlad, two int16 MACs each): the disassembly of that function holds them."""
    import subprocess

    need("arm-none-eabi-gcc", "arm-none-eabi-objdump", "qemu-system-arm", "make")
    plan, elf, result = m4_training_run("sensor_cnn", "full", cache)  # the build test_m4_firmware_... checks
    assert "FEDTINY_OP_CONV2D_WEIGHT_UPDATE_FAST" in (elf.parent / "model.c").read_text()
    disassembly = subprocess.run(["arm-none-eabi-objdump", "-d", str(elf)], capture_output=True, text=True,
                                 check=True).stdout
    start = disassembly.index("<fedtiny_conv2d_weight_update_fast>:")
    body = disassembly[start:disassembly.find("\n\n", start)]
    assert body.count("\tsmlad\t") >= 2, body[-2000:]


def test_m4_firmwares_link_one_kernel_build(cache):
    """The kernels depend on no plan on the M4 either: two models' training firmwares link the objects `make
    m4-kernels` built once (about 2.5 of a training firmware's 2.9 s of compiling)."""
    need("arm-none-eabi-gcc", "qemu-system-arm", "make")
    elves = [m4_training_run(name, "classifier", cache)[1] for name in ("sensor_cnn", "mlp")]
    kernels = cruntime.build_m4_kernels(cache_dir=cache)
    assert len({path.parent for path in kernels}) == 1 and len({elf.parent for elf in elves}) == 2
    for path in kernels:
        for elf in elves:
            assert (elf.parent / path.name).read_bytes() == path.read_bytes(), path.name


def test_firmware_digest_changes_with_state(cache):
    """The digest covers every trainable byte: a one-LSB change in the last buffer changes it."""
    graph, _, _ = make_case("mlp")
    plan = compile_plan(graph, parse("classifier", graph))
    state = Trainer(plan, 0).trainable_state()
    before = cruntime.trainable_digest(plan, state)
    last = plan.trainable_buffers()[-1]
    state[last].reshape(-1)[-1] += 1
    assert cruntime.trainable_digest(plan, state) != before


def test_codegen_command_takes_a_plan_file(tmp_path):
    graph, x, labels = make_case("mlp")
    plan = compile_plan(graph, parse("bias", graph))
    save_plan(plan, tmp_path / "p.ftp")
    np.save(tmp_path / "x.npy", x[:4])
    np.save(tmp_path / "y.npy", labels[:4])
    result = CliRunner().invoke(codegen.codegen_command, [
        str(tmp_path / "p.ftp"), "-o", str(tmp_path / "out"), "--samples", str(tmp_path / "x.npy"),
        "--labels", str(tmp_path / "y.npy"), "--steps", "9", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "training plan 'bias'" in result.output
    header = (tmp_path / "out" / "model.h").read_text()
    assert f"#define FEDTINY_MODEL_ARENA_BYTES {plan.arena_size}\n" in header
    assert f"#define FEDTINY_MODEL_TRAIN_MACS {codegen.count_train_macs(plan)['total']}UL" in header
    samples = (tmp_path / "out" / "samples.c").read_text()
    assert "fedtiny_train_steps = 9;" in samples and "fedtiny_train_seed = 3;" in samples
    source = (tmp_path / "out" / "model.c").read_text()
    assert "static const int8_t op0_weight[" in source  # frozen weights stay in flash
    assert "weight_sram = (const int8_t *)(const void *)&arena.bytes[" in source  # trainable rows in the arena
    assert (tmp_path / "out" / "firmware_train.c").exists()


# ---- MSE (regression / reconstruction) ------------------------------------------------------------------------
REGRESSION = {"sensor_cnn": (1, 256), "mlp": (30,)}
MSE_SCHEMES = ("full", "sparse")
_MSE_CASES = {}


def make_mse_case(name: str, seed: int = 0):
    """(graph, int8 samples, int8 targets (STEPS, K)): a zoo model with 3 regression outputs, targets spread
    around its outputs (a few saturate), quantized in the output's quantization."""
    from fedtiny.interpreter import quantize_target

    if name not in _MSE_CASES:
        shape = REGRESSION[name]
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        model = randomize_batchnorm(zoo.build(name, shape, 3), rng)
        graph = quantize(model, rng.normal(0.0, 1.0, (64,) + shape).astype(np.float32), name=name)
        xf = rng.normal(0.0, 1.0, (STEPS,) + shape).astype(np.float32)
        with torch.no_grad():
            y = model(torch.from_numpy(xf)).numpy()
        targets = quantize_target(graph, y + rng.normal(0.0, 2.0 * y.std(), y.shape))
        _MSE_CASES[name] = graph, quantize_input(graph, xf), targets
    return _MSE_CASES[name]


@pytest.mark.parametrize("scheme", MSE_SCHEMES)
@pytest.mark.parametrize("name", list(REGRESSION))
def test_host_c_mse_training_matches_python_trainer(name, scheme, cache):
    need("gcc", "make")
    graph, x, targets = make_mse_case(name)
    plan = compile_plan(graph, parse(scheme_spec(name, scheme), graph), loss="mse")
    py = Trainer(plan, 7)
    expected_losses = [py.step(xi, ti) for xi, ti in zip(x, targets)]
    trainer = cruntime.CTrainer(plan, seed=7, cache_dir=cache)
    losses = [trainer.step(xi, ti) for xi, ti in zip(x[:50], targets[:50])]
    losses += trainer.steps(x[50:], targets[50:])  # the batch entry point too
    assert_same_state(trainer.trainable_state(), py.trainable_state(), f"{name} {scheme} mse")
    assert trainer.rng_counter == py.rng_counter
    assert losses == expected_losses and trainer.last_loss == py.last_loss
    changed = any(not np.array_equal(v, Trainer(plan, 7).trainable_state()[k])
                  for k, v in trainer.trainable_state().items())
    assert changed, "100 steps changed nothing: the test would not see a wrong update"


def test_host_c_mse_training_of_a_feature_map_matches_python(cache):
    """MSE on an output of any shape (a reconstruction-style (H, W, C) map), with ReLU6 / avgpool in between."""
    from torch import nn

    from fedtiny.interpreter import quantize_target

    need("gcc", "make")
    rng = np.random.default_rng(5)
    torch.manual_seed(5)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(),
                                       nn.AvgPool2d(2), nn.Conv2d(6, 2, 3, padding=1)), rng)
    xf = rng.normal(0.0, 1.0, (40, 1, 8, 8)).astype(np.float32)
    graph = quantize(model, xf)
    assert graph.tensors[graph.outputs[0]].shape == (4, 4, 2)
    with torch.no_grad():
        y = model(torch.from_numpy(xf)).numpy()
    x, targets = quantize_input(graph, xf), quantize_target(graph, y + rng.normal(0.0, y.std(), y.shape))
    plan = compile_plan(graph, parse("full", graph), loss="mse")
    py = Trainer(plan, 3)
    expected = [py.step(xi, ti.reshape(4, 4, 2)) for xi, ti in zip(x, targets)]  # the output's shape works too
    trainer = cruntime.CTrainer(plan, seed=3, cache_dir=cache)
    assert trainer.steps(x, targets) == expected
    assert_same_state(trainer.trainable_state(), py.trainable_state(), "feature map mse")
    assert trainer.rng_counter == py.rng_counter


def test_m4_firmware_trains_mse_like_python_under_qemu(cache):
    need("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm", "make")
    graph, x, targets = make_mse_case("sensor_cnn")
    plan = compile_plan(graph, parse(scheme_spec("sensor_cnn", "sparse"), graph), loss="mse")
    expected = Trainer(plan, 11)
    for xi, ti in zip(x, targets):
        expected.step(xi, ti)
    elf = cruntime.build_train_firmware(plan, x, targets, seed=11, steps=STEPS, cache_dir=cache)
    result = cruntime.run_qemu(elf, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert cruntime.parse_train_result(result.stdout) == (
        STEPS, cruntime.trainable_digest(plan, expected.trainable_state()), expected.rng_counter)
    initial = cruntime.trainable_digest(plan, Trainer(plan, 11).trainable_state())
    assert cruntime.trainable_digest(plan, expected.trainable_state()) != initial, "MSE training changed nothing"
    source = "".join(v for k, v in cruntime.plan_sources(plan, x, targets, 11, STEPS).items() if k == "samples.c")
    assert "const int8_t fedtiny_targets[" in source and "fedtiny_labels" not in source


def test_mse_plans_refuse_wrong_targets(cache):
    need("gcc", "make")
    graph, x, targets = make_mse_case("mlp")
    plan = compile_plan(graph, parse("bias", graph), loss="mse")
    trainer = cruntime.CTrainer(plan, cache_dir=cache)
    with pytest.raises(ValueError, match="int8"):
        trainer.steps(x[:2], targets[:2].astype(np.int32))
    with pytest.raises(ValueError, match="int8"):
        Trainer(plan).step(x[0], 1)  # a class label is not a target
    with pytest.raises(ValueError, match="targets must be int8"):
        codegen.render_train_samples(plan, x[:2], targets[:1])
