"""The coordinator's MQTT end of the fleet link (docs/fleet_link.md), the state/delta helpers both ends share,
and the thin paho transport both ends use.

    state helpers   state_delta / apply_delta, plan state <-> protocol DeltaEntries
    update codec    encode_update / decode_update: the only way a DELTA body is built (plan buffers + floats)
    task codec      task_body / task_settings: TASK body <-> the coordinator's config dict
    MqttTransport   paho in its own thread: TLS, MQTT 5 persistent session, TCP_NODELAY, reconnect with backoff
    CoordinatorLink one connection to the whole fleet: registry, reassembly, verified replies, TASK downlinks

Tensor ids on the wire are indexes into plan.trainable_buffers(). A device state is dict[buffer name, array]
(int8 weight rows, int32 biases). A delta is int16 for weight rows (the difference of two int8 values spans
[-255, 255]) and int32 for biases, where it wraps modulo 2^32 so that apply_delta(base, state_delta(new, base))
== new always holds.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.planfile import plan_hash
from fedtiny.protocol import chunking, topics
from fedtiny.protocol.delta import DeltaEntry, encode_delta
from fedtiny.protocol.envelope import (
    CoordinatorEndpoint, Header, Identity, PublicIdentity, Flags,
)
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import (
    Ack, AckStatus, Delta, DeviceState, GlobalUpdate, MessageType, Task,
)

log = logging.getLogger("fedtiny.fleet")

FULL_STATE = 0xFFFFFFFF  # GLOBAL_UPDATE.base_model_version: the entries replace every trainable buffer whole
METRICS_TENSOR_ID = 0xFFFF  # DELTA entry carrying device metrics: metric i = values[i] * scales[i]
METRIC_NAMES = ("accuracy",)  # channel order of the metrics entry (loss travels in DELTA.train_loss)
PLAN_VERSION = 1
TASK_CONFIG = struct.Struct("<HH")  # TASK.config: epochs u16 | uplink_keep_pct u16 (0 = 100: send every change)
_SEQ_EPOCH = 1_704_067_200  # 2024-01-01: downlink seqs start at 16 per second since then (see CoordinatorLink)


# --- state and deltas -------------------------------------------------------------------------------------

def _delta_dtype(state_dtype: np.dtype) -> np.dtype:
    if state_dtype == np.int8:
        return np.dtype(np.int16)
    if state_dtype == np.int32:
        return np.dtype(np.int32)
    raise ValueError(f"trainable buffers are int8 or int32, not {state_dtype}")


def state_delta(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """new - base per buffer: int16 for int8 buffers, int32 (modulo 2^32) for int32 buffers."""
    if set(new) != set(base):
        raise ValueError("states hold different buffers")
    out = {}
    for name, b in base.items():
        n = np.asarray(new[name])
        b = np.asarray(b)
        if n.shape != b.shape or n.dtype != b.dtype:
            raise ValueError(f"{name}: {n.dtype}{n.shape} vs {b.dtype}{b.shape}")
        if b.dtype == np.int32:
            out[name] = (n.view(np.uint32) - b.view(np.uint32)).view(np.int32)
        else:
            out[name] = n.astype(_delta_dtype(b.dtype)) - b.astype(_delta_dtype(b.dtype))
    return out


def split_uplink(delta: dict[str, np.ndarray], carry: dict[str, np.ndarray] | None, keep: float
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Error feedback: (sent, carry). This round's delta plus the change kept back last round; of each buffer
    the largest `keep` fraction of its nonzero elements is sent (ties: lower index first) and the rest is kept
    back for the next round, so what a device learned is delayed, never lost. keep = 1 sends everything.

    Most of a round's changes are +-1 LSB; sending the larger half halves a DELTA at no cost in accuracy
    (BENCHMARKS.md, simulate section), as in sparsified FL with error feedback (Sattler et al. 2019)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"uplink keep fraction {keep} is not in (0, 1]")
    sent, kept = {}, {}
    for name, d in delta.items():
        d = np.asarray(d)
        total = d.copy()
        if carry is not None:
            c = np.asarray(carry[name])
            if d.dtype == np.int32:  # biases: modulo 2^32, as state_delta makes them
                total = (d.view(np.uint32) + c.astype(np.int32).view(np.uint32)).view(np.int32)
            else:
                wide = d.astype(np.int32) + c.astype(np.int32)
                if wide.min(initial=0) < np.iinfo(d.dtype).min or wide.max(initial=0) > np.iinfo(d.dtype).max:
                    raise ValueError(f"{name}: delta plus carry leaves {d.dtype}")
                total = wide.astype(d.dtype)
        flat = total.reshape(-1)
        nonzero = np.flatnonzero(flat)
        chosen = nonzero[np.argsort(-np.abs(flat[nonzero].astype(np.int64)), kind="stable")]
        chosen = chosen[: int(np.ceil(keep * nonzero.size))]
        out = np.zeros_like(flat)
        out[chosen] = flat[chosen]
        rest = flat.copy()
        rest[chosen] = 0
        sent[name], kept[name] = out.reshape(d.shape), rest.reshape(d.shape)
    return sent, kept


def row_scales(plan: Plan) -> dict[str, np.ndarray]:
    """Per trainable buffer, the real value of one LSB of each row (axis 0): the graph tensor's scales."""
    out = {}
    for name in plan.trainable_buffers():
        rows = plan.buffers[name].shape[0]
        scale = np.asarray(plan.graph.tensors[name[len("train:"):]].scale, np.float64).reshape(-1)
        out[name] = np.full(rows, scale[0]) if scale.size == 1 else scale[:rows]
    return out


def clip_delta(delta: dict[str, np.ndarray], scales: dict[str, np.ndarray], clip_norm: float
               ) -> dict[str, np.ndarray]:
    """The delta scaled down so that its L2 norm in real units is at most clip_norm (unchanged if already).

    Bounds what one device can move the model in a round (poisoning, and the sensitivity DP noise is
    calibrated to). Integers are truncated toward zero, so the clipped norm never exceeds clip_norm."""
    if clip_norm <= 0:
        return delta
    squares = sum(float(np.sum((np.asarray(d, np.float64).reshape(len(scales[n]), -1)
                                * scales[n].reshape(-1, 1)) ** 2)) for n, d in delta.items())
    norm = float(np.sqrt(squares))
    if norm <= clip_norm:
        return delta
    factor = clip_norm / norm
    return {n: np.trunc(np.asarray(d, np.float64) * factor).astype(np.asarray(d).dtype) for n, d in delta.items()}


def apply_delta(base: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """base + delta per buffer, in the base's dtype; an int8 result outside [-128, 127] raises ValueError."""
    if set(delta) != set(base):
        raise ValueError("state and delta hold different buffers")
    out = {}
    for name, b in base.items():
        b = np.asarray(b)
        d = np.asarray(delta[name])
        if d.shape != b.shape:
            raise ValueError(f"{name}: delta shape {d.shape} vs {b.shape}")
        if b.dtype == np.int32:
            out[name] = (b.view(np.uint32) + d.astype(np.int32).view(np.uint32)).view(np.int32)
        else:
            wide = b.astype(np.int32) + d.astype(np.int32)
            if wide.min(initial=0) < -128 or wide.max(initial=0) > 127:
                raise ValueError(f"{name}: base + delta leaves the int8 range")
            out[name] = wide.astype(np.int8)
    return out


def _narrow(values: np.ndarray) -> np.ndarray:
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if values.size == 0 or (values.min() >= info.min and values.max() <= info.max):
            return values.astype(dtype) if values.dtype != dtype else values
    raise ValueError("values exceed int32")


def _smallest(candidates: list[DeltaEntry]) -> DeltaEntry:
    return min(candidates, key=lambda e: len(encode_delta([e], compress=False)))


def state_entries(plan: Plan, state: dict[str, np.ndarray], *, changed_from: dict[str, np.ndarray] | None = None,
                  skip_zero: bool = False, narrow: bool = False) -> list[DeltaEntry]:
    """Protocol entries for a state or delta dict over the plan's trainable buffers (tensor id = buffer index),
    one entry per buffer, with the plan's scales (none on the wire).

    changed_from: only the elements that differ from this state. skip_zero: only the nonzero elements (for
    deltas). Either one sends each buffer as a bitmap entry or whole, whichever is smaller, and leaves out a
    buffer with nothing to send. narrow: each entry in the smallest integer dtype that holds it. Without
    changed_from or skip_zero every buffer is sent whole, which under secure aggregation (a fixed coordinate
    set) is the only allowed form.
    """
    names = plan.trainable_buffers()
    if set(state) != set(names):
        raise ValueError("the state must hold exactly the plan's trainable buffers")
    entries = []
    for tensor_id, name in enumerate(names):
        values = np.asarray(state[name])
        if values.shape != tuple(plan.buffers[name].shape):
            raise ValueError(f"{name}: shape {values.shape}, plan has {plan.buffers[name].shape}")
        rows = values.reshape(values.shape[0], -1)
        whole = DeltaEntry(tensor_id, 0, _narrow(rows) if narrow else rows)
        if changed_from is None and not skip_zero:
            entries.append(whole)
            continue
        send = np.ones(rows.shape, bool)
        if changed_from is not None:
            send &= rows != np.asarray(changed_from[name]).reshape(rows.shape)
        if skip_zero:
            send &= rows != 0
        if send.any():
            dtype = _narrow(rows[send]).dtype if narrow else rows.dtype  # narrowest over the sent elements
            sparse = DeltaEntry(tensor_id, 0, np.where(send, rows, 0).astype(dtype), mask=send)
            entries.append(_smallest([sparse, whole]))
    return entries


def entries_to_state(plan: Plan, entries: list[DeltaEntry], base: dict[str, np.ndarray], *,
                     dtypes: dict[str, np.dtype] | None = None, require_all: bool = False) -> dict[str, np.ndarray]:
    """Overlay entries onto a copy of base (entries hold values for the elements they carry).

    dtypes: the dtype each buffer must end in (values are range-checked, never wrapped); defaults to base's.
    require_all: every channel of every buffer must be covered. Raises ProtocolError on any mismatch.
    """
    names = plan.trainable_buffers()
    out = {n: np.array(base[n], copy=True) for n in names}
    covered = {n: np.zeros(out[n].shape[0], bool) for n in names}
    for e in entries:
        if e.tensor_id == METRICS_TENSOR_ID:
            continue
        if e.tensor_id >= len(names):
            raise ProtocolError("bad-entry", f"tensor id {e.tensor_id} not in the plan")
        name = names[e.tensor_id]
        target = out[name]
        rows = target.reshape(target.shape[0], -1)
        if e.start + e.count > rows.shape[0] or e.values.shape[1] != rows.shape[1]:
            raise ProtocolError("bad-entry", f"{name}: entry [{e.start}, +{e.count}) x {e.values.shape[1]} "
                                             f"does not fit {target.shape}")
        dtype = np.dtype((dtypes or {}).get(name, target.dtype))
        info = np.iinfo(dtype)
        if e.values.size and (e.values.min() < info.min or e.values.max() > info.max):
            raise ProtocolError("bad-entry", f"{name}: values exceed {dtype}")
        if covered[name][e.start : e.start + e.count].any():
            raise ProtocolError("bad-entry", f"{name}: channels covered twice")
        if e.mask is not None and require_all:
            raise ProtocolError("bad-entry", f"{name}: a full state cannot be a bitmap entry")
        covered[name][e.start : e.start + e.count] = True
        block = rows[e.start : e.start + e.count]
        block[e.carried] = e.values[e.carried].astype(dtype)
    if require_all and not all(c.all() for c in covered.values()):
        raise ProtocolError("bad-entry", "entries do not cover every trainable channel")
    return out


def zero_delta(plan: Plan) -> dict[str, np.ndarray]:
    return {n: np.zeros(plan.buffers[n].shape, _delta_dtype(np.dtype(plan.buffers[n].dtype)))
            for n in plan.trainable_buffers()}


def global_update(plan: Plan, global_state: dict[str, np.ndarray], held: int | None,
                  base: dict[str, np.ndarray] | None) -> GlobalUpdate:
    """The GLOBAL_UPDATE that brings a device holding version `held` (whose state is `base`) to global_state:
    the differences of the changed elements, or every buffer's values whole (FULL_STATE) when that version's
    state is not known. Differences, not new values: a round moves most weights by a few LSB (int4 on the
    wire) and biases by far less than their int32 range, so this halves the downlink."""
    if held is None or base is None:
        return GlobalUpdate(FULL_STATE, state_entries(plan, global_state))
    return GlobalUpdate(held, state_entries(plan, state_delta(global_state, base), skip_zero=True, narrow=True))


class SentStates:
    """The global states sent to devices, by model version (the newest `keep`): the bases from which a
    coordinator's link sends each device only what changed since the version it holds."""

    def __init__(self, plan: Plan, keep: int = 8) -> None:
        self.plan, self.keep = plan, keep
        self._states: dict[int, dict[str, np.ndarray]] = {}

    def update(self, held: int | None, version: int, state: dict[str, np.ndarray]) -> GlobalUpdate | None:
        """Remember `state` as `version`; the GLOBAL_UPDATE for a device holding `held`, None if that is it."""
        state = {k: np.asarray(v).copy() for k, v in state.items()}
        self._states[version] = state
        for old in sorted(self._states)[: -self.keep]:
            del self._states[old]
        if held == version:
            return None
        return global_update(self.plan, state, held, self._states.get(held) if held is not None else None)


def apply_global_update(plan: Plan, state: dict[str, np.ndarray], held: int, body: GlobalUpdate
                        ) -> dict[str, np.ndarray]:
    """The new global state of a device holding version `held` whose state is `state`; ProtocolError if the
    update is from another version or does not fit the plan (the state is then unchanged)."""
    if body.base_model_version == FULL_STATE:
        return entries_to_state(plan, body.entries, state, require_all=True)
    if body.base_model_version != held:
        raise ProtocolError("wrong-version", f"GLOBAL_UPDATE from version {body.base_model_version}, but the "
                                             f"device holds {held}")
    expected = zero_delta(plan)
    change = entries_to_state(plan, body.entries, expected, dtypes={n: v.dtype for n, v in expected.items()})
    try:
        return apply_delta(state, change)
    except ValueError as exc:
        raise ProtocolError("bad-entry", str(exc)) from None


# --- the DELTA body: the only thing a device uploads ------------------------------------------------------

def encode_update(plan: Plan, delta: dict[str, np.ndarray], num_examples: int, loss: float,
                  accuracy: float) -> Delta:
    """The DELTA body from a delta over the plan's trainable buffers and three numbers, and nothing else.

    This is the device's only way to build an uplink carrying model content: it accepts a dict keyed by exactly
    the plan's trainable buffer names, each of the delta dtype and shape of that buffer, plus plain numbers,
    so raw samples (int8 inputs of another shape, labels) cannot be passed in. Elements whose delta is zero
    are left out (a bitmap marks the rest) and each entry is sent in its narrowest integer type (the
    coordinator widens again).
    """
    expected = zero_delta(plan)
    if set(delta) != set(expected):
        raise TypeError("a DELTA carries exactly the plan's trainable buffers")
    for name, ref in expected.items():
        value = delta[name]
        if not isinstance(value, np.ndarray) or value.dtype != ref.dtype or value.shape != ref.shape:
            raise TypeError(f"{name}: expected a {ref.dtype} array of shape {ref.shape}")
    if not isinstance(num_examples, int) or not 0 <= num_examples <= 0xFFFFFFFF:
        raise TypeError("num_examples must be an int in u32")
    loss, accuracy = float(loss), float(accuracy)
    metrics = DeltaEntry(METRICS_TENSOR_ID, 0, np.ones((len(METRIC_NAMES), 1), np.int8),
                         np.array([accuracy], np.float32))
    entries = state_entries(plan, delta, skip_zero=True, narrow=True)
    return Delta(num_examples, loss, entries + [metrics])


def decode_update(plan: Plan, body: Delta) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(delta dict in int16/int32, metrics) of a verified DELTA body; ProtocolError if it does not fit the plan."""
    expected = zero_delta(plan)
    delta = entries_to_state(plan, body.entries, expected, dtypes={n: v.dtype for n, v in expected.items()})
    metrics = {"loss": float(body.train_loss)}
    for e in body.entries:
        if e.tensor_id == METRICS_TENSOR_ID:
            if e.start != 0 or e.count > len(METRIC_NAMES) or e.values.shape[1] != 1:
                raise ProtocolError("bad-entry", "metrics entry")
            scales = np.broadcast_to(e.scales, (e.count,))
            for i in range(e.count):
                metrics[METRIC_NAMES[i]] = float(e.values[i, 0]) * float(scales[i])
    return delta, metrics


# --- TASK --------------------------------------------------------------------------------------------------

TASK_KEYS = {"epochs", "steps", "local_steps", "batch_size", "lr", "learning_rate", "clip_norm", "deadline_s",
             "uplink_keep"}


def task_body(plan: Plan, phash: bytes, config: dict[str, float], max_mqtt_payload: int) -> Task:
    """TASK from the coordinator's config: epochs (default 1), steps (0 = epochs over the device's data),
    clip_norm, deadline_s, uplink_keep (the fraction of each buffer's changes a DELTA carries, see
    split_uplink; default 1). Unknown keys are ignored with a warning.

    The learning rate and batch size are compiled into the plan (QAS update constants, batch-1 buffers), so a
    TASK states the plan's and a config asking for others (lr, learning_rate, batch_size) is refused: the
    devices could not honour it. Change them by compiling and flashing a new plan."""
    unknown = set(config) - TASK_KEYS - {"server-round"}  # Flower's own key: the round is in the header
    if unknown:
        log.warning("TASK config keys not carried on the wire: %s", sorted(unknown))
    steps = int(config.get("steps", config.get("local_steps", 0)))
    for key, compiled in (("lr", plan.lr), ("learning_rate", plan.lr), ("batch_size", 1)):
        if key in config and float(config[key]) != float(compiled):
            raise ValueError(f"TASK {key}={config[key]}: devices train with the plan's {key} ({compiled}); "
                             f"compile a plan with the one you want")
    epochs = int(config.get("epochs", 1))
    keep_pct = round(100 * float(config.get("uplink_keep", 1.0)))
    if not 0 <= steps <= 0xFFFF or not 0 <= epochs <= 0xFFFF:
        raise ValueError("steps and epochs must fit u16")
    if not 1 <= keep_pct <= 100:
        raise ValueError(f"uplink_keep {config['uplink_keep']} is not a fraction in [0.01, 1]")
    return Task(PLAN_VERSION, phash, steps, 1, plan.lr,
                float(config.get("clip_norm", 0.0)), int(config.get("deadline_s", 0)), max_mqtt_payload, 0,
                TASK_CONFIG.pack(epochs, keep_pct % 100))


def task_settings(task: Task) -> dict[str, float]:
    """The config a device reads back from a TASK."""
    epochs, keep_pct = 1, 0
    if len(task.config) == TASK_CONFIG.size:
        epochs, keep_pct = TASK_CONFIG.unpack(task.config)
        if keep_pct >= 100:
            raise ProtocolError("bad-task", f"TASK uplink_keep_pct {keep_pct} is not below 100")
    elif task.config:
        raise ProtocolError("bad-task", "TASK config is not 4 bytes")
    return {"epochs": epochs, "steps": task.local_steps, "batch_size": task.batch_size, "lr": task.learning_rate,
            "clip_norm": task.clip_norm, "deadline_s": task.deadline_s, "uplink_keep": (keep_pct or 100) / 100}


# --- transport ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Publish:
    """One MQTT publish an end wants made (QoS 1 always)."""

    topic: str
    payload: bytes
    retain: bool = False


def load_fleet(fleet_dir: str | Path) -> dict:
    return json.loads((Path(fleet_dir) / "fleet.json").read_text())


class MqttTransport:
    """A paho client in its own thread, nothing more: no protocol logic.

    mqtt://HOST:PORT is plain MQTT 3.1.1 (the embedded amqtt broker speaks only that), mqtts://HOST:PORT is
    TLS with the fleet CA and the identity's client certificate, MQTT 5. Both use a persistent session
    (MQTT 5 clean_start=False + Session Expiry; 3.1.1 clean_session=False), QoS 1, TCP_NODELAY after every
    connect, and paho's reconnect with exponential backoff. `will()` returns the last will to register before
    each (re)connect. Callbacks run in paho's thread.
    """

    def __init__(self, broker_url: str, fleet_dir: str | Path, name: str, client_id: str, *,
                 on_connect: Callable[[], None], on_message: Callable[[str, bytes], None],
                 will: Callable[[], Publish] | None = None, session_expiry: int = 24 * 3600,
                 keepalive: int = 30, backoff: tuple[float, float] = (0.2, 10.0)) -> None:
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        url = urlparse(broker_url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname or not url.port:
            raise ValueError(f"broker_url must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {broker_url!r}")
        self.host, self.port, self.tls = url.hostname, url.port, url.scheme == "mqtts"
        self.v5 = self.tls
        self.keepalive = keepalive
        self._on_connect_cb, self._on_message_cb, self._will = on_connect, on_message, will
        self.connected = threading.Event()
        self.connects = 0
        self.publish_results: dict[int, object] = {}  # mid -> reason code (MQTT 5 tells "Not authorized")
        self._published = threading.Condition()
        if self.v5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=False)
        if self.tls:
            folder = Path(fleet_dir) / ("coordinator" if name == topics.COORDINATOR_NAME else f"devices/{name}")
            client.tls_set(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"),
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(*backoff)
        client.max_inflight_messages_set(100)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = lambda c, u, m: self._on_message_cb(m.topic, bytes(m.payload))
        client.on_publish = self._handle_publish
        self.session_expiry = session_expiry
        self.client = client

    def _set_will(self) -> None:
        if self._will is not None:
            will = self._will()
            self.client.will_set(will.topic, will.payload, qos=1, retain=will.retain)

    def start(self, timeout: float = 10.0) -> MqttTransport:
        self._set_will()
        kwargs = {}
        if self.v5:
            props = self._mqtt.Properties(self._mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            kwargs = {"clean_start": False, "properties": props}
        self.client.connect_async(self.host, self.port, self.keepalive, **kwargs)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.client.loop_stop()
            raise TimeoutError(f"could not connect to {self.host}:{self.port}")
        return self

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("connect refused: %s", reason_code)
            return
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        self.connected.set()
        self._on_connect_cb()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self._set_will()  # the next connect registers a fresh (round, seq) will

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._published:
            self.publish_results[mid] = reason_code
            self._published.notify_all()

    def subscribe(self, *topic_filters: str) -> None:
        self.client.subscribe([(t, 1) for t in topic_filters])

    def publish(self, message: Publish) -> int:
        """Queue a QoS 1 publish (paho sends it now, or after the reconnect); returns the message id."""
        return self.client.publish(message.topic, message.payload, qos=1, retain=message.retain).mid

    def wait_published(self, mid: int, timeout: float = 10.0):
        """The broker's PUBACK reason code for `mid` (None on timeout)."""
        with self._published:
            self._published.wait_for(lambda: mid in self.publish_results, timeout)
            return self.publish_results.get(mid)

    def drop_connection(self) -> None:
        """Tests: cut the TCP connection as a network failure would (paho then reconnects)."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kill(self) -> None:
        """Tests: vanish without DISCONNECT (the broker then publishes the last will)."""
        sock = self.client.socket()
        self.client.loop_stop()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass
        self.connected.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()


# --- the coordinator side ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceInfo:
    device: str  # device name (certificate CN / broker username)
    device_id: int  # topics.name_id(device)
    memory_budget: int
    plan_hash: bytes
    last_seen: float  # time.monotonic() of the last message from it
    online: bool  # False after its last will or LEAVE


@dataclass(frozen=True)
class DeviceReply:
    device: str
    round: int
    model_version: int  # the global version the device trained from
    delta: dict[str, np.ndarray]  # trainable buffer name -> integer delta
    num_examples: int
    metrics: dict[str, float]  # device-reported, e.g. {"loss": ..., "accuracy": ...}
    uplink_bytes: int  # MQTT payload bytes of the whole DELTA transfer (all chunks)


class CoordinatorLink:
    """The coordinator's single MQTT connection to the fleet (see docs/fleet_link.md). Thread-safe.

    Uplinks are reassembled, verified (signature, replay, decryption, topic ids) and turned into registry
    updates and DeviceReplies; a rejected message is logged with its reason, counted in `stats`, and changes
    nothing. Each (device, round) yields at most one reply. After a device reconnects (JOIN) or goes quiet
    mid-transfer, the link asks it for the missing chunks of its open uploads (ACK MISSING_CHUNKS).

    A restarted coordinator must neither reuse a downlink (round, seq) nonce nor accept an uplink it had seen:
    `replay_state()` / `load_replay_state()` carry both across a restart (the coordinator checkpoints them
    with each round), and downlink seqs also start at 16 x the seconds since 2024, which covers messages sent
    after the last checkpoint.
    """

    RESUME_IDLE_S = 0.5  # an open upload idle this long is asked for its missing chunks on the next STATUS

    def __init__(self, broker_url: str, fleet_dir: str | Path, plan: Plan, *, fleet: str,
                 chunk_size: int = 4096, client_id: str = "coordinator") -> None:
        if not chunking.MIN_CHUNK_PAYLOAD <= chunk_size <= chunking.MAX_CHUNK_PAYLOAD:
            raise ValueError(f"chunk_size is the MQTT payload per chunk: {chunking.MIN_CHUNK_PAYLOAD}.."
                             f"{chunking.MAX_CHUNK_PAYLOAD}")
        self.fleet_dir = Path(fleet_dir)
        self.plan = plan
        self.fleet = topics.check_name(fleet)
        self.chunk_size = chunk_size
        manifest = load_fleet(self.fleet_dir / "coordinator")
        if manifest["fleet"] != fleet:
            raise ValueError(f"{fleet_dir} holds fleet {manifest['fleet']!r}, not {fleet!r}")
        self._names = {v["id"]: name for name, v in manifest["devices"].items()}
        peers = {v["id"]: PublicIdentity.from_bytes(bytes.fromhex(v["public"])) for v in manifest["devices"].values()}
        identity = Identity.from_bytes((self.fleet_dir / "coordinator/identity.key").read_bytes())
        self._endpoint = CoordinatorEndpoint(manifest["fleet_id"], identity, peers)
        seq0 = max(0, int((time.time() - _SEQ_EPOCH) * 16)) & 0xFFFFFFFF
        self._endpoint.next_seq.update({device_id: seq0 for device_id in peers})
        self._reassembler = chunking.Reassembler(max_transfers=4 * len(peers) + 16, max_bytes=256 << 20, ttl=600.0)
        self._transfer_seen: dict[tuple, float] = {}
        self._lock = threading.RLock()
        self._replies_ready = threading.Condition(self._lock)
        self._registry: dict[str, DeviceInfo] = {}
        self._device_payload: dict[str, int] = {}  # the device's max MQTT payload from its JOIN
        self._versions: dict[str, int] = {}  # model version each device last said it holds
        self._sent = SentStates(plan)
        self._replies: list[DeviceReply] = []
        self._answered: set[tuple[str, int]] = set()
        self._acks: dict[tuple[str, int, int], list[Publish]] = {}  # (device, round, seq) -> ACK sent for a DELTA
        self._completed: dict[tuple[str, int], list[Publish]] = {}  # (device, transfer id) of finished uploads
        self._plan_hash = plan_hash(plan)
        self.stats: Counter = Counter()  # rejected:<reason>, duplicate_chunks, duplicate_messages, replies, ...
        self._transport = MqttTransport(broker_url, fleet_dir, topics.COORDINATOR_NAME, client_id,
                                        on_connect=self._connected, on_message=self._on_message)

    # --- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> CoordinatorLink:
        self._transport.start()
        return self

    def close(self) -> None:
        self._transport.close()

    def _connected(self) -> None:
        self._transport.subscribe(f"{topics.ROOT}/{self.fleet}/up/+", f"{topics.ROOT}/{self.fleet}/status/+")

    # --- the interface -----------------------------------------------------------------------------------
    def replay_state(self) -> dict:
        """What a restarted coordinator must not forget: the last (round, seq) accepted from every device stream,
        and the next downlink seq per device (so no nonce is reused). JSON-able; the coordinator checkpoints it."""
        with self._lock:
            return dict(replay=self._endpoint.replay.export(),
                        next_seq={str(k): v for k, v in self._endpoint.next_seq.items()})

    def load_replay_state(self, state: dict, status_streams: bool = True) -> None:
        """Take back a replay_state(). Without `status_streams` only the data streams (JOIN, DELTA, ACK, LEAVE):
        before connecting, so that an old DELTA the broker queued meanwhile is refused, while the retained
        STATUS messages the link had accepted before still register their devices (StateStore.restore_link)."""
        with self._lock:
            self._endpoint.replay.restore(state.get("replay", []), data_only=not status_streams)
            for device_id, seq in state.get("next_seq", {}).items():
                current = self._endpoint.next_seq.get(int(device_id), 0)
                self._endpoint.next_seq[int(device_id)] = max(current, int(seq))

    def devices(self, seen_within: float | None = None) -> list[DeviceInfo]:
        now = time.monotonic()
        with self._lock:
            infos = list(self._registry.values())
        if seen_within is not None:
            infos = [d for d in infos if now - d.last_seen <= seen_within]
        return sorted(infos, key=lambda d: d.device)

    def send_task(self, device: str, round: int, model_version: int,
                  global_state: dict[str, np.ndarray] | None, config: dict[str, float]) -> int:
        """TASK (and, if the device's version is not model_version, a GLOBAL_UPDATE of the changed channels
        before it) to one device; returns the downlink MQTT payload bytes."""
        device_id = topics.name_id(device)
        if device_id not in self._names:
            raise ValueError(f"{device} is not enrolled in fleet {self.fleet}")
        with self._lock:
            size = min(self.chunk_size, self._device_payload.get(device, self.chunk_size))
            messages = []
            update = None
            if global_state is not None:
                update = self._sent.update(self._versions.get(device), model_version, global_state)
            if update is not None:
                messages.append(self._endpoint.seal(update, device_id=device_id, round=round,
                                                    model_version=model_version))
            task = task_body(self.plan, self._plan_hash, config, size)
            messages.append(self._endpoint.seal(task, device_id=device_id, round=round, model_version=model_version))
            frames = [f for env in messages for f in chunking.split(env, self._transfer_id(env), size)]
            for frame in frames:
                self._transport.publish(Publish(topics.downlink(self.fleet, device), frame))
            self.stats["downlink_bytes"] += sum(map(len, frames))
            return sum(map(len, frames))

    def replies(self, timeout: float) -> list[DeviceReply]:
        """Replies verified since the last call; waits up to `timeout` s for the first one if there is none."""
        with self._replies_ready:
            self._replies_ready.wait_for(lambda: self._replies, timeout)
            out, self._replies = self._replies, []
            return out

    # --- internals ---------------------------------------------------------------------------------------
    @staticmethod
    def _transfer_id(envelope: bytes) -> int:
        return Header.unpack(envelope).seq  # unique per device and direction

    def _on_message(self, topic: str, frame: bytes) -> None:
        with self._lock:
            try:
                self._handle(topic, frame, time.monotonic())
            except ProtocolError as exc:
                self.stats[f"rejected:{exc.reason}"] += 1
                log.warning("rejected message on %s: %s", topic, exc)
            except Exception:  # a bug here must not kill paho's thread
                self.stats["rejected:internal-error"] += 1
                log.exception("error handling a message on %s", topic)

    def _handle(self, topic: str, frame: bytes, now: float) -> None:
        fleet, kind, device = topics.parse(topic)
        if fleet != self.fleet or kind not in ("up", "status"):
            raise ProtocolError("bad-topic", topic)
        if not frame:  # a cleared retained message
            return
        chunk = chunking.parse_chunk(frame)
        done = self._completed.get((device, chunk.transfer_id)) if chunk.count > 1 else None
        if done is not None:  # a chunk of an upload already complete: resent after a reconnect or a lost ACK
            self.stats["duplicate_chunks"] += 1
            if chunk.index == chunk.count - 1:
                for ack in done:
                    self._transport.publish(ack)
            return
        result = self._reassembler.accept(frame, now, device)
        if result.duplicate:
            self.stats["duplicate_chunks"] += 1
        if result.payload is None:
            if result.key in self._reassembler.open_transfers():
                self._transfer_seen[result.key] = now
            return
        self._transfer_seen.pop(result.key, None)
        envelope = result.payload
        header = Header.unpack(envelope)
        topics.check_topic_matches(topic, header.fleet_id, header.device_id)
        expected_kind = "status" if header.type == MessageType.STATUS else "up"
        if kind != expected_kind:
            raise ProtocolError("wrong-topic", f"{MessageType(header.type).name} on a {kind} topic")
        try:
            received = self._endpoint.open(envelope)
        except ProtocolError as exc:
            if exc.reason == "stale" and header.type == MessageType.DELTA:
                # open() verified the signature before it found the position old: this is the device's own DELTA,
                # accepted before a restart that lost its ACK. Without an ACK it would hold the upload forever.
                self._ack_delta(device, header)
            raise
        if received is None:
            self.stats["duplicate_messages"] += 1
            acks = self._acks.get((device, header.round, header.seq))
            if acks is not None:
                for ack in acks:
                    self._transport.publish(ack)  # the device did not get our ACK: send it again
            elif header.type == MessageType.DELTA:
                self._ack_delta(device, header)
            return
        header, body = received.header, received.body
        self._touch(device, header, now)
        if header.type == MessageType.JOIN:
            self._registry[device] = DeviceInfo(device, header.device_id, body.memory_budget_bytes, body.plan_hash,
                                                now, True)
            self._device_payload[device] = body.max_mqtt_payload
            if body.plan_hash != self._plan_hash:
                log.warning("%s runs a different training plan", device)
            self._request_missing(device, header, idle=0.0, now=now)
        elif header.type == MessageType.STATUS:
            online = body.state != DeviceState.OFFLINE
            self._registry[device] = _replace(self._registry[device], online=online)
            if online:
                self._request_missing(device, header, idle=self.RESUME_IDLE_S, now=now)
        elif header.type == MessageType.LEAVE:
            self._registry[device] = _replace(self._registry[device], online=False)
        elif header.type == MessageType.ACK:
            if body.status == AckStatus.REJECTED:
                self._versions.pop(device, None)  # it could not apply our update: next time send it whole
                log.warning("%s rejected %s (round %d)", device, MessageType(body.acked_type).name, header.round)
        elif header.type == MessageType.DELTA:
            self._delta(device, header, body, len(envelope) + chunk.count * chunking.CHUNK_HEADER_SIZE)

    def _touch(self, device: str, header: Header, now: float) -> None:
        info = self._registry.get(device)
        if info is None:
            info = DeviceInfo(device, header.device_id, 0, b"", now, True)
        last_will = header.type == MessageType.STATUS and header.flags & Flags.LAST_WILL
        self._registry[device] = _replace(info, last_seen=now, online=info.online if last_will else True)
        if header.type != MessageType.DELTA:
            self._versions[device] = header.model_version

    def _ack_delta(self, device: str, header: Header) -> None:
        """ACK OK for the DELTA at (round, seq), remembered so that a resend of it or of its chunks is ACKed again."""
        env = self._endpoint.seal(Ack(MessageType.DELTA, AckStatus.OK, header.seq), device_id=header.device_id,
                                  round=header.round, model_version=header.model_version)
        acks = self._downlink(device, env)
        self._acks[(device, header.round, header.seq)] = acks
        self._completed[(device, header.seq)] = acks  # device transfer ids are their envelope seqs
        if len(self._completed) > 4096:
            del self._completed[next(iter(self._completed))]
        if len(self._acks) > 4096:
            del self._acks[next(iter(self._acks))]

    def _delta(self, device: str, header: Header, body: Delta, uplink_bytes: int) -> None:
        delta, metrics = decode_update(self.plan, body)  # raises (before any state change) if it does not fit
        self._ack_delta(device, header)
        if (device, header.round) in self._answered:
            self.stats["duplicate_rounds"] += 1
            log.warning("%s sent a second DELTA for round %d; keeping the first", device, header.round)
            return
        self._answered.add((device, header.round))
        self.stats["replies"] += 1
        self._replies.append(DeviceReply(device, header.round, header.model_version, delta, body.num_examples,
                                         metrics, uplink_bytes))
        self._replies_ready.notify_all()

    def _request_missing(self, device: str, header: Header, idle: float, now: float) -> None:
        for source, transfer_id in self._reassembler.open_transfers():
            if source != device or now - self._transfer_seen.get((source, transfer_id), now) < idle:
                continue
            missing = self._reassembler.missing(source, transfer_id) or []
            for i in range(0, len(missing), 64):
                ack = Ack(MessageType.DELTA, AckStatus.MISSING_CHUNKS, 0, transfer_id, tuple(missing[i : i + 64]))
                env = self._endpoint.seal(ack, device_id=header.device_id, round=header.round,
                                          model_version=header.model_version)
                self._downlink(device, env)
                self.stats["missing_requests"] += 1

    def _downlink(self, device: str, envelope: bytes) -> list[Publish]:
        size = min(self.chunk_size, self._device_payload.get(device, self.chunk_size))
        out = [Publish(topics.downlink(self.fleet, device), f)
               for f in chunking.split(envelope, self._transfer_id(envelope), size)]
        for message in out:
            self._transport.publish(message)
        return out


def _replace(info: DeviceInfo, **changes) -> DeviceInfo:
    from dataclasses import replace

    return replace(info, **changes)
