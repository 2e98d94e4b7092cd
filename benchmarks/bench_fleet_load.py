"""Load: N light devices through mosquitto to one coordinator, R rounds, every update accounted for.

    python benchmarks/bench_fleet_load.py [--devices 100 1000] [--rounds 5] [--workers 0] [--persist memory]
                                          [--deadline 120] [--no-write]

One run per fleet size N, on loopback:
- the fleet's keys from keys.provision_fleet (as `fedtiny keys`): a signing identity and a TLS client
  certificate per device, the CA, the broker's password file and ACL;
- mosquitto with brokers.mosquitto_config: TLS 1.2, client certificates required, the certificate's CN as the
  username, the fleet's ACL;
- the coordinator in this process: the real server (fedtiny_server.rounds.Coordinator: a FleetGrid, Flower's
  FedAvg, the SQLite StateStore) over a CoordinatorLink (mqtts), which saves its seq reservations in the store;
- N light devices in W worker processes. Each is a real DeviceSession with the device's own keys and its own
  paho client (MqttTransport with the device's certificate, so the broker authenticates it and applies the ACL
  to it); one thread per worker feeds all its sessions. Instead of training, a device answers each TrainJob
  with the job's base plus a small deterministic change (light_result), so no trainer runs; everything after
  training is the real thing: update.uplink, the envelope, chunks, ACKs, the JOIN after each ACK, heartbeats.
  Device state stays in memory (the save callback only counts the saves), or with --persist disk is written as
  a NodeAgent writes it (device.save_state: one file per device, fsynced at every save).

Every update is accounted for: in every round all N devices answer, no reply is a duplicate, the link refuses
nothing (link.stats) and the grid rejects nothing, no device refuses a downlink, and every DELTA the
coordinator decoded equals what its device sent (per device and round, and the per-round sums).

Measured per round: wall seconds; CPU seconds of the coordinator's process (getrusage), split by thread from
/proc: its main thread (the Flower round: sampling, TASK and GLOBAL_UPDATE sealing, FleetGrid checks,
aggregation, SQLite) and the link's paho thread (reassembly, signature check, decryption, decoding, ACKs);
CPU seconds of mosquitto and of the device workers (/proc; their sessions' thread apart from paho's threads);
the main thread's wall seconds in send_task, SQLite writes and aggregation; MQTT payload bytes up (DELTA
transfers) and down (TASK and GLOBAL_UPDATE). Before the first round: CPU per second with nothing to do but
heartbeats. Memory: resident bytes per device in the workers (after the rounds, minus the worker's resident
size before its first device), and the coordinator's resident size.

W >= N / 330: paho's network loop uses select(), which cannot watch a file descriptor above 1023
(FD_SETSIZE). Each paho client holds three (its socket and the socketpair that wakes its loop), so one process
can host only about 330 clients (320 allowed here); past that paho's loop fails and reconnects forever. The default W is
ceil(N / 250).
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import hashlib
import math
import multiprocessing
import os
import pstats
import queue
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol import topics
from fedtiny.protocol.device import DeviceSession, NodeState, TrainJob, TrainResult, save_state
from fedtiny.protocol.envelope import DeviceEndpoint, Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import DeviceState
from fedtiny.protocol.update import state_delta
from fedtiny.transport.mqtt import MqttTransport, load_fleet

# Workers are spawned: they import this module again, so everything heavy (torch, flwr, the server) is imported
# inside the functions the coordinator's process runs, and a worker's memory is the devices' own.

FLEET = "load"
SECTION = "## Load: 1,000 devices through mosquitto to one coordinator (issue 11)"
CHUNK = 4096
DEVICES_PER_WORKER = 250  # the default share; MAX_DEVICES_PER_WORKER is paho's select() limit (module docstring)
MAX_DEVICES_PER_WORKER = 320
CHANGED_SHARE = 0.25  # of each buffer's elements a light device changes per round (a real round: 642 of 2276)
CONNECT_TIMEOUT_S = 10.0
HEARTBEAT_S = 30.0  # NodeAgent's default
IDLE_S = 5.0  # CPU is measured this long with every device joined, before the first round
ACK_TIMEOUT_S = 15.0  # NodeAgent's default


def device_name(index: int) -> str:
    return f"dev-{index:04d}"


# --- a light device ------------------------------------------------------------------------------------------

def light_result(job: TrainJob, index: int, seed: int = 0) -> TrainResult:
    """Instead of training: the job's base moved by a small deterministic change. A quarter of each buffer's
    elements move by 1-3 LSB: the same elements in the same direction on every device of a round (as devices
    training on similar data would move them, so that the global model moves and GLOBAL_UPDATEs carry
    something), by a size of the device's own; int8 weights stay in range."""
    shared = np.random.default_rng([seed, job.round])
    own = np.random.default_rng([seed, job.round, index])
    state = {}
    for name in sorted(job.base):
        base = np.asarray(job.base[name])
        moved = shared.random(base.shape) < CHANGED_SHARE
        sign = np.where(shared.random(base.shape) < 0.5, -1, 1)
        new = base.astype(np.int64) + moved * sign * own.integers(1, 4, base.shape)
        if base.dtype == np.int8:
            new = np.clip(new, -128, 127)
        state[name] = new.astype(base.dtype)
    return TrainResult(state, num_examples=32 + index % 32, loss=1.0 / job.round, accuracy=0.5,
                       rng_counter=job.round)


def sent_delta(job: TrainJob, result: TrainResult, carry_before: dict | None, carry_after: dict | None
               ) -> dict[str, np.ndarray]:
    """What the device's DELTA carries: this round's change plus the change carried in, minus the change carried
    on (update.split_uplink); int32 buffers modulo 2^32, as update.state_delta makes them. Without clipping, which
    the benchmark's TASKs do not ask for (update.uplink drops what clipping cuts)."""
    out = {}
    for name, d in state_delta(result.state, job.base).items():
        total = d.astype(np.int64)
        if carry_before is not None:
            total += np.asarray(carry_before[name]).astype(np.int64)
        if carry_after is not None:
            total -= np.asarray(carry_after[name]).astype(np.int64)
        out[name] = total.astype(d.dtype)
    return out


def digest(delta: dict[str, np.ndarray]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(delta):
        h.update(name.encode())
        h.update(np.ascontiguousarray(delta[name], np.int64).tobytes())
    return h.digest()


class LightDevice:
    """A DeviceSession with the device's keys and its own paho client; its worker's thread runs it."""

    def __init__(self, index: int, url: str, fleet_dir: Path, plan: Plan, manifest: dict, events: queue.Queue,
                 lock: threading.Lock, state_dir: Path | None) -> None:
        self.index = index
        self.name = name = device_name(index)
        folder = fleet_dir / "devices" / name
        endpoint = DeviceEndpoint(manifest["fleet_id"], manifest["devices"][name]["id"],
                                  Identity.from_bytes((folder / "identity.key").read_bytes()),
                                  PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))
        self.saves = 0
        self._state_path = None if state_dir is None else state_dir / f"{name}.node"
        self.session = DeviceSession(plan, name, FLEET, endpoint, NodeState(0, plan.initial_state(), 0), CHUNK,
                                     self._save, ACK_TIMEOUT_S, time.monotonic())
        self._lock = lock
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # round -> the delta its DELTA carried
        self.rejected: list[str] = []
        self.next_beat = time.monotonic() + HEARTBEAT_S
        self.transport = MqttTransport(url, fleet_dir, name, name, on_connect=lambda: events.put((index, None, b"")),
                                       on_message=lambda topic, payload: events.put((index, topic, payload)),
                                       will=self._will)

    def _save(self, state: NodeState) -> None:
        self.saves += 1
        if self._state_path is not None:
            save_state(self._state_path, state)

    def _will(self):
        with self._lock:
            return self.session.last_will(time.monotonic())

    def _send(self, publishes) -> None:
        for p in publishes:
            self.transport.publish(p)

    def handle(self, topic: str | None, payload: bytes, now: float) -> None:
        """A (re)connect (topic None) or a downlink message; trains and uploads when the session asks to."""
        if topic is None:
            self.transport.subscribe(topics.downlink(FLEET, self.name), topics.broadcast(FLEET))
            self._send(self.session.on_connect(now))
            job = self.session.pending_job()
        else:
            try:
                out, job = self.session.receive(topic, payload, now)
            except ProtocolError as exc:
                self.rejected.append(exc.reason)
                return
            self._send(out)
        if job is None:
            return
        self._send(self.session.heartbeat(now, DeviceState.TRAINING))  # as NodeAgent announces a round
        result = light_result(job, self.index)
        carry_before = self.session.state.carry
        self._send(self.session.complete(job, result, now))
        self.sent[job.round] = sent_delta(job, result, carry_before, self.session.state.carry)

    def tick(self, now: float) -> None:
        if now >= self.next_beat and self.transport.connected.is_set():
            self._send(self.session.heartbeat(now))
            self.next_beat = now + HEARTBEAT_S
        self._send(self.session.tick(now))


def _worker(slot: int, run_dir: str, indexes: list[int], url: str, persist: str, stop, reports,
            lifetime: float) -> None:
    """A worker process: connects its devices one by one, reports ready, serves them until `stop` is set (or its
    parent is gone, or `lifetime` seconds passed), then reports what each device sent and closes the
    connections."""
    from fedtiny.planfile import load_plan

    from fedtiny_server.ops import log_to

    devices: list[LightDevice] = []
    logs = contextlib.ExitStack()
    parent, end = os.getppid(), time.monotonic() + lifetime
    try:
        run = Path(run_dir)
        logs.enter_context(log_to(run / f"devices-{slot}.log", "fedtiny"))
        plan = load_plan(run / "plan.ftp")
        manifest = load_fleet(run / "fleet")
        state_dir = run / "state" if persist == "disk" else None
        rss_before = rss_bytes(os.getpid())
        events: queue.Queue = queue.Queue()
        lock = threading.Lock()
        started = time.perf_counter()
        for i in indexes:
            device = LightDevice(i, url, run / "fleet", plan, manifest, events, lock, state_dir)
            devices.append(device)
            device.transport.start(CONNECT_TIMEOUT_S)
        reports.put(("ready", slot, time.perf_counter() - started))
        by_index = {d.index: d for d in devices}
        next_tick = next_stop_check = time.monotonic()
        while True:
            try:
                index, topic, payload = events.get(timeout=0.2)
            except queue.Empty:
                index = None
            now = time.monotonic()
            with lock:
                if index is not None:
                    by_index[index].handle(topic, payload, now)
                if now >= next_tick:
                    for device in devices:
                        device.tick(now)
                    next_tick = now + 1.0
            if now >= next_stop_check:
                if stop.is_set() or os.getppid() != parent or now > end:
                    break
                next_stop_check = now + 0.2
        sums: dict[int, dict[str, np.ndarray]] = {}
        for device in devices:
            for rnd, delta in device.sent.items():
                total = sums.setdefault(rnd, {n: np.zeros(v.shape, np.int64) for n, v in delta.items()})
                for n, v in delta.items():
                    total[n] += v
        reports.put(("report", slot, dict(
            digests={(d.name, rnd): digest(delta) for d in devices for rnd, delta in d.sent.items()},
            sums=sums, rejected=Counter(r for d in devices for r in d.rejected),
            connects=sum(d.transport.connects for d in devices), saves=sum(d.saves for d in devices),
            resent_chunks=sum(d.session.resent_chunks for d in devices), devices=len(devices),
            rss_before=rss_before, rss_after=rss_bytes(os.getpid()), threads=threading.active_count(),
            highest_fd=max(int(fd) for fd in os.listdir("/proc/self/fd")))))
    except BaseException:
        reports.put(("error", slot, traceback.format_exc()))
    finally:
        for device in devices:
            device.transport.close()
        logs.close()


# --- /proc -------------------------------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or one of its threads), from /proc (10 ms resolution)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        text = Path(path).read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fsync_ms(directory: Path, repeats: int = 20) -> float:
    """Milliseconds of one 4 KiB write + fsync in `directory` (the median of `repeats`)."""
    path = directory / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            os.write(fd, bytes(4096))
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return 1000 * statistics.median(times)


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- the coordinator's side ----------------------------------------------------------------------------------

class RecordingLink:
    """The CoordinatorLink, keeping a reference to every reply it hands the coordinator (checked after the run)
    and timing send_task (TASK and GLOBAL_UPDATE: build, seal, hand to paho) in the coordinator's thread."""

    def __init__(self, link) -> None:
        self.link = link
        self.seen: list = []
        self.send_seconds = 0.0

    def replies(self, timeout: float):
        out = self.link.replies(timeout)
        self.seen += out
        return out

    def send_task(self, *args, **kwargs) -> int:
        t0 = time.perf_counter()
        try:
            return self.link.send_task(*args, **kwargs)
        finally:
            self.send_seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.link, name)


def timed_store(path: Path):
    """The coordinator's StateStore, timing its writes: every accepted reply is its own transaction, committed
    with fsync (synchronous=FULL), and every round one more."""
    from fedtiny_server.state import StateStore

    class TimedStore(StateStore):
        write_seconds = 0.0

        def accept_reply(self, reply) -> bool:
            t0 = time.perf_counter()
            try:
                return super().accept_reply(reply)
            finally:
                self.write_seconds += time.perf_counter() - t0

        def commit_round(self, *args, **kwargs) -> None:
            t0 = time.perf_counter()
            try:
                return super().commit_round(*args, **kwargs)
            finally:
                self.write_seconds += time.perf_counter() - t0

    return TimedStore(path)


@dataclass
class RoundRow:
    round: int
    replies: int
    seconds: float
    coordinator_cpu: float  # the whole process
    main_cpu: float  # its main thread: the Flower round
    link_cpu: float  # its link's paho thread: every uplink message
    broker_cpu: float
    devices_cpu: float  # all device processes
    sessions_cpu: float  # their main threads: the sessions and the light training (the rest: paho's threads)
    uplink_bytes: int
    downlink_bytes: int
    send_seconds: float  # of the main thread's wall time: send_task for every device
    store_seconds: float  # SQLite writes (accepted replies, the round's commit)
    aggregate_seconds: float  # the strategy's aggregate_train


@dataclass
class LoadResult:
    devices: int
    workers: int
    persist: str
    rounds: list[RoundRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    setup_seconds: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fsync_ms: float = 0.0  # one small write + fsync where the coordinator's SQLite file is
    idle: dict[str, float] = field(default_factory=dict)  # cores busy before the first round (heartbeats only)


def account(names: list[str], rounds: int, replies_per_round: list[int], sent: dict, sums: dict, received: list
            ) -> list[str]:
    """Every update accounted for, or the list of what is not. `sent`: (device, round) -> digest of the delta the
    device's DELTA carried; `sums`: round -> buffer -> the sum of those deltas over the devices; `received`: the
    DeviceReplies the link handed the coordinator."""
    problems = []
    n = len(names)
    for rnd, count in enumerate(replies_per_round, 1):
        if count != n:
            problems.append(f"round {rnd}: the coordinator aggregated {count} of {n} replies")
    keys = Counter((r.device, r.round) for r in received)
    duplicates = sorted(k for k, c in keys.items() if c > 1)
    if duplicates:
        problems.append(f"{len(duplicates)} replies received twice, e.g. {duplicates[0]}")
    expected = {(d, rnd) for d in names for rnd in range(1, rounds + 1)}
    for what, missing in (("sent by no device", set(keys) - set(sent)), ("never sent", expected - set(sent)),
                          ("sent, never received", set(sent) - set(keys))):
        if missing:
            problems.append(f"{len(missing)} updates {what}, e.g. {sorted(missing)[0]}")
    wrong = sorted((r.device, r.round) for r in received
                   if (r.device, r.round) in sent and digest(r.delta) != sent[(r.device, r.round)])
    if wrong:
        problems.append(f"{len(wrong)} decoded deltas differ from what their device sent, e.g. {wrong[0]}")
    received_sums: dict[int, dict[str, np.ndarray]] = {}
    for r in received:
        total = received_sums.setdefault(r.round, {k: np.zeros(np.shape(v), np.int64) for k, v in r.delta.items()})
        for k, v in r.delta.items():
            total[k] += np.asarray(v, np.int64)
    for rnd in range(1, rounds + 1):
        mine, theirs = received_sums.get(rnd, {}), sums.get(rnd, {})
        if set(mine) != set(theirs) or any(not np.array_equal(mine[k], theirs[k]) for k in mine):
            problems.append(f"round {rnd}: the sum of the decoded deltas differs from the sum the devices sent")
    return problems


def worker_count(devices: int, workers: int = 0) -> int:
    """The worker processes for a fleet: `workers`, or one per DEVICES_PER_WORKER devices when 0."""
    workers = workers or math.ceil(devices / DEVICES_PER_WORKER)
    if math.ceil(devices / workers) > MAX_DEVICES_PER_WORKER:
        raise ValueError(f"{devices} devices in {workers} worker processes: a process holds at most "
                         f"{MAX_DEVICES_PER_WORKER} paho clients (paho's loop uses select(), which stops at file "
                         f"descriptor 1023); use --workers {math.ceil(devices / MAX_DEVICES_PER_WORKER)} or more")
    return workers


def _thread_id(name: str) -> int:
    found = [t.native_id for t in threading.enumerate() if t.name == name]
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} threads named {name}")
    return found[0]


def _collect(reports, workers, kind: str, timeout: float) -> dict[int, object]:
    """One message of `kind` from every worker (an error report or a dead worker raises)."""
    out: dict[int, object] = {}
    end = time.monotonic() + timeout
    while len(out) < len(workers):
        try:
            what, slot, value = reports.get(timeout=min(1.0, max(0.01, end - time.monotonic())))
        except queue.Empty:
            dead = [w for i, w in enumerate(workers) if i not in out and not w.is_alive()]
            if dead:
                raise RuntimeError(f"a device worker died (exit code {dead[0].exitcode})") from None
            if time.monotonic() > end:
                raise TimeoutError(f"{len(workers) - len(out)} device workers sent no {kind} in {timeout:.0f} s") \
                    from None
            continue
        if what == "error":
            raise RuntimeError(f"device worker {slot} failed:\n{value}")
        if what == kind:
            out[slot] = value
    return out


def _wait_for_joins(link, names: set[str], timeout: float) -> float:
    """Until every device's JOIN was verified (its plan hash is in the registry); returns the seconds waited."""
    started = time.monotonic()
    while True:
        joined = {d.device for d in link.devices() if d.plan_hash and d.online}
        if names <= joined:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{len(names - joined)} of {len(names)} devices did not join in {timeout:.0f} s")
        time.sleep(0.1)


def run_load(devices: int, rounds: int, *, workers: int = 0, persist: str = "memory", deadline: float = 120.0,
             plan: Plan | None = None, work_dir: str | Path | None = None, profile=None) -> LoadResult:
    """One load run (see the module docstring); the problems list is empty when every update is accounted for.
    `profile` (a cProfile.Profile) runs while the coordinator's thread runs a round."""
    import logging

    from fedtiny.planfile import save_plan
    from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
    from fedtiny.protocol.keys import provision_fleet
    from fedtiny.transport.mqtt import CoordinatorLink
    from fedtiny_server import ops
    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig

    workers = worker_count(devices, workers)
    if plan is None:
        from bench_coordinator import default_plan

        plan = default_plan()
    names = [device_name(i) for i in range(devices)]
    result = LoadResult(devices, workers, persist)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # its notes on each round's sampling
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        run = Path(tmp)
        save_plan(plan, run / "plan.ftp")
        t0 = time.perf_counter()
        provision_fleet(run / "fleet", FLEET, names)
        result.setup_seconds["provision"] = time.perf_counter() - t0
        result.fsync_ms = fsync_ms(run)
        port = free_port()
        (run / "mosquitto.conf").write_text(mosquitto_config(run / "fleet", port, run_as_root=os.geteuid() == 0))
        events = contextlib.ExitStack()  # the coordinator writes its events, as it would in service
        events.enter_context(ops.json_logging(events.enter_context(open(run / "coordinator.jsonl", "w"))))
        events.enter_context(ops.log_to(run / "link.log", "fedtiny"))
        ctx = multiprocessing.get_context("spawn")
        stop, reports = ctx.Event(), ctx.Queue()
        shares = [list(range(devices))[i::workers] for i in range(workers)]
        budget = 120 + 0.2 * devices + rounds * (deadline + 30)  # a worker outliving this is stuck: it ends
        procs = [ctx.Process(target=_worker, args=(slot, str(run), share, f"mqtts://127.0.0.1:{port}", persist, stop,
                                                   reports, budget), daemon=True)
                 for slot, share in enumerate(shares)]
        store = timed_store(run / "state.db")
        link = RecordingLink(CoordinatorLink(f"mqtts://127.0.0.1:{port}", run / "fleet", plan, fleet=FLEET,
                                             chunk_size=CHUNK, save=store.save_link_state))
        broker = MosquittoProcess(run / "mosquitto.conf", port)
        try:
            broker.start()
            link.start()
            t0 = time.perf_counter()
            for p in procs:
                p.start()
            _collect(reports, procs, "ready", 60 + 0.1 * devices)
            result.setup_seconds["connect"] = time.perf_counter() - t0
            result.setup_seconds["join"] = _wait_for_joins(link, set(names), 60 + 0.05 * devices)
            coordinator = Coordinator(link, plan, store, CoordinatorConfig(
                rounds=rounds, strategy="fedavg", policy=RoundPolicy(quorum=1.0, deadline=deadline)))
            main_tid, link_tid = threading.main_thread().native_id, _thread_id("paho-mqtt-client-coordinator")
            me, pids = os.getpid(), [p.pid for p in procs]

            def cpu() -> tuple[float, ...]:
                """coordinator, its main and link threads, mosquitto, device processes, their session threads"""
                return (own_cpu_seconds(), cpu_seconds(me, main_tid), cpu_seconds(me, link_tid),
                        cpu_seconds(broker.process.pid), sum(cpu_seconds(pid) for pid in pids),
                        sum(cpu_seconds(pid, pid) for pid in pids))

            before = cpu()
            time.sleep(IDLE_S)
            idle = [(a - b) / IDLE_S for a, b in zip(cpu(), before)]
            result.idle = dict(coordinator=idle[0], broker=idle[3], devices=idle[4])
            for rnd in range(1, rounds + 1):
                before = cpu()
                down, seen, send, write = link.stats["downlink_bytes"], len(link.seen), link.send_seconds, \
                    store.write_seconds
                t0 = time.perf_counter()
                if profile is not None:
                    profile.enable()
                outcome = coordinator.run_round(rnd)
                if profile is not None:
                    profile.disable()
                seconds = time.perf_counter() - t0
                result.rounds.append(RoundRow(
                    rnd, outcome.replies, seconds, *(a - b for a, b in zip(cpu(), before)),
                    sum(r.uplink_bytes for r in link.seen[seen:]), int(link.stats["downlink_bytes"] - down),
                    link.send_seconds - send, store.write_seconds - write, outcome.aggregation_seconds))
            result.memory["coordinator_rss"] = rss_bytes(me)
            stop.set()
            done = _collect(reports, procs, "report", 60 + 0.05 * devices)
        finally:
            stop.set()
            for p in procs:
                if p.pid is None:
                    continue  # never started
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join(5)
            link.close()
            broker.stop()
            store.close()
            events.close()
    sent, sums = {}, {}
    for report in done.values():
        sent.update(report["digests"])
        for rnd, total in report["sums"].items():
            mine = sums.setdefault(rnd, {k: np.zeros_like(v) for k, v in total.items()})
            for k, v in total.items():
                mine[k] += v
    result.problems = account(names, rounds, [r.replies for r in result.rounds], sent, sums, link.seen)
    refused = {k: v for k, v in link.stats.items() if k.startswith("rejected:") and v}
    if refused:
        result.problems.append(f"the link refused messages: {refused}")
    for key in ("duplicate_rounds", "duplicate_messages"):
        if link.stats[key]:
            result.problems.append(f"link.stats[{key!r}] = {link.stats[key]}")
    grid_rejected = sum(r.rejected for r in coordinator.grid.registry.values())
    if grid_rejected:
        result.problems.append(f"the coordinator rejected {grid_rejected} replies")
    device_rejected = sum((r["rejected"] for r in done.values()), Counter())
    if device_rejected:
        result.problems.append(f"devices refused downlinks: {dict(device_rejected)}")
    result.counts = dict(connects=sum(r["connects"] for r in done.values()),
                         saves=sum(r["saves"] for r in done.values()),
                         resent_chunks=sum(r["resent_chunks"] for r in done.values()),
                         worker_threads=max(r["threads"] for r in done.values()),
                         highest_fd=max(r["highest_fd"] for r in done.values()),
                         missing_requests=int(link.stats["missing_requests"]),
                         duplicate_chunks=int(link.stats["duplicate_chunks"]))
    result.memory["per_device"] = statistics.mean((r["rss_after"] - r["rss_before"]) / r["devices"]
                                                  for r in done.values())
    result.memory["worker_rss"] = max(r["rss_after"] for r in done.values())
    return result


# --- the report ----------------------------------------------------------------------------------------------

def print_results(results: list[LoadResult], command: str, provenance) -> None:
    print(f"{SECTION}\n\n{provenance(command)} Load average before the first run: "
          f"{os.getloadavg()[0]:.1f}.\n")
    print("| devices | device processes | rounds | seconds per round (median, max) | rounds per minute | "
          "replies aggregated | every update accounted for | uplink B per round | downlink B per round |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for res in results:
        rows, n = res.rounds, len(res.rounds)
        secs = [r.seconds for r in rows]
        print(f"| {res.devices:,} | {res.workers} | {n} | {statistics.median(secs):.2f}, {max(secs):.2f} | "
              f"{60 * n / sum(secs):.1f} | {sum(r.replies for r in rows):,} of {res.devices * n:,} | "
              f"{'yes' if not res.problems else 'NO: ' + '; '.join(res.problems)} | "
              f"{_mean(rows, 'uplink_bytes'):,.0f} | {_mean(rows, 'downlink_bytes'):,.0f} |")
    print()
    print("CPU seconds per round, and where the coordinator's main thread spends a round (wall seconds):\n")
    print("| devices | coordinator CPU (main + link thread) | mosquitto CPU | device processes CPU (sessions + "
          "paho threads) | main thread: send_task | SQLite writes | FedAvg aggregate | the rest |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        rows = res.rounds
        rest = _mean(rows, "seconds") - _mean(rows, "send_seconds") - _mean(rows, "store_seconds") \
            - _mean(rows, "aggregate_seconds")
        print(f"| {res.devices:,} | {_mean(rows, 'coordinator_cpu'):.2f} ({_mean(rows, 'main_cpu'):.2f} + "
              f"{_mean(rows, 'link_cpu'):.2f}) | {_mean(rows, 'broker_cpu'):.2f} | {_mean(rows, 'devices_cpu'):.2f} "
              f"({_mean(rows, 'sessions_cpu'):.2f} + {_mean(rows, 'devices_cpu') - _mean(rows, 'sessions_cpu'):.2f}) | "
              f"{_mean(rows, 'send_seconds'):.2f} | {_mean(rows, 'store_seconds'):.2f} | "
              f"{_mean(rows, 'aggregate_seconds'):.2f} | {rest:.2f} |")
    print()
    for res in results:
        s, n = res.setup_seconds, len(res.rounds)
        print(f"- {res.devices:,} devices: provisioning {s['provision']:.1f} s; connecting {s['connect']:.1f} s "
              f"(worker start included; TLS handshakes one after another in each worker), all JOINs verified "
              f"{s['join']:.1f} s later; seconds per round: {', '.join(f'{r.seconds:.2f}' for r in res.rounds)}; "
              f"per device and round {sum(r.uplink_bytes for r in res.rounds) / (res.devices * n):,.0f} B up, "
              f"{sum(r.downlink_bytes for r in res.rounds) / (res.devices * n):,.0f} B down; "
              f"{res.memory['per_device'] / 1024:.0f} KiB resident per device in the device processes (largest "
              f"{res.memory['worker_rss'] / 2**20:.0f} MiB, {res.counts['worker_threads']} threads, highest file "
              f"descriptor {res.counts['highest_fd']}), coordinator "
              f"{res.memory['coordinator_rss'] / 2**20:.0f} MiB; {res.counts['connects']:,} MQTT connects, "
              f"{res.counts['saves']:,} device state saves ({res.persist}), {res.counts['resent_chunks']} chunks "
              f"resent, {res.counts['missing_requests']} missing-chunk requests.")
    big = results[-1]
    rows, n = big.rounds, big.devices
    busy = (_mean(rows, "coordinator_cpu") + _mean(rows, "broker_cpu") + _mean(rows, "devices_cpu")) \
        / _mean(rows, "seconds")
    persisted = "in memory (the save callback only counts the saves)" if big.persist == "memory" else \
        "saved to a file per device at every save, as NodeAgent does (device.save_state)"
    print(f"""- Light devices: each is a real DeviceSession with its own signing keys, TLS client certificate and paho \
client (so mosquitto authenticates it and applies the fleet's ACL to it); {n:,} devices in {big.workers} \
process{'es' if big.workers > 1 else ''}; no trainer runs: a device answers its TrainJob with the job's base \
plus a deterministic change (a quarter of each buffer's elements by 1-3 LSB), and everything after training is \
real (update.uplink, envelope, chunks, ACK, the JOIN a device sends after each ACK, a TRAINING status, a \
heartbeat every {HEARTBEAT_S:.0f} s). Device state: {persisted}.
- Coordinator: fedtiny_server's Coordinator (FleetGrid, Flower FedAvg, quorum 1.0, SQLite StateStore) over one \
CoordinatorLink; its main thread runs the Flower round (sampling, a TASK and a GLOBAL_UPDATE built and sealed per \
device, each reply's checks, its float64 ArrayRecord, its SQLite row, FedAvg); the link's paho thread verifies, \
decrypts and decodes every uplink message and seals the ACKs.
- At {n:,} devices the coordinator used {1000 * _mean(rows, 'coordinator_cpu') / n:.1f} ms of CPU per device and \
round ({1000 * _mean(rows, 'main_cpu') / n:.1f} in its main thread, {1000 * _mean(rows, 'link_cpu') / n:.1f} in the \
link's thread), the device processes {1000 * _mean(rows, 'devices_cpu') / n:.1f} ms \
({1000 * _mean(rows, 'sessions_cpu') / n:.1f} in the sessions' thread, the rest in {n:,} paho threads: TLS, MQTT, \
waking), mosquitto {1000 * _mean(rows, 'broker_cpu') / n:.2f} ms (TLS included). Before the first round, with \
nothing to do but heartbeats and keepalives, they used {1000 * big.idle['coordinator']:.0f}, \
{1000 * big.idle['devices']:.0f} and {1000 * big.idle['broker']:.0f} ms of CPU per second.
- Together they kept {busy:.2f} of the {os.cpu_count()} cores busy through a round; for the rest of it the round \
waited: for the other processes of this shared machine (load average above; wall-clock numbers include that wait, \
CPU seconds do not) and for fsync. The coordinator's two Python threads take turns on one core (the GIL), so even \
on an idle machine a round of {n:,} devices takes about its {_mean(rows, 'coordinator_cpu'):.1f} s of coordinator \
CPU or more: at most about {60 / _mean(rows, 'coordinator_cpu'):.1f} rounds per minute with this coordinator.
- Every accepted reply is its own SQLite transaction with fsync (synchronous=FULL: an accepted reply survives a \
crash), so a round spends at least N fsyncs ({big.fsync_ms:.1f} ms each here, measured) in the main thread: the \
"SQLite writes" column.
- `--profile` prints where the coordinator's main thread spends its CPU (cProfile, thread CPU time).""")


def _mean(rows: list[RoundRow], attr: str) -> float:
    return sum(getattr(r, attr) for r in rows) / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000], help="fleet sizes, one run each")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help=f"device processes (0: one per "
                                                               f"{DEVICES_PER_WORKER} devices)")
    parser.add_argument("--persist", choices=("memory", "disk"), default="memory",
                        help="device state: kept in memory, or saved to a file per device as NodeAgent does")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds a round waits at most")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    parser.add_argument("--profile", action="store_true",
                        help="profile the coordinator's thread during the rounds (its CPU time) and print the top "
                             "functions to stderr; slows the rounds, so BENCHMARKS.md is left as it is")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        print("error: mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    if min(args.devices) < 1 or args.rounds < 1 or args.workers < 0 or args.deadline <= 0:
        print("error: --devices and --rounds must be at least 1, --workers at least 0, --deadline positive",
              file=sys.stderr)
        return 2
    try:
        for n in args.devices:
            worker_count(n, args.workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from bench_coordinator import default_plan
    from report import capture, provenance, write_section

    plan = default_plan()
    results = []
    for n in args.devices:
        profile = cProfile.Profile(time.thread_time) if args.profile else None
        results.append(run_load(n, args.rounds, workers=args.workers, persist=args.persist, deadline=args.deadline,
                                plan=plan, profile=profile))
        if profile is not None:
            print(f"\nThe coordinator's main thread at {n} devices, {args.rounds} rounds (CPU seconds):",
                  file=sys.stderr)
            pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    command = "python benchmarks/bench_fleet_load.py --devices " + " ".join(map(str, args.devices)) + \
        f" --rounds {args.rounds}" + (f" --workers {args.workers}" if args.workers else "") + \
        (" --persist disk" if args.persist == "disk" else "")
    with capture() as out:
        print_results(results, command, provenance)
    if not args.no_write and not args.profile:
        write_section(SECTION, out.getvalue())
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
