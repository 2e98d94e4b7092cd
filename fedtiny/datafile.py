"""A user's labelled data: the `Dataset` every loader returns, and data files (.npz or .csv, format in
docs/data.md) read into one.

Both the simulations (`fedtiny simulate --data`) and the coordinator (`--heldout`, server-side evaluation) read
user files, so the format lives here in the host library, below both. `from_arrays` is the one check every
loader of user data ends in.

A Dataset holds X float32 in PyTorch layout (N, C, L) or (N, C, H, W) or (N, F), y int64 class ids, group int64
(the machine or node a sample came from; zeros when the source has none).
"""

from __future__ import annotations

import csv
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

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
    return make_dataset(X, y, group, names, Path(where).stem)


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
