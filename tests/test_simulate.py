"""`fedtiny simulate` end to end on small configurations: the real broker, coordinator and node agents."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.cli import main
from fedtiny_sim.simulate import ConfigError, SimulationConfig, simulate

# The scheme these runs train (the medical MLP's default before auto), named so that none of them pays for the
# scheme search: the default, auto, is tested in test_search.py.
MLP_SCHEME = "last:2"


@pytest.fixture(scope="module")
def medical(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "medical"
    return simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme=MLP_SCHEME, out=str(out), seed=3,
                                     alone=True)), out


def test_small_run_writes_every_report_file(medical):
    result, out = medical
    for name in ("metrics.json", "metrics.csv", "accuracy_loss.png", "bytes_per_round.png", "device_memory.png",
                 "summary.md", "plan.ftp", "coordinator.jsonl", "data_flow.csv"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["participants"] == 4 and r["uplink_bytes"] > 0 for r in metrics["rounds"])
    assert (out / "accuracy_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "No sample, feature or label left any device" in summary and "| 2 |" in summary
    flows = list(csv.DictReader(open(out / "data_flow.csv")))
    deltas = [f for f in flows if f["message"] == "DELTA"]
    assert len(deltas) == 8 and {f["device"] for f in deltas} == {f"node{i:03d}" for i in range(4)}
    assert sum(int(f["bytes"]) for f in deltas) == sum(r["uplink_bytes"] for r in metrics["rounds"])
    assert all("train:" in f["contents"] for f in deltas)


def test_personalised_accuracy_flows_from_the_deltas_to_metrics_and_the_report(medical):
    """Each round's personalised mean and worst tenth are those of the DELTAs the coordinator stored; each device's
    held-out numbers, and what it reaches alone (recomputed here with the Python Trainer), are in metrics.json,
    summary.md and report.html."""
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.device import TrainJob
    from fedtiny_device.agent import LocalTraining, heldout_count
    from fedtiny_server.state import StateStore

    result, out = medical
    metrics = json.loads((out / "metrics.json").read_text())
    store = StateStore(out / "state.db")
    try:
        replies = store.reply_metrics()
    finally:
        store.close()
    for row in metrics["rounds"]:
        mine = sorted(m["personal_accuracy"] for (r, _), m in replies.items() if r == row["round"])
        assert len(mine) == row["personal_devices"] == 4  # every medical node holds 17 or more samples
        assert row["personal_accuracy"] == pytest.approx(np.mean(mine)) and row["personal_worst_tenth"] == mine[0]
    devices, alone = metrics["devices"], metrics["run"]["alone"]
    assert set(alone["accuracy"]) == set(devices) and alone["devices"] == 4
    plan = load_plan(out / "plan.ftp")
    device = min(devices, key=lambda k: devices[k]["samples"])  # the cheapest to train again in Python
    d = devices[device]
    assert d["personal_accuracy"] == replies[2, device]["personal_accuracy"]
    assert d["heldout_samples"] == heldout_count(d["samples"]) > 0
    samples = np.load(out / "nodes" / f"{device}.npz")
    steps = 2 * (d["samples"] - d["heldout_samples"])  # 2 rounds of 1 epoch over the train part
    again = LocalTraining(plan, samples["x"], samples["y"], int(samples["seed"])).run(
        TrainJob(1, 0, 0, steps, plan.initial_state()))
    assert d["alone_accuracy"] == again.personal_accuracy
    summary, page = (out / "summary.md").read_text(), (out / "report.html").read_text()
    assert "## Personalisation" in summary and "the device alone" in summary
    assert "personalised, worst tenth" in page and "evaluation: alone" in page
    # no per-machine tests in the medical scenario: the devices are scored on the fifth they hold out, and say so
    assert metrics["run"]["evaluation"] == "heldout_fifth"
    assert "scored on the fifth of its own samples it holds out" in summary
    assert "scored on the fifth of its own samples it holds out" in page


def test_industrial_devices_are_scored_on_their_machines_tests_of_every_class(tmp_path):
    """Where the scenario has per-machine tests (the industrial fleet), each node's data file carries its machine's
    held-out windows of every class (faults its own samples lack included) and the device scores its personalised
    model on them: the DELTA's figure is the Python reference's on those windows, the host's global and alone
    lines are measured on the same windows, and the report says what they were scored on. The training samples are
    those of before: the windows are nobody's training samples."""
    from fedtiny.interpreter import quantize_input
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.device import TrainJob
    from fedtiny.scheme import REFERENCE_SPARSE
    from fedtiny_device.agent import LocalTraining, classes
    from fedtiny_server.state import StateStore
    from fedtiny_sim import nodefile
    from fedtiny_sim.personal import fleet_summary
    from fedtiny_sim.scenarios import load_task, pretrained

    out = tmp_path / "industrial"
    config = SimulationConfig(nodes=3, rounds=2, lr=0.01, epochs=1, scheme=REFERENCE_SPARSE["sensor_cnn"],
                              out=str(out), alone=True, workers=2)
    result = simulate(config)
    task = load_task("industrial", 3, seed=0)
    graph = pretrained(task, 0)[1]
    plan = load_plan(out / "plan.ftp")
    store = StateStore(out / "state.db")
    try:
        replies, final = store.reply_metrics(), store.load().ints
    finally:
        store.close()
    metrics = json.loads((out / "metrics.json").read_text())
    for i, (node, test) in enumerate(zip(task.nodes, task.machine_tests, strict=True)):
        device = f"node{i:03d}"
        d = nodefile.load(out / "nodes" / f"{device}.npz")
        assert np.array_equal(d.x, quantize_input(graph, node.X)) and np.array_equal(d.y, node.y)  # as before
        x_eval, y_eval = d.evaluation
        assert np.array_equal(x_eval, quantize_input(graph, test.X)) and np.array_equal(y_eval, test.y)
        assert set(y_eval.tolist()) == {0, 1, 2, 3} > set(d.y.tolist())  # faults this machine never had
        assert not {r.tobytes() for r in x_eval} & {r.tobytes() for n in task.nodes for r in
                                                    quantize_input(graph, n.X)}  # nobody trains on them
        # the device's figure: round 2 from the global model of round 1, as the Python reference scores it
        again = LocalTraining(plan, d.x, d.y, d.seed, rng_counter=None, evaluation=d.evaluation)
        round_one = again.run(TrainJob(1, 0, 1, 0, plan.initial_state()))
        assert replies[1, device]["personal_accuracy"] == pytest.approx(round_one.personal_accuracy, abs=1e-7)
        assert metrics["devices"][device]["heldout_samples"] == len(y_eval)
        after = float((classes(plan, final, x_eval) == y_eval).mean())
        assert metrics["devices"][device]["heldout_after"] == after
    last = metrics["rounds"][-1]
    assert last["global_heldout"] == pytest.approx(fleet_summary(
        [metrics["devices"][f"node{i:03d}"]["heldout_after"] for i in range(3)])["mean"])
    assert metrics["run"]["evaluation"] == "machine_tests" == result["evaluation"]
    for page in ((out / "summary.md").read_text(), (out / "report.html").read_text()):
        assert "held-out windows of every class (what the machine will meet" in page


def test_same_seed_same_result_and_each_run_keeps_its_own_logs(medical, tmp_path):
    import logging

    from fedtiny_server import ops

    result, first = medical
    logs = {name: (first / name).read_bytes() for name in ("coordinator.jsonl", "link.log")}
    handlers = (list(ops.LOG.handlers), list(logging.getLogger("amqtt").handlers))
    again = simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme=MLP_SCHEME,
                                      out=str(tmp_path / "again"), seed=3))
    keys = ("accuracy", "loss", "participants", "uplink_bytes")
    assert [[r[k] for k in keys] for r in again["rounds"]] == [[r[k] for k in keys] for r in result["rounds"]]
    # the second run wrote its own events, and nothing into the first run's files; its log handlers came off
    assert b"round" in (tmp_path / "again" / "coordinator.jsonl").read_bytes()
    assert {name: (first / name).read_bytes() for name in logs} == logs
    assert (list(ops.LOG.handlers), list(logging.getLogger("amqtt").handlers)) == handlers


def test_custom_npz_dataset_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    group = np.arange(240) % 4  # 4 sites: the first pretrains, the others are nodes
    np.savez(tmp_path / "plant.npz", X=x, y=y, group=group)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--nodes", "3", "--rounds", "2", "--data", str(tmp_path / "plant.npz"),
                                       "--scheme", MLP_SCHEME, "--out", str(out)])
    assert result.exit_code == 0, result.output
    # not a terminal: a line per phase and per round as they happen, where a live table would show nothing
    for line in ("preparing the model", "starting the broker and 3 nodes", "round 1/2: accuracy", "round 2/2:"):
        assert line in result.output, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["model"] == "mlp" and len(metrics["rounds"]) == 2
    assert metrics["rounds"][-1]["accuracy"] > 0.6  # a linearly separable task
    # the run's global model, checked on the user's file by `fedtiny evaluate`
    evaluated = CliRunner().invoke(main, ["evaluate", str(out / "global.ftm"), "--data", str(tmp_path / "plant.npz")])
    assert evaluated.exit_code == 0, evaluated.output
    assert float(evaluated.output.split("accuracy ")[1].split(" %")[0]) > 60, evaluated.output


def test_dropout_run_still_converges(tmp_path):
    result = simulate(SimulationConfig(nodes=6, rounds=3, scenario="medical", scheme=MLP_SCHEME,
                                       dropout=0.3, deadline=4.0, out=str(tmp_path / "dropout"), seed=1))
    participants = [r["participants"] for r in result["rounds"]]
    assert min(participants) < 6, "some node must have dropped out in some round"
    assert result["rounds"][-1]["accuracy"] >= result["initial_accuracy"] - 0.02


def test_real_mosquitto_gives_the_embedded_brokers_result(medical, tmp_path):
    """The same seed through the mosquitto a run starts for itself where it is installed (the default), through
    the embedded amqtt broker (which --capture needs) and through a user's mosquitto (--broker, TLS, client
    certificates, ACL): the same metrics."""
    import os

    from conftest import require_tool
    from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
    from fedtiny.protocol.keys import provision_fleet

    require_tool("mosquitto")
    result, out = medical
    assert result["broker"] == "mosquitto (loopback, TLS)" and (out / "mosquitto.conf").exists()
    embedded = simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme=MLP_SCHEME, seed=3,
                                         out=str(tmp_path / "amqtt"), capture=True))
    assert embedded["broker"] == "embedded amqtt (loopback)" and (tmp_path / "amqtt" / "capture.jsonl").exists()
    fleet = tmp_path / "fleet"
    provision_fleet(fleet, "sim", [f"node{i:03d}" for i in range(4)])
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(mosquitto_config(fleet, port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port):
        real = simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme=MLP_SCHEME,
                                         seed=3, out=str(tmp_path / "run"), broker=f"mqtts://127.0.0.1:{port}",
                                         fleet_dir=str(fleet)))
    keys = ("accuracy", "loss", "participants", "uplink_bytes", "downlink_bytes")
    for other in (embedded, real):
        assert [[r[k] for k in keys] for r in other["rounds"]] == [[r[k] for k in keys] for r in result["rounds"]]
    assert "mqtts://" in real["broker"]


def test_users_own_module(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    result = simulate(SimulationConfig(nodes=3, rounds=1, scenario="medical", scheme=MLP_SCHEME,
                                       model=f"{tmp_path}/mymodel.py:make", out=str(tmp_path / "run")))
    assert result["rounds"][0]["participants"] == 3 and result["rounds"][0]["accuracy"] > 0.8
    with pytest.raises(ValueError, match="FILE.py:FACTORY"):
        simulate(SimulationConfig(nodes=2, rounds=1, scenario="medical", model="resnet50", out=str(tmp_path / "x")))


def test_stragglers_are_waited_for_until_the_deadline_only(tmp_path):
    """--realtime: slow nodes (delays up to twice the deadline) really lag and miss some rounds; a round waits for
    them on the wall clock, but never past its deadline."""
    result = simulate(SimulationConfig(nodes=4, rounds=3, scenario="medical", scheme=MLP_SCHEME,
                                       stragglers=1.0, deadline=2.0, out=str(tmp_path / "slow"), seed=2, realtime=True))
    assert result["clock"] == "wall"
    participants = [r["participants"] for r in result["rounds"]]
    assert min(participants) < 4 and sum(participants) >= 1, participants
    # The wait itself, from the coordinator's log: from the round's last TASK to the tasks it closed unanswered.
    # (A round's "seconds" also count evaluation and the checkpoint, which a loaded machine can make long.)
    sent, expired = {}, {}
    for line in (tmp_path / "slow" / "coordinator.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "task_sent":
            sent[e["round"]] = e["ts"]
        elif e["event"] == "task_expired":
            expired.setdefault(e["round"], e["ts"])
    cut = [i + 1 for i, n in enumerate(participants) if n < 4]
    assert sorted(expired) == cut, (expired, participants)  # a round closed with open tasks only when it cut nodes
    waits = [expired[r] - sent[r] for r in cut]
    assert all(2.0 - 0.01 <= w < 2.0 + 1.0 for w in waits), waits  # it waited for them, up to the deadline only


def test_a_straggler_that_missed_a_round_answers_the_next_it_is_not_slow_in(tmp_path):
    """--stragglers, checked from the run's own records: metrics.json says which rounds each device was sent a
    TASK for, had a DELTA accepted in and, for a straggler, was slow in (data_flow.csv lists the same accepted
    DELTAs). A straggler misses exactly its slow rounds, and after a miss answers the first later round it is
    not slow in (seed 2: five misses followed by a round the straggler is not slow in, after overruns of 1.5 to 2
    deadlines)."""
    out = tmp_path / "stragglers"
    result = simulate(SimulationConfig(nodes=8, rounds=4, scenario="medical", scheme=MLP_SCHEME,
                                       stragglers=0.5, deadline=3.0, out=str(out), seed=2))
    devices = json.loads((out / "metrics.json").read_text())["devices"]
    flows = list(csv.DictReader(open(out / "data_flow.csv")))
    for name, d in devices.items():
        accepted = sorted(int(f["round"]) for f in flows if f["message"] == "DELTA" and f["device"] == name)
        assert accepted == d["answered"] and d["tasked"] == [1, 2, 3, 4], (name, d)
        assert d["missed"] == d["slow_rounds"], (name, d)  # no straggler: none; a straggler: its slow rounds
    stragglers = {k: d for k, d in devices.items() if d["straggler"]}
    comebacks = 0
    for name, d in stragglers.items():
        for missed in d["missed"]:
            fast_later = [r for r in range(missed + 1, 5) if r not in d["slow_rounds"]]
            if fast_later:
                assert fast_later[0] in d["answered"], (name, d)
                comebacks += 1
    assert len(stragglers) == 4 and comebacks == 5, stragglers
    assert "answered a later round after every miss" in (out / "summary.md").read_text()
    assert [r["participants"] for r in result["rounds"]] == [8 - sum(r in d["slow_rounds"] for d in stragglers.values())
                                                             for r in range(1, 5)]


# --- --engine flower: the same node logic as ClientApps in Flower's simulation engine on Ray ------------------

@pytest.fixture(scope="module")
def medical_flower(tmp_path_factory):
    """`medical`'s run (same seed and config) with the flower engine."""
    from conftest import require_module

    require_module("ray", "simulation")
    out = tmp_path_factory.mktemp("sim") / "medical_flower"
    config = SimulationConfig(nodes=4, rounds=2, scenario="medical", scheme=MLP_SCHEME, out=str(out), seed=3,
                              engine="flower")
    return simulate(config), out


def _stored(out):
    """Every global version and every accepted reply of a run, from the coordinator's SQLite checkpoints."""
    from fedtiny_server.state import StateStore

    store = StateStore(out / "state.db")
    try:
        version = store.load().model_version
        globals_ = [(store.global_ints(v), store.global_master(v)) for v in range(version + 1)]
        rows = store.db.execute("SELECT round, device, model_version, num_examples, metrics, delta, uplink_bytes "
                                "FROM replies ORDER BY round, device").fetchall()
        return globals_, [StateStore._reply(row) for row in rows]
    finally:
        store.close()


def test_flower_engine_computes_the_mqtt_engines_global_model(medical, medical_flower):
    """No faults, same seed and config: each device's delta and each round's global model bit for bit, and the
    same accuracies: the simulator computes what the devices compute."""
    (mqtt, mqtt_out), (flower, flower_out) = medical, medical_flower
    mqtt_globals, mqtt_replies = _stored(mqtt_out)
    flower_globals, flower_replies = _stored(flower_out)
    assert len(flower_globals) == len(mqtt_globals) == 3  # the initial state and one version per round
    for (ints_a, master_a), (ints_b, master_b) in zip(mqtt_globals, flower_globals):
        for name in ints_a:
            assert ints_b[name].dtype == ints_a[name].dtype
            np.testing.assert_array_equal(ints_b[name], ints_a[name], err_msg=name)
            np.testing.assert_array_equal(master_b[name], master_a[name], err_msg=name)
    assert [(r.round, r.device, r.num_examples, r.metrics) for r in flower_replies] == \
        [(r.round, r.device, r.num_examples, r.metrics) for r in mqtt_replies]
    for a, b in zip(mqtt_replies, flower_replies):
        for name in a.delta:
            np.testing.assert_array_equal(b.delta[name], a.delta[name])
    keys = ("accuracy", "loss", "participants")
    assert [[r[k] for k in keys] for r in flower["rounds"]] == [[r[k] for k in keys] for r in mqtt["rounds"]]
    assert flower["initial_accuracy"] == mqtt["initial_accuracy"]


def test_flower_engine_counts_the_encoded_delta_bodies(medical, medical_flower):
    """Its bytes are the DELTA bodies a device encodes (no envelope: no MQTT link), and the report says so."""
    from fedtiny.planfile import load_plan
    from fedtiny.protocol.update import encode_update

    (mqtt, mqtt_out), (flower, flower_out) = medical, medical_flower
    plan = load_plan(flower_out / "plan.ftp")
    _, replies = _stored(flower_out)
    for r in replies:
        body = encode_update(plan, r.delta, r.num_examples, r.metrics["loss"], r.metrics["accuracy"],
                             r.metrics.get("personal_accuracy"))
        assert r.uplink_bytes == len(body.encode())
    _, mqtt_replies = _stored(mqtt_out)
    assert all(a.uplink_bytes > b.uplink_bytes for a, b in zip(mqtt_replies, replies))  # envelopes, chunk headers
    assert sum(r["uplink_bytes"] for r in flower["rounds"]) == sum(r.uplink_bytes for r in replies)
    assert all(r["downlink_bytes"] > 0 for r in flower["rounds"])
    flows = list(csv.DictReader(open(flower_out / "data_flow.csv")))
    assert len([f for f in flows if f["message"] == "DELTA"]) == 8
    metrics = json.loads((flower_out / "metrics.json").read_text())
    assert metrics["run"]["engine"] == "flower" and metrics["run"]["broker"] is None
    assert "no MQTT link" in (flower_out / "summary.md").read_text()


def test_flower_engine_dropout_closes_rounds_without_waiting_for_the_deadline(tmp_path):
    """Dropped devices never answer; once every other device has, the deadline passes in virtual time."""
    from conftest import require_module

    require_module("ray", "simulation")
    result = simulate(SimulationConfig(nodes=6, rounds=3, scenario="medical", scheme=MLP_SCHEME,
                                       dropout=0.3, deadline=60.0, seed=1, out=str(tmp_path / "dropout"),
                                       engine="flower"))
    participants = [r["participants"] for r in result["rounds"]]
    assert min(participants) < 6, "some node must have dropped out in some round"
    assert all(r["seconds"] < 30 for r in result["rounds"])
    assert result["rounds"][-1]["accuracy"] >= result["initial_accuracy"] - 0.02


def test_flower_engine_without_ray_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"fedtiny\[simulation\]"):
        simulate(SimulationConfig(nodes=2, rounds=1, scenario="medical", out=str(tmp_path / "x"), engine="flower"))
    result = CliRunner().invoke(main, ["simulate", "--engine", "flower", "--nodes", "2", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "simulation" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work


def test_baseline_in_worker_processes_gives_the_same_rounds_and_says_each_round():
    """--baseline trains a round's nodes in --workers processes (one PyTorch thread each, as fedtiny's node
    processes): the same rounds as in one process, a line per round, and its rounds' time within its wall time."""
    import torch
    from torch import nn

    from fedtiny.datafile import Dataset
    from fedtiny_sim.baseline import run_baseline

    rng = np.random.default_rng(1)

    def dataset(n, name):
        return Dataset(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 3, n), np.zeros(n, np.int64),
                       ("a", "b", "c"), name)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nodes, test = [dataset(7, f"n{i}") for i in range(3)], dataset(20, "test")
    runs = []
    for workers in (1, 2):
        lines = []
        runs.append(run_baseline(model, nodes, test, rounds=2, lr=0.05, epochs=1, seed=3, workers=workers,
                                 note=lines.append))
        assert [line.split(":")[0] for line in lines] == ["baseline round 1/2", "baseline round 2/2"]
    one, two = runs
    assert [(r["accuracy"], r["loss"]) for r in one["rounds"]] == [(r["accuracy"], r["loss"]) for r in two["rounds"]]
    assert one["rounds"][0]["loss"] != one["rounds"][1]["loss"]  # it trained
    for result in runs:
        assert 0 < result["rounds_seconds"] <= result["wall_seconds"]


def test_baseline_gives_one_global_model_whatever_order_flower_samples_its_nodes_in():
    """Flower's FedAvg samples a round's nodes in random order (Python's `random`), and a float sum's last bits
    depend on the order of its terms: the baseline trains and replies in node order, so the global model is the
    same bits whatever the sampling order (on this machine 1 of 3 rounds differed in the 7th digit without)."""
    import random

    import torch
    from torch import nn

    from fedtiny.datafile import Dataset
    from fedtiny_sim.baseline import run_baseline

    rng = np.random.default_rng(1)
    nodes = [Dataset(rng.normal(size=(7, 4)).astype(np.float32), rng.integers(0, 3, 7), np.zeros(7, np.int64),
                     ("a", "b", "c"), f"n{i}") for i in range(6)]
    test = nodes[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    losses = []
    for order_seed in range(4):
        random.seed(order_seed)  # another order of the sampled nodes
        run = run_baseline(model, nodes, test, rounds=2, lr=0.05, epochs=1, seed=3)
        losses.append([r["loss"] for r in run["rounds"]])
    assert all(loss == losses[0] for loss in losses), losses


def test_baseline_trains_pytorch_on_one_thread_and_restores_the_setting():
    """The fp32 baseline runs PyTorch at batch 1 on one thread (issue 17: torch's default threads made a step
    10-70x slower on a busy 2-core machine), and leaves torch's thread count as it found it."""
    import torch
    from torch import nn

    from fedtiny.datafile import Dataset
    from fedtiny_sim.baseline import run_baseline

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.linear(x)

    rng = np.random.default_rng(0)

    def dataset(n, name):
        return Dataset(rng.normal(size=(n, 4)).astype(np.float32), rng.integers(0, 2, n), np.zeros(n, np.int64),
                       ("a", "b"), name)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_baseline(Probe(), [dataset(6, "n0"), dataset(6, "n1")], dataset(8, "test"), rounds=1, lr=0.01,
                              epochs=1, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}, seen
    assert len(result["rounds"]) == 1


def test_the_baseline_clients_train_on_the_samples_their_devices_train_on():
    """The fp32 baseline's client i gets node i's samples less the fifth device i holds out (for its personalised
    accuracy), chosen with the seed simulate gives node i: both sides train on the same samples."""
    from fedtiny_device.agent import heldout_count, heldout_split
    from fedtiny_sim.scenarios import load_task
    from fedtiny_sim.simulate import baseline_nodes, node_seed

    config = SimulationConfig(nodes=6, scenario="medical", seed=3)
    task = load_task("medical", 6, seed=3)
    clients = baseline_nodes(config, task)
    assert len(clients) == len(task.nodes)
    for i, (node, client) in enumerate(zip(task.nodes, clients, strict=True)):
        n = len(node.y)
        assert heldout_count(n) > 0 and len(client.y) == n - heldout_count(n)
        held = node.X[heldout_split(node_seed(config, i), n)[1]]
        rows = {r.tobytes() for r in client.X}
        assert not rows & {r.tobytes() for r in held}  # nothing the device holds out
        assert rows | {r.tobytes() for r in held} == {r.tobytes() for r in node.X}  # everything else
