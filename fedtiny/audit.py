"""The coordinator's audit log: one signed JSON line per security-relevant event, each bound to the line before.

What a data protection review asks for beside the data-flow manifest (docs/privacy.md, "Evidence"): enrolment and
revocation, each round's configuration (clip norm, noise, sampling, secure aggregation), the pseudonymous
participants, model hashes, cumulative epsilon and delta, and why a run stopped, in a record that the coordinator
cannot quietly rewrite afterwards.

Each line is one JSON object in canonical form (keys sorted, no spaces) with

    seq    its index in the log, from 0
    prev   the SHA-256 (hex) of the previous line's bytes (without its newline); 64 zeros on line 0
    key    the signing key's id (KEY_ID_BYTES of the SHA-256 of its raw public key, hex)
    event  what happened, and its fields
    sig    the Ed25519 signature (hex) of the line's canonical form without `sig`

A changed line fails its signature; a removed, inserted or reordered line breaks `seq` and `prev` at the first line
after it; a removed tail is caught by the closing record (`audit_closed`, with the number of lines before it),
which `verify` requires unless told that the log is still being written. The signing key is an Ed25519 key of the
coordinator (`cryptography`), provisioned by `fedtiny keys` into coordinator/audit.key (0600) with its public half
in coordinator/audit.pub and in the provisioning folder's audit.pub for auditors (fedtiny/protocol/keys.py).
It is its own key: the coordinator's message identity signs with EdDSA over BLAKE2b (Monocypher's), which standard
Ed25519 tools cannot check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
KEY_ID_BYTES = 8
CLOSED = "audit_closed"
PRIVATE_KEY_FILE, PUBLIC_KEY_FILE = "audit.key", "audit.pub"


class AuditError(ValueError):
    """A log, key or line that does not verify; the message names the file and the first bad line."""


# --- keys --------------------------------------------------------------------------------------------------------

def new_key_pem() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM) of a new Ed25519 signing key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    key = _load(path, serialization.load_pem_private_key, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    key = _load(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path}: not an Ed25519 public key")
    return key


def _load(path, loader, **kwargs):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditError(f"{path}: {exc.strerror or exc}") from None
    try:
        return loader(data, **kwargs)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path}: not a PEM key ({' '.join(str(exc).split())[:80]})") from None


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:2 * KEY_ID_BYTES]


def pseudonym_key(key: Ed25519PrivateKey) -> bytes:
    """The key of the log's pseudonyms, derived from its signing key: whoever holds that key can map them back."""
    return hashlib.sha256(b"fedtiny audit pseudonyms\0" + key.private_bytes_raw()).digest()


def pseudonym(pseudonym_key: bytes, device: str) -> str:
    """A device's name in the log: a keyed hash, the same for the same device in every line."""
    return "p-" + hmac.new(pseudonym_key, device.encode(), hashlib.sha256).hexdigest()[:12]


# --- lines -------------------------------------------------------------------------------------------------------

def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class AuditLog:
    """Appends signed, chained lines to `path` (created 0600; an existing log is verified with this key and
    continued, so a restarted coordinator extends its own chain). Every line is flushed and fsynced before
    `record` returns: what the log says happened, happened no later than that."""

    def __init__(self, path: str | Path, key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self._key = key
        self.key_id = key_id(key.public_key())
        self._pseudonym_key = pseudonym_key(key)
        self.seq, self.prev = 0, GENESIS
        if self.path.exists() and self.path.stat().st_size:
            result = verify(self.path, key.public_key(), require_closed=False)
            self.seq, self.prev = result.lines, result.head
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "ab")

    def pseudonym(self, device: str) -> str:
        return pseudonym(self._pseudonym_key, device)

    def record(self, event: str, **fields) -> dict:
        if self._file is None:
            raise AuditError(f"{self.path}: the log is closed")
        entry = {**fields, "event": event, "seq": self.seq, "prev": self.prev, "key": self.key_id,
                 "ts": round(time.time(), 3)}
        entry["sig"] = self._key.sign(canonical(entry)).hex()
        line = canonical(entry)
        self._file.write(line + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.seq, self.prev = self.seq + 1, line_hash(line)
        return entry

    def close(self, **fields) -> None:
        """The closing record (how many lines came before it), then the file; a second close does nothing."""
        if self._file is None:
            return
        self.record(CLOSED, lines=self.seq, **fields)
        self._file.close()
        self._file = None


# --- verification ------------------------------------------------------------------------------------------------

@dataclass
class Verified:
    lines: int  # lines checked
    head: str  # hash of the last line (what the next line's prev must be)
    closed: bool  # whether the last line is the closing record
    key_id: str
    events: list[dict]


def verify(path: str | Path, public: Ed25519PublicKey, require_closed: bool = True) -> Verified:
    """Check every line's form, sequence number, link to the line before and signature, and (require_closed) that
    the log ends with its closing record. AuditError names the first bad line (1-based, as an editor shows it)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"{path}: {exc.strerror or exc}") from None
    if not data:
        raise AuditError(f"{path}: empty: no audit record")
    if not data.endswith(b"\n"):
        last = data.count(b"\n") + 1
        raise AuditError(f"{path}: line {last}: cut off (no newline): a write was interrupted")
    expected_key = key_id(public)
    prev, events = GENESIS, []
    for number, line in enumerate(data[:-1].split(b"\n"), start=1):
        where = f"{path}: line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            raise AuditError(f"{where}: not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            raise AuditError(f"{where}: not an audit record (no signature)")
        if canonical(entry) != line:
            raise AuditError(f"{where}: not in canonical form (changed after it was signed)")
        if entry.get("key") != expected_key:
            raise AuditError(f"{where}: signed by key {entry.get('key')}, not by the given key {expected_key}")
        body = {k: v for k, v in entry.items() if k != "sig"}
        try:
            public.verify(bytes.fromhex(entry["sig"]), canonical(body))
        except (InvalidSignature, ValueError):
            raise AuditError(f"{where}: bad signature (the line was changed, or signed by another key)") from None
        if entry.get("seq") != number - 1:
            raise AuditError(f"{where}: sequence number {entry.get('seq')} where {number - 1} belongs (a line before "
                             "it was removed, inserted or moved)")
        if entry.get("prev") != prev:
            raise AuditError(f"{where}: does not follow the line before it (a line was removed, inserted or moved)")
        prev = line_hash(line)
        events.append(body)
    closed = events[-1].get("event") == CLOSED and events[-1].get("lines") == len(events) - 1
    if require_closed and not closed:
        raise AuditError(f"{path}: line {len(events)}: the log ends without its closing record (its tail was "
                         "removed, or the coordinator is still running or did not stop cleanly)")
    return Verified(len(events), prev, closed, expected_key, events)
