"""Topology policies, run once per epoch per layer: static, set, ctre-sim, ctre-seq.

All four share the drop step (remove the ``floor(zeta*nnz)`` weakest connections) and differ only
in where the new ones go: nowhere (static), uniformly at random (set), by cosine similarity of
activations with re-added picks replaced at random (ctre-sim), or by cosine similarity until
validation stalls and at random after (ctre-seq). ``POLICIES`` maps each method to its small grow
rule; ``TopologyPolicy`` applies the rule to every layer.

References
----------
docs/algorithm.md, "The topology update".
"""

from __future__ import annotations

import numba
import numpy as np

from . import kernels
from .layers import sample_positions
from .packed import level_views, no_csc, scores_layers_whole, uses_int8_codes
from .similarity import (
    CosineSketch,
    LiveLevel,
    check_stats,
    in_threads,
    layers_balance,
    live_positions,
    merge_dropped,
    neuron_stats,
    neuron_stats_of_rows,
    topk_cosine_layers,
    topk_cosine_live,
    with_codes,
)

# How each method grows this epoch, given the policy's state and the validation accuracy: not at
# all, at random, or by cosine (replacing re-added picks at random, or re-adding them). A policy
# may update its own state (ctre-seq counts stale epochs). scikit-learn's ACTIVATIONS pattern.
NONE, RANDOM, COSINE, COSINE_READD = "none", "random", "cosine", "cosine-readd"


def grow_static(policy, epoch, val_acc) -> str:
    return NONE


def grow_set(policy, epoch, val_acc) -> str:
    return RANDOM


def grow_ctre_sim(policy, epoch, val_acc) -> str:
    return COSINE


def grow_ctre_seq(policy, epoch, val_acc) -> str:
    """Cosine with re-adding until validation stalls for ``patience`` epochs, random after."""
    if not policy.random_from_now:
        # Strict improvement resets the count; `patience` epochs without it switch to random growth.
        if val_acc > policy.best_val:
            policy.best_val, policy.stale = val_acc, 0
        else:
            policy.stale += 1
            if policy.stale >= policy.patience:
                policy.random_from_now, policy.switched_at = True, epoch + 1
    return RANDOM if policy.random_from_now else COSINE_READD


POLICIES = {"static": grow_static, "set": grow_set, "ctre-sim": grow_ctre_sim, "ctre-seq": grow_ctre_seq}
# Whether the next update can score by cosine (so sketch mode must observe this epoch's batches).
SCORES = {"static": lambda policy: False, "set": lambda policy: False, "ctre-sim": lambda policy: True,
          "ctre-seq": lambda policy: not policy.random_from_now}


class TopologyPolicy:
    """Drop-and-grow for every layer of a ``packed.PackedNet``, in place, by the method's grow rule.

    ``update`` returns (connections changed, grown by cosine, grown at random), summed over layers.
    """

    def __init__(self, config, X, train_rows, shift, scale):
        self.method = config.method
        self.grow = POLICIES[config.method]
        self.zeta = config.zeta
        self.patience = config.patience
        self.samples = config.similarity_samples
        self.workspace = config.similarity_workspace_mib << 20
        self.X, self.train_rows, self.shift, self.scale = X, train_rows, shift, scale
        self.best_val = -1.0
        self.stale = 0
        self.random_from_now = False
        self.switched_at = None  # ctre-seq: the epoch after which growth became random
        self.sketched = config.similarity == "sketch"
        self.sketch_dim = config.sketch_dim
        self.sketches = None
        self.seed = config.seed
        self.balance = None  # layers_balance of the last exact update's sample, if it scored whole

    @property
    def wants_sketch(self) -> bool:
        """Whether the trainer should fold this epoch's first batches into the sketches."""
        return self.sketched and SCORES[self.method](self)

    def observe(self, levels: list, sample_ids: np.ndarray, epoch: int) -> None:
        """Fold one training batch's activations (feature-major, per level) into the sketches."""
        if self.sketches is None or self.sketches[0] != epoch:
            # A new projection each epoch (seeded), like a new activation sample in exact mode.
            self.sketches = (epoch, [CosineSketch(levels[l].shape[0], levels[l + 1].shape[0], self.sketch_dim,
                                                  seed=(self.seed * 1_000_003 + epoch) % 2**62)
                                     for l in range(len(levels) - 1)])
        for l, sketch in enumerate(self.sketches[1]):
            sketch.update(levels[l], levels[l + 1], sample_ids)

    def state(self) -> dict:
        """What a checkpoint must keep to continue the policy exactly."""
        return {"best_val": self.best_val, "stale": self.stale, "random_from_now": self.random_from_now,
                "switched_at": self.switched_at}

    def restore(self, state: dict) -> None:
        self.best_val, self.stale, self.random_from_now = state["best_val"], state["stale"], state["random_from_now"]
        self.switched_at = state.get("switched_at")

    def update(self, net, epoch: int, val_acc: float, rng: np.random.Generator, csc=None,
               scratch=None) -> tuple[int, int, int]:
        """``csc``: the trainer's CSC copy of the current pattern (``PackedNet.csc_buffers`` filled by
        ``kernels.csc_all``), if it has one; the activation sample's forward pass reads it.
        ``scratch``: a float32 buffer free until the update returns (the trainer's validation
        buffer), which holds the activation sample if it is large enough (``sample_activations``)."""
        growth = self.grow(self, epoch, val_acc)
        if growth == NONE:
            return 0, 0, 0
        totals = np.zeros(3, dtype=np.int64)

        def grow(l, pick):
            totals[:] += update_layer(net, l, self.zeta, rng, pick, readd=growth == COSINE_READD)

        pickers = [None] * net.n_layers
        if growth != RANDOM:
            pickers = self._sketch_pickers(epoch) if self.sketched else self._exact_pickers(net, rng, csc, scratch,
                                                                                          grow)
        for l, pick in enumerate(pickers):
            grow(l, pick)
        return tuple(int(t) for t in totals)

    def _sketch_pickers(self, epoch: int) -> list:
        # Rank by the cosine of the sketches; there are no exact activations to rescore with
        # (keeping them is what the sketch avoids), so the sketch ranking is final.
        sketches = self.sketches[1] if self.sketches is not None and self.sketches[0] == epoch else None
        if sketches is None:
            raise RuntimeError("sketch mode: no batch of this epoch was observed")
        threads = numba.get_num_threads()  # as in exact mode: the profile's cap, one BLAS thread each
        return [lambda ip, ix, k, dropped, s=s: s.candidates(ip, ix, k, n_candidates=k,
                                                             workspace_bytes=self.workspace, threads=threads)[:2]
                for s in sketches]

    def _exact_pickers(self, net, rng, csc, scratch, grow) -> list:
        """A pick per layer for ``update_layer``; or none where the layers are scored whole, as the
        scoring calls ``grow(l, pick)`` for every layer itself, in order (``_grow_scored_whole``)."""
        threads = numba.get_num_threads()  # the trainer's, from the device profile
        whole = scores_layers_whole(net.sizes, self.workspace, threads)
        if whole and self.balance is not None and self.balance <= WHOLE_LAYERS_BALANCE:
            # The last update scored the layers whole: so does this one, with the sample's later
            # levels computed while the first layer is scored. Whether a layer is scored whole or
            # split changes no pick, so this memory of the last update changes no bit either.
            self._grow_scored_whole(net, threads, grow, sample=(rng, csc, scratch))
            return []
        # Each level holds only its live neurons' rows, packed (``sample_activations``), which the
        # scoring reads as they are: a hidden level is scored against two layers, without a copy.
        levels = sample_activations(net, self.X, self.train_rows, self.shift, self.scale, self.samples, rng, csc,
                                    threads, scratch)
        if self._int8(net):
            coded = in_threads(lambda t: [with_codes(v, self.workspace) for v in levels[t::threads]], threads)
            levels = [coded[l % threads][l // threads] for l in range(len(levels))]
        if whole:
            self.balance = _levels_balance(levels, threads)
            if self.balance <= WHOLE_LAYERS_BALANCE:
                self._grow_scored_whole(net, threads, grow, levels=levels)
                return []
        return [lambda ip, ix, k, dropped, l=l: topk_cosine_live(
                    levels[l], levels[l + 1], ip, ix, k, workspace_bytes=self.workspace, threads=threads)[:2]
                for l in range(net.n_layers)]

    def _int8(self, net) -> bool:
        # Whether this run's levels get 8-bit codes (similarity.with_codes): decided by the shapes
        # alone, as the planner decides whether to count onnxruntime's memory.
        return uses_int8_codes(net.sizes, min(self.train_rows.shape[0], self.samples), self.workspace)

    def _grow_scored_whole(self, net, threads, grow, levels=None, sample=None) -> None:
        # Where every layer's scores fit a thread's share of the workspace, each layer is scored whole
        # on one thread, all layers at once, before any drop: against the topology as it is, whose free
        # positions are those not kept after the drop less the dropped ones, so each layer's picks are
        # its best k free positions merged with the dropped ones, scored when the drop has run
        # (``merge_dropped``): the same picks as scoring after the drop, with one hand-off to the
        # threads instead of two per layer. Layer l drops and grows as soon as layers 0..l are
        # scored, on a scoring thread while the other may still score a later layer; the layers
        # still grow one at a time in order, so no random draw moves and the model keeps its bits.
        # With ``sample`` (rng, csc, scratch) instead of ``levels``, the activation sample is taken
        # here: levels 0 and 1 on every thread, then the first layer is scored while the last
        # thread computes the later levels alone (``sample_levels``), each scored once it is done.
        def problem(l):
            layer = net.layer(l)
            k = min(drop_count(layer.nnz, self.zeta), layer.n_in * layer.n_out - layer.nnz)
            return levels[l], levels[l + 1], layer.indptr, layer.indices, k

        feed, sampled = None, levels is None
        if sampled:
            rng, csc, scratch = sample
            later = sample_levels(net, self.X, self.train_rows, self.shift, self.scale, self.samples, rng, csc,
                                  threads, scratch, later_threads=1)
            coded = (lambda level: with_codes(level, self.workspace)) if self._int8(net) else (lambda level: level)
            first = [next(later), next(later)]
            levels = in_threads(lambda t: coded(first[t]), 2)

            def feed(publish):
                for level in later:
                    levels.append(coded(level))
                    publish(len(levels) - 2, problem(len(levels) - 2))

        problems = [problem(l) if l + 1 < len(levels) else None for l in range(net.n_layers)]

        def then(l, found):
            grow(l, lambda ip, ix, k, dropped: merge_dropped(levels[l], levels[l + 1], *found, dropped, k))

        topk_cosine_layers(problems, workspace_bytes=self.workspace, threads=threads, then=then, feed=feed)
        if sampled:  # else the caller has just measured it on the same levels
            self.balance = _levels_balance(levels, threads)


def _levels_balance(levels, threads):
    """``layers_balance`` of scoring each layer between these levels whole on one thread."""
    return layers_balance([live_positions(levels[l], levels[l + 1]) for l in range(len(levels) - 1)], threads)


# Layers are scored whole, one per thread (``_grow_scored_whole``), only where that splits the work
# about evenly: on the trained MNIST network at epsilon 1 (live positions 292k, 174k, 105k and 3k:
# 1.02) the update took 17 against 23 ms in training (tools/bench_update.py); at epsilon 20 (998k,
# 971k, 605k, 10k: 1.22) one thread had a third more to do than the other, and the k = 8000 dropped
# positions per layer that each layer's picks must be merged with took 9 ms more: 63 against 57 ms
# for the per-layer split (the fastest of 15 updates each, tools/bench_update.py --base).
WHOLE_LAYERS_BALANCE = 1.1


def sample_activations(net, X, train_rows, shift, scale, samples: int, rng: np.random.Generator,
                       csc=None, threads: int = 1, scratch=None) -> list:
    """Activations of every level over S = min(N, samples) training rows chosen by ``rng``, as a
    ``LiveLevel`` per level: the rows of its live neurons (not zero over every sample),
    packed, with every neuron's norm and kind.

    Scaled inputs, ReLU hidden layers, softmax output, i.e. exactly the pairs the cosine scoring
    needs (docs/algorithm.md, "The topology update", step 2). ``csc``: a CSC copy of the current
    pattern (``TopologyPolicy.update``), or None; where every layer has one, a layer's output
    neurons are split among ``threads`` threads, each packing the live rows of its share as it
    writes them (``kernels.forward_cols``), and the next layer reads the packed rows. Else the
    levels are computed whole (``kernels.forward_all``) and then packed in place. The same bits
    either way. ``scratch``: a flat float32 buffer to hold them if it is large enough, else they
    get their own. The trainer lends its validation buffer, S rows of every level by default: 15 MB
    of new pages for the MNIST network took 2-4 ms to fault in, more than a tenth of its update (a
    one-off script). Raises ValueError if an activation is Inf or NaN.

    At epsilon 1 most hidden neurons of a trained MNIST network are zero over the whole sample: a
    level packed as it is written is never written whole, and the scoring needs no copies of it.
    """
    return list(sample_levels(net, X, train_rows, shift, scale, samples, rng, csc, threads, scratch))


def sample_levels(net, X, train_rows, shift, scale, samples: int, rng: np.random.Generator, csc=None,
                  threads: int = 1, scratch=None, later_threads=None):
    """``sample_activations`` one level at a time, as each is ready: a generator of the same
    ``LiveLevel``, the same bits. The rows are drawn from ``rng`` before the first level. On the
    threaded path, levels 1 and up are computed on ``later_threads`` threads (default ``threads``):
    the topology update computes them on one thread while the other scores the first layer
    (``TopologyPolicy._grow_scored_whole``)."""
    s = min(train_rows.shape[0], samples)
    rows = np.sort(rng.choice(train_rows, size=s, replace=False))
    n = int(net.sizes.sum()) * s
    act = scratch[:n] if scratch is not None and scratch.shape[0] >= n else net.activation_buffer(s)
    levels = level_views(act, net.sizes, s)
    sizes, ptr_off, nz_off, unit_off, indptr, indices, values, bias = net.forward
    if csc is None or threads == 1 or not all(csc[0].shape[0] and csc[0][unit_off[l + 1] + l] > 0
                                              for l in range(net.n_layers)):
        kernels.forward_all(X, rows, shift, scale, *net.forward, *(no_csc() if csc is None else csc), act)
        yield from (_packed(a) for a in levels)
        return
    # On Python threads, not numba's: a numba worker keeps spinning for milliseconds after a
    # parallel loop, and took a core from the scoring threads that follow (measured: the update at
    # epsilon 1 was 17-18 ms instead of 12-13 with the pass as a numba parallel kernel).
    colptr, rowidx, perm = csc
    no_flags = np.empty(0, np.uint8)
    kernels.gather_scaled(X, rows, shift, scale, levels[0], np.empty((kernels.GATHER_TILE, X.shape[1]), np.float32))
    inv, kinds = np.zeros(int(sizes[0]), np.float64), np.zeros(int(sizes[0]), np.int8)
    x, x_rows = levels[0], rowidx  # what the layer reads, and the CSC's input rows in it
    for l in range(net.n_layers):
        out, n_out, hidden = levels[l + 1], int(sizes[l + 1]), l < net.n_layers - 1
        p0, p1, u0, u1 = nz_off[l], nz_off[l + 1], unit_off[l], unit_off[l + 1]
        cols = colptr[u0 + l:u1 + l + 1]
        kept = np.empty(n_out if hidden else 0, np.int64)  # which neuron each packed row is
        held = (np.zeros(n_out, np.float64), np.zeros(n_out, np.int8))  # stats, by packed row
        n_threads = threads if l == 0 or later_threads is None else max(1, int(later_threads))
        shares = [(t * n_out // n_threads, (t + 1) * n_out // n_threads) for t in range(n_threads)]

        def part(t):  # run at once by in_threads, so the loop's names are this layer's
            if l == 0:  # the input level's norms, each thread a share of its rows
                neuron_stats_of_rows(x, inv, kinds, t * x.shape[0] // threads, (t + 1) * x.shape[0] // threads)
            j0, j1 = shares[t]
            end = kernels.forward_cols(cols, x_rows[p0:p1] if l == 0 else x_rows, perm[p0:p1], values[p0:p1],
                                       bias[u0:u1], x, out, j0, j1, hidden, no_flags, s,
                                       kept)  # empty for the output level: softmax needs every row
            if hidden:  # the rows it just wrote, while they are in this thread's cache
                neuron_stats_of_rows(out, *held, j0, end)
            return end

        ends = in_threads(part, n_threads)
        if l == 0:
            check_stats(inv)
        if not hidden:
            if l == 0:
                yield _pack_in_place(x, inv, kinds)
            kernels.softmax_inplace(out, s)
            yield _packed(out)
            return
        # Join the threads' packed rows, each share's behind the previous share's; the next layer
        # reads them through its CSC's input rows renumbered (a neuron not held reads row m, zeros).
        level_inv, level_kinds, slot = np.empty(n_out, np.float64), np.empty(n_out, np.int8), np.empty(n_out, np.int32)
        next_rowidx = rowidx[nz_off[l + 1]:nz_off[l + 2]]
        next_rows = np.empty(next_rowidx.shape[0], np.int32)
        join = (out, kept, *held, np.array([j0 for j0, _ in shares]), np.array(ends), level_inv, level_kinds, slot,
                next_rowidx, next_rows)
        if l == 0:
            # The input level is packed (a copy of most of it, serial) on this thread while another
            # joins the first hidden level (this path runs on 2 threads or more); both kernels
            # release the GIL.
            level_0, m = in_threads(lambda t: kernels.join_shares(*join) if t else _pack_in_place(x, inv, kinds), 2)
            yield level_0
        else:
            m = kernels.join_shares(*join)
        x_rows = next_rows
        check_stats(level_inv)
        yield LiveLevel(out[:m], kept[:m], level_inv, level_kinds)
        x = out[:m + 1]


def _packed(a) -> LiveLevel:
    """A level computed whole, as a ``LiveLevel``: its stats, then its live rows packed in place."""
    inv, kinds = neuron_stats(a)
    return _pack_in_place(a, inv, kinds)


def _pack_in_place(a, inv, kinds) -> LiveLevel:
    live = np.flatnonzero(kinds != kernels.KIND_ZERO)
    kernels.move_rows(a, live, 0)
    return LiveLevel(a[:live.shape[0]], live, inv, kinds)


def drop_weakest(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the connections to keep: all but the k smallest |w|, ties broken by ``rng``.

    The k dropped are the first k in the order (|w|, a random key per connection, index). Found
    in O(nnz) with a partition instead of a sort of every connection: all below the k-th
    smallest |w| go, and of those equal to it, the ones first by (key, index).
    """
    n = values.shape[0]
    keep = np.ones(n, dtype=bool)
    if k:
        key = rng.random(n)
        mag = np.abs(values)
        if k >= n:
            keep[:] = False
            return keep
        t = np.partition(mag, k - 1)[k - 1]
        below = mag < t
        tied = np.flatnonzero(mag == t)
        keep[below] = False
        need = k - int(np.count_nonzero(below))
        keep[tied[np.lexsort((tied, key[tied]))[:need]]] = False
    return keep


def drop_count(nnz: int, zeta: float) -> int:
    """How many connections an update drops (and grows): ``floor(zeta * nnz)``."""
    return int(np.floor(zeta * nnz))


def update_layer(net, l: int, zeta: float, rng, pick=None, readd: bool = False) -> np.ndarray:
    """Drop ``floor(zeta*nnz)`` weakest connections of layer ``l`` and grow as many, in place.

    ``pick`` None grows at random (SET). Otherwise ``pick(kept_indptr, kept_indices, k, dropped)``
    (``dropped``: the linear positions just removed, ascending) returns the (rows, cols) of the k
    best-|cosine| positions not kept, and those are grown; picks that were
    just removed are replaced by random positions (CTRE_sim) or, with ``readd``, get their old
    weight and momentum back (CTRE_seq). Returns [changed, grown by cosine, grown at random].
    One function for the three growth modes: they share the drop, the exclusions and the rebuild,
    and their random draws must happen in this order for runs to repeat bit for bit.

    New weights are the paper's U(-b, b), b = sqrt(6/n_in), whatever the initialisation. With the
    sparse initialisation they start about 20x smaller than the weights they join, so a new
    connection must earn its place before the next drop. We tried sizing them to the neuron's
    in-degree, and starting them at zero (as RigL does); on COIL-20, madelon and PCMAC with set and
    ctre-sim neither was better overall, and in-degree sizing was the worst (docs/algorithm.md).
    """
    layer = net.layer(l)
    velocity = net.layer_velocity(l)
    nnz = layer.nnz
    k = drop_count(nnz, zeta)
    total = layer.n_in * layer.n_out
    k = min(k, total - nnz + k)  # a (nearly) dense layer can only regrow where it dropped
    if k <= 0:
        return np.zeros(3, dtype=np.int64)
    keep = drop_weakest(layer.values, k, rng)
    n_kept = nnz - k
    kept_pos = np.empty(n_kept, np.int64)
    kept_indptr, kept_indices = np.empty(layer.n_in + 1, np.int64), np.empty(n_kept, np.int32)
    kept_vals, kept_vel = np.empty(n_kept, np.float32), np.empty(n_kept, np.float32)
    kernels.split_kept(layer.indptr, layer.indices, layer.values, velocity, keep, layer.n_out, kept_pos,
                       kept_indptr, kept_indices, kept_vals, kept_vel)

    n_cos = 0
    new_order = None
    new_vals = np.empty(k, np.float32)
    new_vel = np.zeros(k, np.float32)
    bound = np.sqrt(6.0 / layer.n_in)
    if pick is None:
        new_pos, new_order = sample_positions(total, k, kept_pos, rng, with_order=True)
        new_vals[:] = rng.uniform(-bound, bound, size=k)
    else:
        dropped = np.empty(k, np.int64)
        kernels.dropped_positions(layer.indptr, layer.indices, keep, layer.n_out, dropped)
        rows, cols = pick(kept_indptr, kept_indices, k, dropped)
        picks = rows * layer.n_out + cols.astype(np.int64)
        # Which picks the drop just removed, and the sorted union of all positions before the drop
        # and the fresh picks (what CTRE_sim's random draw excludes), in one pass.
        where = np.empty(k, np.int64)
        excluded = np.empty(nnz + k, np.int64)
        n_fresh = kernels.locate_picks(picks, np.argsort(picks), layer.indptr, layer.indices, keep, layer.n_out,
                                       where, excluded)
        readded = where >= 0
        fresh = picks[~readded]
        n_cos = int(fresh.shape[0])
        if readd:
            # CTRE_seq: a re-added connection keeps its old weight and momentum.
            new_pos = picks
            n_cos = k
            new_vals[:] = rng.uniform(-bound, bound, size=k)
            dropped = ~keep
            new_vals[readded] = layer.values[dropped][where[readded]]
            new_vel[readded] = velocity[dropped][where[readded]]
        else:
            # CTRE_sim: replace re-added picks by random positions that are neither kept, nor
            # picked by cosine, nor just removed (the authors' draw forgot the last two).
            excluded = excluded[:nnz + n_fresh]
            n_extra = min(k - n_cos, total - excluded.shape[0])
            extra = sample_positions(total, n_extra, excluded, rng)
            # Departure: in a (nearly) dense layer there may be no such position left; the
            # re-added picks that cannot be replaced are then grown where cosine put them.
            new_pos = np.concatenate([fresh, extra, picks[readded][:k - n_cos - n_extra]])
            n_cos = k - n_extra
            new_vals[:] = rng.uniform(-bound, bound, size=k)

    if new_order is None:
        new_order = np.argsort(new_pos)  # distinct, so any sort gives this order; the default is the fastest
    kernels.merge_topology(layer.n_out, kept_pos, kept_vals, kept_vel, new_pos, new_order, new_vals,
                           new_vel, layer.indptr, layer.indices, layer.values, velocity)
    return np.array([k, n_cos, k - n_cos], dtype=np.int64)
