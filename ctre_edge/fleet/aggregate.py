"""Server-side aggregation of sparse client models, connection by connection, in sparse form.

Every rule starts like FedDST (Bibikar et al., AAAI 2022): for each layer, the union of the
clients' connections, each connection's weight the sample-weighted mean over the clients that
hold it (a client without it does not pull it towards zero), biases the weighted mean; then the
union is cut back to the layer's target connection count by magnitude. ``regrow`` then evolves
the global topology once per round as SET/CTRE do once per epoch: it drops the ``zeta`` weakest
of those and grows as many where the clients' cosine votes are strongest (CTRE's growth signal,
summed over clients, weighted by samples), at random where there are no votes (SET), with zero
weights so that a new connection does not change the function until the clients train it.
Before the cut, ``ServerMomentum`` can replace "adopt the mean" by a FedAvgM step per connection.
Memory is O(sum of client nnz); nothing is dense.
"""

from __future__ import annotations

import numpy as np

from ..layers import SparseLayer, csr_from_positions, linear_positions, sample_positions

RULES = ("regrow", "feddst")


class ServerMomentum:
    """FedAvgM (Hsu et al., 2019) per connection: the server moves by lr x velocity, not to the mean.

    The round's update of a connection the global model held is ``mean - global``; its velocity
    is ``momentum * velocity + update`` and the new weight ``global + lr * velocity``. A
    connection new to the global model (grown by a client) takes its mean with zero velocity;
    a connection cut or dropped loses its velocity. Biases likewise. ``layers`` holds the
    velocity in the global model's topology (values and bias), None before the first round.
    """

    def __init__(self, lr: float = 1.0, momentum: float = 0.0, layers: list[SparseLayer] | None = None):
        self.lr, self.momentum, self.layers = float(lr), float(momentum), layers

    @property
    def active(self) -> bool:
        return self.lr != 1.0 or self.momentum != 0.0

    def step(self, l: int, start: SparseLayer, uniq: np.ndarray, mean: np.ndarray, bias: np.ndarray):
        """(new values at ``uniq``, their velocity, new bias, its velocity) for layer ``l``."""
        g_pos = linear_positions(start)
        old_v = self.layers[l] if self.layers is not None else None
        at = np.searchsorted(g_pos, uniq)
        held = at < g_pos.shape[0]
        held[held] = g_pos[at[held]] == uniq[held]
        vel = np.zeros(uniq.shape[0])
        new = mean.copy()
        prev_v = old_v.values.astype(np.float64)[at[held]] if old_v is not None else 0.0
        vel[held] = self.momentum * prev_v + (mean[held] - start.values.astype(np.float64)[at[held]])
        new[held] = start.values[at[held]] + self.lr * vel[held]
        prev_bv = old_v.bias.astype(np.float64) if old_v is not None else 0.0
        bias_vel = self.momentum * prev_bv + (bias - start.bias.astype(np.float64))
        return new, vel, start.bias + self.lr * bias_vel, bias_vel


def aggregate(clients: list[list[SparseLayer]], weights: list[float], targets: list[int], *, rule: str = "regrow",
              zeta: float = 0.2, votes: list[list[np.ndarray]] | None = None,
              rng: np.random.Generator | None = None, start: list[SparseLayer] | None = None,
              server: ServerMomentum | None = None) -> list[SparseLayer]:
    """One global model from client models; ``targets[l]`` connections in layer ``l``.

    ``votes[c][l]`` are client c's proposed linear positions for layer l (may be empty). With
    ``server`` (and ``start``, the global model the clients started from) the server takes a
    momentum step instead of adopting the mean; ``server.layers`` is updated to the new velocity.
    """
    if server is not None and server.active and start is None:
        raise ValueError("a server momentum step needs the start model")
    stepping = server is not None and server.active
    velocity = []
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    if not clients:
        raise ValueError("no client models to aggregate")
    rng = rng if rng is not None else np.random.default_rng(0)
    w = np.asarray(weights, np.float64)
    out = []
    for l in range(len(clients[0])):
        first = clients[0][l]
        n_in, n_out = first.n_in, first.n_out
        pos = np.concatenate([linear_positions(c[l]) for c in clients])
        val = np.concatenate([c[l].values.astype(np.float64) * wc for c, wc in zip(clients, w)])
        hold = np.concatenate([np.full(c[l].nnz, wc) for c, wc in zip(clients, w)])
        uniq, inv = np.unique(pos, return_inverse=True)
        mean = np.bincount(inv, val, uniq.shape[0]) / np.bincount(inv, hold, uniq.shape[0])
        bias = sum(c[l].bias.astype(np.float64) * wc for c, wc in zip(clients, w)) / w.sum()
        vel = np.zeros(uniq.shape[0])
        if stepping:
            mean, vel, bias, bias_vel = server.step(l, start[l], uniq, mean, bias)
        target = min(int(targets[l]), n_in * n_out)
        # Largest |w| first; position breaks ties so the result does not depend on client order.
        order = np.lexsort((uniq, -np.abs(mean)))
        keep = order[:min(target, order.shape[0])]
        kept_pos, kept_val, kept_vel = uniq[keep], mean[keep], vel[keep]
        grow_n = target - kept_pos.shape[0]  # the union may hold fewer connections than the target
        if rule == "regrow":
            k = min(int(np.floor(zeta * target)), kept_pos.shape[0])
            grow_n += k
            removed = kept_pos[kept_pos.shape[0] - k:]
            kept_pos, kept_val, kept_vel = kept_pos[:kept_pos.shape[0] - k], kept_val[:kept_val.shape[0] - k], \
                kept_vel[:kept_vel.shape[0] - k]
        else:
            removed = np.empty(0, np.int64)
        new_pos = _grow(n_in * n_out, grow_n, np.sort(kept_pos), np.sort(removed),
                        [v[l] for v in votes] if votes else [], w, rng)
        all_pos = np.concatenate([kept_pos, new_pos])
        all_val = np.concatenate([kept_val, np.zeros(new_pos.shape[0])])
        indptr, indices, perm = csr_from_positions(n_in, n_out, all_pos)
        out.append(SparseLayer(n_in, n_out, indptr, indices, all_val[perm].astype(np.float32),
                               bias.astype(np.float32)))
        if stepping:
            all_vel = np.concatenate([kept_vel, np.zeros(new_pos.shape[0])])
            velocity.append(SparseLayer(n_in, n_out, indptr, indices, all_vel[perm].astype(np.float32),
                                        bias_vel.astype(np.float32)))
    if stepping:
        server.layers = velocity
    return out


def _grow(total: int, k: int, kept: np.ndarray, removed: np.ndarray, votes: list, w: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """k new positions, neither kept nor just removed: most-voted first, then uniformly at random."""
    if k <= 0:
        return np.empty(0, np.int64)
    excluded = np.union1d(kept, removed)
    chosen = np.empty(0, np.int64)
    if votes and any(v.shape[0] for v in votes):
        pos = np.concatenate(votes).astype(np.int64)
        score = np.concatenate([np.full(v.shape[0], wc) for v, wc in zip(votes, w)])
        uniq, inv = np.unique(pos, return_inverse=True)
        total_score = np.bincount(inv, score, uniq.shape[0])
        fresh = ~np.isin(uniq, excluded)
        uniq, total_score = uniq[fresh], total_score[fresh]
        chosen = uniq[np.lexsort((uniq, -total_score))][:k]
    rest = k - chosen.shape[0]
    if rest > 0:
        excl = np.union1d(excluded, chosen)
        rest = min(rest, total - excl.shape[0])
        chosen = np.concatenate([chosen, sample_positions(total, rest, excl, rng)])
    return chosen
