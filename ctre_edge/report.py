"""How a run went, from its saved model: the facts (numpy only) and, with matplotlib, one figure.

``report_facts`` reads the model's metrics (the per-epoch ``epoch_history`` that ``train`` keeps: loss,
accuracies, learning rate, connections changed and grown by cosine or at random) and its layers
(each layer's in-degree per neuron, the input features' out-degree). ``draw_report`` lays them out
as one figure of ``FIGSIZE`` inches at ``DPI`` (a fixed pixel size) and writes a PNG, or an HTML
page with the PNG inlined and the facts as a table. ``ctre-edge report`` shows the same facts in the
terminal when matplotlib is missing.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np

from .topology import degree_map, feature_ranking, image_shape

FIGSIZE = (12.0, 7.0)  # inches; with DPI the PNG is 1200 x 700 pixels
DPI = 100
INSTALL_HINT = "pip install 'ctre-edge[plot]' (or pip install matplotlib)"


def report_facts(model, shape_text: str | None = None) -> dict:
    """Everything the report shows, as plain JSON-able values.

    Keys: sizes, method, density, nnz, metrics (best epoch, test and best validation accuracy, ...),
    history (lists per epoch, or None for a model saved without one), grown (total connections
    grown by cosine and at random), layers (per layer: in-degree min, median, max, neurons with none,
    and the counts of each in-degree), inputs (features with no connection, the image shape if any).
    """
    history = model.metrics.get("epoch_history")
    layers = []
    for l, layer in enumerate(model.layers):
        indeg = np.bincount(layer.indices, minlength=layer.n_out)
        layers.append({"layer": l, "n_in": layer.n_in, "n_out": layer.n_out, "nnz": layer.nnz,
                       "in_degree_min": int(indeg.min()), "in_degree_median": float(np.median(indeg)),
                       "in_degree_max": int(indeg.max()), "no_inputs": int(np.sum(indeg == 0)),
                       "in_degree_counts": np.bincount(indeg).tolist()})
    degree = feature_ranking(model)["degree"]
    shape = image_shape(model.n_features, shape_text)
    grown = {"cosine": int(sum(history["grown_cosine"])), "random": int(sum(history["grown_random"]))} \
        if history else None
    return {"sizes": model.sizes, "method": model.config.get("method"), "density": model.density,
            "nnz": model.nnz, "metrics": {k: v for k, v in model.metrics.items() if k != "epoch_history"},
            "history": history, "grown": grown, "layers": layers,
            "inputs": {"n_features": model.n_features, "unconnected": int(np.sum(degree == 0)),
                       "max_degree": int(degree.max()), "image_shape": list(shape) if shape else None}}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401 - optional: probing whether the figure can be drawn
    except ImportError:
        return False
    return True


def draw_report(model, facts: dict, path, fmt: str, *, force: bool = False) -> None:
    """Write the figure as ``fmt`` "png" or "html" to ``path`` (atomically; ``force`` overwrites).
    Needs matplotlib."""
    from .fileio import atomic_write  # with matplotlib below: only an actual drawing needs them

    png = _figure_png(model, facts)
    data = png if fmt == "png" else _html_page(facts, png).encode("utf-8")
    atomic_write(path, lambda f: f.write(data), force=force)


def _figure_png(model, facts: dict) -> bytes:
    import matplotlib  # optional (the `plot` extra); the caller checked it is installed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    hist, best = facts["history"], facts["metrics"].get("best_epoch")
    (loss_ax, acc_ax, grow_ax), (deg_ax, map_ax, text_ax) = axes
    if hist:
        epochs = hist["epoch"]
        loss_ax.plot(epochs, hist["loss"], color="tab:red")
        acc_ax.plot(epochs, hist["train_accuracy"], color="tab:gray", label="train")
        acc_ax.plot(epochs, hist["val_accuracy"], color="tab:blue", label="validation")
        acc_ax.legend(loc="lower right")
        grow_ax.bar(epochs, hist["grown_cosine"], color="tab:green", label="by cosine")
        grow_ax.bar(epochs, hist["grown_random"], bottom=hist["grown_cosine"], color="tab:orange", label="at random")
        grow_ax.legend(loc="lower right", framealpha=0.9)
        for ax in (loss_ax, acc_ax, grow_ax):
            if best:
                ax.axvline(best, color="black", linestyle="--", linewidth=1)
            ax.set_xlabel("epoch")
    else:
        for ax in (loss_ax, acc_ax, grow_ax):
            ax.text(0.5, 0.5, "no history saved with this model", ha="center", va="center", transform=ax.transAxes)
    loss_ax.set_title("training loss (dashed: best epoch)")
    acc_ax.set_title("accuracy")
    grow_ax.set_title("connections grown per epoch")
    # one box per layer on a log axis: a dense output layer's in-degree is n_in, far above the sparse ones
    indegrees = [np.bincount(layer.indices, minlength=layer.n_out) for layer in model.layers]
    deg_ax.boxplot([np.maximum(d, 1) for d in indegrees], showfliers=True)
    deg_ax.set_xticks(range(1, len(indegrees) + 1),
                      [f"layer {l}\n{layer.n_in}->{layer.n_out}" for l, layer in enumerate(model.layers)])
    deg_ax.set_yscale("log")
    deg_ax.set_title("in-degree per neuron, by layer")
    deg_ax.set_ylabel("connections in")
    shape = facts["inputs"]["image_shape"]
    if shape:
        im = map_ax.imshow(degree_map(model, tuple(shape)), cmap="viridis")
        fig.colorbar(im, ax=map_ax, fraction=0.046)
        map_ax.axis("off")
        map_ax.set_title("input connections per pixel")
    else:
        degree = np.sort(feature_ranking(model)["degree"])[::-1]
        map_ax.plot(np.arange(1, degree.shape[0] + 1), degree, color="tab:purple")
        map_ax.set_title("input features by connections")
        map_ax.set_xlabel("feature rank")
    text_ax.axis("off")
    text_ax.text(0.0, 1.0, "\n".join(summary_lines(facts)), va="top", family="monospace", fontsize=9,
                 transform=text_ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def summary_lines(facts: dict) -> list[str]:
    """The headline facts as short lines (the figure's text panel, the HTML page and the terminal)."""
    m = facts["metrics"]
    acc = m.get("test_accuracy")
    lines = [f"{'-'.join(map(str, facts['sizes']))}, method {facts['method']}",
             f"{sum(facts['nnz']):,} connections, density {facts['density']:.3%}",
             f"best epoch {m.get('best_epoch')} of {m.get('epochs_run')} run",
             f"best validation accuracy {m.get('best_val_accuracy', float('nan')):.4f}",
             f"test accuracy {'n/a' if acc is None else f'{acc:.4f}'}"]
    if facts["grown"]:
        lines.append(f"grown: {facts['grown']['cosine']:,} by cosine, {facts['grown']['random']:,} at random")
    inputs = facts["inputs"]
    lines.append(f"{inputs['unconnected']} of {inputs['n_features']} inputs unconnected")
    return lines


def _html_page(facts: dict, png: bytes) -> str:
    rows = "".join(f"<tr><td>{r['layer']}</td><td>{r['n_in']}</td><td>{r['n_out']}</td><td>{r['nnz']}</td>"
                   f"<td>{r['in_degree_min']}</td><td>{r['in_degree_median']:g}</td><td>{r['in_degree_max']}</td>"
                   f"<td>{r['no_inputs']}</td></tr>" for r in facts["layers"])
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(facts))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ctre-edge report</title></head><body>\n"
            f"<h1>ctre-edge report</h1><ul>{items}</ul>\n"
            f"<img alt=\"training report\" src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">\n"
            "<table border=\"1\"><tr><th>layer</th><th>in</th><th>out</th><th>connections</th><th>in-degree min</th>"
            f"<th>median</th><th>max</th><th>neurons without inputs</th></tr>{rows}</table>\n</body></html>\n")
