"""The run layer: one way from settings to a trained model, shared by the CLI and the Python API.

A run has two steps. ``prepare`` turns a configuration, a data source and an optional device
profile into everything a run needs: it plans from the data's headers first (so a run that cannot
fit is refused before anything is loaded or compiled), loads the data, plans again on the loaded
arrays, and returns a *new* configuration (the one given is never changed) with the list of
settings the profile changed. ``execute`` trains with the profile's thread count (restored
afterwards), optionally saves the model, and returns a report. Neither prints: the caller shows
what it wants (the CLI renders the report; ``SparseMLPClassifier.fit`` keeps the model).

numba is imported only by ``execute``, so planning and refusals stay as lean as the profiles.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .budget import MemoryPlan, budget_bytes, peak_rss_bytes, plan_run
from .checkpoint import Checkpointing
from .config import TrainConfig
from .data import Dataset, load_data, make_dataset, summarize_data, summarize_loaded
from .errors import ConfigError, DataError
from .fileio import lock_output, refuse_overwrite
from .io.common import apply_nan_policy
from .model import SparseMLP
from .profiles import Profile, load_profile
from .warmup import compile_if_cold, kernels_cached, mark_cached, steps_for


@dataclass(frozen=True)
class DataSpec:
    """Where a run's data comes from: a source the data layer reads, or arrays already in memory."""

    source: str = "builtin:digits"
    target: str | int | None = None
    test_source: str | None = None
    nan_policy: str = "error"
    cache: bool | str = True  # True: the user cache directory; "beside": next to the input if writable
    arrays: tuple | None = None  # (X, y, X_test, y_test) for the Python API; ``source`` then names them

    def load_options(self) -> dict:
        return {"target": self.target, "test_spec": self.test_source, "nan_policy": self.nan_policy,
                "cache": self.cache}


class Prepared(NamedTuple):
    """What ``prepare`` returns: the run's settings, plan and data, ready for ``execute``."""

    config: TrainConfig
    plan: MemoryPlan
    dataset: Dataset | None  # None from ``prepare(..., plan_only=True)``
    changes: list[str]  # the settings the profile changed, as the flags that reproduce them
    threads: int | None  # kernel threads from the profile; None keeps numba's own
    profile: Profile | None
    cold_cache: bool  # kernels not compiled on this CPU yet (the run will compile them)
    start_from: SparseMLP | None = None  # a trained model the run continues (``prepare(start_from=...)``)
    refit_scaling: bool = False  # continuing: fit the input scaling on the new data instead of keeping it


def resolve_profile(profile) -> Profile | None:
    """A Profile, a shipped profile's name or a .toml path, or None."""
    if profile is None or isinstance(profile, Profile):
        return profile
    return load_profile(profile)


def prepare(config: TrainConfig, data: DataSpec, profile=None, fit: bool = False, *,
            plan_only: bool = False, start_from: SparseMLP | None = None, refit_scaling: bool = False) -> Prepared:
    """Validate, plan against ``profile`` (refusing with BudgetError, exit code 3), load, plan again.

    With ``fit``, the settings that do not change the model (batch sizes, similarity samples and
    workspace) shrink until the run fits. ``plan_only`` stops after the first plan (``ctre-edge
    plan``), where an inference-only profile plans the exported model's size instead.

    ``start_from`` continues a trained model on this data (``train.train(start_from=...)``): its
    hidden layers must be ``config.hidden``, the data must have its feature count and only classes
    it knows (a subset is fine; labels are re-coded into the model's classes). It keeps the model's
    input scaling unless ``refit_scaling``. It is planned like a new run of the same shape.
    """
    config = TrainConfig(**vars(config)).validate()
    profile = resolve_profile(profile)
    cold = not kernels_cached()
    given = make_dataset(*data.arrays, source=data.source) if data.arrays is not None else None
    summary = summarize_loaded(given) if given is not None else summarize_data(data.source, **data.load_options())
    if start_from is not None:
        check_continuation(start_from, config, summary.n_features, data.source)
    config, plan = plan_run(config, summary, profile, fit=fit, inference_only_ok=plan_only, cold_cache=cold)
    if plan_only:
        return Prepared(config, plan, None, plan.changes, None, profile, cold, start_from, refit_scaling)
    dataset = given if given is not None else load_data(data.source, **data.load_options())
    if start_from is not None:
        dataset = recode_classes(dataset, start_from.classes, data.source)
    changes = plan.changes  # the second plan starts from the already changed settings
    config, plan = plan_run(config, summarize_loaded(dataset), profile, fit=fit, data_bytes=dataset.nbytes,
                            cold_cache=cold)
    plan.changes = changes + plan.changes
    return Prepared(config, plan, dataset, plan.changes, profile.threads if profile else None, profile, cold,
                    start_from, refit_scaling)


def check_continuation(model: SparseMLP, config: TrainConfig, n_features: int, source: str) -> None:
    """Refuse to continue ``model`` with other hidden layers (ConfigError) or another width (DataError)."""
    hidden = tuple(model.sizes[1:-1])
    if tuple(config.hidden) != hidden:
        raise ConfigError(f"hidden layers {','.join(map(str, config.hidden))} differ from the model's "
                          f"{','.join(map(str, hidden))}; continuing keeps the network's shape")
    if n_features != model.n_features:
        raise DataError(f"{source} has {n_features} features; the model to continue expects {model.n_features}")


def recode_classes(data: Dataset, classes: list, source: str) -> Dataset:
    """``data`` with labels coded into ``classes`` (compared as text: 1 matches "1"); DataError naming
    any label that is not among them, since continuing cannot add an output unit."""
    code = {str(c): i for i, c in enumerate(classes)}
    unseen = [c for c in data.classes if str(c) not in code]
    if unseen:
        shown = ", ".join(map(repr, unseen[:5])) + (" ..." if len(unseen) > 5 else "")
        raise DataError(f"{source} has label(s) {shown} that the model to continue does not know (its classes: "
                        f"{', '.join(map(repr, classes[:10]))}{' ...' if len(classes) > 10 else ''}); "
                        "continuing cannot add classes: train a new model")
    mapping = np.array([code[str(c)] for c in data.classes], dtype=np.int64)
    y_test = None if data.y_test is None else mapping[data.y_test]
    return Dataset(data.X, mapping[data.y], list(classes), data.X_test, y_test, data.name)


def check_output(out: Path | None, force: bool) -> None:
    """Refuse (OutputExistsError, exit code 6) to overwrite ``out`` without ``force``."""
    if out is not None:
        refuse_overwrite(out, force)


@contextlib.contextmanager
def lock_outputs(out: Path | None, checkpointing: Checkpointing | None):
    """Hold ``out`` and the checkpoint directory for this run (``fileio.lock_output``): a second run
    aimed at either stops at once with OutputWriteError (exit code 6), before it touches anything."""
    with contextlib.ExitStack() as held:
        for path in (out, None if checkpointing is None else checkpointing.directory):
            if path is not None:
                held.enter_context(lock_output(path))
        yield


@dataclass
class Report:
    """What ``execute`` returns: the training result and the run's document (``to_dict``)."""

    result: object  # train.TrainResult
    prepared: Prepared
    source: str
    out: Path | None
    measured_peak_bytes: int

    @property
    def model(self):
        return self.result.model

    def to_dict(self) -> dict:
        """The document ``ctre-edge train --json`` prints."""
        result, config, plan, model = self.result, self.prepared.config, self.prepared.plan, self.result.model
        hist = result.history
        return {
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
            "data": self.source,
            "profile": self.prepared.profile.name if self.prepared.profile else None,
            "config": config.to_dict(),
            "memory": {"predicted_peak_bytes": plan.total, "measured_peak_bytes": self.measured_peak_bytes,
                       "budget_bytes": plan.budget, "parts": plan.parts, "fit_changes": plan.changes},
            "out": str(self.out) if self.out is not None else None,
            "history": [vars(s) for s in hist],
            "warnings": result.warnings,
        }


def execute(prepared: Prepared, *, source: str = "", out: Path | None = None, force: bool = False,
            checkpointing=None, progress: Callable | None = None, stop_requested: Callable[[], int] | None = None,
            warn: Callable[[str], None] = lambda message: None, budget=None) -> Report:
    """Train the prepared run, save it to ``out`` if given, and return the report. Prints nothing.

    ``checkpointing``, ``progress``, ``stop_requested``, ``warn`` and ``budget`` (a ``RowBudget``) go to
    ``train.train``. The profile's thread count holds for the run only.
    """
    import numba  # here, not at the top: planning and refusals must not load numba

    from .train import train  # imports the kernels, hence numba

    previous = numba.get_num_threads()
    try:
        if prepared.threads is not None:
            numba.set_num_threads(max(1, min(prepared.threads, numba.config.NUMBA_NUM_THREADS)))
        if prepared.cold_cache:  # compile once, under the cache's lock, before training
            c = prepared.config
            compile_if_cold(steps_for(prepared.dataset.X.dtype, c.method, c.similarity),
                            on_wait=lambda: warn("another process is compiling the kernels into this cache; "
                                                 "waiting to load them from it"))
        result = train(prepared.dataset, prepared.config, progress=progress, checkpointing=checkpointing,
                       stop_requested=stop_requested, warn=warn, budget=budget, start_from=prepared.start_from,
                       refit_scaling=prepared.refit_scaling)
    finally:
        numba.set_num_threads(previous)
    if prepared.cold_cache:
        mark_cached()
    if out is not None:
        result.model.save(out, force=force)
    return Report(result, prepared, source, out, peak_rss_bytes())


def export_budget(model, profile) -> int | None:
    """The memory budget an export to ``profile`` must respect (``budget.budget_bytes``)."""
    return budget_bytes(resolve_profile(profile), model)


RESUME_AUTO = "auto"  # --resume auto: resume if there is a valid checkpoint, else start fresh


def checkpointing(out: Path | None, directory: Path | None, every: int, resume: Path | None, *,
                  enabled: bool = True, force: bool = False) -> Checkpointing | None:
    """Checkpoints go to ``resume``, else ``directory``, else OUT.ckpt next to ``out``, else nowhere.

    ``resume`` "auto" (``RESUME_AUTO``) continues in ``directory`` (or OUT.ckpt) when it holds a valid
    checkpoint and otherwise starts fresh there; a directory named auto is ``./auto``.
    """
    auto = resume is not None and str(resume) == RESUME_AUTO
    if not enabled:
        if resume is not None:
            raise ConfigError("--resume needs checkpoints; drop --no-checkpoint")
        return None
    if every < 1:
        raise ConfigError(f"'checkpoint_every' must be an int >= 1; got {every}")
    if auto:
        if force:
            raise ConfigError("--resume auto continues a run and --force starts over; drop one of them")
        if directory is None and out is None:
            raise ConfigError("--resume auto needs --out (checkpoints in OUT.ckpt) or --checkpoint-dir DIR")
        directory = directory if directory is not None else out.with_name(out.name + ".ckpt")
        return Checkpointing(directory, every, auto=True)
    if resume is not None:
        if directory is not None and directory != resume:
            raise ConfigError("--resume DIR continues in DIR; drop --checkpoint-dir or give the same directory")
        if not resume.is_dir():
            raise ConfigError(f"--resume {resume}: no such checkpoint directory")
        return Checkpointing(resume, every, resume=True)
    if directory is None and out is not None:
        directory = out.with_name(out.name + ".ckpt")
    return None if directory is None else Checkpointing(directory, every, force=force)


class StopOnSignal:
    """First SIGINT/SIGTERM: finish the epoch, checkpoint, stop. A second one: stop at once.

    ``notice(signal name)`` is called on the first signal (the CLI prints what will happen);
    ``requested()`` is the ``stop_requested`` of ``execute``.
    """

    def __init__(self, notice: Callable[[str], None] = lambda name: None):
        self.notice = notice

    def __enter__(self):
        self.signal_number = 0
        self.previous = {}

        def handler(signum, frame):
            if self.signal_number:
                raise KeyboardInterrupt
            self.signal_number = signum
            self.notice(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some test runners): no handler, no harm
                pass
        return self

    def requested(self) -> int:
        return self.signal_number

    def __exit__(self, *exc):
        for sig, h in self.previous.items():
            signal.signal(sig, h)
        return False


def resume_command(argv: list[str], directory: Path) -> str:
    """The command line ``argv`` (without the program) with ``--resume DIR``, so the user can paste it."""
    args, skip = [], False
    for a in argv:
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


def evaluate(model_path: Path, data: DataSpec) -> dict:
    """A saved model's accuracy on a data set: its test part if it has one, else all samples.

    ``data.nan_policy`` other than "error" imputes NaN/Inf with the model's training statistics.
    """
    model = SparseMLP.load(model_path)
    # NaN/Inf stay in place here and are refused or imputed with the model's recorded training
    # statistics (not this file's), exactly as predict does.
    options = dict(data.load_options(), nan_policy="error" if data.nan_policy == "error" else "keep")
    ds = load_data(data.source, **options)
    X, y = (ds.X_test, ds.y_test) if ds.X_test is not None else (ds.X, ds.y)
    if X.shape[1] != model.n_features:
        raise DataError(f"{data.source} has {X.shape[1]} features; the model {model_path} expects {model.n_features}")
    X = apply_nan_policy(X, data.nan_policy, model.nan_policy, model.nan_fill, str(model_path), data.source)
    labels = [str(ds.classes[c]) for c in y]
    hits = sum(str(p) == t for p, t in zip(model.predict(X).tolist(), labels))
    return {"accuracy": hits / len(labels), "samples": len(labels),
            "part": "test part" if ds.X_test is not None else "all samples", "data": data.source}
