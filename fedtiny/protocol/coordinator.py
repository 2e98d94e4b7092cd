"""The coordinator's end of the fleet link as a sans-IO state machine (docs/fleet_link.md), and the interface
every link to a fleet implements (FleetLink).

CoordinatorSession takes MQTT messages and clock readings, and returns the publishes to make; verified replies
and rejections collect in it until the caller takes them. Per device it keeps a registry entry, a reassembler
with its own quota (sized from the plan's largest legitimate message, so one device can neither block another
nor make the coordinator hold more than a message's worth for it), the downlink position, and the ACKs it sent.

Durable state (`durable_state()` / `restore()`): the uplink replay positions, the coordinator's run and the
downlink seq reservation. Seqs are reserved in blocks and the reservation is saved (the `save` callback, called
synchronously) before a seq in it is used, so a restart never reuses a nonce. A coordinator whose state is lost
starts a new run above every run its devices report; devices then count rounds afresh (DeviceSession._new_run).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.planfile import plan_hash
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.envelope import CoordinatorEndpoint, Flags, Header, Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import (
    FEATURE_INFLATE, Ack, AckStatus, Body, Delta, DeviceState, MaskedDelta, MessageType, SecAggKeys, SecAggReveal,
    SecAggShares,
)
from fedtiny.protocol.secagg import MAX_STAGE_ENVELOPE, RoundContext, SecAggRound, SecAggSum
from fedtiny.protocol.task import task_body
from fedtiny.protocol.topics import Publish
from fedtiny.protocol.update import SentStates, decode_update, delta_limits, max_message_bytes

log = logging.getLogger("fedtiny.coordinator_session")


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # device name (certificate CN / broker username)
    device_id: int  # topics.name_id(device)
    memory_budget: int
    plan_hash: bytes
    last_seen: float  # the link's clock at the last message from it
    online: bool  # False after its last will or LEAVE


@dataclass(frozen=True)
class DeviceReply:
    device: str
    round: int
    model_version: int  # the global version the device trained from
    delta: dict[str, np.ndarray]  # trainable buffer name -> integer delta
    num_examples: int
    metrics: dict[str, float]  # device-reported, e.g. {"loss": ..., "accuracy": ...}
    uplink_bytes: int  # MQTT payload bytes of the whole DELTA transfer (all chunks)


@dataclass(frozen=True)
class SecAggOutcome:
    """How a secure-aggregation round ended at the link: its sum (None if it failed, and why), the stages' log,
    and the uplink bytes each device spent on it (all stages)."""

    round: int
    result: SecAggSum | None
    failure: str  # "" when the sum was unmasked
    log: tuple[dict, ...]
    uplink_bytes: dict[str, int]  # MQTT payload bytes of every stage message, per device
    downlink_bytes: dict[str, int]


@dataclass(frozen=True)
class Rejection:
    """A message the coordinator refused, and why: every one is an operator-visible event."""

    device: str  # the device the topic names ("" when the topic itself was bad)
    reason: str  # ProtocolError.reason: bad-signature, stale, replay, oversized, too-many-transfers, ...
    detail: str


class FleetLink(Protocol):
    """What the coordinator (server/) needs of a link to its devices. Implemented by the MQTT link
    (fedtiny.transport.mqtt.CoordinatorLink), the Flower engine's GridLink and the tests' FakeLink."""

    def start(self) -> FleetLink: ...
    def close(self) -> None: ...
    def devices(self, seen_within: float | None = None) -> list[DeviceInfo]: ...
    def send_task(self, device: str, round: int, model_version: int,
                  global_state: dict[str, np.ndarray] | None, config: dict[str, float]) -> int: ...
    def replies(self, timeout: float) -> list[DeviceReply]: ...
    def rejections(self) -> list[Rejection]: ...
    def durable_state(self) -> dict | None: ...
    def restore(self, state: dict, status_streams: bool = True) -> None: ...


class CoordinatorSession:
    RESUME_IDLE_S = 0.5  # an open upload idle this long is asked for its missing chunks on the next STATUS
    STALE_ACK_INTERVAL_S = 5.0  # at most one ACK per device this often for a DELTA already accepted
    SEQ_BLOCK = 1024  # downlink seqs reserved (and saved) at a time
    TRANSFERS_PER_DEVICE = 2  # an upload, and one superseding it after a device restart
    TRANSFER_TTL_S = 600.0  # a partial upload is kept this long for a device to resume it

    def __init__(self, plan: Plan, fleet: str, fleet_id: int, identity: Identity, devices: dict[str, PublicIdentity],
                 *, chunk_size: int = 4096, save: Callable[[dict], None] = lambda state: None,
                 revoked: set[str] = frozenset()) -> None:
        if not chunking.MIN_CHUNK_PAYLOAD <= chunk_size <= chunking.MAX_CHUNK_PAYLOAD:
            raise ValueError(f"chunk_size is the MQTT payload per chunk: {chunking.MIN_CHUNK_PAYLOAD}.."
                             f"{chunking.MAX_CHUNK_PAYLOAD}")
        self.plan = plan
        self.fleet = topics.check_name(fleet)
        self.chunk_size = chunk_size
        self._save = save
        self._names = {topics.name_id(name): name for name in devices if name not in revoked}
        self._endpoint = CoordinatorEndpoint(fleet_id, identity, {topics.name_id(n): devices[n]
                                                                  for n in self._names.values()},
                                             max_message_bytes=max(max_message_bytes(plan), MAX_STAGE_ENVELOPE))
        self._endpoint.delta_limits = delta_limits(plan)
        self._plan_hash = plan_hash(plan)
        self._sent = SentStates(plan)
        self.run: int | None = None  # chosen at the first downlink when no durable state says it
        self._max_device_run = 0
        self._seq = self._seq_reserved = 0
        self._reassemblers: dict[str, chunking.Reassembler] = {}
        self._transfer_seen: dict[tuple, float] = {}
        self._registry: dict[str, DeviceInfo] = {}
        self._device_payload: dict[str, int] = {}  # the device's max MQTT payload from its JOIN
        self._device_features: dict[str, int] = {}  # the device's JOIN.features
        self._versions: dict[str, int] = {}  # model version each device last said it holds
        self._sent_round: dict[str, int] = {}  # the highest round of a downlink sent to each device
        self._task_run: dict[str, int] = {}  # the run of the last TASK sent to each device
        self._acks: dict[tuple[str, int], list[Publish]] = {}  # (device, DELTA seq) -> the ACK sent for it
        self._stale_acked: dict[str, float] = {}
        self._answered: set[tuple[str, int]] = set()
        self._replies: list[DeviceReply] = []
        self._rejections: list[Rejection] = []
        self._secagg: dict[int, SecAggRound] = {}  # round -> its secure aggregation in progress
        self._secagg_version: dict[int, int] = {}
        self._secagg_bytes: dict[int, Counter] = {}
        self._secagg_down: dict[int, Counter] = {}
        self._secagg_outcomes: list[SecAggOutcome] = []
        self.stats: Counter = Counter()  # rejected:<reason>, duplicate_chunks, duplicate_messages, replies, ...

    # --- durable state -----------------------------------------------------------------------------------
    def durable_state(self) -> dict:
        """What a restarted coordinator must not forget (JSON-able): the last position accepted from every
        device stream, the run, and the end of the downlink seq reservation."""
        return dict(replay=self._endpoint.replay.export(), run=self.run, seq=self._seq_reserved)

    def restore(self, state: dict, status_streams: bool = True) -> None:
        """Take back a durable_state(), never moving anything backwards. Without `status_streams` only the data
        streams' replay positions (JOIN, DELTA, ACK, LEAVE): before connecting, so that an old DELTA the broker
        queued meanwhile is refused, while the retained STATUS messages the link had accepted before still
        register their devices (StateStore.restore_link)."""
        self._endpoint.replay.restore(state.get("replay", []), data_only=not status_streams)
        if state.get("run") is not None:
            self.run = max(self.run or 0, int(state["run"]))
        self._seq = self._seq_reserved = max(self._seq_reserved, int(state.get("seq", 0)))

    def _next_seq(self) -> int:
        if self._seq >= self._seq_reserved:
            self._seq_reserved = self._seq + self.SEQ_BLOCK
            self._save(self.durable_state())  # on disk before any seq of the block leaves
        self._seq += 1
        return self._seq - 1

    def _current_run(self, new_task: bool) -> int:
        """The run downlinks are sealed in: above every run a device reported, so that devices holding the state
        of a lost or older coordinator database take part again from their next TASK on. It moves only with a
        TASK, never under an ACK, so that a DELTA answering a TASK is always of the run that TASK was sent in."""
        if self.run is None or (new_task and self._max_device_run > self.run):
            self.run = self._max_device_run + 1
            self._save(self.durable_state())
            log.warning("coordinator run %d begins (devices reported run %d)", self.run, self._max_device_run)
        return self.run

    def revoke(self, device: str) -> None:
        """Refuse a device from now on (`fedtiny keys --revoke`): its messages are `unknown-device`, its partial
        uploads and registry entry are dropped, and no TASK is sent to it."""
        device_id = topics.name_id(device)
        if self._names.pop(device_id, None) is None:
            return
        self._endpoint.revoke(device_id)
        self._registry.pop(device, None)
        self._reassemblers.pop(device, None)
        log.warning("%s is revoked: its messages are refused from now on", device)

    # --- the link's interface ----------------------------------------------------------------------------
    def devices(self, now: float, seen_within: float | None = None) -> list[DeviceInfo]:
        infos = list(self._registry.values())
        if seen_within is not None:
            infos = [d for d in infos if now - d.last_seen <= seen_within]
        return sorted(infos, key=lambda d: d.device)

    def send_task(self, device: str, round: int, model_version: int, global_state: dict[str, np.ndarray] | None,
                  config: dict[str, float]) -> list[Publish]:
        """TASK (and, if the device's version is not model_version, a GLOBAL_UPDATE of what changed before it)."""
        if topics.name_id(device) not in self._names:
            raise ValueError(f"{device} is not enrolled in fleet {self.fleet}")
        update = None
        if global_state is not None:
            update = self._sent.update(self._versions.get(device), model_version, global_state)
        self._task_run[device] = self._current_run(new_task=True)
        out = []
        if update is not None:
            inflates = self._device_features.get(device, 0) & FEATURE_INFLATE
            out += self._downlink(device, replace(update, compress=None if inflates else False), round,
                                  model_version)
        task = task_body(self.plan, self._plan_hash, config, self._payload_size(device))
        return out + self._downlink(device, task, round, model_version)

    def take_replies(self) -> list[DeviceReply]:
        out, self._replies = self._replies, []
        return out

    def take_rejections(self) -> list[Rejection]:
        out, self._rejections = self._rejections, []
        return out

    def receive(self, topic: str, frame: bytes, now: float) -> list[Publish]:
        """One MQTT message from an uplink or status topic. A refused message changes nothing but the stats and
        the rejections; it never raises."""
        out: list[Publish] = []
        try:
            self._handle(topic, frame, now, out)
        except ProtocolError as exc:
            self._reject(topic, exc.reason, str(exc))
        except Exception as exc:  # a bug here must not stop the link: it is counted and logged with its trace
            log.exception("error handling a message on %s", topic)
            self._reject(topic, "internal-error", repr(exc))
        return out

    # --- internals ---------------------------------------------------------------------------------------
    def _reject(self, topic: str, reason: str, detail: str) -> None:
        try:
            device = topics.parse(topic)[2] or ""
        except (ProtocolError, ValueError):
            device = ""
        self._refuse(device, reason, detail)

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        self.stats[f"rejected:{reason}"] += 1
        self._rejections.append(Rejection(device, reason, detail))

    def _payload_size(self, device: str) -> int:
        return min(self.chunk_size, self._device_payload.get(device, self.chunk_size))

    def _downlink(self, device: str, body: Body, round: int, model_version: int) -> list[Publish]:
        """Seal `body` for a device at a position newer than anything it was sent: never below the highest round
        it has had from us, or a device that accepted a later TASK would refuse it as stale."""
        round = max(round, self._sent_round.get(device, 0))
        self._sent_round[device] = round
        envelope = self._endpoint.seal(body, device_id=topics.name_id(device), round=round,
                                       model_version=model_version, seq=self._next_seq(),
                                       run=self._current_run(new_task=False))
        return [Publish(topics.downlink(self.fleet, device), f)
                for f in chunking.split(envelope, Header.unpack(envelope).seq, self._payload_size(device))]

    def _reassembler(self, device: str) -> chunking.Reassembler:
        if device not in self._reassemblers:
            self._reassemblers[device] = chunking.Reassembler(
                self.TRANSFERS_PER_DEVICE, self.TRANSFERS_PER_DEVICE * self._endpoint.max_message_bytes,
                self.TRANSFER_TTL_S, evict=True)
        return self._reassemblers[device]

    def _handle(self, topic: str, frame: bytes, now: float, out: list[Publish]) -> None:
        fleet, kind, device = topics.parse(topic)
        if fleet != self.fleet or kind not in ("up", "status"):
            raise ProtocolError("bad-topic", topic)
        if topics.name_id(device) not in self._names:
            raise ProtocolError("unknown-device", f"{device} is not enrolled or was revoked")
        if not frame:  # a cleared retained message
            return
        chunk = chunking.parse_chunk(frame)
        done = self._acks.get((device, chunk.transfer_id)) if chunk.count > 1 else None
        if done is not None:  # a chunk of an upload already complete: resent after a reconnect or a lost ACK
            self.stats["duplicate_chunks"] += 1
            if chunk.index == chunk.count - 1:
                out += done if self._may_ack_again(device, now) else []
            return
        result = self._reassembler(device).accept(frame, now, device)
        if result.duplicate:
            self.stats["duplicate_chunks"] += 1
        if result.payload is None:
            if result.key in self._reassembler(device).open_transfers():
                self._transfer_seen[result.key] = now
            return
        self._transfer_seen.pop(result.key, None)
        envelope = result.payload
        header = Header.unpack(envelope)
        topics.check_topic_matches(topic, header.fleet_id, header.device_id)
        expected_kind = "status" if header.type == MessageType.STATUS else "up"
        if kind != expected_kind:
            raise ProtocolError("wrong-topic", f"{MessageType(header.type).name} on a {kind} topic")
        try:
            received = self._endpoint.open(envelope)
        except ProtocolError as exc:
            if exc.reason == "stale" and header.type == MessageType.DELTA:
                # open() verified the signature before it found the position old: this is the device's own DELTA,
                # accepted before a restart that lost its ACK. Without an ACK it would hold the upload forever.
                out += self._ack_delta(device, header, now, stale=True)
            raise
        if received is None:
            self.stats["duplicate_messages"] += 1
            if header.type == MessageType.DELTA:
                out += self._ack_delta(device, header, now, stale=True)  # the device did not get our ACK
            return
        header, body = received.header, received.body
        self._max_device_run = max(self._max_device_run, header.run)
        self._touch(device, header, now)
        if header.type == MessageType.JOIN:
            self._registry[device] = DeviceInfo(device, header.device_id, body.memory_budget_bytes, body.plan_hash,
                                                now, True)
            self._device_payload[device] = body.max_mqtt_payload
            self._device_features[device] = body.features
            if body.plan_hash != self._plan_hash:
                log.warning("%s runs a different training plan", device)
            out += self._request_missing(device, header, idle=0.0, now=now)
        elif header.type == MessageType.STATUS:
            online = body.state != DeviceState.OFFLINE
            self._registry[device] = replace(self._registry[device], online=online)
            if online:
                out += self._request_missing(device, header, idle=self.RESUME_IDLE_S, now=now)
        elif header.type == MessageType.LEAVE:
            self._registry[device] = replace(self._registry[device], online=False)
        elif header.type == MessageType.ACK:
            if body.status == AckStatus.REJECTED:
                self._versions.pop(device, None)  # it could not apply our update: next time send it whole
                log.warning("%s rejected %s (round %d)", device, MessageType(body.acked_type).name, header.round)
        elif isinstance(body, (MaskedDelta, SecAggKeys, SecAggShares, SecAggReveal)):
            out += self._secagg_message(device, header, body,
                                        len(envelope) + chunk.count * chunking.CHUNK_HEADER_SIZE, now)
        elif header.type == MessageType.DELTA:
            out += self._delta(device, header, body, len(envelope) + chunk.count * chunking.CHUNK_HEADER_SIZE, now)

    def _touch(self, device: str, header: Header, now: float) -> None:
        info = self._registry.get(device)
        if info is None:
            info = DeviceInfo(device, header.device_id, 0, b"", now, True)
        last_will = header.type == MessageType.STATUS and header.flags & Flags.LAST_WILL
        self._registry[device] = replace(info, last_seen=now, online=info.online if last_will else True)
        if header.type != MessageType.DELTA:
            self._versions[device] = header.model_version

    def _ack_delta(self, device: str, header: Header, now: float, stale: bool = False) -> list[Publish]:
        """ACK OK for the DELTA with this seq, remembered so that a resend of it or of its chunks is ACKed again.
        ACKs for DELTAs already answered are rate-limited per device: a replayed DELTA costs a signature check,
        never a signed reply each time."""
        if stale and not self._may_ack_again(device, now):
            return []
        acks = self._downlink(device, Ack(MessageType.DELTA, AckStatus.OK, header.seq), header.round,
                              header.model_version)
        self._acks[(device, header.seq)] = acks  # device transfer ids are their envelope seqs
        if len(self._acks) > 4096:
            del self._acks[next(iter(self._acks))]
        return acks

    def _may_ack_again(self, device: str, now: float) -> bool:
        """At most one ACK per device every STALE_ACK_INTERVAL_S for DELTAs already answered (resends, replays)."""
        if now - self._stale_acked.get(device, -self.STALE_ACK_INTERVAL_S) < self.STALE_ACK_INTERVAL_S:
            self.stats["stale_acks_suppressed"] += 1
            return False
        self._stale_acked[device] = now
        return True

    def _delta(self, device: str, header: Header, body: Delta, uplink_bytes: int, now: float) -> list[Publish]:
        delta, metrics = decode_update(self.plan, body)  # raises (before any state change) if it does not fit
        acks = self._ack_delta(device, header, now)  # sealed in the current run, which the device then joins
        if header.run != self._task_run.get(device):
            self._refuse(device, "old-run", f"DELTA of run {header.run}, not of the run of its TASK "
                                            f"({self._task_run.get(device)})")
            return acks
        if (device, header.round) in self._answered:
            self.stats["duplicate_rounds"] += 1
            log.warning("%s sent a second DELTA for round %d; keeping the first", device, header.round)
            return acks
        self._answered.add((device, header.round))
        self.stats["replies"] += 1
        self._replies.append(DeviceReply(device, header.round, header.model_version, delta, body.num_examples,
                                         metrics, uplink_bytes))
        return acks

    # --- secure aggregation (protocol/secagg.py) -------------------------------------------------------------
    def begin_secagg(self, round: int, model_version: int, devices: list[str], clip_norm: float,
                     noise_sigma: float = 0.0, degree: int | None = None, min_survivors: int = 0) -> None:
        """Open round `round`'s secure aggregation over `devices` (before their masked TASKs are sent): their
        stage messages are taken from now on, and the stages advance as each completes (secagg_close forces).
        min_survivors: fewer masked DELTAs fail the round before anything is revealed (distributed DP's noise is
        calibrated for that many)."""
        unknown = [d for d in devices if topics.name_id(d) not in self._names]
        if unknown:
            raise ValueError(f"not enrolled in fleet {self.fleet}: {', '.join(unknown)}")
        ctx = RoundContext(self._endpoint.fleet_id, self._current_run(new_task=True), round)
        self._secagg[round] = SecAggRound(self.plan, ctx, self._endpoint.devices,
                                          [topics.name_id(d) for d in devices], clip_norm, noise_sigma, degree=degree,
                                          min_survivors=min_survivors)
        self._secagg_version[round] = model_version
        self._secagg_bytes[round] = Counter()
        self._secagg_down[round] = Counter()

    def secagg_status(self, round: int) -> tuple[str, set[str]]:
        """The stage of round `round`'s secure aggregation and the devices whose message of that stage came
        ("" and nothing once it ended: take_secagg_outcomes says how)."""
        agg = self._secagg.get(round)
        if agg is None:
            return "", set()
        got = {"keys": agg.keys, "shares": agg.shares, "masked": agg.masked, "unmask": agg.reveals}[agg.stage]
        return agg.stage, {self._names[i] for i in got if i in self._names}

    def secagg_close(self, round: int, admitted: set[str] | None = None) -> list[Publish]:
        """End the current stage now (its deadline passed). For the masked stage, `admitted` (default: all that
        came) are the devices whose masked DELTA counts: the others are late, which makes them dropouts."""
        agg = self._secagg.get(round)
        if agg is None:
            return []
        if agg.stage == "masked" and admitted is not None:
            for i in [i for i in agg.masked if self._names.get(i) not in admitted]:
                del agg.masked[i]
                self._refuse(self._names.get(i, ""), "late", f"masked DELTA of round {round} after the round closed")
        return self._secagg_advance(agg, force=True)

    def take_secagg_outcomes(self) -> list[SecAggOutcome]:
        out, self._secagg_outcomes = self._secagg_outcomes, []
        return out

    def _secagg_message(self, device: str, header: Header, body, uplink_bytes: int, now: float) -> list[Publish]:
        out = self._ack_delta(device, header, now) if isinstance(body, MaskedDelta) else []  # it may stop resending
        agg = self._secagg.get(header.round)
        try:
            if agg is None or agg.ctx.run != header.run:
                raise ProtocolError("bad-stage", f"no secure aggregation open for round {header.round} of run "
                                                 f"{header.run}")
            handler = {MaskedDelta: agg.on_masked, SecAggKeys: agg.on_keys, SecAggShares: agg.on_shares,
                       SecAggReveal: agg.on_reveal}[type(body)]
            handler(header.device_id, body)
        except ProtocolError as exc:
            self._refuse(device, exc.reason, str(exc))
            return out
        self._secagg_bytes[header.round][device] += uplink_bytes
        if isinstance(body, MaskedDelta):
            self._answered.add((device, header.round))
            return out  # the masked stage closes when the round does (secagg_close)
        return out + self._secagg_advance(agg, force=False)

    def _secagg_advance(self, agg: SecAggRound, force: bool) -> list[Publish]:
        """Close the current stage if every expected device answered (or `force`) and send the next stage's
        messages; a finished or failed round becomes an outcome."""
        expected, got = {"keys": (agg.cohort, agg.keys), "shares": (agg.graph, agg.shares),
                         "masked": (agg.u2, agg.masked), "unmask": (agg.unmask, agg.reveals)}[agg.stage]
        if not force and not set(expected) <= set(got):
            return []
        round_ = agg.ctx.round
        try:
            if agg.stage == "unmask":
                self._secagg_end(agg, agg.finish(), "")
                return []
            bodies = {"keys": agg.close_keys, "shares": agg.close_shares, "masked": agg.close_masked}[agg.stage]()
        except ProtocolError as exc:
            log.warning("secure aggregation of round %d failed: %s", round_, exc)
            self._secagg_end(agg, None, str(exc))
            return []
        out = []
        for device_id, body in sorted(bodies.items()):
            frames = self._downlink(self._names[device_id], body, round_, self._secagg_version[round_])
            self._secagg_down[round_][self._names[device_id]] += sum(len(p.payload) for p in frames)
            out += frames
        return out

    def _secagg_end(self, agg: SecAggRound, result: SecAggSum | None, failure: str) -> None:
        round_ = agg.ctx.round
        self._secagg_outcomes.append(SecAggOutcome(round_, result, failure, tuple(agg.log),
                                                   dict(self._secagg_bytes.pop(round_, {})),
                                                   dict(self._secagg_down.pop(round_, {}))))
        del self._secagg[round_]
        self._secagg_version.pop(round_, None)

    def _request_missing(self, device: str, header: Header, idle: float, now: float) -> list[Publish]:
        out = []
        reassembler = self._reassembler(device)
        for source, transfer_id in reassembler.open_transfers():
            if now - self._transfer_seen.get((source, transfer_id), now) < idle:
                continue
            missing = reassembler.missing(source, transfer_id) or []
            for i in range(0, len(missing), 64):
                ack = Ack(MessageType.DELTA, AckStatus.MISSING_CHUNKS, 0, transfer_id, tuple(missing[i : i + 64]))
                out += self._downlink(device, ack, header.round, header.model_version)
                self.stats["missing_requests"] += 1
        return out
