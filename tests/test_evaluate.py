"""`fedtiny evaluate MODEL --data FILE`: a model's accuracy on a user's raw data file, fed exactly as the host fed
its own splits (the per-feature standardization recorded in the model file), and bad input as one line."""

import numpy as np
import pytest
from sklearn.datasets import load_wine

from fedtiny.interpreter import predict
from fedtiny.modelfile import load_model, save_model
from fedtiny_sim.scenarios import load_task
from test_user_input import run_cli


def accuracy_of(output: str) -> float:
    return float(output.split("accuracy ")[1].split(" %")[0])


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """sklearn's wine table (features up to ~1,700: useless to an int8 input without standardization) and a
    model quantized from it."""
    folder = tmp_path_factory.mktemp("wine")
    data = load_wine()
    np.savez(folder / "wine.npz", X=data.data, y=data.target)
    result = run_cli("quantize", "--model", "mlp", "--data", folder / "wine.npz", "-o", folder / "wine.ftm")
    assert result.exit_code == 0, result.stderr
    return folder


def test_evaluate_feeds_raw_data_as_the_host_fed_its_splits(wine):
    result = run_cli("evaluate", wine / "wine.ftm", "--data", wine / "wine.npz")
    assert result.exit_code == 0, result.stderr
    graph = load_model(wine / "wine.ftm")
    task = load_task("", 2, 0, str(wine / "wine.npz"))  # the host's standardized splits of the same file
    x = np.concatenate([task.pretrain.X, task.test.X] + [n.X for n in task.nodes])
    y = np.concatenate([task.pretrain.y, task.test.y] + [n.y for n in task.nodes])
    assert accuracy_of(result.stdout) == pytest.approx(100 * (predict(graph, x) == y).mean(), abs=0.05)
    assert accuracy_of(result.stdout) > 80
    assert len([line for line in result.stdout.splitlines() if "%" in line]) == 1 + 3  # total, then each class
    # the same model without its recorded standardization: raw features saturate the int8 input
    del graph.meta["input_standardization"]
    save_model(graph, wine / "raw.ftm")
    raw = run_cli("evaluate", wine / "raw.ftm", "--data", wine / "wine.npz")
    assert accuracy_of(raw.stdout) < accuracy_of(result.stdout) - 20, raw.stdout


@pytest.mark.parametrize("data, expected", [
    ("medical", "scenario medical has classes ['malignant', 'benign']"),
    ("wrong_shape.npz", "samples of shape (4,), but"),
    ("unknown_label.npz", "are not among the model's classes"),
    ("wine.ftm", "unknown file type '.ftm'"),
])
def test_bad_evaluation_data_is_one_line(wine, data, expected):
    rng = np.random.default_rng(0)
    np.savez(wine / "wrong_shape.npz", X=rng.normal(size=(20, 4)), y=np.arange(20) % 3)
    np.savez(wine / "unknown_label.npz", X=rng.normal(size=(20, 13)), y=np.arange(20) % 4)
    result = run_cli("evaluate", wine / "wine.ftm", "--data", data if data == "medical" else wine / data)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.stderr
