"""Test accuracy of ctre-sim, ctre-seq, set, static and a dense MLP, at the paper's settings or ctre-edge's defaults.

``--settings paper`` (the default) is the paper's protocol (Atashgahi et al., Machine Learning 2022):
input-1000-1000-1000-classes, epsilon 1, zeta 0.2, learning rate 0.01 (constant), Nesterov momentum 0.9,
batch 100, L2 1e-4, 500 epochs; StandardScaler for Madelon and min-max scaling for the other data sets,
fitted on the training split, as the authors did. ``--settings defaults`` takes every setting from
``TrainConfig()`` instead (ctre-edge's defaults: learning rate, epochs, early stop, ``--scaling auto``).
``--init sparse,dense-glorot`` repeats each sparse method under each initialisation; the dense MLP is
trained once, with He/LeCun uniform initialisation (what a user of a dense MLP gets), the same settings
and early stop. ``--cli-defaults`` adds a row per data set trained by ``ctre-edge train --data FILE --seed S
--json`` and nothing else, in a child process: the out-of-the-box result. Each .npz file given is used as ``ctre-edge train`` uses it: its X_test/y_test when it
has them, else a stratified 20% test split; 10% of the rest is held out for validation and the test
accuracy is the one of the best validation epoch. Every run goes through the Python API
(``ctre_edge.data.load_data``, ``ctre_edge.train.train`` with a ``TrainConfig``) in this one process.

The dense MLP: by default (``--dense-engine numpy``) the numpy/BLAS MLP of ``tools/bench_train.py``
(``DenseMLP`` without masks) with the same seeds, split, scaling, Glorot initialisation, optimiser and
best-validation model. ``--dense-engine ctre`` instead trains ctre-edge itself with epsilon 1e9 and
method static, which ``er_nnz`` caps at n_in*n_out connections per layer (fully connected); that is
correct but slow, since ctre-edge's kernels are written for sparse layers.

Prints a markdown table (test accuracy mean ± sample standard deviation over the seeds, density,
seconds per run) and writes the same, with every run, as JSON to --out (written atomically; an
existing file is kept unless --force). Progress goes to stderr.

    python tools/reproduce.py [FILE.npz ...] [--seeds 5] [--epochs N] [--methods ctre-sim,set,...] [--quick]
                              [--out results.json [--force]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
bt = None  # tools/bench_train.py, imported in main() once --blas-threads is applied (it imports numpy)


def load_tools():
    global bt
    if bt is None:
        import bench_train  # tools/ is not a package

        bt = bench_train
    return bt


METHODS = ("ctre-sim", "ctre-seq", "set", "static", "dense")
INITS = ("sparse", "dense-glorot")
PAPER = {"epsilon": 1.0, "zeta": 0.2, "lr": 0.01, "momentum": 0.9, "batch_size": 100, "l2": 1e-4}
# Epochs per data set (by file stem), as the paper: 500 for every one of them; --epochs overrides.
PAPER_EPOCHS = {"madelon": 500, "mnist": 500, "coil20": 500, "pcmac": 500}
DEFAULT_EPOCHS = 500  # data sets the paper did not use
QUICK_FILES = ("digits.npz", "madelon.npz")


def scaling_for(name: str) -> str:
    """StandardScaler for Madelon, min-max for the rest (as the authors did)."""
    return "standard" if name.lower().startswith("madelon") else "minmax"


def dataset_name(path: Path) -> str:
    return path.stem


def settings_for(kind: str, name: str, epochs: int | None) -> dict:
    """TrainConfig keywords of one protocol for one data set (``epochs`` None: the protocol's own)."""
    from ctre_edge.train import TrainConfig

    if kind == "paper":
        return dict(PAPER, scaling=scaling_for(name), early_stop=0,
                    epochs=epochs or PAPER_EPOCHS.get(name.lower(), DEFAULT_EPOCHS))
    d = TrainConfig()
    return {"epsilon": d.epsilon, "zeta": d.zeta, "lr": d.lr, "momentum": d.momentum, "batch_size": d.batch_size,
            "l2": d.l2, "scaling": d.scaling, "early_stop": d.early_stop, "epochs": epochs or d.epochs}


def train_ctre(data, method: str, seed: int, settings: dict, hidden, similarity_samples: int, init: str) -> dict:
    from ctre_edge.train import TrainConfig, train

    dense = method == "dense"
    config = TrainConfig(hidden=tuple(hidden), method="static" if dense else method, seed=seed, init=init,
                         similarity_samples=similarity_samples,
                         **dict(settings, epsilon=1e9 if dense else settings["epsilon"])).validate()
    result = train(data, config)
    return {"test_accuracy": result.test_accuracy, "density": result.model.density, "nnz": result.model.nnz,
            "best_epoch": result.best_epoch, "epochs_run": len(result.history)}


def train_dense_numpy(data, seed: int, settings: dict, hidden) -> dict:
    out = load_tools().dense_run(data, list(hidden), 1e9, settings["epochs"], seed, masked=False, method="static",
                                 lr=settings["lr"], momentum=settings["momentum"], l2=settings["l2"],
                                 batch=settings["batch_size"], scaling=settings["scaling"], keep_best=True,
                                 test=True, init="sparse", early_stop=settings["early_stop"])
    sizes = out["sizes"]
    return {"test_accuracy": out.get("test_accuracy"), "density": 1.0,
            "nnz": [a * b for a, b in zip(sizes[:-1], sizes[1:])], "best_epoch": out["best_epoch"],
            "epochs_run": len(out["history"])}


def train_cli_defaults(path: Path, seed: int) -> dict:
    """``ctre-edge train --data FILE --seed S --json``, nothing else, in a child process."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "ctre_edge.cli", "train", "--data", str(path), "--seed", str(seed),
                           "--json", "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ctre-edge train failed on {path.name}: {proc.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(proc.stdout)
    return {"test_accuracy": doc["test_accuracy"], "density": doc["density"], "nnz": doc["nnz"],
            "best_epoch": doc["best_epoch"], "epochs_run": doc["epochs"], "warnings": doc["warnings"],
            "defaults": {k: doc["config"][k] for k in ("method", "init", "lr", "epochs", "early_stop", "scaling")}}


def warm_up(data) -> None:
    """Load the kernels this data set's dtype needs (training, evaluation, similarity) before any timing."""
    import numpy as np

    from ctre_edge.data import make_dataset
    from ctre_edge.train import TrainConfig, train

    rows = np.concatenate([np.flatnonzero(data.y == c)[:20] for c in range(len(data.classes))])
    tiny = make_dataset(data.X[rows], data.y[rows], name="warm-up")
    train(tiny, TrainConfig(hidden=(8, 8), method="ctre-sim", epochs=2, test_fraction=0.2, similarity_samples=32))


def summarize(runs: list[dict]) -> list[dict]:
    """Mean ± sample std of test accuracy per (data set, method), in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["init"], r["method"]), []).append(r)
    dense = {}
    out = []
    for (name, init, method), rs in groups.items():
        accs = [r["test_accuracy"] for r in rs if r["test_accuracy"] is not None]
        mean = statistics.fmean(accs) if accs else None
        if method == "dense":
            dense[name] = mean
        out.append({"dataset": name, "init": init, "method": method, "seeds": len(rs),
                    "test_accuracy_mean": mean, "test_accuracy_min": min(accs) if accs else None,
                    "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "density": statistics.fmean(r["density"] for r in rs),
                    "seconds_per_run": statistics.fmean(r["seconds"] for r in rs),
                    "epochs": rs[0]["epochs"], "epochs_run": statistics.fmean(r["epochs_run"] for r in rs),
                    "chance": rs[0]["chance"]})
    for s in out:
        d = dense.get(s["dataset"])
        s["of_dense"] = None if not d or s["test_accuracy_mean"] is None else s["test_accuracy_mean"] / d
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| data set | init | method | density | test accuracy (mean ± std) | lowest | of dense | chance "
             "| epochs run (of) | seconds per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        acc = "-" if s["test_accuracy_mean"] is None else \
            f"{100 * s['test_accuracy_mean']:.2f}% ± {100 * s['test_accuracy_std']:.2f}"
        low = "-" if s["test_accuracy_min"] is None else f"{100 * s['test_accuracy_min']:.2f}%"
        of_dense = "-" if s["of_dense"] is None or s["method"] == "dense" else f"{100 * s['of_dense']:.1f}%"
        lines.append(f"| {s['dataset']} | {s['init']} | {s['method']} | {100 * s['density']:.3g}% | {acc} | {low} | "
                     f"{of_dense} | {100 * s['chance']:.1f}% | {s['epochs_run']:.0f} ({s['epochs']}) | "
                     f"{load_tools().fmt_seconds(s['seconds_per_run'])} |")
    return "\n".join(lines)


def write_atomically(path: Path, doc: dict) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over (never a half-written file)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help=".npz data sets (default with --quick: digits and madelon from --data-dir)")
    ap.add_argument("--data-dir", help="where --quick looks for its data sets (default: ./datasets, else the "
                                       "shared datasets folder)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per data set and method")
    ap.add_argument("--settings", choices=("paper", "defaults"), default="paper",
                    help="the paper's protocol (default) or ctre-edge's TrainConfig defaults")
    ap.add_argument("--init", default="dense-glorot",
                    help="comma-separated initialisations of the sparse methods: sparse, dense-glorot (default: "
                         "the paper's dense-glorot)")
    ap.add_argument("--cli-defaults", action="store_true",
                    help="also run `ctre-edge train --data FILE --seed S --json` with nothing else")
    ap.add_argument("--epochs", type=int, help=f"epochs for every data set (default: the protocol's; paper {DEFAULT_EPOCHS})")
    ap.add_argument("--epochs-for", default="", help="per data set epochs, e.g. mnist=20 (overrides --epochs)")
    ap.add_argument("--hidden", default="1000,1000,1000", help="hidden layer widths")
    ap.add_argument("--epsilon", type=float, help="Erdos-Renyi epsilon of the sparse methods (default: the protocol's, 1)")
    ap.add_argument("--similarity-samples", type=int,
                    help="S for the cosine scores of ctre-* (default: paper 2000, defaults TrainConfig's)")
    ap.add_argument("--dense-engine", choices=("numpy", "ctre"), default="numpy",
                    help="dense MLP: numpy/BLAS (default) or ctre-edge at epsilon 1e9, static")
    ap.add_argument("--blas-threads", type=int,
                    help="BLAS threads of the numpy dense MLP (0: the library default, all cores; default 0, "
                         "1 with --quick): on a busy machine one thread is often several times faster")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    ap.add_argument("--quick", action="store_true", help="digits and madelon, 40 epochs, 2 seeds, 1 BLAS thread")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.blas_threads is None:
        args.blas_threads = 1 if args.quick or args.smoke else 0
    if args.blas_threads:
        if "numpy" in sys.modules:
            print("warning: numpy is already imported; --blas-threads has no effect", file=sys.stderr)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.blas_threads)
    load_tools()

    if args.out is not None and args.out.exists() and not args.force:
        raise SystemExit(f"{args.out.name} exists; pass --force to overwrite it")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    hidden = tuple(int(h) for h in args.hidden.split(","))
    inits = [i.strip() for i in args.init.split(",") if i.strip()]
    if not inits or any(i not in INITS for i in inits):
        raise SystemExit(f"--init takes a comma-separated subset of {', '.join(INITS)}; got {args.init!r}")
    try:
        epochs_for = {k.strip().lower(): int(v) for k, v in (p.split("=") for p in args.epochs_for.split(",") if p)}
    except ValueError:
        raise SystemExit(f"--epochs-for takes NAME=N[,NAME=N]; got {args.epochs_for!r}") from None
    if args.similarity_samples is None:
        from ctre_edge.train import TrainConfig

        args.similarity_samples = 2000 if args.settings == "paper" else TrainConfig().similarity_samples
    if args.quick:
        args.epochs = args.epochs or 40
        args.seeds = min(args.seeds, 2)
    if args.smoke:
        args.epochs, args.seeds, hidden, args.similarity_samples = 2, 1, (32, 32), 64
    files = [Path(f) for f in args.files]
    if not files:
        if not (args.quick or args.smoke):
            ap.error("give one or more .npz files (or --quick)")
        files = [bt.find_dataset(n, args.data_dir) for n in (QUICK_FILES[:1] if args.smoke else QUICK_FILES)]
    for f in files:
        if not f.exists():
            raise SystemExit(f"{f.name} not found")

    from ctre_edge.data import load_data

    header = bt.machine_header()
    print(header)
    print(f"BLAS threads of the numpy dense MLP: {args.blas_threads or 'library default'}")
    print(f"settings: {args.settings}; input-{'-'.join(map(str, hidden))}-classes; sparse initialisation "
          f"{', '.join(inits)}; similarity samples {args.similarity_samples}; seeds 0..{args.seeds - 1}")
    print("dense MLP: " + ("numpy/BLAS DenseMLP of tools/bench_train.py (fully connected, no masks, He/LeCun "
                            "uniform initialisation, same settings and early stop)"
                            if args.dense_engine == "numpy" else "ctre-edge, epsilon 1e9 (fully connected), static"))
    print()
    import numpy as np

    runs = []
    for path in files:
        data = load_data(str(path))
        name = dataset_name(path)
        settings = settings_for(args.settings, name, epochs_for.get(name.lower(), args.epochs))
        if args.epsilon is not None:
            settings["epsilon"] = args.epsilon
        labels = data.y_test if data.y_test is not None else data.y
        chance = float(np.bincount(labels).max() / labels.shape[0])
        print(f"{name}: {', '.join(f'{k} {v}' for k, v in settings.items())}", file=sys.stderr, flush=True)
        warm_up(data)
        jobs = [("cli defaults", "defaults")] if args.cli_defaults else []
        for method in methods:
            jobs += [("-", "dense")] if method == "dense" else [(init, method) for init in inits]
        for init, method in jobs:
            for seed in range(args.seeds):
                t = time.perf_counter()
                if method == "defaults":
                    r = train_cli_defaults(path, seed)
                elif method == "dense" and args.dense_engine == "numpy":
                    r = train_dense_numpy(data, seed, settings, hidden)
                else:
                    r = train_ctre(data, method, seed, settings, hidden, args.similarity_samples,
                                   "sparse" if method == "dense" else init)
                r.update(dataset=name, init=init, method=method, seed=seed, epochs=settings["epochs"],
                         scaling=settings["scaling"], chance=chance, seconds=time.perf_counter() - t)
                runs.append(r)
                acc = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
                print(f"{name} {init} {method} seed {seed}: test accuracy {acc} (best epoch {r['best_epoch']} of "
                      f"{r['epochs_run']}), {r['seconds']:.1f} s", file=sys.stderr, flush=True)
    summary = summarize(runs)
    print(markdown(summary))
    if args.out is not None:
        doc = {"protocol": {"settings": args.settings, "hidden": list(hidden), "inits": inits,
                            "similarity_samples": args.similarity_samples, "dense_engine": args.dense_engine,
                            "epochs_for": epochs_for},
               "machine": header, "summary": summary, "runs": runs}
        write_atomically(args.out, doc)
        print(f"\nresults written to {args.out.name}")


if __name__ == "__main__":
    main()
