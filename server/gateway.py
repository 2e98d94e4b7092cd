"""A site gateway for the scale-out deployment: a Flower ClientApp on a site's SuperNode that runs each
round over its own broker and devices and answers the SuperLink with the site's pre-aggregate.

    SuperLink + ServerApp (any flwr strategy, e.g. FedAvg)       one per deployment
      |  gRPC (Flower)
    SuperNode per site -> this ClientApp                         one per plant / site
      |  MQTT (the site's broker)
    devices of the site                                          NodeAgents / firmware

For a train message the gateway adopts the global arrays as its site's model version, sends TASK (+ the
changed tensors) to the site's devices through a FleetGrid, waits for a quorum or the deadline, and averages
the replies with FedAvg (weights: clamped num-examples). Its reply carries the site average and
"num-examples" = the sum of the site's clamped examples, so FedAvg over sites equals FedAvg over all devices.
Robust strategies (median, trimmed mean, Krum) then act per site. The site's state (versions, registry,
accepted replies, the link's uplink replay counters) is in its own SQLite file, committed with every round, so
a gateway restart loses no accepted reply and takes no uplink it had accepted before. Each round opens the
site's link afresh from that file, as a restarted gateway does.

Per-site settings come from the SuperNode's node config, with the same keys as the ServerApp's run config
(broker, fleet-dir, fleet, plan, state-db, quorum, deadline, ...).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from . import ops  # noqa: E402
from .app import Settings, await_registry  # noqa: E402
from .grid import FleetGrid, GlobalModel, RoundPolicy  # noqa: E402
from .requantize import dequantize_state, tensor_specs  # noqa: E402
from .state import StateStore, link_meta  # noqa: E402


def site_round(settings: Settings, server_round: int, arrays: ArrayRecord, link=None, clock=time.monotonic
               ) -> tuple[ArrayRecord, MetricRecord]:
    """One round over the site's devices from the global `arrays`; returns (site average, metrics)."""
    from fedtiny.planfile import load_plan, plan_hash

    plan = load_plan(settings.plan)
    specs = tensor_specs(plan)
    enrolled: set[str] = set()
    store = StateStore(settings.state_db)
    if link is None:
        link, enrolled = settings.fleet_link(plan, store)
    try:
        store.restore_link(link, status_streams=False)  # a DELTA accepted before stays refused
        link.start()
        await_registry(link, enrolled, clock)
        store.restore_link(link)
        ints = plan.initial_state()
        store.initialize(dequantize_state(specs, ints), ints, plan_hash(plan).hex())
        ckpt = store.load()
        model = GlobalModel(specs, ckpt.master, ckpt.ints, ckpt.model_version, store)
        policy = RoundPolicy(quorum=settings.quorum, deadline=settings.deadline, seen_within=settings.seen_within,
                             max_examples=settings.max_examples, task=settings.task())
        grid = FleetGrid(link, model, store, policy, devices=ckpt.devices, clock=clock, plan_hash=plan_hash(plan))
        grid.recover([r for r in ckpt.pending if r.round == server_round])
        strategy = FedAvg(fraction_train=settings.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                          min_evaluate_nodes=0, min_available_nodes=1)
        grid.begin_round(server_round)
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        replies = [m for m in grid.send_and_receive(messages, timeout=settings.deadline) if not m.has_error()]
        if not replies:
            raise RuntimeError(f"no device of site {settings.fleet} replied in round {server_round}")
        site_arrays, site_metrics = strategy.aggregate_train(server_round, replies)
        examples = sum(int(next(iter(m.content.metric_records.values()))["num-examples"]) for m in replies)
        store.commit_round(server_round, model.version, model.master, model.ints, None, grid.registry,
                           {"train": dict(site_metrics or {}), "replies": len(replies)}, link_meta(link))
        metrics = MetricRecord({**dict(site_metrics or {}), "num-examples": examples, "site-replies": len(replies)})
        ops.event("site_round_completed", fleet=settings.fleet, round=server_round, replies=len(replies),
                  num_examples=examples)
        return site_arrays, metrics
    finally:
        link.close()
        store.close()


gateway = ClientApp()


@gateway.train()
def train(msg: Message, context: Context) -> Message:
    settings = Settings.from_run_config(dict(context.node_config))
    config = next(iter(msg.content.config_records.values()), ConfigRecord())
    arrays = next(iter(msg.content.array_records.values()))
    site_arrays, metrics = site_round(settings, int(config.get("server-round", 1)), arrays)
    return Message(RecordDict({"arrays": site_arrays, "metrics": metrics}), reply_to=msg)
