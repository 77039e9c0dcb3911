"""MNIST-style IDX files (optionally gzipped): images flatten to rows, labels from the paired file."""

from __future__ import annotations

import gzip
import os
import re
import struct
from pathlib import Path

import numpy as np

from .common import (
    Parsed,
    code_classes,
    compact,
    count_nonfinite,
    fail,
)

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
    codes, classes = code_classes(y)
    return Parsed(np.ascontiguousarray(X), codes, classes, str(images), None, n_bad, first)


# --- the entry points of FORMATS ------------------------------------------------------------------

def matches(path: Path) -> bool:
    return bool(IDX_PATTERN.search(path.name))


def inputs(path: Path) -> list:
    return [path, idx_labels_path(path)]


def parse(paths: list, target, n_features=None):
    return parse_idx(*paths), None


def shape(paths: list, test: bool = False):
    """(samples, features, classes, 1 byte per value) from the images header and the labels, or None."""
    dims, _ = idx_shape(paths[0])
    y = read_idx(paths[1])
    if len(dims) >= 2 and y.ndim == 1:
        return dims[0], int(np.prod(dims[1:])), int(np.unique(y).shape[0]), 1
    return None


def cache_options(paths: list, target, n_features=None) -> dict | None:
    """Only gzipped IDX is worth caching (plain IDX is already a flat array on disk)."""
    if not any(p.name.lower().endswith(".gz") for p in paths):
        return None
    return {"format": "idx", "labels": paths[-1].name}
