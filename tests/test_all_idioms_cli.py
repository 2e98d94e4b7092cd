"""One user module that uses every supported PyTorch idiom (tests/fixtures/all_idioms.py: view flatten, mean over a
dim, squeeze/unsqueeze, torch.cat, multiplying by a number and by a tensor, functional pooling, LeakyReLU, hardswish,
sigmoid, GELU, padding='same', ceil_mode) goes the user's way, from the command line: `fedtiny quantize
FILE.py:FACTORY --data`, `fedtiny compile`, the compiled plan training bit for bit in C, and a short `fedtiny
simulate --model` of the quantized module. An op still unsupported is one line naming it, its module path and
line, exit 2."""

from pathlib import Path

import numpy as np
import pytest

from test_user_input import run_cli

MODULE = Path(__file__).parent / "fixtures" / "all_idioms.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three classes of 2-channel signals of length 24 (a sine per class, noise): small, and learnable."""
    folder = tmp_path_factory.mktemp("all_idioms")
    rng = np.random.default_rng(0)
    y = np.arange(180) % 3
    t = np.arange(24)
    x = np.stack([np.sin(t * (1 + y[:, None]) * 0.4), np.cos(t * (1 + y[:, None]) * 0.25)], axis=1)
    np.savez(folder / "waves.npz", X=(x + 0.3 * rng.normal(size=x.shape)).astype(np.float32), y=y)
    return folder / "waves.npz"


@pytest.fixture(scope="module")
def model_file(data) -> Path:
    out = data.parent / "idioms.ftm"
    result = run_cli("quantize", "--model", f"{MODULE}:make", "--data", data, "-o", out)
    assert result.exit_code == 0, result.output + result.stderr
    return out


def test_quantize_takes_the_module_and_lowers_every_idiom(model_file):
    from fedtiny.modelfile import load_model

    kinds = [op.kind for op in load_model(model_file).ops]
    assert {"cat", "mul", "lut", "reshape", "avgpool2d", "maxpool2d", "conv2d"} <= set(kinds), kinds
    functions = {op.attrs["function"] for op in load_model(model_file).ops if op.kind == "lut"}
    assert {"hardswish", "gelu", "sigmoid", "leaky_relu(0.1)", "affine(0.5, 0.0)"} <= functions, functions


def test_the_compiled_plan_trains_in_c_as_in_python(model_file, data, tmp_path, cache):
    from test_cruntime import need

    from fedtiny.interpreter import quantize_input
    from fedtiny.modelfile import load_model
    from fedtiny.planfile import load_plan
    from fedtiny_device import cruntime
    from fedtiny_device.trainer import Trainer

    need("gcc", "make")
    result = run_cli("compile", model_file, "--scheme", "full", "-o", tmp_path / "idioms.ftp")
    assert result.exit_code == 0, result.output + result.stderr
    plan = load_plan(tmp_path / "idioms.ftp")
    with np.load(data) as d:
        x, y = quantize_input(load_model(model_file), d["X"][:20]), d["y"][:20]
    python, c = Trainer(plan, 7), cruntime.CTrainer(plan, seed=7, cache_dir=cache)
    for xi, yi in zip(x, y):
        python.step(xi, int(yi))
        c.step(xi, int(yi))
    for name, value in python.trainable_state().items():
        np.testing.assert_array_equal(c.trainable_state()[name], value, err_msg=name)


def test_simulate_trains_the_module(model_file, data, tmp_path):
    # the module as `fedtiny quantize` made it (simulate --model FILE.py:FACTORY itself is tests/test_simulate.py's;
    # from the module again it would pretrain a second time)
    result = run_cli("simulate", "--model", model_file, "--data", data, "--nodes", 2, "--rounds", 1,
                     "--scheme", "last:2", "--lr", 0.05, "--epochs", 1, "--quiet", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "run" / "global.ftm").exists()


def test_an_unsupported_op_is_one_line_with_its_name_and_line(data, tmp_path):
    result = run_cli("quantize", "--model", f"{MODULE}:make_refused", "--data", data, "-o", tmp_path / "x.ftm")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cumsum" in lines[0] and "all_idioms.py:" in lines[0] \
        and "torch.cumsum(self.conv(x), -1)" in lines[0], result.stderr
