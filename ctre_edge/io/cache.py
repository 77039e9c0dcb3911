"""The parse cache: parsed text and gzipped IDX sources saved next to the input and memory-mapped back.

See ``data.py``'s docstring for the layout and the fingerprint rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import CtreError
from ..fileio import atomic_write
from .common import (
    Parsed,
)

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
