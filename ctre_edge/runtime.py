"""Inference from an exported .onnx file with onnxruntime alone.

This module imports numpy, onnxruntime and ``ctre_edge.errors`` only (never numba, onnx or the
trainer), so a device that only predicts needs just ``numpy`` and ``onnxruntime``. The file is the
one ``ctre_edge.export.export_onnx`` writes: input ``X`` of raw features, outputs ``probabilities``
and ``label``, and the class labels in its metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import ConfigError, DataError, ModelFileError

FORMAT = "ctre-edge-onnx"
FORMAT_VERSION = 1


class OnnxModel:
    """An exported ctre-edge model loaded in onnxruntime (CPU).

    Parameters
    ----------
    path : str or os.PathLike
        The .onnx file.
    threads : int or None, default=None
        onnxruntime intra-op threads; None lets onnxruntime choose (one per core).
    batch_size : int, default=256
        Rows per onnxruntime call; intermediate memory of the sparse kernels grows with it.

    Attributes
    ----------
    n_features : int
    classes : list
        Class labels (ints or strings) in output order.
    metadata : dict of str
        The file's metadata (format, ctre_edge_version, method, epsilon, kernels, ...).
    path : pathlib.Path
    """

    def __init__(self, path, threads: int | None = None, batch_size: int = 256):
        path = Path(path)
        for name, value in (("threads", threads), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an int >= 1; got {value!r}")
        if not path.is_file():
            raise ModelFileError(f"ONNX model {path} not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: warnings would go to the user's terminal
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors subclass Exception directly (InvalidProtobuf, Fail, ...)
            raise ModelFileError(f"{path} is not a loadable ONNX model ({_first_line(e)}); "
                                 f"re-export it with ctre-edge export") from None
        self.metadata = dict(self._session.get_modelmeta().custom_metadata_map)
        self.path, self.batch_size = path, batch_size
        self.n_features, self.classes = self._check_interface()
        self.nan_policy, self.nan_fill = self._recorded_imputation()

    def _check_interface(self) -> tuple[int, list]:
        meta = self.metadata
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if meta.get("format") != FORMAT or "X" not in inputs or not {"probabilities", "label"} <= outputs:
            raise ModelFileError(f"{self.path} is an ONNX model but not a ctre-edge export; "
                                 f"export the model with ctre-edge export")
        try:
            version = int(meta["format_version"])
            n_features = int(meta["n_features"])
            classes = json.loads(meta["classes"])
        except (KeyError, ValueError) as e:
            raise ModelFileError(f"{self.path} has damaged ctre-edge metadata ({e}); re-export it") from None
        if version > FORMAT_VERSION:
            raise ModelFileError(f"{self.path} uses ctre-edge ONNX format {version}, newer than this ctre-edge reads "
                                 f"({FORMAT_VERSION}); upgrade ctre-edge")
        if inputs["X"].shape[-1] != n_features or not isinstance(classes, list):
            raise ModelFileError(f"{self.path} has metadata that does not match its graph; re-export it")
        return n_features, classes

    def _recorded_imputation(self) -> tuple[str, np.ndarray | None]:
        """The training --nan-policy and its per-feature fill values, kept in the metadata by export."""
        if "nan_fill" not in self.metadata:
            return "error", None
        try:
            fill = np.asarray(json.loads(self.metadata["nan_fill"]), dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise ModelFileError(f"{self.path} has damaged NaN fill values ({e}); re-export it") from None
        policy = self.metadata.get("nan_policy")
        if fill.shape != (self.n_features,) or policy not in ("zero", "mean", "median"):
            raise ModelFileError(f"{self.path} has NaN fill values that do not match its features; re-export it")
        return policy, fill

    def predict_proba(self, X, nan_policy: str = "error", source: str = "X") -> np.ndarray:
        """Class probabilities, float32 of shape (n_samples, n_classes).

        NaN/Inf in X are refused (DataError naming the first row and column) unless ``nan_policy`` is
        "zero", or the "mean"/"median" the model was trained with: then they are replaced, here and
        not in the graph, by the training file's fill values that the export recorded. ``source``
        names X in the message.
        """
        return self._run("probabilities", X, nan_policy, source)

    def predict(self, X, nan_policy: str = "error", source: str = "X") -> np.ndarray:
        """Predicted class labels (int64 or str array), the graph's ArgMax over the probabilities."""
        labels = self._run("label", X, nan_policy, source)
        return np.asarray(labels.tolist()) if labels.dtype == object else labels

    def _run(self, output: str, X, nan_policy: str = "error", source: str = "X") -> np.ndarray:
        from .io.common import apply_nan_policy  # numpy only, like the rest of this module

        X = apply_nan_policy(self._as_features(X), nan_policy, self.nan_policy, self.nan_fill, str(self.path), source)
        parts = [self._session.run([output], {"X": X[start:start + self.batch_size]})[0]
                 for start in range(0, X.shape[0], self.batch_size)]
        if not parts:  # zero rows: one call gives the right dtype and trailing shape
            return self._session.run([output], {"X": X})[0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _as_features(self, X) -> np.ndarray:
        """X as C-contiguous float32 (n_samples, n_features); a 1-d X is one sample."""
        X = np.asarray(X)
        if X.dtype.kind not in "uif":
            raise DataError(f"X must be numeric (ints or floats), got dtype {X.dtype}; convert it before predicting")
        if X.ndim == 1:
            X = X.reshape(1, -1)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            given = X.shape[1] if X.ndim == 2 else f"shape {X.shape}"
            raise DataError(f"the model expects {self.n_features} features per sample, got {given}; "
                            f"pass X with {self.n_features} columns")
        # Same rounding as the trainer: one float32(x) per value, then the graph's scaling.
        return np.ascontiguousarray(X, dtype=np.float32)


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_features(path) -> np.ndarray:
    """Feature rows for prediction from ``.npz`` (array ``X``), ``.npy`` or a numeric ``.csv``.

    A CSV may start with one header row; every other field must be a number. Labels are not
    expected (a CSV column of labels would be counted as a feature and fail the shape check).
    """
    from .io.common import is_float  # the data layer's number test; predict needs nothing else of it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "X" not in z.files:
                    raise DataError(f"{path}: no array X in the archive; store the features as X")
                return z["X"]
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".csv", ".tsv", ".txt"):
            delimiter = "\t" if suffix == ".tsv" else ","
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            fields = first.strip().split(delimiter)
            header = any(not is_float(v) for v in fields)
            X = np.loadtxt(path, delimiter=delimiter, skiprows=1 if header else 0, dtype=np.float32, ndmin=2)
            if X.size == 0:
                raise DataError(f"{path}: no data rows")
            return X
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or odd file fails in many ways
        raise DataError(f"{path}: cannot read features ({_first_line(e)})") from None
    raise DataError(f"{path}: unsupported format {suffix or '(no extension)'!r}; use .npz (X), .npy or .csv")
