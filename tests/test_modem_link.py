"""The node's UART link to its modem (docs/node.md):

    codec     the firmware's C (device_runtime/c/fedtiny_modem.c, host build through ctypes) and the Python of
              fedtiny_device.modem encode every command to the same bytes and read every event the same way
    decoder   on streams of frames cut anywhere, with garbage, flipped bits, truncated and forged frames between
              them, both decoders find the same frames and count the same discarded bytes: every intact frame
    bridge    a Python stand-in for the firmware drives fedtiny_device.bridge against a real mosquitto: results,
              errors, one RECEIVE at a time, redelivery of what was not TAKEN, the last will on a power cut, a
              lost broker and a refused login
    qemu      the link test firmware (c/firmware_link_test.c) under qemu-system-arm, through the bridge, to
              mosquitto: a chunk up, echoes of what the coordinator sends down, a message too large dropped
              with a note, and the same after QEMU is killed and restarted and after mosquitto restarts

Tests needing gcc, mosquitto, arm-none-eabi-gcc or qemu-system-arm skip without them, unless CI=true.
"""

import os
import queue
import random
import re
import signal
import socket
import struct
import time

import pytest
from conftest import require_tool

from fedtiny.protocol import topics
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.keys import provision_fleet
from fedtiny.transport.mqtt import MqttTransport
from fedtiny_device import cmodem, modem
from fedtiny_device.bridge import ModemBridge
from fedtiny_device.cenvelope import crypto_footprint
from fedtiny_device.modem import DisconnectReason, ErrorCode, FrameDecoder, Type
from fedtiny_device.qemu_node import QemuNode

FLEET = "plant"
DEVICE = "n0"
UP, DOWN, STATUS = topics.uplink(FLEET, DEVICE), topics.downlink(FLEET, DEVICE), topics.status(FLEET, DEVICE)
CHUNK = 1024  # firmware_link_test.c's chunk size, and the bridge's default MTU


@pytest.fixture(scope="module")
def cmod(cache):
    require_tool("gcc")
    require_tool("make")
    return cmodem.CModem(cache)


def text(rng: random.Random, lo: int = 0, hi: int = 60) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789/_-+#.") for _ in range(rng.randint(lo, hi)))


def blob(rng: random.Random, hi: int = 300) -> bytes:
    return rng.randbytes(rng.randint(0, hi))


# --- codec -----------------------------------------------------------------------------------------------------

def test_crc32_is_zlibs(cmod):
    rng = random.Random(1)
    for data in [b"", b"a", b"123456789"] + [rng.randbytes(rng.randint(0, 3000)) for _ in range(50)]:
        assert cmod.crc32(data) == modem.crc32(data)
    assert cmod.crc32(b"123456789") == 0xCBF43926  # the CRC-32/ISO-HDLC check value


def test_commands_encode_to_the_same_bytes_in_c_and_python(cmod):
    rng = random.Random(2)
    for _ in range(300):
        ref = rng.randrange(256)
        kind = rng.choice(["hello", "connect", "subscribe", "publish", "in_place", "disconnect", "taken"])
        if kind == "hello":
            message = modem.Hello(ref, rng.randrange(65536))
            c = cmod.hello(ref, message.max_body)
        elif kind == "connect":
            will = rng.random() < 0.7
            message = modem.Connect(ref, text(rng, 0, 255), rng.randrange(65536), rng.random() < 0.5,
                                    text(rng, 0, 255) if will else None, blob(rng) if will else b"",
                                    will and rng.random() < 0.5)
            c = cmod.connect(ref, message.client_id.encode(), message.keepalive, message.clean_session,
                             message.will_topic.encode() if will else None, message.will_payload, message.will_retain)
        elif kind == "subscribe":
            message = modem.Subscribe(ref, text(rng, 0, 255))
            c = cmod.subscribe(ref, message.topic_filter.encode())
        elif kind in ("publish", "in_place"):
            message = modem.Publish(ref, text(rng, 0, 255), blob(rng, 2000), kind == "publish" and rng.random() < 0.5)
            c = (cmod.publish(ref, message.topic.encode(), message.retain, message.payload) if kind == "publish"
                 else cmod.publish_in_place(ref, message.topic.encode(), message.payload))
        elif kind == "disconnect":
            message, c = modem.Disconnect(ref), cmod.disconnect(ref)
        else:
            message, c = modem.Taken(ref), cmod.taken(ref)
        assert c == message.encode(), kind
        (f,) = FrameDecoder().feed(c)
        assert modem.decode(f, modem.COMMANDS) == message


def test_encoders_refuse_what_does_not_fit(cmod):
    long_topic = b"t" * 256
    with pytest.raises(ValueError, match="-200"):
        cmod.publish(1, long_topic, False, b"x")
    with pytest.raises(ValueError):
        modem.Publish(1, long_topic.decode(), b"x").encode()
    with pytest.raises(ValueError, match="-200"):
        cmod.connect(1, b"id", 30, False, long_topic)
    with pytest.raises(ValueError, match="-200"):  # a body over 65535 bytes
        cmod.publish(1, b"t", False, b"x" * 65532)
    with pytest.raises(ValueError):
        modem.Publish(1, "t", b"x" * 65532).encode()
    frame = cmod.publish(1, b"t", False, b"x" * 100)
    with pytest.raises(ValueError, match="-201"):  # one byte short of the frame
        cmod.publish(1, b"t", False, b"x" * 100, cap=len(frame) - 1)
    assert cmod.publish(1, b"t", False, b"x" * 100, cap=len(frame)) == frame


def random_event(rng: random.Random) -> modem.Message:
    ref = rng.randrange(256)
    return rng.choice([
        lambda: modem.Info(ref, rng.randrange(65536), rng.randrange(256)),
        lambda: modem.Ok(ref),
        lambda: modem.PubAck(ref),
        lambda: modem.Error(ref, rng.randrange(256)),
        lambda: modem.Connected(ref, rng.random() < 0.5),
        lambda: modem.Disconnected(ref, rng.randrange(256)),
        lambda: modem.Receive(ref, text(rng, 0, 255), blob(rng, 1500)),
        lambda: modem.Dropped(ref, text(rng, 0, 300), rng.randrange(2**32)),
    ])()


def c_reads_as(ev: cmodem.CEvent, message: modem.Message) -> None:
    """The C event carries what the Python message says."""
    assert (ev.type, ev.ref, ev.malformed) == (message.TYPE, message.ref, False)
    if isinstance(message, modem.Info):
        assert (ev.code, ev.max_payload) == (message.version, message.max_payload)
    elif isinstance(message, (modem.Error, modem.Disconnected)):
        assert ev.code == (message.code if isinstance(message, modem.Error) else message.reason)
    elif isinstance(message, modem.Connected):
        assert ev.code == int(message.session_present)
    elif isinstance(message, modem.Receive):
        assert (ev.topic, ev.payload) == (message.topic.encode(), message.payload)
    elif isinstance(message, modem.Dropped):
        assert (ev.topic, ev.length) == (message.topic.encode(), message.length)


def test_c_reads_every_event_python_writes(cmod):
    rng = random.Random(3)
    events = [random_event(rng) for _ in range(400)]
    rx = cmod.receiver(modem.MAX_BODY)
    got = rx.feed(b"".join(e.encode() for e in events))
    assert len(got) == len(events)
    for ev, message in zip(got, events):
        c_reads_as(ev, message)
    assert (rx.discarded, rx.abandoned) == (0, 0)


@pytest.mark.parametrize("type_, fields", [
    (Type.INFO, b"\x01\x00"), (Type.INFO, b"\x01\x00\x04\x00"), (Type.OK, b"\x00"), (Type.PUBACK, b"x"),
    (Type.ERROR, b""), (Type.ERROR, b"\x01\x02"), (Type.CONNECTED, b"\x02"), (Type.CONNECTED, b""),
    (Type.DISCONNECTED, b""), (Type.RECEIVE, b""), (Type.RECEIVE, b"\x05abcd"), (Type.DROPPED, b"\x01\x02\x03"),
    (Type.HELLO, b"\x01\x00\x04"), (0x00, b""), (0x7F, b"abc"), (0xFF, b""),
], ids=lambda v: f"{v:#04x}" if isinstance(v, int) else v.hex() or "empty")
def test_a_good_frame_with_bad_fields_is_malformed_on_both_sides(cmod, type_, fields):
    raw = modem.frame(type_, 7, fields)
    (ev,) = cmod.receiver(modem.MAX_BODY).feed(raw)
    assert (ev.type, ev.ref, ev.malformed, ev.fields) == (type_, 7, True, fields)
    (f,) = FrameDecoder().feed(raw)
    with pytest.raises(modem.Malformed):
        modem.decode(f, modem.EVENTS)


# --- decoder ---------------------------------------------------------------------------------------------------

def damaged_stream(rng: random.Random, max_body: int) -> tuple[bytes, list[bytes]]:
    """Frames with damage between and inside them, and the frames left intact, in order."""
    stream, intact = bytearray(), []
    for _ in range(rng.randint(1, 40)):
        body_len = rng.randint(0, min(max_body - 2, 600))
        raw = modem.frame(rng.randrange(256), rng.randrange(256), rng.randbytes(body_len))
        damage = rng.choice(["none"] * 5 + ["garbage", "flip", "truncate", "forged", "oversize", "syncs"])
        if damage == "garbage":  # random bytes (some SYNCs among them) before the frame
            stream += bytes(rng.choice([modem.SYNC, rng.randrange(256)]) for _ in range(rng.randint(1, 50)))
        elif damage == "syncs":
            stream += bytes([modem.SYNC] * rng.randint(1, 6))
        elif damage == "forged":  # a header that passes NLEN, then too few bytes for its CRC to hold
            n = rng.randint(2, max_body)
            stream += bytes([modem.SYNC]) + struct.pack("<HH", n, n ^ 0xFFFF) + rng.randbytes(rng.randint(0, 30))
        elif damage == "oversize":  # a consistent header over the receiver's max_body
            n = min(0xFFFF, max_body + rng.randint(1, 1000))
            stream += bytes([modem.SYNC]) + struct.pack("<HH", n, n ^ 0xFFFF)
        if damage == "flip":
            i = rng.randrange(len(raw))
            raw = raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
        elif damage == "truncate":
            raw = raw[:rng.randrange(len(raw))]
        else:
            intact.append(raw)
        stream += raw
    return bytes(stream), intact


def cuts(rng: random.Random, data: bytes) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        n = rng.choice([1, 2, 3, 7, 64, 500, len(data)])
        pieces.append(data[at:at + n])
        at += n
    return pieces


def test_both_decoders_find_every_intact_frame_in_a_damaged_stream(cmod):
    for seed in range(150):
        rng = random.Random(seed)
        max_body = rng.choice([64, 300, 1200, 5000, modem.MAX_BODY])
        stream, intact = damaged_stream(rng, max_body)
        py, c = FrameDecoder(max_body, idle_ms=50), cmod.receiver(max_body, idle_ms=50)
        py_frames, c_frames = [], []
        for piece in cuts(rng, stream):
            py_frames += py.feed(piece)
            c_frames += c.feed(piece)
        now = 0
        while py._buf[py._ready:] or c.rx.len > c.rx.ready:  # then silence: a forged length waits for no more bytes
            now += 50
            py_frames += py.feed(b"", now)
            c_frames += c.feed(b"", now)
        as_bytes = [modem.frame(f.type, f.ref, f.fields) for f in py_frames]
        # a forged header only holds back the frames after it: they are found once it fails its CRC or times out
        assert as_bytes == intact, f"seed {seed}"  # and nothing else: damage never passes NLEN and the CRC
        assert [(e.type, e.ref, e.fields) for e in c_frames] == [tuple(f) for f in py_frames], f"seed {seed}"
        assert (c.discarded, c.abandoned) == (py.discarded, py.abandoned), f"seed {seed}"
        delivered = sum(len(raw) for raw in as_bytes)
        assert py.discarded + delivered == len(stream)


def test_a_partial_frame_is_abandoned_after_silence_the_same_way(cmod):
    good = modem.Receive(9, "t", b"payload").encode()
    partial = modem.Receive(3, "t", b"lost in the middle").encode()[:10]
    py, c = FrameDecoder(idle_ms=100), cmod.receiver(modem.MAX_BODY, idle_ms=100)

    def both(data, now):
        a, b = py.feed(data, now), c.feed(data, now)
        assert [(e.type, e.ref, e.fields) for e in b] == [tuple(f) for f in a]
        assert (c.discarded, c.abandoned) == (py.discarded, py.abandoned)
        return a

    assert both(partial, 0) == []
    assert both(b"", 5000) == []  # the first silent poll starts the clock: time away from the UART is not silence
    assert both(b"", 5099) == []
    assert both(b"", 5100) == []  # 100 ms of silence: the partial frame is dropped
    assert py.abandoned == 1
    assert both(good, 5101) == [modem.Frame(Type.RECEIVE, 9, b"\x01tpayload")]

    # Without the silence, the good frame is swallowed by the partial one's length and found when it fails
    py, c = FrameDecoder(idle_ms=100), cmod.receiver(modem.MAX_BODY, idle_ms=100)
    assert both(partial, 0) == []
    assert both(good * 3, 10_000) == [modem.Frame(Type.RECEIVE, 9, b"\x01tpayload")] * 3
    assert py.abandoned == 1

    # Bytes restart the clock
    py, c = FrameDecoder(idle_ms=100), cmod.receiver(modem.MAX_BODY, idle_ms=100)
    assert both(good[:5], 0) == [] and both(b"", 0) == [] and both(good[5:8], 90) == []
    assert both(b"", 150) == [] and both(b"", 249) == []
    assert both(good[8:], 249) == [modem.Frame(Type.RECEIVE, 9, b"\x01tpayload")]
    assert py.abandoned == 0


def test_the_largest_frame_a_buffer_takes(cmod):
    topic = "fedtiny/plant/down/n0"
    body = modem.receive_body_bytes(len(topic), CHUNK)
    fits = modem.Receive(1, topic, bytes(CHUNK)).encode()
    too_big = modem.Receive(2, topic, bytes(CHUNK + 1)).encode()
    for decoder in (FrameDecoder(body), cmod.receiver(body)):
        assert len(decoder.feed(too_big + fits)) == 1
        assert decoder.abandoned == 1


# --- the firmware's link state machine (fedtiny_modem_link), against a scripted modem -----------------------------

def commands(link: cmodem.CLink) -> list[modem.Message]:
    """What the link wrote to its UART since the last call, as commands."""
    return [modem.decode(f, modem.COMMANDS) for f in FrameDecoder().feed(link.take_written())]


def up_link(cmod, **settings) -> cmodem.CLink:
    """A link taken through HELLO, INFO, CONNECT and CONNECTED."""
    link = cmod.link(**settings)
    link.poll(b"", 0)
    (hello,) = commands(link)
    link.poll(modem.Info(hello.ref, 1024).encode(), 10)
    (connect,) = commands(link)
    link.poll(modem.Ok(connect.ref).encode() + modem.Connected(0, False).encode(), 20)
    commands(link)
    assert link.state == "up"
    return link


def test_link_says_hello_until_the_modem_answers_then_connects_with_a_fresh_will(cmod):
    link = cmod.link(hello_ms=1000, min_payload=1024)
    link.poll(b"", 0)
    (hello,) = commands(link)
    assert hello == modem.Hello(1, 2000 - 9)  # the receive buffer's body
    link.poll(b"", 999)
    assert commands(link) == []
    link.poll(b"", 1000)
    (again,) = commands(link)
    assert isinstance(again, modem.Hello) and again.ref == 2
    link.poll(modem.Info(hello.ref, 4096).encode(), 1001)  # the answer to the first HELLO: too late, ignored
    assert commands(link) == [] and link.state == "hello"
    link.poll(modem.Info(again.ref, 1024).encode(), 1002)
    (connect,) = commands(link)
    assert connect == modem.Connect(3, "n0", 30, False, "fedtiny/f/status/n0", b"offline", True)
    assert link.wills == [1002] and link.state == "connecting"

    link.poll(modem.Ok(connect.ref).encode() + modem.Connected(0, True).encode(), 1100)
    assert commands(link) == [modem.Subscribe(4, "fedtiny/f/down/n0")]
    assert link.ups == [1100] and link.state == "up"  # at once: the session's on_connect does not wait for SUBACK

    link.will_payload = b"offline again"
    link.poll(modem.Disconnected(0, DisconnectReason.LOST).encode(), 2000)
    assert commands(link) == [] and link.state == "retry"
    assert link.publish(b"t", b"x") == -1 and commands(link) == []  # nothing goes out while the link is down
    link.poll(b"", 2499)
    assert commands(link) == []
    link.poll(b"", 2500)
    (connect,) = commands(link)
    assert connect.will_payload == b"offline again" and link.wills == [1002, 2500]
    assert (link.link.connects, link.link.disconnects) == (2, 1)


def test_link_stops_when_the_modem_cannot_carry_a_chunk(cmod):
    link = cmod.link(min_payload=2048)
    link.poll(b"", 0)
    (hello,) = commands(link)
    link.poll(modem.Info(hello.ref, 1024).encode(), 5)
    assert link.state == "failed" and link.link.max_payload == 1024
    link.poll(b"", 100_000)
    assert commands(link) == []


def test_link_hands_over_messages_then_takes_them(cmod):
    link = up_link(cmod)
    link.publish_in_message = b"reply"
    link.poll(modem.Receive(7, "fedtiny/f/down/n0", b"task").encode() + modem.Receive(8, "x", b"").encode(), 50)
    assert link.messages == [(b"fedtiny/f/down/n0", b"task"), (b"x", b"")]
    sent = commands(link)
    assert [type(c) for c in sent] == [modem.Publish, modem.Taken, modem.Publish, modem.Taken]
    assert (sent[0].topic, sent[0].payload, sent[1].ref, sent[3].ref) == ("echo", b"reply", 7, 8)
    assert link.publish(b"up", bytes(300), retain=True) == 0
    (publish,) = commands(link)
    assert (publish.topic, publish.payload, publish.retain) == ("up", bytes(300), True)
    link.poll(modem.PubAck(publish.ref).encode() + modem.Dropped(0, "big", 5000).encode(), 60)
    assert (link.link.pubacks, link.link.dropped) == (1, 1)


def test_link_starts_over_when_the_modem_restarted_or_never_answers(cmod):
    link = up_link(cmod, connect_timeout_ms=5000)
    assert link.publish(b"up", b"x") == 0
    (publish,) = commands(link)
    link.poll(modem.Error(publish.ref, ErrorCode.NOT_CONNECTED).encode(), 100)  # a modem that forgot us
    (hello,) = commands(link)
    assert isinstance(hello, modem.Hello) and link.state == "hello"
    link.poll(modem.Info(hello.ref, 1024).encode(), 110)
    (connect,) = commands(link)
    link.poll(modem.Error(connect.ref, ErrorCode.REFUSED).encode(), 120)  # the modem could not start it
    assert link.state == "retry"
    link.poll(b"", 620)
    (connect,) = commands(link)
    link.poll(modem.Ok(connect.ref).encode(), 630)
    link.poll(b"", 5619)
    assert commands(link) == [] and link.state == "connecting"
    link.poll(b"", 5620)  # no CONNECTED or DISCONNECTED within connect_timeout_ms
    assert [type(c) for c in commands(link)] == [modem.Hello]


def test_link_refuses_a_bad_configuration(cmod):
    with pytest.raises(ValueError, match="-200"):
        cmod.link(subscriptions=(b"a", b"b", b"c", b"d"), n_subscriptions=5)
    with pytest.raises(ValueError, match="-200"):
        cmod.link(rx_cap=10)


# --- the bridge, driven by a Python stand-in for the firmware ---------------------------------------------------

class Firmware:
    """The firmware's end of the UART in Python: connects to the bridge as QEMU's UART1 does."""

    def __init__(self, port: int, max_body: int = modem.MAX_BODY) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.decoder = FrameDecoder(max_body)
        self.events: list[modem.Message] = []
        self.ref = 0

    def send(self, message: modem.Message) -> int:
        self.sock.sendall(message.encode())
        return message.ref

    def next_ref(self) -> int:
        self.ref = self.ref % 255 + 1
        return self.ref

    def expect(self, cls, timeout: float = 10.0, **fields) -> modem.Message:
        """The first event of type cls (with these field values) from now on; others are kept in self.events."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if isinstance(event, cls) and all(getattr(event, k) == v for k, v in fields.items()):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {cls.__name__} {fields}; got {self.events}")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise ConnectionError("the bridge closed the serial link")
            self.events += [modem.decode(f, modem.EVENTS) for f in self.decoder.feed(data)]

    def hello(self, max_body: int = modem.MAX_BODY) -> modem.Info:
        ref = self.send(modem.Hello(self.next_ref(), max_body))
        return self.expect(modem.Info, ref=ref)

    def connect(self, will: bytes | None = None, clean: bool = False) -> modem.Connected:
        ref = self.send(modem.Connect(self.next_ref(), DEVICE, 30, clean, STATUS if will is not None else None,
                                      will or b"", True))
        self.expect(modem.Ok, ref=ref)
        return self.expect(modem.Connected)

    def subscribe(self, topic_filter: str = DOWN) -> None:
        ref = self.send(modem.Subscribe(self.next_ref(), topic_filter))
        self.expect(modem.Ok, ref=ref)

    def close(self) -> None:
        self.sock.close()


class Coordinator:
    """The other end of the fleet: an MqttTransport logged in as the coordinator, collecting what it hears."""

    def __init__(self, url: str, keys) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.transport = MqttTransport(url, keys, topics.COORDINATOR_NAME, "coordinator", on_connect=self._subscribe,
                                       on_message=lambda t, p: self.inbox.put((t, p)))
        self.transport.start()

    def _subscribe(self) -> None:
        self.transport.subscribe(topics.uplink(FLEET, "+"), topics.status(FLEET, "+"))

    def send(self, payload: bytes, topic: str = DOWN) -> None:
        self.transport.wait_published(self.transport.publish(topics.Publish(topic, payload)))

    def expect(self, topic: str, timeout: float = 20.0, payload: bytes | None = None) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            t, p = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if t == topic and (payload is None or p == payload):
                return p

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def fleet(tmp_path):
    keys = tmp_path / "keys"
    provision_fleet(keys, FLEET, [DEVICE, "n1"])
    return keys


def start_mosquitto(tmp_path, keys, port: int | None = None) -> MosquittoProcess:
    require_tool("mosquitto")
    port = port or free_port()
    conf = tmp_path / "mosquitto.conf"
    persist = tmp_path / "mosquitto-db"
    persist.mkdir(exist_ok=True)
    conf.write_text(mosquitto_config(keys, port, run_as_root=os.geteuid() == 0, persistence_dir=persist,
                                     autosave_interval=1))
    return MosquittoProcess(conf, port).start()


@pytest.fixture
def mosquitto(tmp_path, fleet):
    broker = start_mosquitto(tmp_path, fleet)
    yield broker
    broker.stop()


def test_bridge_results_errors_and_one_receive_at_a_time(fleet, mosquitto):
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    coordinator = Coordinator(url, fleet)
    with ModemBridge(url, fleet, DEVICE, max_payload=CHUNK) as bridge:
        fw = Firmware(bridge.port)
        assert fw.hello() == modem.Info(1, CHUNK)
        ref = fw.send(modem.Publish(fw.next_ref(), UP, b"early"))
        assert fw.expect(modem.Error, ref=ref).code == ErrorCode.NOT_CONNECTED
        ref = fw.send(modem.Subscribe(fw.next_ref(), DOWN))
        assert fw.expect(modem.Error, ref=ref).code == ErrorCode.NOT_CONNECTED
        fw.sock.sendall(modem.frame(0x33, 77))
        assert fw.expect(modem.Error, ref=77).code == ErrorCode.UNKNOWN
        fw.sock.sendall(modem.frame(Type.PUBLISH, 78, b"\x02\x01t"))  # an unknown flag
        assert fw.expect(modem.Error, ref=78).code == ErrorCode.MALFORMED
        fw.sock.sendall(modem.Hello(79, 100, version=9).encode())
        assert fw.expect(modem.Error, ref=79).code == ErrorCode.VERSION

        assert fw.connect().session_present is False
        fw.subscribe()
        ref = fw.send(modem.Publish(fw.next_ref(), UP, bytes(range(256)) * 4))
        fw.expect(modem.PubAck, ref=ref)
        assert coordinator.expect(UP) == bytes(range(256)) * 4
        ref = fw.send(modem.Publish(fw.next_ref(), UP, bytes(CHUNK + 1)))
        assert fw.expect(modem.Error, ref=ref).code == ErrorCode.TOO_LARGE

        for i in range(3):
            coordinator.send(b"down %d" % i)
        first = fw.expect(modem.Receive)
        assert (first.topic, first.payload) == (DOWN, b"down 0")
        with pytest.raises(TimeoutError):  # the next waits for TAKEN
            fw.expect(modem.Receive, timeout=0.5)
        fw.send(modem.Taken(first.ref))
        second = fw.expect(modem.Receive, payload=b"down 1")
        assert second.ref == first.ref + 1
        fw.send(modem.Taken(second.ref))
        fw.send(modem.Taken(fw.expect(modem.Receive, payload=b"down 2").ref))

        coordinator.send(bytes(CHUNK + 1))  # above the modem's MTU: dropped, the firmware told
        assert fw.expect(modem.Dropped) == modem.Dropped(0, DOWN, CHUNK + 1)
        ref = fw.send(modem.Disconnect(fw.next_ref()))
        fw.expect(modem.Ok, ref=ref)
        fw.close()
        assert bridge.stats["receives"] == 3 and bridge.stats["dropped"] == 1
    coordinator.close()


def test_bridge_redelivers_what_was_not_taken_and_a_power_cut_publishes_the_will(fleet, mosquitto):
    url = f"mqtts://127.0.0.1:{mosquitto.port}"
    coordinator = Coordinator(url, fleet)
    with ModemBridge(url, fleet, DEVICE) as bridge:
        fw = Firmware(bridge.port)
        fw.hello()
        fw.connect(will=b"offline 1")
        fw.subscribe()
        coordinator.send(b"must arrive")
        assert fw.expect(modem.Receive).payload == b"must arrive"
        fw.close()  # power cut before TAKEN: the broker has no PUBACK for it
        assert coordinator.expect(STATUS) == b"offline 1"

        fw = Firmware(bridge.port)
        fw.hello()
        assert fw.connect(will=b"offline 2").session_present is True
        again = fw.expect(modem.Receive)
        assert again.payload == b"must arrive"
        fw.send(modem.Taken(again.ref))

        # HELLO (the firmware restarted, the modem did not): a clean DISCONNECT, no will
        fw.hello()
        fw.connect(will=b"offline 3")
        with pytest.raises(queue.Empty):
            coordinator.expect(STATUS, timeout=1.0)
        with pytest.raises(TimeoutError):  # it was taken: not delivered again
            fw.expect(modem.Receive, timeout=0.5)
        fw.close()
        assert coordinator.expect(STATUS) == b"offline 3"
    coordinator.close()


def test_bridge_reports_a_lost_broker_and_connects_again(tmp_path, fleet):
    broker = start_mosquitto(tmp_path, fleet)
    url = f"mqtts://127.0.0.1:{broker.port}"
    try:
        with ModemBridge(url, fleet, DEVICE, backoff=(0.1, 0.5)) as bridge:
            fw = Firmware(bridge.port)
            fw.hello()
            fw.connect()
            fw.subscribe()
            broker.process.send_signal(signal.SIGKILL)
            broker.process.wait(10)
            assert fw.expect(modem.Disconnected, timeout=20).reason == DisconnectReason.LOST
            ref = fw.send(modem.Publish(fw.next_ref(), UP, b"x"))
            assert fw.expect(modem.Error, ref=ref).code == ErrorCode.NOT_CONNECTED
            ref = fw.send(modem.Connect(fw.next_ref(), DEVICE, 30, False))
            fw.expect(modem.Ok, ref=ref)  # the modem tries until the broker is back
            time.sleep(1.0)
            broker.start()
            fw.expect(modem.Connected, timeout=20)
            fw.subscribe()
            coordinator = Coordinator(url, fleet)
            ref = fw.send(modem.Publish(fw.next_ref(), UP, b"after the restart"))
            fw.expect(modem.PubAck, ref=ref)
            coordinator.send(b"down again")
            assert fw.expect(modem.Receive).payload == b"down again"
            coordinator.close()
            fw.close()
    finally:
        broker.stop()


def test_bridge_reports_a_refused_login(tmp_path, fleet):
    """A wrong password on a plain listener of mosquitto (CONNACK "not authorised"): DISCONNECTED REFUSED, and
    the modem does not retry on its own. (amqtt 0.11.4 closes a refused connection without a CONNACK, and a bad
    client certificate fails in the TLS handshake: both read as a broker that is not there.)"""
    require_tool("mosquitto")
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(mosquitto_config(fleet, free_port(), run_as_root=os.geteuid() == 0)
                    + f"\nlistener {port} 127.0.0.1\n")
    (fleet / "devices" / DEVICE / "password").write_text("not the password")
    with MosquittoProcess(conf, port), ModemBridge(f"mqtt://127.0.0.1:{port}", fleet, DEVICE) as bridge:
        fw = Firmware(bridge.port)
        fw.hello()
        ref = fw.send(modem.Connect(fw.next_ref(), DEVICE, 30, False))
        fw.expect(modem.Ok, ref=ref)
        assert fw.expect(modem.Disconnected).reason == DisconnectReason.REFUSED
        with pytest.raises(TimeoutError):
            fw.expect(modem.Connected, timeout=1.0)
        assert bridge.stats["mqtt_connects"] == 1
        fw.close()


def test_bridge_refuses_bad_settings_in_one_line(fleet, capsys):
    from fedtiny_device.bridge import main

    assert main(["--broker", "http://x", "--fleet-dir", str(fleet), "--device", DEVICE]) == 2
    assert main(["--broker", "mqtt://127.0.0.1:1", "--fleet-dir", str(fleet), "--device", "nobody"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("Error: ") for line in err), err


# --- the firmware under QEMU -----------------------------------------------------------------------------------

def hello_payload(device: str) -> bytes:
    """What firmware_link_test.c publishes first: "hello DEVICE " then byte i = (i * 31 + 7) mod 256."""
    head = f"hello {device} ".encode()
    return head + bytes((i * 31 + 7) & 0xFF for i in range(len(head), CHUNK))


@pytest.fixture(scope="module")
def link_firmware(cache):
    for tool in ("make", "arm-none-eabi-gcc", "qemu-system-arm"):
        require_tool(tool)
    return cmodem.build_link_test_firmware(cache)


def test_link_firmware_under_qemu_through_the_bridge_to_mosquitto(tmp_path, fleet, link_firmware):
    broker = start_mosquitto(tmp_path, fleet)
    url = f"mqtts://127.0.0.1:{broker.port}"
    coordinator = Coordinator(url, fleet)
    bridge = ModemBridge(url, fleet, DEVICE, max_payload=CHUNK, backoff=(0.1, 0.5)).start()
    node = QemuNode(link_firmware, bridge.port, tmp_path / "node", args=[FLEET, DEVICE])
    rng = random.Random(5)
    try:
        node.start()
        assert coordinator.expect(UP, timeout=30) == hello_payload(DEVICE)
        for size in (1, 300, CHUNK):  # the largest a chunk of the node's size can be
            data = rng.randbytes(size)
            coordinator.send(data)
            assert coordinator.expect(UP) == data
        coordinator.send(bytes(CHUNK + 1))
        assert coordinator.expect(UP) == b"dropped %d" % (CHUNK + 1)

        node.kill()  # power cut: the broker publishes the will; what comes meanwhile waits in the session
        assert coordinator.expect(STATUS) == f"offline {DEVICE}".encode()
        while_dead = rng.randbytes(700)
        coordinator.send(while_dead)
        node.start()  # the queued message may come before the SUBSCRIBE's answer, and its echo before the hello
        assert sorted([coordinator.expect(UP, timeout=30), coordinator.expect(UP)]) == sorted(
            [hello_payload(DEVICE), while_dead])
        node.wait_for(r"^link: echo 700 bytes$")

        broker.process.send_signal(signal.SIGKILL)  # the broker goes and comes back on the same port
        broker.process.wait(10)
        node.wait_for(r"^link: disconnected reason 1$")
        broker.start()  # from its last autosave: a QoS 1 message may come twice, so wait for the one meant
        coordinator.expect(UP, timeout=30, payload=hello_payload(DEVICE))  # reconnected, subscribed, hello
        data = rng.randbytes(CHUNK)
        coordinator.send(data)
        coordinator.expect(UP, payload=data)

        coordinator.send(b"exit")
        assert node.wait(20) == 0
        console = node.console(node.starts)
        assert int(re.search(r"^link: exit after (\d+) echoes$", console, re.M)[1]) >= 2  # QoS 1: maybe a copy more
        assert "frames abandoned 0, bytes discarded 0, overruns 0" in console
        assert bridge.stats["frames_abandoned"] == 0
    finally:
        node.kill()
        bridge.stop()
        coordinator.close()
        broker.stop()
        print(f"bridge: {dict(bridge.stats)}\nfirmware console:\n{node.console()}")  # shown if the test failed


def test_modem_code_size_on_the_m4(link_firmware):
    """The link's own code (fedtiny_modem.c: codec, decoder and link state machine, and the UART driver) after
    --gc-sections: small, and no static RAM of its own (the firmware holds the fedtiny_modem_link and its two
    buffers: FEDTINY_MODEM_FRAME_BYTES of a chunk each way)."""
    size = crypto_footprint(link_firmware.with_name("fedtiny_link_test.map"), cmodem.MODEM_OBJECTS)
    print(f"modem link on the M4: {size['flash']} B flash, {size['ram']} B static RAM")
    assert 0 < size["flash"] < 4096
    assert size["ram"] == 0
