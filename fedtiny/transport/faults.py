"""Network faults at the edge, for tests and simulations: a transport whose publishes can be dropped, delayed,
duplicated, reordered, or caught by a cut connection, each decided by a rule, so that a test states the
failure it means and a seed makes it repeat.

    FaultyTransport  wraps a transport's publish side (MqttTransport's interface); everything else is the
                     inner transport's
    chance           a rule that holds for a seeded random share of publishes

A rule is a function of the Publish (its topic and payload), so a fault can aim at one message kind, one
chunk or one moment of a test (`drop=lambda p: "/up/" in p.topic`), and a test may change a rule while the
transport runs (`agent.transport.drop = lambda p: False`).
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import Counter
from typing import Callable

from fedtiny.protocol.topics import Publish

Rule = Callable[[Publish], bool]


def never(publish: Publish) -> bool:
    return False


def chance(probability: float, seed: int = 0) -> Rule:
    """A rule true for a random `probability` share of the publishes it is asked about, the same ones for the
    same seed and the same sequence of publishes."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], not {probability}")
    rng = random.Random(seed)
    return lambda publish: rng.random() < probability


class FaultyTransport:
    """A transport (publish(Publish) -> id, wait_published(id, timeout), drop_connection(), ...) whose publishes
    suffer faults. Per publish, in this order:

        cut(p)          the connection is cut first, as a network failure would (inner.drop_connection());
                        the publish is then handed over as usual: the MQTT client sends it after its reconnect
        drop(p)         the publish is lost: nothing reaches the inner transport
        duplicate(p)    it goes out twice (what a QoS 1 redelivery looks like to the receiver)
        delay(p)        seconds it is held before it goes out; publishes behind it may overtake it
        reorder_window  N > 1: publishes collect until N are held, or the oldest has waited `reorder_hold`
                        seconds, and go out in a random order drawn from `seed`

    `publish` returns an id of this wrapper; `wait_published(id)` waits until the publish has gone out and then
    for the inner transport's answer (None for a dropped publish, at once). Held publishes are discarded by
    `close()` and `kill()`, as they would be lost when a device stops or loses power. `counts` tells how many
    publishes each fault took.
    """

    def __init__(self, inner, *, drop: Rule = never, delay: Callable[[Publish], float] = lambda p: 0.0,
                 duplicate: Rule = never, reorder_window: int = 0, reorder_hold: float = 0.5, cut: Rule = never,
                 seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        if reorder_window < 0 or reorder_hold <= 0:
            raise ValueError("reorder_window must be >= 0 and reorder_hold > 0")
        self.inner = inner
        self.drop, self.delay, self.duplicate, self.cut = drop, delay, duplicate, cut
        self.reorder_window, self.reorder_hold = reorder_window, reorder_hold
        self.rng = random.Random(seed)
        self.counts: Counter = Counter()  # cut, dropped, duplicated, delayed, reordered, sent, discarded
        self._clock = clock
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._sent: dict[int, int | None] = {}  # our id -> the inner transport's id (None: never sent)
        self._timers: list[tuple[float, int, int | None, Publish]] = []  # (due, order, our id, publish): a heap
        self._order = itertools.count()
        self._window: list[tuple[int | None, Publish]] = []
        self._window_due: float | None = None
        self._worker: threading.Thread | None = None
        self._closed = False

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (or a copy being made): no delegation to itself
            raise AttributeError(name)
        return getattr(self.inner, name)  # connected, connects, subscribe, start, drop_connection, v5, ...

    # --- the publish side ---------------------------------------------------------------------------------
    def publish(self, message: Publish) -> int:
        # the rules are the caller's code: asked outside the lock, once each, in the documented order
        cut = self.cut(message)
        if cut:
            self.inner.drop_connection()
        dropped = self.drop(message)
        copies = 0 if dropped else 1 + bool(self.duplicate(message))
        seconds = 0.0 if dropped else float(self.delay(message))
        with self._lock:
            wid = next(self._ids)
            self.counts["cut"] += cut
            if dropped:
                self.counts["dropped"] += 1
                self._sent[wid] = None
            self.counts["duplicated"] += copies == 2
            for copy in [wid, None][:copies]:  # the second copy's id is nobody's to wait for
                if seconds > 0:
                    self.counts["delayed"] += 1
                    heapq.heappush(self._timers, (self._clock() + seconds, next(self._order), copy, message))
                    self._start_worker()
                else:
                    self._release(copy, message)
            self._lock.notify_all()
        return wid

    def wait_published(self, wid: int, timeout: float = 10.0):
        """The inner transport's answer for the publish `wid` (None if it was dropped, discarded, or timed out)."""
        end = self._clock() + timeout
        with self._lock:
            self._lock.wait_for(lambda: wid in self._sent or self._closed, timeout)
            mid = self._sent.get(wid)
        if mid is None:
            return None
        return self.inner.wait_published(mid, max(0.0, end - self._clock()))

    def _release(self, wid: int | None, message: Publish) -> None:
        """A publish whose delay is over: out now, or into the reorder window (called holding the lock)."""
        if self.reorder_window <= 1:
            self._send(wid, message)
            return
        self._window.append((wid, message))
        if self._window_due is None:
            self._window_due = self._clock() + self.reorder_hold
            self._start_worker()
        if len(self._window) >= self.reorder_window:
            self._flush_window()

    def _flush_window(self) -> None:
        held, self._window, self._window_due = self._window, [], None
        order = list(range(len(held)))
        self.rng.shuffle(order)
        self.counts["reordered"] += sum(1 for i, j in enumerate(order) if i != j)
        for i in order:
            self._send(*held[i])

    def _send(self, wid: int | None, message: Publish) -> None:
        self.counts["sent"] += 1
        mid = self.inner.publish(message)
        if wid is not None:
            self._sent[wid] = mid
            if len(self._sent) > 4096:  # answers nobody waited for: forget the oldest
                del self._sent[next(iter(self._sent))]

    # --- held publishes -----------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self._worker is None and not self._closed:
            self._worker = threading.Thread(target=self._run, name="faulty-transport", daemon=True)
            self._worker.start()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    _, _, wid, message = heapq.heappop(self._timers)
                    self._release(wid, message)
                if self._window_due is not None and self._window_due <= now:
                    self._flush_window()
                dues = [t[0] for t in self._timers[:1]] + ([self._window_due] if self._window_due is not None else [])
                self._lock.notify_all()
                self._lock.wait(min(dues) - now if dues else None)

    def _discard(self) -> None:
        with self._lock:
            self._closed = True
            held = [t[2] for t in self._timers] + [w for w, _ in self._window]
            self.counts["discarded"] += len(held)
            self._timers, self._window, self._window_due = [], [], None
            for wid in held:
                if wid is not None:
                    self._sent[wid] = None
            self._lock.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(5)

    def close(self) -> None:
        self._discard()
        self.inner.close()

    def kill(self) -> None:
        self._discard()
        self.inner.kill()
