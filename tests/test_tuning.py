"""Pretraining to convergence and the learning-rate rule (issue 16): no hand-tuned constants."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedtiny import zoo
from fedtiny.compiler import reserve_for
from fedtiny.datafile import make_dataset
from fedtiny.device_memory import plan_footprint
from fedtiny.planfile import load_plan
from fedtiny.quantize import quantize
from fedtiny.train import evaluate, pretrain, validation_split
from fedtiny_sim import tuning
from fedtiny_sim.scenarios import Task
from fedtiny_sim.simulate import SimulationConfig


def blobs(n: int, seed: int, separation: float = 3.0, features: int = 8):
    """Two Gaussian classes `separation` apart along every feature (separable when it is large)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, features)) + separation * y[:, None]
    return x.astype(np.float32), y


def mlp(features: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return zoo.build("mlp", (features,), 2)


def test_validation_split_takes_every_class_and_is_deterministic():
    y = np.array([0] * 10 + [1] * 5 + [2] * 2)
    train, val = validation_split(y, 0.2, seed=4)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(y)))
    assert sorted(np.bincount(y[val]).tolist()) == [1, 1, 2]  # 20 % of each class, at least one
    again = validation_split(y, 0.2, seed=4)
    assert train.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()
    assert val.tolist() != validation_split(y, 0.2, seed=5)[1].tolist()


@pytest.mark.parametrize("threads", [1, None])  # one thread as pretraining runs, and torch's default
@pytest.mark.parametrize("name,shape", [("sensor_cnn", (3, 64)), ("mobilenet", (1, 8, 8)), ("mlp", (8,))])
def test_a_samples_scores_do_not_depend_on_the_samples_scored_with_it(name, shape, threads):
    """fedtiny.train.logits scores EVAL_CHUNK samples per forward pass; a sample's scores are the same bits
    whether it is scored alone, in a short set or a long one, in any order, so pretraining's validation score of
    a set is a function of its samples (torch sums in another order for another batch size)."""
    from fedtiny.train import EVAL_CHUNK, logits

    torch.manual_seed(1)
    model = zoo.randomize_batchnorm(zoo.build(name, shape, 3))
    x = np.random.default_rng(2).normal(size=(EVAL_CHUNK + 7,) + shape).astype(np.float32)
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        every = logits(model, x)
        for n in (1, 7, EVAL_CHUNK - 1):
            assert torch.equal(logits(model, x[:n]), every[:n]), n
        assert torch.equal(logits(model, x[::-1].copy()), every.flip(0))
    finally:
        torch.set_num_threads(default)


def test_pretraining_stops_early_on_a_tiny_set_and_beats_chance():
    x, y = blobs(40, seed=1)
    train, val = validation_split(y, seed=0)
    model = mlp()
    record = pretrain(model, x[train], y[train], x[val], y[val], seed=0, patience=100, max_steps=5000)
    assert record.stopped == "converged" and record.steps < 5000  # long before the step limit
    assert record.steps - record.best_step >= 100 and record.best_step % 10 == 0
    accuracy, loss = evaluate(model, x[val], y[val])  # the best weights are the ones left in the model
    assert (accuracy, loss) == pytest.approx((record.val_accuracy, record.val_loss))
    fresh_x, fresh_y = blobs(400, seed=9)
    assert evaluate(model, fresh_x, fresh_y)[0] > 0.9  # chance is 0.5


def test_pretraining_patience_is_passes_over_the_data_with_a_floor():
    """The default patience is PATIENCE_EPOCHS passes over the training part (a last single-sample batch dropped),
    at least MIN_PATIENCE steps; a converged run stops exactly that many steps after the step it keeps."""
    from fedtiny.train import BATCH, MIN_PATIENCE, PATIENCE_EPOCHS, patience_steps, steps_per_epoch

    assert steps_per_epoch(2560) == 80 and steps_per_epoch(33) == 1 and steps_per_epoch(34) == 2
    assert patience_steps(2560) == PATIENCE_EPOCHS * 80 and patience_steps(343) == MIN_PATIENCE
    assert patience_steps(100 * BATCH) == 2 * patience_steps(50 * BATCH)  # in passes: twice the data, twice the steps
    x, y = blobs(40, seed=1)
    train, val = validation_split(y, seed=0)
    record = pretrain(mlp(), x[train], y[train], x[val], y[val], seed=0, max_steps=5000)
    assert record.stopped == "converged" and record.steps - record.best_step == patience_steps(len(train))


def test_pretraining_is_deterministic_for_a_seed():
    x, y = blobs(60, seed=2, separation=0.7)
    train, val = validation_split(y, seed=0)
    states = []
    for _ in range(2):
        model = mlp(seed=3)
        pretrain(model, x[train], y[train], x[val], y[val], seed=5, patience=50, max_steps=400)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_pretraining_restores_the_best_weights_not_the_last():
    # labels that are pure noise: whatever the model learns on the training part only hurts the validation part
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 8)).astype(np.float32), rng.integers(0, 2, 80)
    train, val = validation_split(y, seed=0)
    model = mlp()
    record = pretrain(model, x[train], y[train], x[val], y[val], seed=0, patience=200, max_steps=2000)
    assert record.best_step < record.steps
    assert evaluate(model, x[val], y[val])[1] == pytest.approx(record.val_loss)


def test_skewed_shards_hold_one_class_or_two_and_every_class_trains():
    y = np.repeat(np.arange(4), 30)
    shards = tuning.skewed_shards(y, 10)
    assert len(shards) == tuning.MAX_SHARDS  # 12 shards of 10, thinned evenly
    assert all(len(np.unique(y[s])) <= 2 for s in shards)
    assert set(np.concatenate([y[s] for s in shards]).tolist()) == {0, 1, 2, 3}
    assert len(tuning.skewed_shards(y[:5], 10)) == 1  # fewer samples than a device holds: one shard


def test_the_rule_ranks_accuracy_then_larger_lr_then_loss_then_fewer_epochs():
    tried = [(0.1, 1, 0.5, 9.0), (0.01, 2, 0.9, 0.3), (0.03, 2, 0.9, 0.4), (0.03, 1, 0.9, 0.3), (0.03, 3, 0.9, 0.3),
             (0.003, 3, 0.9, 0.2), (1.0, 1, 0.95, float("nan"))]
    assert tuning.best(tried) == (0.03, 1, 0.9, 0.3)  # a NaN loss loses whatever its argmax scored
    assert tuning.best(tried[:3]) == (0.03, 2, 0.9, 0.4)  # equal accuracy: the largest lr
    assert tuning.best(tried[:2] + [(0.003, 3, 0.95, 0.2)]) == (0.003, 3, 0.95, 0.2)  # accuracy first


def test_the_baseline_lr_rule_is_deterministic_and_avoids_a_diverging_lr():
    x, y = blobs(60, seed=3, separation=1.0)
    train_idx, val_idx = validation_split(y, seed=0)
    ds = make_dataset(x, y, None, ("a", "b"), "blobs")
    train, val = ds.subset(train_idx), ds.subset(val_idx)
    model = mlp()
    pretrain(model, train.X, train.y, val.X, val.y, seed=0, patience=50, max_steps=300)
    # the lrs' trials one after the other and in two threads: the same scores
    choices = [tuning.choose_baseline_lr(model, train, val, 2, shard_size=10, lrs=(0.01, 300.0), threads=threads)
               for threads in (1, 2)]
    assert choices[0] == choices[1]
    diverged = [t for t in choices[0].tried if t[0] == 300.0][0]
    held = [t for t in choices[0].tried if t[0] == 0.01][0]
    assert diverged[2] < held[2] or not np.isfinite(diverged[3])  # the large lr really diverges here
    assert choices[0].lr == 0.01


def int8_task(seed: int = 0):
    x, y = blobs(80, seed=seed, separation=1.2)
    train_idx, val_idx = validation_split(y, seed=0)
    ds = make_dataset(x, y, None, ("a", "b"), "blobs")
    train, val = ds.subset(train_idx), ds.subset(val_idx)
    model = mlp()
    pretrain(model, train.X, train.y, val.X, val.y, seed=0, patience=50, max_steps=200)
    graph = quantize(model, train.X, name="blobs-mlp", classes=ds.classes)
    task = Task("blobs", "mlp", ds, [train], val)
    return model, graph, task, train, val


def test_the_device_lr_rule_is_deterministic_and_avoids_a_diverging_lr():
    _, graph, _, train, val = int8_task()
    config = SimulationConfig(nodes=1, scenario="medical", scheme="full", reserve=0)
    choices = [tuning.choose_device(config, graph, train, val, shard_size=10, lrs=(0.01, 1000.0),
                                   epochs_grid=(1, 2), threads=threads)
               for threads in (1, 2)]  # the lrs' trials one after the other and in two threads: the same scores
    assert choices[0] == choices[1]
    assert choices[0].scheme == "full"
    by_lr = {lr: max(acc for lr_, _, acc, _ in choices[0].tried if lr_ == lr) for lr in (0.01, 1000.0)}
    assert by_lr[1000.0] < by_lr[0.01]  # int8 weights driven to their limits: the large lr diverges
    assert choices[0].lr == 0.01 and choices[0].epochs in (1, 2)


def test_settle_keeps_what_the_user_gave_and_fills_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path))
    model, graph, task, train, val = int8_task()
    config = SimulationConfig(nodes=1, scenario="medical", scheme="full", reserve=0, lr=0.02, baseline=True,
                              baseline_lr=0.005)
    def settle_both(c):
        return tuning.settle(c, task, model, graph, train, val) + tuning.settle_baseline(c, task, model, graph, train,
                                                                                          val)

    lines = settle_both(config)
    assert config.lr == 0.02 and config.baseline_lr == 0.005 and config.epochs in range(1, tuning.MAX_EPOCHS + 1)
    assert len(lines) == 1 and lines[0].startswith("devices: lr 0.02,")
    unset = replace(config, lr=None, epochs=None, baseline_lr=None)
    lines = settle_both(unset)
    assert unset.lr in tuning.LRS and unset.baseline_lr in tuning.LRS
    assert [line.split(":")[0] for line in lines] == ["devices", "baseline"]
    cached = replace(config, lr=None, epochs=None, baseline_lr=None)
    assert settle_both(cached) == lines  # from the cache, the same choice
    assert (cached.lr, cached.epochs, cached.baseline_lr) == (unset.lr, unset.epochs, unset.baseline_lr)


def test_host_accuracy_lines_say_float_and_int8_and_warn_near_chance():
    model, graph, _, _, val = int8_task()
    lines = tuning.host_accuracy_lines(model, graph, val)
    assert lines[0].startswith("host model: float ") and " int8 " in lines[0] and len(lines) == 1
    torch.manual_seed(0)
    untrained = zoo.build("mlp", (8,), 2)
    weak = quantize(untrained, val.X, name="weak", classes=("a", "b"))
    noise = replace(val, y=np.random.default_rng(1).integers(0, 2, len(val.y)))
    lines = tuning.host_accuracy_lines(untrained, weak, noise)
    assert any(line.startswith("warning: the host model is near chance") for line in lines)
    assert tuning.near_chance(0.55, np.array([0, 1] * 10))[0] and not tuning.near_chance(0.95, np.array([0, 1] * 10))[0]


def test_simulate_prints_the_host_model_accuracy_and_the_chosen_settings_before_the_rounds(tmp_path, monkeypatch):
    from fedtiny_sim.simulate import simulate

    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    lines = []
    result = simulate(SimulationConfig(nodes=2, rounds=1, scenario="medical", out=str(tmp_path / "run"),
                                       workers=1), note=lines.append)
    host = next(i for i, line in enumerate(lines) if line.startswith("host model: float "))
    scheme = next(i for i, line in enumerate(lines) if line.startswith("scheme auto = "))  # the default scheme
    devices = next(i for i, line in enumerate(lines) if line.startswith("devices: lr "))
    rounds = next(i for i, line in enumerate(lines) if line.startswith("starting the broker"))
    assert host < scheme < devices < rounds and " int8 " in lines[host]
    chosen = lines[scheme].removeprefix("scheme auto = ").split(":")[0]
    assert result["scheme"] == f"auto = {chosen}" and f"(scheme {chosen})" in lines[devices]
    plan = load_plan(tmp_path / "run" / "plan.ftp")  # what the nodes trained: fits by device_memory's figures
    assert plan_footprint(plan)["device_ram_bytes"] <= 256 * 1024 - reserve_for(256 * 1024, None)[0]
    assert result["lr"] in tuning.LRS and 1 <= result["epochs"] <= tuning.MAX_EPOCHS
    assert result["pretraining"]["stopped"] in ("converged", "step limit")


def test_cached_choices_are_keyed_by_the_sources_that_decide_integer_training(tmp_path, monkeypatch):
    """A changed rounding draw or update rule must not reuse the lr trials or scheme scores the old one gave: the
    cache files' keys change with fedtiny.compiler.training_semantics (the digest of those sources)."""
    from fedtiny import compiler, search

    graph = quantize(zoo.build("mlp", (8,), 3), torch.randn(16, 8))
    data = search.HostData(np.zeros((4, 8), np.int8), np.zeros(4, np.int64), np.zeros((4, 8), np.int8),
                           np.zeros(4, np.int64))
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path))

    def keys():
        return (tuning._cache_file("device", graph, "full", 1),
                search.cache_key(graph, data, lrs=(0.01,), epochs=1, qas=True, loss="cross_entropy", seed=0))

    assert compiler.training_semantics() == compiler.training_semantics()  # a digest of files, not of the run
    before = keys()
    assert keys() == before
    monkeypatch.setattr(compiler, "training_semantics", lambda: "another rule")
    monkeypatch.setattr(search, "training_semantics", lambda: "another rule")
    monkeypatch.setattr(tuning, "training_semantics", lambda: "another rule")
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]


def test_the_training_digest_keeps_caches_across_comments_and_docstrings_but_not_code():
    """code_digest, what training_semantics is made of: a reworded comment, docstring or layout keeps the cached
    choices; a changed constant or operation does not."""
    from fedtiny.compiler import code_digest

    source = 'def draw(x):\n    """Round half up."""\n    return (x + 1) >> 1  # the rounding\n'
    assert code_digest(source) == code_digest('def draw(x):\n    """Another text."""\n\n    return (x+1) >> 1\n')
    assert code_digest(source) == code_digest('def draw(x):\n    return (x + 1) >> 1\n')
    assert code_digest(source) != code_digest('def draw(x):\n    """Round half up."""\n    return (x + 2) >> 1\n')
    assert code_digest(source) != code_digest('def draw(x):\n    """Round half up."""\n    return (x + 1) >> 2\n')
