"""What the evolved topology says about the inputs: features ranked by their surviving connections.

The CTRE paper observes that the input connectivity CTRE evolves reflects feature importance:
informative features keep and gain connections, noise features lose them. ``feature_ranking``
reads that off the first layer; ``degree_map`` lays the degrees out as an image for image data.
"""

from __future__ import annotations

import numpy as np


def feature_ranking(model) -> dict:
    """Per input feature: out-degree and total |w| in the first layer, and the ranking by both.

    Returns a dict of arrays: ``degree`` (int64), ``weight`` (float64, sum of |w|), and ``order``
    (feature indices, most connected first; ties by total |w|, then by index).
    """
    layer = model.layers[0]
    degree = np.diff(layer.indptr).astype(np.int64)
    weight = np.zeros(layer.n_in)
    np.add.at(weight, layer.rows(), np.abs(layer.values.astype(np.float64)))
    order = np.lexsort((np.arange(layer.n_in), -weight, -degree))
    return {"degree": degree, "weight": weight, "order": order}


def top_features(model, top: int) -> tuple[list[dict], int, np.ndarray]:
    """(the ``top`` features as rows of feature, connections, total_abs_weight; how many inputs have
    no connection left; the degree of every input)."""
    rank = feature_ranking(model)
    rows = [{"feature": int(f), "connections": int(rank["degree"][f]), "total_abs_weight": float(rank["weight"][f])}
            for f in rank["order"][:max(1, top)]]
    return rows, int(np.sum(rank["degree"] == 0)), rank["degree"]


def image_shape(n_features: int, shape: str | None = None) -> tuple[int, int] | None:
    """(height, width) from ``"HxW"``, or a square guess when n_features is a perfect square."""
    if shape:
        try:
            h, w = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image-shape must look like 28x28; got {shape!r}") from None
        if h * w != n_features:
            raise ValueError(f"--image-shape {shape} has {h * w} pixels but the model has {n_features} features")
        return h, w
    side = int(round(n_features ** 0.5))
    return (side, side) if side * side == n_features and side > 1 else None


def degree_map(model, shape: tuple[int, int], column_major: bool = False) -> np.ndarray:
    """The first layer's input degrees as an image of ``shape`` (COIL-20 in its source is column-major)."""
    degree = feature_ranking(model)["degree"]
    return degree.reshape(shape[::-1]).T if column_major else degree.reshape(shape)


def write_png(image: np.ndarray, path, title: str = "") -> bool:
    """Write a heat map with matplotlib if it is installed; returns False when it is not."""
    try:
        import matplotlib  # optional: without it the CLI draws a terminal heat map

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(4, 4))
    im = ax.imshow(image, cmap="viridis")
    ax.set_title(title)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True
