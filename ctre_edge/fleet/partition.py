"""Split one data set among simulated clients: iid, or label skew drawn from a Dirichlet distribution.

``dirichlet:ALPHA`` gives client k the share p[c, k] of class c, with p[c] ~ Dirichlet(ALPHA)
(Hsu et al., 2019); smaller ALPHA, more skew. Departure: every client keeps at least 2 samples
of every class (taken from the client holding the most), because the trainer's validation split
is stratified and needs 2 per class. Each client's part is written as an ``.npz`` with its
original labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import Dataset, stratified_split
from ..errors import ConfigError, DataError

MIN_PER_CLASS = 2


def parse_partition(text: str) -> tuple[str, float]:
    if text == "iid":
        return "iid", 0.0
    if text.startswith("dirichlet:"):
        try:
            alpha = float(text.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if alpha > 0 and np.isfinite(alpha):
            return "dirichlet", alpha
    raise ConfigError(f"--partition must be iid or dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.3; got {text!r}")


def assign(y: np.ndarray, n_clients: int, kind: str, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each client (sorted)."""
    n_classes = int(y.max()) + 1
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < MIN_PER_CLASS * n_clients:
        raise DataError(f"a class has {counts.min()} samples; {n_clients} clients need at least "
                        f"{MIN_PER_CLASS * n_clients} of every class; use fewer --clients")
    if kind == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(y.shape[0]), n_clients)]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        share = rng.dirichlet(np.full(n_clients, alpha))
        sizes = np.floor(share * (idx.shape[0] - MIN_PER_CLASS * n_clients)).astype(np.int64) + MIN_PER_CLASS
        sizes[np.argmax(sizes)] += idx.shape[0] - sizes.sum()
        for k, piece in enumerate(np.split(idx, np.cumsum(sizes)[:-1])):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) for p in parts]


def split_clients(data: Dataset, n_clients: int, kind: str, alpha: float, test_fraction: float, seed: int,
                  out_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Write client files into ``out_dir``; return them and the held-out test set (X, coded y)."""
    rng = np.random.default_rng([seed, 14])
    labels = np.asarray(data.classes)
    if data.X_test is not None:
        rows, X_test, y_test = np.arange(data.X.shape[0]), data.X_test, data.y_test
    else:
        rows, test = stratified_split(data.y, test_fraction, rng, "test")
        X_test, y_test = data.X[test], data.y[test]
    files = []
    for k, part in enumerate(assign(data.y[rows], n_clients, kind, alpha, rng)):
        path = Path(out_dir) / f"client{k}.npz"
        np.savez(path, X=data.X[rows[part]], y=labels[data.y[rows[part]]])
        files.append(path)
    return files, X_test, y_test
