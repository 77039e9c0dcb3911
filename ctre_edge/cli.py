"""The ``ctre-edge`` command line: the one module that exits; ``console.py`` does the showing.

Commands stay thin: they build a configuration, call the package (``run.py`` for ``train`` and
``plan``), and render the result. Progress and tables go to stderr; ``--json`` writes one JSON
document to stdout and nothing else there. Errors are one red line on stderr with a documented
exit code (see README, "Exit codes"); ``--debug`` shows the traceback. Choices (``--method``,
``--similarity``, ...) come from the tables in ``config.py``, so ``--help`` lists them and the
parser rejects a typo. Heavy modules (numba, onnx) are imported inside the commands that need them.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import cli_views, console, run
from .cli_common import (
    DataOpt,
    Init,
    JsonOpt,
    Kernel,
    Method,
    ModelArg,
    NanOpt,
    NanPolicy,
    Scaling,
    Similarity,
    TargetOpt,
    _choices,
    parse_hidden,
    parse_target,
    run_command,
    state,
    value,
)
from .config import EXPORT_FORMATS, QUANTIZATIONS, TrainConfig
from .console import err, print_json
from .errors import ConfigError, CtreError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train highly sparse neural networks (CTRE, SET) on the device that runs them.")
_D = TrainConfig()  # the documented defaults of every training option
PredictFormat = _choices("PredictFormat", ("csv", "jsonl"))
ModelNanOpt = Annotated[NanPolicy, typer.Option(help="NaN/Inf in features: refuse (error), or fill with 0 or with the training file's mean/median that the model recorded (trained with that --nan-policy).")]
# --format and --quantize stay strings that export_c checks with its own one-line messages (the C
# export's options are validated together with OUT's suffix); their help lists the same tables.


def _print_version(given: bool) -> None:
    if given:
        from . import __version__  # the package's own attribute; nothing loads

        sys.stdout.write(f"ctre-edge {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
          cache_dir: Annotated[Optional[Path], typer.Option(help="numba's kernel cache (default: ~/.cache/ctre-edge/VERSION/numba, or NUMBA_CACHE_DIR).")] = None,
          version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")] = False):
    state["debug"] = debug
    if cache_dir is not None:
        from . import configure_cache  # package-level function; the import names it, nothing loads

        configure_cache(cache_dir)


@app.command()
def train(
    ctx: typer.Context,
    data: DataOpt = "builtin:digits",
    target: TargetOpt = None,
    test_data: Annotated[Optional[str], typer.Option(help="A separate test file (any --data format); else the file's test part or --test-fraction.")] = None,
    nan_policy: NanOpt = NanPolicy.error,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the parsed-data cache of text inputs (kept in ~/.cache/ctre-edge/data, or XDG_CACHE_HOME).")] = False,
    cache_beside: Annotated[bool, typer.Option("--cache-beside", help="Keep the parsed-data cache next to the input (FILE.ctre-cache/) when its directory is writable.")] = False,
    method: Annotated[Method, typer.Option(help="Topology policy.")] = Method(_D.method),
    hidden: Annotated[str, typer.Option(help="Hidden layer widths, comma-separated.")] = ",".join(map(str, _D.hidden)),
    epsilon: Annotated[float, typer.Option(help="Erdos-Renyi sparsity: eps*(n_in+n_out) connections per layer.")] = _D.epsilon,
    init: Annotated[Init, typer.Option(help="Initial weights: sparse (scaled to each neuron's actual fan-in) or dense-glorot (the paper's; vanishes at low epsilon).")] = Init(_D.init),
    zeta: Annotated[float, typer.Option(help="Fraction of connections dropped and regrown each epoch.")] = _D.zeta,
    epochs: Annotated[int, typer.Option(help="Most training epochs.")] = _D.epochs,
    early_stop: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation accuracy (0: run all --epochs).")] = _D.early_stop,
    batch_size: Annotated[int, typer.Option(help="Minibatch size.")] = _D.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = _D.lr,
    momentum: Annotated[float, typer.Option(help="Nesterov momentum.")] = _D.momentum,
    l2: Annotated[float, typer.Option(help="L2 weight decay on existing connections.")] = _D.l2,
    lr_drop_epoch: Annotated[Optional[int], typer.Option(help="Epoch at which lr drops to lr/3 (lr/9 twenty epochs later); default: constant.")] = _D.lr_drop_epoch,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, data and settings give the same model, bit for bit.")] = _D.seed,
    scaling: Annotated[Scaling, typer.Option(help="Input scaling fitted on the training split (auto: minmax for byte-valued features, else standard).")] = Scaling(_D.scaling),
    validation_fraction: Annotated[float, typer.Option(help="Stratified share of the training part held out for validation.")] = _D.validation_fraction,
    test_fraction: Annotated[float, typer.Option(help="Stratified test split when the data has no X_test.")] = _D.test_fraction,
    patience: Annotated[int, typer.Option(help="ctre-seq: epochs without validation improvement before random growth.")] = _D.patience,
    similarity: Annotated[Similarity, typer.Option(help="Cosine scoring for ctre-*.")] = Similarity(_D.similarity),
    similarity_samples: Annotated[int, typer.Option(help="Training samples S used for the cosine scores each epoch (capped by --profile).")] = _D.similarity_samples,
    similarity_workspace_mib: Annotated[int, typer.Option(help="Memory for one block of cosine scores, MiB.")] = _D.similarity_workspace_mib,
    sketch_dim: Annotated[int, typer.Option(help="--similarity sketch: random projections per neuron.")] = _D.sketch_dim,
    eval_batch_size: Annotated[int, typer.Option(help="Batch size of validation and test passes.")] = _D.eval_batch_size,
    profile: Annotated[Optional[str], typer.Option(help="Device profile (see `ctre-edge profiles list`) or a .toml file: refuse runs that do not fit.")] = None,
    fit: Annotated[bool, typer.Option("--fit", help="With --profile: shrink batch, evaluation batch and similarity samples until the run fits.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the trained model to this file.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out (and start over in a checkpoint directory that has checkpoints).")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(help="Save the training state here after every --checkpoint-every epochs; default: OUT.ckpt next to --out.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Epochs between checkpoints.")] = 1,
    no_checkpoint: Annotated[bool, typer.Option("--no-checkpoint", help="Do not write checkpoints.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run whose checkpoints are in this directory (same data and options); 'auto': continue from the newest valid checkpoint in --checkpoint-dir (default OUT.ckpt) if there is one, else start fresh, so a service can rerun one command line.")] = None,
    from_model: Annotated[Optional[Path], typer.Option("--from", metavar="MODEL", help="Continue this trained model on --data (new samples with its features and no new class): options not given come from the model's settings; MODEL is never changed.")] = None,
    refit_scaling: Annotated[bool, typer.Option("--refit-scaling", help="With --from: fit the input scaling on the new data instead of keeping the model's.")] = False,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
):
    """Train a sparse MLP and report test accuracy at the best validation epoch; --from continues a trained one."""
    options = dict(locals())
    run_command(lambda: _train_or_plan(options, plan_only=False))


def plan(**options):
    """Predict the peak memory of `train` with the same options, part by part, against --profile's budget."""
    run_command(lambda: _train_or_plan(options, plan_only=True))


_PLAN_SKIPS = ("out", "force", "quiet", "checkpoint_dir", "checkpoint_every", "no_checkpoint", "resume")
_train_signature = inspect.signature(train, eval_str=True)  # typer needs evaluated Annotated[...] hints
plan.__signature__ = _train_signature.replace(
    parameters=[p for n, p in _train_signature.parameters.items() if n not in _PLAN_SKIPS])
plan.__annotations__ = {n: p.annotation for n, p in plan.__signature__.parameters.items()}
app.command("plan")(plan)


def config_from_options(o: dict) -> TrainConfig:
    """Every TrainConfig field from the option of the same name (a missing option is a KeyError)."""
    return TrainConfig(**{f.name: parse_hidden(o["hidden"]) if f.name == "hidden" else value(o[f.name])
                          for f in fields(TrainConfig)})


def _train_or_plan(o: dict, plan_only: bool) -> None:
    if plan_only:
        return _run_train_or_plan(o, True, None)
    checkpointing = run.checkpointing(o["out"], o["checkpoint_dir"], o["checkpoint_every"], o["resume"],
                                      enabled=not o["no_checkpoint"], force=o["force"])
    with run.lock_outputs(o["out"], checkpointing):  # a second run on the same --out stops here (exit 6)
        run.check_output(o["out"], o["force"])
        _run_train_or_plan(o, False, checkpointing)


def _run_train_or_plan(o: dict, plan_only: bool, checkpointing) -> None:
    config, start = _continuation(o, config_from_options(o))
    data = run.DataSpec(o["data"], parse_target(o["target"]), o["test_data"], value(o["nan_policy"]),
                        cache=False if o["no_cache"] else "beside" if o["cache_beside"] else True)
    prepared = run.prepare(config, data, o["profile"], o["fit"], plan_only=plan_only, start_from=start,
                           refit_scaling=o["refit_scaling"])
    if plan_only:
        print_json(prepared.plan.to_dict()) if o["as_json"] else console.show_plan(prepared.plan)
        return
    if prepared.changes:
        err.print(f"[yellow]{'--fit' if o['fit'] else 'the profile'} changed:[/yellow] " + ", ".join(prepared.changes))
    if prepared.cold_cache and not o["quiet"]:
        err.print("compiling kernels (first run on this CPU or version; `ctre-edge warmup` does this ahead of time)...")
    with console.Progress(prepared.config.epochs, o["quiet"]) as progress, run.StopOnSignal(_stop_notice) as stop:
        try:
            report = run.execute(prepared, source=o["data"], out=o["out"], force=o["force"],
                                 checkpointing=checkpointing, progress=progress, stop_requested=stop.requested,
                                 warn=console.warn)
        except CtreError as e:
            if checkpointing is not None and getattr(e, "exit_code", 0) >= 128:
                e.args = (f"{e}; resume with: ctre-edge {run.resume_command(sys.argv[1:], checkpointing.directory)}",)
            raise
    doc = report.to_dict()
    print_json(doc) if o["as_json"] else console.show_train_summary(doc)


def _continuation(o: dict, config: TrainConfig):
    """(config, model to continue or None): with --from, each training option not given on the command
    line takes the value the model was trained with, so its shape and method carry over."""
    if o["from_model"] is None:
        if o["refit_scaling"]:
            raise ConfigError("--refit-scaling applies to --from MODEL (a new run always fits its scaling)")
        return config, None
    from .model import SparseMLP  # numpy only; the model is read before any data is loaded

    if o.get("resume") is not None:
        raise ConfigError("--from and --resume exclude each other: --resume continues its own checkpoints")
    if o.get("out") is not None and o["out"].resolve() == o["from_model"].resolve():
        raise ConfigError("--out must differ from --from: continuing writes a new model and leaves MODEL as it is")
    model = SparseMLP.load(o["from_model"])
    saved = TrainConfig.from_dict(model.config)
    ctx = o["ctx"]
    given = {f.name for f in fields(TrainConfig) if ctx.get_parameter_source(f.name).name not in ("DEFAULT", "DEFAULT_MAP")}
    return TrainConfig(**{f.name: getattr(config if f.name in given else saved, f.name) for f in fields(TrainConfig)}), model


def _stop_notice(name: str) -> None:
    err.print(f"\n[yellow]{name}: finishing this epoch and writing a checkpoint (send it again to stop at once)[/yellow]")


@app.command()
def evaluate(
    model_path: ModelArg,
    data: Annotated[str, typer.Option(help="Data to evaluate on, in any train --data format (its test part if it has one, else all samples).")],
    target: TargetOpt = None,
    nan_policy: ModelNanOpt = NanPolicy.error,
    as_json: JsonOpt = False,
):
    """Accuracy of a saved model on a data set."""

    def body():
        doc = run.evaluate(model_path, run.DataSpec(data, parse_target(target), nan_policy=value(nan_policy)))
        if as_json:
            print_json(doc)
        else:
            err.print(f"accuracy {doc['accuracy']:.4f} on {doc['samples']} samples ({doc['part']} of {data})")

    run_command(body)


@app.command()
def warmup(
    profile: Annotated[Optional[str], typer.Option(help="Device profile or .toml: plan the compile peak against its budget; compile one step per fresh process when all at once would not fit, refuse (exit 3) when even that would not.")] = None,
):
    """Compile every kernel into the cache now, so the first training run starts at once."""

    def body():
        from .warmup import STEPS, exec_groups, plan_warmup  # trains tiny models: loads numba
        from .warmup import warmup as run_warmup

        groups = plan_warmup(run.resolve_profile(profile))
        if len(groups) > 1:
            err.print(f"compiling in {len(groups)} steps, each in a fresh process, to stay within {profile}'s budget "
                      "(`ctre-edge plan` lists it)...")
            exec_groups(groups, time.time())  # does not return

        t0 = time.perf_counter()
        with err.status("compiling kernels...") as status:
            done = []

            def step(name, seconds):
                done.append(name)
                err.print(f"  {name}: {seconds:.1f} s")
                status.update(f"compiling kernels... {len(done)}/{len(STEPS)}")

            run_warmup(step, on_wait=lambda: err.print("another process is compiling into this cache; waiting for it"))
        err.print(f"kernels ready in {time.perf_counter() - t0:.1f} s; cache: {os.environ.get('NUMBA_CACHE_DIR')}")

    run_command(body)


@app.command()
def export(
    model_path: ModelArg,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="OUT.onnx, or NAME.c / NAME.h for C (both files are written).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help=f"{' or '.join(EXPORT_FORMATS)} (default: from OUT: .c or .h is C, anything else ONNX).")] = None,
    kernel: Annotated[Kernel, typer.Option(help="ONNX: per-layer compute.")] = Kernel.auto,
    quantize: Annotated[str, typer.Option(help=f"C: {' or '.join(QUANTIZATIONS)}: none is float32; int8 is int8 weights with a scale per neuron, int8 activations, int32 accumulation.")] = "none",
    data: Annotated[Optional[str], typer.Option(help="C: the model's training data (any train --data format): report float32 and int8 accuracy on its own test split, rebuilt from the model's seed.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Target device profile: microcontrollers check flash and RAM (C) or the model size (ONNX); for ONNX, dense forms never exceed its memory budget.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it exists.")] = False,
    as_json: JsonOpt = False,
):
    """Export a trained model to ONNX or to C for microcontrollers, checked before anything is written."""

    def body():
        from .export import export_onnx  # loads onnx, which only export needs
        from .export_c import infer_format
        from .model import SparseMLP

        if infer_format(out, value(fmt)) == "c":
            _export_c(model_path, out, value(quantize), data, profile, force, as_json)
            return
        if value(quantize) != "none" or data is not None:
            raise ConfigError("--quantize and --data apply to the C export (--format c); ONNX export is float32")
        run.check_output(out, force)
        model = SparseMLP.load(model_path)
        report = export_onnx(model, out, kernel=value(kernel), budget_bytes=run.export_budget(model, profile), force=force)
        if as_json:
            print_json(report)
        else:
            err.print(f"wrote {out} ({console.format_bytes(report['file_bytes'])}; kernels "
                      f"{', '.join(report['kernels'])}; max |difference| from the trainer {report['max_abs_diff']:.2e})")

    run_command(body)


def _export_c(model_path, out, quantize, data, profile, force, as_json) -> None:
    from .data import load_data  # with export_c below: only `export --format c` needs them
    from .export_c import c_paths, export_c, own_test_split
    from .model import SparseMLP

    for path in c_paths(out):
        run.check_output(path, force)
    model = SparseMLP.load(model_path)
    prof = run.resolve_profile(profile)
    check = own_test_split(model, load_data(data)) if data is not None else None
    report = export_c(model, out, quantize=quantize, profile=prof, force=force, check=check)
    print_json(report) if as_json else console.show_c_export(report, quantize, data, prof)


@app.command()
def predict(
    model_path: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="A model written by export.")],
    data: Annotated[Path, typer.Option(help="Features to predict: .npz (X), .npy or .csv (numbers only, optional header).")],
    proba: Annotated[bool, typer.Option("--proba", help="Print class probabilities, not labels.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="onnxruntime intra-op threads (default: its own choice).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of CSV.")] = False,
    fmt: Annotated[Optional[PredictFormat], typer.Option("--format", help="csv: a header (label, then the class names) and per sample its label and probabilities; jsonl: one JSON object per sample. Default: labels (or --proba's CSV).")] = None,
    nan_policy: ModelNanOpt = NanPolicy.error,
):
    """Predict with an exported ONNX model using onnxruntime alone (no numba needed on the device)."""

    def body():
        from .runtime import OnnxModel, read_features  # onnxruntime, which only predict needs

        if fmt is not None and as_json:
            raise ConfigError("--format and --json exclude each other: --json prints one document")
        model = OnnxModel(model_path, threads=threads)
        X = read_features(data)
        nan, where = value(nan_policy), str(data)
        if fmt is not None:
            console.write_rows(value(fmt), model.classes, model.predict(X, nan, where), model.predict_proba(X, nan, where))
        elif proba:
            console.write_probabilities(model.classes, model.predict_proba(X, nan, where), as_json)
        else:
            console.write_labels(model.predict(X, nan, where), as_json)

    run_command(body)


app.command()(cli_views.info)
app.command()(cli_views.report)
app.add_typer(cli_views.data_app, name="data")
app.add_typer(cli_views.profiles_app, name="profiles")

from .fleet.cli import fleet_app  # noqa: E402 - after the commands it reuses; imports no Flower module

app.add_typer(fleet_app, name="fleet")


def main() -> None:
    """The console entry point: Click's usage errors (an unknown option, a value of the wrong type, a typo
    in a choice) become one line on stderr and exit code 2, like every other error (``--debug``: Click's
    own message). Tests call ``app`` itself and see Click's behaviour unchanged."""
    try:
        from typer._click.exceptions import ClickException, UsageError  # typer >= 0.26 vendors Click
    except ImportError:  # pragma: no cover - older typer (flwr pins < 0.21) uses the click package
        from click.exceptions import ClickException, UsageError
    from rich.markup import escape

    try:
        code = app(standalone_mode=False)
    except ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError" or "--debug" in sys.argv[1:]:
            e.show()
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        where = f"; see `{ctx.command_path} --help`" if isinstance(e, UsageError) and ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(e.format_message().rstrip('.'))}{escape(where)}", soft_wrap=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
