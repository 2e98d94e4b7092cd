"""The coordinator's signed, hash-chained audit log (fedtiny/audit.py, server/audit.py) and `fedtiny audit verify`:
a changed, removed, reordered or cut-off line is caught and named; the coordinator's rounds write what the review
needs (settings, pseudonymous participants, model hashes, epsilon)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fedtiny.audit import AuditError, AuditLog, canonical, load_private_key, load_public_key, new_key_pem, verify
from fedtiny.cli import main
from test_server import plan, responder, zero_delta  # noqa: F401  (plan: the module fixture, by name)


@pytest.fixture
def keys(tmp_path):
    private, public = new_key_pem()
    (tmp_path / "audit.key").write_bytes(private)
    (tmp_path / "audit.pub").write_bytes(public)
    return load_private_key(tmp_path / "audit.key"), tmp_path / "audit.pub"


def write_log(path, key, rounds=3) -> list[bytes]:
    log = AuditLog(path, key)
    log.record("coordinator_started", round=0, enrolled=[log.pseudonym("node000"), log.pseudonym("node001")])
    for r in range(1, rounds + 1):
        log.record("round_configured", round=r, clip_norm=0.5, noise_multiplier=1.1)
        log.record("round_completed", round=r, participants=[log.pseudonym("node000")], epsilon=0.5 * r)
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def check_fails(path, lines, public, match):
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match=match):
        verify(path, public)


def test_a_whole_log_verifies_and_names_its_events(tmp_path, keys):
    key, pub = keys
    write_log(tmp_path / "audit.jsonl", key)
    result = verify(tmp_path / "audit.jsonl", load_public_key(pub))
    assert result.lines == 8 and result.closed
    assert [e["event"] for e in result.events][:3] == ["coordinator_started", "round_configured", "round_completed"]
    assert result.events[-1] == {**result.events[-1], "event": "audit_closed", "lines": 7}
    # pseudonyms: stable per device, not the name
    started = result.events[0]
    assert len(set(started["enrolled"])) == 2 and not any("node" in p for p in started["enrolled"])


def test_a_changed_line_is_named(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    entry = json.loads(lines[4])
    entry["epsilon"] = 0.1  # a smaller privacy loss, signature kept
    lines[4] = canonical(entry) + b"\n"
    check_fails(tmp_path / "audit.jsonl", lines, load_public_key(pub), r"line 5: bad signature")
    # the same change re-signed with another key: refused as not the coordinator's
    other, _ = new_key_pem()
    (tmp_path / "other.key").write_bytes(other)
    forged = AuditLog(tmp_path / "forged.jsonl", load_private_key(tmp_path / "other.key"))
    forged.record("coordinator_started", round=0)
    forged.close()
    check_fails(tmp_path / "audit.jsonl", forged.path.read_bytes().splitlines(keepends=True), load_public_key(pub),
                r"line 1: signed by key [0-9a-f]{16}, not by the given key")


def test_a_line_with_only_its_spacing_changed_is_named(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    lines[2] = lines[2].replace(b'","', b'", "', 1)
    check_fails(tmp_path / "audit.jsonl", lines, load_public_key(pub), r"line 3: not in canonical form")


def test_a_removed_line_is_named_at_the_line_after_it(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    check_fails(tmp_path / "audit.jsonl", lines[:3] + lines[4:], load_public_key(pub),
                r"line 4: sequence number 4 where 3 belongs")


def test_reordered_lines_are_named(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    check_fails(tmp_path / "audit.jsonl", lines[:1] + [lines[2], lines[1]] + lines[3:], load_public_key(pub),
                r"line 2: sequence number 2 where 1 belongs")


def test_a_removed_tail_and_a_cut_off_line_are_caught(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    public = load_public_key(pub)
    check_fails(tmp_path / "audit.jsonl", lines[:-2], public, r"line 6: the log ends without its closing record")
    check_fails(tmp_path / "audit.jsonl", lines[:-1] + [lines[-1][:-5]], public, r"line 8: cut off")
    check_fails(tmp_path / "audit.jsonl", lines[:2] + [b"not json\n"], public, r"line 3: not JSON")
    # an open log (a coordinator still running) is accepted when asked
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines[:-2]))
    assert not verify(tmp_path / "audit.jsonl", public, require_closed=False).closed


def test_a_restarted_coordinator_continues_its_chain(tmp_path, keys):
    key, pub = keys
    write_log(tmp_path / "audit.jsonl", key, rounds=1)
    again = AuditLog(tmp_path / "audit.jsonl", key)
    assert again.seq == 4
    again.record("coordinator_started", round=1)
    again.close()
    result = verify(tmp_path / "audit.jsonl", load_public_key(pub))
    assert result.lines == 6 and result.events[-1]["lines"] == 5
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"


def test_a_broken_log_is_refused_before_it_is_continued(tmp_path, keys):
    key, _ = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines[:2] + lines[3:]))
    with pytest.raises(AuditError, match="line 3"):
        AuditLog(tmp_path / "audit.jsonl", key)


# --- the command --------------------------------------------------------------------------------------------------

def test_audit_verify_command(tmp_path, keys):
    key, pub = keys
    lines = write_log(tmp_path / "audit.jsonl", key)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", str(tmp_path / "audit.jsonl"), "--key", str(pub)])
    assert ok.exit_code == 0 and "8 lines verified" in ok.output and "3 rounds, closed" in ok.output, ok.output
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines[:1] + [lines[2], lines[1]] + lines[3:]))
    other, other_pub = new_key_pem()
    (tmp_path / "other.pub").write_bytes(other_pub)
    (tmp_path / "garbage.pub").write_text("not a key\n")
    for args, message in (
            ([str(tmp_path / "bad.jsonl"), "--key", str(pub)], "line 2: sequence number 2 where 1 belongs"),
            ([str(tmp_path / "audit.jsonl"), "--key", str(tmp_path / "other.pub")], "line 1: signed by key"),
            ([str(tmp_path / "missing.jsonl"), "--key", str(pub)], "missing.jsonl: No such file"),
            ([str(tmp_path / "audit.jsonl"), "--key", str(tmp_path / "garbage.pub")], "garbage.pub: not a PEM key")):
        result = runner.invoke(main, ["audit", "verify", *args])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.count("\n") == 1 and message in result.output and "Traceback" not in result.output, \
            result.output


# --- the coordinator writes it ------------------------------------------------------------------------------------

def test_the_coordinators_rounds_are_in_its_audit_log(plan, tmp_path):
    """Two rounds under central DP with a fake fleet, through run_coordinator (what `fedtiny coordinator` runs):
    the log, at its default path beside the state database, holds each round's settings, its cohort and
    participants as pseudonyms, the model hash the coordinator really holds, and the epsilon dp-accounting gives."""
    from fedtiny.planfile import save_plan
    from fedtiny.privacy import epsilon
    from fedtiny.protocol.keys import provision_fleet, revoke_devices, revoked_devices
    from fedtiny_server.app import Settings, run_coordinator
    from fedtiny_server.audit import model_hash
    from fedtiny_server.state import StateStore
    from fedtiny_server.testing import FakeClock, FakeLink

    save_plan(plan, tmp_path / "p.plan")
    provision_fleet(tmp_path / "fleet", "lab", ["a", "b", "c"])
    answer = responder(lambda t: {k: v + 1 for k, v in zero_delta(plan).items()})

    def revoke_c_in_round_1(link, task):  # `fedtiny keys --revoke c` while the coordinator runs
        if task.round == 1 and "c" not in revoked_devices(tmp_path / "fleet" / "coordinator"):
            revoke_devices(tmp_path / "fleet", ["c"])
        answer(link, task)

    link = FakeLink(FakeClock(), revoke_c_in_round_1)
    link.add_device("a"), link.add_device("b")
    settings = Settings("mqtt://127.0.0.1:1", str(tmp_path / "fleet"), "lab", str(tmp_path / "p.plan"),
                        str(tmp_path / "s.db"), num_server_rounds=2, quorum=1.0, deadline=5, clip_norm=0.5,
                        dp_epsilon=8.0)
    history = run_coordinator(settings, link=link)
    assert [r.replies for r in history] == [2, 2]
    events = verify(tmp_path / "s.audit.jsonl", load_public_key(tmp_path / "fleet" / "audit.pub")).events
    assert [e["event"] for e in events] == ["coordinator_started", "round_configured", "round_completed",
                                            "devices_revoked", "round_configured", "round_completed", "audit_closed"]
    started, revoked, configured, completed = events[0], events[3], events[4], events[5]
    assert len(started["enrolled"]) == 3 and started["revoked"] == {}
    assert list(revoked["revoked"]) == sorted(set(started["enrolled"]) - set(completed["participants"]))
    assert configured["clip_norm"] == 0.5 and configured["noise_multiplier"] > 0
    assert sorted(completed["participants"]) == sorted(configured["cohort"]) and len(configured["cohort"]) == 2
    assert not {"a", "b"} & set(completed["participants"])  # pseudonyms, not names
    assert completed["epsilon"] == pytest.approx(epsilon(configured["noise_multiplier"], 2, 1e-5))
    store = StateStore(tmp_path / "s.db")
    try:
        assert completed["model_hash"] == model_hash(store.load().ints) == events[-1]["model_hash"]
    finally:
        store.close()
    assert events[2]["model_hash"] == configured["model_hash"] != completed["model_hash"]  # a new model each round


def test_under_secure_aggregation_the_participants_are_the_survivors(tmp_path, keys):
    """server/secagg.py hands the strategy one reply for the survivors' masked sum: the log names the survivors
    (the round's accepted devices), not that reply's sender."""
    from types import SimpleNamespace

    from fedtiny_server.audit import CoordinatorAudit

    key, pub = keys
    audit = CoordinatorAudit(AuditLog(tmp_path / "audit.jsonl", key))
    coordinator = SimpleNamespace(
        config=SimpleNamespace(secagg=True), grid=SimpleNamespace(_accepted_in=lambda rnd: {"a", "b", "c"}),
        model=SimpleNamespace(version=1, ints={"w": np.zeros(3, np.int8)}), privacy=lambda: None)
    one_reply = [SimpleNamespace(metadata=SimpleNamespace(src_node_id=7))]
    audit.round_completed(coordinator, 1, one_reply)
    audit.close()
    completed = verify(tmp_path / "audit.jsonl", load_public_key(pub)).events[0]
    assert completed["participants"] == sorted(audit.log.pseudonym(d) for d in "abc")
