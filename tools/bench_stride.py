"""The weight gradient's cost per connection against the row stride of the batch buffers.

The training loop stores a batch's rows ``packed.row_stride(nb)`` floats apart: whole 64-byte lines
from 64 samples on (112 for a batch of 100), in 64-byte-aligned buffers. This times the weight
gradient alone (``kernels.sparse_backward_threads`` without dx, one thread) on a 784 x n_out layer
with a fixed number of connections per input row, for batch 100 at strides 100 (rows packed, as
before), 112 and 128, and for several n_out: dy holds n_out rows, so n_out sets where they come
from (64 rows fit in L1, 1000 in L2). Random activations; the fastest of --repeats calls, in ns
per connection; the gradients are checked to be the same bits at every stride.

    python -m tools.bench_stride [--outputs 64,1000,4000] [--per-row 45] [--repeats 200]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from ctre_edge import kernels
from ctre_edge.packed import aligned_empty
from tools._common import machine_header

BATCH = 100


def rows_at(values: np.ndarray, stride: int) -> np.ndarray:
    """``values`` (n, BATCH) in rows ``stride`` floats apart, from a 64-byte boundary."""
    a = aligned_empty(values.shape[0] * stride).reshape(values.shape[0], stride)
    a[:, :BATCH] = values
    return a


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outputs", default="64,1000,4000", help="n_out values: how many rows dy has")
    ap.add_argument("--per-row", type=int, default=45, help="connections per input row (45: epsilon 20's first layer)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    n_in, strides = 784, (BATCH, 112, 128)
    print(machine_header())
    print(f"\nweight gradient, 784 x n_out, {args.per_row} connections per input row, batch {BATCH}, 1 thread; "
          f"fastest of {args.repeats} calls, ns per connection\n")
    print("| n_out | dy rows in KiB | " + " | ".join(f"stride {s}" for s in strides) + " | same bits |")
    print("|---" * (len(strides) + 3) + "|")
    for n_out in (int(v) for v in args.outputs.split(",")):
        per_row = min(args.per_row, n_out)
        indptr = np.arange(n_in + 1, dtype=np.int64) * per_row
        indices = np.concatenate([np.sort(rng.choice(n_out, per_row, replace=False))
                                  for _ in range(n_in)]).astype(np.int32)
        values = rng.normal(size=indices.size).astype(np.float32)
        x0 = np.maximum(rng.normal(size=(n_in, BATCH)), 0).astype(np.float32)
        dy0 = rng.normal(size=(n_out, BATCH)).astype(np.float32)
        flags_in, flags_out = np.ones(n_in, np.uint8), np.ones(n_out, np.uint8)
        cells, grads = [], []
        for stride in strides:
            x, dy, dx = rows_at(x0, stride), rows_at(dy0, stride), rows_at(np.zeros_like(x0), stride)
            grad = np.empty(indices.size, np.float32)

            def call():
                kernels.sparse_backward_threads(indptr, indices, values, x, dy, dx, grad, flags_in, flags_out,
                                                False, 1, BATCH)

            call()
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - t)
            cells.append(f"{best / indices.size * 1e9:.2f}")
            grads.append(grad.copy())
        same = all(np.array_equal(grads[0], g) for g in grads[1:])
        kib = n_out * BATCH * 4 / 1024
        print(f"| {n_out:,} | {kib:,.0f} | " + " | ".join(cells) + f" | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
