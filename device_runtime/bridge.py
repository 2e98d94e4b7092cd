"""A host process that plays the node's modem (docs/node.md): the firmware's UART on one side, one MQTT client
on the other.

The bridge is a thin edge, as a cellular or Wi-Fi module running its own MQTT client is: it holds the broker
login a modem is provisioned with (the device's folder of `fedtiny keys`: client certificate on mqtts://,
password on mqtt://) and nothing else. Every payload it moves is a chunk of a sealed envelope; it keeps no
protocol state and has no key of the fleet.

    serial   it listens on TCP (127.0.0.1:PORT); QEMU connects its UART1 there
             (`-chardev socket,host=127.0.0.1,port=PORT,reconnect=1 -serial null -serial chardev:modem`,
             fedtiny_device.qemu_node). One firmware at a time; a new connection replaces the old one.
    MQTT     one MqttTransport per CONNECT, with the firmware's client id, keepalive, clean-session flag and
             last will. It does not reconnect on its own: a lost or refused connection is a DISCONNECTED event
             and the firmware sends CONNECT again (with a fresh will). A CONNECT is retried with backoff until
             the broker answers.

Messages from the broker go to the firmware one RECEIVE at a time, the next after its TAKEN, and are
acknowledged to the broker (QoS 1 PUBACK) only then: whatever the firmware has not taken when the connection
ends, the broker delivers again. The serial link closing (QEMU killed) is a power cut of the whole board: the
MQTT connection is cut without DISCONNECT, so the broker publishes the last will. HELLO (the firmware started)
resets the modem: the MQTT connection is closed with DISCONNECT and nothing of it is kept.

    python -m fedtiny_device.bridge --broker mqtts://127.0.0.1:8883 --fleet-dir fleet --device n0 --port 5555
"""

from __future__ import annotations

import argparse
import logging
import queue
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedtiny.protocol import topics
from fedtiny.transport.mqtt import MqttTransport, parse_broker_url

from . import modem
from .modem import DisconnectReason, ErrorCode, Type

log = logging.getLogger("fedtiny.bridge")

# A partial command frame this long without a byte is abandoned. Generous: an emulated UART stalls when its
# host is busy, and a frame cut short by a firmware reset is also found once the next frames fill its length.
IDLE_MS = 2000


@dataclass
class _Held:
    """A message from the broker not yet taken by the firmware."""

    generation: int
    topic: str
    payload: bytes
    ack: Callable[[], None]
    ref: int = 0  # its RECEIVE's ref once sent


class ModemBridge:
    """The modem: `start()` runs it in a thread, `stop()` ends it. `port` is where the firmware's UART
    connects; `stats` counts what crossed."""

    def __init__(self, broker_url: str, fleet_dir: str | Path, device: str, *, host: str = "127.0.0.1",
                 port: int = 0, max_payload: int = modem.DEFAULT_MAX_PAYLOAD,
                 backoff: tuple[float, float] = (0.2, 5.0),
                 transport_wrapper: Callable[[MqttTransport], MqttTransport] | None = None) -> None:
        self.device = topics.check_name(device)
        self.fleet_dir = Path(fleet_dir)
        folder = self.fleet_dir / "devices" / device
        if not folder.is_dir():
            raise ValueError(f"{folder} does not exist: not a device of a fleet made by `fedtiny keys`")
        if not 1 <= max_payload <= 0xFFFF:
            raise ValueError(f"max_payload must be within 1..65535, not {max_payload}")
        parse_broker_url(broker_url)
        self.broker_url = broker_url
        self.max_payload = max_payload
        self.backoff = backoff
        # Tests: wraps each connection's MqttTransport (fedtiny.transport.faults.FaultyTransport drops, delays or
        # cuts what the modem publishes, as a failing radio link would).
        self.transport_wrapper = transport_wrapper
        self._listener = socket.create_server((host, port))
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._serial: socket.socket | None = None
        self._decoder = modem.FrameDecoder(idle_ms=IDLE_MS)
        self._transport: MqttTransport | None = None
        self._generation = 0  # of the transport; events of an older one are stale
        self._pending: dict[int, tuple[Type, int]] = {}  # MQTT message id -> (command, ref) awaiting the broker
        self._held: deque[_Held] = deque()
        self._out: _Held | None = None  # the RECEIVE at the firmware, until its TAKEN
        self._delivery = 0
        self._firmware_max_body = modem.MAX_BODY
        self.stats: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> ModemBridge:
        self._thread = threading.Thread(target=self.run, name=f"bridge-{self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def __enter__(self) -> ModemBridge:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _post(self, *event) -> None:
        """From paho's thread: hand an event to the bridge's thread."""
        self._events.put(event)
        self._wake()

    def run(self) -> None:
        log.info("%s: modem listening on %s:%d", self.device, self.host, self.port)
        try:
            while not self._stop.is_set():
                watch = [self._listener, self._wake_r] + ([self._serial] if self._serial else [])
                ready, _, _ = select.select(watch, [], [], 0.1)
                if self._wake_r in ready:
                    self._wake_r.recv(4096)
                self._handle_events()
                if self._listener in ready:
                    self._accept()
                if self._serial is not None and self._serial in ready:
                    self._read_serial()
                elif self._serial is not None:
                    self._handle_frames(b"")  # silence: may abandon a partial frame
        finally:
            self._drop_serial(power_cut=False)
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    # --- serial side -----------------------------------------------------------------------------------------
    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        if self._serial is not None:
            log.info("%s: a new firmware connection replaces the old one", self.device)
            self._drop_serial(power_cut=True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._serial = conn
        self._decoder = modem.FrameDecoder(idle_ms=IDLE_MS)
        self.stats["serial_connections"] += 1
        log.info("%s: firmware connected", self.device)

    def _read_serial(self) -> None:
        try:
            data = self._serial.recv(65536)
        except OSError:
            data = b""
        if not data:
            log.info("%s: firmware gone (serial closed): the board lost power", self.device)
            self._drop_serial(power_cut=True)
            return
        self.stats["bytes_in"] += len(data)
        self._handle_frames(data)

    def _handle_frames(self, data: bytes) -> None:
        before = self._decoder.abandoned
        for f in self._decoder.feed(data, int(time.monotonic() * 1000) & 0xFFFFFFFF):
            if self._serial is None:
                return
            self._command(f)
        self.stats["frames_abandoned"] += self._decoder.abandoned - before

    def _send(self, message: modem.Message) -> None:
        if self._serial is None:
            return
        try:
            self._serial.sendall(message.encode())
        except OSError:
            log.info("%s: firmware gone (serial write failed)", self.device)
            self._drop_serial(power_cut=True)

    def _drop_serial(self, power_cut: bool) -> None:
        """The firmware is gone. power_cut: the modem goes with it, the broker sees the connection drop and
        publishes the last will; else (the bridge stops) the modem disconnects cleanly. The serial goes first:
        the commands that fail with the connection have no firmware left to hear about it."""
        serial, self._serial = self._serial, None
        if serial is not None:
            try:
                serial.close()
            except OSError:
                pass
        self._end_mqtt(clean=not power_cut)
        self._out = None
        self._firmware_max_body = modem.MAX_BODY

    # --- commands --------------------------------------------------------------------------------------------
    def _command(self, f: modem.Frame) -> None:
        self.stats["commands"] += 1
        try:
            cmd = modem.decode(f, modem.COMMANDS)
        except modem.Malformed as exc:
            log.warning("%s: bad command frame: %s", self.device, exc)
            unknown = f.type not in modem.COMMANDS
            if f.type != Type.TAKEN:
                self._send(modem.Error(f.ref, ErrorCode.UNKNOWN if unknown else ErrorCode.MALFORMED))
            return
        if isinstance(cmd, modem.Hello):
            if cmd.version != modem.VERSION:
                self._send(modem.Error(cmd.ref, ErrorCode.VERSION))
                return
            self._end_mqtt(clean=True)  # the firmware (re)started: the modem starts afresh
            self._out = None
            self._firmware_max_body = cmd.max_body
            self._send(modem.Info(cmd.ref, self.max_payload))
        elif isinstance(cmd, modem.Connect):
            self._end_mqtt(clean=True)
            try:
                self._connect(cmd)
            except OSError as exc:  # the device folder lost its certificate or password
                log.error("%s: cannot connect: %s", self.device, exc)
                self._send(modem.Error(cmd.ref, ErrorCode.REFUSED))
                return
            self._send(modem.Ok(cmd.ref))
        elif isinstance(cmd, modem.Subscribe):
            if not self._connected():
                self._send(modem.Error(cmd.ref, ErrorCode.NOT_CONNECTED))
                return
            self._pending[self._transport.subscribe(cmd.topic_filter)] = (Type.SUBSCRIBE, cmd.ref)
        elif isinstance(cmd, modem.Publish):
            if len(cmd.payload) > self.max_payload:
                self._send(modem.Error(cmd.ref, ErrorCode.TOO_LARGE))
            elif not self._connected():
                self._send(modem.Error(cmd.ref, ErrorCode.NOT_CONNECTED))
            else:
                mid = self._transport.publish(topics.Publish(cmd.topic, cmd.payload, cmd.retain))
                self._pending[mid] = (Type.PUBLISH, cmd.ref)
                self.stats["publishes"] += 1
        elif isinstance(cmd, modem.Disconnect):
            self._end_mqtt(clean=True)
            self._send(modem.Ok(cmd.ref))
        elif isinstance(cmd, modem.Taken):
            held = self._out
            if held is None or held.ref != cmd.ref:
                log.warning("%s: TAKEN %d, but %s is out", self.device, cmd.ref, held and held.ref)
                return
            self._out = None
            if held.generation == self._generation and self._transport is not None:
                held.ack()  # now the broker may forget it
            self._pump()

    def _connected(self) -> bool:
        return self._transport is not None and self._transport.connected.is_set()

    def _connect(self, cmd: modem.Connect) -> None:
        self._generation += 1
        gen = self._generation
        will = None
        if cmd.will_topic is not None:
            last_will = topics.Publish(cmd.will_topic, cmd.will_payload, cmd.will_retain)
            will = lambda: last_will  # noqa: E731
        transport = MqttTransport(
            self.broker_url, self.fleet_dir, self.device, cmd.client_id or self.device,
            on_connect=lambda: self._post("connected", gen),
            on_message=lambda topic, payload, ack: self._post("message", gen, topic, payload, ack),
            on_disconnect=lambda: self._post("disconnected", gen),
            on_result=lambda mid, ok: self._post("result", gen, mid, ok),
            will=will, keepalive=max(1, cmd.keepalive), backoff=self.backoff, clean_session=cmd.clean_session,
            reconnect=False, manual_ack=True).connect()
        self._transport = self.transport_wrapper(transport) if self.transport_wrapper else transport
        self.stats["mqtt_connects"] += 1

    def _end_mqtt(self, clean: bool) -> None:
        """Close the MQTT connection (clean: with DISCONNECT, the will is discarded; else cut it, as a power
        cut would). Commands waiting for the broker fail; the messages held are dropped unacknowledged, so the
        broker delivers them again on the next connect. A RECEIVE out at the firmware stays out until its
        TAKEN (or HELLO)."""
        transport, self._transport = self._transport, None
        self._generation += 1
        if transport is not None:
            if clean:
                transport.close()
            else:
                transport.kill()
        self._fail_pending()
        self._held.clear()

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for _, ref in pending.values():
            self._send(modem.Error(ref, ErrorCode.LOST))

    # --- MQTT events (posted by paho's thread) -------------------------------------------------------------
    def _handle_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            kind, gen = event[0], event[1]
            if gen != self._generation:
                continue  # of a connection already ended
            if kind == "connected":
                self.stats["mqtt_connected"] += 1
                self._send(modem.Connected(0, self._transport.session_present))
            elif kind == "disconnected":
                refused = self._transport.refused is not None
                self._end_mqtt(clean=True)  # its network thread has ended (reconnect=False): this releases it
                self._send(modem.Disconnected(0, DisconnectReason.REFUSED if refused else DisconnectReason.LOST))
            elif kind == "result":
                mid, ok = event[2], event[3]
                command, ref = self._pending.pop(mid, (None, 0))
                if command is None:
                    continue
                if not ok:
                    self._send(modem.Error(ref, ErrorCode.REFUSED))
                else:
                    self._send(modem.PubAck(ref) if command == Type.PUBLISH else modem.Ok(ref))
            elif kind == "message":
                self._held.append(_Held(gen, event[2], event[3], event[4]))
                self._pump()

    def _pump(self) -> None:
        """Send the next held message unless one is out; drop (and acknowledge) those the firmware cannot take."""
        while self._out is None and self._held and self._serial is not None:
            held = self._held.popleft()
            topic_len = len(held.topic.encode())
            body = modem.receive_body_bytes(topic_len, len(held.payload))
            if len(held.payload) > self.max_payload or body > self._firmware_max_body \
                    or topic_len > modem.MAX_TOPIC:
                log.warning("%s: dropped a %d-byte message on %s: larger than the firmware takes", self.device,
                            len(held.payload), held.topic)
                held.ack()
                self.stats["dropped"] += 1
                self._send(modem.Dropped(0, held.topic, len(held.payload)))
                continue
            self._delivery = self._delivery % 255 + 1
            held.ref = self._delivery
            self._out = held
            self.stats["receives"] += 1
            self._send(modem.Receive(held.ref, held.topic, held.payload))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtiny_device.bridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", required=True, help="mqtts://HOST:PORT (client certificate) or mqtt://HOST:PORT")
    parser.add_argument("--fleet-dir", required=True, help="the device's folder comes from FLEET_DIR/devices/NAME")
    parser.add_argument("--device", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="where the firmware's UART connects")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--max-payload", type=int, default=modem.DEFAULT_MAX_PAYLOAD,
                        help="the modem's MTU: largest MQTT payload of one PUBLISH or RECEIVE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        bridge = ModemBridge(args.broker, args.fleet_dir, args.device, host=args.host, port=args.port,
                             max_payload=args.max_payload)
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    print(f"modem for {args.device} on {bridge.host}:{bridge.port}", flush=True)
    try:
        bridge.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
