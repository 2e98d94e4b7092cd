"""A device's model change and its wire form: the state algebra both ends share, the uplink pipeline, and the
DELTA and GLOBAL_UPDATE bodies (docs/protocol.md).

Tensor ids on the wire are indexes into plan.trainable_buffers(). A device state is dict[buffer name, array]
(int8 weight rows, int32 biases). A delta is int16 for weight rows (the difference of two int8 values spans
[-255, 255]) and int32 for biases, where it wraps modulo 2^32 so that apply_delta(base, state_delta(new, base))
== new always holds.

    uplink            the one place a device's DELTA is made: state delta, error feedback, clipping, [noise],
                      encoding (every engine's device calls it); uplink_delta is its steps before encoding,
                      which a device under secure aggregation masks instead (secagg.py)
    encode_update     the only way a DELTA body is built (plan buffers + numbers); decode_update its inverse
    global_update     the GLOBAL_UPDATE that brings a device from the version it holds to the new global state
                      (never larger than the FULL_STATE form)
    delta_limits      what a decoder may accept for this plan: nothing expands past the plan's trainable size
    max_*_bytes       the largest messages a device of this plan really sends and receives: its buffers
"""

from __future__ import annotations

import math

import numpy as np

from fedtiny.compiler import Plan
from fedtiny.protocol.delta import BLOB_HEADER, ENTRY_HEADER, DeltaEntry, DeltaLimits, encode_delta
from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, TAG_SIZE
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import MAX_ACK_MISSING, MAX_TASK_CONFIG, Ack, Delta, GlobalUpdate, Task
from fedtiny.protocol.noise import NoiseStream, add_noise

FULL_STATE = 0xFFFFFFFF  # GLOBAL_UPDATE.base_model_version: the entries replace every trainable buffer whole
METRICS_TENSOR_ID = 0xFFFF  # DELTA entry carrying device metrics: metric i = values[i] * scales[i]
# channel order of the metrics entry (loss travels in DELTA.train_loss); a device without a held-out part sends the
# first channel only
METRIC_NAMES = ("accuracy", "personal_accuracy")

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


def _row_square_sums(values: np.ndarray, rows: int) -> list[int]:
    """Per row (axis 0), the exact integer sum of the squared values."""
    flat = np.asarray(values).reshape(rows, -1)
    if flat.dtype.itemsize <= 2:  # int16 deltas: each square < 2^31, a row sums exactly in int64
        return (flat.astype(np.int64) ** 2).sum(axis=1).tolist()
    return [sum(v * v for v in row) for row in flat.tolist()]  # int32: Python ints, never overflow


def delta_norm(delta: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> float:
    """The L2 norm in real units of an integer delta whose rows have these scales (row_scales), computed as the C
    node computes it (clip_delta says how): what clipping bounds."""
    squares = 0.0
    for name, row_scale in scales.items():
        for scale, rowsum in zip(np.asarray(row_scale, np.float64).tolist(),
                                 _row_square_sums(delta[name], len(row_scale))):
            squares += scale * scale * float(rowsum)
    return math.sqrt(squares)


def clip_delta(delta: dict[str, np.ndarray], scales: dict[str, np.ndarray], clip_norm: float
               ) -> dict[str, np.ndarray]:
    """The delta scaled down so that its L2 norm in real units is at most clip_norm (unchanged if already, or
    if clip_norm is 0 or NaN).

    Bounds what one device can move the model in a round (poisoning, and the sensitivity DP noise is
    calibrated to). Integers are truncated toward zero, so the clipped norm never exceeds clip_norm.

    The norm is computed so that a C node gets the same bits (no pairwise summation): per row the exact
    integer sum of squares, then a sequential float64 sum over the buffers (in `scales` order, the plan's)
    and their rows of scale * scale * float(rowsum), then sqrt; factor = clip_norm / norm, each value
    trunc(value * factor) in float64 (device_runtime/c/fedtiny_wire.c does exactly this)."""
    if not clip_norm > 0:
        return delta
    norm = delta_norm(delta, scales)
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
    state is not known or the differences would take more bytes. Differences, not new values: a round moves
    most weights by a few LSB (int4 on the wire) and biases by far less than their int32 range, so this halves
    the downlink. But a weight that moved by more than 127 LSB differs by an int16, so after many rounds the
    differences can exceed the values; never sending more than FULL_STATE bounds what a device must take
    (max_downlink_bytes). The sizes compared are the blobs' undeflated ones, what a C node receives."""
    full = GlobalUpdate(FULL_STATE, state_entries(plan, global_state))
    if held is None or base is None:
        return full
    change = GlobalUpdate(held, state_entries(plan, state_delta(global_state, base), skip_zero=True, narrow=True))
    return full if len(change.encode(compress=False)) > len(full.encode(compress=False)) else change


class SentStates:
    """The global states sent to devices, by model version (the newest `keep`): the bases from which a
    coordinator's link sends each device only what changed since the version it holds."""

    def __init__(self, plan: Plan, keep: int = 8) -> None:
        self.plan, self.keep = plan, keep
        self._states: dict[int, dict[str, np.ndarray]] = {}
        # (held, version) -> the GLOBAL_UPDATE between them: a round sends the same one to every device that holds
        # the same version (50 encodings of it per round in the default simulation: a tenth of its coordinator's profile)
        self._updates: dict[tuple[int | None, int], GlobalUpdate] = {}

    def update(self, held: int | None, version: int, state: dict[str, np.ndarray]) -> GlobalUpdate | None:
        """Remember `state` as `version`; the GLOBAL_UPDATE for a device holding `held`, None if that is it."""
        known = self._states.get(version)
        if known is None or known.keys() != state.keys() or \
                not all(np.array_equal(known[k], v) for k, v in state.items()):
            self._states[version] = {k: np.asarray(v).copy() for k, v in state.items()}
            self._updates = {key: u for key, u in self._updates.items() if version not in key}
        for old in sorted(self._states)[: -self.keep]:
            del self._states[old]
            self._updates = {key: u for key, u in self._updates.items() if old not in key}
        if held == version:
            return None
        base = self._states.get(held) if held is not None else None
        key = (held if base is not None else None, version)
        if key not in self._updates:
            self._updates[key] = global_update(self.plan, self._states[version], held, base)
        return self._updates[key]


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
                  accuracy: float, personal_accuracy: float | None = None) -> Delta:
    """The DELTA body from a delta over the plan's trainable buffers and three or four numbers, and nothing else.

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
    entries = state_entries(plan, delta, skip_zero=True, narrow=True)
    return Delta(num_examples, loss, entries + [_metrics_entry(accuracy, personal_accuracy)])


def _metrics_entry(accuracy: float, personal_accuracy: float | None = None) -> DeltaEntry:
    """Metric i = 1 * scale i: int4 ones with a scale per channel (one channel: a per-tensor scale)."""
    metrics = [accuracy] if personal_accuracy is None else [accuracy, float(personal_accuracy)]
    return DeltaEntry(METRICS_TENSOR_ID, 0, np.ones((len(metrics), 1), np.int8), np.array(metrics, np.float32))


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



# --- the uplink pipeline: every engine's device makes its DELTA here ---------------------------------------

def uplink(plan: Plan, base: dict[str, np.ndarray], trained: dict[str, np.ndarray],
           carry: dict[str, np.ndarray] | None, *, keep: float, clip_norm: float, num_examples: int,
           loss: float, accuracy: float, personal_accuracy: float | None = None, noise_sigma: float = 0.0,
           noise: NoiseStream | None = None) -> tuple[Delta, dict[str, np.ndarray]]:
    """The round's DELTA body and the change kept back for the next round, from the state a device trained
    from (`base`) and the state training left (`trained`). In order:

        1. state delta      trained - base, per trainable buffer
        2. error feedback   plus last round's carry; the largest `keep` share is sent, the rest carried
        3. clipping         the sent part's L2 norm in real units is at most clip_norm; what clipping cuts is
                            dropped, not carried, so no round's upload exceeds clip_norm
        4. noise            differential privacy (noise_sigma > 0, real units): discrete Gaussian integers on
                            every element, from the device's secret stream `noise` (protocol/noise.py); the
                            DELTA is then dense
        5. [mask]           secure aggregation: steps 1-4 are uplink_delta, and the device masks that whole
                            (secagg.SecAggDevice.masked) instead of encoding it here
        6. encoding         bitmap-sparse int8/int4 entries (encode_update)
    """
    sent, carry = uplink_delta(plan, base, trained, carry, keep=keep, clip_norm=clip_norm,
                               noise_sigma=noise_sigma, noise=noise)
    return encode_update(plan, sent, num_examples, loss, accuracy, personal_accuracy), carry


def uplink_delta(plan: Plan, base: dict[str, np.ndarray], trained: dict[str, np.ndarray],
                 carry: dict[str, np.ndarray] | None, *, keep: float, clip_norm: float, noise_sigma: float = 0.0,
                 noise: NoiseStream | None = None, noise_limits: dict[str, int] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Steps 1-4 of uplink: the integer delta to send and the carry. noise_limits: secure aggregation's value
    bounds, which the noised values are clamped to instead of a DELTA's (noise.add_noise)."""
    sent, carry = split_uplink(state_delta(trained, base), carry, keep)
    scales = row_scales(plan)
    sent = clip_delta(sent, scales, clip_norm)
    if noise_sigma > 0:
        if noise is None:
            raise ValueError("uplink noise needs the device's noise stream")
        sent = add_noise(sent, scales, noise_sigma, noise, noise_limits)
    return sent, carry


# --- what a decoder may accept for a plan ------------------------------------------------------------------

def delta_limits(plan: Plan) -> DeltaLimits:
    """The largest DELTA or GLOBAL_UPDATE blob this plan can legitimately need: one entry per trainable buffer
    plus the metrics entry, each dense in int32 with a bitmap and per-channel scales. A decoder given these
    limits cannot be made to allocate more than a small multiple of the plan's trainable size."""
    body = elements = 0
    for name in plan.trainable_buffers():
        shape = plan.buffers[name].shape
        n = int(np.prod(shape))
        body += ENTRY_HEADER.size + 4 * shape[0] + 4 * ((n + 31) // 32) + 4 * n
        elements += n
    body += ENTRY_HEADER.size + 8 * len(METRIC_NAMES)
    elements += len(METRIC_NAMES)
    return DeltaLimits(max_body=body, max_entries=len(plan.trainable_buffers()) + 1, max_elements=elements)


def max_message_bytes(plan: Plan) -> int:
    """The coordinator's bound on any envelope of this plan: a dense int32 DELTA or GLOBAL_UPDATE (with header,
    signature, AEAD tag and blob header) or a TASK with its largest config. A device's own buffers are the
    tighter max_delta_envelope_bytes and downlink_reassembly_bytes."""
    delta = Delta.LAYOUT.size + BLOB_HEADER.size + delta_limits(plan).max_body
    return HEADER_SIZE + max(delta, Task.LAYOUT.size + MAX_TASK_CONFIG) + TAG_SIZE + SIGNATURE_SIZE


# --- the largest messages a device really sends and receives: what its buffers must hold -------------------

def _envelope_bytes(body: int, encrypted: bool) -> int:
    return HEADER_SIZE + body + (TAG_SIZE if encrypted else 0) + SIGNATURE_SIZE


def _whole_entries_bytes(plan: Plan, widths: dict[str, int]) -> int:
    """Entries carrying every trainable buffer whole, buffer `name` in elements of widths[name] bytes."""
    return sum(ENTRY_HEADER.size + -(-widths[name] * int(np.prod(plan.buffers[name].shape)) // 4) * 4
               for name in plan.trainable_buffers())


def max_delta_body_bytes(plan: Plan) -> int:
    """The largest DELTA body `uplink` can make for this plan: every trainable buffer whole in its widest delta
    type (int16 for weights, since delta plus carry past int16 is refused; int32 for biases), plus the metrics
    entry. An entry is a bitmap only where that is smaller, so no buffer's entry exceeds its whole form; a
    round that changes every element, some weight by more than 127 LSB, reaches the bound. The C node's
    fedtiny_wire_uplink_bytes_max is the same number."""
    widths = {n: _delta_dtype(np.dtype(plan.buffers[n].dtype)).itemsize for n in plan.trainable_buffers()}
    metrics = len(encode_delta([_metrics_entry(0.0, 0.0)], compress=False)) - BLOB_HEADER.size
    return Delta.LAYOUT.size + BLOB_HEADER.size + _whole_entries_bytes(plan, widths) + metrics


def max_delta_envelope_bytes(plan: Plan) -> int:
    """The largest sealed DELTA: the device's upload buffer."""
    return _envelope_bytes(max_delta_body_bytes(plan), encrypted=True)


def _max_global_update_envelope(plan: Plan) -> int:
    """The FULL_STATE GLOBAL_UPDATE, every buffer whole in its own type (int8 weights, int32 biases): the largest
    one global_update sends."""
    widths = {n: np.dtype(plan.buffers[n].dtype).itemsize for n in plan.trainable_buffers()}
    body = GlobalUpdate.LAYOUT.size + BLOB_HEADER.size + _whole_entries_bytes(plan, widths)
    return _envelope_bytes(body, encrypted=True)


MAX_TASK_ENVELOPE = _envelope_bytes(Task.LAYOUT.size + MAX_TASK_CONFIG, encrypted=False)
MAX_ACK_ENVELOPE = _envelope_bytes(Ack.LAYOUT.size + 4 * MAX_ACK_MISSING, encrypted=False)


def max_downlink_bytes(plan: Plan) -> int:
    """The largest envelope a device of this plan is ever sent (a FULL_STATE GLOBAL_UPDATE, a TASK with its
    largest config, or an ACK listing the most missing chunks): a device refuses a larger one as oversized.
    The C node's fedtiny_node_max_downlink_bytes is the same number."""
    return max(_max_global_update_envelope(plan), MAX_TASK_ENVELOPE, MAX_ACK_ENVELOPE)


def downlink_reassembly_bytes(plan: Plan) -> int:
    """A device's reassembly quota: the largest GLOBAL_UPDATE and, behind it, the largest TASK (a round's two
    downlinks, which may interleave), the bytes of both open transfers together."""
    return _max_global_update_envelope(plan) + MAX_TASK_ENVELOPE
