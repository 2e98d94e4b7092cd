"""Microcontroller-sized PyTorch models. Each one quantizes to an int8 graph that fits 1 MB flash / 256 KB SRAM.

Users may bring their own `torch.nn.Module` built from the ops `fedtiny.quantize` supports.
"""

import numpy as np
import torch
from torch import nn


def conv_bn_relu(conv: nn.Module, channels: int, relu6: bool = False) -> nn.Sequential:
    bn = nn.BatchNorm1d(channels) if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d(channels)
    return nn.Sequential(conv, bn, nn.ReLU6() if relu6 else nn.ReLU())


class SensorCNN(nn.Module):
    """1D depthwise-separable CNN for sensor windows (vibration, motion, ECG): input (N, C, L).

    The default widths give 23k parameters (23 KB of int8 flash), the size of the MLPerf Tiny keyword-spotting
    DS-CNN: big enough that a sparse update is a small part of the model, small enough for a Cortex-M4."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4, widths=(32, 64, 96, 128)):
        super().__init__()
        layers = [conv_bn_relu(nn.Conv1d(in_channels, widths[0], 7, stride=2, padding=3, bias=False), widths[0])]
        for cin, cout in zip(widths, widths[1:]):
            layers.append(conv_bn_relu(nn.Conv1d(cin, cin, 5, stride=2, padding=2, groups=cin, bias=False), cin))
            layers.append(conv_bn_relu(nn.Conv1d(cin, cout, 1, bias=False), cout))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class InvertedBottleneck(nn.Module):
    """MobileNetV2 block: pointwise expand, depthwise, pointwise project (linear), residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn_relu(nn.Conv2d(cin, hidden, 1, bias=False), hidden, relu6=True)
        self.depthwise = conv_bn_relu(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), hidden, True)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """2D inverted-bottleneck CNN in the MCUNet / MobileNetV2 style for small images: input (N, C, H, W)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, stem: int = 16,
                 blocks=((16, 1, 2), (24, 2, 3), (24, 1, 3), (32, 2, 3), (32, 1, 3))):
        super().__init__()
        self.stem = conv_bn_relu(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), stem, relu6=True)
        layers, cin = [], stem
        for cout, stride, expand in blocks:
            layers.append(InvertedBottleneck(cin, cout, stride, expand))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class MLP(nn.Module):
    """Multi-layer perceptron for tabular data: input (N, F)."""

    def __init__(self, in_features: int = 30, num_classes: int = 2, hidden=(64, 32)):
        super().__init__()
        layers, cin = [], in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


ZOO = {"sensor_cnn": SensorCNN, "mobilenet": TinyMobileNet, "mlp": MLP}


def build(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A zoo model for inputs of shape (C, L), (C, H, W) or (F,), without the batch axis."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")
    if name == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"the mlp takes feature vectors (F,), not inputs of shape {input_shape}")
        return MLP(input_shape[0], num_classes)
    return ZOO[name](in_channels=input_shape[0], num_classes=num_classes)


def randomize_batchnorm(model: nn.Module, rng: np.random.Generator | int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, in eval mode. A fresh BatchNorm is an identity, so
    tests and benchmarks of folding and quantization use this to make it do something."""
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.running_mean.copy_(torch.from_numpy(rng.normal(0.0, 0.5, n)))
                m.running_var.copy_(torch.from_numpy(rng.uniform(0.3, 2.0, n)))
                if m.affine:
                    m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n)))
                    m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.3, n)))
    return model.eval()
