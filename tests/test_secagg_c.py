"""Secure aggregation in C against fedtiny/protocol/secagg.py and the Python device session: the steps
(device_runtime/c/fedtiny_secagg.c through fedtiny_device.csecagg: the same signed keys, moduli and masked values,
Shamir shares that pycryptodome combines, share encryption both ways, a round through SecAggRound with C and Python
devices and 30 % dropping after masking, the sum exact), and the C node's session (fedtiny_node_secagg.c through
CNodeSession with peers: C and Python nodes in one round through the CoordinatorSession; a C node and the Python
session of one identity sealing the same keys, masked DELTA and reveal under distributed DP; forged and
out-of-order stage messages refused alike).

Builds libfedtiny_node.so with gcc and Monocypher's pinned sources: skips without them, fails in CI."""

import itertools
import struct

import numpy as np
import pytest
from conftest import require_monocypher, require_tool
from Crypto.Protocol.SecretSharing import Shamir
from test_secagg import CLIP, CTX, identities, run_round

from fedtiny.protocol import topics
from fedtiny.protocol.chunking import CHUNK_HEADER, CHUNK_HEADER_SIZE, Reassembler
from fedtiny.protocol.device import TrainResult
from fedtiny.protocol.envelope import Flags, Header
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import MessageType, SecAggKeys, SecAggUnmask
from fedtiny.protocol.secagg import (
    RoundContext, RoundSecrets, SecAggDevice, modulus_bits, open_share, seal_share, shamir_split, share_key,
    value_bounds,
)
from fedtiny.protocol.update import uplink_delta


@pytest.fixture(scope="module")
def csecagg(mlp_last2_plan, tmp_path_factory):
    require_tool("gcc")
    require_tool("make")
    from fedtiny_device import cnode, csecagg

    require_monocypher()
    return csecagg.CSecAgg(cnode.CNodeLibrary(mlp_last2_plan))


def test_keys_signatures_and_moduli_are_pythons(csecagg, mlp_last2_plan):
    private, public = identities(3)
    for (device_id, identity), ctx in itertools.product(private.items(), [CTX, RoundContext(7, 2**32 - 1, 99)]):
        raw = identity.to_bytes()
        expected = RoundSecrets.derive(identity, ctx, device_id).keys(identity, ctx, device_id).encode()
        assert csecagg.keys(csecagg.secrets(raw, ctx, device_id), raw) == expected
        csecagg.check_keys(public[device_id].to_bytes(), ctx, device_id, expected)
        for tampered in (expected[:5] + bytes([expected[5] ^ 1]) + expected[6:], expected):
            other = next(i for i in public if i != device_id)  # signed by another device, or tampered
            with pytest.raises(ProtocolError, match="C node") as err:
                csecagg.check_keys(public[other if tampered == expected else device_id].to_bytes(), ctx, device_id,
                                   tampered)
            assert err.value.reason == "bad-signature"
    for clip, sigma in [(0.5, 0.0), (0.05, 0.0), (2.0, 0.01), (0.5, 0.3), (1e9, 0.0)]:
        bounds = csecagg.bounds(clip, sigma)
        assert bounds == value_bounds(mlp_last2_plan, float(np.float32(clip)), float(np.float32(sigma)))
        for cohort in (1, 3, 50, 1000):
            try:
                expected_bits = modulus_bits(bounds, cohort)
            except ValueError:
                with pytest.raises(ProtocolError) as err:
                    csecagg.bits(bounds, cohort)
                assert err.value.reason == "bad-cohort"
                continue
            assert csecagg.bits(bounds, cohort) == expected_bits


def test_c_shamir_shares_combine_with_pycryptodome(csecagg):
    """Any `threshold` of the C node's shares give pycryptodome's Shamir.combine the secret back; fewer do not; and
    they are the Python device's (secagg.shamir_split with the same derived coefficients), byte for byte."""
    rng = np.random.default_rng(5)
    private, _ = identities(2)
    for trial in range(8):  # pycryptodome's combine is pure Python: small thresholds, and one of the largest
        device_id = list(private)[trial % 2]
        ctx = RoundContext(int(rng.integers(2**32)), int(rng.integers(2**32)), trial)
        secrets = csecagg.secrets(private[device_id].to_bytes(), ctx, device_id)
        python = RoundSecrets.derive(private[device_id], ctx, device_id)
        n = 64 if trial == 0 else int(rng.integers(2, 65))
        t = 33 if trial == 0 else int(rng.integers(1, min(n, 8) + 1))
        shares = {i: csecagg.share(secrets, t, i) for i in range(1, n + 1)}
        split = shamir_split(python.shamir_key, [python.b_seed, python.s_sk[:16], python.s_sk[16:]], t, n)
        assert [b"".join(parts) for parts in zip(*split)] == [shares[i] for i in range(1, n + 1)]
        for _ in range(1 if trial == 0 else 2):
            chosen = sorted(rng.choice(np.arange(1, n + 1), t, replace=False).tolist())
            parts = [Shamir.combine([(i, shares[i][16 * w:16 * w + 16]) for i in chosen]) for w in range(3)]
            assert parts == [python.b_seed, python.s_sk[:16], python.s_sk[16:]], (n, t, chosen)
        if t > 1:
            fewer = list(range(1, t))
            assert Shamir.combine([(i, shares[i][:16]) for i in fewer]) != python.b_seed


def test_shares_sealed_in_c_open_in_python_and_back(csecagg):
    private, _ = identities(2)
    (a, ident_a), (b, ident_b) = private.items()
    sb = RoundSecrets.derive(ident_b, CTX, b)
    ca, cb = (csecagg.secrets(i.to_bytes(), CTX, d) for d, i in ((a, ident_a), (b, ident_b)))
    b_keys = SecAggKeys.decode(csecagg.keys(cb, ident_b.to_bytes()))
    a_keys = SecAggKeys.decode(csecagg.keys(ca, ident_a.to_bytes()))
    shares = bytes(range(48))
    sealed = csecagg.seal_share(ca, b_keys.c_pk, b, 7, shares)
    key = share_key(sb.c_key, a_keys.c_pk, CTX, a, b)
    assert open_share(key, CTX, a, b, sealed) == (7, shares[:16], shares[16:32], shares[32:])
    back = seal_share(share_key(sb.c_key, a_keys.c_pk, CTX, b, a), CTX, b, a, 3, shares[:16], shares[16:32],
                      shares[32:])
    assert csecagg.open_share(ca, b_keys.c_pk, b, back) == (3, shares)
    for bad in (back[:10] + bytes([back[10] ^ 1]) + back[11:], sealed):  # tampered; or sealed for another pair
        with pytest.raises(ProtocolError) as err:
            csecagg.open_share(ca, b_keys.c_pk, b, bad)
        assert err.value.reason == "bad-share"
    with pytest.raises(ProtocolError) as err:  # a small-order key: the all-zero agreement is refused
        csecagg.open_share(ca, bytes(32), b, back)
    assert err.value.reason == "bad-key"


class Twinned:
    """A C device beside the Python device of the same identity, fed the same bodies: it answers with the C
    device's and checks that its masked DELTA is the Python one's."""

    def __init__(self, c, python):
        self.c, self.python = c, python

    def keys(self):
        return self.c.keys()

    def on_peers(self, body):
        self.python.on_peers(body)
        return self.c.on_peers(body)

    def on_relay(self, body):
        self.python.on_relay(body)
        self.c.on_relay(body)

    def masked(self, *args):
        body = self.c.masked(*args)
        assert body == self.python.masked(*args), f"device {self.c.device_id}: the masked DELTA"
        return body

    def on_unmask(self, body):
        return self.c.on_unmask(body)


def mixed_round(plan, csecagg, n, c_ids, drop_after_masking=(), degree=None):
    """test_secagg.run_round with the devices in c_ids in C (fedtiny_device.csecagg.CSecAggDevice), each C device's
    masked values also compared with the Python device's of the same identity given the same relay."""
    from fedtiny_device.csecagg import CSecAggDevice

    def device(i, identity, public):
        python = SecAggDevice(plan, identity, i, CTX, public, CLIP)
        return Twinned(CSecAggDevice(csecagg.library, identity, i, CTX, public, CLIP), python) if i in c_ids \
            else python

    return run_round(plan, n, drop_after_masking, degree=degree, device=device)


def test_c_and_python_devices_sum_exactly_with_thirty_percent_dropping_after_masking(mlp_last2_plan, csecagg):
    """20 devices, 7 of them C, on a graph of degree 10: 6 drop after sharing (2 of them C). The coordinator's sum
    is exactly the 14 survivors' clipped deltas: the C devices' masks cancel against Python's, and their shares
    of the dropped devices' keys and the survivors' seeds reconstruct in pycryptodome."""
    ids = sorted(identities(20)[0])
    gone = set(ids[::3][:6])  # as test_secagg's round of 20: every secret keeps `threshold` surviving holders
    c_ids = {ids[0], ids[3]} | set(ids[1:15:3])  # 2 of them drop
    assert len(c_ids) == 7 and len(c_ids & gone) == 2
    server, result, deltas = mixed_round(mlp_last2_plan, csecagg, 20, c_ids, gone, degree=10)
    assert set(result.dropped) == gone and len(result.survivors) == 14 and result.bad_shares == ()
    for name in mlp_last2_plan.trainable_buffers():
        expected = sum(deltas[i][name].astype(np.int64) for i in result.survivors)
        assert np.array_equal(result.total[name], expected), name


def c_node_of(fleet, name, plan, csecagg):
    """The C node of the identity test_secagg_sessions.Fleet gave device `name`, with the fleet's public identities
    as its peers (its round starts from the plan's initial state)."""
    from fedtiny.protocol.device import NodeState
    from fedtiny_device.cnode import CNodeSession

    public = {d.endpoint.device_id: d.endpoint.identity.public for d in fleet.devices.values()}
    python = fleet.devices[name]
    return CNodeSession(plan, name, python.fleet, python.endpoint, NodeState(0, plan.initial_state(), 0), 512,
                        lambda state: None, library=csecagg.library, peers=public)


def test_c_nodes_and_python_nodes_in_one_round_through_the_real_sessions(mlp_last2_plan, csecagg):
    """The C node's session (fedtiny_node.c with fedtiny_node_secagg.c, through CNodeSession) in a secure-aggregation
    round of 10 devices, 4 of them C, with the CoordinatorSession over their real frames (chunked, signed,
    encrypted): 3 drop after sending keys and shares (one of them C). The one result is exactly the 7 survivors'
    clipped deltas, nothing is refused, and every survivor's masked upload was acknowledged."""
    from test_secagg_sessions import Fleet

    fleet = Fleet(mlp_last2_plan, 10)
    c_names = [fleet.names[i] for i in (1, 4, 7, 9)]
    fleet.devices.update({name: c_node_of(fleet, name, mlp_last2_plan, csecagg) for name in c_names})
    dropouts = {fleet.names[0], fleet.names[2], fleet.names[4]}  # dev-04 is a C node
    expected = fleet.round(1, dropouts=dropouts)
    assert fleet.coordinator.take_rejections() == []
    assert fleet.coordinator.take_replies() == []
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.failure == "" and len(outcome.result.survivors) == 7 and len(outcome.result.dropped) == 3
    for name in mlp_last2_plan.trainable_buffers():
        assert np.array_equal(outcome.result.total[name], sum(e[name].astype(np.int64) for e in expected.values()))
    for name in set(fleet.names) - dropouts:
        assert fleet.devices[name].state.upload is None and fleet.devices[name].state.trained_round == 1, name
    firsts = [Header.unpack(p.payload[CHUNK_HEADER_SIZE:]) for p in fleet.uplinks  # each transfer's first chunk
              if p.topic.rsplit("/", 1)[1] in c_names and CHUNK_HEADER.unpack_from(p.payload)[4] == 0]
    deltas = [h for h in firsts if h.type == MessageType.DELTA]
    assert len(deltas) == 3 and all(h.flags & Flags.MASKED for h in deltas)  # the C survivors' DELTAs, masked
    assert sum(h.type == MessageType.SECAGG_KEYS for h in firsts) == 4  # every C node took part from the keys on


class Twins:
    """A C node and the Python DeviceSession of the same identity fed the same frames: every outcome, state and
    envelope must agree, byte for byte (SECAGG_SHARES too: both derive their Shamir coefficients from the round
    secrets). The coordinator is given the Python session's frames."""

    def __init__(self, c, p):
        self.c, self.p = c, p

    @staticmethod
    def envelopes(publishes):
        reassembler, out = Reassembler(64, 1 << 22, 60.0), []
        for p in publishes:
            done = reassembler.accept(p.payload, 0.0, p.topic)
            if done.payload is not None:
                out.append(done.payload)
        return out

    def same(self, c_out, p_out, what):
        c_env, p_env = self.envelopes(c_out), self.envelopes(p_out)
        assert [e[:32] for e in c_env] == [e[:32] for e in p_env], f"{what}: headers"
        for c, p in zip(c_env, p_env):
            assert c == p, f"{what}: {MessageType(Header.unpack(p).type).name}"
        assert (self.c.state.seq, self.c.state.trained_round, self.c.state.pending_task, self.c.state.upload is None) \
            == (self.p.state.seq, self.p.state.trained_round, self.p.state.pending_task, self.p.state.upload is None)

    def receive(self, topic, frame, now):
        outcomes = []
        for session in (self.c, self.p):
            try:
                out, job = session.receive(topic, frame, now)
                outcomes.append(("ok", out, job))
            except ProtocolError as exc:
                outcomes.append((exc.reason, [], None))
        assert outcomes[0][0] == outcomes[1][0], f"C {outcomes[0][0]}, Python {outcomes[1][0]}"
        if outcomes[1][0] != "ok":
            raise ProtocolError(outcomes[1][0], "both sessions")
        self.same(outcomes[0][1], outcomes[1][1], "receive")
        assert (outcomes[0][2] is None) == (outcomes[1][2] is None)
        return outcomes[1][1], outcomes[1][2]

    def on_connect(self, now):
        c_out, p_out = self.c.on_connect(now), self.p.on_connect(now)
        self.same(c_out, p_out, "on_connect")
        return p_out

    def complete(self, job, result, now):
        c_job = self.c.pending_job()
        assert (c_job.round, c_job.masked, c_job.noise_sigma) == (job.round, job.masked, job.noise_sigma)
        c_out, p_out = self.c.complete(c_job, result, now), self.p.complete(job, result, now)
        self.same(c_out, p_out, "complete")
        return p_out

    def skip(self, job):
        self.c.skip(self.c.pending_job())
        self.p.skip(job)

    @property
    def state(self):
        return self.p.state


def test_a_c_node_seals_what_the_python_device_seals_in_a_noised_masked_round(mlp_last2_plan, csecagg):
    """Distributed DP under secure aggregation, the C node and the Python session of one identity as twins in a
    round of 6 through the CoordinatorSession: the same SECAGG_KEYS, the same masked DELTA (the noise drawn from
    the same stream, clamped to the same bounds, masked alike) and the same SECAGG_REVEAL; the sum is the
    survivors' noised deltas. Then a SECAGG_UNMASK for another round and malformed stage bodies are refused by
    both with the same reason."""
    from test_secagg_sessions import Fleet

    from fedtiny.protocol.noise import NoiseStream, noise_key
    from fedtiny.protocol.secagg import value_bounds

    sigma = 0.01
    plan = mlp_last2_plan
    fleet = Fleet(plan, 6)
    twin_name = fleet.names[2]
    python = fleet.devices[twin_name]
    fleet.devices[twin_name] = twins = Twins(c_node_of(fleet, twin_name, plan, csecagg), python)
    for name in fleet.names:
        fleet.pump(fleet.devices[name].on_connect(0.5), 0.5)
    fleet.coordinator.begin_secagg(1, 0, fleet.names, CLIP, noise_sigma=sigma)
    config = {"secagg": 1, "clip_norm": CLIP, "noise_sigma": sigma}
    for name in fleet.names:
        fleet.pump(fleet.coordinator.send_task(name, 1, 0, None, config))
    bounds = value_bounds(plan, CLIP, float(np.float32(sigma)))
    expected = {}
    for name in fleet.names:
        job = fleet.jobs.pop(name)
        result = TrainResult(fleet.trained(name), 8, 0.25, 0.5, 0)
        endpoint = fleet.devices[name].p.endpoint if name == twin_name else fleet.devices[name].endpoint
        noise = NoiseStream(noise_key(endpoint.identity.to_bytes()), fleet.devices[name].state.run, 1)
        expected[name], _ = uplink_delta(plan, job.base, result.state, None, keep=1.0, clip_norm=CLIP,
                                         noise_sigma=job.noise_sigma, noise=noise, noise_limits=bounds)
        fleet.pump(fleet.devices[name].complete(job, result, 2.0), 2.0)
    fleet.pump(fleet.coordinator.secagg_close(1), 3.0)
    assert fleet.coordinator.take_rejections() == []
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.failure == "" and len(outcome.result.survivors) == 6
    for name in plan.trainable_buffers():
        assert np.array_equal(outcome.result.total[name], sum(e[name].astype(np.int64) for e in expected.values()))
    assert twins.c.state.upload is None and twins.c.state.trained_round == 1

    for body in (SecAggUnmask((), ()),):  # another round's stage message: bad-stage, nothing changes
        with pytest.raises(ProtocolError, match="bad-stage"):
            for p in fleet.coordinator._downlink(twin_name, body, 2, 0):
                twins.receive(p.topic, p.payload, 5.0)
    for raw, reason in ((b"\x01\x00", "truncated"), (struct.pack("<HHHH", 9, 5, 65, 0), "oversized"),
                        (struct.pack("<HHHH", 9, 5, 1, 0) + bytes(10), "truncated"),
                        (struct.pack("<HHHH", 9, 5, 0, 1), "bad-flags")):
        with pytest.raises(ProtocolError, match=reason):
            for p in fleet.coordinator._downlink(twin_name, RawStage(raw), 1, 0):
                twins.receive(p.topic, p.payload, 5.0)


class RawStage:
    """A SECAGG_PEERS body of any bytes, for the coordinator's endpoint to sign."""

    TYPE = MessageType.SECAGG_PEERS

    def __init__(self, data: bytes):
        self.data = data

    def encode(self) -> bytes:
        return self.data


def test_hostile_stage_messages_are_refused_by_the_c_node_as_by_the_python_device(mlp_last2_plan, csecagg):
    """SECAGG_PEERS the coordinator could forge, each refused by the C node with the Python device's reason and
    nothing changed (the round then goes on and sums exactly): the node itself among its neighbours, a threshold
    below a majority, a neighbour outside the fleet, keys not signed by the neighbour, a cohort whose sum needs more
    than 32 bits; then a SECAGG_RELAY before any SECAGG_PEERS was taken, and a SECAGG_UNMASK before the masked DELTA."""
    from test_secagg_sessions import Fleet

    from fedtiny.protocol.messages import SecAggPeer, SecAggPeers, SecAggRelay

    plan = mlp_last2_plan
    fleet = Fleet(plan, 5)
    twin_name, last = fleet.names[1], fleet.names[-1]
    python = fleet.devices[twin_name]
    fleet.devices[twin_name] = twins = Twins(c_node_of(fleet, twin_name, plan, csecagg), python)
    for name in fleet.names:
        fleet.pump(fleet.devices[name].on_connect(0.5), 0.5)
    fleet.coordinator.begin_secagg(1, 0, fleet.names, CLIP)
    for name in fleet.names[:-1]:  # the keys stage stays open: the last device has no TASK yet
        fleet.pump(fleet.coordinator.send_task(name, 1, 0, None, {"secagg": 1, "clip_norm": CLIP}))
    keys = dict(fleet.coordinator._secagg[1].keys)
    me = python.endpoint.device_id
    others = [i for i in sorted(keys) if i != me]
    good = [SecAggPeer(i, keys[i]) for i in others]
    forged = keys[others[0]]
    hostile = [
        (SecAggPeers(4, 2, tuple(good[:2]) + (SecAggPeer(me, keys[me]),)), "bad-peers"),
        (SecAggPeers(4, 1, tuple(good)), "bad-threshold"),
        (SecAggPeers(4, 2, tuple(good[:2]) + (SecAggPeer(0x7777, keys[others[2]]),)), "unknown-peer"),
        (SecAggPeers(4, 2, tuple(good[:2]) + (SecAggPeer(others[2], forged),)), "bad-signature"),
        (SecAggPeers(60000, 2, tuple(good)), "bad-cohort"),
        (SecAggRelay(()), "bad-stage"),
        (SecAggUnmask((), ()), "bad-stage"),
    ]
    for body, reason in hostile:
        with pytest.raises(ProtocolError, match=reason):
            for p in fleet.coordinator._downlink(twin_name, body, 1, 0):
                twins.receive(p.topic, p.payload, 1.5)
    fleet.pump(fleet.coordinator.send_task(last, 1, 0, None, {"secagg": 1, "clip_norm": CLIP}))
    expected = {}
    for name in fleet.names:
        job = fleet.jobs.pop(name)
        result = TrainResult(fleet.trained(name), 8, 0.25, 0.5, 0)
        expected[name], _ = uplink_delta(plan, job.base, result.state, None, keep=1.0, clip_norm=CLIP)
        fleet.pump(fleet.devices[name].complete(job, result, 2.0), 2.0)
    fleet.pump(fleet.coordinator.secagg_close(1), 3.0)
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.failure == "" and len(outcome.result.survivors) == 5
    for name in plan.trainable_buffers():
        assert np.array_equal(outcome.result.total[name], sum(e[name].astype(np.int64) for e in expected.values()))


def test_the_firmwares_secagg_buffers_are_the_c_nodes(mlp_last2_plan, csecagg):
    """node_project.buffer_sizes with secagg (what the firmware's node_config.h is generated with) is what
    fedtiny_node_sizes_secagg_of asks fedtiny_node_init for, and without it fedtiny_node_sizes_of; the values
    buffer device_memory counts is fedtiny_node_sizes_of's."""
    from fedtiny.device_memory import privacy_ram_bytes
    from fedtiny_device import node_project

    for secagg in (False, True):
        python, c = node_project.buffer_sizes(mlp_last2_plan, 512, secagg), csecagg.library.sizes(512, secagg)
        assert (python["upload"], python["reassembly"], python["bitmap"]) == (c.upload, c.reassembly, c.bitmap)
        assert privacy_ram_bytes(mlp_last2_plan, True, secagg)["noise_values_bytes"] == c.values
    assert privacy_ram_bytes(mlp_last2_plan, False, False) == dict(noise_values_bytes=0, secagg_state_bytes=0)


def test_a_masked_round_whose_relay_never_comes_leaves_the_carry_on_both_sides(mlp_last2_plan, csecagg):
    """The twin (C node and Python session of one identity) trains a masked round at --uplink-keep 0.5 but never
    gets the relay: neither seals a DELTA, and neither changes its error-feedback carry (a round that sent nothing
    changes nothing, as a skipped or superseded one; the carry changes in the save of the DELTA it belongs to,
    device.py _upload). The next, plain round's DELTAs are then byte for byte the same, and so are the carries."""
    from test_secagg_sessions import Fleet

    plan = mlp_last2_plan
    fleet = Fleet(plan, 4)
    twin_name = fleet.names[1]
    fleet.devices[twin_name] = twins = Twins(c_node_of(fleet, twin_name, plan, csecagg), fleet.devices[twin_name])
    cut = {"on": False}

    def pump(publishes, now=1.0):  # Fleet.pump, but the twin's downlinks from its first RELAY chunk on are lost
        queue = list(publishes)
        while queue:
            p = queue.pop(0)
            _, kind, device = topics.parse(p.topic)
            if kind in ("up", "status"):
                queue += fleet.coordinator.receive(p.topic, p.payload, now)
                continue
            for name in fleet.names if kind == "bcast" else [device]:
                if name == twin_name and CHUNK_HEADER.unpack_from(p.payload)[4] == 0:
                    cut["on"] |= Header.unpack(p.payload[CHUNK_HEADER_SIZE:]).type == MessageType.SECAGG_RELAY
                if name == twin_name and cut["on"]:
                    continue
                out, job = fleet.devices[name].receive(p.topic, p.payload, now)
                queue += out
                if job is not None:
                    fleet.jobs[name] = job

    for name in fleet.names:
        pump(fleet.devices[name].on_connect(0.5), 0.5)
    fleet.coordinator.begin_secagg(1, 0, fleet.names, CLIP)
    masked = {"secagg": 1, "clip_norm": CLIP, "uplink_keep": 0.5}
    for name in fleet.names:
        pump(fleet.coordinator.send_task(name, 1, 0, None, masked))
    assert cut["on"], "the twin's relay was sent (and dropped)"
    for name in fleet.names:
        job = fleet.jobs.pop(name)
        pump(fleet.devices[name].complete(job, TrainResult(fleet.trained(name), 8, 0.25, 0.5, 0), 2.0), 2.0)
    pump(fleet.coordinator.secagg_close(1), 3.0)
    assert twins.c.state.upload is None and twins.p.state.upload is None  # nothing sealed: no relay
    assert not any(np.any(v) for v in twins.c.state.carry.values())  # the C node's carry: still nothing carried
    assert twins.p.state.carry is None

    cut["on"] = False
    plain = {"clip_norm": CLIP, "uplink_keep": 0.5}
    pump(fleet.coordinator.send_task(twin_name, 2, 0, None, plain), 4.0)
    job = fleet.jobs.pop(twin_name)
    assert job.round == 2 and not job.masked
    trained = {k: np.clip(v.astype(np.int16) - 3, -128, 127).astype(v.dtype) if v.dtype == np.int8 else v - 700
               for k, v in fleet.trained(twin_name).items()}
    twins.complete(job, TrainResult(trained, 8, 0.25, 0.5, 0), 5.0)  # the same DELTA envelope from both (Twins)
    c_carry, p_carry = twins.c.state.carry, twins.p.state.carry
    assert any(np.any(v) for v in p_carry.values())  # keep 0.5: something is carried now, and alike
    assert all(np.array_equal(c_carry[n], p_carry[n]) for n in plan.trainable_buffers())


RESETS = ("keys", "shares", "relay", "trained", "masked", "reveal")


@pytest.mark.parametrize("at", RESETS)
def test_a_reset_at_each_stage_resumes_the_round_alike_in_c_and_python(mlp_last2_plan, csecagg, tmp_path, at):
    """A device reset mid secure-aggregation round (the C node and the Python session of one identity as twins, each
    restarted from what it last saved, with fresh endpoints): after sending its keys, its shares, after taking the
    relay, after training but before the relay, after its masked DELTA, after its reveal. Both resume the round from
    their persisted state and send the same bytes from then on: the masked DELTA once (after a reset before it was
    sealed the task trains again; after, the sealed one is resent and no job is offered, so no second, different
    masked value can leave), the reveal of the shares they hold (a repeated SECAGG_UNMASK gets the same answer from
    the restored round, another one is refused by both); the coordinator's sum is all 5 devices' clipped deltas."""
    from test_secagg_sessions import Fleet

    from fedtiny.protocol.device import DeviceSession, NodeState, load_state, save_state
    from fedtiny.protocol.envelope import DeviceEndpoint
    from fedtiny_device.cnode import CNodeSession

    plan = mlp_last2_plan
    fleet = Fleet(plan, 5)
    name = fleet.names[1]
    endpoint, fleet_name = fleet.devices[name].endpoint, fleet.devices[name].fleet
    public = {d.endpoint.device_id: d.endpoint.identity.public for d in fleet.devices.values()}
    paths = {"p": tmp_path / "python.state", "c": tmp_path / "c.state"}

    def sessions(states):
        def fresh():
            return DeviceEndpoint(endpoint.fleet_id, endpoint.device_id, endpoint.identity, endpoint.coordinator)

        c = CNodeSession(plan, name, fleet_name, fresh(), states["c"], 512,
                         lambda s: save_state(paths["c"], s, durable=False), library=csecagg.library, peers=public)
        p = DeviceSession(plan, name, fleet_name, fresh(), states["p"], 512,
                          lambda s: save_state(paths["p"], s, durable=False), peers=public)
        return c, p

    twins = Twins(*sessions({"c": NodeState(0, plan.initial_state(), 0), "p": NodeState(0, plan.initial_state(), 0)}))
    fleet.devices[name] = twins
    resets, held, asked, seen = [], [], [], Reassembler(8, 1 << 20, 60.0)

    def reset(now):
        """The twin's power cut: both sessions start again from their state files and reconnect."""
        states = {k: load_state(path, plan) for k, path in paths.items()}
        assert states["p"].secagg is not None and states["c"].secagg is not None  # the round was persisted
        twins.c, twins.p = sessions(states)
        resets.append(at)
        return twins.on_connect(now)

    def pump(publishes, now=1.0):  # Fleet.pump, resetting the twin after the downlink of its stage
        queue = list(publishes)
        while queue:
            p = queue.pop(0)
            _, kind, device = topics.parse(p.topic)
            if kind in ("up", "status"):
                fleet.uplinks.append(p)
                queue += fleet.coordinator.receive(p.topic, p.payload, now)
                continue
            for target in fleet.names if kind == "bcast" else [device]:
                if target == name:
                    if held is not None and at == "trained" and (held or CHUNK_HEADER.unpack_from(p.payload)[4] == 0
                                                                 and Header.unpack(p.payload[CHUNK_HEADER_SIZE:]).type
                                                                 == MessageType.SECAGG_RELAY):
                        held.append(p)  # the relay comes late: after the twin has trained
                        continue
                    whole = seen.accept(p.payload, now, p.topic).payload
                out, job = fleet.devices[target].receive(p.topic, p.payload, now)
                queue += out
                if job is not None:
                    fleet.jobs[target] = job
                if target == name and whole is not None and not resets and Header.unpack(whole).type == {
                        "keys": MessageType.TASK, "shares": MessageType.SECAGG_PEERS,
                        "relay": MessageType.SECAGG_RELAY, "reveal": MessageType.SECAGG_UNMASK}.get(at):
                    if at == "reveal":  # what it was asked, to ask again below
                        asked.append(fleet.coordinator._secagg[1].unmask[endpoint.device_id])
                    queue += reset(now)

    for n in fleet.names:
        pump(fleet.devices[n].on_connect(0.5), 0.5)
    fleet.coordinator.begin_secagg(1, 0, fleet.names, CLIP)
    for n in fleet.names:
        pump(fleet.coordinator.send_task(n, 1, 0, None, {"secagg": 1, "clip_norm": CLIP}))
    assert (at == "trained") == bool(held)
    expected = {}
    for n in fleet.names:  # the twin first: its masked DELTA comes before the others close the stage
        result = TrainResult(fleet.trained(n), 8, 0.25, 0.5, 0)
        job = twins.p.pending_job() if n == name else fleet.jobs.pop(n)
        expected[n], _ = uplink_delta(plan, job.base, result.state, None, keep=1.0, clip_norm=CLIP)
        out = fleet.devices[n].complete(job, result, 2.0)
        if n == name and at == "masked":  # the masked DELTA left, not yet ACKed: reset; the sealed one is resent
            sealed = twins.p.state.upload
            assert sealed is not None
            resent = reset(2.5)
            assert twins.p.pending_job() is None and twins.c.pending_job() is None  # nothing trains again
            assert sealed in Twins.envelopes(resent)  # as it was (the coordinator takes it once)
            out += resent
        pump(out, 2.0)
        if n == name and at == "trained":  # trained, waiting for the relay: reset, the values are gone
            assert twins.p.state.upload is None
            pump(reset(2.5), 2.5)
            frames, held[:] = list(held), []
            held = None
            pump(frames, 2.6)  # the relay: nothing to mask yet (both send nothing), the task trains again
            assert twins.p.state.upload is None and twins.c.state.upload is None
            job = twins.p.pending_job()
            assert job is not None and job.round == 1
            pump(twins.complete(job, result, 2.7), 2.7)
    pump(fleet.coordinator.secagg_close(1), 3.0)
    assert resets == [at]
    assert fleet.coordinator.take_rejections() == []
    (outcome,) = fleet.coordinator.take_secagg_outcomes()
    assert outcome.failure == "" and len(outcome.result.survivors) == 5, outcome.failure
    for buffer in plan.trainable_buffers():
        assert np.array_equal(outcome.result.total[buffer], sum(e[buffer].astype(np.int64) for e in expected.values()))
    masked = [Header.unpack(p.payload[CHUNK_HEADER_SIZE:]) for p in fleet.uplinks if p.topic.endswith("/" + name)
              and CHUNK_HEADER.unpack_from(p.payload)[4] == 0]
    assert len({h.seq for h in masked if h.type == MessageType.DELTA}) == 1  # one masked DELTA, maybe sent twice
    if at == "reveal":  # the restored round answers the same request alike, and refuses another
        (unmask,) = asked
        for p in fleet.coordinator._downlink(name, unmask, 1, 0):
            out, _ = twins.receive(p.topic, p.payload, 4.0)
        assert [Header.unpack(e).type for e in Twins.envelopes(out)] == [MessageType.SECAGG_REVEAL]
        other = SecAggUnmask(unmask.survivors[1:], unmask.dropped + unmask.survivors[:1])
        with pytest.raises(ProtocolError, match="bad-unmask"):
            for p in fleet.coordinator._downlink(name, other, 1, 0):
                twins.receive(p.topic, p.payload, 4.5)
