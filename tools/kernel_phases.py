"""Seconds per call of each training-kernel phase, for ``tools/bench_train.py``'s phase table.

Run as a script (``python tools/kernel_phases.py SPEC``), not as a module, so that the
``ctre_edge`` it times is whichever one PYTHONPATH names: this checkout's, or another commit's.
Prints one JSON document.
"""

import inspect
import json
import statistics
import sys
import time

import numba
import numpy as np

from ctre_edge import kernels
from ctre_edge.layers import erdos_renyi_layer


def phase_child(spec: dict) -> dict:
    """Seconds per call of each kernel phase on the layers of 784-h-h-h-10 at spec["epsilon"]
    (random ReLU-like activations, batch spec["batch"]); works on this checkout and on older ones."""
    rng = np.random.default_rng(0)
    if spec.get("threads"):
        numba.set_num_threads(spec["threads"])
    threads = numba.get_num_threads()
    nb, repeats = spec["batch"], spec["repeats"]
    sizes = [784] + [spec["hidden"]] * 3 + [10]
    skips = hasattr(kernels, "backward_rows")  # kernels that skip dead neurons' connections
    split = skips or hasattr(kernels, "weight_gradient_rows")  # kernels after the weight/input gradient split
    # kernels whose forward by columns also flags the dead neurons
    flags_arg = split and "alive" in inspect.signature(kernels.forward_cols.py_func).parameters

    def median_seconds(f):
        f()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    # Kernels since 2026-12-07 take the samples as an argument and run, as in training, on rows at a
    # stride of whole 64-byte lines (``row_stride``, 112 floats for a batch of 100), from aligned buffers.
    strided = hasattr(kernels, "row_stride")
    stride = kernels.row_stride(nb) if strided else nb
    count = (nb,) if strided else ()

    def rows_of(n, values=None):  # packed.aligned_empty's steps: older checkouts have no such function
        buf = np.empty(n * stride + 16, np.float32)
        skip = (-buf.ctypes.data % 64) // 4
        a = buf[skip:skip + n * stride].reshape(n, stride)
        if values is not None:
            a[:, :nb] = values
        return a

    rows = []
    for l in range(len(sizes) - 1):
        layer = erdos_renyi_layer(sizes[l], sizes[l + 1], spec["epsilon"], rng)
        x = rows_of(sizes[l], np.maximum(rng.normal(size=(sizes[l], nb)), 0))
        dy = rows_of(sizes[l + 1], rng.normal(size=(sizes[l + 1], nb)))
        out, dx, grad = rows_of(sizes[l + 1]), rows_of(sizes[l]), np.empty(layer.nnz, np.float32)
        a = (layer.indptr, layer.indices, layer.values)
        row = {"layer": f"{sizes[l]}x{sizes[l + 1]}", "nnz": layer.nnz}
        if split:
            csc = (np.empty(sizes[l + 1] + 1, np.int64), np.empty(layer.nnz, np.int32), np.empty(layer.nnz, np.int32))
            kernels.csc_from_csr(layer.indptr, layer.indices, *csc)
            flags_out = (np.empty(sizes[l + 1], np.uint8),) if flags_arg else ()  # relu_alive's, fused
            row["forward"] = median_seconds(lambda: kernels.sparse_forward_threads(
                *csc, layer.values, layer.bias, x, out, True, *flags_out, threads, *count))
            if skips:  # flags of dead neurons (random activations have none) and list scratch
                flags = (np.ones(sizes[l], np.uint8), np.ones(sizes[l + 1], np.uint8))
                # Kernels from 2026-12-01 to 2026-12-07 took scratch for their lists of live connections.
                listed = "live" in inspect.signature(kernels.sparse_backward_threads.py_func).parameters
                live = (np.empty(2 * kernels.LIVE_CHUNK * threads, np.int64),) if listed else ()
                row["weight gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                    *a, x, dy, dx, grad, *flags, False, threads, *live, *count))
                row["weight + input gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                    *a, x, dy, dx, grad, *flags, True, threads, *live, *count))
            else:
                row["weight gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                    *a, x, dy, dx, grad, False, False, threads))
                row["weight + input gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                    *a, x, dy, dx, grad, True, True, threads))
        else:
            row["forward"] = median_seconds(lambda: kernels.sparse_forward(*a, layer.bias, x, out))
            row["weight gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                *a, x, dy, dx, grad, False, threads))
            row["weight + input gradient"] = median_seconds(lambda: kernels.sparse_backward_threads(
                *a, x, dy, dx, grad, True, threads))
        rows.append(row)
    return {"rows": rows, "threads": threads}


if __name__ == "__main__":
    print(json.dumps(phase_child(json.loads(sys.argv[1]))))
