"""Failures mid-round (issue #11), through a real mosquitto with the generated configuration (TLS, client
certificates, ACL, persistence in the test's folder), the real Coordinator over a CoordinatorLink, and node
agents:

    broker killed    mosquitto gets SIGKILL while a round is half answered (two replies accepted, one device
                     still training, one upload half delivered) and starts again on the same port: every
                     device takes part again within two rounds, and no reply is accepted twice

A coordinator killed and restarted mid-round is tests/test_server_e2e.py::test_coordinator_killed_and_restarted_
resumes (the CLI in a subprocess, SIGKILLed in round 2 with two replies stored and a third upload held back).
"""

import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter

import pytest

from conftest import require_tool
from fedtiny.protocol import chunking
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.envelope import Header
from fedtiny.protocol.keys import provision_fleet
from fedtiny.protocol.messages import MessageType
from fedtiny.transport.faults import FaultyTransport
from fedtiny.transport.mqtt import CoordinatorLink
from fedtiny_device.agent import NodeAgent, RoundFaults
from fedtiny_server import ops
from fedtiny_server.grid import RoundPolicy
from fedtiny_server.rounds import Coordinator, CoordinatorConfig
from fedtiny_server.state import StateStore
from test_server_e2e import FLEET, NODES, breast_cancer_task, wait_online

KILL_ROUND = 2
ROUNDS = KILL_ROUND + 2
HOLD_S = 3.0  # how long the two late devices of KILL_ROUND stay behind: past the broker's death and restart


class Events(logging.Handler):
    """The coordinator's structured events (ops.event), as (event, fields)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, dict]] = []

    def emit(self, record):
        self.seen.append((getattr(record, "event", record.getMessage()), dict(getattr(record, "fields", {}))))

    def named(self, name):
        return [fields for event, fields in self.seen if event == name]


def late_upload(round_: int):
    """A FaultyTransport delay rule: the DELTA of `round_` goes out in part: its first two chunks at once, the
    others HOLD_S seconds later (an upload the broker's death catches half delivered)."""
    transfers: set[int] = set()

    def delay(p) -> float:
        chunk = chunking.parse_chunk(p.payload)
        if chunk.index == 0 and "/up/" in p.topic:
            header = Header.unpack(chunk.data)
            if header.type == MessageType.DELTA and header.round == round_:
                transfers.add(chunk.transfer_id)
        return HOLD_S if chunk.transfer_id in transfers and chunk.index >= 2 else 0.0

    return delay


@pytest.mark.parametrize("persistence", [True, False], ids=["persistence", "no-persistence"])
def test_broker_killed_mid_round_every_device_takes_part_again_within_two_rounds(tmp_path, persistence):
    require_tool("mosquitto")
    plan, shards, _ = breast_cancer_task(NODES)
    names = [f"n{i}" for i in range(NODES)]
    keys, persist = tmp_path / "keys", tmp_path / "mosquitto-db"
    provision_fleet(keys, FLEET, names)
    persist.mkdir()
    port = free_port()
    (tmp_path / "mosquitto.conf").write_text(mosquitto_config(keys, port, run_as_root=os.geteuid() == 0,
                                                              persistence_dir=persist if persistence else None,
                                                              autosave_interval=1))
    broker = MosquittoProcess(tmp_path / "mosquitto.conf", port).start()
    url = f"mqtts://127.0.0.1:{port}"
    trainer = None
    if shutil.which("gcc"):  # the C runtime trains in milliseconds where the Python reference takes seconds
        from fedtiny_device.cruntime import CTrainer as trainer

    # n0, n1 answer at once; n2 trains HOLD_S s longer in KILL_ROUND; n3's upload of KILL_ROUND is half held back
    faults = {2: RoundFaults(delay=lambda r: HOLD_S if r == KILL_ROUND else 0.0)}
    agents = [NodeAgent(name, url, keys, plan, *shards[i], fleet=FLEET, state_dir=tmp_path / "nodes", seed=100 + i,
                        chunk_size=256, heartbeat_s=1.0, ack_timeout_s=2.0, trainer_factory=trainer,
                        faults=faults.get(i, RoundFaults()),
                        transport_wrapper=(lambda t: FaultyTransport(t, delay=late_upload(KILL_ROUND))) if i == 3
                        else None)
              for i, name in enumerate(names)]
    events = Events()
    ops.LOG.addHandler(events)
    level = ops.LOG.level
    ops.LOG.setLevel(logging.INFO)
    link = CoordinatorLink(url, keys, plan, fleet=FLEET, chunk_size=256).start()
    kill = {}

    def kill_mid_round():
        """SIGKILL once two replies of KILL_ROUND are in; start mosquitto again on the same port a second later."""
        deadline = time.monotonic() + 120
        while len([e for e in events.named("reply_accepted") if e["round"] == KILL_ROUND]) < 2:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        kill["accepted"] = sorted(e["device"] for e in events.named("reply_accepted") if e["round"] == KILL_ROUND)
        kill["open_transfers"] = len(link.session._reassembler("n3").open_transfers())
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait(10)
        kill["killed_at"] = time.monotonic()
        time.sleep(1.0)
        broker.start()
        kill["restarted"] = True

    killer = threading.Thread(target=kill_mid_round, daemon=True)
    try:
        for a in agents:
            a.start()
        wait_online(link, NODES)
        policy = RoundPolicy(quorum=1.0, deadline=20.0, poll=0.05)
        coordinator = Coordinator(link, plan, StateStore(tmp_path / "state.db"),
                                  CoordinatorConfig(ROUNDS, "fedavg", {}, policy))
        killer.start()
        history = coordinator.run()
        killer.join(30)
    finally:
        link.close()
        for a in agents:
            a.stop(leave=False)
        broker.stop()
        ops.LOG.removeHandler(events)
        ops.LOG.setLevel(level)

    assert kill.get("restarted"), f"the broker was not killed mid-round: {kill}"
    assert kill["accepted"] == ["n0", "n1"], kill  # mid-round: two replies in, two devices still at work
    assert (persist / "mosquitto.db").exists() == persistence  # the restarted broker had a saved state, or none
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT round, device FROM replies ORDER BY round, device").fetchall()
    by_round = {r: {d for rr, d in rows if rr == r} for r in range(1, ROUNDS + 1)}
    assert by_round[1] == set(names) and by_round[KILL_ROUND] >= {"n0", "n1"}, by_round
    for name in names:  # every device takes part again within two rounds of the broker's death
        assert name in by_round[KILL_ROUND + 1] | by_round[KILL_ROUND + 2], (name, by_round)
    # nothing accepted twice: one reply_accepted event and one stored row per (round, device), and the rounds
    # aggregated exactly the stored replies
    accepted = Counter((e["round"], e["device"]) for e in events.named("reply_accepted"))
    assert max(accepted.values()) == 1 and set(accepted) == set(rows), accepted
    assert [r.replies for r in history] == [len(by_round[r]) for r in range(1, ROUNDS + 1)]
    assert coordinator.metrics.get("fedtiny_replies_accepted_total") == len(rows)
    print(f"\nbroker killed with {kill['accepted']} accepted in round {KILL_ROUND} "
          f"(n3 transfers open: {kill['open_transfers']}); replies per round: "
          f"{ {r: sorted(d) for r, d in by_round.items()} }; rejected: "
          f"{Counter(e['reason'] for e in events.named('reply_rejected'))}; link: {dict(link.stats)}")
