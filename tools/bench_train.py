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
entry per sample) are given too. ctre-edge's kernels use numba's threads (all cores by default, the same
model for any count); numpy's BLAS uses every core unless --blas-threads says otherwise. Other jobs on
the machine skew the timings: the load average is printed before every table.

With ``--base DIR`` (a second checkout of ctre-edge, e.g. ``git worktree add ../base <commit>``), a
**ctre-edge (base)** column runs that checkout's own ``tools/bench_train.py`` child the same way, in the
same alternation, so the speed-up of a change is measured in one run on one machine under the same load.

A phase table comes first: useful GFLOP/s of the forward pass, the weight gradient and the input
gradient of each layer of 784-h-h-h-10 at each epsilon, on random activations (batch 100, numba's
threads), median of --phase-repeats calls; next to it the machine's dense float32 GEMM rate. The
useful work of a phase is 2 flops (one multiply-add) per connection per sample. With ``--base`` the
base checkout's kernels are timed too (its backward computed both gradients in one loop, timed as
"weight + input gradient").

    python -m tools.bench_train [--data mnist.npz | --data-dir DIR | --synthetic] [--quick] [--repeats 3]
                                [--hidden-sizes 1000,4000,16000,64000] [--epsilons 1,20] [--blas-threads N]
                                [--base DIR] [--engines ctre,base,dense,sklearn] [--phases-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tools._common import (
    BATCH,
    LR,
    REPO,
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



ENGINES = ("ctre", "base", "dense", "sklearn")
LABELS = {"ctre": "ctre-edge", "base": "ctre-edge (base)", "dense": "dense-masked", "sklearn": "sklearn"}


def run_phases(hidden: int, eps: float, repeats: int, checkout: Path | None, threads: int = 0) -> dict:
    """``tools/kernel_phases.py`` in a fresh interpreter on this checkout's ctre_edge or ``checkout``'s."""
    import subprocess
    import sys

    from tools._common import REPO, checkout_env

    spec = {"hidden": hidden, "epsilon": eps, "batch": BATCH, "repeats": repeats, "threads": threads}
    env = checkout_env(checkout or REPO)  # this checkout keeps the caller's kernel cache
    out = subprocess.run([sys.executable, str(REPO / "tools" / "kernel_phases.py"), json.dumps(spec)],
                         capture_output=True, text=True, env=env, cwd=checkout or REPO)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_phases(shapes, repeats: int, base: Path | None, gemm_all: float) -> None:
    """The phase table: useful GFLOP/s per layer and phase on 1 thread and on all numba threads, this
    checkout (and the base) side by side."""
    import numba

    print(f"Kernel phases: useful GFLOP/s (2 flops per connection per sample and phase), batch {BATCH}, median of "
          f"{repeats} calls, random activations; dense float32 GEMM on this machine: {gemm_all:.0f} GFLOP/s\n")
    phases = ["forward", "weight gradient", "weight + input gradient"]
    head = ["h", "eps", "layer", "connections", "threads"] + phases
    if base is not None:
        head += [f"base {p}" for p in phases]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for h, eps in shapes:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            new = run_phases(h, eps, repeats, None, threads)
            old = run_phases(h, eps, repeats, base, threads) if base is not None else None
            if "error" in new:
                print(f"| {h:,} | {eps:g} | phases failed: {new['error']} |")
                continue
            for i, row in enumerate(new["rows"]):
                def rate(r, key, work=2 * row["nnz"] * BATCH / 1e9):
                    # "weight + input gradient" is two phases' work
                    return f"{work * (2 if '+' in key else 1) / r[key]:.3g}" if r and key in r else "-"

                cells = [f"{h:,}", f"{eps:g}", row["layer"], f"{row['nnz']:,}", str(new["threads"])]
                cells += [rate(row, p) for p in phases]
                if base is not None:
                    o = old["rows"][i] if old and "rows" in old else None
                    cells += [rate(o, p) for p in phases]
                print("| " + " | ".join(cells) + " |", flush=True)
    print()


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
    ap.add_argument("--base", help="a second checkout of ctre-edge to measure against, in the same run")
    ap.add_argument("--threads", type=int, default=0,
                    help="numba threads of the ctre-edge runs (NUMBA_NUM_THREADS; 0: numba's default, all cores)")
    ap.add_argument("--engines", default="ctre,base,dense,sklearn",
                    help="which columns to run (base needs --base; sklearn needs scikit-learn)")
    ap.add_argument("--phase-repeats", type=int, default=20, help="calls per kernel phase (median reported)")
    ap.add_argument("--phases-only", action="store_true", help="print the phase table and stop")
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
        args.synthetic, n_synthetic, args.phase_repeats = True, 2000, 3
    base = Path(args.base).resolve() if args.base else None
    if base is not None and not (base / "ctre_edge" / "kernels.py").exists():
        raise SystemExit(f"--base {args.base}: not a ctre-edge checkout (no ctre_edge/kernels.py there)")
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    with_sklearn = "sklearn" in wanted and sklearn_available()
    engines = [e for e in wanted if (e != "base" or base is not None) and (e != "sklearn" or with_sklearn)]

    from ctre_edge.layers import er_nnz

    if args.threads:
        import os

        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)  # inherited by every child below
    warm_kernel_cache()
    print(machine_header())
    gemm_all, gemm_one = gemm_gflops_with(0), gemm_gflops_with(1)
    print(f"numpy float32 GEMM 1000x1000 @ 1000x100: {gemm_all:.0f} GFLOP/s with the BLAS default threads, "
          f"{gemm_one:.0f} GFLOP/s with 1 thread (median of 30)")
    if base is not None:
        cache = "" if base.resolve() == REPO.resolve() else ", numba cache"
        print(f"base: the checkout in {base.name}/ (its own kernels{cache} and bench child)")
    print()
    print_phases(shapes, args.phase_repeats, base if "base" in engines else None, gemm_all)
    if args.phases_only:
        return

    if args.synthetic:
        data_spec, n_samples, n_features, n_classes = f"synthetic:{n_synthetic}", n_synthetic, 784, 10
        data_name = f"synthetic MNIST-shaped uint8, {n_synthetic} x 784"
    else:
        path = Path(args.data) if args.data else find_dataset("mnist.npz", args.data_dir)
        if not path.exists():
            raise SystemExit(f"{path.name} not found")
        from ctre_edge.data import summarize_data

        summary = summarize_data(str(path))
        data_spec, n_samples = str(path.resolve()), summary.n_samples
        n_features, n_classes = summary.n_features, summary.n_classes
        data_name = f"{path.name}, {n_samples} x {n_features} (its test part is not used)"
    n_train, n_val = dataset_rows(n_samples)
    print(f"dense baseline BLAS threads: {args.blas_threads or 'library default (all cores)'}; "
          f"ctre-edge: {args.threads or 'numba default (all cores)'} numba thread(s)")
    print(f"data: {data_name}, about {n_train} training and {n_val} validation rows per epoch; SET, lr {LR}, "
          f"batch {BATCH}; {args.epochs} timed epoch(s) per run (each with its topology update), median epoch; "
          f"median of {args.repeats} run(s) per engine, engines alternated; epoch budget {args.epoch_budget:g} s")
    print("engines: " + ", ".join(LABELS[e] for e in engines))
    print()
    head = ["h", "eps", "connections"] + [f"{LABELS[e]} s/epoch" for e in engines]
    if "ctre" in engines and "base" in engines:
        head.append("speed-up over base")
    if "ctre" in engines and "dense" in engines:
        head.append("speed-up over dense")
    head += [f"{LABELS[e]} peak MiB" for e in engines if e != "sklearn"]
    head += [f"{LABELS[e]} useful GFLOP/s" for e in engines if e in ("ctre", "base")]
    if "dense" in engines:
        head.append("dense useful / executed GFLOP/s")
    head.append("notes")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    avail = meminfo("MemAvailable") or 0
    for h, eps in shapes:
        sizes = [n_features] + [h] * args.layers + [n_classes]
        nnz = sum(er_nnz(a, b, eps) for a, b in zip(sizes[:-1], sizes[1:]))
        spec = {"data": data_spec, "hidden": [h] * args.layers, "epsilon": eps, "epochs": args.epochs,
                "budget": args.epoch_budget}
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
                threads = 0 if e in ("ctre", "base") else args.blas_threads
                res = run_child("bench_train", dict(spec, engine="ctre" if e == "base" else e), blas_threads=threads,
                                checkout=base if e == "base" else None)
                if "error" in res:
                    errors[e] = res["error"]
                else:
                    runs[e].append(res)
        row = summarize_row(h, eps, nnz, sizes, runs, errors, skip, engines)
        print("| " + " | ".join(row) + " |", flush=True)


def summarize_row(h, eps, nnz, sizes, runs, errors, skip, engines) -> list[str]:
    entries = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    cell, notes = {}, []
    for e, results in runs.items():
        if not results:
            cell[e] = None
            if e in errors:
                notes.append(f"{LABELS[e]} failed: {errors[e]}")
            elif e in skip:
                notes.append(skip[e])
            continue
        mids = [epoch_median(r["history"]) for r in results]
        secs = statistics.median(m["epoch_seconds"] for m in mids)
        rates = [6 * nnz * m["samples"] / m["train_seconds"] / 1e9 for m in mids if m["train_seconds"]]
        rate = statistics.median(rates) if rates else float("nan")
        peak = statistics.median(r["peak_rss_bytes"] for r in results) / MiB
        cell[e] = (secs, rate, peak, mids[0])
        m = mids[0]
        if m["batches"] < m["batches_total"] or m["val_samples"] < m["val_total"]:
            notes.append(f"{LABELS[e]}: extrapolated from {m['batches']}/{m['batches_total']} batches, "
                         f"{m['val_samples']}/{m['val_total']} validation rows")
    c, b, d = cell.get("ctre"), cell.get("base"), cell.get("dense")
    row = [f"{h:,}", f"{eps:g}", f"{nnz:,}"] + [fmt_seconds(cell[e][0]) if cell.get(e) else "-" for e in engines]
    if "ctre" in engines and "base" in engines:
        row.append(f"{b[0] / c[0]:.2f}x" if c and b else "-")
    if "ctre" in engines and "dense" in engines:
        row.append(f"{d[0] / c[0]:.1f}x" if c and d else "-")
    row += [f"{cell[e][2]:,.0f}" if cell.get(e) else "-" for e in engines if e != "sklearn"]
    row += [f"{cell[e][1]:.2f}" if cell.get(e) else "-" for e in engines if e in ("ctre", "base")]
    if "dense" in engines:
        row.append(f"{d[1]:.3f} / {d[1] * entries / nnz:.0f}" if d else "-")
    row.append("; ".join(notes) or "full epochs")
    return row


if __name__ == "__main__":
    main()
