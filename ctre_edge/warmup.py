"""Compile every kernel the trainer uses, ahead of time, into numba's on-disk cache.

numba compiles a kernel on its first call for each argument type (0.35-0.8 s per kernel here, about
ten times that on a Raspberry Pi) and with a higher memory peak than a cached load. ``warmup``
runs tiny trainings that reach every kernel with every feature dtype the data layer produces
(uint8 and float32), so later runs only load from the cache.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

STEPS = [(dtype, method) for dtype in ("uint8", "float32") for method in ("set", "ctre-sim")]


def kernels_cached() -> bool:
    """Whether numba's cache already holds the training kernel for this version of ``kernels.py``.

    A cheap check that does not import numba: an index file for ``train_batches`` newer than the
    kernels' source. (numba's own check, by CPU and signature, happens when the kernel loads.)
    """
    cache = os.environ.get("NUMBA_CACHE_DIR")
    source = Path(__file__).with_name("kernels.py")
    places = [Path(cache)] if cache else []
    places.append(source.parent / "__pycache__")
    try:
        stamp = source.stat().st_mtime
        return any(p.stat().st_mtime >= stamp for place in places if place.is_dir()
                   for p in place.glob("**/kernels.train_batches-*.nbi"))
    except OSError:
        return False


def warmup(step_done=None) -> list[tuple[str, float]]:
    """Run every compile step; ``step_done(name, seconds)`` after each. Returns the timings."""
    from .data import make_dataset
    from .train import TrainConfig, train

    rng = np.random.default_rng(0)
    timings = []
    for dtype, method in STEPS:
        t = time.perf_counter()
        X = rng.integers(0, 255, size=(60, 6)).astype(dtype)
        y = np.arange(60) % 3
        config = TrainConfig(hidden=(5, 4), method=method, epsilon=2, epochs=2, similarity_samples=20)
        train(make_dataset(X, y), config)
        name = f"{method} on {dtype} features"
        timings.append((name, time.perf_counter() - t))
        if step_done is not None:
            step_done(name, timings[-1][1])
    return timings
