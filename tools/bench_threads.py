"""Serial against parallel training: seconds per epoch on 1 and N threads, and whether the models match.

Trains 784-1000-1000-1000-10 (MNIST shape) at each epsilon on 1 thread and on N threads (default: all
numba threads), in fresh processes, and prints the median epoch time (first epoch, which may compile,
left out) and a hash of the trained model, which must be the same for every thread count.

    python -m tools.bench_threads --data mnist.npz [--epochs 4] [--epsilons 1,20]
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, statistics, sys
import numba
numba.set_num_threads(int(sys.argv[2]))
from ctre_edge.data import load_data
from ctre_edge.train import TrainConfig, train
r = train(load_data(sys.argv[1]), TrainConfig(epochs=int(sys.argv[3]), epsilon=float(sys.argv[4]), lr=0.01))
digest = hashlib.sha256(b"".join(a.tobytes() for a in r.model.arrays().values())).hexdigest()[:16]
print(json.dumps({"seconds": statistics.median(h.seconds for h in r.history[1:]), "hash": digest}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--epsilons", default="1,20")
    ap.add_argument("--threads", type=int, default=0, help="parallel thread count (0: numba's default)")
    args = ap.parse_args()
    import numba

    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    print(f"data {args.data}, 784-1000-1000-1000-10 shape, {args.epochs} epochs, median of epochs 2..\n")
    print(f"| epsilon | 1 thread s/epoch | {threads} threads s/epoch | speed-up | same model |")
    print("|---|---|---|---|---|")
    for eps in args.epsilons.split(","):
        runs = []
        for n in (1, threads):
            out = subprocess.run([sys.executable, "-c", CHILD, args.data, str(n), str(args.epochs), eps],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        same = "yes" if runs[0]["hash"] == runs[1]["hash"] else "NO"
        print(f"| {eps} | {runs[0]['seconds']:.3f} | {runs[1]['seconds']:.3f} | "
              f"{runs[0]['seconds'] / runs[1]['seconds']:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
