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
    line = bench_learning.row("BasicMotions", "fedtiny simulate --data B.npz", None, log, "1 s / 1 s | now, 1 -> 1")
    cells = [cell.strip() for cell in line.split("|")[1:-1]]
    assert cells[2] == "float 75.0 %, int8 75.0 %"
    assert cells[3] == "fails: Error: the held-out data needs samples to train on and to score on for --scheme auto"
    assert cells[7] == "NO" and len(cells) == bench_learning.HEADER.count("|") - 1
