"""The one versioned container for fedtiny's files (quantized models and training plans).

Layout, all integers little-endian:
    offset  size  field
    0       4     magic b"FTNY"
    4       2     format version (FORMAT_VERSION)
    6       4     kind, 4 ASCII bytes: b"MODL" or b"PLAN"
    10      4     header length H
    14      4     blob length B
    18      H     header: UTF-8 JSON, self-describing (metadata and, per array, name/dtype/shape/offset)
    18+H    B     blob: raw little-endian arrays, each 8-byte aligned
    18+H+B  32    SHA-256 of every byte before it
A truncated, corrupted, foreign or newer file raises FileFormatError with what is wrong; nothing half-read escapes.
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

MAGIC = b"FTNY"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sH4sII")
_DIGEST = 32
_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float32", "float64")
# dtype -> its name in _DTYPES, either byte order: a table, because numpy's dtype.name costs microseconds (tens under
# load) and a simulated node writes its state of ~50 arrays at every sealed message (device.save_state)
_NAMES = {np.dtype(name).newbyteorder(order): name for name in _DTYPES for order in "<>"}


class FileFormatError(ValueError):
    """A file that is not a valid fedtiny file of the expected kind."""


def dumps(kind: bytes, header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    blob, index = bytearray(), []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        dtype = _NAMES.get(arr.dtype)
        if dtype is None:
            raise ValueError(f"array {name!r} has unsupported dtype {arr.dtype}")
        blob += b"\0" * (-len(blob) % 8)
        index.append(dict(name=name, dtype=dtype, shape=list(arr.shape), offset=len(blob)))
        blob += arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    head = json.dumps(dict(header, arrays=index), separators=(",", ":")).encode()
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, kind, len(head), len(blob)) + head + bytes(blob)
    return body + hashlib.sha256(body).digest()


def loads(data: bytes, kind: bytes, source: str = "<bytes>") -> tuple[dict, dict[str, np.ndarray]]:
    def fail(problem: str):
        raise FileFormatError(f"{source}: {problem}")

    if len(data) < _FIXED.size:
        fail(f"truncated: {len(data)} bytes is shorter than the {_FIXED.size}-byte fixed header")
    magic, version, got_kind, head_len, blob_len = _FIXED.unpack_from(data)
    if magic != MAGIC:
        fail(f"not a fedtiny file (magic {magic!r}, expected {MAGIC!r})")
    newer = f"format version {version} is newer than this fedtiny reads ({FORMAT_VERSION}); upgrade fedtiny"
    expected = _FIXED.size + head_len + blob_len + _DIGEST
    if len(data) != expected:  # the lengths do not add up: cut short, padded, or a header we cannot trust
        if version > FORMAT_VERSION:
            fail(f"{newer} (or the file is corrupted)")
        if len(data) < expected:
            fail(f"truncated: {len(data)} bytes of {expected}")
        fail(f"corrupted: {len(data) - expected} unexpected bytes after the checksum")
    # Only a verified header is believed: a flipped version or kind byte must read as damage, not as news.
    body = data[: expected - _DIGEST]
    if hashlib.sha256(body).digest() != data[expected - _DIGEST:]:
        fail("checksum mismatch: the file is corrupted")
    if version > FORMAT_VERSION:
        fail(newer)
    if version < 1:
        fail(f"invalid format version {version}")
    if got_kind != kind:
        fail(f"holds a {got_kind.decode(errors='replace')!r} where a {kind.decode()!r} file was expected")
    try:
        header = json.loads(body[_FIXED.size: _FIXED.size + head_len])
        blob = memoryview(body)[_FIXED.size + head_len:]
        arrays = {}
        for entry in header.pop("arrays"):
            dtype = np.dtype(entry["dtype"]).newbyteorder("<") if entry["dtype"] in _DTYPES else None
            if dtype is None:
                fail(f"array {entry['name']!r} has unknown dtype {entry['dtype']!r}")
            count = int(np.prod(entry["shape"], dtype=np.int64))
            end = entry["offset"] + count * dtype.itemsize
            if entry["offset"] < 0 or end > len(blob) or min(entry["shape"], default=1) < 0:
                fail(f"array {entry['name']!r} lies outside the blob")
            arr = np.frombuffer(blob[entry["offset"]:end], dtype=dtype).reshape(entry["shape"])
            arrays[entry["name"]] = arr.astype(dtype.newbyteorder("="))
    except FileFormatError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        fail(f"malformed header: {err}")
    return header, arrays


def save(path: str | Path, kind: bytes, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a crash mid-write never leaves a half file under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(dumps(kind, header, arrays))
    tmp.replace(path)


def load(path: str | Path, kind: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read: {err.strerror}") from err
    return loads(data, kind, str(path))
