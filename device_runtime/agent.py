"""The node agent: one device's end of the fleet link (docs/fleet_link.md), in three parts that do not share data.

    DeviceSession  sans-IO protocol state machine: frames and ticks in, publishes and training jobs out.
                   Holds the protocol state (keys, seq, replay counters, the global state it trains from, the
                   upload in flight) and persists it; it never sees a training sample.
    LocalTraining  the only holder of the device's samples: runs a TrainJob on a trainer, returns a TrainResult
                   (a trainable state and three numbers). The session turns that into a DELTA through
                   fleet.encode_update, which accepts nothing but plan buffers and numbers.
    NodeAgent      glue: an MqttTransport (paho thread) feeding a worker thread that owns the session.

Persistence (state_dir/<device>.node, the fedtiny container of kind NODE, written to a temporary file, fsynced
and renamed): model version and its global state, last round, next uplink seq, downlink replay counters, the
trainer's random counter, a task received but not answered, and the sealed DELTA until the coordinator ACKs it.
A seq is persisted before any message using it leaves the session, so a restart never reuses a nonce.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.planfile import plan_hash
from fedtiny.fileformat import dumps, loads
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.envelope import DeviceEndpoint, Flags, Header, Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.fleet import (
    MqttTransport, Publish, apply_global_update, clip_delta, encode_update, load_fleet, row_scales,
    split_uplink, state_delta, task_settings,
)
from fedtiny.protocol.messages import (
    FEATURE_MQTT5, Ack, AckStatus, Delta, DeviceState, GlobalUpdate, Join, Leave, MessageType, Status, Task,
)

from .interpreter import run

log = logging.getLogger("fedtiny.agent")

STATE_KIND = b"NODE"


# --- what crosses from training to the protocol ------------------------------------------------------------

@dataclass(frozen=True)
class TrainJob:
    """A round to train: start from `base` (the global state of model_version)."""

    round: int
    model_version: int
    epochs: int
    steps: int
    base: dict[str, np.ndarray]
    uplink_keep: float = 1.0  # the fraction of each buffer's changes the DELTA carries (fleet.split_uplink)
    clip_norm: float = 0.0  # the DELTA's L2 norm in real units is at most this (0: no clipping)


@dataclass(frozen=True)
class TrainResult:
    """All that leaves LocalTraining: the trained trainable state and three numbers."""

    state: dict[str, np.ndarray]
    num_examples: int
    loss: float
    accuracy: float
    rng_counter: int


def training_order(seed: int, round_: int, n: int, epochs: int = 1, steps: int = 0) -> np.ndarray:
    """Sample indexes a round trains on: a fresh permutation per epoch from (seed, round, epoch); `steps` > 0
    takes that many steps through consecutive permutations instead of `epochs` whole passes."""
    total = steps if steps > 0 else epochs * n
    order = []
    epoch = 0
    while len(order) < total and n:
        order.extend(np.random.default_rng([seed, round_, epoch]).permutation(n).tolist())
        epoch += 1
    return np.asarray(order[:total], dtype=np.int64)


class LocalTraining:
    """Holds the samples and the trainer; the protocol side gets TrainResults only."""

    def __init__(self, plan: Plan, x_int8: np.ndarray, y: np.ndarray, seed: int,
                 trainer_factory: Callable | None = None, rng_counter: int | None = None) -> None:
        if trainer_factory is None:
            from .trainer import Trainer as trainer_factory
        self.plan = plan
        self._x = np.asarray(x_int8)
        self._y = np.asarray(y)
        if self._x.dtype != np.int8 or len(self._x) != len(self._y):
            raise ValueError("x_int8 must be int8 samples (N, H, W, C) with N labels")
        self.seed = seed
        self.trainer = trainer_factory(plan, seed)
        if rng_counter is not None:
            self.trainer.rng_counter = rng_counter

    @property
    def rng_counter(self) -> int:
        return int(self.trainer.rng_counter)

    def run(self, job: TrainJob) -> TrainResult:
        self.trainer.load_trainable_state(job.base)
        order = training_order(self.seed, job.round, len(self._x), job.epochs, job.steps)
        losses = [self.trainer.step(self._x[i], int(self._y[i])) for i in order]
        state = self.trainer.trainable_state()
        predictions = run(self.plan.graph_with(state), self._x).reshape(len(self._x), -1).argmax(axis=1)
        accuracy = float((predictions == self._y).mean()) if len(self._x) else 0.0
        return TrainResult(state, int(len(set(order.tolist()))), float(np.mean(losses)) if losses else 0.0,
                           accuracy, self.rng_counter)


def round_update(plan: Plan, job: TrainJob, result: TrainResult, carry: dict[str, np.ndarray] | None
                 ) -> tuple[Delta, dict[str, np.ndarray]]:
    """The round's DELTA body and the change kept back for the next round (error feedback), from what training
    returned: every engine's device builds its uplink here. Clipping applies to what is sent; the part it cuts
    is dropped, not carried, so no round's upload exceeds clip_norm."""
    sent, carry = split_uplink(state_delta(result.state, job.base), carry, job.uplink_keep)
    sent = clip_delta(sent, row_scales(plan), job.clip_norm)
    return encode_update(plan, sent, result.num_examples, result.loss, result.accuracy), carry


# --- persisted state ---------------------------------------------------------------------------------------

@dataclass
class NodeState:
    model_version: int
    global_state: dict[str, np.ndarray]
    rng_counter: int
    round: int = 0  # the highest round seen
    seq: int = 0  # next uplink seq
    trained_round: int = -1  # the last round a DELTA was sealed for
    replay: dict = field(default_factory=dict)  # "device_id,direction,stream" -> [round, seq] last accepted
    pending_task: dict | None = None  # round, model_version, epochs, steps of a TASK not yet answered
    upload: bytes | None = None  # the sealed DELTA until ACKed
    upload_chunk: int = 0
    carry: dict | None = None  # per trainable buffer, the change not yet sent (split_uplink)


def save_state(path: Path, state: NodeState) -> None:
    """Atomically: write a temporary file, fsync it, rename over the old one, fsync the directory."""
    header = dict(model_version=state.model_version, rng_counter=state.rng_counter, round=state.round,
                  seq=state.seq, trained_round=state.trained_round, replay=state.replay,
                  pending_task=state.pending_task, upload_chunk=state.upload_chunk)
    arrays = dict(state.global_state)
    arrays.update({f"carry:{k}": v for k, v in (state.carry or {}).items()})
    if state.upload is not None:
        arrays["upload"] = np.frombuffer(state.upload, np.uint8)
    data = dumps(STATE_KIND, header, arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state(path: Path, plan: Plan) -> NodeState:
    header, arrays = loads(path.read_bytes(), STATE_KIND, str(path))
    upload = arrays.pop("upload", None)
    carry = {k[len("carry:"):]: np.array(arrays.pop(k)) for k in list(arrays) if k.startswith("carry:")}
    names = plan.trainable_buffers()
    if set(arrays) != set(names) or (carry and set(carry) != set(names)):
        raise ValueError(f"{path} holds state for another plan")
    return NodeState(header["model_version"], {n: np.array(arrays[n]) for n in names}, header["rng_counter"],
                     header["round"], header["seq"], header["trained_round"], header["replay"],
                     header["pending_task"], None if upload is None else upload.tobytes(), header["upload_chunk"],
                     carry or None)


# --- the protocol state machine ----------------------------------------------------------------------------

class DeviceSession:
    """One device's protocol, sans-IO. Every method returns the publishes to make (in order); `receive` may
    also return a TrainJob for the caller to run, whose result goes back through `complete`."""

    def __init__(self, plan: Plan, device: str, fleet: str, endpoint: DeviceEndpoint, state: NodeState,
                 chunk_size: int, save: Callable[[NodeState], None], ack_timeout: float = 15.0) -> None:
        self.plan = plan
        self.device = device
        self.fleet = fleet
        self.endpoint = endpoint
        self.state = state
        self.chunk_size = chunk_size
        self._save = save
        self.ack_timeout = ack_timeout
        self.plan_hash = plan_hash(plan)
        self.reassembler = chunking.Reassembler(max_transfers=4, max_bytes=4 << 20, ttl=600.0)
        self._upload_sent_at: float | None = None
        self._started = time.monotonic()
        self.resent_chunks = 0
        for key, last in state.replay.items():
            self.endpoint.replay._last[tuple(int(v) for v in key.split(","))] = tuple(last)
        self.up_topic = topics.uplink(fleet, device)
        self.status_topic = topics.status(fleet, device)
        self.down_topic, self.bcast_topic = topics.downlink(fleet, device), topics.broadcast(fleet)

    # --- sending -----------------------------------------------------------------------------------------
    def _seal(self, body, *, round: int, model_version: int, flags: int = 0) -> bytes:
        seq = self.state.seq
        self.state.seq = seq + 1
        self._persist()  # the seq is on flash before the message exists
        return self.endpoint.seal(body, round=round, model_version=model_version, seq=seq, flags=flags)

    def _frames(self, topic: str, envelope: bytes, retain: bool = False) -> list[Publish]:
        tid = Header.unpack(envelope).seq
        return [Publish(topic, f, retain) for f in chunking.split(envelope, tid, self.chunk_size)]

    def _persist(self) -> None:
        self.state.replay = {",".join(map(str, k)): list(v) for k, v in self.endpoint.replay._last.items()}
        self._save(self.state)

    def _status(self, state: DeviceState, flags: int = 0) -> bytes:
        free = max(0, self.plan.budget - self.plan.reserve - self.plan.arena_size)
        body = Status(int(state), 255, int(time.monotonic() - self._started), free, 0)
        return self._seal(body, round=self.state.round, model_version=self.state.model_version, flags=flags)

    def last_will(self) -> Publish:
        """The pre-signed OFFLINE status the broker publishes if this device vanishes (reserves a seq)."""
        (frame,) = self._frames(self.status_topic, self._status(DeviceState.OFFLINE, Flags.LAST_WILL), retain=True)
        return frame

    def heartbeat(self, state: DeviceState = DeviceState.IDLE) -> list[Publish]:
        return self._frames(self.status_topic, self._status(state), retain=True)

    def on_connect(self, now: float) -> list[Publish]:
        """After every (re)connect: JOIN and a heartbeat. With an upload not yet acknowledged, the JOIN waits
        for its ACK: a JOIN is a newer message in the same replay stream, after which the coordinator would
        refuse the older DELTA as stale. The heartbeat (its own stream) tells the coordinator to ask for the
        missing chunks; after a restart the upload is also sent whole once (duplicates are harmless)."""
        out = []
        if self.state.upload is None:
            out += self._join()
        out += self.heartbeat()
        if self.state.upload is not None and self._upload_sent_at is None:
            out += self._upload_frames(now)
        return out

    def _join(self) -> list[Publish]:
        join = Join(self.plan.arena_size, self.plan.memory_report()["flash_bytes"], self.chunk_size,
                    FEATURE_MQTT5, 1, self.plan_hash)
        return self._frames(self.up_topic, self._seal(join, round=self.state.round,
                                                      model_version=self.state.model_version))

    def leave(self) -> list[Publish]:
        return self._frames(self.up_topic, self._seal(Leave(0), round=self.state.round,
                                                      model_version=self.state.model_version))

    def _upload_frames(self, now: float, indexes=None) -> list[Publish]:
        self._upload_sent_at = now
        tid = Header.unpack(self.state.upload).seq
        frames = chunking.split(self.state.upload, tid, self.state.upload_chunk)
        chosen = range(len(frames)) if indexes is None else [i for i in indexes if i < len(frames)]
        return [Publish(self.up_topic, frames[i]) for i in chosen]

    def tick(self, now: float) -> list[Publish]:
        """Resend an upload nobody acknowledged within ack_timeout seconds."""
        if self.state.upload is not None and self._upload_sent_at is not None \
                and now - self._upload_sent_at > self.ack_timeout:
            return self._upload_frames(now)
        return []

    # --- receiving ---------------------------------------------------------------------------------------
    def receive(self, topic: str, frame: bytes, now: float) -> tuple[list[Publish], TrainJob | None]:
        """One MQTT message from the downlink or broadcast topic. Raises ProtocolError (no state change) on
        anything malformed, forged or replayed."""
        if topic not in (self.down_topic, self.bcast_topic):
            raise ProtocolError("bad-topic", f"{topic} is not this device's downlink")  # amqtt leaks retained ones
        result = self.reassembler.accept(frame, now, topic)
        if result.payload is None:
            return [], None
        claimed = Header.unpack(result.payload)
        topics.check_topic_matches(topic, claimed.fleet_id, claimed.device_id)  # before open() commits anything
        received = self.endpoint.open(result.payload)
        if received is None:
            return [], None  # QoS 1 duplicate
        header, body = received.header, received.body
        self.state.round = max(self.state.round, header.round)
        out: list[Publish] = []
        if isinstance(body, GlobalUpdate):
            self._apply_update(header, body)
        elif isinstance(body, Task):
            if body.plan_hash != self.plan_hash:
                out += self._ack(header, AckStatus.REJECTED)
                log.warning("%s: TASK for another training plan", self.device)
            elif header.round <= self.state.trained_round:
                log.info("%s: TASK for round %d already answered", self.device, header.round)
            else:
                settings = task_settings(body)
                self.state.pending_task = dict(round=header.round, model_version=header.model_version,
                                               epochs=int(settings["epochs"]), steps=int(settings["steps"]),
                                               uplink_keep=settings["uplink_keep"], clip_norm=settings["clip_norm"])
        elif isinstance(body, Ack):
            out += self._on_ack(body, now)
        self._persist()
        return out, self._next_job()

    def _apply_update(self, header: Header, body: GlobalUpdate) -> None:
        try:
            new = apply_global_update(self.plan, self.state.global_state, self.state.model_version, body)
        except ProtocolError as exc:
            if exc.reason != "wrong-version":
                raise
            log.warning("%s: %s", self.device, exc)
            return
        self.state.global_state = new
        self.state.model_version = header.model_version

    def _on_ack(self, body: Ack, now: float) -> list[Publish]:
        upload = self.state.upload
        if upload is None or body.acked_type != MessageType.DELTA:
            return []
        seq = Header.unpack(upload).seq
        if body.status == AckStatus.OK and body.acked_seq == seq:
            self.state.upload, self._upload_sent_at = None, None
            return self._join()  # (re)announce now that the data stream is free
        elif body.status == AckStatus.MISSING_CHUNKS and body.transfer_id == seq:
            frames = self._upload_frames(now, body.missing)
            self.resent_chunks += len(frames)
            return frames
        return []

    def _ack(self, header: Header, status: AckStatus) -> list[Publish]:
        body = Ack(header.type, int(status), header.seq)
        return self._frames(self.up_topic, self._seal(body, round=self.state.round,
                                                      model_version=self.state.model_version))

    def _next_job(self) -> TrainJob | None:
        task = self.state.pending_task
        if task is None or self.state.upload is not None or task["model_version"] != self.state.model_version:
            return None  # nothing to do, an upload still in flight, or waiting for the GLOBAL_UPDATE
        return TrainJob(task["round"], task["model_version"], task["epochs"], task["steps"],
                        {k: v.copy() for k, v in self.state.global_state.items()}, task.get("uplink_keep", 1.0),
                        task.get("clip_norm", 0.0))

    def pending_job(self) -> TrainJob | None:
        """A task received before a restart and never answered."""
        return self._next_job()

    def complete(self, job: TrainJob, result: TrainResult, now: float) -> list[Publish]:
        """Seal the round's DELTA (the delta of the trained state from the job's base, and the metrics)."""
        body, self.state.carry = round_update(self.plan, job, result, self.state.carry)
        self.state.rng_counter = result.rng_counter
        self.state.trained_round = job.round
        self.state.pending_task = None
        self.state.upload_chunk = self.chunk_size
        self.state.upload = self._seal(body, round=job.round, model_version=job.model_version)
        self._persist()
        return self._upload_frames(now)


# --- the agent ---------------------------------------------------------------------------------------------

class NodeAgent:
    """One device on the fleet link: joins, heartbeats, trains each TASK on its own samples, uploads the DELTA.

    `trainer_factory(plan, seed)` makes the trainer (default: the Python reference Trainer; the C runtime's
    CTrainer has the same API: step, trainable_state, load_trainable_state, rng_counter settable).
    `uplink_filter(publish) -> bool`, when set, may drop outgoing publishes (fault injection in tests).
    """

    def __init__(self, device: str, broker_url: str, fleet_dir: str | Path, plan: Plan, x_int8: np.ndarray,
                 y: np.ndarray, *, fleet: str, state_dir: str | Path, seed: int, chunk_size: int = 4096,
                 trainer_factory: Callable | None = None, heartbeat_s: float = 30.0, ack_timeout_s: float = 15.0,
                 client_id: str | None = None) -> None:
        self.device = topics.check_name(device)
        self.fleet = fleet
        fleet_dir = Path(fleet_dir)
        folder = fleet_dir / "devices" / device
        manifest = load_fleet(folder)
        endpoint = DeviceEndpoint(manifest["fleet_id"], manifest["devices"][device]["id"],
                                  Identity.from_bytes((folder / "identity.key").read_bytes()),
                                  PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))
        self.state_path = Path(state_dir) / f"{device}.node"
        if self.state_path.exists():
            state = load_state(self.state_path, plan)
            self.restored = True
        else:
            state = NodeState(0, plan.initial_state(), 0)
            self.restored = False
        self.training = LocalTraining(plan, x_int8, y, seed, trainer_factory,
                                      state.rng_counter if self.restored else None)
        state.rng_counter = self.training.rng_counter
        self.session = DeviceSession(plan, device, fleet, endpoint, state, chunk_size,
                                     lambda s: save_state(self.state_path, s), ack_timeout_s)
        self.session._persist()
        self.heartbeat_s = heartbeat_s
        self.uplink_filter: Callable[[Publish], bool] | None = None
        self.rejected: list[str] = []
        self.rounds_done = 0
        self._lock = threading.Lock()  # guards the session between the worker and paho's disconnect callback
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.transport = MqttTransport(broker_url, fleet_dir, device, client_id or device,
                                       on_connect=lambda: self._events.put(("connect",)),
                                       on_message=lambda t, p: self._events.put(("message", t, p)),
                                       will=self._will)

    @property
    def model_version(self) -> int:
        return self.session.state.model_version

    @property
    def rng_counter(self) -> int:
        return self.training.rng_counter

    def _will(self) -> Publish:
        with self._lock:
            return self.session.last_will()

    def start(self) -> NodeAgent:
        self._worker = threading.Thread(target=self.run_forever, name=f"agent-{self.device}", daemon=True)
        self._worker.start()
        self.transport.start()
        return self

    def run_forever(self) -> None:
        """The worker loop (start() runs it in a thread): handle events, train, heartbeat, resend."""
        next_beat = time.monotonic() + self.heartbeat_s
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                event = None
            now = time.monotonic()
            job = None
            with self._lock:
                if event is not None and event[0] == "connect":
                    self.transport.subscribe(topics.downlink(self.fleet, self.device), topics.broadcast(self.fleet))
                    self._send(self.session.on_connect(now))
                    job = self.session.pending_job()
                elif event is not None and event[0] == "message":
                    try:
                        out, job = self.session.receive(event[1], event[2], now)
                        self._send(out)
                    except ProtocolError as exc:
                        self.rejected.append(exc.reason)
                        log.warning("%s rejected a downlink on %s: %s", self.device, event[1], exc)
                if now >= next_beat and self.transport.connected.is_set():
                    self._send(self.session.heartbeat())
                    next_beat = now + self.heartbeat_s
                self._send(self.session.tick(now))
            if job is not None:
                with self._lock:
                    self._send(self.session.heartbeat(DeviceState.TRAINING))
                result = self.training.run(job)  # outside the lock: paho may reconnect meanwhile
                with self._lock:
                    self._send(self.session.complete(job, result, time.monotonic()))
                self.rounds_done += 1

    def _send(self, publishes: list[Publish]) -> None:
        for p in publishes:
            if self.uplink_filter is None or self.uplink_filter(p):
                self.transport.publish(p)

    def stop(self, leave: bool = True) -> None:
        """Stop cleanly: LEAVE (unless leave=False), DISCONNECT (no last will), end the worker."""
        self._stop.set()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(30)
        if leave and self.transport.connected.is_set():
            with self._lock:
                mids = [self.transport.publish(p) for p in self.session.leave()]
            for mid in mids:
                self.transport.wait_published(mid, 5.0)
        self.transport.close()

    def kill(self) -> None:
        """Tests: die as a power cut would: no LEAVE, no DISCONNECT (the broker publishes the last will)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(30)
        self.transport.kill()
