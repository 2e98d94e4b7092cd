"""Secure aggregation end to end over a real broker (the embedded amqtt, with the fleet's passwords and ACL): node
agents with the fleet's public identities, the MQTT CoordinatorLink, the coordinator's rounds."""

import io
import json
import time

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


def test_two_masked_rounds_over_the_embedded_broker(model, tmp_path):  # noqa: F811
    plan, x, y = model
    names = [f"s{i}" for i in range(NODES)]
    keys = tmp_path / "keys"
    provision_fleet(keys, FLEET, names)
    manifest = load_fleet(keys / "coordinator")
    peers = {n: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for n, v in manifest["devices"].items()}
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
