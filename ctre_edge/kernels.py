"""Every numba kernel of ctre-edge: plain functions over flat arrays, compiled with ``cache=True``.

Layout: activations are feature-major, ``(features, batch)`` float32 and C-contiguous, so the
innermost loop of every kernel runs over the batch with unit stride (measured in
``tools/bench_layout.py``: several times faster than batch-major for CSR at batch 100). A sparse
layer is CSR over input rows (see ``layers.py``). Kernels trust their inputs: shapes and dtypes are
validated where data enters (``layers.check_layer``, ``data.py``, the API). ``np.dot`` is not used
inside kernels because numba needs scipy for it; the loops are explicit.

A whole network is passed "packed": the layers' arrays concatenated, with offsets
``ptr_off`` (into ``indptr``), ``nz_off`` (into ``indices``/``values``) and ``unit_off`` (into the
biases of layers 1..L), and ``sizes`` = neurons per level ``[n_0, ..., n_L]``. The number of
connections of a layer never changes, so these offsets are fixed for a run and the per-layer
arrays are views into the packed ones.

Each kernel has a numpy twin in ``tests/reference.py`` that the tests compare against.
"""

import numpy as np
from numba import njit


# --- one layer: forward, backward (input and weight gradients), SGD step ---------------------------

@njit(cache=True)
def gather_scaled(X, rows, shift, scale, out):
    """out[f, b] = (float32(X[rows[b], f]) - shift[f]) * scale[f]; out has shape (n_features, len(rows)).

    X may be any numeric dtype (uint8 stays uint8 in memory and is scaled per batch).
    """
    nb = rows.shape[0]
    nf = out.shape[0]
    for b in range(nb):
        r = rows[b]
        for f in range(nf):
            out[f, b] = (np.float32(X[r, f]) - shift[f]) * scale[f]


@njit(cache=True)
def sparse_forward(indptr, indices, values, bias, x, out):
    """out = (x.T @ W + b).T for CSR ``W``: out[j, :] = b[j] + sum_{(i,j)} w_ij x[i, :].

    x: (n_in, B) float32, out: (n_out, B) float32. Rows of x that are all zero (dead ReLUs)
    still cost one pass over their connections; skipping them is not worth a test per row.
    """
    n_out, nb = out.shape
    for j in range(n_out):
        bj = bias[j]
        for b in range(nb):
            out[j, b] = bj
    n_in = indptr.shape[0] - 1
    for i in range(n_in):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            w = values[p]
            for b in range(nb):
                out[j, b] += w * x[i, b]


@njit(cache=True)
def sparse_backward(indptr, indices, values, x, dy, dx, grad, compute_dx):
    """Gradients of a sparse layer, on existing connections only.

    grad[p] = sum_b x[i, b] * dy[j, b] for connection p = (i, j) (dL/dW restricted to the CSR
    pattern); if ``compute_dx``: dx[i, :] = sum_{(i,j)} w_ij dy[j, :] (dL/dx, with the weights
    before this step's update). x: (n_in, B), dy: (n_out, B), dx: (n_in, B), grad: (nnz,).
    """
    n_in = indptr.shape[0] - 1
    nb = x.shape[1]
    for i in range(n_in):
        if compute_dx:
            for b in range(nb):
                dx[i, b] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            w = values[p]
            g = np.float32(0.0)
            for b in range(nb):
                g += x[i, b] * dy[j, b]
                if compute_dx:
                    dx[i, b] += w * dy[j, b]
            grad[p] = g


@njit(cache=True)
def bias_gradient(dy, out):
    """out[j] = sum_b dy[j, b]."""
    n, nb = dy.shape
    for j in range(n):
        s = np.float32(0.0)
        for b in range(nb):
            s += dy[j, b]
        out[j] = s


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
def relu_inplace(h):
    n, nb = h.shape
    for j in range(n):
        for b in range(nb):
            if h[j, b] < 0.0:
                h[j, b] = 0.0


@njit(cache=True)
def relu_backward_inplace(dh, h):
    """dh *= (h > 0), reading the stored post-activation h, so pre-activations need not be kept."""
    n, nb = dh.shape
    for j in range(n):
        for b in range(nb):
            if h[j, b] <= 0.0:
                dh[j, b] = 0.0


@njit(cache=True)
def softmax_inplace(z):
    """Column-wise softmax of logits z (n_classes, B), in place, with the max subtracted first."""
    c, nb = z.shape
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
def softmax_xent_backward(p, y, scale_by):
    """Turn probabilities p (n_classes, B) into dL/dlogits = (p - onehot(y)) * scale_by, in place.

    Returns (sum over the batch of -log p[y], number of argmax hits). ``scale_by`` is 1/B for
    the mean loss over the batch.
    """
    c, nb = p.shape
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


# --- a whole network, packed ------------------------------------------------------------------------

@njit(cache=True)
def _level(buf, off, n, nb):
    return buf[off * nb: (off + n) * nb].reshape((n, nb))


@njit(cache=True)
def forward_all(X, rows, shift, scale, sizes, ptr_off, nz_off, unit_off,
                indptr, indices, values, bias, act):
    """Inference forward pass of a batch: fills every level's activations in ``act``.

    act is a flat float32 buffer of at least sum(sizes) * len(rows); level l occupies
    ``sum(sizes[:l]) * B`` onwards as a (sizes[l], B) block. Hidden levels hold ReLU outputs,
    the last level holds softmax probabilities. Returns nothing; read levels back with
    ``level_view``.
    """
    nb = rows.shape[0]
    n_layers = sizes.shape[0] - 1
    off = 0
    a = _level(act, 0, sizes[0], nb)
    gather_scaled(X, rows, shift, scale, a)
    for l in range(n_layers):
        nxt = off + sizes[l]
        out = _level(act, nxt, sizes[l + 1], nb)
        sparse_forward(indptr[ptr_off[l]:ptr_off[l + 1]], indices[nz_off[l]:nz_off[l + 1]],
                       values[nz_off[l]:nz_off[l + 1]], bias[unit_off[l]:unit_off[l + 1]], a, out)
        if l < n_layers - 1:
            relu_inplace(out)
        else:
            softmax_inplace(out)
        a = out
        off = nxt


@njit(cache=True)
def train_batches(X, y, order, batch_size, shift, scale, sizes, ptr_off, nz_off, unit_off,
                  indptr, indices, values, velocity, bias, bias_velocity,
                  act, delta_a, delta_b, grad, bias_grad, lr, momentum, l2):
    """One pass of minibatch SGD over ``order`` (sample rows, already shuffled), in place.

    Per batch: forward (ReLU hidden, softmax output), mean cross-entropy, backward on existing
    connections only, Nesterov step per layer right after its gradients (the input gradient
    of a layer is computed before its weights change). Buffers are preallocated by the caller:
    act >= sum(sizes)*batch_size, delta_a/delta_b >= max(sizes)*batch_size,
    grad >= max layer nnz, bias_grad >= max(sizes[1:]). The last batch may be partial.
    Returns (sum of sample losses, number of correct training predictions).
    """
    n = order.shape[0]
    n_layers = sizes.shape[0] - 1
    total_loss = 0.0
    total_correct = 0
    level_off = np.zeros(n_layers + 1, dtype=np.int64)
    for l in range(n_layers):
        level_off[l + 1] = level_off[l] + sizes[l]
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        rows = order[start:stop]
        nb = stop - start
        forward_all(X, rows, shift, scale, sizes, ptr_off, nz_off, unit_off,
                    indptr, indices, values, bias, act)
        c = sizes[n_layers]
        dy = _level(delta_a, 0, c, nb)
        dy[:, :] = _level(act, level_off[n_layers], c, nb)
        loss, correct = softmax_xent_backward(dy, y[rows], np.float32(1.0 / nb))
        total_loss += loss
        total_correct += correct
        use_a = True
        for l in range(n_layers - 1, -1, -1):
            n_in = sizes[l]
            x = _level(act, level_off[l], n_in, nb)
            if use_a:
                dy = _level(delta_a, 0, sizes[l + 1], nb)
                dx = _level(delta_b, 0, n_in, nb)
            else:
                dy = _level(delta_b, 0, sizes[l + 1], nb)
                dx = _level(delta_a, 0, n_in, nb)
            p0 = nz_off[l]
            p1 = nz_off[l + 1]
            lp = indptr[ptr_off[l]:ptr_off[l + 1]]
            g = grad[:p1 - p0]
            sparse_backward(lp, indices[p0:p1], values[p0:p1], x, dy, dx, g, l > 0)
            nesterov_step(values[p0:p1], velocity[p0:p1], g, lr, momentum, l2)
            u0 = unit_off[l]
            u1 = unit_off[l + 1]
            bg = bias_grad[:u1 - u0]
            bias_gradient(dy, bg)
            nesterov_step(bias[u0:u1], bias_velocity[u0:u1], bg, lr, momentum, np.float32(0.0))
            if l > 0:
                relu_backward_inplace(dx, x)
            use_a = not use_a
    return total_loss, total_correct


@njit(cache=True)
def predict_batches(X, rows, shift, scale, sizes, ptr_off, nz_off, unit_off,
                    indptr, indices, values, bias, batch_size, act, proba):
    """Class probabilities of the samples X[rows], written to proba (len(rows), n_classes), in batches."""
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
                    indptr, indices, values, bias, act)
        p = _level(act, last, c, nb)
        for b in range(nb):
            for k in range(c):
                proba[start + b, k] = p[k, b]
