"""Commands that look at things: a saved model (``info``), a data file (``data inspect``), profiles.

Registered on the ``ctre-edge`` app by ``cli.py``; each loads only what it shows (numpy for models
and data, the TOML reader for profiles), never numba or onnx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console, run
from .cli_common import JsonOpt, ModelArg, NanOpt, NanPolicy, TargetOpt, parse_target, run_command, value
from .console import err, print_json
from .errors import ConfigError


def info(
    model_path: ModelArg,
    features: Annotated[bool, typer.Option("--features", help="Rank input features by their surviving connections (and total |w|).")] = False,
    top: Annotated[int, typer.Option(help="With --features: how many features to list.")] = 20,
    image_shape: Annotated[Optional[str], typer.Option(help="With --features: lay the input degrees out as an HxW image (square inputs are guessed).")] = None,
    png: Annotated[Optional[Path], typer.Option(help="With --features: write the input-degree map as a PNG (needs matplotlib; otherwise a terminal heat map).")] = None,
    as_json: JsonOpt = False,
):
    """Layers, connections, density and bytes of a saved model; --features ranks the inputs."""

    def body():
        from .model import SparseMLP  # numpy only; kept out of `--help`

        model = SparseMLP.load(model_path)
        if features:
            _feature_report(model, top, image_shape, png, as_json)
            return
        rows = [{"layer": l, "n_in": L.n_in, "n_out": L.n_out, "nnz": L.nnz, "density": L.density, "bytes": L.nbytes}
                for l, L in enumerate(model.layers)]
        doc = {"sizes": model.sizes, "layers": rows, "nnz": model.nnz, "density": model.density,
               "classes": model.classes, "config": model.config, "metrics": model.metrics}
        if as_json:
            print_json(doc)
        else:
            console.show_model(f"{model_path}: {'-'.join(map(str, model.sizes))}, method "
                               f"{model.config.get('method', '?')}", doc)

    run_command(body)


def _feature_report(model, top: int, shape_text, png, as_json: bool) -> None:
    from .topology import degree_map, image_shape, top_features, write_png  # only `info --features` needs it

    rows, unconnected, degree = top_features(model, top)
    try:
        shape = image_shape(model.n_features, shape_text)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if png is not None:
        if shape is None:
            raise ConfigError("--png needs an image: pass --image-shape HxW")
        run.check_output(png, force=False)
        if not write_png(degree_map(model, shape), png, "input connections per pixel"):
            raise ConfigError("--png needs matplotlib (pip install matplotlib); without it a terminal map is shown")
    if as_json:
        print_json({"top": rows, "unconnected_features": unconnected, "degree": degree.tolist()})
        return
    console.show_features(model.n_features, rows, unconnected)
    if shape is not None and png is None:
        console.heat_map(degree_map(model, shape))
    elif png is not None:
        err.print(f"wrote {png}")


def report(
    model_path: ModelArg,
    out: Annotated[Optional[Path], typer.Option(help="Write the figure here: .png, or .html (the figure and the facts in one page). Needs matplotlib.")] = None,
    image_shape: Annotated[Optional[str], typer.Option(help="Lay the input degrees out as an HxW image (square inputs are guessed).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
    as_json: JsonOpt = False,
):
    """How a run went: loss and accuracy per epoch, the best epoch, connections grown by cosine and at
    random, each layer's in-degrees and the input-degree map (a figure with --out, else a terminal summary)."""

    def body():
        from .model import SparseMLP  # with report below: numpy only (matplotlib is imported to draw)
        from .report import INSTALL_HINT, draw_report, have_matplotlib, report_facts, summary_lines

        fmt = None
        if out is not None:
            fmt = out.suffix.lower().lstrip(".")
            if fmt not in ("png", "html"):
                raise ConfigError(f"--out {out}: the report is written as .png or .html")
            run.check_output(out, force)
        model = SparseMLP.load(model_path)
        try:
            facts = report_facts(model, image_shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if as_json:
            print_json(facts)
        if out is not None and have_matplotlib():
            draw_report(model, facts, out, fmt, force=force)
            err.print(f"wrote {out}")
            return
        if not as_json:
            console.show_report(facts, summary_lines(facts))
            shape = facts["inputs"]["image_shape"]
            if shape:
                from .topology import degree_map  # numpy only

                console.heat_map(degree_map(model, tuple(shape)))
        if out is not None:
            raise ConfigError(f"--out {out} needs matplotlib: {INSTALL_HINT}; the summary above has the same facts")

    run_command(body)


data_app = typer.Typer(no_args_is_help=True, help="Look at a data file before training on it.")


@data_app.command("inspect")
def data_inspect(
    spec: Annotated[str, typer.Argument(metavar="FILE", help="A data file in any train --data format, or builtin:NAME.")],
    target: TargetOpt = None,
    test_data: Annotated[Optional[str], typer.Option(help="A separate test file.")] = None,
    nan_policy: NanOpt = NanPolicy.error,
    as_json: JsonOpt = False,
):
    """Shape, dtype, class balance, value ranges, NaN count and memory size of a data set."""

    def body():
        from .data import inspect_data  # numpy-only; kept out of `--help`

        doc = inspect_data(spec, target=parse_target(target), test_spec=test_data, nan_policy=value(nan_policy))
        print_json(doc) if as_json else console.show_data(doc)

    run_command(body)


profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles: memory budget, threads and caps.")


@profiles_app.command("list")
def profiles_list(as_json: JsonOpt = False):
    """The shipped device profiles."""

    def body():
        from .profiles import list_profiles  # reads the shipped TOML files

        profs = list_profiles()
        if as_json:
            print_json([{k: v for k, v in vars(p).items() if k != "path"} for p in profs])
        else:
            console.show_profiles(profs)

    run_command(body)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="A profile name or a .toml file.")], as_json: JsonOpt = False):
    """Every field of one profile."""

    def body():
        p = run.resolve_profile(name)
        if as_json:
            print_json({k: (str(v) if k == "path" else v) for k, v in vars(p).items()})
        else:
            console.show_profile(p)

    run_command(body)
