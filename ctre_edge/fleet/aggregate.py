"""Server-side aggregation of sparse client models, connection by connection, in sparse form.

Every rule starts like FedDST (Bibikar et al., AAAI 2022): for each layer, the union of the
clients' connections, each connection's weight the sample-weighted mean over the clients that
hold it (a client without it does not pull it towards zero), biases the weighted mean; then the
union is cut back to the layer's target connection count by magnitude. ``regrow`` then evolves
the global topology once per round as SET/CTRE do once per epoch: it drops the ``zeta`` weakest
of those and grows as many where the clients' cosine votes are strongest (CTRE's growth signal,
summed over clients, weighted by samples), at random where there are no votes (SET), with zero
weights so that a new connection does not change the function until the clients train it.
Memory is O(sum of client nnz); nothing is dense.
"""

from __future__ import annotations

import numpy as np

from ..layers import SparseLayer, csr_from_positions, linear_positions, sample_positions

RULES = ("regrow", "feddst")


def aggregate(clients: list[list[SparseLayer]], weights: list[float], targets: list[int], *, rule: str = "regrow",
              zeta: float = 0.2, votes: list[list[np.ndarray]] | None = None,
              rng: np.random.Generator | None = None) -> list[SparseLayer]:
    """One global model from client models; ``targets[l]`` connections in layer ``l``.

    ``votes[c][l]`` are client c's proposed linear positions for layer l (may be empty).
    """
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
        target = min(int(targets[l]), n_in * n_out)
        # Largest |w| first; position breaks ties so the result does not depend on client order.
        order = np.lexsort((uniq, -np.abs(mean)))
        keep = order[:min(target, order.shape[0])]
        kept_pos, kept_val = uniq[keep], mean[keep]
        grow_n = target - kept_pos.shape[0]  # the union may hold fewer connections than the target
        if rule == "regrow":
            k = min(int(np.floor(zeta * target)), kept_pos.shape[0])
            grow_n += k
            removed = kept_pos[kept_pos.shape[0] - k:]
            kept_pos, kept_val = kept_pos[:kept_pos.shape[0] - k], kept_val[:kept_val.shape[0] - k]
        else:
            removed = np.empty(0, np.int64)
        new_pos = _grow(n_in * n_out, grow_n, np.sort(kept_pos), np.sort(removed),
                        [v[l] for v in votes] if votes else [], w, rng)
        all_pos = np.concatenate([kept_pos, new_pos])
        all_val = np.concatenate([kept_val, np.zeros(new_pos.shape[0])])
        indptr, indices, perm = csr_from_positions(n_in, n_out, all_pos)
        out.append(SparseLayer(n_in, n_out, indptr, indices, all_val[perm].astype(np.float32),
                               bias.astype(np.float32)))
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
