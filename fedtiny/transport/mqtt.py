"""MQTT at the edge of the protocol: a paho client in its own thread, and the coordinator's link to the fleet
built from it and a CoordinatorSession. No protocol logic lives here: sessions decide, this moves bytes.

    MqttTransport    paho in its own thread: TLS, MQTT 5 persistent session, TCP_NODELAY, reconnect with backoff
    CoordinatorLink  FleetLink over one MQTT connection to the whole fleet; thread-safe
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol import topics
from fedtiny.protocol.coordinator import CoordinatorSession, DeviceInfo, DeviceReply, Rejection
from fedtiny.protocol.envelope import Identity, PublicIdentity
from fedtiny.protocol.keys import REVOKED_FILE, revoked_devices
from fedtiny.protocol.topics import Publish

log = logging.getLogger("fedtiny.mqtt")


def load_fleet(fleet_dir: str | Path) -> dict:
    return json.loads((Path(fleet_dir) / "fleet.json").read_text())


def parse_broker_url(broker_url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of mqtt://HOST:PORT or mqtts://HOST:PORT; ValueError for anything else."""
    url = urlparse(broker_url)
    if url.scheme not in ("mqtt", "mqtts") or not url.hostname or not url.port:
        raise ValueError(f"broker_url must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {broker_url!r}")
    return url.hostname, url.port, url.scheme == "mqtts"


class MqttTransport:
    """A paho client in its own thread, nothing more: no protocol logic.

    mqtt://HOST:PORT is plain MQTT 3.1.1 (the embedded amqtt broker speaks only that), logged in with the
    identity's name and broker password; mqtts://HOST:PORT is TLS with the fleet CA and the identity's client
    certificate, MQTT 5. Both use a persistent session (MQTT 5 clean_start=False + Session Expiry; 3.1.1
    clean_session=False), QoS 1, TCP_NODELAY after every connect, and paho's reconnect with exponential
    backoff. `will()` returns the last will to register before each (re)connect. Callbacks run in paho's thread.

    A modem (fedtiny_device.bridge) drives it as a modem's MCU would: `clean_session`; `reconnect=False` (the
    first connect is still tried with backoff until the broker answers, but a connection that is lost or
    refused stays down: `on_disconnect()` tells, and `refused` holds the broker's refusal, if any);
    `manual_ack=True` (on_message gets a third argument, `ack()`, and the broker redelivers what was not
    acknowledged when the connection ends); `on_result(mid, ok)` for the broker's PUBACK and SUBACK.
    """

    def __init__(self, broker_url: str, fleet_dir: str | Path, name: str, client_id: str, *,
                 on_connect: Callable[[], None], on_message: Callable[..., None],
                 will: Callable[[], Publish] | None = None, session_expiry: int = 24 * 3600,
                 keepalive: int = 30, backoff: tuple[float, float] = (0.2, 10.0), clean_session: bool = False,
                 reconnect: bool = True, manual_ack: bool = False,
                 on_disconnect: Callable[[], None] | None = None,
                 on_result: Callable[[int, bool], None] | None = None) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.host, self.port, self.tls = parse_broker_url(broker_url)
        self.v5 = self.tls
        self.keepalive = keepalive
        self._on_connect_cb, self._on_message_cb, self._will = on_connect, on_message, will
        self._on_disconnect_cb, self._on_result_cb = on_disconnect, on_result
        self.clean_session = clean_session
        self.connected = threading.Event()
        self.connects = 0
        self.session_present = False
        self.refused: str | None = None  # the broker's reason when it refused the last connect
        self.publish_results: dict[int, object] = {}  # mid -> reason code (MQTT 5 tells "Not authorized")
        self._published = threading.Condition()
        self._reconnect = reconnect
        common = dict(client_id=client_id, manual_ack=manual_ack)
        if self.v5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, **common)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                 clean_session=clean_session, **common)
        folder = Path(fleet_dir) / ("coordinator" if name == topics.COORDINATOR_NAME else f"devices/{name}")
        if self.tls:
            client.tls_set(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"),
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        else:  # the embedded broker (loopback only) logs clients in with the fleet's password file
            client.username_pw_set(name, (folder / "password").read_text())
        client.reconnect_delay_set(*backoff)
        client.max_inflight_messages_set(100)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        if manual_ack:
            client.on_message = lambda c, u, m: self._on_message_cb(m.topic, bytes(m.payload),
                                                                    lambda: c.ack(m.mid, m.qos))
        else:
            client.on_message = lambda c, u, m: self._on_message_cb(m.topic, bytes(m.payload))
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self.session_expiry = session_expiry
        self.client = client

    def _set_will(self) -> None:
        if self._will is not None:
            will = self._will()
            self.client.will_set(will.topic, will.payload, qos=1, retain=will.retain)

    def connect(self) -> MqttTransport:
        """Start connecting in paho's thread and return at once (on_connect tells when it is up)."""
        self._set_will()
        kwargs = {}
        if self.v5:
            props = self._mqtt.Properties(self._mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            kwargs = {"clean_start": self.clean_session, "properties": props}
        self.client.connect_async(self.host, self.port, self.keepalive, **kwargs)
        self.client.loop_start()
        return self

    def start(self, timeout: float = 10.0) -> MqttTransport:
        self.connect()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise TimeoutError(f"could not connect to {self.host}:{self.port}")
        return self

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("connect refused: %s", reason_code)
            self.refused = str(reason_code)
            return
        self.refused = None
        self.session_present = bool(flags.session_present)
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        self.connected.set()
        self._on_connect_cb()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._reconnect:
            # paho's reconnect_on_failure=False would also end the retries of the first connect; disconnect()
            # in a callback ends paho's loop after this connection only
            client.disconnect()
        self._set_will()  # the next connect registers a fresh (round, seq) will
        if self._on_disconnect_cb is not None:
            self._on_disconnect_cb()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._published:
            self.publish_results[mid] = reason_code
            self._published.notify_all()
        if self._on_result_cb is not None:
            self._on_result_cb(mid, not reason_code.is_failure)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if self._on_result_cb is not None:
            self._on_result_cb(mid, not any(code.is_failure for code in reason_codes))

    def subscribe(self, *topic_filters: str) -> int:
        """Subscribe at QoS 1; returns the message id the SUBACK answers (on_result)."""
        return self.client.subscribe([(t, 1) for t in topic_filters])[1]

    def publish(self, message: Publish) -> int:
        """Queue a QoS 1 publish (paho sends it now, or after the reconnect); returns the message id."""
        return self.client.publish(message.topic, message.payload, qos=1, retain=message.retain).mid

    def wait_published(self, mid: int, timeout: float = 10.0):
        """The broker's PUBACK reason code for `mid` (None on timeout)."""
        with self._published:
            self._published.wait_for(lambda: mid in self.publish_results, timeout)
            return self.publish_results.get(mid)

    def drop_connection(self) -> None:
        """Tests: cut the TCP connection as a network failure would (paho then reconnects)."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kill(self) -> None:
        """Tests: vanish without DISCONNECT (the broker then publishes the last will)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self.connected.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()


class CoordinatorLink:
    """The coordinator's single MQTT connection to the fleet (docs/fleet_link.md): a CoordinatorSession fed by
    an MqttTransport. Thread-safe: paho's thread delivers messages, the coordinator's thread sends tasks and
    takes replies. `save(state)` persists the session's durable state (seq reservations, run) synchronously;
    the coordinator also checkpoints `durable_state()` with every round."""

    def __init__(self, broker_url: str, fleet_dir: str | Path, plan: Plan, *, fleet: str, chunk_size: int = 4096,
                 client_id: str = "coordinator", save: Callable[[dict], None] = lambda state: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._folder = Path(fleet_dir) / "coordinator"  # all the coordinator reads (fedtiny keys' layout)
        manifest = load_fleet(self._folder)
        if manifest["fleet"] != fleet:
            raise ValueError(f"{fleet_dir} holds fleet {manifest['fleet']!r}, not {fleet!r}")
        identity = Identity.from_bytes((self._folder / "identity.key").read_bytes())
        peers = {name: PublicIdentity.from_bytes(bytes.fromhex(v["public"]))
                 for name, v in manifest["devices"].items()}
        self.session = CoordinatorSession(plan, fleet, manifest["fleet_id"], identity, peers, chunk_size=chunk_size,
                                          save=save, revoked=revoked_devices(self._folder))
        self._revoked_stamp = self._stamp()
        self.fleet = fleet
        self._clock = clock
        self._lock = threading.RLock()
        self._replies_ready = threading.Condition(self._lock)
        self._replies: list[DeviceReply] = []
        self._transport = MqttTransport(broker_url, fleet_dir, topics.COORDINATOR_NAME, client_id,
                                        on_connect=self._connected, on_message=self._on_message)

    @property
    def stats(self):
        return self.session.stats

    def start(self) -> CoordinatorLink:
        self._transport.start()
        return self

    def close(self) -> None:
        self._transport.close()

    def _connected(self) -> None:
        self._transport.subscribe(f"{topics.ROOT}/{self.fleet}/up/+", f"{topics.ROOT}/{self.fleet}/status/+")

    def _on_message(self, topic: str, frame: bytes) -> None:
        with self._lock:
            self._send(self.session.receive(topic, frame, self._clock()))
            replies = self.session.take_replies()
            if replies:
                self._replies += replies
                self._replies_ready.notify_all()

    def _send(self, publishes: list[Publish]) -> int:
        for p in publishes:
            self._transport.publish(p)
        return sum(len(p.payload) for p in publishes)

    def _stamp(self) -> int:
        return (self._folder / REVOKED_FILE).stat().st_mtime_ns

    def _reload_revocations(self) -> None:
        """`fedtiny keys --revoke` rewrote the denylist: refuse those devices from now on, without a restart."""
        stamp = self._stamp()
        if stamp != self._revoked_stamp:
            self._revoked_stamp = stamp
            for name in revoked_devices(self._folder):
                self.session.revoke(name)

    # --- FleetLink ---------------------------------------------------------------------------------------
    def devices(self, seen_within: float | None = None) -> list[DeviceInfo]:
        with self._lock:
            self._reload_revocations()  # once per round at least: the grid asks before it samples devices
            return self.session.devices(self._clock(), seen_within)

    def send_task(self, device: str, round: int, model_version: int,
                  global_state: dict[str, np.ndarray] | None, config: dict[str, float]) -> int:
        """TASK (after a GLOBAL_UPDATE if the device holds another version); returns the MQTT payload bytes."""
        with self._lock:
            nbytes = self._send(self.session.send_task(device, round, model_version, global_state, config))
            self.session.stats["downlink_bytes"] += nbytes
            return nbytes

    def replies(self, timeout: float) -> list[DeviceReply]:
        """Replies verified since the last call; waits up to `timeout` s for the first one if there is none."""
        with self._replies_ready:
            self._replies_ready.wait_for(lambda: self._replies, timeout)
            out, self._replies = self._replies, []
            return out

    def rejections(self) -> list[Rejection]:
        with self._lock:
            return self.session.take_rejections()

    # --- secure aggregation (fedtiny_server.secagg drives it; CoordinatorSession runs the stages) -------------
    def begin_secagg(self, round: int, model_version: int, devices: list[str], clip_norm: float,
                     noise_sigma: float = 0.0, min_survivors: int = 0) -> None:
        with self._lock:
            self.session.begin_secagg(round, model_version, devices, clip_norm, noise_sigma,
                                      min_survivors=min_survivors)

    def secagg_status(self, round: int) -> tuple[str, set[str]]:
        with self._lock:
            return self.session.secagg_status(round)

    def secagg_close(self, round: int, admitted: set[str] | None = None) -> None:
        with self._lock:
            self.session.stats["downlink_bytes"] += self._send(self.session.secagg_close(round, admitted))

    def secagg_outcomes(self) -> list:
        with self._lock:
            return self.session.take_secagg_outcomes()

    def durable_state(self) -> dict:
        with self._lock:
            return self.session.durable_state()

    def restore(self, state: dict, status_streams: bool = True) -> None:
        with self._lock:
            self.session.restore(state, status_streams)
