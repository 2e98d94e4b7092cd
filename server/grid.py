"""A Flower `Grid` whose nodes are microcontrollers reached through a `CoordinatorLink` (MQTT).

Node ids are the devices' numeric ids (`topics.name_id`). Pushing a train Message sends the device a TASK
and, when the device holds an older model version, a GLOBAL_UPDATE with only the buffers whose integers changed
since that version. Pulling turns each accepted DeviceReply into a reply Message that Flower's strategies use
as they are: an ArrayRecord with the device's full trainable tensors in float (the float master it started
from + its dequantized delta) and a MetricRecord with "num-examples" (clamped) and the device's metrics.

Rounds for devices that come and go: `get_node_ids` lists devices heard from within `seen_within` seconds;
`send_and_receive` returns when a quorum fraction of the cohort replied or at the deadline, whichever comes
first. A reply for another round or model version, a second reply, or one after its round closed is discarded
with a logged reason. With `max_staleness > 0` (semi-asynchronous, FedBuff) tasks stay open across rounds,
replies up to that many versions old are rebuilt on the current master, and a round returns after
`buffer_size` replies.

Time: a deployment's rounds run on the wall clock (`clock`). A simulation may give the grid `arrivals`
instead: `arrivals(device, round)` is the virtual second (after the TASK) at which the device's reply arrives,
or None when it never answers. A synchronous round then closes in virtual time (at the reply that makes the
quorum, or at the deadline), admits exactly the replies that arrive virtually by then and refuses the others as
late; it waits in wall time for every reply `arrivals` promises, however slow the machine, so a seed gives the
same rounds under any load. A round that hears none of its promised replies for `RoundPolicy.reply_timeout` wall
seconds fails (MissingReplies), not a silent cut; the time runs from the latest reply, so a loaded machine that is
slow but answering never trips it. Semi-asynchronous rounds ignore `arrivals`: they run on the wall clock.

Messages made outside a Flower run need a run identity (flwr's `TaskIdentity`); `FleetGrid.set_run` provides
one when no Flower runtime did, as flwr's own compat and simulation entry points do.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from . import ops
from fedtiny.protocol.update import clip_delta

from .requantize import DeltaError, TensorSpec, changed, rebuild, requantize_state
from .state import DeviceRecord, StateStore, StoredReply

ERROR_UNSUPPORTED = 501
ERROR_UNKNOWN_NODE = 404
ERROR_UNREACHABLE = 503


@dataclass
class RoundPolicy:
    quorum: float = 1.0  # fraction of the cohort whose replies close a round early
    deadline: float = 60.0  # seconds a round waits at most
    seen_within: float = 300.0  # sample only devices heard from this recently
    max_examples: int = 10_000  # "num-examples" is clamped to this: a device cannot buy weight
    max_staleness: int = 0  # 0 = synchronous; > 0 = semi-asynchronous (FedBuff)
    buffer_size: int = 0  # semi-asynchronous: a round returns after this many replies
    poll: float = 0.05  # seconds per link.replies() wait
    metric_keys: tuple[str, ...] = ("loss", "accuracy")  # device metrics forwarded (missing ones are 0.0)
    task: dict[str, float] = field(default_factory=dict)  # TASK settings for send_task (local_steps, lr, ...)
    reply_timeout: float = 600.0  # virtual time (FleetGrid arrivals): wall seconds a round may go without a reply

    def target(self, cohort: int) -> int:
        if self.max_staleness > 0 and self.buffer_size > 0:
            return min(self.buffer_size, cohort)
        return min(cohort, max(1, math.ceil(self.quorum * cohort - 1e-9))) if cohort else 0


class GlobalModel:
    """The float master of the trainable state, its integers, and its version; older versions come from the
    store (they are every round's checkpoint)."""

    def __init__(self, specs: dict[str, TensorSpec], master: dict, ints: dict, version: int,
                 store: StateStore | None = None) -> None:
        self.specs = specs
        self.store = store
        self.version = version
        self.master = {n: np.asarray(master[n], np.float64) for n in specs}
        self.ints = {n: np.asarray(ints[n]) for n in specs}
        self._history: dict[int, tuple[dict, dict]] = {version: (self.master, self.ints)}
        self._adopted: tuple[ArrayRecord | None, int] = (None, version)  # the record adopt() last compared

    def arrays(self) -> ArrayRecord:
        return ArrayRecord({n: Array(np.array(v, np.float64)) for n, v in self.master.items()})

    def advance(self, new: dict[str, np.ndarray]) -> int:
        """Make `new` (float) the next version: clamped to what the integers represent, on the master's grid
        (TensorSpec.snap: the same mean computed in another float order is the same master), then requantized."""
        self.master = {n: self.specs[n].snap(self.specs[n].clamp(new[n])) for n in self.specs}
        self.ints = requantize_state(self.specs, self.master)
        self.version += 1
        self._history[self.version] = (self.master, self.ints)
        for old in [v for v in self._history if v < self.version - 16]:
            del self._history[old]
        return self.version

    def adopt(self, record: ArrayRecord) -> int:
        """The version of the arrays a strategy put in a message: the current one, or a new version if they
        differ (a strategy driven by flwr's own `start` loop hands the grid its new arrays this way)."""
        if record is self._adopted[0] and self._adopted[1] == self.version:
            return self.version  # a round's messages share one record: compared once, not once per device
        version = self._adopt(record)
        self._adopted = (record, version)
        return version

    def _adopt(self, record: ArrayRecord) -> int:
        arrays = {k: v.numpy() for k, v in record.items()}
        if set(arrays) != set(self.specs):
            raise ValueError(f"ArrayRecord keys {sorted(arrays)} are not the plan's trainable buffers")
        # compared as `advance` would store them: arrays beyond what the integers hold are clamped once, and the
        # same arrays in the round's next message are then the same version, not one more
        if all(np.array_equal(spec.snap(spec.clamp(arrays[n])), self.master[n]) for n, spec in self.specs.items()):
            return self.version
        return self.advance(arrays)

    def _at(self, version: int, which: int) -> dict | None:
        if version in self._history:
            return self._history[version][which]
        if self.store is None:
            return None
        return self.store.global_master(version) if which == 0 else self.store.global_ints(version)

    def master_of(self, version: int) -> dict | None:
        return self._at(version, 0)

    def ints_of(self, version: int | None) -> dict | None:
        return None if version is None else self._at(version, 1)


@dataclass
class Pending:
    message: Message
    device: str
    round: int
    version: int
    reply: Message | None = None
    open: bool = True
    recovered: bool = False
    clip_norm: float = 0.0  # the TASK's: the coordinator clips the reply again (a device may not have)


Arrivals = Callable[[str, int], "float | None"]  # (device, round) -> virtual seconds after the TASK, or None


class MissingReplies(RuntimeError):
    """Virtual time: replies that `arrivals` promised did not come within the policy's reply_timeout (wall)."""


class ReplyDeadline:
    """When a wait for replies gives up. Wall time (a deployment): `wait` seconds after it began (the round's
    deadline). Virtual time (a simulation's `arrivals`): the policy's reply_timeout after the latest reply, so a
    loaded machine that is slow but answering never trips it, a hung node does. The one rule for a round
    (FleetGrid.send_and_receive) and for each stage of a secure-aggregation round (secagg.py)."""

    def __init__(self, clock: Callable[[], float], wait: float, policy: RoundPolicy, virtual: bool) -> None:
        self.clock, self.virtual = clock, virtual
        self.limit = policy.reply_timeout if virtual else wait
        self.end, self.heard = clock() + self.limit, 0

    def remaining(self, heard: int) -> float:
        """Wall seconds left, with `heard` replies in so far (in virtual time, more than before restarts it)."""
        if self.virtual and heard > self.heard:
            self.heard, self.end = heard, self.clock() + self.limit
        return self.end - self.clock()


@dataclass(frozen=True)
class VirtualRound:
    """A synchronous round in virtual time: when it closes, whose replies it admits, whose it waits for."""

    round: int
    close: float  # virtual seconds after the TASKs
    admitted: frozenset[str]  # devices whose reply arrives by `close`
    expected: frozenset[str]  # devices that answer at all (the admitted and the late)

    @classmethod
    def plan(cls, round_: int, arrivals: dict[str, float | None], ready: int, target: int,
             deadline: float) -> VirtualRound:
        """`arrivals` of the round's open tasks; `ready` replies already in (recovered); `target` the quorum of
        the whole cohort. The round closes at the arrival that makes the quorum, else at the deadline (ties in
        arrival time are all admitted, so the device order never decides)."""
        arriving = sorted((t, d) for d, t in arrivals.items() if t is not None and t <= deadline)
        need = target - ready
        close = 0.0 if need <= 0 else arriving[need - 1][0] if need <= len(arriving) else deadline
        return cls(round_, close, frozenset(d for t, d in arriving if t <= close),
                   frozenset(d for d, t in arrivals.items() if t is not None))


def ensure_task_identity(run_id: int = 1) -> None:
    """Give this process a run identity unless a Flower runtime already did (Message() needs one)."""
    try:
        TaskIdentity.run_id  # noqa: B018
    except RuntimeError:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1


class FleetGrid(Grid):
    def __init__(self, link, model: GlobalModel, store: StateStore, policy: RoundPolicy | None = None, *,
                 devices: dict[str, DeviceRecord] | None = None, metrics: ops.Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, run_id: int = 1,
                 plan_hash: bytes | None = None, arrivals: Arrivals | None = None) -> None:
        self.link = link
        self.plan_hash = plan_hash  # devices that JOINed with another plan are never sampled
        self.model = model
        self.store = store
        self.policy = policy or RoundPolicy()
        self.registry: dict[str, DeviceRecord] = devices if devices is not None else {}
        self.metrics = metrics or ops.Metrics()
        self.clock = clock
        self.arrivals = arrivals  # None: wall time; else virtual time for synchronous rounds (module docstring)
        self.secagg_log: dict[int, list] = {}  # round -> its secure aggregation's stages (server/secagg.py)
        self.secagg_metrics: dict[int, dict] = {}  # round -> device -> the metrics its masked DELTA carried
        self.secagg = False  # rounds with masked deltas (fedtiny_server.secagg): the strategy gets only their mean
        self._virtual: VirtualRound | None = None  # the synchronous round in progress, in virtual time
        self._heard: set[tuple[str, int]] = set()  # (device, round) of every reply handled, whatever its fate
        self.round = 0
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, Pending] = {}  # message id -> task
        self._recovered: list[StoredReply] = []
        self._accepted: dict[int, set[str]] = {}  # round -> devices accepted
        self._by_id: dict[int, str] = {r.device_id: r.device for r in self.registry.values()}
        self._closed: set[tuple[str, int]] = set()  # (device, round) of tasks closed without a reply
        self._wrong_plan: set[str] = set()
        self.set_run(self._run)

    # --- run identity -------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run
        ensure_task_identity(run.run_id)

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    # --- devices ------------------------------------------------------------------------------------------
    def refresh(self) -> list:
        """Registry from the link: every device ever seen is registered; returns those online and recent."""
        online = []
        for info in self.link.devices(seen_within=self.policy.seen_within):
            if info.device not in self.registry:
                self.registry[info.device] = DeviceRecord(info.device, info.device_id)
                ops.event("device_joined", device=info.device, device_id=info.device_id)
            self._by_id[info.device_id] = info.device
            if self.plan_hash and info.plan_hash and info.plan_hash != self.plan_hash:
                if info.device not in self._wrong_plan:
                    self._wrong_plan.add(info.device)
                    ops.event("device_wrong_plan", logging.WARNING, device=info.device)
                continue
            if info.online:
                online.append(info)
        self.metrics.set("fedtiny_devices_online", len(online))
        self.metrics.set("fedtiny_devices_registered", len(self.registry))
        return online

    def busy(self) -> set[str]:
        return {p.device for p in self._pending.values() if p.open}

    def get_node_ids(self) -> Iterable[int]:
        """Devices seen recently, online, not busy with a task, and without an accepted reply this round."""
        done = self._accepted_in(self.round) | {r.device for r in self._recovered}
        excluded = self.busy() | done
        return [i.device_id for i in self.refresh() if i.device not in excluded]

    def _accepted_in(self, round_: int) -> set[str]:
        if round_ not in self._accepted:
            self._accepted[round_] = self.store.accepted_ids(round_)
        return self._accepted[round_]

    # --- push ---------------------------------------------------------------------------------------------
    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(msg.metadata.message_id)
            device = self._by_id.get(msg.metadata.dst_node_id)
            kind = msg.metadata.message_type
            if device is None:
                self._error(msg, ERROR_UNKNOWN_NODE, f"node {msg.metadata.dst_node_id} is not a known device")
                continue
            if kind != MessageType.TRAIN and not kind.startswith(MessageType.TRAIN + "."):
                # Devices evaluate as they train: their metrics come with the DELTA, not on request.
                self._error(msg, ERROR_UNSUPPORTED, f"{kind} messages are not supported by fleet devices", device)
                continue
            try:
                self._push_train(msg, device)
            except Exception as exc:  # one device the link cannot reach must not end the round
                ops.event("task_failed", logging.WARNING, device=device, error=str(exc))
                self._error(msg, ERROR_UNREACHABLE, f"task not sent: {exc}", device)
        return ids

    def _push_train(self, msg: Message, device: str) -> None:
        content = msg.content
        config = next(iter(content.config_records.values()), ConfigRecord())
        round_ = int(config.get("server-round", msg.metadata.group_id or self.round or 1))
        arrays = next(iter(content.array_records.values()), None)
        version = self.model.adopt(arrays) if arrays is not None else self.model.version
        if round_ != self.round:
            self.begin_round(round_)
        record = self.registry[device]
        # The link gets the whole integer state of `version` and sends a GLOBAL_UPDATE only to a device that
        # does not hold it, with only the channels that changed since the version the device reports (or the
        # whole state when it cannot tell). `changed` here is for the log: what moved since the version this
        # registry last saw the device on (a device never heard of holds version 0, the plan it was flashed
        # with; a stale reply corrects the registry).
        held = 0 if record.model_version is None else record.model_version
        moved = sorted(changed(self.model.ints_of(held), self.model.ints)) if held != version else []
        task = dict(self.policy.task)
        task.update({k: float(v) for k, v in config.items()  # Flower's own keys (server-round, ...) stay here
                     if "-" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)})
        nbytes = self.link.send_task(device, round_, version, self.model.ints, task)
        self.metrics.inc("fedtiny_downlink_bytes_total", nbytes)
        record.model_version = version  # what it holds once the update lands; a stale reply corrects this
        self._pending[msg.metadata.message_id] = Pending(msg, device, round_, version,
                                                         clip_norm=float(task.get("clip_norm", 0.0)))
        ops.event("task_sent", device=device, round=round_, model_version=version, downlink_bytes=nbytes,
                  changed_buffers=moved)

    def begin_round(self, round_: int) -> None:
        """The round later pushes belong to (devices with an accepted reply in it are not sampled again)."""
        self.round = round_
        keep = round_ - self.policy.max_staleness - 2  # older rounds are asked of the store again if needed
        self._accepted = {r: d for r, d in self._accepted.items() if r >= keep}
        self._closed = {(d, r) for d, r in self._closed if r >= keep}
        self._heard = {(d, r) for d, r in self._heard if r >= keep}
        if self.policy.max_staleness == 0:
            return
        for p in self._pending.values():  # semi-async: a task too old to be useful closes
            if p.open and self.model.version - p.version > self.policy.max_staleness:
                p.open = False
                self._closed.add((p.device, p.round))

    def _error(self, msg: Message, code: int, reason: str, device: str = "") -> None:
        self._pending[msg.metadata.message_id] = Pending(msg, device, self.round, self.model.version,
                                                         reply=Message(Error(code, reason), reply_to=msg), open=False)

    # --- replies ------------------------------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        """Take the link's new replies (waiting up to timeout); returns how many were accepted. Messages the link
        refused (forged, replayed, oversized, flooding, ...) become events and counters by reason here."""
        accepted = sum(self._handle(r) for r in self.link.replies(timeout))
        for r in self.link.rejections():
            self.metrics.inc("fedtiny_messages_rejected_total", reason=r.reason)
            ops.event("message_rejected", logging.WARNING, device=r.device, reason=r.reason, detail=r.detail)
        return accepted

    def _reject(self, reply, reason: str, **detail) -> bool:
        self.metrics.inc("fedtiny_replies_rejected_total", reason=reason)
        record = self.registry.get(reply.device)
        if record is not None:
            record.rejected += 1
        ops.event("reply_rejected", device=reply.device, round=reply.round, model_version=reply.model_version,
                  reason=reason, **detail)
        return False

    def _handle(self, reply) -> bool:
        self.metrics.inc("fedtiny_uplink_bytes_total", reply.uplink_bytes)
        self._heard.add((reply.device, reply.round))
        record = self.registry.get(reply.device)
        if record is None:
            self.refresh()
            record = self.registry.get(reply.device)
            if record is None:
                return self._reject(reply, "unknown-device")
        if reply.device in self._accepted_in(reply.round):
            return self._reject(reply, "duplicate")
        task = next((p for p in self._pending.values() if p.open and p.device == reply.device), None)
        if task is None:
            closed = (reply.device, reply.round) in self._closed
            return self._reject(reply, "late" if closed else "unsolicited")
        if reply.round != task.round:
            return self._reject(reply, "wrong-round", expected_round=task.round)
        virtual = self._virtual
        if virtual is not None and virtual.round == task.round and reply.device not in virtual.admitted:
            task.open = False  # it arrives (virtually) after the round closed: as a late reply in wall time
            self._closed.add((task.device, task.round))
            return self._reject(reply, "late", arrival=self.arrivals(reply.device, reply.round), close=virtual.close)
        if reply.model_version != task.version:
            record.model_version = reply.model_version if reply.model_version < self.model.version else None
            return self._reject(reply, "stale-version", expected_version=task.version)
        staleness = self.model.version - reply.model_version
        if staleness > self.policy.max_staleness:
            return self._reject(reply, "too-stale", staleness=staleness)
        if reply.num_examples <= 0:
            return self._reject(reply, "no-examples")
        base = self.model.master if self.policy.max_staleness else self.model.master_of(reply.model_version)
        try:
            delta = reply.delta
            if task.clip_norm > 0:
                delta = clip_delta(delta, {n: s.scale for n, s in self.model.specs.items()}, task.clip_norm)
            full = rebuild(self.model.specs, base, delta)
        except (DeltaError, KeyError, ValueError) as exc:
            return self._reject(reply, "bad-delta", detail=str(exc))
        stored = StoredReply(reply.round, reply.device, reply.model_version, int(reply.num_examples),
                             {k: float(v) for k, v in reply.metrics.items()},
                             {k: np.asarray(v) for k, v in delta.items()}, int(reply.uplink_bytes))
        if not self.store.accept_reply(stored):
            return self._reject(reply, "duplicate")
        self._accepted_in(reply.round).add(reply.device)
        task.reply = Message(self._content(full, stored, staleness), reply_to=task.message)
        task.open = False
        record.accepted += 1
        record.last_round = reply.round
        self.metrics.inc("fedtiny_replies_accepted_total")
        ops.event("reply_accepted", device=reply.device, round=reply.round, model_version=reply.model_version,
                  num_examples=reply.num_examples, uplink_bytes=reply.uplink_bytes, staleness=staleness)
        return True

    def _content(self, full: dict, reply: StoredReply, staleness: int) -> RecordDict:
        metrics = MetricRecord({"num-examples": int(min(reply.num_examples, self.policy.max_examples))})
        for key in self.policy.metric_keys:
            metrics[key] = float(reply.metrics.get(key, 0.0))
        if self.policy.max_staleness:
            metrics["staleness"] = int(staleness)
        arrays = ArrayRecord({n: Array(np.asarray(full[n], np.float64)) for n in self.model.specs})
        return RecordDict({"arrays": arrays, "metrics": metrics})

    # --- recovery after a restart -------------------------------------------------------------------------
    def recover(self, replies: list[StoredReply]) -> None:
        """Replies accepted before a crash and not aggregated: they join the round they belong to, once."""
        self._recovered = list(replies)
        for r in replies:
            self._accepted_in(r.round).add(r.device)

    def _inject_recovered(self) -> list[str]:
        ids = []
        for r in self._recovered:
            record = self.registry.get(r.device)
            if record is None:
                continue
            staleness = self.model.version - r.model_version
            base = self.model.master if self.policy.max_staleness else self.model.master_of(r.model_version)
            if base is None or staleness > self.policy.max_staleness:
                ops.event("reply_rejected", device=r.device, round=r.round, reason="stale-after-restart")
                continue
            ins = Message(RecordDict(), record.device_id, MessageType.TRAIN, group_id=str(r.round))
            ins.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            full = rebuild(self.model.specs, base, r.delta)
            reply = Message(self._content(full, r, staleness), reply_to=ins)
            record.accepted += 1
            record.last_round = max(record.last_round, r.round)
            self._pending[ins.metadata.message_id] = Pending(ins, r.device, r.round, r.model_version, reply,
                                                             open=False, recovered=True)
            ids.append(ins.metadata.message_id)
            ops.event("reply_recovered", device=r.device, round=r.round, model_version=r.model_version)
        self._recovered = []
        return ids

    # --- pull ---------------------------------------------------------------------------------------------
    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.poll(0.0)
        out = []
        for mid in message_ids:
            p = self._pending.get(mid)
            if p is not None and p.reply is not None:
                out.append(p.reply)
                del self._pending[mid]
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push; wait for a quorum of the cohort (or `buffer_size` replies when semi-asynchronous) or the
        deadline; return the replies. In synchronous mode tasks still open at the end are closed: their replies
        will be discarded as late. With `arrivals` (virtual time), a synchronous round instead waits for every
        reply they promise and admits those that arrive by its virtual close (VirtualRound)."""
        wait = self.policy.deadline if timeout is None else min(timeout, self.policy.deadline)
        if self.secagg:
            from .secagg import send_and_receive_masked

            return send_and_receive_masked(self, messages, wait)
        ids = list(self.push_messages(messages)) + self._inject_recovered()
        asynchronous = self.policy.max_staleness > 0

        def watched() -> list[str]:
            return list(self._pending) if asynchronous else ids

        def ready() -> int:
            return sum(1 for m in watched() if self._pending[m].reply is not None)

        def cohort() -> int:
            return sum(1 for m in watched() if self._pending[m].reply is not None or self._pending[m].open)

        virtual = None
        if self.arrivals is not None and not asynchronous:
            tasks = [self._pending[m] for m in ids if self._pending[m].open]
            virtual = VirtualRound.plan(self.round, {p.device: self.arrivals(p.device, p.round) for p in tasks},
                                        ready(), self.policy.target(cohort()), wait)
            ops.event("round_schedule", round=self.round, close=round(virtual.close, 6),
                      admitted=len(virtual.admitted), expected=len(virtual.expected), cohort=len(tasks))

        def heard() -> int:  # virtual time: the expected replies in so far
            return sum((d, virtual.round) in self._heard for d in virtual.expected)

        def done() -> bool:
            if virtual is not None:
                return heard() == len(virtual.expected)
            return ready() >= self.policy.target(cohort())

        self._virtual = virtual
        deadline = ReplyDeadline(self.clock, wait, self.policy, virtual=virtual is not None)
        try:
            while not done():
                remaining = deadline.remaining(heard() if virtual is not None else 0)
                if remaining <= 0:
                    if virtual is not None:
                        silent = sorted(d for d in virtual.expected if (d, virtual.round) not in self._heard)
                        raise MissingReplies(
                            f"round {virtual.round}: no reply from {len(silent)} node(s) ({', '.join(silent[:5])}"
                            f"{' ...' if len(silent) > 5 else ''}) within {self.policy.reply_timeout:.0f} s of wall "
                            f"time after the round's last reply, though each was due to answer: a node process "
                            f"died or hangs")
                    break
                self.poll(min(self.policy.poll, remaining))
            self.poll(0.0)
        finally:
            self._virtual = None
        replies = self.pull_messages(watched())
        if not asynchronous:
            for m in ids:
                p = self._pending.pop(m, None)
                if p is not None and p.open:
                    self._closed.add((p.device, p.round))
                    ops.event("task_expired", device=p.device, round=p.round)
        return replies
