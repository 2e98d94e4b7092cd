"""Protocol benchmark: uplink bytes per round, codec throughput, and node round-trip latency through mosquitto.

    python benchmarks/bench_protocol.py [--rounds-latency 300]

1. Uplink bytes of one round's DELTA (whole MQTT transfer: chunk headers, envelope, signature, AEAD tag) for
   sensor_cnn (input (1, 256), 4 classes, bearing windows) under each update scheme, after one local epoch of
   the reference Trainer on 32 windows, against the fp32 dense full model (4 bytes x every parameter).
   "every change" sends each nonzero change (a bitmap per tensor, narrowest integer type per entry);
   "keep 0.5" is what `fedtiny simulate` devices send by default: the larger half of each tensor's changes, the
   rest kept for the next round (fleet.split_uplink; this is a first round, so nothing is carried in yet);
   "fixed set" sends every trainable value (int16 rows, int32 biases), the form secure aggregation would need.
2. Encode+encrypt (encode_update + seal) and decrypt+decode (open + decode_update) of that DELTA on one core.
3. Round-trip latency of a small DELTA -> ACK between a device transport and a CoordinatorLink through a
   mosquitto on loopback (TLS, client certificates, MQTT 5, TCP_NODELAY on both ends).
Prints Markdown and writes it into BENCHMARKS.md.
"""

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.delta import dense_fp32_bytes
from fedtiny.protocol.envelope import CoordinatorEndpoint, DeviceEndpoint, Identity
from fedtiny.transport.mqtt import CoordinatorLink, MqttTransport
from fedtiny.protocol.topics import Publish
from fedtiny.protocol.update import decode_update, encode_update, split_uplink, state_delta, state_entries
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.messages import Ack, Delta
from fedtiny.quantize import quantize
from fedtiny.scheme import REFERENCE_SPARSE, parse
from fedtiny.interpreter import quantize_input
from fedtiny_device.trainer import Trainer
from fedtiny_sim import data

from report import capture, provenance, write_section

SECTION = "## Protocol: uplink bytes, codec throughput, round-trip latency (issue 5)"

SCHEMES = [REFERENCE_SPARSE["sensor_cnn"], "sparse:3:-2@1/2", "classifier", "bias", "last:2", "full"]
KEEP = 0.5
CHUNK = 4096


def endpoints():
    device_id, fleet_id = topics.name_id("dev"), topics.name_id("bench")
    coord, dev = Identity.from_seed(b"coord"), Identity.from_seed(b"dev")
    return (DeviceEndpoint(fleet_id, device_id, dev, coord.public),
            CoordinatorEndpoint(fleet_id, coord, {device_id: dev.public}))


def transfer_bytes(envelope: bytes) -> int:
    return sum(len(f) for f in chunking.split(envelope, 1, CHUNK))


def uplink_table():
    train = data.bearing_dataset(range(4), 8, seed=0)
    torch.manual_seed(0)
    model = zoo.build("sensor_cnn", (1, 256), 4)
    graph = quantize(model, train.X)
    x = quantize_input(graph, train.X)
    n_params = sum(t.data.size for t in graph.constants)
    baseline = dense_fp32_bytes(n_params)
    rows, cases = [], {}
    for spec in SCHEMES:
        plan = compile_plan(graph, parse(spec, graph))
        trainer = Trainer(plan, 1)
        base = plan.initial_state()
        for i in np.random.default_rng(0).permutation(len(x)):
            trainer.step(x[i], int(train.y[i]))
        delta = state_delta(trainer.trainable_state(), base)
        device, _ = endpoints()
        sent = device.seal(encode_update(plan, delta, len(x), 1.0, 0.5), round=1, model_version=0)
        kept = device.seal(encode_update(plan, split_uplink(delta, None, KEEP)[0], len(x), 1.0, 0.5), round=1,
                           model_version=0)
        fixed = device.seal(Delta(len(x), 1.0, state_entries(plan, delta)), round=1, model_version=0)
        values = sum(v.size for v in delta.values())
        nonzero = sum(int(np.count_nonzero(v)) for v in delta.values())
        rows.append((spec, values, nonzero, transfer_bytes(sent), transfer_bytes(kept), transfer_bytes(fixed),
                     baseline))
        cases[spec] = (plan, delta)
    return rows, cases, n_params


def throughput(plan, delta, seconds=1.5):
    device, coordinator = endpoints()
    body = encode_update(plan, delta, 32, 1.0, 0.5)
    envelopes, n, size = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        env = device.seal(encode_update(plan, delta, 32, 1.0, 0.5), round=1, model_version=0)
        envelopes.append(env)
        n, size = n + 1, size + len(env)
    enc = (n / (time.perf_counter() - start), size / (time.perf_counter() - start) / 1e6)
    start = time.perf_counter()
    for env in envelopes:
        decode_update(plan, coordinator.open(env).body)
    elapsed = time.perf_counter() - start
    dec = (len(envelopes) / elapsed, size / elapsed / 1e6)
    return enc, dec, len(body.encode())


def latency(plan, count):
    if shutil.which("mosquitto") is None:
        return None
    tmp = Path(tempfile.mkdtemp())
    fleet_dir = tmp / "keys"
    provision_fleet(fleet_dir, "bench", ["dev"])
    port = free_port()
    (tmp / "m.conf").write_text(mosquitto_config(fleet_dir, port, run_as_root=os.geteuid() == 0))
    manifest = __import__("json").loads((fleet_dir / "fleet.json").read_text())
    device = DeviceEndpoint(manifest["fleet_id"], manifest["devices"]["dev"]["id"],
                            Identity.from_bytes((fleet_dir / "devices/dev/identity.key").read_bytes()),
                            Identity.from_bytes((fleet_dir / "coordinator/identity.key").read_bytes()).public)
    got = threading.Event()
    received = []

    def on_message(topic, payload):
        received.append(device.open(chunking.parse_chunk(payload).data).body)
        got.set()

    small = {k: np.zeros_like(v) for k, v in state_delta(plan.initial_state(), plan.initial_state()).items()}
    first = next(iter(small))
    small[first].reshape(-1)[:8] = 1
    times = []
    with MosquittoProcess(tmp / "m.conf", port):
        url = f"mqtts://127.0.0.1:{port}"
        link = CoordinatorLink(url, fleet_dir, plan, fleet="bench", chunk_size=CHUNK).start()
        transport = MqttTransport(url, fleet_dir, "dev", "dev", on_connect=lambda: None, on_message=on_message)
        transport.start()
        transport.subscribe(topics.downlink("bench", "dev"))
        time.sleep(0.3)
        try:
            for r in range(1, count + 1):
                env = device.seal(encode_update(plan, small, 1, 0.1, 1.0), round=r, model_version=0)
                got.clear()
                t0 = time.perf_counter()
                transport.publish(Publish(topics.uplink("bench", "dev"), chunking.split(env, r, CHUNK)[0]))
                if not got.wait(5):
                    raise RuntimeError("no ACK")
                times.append(time.perf_counter() - t0)
                assert isinstance(received[-1], Ack)
        finally:
            transport.close()
            link.close()
    times = np.array(times[10:]) * 1e3
    return float(np.median(times)), float(np.percentile(times, 99)), len(times), len(env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-latency", type=int, default=300)
    args = parser.parse_args()
    rows, cases, n_params = uplink_table()
    print(f"{SECTION}\n\n{provenance('python benchmarks/bench_protocol.py')}\n")
    print(f"sensor_cnn, input (1, 256), 4 classes: {n_params} parameters in the int8 graph; fp32 dense full model "
          f"= 4 x {n_params} = {dense_fp32_bytes(n_params)} B. One local epoch on 32 bearing windows, DELTA in "
          f"{CHUNK}-byte MQTT chunks (all overheads counted).\n")
    print(f"| scheme | trainable values | nonzero after 1 epoch | uplink, every change (B) | ratio vs fp32 full | "
          f"uplink, keep {KEEP} (B) | ratio | uplink fixed set (B) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec, values, nonzero, sent, kept, fixed, base in rows:
        print(f"| {spec} | {values} | {nonzero} | {sent} | {base / sent:.1f}x | {kept} | {base / kept:.1f}x | "
              f"{fixed} | {base / fixed:.1f}x |")
    plan, delta = cases[SCHEMES[0]]
    enc, dec, plain = throughput(plan, delta)
    print(f"\nCodec on one core ({SCHEMES[0]} DELTA, {plain} B plaintext body):\n")
    print("| operation | messages/s | MB/s |")
    print("|---|---:|---:|")
    print(f"| encode + sign + encrypt | {enc[0]:.0f} | {enc[1]:.2f} |")
    print(f"| verify + decrypt + decode | {dec[0]:.0f} | {dec[1]:.2f} |")
    lat = latency(plan, args.rounds_latency)
    if lat is None:
        print("\nmosquitto not installed: latency not measured")
    else:
        median, p99, n, size = lat
        print(f"\nRound trip DELTA ({size} B envelope) -> ACK, device transport <-> CoordinatorLink through mosquitto "
              f"on loopback (TLS 1.2, client certificates, MQTT 5, TCP_NODELAY), {n} round trips: "
              f"median {median:.2f} ms, p99 {p99:.2f} ms.")


if __name__ == "__main__":
    with capture() as out:
        main()
    write_section(SECTION, out.getvalue())
