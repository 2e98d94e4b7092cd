"""The firmware's side of the modem link (c/fedtiny_modem.c) on the host through ctypes, and the link test
firmware (c/firmware_link_test.c) for QEMU; tests compare them with fedtiny_device.modem.

- `CModem()`: the C encoders (`hello`, `connect`, `subscribe`, `publish`, `disconnect`, `taken`: frame bytes)
  and `CModem.Receiver(max_body, idle_ms)`: fedtiny_modem_receive over a byte stream, with the same `feed` as
  modem.FrameDecoder, returning `CEvent`s.
- `build_link_test_firmware()` -> the ELF; its map is next to it (fedtiny_link_test.map).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from . import codegen, cruntime

HOST_LIB = "libfedtiny_modem.so"
LINK_TEST_ELF = "fedtiny_link_test.elf"
MODEM_FILES = ("fedtiny_modem.c", "fedtiny_modem.h", "fedtiny_crc32.c", "fedtiny_crc32.h", "Makefile")
FIRMWARE_FILES = MODEM_FILES + ("fedtiny_uart_cmsdk.c", "fedtiny_uart_cmsdk.h", "firmware_link_test.c",
                                "fedtiny_boot.c", "fedtiny_boot.h", "fedtiny_m4.ld")
MODEM_OBJECTS = ("fedtiny_modem.m4.o", "fedtiny_uart_cmsdk.m4.o")  # the link's own code, in the map
FRAME_OVERHEAD = 9  # SYNC, LEN, NLEN, CRC


def _files(names: tuple[str, ...]) -> dict[str, bytes]:
    rt = codegen.runtime_dir()
    return {name: (rt / name).read_bytes() for name in names}


def build_link_test_firmware(cache_dir: Path | None = None) -> Path:
    return cruntime.make_cached(_files(FIRMWARE_FILES), "m4-link-test", LINK_TEST_ELF, cache_dir)


class ConnectParams(ctypes.Structure):
    _fields_ = [("client_id", ctypes.c_char_p), ("keepalive_s", ctypes.c_uint16), ("clean_session", ctypes.c_uint8),
                ("will_topic", ctypes.c_char_p), ("will_payload", ctypes.c_void_p), ("will_len", ctypes.c_size_t),
                ("will_retain", ctypes.c_uint8)]


class Rx(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("cap", ctypes.c_size_t), ("len", ctypes.c_size_t),
                ("ready", ctypes.c_size_t), ("idle_ms", ctypes.c_uint32), ("idle_since", ctypes.c_uint32),
                ("idle_counting", ctypes.c_uint8), ("discarded", ctypes.c_uint32), ("abandoned", ctypes.c_uint32)]


class Event(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint8), ("malformed", ctypes.c_uint8), ("ref", ctypes.c_uint8),
                ("code", ctypes.c_uint8), ("max_payload", ctypes.c_uint16), ("length", ctypes.c_uint32),
                ("topic", ctypes.c_void_p), ("topic_len", ctypes.c_uint32), ("payload", ctypes.c_void_p),
                ("payload_len", ctypes.c_uint32)]


_WRITE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)
_WILL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint8),
                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t))
_UP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint32,
                            ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint32, ctypes.c_uint32)
_OBSERVE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(Event))
MAX_SUBSCRIPTIONS = 4  # FEDTINY_MODEM_LINK_MAX_SUBSCRIPTIONS


class LinkConfig(ctypes.Structure):
    _fields_ = [("client_id", ctypes.c_char_p), ("will_topic", ctypes.c_char_p), ("will_retain", ctypes.c_uint8),
                ("clean_session", ctypes.c_uint8), ("keepalive_s", ctypes.c_uint16),
                ("subscriptions", ctypes.c_char_p * MAX_SUBSCRIPTIONS), ("n_subscriptions", ctypes.c_uint32)] + [
        (n, ctypes.c_uint32) for n in ("min_payload", "hello_ms", "retry_ms", "connect_timeout_ms", "idle_ms")] + [
        ("rx", ctypes.c_void_p), ("rx_cap", ctypes.c_size_t), ("tx", ctypes.c_void_p), ("tx_cap", ctypes.c_size_t)]


class LinkCallbacks(ctypes.Structure):
    _fields_ = [("context", ctypes.c_void_p), ("write", _WRITE), ("will", _WILL), ("up", _UP),
                ("message", _MESSAGE), ("observe", _OBSERVE)]


class Link(ctypes.Structure):
    _fields_ = [("config", LinkConfig), ("cb", LinkCallbacks), ("rx", Rx), ("state", ctypes.c_uint8),
                ("next_ref", ctypes.c_uint8), ("hello_ref", ctypes.c_uint8), ("connect_ref", ctypes.c_uint8),
                ("max_payload", ctypes.c_uint16), ("due", ctypes.c_uint32)] + [
        (n, ctypes.c_uint32) for n in ("connects", "disconnects", "pubacks", "errors", "dropped", "malformed")]


LINK_STATES = ("hello", "connecting", "up", "retry", "failed")  # fedtiny_modem_link_state


@dataclass(frozen=True)
class CEvent:
    """What fedtiny_modem_receive made of one frame (topic and payload copied out of the receive buffer)."""

    type: int
    ref: int
    malformed: bool
    code: int
    max_payload: int
    length: int
    topic: bytes
    payload: bytes
    fields: bytes  # the frame's fields, raw


class CModem:
    """libfedtiny_modem.so (gcc -O2, cached like every cruntime build)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        lib = ctypes.CDLL(str(cruntime.make_cached(_files(MODEM_FILES), "host-modem", HOST_LIB, cache_dir)))
        u8, size, out_len = ctypes.c_uint8, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)
        buf = ctypes.c_void_p
        lib.fedtiny_modem_hello.argtypes = [buf, size, u8, ctypes.c_uint16, out_len]
        lib.fedtiny_modem_connect.argtypes = [buf, size, u8, ctypes.POINTER(ConnectParams), out_len]
        lib.fedtiny_modem_subscribe.argtypes = [buf, size, u8, ctypes.c_char_p, out_len]
        lib.fedtiny_modem_publish.argtypes = [buf, size, u8, ctypes.c_char_p, u8, ctypes.c_char_p, size, out_len]
        lib.fedtiny_modem_publish_payload.argtypes = [buf, size]
        lib.fedtiny_modem_publish_payload.restype = ctypes.c_void_p
        lib.fedtiny_modem_disconnect.argtypes = [buf, size, u8, out_len]
        lib.fedtiny_modem_taken.argtypes = [buf, size, u8, out_len]
        lib.fedtiny_modem_rx_init.argtypes = [ctypes.POINTER(Rx), buf, size, ctypes.c_uint32]
        lib.fedtiny_modem_rx_init.restype = None
        lib.fedtiny_modem_receive.argtypes = [ctypes.POINTER(Rx), ctypes.c_char_p, size, ctypes.c_uint32,
                                              ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(Event)]
        lib.fedtiny_modem_link_init.argtypes = [ctypes.POINTER(Link), ctypes.POINTER(LinkConfig),
                                                ctypes.POINTER(LinkCallbacks), ctypes.c_uint32]
        lib.fedtiny_modem_link_poll.argtypes = [ctypes.POINTER(Link), ctypes.c_char_p, size, ctypes.c_uint32]
        lib.fedtiny_modem_link_poll.restype = None
        lib.fedtiny_modem_link_publish.argtypes = [ctypes.POINTER(Link), ctypes.c_char_p, u8, ctypes.c_char_p, size]
        lib.fedtiny_crc32.argtypes = [ctypes.c_uint32, ctypes.c_char_p, size]
        lib.fedtiny_crc32.restype = ctypes.c_uint32
        self.lib = lib

    def _encode(self, fn, *args, cap: int = 70000) -> bytes:
        """Frame bytes, or the negative status as a ValueError."""
        out, n = ctypes.create_string_buffer(cap), ctypes.c_size_t()
        status = fn(out, cap, *args, ctypes.byref(n))
        if status:
            raise ValueError(f"status {status}")
        return out.raw[:n.value]

    def hello(self, ref: int, max_body: int, cap: int = 70000) -> bytes:
        return self._encode(self.lib.fedtiny_modem_hello, ref, max_body, cap=cap)

    def connect(self, ref: int, client_id: bytes, keepalive: int, clean_session: bool, will_topic: bytes | None,
                will_payload: bytes = b"", will_retain: bool = False, cap: int = 70000) -> bytes:
        keep = ctypes.create_string_buffer(will_payload, max(1, len(will_payload)))
        params = ConnectParams(client_id, keepalive, int(clean_session), will_topic,
                               ctypes.cast(keep, ctypes.c_void_p), len(will_payload), int(will_retain))
        return self._encode(self.lib.fedtiny_modem_connect, ref, ctypes.byref(params), cap=cap)

    def subscribe(self, ref: int, topic_filter: bytes, cap: int = 70000) -> bytes:
        return self._encode(self.lib.fedtiny_modem_subscribe, ref, topic_filter, cap=cap)

    def publish(self, ref: int, topic: bytes, retain: bool, payload: bytes, cap: int = 70000) -> bytes:
        return self._encode(self.lib.fedtiny_modem_publish, ref, topic, int(retain), payload, len(payload), cap=cap)

    def publish_in_place(self, ref: int, topic: bytes, payload: bytes) -> bytes:
        """PUBLISH with the payload written first where fedtiny_modem_publish_payload says (nothing copied)."""
        cap = FRAME_OVERHEAD + 4 + len(topic) + len(payload)
        out, n = ctypes.create_string_buffer(cap), ctypes.c_size_t()
        at = self.lib.fedtiny_modem_publish_payload(out, len(topic))
        ctypes.memmove(at, payload, len(payload))
        status = self.lib.fedtiny_modem_publish(out, cap, ref, topic, 0, ctypes.c_char_p(at), len(payload),
                                                ctypes.byref(n))
        if status:
            raise ValueError(f"status {status}")
        return out.raw[:n.value]

    def disconnect(self, ref: int) -> bytes:
        return self._encode(self.lib.fedtiny_modem_disconnect, ref)

    def taken(self, ref: int) -> bytes:
        return self._encode(self.lib.fedtiny_modem_taken, ref)

    def crc32(self, data: bytes) -> int:
        return self.lib.fedtiny_crc32(0, data, len(data))

    def receiver(self, max_body: int, idle_ms: int = 0) -> CReceiver:
        return CReceiver(self.lib, max_body, idle_ms)

    def link(self, **settings) -> CLink:
        return CLink(self.lib, **settings)


class CReceiver:
    """A fedtiny_modem_rx with a buffer of max_body + 9 bytes."""

    def __init__(self, lib, max_body: int, idle_ms: int) -> None:
        self.lib = lib
        self.buf = ctypes.create_string_buffer(max_body + FRAME_OVERHEAD)
        self.rx = Rx()
        lib.fedtiny_modem_rx_init(ctypes.byref(self.rx), self.buf, len(self.buf), idle_ms)

    @property
    def discarded(self) -> int:
        return self.rx.discarded

    @property
    def abandoned(self) -> int:
        return self.rx.abandoned

    def receive(self, data: bytes, now_ms: int = 0) -> tuple[int, CEvent | None]:
        ev, taken = Event(), ctypes.c_size_t()
        got = self.lib.fedtiny_modem_receive(ctypes.byref(self.rx), data, len(data), now_ms & 0xFFFFFFFF,
                                             ctypes.byref(taken), ctypes.byref(ev))
        if not got:
            return taken.value, None
        frame_len = self.rx.ready
        fields = ctypes.string_at(ctypes.addressof(self.buf) + 7, frame_len - FRAME_OVERHEAD - 2)
        topic = ctypes.string_at(ev.topic, ev.topic_len) if ev.topic else b""
        payload = ctypes.string_at(ev.payload, ev.payload_len) if ev.payload else b""
        return taken.value, CEvent(ev.type, ev.ref, bool(ev.malformed), ev.code, ev.max_payload, ev.length, topic,
                             payload, fields)

    def feed(self, data: bytes, now_ms: int = 0) -> list[CEvent]:
        """As modem.FrameDecoder.feed: every frame `data` completes."""
        events, view = [], bytes(data)
        while True:
            taken, got = self.receive(view, now_ms)
            view = view[taken:]
            if got is not None:
                events.append(got)
            elif not view:
                return events


class CLink:
    """A fedtiny_modem_link whose callbacks are Python: `written` collects the bytes it wrote to the "UART",
    `wills` the times `will` was asked, `ups` the times it went up, `messages` (topic, payload) it handed over.
    `will_payload` is what the will callback writes (None: no will)."""

    def __init__(self, lib, *, client_id: bytes = b"n0", will_topic: bytes | None = b"fedtiny/f/status/n0",
                 subscriptions: tuple[bytes, ...] = (b"fedtiny/f/down/n0",), min_payload: int = 256,
                 hello_ms: int = 1000, retry_ms: int = 500, connect_timeout_ms: int = 0, idle_ms: int = 0,
                 rx_cap: int = 2000, tx_cap: int = 2000, keepalive_s: int = 30, now_ms: int = 0,
                 n_subscriptions: int | None = None) -> None:
        self.lib = lib
        self.written = bytearray()
        self.wills: list[int] = []
        self.ups: list[int] = []
        self.messages: list[tuple[bytes, bytes]] = []
        self.will_payload: bytes | None = b"offline"
        self.publish_in_message: bytes | None = None  # published on topic "echo" from inside `message`
        self._rx, self._tx = ctypes.create_string_buffer(rx_cap), ctypes.create_string_buffer(tx_cap)
        self._keep = [client_id, will_topic, *subscriptions]
        subs = (ctypes.c_char_p * MAX_SUBSCRIPTIONS)(*subscriptions)
        count = len(subscriptions) if n_subscriptions is None else n_subscriptions  # tests: a count that lies
        self.config = LinkConfig(client_id, will_topic, 1, 0, keepalive_s, subs, count, min_payload,
                                 hello_ms, retry_ms, connect_timeout_ms, idle_ms,
                                 ctypes.cast(self._rx, ctypes.c_void_p), rx_cap,
                                 ctypes.cast(self._tx, ctypes.c_void_p), tx_cap)
        self._callbacks = LinkCallbacks(None, _WRITE(self._write), _WILL(self._will), _UP(self._up),
                                        _MESSAGE(self._message), _OBSERVE())
        self.link = Link()
        status = lib.fedtiny_modem_link_init(ctypes.byref(self.link), ctypes.byref(self.config),
                                             ctypes.byref(self._callbacks), now_ms)
        if status:
            raise ValueError(f"fedtiny_modem_link_init: status {status}")

    def _write(self, context, data, n) -> None:
        self.written += ctypes.string_at(data, n)

    def _will(self, context, now_ms, out, cap, length) -> int:
        self.wills.append(now_ms)
        if self.will_payload is None or len(self.will_payload) > cap:
            return 1
        ctypes.memmove(out, self.will_payload, len(self.will_payload))
        length[0] = len(self.will_payload)
        return 0

    def _up(self, context, now_ms) -> None:
        self.ups.append(now_ms)

    def _message(self, context, topic, topic_len, payload, n, now_ms) -> None:
        self.messages.append((ctypes.string_at(topic, topic_len), ctypes.string_at(payload, n)))
        if self.publish_in_message is not None:
            self.publish(b"echo", self.publish_in_message)

    @property
    def state(self) -> str:
        return LINK_STATES[self.link.state]

    def poll(self, data: bytes, now_ms: int) -> None:
        self.lib.fedtiny_modem_link_poll(ctypes.byref(self.link), data, len(data), now_ms & 0xFFFFFFFF)

    def publish(self, topic: bytes, payload: bytes, retain: bool = False) -> int:
        return self.lib.fedtiny_modem_link_publish(ctypes.byref(self.link), topic, int(retain), payload,
                                                   len(payload))

    def take_written(self) -> bytes:
        out, self.written = bytes(self.written), bytearray()
        return out
