"""The protocol through real brokers: mosquitto (TLS, client certificates, ACL, passwords) and embedded amqtt."""

import os
import queue
import socket
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from conftest import require_tool

from fedtiny.protocol import chunking, topics
from fedtiny.protocol.brokers import EmbeddedBroker, MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.delta import DeltaEntry
from fedtiny.protocol.envelope import (
    HEADER_SIZE, CoordinatorEndpoint, DeviceEndpoint, Identity, PublicIdentity, ProtocolError,
)
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.messages import Ack, AckStatus, Delta, Join, Leave, MessageType

FLEET = "lab"
DEVICES = ["dev-001", "dev-002"]
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "keys"
    provision_fleet(out, FLEET, DEVICES)
    return out


@pytest.fixture(scope="module")
def mosquitto(fleet_dir, tmp_path_factory):
    require_tool("mosquitto")
    port, password_port = free_port(), free_port()
    config = tmp_path_factory.mktemp("mosquitto") / "mosquitto.conf"
    # Our key files are 0600 root; keep mosquitto root instead of dropping to user `mosquitto` (tests only).
    config.write_text(mosquitto_config(fleet_dir, port, password_port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port) as broker:
        broker.password_port = password_port
        yield broker


@pytest.fixture(scope="module")
def amqtt_broker(fleet_dir):
    with EmbeddedBroker(fleet_dir) as broker:
        yield broker


class Client:
    """A paho client whose received messages land in a queue; TLS and MQTT 5 when the broker is mosquitto,
    the identity's broker password on amqtt."""

    def __init__(self, broker, name, fleet_dir, tls, clean=True, will=None, password=None, port=None,
                 client_id=None):
        self.v5 = tls  # mosquitto speaks MQTT 5; amqtt only 3.1.1
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        kwargs = {} if self.v5 else {"clean_session": clean}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or name, protocol=protocol,
                                  **kwargs)
        self.inbox = queue.Queue()
        self.acks = {}
        self.connected = queue.Queue()
        self.disconnected = queue.Queue()
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.__setitem__(mid, rc)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connected.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.put(rc)
        folder = fleet_dir / ("coordinator" if name == "coordinator" else f"devices/{name}")
        if tls:
            if password is None:
                self.client.tls_set(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"))
            else:
                self.client.tls_set(str(folder / "ca.crt"))
                self.client.username_pw_set(name, password)
        else:
            self.client.username_pw_set(name, (folder / "password").read_text())
        if will:
            self.client.will_set(*will)
        connect_kwargs = {}
        if self.v5:
            props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600  # persistent session for sleeping devices
            connect_kwargs = {"clean_start": clean, "properties": props}
        self.client.connect(broker.host, port or broker.port, keepalive=30, **connect_kwargs)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.rc = self.connected.get(timeout=TIMEOUT)

    def subscribe(self, topic):
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.1)

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.acks.get(info.mid)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def fleet_endpoints(fleet_dir):
    import json

    manifest = json.loads((fleet_dir / "fleet.json").read_text())
    coordinator_id = Identity.from_bytes((fleet_dir / "coordinator/identity.key").read_bytes())
    devices = {v["id"]: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for v in manifest["devices"].values()}
    coordinator = CoordinatorEndpoint(manifest["fleet_id"], coordinator_id, devices)
    device = DeviceEndpoint(
        manifest["fleet_id"], manifest["devices"]["dev-001"]["id"],
        Identity.from_bytes((fleet_dir / "devices/dev-001/identity.key").read_bytes()), coordinator_id.public,
    )
    return coordinator, device


class CoordinatorSide:
    """What the coordinator agent does with uplink frames: reassemble, open, collect results."""

    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.reassembler = chunking.Reassembler(ttl=60)
        self.duplicate_chunks = 0

    def feed(self, topic, frame):
        _, _, device = topics.parse(topic)
        result = self.reassembler.accept(frame, time.monotonic(), device)
        self.duplicate_chunks += result.duplicate
        if result.payload is None:
            return None
        received = self.endpoint.open(result.payload)
        if received is not None:
            topics.check_topic_matches(topic, received.header.fleet_id, received.header.device_id)
        return ("message", received)


def pump(client, side, until, timeout=TIMEOUT):
    """Feed received frames to the coordinator side until `until(outcome)` is true; returns that outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            topic, frame = client.inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        try:
            outcome = side.feed(topic, frame)
        except ProtocolError as exc:
            outcome = ("error", exc.reason)
        if outcome is not None and until(outcome):
            return outcome
    raise AssertionError("timed out waiting for the coordinator")


def big_delta():
    rng = np.random.default_rng(5)
    return Delta(64, 0.5, [DeltaEntry(2, 0, rng.integers(-128, 128, (48, 64), dtype=np.int8), rng.random(48))])


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request):
    return request.getfixturevalue("mosquitto" if request.param == "mosquitto" else "amqtt_broker"), request.param


def test_join_chunked_upload_resume_duplicates_replay_tamper(broker, fleet_dir):
    broker, kind = broker
    tls = kind == "mosquitto"
    coordinator_ep, device_ep = fleet_endpoints(fleet_dir)
    side = CoordinatorSide(coordinator_ep)
    up, down = topics.uplink(FLEET, "dev-001"), topics.downlink(FLEET, "dev-001")
    coord = Client(broker, "coordinator", fleet_dir, tls)
    coord.subscribe(f"fedtiny/{FLEET}/up/+")
    device = Client(broker, "dev-001", fleet_dir, tls, clean=False)
    device.subscribe(down)
    try:
        join = device_ep.seal(Join(96 * 1024, 1 << 20, 256, 1, 1, bytes(32)), round=1, model_version=0)
        for frame in chunking.split(join, 1, 256):
            assert device.publish(up, frame) == 0
        kind_, received = pump(coord, side, lambda o: True)
        assert kind_ == "message" and received.header.type == MessageType.JOIN

        upload = device_ep.seal(big_delta(), round=1, model_version=0)
        frames = chunking.split(upload, 2, 256)
        assert len(frames) > 10 and all(len(f) <= 256 for f in frames)
        for frame in frames[:6] + frames[:2]:  # part of the upload, with duplicate chunks
            device.publish(up, frame)
        device.close()  # connection lost mid-upload
        deadline = time.monotonic() + TIMEOUT
        while side.reassembler.missing("dev-001", 2) != list(range(6, len(frames))):
            try:
                side.feed(*coord.inbox.get(timeout=0.1))
            except queue.Empty:
                assert time.monotonic() < deadline

        device = Client(broker, "dev-001", fleet_dir, tls, clean=False)  # persistent session resumes
        if not tls:
            device.subscribe(down)
        missing = side.reassembler.missing("dev-001", 2)
        ack = coordinator_ep.seal(
            Ack(MessageType.DELTA, AckStatus.MISSING_CHUNKS, 0, transfer_id=2, missing=tuple(missing)),
            device_id=device_ep.device_id, round=1, model_version=0,
        )
        coord.publish(down, chunking.split(ack, 1, 256)[0])
        topic, frame = device.inbox.get(timeout=TIMEOUT)
        request = device_ep.open(chunking.parse_chunk(frame).data).body
        assert request.status == AckStatus.MISSING_CHUNKS and list(request.missing) == missing
        for index in request.missing:
            device.publish(up, frames[index])
        kind_, received = pump(coord, side, lambda o: True)
        assert kind_ == "message" and received.body == big_delta()
        assert side.duplicate_chunks == 2

        # QoS 1 style redelivery of the whole message (new transfer): recognised, dropped quietly
        for frame in chunking.split(upload, 3, 256):
            device.publish(up, frame)
        assert pump(coord, side, lambda o: True) == ("message", None)

        # later traffic, then the old delta replayed: rejected as stale
        for _ in range(20):
            device.publish(up, chunking.split(device_ep.seal(Leave(0), round=2, model_version=1), 9, 256)[0])
        for frame in chunking.split(upload, 4, 256):
            device.publish(up, frame)
        assert pump(coord, side, lambda o: o[0] == "error") == ("error", "stale")

        # tampered ciphertext: rejected
        fresh = bytearray(device_ep.seal(big_delta(), round=3, model_version=1))
        fresh[HEADER_SIZE + 40] ^= 0x01
        for frame in chunking.split(bytes(fresh), 5, 256):
            device.publish(up, frame)
        assert pump(coord, side, lambda o: True) == ("error", "bad-signature")
    finally:
        device.close()
        coord.close()


def test_acl_refuses_publishing_to_another_devices_topic(mosquitto, fleet_dir):
    coord = Client(mosquitto, "coordinator", fleet_dir, tls=True)
    coord.subscribe(f"fedtiny/{FLEET}/up/+")
    device = Client(mosquitto, "dev-001", fleet_dir, tls=True)
    try:
        reason = device.publish(topics.uplink(FLEET, "dev-002"), b"spoofed")
        assert reason.is_failure and str(reason) == "Not authorized"
        assert not device.publish(topics.uplink(FLEET, "dev-001"), b"own topic").is_failure
        assert coord.inbox.get(timeout=TIMEOUT) == (topics.uplink(FLEET, "dev-001"), b"own topic")
        assert coord.inbox.empty()
        # mosquitto 2.0 grants a subscription to another device's downlink but delivers nothing on it
        device.subscribe(topics.downlink(FLEET, "dev-002"))
        assert not coord.publish(topics.downlink(FLEET, "dev-002"), b"for dev-002 only").is_failure
        time.sleep(0.3)
        assert device.inbox.empty()
    finally:
        device.close()
        coord.close()


def test_a_device_cannot_take_over_the_coordinators_client_id(mosquitto, fleet_dir):
    """The broker forces the client id to the certificate CN: dev-001 connecting with client id "coordinator"
    neither disconnects the coordinator nor, with a clean start, wipes the uplinks queued in its session."""
    up = topics.uplink(FLEET, "dev-002")
    coord = Client(mosquitto, "coordinator", fleet_dir, tls=True, clean=False)
    coord.subscribe(f"fedtiny/{FLEET}/up/+")
    device = Client(mosquitto, "dev-002", fleet_dir, tls=True)
    try:
        attacker = Client(mosquitto, "dev-001", fleet_dir, tls=True, client_id="coordinator")
        assert not attacker.rc.is_failure
        assert not device.publish(up, b"live").is_failure
        assert wait_for_message(coord, (up, b"live"))
        assert coord.disconnected.empty(), "the coordinator was disconnected by a device reusing its client id"
        attacker.close()

        coord.close()  # away: the broker queues uplinks in its persistent session
        assert not device.publish(up, b"queued").is_failure
        attacker = Client(mosquitto, "dev-001", fleet_dir, tls=True, client_id="coordinator", clean=True)
        attacker.close()
        coord = Client(mosquitto, "coordinator", fleet_dir, tls=True, clean=False)
        assert wait_for_message(coord, (up, b"queued")), "the coordinator's queued uplink was wiped"
    finally:
        device.close()
        coord.close()


def wait_for_message(client, expected, timeout=3.0):
    """True once `expected` (topic, payload) arrives; other messages (left queued by earlier tests) are skipped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.inbox.get(timeout=0.1) == expected:
                return True
        except queue.Empty:
            pass
    return False


def test_mosquitto_accepts_our_password_file(mosquitto, fleet_dir):
    password = (fleet_dir / "devices/dev-002/password").read_text()
    good = Client(mosquitto, "dev-002", fleet_dir, tls=True, password=password, port=mosquitto.password_port)
    assert not good.rc.is_failure
    good.close()
    bad = Client(mosquitto, "dev-002", fleet_dir, tls=True, password="wrong", port=mosquitto.password_port)
    assert bad.rc.is_failure
    bad.client.loop_stop()


def test_embedded_broker_stops_even_when_amqtt_cancels_its_own_shutdown(fleet_dir):
    """amqtt 0.11 at times cancels the task running its shutdown; stop() must still end the broker's thread
    and close its listener instead of raising CancelledError (seen once, tearing down a fixture in CI)."""
    import asyncio

    broker = EmbeddedBroker(fleet_dir).start()
    port, thread = broker.port, broker._thread

    async def cancelled_shutdown():
        raise asyncio.CancelledError

    broker._broker.shutdown = cancelled_shutdown
    broker.stop()
    assert not thread.is_alive()
    with pytest.raises(ConnectionRefusedError):  # the listener is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
