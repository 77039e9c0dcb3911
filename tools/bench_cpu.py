"""CPU seconds of the training kernels on one thread, this checkout against another, in one run.

On a shared machine wall-clock times measure the other jobs as much as the code; the CPU time of a
single-threaded process (``time.process_time``) much less so. For 784-1000-1000-1000-10 at each
epsilon (``ctre_edge.train.init_layers``, seed 0), each child process runs ``kernels.train_batches``
on 2,000 MNIST rows (20 batches of 100, after one warm-up pass) with numba on one thread, three times,
and reports the fastest pass scaled to 540 batches (one MNIST epoch's training part, without the
validation pass and the topology update). The two checkouts' children alternate, --repeats times;
the median is printed. The base checkout runs through PYTHONPATH with its own numba cache.

    python -m tools.bench_cpu --base ../base [--data mnist.npz] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from tools._common import REPO, checkout_env, find_dataset, machine_header

CHILD = r"""
import json, sys, time
import numpy as np
from ctre_edge import kernels as K
from ctre_edge.data import load_data
from ctre_edge.packed import PackedNet, no_csc
from ctre_edge.train import init_layers
d = load_data(sys.argv[1])
out = {}
for eps in json.loads(sys.argv[2]):
    rng = np.random.default_rng(0)
    net = PackedNet.from_layers(init_layers([784, 1000, 1000, 1000, 10], eps, rng))
    bs = 100
    st = K.row_stride(bs) if hasattr(K, "row_stride") else bs  # rows at a stride of whole lines since 2026-12-07
    bufs = (net.activation_buffer(st), np.empty(1000 * st, np.float32), np.empty(1000 * st, np.float32),
            np.empty(int(np.diff(net.nz_off).max()), np.float32), np.empty(1000, np.float32))
    shift, scale = np.zeros(784, np.float32), np.full(784, 1 / 255, np.float32)
    # Kernels after the rewrite take a (here empty: serial) CSC copy of the pattern.
    csc = no_csc() if hasattr(K, "csc_all") else ()
    order = rng.permutation(min(54000, d.X.shape[0]))[:2000]
    run = lambda: K.train_batches(d.X, d.y, order, bs, shift, scale, *net, *bufs, *csc, np.float32(0.01),
                                  np.float32(0.9), np.float32(1e-4), 1)
    run()
    passes = []
    for _ in range(3):
        t = time.process_time()
        run()
        passes.append(time.process_time() - t)
    out[str(eps)] = min(passes) / 20 * 540
print(json.dumps(out))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout of ctre-edge")
    ap.add_argument("--data", help="MNIST .npz (default: mnist.npz in ./datasets or the shared datasets folder)")
    ap.add_argument("--epsilons", default="1,20")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    base = Path(args.base).resolve()
    data = Path(args.data) if args.data else find_dataset("mnist.npz", None)
    eps = [float(e) for e in args.epsilons.split(",")]
    print(machine_header())
    print(f"784-1000-1000-1000-10, batch 100, numba on 1 thread; CPU seconds per 540 training batches "
          f"(fastest of 3 passes of 20 batches), median of {args.repeats} process(es) per checkout, alternated\n")
    results = {"new": [], "base": []}
    for r in range(args.repeats):
        for who in (("new", "base") if r % 2 == 0 else ("base", "new")):
            env = checkout_env(base if who == "base" else REPO)  # "new" keeps the caller's kernel cache
            env["NUMBA_NUM_THREADS"] = "1"
            out = subprocess.run([sys.executable, "-c", CHILD, str(data.resolve()), json.dumps(eps)],
                                 capture_output=True, text=True, env=env, cwd=base if who == "base" else REPO)
            if out.returncode:
                raise SystemExit(f"{who} child failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            results[who].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| eps | this checkout CPU s | base CPU s | speed-up |")
    print("|---|---|---|---|")
    for e in eps:
        new = statistics.median(r[str(e)] for r in results["new"])
        old = statistics.median(r[str(e)] for r in results["base"])
        print(f"| {e:g} | {new:.2f} | {old:.2f} | {old / new:.2f}x |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
