"""The node's C envelope (device_runtime/c/fedtiny_envelope.c + Monocypher) on the host through ctypes, and the
Cortex-M4 crypto firmware that counts each operation's instructions.

- `CEnvelope().node(fleet_id, device_id, identity, coordinator_public)` -> `CNode`: `seal(...)` an uplink and
  `open(raw)` a downlink with the C code, rejecting with the same `ProtocolError` reasons as
  fedtiny.protocol.envelope (tests compare the two ends byte for byte).
- `crypto_case()`: fixed identities, a 1 KiB DELTA body to seal and a 1 KiB GLOBAL_UPDATE to open, as
  crypto_vectors.c; `build_crypto_firmware(vectors)` -> the ELF of firmware_crypto.c around them;
  `run_crypto_firmware(elf)` runs it under QEMU with the instruction-count plugin and returns per operation the
  executed instructions and peak stack, the uplink it sealed and what it made of the downlink;
  `crypto_footprint(map)` the flash and static RAM of the crypto objects, from the linker map.
Monocypher's sources come from `monocypher_sources` (PyPI sdist, pinned version and SHA-256).
"""

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedtiny.protocol import delta, topics
from fedtiny.protocol.envelope import CoordinatorEndpoint, DeviceEndpoint, Identity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import Delta, GlobalUpdate

from . import codegen, cruntime
from .monocypher_sources import monocypher_sources

HOST_LIB = "libfedtiny_envelope.so"
CRYPTO_ELF = "fedtiny_crypto.elf"
CRYPTO_MAP = "fedtiny_crypto.map"
CRYPTO_OBJECTS = ("fedtiny_envelope.m4.o", "monocypher.m4.o")  # what the crypto costs, in the map
OPERATIONS = ("keys", "x25519", "sign", "verify", "seal", "open")  # firmware_crypto.c's regions, in order
REPLAY_WINDOW = 4  # FEDTINY_ENV_REPLAY_WINDOW


def envelope_sources() -> dict[str, bytes]:
    """The envelope's C files, the Makefile and Monocypher (from the shared, hash-checked sources cache)."""
    rt = codegen.runtime_dir()
    names = ("fedtiny_envelope.c", "fedtiny_envelope.h", "fedtiny_profile.h", "Makefile")
    files = {name: (rt / name).read_bytes() for name in names}
    return files | monocypher_sources()


# ---- ctypes mirrors of fedtiny_envelope.h ----------------------------------------------------------------------

class Header(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint8), ("flags", ctypes.c_uint16), ("run", ctypes.c_uint16)] + [
        (n, ctypes.c_uint32) for n in ("fleet_id", "device_id", "round", "model_version", "seq", "payload_len")]


class Node(ctypes.Structure):
    _fields_ = [("fleet_id", ctypes.c_uint32), ("device_id", ctypes.c_uint32),
                ("sign_secret", ctypes.c_uint8 * 64), ("coordinator_sign", ctypes.c_uint8 * 32),
                ("up_key", ctypes.c_uint8 * 32), ("down_key", ctypes.c_uint8 * 32)]


class Seen(ctypes.Structure):
    _fields_ = [("run", ctypes.c_uint16), ("round", ctypes.c_uint32), ("seq", ctypes.c_uint32),
                ("signature", ctypes.c_uint8 * 64)]


class Stream(ctypes.Structure):
    _fields_ = [("accepted_any", ctypes.c_uint8), ("next", ctypes.c_uint8), ("count", ctypes.c_uint8),
                ("last_run", ctypes.c_uint16), ("last_round", ctypes.c_uint32), ("last_seq", ctypes.c_uint32),
                ("recent", Seen * REPLAY_WINDOW)]


class Replay(ctypes.Structure):
    _fields_ = [("addressed", Stream), ("broadcast", Stream)]


HEADER_BYTES, SIGNATURE_BYTES, TAG_BYTES = 32, 64, 16
_REPLAY_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(Header), ctypes.c_void_p)


class CEnvelope:
    """libfedtiny_envelope.so (gcc -O2, cached like every cruntime build)."""

    def __init__(self, cache_dir: Path | None = None):
        lib = ctypes.CDLL(str(cruntime.make_cached(envelope_sources(), "host-envelope", HOST_LIB, cache_dir)))
        u8p, u32 = ctypes.c_void_p, ctypes.c_uint32
        lib.fedtiny_env_reason.argtypes, lib.fedtiny_env_reason.restype = [ctypes.c_int], ctypes.c_char_p
        lib.fedtiny_env_node_init.argtypes = [ctypes.POINTER(Node), u32, u32, ctypes.c_char_p, ctypes.c_char_p]
        lib.fedtiny_env_derive_key.argtypes = [u8p, ctypes.c_char_p, ctypes.c_char_p, u32, u32, ctypes.c_uint8]
        lib.fedtiny_env_derive_key.restype = None
        lib.fedtiny_env_seal.argtypes = [ctypes.POINTER(Node), ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint16, u32,
                                         u32, u32, u8p, u32, u8p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
        lib.fedtiny_env_open.argtypes = [ctypes.POINTER(Node), u8p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(Header), ctypes.POINTER(u32)]
        lib.fedtiny_env_replay_commit.argtypes = [ctypes.POINTER(Replay), ctypes.POINTER(Header), u8p]
        lib.fedtiny_env_replay_commit.restype = None
        self.lib = lib
        self.replay_check = ctypes.cast(lib.fedtiny_env_replay_check, ctypes.c_void_p)

    def reason(self, status: int) -> str:
        return self.lib.fedtiny_env_reason(status).decode()

    def derive_key(self, own_x25519_secret: bytes, peer_x25519_public: bytes, fleet_id: int, device_id: int,
                   direction: int) -> bytes:
        key = ctypes.create_string_buffer(32)
        self.lib.fedtiny_env_derive_key(key, own_x25519_secret, peer_x25519_public, fleet_id, device_id, direction)
        return key.raw

    def node(self, fleet_id: int, device_id: int, identity: bytes, coordinator_public: bytes) -> "CNode":
        return CNode(self, fleet_id, device_id, identity, coordinator_public)


@dataclass(frozen=True)
class Opened:
    header: Header
    body: bytes


class CNode:
    """One node's keys and downlink replay window in C: what the firmware keeps in RAM."""

    def __init__(self, env: CEnvelope, fleet_id: int, device_id: int, identity: bytes, coordinator_public: bytes):
        self.env, self.lib = env, env.lib
        self.keys = Node()
        self.replay = Replay()
        status = self.lib.fedtiny_env_node_init(ctypes.byref(self.keys), fleet_id, device_id, identity,
                                                coordinator_public)
        if status:
            raise ValueError(f"fedtiny_env_node_init: {env.reason(status)}")

    def _raise(self, status: int) -> None:
        raise ProtocolError(self.env.reason(status), "C envelope")

    def seal(self, msg_type: int, body: bytes, *, round: int, model_version: int, seq: int, flags: int = 0,
             run: int = 0) -> bytes:
        out = ctypes.create_string_buffer(HEADER_BYTES + len(body) + TAG_BYTES + SIGNATURE_BYTES)
        out_len = ctypes.c_size_t()
        status = self.lib.fedtiny_env_seal(ctypes.byref(self.keys), msg_type, flags, run, round, model_version, seq,
                                           body, len(body), out, len(out), ctypes.byref(out_len))
        if status:
            self._raise(status)
        return out.raw[:out_len.value]

    def open(self, raw: bytes, *, check_replay: bool = True, commit: bool = True) -> Opened | None:
        """Open one downlink; None for a duplicate; ProtocolError(reason) for a rejection. `commit` records it in
        the replay window afterwards, as the node does once the body is applied."""
        buf = ctypes.create_string_buffer(bytes(raw), len(raw))
        header, body_len = Header(), ctypes.c_uint32()
        hook = self.env.replay_check if check_replay else None
        status = self.lib.fedtiny_env_open(ctypes.byref(self.keys), buf, len(raw), hook, ctypes.byref(self.replay),
                                           ctypes.byref(header), ctypes.byref(body_len))
        if status == 1:
            return None
        if status:
            self._raise(status)
        signature = ctypes.cast(ctypes.addressof(buf) + HEADER_BYTES + header.payload_len, ctypes.c_void_p)
        if commit:
            self.lib.fedtiny_env_replay_commit(ctypes.byref(self.replay), ctypes.byref(header), signature)
        return Opened(header, buf.raw[HEADER_BYTES:HEADER_BYTES + body_len.value])


# ---- the crypto firmware --------------------------------------------------------------------------------------

def _c_bytes(name: str, data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    body = ",\n    ".join(rows) if rows else "0"
    return f"const uint8_t {name}[{max(1, len(data))}] = {{\n    {body}\n}};\n"


def render_crypto_vectors(*, fleet_id: int, device_id: int, identity: bytes, coordinator_public: bytes,
                          uplink_body: bytes, run: int, round: int, seq: int, downlink: bytes) -> str:
    """crypto_vectors.c for firmware_crypto.c: the node's keys, a DELTA body to seal at (run, round, seq), and a
    downlink sealed by the coordinator for it to open."""
    return "".join([
        "/* Generated by fedtiny_device.cenvelope.render_crypto_vectors: inputs of firmware_crypto.c. */\n",
        "#include <stdint.h>\n\n",
        f"const uint32_t fedtiny_cv_fleet_id = {fleet_id}u, fedtiny_cv_device_id = {device_id}u;\n",
        f"const uint16_t fedtiny_cv_run = {run}u;\n",
        f"const uint32_t fedtiny_cv_round = {round}u, fedtiny_cv_seq = {seq}u;\n",
        f"const uint32_t fedtiny_cv_uplink_body_len = {len(uplink_body)}u, "
        f"fedtiny_cv_downlink_len = {len(downlink)}u;\n",
        _c_bytes("fedtiny_cv_identity", identity),
        _c_bytes("fedtiny_cv_coordinator", coordinator_public),
        _c_bytes("fedtiny_cv_uplink_body", uplink_body),
        _c_bytes("fedtiny_cv_downlink", downlink),
    ])


@dataclass
class CryptoCase:
    """A device and its coordinator (fixed test identities), a DELTA body for the node to seal and a GLOBAL_UPDATE
    the coordinator sealed for it, both bodies `body_bytes` long; `vectors` is their crypto_vectors.c."""

    device: DeviceEndpoint
    coordinator: CoordinatorEndpoint
    uplink_body: Delta
    downlink_body: GlobalUpdate
    downlink: bytes
    run: int
    round: int
    seq: int
    vectors: str


def crypto_case(body_bytes: int = 1024) -> CryptoCase:
    fleet_id, device_id = topics.name_id("bench"), topics.name_id("node")
    device_key, coordinator_key = Identity.from_seed(b"node"), Identity.from_seed(b"coordinator")
    device = DeviceEndpoint(fleet_id, device_id, device_key, coordinator_key.public)
    coordinator = CoordinatorEndpoint(fleet_id, coordinator_key, {device_id: device_key.public})
    rng = np.random.default_rng(0)

    def entries(n: int) -> list[delta.DeltaEntry]:  # int8 values outside [-8, 7], so no int4 packing
        values = rng.integers(-128, 128, (1, n), dtype=np.int8)
        values[0, 0] = 127
        return [delta.DeltaEntry(0, 0, values, np.array([0.01]))]

    # Body = fixed prefix + blob header + one entry header + scale + values (multiple of 4: no padding).
    uplink_body = Delta(32, 0.5, entries(body_bytes - len(Delta(32, 0.5, entries(4)).encode()) + 4))
    downlink_body = GlobalUpdate(0, entries(body_bytes - len(GlobalUpdate(0, entries(4)).encode()) + 4))
    if not len(uplink_body.encode()) == len(downlink_body.encode()) == body_bytes:
        raise ValueError(f"body_bytes must be a multiple of 4 and at least 48, not {body_bytes}")
    run, round_, seq = 2, 3, 5
    downlink = coordinator.seal(downlink_body, device_id=device_id, round=round_, model_version=1, seq=seq, run=run)
    vectors = render_crypto_vectors(fleet_id=fleet_id, device_id=device_id, identity=device_key.to_bytes(),
                                    coordinator_public=coordinator_key.public.to_bytes(),
                                    uplink_body=uplink_body.encode(), run=run, round=round_, seq=seq,
                                    downlink=downlink)
    return CryptoCase(device, coordinator, uplink_body, downlink_body, downlink, run, round_, seq, vectors)


def build_crypto_firmware(vectors: str, cache_dir: Path | None = None) -> Path:
    """The Cortex-M4 crypto firmware (firmware_crypto.c) around these vectors; its map is next to it."""
    rt = codegen.runtime_dir()
    files = envelope_sources()
    for name in ("firmware_crypto.c", "fedtiny_boot.c", "fedtiny_boot.h", "fedtiny_m4.ld"):
        files[name] = (rt / name).read_bytes()
    files["crypto_vectors.c"] = vectors
    return cruntime.make_cached(files, "m4-crypto", CRYPTO_ELF, cache_dir)


@dataclass
class CryptoRun:
    instructions: dict[str, int]  # executed instructions per operation (OPERATIONS)
    stack: dict[str, int]  # peak stack bytes per operation
    uplink: bytes  # the DELTA envelope the firmware sealed
    downlink_status: str  # fedtiny_env_reason of opening the downlink
    downlink_body_len: int
    downlink_fnv: int  # FNV-1a 32 of the decrypted downlink body
    returncode: int


def run_crypto_firmware(elf: Path, timeout: float = 120, cache_dir: Path | None = None) -> CryptoRun:
    run = cruntime.run_counted(elf, timeout, cache_dir)
    result, each = run.result, run.each
    stack = {m[1]: int(m[2]) for m in re.finditer(r"^op (\w+) stack (\d+)$", result.stdout, re.M)}
    if len(each) != len(OPERATIONS) or list(stack) != list(OPERATIONS):
        raise RuntimeError(f"crypto firmware ran {len(each)} regions, printed {list(stack)}:\n{result.stdout}")
    uplink = re.search(r"^uplink ([0-9a-f]*)$", result.stdout, re.M)
    downlink = re.search(r"^downlink (\S+) body_len (\d+) fnv ([0-9a-f]{8})$", result.stdout, re.M)
    return CryptoRun(dict(zip(OPERATIONS, each)), stack, bytes.fromhex(uplink[1]), downlink[1], int(downlink[2]),
                     int(downlink[3], 16), result.returncode)


def crypto_footprint(map_path: Path, objects: tuple[str, ...] = CRYPTO_OBJECTS) -> dict[str, int]:
    """Bytes the linker kept from these objects (after --gc-sections), from the map's memory map: flash =
    .text/.rodata (+ .data's initial values), ram = .data + .bss."""
    text = map_path.read_text()
    memory_map = text[text.index("Linker script and memory map"):]
    sizes = {"flash": 0, "ram": 0}
    # An input section line: " .text.name  0xADDR  0xSIZE object" (the name may stand alone on the line before).
    pattern = r"^ (\.[\w.]+|COMMON)\s+0x[0-9a-f]+\s+0x([0-9a-f]+) (\S+)$"
    for name, size, obj in re.findall(pattern, memory_map, re.M):
        if Path(obj).name not in objects:
            continue
        if name.startswith((".text", ".rodata")):
            sizes["flash"] += int(size, 16)
        elif name.startswith(".data"):
            sizes["flash"] += int(size, 16)
            sizes["ram"] += int(size, 16)
        elif name.startswith((".bss", "COMMON")):
            sizes["ram"] += int(size, 16)
    return sizes
