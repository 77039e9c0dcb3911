"""Inference benchmark of the exported ONNX kernels: latency, session memory and file size.

For the paper's network 784-1000-1000-1000-10 and for 784-10000-10000-10000-10 (both Erdos-Renyi,
epsilon 1, random weights: speed and memory do not depend on training), each kernel of
``ctre_edge.export`` is exported once and then measured in a fresh Python process that imports
only numpy and onnxruntime (via ``ctre_edge.runtime``), as on an inference-only device:

- RSS growth: VmRSS after creating the session and one batch-1 prediction, minus VmRSS before;
  peak is VmHWM minus the same baseline (from /proc/self/status, so Linux only).
- latency: median of ``time.perf_counter`` around ``predict_proba`` at batch 1 and batch 64.

Usage: ``python -m tools.bench_infer [--quick] [--threads N]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

from ctre_edge.export import KERNELS, export_onnx
from ctre_edge.layers import erdos_renyi_layer
from ctre_edge.model import SparseMLP
from tools._common import cpu_model

NETWORKS = [[784, 1000, 1000, 1000, 10], [784, 10000, 10000, 10000, 10]]
EPSILON = 1
SHORT = {"sparse-ops": "ops", "dense": "dense", "sparse-initializer": "sp-init"}

# Runs in a fresh interpreter: argv = path, threads (0 = onnxruntime's default), repeats at batch 1, at 64.
CHILD = r"""
import json, sys, time
import numpy as np
from ctre_edge.runtime import OnnxModel

def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024

path, threads, reps1, reps64 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
before = status("VmRSS")
model = OnnxModel(path, threads=threads or None)
X = np.random.default_rng(0).standard_normal((64, model.n_features)).astype(np.float32)
model.predict_proba(X[:1])
out = {"rss": status("VmRSS") - before, "peak": status("VmHWM") - before}
for batch, reps in ((1, reps1), (64, reps64)):
    model.predict_proba(X[:batch])  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.predict_proba(X[:batch])
        times.append(time.perf_counter() - t0)
    out[f"ms{batch}"] = 1e3 * float(np.median(times))
print(json.dumps(out))
"""


def make_model(sizes, epsilon, seed=0):
    rng = np.random.default_rng(seed)
    layers = [erdos_renyi_layer(a, b, epsilon, rng)._replace(bias=rng.normal(0, 0.1, b).astype(np.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    shift = rng.uniform(0, 128, sizes[0]).astype(np.float32)
    scale = np.full(sizes[0], 1 / 64, dtype=np.float32)
    return SparseMLP(layers, shift, scale, list(range(sizes[-1])), {"method": "set", "epsilon": epsilon})


def measure(path: Path, threads: int, reps1: int, reps64: int) -> dict:
    run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads), str(reps1), str(reps64)],
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"measuring {path.name} failed:\n{run.stderr}")
    return json.loads(run.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (finishes in a few minutes)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: one small network
    args = parser.parse_args(argv)
    reps1, reps64 = (50, 20) if args.quick else (500, 100)
    networks = NETWORKS
    if args.smoke:
        reps1, reps64, networks = 3, 2, [[64, 100, 100, 10]]

    print(f"CPU: {cpu_model()} ({platform.machine()}); Python {platform.python_version()}; "
          f"onnxruntime {onnxruntime.__version__}; onnx {onnx.__version__}; numpy {np.__version__}")
    print(f"intra-op threads: {args.threads or 'onnxruntime default'}; median of {reps1} (batch 1) and "
          f"{reps64} (batch 64) runs; RSS in MiB over a fresh process that has imported onnxruntime")
    # Other processes on the machine skew the latencies; the load average says how much to trust them.
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    print("| network | kernel | per layer | file MB | RSS growth | RSS peak | batch 1 ms | batch 64 ms |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for sizes in networks:
            model = make_model(sizes, EPSILON)
            name = "-".join(map(str, sizes)) + f", eps {EPSILON}"
            for kernel in KERNELS:
                path = Path(tmp) / f"{kernel}.onnx"
                report = export_onnx(model, path, kernel=kernel, force=True, check_samples=64)
                m = measure(path, args.threads, reps1, reps64)
                path.unlink()
                per_layer = " ".join(SHORT[k] for k in report["kernels"])
                print(f"| {name} | {kernel} | {per_layer} | {report['file_bytes'] / 1e6:.2f} | {m['rss']:.0f} | "
                      f"{m['peak']:.0f} | {m['ms1']:.3f} | {m['ms64']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
