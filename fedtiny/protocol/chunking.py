"""Split a payload into MQTT-sized chunks and put it back together, in any order, with bounded memory.

Every MQTT payload fedtiny publishes is one chunk (a short message is a transfer of one chunk), so receivers
parse one frame type. Chunk layout, little-endian, 24-byte header:

    magic "FC" | version u8 | reserved u8 | transfer_id u32 | index u32 | count u32 | total_len u32
    | chunk_size u32 | data

Chunk `index` carries bytes [index*chunk_size, min(total_len, (index+1)*chunk_size)) of the payload, so a C
receiver writes each chunk straight to its offset in a fixed buffer (or flash page) and keeps a bitmap of
received indexes. Integrity is not checked here: the reassembled payload is a signed envelope.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from fedtiny.protocol.errors import ProtocolError

MAGIC = b"FC"
VERSION = 1
CHUNK_HEADER = struct.Struct("<2sBBIIIII")
CHUNK_HEADER_SIZE = CHUNK_HEADER.size  # 24
MIN_CHUNK_PAYLOAD = 256  # Arduino PubSubClient's default buffer
MAX_CHUNK_PAYLOAD = 256 * 1024  # Azure IoT Hub's message limit; AWS allows 128 KiB


@dataclass(frozen=True)
class Chunk:
    transfer_id: int
    index: int
    count: int
    total_len: int
    chunk_size: int
    data: bytes

    def encode(self) -> bytes:
        return CHUNK_HEADER.pack(
            MAGIC, VERSION, 0, self.transfer_id, self.index, self.count, self.total_len, self.chunk_size
        ) + self.data


def chunk_count(total_len: int, max_payload: int) -> int:
    data_size = max_payload - CHUNK_HEADER_SIZE
    return max(1, -(-total_len // data_size))


def split(payload: bytes, transfer_id: int, max_payload: int) -> list[bytes]:
    """Chunks of at most max_payload bytes each (header included), in index order."""
    if not MIN_CHUNK_PAYLOAD <= max_payload <= MAX_CHUNK_PAYLOAD:
        raise ValueError(f"max_payload must be within {MIN_CHUNK_PAYLOAD}..{MAX_CHUNK_PAYLOAD}")
    if not 0 <= transfer_id <= 0xFFFFFFFF or len(payload) > 0xFFFFFFFF:
        raise ValueError("transfer_id and payload length must fit u32")
    size = max_payload - CHUNK_HEADER_SIZE
    count = chunk_count(len(payload), max_payload)
    return [
        Chunk(transfer_id, i, count, len(payload), size, payload[i * size : (i + 1) * size]).encode()
        for i in range(count)
    ]


def parse_chunk(frame: bytes) -> Chunk:
    """Parse and check one chunk frame on its own (consistency with its transfer is the Reassembler's job)."""
    frame = bytes(frame)
    if len(frame) < CHUNK_HEADER_SIZE:
        raise ProtocolError("truncated", "chunk header")
    magic, version, reserved, transfer_id, index, count, total_len, chunk_size = CHUNK_HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError("bad-magic", "not a chunk")
    if version != VERSION:
        raise ProtocolError("bad-version", f"chunk version {version}")
    if reserved:
        raise ProtocolError("bad-flags", "reserved chunk byte set")
    if chunk_size == 0 or chunk_size > MAX_CHUNK_PAYLOAD - CHUNK_HEADER_SIZE:
        raise ProtocolError("bad-chunk", "chunk_size out of range")
    if count != max(1, -(-total_len // chunk_size)) or index >= count:
        raise ProtocolError("bad-chunk", "index/count/total_len do not agree")
    data = frame[CHUNK_HEADER_SIZE:]
    expected = min(chunk_size, total_len - index * chunk_size)
    if len(data) != expected:
        raise ProtocolError("truncated" if len(data) < expected else "trailing-bytes", "chunk data length")
    return Chunk(transfer_id, index, count, total_len, chunk_size, data)


@dataclass
class _Transfer:
    count: int
    total_len: int
    chunk_size: int
    last_seen: float
    parts: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkResult:
    """What one accepted frame did: `payload` is set once the transfer is complete."""

    key: tuple
    duplicate: bool
    payload: bytes | None = None


class Reassembler:
    """Collects chunks per (source, transfer_id); sans-IO: the caller passes `now` (any monotonic seconds).

    Memory is bounded by max_transfers open transfers and max_bytes of declared payload (a transfer reserves its
    whole total_len when its first chunk arrives, as a C receiver with a fixed buffer would). Transfers idle for
    longer than ttl seconds are dropped by expire() and by every accept(). With `evict`, a new transfer that
    does not fit drops the least recently active ones instead of being refused: for a reassembler that serves
    one sender, whose newest transfer supersedes its abandoned ones, so a sender cannot lock itself out.
    """

    def __init__(self, max_transfers: int = 8, max_bytes: int = 1 << 20, ttl: float = 600.0,
                 evict: bool = False) -> None:
        self.max_transfers = max_transfers
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.evict = evict
        self._transfers: dict[tuple, _Transfer] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(t.total_len for t in self._transfers.values())

    def open_transfers(self) -> list[tuple]:
        return list(self._transfers)

    def accept(self, frame: bytes, now: float, source: str = "") -> ChunkResult:
        """Add one chunk frame; raises ProtocolError (and changes nothing) on a bad or inconsistent chunk."""
        chunk = parse_chunk(frame)
        self.expire(now)
        key = (source, chunk.transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            if chunk.count == 1:  # a one-chunk transfer never needs buffering
                return ChunkResult(key, False, chunk.data)
            if chunk.total_len > self.max_bytes:
                raise ProtocolError("oversized", f"transfer of {chunk.total_len} bytes > {self.max_bytes}")
            while self.evict and self._transfers and (len(self._transfers) >= self.max_transfers
                                                      or self.reserved_bytes + chunk.total_len > self.max_bytes):
                del self._transfers[min(self._transfers, key=lambda k: self._transfers[k].last_seen)]
            if len(self._transfers) >= self.max_transfers:
                raise ProtocolError("too-many-transfers", f"{self.max_transfers} transfers already open")
            if self.reserved_bytes + chunk.total_len > self.max_bytes:
                raise ProtocolError("oversized", "transfer would exceed the reassembly budget")
            transfer = _Transfer(chunk.count, chunk.total_len, chunk.chunk_size, now)
            self._transfers[key] = transfer
        elif (transfer.count, transfer.total_len, transfer.chunk_size) != (
            chunk.count,
            chunk.total_len,
            chunk.chunk_size,
        ):
            raise ProtocolError("inconsistent-chunk", "chunk disagrees with its transfer's shape")
        known = transfer.parts.get(chunk.index)
        if known is not None:
            if known != chunk.data:
                raise ProtocolError("inconsistent-chunk", f"chunk {chunk.index} resent with different data")
            transfer.last_seen = now
            return ChunkResult(key, True)
        transfer.parts[chunk.index] = chunk.data
        transfer.last_seen = now
        if len(transfer.parts) < transfer.count:
            return ChunkResult(key, False)
        del self._transfers[key]
        return ChunkResult(key, False, b"".join(transfer.parts[i] for i in range(transfer.count)))

    def missing(self, source: str, transfer_id: int) -> list[int] | None:
        """Indexes still missing for a transfer (None if no such transfer is open), for resume after reconnect."""
        transfer = self._transfers.get((source, transfer_id))
        if transfer is None:
            return None
        return [i for i in range(transfer.count) if i not in transfer.parts]

    def expire(self, now: float) -> list[tuple]:
        """Drop transfers idle for more than ttl seconds; returns their keys."""
        stale = [k for k, t in self._transfers.items() if now - t.last_seen > self.ttl]
        for key in stale:
            del self._transfers[key]
        return stale
