"""The C node's session (device_runtime/c/fedtiny_node.c, through fedtiny_device.cnode) against the conformance
transcripts and against the Python DeviceSession it mirrors.

Every transcript is replayed with test_conformance's checks (the same out frames, jobs and refusal reasons, and
a refused frame leaves every persisted byte as it was), with the Python session stepped alongside: after each
call both hold the same state and persisted it as many times. Hostile downlinks the transcripts lack (forged,
tampered, replayed, oversized, misaddressed, malformed bodies under a valid signature) must be refused by both
with the same reason. Chunking in C is compared with fedtiny.protocol.chunking frame by frame and on random
sequences of good and bad chunks. Both keep the same personalised model (the trained state of the last answered
round) through a GLOBAL_UPDATE and a restart, and predict the same classes with it in C and in Python.

Monocypher's sources are fetched with pip (pinned version and SHA-256) and gcc builds the library: without them
these tests skip on a user's machine and fail in CI.
"""

import copy
import ctypes
import json
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import require_monocypher, require_tool

from fedtiny.planfile import load_plan
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.delta import DeltaEntry
from fedtiny.protocol.device import DeviceSession, NodeState, keeps_personal_model
from fedtiny.protocol.envelope import Header, Identity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import GlobalUpdate, Join, MessageType, Task
from fedtiny.protocol.task import task_body
from fedtiny.protocol.update import (
    FULL_STATE, downlink_reassembly_bytes, global_update, max_downlink_bytes, row_scales,
)
from fedtiny_device import cnode, cruntime
from fedtiny_device.agent import LocalTraining, classes, heldout_split, predict
from fedtiny_device.trainer import Trainer

HERE = Path(__file__).parent / "conformance"
sys.path.insert(0, str(HERE))
from make_transcripts import (  # noqa: E402
    CHUNK, DEVICE, FLEET, OTHER, SCENARIOS, coordinator_session, device_session, frames, job_dict, new_global,
    trained,
)
from test_conformance import train_result  # noqa: E402

DOWN, BCAST = topics.downlink(FLEET, DEVICE), topics.broadcast(FLEET)


@pytest.fixture(scope="session")
def plan():
    return load_plan(HERE / "plan.ftp")


@pytest.fixture(scope="session")
def spec():
    return json.loads((HERE / "fleet.json").read_text())


@pytest.fixture(scope="session")
def library(plan, tmp_path_factory):
    """libfedtiny_node.so for the conformance plan (skip without gcc or the Monocypher sdist on a user's
    machine, fail in CI)."""
    require_monocypher()
    return cnode.CNodeLibrary(plan, tmp_path_factory.mktemp("cnode_cache"))


class Saves:
    """A save callback that counts and keeps a copy of every state saved."""

    def __init__(self):
        self.count = 0
        self.last: NodeState | None = None
        self.history: list[NodeState] = []

    def __call__(self, state):
        self.count += 1
        self.last = copy.deepcopy(state)
        self.history.append(self.last)


class WatchedSession(cnode.CNodeSession):
    """The C node, checking as each frame leaves that its seq (the frame's transfer id) is already persisted."""

    unpersisted: list[int]

    def _on_publish(self, context, kind, topic, frame, length, retain):
        transfer_id = struct.unpack_from("<I", ctypes.string_at(frame, 8), 4)[0]
        if self._save.last is None or transfer_id >= self._save.last.seq:
            self.unpersisted.append(transfer_id)
        return super()._on_publish(context, kind, topic, frame, length, retain)


def c_session(plan, spec, library, save=None, state: NodeState | None = None) -> WatchedSession:
    """The C node as every transcript starts it (make_transcripts.device_session's twin), or from `state`."""
    endpoint = device_session(plan, spec).endpoint
    session = WatchedSession(plan, spec["device"], spec["fleet"], endpoint,
                             state or NodeState(0, plan.initial_state(), 0), spec["chunk_size"],
                             save=save or Saves(), ack_timeout=15.0, started=0.0, library=library)
    session.unpersisted = []
    return session


def python_session(plan, spec, save, state: NodeState | None = None) -> DeviceSession:
    session = device_session(plan, spec)
    if state is not None:
        session = DeviceSession(plan, spec["device"], spec["fleet"], session.endpoint, state, spec["chunk_size"],
                                save=save, ack_timeout=15.0, started=0.0)
    session._save = save
    return session


def assert_same_state(c: NodeState, p: NodeState, where: str) -> None:
    """Both sessions hold the same persisted state (a carry of zeros is Python's None: nothing carried)."""
    for field in ("model_version", "round", "seq", "trained_round", "rng_counter", "run", "replay", "pending_task",
                  "upload"):
        assert getattr(c, field) == getattr(p, field), f"{where}: {field} {getattr(c, field)} != {getattr(p, field)}"
    if p.upload is not None:
        assert c.upload_chunk == p.upload_chunk, f"{where}: upload_chunk"
    for name, value in p.global_state.items():
        assert np.array_equal(c.global_state[name], value), f"{where}: global state {name}"
    for name, value in c.carry.items():
        expected = np.zeros_like(value) if p.carry is None else p.carry[name]
        assert np.array_equal(value, expected), f"{where}: carry {name}"
    assert (c.personal is None) == (p.personal is None), f"{where}: personalised model kept on one side only"
    for name, value in (p.personal or {}).items():
        assert np.array_equal(c.personal[name], value), f"{where}: personalised model {name}"


def replay(plan, spec, library, lines: list[dict], name: str = "transcript") -> int:
    """Replay transcript lines against the C node, with test_conformance's checks, and the Python session
    alongside; returns how many calls were checked."""
    c_saves, p_saves = Saves(), Saves()
    device = c_session(plan, spec, library, c_saves)
    twin = python_session(plan, spec, p_saves)
    job = twin_job = None
    jobs, twin_jobs = {}, {}
    for i, line in enumerate(lines):
        where = f"{name} line {i + 1} ({line['op']} at {line['now']})"
        if line["op"] == "connect":
            out, twin_out = device.on_connect(line["now"]), twin.on_connect(line["now"])
        elif line["op"] == "tick":
            out, twin_out = device.tick(line["now"]), twin.tick(line["now"])
        elif line["op"] == "complete":
            result = train_result(line["result"])
            chosen, twin_chosen = (jobs[line["round"]], twin_jobs[line["round"]]) if "round" in line \
                else (job, twin_job)
            saved = len(c_saves.history), len(p_saves.history)
            out = device.complete(chosen, result, line["now"])
            twin_out = twin.complete(twin_chosen, result, line["now"])
            # no save marks the round answered without its DELTA: a power cut there would drop the round's change
            for state in c_saves.history[saved[0]:] + p_saves.history[saved[1]:]:
                assert state.trained_round != chosen.round or state.upload, f"{where}: answered, no upload saved"
        else:
            frame = bytes.fromhex(line["frame"])
            before = device.persisted_bytes()
            try:
                out, job = device.receive(line["topic"], frame, line["now"])
                error = None
            except ProtocolError as exc:
                out, error = [], exc.reason
                assert device.persisted_bytes() == before, f"{where}: a refused frame changed the C node"
            try:
                twin_out, twin_job = twin.receive(line["topic"], frame, line["now"])
            except ProtocolError:
                twin_out = []
            assert error == line["error"], f"{where}: refused as {error}, the transcript says {line['error']}"
            assert job_dict(job if error is None else None) == line["job"], f"{where}: job"
            if error is None and job is not None:
                jobs[job.round], twin_jobs[twin_job.round] = job, twin_job
                for k, v in twin_job.base.items():
                    assert np.array_equal(job.base[k], v), f"{where}: the job's base {k}"
        assert frames(out) == line["out"], f"{where}: the publishes differ from the transcript"
        assert frames(out) == frames(twin_out), f"{where}: the Python session published otherwise"
        assert_same_state(device.state, twin.state, where)
        assert c_saves.count == p_saves.count, f"{where}: persisted {c_saves.count} times, Python {p_saves.count}"
        assert device.unpersisted == [], f"{where}: a frame left before its seq was persisted"
    return len(lines)


def transcript(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_c_node_passes_the_transcript(plan, spec, library, name):
    assert replay(plan, spec, library, transcript(name), f"{name}.jsonl") > 5


def test_an_altered_transcript_fails(plan, spec, library):
    """The replay can fail: one byte of one expected publish changed, or a refusal reason, is caught."""
    lines = transcript("round_trip")
    changed = json.loads(json.dumps(lines))
    k = next(i for i, line in enumerate(changed) if line["op"] == "complete")
    topic, payload, retain = changed[k]["out"][2]
    changed[k]["out"][2] = [topic, payload[:-2] + f"{int(payload[-2:], 16) ^ 1:02x}", retain]
    with pytest.raises(AssertionError, match="publishes differ"):
        replay(plan, spec, library, changed)
    rejected = transcript("rejected_frames")
    k = next(i for i, line in enumerate(rejected) if line.get("error") == "stale")
    rejected[k]["error"] = "replay"
    with pytest.raises(AssertionError, match="refused as stale"):
        replay(plan, spec, library, rejected)


def test_the_generated_plan_holds_python_s_values(plan, library):
    """codegen.node_plan_source, as compiled into the library: the plan hash, the delta limits, the JOIN and
    STATUS numbers, and every row scale bit for bit."""
    from fedtiny.planfile import plan_hash
    from fedtiny.protocol.update import (
        delta_limits, downlink_reassembly_bytes, max_delta_envelope_bytes, max_downlink_bytes, row_scales,
    )

    node_plan = library.node_plan
    wire = node_plan.wire.contents
    limits = delta_limits(plan)
    assert bytes(node_plan.hash) == plan_hash(plan)
    assert (wire.max_body, wire.max_entries, wire.max_elements) == (limits.max_body, limits.max_entries,
                                                                    limits.max_elements)
    assert (node_plan.arena_bytes, node_plan.flash_bytes) == (plan.arena_size, plan.memory_report()["flash_bytes"])
    assert node_plan.free_memory_bytes == plan.budget - plan.reserve - plan.arena_size
    assert library.max_downlink_bytes() == max_downlink_bytes(plan)
    sizes = library.sizes(256)
    assert (sizes.upload, sizes.reassembly) == (max_delta_envelope_bytes(plan), downlink_reassembly_bytes(plan))
    assert wire.n_tensors == len(plan.trainable_buffers())
    for i, (name, scales) in enumerate(row_scales(plan).items()):
        tensor = wire.tensors[i]
        assert (tensor.dtype, tensor.rows) == ({"int8": 1, "int32": 3}[plan.buffers[name].dtype], len(scales))
        assert [tensor.scales[k] for k in range(tensor.rows)] == scales.tolist(), name


# ---- hostile downlinks: refused by both sessions alike, changing nothing -----------------------------------

class Pair:
    """The C node and the Python session fed the same frames; every outcome is compared."""

    def __init__(self, plan, spec, library, states: tuple[NodeState, NodeState] | None = None):
        from test_conformance import persisted

        self.persisted = persisted
        self.c_saves, self.p_saves = Saves(), Saves()
        self.c = c_session(plan, spec, library, self.c_saves, states and states[0])
        self.p = python_session(plan, spec, self.p_saves, states and copy.deepcopy(states[1]))

    def restarted(self, plan, spec, library) -> "Pair":
        """Both sessions after a power cut: new ones from what each persisted last."""
        return Pair(plan, spec, library, (self.c_saves.last, self.p_saves.last))

    def call(self, method: str, *args) -> list:
        """The same call on both; the publishes, which must agree."""
        out = getattr(self.c, method)(*args)
        assert frames(out) == frames(getattr(self.p, method)(*args)), method
        assert self.c.unpersisted == [], f"{method}: a frame left before its seq was persisted"
        assert_same_state(self.c.state, self.p.state, method)
        return out

    def receive(self, topic: str, frame_list: list[bytes], now: float) -> str:
        """Deliver the frames; returns the outcome of the last ("ok" or the refusal reason), after checking that
        both sessions agree on it and on what they sent, and that a refusal changed nothing persisted."""
        outcome = "ok"
        for frame in frame_list:
            c_before, p_before = self.c.persisted_bytes(), self.persisted(self.p)
            results = []
            for session in (self.c, self.p):
                try:
                    out, job = session.receive(topic, frame, now)
                    results.append(("ok", frames(out), job_dict(job)))
                except ProtocolError as exc:
                    results.append((exc.reason, [], None))
            assert results[0] == results[1], f"C {results[0][:2]}, Python {results[1][:2]}"
            assert self.c.unpersisted == [], "a frame left before its seq was persisted"
            outcome = results[0][0]
            if outcome != "ok":
                assert self.c.persisted_bytes() == c_before, f"refused as {outcome}, yet the C node changed"
                assert self.persisted(self.p) == p_before, f"refused as {outcome}, yet the Python session changed"
        assert_same_state(self.c.state, self.p.state, "after the frames")
        return outcome


def signed(spec, header: Header, payload: bytes) -> bytes:
    """An envelope with this header and payload, signed with the coordinator's real key."""
    raw = header.pack() + payload
    return raw + Identity.from_seed(spec["coordinator_seed"].encode()).sign(raw)


def with_header(envelope: bytes, **changes) -> Header:
    return Header(**(Header.unpack(envelope).__dict__ | changes))


class RawBody:
    """A GLOBAL_UPDATE body of any bytes, for the coordinator's endpoint to encrypt and sign."""

    TYPE = MessageType.GLOBAL_UPDATE

    def __init__(self, data: bytes):
        self.data = data

    def encode(self) -> bytes:
        return self.data


def test_hostile_downlinks_are_refused_alike(plan, spec, library):
    """Forged, tampered, replayed, oversized, misaddressed and malformed downlinks: each refused by the C node
    with the reason the Python session gives, nothing persisted changing; the valid ones in between accepted."""
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    endpoint, phash = coordinator._endpoint, coordinator._plan_hash
    device_id, other_id = spec["device_id"], topics.name_id(OTHER)
    pair.c.on_connect(1.0)
    pair.p.on_connect(1.0)
    position = iter(range(10, 1000))

    def seal(body, device=device_id, round_=1):
        return endpoint.seal(body, device_id=device, round=round_, model_version=0, seq=next(position))

    def task(config=b"", plan_hash=phash, device=device_id):
        return seal(Task(1, plan_hash, 0, 1, plan.lr, 0.0, 0, CHUNK, 0, config), device)

    transfer = iter(range(1, 1000))

    def frames_of(envelope: bytes, chunk: int = CHUNK) -> list[bytes]:
        return chunking.split(envelope, next(transfer), chunk)

    state = new_global(plan, 3)
    full = global_update(plan, state, None, None)
    valid = task()
    forged = valid[:-64] + Identity.from_seed(b"mallory").sign(valid[:-64])
    tampered = bytearray(valid)
    tampered[40] ^= 1
    update = seal(replace(full, compress=False))
    ciphertext = bytearray(update[32:-64])
    ciphertext[10] ^= 1
    h = Header.unpack(valid)
    join = device_session(plan, spec).endpoint.seal(Join(1, 2, 256, 1, 1, phash), round=1, model_version=0, seq=77)

    def padded_task(total: int) -> bytes:  # a TASK envelope of `total` bytes
        envelope = task()
        return signed(spec, with_header(envelope, payload_len=total - 96),
                      envelope[32:-64] + bytes(total - len(envelope)))

    # past the reassembly quota (refused at the first chunk), and past the largest downlink but within the quota
    oversized, past_downlink = padded_task(10_000), padded_task(max_downlink_bytes(plan) + 1)
    assert len(past_downlink) <= downlink_reassembly_bytes(plan) < len(oversized)
    cases = [
        ("forged", DOWN, frames_of(forged), "bad-signature"),
        ("tampered", DOWN, frames_of(bytes(tampered)), "bad-signature"),
        ("valid", DOWN, frames_of(valid), "ok"),
        ("duplicate", DOWN, frames_of(valid), "ok"),
        ("replayed", DOWN, frames_of(endpoint.seal(task_body(plan, phash, {"epochs": 5}, CHUNK), device_id=device_id,
                                                   round=h.round, model_version=0, seq=h.seq)), "replay"),
        ("stale", DOWN, frames_of(endpoint.seal(task_body(plan, phash, {"epochs": 5}, CHUNK), device_id=device_id,
                                                round=0, model_version=0, seq=999)), "stale"),
        ("re-signed ciphertext", DOWN, frames_of(signed(spec, Header.unpack(update), bytes(ciphertext))),
         "bad-ciphertext"),
        ("encrypted broadcast", BCAST, frames_of(signed(spec, with_header(update, device_id=0), update[32:-64])),
         "bad-flags"),
        ("misaddressed", DOWN, frames_of(task(device=other_id)), "wrong-topic"),
        ("addressed, on bcast", BCAST, frames_of(task()), "wrong-topic"),
        ("other fleet", DOWN, frames_of(signed(spec, with_header(valid, fleet_id=spec["fleet_id"] ^ 1),
                                               valid[32:-64])), "wrong-topic"),
        ("unknown topic", f"fedtiny/{FLEET}/up/{DEVICE}", frames_of(task()), "bad-topic"),
        ("uplink type", DOWN, frames_of(join), "bad-direction"),
        ("bad magic", DOWN, frames_of(b"XX" + valid[2:]), "bad-magic"),
        ("bad version", DOWN, frames_of(valid[:2] + b"\x09" + valid[3:]), "bad-version"),
        ("bad flags", DOWN, frames_of(valid[:4] + b"\x31" + valid[5:]), "bad-flags"),
        ("bad type", DOWN, frames_of(valid[:3] + b"\x3f" + valid[4:]), "bad-type"),
        ("truncated envelope", DOWN, frames_of(valid[:-1]), "truncated"),
        ("trailing envelope", DOWN, frames_of(valid + b"\0"), "trailing-bytes"),
        ("short envelope", DOWN, [chunking.Chunk(5, 0, 1, 20, 232, valid[:20]).encode()], "truncated"),
        ("oversized envelope", DOWN, frames_of(oversized, 1024), "oversized"),
        ("envelope past the largest downlink", DOWN, frames_of(past_downlink, 1024), "oversized"),
        ("config of 3 bytes", DOWN, frames_of(task(b"abc")), "bad-task"),
        ("uplink keep 100 %", DOWN, frames_of(task(struct.pack("<HH", 1, 100))), "bad-task"),
        ("TASK for another plan", DOWN, frames_of(task(plan_hash=bytes(32))), "ok"),  # ACK REJECTED, compared
        ("update, wrong version", DOWN, frames_of(seal(replace(global_update(plan, state, 7, state),
                                                               compress=False))), "ok"),
        ("update, not every buffer", DOWN, frames_of(seal(GlobalUpdate(FULL_STATE, full.entries[:-1],
                                                                       compress=False))), "bad-entry"),
        ("update, wrong shape", DOWN, frames_of(seal(GlobalUpdate(FULL_STATE, [DeltaEntry(0, 0, np.zeros((1, 65),
                                                                                                  np.int8))],
                                                                  compress=False))), "bad-entry"),
        ("update, truncated blob", DOWN, frames_of(seal(RawBody(b"\0\0\0\0FD"))), "truncated"),
        ("update", DOWN, frames_of(seal(replace(full, compress=False))), "ok"),
        ("update again, one round older", DOWN, frames_of(seal(replace(full, compress=False), round_=0)), "stale"),
    ]
    outcomes = {name: pair.receive(topic, frame_list, 1.1 + i / 100)
                for i, (name, topic, frame_list, _) in enumerate(cases)}
    assert outcomes == {name: expected for name, _, _, expected in cases}
    assert pair.c.state.model_version == 0 and pair.c.state.round == 1
    assert not np.array_equal(pair.c.state.global_state[plan.trainable_buffers()[0]],
                              plan.initial_state()[plan.trainable_buffers()[0]])  # the valid update applied


def test_a_restarted_node_resumes_from_what_it_persisted(plan, spec, library):
    """A power cut after the DELTA was sealed: C and Python nodes restarted from their last persisted states send
    the heartbeat and the whole upload on connect, take the ACK and JOIN again; a TASK from before the restart
    is stale now (the replay window keeps positions, not digests); the pending job survives a restart too."""
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    for p in pair.call("on_connect", 1.0):
        coordinator.receive(p.topic, p.payload, 1.0)
    downlinks = coordinator.send_task(DEVICE, 1, 1, new_global(plan, 1), {"epochs": 1, "uplink_keep": 0.5})
    task_frame = downlinks[-1].payload
    for d in downlinks[:-1]:
        assert pair.receive(d.topic, [d.payload], 1.1) == "ok"
    assert pair.receive(DOWN, [task_frame], 1.1) == "ok"
    pair = pair.restarted(plan, spec, library)  # after the TASK, before training
    pair.c.persist()  # as the agent does once it started
    pair.p.persist()
    assert pair.c_saves.count == pair.p_saves.count == 1
    assert_same_state(pair.c_saves.last, pair.p_saves.last, "persisted after the restart")
    c_job, p_job = pair.c.pending_job(), pair.p.pending_job()
    assert job_dict(c_job) == job_dict(p_job) is not None
    result = trained(plan, c_job.base, 5)
    upload = frames(pair.c.complete(c_job, result, 2.0))
    assert frames(pair.p.complete(p_job, result, 2.0)) == upload
    pair = pair.restarted(plan, spec, library)  # the upload sealed, never sent
    out = pair.call("on_connect", 5.0)
    assert frames(out)[1:] == upload and out[0].topic == topics.status(FLEET, DEVICE)  # no JOIN before the ACK
    replies = []
    for p in out:
        replies += coordinator.receive(p.topic, p.payload, 5.0)
    assert len(replies) == 1  # the ACK
    assert pair.receive(DOWN, [replies[0].payload], 5.1) == "ok"
    assert pair.c.state.upload is None
    assert pair.receive(DOWN, [task_frame], 5.2) == "stale"
    assert pair.call("tick", 60.0) == []


def test_rounds_with_clipping_and_error_feedback_match(plan, spec, library):
    """Three rounds in which the DELTA is clipped and only part of each change is sent (the rest carried to the
    next round): the C node seals the DELTA Python seals, every round, and keeps the same carry."""
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    for p in pair.call("on_connect", 1.0):
        coordinator.receive(p.topic, p.payload, 1.0)
    now = 2.0
    for round_, config in enumerate([{"uplink_keep": 0.3, "clip_norm": 0.05}, {"uplink_keep": 0.5},
                                     {"clip_norm": 0.02}], start=1):
        for d in coordinator.send_task(DEVICE, round_, round_, new_global(plan, 40 + round_), config):
            assert pair.receive(d.topic, [d.payload], now) == "ok"
        c_job, p_job = pair.c.pending_job(), pair.p.pending_job()
        assert job_dict(c_job) == job_dict(p_job)
        result = trained(plan, c_job.base, 100 + round_)
        c_out = pair.c.complete(c_job, result, now + 1)
        assert frames(c_out) == frames(pair.p.complete(p_job, result, now + 1)), f"round {round_}: the DELTA"
        assert_same_state(pair.c.state, pair.p.state, f"round {round_}")
        carried = any(np.any(v) for v in pair.c.state.carry.values())
        assert carried == (round_ < 3), f"round {round_}: the carry"  # keep 1 (round 3) sends all that was kept
        replies = []
        for p in c_out:
            replies += coordinator.receive(p.topic, p.payload, now + 1)
        assert [r.device for r in coordinator.take_replies()] == [DEVICE]
        for r in replies:
            assert pair.receive(r.topic, [r.payload], now + 2) == "ok"
        now += 10


def test_noised_rounds_match_bit_for_bit_and_a_masked_task_is_rejected_alike(plan, spec, library):
    """Device noise (distributed DP) in the C node: over rounds with clipping, error feedback and noise of two
    sizes (one that the +-255 clamp cuts), the C node seals the DELTA Python seals, from the same noise stream
    (identity, run, round). A masked TASK gets ACK REJECTED from both (neither holds the peers' identities)."""
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    for p in pair.call("on_connect", 1.0):
        coordinator.receive(p.topic, p.payload, 1.0)
    now = 2.0
    scale = max(float(np.max(v)) for n, v in row_scales(plan).items() if np.dtype(plan.buffers[n].dtype) == np.int8)
    configs = [{"noise_sigma": 2 * scale, "clip_norm": 0.05, "uplink_keep": 0.5},
               {"noise_sigma": 400 * scale, "min_survivors": 3}]  # 400 LSB: the clamp at 255 acts
    for round_, config in enumerate(configs, start=1):
        for d in coordinator.send_task(DEVICE, round_, round_, new_global(plan, 60 + round_), config):
            assert pair.receive(d.topic, [d.payload], now) == "ok"
        c_job, p_job = pair.c.pending_job(), pair.p.pending_job()
        assert job_dict(c_job) == job_dict(p_job) and c_job.noise_sigma == p_job.noise_sigma > 0
        result = trained(plan, c_job.base, 200 + round_)
        c_out = pair.c.complete(c_job, result, now + 1)
        assert frames(c_out) == frames(pair.p.complete(p_job, result, now + 1)), f"round {round_}: the DELTA"
        assert_same_state(pair.c.state, pair.p.state, f"round {round_}")
        replies = []
        for p in c_out:
            replies += coordinator.receive(p.topic, p.payload, now + 1)
        (reply,) = coordinator.take_replies()
        weights = [np.abs(v) for n, v in reply.delta.items() if np.dtype(plan.buffers[n].dtype) == np.int8]
        assert all(np.count_nonzero(w) > w.size // 2 for w in weights), "noise makes the DELTA dense"
        assert any(np.max(w) == 255 for w in weights) == (round_ == 2), "the clamp at 255 acts in round 2 only"
        for r in replies:
            assert pair.receive(r.topic, [r.payload], now + 2) == "ok"
        now += 10
    masked = coordinator.send_task(DEVICE, 3, 3, new_global(plan, 63), {"secagg": 1, "clip_norm": 0.05})
    for d in masked:
        assert pair.receive(d.topic, [d.payload], now) == "ok"
    assert pair.c.pending_job() is None and pair.p.pending_job() is None


def test_a_newer_coordinator_run_drops_the_unacknowledged_upload(plan, spec, library):
    """A downlink of a newer run (the coordinator lost its database) while a DELTA waits for its ACK: both nodes
    drop the upload and start counting rounds again, keep the model and the carry, and JOIN on the next connect."""
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    for p in pair.call("on_connect", 1.0):
        coordinator.receive(p.topic, p.payload, 1.0)
    for d in coordinator.send_task(DEVICE, 3, 1, new_global(plan, 1), {"uplink_keep": 0.5}):
        assert pair.receive(d.topic, [d.payload], 1.1) == "ok"
    c_job, p_job = pair.c.pending_job(), pair.p.pending_job()
    result = trained(plan, c_job.base, 9)
    assert frames(pair.c.complete(c_job, result, 2.0)) == frames(pair.p.complete(p_job, result, 2.0))
    run = pair.c.state.run
    newer = coordinator._endpoint.seal(task_body(plan, coordinator._plan_hash, {"epochs": 1}, CHUNK),
                                       device_id=spec["device_id"], round=1, model_version=1, seq=1, run=run + 1)
    assert pair.receive(DOWN, chunking.split(newer, 1, CHUNK), 3.0) == "ok"
    state = pair.c.state
    assert (state.run, state.round, state.trained_round, state.upload) == (run + 1, 1, -1, None)
    assert state.pending_task is not None and any(np.any(v) for v in state.carry.values())
    assert [p.topic for p in pair.call("on_connect", 4.0)] == [topics.uplink(FLEET, DEVICE),
                                                               topics.status(FLEET, DEVICE)]


def test_a_deflated_update_is_refused_by_the_c_node(plan, spec, library):
    """The C node does not inflate (its JOIN does not announce it): a zlib GLOBAL_UPDATE, which the Python session
    accepts, is refused as `compressed` and changes nothing."""
    coordinator = coordinator_session(plan, spec)
    session = c_session(plan, spec, library)
    update = global_update(plan, new_global(plan, 1), None, None)
    envelope = coordinator._endpoint.seal(replace(update, compress=True), device_id=spec["device_id"], round=1,
                                          model_version=1, seq=3)
    before = session.persisted_bytes()
    with pytest.raises(ProtocolError) as info:
        for frame in chunking.split(envelope, 3, CHUNK):
            session.receive(DOWN, frame, 1.0)
    assert info.value.reason == "compressed"
    assert session.persisted_bytes() == before
    python = device_session(plan, spec)
    for frame in chunking.split(envelope, 3, CHUNK):
        python.receive(DOWN, frame, 1.0)
    assert python.state.model_version == 1


# ---- chunking in C against fedtiny.protocol.chunking ----------------------------------------------------------

def test_c_split_writes_python_s_frames(library):
    c = cnode.CChunking(library)
    rng = np.random.default_rng(1)
    for size in (0, 1, 231, 232, 233, 1000, 4641):
        payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        for max_payload in (256, 300, 1024, 256 * 1024):
            assert c.split(payload, 0xDEADBEEF, max_payload) == chunking.split(payload, 0xDEADBEEF, max_payload)
    for bad in (255, 256 * 1024 + 1):
        with pytest.raises(ValueError, match="argument"):
            c.split(b"x", 1, bad)


def outcome(reassembler, frame: bytes, now: float, source: str):
    """("ok", duplicate, payload) or the refusal reason, and what stays open afterwards."""
    try:
        result = reassembler.accept(frame, now, source)
        duplicate, payload = (result.duplicate, result.payload) if isinstance(result, chunking.ChunkResult) \
            else result
        got = ("ok", duplicate, payload)
    except ProtocolError as exc:
        got = (exc.reason,)
    opened = len(reassembler.open_transfers()) if isinstance(reassembler, chunking.Reassembler) \
        else reassembler.open_transfers()
    return got, reassembler.reserved_bytes, opened


def test_c_reassembler_agrees_on_random_traffic(library):
    """Frames of several payloads from two sources, shuffled, duplicated, resent with other data, corrupted
    anywhere in the header, truncated or extended, with clock jumps past the ttl: the C reassembler (the device
    session's configuration: two transfers, no eviction) gives Python's answer to every frame."""
    c = cnode.CChunking(library)
    rng = np.random.default_rng(12)
    checked = set()
    for trial in range(150):
        max_bytes, ttl = int(rng.integers(600, 4000)), 30.0
        python, mine = chunking.Reassembler(2, max_bytes, ttl), c.reassembler(max_bytes, ttl)
        frames_ = []
        for tid in range(int(rng.integers(1, 5))):
            payload = rng.integers(0, 256, int(rng.integers(0, 2500)), dtype=np.uint8).tobytes()
            source = ("down", "bcast")[int(rng.integers(0, 2))]
            frames_ += [(source, f) for f in chunking.split(payload, tid % 3, int(rng.integers(256, 700)))]
        now = 0.0
        for _ in range(int(rng.integers(10, 60))):
            source, frame = frames_[int(rng.integers(0, len(frames_)))]
            frame = bytearray(frame)
            kind = rng.integers(0, 10)
            if kind == 0:  # a header byte changed
                frame[int(rng.integers(0, 24))] ^= 1 << int(rng.integers(0, 8))
            elif kind == 1 and len(frame) > 24:  # different data
                frame[-1] ^= 0xFF
            elif kind == 2:
                frame = frame[:int(rng.integers(0, len(frame)))]
            elif kind == 3:
                frame += b"\0"
            now += float(rng.choice([0.0, 1.0, 31.0]))
            got = outcome(python, bytes(frame), now, source)
            assert outcome(mine, bytes(frame), now, source) == got, f"trial {trial}"
            checked.add(got[0][0])
    assert checked >= {"ok", "bad-chunk", "truncated", "trailing-bytes", "bad-magic", "oversized",
                       "inconsistent-chunk", "too-many-transfers"}


# ---- the transcripts on the Cortex-M4 -------------------------------------------------------------------------

def persist_counts(plan, spec, lines: list[dict]) -> list[int]:
    """How often the Python session persists in each call of a transcript."""
    saves = Saves()
    session = python_session(plan, spec, saves)
    job, jobs, counts = None, {}, []
    for line in lines:
        before = saves.count
        if line["op"] == "connect":
            session.on_connect(line["now"])
        elif line["op"] == "tick":
            session.tick(line["now"])
        elif line["op"] == "complete":
            session.complete(jobs[line["round"]] if "round" in line else job, train_result(line["result"]),
                             line["now"])
        else:
            try:
                _, job = session.receive(line["topic"], bytes.fromhex(line["frame"]), line["now"])
                if job is not None:
                    jobs[job.round] = job
            except ProtocolError:
                pass
        counts.append(saves.count - before)
    return counts


@pytest.fixture(scope="module")
def m4_replay(plan, spec, library, tmp_path_factory):
    """Every transcript replayed by the C node on the Cortex-M4 under QEMU (firmware_node_replay.c)."""
    require_tool("arm-none-eabi-gcc")
    require_tool("qemu-system-arm")
    transcripts = {}
    for name in sorted(SCENARIOS):
        lines = transcript(name)
        for line, count in zip(lines, persist_counts(plan, spec, lines)):
            line["persists"] = count
        transcripts[name] = lines
    identity = Identity.from_seed(spec["device_seed"].encode()).to_bytes()
    coordinator = Identity.from_seed(spec["coordinator_seed"].encode()).public.to_bytes()
    vectors = cnode.render_replay(library, spec, identity, coordinator, transcripts)
    cache = tmp_path_factory.mktemp("m4_replay")
    elf = cnode.build_replay_firmware(library, vectors, cache)
    return transcripts, cnode.run_replay_firmware(elf, cache_dir=cache)


def test_c_node_passes_the_transcripts_on_the_m4(m4_replay):
    transcripts, run = m4_replay
    assert [(t, i, op) for t, i, op, _, _ in run.ops] == [(name, i, line["op"]) for name, lines in transcripts.items()
                                                          for i, line in enumerate(lines)]
    assert [(t, i) for t, i, _, ok, _ in run.ops if not ok] == []
    assert run.passed and run.returncode == 0
    assert len(run.instructions) == len(run.ops)


def test_an_altered_transcript_fails_on_the_m4(plan, spec, library, tmp_path_factory):
    """The firmware's checks can fail: a refusal reason and one publish changed are both reported."""
    require_tool("arm-none-eabi-gcc")
    require_tool("qemu-system-arm")
    lines = transcript("rejected_frames")
    for line, count in zip(lines, persist_counts(plan, spec, lines)):
        line["persists"] = count
    stale = next(i for i, line in enumerate(lines) if line.get("error") == "stale")
    lines[stale]["error"] = "replay"
    topic, payload, retain = lines[0]["out"][0]
    lines[0]["out"][0] = [topic, payload[:-2] + f"{int(payload[-2:], 16) ^ 1:02x}", retain]
    identity = Identity.from_seed(spec["device_seed"].encode()).to_bytes()
    coordinator = Identity.from_seed(spec["coordinator_seed"].encode()).public.to_bytes()
    vectors = cnode.render_replay(library, spec, identity, coordinator, {"altered": lines})
    cache = tmp_path_factory.mktemp("m4_altered")
    run = cnode.run_replay_firmware(cnode.build_replay_firmware(library, vectors, cache), cache_dir=cache)
    assert [i for _, i, _, ok, _ in run.ops if not ok] == [0, stale]
    assert not run.passed and run.returncode != 0


# ---- the personalised model kept between rounds (issue #16) ----------------------------------------------------

PERSONAL_SEED = 11


def samples(plan, n: int, seed: int = 4):
    """n random int8 samples of the plan's input and labels of its classes."""
    graph = plan.graph
    shape = tuple(graph.tensors[graph.inputs[0]].shape)
    classes_ = graph.tensors[graph.outputs[0]].shape[-1]
    rng = np.random.default_rng(seed)
    return rng.integers(-128, 128, (n,) + shape).astype(np.int8), rng.integers(0, classes_, n).astype(np.int64)


def deliver(coordinator, publishes, now) -> list:
    """Hand the node's publishes to the coordinator; its replies."""
    replies = []
    for p in publishes:
        replies += coordinator.receive(p.topic, p.payload, now)
    return replies


def test_c_and_python_keep_the_same_personalised_model_and_predict_the_same_classes(plan, spec, library):
    assert keeps_personal_model(plan)
    x, y = samples(plan, 40)
    pair = Pair(plan, spec, library)
    coordinator = coordinator_session(plan, spec)
    deliver(coordinator, pair.call("on_connect", 1.0), 1.0)
    for d in coordinator.send_task(DEVICE, 1, 1, new_global(plan, 1), {"epochs": 2}):
        assert pair.receive(d.topic, [d.payload], 1.1) == "ok"
    assert pair.c.state.personal is None and pair.p.state.personal is None  # nothing trained yet: the global model
    job = pair.p.pending_job()
    result = LocalTraining(plan, x, y, PERSONAL_SEED, Trainer).run(job)
    c_out = pair.c.complete(pair.c.pending_job(), result, 2.0)
    assert [p.payload for p in c_out] == [p.payload for p in pair.p.complete(job, result, 2.0)]
    for state in (pair.c.state, pair.p.state, pair.c_saves.last, pair.p_saves.last):  # kept, and in the DELTA's save
        assert state.personal is not None and state.upload is not None
        for name, value in result.state.items():
            assert np.array_equal(state.personal[name], value)
    (reply,) = deliver(coordinator, c_out, 2.0)  # the ACK
    assert pair.receive(reply.topic, [reply.payload], 2.1) == "ok"
    (delta,) = coordinator.take_replies()

    # the personalised model scores on the held-out fifth what the DELTA reported
    _, held = heldout_split(PERSONAL_SEED, len(x))
    hits = [predict(plan, pair.p.state, x[i]) == y[i] for i in held]
    assert len(held) == 8 and np.float32(sum(hits) / len(held)) == np.float32(delta.metrics["personal_accuracy"])

    # round 2's GLOBAL_UPDATE replaces the global model, not the personalised one
    newer = new_global(plan, 2)
    for d in coordinator.send_task(DEVICE, 2, 2, newer, {"epochs": 1})[:-1]:  # the GLOBAL_UPDATE, not the TASK
        assert pair.receive(d.topic, [d.payload], 3.0) == "ok"
    for state in (pair.c.state, pair.p.state):
        assert state.model_version == 2
        assert all(np.array_equal(state.global_state[k], v) for k, v in newer.items())
        assert all(np.array_equal(state.personal[k], v) for k, v in result.state.items())
    pair = pair.restarted(plan, spec, library)  # a power cut: both come back with what they persisted last
    assert all(np.array_equal(pair.c.state.personal[k], v) for k, v in result.state.items())

    # C and Python predict the same class for every sample, by the personalised model and by the global one
    c_model = cruntime.CPlanModel(plan)  # the content-keyed default cache: the kernels are built once
    for state in (pair.c.state, NodeState(2, newer, 0)):
        python = [predict(plan, state, s) for s in x]
        assert [c_model.predict_class(state.inference_state(), s) for s in x] == python
        assert python == list(classes(plan, state.inference_state(), x))
    assert [predict(plan, pair.c.state, s) for s in x] != [predict(plan, NodeState(2, newer, 0), s) for s in x], \
        "the personalised and the global model should differ on some sample, else the test shows nothing"
