"""The int8 arithmetic of the C export (``export_c.py``), in numpy: what the generated C computes.

Weights: symmetric int8 with one float32 scale per output neuron; activations quantized per sample at
run time; products accumulated in int32 (``export_c.py``'s docstring has the why). ``predict_int8``
is the twin the tests compare the compiled C against, bit for bit.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError

_INT8_MAX_PRODUCT = 127 * 127


def quantize_layer(layer) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights in CSR order, float32 scale per output neuron): ``w ~= scale[output] * q``."""
    absmax = np.zeros(layer.n_out, dtype=np.float32)
    np.maximum.at(absmax, layer.indices, np.abs(layer.values))
    scale = (absmax / np.float32(127)).astype(np.float32)
    s = scale[layer.indices].astype(np.float64)
    q = np.where(s > 0, np.round(layer.values.astype(np.float64) / np.where(s > 0, s, 1)), 0)
    return np.clip(q, -127, 127).astype(np.int8), scale


def _quantize_activations(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 of float32 h (N, n): (q as int32, scale float32 (N,)), as the C code does it."""
    m = np.max(np.abs(h), axis=1)
    safe = np.where(m > 0, m, np.float32(1))
    inv = (np.float32(127) / safe).astype(np.float32)
    v = (h * inv[:, None]).astype(np.float32)
    half = np.float32(0.5)
    q = np.where(v < 0, np.trunc(v - half), np.trunc(v + half))
    q = np.where(m[:, None] > 0, np.clip(q, -127, 127), 0).astype(np.int32)
    return q, np.where(m > 0, m / np.float32(127), np.float32(0)).astype(np.float32)


def predict_int8(model, X, batch: int = 128) -> np.ndarray:
    """Class probabilities of the int8 C code, computed in numpy (float32 softmax via np.exp)."""
    X = np.ascontiguousarray(np.asarray(X), dtype=np.float32)
    quantized = [quantize_layer(layer) for layer in model.layers]
    out = np.empty((X.shape[0], model.layers[-1].n_out), dtype=np.float32)
    for start in range(0, X.shape[0], batch):
        h = ((X[start:start + batch] - model.shift) * model.scale).astype(np.float32)
        for l, (layer, (q_w, w_scale)) in enumerate(zip(model.layers, quantized)):
            q_x, s = _quantize_activations(h)
            acc = _sparse_int_product(layer, q_w, q_x)
            h = (acc.astype(np.float32) * (s[:, None] * w_scale[None, :])).astype(np.float32) + layer.bias
            if l < len(model.layers) - 1:
                h = np.maximum(h, np.float32(0))
        e = np.exp(h - h.max(axis=1, keepdims=True)).astype(np.float32)
        out[start:start + batch] = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
    return out


def _sparse_int_product(layer, q_w, q_x) -> np.ndarray:
    """acc (N, n_out) int64 = q_x @ W_q, by connection: O(N * nnz) memory, never N x n_in x n_out."""
    acc = np.zeros((q_x.shape[0], layer.n_out), dtype=np.int64)
    if layer.nnz == 0:
        return acc
    order = np.argsort(layer.indices, kind="stable")
    cols = layer.indices[order]
    products = q_x[:, layer.rows()[order]].astype(np.int64) * q_w[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    acc[:, cols[starts]] = np.add.reduceat(products, starts, axis=1)
    return acc


def _check_int8_fanin(model) -> None:
    for l, layer in enumerate(model.layers):
        fanin = int(np.bincount(layer.indices, minlength=layer.n_out).max(initial=0))
        if fanin * _INT8_MAX_PRODUCT > 2**31 - 1:
            raise ConfigError(f"layer{l} has a neuron with {fanin:,} inputs, which could overflow the int32 "
                              f"accumulator of --quantize int8; export it as float32")
