"""Data sets: loading (.npz, builtin:NAME), label coding, stratified splits and input scaling.

Features keep a compact dtype where they can: integer-valued features in [0, 255] are held as uint8
and scaled per batch inside the kernels, so MNIST takes 47 MB instead of 188 MB. Scaling is fitted
on the training split only and travels with the model.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import DataError

BUILTIN = ("digits",)
SCALINGS = ("minmax", "standard", "none")
_CHUNK = 8192


@dataclass
class Dataset:
    """Features and integer-coded labels; ``classes[code]`` is the original label.

    ``X_test``/``y_test`` are None when the source has no test split.
    """

    X: np.ndarray
    y: np.ndarray
    classes: list
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    name: str = ""

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.X, self.y, self.X_test, self.y_test) if a is not None)


def load_data(spec: str) -> Dataset:
    """Load ``builtin:NAME`` or an ``.npz`` file with ``X``, ``y`` and optional ``X_test``, ``y_test``."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise DataError(f"unknown built-in data set {name!r}; choose one of: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN))
        with resources.as_file(resources.files("ctre_edge") / "datasets" / f"{name}.npz") as p:
            return _load_npz(Path(p), spec)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data file {path} not found; give an .npz file with X and y, or builtin:digits")
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: unsupported data format {path.suffix or '(no extension)'!r}; "
                        "use an .npz file with arrays X and y")
    return _load_npz(path, path.name)


@dataclass
class DataSummary:
    """What the memory planner needs before loading: shapes, class count, a lower bound on bytes."""

    n_samples: int
    n_features: int
    n_classes: int
    n_test: int
    min_bytes: int


def summarize_data(spec: str) -> DataSummary:
    """Shapes of a data source from its headers (and labels), without loading the features.

    ``min_bytes`` assumes float features will compact to one byte each, so it never exceeds what
    loading will take; the exact figure is ``Dataset.nbytes`` after loading.
    """
    spec = str(spec)
    path = Path(spec)
    if spec.startswith("builtin:") or not path.exists() or path.suffix.lower() != ".npz":
        d = load_data(spec)  # built-ins are small; a bad path raises the loader's own message
        return DataSummary(d.X.shape[0], d.n_features, len(d.classes), 0 if d.X_test is None else d.X_test.shape[0],
                           d.nbytes)
    try:
        with zipfile.ZipFile(path) as z:
            keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
            if not {"X", "y"} <= keys:
                return summarize_loaded(load_data(spec))
            (n, d), x_dtype = npz_header(z, "X")
            n_test = npz_header(z, "X_test")[0][0] if "X_test" in keys else 0
            y = _read_member(z, "y")
            n_classes = int(np.unique(y).shape[0])
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - same boundary as _load_npz
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    per_value = 1 if x_dtype.kind == "f" else x_dtype.itemsize
    return DataSummary(n, d, n_classes, n_test, (n + n_test) * (d * per_value + 8))


def summarize_loaded(d: Dataset) -> DataSummary:
    return DataSummary(d.X.shape[0], d.n_features, len(d.classes), 0 if d.X_test is None else d.X_test.shape[0],
                       d.nbytes)


def _load_npz(path: Path, name: str) -> Dataset:
    try:
        with zipfile.ZipFile(path) as z:
            keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
            missing = {"X", "y"} - keys
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(sorted(missing))}; "
                                "an .npz data file needs X (samples x features) and y (labels)")
            X, y = _read_member(z, "X", compact=True), _read_member(z, "y")
            X_test = _read_member(z, "X_test", compact=True) if "X_test" in keys else None
            y_test = _read_member(z, "y_test") if "y_test" in keys else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged archives fail in many ways (zlib, struct, EOF, ...)
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    if (X_test is None) != (y_test is None):
        raise DataError(f"{path}: X_test and y_test must come together")
    return make_dataset(X, y, X_test, y_test, name=name, source=str(path))


def npz_header(z: zipfile.ZipFile, key: str):
    """(shape, dtype) of an array in an open .npz, read from its header only."""
    with z.open(key + ".npy") as f:
        shape, _, dtype = _read_header(f)
    return shape, dtype


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _read_member(z: zipfile.ZipFile, key: str, compact: bool = False) -> np.ndarray:
    """Read one array of an .npz, streaming rows in chunks (no whole-array temporary).

    With ``compact``, float features that are integers in [0, 255] are stored as uint8 as they
    stream in; at the first chunk that is not, the array switches to float32.
    """
    with z.open(key + ".npy") as f:
        shape, fortran, dtype = _read_header(f)
        if dtype.hasobject:
            raise DataError(f"{key} holds Python objects; store numbers or strings (no pickle)")
        if fortran or len(shape) != 2 or not compact:
            count = int(np.prod(shape)) if shape else 1
            data = f.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise DataError(f"{key} is truncated")
            arr = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
            return arr.copy() if not arr.flags.writeable else arr
        n, d = shape
        as_uint8 = dtype.kind == "f"
        out = np.empty(shape, dtype=np.uint8 if as_uint8 else dtype)
        row_bytes = d * dtype.itemsize
        step = max(1, (8 << 20) // max(1, row_bytes))
        for s in range(0, n, step):
            rows = min(step, n - s)
            data = f.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise DataError(f"{key} is truncated")
            chunk = np.frombuffer(data, dtype=dtype).reshape(rows, d)
            if as_uint8 and not _is_byte_valued(chunk):
                as_uint8 = False
                wide = np.empty(shape, dtype=np.float32)
                wide[:s] = out[:s]
                out = wide
            out[s:s + rows] = chunk
        return out


def _is_byte_valued(chunk: np.ndarray) -> bool:
    return bool(np.all(chunk >= 0) and np.all(chunk <= 255) and np.all(chunk == np.floor(chunk)))


def make_dataset(X, y, X_test=None, y_test=None, *, name: str = "", source: str = "data") -> Dataset:
    """Validate arrays and code labels as 0..C-1 (classes sorted). Used by the loaders and the API."""
    X = _check_X(np.asarray(X), source, "X")
    y = _check_y(np.asarray(y), X.shape[0], source, "y")
    classes, codes = np.unique(y, return_inverse=True)
    if classes.shape[0] < 2:
        raise DataError(f"{source}: y has a single class ({classes[0]!r}); a classifier needs at least two")
    if X_test is not None:
        X_test = _check_X(np.asarray(X_test), source, "X_test")
        y_test = _check_y(np.asarray(y_test), X_test.shape[0], source, "y_test")
        if X_test.shape[1] != X.shape[1]:
            raise DataError(f"{source}: X_test has {X_test.shape[1]} features but X has {X.shape[1]}")
        unseen = np.setdiff1d(np.unique(y_test), classes)
        if unseen.size:
            raise DataError(f"{source}: y_test has label(s) {unseen[:5].tolist()} that y never has")
        y_test = np.searchsorted(classes, y_test).astype(np.int64)
    return Dataset(X, codes.astype(np.int64).reshape(-1), [c.item() for c in classes], X_test, y_test, name)


def _check_X(X: np.ndarray, source: str, what: str) -> np.ndarray:
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{source}: {what} must be a non-empty 2-d array (samples x features), got shape {X.shape}")
    if X.dtype.kind not in "uifb":
        raise DataError(f"{source}: {what} must be numeric, got dtype {X.dtype}")
    if X.dtype.kind == "f":
        bad = _count_nonfinite(X)
        if bad:
            raise DataError(f"{source}: {what} has {bad} NaN/Inf value(s); clean or impute them first")
        if X.dtype != np.float32:
            X = X.astype(np.float32)
    elif X.dtype.kind == "b":
        X = X.astype(np.uint8)
    return np.ascontiguousarray(X)


def _check_y(y: np.ndarray, n: int, source: str, what: str) -> np.ndarray:
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{source}: {what} must hold one label per sample ({n}), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{source}: {what} must hold integer or string class labels")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iuUSb":
        raise DataError(f"{source}: {what} must hold integer or string class labels, got dtype {y.dtype}")
    return y


def _count_nonfinite(X: np.ndarray) -> int:
    return sum(int(np.count_nonzero(~np.isfinite(X[s:s + _CHUNK]))) for s in range(0, X.shape[0], _CHUNK))


def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator, what: str = "validation"):
    """Split sample indices into (rest, held) with ``round(fraction * count)`` held per class.

    Every class keeps at least one sample on each side; a class with fewer than two samples is an
    error. Both outputs are sorted.
    """
    held = []
    n_classes = int(y.max()) + 1
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if idx.shape[0] < 2:
            raise DataError(f"class {c} has {idx.shape[0]} sample(s); the stratified {what} split needs "
                            "at least 2 per class")
        n_held = min(idx.shape[0] - 1, max(1, int(round(fraction * idx.shape[0]))))
        held.append(rng.permutation(idx)[:n_held])
    held = np.sort(np.concatenate(held))
    mask = np.ones(y.shape[0], dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def fit_scaling(X: np.ndarray, rows: np.ndarray, method: str):
    """(shift, scale) float32 such that (x - shift) * scale is min-max to [0, 1] or standardised.

    Fitted on ``X[rows]`` in chunks (no float copy of the whole set). Constant features get
    scale 1, so they map to 0.
    """
    n_features = X.shape[1]
    if method == "none":
        return np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
    lo = np.full(n_features, np.inf)
    hi = np.full(n_features, -np.inf)
    s1 = np.zeros(n_features)
    s2 = np.zeros(n_features)
    step = max(1, (4 << 20) // (8 * n_features))  # float64 temporaries of about 4 MiB each
    for s in range(0, rows.shape[0], step):
        c = X[rows[s:s + step]].astype(np.float64)
        lo = np.minimum(lo, c.min(axis=0))
        hi = np.maximum(hi, c.max(axis=0))
        s1 += c.sum(axis=0)
        s2 += (c * c).sum(axis=0)
    if method == "minmax":
        shift, span = lo, hi - lo
    else:
        shift = s1 / rows.shape[0]
        span = np.sqrt(np.maximum(s2 / rows.shape[0] - shift * shift, 0.0))
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 1.0)
    return shift.astype(np.float32), scale.astype(np.float32)
