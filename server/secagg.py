"""Secure-aggregation rounds at the coordinator (fedtiny/protocol/secagg.py has the protocol): FleetGrid's
send_and_receive for a round whose devices send masked deltas.

The link runs the stages (CoordinatorSession.begin_secagg / secagg_close); this module opens the round before its
TASKs go out, closes each stage at its deadline, closes the masked stage when the round closes (the quorum or the
deadline; in virtual time, admitting exactly the devices whose reply arrives by the virtual close) and turns the
one outcome into one reply for Flower's strategy: the survivors' mean update, base + dequantized sum / m. The
strategy never sees an individual device's update, so:

- every survivor weighs the same (the mean of the survivors' deltas; num-examples cannot be checked under masks);
- robust aggregation (median, trimmed mean, Krum) is not possible: it needs individual updates. Devices clip
  their deltas (the TASK's clip_norm, required) and clamp every element to the bound the moduli are chosen for
  (secagg.value_bounds); the coordinator cannot clip again, and a malicious device's contribution is bounded only
  by that modulus. check_strategy refuses the robust strategies and FedBuff (no semi-asynchronous masking).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from . import ops

ROBUST_OR_ASYNC = {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "fedbuff"}
SETTINGS_NOTE = ("secure aggregation: the coordinator sees only the sum of the survivors' masked deltas; "
                 "robust aggregation is not possible, devices clip to clip_norm; survivors weigh equally")


def check_strategy(name: str) -> None:
    key = name.lower().replace("-", "").replace("_", "")
    if key in ROBUST_OR_ASYNC:
        raise ValueError(f"strategy {name} needs individual updates or semi-asynchronous rounds, which secure "
                         f"aggregation hides; use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad (devices "
                         f"clip their updates instead)")


def send_and_receive_masked(grid, messages, wait: float) -> list[Message]:
    """One synchronous round with masked deltas over `grid` (a FleetGrid whose link implements begin_secagg,
    secagg_status, secagg_close and secagg_outcomes): at most one reply, the survivors' mean."""
    from .grid import ReplyDeadline, VirtualRound

    messages = list(messages)
    if not messages:
        return []
    config = next(iter(messages[0].content.config_records.values()), ConfigRecord())
    round_ = int(config.get("server-round", messages[0].metadata.group_id or grid.round or 1))
    if round_ != grid.round:
        grid.begin_round(round_)
    arrays = next(iter(messages[0].content.array_records.values()), None)
    version = grid.model.adopt(arrays) if arrays is not None else grid.model.version
    task = dict(grid.policy.task)
    task.update({k: float(v) for k, v in config.items() if "-" not in k and isinstance(v, (int, float))})
    cohort = sorted({grid._by_id[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id in grid._by_id})
    link = grid.link
    # distributed DP (server/privacy.py DistributedPrivacy); in the TASK too: each device refuses to reveal shares
    # for fewer survivors
    minimum = int(config.get("min_survivors", 0))
    link.begin_secagg(round_, version, cohort, float(task.get("clip_norm", 0.0)), float(task.get("noise_sigma", 0.0)),
                      **({"min_survivors": minimum} if minimum else {}))
    ids = list(grid.push_messages(messages))
    tasks = {grid._pending[m].device: grid._pending[m] for m in ids if grid._pending[m].open}
    policy, clock = grid.policy, grid.clock
    # In virtual time (a simulation) a stage waits for its messages however slow the machine is (ReplyDeadline:
    # RoundPolicy.reply_timeout from the stage's latest message, as a plain virtual round's), so only a stage that
    # hears nothing for that long is closed on its silent devices. In wall time (a deployment) each stage has the
    # round's deadline from its start.
    def wait_while(stage_is, enough=lambda received: False) -> None:
        deadline = ReplyDeadline(clock, wait, policy, virtual=grid.arrivals is not None)
        while True:
            stage, received = link.secagg_status(round_)
            if not stage_is(stage) or enough(received):
                return
            remaining = deadline.remaining(len(received))
            if remaining <= 0:
                return
            # rejections become events; a masked DELTA is never a reply here, so this waits the whole poll
            grid.poll(min(policy.poll, remaining))

    for stage in ("keys", "shares"):  # devices answer these at once; a device that does not is a dropout
        wait_while(lambda s, stage=stage: s == stage)
        if link.secagg_status(round_)[0] == stage:
            link.secagg_close(round_)
    admitted = None
    if grid.arrivals is not None:
        virtual = VirtualRound.plan(round_, {d: grid.arrivals(d, round_) for d in tasks}, 0,
                                    policy.target(len(tasks)), wait)
        admitted = set(virtual.admitted)
        ops.event("round_schedule", round=round_, close=round(virtual.close, 6), admitted=len(virtual.admitted),
                  expected=len(virtual.expected), cohort=len(tasks))
        wait_while(lambda s: s == "masked", lambda got: virtual.expected <= got)
    else:
        wait_while(lambda s: s == "masked", lambda got: len(got) >= policy.target(len(tasks)))
    if link.secagg_status(round_)[0] == "masked":
        link.secagg_close(round_, admitted)
    wait_while(lambda s: s == "unmask")
    if link.secagg_status(round_)[0] == "unmask":
        link.secagg_close(round_)
    grid.poll(0.0)
    outcomes = [o for o in link.secagg_outcomes() if o.round == round_]
    for p in tasks.values():
        p.open = False
        grid._closed.add((p.device, p.round))
    if not outcomes:
        ops.event("secagg_round", logging.WARNING, round=round_, failure="no outcome")
        return []
    outcome = outcomes[0]
    grid.secagg_log[round_] = list(outcome.log)  # its threshold and counts, for the audit log (server/audit.py)
    grid.metrics.inc("fedtiny_uplink_bytes_total", sum(outcome.uplink_bytes.values()))
    grid.metrics.inc("fedtiny_downlink_bytes_total", sum(outcome.downlink_bytes.values()))
    names = {r.device_id: r.device for r in grid.registry.values()}
    if outcome.result is None:
        ops.event("secagg_round", logging.WARNING, round=round_, failure=outcome.failure, stages=list(outcome.log),
                  uplink_bytes=outcome.uplink_bytes)
        return []
    result = outcome.result
    survivors = sorted(names.get(i, f"{i:#010x}") for i in result.survivors)
    ops.event("secagg_round", round=round_, stages=list(outcome.log), survivors=survivors,
              dropped=sorted(names.get(i, f"{i:#010x}") for i in result.dropped),
              bad_shares=sorted(names.get(i, f"{i:#010x}") for i in result.bad_shares), uplink_bytes=outcome.uplink_bytes,
              seen="the sum of the survivors' masked deltas only")
    grid.secagg_metrics[round_] = {names.get(i, f"{i:#010x}"): m for i, m in result.metrics.items()}
    for name in survivors:
        record = grid.registry.get(name)
        if record is not None:
            record.accepted += 1
            record.last_round = round_
        grid._accepted_in(round_).add(name)
    reply_to = tasks[survivors[0]].message
    return [Message(mean_content(grid.model, version, result, grid.policy.metric_keys), reply_to=reply_to)]


def mean_content(model, version: int, result, metric_keys) -> RecordDict:
    """The reply Flower's strategy aggregates: the survivors' mean model, base + dequantized sum / m, in float."""
    base = model.master_of(version)
    m = len(result.survivors)
    arrays = ArrayRecord({n: Array(np.asarray(base[n], np.float64) + spec.dequantize(result.total[n]) / m)
                          for n, spec in model.specs.items()})
    metrics = MetricRecord({"num-examples": m})
    for key, value in (("loss", result.loss), ("accuracy", result.accuracy)):
        if key in metric_keys:
            metrics[key] = float(value)
    return RecordDict({"arrays": arrays, "metrics": metrics})
