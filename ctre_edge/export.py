"""ONNX export of a trained SparseMLP, layer by layer, with a per-layer choice of kernel.

The graph mirrors ``SparseMLP.predict_proba``: input ``X`` (float32, [N, n_features], RAW features),
scaling ``(X - shift) * scale``, then hidden layers ``relu(x @ W + b)`` and a linear last layer
followed by softmax. Outputs are ``probabilities`` (float32, [N, n_classes]) and ``label`` (the
ArgMax index gathered from the class labels: int64 for integer labels, string otherwise). The batch
dimension ``N`` is dynamic. ``sparse-ops`` layers work feature-major, on ``[features, N]``, so that
gathering an input neuron copies one contiguous row of N values (the layout of ``kernels.py``);
``dense`` and ``sparse-initializer`` layers work batch-major, ``x @ W`` with ``W`` as MatMul's
second operand, which onnxruntime prepacks (3x faster at batch 1 than ``W.T @ x``). A Transpose is
inserted only where consecutive layers use different layouts.

Kernels (per layer)
-------------------
``sparse-ops``
    Standard ops whose memory and time scale with nnz. Outputs are grouped by fan-in; a group of
    ``n`` outputs padded to fan-in ``K`` stores its input indices and weights as ``[K, n]`` arrays:
    ``Gather`` of the input rows -> ``[K, n, N]``, ``Mul`` by the weights, sum over the K slots as
    ``ones[1, K] @ reshape(., [K, n*N])``, then the groups are concatenated and put back in output
    order with one ``Gather``. Fan-in widths grow by 25% (1, 2, 3, 4, 5, 7, 9, 12, ...), so padding
    adds at most 25% (padded slots read input 0 with weight 0). Every op writes disjoint outputs,
    so the result does not depend on the number of intra-op threads. ScatterND(reduction="add")
    is not used: onnxruntime sums wrongly with more than one thread when indices repeat.
    Chosen by measurement (onnxruntime 1.32, one thread, 2-vCPU Zen 4, median microseconds for
    batch 1 / batch 64; whole networks: ``tools/bench_infer.py``):

    ==========================================  ============  ============  ===============
    one layer, Erdos-Renyi                      1000^2, 0.2%  1000^2, 1%    10000^2, 0.1%
    ==========================================  ============  ============  ===============
    Gather, Mul, ScatterElements(add)           15 / 620      55 / 3248     520 / 57996
    padded to max fan-in, Mul, ReduceSum        94 / 217      151 / 462     1770 / 10297
    fan-in groups, Mul, ReduceSum(axis 0)       22 / 176      51 / 469      387 / 7189
    fan-in groups, Mul, MatMul(ones) (chosen)   22 / 84       51 / 258      379 / 4854
    dense MatMul                                43 / 516      48 / 523      12732 / 73033
    ==========================================  ============  ============  ===============
``dense``
    A dense ``[n_in, n_out]`` initializer under MatMul; fastest when the layer is small or dense.
``sparse-initializer``
    The weights as a ``GraphProto.sparse_initializer`` (int64 linear indices, ascending) under
    MatMul: the smallest file, but onnxruntime densifies sparse initializers when the session is
    created, so in RAM it costs as much as ``dense``. ``onnx.checker`` full check (shape
    inference) rejects MatMul fed by a sparse initializer, so only the plain check is run.
``auto``
    Per layer: ``dense`` when its dense form is tiny (<= 256 KiB), or when density >= 1% and the
    dense form is <= 16 MiB (measured crossover: at 1% density a 1000 x 1000 layer is about as
    fast either way); otherwise ``sparse-ops``. ``budget_bytes`` caps the total bytes of dense
    forms (``dense`` and ``sparse-initializer``) over the whole model, for every kernel choice.

Versions
--------
The file pins ONNX opset 13 and IR version 7 (the minimum IR for opset 13): every op used exists
unchanged since opset 13, so onnxruntime 1.8 or newer loads it (per onnxruntime's compatibility
table; tested with 1.32). Tensor and node names are fixed and descriptive and nothing depends on
time or randomness, so the same model gives the same bytes.

References
----------
skl2onnx ``operator_converters/multilayer_perceptron.py`` (the same walk over a forward pass).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__
from .config import KERNELS
from .errors import BudgetError, ConfigError, ModelFileError
from .fileio import atomic_write, refuse_overwrite
from .layers import check_layer

OPSET = 13
FORMAT = "ctre-edge-onnx"
FORMAT_VERSION = 1
AUTO_TINY_BYTES = 256 * 1024
AUTO_DENSE_MIN_DENSITY = 0.01
AUTO_DENSE_MAX_BYTES = 16 * 1024 * 1024
FANIN_GROWTH = 1.25
TOLERANCE = 1e-5
_CHECK_BATCH = 256
_PROTOBUF_LIMIT = 2**31 - 2**26  # a ModelProto must serialize to < 2 GiB; keep a margin for the rest


def choose_kernels(model, kernel: str = "auto", budget_bytes: int | None = None) -> list[str]:
    """The kernel of each layer, following the rules in the module docstring.

    Raises BudgetError when an explicit dense form (``dense`` or ``sparse-initializer``) would
    exceed ``budget_bytes`` in total, ConfigError for an unknown kernel or a bad budget.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer))
                                     or budget_bytes < 0):
        raise ConfigError(f"budget_bytes must be a non-negative int or None; got {budget_bytes!r}")
    chosen, used = [], 0
    for l, layer in enumerate(model.layers):
        dense_bytes = 4 * layer.n_in * layer.n_out
        fits = budget_bytes is None or used + dense_bytes <= budget_bytes
        if kernel == "auto":
            worth = dense_bytes <= AUTO_TINY_BYTES or (
                layer.density >= AUTO_DENSE_MIN_DENSITY and dense_bytes <= AUTO_DENSE_MAX_BYTES)
            k = "dense" if worth and fits else "sparse-ops"
        elif kernel != "sparse-ops" and not fits:
            raise BudgetError(f"layer{l} ({layer.n_in}x{layer.n_out}) as {kernel} takes {dense_bytes} bytes of RAM "
                              f"({used + dense_bytes} with the layers before it), over budget_bytes={budget_bytes}; "
                              f"use kernel 'auto' or 'sparse-ops'")
        else:
            k = kernel
        used += dense_bytes if k != "sparse-ops" else 0
        chosen.append(k)
    return chosen


def build_onnx(model, kernel: str = "auto", budget_bytes: int | None = None, *, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX graph of ``model`` (not checked against the trainer; ``export_onnx`` does that).

    Parameters
    ----------
    model : SparseMLP
    kernel : {"auto", "sparse-ops", "dense", "sparse-initializer"}, default="auto"
    budget_bytes : int or None, default=None
        Cap on the total RAM of dense forms; see the module docstring.
    opset : int, default=13
        ONNX opset to declare (13 or newer); the IR version is the minimum that opset needs.

    Returns
    -------
    onnx.ModelProto
    """
    _check_model(model)
    max_opset = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET <= opset <= max_opset:
        raise ConfigError(f"opset must be an int in [{OPSET}, {max_opset}]; got {opset!r}")
    kernels = choose_kernels(model, kernel, budget_bytes)
    _check_size(model, kernels)

    g = _Graph()
    h = g.node("Sub", ["X", g.const("scaling.shift", model.shift)], "x.centered")
    h = g.node("Mul", [h, g.const("scaling.scale", model.scale)], "h0")
    build = {"dense": _dense_layer, "sparse-initializer": _sparse_initializer_layer, "sparse-ops": _sparse_ops_layer}
    feature_major, last = False, len(model.layers) - 1
    for l, (layer, k) in enumerate(zip(model.layers, kernels)):
        if (k == "sparse-ops") != feature_major:
            feature_major = not feature_major
            h = g.node("Transpose", [h], f"h{l}.{'feature' if feature_major else 'batch'}_major", perm=[1, 0])
        bias = layer.bias[:, None] if feature_major else layer.bias
        z = g.node("Add", [build[k](g, l, layer, h), g.const(f"layer{l}.bias", bias)], f"layer{l}.out")
        h = g.node("Relu", [z], f"h{l + 1}") if l < last else z
    if feature_major:
        h = g.node("Transpose", [h], "logits", perm=[1, 0])
    g.node("Softmax", [h], "probabilities", axis=1)
    index = g.node("ArgMax", ["probabilities"], "label.index", axis=1, keepdims=0)
    classes = [_plain(c) for c in model.classes]
    is_str = isinstance(classes[0], str)
    label_type = TensorProto.STRING if is_str else TensorProto.INT64
    g.initializers.append(helper.make_tensor("classes", label_type, [len(classes)],
                                             [c.encode() for c in classes] if is_str else classes))
    g.node("Gather", ["classes", index], "label", axis=0)

    graph = helper.make_graph(
        g.nodes, "ctre_edge_sparse_mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", model.n_features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", len(classes)]),
         helper.make_tensor_value_info("label", label_type, ["N"])],
        g.initializers, sparse_initializer=g.sparse)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="ctre-edge",
                              producer_version=_version(), doc_string="Sparse MLP exported by ctre-edge")
    proto.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(proto, _metadata(model, kernels, opset))
    return proto


def export_onnx(model, path, *, kernel: str = "auto", budget_bytes: int | None = None, force: bool = False,
                opset: int = OPSET, check_samples: int = 256) -> dict:
    """Build, check and atomically write the ONNX file of ``model``; return a report.

    Before anything is written the model passes ``onnx.checker.check_model`` (``full_check=True``
    unless a sparse initializer is present) and onnxruntime's probabilities on ``check_samples``
    deterministic inputs (``check_inputs``) agree with ``model.predict_proba`` within 1e-5.

    Returns
    -------
    dict
        ``path``, ``file_bytes``, ``kernels`` (per layer), ``layers`` (shape, nnz, density, kernel,
        dense_bytes per layer), ``max_abs_diff``, ``check_samples``, ``opset``, ``ir_version``.

    Raises
    ------
    OutputExistsError, OutputWriteError, ConfigError, BudgetError, ModelFileError
    """
    path = Path(path)
    refuse_overwrite(path, force)  # fail before the expensive part; atomic_write checks again
    if isinstance(check_samples, bool) or not isinstance(check_samples, int) or check_samples < 1:
        raise ConfigError(f"check_samples must be an int >= 1; got {check_samples!r}")
    proto = build_onnx(model, kernel, budget_bytes, opset=opset)
    kernels = json.loads(_meta_dict(proto)["kernels"])
    try:
        onnx.checker.check_model(proto, full_check="sparse-initializer" not in kernels)
    except onnx.checker.ValidationError as e:
        raise ModelFileError(f"the exported graph fails the ONNX checker ({_first_line(e)}); nothing was "
                             f"written; please report this as a ctre-edge bug") from None
    data = proto.SerializeToString()
    diff = max_abs_diff(model, data, check_inputs(model, check_samples))
    if not diff <= TOLERANCE:  # also catches NaN
        raise ModelFileError(f"onnxruntime disagrees with the trainer by {diff:.2e} (> {TOLERANCE:g}) with kernel "
                             f"{kernel!r}; nothing was written; try another --kernel and report this as a bug")
    atomic_write(path, lambda f: f.write(data), force=force)
    return {
        "path": str(path), "file_bytes": len(data), "kernels": kernels,
        "layers": [{"layer": l, "n_in": layer.n_in, "n_out": layer.n_out, "nnz": layer.nnz,
                    "density": layer.density, "kernel": k, "dense_bytes": 4 * layer.n_in * layer.n_out}
                   for l, (layer, k) in enumerate(zip(model.layers, kernels))],
        "max_abs_diff": diff, "check_samples": check_samples, "opset": opset, "ir_version": proto.ir_version,
    }


def check_inputs(model, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic raw inputs whose scaled form is standard normal: ``shift + z / scale``."""
    z = np.random.default_rng(seed).standard_normal((n, model.n_features))
    scale = np.where(model.scale != 0, model.scale, 1).astype(np.float64)
    return (model.shift.astype(np.float64) + z / scale).astype(np.float32)


def max_abs_diff(model, onnx_bytes: bytes, X: np.ndarray) -> float:
    """Largest |onnxruntime - model.predict_proba| over X, run in batches to bound memory."""
    import onnxruntime as ort  # only for the check before writing; building the graph needs onnx alone

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: warnings would go to the user's terminal
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    want = model.predict_proba(X)
    diff = 0.0
    for start in range(0, X.shape[0], _CHECK_BATCH):
        got = session.run(["probabilities"], {"X": X[start:start + _CHECK_BATCH]})[0]
        diff = max(diff, float(np.max(np.abs(got - want[start:start + _CHECK_BATCH]))))
    return diff


# -- one layer each, without bias: batch-major x [N, n_in] -> [N, n_out] ------------------------------

def _dense_layer(g, l, layer, x):
    w = np.zeros((layer.n_in, layer.n_out), dtype=np.float32)
    w[layer.rows(), layer.indices] = layer.values
    return g.node("MatMul", [x, g.const(f"layer{l}.values", w)], f"layer{l}.matmul")


def _sparse_initializer_layer(g, l, layer, x):
    # CSR order is row-major order of [n_in, n_out], so the linear indices are already ascending.
    linear = layer.rows() * layer.n_out + layer.indices
    g.sparse.append(helper.make_sparse_tensor(numpy_helper.from_array(layer.values, f"layer{l}.values"),
                                              numpy_helper.from_array(linear, f"layer{l}.indices"),
                                              [layer.n_in, layer.n_out]))
    return g.node("MatMul", [x, f"layer{l}.values"], f"layer{l}.matmul")


# -- feature-major x [n_in, N] -> [n_out, N] --------------------------------------------------------

def _sparse_ops_layer(g, l, layer, x):
    parts, order = [], []
    for outputs, inputs, values in fanin_groups(layer):
        k, n = inputs.shape
        p = f"layer{l}.fanin{k}"
        prod = g.node("Mul", [g.node("Gather", [x, g.const(p + ".inputs", inputs)], p + ".gathered", axis=0),
                              g.const(p + ".values", values[:, :, None])], p + ".products")  # [k, n, N]
        if k > 1:  # ones @ [k, n*N] sums the slots: 1.5-2x faster than ReduceSum at batch 64
            flat = g.node("Reshape", [prod, g.const(f"shape.{k}.rest", np.array([k, -1], dtype=np.int64))], p + ".flat")
            prod = g.node("MatMul", [g.const(f"ones.{k}", np.ones((1, k), dtype=np.float32)), flat], p + ".sum")
        parts.append(g.node("Reshape", [prod, g.const(p + ".shape", np.array([n, -1], dtype=np.int64))], p + ".out"))
        order.append(outputs)
    y = parts[0] if len(parts) == 1 else g.node("Concat", parts, f"layer{l}.groups", axis=0)
    perm = np.concatenate(order)
    if np.any(perm != np.arange(layer.n_out)):
        inverse = np.argsort(perm).astype(np.int32)
        y = g.node("Gather", [y, g.const(f"layer{l}.order", inverse)], f"layer{l}.matmul", axis=0)
    return y


def fanin_widths(max_fanin: int) -> np.ndarray:
    """Padded fan-in widths 1, 2, 3, 4, 5, 7, 9, 12, ...: each ceil(1.25 x) the last, at least +1."""
    widths = [1]
    while widths[-1] < max_fanin:
        widths.append(max(widths[-1] + 1, int(np.ceil(widths[-1] * FANIN_GROWTH))))
    return np.array(widths, dtype=np.int64)


def fanin_groups(layer) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Outputs grouped by padded fan-in: ``(outputs, inputs int32 [K, n], values float32 [K, n])``.

    Column ``t`` of a group holds output ``outputs[t]``'s connections, inputs ascending, then
    zero-weight padding that reads input 0. Memory is O(nnz + n_out) per group, never n_in x n_out.
    """
    cols = layer.indices.astype(np.int64)
    order = np.argsort(cols, kind="stable")  # CSC order: by output, inputs stay ascending
    rows, cols, vals = layer.rows()[order], cols[order], layer.values[order]
    fan = np.bincount(cols, minlength=layer.n_out)
    slot = np.arange(cols.shape[0]) - (np.cumsum(fan) - fan)[cols]
    widths = fanin_widths(int(fan.max(initial=0)))
    width = widths[np.searchsorted(widths, np.maximum(fan, 1))]
    groups = []
    for k in np.unique(width):
        outputs = np.flatnonzero(width == k)
        column = np.zeros(layer.n_out, dtype=np.int64)
        column[outputs] = np.arange(outputs.shape[0])
        sel = width[cols] == k
        inputs = np.zeros((k, outputs.shape[0]), dtype=np.int32)
        values = np.zeros((k, outputs.shape[0]), dtype=np.float32)
        inputs[slot[sel], column[cols[sel]]] = rows[sel]
        values[slot[sel], column[cols[sel]]] = vals[sel]
        groups.append((outputs, inputs, values))
    return groups


class _Graph:
    """Nodes and initializers in creation order; each node is named after its one output."""

    def __init__(self):
        self.nodes, self.initializers, self.sparse, self._consts = [], [], [], set()

    def node(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def const(self, name, array):
        if name not in self._consts:  # shared constants (ones.K, shape.K.rest) are stored once
            self._consts.add(name)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def _check_model(model) -> None:
    try:
        for l, layer in enumerate(model.layers):
            check_layer(layer, f"layer{l}")
            if l and layer.n_in != model.layers[l - 1].n_out:
                raise ValueError(f"layer{l} has {layer.n_in} inputs but layer{l - 1} has "
                                 f"{model.layers[l - 1].n_out} outputs")
        for name in ("shift", "scale"):
            arr = getattr(model, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.shape != (model.n_features,):
                raise ValueError(f"{name} must be float32 of shape ({model.n_features},)")
        classes = [_plain(c) for c in model.classes]
        if len(classes) != model.layers[-1].n_out:
            raise ValueError(f"{len(classes)} class labels for {model.layers[-1].n_out} outputs")
        if not (all(isinstance(c, str) for c in classes) or all(type(c) is int for c in classes)):
            raise ValueError("class labels must be all ints or all strings")
    except (ValueError, IndexError) as e:
        raise ModelFileError(f"cannot export this model: {e}") from None


def _check_size(model, kernels) -> None:
    per_layer = {"dense": lambda L: 4 * L.n_in * L.n_out, "sparse-initializer": lambda L: 12 * L.nnz,
                 "sparse-ops": lambda L: int(8 * FANIN_GROWTH * L.nnz) + 12 * L.n_out}
    total = sum(per_layer[k](layer) for layer, k in zip(model.layers, kernels))
    if total > _PROTOBUF_LIMIT:
        raise ConfigError(f"the ONNX file would be about {total / 2**30:.1f} GiB, over protobuf's 2 GiB limit; "
                          f"use kernel 'auto' or 'sparse-ops'")


def _metadata(model, kernels, opset) -> dict:
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "ctre_edge_version": _version(),
            "classes": json.dumps([_plain(c) for c in model.classes]), "n_features": str(model.n_features),
            "sizes": json.dumps(model.sizes), "density": f"{model.density:.6g}", "kernels": json.dumps(kernels),
            "opset": str(opset)}
    for key, source in (("method", model.config), ("epsilon", model.config), ("test_accuracy", model.metrics)):
        if source.get(key) is not None:
            meta[key] = str(_plain(source[key]))
    if getattr(model, "nan_fill", None) is not None:  # runtime.py imputes NaN/Inf with these, as the trainer did
        meta["nan_policy"] = model.nan_policy
        meta["nan_fill"] = json.dumps([float(v) for v in np.asarray(model.nan_fill, np.float32)])
    return meta


def _meta_dict(proto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _version() -> str:
    return __version__


def _first_line(e) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
