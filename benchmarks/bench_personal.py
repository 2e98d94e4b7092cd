"""Personalisation (issue 16): each device's personalised model against the global model and the device alone.

    python benchmarks/bench_personal.py [--only NAME ...]

Runs the default `fedtiny simulate` (industrial, 50 nodes, 10 rounds) and `fedtiny simulate --scenario medical
--nodes 10`, and reads from each run's metrics.json, on each device's held-out part (the fifth of its samples it
never trains on): the global model before round 1 and after the last round, the device's personalised model (the
global model after its own local steps, as its last DELTA reported it) and the device trained alone from the
pretrained model for as many local steps as its rounds; each as the mean over the devices and the mean of the
worst tenth of them (simulations/report_data.personal_rows, the report's own table).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedtiny_sim.report_data import personal_rows
from report import provenance, write_section

SECTION = "## Personalisation: global, personalised and alone on each device's held-out samples (issue 16)"
RUNS = {"industrial": [], "medical": ["--scenario", "medical", "--nodes", "10"]}


def simulate(arguments: list[str]) -> tuple[float, dict]:
    out = tempfile.mkdtemp(prefix="personal_")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from fedtiny.cli import main; main()", "simulate", *arguments,
                           "--alone", "--out", out, "--quiet"], env=dict(os.environ), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fedtiny simulate {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((Path(out) / "metrics.json").read_text())


def cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "-"
    return f"{100 * summary['mean']:.1f} % / {100 * summary['worst_tenth']:.1f} %"


def row(name: str, arguments: list[str], wall: float, metrics: dict) -> str:
    run, last = metrics["run"], metrics["rounds"][-1]
    table = dict(personal_rows(metrics["devices"]))
    before, after, personal, alone = table.values()
    command = " ".join(["fedtiny simulate", *arguments])
    return (f"| {name} | `{command}` | {run['model']}, {run['scheme']} | "
            f"{100 * run['initial_accuracy']:.1f} % -> {100 * last['accuracy']:.1f} % | {cell(before)} | "
            f"{cell(after)} | {cell(personal)} | {cell(alone)} | {personal['devices']} of {run['nodes']} | "
            f"{wall:.0f} s |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="run only these rows; the section is not written then")
    args = parser.parse_args()
    rows = []
    for name, arguments in RUNS.items():
        if args.only and name not in args.only:
            continue
        wall, metrics = simulate(arguments)
        rows.append(row(name, arguments, wall, metrics))
        print(rows[-1], flush=True)
    lines = [SECTION, "", provenance("python benchmarks/bench_personal.py"), "",
             "Each device holds a fifth of its samples out (from 10 samples on) and never trains on them. Personalised: "
             "the global model after the device's own local steps (FedAvg + local fine-tuning), measured by the "
             "device and reported in its last DELTA. On the industrial scenario a device holds only the classes its "
             "machine has had (healthy and one or two fault kinds), so its held-out part scores those; "
             "benchmarks/bench_fedcurve.py scores the same three models on each machine's windows of every class. "
             "Alone: the device's model trained from the pretrained model on "
             "its own train part only, for as many local steps as its 10 rounds, with the same C trainer. Cells are "
             "mean / worst tenth over the devices with a held-out part; the global accuracy before -> after is on "
             "the scenario's held-out test set.", "",
             "| scenario | command | model, scheme | global, test set | global before (held-out parts) | "
             "global after | personalised | alone | devices | wall time |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows]
    print("\n".join(lines))
    if not args.only:
        write_section(SECTION, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
