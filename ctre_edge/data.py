"""Data sets: loading, label coding, the NaN policy, stratified splits and input scaling.

Sources (``load_data``'s ``spec``):

- ``builtin:NAME`` (``builtin:digits``);
- ``.npz`` with ``X``, ``y`` and optionally ``X_test``, ``y_test`` (members streamed in chunks);
- ``.csv``, ``.tsv`` and ``.txt`` (delimiter sniffed: , tab ; | or whitespace): one sample per line,
  an optional header row (detected: a first row that is not numeric where the next rows are), the
  label in the ``target`` column (a header name or a 0-based index, negative from the end; default
  the last column). Empty fields and NA, N/A, null, ? read as NaN. Error messages count lines and
  columns from 1;
- ``.libsvm``, ``.svm``, ``.svmlight``: ``label index:value ...`` with 1-based indices, ``#`` comments
  and ``qid:`` ignored. The network's input layer reads dense rows, so the file is densified to
  (samples x largest index): one byte per cell when the values are integers in [0, 255], four
  otherwise, whatever the file's sparsity (parsing adds 12 bytes per stored value);
- MNIST-style IDX: ``IMAGES,LABELS`` or just the images file (``train-images-idx3-ubyte[.gz]``; the
  labels are then ``train-labels-idx1-ubyte[.gz]`` next to it). Images flatten to rows.

Labels may be integers or strings; ``Dataset.classes`` keeps them in code order (sorted).
Features keep a compact dtype: integer-valued features in [0, 255] are held as uint8 and scaled per
batch inside the kernels (MNIST takes 47 MB instead of 188 MB); anything else is float32.

NaN policy: NaN/Inf features are an error by default; ``nan_policy="zero" | "mean" | "median"``
replaces them per feature with statistics of the training file only, applied to the test file too.
The fill values are computed whenever a policy is given (even on clean data) and kept in
``Dataset.nan_fill``: a model trained on the data records them, so ``predict`` and ``evaluate``
impute new NaN/Inf with the training file's statistics, not the new data's.

Parse cache: a text source (csv, tsv, txt, libsvm, gzipped IDX) parsed with ``cache=True`` is saved
uncompressed in the user cache directory, ``$XDG_CACHE_HOME/ctre-edge/data/<input name>-<hash of its
absolute path>/`` (default ``~/.cache``), or with ``cache="beside"`` next to the input in
``<input>.ctre-cache/`` when that directory is writable: ``<key>.X.npy`` and ``<key>.y.npy``, and
``<key>.json`` (written last) with the classes, the parse options, and each input's size, mtime and
sha256 of its first and last MiB. ``key`` hashes the parse options, so files from different options
are never paired. The next load with the same options memory-maps X (copy-on-write) instead of
parsing, when every input's fingerprint still matches; otherwise the cache is rebuilt. A location
that cannot be written is skipped silently (a read-only data directory never fails a run);
``cache=False`` reads and writes nothing. (A same-size edit inside the middle of a file within one
mtime tick goes unnoticed: delete the cache directory then.)

Scaling is fitted on the training split only and travels with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import NAN_POLICIES
from .errors import ConfigError, DataError
from .io import FORMATS
from .io import cache as parse_cache
from .io import idx as idx_file
from .io.common import SUPPORTED, Parsed, compact, fail, from_arrays, unreadable

BUILTIN = ("digits",)
_CHUNK = 8192
_SMALL_TEXT = 32 << 20  # summarize_data parses text sources up to this size; larger ones are scanned


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
    nan_policy: str = "error"  # the policy the data was loaded with; the trained model keeps it
    nan_fill: np.ndarray | None = None  # its per-feature fill values (float32), None under "error"

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.X, self.y, self.X_test, self.y_test) if a is not None)


def load_data(spec: str, *, target=None, test_spec: str | None = None, nan_policy: str = "error",
              cache: bool | str = True) -> Dataset:
    """Load a data set (formats in the module docstring).

    Parameters
    ----------
    spec : str
        ``builtin:NAME``, a file, or ``IMAGES,LABELS`` for IDX.
    target : str or int, default=None
        Label column of a delimited text file: header name or 0-based index (negative from the
        end). None means the last column. Other formats ignore it.
    test_spec : str, default=None
        A separate test file in any format. Its labels must occur in ``spec`` and its feature
        count must match (a LIBSVM test file is padded to the training width).
    nan_policy : {"error", "zero", "mean", "median", "keep"}, default="error"
        What to do with NaN/Inf features; statistics come from the training file only. "keep"
        leaves them in place (``evaluate`` then imputes with the model's recorded statistics).
    cache : bool or "beside", default=True
        Reuse or write the parse cache of text sources: True in the user cache directory,
        "beside" next to the input when its directory is writable (else the user cache), False none.

    Raises
    ------
    DataError
        One line naming the file, the line or column, and the fix.
    """
    if nan_policy == "keep":  # NaN/Inf left in place for a caller that imputes with a model's own statistics
        _check_options(spec, target, "error")
    else:
        _check_options(spec, target, nan_policy)
    train, test = _read_pair(spec, target, test_spec, cache)
    return _finish(train, test, nan_policy, _name(spec))


def inspect_data(spec: str, *, target=None, test_spec: str | None = None, nan_policy: str = "error",
                 cache: bool | str = True) -> dict:
    """What ``load_data`` with the same options would give, summarised for people (and ``--json``).

    NaN/Inf values are counted (before imputation) instead of raising; value ranges skip them.
    Keys: name, n_samples, n_features, dtype, n_classes, classes (label -> count), min, max,
    constant_features, nan_count, nan_policy, nbytes (everything loaded) and test (the same keys
    for the test part, or None).
    """
    _check_options(spec, target, nan_policy)
    train, test = _read_pair(spec, target, test_spec, cache)
    d = _finish(train, test, "keep" if nan_policy == "error" else nan_policy, _name(spec))
    doc = {"name": d.name, **_describe(d.X, d.y, d.classes, train.n_nonfinite), "n_classes": len(d.classes),
           "nan_policy": nan_policy, "nbytes": d.nbytes, "test": None}
    if d.X_test is not None:
        doc["test"] = _describe(d.X_test, d.y_test, d.classes, test.n_nonfinite if test else 0)
    return doc


def _describe(X: np.ndarray, y: np.ndarray, classes: list, n_nan: int) -> dict:
    lo = np.full(X.shape[1], np.inf)
    hi = np.full(X.shape[1], -np.inf)
    step = _rows_per_step(X.shape[1])
    for s in range(0, X.shape[0], step):
        c = X[s:s + step]
        if c.dtype.kind == "f":
            ok = np.isfinite(c)
            lo = np.minimum(lo, np.where(ok, c, np.inf).min(axis=0))
            hi = np.maximum(hi, np.where(ok, c, -np.inf).max(axis=0))
        else:
            lo, hi = np.minimum(lo, c.min(axis=0)), np.maximum(hi, c.max(axis=0))
    seen = np.isfinite(lo)
    as_number = int if X.dtype.kind in "ui" else float
    counts = np.bincount(y, minlength=len(classes))
    return {"n_samples": int(X.shape[0]), "n_features": int(X.shape[1]), "dtype": str(X.dtype),
            "classes": {c: int(k) for c, k in zip(classes, counts)},
            "min": as_number(lo[seen].min()) if seen.any() else None,
            "max": as_number(hi[seen].max()) if seen.any() else None,
            "constant_features": int(np.count_nonzero(~seen | (lo == hi))),
            "nan_count": int(n_nan), "nbytes": int(X.nbytes + y.nbytes)}


@dataclass
class DataSummary:
    """What the memory planner needs before loading: shapes, class count, a lower bound on bytes."""

    n_samples: int
    n_features: int
    n_classes: int
    n_test: int
    min_bytes: int


def summarize_data(spec: str, *, target=None, test_spec: str | None = None, nan_policy: str = "error",
                   cache: bool | str = True) -> DataSummary:
    """Shapes of a data source without loading large ones (same options as ``load_data``).

    Built-ins, small text files and text files with a valid cache are loaded (the parse is cached,
    so ``load_data`` then costs nothing); .npz and IDX are read from their headers (and labels);
    large text files are scanned for the header and the label column only. ``min_bytes`` counts
    one byte per feature value where the loaded dtype is not known yet, so it never exceeds what
    loading takes; the exact figure is ``Dataset.nbytes`` after loading.
    """
    _check_options(spec, target, nan_policy)
    kind, paths = _source(spec)
    fmt = FORMATS[kind]
    options = fmt.cache_options(paths, target, None) if fmt.cache_options else None
    small = fmt.shape is None and (
        fmt.scan is None or sum(p.stat().st_size for p in paths) <= _SMALL_TEXT
        or (options is not None and parse_cache.cache_meta(paths, options, cache == "beside") is not None))
    if small and test_spec is None:
        return summarize_loaded(load_data(spec, target=target, nan_policy=nan_policy, cache=cache))
    n, d, n_classes, per_value = _shape_of(kind, paths, spec, target, cache)
    n_test, per_test = 0, 1
    if test_spec is not None:
        n_test, _, _, per_test = _shape_of(*_source(test_spec), test_spec, target, cache, n_features=d, test=True)
    elif fmt.test_rows is not None:
        n_test = fmt.test_rows(paths)
    return DataSummary(n, d, n_classes, n_test, n * (d * per_value + 8) + n_test * (d * per_test + 8))


def summarize_loaded(d: Dataset) -> DataSummary:
    return DataSummary(d.X.shape[0], d.n_features, len(d.classes), 0 if d.X_test is None else d.X_test.shape[0],
                       d.nbytes)


def _shape_of(kind, paths, spec, target, cache, n_features=None, test=False) -> tuple[int, int, int, int]:
    """(samples, features, classes, bytes per feature value as a lower bound) of one source; for a
    test file (``test``), of its test part when it has one."""
    fmt = FORMATS[kind]
    try:
        if fmt.shape is not None and (shape := fmt.shape(paths, test)) is not None:  # from the headers
            return shape
        if fmt.scan is not None and paths[0].stat().st_size > _SMALL_TEXT:  # large text: no parse
            return (*fmt.scan(paths, target), 1)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the same boundary as the loaders
        raise unreadable(paths[0], kind, e) from None
    main, part = _read(spec, target=target, cache=cache, n_features=n_features)  # the loader's own messages
    p = part if test and part is not None else main
    # imputation may turn float32 into uint8, so count a byte per value when there is NaN
    return p.X.shape[0], p.X.shape[1], len(p.classes), 1 if p.n_nonfinite else p.X.dtype.itemsize


# ---------------------------------------------------------------- sources

def _check_options(spec, target, nan_policy) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"'nan_policy' must be one of {', '.join(NAN_POLICIES)}; got {nan_policy!r}")
    if target is not None and (not isinstance(target, (str, int, np.integer)) or isinstance(target, bool)):
        raise fail(spec, f"target must be a column name or index, got {target!r}")


def _name(spec) -> str:
    spec = str(spec)
    if spec.startswith("builtin:") or Path(spec).exists():
        return spec if spec.startswith("builtin:") else Path(spec).name
    return Path(spec.split(",")[0]).name  # IMAGES,LABELS


def _source(spec) -> tuple[str, list]:
    """(kind, input paths) of a spec: builtin, npz, delimited, libsvm or idx; checks the files exist."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise DataError(f"unknown built-in data set {name!r}; choose one of: "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN))
        return "builtin", [name]
    path = Path(spec)
    if not path.exists() and "," in spec:
        images, labels = (Path(p.strip()) for p in spec.split(",", 1))
        if not idx_file.IDX_PATTERN.search(images.name):
            raise fail(spec, "a comma joins two files only for IDX data (IMAGES,LABELS)",
                       "give one data file, or *-images-idx3-ubyte,*-labels-idx1-ubyte")
        return "idx", [_existing(images), _existing(labels)]
    path = _existing(path)
    for fmt in FORMATS.values():
        if fmt.matches is not None and fmt.matches(path):
            return fmt.name, fmt.inputs(path)
    suffix = path.suffix.lower()
    raise fail(path, f"unsupported data format {suffix or '(no extension)'!r}", f"use one of: {SUPPORTED}")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"data file {path} not found; check the path (formats: {SUPPORTED})")
    if path.is_dir():
        raise fail(path, "is a directory, not a data file", f"give a file ({SUPPORTED})")
    if path.stat().st_size == 0:
        raise fail(path, "the file is empty", "check that it was written or downloaded completely")
    return path


def _read(spec, *, target, cache: bool | str, n_features=None) -> tuple[Parsed, Parsed | None]:
    """Parse one source into (main part, its own test part or None), through the parse cache."""
    kind, paths = _source(spec)
    fmt = FORMATS[kind]
    try:
        options = fmt.cache_options(paths, target, n_features) if cache and fmt.cache_options else None
        beside = cache == "beside"
        if options is not None and (hit := parse_cache.cache_load(paths, options, beside)) is not None:
            hit.source = str(paths[0])  # messages name the file as given now
            return hit, None
        inputs = parse_cache.fingerprint(paths) if options is not None else None  # taken before parsing, so
        main, part = fmt.parse(paths, target, n_features)  # an edit during the parse leaves a stale cache
        if options is not None:
            parse_cache.cache_store(paths, options, inputs, main, beside)
        return main, part
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged files fail in many ways (decoding, zlib, struct, EOF, ...)
        raise unreadable(paths[0], kind, e) from None


def _read_pair(spec, target, test_spec, cache) -> tuple[Parsed, Parsed | None]:
    train, test = _read(spec, target=target, cache=cache)
    if test_spec is not None:
        if test is not None:
            raise fail(spec, "already has a test part (X_test, y_test)",
                       "drop the separate test file, or give a training file without X_test")
        main, part = _read(test_spec, target=target, cache=cache, n_features=train.X.shape[1])
        test = part if part is not None else main  # an .npz test file: its test part, as `evaluate` reads it
    return train, test


# ---------------------------------------------------------------- assembling a Dataset

def make_dataset(X, y, X_test=None, y_test=None, *, name: str = "", source: str = "data") -> Dataset:
    """Validate arrays and code labels as 0..C-1 (classes sorted). Used by the loaders and the API."""
    train, test = from_arrays(X, y, X_test, y_test, source)
    return _finish(train, test, "error", name)


def _finish(train: Parsed, test: Parsed | None, nan_policy: str, name: str) -> Dataset:
    """Apply the NaN policy ("keep" leaves NaN in place, for inspect_data) and map test labels."""
    for part in (train, test):
        if part is not None and part.n_nonfinite and nan_policy == "error":
            raise fail(part.source, f"has {part.n_nonfinite} NaN/Inf value(s), the first at {part.first_nonfinite}",
                       "clean them or pass --nan-policy mean|median|zero")
    if len(train.classes) < 2:
        raise fail(train.source, f"has a single class ({train.classes[0]!r})", "a classifier needs at least two")
    X, X_test = train.X, None if test is None else test.X
    if test is not None and X_test.shape[1] != X.shape[1]:
        raise fail(test.source, f"has {X_test.shape[1]} features but the training data has {X.shape[1]}",
                   "give a test file with the same feature columns")
    fill = None
    if nan_policy in ("zero", "mean", "median"):
        fill = _fill_values(X, nan_policy)
        X = _impute(X, fill) if train.n_nonfinite else X
        X_test = _impute(X_test, fill) if test is not None and test.n_nonfinite else X_test
    y_test = None if test is None else _map_labels(test, train.classes)
    return Dataset(X, train.y, list(train.classes), X_test, y_test, name,
                   nan_policy if fill is not None else "error", fill)


def _map_labels(test: Parsed, classes: list) -> np.ndarray:
    """Test codes re-coded into the training classes; labels compare as text (1 matches "1")."""
    if test.classes == classes:
        return test.y
    code = {str(c): i for i, c in enumerate(classes)}
    unseen = [c for c in test.classes if str(c) not in code]
    if unseen:
        raise fail(test.source, f"has label(s) {unseen[:5]}{' ...' if len(unseen) > 5 else ''} never seen in training",
                   "a test file may only hold classes of the training file")
    return np.array([code[str(c)] for c in test.classes], dtype=np.int64)[test.y]


def _fill_values(X: np.ndarray, policy: str) -> np.ndarray:
    """Per-feature fill values from the finite entries of the training X (0 where there are none)."""
    d = X.shape[1]
    if policy == "zero":
        return np.zeros(d, np.float32)
    if policy == "mean":
        total, count = np.zeros(d), np.zeros(d)
        step = _rows_per_step(d)
        for s in range(0, X.shape[0], step):
            c = X[s:s + step].astype(np.float64)
            ok = np.isfinite(c)
            total += np.where(ok, c, 0.0).sum(axis=0)
            count += ok.sum(axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
    out = np.zeros(d, np.float32)
    step = max(1, (8 << 20) // (4 * X.shape[0]))  # column blocks of about 8 MiB
    for j in range(0, d, step):
        c = X[:, j:j + step].astype(np.float32)
        c[~np.isfinite(c)] = np.nan
        seen = ~np.all(np.isnan(c), axis=0)
        if seen.any():
            out[j:j + step][seen] = np.nanmedian(c[:, seen], axis=0)
    return out


def _rows_per_step(n_features: int) -> int:
    return max(1, (4 << 20) // (8 * n_features))  # float64 temporaries of about 4 MiB


def _impute(X: np.ndarray, fill: np.ndarray) -> np.ndarray:
    for s in range(0, X.shape[0], _CHUNK):
        c = X[s:s + _CHUNK]
        np.copyto(c, np.broadcast_to(fill, c.shape), where=~np.isfinite(c))
    return compact(X)


# ---------------------------------------------------------------- splits and scaling

def stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator, what: str = "validation"):
    """Split sample indices into (rest, held) with ``round(fraction * count)`` held per class.

    Every class keeps at least one sample on each side; a class with one sample is an error, a code
    with none is skipped (new data for a trained model may hold a subset of its classes). Both
    outputs are sorted.
    """
    held = []
    n_classes = int(y.max()) + 1
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        if idx.shape[0] == 0:
            continue
        if idx.shape[0] < 2:
            raise DataError(f"class {c} has {idx.shape[0]} sample(s); the stratified {what} split needs "
                            "at least 2 per class")
        n_held = min(idx.shape[0] - 1, max(1, int(round(fraction * idx.shape[0]))))
        held.append(rng.permutation(idx)[:n_held])
    held = np.sort(np.concatenate(held))
    mask = np.ones(y.shape[0], dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def resolve_scaling(X: np.ndarray, method: str) -> str:
    """The scaling ``auto`` stands for: min-max for byte-valued features (images), else standardise."""
    if method != "auto":
        return method
    return "minmax" if X.dtype == np.uint8 else "standard"


def fit_scaling(X: np.ndarray, rows: np.ndarray, method: str):
    """(shift, scale) float32 such that (x - shift) * scale is min-max to [0, 1] or standardised.

    ``method`` "auto" is ``resolve_scaling``'s choice for this array.

    Fitted on ``X[rows]`` in chunks (no float copy of the whole set). Constant features get
    scale 1, so they map to 0.
    """
    n_features = X.shape[1]
    method = resolve_scaling(X, method)
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
