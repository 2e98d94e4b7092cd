"""The conformance transcripts (tests/conformance/, made by make_transcripts.py) replayed against the Python
DeviceSession: every call must return the recorded bytes, jobs and refusals, and a refused frame must leave the
session's persisted state as it was. The C node replays the same files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtiny.fileformat import dumps
from fedtiny.planfile import load_plan
from fedtiny.protocol.device import TrainResult
from fedtiny.protocol.errors import ProtocolError

HERE = Path(__file__).parent / "conformance"
sys.path.insert(0, str(HERE))
from make_transcripts import SCENARIOS, device_session, frames, job_dict  # noqa: E402


def train_result(d: dict) -> TrainResult:
    state = {k: np.frombuffer(bytes.fromhex(raw), dtype).reshape(shape).copy()
             for k, (dtype, shape, raw) in d["state"].items()}
    return TrainResult(state, d["num_examples"], d["loss"], d["accuracy"], d["rng_counter"])


def persisted(session) -> bytes:
    s = session.state
    return dumps(b"NODE", dict(model_version=s.model_version, round=s.round, seq=s.seq, run=s.run,
                               trained_round=s.trained_round, replay=session.endpoint.replay.export(),
                               pending_task=s.pending_task, upload=(s.upload or b"").hex()), dict(s.global_state))


def replay(name: str) -> int:
    """Replay one transcript; returns how many calls it checked."""
    spec = json.loads((HERE / "fleet.json").read_text())
    plan = load_plan(HERE / "plan.ftp")
    device = device_session(plan, spec)
    job, jobs = None, {}
    lines = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        where = f"{name}.jsonl line {i + 1} ({line['op']} at {line['now']})"
        if line["op"] == "connect":
            out = device.on_connect(line["now"])
        elif line["op"] == "tick":
            out = device.tick(line["now"])
        elif line["op"] == "complete":
            out = device.complete(jobs[line["round"]] if "round" in line else job, train_result(line["result"]),
                                  line["now"])
        else:
            before = persisted(device)
            try:
                out, job = device.receive(line["topic"], bytes.fromhex(line["frame"]), line["now"])
                error = None
            except ProtocolError as exc:
                out, error = [], exc.reason
                assert persisted(device) == before, f"{where}: a refused frame changed the session"
            assert error == line["error"], f"{where}: refused as {error}, the transcript says {line['error']}"
            assert job_dict(job if error is None else None) == line["job"], f"{where}: job"
            if job is not None:
                jobs[job.round] = job
        assert frames(out) == line["out"], f"{where}: the publishes differ from the transcript"
    return len(lines)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_device_session_passes_the_transcript(name):
    assert replay(name) > 5


def test_the_transcripts_cover_every_refusal_a_device_makes():
    reasons = {json.loads(line).get("error") for line in (HERE / "rejected_frames.jsonl").read_text().splitlines()}
    assert reasons >= {"bad-signature", "bad-topic", "wrong-topic", "bad-magic", "oversized", "replay", "stale"}


def test_a_changed_session_fails_the_transcript(monkeypatch):
    """The replay can fail: a device that seals its DELTA one seq later than the specification is caught."""
    from fedtiny.protocol import device as device_module

    original = device_module.DeviceSession.complete

    def late(self, job, result, now):
        self.state.seq += 1
        return original(self, job, result, now)

    monkeypatch.setattr(device_module.DeviceSession, "complete", late)
    with pytest.raises(AssertionError, match="publishes differ"):
        replay("round_trip")


def test_tick_due_is_when_tick_resends():
    """DeviceSession.tick_due, when a host loop may sleep until (the node agent does): None while nothing waits,
    then the moment after which tick resends the unacknowledged DELTA; tick sends nothing before it, and once the
    upload is acknowledged nothing is due again."""
    from make_transcripts import Recorder, fleet, join_and_task, new_global, trained

    plan = load_plan(HERE / "plan.ftp")
    r = Recorder(plan, fleet())
    assert r.device.tick_due() is None
    join_and_task(r, 1, 1, new_global(plan, 1), 1.0)
    assert r.device.tick_due() is None  # a job, no upload yet
    upload = r.device.complete(r.job, trained(plan, r.job.base, 11), 2.0)
    due = r.device.tick_due()
    assert due == 2.0 + r.device.ack_timeout
    assert r.device.tick(due) == []
    assert frames(r.device.tick(due + 0.01)) == frames(upload)
    assert r.device.tick_due() == due + 0.01 + r.device.ack_timeout  # resent: the next resend counts from now
    ack = r.up(upload, due + 0.1)
    r.deliver(ack, due + 0.2)
    assert r.device.tick_due() is None
