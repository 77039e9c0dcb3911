import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ctre_edge.evolve import TopologyPolicy, drop_weakest, update_layer
from ctre_edge.layers import check_layer, erdos_renyi_layer, linear_positions
from ctre_edge.train import PackedNet, TrainConfig


def net_of(sizes, eps, seed):
    rng = np.random.default_rng(seed)
    net = PackedNet([erdos_renyi_layer(sizes[l], sizes[l + 1], eps, rng) for l in range(len(sizes) - 1)])
    net.velocity[:] = rng.normal(size=net.velocity.shape)
    return net, rng


def test_drop_weakest_removes_smallest_magnitudes():
    values = np.array([0.5, -0.1, 0.3, 0.1, -0.9, 0.0], np.float32)
    keep = drop_weakest(values, 3, np.random.default_rng(0))
    # |w| = .5 .1 .3 .1 .9 0: the three smallest are 0, and the two 0.1s
    np.testing.assert_array_equal(keep, [True, False, True, False, True, False])


def test_drop_weakest_breaks_ties_by_seed():
    values = np.ones(100, np.float32)
    a = drop_weakest(values, 10, np.random.default_rng(1))
    b = drop_weakest(values, 10, np.random.default_rng(1))
    c = drop_weakest(values, 10, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(2, 60), st.floats(0.3, 30), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_set_update_keeps_nnz_and_structure(n_in, n_out, eps, zeta, seed):
    net, rng = net_of([n_in, n_out], eps, seed)
    before = net.layer(0)
    old_pos = linear_positions(before)
    old_vals = before.values.copy()
    k = int(np.floor(zeta * before.nnz))
    keep = drop_weakest(old_vals, k, np.random.default_rng(seed))  # what the update will keep
    changed, n_cos, n_rand = update_layer(net, 0, zeta, np.random.default_rng(seed))
    after = net.layer(0)
    check_layer(after)
    assert after.nnz == before.nnz
    new_pos = linear_positions(after)
    assert n_cos == 0 and changed == n_rand <= k
    # Kept connections keep weight and momentum; grown ones start with zero momentum and U(-b, b).
    kept = np.isin(new_pos, old_pos[keep])
    assert kept.sum() == keep.sum()
    np.testing.assert_array_equal(after.values[kept], old_vals[keep])
    assert np.all(net.velocity[~kept] == 0)
    assert np.all(np.abs(after.values[~kept]) <= np.sqrt(6 / n_in))


def test_policy_static_changes_nothing_and_set_changes_zeta(rng):
    for method, expect in (("static", 0), ("set", int(0.2 * 1784))):
        net, _ = net_of([784, 1000], 1, 0)
        snap = net.snapshot()[0]
        policy = TopologyPolicy(TrainConfig(method=method), None, None, None, None)
        changed, _, _ = policy.update(net, 0, 0.5, rng)
        assert changed == expect
        if method == "static":
            np.testing.assert_array_equal(net.layer(0).indices, snap.indices)
        assert net.layer(0).nnz == snap.nnz


def test_update_of_a_dense_layer_regrows_only_where_it_dropped():
    net, rng = net_of([4, 5], 100, 0)  # dense: 20 of 20 positions
    changed, _, _ = update_layer(net, 0, 0.2, rng)
    check_layer(net.layer(0))
    assert changed == 4 and net.layer(0).nnz == 20
