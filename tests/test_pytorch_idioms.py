"""Everyday PyTorch idioms that need no new kernel: view/reshape/squeeze/unsqueeze, mean over the spatial axes,
functional pooling, padding='same', ceil_mode. Each must lower to the same float function PyTorch computes (the
check that can fail: a wrong padding or axis shows as a different output), and a model using all of them must
train in C exactly as in Python. An op fedtiny still cannot run is refused with the line of forward() using it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.compiler import compile_plan
from fedtiny.interpreter import predict, quantize_input
from fedtiny.ir import to_hwc
from fedtiny.quantize import UnsupportedOpError, float_forward, lower, quantize
from fedtiny.scheme import parse
from fedtiny_device.trainer import Trainer


class Lambda(nn.Module):
    """conv -> f(x, self) -> linear head: one idiom between two layers that train."""

    def __init__(self, f, channels=3, length=20, features=None, one_d=True):
        super().__init__()
        self.conv = nn.Conv1d(channels, 6, 3) if one_d else nn.Conv2d(channels, 6, 3)
        self.f = f
        self.head = nn.LazyLinear(3) if features is None else nn.Linear(features, 3)

    def forward(self, x):
        return self.head(self.f(F.relu(self.conv(x))))


def _flat(x):
    return x.view(x.size(0), -1)


IDIOMS = {
    "view(x.size(0), -1)": (lambda x: x.view(x.size(0), -1), (3, 20)),
    "reshape(x.shape[0], -1)": (lambda x: x.reshape(x.shape[0], -1), (3, 20)),
    "mean(-1)": (lambda x: x.mean(-1), (3, 20)),
    "mean(dim=(2, 3))": (lambda x: torch.mean(x, dim=(2, 3)), (3, 9, 9)),
    "mean(-1, keepdim) then squeeze": (lambda x: x.mean(-1, keepdim=True).squeeze(-1), (3, 20)),
    "unsqueeze(-1) then squeeze(-1)": (lambda x: _flat(x.unsqueeze(-1).squeeze(-1)), (3, 20)),
    "unsqueeze(2) on a 1D map": (lambda x: _flat(F.max_pool2d(x.unsqueeze(2), (1, 2))), (3, 20)),
    "F.adaptive_avg_pool1d": (lambda x: _flat(F.adaptive_avg_pool1d(x, 1)), (3, 20)),
    "F.adaptive_avg_pool2d": (lambda x: torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1), (3, 9, 9)),
    "F.avg_pool1d": (lambda x: _flat(F.avg_pool1d(x, 3, 2)), (3, 20)),
    "F.max_pool2d": (lambda x: _flat(F.max_pool2d(x, 2)), (3, 9, 9)),
    "MaxPool1d ceil_mode": (lambda x: _flat(F.max_pool1d(x, 4, ceil_mode=True)), (3, 21)),
    "MaxPool2d ceil_mode stride 2": (lambda x: _flat(F.max_pool2d(x, 3, 2, ceil_mode=True)), (3, 10, 10)),
    "AvgPool1d ceil_mode": (lambda x: _flat(F.avg_pool1d(x, 3, ceil_mode=True)), (3, 21)),
}


def _samples(shape, n=32, seed=0):
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def _model(f, shape):
    torch.manual_seed(0)
    model = Lambda(f, channels=shape[0], one_d=len(shape) == 2)
    with torch.no_grad():
        model(torch.zeros((1,) + shape))  # materialize the lazy head
    return model.eval()


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_idiom_lowers_to_the_function_pytorch_computes(idiom):
    f, shape = IDIOMS[idiom]
    model, x = _model(f, shape), _samples(shape)
    fg = lower(model, shape)
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    got = float_forward(fg, to_hwc(x))[fg.output].reshape(len(x), -1)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    graph = quantize(model, x)
    assert (predict(graph, x) == ref.argmax(1)).mean() >= 0.9  # and the int8 graph computes it too


@pytest.mark.parametrize("padding, kernel", [("same", 3), ("same", 4), ("valid", 3)])
def test_conv_padding_by_name(padding, kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, kernel, padding=padding), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(3)).eval()
    x = _samples((2, 15))
    with torch.no_grad():
        ref = model(torch.as_tensor(x)).numpy()
    fg = lower(model, (2, 15))
    np.testing.assert_allclose(float_forward(fg, to_hwc(x))[fg.output].reshape(len(x), -1), ref, atol=1e-5)


class AllIdioms(nn.Module):
    """Every idiom above in one model, as a user writes it."""

    def __init__(self, channels=3, classes=4):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, 8, 5, padding="same")
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding="same")
        self.pool = nn.MaxPool1d(3, ceil_mode=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.conv2(y) + y)
        y = F.avg_pool1d(self.pool(y), 2, ceil_mode=True)
        y = y.unsqueeze(-1).squeeze(-1)
        y = F.adaptive_avg_pool1d(y, 1) + y.mean(-1, keepdim=True)
        return self.head(y.view(y.size(0), -1))


def test_a_model_of_all_idioms_trains_in_c_as_in_python(cache):
    from test_cruntime import need

    need("gcc", "make")
    from fedtiny_device.cruntime import CTrainer

    torch.manual_seed(0)
    x = _samples((3, 50), n=64)
    graph = quantize(AllIdioms().eval(), x)
    assert "reshape" in [op.kind for op in graph.ops]
    plan = compile_plan(graph, parse("full", graph))
    samples, labels = quantize_input(graph, x[:40]), np.arange(40) % 4
    python, c = Trainer(plan, 3), CTrainer(plan, seed=3, cache_dir=cache)
    for xi, yi in zip(samples, labels):
        python.step(xi, int(yi))
        c.step(xi, int(yi))
    for name, value in python.trainable_state().items():
        np.testing.assert_array_equal(c.trainable_state()[name], value, err_msg=name)
    assert any(not np.array_equal(v, Trainer(plan, 3).trainable_state()[k])
               for k, v in python.trainable_state().items()), "training changed nothing"


class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return torch.cumsum(self.fc(x), 1)  # the line the error must show


class LayoutMove(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)

    def forward(self, x):
        return self.conv(x).view(x.size(0), 2, -1)  # moves channels into the length axis


@pytest.mark.parametrize("model, shape, words", [
    (Refused(), (6,), ["cumsum", "test_pytorch_idioms.py:", "return torch.cumsum(self.fc(x), 1)"]),
    (LayoutMove(), (2, 10), ["view", "only flattening", "self.conv(x).view(x.size(0), 2, -1)"]),
    (Lambda(lambda x: x.mean(1), features=18), (3, 20), ["mean", "spatial", "dim=1"]),
], ids=["cumsum", "view that moves data", "mean over channels"])
def test_refused_op_names_the_line_of_forward_that_used_it(model, shape, words):
    with pytest.raises(UnsupportedOpError) as err:
        lower(model.eval(), shape)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


class Activations(nn.Module):
    """Every lut function between trainable layers: LeakyReLU, hardswish, sigmoid, tanh, hardsigmoid, x * c + d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc1 = nn.Linear(6 * 18, 12)
        self.fc2 = nn.Linear(12, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        y = F.hardswish(self.leaky(self.conv(x)) * 0.5)
        y = torch.sigmoid(self.fc1(y.view(y.size(0), -1)))
        y = torch.tanh(self.fc2(y)) + F.hardsigmoid(y) - 0.25
        return self.head(y / 2)


def _c_trains_as_python(plan, samples, labels, target, cache):
    """Python's trainer and the C runtime (on the host, or the M4 under QEMU) over the same samples: the same bits;
    on the M4 also the compiler's stack and flash figures against the firmware's."""
    from test_cruntime import need

    from fedtiny_device import cruntime

    python = Trainer(plan, 5)
    for xi, yi in zip(samples, labels):
        python.step(xi, int(yi))
    if target == "host":
        need("gcc", "make")
        c = cruntime.CTrainer(plan, seed=5, cache_dir=cache)
        for xi, yi in zip(samples, labels):
            c.step(xi, int(yi))
        for name, value in python.trainable_state().items():
            np.testing.assert_array_equal(c.trainable_state()[name], value, err_msg=name)
    else:
        need("arm-none-eabi-gcc", "qemu-system-arm", "make")
        elf = cruntime.build_train_firmware(plan, samples, labels, seed=5, steps=len(samples), cache_dir=cache)
        result = cruntime.run_qemu(elf, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert cruntime.parse_train_result(result.stdout) == (
            len(samples), cruntime.trainable_digest(plan, python.trainable_state()), python.rng_counter)
        # and the compiler's memory figures hold for these kernels as the linker and the painted stack see them
        from fedtiny_device import footprint

        report, linked = plan.memory_report(), footprint.runtime_sections(elf.parent / footprint.TRAIN_MAP)
        assert 0 < footprint.step_stack_bytes(result.stdout) <= report["stack_bytes"]
        assert abs(report["device_flash_bytes"] - linked["flash"]) <= 0.05 * linked["flash"], (report, linked)


@pytest.mark.parametrize("target", ["host", "m4"])
def test_lut_ops_train_in_c_as_in_python(target, cache):
    torch.manual_seed(0)
    x = _samples((2, 20), n=64)
    graph = quantize(Activations().eval(), x)
    assert [op.kind for op in graph.ops].count("lut") == 8
    plan = compile_plan(graph, parse("full", graph))
    assert [s.kind for s in plan.steps].count("lut_input_grad") == 8
    _c_trains_as_python(plan, quantize_input(graph, x[:30]), np.arange(30) % 3, target, cache)


class Blocks(nn.Module):
    """The tensor ops of real models: an Inception-style torch.cat of branches with their own grids (along
    channels, and along the length), a squeeze-and-excitation gate x * sigmoid(s) broadcast over the length, the
    product of two maps, and GELU (both forms)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(2, 3, 3, padding=1), nn.Conv1d(2, 4, 5, padding=2)
        self.gate = nn.Linear(7, 7)
        self.c, self.d = nn.Conv1d(7, 4, 3), nn.Conv1d(7, 4, 3)
        self.head = nn.Linear(4 * 36, 3)

    def forward(self, x):
        y = torch.cat([F.gelu(self.a(x)), torch.relu(self.b(x))], dim=1)
        y = y * torch.sigmoid(self.gate(y.mean(-1))).unsqueeze(-1)
        z = torch.cat((self.c(y), F.gelu(self.d(y), approximate="tanh")), -1) * torch.cat([self.d(y), self.c(y)], 2)
        return self.head(z.flatten(1))


@pytest.mark.parametrize("target", ["host", "m4"])
def test_cat_mul_gelu_train_in_c_as_in_python(target, cache):
    torch.manual_seed(0)
    x = _samples((2, 20), n=64)
    graph = quantize(Blocks().eval(), x)
    kinds = [op.kind for op in graph.ops]
    assert (kinds.count("cat"), kinds.count("mul")) == (3, 2)
    plan = compile_plan(graph, parse("full", graph))
    steps = [s.kind for s in plan.steps]
    assert (steps.count("cat_input_grad"), steps.count("mul_input_grad")) == (6, 4)
    _c_trains_as_python(plan, quantize_input(graph, x[:30]), np.arange(30) % 3, target, cache)
