"""`--scheme auto` for a task: fedtiny.search run on held-out host data with the trainer the nodes run.

fedtiny.search knows no trainer (fedtiny may not import fedtiny_device); this module gives it one: the generated
C trainer and its forward pass when gcc is present (each candidate plan's library cached in $FEDTINY_CACHE), else
the Python reference, which gives the same numbers bit for bit, only slower.

The data: the samples of the host's data that pretraining never trained on, in two halves
(scenarios.unseen_halves). A search run fine-tunes on one half and scores
on the other, then the other way round, so every score is on samples the model never fitted, as a device's data
is.

The learning rates: the given one (`--lr`), else SEARCH_LRS, every other rate of the lr rule's grid
(simulations/tuning.LRS): each candidate is scored at its best, since the run then picks the lr for the scheme
the search chose, only between the search's best lr's neighbours (lr_neighbours): one set of lr measurements,
coarse here and refined by the lr rule, serves both choices.
"""

import shutil

from fedtiny.datafile import Dataset
from fedtiny.interpreter import quantize_input
from fedtiny.search import HostData, SearchResult, search

from .tuning import LRS, trial_threads

SEARCH_LRS = LRS[1::2]  # 1e-3, 1e-2, 1e-1: a decade apart


def lr_neighbours(result: SearchResult) -> tuple[float, ...]:
    """The lr rule's grid (tuning.LRS) narrowed to the lr the search found best for its chosen scheme and that lr's
    half-decade neighbours: the search measured the scheme at SEARCH_LRS, a decade apart, so the lr rule need only
    refine between the measured neighbours, not try the whole grid again (3 trials instead of 6). The whole grid
    where the search measured no run (host data too small to score one) or measured off the grid."""
    if not result.scored or result.lr not in LRS:
        return LRS
    i = LRS.index(result.lr)
    return LRS[max(0, i - 1):i + 2]


def c_forward(plan, state, x):
    from fedtiny_device.cruntime import CPlanModel

    return CPlanModel(plan).run(state, x)


def auto_scheme(graph, halves: tuple[Dataset, Dataset], *, budget: int, reserve: int, lr: float | None = None,
                epochs: int = 1, qas: bool = True, loss: str = "cross_entropy", seed: int = 0, trainer: str = "c",
                note=None, cache_dir=None) -> SearchResult:
    """Search the scheme for `graph` on `halves`, two halves of host data the model never trained on
    (scenarios.unseen_halves; see fedtiny.search), at `lr`, or at each of SEARCH_LRS when it is None. trainer: "c" (when
    gcc is present) or "python"."""
    from fedtiny.search import interpreter_forward

    if trainer == "c" and shutil.which("gcc") is not None:
        from fedtiny_device.cruntime import CTrainer as factory
        forward = c_forward
    else:
        from fedtiny_device.trainer import Trainer as factory
        forward = interpreter_forward
    first, second = halves
    data = HostData(quantize_input(graph, first.X), first.y, quantize_input(graph, second.X), second.y)
    return search(graph, data, factory, budget=budget, reserve=reserve,
                  lrs=SEARCH_LRS if lr is None else (lr,), epochs=epochs, qas=qas, loss=loss, seed=seed,
                  forward=forward, note=note, cache_dir=cache_dir, workers=trial_threads())
