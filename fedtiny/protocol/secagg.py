"""Secure aggregation over the fleet link (SecAgg+, Bonawitz et al. CCS'17 and Bell et al. CCS'20): the coordinator
learns the sum of a round's clipped integer deltas and nothing about any one of them. Sans-IO: SecAggDevice is a
device's part of one round, SecAggRound the coordinator's; both take message bodies and return message bodies.

Stages of a round (message layouts in docs/protocol.md, "Secure aggregation"):

    TASK (flag TASK_MASKED)  -> device: SECAGG_KEYS     its round keys c_pk, s_pk and a commitment to its self-mask
                                                        seed, signed with its identity key
    SECAGG_PEERS             -> device: SECAGG_SHARES   the coordinator sends each device its neighbours' signed keys
                                                        (a random graph of degree O(log n) over those that sent keys);
                                                        the device Shamir-shares its self-mask seed and its pairwise
                                                        key s_sk among them, each share encrypted to one neighbour
    SECAGG_RELAY             -> device: masked DELTA    the shares addressed to it; once trained, the device sends its
                                                        clipped delta + self mask + pairwise masks in Z/2^k
    SECAGG_UNMASK            -> device: SECAGG_REVEAL   which neighbours survived and which dropped: shares of the
                                                        survivors' self-mask seeds and of the dropped ones' s_sk,
                                                        never both for one neighbour

The coordinator then sums the masked vectors, removes the survivors' self masks and the pairwise masks survivors
shared with dropped devices, and holds the sum: a device that drops after masking costs nothing but its own
contribution, as long as every survivor and every dropped device keeps `threshold` surviving neighbours.

Primitives: X25519, ChaCha20 and ChaCha20-Poly1305 from `cryptography`; Shamir's sharing over pycryptodome's
GF(2^128) (16-byte secrets: the 32-byte s_sk is shared as two halves; a device's shares and the coordinator's
reconstruction of a round's secrets are computed in numpy in pycryptodome's field, shamir_split and shamir_combine
below, and checked against pycryptodome's Shamir); key derivation in the envelope's HKDF
shape with keyed BLAKE2b (hashlib), as a node has it in Monocypher (a node computes no SHA-256). A device's round
secrets are derived from its identity secret, the run and the round. A device keeps its round across a restart
(SecAggDevice.export, persisted whenever the round changes, before any reply it made leaves): restarted, it
answers the round's later stages as if it had not been, and since the masked DELTA is persisted with the round
answered before it leaves, it never sends a second, different masked value for one round (two would give away
the difference of the two deltas).

The moduli: element values of buffer b lie in [-B_b, B_b] (clipping bounds every element by clip_norm / scale;
device noise is clamped NOISE_TAIL standard deviations out, with probability at most 2 e^-72 = 1.1e-31 per element,
which the DP accounting adds to its delta: fedtiny/privacy.py, DistributedLedger.clamp_delta), so the sum
over at most `cohort` devices lies in [-cohort * B_b, cohort * B_b], and k_b = bit_length(2 * cohort * B_b)
bits hold it without wrapping (2^k_b > 2 * cohort * B_b). Devices are weighted equally (the FedAvg mean of the
survivors' deltas), as under differential privacy.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedtiny.compiler import Plan
from fedtiny.protocol.envelope import HEADER_SIZE, SIGNATURE_SIZE, TAG_SIZE, Identity, PublicIdentity
from fedtiny.protocol.errors import ProtocolError
from fedtiny.protocol.messages import (
    REVEAL_PAIRWISE_KEY, REVEAL_SELF_MASK, SECAGG_MAX_NEIGHBOURS, MaskedDelta, SecAggKeys, SecAggPeer,
    SecAggPeers, SecAggRelay, SecAggReveal, SecAggShares, SecAggUnmask,
)
from fedtiny.protocol.noise import NoiseStream, row_sigma2, uniform_below
from fedtiny.protocol.update import row_scales

LABEL = b"fedtiny/secagg/v1"
NOISE_TAIL = 12  # device noise is clamped to this many standard deviations (P[|N| > 12 sigma] <= 2 e^-72)
DEGREE_FACTOR = 6  # neighbour graph degree: DEGREE_FACTOR * ceil(log2 n), even, at most n - 1 and 64
MAX_COMBINATIONS = 256  # share subsets tried when some shares are wrong
# Trainable buffers a masked delta may have: the C node keeps a value bound and a modulus per buffer in its RAM
# (FEDTINY_NODE_SECAGG_MAX_BUFFERS in device_runtime/c/fedtiny_node_secagg.h, 5 B each), and both kinds of device
# refuse a masked TASK of a plan with more, as the host refuses --secagg with one (check_plan). The zoo's largest
# plan, mobilenet with every layer trained, has 34.
MAX_MASKED_BUFFERS = 64
_SHARE_PLAIN = struct.Struct("<IIHH16s16s16s")  # from | to | index | reserved | b share | s_sk share lo | hi
_RAW = serialization.Encoding.Raw


# --- derivations -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundContext:
    """What binds every secret and signature to one round of one run of one fleet."""

    fleet_id: int
    run: int
    round: int

    def info(self, kind: bytes, *ids: int) -> bytes:
        return LABEL + b"/" + kind + struct.pack(f"<III{len(ids)}I", self.fleet_id, self.run, self.round, *ids)


def kdf(secret: bytes, info: bytes) -> bytes:
    """32 bytes from a secret: the envelope's HKDF shape (envelope.derive_key) with keyed BLAKE2b."""
    prk = hashlib.blake2b(secret, digest_size=64, key=LABEL).digest()
    return hashlib.blake2b(info + b"\x01", digest_size=32, key=prk).digest()


def _x25519(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _agree(own: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # an all-zero shared secret: a small-order public key
        raise ProtocolError("bad-key", "X25519 agreement with a small-order public key") from None


def commitment(b_seed: bytes) -> bytes:
    return hashlib.blake2b(b_seed, digest_size=32, key=LABEL + b"/commit").digest()


def keys_message(ctx: RoundContext, device_id: int, c_pk: bytes, s_pk: bytes, b_commit: bytes) -> bytes:
    """What a device signs in SECAGG_KEYS."""
    return ctx.info(b"keys", device_id) + c_pk + s_pk + b_commit


@dataclass(frozen=True)
class RoundSecrets:
    """A device's secrets for one round: c_sk (share encryption), s_sk (pairwise masks), the self-mask seed, and the
    key its Shamir coefficients are drawn with (shamir_split)."""

    c_sk: bytes
    s_sk: bytes
    b_seed: bytes
    shamir_key: bytes

    @classmethod
    def derive(cls, identity: Identity, ctx: RoundContext, device_id: int) -> RoundSecrets:
        root = hashlib.blake2b(ctx.info(b"secrets", device_id), digest_size=64,
                               key=identity.to_bytes()[:64]).digest()
        part = lambda kind: hashlib.blake2b(kind, digest_size=32, key=root).digest()  # noqa: E731
        return cls(part(b"c"), part(b"s"), part(b"b")[:16], part(b"shamir"))

    # c_sk and s_sk as key objects, made once: a round agrees with each neighbour's keys more than once
    c_key = cached_property(lambda self: _x25519(self.c_sk))
    s_key = cached_property(lambda self: _x25519(self.s_sk))

    def keys(self, identity: Identity, ctx: RoundContext, device_id: int) -> SecAggKeys:
        c_pk, s_pk, b_commit = _public(self.c_key), _public(self.s_key), commitment(self.b_seed)
        return SecAggKeys(c_pk, s_pk, b_commit, identity.sign(keys_message(ctx, device_id, c_pk, s_pk, b_commit)))


def check_keys(identity: PublicIdentity, ctx: RoundContext, device_id: int, keys: SecAggKeys) -> None:
    if not identity.verify(keys.signature, keys_message(ctx, device_id, keys.c_pk, keys.s_pk, keys.b_commit)):
        raise ProtocolError("bad-signature", f"SECAGG_KEYS of device {device_id:#010x} not signed by it")


# --- the neighbour graph -----------------------------------------------------------------------------------

def graph_degree(n: int) -> int:
    """Neighbours per device in a cohort of n: every other device up to n = 37, then 6 ceil(log2 n), at most 64."""
    if n <= 1:
        return 0
    wanted = DEGREE_FACTOR * math.ceil(math.log2(n))
    return min(n - 1, wanted + wanted % 2, SECAGG_MAX_NEIGHBOURS)


def threshold(degree: int) -> int:
    """Shares that reconstruct a secret: a strict majority of a device's neighbours, so that no coordinator can
    collect both a device's self-mask seed and its pairwise key from honest neighbours (each reveals one kind)."""
    return degree // 2 + 1


def neighbour_graph(ids: list[int], seed: bytes, degree: int) -> dict[int, tuple[int, ...]]:
    """A Harary graph over a seeded permutation of the cohort (SecAgg+): each device's neighbours are the
    degree/2 nearest on either side of it on a ring, the ring's order drawn from a ChaCha20 stream keyed by the
    round's graph seed; complete when degree >= n - 1."""
    ids = sorted(set(ids))
    n = len(ids)
    if degree >= n - 1:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    stream = NoiseStream(seed, 0, 0)
    ring = list(ids)
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = uniform_below(stream, i + 1)
        ring[i], ring[j] = ring[j], ring[i]
    half = degree // 2
    out = {}
    for p, i in enumerate(ring):
        out[i] = tuple(sorted({ring[(p + k) % n] for k in range(-half, half + 1) if k}))
    return out


# --- moduli and masks --------------------------------------------------------------------------------------

def value_bounds(plan: Plan, clip_norm: float, noise_sigma: float = 0.0) -> dict[str, int]:
    """Per trainable buffer, B: every element of a clipped (and noised, then clamped) delta lies in [-B, B]: the
    clipped delta's bound (clip_norm / scale, at most 255 for a weight) plus NOISE_TAIL noise standard deviations,
    so that the clamp almost never cuts the noise (distributed DP accounts for unclamped discrete Gaussians): per
    row NOISE_TAIL * (isqrt(s) + 1) LSB for its noise variance s (noise.row_sigma2), at least 12 standard deviations."""
    if not clip_norm > 0:
        raise ValueError("secure aggregation needs a clip norm: it bounds what the sum must hold")
    out = {}
    for name, scales in row_scales(plan).items():
        limit = 255 if np.dtype(plan.buffers[name].dtype) == np.int8 else 2**31 - 1
        rows = [min(limit, math.floor(clip_norm / s) + 1) +
                (NOISE_TAIL * (math.isqrt(row_sigma2(noise_sigma, s)) + 1) if noise_sigma > 0 else 0)
                for s in np.asarray(scales, np.float64).tolist()]
        out[name] = min(2**31 - 1, max(rows))
    return out


def modulus_bits(bounds: dict[str, int], cohort: int) -> tuple[int, ...]:
    """k per buffer: 2^k > 2 * cohort * B, so a sum of `cohort` values in [-B, B] never wraps in Z/2^k."""
    bits = tuple((2 * cohort * b).bit_length() for b in bounds.values())
    if cohort < 1 or max(bits, default=0) > 32:
        raise ValueError(f"a cohort of {cohort} with these bounds needs more than 32 bits per value")
    return bits


def _keystream_words(key: bytes, count: int) -> np.ndarray:
    """count uint32 words (little-endian) of the ChaCha20 keystream of a 32-byte key, nonce 0, counter 0."""
    cipher = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(cipher.update(bytes(4 * count)), "<u4")


def expand_mask(key: bytes, sizes: list[int], bits: tuple[int, ...]) -> list[np.ndarray]:
    """A mask per buffer: one keystream word per element, in plan order, reduced mod 2^k of its buffer."""
    words = _keystream_words(key, sum(sizes)).astype(np.uint64)
    out, start = [], 0
    for size, k in zip(sizes, bits):
        out.append(words[start:start + size] & np.uint64((1 << k) - 1))
        start += size
    return out


def pairwise_key(own_s_sk: X25519PrivateKey, peer_s_pk: bytes, ctx: RoundContext, a: int, b: int) -> bytes:
    return kdf(_agree(own_s_sk, peer_s_pk), ctx.info(b"mask", min(a, b), max(a, b)))


def self_mask_key(b_seed: bytes, ctx: RoundContext, device_id: int) -> bytes:
    return kdf(b_seed, ctx.info(b"self", device_id))


def pack_values(values: list[np.ndarray], bits: tuple[int, ...]) -> bytes:
    """Each buffer's k-bit values LSB first, the buffer zero-padded to 4 bytes."""
    out = []
    for v, k in zip(values, bits):
        raw = np.unpackbits(np.asarray(v, "<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :k]
        packed = np.packbits(raw.reshape(-1), bitorder="little").tobytes()
        out.append(packed + bytes(-len(packed) % 4))
    return b"".join(out)


def unpack_values(packed: bytes, sizes: list[int], bits: tuple[int, ...]) -> list[np.ndarray]:
    lengths = [-(-size * k // 8) for size, k in zip(sizes, bits)]
    if len(packed) != sum(n + -n % 4 for n in lengths):
        raise ProtocolError("bad-masked", f"masked values of {len(packed)} bytes, expected "
                                          f"{sum(n + -n % 4 for n in lengths)}")
    out, start = [], 0
    for size, k, n in zip(sizes, bits, lengths):
        chunk = np.frombuffer(packed, np.uint8, n, start)
        raw = np.unpackbits(chunk, bitorder="little")
        if raw[size * k:].any() or any(packed[start + n:start + n + -n % 4]):
            raise ProtocolError("bad-masked", "padding bits set")
        digits = raw[:size * k].reshape(size, k).astype(np.uint64)
        out.append((digits << np.arange(k, dtype=np.uint64)).sum(axis=1, dtype=np.uint64))
        start += n + -n % 4
    return out


# --- shares ------------------------------------------------------------------------------------------------

def share_key(own_c_sk: X25519PrivateKey, peer_c_pk: bytes, ctx: RoundContext, sender: int, receiver: int) -> bytes:
    return kdf(_agree(own_c_sk, peer_c_pk), ctx.info(b"share", sender, receiver))


def seal_share(key: bytes, ctx: RoundContext, sender: int, receiver: int, index: int, b: bytes, s_lo: bytes,
               s_hi: bytes) -> bytes:
    plain = _SHARE_PLAIN.pack(sender, receiver, index, 0, b, s_lo, s_hi)
    return ChaCha20Poly1305(key).encrypt(bytes(12), plain, ctx.info(b"share-aad", sender, receiver))


def open_share(key: bytes, ctx: RoundContext, sender: int, receiver: int, ciphertext: bytes
               ) -> tuple[int, bytes, bytes, bytes]:
    try:
        plain = ChaCha20Poly1305(key).decrypt(bytes(12), ciphertext, ctx.info(b"share-aad", sender, receiver))
    except InvalidTag:
        raise ProtocolError("bad-share", f"share from {sender:#010x} does not decrypt") from None
    got_sender, got_receiver, index, reserved, b, s_lo, s_hi = _SHARE_PLAIN.unpack(plain)
    if (got_sender, got_receiver, reserved) != (sender, receiver, 0) or not 1 <= index <= SECAGG_MAX_NEIGHBOURS:
        raise ProtocolError("bad-share", f"share from {sender:#010x} names another pair or index {index}")
    return index, b, s_lo, s_hi


def shamir_split(key: bytes, secrets: list[bytes], t: int, n: int) -> list[list[bytes]]:
    """Per 16-byte secret, its shares at indexes 1..n of a polynomial of degree t - 1 over pycryptodome's field
    (Shamir.combine reconstructs it from any t), evaluated for all secrets and indexes together by Horner's rule in
    numpy (pycryptodome's Shamir.split, pure Python, was most of a device's CPU per round). The coefficient of degree
    d of secret number w is BLAKE2b-128(key, bytes([w, d])): the C node's fedtiny_secagg_share, so a Python device and
    a C node of one identity make the same shares, and a restarted device makes them again."""
    which = np.repeat(np.arange(len(secrets)), n)
    index = np.tile(np.arange(1, n + 1), len(secrets))
    y = np.zeros((len(which), _GF_BITS), np.uint8)
    for degree in range(t - 1, 0, -1):
        coefficients = _elements_to_bits([hashlib.blake2b(bytes([w, degree]), digest_size=16, key=key).digest()
                                          for w in range(len(secrets))])
        y = _gf_mul_small(y ^ coefficients[which], index)
    shares = _bits_to_elements(y ^ _elements_to_bits(secrets)[which])
    return [shares[w * n:(w + 1) * n] for w in range(len(secrets))]


# --- a device's round --------------------------------------------------------------------------------------

def check_plan(plan: Plan) -> None:
    """ValueError (one line) when a device cannot mask this plan's deltas: more than MAX_MASKED_BUFFERS trainable
    buffers."""
    count = len(plan.trainable_buffers())
    if count > MAX_MASKED_BUFFERS:
        raise ValueError(f"the plan trains {count} buffers and secure aggregation masks at most {MAX_MASKED_BUFFERS} "
                         f"(a node keeps a bound and a modulus per buffer): choose a scheme that trains fewer layers")


def _buffer_sizes(plan: Plan) -> list[int]:
    return [int(np.prod(plan.buffers[n].shape)) for n in plan.trainable_buffers()]


class SecAggDevice:
    """One device's part of one secure-aggregation round. Each method checks what it is given whole before it
    changes anything and raises ProtocolError on anything malformed or hostile; a device that refuses a stage
    simply does not answer (to the coordinator it is a dropout). The cryptographic steps are methods of their own
    (the section at the end): fedtiny_device.csecagg.CSecAggDevice runs these same stage checks over the C node's
    steps by overriding those alone."""

    def __init__(self, plan: Plan, identity: Identity, device_id: int, ctx: RoundContext,
                 peers: Mapping[int, PublicIdentity], clip_norm: float, noise_sigma: float = 0.0,
                 min_survivors: int = 0) -> None:
        self.plan, self.identity, self.device_id, self.ctx = plan, identity, device_id, ctx
        # distributed DP: its noise is calibrated for at least this many survivors (the TASK's min_survivors)
        self.min_survivors = min_survivors
        self.peers = peers  # the public identities of the devices it may be given as neighbours
        self.clip_norm, self.noise_sigma = clip_norm, noise_sigma
        self.bounds = self._value_bounds(clip_norm, noise_sigma)
        self.secrets = self._derive()
        self.neighbours: dict[int, SecAggKeys] = {}
        self.cohort = self.threshold = 0
        # shares received, by sender (U2 neighbours): the share index and b | s_sk low | s_sk high, 16 bytes each
        self.held: dict[int, tuple[int, bytes]] = {}
        self.masked_sent = False
        self.revealed: SecAggUnmask | None = None
        self._reveal: SecAggReveal | None = None
        # moves whenever what export holds changes (peers answered, relay taken, masked DELTA made, reveal made): the
        # session persists the round then, as the C node's `changes` (fedtiny_node_secagg.h)
        self.changes = 0

    # --- across a restart (device.NodeState.secagg) ---

    def export(self) -> bytes:
        """What a restarted device needs to answer the round's later stages: the round, its settings, the neighbours'
        signed keys, the shares held, whether it masked and what it revealed. Its secrets are not in it: they are
        derived again from its identity (restore)."""
        return json.dumps(dict(
            fleet_id=self.ctx.fleet_id, run=self.ctx.run, round=self.ctx.round, clip_norm=self.clip_norm,
            noise_sigma=self.noise_sigma, min_survivors=self.min_survivors, cohort=self.cohort,
            threshold=self.threshold, neighbours=[[v, k.encode().hex()] for v, k in self.neighbours.items()],
            held=[[v, i, share.hex()] for v, (i, share) in self.held.items()], masked_sent=self.masked_sent,
            revealed=None if self.revealed is None else [list(self.revealed.survivors), list(self.revealed.dropped)],
        ), separators=(",", ":")).encode()

    @staticmethod
    def restore(data: bytes, plan: Plan, identity: Identity, device_id: int,
                peers: Mapping[int, PublicIdentity]) -> SecAggDevice:
        """The round export() wrote, for the device of this identity."""
        d = json.loads(data)
        ctx = RoundContext(d["fleet_id"], d["run"], d["round"])
        out = SecAggDevice(plan, identity, device_id, ctx, peers, d["clip_norm"], d["noise_sigma"], d["min_survivors"])
        out.cohort, out.threshold, out.masked_sent = d["cohort"], d["threshold"], d["masked_sent"]
        out.neighbours = {v: SecAggKeys.decode(bytes.fromhex(k)) for v, k in d["neighbours"]}
        out.held = {v: (i, bytes.fromhex(share)) for v, i, share in d["held"]}
        if d["revealed"] is not None:
            out.revealed = SecAggUnmask(tuple(d["revealed"][0]), tuple(d["revealed"][1]))
            out._reveal = out._reveal_of(out.revealed)
        return out

    def keys(self) -> SecAggKeys:
        return self.secrets.keys(self.identity, self.ctx, self.device_id)

    def on_peers(self, body: SecAggPeers) -> SecAggShares:
        if self.neighbours:
            raise ProtocolError("bad-stage", "SECAGG_PEERS twice in a round")
        ids = [p.device_id for p in body.peers]
        if len(set(ids)) != len(ids) or self.device_id in ids or not ids:
            raise ProtocolError("bad-peers", "neighbours repeated, missing, or this device itself")
        if not threshold(len(ids)) <= body.threshold <= len(ids) or body.cohort < len(ids) + 1:
            raise ProtocolError("bad-threshold", f"threshold {body.threshold} of {len(ids)} neighbours, cohort "
                                                 f"{body.cohort}: at least a strict majority is required")
        self._modulus_bits(body.cohort)  # bad-cohort if the sum would not fit
        for peer in body.peers:
            identity = self.peers.get(peer.device_id)
            if identity is None:
                raise ProtocolError("unknown-peer", f"neighbour {peer.device_id:#010x} is not in this device's fleet")
            self._check_keys(identity, peer.device_id, peer.keys)
        keys = {p.device_id: p.keys for p in body.peers}
        out = self._sealed_shares(body.threshold, {v: keys[v].c_pk for v in sorted(ids)})
        self.neighbours, self.cohort, self.threshold = keys, body.cohort, body.threshold
        self.changes += 1
        return SecAggShares(tuple(out))

    def on_relay(self, body: SecAggRelay) -> None:
        if not self.neighbours or self.held:
            raise ProtocolError("bad-stage", "SECAGG_RELAY before SECAGG_PEERS, or twice")
        senders = [v for v, _ in body.shares]
        if len(set(senders)) != len(senders) or not set(senders) <= set(self.neighbours):
            raise ProtocolError("bad-relay", "shares from devices that are not this device's neighbours")
        if len(senders) < self.threshold:
            raise ProtocolError("too-few-neighbours", f"{len(senders)} neighbours shared keys, threshold "
                                                      f"{self.threshold}")
        self.held = {v: self._open_share(v, self.neighbours[v].c_pk, ciphertext) for v, ciphertext in body.shares}
        self.changes += 1

    @property
    def ready(self) -> bool:
        """The relay came: a trained delta can be masked."""
        return bool(self.held)

    def masked(self, delta: dict[str, np.ndarray], num_examples: int, loss: float, accuracy: float,
               personal_accuracy: float | None = None) -> MaskedDelta:
        """The masked DELTA body of a clipped (and maybe noised) integer delta over the plan's trainable buffers."""
        if not self.held:
            raise ProtocolError("bad-stage", "no shares relayed yet: nothing to mask with")
        bits = self._modulus_bits(self.cohort)
        packed = self._mask(delta, bits, {v: self.neighbours[v].s_pk for v in sorted(self.held)})
        self.changes += not self.masked_sent
        self.masked_sent = True
        return MaskedDelta(int(num_examples), float(loss), float(accuracy), self.cohort, bits, packed,
                           -1.0 if personal_accuracy is None else float(personal_accuracy))

    def on_unmask(self, body: SecAggUnmask) -> SecAggReveal:
        """Shares for the coordinator's unmasking; the same request again gets the same answer, another is refused
        (a coordinator asking twice with other lists could collect both kinds of share for one neighbour)."""
        if self.revealed is not None:
            if body != self.revealed:
                raise ProtocolError("bad-unmask", "a second, different SECAGG_UNMASK in one round")
            return self._reveal
        if not self.masked_sent:
            raise ProtocolError("bad-stage", "SECAGG_UNMASK before this device sent its masked DELTA")
        survivors, dropped = set(body.survivors), set(body.dropped)
        if len(survivors) != len(body.survivors) or len(dropped) != len(body.dropped) or survivors & dropped \
                or not (survivors | dropped) <= set(self.held) or survivors | dropped != set(self.held):
            raise ProtocolError("bad-unmask", "survivors and dropped must split this device's neighbours")
        if len(survivors) + 1 < max(self.threshold, self.min_survivors):
            # the survivors it is told of, itself included, are a lower bound of the round's: with fewer than its
            # noise is calibrated for, the unmasked sum would hold less noise than accounted for; with fewer than
            # the threshold, the sum would be of too few to hide each one
            raise ProtocolError("too-few-survivors", f"{len(survivors) + 1} survivors among its neighbourhood, "
                                                     f"threshold {self.threshold}, the noise calibrated for "
                                                     f"{self.min_survivors or 'any number of'}")
        self.revealed, self._reveal = body, self._reveal_of(body)
        self.changes += 1
        return self._reveal

    def _reveal_of(self, body: SecAggUnmask) -> SecAggReveal:
        """Per neighbour in id order, the share of its self-mask seed if it survived, of its s_sk if it dropped."""
        entries = []
        for v in sorted(body.survivors + body.dropped):
            index, shares = self.held[v]
            entries.append((v, REVEAL_SELF_MASK, index, shares[:16] + bytes(16)) if v in body.survivors else
                           (v, REVEAL_PAIRWISE_KEY, index, shares[16:]))
        return SecAggReveal(tuple(entries))

    # --- the cryptographic steps (what CSecAggDevice runs in C) ---

    def _value_bounds(self, clip_norm: float, noise_sigma: float) -> dict[str, int]:
        return value_bounds(self.plan, clip_norm, noise_sigma)

    def _derive(self) -> RoundSecrets:
        return RoundSecrets.derive(self.identity, self.ctx, self.device_id)

    def _modulus_bits(self, cohort: int) -> tuple[int, ...]:
        try:
            return modulus_bits(self.bounds, cohort)
        except ValueError as exc:
            raise ProtocolError("bad-cohort", str(exc)) from None

    def _check_keys(self, identity: PublicIdentity, device_id: int, keys: SecAggKeys) -> None:
        check_keys(identity, self.ctx, device_id, keys)

    def _sealed_shares(self, t: int, c_pks: dict[int, bytes]) -> list[tuple[int, bytes]]:
        """Each neighbour's (in id order, share index i + 1) t-of-n shares of b and s_sk, sealed for it."""
        b, s_lo, s_hi = shamir_split(self.secrets.shamir_key,
                                     [self.secrets.b_seed, self.secrets.s_sk[:16], self.secrets.s_sk[16:]], t,
                                     len(c_pks))
        out = []
        for i, (v, c_pk) in enumerate(c_pks.items()):
            key = share_key(self.secrets.c_key, c_pk, self.ctx, self.device_id, v)
            out.append((v, seal_share(key, self.ctx, self.device_id, v, i + 1, b[i], s_lo[i], s_hi[i])))
        return out

    def _open_share(self, sender: int, c_pk: bytes, ciphertext: bytes) -> tuple[int, bytes]:
        key = share_key(self.secrets.c_key, c_pk, self.ctx, sender, self.device_id)
        index, b, s_lo, s_hi = open_share(key, self.ctx, sender, self.device_id, ciphertext)
        return index, b + s_lo + s_hi

    def _mask(self, delta: dict[str, np.ndarray], bits: tuple[int, ...], s_pks: dict[int, bytes]) -> bytes:
        """The packed masked values of the clipped delta: its self mask and the pairwise masks of `s_pks`."""
        names, sizes = self.plan.trainable_buffers(), _buffer_sizes(self.plan)
        total = [np.clip(np.asarray(delta[n], np.int64).reshape(-1), -self.bounds[n], self.bounds[n])
                 .astype(np.uint64) for n in names]  # two's complement, reduced below
        for i, m in enumerate(expand_mask(self_mask_key(self.secrets.b_seed, self.ctx, self.device_id), sizes,
                                          bits)):
            total[i] = total[i] + m
        for v, s_pk in s_pks.items():
            masks = expand_mask(pairwise_key(self.secrets.s_key, s_pk, self.ctx, self.device_id, v), sizes, bits)
            for i, m in enumerate(masks):
                total[i] = total[i] + m if self.device_id < v else total[i] - m
        values = [t & np.uint64((1 << k) - 1) for t, k in zip(total, bits)]
        return pack_values(values, bits)


# --- the coordinator's round -------------------------------------------------------------------------------

@dataclass
class SecAggSum:
    """What the coordinator learns from a round: the sum of the survivors' clipped deltas, and who they are."""

    round: int
    survivors: tuple[int, ...]  # device ids whose deltas are in the sum
    dropped: tuple[int, ...]  # sent shares, then no masked DELTA
    total: dict[str, np.ndarray]  # per trainable buffer, the integer sum (int64), in the buffer's shape
    num_examples: int
    loss: float  # the survivors' mean reported train loss and accuracy
    accuracy: float
    bad_shares: tuple[int, ...] = ()  # devices whose revealed shares did not reconstruct (named, left out)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # what each survivor reported in the clear


@dataclass
class _Stage:
    name: str
    received: dict = field(default_factory=dict)


class SecAggRound:
    """The coordinator's part of one round. Feed each stage's bodies with on_*; close_* ends a stage (when every
    expected device answered, or at the stage's deadline) and returns the bodies to send, by device id. Every
    refusal is a ProtocolError naming the device; a round that cannot complete (too few devices or surviving
    neighbours) raises ProtocolError("secagg-failed") from the close_* that finds it, before anything is
    revealed, and the round's sum is simply not produced: no model state is touched here."""

    def __init__(self, plan: Plan, ctx: RoundContext, identities: Mapping[int, PublicIdentity], cohort,
                 clip_norm: float, noise_sigma: float = 0.0, graph_seed: bytes = b"", degree: int | None = None,
                 min_survivors: int = 0) -> None:
        self.plan, self.ctx, self.identities = plan, ctx, identities
        self.min_survivors = min_survivors  # distributed DP: its noise is calibrated for at least this many
        self.cohort = sorted(set(cohort))
        self.bounds = value_bounds(plan, clip_norm, noise_sigma)
        self.graph_seed = graph_seed or kdf(b"graph", ctx.info(b"graph"))
        self._degree = degree
        self.stage = "keys"
        self.keys: dict[int, SecAggKeys] = {}
        self.graph: dict[int, tuple[int, ...]] = {}
        self.threshold = 0
        self.shares: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self.u2: list[int] = []
        self.masked: dict[int, MaskedDelta] = {}
        self.unmask: dict[int, SecAggUnmask] = {}
        self.reveals: dict[int, SecAggReveal] = {}
        self.bits: tuple[int, ...] = ()
        self.log: list[dict] = []  # what happened at each stage: for the coordinator's log and the privacy report

    def _expect(self, stage: str, device_id: int, allowed) -> None:
        if self.stage != stage:
            raise ProtocolError("bad-stage", f"{stage} message in stage {self.stage}")
        if device_id not in allowed:
            raise ProtocolError("not-in-cohort", f"device {device_id:#010x} is not expected in stage {stage}")

    def on_keys(self, device_id: int, body: SecAggKeys) -> None:
        self._expect("keys", device_id, self.cohort)
        check_keys(self.identities[device_id], self.ctx, device_id, body)
        if self.keys.setdefault(device_id, body) != body:
            raise ProtocolError("replay", "a second, different SECAGG_KEYS")

    def close_keys(self) -> dict[int, SecAggPeers]:
        u1 = sorted(self.keys)
        degree = graph_degree(len(u1)) if self._degree is None else min(self._degree, len(u1) - 1)
        self.threshold = threshold(degree)
        self.log.append(dict(stage="keys", cohort=len(self.cohort), sent_keys=len(u1), degree=degree,
                             threshold=self.threshold))
        if len(u1) < 3 or degree < 2:
            self.stage = "failed"
            raise ProtocolError("secagg-failed", f"{len(u1)} devices sent keys: secure aggregation needs 3")
        self.graph = neighbour_graph(u1, self.graph_seed, degree)
        self.bits = modulus_bits(self.bounds, len(u1))
        self.stage = "shares"
        return {u: SecAggPeers(len(u1), self.threshold, tuple(SecAggPeer(v, self.keys[v]) for v in self.graph[u]))
                for u in u1}

    def on_shares(self, device_id: int, body: SecAggShares) -> None:
        self._expect("shares", device_id, self.graph)
        to = [v for v, _ in body.shares]
        if sorted(to) != list(self.graph[device_id]):
            raise ProtocolError("bad-shares", "SECAGG_SHARES must hold one share for each neighbour")
        shares = dict(body.shares)
        if self.shares.setdefault(device_id, shares) != shares:
            raise ProtocolError("replay", "a second, different SECAGG_SHARES")

    def close_shares(self) -> dict[int, SecAggRelay]:
        u2 = set(self.shares)
        while True:  # a device left with fewer than `threshold` sharing neighbours could never be unmasked
            short = {u for u in u2 if len(set(self.graph[u]) & u2) < self.threshold}
            if not short:
                break
            u2 -= short
        self.u2 = sorted(u2)
        self.log.append(dict(stage="shares", sent_shares=len(self.shares), kept=len(self.u2)))
        if len(self.u2) < 3:
            self.stage = "failed"
            raise ProtocolError("secagg-failed", f"{len(self.u2)} devices can take part after sharing keys")
        self.stage = "masked"
        return {u: SecAggRelay(tuple((v, self.shares[v][u]) for v in self.graph[u] if v in u2)) for u in self.u2}

    def on_masked(self, device_id: int, body: MaskedDelta) -> None:
        self._expect("masked", device_id, self.u2)
        if body.cohort != len(self.keys) or body.bits != self.bits:
            raise ProtocolError("bad-masked", f"moduli {body.bits} for cohort {body.cohort}, expected {self.bits} "
                                              f"for {len(self.keys)}")
        unpack_values(body.packed, _buffer_sizes(self.plan), self.bits)  # the exact length and padding
        if self.masked.setdefault(device_id, body) != body:
            raise ProtocolError("replay", "a second, different masked DELTA")

    def close_masked(self) -> dict[int, SecAggUnmask]:
        """U3 = the devices whose masked DELTA came. Checks, before anything is asked, that every secret the sum
        needs has `threshold` surviving holders."""
        u2, u3 = set(self.u2), set(self.masked)
        dropped = u2 - u3
        self.log.append(dict(stage="masked", masked=len(u3), dropped=len(dropped)))
        if len(u3) < self.min_survivors:
            self.stage = "failed"
            raise ProtocolError("secagg-failed", f"{len(u3)} masked DELTAs, fewer than the {self.min_survivors} "
                                                 f"the devices' noise is calibrated for: nothing is revealed")
        needed = list(u3) + [v for v in dropped if set(self.graph[v]) & u3]
        for x in needed:
            holders = set(self.graph[x]) & u3
            if len(holders) < self.threshold:
                self.stage = "failed"
                raise ProtocolError("secagg-failed", f"device {x:#010x} has {len(holders)} surviving neighbours, "
                                                     f"threshold {self.threshold}: the sum cannot be unmasked")
        self.stage = "unmask"
        self.unmask = {u: SecAggUnmask(tuple(v for v in self.graph[u] if v in u3),
                                       tuple(v for v in self.graph[u] if v in dropped)) for u in sorted(u3)}
        return dict(self.unmask)

    def on_reveal(self, device_id: int, body: SecAggReveal) -> None:
        self._expect("unmask", device_id, self.unmask)
        asked = self.unmask[device_id]
        expected = {(v, REVEAL_SELF_MASK) for v in asked.survivors} | {(v, REVEAL_PAIRWISE_KEY) for v in asked.dropped}
        got = [(v, kind) for v, kind, _, _ in body.entries]
        if len(got) != len(set(got)) or set(got) != expected:
            raise ProtocolError("bad-reveal", "SECAGG_REVEAL does not answer the SECAGG_UNMASK sent")
        if self.reveals.setdefault(device_id, body) != body:
            raise ProtocolError("replay", "a second, different SECAGG_REVEAL")

    @property
    def complete(self) -> bool:
        return self.stage == "unmask" and set(self.reveals) == set(self.unmask)

    def _revealed(self, about: int, kind: int) -> dict[int, tuple[int, bytes]]:
        """holder -> (index, share) of the shares revealed about device `about`, at least `threshold` of them."""
        shares = {}
        for holder, body in self.reveals.items():
            for v, k, index, share in body.entries:
                if v == about and k == kind:
                    shares[holder] = (index, share)
        if len(shares) < self.threshold:
            raise ProtocolError("secagg-failed", f"{len(shares)} shares revealed about {about:#010x}, threshold "
                                                 f"{self.threshold}")
        return shares

    def _first_subset(self, shares: dict[int, tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The `threshold` shares of lowest index: without dropouts every secret of the round has the same
        indexes, so shamir_combine computes one set of Lagrange coefficients for all of them."""
        return sorted(shares.values())[:self.threshold]

    def _reconstruct(self, about: int, kind: int, check) -> tuple[bytes, set[int]]:
        """A secret from the shares revealed about device `about` when the first subset's failed `check`: the
        first `threshold`-subset that passes, and the holders whose shares disagree with the secret found (bad)."""
        shares = self._revealed(about, kind)
        holders = sorted(shares, key=lambda h: shares[h][0])
        for tried, subset in enumerate(itertools.combinations(holders, self.threshold)):
            if tried >= MAX_COMBINATIONS:
                break
            secret = _combine([shares[h] for h in subset], kind)
            if secret is not None and check(secret):
                bad = set() if tried == 0 else {h for h in holders if h not in subset and _combine(
                    [shares[g] for g in subset[1:]] + [shares[h]], kind) != secret}
                return secret, bad
        raise ProtocolError("bad-share", f"no {self.threshold} of the shares revealed about {about:#010x} "
                                         f"reconstruct its secret: some holders sent wrong shares")

    def _secrets(self, wanted: list[tuple[int, int, object]]) -> tuple[list[bytes], set[int]]:
        """The secrets of (about, kind, check) triples: each from its `threshold` shares of lowest index, all in
        one shamir_combine per kind; a secret that fails its check is searched for among other subsets
        (_reconstruct), naming the holders of wrong shares."""
        found: dict[int, bytes | None] = {}
        for kind in (REVEAL_SELF_MASK, REVEAL_PAIRWISE_KEY):
            at = [n for n, (_, k, _) in enumerate(wanted) if k == kind]
            requests = [self._first_subset(self._revealed(wanted[n][0], kind)) for n in at]
            found.update(zip(at, _combine_many(requests, kind)))
        out, bad = [], set()
        for n, (about, kind, check) in enumerate(wanted):
            secret = found[n]
            if secret is None or not check(secret):
                secret, wrong = self._reconstruct(about, kind, check)
                bad |= wrong
            out.append(secret)
        return out, bad

    def finish(self) -> SecAggSum:
        """The sum of the survivors' deltas. ProtocolError if the reveals cannot unmask it (nothing is produced)."""
        if not self.complete:
            raise ProtocolError("bad-stage", f"secure aggregation round in stage {self.stage}, reveals from "
                                             f"{len(self.reveals)} of {len(self.unmask)}")
        names, sizes = self.plan.trainable_buffers(), _buffer_sizes(self.plan)
        u3 = sorted(self.masked)
        dropped = sorted(set(self.u2) - set(u3))
        total = [np.zeros(s, np.uint64) for s in sizes]
        for u in u3:
            for i, v in enumerate(unpack_values(self.masked[u].packed, sizes, self.bits)):
                total[i] += v
        unmasking = [v for v in dropped if any(u in self.masked for u in self.graph[v])]
        secrets, bad = self._secrets(
            [(u, REVEAL_SELF_MASK, lambda s, u=u: commitment(s) == self.keys[u].b_commit) for u in u3] +
            [(v, REVEAL_PAIRWISE_KEY, lambda s, v=v: _public(_x25519(s)) == self.keys[v].s_pk) for v in unmasking])
        for u, b_seed in zip(u3, secrets):
            for i, m in enumerate(expand_mask(self_mask_key(b_seed, self.ctx, u), sizes, self.bits)):
                total[i] -= m
        for v, s_sk in zip(unmasking, secrets[len(u3):]):
            dropped_key = _x25519(s_sk)
            for u in (u for u in self.graph[v] if u in self.masked):  # u added +mask if u < v, else -mask
                masks = expand_mask(pairwise_key(dropped_key, self.keys[u].s_pk, self.ctx, v, u), sizes, self.bits)
                for i, m in enumerate(masks):
                    total[i] = total[i] - m if u < v else total[i] + m
        out = {}
        for name, t, k in zip(names, total, self.bits):
            t = (t & np.uint64((1 << k) - 1)).astype(np.int64)
            t[t >= 1 << (k - 1)] -= 1 << k
            out[name] = t.reshape(self.plan.buffers[name].shape)
        self.stage = "done"
        m = len(u3)
        result = SecAggSum(self.ctx.round, tuple(u3), tuple(dropped), out,
                           sum(self.masked[u].num_examples for u in u3),
                           sum(self.masked[u].train_loss for u in u3) / m,
                           sum(self.masked[u].accuracy for u in u3) / m, tuple(sorted(bad)),
                           {u: _reported(self.masked[u]) for u in u3})
        self.log.append(dict(stage="unmasked", survivors=m, dropped=len(dropped), bad_shares=len(bad)))
        return result


def _reported(body: MaskedDelta) -> dict[str, float]:
    out = {"loss": float(body.train_loss), "accuracy": float(body.accuracy)}
    if body.personal_accuracy >= 0:
        out["personal_accuracy"] = float(body.personal_accuracy)
    return out


def _combine(shares: list[tuple[int, bytes]], kind: int) -> bytes | None:
    """The secret of revealed 32-byte shares: the 16-byte self-mask seed (first half), or the 32-byte s_sk from
    its two halves, each shared on its own. None when two shares claim one index."""
    return _combine_many([shares], kind)[0]


def _combine_many(requests: list[list[tuple[int, bytes]]], kind: int) -> list[bytes | None]:
    """_combine of each request, reconstructed together (shamir_combine: one batch for the round)."""
    ok = [len({i for i, _ in r}) == len(r) for r in requests]
    halves = [[(i, s[:16]) for i, s in r] for r, good in zip(requests, ok) if good]
    if kind != REVEAL_SELF_MASK:
        halves += [[(i, s[16:]) for i, s in r] for r, good in zip(requests, ok) if good]
    secrets = iter(shamir_combine(halves))
    lo = [next(secrets) if good else None for good in ok]
    if kind == REVEAL_SELF_MASK:
        return lo
    return [None if s is None else s + next(secrets) for s in lo]


# --- Shamir reconstruction, batched ----------------------------------------------------------------------------
#
# pycryptodome's Shamir.combine interpolates each secret on its own in pure-Python GF(2^128) (about 18 ms for 19
# shares: per share an inversion and two full multiplications), which made 92 % of the coordinator's CPU per
# secure-aggregation round. shamir_combine computes the same interpolation, secret = sum_j y_j L_j with Lagrange
# coefficients L_j = prod_{m != j} x_m / (x_j + x_m), for all of a round's secrets at once, in numpy over bit
# vectors, in pycryptodome's field (polynomial basis, bit i the coefficient of x^i, 16 bytes big-endian):
#
# - the field is pycryptodome's by construction: products are carry-less products of bit vectors folded back with
#   the table of x^128 .. x^254 that pycryptodome's own multiplication gives (_Element.__mul__), and the one
#   inversion of a batch is pycryptodome's (_Element.inverse);
# - a share index is a small element (1..127), so the numerator and the denominator of every L_j are products of
#   small elements (seven shifts each); the denominators of the whole batch are inverted together with a product
#   tree (one inversion, three multiplications per denominator);
# - each distinct set of share indexes gets its coefficients once per batch: without dropouts every secret of a
#   round has the same indexes (SecAggRound._first_subset takes the lowest `threshold` of them).
#
# tests/test_secagg.py checks shamir_combine against Shamir.combine on random shares and index sets.

_GF_BITS = 128


def _elements_to_bits(values: list[bytes]) -> np.ndarray:
    """(N, 128) uint8: bit i of row r is the coefficient of x^i of values[r] (16 bytes, pycryptodome's encoding)."""
    raw = np.frombuffer(b"".join(values), np.uint8).reshape(-1, 16)[:, ::-1]
    return np.unpackbits(raw, axis=1, bitorder="little")


def _bits_to_elements(bits: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.packbits(bits.astype(np.uint8), axis=1, bitorder="little")[:, ::-1]]


def _ints_to_bits(values: list[int]) -> np.ndarray:
    return _elements_to_bits([v.to_bytes(16, "big") for v in values])


@lru_cache(maxsize=1)
def _reduction() -> np.ndarray:
    """(127, 128) uint8: row k is x^(128 + k) in the field, from pycryptodome's multiplication."""
    from Crypto.Protocol.SecretSharing import _Element

    top = _Element(1 << 127)
    return _ints_to_bits([int(top * _Element(1 << (k + 1))) for k in range(_GF_BITS - 1)])


def _fold(product: np.ndarray) -> np.ndarray:
    """A carry-less product's bits (N, 128 + h), h < 128, as field elements (N, 128). (XOR of table rows, not a
    BLAS matrix product: on a loaded machine BLAS's threads cost ten times the work.)"""
    out = product[:, :_GF_BITS].copy()
    for k, row in enumerate(_reduction()[:product.shape[1] - _GF_BITS]):
        out ^= product[:, _GF_BITS + k:_GF_BITS + k + 1] & row
    return out


def _gf_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise products of two (N, 128) bit arrays."""
    product = np.zeros((len(a), 2 * _GF_BITS - 1), np.uint8)
    for i in range(_GF_BITS):
        product[:, i:i + _GF_BITS] ^= a[:, i:i + 1] & b
    return _fold(product)


def _gf_mul_small(a: np.ndarray, small: np.ndarray) -> np.ndarray:
    """Row-wise products of a (N, 128) bit array and small elements (N,) in 1..127."""
    product = np.zeros((len(a), _GF_BITS + 6), np.uint8)
    for i in range(7):
        product[:, i:i + _GF_BITS] ^= ((small >> i) & 1).astype(np.uint8)[:, None] & a
    return _fold(product)


def _gf_inverse(a: np.ndarray) -> np.ndarray:
    """Row-wise inverses of nonzero elements (N, 128): a product tree up, pycryptodome's inversion of its root,
    and down again (the inverse of a node times its sibling is the inverse of the other child)."""
    from Crypto.Protocol.SecretSharing import _Element

    one = _ints_to_bits([1])
    levels = [a]
    while len(levels[-1]) > 1:
        x = levels[-1] if len(levels[-1]) % 2 == 0 else np.concatenate([levels[-1], one])
        levels[-1] = x
        levels.append(_gf_mul(x[0::2], x[1::2]))
    (root,) = _bits_to_elements(levels[-1])
    inverse = _ints_to_bits([int(_Element(root).inverse())])
    for x in reversed(levels[:-1]):
        inverse = inverse[:len(x) // 2]  # the level above may have been padded with a 1
        down = np.empty_like(x)
        down[0::2], down[1::2] = _gf_mul(inverse, x[1::2]), _gf_mul(inverse, x[0::2])
        inverse = down
    return inverse[:len(a)]


def _lagrange(index_sets: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
    """Per set of distinct share indexes, its Lagrange coefficients at 0, a (len(set), 128) bit array."""
    rows = [(s, j) for s in index_sets for j in s]
    others = [[m for m in s if m != j] for s, j in rows]
    numerator = denominator = np.tile(_ints_to_bits([1]), (len(rows), 1))
    for k in range(max(map(len, others))):  # a row with fewer factors (a smaller set) multiplies by 1
        m = np.array([o[k] if k < len(o) else 1 for o in others])
        numerator = _gf_mul_small(numerator, m)
        denominator = _gf_mul_small(denominator, np.array([j ^ o[k] if k < len(o) else 1
                                                          for (_, j), o in zip(rows, others)]))
    coefficients = _gf_mul(numerator, _gf_inverse(denominator))
    out, start = {}, 0
    for s in index_sets:
        out[s], start = coefficients[start:start + len(s)], start + len(s)
    return out


def shamir_combine(requests: list[list[tuple[int, bytes]]]) -> list[bytes]:
    """[Shamir.combine(r) for r in requests] (pycryptodome's scheme: 16-byte shares, here indexes 1..127),
    computed together. ValueError on a repeated index or one outside 1..127."""
    if not requests:
        return []
    for r in requests:
        idx = [i for i, _ in r]
        if not r or len(set(idx)) != len(idx) or not all(1 <= i < 128 for i in idx):
            raise ValueError(f"shares with indexes {idx}: each index once, in 1..127")
    sets = [tuple(i for i, _ in r) for r in requests]
    coefficients = _lagrange(sorted(set(sets)))
    terms = _gf_mul(_elements_to_bits([y for r in requests for _, y in r]),
                    np.concatenate([coefficients[s] for s in sets]))
    starts = np.cumsum([0] + [len(r) for r in requests[:-1]])
    return _bits_to_elements(np.bitwise_xor.reduceat(terms, starts, axis=0))


# --- the largest stage message: what a device's buffers and the coordinator's bounds must also take ----------

def _stage_envelope(body: int, encrypted: bool = False) -> int:
    return HEADER_SIZE + body + (TAG_SIZE if encrypted else 0) + SIGNATURE_SIZE


MAX_STAGE_ENVELOPE = max(
    _stage_envelope(8 + (4 + 160) * SECAGG_MAX_NEIGHBOURS),  # SECAGG_PEERS
    _stage_envelope(4 + (4 + 76) * SECAGG_MAX_NEIGHBOURS),  # SECAGG_SHARES / SECAGG_RELAY
    _stage_envelope(4 + 40 * SECAGG_MAX_NEIGHBOURS, encrypted=True),  # SECAGG_REVEAL
)
