"""`fedtiny simulate` (issues 7 and 17): the default command's wall time, and the same task the usual way.

    python benchmarks/bench_simulate.py [--all]

1. `fedtiny simulate --nodes 50` exactly as README gives it, timed as a whole command, cold (empty model
   cache: pretraining and the C builds included) and warm; with the CPU seconds of all its processes.
2. The same run with `--baseline`: plain Flower FedAvg with PyTorch fp32 clients on the same task, node data,
   rounds and local epochs, with the same thread settings (--workers processes of one thread each on both
   sides); side by side: final accuracy, rounds to 90 % of the best, bytes per node per round, device memory
   for training, and the rounds' wall time (round 1's start to the last round's end, on both sides) and its
   ratio, the figure that does not depend on how long the machine takes to start Python processes; and each
   side's wall time from the pretrained float model, its own lr choice included (this run's cache holds the
   pretrained model alone: neither side's lr choice comes from a cache).
3. With --all: `--dropout 0.3`, `--stragglers 0.2` and `--engine flower` (warm model cache).

The machine is shared: the load average before and after each run is printed with it; quote ratios.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import provenance, write_section

from fedtiny_sim.tuning import trial_threads

SECTION = "## fedtiny simulate: 50 nodes on one machine (issues 7, 17)"


def cpu_seconds() -> float:
    """CPU seconds of this process's waited-for descendants: a fedtiny command with its worker processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg()[:1])


def fedtiny_command() -> list[str]:
    """The `fedtiny` script of this interpreter's environment (a venv's bin is often not on PATH), else PATH's."""
    beside = Path(sys.executable).with_name("fedtiny")
    return [str(beside) if beside.exists() else "fedtiny"]


def fedtiny(*args, cache: str) -> tuple[float, float, str, dict, list[tuple[float, str]]]:
    """(wall seconds, CPU seconds, load average before -> after, metrics.json, phases) of one command; phases:
    (seconds since the start, line) for each line the command printed (its phase lines and rounds, as they came),
    also echoed here so that a long run shows where it is."""
    out = tempfile.mkdtemp(prefix="sim_")
    before, cpu0, start = load(), cpu_seconds(), time.perf_counter()
    phases = []
    with subprocess.Popen([*fedtiny_command(), "simulate", *args, "--out", out], text=True,
                          env=dict(os.environ, FEDTINY_CACHE=cache), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            if line.strip():
                phases.append((time.perf_counter() - start, line.strip()))
                print(f"  {phases[-1][0]:6.1f} s  {line.strip()}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedtiny simulate {' '.join(args)} failed with exit code {proc.returncode}")
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    print(f"fedtiny simulate {' '.join(args)}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {before} -> {load()}",
          file=sys.stderr)
    return wall, cpu, f"{before} -> {load()}", json.loads((Path(out) / "metrics.json").read_text()), phases


PHASES = (("preparing", "preparing (pretraining or the cache, lr choice, quantizing, compiling)"),
          ("starting", "broker, nodes' start, rounds (and without --baseline the report)"),
          ("baseline: its fp32", "the baseline's lr choice"),
          ("baseline: plain", "the baseline's workers and rounds, and the report"), ("report:", "exit"))


def phase_times(phases: list[tuple[float, str]], wall: float) -> str:
    """Where a command's wall time went, from the times its phase lines came: start-up to the first, then from each
    phase line to the next (the last to the command's end)."""
    marks = [(t, label) for t, line in phases for start, label in PHASES if line.startswith(start)]
    items = [f"start-up {marks[0][0]:.1f} s"] if marks else []
    for (t, label), end in zip(marks, [m[0] for m in marks[1:]] + [wall], strict=True):
        items.append(f"{label} {end - t:.1f} s")
    return "; ".join(items)


def accuracy(metrics: dict) -> str:
    return f"{100 * metrics['run']['initial_accuracy']:.1f} % -> {100 * metrics['rounds'][-1]['accuracy']:.1f} %"


def participants(metrics: dict) -> str:
    counts = [r["participants"] for r in metrics["rounds"]]
    return f"participants per round: {min(counts)}-{max(counts)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="also --dropout, --stragglers and --engine flower")
    options = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="fedtiny_cache_")
    cold, cold_cpu, cold_load, _, cold_phases = fedtiny("--nodes", "50", cache=cache)
    warm, warm_cpu, warm_load, default, warm_phases = fedtiny("--nodes", "50", cache=cache)
    # the comparison starts from the pretrained model alone: each side's lr choice (and fedtiny's C builds) is
    # computed in the run, where a cache that holds them would hide one side's share
    pretrained_only = tempfile.mkdtemp(prefix="fedtiny_cache_")
    for path in Path(cache).glob("*.ftm"):
        for model_file in (path, path.with_suffix(".pt")):
            shutil.copy(model_file, pretrained_only)
    compared_wall, compared_cpu, compared_load, compared, compared_phases = fedtiny("--nodes", "50", "--baseline",
                                                                                   cache=pretrained_only)
    rows = [f"| `fedtiny simulate --nodes 50` (cold: pretraining and C builds included) | {cold:.1f} s | "
            f"{cold_cpu:.1f} s | {cold_load} | {accuracy(default)} ({participants(default)}) |",
            f"| `fedtiny simulate --nodes 50` (warm model cache) | {warm:.1f} s | {warm_cpu:.1f} s | {warm_load} | "
            f"{accuracy(default)} |",
            f"| `fedtiny simulate --nodes 50 --baseline` (cache: the pretrained model alone; both sides, the "
            f"baseline's lr choice included) | {compared_wall:.1f} s | {compared_cpu:.1f} s | {compared_load} | "
            f"{accuracy(compared)} |"]
    where = ["Where the wall time went (from the times each phase line came):", "",
             f"- cold: {phase_times(cold_phases, cold)}", f"- warm: {phase_times(warm_phases, warm)}",
             f"- `--baseline`: {phase_times(compared_phases, compared_wall)}"]
    if options.all:
        _, _, _, dropout, _ = fedtiny("--nodes", "50", "--dropout", "0.3", cache=cache)
        slow_wall, _, slow_load, slow, _ = fedtiny("--nodes", "50", "--stragglers", "0.2", cache=cache)
        flower_wall, _, flower_load, flower, _ = fedtiny("--nodes", "50", "--engine", "flower", cache=cache)
        same = [r["accuracy"] for r in flower["rounds"]] == [r["accuracy"] for r in default["rounds"]]
        rows += [f"| `fedtiny simulate --nodes 50 --dropout 0.3` | - | - | - | {accuracy(dropout)} "
                 f"({participants(dropout)}) |",
                 f"| `fedtiny simulate --nodes 50 --stragglers 0.2` | {slow_wall:.1f} s | - | {slow_load} | "
                 f"{accuracy(slow)} ({participants(slow)}; longest round "
                 f"{max(r['seconds'] for r in slow['rounds']):.1f} s) |",
                 f"| `fedtiny simulate --nodes 50 --engine flower` (warm; Ray) | {flower_wall:.1f} s | - | {flower_load} "
                 f"| {accuracy(flower)} (every round {'identical to' if same else 'DIFFERENT from'} the MQTT "
                 f"engine's) |"]
    run, rounds, memory, base = compared["run"], compared["rounds"], compared["memory"], compared["baseline"]
    compared_fedtiny = run["wall_seconds"] - run["host_model_seconds"]
    up = sum(r["uplink_bytes"] for r in rounds) / sum(r["participants"] for r in rounds)
    down = sum(r["downlink_bytes"] for r in rounds) / sum(r["participants"] for r in rounds)
    last, b_last = rounds[-1], base["rounds"][-1]
    lines = [SECTION, "", provenance("python benchmarks/bench_simulate.py" + (" --all" if options.all else "")), "",
             "| command | wall time | CPU time (all processes) | load average before -> after | held-out accuracy "
             "before -> after |", "|---|---:|---:|---:|---|", *rows, "", *where, "",
             f"Same task the usual way (`fedtiny simulate --nodes 50 --baseline`, {compared_wall:.1f} s in all, load "
             f"{compared_load}; scenario {run['scenario']}, model {run['model']}, scheme {run['scheme']}; both "
             f"sides in {max(1, min(4, os.cpu_count() or 1))} worker processes of one thread each, simulate's "
             "default --workers):", "",
             "| | fedtiny (int8, sparse, MQTT) | Flower FedAvg + PyTorch fp32 | ratio |", "|---|---:|---:|---:|",
             f"| final held-out accuracy | {100 * last['accuracy']:.1f} % | {100 * b_last['accuracy']:.1f} % | "
             f"{100 * (last['accuracy'] - b_last['accuracy']):+.1f} pt |",
             f"| rounds to {100 * run['target_accuracy']:.0f} % | {run['rounds_to_target']} | "
             f"{base['rounds_to_target']} | |",
             f"| uplink bytes per node per round | {up:,.0f} | {base['bytes_per_node_per_round']:,.0f} | "
             f"{base['bytes_per_node_per_round'] / up:.1f}x fewer |",
             f"| downlink bytes per node per round | {down:,.0f} | {base['bytes_per_node_per_round']:,.0f} | "
             f"{base['bytes_per_node_per_round'] / down:.1f}x fewer |",
             f"| device RAM for training (arena, kernel scratch, stack) | {memory['device_ram_bytes']:,} B | >= "
             f"{base['training_memory_bytes']:,} B (fp32 weights + gradients) | "
             f"{base['training_memory_bytes'] / memory['device_ram_bytes']:.0f}x less |",
             f"| wall time of the rounds (round 1's start to the last round's end) | {run['rounds_seconds']:.1f} s | "
             f"{base['rounds_seconds']:.1f} s | fedtiny takes {run['rounds_seconds'] / base['rounds_seconds']:.2f}x "
             f"the baseline's |",
             f"| wall time from the pretrained float model (fedtiny: its lr choice, quantizing, compiling, broker, "
             f"nodes' start, rounds; baseline: its lr choice ({base['lr_seconds']:.1f} s), workers' start, rounds) | "
             f"{compared_fedtiny:.1f} s | {base['wall_seconds']:.1f} s | "
             f"{compared_fedtiny / base['wall_seconds']:.2f}x |", "",
             f"Scopes: each side's wall time starts from the pretrained float model both start from (loaded from the "
             f"model cache in {run['host_model_seconds']:.1f} s, counted on neither side). fedtiny's side is the "
             f"run's wall time (simulate's own clock, from after the start-up and the input checks) less that load: "
             f"its lr choice and C builds, quantizing, compiling, the broker, the nodes' start and the rounds; the "
             f"baseline's is its lr choice, its workers' start and its "
             f"rounds. Both sides choose their lr by the same rule in this run (its cache held the pretrained model "
             f"alone), the lrs' trials in {trial_threads()} thread(s) on each side. The rounds' row compares round "
             f"1's start to the last round's end on both sides.", "",
             "fedtiny bytes are MQTT payloads of whole transfers (chunk headers, envelope, EdDSA signature, AEAD "
             "tag included); the baseline's are the fp32 arrays alone (no gRPC or protobuf overhead counted)."]
    text = "\n".join(lines)
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
