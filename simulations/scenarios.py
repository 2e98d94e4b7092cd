"""Scenarios: a task's data split into pretraining (the host), nodes (each device's own data) and a held-out test.

  industrial  bearing vibration (the embedded default): sensor_cnn pretrained on machines 0..19, each node is
              another machine with its own speed, load, resonance and noise (naturally non-IID)
  vision      sklearn digits (8x8 images): mobilenet, nodes by a Dirichlet label split
  medical     sklearn breast cancer (30 features): mlp, nodes by a Dirichlet label split
  a file      .npz / .csv of the user's: mlp, nodes by its group column if it has one, else Dirichlet
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtiny.datafile import Dataset, load_user_data

from . import data

SCENARIOS = ("industrial", "vision", "medical")


@dataclass
class Task:
    name: str
    model: str  # zoo name
    pretrain: Dataset
    nodes: list[Dataset]
    test: Dataset

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.pretrain.X.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.pretrain.classes)


def _split_nodes(ds: Dataset, n_nodes: int, seed: int, alpha: float = 1.0) -> tuple[Dataset, list[Dataset], Dataset]:
    rest, test = data.train_test_split(ds, 0.2, seed)
    pretrain, fleet = data.train_test_split(rest, 0.7, seed + 1)  # 30% of the rest pretrains on the host
    return pretrain, data.partition_dirichlet(fleet, n_nodes, alpha, seed), test


def load_task(scenario: str, n_nodes: int, seed: int = 0, data_file: str | None = None) -> Task:
    if data_file is not None:
        ds = load_user_data(data_file)
        if len(np.unique(ds.group)) >= n_nodes:
            rest, test = data.train_test_split(ds, 0.2, seed)
            by_group = data.partition_by_group(rest)
            groups = sorted(by_group)
            pretrain = by_group[groups[0]]
            nodes = [by_group[g] for g in groups[1:n_nodes + 1]] or [pretrain]
        else:
            pretrain, nodes, test = _split_nodes(ds, n_nodes, seed)
        if ds.X.ndim == 2:
            pretrain, test, *nodes = data.standardize(pretrain, test, *nodes)
        model = "mlp" if ds.X.ndim == 2 else ("sensor_cnn" if ds.X.ndim == 3 else "mobilenet")
        return Task(Path(data_file).stem, model, pretrain, list(nodes), test)
    if scenario == "industrial":
        pretrain = data.bearing_dataset(range(20), 40, seed=seed)
        machines = [data.bearing_dataset([100 + i], 25, seed=seed) for i in range(n_nodes)]
        splits = [data.train_test_split(m, 0.2, seed) for m in machines]
        test = data.bearing_dataset(range(100, 100 + n_nodes), 5, seed=seed + 7)
        return Task("industrial", "sensor_cnn", pretrain, [s[0] for s in splits], test)
    if scenario == "vision":
        pretrain, nodes, test = _split_nodes(data.load_digits(), n_nodes, seed)
        return Task("vision", "mobilenet", pretrain, nodes, test)
    if scenario == "medical":
        pretrain, nodes, test = _split_nodes(data.load_breast_cancer(), n_nodes, seed)
        pretrain, test, *nodes = data.standardize(pretrain, test, *nodes)
        return Task("medical", "mlp", pretrain, list(nodes), test)
    raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)} or give a data file")


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int):
    """A zoo name, or a user's module as FILE.py:FACTORY where FACTORY(input_shape, num_classes) returns an
    nn.Module built from the ops fedtiny supports."""
    from fedtiny import zoo

    if spec in zoo.ZOO:
        return zoo.build(spec, input_shape, num_classes)
    file, colon, factory = spec.partition(":")
    if not colon or not file.endswith(".py"):
        raise ValueError(f"model {spec!r} is neither a zoo model ({', '.join(zoo.ZOO)}) nor FILE.py:FACTORY")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    if module_spec is None or not Path(file).exists():
        raise ValueError(f"cannot load the model file {file!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"{file} has no {factory!r}")
    return getattr(module, factory)(tuple(input_shape), num_classes)


def pretrained(task: Task, seed: int = 0, epochs: int = 15, cache_dir: str | Path | None = None):
    """(float PyTorch model, int8 graph): the task's model pretrained on its host data and quantized.

    Cached on disk by content (the .ftm model file and the float weights beside it; in $FEDTINY_CACHE, default
    ~/.cache/fedtiny), so a second run with the same task and seed starts at once."""
    import torch

    from fedtiny.modelfile import load_model, save_model
    from fedtiny.quantize import quantize
    from fedtiny.train import fit

    torch.manual_seed(seed)
    model = build_model(task.model, task.input_shape, task.num_classes)
    # keyed by the data, the settings and the module's structure (a user's file may change under the same name)
    key = hashlib.sha256(task.pretrain.X.tobytes() + task.pretrain.y.tobytes()
                         + f"{task.model}/{seed}/{epochs}/{model!r}".encode()).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("FEDTINY_CACHE") or Path.home() / ".cache" / "fedtiny")
    path = cache / f"{task.name}-{Path(task.model.partition(':')[0]).stem}-{key}.ftm"
    if path.exists() and path.with_suffix(".pt").exists():
        model.load_state_dict(torch.load(path.with_suffix(".pt")))
        return model.eval(), load_model(path)
    fit(model, task.pretrain.X, task.pretrain.y, epochs=epochs, seed=seed)
    graph = quantize(model, task.pretrain.X[:512], name=f"{task.name}-{task.model}", classes=task.pretrain.classes)
    graph.meta["model"] = task.model  # the zoo name (or FILE.py:FACTORY): picks the default update scheme
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".pt"))
    save_model(graph, path)
    return model.eval(), graph
