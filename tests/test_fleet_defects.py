"""Regression tests for the fleet defects of issue #11, each through real mosquitto (TLS, client certificates, ACL)
where a broker is involved, or on the sans-IO sessions where a number is measured.

    late ACK          a DELTA acknowledged after the device took a later TASK frees the device
    quotas            one device flooding partial transfers, or declaring a huge one, delays no other device
    bomb              a 16 KB DELTA that inflates to a huge zero bitmap costs the coordinator under 10 MB
    fresh database    a coordinator that lost its state gets full participation from devices at round 40
    visibility        every refused message is a Rejection; replayed DELTAs get rate-limited ACKs
    durability        downlink seqs are reserved on disk before use; the state database is 0600
    straggler         a TASK of a later round supersedes the job in progress: a device that missed a round
                      answers the next one when asked, instead of first finishing (and uploading) the old one
"""

import os
import stat
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from conftest import require_tool
from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.coordinator import CoordinatorSession
from fedtiny.protocol.delta import BLOB_HEADER, ENTRY_BITMAP, ENTRY_HEADER, ENTRY_PLAN_SCALES, FLAG_ZLIB, MAGIC, VERSION
from fedtiny.protocol.device import NodeState, save_state
from fedtiny.protocol.envelope import DOWN, DeviceEndpoint, Identity, PublicIdentity
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.messages import Delta, MessageType
from fedtiny.protocol.update import encode_update, state_delta
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny.transport.faults import FaultyTransport
from fedtiny.transport.mqtt import CoordinatorLink, MqttTransport, load_fleet
from fedtiny_device.agent import NodeAgent, RoundFaults
from fedtiny.interpreter import quantize_input

FLEET = "plant"
DEVICES = [f"d{i}" for i in range(7)]
SAMPLES = 16


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(DEVICES) * SAMPLES + 32, 30)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    graph = quantize(zoo.build("mlp", (30,), 2), x[:32])
    return compile_plan(graph, parse("last:2", graph)), quantize_input(graph, x[32:]), y[32:]


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "keys"
    provision_fleet(out, FLEET, DEVICES)
    return out


@pytest.fixture(scope="module")
def mosquitto(fleet_dir, tmp_path_factory):
    require_tool("mosquitto")
    port = free_port()
    config = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    config.write_text(mosquitto_config(fleet_dir, port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port) as broker:
        yield f"mqtts://{broker.host}:{port}"


def agent(url, fleet_dir, model, index, state_dir, **kwargs):
    plan, x, y = model
    rows = slice(index * SAMPLES, (index + 1) * SAMPLES)
    kwargs.setdefault("chunk_size", 256)
    kwargs.setdefault("heartbeat_s", 1.0)
    return NodeAgent(DEVICES[index], url, fleet_dir, plan, x[rows], y[rows], fleet=FLEET, state_dir=state_dir,
                     seed=100 + index, **kwargs)


def device_endpoint(fleet_dir, name):
    return device_endpoint_of(fleet_dir / "devices" / name)


def session(fleet_dir, plan, **kwargs):
    manifest = load_fleet(fleet_dir)
    identity = Identity.from_bytes((fleet_dir / "coordinator/identity.key").read_bytes())
    peers = {n: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for n, v in manifest["devices"].items()}
    return CoordinatorSession(plan, FLEET, manifest["fleet_id"], identity, peers, **kwargs)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def collect(link, n, timeout=20.0):
    replies, deadline = [], time.monotonic() + timeout
    while len(replies) < n and time.monotonic() < deadline:
        replies += link.replies(0.2)
    return replies


# --- 1. a late ACK ------------------------------------------------------------------------------------------

def test_a_device_acked_after_a_later_task_trains_again(mosquitto, fleet_dir, model, tmp_path):
    """The DELTA of round 1 reaches the coordinator only after the device accepted the TASK of round 2. The ACK
    used to carry round 1, which the device then refused as stale, holding its upload (and itself) forever."""
    plan = model[0]
    link = CoordinatorLink(mosquitto, fleet_dir, plan, fleet=FLEET).start()
    node = agent(mosquitto, fleet_dir, model, 0, tmp_path, ack_timeout_s=1.5, transport_wrapper=FaultyTransport)
    held = {"on": True}
    node.transport.drop = lambda p: (held["on"] and "/up/" in p.topic and p.payload[:2] == b"FC"
                                     and node.session.state.upload is not None)
    node.start()
    try:
        wait_for(lambda: any(d.device == DEVICES[0] for d in link.devices()), what="JOIN")
        link.send_task(DEVICES[0], 1, 0, plan.initial_state(), {})
        wait_for(lambda: node.session.state.upload is not None, what="round 1 trained")
        link.send_task(DEVICES[0], 2, 0, plan.initial_state(), {})  # the device takes round 2 before any ACK
        wait_for(lambda: (node.session.state.pending_task or {}).get("round") == 2, what="TASK 2 accepted")
        held["on"] = False  # the straggler's round-1 upload finally gets through (its resend timer)
        replies = collect(link, 2)
        assert sorted(r.round for r in replies) == [1, 2], replies
        assert "stale" not in node.rejected, node.rejected
    finally:
        node.stop()
        link.close()


# --- 2. per-device quotas -----------------------------------------------------------------------------------

def test_a_flooding_device_delays_no_other(mosquitto, fleet_dir, model, tmp_path):
    """d1 opens 40 partial transfers and declares one of 256 MiB; d2's upload goes through at once."""
    plan = model[0]
    link = CoordinatorLink(mosquitto, fleet_dir, plan, fleet=FLEET).start()
    hostile = MqttTransport(mosquitto, fleet_dir, DEVICES[1], DEVICES[1], on_connect=lambda: None,
                            on_message=lambda t, p: None).start()
    honest = agent(mosquitto, fleet_dir, model, 2, tmp_path).start()
    try:
        up = topics.uplink(FLEET, DEVICES[1])
        for tid in range(40):
            chunk = chunking.Chunk(1000 + tid, 0, 4, 4 * 4096, 4096, bytes(4096))
            hostile.publish(topics.Publish(up, chunk.encode()))
        huge = chunking.Chunk(7, 0, 65536, 256 << 20, 4096, bytes(4096))
        hostile.publish(topics.Publish(up, huge.encode()))
        wait_for(lambda: link.stats["rejected:oversized"] >= 1, what="the 256 MiB transfer refused")
        wait_for(lambda: any(d.device == DEVICES[2] for d in link.devices()), what="honest JOIN")
        link.send_task(DEVICES[2], 1, 0, plan.initial_state(), {})
        assert [r.device for r in collect(link, 1, timeout=10.0)] == [DEVICES[2]]
        held = link.session._reassembler(DEVICES[1])
        assert len(held.open_transfers()) <= CoordinatorSession.TRANSFERS_PER_DEVICE
        assert held.reserved_bytes <= held.max_bytes
        assert {r.reason for r in link.rejections()} >= {"oversized"}
    finally:
        honest.stop()
        hostile.close()
        link.close()


# --- 3. the decompression bomb ------------------------------------------------------------------------------

def _bomb(elements: int) -> bytes:
    """A DELTA body whose one entry claims `elements` int32 elements behind an all-zero bitmap, deflated."""
    bitmap = bytes((elements + 7) // 8)
    body = ENTRY_HEADER.pack(0, 3, ENTRY_BITMAP | ENTRY_PLAN_SCALES, 0, elements // 64, 64) + bitmap
    packer = zlib.compressobj(9, zlib.DEFLATED, 10)
    deflated = packer.compress(body) + packer.flush()
    blob = BLOB_HEADER.pack(MAGIC, VERSION, FLAG_ZLIB, 1, 0, len(body)) + deflated
    return struct.pack("<If", 1, 0.0) + blob


class _Raw:
    TYPE = MessageType.DELTA

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def encode(self) -> bytes:
        return self.raw


def test_a_16kb_bomb_costs_under_10mb(fleet_dir, model):
    plan = model[0]
    body = _bomb(16 * 8 * 1024 * 1024)  # 128 Mi elements: 16 MiB of bitmap, about 16 KB deflated
    envelope = device_endpoint(fleet_dir, DEVICES[3]).seal(_Raw(body), round=1, model_version=0)
    assert len(envelope) < 20_000
    coordinator = session(fleet_dir, plan)
    frames = chunking.split(envelope, 1, 4096)
    tracemalloc.start()
    try:
        for frame in frames:
            coordinator.receive(topics.uplink(FLEET, DEVICES[3]), frame, 0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert coordinator.stats["rejected:oversized"] == 1, coordinator.stats
    assert peak < 10 * 1024 * 1024, f"{peak / 2**20:.1f} MiB"


# --- 5. a coordinator that lost its database ----------------------------------------------------------------

def test_a_fresh_coordinator_gets_devices_at_round_40_in_its_first_round(mosquitto, fleet_dir, model, tmp_path):
    plan = model[0]
    for i in (4, 5):  # what an old coordinator left on the devices: round 40 answered, its downlinks accepted
        device_id = topics.name_id(DEVICES[i])
        state = NodeState(7, plan.initial_state(), 0, round=40, seq=500, trained_round=40,
                          replay=[[device_id, DOWN, 0, 0, 40, 90_000]])
        save_state(tmp_path / f"{DEVICES[i]}.node", state)
    nodes = [agent(mosquitto, fleet_dir, model, i, tmp_path).start() for i in (4, 5)]
    link = CoordinatorLink(mosquitto, fleet_dir, plan, fleet=FLEET).start()  # no durable state: a fresh one
    try:
        wait_for(lambda: {DEVICES[4], DEVICES[5]} <= {d.device for d in link.devices()}, what="JOINs")
        for i in (4, 5):
            link.send_task(DEVICES[i], 1, 0, plan.initial_state(), {})
        replies = collect(link, 2)
        assert sorted(r.device for r in replies) == [DEVICES[4], DEVICES[5]], \
            ([n.rejected for n in nodes], [vars(n.session.state).get("pending_task") for n in nodes],
             [n.session.state.model_version for n in nodes], link.stats)
        assert all(r.round == 1 for r in replies)
        # above every run its devices reported (1 when they knew none; other tests' devices share the broker)
        assert link.session.run >= 1 and all(n.session.state.run == link.session.run for n in nodes)
    finally:
        for n in nodes:
            n.stop()
        link.close()


# --- 6. rejections are visible; replays are not amplified ---------------------------------------------------

def test_replayed_deltas_get_rate_limited_acks(fleet_dir, model):
    plan = model[0]
    coordinator = session(fleet_dir, plan)
    coordinator.restore({"run": 1})
    coordinator.send_task(DEVICES[0], 1, 0, None, {})  # the TASK this DELTA answers
    device = device_endpoint(fleet_dir, DEVICES[0])
    delta = encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()), 1, 0.0, 0.0)
    frame = chunking.split(device.seal(delta, round=1, model_version=0, run=1), 1, 4096)[0]
    topic = topics.uplink(FLEET, DEVICES[0])
    first = coordinator.receive(topic, frame, 0.0)
    assert len(first) == 1 and coordinator.take_replies()
    replayed = [p for t in range(100) for p in coordinator.receive(topic, frame, 1.0 + t * 0.01)]
    assert len(replayed) == 1, "one ACK for a hundred replays within the interval"
    assert coordinator.stats["stale_acks_suppressed"] == 99
    later = coordinator.receive(topic, frame, 1.0 + CoordinatorSession.STALE_ACK_INTERVAL_S + 1)
    assert len(later) == 1


def test_every_refusal_is_a_rejection_with_its_reason(fleet_dir, model):
    plan = model[0]
    coordinator = session(fleet_dir, plan)
    device = device_endpoint(fleet_dir, DEVICES[0])
    delta = encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()), 1, 0.0, 0.0)
    envelope = bytearray(device.seal(delta, round=1, model_version=0))
    envelope[-1] ^= 1
    coordinator.receive(topics.uplink(FLEET, DEVICES[0]), chunking.split(bytes(envelope), 1, 4096)[0], 0.0)
    coordinator.receive(topics.uplink(FLEET, "stranger"), b"\x00" * 30, 0.0)
    coordinator.receive("fedtiny/other/up/d0", b"\x00" * 30, 0.0)
    got = [(r.device, r.reason) for r in coordinator.take_rejections()]
    assert got == [(DEVICES[0], "bad-signature"), ("stranger", "unknown-device"), ("d0", "bad-topic")]
    assert coordinator.take_rejections() == []


# --- 7. durability ------------------------------------------------------------------------------------------

def test_downlink_seqs_are_reserved_on_disk_before_use_and_never_reused(fleet_dir, model):
    plan = model[0]
    saved = []
    coordinator = session(fleet_dir, plan, save=lambda state: saved.append(dict(state)))
    device = device_endpoint(fleet_dir, DEVICES[0])
    seqs = []
    for round_ in range(1, 4):
        for p in coordinator.send_task(DEVICES[0], round_, 0, None, {}):
            received = device.open(chunking.parse_chunk(p.payload).data)
            seqs.append(received.header.seq)
            assert saved and saved[-1]["seq"] > received.header.seq, "reserved before use"
    restarted = session(fleet_dir, plan)
    restarted.restore(saved[-1])
    again = [device.open(chunking.parse_chunk(p.payload).data).header.seq
             for p in restarted.send_task(DEVICES[0], 4, 0, None, {})]
    assert min(again) >= saved[-1]["seq"] > max(seqs)


def test_the_state_database_is_private(tmp_path):
    from fedtiny_server.state import StateStore

    store = StateStore(tmp_path / "state.db")
    store.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state.db").st_mode) == 0o600


def test_rounds_without_replies_fail_the_coordinator_loudly(mosquitto, fleet_dir, model, tmp_path):
    """Devices enrolled but silent: each round is a warning event, and the command exits non-zero saying so."""
    from click.testing import CliRunner

    from fedtiny.planfile import save_plan
    from fedtiny_server.cli import coordinator_command

    save_plan(model[0], tmp_path / "plan.ftp")
    result = CliRunner().invoke(coordinator_command, [
        "--broker", mosquitto, "--fleet-dir", str(fleet_dir), "--fleet", FLEET, "--plan", str(tmp_path / "plan.ftp"),
        "--rounds", "2", "--deadline", "0.5", "--state-db", str(tmp_path / "state.db")])
    assert result.exit_code == 3, result.output
    assert "2 of 2 rounds got no device replies" in result.output


def test_a_revoked_device_is_refused_by_the_running_coordinator(model, tmp_path):
    """`fedtiny keys --revoke` while the coordinator runs: its link reads the new denylist and refuses the device
    (the broker refuses it too after a SIGHUP: tests/test_keys.py)."""
    from fedtiny.protocol.keys import revoke_devices

    plan = model[0]
    keys = tmp_path / "keys"
    provision_fleet(keys, FLEET, DEVICES[:2])
    # the device's own folder, copied before the revocation deletes it from the provisioning folder
    device = device_endpoint_of(keys / "devices" / DEVICES[0])
    link = CoordinatorLink("mqtt://127.0.0.1:1", keys, plan, fleet=FLEET)  # never started: no broker needed
    link._transport.publish = lambda p: None
    topic = topics.uplink(FLEET, DEVICES[0])
    delta = encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()), 1, 0.0, 0.0)
    link.send_task(DEVICES[0], 1, 0, None, {})
    run = link.session.run
    link._on_message(topic, chunking.split(device.seal(delta, round=1, model_version=0, run=run), 1, 4096)[0])
    assert link.replies(0.1) and not link.rejections()
    time.sleep(0.01)  # a new time stamp on revoked.json
    revoke_devices(keys, [DEVICES[0]])
    assert DEVICES[0] not in {d.device for d in link.devices()}  # reads the denylist
    link._on_message(topic, chunking.split(device.seal(delta, round=2, model_version=0, run=run), 2, 4096)[0])
    assert link.replies(0.1) == []
    assert [(r.device, r.reason) for r in link.rejections()] == [(DEVICES[0], "unknown-device")]
    with pytest.raises(ValueError, match="not enrolled"):
        link.send_task(DEVICES[0], 2, 0, None, {})


def device_endpoint_of(folder):
    manifest = load_fleet(folder)
    (entry,) = manifest["devices"].values()
    return DeviceEndpoint(manifest["fleet_id"], entry["id"], Identity.from_bytes((folder / "identity.key").read_bytes()),
                          PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))


# --- 8. stragglers ------------------------------------------------------------------------------------------

def test_a_later_task_supersedes_the_job_in_progress(fleet_dir, model, tmp_path):
    """Sans-IO: TASK 2 arrives while the job of round 1 runs (the coordinator closed round 1 at its deadline).
    The session hands out job 2, and completing job 1 sends nothing: its DELTA would only be refused."""
    plan, x, y = model
    coordinator = session(fleet_dir, plan)
    node = NodeAgent(DEVICES[3], "mqtt://127.0.0.1:1", fleet_dir, plan, x[:SAMPLES], y[:SAMPLES], fleet=FLEET,
                     state_dir=tmp_path, seed=3, chunk_size=256)  # never started: its session and training only
    device = node.session

    def deliver(publishes):
        jobs = [device.receive(p.topic, p.payload, 0.0)[1] for p in publishes]
        return jobs[-1]

    job1 = deliver(coordinator.send_task(DEVICES[3], 1, 0, None, {}))
    assert job1.round == 1 and not device.superseded(job1)
    job2 = deliver(coordinator.send_task(DEVICES[3], 2, 0, None, {}))
    assert job2.round == 2 and device.superseded(job1) and not device.superseded(job2)
    seq = device.state.seq
    assert device.complete(job1, node.training.run(job1), 1.0) == []
    assert device.state.seq == seq and device.state.upload is None and device.state.trained_round == -1
    device.skip(job1)  # neither does skipping it touch the newer task
    assert device.state.pending_task["round"] == 2
    for p in device.complete(job2, node.training.run(job2), 2.0):
        coordinator.receive(p.topic, p.payload, 2.0)
    assert [r.round for r in coordinator.take_replies()] == [2]
    assert device.pending_job() is None  # answered: nothing left to run


def test_a_straggler_answers_the_next_round_when_asked(mosquitto, fleet_dir, model, tmp_path):
    """Round 1 takes the node 60 s. TASK 2 comes after 1 s, as it would once round 1 closed at a short deadline:
    the node answers round 2 at once and never uploads round 1. It used to finish round 1 first (a DELTA the
    coordinator refuses as being for the wrong round) and start round 2 a minute late, missing it too: a
    straggler that missed one round kept missing the next."""
    plan = model[0]
    link = CoordinatorLink(mosquitto, fleet_dir, plan, fleet=FLEET).start()
    node = agent(mosquitto, fleet_dir, model, 6, tmp_path, faults=RoundFaults(delay=lambda r: 60.0 if r == 1 else 0.0))
    node.start()
    try:
        wait_for(lambda: any(d.device == DEVICES[6] for d in link.devices()), what="JOIN")
        link.send_task(DEVICES[6], 1, 0, plan.initial_state(), {})
        wait_for(lambda: node.session.state.pending_task is not None, what="TASK 1 accepted")
        time.sleep(1.0)
        asked = time.monotonic()
        link.send_task(DEVICES[6], 2, 0, plan.initial_state(), {})
        replies = collect(link, 1, timeout=20.0)
        assert [r.round for r in replies] == [2], replies
        assert time.monotonic() - asked < 20.0
        assert link.replies(1.0) == [] and link.stats["replies"] == 1  # no DELTA for round 1, now or later
        assert node.rounds_done == 1 and node.session.state.trained_round == 2
    finally:
        node.stop()
        link.close()
