"""FaultyTransport, each fault kind on its own, against a recording transport (no broker)."""

import threading
import time

import pytest

from fedtiny.protocol.topics import Publish
from fedtiny.transport.faults import FaultyTransport, chance


class RecordingTransport:
    """MqttTransport's interface, recording what reaches it: publish -> mid, wait_published, drop_connection."""

    def __init__(self):
        self.sent: list[tuple[float, Publish]] = []
        self.events: list[str] = []  # "publish <payload>" and "cut", in order
        self.connected = threading.Event()
        self.closed = self.killed = False
        self._lock = threading.Lock()

    def publish(self, message: Publish) -> int:
        with self._lock:
            self.sent.append((time.monotonic(), message))
            self.events.append(f"publish {message.payload.decode()}")
            return 1000 + len(self.sent)

    def wait_published(self, mid: int, timeout: float = 10.0):
        return f"puback {mid}"

    def drop_connection(self) -> None:
        self.events.append("cut")

    def close(self) -> None:
        self.closed = True

    def kill(self) -> None:
        self.killed = True

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [p.payload for _, p in self.sent]


def msg(i: int, topic: str = "fedtiny/f/up/d") -> Publish:
    return Publish(topic, str(i).encode())


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_without_faults_publishes_pass_through_in_order():
    inner = RecordingTransport()
    faulty = FaultyTransport(inner)
    ids = [faulty.publish(msg(i)) for i in range(5)]
    assert inner.payloads() == [b"0", b"1", b"2", b"3", b"4"]
    assert faulty.wait_published(ids[2]) == "puback 1003"
    assert faulty.connected is inner.connected  # the rest is the inner transport's
    assert faulty.counts["sent"] == 5 and not faulty.counts["dropped"]


def test_drop_loses_what_the_rule_picks_and_says_so_at_once():
    inner = RecordingTransport()
    faulty = FaultyTransport(inner, drop=lambda p: "/up/" in p.topic)
    lost = faulty.publish(msg(1))
    kept = faulty.publish(msg(2, "fedtiny/f/status/d"))
    assert inner.payloads() == [b"2"]
    started = time.monotonic()
    assert faulty.wait_published(lost, timeout=5.0) is None
    assert time.monotonic() - started < 1.0  # a dropped publish does not wait for its timeout
    assert faulty.wait_published(kept) == "puback 1001"
    faulty.drop = lambda p: False  # a test may change a rule while the transport runs
    faulty.publish(msg(3))
    assert inner.payloads() == [b"2", b"3"] and faulty.counts["dropped"] == 1


def test_duplicate_sends_two_copies():
    inner = RecordingTransport()
    faulty = FaultyTransport(inner, duplicate=lambda p: p.payload == b"1")
    for i in range(3):
        faulty.publish(msg(i))
    assert inner.payloads() == [b"0", b"1", b"1", b"2"]
    assert faulty.counts["duplicated"] == 1


def test_delay_holds_a_publish_and_lets_later_ones_overtake_it():
    inner = RecordingTransport()
    faulty = FaultyTransport(inner, delay=lambda p: 0.3 if p.payload == b"0" else 0.0)
    start = time.monotonic()
    first = faulty.publish(msg(0))
    faulty.publish(msg(1))
    assert inner.payloads() == [b"1"]
    assert faulty.wait_published(first, timeout=5.0) == "puback 1002"
    assert inner.payloads() == [b"1", b"0"]
    assert inner.sent[1][0] - start >= 0.3
    assert faulty.counts["delayed"] == 1


def test_reorder_window_shuffles_by_seed_and_loses_nothing():
    def run(seed, n=8, window=4):
        inner = RecordingTransport()
        faulty = FaultyTransport(inner, reorder_window=window, seed=seed)
        for i in range(n):
            faulty.publish(msg(i))
        return inner.payloads(), faulty

    orders = {seed: run(seed)[0] for seed in range(6)}
    for order in orders.values():
        assert sorted(order) == [str(i).encode() for i in range(8)]
        assert sorted(order[:4]) == [b"0", b"1", b"2", b"3"]  # a window's publishes go out together
    assert run(3)[0] == orders[3], "the same seed gives the same order"
    assert len(set(map(tuple, orders.values()))) > 1 and any(o != sorted(o) for o in orders.values())
    # fewer publishes than the window: they still go out after reorder_hold
    inner = RecordingTransport()
    faulty = FaultyTransport(inner, reorder_window=10, reorder_hold=0.2, seed=1)
    ids = [faulty.publish(msg(i)) for i in range(3)]
    assert inner.payloads() == []
    assert faulty.wait_published(ids[0], timeout=5.0) is not None
    assert sorted(inner.payloads()) == [b"0", b"1", b"2"]


def test_cut_drops_the_connection_before_the_publish_goes_out():
    inner = RecordingTransport()
    faulty = FaultyTransport(inner, cut=lambda p: p.payload == b"1")
    for i in range(3):
        faulty.publish(msg(i))
    assert inner.events == ["publish 0", "cut", "publish 1", "publish 2"]
    assert faulty.counts["cut"] == 1


def test_chance_is_a_seeded_share():
    rule_a, rule_b = chance(0.3, seed=5), chance(0.3, seed=5)
    a = [rule_a(msg(i)) for i in range(2000)]
    assert a == [rule_b(msg(i)) for i in range(2000)]
    assert 0.25 < sum(a) / len(a) < 0.35
    rule_c = chance(0.3, seed=6)
    assert a != [rule_c(msg(i)) for i in range(2000)], "another seed picks other publishes"
    assert not any(chance(0.0)(msg(i)) for i in range(100)) and all(chance(1.0)(msg(i)) for i in range(100))
    with pytest.raises(ValueError, match="probability"):
        chance(1.5)


def test_close_and_kill_discard_held_publishes():
    for stop in ("close", "kill"):
        inner = RecordingTransport()
        faulty = FaultyTransport(inner, delay=lambda p: 30.0)
        held = faulty.publish(msg(0))
        getattr(faulty, stop)()
        assert faulty.wait_published(held, timeout=5.0) is None
        assert inner.payloads() == [] and faulty.counts["discarded"] == 1
        assert inner.closed if stop == "close" else inner.killed
