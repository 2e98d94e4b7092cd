"""benchmarks/bench_learning.py's table: a run with --only replaces its own rows (by command) and keeps the others
and the notes under the table, so BENCHMARKS.md needs no row written by hand."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_learning  # noqa: E402


def table_row(label: str, command: str, accuracy: str) -> str:
    return f"| {label} | `{command}` | host | chosen | a -> {accuracy} | b | +0.0 | yes | p | w | m |"


def test_only_rows_replace_their_own_and_keep_the_rest():
    order = ["`fedtiny simulate --scenario medical --nodes 10 --baseline --scheme auto`",
             "`fedtiny simulate --scenario medical --nodes 10 --baseline`",
             "`fedtiny simulate --scenario vision --nodes 10 --baseline`"]
    first = bench_learning.merged_section([table_row("vision", order[2][1:-1], "90 %"),
                                           table_row("medical", order[1][1:-1], "80 %")], order, "")
    page = "# Benchmarks\n\n" + first + "\nNotes written under the table.\n\n## Next section\nkept\n"
    second = bench_learning.merged_section([table_row("medical", order[1][1:-1], "81 %"),
                                            table_row("medical", order[0][1:-1], "82 %")], order, page)
    rows = [line for line in second.splitlines() if line.startswith("| medical") or line.startswith("| vision")]
    assert [bench_learning.command_of(r) for r in rows] == order  # the bench's order, whatever ran last
    assert "81 %" in rows[1] and "80 %" not in second and "90 %" in rows[2]
    assert second.rstrip().endswith("Notes written under the table.")
    assert "Next section" not in second


def test_a_command_that_fails_is_a_row_naming_its_error():
    log = ("host model: float 75.0 %, int8 75.0 % on the host's validation data (4 samples)\n"
           "Error: the held-out data needs samples to train on and to score on for --scheme auto\n")
    run = bench_learning.Run(None, log, bench_learning.Measured(1.0, 1.0, "now", 1.0, 1.0, False))
    line = bench_learning.row("BasicMotions", "`fedtiny simulate --data B.npz`", run)
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[2] == "float 75.0 %, int8 75.0 %"
    assert cells[3] == "fails: Error: the held-out data needs samples to train on and to score on for --scheme auto"
    assert cells[7] == "NO" and len(cells) == bench_learning.HEADER.count("|") - 1


def run_at(before: float, after: float, base_before: float, base_after: float) -> bench_learning.Run:
    metrics = {"run": {"initial_accuracy": before, "scheme": "auto = full", "lr": 0.001, "epochs": 2,
                       "baseline_lr": 0.000316},
               "rounds": [{"accuracy": after, "personal_accuracy": 0.8, "personal_worst_tenth": 0.5}],
               "baseline": {"initial_accuracy": base_before, "rounds": [{"accuracy": base_after}]}}
    log = "host model: float 80.0 %, int8 80.0 % on the host's validation data (10 samples)\n"
    return bench_learning.Run(metrics, log, bench_learning.Measured(10.0, 5.0, "2026-12-01 08:00", 1.0, 2.0, False))


def test_several_seeds_make_one_row_judged_on_the_mean_difference_with_its_standard_error():
    command = bench_learning.command_cell("ArrowHead", "default", 10, [0, 1, 2], cached=False)
    assert command == "`fedtiny simulate --data ArrowHead.npz --nodes 10 --baseline --seed S` for S in 0 1 2"
    runs = {0: run_at(0.5, 0.70, 0.5, 0.70), 1: run_at(0.5, 0.69, 0.5, 0.74), 2: run_at(0.5, 0.76, 0.5, 0.74)}
    cells = [cell.strip() for cell in bench_learning.seeds_row("ArrowHead", command, runs).split("|")[1:-1]]
    assert len(cells) == bench_learning.HEADER.count("|") - 1
    # differences +0.0, -5.0, +2.0: mean -1.0, sd 3.6, standard error 3.6 / sqrt(3) = 2.1
    assert cells[6] == "mean -1.0 ± 2.1 (per seed +0.0, -5.0, +2.0)"
    assert cells[7] == "yes (the mean; 2 of 3 seeds alone)"  # one seed alone misses; the mean does not
    assert cells[4] == "mean 50.0 (sd 0.0) % -> 71.7 (sd 3.8) %"
    assert cells[9] == "30 s / 15 s, 3 runs"
    runs[2] = run_at(0.5, 0.70, 0.5, 0.74)  # -4.0 with the others: mean -3.0
    assert "| NO (the mean; 1 of 3 seeds alone) |" in bench_learning.seeds_row("ArrowHead", command, runs)


def test_one_seed_other_than_0_is_its_own_row_after_its_datas_rows():
    seed0 = bench_learning.command_cell("ArrowHead", "default", 10, [0], cached=False)
    seed1 = bench_learning.command_cell("ArrowHead", "default", 10, [1], cached=False)
    wine = bench_learning.command_cell("wine", "default", 10, [0], cached=False)
    assert seed1 == "`fedtiny simulate --data ArrowHead.npz --nodes 10 --baseline --seed 1`"
    page = "# Benchmarks\n\n" + bench_learning.merged_section(
        [bench_learning.row("ArrowHead", seed0, run_at(0.5, 0.7, 0.5, 0.7)),
         bench_learning.row("wine", wine, run_at(0.9, 0.9, 0.9, 0.9))], [seed0, wine], "")
    merged = bench_learning.merged_section([bench_learning.row("ArrowHead", seed1, run_at(0.5, 0.69, 0.6, 0.74))],
                                           [seed1, wine], page)
    rows = [line for line in merged.splitlines() if line.startswith("| ArrowHead") or line.startswith("| wine")]
    assert [bench_learning.command_of(r) for r in rows] == [seed1, seed0, wine]
    assert "| 50.0 % -> 69.0 % | 60.0 % -> 74.0 % | -5.0 | NO |" in rows[0]
