"""A fake FleetLink and clock for tests and benchmarks: devices and replies scripted in virtual time."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from fedtiny.protocol import topics
from fedtiny.protocol.coordinator import DeviceInfo, DeviceReply, Rejection


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


@dataclass
class SentTask:
    device: str
    round: int
    model_version: int
    global_state: dict | None  # what the coordinator handed the link: the whole integer state
    config: dict
    update: dict | None = None  # what the GLOBAL_UPDATE carries, as the real link decides it (None: no update)


@dataclass
class FakeLink:
    clock: FakeClock = field(default_factory=FakeClock)
    # called on every send_task; may schedule replies with link.schedule(...)
    on_task: Callable[[FakeLink, SentTask], None] | None = None
    sent: list[SentTask] = field(default_factory=list)
    _devices: dict[str, DeviceInfo] = field(default_factory=dict)
    _versions: dict[str, int] = field(default_factory=dict)  # version each device holds (JOIN says 0)
    _states: dict[int, dict] = field(default_factory=dict)  # states handed to send_task, by version
    _queue: list = field(default_factory=list)
    _order: itertools.count = field(default_factory=itertools.count)

    def start(self) -> FakeLink:
        return self

    def close(self) -> None:
        pass

    def add_device(self, name: str, online: bool = True) -> DeviceInfo:
        info = DeviceInfo(name, topics.name_id(name), 256 * 1024, b"", self.clock(), online)  # b"": no JOIN seen
        self._devices[name] = info
        self._versions[name] = 0
        return info

    def set_online(self, name: str, online: bool) -> None:
        self._devices[name] = replace(self._devices[name], online=online, last_seen=self.clock())

    def devices(self, seen_within: float | None = None) -> list[DeviceInfo]:
        now = self.clock()
        return [d for d in self._devices.values() if seen_within is None or now - d.last_seen <= seen_within]

    def send_task(self, device, round, model_version, global_state, config) -> int:
        """As CoordinatorLink: an update only if the device holds another version, with the buffers that changed
        since the one it holds (all of them when that state is unknown); the device then holds model_version."""
        update = None
        if global_state is not None:
            self._states[model_version] = {k: np.asarray(v).copy() for k, v in global_state.items()}
            held = self._versions.get(device)
            if held != model_version:
                base = self._states.get(held)
                update = {k: v for k, v in global_state.items()
                          if base is None or not np.array_equal(base[k], v)}
                self._versions[device] = model_version
        task = SentTask(device, round, model_version, global_state, dict(config), update)
        self.sent.append(task)
        if self.on_task is not None:
            self.on_task(self, task)
        return 60 + sum(np.asarray(v).nbytes for v in (update or {}).values())

    def schedule(self, reply: DeviceReply, delay: float = 0.0) -> None:
        heapq.heappush(self._queue, (self.clock() + delay, next(self._order), reply))

    def rejections(self) -> list[Rejection]:
        return []

    def durable_state(self) -> dict | None:
        return None  # nothing to forget: no envelopes, no seqs

    def restore(self, state: dict, status_streams: bool = True) -> None:
        pass

    def replies(self, timeout: float) -> list[DeviceReply]:
        """Replies due by now + timeout; virtual time moves to the first one due, or by the whole timeout."""
        horizon = self.clock() + timeout
        if self._queue and self._queue[0][0] <= horizon:
            self.clock.now = max(self.clock(), self._queue[0][0])
        else:
            self.clock.now = horizon
        out = []
        while self._queue and self._queue[0][0] <= self.clock():
            out.append(heapq.heappop(self._queue)[2])
            info = self._devices.get(out[-1].device)
            if info is not None:
                self._devices[info.device] = replace(info, last_seen=self.clock())
        return out


def make_reply(device: str, round_: int, version: int, delta: dict, num_examples: int = 10,
               metrics: dict | None = None, uplink_bytes: int = 100) -> DeviceReply:
    return DeviceReply(device, round_, version, delta, num_examples,
                       metrics if metrics is not None else {"loss": 1.0, "accuracy": 0.5}, uplink_bytes)
