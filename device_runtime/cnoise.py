"""The node's DP noise in C (device_runtime/c/fedtiny_noise.c, in libfedtiny_node.so) on the host through ctypes:
`c_noise_delta(plan, identity, run, round, delta, sigma, limits)` draws what fedtiny.protocol.noise.add_noise draws
for the same device, run and round (tests/test_dp_distributed.py compares the two bit for bit)."""

import ctypes

import numpy as np

from .cnode import CNodeLibrary, WirePlan


class NoiseSource(ctypes.Structure):
    _fields_ = [("word", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("used", ctypes.c_uint64)]


class NoiseStream(ctypes.Structure):
    _fields_ = [("key", ctypes.c_uint8 * 32), ("nonce", ctypes.c_uint8 * 12), ("counter", ctypes.c_uint32),
                ("block", ctypes.c_uint8 * 64), ("next", ctypes.c_uint8)]


def _bind(lib: ctypes.CDLL) -> None:
    p = ctypes.POINTER
    lib.fedtiny_noise_key.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.fedtiny_noise_key.restype = None
    lib.fedtiny_noise_stream_init.argtypes = [p(NoiseStream), ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64,
                                              p(NoiseSource)]
    lib.fedtiny_noise_stream_init.restype = None
    lib.fedtiny_noise_add.argtypes = [p(WirePlan), ctypes.c_void_p, ctypes.c_double, p(NoiseSource),
                                      ctypes.c_void_p]
    lib.fedtiny_noise_add.restype = ctypes.c_int
    lib.fedtiny_wire_reason.argtypes = [ctypes.c_int]
    lib.fedtiny_wire_reason.restype = ctypes.c_char_p


def c_noise_key(library: CNodeLibrary, identity: bytes) -> bytes:
    _bind(library.lib)
    key = ctypes.create_string_buffer(32)
    library.lib.fedtiny_noise_key(identity[:64], key)
    return key.raw


def c_noise_delta(library: CNodeLibrary, identity: bytes, run: int, round_: int, delta: dict[str, np.ndarray],
                  sigma: float, limits: dict[str, int] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """(noised delta per buffer as int64, keystream words drawn): fedtiny_noise_add with the noise key of
    `identity` (64 bytes), for (run, round); ValueError naming the C status on a refusal."""
    lib = library.lib
    _bind(lib)
    key = c_noise_key(library, identity)
    stream, source = NoiseStream(), NoiseSource()
    lib.fedtiny_noise_stream_init(ctypes.byref(stream), key, run, round_, ctypes.byref(source))
    flat = np.concatenate([np.asarray(delta[n], np.int64).reshape(-1) for n in library.names]).astype(np.int32)
    out = (ctypes.c_int32 * len(flat))(*flat.tolist())
    c_limits = (ctypes.c_int32 * len(library.names))(*[limits[n] for n in library.names]) if limits else None
    status = lib.fedtiny_noise_add(library.node_plan.wire, out, sigma, ctypes.byref(source), c_limits)
    if status:
        raise ValueError(f"fedtiny_noise_add: {lib.fedtiny_wire_reason(status).decode()}")
    values, start = np.frombuffer(out, np.int32).astype(np.int64), 0
    result = {}
    for name in library.names:
        size = int(np.prod(library.shapes[name]))
        result[name] = values[start:start + size].reshape(library.shapes[name])
        start += size
    return result, int(source.used)
