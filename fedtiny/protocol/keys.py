"""Provision a fleet: message-signing identities, a TLS CA with broker and client certificates, and broker auth.

Layout of out_dir (directory 0700; files holding secrets 0600):

    fleet.json                         names, numeric ids, public identities (no secrets)
    ca/ca.crt, ca/ca.key               fleet device CA (EC P-256); keep ca.key offline after provisioning
    broker/broker.crt, broker.key      server certificate for localhost, 127.0.0.1 and broker_host
    broker/passwd                      mosquitto 2.0 password file ($7$ = PBKDF2-SHA512)
    broker/acl                         per-device topic ACL
    coordinator/identity.key|.pub      64-byte raw identity (EdDSA seed | X25519 scalar) and public half
    coordinator/client.crt|key, password
    devices/<name>/identity.key|.pub, client.crt|key, password, coordinator.pub
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtiny.protocol import acl, topics
from fedtiny.protocol.envelope import Identity

PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0.11 writes; mosquitto reads the count from the file
CERT_DAYS = 825


def _write(path: Path, data: bytes, secret: bool) -> None:
    # Create with the final mode so a secret is never readable by others, not even briefly.
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


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


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _certificate(subject: str, public_key, issuer_name: x509.Name, issuer_key, *, ca=False, san=None, usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
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


def provision_fleet(out_dir, fleet: str, device_ids: list[str], broker_host: str = "localhost") -> dict:
    """Write all keys and broker files for one fleet into out_dir; returns the fleet.json manifest."""
    out = Path(out_dir)
    topics.check_name(fleet)
    names = [topics.check_name(d) for d in device_ids]
    if len(set(names)) != len(names) or topics.COORDINATOR_NAME in names:
        raise ValueError("device names must be unique and not 'coordinator'")
    ids = {name: topics.name_id(name) for name in names}
    if len(set(ids.values())) != len(ids) or 0 in ids.values():
        raise ValueError("two device names map to the same numeric id; rename one")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fedtiny {fleet} device CA")])
    ca_cert = _certificate(f"fedtiny {fleet} device CA", ca_key.public_key(), ca_name, ca_key, ca=True)
    _write(out / "ca/ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(out / "ca/ca.key", _key_pem(ca_key), secret=True)

    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _certificate(
        broker_host, broker_key.public_key(), ca_name, ca_key,
        san=_san_for(broker_host), usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    _write(out / "broker/broker.crt", broker_cert.public_bytes(serialization.Encoding.PEM), secret=False)
    _write(out / "broker/broker.key", _key_pem(broker_key), secret=True)

    coordinator = Identity.generate()
    manifest = {
        "fleet": fleet,
        "fleet_id": topics.name_id(fleet),
        "broker_host": broker_host,
        "coordinator": {"name": topics.COORDINATOR_NAME, "public": coordinator.public.to_bytes().hex()},
        "devices": {},
    }
    password_lines = []
    for name, identity in [(topics.COORDINATOR_NAME, coordinator)] + [(n, Identity.generate()) for n in names]:
        folder = out / ("coordinator" if identity is coordinator else f"devices/{name}")
        _write(folder / "identity.key", identity.to_bytes(), secret=True)
        _write(folder / "identity.pub", identity.public.to_bytes(), secret=False)
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = _certificate(
            name, client_key.public_key(), ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        _write(folder / "client.crt", client_cert.public_bytes(serialization.Encoding.PEM), secret=False)
        _write(folder / "client.key", _key_pem(client_key), secret=True)
        password = secrets.token_urlsafe(24)
        _write(folder / "password", password.encode(), secret=True)
        password_lines.append(mosquitto_password_line(name, password))
        if identity is not coordinator:
            _write(folder / "coordinator.pub", coordinator.public.to_bytes(), secret=False)
            manifest["devices"][name] = {"id": ids[name], "public": identity.public.to_bytes().hex()}

    _write(out / "broker/passwd", ("\n".join(password_lines) + "\n").encode(), secret=True)
    _write(out / "broker/acl", acl.mosquitto_acl_text(fleet).encode(), secret=False)
    for folder in ("ca", "broker", "coordinator", "devices", *[f"devices/{n}" for n in names]):
        os.chmod(out / folder, 0o700)
    _write(out / "fleet.json", (json.dumps(manifest, indent=2) + "\n").encode(), secret=False)
    return manifest


@click.command("keys", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Directory to create.")
@click.option("--fleet", required=True, help="Fleet name (topic level, e.g. 'lab').")
@click.option("--device", "devices", multiple=True, help="Device name; repeat for each device.")
@click.option("--count", type=int, default=0, help="Also add devices dev-000 .. dev-<count-1>.")
@click.option("--broker-host", default="localhost", show_default=True, help="Host name or IP in the broker cert.")
def keys_command(out_dir: str, fleet: str, devices: tuple[str, ...], count: int, broker_host: str) -> None:
    """Provision a fleet: identities, TLS CA and certificates, mosquitto password and ACL files."""
    names = list(devices) + [f"dev-{i:03d}" for i in range(count)]
    if not names:
        raise click.UsageError("give --device NAME (repeatable) or --count N")
    try:
        manifest = provision_fleet(out_dir, fleet, names, broker_host)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"fleet {fleet} (id {manifest['fleet_id']:#010x}): {len(names)} devices written to {out_dir}")
