"""benchmarks/bench_scheme.py keeps what is written under its table when it rewrites its section: the notes and
the section's subsections with their own tables (their last table used to be taken for the scheme table's end,
so a run dropped everything between)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_scheme  # noqa: E402


def test_the_notes_under_the_scheme_table_keep_later_subsections_and_their_tables():
    page = (f"# Benchmarks\n\n{bench_scheme.SECTION}\n\nCommand: x.\n\n"
            "| model | budget |\n|---|---|\n| mlp | 32 KB |\n\n"
            "What the table shows.\n\n### A subsection\n\n| run | figure |\n|---|---|\n| a | 1 |\n\nIts notes.\n\n"
            "## Next section\nnot kept\n")
    notes = bench_scheme.notes_under_table(page)
    assert notes == ("\nWhat the table shows.\n\n### A subsection\n\n| run | figure |\n|---|---|\n| a | 1 |\n\n"
                     "Its notes.\n")
    assert bench_scheme.notes_under_table(f"{bench_scheme.SECTION}\n\n| model |\n|---|\n| mlp |\n") == ""
    assert bench_scheme.notes_under_table("# Benchmarks\n") == ""
