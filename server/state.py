"""The coordinator's durable state in SQLite (stdlib sqlite3, WAL).

Tables:
    meta       key -> value: round (last completed), model_version, plan_hash
    globals    one row per model version: the float master and its integers (npz), the round that made it,
               and the strategy's own state (momentum, Adam moments) as npz
    devices    registry: name, numeric id, the model version it holds, last round it replied to, counters
               (meta link_replay: the fleet link's durable state: uplink replay positions, run, downlink seqs)
    replies    accepted replies: (round, device) is the reply id. A reply is written the moment it is accepted
               (its own small transaction), so a crash before aggregation loses nothing; the primary key
               refuses the same device twice in a round, so nothing counts twice. Rows of a completed round
               are marked aggregated in the round's transaction.

`commit_round` writes everything a round changed in ONE transaction: the new global version, round number,
registry and the aggregated mark. Killed anywhere, a restart sees either the round before or the round after.
"""

from __future__ import annotations

import io
import os
import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS globals (
    version INTEGER PRIMARY KEY, round INTEGER NOT NULL, master BLOB NOT NULL, ints BLOB NOT NULL,
    strategy BLOB, metrics TEXT);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, device_id INTEGER NOT NULL, model_version INTEGER, last_round INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0, rejected INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS replies (
    round INTEGER NOT NULL, device TEXT NOT NULL, model_version INTEGER NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, delta BLOB NOT NULL, uplink_bytes INTEGER NOT NULL, aggregated INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round, device));
"""


def pack_arrays(arrays: dict[str, np.ndarray] | None) -> bytes | None:
    if arrays is None:
        return None
    buf = io.BytesIO()
    np.savez(buf, **{f"a{i}": v for i, v in enumerate(arrays.values())}, __names__=np.array(list(arrays), dtype=str))
    return buf.getvalue()


def unpack_arrays(blob: bytes | None) -> dict[str, np.ndarray] | None:
    if blob is None:
        return None
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        names = [str(n) for n in z["__names__"]]
        return {n: z[f"a{i}"] for i, n in enumerate(names)}


@dataclass
class StoredReply:
    round: int
    device: str
    model_version: int
    num_examples: int
    metrics: dict[str, float]
    delta: dict[str, np.ndarray]
    uplink_bytes: int


@dataclass
class DeviceRecord:
    device: str
    device_id: int
    model_version: int | None = None  # the global version it holds, as far as the coordinator knows
    last_round: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass
class Checkpoint:
    round: int  # last completed round
    model_version: int
    master: dict[str, np.ndarray]
    ints: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray] | None
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    pending: list[StoredReply] = field(default_factory=list)  # accepted, not yet aggregated


class StateStore:
    def __init__(self, path: str | Path, durable: bool = True) -> None:
        """durable=False: commits are atomic but not flushed to disk (WAL with synchronous=NORMAL), as the node agents'
        durable=False: for a simulation, whose coordinator never restarts from its store; a commit per accepted reply
        with an fsync each took about 10 ms of the coordinator's wall time on a loaded machine, 2.5 ms without."""
        self.path = str(path)
        self._lock = threading.Lock()
        # Every device's delta is in here: readable by the coordinator's user only. SQLite gives its -wal and
        # -shm files the database file's permissions.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # --- reading ------------------------------------------------------------------------------------------
    def load(self) -> Checkpoint | None:
        with self._lock:
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
            if "model_version" not in meta:
                return None
            version = int(meta["model_version"])
            master, ints, strategy = self.db.execute(
                "SELECT master, ints, strategy FROM globals WHERE version = ?", (version,)).fetchone()
            devices = {r[0]: DeviceRecord(*r) for r in self.db.execute(
                "SELECT device, device_id, model_version, last_round, accepted, rejected FROM devices")}
            pending = [self._reply(r) for r in self.db.execute(
                "SELECT round, device, model_version, num_examples, metrics, delta, uplink_bytes FROM replies "
                "WHERE aggregated = 0 ORDER BY rowid")]
        return Checkpoint(int(meta["round"]), version, unpack_arrays(master), unpack_arrays(ints),
                          unpack_arrays(strategy), devices, pending)

    @staticmethod
    def _reply(row) -> StoredReply:
        rnd, device, version, n, metrics, delta, nbytes = row
        return StoredReply(rnd, device, version, n, json.loads(metrics), unpack_arrays(delta), nbytes)

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def global_ints(self, version: int) -> dict[str, np.ndarray] | None:
        with self._lock:
            row = self.db.execute("SELECT ints FROM globals WHERE version = ?", (version,)).fetchone()
        return unpack_arrays(row[0]) if row else None

    def global_master(self, version: int) -> dict[str, np.ndarray] | None:
        with self._lock:
            row = self.db.execute("SELECT master FROM globals WHERE version = ?", (version,)).fetchone()
        return unpack_arrays(row[0]) if row else None

    def restore_link(self, link, status_streams: bool = True) -> None:
        """Give a fleet link the uplink replay counters checkpointed with the last round (for a link that exports
        them); restoring never moves a counter back, so it may be called twice.

        A restarted link restores in two steps. Before it connects, without the STATUS streams
        (`status_streams=False`): its persistent MQTT session delivers the uplinks queued meanwhile at once, and
        an old DELTA among them must be refused. After the retained STATUS messages arrived, everything: a
        retained STATUS the link had accepted before is not newer than its counter and would be refused as
        stale, leaving the device unknown until its next heartbeat."""
        saved = self.meta("link_replay")
        if saved:
            link.restore(json.loads(saved), status_streams=status_streams)

    def save_link_state(self, state: dict) -> None:
        """The fleet link's durable state, written at once (a downlink seq reservation is on disk before use)."""
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('link_replay', ?)", (json.dumps(state),))

    def reply_metrics(self) -> dict[tuple[int, str], dict[str, float]]:
        """What each accepted reply's device reported (loss, accuracy, ...), by (round, device)."""
        with self._lock:
            rows = self.db.execute("SELECT round, device, metrics FROM replies").fetchall()
        return {(r, d): json.loads(m) for r, d, m in rows}

    def accepted_ids(self, round_: int) -> set[str]:
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT device FROM replies WHERE round = ?", (round_,))}

    # --- writing ------------------------------------------------------------------------------------------
    def initialize(self, master, ints, plan_hash: str = "") -> None:
        """Version 0 at round 0, once; a store that already holds a run is left as it is."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("SELECT 1 FROM meta WHERE key = 'model_version'").fetchone():
                return
            self.db.execute("INSERT INTO globals (version, round, master, ints) VALUES (0, 0, ?, ?)",
                            (pack_arrays(master), pack_arrays(ints)))
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("round", "0"), ("model_version", "0"), ("plan_hash", plan_hash)])

    def accept_reply(self, reply: StoredReply) -> bool:
        """Record an accepted reply durably; False if this (round, device) was already accepted."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                                (reply.round, reply.device, reply.model_version, reply.num_examples,
                                 json.dumps(reply.metrics), pack_arrays(reply.delta), reply.uplink_bytes))
            except sqlite3.IntegrityError:
                return False
        return True

    def commit_round(self, round_: int, version: int, master, ints, strategy, devices: dict[str, DeviceRecord],
                     metrics: dict | None = None, extra_meta: dict[str, str] | None = None) -> None:
        """One transaction: the round's global version, round number, registry, and the accepted replies marked
        aggregated (every reply accepted so far went into this round's aggregate or the strategy's buffer)."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO globals VALUES (?, ?, ?, ?, ?, ?)",
                            (version, round_, pack_arrays(master), pack_arrays(ints), pack_arrays(strategy),
                             json.dumps(metrics or {}, default=float)))
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("round", str(round_)), ("model_version", str(version)),
                                 *(extra_meta or {}).items()])
            self.db.executemany(
                "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                [(d.device, d.device_id, d.model_version, d.last_round, d.accepted, d.rejected)
                 for d in devices.values()])
            self.db.execute("UPDATE replies SET aggregated = 1 WHERE aggregated = 0")


def link_meta(link) -> dict[str, str] | None:
    """commit_round's extra_meta for a fleet link's replay counters (None for a link that does not export them)."""
    state = link.durable_state()
    return {"link_replay": json.dumps(state)} if state is not None else None
