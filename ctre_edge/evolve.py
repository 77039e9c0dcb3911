"""Topology policies, run once per epoch per layer: static, set, ctre-sim, ctre-seq.

All four share the drop step (remove the ``floor(zeta*nnz)`` weakest connections) and differ only
in where the new ones go: nowhere (static), uniformly at random (set), by cosine similarity of
activations with re-added picks replaced at random (ctre-sim), or by cosine similarity until
validation stalls and at random after (ctre-seq). One class with a mode, not a hierarchy.

References
----------
ALGORITHM.md, "Topology update, once per epoch, per layer".
"""

from __future__ import annotations

import numpy as np

from .layers import csr_from_positions, linear_positions, sample_positions


class TopologyPolicy:
    """Drop-and-grow for every layer of a ``train.PackedNet``, in place.

    ``update`` returns (connections changed, grown by cosine, grown at random), summed over layers.
    """

    def __init__(self, config, X, train_rows, shift, scale):
        self.mode = config.method
        self.zeta = config.zeta
        self.patience = config.patience
        self.samples = config.similarity_samples
        self.workspace = config.similarity_workspace_mib << 20
        self.X, self.train_rows, self.shift, self.scale = X, train_rows, shift, scale
        self.best_val = -1.0
        self.stale = 0
        self.random_from_now = config.method == "set"
        self.switched_at = None  # ctre-seq: the epoch after which growth became random
        self.sketch_dim = config.sketch_dim if config.similarity == "sketch" else 0
        self.sketches = None
        self.seed = config.seed

    @property
    def wants_sketch(self) -> bool:
        """Whether the trainer should fold this epoch's first batches into the sketches."""
        return self.sketch_dim > 0 and self.mode.startswith("ctre") and not self.random_from_now

    def observe(self, levels: list, sample_ids: np.ndarray, epoch: int) -> None:
        """Fold one training batch's activations (feature-major, per level) into the sketches."""
        from .similarity import CosineSketch

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

    def update(self, net, epoch: int, val_acc: float, rng: np.random.Generator) -> tuple[int, int, int]:
        if self.mode == "static":
            return 0, 0, 0
        if self.mode == "ctre-seq" and not self.random_from_now:
            # Strict improvement resets the count; `patience` epochs without it switch to random growth.
            if val_acc > self.best_val:
                self.best_val, self.stale = val_acc, 0
            else:
                self.stale += 1
                if self.stale >= self.patience:
                    self.random_from_now = True
                    self.switched_at = epoch + 1
        pickers = [None] * net.n_layers
        if not self.random_from_now and self.sketch_dim:
            # Sketch mode: rank by the cosine of the sketches; there are no exact activations to
            # rescore with (keeping them is what the sketch avoids), so the sketch ranking is final.
            sketches = self.sketches[1] if self.sketches is not None and self.sketches[0] == epoch else None
            if sketches is None:
                raise RuntimeError("sketch mode: no batch of this epoch was observed")
            pickers = [lambda ip, ix, k, s=s: s.candidates(ip, ix, k, n_candidates=k, workspace_bytes=self.workspace)[:2]
                       for s in sketches]
        elif not self.random_from_now:
            levels = sample_activations(net, self.X, self.train_rows, self.shift, self.scale, self.samples, rng)
            pickers = [lambda ip, ix, k, a=levels[l], b=levels[l + 1]:
                       topk_cosine(a, b, ip, ix, k, workspace_bytes=self.workspace)[:2] for l in range(net.n_layers)]
        totals = np.zeros(3, dtype=np.int64)
        for l in range(net.n_layers):
            totals += update_layer(net, l, self.zeta, rng, pickers[l], readd=self.mode == "ctre-seq")
        return tuple(int(t) for t in totals)


def topk_cosine(*args, **kwargs):
    from .similarity import topk_cosine as exact

    return exact(*args, **kwargs)


def sample_activations(net, X, train_rows, shift, scale, samples: int, rng: np.random.Generator) -> list:
    """Activations of every level over S = min(N, samples) training rows chosen by ``rng``.

    Returns feature-major float32 arrays (n_l, S): scaled inputs, ReLU hidden layers, softmax
    output, i.e. exactly the pairs the cosine scoring needs (ALGORITHM.md, step 2).
    """
    from . import kernels

    from .train import level_views

    s = min(train_rows.shape[0], samples)
    rows = np.sort(rng.choice(train_rows, size=s, replace=False))
    act = np.empty(int(net.sizes.sum()) * s, np.float32)
    kernels.forward_all(X, rows, shift, scale, *net.kernel_args(), net.bias, act)
    return level_views(act, net.sizes, s)


def drop_weakest(values: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the connections to keep: all but the k smallest |w|, ties broken by ``rng``."""
    keep = np.ones(values.shape[0], dtype=bool)
    if k:
        order = np.lexsort((rng.random(values.shape[0]), np.abs(values)))
        keep[order[:k]] = False
    return keep


def update_layer(net, l: int, zeta: float, rng, pick=None, readd: bool = False) -> np.ndarray:
    """Drop ``floor(zeta*nnz)`` weakest connections of layer ``l`` and grow as many, in place.

    ``pick`` None grows at random (SET). Otherwise ``pick(kept_indptr, kept_indices, k)`` returns
    the (rows, cols) of the k best-|cosine| positions not kept, and those are grown; picks that were
    just removed are replaced by random positions (CTRE_sim) or, with ``readd``, get their old
    weight and momentum back (CTRE_seq). Returns [changed, grown by cosine, grown at random].

    New weights are the paper's U(-b, b), b = sqrt(6/n_in), whatever the initialisation. With the
    sparse initialisation they start about 20x smaller than the weights they join, so a new
    connection must earn its place before the next drop. We tried sizing them to the neuron's
    in-degree, and starting them at zero (as RigL does); on COIL-20, madelon and PCMAC with set and
    ctre-sim neither was better overall, and in-degree sizing was the worst (docs/algorithm.md).
    """
    layer = net.layer(l)
    velocity = net.layer_velocity(l)
    nnz = layer.nnz
    k = int(np.floor(zeta * nnz))
    total = layer.n_in * layer.n_out
    k = min(k, total - nnz + k)  # a (nearly) dense layer can only regrow where it dropped
    if k <= 0:
        return np.zeros(3, dtype=np.int64)
    positions = linear_positions(layer)
    keep = drop_weakest(layer.values, k, rng)
    kept_pos, removed_pos = positions[keep], positions[~keep]  # both sorted
    old_vals, old_vel = layer.values[~keep], velocity[~keep]

    n_cos = 0
    new_vals = np.empty(k, np.float32)
    new_vel = np.zeros(k, np.float32)
    bound = np.sqrt(6.0 / layer.n_in)
    if pick is None:
        new_pos = sample_positions(total, k, kept_pos, rng)
        new_vals[:] = rng.uniform(-bound, bound, size=k)
    else:
        kept_indptr, kept_indices, _ = csr_from_positions(layer.n_in, layer.n_out, kept_pos)
        rows, cols = pick(kept_indptr, kept_indices, k)
        picks = rows * layer.n_out + cols.astype(np.int64)
        where = np.searchsorted(removed_pos, picks)
        where[where == removed_pos.shape[0]] = 0
        readded = removed_pos[where] == picks
        fresh = picks[~readded]
        n_cos = int(fresh.shape[0])
        if readd:
            # CTRE_seq: a re-added connection keeps its old weight and momentum.
            new_pos = picks
            n_cos = k
            new_vals[:] = rng.uniform(-bound, bound, size=k)
            new_vals[readded] = old_vals[where[readded]]
            new_vel[readded] = old_vel[where[readded]]
        else:
            # CTRE_sim: replace re-added picks by random positions that are neither kept, nor
            # picked by cosine, nor just removed (the authors' draw forgot the last two).
            excluded = np.unique(np.concatenate([kept_pos, picks, removed_pos]))
            n_extra = min(k - n_cos, total - excluded.shape[0])
            extra = sample_positions(total, n_extra, excluded, rng)
            # Departure: in a (nearly) dense layer there may be no such position left; the
            # re-added picks that cannot be replaced are then grown where cosine put them.
            new_pos = np.concatenate([fresh, extra, picks[readded][:k - n_cos - n_extra]])
            n_cos = k - n_extra
            new_vals[:] = rng.uniform(-bound, bound, size=k)

    all_pos = np.concatenate([kept_pos, new_pos])
    indptr, indices, order = csr_from_positions(layer.n_in, layer.n_out, all_pos)
    layer.indptr[:] = indptr
    layer.indices[:] = indices
    layer.values[:] = np.concatenate([layer.values[keep], new_vals])[order]
    velocity[:] = np.concatenate([velocity[keep], new_vel])[order]
    return np.array([k, n_cos, k - n_cos], dtype=np.int64)
