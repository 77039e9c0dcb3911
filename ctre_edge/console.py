"""Everything the CLI shows on a terminal: tables, the progress bar, the heat map, byte counts.

Output goes to stderr (``err``); stdout carries only ``--json`` documents and ``predict``'s
results. Nothing here decides anything: the commands pass in what to show.
"""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as Bar
from rich.table import Table
from rich.text import Text

from .budget import PART_LABELS

err = Console(stderr=True, highlight=False, soft_wrap=True)


def format_bytes(n: int) -> str:
    """Binary units with one decimal, e.g. 536870912 -> '512.0 MiB'; the one byte format of the CLI."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    sys.stdout.flush()


def write_probabilities(classes, proba, as_json: bool) -> None:
    """``predict --proba`` on stdout: CSV with a header of class labels, or one JSON document."""
    rows = [[float(v) for v in r] for r in proba]
    if as_json:
        print_json({"classes": classes, "probabilities": rows})
    else:
        sys.stdout.write(",".join(map(str, classes)) + "\n")
        sys.stdout.write("".join(",".join(f"{v:.6g}" for v in r) + "\n" for r in rows))


def write_labels(predicted, as_json: bool) -> None:
    """``predict`` on stdout: one label per line, or one JSON document."""
    labels = [v.item() if hasattr(v, "item") else v for v in predicted]
    labels = [v.decode() if isinstance(v, bytes) else v for v in labels]
    if as_json:
        print_json({"labels": labels})
    else:
        sys.stdout.write("".join(f"{v}\n" for v in labels))


def write_rows(fmt: str, classes, labels, proba) -> None:
    """``predict --format csv|jsonl`` on stdout: per sample the predicted label and every class's
    probability. CSV has a header (``label`` then the class names); JSON lines hold one object per sample."""
    import csv  # only these two formats need it

    labels = [v.item() if hasattr(v, "item") else v for v in labels]
    labels = [v.decode() if isinstance(v, bytes) else v for v in labels]
    names = [str(c) for c in classes]
    if fmt == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(["label", *names])
        out.writerows([label, *(f"{float(v):.6g}" for v in row)] for label, row in zip(labels, proba))
    else:
        sys.stdout.write("".join(json.dumps({"label": label, "probabilities": dict(zip(names, map(float, row)))}) + "\n"
                                 for label, row in zip(labels, proba)))
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def table(title: str, columns, rows, justify: str = "left") -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify=justify)
    for r in rows:
        t.add_row(*r)
    return t


# --- train and plan -----------------------------------------------------------------------------------

def show_plan(plan) -> None:
    """The predicted peak memory (or, on a microcontroller, the C export's flash and RAM) part by part."""
    if hasattr(plan, "flash"):
        show_mcu_plan(plan)
        return
    rows = [(PART_LABELS[k], format_bytes(v)) for k, v in plan.parts.items()]
    total = "peak (per-epoch parts overlap: only the larger counts)"
    rows.append((f"[bold]{total}[/bold]", f"[bold]{format_bytes(plan.total)}[/bold]"))
    if plan.budget is not None:
        rows.append(("budget" + (f" ({plan.headroom:.0%} usable)" if plan.headroom < 1 else ""),
                     format_bytes(plan.budget)))
    title = "predicted peak memory" + (f" on {plan.profile}" if plan.profile else "")
    t = table(title, ("part", "bytes"), rows)
    t.columns[1].justify = "right"
    err.print(t)
    if plan.changes:
        err.print("--fit would change: " + ", ".join(plan.changes))
    if plan.budget is not None:
        err.print("[green]fits[/green]" if plan.fits else "[red]does not fit[/red]")


def show_train_summary(doc: dict) -> None:
    acc = "n/a" if doc["test_accuracy"] is None else f"{doc['test_accuracy']:.4f}"
    mem = doc["memory"]
    err.print(f"test accuracy {acc} at best validation epoch {doc['best_epoch']}; "
              f"{sum(doc['nnz']):,} connections (density {doc['density']:.4%}); "
              f"{doc['seconds_per_epoch']:.3f} s/epoch (median); peak memory "
              f"{format_bytes(mem['measured_peak_bytes'])} (predicted {format_bytes(mem['predicted_peak_bytes'])})"
              + (f"; model written to {doc['out']}" if doc["out"] is not None else ""))


class Progress:
    """A rich progress bar on stderr, one step per epoch, showing the latest epoch's figures."""

    def __init__(self, epochs: int, quiet: bool):
        self.epochs, self.quiet = epochs, quiet

    def __enter__(self):
        if self.quiet:
            return None
        self.bar = Bar(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(bar_width=12), TimeElapsedColumn(),
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


def show_mcu_plan(plan) -> None:
    from .mcu_plan import part_label  # only microcontroller plans need it

    rows = []
    for where, parts, total, budget in (("flash", plan.flash, plan.flash_total, plan.flash_budget),
                                        ("RAM", plan.ram, plan.ram_total, plan.ram_budget)):
        rows += [(where, part_label(k, plan.quantize), f"{v:,}") for k, v in parts.items()]
        rows.append((where, f"[bold]total[/bold] (budget {'-' if budget is None else f'{budget:,}'})",
                     f"[bold]{total:,}[/bold]"))
    t = table(f"C export ({'float32' if plan.quantize == 'none' else plan.quantize}) on {plan.profile}",
              ("memory", "part", "bytes"), rows)
    t.columns[2].justify = "right"
    err.print(t)
    err.print("[green]fits[/green]" if plan.fits else "[red]does not fit[/red]")


def show_c_export(report: dict, quantize: str, data, prof) -> None:
    """What ``export --format c`` wrote, its flash and RAM, and (int8) the accuracy change."""
    m = report["memory"]
    if not report.get("split_matches_training", True):
        warn(f"float32 accuracy on {data} differs from the accuracy stored at training: it is not the data "
             "(or test split) the model was trained with")
    budget = (f" ({prof.name} allows {format_bytes(m['flash_budget_bytes'])} and "
              f"{format_bytes(m['ram_budget_bytes'])})") if prof and m["flash_budget_bytes"] else ""
    err.print(f"wrote {report['header']} and {report['source']}: about {format_bytes(m['flash_bytes'])} of flash "
              f"({format_bytes(m['flash']['code'])} of it code) and {format_bytes(m['ram']['workspace'])} of static "
              f"RAM + ~{m['ram']['stack']} B of stack on a Cortex-M" + budget)
    if quantize == "int8":
        line = (f"int8: labels agree with float32 on {report['agreement']:.1%} of {report['agreement_samples']} "
                "deterministic inputs")
        if "accuracy_int8" in report:
            change = 100 * (report["accuracy_int8"] - report["accuracy_float32"])
            line += (f"; test accuracy {report['accuracy_float32']:.4f} (float32) -> {report['accuracy_int8']:.4f} "
                     f"(int8), {change:+.2f} points on the model's test split ({report['check_count']} samples of "
                     f"{data})")
        else:
            line += "; pass --data with the training data to measure the accuracy change on the model's test split"
        err.print(line)
    elif "accuracy_float32" in report:
        err.print(f"test accuracy {report['accuracy_float32']:.4f} on the model's test split "
                  f"({report['check_count']} samples of {data})")


# --- models, data, profiles ---------------------------------------------------------------------------

def show_model(title: str, doc: dict) -> None:
    rows = [(str(r["layer"]), f"{r['n_in']} x {r['n_out']}", f"{r['nnz']:,}", f"{r['density']:.4%}", f"{r['bytes']:,}")
            for r in doc["layers"]]
    total_bytes = sum(r["bytes"] for r in doc["layers"])
    rows.append(("all", "", f"{sum(doc['nnz']):,}", f"{doc['density']:.4%}", f"{total_bytes:,}"))
    err.print(table(title, ("layer", "n_in x n_out", "connections", "density", "bytes"), rows, justify="right"))
    acc = doc["metrics"].get("test_accuracy")
    if acc is not None:
        err.print(f"test accuracy {acc:.4f} at epoch {doc['metrics'].get('best_epoch')}")


def show_features(n_features: int, rows: list[dict], unconnected: int) -> None:
    lines = [(str(i), str(r["feature"]), str(r["connections"]), f"{r['total_abs_weight']:.3f}")
             for i, r in enumerate(rows, 1)]
    err.print(table(f"input features by surviving connections (of {n_features})",
                    ("rank", "feature", "connections", "total |w|"), lines, justify="right"))
    err.print(f"{unconnected} of {n_features} features have no connection left")


def heat_map(image) -> None:
    """Two pixels per character cell (upper half block), colour = degree, for terminals without plots."""
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


def show_data(doc: dict) -> None:
    test = doc["test"]
    columns = ["", "training part" if test else "data"] + (["test part"] if test else [])
    keys = [("samples", "n_samples"), ("features", "n_features"), ("dtype", "dtype"), ("min", "min"),
            ("max", "max"), ("constant features", "constant_features"), ("NaN/Inf values", "nan_count")]
    rows = [(label, str(doc.get(key)), *([str(test.get(key))] if test else [])) for label, key in keys]
    balance = ", ".join(f"{k}: {v}" for k, v in list(doc["classes"].items())[:12])
    more = len(doc["classes"]) - 12
    rows.append(("classes", f"{doc['n_classes']} ({balance}{f', ... {more} more' if more > 0 else ''})",
                 *([""] if test else [])))
    rows.append(("memory", format_bytes(doc["nbytes"]), *([""] if test else [])))
    err.print(table(doc["name"], columns, rows))


def show_profiles(profiles) -> None:
    rows = [(p.name, p.arch, format_bytes(p.ram_bytes),
             format_bytes(p.train_budget_bytes) if p.can_train else "inference only",
             format_bytes(p.model_budget_bytes) if p.model_budget_bytes else "-", str(p.threads)) for p in profiles]
    err.print(table("device profiles", ("name", "arch", "RAM", "train budget", "model budget", "threads"), rows))


def profile_rows(profile) -> list[tuple[str, str]]:
    """Human-readable (field, value) pairs of a profile; the field column uses the TOML keys.

    Byte counts in binary units (``"512.0 MiB"``), counts with thousands separators, ``"-"`` for
    an absent optional value.
    """

    def size(n: int | None) -> str:
        return "-" if n is None else format_bytes(n)

    return [
        ("name", profile.name),
        ("description", profile.description),
        ("arch", profile.arch),
        ("cores", str(profile.cores)),
        ("threads", str(profile.threads)),
        ("ram_bytes", size(profile.ram_bytes)),
        ("flash_bytes", size(profile.flash_bytes)),
        ("can_train", "yes" if profile.can_train else "no (inference only)"),
        ("train_budget_bytes", size(profile.train_budget_bytes)),
        ("model_budget_bytes", size(profile.model_budget_bytes)),
        ("workspace_budget_bytes", size(profile.workspace_budget_bytes)),
        ("max_params", f"{profile.max_params:,}"),
        ("max_layer_width", f"{profile.max_layer_width:,}"),
        ("similarity_sample_cap", f"{profile.similarity_sample_cap:,}"),
        ("path", "-" if profile.path is None else str(profile.path)),
    ]


def show_profile(profile) -> None:
    err.print(table(profile.name, ("field", "value"), profile_rows(profile)))


# --- report -------------------------------------------------------------------------------------------

def show_report(facts: dict, lines: list[str], max_rows: int = 20) -> None:
    """``ctre-edge report`` without a figure: the headline, the history (at most ``max_rows`` epochs,
    evenly spaced, the best one always included) and each layer's in-degree spread."""
    for line in lines:
        err.print(line)
    hist, best = facts["history"], facts["metrics"].get("best_epoch")
    if hist:
        n = len(hist["epoch"])
        keep = sorted({int(round(i)) for i in (range(n) if n <= max_rows else
                                                (k * (n - 1) / (max_rows - 1) for k in range(max_rows)))}
                      | ({best - 1} if best else set()))
        rows = [(f"{hist['epoch'][i]}{' *' if hist['epoch'][i] == best else ''}", f"{hist['loss'][i]:.4f}",
                 f"{hist['train_accuracy'][i]:.4f}", f"{hist['val_accuracy'][i]:.4f}",
                 f"{hist['grown_cosine'][i]:,}", f"{hist['grown_random'][i]:,}") for i in keep if 0 <= i < n]
        err.print(table(f"history ({n} epochs; * best)", ("epoch", "loss", "train acc", "val acc",
                                                          "grown by cosine", "grown at random"), rows, "right"))
    else:
        err.print("no history saved with this model (trained before models kept it)")
    rows = [(str(r["layer"]), f"{r['n_in']} -> {r['n_out']}", f"{r['nnz']:,}", str(r["in_degree_min"]),
             f"{r['in_degree_median']:g}", str(r["in_degree_max"]), str(r["no_inputs"])) for r in facts["layers"]]
    err.print(table("in-degree per neuron", ("layer", "shape", "connections", "min", "median", "max",
                                             "without inputs"), rows, "right"))
