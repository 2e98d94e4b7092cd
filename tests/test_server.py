"""The coordinator's logic with a fake fleet link and a virtual clock: strategies, requantization, rounds,
staleness, checkpoints, metrics. (End-to-end tests over a real broker are in test_server_e2e.py.)"""

import json
import logging
import re
import urllib.request

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict, Message, MessageType

from fedtiny.compiler import compile_plan
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny.zoo import MLP
from fedtiny_server import ops
from fedtiny_server.fedbuff import FedBuff, staleness_weight
from fedtiny_server.grid import GlobalModel, RoundPolicy, ensure_task_identity
from fedtiny_server.requantize import (DeltaError, changed, dequantize_state, rebuild,
                                       requantize_state, tensor_specs)
from fedtiny_server.rounds import (STRATEGIES, Coordinator, CoordinatorConfig, heldout_evaluator,
                                   make_strategy)
from fedtiny_server.state import StateStore
from fedtiny_server.testing import FakeClock, FakeLink, make_reply

W, B = "train:classifier.weight", "train:classifier.bias"


@pytest.fixture(scope="module")
def plan():
    torch.manual_seed(0)
    model = MLP(8, 3, hidden=(6,)).eval()
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    graph = quantize(model, x)
    return compile_plan(graph, parse("last:2", graph))


def zero_delta(plan):
    return {n: np.zeros(plan.buffers[n].shape, np.int16 if plan.buffers[n].dtype == "int8" else np.int32)
            for n in plan.trainable_buffers()}


def coordinator(plan, tmp_path, link, clock, rounds=1, strategy="fedavg", options=None, **policy):
    store = StateStore(tmp_path / "state.db")
    pol = RoundPolicy(**{"deadline": 30.0, "poll": 0.5, **policy})
    return Coordinator(link, plan, store, CoordinatorConfig(rounds, strategy, options or {}, pol), clock=clock)


def responder(deltas, delay=1.0, examples=None, skip=(), metrics=None):
    """on_task: each device answers its task after `delay` s with deltas[device] (trained from the sent version)."""
    def on_task(link, task):
        if task.device in skip:
            return
        d = deltas[task.device] if not callable(deltas) else deltas(task)
        n = (examples or {}).get(task.device, 10)
        link.schedule(make_reply(task.device, task.round, task.model_version, d, n,
                                 (metrics or {}).get(task.device)), delay)
    return on_task


# --- strategies ------------------------------------------------------------------------------------------------

def test_strategies_selected_by_name():
    from flwr.serverapp import strategy as s
    expected = {"FedAvg": s.FedAvg, "fedavgm": s.FedAvgM, "FEDPROX": s.FedProx, "fedadam": s.FedAdam,
                "fedyogi": s.FedYogi, "fedadagrad": s.FedAdagrad, "fedmedian": s.FedMedian,
                "fed-trimmed-avg": s.FedTrimmedAvg, "krum": s.Krum, "multikrum": s.MultiKrum}
    for name, cls in expected.items():
        assert type(make_strategy(name)) is cls
    assert type(make_strategy("fedbuff")) is FedBuff
    assert make_strategy("krum", num_malicious_nodes=2).num_malicious_nodes == 2
    assert make_strategy("fedavg").min_train_nodes == 1  # a fleet of one can train
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd")
    with pytest.raises(ValueError, match="no option"):
        make_strategy("fedavg", beta=0.1)
    assert len(STRATEGIES) == 11


@pytest.mark.parametrize("strategy, options, moved_by_poison", [
    ("fedavg", {}, True), ("fedtrimmedavg", {"beta": 0.2}, False), ("krum", {"num_malicious_nodes": 1}, False)])
def test_poisoned_delta_moves_fedavg_only(plan, tmp_path, strategy, options, moved_by_poison):
    """10 devices: nine add +1 LSB to every bias, one adds +100 (a x100 poisoned delta).
    FedAvg: +(9*1 + 100)/10 = +10.9 LSB. Trimmed mean (20 % each side) and Krum (f=1): +1 LSB."""
    clock = FakeClock()
    names = [f"dev-{i}" for i in range(10)]
    deltas = {}
    for i, name in enumerate(names):
        d = zero_delta(plan)
        d[B][:] = 100 if i == 3 else 1
        deltas[name] = d
    link = FakeLink(clock, responder(deltas))
    for name in names:
        link.add_device(name)
    coord = coordinator(plan, tmp_path, link, clock, strategy=strategy, options=options)
    before, weights = coord.model.master[B].copy(), coord.model.master[W].copy()
    [result] = coord.run()
    assert result.replies == 10
    step = (coord.model.master[B] - before) / coord.model.specs[B].scale
    np.testing.assert_allclose(step, 10.9 if moved_by_poison else 1.0, rtol=1e-4)
    np.testing.assert_allclose(coord.model.master[W], weights, rtol=1e-12)  # no device moved the weights
    assert coord.model.version == 1


def test_coordinator_clips_an_update_the_device_did_not(plan, tmp_path):
    """clip_norm in the TASK: the same x100 poisoner as above, but the coordinator clips every reply to the
    honest devices' norm, so FedAvg moves by at most (9 * 1 + 1) / 10 LSB per bias."""
    clock = FakeClock()
    names = [f"dev-{i}" for i in range(10)]
    deltas = {}
    for i, name in enumerate(names):
        deltas[name] = zero_delta(plan)
        deltas[name][B][:] = 100 if i == 3 else 1
    honest_norm = float(np.linalg.norm(tensor_specs(plan)[B].scale))  # +1 LSB on every bias, in real units
    link = FakeLink(clock, responder(deltas))
    for name in names:
        link.add_device(name)
    coord = coordinator(plan, tmp_path, link, clock, task={"clip_norm": honest_norm * 1.0001})
    before = coord.model.master[B].copy()
    [result] = coord.run()
    assert result.replies == 10 and all(t.config["clip_norm"] > 0 for t in link.sent)
    step = (coord.model.master[B] - before) / coord.model.specs[B].scale
    assert np.all(step <= 1.0 + 1e-6) and np.all(step >= 0.9 - 1e-6)


def test_fedavg_weights_by_clamped_examples(plan, tmp_path):
    """A device claiming 10^6 examples is clamped to max_examples: (1*10 + 4*20)/30 = 3 LSB."""
    clock = FakeClock()
    link = FakeLink(clock)
    d1, d2 = zero_delta(plan), zero_delta(plan)
    d1[B][:], d2[B][:] = 1, 4
    link.on_task = responder({"a": d1, "b": d2}, examples={"a": 10, "b": 10**6},
                             metrics={"a": {"loss": 1.0, "accuracy": 0.9}, "b": {"loss": 4.0, "accuracy": 0.6}})
    link.add_device("a"), link.add_device("b")
    coord = coordinator(plan, tmp_path, link, clock, max_examples=20)
    before = coord.model.master[B].copy()
    [result] = coord.run()
    np.testing.assert_allclose((coord.model.master[B] - before) / coord.model.specs[B].scale, 3.0, rtol=1e-5)
    # device-reported metrics are averaged with the same weights: (10 * 1 + 20 * 4) / 30, (10 * .9 + 20 * .6) / 30
    assert result.train_metrics["loss"] == pytest.approx(3.0) and result.train_metrics["accuracy"] == pytest.approx(0.7)


def test_link_replay_counters_are_checkpointed(plan, tmp_path):
    class ReplayLink(FakeLink):
        state = {"dev": [3, 17]}

        def durable_state(self):
            return self.state

        def restore(self, state, status_streams=True):
            self.loaded = state

    clock = FakeClock()
    link = ReplayLink(clock, responder(lambda t: zero_delta(plan)))
    link.add_device("a")
    coordinator(plan, tmp_path, link, clock).run()
    link.state = {}
    again = ReplayLink(clock)
    coordinator(plan, tmp_path, again, clock)
    assert again.loaded == {"dev": [3, 17]}


def test_a_restarted_link_gets_its_data_counters_before_it_connects(plan, tmp_path):
    """run_coordinator restores the data stream's replay counters before the link connects (uplinks queued for
    its session arrive at once) and the STATUS streams' once the registry settled (a retained STATUS the link
    had accepted would read as stale, and its device stay unknown until the next heartbeat)."""
    from fedtiny.planfile import save_plan
    from fedtiny_server.app import Settings, run_coordinator

    rows = [[7, 0, 0, 1, 3, 17], [7, 0, 1, 1, 3, 18], [7, 0, 2, 1, 1, 2]]  # device 7: data, heartbeat, last will
    calls = []

    class ReplayLink(FakeLink):
        def start(self):
            calls.append("start")
            return self

        def durable_state(self):
            return {"replay": rows, "run": 1, "seq": 1024}

        def restore(self, state, status_streams=True):
            calls.append((state, status_streams))

    save_plan(plan, tmp_path / "p.plan")
    clock = FakeClock()
    for rounds in (1, 2):
        link = ReplayLink(clock, responder(lambda t: zero_delta(plan)))
        link.add_device("a")
        run_coordinator(Settings("mqtt://127.0.0.1:1", str(tmp_path), "lab", str(tmp_path / "p.plan"),
                                 str(tmp_path / "s.db"), num_server_rounds=rounds), link=link)
    saved = {"replay": rows, "run": 1, "seq": 1024}
    assert calls == ["start", (saved, False), "start", (saved, True)]
    # what the real link's status_streams=False keeps: the data stream only
    from fedtiny.protocol.envelope import ReplayGuard

    guard = ReplayGuard()
    guard.restore(rows, data_only=True)
    assert guard.export() == rows[:1]


# --- requantization --------------------------------------------------------------------------------------------

def test_requantize_round_trip(plan):
    specs = tensor_specs(plan)
    ints = plan.initial_state()
    assert ints[W].dtype == np.int8 and ints[B].dtype == np.int32
    back = requantize_state(specs, dequantize_state(specs, ints))
    for name in ints:
        np.testing.assert_array_equal(back[name], ints[name])
        assert back[name].dtype == ints[name].dtype
    # per-channel scale: channel c of a weight is value / scale[c]; clamp to +-127, never -128
    w = specs[W]
    x = np.zeros(w.shape, np.float32)
    x[0] = 1000.0 * w.scale[0]
    x[1] = -1000.0 * w.scale[1]
    x[2] = 2.5 * w.scale[2]
    q = w.requantize(x)
    assert q.dtype == np.int8 and q[0].max() == 127 and q[1].min() == -127 and q[2].max() == 2  # half to even
    big = specs[B].requantize(np.full(specs[B].shape, 1e30))
    assert big.dtype == np.int32 and big.max() == 2**31 - 1
    assert set(changed(ints, {**ints, B: ints[B] + 1})) == {B}
    assert set(changed(None, ints)) == set(ints)


def test_rebuild_is_master_plus_dequantized_delta(plan):
    specs = tensor_specs(plan)
    master = dequantize_state(specs, plan.initial_state())
    delta = zero_delta(plan)
    delta[W][1] = 3
    full = rebuild(specs, master, {W: delta[W]})  # buffers not sent did not change
    np.testing.assert_allclose(full[W][1] - master[W][1], 3 * specs[W].scale[1], rtol=1e-6)
    np.testing.assert_array_equal(full[W][0], master[W][0])
    np.testing.assert_array_equal(full[B], master[B])
    with pytest.raises(DeltaError):
        rebuild(specs, master, {"train:nope": delta[W]})
    with pytest.raises(DeltaError):
        rebuild(specs, master, {W: np.zeros(3, np.int16)})
    with pytest.raises(DeltaError):
        rebuild(specs, master, {W: np.full(delta[W].shape, 300, np.int16)})


def test_arrays_beyond_the_integers_are_adopted_as_one_version(plan):
    """A strategy's arrays (a site gateway's global model) that the integers cannot hold are clamped into one new
    version: every train message of the round carries them, and each must give the same version."""
    specs = tensor_specs(plan)
    ints = plan.initial_state()
    model = GlobalModel(specs, dequantize_state(specs, ints), ints, 0)
    arrays = {k: v.numpy() for k, v in model.arrays().items()}
    arrays[W] = np.full(specs[W].shape, 1e6)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    assert [model.adopt(record) for _ in range(3)] == [1, 1, 1]
    assert model.ints[W].max() == 127


def test_downlink_sends_only_changed_tensors_requantized(plan, tmp_path):
    clock = FakeClock()
    d = zero_delta(plan)
    d[B][:] = 2  # only the classifier bias changes in round 1
    link = FakeLink(clock, responder(lambda t: d if t.round == 1 else zero_delta(plan)))
    link.add_device("a"), link.add_device("b")
    coord = coordinator(plan, tmp_path, link, clock, rounds=2)
    coord.run()
    first = [t for t in link.sent if t.round == 1]
    second = [t for t in link.sent if t.round == 2]
    assert all(t.update is None and t.model_version == 0 for t in first)  # flashed devices hold version 0
    for t in second:
        # the link gets the whole requantized state; the GLOBAL_UPDATE carries the changed tensor only
        assert t.model_version == 1 and set(t.global_state) == set(plan.trainable_buffers())
        assert set(t.update) == {B} and t.update[B].dtype == np.int32
        np.testing.assert_array_equal(t.update[B], plan.initial_state()[B] + 2)
        assert t.global_state[W].dtype == np.int8
        np.testing.assert_array_equal(t.global_state[W], plan.initial_state()[W])
    # the real link's encoder puts only changed channels on the wire
    from fedtiny.protocol.update import state_entries
    entries = state_entries(plan, second[0].global_state, changed_from=plan.initial_state())
    assert {plan.trainable_buffers()[e.tensor_id] for e in entries} == {B}
    # round 3: weights move by one LSB (requantized from the float master, clamped to +-127)
    coord.model.advance({**coord.model.master, W: coord.model.master[W] + coord.model.specs[W].dequantize(
        np.ones(coord.model.specs[W].shape, np.int8))})
    link.sent.clear()
    coord.config.rounds = 3
    coord.run()
    t = link.sent[0]
    assert set(t.update) == {W}  # version 1 -> 3: the bias did not change since
    assert t.update[W].dtype == np.int8 and np.abs(t.update[W].astype(int)).max() <= 127
    np.testing.assert_array_equal(t.update[W], np.clip(plan.initial_state()[W].astype(int) + 1, -127, 127))


# --- rounds: quorum, deadline, stale replies -------------------------------------------------------------------

def test_quorum_closes_round_before_deadline(plan, tmp_path):
    clock = FakeClock()
    names = [f"d{i}" for i in range(10)]
    link = FakeLink(clock)
    for name in names:
        link.add_device(name)
    # device i replies i+1 seconds after its task: a 50 % quorum is met at t = 5 s
    link.on_task = lambda lk, t: lk.schedule(make_reply(t.device, t.round, t.model_version, zero_delta(plan)),
                                             1.0 + names.index(t.device))
    coord = coordinator(plan, tmp_path, link, clock, quorum=0.5, deadline=30.0)
    start = clock()
    [result] = coord.run()
    assert result.replies == 5
    assert clock() - start == pytest.approx(5.0)
    for _ in range(5):
        coord.grid.poll(10.0)  # the other five arrive after the round closed: discarded as late
    assert coord.metrics.get("fedtiny_replies_rejected_total", reason="late") == 5
    assert coord.metrics.get("fedtiny_replies_accepted_total") == 5


def test_deadline_ends_round_when_a_device_vanishes(plan, tmp_path):
    clock = FakeClock()
    link = FakeLink(clock, responder(lambda t: zero_delta(plan), skip={"d3"}))
    for i in range(4):
        link.add_device(f"d{i}")
    coord = coordinator(plan, tmp_path, link, clock, quorum=1.0, deadline=20.0)
    start = clock()
    [result] = coord.run()
    assert result.replies == 3 and clock() - start == pytest.approx(20.0)


def test_offline_and_silent_devices_are_not_sampled(plan, tmp_path):
    clock = FakeClock()
    link = FakeLink(clock, responder(lambda t: zero_delta(plan)))
    link.add_device("old")
    clock.advance(1000)
    link.add_device("fresh"), link.add_device("gone", online=False)
    coord = coordinator(plan, tmp_path, link, clock, seen_within=300.0)
    coord.run()
    assert {t.device for t in link.sent} == {"fresh"}


def test_stale_and_foreign_replies_are_discarded_with_reason(plan, tmp_path, caplog):
    clock = FakeClock()
    good = zero_delta(plan)
    good[B][:] = 1
    poison = zero_delta(plan)
    poison[B][:] = 50

    def on_task(link, t):
        link.schedule(make_reply(t.device, t.round, t.model_version, good), 1.0)
        if t.device == "a":
            link.schedule(make_reply("a", t.round, t.model_version, poison), 1.5)  # second reply: duplicate
            link.schedule(make_reply("a", t.round + 7, t.model_version, poison), 1.6)  # wrong round
        if t.device == "b" and t.round == 2:
            link.schedule(make_reply("b", t.round, t.model_version - 1, poison), 0.5)  # trained on version 0
        link.schedule(make_reply("intruder", t.round, t.model_version, poison), 0.2)

    link = FakeLink(clock, on_task)
    link.add_device("a"), link.add_device("b")
    coord = coordinator(plan, tmp_path, link, clock, rounds=2, quorum=1.0, deadline=10.0)
    ops.LOG.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="fedtiny.coordinator"):
            coord.run()
            for _ in range(4):
                coord.grid.poll(5.0)  # what arrives after the last round closed
    finally:
        ops.LOG.removeHandler(caplog.handler)
    m = coord.metrics
    # round 2: b's first reply trained from version 0 -> stale; its proper reply then is accepted
    assert m.get("fedtiny_replies_rejected_total", reason="stale-version") == 1
    assert m.get("fedtiny_replies_rejected_total", reason="unknown-device") == 4
    assert m.get("fedtiny_replies_rejected_total", reason="duplicate") == 2
    assert m.get("fedtiny_replies_rejected_total", reason="late") + \
        m.get("fedtiny_replies_rejected_total", reason="wrong-round") >= 1
    assert m.get("fedtiny_replies_accepted_total") == 4
    init = dequantize_state(coord.model.specs, plan.initial_state())[B]
    # round 1 +1 LSB; round 2: a (+1), b's stale +50 discarded -> version 1 + ... only accepted replies count
    assert coord.model.version == 2
    reasons = [r.fields["reason"] for r in caplog.records if getattr(r, "event", "") == "reply_rejected"]
    assert "stale-version" in reasons
    np.testing.assert_allclose((coord.model.master[B] - init) / coord.model.specs[B].scale, 2.0, rtol=1e-5)


# --- FedBuff ---------------------------------------------------------------------------------------------------

def _reply_message(arrays: dict, n: int, staleness: int) -> Message:
    ensure_task_identity()
    ins = Message(RecordDict(), 7, MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "loss": 1.0, "staleness": staleness})})
    return Message(content, reply_to=ins)


def test_fedbuff_staleness_weighting():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    strategy = FedBuff(buffer_size=3, server_lr=1.0)
    current = {"x": np.zeros(4, np.float32)}
    strategy.current = current
    # A (+1, fresh, 10 examples) alone does not fill the buffer of 3
    assert strategy.aggregate_train(1, [_reply_message({"x": np.ones(4)}, 10, 0)]) == (None, None)
    # B (+4, 3 versions old -> weight 10/2) and C (-2, fresh, 5 examples)
    arrays, metrics = strategy.aggregate_train(2, [_reply_message({"x": np.full(4, 4.0)}, 10, 3),
                                                   _reply_message({"x": np.full(4, -2.0)}, 5, 0)])
    # (10*1 + 5*4 + 5*(-2)) / (10 + 5 + 5) = 1.0
    np.testing.assert_allclose(arrays["x"].numpy(), 1.0)
    assert metrics["buffered-replies"] == 3 and strategy.buffer == []
    # the buffer survives a checkpoint
    strategy.current = {"x": np.zeros(4, np.float32)}
    strategy.aggregate_train(3, [_reply_message({"x": np.ones(4)}, 10, 1)])
    saved = strategy.state_arrays()
    other = FedBuff(buffer_size=3)
    other.load_state_arrays(saved)
    assert len(other.buffer) == 1 and other.buffer[0][0] == pytest.approx(10 / np.sqrt(2))


def test_fedbuff_accepts_late_replies_from_older_versions(plan, tmp_path):
    """Semi-async: d-slow's task from round 1 arrives in round 2, one version old, and is weighted down."""
    clock = FakeClock()
    up = zero_delta(plan)
    up[B][:] = 2

    def on_task(link, t):
        link.schedule(make_reply(t.device, t.round, t.model_version, up), 1.5 if t.device == "slow" else 1.0)

    link = FakeLink(clock, on_task)
    for name in ("a", "b", "slow"):
        link.add_device(name)
    coord = coordinator(plan, tmp_path, link, clock, rounds=2, strategy="fedbuff", options={"buffer_size": 2},
                        deadline=20.0, max_staleness=2)
    first, second = coord.run()
    # round 1 closes after K=2 replies (a, b); slow is still busy and is not re-tasked in round 2
    assert first.replies == 2 and sorted(t.device for t in link.sent if t.round == 2) == ["a", "b"]
    assert second.replies == 3 and coord.grid.registry["slow"].accepted == 1
    assert coord.metrics.get("fedtiny_replies_rejected_total", reason="late") == 0


# --- durable state ---------------------------------------------------------------------------------------------

class Crash(Exception):
    pass


def test_checkpoint_crash_between_accept_and_aggregate(plan, tmp_path):
    """a and b reply in round 2, the coordinator dies before aggregating; after a restart round 2 resumes with
    their stored replies, c's new reply, and a's re-sent copy refused: each counted exactly once."""
    deltas = {name: zero_delta(plan) for name in "abc"}
    for k, name in enumerate("abc"):
        deltas[name][B][:] = k + 1  # +1, +2, +3 LSB
    clock = FakeClock()
    link = FakeLink(clock, responder(deltas, skip={"c"}))
    for name in "abc":
        link.add_device(name)
    coord = coordinator(plan, tmp_path, link, clock, rounds=2, quorum=1.0, deadline=10.0)
    coord.run(1)  # round 1: a and b only (c is silent) -> +1.5 LSB
    after_round1 = coord.model.master[B].copy()

    def die(*args, **kwargs):
        raise Crash
    coord.strategy.aggregate_train = die
    with pytest.raises(Crash):
        coord.run(2)
    coord.store.close()

    clock2 = FakeClock(clock())
    link2 = FakeLink(clock2)
    for name in "abc":
        link2.add_device(name)
    link2.schedule(make_reply("a", 2, 1, deltas["a"]), 0.5)  # a re-sends its round-2 reply after the restart
    link2.on_task = responder(deltas)
    coord2 = coordinator(plan, tmp_path, link2, clock2, rounds=2, quorum=1.0, deadline=10.0)
    assert coord2.round == 1 and coord2.model.version == 1
    np.testing.assert_array_equal(coord2.model.master[B], after_round1)
    [result] = coord2.run()
    assert result.round == 2 and result.replies == 3
    assert [t.device for t in link2.sent] == ["c"]  # a and b already replied: not asked again
    assert coord2.metrics.get("fedtiny_replies_rejected_total", reason="duplicate") == 1
    step = (coord2.model.master[B] - after_round1) / coord2.model.specs[B].scale
    np.testing.assert_allclose(step, (1 + 2 + 3) / 3, rtol=1e-5)
    coord2.store.close()
    coord3 = coordinator(plan, tmp_path, FakeLink(FakeClock()), FakeClock(), rounds=2)
    assert coord3.round == 2 and coord3.model.version == 2 and coord3.run() == []
    assert coord3.grid.registry["a"].accepted == 2 and coord3.grid.registry["c"].accepted == 1


def test_strategy_state_survives_restart(plan, tmp_path):
    clock = FakeClock()
    d = zero_delta(plan)
    d[B][:] = 3
    link = FakeLink(clock, responder({"a": d}))
    link.add_device("a")
    coord = coordinator(plan, tmp_path, link, clock, strategy="fedadam", rounds=1)
    coord.run()
    m_t = {k: v.copy() for k, v in coord.strategy.m_t.items()}
    coord.store.close()
    again = coordinator(plan, tmp_path, link, clock, strategy="fedadam", rounds=1)
    assert set(again.strategy.m_t) == set(m_t)
    for k in m_t:
        np.testing.assert_array_equal(again.strategy.m_t[k], m_t[k])


# --- evaluation and ops ----------------------------------------------------------------------------------------

def test_server_side_evaluation_runs_the_int8_graph(plan, tmp_path):
    from fedtiny.interpreter import predict
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = predict(plan.graph, x)  # labels the initial model gets right: accuracy 1.0
    coord = coordinator(plan, tmp_path, FakeLink(FakeClock()), FakeClock())
    res = heldout_evaluator(plan, coord.model, x, y)(0, coord.model.arrays())
    assert res["accuracy"] == 1.0 and res["loss"] > 0
    ints = dict(coord.model.ints)
    ints[B] = ints[B] + 10**6 * (np.arange(len(ints[B])) == 0)  # push class 0 hard
    assert (predict(plan.graph_with(ints), x) == 0).all()


def test_prometheus_text_format(plan, tmp_path):
    metrics = ops.Metrics()
    metrics.inc("fedtiny_rounds_total", 3)
    metrics.inc("fedtiny_replies_rejected_total", reason="stale-version")
    metrics.inc("fedtiny_replies_rejected_total", 2, reason='we"ird')
    metrics.set("fedtiny_devices_online", 7)
    metrics.observe("fedtiny_aggregation_seconds", 0.25)
    metrics.inc("fedtiny_uplink_bytes_total", 1234)
    server = ops.MetricsServer(metrics, 0).start()
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
    finally:
        server.stop()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? '
                        r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert 'fedtiny_replies_rejected_total{reason="stale-version"} 1' in text
    assert 'fedtiny_replies_rejected_total{reason="we\\"ird"} 2' in text
    assert "# TYPE fedtiny_rounds_total counter" in text and "fedtiny_rounds_total 3" in text
    assert "fedtiny_aggregation_seconds_sum 0.25" in text and "fedtiny_aggregation_seconds_count 1" in text
    assert text.count("# TYPE fedtiny_replies_rejected_total") == 1


def test_json_lines_log(capsys):
    import io
    stream = io.StringIO()
    with ops.json_logging(stream):
        ops.event("reply_rejected", device="a", round=3, reason="stale-version", value=np.float32(0.5))
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert entry["event"] == "reply_rejected" and entry["reason"] == "stale-version" and entry["round"] == 3
    assert entry["value"] == 0.5 and entry["level"] == "info"


def test_broker_config_command(tmp_path):
    from click.testing import CliRunner
    from fedtiny.protocol.keys import provision_fleet
    from fedtiny_server.cli import broker_config_command
    provision_fleet(tmp_path / "fleet", "lab", ["n1"])
    out = tmp_path / "mosquitto.conf"
    res = CliRunner().invoke(broker_config_command, ["--fleet-dir", str(tmp_path / "fleet"), "--port", "8883",
                                                     "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    for needle in ("listener 8883", "cafile", "require_certificate true", "password_file", "acl_file",
                   "set_tcp_nodelay true", "max_queued_messages 100000", "allow_anonymous false"):
        assert needle in text
    assert "persistence false" in text
    res = CliRunner().invoke(broker_config_command, ["--fleet-dir", str(tmp_path / "fleet"), "--port", "8883",
                                                     "--persistence-dir", str(tmp_path / "db"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "persistence true" in text and f"persistence_location {tmp_path / 'db'}/" in text
    assert "persistence false" not in text


# --- the ServerApp ---------------------------------------------------------------------------------------------

def test_serverapp_reads_run_config_and_runs_the_loop(plan, tmp_path):
    from flwr.app import Context
    from flwr.serverapp import ServerApp
    from fedtiny.planfile import save_plan
    from fedtiny_server.app import Settings, app, main, parse_options, run_coordinator

    assert isinstance(app, ServerApp) and app._main is main
    with pytest.raises(ValueError, match="lacks broker"):
        app(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"fleet": "x"}))
    with pytest.raises(ValueError, match="unknown run-config key"):
        Settings.from_run_config({"brocker": "mqtts://h:1"})
    assert parse_options("beta=0.2, num_malicious_nodes=1,flag=true") == \
        {"beta": 0.2, "num_malicious_nodes": 1, "flag": True}
    save_plan(plan, tmp_path / "p.plan")
    x = np.random.default_rng(2).normal(size=(20, 8))
    np.savez(tmp_path / "heldout.npz", X=x, y=np.arange(20) % 3)  # read by fedtiny.datafile
    settings = Settings.from_run_config({
        "broker": "mqtts://127.0.0.1:8883", "fleet-dir": str(tmp_path), "fleet": "lab",
        "plan": str(tmp_path / "p.plan"),
        "state-db": str(tmp_path / "s.db"), "num-server-rounds": 2, "strategy": "fedtrimmedavg",
        "strategy-options": "beta=0.1", "quorum": 1.0, "deadline": 5, "heldout": str(tmp_path / "heldout.npz")})
    clock = FakeClock()
    d = zero_delta(plan)
    d[B][:] = 1
    link = FakeLink(clock, responder(lambda t: d))
    link.add_device("a"), link.add_device("b")
    history = run_coordinator(settings, link=link)
    assert [r.replies for r in history] == [2, 2] and history[-1].model_version == 2
    assert history[-1].eval_metrics["examples"] == 20 and 0 <= history[-1].eval_metrics["accuracy"] <= 1


def test_site_gateway_pre_aggregates_for_the_superlink(plan, tmp_path):
    """Two sites of two devices: each gateway answers with its site's average and the site's examples, so
    FedAvg over the two gateway replies equals FedAvg over the four devices."""
    from fedtiny.planfile import save_plan
    from fedtiny_server.app import Settings
    from fedtiny_server.gateway import gateway, site_round
    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg

    assert isinstance(gateway, ClientApp)
    save_plan(plan, tmp_path / "p.plan")
    specs = tensor_specs(plan)
    master = dequantize_state(specs, plan.initial_state())
    arrays = ArrayRecord({k: Array(v) for k, v in master.items()})
    steps = {"a": 1, "b": 3, "c": 5, "d": 7}
    examples = {"a": 10, "b": 30, "c": 20, "d": 40}
    replies = []
    for site, names in (("s1", "ab"), ("s2", "cd")):
        settings = Settings.from_run_config({"broker": "mqtts://127.0.0.1:1", "fleet-dir": str(tmp_path),
                                             "fleet": site, "plan": str(tmp_path / "p.plan"),
                                             "state-db": str(tmp_path / f"{site}.db"), "quorum": 1.0,
                                             "deadline": 5})
        clock = FakeClock()

        def delta(t):
            d = zero_delta(plan)
            d[B][:] = steps[t.device]
            return d
        link = FakeLink(clock, responder(delta, examples=examples))
        for n in names:
            link.add_device(n)
        site_arrays, metrics = site_round(settings, 1, arrays, link=link, clock=clock)
        assert metrics["num-examples"] == sum(examples[n] for n in names)
        ensure_task_identity()
        ins = Message(RecordDict(), 1, MessageType.TRAIN)
        replies.append(Message(RecordDict({"arrays": site_arrays, "metrics": MetricRecord(
            {"num-examples": metrics["num-examples"]})}), reply_to=ins))
    total, _ = FedAvg().aggregate_train(1, replies)
    expected = sum(steps[n] * examples[n] for n in steps) / sum(examples.values())  # 5.2 LSB
    np.testing.assert_allclose((total[B].numpy() - master[B]) / specs[B].scale, expected, rtol=1e-9)


def test_deployment_doc_pyproject_is_a_valid_flower_app(tmp_path):
    """The pyproject settings in docs/deployment.md pass flwr's own validation, components importable."""
    import tomllib
    from pathlib import Path
    from flwr.common.config import validate_config
    doc = (Path(__file__).resolve().parent.parent / "docs/deployment.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    config = tomllib.loads(block)
    ok, errors, _ = validate_config(config, check_module=True, project_dir=tmp_path)
    assert ok, errors
    from fedtiny_server.app import Settings
    settings = Settings.from_run_config(config["tool"]["flwr"]["app"]["config"])
    assert settings.num_server_rounds == 100 and settings.metrics_host == "127.0.0.1"


def test_sent_states_encode_a_version_once_and_again_when_its_state_changes(plan):
    """A round's GLOBAL_UPDATE for devices holding the same version is one object, built once; a version whose
    state changed (a restarted coordinator's new master) gets a new one with the new values."""
    from fedtiny.protocol.update import SentStates, global_update

    sent = SentStates(plan)
    v0 = plan.initial_state()
    v1 = {n: (v + 1).astype(v.dtype) for n, v in v0.items()}
    sent.update(None, 0, v0)  # a fresh device: the whole state; version 0 is remembered
    first = sent.update(0, 1, v1)
    assert sent.update(0, 1, v1) is first  # the second device of the round: the same update, not encoded again
    assert first == global_update(plan, v1, 0, v0)
    v1b = {n: (v + 2).astype(v.dtype) for n, v in v0.items()}
    again = sent.update(0, 1, v1b)
    assert again is not first and again == global_update(plan, v1b, 0, v0)


def test_state_store_durable_flag(tmp_path):
    """A deployment's store syncs every commit to disk; a simulation's (durable=False) only keeps it atomic."""
    durable, quick = StateStore(tmp_path / "a.db"), StateStore(tmp_path / "b.db", durable=False)
    try:
        assert durable.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert quick.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        durable.close()
        quick.close()
