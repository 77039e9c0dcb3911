"""Soak test: resident memory over a long training run and over many predictions, as on a device for months.

Two phases, each printing VmRSS (from /proc/self/status, so Linux only) at intervals:

- train: ``--epochs`` epochs (default 500, early stop off) of ctre-sim on the built-in digits with a
  checkpoint written every epoch, through the run layer as ``ctre-edge train`` does;
- predict: the model exported to ONNX, then ``--predicts`` calls (default 10,000) of
  ``runtime.OnnxModel.predict`` in a fresh interpreter that imports only numpy and onnxruntime (via
  ``ctre_edge.runtime``), one row per call, cycling through the digits.

RSS is compared with its value after warm-up (``--warmup-share`` of each phase, default 10%): the tool
exits 1 when the last or the largest sample after warm-up exceeds it by more than ``--max-growth``
(default 5%).

Usage: ``python -m tools.soak [--epochs 500] [--predicts 10000] [--hidden 1000,1000,1000]``;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tools._common import REPO, machine_header

MiB = 1 << 20

# Runs in a fresh interpreter: argv = model.onnx, features.npy, calls, samples; prints JSON [[call, rss], ...].
PREDICT_CHILD = r"""
import json, sys
import numpy as np
from ctre_edge.runtime import OnnxModel

def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024

path, features, calls, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = OnnxModel(path, threads=1)
X = np.load(features)
rows = [(0, rss())]
for i in range(1, calls + 1):
    model.predict(X[i % X.shape[0]])
    if i % every == 0 or i == calls:
        rows.append((i, rss()))
print(json.dumps(rows))
"""


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def soak_train(epochs: int, hidden: tuple, every: int, directory: Path) -> tuple[list, object]:
    """[(epoch, rss)] over a checkpointed run; the trained model."""
    from ctre_edge import run
    from ctre_edge.checkpoint import Checkpointing
    from ctre_edge.config import TrainConfig

    config = TrainConfig(hidden=hidden, epochs=epochs, early_stop=0)
    prepared = run.prepare(config, run.DataSpec("builtin:digits"))
    rows = [(0, rss_bytes())]

    def progress(stats):
        if stats.epoch % every == 0 or stats.epoch == epochs:
            rows.append((stats.epoch, rss_bytes()))

    report = run.execute(prepared, source="builtin:digits", checkpointing=Checkpointing(directory / "ckpt"),
                         progress=progress)
    return rows, report.model


def soak_predict(model, calls: int, every: int, directory: Path) -> list:
    """[(call, rss)] of ``calls`` one-row predictions in a fresh interpreter."""
    from ctre_edge.data import load_data
    from ctre_edge.export import export_onnx

    path = directory / "soak.onnx"
    export_onnx(model, path, force=True)
    features = directory / "digits.npy"
    np.save(features, load_data("builtin:digits").X.astype(np.float32))
    r = subprocess.run([sys.executable, "-c", PREDICT_CHILD, str(path), str(features), str(calls), str(every)],
                       capture_output=True, text=True, cwd=REPO, check=True)
    return [tuple(row) for row in json.loads(r.stdout)]


def growth(rows: list, warmup_step: int) -> tuple[int, float, float]:
    """(RSS at warm-up, last/warm-up - 1, max after warm-up/warm-up - 1) of [(step, rss)] rows."""
    warm = next(rss for step, rss in rows if step >= warmup_step)
    after = [rss for step, rss in rows if step >= warmup_step]
    return warm, after[-1] / warm - 1, max(after) / warm - 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--predicts", type=int, default=10_000)
    p.add_argument("--hidden", default="1000,1000,1000")
    p.add_argument("--samples", type=int, default=10, help="RSS samples per phase after the start")
    p.add_argument("--warmup-share", type=float, default=0.1)
    p.add_argument("--max-growth", type=float, default=0.05)
    a = p.parse_args(argv)
    hidden = tuple(int(h) for h in a.hidden.split(","))
    print(machine_header())
    print(f"\n`python -m tools.soak --epochs {a.epochs} --predicts {a.predicts} --hidden {a.hidden}`: "
          f"VmRSS at intervals; growth is against the sample after the first {a.warmup_share:.0%} of each phase\n")
    with tempfile.TemporaryDirectory() as tmp:
        train_rows, model = soak_train(a.epochs, hidden, max(1, a.epochs // a.samples), Path(tmp))
        predict_rows = soak_predict(model, a.predicts, max(1, a.predicts // a.samples), Path(tmp))
    print("| phase | step | RSS (MiB) | vs warm-up |")
    print("|---|---|---|---|")
    verdicts = []
    for phase, unit, rows, total in (("train", "epoch", train_rows, a.epochs),
                                     ("predict", "call", predict_rows, a.predicts)):
        warm_step = max(1, int(round(a.warmup_share * total)))
        warm, last, peak = growth(rows, warm_step)
        for step, rss in rows:
            vs = f"{rss / warm - 1:+.1%}" if step >= warm_step else "(warm-up)"
            print(f"| {phase} | {unit} {step} | {rss / MiB:.1f} | {vs} |")
        verdicts.append((phase, last, peak))
    print()
    ok = True
    for phase, last, peak in verdicts:
        fine = last <= a.max_growth and peak <= a.max_growth
        ok &= fine
        print(f"{phase}: RSS after warm-up grew {last:+.1%} by the end, {peak:+.1%} at most "
              f"({'within' if fine else 'OVER'} {a.max_growth:.0%})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
