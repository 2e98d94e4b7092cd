"""`--scheme auto` (fedtiny.search): the chosen plan fits each budget, is within a standard error of the best
fixed scheme that fits (checked with independent runs) and the most capacity among the fixed schemes tied with
the best fixed one unless a sparse candidate beats them by more than a standard error, the search is deterministic
for a seed, and a budget nothing fits is one line and exit code 2.

A small MLP on three Gaussian classes keeps every run short; the measuring runs use the Python reference trainer
(the C trainer gives the same numbers bit for bit: tests/test_ctrainer.py)."""

import numpy as np
import pytest
import torch

from fedtiny import search as search_module
from fedtiny.compiler import BudgetError, compile_plan
from fedtiny.device_memory import plan_footprint
from fedtiny.interpreter import quantize_input
from fedtiny.modelfile import save_model
from fedtiny.quantize import quantize
from fedtiny.scheme import layers, parse
from fedtiny.search import (FIXED, Candidate, HostData, Run, Scorer, SearchError, SearchResult, choose,
                            device_ram, interpreter_forward, least_ram, scheme_text, search, tie_band)
from fedtiny.train import fit
from fedtiny.zoo import MLP
from fedtiny_device.trainer import Trainer

MARGIN = 0.005  # the 0.5 point


def blobs(n: int, shift: float, seed: int):
    """Three Gaussian classes; `shift` moves each class's center along another axis (a domain shift that the
    pretrained model has to learn)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = 1.5 * np.eye(3, 6, dtype=np.float32) + shift * np.roll(np.eye(3, 6, dtype=np.float32), 3, axis=1)
    x = centers[y] + rng.normal(0, 1.0, (n, 6)).astype(np.float32)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def small():
    """(graph, host data): an MLP pretrained briefly on one distribution, the host data slightly shifted, so
    that fine-tuning has something to learn."""
    torch.manual_seed(0)
    model = MLP(6, 3, hidden=(16, 12))
    x, y = blobs(300, 0.0, 1)
    fit(model, x, y, epochs=2, seed=0)
    graph = quantize(model, x, name="blobs")
    xh, yh = blobs(260, 2.0, 2)
    xq = quantize_input(graph, xh)
    return graph, HostData(xq[:200], yh[:200], xq[200:], yh[200:])


@pytest.fixture(scope="module", autouse=True)
def short_runs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search_module, "RUN_STEPS", 24)  # per part: each run trains twice (both ways)
        yield


@pytest.fixture(scope="module")
def searched(small, tmp_path_factory):
    """(result, cache dir): one search from nothing at the largest budget, shared by the tests below."""
    graph, data = small
    cache = tmp_path_factory.mktemp("schemes")
    return run_search(graph, data, budgets(graph)[-1], cache), cache


def memory_of(graph, text: str) -> int:
    return device_ram(compile_plan(graph, parse(text, graph), budget=1 << 30, reserve=0))


def budgets(graph) -> list[int]:
    """Budgets (reserve 0): only the classifier fits, half the fixed schemes fit, everything fits."""
    sizes = sorted({memory_of(graph, t) for t in FIXED})
    return [sizes[0] + 8, (sizes[1] + sizes[2]) // 2, sizes[-1] + 8]


def run_search(graph, data, budget, tmp_path, seed=0):
    return search(graph, data, Trainer, budget=budget, reserve=0, lrs=(0.05,), seed=seed, cache_dir=tmp_path)


def test_scheme_text_names_the_fixed_schemes_and_round_trips(small):
    graph, _ = small
    n = len(layers(graph))
    for text in FIXED:
        assert scheme_text(parse(text, graph), n) == text
    sparse = parse("sparse:2:1@1/4", graph)
    text = scheme_text(sparse, n)
    assert text == "sparse:2:1@1/4"
    again = parse(text, graph)
    assert (again.bias_layers, again.weight_ratios) == (sparse.bias_layers, sparse.weight_ratios)


def test_auto_fits_each_budget_and_is_within_a_standard_error_of_every_fixed_scheme_that_fits(small, searched):
    graph, data = small
    scorer = Scorer(data, Trainer, seed=0, both_ways=True)  # as the search scores
    chosen_texts = set()
    for budget in budgets(graph):
        result = run_search(graph, data, budget, searched[1])  # budgets share the measured runs
        chosen_texts.add(result.scheme)
        assert device_ram(result.plan) <= budget
        footprint = plan_footprint(result.plan)  # device_memory's own figures, not the search's
        assert footprint["arena_bytes"] + footprint["scratch_bytes"] + footprint["runtime_static_bytes"] + \
            footprint["stack_bytes"] <= budget
        compile_plan(graph, parse(result.scheme, graph), budget=budget, reserve=0)  # fits: no BudgetError
        measured = {c.text for c in result.candidates if c.measured}
        # independent runs, not the search's cached numbers
        ours = scorer.train(compile_plan(graph, parse(result.scheme, graph), lr=0.05, budget=1 << 30, reserve=0))
        for text in FIXED:
            try:
                plan = compile_plan(graph, parse(text, graph), lr=0.05, budget=budget, reserve=0)
            except BudgetError:
                continue
            assert text in measured  # every scheme the bar compares with is one of auto's measured candidates
            theirs = scorer.train(plan)
            band = tie_band(theirs.accuracy, scorer.count)
            assert ours.accuracy >= theirs.accuracy - band - 1e-12, (budget, result.scheme, text, ours, theirs)
        assert result.scheme in result.table() and "<- chosen" in result.table()
    assert len(chosen_texts) > 1  # the budget changes the choice


def test_the_choice_is_the_most_capacity_among_the_measured_candidates_tied_with_the_best(small, searched):
    _, data = small
    result = searched[0]
    measured = [c for c in result.candidates if c.measured and c.text in {*FIXED, result.scheme}]
    top = max(c.measured.accuracy for c in measured)
    chosen = next(c for c in result.candidates if c.text == result.scheme)
    band = tie_band(top, len(data.y_train) + len(data.y_val))
    assert chosen.measured.accuracy >= top - band - 1e-12
    assert all(c.trainable <= chosen.trainable for c in measured if c.measured.accuracy >= top - band - 1e-12)
    # choose() itself: a measurably worse scheme is never taken for its capacity
    runs = {"classifier": (Run(0.9, 0.3), 0.05), "full": (Run(0.5, 0.9), 0.05), "last:2": (Run(0.89, 0.31), 0.05)}
    cands = [Candidate("classifier", 10, 1), Candidate("full", 30, 100), Candidate("last:2", 20, 50)]
    assert choose(cands, runs.get, 1000).text == "classifier"  # band at 0.9 over 1000 samples: 0.0095
    assert choose(cands, runs.get, 100).text == "last:2"  # over 100 samples: 0.03


def test_a_sparse_candidate_is_chosen_only_where_it_beats_the_best_fixed_scheme_by_more_than_a_standard_error():
    """The sparse candidates were picked as the best estimates of dozens on the same held-out samples: one that
    scores within the noise of the fixed schemes is not taken for its bytes (as it was on the vision scenario's 88
    held-out samples), one that scores measurably above them is, and among such, capacity decides again."""
    n = 100  # band at 0.9: 0.03
    fixed = [Candidate("classifier", 10, 1), Candidate("last:2", 20, 50)]
    sparse = [Candidate("sparse:3:0@1/2", 25, 200), Candidate("sparse:3:0@1", 30, 400)]
    runs = {"classifier": (Run(0.9, 0.3), 0.05), "last:2": (Run(0.9, 0.31), 0.05),
            "sparse:3:0@1/2": (Run(0.92, 0.2), 0.05), "sparse:3:0@1": (Run(0.91, 0.2), 0.05)}
    assert choose(fixed + sparse, runs.get, n).text == "last:2"  # both sparse ones within the noise: no
    runs["sparse:3:0@1/2"] = (Run(0.95, 0.2), 0.05)  # 0.05 above the best fixed one: measurably better
    assert choose(fixed + sparse, runs.get, n).text == "sparse:3:0@1/2"  # the other sparse one (0.91) is not tied
    runs["sparse:3:0@1"] = (Run(0.94, 0.2), 0.05)  # tied with the best sparse one, more bytes
    assert choose(fixed + sparse, runs.get, n).text == "sparse:3:0@1"
    for c in fixed + sparse:
        c.measured, c.lr = runs[c.text]
    line = SearchResult("sparse:3:0@1", None, fixed + sparse, Run(0.9, 0.3), 0, 0.0, 0.05, scored=n).summary()
    assert "sparse:3:0@1 scored more than one standard error (3.0 points) above the best fixed scheme" in line
    line = SearchResult("last:2", None, fixed + sparse, Run(0.9, 0.3), 0, 0.0, 0.05, scored=n).summary()
    assert "last:2 trains the most bytes (50) of the fixed schemes within one standard error (3.0 points)" in line


def test_where_full_fits_and_is_chosen_among_the_fixed_schemes_the_sparse_search_is_skipped(small, searched):
    """The full update has the most trainable bytes of any scheme: where it fits and ties the best fixed scheme,
    the search stops after the fixed schemes' runs (a default run's budget); where it does not fit, the sparse
    schemes are searched."""
    graph, data = small
    result = searched[0]  # from nothing, at the budget every fixed scheme fits
    assert result.scheme == "full"
    assert sorted(c.text for c in result.candidates) == sorted(FIXED)
    assert result.runs == len(FIXED)  # one lr: each fixed scheme once, no bias-depth or weight run
    middle = run_search(graph, data, budgets(graph)[1], searched[1])
    assert any(c.text.startswith("sparse:") and c.measured for c in middle.candidates)
    assert {"classifier", "bias"} <= {c.text for c in middle.candidates if c.measured}


def test_search_is_deterministic_for_a_seed(small, searched, tmp_path):
    graph, data = small
    first, cache = searched
    second = run_search(graph, data, budgets(graph)[-1], tmp_path / "b")
    assert first.runs > 0 and second.runs == first.runs  # both measured from scratch
    assert first.scheme == second.scheme and first.lr == second.lr
    assert [(c.text, c.memory, c.estimate, c.measured) for c in first.candidates] == \
        [(c.text, c.memory, c.estimate, c.measured) for c in second.candidates]
    cached = run_search(graph, data, budgets(graph)[-1], cache)
    assert cached.runs == 0 and cached.scheme == first.scheme


def test_a_warm_search_builds_no_trainer_and_runs_no_forward_pass(small, searched):
    """A search made before for the same model, data, budget and reserve is read back: no trainer, no forward pass
    and no run (counted), and the same scheme, lr, start and plan. So a warm default run pays nothing for auto."""
    graph, data = small
    first, cache = searched
    calls = []

    def trainer(plan, seed):
        calls.append("trainer")
        return Trainer(plan, seed)

    def forward(plan, state, x):
        calls.append("forward")
        return interpreter_forward(plan, state, x)

    again = search(graph, data, trainer, budget=budgets(graph)[-1], reserve=0, lrs=(0.05,), seed=0, cache_dir=cache,
                   forward=forward)
    assert calls == [] and again.runs == 0
    assert (again.scheme, again.lr, again.start, again.scored) == (first.scheme, first.lr, first.start, first.scored)
    assert again.plan.trainable_buffers() == first.plan.trainable_buffers()
    assert device_ram(again.plan) == device_ram(first.plan)
    assert "cached: no new runs" in again.summary() and "cached" not in first.summary()


def test_the_summary_line_names_every_measured_candidate_and_the_rule(small, searched):
    result = searched[0]
    line = result.summary()
    assert "\n" not in line and line.startswith(f"scheme auto = {result.scheme}: ")
    for c in result.candidates:
        assert f"{c.text} {100 * c.measured.accuracy:.1f} % in {c.memory / 1024:.1f} KB" in line
    top = max(c.measured.accuracy for c in result.candidates)
    assert f"within one standard error ({100 * tie_band(top, result.scored):.1f} points)" in line
    assert result.scored == len(small[1].y_train) + len(small[1].y_val)


def test_a_budget_nothing_fits_is_a_search_error(small, tmp_path):
    graph, data = small
    least = least_ram(graph, "classifier")
    assert least <= memory_of(graph, "classifier")
    with pytest.raises(SearchError, match=f"even the classifier alone needs {least:,} bytes"):
        run_search(graph, data, least - 8, tmp_path)


def test_cli_budget_nothing_fits_is_one_line_and_exit_code_2(small, tmp_path, monkeypatch):
    from test_user_input import run_cli

    graph, _ = small
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    save_model(graph, tmp_path / "m.ftm")
    x, y = blobs(200, 2.0, 3)
    np.savez(tmp_path / "host.npz", X=x, y=y)
    result = run_cli("compile", tmp_path / "m.ftm", "--scheme", "auto", "--data", tmp_path / "host.npz",
                     "--budget", "64", "--reserve", "0")
    assert result.exit_code == 2, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("Error: no update scheme fits: even the classifier alone needs"), result.stderr
    assert "Traceback" not in result.stderr


def test_host_data_too_small_to_hold_out_ties_every_scheme_and_takes_the_most_capacity(small, tmp_path):
    """auto is the default, so it must choose on any data: with nothing held out no run can be scored."""
    graph, data = small
    empty = HostData(data.x_train, data.y_train, data.x_val[:0], data.y_val[:0])
    budget = budgets(graph)[1]  # half the fixed schemes fit
    result = run_search(graph, empty, budget, tmp_path)
    fitting = [text for text in FIXED if least_ram(graph, text) <= budget]  # a tight budget drops scratch
    assert result.runs == 0 and sorted(c.text for c in result.candidates) == sorted(fitting)
    assert result.scheme == max(result.candidates, key=lambda c: c.trainable).text and device_ram(result.plan) <= budget
    assert "none held out" in result.table() and "every scheme ties" in result.summary()


def test_simulate_and_compile_default_to_auto():
    from fedtiny.cli import main
    from fedtiny_sim.simulate import SimulationConfig

    for command in ("simulate", "compile"):
        (option,) = [p for p in main.commands[command].params if p.name == "scheme"]
        assert option.default == "auto", command
    assert SimulationConfig().scheme == "auto"


def test_cli_auto_needs_data(small, tmp_path):
    from test_user_input import run_cli

    graph, _ = small
    save_model(graph, tmp_path / "m.ftm")
    for default in ((), ("--scheme", "auto")):  # auto is the default
        result = run_cli("compile", tmp_path / "m.ftm", *default)
        assert result.exit_code == 2 and result.stderr.splitlines() == [
            "Error: --scheme auto (the default) measures schemes on the host's data: give --data (a scenario or a "
            ".npz/.csv), or a scheme by name (--scheme classifier, bias, last:K, full, sparse:...)"]
    assert run_cli("compile", tmp_path / "m.ftm", "--scheme", "bias").exit_code == 0


def test_the_lr_rule_refines_between_the_searchs_measured_neighbours_of_its_best_lr():
    from fedtiny_sim.autoscheme import SEARCH_LRS, lr_neighbours
    from fedtiny_sim.tuning import LRS

    def searched(lr, scored=640):
        return SearchResult("full", None, [], Run(0.5, 1.0), 0, 0.0, lr, scored=scored)

    for lr in SEARCH_LRS:  # a decade apart: the grid's lrs strictly between lr's measured neighbours, and lr
        lower, upper = max([x for x in SEARCH_LRS if x < lr], default=0), min([x for x in SEARCH_LRS if x > lr],
                                                                                default=1)
        assert lr_neighbours(searched(lr)) == tuple(x for x in LRS if lower < x < upper)
    assert lr_neighbours(searched(0.1)) == (0.031623, 0.1)
    assert lr_neighbours(searched(0.01, scored=0)) == LRS  # nothing measured: the whole grid
    assert lr_neighbours(searched(0.05)) == LRS  # a given lr off the grid


def test_simulate_resolves_auto_once_before_the_lr_rule(small, tmp_path, monkeypatch):
    """simulate's _prepare runs the search once, and the lr rule (tuning.settle) then tunes for the scheme it chose
    (before, settle compiled "auto" once per trial lr: a search per lr). The search and the lr rule are stand-ins
    here; the plan is compiled for real."""
    from fedtiny.datafile import Dataset
    from fedtiny_sim import autoscheme, simulate, tuning

    graph, _ = small
    x, y = blobs(60, 2.0, 4)
    ds = Dataset(x, y, np.zeros(len(y), np.int64), ["a", "b", "c"], "blobs")
    task = simulate.Task("blobs", "mlp", ds, [ds.subset(np.arange(30)), ds.subset(np.arange(30, 60))], ds)
    searches, settled = [], []

    def fake_search(g, pretrain, **kwargs):
        searches.append(kwargs)
        return type("Result", (), {"scheme": "bias", "lr": 0.01, "scored": 40,
                                   "summary": lambda self: "scheme auto = bias: ..."})()

    def fake_settle(config, *args, lrs, **kwargs):
        settled.append((config.scheme, lrs))
        config.lr, config.epochs = 0.01, 1
        return []

    monkeypatch.setattr(simulate, "pretrained", lambda task, seed: (None, graph))
    monkeypatch.setattr(tuning, "host_accuracy_lines", lambda *args: [])
    monkeypatch.setattr(tuning, "settle", fake_settle)
    monkeypatch.setattr(autoscheme, "auto_scheme", fake_search)
    config = simulate.SimulationConfig(nodes=2, scheme="auto", reserve=0, trainer="python", out=str(tmp_path))
    _, _, plan, scheme, _, _ = simulate._prepare(config, tmp_path, task, lambda line: None)
    assert len(searches) == 1 and searches[0]["lr"] is None and searches[0]["budget"] == config.budget
    # the lr rule refines between the search's measured neighbours of its best lr (a decade apart), not the grid
    assert settled == [("bias", (0.003162, 0.01, 0.031623))] and scheme == "auto = bias"
    assert plan.trainable_buffers() == compile_plan(graph, parse("bias", graph), reserve=0).trainable_buffers()
