"""Sparse delta encoding: which elements of which tensors changed, as quantized integers.

The caller decides the content (the training plan's trainable tensors and channel ranges); this module only
defines the bytes. Layout (all little-endian, every section 4-byte aligned so a C decoder can cast in place):

    blob   = magic "FD" | version u8 | flags u8 | n_entries u16 | reserved u16 | body_len u32 | body
    body   = entry * n_entries            (zlib-deflated when flags & FLAG_ZLIB; body_len is the inflated size)
    entry  = tensor_id u16 | dtype u8 | entry_flags u8 | start u32 | count u32 | inner u32
             | scales f32 * n_scales      n_scales = 0 if PLAN_SCALES, count if PER_CHANNEL, else 1
             | bitmap                     only if BITMAP: count * inner bits, LSB first, zero pad to 4 bytes
             | values dtype * n_values    n_values = popcount(bitmap) if BITMAP, else count * inner
             | zero pad to 4
    dtype  = 1 int8 | 2 int16 | 3 int32 | 4 int4: two's-complement nibbles, low nibble first, decoded to int8

Element [c, k] of an entry applies to channel `start + c` along axis 0 of tensor `tensor_id`, `inner` being
the product of the tensor's other dimensions. Its real value is value * scale of channel c.

- PLAN_SCALES: the entry carries no scales; both ends know them from the training plan (whose hash every TASK
  and JOIN carries), so a trainable tensor's scales never need to cross the network.
- BITMAP: only the elements whose bit is set are carried, in row-major order; the others are not part of the
  entry (a receiver keeps its base value there: zero for a delta, the current value for a state). One bit per
  element is what makes a sparse int8 delta small: 1/8 byte per trainable element plus 1 byte per change.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from fedtiny.protocol.errors import ProtocolError

MAGIC = b"FD"
VERSION = 2
FLAG_ZLIB = 0x01
ENTRY_PER_CHANNEL = 0x01
ENTRY_PLAN_SCALES = 0x02
ENTRY_BITMAP = 0x04
ENTRY_FLAGS = ENTRY_PER_CHANNEL | ENTRY_PLAN_SCALES | ENTRY_BITMAP

BLOB_HEADER = struct.Struct("<2sBBHHI")  # 12 bytes
ENTRY_HEADER = struct.Struct("<HBBIII")  # 16 bytes

# dtype codes on the wire; the C runtime uses the same numbers.
DTYPE_CODES = {np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3}
CODE_DTYPES = {code: dt.newbyteorder("<") for dt, code in DTYPE_CODES.items()}
# int8 values that all fit [-8, 7] travel as packed nibbles and decode to int8 again: most of a round's weight
# deltas are a few LSB, so this halves them losslessly, and a nibble costs a Cortex-M one shift to unpack.
INT4 = 4

# A 1 KiB deflate window: a microcontroller inflater (uzlib, miniz tinfl) then needs only a 1 KiB dictionary.
ZLIB_WBITS = 10


@dataclass(frozen=True)
class DeltaLimits:
    """What a decoder accepts: inflated body bytes, entries, and elements over all entries (count x inner).

    A receiver that knows the training plan passes the plan's own bounds (update.delta_limits), so no blob can
    make it allocate more than the plan's trainable tensors take; the defaults only bound a receiver without one.
    Elements are checked before anything is allocated for an entry: a bitmap or dense value array is never
    larger than the limit, however well a deflated body compresses."""

    max_body: int = 16 * 1024 * 1024
    max_entries: int = 4096
    max_elements: int = 4 * 1024 * 1024


DEFAULT_LIMITS = DeltaLimits()


@dataclass(frozen=True, eq=False)
class DeltaEntry:
    """Channels [start, start+count) along axis 0 of one tensor.

    `values` is stored as shape (count, inner). `scales` has shape (count,) (per channel) or (1,) (per tensor),
    or is None: the plan's scales. `mask` (bool, shape of values) marks the elements the entry carries; None
    means all of them. Elements outside the mask hold 0 in `values`.
    """

    tensor_id: int
    start: int
    values: np.ndarray
    scales: np.ndarray | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        values = np.asarray(self.values)
        if values.dtype not in DTYPE_CODES:
            raise ValueError(f"values dtype must be int8, int16 or int32, not {values.dtype}")
        if values.ndim == 0 or values.shape[0] == 0:
            raise ValueError("values need at least one channel along axis 0")
        values = values.reshape(values.shape[0], -1)
        scales = self.scales
        if scales is not None:
            scales = np.asarray(scales, dtype=np.float32).reshape(-1)
            if scales.shape[0] not in (1, values.shape[0]):
                raise ValueError("scales must hold one value per channel or one per tensor")
        mask = self.mask
        if mask is not None:
            mask = np.asarray(mask, dtype=bool).reshape(values.shape)
            values = np.where(mask, values, 0).astype(values.dtype)
        if not 0 <= self.tensor_id <= 0xFFFF or not 0 <= self.start <= 0xFFFFFFFF:
            raise ValueError("tensor_id must fit u16 and start u32")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "mask", mask)

    @property
    def count(self) -> int:
        return self.values.shape[0]

    @property
    def per_channel(self) -> bool:
        # A one-channel entry has one scale either way; it is sent as per-tensor.
        return self.scales is not None and self.scales.shape[0] == self.count and self.count > 1

    @property
    def carried(self) -> np.ndarray:
        """bool (count, inner): the elements this entry sets."""
        return np.ones(self.values.shape, bool) if self.mask is None else self.mask

    def dequantize(self, scales: np.ndarray | None = None) -> np.ndarray:
        """float32 values of shape (count, inner); `scales` (the plan's) is needed for a PLAN_SCALES entry."""
        scales = self.scales if self.scales is not None else scales
        if scales is None:
            raise ValueError("a PLAN_SCALES entry needs the plan's scales to dequantize")
        return self.values.astype(np.float32) * np.asarray(scales, np.float32).reshape(-1, 1)

    def __eq__(self, other: object) -> bool:
        def bits(scales):
            return None if scales is None else scales.view(np.uint32).tolist()

        return (
            isinstance(other, DeltaEntry)
            and (self.tensor_id, self.start) == (other.tensor_id, other.start)
            and self.values.dtype == other.values.dtype
            and np.array_equal(self.values, other.values)
            and bits(self.scales) == bits(other.scales)
            and np.array_equal(self.carried, other.carried)
        )


def _pad4(n: int) -> int:
    return (-n) % 4


def _encode_entry(entry: DeltaEntry) -> bytes:
    flags = ENTRY_PER_CHANNEL if entry.per_channel else 0
    scales = b""
    if entry.scales is None:
        flags |= ENTRY_PLAN_SCALES
    else:
        scales = entry.scales.astype("<f4").tobytes()
    bitmap = b""
    values = entry.values
    if entry.mask is not None:
        flags |= ENTRY_BITMAP
        bitmap = np.packbits(entry.mask.reshape(-1), bitorder="little").tobytes()
        bitmap += b"\0" * _pad4(len(bitmap))
        values = values[entry.mask]
    code = DTYPE_CODES[entry.values.dtype]
    if code == DTYPE_CODES[np.dtype(np.int8)] and values.size and values.min() >= -8 and values.max() <= 7:
        code, nibbles = INT4, values.astype(np.uint8).reshape(-1) & 0x0F
        values = np.pad(nibbles, (0, nibbles.size % 2))
        values = (values[0::2] | (values[1::2] << 4)).tobytes()
    else:
        values = values.astype(entry.values.dtype.newbyteorder("<"), copy=False).tobytes()
    head = ENTRY_HEADER.pack(entry.tensor_id, code, flags, entry.start, entry.count, entry.values.shape[1])
    return head + scales + bitmap + values + b"\0" * _pad4(len(values))


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


def _decode_entry(body: bytes, offset: int, max_elements: int) -> tuple[DeltaEntry, int]:
    if offset + ENTRY_HEADER.size > len(body):
        raise ProtocolError("truncated", "delta entry header")
    tensor_id, code, eflags, start, count, inner = ENTRY_HEADER.unpack_from(body, offset)
    offset += ENTRY_HEADER.size
    if code not in CODE_DTYPES and code != INT4:
        raise ProtocolError("bad-dtype", f"dtype code {code}")
    if eflags & ~ENTRY_FLAGS or (eflags & ENTRY_PLAN_SCALES and eflags & ENTRY_PER_CHANNEL):
        raise ProtocolError("bad-flags", "unknown or contradictory entry flags")
    if count == 0 or inner == 0:
        raise ProtocolError("bad-entry", "empty entry")
    if count * inner > min(8 * len(body), max_elements):  # never more elements than the body has bits
        raise ProtocolError("oversized", f"entry of {count} x {inner} elements")
    n_scales = 0 if eflags & ENTRY_PLAN_SCALES else count if eflags & ENTRY_PER_CHANNEL else 1
    if offset + 4 * n_scales > len(body):
        raise ProtocolError("truncated", "delta entry scales")
    scales = np.frombuffer(body, "<f4", n_scales, offset).astype(np.float32) if n_scales else None
    offset += 4 * n_scales
    mask, n_values = None, count * inner
    if eflags & ENTRY_BITMAP:
        n_bitmap = (count * inner + 7) // 8
        if offset + n_bitmap > len(body):
            raise ProtocolError("truncated", "delta entry bitmap")
        bits = np.unpackbits(np.frombuffer(body, np.uint8, n_bitmap, offset), bitorder="little")
        if bits[count * inner :].any() or any(body[offset + n_bitmap : offset + n_bitmap + _pad4(n_bitmap)]):
            raise ProtocolError("bad-entry", "bitmap bits set past the entry's elements")
        mask = bits[: count * inner].astype(bool).reshape(count, inner)
        n_values = int(mask.sum())
        offset += n_bitmap + _pad4(n_bitmap)
    n_value_bytes = (n_values + 1) // 2 if code == INT4 else n_values * CODE_DTYPES[code].itemsize
    end = offset + n_value_bytes + _pad4(n_value_bytes)
    if end > len(body):
        raise ProtocolError("truncated", "delta entry values")
    if code == INT4:
        packed = np.frombuffer(body, np.uint8, n_value_bytes, offset)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:n_values]
        if n_values % 2 and packed[-1] >> 4:
            raise ProtocolError("bad-entry", "int4 padding nibble is not zero")
        flat = ((nibbles.astype(np.int8) ^ 8) - 8).astype(np.int8)  # sign-extend the nibble
    else:
        flat = np.frombuffer(body, CODE_DTYPES[code], n_values, offset).astype(CODE_DTYPES[code].newbyteorder("="))
    if mask is None:
        values = flat.reshape(count, inner)
    else:
        values = np.zeros((count, inner), flat.dtype)
        values[mask] = flat
    return DeltaEntry(tensor_id, start, values, scales, mask), end


def decode_delta(blob: bytes, limits: DeltaLimits = DEFAULT_LIMITS) -> list[DeltaEntry]:
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
    if n_entries > limits.max_entries:
        raise ProtocolError("oversized", f"{n_entries} entries > {limits.max_entries}")
    if body_len > limits.max_body:
        raise ProtocolError("oversized", f"body {body_len} > {limits.max_body} bytes")
    body = blob[BLOB_HEADER.size :]
    if flags & FLAG_ZLIB:
        body = _inflate(body, body_len)
    elif len(body) != body_len:
        raise ProtocolError("truncated" if len(body) < body_len else "trailing-bytes", "delta body length")

    entries, offset, elements = [], 0, limits.max_elements
    for _ in range(n_entries):
        entry, offset = _decode_entry(body, offset, elements)
        elements -= entry.values.size
        entries.append(entry)
    if offset != len(body):
        raise ProtocolError("trailing-bytes", "delta body longer than its entries")
    return entries


def dense_fp32_bytes(n_params: int) -> int:
    """Bytes of the same update sent densely as float32, the baseline a sparse int8 delta is compared with."""
    return 4 * n_params
