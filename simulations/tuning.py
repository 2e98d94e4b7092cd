"""The learning rate and local epochs of a run, chosen on host data the pretraining never trained on, by one rule
for every model, dataset and update scheme (nothing tuned per scenario).

The rule: the host's samples that pretraining did not train on (scenarios.host_split's validation part, a fifth
of each class) are cut in two halves
(scenarios.halves: every machine and class in both). The host plays the run's rounds (at most MAX_TRIAL_ROUNDS)
of FedAvg from the pretrained model in two folds: shards of one half train, the other half is scored after every
round, and the other way round. That is a fleet's situation: devices train on samples the model never fitted and are judged on more of
their kind. Shards have a device's size (the median node's sample count; at most MAX_SHARDS of them) and are cut
as a fleet's devices hold samples (device_shards): a machine's samples per shard when the samples come from several
machines, else a Dirichlet(1) label split, as the scenarios split a fleet. (Shards of one class or two, the worst
label skew, which this rule used before, pull the model apart so that no rate learned anything in the trial.) In a
round every shard trains from the round's model as a device would, and the shards' states are averaged
(FedAvg). A setting's score is its trial's learning curve: the accuracy and mean cross-entropy after each round,
averaged over the rounds and the folds (weighted by the samples each scored), so that a rate that learns in the
first rounds beats one that needs many, and one that diverges or swings with each round's shards (client
drift) loses. The best accuracy wins; among equals the lower loss, then the larger lr, then the fewer epochs.

The learning rate is chosen first, over LRS (half-decade steps) at one epoch per round; then the epochs (1 to
MAX_EPOCHS) at that rate. One round, as this rule played before, could not tell the rates apart (under 5 points)
and the host's own pretraining data cannot at all: a model fits what it was pretrained on at any small rate. Three
rounds were not enough either: on the industrial fleet a rate that gains most in three rounds (0.0316, 3 epochs)
loses it again over ten as each device's few samples are passed over again and again, so the trial plays the run's
horizon.

    devices   the real int8 training plan (the run's scheme, budget and reserve, compiled at that lr) on the
              trainer the nodes run (the C trainer when gcc is present), samples in a node's training order
    baseline  the fp32 baseline's own update (simulations/baseline.py: SGD at batch 1, BatchNorm statistics
              frozen) from the float model, at the epochs the devices run, so the two sides get the same work
              and each its own best lr

Given values are kept: `--lr` fixes the lr (the epochs are still chosen at it), `--epochs` the epochs (the lr is
chosen at them), and `--baseline-lr` the baseline's lr. Choices are cached by content (the model's weights, the
scheme, the budget, the shard size and this rule) beside the pretrained models.
"""

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

LRS = tuple(round(10 ** (k / 2), 6) for k in range(-7, -1))  # 3.2e-4 .. 0.1 in half decades
MAX_EPOCHS = 3
MAX_SHARDS = 8
MAX_SCORED = 512  # of a half scored in a fold: a time bound
MAX_TRIAL_ROUNDS = 10  # a time bound: a longer run's trial plays this many
TRIAL = (f"lrs{LRS}/epochs1-{MAX_EPOCHS}/shards{MAX_SHARDS}/scored{MAX_SCORED}/rounds<={MAX_TRIAL_ROUNDS}"
         "/unseen-halves/device-shards/lr-then-epochs/run-rounds/v6")  # cache key


@dataclass(frozen=True)
class Choice:
    lr: float
    epochs: int
    val_accuracy: float  # the trial's accuracy with (lr, epochs): mean over its rounds and both folds
    val_loss: float
    start_accuracy: float  # the scored samples' accuracy before the first round
    scheme: str = ""  # the update scheme it was chosen for (devices)
    tried: tuple[tuple[float, int, float, float], ...] = ()  # (lr, epochs, accuracy, loss) for each candidate


def best(tried: list[tuple[float, int, float, float]]) -> tuple[float, int, float, float]:
    """The winning (lr, epochs, accuracy, loss): the highest accuracy; among equals the lowest loss, then the
    largest lr, then the fewest epochs. A non-finite loss (a diverged float model, whose NaN logits still give
    some argmax) ranks last."""
    return min(tried, key=lambda t: (not np.isfinite(t[3]), -t[2], t[3], -t[0], t[1]))


def trial_threads() -> int:
    """Threads the lrs' trials run in: one per core this process may use. Each lr trains its own model (its own C
    library, or its own PyTorch copy on one thread), and C calls and PyTorch's ops release the GIL, so the trials
    share no state and give the same scores in any number of threads."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _choose(curve, lrs, epochs_grid, start, scheme: str = "", threads: int = 1) -> Choice:
    """curve(lr, epochs) -> (accuracy, loss) of the trial; the lr first at the grid's smallest epochs, then the
    epochs at that lr, each stage's trials in up to `threads` threads at a time."""
    first = min(epochs_grid)
    others = [epochs for epochs in sorted(epochs_grid) if epochs != first]
    with ThreadPoolExecutor(max(1, min(threads, len(lrs)))) as pool:
        tried = [(lr, first, *scores) for lr, scores in zip(lrs, pool.map(lambda lr: curve(lr, first), lrs))]
        lr = best(tried)[0]
        tried += [(lr, epochs, *scores) for epochs, scores in zip(others, pool.map(lambda e: curve(lr, e), others))]
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


def device_shards(y: np.ndarray, group: np.ndarray, shard_size: int, seed: int = 0) -> list[np.ndarray]:
    """Indexes of samples (labels y, groups `group`) cut into shards as a fleet's devices hold samples: when they
    come from several groups (machines), each group's samples in shards of about `shard_size` (a device is a
    machine: every class it shows, one machine's conditions); from one source, a Dirichlet(1) label split into
    shards of about `shard_size`, as scenarios split a fleet's samples that have no groups. At most MAX_SHARDS of
    them, spread evenly (a time bound); deterministic for a seed."""
    y, group = np.asarray(y), np.asarray(group)
    rng = np.random.default_rng([seed, 0x5A4D])
    shards = []
    if len(np.unique(group)) >= 2:
        for g in np.unique(group):
            members = rng.permutation(np.flatnonzero(group == g))
            shards += np.array_split(members, max(1, len(members) // max(1, shard_size)))
    else:
        count = max(1, len(y) // max(1, shard_size))
        parts: list[list[int]] = [[] for _ in range(count)]
        for label in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet(np.ones(count)))[:-1] * len(members)).round().astype(int)
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        shards = [np.sort(np.asarray(part, np.int64)) for part in parts]
    shards = [shard for shard in shards if len(shard)]
    return [shards[i] for i in np.unique(np.linspace(0, len(shards) - 1, MAX_SHARDS).round().astype(int))]


def _scored(y: np.ndarray) -> np.ndarray:
    """Up to MAX_SCORED of samples y, spread over the label order (a time bound)."""
    order = np.argsort(y, kind="stable")
    return np.sort(order[np.unique(np.linspace(0, len(y) - 1, min(len(y), MAX_SCORED)).astype(int))])


def folds(first, second, shard_size: int, seed: int = 0) -> list[tuple[list[np.ndarray], np.ndarray]]:
    """The trial's two folds over the halves' samples (Datasets) indexed first half, then second: (shards,
    scored). The first half's device shards are scored on the second half and the other way round."""
    n = len(first.y)
    return [(device_shards(first.y, first.group, shard_size, seed), n + _scored(second.y)),
            ([n + shard for shard in device_shards(second.y, second.group, shard_size, seed)], _scored(first.y))]


def _trial(train_shard, average, score, start, trial_folds, epochs: int, rounds: int) -> tuple[float, float]:
    """`rounds` federated rounds per fold from `start`: every shard trains from the round's state for `epochs`
    epochs (train_shard(state, shard, epochs, round) -> state), the shards' states are averaged and scored
    (score(state, indexes) -> accuracy, loss). Returns the mean (accuracy, loss) over the rounds and folds,
    weighted by the samples each fold scored."""
    total = rounds * sum(len(scored) for _, scored in trial_folds)
    result = np.zeros(2)
    for shards, scored in trial_folds:
        state = start
        for round_ in range(1, rounds + 1):
            state = average([train_shard(state, shard, epochs, round_) for shard in shards])
            result += np.asarray(score(state, scored)) * len(scored)
    return float(result[0] / total), float(result[1] / total)


def _weighted(score, trial_folds) -> float:
    """The accuracy of score(indexes) over the folds' scored samples, weighted by their count (the untrained start)."""
    return sum(score(scored)[0] * len(scored) for _, scored in trial_folds) / sum(len(s) for _, s in trial_folds)


def choose_device(config, task, graph, first, second, *, shard_size: int, lrs=LRS, epochs_grid=None, seed: int = 0,
                  trainer_factory=None, rounds: int = MAX_TRIAL_ROUNDS,
                  threads: int | None = None) -> Choice:
    """The devices' (lr, epochs) by the rule, on the int8 `graph` with config's scheme and budget (first, second:
    the halves of host data the pretraining never trained on, scenarios.unseen_halves; shard_size: the samples
    a device holds; rounds: the trial's)."""
    from fedtiny.interpreter import quantize_input
    from fedtiny_device.agent import training_permutation

    from .simulate import training_plan

    if trainer_factory is None:
        from fedtiny_device.trainer import Trainer as trainer_factory
    epochs_grid = tuple(epochs_grid or range(1, MAX_EPOCHS + 1))
    xq = quantize_input(graph, np.concatenate([first.X, second.X]))
    y = np.concatenate([first.y, second.y])
    trial_folds = folds(first, second, shard_size, seed)
    schemes = set()

    def curve(lr: float, epochs: int) -> tuple[float, float]:
        plan, scheme = training_plan(replace(config, lr=lr), task, graph)
        schemes.add(scheme)
        trainer = trainer_factory(plan, seed)

        def train_shard(state, shard, epochs, round_):
            trainer.load_trainable_state(state)
            for epoch in range(epochs):
                order = shard[training_permutation(seed, round_, epoch, len(shard))]
                if hasattr(trainer, "steps"):  # the C trainer: a whole epoch in one call
                    trainer.steps(xq[order], y[order])
                else:
                    for i in order:
                        trainer.step(xq[i], int(y[i]))
            return trainer.trainable_state()

        def average(states):  # FedAvg of equal shards, rounded back to each buffer's integer type
            return {name: np.rint(np.mean([st[name].astype(np.float64) for st in states], axis=0))
                    .astype(states[0][name].dtype) for name in states[0]}

        forward = None  # with the C trainer, its library's forward pass: the interpreter's integers, ~5x cheaper
        if hasattr(trainer, "run_job"):
            from fedtiny_device.cruntime import CPlanModel

            forward = CPlanModel(plan)

        def score(st, idx):
            return _int8_scores(plan.graph_with(st), xq[idx], y[idx], forward(st, xq[idx]) if forward else None)

        return _trial(train_shard, average, score, plan.initial_state(), trial_folds, epochs, rounds)

    start = _weighted(lambda idx: _int8_scores(graph, xq[idx], y[idx]), trial_folds)
    choice = _choose(curve, lrs, epochs_grid, start, threads=threads or trial_threads())
    return replace(choice, scheme=" / ".join(sorted(schemes)))


def choose_baseline_lr(model, first, second, epochs: int, *, shard_size: int, lrs=LRS, seed: int = 0,
                       rounds: int = MAX_TRIAL_ROUNDS, threads: int | None = None) -> Choice:
    """The fp32 baseline's lr by the rule, at the devices' `epochs`."""
    import copy

    import torch
    from torch import nn

    from fedtiny.train import evaluate

    x_all, y_all = np.concatenate([first.X, second.X]).astype(np.float32), np.concatenate([first.y, second.y])
    xt, yt = torch.as_tensor(x_all), torch.as_tensor(y_all.astype(np.int64))
    trial_folds = folds(first, second, shard_size, seed)

    def curve(lr: float, epochs: int) -> tuple[float, float]:
        def train_shard(state, shard, epochs, round_):
            trained = copy.deepcopy(model).eval()  # BatchNorm statistics frozen, as in the baseline and on devices
            trained.load_state_dict(state)
            opt = torch.optim.SGD(trained.parameters(), lr=lr)
            for epoch in range(epochs):
                for j in shard[np.random.default_rng([seed, round_, epoch]).permutation(len(shard))]:
                    opt.zero_grad()
                    nn.functional.cross_entropy(trained(xt[j:j + 1]), yt[j:j + 1]).backward()
                    opt.step()
            return copy.deepcopy(trained.state_dict())

        def average(states):
            return {k: torch.stack([st[k].double() for st in states]).mean(0).to(states[0][k].dtype)
                    for k in states[0]}

        def score(state, idx):
            averaged = copy.deepcopy(model)
            averaged.load_state_dict(state)
            return evaluate(averaged, x_all[idx], y_all[idx])

        return _trial(train_shard, average, score, copy.deepcopy(model.state_dict()), trial_folds, epochs, rounds)

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch 1: more threads only contend (as in baseline.run_baseline)
    try:
        start = _weighted(lambda idx: evaluate(model, x_all[idx], y_all[idx]), trial_folds)
        return _choose(curve, lrs, (epochs,), start, threads=threads or trial_threads())
    finally:
        torch.set_num_threads(torch_threads)


def _cache_file(kind: str, graph, *parts) -> Path:
    digest = hashlib.sha256(TRIAL.encode())
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


def settle(config, task, model, graph, train, val, trainer_factory=None) -> list[str]:
    """Fill config.lr and config.epochs where the user left them None, by the rule, played on the halves of `val`
    (scenarios.host_split's parts: `val` is what pretraining never trained on); returns the lines that say what was
    chosen and on what. The baseline's lr is settle_baseline's (after this: it trains at these epochs)."""
    from .scenarios import halves

    lines = []
    first, second = halves(val)
    rounds = min(config.rounds, MAX_TRIAL_ROUNDS)  # the trial plays the run's horizon
    shard_size = _shard_size(task)
    if config.lr is None or config.epochs is None:
        lrs = LRS if config.lr is None else (config.lr,)
        epochs_grid = tuple(range(1, MAX_EPOCHS + 1)) if config.epochs is None else (config.epochs,)
        path = _cache_file("device", graph, task.model, config.scheme, config.budget, config.reserve, lrs,
                           epochs_grid, config.seed, len(train), len(val), shard_size, rounds)
        choice = _cached(path, lambda: choose_device(config, task, graph, first, second, shard_size=shard_size,
                                                     lrs=lrs, epochs_grid=epochs_grid, seed=config.seed,
                                                     trainer_factory=trainer_factory, rounds=rounds))
        config.lr, config.epochs = choice.lr, choice.epochs
        lines.append(f"devices: lr {choice.lr:g}, {choice.epochs} epoch(s) per round (scheme {choice.scheme}), "
                     f"chosen on {len(val)} host samples the pretraining never trained on: int8 accuracy "
                     f"{100 * choice.start_accuracy:.1f} % before, {100 * choice.val_accuracy:.1f} % on average over "
                     f"{rounds} rounds on device-sized shards ({shard_size}) of them (tried lr "
                     f"{min(lrs):g}..{max(lrs):g}, {min(epochs_grid)}..{max(epochs_grid)} epochs)")
    return lines


def settle_baseline(config, task, model, graph, train, val) -> list[str]:
    """Fill config.baseline_lr (with --baseline, where the user left it None) by the rule, at config.epochs (settle's
    choice); returns the line that says what was chosen. simulate times it as the baseline's own work."""
    if not config.baseline or config.baseline_lr is not None:
        return []
    from .scenarios import halves

    first, second = halves(val)
    rounds = min(config.rounds, MAX_TRIAL_ROUNDS)
    shard_size = _shard_size(task)
    path = _cache_file("baseline", graph, config.epochs, config.seed, LRS, len(train), len(val), shard_size, rounds)
    choice = _cached(path, lambda: choose_baseline_lr(model, first, second, config.epochs, shard_size=shard_size,
                                                      seed=config.seed, rounds=rounds))
    config.baseline_lr = choice.lr
    return [f"baseline: fp32 lr {choice.lr:g} at {config.epochs} epoch(s), chosen by the same rule: "
            f"accuracy {100 * choice.start_accuracy:.1f} % before, {100 * choice.val_accuracy:.1f} % on average over "
            f"the trial's rounds"]


def near_chance(accuracy: float, y: np.ndarray) -> tuple[bool, float]:
    """(whether `accuracy` on labels y is within two standard errors of always answering the most common class,
    that class's share)."""
    y = np.asarray(y)
    chance = float(np.bincount(y).max() / len(y)) if len(y) else 0.0
    return accuracy <= chance + 2 * np.sqrt(chance * (1 - chance) / max(1, len(y))), chance


def host_accuracy_lines(model, graph, val) -> list[str]:
    """The host model's float and int8 accuracy on the host's validation data, how its pretraining stopped, and a
    warning when it is no better than chance."""
    from fedtiny.interpreter import predict
    from fedtiny.train import evaluate

    int8_accuracy = float((predict(graph, val.X) == val.y).mean())
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
