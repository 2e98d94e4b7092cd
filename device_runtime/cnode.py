"""The node's protocol session in C (device_runtime/c/fedtiny_node.c with chunking, message bodies, envelope and
Monocypher) on the host through ctypes.

- `CNodeSession(plan, device, fleet, endpoint, state, chunk_size, save, ack_timeout, started)` has the methods of
  fedtiny.protocol.device.DeviceSession (on_connect, heartbeat, last_will, leave, tick, receive, pending_job,
  superseded, skip, complete) and takes and returns the same Python objects (Publish, TrainJob, TrainResult,
  NodeState, ProtocolError with the same reasons), so a test or the simulator can swap it in. Given `peers` (the
  fleet's public identities, as DeviceSession takes them) it does secure aggregation (fedtiny_node_secagg.c).
- `CNodeLibrary(plan)` builds libfedtiny_node.so for a plan: the plan reaches the C node as the node_plan.c of
  codegen.node_plan_source, the same source the firmware compiles (gcc -O2, cached like every cruntime build).
- `CChunking` binds the chunking functions alone (split one frame at a time, parse, the reassembler) for the
  tests that compare them with fedtiny.protocol.chunking.

Time crosses as integer milliseconds: `now` in seconds is rounded to the nearest millisecond.
"""

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from fedtiny.protocol.device import NodeState, TrainJob, TrainResult, keeps_personal_model
from fedtiny.protocol.envelope import DeviceEndpoint, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import DeviceState
from fedtiny.protocol.topics import Publish

from . import codegen, cruntime
from .cenvelope import Node as EnvNode
from .cenvelope import Replay as EnvReplay
from .monocypher_sources import monocypher_sources

HOST_LIB = "libfedtiny_node.so"
PLAN_SYMBOL = "fedtiny_node_plan_data"
NODE_FILES = ("fedtiny_node.c", "fedtiny_node.h", "fedtiny_chunk.c", "fedtiny_chunk.h", "fedtiny_wire.c",
              "fedtiny_wire.h", "fedtiny_envelope.c", "fedtiny_envelope.h", "fedtiny_noise.c", "fedtiny_noise.h",
              "fedtiny_secagg.c", "fedtiny_secagg.h", "fedtiny_node_secagg.c", "fedtiny_node_secagg.h",
              "fedtiny_profile.h", "Makefile")
TOPIC_MAX = 8 + 64 + 8 + 64 + 1  # FEDTINY_NODE_TOPIC_MAX
JOB = 1  # FEDTINY_NODE_JOB
TOPIC_KINDS = ("up", "status", "down", "bcast")  # fedtiny_node_topic


def node_sources(plan) -> dict[str, str | bytes]:
    """The node's C files, the Makefile, the plan's node_plan.c and Monocypher (hash-checked sources cache)."""
    rt = codegen.runtime_dir()
    files: dict[str, str | bytes] = {name: (rt / name).read_bytes() for name in NODE_FILES}
    files["node_plan.c"] = codegen.node_plan_source(plan, PLAN_SYMBOL)
    return files | monocypher_sources()


def milliseconds(now: float) -> int:
    return int(round(now * 1000))


# ---- ctypes mirrors of fedtiny_wire.h, fedtiny_chunk.h and fedtiny_node.h ---------------------------------------

u8, u16, u32, u64, i64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64


class WireTensor(ctypes.Structure):
    _fields_ = [("dtype", u8), ("rows", u32), ("inner", u32), ("scales", ctypes.POINTER(ctypes.c_double))]


class WirePlan(ctypes.Structure):
    _fields_ = [("tensors", ctypes.POINTER(WireTensor)), ("n_tensors", u16), ("max_body", u32),
                ("max_entries", u32), ("max_elements", u32)]


class NodePlan(ctypes.Structure):
    _fields_ = [("wire", ctypes.POINTER(WirePlan)), ("hash", u8 * 32), ("arena_bytes", u32),
                ("flash_bytes", u32), ("free_memory_bytes", u32)]


class Position(ctypes.Structure):
    _fields_ = [("accepted_any", u8), ("run", u16), ("round", u32), ("seq", u32)]


class Task(ctypes.Structure):
    _fields_ = [("present", u8), ("epochs", u16), ("steps", u16), ("uplink_keep_pct", u16), ("round", u32),
                ("model_version", u32), ("clip_norm", ctypes.c_float), ("noise_sigma", ctypes.c_float),
                ("masked", u8)]


class State(ctypes.Structure):
    _fields_ = [("model_version", u32), ("round", u32), ("seq", u32), ("trained_round", i64), ("rng_counter", u64),
                ("run", u16), ("replay", Position * 2), ("pending_task", Task), ("upload_len", u32),
                ("upload_chunk", u32), ("personal", u8)]


class Persisted(ctypes.Structure):
    _fields_ = [("state", ctypes.POINTER(State)), ("global_state", ctypes.c_void_p), ("global_state_bytes", u32),
                ("carry", ctypes.c_void_p), ("carry_bytes", u32), ("upload", ctypes.c_void_p),
                ("personal", ctypes.c_void_p), ("personal_bytes", u32)]


class Sizes(ctypes.Structure):
    _fields_ = [(n, u32) for n in ("global_state", "carry", "upload", "reassembly", "bitmap", "frame", "values")]


class NodePeers(ctypes.Structure):
    _fields_ = [("ids", ctypes.POINTER(u32)), ("publics", ctypes.c_void_p), ("count", u32)]


PUBLISH = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                           ctypes.c_size_t, ctypes.c_int)
PERSIST = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(Persisted))


class Config(ctypes.Structure):
    _fields_ = [("plan", ctypes.POINTER(NodePlan)), ("fleet", ctypes.c_char_p), ("device", ctypes.c_char_p),
                ("fleet_id", u32), ("device_id", u32), ("identity", ctypes.c_char_p),
                ("coordinator_public", ctypes.c_char_p), ("chunk_size", u32), ("ack_timeout_ms", i64),
                ("started_ms", i64)] + [
        (n, ctypes.c_void_p) for n in ("global_state", "carry", "upload", "reassembly", "bitmap", "frame",
                                       "personal", "values")] + [
        ("peers", ctypes.POINTER(NodePeers)), ("secagg", ctypes.c_void_p), ("capacity", Sizes), ("publish", PUBLISH), ("persist", PERSIST), ("context", ctypes.c_void_p)]


class ChunkTransfer(ctypes.Structure):
    _fields_ = [("open", u8), ("at_top", u8), ("source", u8)] + [
        (n, u32) for n in ("transfer_id", "count", "total_len", "chunk_size", "received", "data_offset",
                           "bitmap_offset")] + [("last_seen", i64)]


class Reassembler(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("bitmap", ctypes.c_void_p), ("max_bytes", u32), ("ttl_ms", i64),
                ("transfers", ChunkTransfer * 2)]


class ChunkResult(ctypes.Structure):
    _fields_ = [("duplicate", u8), ("payload", ctypes.c_void_p), ("payload_len", u32)]


class Node(ctypes.Structure):
    _fields_ = [("config", Config), ("state", State), ("keys", EnvNode), ("replay", EnvReplay),
                ("reassembler", Reassembler), ("max_downlink_bytes", u32), ("upload_sent", u8),
                ("upload_sent_at", i64), ("resent_chunks", u32)] + [
        (n, ctypes.c_char * TOPIC_MAX) for n in ("up_topic", "status_topic", "down_topic", "bcast_topic")]


class Job(ctypes.Structure):
    _fields_ = [("round", u32), ("model_version", u32), ("epochs", u16), ("steps", u16), ("uplink_keep_pct", u16),
                ("clip_norm", ctypes.c_float), ("noise_sigma", ctypes.c_float), ("masked", u8)]


class Result(ctypes.Structure):
    _fields_ = [("num_examples", u32), ("loss", ctypes.c_float), ("accuracy", ctypes.c_float),
                ("personal_accuracy", ctypes.c_float), ("rng_counter", u64)]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, vp, size_p = ctypes.POINTER, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "fedtiny_node_reason": ([ctypes.c_int], ctypes.c_char_p),
        "fedtiny_node_sizes_of": ([p(NodePlan), u32, p(Sizes)], None),
        "fedtiny_node_sizes_secagg_of": ([p(NodePlan), u32, p(Sizes)], None),
        "fedtiny_node_secagg_size": ([], ctypes.c_size_t),
        "fedtiny_node_secagg_record_bytes": ([], ctypes.c_size_t),
        "fedtiny_node_secagg_restore": ([vp, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int),
        "fedtiny_node_state_fresh": ([p(State)], None),
        "fedtiny_node_init": ([p(Node), p(Config), p(State)], ctypes.c_int),
        "fedtiny_node_wipe": ([p(Node)], None),
        "fedtiny_node_persist": ([p(Node)], ctypes.c_int),
        "fedtiny_node_on_connect": ([p(Node), i64], ctypes.c_int),
        "fedtiny_node_heartbeat": ([p(Node), i64, u8], ctypes.c_int),
        "fedtiny_node_last_will": ([p(Node), i64, vp, ctypes.c_size_t, size_p], ctypes.c_int),
        "fedtiny_node_leave": ([p(Node)], ctypes.c_int),
        "fedtiny_node_tick": ([p(Node), i64], ctypes.c_int),
        "fedtiny_node_receive": ([p(Node), ctypes.c_char_p, vp, ctypes.c_size_t, i64, p(Job)], ctypes.c_int),
        "fedtiny_node_pending_job": ([p(Node), p(Job)], ctypes.c_int),
        "fedtiny_node_superseded": ([p(Node), p(Job)], ctypes.c_int),
        "fedtiny_node_skip": ([p(Node), p(Job)], ctypes.c_int),
        "fedtiny_node_complete": ([p(Node), p(Job), vp, vp, p(Result), i64], ctypes.c_int),
        "fedtiny_node_max_downlink_bytes": ([p(NodePlan)], u32),
        "fedtiny_wire_state_offset": ([p(WirePlan), u16], u32),
        "fedtiny_wire_delta_offset": ([p(WirePlan), u16], u32),
        "fedtiny_chunk_reason": ([ctypes.c_int], ctypes.c_char_p),
        "fedtiny_chunk_count": ([u32, u32], u32),
        "fedtiny_chunk_frame": ([vp, u32, u32, u32, u32, vp, ctypes.c_size_t, size_p], ctypes.c_int),
        "fedtiny_reassembler_init": ([p(Reassembler), vp, u32, vp, i64], None),
        "fedtiny_reassembler_accept": ([p(Reassembler), vp, ctypes.c_size_t, i64, u8, p(ChunkResult)],
                                       ctypes.c_int),
        "fedtiny_reassembler_reserved": ([p(Reassembler)], u32),
        "fedtiny_reassembler_open": ([p(Reassembler)], u32),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


class CNodeLibrary:
    """libfedtiny_node.so for one plan, and the plan's buffer layout as the C node keeps it."""

    def __init__(self, plan, cache_dir: Path | None = None):
        self.plan = plan
        self.path = cruntime.make_cached(node_sources(plan), "host-node", HOST_LIB, cache_dir)
        self.lib = _bind(ctypes.CDLL(str(self.path)))
        self.node_plan = NodePlan.in_dll(self.lib, PLAN_SYMBOL)
        wire = self.node_plan.wire
        self.names = plan.trainable_buffers()
        self.shapes = {n: tuple(plan.buffers[n].shape) for n in self.names}
        self.state_dtypes = {n: np.dtype(plan.buffers[n].dtype) for n in self.names}
        self.delta_dtypes = {n: np.dtype(np.int16 if d == np.int8 else np.int32) for n, d in self.state_dtypes.items()}
        self.state_offsets = {n: self.lib.fedtiny_wire_state_offset(wire, i) for i, n in enumerate(self.names)}
        self.delta_offsets = {n: self.lib.fedtiny_wire_delta_offset(wire, i) for i, n in enumerate(self.names)}

    def reason(self, status: int) -> str:
        return self.lib.fedtiny_node_reason(status).decode()

    def sizes(self, chunk_size: int, secagg: bool = False) -> Sizes:
        """fedtiny_node_sizes_of, or with secagg fedtiny_node_sizes_secagg_of (a node given the peers)."""
        sizes = Sizes()
        fn = self.lib.fedtiny_node_sizes_secagg_of if secagg else self.lib.fedtiny_node_sizes_of
        fn(ctypes.byref(self.node_plan), chunk_size, ctypes.byref(sizes))
        return sizes

    def max_downlink_bytes(self) -> int:
        return self.lib.fedtiny_node_max_downlink_bytes(ctypes.byref(self.node_plan))

    def pack(self, arrays: dict[str, np.ndarray], buffer, delta: bool = False) -> None:
        """Write a state (or, with delta, a carry) dict into a C buffer in the node's layout."""
        dtypes, offsets = (self.delta_dtypes, self.delta_offsets) if delta else (self.state_dtypes, self.state_offsets)
        if set(arrays) != set(self.names):
            raise ValueError("a state holds exactly the plan's trainable buffers")
        for name in self.names:
            value = np.asarray(arrays[name])
            if value.shape != self.shapes[name]:
                raise ValueError(f"{name}: shape {value.shape}, the plan has {self.shapes[name]}")
            data = np.ascontiguousarray(value, dtypes[name]).tobytes()
            ctypes.memmove(ctypes.addressof(buffer) + offsets[name], data, len(data))

    def unpack(self, buffer, delta: bool = False) -> dict[str, np.ndarray]:
        dtypes, offsets = (self.delta_dtypes, self.delta_offsets) if delta else (self.state_dtypes, self.state_offsets)
        out = {}
        for name in self.names:
            count = int(np.prod(self.shapes[name], dtype=np.int64))
            out[name] = np.frombuffer(buffer, dtypes[name], count, offsets[name]).reshape(self.shapes[name]).copy()
        return out


class CNodeSession:
    """DeviceSession in C: the same constructor and methods, over libfedtiny_node.so. `state` reads the C state
    back as a NodeState (carry as a dict, zeros meaning nothing carried), and `save` receives one at every
    persist, as DeviceSession's does."""

    def __init__(self, plan, device: str, fleet: str, endpoint: DeviceEndpoint, state: NodeState, chunk_size: int,
                 save: Callable[[NodeState], None], ack_timeout: float = 15.0, started: float = 0.0,
                 library: CNodeLibrary | None = None, cache_dir: Path | None = None,
                 peers: Mapping[int, PublicIdentity] | None = None) -> None:
        self.library = library or CNodeLibrary(plan, cache_dir)
        self.lib = self.library.lib
        self.plan, self.device, self.fleet, self.chunk_size = plan, device, fleet, chunk_size
        self.device_id = endpoint.device_id
        self._save = save
        sizes = self.library.sizes(chunk_size, secagg=peers is not None)
        self._buffers = {name: ctypes.create_string_buffer(max(1, getattr(sizes, name)))
                         for name, _ in Sizes._fields_}
        self._names = (fleet.encode(), device.encode())
        self._keys = (endpoint.identity.to_bytes(), endpoint.coordinator.to_bytes())
        self._publish = PUBLISH(self._on_publish)
        self._persist = PERSIST(self._on_persist)
        self._out: list[Publish] = []
        self._error: BaseException | None = None
        config = Config(ctypes.pointer(self.library.node_plan), self._names[0], self._names[1], endpoint.fleet_id,
                        endpoint.device_id, self._keys[0], self._keys[1], chunk_size, milliseconds(ack_timeout),
                        milliseconds(started))
        for name, _ in Sizes._fields_:
            setattr(config, name, ctypes.addressof(self._buffers[name]))
        if keeps_personal_model(plan):  # else NULL: the node keeps no personalised model, as DeviceSession
            self._personal = ctypes.create_string_buffer(max(1, sizes.global_state))
            config.personal = ctypes.addressof(self._personal)
        else:
            self._personal = None
        self._secagg = None
        if peers is not None:  # secure aggregation: the fleet's public identities and the round's RAM
            ids = sorted(peers)
            self._peer_ids = (u32 * max(1, len(ids)))(*ids)
            self._peer_publics = ctypes.create_string_buffer(b"".join(peers[i].to_bytes() for i in ids),
                                                             max(1, 64 * len(ids)))
            self._peers = NodePeers(self._peer_ids, ctypes.addressof(self._peer_publics), len(ids))
            self._secagg = ctypes.create_string_buffer(self.lib.fedtiny_node_secagg_size())
            record = state.secagg or b""  # the round held, as the firmware restores it from its round store
            if self.lib.fedtiny_node_secagg_restore(self._secagg, record, len(record)):
                raise ValueError(f"a secure-aggregation round of {len(record)} bytes is not this C node's record")
            config.peers, config.secagg = ctypes.pointer(self._peers), ctypes.addressof(self._secagg)
        config.capacity = sizes
        config.publish, config.persist = self._publish, self._persist
        self._node = Node()
        status = self.lib.fedtiny_node_init(ctypes.byref(self._node), ctypes.byref(config),
                                            ctypes.byref(self._c_state(state)))
        if status:
            raise ValueError(f"fedtiny_node_init: {self.library.reason(status)}")

    # --- NodeState <-> the C state and buffers ---------------------------------------------------------------
    def _c_state(self, state: NodeState) -> State:
        s = State()
        self.lib.fedtiny_node_state_fresh(ctypes.byref(s))
        s.model_version, s.round, s.seq, s.run = state.model_version, state.round, state.seq, state.run
        s.trained_round, s.rng_counter = state.trained_round, state.rng_counter
        for device_id, direction, stream, run, round_, seq in state.replay:
            if direction == 1 and stream == 0 and device_id in (self.device_id, 0):
                s.replay[0 if device_id else 1] = Position(1, run, round_, seq)
        task = state.pending_task
        if task is not None:
            s.pending_task = Task(1, task["epochs"], task["steps"], round(task["uplink_keep"] * 100), task["round"],
                                  task["model_version"], task["clip_norm"], task.get("noise_sigma", 0.0),
                                  bool(task.get("masked")))
        self.library.pack(state.global_state, self._buffers["global_state"])
        if state.carry is not None:
            self.library.pack(state.carry, self._buffers["carry"], delta=True)
        if state.upload is not None:
            ctypes.memmove(self._buffers["upload"], state.upload, len(state.upload))
            s.upload_len, s.upload_chunk = len(state.upload), state.upload_chunk
        if state.personal is not None and self._personal is not None:
            self.library.pack(state.personal, self._personal)
            s.personal = 1
        return s

    @property
    def state(self) -> NodeState:
        s = self._node.state
        replay = sorted([device_id, 1, 0, p.run, p.round, p.seq]
                        for device_id, p in ((self.device_id, s.replay[0]), (0, s.replay[1])) if p.accepted_any)
        task = s.pending_task
        pending = None if not task.present else dict(
            round=task.round, model_version=task.model_version, epochs=task.epochs, steps=task.steps,
            uplink_keep=task.uplink_keep_pct / 100, clip_norm=task.clip_norm, noise_sigma=task.noise_sigma)
        if task.present and task.masked:  # as device.py persists it: the key only for a masked task
            pending["masked"] = True
        upload = self._buffers["upload"].raw[:s.upload_len] if s.upload_len else None
        personal = self.library.unpack(self._personal) if s.personal else None
        secagg = None  # the round held (its first byte: active): the record the firmware keeps in its round store
        if self._secagg is not None and self._secagg.raw[0]:
            secagg = self._secagg.raw[:self.lib.fedtiny_node_secagg_record_bytes()]
        return NodeState(s.model_version, self.library.unpack(self._buffers["global_state"]), s.rng_counter,
                         s.round, s.seq, s.trained_round, replay, pending, upload, s.upload_chunk,
                         self.library.unpack(self._buffers["carry"], delta=True), s.run, personal, secagg)

    def persisted_bytes(self) -> bytes:
        """Everything persist hands over, as bytes: the state struct, the global state, the carry, the upload, the
        personalised model."""
        s = self._node.state
        return (bytes(s) + self._buffers["global_state"].raw + self._buffers["carry"].raw
                + self._buffers["upload"].raw[:s.upload_len] + (self._personal.raw if s.personal else b""))

    @property
    def resent_chunks(self) -> int:
        return self._node.resent_chunks

    # --- callbacks -------------------------------------------------------------------------------------------
    def _on_publish(self, context, kind, topic, frame, length, retain) -> int:
        self._out.append(Publish(topic.decode(), ctypes.string_at(frame, length), bool(retain)))
        return 0

    def _on_persist(self, context, persisted) -> int:
        try:
            self._save(self.state)
        except BaseException as exc:  # noqa: BLE001 - raised again once the C call returns
            self._error = exc
            return 1
        return 0

    def _call(self, name: str, *args) -> tuple[int, list[Publish]]:
        self._out, self._error = [], None
        status = getattr(self.lib, name)(ctypes.byref(self._node), *args)
        if self._error is not None:
            raise self._error
        return status, self._out

    def _check(self, status: int) -> None:
        if status < 0:
            raise ValueError(f"C node: {self.library.reason(status)}")

    # --- jobs ------------------------------------------------------------------------------------------------
    def _job(self, job: Job) -> TrainJob:
        return TrainJob(job.round, job.model_version, job.epochs, job.steps,
                        self.library.unpack(self._buffers["global_state"]), job.uplink_keep_pct / 100,
                        job.clip_norm, job.noise_sigma, bool(job.masked))

    @staticmethod
    def _c_job(job: TrainJob) -> Job:
        return Job(job.round, job.model_version, job.epochs, job.steps, round(job.uplink_keep * 100), job.clip_norm,
                   job.noise_sigma, job.masked)

    # --- DeviceSession's methods -----------------------------------------------------------------------------
    def persist(self) -> None:
        status, _ = self._call("fedtiny_node_persist")
        self._check(status)

    def last_will(self, now: float) -> Publish:
        out = ctypes.create_string_buffer(self.chunk_size)
        length = ctypes.c_size_t()
        status, _ = self._call("fedtiny_node_last_will", milliseconds(now), out, len(out), ctypes.byref(length))
        self._check(status)
        return Publish(self._node.status_topic.decode(), out.raw[:length.value], True)

    def heartbeat(self, now: float, state: DeviceState = DeviceState.IDLE) -> list[Publish]:
        status, out = self._call("fedtiny_node_heartbeat", milliseconds(now), int(state))
        self._check(status)
        return out

    def on_connect(self, now: float) -> list[Publish]:
        status, out = self._call("fedtiny_node_on_connect", milliseconds(now))
        self._check(status)
        return out

    def leave(self) -> list[Publish]:
        status, out = self._call("fedtiny_node_leave")
        self._check(status)
        return out

    def tick_due(self) -> float | None:
        """DeviceSession.tick_due: when an unacknowledged upload is next resent (None while nothing waits), from
        the C node's upload_sent_at and ack timeout; a NodeAgent's loop sleeps until then."""
        node = self._node
        if not node.state.upload_len or not node.upload_sent:
            return None
        return (node.upload_sent_at + node.config.ack_timeout_ms) / 1000.0

    def tick(self, now: float) -> list[Publish]:
        status, out = self._call("fedtiny_node_tick", milliseconds(now))
        self._check(status)
        return out

    def receive(self, topic: str, frame: bytes, now: float) -> tuple[list[Publish], TrainJob | None]:
        """Raises ProtocolError with device.py's reason for anything refused."""
        buffer = ctypes.create_string_buffer(bytes(frame), max(1, len(frame)))
        job = Job()
        status, out = self._call("fedtiny_node_receive", topic.encode(), buffer, len(frame), milliseconds(now),
                                 ctypes.byref(job))
        if status < 0:
            raise ProtocolError(self.library.reason(status), "C node")
        return out, self._job(job) if status == JOB else None

    def pending_job(self) -> TrainJob | None:
        job = Job()
        return self._job(job) if self.lib.fedtiny_node_pending_job(ctypes.byref(self._node), ctypes.byref(job)) \
            == JOB else None

    def superseded(self, job: TrainJob) -> bool:
        return bool(self.lib.fedtiny_node_superseded(ctypes.byref(self._node), ctypes.byref(self._c_job(job))))

    def skip(self, job: TrainJob) -> None:
        status, _ = self._call("fedtiny_node_skip", ctypes.byref(self._c_job(job)))
        self._check(status)

    def complete(self, job: TrainJob, result: TrainResult, now: float) -> list[Publish]:
        if not isinstance(result.num_examples, int) or not 0 <= result.num_examples <= 0xFFFFFFFF:
            raise TypeError("num_examples must be an int in u32")
        base = ctypes.create_string_buffer(len(self._buffers["global_state"]))
        trained = ctypes.create_string_buffer(len(self._buffers["global_state"]))
        self.library.pack(job.base, base)
        self.library.pack(result.state, trained)
        personal = -1.0 if result.personal_accuracy is None else result.personal_accuracy  # -1: no held-out part
        c_result = Result(result.num_examples, result.loss, result.accuracy, personal, result.rng_counter)
        status, out = self._call("fedtiny_node_complete", ctypes.byref(self._c_job(job)), base, trained,
                                 ctypes.byref(c_result), milliseconds(now))
        self._check(status)
        return out

    def close(self) -> None:
        self.lib.fedtiny_node_wipe(ctypes.byref(self._node))


class CChunking:
    """fedtiny_chunk.c alone: split frame by frame, and a reassembler as the node configures it."""

    def __init__(self, library: CNodeLibrary):
        self.lib = library.lib

    def reason(self, status: int) -> str:
        return self.lib.fedtiny_chunk_reason(status).decode()

    def split(self, payload: bytes, transfer_id: int, max_payload: int) -> list[bytes]:
        count = self.lib.fedtiny_chunk_count(len(payload), max_payload)
        out, length = ctypes.create_string_buffer(max_payload), ctypes.c_size_t()
        frames = []
        for index in range(count):
            status = self.lib.fedtiny_chunk_frame(payload, len(payload), transfer_id, max_payload, index, out,
                                                  len(out), ctypes.byref(length))
            if status:
                raise ValueError(self.reason(status))
            frames.append(out.raw[:length.value])
        return frames

    def reassembler(self, max_bytes: int, ttl: float) -> "CReassembler":
        return CReassembler(self, max_bytes, ttl)


class CReassembler:
    """chunking.Reassembler's accept/reserved_bytes/open_transfers over fedtiny_reassembler (two transfers)."""

    def __init__(self, chunking: CChunking, max_bytes: int, ttl: float):
        self.lib, self.chunking = chunking.lib, chunking
        self._data = ctypes.create_string_buffer(max(1, max_bytes))
        self._bitmap = ctypes.create_string_buffer(max_bytes // 8 + 2)
        self._r = Reassembler()
        self.lib.fedtiny_reassembler_init(ctypes.byref(self._r), self._data, max_bytes, self._bitmap,
                                          milliseconds(ttl))
        self._sources: dict[str, int] = {}

    def accept(self, frame: bytes, now: float, source: str = "") -> tuple[bool, bytes | None]:
        """(duplicate, payload once complete); ProtocolError with chunking.py's reason."""
        buffer = ctypes.create_string_buffer(bytes(frame), max(1, len(frame)))
        source_id = self._sources.setdefault(source, len(self._sources))
        result = ChunkResult()
        status = self.lib.fedtiny_reassembler_accept(ctypes.byref(self._r), buffer, len(frame), milliseconds(now),
                                                     source_id, ctypes.byref(result))
        if status:
            raise ProtocolError(self.chunking.reason(status), "C reassembler")
        payload = ctypes.string_at(result.payload, result.payload_len) if result.payload else None
        return bool(result.duplicate), payload

    @property
    def reserved_bytes(self) -> int:
        return self.lib.fedtiny_reassembler_reserved(ctypes.byref(self._r))

    def open_transfers(self) -> int:
        return self.lib.fedtiny_reassembler_open(ctypes.byref(self._r))


# ---- the conformance transcripts on the Cortex-M4 -------------------------------------------------------------

REPLAY_ELF = "fedtiny_node_replay.elf"
REPLAY_FILES = ("firmware_node_replay.c", "firmware_node_replay.h", "fedtiny_boot.c", "fedtiny_boot.h", "fedtiny_m4.ld",
                "fedtiny_node.ld")
REPLAY_OPS = {"connect": 0, "receive": 1, "complete": 2, "tick": 3}


def _c_bytes(name: str, data: bytes) -> str:
    rows = [", ".join(f"0x{b:02x}" for b in data[i:i + 16]) for i in range(0, len(data), 16)]
    return f"static const uint8_t {name}[{max(1, len(data))}] = {{\n    " + (",\n    ".join(rows) or "0") + "\n};\n"


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def publishes_digest(out: list) -> int:
    """FNV-1a 32 over each publish's topic, retain byte and payload, as firmware_node_replay.c computes it; `out`
    holds transcript rows [topic, hex, retain]."""
    data = b"".join(topic.encode() + bytes([bool(retain)]) + bytes.fromhex(payload) for topic, payload, retain in out)
    return cruntime.fnv1a(data)


def render_replay(library: CNodeLibrary, spec: dict, identity: bytes, coordinator_public: bytes,
                  transcripts: dict[str, list[dict]]) -> str:
    """node_replay.c for firmware_node_replay.c: the node's names, ids and keys (fleet.json's), and per transcript
    every line (tests/conformance format, plus "persists": how often the Python session persisted in that call)
    with what it must publish, refuse or return."""
    sizes = library.sizes(spec["chunk_size"])
    initial = ctypes.create_string_buffer(sizes.global_state)
    library.pack(library.plan.initial_state(), initial)
    parts = ["/* Generated by fedtiny_device.cnode.render_replay: inputs of firmware_node_replay.c. */\n",
             '#include "firmware_node_replay.h"\n\n',
             f"const char replay_fleet[] = {_c_string(spec['fleet'])};\n",
             f"const char replay_device[] = {_c_string(spec['device'])};\n",
             f"const uint32_t replay_fleet_id = {spec['fleet_id']}u, replay_device_id = {spec['device_id']}u;\n",
             f"const uint32_t replay_chunk_size = {spec['chunk_size']}u;\n",
             "const int64_t replay_ack_timeout_ms = 15000;\n",
             f"const uint32_t replay_state_bytes = {sizes.global_state}u, replay_carry_bytes = {sizes.carry}u, "
             f"replay_upload_bytes = {sizes.upload}u, replay_reassembly_bytes = {sizes.reassembly}u, "
             f"replay_bitmap_bytes = {sizes.bitmap}u;\n",
             ]
    for name, data in (("replay_identity", identity), ("replay_coordinator", coordinator_public),
                       ("replay_initial_state", initial.raw)):
        parts.append(_c_bytes(name, data).replace("static ", ""))  # the firmware declares these extern
    tables = []
    for t, (name, lines) in enumerate(transcripts.items()):
        ops, last_round = [], 0
        for i, line in enumerate(lines):
            frame = trained = "0"
            frame_len, reason, has_job, job, job_round, result = 0, "0", 0, "{0}", 0, "{0}"
            if line["op"] == "receive":
                parts.append(_c_bytes(f"frame_{t}_{i}", bytes.fromhex(line["frame"])))
                frame, frame_len = f"frame_{t}_{i}", len(line["frame"]) // 2
                reason = "0" if line["error"] is None else _c_string(line["error"])
                if line["job"] is not None:
                    j = line["job"]
                    has_job, last_round = 1, j["round"]
                    job = (f"{{{j['round']}u, {j['model_version']}u, {j['epochs']}u, {j['steps']}u, "
                           f"{round(j['uplink_keep'] * 100)}u, {float(j['clip_norm']).hex()}f, "
                           f"{float(j.get('noise_sigma', 0.0)).hex()}f, {int(bool(j.get('masked')))}u}}")
            elif line["op"] == "complete":
                state = line["result"]["state"]
                arrays = {k: np.frombuffer(bytes.fromhex(raw), dtype).reshape(shape) for k, (dtype, shape, raw)
                          in state.items()}
                buffer = ctypes.create_string_buffer(sizes.global_state)
                library.pack(arrays, buffer)
                parts.append(_c_bytes(f"trained_{t}_{i}", buffer.raw))
                trained, job_round = f"trained_{t}_{i}", line.get("round", last_round)
                r = line["result"]
                personal = r.get("personal_accuracy")
                personal = -1.0 if personal is None else float(personal)
                result = (f"{{{r['num_examples']}u, {float(r['loss']).hex()}f, {float(r['accuracy']).hex()}f, "
                          f"{personal.hex()}f, {r['rng_counter']}ull}}")
            topic = _c_string(line["topic"]) if line["op"] == "receive" else "0"
            ops.append(f"    {{{REPLAY_OPS[line['op']]}u, {milliseconds(line['now'])}, {topic}, {frame}, "
                       f"{frame_len}u, {reason}, {has_job}u, {job}, {job_round}u, {trained}, {result}, "
                       f"{len(line['out'])}u, 0x{publishes_digest(line['out']):08x}u, {line['persists']}u}},\n")
        parts.append(f"static const replay_op ops_{t}[{len(ops)}] = {{\n{''.join(ops)}}};\n")
        tables.append(f"    {{{_c_string(name)}, ops_{t}, {len(ops)}u}},\n")
    parts.append(f"const replay_transcript replay_transcripts[{len(tables)}] = {{\n{''.join(tables)}}};\n")
    parts.append(f"const uint32_t replay_n_transcripts = {len(tables)}u;\n")
    return "".join(parts)


def build_replay_firmware(library: CNodeLibrary, vectors: str, cache_dir: Path | None = None) -> Path:
    """The Cortex-M4 firmware that replays `vectors` (render_replay) against the C node of library's plan."""
    rt = codegen.runtime_dir()
    files = node_sources(library.plan)
    for name in REPLAY_FILES:
        files[name] = (rt / name).read_bytes()
    files["node_replay.c"] = vectors
    return cruntime.make_cached(files, "m4-node-replay", REPLAY_ELF, cache_dir)


@dataclass
class ReplayRun:
    ops: list[tuple[str, int, str, bool, int]]  # (transcript, line index, op, matched, peak stack bytes)
    passed: bool
    instructions: list[int]  # executed instructions of each call, in order
    returncode: int


def run_replay_firmware(elf: Path, timeout: float = 300, cache_dir: Path | None = None) -> ReplayRun:
    """Run the replay under QEMU with the instruction-count plugin; every call's outcome, stack and instructions."""
    run = cruntime.run_counted(elf, timeout, cache_dir)
    result, each = run.result, run.each
    ops = [(m[1], int(m[2]), m[3], m[4] == "ok", int(m[5]))
           for m in re.finditer(r"^op (\S+) (\d+) (\w+) (ok|FAIL) stack (\d+)$", result.stdout, re.M)]
    return ReplayRun(ops, re.search(r"^replay PASS$", result.stdout, re.M) is not None, each, result.returncode)
