"""The node's message bodies and model updates in C (device_runtime/c/fedtiny_wire.c) against the Python
specification (fedtiny/protocol/messages.py, task.py, delta.py, update.py), byte for byte:

- JOIN, STATUS, LEAVE, ACK bodies as messages.py encodes them; TASK and ACK decoded with the same checks and
  reasons, task_settings included;
- update.uplink (state delta, error feedback, clipping, sparse int4/int8/int16/int32 encoding) on random states
  of three plans (a small MLP, the conformance plan, sensor_cnn "full" and its default scheme): the same DELTA
  body and the same carry;
- GLOBAL_UPDATEs made by SentStates (deltas and FULL_STATE) applied as update.apply_global_update does, and
  malformed, truncated, oversized, out-of-plan, int8-overflowing and padding-violating ones refused with
  Python's reason and the state left as it was;
- the Cortex-M4 build (arm-none-eabi-gcc): its flash size and stack.

The host library is built with the Makefile's host-wire target (gcc), cached like every cruntime build; without
gcc / make / arm-none-eabi-gcc these tests skip on a user's machine and fail in CI.
"""

import ctypes
import math
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.planfile import load_plan
from fedtiny.protocol import delta as deltamod
from fedtiny.protocol.delta import BLOB_HEADER, ENTRY_HEADER, DeltaEntry, encode_delta
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import MAX_ACK_MISSING, Ack, GlobalUpdate, Join, Leave, Status, Task
from fedtiny.protocol.task import task_body, task_settings
from fedtiny.protocol.update import (
    FULL_STATE, SentStates, apply_global_update, delta_limits, global_update, max_delta_body_bytes, row_scales,
    state_delta, state_entries, uplink,
)
from fedtiny.quantize import quantize
from fedtiny.scheme import REFERENCE_SPARSE, parse
from fedtiny_device import codegen, cruntime

HERE = Path(__file__).parent
HOST_LIB = "libfedtiny_wire.so"
INT8, INT32 = 1, 3


def wire_sources() -> dict[str, bytes]:
    rt = codegen.runtime_dir()
    return {name: (rt / name).read_bytes() for name in ("fedtiny_wire.c", "fedtiny_wire.h", "Makefile")}


# ---- ctypes mirror of fedtiny_wire.h ---------------------------------------------------------------------------

class Tensor(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_uint8), ("rows", ctypes.c_uint32), ("inner", ctypes.c_uint32),
                ("scales", ctypes.POINTER(ctypes.c_double))]


class PlanDesc(ctypes.Structure):
    _fields_ = [("tensors", ctypes.POINTER(Tensor)), ("n_tensors", ctypes.c_uint16), ("max_body", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("max_elements", ctypes.c_uint32)]


class JoinBody(ctypes.Structure):
    _fields_ = [("memory_budget_bytes", ctypes.c_uint32), ("flash_budget_bytes", ctypes.c_uint32),
                ("max_mqtt_payload", ctypes.c_uint32), ("features", ctypes.c_uint16),
                ("plan_version", ctypes.c_uint32), ("plan_hash", ctypes.c_uint8 * 32)]


class StatusBody(ctypes.Structure):
    _fields_ = [("state", ctypes.c_uint8), ("battery_pct", ctypes.c_uint8), ("uptime_s", ctypes.c_uint32),
                ("free_memory_bytes", ctypes.c_uint32), ("next_wake_s", ctypes.c_uint32)]


class AckBody(ctypes.Structure):
    _fields_ = [("acked_type", ctypes.c_uint8), ("status", ctypes.c_uint8), ("n_missing", ctypes.c_uint16),
                ("acked_seq", ctypes.c_uint32), ("transfer_id", ctypes.c_uint32),
                ("missing", ctypes.c_uint32 * MAX_ACK_MISSING)]


class TaskBody(ctypes.Structure):
    _fields_ = [("plan_version", ctypes.c_uint32), ("plan_hash", ctypes.c_uint8 * 32),
                ("local_steps", ctypes.c_uint16), ("batch_size", ctypes.c_uint16),
                ("learning_rate", ctypes.c_float), ("clip_norm", ctypes.c_float), ("deadline_s", ctypes.c_uint32),
                ("max_mqtt_payload", ctypes.c_uint32), ("task_flags", ctypes.c_uint16),
                ("config_len", ctypes.c_uint16), ("config", ctypes.c_void_p)]


class Settings(ctypes.Structure):
    _fields_ = [("epochs", ctypes.c_uint16), ("steps", ctypes.c_uint16), ("batch_size", ctypes.c_uint16),
                ("learning_rate", ctypes.c_float), ("clip_norm", ctypes.c_float), ("deadline_s", ctypes.c_uint32),
                ("uplink_keep_pct", ctypes.c_uint16), ("noise_sigma", ctypes.c_float), ("min_survivors", ctypes.c_uint32),
                ("masked", ctypes.c_uint8)]


class CWire:
    """libfedtiny_wire.so through ctypes."""

    def __init__(self, cache_dir: Path):
        lib = ctypes.CDLL(str(cruntime.make_cached(wire_sources(), "host-wire", HOST_LIB, cache_dir)))
        P, u8p, u32, size = ctypes.POINTER(PlanDesc), ctypes.c_char_p, ctypes.c_uint32, ctypes.c_size_t
        sizep = ctypes.POINTER(size)
        lib.fedtiny_wire_reason.argtypes, lib.fedtiny_wire_reason.restype = [ctypes.c_int], ctypes.c_char_p
        lib.fedtiny_wire_plan_check.argtypes = [P]
        for name in ("state_bytes", "delta_bytes", "uplink_bytes_max"):
            getattr(lib, f"fedtiny_wire_{name}").argtypes = [P]
            getattr(lib, f"fedtiny_wire_{name}").restype = u32
        for name in ("state_offset", "delta_offset"):
            getattr(lib, f"fedtiny_wire_{name}").argtypes = [P, ctypes.c_uint16]
            getattr(lib, f"fedtiny_wire_{name}").restype = u32
        lib.fedtiny_wire_encode_join.argtypes = [ctypes.POINTER(JoinBody), ctypes.c_void_p, size, sizep]
        lib.fedtiny_wire_encode_status.argtypes = [ctypes.POINTER(StatusBody), ctypes.c_void_p, size, sizep]
        lib.fedtiny_wire_encode_leave.argtypes = [ctypes.c_uint8, ctypes.c_void_p, size, sizep]
        lib.fedtiny_wire_encode_ack.argtypes = [ctypes.POINTER(AckBody), ctypes.c_void_p, size, sizep]
        lib.fedtiny_wire_decode_task.argtypes = [u8p, u32, ctypes.POINTER(TaskBody)]
        lib.fedtiny_wire_task_settings.argtypes = [ctypes.POINTER(TaskBody), ctypes.POINTER(Settings)]
        lib.fedtiny_wire_decode_ack.argtypes = [u8p, u32, ctypes.POINTER(AckBody)]
        lib.fedtiny_wire_check_global_update.argtypes = [P, u8p, u32]
        lib.fedtiny_wire_apply_global_update.argtypes = [P, u8p, u32, u32, ctypes.c_void_p]
        lib.fedtiny_wire_uplink.argtypes = [P, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint16,
                                            ctypes.c_float, u32, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                                            ctypes.c_void_p, size, sizep]
        self.lib = lib

    def reason(self, status: int) -> str:
        return self.lib.fedtiny_wire_reason(status).decode()

    def encode(self, fn: str, arg) -> bytes:
        out, n = ctypes.create_string_buffer(512), ctypes.c_size_t()
        status = getattr(self.lib, f"fedtiny_wire_encode_{fn}")(arg, out, len(out), ctypes.byref(n))
        if status:
            raise ProtocolError(self.reason(status), fn)
        return out.raw[: n.value]


def align4(n: int) -> int:
    return (n + 3) & ~3


class CPlan:
    """A plan's descriptor as the code generator will emit it, and the state / delta layouts (computed here
    independently of the C, which a test compares)."""

    def __init__(self, wire: CWire, plan):
        self.wire, self.lib, self.plan = wire, wire.lib, plan
        self.names = plan.trainable_buffers()
        scales = row_scales(plan)
        self.shapes = {n: tuple(plan.buffers[n].shape) for n in self.names}
        self.dtypes = {n: np.dtype(np.int8 if plan.buffers[n].dtype == "int8" else np.int32) for n in self.names}
        self._scales = [np.ascontiguousarray(scales[n], np.float64) for n in self.names]
        self._tensors = (Tensor * len(self.names))(*[
            Tensor(INT8 if self.dtypes[n] == np.int8 else INT32, self.shapes[n][0],
                   int(np.prod(self.shapes[n][1:])), s.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
            for n, s in zip(self.names, self._scales)])
        self.limits = delta_limits(plan)
        self.desc = PlanDesc(self._tensors, len(self.names), self.limits.max_body, self.limits.max_entries,
                             self.limits.max_elements)
        self.state_at, self.delta_at, s, d = {}, {}, 0, 0
        for n in self.names:
            size = int(np.prod(self.shapes[n]))
            self.state_at[n], self.delta_at[n] = s, d
            s = align4(s + size * self.dtypes[n].itemsize)
            d = align4(d + size * (2 if self.dtypes[n] == np.int8 else 4))
        self.state_bytes, self.delta_bytes = s, d

    def delta_dtype(self, name):
        return np.dtype(np.int16 if self.dtypes[name] == np.int8 else np.int32)

    def pack(self, values: dict | None, delta: bool = False) -> ctypes.Array:
        buf = ctypes.create_string_buffer(self.delta_bytes if delta else self.state_bytes)
        for n in self.names if values is not None else ():
            dtype = self.delta_dtype(n) if delta else self.dtypes[n]
            raw = np.asarray(values[n]).astype(dtype.newbyteorder("<"), copy=False).tobytes()
            at = (self.delta_at if delta else self.state_at)[n]
            ctypes.memmove(ctypes.addressof(buf) + at, raw, len(raw))
        return buf

    def unpack(self, buf, delta: bool = False) -> dict:
        out = {}
        for n in self.names:
            dtype = self.delta_dtype(n) if delta else self.dtypes[n]
            at = (self.delta_at if delta else self.state_at)[n]
            out[n] = np.frombuffer(buf.raw, dtype.newbyteorder("<"), int(np.prod(self.shapes[n])), at).reshape(
                self.shapes[n]).astype(dtype)
        return out

    def uplink(self, base, trained, carry, keep_pct, clip_norm, num_examples, loss, accuracy, personal=None,
               capacity=None):
        """(DELTA body, new carry) from the C, or ProtocolError with its reason (carry_buf then unchanged)."""
        carry_buf = self.pack(carry, delta=True)
        before = carry_buf.raw
        capacity = self.lib.fedtiny_wire_uplink_bytes_max(self.desc) if capacity is None else capacity
        out, n = ctypes.create_string_buffer(max(capacity, 1)), ctypes.c_size_t()
        status = self.lib.fedtiny_wire_uplink(ctypes.byref(self.desc), self.pack(base), self.pack(trained),
                                              carry_buf, keep_pct, clip_norm, num_examples, loss, accuracy,
                                              -1.0 if personal is None else personal, out, capacity, ctypes.byref(n))
        if status:
            assert carry_buf.raw == before, "a failed uplink changed the carry"
            raise ProtocolError(self.wire.reason(status), "C uplink")
        return out.raw[: n.value], self.unpack(carry_buf, delta=True)

    def apply(self, body: bytes, held: int, state: dict) -> tuple[str, dict]:
        """(reason or "ok", the state after the C apply); on an error the state bytes must be unchanged."""
        buf = self.pack(state)
        before = buf.raw
        status = self.lib.fedtiny_wire_apply_global_update(ctypes.byref(self.desc), body, len(body), held, buf)
        check = self.lib.fedtiny_wire_check_global_update(ctypes.byref(self.desc), body, len(body))
        if status:
            assert buf.raw == before, f"a refused GLOBAL_UPDATE ({self.wire.reason(status)}) changed the state"
        if check:  # the structural check alone refuses exactly the structural errors, with the same reason
            assert check == status
        return self.wire.reason(status), self.unpack(buf)


# ---- plans and states -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    require_tool("gcc")
    require_tool("make")
    return CWire(tmp_path_factory.mktemp("cwire_cache"))


def _mlp_plan():
    x = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
    graph = quantize(zoo.build("mlp", (6,), 3), x)
    return compile_plan(graph, parse("last:2", graph))


def _sensor_plans():
    import torch

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 1, 256)).astype(np.float32)
    graph = quantize(zoo.build("sensor_cnn", (1, 256), 4).eval(), x)
    return {"sensor_cnn_full": compile_plan(graph, parse("full", graph)),
            "sensor_cnn_default": compile_plan(graph, parse(REFERENCE_SPARSE["sensor_cnn"], graph))}


@pytest.fixture(scope="module")
def plans():
    return {"mlp": _mlp_plan(), "conformance": load_plan(HERE / "conformance" / "plan.ftp")} | _sensor_plans()


PLAN_NAMES = ["mlp", "conformance", "sensor_cnn_full", "sensor_cnn_default"]


def random_state(cp: CPlan, rng) -> dict:
    out = {}
    for n in cp.names:
        info = np.iinfo(cp.dtypes[n])
        out[n] = rng.integers(info.min, info.max, cp.shapes[n], endpoint=True, dtype=np.int64).astype(cp.dtypes[n])
    return out


def changed(cp: CPlan, base: dict, rng, kind: str) -> dict:
    """base with a change of one kind: none, sparse small (int4), int8-sized, int16-sized (int8 deltas past
    +-127), every element, or int32 biases moved anywhere (wrapping)."""
    out = {}
    for n in cp.names:
        b = base[n].astype(np.int64)
        if kind == "none":
            step = np.zeros_like(b)
        elif kind == "small":
            step = rng.integers(-4, 5, b.shape) * (rng.random(b.shape) < 0.3)
        elif kind == "int8":
            step = rng.integers(-100, 101, b.shape) * (rng.random(b.shape) < 0.5)
        elif kind == "int16":
            step = rng.integers(-255, 256, b.shape) * (rng.random(b.shape) < 0.5)
            if cp.dtypes[n] == np.int32:
                step = rng.integers(-30000, 30001, b.shape)
        else:  # "all": every element moves
            step = rng.choice([-1, 1], b.shape) * rng.integers(1, 3, b.shape)
            if cp.dtypes[n] == np.int32:
                step = rng.choice([-1, 1], b.shape) * rng.integers(1, 2**31, b.shape)
        if cp.dtypes[n] == np.int8:
            new = np.clip(b + step, -128, 127)
            if kind == "all":  # clipping may undo a step: step the other way there
                new = np.where(new == b, np.clip(b - step, -128, 127), new)
            out[n] = new.astype(np.int8)
        else:
            out[n] = ((b + step) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    return out


def random_carry(cp: CPlan, rng, size: int) -> dict:
    out = {}
    for n in cp.names:
        if cp.dtypes[n] == np.int8:
            out[n] = (rng.integers(-size, size + 1, cp.shapes[n]) * (rng.random(cp.shapes[n]) < 0.4)).astype(np.int16)
        else:
            out[n] = rng.integers(-2**31, 2**31, cp.shapes[n], dtype=np.int64).astype(np.int32)
    return out


def real_norm(cp: CPlan, delta: dict) -> float:
    scales = row_scales(cp.plan)
    return math.sqrt(sum(float(np.sum((delta[n].astype(np.float64).reshape(len(scales[n]), -1)
                                       * scales[n][:, None]) ** 2)) for n in cp.names))


def py_uplink(cp, base, trained, carry, keep_pct, clip_norm, num, loss, accuracy, personal=None):
    body, new_carry = uplink(cp.plan, base, trained, carry, keep=keep_pct / 100, clip_norm=float(clip_norm),
                             num_examples=num, loss=loss, accuracy=accuracy, personal_accuracy=personal)
    return body.encode(), new_carry


# ---- layout and fixed bodies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLAN_NAMES)
def test_layout_is_the_plans_buffers_4_byte_aligned(wire, plans, name):
    cp = CPlan(wire, plans[name])
    lib = wire.lib
    assert lib.fedtiny_wire_plan_check(ctypes.byref(cp.desc)) == 0
    assert lib.fedtiny_wire_state_bytes(cp.desc) == cp.state_bytes
    assert lib.fedtiny_wire_delta_bytes(cp.desc) == cp.delta_bytes
    for i, n in enumerate(cp.names):
        assert lib.fedtiny_wire_state_offset(cp.desc, i) == cp.state_at[n]
        assert lib.fedtiny_wire_delta_offset(cp.desc, i) == cp.delta_at[n]
    state = random_state(cp, np.random.default_rng(1))
    assert all(np.array_equal(v, state[n]) for n, v in cp.unpack(cp.pack(state)).items())


def test_plan_check_refuses_what_the_code_cannot_handle(wire, plans):
    cp = CPlan(wire, plans["mlp"])
    check = wire.lib.fedtiny_wire_plan_check
    for field, value in (("dtype", 2), ("rows", 0), ("inner", 0), ("scales", None)):
        bad = (Tensor * len(cp.names))(*cp._tensors)
        setattr(bad[0], field, value)
        desc = PlanDesc(bad, len(cp.names), 1, 1, 1)
        assert wire.reason(check(ctypes.byref(desc))) == "argument", field
    assert wire.reason(check(ctypes.byref(PlanDesc(cp._tensors, 0, 1, 1, 1)))) == "argument"


def test_fixed_bodies_are_messages_py_bytes(wire):
    rng = np.random.default_rng(5)
    for _ in range(50):
        u32 = [int(v) for v in rng.integers(0, 2**32, 6, dtype=np.uint64)]
        phash = rng.bytes(32)
        join = Join(u32[0], u32[1], u32[2], int(rng.integers(0, 2**16)), u32[3], phash)
        cjoin = JoinBody(join.memory_budget_bytes, join.flash_budget_bytes, join.max_mqtt_payload, join.features,
                         join.plan_version, (ctypes.c_uint8 * 32)(*phash))
        assert wire.encode("join", ctypes.byref(cjoin)) == join.encode()
        status = Status(int(rng.integers(0, 5)), int(rng.integers(0, 256)), u32[3], u32[4], u32[5])
        cstatus = StatusBody(status.state, status.battery_pct, status.uptime_s, status.free_memory_bytes,
                             status.next_wake_s)
        assert wire.encode("status", ctypes.byref(cstatus)) == status.encode()
        reason = int(rng.integers(0, 256))
        assert wire.encode("leave", reason) == Leave(reason).encode()
        missing = tuple(int(v) for v in rng.integers(0, 2**32, int(rng.integers(0, MAX_ACK_MISSING + 1)),
                                                     dtype=np.uint64))
        ack = Ack(int(rng.integers(1, 8)), int(rng.integers(0, 4)), u32[0], u32[1], missing)
        cack = AckBody(ack.acked_type, ack.status, len(missing), ack.acked_seq, ack.transfer_id,
                       (ctypes.c_uint32 * MAX_ACK_MISSING)(*missing))
        assert wire.encode("ack", ctypes.byref(cack)) == ack.encode()
    cack.n_missing = MAX_ACK_MISSING + 1  # Ack.encode's ValueError
    with pytest.raises(ProtocolError, match="argument"):
        wire.encode("ack", ctypes.byref(cack))
    out, n = ctypes.create_string_buffer(51), ctypes.c_size_t()
    assert wire.reason(wire.lib.fedtiny_wire_encode_join(ctypes.byref(cjoin), out, 51, ctypes.byref(n))) == "buffer"


def py_outcome(decode):
    try:
        return "ok", decode()
    except ProtocolError as err:
        return err.reason, None


def test_task_decode_and_settings_as_python(wire, plans):
    lib, plan = wire.lib, plans["mlp"]
    rng = np.random.default_rng(6)
    bodies = [task_body(plan, rng.bytes(32), {"epochs": e, "uplink_keep": k, "clip_norm": c, "steps": s}, p).encode()
              for e, k, c, s, p in [(1, 1.0, 0.0, 0, 256), (3, 0.01, 2.5, 7, 1024), (65535, 0.5, 1e-3, 65535, 64),
                                    (0, 0.99, float("inf"), 1, 0)]]
    good = bodies[1]
    bodies += [Task(1, bytes(32), 1, 1, 0.5, 0.0, 10, 256, 3, config=rng.bytes(n)).encode() for n in (0, 3, 5, 1024)]
    bodies += [good[:60] + struct.pack("<HH", 2, keep) for keep in (99, 100, 101, 65535)]  # keep_pct >= 100: bad-task
    bodies += [task_body(plan, rng.bytes(32), {"noise_sigma": 0.25, "min_survivors": 5, "secagg": 1, "clip_norm": 1},
                         256).encode()]  # the 12-byte config with noise, masked
    bodies += [good[:58] + struct.pack("<HHHfI", 12, 2, 50, sigma, 3) for sigma in (-1.0, float("nan"), 0.0)]
    bodies += [good[:n] for n in range(0, len(good))]  # truncated anywhere
    bodies += [good + b"\0", good[:58] + struct.pack("<H", 1025) + bytes(1025), good[:58] + b"\xff\xff"]
    reasons = set()
    for body in bodies:
        expected, task = py_outcome(lambda: Task.decode(body))
        ctask = TaskBody()
        got = wire.reason(lib.fedtiny_wire_decode_task(body, len(body), ctypes.byref(ctask)))
        assert got == expected, body.hex()
        reasons.add(got)
        if task is None:
            continue
        assert (ctask.plan_version, bytes(ctask.plan_hash), ctask.local_steps, ctask.batch_size, ctask.deadline_s,
                ctask.max_mqtt_payload, ctask.task_flags) == (
            task.plan_version, task.plan_hash, task.local_steps, task.batch_size, task.deadline_s,
            task.max_mqtt_payload, task.task_flags)
        assert struct.pack("<ff", ctask.learning_rate, ctask.clip_norm) == body[40:48]
        assert ctypes.string_at(ctask.config, ctask.config_len) == task.config
        expected, settings = py_outcome(lambda: task_settings(task))
        csettings = Settings()
        got = wire.reason(lib.fedtiny_wire_task_settings(ctypes.byref(ctask), ctypes.byref(csettings)))
        assert got == expected
        reasons.add(got)
        if settings is not None:
            assert (csettings.epochs, csettings.steps, csettings.batch_size, csettings.deadline_s) == (
                settings["epochs"], settings["steps"], settings["batch_size"], settings["deadline_s"])
            assert csettings.uplink_keep_pct / 100 == settings["uplink_keep"]
            assert (csettings.learning_rate, csettings.clip_norm) == (settings["lr"], settings["clip_norm"])
            assert (csettings.noise_sigma, csettings.min_survivors, bool(csettings.masked)) == (
                settings["noise_sigma"], settings["min_survivors"], settings["masked"])
    assert reasons == {"ok", "truncated", "trailing-bytes", "oversized", "bad-task"}


def test_ack_decode_as_python(wire):
    rng = np.random.default_rng(7)
    good = [Ack(int(rng.integers(1, 8)), int(rng.integers(0, 4)), int(rng.integers(0, 2**32)),
                int(rng.integers(0, 2**32)), tuple(int(v) for v in rng.integers(0, 2**32, m))).encode()
            for m in (0, 1, 5, MAX_ACK_MISSING)]
    bodies = good + [good[2][:n] for n in range(len(good[2]))] + [good[1] + b"\0", good[0] + bytes(4)]
    bodies += [good[3][:2] + struct.pack("<H", MAX_ACK_MISSING + 1) + good[3][4:] + bytes(4)]
    reasons = set()
    for body in bodies:
        expected, ack = py_outcome(lambda: Ack.decode(body))
        cack = AckBody()
        got = wire.reason(wire.lib.fedtiny_wire_decode_ack(body, len(body), ctypes.byref(cack)))
        assert got == expected, body.hex()
        reasons.add(got)
        if ack is not None:
            assert (cack.acked_type, cack.status, cack.acked_seq, cack.transfer_id,
                    tuple(cack.missing[: cack.n_missing])) == (ack.acked_type, ack.status, ack.acked_seq,
                                                               ack.transfer_id, ack.missing)
    assert reasons == {"ok", "truncated", "trailing-bytes", "oversized"}


# ---- the uplink ---------------------------------------------------------------------------------------------------

KINDS = ("none", "small", "int8", "int16", "all")


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_uplink_is_pythons_delta_body_and_carry(wire, plans, name):
    cp = CPlan(wire, plans[name])
    rng = np.random.default_rng(11)
    seen_codes, clipped_cases, cases = set(), 0, 40 if name.startswith("sensor") else 80
    for case in range(cases):
        base = random_state(cp, rng)
        kind = KINDS[case % len(KINDS)]
        trained = changed(cp, base, rng, kind)
        carry = None if case % 3 == 0 else random_carry(cp, rng, [3, 200, 20000][case % 3])
        keep_pct = [100, 1, 50, 7, 99, 33, int(rng.integers(1, 101))][case % 7]
        full = real_norm(cp, state_delta(trained, base))
        clip = [0.0, full * rng.uniform(0.05, 1.2), full * 2, float("nan")][case % 4 if case % 5 else 1]
        clip = np.float32(clip)  # the TASK carries clip_norm as f32
        num, loss, accuracy = int(rng.integers(0, 2**32)), np.float32(rng.uniform(0, 5)), np.float32(rng.random())
        personal = None if case % 2 else np.float32([0.0, 1.0, rng.random()][case % 3])  # no held-out part, or one
        expected, expected_carry = py_uplink(cp, base, trained, carry, keep_pct, clip, num, loss, accuracy, personal)
        got, got_carry = cp.uplink(base, trained, carry, keep_pct, clip, num, loss, accuracy, personal)
        assert got == expected, f"case {case} ({kind}, keep {keep_pct}, clip {clip})"
        assert all(np.array_equal(got_carry[n], expected_carry[n]) for n in cp.names), f"carry, case {case}"
        entries = deltamod.decode_delta(got[8:])
        seen_codes |= set(_entry_codes(got[8:]))
        clipped_cases += clip > 0 and any(e.tensor_id != 0xFFFF for e in entries) and not math.isnan(clip)
    assert seen_codes >= {1, 3, 4} and clipped_cases > 5  # int8, int32 and int4 entries, clipping exercised
    if name == "mlp":
        assert 2 in seen_codes  # int16 entries


def _entry_codes(blob: bytes) -> list[int]:
    """The dtype code of each entry of an uncompressed blob (walking delta.py's layout)."""
    _, _, _, n, _, _ = BLOB_HEADER.unpack_from(blob)
    at, codes = BLOB_HEADER.size, []
    for _ in range(n):
        _, code, flags, _, count, inner = ENTRY_HEADER.unpack_from(blob, at)
        at += ENTRY_HEADER.size
        at += 0 if flags & deltamod.ENTRY_PLAN_SCALES else 4 * (count if flags & deltamod.ENTRY_PER_CHANNEL else 1)
        n_values = count * inner
        if flags & deltamod.ENTRY_BITMAP:
            bitmap = np.unpackbits(np.frombuffer(blob, np.uint8, (n_values + 7) // 8, at), bitorder="little")
            at += align4((n_values + 7) // 8)
            n_values = int(bitmap[: count * inner].sum())
        at += align4((n_values + 1) // 2 if code == 4 else n_values * {1: 1, 2: 2, 3: 4}[code])
        codes.append(code)
    assert at == len(blob)
    return codes


@pytest.mark.parametrize("name", ["mlp", "conformance"])
def test_uplink_clipping_on_the_rounding_edge(wire, plans, name):
    """One value v in a row of scale s, clipped to s * (v - 1): the exact product is v - 1, so whether it comes
    out v - 1 or v - 2 is decided by the last bits of the norm and the factor. Python and C must agree on every
    one; both outcomes occur, so a factor or product computed in less than float64 shows."""
    cp = CPlan(wire, plans[name])
    scales = row_scales(cp.plan)
    rng = np.random.default_rng(15)
    zero = {n: np.zeros(cp.shapes[n], cp.dtypes[n]) for n in cp.names}
    outcomes = set()
    for n in cp.names:
        for row in rng.choice(cp.shapes[n][0], min(cp.shapes[n][0], 12), replace=False):
            for v in (3, 5, 9, 17, 33, 65, 127):
                trained = {k: a.copy() for k, a in zero.items()}
                rows = trained[n].reshape(cp.shapes[n][0], -1)
                rows[row, int(rng.integers(0, rows.shape[1]))] = v
                clip = np.float32(scales[n][row] * (v - 1))
                expected, _ = py_uplink(cp, zero, trained, None, 100, clip, 1, 0.0, 0.0)
                got, _ = cp.uplink(zero, trained, None, 100, clip, 1, 0.0, 0.0)
                assert got == expected, f"{n} row {row} v {v}"
                sent = [e for e in deltamod.decode_delta(got[8:]) if e.tensor_id != 0xFFFF]
                outcomes.add(v - int(sent[0].values.sum()) if sent else v)
    assert {1, 2} <= outcomes


def test_uplink_error_feedback_over_rounds_and_keep_ties(wire, plans):
    """Several rounds carrying the change kept back, with many equal magnitudes (ties: lower index first)."""
    cp = CPlan(wire, plans["mlp"])
    rng = np.random.default_rng(12)
    state, carry_py, carry_c = random_state(cp, rng), None, None
    for round_ in range(12):
        trained = {}
        for n in cp.names:  # every change +-1 or +-2: the kept share is decided by ties
            step = rng.choice([-2, -1, 1, 2], cp.shapes[n]) * (rng.random(cp.shapes[n]) < 0.6)
            info = np.iinfo(cp.dtypes[n])
            trained[n] = np.clip(state[n].astype(np.int64) + step, info.min, info.max).astype(cp.dtypes[n])
        keep = [10, 25, 50, 75, 3][round_ % 5]
        expected, carry_py = py_uplink(cp, state, trained, carry_py, keep, np.float32(0), 1, 0.5, 0.5)
        got, carry_c = cp.uplink(state, trained, carry_c, keep, 0.0, 1, 0.5, 0.5)
        assert got == expected, f"round {round_}"
        assert all(np.array_equal(carry_c[n], carry_py[n]) for n in cp.names)
        state = trained
    assert any(v.any() for v in carry_c.values())


def test_uplink_refuses_and_leaves_the_carry(wire, plans):
    cp = CPlan(wire, plans["mlp"])
    rng = np.random.default_rng(13)
    base = random_state(cp, rng)
    trained = changed(cp, base, rng, "int8")
    carry = random_carry(cp, rng, 5)
    with pytest.raises(ProtocolError, match="argument"):
        cp.uplink(base, trained, carry, 0, 0.0, 1, 0.0, 0.0)
    with pytest.raises(ProtocolError, match="argument"):
        cp.uplink(base, trained, carry, 101, 0.0, 1, 0.0, 0.0)
    needed = len(cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0)[0])
    for capacity in (0, 19, needed - 24, needed - 1):
        with pytest.raises(ProtocolError, match="buffer"):
            cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0, capacity=capacity)
    assert len(cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0, capacity=needed)[0]) == needed
    # delta plus carry past int16 is split_uplink's ValueError; the C refuses it without touching the carry
    name = next(n for n in cp.names if cp.dtypes[n] == np.int8)
    base[name].flat[0], trained[name].flat[0] = -100, 100
    carry[name].flat[0] = 32767 - 199
    with pytest.raises(ValueError, match="leaves int16"):
        py_uplink(cp, base, trained, carry, 100, 0.0, 1, 0.0, 0.0)
    with pytest.raises(ProtocolError, match="carry-overflow"):
        cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0)
    carry[name].flat[0] = 32767 - 200  # exactly at the limit: allowed on both sides
    assert cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0)[0] == py_uplink(cp, base, trained, carry, 100,
                                                                                   0.0, 1, 0.0, 0.0)[0]


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_uplink_bytes_max_is_python_s_and_the_densest_delta_reaches_it(wire, plans, name):
    """update.max_delta_body_bytes and fedtiny_wire_uplink_bytes_max agree, and the bound is tight: a round that
    changes every element, with weight deltas past int8 (a large carry), makes a DELTA of exactly that size."""
    cp = CPlan(wire, plans[name])
    bound = wire.lib.fedtiny_wire_uplink_bytes_max(cp.desc)
    assert bound == max_delta_body_bytes(cp.plan)
    rng = np.random.default_rng(14)
    base = random_state(cp, rng)
    trained = changed(cp, base, rng, "all")
    carry = {n: np.full(cp.shapes[n], 30000 if cp.dtypes[n] == np.int8 else 2**30, cp.delta_dtype(n))
             for n in cp.names}
    body, _ = cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0, 0.5)  # both metrics: a held-out part
    assert body == py_uplink(cp, base, trained, carry, 100, 0.0, 1, 0.0, 0.0, 0.5)[0]
    assert len(body) == bound
    with pytest.raises(ProtocolError, match="buffer"):  # and one byte less does not do
        cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0, 0.5, capacity=bound - 1)
    assert len(cp.uplink(base, trained, carry, 100, 0.0, 1, 0.0, 0.0)[0]) == bound - 4  # accuracy alone


# ---- GLOBAL_UPDATE -------------------------------------------------------------------------------------------------

def py_apply(cp: CPlan, body: bytes, held: int, state: dict) -> tuple[str, dict | None]:
    def run():
        return apply_global_update(cp.plan, state, held, GlobalUpdate.decode(body, cp.limits))
    return py_outcome(run)


def c_expected(cp: CPlan, body: bytes, python_reason: str) -> str:
    """Python's reason, except that the C refuses a deflated blob ("compressed") where Python would inflate it:
    after the header checks both make."""
    if len(body) >= 4 + BLOB_HEADER.size:
        magic, version, flags, n, reserved, body_len = BLOB_HEADER.unpack_from(body, 4)
        if (magic == deltamod.MAGIC and version == deltamod.VERSION and not (flags & ~deltamod.FLAG_ZLIB or reserved)
                and n <= cp.limits.max_entries and body_len <= cp.limits.max_body and flags & deltamod.FLAG_ZLIB):
            return "compressed"
    return python_reason


def assert_same_apply(cp: CPlan, body: bytes, held: int, state: dict) -> str:
    expected, new = py_apply(cp, body, held, state)
    expected = c_expected(cp, body, expected)
    got, after = cp.apply(body, held, state)
    assert got == expected, f"C {got}, Python {expected}: {body[:64].hex()}"
    if got == "ok":
        assert all(np.array_equal(after[n], new[n]) for n in cp.names)
    else:
        assert all(np.array_equal(after[n], state[n]) for n in cp.names)
    return got


def new_global(cp: CPlan, state: dict, rng) -> dict:
    """The next global model: most weights a few LSB, some far (int16 differences), biases anywhere."""
    kind = rng.choice(["small", "int8", "int16", "all"])
    return changed(cp, state, rng, str(kind))


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_global_updates_from_sent_states_apply_as_in_python(wire, plans, name):
    cp = CPlan(wire, plans[name])
    rng = np.random.default_rng(21)
    sent = SentStates(cp.plan, keep=3)
    global_state = random_state(cp, rng)
    devices = {"fresh": (None, random_state(cp, rng)), "follower": (None, random_state(cp, rng))}
    outcomes, forms = set(), set()
    for version in range(1, 9):
        global_state = new_global(cp, global_state, rng)
        full = GlobalUpdate(FULL_STATE, state_entries(cp.plan, global_state)).encode(compress=False)
        for device, (held, state) in list(devices.items()):
            update = sent.update(held, version, global_state)
            if update is None:
                continue
            body = update.encode(compress=False)
            # SentStates keeps the newest 3 versions: from an older one only FULL_STATE; from a newer one the
            # differences, unless they take more bytes than the values (many int16 differences)
            known = held is not None and held > version - 3
            assert known or update.base_model_version == FULL_STATE
            assert len(body) <= len(full)
            forms.add((known, update.base_model_version == FULL_STATE))
            c_held = 0 if held is None else held
            outcomes.add(assert_same_apply(cp, body, c_held, state))
            _, after = cp.apply(body, c_held, state)
            assert all(np.array_equal(after[n], global_state[n]) for n in cp.names)
            if device == "follower" or version % 4 == 0:  # "fresh" mostly lags: FULL_STATE again
                devices[device] = (version, after)
        # a device holding another version: wrong-version, state unchanged
        held_state = devices["follower"][1]
        stale = global_update(cp.plan, changed(cp, held_state, rng, "small"), version - 1, held_state)
        assert stale.base_model_version == version - 1
        outcomes.add(assert_same_apply(cp, stale.encode(compress=False), version + 7, held_state))
    assert outcomes == {"ok", "wrong-version"}
    assert {(False, True), (True, False)} <= forms  # (and for some plans FULL_STATE from a known version)


def _blob(entries, base=5):
    return struct.pack("<I", base) + encode_delta(entries, compress=False)


def _patch(body: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(body)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def crafted_updates(cp: CPlan, state: dict, rng) -> list[tuple[str, bytes, int]]:
    """(what, body, held) for each way a GLOBAL_UPDATE can be wrong (held = 5 unless said)."""
    names, rows = cp.names, {n: cp.shapes[n][0] for n in cp.names}
    inner = {n: int(np.prod(cp.shapes[n][1:])) for n in names}
    w = next(n for n in names if cp.dtypes[n] == np.int8)
    wi = names.index(w)
    b = next(n for n in names if cp.dtypes[n] == np.int32)
    bi = names.index(b)
    zeros = {n: np.zeros((rows[n], inner[n]), np.int16 if cp.dtypes[n] == np.int8 else np.int32) for n in names}
    good_delta = global_update(cp.plan, changed(cp, state, rng, "small"), 5, state).encode(compress=False)
    full_entries = state_entries(cp.plan, state)
    full = GlobalUpdate(FULL_STATE, full_entries).encode(compress=False)
    one = np.ones((1, inner[w]), np.int8)
    out = [
        ("good delta", good_delta, 5),
        ("good full state", full, 0),
        ("deflated", GlobalUpdate(5, [DeltaEntry(wi, 0, one)]).encode(compress=True), 5),
        ("deflated full state", GlobalUpdate(FULL_STATE, full_entries).encode(compress=True), 5),
        ("tensor id past the plan", _blob([DeltaEntry(len(names), 0, one)]), 5),
        ("metrics entry is skipped", _blob([DeltaEntry(0xFFFF, 0, np.ones((1, 1), np.int8), np.ones(1))]), 5),
        ("inner differs", _blob([DeltaEntry(wi, 0, np.ones((1, inner[w] + 1), np.int8))]), 5),
        ("channels past the buffer", _blob([DeltaEntry(wi, rows[w], one)]), 5),
        ("start + count past", _blob([DeltaEntry(wi, rows[w] - 1, np.ones((2, inner[w]), np.int8))]), 5),
        ("covered twice", _blob([DeltaEntry(wi, 0, one), DeltaEntry(wi, 0, one)]), 5),
        ("overlapping", _blob([DeltaEntry(wi, 0, np.ones((min(2, rows[w]), inner[w]), np.int8)),
                               DeltaEntry(wi, min(2, rows[w]) - 1, one)]), 5),
        ("int32 values for an int8 buffer's delta", _blob([DeltaEntry(wi, 0, np.full((1, inner[w]), 40000,
                                                                                      np.int32))]), 5),
        ("int32 values that fit int16", _blob([DeltaEntry(wi, 0, np.full((1, inner[w]), 1, np.int32))]), 5),
        ("per-channel scales are ignored", _blob([DeltaEntry(wi, 0, np.ones((rows[w], inner[w]), np.int8),
                                                             np.arange(rows[w], dtype=np.float32))]), 5),
        ("full state missing a buffer", GlobalUpdate(FULL_STATE, [e for e in full_entries if e.tensor_id != bi])
         .encode(compress=False), 5),
        ("full state with int16 values for int8", GlobalUpdate(FULL_STATE, [
            DeltaEntry(e.tensor_id, 0, e.values.astype(np.int16) * (129 if e.tensor_id == wi else 1))
            for e in full_entries]).encode(compress=False), 5),
        ("full state with a bitmap entry", GlobalUpdate(FULL_STATE, full_entries[:-1] + [DeltaEntry(
            full_entries[-1].tensor_id, 0, full_entries[-1].values,
            mask=np.ones(full_entries[-1].values.shape, bool))]).encode(compress=False), 5),
        ("full state, a buffer in two halves", GlobalUpdate(FULL_STATE, [
            DeltaEntry(wi, rows[w] // 2, full_entries[wi].values[rows[w] // 2:]),
            DeltaEntry(wi, 0, full_entries[wi].values[: rows[w] // 2])] + full_entries[:wi] + full_entries[wi + 1:])
         .encode(compress=False), 0),
        ("empty delta", _blob([]), 5),
        ("all zeros whole", global_update(cp.plan, state, 5, state).encode(compress=False), 5),
        ("zero delta entries", _blob([DeltaEntry(i, 0, zeros[n]) for i, n in enumerate(names)]), 5),
    ]
    # int8 overflow: +100 on a weight that is already large
    big = {n: v.copy() for n, v in state.items()}
    big[w].flat[0] = 100
    overflow = zeros[w].copy()
    overflow.flat[0] = 100
    out.append(("base + delta leaves int8", _blob([DeltaEntry(wi, 0, overflow)]), 5))
    out.append(("base + delta exactly 127", _blob([DeltaEntry(wi, 0, overflow - 73)]), 5))
    # bitmap padding: a bit past the entry's elements in the last byte, and a set pad byte (structural checks:
    # on an entry of the metrics id, which may have any shape, so every plan gets both)
    mask = np.zeros((rows[w], inner[w]), bool)
    mask.flat[0] = True
    out.append(("good bitmap", _blob([DeltaEntry(wi, 0, np.where(mask, 3, 0).astype(np.int8), mask=mask)]), 5))
    odd_mask = np.array([[True, False, True, False, False]])
    odd_bitmap = _blob([DeltaEntry(0xFFFF, 0, np.where(odd_mask, 1, 0).astype(np.int8), np.ones(1), odd_mask)])
    bitmap_at = 4 + BLOB_HEADER.size + ENTRY_HEADER.size + 4  # after the one scale
    out.append(("bitmap of 5 bits", odd_bitmap, 5))
    out.append(("bitmap bit past the elements", _patch(odd_bitmap, bitmap_at, "<B", odd_bitmap[bitmap_at] | 0x20), 5))
    out.append(("bitmap pad byte", _patch(odd_bitmap, bitmap_at + 3, "<B", 1), 5))
    # an odd count of int4 values: the padding nibble must be zero
    odd = _blob([DeltaEntry(bi, 0, np.ones((1, 1), np.int8))])
    values_at = 4 + BLOB_HEADER.size + ENTRY_HEADER.size
    out.append(("int4 padding nibble", _patch(odd, values_at, "<B", 0x31), 5))
    out.append(("int4 value pad bytes are not checked", _patch(odd, values_at + 1, "<B", 0xFF), 5))
    # blob header
    out.append(("bad magic", _patch(good_delta, 4, "<2s", b"FE"), 5))
    out.append(("bad version", _patch(good_delta, 6, "<B", 3), 5))
    out.append(("unknown blob flag", _patch(good_delta, 7, "<B", 2), 5))
    out.append(("reserved", _patch(good_delta, 10, "<H", 1), 5))
    out.append(("too many entries", _patch(good_delta, 8, "<H", cp.limits.max_entries + 1), 5))
    out.append(("body over the limit", _patch(good_delta, 12, "<I", cp.limits.max_body + 1), 5))
    out.append(("body_len short", _patch(good_delta, 12, "<I", len(good_delta) - 17), 5))
    out.append(("trailing", good_delta + b"\0\0\0\0", 5))
    out.append(("n_entries one more", _patch(good_delta, 8, "<H", BLOB_HEADER.unpack_from(good_delta, 4)[3] + 1), 5))
    # entry header
    entry = 4 + BLOB_HEADER.size
    for code in (0, 5, 255):
        out.append((f"dtype {code}", _patch(good_delta, entry + 2, "<B", code), 5))
    for flags in (0x08, 0x03, 0x80):
        out.append((f"entry flags {flags:#x}", _patch(good_delta, entry + 3, "<B", flags), 5))
    out.append(("count 0", _patch(good_delta, entry + 8, "<I", 0), 5))
    out.append(("inner 0", _patch(good_delta, entry + 12, "<I", 0), 5))
    out.append(("more elements than the plan", _blob([DeltaEntry(wi, 0, np.zeros(
        (1, cp.limits.max_elements + 1), np.int8))]) if cp.limits.max_elements < 200_000 else good_delta, 5))
    out.append(("huge count", _patch(good_delta, entry + 8, "<I", 0xFFFFFFFF), 5))
    out.append(("huge start", _patch(good_delta, entry + 4, "<I", 0xFFFFFFFF), 5))
    out.append(("per-channel scales truncated", _patch(good_delta, entry + 3, "<B", 0x05), 5))
    return out, big


@pytest.mark.parametrize("name", PLAN_NAMES)
def test_bad_global_updates_are_refused_as_in_python(wire, plans, name):
    cp = CPlan(wire, plans[name])
    rng = np.random.default_rng(31)
    state = random_state(cp, rng)
    for n in cp.names:  # weights in the middle of the int8 range: small deltas apply, big ones overflow
        if cp.dtypes[n] == np.int8:
            state[n] = (state[n] // 4).astype(np.int8)
    cases, big = crafted_updates(cp, state, rng)
    reasons = {}
    for what, body, held in cases:
        target = big if what.startswith("base + delta") else state
        reasons[what] = assert_same_apply(cp, body, held, target)
    assert reasons["good delta"] == reasons["good full state"] == reasons["good bitmap"] == "ok"
    assert reasons["deflated"] == reasons["deflated full state"] == "compressed"
    assert reasons["base + delta leaves int8"] == "bad-entry" and reasons["base + delta exactly 127"] == "ok"
    assert reasons["full state, a buffer in two halves"] == "ok" and reasons["metrics entry is skipped"] == "ok"
    assert reasons["bitmap of 5 bits"] == "ok"
    assert reasons["bitmap bit past the elements"] == reasons["bitmap pad byte"] == "bad-entry"
    assert reasons["int4 padding nibble"] == "bad-entry" and reasons["int4 value pad bytes are not checked"] == "ok"
    assert set(reasons.values()) >= {"ok", "compressed", "bad-entry", "bad-magic", "bad-version", "bad-flags",
                                     "bad-dtype", "oversized", "truncated", "trailing-bytes"}
    # every truncation and random byte changes of a delta and a full state: the same outcome as Python
    good = [body for what, body, _ in cases if what in ("good delta", "good full state", "good bitmap",
                                                        "bitmap of 5 bits")]
    for body in good:
        lengths = range(len(body)) if len(body) < 400 else sorted(set(rng.integers(0, len(body), 150)) | set(range(40)))
        for n in lengths:
            assert_same_apply(cp, body[:n], 5, state)
        for _ in range(300 if not name.startswith("sensor") else 120):
            mutated = bytearray(body)
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(0, min(len(body), 96))) if rng.random() < 0.7 else int(rng.integers(0, len(body)))
                mutated[at] = int(rng.integers(0, 256)) if rng.random() < 0.5 else mutated[at] ^ (1 << int(
                    rng.integers(0, 8)))
            assert_same_apply(cp, bytes(mutated), 5, state)
            assert_same_apply(cp, bytes(mutated), FULL_STATE, state)


# ---- the Cortex-M4 build ------------------------------------------------------------------------------------------

def test_m4_build_size_and_stack(tmp_path):
    require_tool("arm-none-eabi-gcc")
    size_tool = require_tool("arm-none-eabi-size")
    nm = require_tool("arm-none-eabi-nm")
    require_tool("make")
    for name, data in wire_sources().items():
        (tmp_path / name).write_bytes(data)
    subprocess.run(["make", "-s", "m4-wire"], cwd=tmp_path, check=True, capture_output=True)
    obj = tmp_path / "fedtiny_wire.m4.o"
    text, data, bss = (int(v) for v in subprocess.run([size_tool, obj], check=True, capture_output=True,
                                                      text=True).stdout.splitlines()[1].split()[:3])
    undefined = set(subprocess.run([nm, "-u", obj], check=True, capture_output=True, text=True).stdout.split()) - {"U"}
    stack = {line.split("\t")[0].rsplit(":", 1)[-1]: int(line.split("\t")[1])
             for line in (tmp_path / "fedtiny_wire.m4.su").read_text().splitlines()}
    print(f"\nfedtiny_wire on the M4: {text} B flash (text), {data} B data, {bss} B bss; "
          f"largest frames {sorted(stack.items(), key=lambda kv: -kv[1])[:3]}")
    assert data == 0 and bss == 0  # no static state: everything is the caller's
    assert text < 12 * 1024
    # no heap, no stdio: only memset/memcpy, sqrt and the compiler's soft-double helpers
    assert all(s.startswith("__aeabi_") or s in {"memset", "memcpy", "sqrt"} for s in undefined), undefined
    assert stack["fedtiny_wire_uplink"] < 512 and stack["fedtiny_wire_apply_global_update"] < 512
