"""Differential privacy (issue 13): the device's discrete Gaussian noise, the accountant, the coordinator's central
noise and budget, and the options of `fedtiny simulate` and `fedtiny coordinator`."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.cli import main
from fedtiny.privacy import PrivacyLedger, epsilon, noise_multiplier_for
from fedtiny.protocol.noise import NoiseStream, add_noise, discrete_gaussian, noise_key, row_sigma2
from fedtiny.protocol.task import task_body, task_settings
from fedtiny.protocol.update import decode_update, row_scales, state_delta, uplink
from test_fleet_link import fleet_dir, model  # noqa: F401  (fixtures)

KEY = bytes(range(32))


# --- the device's noise ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma2", [1, 30, 2500])
def test_discrete_gaussian_has_mean_0_and_variance_sigma2(sigma2):
    stream = NoiseStream(KEY, 0, 1)
    x = np.array([discrete_gaussian(stream, sigma2) for _ in range(20_000)], np.float64)
    # mean within 4 standard errors; variance within 4 standard errors of the sample variance (sd ~ sigma2 sqrt(2/n))
    assert abs(x.mean()) < 4 * math.sqrt(sigma2 / len(x))
    assert abs(x.var() - sigma2) < 4 * sigma2 * math.sqrt(2 / len(x))
    # the tails of a Gaussian, not of the Laplace it is sampled from: P[|x| > 3 sigma] = 0.27 %
    assert np.mean(np.abs(x) > 3 * math.sqrt(sigma2)) < 0.006


def test_noise_is_a_function_of_key_run_and_round_only():
    def draws(key, run, round_):
        stream = NoiseStream(key, run, round_)
        return [discrete_gaussian(stream, 100) for _ in range(200)]

    assert draws(KEY, 1, 5) == draws(KEY, 1, 5)
    others = [draws(KEY, 1, 6), draws(KEY, 2, 5), draws(bytes(32), 1, 5)]
    assert all(o != draws(KEY, 1, 5) for o in others)
    assert noise_key(b"\1" * 64) == noise_key(b"\1" * 64) != noise_key(b"\2" * 64)
    assert row_sigma2(0.5, 0.1) == 25 and row_sigma2(0.5, 0.3) == 3 and row_sigma2(1e-9, 1.0) == 1


@pytest.fixture(scope="module")
def plan(mlp_last2_plan):
    return mlp_last2_plan


def test_the_uplink_carries_noise_of_the_asked_scale(plan):
    """The DELTA with noise differs from the one without by noise of standard deviation sigma in real units,
    on every element (also the unchanged ones)."""
    rng = np.random.default_rng(1)
    base = plan.initial_state()
    trained = {n: (np.clip(v.astype(np.int64) + rng.integers(-3, 4, v.shape), -128, 127).astype(v.dtype)
                   if v.dtype == np.int8 else v + rng.integers(-50, 50, v.shape).astype(v.dtype))
               for n, v in base.items()}
    common = dict(keep=1.0, clip_norm=0.0, num_examples=10, loss=0.5, accuracy=0.5)
    clean, _ = uplink(plan, base, trained, None, **common)
    scales = row_scales(plan)
    sigma = 4 * max(float(np.max(s)) for s in scales.values())  # a few LSB of the coarsest row: no clamping
    noisy, _ = uplink(plan, base, trained, None, **common, noise_sigma=sigma, noise=NoiseStream(KEY, 0, 3))
    again, _ = uplink(plan, base, trained, None, **common, noise_sigma=sigma, noise=NoiseStream(KEY, 0, 3))
    assert noisy.encode() == again.encode() != clean.encode()
    clean_delta, _ = decode_update(plan, clean)
    noisy_delta, _ = decode_update(plan, noisy)
    real = np.concatenate([((noisy_delta[n].astype(np.float64) - clean_delta[n]).reshape(len(s), -1)
                            * s[:, None]).ravel() for n, s in scales.items()])
    assert np.count_nonzero(real) > 0.8 * real.size
    assert abs(real.mean()) < 4 * sigma / math.sqrt(real.size)
    assert 0.9 * sigma < real.std() < 1.25 * sigma  # at least sigma: the LSB variance is rounded up
    with pytest.raises(ValueError, match="noise stream"):
        uplink(plan, base, trained, None, **common, noise_sigma=sigma)


def test_noised_weights_stay_within_what_a_delta_may_carry(plan):
    delta = state_delta(plan.initial_state(), plan.initial_state())
    scales = row_scales(plan)
    weights = [n for n, v in delta.items() if v.dtype == np.int16]
    sigma = 300 * max(float(np.max(scales[n])) for n in weights)  # 300 LSB or more: many beyond 255
    noised = add_noise(delta, scales, sigma, NoiseStream(KEY, 0, 1))
    assert weights and all(np.abs(noised[n]).max() == 255 for n in weights)
    with pytest.raises(ValueError, match="more than 2\\^20 LSB"):
        add_noise(delta, scales, 1e9, NoiseStream(KEY, 0, 1))


def test_a_task_carries_the_noise_and_the_c_node_refuses_it(plan):
    body = task_body(plan, bytes(32), {"noise_sigma": 0.25, "epochs": 2, "min_survivors": 10.0}, 1024)
    assert len(body.config) == 12
    settings = task_settings(body)
    assert settings["noise_sigma"] == 0.25 and settings["epochs"] == 2 and settings["min_survivors"] == 10
    assert len(task_body(plan, bytes(32), {}, 1024).config) == 4  # no noise: the form every node reads
    with pytest.raises(ValueError, match="noise_sigma"):
        task_body(plan, bytes(32), {"noise_sigma": -1.0}, 1024)


# --- the accountant ----------------------------------------------------------------------------------------------

def test_epsilon_is_dp_accountings_known_value():
    # shared/research/security.md: z=1, q=0.01, T=1000, delta=1e-5 -> RDP 2.10 (PLD 1.83)
    assert epsilon(1.0, 1000, 1e-5, sampling_rate=0.01) == pytest.approx(2.10, abs=0.005)
    assert epsilon(1.0, 0, 1e-5) == 0.0 and epsilon(0.0, 1, 1e-5) == math.inf


def test_the_derived_noise_multiplier_spends_the_budget_and_no_more():
    z = noise_multiplier_for(4.0, 1e-5, 10)
    assert 3.99 < epsilon(z, 10, 1e-5) <= 4.0
    assert epsilon(z, 11, 1e-5) > 4.0
    ledger = PrivacyLedger(z, 1e-5, 4.0)
    for _ in range(9):
        ledger.record([1, 2])
    ledger.record([1])
    assert ledger.would_exceed()
    assert ledger.fleet_epsilon() == epsilon(z, 10, 1e-5) and ledger.device_epsilon(2) == epsilon(z, 9, 1e-5)
    assert ledger.device_epsilon(3) == 0.0


# --- central noise at the coordinator ---------------------------------------------------------------------------

def _replies(updates, examples):
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from fedtiny_server.grid import ensure_task_identity

    ensure_task_identity()
    out = []
    for i, (u, n) in enumerate(zip(updates, examples)):
        ins = Message(RecordDict(), 100 + i, "train", group_id="1")
        ins.metadata.__dict__["_message_id"] = f"m{i}"
        out.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(u)}),
                                       "metrics": MetricRecord({"num-examples": n})}), reply_to=ins))
    return out


def test_central_noise_has_the_calibrated_scale_a_fixed_denominator_and_equal_weights():
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg
    from fedtiny_server.privacy import CentralPrivacy

    z, clip = 2.0, 1.0
    strategy = CentralPrivacy(FedAvg(), PrivacyLedger(z, 1e-5), clip, noise_seed=7)
    strategy.current_arrays = ArrayRecord({"w": Array(np.zeros(20_000))})
    updates = [np.full(20_000, 0.001), np.full(20_000, 0.003), np.full(20_000, 0.005), np.full(20_000, 0.007)]
    arrays, metrics = strategy.aggregate_train(1, _replies(updates, [1, 1000, 1, 1]))
    noise = arrays["w"].numpy() - 0.004  # the unweighted mean: 1000 examples buy no weight
    assert abs(noise.mean()) < 4 * (z * clip / 4) / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(z * clip / 4, rel=0.03)  # z C / m for the m = 4 updates aggregated
    assert metrics["epsilon"] == epsilon(z, 1, 1e-5)
    assert strategy.ledger.releases == {100: 1, 101: 1, 102: 1, 103: 1}
    # a round sent to 8 devices of which 4 answered: their sum over 8 (half the mean), noise z C / 8
    strategy._asked[2] = 8
    arrays, metrics = strategy.aggregate_train(2, _replies(updates, [1, 1, 1, 1]))
    noise = arrays["w"].numpy() - 0.002
    assert noise.std() == pytest.approx(z * clip / 8, rel=0.03) and metrics["noise-stddev"] == z * clip / 8
    # an update beyond the clip norm is clipped to it before averaging
    big = CentralPrivacy(FedAvg(), PrivacyLedger(1e-9, 1e-5), clip)
    big.current_arrays = ArrayRecord({"w": Array(np.zeros(4))})
    arrays, _ = big.aggregate_train(1, _replies([np.array([3.0, 4.0, 0.0, 0.0])], [1]))
    assert np.linalg.norm(arrays["w"].numpy()) == pytest.approx(1.0, rel=1e-6)


def test_a_clip_norm_below_every_update_sets_the_step_not_the_signal_to_noise():
    """Why a clip norm under the devices' update norms costs no accuracy to noise (docs/privacy.md, "The clip norm
    from the host's data"): when C clips every update, the noised mean is C times the mean of the updates'
    directions plus noise z C / n, so halving C halves the round's step and its noise alike (the same noise draws);
    a C above the updates' norms adds noise and no signal."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg
    from fedtiny_server.privacy import CentralPrivacy

    rng = np.random.default_rng(3)
    updates = [rng.normal(size=50) * (1 + i) for i in range(4)]  # norms about 7, 14, 21, 28

    def step(clip):
        strategy = CentralPrivacy(FedAvg(), PrivacyLedger(2.0, 1e-5), clip, noise_seed=7)
        strategy.current_arrays = ArrayRecord({"w": Array(np.zeros(50))})
        return strategy.aggregate_train(1, _replies([u.copy() for u in updates], [1] * 4))[0]["w"].numpy()

    below = [step(c) for c in (4.0, 2.0, 1.0)]
    assert np.allclose(below[0] / 4.0, below[1] / 2.0, rtol=1e-12, atol=0) and np.allclose(below[1] / 2.0, below[2])
    # above every norm the updates pass whole: the signal stays, the noise grows with C
    noise = [step(c) - np.mean(updates, axis=0) for c in (40.0, 80.0)]
    assert np.allclose(noise[1], 2 * noise[0], rtol=1e-12, atol=0)


def test_the_wrapper_refuses_a_strategy_that_does_not_average():
    from flwr.serverapp.strategy import FedMedian
    from fedtiny_server.privacy import CentralPrivacy

    with pytest.raises(ValueError, match="averages the updates"):
        CentralPrivacy(FedMedian(), PrivacyLedger(1.0), 1.0)


def test_a_simulation_stops_when_the_budget_is_spent(tmp_path):
    """z = 1.5 spends epsilon 2.98, 4.42, 5.58 in rounds 1-3 at delta 1e-5: a budget of 5 allows two of the four
    rounds asked for; the run says so, and its epsilon is dp-accounting's for two Gaussian mechanisms."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from fedtiny_server.privacy import CLIP_GIVEN
    from fedtiny_sim.simulate import SimulationConfig, simulate

    out = tmp_path / "run"
    said = []
    result = simulate(SimulationConfig(nodes=3, rounds=4, scenario="medical", scheme="last:2", seed=2, out=str(out),
                                       dp_epsilon=5.0, clip_norm=0.5,
                                       dp_noise_multiplier=1.5), note=said.append)
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.5), 2)
    expected = accountant.get_epsilon(1e-5)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["stopped"].startswith("privacy budget spent")
    assert [r["epsilon"] for r in result["rounds"]] == pytest.approx([epsilon(1.5, 1, 1e-5), expected])
    saved = json.loads((out / "metrics.json").read_text())
    privacy = saved["run"]["privacy"]
    assert privacy["epsilon"] == pytest.approx(expected) and privacy["budget"] == 5.0 and privacy["noised_rounds"] == 2
    assert privacy["device_epsilon"] == pytest.approx({f"node00{i}": expected for i in range(3)})
    assert saved["run"]["clip_norm"] == 0.5 and privacy["clip_norm_rule"] == CLIP_GIVEN  # given: no rule
    events = [json.loads(line) for line in (out / "coordinator.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "run_stopped" and "privacy budget" in e.get("reason", "") for e in events)
    # the report shows what was spent and why rounds stopped
    for page in ("summary.md", "report.html"):
        text = (out / page).read_text()
        assert f"epsilon {expected:.3f} spent of 5 at delta 1e-05" in text and "Rounds stopped early: privacy" in text
    # 3 nodes: the noise on the mean (1.5 * 0.5 / 3 = 0.25 per coordinate) is larger than the weights; it is said
    warning = [line for line in said if line.startswith("Warning: --dp-epsilon 5 ")]
    assert len(warning) == 1 and "std 0.25 per coordinate" in warning[0] and "too small for this fleet" in warning[0]


# --- bad options: one line, exit 2, no work ---------------------------------------------------------------------

def run_cli(*args):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, expected", [
    (["--dp-epsilon", "-1"], "--dp-epsilon -1.0: must be a positive number"),
    (["--dp-epsilon", "nan"], "--dp-epsilon nan: must be a positive number"),
    (["--dp-epsilon", "4", "--dp-delta", "1"], "--dp-delta 1.0: must be strictly between 0 and 1"),
    (["--dp-epsilon", "4", "--clip-norm", "-1"], "--clip-norm -1.0"),
    (["--dp-epsilon", "4", "--strategy", "krum"], "--strategy krum: differential privacy needs"),
    (["--dp-epsilon", "4", "--dp-noise-multiplier", "-2"], "--dp-noise-multiplier -2.0"),
    (["--dp-epsilon", "1", "--dp-noise-multiplier", "0.5"], "one round already spends epsilon"),
])
def test_bad_privacy_options_of_simulate(args, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    result = run_cli("simulate", "--scenario", "medical", "--out", tmp_path / "run", *args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, expected", [
    (["--dp-epsilon", "4"], "--clip-norm 0.0: --dp-epsilon needs a positive clip norm"),
    (["--dp-epsilon", "4", "--clip-norm", "1", "--dp-delta", "0"], "--dp-delta 0.0"),
    (["--dp-epsilon", "4", "--clip-norm", "1", "--strategy", "fedbuff"], "--strategy fedbuff"),
])
def test_bad_privacy_options_of_coordinator(args, expected, tmp_path):
    plan = tmp_path / "plan.ftp"
    plan.write_bytes(b"not read: the options are checked first")
    result = run_cli("coordinator", "--broker", "mqtt://127.0.0.1:1", "--fleet-dir", tmp_path, "--fleet", "f",
                     "--plan", plan, "--state-db", tmp_path / "state.db", *args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "state.db").exists()


# --- the node's sampler in C: the same integers from the same words ---------------------------------------------

@pytest.fixture(scope="module")
def cnoise(tmp_path_factory):
    import ctypes

    from conftest import require_tool
    from fedtiny_device import codegen, cruntime

    require_tool("gcc")
    require_tool("make")
    rt = codegen.runtime_dir()
    sources = {name: (rt / name).read_bytes() for name in ("fedtiny_wire.c", "fedtiny_wire.h", "Makefile")}
    lib = ctypes.CDLL(str(cruntime.make_cached(sources, "host-wire", "libfedtiny_wire.so",
                                               tmp_path_factory.mktemp("cnoise_cache"))))
    word_fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p)

    class Source(ctypes.Structure):
        _fields_ = [("word", word_fn), ("ctx", ctypes.c_void_p), ("used", ctypes.c_uint64)]

    lib.fedtiny_wire_discrete_gaussian.argtypes = [ctypes.POINTER(Source), ctypes.c_uint64,
                                                   ctypes.POINTER(ctypes.c_int64)]
    lib.fedtiny_wire_row_sigma2.argtypes = [ctypes.c_double, ctypes.c_double, ctypes.POINTER(ctypes.c_uint64)]

    def sample(stream: NoiseStream, sigma2: int, count: int) -> tuple[list[int], int]:
        """count draws by the C sampler, its words taken from `stream`; (values, words used)."""
        callback = word_fn(lambda ctx: stream.word())
        source, out, values = Source(callback, None, 0), ctypes.c_int64(), []
        for _ in range(count):
            assert lib.fedtiny_wire_discrete_gaussian(ctypes.byref(source), sigma2, ctypes.byref(out)) == 0
            values.append(out.value)
        return values, source.used

    def sigma2(sigma: float, scale: float) -> int | None:
        out = ctypes.c_uint64()
        return out.value if lib.fedtiny_wire_row_sigma2(sigma, scale, ctypes.byref(out)) == 0 else None

    return sample, sigma2


@pytest.mark.parametrize("sigma2", [1, 2, 3, 17, 1000, 123_457, 2**40])
def test_the_c_sampler_draws_pythons_integers_from_the_same_words(cnoise, sigma2):
    sample, _ = cnoise
    python_stream, c_stream = NoiseStream(KEY, 3, 9), NoiseStream(KEY, 3, 9)
    expected = [discrete_gaussian(python_stream, sigma2) for _ in range(2000)]
    got, used = sample(c_stream, sigma2, 2000)
    assert got == expected
    assert used == python_stream.used == c_stream.used


def test_the_c_row_variance_is_pythons(cnoise):
    _, sigma2 = cnoise
    rng = np.random.default_rng(4)
    for sigma, scale in zip(rng.uniform(1e-4, 2.0, 3000), 10.0 ** rng.uniform(-6, -1, 3000)):
        try:
            expected = row_sigma2(float(sigma), float(scale))
        except ValueError:
            expected = None
        assert sigma2(float(sigma), float(scale)) == expected, (sigma, scale)
    assert sigma2(float("nan"), 1.0) is None and sigma2(0.5, 0.1) == 25


def test_a_device_session_noises_its_delta_when_the_task_asks(fleet_dir, model, tmp_path):
    """TASK noise_sigma -> the job -> the sealed DELTA: the noiseless uplink of the same training plus the noise of
    the device's own stream (key from its identity, nonce (run, round)), on every element."""
    from fedtiny.planfile import plan_hash
    from fedtiny.protocol import chunking, topics
    from fedtiny_device.agent import NodeAgent
    from test_agent import coordinator_endpoint
    from test_fleet_link import FLEET

    plan = model[0]
    agent = NodeAgent("raw-1", "mqtt://127.0.0.1:1", fleet_dir, plan, model[1][:4], model[2][:4], fleet=FLEET,
                      state_dir=tmp_path, seed=7, chunk_size=4096)
    coordinator = coordinator_endpoint(fleet_dir)
    sigma = 2 * max(float(np.max(s)) for s in row_scales(plan).values())
    task = coordinator.seal(task_body(plan, plan_hash(plan), {"epochs": 1, "noise_sigma": sigma}, 4096),
                            device_id=topics.name_id("raw-1"), round=2, model_version=0)
    _, job = agent.session.receive(topics.downlink(FLEET, "raw-1"), chunking.split(task, 1, 4096)[0], 0.0)
    assert job.noise_sigma == pytest.approx(sigma, rel=1e-6)  # float32 on the wire
    result = agent.training.run(job)
    run = agent.session.state.run
    frames = agent.session.complete(job, result, 0.0)
    reassembler = chunking.Reassembler()
    for f in frames:
        done = reassembler.accept(f.payload, 0.0, "raw-1").payload
    sent, _ = decode_update(plan, coordinator.open(done).body)
    key = noise_key(agent.session.endpoint.identity.to_bytes())
    common = dict(keep=1.0, clip_norm=0.0, num_examples=result.num_examples, loss=result.loss,
                  accuracy=result.accuracy, personal_accuracy=result.personal_accuracy)
    expected, _ = uplink(plan, job.base, result.state, None, **common, noise_sigma=job.noise_sigma,
                         noise=NoiseStream(key, run, 2))
    clean, _ = uplink(plan, job.base, result.state, None, **common)
    expected, clean = decode_update(plan, expected)[0], decode_update(plan, clean)[0]
    assert all(np.array_equal(sent[n], expected[n]) for n in sent)
    changed = sum(int(np.count_nonzero(sent[n] != clean[n])) for n in sent)
    assert changed > 0.5 * sum(v.size for v in sent.values())


def test_the_coordinator_stops_at_the_budget_and_a_restart_keeps_the_ledger(plan, tmp_path):
    """Three devices, z = 1.5 and a budget of 5 (two rounds' worth): c answers only round 1. The coordinator asks
    devices to clip, stops before round 3 and says why; each device's epsilon counts its own rounds; a coordinator
    restarted on the same database has the same ledger and starts no round. The updates are all zero, which
    Flower's own DP clipping divides by (ZeroDivisionError)."""
    from fedtiny_server.grid import RoundPolicy
    from fedtiny_server.privacy import PrivacySettings
    from fedtiny_server.rounds import Coordinator, CoordinatorConfig
    from fedtiny_server.state import StateStore
    from fedtiny_server.testing import FakeClock, FakeLink, make_reply

    def on_task(link, task):
        if task.device == "c" and task.round > 1:
            return
        delta = state_delta(plan.initial_state(), plan.initial_state())
        link.schedule(make_reply(task.device, task.round, task.model_version, delta), 1.0)

    def start(link, clock):
        config = CoordinatorConfig(5, "fedavg", {}, RoundPolicy(quorum=0.5, deadline=5.0, poll=0.5),
                                   privacy=PrivacySettings(5.0, 1e-5, 0.5, noise_multiplier=1.5, noise_seed=1))
        return Coordinator(link, plan, StateStore(tmp_path / "state.db"), config, clock=clock)

    clock = FakeClock()
    link = FakeLink(clock, on_task)
    for name in "abc":
        link.add_device(name)
    coordinator = start(link, clock)
    history = coordinator.run()
    assert [r.round for r in history] == [1, 2] and coordinator.stopped.startswith("privacy budget spent")
    assert {t.config["clip_norm"] for t in link.sent} == {0.5}
    summary = coordinator.privacy()
    assert summary["device_rounds"] == {"a": 2, "b": 2, "c": 1} and summary["noised_rounds"] == 2
    assert summary["device_epsilon"]["c"] == epsilon(1.5, 1, 1e-5) < summary["epsilon"] == epsilon(1.5, 2, 1e-5)
    assert history[1].train_metrics["epsilon"] == summary["epsilon"]
    coordinator.store.close()
    sent = len(link.sent)
    again = start(link, clock)
    assert again.privacy() == summary
    assert again.run() == [] and len(link.sent) == sent and again.stopped.startswith("privacy budget spent")
    again.store.close()


# --- the clip norm from the host's data (fedtiny.privacy.clip_norm_rule, simulations/clipping.py) ----------------

def test_the_clip_norm_rule_is_the_median_of_the_hosts_norms_to_3_digits():
    from fedtiny.privacy import CLIP_QUANTILE, clip_norm_rule

    assert CLIP_QUANTILE == 0.5
    value, why = clip_norm_rule([0.9, 0.1, 0.3, 0.2, 0.123456])
    assert value == 0.2 and "quantile 0.5" in why and "5 updates" in why and "no privacy cost" in why
    assert clip_norm_rule([0.1234567, 0.2])[0] == 0.162  # the median 0.16172835 to 3 significant digits
    for bad, match in (([], "at least one"), ([0.1, math.nan], "all finite"), ([0.0, 0.0, 0.3], "moved no weight")):
        with pytest.raises(ValueError, match=match):
            clip_norm_rule(bad)


def test_the_hosts_update_norm_is_the_one_the_devices_clipping_measures(plan):
    """host_update_norms trains each host shard as a device's first round and measures what it would send as
    clip_delta measures it: clipping that shard's sent delta at its norm (plus a hair) changes nothing, at 0.99
    of it changes it. The shards are tuning.folds' of both parts of the host's data."""
    from fedtiny.datafile import make_dataset
    from fedtiny.interpreter import quantize_input
    from fedtiny.protocol.update import clip_delta, split_uplink
    from fedtiny_device.agent import training_order
    from fedtiny_device.trainer import Trainer
    from fedtiny_sim.clipping import host_update_norms
    from fedtiny_sim.simulate import SimulationConfig
    from fedtiny_sim.tuning import folds

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 3, 20)
    train, val = make_dataset(x[:15], y[:15], None, "abc", "t"), make_dataset(x[15:], y[15:], None, "abc", "v")
    config = SimulationConfig(seed=1, epochs=1, uplink_keep=0.5)
    norms = host_update_norms(config, plan, plan.graph, train, val, shard_size=5, trainer_factory=Trainer)
    shards = [s for shards, _ in folds(train.y, val.y, 5) for s in shards]
    assert len(norms) == len(shards) and all(n > 0 for n in norms)
    # the first shard again, by hand
    trainer, start = Trainer(plan, 1), plan.initial_state()
    xq = quantize_input(plan.graph, np.concatenate([train.X, val.X]))
    for i in shards[0][training_order(1, 1, len(shards[0]), epochs=1)]:
        trainer.step(xq[i], int(y[i]))
    sent, _ = split_uplink(state_delta(trainer.trainable_state(), start), None, 0.5)
    scales = row_scales(plan)
    same = clip_delta(sent, scales, norms[0] * (1 + 1e-9))
    cut = clip_delta(sent, scales, norms[0] * 0.99)
    assert all(np.array_equal(same[n], sent[n]) for n in sent)
    assert not all(np.array_equal(cut[n], sent[n]) for n in sent)

