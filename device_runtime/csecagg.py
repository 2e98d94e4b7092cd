"""The node's secure-aggregation steps in C (device_runtime/c/fedtiny_secagg.c, in libfedtiny_node.so) on the host
through ctypes.

`CSecAgg` binds fedtiny_secagg.c's steps one by one. `CSecAggDevice` is SecAggDevice with its cryptographic steps
(keys, secrets, bounds, moduli, shares, masking) over them: every one in C, the stage checks SecAggDevice's own,
so that the primitives can be held to secagg.py's alone (tests/test_secagg_c.py). The C node's own round, checks
included, is fedtiny_node_secagg.c inside the session (CNodeSession with peers). `secagg_case`,
`build_secagg_firmware` and `run_secagg_firmware` run the steps on the Cortex-M4 and count them.
"""

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedtiny.protocol.envelope import Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import SecAggKeys
from fedtiny.protocol.secagg import RoundContext, SecAggDevice, threshold

from .cnode import CNodeLibrary, WirePlan


class Round(ctypes.Structure):
    _fields_ = [("fleet_id", ctypes.c_uint32), ("run", ctypes.c_uint32), ("round", ctypes.c_uint32)]


class Secrets(ctypes.Structure):
    _fields_ = [("ctx", Round), ("device_id", ctypes.c_uint32), ("c_sk", ctypes.c_uint8 * 32),
                ("s_sk", ctypes.c_uint8 * 32), ("b_seed", ctypes.c_uint8 * 16),
                ("coefficient_key", ctypes.c_uint8 * 32)]


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, vp, u32, uint = ctypes.POINTER, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint
    signatures = {
        "fedtiny_secagg_reason": ([ctypes.c_int], ctypes.c_char_p),
        "fedtiny_secagg_derive": ([p(Secrets), ctypes.c_char_p, p(Round), u32], None),
        "fedtiny_secagg_wipe": ([p(Secrets)], None),
        "fedtiny_secagg_keys": ([p(Secrets), ctypes.c_char_p, vp], None),
        "fedtiny_secagg_check_keys": ([ctypes.c_char_p, p(Round), u32, ctypes.c_char_p], ctypes.c_int),
        "fedtiny_secagg_share": ([p(Secrets), uint, uint, vp], ctypes.c_int),
        "fedtiny_secagg_seal_share": ([p(Secrets), ctypes.c_char_p, u32, uint, ctypes.c_char_p, vp], ctypes.c_int),
        "fedtiny_secagg_open_share": ([p(Secrets), ctypes.c_char_p, u32, ctypes.c_char_p, p(uint), vp],
                                      ctypes.c_int),
        "fedtiny_secagg_bounds": ([p(WirePlan), ctypes.c_float, ctypes.c_float, vp], ctypes.c_int),
        "fedtiny_secagg_bits": ([p(WirePlan), vp, u32, vp], ctypes.c_int),
        "fedtiny_secagg_packed_bytes": ([p(WirePlan), vp], u32),
        "fedtiny_secagg_mask": ([p(WirePlan), p(Secrets), vp, vp, vp, vp, uint, vp, vp, ctypes.c_size_t,
                                 p(ctypes.c_size_t)], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


class CSecAgg:
    """fedtiny_secagg.c's functions over one plan's library, each checked: a refusal is the ProtocolError
    secagg.py raises for the same input (its reason from fedtiny_secagg_reason)."""

    def __init__(self, library: CNodeLibrary):
        self.library, self.lib = library, bind(library.lib)
        self.n = len(library.names)

    def _check(self, status: int, what: str) -> None:
        if status:
            reason = self.lib.fedtiny_secagg_reason(status).decode()
            if reason == "argument":
                raise ValueError(f"{what}: the C node refused its arguments")
            raise ProtocolError(reason, f"C node: {what}")

    def secrets(self, identity: bytes, ctx: RoundContext, device_id: int) -> Secrets:
        secrets = Secrets()
        self.lib.fedtiny_secagg_derive(ctypes.byref(secrets), identity[:64], ctypes.byref(Round(*_ctx(ctx))),
                                       device_id)
        return secrets

    def keys(self, secrets: Secrets, identity: bytes) -> bytes:
        out = ctypes.create_string_buffer(160)
        self.lib.fedtiny_secagg_keys(ctypes.byref(secrets), identity[:64], out)
        return out.raw

    def check_keys(self, public: bytes, ctx: RoundContext, device_id: int, keys: bytes) -> None:
        self._check(self.lib.fedtiny_secagg_check_keys(public, ctypes.byref(Round(*_ctx(ctx))), device_id, keys),
                    f"SECAGG_KEYS of device {device_id:#010x}")

    def share(self, secrets: Secrets, t: int, index: int) -> bytes:
        out = ctypes.create_string_buffer(48)
        self._check(self.lib.fedtiny_secagg_share(ctypes.byref(secrets), t, index, out), "share")
        return out.raw

    def seal_share(self, secrets: Secrets, c_pk: bytes, receiver: int, index: int, shares: bytes) -> bytes:
        out = ctypes.create_string_buffer(76)
        self._check(self.lib.fedtiny_secagg_seal_share(ctypes.byref(secrets), c_pk, receiver, index, shares, out),
                    f"share for {receiver:#010x}")
        return out.raw

    def open_share(self, secrets: Secrets, c_pk: bytes, sender: int, ciphertext: bytes) -> tuple[int, bytes]:
        index, out = ctypes.c_uint(), ctypes.create_string_buffer(48)
        self._check(self.lib.fedtiny_secagg_open_share(ctypes.byref(secrets), c_pk, sender, ciphertext,
                                                       ctypes.byref(index), out), f"share from {sender:#010x}")
        return index.value, out.raw

    def bounds(self, clip_norm: float, noise_sigma: float = 0.0) -> dict[str, int]:
        out = (ctypes.c_int32 * self.n)()
        self._check(self.lib.fedtiny_secagg_bounds(self.library.node_plan.wire, clip_norm, noise_sigma, out),
                    "value bounds")
        return dict(zip(self.library.names, list(out)))

    def bits(self, bounds: dict[str, int], cohort: int) -> tuple[int, ...]:
        c_bounds = (ctypes.c_int32 * self.n)(*[bounds[n] for n in self.library.names])
        out = (ctypes.c_uint8 * self.n)()
        self._check(self.lib.fedtiny_secagg_bits(self.library.node_plan.wire, c_bounds, cohort, out),
                    f"moduli for a cohort of {cohort}")
        return tuple(out)

    def mask(self, secrets: Secrets, bounds: dict[str, int], bits: tuple[int, ...], neighbours: dict[int, bytes],
             delta: dict[str, np.ndarray]) -> bytes:
        """The packed masked values of `delta` with the pairwise masks of `neighbours` (id -> s_pk)."""
        names = self.library.names
        flat = np.concatenate([np.clip(np.asarray(delta[n], np.int64).reshape(-1), -2**31, 2**31 - 1)
                               for n in names]).astype(np.int32)
        values = (ctypes.c_int32 * len(flat))(*flat.tolist())
        c_bounds = (ctypes.c_int32 * self.n)(*[bounds[n] for n in names])
        c_bits = (ctypes.c_uint8 * self.n)(*bits)
        ids = sorted(neighbours)
        c_ids = (ctypes.c_uint32 * max(1, len(ids)))(*ids)
        s_pk = ctypes.create_string_buffer(b"".join(neighbours[i] for i in ids), max(1, 32 * len(ids)))
        need = self.lib.fedtiny_secagg_packed_bytes(self.library.node_plan.wire, c_bits)
        out, length = ctypes.create_string_buffer(max(1, need)), ctypes.c_size_t()
        self._check(self.lib.fedtiny_secagg_mask(self.library.node_plan.wire, ctypes.byref(secrets), c_bounds, c_bits,
                                                 c_ids, s_pk, len(ids), values, out, need, ctypes.byref(length)),
                    "masking")
        return out.raw[:length.value]


def _ctx(ctx: RoundContext) -> tuple[int, int, int]:
    return ctx.fleet_id, ctx.run, ctx.round


class CSecAggDevice(SecAggDevice):
    """SecAggDevice's stage checks over the C steps: every cryptographic step and the masking in fedtiny_secagg.c."""

    def __init__(self, library: CNodeLibrary, identity: Identity, device_id: int, ctx: RoundContext,
                 peers: Mapping[int, PublicIdentity], clip_norm: float, noise_sigma: float = 0.0,
                 min_survivors: int = 0) -> None:
        self.c = CSecAgg(library)
        super().__init__(library.plan, identity, device_id, ctx, peers, clip_norm, noise_sigma, min_survivors)

    def keys(self) -> SecAggKeys:
        return SecAggKeys.decode(self.c.keys(self.secrets, self.identity.to_bytes()))

    def _value_bounds(self, clip_norm: float, noise_sigma: float) -> dict[str, int]:
        return self.c.bounds(clip_norm, noise_sigma)

    def _derive(self) -> Secrets:
        return self.c.secrets(self.identity.to_bytes(), self.ctx, self.device_id)

    def _modulus_bits(self, cohort: int) -> tuple[int, ...]:
        return self.c.bits(self.bounds, cohort)

    def _check_keys(self, identity: PublicIdentity, device_id: int, keys: SecAggKeys) -> None:
        self.c.check_keys(identity.to_bytes(), self.ctx, device_id, keys.encode())

    def _sealed_shares(self, t: int, c_pks: dict[int, bytes]) -> list[tuple[int, bytes]]:
        return [(v, self.c.seal_share(self.secrets, c_pk, v, i + 1, self.c.share(self.secrets, t, i + 1)))
                for i, (v, c_pk) in enumerate(c_pks.items())]

    def _open_share(self, sender: int, c_pk: bytes, ciphertext: bytes) -> tuple[int, bytes]:
        return self.c.open_share(self.secrets, c_pk, sender, ciphertext)

    def _mask(self, delta: dict[str, np.ndarray], bits: tuple[int, ...], s_pks: dict[int, bytes]) -> bytes:
        return self.c.mask(self.secrets, self.bounds, bits, s_pks, delta)


# ---- the steps on the Cortex-M4, counted -----------------------------------------------------------------------

SECAGG_ELF = "fedtiny_secagg.elf"
SECAGG_OPERATIONS = ("keys", "verify", "share", "open", "noise", "mask")  # firmware_secagg.c's regions, in order


@dataclass
class SecAggCase:
    """A device's round for firmware_secagg.c: its identity, `degree` neighbours with their signed keys, a share
    the first neighbour sealed for it, and the clipped delta to noise and mask; `vectors` is secagg_vectors.c."""

    identity: Identity
    device_id: int
    ctx: RoundContext
    neighbours: dict[int, SecAggKeys]
    threshold: int
    cohort: int
    clip_norm: float
    noise_sigma: float
    delta: dict[str, np.ndarray]
    shares: bytes  # what the sealed share holds
    vectors: str


def _c_array(ctype: str, name: str, values: list[int], fmt: str = "{}u") -> str:
    rows = [", ".join(fmt.format(v) for v in values[i:i + 12]) for i in range(0, len(values), 12)]
    return f"const {ctype} {name}[{max(1, len(values))}] = {{\n    " + (",\n    ".join(rows) or "0") + "\n};\n"


def secagg_case(plan, delta: dict[str, np.ndarray], degree: int, cohort: int, clip_norm: float,
                noise_sigma: float) -> SecAggCase:
    from fedtiny.protocol.secagg import RoundSecrets, seal_share, share_key

    ctx = RoundContext(0x5EC0A66, 3, 7)
    private = {1000 + i: Identity.from_seed(f"secagg node {i}".encode()) for i in range(degree + 1)}
    device_id, *others = sorted(private)
    secrets = {i: RoundSecrets.derive(private[i], ctx, i) for i in private}
    keys = {i: secrets[i].keys(private[i], ctx, i) for i in private}
    first = others[0]
    shares = bytes(range(7, 55))
    sealed = seal_share(share_key(secrets[first].c_key, keys[device_id].c_pk, ctx, first, device_id), ctx, first,
                        device_id, 5, shares[:16], shares[16:32], shares[32:])
    flat = np.concatenate([np.asarray(delta[n], np.int64).reshape(-1) for n in plan.trainable_buffers()])
    vectors = "".join([
        "/* Generated by fedtiny_device.csecagg.render: inputs of firmware_secagg.c. */\n#include <stdint.h>\n\n",
        f"const uint32_t sv_fleet_id = {ctx.fleet_id}u, sv_run = {ctx.run}u, sv_round = {ctx.round}u;\n",
        f"const uint32_t sv_device_id = {device_id}u, sv_threshold = {threshold(degree)}u, sv_cohort = {cohort}u;\n",
        f"const uint32_t sv_n_neighbours = {degree}u, sv_n_values = {len(flat)}u;\n",
        f"const float sv_clip_norm = {float(np.float32(clip_norm)).hex()}f, "
        f"sv_noise_sigma = {float(np.float32(noise_sigma)).hex()}f;\n",
        _c_array("uint32_t", "sv_neighbour_ids", others),
        f"const uint8_t sv_neighbour_keys[{degree}][160] = {{\n" + ",\n".join(
            "    {" + ", ".join(f"0x{b:02x}" for b in keys[i].encode()) + "}" for i in others) + "\n};\n",
        _c_array("uint8_t", "sv_neighbour_public", list(private[first].public.to_bytes()), "0x{:02x}"),
        _c_array("uint8_t", "sv_identity", list(private[device_id].to_bytes()), "0x{:02x}"),
        _c_array("uint8_t", "sv_sealed_share", list(sealed), "0x{:02x}"),
        _c_array("int32_t", "sv_values", [int(v) for v in flat], "{}"),
    ])
    return SecAggCase(private[device_id], device_id, ctx, {i: keys[i] for i in others}, threshold(degree), cohort,
                      clip_norm, noise_sigma, delta, shares, vectors)


def build_secagg_firmware(library: CNodeLibrary, vectors: str, cache_dir=None):
    """The Cortex-M4 firmware (firmware_secagg.c) of library's plan around these vectors."""
    from . import codegen, cruntime
    from .cnode import node_sources

    rt = codegen.runtime_dir()
    files = node_sources(library.plan)
    for name in ("firmware_secagg.c", "fedtiny_boot.c", "fedtiny_boot.h", "fedtiny_m4.ld", "fedtiny_node.ld"):
        files[name] = (rt / name).read_bytes()
    files["secagg_vectors.c"] = vectors
    return cruntime.make_cached(files, "m4-secagg", SECAGG_ELF, cache_dir)


@dataclass
class SecAggRun:
    instructions: dict[str, int]  # executed instructions per operation (SECAGG_OPERATIONS)
    stack: dict[str, int]  # peak stack bytes per operation
    keys: bytes  # the SECAGG_KEYS body the firmware made
    opened: tuple[int, bytes]  # the index and shares it opened
    packed: bytes  # its masked values
    returncode: int


def run_secagg_firmware(elf, timeout: float = 300, cache_dir=None) -> SecAggRun:
    import re

    from . import cruntime

    run = cruntime.run_counted(elf, timeout, cache_dir)
    out, each = run.result.stdout, run.each
    stack = {m[1]: int(m[2]) for m in re.finditer(r"^op (\w+) stack (\d+)$", out, re.M)}
    if len(each) != len(SECAGG_OPERATIONS) or list(stack) != list(SECAGG_OPERATIONS):
        raise RuntimeError(f"secagg firmware ran {len(each)} regions, printed {list(stack)}:\n{out}")
    keys, opened, packed = (re.search(rf"^{k} (?:(\d+) )?([0-9a-f]*)$", out, re.M) for k in ("keys", "opened",
                                                                                            "packed"))
    return SecAggRun(dict(zip(SECAGG_OPERATIONS, each)), stack, bytes.fromhex(keys[2]),
                     (int(opened[1]), bytes.fromhex(opened[2])), bytes.fromhex(packed[2]), run.result.returncode)
