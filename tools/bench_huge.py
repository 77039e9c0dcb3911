"""The SET authors' largest truly sparse network, trained here: seconds per epoch, peak memory, the plan.

3312-600000-600000-600000-5 at epsilon 20 (1,803,317 neurons, about 63 million connections), batch 2,
zeta 0.3, SET, lr 0.01, on SYNTHETIC data of the lung data set's shape (203 samples x 3312 float32
features, 5 classes: a random template per class plus noise; the real data is not shipped): 1/3 of
the rows held out as the test part and 10% of the rest for validation, as ``train`` splits them.
The authors report 112 minutes per epoch for this network on a 16 GB laptop (SciPy + Cython).

The run is a child process, so its peak resident memory (VmHWM) is its own; it trains --epochs
timed epochs, each with its validation pass and its topology update (the first epoch also loads the
kernels; the median epoch is reported). Next to it: the planner's prediction for the same run
(``budget.plan_training``) and the ``rpi-5-8gb`` profile's training budget. That profile's policy
caps (40 million parameters, width 65,536) refuse this network before memory is looked at; the
memory verdict alone is printed, as ``tools/scaling.py`` does. Times are this machine's, not a Pi's.

    python -m tools.bench_huge [--width 600000] [--epochs 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics

from tools import _common as bt

PROFILE = "rpi-5-8gb"
MiB = 1 << 20


def lung_like(n: int = 203, n_features: int = 3312, n_classes: int = 5, seed: int = 0):
    """Synthetic float32 data of the lung data set's shape (class template plus noise)."""
    import numpy as np

    from ctre_edge.data import make_dataset

    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(n_classes, n_features)).astype(np.float32)
    y = np.arange(n) % n_classes
    rng.shuffle(y)
    X = templates[y] + rng.normal(scale=2.0, size=(n, n_features)).astype(np.float32)
    return make_dataset(X, y, name="synthetic lung-shaped", source="synthetic")


def config_for(width: int, layers: int, epochs: int):
    from ctre_edge.train import TrainConfig

    return TrainConfig(hidden=(width,) * layers, method="set", epsilon=20.0, zeta=0.3, batch_size=2, lr=0.01,
                       epochs=epochs + 1, test_fraction=1 / 3, seed=0, early_stop=0).validate()


def child(spec: dict) -> dict:
    import time

    import numba

    if spec["threads"]:
        numba.set_num_threads(spec["threads"])
    from ctre_edge.budget import plan_training, shape_of
    from ctre_edge.data import summarize_loaded
    from ctre_edge.train import Interrupted, train

    bt.warm_kernel_cache()
    data = lung_like()
    config = config_for(spec["width"], spec["layers"], spec["epochs"])
    predicted = plan_training(shape_of(config, summarize_loaded(data), data.nbytes)).total
    history = []
    calls = [0]

    def stop_requested():
        calls[0] += 1
        return 1 if calls[0] >= spec["epochs"] else 0

    t0 = time.perf_counter()
    try:
        train(data, config, progress=lambda s: history.append({"seconds": s.seconds, "update": s.update_seconds,
                                                               "val_accuracy": s.val_accuracy}),
              stop_requested=stop_requested)
    except Interrupted:
        pass
    return {"history": history, "wall": time.perf_counter() - t0, "predicted_bytes": predicted,
            "peak_rss_bytes": bt.peak_rss_bytes(), "threads": numba.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=600000, help="hidden width (the authors': 600000)")
    ap.add_argument("--layers", type=int, default=3, help="hidden layers")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs, each with its topology update")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (0: numba's default, all cores)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from ctre_edge.budget import fit_to_budget, shape_of
    from ctre_edge.data import summarize_loaded
    from ctre_edge.profiles import load_profile

    profile = load_profile(PROFILE)
    data = lung_like()
    config = config_for(args.width, args.layers, args.epochs)
    shape = shape_of(config, summarize_loaded(data), data.nbytes)
    _, memory_plan = fit_to_budget(shape, profile.train_budget_bytes, profile.name)
    print(bt.machine_header())
    sizes = shape.sizes
    print(f"network: {'-'.join(map(str, sizes))}, epsilon 20, {sum(shape.nnz):,} connections, SET, zeta 0.3, "
          f"batch 2, lr 0.01; SYNTHETIC data of the lung data set's shape, 203 x 3312 float32, 5 classes "
          f"({shape.n_train} training, {shape.n_val} validation, {shape.n_test} test rows)")
    print(f"profile {PROFILE}: training budget {profile.train_budget_bytes / MiB:,.0f} MiB, the planner fits runs "
          f"within {memory_plan.headroom:.0%} of it; memory alone: "
          + ("fits" if memory_plan.fits else "does not fit")
          + (f" with {', '.join(memory_plan.changes)}" if memory_plan.changes else "")
          + f" (its caps of {profile.max_params:,} parameters and width {profile.max_layer_width:,} refuse the run)\n")
    res = bt.run_child("bench_huge", {"width": args.width, "layers": args.layers, "epochs": args.epochs,
                                      "threads": args.threads})
    if "error" in res:
        raise SystemExit(f"the run failed: {res['error']}")
    hist = res["history"]
    median = statistics.median(h["seconds"] for h in hist)
    measured, predicted = res["peak_rss_bytes"], res["predicted_bytes"]
    head = ["threads", "s/epoch (median)", "epochs (s)", "update (s)", "measured peak MiB", "predicted peak MiB",
            "measured / predicted", f"within the {PROFILE} budget"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| " + " | ".join([str(res["threads"]), f"{median:.1f}", ", ".join(f"{h['seconds']:.1f}" for h in hist),
                             ", ".join(f"{h['update']:.1f}" for h in hist), f"{measured / MiB:,.0f}",
                             f"{predicted / MiB:,.0f}", f"{measured / predicted:.2f}",
                             "yes" if measured <= profile.train_budget_bytes else "NO"]) + " |")


if __name__ == "__main__":
    main()
