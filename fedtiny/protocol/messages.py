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
    # secure aggregation stages (fedtiny/protocol/secagg.py, docs/protocol.md "Secure aggregation")
    SECAGG_KEYS = 8  # up: the round's two X25519 public keys and a commitment to the self-mask seed, signed
    SECAGG_PEERS = 9  # down: the device's neighbours' signed keys, the cohort size and the threshold
    SECAGG_SHARES = 10  # up: Shamir shares of the device's secrets, each encrypted to one neighbour
    SECAGG_RELAY = 11  # down: the shares the device's neighbours encrypted to it
    SECAGG_UNMASK = 12  # down: which of the device's neighbours survived and which dropped
    SECAGG_REVEAL = 13  # up, encrypted: the shares the coordinator needs to unmask the sum


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


# --- secure aggregation stages (the protocol logic is fedtiny/protocol/secagg.py) ------------------------------

SECAGG_PUBLIC_KEY = 32
SECAGG_COMMIT = 32  # BLAKE2b-256 of the self-mask seed
SECAGG_SIGNATURE = 64
SECAGG_SHARE_CIPHERTEXT = 76  # from u32 | to u32 | index u16 | reserved u16 | 3 x 16-byte shares, + 16-byte tag
SECAGG_REVEAL_SHARE = 32
SECAGG_MAX_NEIGHBOURS = 64  # the neighbour graph's largest degree: bounds every stage's message


@dataclass(frozen=True)
class SecAggKeys:
    """Uplink: a device's keys for one round: c_pk (encrypts shares), s_pk (pairwise masks), the commitment to its
    self-mask seed, and its EdDSA signature over them (secagg.keys_message) so the coordinator cannot swap them."""

    c_pk: bytes
    s_pk: bytes
    b_commit: bytes
    signature: bytes

    LAYOUT: ClassVar = struct.Struct("<32s32s32s64s")  # 160 bytes
    TYPE: ClassVar = MessageType.SECAGG_KEYS

    def encode(self) -> bytes:
        return self.LAYOUT.pack(self.c_pk, self.s_pk, self.b_commit, self.signature)

    @classmethod
    def decode(cls, body: bytes) -> SecAggKeys:
        return cls(*_unpack_exact(cls.LAYOUT, body, "SECAGG_KEYS"))


@dataclass(frozen=True)
class SecAggPeer:
    device_id: int
    keys: SecAggKeys


def _counted(body: bytes, what: str, head: struct.Struct, n_index: int, entry_size: int) -> tuple:
    """The head fields of a body of `head` then n entries of entry_size bytes (n = field n_index), checked exactly."""
    if len(body) < head.size:
        raise ProtocolError("truncated", what)
    fields_ = head.unpack_from(body)
    n = fields_[n_index]
    if n > SECAGG_MAX_NEIGHBOURS:
        raise ProtocolError("oversized", f"{what}: {n} entries > {SECAGG_MAX_NEIGHBOURS}")
    expected = head.size + n * entry_size
    if len(body) != expected:
        raise ProtocolError("truncated" if len(body) < expected else "trailing-bytes", what)
    return fields_


_PEERS_HEAD = struct.Struct("<HHHH")  # cohort | threshold | n | reserved
_PEER_ENTRY = struct.Struct("<I160s")
_SHARES_HEAD = struct.Struct("<HH")  # n | reserved
_SHARE_ENTRY = struct.Struct(f"<I{SECAGG_SHARE_CIPHERTEXT}s")
_REVEAL_ENTRY = struct.Struct(f"<IBBH{SECAGG_REVEAL_SHARE}s")  # about | kind | reserved | index | share


@dataclass(frozen=True)
class SecAggPeers:
    """Downlink: the round's cohort size (after the keys stage), the Shamir threshold, and the device's neighbours
    with the keys each signed (verified by the device against the neighbour's identity)."""

    cohort: int
    threshold: int
    peers: tuple[SecAggPeer, ...]

    TYPE: ClassVar = MessageType.SECAGG_PEERS

    def encode(self) -> bytes:
        return _PEERS_HEAD.pack(self.cohort, self.threshold, len(self.peers), 0) + b"".join(
            _PEER_ENTRY.pack(p.device_id, p.keys.encode()) for p in self.peers)

    @classmethod
    def decode(cls, body: bytes) -> SecAggPeers:
        cohort, threshold, n, reserved = _counted(body, "SECAGG_PEERS", _PEERS_HEAD, 2, _PEER_ENTRY.size)
        if reserved:
            raise ProtocolError("bad-flags", "SECAGG_PEERS reserved field set")
        peers = tuple(SecAggPeer(i, SecAggKeys.decode(k))
                      for i, k in _PEER_ENTRY.iter_unpack(body[_PEERS_HEAD.size:]))
        return cls(cohort, threshold, peers)


@dataclass(frozen=True)
class SecAggShares:
    """Uplink (SECAGG_SHARES: to whom each ciphertext goes) or downlink (SECAGG_RELAY, same layout: from whom each
    came): Shamir shares encrypted pairwise, which the coordinator relays and cannot read."""

    shares: tuple[tuple[int, bytes], ...]  # (peer device id, ciphertext)

    TYPE: ClassVar = MessageType.SECAGG_SHARES

    def encode(self) -> bytes:
        return _SHARES_HEAD.pack(len(self.shares), 0) + b"".join(_SHARE_ENTRY.pack(i, c) for i, c in self.shares)

    @classmethod
    def decode(cls, body: bytes):
        n, reserved = _counted(body, cls.TYPE.name, _SHARES_HEAD, 0, _SHARE_ENTRY.size)
        if reserved:
            raise ProtocolError("bad-flags", f"{cls.TYPE.name} reserved field set")
        return cls(tuple(_SHARE_ENTRY.iter_unpack(body[_SHARES_HEAD.size:])))


@dataclass(frozen=True)
class SecAggRelay(SecAggShares):
    TYPE: ClassVar = MessageType.SECAGG_RELAY


@dataclass(frozen=True)
class SecAggUnmask:
    """Downlink: of the device's neighbours that shared keys, those whose masked DELTA arrived (survivors) and
    those whose did not (dropped)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    TYPE: ClassVar = MessageType.SECAGG_UNMASK

    def encode(self) -> bytes:
        ids = self.survivors + self.dropped
        return _SHARES_HEAD.pack(len(self.survivors), len(self.dropped)) + struct.pack(f"<{len(ids)}I", *ids)

    @classmethod
    def decode(cls, body: bytes) -> SecAggUnmask:
        if len(body) < _SHARES_HEAD.size:
            raise ProtocolError("truncated", "SECAGG_UNMASK")
        n_s, n_d = _SHARES_HEAD.unpack_from(body)
        if n_s + n_d > SECAGG_MAX_NEIGHBOURS:
            raise ProtocolError("oversized", "SECAGG_UNMASK")
        expected = _SHARES_HEAD.size + 4 * (n_s + n_d)
        if len(body) != expected:
            raise ProtocolError("truncated" if len(body) < expected else "trailing-bytes", "SECAGG_UNMASK")
        ids = struct.unpack_from(f"<{n_s + n_d}I", body, _SHARES_HEAD.size)
        return cls(tuple(ids[:n_s]), tuple(ids[n_s:]))


REVEAL_SELF_MASK, REVEAL_PAIRWISE_KEY = 1, 2  # SecAggReveal entry kinds


@dataclass(frozen=True)
class SecAggReveal:
    """Uplink, encrypted: per neighbour one share: of its self-mask seed if it survived (kind 1, 16 bytes and 16
    zero bytes), of its pairwise-mask key if it dropped (kind 2, 32 bytes); never both for one neighbour."""

    entries: tuple[tuple[int, int, int, bytes], ...]  # (about device id, kind, Shamir index, share 32 B)

    TYPE: ClassVar = MessageType.SECAGG_REVEAL

    def encode(self) -> bytes:
        return _SHARES_HEAD.pack(len(self.entries), 0) + b"".join(
            _REVEAL_ENTRY.pack(about, kind, 0, index, share) for about, kind, index, share in self.entries)

    @classmethod
    def decode(cls, body: bytes) -> SecAggReveal:
        n, reserved = _counted(body, "SECAGG_REVEAL", _SHARES_HEAD, 0, _REVEAL_ENTRY.size)
        if reserved:
            raise ProtocolError("bad-flags", "SECAGG_REVEAL reserved field set")
        entries = []
        for about, kind, r, index, share in _REVEAL_ENTRY.iter_unpack(body[_SHARES_HEAD.size:]):
            if r or kind not in (REVEAL_SELF_MASK, REVEAL_PAIRWISE_KEY):
                raise ProtocolError("bad-flags", f"SECAGG_REVEAL entry kind {kind}")
            entries.append((about, kind, index, share))
        return cls(tuple(entries))


@dataclass(frozen=True)
class MaskedDelta:
    """Uplink, encrypted, header flag MASKED (type DELTA): the device's clipped integer delta plus its masks in
    Z/2^k, k per trainable buffer (secagg.modulus_bits), every element of every buffer in plan order, each buffer's
    k-bit values packed LSB first and zero-padded to 4 bytes. Meaningful only summed over the cohort. The metrics
    travel in the clear beside it, as in a plain DELTA: loss, accuracy and the personalised accuracy (negative: the
    device holds no samples out)."""

    num_examples: int
    train_loss: float
    accuracy: float
    cohort: int  # the cohort size the moduli were chosen for (SECAGG_PEERS.cohort)
    bits: tuple[int, ...]  # k per trainable buffer
    packed: bytes
    personal_accuracy: float = -1.0

    # num_examples | loss | accuracy | personal_accuracy | cohort | n_buffers, then k u8 each
    HEAD: ClassVar = struct.Struct("<IfffHH")
    TYPE: ClassVar = MessageType.DELTA

    def encode(self) -> bytes:
        bits = bytes(self.bits)
        return self.HEAD.pack(self.num_examples, self.train_loss, self.accuracy, self.personal_accuracy, self.cohort,
                              len(bits)) + bits + bytes(-(self.HEAD.size + len(bits)) % 4) + self.packed

    @classmethod
    def decode(cls, body: bytes, max_buffers: int = 256) -> MaskedDelta:
        if len(body) < cls.HEAD.size:
            raise ProtocolError("truncated", "masked DELTA")
        num_examples, loss, accuracy, personal, cohort, n = cls.HEAD.unpack_from(body)
        if n > max_buffers:
            raise ProtocolError("oversized", "masked DELTA buffers")
        start = cls.HEAD.size + n + (-(cls.HEAD.size + n) % 4)
        if len(body) < start:
            raise ProtocolError("truncated", "masked DELTA")
        bits = tuple(body[cls.HEAD.size : cls.HEAD.size + n])
        if any(b < 1 or b > 32 for b in bits) or any(body[cls.HEAD.size + n : start]):
            raise ProtocolError("bad-entry", "masked DELTA moduli")
        return cls(num_examples, loss, accuracy, cohort, bits, bytes(body[start:]), personal)


BODY_TYPES = {cls.TYPE: cls for cls in (Join, Task, GlobalUpdate, Delta, Ack, Status, Leave, SecAggKeys,
                                         SecAggPeers, SecAggShares, SecAggRelay, SecAggUnmask, SecAggReveal)}
Body = Join | Task | GlobalUpdate | Delta | Ack | Status | Leave | SecAggKeys | SecAggPeers | SecAggShares | \
    SecAggUnmask | SecAggReveal | MaskedDelta


def decode_body(msg_type: int, body: bytes, limits: DeltaLimits = DEFAULT_LIMITS, masked: bool = False) -> Body:
    """The body of a message; `limits` bounds the delta blob of a DELTA or GLOBAL_UPDATE; `masked` (header flag
    MASKED) makes a DELTA a MaskedDelta."""
    body_type = BODY_TYPES.get(msg_type)
    if body_type is None:
        raise ProtocolError("bad-type", f"message type {msg_type}")
    if masked and body_type is Delta:
        masked_delta = MaskedDelta.decode(body, limits.max_entries)
        if len(masked_delta.packed) > 4 * limits.max_elements:
            raise ProtocolError("oversized", "masked DELTA values")
        return masked_delta
    if body_type in (GlobalUpdate, Delta):
        return body_type.decode(body, limits)
    return body_type.decode(body)
