"""Message types and their payload bodies (the plaintext inside an envelope), each a fixed little-endian layout.

Sizes and fields are specified in docs/protocol.md; each class's `LAYOUT` is the struct a C decoder mirrors.
Every `decode` raises ProtocolError on anything but an exact, well-formed body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

from fedtiny.protocol.delta import DEFAULT_LIMITS, DeltaEntry, DeltaLimits, decode_delta, encode_delta
from fedtiny.protocol.errors import ProtocolError


class MessageType(IntEnum):
    JOIN = 1
    TASK = 2
    GLOBAL_UPDATE = 3
    DELTA = 4
    ACK = 5
    STATUS = 6
    LEAVE = 7


class DeviceState(IntEnum):
    OFFLINE = 0  # sent only as the MQTT last will
    IDLE = 1
    TRAINING = 2
    UPLOADING = 3
    SLEEPING = 4


class AckStatus(IntEnum):
    OK = 0
    MISSING_CHUNKS = 1  # `missing` lists chunk indexes to resend
    REJECTED = 2
    BUSY = 3


# Capability bits in JOIN.features
FEATURE_MQTT5 = 0x0001
FEATURE_INFLATE = 0x0002  # can inflate zlib-compressed GLOBAL_UPDATE deltas (1 KiB window)
FEATURE_SECURE_AGGREGATION = 0x0004

# Task bits in TASK.task_flags
TASK_MASKED = 0x0001  # send the delta masked for secure aggregation (header flag MASKED)
TASK_COMPRESS_OK = 0x0002

MAX_TASK_CONFIG = 1024
MAX_ACK_MISSING = 64


def _unpack_exact(layout: struct.Struct, body: bytes, what: str) -> tuple:
    if len(body) < layout.size:
        raise ProtocolError("truncated", what)
    if len(body) > layout.size:
        raise ProtocolError("trailing-bytes", what)
    return layout.unpack(body)


@dataclass(frozen=True)
class Join:
    """Uplink: a device announces itself, what it can hold and which training plan it runs."""

    memory_budget_bytes: int
    flash_budget_bytes: int
    max_mqtt_payload: int
    features: int
    plan_version: int
    plan_hash: bytes  # SHA-256 of the training plan

    LAYOUT: ClassVar = struct.Struct("<IIIHHI32s")  # 52 bytes
    TYPE: ClassVar = MessageType.JOIN

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.memory_budget_bytes, self.flash_budget_bytes, self.max_mqtt_payload,
            self.features, 0, self.plan_version, self.plan_hash,
        )

    @classmethod
    def decode(cls, body: bytes) -> Join:
        mem, flash, mqtt, features, reserved, plan_version, plan_hash = _unpack_exact(cls.LAYOUT, body, "JOIN")
        if reserved:
            raise ProtocolError("bad-flags", "JOIN reserved field set")
        return cls(mem, flash, mqtt, features, plan_version, plan_hash)


@dataclass(frozen=True)
class Task:
    """Downlink (per device or broadcast): train this round on this plan with this configuration."""

    plan_version: int
    plan_hash: bytes
    local_steps: int
    batch_size: int
    learning_rate: float
    clip_norm: float  # 0 = no clipping
    deadline_s: int  # seconds after receipt by which the DELTA must be sent
    max_mqtt_payload: int  # chunk size the device should use for its uplink
    task_flags: int
    config: bytes = b""  # opaque plan-specific settings, at most MAX_TASK_CONFIG bytes

    LAYOUT: ClassVar = struct.Struct("<I32sHHffIIHH")  # 60 bytes, then config
    TYPE: ClassVar = MessageType.TASK

    def encode(self) -> bytes:
        if len(self.config) > MAX_TASK_CONFIG:
            raise ValueError("TASK config too long")
        return self.LAYOUT.pack(
            self.plan_version, self.plan_hash, self.local_steps, self.batch_size, self.learning_rate,
            self.clip_norm, self.deadline_s, self.max_mqtt_payload, self.task_flags, len(self.config),
        ) + self.config

    @classmethod
    def decode(cls, body: bytes) -> Task:
        if len(body) < cls.LAYOUT.size:
            raise ProtocolError("truncated", "TASK")
        *fields_, config_len = cls.LAYOUT.unpack_from(body)
        if config_len > MAX_TASK_CONFIG:
            raise ProtocolError("oversized", "TASK config")
        config = body[cls.LAYOUT.size :]
        if len(config) != config_len:
            raise ProtocolError("truncated" if len(config) < config_len else "trailing-bytes", "TASK config")
        return cls(*fields_, config=bytes(config))


@dataclass(frozen=True)
class GlobalUpdate:
    """Downlink, encrypted: the global tensors that changed since `base_model_version` (header has the new one)."""

    base_model_version: int
    entries: list[DeltaEntry] = field(default_factory=list)
    # Not on the wire: how encode() writes the blob by default (None: deflated when that makes it smaller). A
    # coordinator sends False to a device whose JOIN did not announce FEATURE_INFLATE (a C node does not inflate).
    compress: bool | None = field(default=None, compare=False)

    LAYOUT: ClassVar = struct.Struct("<I")
    TYPE: ClassVar = MessageType.GLOBAL_UPDATE

    def encode(self, compress: bool | None = None) -> bytes:
        compress = self.compress if compress is None else compress
        return self.LAYOUT.pack(self.base_model_version) + encode_delta(self.entries, compress)

    @classmethod
    def decode(cls, body: bytes, limits: DeltaLimits = DEFAULT_LIMITS) -> GlobalUpdate:
        if len(body) < cls.LAYOUT.size:
            raise ProtocolError("truncated", "GLOBAL_UPDATE")
        (base,) = cls.LAYOUT.unpack_from(body)
        return cls(base, decode_delta(body[cls.LAYOUT.size :], limits))


@dataclass(frozen=True)
class Delta:
    """Uplink, encrypted: the device's update for the round in the header (masked if header flag MASKED)."""

    num_examples: int
    train_loss: float
    entries: list[DeltaEntry] = field(default_factory=list)

    LAYOUT: ClassVar = struct.Struct("<If")
    TYPE: ClassVar = MessageType.DELTA

    def encode(self, compress: bool | None = False) -> bytes:
        # Devices do not deflate by default: a deflate compressor needs far more RAM than a Cortex-M spares.
        return self.LAYOUT.pack(self.num_examples, self.train_loss) + encode_delta(self.entries, compress)

    @classmethod
    def decode(cls, body: bytes, limits: DeltaLimits = DEFAULT_LIMITS) -> Delta:
        if len(body) < cls.LAYOUT.size:
            raise ProtocolError("truncated", "DELTA")
        num_examples, loss = cls.LAYOUT.unpack_from(body)
        return cls(num_examples, loss, decode_delta(body[cls.LAYOUT.size :], limits))


@dataclass(frozen=True)
class Ack:
    """Either direction: acknowledges message `acked_seq`; may ask for missing chunks of `transfer_id`."""

    acked_type: int
    status: int
    acked_seq: int
    transfer_id: int = 0
    missing: tuple[int, ...] = ()

    LAYOUT: ClassVar = struct.Struct("<BBHII")  # 12 bytes, then u32 * n_missing
    TYPE: ClassVar = MessageType.ACK

    def encode(self) -> bytes:
        if len(self.missing) > MAX_ACK_MISSING:
            raise ValueError(f"at most {MAX_ACK_MISSING} missing indexes per ACK")
        head = self.LAYOUT.pack(self.acked_type, self.status, len(self.missing), self.acked_seq, self.transfer_id)
        return head + struct.pack(f"<{len(self.missing)}I", *self.missing)

    @classmethod
    def decode(cls, body: bytes) -> Ack:
        if len(body) < cls.LAYOUT.size:
            raise ProtocolError("truncated", "ACK")
        acked_type, status, n_missing, acked_seq, transfer_id = cls.LAYOUT.unpack_from(body)
        if n_missing > MAX_ACK_MISSING:
            raise ProtocolError("oversized", "ACK missing list")
        if len(body) != cls.LAYOUT.size + 4 * n_missing:
            raise ProtocolError("truncated" if len(body) < cls.LAYOUT.size + 4 * n_missing else "trailing-bytes", "ACK")
        missing = struct.unpack_from(f"<{n_missing}I", body, cls.LAYOUT.size)
        return cls(acked_type, status, acked_seq, transfer_id, tuple(missing))


@dataclass(frozen=True)
class Status:
    """Uplink heartbeat on the status topic (retained); state OFFLINE is the pre-signed last will."""

    state: int
    battery_pct: int  # 255 = unknown / mains powered
    uptime_s: int
    free_memory_bytes: int
    next_wake_s: int  # 0 = awake

    LAYOUT: ClassVar = struct.Struct("<BBHIII")  # 16 bytes
    TYPE: ClassVar = MessageType.STATUS

    def encode(self) -> bytes:
        return self.LAYOUT.pack(
            self.state, self.battery_pct, 0, self.uptime_s, self.free_memory_bytes, self.next_wake_s
        )

    @classmethod
    def decode(cls, body: bytes) -> Status:
        state, battery, reserved, uptime, free, wake = _unpack_exact(cls.LAYOUT, body, "STATUS")
        if reserved:
            raise ProtocolError("bad-flags", "STATUS reserved field set")
        return cls(state, battery, uptime, free, wake)


@dataclass(frozen=True)
class Leave:
    """Uplink: the device leaves the fleet (reason 0 = normal, 1 = low battery, 2 = reprovisioning)."""

    reason: int

    LAYOUT: ClassVar = struct.Struct("<BBH")  # 4 bytes
    TYPE: ClassVar = MessageType.LEAVE

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.reason, 0, 0)

    @classmethod
    def decode(cls, body: bytes) -> Leave:
        reason, r1, r2 = _unpack_exact(cls.LAYOUT, body, "LEAVE")
        if r1 or r2:
            raise ProtocolError("bad-flags", "LEAVE reserved field set")
        return cls(reason)


BODY_TYPES = {cls.TYPE: cls for cls in (Join, Task, GlobalUpdate, Delta, Ack, Status, Leave)}
Body = Join | Task | GlobalUpdate | Delta | Ack | Status | Leave


def decode_body(msg_type: int, body: bytes, limits: DeltaLimits = DEFAULT_LIMITS) -> Body:
    """The body of a message; `limits` bounds the delta blob of a DELTA or GLOBAL_UPDATE."""
    body_type = BODY_TYPES.get(msg_type)
    if body_type is None:
        raise ProtocolError("bad-type", f"message type {msg_type}")
    if body_type in (GlobalUpdate, Delta):
        return body_type.decode(body, limits)
    return body_type.decode(body)
