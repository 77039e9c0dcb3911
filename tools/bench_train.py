"""Training speed and peak memory of ctre-edge against a dense-masked numpy/BLAS baseline.

For 784-h-h-h-10 networks (h in --hidden-sizes, Erdos-Renyi at each --epsilons), one row per shape:
seconds per epoch and peak resident memory of

- **ctre-edge**: ``ctre_edge.train.train`` (SET, lr 0.01, batch 100), truly sparse;
- **dense-masked**: the same network written with numpy (``tools/dense_baseline.py``) the way sparse training is usually
  simulated: dense float32 weight matrices and dense float32 0/1 masks, gradients by BLAS matrix
  products and multiplied by the mask, the same Nesterov SGD (momentum 0.9, L2 1e-4), ReLU, softmax
  cross-entropy, batch 100, the same train/validation split, input scaling, initial topology and weights
  (``ctre_edge.train.init_layers`` with the same seed), a validation pass per epoch and the same SET rule
  applied to the masks after every epoch but the last (drop the floor(0.2 nnz) smallest |w|, regrow as
  many at random positions that are not kept). The weights are kept masked (gradient and momentum are
  masked), so the forward pass multiplies by W directly. It keeps no best-epoch copy (ctre-edge does),
  which favours it in memory;
- **scikit-learn** ``MLPClassifier`` (dense, SGD with Nesterov momentum), only if scikit-learn imports.

Each measurement runs in its own subprocess, so the peak RSS (VmHWM in the child, which includes the
interpreter and libraries) is that run's alone; the engines alternate, and each cell is
the median over --repeats runs of the median epoch. An epoch includes its validation pass and its
topology update: each run trains --epochs timed epochs plus none after (ctre-edge's ``train`` is
stopped as on a signal once the timed epochs are done, since its last epoch has no update). The test
split of the data file is not used.
Where an epoch would take longer than --epoch-budget seconds, only as many batches (and validation
samples) as fit in the budget are run and the epoch is extrapolated linearly; the table says so. The
dense baseline is skipped where its estimated bytes (weights + masks + momentum + gradients) exceed
60% of MemAvailable.

Useful GFLOP/s counts 6 flops per connection per training sample (forward, input gradient, weight
gradient: one multiply-add, i.e. 2 flops, each) over the time spent in the training batches; for the
dense baseline the same useful work is divided by its time, and the flops it executes (6 per matrix
entry per sample) are given too. ctre-edge's kernels run on one core; numpy's BLAS uses every core unless
--blas-threads says otherwise. Other jobs on the machine skew the timings: the load average is printed.

    python -m tools.bench_train [--data mnist.npz | --data-dir DIR | --synthetic] [--quick] [--repeats 3]
                                [--hidden-sizes 1000,4000,16000,64000] [--epsilons 1,20] [--blas-threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tools._common import (
    BATCH,
    LR,
    SEED,
    MiB,
    TimeBox,
    dataset_rows,
    epoch_median,
    find_dataset,
    fmt_seconds,
    gemm_gflops_with,
    load_child_data,
    machine_header,
    meminfo,
    peak_rss_bytes,
    run_child,
    warm_kernel_cache,
)
from tools.dense_baseline import DenseMLP, dense_run, sklearn_available, sklearn_run


def ctre_run(data, config, *, timed_epochs=None, train_budget=None, val_budget=None, min_batches=2) -> dict:
    """``ctre_edge.train.train`` with a TimeBox as its row budget; per-epoch records and the nnz per layer.

    With ``timed_epochs``, ``config.epochs`` must exceed it: the run stops (as on a signal) after that
    many epochs, each of which has had its topology update, and no test pass is made.
    """
    from ctre_edge.layers import er_nnz  # with train below: loads numba, in the child only
    from ctre_edge.train import Interrupted, train

    warm_kernel_cache()
    calls = [0]

    def stop_requested():
        calls[0] += 1
        return 1 if timed_epochs is not None and calls[0] >= timed_epochs else 0

    result = None
    box = TimeBox(min(config.batch_size, dataset_rows(data)[0]), train_budget, val_budget, min_batches)
    try:
        result = train(data, config, progress=box.end_epoch, stop_requested=stop_requested, budget=box)
    except Interrupted:
        pass
    sizes = [data.n_features, *config.hidden, len(data.classes)]
    return {"history": box.records, "nnz": [er_nnz(a, b, config.epsilon) for a, b in zip(sizes[:-1], sizes[1:])],
            "sizes": sizes, "test_accuracy": None if result is None else result.test_accuracy}


def child(spec: dict) -> dict:
    data = load_child_data(spec)
    hidden = spec["hidden"]
    budget = spec.get("budget")
    val_budget = None if budget is None else budget / 3
    if spec["engine"] == "ctre":
        from ctre_edge.train import TrainConfig

        config = TrainConfig(hidden=tuple(hidden), method="set", epsilon=spec["epsilon"], epochs=spec["epochs"] + 1,
                             lr=LR, batch_size=BATCH, seed=SEED, test_fraction=0.0).validate()
        out = ctre_run(data, config, timed_epochs=spec["epochs"], train_budget=budget, val_budget=val_budget)
    elif spec["engine"] == "dense":
        out = dense_run(data, hidden, spec["epsilon"], spec["epochs"] + 1, timed_epochs=spec["epochs"],
                        train_budget=budget, val_budget=val_budget)
    else:
        out = sklearn_run(data, hidden, spec["epochs"], train_budget=budget)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="MNIST-like .npz file (default: mnist.npz in --data-dir)")
    ap.add_argument("--data-dir",
                    help="folder holding mnist.npz (default: ./datasets, else the shared datasets folder)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic MNIST-shaped uint8 data instead of MNIST")
    ap.add_argument("--hidden-sizes", default="1000,4000,16000,64000", help="hidden widths h of 784-h-h-h-10")
    ap.add_argument("--epsilons", default="1,20")
    ap.add_argument("--layers", type=int, default=3, help="hidden layers")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per run, each with its topology update")
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine and shape (median reported)")
    ap.add_argument("--epoch-budget", type=float, default=60.0,
                    help="seconds of training per epoch before extrapolating (validation gets a third of it)")
    ap.add_argument("--memory-fraction", type=float, default=0.6,
                    help="skip the dense baseline above this fraction of MemAvailable")
    ap.add_argument("--blas-threads", type=int, default=0,
                    help="BLAS threads of the dense baseline and scikit-learn (0: the library default, all cores)")
    ap.add_argument("--quick", action="store_true",
                    help="only (h, eps) = (1000, 1), (1000, 20), (16000, 1); 1 epoch; 2 repeats; 8 s budget")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    shapes = [(int(h), float(e)) for h in args.hidden_sizes.split(",") for e in args.epsilons.split(",")]
    if args.quick:
        shapes, args.epochs, args.repeats, args.epoch_budget = [(1000, 1.0), (1000, 20.0), (16000, 1.0)], 1, 2, 8.0
    n_synthetic = 60000
    if args.smoke:
        shapes, args.epochs, args.repeats, args.epoch_budget = [(64, 1.0)], 1, 1, 5.0
        args.synthetic, n_synthetic = True, 2000
    if args.synthetic:
        data_spec, n_samples, n_features, n_classes = f"synthetic:{n_synthetic}", n_synthetic, 784, 10
        data_name = f"synthetic MNIST-shaped uint8, {n_synthetic} x 784"
    else:
        path = Path(args.data) if args.data else find_dataset("mnist.npz", args.data_dir)
        if not path.exists():
            raise SystemExit(f"{path.name} not found")
        from ctre_edge.data import summarize_data

        summary = summarize_data(str(path))
        data_spec, n_samples = str(path), summary.n_samples
        n_features, n_classes = summary.n_features, summary.n_classes
        data_name = f"{path.name}, {n_samples} x {n_features} (its test part is not used)"
    n_train, n_val = dataset_rows(n_samples)
    with_sklearn = sklearn_available()

    from ctre_edge.layers import er_nnz

    warm_kernel_cache()
    print(machine_header())
    gemm_all, gemm_one = gemm_gflops_with(0), gemm_gflops_with(1)
    print(f"numpy float32 GEMM 1000x1000 @ 1000x100: {gemm_all:.0f} GFLOP/s with the BLAS default threads, "
          f"{gemm_one:.0f} GFLOP/s with 1 thread (median of 30)")
    print(f"dense baseline BLAS threads: {args.blas_threads or 'library default (all cores)'}; "
          "ctre-edge's training kernels run on one core")
    print(f"data: {data_name}, about {n_train} training and {n_val} validation rows per epoch; SET, lr {LR}, "
          f"batch {BATCH}; {args.epochs} timed epoch(s) per run (each with its topology update), median epoch; "
          f"median of {args.repeats} run(s) per engine, engines alternated; epoch budget {args.epoch_budget:g} s")
    print("scikit-learn: " + ("MLPClassifier column included" if with_sklearn else "not importable, column omitted"))
    print()
    head = ["h", "eps", "connections", "ctre-edge s/epoch", "dense-masked s/epoch", "speed-up"]
    head += ["sklearn s/epoch"] if with_sklearn else []
    head += ["ctre-edge peak MiB", "dense peak MiB", "memory ratio", "ctre-edge useful GFLOP/s",
             "dense useful / executed GFLOP/s", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    avail = meminfo("MemAvailable") or 0
    for h, eps in shapes:
        if True:
            sizes = [n_features] + [h] * args.layers + [n_classes]
            nnz = sum(er_nnz(a, b, eps) for a, b in zip(sizes[:-1], sizes[1:]))
            spec = {"data": data_spec, "hidden": [h] * args.layers, "epsilon": eps, "epochs": args.epochs,
                    "budget": args.epoch_budget}
            engines = ["ctre", "dense"] + (["sklearn"] if with_sklearn else [])
            skip = {}
            need = DenseMLP.bytes_estimate(sizes) + 200 * MiB
            if avail and need > args.memory_fraction * avail:
                skip["dense"] = (f"dense skipped: needs about {need / 2**30:.1f} GiB, above "
                                 f"{args.memory_fraction:.0%} of the {avail / 2**30:.1f} GiB available")
            if with_sklearn and avail and 2 * need > args.memory_fraction * avail:
                skip["sklearn"] = "sklearn skipped: float64 weights would not fit"
            runs = {e: [] for e in engines}
            errors = {}
            for r in range(args.repeats):
                order = engines if r % 2 == 0 else engines[::-1]
                for e in order:
                    if e in skip or e in errors:
                        continue
                    threads = 0 if e == "ctre" else args.blas_threads
                    res = run_child("bench_train", dict(spec, engine=e), blas_threads=threads)
                    if "error" in res:
                        errors[e] = res["error"]
                    else:
                        runs[e].append(res)
            row = summarize_row(h, eps, nnz, sizes, runs, errors, skip, with_sklearn)
            print("| " + " | ".join(row) + " |", flush=True)


def summarize_row(h, eps, nnz, sizes, runs, errors, skip, with_sklearn) -> list[str]:
    entries = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    cell, notes = {}, []
    for e, results in runs.items():
        if not results:
            cell[e] = None
            if e in errors:
                notes.append(f"{e} failed: {errors[e]}")
            elif e in skip:
                notes.append(skip[e])
            continue
        mids = [epoch_median(r["history"]) for r in results]
        secs = statistics.median(m["epoch_seconds"] for m in mids)
        rate = statistics.median(6 * nnz * m["samples"] / m["train_seconds"] / 1e9 for m in mids if m["train_seconds"])
        peak = statistics.median(r["peak_rss_bytes"] for r in results) / MiB
        cell[e] = (secs, rate, peak, mids[0])
        m = mids[0]
        if m["batches"] < m["batches_total"] or m["val_samples"] < m["val_total"]:
            notes.append(f"{e}: extrapolated from {m['batches']}/{m['batches_total']} batches, "
                         f"{m['val_samples']}/{m['val_total']} validation rows")
    c, d = cell.get("ctre"), cell.get("dense")
    row = [f"{h:,}", f"{eps:g}", f"{nnz:,}", fmt_seconds(c[0]) if c else "-", fmt_seconds(d[0]) if d else "-",
           f"{d[0] / c[0]:.1f}x" if c and d else "-"]
    if with_sklearn:
        s = cell.get("sklearn")
        row.append(fmt_seconds(s[0]) if s else "-")
    row += [f"{c[2]:,.0f}" if c else "-", f"{d[2]:,.0f}" if d else "-",
            f"{d[2] / c[2]:.1f}x" if c and d else "-",
            f"{c[1]:.2f}" if c else "-",
            f"{d[1]:.3f} / {d[1] * entries / nnz:.0f}" if d else "-",
            "; ".join(notes) or "full epochs"]
    return row


if __name__ == "__main__":
    main()
