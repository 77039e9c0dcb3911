"""What every command module shares: turning failures into one line, option types, choice enums.

``cli.py`` (training and models), ``cli_views.py`` (looking at models, data and profiles) and
``fleet/cli.py`` import this module; it loads only typer, rich and the package's lean modules.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .config import INITS, KERNELS, METHODS, NAN_POLICIES, SCALINGS, SIMILARITIES
from .console import err
from .errors import ConfigError, CtreError

state = {"debug": False}


def _choices(name: str, names) -> type[enum.Enum]:
    """A str Enum of ``names`` (a table the code dispatches on): typer lists and enforces its values."""
    return enum.Enum(name, {n: n for n in names}, type=str)


Method, Init, Similarity, Scaling, NanPolicy, Kernel = (_choices(n, t) for n, t in (
    ("Method", METHODS), ("Init", INITS), ("Similarity", SIMILARITIES), ("Scaling", SCALINGS),
    ("NanPolicy", NAN_POLICIES), ("Kernel", KERNELS)))


def value(v):
    """An option's plain value (the string behind a choice enum)."""
    return v.value if isinstance(v, enum.Enum) else v


def run_command(fn):
    """Call fn(); turn our errors and unexpected ones into one line and an exit code."""
    try:
        return fn()
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        if state["debug"]:
            raise
        if isinstance(e, CtreError):  # escaped: a message may hold brackets, e.g. pip install 'ctre-edge[plot]'
            err.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                  soft_wrap=True)
        raise typer.Exit(1) from None


def parse_hidden(text: str) -> tuple:
    try:
        hidden = tuple(int(h) for h in text.replace(" ", "").split(",") if h)
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated layer widths such as 1000,1000,1000; got {text!r}") from None
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"--hidden must be comma-separated positive widths such as 1000,1000,1000; got {text!r}")
    return hidden


def parse_target(text):
    """--target as a column index when it is an integer, else as a column name."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


DataOpt = Annotated[str, typer.Option(help="Training data: .npz (X, y, optional X_test, y_test), .csv/.tsv, LIBSVM (.libsvm/.svm), MNIST IDX (IMAGES[,LABELS]) or builtin:digits.")]
TargetOpt = Annotated[Optional[str], typer.Option(help="CSV/TSV: the label column, by name or index (default: the last column).")]
NanOpt = Annotated[NanPolicy, typer.Option(help="NaN/Inf in features (statistics from the training file).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ModelArg = Annotated[Path, typer.Argument(metavar="MODEL", help="A model written by train --out.")]
