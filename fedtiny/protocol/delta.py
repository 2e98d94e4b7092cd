"""Sparse delta encoding: which channels of which tensors changed, as quantized integers with float32 scales.

The caller decides the content (the training plan's trainable tensors and channel ranges); this module only
defines the bytes. Layout (all little-endian, every section 4-byte aligned so a C decoder can cast in place):

    blob   = magic "FD" | version u8 | flags u8 | n_entries u16 | reserved u16 | body_len u32 | body
    body   = entry * n_entries            (zlib-deflated when flags & FLAG_ZLIB; body_len is the inflated size)
    entry  = tensor_id u16 | dtype u8 | entry_flags u8 | start u32 | count u32 | inner u32
             | scales f32 * (count if per-channel else 1) | values dtype * (count * inner) | zero pad to 4

Value of element [c, k] of the entry = values[c, k] * scales[c or 0]; it applies to channel `start + c` along
axis 0 of tensor `tensor_id`, `inner` being the product of the tensor's other dimensions.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from fedtiny.protocol.errors import ProtocolError

MAGIC = b"FD"
VERSION = 1
FLAG_ZLIB = 0x01
ENTRY_PER_CHANNEL = 0x01

BLOB_HEADER = struct.Struct("<2sBBHHI")  # 12 bytes
ENTRY_HEADER = struct.Struct("<HBBIII")  # 16 bytes

# dtype codes on the wire; the C runtime uses the same numbers.
DTYPE_CODES = {np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3}
CODE_DTYPES = {code: dt.newbyteorder("<") for dt, code in DTYPE_CODES.items()}

# A 1 KiB deflate window: a microcontroller inflater (uzlib, miniz tinfl) then needs only a 1 KiB dictionary.
ZLIB_WBITS = 10
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 4096


@dataclass(frozen=True, eq=False)
class DeltaEntry:
    """Changed channels [start, start+count) along axis 0 of one tensor.

    `values` is stored as shape (count, inner); `scales` has shape (count,) (per channel) or (1,) (per tensor).
    """

    tensor_id: int
    start: int
    values: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.dtype not in DTYPE_CODES:
            raise ValueError(f"values dtype must be int8, int16 or int32, not {values.dtype}")
        if values.ndim == 0 or values.shape[0] == 0:
            raise ValueError("values need at least one channel along axis 0")
        values = values.reshape(values.shape[0], -1)
        scales = np.asarray(self.scales, dtype=np.float32).reshape(-1)
        if scales.shape[0] not in (1, values.shape[0]):
            raise ValueError("scales must hold one value per channel or one per tensor")
        if not 0 <= self.tensor_id <= 0xFFFF or not 0 <= self.start <= 0xFFFFFFFF:
            raise ValueError("tensor_id must fit u16 and start u32")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "scales", scales)

    @property
    def count(self) -> int:
        return self.values.shape[0]

    @property
    def per_channel(self) -> bool:
        # A one-channel entry has one scale either way; it is sent as per-tensor.
        return self.scales.shape[0] == self.count and self.count > 1

    def dequantize(self) -> np.ndarray:
        """float32 values of shape (count, inner)."""
        scales = self.scales.reshape(-1, 1)
        return self.values.astype(np.float32) * scales

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DeltaEntry)
            and (self.tensor_id, self.start) == (other.tensor_id, other.start)
            and self.values.dtype == other.values.dtype
            and np.array_equal(self.values, other.values)
            and np.array_equal(self.scales.view(np.uint32), other.scales.view(np.uint32))
        )


def _pad4(n: int) -> int:
    return (-n) % 4


def _encode_entry(entry: DeltaEntry) -> bytes:
    per_channel = entry.per_channel
    values = entry.values.astype(entry.values.dtype.newbyteorder("<"), copy=False).tobytes()
    head = ENTRY_HEADER.pack(
        entry.tensor_id,
        DTYPE_CODES[entry.values.dtype],
        ENTRY_PER_CHANNEL if per_channel else 0,
        entry.start,
        entry.count,
        entry.values.shape[1],
    )
    scales = entry.scales.astype("<f4").tobytes()
    return head + scales + values + b"\0" * _pad4(len(values))


def encode_delta(entries: list[DeltaEntry], compress: bool | None = None) -> bytes:
    """Encode entries; compress=None deflates only if that makes the blob smaller, True/False force it."""
    if len(entries) > 0xFFFF:
        raise ValueError("at most 65535 entries")
    body = b"".join(_encode_entry(e) for e in entries)
    flags = 0
    if compress is not False:
        packer = zlib.compressobj(9, zlib.DEFLATED, ZLIB_WBITS)
        deflated = packer.compress(body) + packer.flush()
        if compress or len(deflated) < len(body):
            body_on_wire, flags = deflated, FLAG_ZLIB
    if not flags:
        body_on_wire = body
    return BLOB_HEADER.pack(MAGIC, VERSION, flags, len(entries), 0, len(body)) + body_on_wire


def _inflate(data: bytes, body_len: int) -> bytes:
    # Bounded inflate: a decompression bomb stops at body_len + 1 bytes instead of exhausting memory.
    try:
        inflater = zlib.decompressobj(ZLIB_WBITS)
        body = inflater.decompress(data, body_len + 1)
        if not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
            raise ProtocolError("bad-compression", "deflate stream does not end where the blob ends")
    except zlib.error as exc:
        raise ProtocolError("bad-compression", str(exc)) from None
    if len(body) != body_len:
        raise ProtocolError("bad-compression", "inflated length differs from body_len")
    return body


def decode_delta(
    blob: bytes, max_body: int = DEFAULT_MAX_BODY, max_entries: int = DEFAULT_MAX_ENTRIES
) -> list[DeltaEntry]:
    """Decode a blob made by encode_delta; raises ProtocolError on anything malformed or over the limits."""
    blob = bytes(blob)
    if len(blob) < BLOB_HEADER.size:
        raise ProtocolError("truncated", "delta header")
    magic, version, flags, n_entries, reserved, body_len = BLOB_HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise ProtocolError("bad-magic", "not a delta blob")
    if version != VERSION:
        raise ProtocolError("bad-version", f"delta version {version}")
    if flags & ~FLAG_ZLIB or reserved:
        raise ProtocolError("bad-flags", "unknown delta flags")
    if n_entries > max_entries:
        raise ProtocolError("oversized", f"{n_entries} entries > {max_entries}")
    if body_len > max_body:
        raise ProtocolError("oversized", f"body {body_len} > {max_body} bytes")
    body = blob[BLOB_HEADER.size :]
    if flags & FLAG_ZLIB:
        body = _inflate(body, body_len)
    elif len(body) != body_len:
        raise ProtocolError("truncated" if len(body) < body_len else "trailing-bytes", "delta body length")

    entries, offset = [], 0
    for _ in range(n_entries):
        if offset + ENTRY_HEADER.size > len(body):
            raise ProtocolError("truncated", "delta entry header")
        tensor_id, code, eflags, start, count, inner = ENTRY_HEADER.unpack_from(body, offset)
        offset += ENTRY_HEADER.size
        if code not in CODE_DTYPES:
            raise ProtocolError("bad-dtype", f"dtype code {code}")
        if eflags & ~ENTRY_PER_CHANNEL:
            raise ProtocolError("bad-flags", "unknown entry flags")
        if count == 0 or inner == 0:
            raise ProtocolError("bad-entry", "empty entry")
        n_scales = count if eflags & ENTRY_PER_CHANNEL else 1
        dtype = CODE_DTYPES[code]
        n_value_bytes = count * inner * dtype.itemsize
        end = offset + 4 * n_scales + n_value_bytes + _pad4(n_value_bytes)
        if end > len(body):
            raise ProtocolError("truncated", "delta entry data")
        scales = np.frombuffer(body, "<f4", n_scales, offset).astype(np.float32)
        values = np.frombuffer(body, dtype, count * inner, offset + 4 * n_scales)
        entries.append(DeltaEntry(tensor_id, start, values.astype(dtype.newbyteorder("=")).reshape(count, inner), scales))
        offset = end
    if offset != len(body):
        raise ProtocolError("trailing-bytes", "delta body longer than its entries")
    return entries


def dense_fp32_bytes(n_params: int) -> int:
    """Bytes of the same update sent densely as float32, the baseline a sparse int8 delta is compared with."""
    return 4 * n_params
