"""Tests for fedtiny.datafile: a user's .npz / .csv data, and one clear error naming the file and the problem."""

import numpy as np
import pytest

from fedtiny.datafile import DataError, load_user_data


def test_user_npz_roundtrip(tmp_path):
    X = np.random.default_rng(0).normal(size=(6, 2, 5))
    path = tmp_path / "mine.npz"
    np.savez(path, X=X, y=np.array([0, 1, 2, 0, 1, 2]), group=np.array([4, 4, 4, 5, 5, 5]))
    ds = load_user_data(path)
    assert ds.X.shape == (6, 2, 5) and ds.X.dtype == np.float32 and ds.name == "mine"
    assert ds.y.tolist() == [0, 1, 2, 0, 1, 2] and ds.group.tolist() == [4, 4, 4, 5, 5, 5]
    assert ds.classes == ("0", "1", "2")
    np.savez(path, X=X, y=np.array(["b", "a", "b", "a", "c", "c"]))  # text labels are ranked; no group -> 0
    ds = load_user_data(path)
    assert ds.classes == ("a", "b", "c") and ds.y.tolist() == [1, 0, 1, 0, 2, 2] and not ds.group.any()


def test_user_csv(tmp_path):
    path = tmp_path / "sensor.csv"
    path.write_text("a,label,b,group\n1.5,0,2,7\n-1,1,3e-2,7\n0,1,4,8\n")
    ds = load_user_data(path)
    np.testing.assert_allclose(ds.X, [[1.5, 2], [-1, 0.03], [0, 4]])
    assert ds.y.tolist() == [0, 1, 1] and ds.group.tolist() == [7, 7, 8]
    path.write_text("y,f1\nok,1\nbad,2\n")
    ds = load_user_data(path)
    assert ds.classes == ("bad", "ok") and ds.X.shape == (2, 1)


def write_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


def write_text(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


X4 = np.zeros((4, 3))
BAD_FILES = {
    "missing array 'y'": lambda p: write_npz(p, X=X4),
    "missing array 'X'": lambda p: write_npz(p, y=np.zeros(4)),
    "length mismatch": lambda p: write_npz(p, X=X4, y=np.zeros(3)),
    "length mismatch, .* group": lambda p: write_npz(p, X=X4, y=np.zeros(4), group=np.zeros(5)),
    "X contains NaN or inf": lambda p: write_npz(p, X=np.array([[0.0], [np.inf]]), y=np.zeros(2)),
    "empty": lambda p: write_npz(p, X=np.zeros((0, 3)), y=np.zeros(0)),
    "X is not numeric": lambda p: write_npz(p, X=np.array([["a"], ["b"]]), y=np.zeros(2)),
    "sample axis": lambda p: write_npz(p, X=np.zeros(4), y=np.zeros(4)),
    "labels must be non-negative integers": lambda p: write_npz(p, X=X4, y=np.array([0, 1.5, 2, 0])),
    "group must be integers": lambda p: write_npz(p, X=X4, y=np.zeros(4), group=np.full(4, 0.5)),
    "unreadable .npz": lambda p: write_text(p, "bad.npz", "not a zip file"),
    "unknown file type '.json'": lambda p: write_text(p, "bad.json", "{}"),
    "does not exist": lambda p: p / "nowhere.csv",
    "csv.* empty file": lambda p: write_text(p, "bad.csv", ""),
    "missing label column": lambda p: write_text(p, "bad.csv", "a,b\n1,2\n"),
    "column 'b' is not numeric": lambda p: write_text(p, "bad.csv", "label,a,b\n0,1,2\n1,3,x\n"),
    "csv.* X contains NaN": lambda p: write_text(p, "bad.csv", "label,a\n0,nan\n"),
    "csv.* empty \\(no samples\\)": lambda p: write_text(p, "bad.csv", "label,a\n"),
    "line 3 has 3 fields": lambda p: write_text(p, "bad.csv", "label,a\n0,1\n1,2,3\n"),
    "no feature columns": lambda p: write_text(p, "bad.csv", "label\n0\n"),
    "unreadable .csv": lambda p: (p / "bad.csv").write_bytes(b"label,a\n\xff\xfe,1\n") and p / "bad.csv",
}


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_user_data_errors_name_file_and_problem(tmp_path, problem):
    path = BAD_FILES[problem](tmp_path)
    with pytest.raises(DataError, match=problem) as info:
        load_user_data(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
