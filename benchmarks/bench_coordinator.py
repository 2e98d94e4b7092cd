"""Coordinator throughput and memory: device updates aggregated per second on one core, and bytes per device.

    python benchmarks/bench_coordinator.py [--devices 200] [--repeats 3]

The default sensor_cnn plan (bearing windows 1 x 256, 4 classes, its default scheme). Every device's DELTA
is sealed beforehand exactly as a NodeAgent seals it (fleet.encode_update -> DeviceEndpoint.seal: signed,
ChaCha20-Poly1305 encrypted) and cut into 4 KiB MQTT chunks. Timed, on one thread, per update:

    reassemble  chunking.Reassembler.accept of its frames
    open        CoordinatorEndpoint.open: EdDSA verify, replay check, decrypt, decode the body and delta blob
    decode      fleet.decode_update: entries -> int16/int32 delta over the plan's buffers, metrics
    rebuild     float master + dequantized delta, and the Flower reply Message (ArrayRecord, MetricRecord)
    aggregate   flwr FedAvg.aggregate_train over all replies (reported per update)

X25519 key agreement happens once per device (the coordinator caches keys) and is done before timing.
Memory per registered device: tracemalloc of a CoordinatorLink (not connected) and a FleetGrid registry after
every device sent JOIN and STATUS and one DELTA (so its keys are derived and cached), divided by the devices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedtiny import zoo  # noqa: E402
from fedtiny.compiler import compile_plan  # noqa: E402
from fedtiny.protocol import chunking, topics  # noqa: E402
from fedtiny.protocol.envelope import (  # noqa: E402
    CoordinatorEndpoint, DeviceEndpoint, Identity, PublicIdentity, ReplayGuard,
)
from fedtiny.transport.mqtt import CoordinatorLink, load_fleet
from fedtiny.protocol.update import decode_update, encode_update, zero_delta  # noqa: E402
from fedtiny.protocol.keys import provision_fleet  # noqa: E402
from fedtiny.protocol.messages import Join, Status  # noqa: E402
from fedtiny.quantize import quantize  # noqa: E402
from fedtiny.scheme import REFERENCE_SPARSE, parse  # noqa: E402
from fedtiny_server.grid import FleetGrid, GlobalModel, RoundPolicy, ensure_task_identity  # noqa: E402
from fedtiny_server.requantize import dequantize_state, rebuild, tensor_specs  # noqa: E402
from fedtiny_server.state import StateStore, StoredReply  # noqa: E402
from fedtiny_server.testing import FakeLink  # noqa: E402
from fedtiny_sim import data  # noqa: E402

from report import capture, provenance, write_section  # noqa: E402

FLEET = "bench"
SCHEME = REFERENCE_SPARSE["sensor_cnn"]
SECTION = "## Coordinator: device updates aggregated per second, memory per device (issue 6)"
CHUNK = 4096


def default_plan():
    torch.manual_seed(0)
    calibration = data.bearing_dataset(range(8), 16, seed=0).X.astype(np.float32)
    graph = quantize(zoo.build("sensor_cnn", calibration.shape[1:], 4).eval(), calibration)
    return compile_plan(graph, parse(SCHEME, graph))


def device_delta(plan, rng):
    """A trained-looking delta: every trainable channel moved by a few LSB."""
    delta = zero_delta(plan)
    for name, value in delta.items():
        value[...] = rng.integers(-3, 4, size=value.shape).astype(value.dtype)
    return delta


def sealed_updates(plan, keys: Path, names, rng):
    manifest = load_fleet(keys)
    coordinator_pub = PublicIdentity.from_bytes((keys / "coordinator/identity.pub").read_bytes())
    out = []
    for name in names:
        folder = keys / "devices" / name
        ep = DeviceEndpoint(manifest["fleet_id"], manifest["devices"][name]["id"],
                            Identity.from_bytes((folder / "identity.key").read_bytes()), coordinator_pub)
        body = encode_update(plan, device_delta(plan, rng), 64, 0.5, 0.75)
        env = ep.seal(body, round=1, model_version=0, seq=10)
        out.append((name, chunking.split(env, 10, CHUNK), ep))
    return out


def coordinator_endpoint(keys: Path) -> CoordinatorEndpoint:
    manifest = load_fleet(keys)
    peers = {v["id"]: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for v in manifest["devices"].values()}
    return CoordinatorEndpoint(manifest["fleet_id"], Identity.from_bytes((keys / "coordinator/identity.key")
                                                                         .read_bytes()), peers)


def throughput(plan, keys, updates, repeats):
    specs = tensor_specs(plan)
    master = dequantize_state(specs, plan.initial_state())
    endpoint = coordinator_endpoint(keys)
    ensure_task_identity()
    grid = FleetGrid(FakeLink(), GlobalModel(specs, master, plan.initial_state(), 0), None, RoundPolicy())
    for _, frames, _ in updates:  # derive and cache every device's keys (once per device in a real run)
        r = chunking.Reassembler(max_transfers=8, max_bytes=1 << 24)
        for f in frames:
            res = r.accept(f, 0.0, "x")
        endpoint.open(res.payload)
    runs = []
    for _ in range(repeats):
        endpoint.replay = ReplayGuard()
        stages = dict(reassemble=0.0, open=0.0, decode=0.0, rebuild=0.0, aggregate=0.0)
        replies = []
        reassembler = chunking.Reassembler(max_transfers=len(updates) + 8, max_bytes=1 << 28)
        for name, frames, _ in updates:
            t0 = time.perf_counter()
            for f in frames:
                res = reassembler.accept(f, 0.0, name)
            t1 = time.perf_counter()
            received = endpoint.open(res.payload)
            t2 = time.perf_counter()
            delta, metrics = decode_update(plan, received.body)
            t3 = time.perf_counter()
            full = rebuild(specs, master, delta)
            stored = StoredReply(1, name, 0, received.body.num_examples, metrics, delta, 0)
            ins = Message(RecordDict(), topics.name_id(name), MessageType.TRAIN)
            ins.metadata.__dict__["_message_id"] = name
            replies.append(Message(grid._content(full, stored, 0), reply_to=ins))
            t4 = time.perf_counter()
            for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[key] += dt
        t5 = time.perf_counter()
        arrays, _ = FedAvg(fraction_evaluate=0.0).aggregate_train(1, replies)
        stages["aggregate"] = time.perf_counter() - t5
        assert arrays is not None
        runs.append(stages)
    return runs


def memory_per_device(plan, keys, updates):
    manifest = load_fleet(keys)
    fleet_id = manifest["fleet_id"]
    tracemalloc.start()
    link = CoordinatorLink("mqtt://127.0.0.1:1", keys, plan, fleet=FLEET, chunk_size=CHUNK)
    base = tracemalloc.get_traced_memory()[0]
    with tempfile.TemporaryDirectory() as tmp:
        specs = tensor_specs(plan)
        store = StateStore(Path(tmp) / "s.db")
        grid = FleetGrid(link, GlobalModel(specs, dequantize_state(specs, plan.initial_state()), plan.initial_state(),
                                           0, store), store, RoundPolicy())
        after_construct = tracemalloc.get_traced_memory()[0]
        seq = 1000
        for name, frames, ep in updates:
            join = Join(plan.arena_size, 1 << 20, CHUNK, 1, 1, link.session._plan_hash)
            for body, topic in ((join, topics.uplink(FLEET, name)),
                                (Status(1, 255, 1, 1000, 0), topics.status(FLEET, name))):
                env = ep.seal(body, round=0, model_version=0, seq=seq)
                seq += 1
                for f in chunking.split(env, seq, CHUNK):
                    link._on_message(topic, f)
            for f in frames:
                link._on_message(topics.uplink(FLEET, name), f)
        link.replies(0.0)  # the coordinator takes the DELTAs (as the grid would)
        grid.refresh()
        registered = tracemalloc.get_traced_memory()[0]
        store.close()
    tracemalloc.stop()
    assert len(grid.registry) == len(updates) and fleet_id
    return (registered - after_construct) / len(updates), base / len(updates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    plan = default_plan()
    names = [f"dev-{i:04d}" for i in range(args.devices)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        t0 = time.perf_counter()
        provision_fleet(keys, FLEET, names)
        provision_s = time.perf_counter() - t0
        updates = sealed_updates(plan, keys, names, rng)
        env_bytes = statistics.mean(sum(len(f) for f in frames) for _, frames, _ in updates)
        runs = throughput(plan, keys, updates, args.repeats)
        per_device, link_fixed = memory_per_device(plan, keys, updates)

    n = args.devices
    trainable = sum(int(np.prod(plan.buffers[b].shape)) for b in plan.trainable_buffers())
    best = min(runs, key=lambda s: sum(s.values()))
    total = sum(best.values())
    print(f"{SECTION}\n\n{provenance(f'python benchmarks/bench_coordinator.py --devices {n} --repeats {args.repeats}')}"
          " One thread.\n")
    print(f"plan: sensor_cnn, scheme {SCHEME}, {len(plan.trainable_buffers())} trainable buffers, "
          f"{trainable} trainable values; sealed DELTA {env_bytes:.0f} B on the wire ({CHUNK} B chunks)")
    print(f"devices: {n} (provisioning took {provision_s:.1f} s); best of {args.repeats} runs")
    print()
    print("| stage | us per update | share |")
    print("|---|---:|---:|")
    for key, value in best.items():
        print(f"| {key} | {1e6 * value / n:.1f} | {100 * value / total:.0f} % |")
    print(f"| **total** | **{1e6 * total / n:.1f}** | 100 % |")
    print()
    print(f"Throughput: **{n / total:.0f} device updates aggregated per second per core** (decrypt, verify, decode, "
          f"rebuild, FedAvg; target >= 1000; runs: {', '.join(f'{n / sum(r.values()):.0f}' for r in runs)}).\n")
    print(f"Memory: {per_device / 1024:.1f} KiB per registered device (link registry, keys, reassembly, ACK cache, "
          f"grid registry); CoordinatorLink construction (fleet manifest, peers, paho client) "
          f"{link_fixed * n / 1024:.0f} KiB")


if __name__ == "__main__":
    with capture() as out:
        main()
    write_section(SECTION, out.getvalue())
