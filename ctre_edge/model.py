"""SparseMLP: a trained network in sparse form, its forward pass, and its one-file saved format.

The saved model is an uncompressed zip of ``.npy`` members (readable with ``numpy.load`` and no
pickle) plus a JSON header ``meta.json``: format name and version, layer sizes, class labels,
input scaling, the training configuration and metrics, and a SHA-256 over every array so a
corrupt file is never loaded as valid (``fileio.write_archive``). The same model gives the same
bytes. numba is imported only when a prediction is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import ModelFileError
from .fileio import read_archive, write_archive
from .layers import SparseLayer, check_layer
from .packed import PackedNet, no_csc

FORMAT = "ctre-edge-model"
FORMAT_VERSION = 1


@dataclass
class SparseMLP:
    """A sparse multilayer perceptron: ReLU hidden layers, softmax output.

    Attributes
    ----------
    layers : list of SparseLayer
    shift, scale : ndarray of float32, shape (n_features,)
        Input scaling, x' = (x - shift) * scale, fitted on the training split.
    classes : list
        Class label of each output unit (ints or strings), in output order.
    config : dict
        The training configuration that produced the model.
    metrics : dict
        Results worth keeping with the model (test accuracy, best epoch, ...).
    nan_policy : str
        The ``--nan-policy`` of training ("error" when none was given).
    nan_fill : ndarray of float32, shape (n_features,), or None
        The training file's per-feature fill values of that policy (None under "error"), so a
        prediction imputes NaN/Inf as the trainer did (``predict(X, nan_policy=...)``).
    """

    layers: list[SparseLayer]
    shift: np.ndarray
    scale: np.ndarray
    classes: list
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    nan_policy: str = "error"
    nan_fill: np.ndarray | None = None

    @property
    def sizes(self) -> list[int]:
        return [self.layers[0].n_in] + [layer.n_out for layer in self.layers]

    @property
    def n_features(self) -> int:
        return self.layers[0].n_in

    @property
    def nnz(self) -> list[int]:
        return [layer.nnz for layer in self.layers]

    @property
    def density(self) -> float:
        """Connections over the dense count, over all layers (from the real counts)."""
        return sum(self.nnz) / sum(layer.n_in * layer.n_out for layer in self.layers)

    def packed(self) -> PackedNet:
        """The layers concatenated into flat arrays with offsets, the form the kernels take."""
        return PackedNet.from_layers(self.layers, momentum=False)

    # -- inference --------------------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray, batch_size: int = 256, nan_policy: str = "error") -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), float32.

        NaN/Inf in X are refused (DataError naming the first row and column) unless ``nan_policy``
        is "zero", or the "mean"/"median" the model was trained with (its recorded fill values).
        """
        from . import kernels  # here, not at the top: `info` and `export` load models without numba
        from .io.common import apply_nan_policy

        X = apply_nan_policy(_as_2d_features(X, self.n_features), nan_policy, self.nan_policy, self.nan_fill)
        net = self.packed()
        bs = max(1, min(batch_size, X.shape[0]))
        act = net.activation_buffer(bs)
        proba = np.empty((X.shape[0], int(net.sizes[-1])), dtype=np.float32)
        if X.shape[0]:
            kernels.predict_batches(X, np.arange(X.shape[0]), self.shift, self.scale, *net.forward, *no_csc(), bs,
                                    act, proba)
        return proba

    def predict(self, X: np.ndarray, nan_policy: str = "error") -> np.ndarray:
        """Predicted class labels (NaN/Inf as in ``predict_proba``)."""
        return np.asarray(self.classes)[np.argmax(self.predict_proba(X, nan_policy=nan_policy), axis=1)]

    # -- persistence ------------------------------------------------------------------------------
    def arrays(self) -> dict:
        """The model's arrays by stable name (the saved file's members)."""
        arrays = {"scaling.shift": self.shift, "scaling.scale": self.scale}
        for l, layer in enumerate(self.layers):
            for name in ("indptr", "indices", "values", "bias"):
                arrays[f"layer{l}.{name}"] = getattr(layer, name)
        if self.nan_fill is not None:
            arrays["nan.fill"] = np.asarray(self.nan_fill, np.float32)
        return arrays

    def save(self, path, *, force: bool = False) -> Path:
        """Write the model atomically to ``path`` (refuses to overwrite unless ``force``)."""
        meta = {"ctre_edge_version": __version__, "sizes": self.sizes, "config": self.config,
                "classes": [_jsonable(c) for c in self.classes], "metrics": self.metrics}
        if self.nan_fill is not None:  # absent under "error", so such files keep their earlier bytes
            meta["nan_policy"] = self.nan_policy
        return write_archive(path, FORMAT, FORMAT_VERSION, self.arrays(), meta, force=force)

    @classmethod
    def load(cls, path) -> "SparseMLP":
        """Read and validate a saved model; any defect raises ModelFileError with one line."""
        arrays, meta = read_archive(path, FORMAT, FORMAT_VERSION, "model")
        try:
            model = cls.from_arrays(arrays, meta["sizes"], list(meta["classes"]), dict(meta.get("config", {})),
                                    dict(meta.get("metrics", {})))
            if "nan.fill" in arrays:
                fill, policy = arrays["nan.fill"], meta.get("nan_policy")
                if fill.shape != (model.n_features,) or policy not in ("zero", "mean", "median"):
                    raise ValueError("the NaN fill values do not match the features or name no policy")
                model.nan_policy, model.nan_fill = policy, fill.astype(np.float32)
            return model
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ModelFileError(f"{path} has an invalid structure: {e}") from None

    @classmethod
    def from_arrays(cls, arrays: dict, sizes, classes, config=None, metrics=None, prefix: str = "") -> "SparseMLP":
        """Rebuild a model from ``arrays()`` output (optionally with a name prefix), validating it."""
        sizes = [int(s) for s in sizes]
        layers = [SparseLayer(sizes[l], sizes[l + 1], *(arrays[f"{prefix}layer{l}.{n}"]
                                                        for n in ("indptr", "indices", "values", "bias")))
                  for l in range(len(sizes) - 1)]
        for l, layer in enumerate(layers):
            check_layer(layer, f"layer{l}")
        shift, scale = arrays[prefix + "scaling.shift"], arrays[prefix + "scaling.scale"]
        if shift.shape != (sizes[0],) or scale.shape != (sizes[0],) or len(classes) != sizes[-1]:
            raise ValueError("scaling or class list does not match the layer sizes")
        return cls(layers, shift.astype(np.float32), scale.astype(np.float32), classes, config or {}, metrics or {})


def _as_2d_features(X, n_features: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim == 1:
        X = X.reshape(1, -1)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ValueError(f"X has shape {X.shape}; the model expects {n_features} features per sample")
    if X.dtype.kind not in "uif":
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    if X.dtype.kind == "f" and X.dtype != np.float32:
        X = X.astype(np.float32)
    return np.ascontiguousarray(X)


def _jsonable(c):
    return c.item() if isinstance(c, np.generic) else c
