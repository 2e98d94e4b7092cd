"""The node agent: one device's end of the fleet link on a host, in parts that do not share data.

    DeviceSession  (fedtiny.protocol.device) the sans-IO protocol state machine; it never sees a sample
    LocalTraining  the only holder of the device's samples: runs a TrainJob on a trainer, returns a TrainResult
                   (a trainable state and three or four numbers), which the session turns into a DELTA
                   (update.uplink); it measures its personalised model (the global model after its own local
                   steps) on its evaluation part (evaluation_part): its machine's held-out windows of every class
                   where it was given them, else the fifth of its samples it holds out (heldout_split)
    RoundFaults    the seam through which a simulation makes a node fail or lag a round
    predict        inference between rounds: the personalised model the session keeps (NodeState.personal), or the
                   global one before the device's first answered round
    NodeAgent      glue: an MqttTransport (paho thread) feeding a worker thread that owns the session

The agent persists the session's NodeState in state_dir/<device>.node (fedtiny container of kind NODE).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedtiny.arith import mean_loss, order_key, uniform_below
from fedtiny.compiler import Plan
from fedtiny.protocol import topics
from fedtiny.protocol.device import (
    DeviceSession, NodeState, TrainJob, TrainResult, load_state, save_state,
)
from fedtiny.protocol.envelope import DeviceEndpoint, Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import DeviceState
from fedtiny.protocol.topics import Publish
from fedtiny.transport.mqtt import MqttTransport, load_fleet

from fedtiny.interpreter import run

log = logging.getLogger("fedtiny.agent")

MAX_WAIT_S = 5.0  # the longest the agent's loop sleeps without an event (a bound, should a due time be missed)


def training_permutation(seed: int, round_: int, epoch: int, n: int) -> list[int]:
    """The order of one epoch over n samples: Fisher-Yates from the identity, for i = n-1 down to 1 swapping
    entry i with entry uniform_below(i + 1), the draws taken from the splitmix64 stream after
    order_key(seed, round, epoch). The device computes the same (fedtiny_training_permutation in
    device_runtime/c/fedtiny_train_job.c)."""
    order = list(range(n))
    counter = order_key(seed, round_, epoch)
    for i in range(n - 1, 0, -1):
        j, counter = uniform_below(counter, i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def training_order(seed: int, round_: int, n: int, epochs: int = 1, steps: int = 0) -> np.ndarray:
    """Sample indexes a round trains on: a fresh permutation per epoch from (seed, round, epoch); `steps` > 0
    takes that many steps through consecutive permutations (epochs 0, 1, ...) instead of `epochs` whole passes."""
    total = steps if steps > 0 else epochs * n
    order: list[int] = []
    epoch = 0
    while len(order) < total and n:
        order.extend(training_permutation(seed, round_, epoch, n))
        epoch += 1
    return np.asarray(order[:total], dtype=np.int64)


# A device holds out one sample in HELDOUT_SHARE to measure its personalised model, when it has HELDOUT_MIN_SAMPLES
# or more: below that a held-out part of one sample says nothing and costs a tenth or more of the training data.
HELDOUT_SHARE = 5
HELDOUT_MIN_SAMPLES = 10
# The split's key in the order stream: a round no TASK carries (rounds are u32), so no round's order repeats it.
SPLIT_ROUND = 1 << 32


def heldout_count(n: int) -> int:
    """How many of n samples a device holds out: n // HELDOUT_SHARE from HELDOUT_MIN_SAMPLES samples on, else 0."""
    return n // HELDOUT_SHARE if n >= HELDOUT_MIN_SAMPLES else 0


def heldout_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train part, held-out part) of a device's n samples, as indexes: the first heldout_count(n) entries of
    training_permutation(seed, SPLIT_ROUND, 0, n) are held out, the rest train, in that permutation's order
    (fedtiny_train_job.c splits the same way, in the order work buffer). Without a held-out part, the train
    part is 0..n-1 in order. The split never changes for a device: its seed and its samples fix it."""
    h = heldout_count(n)
    if h == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    split = np.asarray(training_permutation(seed, SPLIT_ROUND, 0, n), dtype=np.int64)
    return split[h:], split[:h]


def evaluation_part(seed: int, x: np.ndarray, y: np.ndarray, evaluation: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(samples, labels) a device scores its personalised model on: its evaluation part when it has one (samples
    of every class it will meet, never trained on: the industrial scenario gives each device its machine's held-out
    windows), else the held-out part of heldout_split. The train part is heldout_split's either way: an evaluation
    part adds samples to score on and takes none from training. fedtiny_train_job.c chooses the same."""
    if evaluation is not None and len(evaluation[1]):
        return np.asarray(evaluation[0]), np.asarray(evaluation[1])
    held = heldout_split(seed, len(y))[1]
    return np.asarray(x)[held], np.asarray(y)[held]


def classes(plan: Plan, state: dict[str, np.ndarray], x_int8: np.ndarray) -> np.ndarray:
    """The class the model with trainable `state` predicts for each int8 sample: the argmax of its output, the first
    maximum winning (fedtiny_predict_class in device_runtime/c/fedtiny_train_job.c computes the same)."""
    x = np.asarray(x_int8)
    return run(plan.graph_with(state), x).reshape(len(x), -1).argmax(axis=1)


def predict(plan: Plan, state: NodeState, sample: np.ndarray) -> int:
    """A device's inference between rounds: the class of one int8 sample (H, W, C) by its personalised model where it
    has one, else by the global model (NodeState.inference_state); the C node's fedtiny_node_predict is the same."""
    return int(classes(plan, state.inference_state(), np.asarray(sample)[None])[0])


class LocalTraining:
    """Holds the samples and the trainer; the protocol side gets TrainResults only."""

    def __init__(self, plan: Plan, x_int8: np.ndarray, y: np.ndarray, seed: int,
                 trainer_factory: Callable | None = None, rng_counter: int | None = None,
                 evaluation: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`evaluation`: (int8 samples, labels) of the device's evaluation part (evaluation_part), if it has one."""
        if trainer_factory is None:
            from .trainer import Trainer as trainer_factory
        self.plan = plan
        self._x = np.asarray(x_int8)
        self._y = np.asarray(y)
        if self._x.dtype != np.int8 or len(self._x) != len(self._y):
            raise ValueError("x_int8 must be int8 samples (N, H, W, C) with N labels")
        self._evaluation = None
        if evaluation is not None and len(evaluation[1]):
            self._evaluation = (np.asarray(evaluation[0]), np.asarray(evaluation[1]))
            if self._evaluation[0].dtype != np.int8 or len(self._evaluation[0]) != len(self._evaluation[1]):
                raise ValueError("the evaluation part must be int8 samples (N, H, W, C) with N labels")
            if plan.loss == "mse":
                raise ValueError("an evaluation part scores classes, and an MSE plan has none")
        self.seed = seed
        self.trainer = trainer_factory(plan, seed)
        if rng_counter is not None:
            self.trainer.rng_counter = rng_counter

    @property
    def rng_counter(self) -> int:
        return int(self.trainer.rng_counter)

    def run(self, job: TrainJob) -> TrainResult:
        """Train the train part of heldout_split from job.base, in training_order over that part (its k-th
        sample is train[k]); report the trained state, the number of distinct samples trained on, the mean step
        loss (arith.mean_loss), the accuracy of the trained model on the train part and on the device's
        evaluation part (evaluation_part), when it has one: the personalised model's (argmax of the output ==
        label, the first maximum winning; 0.0 and None for an MSE plan, which has no classes).
        device_runtime/c/fedtiny_train_job.c computes the same on the device; a trainer that runs that C
        (cruntime.CTrainer.run_job) does the whole job in one call."""
        if hasattr(self.trainer, "run_job"):
            return self.trainer.run_job(self.seed, job, self._x, self._y, self._evaluation)
        self.trainer.load_trainable_state(job.base)
        train = heldout_split(self.seed, len(self._x))[0]
        n = len(train)
        order = train[training_order(self.seed, job.round, n, job.epochs, job.steps)]
        mse = self.plan.loss == "mse"
        losses = [self.trainer.step(self._x[i], self._y[i] if mse else int(self._y[i])) for i in order]
        state = self.trainer.trainable_state()
        accuracy, personal = 0.0, None
        if not mse:
            if n:
                accuracy = int((classes(self.plan, state, self._x[train]) == self._y[train]).sum()) / n
            x_eval, y_eval = evaluation_part(self.seed, self._x, self._y, self._evaluation)
            if len(y_eval):
                personal = int((classes(self.plan, state, x_eval) == y_eval).sum()) / len(y_eval)
        # consecutive permutations: the first n steps visit n distinct samples
        return TrainResult(state, min(len(order), n), mean_loss(losses), accuracy, self.rng_counter, personal)


@dataclass(frozen=True)
class RoundFaults:
    """How a node misbehaves in a simulation, decided per round from a seed so runs are reproducible.

    `fails(round)`: the node does not train or answer that round (as a device that crashed), then takes the
    next TASK as a rebooted device would. `delay(round)`: seconds the node's training takes beyond its own."""

    fails: Callable[[int], bool] = lambda round_: False
    delay: Callable[[int], float] = lambda round_: 0.0


class NodeAgent:
    """One device on the fleet link: joins, heartbeats, trains each TASK on its own samples, uploads the DELTA.

    `trainer_factory(plan, seed)` makes the trainer (default: the Python reference Trainer; the C runtime's
    CTrainer has the same API: step, trainable_state, load_trainable_state, rng_counter settable).
    `faults` makes the node fail or lag rounds (simulations). `transport_wrapper(transport)`, when given, wraps
    the agent's MqttTransport: tests pass fedtiny.transport.faults.FaultyTransport to drop, delay, duplicate or
    reorder what the node publishes, or to cut its connection. `peers` (device name -> public identity) lets the
    node take part in secure aggregation: it checks the round keys the coordinator relays against them.
    `evaluation` (int8 samples, labels): the device's evaluation part (agent.evaluation_part), if it has one.
    `durable=False` saves the node's state without
    fsync (save_state): a simulation's nodes save at every sealed message (heartbeats included), and in a profile
    of the default run on a busy machine its worker processes spent a quarter as long in those fsyncs as in
    training.
    """

    def __init__(self, device: str, broker_url: str, fleet_dir: str | Path, plan: Plan, x_int8: np.ndarray,
                 y: np.ndarray, *, fleet: str, state_dir: str | Path, seed: int, chunk_size: int = 4096,
                 trainer_factory: Callable | None = None, heartbeat_s: float = 30.0, ack_timeout_s: float = 15.0,
                 client_id: str | None = None, faults: RoundFaults = RoundFaults(),
                 transport_wrapper: Callable[[MqttTransport], MqttTransport] | None = None,
                 peers: dict[str, PublicIdentity] | None = None, durable: bool = True,
                 evaluation: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.device = topics.check_name(device)
        self.fleet = fleet
        fleet_dir = Path(fleet_dir)
        folder = fleet_dir / "devices" / device
        manifest = load_fleet(folder)
        endpoint = DeviceEndpoint(manifest["fleet_id"], manifest["devices"][device]["id"],
                                  Identity.from_bytes((folder / "identity.key").read_bytes()),
                                  PublicIdentity.from_bytes((folder / "coordinator.pub").read_bytes()))
        self.state_path = Path(state_dir) / f"{device}.node"
        if self.state_path.exists():
            state = load_state(self.state_path, plan)
            self.restored = True
        else:
            state = NodeState(0, plan.initial_state(), 0)
            self.restored = False
        self.training = LocalTraining(plan, x_int8, y, seed, trainer_factory,
                                      state.rng_counter if self.restored else None, evaluation)
        state.rng_counter = self.training.rng_counter
        self.session = DeviceSession(plan, device, fleet, endpoint, state, chunk_size,
                                     lambda s: save_state(self.state_path, s, durable), ack_timeout_s, time.monotonic(),
                                     peers=None if peers is None else {topics.name_id(n): p for n, p in peers.items()})
        self.session.persist()
        self.faults = faults
        self.heartbeat_s = heartbeat_s
        self.rejected: list[str] = []
        self.rounds_done = 0
        self._lock = threading.Lock()  # guards the session between the worker and paho's disconnect callback
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.transport = MqttTransport(broker_url, fleet_dir, device, client_id or device,
                                       on_connect=lambda: self._events.put(("connect",)),
                                       on_message=lambda t, p: self._events.put(("message", t, p)),
                                       will=self._will)
        if transport_wrapper is not None:
            self.transport = transport_wrapper(self.transport)

    @property
    def model_version(self) -> int:
        return self.session.state.model_version

    @property
    def rng_counter(self) -> int:
        return self.training.rng_counter

    def predict(self, sample: np.ndarray) -> int:
        """The class this device predicts for one int8 sample now (agent.predict on its persisted state)."""
        with self._lock:
            return predict(self.training.plan, self.session.state, sample)

    def _will(self) -> Publish:
        with self._lock:
            return self.session.last_will(time.monotonic())

    def start(self) -> NodeAgent:
        self._worker = threading.Thread(target=self.run_forever, name=f"agent-{self.device}", daemon=True)
        self._worker.start()
        self.transport.start()
        return self

    def run_forever(self) -> None:
        """The worker loop (start() runs it in a thread): handle events, train, heartbeat, resend.

        A trained job's DELTA goes out when the job is done (after RoundFaults.delay); downlinks keep being
        handled meanwhile, and a TASK of a later round supersedes the job (DeviceSession.superseded)."""
        next_beat = time.monotonic() + self.heartbeat_s
        running: tuple[TrainJob, TrainResult, float] | None = None  # trained; its DELTA is due at the time given
        while not self._stop.is_set():
            wait = self._wait(next_beat, running[2] if running else None)
            try:
                event = self._events.get(timeout=wait)
            except queue.Empty:
                event = None
            if event is not None and event[0] == "stop":
                continue
            now = time.monotonic()
            job = None
            with self._lock:
                if event is not None and event[0] == "connect":
                    self.transport.subscribe(topics.downlink(self.fleet, self.device), topics.broadcast(self.fleet))
                    self._send(self.session.on_connect(now))
                    job = self.session.pending_job()
                elif event is not None and event[0] == "message":
                    try:
                        out, job = self.session.receive(event[1], event[2], now)
                        self._send(out)
                    except ProtocolError as exc:
                        self.rejected.append(exc.reason)
                        log.warning("%s rejected a downlink on %s: %s", self.device, event[1], exc)
                if now >= next_beat and self.transport.connected.is_set():
                    self._send(self.session.heartbeat(now, DeviceState.TRAINING if running else DeviceState.IDLE))
                    next_beat = now + self.heartbeat_s
                self._send(self.session.tick(now))
                if running is not None and self.session.superseded(running[0]):
                    log.info("%s: round %d superseded before its DELTA left", self.device, running[0].round)
                    self._send(self.session.complete(*running[:2], now))  # sends nothing; keeps the rng counter
                    running = None
            if job is not None and running is not None and job.round == running[0].round:
                job = None  # the job in progress, returned again after a reconnect or another downlink
            if job is not None and self.faults.fails(job.round):
                with self._lock:
                    self.session.skip(job)
                    # back up as a rebooted device would, it says which model it holds: else the coordinator's
                    # next GLOBAL_UPDATE could start from the version before this round's (refused as the wrong
                    # version, and the next round lost too), unless a heartbeat happened to come first
                    self._send(self.session.heartbeat(now, DeviceState.IDLE))
            elif job is not None:
                with self._lock:
                    self._send(self.session.heartbeat(now, DeviceState.TRAINING))
                result = self.training.run(job)  # outside the lock: paho may reconnect meanwhile
                running = (job, result, time.monotonic() + self.faults.delay(job.round))
            if running is not None and time.monotonic() >= running[2]:
                with self._lock:
                    self._send(self.session.complete(*running[:2], time.monotonic()))
                running = None
                self.rounds_done += 1

    def _wait(self, next_beat: float, delta_due: float | None) -> float:
        """Seconds the loop may sleep unless an event comes: until the next heartbeat (while connected: a reconnect is
        an event), the session's next resend or the trained DELTA's due time, at most MAX_WAIT_S. (A fixed 0.2 s poll
        woke each of a simulation's 50 agents 5 times a second for nothing.)"""
        with self._lock:
            resend = self.session.tick_due()
        beat = next_beat if self.transport.connected.is_set() else None
        due = [t for t in (beat, resend, delta_due) if t is not None]
        if not due:
            return MAX_WAIT_S
        return min(MAX_WAIT_S, max(0.0, min(due) - time.monotonic()) + 0.001)  # tick resends only once past due

    def _send(self, publishes: list[Publish]) -> None:
        for p in publishes:
            self.transport.publish(p)

    def stop(self, leave: bool = True) -> None:
        """Stop cleanly: LEAVE (unless leave=False), DISCONNECT (no last will), end the worker."""
        self._stop.set()
        self._events.put(("stop",))  # wakes the worker from its wait
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(30)
        if leave and self.transport.connected.is_set():
            with self._lock:
                mids = [self.transport.publish(p) for p in self.session.leave()]
            for mid in mids:
                self.transport.wait_published(mid, 5.0)
        self.transport.close()

    def kill(self) -> None:
        """Tests: die as a power cut would: no LEAVE, no DISCONNECT (the broker publishes the last will)."""
        self._stop.set()
        self._events.put(("stop",))
        if self._worker is not None:
            self._worker.join(30)
        self.transport.kill()
