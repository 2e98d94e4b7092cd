"""The Flower ServerApp: `flwr run` starts the same resumable round loop as `fedtiny coordinator`.

The devices are not SuperNodes (a SuperNode per microcontroller would cost ~250 MB and a gRPC stack each):
they are the nodes of a FleetGrid over MQTT, which this app builds from the run config. The Grid Flower hands
to `main` is not used for training, so under a SuperLink the run needs no SuperNode. The JSON-lines events go
to stderr, which Flower keeps as the run's log (`flwr log RUN`).

Run config keys (pyproject `[tool.flwr.app.config]`, or `flwr run --run-config 'key=value ...'`):

    broker             mqtts://HOST:PORT            fleet-dir        directory from `fedtiny keys`
    fleet              fleet name                   plan             training plan file
    state-db           SQLite checkpoint path       num-server-rounds  rounds (default 10)
    strategy           fedavg | fedavgm | ... | fedbuff           strategy-options  "beta=0.2,num_malicious_nodes=1"
    fraction-train     default 1.0                  quorum           default 0.8
    deadline           seconds, default 120         seen-within      seconds, default 600
    max-examples       default 10000                max-staleness    default 0 (synchronous)
    local-steps        default 0 (one epoch)        heldout          .npz/.csv for evaluation ("" = none)
    metrics-port       Prometheus port, 0 = off     metrics-host     default 127.0.0.1
    chunk-size         MQTT payload per chunk, 4096 uplink-keep      default 1.0 (send every change)
    clip-norm          update L2 norm, 0 = off      dp-epsilon       central DP budget, 0 = off (needs clip-norm)
    dp-delta           default 1e-5                 dp-noise-multiplier  0 = derived from the budget and rounds
    secagg             1 = secure aggregation (needs clip-norm; server/secagg.py)
    audit-log          the signed audit log (fedtiny/audit.py); "" = STATE-DB's name with .audit.jsonl
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a plant network has no internet
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from . import ops  # noqa: E402


@dataclass
class Settings:
    broker: str
    fleet_dir: str
    fleet: str
    plan: str
    state_db: str
    num_server_rounds: int = 10
    strategy: str = "fedavg"
    strategy_options: str = ""
    fraction_train: float = 1.0
    quorum: float = 0.8
    deadline: float = 120.0
    seen_within: float = 600.0
    max_examples: int = 10_000
    max_staleness: int = 0
    local_steps: int = 0
    heldout: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    chunk_size: int = 4096
    uplink_keep: float = 1.0  # fraction of each buffer's changes a DELTA carries; the rest waits (update.split_uplink)
    clip_norm: float = 0.0  # devices clip their DELTA to this L2 norm (real units), and the coordinator again
    dp_epsilon: float = 0.0  # central differential privacy's budget at dp_delta (0: no DP; server/privacy.py)
    dp_delta: float = 1e-5
    dp_noise_multiplier: float = 0.0  # 0: the smallest that keeps num_server_rounds within the budget
    secagg: int = 0  # 1: secure aggregation (server/secagg.py): masked deltas, the coordinator sees only the sum
    audit_log: str = ""  # "": beside state_db, named after it (audit_path)

    def audit_path(self) -> Path:
        return Path(self.audit_log) if self.audit_log else Path(self.state_db).with_suffix(".audit.jsonl")

    def privacy(self):
        """The run's PrivacySettings, or None without --dp-epsilon; ValueError naming a bad value."""
        from .privacy import PrivacySettings

        if not self.dp_epsilon:
            return None
        if not self.clip_norm > 0:
            raise ValueError("dp-epsilon needs clip-norm: the noise is calibrated to the clipped updates' L2 norm")
        return PrivacySettings(self.dp_epsilon, self.dp_delta, self.clip_norm, self.dp_noise_multiplier)

    def task(self) -> dict[str, float]:
        """The TASK settings every device gets (task.task_body)."""
        return {"local_steps": self.local_steps, "uplink_keep": self.uplink_keep, "clip_norm": self.clip_norm}

    def fleet_link(self, plan, store):
        """(the MQTT CoordinatorLink to the fleet, the names of its enrolled devices); not started. The link saves
        its durable state (downlink seq reservations, run) in `store` before it uses it."""
        from fedtiny.transport.mqtt import CoordinatorLink, load_fleet

        link = CoordinatorLink(self.broker, Path(self.fleet_dir), plan, fleet=self.fleet, chunk_size=self.chunk_size,
                               save=store.save_link_state)
        return link, set(load_fleet(Path(self.fleet_dir) / "coordinator")["devices"])

    @classmethod
    def from_run_config(cls, config: dict) -> Settings:
        """Keys with dashes (Flower style) or underscores; unknown keys are refused, types converted."""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown run-config key {key!r}; known: {', '.join(sorted(known))}")
            kind = {"int": int, "float": float, "str": str}[known[name].type]
            values[name] = kind(value)
        missing = [n for n in ("broker", "fleet_dir", "fleet", "plan", "state_db") if n not in values]
        if missing:
            raise ValueError(f"run config lacks {', '.join(k.replace('_', '-') for k in missing)}")
        return cls(**values)


def parse_options(text: str) -> dict:
    """"beta=0.2,num_malicious_nodes=1" -> {"beta": 0.2, "num_malicious_nodes": 1}."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"strategy option {item!r} must read KEY=VALUE")
        value: object = {"true": True, "false": False}.get(raw.lower(), raw)
        for parse in (int, float):
            try:
                value = parse(raw)
                break
            except ValueError:
                continue
        out[key.strip().replace("-", "_")] = value
    return out


REGISTRY_SETTLE_S = 3.0


def await_registry(link, enrolled: set[str], clock=time.monotonic, settle: float = REGISTRY_SETTLE_S) -> None:
    """A fresh link learns the fleet's devices from their retained STATUS messages, which the broker delivers
    just after the subscription. A strategy samples from the devices known when it configures the round, so wait
    until every enrolled device has been heard of (online or not), or `settle` seconds for a device that never
    connected: otherwise the first round would go to whichever devices' STATUS happened to arrive first."""
    end = clock() + settle
    while enrolled and not enrolled <= {d.device for d in link.devices()} and clock() < end:
        time.sleep(0.02)


def run_coordinator(settings: Settings, link=None, metrics: ops.Metrics | None = None):
    """Build link, store and coordinator from settings, run every round, close everything; returns the history.
    `link` replaces the MQTT CoordinatorLink (tests)."""
    from fedtiny.planfile import load_plan

    from .grid import RoundPolicy
    from .rounds import Coordinator, CoordinatorConfig
    from .state import StateStore

    plan = load_plan(settings.plan)
    policy = RoundPolicy(quorum=settings.quorum, deadline=settings.deadline, seen_within=settings.seen_within,
                         max_examples=settings.max_examples, max_staleness=settings.max_staleness,
                         task=settings.task())
    options = {"fraction_train": settings.fraction_train, **parse_options(settings.strategy_options)}
    config = CoordinatorConfig(settings.num_server_rounds, settings.strategy, options, policy,
                               privacy=settings.privacy(), secagg=bool(settings.secagg))
    metrics = metrics or ops.Metrics()
    heldout = None
    if settings.heldout:
        from fedtiny.datafile import load_user_data
        from fedtiny.interpreter import standardize_input

        outputs = plan.graph.tensors[plan.graph.outputs[0]].shape[-1]
        classes = plan.graph.meta.get("classes") or [str(i) for i in range(outputs)]
        ds = load_user_data(settings.heldout, classes=classes)  # labels named as the model's classes
        heldout = (standardize_input(plan.graph, ds.X), ds.y)  # raw features, as the host standardized them
    server = ops.MetricsServer(metrics, settings.metrics_port, settings.metrics_host).start() \
        if settings.metrics_port else None
    enrolled: set[str] = set()
    from .audit import CoordinatorAudit, open_audit_log

    # The audit log needs the coordinator's audit key from `fedtiny keys`: the fleet link refuses to run without
    # it; a link passed in (tests with a fake fleet) is audited when the folder has the key.
    coordinator_dir = Path(settings.fleet_dir) / "coordinator"
    audit = None
    if link is None or (coordinator_dir / "audit.key").exists():
        audit = CoordinatorAudit(open_audit_log(settings.audit_path(), coordinator_dir), coordinator_dir)
    store = StateStore(settings.state_db)
    if link is None:
        link, enrolled = settings.fleet_link(plan, store)
    coordinator = None
    try:
        store.restore_link(link, status_streams=False)  # before it connects (StateStore.restore_link)
        link.start()
        await_registry(link, enrolled)
        coordinator = Coordinator(link, plan, store, config, metrics=metrics, heldout=heldout, audit=audit)
        return coordinator.run()
    finally:
        if audit is not None:
            audit.close(coordinator)
        link.close()
        store.close()
        if server is not None:
            server.stop()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # JSON lines on stderr, which Flower keeps as the run's log (`flwr log RUN`), for this run only
    handler = None if ops.LOG.handlers else ops.setup_json_logging(sys.stderr)
    try:
        settings = Settings.from_run_config(dict(context.run_config))
        ops.event("serverapp_started", run_id=context.run_id, fleet=settings.fleet, broker=settings.broker,
                  rounds=settings.num_server_rounds, strategy=settings.strategy)
        run_coordinator(settings)
    finally:
        if handler is not None:
            ops.LOG.removeHandler(handler)
            ops.LOG.propagate = True
