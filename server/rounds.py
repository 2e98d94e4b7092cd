"""The coordinator's round loop: Flower's strategies, unchanged, driven over a FleetGrid.

It is `Strategy.start`'s loop (configure_train -> send_and_receive -> aggregate_train -> evaluate), made
resumable: it starts at the round after the last checkpoint, restores the strategy's own state (server
momentum, Adam moments, the FedBuff buffer), and ends every round with one SQLite transaction.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.exception import InconsistentMessageReplies, PrivacyBudgetExhausted

from fedtiny.compiler import Plan
from fedtiny.planfile import plan_hash

from . import ops
from .fedbuff import FedBuff
from .grid import Arrivals, FleetGrid, GlobalModel, RoundPolicy
from .privacy import CentralPrivacy, DistributedPrivacy, PrivacySettings, privacy_summary
from .requantize import dequantize_state, tensor_specs
from .state import StateStore, link_meta

STRATEGIES = {
    "fedavg": flwr_strategies.FedAvg,
    "fedavgm": flwr_strategies.FedAvgM,
    "fedprox": flwr_strategies.FedProx,
    "fedadam": flwr_strategies.FedAdam,
    "fedyogi": flwr_strategies.FedYogi,
    "fedadagrad": flwr_strategies.FedAdagrad,
    "fedmedian": flwr_strategies.FedMedian,
    "fedtrimmedavg": flwr_strategies.FedTrimmedAvg,
    "krum": flwr_strategies.Krum,
    "multikrum": flwr_strategies.MultiKrum,
    "fedbuff": FedBuff,
}


FLEET_DEFAULTS = dict(fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0, min_available_nodes=1)


def make_strategy(name: str, **options):
    """A strategy by (case-insensitive) name. Options the strategy's constructor does not take are refused.

    Defaults suit a fleet: any number of devices may train (min 1), and devices are not asked to evaluate on
    request (fraction_evaluate 0): they report loss/accuracy with every DELTA, aggregated by examples.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    cls = STRATEGIES[key]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    if cls is FedBuff:
        params |= set(inspect.signature(flwr_strategies.FedAvg.__init__).parameters) - {"self"}
    unknown = set(options) - params
    if unknown:
        raise ValueError(f"{cls.__name__} takes no option(s) {sorted(unknown)}")
    settings = {k: v for k, v in FLEET_DEFAULTS.items() if k in params}
    settings.update(options)
    return cls(**settings)


def strategy_state(strategy) -> dict[str, np.ndarray]:
    """The server-side optimizer state a strategy keeps between rounds, as named arrays."""
    out = {}
    if isinstance(strategy, (CentralPrivacy, DistributedPrivacy)):  # its privacy ledger, then the wrapped one's
        out.update(strategy.state_arrays())
        strategy = strategy.strategy
    if isinstance(strategy, FedBuff):
        out.update(strategy.state_arrays())
    for attr in ("m_t", "v_t"):
        value = getattr(strategy, attr, None)
        if value:
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
    momentum = getattr(strategy, "momentum_vector", None)
    if momentum is not None:
        out.update({f"momentum_vector/{i}": np.asarray(v) for i, v in enumerate(momentum)})
    return out


def load_strategy_state(strategy, arrays: dict[str, np.ndarray] | None) -> None:
    if not arrays:
        return
    if isinstance(strategy, (CentralPrivacy, DistributedPrivacy)):
        strategy.load_state_arrays(arrays)
        strategy = strategy.strategy
    if isinstance(strategy, FedBuff):
        strategy.load_state_arrays(arrays)
    for attr in ("m_t", "v_t"):
        part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
        if part:
            setattr(strategy, attr, part)
    momentum = sorted((int(k.split("/")[1]), v) for k, v in arrays.items() if k.startswith("momentum_vector/"))
    if momentum:
        strategy.momentum_vector = [v for _, v in momentum]


# --- server-side evaluation -----------------------------------------------------------------------------------

def heldout_evaluator(plan: Plan, model: GlobalModel, x: np.ndarray, y: np.ndarray, batch: int = 256,
                      forward: Callable[[dict, np.ndarray], np.ndarray] | None = None
                      ) -> Callable[[int, ArrayRecord], MetricRecord]:
    """evaluate_fn(round, arrays): accuracy, cross-entropy and the confusion matrix (row: true class, column:
    predicted; flattened, as a MetricRecord holds flat lists) of the int8 graph with the global integers on a
    held-out set (x in the float model's layout). `forward(ints, x_int8)` -> int8 outputs runs the graph (a
    simulation passes the C runtime's, fedtiny_device.cruntime.CPlanModel); default: the reference interpreter,
    `batch` samples at a time."""
    from fedtiny.interpreter import dequantize, quantize_input, run

    y = np.asarray(y)
    xq = quantize_input(plan.graph, x)
    if forward is None:
        def forward(ints, xq):
            graph = plan.graph_with(ints)
            return np.concatenate([run(graph, xq[i:i + batch]) for i in range(0, len(xq), batch)])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        logits = dequantize(plan.graph, plan.graph.outputs[0], forward(model.ints, xq)).reshape(len(x), -1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return MetricRecord({"accuracy": float((logits.argmax(1) == y).mean()),
                             "loss": float(-log_p[np.arange(len(y)), y].mean()), "examples": int(len(y)),
                             "confusion": confusion_matrix(y, logits.argmax(1), logits.shape[1])})

    return evaluate


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> list[int]:
    """Counts of (true class, predicted class), row by row: entry t * classes + p."""
    return [int(v) for v in np.bincount(np.asarray(labels) * classes + np.asarray(predicted),
                                        minlength=classes * classes)]


# --- the loop -------------------------------------------------------------------------------------------------

@dataclass
class CoordinatorConfig:
    rounds: int = 10
    strategy: str = "fedavg"
    strategy_options: dict = field(default_factory=dict)
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    train_config: dict = field(default_factory=dict)  # extra ConfigRecord entries for every train message
    privacy: PrivacySettings | None = None  # central differential privacy (server/privacy.py)
    secagg: bool = False  # secure aggregation (server/secagg.py): devices mask, the strategy gets only the mean


@dataclass
class RoundResult:
    round: int
    model_version: int
    replies: int
    train_metrics: dict
    eval_metrics: dict
    aggregation_seconds: float
    seconds: float


class Coordinator:
    def __init__(self, link, plan: Plan, store: StateStore, config: CoordinatorConfig | None = None, *,
                 metrics: ops.Metrics | None = None, clock: Callable[[], float] = time.monotonic,
                 heldout: tuple[np.ndarray, np.ndarray] | None = None,
                 heldout_forward: Callable[[dict, np.ndarray], np.ndarray] | None = None,
                 arrivals: Arrivals | None = None, audit=None) -> None:
        """`heldout_forward`: how the held-out evaluation runs the graph (heldout_evaluator); `arrivals`: run
        synchronous rounds in virtual time (a simulation; FleetGrid); default: wall time. `audit`: the signed audit
        log's hooks (server/audit.py CoordinatorAudit), told of the start, each round and a stop."""
        self.plan = plan
        self.config = config or CoordinatorConfig()
        self.store = store
        self.metrics = metrics or ops.Metrics()
        specs = tensor_specs(plan)
        ints = plan.initial_state()
        store.initialize(dequantize_state(specs, ints), ints, plan_hash(plan).hex())
        if store.meta("plan_hash") not in ("", plan_hash(plan).hex()):
            raise ValueError(f"{store.path} holds a run of another training plan; use a new --state-db")
        ckpt = store.load()
        self.model = GlobalModel(specs, ckpt.master, ckpt.ints, ckpt.model_version, store)
        if self.config.secagg:
            from fedtiny.protocol.secagg import check_plan

            from .secagg import check_strategy

            check_strategy(self.config.strategy)
            check_plan(plan)
            if not float(self.config.train_config.get("clip_norm", self.config.policy.task.get("clip_norm", 0))) > 0:
                raise ValueError("secure aggregation needs a clip norm (the devices clip; the coordinator cannot)")
            self.config.train_config["secagg"] = 1
        self.strategy = make_strategy(self.config.strategy, **self.config.strategy_options)
        if self.config.privacy is not None and self.config.secagg:  # the devices add the noise (distributed DP)
            self.strategy = DistributedPrivacy(self.strategy, self.config.privacy, plan, self.config.rounds)
        elif self.config.privacy is not None:
            self.strategy = self.config.privacy.wrap(self.strategy, self.config.rounds)
        self.stopped: str | None = None  # why the run ended before its rounds (the privacy budget)
        load_strategy_state(self.strategy, ckpt.strategy)
        policy = self.config.policy
        if isinstance(self.strategy, FedBuff):
            policy.max_staleness = max(policy.max_staleness, 1)
            policy.buffer_size = policy.buffer_size or self.strategy.buffer_size
        self.grid = FleetGrid(link, self.model, store, policy, devices=ckpt.devices, metrics=self.metrics,
                              clock=clock, plan_hash=plan_hash(plan), arrivals=arrivals)
        self.grid.secagg = self.config.secagg
        self.grid.recover(ckpt.pending)
        # Uplink replay counters live in the link's envelope layer; a link that can export them has them
        # checkpointed with each round (the accepted-reply ids in the store refuse old replies either way).
        self.link = link
        store.restore_link(link)
        self.round = ckpt.round
        self.evaluate_fn = heldout_evaluator(plan, self.model, *heldout, forward=heldout_forward) \
            if heldout is not None else None
        self.history: list[RoundResult] = []
        self.metrics.set("fedtiny_round", self.round)
        self.metrics.set("fedtiny_model_version", self.model.version)
        ops.event("coordinator_started", round=self.round, model_version=self.model.version,
                  strategy=type(self.strategy).__name__, recovered_replies=len(ckpt.pending),
                  devices=len(ckpt.devices), **self._secagg_settings())
        self.audit = audit
        if audit is not None:
            audit.started(self)

    def _secagg_settings(self) -> dict:
        if not self.config.secagg:
            return {}
        from .secagg import SETTINGS_NOTE

        clip = self.config.train_config.get("clip_norm", self.config.policy.task.get("clip_norm", 0))
        out = dict(secure_aggregation=True, robust_aggregation=False, settings_note=SETTINGS_NOTE,
                   clip_norm=float(clip),
                   threshold="a strict majority of each device's neighbours (graph degree 6 ceil(log2 n), at most 64)")
        if self.config.privacy is not None:
            out["differential_privacy"] = ("distributed: each device adds discrete Gaussian noise before masking, "
                                           "sigma = z C / sqrt(m), m the survivors the round's quorum expects "
                                           "(fedtiny.privacy.calibrated_survivors); rounds with fewer survivors are "
                                           "not unmasked")
        return out

    def run(self, rounds: int | None = None) -> list[RoundResult]:
        """Run rounds until `rounds` (default: the configured total) are complete, counting restored ones."""
        total = self.config.rounds if rounds is None else rounds
        if self.round == 0 and self.evaluate_fn is not None:
            res = self.evaluate_fn(0, self.model.arrays())
            self._eval_metrics(res)
            ops.event("initial_evaluation", **dict(res))
        while self.round < total:
            try:
                self.history.append(self.run_round(self.round + 1))
            except PrivacyBudgetExhausted as exc:
                self.stop(str(exc))
                break
        return self.history

    def stop(self, reason: str) -> None:
        """The run ends before its configured rounds: say why (once, in the log)."""
        self.stopped = reason
        ops.event("run_stopped", logging.WARNING, round=self.round, reason=reason)
        if self.audit is not None:
            self.audit.stopped(self, reason)

    def privacy(self) -> dict | None:
        """The run's differential privacy: settings, fleet epsilon and each device's (None without DP)."""
        return privacy_summary(self.strategy, {r.device_id: r.device for r in self.grid.registry.values()})

    def run_round(self, rnd: int) -> RoundResult:
        start = time.perf_counter()
        self.grid.begin_round(rnd)
        arrays = self.model.arrays()
        config = ConfigRecord(dict(self.config.train_config))
        messages = self.strategy.configure_train(rnd, arrays, config, self.grid)
        if self.audit is not None:
            self.audit.round_configured(self, rnd, messages)
        # In node order, not arrival order: float sums then do not depend on network timing, so a seed
        # reproduces a run bit for bit.
        replies = sorted(self.grid.send_and_receive(messages, timeout=self.config.policy.deadline),
                         key=lambda m: m.metadata.src_node_id)
        participants = len(replies)
        if self.config.secagg and replies:  # one reply, the mean of this many devices' masked deltas
            participants = int(replies[0].content.metric_records["metrics"]["num-examples"])
        with ops.Stopwatch() as watch:
            try:
                new_arrays, train_metrics = self.strategy.aggregate_train(rnd, replies)
            except InconsistentMessageReplies as exc:
                ops.event("aggregation_skipped", round=rnd, reason=str(exc))
                new_arrays, train_metrics = None, None
        if new_arrays is not None:
            self.model.advance({k: v.numpy() for k, v in new_arrays.items()})
        eval_metrics = self.evaluate_fn(rnd, self.model.arrays()) if self.evaluate_fn else None
        train = dict(train_metrics or {})
        evaluation = dict(eval_metrics or {})
        self.store.commit_round(rnd, self.model.version, self.model.master, self.model.ints,
                                strategy_state(self.strategy), self.grid.registry,
                                {"train": train, "eval": evaluation, "replies": participants},
                                extra_meta=link_meta(self.link))
        self.round = rnd
        if self.audit is not None:
            self.audit.round_completed(self, rnd, replies)
        seconds = time.perf_counter() - start
        self.metrics.inc("fedtiny_rounds_total")
        self.metrics.set("fedtiny_round", rnd)
        self.metrics.set("fedtiny_model_version", self.model.version)
        self.metrics.observe("fedtiny_aggregation_seconds", watch.seconds)
        self.metrics.observe("fedtiny_round_seconds", seconds)
        self._eval_metrics(eval_metrics)
        result = RoundResult(rnd, self.model.version, participants, train, evaluation, watch.seconds, seconds)
        if not replies:
            ops.event("round_without_replies", logging.WARNING, round=rnd,
                      devices_online=len(self.link.devices(seen_within=self.config.policy.seen_within)))
        ops.event("round_completed", round=rnd, model_version=self.model.version, replies=participants,
                  train=train, eval=evaluation, aggregation_seconds=round(watch.seconds, 6),
                  seconds=round(seconds, 3))
        return result

    def _eval_metrics(self, res) -> None:
        if res:
            if "accuracy" in res:
                self.metrics.set("fedtiny_eval_accuracy", res["accuracy"])
            if "loss" in res:
                self.metrics.set("fedtiny_eval_loss", res["loss"])
