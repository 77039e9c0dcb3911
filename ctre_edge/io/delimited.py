"""CSV / TSV / TXT: delimiter and header sniffed, the label column by name or index, parsed in chunks."""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (
    MISSING,
    Parsed,
    _chunks,
    _column,
    _is_int,
    _number,
    _open_text,
    _Rows,
    _upper_line_count,
    as_bytes,
    code_labels,
    fail,
)

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


# --- the entry points of FORMATS ------------------------------------------------------------------

def matches(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".tsv", ".txt")


def parse(paths: list, target, n_features=None):
    return parse_delimited(paths[0], suffix=paths[0].suffix.lower(), target=target), None


def scan(paths: list, target) -> tuple[int, int, int]:
    return scan_delimited(paths[0], suffix=paths[0].suffix.lower(), target=target)


def cache_options(paths: list, target, n_features=None) -> dict:
    """The parse options a cache must match (JSON-native values only)."""
    return {"format": "delimited", "target": target if isinstance(target, (str, type(None))) else int(target)}
