"""Each zoo model on its real task: pretrain in float, quantize, and check that int8 keeps the accuracy, agrees
with onnxruntime op by op on the real test data, and fits a microcontroller (1 MB flash, 256 KB SRAM).

Tasks: sensor_cnn on the bearing generator (trained on some machines, tested on machines it never saw),
mobilenet on sklearn's digits, mlp on the standardised breast cancer table. Each model trains once per session.
"""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import assert_agrees_with_onnxruntime
from fedtiny import train, zoo
from fedtiny.inspect import flash_bytes, inference_arena
from fedtiny.quantize import quantize
from fedtiny.interpreter import predict, quantize_input
from fedtiny_sim import data

FLASH_BUDGET = 1024 * 1024
SRAM_BUDGET = 256 * 1024
CALIBRATION_SAMPLES = 256


@dataclass
class Trained:
    model: torch.nn.Module
    graph: object
    x_test: np.ndarray
    y_test: np.ndarray
    float_accuracy: float


def _task(name):
    if name == "sensor_cnn":  # pretrain on machines 0..23, test on 10 machines never seen in training
        return data.bearing_dataset(range(24), 40, seed=0), data.bearing_dataset(range(100, 110), 25, seed=0), 12
    if name == "mobilenet":
        return (*data.train_test_split(data.load_digits(), 0.25, seed=0), 12)
    train_set, test_set = data.train_test_split(data.load_breast_cancer(), 0.25, seed=0)
    return (*data.standardize(train_set, test_set), 15)


def _train(name) -> Trained:
    train_set, test_set, epochs = _task(name)
    torch.manual_seed(0)
    model = zoo.build(name, train_set.X.shape[1:], len(train_set.classes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches of 32 small samples: one thread is faster and deterministic
    try:
        train.fit(model, train_set.X, train_set.y, epochs=epochs, seed=0)
    finally:
        torch.set_num_threads(threads)
    calibration = train_set.X[np.random.default_rng(0).permutation(len(train_set))[:CALIBRATION_SAMPLES]]
    graph = quantize(model, calibration, name=name, classes=train_set.classes)
    return Trained(model, graph, test_set.X, test_set.y, train.accuracy(model, test_set.X, test_set.y))


@pytest.fixture(scope="session")
def sensor_cnn():
    return _train("sensor_cnn")


@pytest.fixture(scope="session")
def mobilenet():
    return _train("mobilenet")


@pytest.fixture(scope="session")
def mlp():
    return _train("mlp")


@pytest.fixture(params=["sensor_cnn", "mobilenet", "mlp"])
def trained(request) -> Trained:
    return request.getfixturevalue(request.param)


def test_model_learns_its_task(trained):
    chance = 1.0 / len(np.unique(trained.y_test))
    assert trained.float_accuracy > chance + 0.3, trained.float_accuracy


def test_int8_accuracy_within_one_point_of_float(trained):
    """Quantization may cost at most 1 point of test accuracy (`predict` on int8 vs `train.accuracy` in float).

    One-sided: on the unseen bearing machines many margins are small, and int8 rounding flips a few predictions
    both ways; a net gain is not a defect. How many predictions change at all is checked below.
    """
    int8_accuracy = float((predict(trained.graph, trained.x_test) == trained.y_test).mean())
    assert int8_accuracy >= trained.float_accuracy - 0.01, (int8_accuracy, trained.float_accuracy)


def test_int8_changes_few_predictions(trained):
    with torch.no_grad():
        float_pred = trained.model(torch.as_tensor(trained.x_test)).argmax(1).numpy()
    changed = float((predict(trained.graph, trained.x_test) != float_pred).mean())
    assert changed <= 0.03, changed


def test_every_op_agrees_with_onnxruntime_on_real_test_data(trained):
    """Exact wherever the rounding is not ambiguous, on any CPU. This used to ask 99 % of all outputs to be
    identical, which held for sensor_cnn on AMD and not on an Intel Xeon (98.2 % in one conv): the
    differences are TFLite's two-step rounding near x.5, and how many outputs fall there depends on the
    multipliers of the trained fixture, which the CPU's float kernels decide (conftest.onnxruntime_agreement)."""
    assert_agrees_with_onnxruntime(trained.graph, quantize_input(trained.graph, trained.x_test))


def test_fits_a_microcontroller(trained):
    assert flash_bytes(trained.graph) < FLASH_BUDGET
    assert inference_arena(trained.graph).size < SRAM_BUDGET
