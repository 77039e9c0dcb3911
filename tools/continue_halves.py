"""Learning from new data: train on half A, continue on half B, against training on A+B from scratch.

Each data set loses a stratified 20% test part (seeded); the rest is split into two stratified
halves A and B. Four runs share every setting and the seed, and are scored on the same test part:

- ``A``: trained on A alone (what the device had before the new data arrived);
- ``A then B``: the ``A`` model continued on B (``SparseMLPClassifier.partial_fit``, the same run as
  ``ctre-edge train --from A.ctre --data B``: A's weights, topology and input scaling, evolution on);
- ``A+B``: trained on both halves from scratch;
- ``B``: trained on B alone.

    python -m tools.continue_halves                      # digits and coil20, as in README
    python -m tools.continue_halves --data digits --epochs 5 --hidden 64   # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ctre_edge.api import SparseMLPClassifier
from ctre_edge.data import load_data, stratified_split
from tools._common import find_dataset, machine_header


def halves(y: np.ndarray, seed: int):
    """(A rows, B rows, test rows): a stratified 20% test part, the rest in two stratified halves."""
    rng = np.random.default_rng(seed)
    rest, test = stratified_split(y, 0.2, rng, "test")
    a, b = stratified_split(y[rest], 0.5, rng, "half")
    return rest[a], rest[b], test


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits,coil20", help="comma-separated shared data sets (or builtin:digits)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hidden", default="256,256")
    p.add_argument("--epsilon", type=float, default=10)
    p.add_argument("--method", default="ctre-sim")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--early-stop", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    settings = dict(hidden=tuple(int(h) for h in a.hidden.split(",")), epsilon=a.epsilon, method=a.method,
                    epochs=a.epochs, early_stop=a.early_stop, seed=a.seed)
    print(machine_header())
    print(f"\nsettings: {settings}; 20% test part, the rest in halves A and B (stratified, seed {a.seed})\n")
    print("| data | samples A / B / test | A | A then B | A+B from scratch | B | seconds A / then B / A+B |")
    print("|---|---|---|---|---|---|---|")
    for name in a.data.split(","):
        d = load_data(name if name.startswith("builtin:") else str(find_dataset(name + ".npz", a.data_dir)))
        X, y = d.X, np.asarray(d.classes)[d.y]
        ia, ib, it = halves(d.y, a.seed)
        acc, secs = {}, {}

        def fit(key, rows, start=None):
            t = time.perf_counter()
            clf = start.partial_fit(X[rows], y[rows]) if start is not None else \
                SparseMLPClassifier(**settings).fit(X[rows], y[rows])
            secs[key] = time.perf_counter() - t
            acc[key] = clf.score(X[it], y[it])
            return clf

        fit("A then B", ib, fit("A", ia))
        fit("A+B", np.sort(np.concatenate([ia, ib])))
        fit("B", ib)
        print(f"| {name} | {len(ia)} / {len(ib)} / {len(it)} | {acc['A']:.4f} | {acc['A then B']:.4f} | "
              f"{acc['A+B']:.4f} | {acc['B']:.4f} | {secs['A']:.1f} / {secs['A then B']:.1f} / {secs['A+B']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
