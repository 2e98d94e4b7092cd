"""A fleet's keys: create a fleet, enrol devices into it, revoke and rotate them (`fedtiny keys`).

One provisioning folder per fleet (directories 0700, files holding secrets 0600). broker/, coordinator/ and each
devices/<name>/ are self-contained: each is copied alone to its machine. The provisioning folder as a whole holds
the CA key and every device's private keys: keep it offline (docs/deployment.md).

    fleet.json            the fleet manifest: names, numeric ids, public identities, certificate serials (no secrets)
    ca/                   ca.crt, ca.key: the fleet device CA (EC P-256); never leaves the provisioning machine
    broker/               ca.crt, broker.crt, broker.key (localhost, 127.0.0.1, broker_host), crl.pem (revoked client
                          certificates, signed by the CA), passwd (mosquitto 2.0, $7$ = PBKDF2-SHA512), acl
    coordinator/          ca.crt, fleet.json (a copy of the manifest), revoked.json (the denylist of revoked device
                          names), identity.key|.pub (64-byte raw identity: EdDSA seed | X25519 scalar, and its
                          public half), client.crt|key, password, audit.key|.pub (Ed25519, PEM: the audit log's
                          signing key, fedtiny/audit.py; audit.pub is also in the provisioning folder)
    devices/<name>/       ca.crt, fleet.json (the manifest with only this device), identity.key|.pub, client.crt|key,
                          password, coordinator.pub, peers.json (the other devices' ids and public identities:
                          secure aggregation checks its neighbours' round keys against them)

Every file is written atomically (temp file, fsync, rename), and --add, --revoke and --rotate order their writes so
that a crash leaves a readable fleet and running the same action again finishes it. (A creation cut short leaves
a partial folder that is refused like any existing one: delete it and create the fleet again.)

After a change, copy broker/ to the broker and send mosquitto SIGHUP (it re-reads passwd, acl and crl.pem),
coordinator/ to the coordinator, and the changed devices/<name>/ to their devices (docs/deployment.md).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import shutil
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtiny.protocol import acl, topics
from fedtiny.protocol.envelope import Identity, PublicIdentity

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0.11 writes; mosquitto reads the count from the file
CERT_DAYS = 825
# A CRL past its nextUpdate makes OpenSSL refuse every client certificate. Every action re-signs the CRL, valid a
# day longer than the certificates it issues, so it outlives every certificate issued so far.
CRL_DAYS = CERT_DAYS + 1
REVOKED_FILE = "revoked.json"
PEERS_FILE = "peers.json"  # in each device folder: the other devices' public identities (secure aggregation)


# --- files ---------------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes, secret: bool) -> None:
    """Replace path atomically: a temp file created with the final mode (a secret is never readable by others,
    not even briefly), fsynced, renamed over path, and the directory fsynced so the rename survives a crash."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a temp file left over by a crash
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, value) -> None:
    _write(path, (json.dumps(value, indent=2) + "\n").encode(), secret=False)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(out: Path):
    """Hold an exclusive lock on the provisioning folder: two `fedtiny keys` at once would lose each other's
    changes to the shared files (passwd, CRL, manifests)."""
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `fedtiny keys` is changing {out}; try again when it has finished") from None
        yield
    finally:
        os.close(fd)


# --- mosquitto files -----------------------------------------------------------------------------------------

def mosquitto_password_line(username: str, password: str, salt: bytes | None = None) -> str:
    """One password-file line in mosquitto 2.0's format: user:$7$iterations$base64(salt12)$base64(sha512 hash)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, 64)
    return f"{username}:$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def read_mosquitto_passwords(path: str | Path) -> dict[str, str]:
    """username -> password hash ("$7$..."), from a mosquitto password file (blank and # lines skipped)."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            username, _, password_hash = line.partition(":")
            entries[username] = password_hash
    return entries


def check_mosquitto_password(password_hash: str, password: str) -> bool:
    """Whether `password` matches a mosquitto 2.0 "$7$iterations$salt$hash" entry (PBKDF2-SHA512); any other
    format (mosquitto's older $6$, or a malformed entry) matches nothing."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit() or int(parts[2]) < 1:
        return False
    try:
        salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if len(expected) != hashlib.sha512().digest_size:  # an empty hash would match every password
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def _read_passwd(out: Path) -> dict[str, str]:
    lines = (out / "broker/passwd").read_text().splitlines()
    return {line.split(":", 1)[0]: line for line in lines if line}


def _write_passwd(out: Path, lines: dict[str, str]) -> None:
    _write(out / "broker/passwd", ("\n".join(lines.values()) + "\n").encode(), secret=True)


# --- certificates --------------------------------------------------------------------------------------------

def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _certificate(subject: str, public_key, issuer_name: x509.Name, issuer_key, *, ca=False, san=None, usage=None):
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, True, False, False, False, False), critical=True
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _san_for(host: str) -> list:
    names: list = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    unique = []
    for name in names:
        if name not in unique:
            unique.append(name)
    return unique


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_crl(out: Path, ca_key, ca_cert, revoke_serials: list[int]) -> None:
    """Re-sign broker/crl.pem with the serials it lists plus revoke_serials (an empty CRL when there are none:
    mosquitto refuses to start when its crlfile is missing)."""
    path = out / "broker/crl.pem"
    entries: dict[int, datetime.datetime] = {}
    number = 0
    if path.exists():
        old = x509.load_pem_x509_crl(path.read_bytes())
        entries = {r.serial_number: r.revocation_date_utc for r in old}
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    now = _now()
    for serial in revoke_serials:
        entries.setdefault(serial, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number + 1), critical=False)
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    _write(path, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), secret=False)


# --- manifests -----------------------------------------------------------------------------------------------

def _device_manifest(manifest: dict, name: str) -> dict:
    """What one device is told: the fleet, the coordinator, and itself (not the other devices)."""
    return {**manifest, "devices": {name: manifest["devices"][name]}}


def peers_of(manifest: dict, name: str) -> dict:
    """What device `name` needs for secure aggregation: the public identity of every other device of the fleet, by
    name with its numeric id (a round's SECAGG_PEERS names neighbours by id; the device checks their signed round
    keys against these). peers.json in its folder; `fedtiny codegen --node --secagg` compiles it into the node."""
    return {"fleet": manifest["fleet"], "fleet_id": manifest["fleet_id"],
            "peers": {n: {"id": v["id"], "public": v["public"]} for n, v in sorted(manifest["devices"].items())
                      if n != name}}


def load_peers(device_folder: str | Path) -> dict[str, PublicIdentity]:
    """A device folder's peers.json as device name -> public identity (what NodeAgent's `peers` takes)."""
    path = Path(device_folder) / PEERS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: provision the fleet again with this version of `fedtiny keys` (it "
                         "writes every device's peers' identities, needed for secure aggregation)")
    return {n: PublicIdentity.from_bytes(bytes.fromhex(v["public"]))
            for n, v in json.loads(path.read_text())["peers"].items()}


def _write_manifests(out: Path, manifest: dict, changed_devices) -> None:
    """The device copies first, the coordinator's copy next, the provisioning folder's fleet.json last: an action
    counts as done once that one lists its result. Every device's peers.json follows the fleet's membership: a
    device added, revoked or rotated changes the peers of all the others (copy their peers.json to them; a device
    with an old list refuses a secure-aggregation round with a neighbour it does not know, as unknown-peer)."""
    for name in changed_devices:
        _write_json(out / "devices" / name / "fleet.json", _device_manifest(manifest, name))
    for name in manifest["devices"]:
        path = out / "devices" / name / PEERS_FILE
        peers = peers_of(manifest, name)
        if not path.is_file() or json.loads(path.read_text()) != peers:
            _write_json(path, peers)
    _write_json(out / "coordinator/fleet.json", manifest)
    _write_json(out / "fleet.json", manifest)


def revoked_devices(coordinator_dir: str | Path) -> set[str]:
    """Names of the devices revoked from the fleet (the coordinator folder's revoked.json): the coordinator must
    refuse their messages. A missing file is an error, not an empty denylist."""
    return set(json.loads((Path(coordinator_dir) / REVOKED_FILE).read_text()))


def _write_audit_key(out: Path) -> None:
    """The coordinator's Ed25519 key for its audit log (fedtiny/audit.py): the private half in coordinator/, the
    public half beside it and in the provisioning folder, for whoever checks the log (`fedtiny audit verify`)."""
    from fedtiny.audit import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, new_key_pem

    private, public = new_key_pem()
    _write(out / "coordinator" / PRIVATE_KEY_FILE, private, secret=True)
    _write(out / "coordinator" / PUBLIC_KEY_FILE, public, secret=False)
    _write(out / PUBLIC_KEY_FILE, public, secret=False)


# --- enrolment -----------------------------------------------------------------------------------------------

def _enrol(out: Path, ca_key, ca_cert, name: str, coordinator_public: bytes | None) -> tuple[dict, str]:
    """Write one identity folder (coordinator/ when coordinator_public is None, else devices/<name>/): a new
    message identity, client key and certificate (CN = name), broker password, CA certificate. Returns its
    manifest entry (without the numeric id) and its password-file line."""
    folder = out / ("coordinator" if coordinator_public is None else f"devices/{name}")
    identity = Identity.generate()
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate(name, client_key.public_key(), ca_cert.subject, ca_key,
                               usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    password = secrets.token_urlsafe(24)
    _write(folder / "ca.crt", _pem(ca_cert), secret=False)
    _write(folder / "identity.key", identity.to_bytes(), secret=True)
    _write(folder / "identity.pub", identity.public.to_bytes(), secret=False)
    _write(folder / "client.key", _key_pem(client_key), secret=True)
    _write(folder / "client.crt", _pem(client_cert), secret=False)
    _write(folder / "password", password.encode(), secret=True)
    if coordinator_public is not None:
        _write(folder / "coordinator.pub", coordinator_public, secret=False)
    entry = {"public": identity.public.to_bytes().hex(), "cert_serial": f"{client_cert.serial_number:x}"}
    return entry, mosquitto_password_line(name, password)


def _check_new_names(names, manifest: dict | None, revoked: dict) -> list[str]:
    names = [topics.check_name(n) for n in names]
    taken = set(manifest["devices"]) if manifest else set()
    if len(set(names)) != len(names) or topics.COORDINATOR_NAME in names:
        raise ValueError("device names must be unique and not 'coordinator'")
    for name in names:
        if name in taken:
            raise ValueError(f"device {name} is already in the fleet (use --rotate {name} for new keys)")
        if name in revoked:
            raise ValueError(f"device {name} was revoked and its name stays refused; choose another name")
    ids = [topics.name_id(n) for n in names]
    known = [v["id"] for v in (manifest["devices"].values() if manifest else ())] + [v["id"] for v in revoked.values()]
    if len(set(ids + known)) != len(ids) + len(known) or 0 in ids:
        raise ValueError("two device names map to the same numeric id; rename one")
    return names


def provision_fleet(out_dir, fleet: str, device_ids: list[str], broker_host: str = "localhost") -> dict:
    """Create a fleet in out_dir (missing or empty: an existing fleet is never overwritten); returns fleet.json."""
    out = Path(out_dir)
    topics.check_name(fleet)
    names = _check_new_names(device_ids, None, {})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; a fleet is never overwritten "
                         "(--add, --revoke or --rotate change an existing one)")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    (out / "devices").mkdir(mode=0o700)  # _write makes only the last level of a missing path 0700
    with _locked(out):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedtiny {fleet} device CA")])
        ca_cert = _certificate(f"fedtiny {fleet} device CA", ca_key.public_key(), ca_name, ca_key, ca=True)
        _write(out / "ca/ca.crt", _pem(ca_cert), secret=False)
        _write(out / "ca/ca.key", _key_pem(ca_key), secret=True)

        broker_key = ec.generate_private_key(ec.SECP256R1())
        broker_cert = _certificate(broker_host, broker_key.public_key(), ca_name, ca_key,
                                   san=_san_for(broker_host), usage=ExtendedKeyUsageOID.SERVER_AUTH)
        _write(out / "broker/ca.crt", _pem(ca_cert), secret=False)
        _write(out / "broker/broker.crt", _pem(broker_cert), secret=False)
        _write(out / "broker/broker.key", _key_pem(broker_key), secret=True)
        _write(out / "broker/acl", acl.mosquitto_acl_text(fleet).encode(), secret=False)
        _write_crl(out, ca_key, ca_cert, [])

        coordinator, coordinator_line = _enrol(out, ca_key, ca_cert, topics.COORDINATOR_NAME, None)
        _write_audit_key(out)
        manifest = {
            "fleet": fleet,
            "fleet_id": topics.name_id(fleet),
            "broker_host": broker_host,
            "coordinator": {"name": topics.COORDINATOR_NAME, **coordinator},
            "devices": {},
        }
        lines = {topics.COORDINATOR_NAME: coordinator_line}
        for name in names:
            entry, lines[name] = _enrol(out, ca_key, ca_cert, name, bytes.fromhex(coordinator["public"]))
            manifest["devices"][name] = {"id": topics.name_id(name), **entry}
        _write_passwd(out, lines)
        _write_json(out / "coordinator" / REVOKED_FILE, {})
        _write_manifests(out, manifest, names)
    return manifest


class _Fleet:
    """An existing provisioning folder, opened for a change."""

    def __init__(self, out: Path) -> None:
        if not (out / "ca/ca.key").is_file() or not (out / "fleet.json").is_file():
            raise ValueError(f"{out} is not a provisioning folder from `fedtiny keys` (it needs ca/ca.key and "
                             "fleet.json; broker, coordinator and device folders cannot change a fleet)")
        self.out = out
        self.manifest = json.loads((out / "fleet.json").read_text())
        self.revoked = json.loads((out / "coordinator" / REVOKED_FILE).read_text())
        self.ca_key = serialization.load_pem_private_key((out / "ca/ca.key").read_bytes(), None)
        self.ca_cert = x509.load_pem_x509_certificate((out / "ca/ca.crt").read_bytes())

    def enrolled(self, names, revoking: bool) -> list[str]:
        """names, checked to be devices of the fleet. A name on the denylist but still in the manifest is a
        revocation cut short: only --revoke may take it, to finish."""
        names = list(dict.fromkeys(names))
        for name in names:
            if name == topics.COORDINATOR_NAME:
                raise ValueError("the coordinator cannot be revoked or rotated here: its public key is on every "
                                 "device; make a new fleet instead")
            if name not in self.manifest["devices"]:
                if name in self.revoked:
                    raise ValueError(f"device {name} is already revoked")
                raise ValueError(f"no device {name} in fleet {self.manifest['fleet']}")
            if name in self.revoked and not revoking:
                raise ValueError(f"the revocation of {name} was cut short; run --revoke {name} again to finish it")
        return names

    def serial(self, name: str) -> int:
        return int(self.manifest["devices"][name]["cert_serial"], 16)

    def enrol(self, name: str) -> str:
        entry, line = _enrol(self.out, self.ca_key, self.ca_cert, name,
                             bytes.fromhex(self.manifest["coordinator"]["public"]))
        self.manifest["devices"][name] = {"id": topics.name_id(name), **entry}
        return line


def _existing(out_dir) -> Path:
    out = Path(out_dir)
    if not out.is_dir():
        raise ValueError(f"{out} does not exist; create a fleet with --fleet and --count/--device")
    return out


def add_devices(out_dir, names: list[str]) -> dict:
    """Enrol new devices into an existing fleet (the CA in out_dir/ca signs their certificates); returns fleet.json.

    Certificates from the same CA connect without a broker reload; password logins need the new passwd (SIGHUP).
    The coordinator needs the new coordinator/fleet.json (the devices' public identities)."""
    out = _existing(out_dir)
    with _locked(out):
        fleet = _Fleet(out)
        names = _check_new_names(names, fleet.manifest, fleet.revoked)
        lines = _read_passwd(out)
        for name in names:
            lines[name] = fleet.enrol(name)
        _write_crl(out, fleet.ca_key, fleet.ca_cert, [])  # re-signed: the CRL must outlive the new certificates
        _write_passwd(out, lines)
        _write_manifests(out, fleet.manifest, names)
    return fleet.manifest


def revoke_devices(out_dir, names: list[str]) -> dict:
    """Revoke devices: their client certificates go on the CRL, their password lines and manifest entries are
    removed, the ACL denies them every topic, their names go on the coordinator's denylist (revoked.json), and
    their folders are deleted from out_dir. Returns fleet.json. The CRL is written first: a crash after it has
    already locked the devices out, and running the revocation again finishes it."""
    out = _existing(out_dir)
    with _locked(out):
        fleet = _Fleet(out)
        names = fleet.enrolled(names, revoking=True)
        _write_crl(out, fleet.ca_key, fleet.ca_cert, [fleet.serial(n) for n in names])
        lines = _read_passwd(out)
        when = _now().isoformat(timespec="seconds")
        for name in names:
            lines.pop(name, None)
            entry = fleet.manifest["devices"].pop(name)
            fleet.revoked.setdefault(name, {"id": entry["id"], "cert_serial": entry["cert_serial"], "revoked": when})
        _write_passwd(out, lines)
        _write(out / "broker/acl", acl.mosquitto_acl_text(fleet.manifest["fleet"], fleet.revoked).encode(),
               secret=False)
        _write_json(out / "coordinator" / REVOKED_FILE, fleet.revoked)
        _write_manifests(out, fleet.manifest, [])
        for name in names:
            shutil.rmtree(out / "devices" / name, ignore_errors=True)
    return fleet.manifest


def rotate_devices(out_dir, names: list[str]) -> dict:
    """New keys for enrolled devices: a new message identity, client key and certificate and password; the old
    certificate goes on the CRL. Returns fleet.json. The CRL is written first, so a crash never leaves the old
    certificate valid once its record is gone; running the rotation again finishes it."""
    out = _existing(out_dir)
    with _locked(out):
        fleet = _Fleet(out)
        names = fleet.enrolled(names, revoking=False)
        _write_crl(out, fleet.ca_key, fleet.ca_cert, [fleet.serial(n) for n in names])
        lines = _read_passwd(out)
        for name in names:
            lines[name] = fleet.enrol(name)
        _write_passwd(out, lines)
        _write_manifests(out, fleet.manifest, names)
    return fleet.manifest


# --- the command ---------------------------------------------------------------------------------------------

class _Refused(click.ClickException):
    """An operator mistake: `Error: <one line>`, exit status 2."""

    exit_code = 2


@click.command("keys", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="The fleet's provisioning folder. It holds the CA key: keep it offline.")
@click.option("--fleet", default=None, help="New fleet: its name (topic level, e.g. 'lab').")
@click.option("--device", "devices", multiple=True, help="New fleet: a device name; repeat for each device.")
@click.option("--count", type=int, default=0, help="New fleet: also add devices dev-000 .. dev-<count-1>.")
@click.option("--broker-host", default=None, help="New fleet: host name or IP in the broker cert [localhost].")
@click.option("--add", "add", multiple=True, metavar="NAME", help="Enrol a new device into the fleet; repeatable.")
@click.option("--revoke", multiple=True, metavar="NAME", help="Revoke a device (CRL, passwd, denylist); repeatable.")
@click.option("--rotate", multiple=True, metavar="NAME",
              help="New keys and certificate for a device, the old certificate revoked; repeatable.")
def keys_command(out_dir: str, fleet: str | None, devices: tuple[str, ...], count: int, broker_host: str | None,
                 add: tuple[str, ...], revoke: tuple[str, ...], rotate: tuple[str, ...]) -> None:
    """Provision a fleet (identities, TLS CA and certificates, CRL, mosquitto password and ACL files), or change
    an existing one: --add, --revoke or --rotate. An existing fleet is never overwritten."""
    actions = {"--add": add, "--revoke": revoke, "--rotate": rotate}
    chosen = [flag for flag, names in actions.items() if names]
    creating = fleet is not None or devices or count or broker_host is not None
    try:
        if len(chosen) > 1 or (chosen and creating):
            raise ValueError("give one action: --fleet with --device/--count (new fleet), --add, --revoke or --rotate")
        if not chosen:
            names = list(devices) + [f"dev-{i:03d}" for i in range(count)]
            if fleet is None or not names:
                raise ValueError("a new fleet needs --fleet NAME and --device NAME (repeatable) or --count N")
            manifest = provision_fleet(out_dir, fleet, names, broker_host or "localhost")
            click.echo(f"fleet {fleet} (id {manifest['fleet_id']:#010x}): {len(names)} devices written to {out_dir}; "
                       f"keep {out_dir} offline, copy broker/, coordinator/ and devices/<name>/ to their machines")
            return
        flag = chosen[0]
        change, verb = {"--add": (add_devices, "enrolled"), "--revoke": (revoke_devices, "revoked"),
                        "--rotate": (rotate_devices, "rotated")}[flag]
        manifest = change(out_dir, list(actions[flag]))
    except ValueError as exc:
        raise _Refused(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    base = Path(out_dir)
    devices_too = "" if flag == "--revoke" else f", {base / 'devices'}/<name>/ to each of those devices"
    click.echo(f"fleet {manifest['fleet']}: {verb} {', '.join(actions[flag])}; copy {base / 'broker'}/ to the broker "
               f"and send mosquitto SIGHUP, {base / 'coordinator'}/ to the coordinator and restart it{devices_too}, "
               f"and each other device's {PEERS_FILE} to it (secure aggregation)")
