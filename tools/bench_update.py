"""Cost of one CTRE topology update (exact and sketch scoring) next to one training epoch.

Trains the paper's network (784-1000-1000-1000-10 at epsilon 1 by default) for a few epochs with
ctre-sim, once per scoring mode, and prints the median seconds of the training part of an epoch and
of the topology update, and their ratio. Sketch mode also spends time inside the epoch folding
activations into the sketches; that cost is in the epoch column.

    python -m tools.bench_update --data mnist.npz [--epochs 6] [--samples 2000]
"""

import argparse
import platform
import statistics

from ctre_edge.data import load_data
from ctre_edge.train import TrainConfig, train


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=1000, help="S, samples for the cosine scores")
    ap.add_argument("--sketch-dim", type=int, default=256)
    args = ap.parse_args()
    data = load_data(args.data)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    print(f"{platform.machine()}, data {args.data}, {data.n_features}-{'-'.join(map(str, hidden))}-"
          f"{len(data.classes)}, epsilon 1, S = {args.samples}, sketch dim {args.sketch_dim}\n")
    print("| scoring | epoch without update (s) | update (s) | update / epoch |")
    print("|---|---|---|---|")
    for similarity in ("exact", "sketch"):
        config = TrainConfig(hidden=hidden, method="ctre-sim", similarity=similarity, epochs=args.epochs, lr=0.01,
                             similarity_samples=args.samples, sketch_dim=args.sketch_dim)
        history = train(data, config).history[1:-1]  # the first epoch compiles, the last has no update
        epoch = statistics.median(h.seconds - h.update_seconds for h in history)
        update = statistics.median(h.update_seconds for h in history)
        print(f"| {similarity} | {epoch:.3f} | {update:.3f} | {update / epoch:.1%} |", flush=True)


if __name__ == "__main__":
    main()
