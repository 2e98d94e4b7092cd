"""`fedtiny simulate` end to end on small configurations: the real broker, coordinator and node agents."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.cli import main
from fedtiny_sim.simulate import SimulationConfig, simulate


@pytest.fixture(scope="module")
def medical(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "medical"
    return simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", out=str(out), seed=3)), out


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


def test_same_seed_same_result(medical, tmp_path):
    result, _ = medical
    again = simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", out=str(tmp_path / "again"), seed=3))
    keys = ("accuracy", "loss", "participants", "uplink_bytes")
    assert [[r[k] for k in keys] for r in again["rounds"]] == [[r[k] for k in keys] for r in result["rounds"]]


def test_custom_npz_dataset_through_the_cli(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    group = np.arange(240) % 4  # 4 sites: the first pretrains, the others are nodes
    np.savez(tmp_path / "plant.npz", X=x, y=y, group=group)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["simulate", "--nodes", "3", "--rounds", "2", "--data", str(tmp_path / "plant.npz"),
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["model"] == "mlp" and len(metrics["rounds"]) == 2
    assert metrics["rounds"][-1]["accuracy"] > 0.6  # a linearly separable task


def test_dropout_run_still_converges(tmp_path):
    result = simulate(SimulationConfig(nodes=6, rounds=3, scenario="medical", dropout=0.3, deadline=4.0,
                                       out=str(tmp_path / "dropout"), seed=1))
    participants = [r["participants"] for r in result["rounds"]]
    assert min(participants) < 6, "some node must have dropped out in some round"
    assert result["rounds"][-1]["accuracy"] >= result["initial_accuracy"] - 0.02


def test_real_mosquitto_gives_the_embedded_brokers_result(medical, tmp_path):
    """The same seed through mosquitto (TLS, client certificates, ACL) and through the embedded amqtt broker."""
    import os

    from conftest import require_tool
    from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
    from fedtiny.protocol.keys import provision_fleet

    require_tool("mosquitto")
    result, _ = medical
    fleet = tmp_path / "fleet"
    provision_fleet(fleet, "sim", [f"node{i:03d}" for i in range(4)])
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(mosquitto_config(fleet, port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port):
        real = simulate(SimulationConfig(nodes=4, rounds=2, scenario="medical", seed=3, out=str(tmp_path / "run"),
                                         broker=f"mqtts://127.0.0.1:{port}", fleet_dir=str(fleet)))
    keys = ("accuracy", "loss", "participants")
    assert [[r[k] for k in keys] for r in real["rounds"]] == [[r[k] for k in keys] for r in result["rounds"]]
    assert "mqtts://" in real["broker"]


def test_users_own_module(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))\n")
    result = simulate(SimulationConfig(nodes=3, rounds=1, scenario="medical", model=f"{tmp_path}/mymodel.py:make",
                                       out=str(tmp_path / "run")))
    assert result["rounds"][0]["participants"] == 3 and result["rounds"][0]["accuracy"] > 0.8
    with pytest.raises(ValueError, match="FILE.py:FACTORY"):
        simulate(SimulationConfig(nodes=2, rounds=1, scenario="medical", model="resnet50", out=str(tmp_path / "x")))


def test_stragglers_are_waited_for_until_the_deadline_only(tmp_path):
    """Slow nodes (delays up to twice the deadline) miss some rounds; a round never waits past its deadline."""
    result = simulate(SimulationConfig(nodes=4, rounds=3, scenario="medical", stragglers=1.0, deadline=2.0,
                                       out=str(tmp_path / "slow"), seed=2))
    assert all(r["seconds"] < 2.0 + 1.5 for r in result["rounds"])  # the deadline, plus evaluation and bookkeeping
    participants = [r["participants"] for r in result["rounds"]]
    assert min(participants) < 4 and sum(participants) >= 1, participants
