"""Secure aggregation through the sans-IO sessions: DeviceSessions and a CoordinatorSession exchanging their
real MQTT frames (chunked, signed, encrypted), every stage of a round, devices dropping after masking."""

import numpy as np
import pytest

from fedtiny.protocol import topics
from fedtiny.protocol.coordinator import CoordinatorSession
from fedtiny.protocol.device import DeviceSession, NodeState, TrainResult
from fedtiny.protocol.envelope import DeviceEndpoint, Flags, Header, Identity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.chunking import Reassembler
from fedtiny.protocol.messages import MessageType, SecAggUnmask
from fedtiny.protocol.update import uplink_delta

from test_secagg import plan  # noqa: F401  (fixture)

FLEET = "secagg-fleet"
CLIP = 0.5


class Fleet:
    def __init__(self, plan, n, peers=True):
        self.plan = plan
        self.names = [f"dev-{i:02d}" for i in range(n)]
        coord = Identity.from_seed(b"secagg coordinator")
        ids = {name: Identity.from_seed(name.encode()) for name in self.names}
        self.fleet_id = topics.name_id(FLEET)
        self.coordinator = CoordinatorSession(plan, FLEET, self.fleet_id, coord, {k: v.public for k, v in ids.items()},
                                              chunk_size=512)
        public = {topics.name_id(k): v.public for k, v in ids.items()}
        self.devices = {
            name: DeviceSession(plan, name, FLEET, DeviceEndpoint(self.fleet_id, topics.name_id(name), ids[name],
                                                                  coord.public),
                                NodeState(0, plan.initial_state(), 0), 512, lambda state: None,
                                peers=public if peers else None)
            for name in self.names}
        self.jobs, self.errors = {}, []
        self.uplinks = []  # every frame a device published: what the broker and the coordinator get

    def pump(self, publishes, now=1.0):
        queue = list(publishes)
        while queue:
            p = queue.pop(0)
            _, kind, device = topics.parse(p.topic)
            if kind in ("up", "status"):
                self.uplinks.append(p)
                queue += self.coordinator.receive(p.topic, p.payload, now)
            else:
                targets = self.names if kind == "bcast" else [device]
                for name in targets:
                    out, job = self.devices[name].receive(p.topic, p.payload, now)
                    queue += out
                    if job is not None:
                        self.jobs[name] = job

    def trained(self, name):
        rng = np.random.default_rng(self.names.index(name))
        out = {}
        for buffer, v in self.plan.initial_state().items():
            step = rng.integers(-5, 6, v.shape) if v.dtype == np.int8 else rng.integers(-3000, 3000, v.shape)
            info = np.iinfo(v.dtype)
            out[buffer] = np.clip(v.astype(np.int64) + step, info.min, info.max).astype(v.dtype)
        return out

    def round(self, rnd, dropouts=(), config=None):
        for name in self.names:
            self.pump(self.devices[name].on_connect(0.5), 0.5)
        self.coordinator.begin_secagg(rnd, 0, self.names, CLIP)
        for name in self.names:
            self.pump(self.coordinator.send_task(name, rnd, 0, None, config or {"secagg": 1, "clip_norm": CLIP}))
        expected = {}
        for name in self.names:
            job = self.jobs.pop(name, None)
            if job is None:
                continue
            if name in dropouts:
                self.devices[name].skip(job)
                continue
            result = TrainResult(self.trained(name), 8, 0.25, 0.5, 0)
            expected[name], _ = uplink_delta(self.plan, job.base, result.state, None, keep=1.0, clip_norm=CLIP)
            self.pump(self.devices[name].complete(job, result, 2.0), 2.0)
        self.pump(self.coordinator.secagg_close(rnd), 3.0)
        return expected


def test_a_round_through_the_sessions_sums_the_survivors_exactly(plan):
    """10 devices, 3 drop after sending their keys and shares (30 %): the coordinator's one result is the exact
    sum of the 7 survivors' clipped deltas, and it never makes a per-device reply."""
    fleet = Fleet(plan, 10)
    expected = fleet.round(1, dropouts=set(fleet.names[:3]))
    assert fleet.coordinator.take_replies() == []  # no individual update reaches aggregation
    assert fleet.coordinator.take_rejections() == []
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.failure == "" and len(outcome.result.survivors) == 7 and len(outcome.result.dropped) == 3
    for name in plan.trainable_buffers():
        assert np.array_equal(outcome.result.total[name], sum(e[name].astype(np.int64) for e in expected.values()))
    assert [entry["stage"] for entry in outcome.log] == ["keys", "shares", "masked", "unmasked"]
    assert set(outcome.uplink_bytes) == set(fleet.names)
    for name in fleet.names[3:]:  # every survivor's upload was ACKed: it holds nothing to resend
        assert fleet.devices[name].state.upload is None and fleet.devices[name].state.trained_round == 1


@pytest.mark.parametrize("restored", [True, False])
def test_a_coordinator_restart_mid_round_abandons_it_and_the_next_round_runs(plan, restored):
    """The coordinator's session is lost after every device sent its masked DELTA and before it asked for any
    share. Restarted from its durable state (the same run), it asks for round 1 again: every device refuses a TASK
    for a round it already sealed a DELTA for (its persisted trained_round; no keys, nothing revealed) and the round
    fails cleanly; round 2 sums exactly. Restarted
    without its state (a lost database), it begins a new run: the devices derive new round secrets, and round 1 runs
    afresh and sums exactly."""
    fleet = Fleet(plan, 5)
    for name in fleet.names:
        fleet.pump(fleet.devices[name].on_connect(0.5), 0.5)
    fleet.coordinator.begin_secagg(1, 0, fleet.names, CLIP)
    for name in fleet.names:
        fleet.pump(fleet.coordinator.send_task(name, 1, 0, None, {"secagg": 1, "clip_norm": CLIP}))
    for name in fleet.names:
        job = fleet.jobs.pop(name)
        fleet.pump(fleet.devices[name].complete(job, TrainResult(fleet.trained(name), 8, 0.25, 0.5, 0), 2.0), 2.0)
    assert fleet.coordinator.secagg_status(1) == ("masked", set(fleet.names))  # then the coordinator goes down
    durable, run = fleet.coordinator.durable_state(), fleet.coordinator.run
    restarted = CoordinatorSession(plan, FLEET, fleet.fleet_id, Identity.from_seed(b"secagg coordinator"),
                                   {name: Identity.from_seed(name.encode()).public for name in fleet.names},
                                   chunk_size=512)
    if restored:
        restarted.restore(durable)
    fleet.coordinator = restarted
    for rnd in (1, 2):
        expected = fleet.round(rnd)
        (outcome,) = fleet.coordinator.take_secagg_outcomes()
        if restored and rnd == 1:
            assert expected == {} and outcome.result is None and outcome.failure.startswith("secagg-failed")
            assert [entry["stage"] for entry in outcome.log] == ["keys"]  # failed before any share was asked for
            continue
        assert outcome.failure == "" and sorted(outcome.result.survivors) == sorted(
            fleet.devices[name].endpoint.device_id for name in fleet.names)
        for name in plan.trainable_buffers():
            assert np.array_equal(outcome.result.total[name], sum(e[name].astype(np.int64) for e in expected.values()))
    assert fleet.coordinator.run == (run if restored else run + 1)


def test_the_broker_sees_no_delta_and_the_masked_upload_is_flagged(plan):
    fleet = Fleet(plan, 4)
    fleet.round(1)
    reassembler = Reassembler(64, 1 << 22, 60.0)
    kinds = set()
    for p in fleet.uplinks:
        done = reassembler.accept(p.payload, 0.0, p.topic)
        if done.payload is not None:
            header = Header.unpack(done.payload)
            kinds.add((header.type, bool(header.flags & Flags.MASKED), bool(header.flags & Flags.ENCRYPTED)))
    delta, keys, shares, reveal = (MessageType.DELTA, MessageType.SECAGG_KEYS, MessageType.SECAGG_SHARES,
                                   MessageType.SECAGG_REVEAL)
    assert (delta, True, True) in kinds and (delta, False, True) not in kinds  # every DELTA masked and encrypted
    assert {(keys, False, False), (shares, False, False), (reveal, False, True)} <= kinds


def test_too_many_dropouts_fail_the_round_cleanly(plan):
    fleet = Fleet(plan, 5)
    fleet.round(1, dropouts=set(fleet.names[:3]))
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.result is None and "secagg-failed" in outcome.failure
    assert fleet.coordinator.secagg_status(1) == ("", set())


def test_a_device_without_its_peers_identities_refuses_a_masked_task(plan):
    """It cannot check the keys it would be relayed, so it answers ACK REJECTED and never trains the round; the
    coordinator's round then fails at its first stage, before anything was shared."""
    fleet = Fleet(plan, 3, peers=False)
    assert fleet.round(1) == {}
    assert all(d.state.pending_task is None for d in fleet.devices.values())
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.result is None and "0 devices sent keys" in outcome.failure


@pytest.fixture(scope="module")
def deep_plan():
    """A plan training MAX_MASKED_BUFFERS + 2 buffers: an mlp of 33 small layers, every layer trained."""
    from fedtiny import zoo
    from fedtiny.compiler import compile_plan
    from fedtiny.protocol.secagg import MAX_MASKED_BUFFERS
    from fedtiny.quantize import quantize
    from fedtiny.scheme import parse

    x = np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32)
    graph = quantize(zoo.MLP(4, 3, hidden=(4,) * (MAX_MASKED_BUFFERS // 2)), x)
    deep = compile_plan(graph, parse("full", graph))
    assert len(deep.trainable_buffers()) == MAX_MASKED_BUFFERS + 2
    return deep


def test_a_plan_with_more_buffers_than_a_node_masks_is_refused_by_host_and_devices(deep_plan):
    """The one limit on both sides: Python's MAX_MASKED_BUFFERS is the C node's FEDTINY_NODE_SECAGG_MAX_BUFFERS
    (whose fedtiny_node.c refuses a masked TASK of a plan with more: can_mask), the host refuses such a plan in one
    line (check_plan: the coordinator and `fedtiny simulate --secagg`), and a Python device answers its masked
    TASK with ACK REJECTED as the C node does, so the round fails at its first stage with nothing shared."""
    import re
    from pathlib import Path

    import fedtiny_device
    from fedtiny.protocol.secagg import MAX_MASKED_BUFFERS, check_plan

    header = (Path(fedtiny_device.__file__).parent / "c" / "fedtiny_node_secagg.h").read_text()
    assert int(re.search(r"#define FEDTINY_NODE_SECAGG_MAX_BUFFERS (\d+)u", header).group(1)) == MAX_MASKED_BUFFERS
    with pytest.raises(ValueError, match=f"the plan trains {MAX_MASKED_BUFFERS + 2} buffers and secure aggregation "
                                         f"masks at most {MAX_MASKED_BUFFERS}"):
        check_plan(deep_plan)
    fleet = Fleet(deep_plan, 3)
    assert fleet.round(1) == {}
    assert all(d.state.pending_task is None for d in fleet.devices.values())
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.result is None and "0 devices sent keys" in outcome.failure


def test_a_stage_message_for_another_round_is_refused_by_the_device(plan):
    fleet = Fleet(plan, 4)
    fleet.round(1)
    device = fleet.devices[fleet.names[0]]
    seq = device.state.seq
    with pytest.raises(ProtocolError, match="bad-stage"):
        for p in fleet.coordinator._downlink(fleet.names[0], SecAggUnmask((), ()), 2, 0):
            device.receive(p.topic, p.payload, 5.0)
    assert device.state.seq == seq and device.state.round == 1  # refused whole: nothing changed


# --- the coordinator's rounds: what Flower's strategy receives ---------------------------------------------------

class SessionLink:
    """A FleetLink over the sans-IO sessions of a Fleet, frames delivered at once; devices train as soon as they
    get a job (the `dropouts` never answer it)."""

    def __init__(self, fleet, dropouts=()):
        self.fleet, self.dropouts = fleet, set(dropouts)
        self.coordinator = fleet.coordinator
        self.expected = {}  # device -> its clipped delta, as uplink_delta makes it

    def start(self):
        for name in self.fleet.names:
            self.deliver(self.fleet.devices[name].on_connect(0.5))
        return self

    def close(self):
        pass

    def deliver(self, publishes):
        self.fleet.pump(publishes)
        for name, job in list(self.fleet.jobs.items()):
            del self.fleet.jobs[name]
            if name in self.dropouts:
                self.fleet.devices[name].skip(job)
                continue
            result = TrainResult(self.fleet.trained(name), 8, 0.25, 0.5, 0)
            self.expected[name], _ = uplink_delta(self.fleet.plan, job.base, result.state, None, keep=1.0,
                                                  clip_norm=CLIP)
            self.fleet.pump(self.fleet.devices[name].complete(job, result, 2.0))

    def devices(self, seen_within=None):
        return self.coordinator.devices(1.0, None)

    def send_task(self, device, round, model_version, global_state, config):
        out = self.coordinator.send_task(device, round, model_version, global_state, config)
        self.deliver(out)
        return sum(len(p.payload) for p in out)

    def replies(self, timeout):
        return self.coordinator.take_replies()

    def rejections(self):
        return self.coordinator.take_rejections()

    def durable_state(self):
        return None

    def restore(self, state, status_streams=True):
        pass

    def begin_secagg(self, round, model_version, devices, clip_norm, noise_sigma=0.0):
        self.coordinator.begin_secagg(round, model_version, devices, clip_norm, noise_sigma)

    def secagg_status(self, round):
        return self.coordinator.secagg_status(round)

    def secagg_close(self, round, admitted=None):
        self.deliver(self.coordinator.secagg_close(round, admitted))

    def secagg_outcomes(self):
        return self.coordinator.take_secagg_outcomes()


def test_the_strategy_receives_only_the_survivors_mean(plan, tmp_path):
    """Coordinator.run_round under secure aggregation, 10 devices of which 3 drop: Flower's FedAvg gets exactly
    one reply, the survivors' mean (base + dequantized exact sum / 7); FedAvg of the seven clipped deltas, as a
    plain round would hand them over, gives the same model."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.requantize import rebuild
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore

    fleet = Fleet(plan, 10)
    link = SessionLink(fleet, dropouts=fleet.names[:3]).start()
    store = StateStore(tmp_path / "state.db")
    coordinator = Coordinator(link, plan, store, CoordinatorConfig(
        rounds=1, policy=RoundPolicy(deadline=0.5, poll=0.0), train_config={"clip_norm": CLIP}, secagg=True))
    seen = []
    aggregate = coordinator.strategy.aggregate_train
    coordinator.strategy.aggregate_train = lambda rnd, replies: seen.append(list(replies)) or aggregate(rnd, replies)
    base = {k: v.copy() for k, v in coordinator.model.master.items()}
    result = coordinator.run_round(1)
    (replies,) = seen
    assert len(replies) == 1 and result.replies == 7  # one reply, the mean of 7: never a device's own update
    survivors = fleet.names[3:]
    assert sorted(link.expected) == survivors
    total = {n: sum(link.expected[d][n].astype(np.int64) for d in survivors) for n in plan.trainable_buffers()}
    got = replies[0].content.array_records["arrays"]
    for name, spec in coordinator.model.specs.items():
        assert np.array_equal(got[name].numpy(), base[name] + spec.dequantize(total[name]) / 7), name
    # the same clipped deltas as seven plain replies, through the same FedAvg
    fedavg = Coordinator(link, plan, StateStore(tmp_path / "plain.db"), CoordinatorConfig(rounds=1)).strategy
    plain = [Message_like(rebuild(coordinator.model.specs, base, link.expected[d])) for d in survivors]
    averaged, _ = fedavg.aggregate_train(1, plain)
    for name in plan.trainable_buffers():
        np.testing.assert_allclose(averaged[name].numpy(), got[name].numpy(), rtol=1e-12, atol=1e-15)
    assert coordinator.model.version == 1
    # and the state the devices get next is bit for bit the plain FedAvg's (the master's grid, requantize.snap)
    from fedtiny_server.grid import GlobalModel

    plain_model = GlobalModel(coordinator.model.specs, base, plan.initial_state(), 0)
    plain_model.advance({k: v.numpy() for k, v in averaged.items()})
    for name in plan.trainable_buffers():
        assert np.array_equal(plain_model.master[name], coordinator.model.master[name]), name
        assert np.array_equal(plain_model.ints[name], coordinator.model.ints[name]), name
    store.close()


def Message_like(full):
    """A reply Message as FleetGrid makes one for a plain round: full float arrays, equal weight."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedtiny_server.grid import ensure_task_identity

    ensure_task_identity()
    ins = Message(RecordDict(), 1, "train", group_id="1")
    ins.metadata.__dict__["_message_id"] = "x"
    content = RecordDict({"arrays": ArrayRecord({n: Array(np.asarray(v)) for n, v in full.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=ins)


def test_robust_strategies_are_refused_and_dp_is_the_devices_under_secure_aggregation(plan, tmp_path):
    from fedtiny_server.privacy import DistributedPrivacy, PrivacySettings
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore

    link = SessionLink(Fleet(plan, 3))
    dp = PrivacySettings(8.0, 1e-5, CLIP)
    for config, match in ((CoordinatorConfig(strategy="krum", train_config={"clip_norm": CLIP}, secagg=True),
                           "individual updates"),
                          (CoordinatorConfig(train_config={}, secagg=True), "clip norm"),
                          (CoordinatorConfig(strategy="fedadam", train_config={"clip_norm": CLIP}, secagg=True,
                                             privacy=dp), "averages the updates")):
        with pytest.raises(ValueError, match=match):
            Coordinator(link, plan, StateStore(tmp_path / f"{match}.db"), config)
    coordinator = Coordinator(link, plan, StateStore(tmp_path / "dp.db"),
                              CoordinatorConfig(train_config={"clip_norm": CLIP}, secagg=True, privacy=dp))
    assert isinstance(coordinator.strategy, DistributedPrivacy)  # distributed DP: the devices add the noise


@pytest.mark.parametrize("args, says", [
    (["--strategy", "krum"], "individual updates"),
    (["--clip-norm", "0"], "needs the devices to clip"),
    (["--dp-epsilon", "8", "--strategy", "fedadam"], "averages the updates"),
    (["--nodes", "2"], "needs 3"),
])
def test_simulate_secagg_refuses_what_it_cannot_do_in_one_line(args, says, tmp_path):
    from test_user_input import run_cli

    result = run_cli("simulate", "--secagg", "--nodes", "5", "--rounds", "1", "--out", tmp_path / "run", *args)
    assert result.exit_code == 2, result.output
    assert says in result.stderr and "Traceback" not in result.stderr


def test_coordinator_secagg_without_a_clip_norm_is_one_line(tmp_path):
    from test_user_input import run_cli

    plan_file = tmp_path / "x.plan"
    plan_file.write_bytes(b"")
    result = run_cli("coordinator", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", tmp_path, "--fleet", "f",
                     "--plan", plan_file, "--state-db", tmp_path / "s.db", "--secagg")
    assert result.exit_code == 2 and "--secagg needs --clip-norm" in result.stderr, result.output
