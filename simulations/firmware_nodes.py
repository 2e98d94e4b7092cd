"""`fedtiny simulate --qemu-nodes K`: K of the fleet's members run the node firmware under QEMU (mps2-an386).

Each gets what a real device would: its own firmware project (node_project: its identity, the plan, its share of
the samples in flash), its own flash image (the state survives a restart), and its own modem, a bridge to the
broker (fedtiny_device.bridge) that sees only ciphertext. They take part in the same rounds as the node agents.

QEMU runs with the instruction-count plugin in its "parts" mode: the firmware's profile markers
(c/fedtiny_profile.c) attribute every instruction to idle, protocol, crypto or training, and the firmware asks
for a line of counts after each DELTA it sends, so the report gives each firmware node's instructions per
round by part, and its RAM and flash from the linker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import nodefile

PARTS = ("idle", "protocol", "crypto", "training")  # FEDTINY_PART_* order, the plugin's `part=` order
MARKERS = ("fedtiny_part_idle", "fedtiny_part_protocol", "fedtiny_part_crypto", "fedtiny_part_training")
COUNTS = "insns.txt"


@dataclass
class FirmwareNode:
    device: str
    elf: Path
    workdir: Path
    bridge: object
    qemu: object
    memory: dict = field(default_factory=dict)


def _plugin_args(elf: Path, out: Path) -> list[str]:
    from fedtiny_device.cruntime import build_insn_plugin, symbol_address

    plugin = build_insn_plugin()
    parts = ",".join(f"part={symbol_address(elf, m):#x}" for m in MARKERS)
    return ["-plugin", f"{plugin},{parts},dump={symbol_address(elf, 'fedtiny_profile_dump'):#x},out={out}"]


class FirmwareFleet:
    """The firmware members of a simulated fleet: build, start, stop, and what they cost."""

    def __init__(self, run: Path, plan, devices: list[str], broker_url: str, *, chunk_size: int,
                 heartbeat_s: float = 5.0, ack_timeout_s: float = 5.0, bridge_options: dict | None = None,
                 secagg: bool = False) -> None:
        """run: the run folder (fleet/ from `fedtiny keys`, nodes/<device>.npz: nodefile); bridge_options:
        more keyword arguments for each ModemBridge (tests: a transport_wrapper); secagg: the firmware takes part
        in secure aggregation and adds device noise (node_project's secagg)."""
        self.run, self.plan, self.devices, self.broker_url = run, plan, devices, broker_url
        self.secagg = secagg
        self.chunk_size, self.heartbeat_s, self.ack_timeout_s = chunk_size, heartbeat_s, ack_timeout_s
        self.bridge_options = bridge_options or {}
        self.nodes: list[FirmwareNode] = []

    def build(self, device: str) -> Path:
        """The device's firmware, built in the run folder (its sources hold the device's secret key). A node that
        does not fit the Cortex-M4's memory is simulate's ConfigError (one line), not a linker log."""
        from fedtiny_device import node_project
        from fedtiny_device.cruntime import BuildError

        from .simulate import ConfigError

        samples = nodefile.load(self.run / "nodes" / f"{device}.npz")
        folder = node_project.device_folder(self.run / "fleet", device)
        project = node_project.files(self.plan, folder, device, samples.x, samples.y, samples.seed,
                                     chunk_size=self.chunk_size, heartbeat_s=self.heartbeat_s,
                                     ack_timeout_s=self.ack_timeout_s, secagg=self.secagg,
                                     evaluation=samples.evaluation)
        try:
            return node_project.build(project, cache_dir=self.run / "firmware")
        except BuildError as exc:
            if "overflowed" not in str(exc):
                raise
            with_secagg = " with secure aggregation and device noise" if self.secagg else ""
            raise ConfigError(f"--qemu-nodes: the node firmware of plan '{self.plan.scheme}'{with_secagg} does not "
                              f"fit the Cortex-M4's 256 KB of RAM and 1 MB of flash (the linker: "
                              f"{'RAM' if 'RAM' in str(exc) else 'flash'} overflowed); choose a smaller --scheme") \
                from None

    def start(self) -> FirmwareFleet:
        from fedtiny_device.bridge import ModemBridge
        from fedtiny_device.cruntime import memory_usage
        from fedtiny_device.qemu_node import QemuNode

        for device in self.devices:
            elf = self.build(device)
            workdir = (self.run / "qemu" / device).resolve()  # QEMU runs there: its paths must not be relative
            workdir.mkdir(parents=True, exist_ok=True)
            bridge = ModemBridge(self.broker_url, self.run / "fleet", device, **self.bridge_options).start()
            qemu = QemuNode(elf, bridge.port, workdir, extra=_plugin_args(elf, workdir / COUNTS)).start()
            self.nodes.append(FirmwareNode(device, elf, workdir, bridge, qemu, memory_usage(elf)))
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.qemu.stop()
            node.bridge.stop()

    def report(self) -> dict[str, dict]:
        """Per firmware node: RAM and flash by the linker, and per DELTA sent the instructions by part since the
        previous one (the first includes the boot: key derivation, connecting, joining)."""
        out = {}
        for node in self.nodes:
            counts = node.workdir / COUNTS
            lines = counts.read_text().splitlines() if counts.exists() else []
            totals = [list(map(int, line.split()[1:])) for line in lines if line.startswith("parts ")]
            rounds = [dict(zip(PARTS, (b - a for a, b in zip(totals[i - 1] if i else [0] * len(PARTS), t))))
                      for i, t in enumerate(totals)]
            console = node.qemu.console()
            out[node.device] = dict(ram_bytes=node.memory["ram"], flash_bytes=node.memory["flash"],
                                    rounds_sent=len(re.findall(r"^node: round \d+ sent", console, re.M)),
                                    refused=re.findall(r"^node: refused a downlink on \S+: (\S+)", console, re.M),
                                    instructions=rounds)
        return out
