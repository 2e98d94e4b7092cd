"""What every benchmark here prints with its numbers: the machine, and its own section of BENCHMARKS.md."""

import contextlib
import datetime
import io
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M).group(1).strip()
        cpus = re.search(r"^CPU\(s\):\s*(\d+)$", lscpu, re.M).group(1)
    except (OSError, subprocess.CalledProcessError, AttributeError):
        model, cpus = platform.processor() or "unknown CPU", "?"
    return f"{model}, {cpus} logical CPUs"


def provenance(command: str) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (f"Command: `{command}`.\nMachine: {machine()}; Python {platform.python_version()}, torch {torch.__version__},"
            f" numpy {np.__version__}; {date} (UTC).")


# A line in a section of BENCHMARKS.md under which a person writes (notes, measurements by hand): the benchmark keeps
# it and everything after it when it rewrites the section. Invisible in rendered Markdown.
BY_HAND = "<!-- written by hand below: kept when the benchmark rewrites this section -->"


def write_section(heading: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace the section under `heading` (up to the next "## " heading), or append it; others' sections stay.
    The section's BY_HAND line and what follows it stay under the new text."""
    intro = ("# Benchmarks\n\nMeasured results of fedtiny, each section written by the benchmark named in it. "
             "Rerun the command of a section to refresh it.\n")
    old = path.read_text() if path.exists() else intro
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    match = pattern.search(old)
    if match is None:
        new = old.rstrip() + "\n\n" + text
    else:
        _, marker, by_hand = match.group(0).partition(BY_HAND + "\n")
        section = text.rstrip() + "\n\n" + (marker + by_hand.rstrip() + "\n\n" if marker else "")
        new = old[:match.start()] + section + old[match.end():]
    path.write_text(new.rstrip() + "\n")


def single_thread() -> None:
    """One thread for torch and numpy's BLAS, so speeds compare one core with one core."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        threadpool_limits(1)
    except ImportError:
        pass


@contextlib.contextmanager
def capture():
    """Print as usual and keep a copy of what was printed (for the BENCHMARKS.md section)."""
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text):
            buffer.write(text)
            return sys.__stdout__.write(text)

    with contextlib.redirect_stdout(Tee()):
        yield buffer
