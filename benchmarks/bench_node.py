"""The whole node on the Cortex-M4: RAM and flash by part from the linker, and instructions per round by part.

    python benchmarks/bench_node.py [--schemes sparse:3:-2@1/8,full] [--rounds 3] [--nodes 4] [--secagg]

For each scheme ("default": `auto`, the default), one `fedtiny simulate` run (industrial scenario, sensor_cnn)
where node000 is the node firmware under QEMU (mps2-an386) beside Python node agents. From that firmware:

    RAM     by part as the linker placed it (node_project.ram_by_part: arena, scratch, each node buffer, stack,
            heap, the rest)
    flash   .text/.rodata/.data by object file of fedtiny_node.map: training (model, kernels, runtime, job,
            samples), crypto (Monocypher, envelope), protocol (session, wire, chunking, plan, identity), state
            (store, flash HAL), link (modem, UART), firmware (main loop, boot, profile), C library
    rounds  executed instructions per round by part (QEMU's plugin at the profile markers), idle polling left
            out, with the time at 64 and 216 MHz (instructions, not cycles: a real M4 needs ~1.1-1.5x more)

It also checks the run against the same run with Python agents only (the global model must be identical).
Prints its Markdown section and writes it into BENCHMARKS.md (unless --no-write). With --secagg: the firmware run
plain and with `--secagg --dp-epsilon 8` (secure aggregation with the devices' noise; the firmware built with both)
side by side, in SECAGG_SECTION (secure aggregation's steps count as crypto, the noise as protocol).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from report import provenance, write_section

SECTION = "## The whole node on the Cortex-M4: RAM, flash and instructions per round by part (issue 12)"
SECAGG_SECTION = ("## The whole node on the Cortex-M4 in secure-aggregation rounds with device noise: RAM, flash and "
                  "instructions per round (issue 13)")
EPSILON = 8.0  # --secagg: distributed DP's budget (the devices add the noise)

PARTS = {
    "training": ("model", "fedtiny_kernels", "fedtiny_kernels_fwd_fast",
                 "fedtiny_kernels_bwd_fast", "fedtiny_runtime", "fedtiny_train_job",
                 "samples"),
    "crypto": ("monocypher", "fedtiny_envelope", "fedtiny_secagg", "fedtiny_node_secagg"),
    "protocol": ("fedtiny_node", "fedtiny_chunk", "fedtiny_wire", "node_plan", "node_config", "fedtiny_noise"),
    "state": ("fedtiny_store", "fedtiny_flash_semihost"),
    "link": ("fedtiny_modem", "fedtiny_uart_cmsdk"),
    "firmware": ("firmware_node", "fedtiny_boot", "fedtiny_profile"),
}
MAP_LINE = re.compile(r"^ (\.\S+)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+)$")


def part_of(obj: str) -> str:
    name = Path(obj.split("(")[0]).name
    stem = name[: -len(".fw.o")] if name.endswith(".fw.o") else None
    for part, stems in PARTS.items():
        if stem in stems:
            return part
    return "C library"


def flash_by_part(map_file: Path) -> dict[str, int]:
    """Flash bytes by part, from the linker map's input sections (.text, .rodata, .data's load image)."""
    out = defaultdict(int)
    text = map_file.read_text().split("Linker script and memory map", 1)[1]
    section = None
    for line in text.splitlines():
        if re.match(r"^ \.\S+$", line):  # a long section name, its address on the next line
            section = line.strip()
            continue
        m = MAP_LINE.match(line)
        if not m:
            section = None
            continue
        name, size, obj = m.group(1) or section, int(m.group(3), 16), m.group(4)
        section = None
        if not name or size == 0 or not obj.endswith((".o", ")")):
            continue
        if name.split(".")[1] in ("text", "rodata", "ARM", "data"):
            out[part_of(obj)] += size
    return dict(out)


def run_simulation(out: Path, scheme: str, nodes: int, rounds: int, qemu: int, secagg: bool = False) -> dict:
    from fedtiny_sim.simulate import SimulationConfig, simulate

    privacy = dict(secagg=True, dp_epsilon=EPSILON) if secagg else {}
    return simulate(SimulationConfig(nodes=nodes, rounds=rounds, scheme=scheme, qemu_nodes=qemu, out=str(out),
                                     workers=2, **privacy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default="sparse:3:-2@1/8,full")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--secagg", action="store_true",
                        help=f"secure aggregation with device noise (--secagg --dp-epsilon {EPSILON:g})")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    from fedtiny.planfile import load_plan
    from fedtiny_device import node_project
    from fedtiny_device.node_project import ram_by_part
    from fedtiny_server.state import StateStore

    if args.secagg:
        text = secagg_section(args)
        print(text)
        if not args.no_write:
            write_section(SECAGG_SECTION, text)
        return 0
    lines = [SECTION, "", provenance(f"python benchmarks/bench_node.py --schemes {args.schemes} --rounds "
                                     f"{args.rounds} --nodes {args.nodes}"), "",
             f"Each scheme: `fedtiny simulate --nodes {args.nodes} --qemu-nodes 1 --rounds {args.rounds}` (industrial, "
             "sensor_cnn), node000 being fedtiny_node.elf under QEMU mps2-an386 and the others Python agents, and the "
             "same run with Python agents only.", "",
             "The node keeps its personalised model for inference between rounds (`personalised model`, one copy of "
             "the trainable state); the classes it predicts after each round for its console are counted as idle, "
             "outside the instructions per round.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            chosen = "auto" if scheme == "default" else scheme
            fw = run_simulation(Path(tmp) / f"{scheme}-fw", chosen, args.nodes, args.rounds, 1)
            run_simulation(Path(tmp) / f"{scheme}-py", chosen, args.nodes, args.rounds, 0)
            a = StateStore(Path(tmp) / f"{scheme}-fw" / "state.db").load()
            b = StateStore(Path(tmp) / f"{scheme}-py" / "state.db").load()
            same = all(np.array_equal(a.ints[k], b.ints[k]) for k in b.ints)
            node = fw["firmware"]["node000"]
            elf = next((Path(tmp) / f"{scheme}-fw" / "firmware").glob("*-m4-node/fedtiny_node.elf"))
            flash = flash_by_part(elf.parent / "fedtiny_node.map")
            ram = ram_by_part(elf.parent / "fedtiny_node.map")
            lines += [f"### Scheme `{fw['scheme']}`", "",
                      f"Firmware node's DELTAs accepted: {[r['firmware'] for r in fw['rounds']]} per round; global "
                      f"model {'identical to' if same else 'DIFFERENT from'} the run with Python agents only.", "",
                      "| RAM | bytes |", "|---|---:|"]
            lines += [f"| {part} | {size:,} |" for part, size in ram.items()]
            lines += [f"| total by the linker | {node['ram_bytes']:,} |"]
            lines += ["", "| flash | bytes |", "|---|---:|"]
            lines += [f"| {part} | {size:,} |" for part, size in sorted(flash.items(), key=lambda kv: -kv[1])]
            lines += [f"| total by the linker | {node['flash_bytes']:,} |", ""]
            rounds = node["instructions"][1:] or node["instructions"]
            lines += ["| instructions per round (mean of rounds 2..) | training | crypto | protocol | total | "
                      "at 64 MHz | at 216 MHz |", "|---|---:|---:|---:|---:|---:|---:|"]
            mean = {p: sum(r[p] for r in rounds) / len(rounds) for p in ("training", "crypto", "protocol")}
            total = sum(mean.values())
            lines += [f"| node000 | {mean['training']:,.0f} | {mean['crypto']:,.0f} | {mean['protocol']:,.0f} | "
                      f"{total:,.0f} | {total / 64e6:.2f} s | {total / 216e6:.2f} s |", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
    return 0


def per_round(node: dict) -> dict[str, float]:
    """Mean instructions per round by part, rounds 2.. (the first includes the boot)."""
    rounds = node["instructions"][1:] or node["instructions"]
    return {p: sum(r[p] for r in rounds) / len(rounds) for p in ("training", "crypto", "protocol")}


def secagg_section(args) -> str:
    """--secagg: per scheme, the firmware node in the same simulation with and without secure aggregation and
    device noise (the noise depends on each run's fresh keys, so no run with Python agents only can give the same
    global model: the exact sum is tests/test_firmware_secagg.py's), side by side."""
    from fedtiny.planfile import load_plan
    from fedtiny_device import node_project
    from fedtiny_device.node_project import ram_by_part

    lines = [SECAGG_SECTION, "", provenance(f"python benchmarks/bench_node.py --schemes {args.schemes} --rounds "
                                            f"{args.rounds} --nodes {args.nodes} --secagg"), "",
             f"Each scheme: `fedtiny simulate --nodes {args.nodes} --qemu-nodes 1 --rounds {args.rounds}` (industrial, "
             f"sensor_cnn), node000 being fedtiny_node.elf under QEMU mps2-an386 and the others Python agents, plain "
             f"and with `--secagg --dp-epsilon {EPSILON:g}` (the firmware built with `--secagg`), in the same "
             "conditions.", "",
             f"Every masked round: each node's neighbours are the other {args.nodes - 1} of the cohort (the graph is "
             "complete up to a cohort of 37: secagg.graph_degree), and each node adds its discrete Gaussian noise. "
             "Secure aggregation's steps (round keys, checking the neighbours' signatures, sealing and opening "
             "shares, the masks) count as crypto, the noise's sampling as protocol. `noise values` holds the sent "
             "delta as int32 while it is noised and until it is masked; `secure aggregation` is one round's state "
             "(fedtiny_node_secagg); all but its stage reply is persisted in a flash store of its own when the round "
             "changes (begun, peers answered, relay taken, masked, revealed), not with every record (`persisted "
             "state` below: the two banks of the node's record, and of the round's). That the firmware's masked, "
             "noised DELTAs sum exactly with the other nodes' is tests/test_firmware_secagg.py's (the noise depends "
             "on each run's fresh keys: no run with Python agents only gives the same global model).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in args.schemes.split(","):
            chosen = "auto" if scheme == "default" else scheme
            runs = {name: run_simulation(Path(tmp) / f"{scheme}-{name}", chosen, args.nodes, args.rounds, 1,
                                         name == "secagg") for name in ("plain", "secagg")}
            maps = {name: next((Path(tmp) / f"{scheme}-{name}" / "firmware").glob("*-m4-node/fedtiny_node.map"))
                    for name in runs}
            nodes = {name: run["firmware"]["node000"] for name, run in runs.items()}
            ram = {name: ram_by_part(m) for name, m in maps.items()}
            flash = {name: flash_by_part(m) for name, m in maps.items()}
            lines += [f"### Scheme `{runs['secagg']['scheme']}`", "",
                      f"Firmware node's DELTAs summed per round: plain {[r['firmware'] for r in runs['plain']['rounds']]},"
                      f" masked {[r['firmware'] for r in runs['secagg']['rounds']]}.", "",
                      "| RAM | plain | secagg + noise | added |", "|---|---:|---:|---:|"]
            for part in ram["secagg"]:
                a, b = ram["plain"].get(part, 0), ram["secagg"][part]
                lines.append(f"| {part} | {a:,} | {b:,} | {b - a:+,} |")
            a, b = nodes["plain"]["ram_bytes"], nodes["secagg"]["ram_bytes"]
            lines += [f"| total by the linker | {a:,} | {b:,} | {b - a:+,} |", "",
                      "| flash | plain | secagg + noise | added |", "|---|---:|---:|---:|"]
            for part in sorted(flash["secagg"], key=lambda k: -flash["secagg"][k]):
                a, b = flash["plain"].get(part, 0), flash["secagg"][part]
                lines.append(f"| {part} | {a:,} | {b:,} | {b - a:+,} |")
            a, b = nodes["plain"]["flash_bytes"], nodes["secagg"]["flash_bytes"]
            plan = load_plan(Path(tmp) / f"{scheme}-secagg" / "plan.ftp")
            sizes = {name: node_project.buffer_sizes(plan, 1024, name == "secagg") for name in runs}
            banks = {name: 2 * node_project.bank_bytes(sizes[name]) for name in runs}
            rounds = {"plain": 0, "secagg": 2 * node_project.ROUND_BANK_BYTES}
            lines += [f"| total by the linker | {a:,} | {b:,} | {b - a:+,} |", "",
                      "| persisted state (flash, two banks each) | plain | secagg + noise | added |",
                      "|---|---:|---:|---:|",
                      f"| the node's record | {banks['plain']:,} | {banks['secagg']:,} | "
                      f"{banks['secagg'] - banks['plain']:+,} |",
                      f"| the round held ({node_project.NODE_SECAGG_RECORD_BYTES:,} B a save) | 0 | "
                      f"{rounds['secagg']:,} | {rounds['secagg']:+,} |", "",
                      "| instructions per round (mean of rounds 2..) | training | crypto | protocol | total | "
                      "at 64 MHz | at 216 MHz |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, label in (("plain", "plain"), ("secagg", "secagg + noise")):
                mean = per_round(nodes[name])
                total = sum(mean.values())
                lines.append(f"| {label} | {mean['training']:,.0f} | {mean['crypto']:,.0f} | {mean['protocol']:,.0f} | "
                             f"{total:,.0f} | {total / 64e6:.2f} s | {total / 216e6:.2f} s |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
