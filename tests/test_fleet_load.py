"""The load benchmark's code path (benchmarks/bench_fleet_load.py) at 20 devices and 2 rounds: mosquitto with TLS
and client certificates, the real coordinator, light devices in two processes; every update accounted for. And
the accounting itself: it finds an update lost, altered, duplicated or aggregated short."""

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import require_tool
from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.protocol.coordinator import DeviceReply
from fedtiny.protocol.device import TrainJob
from fedtiny.protocol.update import state_delta
from fedtiny.quantize import quantize
from fedtiny.scheme import parse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_fleet_load as load  # noqa: E402

DEVICES, ROUNDS = 20, 2


@pytest.fixture(scope="module")
def plan():
    x = np.random.default_rng(0).normal(size=(32, 30)).astype(np.float32)
    graph = quantize(zoo.build("mlp", (30,), 2), x)
    return compile_plan(graph, parse("last:2", graph))


@pytest.fixture(scope="module")
def loaded(plan):
    require_tool("mosquitto")
    return load.run_load(DEVICES, ROUNDS, workers=2, plan=plan, deadline=60.0)


def test_every_update_of_20_devices_is_accounted_for(loaded):
    assert loaded.problems == []
    assert [r.replies for r in loaded.rounds] == [DEVICES] * ROUNDS
    assert loaded.counts["connects"] == DEVICES  # one TLS connection each, none dropped
    assert loaded.counts["resent_chunks"] == 0
    for row in loaded.rounds:
        assert row.uplink_bytes > 0 and row.downlink_bytes > 0
        assert row.coordinator_cpu > 0 and row.seconds > 0
    # round 2 follows a new global version: its downlink carries a GLOBAL_UPDATE as well as the TASK
    assert loaded.rounds[1].downlink_bytes > loaded.rounds[0].downlink_bytes


def test_light_result_is_deterministic_and_in_range(plan):
    base = plan.initial_state()
    base = {k: v.copy() for k, v in base.items()}
    first = next(n for n, v in base.items() if v.dtype == np.int8)
    base[first].reshape(-1)[:4] = 127  # at the edge of int8: the change must not wrap
    job = TrainJob(3, 2, 1, 0, base)
    a, b = load.light_result(job, 7), load.light_result(job, 7)
    other = load.light_result(job, 8)
    for name, value in base.items():
        assert a.state[name].dtype == value.dtype and np.array_equal(a.state[name], b.state[name])
    assert any(not np.array_equal(a.state[n], other.state[n]) for n in base)
    delta = state_delta(a.state, base)
    moved = sum(int(np.count_nonzero(d)) for d in delta.values())
    assert 0 < moved < sum(v.size for v in base.values())
    assert all(np.abs(d).max() <= 3 for d in delta.values())
    assert np.array_equal(load.sent_delta(job, a, None, None)[first], delta[first])


def _fleet(plan):
    """Two devices, two rounds: what they sent (digests, per-round sums) and the replies a link would hand over."""
    names = ["dev-0000", "dev-0001"]
    sent, sums, replies = {}, {}, []
    for rnd in (1, 2):
        for i, name in enumerate(names):
            job = TrainJob(rnd, rnd - 1, 1, 0, plan.initial_state())
            delta = load.sent_delta(job, load.light_result(job, i), None, None)
            sent[(name, rnd)] = load.digest(delta)
            total = sums.setdefault(rnd, {k: np.zeros(v.shape, np.int64) for k, v in delta.items()})
            for k, v in delta.items():
                total[k] += v
            replies.append(DeviceReply(name, rnd, rnd - 1, delta, 32, {}, 100))
    return names, sent, sums, replies


def test_accounting_finds_every_kind_of_missing_update(plan):
    names, sent, sums, replies = _fleet(plan)
    assert load.account(names, 2, [2, 2], sent, sums, replies) == []

    lost = load.account(names, 2, [2, 1], sent, sums, replies[:-1])
    assert any("aggregated 1 of 2" in p for p in lost)
    assert any("sent, never received" in p for p in lost)
    assert any("round 2: the sum" in p for p in lost)

    altered_delta = {k: v.copy() for k, v in replies[0].delta.items()}
    name = next(iter(altered_delta))
    altered_delta[name].reshape(-1)[0] += 1
    altered = load.account(names, 2, [2, 2], sent, sums, [replace(replies[0], delta=altered_delta)] + replies[1:])
    assert any("differ from what their device sent" in p for p in altered)
    assert any("round 1: the sum" in p for p in altered)

    twice = load.account(names, 2, [2, 2], sent, sums, replies + replies[:1])
    assert any("received twice" in p for p in twice)

    unsent = {k: v for k, v in sent.items() if k != ("dev-0001", 2)}
    assert any("never sent" in p for p in load.account(names, 2, [2, 2], unsent, sums, replies))


def test_a_worker_holds_no_more_paho_clients_than_select_can_watch():
    assert load.worker_count(1000) == 4
    assert load.worker_count(100) == 1
    with pytest.raises(ValueError, match="--workers 4"):
        load.worker_count(1000, 2)
