"""The .npz reader: X, y and optional X_test, y_test, read from headers and streamed in chunks."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .common import fail, from_arrays, is_byte_valued, unreadable


def read_arrays(path: Path) -> tuple:
    """(X, y, X_test or None, y_test or None) of an .npz data file, streamed member by member."""
    try:
        with zipfile.ZipFile(path) as z:
            keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
            missing = {"X", "y"} - keys
            if missing:
                raise fail(path, f"missing array(s) {', '.join(sorted(missing))}",
                           "an .npz data file needs X (samples x features) and y (labels)")
            X, y = read_member(z, "X", compact=True), read_member(z, "y")
            X_test = read_member(z, "X_test", compact=True) if "X_test" in keys else None
            y_test = read_member(z, "y_test") if "y_test" in keys else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged archives fail in many ways (zlib, struct, EOF, ...)
        raise unreadable(path, ".npz", e) from None
    return X, y, X_test, y_test


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


def read_member(z: zipfile.ZipFile, key: str, compact: bool = False) -> np.ndarray:
    """Read one array of an .npz, streaming rows in chunks (no whole-array temporary).

    With ``compact``, numeric features that are integers in [0, 255] are stored as uint8 as they
    stream in; at the first chunk that is not, the array switches to float32.
    """
    with z.open(key + ".npy") as f:
        shape, fortran, dtype = _read_header(f)
        if dtype.hasobject:
            raise fail(z.filename, f"{key} holds Python objects", "store numbers or strings (no pickle)")
        if fortran or len(shape) != 2 or not compact or dtype.kind not in "fiub":
            count = int(np.prod(shape)) if shape else 1
            data = f.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise fail(z.filename, f"{key} is truncated", "write the file again")
            arr = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
            return arr.copy() if not arr.flags.writeable else arr
        n, d = shape
        out = np.empty(shape, dtype=np.uint8)
        row_bytes = d * dtype.itemsize
        step = max(1, (8 << 20) // max(1, row_bytes))
        for s in range(0, n, step):
            rows = min(step, n - s)
            data = f.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise fail(z.filename, f"{key} is truncated", "write the file again")
            chunk = np.frombuffer(data, dtype=dtype).reshape(rows, d)
            if out.dtype == np.uint8 and not is_byte_valued(chunk):
                wide = np.empty(shape, dtype=np.float32)
                wide[:s] = out[:s]
                out = wide
            with np.errstate(over="ignore"):
                out[s:s + rows] = chunk
        return out


def test_rows(path: Path) -> int:
    try:
        with zipfile.ZipFile(path) as z:
            return npz_header(z, "X_test")[0][0] if "X_test.npy" in z.namelist() else 0
    except Exception as e:  # noqa: BLE001
        raise unreadable(path, "npz", e) from None


def shape(path: Path, test: bool = False) -> tuple[int, int, int, int] | None:
    """(samples, features, classes, 1 byte per value as a lower bound) from the headers and labels of
    X, y (or X_test, y_test with ``test`` when present); None when the file lacks them."""
    with zipfile.ZipFile(path) as z:
        keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        x, y = ("X_test", "y_test") if test and {"X_test", "y_test"} <= keys else ("X", "y")
        dims = npz_header(z, x)[0] if {x, y} <= keys else ()
        if len(dims) != 2:
            return None
        return dims[0], dims[1], int(np.unique(read_member(z, y)).shape[0]), 1  # uint8 at least


# --- the entry points of FORMATS ------------------------------------------------------------------

def matches(path: Path) -> bool:
    return path.suffix.lower() == ".npz"


def parse(paths: list, target=None, n_features=None, *, source: str | None = None):
    """(train, test or None) Parsed parts of an .npz data file."""
    return from_arrays(*read_arrays(paths[0]), str(paths[0]) if source is None else source)
