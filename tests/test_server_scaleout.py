"""Scale-out end to end on one machine: two sites, each with its own mosquitto (TLS, client certificates, ACL),
its own fleet of NodeAgents and a SuperNode whose ClientApp is the site gateway (fedtiny_server.gateway), under
one Flower SuperLink. The run is submitted with the real `flwr run` (tests/flower_deploy.py), and its
ServerApp is FedAvg over the sites (docs/deployment.md, "Scale-out"). Then a site gateway restarted between
rounds, over a real mosquitto."""

import json
import os
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from conftest import require_tool
from flower_deploy import FlowerDeployment
from test_server_e2e import FLEET, NODES, breast_cancer_task, fleet, start_agents  # noqa: F401 (fixture)
from fedtiny.planfile import save_plan
from fedtiny.protocol import chunking
from fedtiny.transport import mqtt as mqtt_transport
from fedtiny.transport.faults import FaultyTransport
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.envelope import Header
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.messages import MessageType
from fedtiny_device.agent import NodeAgent, heldout_count
from fedtiny_server.app import Settings
from fedtiny_server.gateway import site_round
from fedtiny_server.requantize import dequantize_state, tensor_specs

ROUNDS = 2
SITES = {"sitea": 2, "siteb": 3}  # fleet name -> devices; different sizes tell the sites' reports apart

SERVER_APP = '''
"""FedAvg over site gateways; writes what it saw (per-reply metrics, initial and final arrays) to `result`."""
import json

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedtiny.planfile import load_plan
from fedtiny_server.requantize import dequantize_state, tensor_specs

app = ServerApp()


class RecordingFedAvg(FedAvg):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reports = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for m in replies:
            if m.has_error():
                self.reports.append({"round": server_round, "node": m.metadata.src_node_id,
                                     "error": str(m.error)})
            else:
                metrics = next(iter(m.content.metric_records.values()))
                self.reports.append({"round": server_round, "node": m.metadata.src_node_id, **dict(metrics)})
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    sites = int(cfg["sites"])
    plan = load_plan(str(cfg["plan"]))
    master = dequantize_state(tensor_specs(plan), plan.initial_state())
    initial = ArrayRecord({k: Array(np.asarray(v, np.float64)) for k, v in master.items()})
    strategy = RecordingFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites,
                               min_evaluate_nodes=0, min_available_nodes=sites)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]),
                            timeout=float(cfg["round-timeout"]))
    final = {k: v.numpy() for k, v in result.arrays.items()}
    np.savez(str(cfg["result"]) + ".npz", **{f"initial/{k}": v for k, v in master.items()},
             **{f"final/{k}": v for k, v in final.items()})
    with open(str(cfg["result"]), "w") as f:
        json.dump({"reports": strategy.reports}, f)
'''


@pytest.fixture(scope="module")
def task():
    """The end-to-end tests' breast-cancer mlp, a shard per device of every site."""
    return breast_cancer_task(sum(SITES.values()))


def _write_app(app_dir: Path, plan_path: Path, result: Path) -> None:
    (app_dir / "scaleout_app").mkdir(parents=True)
    (app_dir / "scaleout_app" / "__init__.py").write_text("")
    (app_dir / "scaleout_app" / "server.py").write_text(SERVER_APP)
    (app_dir / "pyproject.toml").write_text(textwrap.dedent(f'''\
        [project]
        name = "fedtiny-scaleout-test"
        version = "0.1.0"
        description = "fedtiny scale-out test: FedAvg over site gateways"
        license = "Apache-2.0"
        dependencies = ["fedtiny", "flwr==1.42.*"]

        [tool.flwr.app]
        publisher = "fedtiny"

        [tool.flwr.app.components]
        serverapp = "scaleout_app.server:app"
        clientapp = "fedtiny_server.gateway:gateway"

        [tool.flwr.app.config]
        sites = {len(SITES)}
        num-server-rounds = {ROUNDS}
        round-timeout = 60.0
        plan = "{plan_path}"
        result = "{result}"
        '''))


def test_two_sites_under_one_superlink(task, tmp_path, flwr_cli):
    require_tool("mosquitto")
    plan, shards, _ = task
    plan_path = tmp_path / "mlp.plan"
    save_plan(plan, plan_path)
    result = tmp_path / "result.json"
    app_dir = tmp_path / "app"
    _write_app(app_dir, plan_path, result)

    brokers, agents = [], []
    examples = {}
    try:
        # --- sites: a fleet, its broker, its devices ---------------------------------------------------------
        sites, shard = {}, 0
        for fleet_name, count in SITES.items():
            site = tmp_path / fleet_name
            names = [f"{fleet_name}-n{i}" for i in range(count)]
            provision_fleet(site / "keys", fleet_name, names)
            port = free_port()
            (site / "mosquitto.conf").write_text(
                mosquitto_config(site / "keys", port, run_as_root=os.geteuid() == 0))
            brokers.append(MosquittoProcess(site / "mosquitto.conf", port).start())
            url = f"mqtts://127.0.0.1:{port}"
            for i, name in enumerate(names):
                X, y = shards[shard]
                agent = NodeAgent(name, url, site / "keys", plan, X, y, fleet=fleet_name,
                                  state_dir=site / "nodes", seed=100 + shard, heartbeat_s=1.0, ack_timeout_s=2.0)
                agent.start()
                agents.append(agent)
                shard += 1
            # a device trains on what it does not hold out for its personalised accuracy (agent.heldout_count)
            examples[fleet_name] = sum(len(shards[j][1]) - heldout_count(len(shards[j][1]))
                                       for j in range(shard - count, shard))
            sites[fleet_name] = {"broker": url, "fleet-dir": str(site / "keys"), "fleet": fleet_name,
                                 "plan": str(plan_path), "state-db": str(site / "gateway.db"), "quorum": 1.0,
                                 "deadline": 30.0, "seen-within": 60.0}
        with FlowerDeployment(tmp_path / "flower", flwr_cli) as flower:
            # their retained STATUS is on the broker
            flower.wait(lambda: all(a.transport.connected.is_set() for a in agents), "devices to connect")
            # --- SuperLink and one SuperNode (gateway) per site; the run as `flwr run app local` -------------
            flower.superlink()
            for fleet_name, settings in sites.items():
                flower.supernode(fleet_name, settings)
            flower.submit(app_dir)
            flower.wait(result.exists, "the run to finish")
            time.sleep(0.2)  # the json is written after the npz
            reports = json.loads(result.read_text())["reports"]
            arrays = np.load(str(result) + ".npz")
    finally:
        for a in agents:
            a.stop()
        for b in brokers:
            b.stop()

    print(f"\nsite reports: {reports}")
    assert not [r for r in reports if "error" in r], reports
    for rnd in range(1, ROUNDS + 1):
        got = sorted((int(r["site-replies"]), int(r["num-examples"])) for r in reports if r["round"] == rnd)
        assert got == sorted((SITES[f], examples[f]) for f in SITES), (rnd, reports)
        assert len({r["node"] for r in reports if r["round"] == rnd}) == len(SITES)
    specs = tensor_specs(plan)
    initial = dequantize_state(specs, plan.initial_state())
    for name in specs:
        np.testing.assert_array_equal(arrays[f"initial/{name}"], initial[name])
    shift = np.sqrt(sum(((arrays[f"final/{n}"] - initial[n]) ** 2).sum() for n in specs))
    print(f"global model shift (L2): {shift:.4f}")
    assert shift > 0, "the global model did not change"


def test_gateway_restarted_between_rounds_refuses_an_uplink_from_before(  # noqa: F811 (fixture)
        fleet, task, tmp_path, monkeypatch):
    """Each site_round builds its link, store and grid from the node config and the site's SQLite file, as a
    restarted gateway process does. A device's round-1 DELTA, published again while the gateway is down (the
    broker queues it for the gateway's persistent session and delivers it as the next gateway connects), is
    refused by the round-2 gateway: its link starts from the replay counters checkpointed with round 1.

    The device's JOIN after its round-1 ACK (newer in the same replay stream) is held until the replay is out,
    so that nothing but the restored counters can tell the new gateway that the DELTA is old. Heartbeats are
    30 s apart, as on a real device: the new gateway must know every device from the STATUS messages the broker
    retained, which its predecessor had already accepted."""
    url, keys, names = fleet
    plan = task[0]
    plan_path = tmp_path / "mlp.plan"
    save_plan(plan, plan_path)
    settings = Settings(broker=url, fleet_dir=str(keys), fleet=FLEET, plan=str(plan_path),
                        state_db=str(tmp_path / "gateway.db"), quorum=1.0, deadline=30.0, seen_within=60.0)
    links = []

    class RecordedLink(mqtt_transport.CoordinatorLink):
        def start(self):
            links.append(self)
            return super().start()

    monkeypatch.setattr(mqtt_transport, "CoordinatorLink", RecordedLink)  # what site_round builds
    agents = start_agents(url, keys, names, task, tmp_path / "nodes", heartbeat_s=30.0,
                          transport_wrapper=FaultyTransport)
    device = agents[0]
    deltas, held, transfers = [], [], set()

    def held_back(p) -> bool:
        chunk = chunking.parse_chunk(p.payload)
        header = Header.unpack(chunk.data) if chunk.index == 0 else None
        if header is not None and header.type == MessageType.DELTA and header.round == 1:
            transfers.add(chunk.transfer_id)
        if "/up/" in p.topic and chunk.transfer_id in transfers:
            deltas.append(p)
        if header is not None and header.type == MessageType.JOIN and header.round == 1:
            held.append(p)
            return True
        return False

    device.transport.drop = held_back
    try:
        deadline = time.monotonic() + 20
        while not all(a.transport.connected.is_set() for a in agents):
            assert time.monotonic() < deadline, "devices did not connect"
            time.sleep(0.05)
        master = dequantize_state(tensor_specs(plan), plan.initial_state())
        arrays, first = site_round(settings, 1, ArrayRecord({k: Array(np.asarray(v)) for k, v in master.items()}))
        deadline = time.monotonic() + 10  # the round may end before the device has its ACK and sends the JOIN
        while not held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(transfers) == 1 and held, "the device sent one DELTA in round 1, then a JOIN"
        # the gateway is down: the device's old DELTA goes out again, then its held JOIN
        device.transport.drop = lambda p: False
        for p in deltas + held:
            assert device.transport.wait_published(device.transport.publish(p)) is not None
        _, second = site_round(settings, 2, arrays)
    finally:
        for a in agents:
            a.stop()
    assert first["site-replies"] == second["site-replies"] == NODES
    refused = {k: v for k, v in links[1].stats.items() if k.startswith("rejected:")}
    assert refused == {"rejected:stale": 1}, refused  # the replayed DELTA, and nothing else
    assert links[1].stats["replies"] == NODES, links[1].stats  # round 2's own replies, nothing from round 1
