"""`fedtiny keys`: a fleet is never overwritten; enrolment, revocation and rotation, in the files and through a real
mosquitto (TLS, client certificates, CRL, passwords, ACL); each machine's folder works alone."""

import base64
import json
import os
import queue
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from conftest import require_tool
from cryptography import x509

from fedtiny import zoo
from fedtiny.compiler import compile_plan
from fedtiny.protocol import keys, topics
from fedtiny.protocol.brokers import MosquittoProcess, free_port, mosquitto_config
from fedtiny.protocol.envelope import Identity
from fedtiny.transport.mqtt import CoordinatorLink
from fedtiny.protocol.keys import (
    add_devices, keys_command, load_peers, provision_fleet, revoke_devices, revoked_devices, rotate_devices,
)
from fedtiny.quantize import quantize
from fedtiny.scheme import parse
from fedtiny_device.agent import NodeAgent
from fedtiny.interpreter import quantize_input

FLEET = "lab"
TIMEOUT = 10.0


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def crl(out: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((out / "broker/crl.pem").read_bytes())


def serial(folder: Path) -> int:
    return x509.load_pem_x509_certificate((folder / "client.crt").read_bytes()).serial_number


def run_keys(*args):
    result = CliRunner().invoke(keys_command, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# --- files -------------------------------------------------------------------------------------------------

def test_keys_refuses_an_existing_fleet_and_changes_nothing(tmp_path):
    out = tmp_path / "fleet"
    assert run_keys("--out", out, "--fleet", FLEET, "--count", 2).exit_code == 0
    before = tree(out)
    again = run_keys("--out", out, "--fleet", FLEET, "--count", 2)
    assert again.exit_code == 2
    assert again.output.count("\n") == 1 and "already exists" in again.output and "--add" in again.output
    assert tree(out) == before
    with pytest.raises(ValueError, match="never overwritten"):
        provision_fleet(out, FLEET, ["dev-009"])
    assert tree(out) == before

    for args, message in [
        (("--add", "dev-005", "--revoke", "dev-000"), "one action"),
        (("--add", "dev-005", "--count", 1), "one action"),
        (("--revoke", "dev-042"), "no device dev-042"),
        (("--rotate", "coordinator"), "coordinator cannot"),
        (("--add", "dev-001"), "already in the fleet"),
        (("--add", "bad/name"), "invalid"),
    ]:
        result = run_keys("--out", out, *args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    assert tree(out) == before
    result = run_keys("--out", out / "coordinator", "--add", "dev-005")
    assert result.exit_code == 2 and "not a provisioning folder" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_keys("--out", empty, "--fleet", FLEET, "--device", "a").exit_code == 0  # an empty folder is fine


def test_each_folder_holds_what_its_machine_needs_and_no_more(tmp_path):
    out = tmp_path / "fleet"
    manifest = provision_fleet(out, FLEET, ["dev-001", "dev-002"])
    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    assert sorted(tree(out / "broker")) == ["acl", "broker.crt", "broker.key", "ca.crt", "crl.pem", "passwd"]
    assert sorted(tree(out / "coordinator")) == ["audit.key", "audit.pub", "ca.crt", "client.crt", "client.key",
                                                 "fleet.json", "identity.key", "identity.pub", "password",
                                                 "revoked.json"]
    # the audit log's key: private on the coordinator only, its public half also for auditors
    assert [p for p in out.rglob("audit.key")] == [out / "coordinator/audit.key"]
    assert (out / "audit.pub").read_bytes() == (out / "coordinator/audit.pub").read_bytes()
    device = out / "devices/dev-001"
    assert sorted(tree(device)) == ["ca.crt", "client.crt", "client.key", "coordinator.pub", "fleet.json",
                                    "identity.key", "identity.pub", "password", "peers.json"]
    # secure aggregation: the other devices' public identities by id, not its own
    assert {v["id"]: v["public"] for v in json.loads((device / "peers.json").read_text())["peers"].values()} == \
        {v["id"]: v["public"] for n, v in manifest["devices"].items() if n != "dev-001"}
    for folder in (out / "broker", out / "coordinator", device):
        assert (folder / "ca.crt").read_bytes() == (out / "ca/ca.crt").read_bytes()
    assert [p for p in out.rglob("ca.key")] == [out / "ca/ca.key"]
    for folder in (out / "coordinator", device):
        x509.load_pem_x509_certificate((folder / "client.crt").read_bytes()).verify_directly_issued_by(ca)
    assert json.loads((out / "coordinator/fleet.json").read_text()) == manifest
    mine = json.loads((device / "fleet.json").read_text())
    assert mine["devices"] == {"dev-001": manifest["devices"]["dev-001"]} and mine["fleet_id"] == manifest["fleet_id"]
    assert (device / "coordinator.pub").read_bytes().hex() == manifest["coordinator"]["public"]
    assert revoked_devices(out / "coordinator") == set()
    assert len(crl(out)) == 0 and crl(out).is_signature_valid(ca.public_key())
    certificates = [x509.load_pem_x509_certificate(p.read_bytes()) for p in out.rglob("*.crt")]
    assert crl(out).next_update_utc > max(c.not_valid_after_utc for c in certificates)  # an expired CRL locks out all

    # mosquitto's config names only files of the broker folder
    config = mosquitto_config(out, 8883, password_port=8884)
    paths = [line.split(" ", 1)[1] for line in config.splitlines() if line.split(" ")[0].endswith("file")]
    assert sorted({Path(p).name for p in paths}) == ["acl", "broker.crt", "broker.key", "ca.crt", "crl.pem", "passwd"]
    assert all(Path(p).parent == (out / "broker").resolve() for p in paths)
    assert config.count("use_username_as_clientid true") == 2 and config.count("crlfile") == 2


def test_add_revoke_rotate_change_exactly_their_files(tmp_path):
    out = tmp_path / "fleet"
    provision_fleet(out, FLEET, ["dev-001", "dev-002"])
    ca = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())
    ca_before = tree(out / "ca")
    dev2_before = tree(out / "devices/dev-002")

    manifest = add_devices(out, ["dev-003"])
    assert sorted(manifest["devices"]) == ["dev-001", "dev-002", "dev-003"]
    assert json.loads((out / "coordinator/fleet.json").read_text()) == manifest
    assert "dev-003:" in (out / "broker/passwd").read_text()
    x509.load_pem_x509_certificate((out / "devices/dev-003/client.crt").read_bytes()).verify_directly_issued_by(ca)
    # dev-002's identity is untouched; only its list of peers gained dev-003
    assert tree(out / "ca") == ca_before
    assert {k: v for k, v in tree(out / "devices/dev-002").items() if k != "peers.json"} == \
        {k: v for k, v in dev2_before.items() if k != "peers.json"}
    assert sorted(load_peers(out / "devices/dev-002")) == ["dev-001", "dev-003"]

    old_serial, old_public = serial(out / "devices/dev-001"), manifest["devices"]["dev-001"]["public"]
    old_password = (out / "devices/dev-001/password").read_text()
    manifest = rotate_devices(out, ["dev-001"])
    entry = manifest["devices"]["dev-001"]
    assert entry["public"] != old_public and entry["id"] == topics.name_id("dev-001")
    assert Identity.from_bytes((out / "devices/dev-001/identity.key").read_bytes()).public.to_bytes().hex() \
        == entry["public"]
    assert int(entry["cert_serial"], 16) == serial(out / "devices/dev-001") != old_serial
    assert (out / "devices/dev-001/password").read_text() != old_password
    assert json.loads((out / "devices/dev-001/fleet.json").read_text())["devices"]["dev-001"] == entry
    assert crl(out).get_revoked_certificate_by_serial_number(old_serial) is not None
    assert revoked_devices(out / "coordinator") == set()  # the name stays in the fleet

    dev2_serial = serial(out / "devices/dev-002")
    manifest = revoke_devices(out, ["dev-002"])
    assert "dev-002" not in manifest["devices"] and not (out / "devices/dev-002").exists()
    assert revoked_devices(out / "coordinator") == {"dev-002"}
    assert "dev-002" not in json.loads((out / "coordinator/fleet.json").read_text())["devices"]
    assert "dev-002:" not in (out / "broker/passwd").read_text()
    assert "user dev-002\ntopic deny #" in (out / "broker/acl").read_text()
    revoked = crl(out)
    assert {r.serial_number for r in revoked} == {old_serial, dev2_serial}
    assert revoked.is_signature_valid(ca.public_key())
    assert revoked.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4  # one per action
    certificates = [x509.load_pem_x509_certificate(p.read_bytes()) for p in out.rglob("*.crt")]
    assert revoked.next_update_utc > max(c.not_valid_after_utc for c in certificates)
    with pytest.raises(ValueError, match="already revoked"):
        revoke_devices(out, ["dev-002"])
    with pytest.raises(ValueError, match="stays refused"):
        add_devices(out, ["dev-002"])
    assert tree(out / "ca") == ca_before
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif path.name.endswith(".key") or path.name in ("password", "passwd"):
            assert mode == 0o600, path
        assert not path.name.endswith(".tmp"), path


@pytest.mark.parametrize("action, crash_at", [
    *[(revoke_devices, name) for name in ("crl.pem", "passwd", "acl", "revoked.json", "fleet.json")],
    *[(rotate_devices, name) for name in ("crl.pem", "identity.key", "client.crt", "passwd", "fleet.json")],
])  # each file the action writes, in its order
def test_an_action_cut_short_leaves_a_readable_fleet_and_finishes_when_run_again(tmp_path, monkeypatch, action,
                                                                                 crash_at):
    out = tmp_path / "fleet"
    provision_fleet(out, FLEET, ["dev-001", "dev-002"])
    old = serial(out / "devices/dev-001")
    real_write = keys._write

    def power_cut(path, data, secret):
        if path.name == crash_at:
            raise OSError("power cut")
        real_write(path, data, secret)

    monkeypatch.setattr(keys, "_write", power_cut)
    with pytest.raises(OSError, match="power cut"):
        action(out, ["dev-001"])
    monkeypatch.setattr(keys, "_write", real_write)
    assert not list(out.rglob(".*.tmp"))
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    # the CRL goes first: once anything else changed, the old certificate is already revoked
    assert crash_at == "crl.pem" or crl(out).get_revoked_certificate_by_serial_number(old) is not None
    if action is revoke_devices and crash_at == "fleet.json":  # on the denylist, still in the manifest
        with pytest.raises(ValueError, match="cut short"):
            rotate_devices(out, ["dev-001"])

    manifest = action(out, ["dev-001"])
    assert [r.serial_number for r in crl(out)] == [old]
    if action is revoke_devices:
        assert "dev-001" not in manifest["devices"] and revoked_devices(out / "coordinator") == {"dev-001"}
        assert "dev-001:" not in (out / "broker/passwd").read_text()
    else:
        assert int(manifest["devices"]["dev-001"]["cert_serial"], 16) == serial(out / "devices/dev-001") != old
        password = (out / "devices/dev-001/password").read_text()
        line = keys._read_passwd(out)["dev-001"]
        salt = base64.b64decode(line.split("$")[3])
        assert keys.mosquitto_password_line("dev-001", password, salt) == line
    assert json.loads((out / "coordinator/fleet.json").read_text()) == manifest


def test_revoked_devices_reads_the_coordinators_denylist(tmp_path):
    folder = tmp_path / "coordinator"
    folder.mkdir()
    with pytest.raises(FileNotFoundError):  # fail closed: no denylist is not an empty denylist
        revoked_devices(folder)
    (folder / "revoked.json").write_text(json.dumps({"dev-7": {"id": 7, "revoked": "2026-01-01T00:00:00+00:00"}}))
    assert revoked_devices(folder) == {"dev-7"}
    (folder / "revoked.json").write_text("{}")
    assert revoked_devices(folder) == set()


def test_the_command_adds_rotates_and_revokes(tmp_path):
    out = tmp_path / "fleet"
    assert run_keys("--out", out, "--fleet", FLEET, "--device", "a", "--device", "b").exit_code == 0
    result = run_keys("--out", out, "--add", "c", "--add", "d")
    assert result.exit_code == 0 and "enrolled c, d" in result.output
    old = serial(out / "devices/a")
    assert run_keys("--out", out, "--rotate", "a").exit_code == 0
    assert serial(out / "devices/a") != old
    assert run_keys("--out", out, "--revoke", "b").exit_code == 0
    assert revoked_devices(out / "coordinator") == {"b"}
    assert sorted(json.loads((out / "fleet.json").read_text())["devices"]) == ["a", "c", "d"]


# --- through mosquitto -------------------------------------------------------------------------------------

@pytest.fixture
def fleet(tmp_path):
    out = tmp_path / "fleet"
    provision_fleet(out, FLEET, ["dev-001", "dev-002"])
    return out


@pytest.fixture
def mosquitto(fleet, tmp_path):
    require_tool("mosquitto")
    port, password_port = free_port(), free_port()
    config = tmp_path / "mosquitto.conf"
    # Our key files are 0600 root; keep mosquitto root instead of dropping to user `mosquitto` (tests only).
    config.write_text(mosquitto_config(fleet, port, password_port, run_as_root=os.geteuid() == 0))
    with MosquittoProcess(config, port) as broker:
        broker.password_port = password_port
        yield broker


class Connection:
    """One MQTT 5 client over TLS: with the client certificate of `folder`, or with a password on the password
    listener. `ok` is whether the broker accepted it (a refused TLS handshake ends in a disconnect, no CONNACK)."""

    def __init__(self, broker, folder: Path, password: str | None = None):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=folder.name, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(60, 60)  # no second attempt within a test
        connack, self.inbox, self.acks, self.disconnected = queue.Queue(), queue.Queue(), {}, queue.Queue()
        self.client.on_connect = lambda c, u, flags, rc, props: connack.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: (connack.put(rc), self.disconnected.put(rc))
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.__setitem__(mid, rc)
        if password is None:
            self.client.tls_set(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"))
        else:
            self.client.tls_set(str(folder / "ca.crt"))
            self.client.username_pw_set(folder.name, password)
        try:
            self.client.connect(broker.host, broker.password_port if password else broker.port, keepalive=30)
        except OSError:  # the server's alert can arrive during a TLS 1.2 handshake
            self.ok = False
            return
        self.client.loop_start()
        try:
            self.ok = not connack.get(timeout=TIMEOUT).is_failure
        except queue.Empty:
            self.ok = False

    def publish(self, topic, payload):
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + TIMEOUT
        while info.mid not in self.acks and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.acks.get(info.mid)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_enrolled_into_a_running_fleet_connects(fleet, mosquitto):
    add_devices(fleet, ["dev-003"])
    folder = fleet / "devices/dev-003"
    device = Connection(mosquitto, folder)  # same CA: no reload needed for certificates
    assert device.ok
    assert not device.publish(topics.uplink(FLEET, "dev-003"), b"hello").is_failure
    device.close()
    password = (folder / "password").read_text()
    assert not Connection(mosquitto, folder, password).ok  # the broker has not read the new passwd yet
    mosquitto.reload()
    login = Connection(mosquitto, folder, password)
    assert login.ok
    login.close()


def test_a_revoked_device_is_refused_after_a_reload(fleet, mosquitto, tmp_path):
    held = tmp_path / "on-the-device/dev-001"  # what the device keeps after the provisioning folder forgets it
    shutil.copytree(fleet / "devices/dev-001", held)
    coordinator = Connection(mosquitto, fleet / "coordinator")
    coordinator.client.subscribe(f"fedtiny/{FLEET}/up/+", qos=1)
    assert coordinator.ok

    revoke_devices(fleet, ["dev-001"])
    # Mosquitto 2.0.11 reads the CRL at start and on SIGHUP only. (One connection per device at a time: the
    # client id is the certificate CN, and a second connection would close the first.)
    before_reload = Connection(mosquitto, held)
    assert before_reload.ok
    before_reload.close()
    live = Connection(mosquitto, held)
    assert live.ok
    mosquitto.reload()
    assert not Connection(mosquitto, held).ok
    assert not Connection(mosquitto, held, (held / "password").read_text()).ok
    # the connection made before stays open, but the reloaded ACL refuses everything to it
    assert str(live.publish(topics.uplink(FLEET, "dev-001"), b"after")) == "Not authorized"
    assert not coordinator.publish(topics.downlink(FLEET, "dev-001"), b"to a revoked device").is_failure
    time.sleep(0.3)
    assert live.inbox.empty() and coordinator.inbox.empty()
    other = Connection(mosquitto, fleet / "devices/dev-002")
    assert other.ok and not other.publish(topics.uplink(FLEET, "dev-002"), b"still fine").is_failure
    assert coordinator.inbox.get(timeout=TIMEOUT) == (topics.uplink(FLEET, "dev-002"), b"still fine")
    for connection in (other, live, coordinator):
        connection.close()


def test_a_rotated_device_connects_only_with_its_new_certificate(fleet, mosquitto, tmp_path):
    old = tmp_path / "old/dev-001"
    shutil.copytree(fleet / "devices/dev-001", old)
    password_login = Connection(mosquitto, old, (old / "password").read_text())
    assert password_login.ok
    rotate_devices(fleet, ["dev-001"])
    mosquitto.reload()
    password_login.disconnected.get(timeout=TIMEOUT)  # queue.Empty unless the reload closed it: its password is gone
    assert not Connection(mosquitto, old).ok
    assert not Connection(mosquitto, old, (old / "password").read_text()).ok
    new = fleet / "devices/dev-001"
    for connection in (Connection(mosquitto, new), Connection(mosquitto, new, (new / "password").read_text())):
        assert connection.ok
        connection.close()


def test_broker_coordinator_and_device_each_run_from_their_own_folder_alone(fleet, tmp_path):
    """Copy broker/, coordinator/ and devices/dev-001/ to three "machines"; a JOIN and a round go through."""
    require_tool("mosquitto")
    machines = {name: tmp_path / name for name in ("broker-host", "coordinator-host", "device-host")}
    shutil.copytree(fleet / "broker", machines["broker-host"] / "broker")
    shutil.copytree(fleet / "coordinator", machines["coordinator-host"] / "coordinator")
    shutil.copytree(fleet / "devices/dev-001", machines["device-host"] / "devices/dev-001")

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 30)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    graph = quantize(zoo.build("mlp", (30,), 2), x[:32])
    plan = compile_plan(graph, parse("last:2", graph))

    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(mosquitto_config(machines["broker-host"], port, run_as_root=os.geteuid() == 0))
    url = f"mqtts://127.0.0.1:{port}"
    with MosquittoProcess(config, port):
        link = CoordinatorLink(url, machines["coordinator-host"], plan, fleet=FLEET, chunk_size=256).start()
        agent = NodeAgent("dev-001", url, machines["device-host"], plan, quantize_input(graph, x[32:]), y[32:],
                          fleet=FLEET, state_dir=tmp_path / "state", seed=1, chunk_size=256, heartbeat_s=1.0)
        agent.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            while not any(d.device == "dev-001" and d.memory_budget for d in link.devices()):
                assert time.monotonic() < deadline, "no JOIN"
                time.sleep(0.02)
            link.send_task("dev-001", 1, 1, plan.initial_state(), {"epochs": 1})
            replies, deadline = [], time.monotonic() + TIMEOUT
            while not replies and time.monotonic() < deadline:
                replies = link.replies(0.2)
            assert [(r.device, r.round, r.num_examples) for r in replies] == [("dev-001", 1, 13)]  # 3 of 16 held out
        finally:
            agent.stop()
            link.close()
