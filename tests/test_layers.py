import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctre_edge import kernels
from ctre_edge.evolve import update_layer
from ctre_edge.layers import (
    INITS,
    SparseLayer,
    check_layer,
    csr_from_positions,
    er_nnz,
    erdos_renyi_layer,
    linear_positions,
    sample_positions,
)
from ctre_edge.packed import PackedNet


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.floats(0.01, 400), st.integers(0, 2**32 - 1))
def test_erdos_renyi_exact_count_valid_structure_both_inits(n_in, n_out, eps, seed):
    glorot = erdos_renyi_layer(n_in, n_out, eps, np.random.default_rng(seed), init="dense-glorot")
    sparse = erdos_renyi_layer(n_in, n_out, eps, np.random.default_rng(seed), init="sparse")
    for layer in (glorot, sparse):
        check_layer(layer)
        assert layer.nnz == er_nnz(n_in, n_out, eps) == min(n_in * n_out, max(1, round(eps * (n_in + n_out))))
        assert np.all(layer.bias == 0)
    # Same topology; weights bounded by the dense fan (paper) or by each neuron's own in-degree, up to
    # the rounding of a draw to float32 (a draw just under the bound can round onto it, 1 ulp above it).
    np.testing.assert_array_equal(glorot.indices, sparse.indices)
    rounding = 1 + 1e-6
    assert np.all(np.abs(glorot.values) <= np.sqrt(6 / (n_in + n_out)) * rounding)
    degree = np.bincount(sparse.indices, minlength=n_out)
    assert np.all(np.abs(sparse.values) <= np.sqrt(6 / degree[sparse.indices]) * rounding)


def test_sparse_init_keeps_the_signal_alive_at_epsilon_1():
    """Three 1000-wide layers at ~0.2% density: RMS activation stays of order 1 (Glorot: it vanishes)."""
    rng = np.random.default_rng(0)
    x = rng.random((200, 784))
    rms = {}
    for init in INITS:
        h, r = x, np.random.default_rng(1)
        for n_in, n_out in ((784, 1000), (1000, 1000), (1000, 1000)):
            layer = erdos_renyi_layer(n_in, n_out, 1.0, r, init=init)
            w = np.zeros((n_in, n_out))  # small dense view for the check only
            w[layer.rows(), layer.indices] = layer.values
            h = np.maximum(h @ w, 0)
        rms[init] = float(np.sqrt(np.mean(h ** 2)))
    assert rms["dense-glorot"] < 1e-3 < 0.05 < rms["sparse"]


def test_unknown_init_is_refused(rng):
    with pytest.raises(ValueError, match="init must be one of sparse, dense-glorot"):
        erdos_renyi_layer(3, 4, 1.0, rng, init="he")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.data())
def test_sample_positions_distinct_and_outside_excluded(total, data):
    n_excl = data.draw(st.integers(0, total))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    excluded = np.sort(rng.choice(total, n_excl, replace=False)).astype(np.int64)
    k = data.draw(st.integers(0, total - n_excl))
    got = sample_positions(total, k, excluded, rng)
    assert got.shape == (k,) and got.dtype == np.int64
    assert np.unique(got).shape[0] == k
    assert np.all((got >= 0) & (got < total))
    assert not np.isin(got, excluded).any()


def test_sample_positions_refuses_too_many():
    with pytest.raises(ValueError, match="only 2 of 5 are free"):
        sample_positions(5, 3, np.array([0, 1, 2], dtype=np.int64), np.random.default_rng(0))


def test_sample_positions_is_uniform_enough():
    rng = np.random.default_rng(1)
    counts = np.bincount(np.concatenate([sample_positions(10_000, 50, np.arange(0, 10_000, 2, dtype=np.int64), rng)
                                         for _ in range(2000)]) % 10, minlength=10)
    assert counts[0::2].sum() == 0  # even positions were excluded
    odd = counts[1::2]
    assert odd.min() > 0.9 * odd.mean()


def test_csr_from_positions_round_trip(rng):
    pos = rng.choice(50 * 70, 300, replace=False).astype(np.int64)
    indptr, indices, order = csr_from_positions(50, 70, pos)
    layer = SparseLayer(50, 70, indptr, indices, np.zeros(300, np.float32), np.zeros(70, np.float32))
    check_layer(layer)
    np.testing.assert_array_equal(linear_positions(layer), np.sort(pos))
    np.testing.assert_array_equal(pos[order], np.sort(pos))


@pytest.mark.parametrize("breakage, message", [
    (lambda L: L._replace(indices=L.indices[::-1].copy()), "strictly ascending"),
    (lambda L: L._replace(indices=np.where(np.arange(L.nnz) == 3, 10**6, L.indices).astype(np.int32)), r"lie in \[0"),
    (lambda L: L._replace(indptr=L.indptr[:-1].copy()), "shape"),
    (lambda L: L._replace(values=L.values.astype(np.float64)), "float32"),
    (lambda L: L._replace(indptr=np.concatenate([[1], L.indptr[1:]]).astype(np.int64)), "start at 0"),
])
def test_check_layer_catches_broken_structure(breakage, message, rng):
    layer = erdos_renyi_layer(40, 60, 3, rng)
    check_layer(layer)
    with pytest.raises(ValueError, match=message):
        check_layer(breakage(layer))


def test_duplicate_connection_is_caught():
    indptr = np.array([0, 2], dtype=np.int64)
    layer = SparseLayer(1, 5, indptr, np.array([3, 3], np.int32), np.zeros(2, np.float32), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="no duplicates"):
        check_layer(layer)


def _run_kernels_once():
    net = PackedNet.from_layers([erdos_renyi_layer(3, 4, 1.0, np.random.default_rng(0))])
    layer = net.layer(0)
    x = np.ones((3, 2), np.float32)
    out = np.empty((4, 2), np.float32)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, out,
                           np.ones(x.shape[0], np.uint8))
    kernels.sparse_backward(layer.indptr, layer.indices, layer.values, x, out, np.empty_like(x),
                            np.empty(layer.nnz, np.float32), True)
    kernels.nesterov_step(layer.values, net.velocity, layer.values.copy(), np.float32(0.01), np.float32(0.9),
                          np.float32(1e-4))


def test_huge_layer_stays_sparse():
    """200,000 x 200,000 at epsilon 1 (dense float32: 160 GB): create, forward/backward on a batch of 8,
    SGD step and a topology update, all under 64 MB of traced peak memory."""
    n, batch = 200_000, 8
    _run_kernels_once()  # compiling or loading the kernels allocates through Python too; not ours to count
    tracemalloc.start()
    try:
        rng = np.random.default_rng(0)
        net = PackedNet.from_layers([erdos_renyi_layer(n, n, 1.0, rng)])
        layer = net.layer(0)
        x = rng.random((n, batch), dtype=np.float32)
        out = np.empty((n, batch), np.float32)
        kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, out,
                           np.ones(x.shape[0], np.uint8))
        dx = np.empty_like(x)
        grad = np.empty(layer.nnz, np.float32)
        kernels.sparse_backward(layer.indptr, layer.indices, layer.values, x, out, dx, grad, True)
        kernels.nesterov_step(layer.values, net.velocity, grad, np.float32(0.01), np.float32(0.9), np.float32(1e-4))
        update_layer(net, 0, 0.2, rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    check_layer(net.layer(0))
    assert net.layer(0).nnz == 400_000
    assert peak < 64 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"
