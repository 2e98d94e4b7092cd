"""The capture check: does any MQTT payload a run's broker carried contain a raw sample of any device?

The samples are the nodes' own (nodes/<device>.npz, int8 in the model's input quantization), each looked for in
every encoding a device could send it in: its int8 bytes, and its values dequantized with the model's input scale
and zero point as float32 and float64, little- and big-endian. A sample is looked for whole, at any byte offset of
a payload, and inside every zlib, gzip or raw-deflate stream found in a payload (at its start, or wherever a zlib
header is), inflated to at most MAX_INFLATE bytes each.

The search is by anchors: from each pattern, the ANCHOR bytes with the most distinct values; all the payload's
ANCHOR-byte windows (at every offset) are looked up among the anchors at once (numpy), and only a hit is compared
whole. A sample whose bytes are too uniform to anchor (fewer than MIN_DISTINCT distinct byte values, or shorter
than ANCHOR) is counted and reported, not searched: it would match any run of padding.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ANCHOR = 8
MIN_DISTINCT = 3
MAX_INFLATE = 16 << 20
ENCODINGS = ("int8", "float32 LE", "float32 BE", "float64 LE", "float64 BE")


class CaptureError(ValueError):
    """A capture file that cannot be read; the message names the file and line."""


@dataclass
class Payload:
    client: str
    topic: str
    data: bytes
    kind: str = "publish"


def message_kind(data: bytes) -> tuple[str, str | None]:
    """(what a carried payload is, how its body travels) from its protocol headers (chunk, envelope): e.g.
    ("DELTA", "encrypted"), ("DELTA", "encrypted, masked"), ("STATUS", "signed, in the clear"), ("chunk 2 of 3",
    None) for a later chunk, ("not a fedtiny message", None)."""
    from fedtiny.protocol.chunking import parse_chunk
    from fedtiny.protocol.envelope import Flags, Header
    from fedtiny.protocol.errors import ProtocolError
    from fedtiny.protocol.messages import MessageType

    try:
        chunk = parse_chunk(data)
        if chunk.index > 0:
            return f"chunk {chunk.index + 1} of {chunk.count}", None
        data = chunk.data
    except ProtocolError:
        pass
    try:
        header = Header.unpack(data)
    except ProtocolError:
        return "not a fedtiny message", None
    body = "encrypted" if header.flags & Flags.ENCRYPTED else "signed, in the clear"
    return MessageType(header.type).name, body + (", masked" if header.flags & Flags.MASKED else "")


def reassembled(payloads: list[Payload]) -> list[Payload]:
    """Each chunked transfer whose chunks were all carried, as one message (client, topic, its bytes in order):
    a sample split across chunks is whole only there."""
    from fedtiny.protocol.chunking import parse_chunk
    from fedtiny.protocol.errors import ProtocolError

    transfers: dict[tuple, dict[int, bytes]] = {}
    counts: dict[tuple, int] = {}
    for p in payloads:
        try:
            chunk = parse_chunk(p.data)
        except ProtocolError:
            continue
        if chunk.count < 2:
            continue
        key = (p.client, p.topic, chunk.transfer_id, chunk.total_len)
        transfers.setdefault(key, {})[chunk.index] = chunk.data
        counts[key] = chunk.count
    return [Payload(client, topic, b"".join(parts[i] for i in range(counts[key])), "reassembled transfer")
            for key, parts in transfers.items() if len(parts) == counts[key] for client, topic, *_ in [key]]


def read_capture(path: str | Path) -> list[Payload]:
    """The payloads of a broker's capture file (simulations/broker_process.py PayloadCapture)."""
    payloads = []
    with open(path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                entry = json.loads(line)
                data = base64.b64decode(entry["payload"], validate=True)
                payloads.append(Payload(str(entry["client"]), str(entry["topic"]), data, entry.get("kind", "publish")))
            except (ValueError, KeyError, TypeError):
                raise CaptureError(f"{path}: line {number}: not a capture record") from None
    return payloads


@dataclass
class Finding:
    payload: int  # index in the capture
    client: str
    topic: str
    device: str  # whose sample
    sample: int  # its index in the device's npz
    encoding: str
    offset: int  # in the payload, or in the inflated stream
    inflated_at: int | None = None  # where the compressed stream starts in the payload (None: the payload itself)


@dataclass
class ScanResult:
    payloads: int
    bytes: int
    samples: int
    devices: int
    patterns: int
    inflated: int  # compressed streams found and inflated
    transfers: int = 0  # chunked transfers reassembled and scanned whole
    uniform: list[tuple[str, int]] = field(default_factory=list)  # (device, sample) too uniform to search
    findings: list[Finding] = field(default_factory=list)


def sample_patterns(samples: dict[str, np.ndarray], scale: float, zero_point: int) -> dict[bytes, list]:
    """Each sample's byte patterns: {pattern: [(device, index, encoding), ...]} (identical samples share one)."""
    patterns: dict[bytes, list] = {}
    for device, x in samples.items():
        x = np.asarray(x)
        flat = x.reshape(len(x), -1)
        real = (flat.astype(np.float64) - zero_point) * scale
        for i in range(len(flat)):
            encoded = (flat[i].astype(np.int8).tobytes(), real[i].astype("<f4").tobytes(),
                       real[i].astype(">f4").tobytes(), real[i].astype("<f8").tobytes(),
                       real[i].astype(">f8").tobytes())
            for encoding, pattern in zip(ENCODINGS, encoded, strict=True):
                patterns.setdefault(pattern, []).append((device, i, encoding))
    return patterns


ANCHOR_SEARCH = 512  # offsets of a pattern tried for its anchor: enough to find a varied one in real samples


def _anchor(pattern: bytes) -> int | None:
    """The offset of the pattern's most varied ANCHOR bytes (the first of the best among its first ANCHOR_SEARCH
    offsets), or None when the pattern is too uniform."""
    b = np.frombuffer(pattern, dtype=np.uint8)
    if len(b) < ANCHOR or np.count_nonzero(np.bincount(b, minlength=256)) < MIN_DISTINCT:
        return None
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(b[:ANCHOR_SEARCH + ANCHOR - 1], ANCHOR), axis=1)
    distinct = 1 + np.count_nonzero(np.diff(windows, axis=1), axis=1)
    return int(np.argmax(distinct))


def _streams(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, inflated bytes) of each compressed stream in `data`: zlib/gzip/raw deflate at its start, and zlib
    wherever a zlib header is."""
    b = np.frombuffer(data, dtype=np.uint8)
    first, second = b[:-1].astype(np.uint16), b[1:].astype(np.uint16)
    header = ((first & 0x0F) == 8) & ((first >> 4) <= 7) & (((first << 8) | second) % 31 == 0)  # RFC 1950 CMF/FLG
    starts = {0, *np.nonzero(header)[0].tolist()}
    out = []
    for offset in sorted(starts):
        for wbits in ((15, 31, -15) if offset == 0 else (15,)):
            try:
                inflater = zlib.decompressobj(wbits)
                inflated = inflater.decompress(data[offset:], MAX_INFLATE)
            except zlib.error:
                continue
            if len(inflated) >= ANCHOR:
                out.append((offset, inflated))
                break
    return out


class _Index:
    def __init__(self, patterns: dict[bytes, list]) -> None:
        self.by_anchor: dict[int, list[tuple[bytes, int]]] = {}
        self.uniform: list[bytes] = []
        for pattern in patterns:
            offset = _anchor(pattern)
            if offset is None:
                self.uniform.append(pattern)
                continue
            key = int(np.frombuffer(pattern[offset:offset + ANCHOR], dtype="<u8")[0])
            self.by_anchor.setdefault(key, []).append((pattern, offset))
        self.keys = np.sort(np.fromiter(self.by_anchor, dtype=np.uint64, count=len(self.by_anchor)))

    def find(self, data: bytes) -> list[tuple[bytes, int]]:
        """(pattern, offset) of every whole pattern in data."""
        hits = []
        if len(data) < ANCHOR or not len(self.keys):
            return hits
        # the ANCHOR-byte window at every offset: eight strided views, one per alignment, looked up at once
        views = [np.frombuffer(data, dtype="<u8", count=(len(data) - align) // ANCHOR, offset=align)
                 for align in range(min(ANCHOR, len(data) - ANCHOR + 1))]
        windows = np.concatenate(views)
        starts = np.concatenate([align + ANCHOR * np.arange(len(v)) for align, v in enumerate(views)])
        found = self.keys[np.minimum(np.searchsorted(self.keys, windows), len(self.keys) - 1)] == windows
        for k in np.nonzero(found)[0]:
            position = int(starts[k])
            for pattern, offset in self.by_anchor[int(windows[k])]:
                start = position - offset
                if start >= 0 and data[start:start + len(pattern)] == pattern:
                    hits.append((pattern, start))
        return hits


def scan(payloads: list[Payload], samples: dict[str, np.ndarray], scale: float, zero_point: int) -> ScanResult:
    """Every sample, in every encoding, in every payload, in every chunked transfer reassembled (numbered after
    the payloads), and in every compressed stream found in either."""
    patterns = sample_patterns(samples, scale, zero_point)
    index = _Index(patterns)
    transfers = reassembled(payloads)
    result = ScanResult(payloads=len(payloads), bytes=sum(len(p.data) for p in payloads),
                        samples=sum(len(x) for x in samples.values()), devices=len(samples), patterns=len(patterns),
                        inflated=0, transfers=len(transfers))
    uniform = {(d, i) for pattern in index.uniform for d, i, _ in patterns[pattern]}
    result.uniform = sorted(uniform)
    for number, payload in enumerate(payloads + transfers):
        haystacks = [(None, payload.data)]
        streams = _streams(payload.data)
        result.inflated += len(streams)
        haystacks += streams
        for inflated_at, data in haystacks:
            for pattern, offset in index.find(data):
                for device, i, encoding in patterns[pattern]:
                    result.findings.append(Finding(number, payload.client, payload.topic, device, i, encoding,
                                                   offset, inflated_at))
    return result


def load_samples(nodes_dir: str | Path) -> dict[str, np.ndarray]:
    """Every device's samples (int8, the model's input quantization) from a run's nodes/ folder."""
    return {f.stem: np.load(f)["x"] for f in sorted(Path(nodes_dir).glob("*.npz"))}


def input_quantization(plan) -> tuple[float, int]:
    t = plan.graph.tensors[plan.graph.inputs[0]]
    return float(np.asarray(t.scale).reshape(-1)[0]), int(np.asarray(t.zero_point).reshape(-1)[0])
