"""The ``ctre-edge`` command line: the one module that prints or exits.

Commands stay thin: they build a configuration, call the package, and print. Progress and tables
go to stderr; ``--json`` writes one JSON document to stdout and nothing else there. Errors are one
red line on stderr with a documented exit code (see README, "Exit codes"); ``--debug`` shows the
traceback. Heavy modules (numba, onnx) are imported inside the commands that need them.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import ConfigError, CtreError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train highly sparse neural networks (CTRE, SET) on the device that runs them.")
err = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
          cache_dir: Annotated[Optional[Path], typer.Option(help="numba's kernel cache (default: ~/.cache/ctre-edge/VERSION/numba, or NUMBA_CACHE_DIR).")] = None):
    _state["debug"] = debug
    if cache_dir is not None:
        from . import configure_cache

        configure_cache(cache_dir)


def _fail(e: BaseException) -> None:
    """Print one line for an error and exit with its code; the traceback only under --debug."""
    if _state["debug"]:
        raise e
    if isinstance(e, CtreError):
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(e.exit_code)
    err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              soft_wrap=True)
    raise typer.Exit(1)


def _run(fn):
    """Call fn(); turn our errors and unexpected ones into one line and an exit code."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130)
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        _fail(e)


def _parse_hidden(text: str) -> tuple:
    try:
        hidden = tuple(int(h) for h in text.replace(" ", "").split(",") if h)
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated layer widths such as 1000,1000,1000; got {text!r}") from None
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"--hidden must be comma-separated positive widths such as 1000,1000,1000; got {text!r}")
    return hidden


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    sys.stdout.flush()


@app.command()
def train(
    data: Annotated[str, typer.Option(help="Training data: .npz (X, y, optional X_test, y_test), .csv/.tsv, LIBSVM (.libsvm/.svm), MNIST IDX (IMAGES[,LABELS]) or builtin:digits.")] = "builtin:digits",
    target: Annotated[Optional[str], typer.Option(help="CSV/TSV: the label column, by name or index (default: the last column).")] = None,
    test_data: Annotated[Optional[str], typer.Option(help="A separate test file (any --data format); else the file's test part or --test-fraction.")] = None,
    nan_policy: Annotated[str, typer.Option(help="NaN/Inf in features: error, zero, mean or median (statistics from the training file).")] = "error",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the parsed-data cache next to text inputs.")] = False,
    method: Annotated[str, typer.Option(help="Topology policy: static, set, ctre-sim or ctre-seq.")] = "ctre-sim",
    hidden: Annotated[str, typer.Option(help="Hidden layer widths, comma-separated.")] = "1000,1000,1000",
    epsilon: Annotated[float, typer.Option(help="Erdos-Renyi sparsity: eps*(n_in+n_out) connections per layer.")] = 1.0,
    init: Annotated[str, typer.Option(help="Initial weights: sparse (scaled to each neuron's actual fan-in) or dense-glorot (the paper's; vanishes at low epsilon).")] = "sparse",
    zeta: Annotated[float, typer.Option(help="Fraction of connections dropped and regrown each epoch.")] = 0.2,
    epochs: Annotated[int, typer.Option(help="Most training epochs.")] = 300,
    early_stop: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation accuracy (0: run all --epochs).")] = 30,
    batch_size: Annotated[int, typer.Option(help="Minibatch size.")] = 100,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 0.05,
    momentum: Annotated[float, typer.Option(help="Nesterov momentum.")] = 0.9,
    l2: Annotated[float, typer.Option(help="L2 weight decay on existing connections.")] = 1e-4,
    lr_drop_epoch: Annotated[Optional[int], typer.Option(help="Epoch at which lr drops to lr/3 (lr/9 twenty epochs later); default: constant.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, data and settings give the same model, bit for bit.")] = 0,
    scaling: Annotated[str, typer.Option(help="Input scaling fitted on the training split: auto (minmax for byte-valued features, else standard), minmax, standard or none.")] = "auto",
    test_fraction: Annotated[float, typer.Option(help="Stratified test split when the data has no X_test.")] = 0.2,
    patience: Annotated[int, typer.Option(help="ctre-seq: epochs without validation improvement before random growth.")] = 40,
    similarity: Annotated[str, typer.Option(help="Cosine scoring for ctre-*: exact or sketch.")] = "exact",
    similarity_samples: Annotated[int, typer.Option(help="Training samples S used for the cosine scores each epoch (capped by --profile).")] = 1000,
    similarity_workspace_mib: Annotated[int, typer.Option(help="Memory for one block of cosine scores, MiB.")] = 32,
    sketch_dim: Annotated[int, typer.Option(help="--similarity sketch: random projections per neuron.")] = 256,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size of validation and test passes.")] = 1000,
    profile: Annotated[Optional[str], typer.Option(help="Device profile (see `ctre-edge profiles list`) or a .toml file: refuse runs that do not fit.")] = None,
    fit: Annotated[bool, typer.Option("--fit", help="With --profile: shrink batch, evaluation batch and similarity samples until the run fits.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the trained model to this file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out (and start over in a checkpoint directory that has checkpoints).")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Save the training state here after every --checkpoint-every epochs; default: OUT.ckpt next to --out.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Epochs between checkpoints.")] = 1,
    no_checkpoint: Annotated[bool, typer.Option("--no-checkpoint", help="Do not write checkpoints.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run whose checkpoints are in this directory (same data and options).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with the results on stdout.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
):
    """Train a sparse MLP and report test accuracy at the best validation epoch."""
    options = dict(locals())
    _run(lambda: _train_or_plan(options, plan_only=False))


def plan(**options):
    """Predict the peak memory of `train` with the same options, part by part, against --profile's budget."""
    _run(lambda: _train_or_plan(options, plan_only=True))


_PLAN_SKIPS = ("out", "force", "quiet", "checkpoint_dir", "checkpoint_every", "no_checkpoint", "resume")
_train_signature = inspect.signature(train, eval_str=True)  # typer needs evaluated Annotated[...] hints
plan.__signature__ = _train_signature.replace(
    parameters=[p for n, p in _train_signature.parameters.items() if n not in _PLAN_SKIPS])
plan.__annotations__ = {n: p.annotation for n, p in plan.__signature__.parameters.items()}
app.command("plan")(plan)


def _train_or_plan(o: dict, plan_only: bool) -> None:
    from .budget import MiB, peak_rss_bytes, plan_run
    from .data import load_data, summarize_data, summarize_loaded
    from .profiles import load_profile
    from dataclasses import fields

    from .train import Checkpointing, TrainConfig, train as run_training
    from .warmup import kernels_cached, mark_cached

    # Every option named like a TrainConfig field is that field (validation_fraction has no option).
    settings = {f.name: o[f.name] for f in fields(TrainConfig) if f.name in o and f.name != "hidden"}
    config = TrainConfig(hidden=_parse_hidden(o["hidden"]), **settings).validate()
    prof = load_profile(o["profile"]) if o["profile"] else None
    out = o.get("out")
    if out is not None and out.exists() and not o.get("force"):
        raise_exists(out)
    # Plan from the headers first, so a run that cannot fit is refused before any loading or compiling.
    cold = not kernels_cached()
    data_options = {"target": _target(o["target"]), "test_spec": o["test_data"], "nan_policy": o["nan_policy"],
                    "cache": not o["no_cache"]}
    plan = plan_run(config, summarize_data(o["data"], **data_options), prof, fit=o["fit"], inference_only_ok=plan_only,
                    cold_cache=cold)
    if plan_only:
        _show_plan(plan, o["as_json"])
        return
    dataset = load_data(o["data"], **data_options)
    changes = plan.changes  # the second plan starts from the already shrunk settings
    plan = plan_run(config, summarize_loaded(dataset), prof, fit=o["fit"], data_bytes=dataset.nbytes, cold_cache=cold)
    plan.changes = changes + plan.changes
    if plan.changes:
        err.print("[yellow]--fit changed:[/yellow] " + ", ".join(plan.changes))
    if prof is not None:
        _set_threads(prof.threads)
    checkpointing = _checkpointing(o, Checkpointing)
    if cold and not o["quiet"]:
        err.print("compiling kernels (first run on this CPU or version; `ctre-edge warmup` does this ahead of time)...")
    with _progress(config.epochs, o["quiet"]) as report, _StopOnSignal() as stop:
        try:
            result = run_training(dataset, config, progress=report, checkpointing=checkpointing,
                                  stop_requested=stop.requested, warn=lambda m: err.print(f"[yellow]warning:[/yellow] {m}"))
        except CtreError as e:
            if checkpointing is not None and getattr(e, "exit_code", 0) >= 128:
                e.args = (f"{e}; resume with: ctre-edge {_resume_command(checkpointing.directory)}",)
            raise
    if cold:
        mark_cached()
    model = result.model
    if out is not None:
        model.save(out, force=o["force"])
    hist = result.history
    doc = {
        "test_accuracy": result.test_accuracy,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": model.metrics["best_val_accuracy"],
        "nnz": model.nnz,
        "sizes": model.sizes,
        "density": model.density,
        "epochs": len(hist),
        "seconds_per_epoch": statistics.median(s.seconds for s in hist),
        "seconds_total": sum(s.seconds for s in hist),
        "method": config.method,
        "data": o["data"],
        "profile": prof.name if prof else None,
        "config": config.to_dict(),
        "memory": {"predicted_peak_bytes": plan.total, "measured_peak_bytes": peak_rss_bytes(),
                   "budget_bytes": plan.budget, "parts": plan.parts, "fit_changes": plan.changes},
        "out": str(out) if out is not None else None,
        "history": [vars(s) for s in hist],
        "warnings": result.warnings,
    }
    if o["as_json"]:
        _print_json(doc)
    else:
        acc = "n/a" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
        err.print(f"test accuracy {acc} at best validation epoch {result.best_epoch}; "
                  f"{sum(model.nnz):,} connections (density {model.density:.4%}); "
                  f"{doc['seconds_per_epoch']:.3f} s/epoch (median); peak memory "
                  f"{doc['memory']['measured_peak_bytes'] / MiB:.0f} MiB (predicted {plan.total / MiB:.0f})"
                  + (f"; model written to {out}" if out is not None else ""))


def _checkpointing(o: dict, Checkpointing):
    """Checkpoints go to --resume DIR, else --checkpoint-dir, else OUT.ckpt next to --out, else nowhere."""
    if o["no_checkpoint"]:
        if o["resume"] is not None:
            raise ConfigError("--resume needs checkpoints; drop --no-checkpoint")
        return None
    if o["checkpoint_every"] < 1:
        raise ConfigError(f"'checkpoint_every' must be an int >= 1; got {o['checkpoint_every']}")
    if o["resume"] is not None:
        if o["checkpoint_dir"] is not None and o["checkpoint_dir"] != o["resume"]:
            raise ConfigError("--resume DIR continues in DIR; drop --checkpoint-dir or give the same directory")
        if not o["resume"].is_dir():
            raise ConfigError(f"--resume {o['resume']}: no such checkpoint directory")
        return Checkpointing(o["resume"], o["checkpoint_every"], resume=True)
    directory = o["checkpoint_dir"]
    if directory is None and o["out"] is not None:
        directory = o["out"].with_name(o["out"].name + ".ckpt")
    return None if directory is None else Checkpointing(directory, o["checkpoint_every"], force=o["force"])


def _resume_command(directory: Path) -> str:
    """The command line of this run with --resume DIR, so the user can paste it."""
    import shlex

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--checkpoint-dir"):
            skip = True
            continue
        if a.startswith(("--resume=", "--checkpoint-dir=")) or a == "--force":
            continue
        args.append(a)
    return " ".join(shlex.quote(a) for a in args + ["--resume", str(directory)])


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the epoch, checkpoint, stop. A second one: stop at once."""

    def __enter__(self):
        import signal

        self.signal_number = 0
        self.previous = {}

        def handler(signum, frame):
            if self.signal_number:
                raise KeyboardInterrupt
            self.signal_number = signum
            err.print(f"\n[yellow]{signal.Signals(signum).name}: finishing this epoch and writing a checkpoint "
                      "(send it again to stop at once)[/yellow]")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some test runners): no handler, no harm
                pass
        return self

    def requested(self) -> int:
        return self.signal_number

    def __exit__(self, *exc):
        import signal

        for sig, h in self.previous.items():
            signal.signal(sig, h)
        return False


def _target(text):
    """--target as a column index when it is an integer, else as a column name."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _set_threads(n: int) -> None:
    import numba

    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _show_plan(plan, as_json: bool) -> None:
    from .budget import PART_LABELS

    if as_json:
        _print_json(plan.to_dict())
        return
    from rich.table import Table

    if hasattr(plan, "flash"):  # a microcontroller: the C export's flash and RAM
        _show_mcu_plan(plan)
        return
    t = Table(title="predicted peak memory" + (f" on {plan.profile}" if plan.profile else ""))
    t.add_column("part")
    t.add_column("bytes", justify="right")
    for k, v in plan.parts.items():
        t.add_row(PART_LABELS[k], _bytes(v))
    t.add_row("[bold]peak (per-epoch parts overlap: only the larger counts)[/bold]", f"[bold]{_bytes(plan.total)}[/bold]")
    if plan.budget is not None:
        t.add_row("budget" + (f" ({plan.headroom:.0%} usable)" if plan.headroom < 1 else ""), _bytes(plan.budget))
    err.print(t)
    if plan.changes:
        err.print("--fit would change: " + ", ".join(plan.changes))
    if plan.budget is not None:
        err.print("[green]fits[/green]" if plan.fits else "[red]does not fit[/red]")


def _show_mcu_plan(plan) -> None:
    from rich.table import Table

    from .export_c import part_label

    t = Table(title=f"C export ({'float32' if plan.quantize == 'none' else plan.quantize}) on {plan.profile}")
    t.add_column("memory")
    t.add_column("part")
    t.add_column("bytes", justify="right")
    for where, parts, total, budget in (("flash", plan.flash, plan.flash_total, plan.flash_budget),
                                        ("RAM", plan.ram, plan.ram_total, plan.ram_budget)):
        for k, v in parts.items():
            t.add_row(where, part_label(k, plan.quantize), f"{v:,}")
        t.add_row(where, f"[bold]total[/bold] (budget {'-' if budget is None else f'{budget:,}'})", f"[bold]{total:,}[/bold]")
    err.print(t)
    err.print("[green]fits[/green]" if plan.fits else "[red]does not fit[/red]")


def raise_exists(path: Path):
    from .errors import OutputExistsError

    raise OutputExistsError(f"{path} exists; pass --force to overwrite it or choose another --out")


class _progress:
    """A rich progress bar on stderr, one step per epoch, showing the latest epoch's figures."""

    def __init__(self, epochs: int, quiet: bool):
        self.epochs, self.quiet = epochs, quiet

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(bar_width=12), TimeElapsedColumn(),
                            TextColumn("{task.fields[info]}"), console=err, transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.epochs, info="")
        return self.update

    def update(self, s) -> None:
        info = (f"loss {s.loss:.4f} train {s.train_accuracy:.3f} val {s.val_accuracy:.3f} "
                f"{s.seconds:.3f}s changed {s.changed}")
        if s.grown_cosine:
            info += f" (cosine {s.grown_cosine}, random {s.grown_random})"
        self.bar.update(self.task, advance=1, info=info)

    def __exit__(self, *exc):
        if not self.quiet:
            self.bar.__exit__(*exc)
        return False


@app.command()
def evaluate(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model written by train --out.")],
    data: Annotated[str, typer.Option(help="Data to evaluate on, in any train --data format (its test part if it has one, else all samples).")],
    target: Annotated[Optional[str], typer.Option(help="CSV/TSV: the label column, by name or index.")] = None,
    nan_policy: Annotated[str, typer.Option(help="NaN/Inf in features: error, zero, mean or median.")] = "error",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
):
    """Accuracy of a saved model on a data set."""

    def body():
        from .data import load_data
        from .errors import DataError
        from .model import SparseMLP

        model = SparseMLP.load(model_path)
        ds = load_data(data, target=_target(target), nan_policy=nan_policy)
        X, y = (ds.X_test, ds.y_test) if ds.X_test is not None else (ds.X, ds.y)
        if X.shape[1] != model.n_features:
            raise DataError(f"{data} has {X.shape[1]} features; the model {model_path} expects {model.n_features}")
        labels = [ds.classes[c] for c in y]
        pred = model.predict(X)
        acc = float(sum(str(p) == str(t) for p, t in zip(pred.tolist(), labels)) / len(labels))
        part = "test part" if ds.X_test is not None else "all samples"
        if as_json:
            _print_json({"accuracy": acc, "samples": len(labels), "part": part, "data": data})
        else:
            err.print(f"accuracy {acc:.4f} on {len(labels)} samples ({part} of {data})")

    _run(body)


@app.command()
def info(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model written by train --out.")],
    features: Annotated[bool, typer.Option("--features", help="Rank input features by their surviving connections (and total |w|).")] = False,
    top: Annotated[int, typer.Option(help="With --features: how many features to list.")] = 20,
    image_shape: Annotated[Optional[str], typer.Option(help="With --features: lay the input degrees out as an HxW image (square inputs are guessed).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="With --features: write the input-degree map as a PNG (needs matplotlib; otherwise a terminal heat map).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
):
    """Layers, connections, density and bytes of a saved model; --features ranks the inputs."""

    def body():
        from .model import SparseMLP

        model = SparseMLP.load(model_path)
        if features:
            _feature_report(model, top, image_shape, png, as_json)
            return
        rows = [{"layer": l, "n_in": L.n_in, "n_out": L.n_out, "nnz": L.nnz, "density": L.density, "bytes": L.nbytes}
                for l, L in enumerate(model.layers)]
        doc = {"sizes": model.sizes, "layers": rows, "nnz": model.nnz, "density": model.density,
               "classes": model.classes, "config": model.config, "metrics": model.metrics}
        if as_json:
            _print_json(doc)
            return
        from rich.table import Table

        t = Table(title=f"{model_path}: {'-'.join(map(str, model.sizes))}, method {model.config.get('method', '?')}")
        for c in ("layer", "n_in x n_out", "connections", "density", "bytes"):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["layer"]), f"{r['n_in']} x {r['n_out']}", f"{r['nnz']:,}", f"{r['density']:.4%}", f"{r['bytes']:,}")
        t.add_row("all", "", f"{sum(model.nnz):,}", f"{model.density:.4%}", f"{sum(r['bytes'] for r in rows):,}")
        err.print(t)
        acc = model.metrics.get("test_accuracy")
        if acc is not None:
            err.print(f"test accuracy {acc:.4f} at epoch {model.metrics.get('best_epoch')}")

    _run(body)


@app.command()
def warmup():
    """Compile every kernel into the cache now, so the first training run starts at once."""

    def body():
        import time

        from .warmup import STEPS, warmup as run_warmup

        t0 = time.perf_counter()
        with err.status("compiling kernels...") as status:
            done = []

            def step(name, seconds):
                done.append(name)
                err.print(f"  {name}: {seconds:.1f} s")
                status.update(f"compiling kernels... {len(done)}/{len(STEPS)}")

            run_warmup(step)
        import os

        err.print(f"kernels ready in {time.perf_counter() - t0:.1f} s; cache: {os.environ.get('NUMBA_CACHE_DIR')}")

    _run(body)


@app.command()
def export(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL", help="A model written by train --out.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="OUT.onnx, or NAME.c / NAME.h for C (both files are written).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="onnx or c (default: from OUT: .c or .h is C, anything else ONNX).")] = None,
    kernel: Annotated[str, typer.Option(help="ONNX: per-layer compute: auto, sparse-ops, dense or sparse-initializer.")] = "auto",
    quantize: Annotated[str, typer.Option(help="C: none (float32) or int8 (int8 weights with a scale per neuron, int8 activations, int32 accumulation).")] = "none",
    data: Annotated[Optional[str], typer.Option(help="C: the model's training data (any train --data format): report float32 and int8 accuracy on its own test split, rebuilt from the model's seed.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Target device profile: microcontrollers check flash and RAM (C) or the model size (ONNX); for ONNX, dense forms never exceed its memory budget.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
):
    """Export a trained model to ONNX or to C for microcontrollers, checked before anything is written."""

    def body():
        from .budget import plan_inference
        from .export import export_onnx
        from .export_c import infer_format
        from .model import SparseMLP
        from .profiles import load_profile

        if infer_format(out, fmt) == "c":
            _export_c(model_path, out, quantize, data, profile, force, as_json)
            return
        if quantize != "none" or data is not None:
            raise ConfigError("--quantize and --data apply to the C export (--format c); ONNX export is float32")
        if out.exists() and not force:
            raise_exists(out)
        model = SparseMLP.load(model_path)
        budget = None
        if profile:
            prof = load_profile(profile)
            if prof.can_train:
                budget = prof.train_budget_bytes
            else:  # a microcontroller: the model must fit its memory, or nothing is written
                plan_inference(model.sizes, model.nnz, prof, epsilon=model.config.get("epsilon"))
                budget = prof.model_budget_bytes
        report = export_onnx(model, out, kernel=kernel, budget_bytes=budget, force=force)
        if as_json:
            _print_json(report)
        else:
            err.print(f"wrote {out} ({_bytes(report['file_bytes'])}; kernels {', '.join(report['kernels'])}; "
                      f"max |difference| from the trainer {report['max_abs_diff']:.2e})")

    _run(body)


def _export_c(model_path, out, quantize, data, profile, force, as_json) -> None:
    from .export_c import c_paths, export_c, own_test_split
    from .model import SparseMLP
    from .profiles import load_profile

    for path in c_paths(out):
        if path.exists() and not force:
            raise_exists(path)
    model = SparseMLP.load(model_path)
    prof = load_profile(profile) if profile else None
    check = None
    if data is not None:
        from .data import load_data

        check = own_test_split(model, load_data(data))
    report = export_c(model, out, quantize=quantize, profile=prof, force=force, check=check)
    if as_json:
        _print_json(report)
        return
    m = report["memory"]
    if not report.get("split_matches_training", True):
        err.print(f"[yellow]warning:[/yellow] float32 accuracy on {data} differs from the accuracy stored at training: "
                  f"it is not the data (or test split) the model was trained with")
    err.print(f"wrote {report['header']} and {report['source']}: about {_bytes(m['flash_bytes'])} of flash "
              f"({_bytes(m['flash']['code'])} of it code) and {_bytes(m['ram']['workspace'])} of static RAM + "
              f"~{m['ram']['stack']} B of stack on a Cortex-M" + (f" ({prof.name} allows {_bytes(m['flash_budget_bytes'])} "
                                                                   f"and {_bytes(m['ram_budget_bytes'])})" if prof and m['flash_budget_bytes'] else ""))
    if quantize == "int8":
        line = f"int8: labels agree with float32 on {report['agreement']:.1%} of {report['agreement_samples']} deterministic inputs"
        if "accuracy_int8" in report:
            change = 100 * (report["accuracy_int8"] - report["accuracy_float32"])
            line += (f"; test accuracy {report['accuracy_float32']:.4f} (float32) -> {report['accuracy_int8']:.4f} (int8), "
                     f"{change:+.2f} points on the model's test split ({report['check_count']} samples of {data})")
        else:
            line += "; pass --data with the training data to measure the accuracy change on the model's test split"
        err.print(line)
    elif "accuracy_float32" in report:
        err.print(f"test accuracy {report['accuracy_float32']:.4f} on the model's test split "
                  f"({report['check_count']} samples of {data})")


@app.command()
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="A model written by export.")],
    data: Annotated[Path, typer.Option(help="Features to predict: .npz (X), .npy or .csv (numbers only, optional header).")],
    proba: Annotated[bool, typer.Option("--proba", help="Print class probabilities, not labels.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: its own choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of CSV.")] = False,
):
    """Predict with an exported ONNX model using onnxruntime alone (no numba needed on the device)."""

    def body():
        from .runtime import OnnxModel, read_features

        model = OnnxModel(model_path, threads=threads)
        X = read_features(data)
        if proba:
            p = model.predict_proba(X)
            rows = [[float(v) for v in r] for r in p]
            if as_json:
                _print_json({"classes": model.classes, "probabilities": rows})
            else:
                sys.stdout.write(",".join(map(str, model.classes)) + "\n")
                sys.stdout.write("".join(",".join(f"{v:.6g}" for v in r) + "\n" for r in rows))
        else:
            labels = [v.item() if hasattr(v, "item") else v for v in model.predict(X)]
            labels = [v.decode() if isinstance(v, bytes) else v for v in labels]
            if as_json:
                _print_json({"labels": labels})
            else:
                sys.stdout.write("".join(f"{v}\n" for v in labels))

    _run(body)


data_app = typer.Typer(no_args_is_help=True, help="Look at a data file before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    spec: Annotated[str, typer.Argument(metavar="FILE", help="A data file in any train --data format, or builtin:NAME.")],
    target: Annotated[Optional[str], typer.Option(help="CSV/TSV: the label column, by name or index.")] = None,
    test_data: Annotated[Optional[str], typer.Option(help="A separate test file.")] = None,
    nan_policy: Annotated[str, typer.Option(help="How NaN/Inf would be handled: error, zero, mean or median.")] = "error",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
):
    """Shape, dtype, class balance, value ranges, NaN count and memory size of a data set."""

    def body():
        from .data import inspect_data

        doc = inspect_data(spec, target=_target(target), test_spec=test_data, nan_policy=nan_policy)
        if as_json:
            _print_json(doc)
            return
        from rich.table import Table

        t = Table(title=f"{doc['name']}")
        t.add_column("")
        t.add_column("training part" if doc["test"] else "data")
        if doc["test"]:
            t.add_column("test part")
        keys = [("samples", "n_samples"), ("features", "n_features"), ("dtype", "dtype"), ("min", "min"),
                ("max", "max"), ("constant features", "constant_features"), ("NaN/Inf values", "nan_count")]
        for label, key in keys:
            t.add_row(label, str(doc.get(key)), *([str(doc["test"].get(key))] if doc["test"] else []))
        balance = ", ".join(f"{k}: {v}" for k, v in list(doc["classes"].items())[:12])
        more = len(doc["classes"]) - 12
        t.add_row("classes", f"{doc['n_classes']} ({balance}{f', ... {more} more' if more > 0 else ''})",
                  *([""] if doc["test"] else []))
        t.add_row("memory", _bytes(doc["nbytes"]), *([""] if doc["test"] else []))
        err.print(t)

    _run(body)


profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles: memory budget, threads and caps.")
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("list")
def profiles_list(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False):
    """The shipped device profiles."""

    def body():
        from .profiles import list_profiles

        profs = list_profiles()
        if as_json:
            _print_json([{k: v for k, v in vars(p).items() if k != "path"} for p in profs])
            return
        from rich.table import Table

        t = Table(title="device profiles")
        for c in ("name", "arch", "RAM", "train budget", "model budget", "threads"):
            t.add_column(c)
        for p in profs:
            train_budget = _bytes(p.train_budget_bytes) if p.can_train else "inference only"
            model_budget = _bytes(p.model_budget_bytes) if p.model_budget_bytes else "-"
            t.add_row(p.name, p.arch, _bytes(p.ram_bytes), train_budget, model_budget, str(p.threads))
        err.print(t)

    _run(body)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="A profile name or a .toml file.")],
                  as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False):
    """Every field of one profile."""

    def body():
        from .profiles import load_profile, profile_rows

        p = load_profile(name)
        if as_json:
            _print_json({k: (str(v) if k == "path" else v) for k, v in vars(p).items()})
            return
        from rich.table import Table

        t = Table(title=p.name)
        t.add_column("field")
        t.add_column("value")
        for k, v in profile_rows(p):
            t.add_row(k, v)
        err.print(t)

    _run(body)


def _feature_report(model, top: int, shape_text, png, as_json: bool) -> None:
    import numpy as np

    from .topology import degree_map, feature_ranking, image_shape, write_png

    rank = feature_ranking(model)
    order = rank["order"][:max(1, top)]
    rows = [{"feature": int(f), "connections": int(rank["degree"][f]), "total_abs_weight": float(rank["weight"][f])}
            for f in order]
    try:
        shape = image_shape(model.n_features, shape_text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if png is not None:
        if shape is None:
            raise ConfigError("--png needs an image: pass --image-shape HxW")
        if png.exists():
            raise_exists(png)
        if not write_png(degree_map(model, shape), png, "input connections per pixel"):
            raise ConfigError("--png needs matplotlib (pip install matplotlib); without it a terminal map is shown")
    if as_json:
        _print_json({"top": rows, "unconnected_features": int(np.sum(rank["degree"] == 0)),
                     "degree": rank["degree"].tolist()})
        return
    from rich.table import Table

    t = Table(title=f"input features by surviving connections (of {model.n_features})")
    for c in ("rank", "feature", "connections", "total |w|"):
        t.add_column(c, justify="right")
    for i, r in enumerate(rows, 1):
        t.add_row(str(i), str(r["feature"]), str(r["connections"]), f"{r['total_abs_weight']:.3f}")
    err.print(t)
    err.print(f"{int(np.sum(rank['degree'] == 0))} of {model.n_features} features have no connection left")
    if shape is not None and png is None:
        _terminal_heat_map(degree_map(model, shape))
    elif png is not None:
        err.print(f"wrote {png}")


def _terminal_heat_map(image) -> None:
    """Two pixels per character cell (upper half block), colour = degree, for terminals without plots."""
    from rich.text import Text

    top = float(image.max()) or 1.0

    def colour(v):
        level = int(round(255 * float(v) / top))
        return f"rgb({level},{level // 2 + 40},{255 - level})"

    text = Text()
    for r in range(0, image.shape[0], 2):
        for c in range(image.shape[1]):
            lower = image[r + 1, c] if r + 1 < image.shape[0] else 0
            text.append("\u2580", style=f"{colour(image[r, c])} on {colour(lower)}")
        text.append("\n")
    err.print(text)
    err.print(f"input connections per pixel: blue 0 ... orange {int(top)}")


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


from .fleet.cli import fleet_app  # noqa: E402 - imports no Flower module; the commands check for it

app.add_typer(fleet_app, name="fleet")


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    app()
