"""The firmware project of one fleet member (`fedtiny codegen PLAN --node --fleet-dir DIR --device NAME`).

A node's firmware is the plan's generated model, the node library (session, wire, chunking, envelope on
Monocypher, two-bank store, modem link, training job) and three generated files:

    node_plan.c     what the node must know of the plan (codegen.node_plan_source): tensors, scales, limits, hash
    node_config.h   buffer sizes for this plan and chunk size, the node's timing; node_config.c: names, ids, the
                    device's identity.key and the coordinator's public key (a secret: the folder is 0700)
    samples.c       the samples the node trains on (the simulation's share of the data; a real device reads
                    its sensors into the same arrays)

`files(...)` returns every file by name; `write(...)` writes the folder (make m4-node builds
fedtiny_node.elf with the Cortex-M4 toolchain); `build(...)` builds it in the shared cache.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol.update import downlink_reassembly_bytes, max_delta_envelope_bytes, zero_delta

from . import codegen
from .cnode import NODE_FILES
from .monocypher_sources import monocypher_sources

NODE_ELF = "fedtiny_node.elf"
# The session library (cnode.NODE_FILES) and what a whole node adds around it.
FIRMWARE_FILES = ("fedtiny_profile.c", "fedtiny_store.c", "fedtiny_store.h", "fedtiny_crc32.c", "fedtiny_crc32.h",
                  "fedtiny_flash_semihost.c", "fedtiny_flash_semihost.h", "fedtiny_modem.c", "fedtiny_modem.h",
                  "fedtiny_uart_cmsdk.c", "fedtiny_uart_cmsdk.h", "firmware_node.c", "fedtiny_node.ld")
# FEDTINY_NODE_SECAGG_RECORD_BYTES on the Cortex-M4: the round's state the firmware persists (without the stage
# reply buffer); device_memory.NODE_SECAGG_STATE_BYTES is the whole struct
NODE_SECAGG_RECORD_BYTES = 10_296
FLASH_FILE = "node.flash"  # the flash image, relative to QEMU's working folder (fedtiny_device.qemu_node)
ROUND_FLASH_FILE = "node-round.flash"  # with secure aggregation: the round held, in a store of its own


def _c_bytes(name: str, data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    return f"const uint8_t {name}[{len(data)}] = {{\n    " + ",\n    ".join(rows) + "\n};\n"


def _c_string(text: str) -> str:
    if not all(c.isalnum() or c in "_.-" for c in text):
        raise ValueError(f"{text!r} is not a fleet or device name")
    return f'"{text}"'


def buffer_sizes(plan: Plan, chunk_size: int, secagg: bool = False) -> dict[str, int]:
    """The node's buffers for this plan: what fedtiny_node_sizes_of asks for (fedtiny_node_init checks them), or
    with secagg fedtiny_node_sizes_secagg_of (the upload also holds the largest masked DELTA, the reassembly the
    largest stage message behind a TASK: device_memory.secagg_buffer_bytes). Where they live, and for how long, is
    firmware_node.c's business (the upload borrows the training arena)."""
    from fedtiny.device_memory import secagg_buffer_bytes

    state = codegen.state_layout(plan)[1]
    # the carry: each buffer's delta (update.zero_delta: int16 weight rows, int32 biases), 4-byte aligned
    delta = sum(-(-d.nbytes // 4) * 4 for d in zero_delta(plan).values())
    reassembly = downlink_reassembly_bytes(plan)  # a TASK behind the largest GLOBAL_UPDATE
    upload = max_delta_envelope_bytes(plan)
    if secagg:
        upload, reassembly = (max(a, b) for a, b in zip((upload, reassembly), secagg_buffer_bytes(plan)))
    # the personalised model: a second state, where the plan's budget holds it (memory_report)
    personal = state if plan.memory_report()["personal_model_bytes"] else 0
    return dict(state=state, delta=delta, upload=upload, reassembly=reassembly,
                bitmap=reassembly // 8 + 2, chunk=chunk_size, personal=personal)


# The firmware's RAM by part (ram_by_part): each part's static variables, by symbol (firmware_node.c and model.c).
RAM_PARTS = {
    "arena": ("arena",),                  # model.c's training arena; the sealed upload while it waits for its ACK
    "scratch": ("scratch",),              # the C kernels' scratch; the trained state until the DELTA is sealed
    "global state": ("global_state",),
    "carry": ("carry",),
    "personalised model": ("personal",),
    "job base": ("base",),
    "reassembly": ("reassembly", "bitmap"),
    "own upload and trained state": ("upload_own", "trained_own"),  # only for a plan whose arena or scratch is small
    "frames": ("frame", "rx_buf", "tx_buf"),
    "session (keys, replay window)": ("node",),
    "training order": ("order",),
    "noise values": ("values",),          # device noise and masking: the sent delta as int32 (node_project noise)
    "secure aggregation": ("secagg",),    # one round's secrets, neighbours' keys and held shares, its stage buffer
}


def ram_by_part(map_path: Path) -> dict[str, int]:
    """Bytes of RAM by part (RAM_PARTS, then stack, heap and the rest: libc, the link, the store, ...), from the
    linker's map of a node firmware (fedtiny_node.map beside the ELF; -fdata-sections names every static's
    section after it). The parts add up to cruntime.memory_usage's ram."""
    text = map_path.read_text()
    memory_map = text[text.index("Linker script and memory map"):]
    parts = dict.fromkeys(RAM_PARTS, 0)
    owner = {symbol: part for part, symbols in RAM_PARTS.items() for symbol in symbols}
    # an input section: " .bss.name  0xADDR  0xSIZE object" (a long name stands alone on the line before)
    for name, size in re.findall(r"^ \.(?:bss|data)\.([\w.]+)\s+0x[0-9a-f]+\s+0x([0-9a-f]+) \S+$", memory_map, re.M):
        if name in owner:
            parts[owner[name]] += int(size, 16)
    sections = {m[0]: int(m[1], 16) for m in re.findall(r"^\.(\w+)\s+0x[0-9a-f]+\s+0x([0-9a-f]+)", memory_map, re.M)}
    parts["stack"], parts["heap"] = sections.get("stack", 0), sections.get("heap", 0)
    # the rest: libc's and the other parts' statics, and the alignment between them
    parts["other"] = sections.get("data", 0) + sections.get("bss", 0) - sum(
        v for k, v in parts.items() if k not in ("stack", "heap"))
    return parts


def _sectors(payload: int) -> int:
    return -(-(payload + 64) // 4096) * 4096  # the record header area, in whole 4 KiB sectors


def bank_bytes(sizes: dict[str, int]) -> int:
    """One flash bank of the node's record: the header area and the six segments (plan hash, state numbers, model,
    carry, upload, personalised model)."""
    return _sectors(256 + sizes["state"] + sizes["delta"] + sizes["upload"] + sizes["personal"])


# One bank of the store that holds a secure-aggregation node's round (firmware_node.c's round_store, two banks):
# written when the round changes, not with every record.
ROUND_BANK_BYTES = _sectors(NODE_SECAGG_RECORD_BYTES)


def device_folder(fleet_dir: str | Path, device: str) -> Path:
    """The device's folder of a `fedtiny keys` fleet (fleet_dir/devices/<device>), or fleet_dir itself when it
    is that folder (what a plant hands over for one device)."""
    fleet_dir = Path(fleet_dir)
    for folder in (fleet_dir / "devices" / device, fleet_dir):
        if (folder / "identity.key").exists() and (folder / "coordinator.pub").exists():
            return folder
    raise ValueError(f"{fleet_dir} holds no identity of device {device!r}: give the `fedtiny keys` folder or the "
                     f"device's own folder (devices/{device})")


def _peers_source(folder: Path, secagg: bool) -> str:
    """The fleet's other devices' ids and public identities (the device folder's peers.json, from `fedtiny keys`),
    in flash, for a node that does secure aggregation; none for one that does not."""
    from fedtiny.protocol.keys import PEERS_FILE

    if not secagg:
        return ""
    path = folder / PEERS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: secure aggregation needs the peers' identities that `fedtiny keys` "
                         "writes into each device folder (provision the fleet with this version)")
    peers = sorted((int(v["id"]), bytes.fromhex(v["public"])) for v in json.loads(path.read_text())["peers"].values())
    if not peers:
        raise ValueError(f"{path} lists no peers: secure aggregation needs a fleet of at least 3 devices")
    ids = ", ".join(f"{i}u" for i, _ in peers)
    rows = ",\n    ".join("{" + ", ".join(f"0x{b:02x}" for b in public) + "}" for _, public in peers)
    return (f"\n/* secure aggregation: the fleet's other devices (peers.json), whose signed round keys the node checks */\n"
            f"static const uint32_t peer_ids[{len(peers)}] = {{{ids}}};\n"
            f"static const uint8_t peer_publics[{len(peers)}][64] = {{\n    {rows}\n}};\n"
            f"const fedtiny_node_peers fedtiny_node_peers_config = {{peer_ids, peer_publics, {len(peers)}u}};\n")


def config_files(plan: Plan, folder: Path, device: str, n_samples: int, *, chunk_size: int = 1024,
                 heartbeat_s: float = 30.0, ack_timeout_s: float = 15.0, noise: bool = False,
                 secagg: bool = False) -> dict[str, str]:
    """node_config.h/.c and node_plan.c for the device whose `fedtiny keys` folder is `folder`. `noise`: the node
    takes TASKs with device noise (its values buffer); `secagg`: also secure-aggregation rounds (the round's state
    and the peers' identities)."""
    from fedtiny.device_memory import privacy_ram_bytes
    from fedtiny.transport.mqtt import load_fleet

    manifest = load_fleet(folder)
    if device not in manifest.get("devices", {}):
        raise ValueError(f"{folder / 'fleet.json'} does not list device {device!r}")
    sizes = buffer_sizes(plan, chunk_size, secagg)
    privacy = privacy_ram_bytes(plan, noise, secagg)
    header = ("/* Generated by fedtiny_device.node_project: this node's buffers and timing. */\n"
              "#ifndef NODE_CONFIG_H\n#define NODE_CONFIG_H\n\n#include <stdint.h>\n\n#include \"fedtiny_node.h\"\n\n"
              f"#define FEDTINY_NODE_CFG_STATE_BYTES {sizes['state']}u\n"
              f"#define FEDTINY_NODE_CFG_DELTA_BYTES {sizes['delta']}u\n"
              f"#define FEDTINY_NODE_CFG_PERSONAL_BYTES {sizes['personal']}u /* 0: no personalised model kept */\n"
              f"#define FEDTINY_NODE_CFG_UPLOAD_BYTES {sizes['upload']}u\n"
              f"#define FEDTINY_NODE_CFG_REASSEMBLY_BYTES {sizes['reassembly']}u\n"
              f"#define FEDTINY_NODE_CFG_BITMAP_BYTES {sizes['bitmap']}u\n"
              f"#define FEDTINY_NODE_CFG_CHUNK_BYTES {chunk_size}u /* uplink payloads; JOIN asks for no larger */\n"
              f"#define FEDTINY_NODE_CFG_DOWN_CHUNK_BYTES {chunk_size}u\n"
              f"#define FEDTINY_NODE_CFG_MAX_SAMPLES {max(1, n_samples)}u /* the training order's buffer */\n"
              f"#define FEDTINY_NODE_CFG_HEARTBEAT_MS {int(heartbeat_s * 1000)}u\n"
              f"#define FEDTINY_NODE_CFG_ACK_TIMEOUT_MS {int(ack_timeout_s * 1000)}\n"
              f"#define FEDTINY_NODE_CFG_BANK_BYTES {bank_bytes(sizes)}u\n"
              f"#define FEDTINY_NODE_CFG_FLASH_FILE \"{FLASH_FILE}\"\n"
              f"#define FEDTINY_NODE_CFG_ROUND_BANK_BYTES {ROUND_BANK_BYTES}u\n"
              f"#define FEDTINY_NODE_CFG_ROUND_FLASH_FILE \"{ROUND_FLASH_FILE}\"\n"
              f"#define FEDTINY_NODE_CFG_VALUES_ELEMENTS {privacy['noise_values_bytes'] // 4}u /* 0: refuses noise */\n"
              f"#define FEDTINY_NODE_CFG_SECAGG {int(secagg)} /* 0: answers a masked TASK with ACK REJECTED */\n\n"
              "extern const fedtiny_node_plan fedtiny_node_plan_config;\n"
              "extern const fedtiny_node_peers fedtiny_node_peers_config; /* with FEDTINY_NODE_CFG_SECAGG */\n"
              "extern const char fedtiny_node_fleet[], fedtiny_node_device[];\n"
              "extern const uint32_t fedtiny_node_fleet_id, fedtiny_node_device_id;\n"
              "extern const uint8_t fedtiny_node_identity[64], fedtiny_node_coordinator_public[64];\n\n#endif\n")
    source = ("/* Generated by fedtiny_device.node_project: who this node is. It holds the device's secret key. */\n"
              "#include <stdint.h>\n\n#include \"node_config.h\"\n\n"
              f"const char fedtiny_node_fleet[] = {_c_string(manifest['fleet'])};\n"
              f"const char fedtiny_node_device[] = {_c_string(device)};\n"
              f"const uint32_t fedtiny_node_fleet_id = {manifest['fleet_id']}u;\n"
              f"const uint32_t fedtiny_node_device_id = {manifest['devices'][device]['id']}u;\n"
              + _c_bytes("fedtiny_node_identity", (folder / "identity.key").read_bytes())
              + _c_bytes("fedtiny_node_coordinator_public", (folder / "coordinator.pub").read_bytes())
              + _peers_source(folder, secagg))
    return {"node_config.h": header, "node_config.c": source,
            "node_plan.c": codegen.node_plan_source(plan, "fedtiny_node_plan_config")}


def files(plan: Plan, folder: Path, device: str, samples: np.ndarray | None = None,
          labels: np.ndarray | None = None, seed: int = 0, *, chunk_size: int = 1024, heartbeat_s: float = 30.0,
          ack_timeout_s: float = 15.0, noise: bool = False, secagg: bool = False,
          evaluation: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, str | bytes]:
    """Every file of the node's firmware folder, by name; `folder` is the device's (device_folder). `noise` and
    `secagg` as config_files; `evaluation`: the device's evaluation part (codegen.render_train_samples)."""
    header, source = codegen.render_plan(plan)
    out: dict[str, str | bytes] = {"model.h": header, "model.c": source,
                                   "samples.c": codegen.render_train_samples(plan, samples, labels, seed,
                                                                             evaluation=evaluation)}
    out |= config_files(plan, folder, device, 1 if samples is None else len(samples), chunk_size=chunk_size,
                        heartbeat_s=heartbeat_s, ack_timeout_s=ack_timeout_s, noise=noise, secagg=secagg)
    out["README.md"] = _readme(folder, device, chunk_size)
    rt = codegen.runtime_dir()
    for name in codegen.RUNTIME_FILES + NODE_FILES + FIRMWARE_FILES:
        out[name] = (rt / name).read_bytes()
    return out | monocypher_sources()


def _readme(folder: Path, device: str, chunk_size: int) -> str:
    """How to build and run this node, with its modem (bridge) settings."""
    from fedtiny.transport.mqtt import load_fleet

    host = load_fleet(folder).get("broker_host", "localhost")
    return f"""# fedtiny node `{device}`

The firmware of fleet member `{device}` (generated by `fedtiny codegen PLAN --node`). `node_config.c` holds
the device's secret key: keep this folder private (0700) and never commit it.

    make m4-node      # fedtiny_node.elf for the Cortex-M4 (the linker fails if RAM > 256 KB or flash > 1 MB)
    make host-node    # libfedtiny_node.so: the protocol session alone, on the host

Under QEMU (mps2-an386), with the host bridge playing the node's modem (its broker login is the device's
folder of `fedtiny keys`; the payload limit must take the node's {chunk_size}-byte chunks):

    python -m fedtiny_device.bridge --broker mqtts://{host}:8883 --fleet-dir FLEET_DIR --device {device} --port 5555
    qemu-system-arm -M mps2-an386 -display none -monitor none -semihosting-config enable=on,target=native \\
        -kernel fedtiny_node.elf -chardev socket,id=modem,host=127.0.0.1,port=5555,reconnect=1 \\
        -serial null -serial chardev:modem

The node keeps its state in `node.flash` (two banks) in QEMU's working folder, and with secure aggregation the round it
holds in `node-round.flash` (two banks); see docs/node.md.
"""


def write(out_dir: str | Path, project: dict[str, str | bytes]) -> Path:
    """The folder (0700: node_config.c holds the device's secret key)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for name, data in project.items():
        (out / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return out


# The sources that hold the device's secret key (node_config.c) or its data (samples.c): their objects are built
# in the run's folder only, never kept in the shared object cache.
PRIVATE_SOURCES = frozenset({"node_config.c", "samples.c"})


def build(project: dict[str, str | bytes], cache_dir: Path | None = None) -> Path:
    """fedtiny_node.elf for the Cortex-M4, built in cache_dir (the sources hold the device's secret key: give a
    folder of the run, not the shared cache). The objects of the other sources come from the shared object cache
    (object_cache: by content, flags and compiler), so a fleet's second device, or the next run, compiles only
    what differs and links."""
    from .object_cache import make_cached

    # "%.fw.o" is the Makefile's rule for m4-node's objects, arm-none-eabi-gcc its ARM_CC
    return make_cached(project, "m4-node", NODE_ELF, cache_dir, suffix=".fw.o", compiler="arm-none-eabi-gcc",
                       private=PRIVATE_SOURCES)

