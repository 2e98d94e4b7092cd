"""The node's crypto in C (device_runtime/c/fedtiny_envelope.c + Monocypher from PyPI) against the Python envelope:
C seals -> Python opens and Python seals -> C opens for every message type, identical bytes for the same keys,
nonce and body (the golden fixtures included), the same rejection reason as Python for every tampered byte, the
replay window, and the Cortex-M4 build under QEMU with its instruction counts.

Monocypher's sources are fetched with pip (pinned version and SHA-256): without a reachable package index these
tests skip on a user's machine and fail in CI; so do they without gcc / arm-none-eabi-gcc / qemu-system-arm.
"""

import ctypes
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_monocypher, require_tool
from test_protocol_codec import COORD, DEVICE, DEVICE_ID, DOWNLINKS, FIXTURES, FLEET_ID, UPLINKS, endpoints

from fedtiny.protocol import topics
from fedtiny.protocol.envelope import (
    HEADER_SIZE, SIGNATURE_SIZE, CoordinatorEndpoint, Flags, Identity, ProtocolError, derive_key,
)
from fedtiny.protocol.messages import (Ack, AckStatus, DeviceState, GlobalUpdate, Join, Leave, MaskedDelta, MessageType,
                                       Status, Task)
from fedtiny_device import cenvelope, codegen, cruntime, monocypher_sources
from fedtiny_device.cruntime import fnv1a


@pytest.fixture(scope="session")
def sources():
    """monocypher.c/.h from the pinned sdist (skip without a package index on a user's machine, fail in CI)."""
    return require_monocypher()


@pytest.fixture(scope="session")
def env(sources, cache):
    require_tool("gcc")
    require_tool("make")
    return cenvelope.CEnvelope(cache)


def c_node(env, identity=DEVICE, coordinator=COORD, device_id=DEVICE_ID, fleet_id=FLEET_ID):
    return env.node(fleet_id, device_id, identity.to_bytes(), coordinator.public.to_bytes())


def outcome(endpoint, raw, **kwargs):
    """"ok", "duplicate" or the ProtocolError reason of endpoint.open(raw) (a Python endpoint or a CNode)."""
    try:
        return "duplicate" if endpoint.open(raw, **kwargs) is None else "ok"
    except ProtocolError as err:
        return err.reason


def python_reason(endpoint, raw):
    return outcome(endpoint, raw)


def c_reason(node, raw):
    return outcome(node, raw, commit=False)  # look, do not record


# ---- where the sources come from ------------------------------------------------------------------------------

def test_sources_are_monocypher_4_0_3_from_the_pinned_sdist(sources):
    assert set(sources) == {"monocypher.c", "monocypher.h"}
    assert sources["monocypher.h"].startswith(b"// Monocypher version 4.0.3\n")
    assert b"crypto_eddsa_sign" in sources["monocypher.c"] and b"crypto_aead_init_ietf" in sources["monocypher.c"]
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"pymonocypher=={monocypher_sources.PYMONOCYPHER_VERSION}"' in pyproject  # host and node: one library


def test_a_cached_sdist_with_another_hash_is_refused(tmp_path):
    (tmp_path / monocypher_sources.SDIST).write_bytes(b"not the sdist")
    with pytest.raises(monocypher_sources.SourceError, match="not the pinned") as info:
        monocypher_sources.monocypher_sources(tmp_path)
    assert "\n" not in str(info.value)


def test_no_package_index_fails_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))
    assert monocypher_sources.main([str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedtiny: cannot fetch pymonocypher-") and err.count("\n") == 1
    assert not (tmp_path / "out" / "monocypher.c").exists()


def test_makefile_fetches_the_sources_itself(sources, tmp_path):
    """In a build folder without them, make gets monocypher.c/.h through monocypher_sources (warm cache here)."""
    require_tool("make")
    (tmp_path / "Makefile").write_bytes((codegen.runtime_dir() / "Makefile").read_bytes())
    proc = subprocess.run(["make", "-s", f"PYTHON={sys.executable}", "monocypher.c", "monocypher.h"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {n: (tmp_path / n).read_bytes() for n in sources} == sources


# ---- keys ------------------------------------------------------------------------------------------------------

def test_c_keys_equal_the_python_keys_at_both_ends(env):
    node = c_node(env)
    assert bytes(node.keys.up_key) == derive_key(DEVICE, COORD.public, FLEET_ID, DEVICE_ID, 0)
    assert bytes(node.keys.up_key) == derive_key(COORD, DEVICE.public, FLEET_ID, DEVICE_ID, 0)
    assert bytes(node.keys.down_key) == derive_key(COORD, DEVICE.public, FLEET_ID, DEVICE_ID, 1)
    assert bytes(node.keys.sign_secret[32:]) == DEVICE.public.sign
    assert bytes(node.keys.up_key) != bytes(node.keys.down_key)
    for i in range(8):
        a, b = Identity.from_seed(b"a%d" % i), Identity.from_seed(b"b%d" % i)
        own_secret = a.to_bytes()[32:]
        assert env.derive_key(own_secret, b.public.kex, i, 1000 + i, i % 2) == derive_key(a, b.public, i, 1000 + i,
                                                                                          i % 2)


def test_a_low_order_coordinator_key_is_refused(env):
    bad = COORD.public.sign + bytes(32)  # the X25519 point 0: every agreement with it is zero
    with pytest.raises(ValueError, match="argument"):
        env.node(FLEET_ID, DEVICE_ID, DEVICE.to_bytes(), bad)


# ---- C seals, Python opens ---------------------------------------------------------------------------------------

# name -> (body, run, round, model_version, seq, flags)
UPLINK_CASES = {name: (body, 0, round_ or 3, version, seq, 0) for name, (body, round_, version, seq) in UPLINKS.items()}
UPLINK_CASES["delta_masked"] = (MaskedDelta(1, 0.0, 0.5, 7, (12, 20), bytes(8)), 0, 4, 3, 9, int(Flags.MASKED))
UPLINK_CASES["last_will"] = (Status(DeviceState.OFFLINE, 255, 0, 0, 0), 0, 4, 3, 10, int(Flags.LAST_WILL))
UPLINK_CASES["delta_run_7"] = (UPLINKS["delta"][0], 7, 1, 3, 11, 0)  # the run is in the header and the nonce


@pytest.mark.parametrize("name", sorted(UPLINK_CASES))
def test_c_seals_what_python_opens_byte_for_byte(env, name):
    body, run, round_, version, seq, flags = UPLINK_CASES[name]
    c_raw = c_node(env).seal(int(body.TYPE), body.encode(), round=round_, model_version=version, seq=seq,
                             flags=flags, run=run)
    device, coordinator = endpoints()
    assert c_raw == device.seal(body, round=round_, model_version=version, seq=seq, flags=flags, run=run)
    received = coordinator.open(c_raw)
    assert received.body == body and received.header.flags & flags == flags and received.header.run == run
    if name in UPLINKS:
        assert c_raw == (FIXTURES / f"{name}.bin").read_bytes()  # the golden bytes, written by C


def test_c_seal_body_in_place_matches_a_separate_body(env):
    """The node may encode the body right after the header in its output buffer: same envelope."""
    body = UPLINKS["delta"][0].encode()
    node = c_node(env)
    out = bytearray(HEADER_SIZE + len(body) + 16 + SIGNATURE_SIZE)
    out[HEADER_SIZE:HEADER_SIZE + len(body)] = body
    buf = (ctypes.c_uint8 * len(out)).from_buffer(out)
    out_len = ctypes.c_size_t()
    status = env.lib.fedtiny_env_seal(ctypes.byref(node.keys), int(MessageType.DELTA), 0, 0, 3, 3, 1,
                                      ctypes.addressof(buf) + HEADER_SIZE, len(body), buf, len(out),
                                      ctypes.byref(out_len))
    assert status == 0 and out_len.value == len(out)
    assert bytes(out) == node.seal(int(MessageType.DELTA), body, round=3, model_version=3, seq=1)


def test_c_seal_refuses_what_a_node_may_not_send(env):
    node = c_node(env)
    for msg_type, flags in [(MessageType.TASK, 0), (MessageType.GLOBAL_UPDATE, 0), (MessageType.JOIN, Flags.MASKED),
                            (MessageType.DELTA, Flags.LAST_WILL), (MessageType.STATUS, Flags.DOWNLINK), (9, 0)]:
        with pytest.raises(ProtocolError, match="argument"):
            node.seal(int(msg_type), b"\0" * 16, round=1, model_version=0, seq=1, flags=int(flags))
    out, out_len = ctypes.create_string_buffer(100), ctypes.c_size_t()
    status = env.lib.fedtiny_env_seal(ctypes.byref(node.keys), int(MessageType.LEAVE), 0, 0, 1, 0, 1, b"\0" * 4, 4,
                                      out, HEADER_SIZE + 4 + SIGNATURE_SIZE - 1, ctypes.byref(out_len))
    assert env.reason(status) == "buffer"


# ---- Python seals, C opens ---------------------------------------------------------------------------------------

# name -> (body, run, round, seq, device_id)
DOWNLINK_CASES = {name: (body, 0, round_, seq, DEVICE_ID) for name, (body, round_, seq) in DOWNLINKS.items()}
DOWNLINK_CASES["task_broadcast"] = (Task(2, bytes(32), 20, 8, 0.0625, 0.0, 600, 256, 0, b""), 0, 4, 1, 0)
DOWNLINK_CASES["global_update_run_5"] = (DOWNLINKS["global_update"][0], 5, 1, 1, DEVICE_ID)


@pytest.mark.parametrize("name", sorted(DOWNLINK_CASES))
def test_python_seals_what_c_opens(env, name):
    body, run, round_, seq, device_id = DOWNLINK_CASES[name]
    _, coordinator = endpoints()
    raw = coordinator.seal(body, device_id=device_id, round=round_, model_version=3, seq=seq, run=run)
    if name in DOWNLINKS:
        assert raw == (FIXTURES / f"{name}.bin").read_bytes()
    opened = c_node(env).open(raw)
    assert opened.body == body.encode()
    header = opened.header
    assert (header.type, header.device_id, header.run, header.round, header.seq) == (
        int(body.TYPE), device_id, run, round_, seq)


def test_c_opens_a_large_global_update(env):
    case = cenvelope.crypto_case(16 * 1024)
    node = env.node(case.device.fleet_id, case.device.device_id, case.device.identity.to_bytes(),
                    case.device.coordinator.to_bytes())
    assert node.open(case.downlink).body == case.downlink_body.encode()


# ---- rejections: the same reason as Python, for every tampered byte --------------------------------------------

def downlink_samples():
    _, coordinator = endpoints()
    ack = coordinator.seal(DOWNLINKS["ack_down"][0], device_id=DEVICE_ID, round=3, model_version=3, seq=2)
    update = coordinator.seal(GlobalUpdate(3, []), device_id=DEVICE_ID, round=3, model_version=3, seq=3)
    return {"ack": ack, "global_update": update}


@pytest.mark.parametrize("name", ["ack", "global_update"])
def test_every_tampered_byte_is_rejected_for_the_reason_python_gives(env, name):
    raw = downlink_samples()[name]
    node = c_node(env)
    reasons = set()
    for i in range(len(raw)):
        for mask in (0x01, 0x04, 0x20, 0x80):  # 0x04 and 0x20 shorten payload_len (20, 32)
            tampered = bytearray(raw)
            tampered[i] ^= mask
            device, _ = endpoints()
            expected = python_reason(device, bytes(tampered))
            assert expected != "ok", (i, mask)
            assert c_reason(node, bytes(tampered)) == expected, f"byte {i} ^ {mask:#x}"
            reasons.add(expected)
    # header fields, payload, tag and signature are all covered
    assert {"bad-magic", "bad-version", "bad-flags", "bad-type", "wrong-fleet", "wrong-device", "bad-signature",
            "truncated", "trailing-bytes"} <= reasons, reasons
    assert c_node(env).open(raw) is not None  # the untouched message still opens


def test_truncated_and_wrong_direction_are_rejected_like_python(env):
    raw = downlink_samples()["ack"]
    device, _ = endpoints()
    node = c_node(env)
    uplink = node.seal(int(MessageType.LEAVE), Leave(0).encode(), round=1, model_version=0, seq=1)
    for sample in (raw[:10], raw[:-1], raw + b"\0", b"", uplink):
        assert c_reason(node, sample) == python_reason(device, sample)
    assert c_reason(node, uplink) == "bad-direction"
    stranger = CoordinatorEndpoint(FLEET_ID, COORD, {topics.name_id("dev-002"): DEVICE.public})
    other = stranger.seal(Ack(1, AckStatus.OK, 1), device_id=topics.name_id("dev-002"), round=1, model_version=0)
    assert c_reason(node, other) == "wrong-device"
    impostor = CoordinatorEndpoint(FLEET_ID, Identity.from_seed(b"impostor"), {DEVICE_ID: DEVICE.public})
    forged = impostor.seal(Ack(1, AckStatus.OK, 1), device_id=DEVICE_ID, round=1, model_version=0)
    assert c_reason(node, forged) == "bad-signature"


def test_tampered_ciphertext_resigned_by_the_coordinator_fails_decryption_and_leaves_the_buffer(env):
    """Only the coordinator can sign; this checks the AEAD layer on its own (tag and ciphertext)."""
    raw = downlink_samples()["global_update"]
    node = c_node(env)
    for offset in (HEADER_SIZE, len(raw) - SIGNATURE_SIZE - 1):  # first ciphertext byte, last tag byte
        tampered = bytearray(raw[:-SIGNATURE_SIZE])
        tampered[offset] ^= 0x04
        forged = bytes(tampered) + COORD.sign(bytes(tampered))
        assert c_reason(node, forged) == "bad-ciphertext" == python_reason(endpoints()[0], forged)
        buf = ctypes.create_string_buffer(forged, len(forged))
        header, body_len = cenvelope.Header(), ctypes.c_uint32()
        status = env.lib.fedtiny_env_open(ctypes.byref(node.keys), buf, len(forged), None, None,
                                          ctypes.byref(header), ctypes.byref(body_len))
        assert env.reason(status) == "bad-ciphertext" and buf.raw == forged


# ---- replay window -------------------------------------------------------------------------------------------------

def test_c_replay_window_matches_the_python_replay_guard(env):
    """Same verdicts as envelope.ReplayGuard, per stream (addressed, broadcast); CNode.open records what it accepts."""
    device, coordinator = endpoints()
    node = c_node(env)

    def ack(seq, status=AckStatus.OK, round_=1, run=0):
        return coordinator.seal(Ack(1, status, seq), device_id=DEVICE_ID, round=round_, model_version=0, seq=seq,
                                run=run)

    first, second, reused = ack(10), ack(11), ack(10, AckStatus.BUSY)
    broadcast = coordinator.seal(DOWNLINK_CASES["task_broadcast"][0], device_id=0, round=1, model_version=0, seq=5)
    steps = [(first, "ok"), (first, "duplicate"), (second, "ok"), (first, "duplicate"), (broadcast, "ok"),
             (reused, "replay"), (broadcast, "duplicate"), (ack(9), "stale")]
    for raw, expected in steps:
        assert (outcome(node, raw), outcome(device, raw)) == (expected, expected)
    later = [ack(20 + i, round_=2) for i in range(cenvelope.REPLAY_WINDOW)]
    for raw in later:
        assert outcome(node, raw) == "ok"
    assert outcome(node, later[0]) == "duplicate"
    # Beyond the node's window of 4 an old message reads as stale (Python's window of 16 still says duplicate):
    # both refuse it, neither applies it twice.
    assert outcome(node, first) == "stale"
    # A new run (a coordinator that lost its state) starts over at round 1 and is newer; the old run is stale.
    for raw, expected in [(ack(1, run=1), "ok"), (ack(30, round_=9), "stale"), (ack(2, run=1), "ok")]:
        assert (outcome(node, raw), outcome(device, raw)) == (expected, expected)


# ---- the Cortex-M4 build --------------------------------------------------------------------------------------------

def test_m4_node_seals_and_opens_under_qemu(sources, cache):
    for tool in ("gcc", "make", "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"):
        require_tool(tool)
    case = cenvelope.crypto_case()
    elf = cenvelope.build_crypto_firmware(case.vectors, cache)
    run = cenvelope.run_crypto_firmware(elf, cache_dir=cache)
    assert run.returncode == 0
    # what the M4 sealed is what Python seals for the same keys, nonce and body, and the coordinator opens it
    assert run.uplink == case.device.seal(case.uplink_body, round=case.round, model_version=0, seq=case.seq,
                                          run=case.run)
    assert case.coordinator.open(run.uplink).body == case.uplink_body
    body = case.downlink_body.encode()
    assert (run.downlink_status, run.downlink_body_len, run.downlink_fnv) == ("ok", len(body), fnv1a(body))
    # X25519 ~1.2 M, EdDSA sign ~0.6 M and verify ~1.6 M instructions (research notes); 1 KiB of AEAD ~40 k
    insns = run.instructions
    assert 0.8e6 < insns["x25519"] < 2e6 and 0.3e6 < insns["sign"] < 1.2e6 and 1e6 < insns["verify"] < 3e6
    assert insns["sign"] < insns["seal"] < insns["sign"] + 0.3e6
    assert insns["verify"] < insns["open"] < insns["verify"] + 0.3e6
    footprint = cenvelope.crypto_footprint(elf.parent / cenvelope.CRYPTO_MAP)
    usage = cruntime.memory_usage(elf)
    assert 10_000 < footprint["flash"] < usage["flash"] and max(run.stack.values()) < usage[".stack"]
    print(f"\nM4 node crypto: instructions {insns}; peak stack {run.stack}; crypto flash {footprint['flash']} B, "
          f"static RAM {footprint['ram']} B; whole firmware {usage['flash']} B flash")


def test_header_layout_of_c_and_python_agree(env):
    raw = c_node(env).seal(int(MessageType.JOIN), Join(1, 2, 256, 0, 1, bytes(32)).encode(), round=7,
                           model_version=2, seq=3)
    magic, version, msg_type, flags, reserved, fleet, dev, rnd, mv, seq, plen = struct.unpack_from(
        "<2sBBHHIIIIII", raw)
    assert (magic, version, msg_type, flags, reserved) == (b"FT", 2, 1, 0, 0)
    assert (fleet, dev, rnd, mv, seq, plen) == (FLEET_ID, DEVICE_ID, 7, 2, 3, 52)


def test_python_rejects_a_v1_style_ed25519_signature():
    """Version 2 signs with EdDSA-BLAKE2b: an Ed25519 signature (what version 1 sent) does not verify."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    device, coordinator = endpoints()
    raw = device.seal(Leave(0), round=1, model_version=0, seq=1)
    seed = DEVICE.to_bytes()[:32]
    ed25519 = Ed25519PrivateKey.from_private_bytes(seed).sign(raw[:-SIGNATURE_SIZE])
    with pytest.raises(ProtocolError, match="bad-signature"):
        coordinator.open(raw[:-SIGNATURE_SIZE] + ed25519)
    assert coordinator.open(raw) is not None
