"""Sparse layers in sparse form: CSR arrays of length nnz, Erdos-Renyi initialisation, structure checks.

A layer maps ``n_in`` inputs to ``n_out`` outputs, ``y = x @ W + b``. ``W`` is stored as CSR over
input rows: the connections of input ``i`` are ``indices[indptr[i]:indptr[i+1]]`` (output columns,
strictly ascending) with weights ``values[indptr[i]:indptr[i+1]]``. Nothing here ever allocates an
``n_in x n_out`` array. This module imports numpy only.

References
----------
Atashgahi et al., "A Brain-inspired Algorithm for Training Highly Sparse Neural Networks",
Machine Learning 111, 2022. docs/algorithm.md, "Where the first connections go".
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import INITS


class SparseLayer(NamedTuple):
    """One sparse weight layer. The arrays may be views into a trainer's packed buffers.

    Attributes
    ----------
    n_in, n_out : int
    indptr : ndarray of int64, shape (n_in + 1,)
    indices : ndarray of int32, shape (nnz,)  -- output neuron of each connection
    values : ndarray of float32, shape (nnz,)
    bias : ndarray of float32, shape (n_out,)
    """

    n_in: int
    n_out: int
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    bias: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / (self.n_in * self.n_out)

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.values.nbytes + self.bias.nbytes)

    def rows(self) -> np.ndarray:
        """Input neuron of each connection (int64, shape (nnz,)): COO rows from the CSR pointer."""
        return np.repeat(np.arange(self.n_in, dtype=np.int64), np.diff(self.indptr))


def er_nnz(n_in: int, n_out: int, epsilon: float) -> int:
    """Connections of an Erdos-Renyi layer: ``min(n_in*n_out, round(epsilon*(n_in+n_out)))``."""
    return int(min(n_in * n_out, max(1, round(epsilon * (n_in + n_out)))))


def sample_positions(total: int, k: int, excluded: np.ndarray, rng: np.random.Generator,
                     with_order: bool = False):
    """Draw ``k`` distinct linear positions uniformly from ``[0, total)`` minus ``excluded``.

    ``excluded`` is a sorted int64 array of distinct positions. The result (int64, in draw order)
    depends only on the arguments and the generator state. Memory is O(k + len(excluded)): when the
    free positions are plentiful we draw with rejection; only when ``total`` itself is of that
    order do we enumerate the free positions. With ``with_order``, also the permutation that sorts
    the result (``np.argsort(result)``; the positions are distinct), which the first round of the
    rejection gets from its one sort of the draws instead of sorting again.
    """
    n_excl = int(excluded.shape[0])
    free = total - n_excl
    if k > free:
        raise ValueError(f"cannot draw {k} positions: only {free} of {total} are free")
    if k == 0:
        chosen = np.empty(0, dtype=np.int64)
        return (chosen, np.empty(0, dtype=np.int64)) if with_order else chosen
    if total <= 4 * (k + n_excl) + 1024:
        # Dense enough that rejection would stall; total is O(k + n_excl) here, so enumerating is cheap.
        mask = np.ones(total, dtype=bool)
        mask[excluded] = False
        candidates = np.flatnonzero(mask)
        chosen = candidates[rng.choice(candidates.shape[0], size=k, replace=False)].astype(np.int64)
        return (chosen, np.argsort(chosen)) if with_order else chosen
    chosen = np.empty(0, dtype=np.int64)
    while chosen.shape[0] < k:
        need = k - chosen.shape[0]
        draw = rng.integers(0, total, size=int(need * total / free * 1.1) + 16, dtype=np.int64)
        # Looked up in sorted order: random probes into a large ``excluded`` miss the cache (3x
        # slower on 1.7 million exclusions); the kept draws stay in draw order.
        m = draw.shape[0]
        if total <= (2**63 - 1) // m:
            # The stable argsort by a plain sort of one int64 key per draw, value * m + draw index
            # (it cannot overflow here): same order, 2.4x faster on 7 million draws.
            key = np.sort(draw * m + np.arange(m, dtype=np.int64))
            by_value, in_order = key % m, key // m
        else:
            by_value = np.argsort(draw, kind="stable")
            in_order = draw[by_value]
        if n_excl:
            pos = np.searchsorted(excluded, in_order)
            pos[pos == n_excl] = n_excl - 1
            fresh = excluded[pos] != in_order
        else:
            fresh = np.ones(draw.shape[0], dtype=bool)
        if chosen.shape[0] == 0:
            # First round: the stable sort puts each value's first draw first among its repeats, so
            # the distinct fresh draws and their draw order come out of it without np.unique.
            fresh[1:] &= in_order[1:] != in_order[:-1]
            first_draws = by_value[fresh]  # draw indices of the distinct fresh values, in value order
            drawn = np.zeros(draw.shape[0], dtype=bool)
            drawn[first_draws] = True
            kept = np.flatnonzero(drawn)  # the same draw indices, in draw order
            if kept.shape[0] >= k:
                chosen = draw[kept[:k]]
                if not with_order:
                    return chosen
                rank = np.cumsum(drawn) - 1  # a kept draw's place in draw order
                return chosen, rank[first_draws[first_draws <= kept[k - 1]]]
            chosen = draw[kept]
            continue
        hit = np.empty(draw.shape[0], dtype=bool)
        hit[by_value] = ~fresh
        pool = np.concatenate([chosen, draw[~hit]])
        _, first = np.unique(pool, return_index=True)
        chosen = pool[np.sort(first)][:k]
    return (chosen, np.argsort(chosen)) if with_order else chosen


def csr_from_positions(n_in: int, n_out: int, positions: np.ndarray,
                       order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR pointer and column indices for linear positions ``i*n_out + j``.

    Returns ``(indptr, indices, order)`` where ``order`` sorts ``positions`` into CSR order, so the
    caller can permute per-connection arrays (weights, momentum) the same way; pass ``order`` when
    it is known (``sample_positions(..., with_order=True)``) to skip the sort.
    """
    if order is None:
        order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    rows = sorted_pos // n_out
    indices = (sorted_pos - rows * n_out).astype(np.int32)
    indptr = np.zeros(n_in + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_in), out=indptr[1:])
    return indptr, indices, order


def linear_positions(layer: SparseLayer) -> np.ndarray:
    """Sorted int64 linear positions ``i*n_out + j`` of the layer's connections (CSR order is sorted)."""
    return layer.rows() * layer.n_out + layer.indices.astype(np.int64)


RELU_GAIN, LINEAR_GAIN = 2.0, 1.0  # weight variance times fan-in: He for ReLU layers, LeCun for the linear output


def fanin_limits(indices: np.ndarray, n_out: int, gain: float) -> np.ndarray:
    """Per-output-neuron bound ``sqrt(3 * gain / d_j)`` of a uniform draw, ``d_j`` its actual in-degree.

    U(-b, b) has variance b^2 / 3, so each neuron's pre-activation keeps ``gain`` times the variance
    of one input whatever its in-degree (Evci et al., AAAI 2022). A neuron with no input gets the
    bound of in-degree 1 (it has no weight to use it on; a connection grown later does).
    """
    degree = np.bincount(indices, minlength=n_out)
    return np.sqrt(3.0 * gain / np.maximum(degree, 1)).astype(np.float64)


def erdos_renyi_layer(n_in: int, n_out: int, epsilon: float, rng: np.random.Generator, init: str = "sparse",
                      gain: float = RELU_GAIN) -> SparseLayer:
    """A layer with exactly ``er_nnz(n_in, n_out, epsilon)`` connections placed uniformly at random.

    Weights are drawn for existing connections only; the bias is zero.

    - ``init="sparse"`` (ctre-edge's default): U(-b_j, b_j) with b_j from each output neuron's actual
      in-degree (``fanin_limits``; ``gain`` 2 for a ReLU layer, 1 for the linear output layer).
    - ``init="dense-glorot"`` (the paper's): Glorot uniform, U(-a, a) with a = sqrt(6/(n_in+n_out)),
      the bound of a *dense* layer. At epsilon 1 a hidden neuron has about 2 inputs, and this bound
      makes the signal vanish layer by layer (docs/algorithm.md, "Initial weights").
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    nnz = er_nnz(n_in, n_out, epsilon)
    positions, order = sample_positions(n_in * n_out, nnz, np.empty(0, dtype=np.int64), rng, with_order=True)
    indptr, indices, order = csr_from_positions(n_in, n_out, positions, order)
    if init == "dense-glorot":
        limit = np.sqrt(6.0 / (n_in + n_out))
        values = rng.uniform(-limit, limit, size=nnz).astype(np.float32)[order]
    else:
        unit = rng.uniform(-1.0, 1.0, size=nnz)[order]
        values = (unit * fanin_limits(indices, n_out, gain)[indices]).astype(np.float32)
    return SparseLayer(n_in, n_out, indptr, indices, values, np.zeros(n_out, dtype=np.float32))


def check_layer(layer: SparseLayer, name: str = "layer") -> None:
    """Raise ValueError unless the layer's structure is valid CSR.

    Checked: dtypes and shapes, ``indptr`` starting at 0, non-decreasing, ending at nnz; column
    indices in ``[0, n_out)`` and strictly ascending within each row (sorted, no duplicate (i, j)).
    """
    n_in, n_out = int(layer.n_in), int(layer.n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"{name}: n_in and n_out must be >= 1, got {n_in} x {n_out}")
    expected = {"indptr": (np.int64, (n_in + 1,)), "indices": (np.int32, None),
                "values": (np.float32, None), "bias": (np.float32, (n_out,))}
    for field, (dtype, shape) in expected.items():
        arr = getattr(layer, field)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
            raise ValueError(f"{name}.{field} must be a 1-d {np.dtype(dtype).name} array")
        if shape is not None and arr.shape != shape:
            raise ValueError(f"{name}.{field} has shape {arr.shape}, expected {shape}")
    nnz = layer.indices.shape[0]
    if layer.values.shape[0] != nnz:
        raise ValueError(f"{name}: {layer.values.shape[0]} values for {nnz} indices")
    indptr = layer.indptr
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise ValueError(f"{name}.indptr must start at 0 and end at nnz={nnz}")
    counts = np.diff(indptr)
    if np.any(counts < 0):
        raise ValueError(f"{name}.indptr must be non-decreasing")
    if nnz == 0:
        return
    if layer.indices.min() < 0 or layer.indices.max() >= n_out:
        raise ValueError(f"{name}.indices must lie in [0, {n_out})")
    # Within a row the columns must strictly increase; across a row boundary anything goes.
    step = np.diff(layer.indices.astype(np.int64))
    row_start = np.zeros(nnz, dtype=bool)
    row_start[indptr[:-1][counts > 0]] = True
    if np.any(step[~row_start[1:]] <= 0):
        raise ValueError(f"{name}.indices must be strictly ascending within each row (sorted, no duplicates)")
