"""The embedded amqtt broker enforces what mosquitto enforces for a provisioned fleet: login with the fleet's
password file, the fleet's ACL on publish, subscribe, delivery and last will, no other device's retained
messages; and it survives what broke amqtt 0.11.4 (50 clients at once, quick reconnects, failed logins)."""

import logging
import queue
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from conftest import require_tool

from fedtiny.protocol import acl, topics
from fedtiny.protocol.amqtt_fleet import _Subscriptions
from fedtiny.protocol.brokers import EmbeddedBroker
from fedtiny.protocol.keys import check_mosquitto_password, mosquitto_password_line, provision_fleet

FLEET = "lab"
DEVICES = [f"node{i:03d}" for i in range(50)]
REFUSED = 0x80  # SUBACK return code
QUIET = 0.5  # seconds to wait for a message that must not come


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "keys"
    provision_fleet(out, FLEET, DEVICES)
    return out


@pytest.fixture(scope="module")
def broker(fleet_dir):
    with EmbeddedBroker(fleet_dir) as broker:
        yield broker


def password_of(fleet_dir, name):
    return (fleet_dir / ("coordinator" if name == topics.COORDINATOR_NAME else f"devices/{name}") / "password").read_text()


class Peer:
    """A paho MQTT 3.1.1 client of the embedded broker (logged in as `name` with its own password unless
    told otherwise); what it receives lands in queues."""

    def __init__(self, broker, fleet_dir, name, *, password="own", client_id=None, clean=True, will=None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or name, clean_session=clean,
                                  reconnect_on_failure=False)  # a refused client must not retry during the test
        if name is not None:
            self.client.username_pw_set(name, password_of(fleet_dir, name) if password == "own" else password)
        if will is not None:
            self.client.will_set(*will)
        self.connacks, self.inbox, self.subacks = queue.Queue(), queue.Queue(), queue.Queue()
        self.closed = threading.Event()
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.closed.set()
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put([rc.value for rc in codes])
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def accepted(self, timeout=5.0) -> bool:
        """True on a successful CONNACK; False when the broker refuses (amqtt 0.11.4 closes without a CONNACK)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return not self.connacks.get(timeout=0.05).is_failure
            except queue.Empty:
                if self.closed.is_set():
                    return False
        raise AssertionError("neither accepted nor refused")

    def subscribe(self, *filters) -> list[int]:
        self.client.subscribe([(f, 1) for f in filters])
        return self.subacks.get(timeout=5)

    def publish(self, topic, payload, retain=False):
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def next(self, timeout=5.0) -> tuple[str, bytes] | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def received(self, wait=QUIET) -> list[tuple[str, bytes]]:
        """Everything received until nothing more came for `wait` seconds."""
        messages = []
        while True:
            try:
                messages.append(self.inbox.get(timeout=wait))
            except queue.Empty:
                return messages

    def kill(self):
        """Vanish without DISCONNECT, so that the broker publishes the last will."""
        sock = self.client.socket()
        self.client.loop_stop()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# --- login -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("username, password", [
    (None, None),  # anonymous
    ("node000", "wrong"),
    ("node000", "node001's"),
    ("stranger", "anything"),
])
def test_a_client_without_its_fleet_password_is_refused(broker, fleet_dir, username, password):
    password = password_of(fleet_dir, "node001") if password == "node001's" else password
    refused = Peer(broker, fleet_dir, username, password=password, client_id=f"login-{username}")
    try:
        assert not refused.accepted()
    finally:
        refused.close()
    own = Peer(broker, fleet_dir, "node000", client_id="login-node000")  # the same broker admits the real one
    assert own.accepted()
    own.close()


def test_our_password_check_reads_what_mosquitto_passwd_writes(tmp_path):
    tool = require_tool("mosquitto_passwd")
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run([tool, "-b", str(passwd), "node000", "s3cret pass"], check=True)
    _, entry = passwd.read_text().strip().split(":", 1)
    assert check_mosquitto_password(entry, "s3cret pass")
    assert not check_mosquitto_password(entry, "s3cret pasS")


def test_password_check_refuses_other_and_malformed_entries():
    _, entry = mosquitto_password_line("node000", "pw").split(":", 1)
    assert check_mosquitto_password(entry, "pw") and not check_mosquitto_password(entry, "pw2")
    iterations, salt, _ = entry.split("$")[2:]
    for bad in (f"$7${iterations}${salt}$", f"$6${iterations}${salt}$AAAA", f"$7$0${salt}$AAAA", "$7$x$y$z", "", "pw"):
        assert not check_mosquitto_password(bad, "pw"), bad


# --- the ACL -----------------------------------------------------------------------------------------------

def test_a_device_cannot_publish_on_another_devices_topics(broker, fleet_dir):
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="pub-coordinator")
    node000 = Peer(broker, fleet_dir, "node000", client_id="pub-node000")
    try:
        assert coordinator.accepted() and node000.accepted()
        assert coordinator.subscribe(f"fedtiny/{FLEET}/up/+", f"fedtiny/{FLEET}/status/+") == [1, 1]
        node000.publish(topics.uplink(FLEET, "node001"), b"spoofed uplink")  # PUBACKed all the same (3.1.1)
        node000.publish(topics.status(FLEET, "node001"), b"spoofed status", retain=True)
        node000.publish(topics.downlink(FLEET, "node001"), b"spoofed downlink")
        node000.publish(topics.uplink(FLEET, "node000"), b"own uplink")
        assert coordinator.received() == [(topics.uplink(FLEET, "node000"), b"own uplink")]
    finally:
        node000.close()
        coordinator.close()


def test_a_device_cannot_subscribe_to_another_devices_downlink_or_to_everything(broker, fleet_dir):
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="sub-coordinator")
    node000 = Peer(broker, fleet_dir, "node000", client_id="sub-node000")
    node001 = Peer(broker, fleet_dir, "node001", client_id="sub-node001")
    try:
        assert coordinator.accepted() and node000.accepted() and node001.accepted()
        refused = [topics.downlink(FLEET, "node001"), "fedtiny/#", "#", f"fedtiny/{FLEET}/+",
                   f"fedtiny/{FLEET}/down/+", f"fedtiny/{FLEET}/up/+", f"fedtiny/{FLEET}/status/+"]
        assert node000.subscribe(*refused) == [REFUSED] * len(refused)
        assert node000.subscribe(topics.downlink(FLEET, "node000"), topics.broadcast(FLEET)) == [1, 1]
        assert node001.subscribe(topics.downlink(FLEET, "node001")) == [1]
        coordinator.publish(topics.downlink(FLEET, "node001"), b"for node001 only")
        assert node001.received() == [(topics.downlink(FLEET, "node001"), b"for node001 only")]
        assert node000.received() == []
    finally:
        for peer in (node001, node000, coordinator):
            peer.close()


def test_a_last_will_on_another_devices_topic_is_refused(broker, fleet_dir):
    forged = Peer(broker, fleet_dir, "node000", client_id="will-node000",
                  will=(topics.status(FLEET, "node001"), b"node001 is offline", 1, True))
    own = Peer(broker, fleet_dir, "node000", client_id="will-node000-own",
               will=(topics.status(FLEET, "node000"), b"node000 is offline", 1, True))
    try:
        assert not forged.accepted()
        assert own.accepted()
    finally:
        forged.close()
        own.close()


def test_no_device_gets_another_devices_retained_status(broker, fleet_dir):
    node001 = Peer(broker, fleet_dir, "node001", client_id="retained-node001")
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="retained-coordinator")
    try:
        assert node001.accepted() and coordinator.accepted()
        node001.publish(topics.status(FLEET, "node001"), b"node001 online", retain=True)
        coordinator.publish(topics.broadcast(FLEET), b"round 1", retain=True)
        # The coordinator's status/+ is a filter amqtt 0.11.4 matched retained messages against for every client.
        assert coordinator.subscribe(f"fedtiny/{FLEET}/status/+") == [1]
        assert (topics.status(FLEET, "node001"), b"node001 online") in coordinator.received()
        for clean in (True, False):
            node000 = Peer(broker, fleet_dir, "node000", client_id="retained-node000", clean=clean)
            assert node000.accepted()
            assert node000.subscribe(topics.downlink(FLEET, "node000"), topics.broadcast(FLEET)) == [1, 1]
            assert node000.received() == [(topics.broadcast(FLEET), b"round 1")]
            node000.close()
    finally:
        coordinator.publish(topics.broadcast(FLEET), b"", retain=True)  # clear what this test retained
        node001.publish(topics.status(FLEET, "node001"), b"", retain=True)
        coordinator.close()
        node001.close()


def test_acl_rules():
    device, coordinator = "node000", topics.COORDINATOR_NAME
    assert acl.allows(FLEET, device, "write", topics.uplink(FLEET, device))
    assert acl.allows(FLEET, device, "write", topics.status(FLEET, device))
    assert acl.allows(FLEET, device, "read", topics.downlink(FLEET, device))
    assert acl.allows(FLEET, device, "read", topics.broadcast(FLEET))
    assert not acl.allows(FLEET, device, "write", topics.uplink(FLEET, "node001"))
    assert not acl.allows(FLEET, device, "write", topics.broadcast(FLEET))
    assert not acl.allows(FLEET, device, "read", topics.uplink(FLEET, device))
    assert not acl.allows(FLEET, device, "read", f"fedtiny/{FLEET}/down/#")
    assert not acl.allows(FLEET, device, "write", topics.uplink("other", device))  # another fleet
    assert not acl.allows(FLEET, "node+", "read", f"fedtiny/{FLEET}/down/+")  # a wildcard name widens nothing
    assert acl.allows(FLEET, coordinator, "read", f"fedtiny/{FLEET}/up/+")
    assert acl.allows(FLEET, coordinator, "read", f"fedtiny/{FLEET}/status/#")
    assert acl.allows(FLEET, coordinator, "write", topics.downlink(FLEET, device))
    assert acl.allows(FLEET, coordinator, "write", topics.broadcast(FLEET))
    assert not acl.allows(FLEET, coordinator, "read", "fedtiny/#")
    assert not acl.allows(FLEET, coordinator, "write", topics.uplink(FLEET, device))
    assert not acl.allows(FLEET, coordinator, "write", topics.downlink("other", device))
    assert acl.mosquitto_acl_text(FLEET).count(f"pattern read fedtiny/{FLEET}/down/%u") == 1


# --- what broke amqtt 0.11.4 -------------------------------------------------------------------------------

def test_a_failed_login_leaves_the_existing_session_of_its_client_id_alone(broker, fleet_dir):
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="hijack-coordinator")
    node001 = Peer(broker, fleet_dir, "node001", client_id="hijack-node001", clean=False,
                   will=(topics.status(FLEET, "node001"), b"node001's own will", 1, False))
    try:
        assert coordinator.accepted() and node001.accepted()
        assert coordinator.subscribe(f"fedtiny/{FLEET}/status/+") == [1]
        assert node001.subscribe(topics.downlink(FLEET, "node001")) == [1]
        forged_will = (topics.status(FLEET, "node001"), b"forged will", 1, False)
        for name, password, clean in [("node001", "wrong", True), ("node001", "wrong", False),
                                      ("node000", "own", False), ("node000", "own", True)]:
            # amqtt deleted (clean) or rewrote (persistent) the session before checking the password; and
            # node000 must neither resume nor take over node001's session.
            intruder = Peer(broker, fleet_dir, name, password=password, client_id="hijack-node001", clean=clean,
                            will=forged_will)
            assert not intruder.accepted()
            intruder.close()
        coordinator.publish(topics.downlink(FLEET, "node001"), b"still yours")
        assert node001.received() == [(topics.downlink(FLEET, "node001"), b"still yours")]
        node001.kill()
        assert coordinator.received() == [(topics.status(FLEET, "node001"), b"node001's own will")]
    finally:
        coordinator.close()


def test_a_device_reconnecting_at_once_keeps_getting_its_downlinks(broker, fleet_dir):
    """A persistent session taken over by a new connection before the broker saw the old one close: amqtt
    then marked it disconnected and queued its messages (about one reconnect in three here)."""
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="takeover-coordinator")
    assert coordinator.accepted()
    lost = []
    try:
        for attempt in range(20):
            node000 = Peer(broker, fleet_dir, "node000", client_id="takeover-node000", clean=False)
            assert node000.accepted()
            assert node000.subscribe(topics.downlink(FLEET, "node000")) == [1]
            coordinator.publish(topics.downlink(FLEET, "node000"), str(attempt).encode())
            if node000.next(2.0) != (topics.downlink(FLEET, "node000"), str(attempt).encode()):
                lost.append(attempt)
            node000.close()  # DISCONNECT, and the next connect follows at once
    finally:
        coordinator.close()
    assert lost == []


def test_fifty_devices_connecting_at_once(broker, fleet_dir, caplog):
    """Issue #17: amqtt 0.11.4 raised "dictionary changed size during iteration" in client_connected_cb (that
    client's messages were then never handled) or in a broadcast; and handed each new client the retained
    STATUS of the others."""
    caplog.set_level(logging.WARNING, logger="fedtiny.brokers")
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="burst-coordinator")
    assert coordinator.accepted()
    assert coordinator.subscribe(f"fedtiny/{FLEET}/status/+") == [1]
    devices, failures = {}, []

    def run(name):
        try:
            peer = Peer(broker, fleet_dir, name, client_id=f"burst-{name}")
            devices[name] = peer
            assert peer.accepted()
            peer.publish(topics.status(FLEET, name), f"{name} online".encode(), retain=True)
            assert peer.subscribe(topics.downlink(FLEET, name)) == [1]
        except Exception as exc:  # reported below, with the device's name
            failures.append((name, exc))

    threads = [threading.Thread(target=run, args=(name,)) for name in DEVICES]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == []
        for name in DEVICES:
            coordinator.publish(topics.downlink(FLEET, name), name.encode())
        for name, peer in devices.items():
            assert peer.next() == (topics.downlink(FLEET, name), name.encode()), name
        time.sleep(QUIET)
        assert {name: peer.inbox.qsize() for name, peer in devices.items() if not peer.inbox.empty()} == {}
        assert [r.getMessage() for r in caplog.records if r.name == "fedtiny.brokers"] == []
        statuses = {topic for topic, _ in coordinator.received(0.2)}
        assert statuses == {topics.status(FLEET, name) for name in DEVICES}
    finally:
        for name, peer in devices.items():
            peer.publish(topics.status(FLEET, name), b"", retain=True)
            peer.close()
        coordinator.close()


def test_subscription_table_survives_changes_while_walked():
    coordinator, old_session = object(), object()
    subscriptions = _Subscriptions({"fedtiny/lab/status/+": [(old_session, 1), (coordinator, 1)]})
    for _ in subscriptions:
        subscriptions["fedtiny/lab/down/node000"] = []  # a client subscribes meanwhile
    walked = []
    for _, subscribers in subscriptions.items():
        for session, _ in subscribers:
            walked.append(session)
            if session is old_session:
                subscriptions["fedtiny/lab/status/+"].pop(0)  # amqtt removes a session's subscription meanwhile
            subscriptions["fedtiny/lab/up/+"] = []
    assert walked == [old_session, coordinator]


def test_an_exception_inside_the_broker_is_one_log_line_not_a_traceback(broker, caplog, capfd):
    caplog.set_level(logging.WARNING)
    done = threading.Event()

    def fails():
        done.set()
        raise ZeroDivisionError("inside amqtt")

    broker._loop.call_soon_threadsafe(fails)  # what asyncio does with an exception no task of amqtt handled
    assert done.wait(5)
    time.sleep(0.1)
    records = [(r.name, r.getMessage()) for r in caplog.records]
    assert [name for name, _ in records] == ["fedtiny.brokers"]
    assert "ZeroDivisionError('inside amqtt')" in records[0][1] and "\n" not in records[0][1]
    assert "Traceback" not in capfd.readouterr().err


def test_stopping_the_broker_leaves_no_coroutine_to_complain_later(fleet_dir, monkeypatch):
    """Stopped with deliveries in flight, amqtt leaves tasks behind; closing the loop over them made Python print
    "Exception ignored in: <coroutine ...>" tracebacks when it collected them."""
    import gc
    import sys

    complaints = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: complaints.append(repr(unraisable.object)))
    broker = EmbeddedBroker(fleet_dir).start()
    coordinator = Peer(broker, fleet_dir, "coordinator", client_id="stop-coordinator")
    node000 = Peer(broker, fleet_dir, "node000", client_id="stop-node000")
    assert coordinator.accepted() and node000.accepted()
    assert coordinator.subscribe(f"fedtiny/{FLEET}/up/+") == [1]
    for _ in range(30):
        node000.client.publish(topics.uplink(FLEET, "node000"), b"in flight", qos=1)
    try:
        broker.stop(timeout=2)
    except TimeoutError:
        pass  # amqtt 0.11.4 can take longer to shut down with deliveries in flight; the loop is closed all the same
    finally:
        node000.client.loop_stop()
        coordinator.client.loop_stop()
    assert not broker._thread.is_alive()
    gc.collect()
    assert complaints == []
