"""Secure aggregation end to end over a real broker (the embedded amqtt, with the fleet's passwords and ACL): node
agents with the fleet's public identities, the MQTT CoordinatorLink, the coordinator's rounds."""

import io
import json
import time
from pathlib import Path

import numpy as np

from fedtiny.protocol.brokers import EmbeddedBroker
from fedtiny.protocol.envelope import PublicIdentity
from fedtiny.protocol.keys import provision_fleet
from fedtiny.transport.mqtt import CoordinatorLink, load_fleet
from fedtiny_device.agent import NodeAgent, RoundFaults
from fedtiny_server import ops
from fedtiny_server.grid import RoundPolicy
from fedtiny_server.rounds import Coordinator, CoordinatorConfig
from fedtiny_server.state import StateStore

from conftest import ClockUntil
from test_fleet_link import model  # noqa: F401  (fixture: a small plan and int8 samples)

FLEET = "sa"
NODES = 5
SAMPLES = 16


def provisioned(tmp_path, prefix: str) -> tuple[list[str], Path, dict[str, PublicIdentity]]:
    """A fleet of NODES devices named prefix0.. in tmp_path/keys: (names, keys folder, name -> public identity: what
    the node agents check the coordinator's relayed round keys against)."""
    names = [f"{prefix}{i}" for i in range(NODES)]
    keys = tmp_path / "keys"
    provision_fleet(keys, FLEET, names)
    manifest = load_fleet(keys / "coordinator")
    peers = {n: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for n, v in manifest["devices"].items()}
    return names, keys, peers


def test_two_masked_rounds_over_the_embedded_broker(model, tmp_path):  # noqa: F811
    plan, x, y = model
    names, keys, peers = provisioned(tmp_path, "s")
    with EmbeddedBroker(keys) as broker:
        url = f"mqtt://{broker.host}:{broker.port}"
        agents = [NodeAgent(name, url, keys, plan, x[:SAMPLES], y[:SAMPLES], fleet=FLEET, state_dir=tmp_path / "n",
                            seed=i, chunk_size=512, heartbeat_s=1.0, ack_timeout_s=2.0, peers=peers,
                            faults=RoundFaults(fails=lambda r, i=i: (r, i) == (2, 0))).start()  # s0 drops in round 2
                  for i, name in enumerate(names)]
        link = CoordinatorLink(url, keys, plan, fleet=FLEET).start()
        log = io.StringIO()
        with ops.json_logging(log):  # the coordinator's JSON-lines events, taken off after
            try:
                deadline = time.monotonic() + 30
                while len([d for d in link.devices() if d.online]) < NODES:
                    assert time.monotonic() < deadline, "devices did not join"
                    time.sleep(0.05)
                grid = []  # the coordinator's, once made

                def live_answered() -> bool:  # every live node's message of the round's current stage came
                    round_ = grid[0].round if grid else 0
                    live = set(names) - ({"s0"} if round_ == 2 else set())
                    return live <= link.secagg_status(round_)[1]

                # each stage's deadline counts from the moment the live nodes answered it (ClockUntil): load cannot
                # make it cut a live node; only s0 (in round 2, at 1 s) is cut
                coordinator = Coordinator(link, plan, StateStore(tmp_path / "state.db"), CoordinatorConfig(
                    rounds=2, policy=RoundPolicy(quorum=1.0, deadline=1.0, poll=0.05),
                    train_config={"clip_norm": 0.5}, secagg=True), clock=ClockUntil(live_answered))
                grid.append(coordinator.grid)
                history = coordinator.run()
            finally:
                link.close()
                for a in agents:
                    a.stop(leave=False)
    assert [r.replies for r in history] == [5, 4] and coordinator.model.version == 2
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    rounds = [e for e in events if e["event"] == "secagg_round"]
    assert [len(e["survivors"]) for e in rounds] == [5, 4] and rounds[1]["dropped"] == ["s0"]
    assert not [e for e in events if e["event"] == "reply_accepted"]  # no individual update was ever accepted
    assert all(not a.rejected for a in agents)
    assert np.isfinite(coordinator.model.master[plan.trainable_buffers()[0]]).all()


def test_the_coordinator_command_runs_distributed_dp_over_the_embedded_broker(model, tmp_path):  # noqa: F811
    """`fedtiny coordinator --secagg --clip-norm 0.5 --dp-epsilon 8` (the command line, through click in this
    process) against node agents through the embedded broker: both rounds are masked sums of every node's noised
    delta, the TASKs carry the devices' noise and the minimum survivors, and the signed audit log has the epsilon
    spent, within the budget."""
    from click.testing import CliRunner

    from fedtiny.cli import main
    from fedtiny.planfile import save_plan

    plan, x, y = model
    names, keys, peers = provisioned(tmp_path, "c")
    save_plan(plan, tmp_path / "plan.ftp")
    with EmbeddedBroker(keys) as broker:
        url = f"mqtt://{broker.host}:{broker.port}"
        agents = [NodeAgent(name, url, keys, plan, x[:SAMPLES], y[:SAMPLES], fleet=FLEET, state_dir=tmp_path / "n",
                            seed=i, chunk_size=512, heartbeat_s=1.0, ack_timeout_s=2.0, peers=peers).start()
                  for i, name in enumerate(names)]
        try:
            deadline = time.monotonic() + 30
            while not all(a.transport.connected.is_set() for a in agents):  # retained STATUS tells the coordinator
                assert time.monotonic() < deadline, "devices did not connect"
                time.sleep(0.05)
            with ops.json_logging(io.StringIO()):  # the command adds its own handler: taken off after, with this
                handlers = list(ops.LOG.handlers)
                try:
                    runner = CliRunner(mix_stderr=False)
                except TypeError:  # click >= 8.2 keeps stderr apart
                    runner = CliRunner()
                try:
                    result = runner.invoke(main, [
                        "coordinator", "--broker", url, "--fleet-dir", str(keys), "--fleet", FLEET,
                        "--plan", str(tmp_path / "plan.ftp"), "--rounds", "2", "--quorum", "1.0", "--deadline", "60",
                        "--state-db", str(tmp_path / "state.db"), "--clip-norm", "0.5", "--secagg",
                        "--dp-epsilon", "8", "--audit-log", str(tmp_path / "audit.jsonl")])
                finally:
                    for handler in set(ops.LOG.handlers) - set(handlers):
                        ops.LOG.removeHandler(handler)
        finally:
            for a in agents:
                a.stop(leave=False)
    assert result.exit_code == 0, (result.output + result.stderr)[-3000:]
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    rounds = [e for e in events if e["event"] == "secagg_round"]
    assert [sorted(e["survivors"]) for e in rounds] == [names, names]
    assert not [e for e in events if e["event"] == "reply_accepted"]  # never an individual update
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    configured = [e for e in audit if e["event"] == "round_configured"]
    assert [e["secagg"]["min_survivors"] for e in configured] == [5, 5]  # 5 nodes, quorum 1: all expected
    assert all(e["task"]["noise_sigma"] > 0 for e in configured)
    spent = [e["epsilon"] for e in audit if e["event"] == "round_completed"]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 8.0
