"""Plain numpy twins of the numba kernels, written the dense-masked way, used only by the tests.

Batch-major here on purpose: a second formulation of the same maths catches layout mistakes.
"""

import numpy as np


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
