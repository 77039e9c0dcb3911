"""Compile every kernel the trainer uses, ahead of time, into numba's on-disk cache.

numba compiles a kernel on its first call for each argument type (0.35-0.8 s per kernel here, about
ten times that on a Raspberry Pi) and with a higher memory peak than a cached load. ``warmup``
runs tiny trainings that reach every kernel with every feature dtype the data layer produces
(uint8 and float32), so later runs only load from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import time
from pathlib import Path

import numpy as np

from .fileio import FileLock

STEPS = [(dtype, method, "exact") for dtype in ("uint8", "float32") for method in ("set", "ctre-sim")]
STEPS.append(("uint8", "ctre-sim", "sketch"))  # the sketch kernels do not depend on the feature dtype


def _marker() -> Path | None:
    """A file in the kernel cache that says: these kernels were compiled on this kind of CPU.

    Named after a hash of ``kernels.py`` and of the CPU model, as numba keys its own cache, so a
    new version of the kernels or another CPU reads as cold.
    """
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        return None
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu += "".join(line for line in f if line.startswith(("model name", "CPU part", "flags")))[:4096]
    except OSError:
        pass
    source = Path(__file__).with_name("kernels.py").read_bytes()
    digest = hashlib.sha256(source + cpu.encode()).hexdigest()[:20]
    return Path(cache) / f"ctre-edge-ready-{digest}"


def kernels_cached() -> bool:
    """Whether ``warmup`` (or a finished training run) has compiled these kernels on this CPU.

    Cheap and without importing numba, for the planner and the "compiling" notice; numba's own
    check, by source, CPU and signature, happens when a kernel loads.
    """
    marker = _marker()
    return marker is not None and marker.exists()


def mark_cached() -> None:
    """Record that the kernels are in the cache (after warmup or a completed training run)."""
    marker = _marker()
    if marker is not None:
        try:
            marker.touch()
        except OSError:
            pass  # an unwritable cache only costs the notice and the planner's compile allowance


def compile_lock(on_wait=None):
    """The kernel cache's lock (``fileio.FileLock``, waiting): one process at a time compiles into it.

    numba writes each kernel's index and data files separately; two processes compiling into one cold
    cache would both do the work and rewrite each other's index. The second one waits here and then
    loads what the first compiled. ``on_wait()`` is called before it waits.
    """
    cache = os.environ.get("NUMBA_CACHE_DIR")
    if not cache:
        return contextlib.nullcontext()
    return FileLock(Path(cache) / "ctre-edge-compile.lock", on_wait=on_wait)


def warmup(step_done=None, on_wait=None) -> list[tuple[str, float]]:
    """Run every compile step, holding the cache's lock; ``step_done(name, seconds)`` after each.

    Returns the timings.
    """
    with compile_lock(on_wait):
        return _compile_all(step_done)


def compile_if_cold(on_wait=None) -> bool:
    """Compile every kernel (as ``warmup``) unless the cache is warm, under the cache's lock.

    A cold training run calls this before it trains, so concurrent cold runs compile once and the
    others wait and load. Returns whether this process compiled.
    """
    with compile_lock(on_wait):
        if kernels_cached():  # another process filled the cache while this one waited
            return False
        _compile_all(None)
        return True


def _compile_all(step_done) -> list[tuple[str, float]]:
    from .data import make_dataset  # with train below: numba loads here, not when the cache is checked
    from .train import TrainConfig, train

    rng = np.random.default_rng(0)
    timings = []
    for dtype, method, similarity in STEPS:
        t = time.perf_counter()
        X = rng.integers(0, 255, size=(60, 6)).astype(dtype)
        y = np.arange(60) % 3
        config = TrainConfig(hidden=(5, 4), method=method, epsilon=2, epochs=2, similarity_samples=20,
                             similarity=similarity, sketch_dim=8)
        train(make_dataset(X, y), config)
        name = f"{method} on {dtype} features" + (" (sketch)" if similarity == "sketch" else "")
        timings.append((name, time.perf_counter() - t))
        if step_done is not None:
            step_done(name, timings[-1][1])
    mark_cached()
    return timings
