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


def test_a_stage_message_for_another_round_is_refused_by_the_device(plan):
    fleet = Fleet(plan, 4)
    fleet.round(1)
    device = fleet.devices[fleet.names[0]]
    seq = device.state.seq
    with pytest.raises(ProtocolError, match="bad-stage"):
        for p in fleet.coordinator._downlink(fleet.names[0], SecAggUnmask((), ()), 2, 0):
            device.receive(p.topic, p.payload, 5.0)
    assert device.state.seq == seq and device.state.round == 1  # refused whole: nothing changed
