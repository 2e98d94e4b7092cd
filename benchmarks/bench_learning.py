"""Learning on data nobody tuned for (issue 16): fedtiny against plain Flower + PyTorch fp32, six rows.

    pip install -e ".[datasets]" && python benchmarks/bench_learning.py [--only NAME ...] [--rounds 10]

Three public datasets that packages bundle, none of them a shipped scenario (and not ACSF1, ItalyPowerDemand or
GunPoint, which are kept for independent checks), are written to .npz files exactly as a user would give them:

    BasicMotions  aeon: 80 recordings, 6 channels (accelerometer + gyroscope) x 100, 4 activities
    ArrowHead     aeon: 211 outlines of arrowheads as series of 251, 3 classes
    wine          scikit-learn: 178 wines, 13 chemical measurements, 3 cultivars

then each of them and each built-in scenario (industrial, vision, medical) runs as

    fedtiny simulate --data FILE.npz --nodes 10 --baseline     (or --scenario NAME)

with every learning setting left to fedtiny (pretraining to convergence, lr and epochs chosen on the host's
validation data, the baseline's lr by the same rule). The table has the host model's validation accuracy, the
settings chosen, the held-out accuracy before and after the rounds for fedtiny and for the fp32 baseline, and
the difference. The model cache is a fresh folder: pretraining and the choices are part of each run's time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import provenance, write_section

SECTION = "## Learning on data nobody tuned for: fedtiny against fp32 Flower, 10 nodes (issue 16)"
DATASETS = ("BasicMotions", "ArrowHead", "wine")
SCENARIOS = ("industrial", "vision", "medical")


def export(name: str, folder: Path) -> Path:
    """The dataset as a user's .npz: X (N, F) or (N, C, L) float32, y as the class names."""
    if name == "wine":
        from sklearn.datasets import load_wine

        bunch = load_wine()
        x, y = bunch.data, np.asarray(bunch.target_names)[bunch.target]
    else:
        from aeon.datasets import load_classification  # the "datasets" extra

        x, y = load_classification(name)  # the package's train and test files together
    path = folder / f"{name}.npz"
    np.savez(path, X=np.asarray(x, np.float32), y=np.asarray(y).astype(str))
    return path


def simulate(source: list[str], rounds: int, cache: str) -> tuple[float, dict, str]:
    out = tempfile.mkdtemp(prefix="learn_")
    command = ["simulate", *source, "--nodes", "10", "--rounds", str(rounds), "--baseline", "--no-alone"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from fedtiny.cli import main; main()", *command, "--out", out],
                          env=dict(os.environ, FEDTINY_CACHE=cache), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fedtiny {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((Path(out) / "metrics.json").read_text()), done.stderr + done.stdout


def host_line(log: str) -> str:
    line = next((x for x in log.splitlines() if x.startswith("host model:")), "")
    return line.removeprefix("host model: ").split(" on the host's")[0]


def row(label: str, command: str, wall: float, metrics: dict, log: str) -> str:
    run, last, base = metrics["run"], metrics["rounds"][-1]["accuracy"], metrics["baseline"]["rounds"][-1]["accuracy"]
    gap = 100 * (last - base)
    warned = " (warned: near chance)" if "near chance" in log else ""
    return (f"| {label} | `{command}` | {host_line(log)}{warned} | lr {run['lr']:g}, {run['epochs']} ep; fp32 lr "
            f"{run['baseline_lr']:g} | {100 * run['initial_accuracy']:.1f} % -> {100 * last:.1f} % | "
            f"{100 * base:.1f} % | {gap:+.1f} | {'yes' if gap >= -2 else 'NO'} | {wall:.0f} s |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="run only these rows (dataset or scenario names); the section "
                        "is not written then")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache", help="model cache to use (default: a fresh one, so pretraining and the choices "
                        "are part of each row's wall time)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="learn_data_"))
    cache = args.cache or tempfile.mkdtemp(prefix="fedtiny_cache_")
    rows = []
    for name in DATASETS + SCENARIOS:
        if args.only and name not in args.only:
            continue
        if name in DATASETS:
            source, shown = ["--data", str(export(name, folder))], f"--data {name}.npz"
        else:
            source, shown = ["--scenario", name], f"--scenario {name}"
        wall, metrics, log = simulate(source, args.rounds, cache)
        rounds = "" if args.rounds == 10 else f" --rounds {args.rounds}"
        rows.append(row(name, f"fedtiny simulate {shown} --nodes 10{rounds} --baseline", wall, metrics, log))
        print(rows[-1], flush=True)
    command = "python benchmarks/bench_learning.py" + (" --cache DIR (pretrained models and trial scores kept from "
                                                       "earlier runs: wall times without pretraining)" if args.cache
                                                       else "")
    lines = [SECTION, "", provenance(command), "",
             "Every learning setting is fedtiny's own choice: the host pretrains to convergence on a validation part "
             "of its data (fedtiny/train.py), the devices' lr and epochs and the fp32 baseline's lr are chosen on it "
             "by one rule (simulations/tuning.py). Accuracies are on the held-out test set after 10 rounds; "
             "\"host model\" is on the host's validation part.", "",
             "| data | command | host model (validation) | chosen | fedtiny before -> after | fp32 Flower | "
             "difference (points) | within 2 points | wall time |",
             "|---|---|---|---|---:|---:|---:|---|---:|", *rows]
    print("\n".join(lines))
    if not args.only and args.rounds == 10:
        write_section(SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
