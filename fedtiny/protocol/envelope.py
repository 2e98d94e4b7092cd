"""Signed, end-to-end encrypted envelopes around message bodies, and replay protection. Sans-IO.

    envelope = header (32 bytes) | payload (payload_len bytes) | EdDSA signature (64 bytes)

Protocol version 2: every primitive is one that Monocypher 4.0.3 (the node's C library) has, so a
microcontroller runs the same protocol with one small, vetted library (docs/protocol.md, "Why version 2").

The signature covers header + payload and is made by the sender's identity key (the device's for uplinks, the
coordinator's for downlinks), so a broker that can rewrite topics cannot forge or alter a message. It is
Monocypher's EdDSA: Ed25519's curve and equations with BLAKE2b-512 in place of SHA-512 (not Ed25519: other
Ed25519 libraries reject it); the host signs and verifies through pymonocypher, the registry binding of the
same library. DELTA and GLOBAL_UPDATE payloads are ChaCha20-Poly1305 (RFC 8439) ciphertext (plaintext +
16-byte tag) under a per-direction key, derived like HKDF (RFC 5869) with keyed BLAKE2b in place of HMAC-SHA256:

    prk   = BLAKE2b-512(key="fedtiny/v2", message=X25519(own kex key, peer kex key))                 extract
    key   = BLAKE2b-256(key=prk, message="fedtiny/v2/e2e" | fleet_id u32 | device_id u32 | direction u8 | 01)
    nonce = round u32 | seq u32 | direction u8 | run u16 | 1 zero byte        (direction 0 = up, 1 = down)
    aad   = the 32 header bytes

A sender never reuses (run, round, seq) for a direction, so a nonce never repeats under a key; the receiver's
ReplayGuard holds it to that. Devices never reuse a seq (it is persisted before use); the coordinator persists
its seqs in blocks before use, and a coordinator that lost its state starts a new run. Every rejection raises
ProtocolError and leaves the endpoint's state untouched.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntFlag

import monocypher
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.delta import DEFAULT_LIMITS, DeltaLimits
from fedtiny.protocol.messages import Body, MaskedDelta, MessageType, decode_body

MAGIC = b"FT"
PROTOCOL_VERSION = 2
KDF_SALT = b"fedtiny/v2"
KDF_INFO = b"fedtiny/v2/e2e"
HEADER = struct.Struct("<2sBBHHIIIIII")
HEADER_SIZE = HEADER.size  # 32
SIGNATURE_SIZE = 64
TAG_SIZE = 16
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
UP, DOWN = 0, 1


class Flags(IntFlag):
    DOWNLINK = 0x0001  # sent by the coordinator
    ENCRYPTED = 0x0002  # payload is ChaCha20-Poly1305 ciphertext
    MASKED = 0x0004  # DELTA values carry secure-aggregation masks (meaningful only in the sum)
    LAST_WILL = 0x0008  # STATUS pre-signed at connect and published by the broker when the device vanishes


KNOWN_FLAGS = int(Flags.DOWNLINK | Flags.ENCRYPTED | Flags.MASKED | Flags.LAST_WILL)
ENCRYPTED_TYPES = {MessageType.DELTA, MessageType.GLOBAL_UPDATE, MessageType.SECAGG_REVEAL}
UPLINK_TYPES = {MessageType.JOIN, MessageType.DELTA, MessageType.ACK, MessageType.STATUS, MessageType.LEAVE,
                MessageType.SECAGG_KEYS, MessageType.SECAGG_SHARES, MessageType.SECAGG_REVEAL}
DOWNLINK_TYPES = {MessageType.TASK, MessageType.GLOBAL_UPDATE, MessageType.ACK, MessageType.SECAGG_PEERS,
                  MessageType.SECAGG_RELAY, MessageType.SECAGG_UNMASK}


@dataclass(frozen=True)
class Header:
    type: int
    flags: int
    fleet_id: int
    device_id: int  # the device sending an uplink or addressed by a downlink (0 = broadcast)
    round: int
    model_version: int
    seq: int
    payload_len: int
    run: int = 0  # the coordinator's run (see ReplayGuard): a coordinator with a fresh database starts a new one

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, PROTOCOL_VERSION, self.type, self.flags, self.run, self.fleet_id, self.device_id,
            self.round, self.model_version, self.seq, self.payload_len,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        if len(raw) < HEADER_SIZE:
            raise ProtocolError("truncated", "header")
        magic, version, msg_type, flags, run, *rest = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ProtocolError("bad-magic", "not a fedtiny message")
        if version != PROTOCOL_VERSION:
            raise ProtocolError("bad-version", f"protocol version {version}")
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError("bad-flags", f"flags {flags:#x}")
        if msg_type not in MessageType._value2member_map_:
            raise ProtocolError("bad-type", f"message type {msg_type}")
        return cls(msg_type, flags, *rest, run=run)

    @property
    def direction(self) -> int:
        return DOWN if self.flags & Flags.DOWNLINK else UP

    @property
    def position(self) -> tuple[int, int, int]:
        """Where the message stands in its sender's stream: (run, round, seq), compared in that order."""
        return self.run, self.round, self.seq


@dataclass(frozen=True)
class PublicIdentity:
    """What a peer publishes: EdDSA (BLAKE2b) verify key and X25519 key, 32 raw bytes each."""

    sign: bytes
    kex: bytes

    def to_bytes(self) -> bytes:
        return self.sign + self.kex

    @classmethod
    def from_bytes(cls, raw: bytes) -> PublicIdentity:
        if len(raw) != 64:
            raise ValueError("a public identity is 64 bytes")
        return cls(bytes(raw[:32]), bytes(raw[32:]))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if signature is this identity's EdDSA signature of message (crypto_eddsa_check)."""
        return monocypher.signature_check(signature, self.sign, message)


class Identity:
    """A private identity: an EdDSA (BLAKE2b) signing seed + an X25519 key agreement key."""

    def __init__(self, sign_seed: bytes, kex_key: X25519PrivateKey) -> None:
        if len(sign_seed) != 32:
            raise ValueError("an EdDSA seed is 32 bytes")
        # crypto_eddsa_key_pair(seed) -> secret key = seed | public key. pymonocypher deprecates passing the bare
        # seed to compute_signing_public_key (it wants the 64-byte key it generates), but that is the one call
        # that derives the public key from a stored seed; signing then takes the full 64-byte key.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            sign_public = monocypher.compute_signing_public_key(bytes(sign_seed))
        self._sign_secret = bytes(sign_seed) + sign_public
        self.kex_key = kex_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(secrets.token_bytes(32), X25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity for tests and fixtures only; provisioning uses generate()."""
        return cls.from_bytes(hashlib.sha256(b"eddsa:" + seed).digest() + hashlib.sha256(b"x25519:" + seed).digest())

    def to_bytes(self) -> bytes:
        """64 raw bytes, EdDSA seed then X25519 scalar: what a device stores in its key slot."""
        raw = serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return self._sign_secret[:32] + self.kex_key.private_bytes(*raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != 64:
            raise ValueError("a private identity is 64 bytes")
        return cls(bytes(raw[:32]), X25519PrivateKey.from_private_bytes(raw[32:]))

    @property
    def public(self) -> PublicIdentity:
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return PublicIdentity(self._sign_secret[32:], self.kex_key.public_key().public_bytes(*raw))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte EdDSA (BLAKE2b) signature of message (crypto_eddsa_sign; deterministic)."""
        return monocypher.signature_sign(self._sign_secret, message)


def derive_key(own: Identity, peer: PublicIdentity, fleet_id: int, device_id: int, direction: int) -> bytes:
    """The ChaCha20-Poly1305 key of one direction between a device and the coordinator (either end gets it)."""
    shared = own.kex_key.exchange(X25519PublicKey.from_public_bytes(peer.kex))
    prk = hashlib.blake2b(shared, digest_size=64, key=KDF_SALT).digest()
    info = KDF_INFO + struct.pack("<IIB", fleet_id, device_id, direction)
    return hashlib.blake2b(info + b"\x01", digest_size=32, key=prk).digest()


def nonce(round_: int, seq: int, direction: int, run: int) -> bytes:
    return struct.pack("<IIBHx", round_, seq, direction, run)


@dataclass(frozen=True)
class Received:
    header: Header
    body: Body
    digest: bytes = b""  # SHA-256 of the envelope: what the replay window records (see _Endpoint.commit)


class ReplayGuard:
    """Per (device, direction, stream) the last accepted position (run, round, seq), and digests of the last
    `window` messages.

    A message must be strictly newer than the last accepted one; an older position whose bytes equal a
    recently accepted message is a QoS 1 duplicate (dropped quietly), anything else older is a replay or stale.
    Streams keep heartbeats and last wills, which travel on other topics, from reordering against data.
    """

    def __init__(self, window: int = 16) -> None:
        self.window = window
        self._last: dict[tuple, tuple[int, int]] = {}
        self._recent: dict[tuple, OrderedDict] = {}

    DATA, STATUS, LAST_WILL = 0, 1, 2  # streams

    @staticmethod
    def stream_key(header: Header) -> tuple:
        if header.type == MessageType.STATUS:
            stream = ReplayGuard.LAST_WILL if header.flags & Flags.LAST_WILL else ReplayGuard.STATUS
        else:
            stream = ReplayGuard.DATA
        return header.device_id, header.direction, stream

    def is_duplicate(self, header: Header, digest: bytes) -> bool:
        """True for a duplicate; raises ProtocolError for a replay; False for a new message. Changes nothing."""
        key = self.stream_key(header)
        last = self._last.get(key)
        position = header.position
        if last is None or position > last:
            return False
        seen = self._recent.get(key, {}).get(position)
        if seen == digest:
            return True
        if seen is not None:
            raise ProtocolError("replay", f"different message at the same (run, round, seq) {position}")
        raise ProtocolError("stale", f"(run, round, seq) {position} is not newer than {last}")

    def export(self) -> list[list[int]]:
        """The last accepted position of every stream, as JSON-able rows, for a checkpoint. The recent digests
        are left out: after a restore an old QoS 1 duplicate reads as stale instead of duplicate, still refused."""
        return [[*key, *position] for key, position in sorted(self._last.items())]

    def restore(self, rows: list[list[int]], data_only: bool = False) -> None:
        """Take back an export, never moving a stream backwards; `data_only` leaves the STATUS streams out."""
        for device_id, direction, stream, run, round_, seq in rows:
            if data_only and stream != ReplayGuard.DATA:
                continue
            key = (int(device_id), int(direction), int(stream))
            self._last[key] = max(self._last.get(key, (0, 0, 0)), (int(run), int(round_), int(seq)))

    def commit(self, header: Header, digest: bytes) -> None:
        key = self.stream_key(header)
        self._last[key] = header.position
        recent = self._recent.setdefault(key, OrderedDict())
        recent[header.position] = digest
        while len(recent) > self.window:
            recent.popitem(last=False)


class _Endpoint:
    direction: int  # the direction this endpoint sends in

    def __init__(self, fleet_id: int, identity: Identity, max_message_bytes: int) -> None:
        self.fleet_id = fleet_id
        self.identity = identity
        self.max_message_bytes = max_message_bytes
        self.delta_limits: DeltaLimits = DEFAULT_LIMITS  # a session that knows the plan sets its bounds
        self.replay = ReplayGuard()
        self.next_seq: dict[int, int] = {}  # per addressed device id; persist across reboots
        self._keys: dict[tuple, bytes] = {}

    def _peer(self, device_id: int) -> PublicIdentity:
        raise NotImplementedError

    def _key(self, device_id: int, direction: int) -> bytes:
        cache_key = (device_id, direction)
        if cache_key not in self._keys:
            peer = self._peer(device_id)
            self._keys[cache_key] = derive_key(self.identity, peer, self.fleet_id, device_id, direction)
        return self._keys[cache_key]

    def _seal(self, body: Body, device_id: int, round_: int, model_version: int, seq: int | None, flags: int,
              run: int) -> bytes:
        msg_type = body.TYPE
        allowed = DOWNLINK_TYPES if self.direction == DOWN else UPLINK_TYPES
        if msg_type not in allowed:
            raise ValueError(f"{msg_type.name} is not sent in this direction")
        if flags & ~int(Flags.MASKED | Flags.LAST_WILL):
            raise ValueError("only MASKED and LAST_WILL may be passed; the rest follows from type and role")
        if bool(flags & Flags.MASKED) != isinstance(body, MaskedDelta):
            raise ValueError("a MaskedDelta is sent with flag MASKED, and nothing else is")
        if seq is None:
            seq = self.next_seq.get(device_id, 0)
        self.next_seq[device_id] = max(self.next_seq.get(device_id, 0), seq + 1)
        plaintext = body.encode()
        flags |= Flags.DOWNLINK if self.direction == DOWN else 0
        if msg_type in ENCRYPTED_TYPES:
            if device_id == 0:
                raise ValueError("encrypted messages are per device, never broadcast")
            flags |= Flags.ENCRYPTED
        payload_len = len(plaintext) + (TAG_SIZE if flags & Flags.ENCRYPTED else 0)
        header = Header(msg_type, int(flags), self.fleet_id, device_id, round_, model_version, seq, payload_len,
                        run).pack()
        if flags & Flags.ENCRYPTED:
            aead = ChaCha20Poly1305(self._key(device_id, self.direction))
            payload = aead.encrypt(nonce(round_, seq, self.direction, run), plaintext, header)
        else:
            payload = plaintext
        signed = header + payload
        if len(signed) + SIGNATURE_SIZE > self.max_message_bytes:
            raise ValueError("message larger than max_message_bytes")
        return signed + self.identity.sign(signed)

    def _accepts(self, header: Header) -> None:
        raise NotImplementedError

    def open(self, raw: bytes, commit: bool = True) -> Received | None:
        """Verify, decrypt and decode one envelope; None for a QoS 1 duplicate. Raises only ProtocolError.
        With commit=False the replay window does not record it until commit(received): for a receiver that
        checks the body further and must leave its state unchanged when it refuses it."""
        raw = bytes(raw)
        if len(raw) > self.max_message_bytes:
            raise ProtocolError("oversized", f"{len(raw)} bytes")
        header = Header.unpack(raw)
        if header.fleet_id != self.fleet_id:
            raise ProtocolError("wrong-fleet", f"fleet id {header.fleet_id:#010x}")
        expected = HEADER_SIZE + header.payload_len + SIGNATURE_SIZE
        if len(raw) != expected:
            raise ProtocolError("truncated" if len(raw) < expected else "trailing-bytes", "envelope length")
        self._accepts(header)
        msg_type = MessageType(header.type)
        allowed = DOWNLINK_TYPES if header.direction == DOWN else UPLINK_TYPES
        if msg_type not in allowed:
            raise ProtocolError("bad-direction", f"{msg_type.name} in this direction")
        encrypted = bool(header.flags & Flags.ENCRYPTED)
        if encrypted != (msg_type in ENCRYPTED_TYPES):
            raise ProtocolError("bad-flags", f"{msg_type.name} must {'' if not encrypted else 'not '}be encrypted")
        if header.flags & Flags.MASKED and msg_type != MessageType.DELTA:
            raise ProtocolError("bad-flags", "MASKED only on DELTA")
        if header.flags & Flags.LAST_WILL and msg_type != MessageType.STATUS:
            raise ProtocolError("bad-flags", "LAST_WILL only on STATUS")
        if encrypted and header.device_id == 0:
            raise ProtocolError("bad-flags", "encrypted broadcast")

        signed, signature = raw[:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]
        sender = self._sender(header)
        if not sender.verify(signature, signed):
            raise ProtocolError("bad-signature", "signature does not verify")
        digest = hashlib.sha256(raw).digest()
        if self.replay.is_duplicate(header, digest):
            return None
        payload = signed[HEADER_SIZE:]
        if encrypted:
            aead = ChaCha20Poly1305(self._key(header.device_id, header.direction))
            try:
                payload = aead.decrypt(nonce(header.round, header.seq, header.direction, header.run), payload,
                                       signed[:HEADER_SIZE])
            except InvalidTag:
                raise ProtocolError("bad-ciphertext", "authentication tag does not verify") from None
        received = Received(header, decode_body(header.type, payload, self.delta_limits,
                                                masked=bool(header.flags & Flags.MASKED)), digest)
        if commit:
            self.commit(received)
        return received

    def commit(self, received: Received) -> None:
        """Record an opened message in the replay window: from now on it is a duplicate, anything older stale."""
        self.replay.commit(received.header, received.digest)

    def _sender(self, header: Header) -> PublicIdentity:
        raise NotImplementedError


class DeviceEndpoint(_Endpoint):
    """A device's side: seals uplinks, opens downlinks addressed to it or broadcast."""

    direction = UP

    def __init__(
        self, fleet_id: int, device_id: int, identity: Identity, coordinator: PublicIdentity,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        super().__init__(fleet_id, identity, max_message_bytes)
        self.device_id = device_id
        self.coordinator = coordinator

    def _peer(self, device_id: int) -> PublicIdentity:
        return self.coordinator

    def _sender(self, header: Header) -> PublicIdentity:
        return self.coordinator

    def _accepts(self, header: Header) -> None:
        if header.direction != DOWN:
            raise ProtocolError("bad-direction", "a device only accepts downlinks")
        if header.device_id not in (self.device_id, 0):
            raise ProtocolError("wrong-device", f"addressed to {header.device_id:#010x}")

    def seal(self, body: Body, *, round: int, model_version: int, seq: int | None = None, flags: int = 0,
             run: int = 0) -> bytes:
        return self._seal(body, self.device_id, round, model_version, seq, flags, run)


class CoordinatorEndpoint(_Endpoint):
    """The coordinator's side: seals downlinks (device_id 0 = broadcast), opens uplinks of enrolled devices."""

    direction = DOWN

    def __init__(
        self, fleet_id: int, identity: Identity, devices: dict[int, PublicIdentity],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        super().__init__(fleet_id, identity, max_message_bytes)
        self.devices = dict(devices)

    def revoke(self, device_id: int) -> None:
        self.devices.pop(device_id, None)
        self._keys = {k: v for k, v in self._keys.items() if k[0] != device_id}

    def _peer(self, device_id: int) -> PublicIdentity:
        if device_id not in self.devices:
            raise ProtocolError("unknown-device", f"device {device_id:#010x} is not enrolled")
        return self.devices[device_id]

    def _sender(self, header: Header) -> PublicIdentity:
        return self._peer(header.device_id)

    def _accepts(self, header: Header) -> None:
        if header.direction != UP:
            raise ProtocolError("bad-direction", "the coordinator only accepts uplinks")

    def seal(
        self, body: Body, *, device_id: int, round: int, model_version: int, seq: int | None = None, flags: int = 0,
        run: int = 0,
    ) -> bytes:
        if device_id != 0:
            self._peer(device_id)  # refuse to address a device that is not enrolled
        return self._seal(body, device_id, round, model_version, seq, flags, run)
