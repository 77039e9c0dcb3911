"""The training kernels of this checkout against another's, alternating in ONE process.

On a shared machine the speed of the whole machine drifts by tens of percent within minutes, which
swamps a difference between two runs made one after the other, even alternated process by process.
Here both checkouts' ``kernels.py`` are loaded into the same process (each as a standalone module:
they import only numpy and numba) and ``train_batches`` of each runs on the same network and the
same MNIST batches, the two alternating pass by pass; the fastest pass of each is reported, and
whether the two trained networks are bit-identical. The network is 784-h-h-h-10 as
``ctre_edge.train.init_layers`` draws it (seed 0), untrained: dead neurons, which the kernels skip,
are more frequent at initialisation than after some training. Training batches only: no validation
pass and no topology update. Compiles both checkouts' kernels first (numba's cache is a temporary
directory, since kernels loaded this way cannot be reloaded from it).

    python -m tools.bench_ab --base ../base [--data mnist.npz] [--epsilons 1,20] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from tools._common import REPO, find_dataset, machine_header


def load_kernels(checkout: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, checkout / "ctre_edge" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout of ctre-edge")
    ap.add_argument("--data", help="MNIST .npz, or builtin:digits (default: mnist.npz in ./datasets or the shared "
                    "datasets folder)")
    ap.add_argument("--epsilons", default="1,20")
    ap.add_argument("--threads", default="1,2", help="numba thread counts to run")
    ap.add_argument("--hidden", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100, help="samples per batch")
    ap.add_argument("--batches", type=int, default=100, help="batches per pass")
    ap.add_argument("--passes", type=int, default=15, help="passes per checkout (alternating)")
    args = ap.parse_args(argv)
    base = Path(args.base).resolve()
    if not (base / "ctre_edge" / "kernels.py").exists():
        raise SystemExit(f"--base: no ctre_edge/kernels.py in {base}")
    data = args.data or str(find_dataset("mnist.npz", None))
    if not data.startswith("builtin:") and not Path(data).exists():
        raise SystemExit(f"--data: {data} does not exist")
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-ab-")  # before numba loads
    import numba
    import numpy as np

    from ctre_edge.data import load_data
    from ctre_edge.packed import CSC_MAX_CONNECTIONS, PackedNet, aligned_empty
    from ctre_edge.train import init_layers

    print(machine_header())
    print(f"base: {base}")
    this, other = load_kernels(REPO, "kernels_this"), load_kernels(base, "kernels_base")
    d = load_data(data)
    h, bs = args.hidden, args.batch
    sizes = [d.X.shape[1], h, h, h, len(np.unique(d.y))]
    shift, scale = np.zeros(sizes[0], np.float32), np.full(sizes[0], 1 / 255, np.float32)
    print(f"\n{'-'.join(map(str, sizes))}, batch {bs}, {args.batches} batches per pass, fastest of "
          f"{args.passes} passes per checkout, alternating; ms per pass\n")
    print("| eps | threads | this checkout ms | base ms | speed-up | same bits |")
    print("|---|---|---|---|---|---|")
    for eps in [float(e) for e in args.epsilons.split(",")]:
        layers = init_layers(sizes, eps, np.random.default_rng(0))
        order = np.random.default_rng(1).permutation(d.X.shape[0])[:args.batches * bs]
        for threads in [int(t) for t in args.threads.split(",")]:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

            def one_pass(K):
                net = PackedNet.from_layers(layers)
                csc = ()
                if hasattr(K, "csc_all"):  # kernels after the rewrite take the CSC copy of the pattern
                    # which the trainer keeps on any thread count since the forward pass by output rows
                    # runs serially too (older kernels read it only on 2 or more threads)
                    csc = net.csc_buffers()
                    if csc[0].shape[0]:  # empty when no layer is small enough to have one
                        K.csc_all(*net[:6], *csc, CSC_MAX_CONNECTIONS)
                # Kernels since 2026-12-07 store a batch's rows at a stride of whole cache lines.
                stride = K.row_stride(bs) if hasattr(K, "row_stride") else bs
                bufs = (net.activation_buffer(stride), aligned_empty(max(sizes) * stride),
                        aligned_empty(max(sizes) * stride), np.empty(int(np.diff(net.nz_off).max()), np.float32),
                        np.empty(max(sizes[1:]), np.float32))
                t = time.perf_counter()
                K.train_batches(d.X, d.y, order, bs, shift, scale, *net, *bufs, *csc, np.float32(0.01),
                                np.float32(0.9), np.float32(1e-4), threads)
                return time.perf_counter() - t, net

            one_pass(this), one_pass(other)  # compile
            times = {"this": [], "base": []}
            for _ in range(args.passes):
                for name, K in (("this", this), ("base", other)):
                    seconds, net = one_pass(K)
                    times[name].append(seconds)
                    if name == "this":
                        mine = net
                    else:
                        same = all(np.array_equal(a, b) for a, b in zip(mine, net))
            a, b = min(times["this"]), min(times["base"])
            print(f"| {eps:g} | {threads} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | {'yes' if same else 'no'} |",
                  flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
