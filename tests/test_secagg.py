"""Secure aggregation (fedtiny/protocol/secagg.py): the coordinator's sum is exactly the survivors' clipped deltas,
it never holds one of them unmasked, and hostile or broken stages end in one clear ProtocolError."""

import numpy as np
import pytest

from fedtiny.protocol.envelope import Identity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import (
    MaskedDelta, MessageType, SecAggKeys, SecAggPeers, SecAggRelay, SecAggReveal, SecAggShares, SecAggUnmask,
    decode_body,
)
from fedtiny.protocol.secagg import (
    RoundContext, SecAggDevice, SecAggRound, graph_degree, modulus_bits, neighbour_graph, threshold, unpack_values,
    value_bounds,
)
from fedtiny.protocol.update import clip_delta, row_scales, state_delta

CLIP = 0.5
CTX = RoundContext(fleet_id=0x1234, run=1, round=3)


@pytest.fixture(scope="module")
def plan(mlp_last2_plan):
    return mlp_last2_plan


def identities(n):
    ids = {1000 + 17 * i: Identity.from_seed(f"secagg dev {i}".encode()) for i in range(n)}
    return ids, {i: ident.public for i, ident in ids.items()}


def clipped_delta(plan, seed):
    """A device's clipped integer delta: random training moves of a few LSB, clipped to CLIP."""
    rng = np.random.default_rng(seed)
    base = plan.initial_state()
    trained = {}
    for name, v in base.items():
        step = rng.integers(-6, 7, size=v.shape) if v.dtype == np.int8 else rng.integers(-4000, 4000, size=v.shape)
        info = np.iinfo(v.dtype)
        trained[name] = np.clip(v.astype(np.int64) + step, info.min, info.max).astype(v.dtype)
    return clip_delta(state_delta(trained, base), row_scales(plan), CLIP)


def run_round(plan, n, drop_after_masking=(), tamper=None, degree=None, device=None):
    """One round through SecAggDevice and SecAggRound, bodies encoded and decoded as on the wire. Returns
    (the coordinator's round, its sum, every device's clipped delta). device(i, identity, public identities): a
    device in SecAggDevice's place (default SecAggDevice)."""
    private, public = identities(n)
    device = device or (lambda i, identity, peers: SecAggDevice(plan, identity, i, CTX, peers, CLIP))
    devices = {i: device(i, private[i], public) for i in private}
    server = SecAggRound(plan, CTX, public, list(devices), CLIP, degree=degree)

    def wire(body, msg_type=None):
        return decode_body(msg_type or body.TYPE, body.encode(), masked=isinstance(body, MaskedDelta))

    for i, d in devices.items():
        server.on_keys(i, wire(d.keys()))
    for i, peers in server.close_keys().items():
        shares = devices[i].on_peers(wire(peers))
        server.on_shares(i, wire(shares))
    for i, relay in server.close_shares().items():
        devices[i].on_relay(wire(relay))
    deltas = {i: clipped_delta(plan, i) for i in devices}
    for i, d in devices.items():
        body = d.masked(deltas[i], 10, 0.5, 0.75)  # a device that drops after masking masks, then sends nothing
        if i not in drop_after_masking:
            server.on_masked(i, wire(body, MessageType.DELTA))
    for i, unmask in server.close_masked().items():
        reveal = devices[i].on_unmask(wire(unmask))
        if tamper is not None:
            reveal = tamper(i, reveal)
        server.on_reveal(i, wire(reveal))
    return server, server.finish(), deltas


def test_the_sum_is_exactly_the_clipped_deltas_of_every_device(plan):
    server, result, deltas = run_round(plan, 8)
    assert result.survivors == tuple(sorted(deltas)) and result.dropped == ()
    for name in plan.trainable_buffers():
        assert np.array_equal(result.total[name], sum(d[name].astype(np.int64) for d in deltas.values())), name
    assert result.num_examples == 80 and result.loss == pytest.approx(0.5) and result.accuracy == pytest.approx(0.75)


def test_thirty_percent_dropping_after_masking_costs_only_their_contribution(plan):
    """20 devices on a sparse graph (degree 18 of 19 is complete below 38; ask for 10): 6 drop after sharing their
    keys and before their masked DELTA arrives. The sum is exactly the 14 survivors' deltas."""
    ids = sorted(identities(20)[0])
    gone = set(ids[::3][:6])
    server, result, deltas = run_round(plan, 20, drop_after_masking=gone, degree=10)
    assert len(server.graph[ids[0]]) == 10 and server.threshold == 6
    assert set(result.dropped) == gone and len(result.survivors) == 14
    for name in plan.trainable_buffers():
        expected = sum(deltas[i][name].astype(np.int64) for i in result.survivors)
        assert np.array_equal(result.total[name], expected), name


def test_the_coordinator_holds_no_individual_delta_unmasked(plan):
    """What the coordinator keeps of a device is its masked vector: uniform in Z/2^k, unrelated to the delta;
    the only unmasked integers it ever makes are the sum."""
    server, result, deltas = run_round(plan, 6)
    sizes = [int(np.prod(plan.buffers[n].shape)) for n in plan.trainable_buffers()]
    for i, body in server.masked.items():
        values = unpack_values(body.packed, sizes, server.bits)
        for name, v, k in zip(plan.trainable_buffers(), values, server.bits):
            d = deltas[i][name].reshape(-1).astype(np.int64) % (1 << k)
            assert np.mean(v == d) < 0.05, (i, name)  # masked values match the delta no more than chance does
    assert set(vars(result)) == {"round", "survivors", "dropped", "total", "num_examples", "loss", "accuracy",
                                 "bad_shares", "metrics"}
    # per device only the numbers a masked DELTA carries in the clear (docs/security.md)
    assert all(set(m) <= {"loss", "accuracy", "personal_accuracy"} for m in result.metrics.values())


def test_the_moduli_hold_the_cohorts_sum_without_wrapping(plan):
    bounds = value_bounds(plan, CLIP)
    scales = row_scales(plan)
    for name, b in bounds.items():
        assert b >= min(255 if np.dtype(plan.buffers[name].dtype) == np.int8 else 2**31 - 1, int(CLIP / scales[name].min()))
    bits = modulus_bits(bounds, 50)
    assert all(2**k > 2 * 50 * b for k, b in zip(bits, bounds.values()))
    with pytest.raises(ValueError, match="clip norm"):
        value_bounds(plan, 0.0)


def test_the_neighbour_graph_is_symmetric_and_of_the_stated_degree():
    ids = list(range(1, 201))
    d = graph_degree(200)
    assert d == 48 and threshold(d) == 25
    graph = neighbour_graph(ids, b"\7" * 32, d)
    assert all(len(n) == d and i not in n for i, n in graph.items())
    assert all(i in graph[j] for i, n in graph.items() for j in n)
    assert graph != neighbour_graph(ids, b"\x08" * 32, d)
    assert graph_degree(10) == 9 and neighbour_graph(ids[:10], b"", 9)[1] == tuple(ids[1:10])


def test_the_batched_shamir_split_is_a_sharing_pycryptodome_combines():
    """shamir_split (a device's shares, all secrets and indexes at once): any `t` of the n shares give pycryptodome's
    Shamir.combine each secret back, at thresholds and share counts up to the graph's 64; t - 1 do not; the shares
    depend on the key (its coefficients) and not on anything else (a restarted device makes the same)."""
    import random

    from Crypto.Protocol.SecretSharing import Shamir

    from fedtiny.protocol.secagg import shamir_split

    rng = random.Random(3)
    for n, t in ((1, 1), (2, 2), (5, 3), (36, 19), (64, 33)):
        key, secrets = rng.randbytes(32), [rng.randbytes(16) for _ in range(3)]
        shares = shamir_split(key, secrets, t, n)
        assert shares == shamir_split(key, secrets, t, n)
        assert (shares != shamir_split(rng.randbytes(32), secrets, t, n)) == (t > 1)  # t = 1: the secret itself
        for secret, row in zip(secrets, shares):
            assert len(row) == n and all(len(s) == 16 for s in row)
            assert Shamir.combine(rng.sample(list(enumerate(row, 1)), t)) == secret
            if t > 1:
                assert Shamir.combine(rng.sample(list(enumerate(row, 1)), t - 1)) != secret


def test_the_batched_shamir_combine_equals_pycryptodomes_on_random_shares():
    """shamir_combine (the coordinator's batched interpolation) against pycryptodome's Shamir.combine: secrets
    split by pycryptodome at random thresholds and share counts up to the graph's 64, random subsets of at
    least the threshold, index sets repeated and not, and shares that lie on no polynomial of lower degree
    (random bytes)."""
    import random

    from Crypto.Protocol.SecretSharing import Shamir

    from fedtiny.protocol.secagg import shamir_combine

    rng = random.Random(7)
    requests = []
    for _ in range(16):
        n = rng.randint(1, 64)
        t = rng.randint(1, min(n, 20))
        requests.append(rng.sample(Shamir.split(t, n, rng.randbytes(16)), rng.randint(t, min(n, t + 2))))
    requests += [[(i, rng.randbytes(16)) for i, _ in r] for r in requests[:4]]  # the same index sets again
    requests += [[(i, rng.randbytes(16)) for i in rng.sample(range(1, 128), rng.randint(1, 20))] for _ in range(4)]
    assert shamir_combine(requests) == [Shamir.combine(r) for r in requests]
    assert shamir_combine(requests[:1]) == [Shamir.combine(requests[0])]
    with pytest.raises(ValueError):
        shamir_combine([[(3, bytes(16)), (3, bytes(16))]])


# --- hostile and broken stages ---------------------------------------------------------------------------------

def test_a_wrong_share_is_named_and_the_sum_still_exact(plan):
    ids = sorted(identities(8)[0])
    liar = ids[2]

    def tamper(i, reveal):
        if i != liar:
            return reveal
        return SecAggReveal(tuple((v, k, idx, bytes(32 - len(s)) + bytes(b ^ 0x55 for b in s[:16]) + s[16:])
                                  for v, k, idx, s in reveal.entries))

    server, result, deltas = run_round(plan, 8, tamper=tamper)
    assert result.bad_shares == (liar,)
    for name in plan.trainable_buffers():
        assert np.array_equal(result.total[name], sum(d[name].astype(np.int64) for d in deltas.values()))


def test_too_few_correct_shares_fail_the_round_cleanly(plan):
    ids = sorted(identities(4)[0])

    def tamper(i, reveal):  # two of four lie: no 3 shares agree
        if i not in ids[:2]:
            return reveal
        return SecAggReveal(tuple((v, k, idx, bytes(b ^ 1 for b in s)) for v, k, idx, s in reveal.entries))

    with pytest.raises(ProtocolError) as err:
        run_round(plan, 4, tamper=tamper)
    assert err.value.reason == "bad-share"


def test_too_few_survivors_fail_before_anything_is_revealed(plan):
    ids = sorted(identities(6)[0])
    with pytest.raises(ProtocolError) as err:
        run_round(plan, 6, drop_after_masking=set(ids[:4]))
    assert err.value.reason == "secagg-failed"


def test_keys_not_signed_by_their_device_are_refused(plan):
    private, public = identities(4)
    a, b, c, d = sorted(private)
    dev = SecAggDevice(plan, private[a], a, CTX, public, CLIP)
    forged = SecAggDevice(plan, private[c], b, CTX, public, CLIP).keys()  # device c's key made out as b's
    server = SecAggRound(plan, CTX, public, [a, b, c, d], CLIP)
    with pytest.raises(ProtocolError) as err:
        server.on_keys(b, forged)
    assert err.value.reason == "bad-signature" and b not in server.keys
    # the coordinator substituting a neighbour's keys: the device refuses SECAGG_PEERS, sends no share
    for i in (b, c, d):
        server.on_keys(i, SecAggDevice(plan, private[i], i, CTX, public, CLIP).keys())
    server.on_keys(a, dev.keys())
    peers = server.close_keys()[a]
    swapped = SecAggPeers(peers.cohort, peers.threshold, (type(peers.peers[0])(b, forged),) + peers.peers[1:])
    with pytest.raises(ProtocolError) as err:
        dev.on_peers(swapped)
    assert err.value.reason == "bad-signature" and not dev.neighbours


def test_a_device_refuses_to_reveal_both_kinds_of_share_or_a_low_threshold(plan):
    private, public = identities(5)
    ids = sorted(private)
    devices = {i: SecAggDevice(plan, private[i], i, CTX, public, CLIP) for i in ids}
    server = SecAggRound(plan, CTX, public, ids, CLIP)
    for i, d in devices.items():
        server.on_keys(i, d.keys())
    peers = server.close_keys()
    low = SecAggPeers(peers[ids[0]].cohort, 2, peers[ids[0]].peers)
    with pytest.raises(ProtocolError, match="bad-threshold"):
        devices[ids[0]].on_peers(low)
    for i in ids:
        server.on_shares(i, devices[i].on_peers(peers[i]))
    for i, relay in server.close_shares().items():
        devices[i].on_relay(relay)
    for i in ids:
        server.on_masked(i, devices[i].masked(clipped_delta(plan, i), 1, 0.0, 0.0))
    unmask = server.close_masked()[ids[0]]
    first = devices[ids[0]].on_unmask(unmask)
    assert devices[ids[0]].on_unmask(unmask) == first  # a QoS 1 repeat gets the same answer
    flipped = SecAggUnmask(unmask.survivors[1:], unmask.dropped + unmask.survivors[:1])
    with pytest.raises(ProtocolError, match="bad-unmask"):
        devices[ids[0]].on_unmask(flipped)


def test_stage_bodies_reject_malformed_bytes():
    keys = SecAggKeys(b"\1" * 32, b"\2" * 32, b"\3" * 32, b"\4" * 64)
    for body in (keys, SecAggShares(((5, b"\6" * 76),)), SecAggRelay(((5, b"\6" * 76),)), SecAggUnmask((1, 2), (3,)),
                 SecAggReveal(((9, 1, 2, b"\7" * 32),)), SecAggPeers(5, 3, ())):
        raw = body.encode()
        assert decode_body(body.TYPE, raw) == body
        for bad in (raw[:-1], raw + b"\0"):
            with pytest.raises(ProtocolError):
                decode_body(body.TYPE, bad)
    with pytest.raises(ProtocolError, match="oversized"):
        decode_body(MessageType.SECAGG_SHARES, b"\x41\0\0\0" + bytes(80 * 65))
    masked = MaskedDelta(1, 0.0, 0.0, 5, (9, 33), b"")
    with pytest.raises(ProtocolError, match="bad-entry"):
        decode_body(MessageType.DELTA, masked.encode(), masked=True)


# --- the secure aggregate against plain FedAvg ---------------------------------------------------------------

def _reply(arrays, examples):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    from fedtiny_server.grid import ensure_task_identity

    ensure_task_identity()
    ins = Message(RecordDict(), 1, "train", group_id="1")
    ins.metadata.__dict__["_message_id"] = "x"
    return Message(RecordDict({"arrays": ArrayRecord({n: Array(np.asarray(v, np.float64)) for n, v in arrays.items()}),
                               "metrics": MetricRecord({"num-examples": examples})}), reply_to=ins)


def test_without_dp_the_devices_get_bit_identical_state_from_secagg_and_from_flowers_fedavg(plan):
    """The same clipped deltas of 6 devices (even: some element means are exact half LSBs, where the requantization
    rounds to even) through the secure-aggregation path (integer sum, then base + sum / m, one reply to Flower's
    FedAvg) and through the plain path (one reply per device, base + its delta, equal weights, Flower's FedAvg):
    the float means differ by ulps, and the master and the integers the devices receive are bit-identical."""
    from flwr.serverapp.strategy import FedAvg

    from fedtiny_server.grid import GlobalModel
    from fedtiny_server.requantize import dequantize_state, rebuild, tensor_specs
    from fedtiny_server.secagg import mean_content

    specs = tensor_specs(plan)
    _, result, deltas = run_round(plan, 6)
    means, models = [], []
    for path in ("secagg", "plain"):
        ints = plan.initial_state()
        model = GlobalModel(specs, dequantize_state(specs, ints), {n: ints[n] for n in specs}, 0)
        if path == "secagg":
            replies = [_reply({k: v.numpy() for k, v in mean_content(model, 0, result, ()).array_records["arrays"]
                               .items()}, 6)]
        else:
            replies = [_reply(rebuild(specs, model.master_of(0), deltas[i]), 1) for i in sorted(deltas)]
        arrays, _ = FedAvg().aggregate_train(1, replies)
        means.append({k: v.numpy() for k, v in arrays.items()})
        model.advance(means[-1])
        models.append(model)
    a, b = means
    assert any(not np.array_equal(a[n], b[n]) for n in specs)  # the two float means differ: the snap decides
    ties = sum(int(np.sum(result.total[n] % 6 == 3)) for n in specs)
    assert ties > 0  # exact half-LSB means, which the requantization rounds to even
    for name in specs:
        assert np.array_equal(models[0].master[name], models[1].master[name]), name
        assert np.array_equal(models[0].ints[name], models[1].ints[name]), name
        exact = plan.initial_state()[name].astype(np.float64) + result.total[name] / 6
        assert np.array_equal(models[0].ints[name], np.clip(np.round(exact), *INT_RANGE[specs[name].dtype])), name


INT_RANGE = {"int8": (-127, 127), "int32": (-(2**31), 2**31 - 1)}
