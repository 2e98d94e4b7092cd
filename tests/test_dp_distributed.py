"""Distributed differential privacy under secure aggregation (issue 13): the devices' discrete Gaussian noise in
Python and C, its variance summed over a round's survivors, the accounting against dp-accounting, and a short
`--secagg --dp-epsilon` run through the embedded broker."""

import io
import json
import math
import time

import numpy as np
import pytest
from conftest import require_tool

from fedtiny.privacy import (DistributedLedger, distributed_noise, distributed_plan_constants, float32_up,
                             zcdp_epsilon)
from fedtiny.protocol.envelope import Identity, PublicIdentity
from fedtiny.protocol.noise import NoiseStream, add_noise, noise_key, row_sigma2
from fedtiny.protocol.secagg import value_bounds
from fedtiny.protocol.update import row_scales, zero_delta

from test_fleet_link import model  # noqa: F401  (fixture: a small plan and int8 samples)

IDENTITY = Identity.generate().to_bytes()


def _random_delta(plan, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, zero in zero_delta(plan).items():
        limit = 40 if zero.dtype == np.int16 else 5000
        out[name] = rng.integers(-limit, limit + 1, zero.shape).astype(zero.dtype)
    return out


@pytest.fixture(scope="module")
def c_node(mlp_last2_plan):
    require_tool("gcc")
    require_tool("make")
    from fedtiny_device.cnode import CNodeLibrary

    return CNodeLibrary(mlp_last2_plan)  # the shared build cache: built once per plan and sources


@pytest.mark.parametrize("sigma, secagg", [(0.004, False), (0.05, False), (0.004, True), (0.3, True)])
def test_the_c_node_draws_pythons_noise_from_the_same_identity_run_and_round(c_node, mlp_last2_plan, sigma, secagg):
    """fedtiny_noise.c (Monocypher's BLAKE2b and ChaCha20, the wire's sampler) gives add_noise's integers, word for
    word, clamped at a DELTA's limits or at secure aggregation's bounds."""
    from fedtiny_device.cnoise import c_noise_delta, c_noise_key

    plan = mlp_last2_plan
    assert c_noise_key(c_node, IDENTITY) == noise_key(IDENTITY)
    delta = _random_delta(plan, 5)
    limits = value_bounds(plan, 0.5, sigma) if secagg else None
    stream = NoiseStream(noise_key(IDENTITY), 7, 3)
    expected = add_noise(delta, row_scales(plan), sigma, stream, limits)
    got, used = c_noise_delta(c_node, IDENTITY, 7, 3, delta, sigma, limits)
    for name in plan.trainable_buffers():
        assert np.array_equal(got[name], np.asarray(expected[name], np.int64)), name
    assert used == stream.used
    other, _ = c_noise_delta(c_node, IDENTITY, 7, 4, delta, sigma, limits)  # another round, other noise
    assert any(not np.array_equal(other[n], got[n]) for n in plan.trainable_buffers())


def test_the_survivors_summed_noise_has_the_variance_the_accounting_assumes(mlp_last2_plan):
    """m devices' noise on a zero update, summed as secure aggregation sums it: per element variance m * s_r (s_r
    the row's LSB^2 variance), i.e. m * sigma^2 in real units up to the rounding up of s_r."""
    plan, sigma, m = mlp_last2_plan, 0.006, 4
    scales, zero, limits = row_scales(plan), zero_delta(plan), value_bounds(plan, 0.5, sigma)
    total = {n: np.zeros(z.shape, np.int64) for n, z in zero.items()}
    for device in range(m):
        key = noise_key(bytes([device + 1]) * 64)
        for n, v in add_noise(zero, scales, sigma, NoiseStream(key, 1, 1), limits).items():
            total[n] += v
    normalised, sums = [], []
    for n, rows in scales.items():
        s = np.array([row_sigma2(sigma, x) for x in rows], np.float64)
        t = total[n].reshape(len(rows), -1).astype(np.float64)
        normalised.append((t ** 2 / (m * s[:, None])).ravel())
        sums.append((t / np.sqrt(m * s[:, None])).ravel())
        assert ((s - (sigma / rows) ** 2) < 1).all()  # s_r is (sigma / scale)^2 rounded up
    ratio = np.concatenate(normalised)
    assert ratio.mean() == pytest.approx(1.0, abs=4 * math.sqrt(2 / ratio.size))  # chi-square: std sqrt(2 / N)
    z = np.concatenate(sums)
    assert abs(z.mean()) < 4 * math.sqrt(z.var() / z.size)  # centred


def _expected_epsilon(clip, sigma, survivors_per_round, delta, sigma2_min, l1):
    """Kairouz, Liu, Steinke's bound written out here, composed by dp-accounting directly."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    rho = 0.0
    for n in survivors_per_round:
        tau = 10 * sum(math.exp(-2 * math.pi ** 2 * sigma2_min * k / (k + 1)) for k in range(1, n))
        rho += clip ** 2 / (2 * n * sigma ** 2) + tau * l1 / 4
    accountant = RdpAccountant()
    for _ in range(1):
        accountant.compose(dp_accounting.ZCDpEvent(rho))
    return accountant.get_epsilon(delta)


def test_the_report_epsilon_equals_dp_accountings_for_the_same_parameters(mlp_last2_plan, tmp_path):
    from fedtiny_server.privacy import DistributedPrivacy, PrivacySettings, privacy_summary
    from flwr.serverapp.strategy import FedAvg
    from fedtiny_sim.privacy_report import distributed_epsilon

    plan, clip, delta, rounds = mlp_last2_plan, 0.5, 1e-5, 4
    strategy = DistributedPrivacy(FedAvg(), PrivacySettings(4.0, delta, clip), plan, rounds)
    ledger = strategy._ledger_for(20)  # a cohort of 20, all expected to survive: complete graph of degree 19
    assert ledger.min_survivors == 20
    z = ledger.noise_multiplier  # the Gaussian's z for `rounds` rounds of the budget: spends it, not more
    assert zcdp_epsilon(rounds / (2 * z * z), delta) == pytest.approx(4.0, rel=1e-4)
    assert zcdp_epsilon(rounds / (2 * z * z), delta) <= 4.0
    assert ledger.device_sigma == float32_up(z * clip / math.sqrt(20))
    ledger.record([1, 2, 3], 20)
    ledger.record([1, 2], 26)  # a later round's larger cohort costs less
    ledger.record([1], 20)
    summary = privacy_summary(strategy, {1: "a", 2: "b", 3: "c"})
    shapes = {n: (s, int(np.prod(plan.buffers[n].shape)) // len(s)) for n, s in row_scales(plan).items()}
    sigma2_min, l1 = distributed_plan_constants(shapes, clip, ledger.device_sigma)
    for device, survivors in (("a", [20, 26, 20]), ("b", [20, 26]), ("c", [20])):
        expected = _expected_epsilon(clip, ledger.device_sigma, survivors, delta, sigma2_min, l1)
        assert summary["device_epsilon"][device] == pytest.approx(expected, rel=1e-9)
        assert distributed_epsilon(summary, summary["device_survivors"][device]) == pytest.approx(expected, rel=1e-9)
    assert summary["epsilon"] == summary["device_epsilon"]["a"] < 4.0
    # the run's whole budget: `rounds` rounds of the fewest survivors spend it, and not more
    assert zcdp_epsilon(rounds * ledger.worst_round(), delta) <= 4.0
    assert zcdp_epsilon(rounds * ledger.worst_round() * 1.01, delta) > 4.0 - 0.05
    # the budget stops the run before a round that could pass it
    spent = DistributedLedger(z, delta, 4.0, clip, ledger.device_sigma, 20, sigma2_min, l1, 20)
    for _ in range(rounds):
        assert not spent.would_exceed()
        spent.record([1], 20)
    assert spent.would_exceed()


def test_the_fewest_survivors_set_the_noise_and_tau_raises_it_when_rows_are_coarse():
    coarse = {"w": (np.full(4, 10.0), 8)}  # 10 real units per LSB: s = 1 LSB^2, where tau is not negligible
    fine = {"w": (np.full(4, 0.001), 8)}
    ledger = distributed_noise(4.0, 1e-5, 10, 0.5, 3, 3, coarse)
    assert ledger.sigma2_min == 1.0
    assert ledger.noise_multiplier > distributed_noise(4.0, 1e-5, 10, 0.5, 3, 3, fine).noise_multiplier
    assert zcdp_epsilon(10 * ledger.worst_round(), 1e-5) <= 4.0


def test_a_short_secagg_dp_run_through_the_embedded_broker(model, tmp_path):  # noqa: F811
    """Two masked rounds of 5 node agents with distributed DP: every TASK asks for the ledger's noise, each round
    is accounted with its survivors, and the coordinator never accepts an individual update."""
    from fedtiny.protocol.brokers import EmbeddedBroker
    from fedtiny.protocol.keys import provision_fleet
    from fedtiny.transport.mqtt import CoordinatorLink, load_fleet
    from fedtiny_device.agent import NodeAgent
    from fedtiny_server import ops
    from fedtiny_server.audit import CoordinatorAudit, open_audit_log
    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.privacy import PrivacySettings
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore

    plan, x, y = model
    names = [f"d{i}" for i in range(5)]
    keys = tmp_path / "keys"
    provision_fleet(keys, "dp", names)
    manifest = load_fleet(keys / "coordinator")
    peers = {n: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for n, v in manifest["devices"].items()}
    with EmbeddedBroker(keys) as broker:
        url = f"mqtt://{broker.host}:{broker.port}"
        agents = [NodeAgent(name, url, keys, plan, x[:16], y[:16], fleet="dp", state_dir=tmp_path / "n", seed=i,
                            chunk_size=512, heartbeat_s=1.0, ack_timeout_s=2.0, peers=peers).start()
                  for i, name in enumerate(names)]
        link = CoordinatorLink(url, keys, plan, fleet="dp").start()
        log = io.StringIO()
        with ops.json_logging(log):  # the coordinator's JSON-lines events, taken off after
            try:
                deadline = time.monotonic() + 30
                while len([d for d in link.devices() if d.online]) < len(names):
                    assert time.monotonic() < deadline, "devices did not join"
                    time.sleep(0.05)
                audit = CoordinatorAudit(open_audit_log(tmp_path / "audit.jsonl", keys / "coordinator"),
                                         keys / "coordinator")
                coordinator = Coordinator(link, plan, StateStore(tmp_path / "state.db"), CoordinatorConfig(
                    rounds=2, policy=RoundPolicy(quorum=1.0, deadline=8.0, poll=0.05),
                    train_config={"clip_norm": 0.5}, secagg=True, privacy=PrivacySettings(8.0, 1e-5, 0.5)), audit=audit)
                history = coordinator.run()
                audit.close(coordinator)
                sigma = coordinator.strategy.ledger.device_sigma
                device_sigmas = {a.session._secagg.bounds == value_bounds(plan, 0.5, sigma) for a in agents}
            finally:
                link.close()
                for a in agents:
                    a.stop(leave=False)
    ledger = coordinator.strategy.ledger
    assert [r.replies for r in history] == [5, 5]
    assert ledger.min_survivors == 5 and ledger.round_rho[0][0] == 5 and ledger.device_sigma > 0  # quorum 1
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    assert not [e for e in events if e["event"] == "reply_accepted"]
    shapes = {n: (s, int(np.prod(plan.buffers[n].shape)) // len(s)) for n, s in row_scales(plan).items()}
    sigma2_min, l1 = distributed_plan_constants(shapes, 0.5, ledger.device_sigma)
    for r in (1, 2):
        expected = _expected_epsilon(0.5, ledger.device_sigma, [5] * r, 1e-5, sigma2_min, l1)
        assert history[r - 1].train_metrics["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert history[1].train_metrics["epsilon"] < 8.0
    summary = coordinator.privacy()
    assert summary["distributed"] and set(summary["device_survivors"]) == set(names)
    assert device_sigmas == {True}  # every device masked with the noise's bounds: it was asked for that noise
    # the signed audit log records the secagg threshold, the clip norm and the devices' noise
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    configured = [e for e in lines if e["event"] == "round_configured"]
    completed = [e for e in lines if e["event"] == "round_completed"]
    assert [e["secagg"] for e in configured] == [dict(graph_degree=4, threshold=3, min_survivors=5)] * 2
    assert all(e["task"]["noise_sigma"] == sigma and e["device_noise"]["sigma"] == sigma and e["clip_norm"] == 0.5
               and e["noise_multiplier"] == ledger.noise_multiplier for e in configured)
    assert [(e["secagg"]["threshold"], e["secagg"]["masked"]) for e in completed] == [(3, 5), (3, 5)]
    assert completed[-1]["epsilon"] == pytest.approx(history[1].train_metrics["epsilon"])


def _masked_round(plan, n, sigma, min_survivors, drop=(), device_min_survivors=0):
    """A round of n devices through SecAggDevice and SecAggRound, each delta noised as a device under distributed
    DP noises it (clamped at the round's bounds); returns (the round, its sum or the failure, the noised deltas).
    min_survivors is the coordinator's rule, device_min_survivors the devices' (the TASK's)."""
    from fedtiny.protocol.errors import ProtocolError
    from fedtiny.protocol.secagg import SecAggDevice, SecAggRound
    from test_secagg import CLIP, CTX, clipped_delta, identities

    private, public = identities(n)
    devices = {i: SecAggDevice(plan, private[i], i, CTX, public, CLIP, sigma, min_survivors=device_min_survivors)
               for i in private}
    server = SecAggRound(plan, CTX, public, list(devices), CLIP, sigma, min_survivors=min_survivors)
    for i, d in devices.items():
        server.on_keys(i, d.keys())
    for i, peers in server.close_keys().items():
        server.on_shares(i, devices[i].on_peers(peers))
    for i, relay in server.close_shares().items():
        devices[i].on_relay(relay)
    noised = {i: add_noise(clipped_delta(plan, i), row_scales(plan), sigma,
                           NoiseStream(noise_key(private[i].to_bytes()), CTX.run, CTX.round), server.bounds)
              for i in devices}
    for i, d in devices.items():
        if i not in drop:
            server.on_masked(i, d.masked(noised[i], 10, 0.5, 0.75, 0.5))
    try:
        unmask = server.close_masked()
    except ProtocolError as exc:
        return server, exc, noised
    for i, body in unmask.items():
        server.on_reveal(i, devices[i].on_unmask(body))
    return server, server.finish(), noised


def test_the_unmasked_sum_is_the_survivors_noised_deltas_and_too_few_survivors_reveal_nothing(mlp_last2_plan):
    plan, sigma = mlp_last2_plan, 0.3  # 300 LSB of a weight: far past a DELTA's +-255, inside secagg's bounds
    server, result, noised = _masked_round(plan, 6, sigma, 5)
    weights = [n for n in plan.trainable_buffers() if n.endswith("weight")]
    assert max(np.abs(noised[i][n]).max() for i in noised for n in weights) > 255
    for name in plan.trainable_buffers():
        assert np.array_equal(result.total[name], sum(np.asarray(d[name], np.int64) for d in noised.values())), name
    assert {m["personal_accuracy"] for m in result.metrics.values()} == {0.5}  # carried in the clear
    server, failure, _ = _masked_round(plan, 6, sigma, 5, drop={next(iter(noised))} | {sorted(noised)[1]})
    assert failure.reason == "secagg-failed" and "fewer than the 5" in str(failure)
    assert server.stage == "failed" and not server.unmask  # no device was asked to reveal anything


def test_a_device_reveals_nothing_when_told_of_fewer_survivors_than_its_noise_is_calibrated_for(mlp_last2_plan):
    """A coordinator that skips its own minimum-survivors rule (min_survivors 0 here) and asks 4 survivors of 6 for
    their shares, when the devices' noise is calibrated for 5: every device refuses, so nothing is revealed and the
    sum of 4 (with 4/5 of the accounted noise) is never unmasked. With 5 survivors they reveal."""
    from fedtiny.protocol.errors import ProtocolError

    plan = mlp_last2_plan
    with pytest.raises(ProtocolError) as err:
        _masked_round(plan, 6, 0.3, 0, drop={1000, 1017}, device_min_survivors=5)
    assert err.value.reason == "too-few-survivors" and "4 survivors" in str(err.value) and "for 5" in str(err.value)
    server, result, noised = _masked_round(plan, 6, 0.3, 0, drop={1000}, device_min_survivors=5)
    assert result.survivors == tuple(sorted(set(noised) - {1000}))


def test_the_clamp_at_twelve_sigma_is_added_to_delta(mlp_last2_plan):
    """The clamp's premise (every row's bound lies NOISE_TAIL of its noise's standard deviations beyond what a clipped
    delta can reach) holds on a real plan, and its delta term is (1 + e^eps) * 2 e^-72 * the elements noised in the
    released rounds, in the run's privacy summary."""
    from flwr.serverapp.strategy import FedAvg

    from fedtiny.privacy import plan_elements
    from fedtiny.protocol.noise import row_sigma2
    from fedtiny.protocol.secagg import NOISE_TAIL, value_bounds
    from fedtiny_server.privacy import DistributedPrivacy, PrivacySettings, privacy_summary

    plan, clip = mlp_last2_plan, 0.5
    strategy = DistributedPrivacy(FedAvg(), PrivacySettings(4.0, 1e-5, clip), plan, 4)
    ledger = strategy._ledger_for(20)
    bounds = value_bounds(plan, clip, ledger.device_sigma)
    for name, scales in row_scales(plan).items():
        reach = 255 if np.dtype(plan.buffers[name].dtype) == np.int8 else 2**31 - 1
        for scale in np.asarray(scales, np.float64).tolist():
            clipped = min(reach, clip / scale)  # no element of a delta of L2 norm <= clip goes further
            assert bounds[name] - clipped >= NOISE_TAIL * math.sqrt(row_sigma2(ledger.device_sigma, scale)), name
    elements = sum(int(np.prod(plan.buffers[n].shape)) for n in plan.trainable_buffers())
    assert ledger.elements == plan_elements(strategy.row_scales) == elements
    assert ledger.clamp_delta() == 0.0  # nothing released yet
    ledger.record([1, 2, 3], 20)
    ledger.record([1, 2], 12)
    summary = privacy_summary(strategy, {1: "a", 2: "b", 3: "c"})
    expected = (1 + math.exp(summary["epsilon"])) * 2 * math.exp(-72) * elements * 32
    assert summary["clamp_delta"] == pytest.approx(expected, rel=1e-12) and 0 < expected < 1e-20


def test_the_noise_is_calibrated_for_the_survivors_the_quorum_expects():
    """calibrated_survivors: the quorum's share of the cohort, never more than a device can count among its
    neighbours on a sparse graph, never fewer than the secure-aggregation threshold."""
    from fedtiny.privacy import calibrated_survivors
    from fedtiny.protocol.secagg import graph_degree, threshold

    assert calibrated_survivors(20) == 20 and calibrated_survivors(20, 0.8) == 16  # complete graph: everyone
    assert calibrated_survivors(50) == graph_degree(50) + 1 == 37  # sparse: a device's neighbours and itself
    assert calibrated_survivors(20, 0.1) == threshold(19) == 10
    assert calibrated_survivors(3, 0.1) == 3
    for cohort in range(3, 120):
        degree = graph_degree(cohort)
        for survival in (0.3, 0.5, 0.8, 1.0):
            m = calibrated_survivors(cohort, survival)
            assert threshold(degree) <= m <= cohort and (m <= degree + 1 or m == 3)
