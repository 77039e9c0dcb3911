"""The parse cache: parsed text and gzipped IDX sources saved uncompressed and memory-mapped back.

By default the cache is in the user cache directory, ``$XDG_CACHE_HOME/ctre-edge/data/`` (default
``~/.cache``), one directory per input named after the input and a hash of its absolute path; with
``beside`` (``train --cache-beside``) it is ``FILE.ctre-cache/`` next to the input when that directory
can be written, else the user cache directory. A location that cannot be written is skipped, so a
read-only data directory (or cache) never fails a run. See ``data.py``'s docstring for the layout and
the fingerprint rule.
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


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/ctre-edge/data``: where parses are cached unless asked to sit beside the input."""
    from .. import user_cache_dir  # the package's own function; the import loads nothing

    return user_cache_dir() / "data"


def cache_dirs(paths: list, beside: bool = False) -> list[Path]:
    """The directories a parse of ``paths`` is looked up in and written to, in that order."""
    first = Path(paths[0])
    where = hashlib.sha256("\0".join(str(Path(p).resolve()) for p in paths).encode()).hexdigest()[:16]
    user = cache_root() / f"{first.name}-{where}"
    return ([first.with_name(first.name + ".ctre-cache")] if beside else []) + [user]


def cache_dir(paths: list, beside: bool = False) -> Path:
    """The directory a new parse of ``paths`` goes to first."""
    return cache_dirs(paths, beside)[0]


def _cache_key(options: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _find(paths: list, options: dict, beside: bool) -> tuple[Path, dict] | None:
    inputs = None
    for d in cache_dirs(paths, beside):
        try:
            meta = json.loads((d / f"{_cache_key(options)}.json").read_text())
            if meta.get("version") != CACHE_VERSION or meta.get("options") != options:
                continue
            inputs = fingerprint(paths) if inputs is None else inputs
            if meta.get("inputs") == inputs:
                return d, meta
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return None


def cache_meta(paths: list, options: dict, beside: bool = False) -> dict | None:
    """The cache's metadata when it matches ``options`` and the inputs as they are now, else None."""
    found = _find(paths, options, beside)
    return None if found is None else found[1]


def cache_load(paths: list, options: dict, beside: bool = False) -> Parsed | None:
    """The cached parse (X memory-mapped copy-on-write), or None when absent, stale or damaged."""
    found = _find(paths, options, beside)
    if found is None:
        return None
    (d, meta), key = found, _cache_key(options)
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


def cache_store(paths: list, options: dict, inputs: list, parsed: Parsed, beside: bool = False) -> Path | None:
    """Write the parse to the first of ``cache_dirs`` that can be written; return it, or None (nothing
    writable: read-only, full disk; the run goes on without a cache).

    The metadata file is written last and names the arrays by the options' key, so a crash or a
    concurrent writer with other options never pairs one parse's metadata with another's arrays.
    """
    key = _cache_key(options)
    meta = {"version": CACHE_VERSION, "options": options, "inputs": inputs, "shape": list(parsed.X.shape),
            "dtype": str(parsed.X.dtype), "classes": parsed.classes, "source": parsed.source,
            "feature_names": parsed.feature_names, "n_nonfinite": parsed.n_nonfinite,
            "first_nonfinite": parsed.first_nonfinite}
    for d in cache_dirs(paths, beside):
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{key}.json").unlink(missing_ok=True)
            for name, arr in (("X", parsed.X), ("y", parsed.y)):
                atomic_write(d / f"{key}.{name}.npy", lambda f, a=arr: np.lib.format.write_array(f, a), force=True)
            text = json.dumps(meta).encode()
            atomic_write(d / f"{key}.json", lambda f: f.write(text), force=True)
        except (OSError, CtreError, TypeError, ValueError):
            continue
        for old in d.iterdir():  # other option sets, or earlier versions of the input
            if not old.name.startswith(key + ".") and old.suffix in (".json", ".npy"):
                try:
                    old.unlink(missing_ok=True)
                except OSError:
                    pass
        return d
    return None
