"""Data formats, one module each, and ``FORMATS``: the one table every dispatch in ``data.py`` reads.

``delimited`` (CSV/TSV/TXT), ``libsvm``, ``idx`` (MNIST), ``npz`` and the shipped ``builtin`` sets;
the parse ``cache``; what they share in ``common``. A ``Format`` says how to recognise a file, which
files it reads, how to parse them, how to learn their shape without parsing, and which parse options
a cached copy must match. ``data.py`` assembles a ``Dataset`` from what they read.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

from . import delimited, idx, libsvm, npz


class Format(NamedTuple):
    name: str
    matches: Callable | None  # (path) -> whether a single given file is of this format
    inputs: Callable | None  # (path) -> the files it reads (IDX adds the labels file)
    parse: Callable  # (paths, target, n_features) -> (Parsed, its own test part or None)
    shape: Callable | None = None  # (paths, test) -> (n, d, classes, bytes/value) from headers, or None
    scan: Callable | None = None  # (paths, target) -> (n, d, classes) of a large text file without parsing
    cache_options: Callable | None = None  # (paths, target, n_features) -> options a cache must match, or None
    test_rows: Callable | None = None  # (paths) -> rows of the file's own test part


def _builtin(paths, target, n_features):
    with resources.as_file(resources.files("ctre_edge") / "datasets" / f"{paths[0]}.npz") as p:
        return npz.parse([Path(p)], target, n_features, source=f"builtin:{paths[0]}")


FORMATS = {
    "builtin": Format("builtin", None, None, _builtin),
    "idx": Format("idx", idx.matches, idx.inputs, idx.parse, shape=idx.shape, cache_options=idx.cache_options),
    "npz": Format("npz", npz.matches, lambda path: [path], npz.parse,
                  shape=lambda paths, test: npz.shape(paths[0], test), test_rows=lambda paths: npz.test_rows(paths[0])),
    "delimited": Format("delimited", delimited.matches, lambda path: [path], delimited.parse, scan=delimited.scan,
                        cache_options=delimited.cache_options),
    "libsvm": Format("libsvm", libsvm.matches, lambda path: [path], libsvm.parse, scan=libsvm.scan,
                     cache_options=libsvm.cache_options),
}
