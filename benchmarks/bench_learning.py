"""Learning on data nobody tuned for (issue 16): fedtiny against plain Flower + PyTorch fp32, six rows per scheme.

    pip install -e ".[datasets]" && python benchmarks/bench_learning.py [--only NAME ...] [--schemes default SCHEME ...]
                                                                        [--seeds SEED ...]

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

--seeds runs every row at each seed (another split of the data into host, nodes and test set, and another
pretraining); with several seeds a row gives their mean and spread and judges "within 2 points" on the mean
difference, with its standard error beside it: on a test set of 42 samples one sample is 2.4 points, so one seed's
last round cannot say whether fedtiny is within 2 points of fp32.

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
from dataclasses import dataclass
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


@dataclass
class Measured:
    """How one command was measured: wall and CPU seconds (all its processes), when it started (UTC) and the
    1-minute load average before and after it; warm: the cache held this data's pretrained model already."""
    wall: float
    cpu: float
    when: str
    load_before: float
    load_after: float
    warm: bool

    def cells(self) -> str:
        return (f"{self.wall:.0f} s / {self.cpu:.0f} s{' (pretrained model cached)' if self.warm else ''} | "
                f"{self.when}, {self.load_before:.1f} -> {self.load_after:.1f}")


@dataclass
class Run:
    """One command's metrics.json (None when it failed), its output and how it was measured."""
    metrics: dict | None
    log: str
    measured: Measured


def simulate(args: list[str], cache: str, warm: bool) -> Run:
    """One `fedtiny simulate` run with `args` in model cache `cache`; warm: the cache already holds this data's
    pretrained model (an earlier row of this run made it)."""
    out = tempfile.mkdtemp(prefix="learn_")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load, cpu, start = os.getloadavg()[0], children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from fedtiny.cli import main; main()", "simulate", *args,
                           "--out", out], env=dict(os.environ, FEDTINY_CACHE=cache), capture_output=True, text=True)
    measured = Measured(time.perf_counter() - start, children_cpu() - cpu, when, load, os.getloadavg()[0], warm)
    if done.returncode != 0:  # a row of its own: what a user giving this command meets
        print(f"fedtiny simulate {' '.join(args)} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return Run(None, done.stderr + done.stdout, measured)
    return Run(json.loads((Path(out) / "metrics.json").read_text()), done.stderr + done.stdout, measured)


def host_line(log: str) -> str:
    line = next((x for x in log.splitlines() if x.startswith("host model:")), "")
    return line.removeprefix("host model: ").split(" on the host's")[0]


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def failed_row(label: str, command: str, run: Run, seed: str = "") -> str:
    error = next((x for x in reversed(run.log.splitlines()) if x.startswith("Error")), "exit code not 0")
    return (f"| {label} | {command} | {host_line(run.log)} | fails{seed}: {error} | - | - | - | NO | - | "
            f"{run.measured.cells()} |")


def accuracies(metrics: dict) -> tuple[float, float, float, float]:
    """(fedtiny before, after, fp32 before, after) in percent: the int8 and the float model on the held-out test
    set before the rounds, and the global models after the last round."""
    base = metrics["baseline"]
    return (100 * metrics["run"]["initial_accuracy"], 100 * metrics["rounds"][-1]["accuracy"],
            100 * base["initial_accuracy"], 100 * base["rounds"][-1]["accuracy"])


def row(label: str, command: str, run: Run) -> str:
    """The table row of one run; `command` is the row's command cell (command_cell)."""
    if run.metrics is None:
        return failed_row(label, command, run)
    settings, last = run.metrics["run"], run.metrics["rounds"][-1]
    before, after, base_before, base_after = accuracies(run.metrics)
    gap = after - base_after
    warned = " (warned: near chance)" if "near chance" in run.log else ""
    personal = f"{percent(last.get('personal_accuracy'))} / {percent(last.get('personal_worst_tenth'))}"
    return (f"| {label} | {command} | {host_line(run.log)}{warned} | `{settings['scheme']}`, lr {settings['lr']:g} x "
            f"{settings['epochs']} ep; fp32 lr {settings['baseline_lr']:g} | {before:.1f} % -> {after:.1f} % | "
            f"{base_before:.1f} % -> {base_after:.1f} % | {gap:+.1f} | {'yes' if gap >= -2 else 'NO'} | "
            f"{personal} | {run.measured.cells()} |")


def spread(values: list[float]) -> str:
    """"mean (sd s)" of values in percent, the sample standard deviation over the seeds."""
    return f"{np.mean(values):.1f} (sd {np.std(values, ddof=1):.1f})"


def seeds_row(label: str, command: str, runs: dict[int, Run]) -> str:
    """The table row of one data's runs at several seeds: each seed's host model and choices, the mean and standard
    deviation of both sides' accuracies before and after, and the difference's mean with its standard error (the
    standard deviation over the seeds / sqrt(seeds)) and each seed's value. "Within 2 points" judges the mean."""
    for seed, run in runs.items():
        if run.metrics is None:
            return failed_row(label, command, run, f" at seed {seed}")
    table = {seed: accuracies(run.metrics) for seed, run in runs.items()}
    before, after, base_before, base_after = ([t[i] for t in table.values()] for i in range(4))
    gaps = [a - b for a, b in zip(after, base_after)]
    mean, error = float(np.mean(gaps)), float(np.std(gaps, ddof=1) / np.sqrt(len(gaps)))
    host = "; ".join(f"{seed}: {host_line(run.log)}" for seed, run in runs.items())
    chosen = "; ".join(f"{seed}: `{run.metrics['run']['scheme']}` {run.metrics['run']['lr']:g} x "
                       f"{run.metrics['run']['epochs']}, fp32 {run.metrics['run']['baseline_lr']:g}"
                       for seed, run in runs.items())
    personal = [(run.metrics["rounds"][-1].get("personal_accuracy"), run.metrics["rounds"][-1].get(
        "personal_worst_tenth")) for run in runs.values()]
    personal = [p for p in personal if p[0] is not None]
    personal_cell = (f"{percent(np.mean([p[0] for p in personal]))} / {percent(np.mean([p[1] for p in personal]))}"
                     " (mean over seeds)" if personal else "- / -")
    measured = [run.measured for run in runs.values()]
    loads = [m.load_before for m in measured] + [m.load_after for m in measured]
    warm = " (pretrained models cached)" if all(m.warm for m in measured) else ""
    within = sum(g >= -2 for g in gaps)
    return (f"| {label} | {command} | {host} | {chosen} | mean {spread(before)} % -> {spread(after)} % | "
            f"mean {spread(base_before)} % -> {spread(base_after)} % | mean {mean:+.1f} ± {error:.1f} (per seed "
            f"{', '.join(f'{g:+.1f}' for g in gaps)}) | {'yes' if mean >= -2 else 'NO'} (the mean; {within} of "
            f"{len(gaps)} seeds alone) | {personal_cell} | {sum(m.wall for m in measured):.0f} s / "
            f"{sum(m.cpu for m in measured):.0f} s, {len(measured)} runs{warm} | {measured[0].when}, "
            f"{min(loads):.1f} .. {max(loads):.1f} |")


def command_cell(name: str, scheme: str, rounds: int, seeds: list[int], cached: bool) -> str:
    """The row's command cell, also the key by which a later run replaces the row."""
    shown = f"--data {name}.npz" if name in DATASETS else f"--scenario {name}"
    options = [] if scheme == "default" else ["--scheme", scheme]
    rounds_option = [] if rounds == 10 else ["--rounds", str(rounds)]
    seed_option = [] if seeds == [0] else ["--seed", str(seeds[0]) if len(seeds) == 1 else "S"]
    command = " ".join(["fedtiny simulate", shown, "--nodes 10", *rounds_option, "--baseline", *options,
                        *seed_option])
    cell = f"`{command}`" + (f" for S in {' '.join(map(str, seeds))}" if len(seeds) > 1 else "")
    return cell + (" (--cache: models and choices from earlier runs)" if cached else "")


def command_of(table_row: str) -> str:
    return table_row.split("|")[2].strip()


def merged_section(new_rows: list[str], order: list[str], old_text: str) -> str:
    """This benchmark's section with new_rows replacing the rows of the same command (others kept, sorted by
    `order`: commands in the bench's order; another seed's rows after those of their data), and the text under the
    old table kept."""
    old = re.search(rf"^{re.escape(SECTION)}\n(.*?)(?=^## |\Z)", old_text, re.M | re.S)
    old_rows, notes = [], ""
    if old and HEADER in old.group(1):
        after = old.group(1).split(HEADER, 1)[1].splitlines()[2:]  # past the header and its rule
        table = [line for line in after[:next((i for i, x in enumerate(after) if not x.startswith("|")), len(after))]]
        old_rows, notes = table, "\n".join(after[len(table):]).strip()
    rows = {command_of(r): r for r in old_rows} | {command_of(r): r for r in new_rows}

    def data_of(command: str) -> str:
        return re.search(r"--(?:data|scenario) (\S+?)(?:\.npz)? ", command).group(1)

    def rank(command: str) -> tuple[float, str]:  # a row this run did not make (another seed): after its data's rows
        if command in order:
            return order.index(command), command
        same = [i for i, c in enumerate(order) if data_of(c) == data_of(command)]
        return (max(same) + 0.5 if same else len(order)), command

    ranked = sorted(rows, key=rank)
    return "\n".join([
        SECTION, "",
        "Command: `python benchmarks/bench_learning.py` (rows refreshed with `--only NAME ... --schemes ... --seeds "
        "...`; each row says when it was measured and under what load). A row over several seeds (`--seeds`) gives the "
        "means and standard deviations over its seeds and the difference's mean ± its standard error; it is within 2 "
        "points when that mean is.",
        f"Machine: {machine()}; Python {sys.version.split()[0]}, numpy {np.__version__} (the last run's).", "",
        "Every learning setting is fedtiny's own choice: the host pretrains to convergence on a validation part of "
        "its data (fedtiny/train.py), the devices' lr and epochs and the fp32 baseline's lr are chosen on it by one "
        "rule (simulations/tuning.py); the update scheme is simulate's default, `auto`, searched under the budget on the "
        "host's held-out data (`fedtiny.search`). Accuracies are on "
        "the held-out test set after 10 rounds (fp32 Flower: the float model before the rounds -> after, in rows "
        "measured since 2026-12-01 08:00); \"host model\" is on the host's validation part; personalised: each "
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run each row at these seeds (--seed); several make one row of their mean and spread")
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
            command = command_cell(name, scheme, args.rounds, args.seeds, bool(args.cache))
            order.append(command)
            if args.only and name not in args.only:
                continue
            source = ["--data", str(export(name, folder))] if name in DATASETS else ["--scenario", name]
            option = [] if scheme == "default" else ["--scheme", scheme]
            runs = {seed: simulate([*source, "--nodes", "10", "--rounds", str(args.rounds), "--baseline",
                                    "--no-alone", "--seed", str(seed), *option], cache,
                                   warm=bool(args.cache) or k > 0) for seed in args.seeds}
            rows.append(row(name, command, runs[args.seeds[0]]) if len(runs) == 1 else seeds_row(name, command, runs))
            print(rows[-1], flush=True)
            if not args.no_write:  # after every row: a long run that stops keeps the rows it measured
                write_section(SECTION, merged_section(rows, order, BENCHMARKS.read_text()))
    print(merged_section(rows, order, BENCHMARKS.read_text() if BENCHMARKS.exists() else ""))


if __name__ == "__main__":
    main()
