"""Bad input to the `fedtiny` command: one line on stderr naming the problem, exit code 2, no traceback, and no
work done (no run folder, nothing pretrained). Each file is one a new user could hand `fedtiny simulate --data`."""

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.cli import main


def run_cli(*args: str):
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1 mixes stderr into the output unless told
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart, and has no mix_stderr
    return runner.invoke(main, [str(a) for a in args])


def npz(name, **arrays):
    def write(folder):
        np.savez(folder / name, **arrays)
        return ["--data", folder / name]
    return write


def text(name, content: str | bytes, *args: str):
    def write(folder):
        path = folder / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["--data", path, *args]
    return write


def model_file(source: str, factory: str = "make"):
    def write(folder):
        (folder / "mymodel.py").write_text(source)
        return ["--scenario", "medical", "--model", f"{folder / 'mymodel.py'}:{factory}"]
    return write


def options(*args: str):
    return lambda folder: list(args)


RNG = np.random.default_rng(0)
X40 = RNG.normal(size=(40, 3))
Y40 = np.tile([0, 1], 20)
CSV40 = "a,b,label\n" + "".join(f"{a:.3f},{b:.3f},{i % 2}\n" for i, (a, b, _) in enumerate(X40))
LINEAR = ("from torch import nn\n"
          "def make(input_shape, num_classes):\n"
          "    return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, {classes}))\n")

# problem -> (what the error line must say, how to make the input)
CASES = {
    "NaN": ("X contains NaN or inf (1 values in 1 samples, the first is sample 41)",
            text("nan.csv", CSV40 + "nan,1,0\n")),
    "inf": ("X contains NaN or inf", npz("inf.npz", X=np.where(X40 > 2, np.inf, X40), y=Y40)),
    "y shorter than X": ("X has 40 samples but y has shape (39,)", npz("short.npz", X=X40, y=Y40[:-1])),
    "empty file": ("empty file", text("empty.csv", "")),
    "header only": ("empty (no samples)", text("header.csv", "a,b,label\n")),
    "garbage": ("not UTF-8", text("garbage.csv", bytes(range(256)) * 16)),
    "garbage npz": ("unreadable .npz file", text("garbage.npz", "PK\x03\x04 and then nothing")),
    "text features": ("column 'b' is not numeric (value 'high') in line 42", text("words.csv", CSV40 + "1,high,0\n")),
    "ragged rows": ("line 3 has 4 fields, the header has 3", text("ragged.csv", "a,b,label\n0,1,0\n1,2,1,9\n")),
    "no label column": ("missing label column", text("nolabel.csv", "a,b\n1,2\n")),
    "3 samples": ("too few samples of class '0' (2), '1' (1) in 3; each class needs at least 5",
                  text("three.csv", "a,label\n1,0\n2,1\n3,0\n")),
    "5-D X": ("X has shape (40, 1, 2, 2, 2)", npz("fived.npz", X=np.zeros((40, 1, 2, 2, 2)), y=Y40)),
    "zero features": ("X has no features (shape (40, 0))", npz("nofeatures.npz", X=np.zeros((40, 0)), y=Y40)),
    "1e308": ("X has values up to 1e+308", npz("huge.npz", X=np.full((40, 3), 1e308), y=Y40)),
    "one class": ("every sample has the label '1'; a classifier needs at least two",
                  npz("one.npz", X=X40, y=Y40 * 0 + 1)),
    "fractional labels": ("labels must be class ids", npz("fraction.npz", X=X40, y=Y40 / 2)),
    "text groups": ("group must be integers", npz("groups.npz", X=X40, y=Y40, group=np.array(["a"] * 40))),
    "missing file": ("does not exist", lambda folder: ["--data", folder / "nowhere.csv"]),
    "unknown suffix": ("unknown file type '.txt'", text("data.txt", CSV40)),
    "more nodes than samples": ("40 samples leave 22 for the nodes", text("small.csv", CSV40, "--nodes", "50")),
    "more nodes than a scenario has": ("569 samples leave 318 for the nodes",
                                       options("--scenario", "medical", "--nodes", "400")),
    "reserve not below budget": ("the reserve (64 KB) must be smaller than the budget (64 KB)",
                                 options("--budget", "64KB", "--reserve", "64KB")),
    "budget not a size": ("--budget '64 kilo' is not a size", options("--budget", "64 kilo")),
    "no nodes": ("--nodes 0: must be at least 1", options("--nodes", "0")),
    "dropout above 1": ("--dropout 1.5: must be a fraction in [0, 1)", options("--dropout", "1.5")),
    "model not in the zoo": ("neither a zoo model", options("--scenario", "medical", "--model", "resnet50")),
    "missing model file": ("does not exist", options("--scenario", "medical", "--model", "nowhere.py:make")),
    "model file with a syntax error": ("fails on import: SyntaxError", model_file("def make(:\n")),
    "model file without the factory": ("has no function 'build'", model_file(LINEAR.format(classes=2), "build")),
    "factory that raises": ("fails: RuntimeError: no GPU",
                            model_file("def make(s, k):\n    raise RuntimeError('no GPU')\n")),
    "model with the wrong class count": ("gives outputs of shape (3,) for 2 classes",
                                         model_file(LINEAR.format(classes=3))),
    "model for other inputs": ("does not take samples of shape (30,)",
                               model_file(LINEAR.format(classes=2).replace("input_shape[0]", "7"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, monkeypatch):
    expected, make = CASES[case]
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    result = run_cli("simulate", *make(tmp_path), "--out", out)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and result.stdout == ""
    assert not out.exists() and not (tmp_path / "cache").exists()  # refused before any work


def test_quantize_checks_its_data_the_same_way(tmp_path):
    (tmp_path / "one.csv").write_text("a,label\n" + "1,7\n" * 10)
    result = run_cli("quantize", "--model", "mlp", "--data", tmp_path / "one.csv", "-o", tmp_path / "m.ftm")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"Error: {tmp_path / 'one.csv'}: every sample has the label '7'; a classifier needs at least two classes"]


def test_labels_0_and_999_give_a_two_class_model_with_a_note(tmp_path, monkeypatch):
    """Not a 1000-class model: the labels are renumbered 0..K-1 and the class names keep the user's labels."""
    from fedtiny.modelfile import load_model

    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "sparse.csv"
    path.write_text(CSV40.replace(",1\n", ",999\n"))
    result = run_cli("quantize", "--model", "mlp", "--data", path, "-o", tmp_path / "m.ftm")
    assert result.exit_code == 0, result.stderr
    assert f"{path}: labels 0, 999 are classes 0..1" in result.stderr.splitlines()
    graph = load_model(tmp_path / "m.ftm")
    assert graph.tensors[graph.outputs[0]].shape[-1] == 2 and list(graph.meta["classes"]) == ["0", "999"]


def test_a_small_budget_scales_the_default_reserve_and_says_so(tmp_path, monkeypatch):
    """--budget 64KB alone: the 64 KB default reserve would leave nothing, so a quarter of the budget is kept."""
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    result = run_cli("compile", "mlp", "--data", "medical", "--budget", "64KB", "--scheme", "last:2")
    assert result.exit_code == 0, result.stderr
    assert "reserve 16 KB: a quarter of the 64 KB budget, as the default 64 KB does not fit (--reserve sets it)" \
        in result.stderr.splitlines()
    assert "of 49,152 B (budget 65,536 B minus 16,384 B reserved for the network stack)" in result.stdout


# A user's broken model file, given to `quantize` and `compile` as FILE.py:FACTORY: source, factory, the words
# the one error line must hold. Checked before any pretraining (nothing cached).
BROKEN_MODELS = {
    "syntax error": ("def make(:\n", "make", "fails on import: SyntaxError"),
    "raises on import": ("import no_such_module\n", "make", "fails on import: ModuleNotFoundError"),
    "missing factory": (LINEAR.format(classes=2), "build", "has no function 'build'"),
    "factory raises": ("def make(s, k):\n    raise RuntimeError('no GPU')\n", "make", "fails: RuntimeError: no GPU"),
    "returns an int": ("def make(s, k):\n    return 3\n", "make", "is a int, not a torch.nn.Module"),
    "an LSTM": ("from torch import nn\ndef make(s, k):\n    return nn.LSTM(s[0], k)\n", "make",
                "returns a tuple, not one tensor of logits (LSTM"),
    "wrong class count": (LINEAR.format(classes=3), "make", "gives outputs of shape (3,) for 2 classes"),
}


@pytest.mark.parametrize("command", ["quantize", "compile"])
@pytest.mark.parametrize("case", list(BROKEN_MODELS))
def test_quantize_and_compile_refuse_a_broken_model_file_in_one_line(command, case, tmp_path, monkeypatch):
    source, factory, expected = BROKEN_MODELS[case]
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mymodel.py").write_text(source)
    (tmp_path / "data.csv").write_text(CSV40)
    spec = f"{tmp_path / 'mymodel.py'}:{factory}"
    args = (["quantize", "--model", spec, "-o", tmp_path / "m.ftm"] if command == "quantize" else ["compile", spec])
    result = run_cli(*args, "--data", tmp_path / "data.csv")
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / "cache").exists()


def test_quantize_and_compile_take_a_users_module(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "mymodel.py").write_text(LINEAR.format(classes="num_classes"))
    (tmp_path / "data.csv").write_text(CSV40)
    spec = f"{tmp_path / 'mymodel.py'}:make"
    quantized = run_cli("quantize", "--model", spec, "--data", tmp_path / "data.csv", "-o", tmp_path / "m.ftm")
    assert quantized.exit_code == 0, quantized.stderr
    compiled = run_cli("compile", spec, "--data", tmp_path / "data.csv", "--scheme", "last:2", "-o", tmp_path / "p.ftp")
    assert compiled.exit_code == 0 and (tmp_path / "p.ftp").exists(), compiled.stderr
    from_file = run_cli("compile", tmp_path / "m.ftm", "--scheme", "full")
    assert from_file.exit_code == 0 and "scheme full" in from_file.stdout, from_file.stderr
    bare = run_cli("compile", tmp_path / "mymodel.py", "--data", tmp_path / "data.csv")
    assert bare.exit_code == 2 and "mymodel.py:FACTORY" in bare.stderr
