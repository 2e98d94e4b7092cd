"""The learning rate and local epochs of a run, chosen on the host's validation data by one rule for every model,
dataset and update scheme (nothing tuned per scenario).

The rule: the host's data is split as for pretraining (fedtiny.train.validation_split). For each learning rate of
LRS (half-decade steps) the host plays one federated round on its own data, in two folds: its training part's
shards scored on its validation part (does a round generalise?), and its validation part's shards (samples the
pretrained model never fitted, whose gradients are as large as a device's) scored on its training part (does a
round on unseen samples keep what the model knew, or diverge?). Shards have a device's size (the median node's
sample count; at most MAX_SHARDS of them, spread over the labels) and are cut after sorting by label, so each holds
one class or two: the worst label skew a fleet can have. Every shard trains from the pretrained model as a device
would, 1 to MAX_EPOCHS epochs, and the shards' states are averaged (FedAvg). The folds' accuracy and mean
cross-entropy, weighted by the samples each scored, score the (lr, epochs): the best accuracy wins; among equals the
largest lr (a host model that already fits its host's data ties every small lr, and the devices' data is not the
host's), then the lower loss, then the fewer epochs. A learning rate that diverges, or that drives each skewed
shard to forget the other classes (client drift), loses accuracy and is not chosen over one that holds.

    devices   the real int8 training plan (the run's scheme, budget and reserve, compiled at that lr) on the
              trainer the nodes run (the C trainer when gcc is present), samples in a node's training order
    baseline  the fp32 baseline's own update (simulations/baseline.py: SGD at batch 1, BatchNorm statistics
              frozen) from the float model, at the epochs the devices run, so the two sides get the same work
              and each its own best lr

Given values are kept: `--lr` fixes the lr (the epochs are still chosen at it), `--epochs` the epochs, and
`--baseline-lr` the baseline's lr. Choices are cached by content (the model's weights, the scheme, the budget, the
shard size, this rule and the sources that decide integer training: `fedtiny.compiler.training_semantics`) beside
the pretrained models.
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fedtiny.compiler import training_semantics

LRS = tuple(round(10 ** (k / 2), 6) for k in range(-7, -1))  # 3.2e-4 .. 0.1 in half decades
MAX_EPOCHS = 3
MAX_SHARDS = 8
MAX_SCORED = 512  # of the training part scored in the second fold: a time bound
TRIAL = f"lrs{LRS}/epochs1-{MAX_EPOCHS}/shards{MAX_SHARDS}/scored{MAX_SCORED}/skewed-round-2fold/v3"  # cache key


@dataclass(frozen=True)
class Choice:
    lr: float
    epochs: int
    val_accuracy: float  # the trial's accuracy with (lr, epochs): both folds' scored samples
    val_loss: float
    start_accuracy: float  # the same samples' accuracy before the round
    scheme: str = ""  # the update scheme it was chosen for (devices)
    tried: tuple[tuple[float, int, float, float], ...] = ()  # (lr, epochs, accuracy, loss) for each candidate


def best(tried: list[tuple[float, int, float, float]]) -> tuple[float, int, float, float]:
    """The winning (lr, epochs, accuracy, loss): the highest accuracy; among equals the largest lr (the most a
    device can learn per step at no cost the host can measure: a host model that already fits its own data ties
    every small lr), then the lowest loss, then the fewest epochs. A non-finite loss (a diverged float model, whose
    NaN logits still give some argmax) ranks last."""
    return min(tried, key=lambda t: (not np.isfinite(t[3]), -t[2], -t[0], t[3], t[1]))


def trial_threads() -> int:
    """Threads the lrs' trials run in: one per core this process may use. Each lr trains its own model (its own C
    library, or its own PyTorch copy on one thread), and C calls and PyTorch's ops release the GIL, so the trials
    share no state and give the same scores in any number of threads."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _choose(train_and_score, lrs, epochs_grid, start, scheme: str = "", threads: int = 1) -> Choice:
    """train_and_score(lr, max_epochs) -> [(accuracy, loss) after epoch 1..max_epochs], for each lr in up to
    `threads` threads at a time."""
    with ThreadPoolExecutor(max(1, min(threads, len(lrs)))) as pool:
        all_scores = list(pool.map(lambda lr: train_and_score(lr, max(epochs_grid)), lrs))
    tried = []
    for lr, scores in zip(lrs, all_scores, strict=True):
        tried += [(lr, e, *scores[e - 1]) for e in epochs_grid]
    lr, epochs, accuracy, loss = best(tried)
    return Choice(lr, epochs, accuracy, loss, start, scheme, tuple(tried))


def _int8_scores(graph, xq: np.ndarray, y: np.ndarray, outputs: np.ndarray | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the int8 graph on xq; `outputs`: its int8 outputs when already computed
    (by the C library), else the reference interpreter runs it."""
    from fedtiny.interpreter import dequantize, run

    outputs = run(graph, xq) if outputs is None else outputs
    logits = dequantize(graph, graph.outputs[0], outputs).reshape(len(xq), -1).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float((logits.argmax(axis=1) == y).mean()), float(-log_p[np.arange(len(y)), y].mean())


def skewed_shards(y: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """The host's training samples cut into shards of `shard_size` (at least one shard) after sorting by label: each
    shard holds one class or two, the worst label skew a fleet can have."""
    order = np.argsort(np.asarray(y), kind="stable")
    count = max(1, len(order) // max(1, shard_size))
    shards = [part for part in np.array_split(order, count) if len(part)]
    # a time bound: MAX_SHARDS of them, evenly spread over the label order so that every class still trains
    return [shards[i] for i in np.unique(np.linspace(0, len(shards) - 1, MAX_SHARDS).round().astype(int))]


def folds(y_train: np.ndarray, y_val: np.ndarray, shard_size: int) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """The trial's two folds over the host's samples indexed train first, then validation: (shards, scored).
    The training part's shards are scored on the validation part (does a round generalise?), and the validation
    part's shards, samples the pretrained model never fitted and whose gradients are as large as a device's, on
    (up to MAX_SCORED of) the training part (does a round on unseen samples keep what the model knew, or diverge?)."""
    n_train = len(y_train)
    scored_train = np.argsort(y_train, kind="stable")
    scored_train = np.sort(scored_train[np.unique(np.linspace(0, n_train - 1, min(n_train, MAX_SCORED)).astype(int))])
    return [(skewed_shards(y_train, shard_size), n_train + np.arange(len(y_val))),
            ([n_train + shard for shard in skewed_shards(y_val, shard_size)], scored_train)]


def _trial_round(train_shard, average, score, trial_folds, max_epochs: int) -> list[tuple[float, float]]:
    """One federated round on the host per fold: every shard trains from the start for 1..max_epochs epochs
    (train_shard(shard, epochs) yields its state after each epoch), the states after e epochs are averaged and
    scored (score(state, indexes) -> accuracy, loss); the folds' scores are weighted by how many samples each
    scored."""
    total = sum(len(scored) for _, scored in trial_folds)
    results = np.zeros((max_epochs, 2))
    for shards, scored in trial_folds:
        per_shard = [list(train_shard(shard, max_epochs)) for shard in shards]
        for e in range(max_epochs):
            results[e] += np.asarray(score(average([states[e] for states in per_shard]), scored)) * len(scored)
    return [(float(a / total), float(loss / total)) for a, loss in results]


def _weighted(score, trial_folds) -> float:
    """The accuracy of score(indexes) over the folds' scored samples, weighted by their count (the untrained start)."""
    return sum(score(scored)[0] * len(scored) for _, scored in trial_folds) / sum(len(s) for _, s in trial_folds)


def choose_device(config, graph, train, val, *, shard_size: int, lrs=LRS, epochs_grid=None, seed: int = 0,
                  trainer_factory=None, threads: int | None = None) -> Choice:
    """The devices' (lr, epochs) by the rule, on the int8 `graph` with config's scheme and budget (train and val:
    the host's Datasets; shard_size: the samples a device holds)."""
    from fedtiny.interpreter import quantize_input
    from fedtiny_device.agent import training_permutation

    from .simulate import training_plan

    if trainer_factory is None:
        from fedtiny_device.trainer import Trainer as trainer_factory
    epochs_grid = tuple(epochs_grid or range(1, MAX_EPOCHS + 1))
    xq = quantize_input(graph, np.concatenate([train.X, val.X]))
    y = np.concatenate([train.y, val.y])
    trial_folds = folds(train.y, val.y, shard_size)

    def train_and_score(lr: float, max_epochs: int) -> list[tuple[float, float]]:
        plan = training_plan(replace(config, lr=lr), graph)
        trainer = trainer_factory(plan, seed)
        start = plan.initial_state()

        def train_shard(shard, epochs):
            trainer.load_trainable_state(start)
            for epoch in range(epochs):
                order = shard[training_permutation(seed, 1, epoch, len(shard))]
                trainer.steps(xq[order], y[order])  # the C trainer: a whole epoch in one call
                yield trainer.trainable_state()

        def average(states):  # FedAvg of equal shards, rounded back to each buffer's integer type
            return {name: np.rint(np.mean([st[name].astype(np.float64) for st in states], axis=0))
                    .astype(start[name].dtype) for name in start}

        forward = None  # with the C trainer, its library's forward pass: the interpreter's integers, ~5x cheaper
        if hasattr(trainer, "run_job"):
            from fedtiny_device.cruntime import CPlanModel

            forward = CPlanModel(plan)

        def score(st, idx):
            return _int8_scores(plan.graph_with(st), xq[idx], y[idx], forward(st, xq[idx]) if forward else None)

        return _trial_round(train_shard, average, score, trial_folds, max_epochs)

    first = trainer_factory(training_plan(replace(config, lr=lrs[0]), graph), seed) \
        if hasattr(trainer_factory, "run_job") else None  # the C trainer: its library's forward pass scores
    forward = run_forward(first.plan) if first is not None else None
    start = _weighted(lambda idx: _int8_scores(graph, xq[idx], y[idx], forward(xq[idx]) if forward else None),
                      trial_folds)
    choice = _choose(train_and_score, lrs, epochs_grid, start, threads=threads or trial_threads())
    return replace(choice, scheme=config.scheme)


def choose_baseline_lr(model, train, val, epochs: int, *, shard_size: int, lrs=LRS, seed: int = 0,
                       threads: int | None = None) -> Choice:
    """The fp32 baseline's lr by the rule, at the devices' `epochs`."""
    import copy

    import torch
    from torch import nn

    from fedtiny.train import evaluate

    x_all, y_all = np.concatenate([train.X, val.X]).astype(np.float32), np.concatenate([train.y, val.y])
    xt, yt = torch.as_tensor(x_all), torch.as_tensor(y_all.astype(np.int64))
    trial_folds = folds(train.y, val.y, shard_size)

    def train_and_score(lr: float, max_epochs: int) -> list[tuple[float, float]]:
        def train_shard(shard, epochs):
            trained = copy.deepcopy(model).eval()  # BatchNorm statistics frozen, as in the baseline and on devices
            opt = torch.optim.SGD(trained.parameters(), lr=lr)
            for epoch in range(epochs):
                for j in shard[np.random.default_rng([seed, 1, epoch]).permutation(len(shard))]:
                    opt.zero_grad()
                    nn.functional.cross_entropy(trained(xt[j:j + 1]), yt[j:j + 1]).backward()
                    opt.step()
                yield copy.deepcopy(trained.state_dict())

        def average(states):
            return {k: torch.stack([st[k].double() for st in states]).mean(0).to(states[0][k].dtype)
                    for k in states[0]}

        def score(state, idx):
            averaged = copy.deepcopy(model)
            averaged.load_state_dict(state)
            return evaluate(averaged, x_all[idx], y_all[idx])

        return _trial_round(train_shard, average, score, trial_folds, max_epochs)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch 1: more threads only contend (as in baseline.run_baseline)
    try:
        start = _weighted(lambda idx: evaluate(model, x_all[idx], y_all[idx]), trial_folds)
        return _choose(train_and_score, lrs, (epochs,), start, threads=threads or trial_threads())
    finally:
        torch.set_num_threads(torch_threads)


def _cache_file(kind: str, graph, *parts) -> Path:
    digest = hashlib.sha256(f"{TRIAL}/{training_semantics()}".encode())
    for tensor in sorted(graph.tensors.values(), key=lambda t: t.name):
        if tensor.is_constant:
            digest.update(tensor.name.encode() + np.ascontiguousarray(tensor.data).tobytes())
    digest.update(repr(parts).encode())
    cache = Path(os.environ.get("FEDTINY_CACHE") or Path.home() / ".cache" / "fedtiny")
    return cache / f"tuning-{kind}-{digest.hexdigest()[:16]}.json"


def _cached(path: Path, compute) -> Choice:
    if path.exists():  # the trial's scores; the winner is ranked again (best), so the ranking may change
        data = json.loads(path.read_text())
        tried = tuple(tuple(t) for t in data["tried"])
        lr, epochs, accuracy, loss = best(list(tried))
        return Choice(lr, epochs, accuracy, loss, data["start_accuracy"], data["scheme"], tried)
    choice = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(choice)))
    return choice


def _shard_size(task) -> int:
    return int(np.median([len(node) for node in task.nodes]))  # the samples a device trains on in a round


def settle(config, task, model, graph, train, val, trainer_factory=None, lrs: tuple[float, ...] = LRS) -> list[str]:
    """Fill config.lr and config.epochs where the user left them None, by the rule, trying `lrs` (simulate narrows
    them to the neighbours of the lr `--scheme auto` found best: autoscheme.lr_neighbours); returns the lines that
    say what was chosen and on what. The baseline's lr is settle_baseline's (after this: it trains at these
    epochs)."""
    lines = []
    shard_size = _shard_size(task)
    if config.lr is None or config.epochs is None:
        lrs = lrs if config.lr is None else (config.lr,)
        epochs_grid = tuple(range(1, MAX_EPOCHS + 1)) if config.epochs is None else (config.epochs,)
        path = _cache_file("device", graph, task.model, config.scheme, config.budget, config.reserve, lrs,
                           epochs_grid, config.seed, len(train), len(val), shard_size)
        choice = _cached(path, lambda: choose_device(config, graph, train, val, shard_size=shard_size,
                                                     lrs=lrs, epochs_grid=epochs_grid, seed=config.seed,
                                                     trainer_factory=trainer_factory))
        config.lr, config.epochs = choice.lr, choice.epochs
        lines.append(f"devices: lr {choice.lr:g}, {choice.epochs} epoch(s) per round (scheme {choice.scheme}), "
                     f"chosen on the host's data ({len(train)} + {len(val)} validation samples): int8 accuracy "
                     f"{100 * choice.start_accuracy:.1f} % -> {100 * choice.val_accuracy:.1f} % after a round on "
                     f"label-skewed shards of {shard_size} host samples (tried lr {min(lrs):g}..{max(lrs):g}, "
                     f"{min(epochs_grid)}..{max(epochs_grid)} epochs)")
    return lines


def settle_baseline(config, task, model, graph, train, val) -> list[str]:
    """Fill config.baseline_lr (with --baseline, where the user left it None) by the rule, at config.epochs (settle's
    choice); returns the line that says what was chosen. simulate times it as the baseline's own work."""
    if not config.baseline or config.baseline_lr is not None:
        return []
    shard_size = _shard_size(task)
    path = _cache_file("baseline", graph, config.epochs, config.seed, LRS, len(train), len(val), shard_size)
    choice = _cached(path, lambda: choose_baseline_lr(model, train, val, config.epochs, shard_size=shard_size,
                                                      seed=config.seed))
    config.baseline_lr = choice.lr
    return [f"baseline: fp32 lr {choice.lr:g} at {config.epochs} epoch(s), chosen by the same rule: "
            f"accuracy {100 * choice.start_accuracy:.1f} % -> {100 * choice.val_accuracy:.1f} %"]


def near_chance(accuracy: float, y: np.ndarray) -> tuple[bool, float]:
    """(whether `accuracy` on labels y is within two standard errors of always answering the most common class,
    that class's share)."""
    y = np.asarray(y)
    chance = float(np.bincount(y).max() / len(y)) if len(y) else 0.0
    return accuracy <= chance + 2 * np.sqrt(chance * (1 - chance) / max(1, len(y))), chance


def run_forward(plan):
    """xq (int8 samples) -> the int8 outputs of the plan's model as flashed (its initial state), from the plan's C
    library: the reference interpreter's integers (tests/test_ctrainer.py), about 20x cheaper in CPU."""
    from fedtiny_device.cruntime import CPlanModel

    model, state = CPlanModel(plan), plan.initial_state()
    return lambda xq: model.run(state, xq)


def host_accuracy_lines(model, graph, val, forward=None) -> list[str]:
    """The host model's float and int8 accuracy on the host's validation data, how its pretraining stopped, and a
    warning when it is no better than chance. forward: run_forward of a plan of `graph` (the C library), else the
    reference interpreter runs the int8 model."""
    from fedtiny.interpreter import predict, quantize_input
    from fedtiny.train import evaluate

    if forward is None:
        predicted = predict(graph, val.X)
    else:
        predicted = forward(quantize_input(graph, val.X)).reshape(len(val.y), -1).argmax(axis=1)
    int8_accuracy = float((predicted == val.y).mean())
    if model is None:  # a model file (quantized or imported elsewhere): no float model
        weak, chance = near_chance(int8_accuracy, val.y)
        return [f"host model (a model file): int8 {100 * int8_accuracy:.1f} % on the host's validation data "
                f"({len(val)} samples)"] + ([f"warning: the model is near chance ({100 * chance:.1f} % by always "
                                             "answering the most common class) on this data"] if weak else [])
    float_accuracy = evaluate(model, val.X, val.y)[0]
    record = graph.meta.get("pretraining") or {}
    how = (f"; pretraining kept step {record['best_step']} of {record['steps']} ({record['stopped']})"
           if record else "")
    lines = [f"host model: float {100 * float_accuracy:.1f} %, int8 {100 * int8_accuracy:.1f} % on the host's "
             f"validation data ({len(val)} samples){how}"]
    weak, chance = near_chance(max(float_accuracy, int8_accuracy), val.y)
    if weak:
        lines.append(f"warning: the host model is near chance ({100 * chance:.1f} % by always answering the most "
                     f"common class, {len(val)} validation samples): the host's data is too small or too hard for "
                     "this model, and the devices start from a model that has learned little")
    return lines
