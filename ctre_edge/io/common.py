"""What every reader shares: ``Parsed``, the one-line ``fail``, compact dtypes, label coding, chunked text.

Each reader returns a ``Parsed``: features as uint8 when every value is an integer in [0, 255], else
float32 (which may still hold NaN/Inf: ``data.py`` applies the NaN policy), and labels coded 0..C-1
with the original labels, sorted, in ``classes`` (``code_classes``, the one place labels are coded).
Every problem with the content raises ``DataError`` through ``fail``: one line naming the file, the
line or column, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError

SUPPORTED = ("builtin:NAME, .npz, .csv, .tsv, .txt, .libsvm/.svm/.svmlight, "
             "IDX (*-images-idx3-ubyte[.gz], or IMAGES,LABELS)")

MISSING = ("", "nan", "na", "n/a", "null", "?")  # feature tokens read as NaN (lower case)
_TEXT_CHUNK = 4 << 20  # bytes of text parsed per step
_ROW_CHUNK = 8192


def fail(source, problem: str, fix: str = "") -> DataError:
    """The one formatter for data errors: ``source: problem; fix`` on a single line."""
    text = f"{source}: {problem}" + (f"; {fix}" if fix else "")
    return DataError(" ".join(text.split()))


@dataclass
class Parsed:
    """A parsed source before the NaN policy: X uint8/float32, y int64 codes into ``classes``."""

    X: np.ndarray
    y: np.ndarray
    classes: list
    source: str
    feature_names: list | None = None
    n_nonfinite: int = 0
    first_nonfinite: str = ""


# ---------------------------------------------------------------- shared helpers

def as_bytes(chunk: np.ndarray) -> np.ndarray | None:
    """``chunk`` as uint8 when every value is an integer in [0, 255], else None (NaN gives None).

    Checked by min/max and a uint8 round trip, so the temporaries are a quarter of the chunk.
    """
    if chunk.dtype == np.uint8:
        return chunk
    if chunk.size == 0:
        return chunk.astype(np.uint8)
    if not (chunk.min() >= 0 and chunk.max() <= 255):
        return None
    u = chunk.astype(np.uint8)
    return u if np.array_equal(u, chunk) else None


def is_byte_valued(chunk: np.ndarray) -> bool:
    return as_bytes(chunk) is not None


def compact(X: np.ndarray) -> np.ndarray:
    """X as uint8 when byte-valued, else as float32; checked in row chunks (no float64 copy)."""
    if X.dtype == np.uint8:
        return X
    if X.dtype.kind in "uifb" and all(is_byte_valued(X[s:s + _ROW_CHUNK]) for s in range(0, X.shape[0], _ROW_CHUNK)):
        return X.astype(np.uint8)
    with np.errstate(over="ignore"):  # beyond float32's range is Inf, reported by the NaN/Inf check
        return X if X.dtype == np.float32 else X.astype(np.float32)


def count_nonfinite(X: np.ndarray, describe) -> tuple[int, str]:
    """(number of NaN/Inf values, where the first one is); ``describe(row, col)`` names a place."""
    if X.dtype.kind != "f":
        return 0, ""
    total, first = 0, ""
    for s in range(0, X.shape[0], _ROW_CHUNK):
        bad = ~np.isfinite(X[s:s + _ROW_CHUNK])
        n = int(np.count_nonzero(bad))
        if n and not first:
            i, j = np.argwhere(bad)[0]
            first = describe(s + int(i), int(j))
        total += n
    return total, first


def apply_nan_policy(X: np.ndarray, policy: str, recorded: str, fill, model: str = "the model",
                     source: str = "X") -> np.ndarray:
    """X at prediction time with NaN/Inf handled as at training: refused, or filled from the model.

    ``policy`` "error" refuses the first NaN/Inf with one line naming its row and column (from 1);
    "zero" fills 0; "mean" and "median" fill the training file's per-feature values, which the model
    recorded (``fill``) when it was trained with that policy (``recorded``). X is float32, C-contiguous
    and 2-d; it is copied before filling, never changed in place. ``model`` and ``source`` name the model
and the features in messages.
    """
    if policy not in ("error", "zero", "mean", "median"):
        raise ConfigError(f"'nan_policy' must be one of error, zero, mean, median; got {policy!r}")
    if policy in ("mean", "median") and recorded != policy:
        retrain = f"retrain with --nan-policy {policy}, or pass --nan-policy zero"
        raise ConfigError(f"{model} was trained with --nan-policy {recorded} and records no {policy} statistics; "
                          + (f"pass --nan-policy {recorded} or zero" if recorded in ("mean", "median") else retrain))
    n_bad, first = count_nonfinite(X, lambda i, j: f"row {i + 1}, column {j + 1}")
    if not n_bad:
        return X
    if policy == "error":
        usable = " or ".join(p for p in ("mean", "median") if p == recorded) or ""
        raise DataError(f"{source} has {n_bad} NaN/Inf value(s), the first at {first} (counting from 1); clean "
                        f"them or pass --nan-policy {usable + ' or ' if usable else ''}zero to impute them")
    values = np.zeros(X.shape[1], np.float32) if policy == "zero" else np.asarray(fill, np.float32)
    out = X.copy()
    np.copyto(out, np.broadcast_to(values, out.shape), where=~np.isfinite(out))
    return out


def code_labels(raw: np.ndarray, source, locate) -> tuple[np.ndarray, list]:
    """Code text labels 0..C-1. All integers -> int classes; otherwise the stripped strings.

    ``locate(row)`` names the place of an empty label for the error message.
    """
    raw = np.char.strip(raw.astype(str))
    empty = np.flatnonzero(raw == "")
    if empty.size:
        raise fail(source, f"{locate(int(empty[0]))}: the label is empty", "give every sample a label")
    values = raw
    try:
        values = raw.astype(np.int64)
    except (ValueError, OverflowError):
        try:
            f = raw.astype(np.float64)
            if np.all(np.isfinite(f)) and np.all(f == np.round(f)) and np.all(np.abs(f) < 2.0 ** 53):
                values = f.astype(np.int64)  # "1.0", "-1e0": integer labels written as floats
        except (ValueError, OverflowError):
            pass
    return code_classes(values)


def code_classes(values: np.ndarray) -> tuple[np.ndarray, list]:
    """(codes 0..C-1 as int64, the sorted classes as Python values): the one place labels are coded."""
    classes, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64).reshape(-1), [c.item() for c in classes]


def _column(names, j: int) -> str:
    return f"column {names[j]!r}" if names else f"column {j + 1}"


def _number(token: str) -> float | None:
    """A feature value as float (NaN for a missing token), or None when it is not a number."""
    t = token.strip()
    if t.lower() in MISSING:
        return float("nan")
    if "_" in t:
        return None  # Python accepts 1_000; other tools do not
    try:
        return float(t)
    except ValueError:
        return None


def _upper_line_count(path: Path) -> int:
    """An upper bound on the number of lines, from a binary scan (a hint to size the array)."""
    n_lf = n_cr = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            n_lf += block.count(b"\n")
            n_cr += block.count(b"\r")
    return max(n_lf, n_cr) + 1


class _Rows:
    """A growing (rows x d) array that starts as uint8 and widens to float32 at the first chunk that
    is not byte-valued, preallocated from a line count so loading needs no second copy."""

    def __init__(self, capacity: int, d: int):
        self.capacity, self.d, self.n, self.X = max(1, capacity), d, 0, None

    def add(self, chunk: np.ndarray, as_uint8: np.ndarray | None) -> None:
        """Append a float32 chunk; ``as_uint8`` is its uint8 form when it is byte-valued, else None."""
        if self.X is None:
            self.X = np.empty((self.capacity, self.d), np.float32 if as_uint8 is None else np.uint8)
        elif self.X.dtype == np.uint8 and as_uint8 is None:
            wide = np.empty((self.capacity, self.d), np.float32)
            wide[:self.n] = self.X[:self.n]
            self.X = wide
        if self.X.dtype == np.uint8:
            chunk = as_uint8
        k = chunk.shape[0]
        if self.n + k > self.capacity:  # only when the line count was not an upper bound
            self.capacity = max(2 * self.capacity, self.n + k)
            grown = np.empty((self.capacity, self.d), self.X.dtype)
            grown[:self.n] = self.X[:self.n]
            self.X = grown
        self.X[self.n:self.n + k] = chunk
        self.n += k

    def result(self) -> np.ndarray:
        X = self.X[:self.n]
        return X.copy() if self.capacity - self.n > max(16, self.n // 16) else X


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", newline=None)


def _chunks(f):
    """(first line number, lines) in about 4 MiB steps."""
    lineno = 1
    while lines := f.readlines(_TEXT_CHUNK):
        yield lineno, lines
        lineno += len(lines)




def unreadable(path, kind: str, e: Exception) -> DataError:
    if isinstance(e, MemoryError):
        return fail(path, "does not fit in memory", "use a smaller file or a machine with more memory")
    if isinstance(e, UnicodeError):
        return fail(path, "is not UTF-8 text", f"save it as UTF-8, or use a binary format ({SUPPORTED})")
    if isinstance(e, OSError) and e.strerror:
        return fail(path, f"cannot read the file ({e.strerror})", "check that it exists and is readable")
    kind = {"delimited": "delimited text", "libsvm": "LIBSVM text", "idx": "IDX"}.get(kind, kind)
    return fail(path, f"cannot read as {kind} ({type(e).__name__}: {e})", "check that the file is complete")


def _is_index(s: str) -> bool:
    """A 1-based LIBSVM feature index."""
    return s.isascii() and s.isdigit() and 1 <= int(s) < 2 ** 31


def is_float(s: str) -> bool:
    """Whether ``float(s)`` parses (numbers, "nan", "inf")."""
    try:
        float(s)
        return True
    except ValueError:
        return False


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def from_arrays(X, y, X_test, y_test, source) -> tuple[Parsed, Parsed | None]:
    """(train, test or None) Parsed parts from in-memory arrays: validated, labels coded 0..C-1 (sorted)."""
    if (X_test is None) != (y_test is None):
        raise fail(source, "X_test and y_test must come together")
    parts = []
    for Xp, yp, what in ((X, y, "X"), (X_test, y_test, "X_test")):
        if Xp is None:
            parts.append(None)
            continue
        Xp = _check_X(np.asarray(Xp), source, what)
        yp = _check_y(np.asarray(yp), Xp.shape[0], source, "y" + what[1:])
        codes, classes = code_classes(yp)
        n_bad, where = count_nonfinite(Xp, lambda i, j, w=what: f"{w}[{i}, {j}]")
        parts.append(Parsed(Xp, codes, classes, str(source), None, n_bad, where))
    if parts[1] is not None and parts[1].X.shape[1] != parts[0].X.shape[1]:
        raise fail(source, f"X_test has {parts[1].X.shape[1]} features but X has {parts[0].X.shape[1]}")
    return parts[0], parts[1]


def _check_X(X: np.ndarray, source, what: str) -> np.ndarray:
    """2-d, non-empty, numeric; returned as uint8 (integers in [0, 255]) or float32 (NaN/Inf kept)."""
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise fail(source, f"{what} must be a non-empty 2-d array (samples x features), got shape {X.shape}")
    if X.dtype.kind not in "uifb":
        raise fail(source, f"{what} must be numeric, got dtype {X.dtype}")
    if X.dtype.kind == "f":
        with np.errstate(over="ignore"):
            X = X if X.dtype == np.float32 else X.astype(np.float32)
    else:
        X = compact(X)
    return np.ascontiguousarray(X)


def _check_y(y: np.ndarray, n: int, source, what: str) -> np.ndarray:
    y = y.reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or y.shape[0] != n:
        raise fail(source, f"{what} must hold one label per sample ({n}), got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise fail(source, f"{what} must hold integer or string class labels")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iuUSb":
        raise fail(source, f"{what} must hold integer or string class labels, got dtype {y.dtype}")
    return y
