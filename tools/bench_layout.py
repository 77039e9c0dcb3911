"""Feature-major vs batch-major activations for the CSR kernels: which layout is faster at batch 100?

Prints a markdown table of median microseconds per call (forward, and backward with input and weight
gradients) for a 1000 x 1000 layer at several densities. ctre-edge uses the feature-major layout
(``ctre_edge/kernels.py``); the batch-major kernels here exist only for this comparison.

    python -m tools.bench_layout [--batch 100] [--repeats 200]
"""

import argparse
import platform
import time

import numpy as np
from numba import njit

from ctre_edge import kernels
from ctre_edge.layers import erdos_renyi_layer


@njit(cache=False)
def forward_batch_major(indptr, indices, values, bias, x, out):
    nb = x.shape[0]
    for b in range(nb):
        out[b, :] = bias
        for i in range(indptr.shape[0] - 1):
            xi = x[b, i]
            for p in range(indptr[i], indptr[i + 1]):
                out[b, indices[p]] += values[p] * xi


@njit(cache=False)
def backward_batch_major(indptr, indices, values, x, dy, dx, grad):
    nb = x.shape[0]
    grad[:] = 0.0
    for b in range(nb):
        for i in range(indptr.shape[0] - 1):
            s = np.float32(0.0)
            xi = x[b, i]
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                grad[p] += xi * dy[b, j]
                s += values[p] * dy[b, j]
            dx[b, i] = s


def median_us(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{platform.processor() or platform.machine()}, batch {args.batch}, 1000 x 1000 layer, median us per call\n")
    print("| epsilon | density | forward feature-major | forward batch-major | backward feature-major "
          "| backward batch-major |")
    print("|---|---|---|---|---|---|")
    for eps in (1, 20, 100):
        layer = erdos_renyi_layer(1000, 1000, eps, rng)
        xf = rng.random((1000, args.batch), dtype=np.float32)
        xb = np.ascontiguousarray(xf.T)
        of, ob = np.empty_like(xf), np.empty_like(xb)
        grad = np.empty(layer.nnz, np.float32)
        dxf, dxb = np.empty_like(xf), np.empty_like(xb)
        a = (layer.indptr, layer.indices, layer.values)
        alive = np.ones(xf.shape[0], np.uint8)
        row = [
            median_us(lambda: kernels.sparse_forward(*a, layer.bias, xf, of, alive), args.repeats),
            median_us(lambda: forward_batch_major(*a, layer.bias, xb, ob), args.repeats),
            median_us(lambda: kernels.sparse_backward(*a, xf, of, dxf, grad, True), args.repeats),
            median_us(lambda: backward_batch_major(*a, xb, ob, dxb, grad), args.repeats),
        ]
        print(f"| {eps} | {layer.density:.2%} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


if __name__ == "__main__":
    main()
