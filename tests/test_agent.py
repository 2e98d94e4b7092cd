"""The node agent: its sans-IO session, resume after reconnect and restart, persistence, and that no raw sample
ever leaves the device (through real brokers; fixtures shared with test_fleet_link)."""

import threading
import time

import numpy as np
import pytest

from fedtiny.protocol import chunking, topics
from fedtiny.protocol.envelope import CoordinatorEndpoint, ProtocolError, Identity, PublicIdentity
from fedtiny.protocol.update import decode_update, state_delta
from fedtiny.transport.mqtt import load_fleet
from fedtiny.protocol.messages import Delta
from fedtiny_device.agent import NodeAgent, classes, load_state
from test_fleet_link import (  # noqa: F401  (fixtures)
    FLEET, SAMPLES, Recorder, amqtt_broker, broker, collect, counter_of, expected_delta, fleet_dir,
    is_multi_chunk, make_agent, make_link, model, mosquitto, shifted_state, wait_for,
)


def coordinator_endpoint(fleet_dir):
    manifest = load_fleet(fleet_dir)
    peers = {v["id"]: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for v in manifest["devices"].values()}
    return CoordinatorEndpoint(manifest["fleet_id"], Identity.from_bytes((fleet_dir / "coordinator/identity.key")
                                                                         .read_bytes()), peers)


def test_state_saved_without_fsync_is_the_same_file(model, tmp_path, monkeypatch):
    """durable=False (a simulation's nodes): the same bytes, replaced atomically, and no fsync."""
    import os

    from fedtiny.protocol.device import NodeState, save_state

    plan = model[0]
    state = NodeState(3, plan.initial_state(), 77, round=5, seq=12, trained_round=4,
                      personal={k: v + 1 for k, v in plan.initial_state().items()})
    save_state(tmp_path / "durable.node", state)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync with durable=False"))
    save_state(tmp_path / "fast.node", state, durable=False)
    assert (tmp_path / "fast.node").read_bytes() == (tmp_path / "durable.node").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durable.node", "fast.node"]  # no temporary file left
    loaded = load_state(tmp_path / "fast.node", plan)
    assert (loaded.model_version, loaded.rng_counter, loaded.round, loaded.seq) == (3, 77, 5, 12)
    assert all(np.array_equal(loaded.personal[k], v) for k, v in state.personal.items())
    save_state(tmp_path / "new" / "folder" / "first.node", state, durable=False)  # makes the folder it saves into
    assert (tmp_path / "new" / "folder" / "first.node").read_bytes() == (tmp_path / "fast.node").read_bytes()


def test_session_is_sans_io_and_holds_no_samples(fleet_dir, model, tmp_path):
    """The protocol state machine runs on bytes alone: TASK frames in -> a job; a result in -> DELTA frames."""
    plan = model[0]
    agent = NodeAgent("raw-2", "mqtt://127.0.0.1:1", fleet_dir, plan, model[1][:4], model[2][:4], fleet=FLEET,
                      state_dir=tmp_path, seed=7, chunk_size=256)
    session = agent.session
    assert not any(isinstance(v, np.ndarray) and v.dtype == np.int8 and v.ndim == 4 for v in vars(session).values())
    coordinator = coordinator_endpoint(fleet_dir)
    from fedtiny.planfile import plan_hash
    from fedtiny.protocol.task import task_body

    device_id = topics.name_id("raw-2")
    task = coordinator.seal(task_body(plan, plan_hash(plan), {"epochs": 2, "uplink_keep": 0.25}, 256),
                            device_id=device_id, round=3, model_version=0)
    down = topics.downlink(FLEET, "raw-2")
    out, job = session.receive(down, chunking.split(task, 1, 256)[0], 0.0)
    assert out == [] and job.round == 3 and job.epochs == 2 and job.uplink_keep == 0.25
    result = agent.training.run(job)
    frames = session.complete(job, result, 0.0)
    # error feedback: what the DELTA leaves out is kept, persisted with the upload, for the next round
    change = state_delta(result.state, job.base)
    carry = load_state(agent.state_path, plan).carry
    assert sum(np.count_nonzero(v) for v in carry.values()) > 0
    assert sum(np.count_nonzero(v) for v in carry.values()) < sum(np.count_nonzero(v) for v in change.values())
    assert len(frames) > 1 and all(len(f.payload) <= 256 for f in frames)
    reassembler = chunking.Reassembler()
    for f in frames:
        done = reassembler.accept(f.payload, 0.0, "raw-2").payload
    received = coordinator.open(done)
    assert received.header.round == 3 and received.body.num_examples == 4
    sent, _ = decode_update(plan, received.body)
    assert all(np.array_equal(sent[n].astype(np.int64) + carry[n], change[n]) for n in change)
    # a QoS 1 duplicate is dropped quietly; a forged downlink is rejected; neither changes anything
    seq = session.state.seq
    assert session.receive(down, chunking.split(task, 2, 256)[0], 0.0) == ([], None)
    forged = bytearray(task)
    forged[40] ^= 1
    with pytest.raises(ProtocolError, match="bad-signature"):
        session.receive(down, chunking.split(bytes(forged), 3, 256)[0], 0.0)
    with pytest.raises(ProtocolError, match="bad-topic"):
        session.receive(topics.downlink(FLEET, "raw-1"), chunking.split(task, 4, 256)[0], 0.0)
    assert session.state.seq == seq and session.state.pending_task is None
    assert load_state(agent.state_path, plan).trained_round == 3
    # the personalised model: the trained state, saved with the DELTA, is what the device predicts with now
    kept = load_state(agent.state_path, plan).personal
    assert all(np.array_equal(kept[n], result.state[n]) for n in result.state)
    assert agent.predict(model[1][0]) == int(classes(plan, result.state, model[1][:1])[0])


def test_no_raw_sample_in_any_published_payload(amqtt_broker, fleet_dir, model, tmp_path):
    plan, x, y = model
    link = make_link(amqtt_broker, fleet_dir, plan)
    rec = Recorder()
    agent = make_agent(amqtt_broker, fleet_dir, model, "raw-0", 0, tmp_path, transport_wrapper=rec.wrap)
    will = agent.session.last_will(0.0)
    agent.start()
    try:
        wait_for(lambda: any(d.device == "raw-0" for d in link.devices()), what="JOIN")
        link.send_task("raw-0", 1, 1, shifted_state(plan, np.random.default_rng(4)), {"epochs": 2})
        assert len(collect(link, 1)) == 1
        time.sleep(1.2)  # a heartbeat too
    finally:
        agent.stop()
        link.close()
    published = rec.sent + [will]
    assert {p.topic for p in published} == {topics.uplink(FLEET, "raw-0"), topics.status(FLEET, "raw-0")}
    coordinator, reassembler = coordinator_endpoint(fleet_dir), chunking.Reassembler()
    plaintexts, kinds = [], []
    for p in published:
        payload = reassembler.accept(p.payload, 0.0, p.topic).payload
        if payload is not None:
            received = coordinator.open(payload)
            if received is not None:
                plaintexts.append(received.body.encode())
                kinds.append(type(received.body))
    assert Delta in kinds and len(kinds) >= 5  # JOIN, STATUS (heartbeats, will), DELTA, LEAVE
    haystacks = [p.payload for p in published] + plaintexts
    rows = slice(0, SAMPLES)
    for sample in x[rows]:
        needle = sample.tobytes()
        for hay in haystacks:
            assert needle not in hay
            assert sample.astype(np.int16).tobytes() not in hay


@pytest.mark.parametrize("how", ["reconnect", "restart"])
def test_interrupted_upload_resumes(broker, fleet_dir, model, tmp_path, how):
    """5 chunks of the DELTA reach the broker, then the connection drops (or the device dies and restarts):
    after the reconnect the coordinator asks for the missing chunks and gets one complete, correct reply."""
    plan = model[0]
    name = "resume-0" if broker.url.startswith("mqtt:") else "resume-1"
    name = name if how == "reconnect" else name.replace("resume", "restart")
    link = make_link(broker, fleet_dir, plan)
    rec = Recorder()
    cut = threading.Event()
    sent_delta = []

    def drop(p):
        if is_multi_chunk(p) and p.topic == topics.uplink(FLEET, name):
            sent_delta.append(p)
            if len(sent_delta) > 5:
                cut.set()
                return True
        return False

    rec.drop = drop
    agent = make_agent(broker, fleet_dir, model, name, 0, tmp_path, ack_timeout_s=60, transport_wrapper=rec.wrap)
    agent.start()
    try:
        wait_for(lambda: any(d.device == name for d in link.devices()), what="JOIN")
        global1 = shifted_state(plan, np.random.default_rng(9))
        link.send_task(name, 1, 1, global1, {"epochs": 1})
        assert cut.wait(15)
        wait_for(lambda: link.stats["duplicate_chunks"] >= 0 and len(link.session._reassembler(name).open_transfers()) == 1,
                 what="partial upload at the link")
        total = chunking.parse_chunk(sent_delta[0].payload).count
        counter, version = agent.rng_counter, agent.model_version
        rec.drop = lambda p: False
        if how == "reconnect":
            agent.transport.drop_connection()
        else:
            agent.kill()
            agent = make_agent(broker, fleet_dir, model, name, 0, tmp_path, ack_timeout_s=60,
                               transport_wrapper=rec.wrap)
            assert agent.restored and agent.model_version == version == 1 and agent.rng_counter == counter
            assert agent.session.state.upload is not None
            agent.start()
        replies = collect(link, 1)
        assert len(replies) == 1 and replies[0].round == 1
        want, _ = expected_delta(model, 0, 1, global1)
        assert all(np.array_equal(replies[0].delta[b], want[b]) for b in want)
        if how == "reconnect":  # the coordinator asked for exactly the missing chunks
            assert link.stats["missing_requests"] >= 1
            assert agent.session.resent_chunks == total - 5 and agent.transport.connects == 2
        else:  # a restarted device sends its persisted upload whole, and may be asked for the rest first,
            # depending on whether its heartbeat comes 0.5 s after the last chunk: either way the chunks the
            # coordinator already had arrive again as duplicates, or were never resent
            assert link.stats["missing_requests"] >= 1 or link.stats["duplicate_chunks"] >= 5, link.stats
        wait_for(lambda: agent.session.state.upload is None, what="ACK of the upload")
        assert link.replies(0.5) == []  # resent whole or in part, the round is answered once

        # the restarted device goes on: round 2 from its persisted seq and random counter is accepted
        state = load_state(agent.state_path, plan)
        assert state.rng_counter == counter and state.trained_round == 1
        link.send_task(name, 2, 1, global1, {"epochs": 1})
        (reply,) = collect(link, 1)
        want, _ = expected_delta(model, 0, 2, global1, rng_counter=counter)
        assert reply.round == 2 and all(np.array_equal(reply.delta[b], want[b]) for b in want)
        assert not any(k.startswith("rejected") for k in link.stats), link.stats
    finally:
        agent.stop()
        link.close()
