"""Plain numpy twins of the numba kernels, written the dense-masked way, used only by the tests.

Batch-major here on purpose: a second formulation of the same maths catches layout mistakes.
"""

import numpy as np

from ctre_edge import kernels
from ctre_edge.similarity import _as_activations


def dense_weights(layer):
    """The dense (n_in, n_out) form of a small SparseLayer, for tests only."""
    W = np.zeros((layer.n_in, layer.n_out), dtype=np.float64)
    W[layer.rows(), layer.indices] = layer.values
    return W


def mask_of(layer):
    M = np.zeros((layer.n_in, layer.n_out), dtype=bool)
    M[layer.rows(), layer.indices] = True
    return M


def forward_ref(layer, x_bm):
    """x_bm (B, n_in) -> (B, n_out)."""
    return x_bm @ dense_weights(layer) + layer.bias


def backward_ref(layer, x_bm, dy_bm):
    """Returns (dx (B, n_in), grad per connection in CSR order)."""
    W = dense_weights(layer)
    dx = dy_bm @ W.T
    G = x_bm.T @ dy_bm
    return dx, G[layer.rows(), layer.indices]


def forward_in_order_ref(layer, x_fm):
    """``sparse_forward``'s exact float32 sums: out[j, b] = bias[j], then + w_ij * x[i, b] for the
    column's inputs in ascending i. x_fm (n_in, B) float32 feature-major; returns (n_out, B).

    ``np.cumsum`` adds sequentially, so this is the kernels' order of float32 additions.
    """
    rows, nb = layer.rows(), x_fm.shape[1]
    out = np.empty((layer.n_out, nb), np.float32)
    for j in range(layer.n_out):
        mine = np.flatnonzero(layer.indices == j)  # CSR order: ascending input row
        terms = np.vstack([np.broadcast_to(layer.bias[j], (1, nb)),
                           layer.values[mine, None] * x_fm[rows[mine]]]).astype(np.float32)
        out[j] = np.cumsum(terms, axis=0, dtype=np.float32)[-1]
    return out


LANES = 16
PAIR_LANES = 8


def lane_dot_ref(products):
    """``kernels.lane_dots4``'s exact float32 sums of each row of ``products`` (m, B): lane l adds
    columns l, l + 16, ... in order from +0 (the batch padded with +0 to a multiple of 16, which
    changes no sum; ``+ 0`` after the cumsum, which starts from the first term, turns a -0 lane into
    the kernels' +0), then the 16 lanes are added in a fixed tree: l + 8, then + 4, + 2, + 1."""
    m, nb = products.shape
    chunks = -(-nb // LANES)
    padded = np.zeros((m, max(chunks, 1) * LANES), np.float32)
    padded[:, :nb] = products
    lanes = np.cumsum(padded.reshape(m, -1, LANES), axis=1, dtype=np.float32)[:, -1] + np.float32(0)
    while lanes.shape[1] > 1:
        half = lanes.shape[1] // 2
        lanes = (lanes[:, :half] + lanes[:, half:]).astype(np.float32)
    return lanes[:, 0]


def backward_in_order_ref(layer, x_fm, dy_fm):
    """The backward kernels' exact float32 sums: dx[i, b] over the row's connections in CSR order,
    from 0; grad[p] over the batch in 16 lanes and a fixed tree (``lane_dot_ref``), in every layer,
    wide (``kernels.wide_rows``) or not. Returns (dx (n_in, B), grad)."""
    rows, nb = layer.rows(), x_fm.shape[1]
    # ``np.cumsum`` starts from the first term, the kernels from +0: the same sums, except that a
    # -0 result is +0 from +0, hence the ``+ 0`` after each.
    products = (x_fm[rows] * dy_fm[layer.indices]).astype(np.float32)
    grad = lane_dot_ref(products)
    dx = np.zeros((layer.n_in, nb), np.float32)
    for i in range(layer.n_in):
        p0, p1 = layer.indptr[i], layer.indptr[i + 1]
        if p1 > p0:
            terms = (layer.values[p0:p1, None] * dy_fm[layer.indices[p0:p1]]).astype(np.float32)
            dx[i] = np.cumsum(terms, axis=0, dtype=np.float32)[-1] + np.float32(0)
    return dx, grad


def csc_ref(layer):
    """(colptr, rowidx, perm) of a layer by a stable sort on the column: ``kernels.csc_from_csr``'s result."""
    perm = np.argsort(layer.indices, kind="stable")
    colptr = np.concatenate([[0], np.cumsum(np.bincount(layer.indices, minlength=layer.n_out))])
    return colptr, layer.rows()[perm], perm


def nesterov_ref(w, v, g, lr, momentum, l2):
    g = g + l2 * w
    v = momentum * v - lr * g
    return w + momentum * v - lr * g, v


def softmax_ref(z_bm):
    z = z_bm - z_bm.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba_ref(model, X):
    h = (X.astype(np.float64) - model.shift) * model.scale
    for l, layer in enumerate(model.layers):
        h = forward_ref(layer, h)
        if l < len(model.layers) - 1:
            h = np.maximum(h, 0)
    return softmax_ref(h)


def train_step_ref(layers, velocities, bias_velocities, x_bm, y, lr, momentum, l2):
    """One minibatch step of the whole network in float64, dense-masked; returns the mean loss.

    layers are updated in place (values, bias), as are the velocity arrays.
    """
    hs = [x_bm]
    for l, layer in enumerate(layers):
        z = forward_ref(layer, hs[-1])
        hs.append(np.maximum(z, 0) if l < len(layers) - 1 else z)
    p = softmax_ref(hs[-1])
    nb = x_bm.shape[0]
    loss = -np.log(p[np.arange(nb), y]).mean()
    dy = p.copy()
    dy[np.arange(nb), y] -= 1
    dy /= nb
    for l in range(len(layers) - 1, -1, -1):
        layer = layers[l]
        dx, g = backward_ref(layer, hs[l], dy)
        w, v = nesterov_ref(layer.values.astype(np.float64), velocities[l], g, lr, momentum, l2)
        layer.values[:] = w
        velocities[l][:] = v
        b, bv = nesterov_ref(layer.bias.astype(np.float64), bias_velocities[l], dy.sum(axis=0), lr, momentum, 0.0)
        layer.bias[:] = b
        bias_velocities[l][:] = bv
        dy = dx * (hs[l] > 0)
    return loss


# --- cosine scoring: the dense references of similarity.py ------------------------------------------

def pair_lane_sum(x, y):
    """``kernels.pair_dots8``'s float64 sums of x * y over the last axis (x and y float32, broadcast
    against each other): lane l adds samples l, l + 8, ... in order from 0 (the samples padded with
    +0 to a multiple of 8, which changes no sum), then the lanes are added l + 4, + 2, + 1."""
    x, y = np.asarray(x, np.float32).astype(np.float64), np.asarray(y, np.float32).astype(np.float64)
    n = x.shape[-1]
    chunks = -(-n // PAIR_LANES)
    pad = [(0, 0)] * (x.ndim - 1) + [(0, chunks * PAIR_LANES - n)]
    x, y = np.pad(x, pad), np.pad(y, pad)
    lanes = np.zeros(np.broadcast_shapes(x.shape[:-1], y.shape[:-1]) + (PAIR_LANES,))
    for c in range(chunks):  # sequential over chunks, like the kernels
        lanes = lanes + x[..., c * PAIR_LANES:(c + 1) * PAIR_LANES] * y[..., c * PAIR_LANES:(c + 1) * PAIR_LANES]
    while lanes.shape[-1] > 1:
        half = lanes.shape[-1] // 2
        lanes = lanes[..., :half] + lanes[..., half:]
    return lanes[..., 0]


def canonical_scores_reference(a_in, a_out):
    """Dense (n_in, n_out) float32 canonical scores in plain numpy; for tests and small layers only."""
    a_in, a_out = np.asarray(a_in, dtype=np.float32), np.asarray(a_out, dtype=np.float32)
    dots = pair_lane_sum(a_in[:, None, :], a_out[None, :, :])
    sq_in, sq_out = pair_lane_sum(a_in, a_in), pair_lane_sum(a_out, a_out)
    with np.errstate(divide="ignore"):
        inv_in = np.where(sq_in > 0, 1.0 / np.sqrt(sq_in), 0.0)
        inv_out = np.where(sq_out > 0, 1.0 / np.sqrt(sq_out), 0.0)
    return (np.abs(dots) * inv_in[:, None] * inv_out[None, :]).astype(np.float32)


def topk_cosine_reference(a_in, a_out, indptr, indices, k):
    """``topk_cosine`` from the full dense score matrix and a stable sort. For tests only."""
    scores = canonical_scores_reference(a_in, a_out)
    n_in, n_out = scores.shape
    kept = np.repeat(np.arange(n_in), np.diff(indptr)) * n_out + np.asarray(indices, dtype=np.int64)
    flat = scores.ravel().astype(np.float64)
    flat[kept] = -np.inf
    if k > flat.size - kept.size:
        raise ValueError(f"k must be at most {flat.size - kept.size}; got {k}.")
    positions = np.argsort(-flat, kind="stable")[:k]
    return positions // n_out, (positions % n_out).astype(np.int32), flat[positions].astype(np.float32)


def rescore_topk(a_in, a_out, rows, cols, k):
    """Exact top-k among candidate positions, by canonical score, with ``topk_cosine``'s tie rule.

    Costs O(len(rows) * S): only the neurons that appear in a candidate get a norm. When the
    candidates include the exact top-k, the result equals ``topk_cosine`` bit for bit.

    Parameters
    ----------
    a_in : ndarray of shape (n_in, S)
    a_out : ndarray of shape (n_out, S)
    rows, cols : ndarray of int, shape (m,)
        Distinct candidate positions.
    k : int
        ``0 <= k <= m``.

    Returns
    -------
    rows : ndarray of int64, cols : ndarray of int32, scores : ndarray of float32, each (k,)
    """
    a_in, a_out = _as_activations(a_in, "a_in"), _as_activations(a_out, "a_out")
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int32)
    if rows.ndim != 1 or rows.shape != cols.shape:
        raise ValueError(f"rows and cols must be 1-D of one length; got {rows.shape} and {cols.shape}.")
    if rows.size and not (0 <= rows.min() and rows.max() < a_in.shape[0]):
        raise ValueError(f"rows must lie in [0, {a_in.shape[0]}).")
    if cols.size and not (0 <= cols.min() and cols.max() < a_out.shape[0]):
        raise ValueError(f"cols must lie in [0, {a_out.shape[0]}).")
    if a_in.shape[1] != a_out.shape[1]:
        raise ValueError(f"a_in and a_out must share the samples axis; got {a_in.shape} and {a_out.shape}.")
    if not 0 <= k <= rows.shape[0]:
        raise ValueError(f"k must be in [0, {rows.shape[0]}] (the number of candidates); got {k}.")
    inv = []
    for a, idx, name in ((a_in, rows, "a_in"), (a_out, cols, "a_out")):
        used = np.unique(idx).astype(np.int64)
        part = np.empty(used.shape[0], np.float64)
        kernels.inverse_norms(a, used, part)
        if np.isnan(part).any():
            raise ValueError(f"{name} contains Inf or NaN activations.")
        full = np.zeros(a.shape[0], np.float64)
        full[used] = part
        inv.append(full)
    scores = np.empty(rows.shape[0], np.float32)
    kernels.canonical_scores(a_in, a_out, inv[0], inv[1], rows, cols, scores)
    positions = rows * a_out.shape[0] + cols
    order = np.lexsort((positions, -scores))[:k]
    return rows[order], cols[order], scores[order]


def merged_csr_ref(n_in, n_out, kept_pos, new_pos, new_order=None):
    """``csr_from_positions(n_in, n_out, concatenate([kept_pos, new_pos]))`` for sorted ``kept_pos``,
    in O(nnz + k log k): only the k new positions are sorted (unless ``new_order``, the permutation
    that sorts them, is given), then merged (all positions distinct)."""
    n_kept, k = kept_pos.shape[0], new_pos.shape[0]
    if new_order is None:
        new_order = np.argsort(new_pos, kind="stable")
    slots = np.searchsorted(kept_pos, new_pos[new_order]) + np.arange(k)
    is_new = np.zeros(n_kept + k, dtype=bool)
    is_new[slots] = True
    order = np.empty(n_kept + k, dtype=np.int64)
    order[slots] = n_kept + new_order
    order[~is_new] = np.arange(n_kept)
    sorted_pos = np.empty(n_kept + k, dtype=np.int64)
    sorted_pos[slots] = new_pos[new_order]
    sorted_pos[~is_new] = kept_pos
    rows = sorted_pos // n_out
    indices = (sorted_pos - rows * n_out).astype(np.int32)
    indptr = np.zeros(n_in + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_in), out=indptr[1:])
    return indptr, indices, order


def split_kept_ref(layer, velocity, keep):
    """``kernels.split_kept`` in numpy: the kept connections' positions, CSR, weights and momenta."""
    positions = layer.rows() * layer.n_out + layer.indices.astype(np.int64)
    kept_indptr = np.concatenate([[0], np.cumsum(keep)])[layer.indptr]
    return positions[keep], kept_indptr, layer.indices[keep], layer.values[keep], velocity[keep]


def locate_picks_ref(layer, keep, picks):
    """``kernels.locate_picks`` in numpy: each pick's index among the removed positions (-1 if it
    is fresh), and the sorted union of the positions before the drop and the fresh picks."""
    positions = layer.rows() * layer.n_out + layer.indices.astype(np.int64)
    removed = positions[~keep]
    where = np.searchsorted(removed, picks)
    where[where == removed.shape[0]] = 0
    readded = removed[where] == picks if removed.shape[0] else np.zeros(picks.shape[0], bool)
    fresh = np.sort(picks[~readded])
    excluded = np.insert(positions, np.searchsorted(positions, fresh), fresh)
    return np.where(readded, where, -1), excluded


def join_shares_ref(out, kept, held_inv, held_kinds, starts, ends, next_rowidx):
    """``kernels.join_shares`` in numpy: returns (out, kept, inv, kinds, slot, next_rows, m)."""
    out, n = out.copy(), held_inv.shape[0]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]).astype(np.int64)
    m = rows.shape[0]
    live = kept[rows]
    out[:m] = out[rows]
    if m < n:
        out[m] = 0.0
    inv, kinds = np.zeros(n), np.zeros(n, np.int8)
    inv[live], kinds[live] = held_inv[rows], held_kinds[rows]
    slot = np.full(n, m, np.int32)
    slot[live] = np.arange(m)
    kept = kept.copy()
    kept[:m] = live
    return out, kept, inv, kinds, slot, slot[next_rowidx], m

