"""A user's labelled data: the `Dataset` every loader returns, and data files (.npz or .csv, format in
docs/data.md) read into one.

Both the simulations (`fedtiny simulate --data`) and the coordinator (`--heldout`, server-side evaluation) read
user files, so the format lives here in the host library, below both.

A Dataset holds X float32 in PyTorch layout (N, C, L) or (N, C, H, W) or (N, F), y int64 class ids, group int64
(the machine or node a sample came from; zeros when the source has none).
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file or argument that cannot become a Dataset; the message names the file and the problem."""


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


def make_dataset(X, y, group, classes, name) -> Dataset:
    """Build a Dataset with the canonical dtypes (group zeros when None)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    group = np.zeros(len(y), np.int64) if group is None else np.asarray(group, dtype=np.int64)
    return Dataset(X, y, group, tuple(classes), name)


# ---------------------------------------------------------------------------------------------------------------
# Data files: .npz (X, y, optional group) or .csv (label column `label` or `y`, optional `group`, rest features)
# ---------------------------------------------------------------------------------------------------------------

def _labels(raw: np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Class ids and names: non-negative integers are used as they are, anything else (text) is ranked."""
    try:
        num = raw.astype(np.float64)
    except (TypeError, ValueError):
        num = None
    if num is not None:
        if not np.all(np.isfinite(num)) or np.any(num != np.round(num)) or np.any(num < 0):
            raise DataError(f"{where}: labels must be non-negative integers (or text class names)")
        y = num.astype(np.int64)
        return y, [str(c) for c in range(int(y.max()) + 1)]
    names = sorted(set(raw.astype(str).tolist()))
    return np.searchsorted(names, raw.astype(str)), names


def _check_group(raw: np.ndarray, where: str) -> np.ndarray:
    try:
        g = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: group must be integers") from None
    if not np.all(np.isfinite(g)) or np.any(g != np.round(g)):
        raise DataError(f"{where}: group must be integers")
    return g.astype(np.int64)


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as f:  # no pickle: a data file must not run code
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: unreadable .npz file ({e})") from e
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array '{key}' (found: {sorted(arrays) or 'none'})")
    X = arrays["X"]
    if X.dtype.kind not in "biuf":
        raise DataError(f"{path}: X is not numeric (dtype {X.dtype})")
    return X, arrays["y"], arrays.get("group")


def _from_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable .csv file ({e})") from e
    if not rows:
        raise DataError(f"{path}: empty file")
    header, body = [c.strip() for c in rows[0]], rows[1:]
    label = next((c for c in ("label", "y") if c in header), None)
    if label is None:
        raise DataError(f"{path}: missing label column (name it 'label' or 'y'); header is {header}")
    for i, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {i} has {len(r)} fields, header has {len(header)}")
    cols = {name: np.array([r[j].strip() for r in body]) for j, name in enumerate(header)}
    features = [c for c in header if c not in (label, "group")]
    if not features:
        raise DataError(f"{path}: no feature columns besides '{label}'")
    X = np.empty((len(body), len(features)), np.float64)
    for j, name in enumerate(features):
        try:
            X[:, j] = cols[name].astype(np.float64)
        except ValueError:
            bad = next(v for v in cols[name] if not _is_float(v))
            raise DataError(f"{path}: column '{name}' is not numeric (value {bad!r})") from None
    return X, cols[label], cols.get("group")


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def load_user_data(path: str | Path) -> Dataset:
    """A user's labelled data from .npz or .csv (format in docs/data.md). Raises DataError naming the problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DataError(f"{path}: unknown file type '{suffix}' (use .npz or .csv)")
    if not path.is_file():
        raise DataError(f"{path}: unreadable file (does not exist or is not a file)")
    X, y_raw, g_raw = _from_npz(path) if suffix == ".npz" else _from_csv(path)
    if X.ndim < 2:
        raise DataError(f"{path}: X must have a sample axis and features, got shape {X.shape}")
    if len(X) == 0:
        raise DataError(f"{path}: empty (no samples)")
    y_raw = np.asarray(y_raw)
    if y_raw.shape != (len(X),):
        raise DataError(f"{path}: length mismatch, X has {len(X)} samples but y has shape {y_raw.shape}")
    if g_raw is not None and np.asarray(g_raw).shape != (len(X),):
        raise DataError(f"{path}: length mismatch, X has {len(X)} samples but group has shape "
                        f"{np.asarray(g_raw).shape}")
    if not np.all(np.isfinite(X)):
        raise DataError(f"{path}: X contains NaN or inf")
    y, classes = _labels(y_raw, str(path))
    group = None if g_raw is None else _check_group(np.asarray(g_raw), str(path))
    return make_dataset(X, y, group, classes, path.stem)
