"""CoordinatorLink and NodeAgents through real brokers (embedded amqtt; mosquitto with TLS, client certificates,
ACL and password file from provision_fleet), and property tests of the state/delta helpers."""

import json
import os
import struct
import time
from dataclasses import replace
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import require_tool
from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.brokers import EmbeddedBroker, MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, TAG_SIZE, DeviceEndpoint, Header, Identity, PublicIdentity
from fedtiny.transport.faults import FaultyTransport
from fedtiny.transport.mqtt import CoordinatorLink, load_fleet
from fedtiny.protocol.topics import Publish
from fedtiny.protocol.update import FULL_STATE, apply_delta, apply_global_update, clip_delta, decode_update, encode_update, entries_to_state, global_update, max_downlink_bytes, row_scales, split_uplink, state_delta, state_entries
from fedtiny.protocol.task import task_body, task_settings
from fedtiny.interpreter import quantize_input
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import AckStatus, Delta, GlobalUpdate, Leave, MessageType
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny_device.agent import NodeAgent, heldout_split, training_order
from fedtiny_device.trainer import Trainer

FLEET = "lab"
DEVICES = [f"{group}-{i}" for group in ("round", "dup", "acl", "will", "raw", "resume", "restart") for i in range(3)]
TIMEOUT = 15.0
SAMPLES = 16  # per device


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * SAMPLES + 32, 30)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    graph = quantize(zoo.build("mlp", (30,), 2), x[:32])
    plan = compile_plan(graph, parse("last:2", graph))
    return plan, quantize_input(graph, x[32:]), y[32:]


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "keys"
    provision_fleet(out, FLEET, DEVICES)
    return out


@pytest.fixture(scope="module")
def amqtt_broker(fleet_dir):
    with EmbeddedBroker(fleet_dir) as broker:
        broker.url = f"mqtt://{broker.host}:{broker.port}"
        yield broker


@pytest.fixture(scope="module")
def mosquitto(fleet_dir, tmp_path_factory):
    require_tool("mosquitto")
    port = free_port()
    config = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    config.write_text(mosquitto_config(fleet_dir, port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port) as broker:
        broker.url = f"mqtts://{broker.host}:{port}"
        yield broker


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request):
    return request.getfixturevalue("amqtt_broker" if request.param == "amqtt" else "mosquitto")


def unique() -> str:
    return uuid.uuid4().hex[:8]


def make_link(broker, fleet_dir, plan, chunk_size=256):
    return CoordinatorLink(broker.url, fleet_dir, plan, fleet=FLEET, chunk_size=chunk_size,
                           client_id=f"coordinator-{unique()}").start()


def make_agent(broker, fleet_dir, model, device, index, state_dir, **kwargs):
    plan, x, y = model
    rows = slice(index * SAMPLES, (index + 1) * SAMPLES)
    kwargs.setdefault("chunk_size", 256)
    kwargs.setdefault("heartbeat_s", 1.0)
    return NodeAgent(device, broker.url, fleet_dir, plan, x[rows], y[rows], fleet=FLEET, state_dir=state_dir,
                     seed=100 + index, client_id=f"{device}-{unique()}", **kwargs)


def wait_for(predicate, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def collect(link, n, timeout=TIMEOUT):
    replies, deadline = [], time.monotonic() + timeout
    while len(replies) < n and time.monotonic() < deadline:
        replies += link.replies(0.2)
    return replies


def expected_delta(model, index, round_, global_state, rng_counter=None, epochs=1):
    """What the Python reference Trainer computes for device `index` from `global_state` (on the samples the device
    does not hold out)."""
    plan, x, y = model
    rows = slice(index * SAMPLES, (index + 1) * SAMPLES)
    trainer = Trainer(plan, 100 + index)
    if rng_counter is not None:
        trainer.rng_counter = rng_counter
    trainer.load_trainable_state(global_state)
    train, _ = heldout_split(100 + index, SAMPLES)
    for i in train[training_order(100 + index, round_, len(train), epochs)]:
        trainer.step(x[rows][i], int(y[rows][i]))
    return state_delta(trainer.trainable_state(), global_state), trainer.rng_counter


def shifted_state(plan, rng):
    """A plausible new global state: the initial one with small integer steps."""
    out = {}
    for name, value in plan.initial_state().items():
        step = rng.integers(-3, 4, value.shape)
        out[name] = np.clip(value.astype(np.int64) + step, -127, 127).astype(value.dtype) \
            if value.dtype == np.int8 else (value + step).astype(np.int32)
    return out


class Recorder:
    """A FaultyTransport drop rule that records what an agent publishes; `drop` picks the frames to lose.
    `NodeAgent(..., transport_wrapper=recorder.wrap)`."""

    def __init__(self):
        self.sent: list[Publish] = []
        self.drop = lambda p: False

    def __call__(self, publish) -> bool:
        if self.drop(publish):
            return True
        self.sent.append(publish)
        return False

    def wrap(self, transport) -> FaultyTransport:
        return FaultyTransport(transport, drop=self)


def is_multi_chunk(publish):
    return chunking.parse_chunk(publish.payload).count > 1


# --- through brokers ---------------------------------------------------------------------------------------

def test_join_and_round_of_three_bit_exact(broker, fleet_dir, model, tmp_path):
    plan = model[0]
    names = [f"round-{i}" for i in range(3)]
    link = make_link(broker, fleet_dir, plan)
    recorders = [Recorder() for _ in names]
    agents = [make_agent(broker, fleet_dir, model, n, i, tmp_path, transport_wrapper=rec.wrap)
              for i, (n, rec) in enumerate(zip(names, recorders))]
    for agent in agents:
        agent.start()
    try:
        seen = wait_for(lambda: {d.device: d for d in link.devices() if d.device in names and d.memory_budget}
                        if len([d for d in link.devices() if d.device in names and d.memory_budget]) == 3 else None,
                        what="3 JOINs")
        assert all(d.online and d.memory_budget == plan.arena_size and len(d.plan_hash) == 32 for d in seen.values())
        assert seen["round-0"].device_id == topics.name_id("round-0")

        rng = np.random.default_rng(1)
        global1 = shifted_state(plan, rng)
        down = [link.send_task(n, 1, 1, global1, {"epochs": 1}) for n in names]
        assert all(b > 0 for b in down)
        replies = {r.device: r for r in collect(link, 3)}
        assert sorted(replies) == names
        for i, name in enumerate(names):
            reply = replies[name]
            want, counter = expected_delta(model, i, 1, global1)
            assert (reply.round, reply.model_version, reply.num_examples) == (1, 1, SAMPLES - SAMPLES // 5)  # 3 held out
            assert set(reply.delta) == set(want)
            for buf in want:
                assert reply.delta[buf].dtype == want[buf].dtype and np.array_equal(reply.delta[buf], want[buf]), buf
            assert any(np.any(v) for v in want.values())
            assert 0 <= reply.metrics["accuracy"] <= 1 and reply.metrics["loss"] > 0
            assert 0 <= reply.metrics["personal_accuracy"] <= 1
            delta_frames = [p for p in recorders[i].sent if is_multi_chunk(p)]
            assert len(delta_frames) > 3 and all(len(p.payload) <= 256 for p in recorders[i].sent)
            assert reply.uplink_bytes == sum(len(p.payload) for p in delta_frames)
            assert agents[i].rng_counter == counter and agents[i].model_version == 1

        # round 2: devices hold version 1, so only changed channels travel
        global2 = {k: v.copy() for k, v in global1.items()}
        first = plan.trainable_buffers()[0]
        global2[first][0] = np.clip(global2[first][0].astype(np.int16) + 1, -127, 127).astype(np.int8)
        wait_for(lambda: all(link.session._versions.get(n) == 1 for n in names), what="devices to report version 1")
        small = link.send_task(names[0], 2, 2, global2, {"epochs": 1})
        assert small < down[0] / 2
        (reply,) = collect(link, 1)
        assert (reply.device, reply.round, reply.model_version) == (names[0], 2, 2)
        want, _ = expected_delta(model, 0, 2, global2, rng_counter=counter_of(model, 0, global1))
        assert all(np.array_equal(reply.delta[b], want[b]) for b in want)
        assert not any(k.startswith("rejected") for k in link.stats), link.stats
    finally:
        for agent in agents:
            agent.stop()
        link.close()


def counter_of(model, index, global_state):
    return expected_delta(model, index, 1, global_state)[1]


def device_endpoint(fleet_dir, name):
    manifest = load_fleet(fleet_dir)
    folder = fleet_dir / "devices" / name
    return DeviceEndpoint(manifest["fleet_id"], manifest["devices"][name]["id"],
                          Identity.from_bytes((folder / "identity.key").read_bytes()),
                          PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))


def test_duplicates_replay_and_tampering_change_nothing(amqtt_broker, fleet_dir, model, tmp_path):
    """The test publishes on the device's uplink as a broker could, or anyone with the device's broker password
    (the ACL admits only the device there)."""
    import paho.mqtt.client as mqtt

    plan = model[0]
    name = "dup-0"
    up = topics.uplink(FLEET, name)
    link = make_link(amqtt_broker, fleet_dir, plan)
    rec = Recorder()
    agent = make_agent(amqtt_broker, fleet_dir, model, name, 0, tmp_path, transport_wrapper=rec.wrap).start()
    raw = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{unique()}")
    raw.username_pw_set(name, (fleet_dir / f"devices/{name}/password").read_text())
    raw.connect(amqtt_broker.host, amqtt_broker.port)
    raw.loop_start()

    def inject(frames):
        for f in frames:
            raw.publish(up, f, qos=1).wait_for_publish(TIMEOUT)

    try:
        wait_for(lambda: any(d.device == name for d in link.devices()), what="JOIN")
        link.send_task(name, 1, 0, None, {"epochs": 1})
        (reply,) = collect(link, 1)
        delta_frames = [p.payload for p in rec.sent if is_multi_chunk(p)]
        envelope = b"".join(chunking.parse_chunk(f).data for f in delta_frames)

        # the same chunks again (QoS 1 redelivery), and the whole message as a new transfer: dropped quietly
        inject(delta_frames)  # chunks of a finished transfer: counted, the ACK sent again
        wait_for(lambda: link.stats["duplicate_chunks"] == len(delta_frames), what="duplicate chunks")
        again = chunking.split(envelope, 777, 256)
        inject(again[:5] + again[:5] + again[5:])  # repeated chunks within one open transfer
        wait_for(lambda: link.stats["duplicate_messages"] == 1, what=f"duplicate message {link.stats}")
        assert link.stats["duplicate_chunks"] == len(delta_frames) + 5

        # a different DELTA at the used (round, seq), signed with the device's own key: a replay
        endpoint = device_endpoint(fleet_dir, name)
        seq = agent.session.state.seq
        used = Header.unpack(envelope)
        forged = endpoint.seal(encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()), 1, 0.0, 0.0),
                               round=used.round, model_version=used.model_version, seq=used.seq, run=used.run)
        inject(chunking.split(forged, 901, 256))
        wait_for(lambda: link.stats["rejected:replay"] == 1, what="replay rejection")

        # tampered ciphertext: the signature fails; re-signed by the key holder: the AEAD tag fails
        fresh = bytearray(endpoint.seal(encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()),
                                                      1, 0.0, 0.0), round=5, model_version=0, seq=seq + 100,
                                       run=used.run))
        fresh[HEADER_SIZE + 20] ^= 0x01
        inject(chunking.split(bytes(fresh), 902, 256))
        wait_for(lambda: link.stats["rejected:bad-signature"] == 1, what="signature rejection")
        body = bytes(fresh[:-SIGNATURE_SIZE])
        resigned = body + Identity.from_bytes((fleet_dir / f"devices/{name}/identity.key").read_bytes()).sign(body)
        inject(chunking.split(resigned, 903, 256))
        wait_for(lambda: link.stats["rejected:bad-ciphertext"] == 1, what="AEAD rejection")

        # a chunk disagreeing with its transfer, and garbage
        third = chunking.split(envelope, 779, 256)
        inject([third[0], third[0][:40] + bytes([third[0][40] ^ 1]) + third[0][41:], b"X" * 40])
        wait_for(lambda: link.stats["rejected:bad-magic"] == 1, what="garbage rejection")
        assert link.stats["rejected:inconsistent-chunk"] == 1
        assert link.replies(0.3) == []  # nothing above produced a reply
        assert link.stats["replies"] == 1
    finally:
        raw.loop_stop()
        raw.disconnect()
        agent.stop()
        link.close()


def test_acl_refuses_publishing_to_another_devices_topic(mosquitto, fleet_dir, model, tmp_path):
    plan = model[0]
    link = make_link(mosquitto, fleet_dir, plan)
    agent = make_agent(mosquitto, fleet_dir, model, "acl-0", 0, tmp_path).start()
    try:
        wait_for(lambda: any(d.device == "acl-0" for d in link.devices()), what="JOIN")
        transport = agent.transport
        assert transport.v5
        spoof = agent.session._frames(topics.uplink(FLEET, "acl-1"),
                                      agent.session._seal(Leave(0), round=0, model_version=0))
        reason = transport.wait_published(transport.publish(spoof[0]))
        assert reason.is_failure and str(reason) == "Not authorized"
        reason = transport.wait_published(transport.publish(Publish(topics.status(FLEET, "acl-1"), b"x")))
        assert str(reason) == "Not authorized"
        time.sleep(0.3)
        assert "acl-1" not in {d.device for d in link.devices()}
        assert not any(k.startswith("rejected") for k in link.stats), link.stats
    finally:
        agent.stop()
        link.close()


def test_last_will_marks_device_offline(broker, fleet_dir, model, tmp_path):
    plan = model[0]
    name = "will-0" if broker.url.startswith("mqtt:") else "will-1"
    link = make_link(broker, fleet_dir, plan)
    agent = make_agent(broker, fleet_dir, model, name, 0, tmp_path).start()
    try:
        wait_for(lambda: any(d.device == name and d.online for d in link.devices()), what="online")
        agent.kill()
        info = wait_for(lambda: next((d for d in link.devices() if d.device == name and not d.online), None),
                        what="last will")
        assert not info.online
    finally:
        link.close()


# --- properties of the state helpers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_plan():
    x = np.random.default_rng(3).normal(size=(16, 6)).astype(np.float32)
    graph = quantize(zoo.build("mlp", (6,), 3), x)
    return compile_plan(graph, parse("last:2", graph))


def random_state(plan, data, like=None):
    """A random trainable state; with `like`, a random subset of channels is copied from it."""
    out = {}
    for name in plan.trainable_buffers():
        spec = plan.buffers[name]
        dtype = np.int8 if spec.dtype == "int8" else np.int32
        info = np.iinfo(dtype)
        values = data.draw(hnp.arrays(dtype, spec.shape, elements=st.integers(int(info.min), int(info.max))))
        if like is not None:
            keep = data.draw(hnp.arrays(bool, spec.shape[:1]))
            values[keep] = like[name][keep]
        out[name] = values
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_state_delta_and_apply_delta_round_trip(small_plan, data):
    base = random_state(small_plan, data)
    new = random_state(small_plan, data, like=base)
    delta = state_delta(new, base)
    for name, value in delta.items():
        assert value.dtype == (np.int16 if base[name].dtype == np.int8 else np.int32)
    back = apply_delta(base, delta)
    assert all(back[n].dtype == new[n].dtype and np.array_equal(back[n], new[n]) for n in new)
    zero = state_delta(base, base)
    assert all(not v.any() for v in zero.values())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num=st.integers(0, 2**32 - 1), loss=st.floats(0, 100, width=32),
       accuracy=st.floats(0, 1, width=32))
def test_delta_encoding_round_trip(small_plan, data, num, loss, accuracy):
    base = random_state(small_plan, data)
    new = random_state(small_plan, data, like=base)
    delta = state_delta(new, base)
    body = Delta.decode(encode_update(small_plan, delta, num, loss, accuracy).encode())
    decoded, metrics = decode_update(small_plan, body)
    assert body.num_examples == num and metrics == {"loss": loss, "accuracy": accuracy}
    assert all(decoded[n].dtype == delta[n].dtype and np.array_equal(decoded[n], delta[n]) for n in delta)
    # the downlink: the differences of the elements that changed since the device's version, or every value
    for held, known in ((3, base), (None, None)):
        update = GlobalUpdate.decode(global_update(small_plan, new, held, known).encode())
        rebuilt = apply_global_update(small_plan, base, 3, update)
        assert all(rebuilt[n].dtype == new[n].dtype and np.array_equal(rebuilt[n], new[n]) for n in new)


def test_a_global_update_is_never_larger_than_the_full_state(small_plan):
    """A device's buffer is sized for the FULL_STATE GLOBAL_UPDATE (update.max_downlink_bytes): a difference that
    would take more bytes (weights moved by more than 127 LSB are int16 on the wire) goes as FULL_STATE, and a
    small one as the difference. Either way the device ends with the same state."""
    rng = np.random.default_rng(5)
    base = {n: (rng.integers(10, 61, small_plan.buffers[n].shape) * rng.choice([-1, 1], small_plan.buffers[n].shape))
            .astype(small_plan.buffers[n].dtype) for n in small_plan.trainable_buffers()}
    near = {n: (v + rng.integers(-3, 4, v.shape)).astype(v.dtype) for n, v in base.items()}
    far = {n: (-120 * np.sign(v)).astype(v.dtype) if v.dtype == np.int8 else v + 1000
           for n, v in base.items()}  # every weight crosses over: differences of 130..180, int16
    # this plan's largest downlink is its FULL_STATE GLOBAL_UPDATE (larger than a TASK): its body
    limit = max_downlink_bytes(small_plan) - HEADER_SIZE - TAG_SIZE - SIGNATURE_SIZE
    for new, form in ((near, 3), (far, FULL_STATE)):
        update = global_update(small_plan, new, 3, base)
        full = GlobalUpdate(FULL_STATE, state_entries(small_plan, new))
        assert update.base_model_version == form
        assert len(update.encode(compress=False)) <= len(full.encode(compress=False)) <= limit
        rebuilt = apply_global_update(small_plan, base, 3, GlobalUpdate.decode(update.encode()))
        assert all(np.array_equal(rebuilt[n], new[n]) for n in new)
    with pytest.raises(ProtocolError, match="wrong-version"):  # a difference applies only where it was made
        apply_global_update(small_plan, base, 2, global_update(small_plan, near, 3, base))
    # the bound is reached: a FULL_STATE whose weights do not fit int4
    assert len(GlobalUpdate(FULL_STATE, state_entries(small_plan, far)).encode(compress=False)) == limit


@settings(max_examples=40, deadline=None)
@given(data=st.data(), keep=st.sampled_from([0.1, 0.5, 1.0]))
def test_split_uplink_sends_the_largest_changes_and_loses_none(small_plan, data, keep):
    """Error feedback over three rounds: each round sends the largest `keep` of each buffer's changes (with what
    was kept back before), and everything sent plus what is still kept back is exactly every change made."""
    def random_delta():
        out = {}
        for name in small_plan.trainable_buffers():
            spec = small_plan.buffers[name]
            dtype, bound = (np.int16, 255) if spec.dtype == "int8" else (np.int32, 10**6)
            values = data.draw(hnp.arrays(dtype, spec.shape, elements=st.integers(-bound, bound)))
            values[data.draw(hnp.arrays(bool, spec.shape))] = 0
            out[name] = values
        return out

    carry, made, sent_total = None, {}, {}
    for _ in range(3):
        delta = random_delta()
        before = {n: delta[n].astype(np.int64) + (0 if carry is None else carry[n]) for n in delta}
        sent, carry = split_uplink(delta, carry, keep)
        for name in delta:
            assert sent[name].dtype == carry[name].dtype == delta[name].dtype
            assert np.array_equal(sent[name].astype(np.int64) + carry[name], before[name])
            nonzero = np.count_nonzero(before[name])
            assert np.count_nonzero(sent[name]) == int(np.ceil(keep * nonzero))
            if np.count_nonzero(carry[name]):
                assert np.abs(sent[name][sent[name] != 0]).min() >= np.abs(carry[name]).max()
            made[name] = made.get(name, 0) + delta[name].astype(np.int64)
            sent_total[name] = sent_total.get(name, 0) + sent[name].astype(np.int64)
    assert all(np.array_equal(sent_total[n] + carry[n], made[n]) for n in made)


def test_clip_delta_bounds_the_real_norm_and_keeps_small_updates(small_plan):
    scales = row_scales(small_plan)
    rng = np.random.default_rng(0)
    delta = {n: rng.integers(-200, 200, small_plan.buffers[n].shape).astype(
        np.int16 if small_plan.buffers[n].dtype == "int8" else np.int32) for n in small_plan.trainable_buffers()}

    def norm(d):
        return np.sqrt(sum(np.sum((d[n].reshape(len(scales[n]), -1) * scales[n][:, None]) ** 2) for n in d))

    full = norm(delta)
    clipped = clip_delta(delta, scales, full / 4)
    assert norm(clipped) <= full / 4 and norm(clipped) > 0.9 * full / 4
    assert all(clipped[n].dtype == delta[n].dtype for n in delta)
    assert clip_delta(delta, scales, 2 * full) is delta and clip_delta(delta, scales, 0.0) is delta


def test_device_clips_what_it_sends(small_plan):
    from fedtiny.protocol.update import uplink

    base = small_plan.initial_state()
    trained = {n: np.clip(v.astype(np.int64) + 40, np.iinfo(v.dtype).min, np.iinfo(v.dtype).max).astype(v.dtype)
               for n, v in base.items()}
    scales = row_scales(small_plan)
    change = state_delta(trained, base)
    full = np.sqrt(sum(np.sum((change[n].reshape(len(scales[n]), -1) * scales[n][:, None]) ** 2) for n in change))
    body, carry = uplink(small_plan, base, trained, None, keep=1.0, clip_norm=full / 3, num_examples=8, loss=0.5,
                         accuracy=0.5)
    sent, _ = decode_update(small_plan, Delta.decode(body.encode()))
    norm = np.sqrt(sum(np.sum((sent[n].reshape(len(scales[n]), -1) * scales[n][:, None]) ** 2) for n in sent))
    assert full / 3 * 0.9 < norm <= full / 3
    assert not any(v.any() for v in carry.values())  # what clipping cuts is dropped, not carried


def test_task_carries_uplink_keep_and_refuses_nonsense(small_plan):
    phash = bytes(32)
    assert task_settings(task_body(small_plan, phash, {}, 256))["uplink_keep"] == 1.0
    assert task_settings(task_body(small_plan, phash, {"uplink_keep": 0.25}, 256))["uplink_keep"] == 0.25
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="uplink_keep"):
            task_body(small_plan, phash, {"uplink_keep": bad}, 256)
    # the learning rate and batch size are compiled into the plan: a TASK cannot ask for others
    assert task_body(small_plan, phash, {"lr": small_plan.lr, "batch_size": 1}, 256).learning_rate == small_plan.lr
    for key, value in (("lr", 2 * small_plan.lr), ("batch_size", 8)):
        with pytest.raises(ValueError, match=f"plan's {key}"):
            task_body(small_plan, phash, {key: value}, 256)
    task = task_body(small_plan, phash, {}, 256)
    forged = replace(task, config=struct.pack("<HH", 1, 100))
    with pytest.raises(ProtocolError, match="uplink_keep_pct"):
        task_settings(forged)


def test_encoder_takes_only_plan_buffers(small_plan):
    x = np.zeros((1, 1, 6), np.int8)
    delta = state_delta(small_plan.initial_state(), small_plan.initial_state())
    with pytest.raises(TypeError):
        encode_update(small_plan, {**delta, "sample": x}, 1, 0.0, 0.0)
    with pytest.raises(TypeError):
        first = small_plan.trainable_buffers()[0]
        encode_update(small_plan, {**delta, first: np.zeros(delta[first].shape, np.int8)}, 1, 0.0, 0.0)


def test_durable_state_survives_a_coordinator_restart(fleet_dir, model):
    """An uplink accepted before a restart is refused after it, once the link's durable state is restored; a
    link that lost it starts a new run, in which the old message counts for nothing either."""
    from fedtiny.protocol.envelope import DeviceEndpoint, Identity, PublicIdentity
    from fedtiny.transport.mqtt import CoordinatorLink, load_fleet
    from fedtiny.protocol.update import encode_update, state_delta

    plan = model[0]
    manifest = load_fleet(fleet_dir)
    name = DEVICES[0]
    folder = fleet_dir / "devices" / name
    device = DeviceEndpoint(manifest["fleet_id"], manifest["devices"][name]["id"],
                            Identity.from_bytes((folder / "identity.key").read_bytes()),
                            PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))
    body = encode_update(plan, state_delta(plan.initial_state(), plan.initial_state()), 1, 0.0, 0.0)
    frame = chunking.split(device.seal(body, round=3, model_version=0, run=1), 1, 4096)[0]
    topic = topics.uplink(FLEET, name)

    first = CoordinatorLink("mqtt://127.0.0.1:1", fleet_dir, plan, fleet=FLEET)  # never started: no broker needed
    first.restore({"run": 1})
    first._transport.publish = lambda p: None
    first.send_task(name, 3, 0, None, {})  # the TASK of run 1 the device answers
    first._on_message(topic, frame)
    assert not any(k.startswith("rejected") for k in first.stats), first.stats
    saved = json.loads(json.dumps(first.durable_state()))  # as the coordinator checkpoints it

    restored = CoordinatorLink("mqtt://127.0.0.1:1", fleet_dir, plan, fleet=FLEET)
    restored.restore(saved)
    sent = []
    restored._transport.publish = sent.append
    restored._on_message(topic, frame)
    assert restored.stats["rejected:stale"] == 1 and restored.stats["replies"] == 0, restored.stats
    # ...but the device, whose ACK the restart lost, is ACKed again: else it would hold its upload forever
    reassembler = chunking.Reassembler()
    (ack,) = [device.open(p).body for f in sent if (p := reassembler.accept(f.payload, 0.0, "c").payload)]
    assert (ack.acked_type, ack.status, ack.acked_seq) == (MessageType.DELTA, AckStatus.OK, 0)

    forgetful = CoordinatorLink("mqtt://127.0.0.1:1", fleet_dir, plan, fleet=FLEET)
    forgetful._transport.publish = lambda p: None
    forgetful._on_message(topic, frame)
    assert forgetful.stats["rejected:old-run"] == 1 and forgetful.stats["replies"] == 0, forgetful.stats
    assert forgetful.session.run == 2
