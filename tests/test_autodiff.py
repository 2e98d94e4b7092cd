"""Compiled gradients against PyTorch autograd on the dequantized graph.

The mirror runs each op in float on dequantized weights; its values are forced to the trainer's own int8
forward values (straight-through), and the gradient passes where the op's clamp let values through, so
autograd differentiates exactly the function the device computes. Every gradient the plan makes, of
activations and of parameters, must have cosine similarity >= 0.99 with autograd's. The same holds for the
MSE loss against torch's mse_loss on the dequantized output and the dequantized int8 target.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.compiler import compile_plan
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny.interpreter import quantize_input, quantize_target, run
from fedtiny_device.trainer import Trainer

from fedtiny.zoo import randomize_batchnorm

from test_ops import CASES


def nchw(a):  # (1, H, W, C) -> (1, C, H, W)
    return a.permute(0, 3, 1, 2)


def autograd_mirror(graph, x_int8, label):
    """(parameter grads by tensor name, activation grads by tensor name) from autograd on the dequantized graph.
    label: a class index (cross-entropy), or an int8 target array of the output's values (MSE)."""
    ints = run(graph, x_int8[None], keep=True)  # the int8 forward values, as the trainer computes them
    deq = lambda name, q: torch.tensor((q.astype(np.float64) - graph.tensors[name].zero_point) * graph.tensors[name].scale[0])
    values, params = {}, {}
    (x_name,) = graph.inputs
    values[x_name] = deq(x_name, ints[x_name])
    for op in graph.ops:
        y_name = op.outputs[0]
        xs = [values[n] for n in op.inputs if n in values]
        if op.kind == "conv2d":
            w, b = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
            w_real = torch.tensor(w.data * w.scale[:, None, None, None], requires_grad=True)
            b_real = torch.tensor(b.data * b.scale, requires_grad=True)
            params[w.name], params[b.name] = w_real, b_real
            pt, pl, pb, pr = op.attrs["padding"]
            xin = F.pad(nchw(xs[0]), (pl, pr, pt, pb))
            y = F.conv2d(xin, w_real.permute(0, 3, 1, 2), b_real, stride=op.attrs["stride"], groups=op.attrs["groups"])
            y = y.permute(0, 2, 3, 1)
        elif op.kind == "add":
            y = xs[0] + xs[1]
        elif op.kind in ("avgpool2d", "maxpool2d"):
            pt, pl, _, _ = op.attrs["padding"]
            if op.kind == "avgpool2d":
                y = F.avg_pool2d(nchw(xs[0]), op.attrs["kernel"], op.attrs["stride"], (pt, pl), count_include_pad=False)
            else:
                y = F.max_pool2d(nchw(xs[0]), op.attrs["kernel"], op.attrs["stride"], (pt, pl))
            y = y.permute(0, 2, 3, 1)
        elif op.kind == "reshape":
            y = xs[0].reshape((1,) + tuple(graph.tensors[y_name].shape))
        elif op.kind == "lut":  # the float function in torch, differentiated by autograd
            name, _, spec = op.attrs["function"].partition("(")
            args = [float(v) for v in spec.rstrip(")").split(",") if v.strip()]
            y = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid,
                 "hardswish": F.hardswish, "leaky_relu": F.leaky_relu, "gelu": F.gelu,
                 "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
                 "affine": lambda v, a, b: a * v + b}[name](xs[0], *args)
        elif op.kind == "cat":
            y = torch.cat(xs, op.attrs["axis"] + 1)
        elif op.kind == "mul":
            y = xs[0] * xs[1]
        else:  # clamp
            y = xs[0]
        ours = ints[y_name]
        # the activation's derivative: 0 where ReLU / ReLU6 clipped; int8 saturation is straight-through
        passes = torch.ones(y.shape, dtype=torch.float64)
        activation = op.attrs.get("activation", "none")
        if activation != "none":
            upper = op.attrs["act_max"] if activation == "relu6" else 128
            passes = torch.tensor(((ours > op.attrs["act_min"]) & (ours < upper)).astype(np.float64))
        value = deq(y_name, ours) + (y - y.detach()) * passes
        value.retain_grad()
        values[y_name] = value
    out = values[graph.outputs[0]].reshape(1, -1)
    if np.ndim(label) == 0:
        F.cross_entropy(out, torch.tensor([label])).backward()
    else:  # MSE against the target the device sees: the int8 target, dequantized
        F.mse_loss(out, deq(graph.outputs[0], np.asarray(label)).reshape(1, -1)).backward()
    return ({n: p.grad.numpy() for n, p in params.items()},
            {n: v.grad.numpy() for n, v in values.items() if v.grad is not None})


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def check_step(graph, x_int8, label, scheme="full", loss="cross_entropy"):
    trainer = Trainer(compile_plan(graph, parse(scheme, graph), loss=loss), seed=0)
    trainer.record = {}
    trainer.step(x_int8, label)
    param_grads, act_grads = autograd_mirror(graph, x_int8, label)
    compared = {}
    for name, ours in trainer.record.items():
        if name.startswith("grad:"):
            if "@" not in name:
                continue  # loss/mask buffers: checked through what they feed
            tensor = name[len("grad:"):].split("@")[0]
            if len(graph.consumers(tensor)) > 1:
                continue  # one reader's share of a fan-out; the sum is checked where it is used
            theirs = act_grads[tensor]
        else:
            theirs = param_grads[name][: len(ours)]
        compared[name] = cosine(ours, theirs)
    assert compared, "the plan computed no gradient"
    bad = {n: c for n, c in compared.items() if c < 0.99}
    assert not bad, f"gradients off from autograd (cosine): {bad}"
    return compared


@pytest.mark.parametrize("case", [c for c in CASES if "unfusable" not in c])
def test_every_op_gradient_matches_autograd(case):
    torch.manual_seed(0)
    body, shape = CASES[case]
    body = randomize_batchnorm(body)
    with torch.no_grad():
        features = body(torch.zeros((1,) + shape)).numel()
    model = nn.Sequential(body, nn.Flatten(), nn.Linear(features, 5)).eval()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32,) + shape).astype(np.float32)
    graph = quantize(model, x)
    xq = quantize_input(graph, x)
    for i in range(3):
        check_step(graph, xq[i], label=i % 5)


@pytest.mark.parametrize("name,shape,classes", [("sensor_cnn", (1, 256), 4), ("mobilenet", (1, 8, 8), 10),
                                                ("mlp", (30,), 2)])
def test_zoo_gradients_match_autograd(name, shape, classes):
    from fedtiny import zoo

    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.build(name, shape, classes))
    x = np.random.default_rng(2).normal(size=(32,) + shape).astype(np.float32)
    graph = quantize(model, x)
    xq = quantize_input(graph, x)
    for i in range(3):
        compared = check_step(graph, xq[i], label=i % classes)
    assert len(compared) >= 3


@pytest.mark.usefixtures("torch_on_one_thread")
@pytest.mark.parametrize("name", ["sensor_cnn", "mobilenet"])
def test_gradients_on_real_data_match_autograd(name):
    """Real inputs (bearing windows, digit images) through a model trained on them: real activation statistics."""
    from fedtiny import zoo
    from fedtiny.train import fit
    from fedtiny_sim import data

    torch.manual_seed(0)
    ds = data.bearing_dataset(range(4), 16, seed=0) if name == "sensor_cnn" else data.load_digits()
    model = zoo.build(name, ds.X.shape[1:], len(ds.classes))
    fit(model, ds.X[:256], ds.y[:256], epochs=2)
    graph = quantize(model, ds.X[:256])
    xq = quantize_input(graph, ds.X[-4:])
    for i in range(4):
        check_step(graph, xq[i], int(ds.y[-4 + i]), scheme="full")


def _regression_model(name):
    """(model, input shape): an mlp with 3 outputs, and conv models whose output is a (3, L) / (2, H, W) map."""
    if name == "mlp":
        from fedtiny import zoo

        return zoo.build("mlp", (8,), 3), (8,)
    if name == "conv1d":
        return nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
                             nn.Conv1d(8, 3, 3, padding=1)), (2, 32)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(), nn.AvgPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1)), (1, 8, 8)


@pytest.mark.parametrize("name", ["mlp", "conv1d", "conv2d"])
@pytest.mark.parametrize("scheme", ["full", "last:2"])
def test_mse_gradients_match_autograd(name, scheme):
    """MSE plans against torch's mse_loss on the dequantized graph, targets in the output's quantization."""
    torch.manual_seed(0)
    model, shape = _regression_model(name)
    model = randomize_batchnorm(model).eval()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32,) + shape).astype(np.float32)
    graph = quantize(model, x)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    # targets near the model's outputs, as in a regression task (saturated targets would be a weaker check)
    targets = quantize_target(graph, y + rng.normal(size=y.shape) * y.std())
    xq = quantize_input(graph, x)
    for i in range(3):
        compared = check_step(graph, xq[i], targets[i], scheme=scheme, loss="mse")
        assert any(not n.startswith("grad:") for n in compared)  # a parameter gradient was compared

    # cosine cannot see the scale: the loss gradient itself must be 2 (y - t) / K to the constant's 15 bits
    out = graph.outputs[0]
    trainer = Trainer(compile_plan(graph, parse(scheme, graph), loss="mse"))
    trainer.record = {}
    trainer.step(xq[0], targets[0])
    _, act_grads = autograd_mirror(graph, xq[0], targets[0])
    ours, theirs = trainer.record[f"grad:{out}"].ravel(), act_grads[out].ravel()
    assert np.abs(ours - theirs).max() <= 2e-4 * np.abs(theirs).max(), (ours, theirs)
