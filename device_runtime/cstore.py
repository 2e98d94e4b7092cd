"""The node's persisted state (device_runtime/c/fedtiny_store.c) on the host through ctypes, over the checked RAM
flash of fedtiny_flash_ram.c that can lose power at any programmed byte or erase.

- `CStore()` builds and loads libfedtiny_store.so (cached like every cruntime build); `crc32(data)`.
- `RamFlash(lib, bank_size, bank_count, program_unit)`: the flash, its `image`, `cut(...)`, `revive()`, and
  `store()` -> `Store` (`open`, `save`, `load`): what a node does at power-up and before each send.
- `store_firmware_sources()` / `build_store_test_firmware()`: firmware_store_test.c, which saves records to a
  host file through semihosting (fedtiny_flash_semihost.c) under QEMU.
"""

import ctypes
from dataclasses import dataclass
from pathlib import Path

from . import codegen, cruntime

HOST_LIB = "libfedtiny_store.so"
STORE_TEST_ELF = "fedtiny_store_test.elf"
MAX_SEGMENTS, MAX_UNIT = 8, 64  # FEDTINY_STORE_MAX_SEGMENTS, FEDTINY_STORE_MAX_UNIT (fedtiny_store.h defaults)
HEADER_BYTES = 20  # FEDTINY_STORE_HEADER_BYTES
OK, EMPTY, LOST = 0, 1, 2
STATUS = {0: "ok", 1: "empty", 2: "lost", -1: "argument", -2: "too-large", -3: "flash", -4: "verify",
          -5: "layout", -6: "buffer", -7: "generation", -8: "not-open"}


def header_area(segment_count: int, program_unit: int) -> int:
    """FEDTINY_STORE_HEADER_AREA: the header and segment lengths, padded to whole program units."""
    return -(-(HEADER_BYTES + 4 * segment_count) // program_unit) * program_unit


# ---- ctypes mirrors of fedtiny_store.h and fedtiny_flash_ram.h ------------------------------------------------

class Flash(ctypes.Structure):
    _fields_ = [("context", ctypes.c_void_p), ("bank_size", ctypes.c_uint32), ("bank_count", ctypes.c_uint32),
                ("program_unit", ctypes.c_uint32), ("erase", ctypes.c_void_p), ("program", ctypes.c_void_p),
                ("read", ctypes.c_void_p)]


class FlashRam(ctypes.Structure):
    _fields_ = [("flash", Flash), ("memory", ctypes.c_void_p), ("programmed", ctypes.c_void_p),
                ("dead", ctypes.c_int), ("program_left", ctypes.c_int64), ("erases_left", ctypes.c_int64),
                ("erase_from", ctypes.c_uint32), ("erase_length", ctypes.c_uint32), ("garble", ctypes.c_int),
                ("bytes_programmed", ctypes.c_uint64), ("erases", ctypes.c_uint64)]


class Record(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("generation", "crc", "bank", "segment_count", "payload_len")] + [
        ("segment_len", ctypes.c_uint32 * MAX_SEGMENTS), ("segment_offset", ctypes.c_uint32 * MAX_SEGMENTS)]


class StoreStruct(ctypes.Structure):
    _fields_ = [("flash", ctypes.c_void_p), ("status", ctypes.c_int), ("newest", Record),
                ("buffer", ctypes.c_uint8 * header_area(MAX_SEGMENTS, MAX_UNIT))]


class Segment(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_uint32)]


class Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("capacity", ctypes.c_uint32), ("length", ctypes.c_uint32)]


class CStore:
    """libfedtiny_store.so (gcc -O2)."""

    def __init__(self, cache_dir: Path | None = None):
        rt = codegen.runtime_dir()
        files = {n: (rt / n).read_bytes() for n in ("fedtiny_store.c", "fedtiny_store.h", "fedtiny_crc32.c",
                                                    "fedtiny_crc32.h", "fedtiny_flash_ram.c", "fedtiny_flash_ram.h",
                                                    "Makefile")}
        lib = ctypes.CDLL(str(cruntime.make_cached(files, "host-store", HOST_LIB, cache_dir)))
        u32, ptr = ctypes.c_uint32, ctypes.c_void_p
        lib.fedtiny_crc32.argtypes, lib.fedtiny_crc32.restype = [u32, ctypes.c_char_p, ctypes.c_size_t], u32
        lib.fedtiny_store_reason.argtypes, lib.fedtiny_store_reason.restype = [ctypes.c_int], ctypes.c_char_p
        lib.fedtiny_store_open.argtypes = [ctypes.POINTER(StoreStruct), ctypes.POINTER(Flash), ctypes.POINTER(Record)]
        lib.fedtiny_store_load.argtypes = [ctypes.POINTER(StoreStruct), ctypes.POINTER(Buffer), u32]
        lib.fedtiny_store_save.argtypes = [ctypes.POINTER(StoreStruct), ctypes.POINTER(Segment), u32]
        lib.fedtiny_store_capacity.argtypes, lib.fedtiny_store_capacity.restype = [ctypes.POINTER(Flash), u32], u32
        lib.fedtiny_flash_ram_init.argtypes = [ctypes.POINTER(FlashRam), ptr, ptr, u32, u32, u32]
        lib.fedtiny_flash_ram_cut.argtypes = [ctypes.POINTER(FlashRam), ctypes.c_int64, ctypes.c_int64, u32, u32,
                                              ctypes.c_int]
        lib.fedtiny_flash_ram_cut.restype = None
        lib.fedtiny_flash_ram_revive.argtypes, lib.fedtiny_flash_ram_revive.restype = [ctypes.POINTER(FlashRam)], None
        self.lib = lib

    def crc32(self, data: bytes, crc: int = 0) -> int:
        return self.lib.fedtiny_crc32(crc, data, len(data))

    def reason(self, status: int) -> str:
        return self.lib.fedtiny_store_reason(status).decode()


class RamFlash:
    """A fedtiny_flash_ram over memory this object owns."""

    def __init__(self, cstore: CStore, bank_size: int, bank_count: int = 2, program_unit: int = 8):
        self.lib = cstore.lib
        self.memory = (ctypes.c_uint8 * (bank_size * bank_count))()
        self.programmed = (ctypes.c_uint8 * (bank_size * bank_count // program_unit))()
        self.ram = FlashRam()
        if self.lib.fedtiny_flash_ram_init(ctypes.byref(self.ram), ctypes.addressof(self.memory),
                                           ctypes.addressof(self.programmed), bank_size, bank_count, program_unit):
            raise ValueError(f"bad flash geometry: {bank_count} banks of {bank_size} B, unit {program_unit} B")
        self.bank_size, self.bank_count, self.program_unit = bank_size, bank_count, program_unit

    @property
    def image(self) -> bytes:
        return bytes(self.memory)

    @property
    def bytes_programmed(self) -> int:
        return self.ram.bytes_programmed

    @property
    def erases(self) -> int:
        return self.ram.erases

    def cut(self, program_bytes: int = -1, erases: int = -1, erase_from: int = 0, erase_length: int = 0,
            garble: bool = False) -> None:
        """Lose power after program_bytes more programmed bytes or at the erase after `erases` more (-1: never)."""
        self.lib.fedtiny_flash_ram_cut(ctypes.byref(self.ram), program_bytes, erases, erase_from, erase_length,
                                       int(garble))

    def revive(self) -> None:
        self.lib.fedtiny_flash_ram_revive(ctypes.byref(self.ram))

    def flip(self, offset: int, bit: int) -> None:
        self.memory[offset] ^= 1 << bit

    def store(self) -> "Store":
        return Store(self)


@dataclass
class Loaded:
    status: int
    generation: int
    segments: list[bytes]


class Store:
    """A fedtiny_store on a RamFlash."""

    def __init__(self, flash: RamFlash):
        self.flash, self.lib = flash, flash.lib
        self.struct = StoreStruct()
        self.record = Record()

    def open(self) -> int:
        return self.lib.fedtiny_store_open(ctypes.byref(self.struct), ctypes.byref(self.flash.ram.flash),
                                           ctypes.byref(self.record))

    def capacity(self, segment_count: int) -> int:
        return self.lib.fedtiny_store_capacity(ctypes.byref(self.flash.ram.flash), segment_count)

    def save(self, segments: list[bytes]) -> int:
        keep = [ctypes.create_string_buffer(s, len(s)) for s in segments]
        array = (Segment * max(1, len(segments)))(*[Segment(ctypes.addressof(b), len(s))
                                                    for b, s in zip(keep, segments)])
        return self.lib.fedtiny_store_save(ctypes.byref(self.struct), array, len(segments))

    def load(self, capacities: list[int | None] | None = None) -> Loaded:
        """Read the newest record; capacities[i] None skips segment i (its bytes come back as b"")."""
        if capacities is None:
            count = self.struct.newest.segment_count if self.struct.status == OK else 0
            capacities = [self.struct.newest.segment_len[i] for i in range(count)]
        bufs = [None if c is None else ctypes.create_string_buffer(max(1, c)) for c in capacities]
        array = (Buffer * max(1, len(capacities)))(*[Buffer(None if b is None else ctypes.addressof(b), c or 0, 0)
                                                      for b, c in zip(bufs, capacities)])
        status = self.lib.fedtiny_store_load(ctypes.byref(self.struct), array, len(capacities))
        if status != OK:
            return Loaded(status, 0, [])
        segments = [b"" if b is None else b.raw[:array[i].length] for i, b in enumerate(bufs)]
        return Loaded(status, self.struct.newest.generation, segments)


# ---- the QEMU firmware: records in a host file through semihosting ------------------------------------------

def store_firmware_sources() -> dict[str, bytes]:
    rt = codegen.runtime_dir()
    names = ("fedtiny_store.c", "fedtiny_store.h", "fedtiny_crc32.c", "fedtiny_crc32.h", "fedtiny_flash_semihost.c",
             "fedtiny_flash_semihost.h",
             "firmware_store_test.c", "fedtiny_boot.c", "fedtiny_boot.h", "fedtiny_m4.ld", "Makefile")
    return {n: (rt / n).read_bytes() for n in names}


def build_store_test_firmware(cache_dir: Path | None = None) -> Path:
    return cruntime.make_cached(store_firmware_sources(), "m4-store-test", STORE_TEST_ELF, cache_dir)
