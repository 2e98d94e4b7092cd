"""benchmarks/report.write_section: a benchmark rewrites its own section of BENCHMARKS.md and nothing else, and keeps
what a person wrote under the section's BY_HAND line."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from report import BY_HAND, write_section  # noqa: E402


def test_a_rewritten_section_keeps_what_is_written_by_hand_and_the_other_sections(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# Benchmarks\n\n## A\n\nold table\n\n{BY_HAND}\nA note by hand.\n\n### Its subsection\n\n"
                    "| x |\n|---|\n\n## B\n\nB's text\n")
    write_section("## A", "## A\n\nnew table\n", page)
    assert page.read_text() == (f"# Benchmarks\n\n## A\n\nnew table\n\n{BY_HAND}\nA note by hand.\n\n"
                                "### Its subsection\n\n| x |\n|---|\n\n## B\n\nB's text\n")
    write_section("## B", "## B\n\nB again\n", page)  # no hand-written part: all of it replaced
    assert page.read_text().endswith("## B\n\nB again\n") and "A note by hand." in page.read_text()
    write_section("## C", "## C\n\nnew section\n", page)
    assert page.read_text().endswith("## B\n\nB again\n\n## C\n\nnew section\n")
