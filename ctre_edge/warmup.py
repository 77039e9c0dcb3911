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
import sys
import time
from pathlib import Path

import numpy as np

from .budget import SCIPY_BYTES, TRAINING_HEADROOM, MiB, peak_rss_bytes, scipy_installed
from .errors import BudgetError, ConfigError
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


# Peak RSS of a cold-cache warmup, measured with `/usr/bin/time -v` on a 2-vCPU AMD EPYC (x86-64),
# Python 3.11.7, numba 0.68.1 (2026-12-02), libraries' page cache dropped first: every step in one
# process (`ctre-edge warmup`: 297-306 MiB in five runs since the scoring kernels were rewritten, 302
# twice after the lane kernels of the weight gradient; 288 before both), and the largest of the steps
# run one per fresh process (`python -m ctre_edge.warmup 0 0 -1`, the first step, which compiles the
# kernels every step shares: 242 MiB twice, 240 before the lane kernels; the others 150-202 MiB).
# Measured again the same way on 2026-12-04, on another 2-vCPU AMD EPYC (Zen 3): 336 MiB in one process
# and 252 MiB for the first step, twice each, with the short rows' lanes (kernels.lane_pairs4) and for
# the commit before them alike (337 and 252): that machine's figure, not the change's.
# On 2026-12-07, on a 2-vCPU Intel Xeon (family 6 model 207), the same two ways (`/usr/bin/time -v`
# around `warmup()` in one process; around `python -m ctre_edge.warmup "0;1;2;3;4" 0 -1`, which execs
# one image per step): 339 and 265 MiB before the topology update packed its activation levels, 350
# and 266 after (the ctre-sim step 228 against 215). On 2026-12-08, on a 2-vCPU AMD EPYC (Zen 5),
# the same two ways: 368 and 270 MiB before the 8-bit prefilter's kernels (6c60a4d), 377 and 270
# after them (twice each; 367 with them before their row skips), and 380 and 270 once both
# prefilters' scan passes shared their per-row steps (_admit_lower, _offer_row). The one-process
# figure below is the Zen 3 one plus those 11 and 13 MiB.
WARMUP_PEAK_BYTES = 361 << 20
WARMUP_STEP_PEAK_BYTES = 252 << 20


def plan_warmup(profile) -> list[list[int]]:
    """How ``warmup`` compiles under ``profile``: groups of STEPS, each group in a fresh process image.

    One group (this process) when the one-process peak fits the profile's usable training budget
    (the same headroom as a training plan), else one step per group; BudgetError (exit code 3) when
    even the largest single step would not fit. No profile: one group.
    """
    everything = [list(range(len(STEPS)))]
    if profile is None:
        return everything
    if not profile.can_train or not profile.train_budget_bytes:
        raise ConfigError(f"profile {profile.name} does not train (inference only); warmup compiles the "
                          "training kernels, which it never runs")
    usable = int(TRAINING_HEADROOM * profile.train_budget_bytes)
    # with scipy installed numba imports it: the largest step measured 246 MiB instead of 232
    extra = SCIPY_BYTES if scipy_installed() else 0
    if WARMUP_PEAK_BYTES + extra <= usable:
        return everything
    if WARMUP_STEP_PEAK_BYTES + extra <= usable:
        return [[i] for i in range(len(STEPS))]
    raise BudgetError(f"warmup's compile peak is about {(WARMUP_PEAK_BYTES + extra) / MiB:.0f} MiB in one process "
                      f"and {(WARMUP_STEP_PEAK_BYTES + extra) / MiB:.0f} MiB one step at a time; {profile.name} allows "
                      f"{usable / MiB:.0f} MiB ({TRAINING_HEADROOM:.0%} of its budget); compile on a larger board "
                      "with the same CPU and copy its kernel cache (--cache-dir)")


def exec_groups(groups: list[list[int]], started: float) -> None:
    """Compile ``groups`` one after the other, each in a fresh image of this process (``os.execv``).

    numba keeps what it compiled for the life of a process; replacing the process image between
    groups returns that memory, so the peak is that of the largest group, not of all of them, and no
    parent process stays resident beside the compiling one. Does not return: the last image prints
    the summary and exits (0, or 1 with one line). The cache's lock is taken here and its file
    descriptor passed down the chain, so it is held until the last group ends.
    """
    lock = compile_lock()
    lock.__enter__()
    fd = getattr(lock, "fd", None)
    if fd is not None:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "ctre_edge.warmup", _encode(groups), str(started),
                              str(-1 if fd is None else fd)])


def _encode(groups) -> str:
    return ";".join(",".join(map(str, g)) for g in groups)


def _chain(argv) -> int:
    """One image of ``exec_groups``: compile the first group, then exec the rest or finish."""
    groups = [[int(i) for i in g.split(",")] for g in argv[0].split(";")]
    started, fd = float(argv[1]), int(argv[2])
    try:
        for name, seconds in _compile_all(None, set(groups[0])):
            print(f"  {name}: {seconds:.1f} s (this process's peak so far {peak_rss_bytes() / MiB:.0f} MiB)",
                  file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - the chain's own one-line error handler (the CLI has exec'd away)
        print(f"error: warmup step {groups[0]} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if len(groups) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "ctre_edge.warmup", _encode(groups[1:]), argv[1], argv[2]])
    mark_cached()
    print(f"kernels ready in {time.time() - started:.1f} s (a fresh process image per group); "
          f"cache: {os.environ.get('NUMBA_CACHE_DIR')}", file=sys.stderr)
    if fd >= 0:
        os.close(fd)
    return 0


def steps_for(dtype, method: str, similarity: str) -> set[int]:
    """The warmup steps that compile what a run with these features and settings calls."""
    dtype = str(np.dtype(dtype))
    wanted = {(dtype, "set", "exact")}
    if method.startswith("ctre"):
        # the sketch kernels do not depend on the feature dtype (see STEPS)
        wanted.add((dtype, "ctre-sim", "exact") if similarity == "exact" else ("uint8", "ctre-sim", "sketch"))
    return {i for i, step in enumerate(STEPS) if step in wanted}


def compile_if_cold(steps=None, on_wait=None) -> bool:
    """Run the warmup ``steps`` (all by default) unless the cache is warm, under the cache's lock.

    A cold training run calls this with ``steps_for`` its data and settings before it trains, so
    concurrent cold runs compile once (the others wait, then load from the cache) and each compiles
    no more than it would have on its own. Returns whether the cache was cold here.
    """
    with compile_lock(on_wait):
        if kernels_cached():  # another process filled the cache while this one waited
            return False
        _compile_all(None, steps)
        return True


def _compile_all(step_done, steps=None) -> list[tuple[str, float]]:
    """Run the compile steps (indices into STEPS; all by default), then mark the cache ready if all ran."""
    from .data import make_dataset  # with train below: numba loads here, not when the cache is checked
    from .similarity import topk_cosine
    from .train import TrainConfig, train

    timings = []
    for i, (dtype, method, similarity) in enumerate(STEPS):
        if steps is not None and i not in steps:
            continue
        t = time.perf_counter()
        X = np.random.default_rng(i).integers(0, 255, size=(60, 6)).astype(dtype)
        y = np.arange(60) % 3
        config = TrainConfig(hidden=(5, 4), method=method, epsilon=2, epochs=2, similarity_samples=20,
                             similarity=similarity, sketch_dim=8)
        train(make_dataset(X, y), config)
        if method == "ctre-sim" and similarity == "exact":
            # Where fewer than k free positions score above 0, the rest are taken in position order,
            # by a kernel that a run this small may not reach: all-zero activations do.
            topk_cosine(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.array([0, 1, 1]),
                        np.array([0], np.int32), 2)
            # Large networks take the 8-bit prefilter (packed.uses_int8_codes), small ones and signed
            # inputs the float32 one: both get compiled, the 8-bit one's kernels on a product made
            # here, without loading onnxruntime (36 MiB) into warmup.
            a = np.random.default_rng(i).random((4, 9), dtype=np.float32)
            topk_cosine(a, a, np.zeros(5, np.int64), np.empty(0, np.int32), 3, prefilter="float32")
            _compile_int8_scan(a)
        name = f"{method} on {dtype} features" + (" (sketch)" if similarity == "sketch" else "")
        timings.append((name, time.perf_counter() - t))
        if step_done is not None:
            step_done(name, timings[-1][1])
    if steps is None:
        mark_cached()
    return timings


def _compile_int8_scan(a) -> None:
    # The 8-bit prefilter's kernels (similarity._scan_topk with codes), on the codes of ``a`` against
    # themselves, no position kept, k = 3.
    from . import kernels as ks  # as in _compile_all: numba loads here, not when the cache is checked
    from .similarity import neuron_stats

    inv, _ = neuron_stats(a)
    codes, stats = np.empty(a.shape, np.int8), np.empty((4, a.shape[0]))
    ks.quantize_levels(a, inv, codes, stats)
    dots = (codes.astype(np.int64) @ codes.astype(np.int64).T).astype(np.int32)
    n, k = a.shape[0], 3
    csr = (np.zeros(n + 1, np.int64), np.empty(0, np.int32), np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))
    state = np.zeros(3, np.int64)
    bound = ks.scan_q8_lower(dots, 0, *csr, stats, stats, np.empty(2 * k + n), k, state)
    ks.scan_q8_rescore(dots, 0, *csr, stats, stats, a, a, inv, inv, bound, np.empty(k, np.float32),
                       np.empty(k, np.int64), state)


if __name__ == "__main__":  # one image of exec_groups: python -m ctre_edge.warmup "0;1;2" STARTED LOCKFD
    sys.exit(_chain(sys.argv[1:]))
