"""Predicted against measured peak memory of real training runs, over a grid of shapes.

Each row runs `ctre-edge train --json` in a fresh process (warm kernel cache) and prints the
planner's prediction next to the peak resident set the run measured itself, and their ratio.
The first row trains a tiny network on builtin:digits: its measured peak is, to within a few MiB,
the runtime constant `budget.RUNTIME_BYTES`.

    python -m tools.plan_vs_measured [--data PATH.npz] [--quick]
"""

import argparse
import json
import subprocess
import sys

GRID = [
    # (hidden, epsilon, method, batch)
    ("10", 1, "set", 100),
    ("1000,1000,1000", 1, "set", 100),
    ("1000,1000,1000", 1, "ctre-sim", 100),
    ("1000,1000,1000", 20, "set", 100),
    ("4000,4000,4000", 1, "set", 100),
    ("4000,4000,4000", 20, "ctre-sim", 100),
    ("16000,16000,16000", 1, "set", 100),
    ("1000,1000,1000", 1, "set", 1000),
]


def run(data, hidden, eps, method, batch, epochs):
    cmd = [sys.executable, "-m", "ctre_edge.cli", "train", "--data", data, "--hidden", hidden, "--epsilon", str(eps),
           "--method", method, "--batch-size", str(batch), "--epochs", str(epochs), "--similarity-samples", "1000",
           "--json", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1]
    return json.loads(out.stdout)["memory"], ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:digits", help="data set for every row but the first")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the first four rows")
    args = ap.parse_args()
    grid = GRID[:4] if args.quick else GRID
    print(f"data: {args.data}, {args.epochs} epochs per run\n")
    print("| hidden | epsilon | method | batch | predicted MiB | measured MiB | measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    for i, (hidden, eps, method, batch) in enumerate(grid):
        mem, error = run("builtin:digits" if i == 0 else args.data, hidden, eps, method, batch, args.epochs)
        if mem is None:
            print(f"| {hidden} | {eps} | {method} | {batch} | - | - | failed: {error} |")
            continue
        p, m = mem["predicted_peak_bytes"] / 2**20, mem["measured_peak_bytes"] / 2**20
        print(f"| {hidden} | {eps} | {method} | {batch} | {p:.0f} | {m:.0f} | {m / p:.2f} |", flush=True)


if __name__ == "__main__":
    main()
