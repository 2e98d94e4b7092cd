"""`fedtiny simulate` (issue 7): the default command's wall time, and the same task the usual way.

    python benchmarks/bench_simulate.py

1. `fedtiny simulate --nodes 50` exactly as README gives it, timed as a whole command, cold (empty model
   cache: pretraining included) and warm.
2. The same run with `--baseline`: plain Flower FedAvg with PyTorch fp32 clients on the same task, node data,
   rounds and local epochs; side by side: final accuracy, rounds to 90 % of the best, bytes per node per round,
   device memory for training, wall time.
3. `--dropout 0.3`: 30 % of the nodes fail each round; `--stragglers 0.2`: a fifth of the nodes are slow (each
   round they take up to twice the 20 s deadline), so rounds close once the quorum (90 %) has answered.
4. `--engine flower`: the same nodes as ClientApps in Flower's simulation engine on Ray (warm model cache).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import provenance, write_section

SECTION = "## fedtiny simulate: 50 nodes on one machine (issue 7)"


def fedtiny(*args, cache: str) -> tuple[float, dict]:
    out = tempfile.mkdtemp(prefix="sim_")
    start = time.perf_counter()
    subprocess.run(["fedtiny", "simulate", *args, "--out", out], check=True, env=dict(os.environ, FEDTINY_CACHE=cache),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads((Path(out) / "metrics.json").read_text())


def main():
    cache = tempfile.mkdtemp(prefix="fedtiny_cache_")
    cold, _ = fedtiny("--nodes", "50", cache=cache)
    warm, default = fedtiny("--nodes", "50", cache=cache)
    _, compared = fedtiny("--nodes", "50", "--baseline", cache=cache)
    _, dropout = fedtiny("--nodes", "50", "--dropout", "0.3", cache=cache)
    slow_wall, slow = fedtiny("--nodes", "50", "--stragglers", "0.2", cache=cache)
    flower_wall, flower = fedtiny("--nodes", "50", "--engine", "flower", cache=cache)
    same = [r["accuracy"] for r in flower["rounds"]] == [r["accuracy"] for r in default["rounds"]]
    run, rounds, memory, base = compared["run"], compared["rounds"], compared["memory"], compared["baseline"]
    up = sum(r["uplink_bytes"] for r in rounds) / sum(r["participants"] for r in rounds)
    down = sum(r["downlink_bytes"] for r in rounds) / sum(r["participants"] for r in rounds)
    last, b_last = rounds[-1], base["rounds"][-1]
    lines = [SECTION, "", provenance("python benchmarks/bench_simulate.py"), "",
             "| command | wall time | held-out accuracy before -> after | rounds |", "|---|---:|---:|---:|",
             f"| `fedtiny simulate --nodes 50` (cold: pretraining included) | {cold:.1f} s | "
             f"{100 * default['run']['initial_accuracy']:.1f} % -> {100 * default['rounds'][-1]['accuracy']:.1f} % | "
             f"{len(default['rounds'])} |",
             f"| `fedtiny simulate --nodes 50` (warm model cache) | {warm:.1f} s | same | {len(default['rounds'])} |",
             f"| `fedtiny simulate --nodes 50 --dropout 0.3` | - | {100 * dropout['run']['initial_accuracy']:.1f} % -> "
             f"{100 * dropout['rounds'][-1]['accuracy']:.1f} % (participants per round: "
             f"{min(r['participants'] for r in dropout['rounds'])}-{max(r['participants'] for r in dropout['rounds'])})"
             f" | {len(dropout['rounds'])} |",
             f"| `fedtiny simulate --nodes 50 --stragglers 0.2` | {slow_wall:.1f} s | "
             f"{100 * slow['run']['initial_accuracy']:.1f} % -> {100 * slow['rounds'][-1]['accuracy']:.1f} % "
             f"(participants per round: {min(r['participants'] for r in slow['rounds'])}-"
             f"{max(r['participants'] for r in slow['rounds'])}; longest round "
             f"{max(r['seconds'] for r in slow['rounds']):.1f} s) | {len(slow['rounds'])} |",
             f"| `fedtiny simulate --nodes 50 --engine flower` (warm; Ray) | {flower_wall:.1f} s | "
             f"{100 * flower['run']['initial_accuracy']:.1f} % -> {100 * flower['rounds'][-1]['accuracy']:.1f} % "
             f"(every round {'identical to' if same else 'DIFFERENT from'} the MQTT engine's) | "
             f"{len(flower['rounds'])} |", "",
             f"Same task the usual way (`--baseline`; scenario {run['scenario']}, model {run['model']}, scheme "
             f"{run['scheme']}):", "",
             "| | fedtiny (int8, sparse, MQTT) | Flower FedAvg + PyTorch fp32 | ratio |", "|---|---:|---:|---:|",
             f"| final held-out accuracy | {100 * last['accuracy']:.1f} % | {100 * b_last['accuracy']:.1f} % | "
             f"{100 * (last['accuracy'] - b_last['accuracy']):+.1f} pt |",
             f"| rounds to {100 * run['target_accuracy']:.0f} % | {run['rounds_to_target']} | "
             f"{base['rounds_to_target']} | |",
             f"| uplink bytes per node per round | {up:,.0f} | {base['bytes_per_node_per_round']:,.0f} | "
             f"{base['bytes_per_node_per_round'] / up:.1f}x fewer |",
             f"| downlink bytes per node per round | {down:,.0f} | {base['bytes_per_node_per_round']:,.0f} | "
             f"{base['bytes_per_node_per_round'] / down:.1f}x fewer |",
             f"| device memory for training | {memory['arena_bytes']:,} B (whole step) | >= "
             f"{base['training_memory_bytes']:,} B (fp32 weights + gradients) | "
             f"{base['training_memory_bytes'] / memory['arena_bytes']:.0f}x less |",
             f"| wall time | {run['wall_seconds']:.1f} s | {base['wall_seconds']:.1f} s | |", "",
             "fedtiny bytes are MQTT payloads of whole transfers (chunk headers, envelope, EdDSA signature, AEAD "
             "tag included); the baseline's are the fp32 arrays alone (no gRPC or protobuf overhead counted)."]
    text = "\n".join(lines)
    print(text)
    write_section(SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
