"""LIBSVM / SVMlight: ``label idx:val ...`` with 1-based indices, densified."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .common import (
    Parsed,
    _chunks,
    _is_index,
    _open_text,
    code_labels,
    count_nonfinite,
    fail,
    is_byte_valued,
    is_float,
)

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


# --- the entry points of FORMATS ------------------------------------------------------------------

def matches(path: Path) -> bool:
    return path.suffix.lower() in LIBSVM_SUFFIXES


def parse(paths: list, target, n_features=None):
    return parse_libsvm(paths[0], n_features), None


def scan(paths: list, target) -> tuple[int, int, int]:
    return scan_libsvm(paths[0])


def cache_options(paths: list, target, n_features=None) -> dict:
    return {"format": "libsvm", "n_features": n_features}
