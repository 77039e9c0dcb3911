"""Tests for ctre_edge.similarity and its numba kernels (ctre_edge.kernels).

Every kernel is checked against a plain numpy reference written here, and the blocked top-k against
the dense ``topk_cosine_reference``, position for position. The sketch-recall test prints the
recall-vs-dim table quoted in ``CosineSketch``'s docstring:

    python -m pytest tests/test_similarity.py -k recall -s
"""

import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import canonical_scores_reference, pair_lane_sum, rescore_topk, topk_cosine_reference

from ctre_edge import kernels as ks
from ctre_edge import similarity
from ctre_edge.similarity import CosineSketch, _topk_cosine, topk_cosine

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


# ---------------------------------------------------------------- helpers and numpy references


def random_csr(n_in, n_out, nnz, rng):
    """CSR of ``nnz`` distinct positions drawn uniformly, columns ascending in each row."""
    positions = np.sort(rng.choice(n_in * n_out, size=nnz, replace=False))
    indptr = np.zeros(n_in + 1, np.int64)
    np.add.at(indptr, positions // n_out + 1, 1)
    return np.cumsum(indptr), (positions % n_out).astype(np.int32)


def packed_level(a):
    """``a`` as ``evolve.sample_activations`` gives a level: its live rows only, packed."""
    inv, kinds = similarity.neuron_stats(a)
    live = np.flatnonzero(kinds != ks.KIND_ZERO)
    return similarity.LiveLevel(np.ascontiguousarray(a[live]), live, inv, kinds)


def assert_same_topk(got, expected):
    for name, g, e in zip(("rows", "cols", "scores"), got, expected):
        assert g.dtype == e.dtype, name
        np.testing.assert_array_equal(g, e, err_msg=name)


def squared_norms_reference(a):
    return pair_lane_sum(a, a)


def inverse_norms_reference(a):
    sq = squared_norms_reference(a)
    with np.errstate(divide="ignore"):
        return np.where(sq > 0, 1.0 / np.sqrt(sq), 0.0)


def neuron_kinds_reference(a, inv):
    m = np.abs(a.astype(np.float64))
    nonzero = np.where(m != 0, m, np.inf)
    signed = (a < 0).any(axis=1)
    low, high = nonzero.min(axis=1, initial=np.inf), m.max(axis=1, initial=0.0)
    odd = (low < 2.0**-30) | (high > 2.0**30) | (inv < 2.0**-30)
    wide = (low >= 2.0**-96) & (low < 2.0**-30) & (high >= 2.0**-30) & (high <= 2.0**30) & ~signed & (inv >= 2.0**-30)
    kinds = np.where(signed, ks.KIND_SIGNED, ks.KIND_NONNEG)
    kinds = np.where(odd, np.where(wide, ks.KIND_WIDE, ks.KIND_IRREGULAR), kinds)
    return np.where(inv == 0, ks.KIND_ZERO, kinds).astype(np.int8)


def splitmix64_reference(x):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def projection_reference(sample_ids, seed, dim):
    words = (dim + 63) // 64
    key = splitmix64_reference(np.array([seed], np.uint64))
    counters = sample_ids.astype(np.uint64)[:, None] * np.uint64(words) + np.arange(words, dtype=np.uint64)
    bits = splitmix64_reference(key ^ splitmix64_reference(counters))  # (B, words)
    d = np.arange(dim)
    sign = (bits[:, d // 64] >> (d % 64).astype(np.uint64)) & np.uint64(1)
    scale = np.float32(1.0 / np.sqrt(dim))
    return np.where(sign == 1, -scale, scale).astype(np.float32)


def activations(kind, n, n_samples, rng):
    """Activation matrices that stress one path of the prefilter (see neuron_kinds)."""
    if kind == "relu":
        return np.maximum(rng.standard_normal((n, n_samples)), 0).astype(np.float32)
    if kind == "signed":
        return rng.standard_normal((n, n_samples)).astype(np.float32)
    if kind == "integer":  # small integers: many exactly equal scores
        return rng.integers(-1, 3, (n, n_samples)).astype(np.float32)
    if kind == "duplicated":  # copies and power-of-two multiples of two rows: exact ties
        base = rng.integers(0, 3, (2, n_samples)).astype(np.float32)
        return (base[rng.integers(0, 2, n)] * 2.0 ** rng.integers(-2, 3, n)[:, None]).astype(np.float32)
    if kind == "irregular":  # values outside [2**-30, 2**30] on some neurons
        a = rng.standard_normal((n, n_samples)).astype(np.float32)
        a *= np.float32(2.0) ** rng.choice([0, 0, -45, 40], n)[:, None].astype(np.float32)
        return a
    if kind == "wide":  # softmax-like: nonnegative, some neurons near 0 on some samples (KIND_WIDE)
        a = np.abs(rng.standard_normal((n, n_samples))).astype(np.float32)
        tiny = rng.random((n, n_samples)) < 0.3
        a[tiny] *= np.float32(2.0) ** -rng.integers(20, 100, int(tiny.sum())).astype(np.float32)
        return a
    raise AssertionError(kind)


KINDS = ["relu", "signed", "integer", "duplicated", "irregular", "wide"]


# ---------------------------------------------------------------- kernels vs numpy


@given(
    seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS), n=st.integers(1, 9), s=st.integers(0, 40)
)
@settings(max_examples=60, deadline=None)
def test_inverse_norms_and_kinds_match_numpy(seed, kind, n, s):
    rng = np.random.default_rng(seed)
    a = activations(kind, n, s, rng)
    a[rng.random(n) < 0.3] = 0  # dead neurons
    a = np.where((a == 0) & (rng.random(a.shape) < 0.5), np.float32(-0.0), a)  # -0.0 is not negative
    inv = np.empty(n)
    ks.inverse_norms(a, np.arange(n, dtype=np.int64), inv)
    np.testing.assert_array_equal(inv, inverse_norms_reference(a))
    kinds = np.empty(n, np.int8)
    ks.neuron_kinds(a, inv, kinds)
    np.testing.assert_array_equal(kinds, neuron_kinds_reference(a, inv))


LO, WIDE, HI = np.float32(2.0**-30), np.float32(2.0**-96), np.float32(2.0**30)
BELOW_LO, BELOW_WIDE = np.nextafter(LO, np.float32(0)), np.nextafter(WIDE, np.float32(0))
ABOVE_HI = np.nextafter(HI, np.float32(np.inf))


@pytest.mark.parametrize("rows, expected", [
    # The regular range [2**-30, 2**30]; a value just below it makes a nonnegative neuron wide.
    ([[-0.0, 1.0], [LO, 1.0], [BELOW_LO, 1.0], [HI, 1.0], [ABOVE_HI, 1.0], [-LO, 1.0], [0.0, 0.0]],
     [ks.KIND_NONNEG, ks.KIND_NONNEG, ks.KIND_WIDE, ks.KIND_NONNEG, ks.KIND_IRREGULAR, ks.KIND_SIGNED, ks.KIND_ZERO]),
    # The wide range: least value at least 2**-96, largest in the regular range, none negative.
    ([[WIDE, LO], [BELOW_WIDE, LO], [WIDE, BELOW_LO], [WIDE, HI], [WIDE, ABOVE_HI], [-WIDE, LO], [WIDE, -1.0]],
     [ks.KIND_WIDE, ks.KIND_IRREGULAR, ks.KIND_IRREGULAR, ks.KIND_WIDE, ks.KIND_IRREGULAR, ks.KIND_IRREGULAR,
      ks.KIND_IRREGULAR]),
])
def test_neuron_kinds_at_the_edges_of_the_ranges(rows, expected):
    a = np.array(rows, np.float32)
    inv = inverse_norms_reference(a)
    kinds = np.empty(a.shape[0], np.int8)
    ks.neuron_kinds(a, inv, kinds)
    np.testing.assert_array_equal(kinds, neuron_kinds_reference(a, inv))
    np.testing.assert_array_equal(kinds, expected)


def test_inverse_norms_flags_non_finite():
    a = np.array([[1, 2], [np.inf, 0], [np.nan, 1], [0, 0]], np.float32)
    inv = np.empty(4)
    ks.inverse_norms(a, np.arange(4, dtype=np.int64), inv)
    assert inv[0] == 1 / np.sqrt(5.0) and np.isnan(inv[1]) and np.isnan(inv[2]) and inv[3] == 0


@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS), s=st.integers(0, 30))
@settings(max_examples=60, deadline=None)
def test_canonical_scores_match_dense_reference(seed, kind, s):
    rng = np.random.default_rng(seed)
    a_in, a_out = activations(kind, 7, s, rng), activations(kind, 5, s, rng)
    a_in[2] = 0
    inv_in, inv_out = inverse_norms_reference(a_in), inverse_norms_reference(a_out)
    rows, cols = np.divmod(np.arange(35, dtype=np.int64), 5)
    out = np.empty(35, np.float32)
    ks.canonical_scores(a_in, a_out, inv_in, inv_out, rows, cols.astype(np.int32), out)
    np.testing.assert_array_equal(out.reshape(7, 5), canonical_scores_reference(a_in, a_out))
    assert (out.reshape(7, 5)[2] == 0).all()  # zero-norm rule


@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS), s=st.integers(0, 30), n=st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_canonical_scores_of_pairs_match_dense_reference(seed, kind, s, n):
    rng = np.random.default_rng(seed)
    a_in, a_out = activations(kind, 7, s, rng), activations(kind, 5, s, rng)
    a_in[2] = 0
    positions = np.zeros(8, np.int64)
    positions[:n] = rng.choice(35, n, replace=False)
    out = np.empty(8, np.float32)
    ks.canonical_scores_of_pairs(a_in, a_out, inverse_norms_reference(a_in), inverse_norms_reference(a_out),
                                 positions, n, out)
    np.testing.assert_array_equal(out[:n], canonical_scores_reference(a_in, a_out).ravel()[positions[:n]])


@pytest.mark.parametrize("n_samples", list(range(0, 26)) + [1000, 1003])
def test_canonical_dots_add_in_8_lanes_then_a_fixed_tree(n_samples):
    """The norms' and scores' float64 sums follow ``pair_lane_sum``'s order (lanes s mod 8, a short
    last chunk, then the tree), at sample counts around the lane width; magnitudes 1e-8 to 1e8, so
    that another order gives other bits and the test can tell."""
    rng = np.random.default_rng(n_samples)
    a_in = (rng.standard_normal((9, n_samples)) * 1e4 ** rng.integers(-2, 3, (9, n_samples))).astype(np.float32)
    a_out = (rng.standard_normal((5, n_samples)) * 1e4 ** rng.integers(-2, 3, (5, n_samples))).astype(np.float32)
    inv = np.empty(9)
    ks.inverse_norms(a_in, np.arange(9, dtype=np.int64), inv)
    sq = pair_lane_sum(a_in, a_in)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(inv, np.where(sq > 0, 1.0 / np.sqrt(sq), 0.0))
    positions = rng.choice(45, 8, replace=False).astype(np.int64)
    out = np.empty(8, np.float32)
    inv_out = inverse_norms_reference(a_out)
    ks.canonical_scores_of_pairs(a_in, a_out, inv, inv_out, positions, 8, out)
    i, j = np.divmod(positions, 5)
    dots = pair_lane_sum(a_in[i], a_out[j])
    np.testing.assert_array_equal(out, (np.abs(dots) * inv[i] * inv_out[j]).astype(np.float32))
    if n_samples == 1000:  # in sample order the float64 sums differ
        in_order = np.cumsum(a_in[i].astype(np.float64) * a_out[j], axis=1)[:, -1]
        assert not np.array_equal(dots, in_order)


@given(values=st.lists(st.integers(-5, 5), min_size=1, max_size=80), k=st.integers(1, 80),
       seed=st.integers(0, 2**32 - 1))
@settings(deadline=None)
def test_keep_largest_moves_the_k_largest_first(values, k, seed):
    k = min(k, len(values))
    buf = np.array(values, np.float64) + np.random.default_rng(seed).integers(0, 2, len(values)) * 0.5
    expected = np.sort(buf)[::-1]
    got = ks.keep_largest(buf, len(values), k)
    assert got == expected[k - 1]  # the k-th largest
    np.testing.assert_array_equal(np.sort(buf[:k])[::-1], expected[:k])
    np.testing.assert_array_equal(np.sort(buf), np.sort(expected))  # a permutation


@given(
    pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30)), max_size=60, unique_by=lambda t: t[1]),
    k=st.integers(1, 8),
)
@settings(deadline=None)  # the first example compiles the kernel when the cache is cold
def test_topk_heap_keeps_k_best_by_score_then_position(pairs, k):
    scores, positions, n = np.empty(k, np.float32), np.empty(k, np.int64), 0
    for s, p in pairs:
        n = ks.topk_heap_push(scores, positions, n, np.float32(s), p)
    s_all = np.array([s for s, _ in pairs], np.float32)
    p_all = np.array([p for _, p in pairs], np.int64)
    best = np.lexsort((p_all, -s_all))[:n]
    order = np.lexsort((positions[:n], -scores[:n]))
    np.testing.assert_array_equal(positions[:n][order], p_all[best])
    np.testing.assert_array_equal(scores[:n][order], s_all[best])
    # A heap, full or not (a scoring thread's share may hold fewer than k), sorts in place into
    # the same rank order.
    ks.topk_heap_sort(scores[:n], positions[:n])
    np.testing.assert_array_equal(positions[:n], p_all[best])
    np.testing.assert_array_equal(scores[:n], s_all[best])


@given(
    pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40), st.booleans()), max_size=60,
                   unique_by=lambda t: t[1]),
    n_out=st.integers(0, 60),
)
def test_merge_ranked_takes_the_first_of_two_ranked_lists(pairs, n_out):
    def ranked(side):
        s = np.array([s for s, _, b in pairs if b == side], np.float32)
        p = np.array([p for _, p, b in pairs if b == side], np.int64)
        order = np.lexsort((p, -s))
        return s[order], p[order]
    (s_a, p_a), (s_b, p_b) = ranked(True), ranked(False)
    n_out = min(n_out, len(pairs))
    out_s, out_p = np.empty(n_out, np.float32), np.empty(n_out, np.int64)
    ks.merge_ranked(s_a, p_a, s_b, p_b, out_s, out_p)
    s_all, p_all = np.concatenate([s_a, s_b]), np.concatenate([p_a, p_b])
    best = np.lexsort((p_all, -s_all))[:n_out]  # the numpy twin
    np.testing.assert_array_equal(out_p, p_all[best])
    np.testing.assert_array_equal(out_s, s_all[best])


def test_scan_block_on_one_block_matches_reference():
    rng = np.random.default_rng(3)
    a_in, a_out = activations("relu", 9, 20, rng), activations("signed", 11, 20, rng)
    indptr, indices = random_csr(9, 11, 30, rng)
    k = 25
    inv_in, inv_out = inverse_norms_reference(a_in), inverse_norms_reference(a_out)
    kind_in, kind_out = neuron_kinds_reference(a_in, inv_in), neuron_kinds_reference(a_out, inv_out)
    u, g = 2.0**-24, 20 * 2.0**-24 / (1 - 20 * 2.0**-24)
    rel, abs_err = 1.05 * (g + 8 * u) / (1 - 2 * (g + 8 * u)), 1.05 * g + 12 * u
    lower, state = np.empty(2 * k + 11), np.zeros(3, np.int64)  # scan_block buffers 2k + n_out lower bounds
    scores, positions = np.empty(k, np.float32), np.empty(k, np.int64)
    ks.scan_block(
        a_in @ a_out.T, 0, indptr, indices, np.arange(9), np.arange(11), inv_in.astype(np.float32),
        inv_out.astype(np.float32), kind_in, kind_out, rel, abs_err, a_in, a_out, inv_in, inv_out, lower, scores,
        positions, state,
    )  # fmt: skip
    assert state[0] == state[1] == k and k <= state[2] <= 9 * 11 - 30
    order = np.lexsort((positions, -scores))
    rows, cols, ref_scores = topk_cosine_reference(a_in, a_out, indptr, indices, k)
    np.testing.assert_array_equal(positions[order], rows * 11 + cols)
    np.testing.assert_array_equal(scores[order], ref_scores)
    # Some rows and columns only (row_of, col_slot): the CSR's other positions are not excluded.
    row_of, held_cols = np.array([1, 4, 5, 8]), np.array([0, 2, 3, 7, 10])
    col_slot = np.full(11, 5)
    col_slot[held_cols] = np.arange(5)
    k = 8
    lower, state = np.empty(2 * k + 5), np.zeros(3, np.int64)
    scores, positions = np.empty(k, np.float32), np.empty(k, np.int64)
    sub_in, sub_out = a_in[row_of], a_out[held_cols]
    ks.scan_block(
        sub_in @ sub_out.T, 0, indptr, indices, row_of, col_slot, inv_in[row_of].astype(np.float32),
        inv_out[held_cols].astype(np.float32), kind_in[row_of], kind_out[held_cols], rel, abs_err, sub_in, sub_out,
        inv_in[row_of], inv_out[held_cols], lower, scores, positions, state,
    )  # fmt: skip
    mask = np.zeros((9, 11), bool)
    mask[np.repeat(np.arange(9), np.diff(indptr)), indices] = True
    kept = mask[np.ix_(row_of, held_cols)]
    sub_indptr = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
    rows, cols, ref_scores = topk_cosine_reference(sub_in, sub_out, sub_indptr, np.nonzero(kept)[1], k)
    order = np.lexsort((positions, -scores))
    np.testing.assert_array_equal(positions[order], rows * 5 + cols)
    np.testing.assert_array_equal(scores[order], ref_scores)


@given(
    ids=st.lists(st.integers(0, 2**40), max_size=20), seed=st.integers(0, 2**31), dim=st.integers(1, 200)
)
@settings(max_examples=40, deadline=None)
def test_projection_rows_match_numpy(ids, seed, dim):
    ids = np.array(ids, np.int64)
    out = np.empty((ids.size, dim), np.float32)
    ks.projection_rows(ids, seed, out)
    np.testing.assert_array_equal(out, projection_reference(ids, seed, dim))


def test_projection_rows_are_balanced_and_uncorrelated():
    out = np.empty((4000, 64), np.float32)
    ks.projection_rows(np.arange(4000, dtype=np.int64), 7, out)
    gram = out.T @ out  # ~ identity * 4000 / 64 for independent fair signs
    assert np.abs(np.diag(gram) - 4000 / 64).max() < 1e-3
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 5 * np.sqrt(4000) / 64  # 5 sigma


# ---------------------------------------------------------------- blocked top-k vs dense reference


@st.composite
def layer_cases(draw):
    n_in, n_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    n_samples = draw(st.sampled_from([0, 1, 2, 5, 16, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a_in = activations(draw(st.sampled_from(KINDS)), n_in, n_samples, rng)
    a_out = activations(draw(st.sampled_from(KINDS)), n_out, n_samples, rng)
    a_in[draw(st.lists(st.integers(0, n_in - 1), max_size=3))] = 0  # zero-norm neurons on purpose
    a_out[draw(st.lists(st.integers(0, n_out - 1), max_size=3))] = 0
    nnz = draw(st.integers(0, n_in * n_out))
    indptr, indices = random_csr(n_in, n_out, nnz, rng)
    k = draw(st.integers(0, n_in * n_out - nnz))
    block_rows = draw(st.one_of(st.just(1), st.just(n_in), st.integers(1, n_in)))
    return a_in, a_out, indptr, indices, k, block_rows


@given(case=layer_cases())
@settings(max_examples=300, deadline=None)
def test_topk_matches_reference_position_for_position(case):
    a_in, a_out, indptr, indices, k, block_rows = case
    got = topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block_rows)
    assert_same_topk(got, topk_cosine_reference(a_in, a_out, indptr, indices, k))
    kept = set((np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) * a_out.shape[0] + indices).tolist())
    assert kept.isdisjoint((got[0] * a_out.shape[0] + got[1]).tolist())


@given(case=layer_cases(), threads=st.integers(1, 5))
@settings(max_examples=100, deadline=None)
def test_topk_is_the_same_for_every_thread_count(case, threads):
    # Each thread scans a share of the rows with its own top-k; the merged top-k is the same.
    a_in, a_out, indptr, indices, k, block_rows = case
    expected = topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block_rows)
    got = topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block_rows, threads=threads)
    assert_same_topk(got, expected)
    for x, y in zip(got, expected):
        assert x.dtype == y.dtype


@given(cases=st.lists(layer_cases(), min_size=1, max_size=5), threads=st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_layers_scored_at_once_equal_each_scored_alone(cases, threads):
    # Each layer whole on one thread, layers shared among the threads by size.
    problems = [(packed_level(a_in), packed_level(a_out), indptr, indices, k)
                for a_in, a_out, indptr, indices, k, _ in cases]
    got = similarity.topk_cosine_layers(problems, workspace_bytes=1 << 12, threads=threads)
    for result, (a_in, a_out, indptr, indices, k, _) in zip(got, cases):
        assert_same_topk(result, topk_cosine(a_in, a_out, indptr, indices, k))


@given(cases=st.lists(layer_cases(), min_size=1, max_size=5), threads=st.integers(1, 4))
@settings(max_examples=40, deadline=None)
def test_layers_are_handed_over_in_order_one_at_a_time(cases, threads):
    # The topology update drops and grows layer l in ``then``: only after layers 0..l are scored,
    # in layer order, never two calls at once, each with that layer's result.
    problems = [(packed_level(a_in), packed_level(a_out), indptr, indices, k)
                for a_in, a_out, indptr, indices, k, _ in cases]
    calls, running = [], []

    def then(l, result):
        assert not running
        running.append(l)
        calls.append((l, result))
        time.sleep(0.001)  # long enough for another thread to finish a layer meanwhile
        running.pop()

    got = similarity.topk_cosine_layers(problems, workspace_bytes=1 << 12, threads=threads, then=then)
    assert [l for l, _ in calls] == list(range(len(problems)))
    for (l, result), expected in zip(calls, got):
        assert result is expected


def test_a_failed_hand_over_stops_the_later_ones(monkeypatch):
    # Layer 3, the largest, is scored first and held until layer 1's hand-over has failed; its
    # thread then scores layer 2 too, and must not hand it over.
    rng = np.random.default_rng(3)
    problems = []
    for n in (5, 4, 3, 6):
        a = packed_level(np.abs(rng.normal(size=(n, 20))).astype(np.float32))
        problems.append((a, a, np.zeros(n + 1, np.int64), np.zeros(0, np.int32), 3))
    failed, calls = threading.Event(), []
    score = similarity.topk_cosine_live

    def held(level_in, *args, **kwargs):
        if level_in is problems[3][0]:
            assert failed.wait(10)
            time.sleep(0.02)  # until the failed call has returned
        return score(level_in, *args, **kwargs)

    def then(l, result):
        calls.append(l)
        if l == 1:
            failed.set()
            raise RuntimeError("layer 1 failed")

    monkeypatch.setattr(similarity, "topk_cosine_live", held)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        similarity.topk_cosine_layers(problems, threads=2, then=then)
    time.sleep(0.2)  # the other thread may still be scoring
    assert calls == [0, 1]


@given(cases=st.lists(layer_cases(), min_size=1, max_size=5), threads=st.integers(1, 4), first=st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_layers_fed_one_by_one_give_the_same_results(cases, threads, first):
    # The topology update publishes each layer's problem once its activation level is computed
    # (``feed``), while the other threads score the layers already there, or wait for one.
    problems = [(packed_level(a_in), packed_level(a_out), indptr, indices, k)
                for a_in, a_out, indptr, indices, k, _ in cases]
    first = min(first, len(problems))
    calls = []

    def feed(publish):
        for l in range(first, len(problems)):
            time.sleep(0.001)
            publish(l, problems[l])

    got = similarity.topk_cosine_layers(problems[:first] + [None] * (len(problems) - first), threads=threads,
                                        workspace_bytes=1 << 12, then=lambda l, r: calls.append(l), feed=feed)
    assert calls == list(range(len(problems)))
    for result, (a_in, a_out, indptr, indices, k, _) in zip(got, cases):
        assert_same_topk(result, topk_cosine(a_in, a_out, indptr, indices, k))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failed_feed_reaches_the_caller_and_stops_the_rest(threads):
    rng = np.random.default_rng(5)
    problems = []
    for n in (5, 4, 3):
        a = packed_level(np.abs(rng.normal(size=(n, 20))).astype(np.float32))
        problems.append((a, a, np.zeros(n + 1, np.int64), np.zeros(0, np.int32), 3))
    calls = []

    def feed(publish):
        publish(1, problems[1])
        raise ValueError("level 3 has NaN")

    with pytest.raises(ValueError, match="NaN"):
        similarity.topk_cosine_layers([problems[0], None, None], threads=threads, then=lambda l, r: calls.append(l),
                                      feed=feed)
    # The threads waiting for a problem were woken (no hang); layer 2 was never published, so at
    # most the layers before it were handed over, in order.
    assert calls in ([], [0], [0, 1])


def test_scoring_threads_run_blas_on_one_thread_each(monkeypatch):
    # A profile's thread cap holds for the scoring's GEMMs too, and BLAS's own workers, which spin
    # after a GEMM, are never woken.
    seen = []
    matmul = np.matmul

    def spy(*args, **kwargs):
        seen.append(max(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"))
        return matmul(*args, **kwargs)

    monkeypatch.setattr(similarity.np, "matmul", spy)
    rng = np.random.default_rng(8)
    a_in, a_out = activations("relu", 30, 16, rng), activations("relu", 20, 16, rng)
    indptr, indices = random_csr(30, 20, 40, rng)
    before = threadpoolctl.threadpool_info()
    topk_cosine(a_in, a_out, indptr, indices, 50, threads=2, prefilter="float32")  # the 8-bit one: no BLAS
    assert seen and set(seen) == {1}
    assert threadpoolctl.threadpool_info() == before  # restored


@pytest.mark.parametrize("n_samples", [1, 300, 3000])
def test_topk_is_exact_where_float32_blas_ranks_differently(n_samples):
    # Near-identical neurons: canonical scores tie or differ in the last bits, where float32 BLAS
    # rounding reorders them. The result must still match the reference for every block size.
    rng = np.random.default_rng(n_samples)
    base = rng.standard_normal(n_samples).astype(np.float32)
    a_in = base + (rng.standard_normal((40, n_samples)) * 3e-3).astype(np.float32)
    a_out = base + (rng.standard_normal((30, n_samples)) * 3e-3).astype(np.float32)
    indptr, indices = random_csr(40, 30, 70, rng)
    expected = topk_cosine_reference(a_in, a_out, indptr, indices, 300)
    for block_rows in (1, 7, 40):
        assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 300, block_rows=block_rows), expected)
    # The premise: ranking the float32 BLAS scores directly would give another answer.
    inv_in, inv_out = inverse_norms_reference(a_in), inverse_norms_reference(a_out)
    naive = np.abs(a_in @ a_out.T) * inv_in.astype(np.float32)[:, None] * inv_out.astype(np.float32)
    naive = naive.ravel().astype(np.float64)
    naive[np.repeat(np.arange(40), np.diff(indptr)) * 30 + indices] = -np.inf
    assert not np.array_equal(np.argsort(-naive, kind="stable")[:300], expected[0] * 30 + expected[1])


def without_kept(bounds, indptr, indices):
    """``bounds`` (n_in, n_out) with -inf at the kept positions, as the scans set them."""
    bounds[np.repeat(np.arange(bounds.shape[0]), np.diff(indptr)), indices] = -np.inf
    return bounds


def first_pass_in_blocks(scan_lower, dots, n_blocks, k, *args):
    """R from ``scan_lower`` (a pass-1 kernel, taking ``args`` between its row offset and its
    lower-bound buffer) run over ``dots`` in ``n_blocks`` blocks of rows, as the blocked scan does."""
    lower, state = np.empty(2 * k + dots.shape[1], np.float64), np.zeros(3, np.int64)
    edges = np.linspace(0, dots.shape[0], n_blocks + 1).astype(int)
    for r0, r1 in zip(edges[:-1], edges[1:]):
        bound = scan_lower(np.ascontiguousarray(dots[r0:r1]), r0, *args, lower, k, state)
    return bound


def kth_largest_bound(bounds, k):
    """The k-th largest of ``bounds`` (-inf counts as none), or -inf where fewer than k: pass 1's R."""
    ranked = np.sort(bounds, axis=None)[::-1]
    return ranked[k - 1] if (ranked > -np.inf).sum() >= k else -np.inf


def lower_bounds_reference(dots, v_in, v_out, kind_in, kind_out, indptr, indices, rel, abs_err):
    """Pass 1's lower bound of every position, as ``kernels._row_bounds`` computes it (float32
    prefilter score, float64 margin), -inf where kept or where the prefilter has no bound."""
    approx = (np.abs(dots) * v_in[:, None]) * v_out[None, :]  # float32, the kernel's two roundings
    ki, kj = kind_in[:, None], kind_out[None, :]
    nonneg = lambda kind: (kind == ks.KIND_NONNEG) | (kind == ks.KIND_WIDE)  # noqa: E731
    wide = (ki == ks.KIND_WIDE) | (kj == ks.KIND_WIDE)
    margin = np.where(nonneg(ki) & nonneg(kj), rel * approx.astype(np.float64) + np.where(wide, ks.WIDE_SLACK, 0.0),
                      abs_err)
    margin = np.where((ki == ks.KIND_ZERO) | (kj == ks.KIND_ZERO), 0.0, margin)
    out = approx.astype(np.float64) - margin
    odd = (ki == ks.KIND_IRREGULAR) | (kj == ks.KIND_IRREGULAR) | ((ki == ks.KIND_WIDE) & (kj == ks.KIND_WIDE))
    out[odd] = -np.inf
    return without_kept(out, indptr, indices)


@given(case=layer_cases(), n_blocks=st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_first_pass_bound_is_the_kth_largest_lower_bound(case, n_blocks):
    # Pass 1 keeps only lower bounds above its running bound and skips rows whose float32 scores
    # are all below it: its R must still be the k-th largest lower bound of the whole layer. (A
    # smaller R would give the same top-k, with more positions rescored: the top-k tests cannot
    # see it.)
    a_in, a_out, indptr, indices, k, _ = case
    if k == 0:
        return
    stats = [similarity.neuron_stats(a) for a in (a_in, a_out)]
    (inv_in, kind_in), (inv_out, kind_out) = stats
    v_in, v_out = inv_in.astype(np.float32), inv_out.astype(np.float32)
    rel, abs_err = similarity._prefilter_bounds(a_in.shape[1])
    dots = np.ascontiguousarray(a_in @ a_out.T, dtype=np.float32)
    n_in, n_out = dots.shape
    bound = first_pass_in_blocks(ks.scan_block_lower, dots, n_blocks, k, indptr, indices,
                                 np.arange(n_in, dtype=np.int64), np.arange(n_out, dtype=np.int64), v_in, v_out,
                                 kind_in, kind_out, rel, abs_err)
    assert bound == kth_largest_bound(
        lower_bounds_reference(dots, v_in, v_out, kind_in, kind_out, indptr, indices, rel, abs_err), k)


def test_workspace_sets_block_rows_and_result_does_not_depend_on_it():
    rng = np.random.default_rng(5)
    a_in, a_out = activations("relu", 50, 32, rng), activations("relu", 40, 32, rng)
    indptr, indices = random_csr(50, 40, 90, rng)
    expected = topk_cosine_reference(a_in, a_out, indptr, indices, 100)
    for workspace in (0, 1, 40 * 4 * 3, 1 << 30):
        assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 100, workspace_bytes=workspace), expected)


def test_prefilter_rescores_few_positions():
    rng = np.random.default_rng(6)
    a_in, a_out = activations("relu", 300, 200, rng), activations("signed", 300, 200, rng)
    indptr, indices = random_csr(300, 300, 600, rng)
    k = 120
    *_, n_scored = _topk_cosine(a_in, a_out, indptr, indices, k, block_rows=50, workspace_bytes=0)
    # A streaming top-k over random order admits about k * (1 + ln(N / k)) entries.
    assert n_scored <= 3 * k * (1 + np.log(300 * 300 / k)), n_scored


def softmax_outputs(a_in, n_out, rng, temperature):
    """Class probabilities of a random linear head over ``a_in`` (n_in, S): (n_out, S), float32,
    near 0 (down to 2**-96 and below at high confidence) where a class is far from the best."""
    logits = rng.standard_normal((n_out, a_in.shape[0])) @ a_in.astype(np.float64)
    logits *= temperature / logits.std()
    p = np.exp(logits - logits.max(axis=0))
    return (p / p.sum(axis=0)).astype(np.float32)


@pytest.mark.parametrize("temperature", [2.0, 8.0, 20.0])
def test_softmax_outputs_near_zero_are_prefiltered_not_all_rescored(temperature):
    # A confident classifier's output neurons have probabilities far below 2**-30 (KIND_WIDE, not
    # KIND_IRREGULAR): the pairs with regular hidden neurons are prefiltered, so about k positions
    # are rescored instead of all of them, and the top-k is still the reference's.
    rng = np.random.default_rng(11)
    a_in = activations("relu", 200, 300, rng)
    a_out = softmax_outputs(a_in, 10, rng, temperature)
    _, kinds = similarity.neuron_stats(a_out)
    if temperature == 8.0:
        assert (kinds == ks.KIND_WIDE).all()
    indptr, indices = random_csr(200, 10, 100, rng)
    k = 60
    expected = topk_cosine_reference(a_in, a_out, indptr, indices, k)
    for threads in (None, 2):
        *got, n_scored = _topk_cosine(a_in, a_out, indptr, indices, k, block_rows=None, workspace_bytes=1 << 20,
                                      threads=threads)
        assert_same_topk(got, expected)
        n_odd = int((kinds == ks.KIND_IRREGULAR).sum()) * 200
        assert n_scored <= n_odd + 4 * k, (n_scored, n_odd, kinds)


def test_wide_neurons_pair_with_regular_ones_only():
    # Products of two KIND_WIDE neurons can underflow float32: such pairs are always rescored, and
    # tiny scores whose prefilter underflows still rank exactly.
    rng = np.random.default_rng(12)
    a = np.abs(rng.standard_normal((6, 40))).astype(np.float32)
    a[:3, ::2] = np.float32(2.0**-95)
    a[3:, 1::2] = np.float32(2.0**-90)
    a[5] = np.float32(2.0**-30) * (np.arange(40) % 3 == 0)  # regular, its least value at the range's edge
    inv, kinds = similarity.neuron_stats(a)
    np.testing.assert_array_equal(kinds, [ks.KIND_WIDE] * 5 + [ks.KIND_NONNEG])
    np.testing.assert_array_equal(kinds, neuron_kinds_reference(a, inv))
    indptr, indices = random_csr(6, 6, 4, rng)
    for k in (1, 5, 32):
        *got, n_scored = _topk_cosine(a, a, indptr, indices, k, block_rows=None, workspace_bytes=1 << 20)
        assert_same_topk(got, topk_cosine_reference(a, a, indptr, indices, k))
        assert n_scored >= min(k, 25 - 4)  # the 25 wide-wide pairs, less at most 4 kept, are rescored


def test_all_scores_zero_returns_first_free_positions():
    a_in, a_out = np.zeros((4, 3), np.float32), np.ones((5, 3), np.float32)
    indptr, indices = random_csr(4, 5, 6, np.random.default_rng(0))
    rows, cols, scores = topk_cosine(a_in, a_out, indptr, indices, 14)
    free = np.setdiff1d(np.arange(20), np.repeat(np.arange(4), np.diff(indptr)) * 5 + indices)
    np.testing.assert_array_equal(rows * 5 + cols, free)
    assert (scores == 0).all() and rows.dtype == np.int64 and cols.dtype == np.int32


def test_k_zero_and_k_all_free():
    rng = np.random.default_rng(1)
    a_in, a_out = activations("signed", 3, 4, rng), activations("signed", 2, 4, rng)
    indptr, indices = random_csr(3, 2, 2, rng)
    assert all(x.size == 0 for x in topk_cosine(a_in, a_out, indptr, indices, 0))
    expected = topk_cosine_reference(a_in, a_out, indptr, indices, 4)
    assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 4), expected)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=5), r"k must be in \[0, 4\]"),
        (dict(k=-1), r"k must be in \[0, 4\]"),
        (dict(indices=np.array([1, 0], np.int32)), "strictly ascending"),
        (dict(indices=np.array([0, 2], np.int32)), r"indices must lie in \[0, 2\)"),
        (dict(indptr=np.array([0, 1, 2], np.int64)), "indptr must have shape"),
        (dict(a_in=np.full((3, 4), np.nan, np.float32)), "a_in contains Inf or NaN"),
        (dict(a_out=np.ones((2, 5), np.float32)), "share the samples axis"),
        (dict(a_in=np.ones(4, np.float32)), "must be 2-D"),
    ],
)
def test_bad_arguments_raise_value_error(change, match):
    args = dict(
        a_in=np.ones((3, 4), np.float32), a_out=np.ones((2, 4), np.float32),
        indptr=np.array([0, 2, 2, 2], np.int64), indices=np.array([0, 1], np.int32), k=4,
    )  # fmt: skip
    args.update(change)
    with pytest.raises(ValueError, match=match):
        topk_cosine(**args)


@pytest.mark.slow
def test_memory_of_a_20000_by_20000_layer_stays_under_80_mb():
    n, n_samples, k = 20_000, 256, 8_000
    rng = np.random.default_rng(0)
    indptr, indices = random_csr(n, n, 40_000, rng)
    tiny = np.ones((2, 3), np.float32)
    topk_cosine(tiny, tiny, np.zeros(3, np.int64), np.zeros(0, np.int32), 1)  # load kernels untraced
    tracemalloc.start()
    try:
        start = time.perf_counter()
        a_in = rng.standard_normal((n, n_samples), dtype=np.float32)
        np.maximum(a_in, 0, out=a_in)
        a_out = rng.standard_normal((n, n_samples), dtype=np.float32)
        np.maximum(a_out, 0, out=a_out)
        rows, cols, scores = topk_cosine(a_in, a_out, indptr, indices, k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    print(f"\n20000 x 20000, S=256, k=8000: {seconds:.1f} s, traced peak {peak / 1e6:.1f} MB")
    assert peak < 80e6, f"traced peak {peak / 1e6:.1f} MB >= 80 MB"
    assert rows.shape == (k,) and np.all(np.diff(scores) <= 0)
    # Spot check: the returned scores are the canonical ones.
    rescored = np.empty(100, np.float32)
    inv_in, inv_out = inverse_norms_reference(a_in[rows[:100]]), inverse_norms_reference(a_out[cols[:100]])
    dots = np.einsum("ij,ij->i", a_in[rows[:100]].astype(np.float64), a_out[cols[:100]].astype(np.float64))
    rescored[:] = np.abs(dots) * inv_in * inv_out
    np.testing.assert_allclose(scores[:100], rescored, rtol=1e-6)


# ---------------------------------------------------------------- sketch


def test_sketch_does_not_depend_on_batching():
    rng = np.random.default_rng(2)
    a_in, a_out = activations("relu", 20, 50, rng), activations("signed", 15, 50, rng)
    one, two = CosineSketch(20, 15, dim=32, seed=3), CosineSketch(20, 15, dim=32, seed=3)
    one.update(a_in, a_out, np.arange(50))
    order = rng.permutation(50)
    for part in np.array_split(order, 3):
        two.update(a_in[:, part], a_out[:, part], part)
    np.testing.assert_allclose(one.sketch_in, two.sketch_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one.sketch_out, two.sketch_out, rtol=1e-5, atol=1e-5)
    assert one.n_samples == two.n_samples == 50


def test_sketch_estimates_cosine():
    rng = np.random.default_rng(4)
    a_in, a_out = activations("relu", 30, 400, rng), activations("relu", 30, 400, rng)
    a_out[:10] = a_in[:10] + 0.1 * a_out[:10]  # some strongly similar pairs
    sketch = CosineSketch(30, 30, dim=1024, seed=1)
    sketch.update(a_in, a_out, np.arange(400))
    estimate = canonical_scores_reference(sketch.sketch_in, sketch.sketch_out)
    assert np.abs(estimate - canonical_scores_reference(a_in, a_out)).max() < 0.15  # ~ 4 / sqrt(dim)


def test_rescore_with_every_free_position_equals_exact_topk():
    rng = np.random.default_rng(8)
    a_in, a_out = activations("relu", 25, 40, rng), activations("integer", 18, 40, rng)
    a_out[3] = 0
    indptr, indices = random_csr(25, 18, 60, rng)
    sketch = CosineSketch(25, 18, dim=16)
    sketch.update(a_in, a_out, np.arange(40))
    rows, cols, _ = sketch.candidates(indptr, indices, k=50, n_candidates=25 * 18 - 60)
    got = rescore_topk(a_in, a_out, rows, cols, 50)
    assert_same_topk(got, topk_cosine(a_in, a_out, indptr, indices, 50))
    # Candidate order must not matter either.
    shuffle = rng.permutation(rows.size)
    assert_same_topk(rescore_topk(a_in, a_out, rows[shuffle], cols[shuffle], 50), got)


def test_candidates_skip_kept_positions_and_default_to_4k():
    rng = np.random.default_rng(9)
    a_in, a_out = activations("relu", 30, 20, rng), activations("relu", 30, 20, rng)
    indptr, indices = random_csr(30, 30, 200, rng)
    sketch = CosineSketch(30, 30, dim=8)
    sketch.update(a_in, a_out, np.arange(20))
    rows, cols, _ = sketch.candidates(indptr, indices, k=10)
    assert rows.size == 40
    kept = np.repeat(np.arange(30), np.diff(indptr)) * 30 + indices
    assert np.intersect1d(rows * 30 + cols, kept).size == 0
    with pytest.raises(ValueError, match="n_candidates must be at least k"):
        sketch.candidates(indptr, indices, k=10, n_candidates=5)
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 30\)"):
        rescore_topk(a_in, a_out, rows, cols + 30, k=10)


def erdos_renyi_mlp_activations(x, n_classes, hidden, rng):
    """Activations of a random sparse ReLU MLP as docs/algorithm.md initialises it (eps=1, Glorot)."""
    sizes = [x.shape[1], *hidden, n_classes]
    acts, layers, h = [np.ascontiguousarray(x.T)], [], x
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        indptr, indices = random_csr(n_in, n_out, min(n_in * n_out, n_in + n_out), rng)
        limit = np.sqrt(6 / (n_in + n_out))
        w = np.zeros((n_in, n_out), np.float32)
        w[np.repeat(np.arange(n_in), np.diff(indptr)), indices] = rng.uniform(-limit, limit, indices.size)
        z = h @ w
        if n_out == n_classes:  # output layer: softmax
            z = np.exp(z - z.max(axis=1, keepdims=True))
            h = z / z.sum(axis=1, keepdims=True)
        else:
            h = np.maximum(z, 0)
        acts.append(np.ascontiguousarray(h.T, dtype=np.float32))
        layers.append((indptr, indices))
    return acts, layers


def load_scaled(name):
    path = DATASETS / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"{path.name} not found under ../shared/datasets")
    with np.load(path) as data:
        x, y = data["X"].astype(np.float32), data["y"]
    if name == "madelon":  # scaled as the authors did
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    else:
        x = (x - x.min(axis=0)) / np.maximum(x.max(axis=0) - x.min(axis=0), 1e-12)
    return x.astype(np.float32), int(y.max()) + 1


def real_layers_with_exact_topk():
    """Per layer of a 1000-1000-1000 ER network fed digits and madelon: activations, k, exact top-k set."""
    for name in ("digits", "madelon"):
        x, n_classes = load_scaled(name)
        acts, layers = erdos_renyi_mlp_activations(x, n_classes, (1000, 1000, 1000), np.random.default_rng(0))
        for l, (indptr, indices) in enumerate(layers):
            a_in, a_out = acts[l], acts[l + 1]
            k = int(0.2 * indices.size)
            exact = topk_cosine(a_in, a_out, indptr, indices, k)
            yield name, l, x, a_in, a_out, indptr, indices, k, set((exact[0] * a_out.shape[0] + exact[1]).tolist())


def test_sketch_recall_on_real_activations():
    dims, default_dim = (32, 64, 128, 256), CosineSketch(1, 1).dim
    lines, worst_at_default = [], 1.0
    for name, l, x, a_in, a_out, indptr, indices, k, truth in real_layers_with_exact_topk():
        recalls = []
        for dim in dims:
            sketch = CosineSketch(a_in.shape[0], a_out.shape[0], dim=dim, seed=0)
            for part in np.array_split(np.arange(x.shape[0]), 8):  # streamed in batches
                sketch.update(a_in[:, part], a_out[:, part], part)
            rows, cols, _ = sketch.candidates(indptr, indices, k)
            rows, cols, _ = rescore_topk(a_in, a_out, rows, cols, k)
            recalls.append(len(truth & set((rows * a_out.shape[0] + cols).tolist())) / k)
            if dim == default_dim:
                worst_at_default = min(worst_at_default, recalls[-1])
        shape = f"{a_in.shape[0]}x{a_out.shape[0]}"
        table = "  ".join(f"{r:.3f}" for r in recalls)
        lines.append(f"{name:8s} layer {l} {shape:>10s} k={k:4d}  {table}")
    print("\nrecall of the exact top-k, n_candidates = 4k, dim = " + " / ".join(map(str, dims)))
    print("\n".join(lines))
    assert worst_at_default >= 0.9, f"recall {worst_at_default:.3f} < 0.9 at the default dim {default_dim}"


@pytest.mark.parametrize("name", ["digits", "madelon"])
def test_topk_exact_on_real_activations_for_many_block_sizes(name):
    """Issue 3: on activations of a network fed real data, blocked top-k == dense reference."""
    x, n_classes = load_scaled(name)
    acts, layers = erdos_renyi_mlp_activations(x[:600], n_classes, (300, 300), np.random.default_rng(1))
    for l, (indptr, indices) in enumerate(layers):
        a_in, a_out = acts[l], acts[l + 1]
        k = int(0.2 * indices.size)
        want = topk_cosine_reference(a_in, a_out, indptr, indices, k)
        for block in sorted({1, 3, 64, a_in.shape[0]}):
            got = topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[2], want[2])


def test_shipped_sketch_ranking_recall_on_real_activations():
    """What `--similarity sketch` grows: the sketch's own top-k (no exact rescoring), dim 256."""
    lines, worst = [], 1.0
    for name, l, x, a_in, a_out, indptr, indices, k, truth in real_layers_with_exact_topk():
        sketch = CosineSketch(a_in.shape[0], a_out.shape[0], dim=256, seed=0)
        for part in np.array_split(np.arange(x.shape[0]), 8):
            sketch.update(a_in[:, part], a_out[:, part], part)
        rows, cols, _ = sketch.candidates(indptr, indices, k, n_candidates=k)
        recall = len(truth & set((rows * a_out.shape[0] + cols).tolist())) / k
        worst = min(worst, recall)
        lines.append(f"{name:8s} layer {l} {a_in.shape[0]}x{a_out.shape[0]} k={k}: recall {recall:.3f}")
    print("\nsketch top-k (dim 256, no rescoring) against exact:\n" + "\n".join(lines))
    assert worst >= 0.8, f"worst recall {worst:.3f} (measured 0.847 when written)"


@pytest.mark.parametrize("kind", ["relu", "signed", "integer"])
@pytest.mark.parametrize("k", [5, 60, 400])
def test_dead_neurons_leave_the_product_and_the_result_unchanged(kind, k, monkeypatch):
    # Half the neurons of each side are all-zero: the scan runs on the live 20 x 15 block only,
    # also where k needs positions of score 0 (k = 400 > the live block's free positions; k = 60 can
    # need them where many live pairs score 0): those are the first free ones in position order.
    rng = np.random.default_rng(k)
    a_in, a_out = activations(kind, 40, 16, rng), activations(kind, 30, 16, rng)
    a_in[rng.permutation(40)[:20]] = 0
    a_out[rng.permutation(30)[:15]] = 0
    indptr, indices = random_csr(40, 30, 90, rng)
    shapes = []
    scan = similarity._scan_topk
    monkeypatch.setattr(similarity, "_scan_topk", lambda *a: shapes.append(a[0].shape) or scan(*a))
    got = topk_cosine(a_in, a_out, indptr, indices, k)
    assert_same_topk(got, topk_cosine_reference(a_in, a_out, indptr, indices, k))
    assert shapes == [(20, 16)]
    # The same from the levels packed as the topology update has them, and with every row held.
    for level_in, level_out in ((packed_level(a_in), packed_level(a_out)),
                                (similarity.LiveLevel.whole(a_in), similarity.LiveLevel.whole(a_out))):
        assert_same_topk(similarity.topk_cosine_live(level_in, level_out, indptr, indices, k), got)


def test_live_copies_stay_within_the_workspace(monkeypatch):
    rng = np.random.default_rng(2)
    a_in, a_out = activations("relu", 40, 16, rng), activations("relu", 30, 16, rng)
    a_in[:20] = 0
    indptr, indices = random_csr(40, 30, 90, rng)
    shapes = []
    scan = similarity._scan_topk
    monkeypatch.setattr(similarity, "_scan_topk", lambda *a: shapes.append(a[0].shape) or scan(*a))
    for workspace, rows in ((4 * 16 * (20 + 30), 20), (4 * 16 * (20 + 30) - 1, 40)):
        shapes.clear()
        got = topk_cosine(a_in, a_out, indptr, indices, 50, workspace_bytes=workspace)
        assert_same_topk(got, topk_cosine_reference(a_in, a_out, indptr, indices, 50))
        assert shapes == [(rows, 16)]


def test_precomputed_stats_give_the_same_picks():
    rng = np.random.default_rng(4)
    a_in, a_out = activations("relu", 40, 16, rng), activations("signed", 30, 16, rng)
    a_in[:25] = 0
    indptr, indices = random_csr(40, 30, 90, rng)
    stats = (*similarity.neuron_stats(a_in), *similarity.neuron_stats(a_out))
    assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 50, stats=stats),
                     topk_cosine_reference(a_in, a_out, indptr, indices, 50))
    with pytest.raises(ValueError, match="stats must hold"):
        topk_cosine(a_in, a_out, indptr, indices, 50, stats=stats[2:] + stats[:2])
    with pytest.raises(ValueError, match="activations contains Inf or NaN"):
        similarity.neuron_stats(np.full((2, 3), np.nan, np.float32))


def test_given_live_copies_are_used_and_give_the_same_picks(monkeypatch):
    rng = np.random.default_rng(5)
    a_in, a_out = activations("relu", 40, 16, rng), activations("relu", 30, 16, rng)
    a_in[:25] = 0
    a_out[::3] = 0
    indptr, indices = random_csr(40, 30, 90, rng)
    stats = (*similarity.neuron_stats(a_in), *similarity.neuron_stats(a_out))
    copies = (similarity.live_rows(a_in, stats[1]), similarity.live_rows(a_out, stats[3]))
    assert copies[0].shape == (15, 16) and copies[1].shape == (20, 16)
    seen = []
    scan = similarity._scan_topk
    monkeypatch.setattr(similarity, "_scan_topk", lambda *a: seen.append(a[0] is copies[0]) or scan(*a))
    want = topk_cosine_reference(a_in, a_out, indptr, indices, 50)
    for passed in (copies, (copies[0], None), (None, copies[1])):
        seen.clear()
        assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 50, stats=stats, live_copies=passed), want)
        assert seen == [passed[0] is not None]
    with pytest.raises(ValueError, match="live_copies: the copy of a_out must have shape"):
        topk_cosine(a_in, a_out, indptr, indices, 50, stats=stats, live_copies=(None, a_out))


def test_in_threads_waits_for_the_workers_before_an_error_reaches_the_caller():
    done = []

    def fn(t):
        if t == 0:
            raise RuntimeError("share 0 failed")
        time.sleep(0.05)
        done.append(t)

    with pytest.raises(RuntimeError, match="share 0 failed"):
        similarity.in_threads(fn, 3)
    assert sorted(done) == [1, 2]  # nothing still runs once the caller has the error


# ---------------------------------------------------------------- the 8-bit prefilter


def quantize_levels_reference(a, inv):
    """``kernels.quantize_levels`` in numpy: (codes int8, stats float64 (4, m), negative?)."""
    a64 = a.astype(np.float64)
    n_samples = a.shape[1]
    top = np.abs(a64).max(axis=1) if n_samples else np.zeros(a.shape[0])
    with np.errstate(divide="ignore"):
        g = np.where(top > 0, ks.Q8_TOP / top, 0.0)
    t = a64 * g[:, None]
    r = np.rint(t)
    e = np.ceil(np.abs(t - r) * 2.0**20).astype(np.int64)
    p = np.sqrt((r.astype(np.int64) ** 2).sum(axis=1).astype(np.float64))
    q = np.sqrt((e * e).sum(axis=1).astype(np.float64)) * 2.0**-20 * (1.0 + 2.0**-40) + \
        np.sqrt(np.float64(n_samples)) * 2.0**-44
    live = top > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = np.stack([np.where(live, inv / g, 0.0), np.where(live, p, 0.0), np.where(live, q, 0.0),
                          live.astype(np.float64)])
    return r.astype(np.int8), stats, bool((a < 0).any())


@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(KINDS), n=st.integers(1, 9), s=st.integers(0, 70))
@settings(max_examples=80, deadline=None)
def test_quantize_levels_matches_numpy(seed, kind, n, s):
    rng = np.random.default_rng(seed)
    a = activations(kind, n, s, rng)
    a[rng.random(n) < 0.3] = 0
    a = np.where((a == 0) & (rng.random(a.shape) < 0.5), np.float32(-0.0), a)  # -0.0 is not negative
    inv, _ = similarity.neuron_stats(a)
    codes, stats = np.empty(a.shape, np.int8), np.empty((4, n))
    negative = ks.quantize_levels(a, inv, codes, stats)
    want_codes, want_stats, want_negative = quantize_levels_reference(a, inv)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(stats, want_stats)
    assert (negative < 0) == want_negative and negative <= 0
    assert np.abs(codes.astype(np.int64)).max(initial=0) <= ks.Q8_TOP


def q8_product(a_in, a_out):
    """Both sides' codes' exact product (int32, as MatMulInteger gives it) and their stats."""
    (inv_in, _), (inv_out, _) = similarity.neuron_stats(a_in), similarity.neuron_stats(a_out)
    codes_in, codes_out = np.empty(a_in.shape, np.int8), np.empty(a_out.shape, np.int8)
    stats_in, stats_out = np.empty((4, a_in.shape[0])), np.empty((4, a_out.shape[0]))
    ks.quantize_levels(a_in, inv_in, codes_in, stats_in)
    ks.quantize_levels(a_out, inv_out, codes_out, stats_out)
    return (codes_in.astype(np.int64) @ codes_out.astype(np.int64).T).astype(np.int32), stats_in, stats_out


def q8_bounds(a_in, a_out, indptr, indices, sign):
    """Every position's bound from ``kernels._row_bounds_q8`` on the exact product of the codes."""
    dots, stats_in, stats_out = q8_product(a_in, a_out)
    out = np.empty(dots.shape)
    n_in, n_out = dots.shape
    for i in range(n_in):
        ks._row_bounds_q8(dots[i], i, indptr, indices, np.arange(n_in, dtype=np.int64),
                          np.arange(n_out, dtype=np.int64), stats_in, stats_out, sign, out[i])
    return out


@given(case=layer_cases())
@settings(max_examples=200, deadline=None)
def test_q8_bounds_hold_every_canonical_score(case):
    # Whatever the neurons' ranges and signs (the codes are signed on both sides here), the lower
    # and upper bounds from the 8-bit codes enclose the canonical score; kept positions get -inf.
    a_in, a_out, indptr, indices, _, _ = case
    score = canonical_scores_reference(a_in, a_out).astype(np.float64)
    kept = np.zeros(score.shape, bool)
    kept[np.repeat(np.arange(a_in.shape[0]), np.diff(indptr)), indices] = True
    lower, upper = q8_bounds(a_in, a_out, indptr, indices, -1.0), q8_bounds(a_in, a_out, indptr, indices, 1.0)
    assert np.all(lower[kept] == -np.inf) and np.all(upper[kept] == -np.inf)
    assert np.all(lower[~kept] <= score[~kept]) and np.all(score[~kept] <= upper[~kept])


def test_q8_bounds_are_tight_enough_to_rescore_few_positions(monkeypatch):
    # ReLU levels of 300 neurons over 500 samples, random, so the top scores barely stand out (the
    # k-th 0.42 against a median of 0.32): the 8-bit product must leave few positions to the exact rescoring
    # (849 when written, 7k; 1.2-2k on a trained MNIST network's levels, docs/performance-log.md),
    # and it must be the path taken.
    calls = []
    product = similarity.int8_product()
    monkeypatch.setattr(similarity, "_INT8_PRODUCT", [lambda *a: calls.append(1) or product(*a)])
    rng = np.random.default_rng(6)
    a_in, a_out = activations("relu", 300, 500, rng), activations("relu", 300, 500, rng)
    indptr, indices = random_csr(300, 300, 600, rng)
    k = 120
    rows, cols, scores, n_scored = _topk_cosine(a_in, a_out, indptr, indices, k, block_rows=None,
                                                workspace_bytes=32 << 20)
    assert calls and n_scored <= 8 * k, n_scored
    assert_same_topk((rows, cols, scores), topk_cosine_reference(a_in, a_out, indptr, indices, k))


@given(case=layer_cases(), threads=st.sampled_from([None, 1, 2, 3]))
@settings(max_examples=150, deadline=None)
def test_both_prefilters_give_the_reference_topk(case, threads):
    # Nonnegative inputs (the 8-bit product's first operand is unsigned) with any outputs, so that
    # the 8-bit path runs; signed inputs fall back to the float32 one. Both match the reference.
    a_in, a_out, indptr, indices, k, block_rows = case
    a_in = np.abs(a_in)
    expected = topk_cosine_reference(a_in, a_out, indptr, indices, k)
    for prefilter in ("auto", "float32"):
        got = topk_cosine(a_in, a_out, indptr, indices, k, block_rows=block_rows, threads=threads,
                          prefilter=prefilter)
        assert_same_topk(got, expected)


def test_levels_with_codes_give_the_same_picks_and_quantize_once(monkeypatch):
    # The topology update quantizes each level once (``with_codes``); a hidden level then serves
    # as the input of one layer and the output of the other, with the same picks as without codes.
    rng = np.random.default_rng(9)
    a0, a1, a2 = (activations("relu", n, 64, rng) for n in (40, 30, 20))
    a1[:5] = 0
    levels = [packed_level(a) for a in (a0, a1, a2)]
    coded = [similarity.with_codes(level) for level in levels]
    assert all(level.codes is not None for level in coded)
    quantized = []
    monkeypatch.setattr(ks, "quantize_levels", lambda *a: quantized.append(1) or 0.0)  # must not run again
    for l, (n_in, n_out) in enumerate(((40, 30), (30, 20))):
        indptr, indices = random_csr(n_in, n_out, 50, rng)
        got = similarity.topk_cosine_live(coded[l], coded[l + 1], indptr, indices, 70)
        want = similarity.topk_cosine_live(levels[l], levels[l + 1], indptr, indices, 70, prefilter="float32")
        assert_same_topk(got, want)
    assert not quantized
    # A level whose codes would not fit the workspace gets none (its layers quantize per call).
    assert similarity.with_codes(levels[0], workspace_bytes=40 * 64 - 1).codes is None


def test_the_written_out_product_model_is_what_onnx_builds():
    from onnx import TensorProto, checker, helper

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["B"], ["Bt"], perm=[1, 0]),
         helper.make_node("MatMulInteger", ["A", "Bt"], ["Y"])], "codes",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["m", "s"]),
         helper.make_tensor_value_info("B", TensorProto.INT8, ["n", "s"])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ctre-edge")
    model.ir_version = 8
    checker.check_model(model)
    assert model.SerializeToString() == similarity._PRODUCT_MODEL


def test_int8_product_is_exact_and_a_wrong_one_is_refused(monkeypatch):
    product = similarity.int8_product()
    assert product is not None  # onnxruntime's MatMulInteger passed its check on this machine
    rng = np.random.default_rng(4)
    a = rng.integers(0, ks.Q8_TOP + 1, (33, 700), dtype=np.uint8)
    b = rng.integers(-ks.Q8_TOP, ks.Q8_TOP + 1, (21, 700)).astype(np.int8)
    out = np.empty((33, 21), np.int32)
    product(a, b, out)
    np.testing.assert_array_equal(out, a.astype(np.int64) @ b.astype(np.int64).T)

    def saturating(a, b, out):  # what 16-bit pair sums that saturate would give
        product(a, b, out)
        np.minimum(out, 30000 * a.shape[1] // 2, out=out)

    assert similarity._checked(saturating) is None
    # Without a product, the float32 prefilter runs, with the same result.
    monkeypatch.setattr(similarity, "_INT8_PRODUCT", [None])
    a_in, a_out = activations("relu", 20, 40, rng), activations("relu", 15, 40, rng)
    indptr, indices = random_csr(20, 15, 30, rng)
    assert_same_topk(topk_cosine(a_in, a_out, indptr, indices, 40),
                     topk_cosine_reference(a_in, a_out, indptr, indices, 40))
    assert similarity.with_codes(packed_level(a_in)).codes is None


def test_more_samples_than_int32_sums_allow_take_the_float32_prefilter(monkeypatch):
    # S * 127 * 127 must stay below 2**31: beyond INT8_MAX_SAMPLES no codes are made, and the
    # float32 prefilter gives the reference picks.
    from ctre_edge.packed import INT8_MAX_SAMPLES, uses_int8_codes

    calls = []
    product = similarity.int8_product()
    monkeypatch.setattr(similarity, "_INT8_PRODUCT", [lambda *a: calls.append(1) or product(*a)])
    rng = np.random.default_rng(10)
    for n_samples, used in ((INT8_MAX_SAMPLES, True), (INT8_MAX_SAMPLES + 1, False)):
        calls.clear()
        a_in, a_out = activations("relu", 3, n_samples, rng), activations("relu", 2, n_samples, rng)
        indptr, indices = random_csr(3, 2, 1, rng)
        got = topk_cosine(a_in, a_out, indptr, indices, 4, workspace_bytes=64 << 20)
        assert_same_topk(got, topk_cosine_reference(a_in, a_out, indptr, indices, 4))
        assert bool(calls) == used
        assert (similarity.with_codes(packed_level(a_in), 64 << 20).codes is not None) == used
    assert not uses_int8_codes([10**6, 10**6], INT8_MAX_SAMPLES + 1, 1 << 40)


def q8_bounds_reference(dots, stats_in, stats_out, indptr, indices, sign):
    """``kernels._row_bounds_q8`` of every position in numpy: the same float64 operations in the
    same order, so the same bits; -inf where kept."""
    (alpha_i, p_i, q_i, live_i), (alpha, p, q, live) = stats_in[:, :, None], stats_out[:, None, :]
    d = np.abs(dots.astype(np.float64))
    err = p_i * q + q_i * (p + q)
    scale = alpha_i * alpha
    slack = ks.Q8_ABS * live_i * live
    if sign < 0:
        out = np.maximum(0.0, scale * (d - err)) * (1.0 - ks.Q8_REL) - slack
    else:
        out = scale * (d + err) * (1.0 + ks.Q8_REL) + slack
    return without_kept(out, indptr, indices)


@given(case=layer_cases(), n_blocks=st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_q8_first_pass_bound_is_the_kth_largest_lower_bound(case, n_blocks):
    # As for the float32 pass 1: with its row skips, R must be the k-th largest lower bound of the
    # whole layer, and the bounds those of the numpy twin, bit for bit.
    a_in, a_out, indptr, indices, k, _ = case
    if k == 0:
        return
    dots, stats_in, stats_out = q8_product(a_in, a_out)
    n_in, n_out = dots.shape
    for sign in (-1.0, 1.0):
        want = q8_bounds_reference(dots, stats_in, stats_out, indptr, indices, sign)
        np.testing.assert_array_equal(q8_bounds(a_in, a_out, indptr, indices, sign), want)
    bound = first_pass_in_blocks(ks.scan_q8_lower, dots, n_blocks, k, indptr, indices,
                                 np.arange(n_in, dtype=np.int64), np.arange(n_out, dtype=np.int64), stats_in,
                                 stats_out)
    assert bound == kth_largest_bound(q8_bounds_reference(dots, stats_in, stats_out, indptr, indices, -1.0), k)
