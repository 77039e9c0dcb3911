"""Every numba kernel of ctre-edge: plain functions over flat arrays, compiled with ``cache=True``.

Layout: activations are feature-major, ``(features, batch)`` float32 and C-contiguous, so the
innermost loop of every kernel runs over the batch with unit stride (measured in
``tools/bench_layout.py``: several times faster than batch-major for CSR at batch 100). In the
training loop a batch's rows lie ``row_stride(nb)`` floats apart, whole 64-byte lines from 64 samples
on; the kernels it runs take the sample count ``nb`` and read the rows' stride from the arrays'
second axis, and never touch the padding (default ``nb=-1``: all columns). A sparse
layer is CSR over input rows (see ``layers.py``). Kernels trust their inputs: shapes and dtypes are
validated where data enters (``layers.check_layer``, ``data.py``, the API). ``np.dot`` is not used
inside kernels because numba needs scipy for it; the loops are explicit.

A whole network is passed "packed" (``packed.PackedNet``, whose field order is the argument
order here): the layers' arrays concatenated, with offsets ``ptr_off`` (into ``indptr``),
``nz_off`` (into ``indices``/``values``) and ``unit_off`` (into the biases of layers 1..L), and
``sizes`` = neurons per level ``[n_0, ..., n_L]``. Callers spread the record (``*net.forward``,
``*net``), so the kernels stay plain functions over arrays.

Each kernel has a numpy twin in ``tests/reference.py`` that the tests compare against.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

# Start numba's threading layer now, whatever is called first. A cached kernel records that loading it
# must start the threading layer only when its parallel callees were compiled in the same process
# (numba 0.68.1): one compiled while ``sparse_forward_threads`` came from the cache (warmup's one
# step per process does that) loads without the hook, and its first parallel loop in a fresh process
# crashes. ``get_num_threads`` starts the layer as a side effect (numba's documented behaviour);
# ``train`` calls it anyway, so only direct calls to the kernels were exposed.
numba.get_num_threads()

# --- one layer: forward, backward (input and weight gradients), SGD step ---------------------------

@njit(cache=True, inline="always")
def _opaque_one(n):
    """1.0, in a form the compiler cannot fold (x / x is not 1 for 0, Inf or NaN).

    The ReLU and its derivative zero some elements of an array in place: ``v = 0 if v < 0 else v``.
    LLVM sees that the other branch stores back the value it loaded and turns the whole into a
    masked store of zeros, which on AVX2 is ``vmaskmovps``, microcoded and slow on AMD Zen 3:
    ``relu_alive`` took 83 us for 1000 x 100 values. Storing ``v * one`` instead (the same bits for
    every float, -0 and NaN included) makes it a plain blend and store: 25 us (AVX2, a one-off
    script).
    """
    m = np.float32(max(n, 1))
    return m / m


# ``gather_scaled`` turns samples (rows of X) into columns of ``out``. It scales the first
# GATHER_CHUNK features of GATHER_TILE samples into a small row-major tile (SIMD over the features,
# the tile in L1), then moves the tile into ``out`` in 16 x 16 blocks transposed in registers (``transpose_block``),
# and so on along the features. Element by element, the transposition took about two thirds of
# the gather: 33-37 us for a batch of 100 MNIST samples already in cache against 24 with the blocks,
# 60-85 against 45-49 us from memory (a one-off script, 2-vCPU Intel Xeon).
GATHER_TILE = 16
GATHER_CHUNK = 256


def _transposed(builder, v):
    """The 16 x 16 block whose rows are the vectors ``v``, transposed: lane c of row t becomes lane t
    of row c. The off-diagonal h x h blocks of every 2h x 2h block swap places, h = 8, 4, 2, 1: rows
    t and t + h trade row t's lanes c with bit h set for row t + h's lanes c - h."""
    i32v = ir.VectorType(ir.IntType(32), LANES)
    h = LANES // 2
    while h >= 1:
        low = ir.Constant(i32v, [c if c & h == 0 else LANES + c - h for c in range(LANES)])
        high = ir.Constant(i32v, [c + h if c & h == 0 else LANES + c for c in range(LANES)])
        w = list(v)
        for t in range(LANES):
            if t & h == 0:
                w[t] = builder.shuffle_vector(v[t], v[t + h], low)
                w[t + h] = builder.shuffle_vector(v[t], v[t + h], high)
        v = w
        h //= 2
    return v


def _transpose_codegen(context, builder, sig, args):
    vec = ir.VectorType(ir.FloatType(), LANES)
    int64, data = _arg_readers(context, builder, sig, args)

    def row(base, off, ld, t):
        return builder.bitcast(builder.gep(base, [builder.add(off, builder.mul(ld, ir.Constant(ir.IntType(64), t)))]),
                               vec.as_pointer())

    v = _transposed(builder, [builder.load(row(data(0), int64(1), int64(2), t), align=4) for t in range(LANES)])
    for u in range(LANES):
        builder.store(v[u], row(data(3), int64(4), int64(5), u), align=4)
    return context.get_dummy_value()


@intrinsic
def transpose_block(typingctx, src, s_off, s_ld, dst, d_off, d_ld):
    """An intrinsic: dst.flat[d_off + u * d_ld + t] = src.flat[s_off + t * s_ld + u] for t, u < 16,
    a 16 x 16 block moved transposed through registers (shuffles only, so every bit is kept).
    src and dst: C-contiguous float32 arrays that do not overlap."""
    if _f32_c_array(src) and _f32_c_array(dst):
        return types.none(src, s_off, s_ld, dst, d_off, d_ld), _transpose_codegen
    return None


def _prefetch_codegen(context, builder, sig, args):
    int64, data = _arg_readers(context, builder, sig, args)
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
    write = 1 if sig.args[2].literal_value else 0
    # Locality 3 (keep in every cache level), data cache. LLVM drops the call where a CPU has no prefetch.
    builder.call(fn, [builder.bitcast(builder.gep(data(0), [int64(1)]), i8p), ir.Constant(i32, write),
                      ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def prefetch(typingctx, a, i, write):
    """An intrinsic: ask the CPU to bring the cache line of ``a.flat[i]`` in, to be read (``write``
    False) or written (True, so that the store does not wait for it). A hint: it changes no value,
    and does nothing where ``a`` is not C-contiguous (``a.flat[i]`` is then not at offset i)."""
    if isinstance(a, types.Array) and isinstance(write, types.BooleanLiteral):
        if a.layout == "C":
            return types.none(a, i, write), _prefetch_codegen
        return types.none(a, i, write), lambda context, builder, sig, args: context.get_dummy_value()
    return None


@njit(cache=True, nogil=True)
def gather_scaled(X, rows, shift, scale, out, tile):
    """out[f, b] = (float32(X[rows[b], f]) - shift[f]) * scale[f] for b < len(rows); out:
    C-contiguous (n_features, >= len(rows)), its other columns untouched.

    X may be any numeric dtype (uint8 stays uint8 in memory and is scaled per batch). ``tile``:
    float32 scratch of shape (GATHER_TILE, n_features), so that a caller that gathers every batch
    allocates it once. Each element is computed alone and moved unchanged, so the tiling changes no bit.
    """
    nb = rows.shape[0]
    nf = out.shape[0]
    so = out.shape[1]
    lt = tile.shape[1]
    line = max(1, 64 // X.itemsize)  # elements of X per cache line
    b0 = 0
    while b0 + GATHER_TILE <= nb:
        if b0 + 2 * GATHER_TILE <= nb:
            # The next tile's samples and the lines of ``out`` it will write, asked for now: the
            # activation sample of the topology update (1000 random rows of MNIST, ``out`` 3 MB, both
            # out of L2) took 2.0-2.5 ms to gather without, 0.9-1.0 with (a one-off script, Intel Xeon).
            for t in range(GATHER_TILE):
                r = rows[b0 + GATHER_TILE + t]
                for g in range(0, X.shape[1], line):
                    prefetch(X, r * X.shape[1] + g, False)
            for f in range(nf):
                prefetch(out, f * so + b0 + GATHER_TILE, True)
        for f0 in range(0, nf, GATHER_CHUNK):
            f1 = min(f0 + GATHER_CHUNK, nf)
            # Over slices, not X[r, f0 + g]: LLVM vectorised the loop only in this form (5x faster).
            sh = shift[f0:f1]
            sc = scale[f0:f1]
            for t in range(GATHER_TILE):
                xr = X[rows[b0 + t], f0:f1]
                tr = tile[t]
                for g in range(f1 - f0):
                    tr[g] = (np.float32(xr[g]) - sh[g]) * sc[g]
            f = f0
            while f + LANES <= f1:
                transpose_block(tile, f - f0, lt, out, f * so + b0, so)
                f += LANES
            for g in range(f, f1):
                for t in range(GATHER_TILE):
                    out[g, b0 + t] = tile[t, g - f0]
        b0 += GATHER_TILE
    for b in range(b0, nb):
        r = rows[b]
        for f in range(nf):
            out[f, b] = (np.float32(X[r, f]) - shift[f]) * scale[f]


@njit(cache=True)
def sparse_forward(indptr, indices, values, bias, x, out, alive_in, nb=-1):
    """out = (x.T @ W + b).T for CSR ``W``: out[j, :] = b[j] + sum_{(i,j)} w_ij x[i, :].

    x: (n_in, B) float32, out: (n_out, B) float32. Input rows with ``alive_in[i] == 0`` (all zero
    in this batch, as ``relu_alive`` flags them; all ones is always right) are skipped: their terms
    are +-0, and these sums start at the bias (never -0: biases start at +0 and an add only gives
    -0 from two -0s) and never become -0, so skipping them changes no bit.

    Each out[j, b] adds its terms in ascending input row, whatever the batch; the loop depends on
    it: a batch of 2 in scalar code with x's two values in registers (``_forward_rows_of_two``),
    of 3 to 32 in 16-sample windows (``_forward_rows_in_windows``), others element by element.

    ``nb``: the samples, the first nb columns of x and out (``packed.row_stride``); -1 for all.
    """
    n_out = out.shape[0]
    nb = out.shape[1] if nb < 0 else nb
    for j in range(n_out):
        bj = bias[j]
        for b in range(nb):
            out[j, b] = bj
    n_in = indptr.shape[0] - 1
    if nb == 2:
        _forward_rows_of_two(indptr, indices, values, x, out, alive_in)
        return
    if 2 < nb <= 2 * LANES:
        _forward_rows_in_windows(indptr, indices, values, x, out, alive_in, nb)
        return
    for i in range(n_in):
        if alive_in[i] == 0:
            continue
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            w = values[p]
            for b in range(nb):
                out[j, b] += w * x[i, b]


@njit(cache=True)
def _forward_rows_in_windows(indptr, indices, values, x, out, alive_in, nb):
    # ``sparse_forward``'s adds, 16 samples of a row at a time: x's window is loaded once per row
    # and each connection adds it to out's in one vector add (``row_scatter``). The batch's last
    # samples, if it is not a multiple of 16, go in a window ending at the row's end whose x lanes
    # for samples already done are +0. The element loop reloads x after every store (the compiler
    # cannot prove x and out apart) and runs a short batch in scalar code: a 600,000-wide layer at
    # epsilon 20, batch 14, took 279 ms here against its 929; 1,000-wide, batch 32, 0.115 against
    # 0.281 ms. From about 64 samples on, the element loop's long contiguous runs over each row of
    # out do as well or better (1,000-wide, batch 256: 2.4 against 1.7 ms), so it keeps those
    # (one-off scripts, 2-vCPU AMD EPYC Zen 3). x and out share their row stride.
    stride = x.shape[1]
    full = nb // LANES * LANES
    for i in range(indptr.shape[0] - 1):
        if alive_in[i] == 0:
            continue
        p0 = indptr[i]
        p1 = indptr[i + 1]
        for b0 in range(0, full, LANES):
            row_scatter(x, i * stride, out, stride, b0, 0, LANES, indices, values, p0, p1)
        if full < nb:
            if nb > LANES:
                row_scatter(x, i * stride, out, stride, nb - LANES, full - (nb - LANES), LANES, indices, values, p0,
                            p1)
            else:
                row_scatter(x, i * stride, out, stride, 0, 0, nb, indices, values, p0, p1)


@njit(cache=True)
def _forward_rows_of_two(indptr, indices, values, x, out, alive_in):
    # ``sparse_forward``'s loop at a batch of two (the SET authors' largest network trains with
    # batches of 2), the same adds in the same order. The general loop reloads x[i, b] after every
    # store to out, which the compiler cannot prove is elsewhere; here x's two values stay in
    # registers: 56-57 against 100 ms for a 600,000-wide layer at epsilon 20 (24 million
    # connections, a one-off script).
    for i in range(indptr.shape[0] - 1):
        if alive_in[i] == 0:
            continue
        x0 = x[i, 0]
        x1 = x[i, 1]
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            w = values[p]
            out[j, 0] += w * x0
            out[j, 1] += w * x1


@njit(cache=True)
def sparse_backward(indptr, indices, values, x, dy, dx, grad, compute_dx):
    """Gradients of a sparse layer, on existing connections only.

    grad[p] = sum_b x[i, b] * dy[j, b] for connection p = (i, j) (dL/dW restricted to the CSR
    pattern); if ``compute_dx``: dx[i, :] = sum_{(i,j)} w_ij dy[j, :] (dL/dx, with the weights
    before this step's update). x: (n_in, B), dy: (n_out, B), dx: (n_in, B), grad: (nnz,).

    Summation order, the same in every backward kernel here: each dx[i, b] adds its connections in
    CSR order starting from 0. Each grad[p] adds its products in 16 lanes (lane l: samples l, l + 16,
    ..., from +0), then in a fixed tree (``lane_dots4``), which is SIMD. The two sums run in separate
    loops because they need different loops to be fast: the weight gradient is a reduction per
    connection, the input gradient is elementwise over the batch.
    The training loop runs the same sums in ``backward_rows``, which also skips dead neurons and
    applies the ReLU mask to dx; this one-layer form leaves dx unmasked.
    """
    n_in = indptr.shape[0] - 1
    n_out = dy.shape[0]
    backward_rows(indptr, indices, values, x, dy, dx, grad, 0, n_in, np.ones(n_in, np.uint8),
                  np.ones(n_out, np.uint8), False, wide_rows(indptr))
    if compute_dx:
        input_gradient_rows(indptr, indices, values, dy, x, dx, 0, n_in, False)


@njit(cache=True)
def wide_rows(indptr):
    """Whether a layer's rows hold 8 or more connections on average: picks the backward loop
    (``backward_rows``); every loop sums in the same order."""
    n_in = indptr.shape[0] - 1
    return indptr[n_in] - indptr[0] >= 8 * n_in


# The weight gradient, in 16 lanes. numba offers no SIMD and its compiler keeps a
# float sum in its written order (no reassociation without fastmath, which would make the bits
# depend on the CPU), so a dot product over the batch is a scalar chain. These intrinsics write the
# vector code in LLVM IR instead: lane l (0..15) adds the products of samples b = l, l + 16, ... in
# that order, from +0; a batch that is not a multiple of 16 leaves the last lanes short. The lanes
# are then added in a fixed tree (l + 8, then + 4, + 2, + 1). Only IEEE multiplies and adds on
# <16 x float>, without fast-math flags, so no fused multiply-add and the same bits on every CPU
# (AVX-512 runs them as one register, AVX2 as two, NEON as four). ``tests/reference.py`` has the
# numpy twin, ``lane_dot_ref``.
LANES = 16


def _splat(builder, value, ty):
    """The vector of type ``ty`` with ``value`` in every lane."""
    v = builder.insert_element(ir.Constant(ty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), ty.count), [0] * ty.count))


def _arg_readers(context, builder, sig, args):
    """(int64, data) for an intrinsic's codegen: ``int64(k)`` is argument k cast to int64,
    ``data(k)`` the data pointer of array argument k."""

    def int64(k):
        return context.cast(builder, args[k], sig.args[k], types.int64)

    def data(k):
        return make_array(sig.args[k])(context, builder, args[k]).data

    return int64, data


def _tail_mask(builder, n, width):
    """<width x i1>: lane l < n, for the masked loads of a short last chunk."""
    i64v = ir.VectorType(ir.IntType(64), width)
    return builder.icmp_signed("<", ir.Constant(i64v, list(range(width))), _splat(builder, n, i64v))


def _masked_load(builder, ptr, vec, mask):
    """``vec`` from ``ptr`` where ``mask`` is set and +0 elsewhere; the masked-off lanes are not read,
    so a chunk may run past the end of the array. One instruction on AVX2 and AVX-512 (vmaskmovps,
    a masked vmovups); LLVM turns it into scalar loads where the CPU has none (NEON)."""
    fnty = ir.FunctionType(vec, [vec.as_pointer(), ir.IntType(32), mask.type, vec])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.v{vec.count}f32.p0")
    return builder.call(fn, [builder.bitcast(ptr, vec.as_pointer()), ir.Constant(ir.IntType(32), 4), mask,
                             ir.Constant(vec, None)])


def _lane_tree(builder, v, width=LANES):
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), half), list(range(half, width))))
        v = builder.fadd(lo, hi)
        width = half
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _f32_c_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"


def _lane_codegen(k, with_dx, fresh=False):
    """LLVM IR of ``lane_dots{k}`` (and, ``with_dx``, of ``lane_dots_dx{k}``); see there."""

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        i32, i64 = ir.IntType(32), ir.IntType(64)

        def int64(value, ty):
            return context.cast(builder, value, ty, types.int64)

        def vload(ptr):
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

        def var():
            return cgutils.alloca_once_value(builder, ir.Constant(vec, None))

        x_off = int64(args[1], sig.args[1])
        px = builder.gep(make_array(sig.args[0])(context, builder, args[0]).data, [x_off])
        y_data = make_array(sig.args[2])(context, builder, args[2]).data
        pys = [builder.gep(y_data, [int64(off, sig.args[3].dtype)])
               for off in cgutils.unpack_tuple(builder, args[3], k)]
        n = int64(args[4], sig.args[4])
        if with_dx:
            pdx = builder.gep(make_array(sig.args[5])(context, builder, args[5]).data, [x_off])
            ws = []
            for w in cgutils.unpack_tuple(builder, args[6], k):
                ws.append(_splat(builder, w, vec))

        def step(vx, vys, acc_vals, d):
            # One chunk: each lane sum + x * y; dx (elementwise) + w0 * y0, then + w1 * y1, ...
            sums = [builder.fadd(a, builder.fmul(vx, vy)) for a, vy in zip(acc_vals, vys)]
            if with_dx:
                for w, vy in zip(ws, vys):
                    d = builder.fadd(d, builder.fmul(w, vy))
            return sums, d

        accs = [var() for _ in range(k)]
        chunks = builder.udiv(n, ir.Constant(i64, LANES))
        zero = ir.Constant(vec, None)
        with cgutils.for_range(builder, chunks) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, LANES))
            d = (zero if fresh else vload(builder.gep(pdx, [off]))) if with_dx else None
            sums, d = step(vload(builder.gep(px, [off])), [vload(builder.gep(py, [off])) for py in pys],
                           [builder.load(acc) for acc in accs], d)
            for acc, v in zip(accs, sums):
                builder.store(v, acc)
            if with_dx:
                builder.store(d, builder.bitcast(builder.gep(pdx, [off]), vec.as_pointer()), align=4)
        # The last n % 16 samples go to lanes 0.. of one more chunk whose other lanes are +0;
        # +0 * +0 = +0 and a lane (from +0, never -0) plus +0 is unchanged, so that is exact. It is
        # loaded under a mask and dx stored lane by lane behind predictable branches: built element
        # by element through the stack, this chunk cost more than the other six of a batch of 100
        # (1.7-2.5x the time of a batch of 112 on AVX2); AVX2's masked store is microcoded on AMD
        # Zen 3 and was 1.05-1.24x slower than these branches (tools/bench_ab.py).
        done = builder.mul(chunks, ir.Constant(i64, LANES))
        mask = _tail_mask(builder, builder.sub(n, done), LANES)
        tails = [_masked_load(builder, builder.gep(ptr, [done]), vec, mask)
                 for ptr in [px] + pys + ([pdx] if with_dx and not fresh else [])]  # x, the k y's, dx
        if with_dx and fresh:
            tails.append(zero)
        sums, d = step(tails[0], tails[1:k + 1], [builder.load(acc) for acc in accs], tails[-1] if with_dx else None)
        if with_dx:
            left = builder.sub(n, done)
            for lane in range(LANES - 1):
                with builder.if_then(builder.icmp_signed(">", left, ir.Constant(i64, lane))):
                    builder.store(builder.extract_element(d, ir.Constant(i32, lane)),
                                  builder.gep(pdx, [builder.add(done, ir.Constant(i64, lane))]))
        return context.make_tuple(builder, sig.return_type, [_lane_tree(builder, v) for v in sums])

    return codegen


def _lane_dots(k):
    """An intrinsic (x, x_off, y, y_offs, n) -> k float32: dot(x.flat[x_off:x_off + n],
    y.flat[y_offs[t]:y_offs[t] + n]) for t < k in the lane order above, sharing each load of x.
    x and y: C-contiguous float32 arrays (the flat offsets assume it)."""

    @intrinsic
    def lane_dots(typingctx, x, x_off, y, y_offs, n):
        if _f32_c_array(x) and _f32_c_array(y) and isinstance(y_offs, types.UniTuple) and y_offs.count == k:
            return types.UniTuple(types.float32, k)(x, x_off, y, y_offs, n), _lane_codegen(k, False)
        return None

    return lane_dots


def _lane_dots_dx(k, fresh=False):
    """``_lane_dots(k)`` that also adds ws[t] * y.flat[y_offs[t]:...] to dx.flat[x_off:x_off + n],
    elementwise, t = 0, 1, ... in turn (``input_gradient_rows``' order): one pass over the y rows
    for both gradients. dx: C-contiguous float32 of x's shape; ws: k float32."""

    @intrinsic
    def lane_dots_dx(typingctx, x, x_off, y, y_offs, n, dx, ws):
        if (_f32_c_array(x) and _f32_c_array(y) and _f32_c_array(dx) and isinstance(y_offs, types.UniTuple)
                and y_offs.count == k and isinstance(ws, types.UniTuple) and ws.count == k
                and ws.dtype == types.float32):
            return types.UniTuple(types.float32, k)(x, x_off, y, y_offs, n, dx, ws), _lane_codegen(k, True, fresh)
        return None

    return lane_dots_dx


lane_dots1, lane_dots4 = _lane_dots(1), _lane_dots(4)
lane_dots_dx1, lane_dots_dx4 = _lane_dots_dx(1), _lane_dots_dx(4)
# ``lane_dots_dx1`` onto a dx row that starts at +0 without reading it: dx = +0 + w0 * y0, the same
# bits as adding to a row of zeros, with no pass to zero the row first.
lane_dots_dx1_fresh = _lane_dots_dx(1, fresh=True)


# The cosine scores' float64 dot products (``canonical_score``) take k pairs at a time, each with its
# own x and y rows, so that k independent vector chains keep the adder busy while the pairs are
# scattered over the rows. They are float64 in 8 lanes: lane l adds float64(x[s]) *
# float64(y[s]) for s = l, l + 8, ... in that order, from +0, then the lanes are added l + 4, + 2,
# + 1. A float32 x float32 product is exact in float64, so whether the compiler fuses it with the
# add changes nothing; the adds are IEEE adds on <8 x double>, the same bits on every CPU.
PAIR_LANES = 8


def _pair_codegen(k):
    lanes = PAIR_LANES

    def codegen(context, builder, sig, args):
        f32v = ir.VectorType(ir.FloatType(), lanes)
        accv = ir.VectorType(ir.DoubleType(), lanes)
        i64 = ir.IntType(64)

        def pointers(array, offsets, ty):
            data = make_array(ty)(context, builder, array).data
            return [builder.gep(data, [context.cast(builder, off, sig.args[1].dtype, types.int64)])
                    for off in cgutils.unpack_tuple(builder, offsets, k)]

        def var(ty):
            return cgutils.alloca_once_value(builder, ir.Constant(ty, None))

        pxs, pys = pointers(args[0], args[1], sig.args[0]), pointers(args[2], args[3], sig.args[2])
        n = context.cast(builder, args[4], sig.args[4], types.int64)
        accs = [var(accv) for _ in range(k)]

        def step(vxs, vys):
            for acc, vx, vy in zip(accs, vxs, vys):
                product = builder.fmul(builder.fpext(vx, accv), builder.fpext(vy, accv))
                builder.store(builder.fadd(builder.load(acc), product), acc)

        chunks = builder.udiv(n, ir.Constant(i64, lanes))
        with cgutils.for_range(builder, chunks) as loop:
            off = builder.mul(loop.index, ir.Constant(i64, lanes))
            step(*[[builder.load(builder.bitcast(builder.gep(p, [off]), f32v.as_pointer()), align=4) for p in ps]
                   for ps in (pxs, pys)])
        # The last n % lanes samples go to lanes 0.. of one more chunk whose other lanes are +0 (see
        # ``_lane_codegen``: that adds +0 to lanes that are never -0, which is exact).
        done = builder.mul(chunks, ir.Constant(i64, lanes))
        mask = _tail_mask(builder, builder.sub(n, done), lanes)
        tails = [_masked_load(builder, builder.gep(p, [done]), f32v, mask) for p in pxs + pys]
        step(tails[:k], tails[k:])
        return context.make_tuple(builder, sig.return_type,
                                  [_lane_tree(builder, builder.load(acc), lanes) for acc in accs])

    return codegen


def _pair_dots(k):
    """An intrinsic (x, x_offs, y, y_offs, n) -> k float64: the lane dot products above of
    x.flat[x_offs[t]:x_offs[t] + n] and y.flat[y_offs[t]:y_offs[t] + n], t < k. x and y:
    C-contiguous float32 arrays; offsets: k-tuples of ints."""

    @intrinsic
    def pair_dots(typingctx, x, x_offs, y, y_offs, n):
        if (_f32_c_array(x) and _f32_c_array(y) and isinstance(x_offs, types.UniTuple) and x_offs.count == k
                and x_offs == y_offs and isinstance(x_offs.dtype, types.Integer)):
            return types.UniTuple(types.float64, k)(x, x_offs, y, y_offs, n), _pair_codegen(k)
        return None

    return pair_dots


pair_dots1, pair_dots8 = _pair_dots(1), _pair_dots(8)


@njit(cache=True)
def _weight_gradient_by_row(indptr, indices, x, dy, grad, i0, i1, alive_in, nb=-1):
    # Four connections at a time share each vector load of x[i, :]: about 20% faster than one at a
    # time on a 1000 x 1000 layer at epsilon 20 (0.29 against 0.35 ms, a one-off script); dy's rows
    # come from L2 and bound it. A dead row's gradients are +0 (``backward_rows``) without reading it.
    sx, sy = x.shape[1], dy.shape[1]  # row strides; nb samples of each row are read
    nb = sx if nb < 0 else nb
    for i in range(i0, i1):
        p = indptr[i]
        p1 = indptr[i + 1]
        if alive_in[i] == 0:
            for q in range(p, p1):
                grad[q] = 0.0
            continue
        xi = i * sx
        while p + 4 <= p1:
            grad[p], grad[p + 1], grad[p + 2], grad[p + 3] = lane_dots4(
                x, xi, dy, (indices[p] * sy, indices[p + 1] * sy, indices[p + 2] * sy, indices[p + 3] * sy), nb)
            p += 4
        while p < p1:
            (grad[p],) = lane_dots1(x, xi, dy, (indices[p] * sy,), nb)
            p += 1


@njit(cache=True)
def _backward_by_row(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, nb=-1):
    # ``_weight_gradient_by_row`` and ``input_gradient_rows(..., relu=True)`` in one pass over each
    # row's dy rows, same bits as the two: dy's rows come from L2, and reading them once for both
    # gradients instead of twice raised the phase table's "weight + input gradient" column
    # (tools/bench_train.py) from 19-26 to 37-39 GFLOP/s on 1 thread, in two runs of one session.
    # A dead row's gradients are +0 and its masked dx all +0 (``backward_rows``), written unread:
    # with a batch of 2, a quarter to a third of a hidden level is dead in a batch. dx shares x's
    # row stride (the intrinsic adds to dx at x's offset).
    sx, sy = x.shape[1], dy.shape[1]
    nb = sx if nb < 0 else nb
    one = _opaque_one(nb)
    for i in range(i0, i1):
        for b in range(nb):
            dx[i, b] = 0.0
        p = indptr[i]
        p1 = indptr[i + 1]
        if alive_in[i] == 0:
            for q in range(p, p1):
                grad[q] = 0.0
            continue
        xi = i * sx
        while p + 4 <= p1:
            grad[p], grad[p + 1], grad[p + 2], grad[p + 3] = lane_dots_dx4(
                x, xi, dy, (indices[p] * sy, indices[p + 1] * sy, indices[p + 2] * sy, indices[p + 3] * sy), nb,
                dx, (values[p], values[p + 1], values[p + 2], values[p + 3]))
            p += 4
        while p < p1:
            (grad[p],) = lane_dots_dx1(x, xi, dy, (indices[p] * sy,), nb, dx, (values[p],))
            p += 1
        for b in range(nb):
            dx[i, b] = np.float32(0.0) if x[i, b] <= 0.0 else dx[i, b] * one


@njit(cache=True)
def _backward_rows_of_two(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, compute_dx):
    # The wide loops at a batch of two, the same sums in plain scalar code: two samples fill 2 of
    # the 16 lanes, and the masked vector loads, products and tree of 14 empty lanes cost more than
    # the work. In the lanes, lane b holds +0 + x[i, b] * dy[j, b] (never -0) and every other lane
    # +0, which the tree's adds leave alone until its last add, lane 0 + lane 1: so the weight
    # gradient is (+0 + p0) + (+0 + p1), bit for bit. dx as in ``_backward_by_row``.
    z = np.float32(0.0)
    one = _opaque_one(2)
    for i in range(i0, i1):
        p0 = indptr[i]
        p1 = indptr[i + 1]
        if alive_in[i] == 0:
            for q in range(p0, p1):
                grad[q] = z
            if compute_dx:
                dx[i, 0] = z
                dx[i, 1] = z
            continue
        x0 = x[i, 0]
        x1 = x[i, 1]
        d0 = z
        d1 = z
        for q in range(p0, p1):
            j = indices[q]
            y0 = dy[j, 0]
            y1 = dy[j, 1]
            grad[q] = (z + x0 * y0) + (z + x1 * y1)
            if compute_dx:
                w = values[q]
                d0 += w * y0
                d1 += w * y1
        if compute_dx:
            dx[i, 0] = z if x0 <= 0.0 else d0 * one
            dx[i, 1] = z if x1 <= 0.0 else d1 * one


@njit(cache=True)
def input_gradient_rows(indptr, indices, values, dy, x, dx, i0, i1, relu):
    """dx[i, :] = sum_{(i,j)} w_ij dy[j, :] for input rows i0:i1, connections in CSR order.

    With ``relu``, dx[i, b] is then zeroed where x[i, b] <= 0 (the ReLU derivative, read from the
    stored post-activation x, so pre-activations need not be kept). The loop over the batch is
    elementwise, so it is SIMD.
    """
    nb = dy.shape[1]
    one = _opaque_one(nb)
    for i in range(i0, i1):
        for b in range(nb):
            dx[i, b] = 0.0
        p = indptr[i]
        p1 = indptr[i + 1]
        # Four connections per pass over dx[i, :], added left to right, as in ``forward_cols``.
        while p + 4 <= p1:
            j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
            w0, w1, w2, w3 = values[p], values[p + 1], values[p + 2], values[p + 3]
            for b in range(nb):
                dx[i, b] = (((dx[i, b] + w0 * dy[j0, b]) + w1 * dy[j1, b]) + w2 * dy[j2, b]) + w3 * dy[j3, b]
            p += 4
        while p < p1:
            j0 = indices[p]
            w0 = values[p]
            for b in range(nb):
                dx[i, b] += w0 * dy[j0, b]
            p += 1
        if relu:
            for b in range(nb):
                dx[i, b] = np.float32(0.0) if x[i, b] <= 0.0 else dx[i, b] * one


@njit(cache=True)
def _backward_by_row_skipping(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, alive_out, compute_dx, nb):
    # Rows of a few connections (about 2 at epsilon 1): one connection at a time, dead outputs
    # skipped. dx[i, :] takes its connections in CSR order (``lane_dots_dx1``) while the row is in
    # L1, and is masked right after. Listing the live connections of many rows first and summing
    # them four at a time, then dx row by row, then the masks, passed over the dx rows three times:
    # a 1000 x 1000 layer at epsilon 1, batch 100, took 46.6 against 72.7 us with every neuron
    # alive and 19.6 against 25.5 with 30% alive (with dx; 0.9-1.0x as much without), the same bits
    # (one-off script, Intel Xeon). A row's first live connection writes dx without reading it
    # (``lane_dots_dx1_fresh``), so a row is zeroed only when none is live: 42.5 against 50.2 us
    # all alive, 19.2 against 20.8 at 30%; the 1000 x 10 output layer 25.0 against 32.6.
    sx, sy = x.shape[1], dy.shape[1]
    one = _opaque_one(nb)
    z = np.float32(0.0)
    for i in range(i0, i1):
        p0 = indptr[i]
        p1 = indptr[i + 1]
        if alive_in[i] == 0:
            for q in range(p0, p1):
                grad[q] = z
            if compute_dx:
                for b in range(nb):
                    dx[i, b] = z
            continue
        xi = i * sx
        first = True  # no live connection added to dx[i, :] yet, which holds whatever it held
        for p in range(p0, p1):
            j = indices[p]
            if alive_out[j] == 0:
                grad[p] = z
            elif not compute_dx:
                (grad[p],) = lane_dots1(x, xi, dy, (j * sy,), nb)
            elif first:
                (grad[p],) = lane_dots_dx1_fresh(x, xi, dy, (j * sy,), nb, dx, (values[p],))
                first = False
            else:
                (grad[p],) = lane_dots_dx1(x, xi, dy, (j * sy,), nb, dx, (values[p],))
        if compute_dx:
            if first:
                for b in range(nb):
                    dx[i, b] = z
            else:
                for b in range(nb):
                    dx[i, b] = z if x[i, b] <= 0.0 else dx[i, b] * one


@njit(cache=True)
def backward_rows(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, alive_out, compute_dx, wide, nb=-1):
    """The training loop's backward pass of a sparse layer's input rows i0:i1, on existing connections only.

    grad[p] = sum_b x[i, b] * dy[j, b] for connection p = (i, j); if ``compute_dx``, dx[i, :] =
    sum_{(i,j)} w_ij dy[j, :] with the ReLU mask of x applied (0 where x[i, b] <= 0), which is what
    the layer below needs. Same summation order as ``sparse_backward``, so the same bits.

    Dead neurons are skipped: ``alive_in[i]`` / ``alive_out[j]`` are 0 where x[i, :] / dy[j, :] is all
    zero in this batch (``relu_alive``; all ones is always right). A trained ReLU network at epsilon 1
    has many of its hidden neurons dead in a batch. Every product of a dead connection
    is +-0, and adding +-0 to these sums (which start at +0 and never become -0) changes nothing, so
    its gradient is +0 and its terms in dx vanish; a dead row's dx is all masked to 0 anyway. (Only a
    non-finite weight or activation, in a run that has diverged, could tell the difference.)

    The weight gradient is summed in 16 lanes and a fixed tree (``lane_dots``) either way; ``wide``
    (``wide_rows``, where hardly any neuron is dead) picks only the loop. Both go by input rows and
    skip dead ones. Wide: each load of x[i, :] shared by four connections; with ``compute_dx``, dx in
    the same pass over each row's dy rows (``_backward_by_row``), else the weight gradient alone
    (``_weight_gradient_by_row``); dead outputs are not skipped (testing for them cost more than it
    saved). Else one connection at a time, dead outputs skipped (``_backward_by_row_skipping``). At
    a batch of two, one scalar loop does both (``_backward_rows_of_two``).

    ``nb``: the samples, the first nb columns of x, dy and dx, whose rows may be longer
    (``packed.row_stride``; dx's stride is x's); -1 for all.
    """
    nb = x.shape[1] if nb < 0 else nb
    if nb == 2:
        _backward_rows_of_two(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, compute_dx)
    elif not wide:
        _backward_by_row_skipping(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, alive_out, compute_dx,
                                  nb)
    elif compute_dx:
        _backward_by_row(indptr, indices, values, x, dy, dx, grad, i0, i1, alive_in, nb)
    else:
        _weight_gradient_by_row(indptr, indices, x, dy, grad, i0, i1, alive_in, nb)


@njit(cache=True, parallel=True)
def sparse_backward_threads(indptr, indices, values, x, dy, dx, grad, alive_in, alive_out, compute_dx, threads, nb=-1):
    """``backward_rows`` on ``threads`` threads, each on its own input rows: a row owns its
    connections and its dx row, so no two threads write the same number; same bits as serial."""
    n_in = indptr.shape[0] - 1
    wide = wide_rows(indptr)
    for t in prange(threads):
        backward_rows(indptr, indices, values, x, dy, dx, grad, t * n_in // threads, (t + 1) * n_in // threads,
                      alive_in, alive_out, compute_dx, wide, nb)


@njit(cache=True)
def csc_from_csr(indptr, indices, colptr, rowidx, perm):
    """The CSC form of a CSR pattern: column j's connections are ``perm[colptr[j]:colptr[j+1]]``
    (indices into the CSR arrays), in ascending input row ``rowidx``. O(nnz + n_out), a counting sort.

    colptr: int64 (n_out + 1,), rowidx and perm: int32 (nnz,), all written.
    """
    n_in = indptr.shape[0] - 1
    n_out = colptr.shape[0] - 1
    base = indptr[0]
    for j in range(n_out + 1):
        colptr[j] = 0
    for p in range(indptr[0], indptr[n_in]):
        colptr[indices[p] + 1] += 1
    for j in range(n_out):
        colptr[j + 1] += colptr[j]
    # Fill by ascending rows; a column's cursor starts at its colptr and is restored below.
    for i in range(n_in):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            q = colptr[j]
            rowidx[q] = i
            perm[q] = p - base
            colptr[j] = q + 1
    for j in range(n_out, 0, -1):
        colptr[j] = colptr[j - 1]
    colptr[0] = 0


def _target_features() -> str:
    """The CPU features numba compiles for: NUMBA_CPU_FEATURES if set, else the host's."""
    if numba.config.CPU_FEATURES:
        return numba.config.CPU_FEATURES
    from llvmlite.binding import get_host_cpu_features  # only when NUMBA_CPU_FEATURES is unset

    try:
        return get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot tell on this host
        return ""


# An output row of the forward pass, held in registers. numba's loop over the batch loads and stores
# out[j, :] once per pass over a few connections, and its alias checks and address arithmetic come
# again with every pass. This intrinsic keeps up to 8 chunks of 16 samples of the row in vector
# registers for all of the column's connections: per connection one broadcast weight, one load of
# x[i, b0:b0 + n] (the last chunk under a mask) and a multiply and an add per chunk, in the order
# ``sparse_forward`` adds (bias, then ascending input row; IEEE multiply then add, no fusion), so the
# bits are the same. The ReLU is a select before the single store of the row. Up to 128 samples
# per call on AVX-512 (8 of its 32 registers), 64 elsewhere (AVX2 has 16 registers of 8 floats,
# NEON 32 of 4); a larger batch takes several calls, which changes no sum.
FORWARD_GROUP = 128 if "+avx512f" in _target_features().split(",") else 64


def _col_forward_codegen(g):
    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        int64, data = _arg_readers(context, builder, sig, args)
        px = builder.gep(data(0), [int64(1)])
        stride, prow, pperm, pval = int64(2), data(3), data(4), data(5)
        pout = builder.gep(data(9), [int64(10)])
        left = builder.sub(int64(11), ir.Constant(i64, LANES * (g - 1)))  # samples in the last chunk
        mask = _tail_mask(builder, left, LANES)
        accs = [cgutils.alloca_once_value(builder, _splat(builder, args[8], vec)) for _ in range(g)]
        with cgutils.for_range_slice(builder, int64(6), int64(7), ir.Constant(i64, 1)) as (q, _):
            i = builder.sext(builder.load(builder.gep(prow, [q])), i64)
            at = builder.sext(builder.load(builder.gep(pperm, [q])), i64)
            w = _splat(builder, builder.load(builder.gep(pval, [at])), vec)
            row = builder.gep(px, [builder.mul(i, stride)])
            for c, acc in enumerate(accs):
                ptr = builder.gep(row, [ir.Constant(i64, c * LANES)])
                v = (builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4) if c < g - 1
                     else _masked_load(builder, ptr, vec, mask))
                builder.store(builder.fadd(builder.load(acc), builder.fmul(w, v)), acc)
        zero = ir.Constant(vec, None)
        relu = _splat(builder, builder.icmp_signed("!=", int64(12), ir.Constant(i64, 0)),
                      ir.VectorType(ir.IntType(1), LANES))
        nonzero = None
        for c, acc in enumerate(accs):
            v = builder.load(acc)
            # ``0 if v < 0 else v``: NaN and -0 stay as they are, as in ``relu_alive``.
            v = builder.select(builder.and_(builder.fcmp_ordered("<", v, zero), relu), zero, v)
            nz = builder.fcmp_unordered("!=", v, zero)  # ``v != 0``, true for NaN, as in ``relu_alive``
            if c == g - 1:  # the last chunk's lanes past n hold the bias, not values of the row
                nz = builder.and_(nz, mask)
            nonzero = nz if nonzero is None else builder.or_(nonzero, nz)
            ptr = builder.gep(pout, [ir.Constant(i64, c * LANES)])
            if c < g - 1:
                builder.store(v, builder.bitcast(ptr, vec.as_pointer()), align=4)
                continue
            for lane in range(LANES):  # lane by lane: AVX2's masked store is microcoded on AMD Zen 3
                with builder.if_then(builder.icmp_signed(">", left, ir.Constant(i64, lane))):
                    builder.store(builder.extract_element(v, ir.Constant(i32, lane)),
                                  builder.gep(ptr, [ir.Constant(i64, lane)]))
        bits = builder.bitcast(nonzero, ir.IntType(LANES))
        return builder.zext(builder.icmp_unsigned("!=", bits, ir.Constant(ir.IntType(LANES), 0)), ir.IntType(8))

    return codegen


def _col_forward(g):
    """An intrinsic (x, x_off, stride, rowidx, perm, values, q0, q1, bias_j, out, out_off, n, relu):
    out.flat[out_off:out_off + n] = bias_j + sum over q in q0:q1 of
    values[perm[q]] * x.flat[x_off + rowidx[q] * stride:... + n], added in q order, for
    16 * (g - 1) < n <= 16 * g; then the ReLU if relu. Returns 1 (uint8) if one of the n values
    written is not zero (NaN counts), else 0: ``relu_alive``'s flag, from the registers. x and out:
    C-contiguous float32."""

    @intrinsic
    def col_forward(typingctx, x, x_off, stride, rowidx, perm, values, q0, q1, bias_j, out, out_off, n, relu):
        if _f32_c_array(x) and _f32_c_array(out) and isinstance(values, types.Array) and values.dtype == types.float32:
            sig = types.uint8(x, x_off, stride, rowidx, perm, values, q0, q1, bias_j, out, out_off, n, relu)
            return sig, _col_forward_codegen(g)
        return None

    return col_forward


col_forward1, col_forward2, col_forward3, col_forward4 = (_col_forward(g) for g in (1, 2, 3, 4))
col_forward5, col_forward6, col_forward7, col_forward8 = (_col_forward(g) for g in (5, 6, 7, 8))


def _row_scatter_codegen(context, builder, sig, args):
    vec = ir.VectorType(ir.FloatType(), LANES)
    i32, i64 = ir.IntType(32), ir.IntType(64)
    i64v = ir.VectorType(i64, LANES)
    int64, data = _arg_readers(context, builder, sig, args)
    out = make_array(sig.args[2])(context, builder, args[2])
    size = builder.mul(builder.extract_value(out.shape, 0), builder.extract_value(out.shape, 1))
    nb, b0, lo, hi = int64(3), int64(4), int64(5), int64(6)
    lanes = ir.Constant(i64v, list(range(LANES)))
    mask = builder.and_(builder.icmp_signed(">=", lanes, _splat(builder, lo, i64v)),
                        builder.icmp_signed("<", lanes, _splat(builder, hi, i64v)))
    vx = _masked_load(builder, builder.gep(data(0), [builder.add(int64(1), b0)]), vec, mask)
    pidx, pval = data(7), data(8)
    last = builder.sub(size, ir.Constant(i64, LANES))  # the last start of a window inside out
    with cgutils.for_range_slice(builder, int64(9), int64(10), ir.Constant(i64, 1)) as (q, _):
        j = builder.sext(builder.load(builder.gep(pidx, [q])), i64)
        w = _splat(builder, builder.load(builder.gep(pval, [q])), vec)
        start = builder.add(builder.mul(j, nb), b0)
        po = builder.gep(out.data, [start])
        with builder.if_else(builder.icmp_signed("<=", start, last), likely=True) as (inside, at_end):
            with inside:
                pv = builder.bitcast(po, vec.as_pointer())
                builder.store(builder.fadd(builder.load(pv, align=4), builder.fmul(w, vx)), pv, align=4)
            with at_end:  # a window that would run past out's end: lanes [lo, hi) one by one
                v = builder.fadd(_masked_load(builder, po, vec, mask), builder.fmul(w, vx))
                for lane in range(LANES):
                    with builder.if_then(builder.extract_element(mask, ir.Constant(i32, lane))):
                        builder.store(builder.extract_element(v, ir.Constant(i32, lane)),
                                      builder.gep(po, [ir.Constant(i64, lane)]))
    return context.get_dummy_value()


@intrinsic
def row_scatter(typingctx, x, x_off, out, nb, b0, lo, hi, indices, values, p0, p1):
    """An intrinsic: for q in p0:p1, out.flat[s:s + 16] += values[q] * xw with s = indices[q] * nb + b0
    and xw = x.flat[x_off + b0:... + 16] in lanes [lo, hi) and +0 in the others (those are not read).

    One IEEE multiply and add per lane, as ``sparse_forward``'s element loop does them, so the lanes
    [lo, hi) get its bits; the others add w * +0 = +-0, which leaves every value but -0 as it is
    (``sparse_forward``'s sums are never -0), so a window may cover samples done already and, for a
    batch under 16, the next rows of out. Where it would run past the end of out, only the lanes
    [lo, hi) are written, one by one. So no other thread may write out meanwhile (none does:
    ``sparse_forward`` is serial). x and out: C-contiguous float32, out 2-D.
    """
    if _f32_c_array(x) and _f32_c_array(out) and out.ndim == 2:
        return types.none(x, x_off, out, nb, b0, lo, hi, indices, values, p0, p1), _row_scatter_codegen
    return None


@njit(cache=True, nogil=True)
def forward_cols(colptr, rowidx, perm, values, bias, x, out, j0, j1, relu, alive, nb=-1, rows_out=None):
    """Output rows j0:j1 of ``sparse_forward`` from the CSC copy, optionally with ReLU applied.

    out[j, b] = b[j] + sum over the column's connections in ascending input row, which is the
    order ``sparse_forward`` adds them in, so the bits are the same; a thread that owns rows j0:j1
    writes nothing else. Each row in groups of ``FORWARD_GROUP`` samples (``col_forward{g}``).
    ``alive`` (uint8, or empty): alive[j] = 1 where row j has a value other than 0 as written,
    else 0, as ``relu_alive`` would flag it after the ReLU; a pass over out saved. ``nb``: the
    samples, the first nb columns of x and out (``packed.row_stride``); -1 for all.

    ``rows_out`` (int64, or None): if not empty, keep only the rows with a value other than 0,
    packed: the w-th such row of j0:j1 goes to out row j0 + w, and rows_out[j0 + w] = j. A row of
    zeros is written where the next row goes, so it never leaves the cache. Returns the end of the
    rows written: j1, or j0 plus the rows kept. (Empty rather than None where a caller packs some
    layers and not others: one compiled copy serves both, and each copy costs compile memory.)
    """
    sx, so = x.shape[1], out.shape[1]
    nb = sx if nb < 0 else nb
    flags = alive.shape[0] > 0
    packing = False
    if rows_out is not None:
        packing = rows_out.shape[0] > 0
    w = j0
    for j in range(j0, j1):
        q0, q1, bj = colptr[j], colptr[j + 1], bias[j]
        a = np.uint8(0)
        r = w if packing else j
        for b0 in range(0, nb, FORWARD_GROUP):
            n = min(FORWARD_GROUP, nb - b0)
            o = r * so + b0
            g = (n + LANES - 1) // LANES
            if g == 7:  # batch 100
                a |= col_forward7(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 8:
                a |= col_forward8(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 4:
                a |= col_forward4(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 1:
                a |= col_forward1(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 2:
                a |= col_forward2(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 3:
                a |= col_forward3(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            elif g == 5:
                a |= col_forward5(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
            else:
                a |= col_forward6(x, b0, sx, rowidx, perm, values, q0, q1, bj, out, o, n, relu)
        if flags:
            alive[j] = a
        if rows_out is not None:
            if packing and a:
                rows_out[w] = j
                w += 1
    return w if packing else j1


@njit(cache=True, parallel=True)
def sparse_forward_threads(colptr, rowidx, perm, values, bias, x, out, relu, alive, threads, nb=-1):
    """``forward_cols`` over all output rows on ``threads`` threads; same bits as ``sparse_forward``."""
    n_out = out.shape[0]
    for t in prange(threads):
        forward_cols(colptr, rowidx, perm, values, bias, x, out, t * n_out // threads,
                     (t + 1) * n_out // threads, relu, alive, nb)


def _row_sums_codegen(context, builder, sig, args):
    vec = ir.VectorType(ir.FloatType(), LANES)
    i64 = ir.IntType(64)
    int64, data = _arg_readers(context, builder, sig, args)
    base = data(0)
    offs = [context.cast(builder, o, sig.args[1].dtype, types.int64)
            for o in cgutils.unpack_tuple(builder, args[1], LANES)]
    n = int64(2)
    acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))

    def add_columns(rows):
        # Lane u of column b is row u's sample b: the columns in order b = 0, 1, ... are each row's
        # adds in batch order, 16 rows at once.
        total = builder.load(acc)
        for column in _transposed(builder, rows):
            total = builder.fadd(total, column)
        builder.store(total, acc)

    chunks = builder.udiv(n, ir.Constant(i64, LANES))
    with cgutils.for_range(builder, chunks) as loop:
        at = builder.mul(loop.index, ir.Constant(i64, LANES))
        add_columns([builder.load(builder.bitcast(builder.gep(base, [builder.add(o, at)]), vec.as_pointer()), align=4)
                     for o in offs])
    # The last n % 16 samples: the lanes past them load as +0, so their columns are all +0, and adding
    # +0 leaves a sum that starts at +0 as it is (it is never -0; Inf and NaN stay).
    done = builder.mul(chunks, ir.Constant(i64, LANES))
    mask = _tail_mask(builder, builder.sub(n, done), LANES)
    add_columns([_masked_load(builder, builder.gep(base, [builder.add(o, done)]), vec, mask) for o in offs])
    total = builder.load(acc)
    return context.make_tuple(builder, sig.return_type,
                              [builder.extract_element(total, ir.Constant(ir.IntType(32), u)) for u in range(LANES)])


@intrinsic
def row_sums16(typingctx, a, offs, n):
    """An intrinsic: the 16 float32 sums of a.flat[offs[u]:offs[u] + n], u < 16, each added in order
    from +0, as a scalar loop would add them, but 16 rows in the lanes of one vector: a 16 x 16
    block at a time transposed in registers, then its columns added in turn. a: C-contiguous float32."""
    if _f32_c_array(a) and isinstance(offs, types.UniTuple) and offs.count == LANES and isinstance(offs.dtype,
                                                                                                   types.Integer):
        return types.UniTuple(types.float32, LANES)(a, offs, n), _row_sums_codegen
    return None


# Scratch for ``bias_gradient``'s list of live neurons: 8 KiB.
LIVE_CHUNK = 1024


@njit(cache=True)
def bias_gradient(dy, out, alive, live, nb=-1):
    """out[j] = sum_b dy[j, b], added in batch order from 0; from 32 samples on, 16 neurons' sums at
    a time in the lanes of a vector (``row_sums16``), since each scalar chain waits on its add's
    latency: at epsilon 1 eight scalar chains at a time were 11% of a training epoch of the MNIST
    network (a one-off script with cycle counters in the training loop, Intel Xeon); 1000 neurons,
    batch 100: 16.2 against 24.0 us. Shorter rows keep the eight chains, which the transposition
    does not beat there: batch 2, 4.2 against 6.7 us; batch 16, 7.8 against 8.5 (one-off script).

    Neurons with ``alive[j] == 0`` get +0 without being read: a dead neuron's dy is all +-0 (the
    ReLU mask zeroes it), and a sum of +-0 from +0 is +0, so the bits are the same. At epsilon 1
    most hidden neurons of a trained network are dead in a batch. ``live``: int64 scratch for the
    list of live neurons, any length. ``nb``: the samples, dy's first nb columns; -1 for all.
    """
    n = dy.shape[0]
    sy = dy.shape[1]
    nb = sy if nb < 0 else nb
    z = np.float32(0.0)
    chunk = live.shape[0]
    j = 0
    while j < n:
        m = 0
        while j < n and m < chunk:
            if alive[j] != 0:
                live[m] = j
                m += 1
            else:
                out[j] = z
            j += 1
        q = 0
        if nb < 2 * LANES:  # short rows: eight scalar chains at a time, the same sums
            while q < m:
                r0 = live[q]
                if q + 8 <= m:
                    r1, r2, r3, r4, r5, r6, r7 = (live[q + 1], live[q + 2], live[q + 3], live[q + 4], live[q + 5],
                                                  live[q + 6], live[q + 7])
                    s0, s1, s2, s3, s4, s5, s6, s7 = z, z, z, z, z, z, z, z
                    for b in range(nb):
                        s0 += dy[r0, b]
                        s1 += dy[r1, b]
                        s2 += dy[r2, b]
                        s3 += dy[r3, b]
                        s4 += dy[r4, b]
                        s5 += dy[r5, b]
                        s6 += dy[r6, b]
                        s7 += dy[r7, b]
                    out[r0], out[r1], out[r2], out[r3] = s0, s1, s2, s3
                    out[r4], out[r5], out[r6], out[r7] = s4, s5, s6, s7
                    q += 8
                else:
                    s0 = z
                    for b in range(nb):
                        s0 += dy[r0, b]
                    out[r0] = s0
                    q += 1
        else:
            while q < m:
                # A short last group repeats its last neuron; each sum is written once.
                r = (live[q], live[min(q + 1, m - 1)], live[min(q + 2, m - 1)], live[min(q + 3, m - 1)],
                     live[min(q + 4, m - 1)], live[min(q + 5, m - 1)], live[min(q + 6, m - 1)], live[min(q + 7, m - 1)],
                     live[min(q + 8, m - 1)], live[min(q + 9, m - 1)], live[min(q + 10, m - 1)],
                     live[min(q + 11, m - 1)], live[min(q + 12, m - 1)], live[min(q + 13, m - 1)],
                     live[min(q + 14, m - 1)], live[min(q + 15, m - 1)])
                sums = row_sums16(dy, (r[0] * sy, r[1] * sy, r[2] * sy, r[3] * sy, r[4] * sy, r[5] * sy, r[6] * sy,
                                       r[7] * sy, r[8] * sy, r[9] * sy, r[10] * sy, r[11] * sy, r[12] * sy, r[13] * sy,
                                       r[14] * sy, r[15] * sy), nb)
                for u in range(min(LANES, m - q)):
                    out[r[u]] = sums[u]
                q += LANES


@njit(cache=True)
def nesterov_step(values, velocity, grad, lr, momentum, l2):
    """SGD with Nesterov momentum and L2 on existing weights (Keras' formulation).

    g = grad + l2 * w;  v <- momentum * v - lr * g;  w <- w + momentum * v - lr * g.
    """
    for p in range(values.shape[0]):
        g = grad[p] + l2 * values[p]
        v = momentum * velocity[p] - lr * g
        velocity[p] = v
        values[p] += momentum * v - lr * g


@njit(cache=True)
def relu_alive(h, alive, nb=-1):
    """ReLU in place (negatives become +0; -0 and NaN stay as they are), and alive[j] = 1 where some
    h[j, b] is not zero after it, else 0: a neuron dead for this batch, whose connections the next
    layer's forward and this layer's backward skip. NaN counts as alive, so it still reaches the
    loss and a diverging run is still caught. A select and an integer OR, no branch: SIMD. ``nb``: the
    samples, h's first nb columns; -1 for all."""
    n = h.shape[0]
    nb = h.shape[1] if nb < 0 else nb
    one = _opaque_one(nb)
    for j in range(n):
        a = 0
        for b in range(nb):
            v = h[j, b]
            v = np.float32(0.0) if v < 0.0 else v * one
            h[j, b] = v
            a |= v != 0.0
        alive[j] = a


@njit(cache=True, nogil=True)
def softmax_inplace(z, nb=-1):
    """Column-wise softmax of logits z (n_classes, B), in place, with the max subtracted first; of
    the first nb columns (-1: all)."""
    c = z.shape[0]
    nb = z.shape[1] if nb < 0 else nb
    for b in range(nb):
        m = z[0, b]
        for k in range(1, c):
            if z[k, b] > m:
                m = z[k, b]
        s = np.float32(0.0)
        for k in range(c):
            e = np.exp(z[k, b] - m)
            z[k, b] = e
            s += e
        for k in range(c):
            z[k, b] /= s


@njit(cache=True)
def softmax_xent_backward(p, y, scale_by, nb=-1):
    """Turn probabilities p (n_classes, B) into dL/dlogits = (p - onehot(y)) * scale_by, in place.

    Returns (sum over the batch of -log p[y], number of argmax hits). ``scale_by`` is 1/B for
    the mean loss over the batch. Of the first nb columns (-1: all).
    """
    c = p.shape[0]
    nb = p.shape[1] if nb < 0 else nb
    loss = 0.0
    correct = 0
    for b in range(nb):
        t = y[b]
        best = 0
        for k in range(1, c):
            if p[k, b] > p[best, b]:
                best = k
        if best == t:
            correct += 1
        loss -= np.log(max(p[t, b], np.float32(1e-30)))
        for k in range(c):
            p[k, b] *= scale_by
        p[t, b] -= scale_by
    return loss, correct


# Below this many multiply-adds (connections x batch) a layer's forward and backward run serially.
# Every parallel region waits for its slowest thread, and on a machine shared with other jobs a
# preempted worker costs a scheduler slice (milliseconds) per region: with the old threshold of 2**16
# the MNIST network at epsilon 1 (about 0.2 million multiply-adds per layer and batch, 0.03 ms of
# work) took 26 s per epoch instead of 0.5 at a load average of 6 on 2 vCPUs. Layers of a million
# multiply-adds and more (epsilon 20: 3.5-4 million) still gain from a second thread.
PARALLEL_MIN_WORK = 1 << 20


# Smallest batch whose serial forward pass runs by output rows from the CSC copy (``forward_cols``,
# which holds an output row in registers and applies the ReLU and flags dead neurons there) rather than
# by input rows (``sparse_forward``, then ``relu_alive``). MNIST network, a full epoch of batches,
# 1 thread, against by input rows (Intel Xeon, one-off script, fastest of 3-5, the same bits):
# batch 100 1.11x (epsilon 1) and 1.21x (epsilon 20); batch 32 1.03x and 1.10-1.15x; batch 16
# 0.98x and 0.97-1.02x; batch 2 0.79x, where the rows' scalar loop of two samples wins.
BY_COLUMNS_MIN_BATCH = 2 * LANES


@njit(cache=True)
def row_stride(nb):
    """``packed.row_stride``, compiled: the row stride of a training batch of nb samples, whole 64-byte
    lines from 64 samples on (that comment says why). Written twice because kernels.py imports nothing
    of the package (tools load it alone) and packed.py nothing of numba (the planner and exporter);
    a test holds the two to the same values."""
    return nb if nb < 64 else (nb + LANES - 1) // LANES * LANES


# --- a whole network, packed ------------------------------------------------------------------------

@njit(cache=True)
def _level(buf, off, n, nb):
    return buf[off * nb: (off + n) * nb].reshape((n, nb))


@njit(cache=True)
def forward_all(X, rows, shift, scale, sizes, ptr_off, nz_off, unit_off,
                indptr, indices, values, bias, colptr, rowidx, perm, act):
    """Inference forward pass of a batch: fills every level's activations in ``act``.

    act is a flat float32 buffer of at least sum(sizes) * len(rows); level l occupies
    ``sum(sizes[:l]) * B`` onwards as a (sizes[l], B) block. Hidden levels hold ReLU outputs,
    the last level holds softmax probabilities. Returns nothing; read levels back with
    ``level_view``.

    ``colptr``, ``rowidx``, ``perm``: a CSC copy of the current pattern in ``train_batches``'
    layout, or empty arrays. A layer that has one runs ``forward_cols`` (serial; the same bits as
    ``sparse_forward``) for batches of 32 or more (``BY_COLUMNS_MIN_BATCH``), which also flags the
    dead neurons: a ReLU pass saved. MNIST network, trained 200 batches, Intel Xeon (a one-off
    script, fastest of 15): epsilon 1, 1000 samples, 1.97 against 2.77 ms by rows; epsilon 20, 14.2
    against 20.6.
    """
    nb = rows.shape[0]
    n_layers = sizes.shape[0] - 1
    off = 0
    width = 0  # a loop, not sizes.max(): its empty-array error would cost compile memory
    for n in sizes:
        width = max(width, n)
    alive = np.ones(width, dtype=np.uint8)  # dead neurons of the level feeding the next layer
    have_csc = colptr.shape[0] > 0
    a = _level(act, 0, sizes[0], nb)
    gather_scaled(X, rows, shift, scale, a, np.empty((GATHER_TILE, sizes[0]), np.float32))
    for l in range(n_layers):
        nxt = off + sizes[l]
        out = _level(act, nxt, sizes[l + 1], nb)
        p0, p1, c0 = nz_off[l], nz_off[l + 1], unit_off[l] + l
        hidden = l < n_layers - 1
        if have_csc and colptr[c0 + sizes[l + 1]] > 0 and nb >= BY_COLUMNS_MIN_BATCH:
            forward_cols(colptr[c0:c0 + sizes[l + 1] + 1], rowidx[p0:p1], perm[p0:p1], values[p0:p1],
                         bias[unit_off[l]:unit_off[l + 1]], a, out, np.int64(0), sizes[l + 1], hidden,
                         alive[:sizes[l + 1]] if hidden else alive[:0], nb)
        else:
            # nb passed, though the rows are packed here: the calls of train_batches pass it, and
            # one compiled copy of each kernel serves both (each copy costs compile memory)
            sparse_forward(indptr[ptr_off[l]:ptr_off[l + 1]], indices[p0:p1], values[p0:p1],
                           bias[unit_off[l]:unit_off[l + 1]], a, out, alive, nb)
            if hidden:
                relu_alive(out, alive, nb)
        if not hidden:
            softmax_inplace(out, nb)
        a = out
        off = nxt


@njit(cache=True)
def train_batches(X, y, order, batch_size, shift, scale, sizes, ptr_off, nz_off, unit_off,
                  indptr, indices, values, bias, velocity, bias_velocity,
                  act, delta_a, delta_b, grad, bias_grad, colptr, rowidx, perm, lr, momentum, l2, threads):
    """One pass of minibatch SGD over ``order`` (sample rows, already shuffled), in place.

    Per batch: forward (ReLU hidden, softmax output), mean cross-entropy, backward on existing
    connections only (``backward_rows``, which skips the connections of this batch's dead
    neurons), Nesterov step per layer right after its gradients (the input gradient of a layer
    is computed before its weights change). Buffers are preallocated by the caller:
    act >= sum(sizes)*S, delta_a/delta_b >= max(sizes)*S with S = row_stride(batch_size), best
    aligned to 64 bytes (``packed.aligned_empty``), grad >= max layer nnz, bias_grad >=
    max(sizes[1:]). The last batch may be partial. A batch's rows lie ``row_stride(nb)`` floats
    apart; the kernels read and write the first nb of each.
    Returns (sum of sample losses, number of correct training predictions).

    The forward pass of a layer that has a CSC copy of its pattern runs by output rows from it
    (``forward_cols``, ReLU and dead-neuron flags fused; from ``BY_COLUMNS_MIN_BATCH`` samples):
    ``colptr`` (int64, per layer ``n_out + 1`` entries from ``unit_off[l] + l``), ``rowidx`` and
    ``perm`` (int32, at ``nz_off[l]``), as ``csc_from_csr`` writes them for the current topology;
    with empty CSC arrays, by input rows (``sparse_forward``). With ``threads`` > 1, large layers
    run in parallel with results identical to serial: the backward pass split by input rows
    (``sparse_backward_threads``), the forward pass by output rows (``sparse_forward_threads``,
    which needs the CSC copy).

    Long on purpose: forward, loss, backward and the update of every layer run inside one compiled
    loop over the batches, so no Python (and no allocation) happens per batch; each phase is a
    call to one of the kernels above.
    """
    n = order.shape[0]
    n_layers = sizes.shape[0] - 1
    total_loss = 0.0
    total_correct = 0
    level_off = np.zeros(n_layers + 2, dtype=np.int64)
    for l in range(n_layers + 1):
        level_off[l + 1] = level_off[l] + sizes[l]
    # Per batch, which neurons of each level are alive (``relu_alive``); inputs and outputs always
    # count as alive. The backward pass skips the connections of dead ones (``backward_rows``).
    alive = np.ones(level_off[n_layers + 1], dtype=np.uint8)
    live = np.empty(LIVE_CHUNK, dtype=np.int64)  # bias_gradient's list of live neurons
    have_csc = colptr.shape[0] > 0
    tile = np.empty((GATHER_TILE, sizes[0]), np.float32)  # gather_scaled's scratch
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows = order[start:stop]
        nb = stop - start
        s = row_stride(nb)
        a = _level(act, 0, sizes[0], s)
        gather_scaled(X, rows, shift, scale, a, tile)
        for l in range(n_layers):
            p0 = nz_off[l]
            p1 = nz_off[l + 1]
            out = _level(act, level_off[l + 1], sizes[l + 1], s)
            hidden = l < n_layers - 1
            c0 = unit_off[l] + l
            alive_out = alive[level_off[l + 1]:level_off[l + 2]] if hidden else alive[:0]
            by_cols = have_csc and colptr[c0 + sizes[l + 1]] > 0
            if by_cols and threads > 1 and sizes[l + 1] > 1 and (p1 - p0) * nb >= PARALLEL_MIN_WORK:
                sparse_forward_threads(colptr[c0:c0 + sizes[l + 1] + 1], rowidx[p0:p1], perm[p0:p1],
                                       values[p0:p1], bias[unit_off[l]:unit_off[l + 1]], a, out, hidden, alive_out,
                                       min(threads, sizes[l + 1]), nb)
            elif by_cols and nb >= BY_COLUMNS_MIN_BATCH:
                # the first row as an int64 value, not the literal 0 (see backward_rows below): a copy of
                # forward_cols specialised to the constant took 8-10 MiB more compile peak (measured)
                forward_cols(colptr[c0:c0 + sizes[l + 1] + 1], rowidx[p0:p1], perm[p0:p1], values[p0:p1],
                             bias[unit_off[l]:unit_off[l + 1]], a, out, np.int64(0), sizes[l + 1], hidden,
                             alive_out, nb)
            else:
                sparse_forward(indptr[ptr_off[l]:ptr_off[l + 1]], indices[p0:p1], values[p0:p1],
                               bias[unit_off[l]:unit_off[l + 1]], a, out, alive[level_off[l]:level_off[l + 1]], nb)
                if hidden:
                    relu_alive(out, alive_out, nb)
            if not hidden:
                softmax_inplace(out, nb)
            a = out
        c = sizes[n_layers]
        dy = _level(delta_a, 0, c, s)
        probs = _level(act, level_off[n_layers], c, s)
        # An element loop, not ``dy[:, :] = probs``: numba's slice assignment compiles a formatted
        # shape-mismatch message, about 28 MiB of compile peak (measured), too much for the Zero 2 W.
        for k in range(c):
            for b in range(nb):
                dy[k, b] = probs[k, b]
        loss, correct = softmax_xent_backward(dy, y[rows], np.float32(1.0 / nb), nb)
        total_loss += loss
        total_correct += correct
        use_a = True
        for l in range(n_layers - 1, -1, -1):
            n_in = sizes[l]
            x = _level(act, level_off[l], n_in, s)
            if use_a:
                dy = _level(delta_a, 0, sizes[l + 1], s)
                dx = _level(delta_b, 0, n_in, s)
            else:
                dy = _level(delta_b, 0, sizes[l + 1], s)
                dx = _level(delta_a, 0, n_in, s)
            p0 = nz_off[l]
            p1 = nz_off[l + 1]
            lp = indptr[ptr_off[l]:ptr_off[l + 1]]
            g = grad[:p1 - p0]
            # dx of a hidden level comes out with the ReLU mask of x applied (l > 0).
            alive_in = alive[level_off[l]:level_off[l + 1]]
            alive_out = alive[level_off[l + 1]:level_off[l + 2]]
            if threads > 1 and n_in > 1 and (p1 - p0) * nb >= PARALLEL_MIN_WORK:
                sparse_backward_threads(lp, indices[p0:p1], values[p0:p1], x, dy, dx, g, alive_in, alive_out,
                                        l > 0, min(threads, n_in), nb)
            else:
                # first row as an int64 value, not the literal 0: numba would compile a second copy
                # of the kernels (and their callees) specialised to the constant, about 8 MiB of compile peak
                first = np.int64(0)
                backward_rows(lp, indices[p0:p1], values[p0:p1], x, dy, dx, g, first, n_in, alive_in, alive_out,
                              l > 0, wide_rows(lp), nb)
            nesterov_step(values[p0:p1], velocity[p0:p1], g, lr, momentum, l2)
            u0 = unit_off[l]
            u1 = unit_off[l + 1]
            bg = bias_grad[:u1 - u0]
            bias_gradient(dy, bg, alive_out, live, nb)
            nesterov_step(bias[u0:u1], bias_velocity[u0:u1], bg, lr, momentum, np.float32(0.0))
            use_a = not use_a
    return total_loss, total_correct


@njit(cache=True)
def csc_all(sizes, ptr_off, nz_off, unit_off, indptr, indices, colptr, rowidx, perm, max_nnz):
    """``csc_from_csr`` for every layer of a packed network with at most ``max_nnz`` connections, into
    the layout ``train_batches`` reads; a larger layer's column pointers are all 0, which tells
    ``train_batches`` to run its forward pass serially by rows (see ``packed.CSC_MAX_CONNECTIONS``)."""
    for l in range(sizes.shape[0] - 1):
        c0 = unit_off[l] + l
        if nz_off[l + 1] - nz_off[l] > max_nnz:
            for j in range(c0, c0 + sizes[l + 1] + 1):
                colptr[j] = 0
            continue
        csc_from_csr(indptr[ptr_off[l]:ptr_off[l + 1]], indices[nz_off[l]:nz_off[l + 1]],
                     colptr[c0:c0 + sizes[l + 1] + 1], rowidx[nz_off[l]:nz_off[l + 1]], perm[nz_off[l]:nz_off[l + 1]])


@njit(cache=True, nogil=True)
def predict_batches(X, rows, shift, scale, sizes, ptr_off, nz_off, unit_off,
                    indptr, indices, values, bias, colptr, rowidx, perm, batch_size, act, proba):
    """Class probabilities of the samples X[rows], written to proba (len(rows), n_classes), in batches.
    ``colptr``, ``rowidx``, ``perm``: a CSC copy of the pattern or empty arrays (``forward_all``).
    Without the GIL, so Python threads can each run it on their own rows (``train.Evaluator``)."""
    n = rows.shape[0]
    n_layers = sizes.shape[0] - 1
    c = sizes[n_layers]
    last = 0
    for l in range(n_layers):
        last += sizes[l]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        nb = stop - start
        forward_all(X, rows[start:stop], shift, scale, sizes, ptr_off, nz_off, unit_off,
                    indptr, indices, values, bias, colptr, rowidx, perm, act)
        p = _level(act, last, c, nb)
        for b in range(nb):
            for k in range(c):
                proba[start + b, k] = p[k, b]


# --- cosine similarity scoring (similarity.py) ------------------------------------------------------
#
# Every kernel is a module-level ``@njit(cache=True)`` function over flat arrays, with explicit loops:
# ``np.dot`` / ``@`` inside njit would need scipy. Kernels trust their inputs; ``similarity.py``
# validates at the public entry points. Each kernel has a numpy reference in
# ``tests/test_similarity.py``.
#
# The *canonical score* of a position (i, j) is the one number every path in ctre-edge ranks by::
#
#     dot   = sum_s float64(a_in[i, s]) * float64(a_out[j, s])     (in 8 lanes, see ``pair_dots8``)
#     score = float32(|dot| * inv_in[i] * inv_out[j])               (float64, left to right)
#
# with ``inv[i] = 1 / sqrt(sum_s float64(a[i, s])**2)`` (the same 8 lanes), and ``inv = 0`` where the
# norm is 0, so the score is 0 where a norm is 0 (docs/algorithm.md, "The topology update", step 2).
# A float32 x float32 product is exact in float64, so this value does not depend on FMA contraction
# and numpy reproduces it bit for bit with a loop over chunks of 8 samples; BLAS results, whose summation order
# changes with the matrix shape, are used only as a
# prefilter with a proven error bound (see ``scan_block``).

# Neuron kinds for the prefilter error bound (see ``neuron_kinds``).
KIND_ZERO = 0  # all-zero activation vector: every score is exactly 0
KIND_NONNEG = 1  # regular range, no negative value (ReLU, softmax): relative error bound
KIND_SIGNED = 2  # regular range, some negative value: absolute error bound
KIND_IRREGULAR = 3  # values outside [2**-30, 2**30] or norm > 2**30: always rescored exactly
KIND_WIDE = 4  # as KIND_NONNEG, but the least nonzero value in [2**-96, 2**-30) (softmax): see neuron_kinds

RANGE_LO = 2.0**-30
RANGE_HI = 2.0**30
WIDE_LO = 2.0**-96  # RANGE_LO * WIDE_LO = 2**-126, float32's least normal number
# Where a neuron is KIND_WIDE, the scaling of a prefilter score (``_row_bounds``) may underflow
# float32 by less than 2**-119 in all; this covers it.
WIDE_SLACK = 2.0**-100


@njit(cache=True, nogil=True)
def inverse_norms(a, rows, out):
    """Inverse Euclidean norms of selected neurons, in float64.

    ``out[t] = 1 / sqrt(sum_s float64(a[rows[t], s])**2)``, the sum in ``pair_dots8``'s lanes; 0
    where the norm is 0 (the zero-norm rule), NaN where the norm is not finite (an Inf or NaN
    activation).

    Parameters: ``a`` float32 (n, S) C-contiguous; ``rows`` int64 (m,); ``out`` float64 (m,),
    written.
    """
    n_samples = a.shape[1]
    m = rows.shape[0]
    t0 = 0
    while t0 < m:
        n = min(8, m - t0)  # a short last group repeats its last row
        offs = (rows[t0] * n_samples, rows[t0 + min(1, n - 1)] * n_samples, rows[t0 + min(2, n - 1)] * n_samples,
                rows[t0 + min(3, n - 1)] * n_samples, rows[t0 + min(4, n - 1)] * n_samples,
                rows[t0 + min(5, n - 1)] * n_samples, rows[t0 + min(6, n - 1)] * n_samples,
                rows[t0 + min(7, n - 1)] * n_samples)
        sums = pair_dots8(a, offs, a, offs, n_samples)
        for u in range(n):
            acc = sums[u]
            if acc == 0.0:
                out[t0 + u] = 0.0
            elif np.isfinite(acc):
                out[t0 + u] = 1.0 / np.sqrt(acc)
            else:
                out[t0 + u] = np.nan
        t0 += n


@njit(cache=True, nogil=True)
def neuron_kinds(a, inv, out):
    """Classify each neuron for the BLAS prefilter bound (``KIND_*`` constants), as int8.

    ``out[i]`` is KIND_ZERO where ``inv[i] == 0``; else KIND_IRREGULAR if ``1/inv[i] > 2**30`` or a
    nonzero ``|a[i, s]|`` lies outside [2**-30, 2**30] (float32 products could underflow or
    overflow); else KIND_NONNEG if no value is negative; else KIND_SIGNED. Except that a neuron
    with no negative value, whose nonzero values lie in [2**-96, 2**30] and the largest in
    [2**-30, 2**30], is KIND_WIDE, not KIND_IRREGULAR: a softmax output that is near 0 on some
    samples. Its products with a neuron of the regular range are float32 normal numbers, so the
    prefilter's bounds hold for such a pair (with ``WIDE_SLACK`` where the scaling underflows),
    and only a pair of two KIND_WIDE neurons is always rescored.

    Parameters: ``a`` float32 (n, S); ``inv`` float64 (n,) from ``inverse_norms``; ``out`` int8 (n,).
    """
    # Branch-free min/max reductions: an early exit on the first odd value was 10x slower. Over the
    # bits as int32: for finite floats |v| orders as its bits with the sign cleared, and integer
    # reductions vectorise where float ones (NaN rules) do not. Inputs are finite: inv is not NaN.
    # Every step cast back to int32 (numba widens int32 arithmetic to int64) and the sign as a
    # minimum rather than a boolean OR: vectorised on 32-bit lanes, 0.18 against 0.44 ms for 1000 x
    # 1000 activations (a one-off script, Intel Xeon), a third of the activation sample's norms.
    big = np.int32(0x7FFFFFFF)
    sign = np.int32(-0x80000000)  # the bits of -0.0
    bits = a.view(np.int32)
    lo_bits = np.int32(97 << 23)  # float32 2**-30 (RANGE_LO): exponent 127 - 30, mantissa 0
    wide_bits = np.int32(31 << 23)  # float32 2**-96 (WIDE_LO)
    hi_bits = np.int32(157 << 23)  # float32 2**30 (RANGE_HI)
    for i in range(a.shape[0]):
        if inv[i] == 0.0:
            out[i] = KIND_ZERO
            continue
        if inv[i] < 1.0 / RANGE_HI:
            out[i] = KIND_IRREGULAR
            continue
        low, high, least = big, np.int32(0), np.int32(0)
        for s in range(a.shape[1]):
            v = bits[i, s]
            m = np.int32(v & big)
            high = np.int32(max(high, m))
            low = np.int32(min(low, m if m != 0 else big))
            least = np.int32(min(least, v if v != sign else np.int32(0)))  # negative, -0.0 aside
        if high > hi_bits:
            out[i] = KIND_IRREGULAR
        elif low < lo_bits:
            out[i] = KIND_WIDE if low >= wide_bits and high >= lo_bits and least >= 0 else KIND_IRREGULAR
        elif least < 0:
            out[i] = KIND_SIGNED
        else:
            out[i] = KIND_NONNEG


@njit(cache=True)
def _scaled_score(dot, inv_i, inv_j):
    # The last step of the canonical score: float32(|dot| * inv_i * inv_j), 0 where a norm is 0.
    if inv_i == 0.0 or inv_j == 0.0:
        return np.float32(0.0)
    return np.float32(abs(dot) * inv_i * inv_j)


@njit(cache=True)
def canonical_score(a_in, a_out, inv_in, inv_out, i, j):
    """Canonical |cosine| of one position (see above): float32, 0 where a norm is 0.

    Parameters: ``a_in`` float32 (n_in, S), ``a_out`` float32 (n_out, S), both C-contiguous;
    ``inv_in``/``inv_out`` float64 from ``inverse_norms``; ``i``, ``j`` the input row and output column.
    """
    if inv_in[i] == 0.0 or inv_out[j] == 0.0:
        return np.float32(0.0)
    n_samples = a_in.shape[1]
    (dot,) = pair_dots1(a_in, (np.int64(i) * n_samples,), a_out, (np.int64(j) * n_samples,), n_samples)
    return _scaled_score(dot, inv_in[i], inv_out[j])


@njit(cache=True, nogil=True)
def canonical_scores(a_in, a_out, inv_in, inv_out, rows, cols, out):
    """``out[t] = canonical_score(..., rows[t], cols[t])`` for a list of positions; O(m * S).

    Parameters: as ``canonical_score``; ``rows`` int64 (m,), ``cols`` int32 or int64 (m,),
    ``out`` float32 (m,), written.
    """
    for t in range(rows.shape[0]):
        out[t] = canonical_score(a_in, a_out, inv_in, inv_out, rows[t], cols[t])


@njit(cache=True)
def canonical_scores_of_pairs(a_in, a_out, inv_in, inv_out, positions, n, out):
    """``out[t] = canonical_score(..., i, j)`` of the linear positions ``positions[t] = i * n_out + j``,
    for ``t < n <= 8``.

    Eight pairs in one ``pair_dots8``, the same bits as one at a time: the pairs may come from
    different rows, so no chain is spent on padding while candidates are sparse (about one per row
    at epsilon 1). ``positions`` int64 (8,); ``out`` float32 (8,), entries from ``n`` on are left
    undefined.
    """
    n_out, n_samples = a_out.shape[0], a_in.shape[1]
    p0, p1, p2, p3 = positions[0], positions[min(1, n - 1)], positions[min(2, n - 1)], positions[min(3, n - 1)]
    p4, p5, p6, p7 = positions[min(4, n - 1)], positions[min(5, n - 1)], positions[min(6, n - 1)], \
        positions[min(7, n - 1)]
    rows = (p0 // n_out * n_samples, p1 // n_out * n_samples, p2 // n_out * n_samples, p3 // n_out * n_samples,
            p4 // n_out * n_samples, p5 // n_out * n_samples, p6 // n_out * n_samples, p7 // n_out * n_samples)
    cols = (p0 % n_out * n_samples, p1 % n_out * n_samples, p2 % n_out * n_samples, p3 % n_out * n_samples,
            p4 % n_out * n_samples, p5 % n_out * n_samples, p6 % n_out * n_samples, p7 % n_out * n_samples)
    sums = pair_dots8(a_in, rows, a_out, cols, n_samples)
    for t in range(n):
        out[t] = _scaled_score(sums[t], inv_in[positions[t] // n_out], inv_out[positions[t] % n_out])


@njit(cache=True, nogil=True)
def keep_largest(values, n, k):
    """Reorder ``values[:n]`` so that ``values[:k]`` are its k largest; return the k-th largest.

    ``values`` float64 without NaN, ``1 <= k <= n``. A quickselect (median-of-three pivot, Hoare
    partition), O(n) on average: pass 1 of ``scan_block`` calls it on a buffer of 2k lower bounds
    each time the buffer fills, instead of sifting every admitted bound through a heap.
    """
    target = k - 1
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = values[lo], values[(lo + hi) // 2], values[hi]
        pivot = max(min(x, y), min(max(x, y), z))  # median of the three
        i, j = lo, hi
        while i <= j:  # descending: values >= pivot end up left, <= pivot right
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break  # values[j+1:i] all equal the pivot, and target lies among them
    return values[target]


@njit(cache=True)
def _worse(s1, p1, s2, p2):
    # Rank order is score descending, then linear position ascending.
    return s1 < s2 or (s1 == s2 and p1 > p2)


@njit(cache=True)
def _sift_down(scores, positions, n):
    # Restore the heap order of the first n entries after the root was replaced.
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _worse(scores[c + 1], positions[c + 1], scores[c], positions[c]):
            c += 1
        if not _worse(scores[c], positions[c], scores[i], positions[i]):
            break
        scores[i], scores[c] = scores[c], scores[i]
        positions[i], positions[c] = positions[c], positions[i]
        i = c


@njit(cache=True)
def topk_heap_push(scores, positions, n, score, pos):
    """Offer (score, pos) to a bounded heap of the k best by (score desc, pos asc); return new size.

    ``scores`` float32 (k,) and ``positions`` int64 (k,) are parallel arrays whose first ``n``
    entries form a heap with the *worst* entry at the root, so the root is the admission test.
    """
    k = scores.shape[0]
    if n < k:
        i = n
        scores[i] = score
        positions[i] = pos
        while i > 0:
            parent = (i - 1) // 2
            if not _worse(scores[i], positions[i], scores[parent], positions[parent]):
                break
            scores[parent], scores[i] = scores[i], scores[parent]
            positions[parent], positions[i] = positions[i], positions[parent]
            i = parent
        return n + 1
    if k == 0 or not _worse(scores[0], positions[0], score, pos):
        return n
    scores[0] = score
    positions[0] = pos
    _sift_down(scores, positions, n)
    return n


@njit(cache=True, nogil=True)
def topk_heap_sort(scores, positions):
    """Sort a full heap of ``topk_heap_push`` in place into rank order (score descending, then
    position ascending): each step moves the worst entry, the root, behind the shrinking heap.
    O(k log k) and no allocation, where ``np.lexsort`` would sort both arrays again."""
    n = scores.shape[0]
    while n > 1:
        n -= 1
        scores[0], scores[n] = scores[n], scores[0]
        positions[0], positions[n] = positions[n], positions[0]
        _sift_down(scores, positions, n)


@njit(cache=True, nogil=True)
def merge_ranked(scores_a, positions_a, scores_b, positions_b, out_scores, out_positions):
    """The first ``len(out_scores)`` entries of two lists in rank order (score descending, then
    position ascending), merged into ``out_*`` in rank order: the top-k of a union from the top-k of
    its parts, as ``similarity`` combines the scoring threads' heaps. Positions are distinct."""
    a = 0
    b = 0
    for t in range(out_scores.shape[0]):
        if b == scores_b.shape[0] or (a < scores_a.shape[0] and
                                      _worse(scores_b[b], positions_b[b], scores_a[a], positions_a[a])):
            out_scores[t], out_positions[t] = scores_a[a], positions_a[a]
            a += 1
        else:
            out_scores[t], out_positions[t] = scores_b[b], positions_b[b]
            b += 1


@njit(cache=True)
def _score_and_offer(a_in, a_out, inv_in, inv_out, positions, n, got, best_scores, best_positions, n_best):
    # Canonical scores of positions[:n], offered to the exact heap in that (position) order; returns its size.
    canonical_scores_of_pairs(a_in, a_out, inv_in, inv_out, positions, n, got)
    for t in range(n):
        n_best = topk_heap_push(best_scores, best_positions, n_best, got[t], positions[t])
    return n_best


@njit(cache=True)
def _admit_lower(lim, bound, lower, n_lower, k):
    """Pass 1's step for one row, for both prefilters: append the row's lower bounds ``lim`` above
    ``bound`` to ``lower[:n_lower]``, first cutting ``lower`` back to its k largest (which raises
    the bound) where it holds more than 2k; returns the new (bound, n_lower).

    Counted first (a vectorised loop), then appended without a branch: while the bound is still
    rising, admissions are too frequent and too random for a branch per entry, which cost about 2
    ns an entry (1000 x 1000 at k = 8000, a one-off script). The append writes every entry of the
    row and keeps the admitted ones, so the buffer holds 2k + n_out.
    """
    c = 0
    for j in range(lim.shape[0]):
        c += lim[j] > bound
    if c == 0:
        return bound, n_lower
    if n_lower > 2 * k:
        bound = keep_largest(lower, n_lower, k)
        n_lower = k
    for j in range(lim.shape[0]):
        v = lim[j]
        lower[n_lower] = v
        n_lower += v > bound
    return bound, n_lower


@njit(cache=True)
def _offer_row(lim, i, bound, worst, cand, got, n_cand, n_best, n_scored, a_in, a_out, inv_in, inv_out,
               best_scores, best_positions):
    """Pass 2's step for row i, for both prefilters: queue each position whose upper bound ``lim[j]``
    reaches ``bound`` and beats the heap's ``worst``, rescoring and offering them eight at a time
    (``_score_and_offer``); returns the new (n_cand, n_best, n_scored, worst)."""
    n_out = lim.shape[0]
    for j in range(n_out):
        high = lim[j]
        if high < bound or high <= worst:
            continue
        cand[n_cand] = i * n_out + j
        n_cand += 1
        if n_cand == 8:
            n_best = _score_and_offer(a_in, a_out, inv_in, inv_out, cand, n_cand, got,
                                      best_scores, best_positions, n_best)
            n_scored += n_cand
            n_cand = 0
            if n_best == best_scores.shape[0]:
                worst = best_scores[0]
    return n_cand, n_best, n_scored, worst


@njit(cache=True)
def _row_bounds(dots_row, i, indptr, indices, row_of, col_slot, v_in, kind_in, v_out, kind_out, rel, abs_err, sign,
                out):
    """``out[j] = approx + sign * margin`` for row ``i`` of the prefilter (see ``scan_block``).

    ``sign`` -1 gives the lower bounds of pass 1 and +1 the upper bounds of pass 2. Pairs with a
    KIND_IRREGULAR neuron, or of two KIND_WIDE ones, get -inf (pass 1: no lower bound) or +inf
    (pass 2: always rescored); kept positions get -inf (never a candidate). The loop over the row
    is written with selects only, so it vectorises. Row i is row ``row_of[i]`` of the CSR, whose
    column c is column ``col_slot[c]`` here, or none if that is past the row (see ``scan_block``).
    """
    odd = -np.inf if sign < 0.0 else np.inf
    if kind_in[i] == KIND_IRREGULAR:
        for j in range(out.shape[0]):  # a loop, not out[:] = odd: numba's slice assignment costs compile memory
            out[j] = odd
    else:
        v_i = v_in[i]
        zero_i = kind_in[i] == KIND_ZERO
        wide_i = kind_in[i] == KIND_WIDE
        nonneg_i = kind_in[i] == KIND_NONNEG or wide_i
        for j in range(dots_row.shape[0]):
            approx = abs(dots_row[j]) * v_i * v_out[j]
            kj = kind_out[j]
            wide = wide_i or kj == KIND_WIDE
            margin = abs_err  # at least WIDE_SLACK
            if nonneg_i and (kj == KIND_NONNEG or kj == KIND_WIDE):
                margin = rel * approx + (WIDE_SLACK if wide else 0.0)
            if zero_i or kj == KIND_ZERO:
                margin = 0.0
            value = np.float64(approx) + sign * margin
            out[j] = odd if kj == KIND_IRREGULAR or (wide_i and kj == KIND_WIDE) else value
    n = out.shape[0]
    for p in range(indptr[row_of[i]], indptr[row_of[i] + 1]):
        c = col_slot[indices[p]]
        if c < n:
            out[c] = -np.inf


@njit(cache=True, nogil=True)
def scan_block(
    dots,
    row0,
    indptr,
    indices,
    row_of,
    col_slot,
    v_in,
    v_out,
    kind_in,
    kind_out,
    rel,
    abs_err,
    a_in,
    a_out,
    inv_in,
    inv_out,
    lower,
    best_scores,
    best_positions,
    state,
):
    """Fold one block of rows into the running exact top-k (positions not kept only).

    ``dots`` float32 (r, n_out) holds the BLAS products ``a_in[row0:row0+r] @ a_out.T``. The
    prefilter score is ``approx = float32(float32(|dots[r, j]| * v_in[i]) * v_out[j])`` with
    ``v = float32(inv)``; it lies within ``margin`` of the canonical score: ``rel * approx`` for two
    KIND_NONNEG neurons (no cancellation, so the float32 dot error is relative; ``+ WIDE_SLACK`` where
    one is KIND_WIDE), ``abs_err`` if one is KIND_SIGNED, 0 if one is KIND_ZERO (both scores are
    exactly 0), unbounded if one is KIND_IRREGULAR or both are KIND_WIDE. ``similarity.py``
    derives ``rel`` and ``abs_err`` from the float32 error bound ``gamma_S = S u / (1 - S u)``.

    Pass 1 collects every lower bound ``approx - margin`` above the running bound into ``lower``
    (float64, size 2k + n_out; cut back to its k largest by ``keep_largest`` whenever it holds more
    than 2k before a row, which sets the running bound), and ends with R, the k-th largest lower
    bound so far: a lower bound of the final k-th canonical score. Pass 2 computes the canonical
    score of a position only if ``approx + margin >= R`` and, once the exact heap is full, only if
    ``approx + margin`` exceeds its worst score (blocks arrive in ascending position order, so an
    equal score loses the tie). The result is exactly the top-k by canonical score, whatever the
    BLAS summation order; ties go to the smaller linear position ``i * n_out + j``.

    Parameters: ``indptr`` int64 (n_in+1,) and ``indices`` int32 (nnz,) the kept positions (CSR,
    ascending in each row); ``row_of`` int64 and ``col_slot`` int64: where a problem holds only some
    neurons of the layer (its live ones, ``similarity.LiveLevel``), its row i is row ``row_of[i]``
    of the CSR and the CSR's column c is its column ``col_slot[c]``, or none if that is n_out or
    more (``np.arange`` for a whole layer; both ascending, so position order is kept); ``v_*``
    float32; ``kind_*`` int8; ``inv_*`` float64; ``best_scores``
    float32 (k,), ``best_positions`` int64 (k,); ``state`` int64 (3,): the fill of ``lower``, the heap's size and
    the running count of canonical scores computed, updated in place.

    The two passes are also kernels of their own (``scan_block_lower``, ``scan_block_rescore``):
    where the scoring threads each hold their share of a layer in one block, ``similarity`` runs
    pass 1 on all shares, takes R over all of them, and only then pass 2.
    """
    bound = scan_block_lower(dots, row0, indptr, indices, row_of, col_slot, v_in, v_out, kind_in, kind_out, rel,
                             abs_err, lower, best_scores.shape[0], state)
    scan_block_rescore(dots, row0, indptr, indices, row_of, col_slot, v_in, v_out, kind_in, kind_out, rel, abs_err,
                       a_in, a_out, inv_in, inv_out, bound, best_scores, best_positions, state)


@njit(cache=True, nogil=True)
def _count_reaching(dots_row, v_i, v_out, t32):
    # How many of a row's float32 prefilter scores (``approx``, computed as ``_row_bounds`` computes
    # it, so the same bits) are at least t32: a vectorised loop, about a tenth of the bounds' cost.
    # Where none is, and t32 is at most a pass's threshold, no entry of the row can pass it.
    c = 0
    for j in range(dots_row.shape[0]):
        c += abs(dots_row[j]) * v_i * v_out[j] >= t32
    return c


@njit(cache=True, nogil=True)
def scan_block_lower(dots, row0, indptr, indices, row_of, col_slot, v_in, v_out, kind_in, kind_out, rel, abs_err,
                     lower, k, state):
    """Pass 1 of ``scan_block``: fold the block's lower bounds into ``lower`` and ``state[0]``;
    returns R, the k-th largest lower bound so far (-inf while fewer than k)."""
    n_rows, n_out = dots.shape
    # Each pass first computes a whole row's bounds (``_row_bounds``: a branch-free loop that the
    # compiler vectorises, the same float32 and float64 operations per entry as one at a time, so
    # the same bits), and only then walks the row for the rare entries that pass.
    lim = np.empty(n_out, np.float64)
    n_lower = state[0]
    bound = lower[k - 1] if n_lower == k else -np.inf  # cut back to its k largest after the last block
    for r in range(n_rows):
        i = row0 + r
        # A lower bound is at most float64(approx) (or -inf), so a row whose every approx is below
        # the bound adds nothing: skipped before its bounds, once the bound is positive.
        # float32(bound * (1 - 2**-20)) is below the bound, whatever the rounding. (The skip saves
        # 0.1 ms a layer on MNIST's later layers; kept in its own function, shared with pass 2, it
        # leaves warmup's compile peak where it was, which the same loop written inline did not.)
        if bound > 0.0 and _count_reaching(dots[r], v_in[i], v_out, np.float32(bound * (1.0 - 2.0**-20))) == 0:
            continue
        _row_bounds(dots[r], i, indptr, indices, row_of, col_slot, v_in, kind_in, v_out, kind_out, rel, abs_err,
                    -1.0, lim)
        bound, n_lower = _admit_lower(lim, bound, lower, n_lower, k)
    if n_lower >= k:
        bound = keep_largest(lower, n_lower, k)
        n_lower = k
    state[0] = n_lower
    return bound


@njit(cache=True, nogil=True)
def scan_block_rescore(dots, row0, indptr, indices, row_of, col_slot, v_in, v_out, kind_in, kind_out, rel, abs_err,
                       a_in, a_out, inv_in, inv_out, bound, best_scores, best_positions, state):
    """Pass 2 of ``scan_block``: rescore canonically the block's positions whose upper bound reaches
    ``bound`` (a lower bound of the final k-th canonical score) and the heap's worst score, and offer
    them to the heap (``state[1]``, ``state[2]``)."""
    n_rows, n_out = dots.shape
    k = best_scores.shape[0]
    lim = np.empty(n_out, np.float64)
    n_best = state[1]
    n_scored = state[2]
    worst = best_scores[0] if n_best == k else -np.inf
    # Candidates are rescored eight at a time (``canonical_scores_of_pairs``) and offered in position
    # order, so the heap ends as if each had been scored on its own; a few more are scored, those
    # admitted against a worst score that is at most eight offers stale.
    cand = np.empty(8, np.int64)
    got = np.empty(8, np.float32)
    n_cand = 0
    # An upper bound is float64(approx) plus a margin of at most rel * approx + abs_err, rounded
    # once or twice, unless a neuron is KIND_IRREGULAR or both are KIND_WIDE (+inf). So where no
    # output neuron is KIND_IRREGULAR, a row not KIND_IRREGULAR (nor KIND_WIDE, if an output is)
    # whose every approx is below (bound - 2 abs_err) / (1 + 2 rel) has no candidate: the slack
    # (rel >= 2**-24, from the float32 error bound) dwarfs the float64 roundings. Such a row is
    # skipped before its bounds, found by a count in float32 (a loop the compiler vectorises, about
    # a tenth of the bounds' cost); a skip never changes which positions are rescored.
    low = (bound - 2.0 * abs_err) / (1.0 + 2.0 * rel)
    skips = low > 0.0
    wide_out = False
    for j in range(n_out):
        skips &= kind_out[j] != KIND_IRREGULAR
        wide_out |= kind_out[j] == KIND_WIDE
    low32 = np.float32(low * (1.0 - 2.0**-20))  # at most low: rounding moves it by at most 2**-24 of itself
    for r in range(n_rows):
        i = row0 + r
        if skips and kind_in[i] != KIND_IRREGULAR and not (wide_out and kind_in[i] == KIND_WIDE):
            if _count_reaching(dots[r], v_in[i], v_out, low32) == 0:
                continue
        _row_bounds(dots[r], i, indptr, indices, row_of, col_slot, v_in, kind_in, v_out, kind_out, rel, abs_err,
                    1.0, lim)
        n_cand, n_best, n_scored, worst = _offer_row(lim, i, bound, worst, cand, got, n_cand, n_best, n_scored,
                                                     a_in, a_out, inv_in, inv_out, best_scores, best_positions)
    if n_cand:
        n_best = _score_and_offer(a_in, a_out, inv_in, inv_out, cand, n_cand, got, best_scores, best_positions,
                                  n_best)
        n_scored += n_cand
    state[1] = n_best
    state[2] = n_scored


# --- the 8-bit prefilter: bounds from an exact integer product -------------------------------------
# Each neuron's activations are rounded to integer codes in [-127, 127] with its own scale,
# x = (r + e) / g (g = 127 / max|x|, |e| <= 1/2). An integer product of the codes (onnxruntime's
# MatMulInteger, ``similarity``: several times the float32 GEMM's rate where the CPU has 8-bit dot
# instructions) is exact, and the rest of <x, y> * g * g' = <r, r'> + <r, e'> + <e, r'> + <e, e'> is
# at most P Q' + Q P' + Q Q' in size (Cauchy-Schwarz; P = ||r||, Q >= ||e||). So every score
# lies within alpha alpha' (P Q' + Q P' + Q Q') of alpha alpha' |<r, r'>|, alpha = inv / g, whatever
# the neuron's range or sign; the canonical rescoring of every position that can reach the top-k
# then gives the same top-k as the float32 prefilter, bit for bit. Codes stay within 127 on both
# sides so that no pair of products overflows 16 bits (x86's vpmaddubsw saturates there), and
# S * 127 * 127 < 2**31 bounds the int32 sums (``packed.INT8_MAX_SAMPLES``).
Q8_TOP = 127
# The bounds are computed in float64: relative 2**-20 on either side covers their roundings, the
# canonical score's float32 rounding (2**-24) and inverse norms' float64 error; 2**-30 absolute
# covers the canonical float64 dot's rounding where values of both signs cancel (S 2**-53 <= 2**-36).
Q8_REL = 2.0**-20
Q8_ABS = 2.0**-30


@njit(cache=True, nogil=True)
def quantize_levels(a, inv, codes, stats):
    """Round each neuron (row of ``a``) to 8-bit codes and compute its bound numbers.

    ``a`` float32 (m, S); ``inv`` float64 (m,) its inverse norms (``inverse_norms``); ``codes``
    int8 (m, S), written (where no activation is negative, read as uint8 they are the same codes,
    as MatMulInteger's first operand takes them); ``stats`` float64 (4, m), written: alpha
    (``inv / g``), P (``||r||``), Q (an upper bound of ``||e||``) and 1 (0 for a neuron whose
    activations are all 0, which gets zero codes and stats). Returns a negative activation (as
    float64) if there is one (-0.0 aside), else 0.
    """
    m, n_samples = a.shape
    # Every reduction over integers, so that the loops over a row vectorise (float reductions do not
    # without fastmath: 2 ns a code).
    bits = a.view(np.int32)
    big = np.int32(0x7FFFFFFF)
    sign = np.int32(-0x80000000)  # the bits of -0.0
    top_bits = np.empty(1, np.int32)
    top_value = top_bits.view(np.float32)
    least = np.int32(0)
    for i in range(m):
        high = np.int32(0)
        for s in range(n_samples):  # |v| orders as its bits with the sign cleared (finite v)
            v = bits[i, s]
            high = np.int32(max(high, np.int32(v & big)))
            least = np.int32(min(least, v if v != sign else np.int32(0)))  # negative, -0.0 aside
        top_bits[0] = high
        top = np.float64(top_value[0])
        g = Q8_TOP / top if top > 0.0 else 0.0
        p2 = 0
        q2 = 0  # sum of ceil(|e| 2**20)**2: e**2 summed exactly, rounded up
        for s in range(n_samples):
            t = np.float64(a[i, s]) * g
            r = np.rint(t)
            code = np.int32(r)
            p2 += code * code
            e = np.int64(np.ceil(abs(t - r) * 1048576.0))
            q2 += e * e
            codes[i, s] = code
        if top > 0.0:
            stats[0, i] = inv[i] / g
            stats[1, i] = np.sqrt(np.float64(p2))
            # t is within 127 * 2**-53 of x g, so e within that of its true value: the second
            # term covers that error's norm over S samples, the first the roundings.
            stats[2, i] = np.sqrt(np.float64(q2)) * 2.0**-20 * (1.0 + 2.0**-40) + \
                np.sqrt(np.float64(n_samples)) * 2.0**-44
            stats[3, i] = 1.0
        else:
            stats[0, i] = 0.0
            stats[1, i] = 0.0
            stats[2, i] = 0.0
            stats[3, i] = 0.0
    top_bits[0] = least
    return np.float64(top_value[0]) if least < 0 else 0.0


@njit(cache=True)
def _row_bounds_q8(dots_row, i, indptr, indices, row_of, col_slot, stats_in, stats_out, sign, out):
    """``out[j]``: the lower (``sign`` -1) or upper (+1) bound of the canonical score of (i, j) from
    the integer product ``dots_row`` (see ``quantize_levels``); -inf where the position is kept. A
    branch-free loop, as ``_row_bounds``."""
    alpha_i, p_i, q_i, live_i = stats_in[0, i], stats_in[1, i], stats_in[2, i], stats_in[3, i]
    alpha, p, q, live = stats_out[0], stats_out[1], stats_out[2], stats_out[3]
    for j in range(dots_row.shape[0]):
        d = abs(np.float64(dots_row[j]))
        err = p_i * q[j] + q_i * (p[j] + q[j])
        scale = alpha_i * alpha[j]
        slack = Q8_ABS * live_i * live[j]
        if sign < 0.0:
            out[j] = max(0.0, scale * (d - err)) * (1.0 - Q8_REL) - slack
        else:
            out[j] = scale * (d + err) * (1.0 + Q8_REL) + slack
    n = out.shape[0]
    for p_ in range(indptr[row_of[i]], indptr[row_of[i] + 1]):
        c = col_slot[indices[p_]]
        if c < n:
            out[c] = -np.inf


@njit(cache=True, nogil=True)
def _count_q8_reaching(dots_row, alpha, t):
    # How many of a row's alpha_j |D_ij| are at least t: a vectorised loop, a fraction of the bounds'
    # cost, for the passes' row skips.
    c = 0
    for j in range(dots_row.shape[0]):
        c += alpha[j] * abs(np.float64(dots_row[j])) >= t
    return c


@njit(cache=True, nogil=True)
def scan_q8_lower(dots, row0, indptr, indices, row_of, col_slot, stats_in, stats_out, lower, k, state):
    """Pass 1 of the 8-bit prefilter, as ``scan_block_lower`` over the int32 products ``dots`` of
    rows ``row0:`` (``quantize_levels``' stats of each side): returns R, the k-th largest lower
    bound so far."""
    n_rows, n_out = dots.shape
    lim = np.empty(n_out, np.float64)
    n_lower = state[0]
    bound = lower[k - 1] if n_lower == k else -np.inf
    alpha = stats_out[0]
    for r in range(n_rows):
        # A lower bound is below alpha_i alpha_j |D_ij| by the factor 1 - Q8_REL at least, which
        # dwarfs the roundings: once the bound is positive, a row whose every alpha_j |D_ij| is at
        # most bound / alpha_i adds nothing, and is skipped before its bounds.
        alpha_i = stats_in[0, row0 + r]
        if bound > 0.0 and (alpha_i == 0.0 or _count_q8_reaching(dots[r], alpha, bound / alpha_i * (1.0 + 2.0**-40))
                            == 0):
            continue
        _row_bounds_q8(dots[r], row0 + r, indptr, indices, row_of, col_slot, stats_in, stats_out, -1.0, lim)
        bound, n_lower = _admit_lower(lim, bound, lower, n_lower, k)
    if n_lower >= k:
        bound = keep_largest(lower, n_lower, k)
        n_lower = k
    state[0] = n_lower
    return bound


@njit(cache=True, nogil=True)
def scan_q8_rescore(dots, row0, indptr, indices, row_of, col_slot, stats_in, stats_out, a_in, a_out, inv_in,
                    inv_out, bound, best_scores, best_positions, state):
    """Pass 2 of the 8-bit prefilter, as ``scan_block_rescore``: the canonical scores of the
    positions whose upper bound reaches ``bound`` and the heap's worst score, offered to the heap."""
    n_rows, n_out = dots.shape
    k = best_scores.shape[0]
    lim = np.empty(n_out, np.float64)
    n_best = state[1]
    n_scored = state[2]
    worst = best_scores[0] if n_best == k else -np.inf
    cand = np.empty(8, np.int64)
    got = np.empty(8, np.float32)
    n_cand = 0
    # An upper bound is at most alpha_i (alpha_j |D_ij| + E_i) (1 + Q8_REL) + Q8_ABS, E_i = P_i max_j
    # alpha_j Q_j + Q_i max_j alpha_j (P_j + Q_j): a row whose every alpha_j |D_ij| is below the t
    # that makes this reach the bound has no candidate, and is skipped before its bounds.
    alpha = stats_out[0]
    u_max = 0.0
    w_max = 0.0
    for j in range(n_out):
        u_max = max(u_max, alpha[j] * stats_out[2, j])
        w_max = max(w_max, alpha[j] * (stats_out[1, j] + stats_out[2, j]))
    for r in range(n_rows):
        i = row0 + r
        alpha_i = stats_in[0, i]
        if bound > Q8_ABS:
            if alpha_i == 0.0:
                continue
            e_i = stats_in[1, i] * u_max + stats_in[2, i] * w_max
            t = (bound - Q8_ABS) / ((1.0 + Q8_REL) * alpha_i) * (1.0 - 2.0**-40) - e_i * (1.0 + 2.0**-40)
            if t > 0.0 and _count_q8_reaching(dots[r], alpha, t) == 0:
                continue
        _row_bounds_q8(dots[r], i, indptr, indices, row_of, col_slot, stats_in, stats_out, 1.0, lim)
        n_cand, n_best, n_scored, worst = _offer_row(lim, i, bound, worst, cand, got, n_cand, n_best, n_scored,
                                                     a_in, a_out, inv_in, inv_out, best_scores, best_positions)
    if n_cand:
        n_best = _score_and_offer(a_in, a_out, inv_in, inv_out, cand, n_cand, got, best_scores, best_positions,
                                  n_best)
        n_scored += n_cand
    state[1] = n_best
    state[2] = n_scored


@njit(cache=True, nogil=True)
def move_rows(a, src, dst0):
    """``a[dst0 + u] = a[src[u]]`` for each u in ascending order: rows moved down within ``a``, which
    the order makes safe where ``src`` ascends and ``src[u] >= dst0 + u`` (packing the live rows of
    an activation level in place, ``evolve.sample_activations``). ``a`` 2-D, ``src`` int64."""
    for u in range(src.shape[0]):  # loops, not a[d, :] = a[s, :]: numba's slice assignment costs compile memory
        if src[u] != dst0 + u:
            for c in range(a.shape[1]):
                a[dst0 + u, c] = a[src[u], c]


@njit(cache=True, nogil=True)
def join_shares(out, kept, held_inv, held_kinds, starts, ends, inv, kinds, slot, next_rowidx, next_rows):
    """Join the packed shares of a level that threads wrote with ``forward_cols(..., rows_out=kept)``:
    share t holds rows starting:ends[t] of ``out``, of neurons kept[starts[t]:ends[t]], with
    ``neuron_stats_of_rows`` in held_inv / held_kinds at the same places. Moves them down behind
    each other (rows, neuron numbers, stats), returns m, the rows in all, and writes: ``inv`` and
    ``kinds`` (n,) of every neuron (0 and KIND_ZERO for one not held), ``slot`` (int32, n) each
    neuron's row (m for one not held), a row of zeros at row m if m < n (what such a neuron reads),
    and ``next_rows[p] = slot[next_rowidx[p]]``: the next layer's CSC input rows in the packed level.
    """
    n = slot.shape[0]
    for j in range(n):
        slot[j] = -1
        inv[j] = 0.0
        kinds[j] = KIND_ZERO
    m = 0
    for t in range(starts.shape[0]):
        move_rows(out, np.arange(starts[t], ends[t]), m)
        for u in range(starts[t], ends[t]):
            j = kept[u]
            kept[m], inv[j], kinds[j], slot[j] = j, held_inv[u], held_kinds[u], m
            m += 1
    for j in range(n):
        if slot[j] < 0:
            slot[j] = m
    if m < n:
        for c in range(out.shape[1]):
            out[m, c] = 0.0
    for p in range(next_rowidx.shape[0]):
        next_rows[p] = slot[next_rowidx[p]]
    return m


@njit(cache=True, nogil=True)
def kept_between(indptr, indices, row_of, col_slot, n_cols):
    """How many kept connections (the CSR) join a row in ``row_of`` to a column c with
    ``col_slot[c] < n_cols``: the kept positions among a layer's live neurons (``scan_block``'s maps)."""
    n = 0
    for i in row_of:
        for p in range(indptr[i], indptr[i + 1]):
            n += col_slot[indices[p]] < n_cols
    return n


@njit(cache=True, nogil=True)
def first_free_positions(indptr, indices, n_out, taken, count, out):
    """The first ``count`` linear positions ``i * n_out + j`` that are neither kept (the CSR, columns
    ascending in each row) nor in ``taken`` (int64, ascending), in ascending order, into ``out``
    (int64); returns how many there were (fewer only where fewer are free). These are the picks of
    score 0 that the top-k adds where fewer than k positions score above 0: the tie rule puts them
    in position order. O(count + the kept and taken positions passed)."""
    n_in = indptr.shape[0] - 1
    got = 0
    t = 0
    for i in range(n_in):
        p = indptr[i]
        for j in range(n_out):
            if got == count:
                return got
            if p < indptr[i + 1] and indices[p] == j:
                p += 1
                continue
            pos = i * n_out + j
            while t < taken.shape[0] and taken[t] < pos:
                t += 1
            if t < taken.shape[0] and taken[t] == pos:
                continue
            out[got] = pos
            got += 1
    return got


@njit(cache=True)
def _splitmix64(x):
    # One step of SplitMix64 (Steele, Lea, Flood 2014): a counter-based 64-bit mixer.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def projection_rows(sample_ids, seed, out):
    """Rows of the sketch's random projection for the given samples, without storing the matrix.

    ``out[b, d] = +-1 / sqrt(dim)`` where the sign is bit ``d % 64`` of
    ``splitmix64(splitmix64(seed) ^ splitmix64(sample_ids[b] * W + d // 64))`` with
    ``W = ceil(dim / 64)``, all in uint64 arithmetic (wrapping). The same (seed, sample id) always
    gives the same row, in any batch, so a sample's contribution does not depend on batching.

    Parameters: ``sample_ids`` int64 (B,); ``seed`` int64 >= 0; ``out`` float32 (B, dim), written.
    """
    dim = out.shape[1]
    words = (dim + 63) // 64
    scale = np.float32(1.0 / np.sqrt(dim))
    key = _splitmix64(np.uint64(seed))
    for b in range(sample_ids.shape[0]):
        base = np.uint64(sample_ids[b]) * np.uint64(words)
        for w in range(words):
            bits = _splitmix64(key ^ _splitmix64(base + np.uint64(w)))
            for t in range(min(64, dim - 64 * w)):
                if (bits >> np.uint64(t)) & np.uint64(1):
                    out[b, 64 * w + t] = -scale
                else:
                    out[b, 64 * w + t] = scale


# --- the topology update's rebuild (evolve.py) ------------------------------------------------------
# These, and the scoring's kernels that Python calls, release the GIL (nogil): a layer's drop and
# grow runs on one scoring thread while the other scores the next layer, and a kernel holding the
# GIL kept the other thread from returning to Python after each product and scan.

@njit(cache=True, nogil=True)
def split_kept(indptr, indices, values, velocity, keep, n_out, kept_pos, kept_indptr, kept_indices, kept_vals,
               kept_vel):
    """The connections the drop's ``keep`` mask keeps, in one pass: their linear positions
    ``i * n_out + j``, CSR (``kept_indptr``, ``kept_indices``), weights and momenta, in CSR order
    (so ascending). Outputs are sized by the caller; numpy took five masked copies and a cumsum."""
    a = 0
    kept_indptr[0] = 0
    for i in range(indptr.shape[0] - 1):
        for p in range(indptr[i], indptr[i + 1]):
            pos = i * n_out + np.int64(indices[p])
            if keep[p]:
                kept_pos[a] = pos
                kept_indices[a] = indices[p]
                kept_vals[a] = values[p]
                kept_vel[a] = velocity[p]
                a += 1
        kept_indptr[i + 1] = a


@njit(cache=True, nogil=True)
def dropped_positions(indptr, indices, keep, n_out, out):
    """The linear positions ``i * n_out + j`` of the connections the drop removes (``keep[p]`` False),
    ascending, into ``out`` (sized by the caller to their number): the positions whose canonical
    scores join a layer's top-k scored before the drop (``similarity.merge_dropped``)."""
    a = 0
    for i in range(indptr.shape[0] - 1):
        for p in range(indptr[i], indptr[i + 1]):
            if not keep[p]:
                out[a] = i * n_out + np.int64(indices[p])
                a += 1


@njit(cache=True, nogil=True)
def locate_picks(picks, order, indptr, indices, keep, n_out, where, excluded):
    """Where each cosine pick lies: ``where[t]`` is its index among the removed connections (in
    position order) if the drop just removed it, else -1 (a fresh position). ``excluded`` gets the
    sorted union of the layer's positions before the drop and the fresh picks; returns how many
    picks are fresh. Picks are distinct and never kept (``topk_cosine`` skips kept positions);
    ``order`` sorts them (numpy's ``argsort``, which is several times faster than numba's).

    One pass over the layer, where numpy searched the removed positions for every pick and
    inserted the sorted fresh picks into the positions in two more passes.
    """
    k = picks.shape[0]
    n_in = indptr.shape[0] - 1
    t = 0  # next pick in position order
    n_removed = 0
    o = 0
    for i in range(n_in):
        for p in range(indptr[i], indptr[i + 1]):
            pos = i * n_out + np.int64(indices[p])
            while t < k and picks[order[t]] < pos:
                where[order[t]] = -1
                excluded[o] = picks[order[t]]
                o += 1
                t += 1
            if t < k and picks[order[t]] == pos:
                where[order[t]] = n_removed
                t += 1
            excluded[o] = pos
            o += 1
            n_removed += not keep[p]
    while t < k:
        where[order[t]] = -1
        excluded[o] = picks[order[t]]
        o += 1
        t += 1
    return o - (indptr[n_in] - indptr[0])


@njit(cache=True, nogil=True)
def merge_topology(n_out, kept_pos, kept_vals, kept_vel, new_pos, new_order, new_vals, new_vel,
                   indptr, indices, values, velocity):
    """The layer's CSR arrays after an update, in one O(nnz) pass: the kept connections (linear
    positions ``i * n_out + j``, ascending, with their weights and momenta) merged with the grown
    ones (``new_pos[new_order]`` ascending). Writes ``indptr``, ``indices``, ``values`` and
    ``velocity`` (sized for the merged layer); all positions are distinct.

    The same arrays as sorting every position and permuting the weights and momenta with that order
    (``merged_csr_ref`` in tests/reference.py), without the O(nnz) temporaries of doing it in numpy:
    on a 600,000 x 600,000 layer of 24 million connections that took 3.2 of the update's 6 s.
    """
    n_kept = kept_pos.shape[0]
    k = new_pos.shape[0]
    n_in = indptr.shape[0] - 1
    # The grown connections in position order first: these reads are random, and in a loop of their
    # own the CPU overlaps their cache misses, which the branches of the merge below would serialise.
    grown_pos = np.empty(k, np.int64)
    grown_vals = np.empty(k, np.float32)
    grown_vel = np.empty(k, np.float32)
    for q in range(k):
        t = new_order[q]
        grown_pos[q] = new_pos[t]
        grown_vals[q] = new_vals[t]
        grown_vel[q] = new_vel[t]
    a = 0
    q = 0
    row = 0
    row_end = n_out  # first position past the current row; positions ascend, so rows only advance
    indptr[0] = 0
    for o in range(n_kept + k):
        if q >= k or (a < n_kept and kept_pos[a] < grown_pos[q]):
            pos = kept_pos[a]
            w = kept_vals[a]
            v = kept_vel[a]
            a += 1
        else:
            pos = grown_pos[q]
            w = grown_vals[q]
            v = grown_vel[q]
            q += 1
        while pos >= row_end:
            row += 1
            indptr[row] = o
            row_end += n_out
        indices[o] = pos - (row_end - n_out)
        values[o] = w
        velocity[o] = v
    for r in range(row + 1, n_in + 1):
        indptr[r] = n_kept + k
