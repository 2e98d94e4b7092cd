"""Sans-IO protocol core: golden bytes, round trips, property tests, rejection without state change, keys."""

import copy
import os
import platform
import random
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtiny.protocol import chunking, delta, topics
from fedtiny.protocol.envelope import (
    HEADER_SIZE, SIGNATURE_SIZE, CoordinatorEndpoint, DeviceEndpoint, Flags, Identity, ProtocolError,
)
from fedtiny.protocol.keys import keys_command, mosquitto_password_line, provision_fleet
from fedtiny.protocol.messages import (
    Ack, AckStatus, Delta, DeviceState, GlobalUpdate, Join, Leave, MaskedDelta, Status, Task, decode_body,
)

FIXTURES = Path(__file__).parent / "fixtures" / "protocol"
REGENERATE = os.environ.get("FEDTINY_REGEN_FIXTURES") == "1"
FLEET_ID = topics.name_id("lab")
DEVICE_ID = topics.name_id("dev-001")
COORD = Identity.from_seed(b"fixture coordinator")
DEVICE = Identity.from_seed(b"fixture dev-001")
OTHER = Identity.from_seed(b"fixture dev-002")


def endpoints():
    device = DeviceEndpoint(FLEET_ID, DEVICE_ID, DEVICE, COORD.public)
    coordinator = CoordinatorEndpoint(FLEET_ID, COORD, {DEVICE_ID: DEVICE.public})
    return device, coordinator


def sample_entries():
    rng = np.random.default_rng(0)
    return [
        delta.DeltaEntry(0, 4, rng.integers(-128, 128, (3, 2, 2), dtype=np.int8), np.array([0.5, 0.25, 0.125])),
        delta.DeltaEntry(1, 0, rng.integers(-300, 300, (5,), dtype=np.int16), np.array([0.01])),
        delta.DeltaEntry(7, 2, np.array([[70000, -70000]], dtype=np.int32), np.array([1e-6])),
        # a trainable tensor as devices send it: the plan's scales, a bitmap of the nonzero elements
        delta.DeltaEntry(2, 0, np.array([[0, 3, 0], [0, 0, 0], [-1, 0, 2]], np.int8),
                         mask=np.array([[0, 1, 0], [0, 0, 0], [1, 0, 1]], bool)),
    ]


PLAN_HASH = bytes(range(32))
UPLINKS = {
    "join": (Join(96 * 1024, 512 * 1024, 256, 0x3, 2, PLAN_HASH), 0, 0, 0),
    "delta": (Delta(120, 0.75, sample_entries()), 0, 3, 1),
    "ack_up": (Ack(2, AckStatus.OK, 5), 0, 3, 2),
    "status": (Status(DeviceState.TRAINING, 87, 3600, 40_000, 0), 0, 3, 3),
    "leave": (Leave(0), 0, 3, 4),
}
DOWNLINKS = {
    "task": (Task(2, PLAN_HASH, 20, 8, 0.0625, 1.0, 600, 256, 0x2, b"k=v"), 3, 0),
    "global_update": (GlobalUpdate(3, sample_entries()[:2]), 3, 1),
    "ack_down": (Ack(4, AckStatus.MISSING_CHUNKS, 1, transfer_id=9, missing=(2, 5)), 3, 2),
}


def golden_messages():
    """name -> bytes, all deterministic (fixed seeds; EdDSA and ChaCha20-Poly1305 are deterministic)."""
    device, coordinator = endpoints()
    out = {}
    for name, (body, round_, version, seq) in UPLINKS.items():
        out[name] = device.seal(body, round=round_ or 3, model_version=version, seq=seq)
    for name, (body, round_, seq) in DOWNLINKS.items():
        out[name] = coordinator.seal(body, device_id=DEVICE_ID, round=round_, model_version=3, seq=seq)
    out["delta_blob"] = delta.encode_delta(sample_entries(), compress=False)
    out["delta_blob_zlib"] = delta.encode_delta([delta.DeltaEntry(0, 0, np.zeros((64, 16), np.int8), [0.5])])
    out["chunks_256"] = b"".join(chunking.split(out["delta"], 7, 256))
    return out


@pytest.mark.parametrize("name", sorted(golden_messages()))
def test_golden_bytes(name):
    data = golden_messages()[name]
    path = FIXTURES / f"{name}.bin"
    if REGENERATE:
        FIXTURES.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    assert path.exists(), f"missing fixture {path}; create it with FEDTINY_REGEN_FIXTURES=1"
    assert data == path.read_bytes(), f"{name} changed on the wire; regenerate with FEDTINY_REGEN_FIXTURES=1"


def test_header_layout_is_the_documented_one():
    raw = golden_messages()["join"]
    magic, version, msg_type, flags, reserved, fleet, dev, rnd, mv, seq, plen = struct.unpack_from(
        "<2sBBHHIIIIII", raw
    )
    assert (magic, version, msg_type, flags, reserved) == (b"FT", 2, 1, 0, 0)
    assert (fleet, dev, rnd, mv, seq, plen) == (FLEET_ID, DEVICE_ID, 3, 0, 0, 52)
    assert len(raw) == HEADER_SIZE + 52 + SIGNATURE_SIZE


def test_round_trip_every_message_type():
    device, coordinator = endpoints()
    msgs = golden_messages()
    for name, (body, *_rest) in UPLINKS.items():
        assert coordinator.open(msgs[name]).body == body, name
    for name, (body, *_rest) in DOWNLINKS.items():
        assert device.open(msgs[name]).body == body, name


def test_delta_and_global_update_are_encrypted():
    msgs = golden_messages()
    plaintext = Delta(120, 0.75, sample_entries()).encode()
    assert plaintext[8:40] not in msgs["delta"]
    header = msgs["delta"][:HEADER_SIZE]
    assert struct.unpack_from("<H", header, 4)[0] & Flags.ENCRYPTED


def test_masked_flag_travels():
    """Flag MASKED makes a DELTA a MaskedDelta (secure aggregation), at both ends; a plain Delta cannot carry it."""
    device, coordinator = endpoints()
    body = MaskedDelta(1, 0.0, 0.5, 7, (12, 20), bytes(8))
    opened = coordinator.open(device.seal(body, round=1, model_version=1, flags=Flags.MASKED))
    assert opened.header.flags & Flags.MASKED and opened.body == body
    with pytest.raises(ValueError, match="MASKED"):
        device.seal(Delta(1, 0.0, sample_entries()), round=1, model_version=1, flags=Flags.MASKED)


def state_of(endpoint):
    return copy.deepcopy((endpoint.replay._last, endpoint.replay._recent, endpoint.next_seq))


def expect_reject(endpoint, raw, reason):
    before = state_of(endpoint)
    with pytest.raises(ProtocolError) as info:
        endpoint.open(raw)
    assert info.value.reason == reason
    assert state_of(endpoint) == before
    return info.value


def test_duplicate_dropped_quietly_and_replay_rejected():
    device, coordinator = endpoints()
    first = device.seal(Delta(1, 0.1, sample_entries()), round=1, model_version=1)
    second = device.seal(Delta(2, 0.2, sample_entries()), round=2, model_version=2)
    assert coordinator.open(first) is not None
    assert coordinator.open(first) is None  # QoS 1 redelivery: dropped, no error
    assert coordinator.open(second) is not None
    assert coordinator.open(first) is None  # still within the duplicate window
    for _ in range(20):
        coordinator.open(device.seal(Leave(0), round=2, model_version=2))
    expect_reject(coordinator, first, "stale")  # an old delta replayed later
    reused = device.seal(Delta(3, 0.3, sample_entries()), round=2, model_version=2, seq=device.next_seq[DEVICE_ID] - 1)
    expect_reject(coordinator, reused, "replay")


def test_rejections_leave_state_unchanged():
    device, coordinator = endpoints()
    coordinator.open(device.seal(Join(1, 1, 256, 0, 1, PLAN_HASH), round=1, model_version=0))
    good = device.seal(Delta(1, 0.1, sample_entries()), round=1, model_version=1)

    tampered = bytearray(good)
    tampered[HEADER_SIZE + 3] ^= 1
    expect_reject(coordinator, bytes(tampered), "bad-signature")
    expect_reject(coordinator, good[:-1], "truncated")
    expect_reject(coordinator, good + b"\0", "trailing-bytes")
    expect_reject(coordinator, b"XX" + good[2:], "bad-magic")
    expect_reject(coordinator, good[:2] + b"\x01" + good[3:], "bad-version")  # version 1 is gone

    foreign = DeviceEndpoint(topics.name_id("other-fleet"), DEVICE_ID, DEVICE, COORD.public)
    expect_reject(coordinator, foreign.seal(Leave(0), round=1, model_version=0), "wrong-fleet")
    impostor = DeviceEndpoint(FLEET_ID, DEVICE_ID, OTHER, COORD.public)  # right id, wrong key
    expect_reject(coordinator, impostor.seal(Leave(0), round=1, model_version=0, seq=50), "bad-signature")
    stranger = DeviceEndpoint(FLEET_ID, topics.name_id("dev-002"), OTHER, COORD.public)
    expect_reject(coordinator, stranger.seal(Leave(0), round=1, model_version=0), "unknown-device")
    small = CoordinatorEndpoint(FLEET_ID, COORD, {DEVICE_ID: DEVICE.public}, max_message_bytes=100)
    expect_reject(small, good, "oversized")
    # a device must not accept a downlink-shaped message signed by another device
    expect_reject(device, good, "bad-direction")
    assert coordinator.open(good) is not None  # and the untouched state still accepts the real one


def test_ciphertext_tampered_and_resigned_by_sender_key_fails_decryption():
    # Only the sender can sign; this checks the AEAD layer separately, as a coordinator bug would expose it.
    device, coordinator = endpoints()
    good = bytearray(device.seal(Delta(1, 0.1, sample_entries()), round=1, model_version=1))
    good[HEADER_SIZE] ^= 0x80
    signed = bytes(good[:-SIGNATURE_SIZE])
    forged = signed + DEVICE.sign(signed)
    expect_reject(coordinator, forged, "bad-ciphertext")


def valid_messages():
    msgs = golden_messages()
    return [msgs[n] for n in list(UPLINKS)], [msgs[n] for n in list(DOWNLINKS)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_decoders_raise_only_protocol_error_on_garbage(data):
    device, coordinator = endpoints()
    for decode in (
        coordinator.open, device.open, delta.decode_delta, chunking.parse_chunk,
        lambda b: chunking.Reassembler().accept(b, 0.0),
        lambda b: decode_body(b[0] if b else 0, b[1:]),
    ):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_messages_are_rejected_with_protocol_error(data):
    uplinks, downlinks = valid_messages()
    is_up = data.draw(st.booleans())
    raw = bytearray(data.draw(st.sampled_from(uplinks if is_up else downlinks)))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=20))
    else:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    device, coordinator = endpoints()
    endpoint = coordinator if is_up else device
    before = state_of(endpoint)
    with pytest.raises(ProtocolError):
        endpoint.open(bytes(raw))
    assert state_of(endpoint) == before


def random_entry(tid, start, dtype, count, inner, scales, bitmap, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, (count, inner), dtype=dtype, endpoint=True)
    n_scales = {"plan": 0, "tensor": 1, "channel": count}[scales]
    return delta.DeltaEntry(tid, start, values, rng.random(n_scales).astype(np.float32) if n_scales else None,
                            rng.random((count, inner)) < 0.3 if bitmap else None)


entry_strategy = st.builds(
    random_entry,
    st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.sampled_from([np.int8, np.int16, np.int32]),
    st.integers(1, 12), st.integers(1, 40), st.sampled_from(["plan", "tensor", "channel"]), st.booleans(),
    st.integers(0, 2**20),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(entry_strategy, max_size=6), st.sampled_from([None, True, False]))
def test_delta_round_trip(entries, compress):
    blob = delta.encode_delta(entries, compress)
    assert delta.decode_delta(blob) == entries
    if compress is None:  # auto never makes it bigger than plain
        assert len(blob) <= len(delta.encode_delta(entries, False))


def test_delta_compression_only_where_it_pays_and_bombs_are_bounded():
    zeros = [delta.DeltaEntry(0, 0, np.zeros((256, 64), np.int8), [1.0])]
    noise = [delta.DeltaEntry(0, 0, np.random.default_rng(1).integers(-128, 128, (64, 64), dtype=np.int8), [1.0])]
    assert delta.encode_delta(zeros)[3] & delta.FLAG_ZLIB
    assert not delta.encode_delta(noise)[3] & delta.FLAG_ZLIB
    assert len(delta.encode_delta(zeros)) < 0.05 * delta.dense_fp32_bytes(256 * 64)
    with pytest.raises(ProtocolError) as info:
        delta.decode_delta(delta.encode_delta(zeros), delta.DeltaLimits(max_body=1000))
    assert info.value.reason == "oversized"


def test_delta_entry_dequantize():
    e = delta.DeltaEntry(0, 0, np.array([[2, -4], [6, 8]], np.int8), [0.5, 0.25])
    assert np.allclose(e.dequantize(), [[1, -2], [1.5, 2]])
    planned = delta.DeltaEntry(0, 0, e.values)
    assert np.allclose(planned.dequantize([0.5, 0.25]), e.dequantize())
    with pytest.raises(ValueError, match="plan's scales"):
        planned.dequantize()


def test_bitmap_entry_carries_one_bit_per_element_and_one_value_per_change():
    values = np.zeros((48, 32), np.int8)
    values[3, 5], values[40, 31], values[41, 0] = 100, -2, 1
    dense = delta.encode_delta([delta.DeltaEntry(0, 0, values)], compress=False)
    sparse = delta.encode_delta([delta.DeltaEntry(0, 0, values, mask=values != 0)], compress=False)
    assert len(dense) == 12 + 16 + 48 * 32
    assert len(sparse) == 12 + 16 + 48 * 32 // 8 + 4  # bitmap, then 3 values padded to 4
    (back,) = delta.decode_delta(sparse)
    assert back.scales is None and np.array_equal(back.values, values) and back.mask.sum() == 3


def test_small_int8_values_travel_as_nibbles_and_decode_to_int8():
    values = np.arange(-8, 7, dtype=np.int8).reshape(3, 5)  # 15 values: odd, so a padding nibble
    blob = delta.encode_delta([delta.DeltaEntry(0, 0, values)], compress=False)
    assert blob[12 + 2] == delta.INT4 and len(blob) == 12 + 16 + 8
    (back,) = delta.decode_delta(blob)
    assert back.values.dtype == np.int8 and np.array_equal(back.values, values)
    bad = bytearray(blob)
    bad[12 + 16 + 7] |= 0x10  # the padding nibble
    with pytest.raises(ProtocolError, match="padding nibble"):
        delta.decode_delta(bytes(bad))


def test_bitmap_entries_reject_stray_bits_and_contradictory_flags():
    blob = bytearray(delta.encode_delta([delta.DeltaEntry(0, 0, np.ones((1, 3), np.int8), mask=[[1, 0, 1]])],
                                        compress=False))
    stray = bytearray(blob)
    stray[12 + 16] |= 0x80  # bit 7 of a 3-element entry
    flags = bytearray(blob)
    flags[12 + 3] |= delta.ENTRY_PER_CHANNEL  # per-channel scales and plan scales at once
    for bad, reason in ((stray, "bad-entry"), (flags, "bad-flags")):
        with pytest.raises(ProtocolError) as info:
            delta.decode_delta(bytes(bad))
        assert info.value.reason == reason


def test_atheris_finds_no_decoder_raising_anything_but_protocol_error(tmp_path):
    """Coverage-guided fuzzing (tests/fuzz/fuzz_decoders.py) from the golden fixtures, 200,000 inputs: libFuzzer
    exits nonzero and leaves the input in tmp_path if any decoder raises another exception or crashes."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        pytest.skip("atheris has wheels for Linux x86-64 only")
    require_module("atheris", "dev")
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURES, corpus)
    fuzzer = Path(__file__).parent / "fuzz" / "fuzz_decoders.py"
    run = subprocess.run([sys.executable, str(fuzzer), "-runs=200000", "-max_len=1024", "-seed=1",
                          f"-artifact_prefix={tmp_path}/", str(corpus)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "Done 200000 runs" in run.stderr, run.stderr[-4000:]


def reassemble(frames, reassembler, now=0.0):
    payloads = [r.payload for f in frames if (r := reassembler.accept(f, now, "dev")).payload is not None]
    return payloads


def test_chunking_256_shuffled_duplicated_and_resume():
    payload = os.urandom(5000)
    frames = chunking.split(payload, 11, 256)
    assert all(len(f) <= 256 for f in frames) and len(frames) == 22
    shuffled = frames + frames[:5]
    random.Random(3).shuffle(shuffled)
    assert reassemble(shuffled, chunking.Reassembler()) == [payload]

    r = chunking.Reassembler()
    first_half = frames[::2]
    assert reassemble(first_half, r) == []
    missing = r.missing("dev", 11)
    assert missing == list(range(1, 22, 2))
    assert reassemble([frames[i] for i in missing], r) == [payload]
    assert r.missing("dev", 11) is None and r.reserved_bytes == 0


def test_chunk_inconsistencies_and_limits_change_nothing():
    frames = chunking.split(os.urandom(1000), 1, 256)
    other = chunking.split(os.urandom(1200), 1, 256)  # same transfer id, different shape
    r = chunking.Reassembler(max_transfers=1, max_bytes=1500, ttl=10)
    r.accept(frames[0], 0.0, "a")
    snapshot = copy.deepcopy(r._transfers)
    for bad, reason in [
        (other[1], "inconsistent-chunk"),
        (frames[0][:-1] + bytes([frames[0][-1] ^ 1]), "inconsistent-chunk"),
        (chunking.split(os.urandom(600), 2, 256)[0], "too-many-transfers"),
        (frames[1][:30], "truncated"),
    ]:
        with pytest.raises(ProtocolError) as info:
            r.accept(bad, 1.0, "a")
        assert info.value.reason == reason
        assert r._transfers == snapshot
    assert r.accept(frames[0], 1.0, "a").duplicate
    with pytest.raises(ProtocolError):
        chunking.Reassembler(max_bytes=500).accept(frames[0], 0.0)
    assert r.expire(100.0) == [("a", 1)] and r.open_transfers() == []
    with pytest.raises(ValueError):
        chunking.split(b"x", 1, 100)


def test_provisioned_keys_permissions_and_formats(tmp_path):
    out = tmp_path / "fleet"
    manifest = provision_fleet(out, "lab", ["dev-001", "dev-002"], broker_host="10.1.2.3")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif path.name.endswith(".key") or path.name in ("password", "passwd"):
            assert mode == 0o600, path
    assert manifest["devices"]["dev-001"]["id"] == DEVICE_ID
    identity = Identity.from_bytes((out / "devices/dev-001/identity.key").read_bytes())
    assert identity.public.to_bytes().hex() == manifest["devices"]["dev-001"]["public"]
    lines = (out / "broker/passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["coordinator", "dev-001", "dev-002"]
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in lines)
    acl = (out / "broker/acl").read_text()
    assert "pattern write fedtiny/lab/up/%u" in acl and "%c" not in acl.split("\n", 1)[1]
    with pytest.raises(ValueError):
        provision_fleet(tmp_path / "bad", "lab", ["a/#"])


def test_password_line_matches_mosquitto_passwd_format():
    # Known vector produced by /usr/bin/mosquitto_passwd 2.0.11 on this machine (salt read back from its output).
    import base64

    salt = base64.b64decode("6kA7ouMmKYKfQ9nn")
    expected = (
        "dev1:$7$101$6kA7ouMmKYKfQ9nn$MJvjMTb1x0E3vfVaxjvHsbGib/SU0ZTENRUeWXdPNTsZxeY83iyO5IfPSGQPyhxww9cWbPgU"
        "sGj3zCrhNwTEjA=="
    )
    assert mosquitto_password_line("dev1", "secret", salt) == expected


def test_keys_command_help_and_run(tmp_path):
    runner = CliRunner()
    assert "Provision a fleet" in runner.invoke(keys_command, ["--help"]).output
    result = runner.invoke(keys_command, ["--out", str(tmp_path / "k"), "--fleet", "lab", "--count", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k/devices/dev-001/client.crt").exists()
