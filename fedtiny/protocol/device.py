"""A device's end of the fleet link as a sans-IO state machine: the specification the C node mirrors.

DeviceSession takes MQTT messages and clock ticks, and returns the publishes to make and the training jobs to
run; it never sees a training sample. What crosses from training to the protocol is a TrainResult (a trainable
state and three numbers), and the session turns it into a DELTA through update.uplink, which accepts nothing
but plan buffers and numbers.

NodeState is everything a device keeps across a power cut: model version and its global state, the
coordinator's run, the highest round seen, the next uplink seq, the downlink replay positions, the trainer's
random counter, a task received but not answered, the sealed DELTA until the coordinator ACKs it, the change
kept back for the next round (error feedback), the personalised model (the trainable state after the device's
last answered round, what it predicts with: `inference_state`) and the secure-aggregation round held. A seq is
persisted before any message using it leaves the session, so a restart never reuses a nonce.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.fileformat import dumps, loads
from fedtiny.planfile import plan_hash
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.envelope import DeviceEndpoint, Flags, Header, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import (
    FEATURE_MQTT5, FEATURE_SECURE_AGGREGATION, Ack, AckStatus, DeviceState, GlobalUpdate, Join, Leave, MessageType,
    SecAggPeers, SecAggRelay, SecAggUnmask, Status, Task,
)
from fedtiny.protocol.noise import NoiseStream, noise_key
from fedtiny.protocol.secagg import MAX_MASKED_BUFFERS, MAX_STAGE_ENVELOPE, RoundContext, SecAggDevice
from fedtiny.protocol.task import task_settings
from fedtiny.protocol.topics import Publish
from fedtiny.protocol.update import (
    MAX_TASK_ENVELOPE, apply_global_update, delta_limits, downlink_reassembly_bytes, max_downlink_bytes,
    max_message_bytes, uplink, uplink_delta,
)

log = logging.getLogger("fedtiny.device")

STATE_KIND = b"NODE"
SECAGG_DOWNLINKS = (MessageType.SECAGG_PEERS, MessageType.SECAGG_RELAY, MessageType.SECAGG_UNMASK)


# --- what crosses from training to the protocol ------------------------------------------------------------

@dataclass(frozen=True)
class TrainJob:
    """A round to train: start from `base` (the global state of model_version)."""

    round: int
    model_version: int
    epochs: int
    steps: int
    base: dict[str, np.ndarray]
    uplink_keep: float = 1.0  # the fraction of each buffer's changes the DELTA carries (update.split_uplink)
    clip_norm: float = 0.0  # the DELTA's L2 norm in real units is at most this (0: no clipping)
    noise_sigma: float = 0.0  # discrete Gaussian noise per element, real units (0: none; protocol/noise.py)
    masked: bool = False  # secure aggregation: the DELTA is masked (protocol/secagg.py)


@dataclass(frozen=True)
class TrainResult:
    """All that leaves a device's training: the trained trainable state and three or four numbers.

    `accuracy` is the trained model's on the samples the device trains on; `personal_accuracy` the same model's on
    the device's held-out part (agent.heldout_split), None when the device holds too few samples for one."""

    state: dict[str, np.ndarray]
    num_examples: int
    loss: float
    accuracy: float
    rng_counter: int
    personal_accuracy: float | None = None


# --- persisted state ---------------------------------------------------------------------------------------

@dataclass
class NodeState:
    model_version: int
    global_state: dict[str, np.ndarray]
    rng_counter: int
    round: int = 0  # the highest round seen in the current run
    seq: int = 0  # next uplink seq (never reset: a seq is never reused, whatever the run)
    trained_round: int = -1  # the last round of the current run a DELTA was sealed for
    replay: list = field(default_factory=list)  # ReplayGuard.export() of the downlink streams
    pending_task: dict | None = None  # round, model_version, epochs, steps, ... of a TASK not yet answered
    upload: bytes | None = None  # the sealed DELTA until ACKed
    upload_chunk: int = 0
    carry: dict | None = None  # per trainable buffer, the change not yet sent (update.split_uplink)
    run: int = 0  # the coordinator's run this device follows (envelope Header.run)
    # The personalised model: the trained state of the last round this device sealed a DELTA for (the global model
    # after its own local steps), kept until its next such round; a GLOBAL_UPDATE does not touch it. None before
    # the first, and on a device whose budget does not hold the copy (keeps_personal_model).
    personal: dict | None = None
    # The secure-aggregation round held, as the session encodes it (SecAggDevice.export; the C node's round record):
    # kept from the round's masked TASK until the next one, so a device restarted mid-round answers its later stages.
    secagg: bytes | None = None

    def inference_state(self) -> dict[str, np.ndarray]:
        """The trainable state the device predicts with: its personalised model if it has one, else the global one."""
        return self.personal if self.personal is not None else self.global_state


def keeps_personal_model(plan: Plan) -> bool:
    """Whether a device keeps its personalised model: when the plan's memory report counts the copy (its budget holds
    the copy beside the training step, Plan.memory_report's personal_model_bytes)."""
    return plan.memory_report()["personal_model_bytes"] > 0


def save_state(path: Path, state: NodeState, durable: bool = True) -> None:
    """Atomically: write a temporary file (0600), fsync it, rename over the old one, fsync the directory.
    durable=False skips the two fsyncs (still atomic, not power-cut safe): for simulated nodes, whose host process
    is the device, so an OS crash ends the whole simulation anyway."""
    header = dict(model_version=state.model_version, rng_counter=state.rng_counter, round=state.round,
                  seq=state.seq, trained_round=state.trained_round, replay=state.replay,
                  pending_task=state.pending_task, upload_chunk=state.upload_chunk, run=state.run)
    arrays = dict(state.global_state)
    arrays.update({f"carry:{k}": v for k, v in (state.carry or {}).items()})
    arrays.update({f"personal:{k}": v for k, v in (state.personal or {}).items()})
    if state.upload is not None:
        arrays["upload"] = np.frombuffer(state.upload, np.uint8)
    if state.secagg is not None:
        arrays["secagg"] = np.frombuffer(state.secagg, np.uint8)
    data = dumps(STATE_KIND, header, arrays)
    tmp = path.with_suffix(".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except FileNotFoundError:  # the first save into a new folder (a mkdir at every save cost a tenth of the save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_state(path: Path, plan: Plan) -> NodeState:
    header, arrays = loads(path.read_bytes(), STATE_KIND, str(path))
    upload = arrays.pop("upload", None)
    secagg = arrays.pop("secagg", None)
    carry = {k[len("carry:"):]: np.array(arrays.pop(k)) for k in list(arrays) if k.startswith("carry:")}
    personal = {k[len("personal:"):]: np.array(arrays.pop(k)) for k in list(arrays) if k.startswith("personal:")}
    names = plan.trainable_buffers()
    if set(arrays) != set(names) or (carry and set(carry) != set(names)) or (personal and set(personal) != set(names)):
        raise ValueError(f"{path} holds state for another plan")
    return NodeState(header["model_version"], {n: np.array(arrays[n]) for n in names}, header["rng_counter"],
                     header["round"], header["seq"], header["trained_round"], header["replay"],
                     header["pending_task"], None if upload is None else upload.tobytes(), header["upload_chunk"],
                     carry or None, header["run"], personal or None, None if secagg is None else secagg.tobytes())


# --- the protocol state machine ----------------------------------------------------------------------------

class DeviceSession:
    """One device's protocol, sans-IO. Every method returns the publishes to make (in order); `receive` may
    also return a TrainJob for the caller to run, whose result goes back through `complete`. `now` is any
    monotonic clock in seconds, passed in.

    A device keeps taking downlinks while it trains. A TASK of a later round supersedes the job in progress:
    `receive` returns the new job, and the old one is dropped (`superseded`, and `complete` sends nothing for
    it). A straggler that misses a round thus starts the next one when it is asked, not after finishing the
    round nobody waits for any more.

    Secure aggregation (a TASK with TASK_MASKED; protocol/secagg.py) needs `peers`, the public identities of the
    fleet's devices by id, to check the keys the coordinator relays; without them, or without a clip norm, the
    device refuses such a TASK (ACK REJECTED). Its round is persisted (NodeState.secagg) whenever it changes, in the
    save before the reply it made leaves, as the C node's firmware does: a device restarted mid-round answers the
    later stages (trained values waiting for the relay are not kept: the task trains again)."""

    def __init__(self, plan: Plan, device: str, fleet: str, endpoint: DeviceEndpoint, state: NodeState,
                 chunk_size: int, save: Callable[[NodeState], None], ack_timeout: float = 15.0,
                 started: float = 0.0, peers: Mapping[int, PublicIdentity] | None = None) -> None:
        self.plan = plan
        self.device = device
        self.fleet = fleet
        self.endpoint = endpoint
        self.endpoint.delta_limits = delta_limits(plan)
        self.endpoint.max_message_bytes = max_message_bytes(plan)  # bounds what it seals: a DELTA of the plan
        self.max_downlink_bytes = max_downlink_bytes(plan)  # what it takes: receive refuses anything larger
        self.peers = peers
        self._secagg: SecAggDevice | None = None  # the secure-aggregation round held
        if state.secagg is not None and peers is not None:
            self._secagg = SecAggDevice.restore(state.secagg, plan, endpoint.identity, endpoint.device_id, peers)
        self._secagg_saved = None if self._secagg is None else (self._secagg.ctx, self._secagg.changes)  # as saved
        self._held: tuple | None = None  # (job, delta, carry, result) trained, waiting for the shares to mask
        if peers is not None:
            self.endpoint.max_message_bytes = max(self.endpoint.max_message_bytes, MAX_STAGE_ENVELOPE)
        self.state = state
        self.keeps_personal = keeps_personal_model(plan)
        self.chunk_size = chunk_size
        self._save = save
        self.ack_timeout = ack_timeout
        self.plan_hash = plan_hash(plan)
        # One downlink in flight at a time is the protocol's rhythm (GLOBAL_UPDATE, TASK, ACKs); two leave room
        # for a TASK behind the largest GLOBAL_UPDATE. A C node has exactly this much buffer.
        reassembly = downlink_reassembly_bytes(plan)
        if peers is not None:  # a secure-aggregation stage message behind a TASK
            reassembly = max(reassembly, MAX_STAGE_ENVELOPE + MAX_TASK_ENVELOPE)
        self.reassembler = chunking.Reassembler(max_transfers=2, max_bytes=reassembly, ttl=600.0)
        self._upload_sent_at: float | None = None
        self._started = started
        self.resent_chunks = 0
        self.endpoint.replay.restore(state.replay)
        self.up_topic = topics.uplink(fleet, device)
        self.status_topic = topics.status(fleet, device)
        self.down_topic, self.bcast_topic = topics.downlink(fleet, device), topics.broadcast(fleet)

    # --- sending -----------------------------------------------------------------------------------------
    def _seal(self, body, *, round: int, model_version: int, flags: int = 0) -> bytes:
        seq = self.state.seq
        self.state.seq = seq + 1
        self.persist()  # the seq is on flash before the message exists
        return self.endpoint.seal(body, round=round, model_version=model_version, seq=seq, flags=flags,
                                  run=self.state.run)

    def _frames(self, topic: str, envelope: bytes, retain: bool = False) -> list[Publish]:
        tid = Header.unpack(envelope).seq
        return [Publish(topic, f, retain) for f in chunking.split(envelope, tid, self.chunk_size)]

    def persist(self) -> None:
        self.state.replay = self.endpoint.replay.export()
        agg = self._secagg
        if agg is not None and (agg.ctx, agg.changes) != self._secagg_saved:  # encoded again only when it changed
            self.state.secagg, self._secagg_saved = agg.export(), (agg.ctx, agg.changes)
        self._save(self.state)

    def _status(self, state: DeviceState, now: float, flags: int = 0) -> bytes:
        free = max(0, self.plan.budget - self.plan.reserve - self.plan.arena_size)
        body = Status(int(state), 255, max(0, int(now - self._started)), free, 0)
        return self._seal(body, round=self.state.round, model_version=self.state.model_version, flags=flags)

    def last_will(self, now: float) -> Publish:
        """The pre-signed OFFLINE status the broker publishes if this device vanishes (reserves a seq)."""
        (frame,) = self._frames(self.status_topic, self._status(DeviceState.OFFLINE, now, Flags.LAST_WILL),
                                retain=True)
        return frame

    def heartbeat(self, now: float, state: DeviceState = DeviceState.IDLE) -> list[Publish]:
        return self._frames(self.status_topic, self._status(state, now), retain=True)

    def on_connect(self, now: float) -> list[Publish]:
        """After every (re)connect: JOIN and a heartbeat. With an upload not yet acknowledged, the JOIN waits
        for its ACK: a JOIN is a newer message in the same replay stream, after which the coordinator would
        refuse the older DELTA as stale. The heartbeat (its own stream) tells the coordinator to ask for the
        missing chunks; after a restart the upload is also sent whole once (duplicates are harmless)."""
        out = []
        if self.state.upload is None:
            out += self._join()
        out += self.heartbeat(now)
        if self.state.upload is not None and self._upload_sent_at is None:
            out += self._upload_frames(now)
        return out

    def _join(self) -> list[Publish]:
        features = FEATURE_MQTT5 | (FEATURE_SECURE_AGGREGATION if self.peers is not None else 0)
        join = Join(self.plan.arena_size, self.plan.memory_report()["flash_bytes"], self.chunk_size,
                    features, 1, self.plan_hash)
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

    def tick_due(self) -> float | None:
        """When tick will next have something to do (the clock reading after which an unacknowledged upload is
        resent), or None while nothing waits: a host loop may sleep until then."""
        if self.state.upload is None or self._upload_sent_at is None:
            return None
        return self._upload_sent_at + self.ack_timeout

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
            raise ProtocolError("bad-topic", f"{topic} is not this device's downlink")
        result = self.reassembler.accept(frame, now, topic)
        if result.payload is None:
            return [], None
        claimed = Header.unpack(result.payload)
        topics.check_topic_matches(topic, claimed.fleet_id, claimed.device_id)  # before open() commits anything
        limit = self.max_downlink_bytes
        if self.peers is not None and claimed.type in SECAGG_DOWNLINKS:
            limit = max(limit, MAX_STAGE_ENVELOPE)
        if len(result.payload) > limit:  # larger than anything a coordinator sends this plan
            raise ProtocolError("oversized", f"{len(result.payload)} bytes > {limit}")
        received = self.endpoint.open(result.payload, commit=False)
        if received is None:
            return [], None  # QoS 1 duplicate
        header, body = received.header, received.body
        # Everything that can refuse the message comes before anything changes: its settings, the new model.
        settings = new_state = stage_reply = None
        if isinstance(body, Task) and body.plan_hash == self.plan_hash:
            settings = task_settings(body)
        elif isinstance(body, GlobalUpdate):
            new_state = self._updated_state(body)
        elif isinstance(body, (SecAggPeers, SecAggRelay, SecAggUnmask)):
            stage_reply = self._secagg_stage(header, body)
        self.endpoint.commit(received)
        if header.run > self.state.run:
            self._new_run(header.run)
        self.state.round = max(self.state.round, header.round)
        out: list[Publish] = []
        if new_state is not None:
            self.state.global_state = new_state
            self.state.model_version = header.model_version
        elif isinstance(body, Task):
            if settings is None:
                out += self._ack(header, AckStatus.REJECTED)
                log.warning("%s: TASK for another training plan", self.device)
            elif header.round <= self.state.trained_round:
                log.info("%s: TASK for round %d already answered", self.device, header.round)
            elif settings["masked"] and (self.peers is None or not settings["clip_norm"] > 0 or
                                         len(self.plan.trainable_buffers()) > MAX_MASKED_BUFFERS):
                out += self._ack(header, AckStatus.REJECTED)  # as the C node: fedtiny_node.c's can_mask
                log.warning("%s: TASK asks for a masked delta, but this device %s", self.device,
                            "has no peers' identities" if self.peers is None else
                            "was given no clip norm" if not settings["clip_norm"] > 0 else
                            f"masks at most {MAX_MASKED_BUFFERS} trainable buffers")
            else:
                self.state.pending_task = dict(round=header.round, model_version=header.model_version,
                                               epochs=int(settings["epochs"]), steps=int(settings["steps"]),
                                               uplink_keep=settings["uplink_keep"], clip_norm=settings["clip_norm"],
                                               noise_sigma=settings["noise_sigma"])
                if settings["masked"]:  # only then: a plain task persists as it did before secure aggregation
                    self.state.pending_task["masked"] = True
                if settings["masked"]:
                    out += self._secagg_begin(header.round, settings)
        elif isinstance(body, Ack):
            out += self._on_ack(body, now)
        elif isinstance(body, SecAggPeers):
            out += self._frames(self.up_topic, self._seal(stage_reply, round=header.round,
                                                          model_version=self.state.model_version))
        elif isinstance(body, SecAggRelay):
            out += self._send_masked(now)
        elif isinstance(body, SecAggUnmask):
            out += self._frames(self.up_topic, self._seal(stage_reply, round=header.round,
                                                          model_version=self.state.model_version))
        self.persist()
        return out, self._next_job()

    # --- secure aggregation (protocol/secagg.py) ---------------------------------------------------------------
    def _secagg_begin(self, round_: int, settings: dict) -> list[Publish]:
        """A masked TASK: this round's secure aggregation starts with the device's signed keys."""
        ctx = RoundContext(self.endpoint.fleet_id, self.state.run, round_)
        if self._secagg is None or self._secagg.ctx != ctx:
            self._secagg = SecAggDevice(self.plan, self.endpoint.identity, self.endpoint.device_id, ctx, self.peers,
                                        settings["clip_norm"], settings["noise_sigma"],
                                        min_survivors=int(settings.get("min_survivors", 0)))
            self._held = None
        return self._frames(self.up_topic, self._seal(self._secagg.keys(), round=round_,
                                                      model_version=self.state.model_version))

    def _secagg_stage(self, header: Header, body):
        """The reply to a secure-aggregation stage message (None for the relay); ProtocolError, and nothing
        changed, if it is not for this device's round or does not check out."""
        agg = self._secagg
        if agg is None or (agg.ctx.run, agg.ctx.round) != (header.run, header.round):
            raise ProtocolError("bad-stage", f"{MessageType(header.type).name} for round {header.round}, not this "
                                             f"device's secure-aggregation round")
        if isinstance(body, SecAggPeers):
            return agg.on_peers(body)
        if isinstance(body, SecAggRelay):
            agg.on_relay(body)
            return None
        return agg.on_unmask(body)

    def _send_masked(self, now: float) -> list[Publish]:
        """The masked DELTA, once the round's delta is trained and the neighbours' shares have come."""
        if self._held is None or self._secagg is None or not self._secagg.ready:
            return []
        job, sent, carry, result = self._held
        self._held = None
        body = self._secagg.masked(sent, result.num_examples, result.loss, result.accuracy, result.personal_accuracy)
        return self._upload(job, body, carry, now, Flags.MASKED)

    def _new_run(self, run: int) -> None:
        """An authentic downlink from a newer coordinator run (its database was new, or restored from an older
        copy): rounds count from 1 again there, and an upload sealed for the old run will never be aggregated.
        The change it carried is lost; the error-feedback carry and the model are kept."""
        if self.state.upload is not None:
            log.warning("%s: coordinator run %d began; dropping the unacknowledged upload of run %d",
                        self.device, run, self.state.run)
        self.state.run, self.state.round, self.state.trained_round = run, 0, -1
        self.state.pending_task, self.state.upload, self._upload_sent_at = None, None, None

    def _updated_state(self, body: GlobalUpdate) -> dict[str, np.ndarray] | None:
        """The global state after this GLOBAL_UPDATE; None for one from a version this device does not hold
        (logged and ignored); ProtocolError if it does not fit the plan."""
        try:
            return apply_global_update(self.plan, self.state.global_state, self.state.model_version, body)
        except ProtocolError as exc:
            if exc.reason != "wrong-version":
                raise
            log.warning("%s: %s", self.device, exc)
            return None

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
        if self._held is not None and self._held[0].round == task["round"]:
            return None  # trained already: its masked DELTA waits for the neighbours' shares
        return TrainJob(task["round"], task["model_version"], task["epochs"], task["steps"],
                        {k: v.copy() for k, v in self.state.global_state.items()}, task["uplink_keep"],
                        task["clip_norm"], task.get("noise_sigma", 0.0), task.get("masked", False))

    def pending_job(self) -> TrainJob | None:
        """A task received before a restart and never answered."""
        return self._next_job()

    def superseded(self, job: TrainJob) -> bool:
        """Whether a TASK of a later round came after `job`'s: the coordinator gave up waiting for this round
        (it sends a device a new TASK only once the old one closed), so an answer to it would only be refused.
        The caller drops the job and runs the newer one, which `receive` returned."""
        task = self.state.pending_task
        return task is None or task["round"] != job.round

    def skip(self, job: TrainJob) -> None:
        """The device will not answer this job (it failed the round): the next TASK finds it ready."""
        if self.superseded(job):
            return
        self.state.trained_round = job.round
        self.state.pending_task = None
        self.persist()

    def complete(self, job: TrainJob, result: TrainResult, now: float) -> list[Publish]:
        """Seal the round's DELTA (update.uplink of the trained state from the job's base, and the metrics) and keep
        the trained state as the personalised model, in the same save; for a superseded job nothing is sealed or
        sent, its change is dropped (it was made from an older model) and the personalised model stays."""
        self.state.rng_counter = result.rng_counter  # the trainer drew its random numbers either way
        if self.superseded(job):
            self.persist()
            return []
        noise = NoiseStream(noise_key(self.endpoint.identity.to_bytes()), self.state.run, job.round) \
            if job.noise_sigma > 0 else None
        if job.masked:
            agg = self._secagg
            if agg is None or (agg.ctx.run, agg.ctx.round) != (self.state.run, job.round):
                log.warning("%s: holds no secure-aggregation round %d (its record was lost): a dropout of it",
                            self.device, job.round)
                self.skip(job)
                return []
        if self.keeps_personal:  # the device's own model from now until its next answered round; saved with the DELTA
            self.state.personal = {k: np.array(v, copy=True) for k, v in result.state.items()}
        if job.masked:
            sent, carry = uplink_delta(self.plan, job.base, result.state, self.state.carry, keep=job.uplink_keep,
                                       clip_norm=job.clip_norm, noise_sigma=job.noise_sigma, noise=noise,
                                       noise_limits=agg.bounds)
            self._held = (job, sent, carry, result)
            return self._send_masked(now)
        body, carry = uplink(self.plan, job.base, result.state, self.state.carry, keep=job.uplink_keep,
                             clip_norm=job.clip_norm, num_examples=result.num_examples, loss=result.loss,
                             accuracy=result.accuracy, personal_accuracy=result.personal_accuracy,
                             noise_sigma=job.noise_sigma, noise=noise)
        return self._upload(job, body, carry, now)

    def _upload(self, job: TrainJob, body, carry: dict, now: float, flags: int = 0) -> list[Publish]:
        seq = self.state.seq
        upload = self.endpoint.seal(body, round=job.round, model_version=job.model_version, seq=seq, flags=flags,
                                    run=self.state.run)
        # One save holds the seq the DELTA used, the DELTA, the carry it left and the answered round: a power cut
        # before it leaves the task pending (trained again, from the same counter, after the restart) and nothing
        # sent; after it, the upload is resent. Two saves would let a cut between them drop the round's change.
        self.state.seq = seq + 1
        self.state.carry, self.state.trained_round, self.state.pending_task = carry, job.round, None
        self.state.upload_chunk, self.state.upload = self.chunk_size, upload
        self.persist()  # the seq is on flash before the DELTA leaves
        return self._upload_frames(now)
