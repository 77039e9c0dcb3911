"""Parsers for the text and IDX data formats, and the cache of their parsed arrays.

Each parser returns a ``Parsed``: features as uint8 when every value is an integer in [0, 255], else
float32 (which may still hold NaN/Inf: ``data.py`` applies the NaN policy), and labels coded 0..C-1
with the original labels, sorted, in ``classes``. Text is read in chunks of about 4 MiB into one
preallocated array, so the peak is the final array plus a chunk, never a list of every value.

Every problem with the content raises ``DataError`` through ``fail``: one line naming the file, the
line or column, and the fix.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CtreError, DataError
from .fileio import atomic_write

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


# ---------------------------------------------------------------- CSV / TSV / TXT

DELIMITERS = {".csv": ",", ".tsv": "\t"}


@dataclass
class _Layout:
    delim: str | None
    ncols: int
    names: list | None  # header fields, or None without a header
    header_line: int  # 0 without a header
    target: int


def _layout(path: Path, suffix: str, target) -> _Layout:
    """Delimiter, column count, header and target column, from the first 20 non-blank lines."""
    with _open_text(path) as f:
        head = []  # (line number, text)
        for n, line in enumerate(f, 1):
            if line.strip():
                head.append((n, line))
                if len(head) == 20:
                    break
    if not head:
        raise fail(path, "the file is empty or has only blank lines", "give one sample per line")
    delim = DELIMITERS.get(suffix) or _sniff([t for _, t in head], path)
    rows = [_split(t, delim, path, n) for n, t in head]
    ncols = len(rows[0])
    if ncols < 2:
        raise fail(path, f"line {head[0][0]} has {ncols} field{'s' * (ncols != 1)}",
                   f"a data file needs feature columns and a label column, separated by {_delimiter_name(delim)}")
    has_header = _is_header(rows, target)
    names = [c.strip() for c in rows[0]] if has_header else None
    return _Layout(delim, ncols, names, head[0][0] if has_header else 0, _resolve_target(target, names, ncols, path))


def parse_delimited(path: Path, *, suffix: str, target=None) -> Parsed:
    """Read delimited text: a header row is optional, the label column is ``target`` (default last)."""
    lay = _layout(path, suffix, target)
    cols = [j for j in range(lay.ncols) if j != lay.target]
    feature_names = [lay.names[j] for j in cols] if lay.names else None
    p = _DelimitedChunk(path, lay, cols)
    store = _Rows(_upper_line_count(path) - (1 if lay.names else 0), len(cols))
    labels, label_lines = [], []
    n_bad, first_bad = 0, ""
    with _open_text(path) as f:
        for start, lines in _chunks(f):
            lines, linenos = _drop_blank(lines, start, lay.header_line)
            if not lines:
                continue
            X, y = p.convert(lines, linenos)
            X8 = as_bytes(X)
            if X8 is None:
                bad = ~np.isfinite(X)
                k = int(np.count_nonzero(bad))
                if k and not first_bad:
                    i, j = np.argwhere(bad)[0]
                    first_bad = f"line {linenos[i]}, {_column(feature_names, j)}"
                n_bad += k
            store.add(X, X8)
            labels.append(y)
            label_lines.append(linenos)
    if store.n == 0:
        raise fail(path, "has a header but no data rows", "add samples below the header")
    codes, classes = _code_chunks(labels, label_lines, path, lay)
    return Parsed(store.result(), codes, classes, str(path), feature_names, n_bad, first_bad)


def scan_delimited(path: Path, *, suffix: str, target=None) -> tuple[int, int, int]:
    """(samples, features, classes) from the header and the label column only, for the planner."""
    lay = _layout(path, suffix, target)
    p = _DelimitedChunk(path, lay, [j for j in range(lay.ncols) if j != lay.target])
    labels, label_lines = [], []
    with _open_text(path) as f:
        for start, lines in _chunks(f):
            lines, linenos = _drop_blank(lines, start, lay.header_line)
            if lines:
                labels.append(p.labels(lines, linenos))
                label_lines.append(linenos)
    if not labels:
        raise fail(path, "has a header but no data rows", "add samples below the header")
    codes, classes = _code_chunks(labels, label_lines, path, lay)
    return codes.shape[0], lay.ncols - 1, len(classes)


def _code_chunks(labels, label_lines, path, lay):
    label_lines = np.concatenate(label_lines)
    return code_labels(np.concatenate(labels), path,
                       lambda r: f"line {label_lines[r]}, {_column(lay.names, lay.target)}")


def _drop_blank(lines: list, start: int, header_line: int):
    if start > header_line and not any(line.isspace() for line in lines):
        return lines, np.arange(start, start + len(lines))
    kept = [(n, line) for n, line in enumerate(lines, start) if n > header_line and not line.isspace()]
    return [line for _, line in kept], np.array([n for n, _ in kept], dtype=np.int64)


def _delimiter_name(delim) -> str:
    return {",": "commas", "\t": "tabs", ";": "semicolons", "|": "'|'", None: "whitespace"}[delim]


def _sniff(lines: list, path: Path):
    """The delimiter of a .txt file: one of , tab ; | found the same number of times on every sampled
    line, else whitespace when that splits every line into the same number (> 1) of fields."""
    for d in (",", "\t", ";", "|"):
        counts = {line.count(d) for line in lines}
        if len(counts) == 1 and counts.pop() > 0:
            return d
    counts = {len(line.split()) for line in lines}
    if len(counts) == 1 and counts.pop() > 1:
        return None
    raise fail(path, "cannot tell the delimiter of this .txt file from its first lines",
               "save it as .csv (commas) or .tsv (tabs)")


def _split(text: str, delim, path: Path, lineno: int) -> list:
    if delim is None:
        return text.split()
    try:
        return next(csv.reader([text], delimiter=delim, quotechar='"'), [])
    except csv.Error as e:
        raise fail(path, f"line {lineno}: {e}", "fix the quoting on that line") from None


def _is_header(rows: list, target) -> bool:
    """A first row is a header when it names the target, or when a column that is numeric on the next
    rows is not numeric on it."""
    first = [c.strip() for c in rows[0]]
    if isinstance(target, str) and target.strip() in first and not _is_int(target):
        return True
    later = [r for r in rows[1:] if len(r) == len(first)]
    if not later:  # a single row: a header only when nothing on it is a number
        return all(_number(c) is None for c in first)
    for j, c in enumerate(first):
        if _number(c) is None and all(_number(r[j]) is not None for r in later) \
                and any(r[j].strip().lower() not in MISSING for r in later):
            return True
    return False


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


def _resolve_target(target, names, ncols: int, path: Path) -> int:
    if target is None:
        return ncols - 1
    if isinstance(target, str):
        s = target.strip()
        if names is not None and s in names:
            return names.index(s)
        if not _is_int(s):
            if names is None:
                raise fail(path, f"target column {target!r} not found: the file has no header row",
                           "give the label column's index instead (0-based, -1 = last)")
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise fail(path, f"target column {target!r} not found among the columns {shown}",
                       "give one of these names or a column index")
        index = int(s)
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        index = int(target)
    else:
        raise fail(path, f"target must be a column name or index, got {target!r}")
    if not -ncols <= index < ncols:
        raise fail(path, f"target column index {index} is out of range for {ncols} columns",
                   f"use 0..{ncols - 1} or -{ncols}..-1")
    return index % ncols


class _DelimitedChunk:
    """Converts a list of lines with one np.loadtxt call (C speed) into a record of features before
    the label, the label as text, and features after it; loadtxt also checks the field count. On any
    failure, missing tokens are read as NaN and, failing that, a line-by-line pass names the line."""

    _LABEL_WIDTH = 32  # longer labels are read again without a width limit

    def __init__(self, path: Path, lay: _Layout, cols: list):
        self.path, self.delim, self.ncols, self.t, self.names = path, lay.delim, lay.ncols, lay.target, lay.names
        self.cols = cols
        self.record = np.dtype([("a", np.float32, (lay.target,)), ("y", f"U{self._LABEL_WIDTH}"),
                                ("b", np.float32, (lay.ncols - lay.target - 1,))])
        self.kw = dict(delimiter=lay.delim, comments=None, ndmin=1)
        if lay.delim is not None:
            self.kw["quotechar"] = '"'
            d, space = re.escape(lay.delim), "[ ]" if lay.delim == "\t" else "[ \t]"
            # a whole unquoted field that is empty or a missing token: read it as nan
            self.missing = re.compile(rf"(?<![^{d}]){space}*(?:na|n/a|null|\?|){space}*(?=[{d}\r\n]|$)", re.I)
        else:
            self.missing = re.compile(r"(?<!\S)(?:na|n/a|null|\?)(?!\S)", re.I)

    def convert(self, lines: list, linenos: np.ndarray):
        try:
            X, y = self._load(lines)
        except ValueError:
            try:
                X, _ = self._load([self.missing.sub("nan", line) for line in lines])
                y = self.labels(lines, linenos)  # from the text as written: an empty label stays empty
            except ValueError:
                return self._slow(lines, linenos)
        width = int(np.char.str_len(y).max()) if y.size else 1
        if width >= self._LABEL_WIDTH:
            y = self.labels(lines, linenos)
        return X, y.astype(f"U{max(width, 1)}") if width < self._LABEL_WIDTH else y

    def _load(self, lines):
        with warnings.catch_warnings(), np.errstate(over="ignore"):
            warnings.simplefilter("ignore")
            rec = np.loadtxt(lines, dtype=self.record, **self.kw)
        if rec.shape[0] != len(lines):
            raise ValueError("loadtxt skipped lines")
        a, b = rec["a"], rec["b"]
        X = b if a.shape[1] == 0 else a if b.shape[1] == 0 else np.hstack([a, b])
        return X, rec["y"].copy()  # a copy: a view would keep the whole record chunk alive

    def labels(self, lines: list, linenos: np.ndarray) -> np.ndarray:
        """The label column only, for the planner's scan and for long labels."""
        self._check_fields(lines, linenos)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = np.loadtxt(lines, dtype=str, usecols=[self.t], **self.kw)
            if y.shape[0] == len(lines):
                return y
        except ValueError:
            pass
        return self._slow(lines, linenos, features=False)[1]

    def _check_fields(self, lines, linenos):
        if self.delim is None:
            counts = [len(line.split()) for line in lines]
        else:
            counts = [line.count(self.delim) + 1 for line in lines]
        for i, c in enumerate(counts):
            if c != self.ncols:  # a quoted delimiter is not a field separator: count again properly
                c = len(_split(lines[i], self.delim, self.path, linenos[i]))
                if c != self.ncols:
                    raise fail(self.path, f"line {linenos[i]} has {c} field{'s' * (c != 1)}, expected {self.ncols}",
                               "every line needs the same number of columns")

    def _slow(self, lines, linenos, features=True):
        X = np.empty((len(lines), len(self.cols)), np.float32)
        labels = []
        for i, line in enumerate(lines):
            fields = _split(line, self.delim, self.path, linenos[i])
            if len(fields) != self.ncols:
                raise fail(self.path, f"line {linenos[i]} has {len(fields)} fields, expected {self.ncols}",
                           "every line needs the same number of columns")
            for k, j in enumerate(self.cols if features else ()):
                v = _number(fields[j])
                if v is None:
                    raise fail(self.path, f"line {linenos[i]}, {_column(self.names, j)}: {fields[j].strip()!r} "
                               "is not a number", "fix the value, or pass --target if this is the label column")
                with np.errstate(over="ignore"):
                    X[i, k] = v
            labels.append(fields[self.t])
        return X, np.array(labels, dtype=str)


# ---------------------------------------------------------------- LIBSVM / SVMlight

LIBSVM_SUFFIXES = (".libsvm", ".svm", ".svmlight")
_LIBSVM_LINE = re.compile(r"\s*(\S+)((?:\s+qid:\S+)?)((?:\s+[^\s:]+:[^\s:]+)*)\s*")


def parse_libsvm(path: Path, n_features: int | None = None) -> Parsed:
    """Read ``label idx:val ...`` lines (1-based indices, ``#`` comments, ``qid:`` ignored) and
    densify to (n, max index), or to ``n_features`` columns for a test file.

    One pass, in one function: the chunked parse keeps its running maxima and buffers in locals.

    The model's input layer reads dense rows, so the sparse file is expanded: n x max_index bytes
    when the values are integers in [0, 255], four times that otherwise, plus 12 bytes per stored
    value while parsing.
    """
    labels, label_lines, parts = [], [], []
    row = 0
    with _open_text(path) as f:
        for start, lines in _chunks(f):
            texts, counts, rows0 = [], [], row
            for n, line in enumerate(lines, start):
                text = line.split("#", 1)[0] if "#" in line else line
                if not text or text.isspace():
                    continue  # blank or comment line
                m = _LIBSVM_LINE.fullmatch(text)
                if m is None:
                    _libsvm_error(path, n, line)
                labels.append(m.group(1))
                label_lines.append(n)
                texts.append(m.group(3))
                counts.append(m.group(3).count(":"))
                row += 1
            if not texts:
                continue
            try:
                pairs = np.array(" ".join(texts).replace(":", " ").split(), dtype=np.float64).reshape(-1, 2)
            except ValueError:
                for n, line in enumerate(lines, start):
                    _libsvm_check_tokens(path, n, line)
                raise
            rows = np.repeat(np.arange(rows0, row, dtype=np.int64), counts)
            idx, vals = pairs[:, 0], pairs[:, 1]
            bad = np.flatnonzero((idx != np.floor(idx)) | (idx < 1) | (idx > 2 ** 31 - 1))
            if bad.size:
                n = label_lines[int(rows[bad[0]])]
                _libsvm_check_tokens(path, n, lines[n - start])
                raise fail(path, f"line {n}: a feature index is not a positive integer", "LIBSVM indices are 1-based")
            cols = idx.astype(np.int64) - 1
            key = np.sort(rows * 2 ** 31 + cols)
            dup = np.flatnonzero(key[1:] == key[:-1])
            if dup.size:
                r, c = divmod(int(key[dup[0]]), 2 ** 31)
                raise fail(path, f"line {label_lines[r]}: feature index {c + 1} appears twice",
                           "give each index once per line")
            with np.errstate(over="ignore"):
                parts.append((rows, cols.astype(np.int32), vals.astype(np.float32)))
    if row == 0:
        raise fail(path, "the file has no samples", "give one 'label index:value ...' line per sample")
    max_index = max((int(c.max()) + 1 for _, c, _ in parts if c.size), default=0)
    d = max_index if n_features is None else n_features
    if max_index > d:
        raise fail(path, f"has feature index {max_index} but the training data has {d} features",
                   "use a test file with the same features")
    if d == 0:
        raise fail(path, "no sample has any feature", "give features as index:value pairs")
    byte_valued = all(is_byte_valued(v) for _, _, v in parts)
    X = np.zeros((row, d), np.uint8 if byte_valued else np.float32)
    for r, c, v in parts:
        X[r, c] = v
    n_bad, first_bad = count_nonfinite(X, lambda i, j: f"line {label_lines[i]}, feature {j + 1}")
    label_lines = np.asarray(label_lines)
    codes, classes = code_labels(np.array(labels, dtype=str), path, lambda r: f"line {label_lines[r]}")
    return Parsed(X, codes, classes, str(path), None, n_bad, first_bad)


def scan_libsvm(path: Path) -> tuple[int, int, int]:
    """(samples, a lower bound on the features, classes): labels and each line's last index only."""
    labels, d = [], 0
    with _open_text(path) as f:
        for line in f:
            tokens = (line.split("#", 1)[0] if "#" in line else line).split()
            if tokens:
                labels.append(tokens[0])
                i = tokens[-1].partition(":")[0] if len(tokens) > 1 else ""
                d = max(d, int(i)) if _is_index(i) else d
    if not labels:
        raise fail(path, "the file has no samples", "give one 'label index:value ...' line per sample")
    _, classes = code_labels(np.array(labels, dtype=str), path, lambda r: f"sample {r + 1}")
    return len(labels), max(d, 1), len(classes)


def _libsvm_error(path, n, line):
    _libsvm_check_tokens(path, n, line)
    raise fail(path, f"line {n} is not in LIBSVM format", "write 'label index:value index:value ...'")


def _libsvm_check_tokens(path, n, line):
    tokens = line.split("#", 1)[0].split()
    for k, tok in enumerate(tokens[1:]):
        if k == 0 and tok.startswith("qid:"):
            continue
        i, sep, v = tok.partition(":")
        if not (sep and _is_index(i) and ":" not in v and is_float(v)):
            raise fail(path, f"line {n}: bad token {tok!r}",
                       "LIBSVM features are index:value with a 1-based integer index and a number")


# ---------------------------------------------------------------- IDX (MNIST)

IDX_PATTERN = re.compile(r"[.-]idx\d+-ubyte(\.gz)?$", re.I)
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_MAX_BYTES = 1 << 36


def idx_labels_path(images: Path) -> Path:
    """The conventional labels file: train-images-idx3-ubyte -> train-labels-idx1-ubyte."""
    name = re.sub(r"idx3", "idx1", images.name.replace("images", "labels"), flags=re.I)
    candidates = [images.with_name(name)]
    candidates.append(images.with_name(name[:-3] if name.endswith(".gz") else name + ".gz"))
    for c in candidates:
        if c.exists():
            return c
    raise fail(images, f"labels file {candidates[0].name} not found next to the images",
               "give both files as IMAGES,LABELS")


def _idx_open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _idx_header(f, path: Path) -> tuple[tuple, np.dtype, int]:
    """(dimensions, big-endian dtype, header bytes) after checking the magic number."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or magic[3] == 0:
        raise fail(path, f"not an IDX file (magic bytes {magic.hex() or 'missing'})",
                   "expected 00000803 for images or 00000801 for labels; check the file and its download")
    ndim = magic[3]
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise fail(path, "is truncated inside its header", "download the file again")
    return struct.unpack(f">{ndim}I", raw), np.dtype(_IDX_TYPES[magic[2]]), 4 + 4 * ndim


def idx_shape(path: Path) -> tuple[tuple, np.dtype]:
    """Dimensions and dtype from the header only."""
    with _idx_open(path) as f:
        dims, dtype, _ = _idx_header(f, path)
    return dims, dtype


def read_idx(path: Path) -> np.ndarray:
    """An IDX array in its stored shape, native byte order; checks magic, dimensions and length."""
    with _idx_open(path) as f:
        dims, dtype, header = _idx_header(f, path)
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize
        if nbytes > _IDX_MAX_BYTES:
            raise fail(path, f"header claims {nbytes} bytes of data (dimensions {dims})", "the file is corrupt")
        if not isinstance(f, gzip.GzipFile):
            have = os.fstat(f.fileno()).st_size - header
            if have != nbytes:
                what = "is truncated" if have < nbytes else "has extra bytes after the data"
                raise fail(path, f"{what}: dimensions {dims} need {nbytes} bytes, the file has {have}",
                           "download the file again")
        out = np.empty(nbytes, np.uint8)  # filled as the data arrives: a lying .gz header costs no memory
        got, view = 0, memoryview(out)
        while got < nbytes and (k := f.readinto(view[got:got + (16 << 20)])):
            got += k
        if got < nbytes:
            raise fail(path, f"is truncated: dimensions {dims} need {nbytes} bytes, got {got}",
                       "download the file again")
        if f.read(1):
            raise fail(path, f"has extra bytes after the data of dimensions {dims}", "download the file again")
    arr = out.view(dtype).reshape(dims)
    return arr if dtype.itemsize == 1 and dtype.kind == "u" else arr.astype(dtype.newbyteorder("="))


def parse_idx(images: Path, labels: Path) -> Parsed:
    X = read_idx(images)
    if X.ndim < 2:
        raise fail(images, f"holds a 1-d array {X.shape}, not images", "give the images file first: IMAGES,LABELS")
    y = read_idx(labels)
    if y.ndim != 1:
        raise fail(labels, f"holds a {y.ndim}-d array, not labels", "give the labels (idx1) file second: IMAGES,LABELS")
    if X.shape[0] != y.shape[0]:
        raise fail(images, f"has {X.shape[0]} images but {labels.name} has {y.shape[0]} labels",
                   "pair images and labels from the same set")
    if X.size == 0:
        raise fail(images, f"holds no pixels (dimensions {X.shape})", "give a non-empty images file")
    X = X.reshape(X.shape[0], -1)
    with np.errstate(over="ignore"):  # beyond float32's range is Inf, reported by the NaN/Inf check
        X = X.astype(np.float32) if X.dtype.kind == "f" else X
    n_bad, first = count_nonfinite(X, lambda i, j: f"image {i}, pixel {j}")
    X = X if n_bad else compact(X)
    if y.dtype.kind == "f":
        if not (np.all(np.isfinite(y)) and np.all(y == np.round(y))):
            raise fail(labels, "holds non-integer labels", "labels must be integer class numbers")
        y = y.astype(np.int64)
    classes, codes = np.unique(y, return_inverse=True)
    return Parsed(np.ascontiguousarray(X), codes.astype(np.int64), [c.item() for c in classes], str(images),
                  None, n_bad, first)


# ---------------------------------------------------------------- the parse cache

CACHE_VERSION = 1
_EDGE = 1 << 20


def fingerprint(paths: list) -> list:
    """Size, mtime and a sha256 of the first and last MiB of each input."""
    out = []
    for p in paths:
        st = os.stat(p)
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(_EDGE))
            if st.st_size > _EDGE:
                f.seek(max(_EDGE, st.st_size - _EDGE))
                h.update(f.read())
        out.append({"name": Path(p).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()})
    return out


def cache_dir(paths: list) -> Path:
    first = Path(paths[0])
    return first.with_name(first.name + ".ctre-cache")


def _cache_key(options: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_meta(paths: list, options: dict) -> dict | None:
    """The cache's metadata when it matches ``options`` and the inputs as they are now, else None."""
    try:
        meta = json.loads((cache_dir(paths) / f"{_cache_key(options)}.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("options") != options:
            return None
        if meta.get("inputs") != fingerprint(paths):
            return None
        return meta
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def cache_load(paths: list, options: dict) -> Parsed | None:
    """The cached parse (X memory-mapped copy-on-write), or None when absent, stale or damaged."""
    meta = cache_meta(paths, options)
    if meta is None:
        return None
    key, d = _cache_key(options), cache_dir(paths)
    try:
        X = np.load(d / f"{key}.X.npy", mmap_mode="c", allow_pickle=False)
        y = np.load(d / f"{key}.y.npy", allow_pickle=False)
        if (list(X.shape) != meta["shape"] or str(X.dtype) != meta["dtype"] or y.shape != (X.shape[0],)
                or y.dtype != np.int64 or (y.size and not 0 <= y.min() <= y.max() < len(meta["classes"]))):
            return None
        return Parsed(X.view(np.ndarray), y, meta["classes"], meta["source"], meta["feature_names"],
                      meta["n_nonfinite"], meta["first_nonfinite"])
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def cache_store(paths: list, options: dict, inputs: list, parsed: Parsed) -> None:
    """Write the parse next to the input; any failure (read-only directory, full disk) is skipped.

    The metadata file is written last and names the arrays by the options' key, so a crash or a
    concurrent writer with other options never pairs one parse's metadata with another's arrays.
    """
    d, key = cache_dir(paths), _cache_key(options)
    meta = {"version": CACHE_VERSION, "options": options, "inputs": inputs, "shape": list(parsed.X.shape),
            "dtype": str(parsed.X.dtype), "classes": parsed.classes, "source": parsed.source,
            "feature_names": parsed.feature_names, "n_nonfinite": parsed.n_nonfinite,
            "first_nonfinite": parsed.first_nonfinite}
    try:
        d.mkdir(exist_ok=True)
        (d / f"{key}.json").unlink(missing_ok=True)
        for name, arr in (("X", parsed.X), ("y", parsed.y)):
            atomic_write(d / f"{key}.{name}.npy", lambda f, a=arr: np.lib.format.write_array(f, a), force=True)
        text = json.dumps(meta).encode()
        atomic_write(d / f"{key}.json", lambda f: f.write(text), force=True)
        for old in d.iterdir():  # other option sets, or earlier versions of the input
            if not old.name.startswith(key + ".") and old.suffix in (".json", ".npy"):
                old.unlink(missing_ok=True)
    except (OSError, CtreError, TypeError, ValueError):
        pass
