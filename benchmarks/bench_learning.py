"""Learning on data nobody tuned for (issue 16): fedtiny against plain Flower + PyTorch fp32, six rows per scheme.

    pip install -e ".[datasets]" && python benchmarks/bench_learning.py [--only NAME ...] [--schemes default SCHEME ...]

Three public datasets that packages bundle, none of them a shipped scenario (and not ACSF1, ItalyPowerDemand or
GunPoint, which are kept for independent checks), are written to .npz files exactly as a user would give them:

    BasicMotions  aeon: 80 recordings, 6 channels (accelerometer + gyroscope) x 100, 4 activities
    ArrowHead     aeon: 211 outlines of arrowheads as series of 251, 3 classes
    wine          scikit-learn: 178 wines, 13 chemical measurements, 3 cultivars

then each of them and each built-in scenario (industrial, vision, medical) runs as

    fedtiny simulate --data FILE.npz --nodes 10 --baseline [--scheme auto]     (or --scenario NAME)

once per scheme of --schemes ("default", the only one unless asked: no --scheme option, simulate's own default, which is
auto), with every learning setting
left to fedtiny (pretraining to convergence, lr and epochs chosen on the host's validation data, the baseline's lr
by the same rule). Each row has the host model's validation accuracy, the settings chosen, the held-out accuracy
before and after the rounds for fedtiny and for the fp32 baseline, the difference, the devices' personalised
accuracy after the last round, and how it was measured: wall and CPU time of the command (all its processes),
the UTC time it started and the 1-minute load average before and after it (the machine may be shared). The
model cache is a fresh folder unless --cache is given: pretraining and the choices are part of each data's first
row's time (its later schemes' rows reuse the pretrained model, and say so).

The rows go into this benchmark's section of BENCHMARKS.md by their command: a run with --only replaces its own
rows and keeps the others (each row says when it was measured); text under the table is kept.
"""

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import BENCHMARKS, machine, write_section

SECTION = "## Learning on data nobody tuned for: fedtiny against fp32 Flower, 10 nodes (issue 16)"
DATASETS = ("BasicMotions", "ArrowHead", "wine")
SCENARIOS = ("industrial", "vision", "medical")
HEADER = ("| data | command | host model (validation) | chosen | fedtiny before -> after | fp32 Flower | "
          "difference (points) | within 2 points | personalised mean / worst tenth | wall / CPU | measured (UTC, "
          "load before -> after) |")
RULE = "|---|---|---|---|---:|---:|---:|---|---:|---:|---|"


def export(name: str, folder: Path) -> Path:
    """The dataset as a user's .npz: X (N, F) or (N, C, L) float32, y as the class names (kept if already there)."""
    path = folder / f"{name}.npz"
    if path.exists():
        return path
    if name == "wine":
        from sklearn.datasets import load_wine

        bunch = load_wine()
        x, y = bunch.data, np.asarray(bunch.target_names)[bunch.target]
    else:
        from aeon.datasets import load_classification  # the "datasets" extra

        x, y = load_classification(name)  # the package's train and test files together
    np.savez(path, X=np.asarray(x, np.float32), y=np.asarray(y).astype(str))
    return path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: simulate, its workers, gcc
    return usage.ru_utime + usage.ru_stime


def simulate(args: list[str], cache: str, warm: bool) -> tuple[dict | None, str, str]:
    """(metrics.json, or None when the command failed; the command's output; how it was measured: wall / CPU, start
    time and load) of one run; warm: the cache already holds this data's pretrained model (an earlier row of this
    run made it)."""
    out = tempfile.mkdtemp(prefix="learn_")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load, cpu, start = os.getloadavg()[0], children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from fedtiny.cli import main; main()", "simulate", *args,
                           "--out", out], env=dict(os.environ, FEDTINY_CACHE=cache), capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    measured = (f"{wall:.0f} s / {cpu:.0f} s{' (pretrained model cached)' if warm else ''} | {when}, {load:.1f} -> "
                f"{os.getloadavg()[0]:.1f}")
    if done.returncode != 0:  # a row of its own: what a user giving this command meets
        print(f"fedtiny simulate {' '.join(args)} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None, done.stderr + done.stdout, measured
    return json.loads((Path(out) / "metrics.json").read_text()), done.stderr + done.stdout, measured


def host_line(log: str) -> str:
    line = next((x for x in log.splitlines() if x.startswith("host model:")), "")
    return line.removeprefix("host model: ").split(" on the host's")[0]


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def row(label: str, command: str, metrics: dict | None, log: str, measured: str) -> str:
    if metrics is None:
        error = next((x for x in reversed(log.splitlines()) if x.startswith("Error")), "exit code not 0")
        return f"| {label} | `{command}` | {host_line(log)} | fails: {error} | - | - | - | NO | - | {measured} |"
    run, last, base = metrics["run"], metrics["rounds"][-1], metrics["baseline"]["rounds"][-1]["accuracy"]
    gap = 100 * (last["accuracy"] - base)
    warned = " (warned: near chance)" if "near chance" in log else ""
    personal = f"{percent(last.get('personal_accuracy'))} / {percent(last.get('personal_worst_tenth'))}"
    return (f"| {label} | `{command}` | {host_line(log)}{warned} | `{run['scheme']}`, lr {run['lr']:g} x "
            f"{run['epochs']} ep; fp32 lr {run['baseline_lr']:g} | {percent(run['initial_accuracy'])} -> "
            f"{percent(last['accuracy'])} | {percent(base)} | {gap:+.1f} | {'yes' if gap >= -2 else 'NO'} | "
            f"{personal} | {measured} |")


def command_of(table_row: str) -> str:
    return table_row.split("|")[2].strip()


def merged_section(new_rows: list[str], order: list[str], old_text: str) -> str:
    """This benchmark's section with new_rows replacing the rows of the same command (others kept, sorted by
    `order`: commands in the bench's order), and the text under the old table kept."""
    old = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", old_text, re.M | re.S)
    old_rows, notes = [], ""
    if old and HEADER in old.group(1):
        after = old.group(1).split(HEADER, 1)[1].splitlines()[2:]  # past the header and its rule
        table = [line for line in after[:next((i for i, x in enumerate(after) if not x.startswith("|")), len(after))]]
        old_rows, notes = table, "\n".join(after[len(table):]).strip()
    rows = {command_of(r): r for r in old_rows} | {command_of(r): r for r in new_rows}
    ranked = sorted(rows, key=lambda c: (order.index(c) if c in order else len(order), c))
    return "\n".join([
        SECTION, "",
        "Command: `python benchmarks/bench_learning.py` (rows refreshed with `--only NAME ... --schemes ...`; each row "
        "says when it was measured and under what load).",
        f"Machine: {machine()}; Python {sys.version.split()[0]}, numpy {np.__version__} (the last run's).", "",
        "Every learning setting is fedtiny's own choice: the host pretrains to convergence on a validation part of "
        "its data (fedtiny/train.py), the devices' lr and epochs and the fp32 baseline's lr are chosen on it by one "
        "rule (simulations/tuning.py); the update scheme is simulate's default, `auto`, searched under the budget on the "
        "host's held-out data (`fedtiny.search`). Accuracies are on "
        "the held-out test set after 10 rounds; \"host model\" is on the host's validation part; personalised: each "
        "device's model on its own held-out samples after the last round. Wall and CPU time: the whole command (all "
        "its processes), from a fresh model cache (pretraining, search and lr choices included) unless the row says "
        "the pretrained model was cached.", "",
        HEADER, RULE, *(rows[c] for c in ranked), "", notes]).rstrip() + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="run only these rows (dataset or scenario names)")
    parser.add_argument("--schemes", nargs="+", default=["default"],
                        help="schemes to run each row with: a --scheme value, or 'default' for none (simulate's "
                        "default, auto: '--scheme auto' would run it twice)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache", help="model cache to use (default: a fresh one, so pretraining and the choices "
                        "are part of each row's wall time)")
    parser.add_argument("--data-dir", help="folder for the datasets' .npz files: those already there are used "
                        "(e.g. exported by an environment with aeon), the others are exported into it")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    folder = Path(args.data_dir or tempfile.mkdtemp(prefix="learn_data_"))
    folder.mkdir(parents=True, exist_ok=True)
    rows, order, cache = [], [], args.cache or tempfile.mkdtemp(prefix="fedtiny_cache_")
    for name in DATASETS + SCENARIOS:
        for k, scheme in enumerate(args.schemes):
            option = [] if scheme == "default" else ["--scheme", scheme]
            shown = f"--data {name}.npz" if name in DATASETS else f"--scenario {name}"
            rounds = [] if args.rounds == 10 else ["--rounds", str(args.rounds)]
            cached = " (--cache: models and choices from earlier runs)" if args.cache else ""
            command = " ".join(["fedtiny simulate", shown, "--nodes 10", *rounds, "--baseline", *option]) + cached
            order.append(f"`{command}`")
            if args.only and name not in args.only:
                continue
            source = ["--data", str(export(name, folder))] if name in DATASETS else ["--scenario", name]
            metrics, log, measured = simulate([*source, "--nodes", "10", *rounds, "--baseline", "--no-alone",
                                               *option], cache, warm=bool(args.cache) or k > 0)
            rows.append(row(name, command, metrics, log, measured))
            print(rows[-1], flush=True)
            if not args.no_write:  # after every row: a long run that stops keeps the rows it measured
                write_section(SECTION, merged_section(rows, order, BENCHMARKS.read_text()))
    print(merged_section(rows, order, BENCHMARKS.read_text() if BENCHMARKS.exists() else ""))


if __name__ == "__main__":
    main()
