"""Each numba kernel against its dense-masked numpy twin (tests/reference.py)."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    backward_in_order_ref,
    backward_ref,
    csc_ref,
    dense_weights,
    forward_in_order_ref,
    forward_ref,
    join_shares_ref,
    nesterov_ref,
    predict_proba_ref,
    softmax_ref,
    train_step_ref,
)

from ctre_edge import kernels
from ctre_edge.layers import erdos_renyi_layer
from ctre_edge.packed import CSC_MAX_CONNECTIONS, PackedNet, aligned_empty, row_stride

layer_shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(0.05, 20), st.integers(1, 17),
                         st.integers(0, 2**32 - 1))


def random_layer(n_in, n_out, eps, seed):
    rng = np.random.default_rng(seed)
    layer = erdos_renyi_layer(n_in, n_out, eps, rng)
    layer.bias[:] = rng.normal(size=n_out).astype(np.float32)
    return layer, rng


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@settings(max_examples=60, deadline=None)
@given(layer_shapes)
def test_forward_equals_dense_masked(shape):
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = rng.normal(size=(batch, n_in)).astype(np.float32)
    out = np.empty((n_out, batch), np.float32)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, np.ascontiguousarray(x.T), out,
                           np.ones(layer.n_in, np.uint8))
    close(out.T, forward_ref(layer, x.astype(np.float64)))


@settings(max_examples=60, deadline=None)
@given(layer_shapes, st.booleans())
def test_backward_equals_dense_masked(shape, compute_dx):
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = rng.normal(size=(batch, n_in)).astype(np.float32)
    dy = rng.normal(size=(batch, n_out)).astype(np.float32)
    dx = np.full((n_in, batch), 7.0, np.float32)
    grad = np.empty(layer.nnz, np.float32)
    kernels.sparse_backward(layer.indptr, layer.indices, layer.values, np.ascontiguousarray(x.T),
                            np.ascontiguousarray(dy.T), dx, grad, compute_dx)
    dx_ref, grad_ref = backward_ref(layer, x.astype(np.float64), dy.astype(np.float64))
    close(grad, grad_ref)
    if compute_dx:
        close(dx.T, dx_ref)
    else:
        assert np.all(dx == 7.0)  # untouched: the first layer needs no input gradient


def test_backward_matches_finite_differences(rng):
    """The reference gradient itself is right: central differences of L = sum(dy * (x @ W + b))."""
    layer, _ = random_layer(6, 5, 2, 3)
    layer = layer._replace(values=layer.values.astype(np.float64))
    x = rng.normal(size=(4, 6))
    dy = rng.normal(size=(4, 5))
    dx, grad = backward_ref(layer, x, dy)

    def loss(values, x_):
        return float(np.sum(dy * forward_ref(layer._replace(values=values), x_)))

    h = 1e-6
    for p in range(layer.nnz):
        up, down = layer.values.copy(), layer.values.copy()
        up[p] += h
        down[p] -= h
        assert abs((loss(up, x) - loss(down, x)) / (2 * h) - grad[p]) < 1e-6
    for b, i in [(0, 0), (3, 5), (2, 1)]:
        up, down = x.copy(), x.copy()
        up[b, i] += h
        down[b, i] -= h
        assert abs((loss(layer.values, up) - loss(layer.values, down)) / (2 * h) - dx[b, i]) < 1e-6


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.floats(1e-4, 1.0), st.floats(0, 0.99), st.floats(0, 1e-2), st.integers(1, 20),
       st.integers(0, 2**32 - 1))
def test_nesterov_step_many_steps(n, lr, momentum, l2, steps, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n).astype(np.float32)
    v = np.zeros(n, np.float32)
    w_ref, v_ref = w.astype(np.float64), v.astype(np.float64)
    for _ in range(steps):
        g = rng.normal(size=n).astype(np.float32)
        kernels.nesterov_step(w, v, g, np.float32(lr), np.float32(momentum), np.float32(l2))
        w_ref, v_ref = nesterov_ref(w_ref, v_ref, g.astype(np.float64), lr, momentum, l2)
    close(w, w_ref, rtol=1e-4, atol=1e-5)
    close(v, v_ref, rtol=1e-4, atol=1e-5)


def test_softmax_and_cross_entropy(rng):
    z = rng.normal(size=(7, 12)).astype(np.float32) * 10
    y = rng.integers(0, 7, 12)
    p = z.copy()
    kernels.softmax_inplace(p)
    close(p.T, softmax_ref(z.T.astype(np.float64)))
    probs = p.copy()
    loss, correct = kernels.softmax_xent_backward(p, y, np.float32(1 / 12))
    assert abs(loss - (-np.log(probs[y, np.arange(12)]).sum())) < 1e-4
    assert correct == int(np.sum(np.argmax(probs, axis=0) == y))
    expected = probs.copy()
    expected[y, np.arange(12)] -= 1
    close(p, expected / 12)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("nf", [9, 16, 37, kernels.GATHER_CHUNK + 21])  # no, one, some 16-blocks; two chunks
def test_gather_scaled_keeps_uint8_and_scales(dtype, nf, rng):
    X = rng.integers(0, 256, size=(30, nf)).astype(dtype)
    shift = rng.normal(size=nf).astype(np.float32)
    scale = rng.random(nf).astype(np.float32)
    tile = np.empty((kernels.GATHER_TILE, nf), np.float32)
    for n in (0, 1, 4, kernels.GATHER_TILE, 2 * kernels.GATHER_TILE + 3):  # whole tiles and the rest
        rows = rng.integers(0, 30, size=n)
        for width in (n, n + 5):  # rows of out longer than the batch keep their other columns
            out = np.full((nf, width), 7.0, np.float32)
            kernels.gather_scaled(X, rows, shift, scale, out, tile)
            want = (X[rows].astype(np.float32) - shift) * scale
            np.testing.assert_array_equal(out[:, :n].T.view(np.uint32), want.view(np.uint32))
            assert (out[:, n:] == 7.0).all()


def test_transpose_block_moves_a_block_transposed(rng):
    @numba.njit
    def move(src, s_off, s_ld, dst, d_off, d_ld):
        kernels.transpose_block(src, s_off, s_ld, dst, d_off, d_ld)

    src = rng.normal(size=(20, 40)).astype(np.float32)
    dst = np.full((30, 50), np.nan, np.float32)
    move(src, 3 * 40 + 5, 40, dst, 7 * 50 + 2, 50)
    want = np.full_like(dst, np.nan)
    want[7:23, 2:18] = src[3:19, 5:21].T
    np.testing.assert_array_equal(dst, want)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=3, max_size=5), st.floats(0.5, 6), st.integers(1, 50),
       st.integers(1, 16), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_train_batches_equals_reference_sgd(sizes, eps, n, batch, seed, threads):
    """The fused minibatch loop equals a float64 dense-masked forward/backward/Nesterov step per batch."""
    check_train_batches_against_reference(sizes, eps, n, batch, seed, threads)


@pytest.mark.parametrize("batch", [63, 64, 65, 100])
def test_train_batches_with_padded_rows_equals_reference_sgd(batch):
    """Batches of 64 and more keep their rows at ``row_stride`` (65 -> 80, 100 -> 112), smaller ones
    packed; 150 rows end with a smaller batch (100 + 50, 65 + 65 + 20), so one run has both."""
    check_train_batches_against_reference([30, 25, 20, 4], 3.0, 150, batch, 7, 2)


def check_train_batches_against_reference(sizes, eps, n, batch, seed, threads):
    rng = np.random.default_rng(seed)
    sizes[-1] = max(sizes[-1], 2)
    layers = [erdos_renyi_layer(sizes[l], sizes[l + 1], eps, rng) for l in range(len(sizes) - 1)]
    net = PackedNet.from_layers(layers)
    ref = [l._replace(values=l.values.astype(np.float64), bias=l.bias.astype(np.float64)) for l in net.snapshot()]
    vel = [np.zeros(l.nnz) for l in ref]
    bvel = [np.zeros(l.n_out) for l in ref]
    X = rng.random((n, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], n)
    shift = np.zeros(sizes[0], np.float32)
    scale = np.ones(sizes[0], np.float32)
    order = rng.permutation(n)
    stride = row_stride(batch)
    act = aligned_empty(sum(sizes) * stride)
    da = aligned_empty(max(sizes) * stride)
    db = aligned_empty(max(sizes) * stride)
    grad = np.empty(int(np.diff(net.nz_off).max()), np.float32)
    bg = np.empty(max(sizes[1:]), np.float32)
    csc = net.csc_buffers()
    kernels.csc_all(*net[:6], *csc, CSC_MAX_CONNECTIONS)
    loss, _ = kernels.train_batches(X, y, order, batch, shift, scale, *net, act, da, db, grad, bg, *csc,
                                    np.float32(0.1), np.float32(0.9), np.float32(1e-3), threads)
    ref_loss = 0.0
    for s in range(0, n, batch):
        rows = order[s:s + batch]
        ref_loss += train_step_ref(ref, vel, bvel, X[rows].astype(np.float64), y[rows], 0.1, 0.9, 1e-3) * len(rows)
    assert abs(loss - ref_loss) <= 1e-4 * max(1.0, abs(ref_loss))
    for l in range(len(layers)):
        close(net.layer(l).values, ref[l].values, rtol=1e-4, atol=1e-5)
        close(net.layer(l).bias, ref[l].bias, rtol=1e-4, atol=1e-5)
        close(net.layer_velocity(l), vel[l], rtol=1e-4, atol=1e-5)


def test_predict_batches_equals_reference(rng):
    from ctre_edge.model import SparseMLP

    layers = [erdos_renyi_layer(12, 20, 3, rng), erdos_renyi_layer(20, 4, 3, rng)]
    model = SparseMLP(layers, rng.normal(size=12).astype(np.float32), rng.random(12).astype(np.float32), [0, 1, 2, 3])
    X = rng.normal(size=(33, 12)).astype(np.float32)
    for bs in (1, 7, 33, 100):
        close(model.predict_proba(X, batch_size=bs), predict_proba_ref(model, X))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_validation_split_over_threads_gives_the_serial_bits(threads, rng):
    """The validation pass split over threads (``train.Evaluator.proba``: each its rows, in smaller
    batches, in its share of the buffer) gives ``predict_batches``' probabilities bit for bit, with
    and without the CSC copy, on a network large enough to split (``PARALLEL_MIN_WORK``) and on one
    too small to."""
    from ctre_edge.packed import no_csc
    from ctre_edge.train import Evaluator

    for width, eps in ((400, 20.0), (12, 2.0)):
        sizes = [30, width, width, 5]
        net = PackedNet.from_layers([erdos_renyi_layer(sizes[l], sizes[l + 1], eps, rng) for l in range(3)])
        X = rng.random((150, 30)).astype(np.float32)
        rows = rng.permutation(150)[:131]
        shift, scale = np.zeros(30, np.float32), np.ones(30, np.float32)
        csc = net.csc_buffers()
        kernels.csc_all(*net[:6], *csc, CSC_MAX_CONNECTIONS)
        split = width == 400
        assert (int(net.nz_off[-1]) * 64 >= kernels.PARALLEL_MIN_WORK) == split
        for bs in (1, 64, 131):
            want = np.empty((131, 5), np.float32)
            kernels.predict_batches(X, rows, shift, scale, *net.forward, *csc, bs, net.activation_buffer(bs), want)
            for c in (csc, no_csc()):
                evaluator = Evaluator(net, shift, scale, bs, None, c)
                evaluator.threads = threads
                np.testing.assert_array_equal(evaluator.proba(X, rows).view(np.int32), want.view(np.int32))


def test_thread_count_does_not_change_the_model(tmp_path):
    """Issue 9: parallel and serial training give bit-identical models (layers above the parallel threshold)."""
    import numba

    from ctre_edge.data import load_data
    from ctre_edge.train import TrainConfig, train

    assert (400 * 2 * 20) * 100 >= kernels.PARALLEL_MIN_WORK  # the hidden layers below do run threaded
    data = load_data("builtin:digits")
    before = numba.get_num_threads()
    files = []
    try:
        for n in (1, numba.config.NUMBA_NUM_THREADS, 1):
            numba.set_num_threads(n)
            config = TrainConfig(hidden=(400, 400), epsilon=20, epochs=3, method="ctre-sim", similarity_samples=300)
            files.append(train(data, config).model.save(tmp_path / f"t{len(files)}.ctre").read_bytes())
    finally:
        numba.set_num_threads(before)
    assert files[0] == files[1] == files[2]


def backward_rows(layer, x, dy, dx, g, alive_in, alive_out, compute_dx, wide):
    kernels.backward_rows(layer.indptr, layer.indices, layer.values, x, dy, dx, g, 0, layer.n_in, alive_in, alive_out,
                          compute_dx, wide)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_sparse_backward_threads_equals_serial_bit_for_bit(threads, rng):
    for eps in (1, 6, 30):  # rows of about 1, 6 and 20 connections: both weight-gradient loops
        layer = erdos_renyi_layer(57, 40, eps, rng)
        x = rng.normal(size=(57, 13)).astype(np.float32)
        dy = rng.normal(size=(40, 13)).astype(np.float32)
        want_dx, want_g = np.empty_like(x), np.empty(layer.nnz, np.float32)
        got_dx, got_g = np.empty_like(x), np.empty(layer.nnz, np.float32)
        a = (layer.indptr, layer.indices, layer.values, x, dy)
        kernels.sparse_backward(*a, want_dx, want_g, True)
        want_dx[x <= 0] = 0
        alive = (np.ones(57, np.uint8), np.ones(40, np.uint8))
        kernels.sparse_backward_threads(*a, got_dx, got_g, *alive, True, threads)
        np.testing.assert_array_equal(got_dx, want_dx)
        np.testing.assert_array_equal(got_g, want_g)


@settings(max_examples=60, deadline=None)
@given(layer_shapes)
def test_backward_adds_in_the_documented_order(shape):
    """Bit for bit against the float32 sums in order (not a tolerance): the order is the contract
    that keeps models identical across thread counts and kernel versions."""
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    dy = rng.normal(size=(n_out, batch)).astype(np.float32)
    ones = np.ones(n_in, np.uint8), np.ones(n_out, np.uint8)
    for wide in (False, True):  # both weight-gradient loops, whatever the row lengths
        want_dx, want_g = backward_in_order_ref(layer, x, dy)
        g, dx = np.empty(layer.nnz, np.float32), np.full_like(x, 7.0)
        backward_rows(layer, x, dy, dx, g, *ones, True, wide)
        np.testing.assert_array_equal(g, want_g)
        np.testing.assert_array_equal(dx, np.where(x > 0, want_dx, 0))
    want_dx, want_g = backward_in_order_ref(layer, x, dy)  # through the loop the layer's rows pick
    dx = np.full_like(x, 7.0)
    kernels.sparse_backward(layer.indptr, layer.indices, layer.values, x, dy, dx, g, True)
    np.testing.assert_array_equal(dx, want_dx)
    np.testing.assert_array_equal(g, want_g)


@settings(max_examples=80, deadline=None)
@given(layer_shapes, st.floats(0, 1), st.floats(0, 1))
def test_backward_on_live_connections_gives_the_same_bits(shape, dead_in, dead_out):
    """Skipping dead neurons' connections (ReLU activations all zero in the batch) changes no bit of
    the weight gradient or of the masked input gradient; all-ones flags are always right."""
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = np.maximum(rng.normal(size=(n_in, batch)), 0).astype(np.float32)
    x[rng.random(n_in) < dead_in] = 0.0
    dy = rng.normal(size=(n_out, batch)).astype(np.float32)
    dy[rng.random(n_out) < dead_out] = 0.0
    want_dx, want_g = backward_in_order_ref(layer, x, dy)
    want_dx = np.where(x > 0, want_dx, 0)
    flags = [((x > 0).any(1).astype(np.uint8), (dy != 0).any(1).astype(np.uint8)),
             (np.ones(n_in, np.uint8), np.ones(n_out, np.uint8))]
    for alive_in, alive_out in flags:
        for threads in (1, 3):
            g, dx = np.full(layer.nnz, 7.0, np.float32), np.full_like(x, 7.0)
            kernels.sparse_backward_threads(layer.indptr, layer.indices, layer.values, x, dy, dx, g, alive_in,
                                            alive_out, True, threads)
            np.testing.assert_array_equal(g, want_g)
            np.testing.assert_array_equal(dx, want_dx)
        for wide in (False, True):
            g = np.full(layer.nnz, 7.0, np.float32)
            backward_rows(layer, x, dy, dx, g, alive_in, alive_out, False, wide)
            np.testing.assert_array_equal(g, backward_in_order_ref(layer, x, dy)[1])


@settings(max_examples=60, deadline=None)
@given(layer_shapes, st.floats(0, 1))
def test_forward_skipping_dead_inputs_gives_the_same_bits(shape, dead):
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    x[rng.random(n_in) < dead] = 0.0
    x[rng.random((n_in, batch)) < 0.1] = -0.0
    want = forward_in_order_ref(layer, x)
    out = np.full((n_out, batch), 7.0, np.float32)
    alive = (x != 0).any(1).astype(np.uint8)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, out, alive)
    np.testing.assert_array_equal(out, want)


def test_forward_at_a_batch_of_two_keeps_the_order_of_every_batch(rng):
    """Batches of two have their own loop (x's two values held in registers): the same bits as
    the twin and as the first two samples of a wider batch, -0 and dead inputs included."""
    layer, _ = random_layer(300, 200, 20.0, 5)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    x[::5] = 0.0
    x[1::7, 1] = -0.0
    x[2::9, 0] = np.nan
    alive = (x != 0).any(1).astype(np.uint8)
    two = np.ascontiguousarray(x[:, :2])
    out, wider = np.full((200, 2), 7.0, np.float32), np.full((200, 3), 7.0, np.float32)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, two, out, alive)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, wider, alive)
    np.testing.assert_array_equal(out.view(np.uint32), forward_in_order_ref(layer, two).view(np.uint32))
    np.testing.assert_array_equal(out.view(np.uint32), wider[:, :2].view(np.uint32))


@pytest.mark.parametrize("batch", [1, 3, 5, 15, 16, 17, 31, 32, 33, 100])
def test_forward_in_16_sample_windows_at_every_batch_size(batch, rng):
    """At a batch of 3 to 32 the rows add 16 samples at a time (``row_scatter``): the last window
    ends at the row's end, a batch under 16 runs into the next rows and leaves them as they were.
    The twin's bits at every batch size, -0 and NaN included, and nothing written past out (two
    guard rows of -0 after it in the same buffer, which a window's +0 lanes would turn into +0); the
    last output neuron has connections."""
    layer, _ = random_layer(40, 30, 6.0, batch)
    assert np.any(layer.indices == 29)
    x = rng.normal(size=(40, batch)).astype(np.float32)
    x[3, ::5] = np.nan
    x[7] = 0.0
    x[::4, 0] = -0.0
    alive = (x != 0).any(1).astype(np.uint8)
    buf = np.full(32 * batch, -0.0, np.float32)
    out = buf[:30 * batch].reshape(30, batch)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, out, alive)
    np.testing.assert_array_equal(out.view(np.uint32), forward_in_order_ref(layer, x).view(np.uint32))
    assert np.signbit(buf[30 * batch:]).all()


def test_relu_alive_flags_neurons_with_any_nonzero_value_and_keeps_nan():
    h = np.array([[-1, -2, 0], [-0.0, 0, -3], [np.nan, -1, -1], [0, 2, -1], [np.inf, 0, 0]], np.float32)
    alive = np.full(5, 7, np.uint8)
    kernels.relu_alive(h, alive)
    assert alive.tolist() == [0, 0, 1, 1, 1]  # NaN and inf stay alive, so they reach the loss
    want = np.array([[0, 0, 0], [-0.0, 0, 0], [np.nan, 0, 0], [0, 2, 0], [np.inf, 0, 0]], np.float32)
    np.testing.assert_array_equal(h, want)
    assert np.signbit(h[1, 0])  # -0 stays -0, as the comparison-based ReLU left it


def test_backward_on_live_connections_over_long_rows(rng):
    """A layer of short rows (the loop that skips dead outputs) with one row over every output."""
    n_in, n_out, batch = 3000, 2348, 9
    layer = erdos_renyi_layer(n_in, n_out, 1, rng)
    dense_row = np.arange(n_out, dtype=np.int32)  # input row 5 connects to every output
    indices = np.concatenate([layer.indices[:layer.indptr[5]], dense_row, layer.indices[layer.indptr[6]:]])
    indptr = layer.indptr.copy()
    indptr[6:] += n_out - (layer.indptr[6] - layer.indptr[5])
    layer = layer._replace(indptr=indptr, indices=indices, values=rng.normal(size=indices.size).astype(np.float32))
    assert not kernels.wide_rows(layer.indptr)
    x = np.maximum(rng.normal(size=(n_in, batch)), 0).astype(np.float32)
    x[rng.random(n_in) < 0.4] = 0.0
    x[5] = np.abs(x[5]) + 0.5  # the long row is alive
    dy = rng.normal(size=(n_out, batch)).astype(np.float32)
    dy[rng.random(n_out) < 0.3] = 0.0
    flags = (x > 0).any(1).astype(np.uint8), (dy != 0).any(1).astype(np.uint8)
    for wide in (False, True):
        want_dx, want_g = backward_in_order_ref(layer, x, dy)
        g, dx = np.empty(layer.nnz, np.float32), np.empty_like(x)
        backward_rows(layer, x, dy, dx, g, *flags, True, wide)
        np.testing.assert_array_equal(g, want_g)
        np.testing.assert_array_equal(dx, np.where(x > 0, want_dx, 0))


@settings(max_examples=60, deadline=None)
@given(layer_shapes, st.integers(1, 4), st.booleans())
def test_forward_by_columns_equals_serial_forward(shape, threads, relu):
    n_in, n_out, eps, batch, seed = shape
    layer, rng = random_layer(n_in, n_out, eps, seed)
    x = rng.normal(size=(n_in, batch)).astype(np.float32)
    colptr, rowidx, perm = np.empty(n_out + 1, np.int64), np.empty(layer.nnz, np.int32), np.empty(layer.nnz, np.int32)
    kernels.csc_from_csr(layer.indptr, layer.indices, colptr, rowidx, perm)
    for got, want in zip((colptr, rowidx, perm), csc_ref(layer)):
        np.testing.assert_array_equal(got, want)
    serial = np.empty((n_out, batch), np.float32)
    kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, serial, np.ones(n_in, np.uint8))
    np.testing.assert_array_equal(serial, forward_in_order_ref(layer, x))
    out = np.full_like(serial, 7.0)
    flags = np.full(n_out, 7, np.uint8)
    kernels.sparse_forward_threads(colptr, rowidx, perm, layer.values, layer.bias, x, out, relu, flags, threads)
    want = np.maximum(serial, 0) if relu else serial
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(flags, (want != 0).any(axis=1))  # relu_alive's flags
    kernels.sparse_forward_threads(colptr, rowidx, perm, layer.values, layer.bias, x, out, relu,
                                   np.empty(0, np.uint8), threads)  # no flags asked for
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("batch", [1, 15, 16, 17, 63, 64, 65, 100, 112, 127, 128, 129, 300])
def test_forward_rows_in_registers_at_every_batch_size(batch):
    """``forward_cols`` holds an output row in 16-sample chunks, up to ``FORWARD_GROUP`` samples a
    call, the last chunk masked: every split of the batch gives ``sparse_forward``'s bits, NaN
    and -0 pass the ReLU as they are, and nothing past the row is written. Its dead-neuron flags
    are those of the values written (``relu_alive``'s after the ReLU): NaN counts as alive, -0 as
    zero, and the masked lanes past the batch (which hold the bias) do not count."""
    layer, rng = random_layer(30, 25, 6.0, batch)
    layer.bias[:] = rng.normal(size=25).astype(np.float32)
    x = rng.normal(size=(30, batch)).astype(np.float32)
    colptr, rowidx, perm = np.empty(26, np.int64), np.empty(layer.nnz, np.int32), np.empty(layer.nnz, np.int32)
    kernels.csc_from_csr(layer.indptr, layer.indices, colptr, rowidx, perm)
    # Neuron 0: every weight and the bias +0, so all zero. Neuron 1: bias +1 but every sum negative,
    # so all zero after the ReLU, while its masked lanes would hold +1.
    layer.bias[0], layer.bias[1] = 0.0, 1.0
    layer.values[perm[colptr[0]:colptr[1]]] = 0.0
    layer.values[perm[colptr[1]:colptr[2]]] = -1.0
    x[rowidx[colptr[1]:colptr[2]]] = 1000.0
    others = np.setdiff1d(np.arange(30), rowidx[:colptr[2]])  # inputs of neither
    x[others[0], ::7] = np.nan
    x[others[1]] = -0.0
    want = forward_in_order_ref(layer, x)
    for relu in (False, True):
        out = np.full((27, batch), 7.0, np.float32)  # one guard row each side
        flags = np.full(25, 7, np.uint8)
        kernels.forward_cols(colptr, rowidx, perm, layer.values, layer.bias, x, out[1:26], 0, 25, relu, flags)
        expect = np.where(want < 0, np.float32(0), want) if relu else want
        np.testing.assert_array_equal(out[1:26].view(np.int32), expect.view(np.int32))
        assert np.all(out[[0, 26]] == 7.0)
        np.testing.assert_array_equal(flags, (expect != 0).any(axis=1))
        assert flags[0] == 0 and flags[1] == (0 if relu else 1)
        # Packed: only the rows with a value other than 0, in order, from row j0 of the share on;
        # the share's other rows and the rows past it are left as they were.
        for j0, j1 in ((0, 25), (0, 11), (11, 25)):
            out = np.full((27, batch), 7.0, np.float32)
            kept = np.full(25, -1, np.int64)
            end = kernels.forward_cols(colptr, rowidx, perm, layer.values, layer.bias, x, out[1:26], j0, j1, relu,
                                       np.empty(0, np.uint8), -1, kept)
            live = j0 + np.flatnonzero((expect[j0:j1] != 0).any(axis=1))
            assert end == j0 + live.shape[0]
            np.testing.assert_array_equal(kept[j0:end], live)
            np.testing.assert_array_equal(out[1 + j0:1 + end].view(np.int32), expect[live].view(np.int32))
            assert np.all(out[:1 + j0] == 7.0) and np.all(out[1 + j1:] == 7.0)


def test_join_shares_matches_numpy(rng):
    # Three threads' shares of 20 rows: 4 of rows 0:7 kept, none of 7:12, 5 of 12:20.
    out = rng.normal(size=(20, 6)).astype(np.float32)
    kept = rng.integers(0, 20, size=20).astype(np.int64)
    kept[:4], kept[12:17] = [0, 2, 3, 6], [12, 14, 15, 18, 19]
    held_inv, held_kinds = rng.random(20), rng.integers(1, 3, size=20).astype(np.int8)
    starts, ends = np.array([0, 7, 12]), np.array([4, 7, 17])
    next_rowidx = rng.integers(0, 20, size=30).astype(np.int32)
    want = join_shares_ref(out, kept, held_inv, held_kinds, starts, ends, next_rowidx)
    inv, kinds, slot = np.empty(20), np.empty(20, np.int8), np.empty(20, np.int32)
    next_rows = np.empty(30, np.int32)
    m = kernels.join_shares(out, kept, held_inv, held_kinds, starts, ends, inv, kinds, slot, next_rowidx, next_rows)
    assert m == want[6] == 9
    for got, w in zip((out[:m + 1], kept[:m], inv, kinds, slot, next_rows), (want[0][:m + 1], want[1][:m], *want[2:6])):
        np.testing.assert_array_equal(got, w)


def test_move_rows_matches_numpy(rng):
    a = rng.normal(size=(12, 5)).astype(np.float32)
    for src, dst0 in ((np.array([0, 2, 3, 7, 11]), 0), (np.array([6, 7, 9]), 4), (np.arange(12), 0)):
        got, want = a.copy(), a.copy()
        kernels.move_rows(got, src, dst0)
        want[dst0:dst0 + src.shape[0]] = a[src]
        np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_first_free_positions_and_kept_between_match_numpy(n_in, n_out, density, taken_share, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((n_in, n_out)) < density
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int32)
    free = np.flatnonzero(~mask.ravel())
    taken = np.sort(free[rng.random(free.shape[0]) < taken_share]).astype(np.int64)
    rest = np.setdiff1d(free, taken)
    for count in (0, rest.shape[0] // 2, rest.shape[0], rest.shape[0] + 3):
        out = np.full(count, -1, np.int64)
        got = kernels.first_free_positions(indptr, indices, n_out, taken, count, out)
        assert got == min(count, rest.shape[0])
        np.testing.assert_array_equal(out[:got], rest[:got])
    row_of = np.flatnonzero(rng.random(n_in) < 0.6).astype(np.int64)
    held = np.flatnonzero(rng.random(n_out) < 0.6)
    col_slot = np.full(n_out, held.shape[0], np.int64)
    col_slot[held] = np.arange(held.shape[0])
    want = int(mask[np.ix_(row_of, held)].sum())
    assert kernels.kept_between(indptr, indices, row_of, col_slot, held.shape[0]) == want


def test_train_batches_is_bit_identical_across_thread_counts(rng):
    """The parallel forward and backward paths of the fused loop give the serial bits (layers above
    the parallel threshold), with the CSC copy rebuilt by ``csc_all``; also when the largest layer is
    over the CSC limit and runs its forward pass serially by rows beside the others."""
    sizes = [200, 400, 400, 4]
    layers = [erdos_renyi_layer(sizes[l], sizes[l + 1], 20, rng) for l in range(3)]
    assert min(l.nnz for l in layers[:2]) * 100 >= kernels.PARALLEL_MIN_WORK
    X = rng.random((250, 200)).astype(np.float32)
    y = rng.integers(0, 4, 250)
    order = rng.permutation(250)
    results = []
    for threads, max_nnz in ((1, CSC_MAX_CONNECTIONS), (2, CSC_MAX_CONNECTIONS), (3, CSC_MAX_CONNECTIONS),
                             (2, max(l.nnz for l in layers) - 1)):
        net = PackedNet.from_layers(layers)
        csc = net.csc_buffers()
        kernels.csc_all(*net[:6], *csc, max_nnz)
        stride = row_stride(100)  # the rows of a batch of 100 lie 112 floats apart
        bufs = (net.activation_buffer(stride), np.empty(400 * stride, np.float32), np.empty(400 * stride, np.float32),
                np.empty(int(np.diff(net.nz_off).max()), np.float32), np.empty(400, np.float32))
        loss, correct = kernels.train_batches(X, y, order, 100, np.zeros(200, np.float32), np.ones(200, np.float32),
                                              *net,
                                              *bufs, *csc, np.float32(0.05), np.float32(0.9), np.float32(1e-4), threads)
        results.append((loss, correct, net.values.copy(), net.bias.copy(), net.velocity.copy()))
    for other in results[1:]:
        assert other[:2] == results[0][:2]
        for a, b in zip(other[2:], results[0][2:]):
            np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(0, 40), st.integers(0, 2**32 - 1))
def test_bias_gradient_adds_in_batch_order(n, batch, seed):  # 16 neurons and 16 samples at a time, and the rest
    rng = np.random.default_rng(seed)
    dy = rng.normal(size=(n, batch)).astype(np.float32)
    dead = rng.random(n) < 0.5
    dy[dead] = np.where(rng.random((int(dead.sum()), batch)) < 0.5, -0.0, 0.0)  # masked by the ReLU: +-0
    # The kernel's sums start at +0, so a row of -0s sums to +0: adding +0 to numpy's sum gives its bits.
    want = np.cumsum(dy, axis=1, dtype=np.float32)[:, -1] + np.float32(0) if batch else np.zeros(n, np.float32)
    for alive, chunk in ((np.ones(n, np.uint8), 64), ((~dead).astype(np.uint8), 64), ((~dead).astype(np.uint8), 3)):
        out = np.full(n, 7.0, np.float32)
        kernels.bias_gradient(dy, out, alive, np.empty(chunk, np.int64))
        np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))  # +0, not -0, where dead


def test_csc_all_leaves_layers_over_the_limit_without_a_copy(rng):
    layers = [erdos_renyi_layer(30, 50, 4, rng), erdos_renyi_layer(50, 6, 2, rng)]
    net = PackedNet.from_layers(layers)
    colptr, rowidx, perm = net.csc_buffers()
    kernels.csc_all(*net[:6], colptr, rowidx, perm, layers[1].nnz)  # the first layer is over the limit
    assert not colptr[:51].any()
    want_colptr, want_rows, want_perm = csc_ref(layers[1])
    np.testing.assert_array_equal(colptr[51:], want_colptr)
    np.testing.assert_array_equal(rowidx[layers[0].nnz:], want_rows)
    np.testing.assert_array_equal(perm[layers[0].nnz:], want_perm)
    from ctre_edge.packed import uses_csc
    assert uses_csc([CSC_MAX_CONNECTIONS + 1, CSC_MAX_CONNECTIONS]) and not uses_csc([CSC_MAX_CONNECTIONS + 1])


def test_forward_all_from_the_csc_copy_gives_the_same_bits(rng):
    """The topology update's sample forward pass reads the trainer's CSC copy where a layer has one
    and 8 or more connections per output (here the first and last layers; the second is over the
    copy's limit and the third too sparse, and both run by rows)."""
    layers = [erdos_renyi_layer(30, 50, 12, rng), erdos_renyi_layer(50, 40, 15, rng), erdos_renyi_layer(40, 20, 1, rng),
              erdos_renyi_layer(20, 5, 3, rng)]
    for layer in layers:
        layer.bias[:] = rng.normal(size=layer.n_out) * 0.1
    net = PackedNet.from_layers(layers)
    X = rng.normal(size=(70, 30)).astype(np.float32)
    rows = np.sort(rng.choice(70, 37, replace=False))
    shift, scale = np.zeros(30, np.float32), np.ones(30, np.float32)
    colptr, rowidx, perm = net.csc_buffers()
    limit = max(layers[0].nnz, layers[2].nnz, layers[3].nnz)
    kernels.csc_all(*net[:6], colptr, rowidx, perm, limit)
    assert layers[1].nnz > limit and layers[2].nnz < 8 * 20
    assert layers[0].nnz >= 8 * 50 and layers[3].nnz >= 8 * 5
    got, want = net.activation_buffer(37), net.activation_buffer(37)
    kernels.forward_all(X, rows, shift, scale, *net.forward, colptr, rowidx, perm, got)
    empty = np.empty(0, np.int32)
    kernels.forward_all(X, rows, shift, scale, *net.forward, np.empty(0, np.int64), empty, empty, want)
    np.testing.assert_array_equal(got, want)
    h = np.maximum(X[rows] @ dense_weights(layers[0]) + layers[0].bias, 0)
    np.testing.assert_allclose(got[30 * 37:80 * 37].reshape(50, 37), h.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [0, 1, 2, 15, 16, 17, 33, 100])
def test_weight_gradient_adds_in_16_lanes_then_a_fixed_tree(batch, rng):
    """The weight gradient's order (lanes b mod 16, a short last chunk, then the tree) at batch
    sizes around the lane width, in the wide loops on rows of 1 to 13 connections (the 4-at-a-time
    loop and its tail; dx as in the narrow loops) and in the loop that skips dead outputs (one
    connection at a time), bit for bit with -0 among the products. At a batch of two both are
    scalar code (``_backward_rows_of_two``), reached through ``backward_rows``."""
    lengths = np.array([1, 2, 3, 4, 5, 7, 8, 9] + [13] * 22)
    indices = np.concatenate([np.sort(rng.choice(50, n, replace=False)) for n in lengths]).astype(np.int32)
    layer = erdos_renyi_layer(30, 50, 1, rng)
    layer = layer._replace(
        indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(layer.indptr.dtype), indices=indices,
        values=rng.normal(size=indices.size).astype(np.float32))
    assert kernels.wide_rows(layer.indptr)
    x = np.maximum(rng.normal(size=(30, batch)), 0).astype(np.float32)
    x[::6] = -0.0  # dead input rows
    dy = (rng.normal(size=(50, batch)) * 1e3 ** rng.integers(-2, 3, size=(50, 1))).astype(np.float32)
    dy[::7] = -0.0
    want_dx, want_g = backward_in_order_ref(layer, x, dy)
    g = np.full(layer.nnz, 7.0, np.float32)
    kernels._weight_gradient_by_row(layer.indptr, layer.indices, x, dy, g, 0, 30, np.ones(30, np.uint8))
    np.testing.assert_array_equal(g.view(np.uint32), want_g.view(np.uint32))  # bits: +0 and -0 differ
    g, dx = np.full(layer.nnz, 7.0, np.float32), np.full_like(x, 7.0)  # and with dx, in the same pass
    kernels._backward_by_row(layer.indptr, layer.indices, layer.values, x, dy, dx, g, 0, 30, np.ones(30, np.uint8))
    np.testing.assert_array_equal(g.view(np.uint32), want_g.view(np.uint32))
    np.testing.assert_array_equal(dx.view(np.uint32), np.where(x > 0, want_dx, np.float32(0)).view(np.uint32))
    # A short last chunk is loaded under a mask and stored lane by lane: nothing past a row's end is written (the
    # next row may belong to another thread).
    dx = np.full_like(x, 7.0)
    kernels._backward_by_row(layer.indptr, layer.indices, layer.values, x, dy, dx, g, 3, 10, np.ones(30, np.uint8))
    np.testing.assert_array_equal(dx[3:10], np.where(x > 0, want_dx, 0)[3:10])
    assert (dx[:3] == 7).all() and (dx[10:] == 7).all()
    for alive_in, alive_out in (((x > 0).any(1), (dy != 0).any(1)), (np.ones(30), np.ones(50))):
        for wide in (False, True):  # one connection at a time, skipping dead outputs; four at a time
            g, dx = np.full(layer.nnz, 7.0, np.float32), np.full_like(x, 7.0)
            backward_rows(layer, x, dy, dx, g, alive_in.astype(np.uint8), alive_out.astype(np.uint8), True, wide)
            np.testing.assert_array_equal(g.view(np.uint32), want_g.view(np.uint32))
            np.testing.assert_array_equal(dx.view(np.uint32), np.where(x > 0, want_dx, np.float32(0)).view(np.uint32))
            g, dx = np.full(layer.nnz, 7.0, np.float32), np.full_like(x, 7.0)  # the weight gradient alone
            backward_rows(layer, x, dy, dx, g, alive_in.astype(np.uint8), alive_out.astype(np.uint8), False, wide)
            np.testing.assert_array_equal(g.view(np.uint32), want_g.view(np.uint32))
            assert (dx == 7).all()
    products = (x[layer.rows()] * dy[layer.indices]).astype(np.float32)
    in_order = np.cumsum(products, axis=1, dtype=np.float32)[:, -1] if batch else g
    if batch > 16:  # the lanes are a different order from the samples', and the test can tell
        assert not np.array_equal(g, in_order)


def padded(a, stride):
    """``a`` (n, nb) copied into rows ``stride`` floats apart whose padding is NaN, and that view."""
    buf = aligned_empty(a.shape[0] * stride).reshape(a.shape[0], stride)
    buf[:] = np.nan
    buf[:, :a.shape[1]] = a
    return buf


@pytest.mark.parametrize("nb", [2, 20, 64, 100, 130])
def test_kernels_on_padded_rows_give_the_packed_bits(nb, rng):
    """Every kernel that ``train_batches`` runs on rows at ``row_stride`` takes the samples as ``nb``:
    on rows padded with NaN it gives the bits it gives on packed rows, and never writes the padding."""
    stride = (nb + 15) // 16 * 16 + 16  # past the line, so a kernel reading the padding would see NaN
    wide, short = erdos_renyi_layer(40, 30, 20, rng), erdos_renyi_layer(40, 30, 1, rng)
    x = np.maximum(rng.normal(size=(40, nb)), 0).astype(np.float32)
    x[3] = 0.0  # a dead input
    dy = rng.normal(size=(30, nb)).astype(np.float32)

    def same(a, b):
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        np.testing.assert_array_equal(a.view(np.uint32) if a.dtype == np.float32 else a,
                                      b.view(np.uint32) if b.dtype == np.float32 else b)

    for layer in (wide, short):
        colptr, rowidx, perm = (np.empty(31, np.int64), np.empty(layer.nnz, np.int32), np.empty(layer.nnz, np.int32))
        kernels.csc_from_csr(layer.indptr, layer.indices, colptr, rowidx, perm)
        xp = padded(x, stride)
        alive_in = (x != 0).any(axis=1).astype(np.uint8)
        # forward: by output rows (one and two threads), by input rows, then ReLU, softmax
        for relu in (False, True):
            out, flags = np.empty((30, nb), np.float32), np.empty(30, np.uint8)
            kernels.forward_cols(colptr, rowidx, perm, layer.values, layer.bias, x, out, 0, 30, relu, flags)
            for threads in (1, 2):
                outp, flagsp = padded(np.zeros((30, nb), np.float32), stride), np.empty(30, np.uint8)
                kernels.sparse_forward_threads(colptr, rowidx, perm, layer.values, layer.bias, xp, outp, relu, flagsp,
                                               threads, nb)
                same(outp[:, :nb], out)
                same(flagsp, flags)
                assert np.isnan(outp[:, nb:]).all()
        out = np.empty((30, nb), np.float32)
        kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, x, out, alive_in)
        outp = padded(np.zeros((30, nb), np.float32), stride)
        kernels.sparse_forward(layer.indptr, layer.indices, layer.values, layer.bias, xp, outp, alive_in, nb)
        same(outp[:, :nb], out)
        assert np.isnan(outp[:, nb:]).all()
        flags, flagsp = np.empty(30, np.uint8), np.empty(30, np.uint8)
        kernels.relu_alive(out, flags)
        kernels.relu_alive(outp, flagsp, nb)
        same(outp[:, :nb], out)
        same(flagsp, flags)
        z, zp = out[:10].copy(), padded(out[:10], stride)
        kernels.softmax_inplace(z)
        kernels.softmax_inplace(zp, nb)
        same(zp[:, :nb], z)
        labels = rng.integers(0, 10, nb)
        got = kernels.softmax_xent_backward(z, labels, np.float32(1 / nb))
        gotp = kernels.softmax_xent_backward(zp, labels, np.float32(1 / nb), nb)
        assert got == gotp
        same(zp[:, :nb], z)
        assert np.isnan(zp[:, nb:]).all()
        # backward: weight and input gradients, wide and short rows, one and two threads
        dyp = padded(dy, stride)
        alive_out = (dy != 0).any(axis=1).astype(np.uint8)
        live = np.empty(kernels.LIVE_CHUNK, np.int64)
        for compute_dx in (False, True):
            grad, dx = np.empty(layer.nnz, np.float32), np.empty((40, nb), np.float32)
            kernels.sparse_backward_threads(layer.indptr, layer.indices, layer.values, x, dy, dx, grad, alive_in,
                                            alive_out, compute_dx, 1)
            for threads in (1, 2):
                gradp, dxp = np.empty(layer.nnz, np.float32), padded(np.zeros((40, nb), np.float32), stride)
                kernels.sparse_backward_threads(layer.indptr, layer.indices, layer.values, xp, dyp, dxp, gradp,
                                                alive_in, alive_out, compute_dx, threads, nb)
                same(gradp, grad)
                if compute_dx:
                    same(dxp[:, :nb], dx)
                assert np.isnan(dxp[:, nb:]).all()
        bg, bgp = np.empty(30, np.float32), np.empty(30, np.float32)
        kernels.bias_gradient(dy, bg, alive_out, live)
        kernels.bias_gradient(dyp, bgp, alive_out, live, nb)
        same(bgp, bg)


def test_row_stride_pads_large_batches_to_whole_lines():
    assert [row_stride(n) for n in (1, 2, 63, 64, 65, 100, 112, 113)] == [1, 2, 63, 64, 80, 112, 112, 128]
    assert all(kernels.row_stride(n) == row_stride(n) for n in range(1, 600))  # the compiled twin
    assert aligned_empty(1000).ctypes.data % 64 == 0
