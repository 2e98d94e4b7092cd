"""Float training on the host with PyTorch: pretraining before quantization, and the fp32 baselines.

`pretrain` is how the host trains a model for the fleet: to convergence on a validation part of the host's own
data (early stopping counted in optimizer steps, the best weights restored), so that a small file gets as many
passes as it needs and a large one stops when it stops improving. `fit` is a fixed number of epochs (tests and
benchmarks that need exactly that)."""

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# The rule pretraining follows on any data (simulations/scenarios.py keys its cache by RULE):
VALIDATION_FRACTION = 0.2  # of the host's samples, held out to decide when to stop
BATCH = 32
LR = 3e-3  # Adam's
EVAL_EVERY = 10  # optimizer steps between validation checks
PATIENCE_EPOCHS = 2  # passes over the training part without a better validation score before stopping (patience),
MIN_PATIENCE = 100  # but at least this many optimizer steps: a small set's pass is a few steps (patience_steps)
MIN_DELTA = 0.01  # nats of mean validation cross-entropy: less counts as no better (separable data drives the loss
#                   toward 0 for ever, by ever smaller steps)
MAX_STEPS = 20_000  # the time bound: about 2 minutes for the largest zoo model here, whatever the data
EVAL_CHUNK = 128  # samples in every forward pass when scoring (logits), the last one padded
RULE = (f"adam{LR}/b{BATCH}/val{VALIDATION_FRACTION}/every{EVAL_EVERY}/patience{PATIENCE_EPOCHS}epochs-min"
        f"{MIN_PATIENCE}/delta{MIN_DELTA}/max{MAX_STEPS}/chunk{EVAL_CHUNK}padded")


def steps_per_epoch(samples: int, batch: int = BATCH) -> int:
    """Optimizer steps of one pass over `samples` training samples in batches of `batch` (a last batch of a single
    sample is dropped: BatchNorm cannot train on one)."""
    batch = max(1, min(batch, samples))
    full, rest = divmod(samples, batch)
    return max(1, full + (rest >= 2))


def patience_steps(samples: int, batch: int = BATCH) -> int:
    """Pretraining's patience on `samples` training samples: PATIENCE_EPOCHS passes over them, at least MIN_PATIENCE
    optimizer steps. In passes, not a fixed step count, so that it holds on any data: a fixed 500 steps was six
    passes over the default industrial host's 2,560 samples, most of them spent after its best step, and 45 over
    the vision host's 343 (BENCHMARKS.md, "fedtiny simulate")."""
    return max(MIN_PATIENCE, PATIENCE_EPOCHS * steps_per_epoch(samples, batch))


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 20, lr: float = LR, batch: int = BATCH,
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


def validation_split(y: np.ndarray, fraction: float = VALIDATION_FRACTION, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train indexes, validation indexes) of labels `y`: `fraction` of each class (rounded, at least one where
    the class has two samples or more) goes to validation, drawn by `seed`. Deterministic."""
    y = np.asarray(y)
    rng = np.random.default_rng([seed, 0x7A11])
    val = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        members = members[rng.permutation(len(members))]
        take = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
        val.extend(members[:take].tolist())
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val


@dataclass
class Pretraining:
    """What `pretrain` did: the step whose weights it kept, the steps it ran, why it stopped, and the kept
    weights' validation accuracy and loss."""
    best_step: int
    steps: int
    stopped: str  # "converged" (no better score for the patience's steps) or "step limit"
    val_accuracy: float
    val_loss: float
    val_samples: int


@torch.no_grad()
def logits(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """The float model's outputs for samples x, in eval mode, EVAL_CHUNK samples per forward pass: about half the
    CPU time of one pass over a few hundred samples, whose activations no longer fit in the CPU's caches
    (pretraining scores its validation part every EVAL_EVERY steps: a third of its time in one pass).
    Every pass has exactly EVAL_CHUNK samples, the last one padded with zeros, so a sample's scores do not depend
    on how many samples are scored or which ones share its pass (tests/test_tuning.py): torch's CPU kernels pick
    another summation order for another batch size (here batches below 16 give other last bits than larger
    ones, on one thread as pretraining runs and on several)."""
    model.eval()
    xt = torch.as_tensor(np.asarray(x, np.float32))
    n = len(xt)
    chunks = max(1, -(-n // EVAL_CHUNK))
    padded = torch.cat([xt, xt.new_zeros((chunks * EVAL_CHUNK - n,) + xt.shape[1:])])
    return torch.cat([model(chunk) for chunk in padded.split(EVAL_CHUNK)])[:n]


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a float model on samples x with labels y."""
    out = logits(model, x)
    labels = torch.as_tensor(np.asarray(y, np.int64))
    return float((out.argmax(1) == labels).float().mean()), float(nn.functional.cross_entropy(out, labels))


def pretrain(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
             seed: int = 0, patience: int | None = None, max_steps: int = MAX_STEPS, eval_every: int = EVAL_EVERY,
             lr: float = LR, batch: int = BATCH) -> Pretraining:
    """Adam on (x_train, y_train) until the validation score has not improved for `patience` optimizer steps
    (default: patience_steps of the training part) (or `max_steps`), then the best weights are restored into
    `model`. Better means a higher validation accuracy,
    or the same with a validation loss lower by MIN_DELTA (a small validation set saturates its accuracy long
    before the model stops improving). Deterministic for a seed (the batch order; the caller seeds the initial
    weights), on one thread (the sums of a multi-threaded kernel may be ordered differently, and at these sizes
    threads only contend)."""
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError("pretraining needs training and validation samples")
    if patience is None:
        patience = patience_steps(len(x_train), batch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(model, x_train, y_train, x_val, y_val, seed=seed, patience=patience, max_steps=max_steps,
                         eval_every=eval_every, lr=lr, batch=batch)
    finally:
        torch.set_num_threads(threads)


def _pretrain(model, x_train, y_train, x_val, y_val, *, seed, patience, max_steps, eval_every, lr, batch):
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.as_tensor(np.asarray(x_train, np.float32)), torch.as_tensor(np.asarray(y_train, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = max(1, min(batch, len(xt)))

    def better(current: tuple[float, float], best: tuple[float, float]) -> bool:
        return current[0] > best[0] or (current[0] == best[0] and current[1] < best[1] - MIN_DELTA)

    best, best_step, best_state = evaluate(model, x_val, y_val), 0, copy.deepcopy(model.state_dict())
    step = 0
    while step < max_steps and step - best_step < patience:
        # drop a last partial batch that would be a single sample: BatchNorm cannot train on one
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            if len(idx) < 2 <= len(xt) or step >= max_steps or step - best_step >= patience:
                continue
            model.train()
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            step += 1
            if step % eval_every == 0:
                current = evaluate(model, x_val, y_val)
                if better(current, best):
                    best, best_step, best_state = current, step, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return Pretraining(best_step, step, "converged" if step - best_step >= patience else "step limit",
                       best[0], best[1], len(y_val))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(model, x).argmax(1).numpy() == np.asarray(y)).mean())
