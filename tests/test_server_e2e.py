"""The coordinator end to end: a real mosquitto (TLS, client certificates, ACL), NodeAgents in threads training
an mlp on partitions of sklearn's breast cancer set, the real CoordinatorLink, and Flower's FedAvg."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from conftest import ClockUntil, require_tool
from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.interpreter import quantize_input
from fedtiny.planfile import save_plan
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.transport.faults import FaultyTransport
from fedtiny.transport.mqtt import CoordinatorLink
from fedtiny.protocol.keys import provision_fleet
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny_device.agent import NodeAgent
from fedtiny_server import ops
from fedtiny_server.grid import RoundPolicy
from fedtiny_server.rounds import Coordinator, CoordinatorConfig
from fedtiny_server.state import StateStore
from fedtiny_sim import data

FLEET = "plant"
NODES = 4


def breast_cancer_task(n_shards: int):
    """Untrained mlp (int8), every weight and bias trains (lr 0.01): held-out accuracy starts near chance.
    Returns (plan, one (x_int8, y) shard per device, held-out (x, y))."""
    train, test = data.standardize(*data.train_test_split(data.load_breast_cancer(), 0.25, seed=0))
    torch.manual_seed(0)
    graph = quantize(zoo.build("mlp", (30,), 2), train.X[:256])
    plan = compile_plan(graph, parse("full", graph), lr=0.01)
    parts = np.array_split(np.random.default_rng(1).permutation(len(train.X)), n_shards)
    shards = [(quantize_input(graph, train.X[p]), train.y[p]) for p in parts]
    return plan, shards, (test.X, test.y)


@pytest.fixture(scope="module")
def task():
    return breast_cancer_task(NODES)


@pytest.fixture
def fleet(tmp_path):
    """A fleet of its own and a mosquitto for it (retained states of other tests' devices stay out)."""
    require_tool("mosquitto")
    names = [f"n{i}" for i in range(NODES)]
    provision_fleet(tmp_path / "keys", FLEET, names)
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(mosquitto_config(tmp_path / "keys", port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port):
        yield f"mqtts://127.0.0.1:{port}", tmp_path / "keys", names


def start_agents(url, keys, names, task, state_dir, heartbeat_s=1.0, **kwargs):
    plan, shards, _ = task
    agents = [NodeAgent(name, url, keys, plan, *shards[i], fleet=FLEET, state_dir=state_dir, seed=100 + i,
                        heartbeat_s=heartbeat_s, ack_timeout_s=2.0, **kwargs) for i, name in enumerate(names)]
    for a in agents:
        a.start()
    return agents


def wait_online(link, n, timeout=20.0):
    deadline = time.monotonic() + timeout
    while len([d for d in link.devices() if d.online]) < n:
        assert time.monotonic() < deadline, f"only {len(link.devices())} devices joined"
        time.sleep(0.05)


def make_coordinator(link, plan, db, rounds, heldout=None, **policy):
    pol = RoundPolicy(**{"quorum": 1.0, "deadline": 30.0, "poll": 0.05, **policy})
    return Coordinator(link, plan, StateStore(db), CoordinatorConfig(rounds, "fedavg", {}, pol), heldout=heldout)


def test_full_run_improves_accuracy(fleet, task, tmp_path):
    url, keys, names = fleet
    plan, _, heldout = task
    agents = start_agents(url, keys, names, task, tmp_path / "nodes")
    link = CoordinatorLink(url, keys, plan, fleet=FLEET).start()
    server = None
    try:
        wait_online(link, NODES)
        coord = make_coordinator(link, plan, tmp_path / "state.db", 4, heldout=heldout)
        server = ops.MetricsServer(coord.metrics, 0).start()
        initial = coord.evaluate_fn(0, coord.model.arrays())["accuracy"]
        history = coord.run()
        final = history[-1].eval_metrics["accuracy"]
        assert [r.replies for r in history] == [NODES] * 4
        assert final >= initial + 0.15 and final >= 0.8, (initial, [r.eval_metrics for r in history])
        assert 0.0 <= history[-1].train_metrics["accuracy"] <= 1.0  # device-reported, weighted by examples
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "fedtiny_rounds_total 4" in text and f"fedtiny_replies_accepted_total {4 * NODES}" in text
        assert "fedtiny_downlink_bytes_total" in text and "fedtiny_devices_online 4" in text
        assert all(a.model_version == 3 for a in agents)  # they trained round 4 from version 3
    finally:
        if server:
            server.stop()
        link.close()
        for a in agents:
            a.stop()


def test_killed_node_does_not_stall_the_round(fleet, task, tmp_path):
    """A node dies (power cut) right after its TASK of round 2: the round closes at its deadline with the live
    nodes' replies instead of waiting for the dead one, and round 3 no longer asks it (its last will)."""
    url, keys, names = fleet
    plan, _, _ = task
    agents = start_agents(url, keys, names, task, tmp_path / "nodes", transport_wrapper=FaultyTransport)
    victim = agents[1]
    link = CoordinatorLink(url, keys, plan, fleet=FLEET).start()
    send_task = link.send_task

    def send_and_kill(device, round_, *args):
        nbytes = send_task(device, round_, *args)
        if device == victim.device and round_ == 2:
            victim.transport.drop = lambda p: True  # power cut mid-round: nothing more leaves the node
            victim.kill()
        return nbytes

    link.send_task = send_and_kill
    try:
        wait_online(link, NODES)
        deadline = 1.0  # counted from the live nodes' last reply (ClockUntil), so load cannot cut them
        metrics, due = ops.Metrics(), [0]  # due: the replies accepted in all once the live nodes answered
        clock = ClockUntil(lambda: metrics.get("fedtiny_replies_accepted_total") >= due[0])
        policy = RoundPolicy(quorum=1.0, deadline=deadline, poll=0.05)
        coord = Coordinator(link, plan, StateStore(tmp_path / "state.db"), CoordinatorConfig(3, "fedavg", {}, policy),
                            metrics=metrics, clock=clock)
        closed = []  # when each round's wait for replies ended
        receive = coord.grid.send_and_receive

        def receive_and_stamp(*args, **kwargs):
            replies = receive(*args, **kwargs)
            closed.append(time.monotonic())
            return replies

        coord.grid.send_and_receive = receive_and_stamp
        due[0] = NODES
        first = coord.run(1)[0]
        due[0] = NODES + NODES - 1  # and the live nodes' replies of round 2
        second = coord.run(2)[-1]
        assert first.replies == NODES and second.replies == NODES - 1
        waited = closed[1] - clock.resumed  # from the last live reply to the round's close
        assert deadline - 0.1 <= waited < deadline + 5.0, waited  # the deadline, not the dead node, closed it
        wait_until(lambda: not any(d.online for d in link.devices() if d.device == victim.device),
                   "the broker did not publish the victim's last will (OFFLINE)")
        due[0] = NODES + 2 * (NODES - 1)
        third = coord.run(3)[-1]
        assert third.replies == NODES - 1
        assert coord.metrics.get("fedtiny_devices_online") == NODES - 1
    finally:
        link.close()
        for a in agents:
            if a is not victim:
                a.stop()


def wait_until(condition, message: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, message
        time.sleep(0.05)


def _db(path, sql):
    with sqlite3.connect(path, timeout=5) as db:
        return db.execute(sql).fetchall()


def _committed_round(path) -> str | None:
    """The last committed round of a checkpoint that may not exist yet, or whose tables are being created."""
    try:
        rows = _db(path, "SELECT value FROM meta WHERE key = 'round'") if path.exists() else []
    except sqlite3.OperationalError:  # the file exists, its tables not yet
        return None
    return rows[0][0] if rows else None


def test_coordinator_killed_and_restarted_resumes(fleet, task, tmp_path):
    """The coordinator (the CLI, in a subprocess) is SIGKILLed in round 2 after two replies were accepted and
    while a third node's upload is held back; a new coordinator resumes round 2 with the two stored replies
    and the third one, and finishes: every (round, device) reply is counted exactly once."""
    url, keys, names = fleet
    plan, _, _ = task
    names = names[:3]
    agents = start_agents(url, keys, names, task, tmp_path / "nodes", transport_wrapper=FaultyTransport)
    slow = agents[2]
    plan_path, db = tmp_path / "mlp.plan", tmp_path / "state.db"
    save_plan(plan, plan_path)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    cmd = [sys.executable, "-c", "from fedtiny_server.cli import coordinator_command; coordinator_command()",
           "--broker", url, "--fleet-dir", str(keys), "--fleet", FLEET, "--plan", str(plan_path), "--rounds", "3",
           "--quorum", "1.0", "--deadline", "60", "--state-db", str(db), "--local-steps", "0"]
    proc = None
    try:
        deadline = time.monotonic() + 30
        while True:  # the nodes joined (their retained STATUS tells a coordinator that subscribes later)
            if all((tmp_path / "nodes" / f"{n}.node").exists() for n in names) and \
                    all(a.transport.connected.is_set() for a in agents):
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # round 1 completes; in round 2 the slow node's DELTA is held back
        deadline = time.monotonic() + 60
        while _committed_round(db) != "1":
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not complete"
            time.sleep(0.05)
        slow.transport.drop = lambda p: "/up/" in p.topic
        while len(_db(db, "SELECT device FROM replies WHERE round = 2")) < 2:
            assert time.monotonic() < deadline, "round 2 replies did not arrive"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _db(db, "SELECT value FROM meta WHERE key = 'round'") == [("1",)]
        stored = {r[0] for r in _db(db, "SELECT device FROM replies WHERE round = 2 AND aggregated = 0")}
        assert stored == set(names[:2])

        slow.transport.drop = lambda p: False  # its unacknowledged upload is re-sent to whoever listens now
        link = CoordinatorLink(url, keys, plan, fleet=FLEET).start()
        try:
            wait_online(link, 3)
            coord = make_coordinator(link, plan, db, 3)
            assert coord.round == 1
            history = coord.run()
        finally:
            link.close()
        assert [r.round for r in history] == [2, 3]
        assert history[0].replies == 3 and history[1].replies == 3
        rows = _db(db, "SELECT round, device, aggregated FROM replies ORDER BY round, device")
        assert [(r, d) for r, d, _ in rows] == [(r, n) for r in (1, 2, 3) for n in names]  # once each
        assert all(agg == 1 for _, _, agg in rows)
        assert _db(db, "SELECT value FROM meta WHERE key IN ('round', 'model_version') ORDER BY key") == \
            [("3",), ("3",)]
        assert dict(_db(db, "SELECT device, accepted FROM devices")) == {n: 3 for n in names}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for a in agents:
            a.stop()


def _poison(agent, factor=100):
    """A compromised device: its update is its honest change scaled x100 (then clipped to what it can hold)."""
    import dataclasses

    honest = agent.training.run

    def run(job):
        result = honest(job)
        state = {}
        for name, trained in result.state.items():
            info = np.iinfo(trained.dtype)
            scaled = job.base[name].astype(np.int64) + factor * (trained.astype(np.int64) - job.base[name])
            state[name] = np.clip(scaled, -127 if trained.dtype == np.int8 else info.min, info.max).astype(trained.dtype)
        return dataclasses.replace(result, state=state)

    agent.training.run = run


def _one_round_shift(task, tmp_path, strategy, options, poisoned):
    """How far one round moves the global float master (L2 over every trainable value), in a fleet of its own:
    reusing a device identity with fresh counters would rightly be refused as a replay."""
    plan, _, _ = task
    run = tmp_path / f"{strategy}-{poisoned}"
    names = [f"n{i}" for i in range(NODES)]
    provision_fleet(run / "keys", FLEET, names)
    port = free_port()
    (run / "mosquitto.conf").write_text(mosquitto_config(run / "keys", port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(run / "mosquitto.conf", port):
        return _shift_through(f"mqtts://127.0.0.1:{port}", run / "keys", names, task, run, strategy, options, poisoned)


def _shift_through(url, keys, names, task, run, strategy, options, poisoned):
    plan, _, _ = task
    agents = start_agents(url, keys, names, task, run / "nodes")
    if poisoned:
        _poison(agents[-1])
    link = CoordinatorLink(url, keys, plan, fleet=FLEET).start()
    try:
        wait_online(link, NODES)
        pol = RoundPolicy(quorum=1.0, deadline=30.0, poll=0.05)
        coord = Coordinator(link, plan, StateStore(run / "state.db"),
                            CoordinatorConfig(1, strategy, options, pol))
        before = {n: v.copy() for n, v in coord.model.master.items()}
        (result,) = coord.run()
        assert result.replies == NODES
        return float(np.sqrt(sum(((coord.model.master[n] - before[n]) ** 2).sum() for n in before)))
    finally:
        link.close()
        for a in agents:
            a.stop()


def test_poisoned_delta_moves_fedavg_but_not_trimmed_mean_or_krum(task, tmp_path):
    """Through a real mosquitto and real agents: one of four devices sends its change x100."""
    require_tool("mosquitto")
    shifts = {}
    for strategy, options in (("fedavg", {}), ("fedtrimmedavg", {"beta": 0.25}), ("krum", {"num_malicious_nodes": 1})):
        honest = _one_round_shift(task, tmp_path, strategy, options, poisoned=False)
        poisoned = _one_round_shift(task, tmp_path, strategy, options, poisoned=True)
        shifts[strategy] = poisoned / honest
    print(f"\npoisoned / honest shift of the global model: {shifts}")
    assert shifts["fedavg"] > 5, shifts
    assert shifts["fedtrimmedavg"] < 2 and shifts["krum"] < 2, shifts
