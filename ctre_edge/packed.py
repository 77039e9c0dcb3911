"""The packed network: every layer's arrays concatenated, the form the kernels take.

``PackedNet`` is one record of flat arrays: ``sizes`` = neurons per level ``[n_0, ..., n_L]``,
offsets ``ptr_off`` (into ``indptr``), ``nz_off`` (into ``indices``/``values``) and ``unit_off``
(into the biases of layers 1..L), the CSR arrays, the biases, and, for training, the momentum of
every weight and bias. A layer's connection count never changes during a run, so the offsets are
fixed and a layer is a set of views into the packed arrays (``layer``): a topology update writes
straight into them. Activations of a batch of ``nb`` samples live in one flat buffer, level after
level, each a feature-major ``(n_l, nb)`` block (``level_views``); in training, rows of
``row_stride(nb)`` floats, of which the first nb hold the samples.

numpy only: the model, the planner and the exporter use the packed form without loading numba.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import SparseLayer

# Largest layer (connections) whose forward pass runs in parallel from the CSC copy. That pass reads
# the weights through a permutation; once they no longer fit in the caches, every read is a miss.
# Measured forward, ER epsilon 20 square layers, 2-vCPU AMD EPYC (2 MiB L2 per core), CSR serial vs
# CSC on 2 threads: 40,000 connections 0.80 vs 0.26 ms (batch 100), 800,000 21.8 vs 18.6 ms,
# 2.4 million 6.7 vs 10.1 ms (batch 2) and 42.5 vs 56.2 ms (batch 32).
CSC_MAX_CONNECTIONS = 1 << 20


def no_csc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empty CSC arrays that tell the kernels a network has no CSC copy (see ``csc_buffers``)."""
    return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int32)


def uses_csc(layer_nnz) -> bool:
    """Whether a network with these layer sizes (connections) keeps a CSC copy for the parallel forward."""
    return any(int(z) <= CSC_MAX_CONNECTIONS for z in layer_nnz)


def scores_layers_whole(sizes, workspace_bytes: int, threads: int) -> bool:
    """Whether the exact topology update may score every layer whole on one of ``threads`` threads:
    every layer's float32 scores fit a thread's share of the scoring workspace
    (``evolve.TopologyPolicy._grow_scored_whole``; the planner counts its copies and picks)."""
    return threads > 1 and all(4 * int(a) * int(c) <= workspace_bytes // threads for a, c in zip(sizes[:-1], sizes[1:]))


# Where the largest layer's scoring product (n_in x n_out x S) is at least this, the exact topology
# update quantizes its activation levels for the 8-bit prefilter (similarity.with_codes), which loads
# onnxruntime into the training process (``budget.INT8_RUNTIME_BYTES``, 36 MiB); below it the
# float32 GEMM takes at most about 3 ms a layer (2**28 multiply-adds at the 190 GFLOP/s of one AMD
# EPYC Zen 5 thread, docs/performance-log.md), and the memory would buy little.
INT8_MIN_PRODUCT = 1 << 28
# S * 127 * 127 < 2**31 bounds the 8-bit product's int32 sums (kernels.quantize_levels).
INT8_MAX_SAMPLES = 1 << 17


def uses_int8_codes(sizes, samples: int, workspace_bytes: int) -> bool:
    """Whether the exact topology update of a network with these level sizes, over ``samples``
    samples, quantizes its levels for the 8-bit prefilter: the largest layer's product is at least
    ``INT8_MIN_PRODUCT`` and some level's codes fit the workspace (``similarity.with_codes``)."""
    sizes = [int(n) for n in sizes]
    largest = max(a * c for a, c in zip(sizes[:-1], sizes[1:]))
    return (samples <= INT8_MAX_SAMPLES and largest * samples >= INT8_MIN_PRODUCT
            and any(n * samples <= workspace_bytes for n in sizes))


class PackedNet(NamedTuple):
    """A network packed into flat arrays; the field order is the kernels' argument order.

    ``kernels.forward_all(X, rows, shift, scale, *net.forward, *csc, act)`` (``csc_buffers`` or three
    empty arrays) and
    ``kernels.train_batches(X, y, order, bs, shift, scale, *net, *buffers, ...)`` take it whole.
    ``velocity`` and ``bias_velocity`` are empty for a network packed for inference.
    """

    sizes: np.ndarray  # int64 (L+1,)
    ptr_off: np.ndarray  # int64 (L+1,)
    nz_off: np.ndarray  # int64 (L+1,)
    unit_off: np.ndarray  # int64 (L+1,)
    indptr: np.ndarray  # int64, concatenated per-layer CSR row pointers
    indices: np.ndarray  # int32 column of each connection
    values: np.ndarray  # float32 weight of each connection
    bias: np.ndarray  # float32 biases of levels 1..L
    velocity: np.ndarray  # float32 momentum of each weight (training only)
    bias_velocity: np.ndarray  # float32 momentum of each bias (training only)

    @classmethod
    def from_layers(cls, layers: list[SparseLayer], momentum: bool = True) -> "PackedNet":
        """Copies of ``layers`` packed; with ``momentum``, zero velocities for training."""
        sizes = np.array([layers[0].n_in] + [layer.n_out for layer in layers], dtype=np.int64)
        values = np.concatenate([layer.values for layer in layers])
        bias = np.concatenate([layer.bias for layer in layers])
        return cls(
            sizes,
            np.concatenate([[0], np.cumsum([layer.n_in + 1 for layer in layers])]).astype(np.int64),
            np.concatenate([[0], np.cumsum([layer.nnz for layer in layers])]).astype(np.int64),
            np.concatenate([[0], np.cumsum(sizes[1:])]).astype(np.int64),
            np.concatenate([layer.indptr for layer in layers]),
            np.concatenate([layer.indices for layer in layers]),
            values,
            bias,
            np.zeros_like(values) if momentum else np.empty(0, np.float32),
            np.zeros_like(bias) if momentum else np.empty(0, np.float32),
        )

    @property
    def forward(self) -> tuple:
        """The arrays of a forward pass (everything but the momentum), in kernel order."""
        return self[:8]

    @property
    def n_layers(self) -> int:
        return self.sizes.shape[0] - 1

    def layer(self, l: int) -> SparseLayer:
        """Layer ``l`` as views into the packed arrays."""
        p, z, u = slice(self.ptr_off[l], self.ptr_off[l + 1]), slice(self.nz_off[l], self.nz_off[l + 1]), \
            slice(self.unit_off[l], self.unit_off[l + 1])
        return SparseLayer(int(self.sizes[l]), int(self.sizes[l + 1]), self.indptr[p], self.indices[z],
                           self.values[z], self.bias[u])

    def layer_velocity(self, l: int) -> np.ndarray:
        return self.velocity[self.nz_off[l]:self.nz_off[l + 1]]

    def snapshot(self) -> list[SparseLayer]:
        """Copies of the current layers (indices too: the topology moves every epoch)."""
        return [SparseLayer(*(a.copy() if isinstance(a, np.ndarray) else a for a in self.layer(l)))
                for l in range(self.n_layers)]

    def csc_buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arrays for a CSC copy of the pattern, as ``kernels.csc_all`` fills them and the parallel
        forward pass of ``kernels.train_batches`` reads them: ``colptr`` (int64, ``n_out + 1`` per
        layer), ``rowidx`` and ``perm`` (int32, one per connection; 8 bytes per connection in all).
        Empty when no layer has at most ``CSC_MAX_CONNECTIONS`` connections (``uses_csc``)."""
        n = self.indices.shape[0]
        if not uses_csc(np.diff(self.nz_off)):
            return no_csc()
        if np.diff(self.nz_off).max(initial=0) >= 2**31:
            raise ValueError("a layer has 2**31 or more connections; the CSC copy indexes them with int32")
        return (np.empty(int(self.sizes[1:].sum()) + self.n_layers, np.int64), np.empty(n, np.int32),
                np.empty(n, np.int32))

    def activation_buffer(self, nb: int) -> np.ndarray:
        """A flat float32 buffer for the activations of every level of ``nb`` samples."""
        return aligned_empty(int(self.sizes.sum()) * nb)


# The training loop stores a batch's rows (a level's activations or gradients, one row per neuron)
# at a stride of whole 64-byte lines from batches of this size on: 112 floats for a batch of 100. The
# weight gradient reads one row of dy per connection, and a 400-byte row splits most of its vector
# loads across cache lines: on a 784 x 1000 layer at 45 connections per row, with dy in L2, it took
# 8.0-11.4 ns per connection at a stride of 100 against 5.4-9.4 at 112 in four runs of
# tools/bench_stride.py (2-vCPU Intel Xeon; the same bits). The padding is never read nor written. Smaller batches keep
# their rows packed: the padding would be a larger share of them.
PADDED_MIN_BATCH = 64
LINE_FLOATS = 16  # float32 values per 64-byte cache line


def row_stride(nb):
    """The row stride, in floats, of a training batch of ``nb`` samples (``PADDED_MIN_BATCH``)."""
    return nb if nb < PADDED_MIN_BATCH else (nb + LINE_FLOATS - 1) // LINE_FLOATS * LINE_FLOATS


def aligned_empty(n: int) -> np.ndarray:
    """``np.empty(n, np.float32)`` starting on a 64-byte boundary, so that rows at a stride of whole
    lines (``row_stride``) start on one too (numpy aligns to 16 bytes only)."""
    buf = np.empty(n + LINE_FLOATS, np.float32)
    skip = (-buf.ctypes.data % 64) // 4
    return buf[skip:skip + n]


def level_views(act: np.ndarray, sizes: np.ndarray, nb: int, stride: int | None = None) -> list:
    """Per-level (n_l, nb) views of a flat activation buffer laid out as in ``kernels.forward_all``,
    or, with ``stride``, as in ``kernels.train_batches``: rows ``stride`` floats apart, of which the
    views show the first nb (then not contiguous)."""
    stride = nb if stride is None else stride
    bounds = np.concatenate([[0], np.cumsum(sizes)]) * stride
    return [act[bounds[l]:bounds[l + 1]].reshape(int(sizes[l]), stride)[:, :nb] for l in range(sizes.shape[0])]
