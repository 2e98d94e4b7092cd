"""The node's UART link to its modem (docs/node.md): frames, commands and events, in Python.

The firmware holds every key and all protocol state; the modem (a cellular or Wi-Fi module running its own MQTT
client; on the host, bridge.py) only connects, subscribes, publishes and hands over what arrives. They talk in
frames over a UART:

    frame = SYNC 0xA5 | LEN u16 | NLEN u16 (LEN ^ 0xFFFF) | body (LEN bytes) | CRC-32 u32 of LEN, NLEN and body
    body  = type u8 | ref u8 | fields         (little-endian; str8 = u8 length + bytes; "rest" = to the end)

Commands go from the firmware to the modem; every command but TAKEN gets one result with its ref. Events go from
the modem to the firmware. FrameDecoder finds frames in a byte stream, however it is cut, corrupted or
truncated; c/fedtiny_modem.c is the firmware's side and decodes rule for rule what this decoder does
(tests/test_modem_link.py compares the two on the same streams).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple

VERSION = 1
SYNC = 0xA5
HEADER_BYTES = 5  # SYNC, LEN, NLEN
CRC_BYTES = 4
MIN_BODY = 2  # type and ref
MAX_BODY = 0xFFFF
MAX_TOPIC = 255  # a str8
DEFAULT_MAX_PAYLOAD = 1024  # the bridge's MTU: the largest MQTT payload of one PUBLISH or RECEIVE


class Type(IntEnum):
    # commands: firmware -> modem
    HELLO = 0x01  # version u8 | max_body u16 (the firmware's receive buffer)        -> INFO
    CONNECT = 0x02  # flags u8 | keepalive u16 | client_id str8 [| will_topic str8 | will_payload rest]  -> OK
    SUBSCRIBE = 0x03  # topic_filter rest (QoS 1)                                    -> OK once the broker granted it
    PUBLISH = 0x04  # flags u8 | topic str8 | payload rest (QoS 1)                   -> PUBACK from the broker
    DISCONNECT = 0x05  # (nothing)                                                   -> OK
    TAKEN = 0x06  # ref = a RECEIVE's ref: the firmware has it; no result
    # results: modem -> firmware, ref = the command's
    INFO = 0x81  # version u8 | max_payload u16
    OK = 0x82
    PUBACK = 0x83
    ERROR = 0x84  # code u8 (ErrorCode)
    # events: modem -> firmware, unsolicited (ref 0 but RECEIVE's)
    CONNECTED = 0xC0  # session_present u8
    DISCONNECTED = 0xC1  # reason u8 (DisconnectReason)
    RECEIVE = 0xC2  # topic str8 | payload rest; ref = delivery number 1..255, answered by TAKEN
    DROPPED = 0xC3  # length u32 | topic rest: a message too large for the firmware, acknowledged and dropped


class ErrorCode(IntEnum):
    MALFORMED = 1  # the command's fields do not parse
    UNKNOWN = 2  # not a command type
    NOT_CONNECTED = 3
    TOO_LARGE = 4  # payload above the modem's max_payload
    REFUSED = 5  # the broker refused (PUBACK or SUBACK failure)
    LOST = 6  # the connection went before the broker answered
    VERSION = 7  # HELLO of a link version this modem does not speak


class DisconnectReason(IntEnum):
    LOST = 1  # the connection to the broker went (network, broker restart, keepalive)
    REFUSED = 2  # the broker refused the CONNECT (credentials, not authorised)


CONNECT_CLEAN_SESSION, CONNECT_WILL, CONNECT_WILL_RETAIN = 0x01, 0x02, 0x04
PUBLISH_RETAIN = 0x01


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def frame(type_: int, ref: int, fields: bytes = b"") -> bytes:
    """One whole frame around a body of type, ref and fields."""
    body = bytes((type_, ref)) + fields
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes; at most {MAX_BODY}")
    head = struct.pack("<HH", len(body), len(body) ^ 0xFFFF)
    return bytes((SYNC,)) + head + body + struct.pack("<I", crc32(head + body))


class Frame(NamedTuple):
    type: int
    ref: int
    fields: bytes


class FrameDecoder:
    """Frames out of a byte stream, with bounded memory (one frame of at most max_body body bytes).

    Bytes before a SYNC are skipped. A candidate frame whose NLEN does not match its LEN, whose LEN is below 2 or
    above max_body, or whose CRC is wrong is abandoned: its SYNC byte is dropped and the search goes on from the
    next byte, so a good frame that began inside a corrupt one is still found. `idle_ms` > 0 also abandons a
    partial frame after that long without a byte while the caller was listening: `receive` called with no bytes
    starts the clock (the time spent away from the UART does not count), bytes or a frame stop it.

    Counters: `discarded` bytes that were not part of a good frame, `abandoned` candidate frames.
    """

    def __init__(self, max_body: int = MAX_BODY, idle_ms: int = 0) -> None:
        if not MIN_BODY <= max_body <= MAX_BODY:
            raise ValueError(f"max_body must be within {MIN_BODY}..{MAX_BODY}")
        self.max_body = max_body
        self.idle_ms = idle_ms
        self._buf = bytearray()
        self._ready = 0  # length of the frame returned last, removed at the next call
        self._idle_since: int | None = None
        self.discarded = 0
        self.abandoned = 0

    def _abandon(self) -> None:
        """Drop the candidate's SYNC and everything up to the next SYNC in the buffer."""
        self.abandoned += 1
        nxt = self._buf.find(SYNC, 1)
        cut = len(self._buf) if nxt < 0 else nxt
        self.discarded += cut
        del self._buf[:cut]

    def _scan(self) -> int:
        """0 if the buffer starts with a whole good frame, else how many more bytes the candidate needs (1 while
        hunting for a SYNC)."""
        buf = self._buf
        while True:
            if len(buf) < HEADER_BYTES:
                return HEADER_BYTES - len(buf) if buf else 1
            length, check = struct.unpack_from("<HH", buf, 1)
            if check != length ^ 0xFFFF or not MIN_BODY <= length <= self.max_body:
                self._abandon()
                continue
            total = HEADER_BYTES + length + CRC_BYTES
            if len(buf) < total:
                return total - len(buf)
            if crc32(bytes(buf[1:HEADER_BYTES + length])) != struct.unpack_from("<I", buf, HEADER_BYTES + length)[0]:
                self._abandon()
                continue
            self._ready = total
            return 0

    def _frame(self) -> Frame:
        self._idle_since = None
        body = bytes(self._buf[HEADER_BYTES:self._ready - CRC_BYTES])
        return Frame(body[0], body[1], body[2:])

    def receive(self, data: bytes, now_ms: int = 0) -> tuple[int, Frame | None]:
        """Take bytes of `data` until a frame is complete: (bytes taken, the frame or None). Call again, also
        with no bytes, until it returns no frame: a frame may follow from bytes already buffered."""
        if self._ready:
            del self._buf[:self._ready]
            self._ready = 0
        if self._scan() == 0:
            return 0, self._frame()
        if data:
            self._idle_since = None
        taken = 0
        while taken < len(data):
            if not self._buf:  # hunting: skip to the next SYNC
                at = data.find(SYNC, taken)
                if at < 0:
                    self.discarded += len(data) - taken
                    return len(data), None
                self.discarded += at - taken
                taken = at
            need = self._scan()
            if need == 0:
                return taken, self._frame()
            step = min(need, len(data) - taken)
            self._buf += data[taken:taken + step]
            taken += step
            if self._scan() == 0:
                return taken, self._frame()
        if not data and self._buf:
            if self._idle_since is None:
                self._idle_since = now_ms
            elif self.idle_ms and (now_ms - self._idle_since) & 0xFFFFFFFF >= self.idle_ms:
                self._idle_since = None
                self._abandon()
                if self._scan() == 0:
                    return 0, self._frame()
        return taken, None

    def feed(self, data: bytes, now_ms: int = 0) -> list[Frame]:
        """Every frame `data` completes (receive until all is taken and no frame is left)."""
        frames, view = [], bytes(data)
        while True:
            taken, got = self.receive(view, now_ms)
            view = view[taken:]
            if got is not None:
                frames.append(got)
            elif not view:
                return frames


# --- commands and events ---------------------------------------------------------------------------------------

class Malformed(ValueError):
    """A frame whose fields do not parse as its type says."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise Malformed("truncated fields")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def str8(self) -> str:
        return _text(self.take(self.u8()))

    def rest(self) -> bytes:
        out, self.at = self.data[self.at:], len(self.data)
        return out

    def end(self) -> None:
        if self.at != len(self.data):
            raise Malformed("trailing bytes")


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Malformed("a topic or client id that is not UTF-8") from None


def _str8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_TOPIC:
        raise ValueError(f"{text[:40]!r}... is longer than {MAX_TOPIC} bytes")
    return bytes((len(raw),)) + raw


@dataclass(frozen=True)
class Message:
    """A command or an event: `encode()` makes its frame, `decode(frame)` reads any of them back."""

    TYPE: ClassVar[Type]
    ref: int

    def fields(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.TYPE, self.ref, self.fields())

    @classmethod
    def read(cls, ref: int, r: _Reader) -> Message:
        return cls(ref)


@dataclass(frozen=True)
class Hello(Message):
    TYPE = Type.HELLO
    max_body: int = MAX_BODY
    version: int = VERSION

    def fields(self) -> bytes:
        return struct.pack("<BH", self.version, self.max_body)

    @classmethod
    def read(cls, ref, r):
        version, max_body = r.u8(), r.u16()
        return cls(ref, max_body, version)


@dataclass(frozen=True)
class Connect(Message):
    TYPE = Type.CONNECT
    client_id: str = ""
    keepalive: int = 30
    clean_session: bool = False
    will_topic: str | None = None  # no will when None
    will_payload: bytes = b""
    will_retain: bool = False

    def fields(self) -> bytes:
        flags = (CONNECT_CLEAN_SESSION if self.clean_session else 0) | (
            CONNECT_WILL | (CONNECT_WILL_RETAIN if self.will_retain else 0) if self.will_topic is not None else 0)
        out = struct.pack("<BH", flags, self.keepalive) + _str8(self.client_id)
        if self.will_topic is not None:
            out += _str8(self.will_topic) + self.will_payload
        return out

    @classmethod
    def read(cls, ref, r):
        flags, keepalive, client_id = r.u8(), r.u16(), r.str8()
        if flags & ~(CONNECT_CLEAN_SESSION | CONNECT_WILL | CONNECT_WILL_RETAIN) or (
                flags & CONNECT_WILL_RETAIN and not flags & CONNECT_WILL):
            raise Malformed(f"CONNECT flags {flags:#x}")
        if not flags & CONNECT_WILL:
            return cls(ref, client_id, keepalive, bool(flags & CONNECT_CLEAN_SESSION))
        topic = r.str8()
        return cls(ref, client_id, keepalive, bool(flags & CONNECT_CLEAN_SESSION), topic, r.rest(),
                   bool(flags & CONNECT_WILL_RETAIN))


@dataclass(frozen=True)
class Subscribe(Message):
    TYPE = Type.SUBSCRIBE
    topic_filter: str = ""

    def fields(self) -> bytes:
        return self.topic_filter.encode()

    @classmethod
    def read(cls, ref, r):
        return cls(ref, _text(r.rest()))


@dataclass(frozen=True)
class Publish(Message):
    TYPE = Type.PUBLISH
    topic: str = ""
    payload: bytes = b""
    retain: bool = False

    def fields(self) -> bytes:
        return bytes((PUBLISH_RETAIN if self.retain else 0,)) + _str8(self.topic) + self.payload

    @classmethod
    def read(cls, ref, r):
        flags = r.u8()
        if flags & ~PUBLISH_RETAIN:
            raise Malformed(f"PUBLISH flags {flags:#x}")
        topic = r.str8()
        return cls(ref, topic, r.rest(), bool(flags & PUBLISH_RETAIN))


@dataclass(frozen=True)
class Disconnect(Message):
    TYPE = Type.DISCONNECT


@dataclass(frozen=True)
class Taken(Message):
    TYPE = Type.TAKEN


@dataclass(frozen=True)
class Info(Message):
    TYPE = Type.INFO
    max_payload: int = DEFAULT_MAX_PAYLOAD
    version: int = VERSION

    def fields(self) -> bytes:
        return struct.pack("<BH", self.version, self.max_payload)

    @classmethod
    def read(cls, ref, r):
        version, max_payload = r.u8(), r.u16()
        return cls(ref, max_payload, version)


@dataclass(frozen=True)
class Ok(Message):
    TYPE = Type.OK


@dataclass(frozen=True)
class PubAck(Message):
    TYPE = Type.PUBACK


@dataclass(frozen=True)
class Error(Message):
    TYPE = Type.ERROR
    code: int = ErrorCode.MALFORMED

    def fields(self) -> bytes:
        return bytes((self.code,))

    @classmethod
    def read(cls, ref, r):
        return cls(ref, r.u8())


@dataclass(frozen=True)
class Connected(Message):
    TYPE = Type.CONNECTED
    session_present: bool = False

    def fields(self) -> bytes:
        return bytes((int(self.session_present),))

    @classmethod
    def read(cls, ref, r):
        present = r.u8()
        if present > 1:
            raise Malformed("session_present above 1")
        return cls(ref, bool(present))


@dataclass(frozen=True)
class Disconnected(Message):
    TYPE = Type.DISCONNECTED
    reason: int = DisconnectReason.LOST

    def fields(self) -> bytes:
        return bytes((self.reason,))

    @classmethod
    def read(cls, ref, r):
        return cls(ref, r.u8())


@dataclass(frozen=True)
class Receive(Message):
    TYPE = Type.RECEIVE
    topic: str = ""
    payload: bytes = b""

    def fields(self) -> bytes:
        return _str8(self.topic) + self.payload

    @classmethod
    def read(cls, ref, r):
        topic = r.str8()
        return cls(ref, topic, r.rest())


@dataclass(frozen=True)
class Dropped(Message):
    TYPE = Type.DROPPED
    topic: str = ""
    length: int = 0

    def fields(self) -> bytes:
        return struct.pack("<I", self.length) + self.topic.encode()

    @classmethod
    def read(cls, ref, r):
        length = r.u32()
        return cls(ref, _text(r.rest()), length)


COMMANDS = {c.TYPE: c for c in (Hello, Connect, Subscribe, Publish, Disconnect, Taken)}
EVENTS = {c.TYPE: c for c in (Info, Ok, PubAck, Error, Connected, Disconnected, Receive, Dropped)}


def decode(f: Frame, kinds: dict[int, type[Message]]) -> Message:
    """The command or event in a frame (kinds: COMMANDS or EVENTS); Malformed if it is none of them or its
    fields do not parse exactly."""
    cls = kinds.get(f.type)
    if cls is None:
        raise Malformed(f"frame type {f.type:#04x}")
    r = _Reader(f.fields)
    message = cls.read(f.ref, r)
    r.end()
    return message


# Body bytes of the largest frames, for sizing buffers (the C header has the same).
def publish_body_bytes(topic_len: int, payload_len: int) -> int:
    return MIN_BODY + 2 + topic_len + payload_len


def receive_body_bytes(topic_len: int, payload_len: int) -> int:
    return MIN_BODY + 1 + topic_len + payload_len
