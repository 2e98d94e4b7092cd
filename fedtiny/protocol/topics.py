"""MQTT topic tree and the numeric ids that stand for fleet and device names in message headers.

    fedtiny/<fleet>/up/<device>       device -> coordinator: JOIN, DELTA, ACK, LEAVE   (QoS 1)
    fedtiny/<fleet>/down/<device>     coordinator -> device: TASK, GLOBAL_UPDATE, ACK  (QoS 1)
    fedtiny/<fleet>/bcast             coordinator -> all: TASK announcements           (QoS 1, retained)
    fedtiny/<fleet>/status/<device>   device heartbeat and last will                   (QoS 1, retained)
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from fedtiny.protocol.errors import ProtocolError

ROOT = "fedtiny"
COORDINATOR_NAME = "coordinator"
COORDINATOR_ID = 0  # header device_id 0 on a downlink = broadcast
# Names become MQTT topic levels, certificate CNs and broker usernames: no wildcards, separators or spaces.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Publish:
    """One MQTT publish a session wants made (QoS 1 always): what both ends' sessions return."""

    topic: str
    payload: bytes
    retain: bool = False


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"invalid fleet/device name {name!r}: use 1-64 of [A-Za-z0-9_.-], starting alnum")
    return name


def name_id(name: str) -> int:
    """u32 id of a fleet or device name: the first 4 bytes (little-endian) of SHA-256("fedtiny-id:" + name).

    Provisioning refuses fleets where two names collide or a device id is 0 (reserved for broadcast).
    """
    digest = hashlib.sha256(b"fedtiny-id:" + check_name(name).encode()).digest()
    return struct.unpack_from("<I", digest)[0]


def uplink(fleet: str, device: str) -> str:
    return f"{ROOT}/{fleet}/up/{device}"


def downlink(fleet: str, device: str) -> str:
    return f"{ROOT}/{fleet}/down/{device}"


def broadcast(fleet: str) -> str:
    return f"{ROOT}/{fleet}/bcast"


def status(fleet: str, device: str) -> str:
    return f"{ROOT}/{fleet}/status/{device}"


def parse(topic: str) -> tuple[str, str, str | None]:
    """(fleet, kind, device) of a fedtiny topic; kind is up, down, bcast or status."""
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == ROOT and parts[2] == "bcast":
        return parts[1], "bcast", None
    if len(parts) == 4 and parts[0] == ROOT and parts[2] in ("up", "down", "status"):
        return parts[1], parts[2], parts[3]
    raise ProtocolError("bad-topic", topic)


def check_topic_matches(topic: str, fleet_id: int, device_id: int) -> None:
    """Raise unless a message's header ids agree with the topic it arrived on (uplink, status or downlink)."""
    fleet, kind, device = parse(topic)
    expected_device = 0 if device is None else name_id(device)
    if name_id(fleet) != fleet_id or expected_device != device_id:
        raise ProtocolError("wrong-topic", f"header ids do not match topic {topic}")
