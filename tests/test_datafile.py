"""Tests for fedtiny.datafile: a user's .npz / .csv data, the one validation every loader of user data ends in
(from_arrays), and one clear error naming the file and the problem."""

import numpy as np
import pytest

from fedtiny import datafile as D


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
