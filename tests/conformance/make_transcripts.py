"""Write the conformance transcripts: recorded exchanges between the reference coordinator session and a device
session, as byte fixtures with the keys, plan and clock that made them. They are the executable specification
of a device: tests/test_conformance.py replays them against the Python DeviceSession, and the C node replays
the same files. Run this only when the protocol changes on purpose, and commit what it writes:

    python tests/conformance/make_transcripts.py

Files: fleet.json (names, ids, identity seeds, chunk size), plan.ftp (the training plan), and one JSON-lines
transcript per scenario. Each line is one call on the device session and what it must return:

    {"op": "connect", "now": t, "out": [[topic, hex, retain], ...]}
    {"op": "receive", "now": t, "topic": ..., "frame": hex, "out": [...], "job": {...} | null, "error": reason | null}
    {"op": "complete", "now": t, "result": {state, num_examples, loss, accuracy, rng_counter}, "out": [...]}
        (the job last returned; with "round": r, the job of round r a receive returned before: a superseded one)
    {"op": "tick", "now": t, "out": [...]}

A device starts from the plan's initial state at model version 0, run 0, seq 0, its clock at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.planfile import save_plan
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.coordinator import CoordinatorSession
from fedtiny.protocol.device import DeviceSession, NodeState, TrainResult
from fedtiny.protocol.envelope import DeviceEndpoint, Header, Identity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.task import task_body
from fedtiny.quantize import quantize
from fedtiny.scheme import parse

HERE = Path(__file__).parent
FLEET, DEVICE, OTHER = "conf", "node7", "node8"
CHUNK = 256


def fleet() -> dict:
    return dict(fleet=FLEET, fleet_id=topics.name_id(FLEET), device=DEVICE, device_id=topics.name_id(DEVICE),
                other=OTHER, device_seed="device-node7", other_seed="device-node8",
                coordinator_seed="coordinator-conf", chunk_size=CHUNK)


def make_plan():
    import torch

    torch.manual_seed(7)  # the model's initial weights: the same plan on every run of this script
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 12)).astype(np.float32)
    graph = quantize(zoo.build("mlp", (12,), 3), x)
    return compile_plan(graph, parse("last:2", graph))


def device_session(plan, spec: dict) -> DeviceSession:
    """A device as every transcript starts it (also what test_conformance builds)."""
    coordinator = Identity.from_seed(spec["coordinator_seed"].encode()).public
    endpoint = DeviceEndpoint(spec["fleet_id"], spec["device_id"], Identity.from_seed(spec["device_seed"].encode()),
                              coordinator)
    return DeviceSession(plan, spec["device"], spec["fleet"], endpoint, NodeState(0, plan.initial_state(), 0),
                         spec["chunk_size"], save=lambda state: None, ack_timeout=15.0, started=0.0)


def coordinator_session(plan, spec: dict) -> CoordinatorSession:
    devices = {spec[k]: Identity.from_seed(spec[f"{k}_seed"].encode()).public for k in ("device", "other")}
    return CoordinatorSession(plan, spec["fleet"], spec["fleet_id"],
                              Identity.from_seed(spec["coordinator_seed"].encode()), devices, chunk_size=CHUNK)


def frames(publishes) -> list:
    return [[p.topic, p.payload.hex(), p.retain] for p in publishes]


def job_dict(job) -> dict | None:
    if job is None:
        return None
    return dict(round=job.round, model_version=job.model_version, epochs=job.epochs, steps=job.steps,
                uplink_keep=job.uplink_keep, clip_norm=job.clip_norm)


def result_dict(result: TrainResult) -> dict:
    return dict(state={k: [str(v.dtype), list(v.shape), v.tobytes().hex()] for k, v in result.state.items()},
                num_examples=result.num_examples, loss=result.loss, accuracy=result.accuracy,
                rng_counter=result.rng_counter)


def trained(plan, base, seed: int) -> TrainResult:
    """What training might return: small deterministic steps from the base (the protocol's input, not its test)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in base.items():
        step = rng.integers(-4, 5, value.shape)
        lo, hi = np.iinfo(value.dtype).min, np.iinfo(value.dtype).max
        state[name] = np.clip(value.astype(np.int64) + step, max(lo, -127), hi).astype(value.dtype)
    return TrainResult(state, 16, 0.75, 0.5, 1000 + seed)


class Recorder:
    """Drives a device session, records every call and its result, and hands uplinks to a coordinator."""

    def __init__(self, plan, spec):
        self.plan, self.spec = plan, spec
        self.device = device_session(plan, spec)
        self.coordinator = coordinator_session(plan, spec)
        self.lines: list[dict] = []
        self.job = None

    def up(self, publishes, now: float, keep=lambda i: True) -> list:
        """Uplinks to the coordinator (those `keep` lets through); returns the coordinator's downlinks."""
        out = []
        for i, p in enumerate(publishes):
            if keep(i):
                out += self.coordinator.receive(p.topic, p.payload, now)
        return out

    def connect(self, now: float):
        out = self.device.on_connect(now)
        self.lines.append(dict(op="connect", now=now, out=frames(out)))
        return out

    def receive(self, topic: str, frame: bytes, now: float):
        line = dict(op="receive", now=now, topic=topic, frame=frame.hex(), out=[], job=None, error=None)
        try:
            out, self.job = self.device.receive(topic, frame, now)
            line.update(out=frames(out), job=job_dict(self.job))
        except ProtocolError as exc:
            out = []
            line["error"] = exc.reason
        self.lines.append(line)
        return out

    def deliver(self, downlinks, now: float):
        """Every downlink to the device; returns what the device sent back."""
        out = []
        for p in downlinks:
            out += self.receive(p.topic, p.payload, now)
        return out

    def complete(self, result: TrainResult, now: float, job=None):
        out = self.device.complete(job or self.job, result, now)
        line = dict(op="complete", now=now, result=result_dict(result), out=frames(out))
        if job is not None:
            line["round"] = job.round
        self.lines.append(line)
        return out

    def tick(self, now: float):
        out = self.device.tick(now)
        self.lines.append(dict(op="tick", now=now, out=frames(out)))
        return out

    def write(self, name: str) -> None:
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in self.lines))


def new_global(plan, seed: int) -> dict:
    return trained(plan, plan.initial_state(), seed).state


def join_and_task(r: Recorder, round_: int, version: int, state, now: float):
    r.up(r.connect(now), now)
    return r.deliver(r.coordinator.send_task(DEVICE, round_, version, state, {"epochs": 1}), now + 0.1)


def round_trip(plan, spec) -> Recorder:
    """JOIN -> GLOBAL_UPDATE + TASK -> DELTA chunks -> ACK -> JOIN, then a second round from a difference."""
    r = Recorder(plan, spec)
    join_and_task(r, 1, 1, new_global(plan, 1), 1.0)
    ack = r.up(r.complete(trained(plan, r.job.base, 11), 2.0), 2.0)
    r.up(r.deliver(ack, 2.1), 2.1)
    r.up(r.deliver(r.coordinator.send_task(DEVICE, 2, 2, new_global(plan, 2), {"epochs": 2, "uplink_keep": 0.5}),
                   3.0), 3.0)
    ack = r.up(r.complete(trained(plan, r.job.base, 12), 4.0), 4.0)
    r.deliver(ack, 4.1)
    return r


def resumed_upload(plan, spec) -> Recorder:
    """The connection drops after two chunks of the DELTA; on reconnect the coordinator asks for the rest."""
    r = Recorder(plan, spec)
    join_and_task(r, 1, 1, new_global(plan, 1), 1.0)
    upload = r.complete(trained(plan, r.job.base, 11), 2.0)
    assert len(upload) > 3, "the transcript needs a multi-chunk upload"
    r.up(upload, 2.0, keep=lambda i: i < 2)
    missing = r.up(r.connect(5.0), 5.0)  # JOIN waits for the ACK; the heartbeat makes the coordinator ask
    ack = r.up(r.deliver(missing, 5.1), 5.1)
    r.deliver(ack, 5.2)
    return r


def late_ack(plan, spec) -> Recorder:
    """The DELTA of round 1 arrives after the device took the TASK of round 2: the ACK must still free it."""
    r = Recorder(plan, spec)
    join_and_task(r, 1, 1, new_global(plan, 1), 1.0)
    upload = r.complete(trained(plan, r.job.base, 11), 2.0)
    r.deliver(r.coordinator.send_task(DEVICE, 2, 1, None, {"epochs": 1}), 30.0)
    resent = r.tick(30.5)  # nobody acknowledged it within ack_timeout
    assert resent == upload
    ack = r.up(resent, 31.0)
    r.deliver(ack, 31.1)  # the ACK carries round 2: accepted, and the job of round 2 follows
    return r


def superseded_job(plan, spec) -> Recorder:
    """The TASK of round 2 (after a GLOBAL_UPDATE) arrives while round 1 is still being trained, as it does once
    the coordinator closed round 1 at its deadline: round 1 is dropped without a DELTA, round 2 answered."""
    r = Recorder(plan, spec)
    join_and_task(r, 1, 1, new_global(plan, 1), 1.0)
    first = r.job
    r.deliver(r.coordinator.send_task(DEVICE, 2, 2, new_global(plan, 2), {"epochs": 1}), 20.0)
    assert r.complete(trained(plan, first.base, 11), 25.0, job=first) == []
    ack = r.up(r.complete(trained(plan, r.job.base, 12), 26.0), 26.0)
    r.deliver(ack, 26.1)
    return r


def rejected_frames(plan, spec) -> Recorder:
    """One frame of each kind a device must refuse, each changing nothing, between valid ones."""
    r = Recorder(plan, spec)
    r.up(r.connect(1.0), 1.0)
    (task,) = r.coordinator.send_task(DEVICE, 1, 0, None, {"epochs": 1})
    down, other_down = topics.downlink(FLEET, DEVICE), topics.downlink(FLEET, OTHER)
    chunk = chunking.parse_chunk(task.payload)
    envelope = bytearray(chunk.data)
    envelope[-1] ^= 0x01  # signature
    r.receive(down, chunking.split(bytes(envelope), chunk.transfer_id, CHUNK)[0], 1.1)
    envelope = bytearray(chunk.data)
    envelope[40] ^= 0x01  # body, under the signature
    r.receive(down, chunking.split(bytes(envelope), chunk.transfer_id, CHUNK)[0], 1.2)
    r.receive(other_down, task.payload, 1.3)  # another device's topic
    (foreign,) = r.coordinator.send_task(OTHER, 1, 0, None, {"epochs": 1})
    r.receive(down, foreign.payload, 1.4)  # addressed to another device, on this one's topic
    r.receive(down, b"garbage that is no chunk at all", 1.5)
    huge = chunking.Chunk(99, 0, 16384, 64 << 20, 4096, bytes(4096))
    r.receive(down, huge.encode(), 1.6)  # declares 64 MiB
    r.receive(down, task.payload, 2.0)  # the valid TASK: a job
    r.receive(down, task.payload, 2.1)  # QoS 1 duplicate: nothing
    # a different TASK at the valid one's position, properly signed by the coordinator's key: a replay
    used = Header.unpack(chunk.data)
    other = task_body(plan, r.coordinator._plan_hash, {"epochs": 3}, CHUNK)
    forged = r.coordinator._endpoint.seal(other, device_id=used.device_id, round=used.round,
                                          model_version=used.model_version, seq=used.seq, run=used.run)
    r.receive(down, chunking.split(forged, 5, CHUNK)[0], 2.2)
    # the same, one round older: stale
    older = r.coordinator._endpoint.seal(other, device_id=used.device_id, round=used.round - 1,
                                         model_version=used.model_version, seq=used.seq + 1, run=used.run)
    r.receive(down, chunking.split(older, 6, CHUNK)[0], 2.3)
    return r


SCENARIOS = {"round_trip": round_trip, "resumed_upload": resumed_upload, "late_ack": late_ack,
             "superseded_job": superseded_job, "rejected_frames": rejected_frames}


def main() -> None:
    spec = fleet()
    plan = make_plan()
    save_plan(plan, HERE / "plan.ftp")
    (HERE / "fleet.json").write_text(json.dumps(spec, indent=2) + "\n")
    for name, scenario in SCENARIOS.items():
        scenario(plan, spec).write(name)
        print(f"wrote {name}.jsonl")


if __name__ == "__main__":
    main()
