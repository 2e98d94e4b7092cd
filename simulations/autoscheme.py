"""`--scheme auto` for a task: fedtiny.search run on the host's data with the trainer the nodes run.

fedtiny.search knows no trainer (fedtiny may not import fedtiny_device); this module gives it one: the generated
C trainer when gcc is present (each candidate plan's library built in parallel, cached in $FEDTINY_CACHE), else
the Python reference, which gives the same numbers bit for bit, only slower.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor

from fedtiny.datafile import Dataset
from fedtiny.interpreter import quantize_input
from fedtiny.search import HostData, SearchResult, search

from . import data as datasets

VALIDATION_FRACTION = 0.2  # of the host's samples, scored on (the rest trains)


def host_data(pretrain: Dataset, graph, seed: int = 0) -> HostData:
    """The host's samples as int8, split into a training and a validation part (stratified, by seed)."""
    train, val = datasets.train_test_split(pretrain, VALIDATION_FRACTION, seed)
    return HostData(quantize_input(graph, train.X), train.y, quantize_input(graph, val.X), val.y)


def _c_trainer():
    """(trainer factory, prepare) for the C trainer: prepare builds a batch of plans' libraries two at a time."""
    from fedtiny_device.cruntime import CTrainer, build_plan_host

    def prepare(plans) -> None:
        with ThreadPoolExecutor(2) as pool:  # gcc runs in subprocesses: threads are enough
            list(pool.map(build_plan_host, plans))

    return CTrainer, prepare


def auto_scheme(graph, pretrain: Dataset, *, budget: int, reserve: int, lr: float, qas: bool = True,
                loss: str = "cross_entropy", seed: int = 0, trainer: str = "c", note=None,
                cache_dir=None) -> SearchResult:
    """Search the scheme for `graph` on the host's data `pretrain` (see fedtiny.search). trainer: "c" (when gcc is
    present) or "python"."""
    if trainer == "c" and shutil.which("gcc") is not None:
        factory, prepare = _c_trainer()
    else:
        from fedtiny_device.trainer import Trainer as factory
        prepare = None
    return search(graph, host_data(pretrain, graph, seed), factory, budget=budget, reserve=reserve, lr=lr, qas=qas,
                  loss=loss, seed=seed, prepare=prepare, note=note, cache_dir=cache_dir)
