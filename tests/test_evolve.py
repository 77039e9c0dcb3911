import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import locate_picks_ref, merged_csr_ref, split_kept_ref

from ctre_edge import kernels, similarity
from ctre_edge.config import TrainConfig
from ctre_edge.evolve import TopologyPolicy, drop_weakest, sample_activations, sample_levels, update_layer
from ctre_edge.layers import check_layer, csr_from_positions, erdos_renyi_layer, linear_positions, sample_positions
from ctre_edge.packed import PackedNet, level_views, no_csc


def net_of(sizes, eps, seed):
    rng = np.random.default_rng(seed)
    net = PackedNet.from_layers([erdos_renyi_layer(sizes[l], sizes[l + 1], eps, rng) for l in range(len(sizes) - 1)])
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


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 300), st.floats(0, 1), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_drop_weakest_equals_a_full_sort(n, zeta, levels, seed):
    """The partition gives the set a full sort by (|w|, random key, index) gives, with many ties."""
    rng = np.random.default_rng(seed)
    values = (rng.integers(-levels, levels + 1, size=n) / 4).astype(np.float32)  # few distinct |w|, +-0
    k = int(zeta * n)
    key_rng = np.random.default_rng(seed + 1)
    want = np.ones(n, dtype=bool)
    if k:
        want[np.lexsort((key_rng.random(n), np.abs(values)))[:k]] = False
    got_rng = np.random.default_rng(seed + 1)
    np.testing.assert_array_equal(drop_weakest(values, k, got_rng), want)
    assert got_rng.random() == key_rng.random()  # the same draws, so the run's stream is unchanged


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 1), st.floats(0, 1), st.integers(0, 2**32 - 1))
def test_merging_the_grown_connections_equals_sorting_everything(n_in, n_out, kept_share, new_share, seed):
    rng = np.random.default_rng(seed)
    total = n_in * n_out
    kept = np.sort(sample_positions(total, int(kept_share * total), np.empty(0, np.int64), rng))
    new = sample_positions(total, int(new_share * (total - kept.shape[0])), kept, rng)
    got = merged_csr_ref(n_in, n_out, kept, new)
    want = csr_from_positions(n_in, n_out, np.concatenate([kept, new]))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # the kernel that the update runs: the same CSR arrays, weights and momenta in that order
    vals, vel = rng.normal(size=(2, kept.shape[0] + new.shape[0])).astype(np.float32)
    indptr, indices = np.empty(n_in + 1, np.int64), np.empty(kept.shape[0] + new.shape[0], np.int32)
    out_vals, out_vel = np.empty_like(vals), np.empty_like(vel)
    n_kept = kept.shape[0]
    kernels.merge_topology(n_out, kept, vals[:n_kept], vel[:n_kept], new, np.argsort(new), vals[n_kept:], vel[n_kept:],
                           indptr, indices, out_vals, out_vel)
    np.testing.assert_array_equal(indptr, want[0])
    np.testing.assert_array_equal(indices, want[1])
    np.testing.assert_array_equal(out_vals, vals[want[2]])
    np.testing.assert_array_equal(out_vel, vel[want[2]])


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.3, 30), st.floats(0, 1), st.floats(0, 1),
       st.integers(0, 2**32 - 1))
def test_split_and_locate_kernels_equal_their_numpy_twins(n_in, n_out, eps, drop_share, pick_share, seed):
    net, rng = net_of([n_in, n_out], eps, seed)
    layer, velocity = net.layer(0), net.layer_velocity(0)
    keep = rng.random(layer.nnz) >= drop_share
    n_kept = int(keep.sum())
    out = (np.empty(n_kept, np.int64), np.empty(n_in + 1, np.int64), np.empty(n_kept, np.int32),
           np.empty(n_kept, np.float32), np.empty(n_kept, np.float32))
    kernels.split_kept(layer.indptr, layer.indices, layer.values, velocity, keep, n_out, *out)
    for got, want in zip(out, split_kept_ref(layer, velocity, keep)):
        np.testing.assert_array_equal(got, want)
    # Picks: distinct positions not kept, some of them just removed, in a random (rank) order.
    kept_pos = out[0]
    free = np.setdiff1d(np.arange(n_in * n_out), kept_pos)
    picks = rng.permutation(free)[:int(pick_share * free.shape[0])]
    where, excluded = np.empty(picks.shape[0], np.int64), np.empty(layer.nnz + picks.shape[0], np.int64)
    n_fresh = kernels.locate_picks(picks, np.argsort(picks), layer.indptr, layer.indices, keep, n_out, where, excluded)
    want_where, want_excluded = locate_picks_ref(layer, keep, picks)
    np.testing.assert_array_equal(where, want_where)
    assert n_fresh == int((want_where < 0).sum())
    np.testing.assert_array_equal(excluded[:layer.nnz + n_fresh], want_excluded)
    dropped = np.empty(layer.nnz - n_kept, np.int64)
    kernels.dropped_positions(layer.indptr, layer.indices, keep, n_out, dropped)
    np.testing.assert_array_equal(dropped, linear_positions(layer)[~keep])


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


def picker(a_in, a_out):
    from ctre_edge.similarity import topk_cosine

    return lambda indptr, indices, k, dropped: topk_cosine(a_in, a_out, indptr, indices, k)[:2]


def _activations(net, rng, s=40):
    """Random ReLU-like activations for every level, with some dead (all-zero) neurons."""
    acts = [np.maximum(rng.normal(size=(int(n), s)), 0).astype(np.float32) for n in net.sizes]
    for a in acts:
        a[rng.random(a.shape[0]) < 0.1] = 0
    return acts


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.floats(0.5, 15), st.integers(0, 2**32 - 1))
def test_ctre_sim_invariants(n_in, n_out, eps, seed):
    from ctre_edge.similarity import topk_cosine

    net, rng = net_of([n_in, n_out], eps, seed)
    before = net.layer(0)
    old_pos = linear_positions(before)
    k = int(np.floor(0.3 * before.nnz))
    acts = _activations(net, rng)
    # Replay the update's own random stream to know D and the cosine picks.
    replay = np.random.default_rng(seed + 1)
    keep = drop_weakest(before.values.copy(), k, replay)
    kept, removed = old_pos[keep], old_pos[~keep]
    changed, n_cos, n_rand = update_layer(net, 0, 0.3, np.random.default_rng(seed + 1), picker(acts[0], acts[1]))
    after = net.layer(0)
    check_layer(after)
    new_pos = linear_positions(after)
    assert after.nnz == before.nnz and changed == k == n_cos + n_rand
    grown = np.setdiff1d(new_pos, kept)
    assert grown.shape[0] == k and not np.isin(grown, kept).any()
    if k == 0:
        return
    from ctre_edge.layers import csr_from_positions

    ip, ix, _ = csr_from_positions(n_in, n_out, kept)
    rows, cols, _ = topk_cosine(acts[0], acts[1], ip, ix, k)
    picks = rows * n_out + cols
    readded = np.isin(picks, removed)
    free_elsewhere = n_in * n_out - np.unique(np.concatenate([kept, picks, removed])).shape[0]
    # Every cosine pick outside D is grown; each re-added one is replaced by exactly one random
    # position outside kept, picks and D (while such positions exist).
    assert np.isin(picks[~readded], grown).all()
    assert n_rand == min(int(readded.sum()), free_elsewhere)
    random_part = np.setdiff1d(grown, picks)
    assert random_part.shape[0] == n_rand and not np.isin(random_part, removed).any()


def test_ctre_seq_readds_with_old_weight_and_switches_after_patience():
    net, rng = net_of([30, 20], 3, 5)
    config = TrainConfig(method="ctre-seq", patience=3, similarity_samples=10)
    X = rng.random((50, 30)).astype(np.float32)
    policy = TopologyPolicy(config, X, np.arange(50), np.zeros(30, np.float32), np.ones(30, np.float32))
    vals = [0.5, 0.6, 0.6, 0.55, 0.6]  # best 0.6 at epoch 1; no strict improvement for 3 epochs after
    grown = []
    for epoch, v in enumerate(vals):
        grown.append(policy.update(net, epoch, v, rng))
        check_layer(net.layer(0))
    assert [g[1] > 0 for g in grown] == [True, True, True, True, False]
    assert grown[-1][2] == grown[-1][0] > 0  # random from then on, as SET


def test_ctre_seq_readded_connection_keeps_weight_and_momentum():
    net, rng = net_of([6, 5], 3, 2)
    acts = _activations(net, rng)
    # Make the layer's weakest connection the single most similar pair, so cosine re-adds it.
    layer = net.layer(0)
    p = int(np.argmin(np.abs(layer.values)))
    i, j = int(layer.rows()[p]), int(layer.indices[p])
    acts[0][i] = acts[1][j] = np.linspace(1, 2, acts[0].shape[1])
    old_w, old_v = float(layer.values[p]), float(net.velocity[p])
    update_layer(net, 0, 1 / layer.nnz + 1e-9, rng, picker(acts[0], acts[1]), readd=True)
    after = net.layer(0)
    q = np.flatnonzero((after.rows() == i) & (after.indices == j))
    assert q.shape == (1,) and after.values[q[0]] == old_w and net.velocity[q[0]] == old_v


def test_the_policy_table_is_the_method_list():
    from ctre_edge.config import METHODS
    from ctre_edge.evolve import POLICIES, SCORES

    assert tuple(POLICIES) == tuple(SCORES) == METHODS


def packed_level(a):
    """``a`` with only its live rows, packed, as ``sample_activations`` gives a level."""
    inv, kinds = similarity.neuron_stats(a)
    live = np.flatnonzero(kinds != kernels.KIND_ZERO)
    return similarity.LiveLevel(np.ascontiguousarray(a[live]), live, inv, kinds)


@pytest.mark.parametrize("csc_for", ["every layer", "some layers"])
def test_sample_activations_on_threads_give_the_same_bits(csc_for):
    # Every layer has a CSC copy: each thread packs the live rows of its share of the outputs as it
    # writes them, and the next layer reads the packed rows. Some layers only (the second is over
    # the copy's limit): the levels are computed whole, then packed.
    rng = np.random.default_rng(4)
    layers = [erdos_renyi_layer(30, 50, 12, rng), erdos_renyi_layer(50, 40, 15, rng), erdos_renyi_layer(40, 5, 3, rng)]
    for layer in layers:
        layer.bias[:] = rng.normal(size=layer.n_out) * 0.1
    layers[0].bias[:7] = -100.0  # neurons zero over every sample, which no level holds
    layers[1].bias[30:] = -100.0
    net = PackedNet.from_layers(layers)
    X = rng.normal(size=(90, 30)).astype(np.float32)
    X[:, 3] = 0.0  # an input zero over every sample
    shift, scale = np.zeros(30, np.float32), np.ones(30, np.float32)
    csc = net.csc_buffers()
    kernels.csc_all(*net[:6], *csc, max(l.nnz for l in layers) if csc_for == "every layer"
                    else max(layers[0].nnz, layers[2].nnz))
    assert (csc[0][51 + 40] == 0) == (csc_for == "some layers") and csc[0][-1] > 0
    rows = np.sort(np.random.default_rng(9).choice(np.arange(90), size=61, replace=False))
    act = net.activation_buffer(61)
    kernels.forward_all(X, rows, shift, scale, *net.forward, *no_csc(), act)
    want = [packed_level(a) for a in level_views(act, net.sizes, 61)]
    assert [w.live.shape[0] for w in want] == [29, 43, 30, 5]
    for threads in (1, 2, 3):
        got = sample_activations(net, X, np.arange(90), shift, scale, 61, np.random.default_rng(9), csc, threads)
        # The pipelined update's way: levels 1 and up on one thread, one level at a time.
        one_by_one = list(sample_levels(net, X, np.arange(90), shift, scale, 61, np.random.default_rng(9), csc,
                                        threads, later_threads=1))
        for levels in (got, one_by_one):
            assert len(levels) == len(want)
            for g, w in zip(levels, want):
                for name, x, y in zip(w._fields, g, w):
                    np.testing.assert_array_equal(x, y, err_msg=name)
    bad = X.copy()
    bad[7] = np.inf
    with pytest.raises(ValueError, match="Inf or NaN"):
        sample_activations(net, bad, np.arange(90), shift, scale, 90, np.random.default_rng(9), csc, 2)
    # A lent buffer holds them where it is large enough (the trainer lends its validation buffer).
    n = int(net.sizes.sum()) * 61
    for scratch, inside in ((np.full(n + 5, np.nan, np.float32), True), (np.full(n - 1, np.nan, np.float32), False)):
        got = sample_activations(net, X, np.arange(90), shift, scale, 61, np.random.default_rng(9), csc, 2, scratch)
        assert all(np.shares_memory(g.a, scratch) == inside for g in got)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.a, w.a)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.floats(0.3, 20), st.floats(0.05, 1), st.integers(0, 2**32 - 1))
def test_picks_scored_before_the_drop_equal_picks_scored_after_it(n_in, n_out, eps, zeta, seed):
    from ctre_edge.similarity import merge_dropped, topk_cosine

    net, rng = net_of([n_in, n_out], eps, seed)
    layer = net.layer(0)
    acts = _activations(net, rng, s=12)
    # Repeated neurons tie their scores: the rank order's position rule must hold across the merge.
    acts[0][rng.random(n_in) < 0.3] = acts[0][0]
    acts[1][rng.random(n_out) < 0.3] = acts[1][0]
    k = int(np.floor(zeta * layer.nnz))
    keep = drop_weakest(layer.values.copy(), k, rng)
    kept = linear_positions(layer)[keep]
    ip, ix, _ = csr_from_positions(n_in, n_out, kept)
    want = topk_cosine(acts[0], acts[1], ip, ix, k)[:2]
    free = min(k, n_in * n_out - layer.nnz)
    before = topk_cosine(acts[0], acts[1], layer.indptr, layer.indices, free)
    dropped = linear_positions(layer)[~keep]
    for levels in ((packed_level(acts[0]), packed_level(acts[1])),
                   (similarity.LiveLevel.whole(acts[0]), similarity.LiveLevel.whole(acts[1]))):
        got = merge_dropped(*levels, *before, dropped, k)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("method", ["ctre-sim", "ctre-seq"])
@pytest.mark.parametrize("whole_layers", [True, False])
def test_exact_update_gives_the_same_network_on_any_thread_count(method, whole_layers, monkeypatch):
    # On 2 or more threads the layers are scored whole, all at once, before the drops
    # (similarity.topk_cosine_layers) where that splits the work evenly enough, else layer after
    # layer after each drop, each split over the threads; on one thread, layer after layer. Dead
    # neurons make the scoring run on the live ones.
    import numba

    from ctre_edge import evolve

    whole = []
    monkeypatch.setattr(evolve, "topk_cosine_layers",
                        lambda *a, **kw: whole.append(1) or similarity.topk_cosine_layers(*a, **kw))
    monkeypatch.setattr(evolve, "WHOLE_LAYERS_BALANCE", np.inf if whole_layers else 0.0)
    rng = np.random.default_rng(11)
    sizes = [40, 60, 50, 45, 4]
    X = np.maximum(rng.normal(size=(120, 40)), 0).astype(np.float32)
    X[:, :10] = 0  # dead inputs
    config = TrainConfig(method=method, similarity_samples=80, patience=5)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):  # numba's pool has as many threads as cores, 2 in CI
            numba.set_num_threads(threads)
            net, _ = net_of(sizes, 4, 5)
            policy = TopologyPolicy(config, X, np.arange(120), np.zeros(40, np.float32), np.ones(40, np.float32))
            for epoch in range(3):
                policy.update(net, epoch, 0.5, np.random.default_rng(epoch))
            results.append(net)
    finally:
        numba.set_num_threads(before)
    assert len(whole) == (3 if whole_layers else 0)  # each update on 2 threads, or none
    for a, b in zip(results[1][:8], results[0][:8]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("whole_layers", [True, False])
def test_exact_update_gives_the_same_network_with_either_prefilter(whole_layers, monkeypatch):
    # The 8-bit prefilter (levels quantized once, similarity.with_codes) and the float32 one only
    # bound the scores; the canonical rescoring picks, so the networks are the same bit for bit.
    import numba

    from ctre_edge import evolve

    monkeypatch.setattr(evolve, "WHOLE_LAYERS_BALANCE", np.inf if whole_layers else 0.0)
    monkeypatch.setattr(evolve, "uses_int8_codes", lambda *a: True)  # this network is below the size for it
    rng = np.random.default_rng(13)
    X = np.maximum(rng.normal(size=(120, 40)), 0).astype(np.float32)
    X[:, :10] = 0  # dead inputs
    product, calls, results = similarity.int8_product(), [], []
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        for counted in ([lambda *a: calls.append(1) or product(*a)], [None]):
            monkeypatch.setattr(similarity, "_INT8_PRODUCT", counted)
            net, _ = net_of([40, 60, 50, 45, 4], 4, 5)
            policy = TopologyPolicy(TrainConfig(method="ctre-sim", similarity_samples=80), X, np.arange(120),
                                    np.zeros(40, np.float32), np.ones(40, np.float32))
            for epoch in range(3):
                policy.update(net, epoch, 0.5, np.random.default_rng(epoch))
            results.append(net)
    finally:
        numba.set_num_threads(before)
    # The 8-bit path ran in the first run: in every update, on each of the three layers that have
    # free positions between live neurons before the drop (the output layer is full then).
    assert len(calls) >= 3 * 3
    for a, b in zip(results[0][:8], results[1][:8]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["ctre-sim", "ctre-seq"])
def test_pipelined_update_gives_the_same_network(method, monkeypatch):
    # After an update that scored the layers whole, the next computes the sample's later levels on
    # one thread while the first layer is scored (evolve.sample_levels, topk_cosine_layers(feed=)):
    # the same networks as sampling first, and as on 1 thread, with dead neurons.
    import numba

    from ctre_edge import evolve

    later = []
    monkeypatch.setattr(evolve, "sample_levels", lambda *a, **kw: later.append(kw.get("later_threads"))
                        or sample_levels(*a, **kw))
    rng = np.random.default_rng(12)
    X = np.maximum(rng.normal(size=(150, 40)), 0).astype(np.float32)
    X[:, :8] = 0  # dead inputs
    results = {}
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            for pipelined in (False, True):
                net, _ = net_of([40, 60, 50, 45, 4], 4, 5)
                net.bias[:20] = -100.0  # dead neurons in the first hidden level
                csc = net.csc_buffers()
                policy = TopologyPolicy(TrainConfig(method=method, similarity_samples=90, patience=5), X,
                                        np.arange(150), np.zeros(40, np.float32), np.ones(40, np.float32))
                for epoch in range(4):
                    kernels.csc_all(*net[:6], *csc, 10**6)
                    policy.balance = 1.0 if pipelined else None
                    policy.update(net, epoch, 0.5, np.random.default_rng(epoch), csc)
                results[threads, pipelined] = net
    finally:
        numba.set_num_threads(before)
    assert later.count(1) == 4  # every pipelined update on 2 threads (on 1, layers are never scored whole)
    for key, net in results.items():
        for a, b in zip(net[:8], results[1, False][:8]):
            np.testing.assert_array_equal(a, b, err_msg=str(key))


def test_layers_balance_is_the_longest_share_over_an_even_one():
    from ctre_edge.similarity import layers_balance

    assert layers_balance([292, 174, 105, 3], 2) == pytest.approx(292 * 2 / 574)
    assert layers_balance([998, 971, 605, 10], 2) == pytest.approx((971 + 605) * 2 / 2584)
    assert layers_balance([5, 5], 1) == 1.0 and layers_balance([0, 0], 2) == 0.0


def test_update_with_a_hidden_level_dead_over_the_whole_sample():
    # No row of the first hidden level is held: the next layer reads only the row of zeros, and every
    # pick of the layers beside it is a position of score 0, taken in position order.
    import numba

    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            rng = np.random.default_rng(1)
            layers = [erdos_renyi_layer(20, 30, 5, rng), erdos_renyi_layer(30, 25, 5, rng),
                      erdos_renyi_layer(25, 3, 3, rng)]
            layers[0].bias[:] = -100.0
            net = PackedNet.from_layers(layers)
            csc = net.csc_buffers()
            kernels.csc_all(*net[:6], *csc, 10**6)
            X = np.abs(rng.normal(size=(50, 20))).astype(np.float32)
            policy = TopologyPolicy(TrainConfig(method="ctre-sim", similarity_samples=40), X, np.arange(50),
                                    np.zeros(20, np.float32), np.ones(20, np.float32))
            for epoch in range(3):
                policy.update(net, epoch, 0.5, np.random.default_rng(epoch), csc)
                kernels.csc_all(*net[:6], *csc, 10**6)
            for l in range(3):
                check_layer(net.layer(l))
            results.append(net)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
