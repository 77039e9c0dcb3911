"""Cosine scores of missing connections: exact blocked top-k, and a streaming sketch.

CTRE grows the k missing connections (i, j) whose neurons' activation vectors over S samples have
the largest ``|cos(a_i, a_j)|`` (docs/algorithm.md, "The topology update", steps 2 and 3). A layer
can be 200,000 x 200,000 with only ~400,000 connections, so nothing here allocates an n_in x n_out array or sorts every
position: ``topk_cosine`` scores ``block_rows`` input rows at a time and keeps a running top-k.

Ranking uses one canonical score (see ``ctre_edge.kernels``): float64 dot products
summed in a fixed order (8 lanes, then a tree), scaled by inverse norms computed once, rounded to float32. A
prefilter does the bulk of the work: an exact product of 8-bit codes of the activations
(onnxruntime's MatMulInteger, ``int8_product``), or where that does not apply a float32 product in
numpy's BLAS. Either bounds every score, and every position that could reach the top-k is rescored
canonically. So the result is the same for every prefilter, block size, thread count and BLAS
build, and the dense reference in ``tests/reference.py`` can check it position for position.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from threadpoolctl import ThreadpoolController

from ctre_edge import kernels as ks
from ctre_edge.packed import INT8_MAX_SAMPLES

_U = 2.0**-24  # unit roundoff of float32
_MAX_SAMPLES = 1 << 20  # keeps S * u < 0.07, so the float32 error bound below stays finite


def _as_activations(a, name):
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (neurons, samples); got shape {a.shape}.")
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_csr(indptr, indices, n_in, n_out, check=True):
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    if indptr.shape != (n_in + 1,) or indices.ndim != 1:
        raise ValueError(
            f"indptr must have shape ({n_in + 1},) and indices be 1-D; "
            f"got {indptr.shape} and {indices.shape}."
        )
    if not check:
        return indptr, indices
    counts = np.diff(indptr)
    if indptr[0] != 0 or np.any(counts < 0) or indptr[-1] != indices.shape[0]:
        raise ValueError("indptr must start at 0, never decrease, and end at len(indices).")
    if indices.size and (indices.min() < 0 or indices.max() >= n_out):
        raise ValueError(f"indices must lie in [0, {n_out}).")
    # Linear positions must increase strictly: ascending columns, no duplicate, in each row.
    linear = np.repeat(np.arange(n_in, dtype=np.int64) * n_out, counts) + indices
    if np.any(np.diff(linear) <= 0):
        raise ValueError("indices must be strictly ascending within each row (sorted, no duplicates).")
    return indptr, indices


def neuron_stats(a, name="activations"):
    """Inverse norms (float64, 0 for a zero vector) and prefilter kinds (int8) of every neuron.

    ``a`` is float32 (neurons, samples), C-contiguous; ``topk_cosine`` computes these for both of
    its sides, and takes them as ``stats`` where a caller scores one level against two layers.
    Raises ValueError, naming ``name``, if an activation is Inf or NaN.
    """
    inv, kinds = np.empty(a.shape[0], dtype=np.float64), np.empty(a.shape[0], dtype=np.int8)
    neuron_stats_of_rows(a, inv, kinds, 0, a.shape[0])
    check_stats(inv, name)
    return inv, kinds


def neuron_stats_of_rows(a, inv, kinds, r0, r1):
    """``neuron_stats`` of rows r0:r1 of ``a``, written to ``inv[r0:r1]`` and ``kinds[r0:r1]`` (so
    threads can each take rows), without the check for Inf and NaN: ``check_stats`` once all are in.
    """
    ks.inverse_norms(a[r0:r1], np.arange(r1 - r0, dtype=np.int64), inv[r0:r1])
    ks.neuron_kinds(a[r0:r1], inv[r0:r1], kinds[r0:r1])


def check_stats(inv, name="activations"):
    """Raises ValueError, naming ``name``, if an inverse norm is NaN: some activation is Inf or NaN."""
    if np.isnan(inv).any():
        raise ValueError(f"{name} contains Inf or NaN activations.")


def _prefilter_bounds(n_samples):
    """(rel, abs_err): how far a float32 BLAS prefilter score can be from the canonical score.

    A float32 dot of S terms, in any summation order, is within ``g * sum_s |x_s y_s|`` of the
    exact one, ``g = S u / (1 - S u)`` (Higham, Accuracy and Stability of Numerical Algorithms,
    section 3.1); ``sum_s |x_s y_s| <= ||x|| ||y||`` in general, and ``= <x, y>`` for nonnegative
    vectors. Four more float32 roundings (two casts, two products) and the final rounding of the
    canonical score add under 8u; float64 errors are far smaller. 5% on top is headroom.
    """
    g = n_samples * _U / (1.0 - n_samples * _U)
    e = g + 8.0 * _U
    rel = 1.05 * e / (1.0 - 2.0 * e)
    abs_err = 1.05 * g + 12.0 * _U + 2.0**-100  # 2**-100 covers float32 underflow in the scaling
    return rel, abs_err


def _default_block_rows(n_in, n_out, workspace_bytes):
    return int(max(1, min(n_in, workspace_bytes // (4 * max(n_out, 1)))))


def topk_cosine(a_in, a_out, indptr, indices, k, *, block_rows=None, workspace_bytes=32 << 20, stats=None,
                live_copies=None, check_input=True, threads=None, prefilter="auto"):
    """The k missing connections with the largest |cosine| of their neurons' activations.

    Score of (i, j): ``|<a_i, a_j>| / (||a_i|| ||a_j||)``, 0 where a norm is 0, computed canonically
    (module docstring). Positions already kept (the CSR) are never returned.

    Parameters
    ----------
    a_in : ndarray of shape (n_in, S)
        Activations of the layer's input neurons, feature-major; converted to C-contiguous float32
        (a copy only if it is not already).
    a_out : ndarray of shape (n_out, S)
        Activations of the layer's output neurons over the same samples.
    indptr : ndarray of int64, shape (n_in + 1,)
    indices : ndarray of int32, shape (nnz,)
        Kept connections as CSR over input rows, columns strictly ascending in each row.
    k : int
        Number of positions to return, ``0 <= k <= n_in * n_out - nnz``.
    block_rows : int, default=None
        Input rows scored per block; by default the most that fit ``workspace_bytes``.
    workspace_bytes : int, default=32 MiB
        Size of the float32 block of scores when ``block_rows`` is None (at least one row).
    stats : tuple, default=None
        ``(*neuron_stats(a_in), *neuron_stats(a_out))`` if already computed, else computed here.
    live_copies : tuple, default=None
        ``(live_rows(a_in, kind_in), live_rows(a_out, kind_out))``, either may be None: copies of
        the neurons that are not all zero, where a caller scores one level against two layers and
        would otherwise copy it twice. Made here where needed and not given.
    check_input : bool, default=True
        False skips the O(nnz) checks that the CSR is sorted and in range, for a caller that built
        it itself (the topology update), as scikit-learn's trees take ``check_input``. A malformed
        CSR then gives wrong picks instead of an error.
    threads : int, default=None
        None: one scan, BLAS with as many threads as it has. An int: that many scans at once, each
        over a share of the input rows and the workspace, each on one BLAS thread, so the scoring
        uses exactly ``threads`` cores. The result is the same for every value.
    prefilter : {"auto", "float32"}, default="auto"
        "auto": the 8-bit prefilter where it applies (``a_in`` has no negative value, S is at most
        ``packed.INT8_MAX_SAMPLES``, the codes fit half the workspace, and onnxruntime's product
        passed its check), else the float32 one. "float32": always the float32 one. The result
        is the same.

    Returns
    -------
    rows : ndarray of int64, shape (k,)
    cols : ndarray of int32, shape (k,)
    scores : ndarray of float32, shape (k,)
        In rank order: score descending, then linear position ``i * n_out + j`` ascending.

    Raises
    ------
    ValueError
        If k exceeds the number of positions not kept, S exceeds 2**20, an activation is not
        finite, or the CSR is malformed.

    Notes
    -----
    Peak memory is ``block_rows * n_out`` 4-byte scores and the 8-bit codes (S bytes a neuron;
    together at most ``workspace_bytes``) plus O(k + n_in + n_out + nnz), on top of the
    activations. Time is one product
    (n_in x S x n_out: of 8-bit codes, several times faster than float32 where the CPU has 8-bit
    dot instructions, or a float32 GEMM in numpy's BLAS), two O(n_in * n_out) scans, and a
    canonical O(S) rescoring of the positions that survive the prefilter (about k with the float32
    one when the scores fit one block, 1.2-2 k with the 8-bit one on MNIST's levels).
    Neurons whose activations are all zero score 0 with everyone:
    where they make up enough of the layer (a tenth of its positions or more) and copies of the
    live neurons' activations fit in ``workspace_bytes``, the GEMM and the scans run on the live
    neurons only; where fewer than k free positions score above 0, the rest are the first free
    positions of score 0 in position order (the tie rule), found without a product.
    Neurons with nonzero values outside [2**-30, 2**30] skip the float32 prefilter (the 8-bit one
    bounds them as any other) and are rescored exactly, pair by pair: correct, but slow if there
    are many. Except nonnegative ones whose
    values reach down to 2**-96 only (a confident classifier's softmax outputs,
    ``kernels.KIND_WIDE``): these skip it only when paired with another such neuron.

    References
    ----------
    docs/algorithm.md ("The topology update"); Atashgahi et al., "A Brain-inspired Algorithm for Training
    Highly Sparse Neural Networks", Machine Learning 111 (2022).
    """
    rows, cols, scores, _ = _topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block_rows,
                                         workspace_bytes=workspace_bytes, stats=stats, live_copies=live_copies,
                                         check_input=check_input, threads=threads, prefilter=prefilter)
    return rows, cols, scores


def live_rows(a, kinds):
    """``a``'s rows whose activations are not all zero (``kinds != KIND_ZERO``), copied; the rows
    ``topk_cosine`` scores on where dead neurons make up enough of a layer."""
    return a[np.flatnonzero(kinds != ks.KIND_ZERO)]


def _topk_cosine(a_in, a_out, indptr, indices, k, *, block_rows, workspace_bytes, stats=None, live_copies=None,
                 check_input=True, threads=None, prefilter="auto"):
    """``topk_cosine`` plus the number of canonical scores computed (a measure of the prefilter)."""
    a_in = _as_activations(a_in, "a_in")
    a_out = _as_activations(a_out, "a_out")
    (n_in, n_samples), n_out = a_in.shape, a_out.shape[0]
    if a_out.shape[1] != n_samples:
        raise ValueError(
            f"a_in and a_out must share the samples axis; got {a_in.shape} and {a_out.shape}."
        )
    if n_samples > _MAX_SAMPLES:
        raise ValueError(f"at most {_MAX_SAMPLES} samples are supported; got {n_samples}.")
    indptr, indices = _as_csr(indptr, indices, n_in, n_out, check_input)
    n_free = n_in * n_out - indices.shape[0]
    k = int(k)
    if not 0 <= k <= n_free:
        raise ValueError(f"k must be in [0, {n_free}] (positions not kept); got {k}.")
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float32), 0
    if stats is None:
        inv_in, kind_in = neuron_stats(a_in, "a_in")
        inv_out, kind_out = neuron_stats(a_out, "a_out")
    else:
        inv_in, kind_in, inv_out, kind_out = stats
        if {inv_in.shape, kind_in.shape} != {(n_in,)} or {inv_out.shape, kind_out.shape} != {(n_out,)}:
            raise ValueError(f"stats must hold ({n_in},) and ({n_out},) arrays, as neuron_stats returns them.")
    levels = _live_levels(a_in, a_out, inv_in, kind_in, inv_out, kind_out, workspace_bytes, live_copies or (None, None))
    return _topk_live(*levels, indptr, indices, k, block_rows, workspace_bytes, threads, prefilter)


class LiveLevel(NamedTuple):
    """A level's activations over the sample, held for some of its neurons only: ``a`` float32
    (len(live), S), C-contiguous, row u the activations of neuron ``live[u]`` (int64, ascending);
    every neuron not in ``live`` is zero over the whole sample. ``inv`` and ``kinds``: every
    neuron's ``neuron_stats``. ``evolve.sample_activations`` packs each level's live rows so (at
    epsilon 1 most hidden neurons of a trained MNIST network are zero over the whole sample), and
    ``topk_cosine_live`` scores a layer from two of them."""

    a: np.ndarray
    live: np.ndarray
    inv: np.ndarray
    kinds: np.ndarray
    codes: tuple | None = None  # ``with_codes``: the 8-bit prefilter's codes of the rows of ``a``

    @classmethod
    def whole(cls, a, name="activations"):
        """Every row of ``a`` held, with its stats computed."""
        a = _as_activations(a, name)
        return cls(a, np.arange(a.shape[0], dtype=np.int64), *neuron_stats(a, name))

    def slots(self):
        """int64 (n,): each neuron's row in ``a``, len(live) for the others."""
        slot = np.full(self.inv.shape[0], self.live.shape[0], np.int64)
        slot[self.live] = np.arange(self.live.shape[0], dtype=np.int64)
        return slot


# A neuron whose activations are all zero scores exactly 0 with everyone (KIND_ZERO). At epsilon 1
# most hidden neurons of a trained MNIST network are such over the whole activation sample, so
# scoring only the live ones saves most of the GEMM. Worth a copy when it drops this much of it.
_LIVE_MIN_SAVING = 0.1


def _live_levels(a_in, a_out, inv_in, kind_in, inv_out, kind_out, workspace_bytes, copies):
    """The two levels of a ``topk_cosine`` problem as ``LiveLevel``: copies of the live neurons
    where that saves at least ``_LIVE_MIN_SAVING`` of the product (or ``copies`` are given) and
    fits ``workspace_bytes`` (so huge layers, where the copies would cost more memory than the
    scoring workspace itself, are scored in full), else every row."""
    (n_in, n_samples), n_out = a_in.shape, a_out.shape[0]
    live_in = np.flatnonzero(kind_in != ks.KIND_ZERO)
    live_out = np.flatnonzero(kind_out != ks.KIND_ZERO)
    given = copies[0] is not None or copies[1] is not None
    saves = live_in.shape[0] * live_out.shape[0] <= (1.0 - _LIVE_MIN_SAVING) * n_in * n_out
    if not given and (not saves or 4 * n_samples * (live_in.shape[0] + live_out.shape[0]) > workspace_bytes):
        return (LiveLevel(a_in, np.arange(n_in, dtype=np.int64), inv_in, kind_in),
                LiveLevel(a_out, np.arange(n_out, dtype=np.int64), inv_out, kind_out))
    held = []
    for a, idx, copy, name in ((a_in, live_in, copies[0], "a_in"), (a_out, live_out, copies[1], "a_out")):
        if copy is not None and copy.shape != (idx.shape[0], n_samples):
            raise ValueError(f"live_copies: the copy of {name} must have shape {(idx.shape[0], n_samples)}, "
                             f"as live_rows returns it; got {copy.shape}.")
        held.append(_as_activations(copy, name) if copy is not None else a[idx])
    return (LiveLevel(held[0], live_in, inv_in, kind_in), LiveLevel(held[1], live_out, inv_out, kind_out))


def topk_cosine_live(level_in, level_out, indptr, indices, k, *, workspace_bytes=32 << 20, threads=None,
                     block_rows=None, prefilter="auto"):
    """``topk_cosine`` of a layer between two ``LiveLevel``, the same (rows, cols, scores).

    For the topology update, which packs the levels itself: no checks of the CSR (``check_input``
    False) or of k, which must be at most the positions not kept. ``prefilter`` "auto": the 8-bit
    one where both levels carry codes (``with_codes``, which the update decides on once for the
    run: ``packed.uses_int8_codes``), else the float32 one; "float32": that one always.
    """
    csr = _as_csr(indptr, indices, level_in.inv.shape[0], level_out.inv.shape[0], False)
    prefilter = "levels" if prefilter == "auto" else prefilter
    return _topk_live(level_in, level_out, *csr, int(k), block_rows, workspace_bytes, threads, prefilter)[:3]


def with_codes(level, workspace_bytes=32 << 20):
    """``level`` with its 8-bit codes (``codes``: ``kernels.quantize_levels``' codes, stats and
    return value, negative where the level has a negative activation), which
    ``topk_cosine_live`` then uses for the 8-bit prefilter of both layers it scores (where the
    input level has no negative activation): the topology update quantizes each level once, where
    it scores it twice. ``level`` as it is where the 8-bit prefilter does not apply (``_q8_codes``)
    or the codes of the whole level, S bytes a neuron, would not fit ``workspace_bytes`` (the
    planner counts them)."""
    n, n_samples = level.inv.shape[0], level.a.shape[1]
    if n_samples > INT8_MAX_SAMPLES or n * n_samples > workspace_bytes or int8_product() is None:
        return level
    return level._replace(codes=_codes_of(level.a, level.inv[level.live]))


def _codes_of(a, inv):
    """``kernels.quantize_levels`` of the rows of ``a`` (inverse norms ``inv``): (codes int8,
    stats, its return value: negative where some activation is)."""
    codes, stats = np.empty(a.shape, np.int8), np.empty((4, a.shape[0]), np.float64)
    return codes, stats, ks.quantize_levels(a, inv, codes, stats)


def _topk_live(level_in, level_out, indptr, indices, k, block_rows, workspace_bytes, threads, prefilter="auto"):
    """The top-k over the live neurons' positions (their GEMM only), and, where fewer than k of the
    free positions score above 0, the first free positions of score 0 in position order (the rank
    order's tie rule), which are all the others: ``kernels.first_free_positions``. The result is the
    top-k of the whole layer, position for position, whichever neurons the levels hold.
    ``prefilter`` as ``_scan_topk`` takes it, or "levels": the levels' codes or the float32 one."""
    n_out = level_out.inv.shape[0]
    m_in, m_out = level_in.live.shape[0], level_out.live.shape[0]
    row_of, col_slot = level_in.live, level_out.slots()
    k_live = min(k, m_in * m_out - ks.kept_between(indptr, indices, row_of, col_slot, m_out))
    rows, cols = np.empty(0, np.int64), np.empty(0, np.int64)
    scores, n_scored = np.empty(0, np.float32), 0
    if k_live > 0:
        live_in, live_out = level_in.live, level_out.live
        rows, cols, scores, n_scored = _scan_topk(
            level_in.a, level_out.a, indptr, indices, row_of, col_slot, level_in.inv[live_in], level_in.kinds[live_in],
            level_out.inv[live_out], level_out.kinds[live_out], k_live, block_rows, workspace_bytes, threads,
            "float32" if prefilter == "levels" else prefilter,
            _level_codes(level_in, level_out) if prefilter != "float32" else None)
        rows, cols = live_in[rows], live_out[cols]
    if k_live == k and (k == 0 or scores[-1] > 0):
        return rows, cols.astype(np.int32), scores, n_scored
    n_pos = int(np.count_nonzero(scores > 0))  # the first n_pos, in rank order
    taken = np.sort(rows[:n_pos] * n_out + cols[:n_pos])
    fill = np.empty(k - n_pos, np.int64)
    ks.first_free_positions(indptr, indices, n_out, taken, k - n_pos, fill)
    rows, cols = np.concatenate([rows[:n_pos], fill // n_out]), np.concatenate([cols[:n_pos], fill % n_out])
    return rows, cols.astype(np.int32), np.concatenate([scores[:n_pos], np.zeros(k - n_pos, np.float32)]), n_scored


def _level_codes(level_in, level_out):
    # ``_q8_codes`` from the levels' own codes (``with_codes``), if both have them.
    if level_in.codes is None or level_out.codes is None or level_in.codes[2] < 0.0:
        return None
    return level_in.codes[0].view(np.uint8), level_in.codes[1], level_out.codes[0], level_out.codes[1]


def _scan_topk(a_in, a_out, indptr, indices, row_of, col_slot, inv_in, kind_in, inv_out, kind_out, k, block_rows,
               workspace_bytes, threads=None, prefilter="auto", q8=None):
    """Exact top-k by the blocked prefilter and the scan kernels (module docstring), of the
    positions between the rows of ``a_in`` and ``a_out`` (``row_of`` and ``col_slot``: where these
    are in the CSR, as ``kernels.scan_block`` takes them; ``inv_*`` and ``kind_*`` of those rows);
    rows and cols are of ``a_in`` and ``a_out``.

    The scores are bounded from an exact product of 8-bit codes (``kernels.quantize_levels``,
    ``scan_q8_*``): those in ``q8`` (as ``_q8_codes`` returns them) where given, whatever
    ``prefilter`` says; else, with ``prefilter`` "auto", those ``_q8_codes`` makes here. Where there
    are none (or ``prefilter`` is "float32"), from a float32 BLAS product (``scan_block``). Both
    give the same result.

    ``threads`` None: one scan over all rows, BLAS with its own threads. An int: that many scans
    at once, each over a contiguous share of the rows with its own share of the workspace and its
    own top-k, on one BLAS thread each; the top-k of the union of theirs is the same top-k. Where
    every share is one block, the shares' pass 2 shares one bound, R of the whole layer: any bound
    at most the final k-th canonical score gives the same top-k.
    """
    n_in, n_out = a_in.shape[0], a_out.shape[0]
    parts = 1 if threads is None else max(1, min(int(threads), n_in))
    if q8 is None and prefilter != "float32":
        q8 = _q8_codes(a_in, a_out, inv_in, kind_in, inv_out, workspace_bytes // 2)
        if q8 is not None:  # codes made here take their share of the workspace
            workspace_bytes -= (n_in + n_out) * a_in.shape[1]
    if block_rows is None:
        block_rows = _default_block_rows(n_in, n_out, workspace_bytes // parts)
    block_rows = int(min(max(1, block_rows), n_in))
    if q8 is not None:
        codes_in, stats_in, codes_out, stats_out = q8
        product = int8_product()

        def gemm(i0, i1, out):
            product(codes_in[i0:i1], codes_out, out)

        def lower_kernel(dots, row0, lower_t, state_t):
            return ks.scan_q8_lower(dots, row0, indptr, indices, row_of, col_slot, stats_in, stats_out, lower_t, k,
                                    state_t)

        def rescore_kernel(dots, row0, bound, best_t, state_t):
            ks.scan_q8_rescore(dots, row0, indptr, indices, row_of, col_slot, stats_in, stats_out, a_in, a_out,
                               inv_in, inv_out, bound, *best_t, state_t)
    else:
        v_in, v_out = inv_in.astype(np.float32), inv_out.astype(np.float32)
        rel, abs_err = _prefilter_bounds(a_in.shape[1])
        kernel_args = (indptr, indices, row_of, col_slot, v_in, v_out, kind_in, kind_out, rel, abs_err)

        def gemm(i0, i1, out):
            np.matmul(a_in[i0:i1], a_out.T, out=out)  # BLAS, no copy: a_out.T is F-contiguous

        def lower_kernel(dots, row0, lower_t, state_t):
            return ks.scan_block_lower(dots, row0, *kernel_args, lower_t, k, state_t)

        def rescore_kernel(dots, row0, bound, best_t, state_t):
            ks.scan_block_rescore(dots, row0, *kernel_args, a_in, a_out, inv_in, inv_out, bound, *best_t, state_t)
    dots_type = np.int32 if q8 is not None else np.float32

    shares = [(n_in * t // parts, n_in * (t + 1) // parts) for t in range(parts)]
    state = [np.zeros(3, np.int64) for _ in range(parts)]
    lower = [np.empty(2 * k + n_out, np.float64) for _ in range(parts)]  # the scan's lower bounds
    best = [(np.empty(k, np.float32), np.empty(k, np.int64)) for _ in range(parts)]

    def ranked(t):
        n = int(state[t][1])  # below k only where this share has fewer free positions
        ks.topk_heap_sort(best[t][0][:n], best[t][1][:n])
        return best[t][0][:n], best[t][1][:n], int(state[t][2])

    def scan(t):
        i_start, i_stop = shares[t]
        buffer = np.empty(min(block_rows, i_stop - i_start) * n_out, dots_type)
        for i0 in range(i_start, i_stop, block_rows):
            i1 = min(i_stop, i0 + block_rows)
            dots = buffer[: (i1 - i0) * n_out].reshape(i1 - i0, n_out)
            gemm(i0, i1, dots)
            rescore_kernel(dots, i0, lower_kernel(dots, i0, lower[t], state[t]), best[t], state[t])
        return ranked(t)

    if threads is None:
        found = [scan(0)]
    else:
        # One BLAS thread per scan: BLAS's own workers, spinning for about 0.1 s after a GEMM
        # before they sleep, would take a core from the training kernels that follow the update
        # (numba's parallel loops measured 2x slower for that long, a one-off script), and a
        # profile's thread cap holds for the scoring too.
        with _blas_threads(1):
            if parts > 1 and all(i1 - i0 <= block_rows for i0, i1 in shares):
                # Each share is one block: pass 1 on all of them first, then pass 2 against R,
                # the k-th largest lower bound of the whole layer, not of the share. A share's
                # own R admits about k candidates per share for the exact rescoring, which reads
                # two activation rows each.
                dots = [np.empty((i1 - i0, n_out), dots_type) for i0, i1 in shares]

                def lower_pass(t):
                    gemm(*shares[t], dots[t])
                    lower_kernel(dots[t], shares[t][0], lower[t], state[t])

                def rescore_pass(t):
                    rescore_kernel(dots[t], shares[t][0], bound, best[t], state[t])
                    return ranked(t)

                in_threads(lower_pass, parts)
                union = np.concatenate([lower[t][:state[t][0]] for t in range(parts)])
                bound = ks.keep_largest(union, union.shape[0], k) if union.shape[0] >= k else -np.inf
                found = in_threads(rescore_pass, parts)
            else:
                found = in_threads(scan, parts)
    best_scores, best_positions, n_scored = found[0]
    for scores, positions, scored in found[1:]:
        n = min(k, best_scores.shape[0] + scores.shape[0])
        out_scores, out_positions = np.empty(n, np.float32), np.empty(n, np.int64)
        ks.merge_ranked(best_scores, best_positions, scores, positions, out_scores, out_positions)
        best_scores, best_positions = out_scores, out_positions
        n_scored += scored
    rows, cols = best_positions // n_out, (best_positions % n_out).astype(np.int32)
    return rows, cols, best_scores, n_scored


def _q8_codes(a_in, a_out, inv_in, kind_in, inv_out, workspace_bytes):
    """The 8-bit codes and stats of both sides (``kernels.quantize_levels``): ``a_in``'s as uint8
    (n_in, S), ``a_out``'s as int8 (n_out, S); or None where the 8-bit prefilter does not apply:
    no checked product (``int8_product``), more than ``packed.INT8_MAX_SAMPLES`` samples, codes
    that would not fit ``workspace_bytes``, or a negative input activation (the product's first
    operand is unsigned)."""
    (n_in, n_samples), n_out = a_in.shape, a_out.shape[0]
    if (n_samples > INT8_MAX_SAMPLES or (n_in + n_out) * n_samples > workspace_bytes
            or np.any(kind_in == ks.KIND_SIGNED) or int8_product() is None):
        return None
    codes_in, stats_in, least = _codes_of(a_in, inv_in)
    if least < 0.0:
        return None
    codes_out, stats_out, _ = _codes_of(a_out, inv_out)
    return codes_in.view(np.uint8), stats_in, codes_out, stats_out


_INT8_PRODUCT = []  # the checked product, or None, made on first use
_INT8_LOCK = threading.Lock()  # the update's threads quantize levels at once: one session, not two


def int8_product():
    """``product(a, b, out)``: ``out[:] = a @ b.T`` for uint8 ``a`` (m, S), int8 ``b`` (n, S) and
    int32 ``out`` (m, n), all C-contiguous, by onnxruntime's Transpose and MatMulInteger on the
    calling thread (which it releases the GIL for). None if its result differed from numpy's on
    a check of extreme codes at first use: the 8-bit prefilter is then not used, and the float32
    one is.

    onnxruntime (already needed for export) is where a CPU's 8-bit dot instructions are: on the
    AMD EPYC Zen 5 of docs/performance-log.md, the first layer's codes of the MNIST network (618 x
    1000 and 471 x 1000) were quantized and multiplied in 1.0-1.1 ms on one thread, against 2.7 ms
    for the float32 GEMM in numpy's OpenBLAS (``python -m tools.bench_scoring --data mnist.npz``).
    The transpose in the model cost 0.08 ms of 1000 x 1000 codes, a fifth of a numba loop's.
    """
    if not _INT8_PRODUCT:
        with _INT8_LOCK:
            if not _INT8_PRODUCT:
                _INT8_PRODUCT.append(_checked(_int8_session()))
    return _INT8_PRODUCT[0]


# The product as an ONNX model: Y = MatMulInteger(A, Transpose(B)), A uint8 (m, s), B int8 (n, s), Y
# int32 (m, n), opset 13, IR version 8. These are the bytes that onnx.helper makes of it
# (tests/test_similarity.py builds them and compares): written out, so that training loads
# onnxruntime alone and not the onnx package too (16.5 MiB more resident, measured).
_PRODUCT_MODEL = (
    b"\x08\x08\x12\tctre-edge:\x8a\x01\n!\n\x01B\x12\x02Bt\"\tTranspose*\r\n\x04perm@\x01@\x00\xa0\x01\x07\n\x19"
    b"\n\x01A\n\x02Bt\x12\x01Y\"\rMatMulInteger\x12\x05codesZ\x15\n\x01A\x12\x10\n\x0e\x08\x02\x12\n\n\x03\x12"
    b"\x01m\n\x03\x12\x01sZ\x15\n\x01B\x12\x10\n\x0e\x08\x03\x12\n\n\x03\x12\x01n\n\x03\x12\x01sb\x15\n\x01Y"
    b"\x12\x10\n\x0e\x08\x06\x12\n\n\x03\x12\x01m\n\x03\x12\x01nB\x04\n\x00\x10\r"
)


def _int8_session():
    import onnxruntime as ort  # only where the 8-bit prefilter runs: 20 MiB resident (budget.INT8_RUNTIME_BYTES)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the caller's thread only: the scoring's threads are its own
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # outputs are bound to the caller's buffers
    options.log_severity_level = 3
    session = ort.InferenceSession(_PRODUCT_MODEL, options, providers=["CPUExecutionProvider"])

    def product(a, b, out):
        binding = session.io_binding()
        binding.bind_input("A", "cpu", 0, np.uint8, a.shape, a.ctypes.data)
        binding.bind_input("B", "cpu", 0, np.int8, b.shape, b.ctypes.data)
        binding.bind_output("Y", "cpu", 0, np.int32, out.shape, out.ctypes.data)
        session.run_with_iobinding(binding)

    return product


def _checked(product):
    # Extreme codes (127 x +-127 over 1024 samples, where 16-bit pair sums would saturate if codes
    # exceeded 127) and random ones, against numpy's exact int64 product.
    rng = np.random.default_rng(0)
    a = np.full((5, 1024), ks.Q8_TOP, np.uint8)
    a[1:] = rng.integers(0, ks.Q8_TOP + 1, (4, 1024))
    b = rng.integers(-ks.Q8_TOP, ks.Q8_TOP + 1, (67, 1024)).astype(np.int8)
    b[0], b[1] = ks.Q8_TOP, -ks.Q8_TOP
    out = np.empty((5, 67), np.int32)
    product(a, b, out)
    return product if np.array_equal(out, a.astype(np.int64) @ b.T.astype(np.int64)) else None


def topk_cosine_layers(problems, *, workspace_bytes=32 << 20, threads=2, then=None, feed=None):
    """``topk_cosine_live`` of several layers at once, each layer whole on one of ``threads`` threads.

    ``problems``: one ``(level_in, level_out, indptr, indices, k)`` per layer, as
    ``topk_cosine_live`` takes them. Returns its (rows, cols, scores) for each, the same arrays for
    any ``threads``.

    For networks of small layers (MNIST's at epsilon 1: a few hundred live neurons a level), where
    scoring layer after layer with each split over the threads spent a millisecond or more per
    layer on waking and waiting for the other thread: here the threads start once. Each thread takes
    the next layer not yet taken, largest first by their live neurons' positions (the GEMM's size),
    until none is left; each scores on one BLAS thread with ``workspace_bytes / threads`` of the
    workspace. Which thread scores a layer changes nothing in its result.

    ``then``: called as ``then(l, result)`` for l = 0, 1, ... in that order, one call at a time,
    each as soon as layers 0..l are scored, by whichever scoring thread is free (the topology
    update drops and grows layer l there, while the other thread may still score a later layer).
    A layer's ``indptr`` and ``indices`` may change in its own ``then``: its scoring is done. After
    a call raises, no later call is made, and the error reaches the caller.

    ``feed``: where some problems are None in ``problems``, a function that makes them, called as
    ``feed(publish)`` on the last thread before it scores, and calling ``publish(l, problem)`` for
    each as soon as it is ready (the topology update computes the activation levels there, while
    the other threads score the layers whose levels are done). A thread with no problem ready
    waits for one. An error in ``feed`` reaches the caller; after it no layer is scored or handed
    over, but a layer handed over before it stays so (the trainer stops on such an error).
    """
    problems = list(problems)
    n = len(problems)
    threads = max(1, min(int(threads), n))
    found = [None] * n
    lock = threading.Condition()
    taken = [False] * n
    fed = [feed is None]  # whether every problem has been published (or the feed has failed)
    handed = [0, False]  # the next layer for ``then``, and whether a thread is in a call of it

    def publish(l, problem):
        with lock:
            problems[l] = problem
            lock.notify_all()

    def next_layer():
        # The largest problem ready and not taken (by its live positions, the GEMM's size); None
        # once there is none left to take.
        with lock:
            while True:
                ready = [l for l in range(n) if problems[l] is not None and not taken[l]]
                if ready:
                    l = max(ready, key=lambda l: (live_positions(*problems[l][:2]), -l))
                    taken[l] = True
                    return l
                if fed[0]:
                    return None
                lock.wait()

    def hand_over():
        # Whichever thread finds the next layer scored and no call running makes the calls, in
        # order, until the next is not scored yet; the thread that scores it then finds it so.
        while then is not None:
            with lock:
                l = handed[0]
                if handed[1] or l == n or found[l] is None:
                    return
                handed[1] = True
            done = False
            try:
                then(l, found[l])
                done = True
            finally:  # after a failure here or in ``feed`` (which sets n), no further call
                with lock:
                    handed[0] = n if not done or handed[0] == n else l + 1
                    handed[1] = False

    def score(t):
        if t == threads - 1 and feed is not None:
            failed = True
            try:
                feed(publish)
                failed = False
            finally:
                with lock:
                    if failed:  # nothing more is scored or handed over; a call running ends
                        taken[:] = [True] * n
                        handed[0] = n
                    fed[0] = True
                    lock.notify_all()
        while (l := next_layer()) is not None:
            level_in, level_out, indptr, indices, k = problems[l]
            result = topk_cosine_live(level_in, level_out, indptr, indices, k,
                                      workspace_bytes=workspace_bytes // threads)
            with lock:
                found[l] = result
            hand_over()

    with _blas_threads(1):
        in_threads(score, threads)
    return found


def layers_balance(costs, threads):
    """How much longer than an even split ``topk_cosine_layers`` takes: the longest thread's share of
    ``costs`` (each layer's ``live_positions``, taken largest first by the least loaded thread)
    over ``sum(costs) / threads``; 1 is even. Its caller scores layer by layer, each split over the
    threads, where this is well above 1 (one layer holds most of the work)."""
    load = [0] * max(1, int(threads))
    for c in sorted(costs, reverse=True):
        load[load.index(min(load))] += c
    return max(load) * len(load) / max(1, sum(costs))


def live_positions(level_in, level_out):
    """Positions between the neurons two ``LiveLevel`` hold: the size of a layer's scoring GEMM."""
    return int(level_in.live.shape[0]) * int(level_out.live.shape[0])


def merge_dropped(level_in, level_out, rows, cols, scores, dropped, k):
    """The top-k positions not kept after a drop, from the top-k of those free before it.

    ``rows``, ``cols``, ``scores``: ``topk_cosine_live`` of the layer between ``LiveLevel``
    ``level_in`` and ``level_out`` as it was before the drop (so its k, or every free position if
    there were fewer); ``dropped``: the linear positions the drop removed, ascending. The positions
    not kept are the free ones and the dropped ones, so the best k of them are among the free ones'
    best k and the dropped ones: these are scored canonically and merged in rank order. Returns
    (rows int64, cols int32), as ``topk_cosine``'s first two.
    """
    n_out = level_out.inv.shape[0]
    # Rows of the levels' arrays; a neuron they do not hold gets an inverse norm of 0 (one past
    # the held ones), so its score is 0 and its row is never read.
    inv_in = np.append(level_in.inv[level_in.live], 0.0)
    inv_out = np.append(level_out.inv[level_out.live], 0.0)
    d_scores = np.empty(dropped.shape[0], np.float32)
    ks.canonical_scores(level_in.a, level_out.a, inv_in, inv_out, level_in.slots()[dropped // n_out],
                        level_out.slots()[dropped % n_out], d_scores)
    order = np.lexsort((dropped, -d_scores))  # rank order: score descending, then position ascending
    out_scores, out_positions = np.empty(k, np.float32), np.empty(k, np.int64)
    ks.merge_ranked(scores, rows * n_out + cols, d_scores[order], dropped[order], out_scores, out_positions)
    return out_positions // n_out, (out_positions % n_out).astype(np.int32)


_CONTROLLER = []  # threadpoolctl's view of the loaded BLAS, made on first use (it scans the libraries)
_POOLS = {}  # worker threads per count, kept: starting threads per call costs more


def _blas_threads(n):
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=n, user_api="blas")


def in_threads(fn, n):
    """``[fn(t) for t in range(n)]`` with ``fn(0)`` on the calling thread and the rest on worker
    threads at once (``fn`` releases the GIL in its numba kernels and BLAS calls). Share 0 stays
    here: handed to the pool too, one worker often ran two shares in turn. Where ``fn(0)`` raises,
    the workers are waited for before the error reaches the caller, so that none still works on
    (the topology update's threads write into the network) once the caller sees it."""
    if n == 1:
        return [fn(0)]
    if n - 1 not in _POOLS:
        _POOLS[n - 1] = ThreadPoolExecutor(n - 1, thread_name_prefix="ctre-edge")
    others = [_POOLS[n - 1].submit(fn, t) for t in range(1, n)]
    try:
        first = fn(0)
    except BaseException:
        for f in others:
            f.exception()  # waits; its own error, if any, is the lesser news
        raise
    return [first] + [f.result() for f in others]


class CosineSketch:
    """Streaming random-projection sketch of activation vectors, for approximate top-k |cosine|.

    Each sample id s gets a random row ``R[s]`` of ``dim`` signs +-1/sqrt(dim), regenerated from
    (seed, s) by a counter-based hash whenever needed (never stored). ``update`` adds
    ``a @ R[sample_ids]`` to each neuron's sketch, so ``<sketch_i, sketch_j>`` estimates
    ``<a_i, a_j>`` over every sample seen (Johnson-Lindenstrauss; Achlioptas 2003), and the cosine
    of two sketches estimates the cosine of the activations. Memory is ``(n_in + n_out) * dim``
    float32, independent of the number of samples.

    ``candidates`` ranks positions by the sketches' own cosine (``topk_cosine`` on the sketch
    matrices); training grows that ranking as it is.

    Recall of the exact top-k after ``candidates`` (``n_candidates = 4 k``) and an exact rescoring
    of the candidates (``rescore_topk`` in ``tests/reference.py``), on
    activations of random Erdos-Renyi (eps=1, Glorot) ReLU networks input-1000-1000-1000-classes
    fed every sample of digits (S=1797) or madelon (S=2000), streamed in 8 batches,
    k = floor(0.2 * nnz). Measured with ``python -m pytest tests/test_similarity.py -k recall -s``::

        layer              n_in x n_out    k    dim=32     64    128    256
        digits  0            64 x 1000   212     0.948  1.000  1.000  1.000
        digits  1          1000 x 1000   400     1.000  1.000  1.000  1.000
        digits  2          1000 x 1000   400     1.000  1.000  1.000  1.000
        digits  3          1000 x 10     202     1.000  1.000  1.000  1.000
        madelon 0           500 x 1000   300     0.380  0.557  0.737  0.977
        madelon 1          1000 x 1000   400     0.825  0.983  1.000  1.000
        madelon 2          1000 x 1000   400     0.890  0.985  1.000  1.000
        madelon 3          1000 x 2      200     1.000  1.000  1.000  1.000

    Madelon's input layer (480 of 500 features are noise, so the top scores barely stand out) is
    the hard case and sets the default ``dim=256``.

    Parameters
    ----------
    n_in, n_out : int
        Neurons on each side of the layer.
    dim : int, default=256
        Sketch width. Recall grows with ``dim`` and falls when the top scores barely stand out
        (see the table). The sketch saves memory only when S is well above ``dim``.
    seed : int, default=0
        Seed of the projection (a nonnegative int).

    Attributes
    ----------
    sketch_in : ndarray of float32, shape (n_in, dim)
    sketch_out : ndarray of float32, shape (n_out, dim)
        A neuron whose activations are all 0 has an all-zero sketch, so its score stays exactly 0.
        (Dividing sketch dot products by exact norms instead of the sketch norms was measured and
        recalled less: the errors of numerator and sketch norms cancel in part.)
    n_samples : int
        Samples folded in so far.
    """

    def __init__(self, n_in, n_out, dim=256, seed=0):
        if int(dim) < 1 or int(seed) < 0:
            raise ValueError(f"dim must be >= 1 and seed >= 0; got dim={dim}, seed={seed}.")
        self.dim, self.seed = int(dim), int(seed)
        self.sketch_in = np.zeros((n_in, self.dim), np.float32)
        self.sketch_out = np.zeros((n_out, self.dim), np.float32)
        self.n_samples = 0

    def projection(self, sample_ids):
        """Rows ``R[sample_ids]`` of the projection, float32 of shape (len(sample_ids), dim)."""
        sample_ids = np.ascontiguousarray(sample_ids, dtype=np.int64)
        if sample_ids.ndim != 1 or (sample_ids.size and sample_ids.min() < 0):
            raise ValueError("sample_ids must be a 1-D array of nonnegative ints.")
        out = np.empty((sample_ids.shape[0], self.dim), np.float32)
        ks.projection_rows(sample_ids, self.seed, out)
        return out

    def update(self, a_in_batch, a_out_batch, sample_ids):
        """Fold a batch of samples in: ``sketch += a @ R[sample_ids]``.

        Parameters
        ----------
        a_in_batch : ndarray of shape (n_in, B)
        a_out_batch : ndarray of shape (n_out, B)
        sample_ids : ndarray of int64, shape (B,)
            Ids of the samples; feed each sample once per epoch.
        """
        proj = self.projection(sample_ids)
        for a, sketch, name in ((a_in_batch, self.sketch_in, "a_in_batch"),
                                (a_out_batch, self.sketch_out, "a_out_batch")):
            a = _as_activations(a, name)
            if a.shape != (sketch.shape[0], proj.shape[0]):
                expected = (sketch.shape[0], proj.shape[0])
                raise ValueError(f"{name} must have shape {expected}; got {a.shape}.")
            # Row chunks keep the temporary product small next to the sketch itself.
            for i0 in range(0, a.shape[0], 4096):
                sketch[i0 : i0 + 4096] += a[i0 : i0 + 4096] @ proj
        self.n_samples += proj.shape[0]

    def candidates(self, indptr, indices, k, n_candidates=None, *, workspace_bytes=32 << 20, threads=None):
        """Approximate top positions not kept, by the cosine of the sketches.

        Returns ``n_candidates`` positions (default ``4 * k``, capped at the positions not kept)
        as ``(rows int64, cols int32, approx_scores float32)`` in rank order. ``threads`` as in
        ``topk_cosine``.
        """
        n_free = self.sketch_in.shape[0] * self.sketch_out.shape[0] - np.asarray(indices).shape[0]
        if n_candidates is None:
            n_candidates = min(4 * int(k), n_free)
        if n_candidates < k:
            raise ValueError(f"n_candidates must be at least k={k}; got {n_candidates}.")
        # The float32 prefilter: sketches are signed, and a sketch run never loads onnxruntime
        # (the planner counts it for exact runs only).
        return topk_cosine(
            self.sketch_in, self.sketch_out, indptr, indices, n_candidates,
            workspace_bytes=workspace_bytes, threads=threads, prefilter="float32",
        )  # fmt: skip
