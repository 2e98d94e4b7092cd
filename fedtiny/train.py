"""Float training on the host with PyTorch: pretraining before quantization, and the fp32 baselines."""

import numpy as np
import torch
from torch import nn


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 20, lr: float = 3e-3, batch: int = 32,
        seed: int = 0, params=None) -> nn.Module:
    """Train with Adam and softmax cross-entropy; `params` restricts what trains (default: everything)."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.int64))
    opt = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    logits = model(torch.as_tensor(np.asarray(x, np.float32)))
    return float((logits.argmax(1).numpy() == np.asarray(y)).mean())
