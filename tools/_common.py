"""What every benchmark in tools/ shares: the machine header, peak memory, data, child runs, formatting.

Run the tools as modules from the repository root (``python -m tools.bench_train``), so they import
this module and the installed ``ctre_edge`` without editing ``sys.path``. Peak memory is the
package's own ``budget.peak_rss_bytes`` (VmHWM; ``ru_maxrss`` inherits a vfork parent's peak).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctre_edge.budget import peak_rss_bytes  # noqa: F401 - re-exported: the tools' one peak-memory reader

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
SEED = 0
LR, MOMENTUM, L2, ZETA, BATCH, EVAL_BATCH = 0.01, 0.9, 1e-4, 0.2, 100, 1000


# --- machine and versions ----------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name, with its x86 family and model numbers where /proc/cpuinfo has them (a
    guest may see only "AMD EPYC", which names no generation)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def blas_name() -> str:
    """numpy's BLAS, and the kernel it chose at run time: OpenBLAS picks one per CPU, and
    ``OPENBLAS_CORETYPE`` can force another (an AVX2 kernel on an AVX-512 CPU halves the float32
    GEMM that the topology update's scoring runs on), so every table says which one ran."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        name = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy has no mode="dicts"
        name = "unknown BLAS"
    from threadpoolctl import threadpool_info

    kernels = sorted({i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"} - {None})
    if kernels:
        name += f", kernel {'/'.join(kernels)}"
    if os.environ.get("OPENBLAS_CORETYPE"):
        name += f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']})"
    return name


def machine_header() -> str:
    """Markdown lines naming the machine, the versions and the load, for the top of every tool's output."""
    import numba

    import ctre_edge

    total, avail = meminfo("MemTotal"), meminfo("MemAvailable")
    mem = f"{total / 2**30:.1f} GiB RAM, {avail / 2**30:.1f} GiB available" if total and avail else "RAM unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores; {mem}; "
            f"load average {load:.2f} at start\n"
            f"Python {platform.python_version()}; numpy {np.__version__} ({blas_name()}); numba {numba.__version__}; "
            f"ctre-edge {ctre_edge.__version__}")


def gemm_gflops(repeats: int = 30) -> float:
    """Dense float32 GEMM rate of this machine: median over ``repeats`` of a 1000x1000 @ 1000x100 product."""
    rng = np.random.default_rng(0)
    a = rng.random((1000, 1000), dtype=np.float32)
    b = rng.random((1000, 100), dtype=np.float32)
    out = np.empty((1000, 100), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2e-9 * 1000 * 1000 * 100 / statistics.median(times)


# --- data ------------------------------------------------------------------------------------------

def default_data_dir() -> Path | None:
    """``./datasets`` if present, else the ``shared/datasets`` folder beside this checkout (as the tests use)."""
    for candidate in (Path("datasets"), REPO.parent / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return None


def find_dataset(name: str, data_dir: str | None) -> Path:
    """``name`` (e.g. mnist.npz) inside --data-dir, or the default data folder; exits with a message if absent."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    path = folder / name if folder is not None else None
    if path is None or not path.exists():
        where = f"in {data_dir}" if data_dir else "in ./datasets or the shared datasets folder"
        raise SystemExit(f"{name} not found {where}; pass --data PATH, --data-dir DIR or --synthetic")
    return path


def synthetic_mnist(n: int = 60000, n_features: int = 784, n_classes: int = 10, seed: int = 0, test: int = 0):
    """An MNIST-shaped uint8 data set: a random template per class plus noise, made in chunks (no big temporaries).

    Returns a ``ctre_edge.data.Dataset`` with ``test`` rows of X_test (none if 0).
    """
    from ctre_edge.data import make_dataset

    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(n_classes, n_features)).astype(np.int16)

    def make(count):
        y = np.arange(count) % n_classes
        rng.shuffle(y)
        X = np.empty((count, n_features), np.uint8)
        for s in range(0, count, 4096):
            e = min(count, s + 4096)
            noise = rng.integers(-80, 81, size=(e - s, n_features), dtype=np.int16)
            X[s:e] = np.clip(templates[y[s:e]] + noise, 0, 255)
        return X, y

    X, y = make(n)
    X_test, y_test = make(test) if test else (None, None)
    return make_dataset(X, y, X_test, y_test, name="synthetic", source="synthetic")


def load_child_data(spec: dict):
    """The data set of a child run: ``synthetic:N`` or an .npz path; the test split is dropped (not timed)."""
    from ctre_edge.data import Dataset, load_data

    if spec["data"].startswith("synthetic:"):
        return synthetic_mnist(int(spec["data"].split(":", 1)[1]))
    d = load_data(spec["data"])
    return Dataset(d.X, d.y, d.classes, None, None, d.name)


def dataset_rows(data) -> tuple[int, int]:
    """(train, validation) rows of a data set without a test part, as ``train.split_data`` splits it."""
    n = data.X.shape[0] if hasattr(data, "X") else data
    n_val = int(round(0.1 * n))
    return n - n_val, n_val


def epoch_record(seconds, t_train, done, n_batches, samples, t_val, val_done, n_val, t_update) -> dict:
    """Timings of one epoch; ``epoch_seconds`` scales the training and validation parts to the whole epoch."""
    extra = 0.0
    if done and done < n_batches:
        extra += t_train * (n_batches / done - 1)
    if val_done and val_done < n_val:
        extra += t_val * (n_val / val_done - 1)
    return {"seconds": seconds, "epoch_seconds": seconds + extra, "train_seconds": t_train, "batches": done,
            "batches_total": n_batches, "samples": samples, "val_seconds": t_val, "val_samples": val_done,
            "val_total": n_val, "update_seconds": t_update}



def epoch_median(history: list[dict]) -> dict:
    """The median epoch of a run (the lower one of an even count)."""
    return sorted(history, key=lambda h: h["epoch_seconds"])[(len(history) - 1) // 2]


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3g}" if s < 100 else f"{s:,.0f}"



# --- child processes -----------------------------------------------------------------------------

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_env(blas_threads: int = 0) -> dict:
    """The environment of a child: BLAS limited to ``blas_threads`` threads (0: the library's default)."""
    env = dict(os.environ)
    if blas_threads:
        env.update({k: str(blas_threads) for k in BLAS_THREAD_VARIABLES})
    return env


def gemm_gflops_with(threads: int) -> float:
    """``gemm_gflops`` in a fresh interpreter whose BLAS uses ``threads`` threads (0: its default)."""
    code = "from tools._common import gemm_gflops; print(gemm_gflops())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(threads),
                         cwd=REPO)
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


def checkout_env(checkout: Path, blas_threads: int = 0) -> dict:
    """The environment of a child that runs another checkout of ctre-edge (e.g. the commit a change
    is measured against): its directory first on PYTHONPATH, so ``import ctre_edge`` and
    ``tools`` load from there, and a numba cache of its own (numba keys the cache by source file),
    unless ``checkout`` is this one (then the caller's cache: the same sources compile the same)."""
    env = child_env(blas_threads)
    env["PYTHONPATH"] = str(checkout)
    if checkout.resolve() == REPO.resolve():
        return env  # this checkout as its own base (the tools' smoke tests): the same sources, the same cache
    # Keyed by the checkout and its kernels' source, so another commit in the same place gets a fresh cache.
    kernels_source = (checkout / "ctre_edge" / "kernels.py").read_bytes()
    digest = hashlib.sha256(str(checkout.resolve()).encode() + kernels_source).hexdigest()[:12]
    env["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"ctre-edge-bench-numba-{digest}")
    return env


def run_child(module: str, spec: dict, timeout: float = 7200, blas_threads: int = 0,
              checkout: Path | None = None) -> dict:
    """Run ``python -m tools.MODULE --child SPEC`` (that tool's ``child(spec)``) in a fresh interpreter,
    from this checkout or from ``checkout``; returns the JSON it prints last, or {"error": last stderr line}."""
    cmd = [sys.executable, "-m", f"tools.{module}", "--child", json.dumps(spec)]
    env = child_env(blas_threads) if checkout is None else checkout_env(checkout, blas_threads)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=REPO if checkout is None else checkout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_kernel_cache() -> None:
    """Compile every kernel into numba's cache (the package's own warm-up), so no timed run compiles."""
    from ctre_edge.warmup import warmup  # loads numba: only tools that train call this

    warmup()


# --- a time box on ctre-edge's epochs, through train()'s RowBudget hook ----------------------------

class TimeBox:
    """A ``train.RowBudget``: within an epoch, training batches run until ``train_budget`` seconds are
    spent (at least ``min_batches``), validation rows until ``val_budget`` (at least one batch); the
    rest of the epoch is skipped and its time extrapolated. With no budgets the epoch runs whole and is
    only timed. ``end_epoch`` (the ``progress`` callback of ``train``) records the epoch.
    """

    def __init__(self, batch_size: int, train_budget=None, val_budget=None, min_batches=2):
        self.bs, self.train_budget, self.val_budget = batch_size, train_budget, val_budget
        self.min_batches = min_batches
        self.records = []
        self.calls = 0
        self._reset()

    def _reset(self):
        self.seconds = {"train": 0.0, "validation": 0.0}
        self.done = {"train": 0, "validation": 0}
        self.total = {"train": 0, "validation": 0}

    def allow(self, part: str, rows: int, remaining: int) -> int:
        self.calls += part == "train"
        if not self.done[part] and not self.total[part]:
            self.total[part] = remaining
        budget = self.train_budget if part == "train" else self.val_budget
        if budget is None:
            return rows
        done, spent = self.done[part], self.seconds[part]
        floor = self.min_batches * self.bs if part == "train" else 1
        if done >= floor and spent >= budget:
            return 0
        if part == "validation":
            return rows
        per_row = spent / done if done else None
        take = self.bs if per_row is None else max(self.bs, int((budget - spent) / per_row) // self.bs * self.bs)
        return min(rows, max(take, floor - done))

    def spent(self, part: str, rows: int, seconds: float) -> None:
        self.done[part] += rows
        self.seconds[part] += seconds

    def end_epoch(self, stats):
        n_batches, done = -(-self.total["train"] // self.bs), -(-self.done["train"] // self.bs)
        self.records.append(epoch_record(stats.seconds, self.seconds["train"], done, n_batches, self.done["train"],
                                         self.seconds["validation"], self.done["validation"],
                                         self.total["validation"], stats.update_seconds))
        self._reset()


def add_update_network_args(ap) -> None:
    """The network and sample options of the tools that time the topology update (bench_update,
    bench_scoring): data, hidden sizes, epochs trained first, epsilon and S."""
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=1000, help="S, samples for the cosine scores")


def load_update_network(args):
    """(data, hidden sizes) from ``add_update_network_args``' options."""
    from ctre_edge.data import load_data

    return load_data(args.data), tuple(int(h) for h in args.hidden.split(","))
