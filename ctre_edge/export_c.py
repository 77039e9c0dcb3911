"""C99 export of a trained SparseMLP for microcontrollers: ``NAME.h`` and ``NAME.c``, nothing else.

The pair is self-contained and dependency-free: ``<stdint.h>`` and ``expf`` from ``<math.h>`` are
all it uses. The model is ``const`` data (the linker puts it in flash, read in place), the
activations live in a static, statically sized workspace (no malloc, no recursion, no variable
length arrays), and there is one public function::

    int NAME_predict(const float *x, float *probabilities);

It takes the RAW features (the input scaling ``(x - shift) * scale`` is inside), writes the class
probabilities when ``probabilities`` is not NULL, and returns the index of the most probable
class into ``NAME_class_names``. It is not reentrant (one static workspace).

Layout
------
Each layer is CSR over its inputs, as in ``layers.py``: the connections of input ``i`` are
``row_start[i] .. row_start[i + 1] - 1``, with output neuron ``output[k]`` and weight
``weight[k]``. Each index array has the smallest unsigned type that holds its largest value
(``uint8_t``, ``uint16_t`` or ``uint32_t``: ``output`` holds values below n_out, ``row_start``
values up to nnz). A layer starts from its bias and adds ``weight[k] * x[i]`` input by input,
the order of ``kernels.sparse_forward``; inputs that are exactly 0 (ReLU zeros, zero pixels) are
skipped. Hidden layers apply ReLU; the last layer's logits go through softmax with the maximum
subtracted first, ``expf`` and a float32 sum, and the label is the first maximum of the
probabilities, as the ONNX graph's ArgMax.

int8 (``quantize="int8"``)
--------------------------
Weights: symmetric int8 with one float32 scale per OUTPUT neuron, ``w = scale_j * q``,
``scale_j = max |w_ij| / 127`` over the neuron's own connections. Per neuron rather than per
layer because sparse fan-ins differ widely: under one layer-wide scale a single large weight
rounds the small weights of every other neuron to zero. It costs 4 bytes per neuron, as much as
its bias. Activations (the scaled input and each hidden layer's ReLU output) are quantized
per sample, symmetric int8 with ``s = max |h| / 127`` computed at run time (dynamic range, so no
calibration data is needed and inputs outside the training range still use all 255 levels).
Products accumulate in int32 (the exporter refuses a layer whose fan-in could overflow it), and
``h_j = float(acc_j) * (s * scale_j) + bias_j`` in float32. Biases, the input scaling and the
softmax stay float32. ``predict_int8`` is the numpy twin of this arithmetic.

Memory
------
``mcu_plan.plan_c`` plans flash and RAM of what this module writes, before it is written.

References
----------
Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018 (symmetric int8 with int32 accumulation; per-channel weight scales).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .config import EXPORT_FORMATS, QUANTIZATIONS
from .errors import ConfigError, ModelFileError, OutputExistsError
from .fileio import atomic_write
from .int8 import _check_int8_fanin, predict_int8, quantize_layer  # noqa: F401 - predict_int8 is part of this API
from .mcu_plan import STACK_BYTES, _check_quantize, _kernel_types, plan_c, refuse_unless_fits

QUANTIZE = QUANTIZATIONS  # the tables live in config.py, so the CLI's choices come from them too
FORMATS = EXPORT_FORMATS


# -- C source -------------------------------------------------------------------------------------

def c_name(path) -> str:
    """A C identifier from the output file's stem: other characters become '_', a leading digit gets 'm_'."""
    name = re.sub(r"[^0-9A-Za-z_]", "_", Path(path).stem) or "model"
    return "m_" + name if name[0].isdigit() else name


def c_paths(out) -> tuple[Path, Path]:
    """(NAME.h, NAME.c) for OUT given as NAME.c, NAME.h or NAME."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".c", ".h") else out
    return base.with_name(base.name + ".h"), base.with_name(base.name + ".c")


def _c_float(v) -> str:
    text = format(float(v), ".9g")  # 9 significant digits round-trip every float32
    if not any(ch in text for ch in ".en"):
        text += ".0"
    return text + "f"


def _c_string(s: str) -> str:
    """A C string literal: printable ASCII as is, everything else as 3-digit octal escapes of UTF-8."""
    out = []
    for b in s.encode("utf-8"):
        ch = chr(b)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= b < 127 and ch != "?" else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _comment_text(s: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in s).replace("*/", "* /")


def _array(ctype: str, name: str, values, per_line: int, fmt=str, comment: str = "") -> str:
    items = [fmt(v) for v in values] or ["0"]  # C has no empty arrays; a layer without connections
    lines = [",".join(f" {x}" for x in items[i:i + per_line]) for i in range(0, len(items), per_line)]
    head = (f"/* {comment} */\n" if comment else "") + f"static const {ctype} {name}[{len(items)}] = {{\n"
    return head + ",\n".join("   " + line for line in lines) + "\n};\n"


_FLOAT_KERNEL = """\
/* y = bias + x @ W for one layer in CSR over inputs ({ptr} row starts, {idx} outputs). */
static void layer_{tag}(const {ptr} *row_start, const {idx} *output, const float *weight,
                        const float *bias, int n_in, int n_out, const float *x, float *y)
{{
    int i, j;
    for (j = 0; j < n_out; j++) {{
        y[j] = bias[j];
    }}
    for (i = 0; i < n_in; i++) {{
        const float xi = x[i];
        uint32_t k;
        const uint32_t end = row_start[i + 1];
        if (xi == 0.0f) {{
            continue; /* ReLU zeros and zero pixels add nothing */
        }}
        for (k = row_start[i]; k < end; k++) {{
            y[output[k]] += weight[k] * xi;
        }}
    }}
}}
"""

_INT8_KERNEL = """\
/* acc = x @ W in int32 for one layer in CSR over inputs ({ptr} row starts, {idx} outputs). */
static void layer_{tag}(const {ptr} *row_start, const {idx} *output, const int8_t *weight,
                        int n_in, int n_out, const int8_t *x, int32_t *acc)
{{
    int i, j;
    for (j = 0; j < n_out; j++) {{
        acc[j] = 0;
    }}
    for (i = 0; i < n_in; i++) {{
        const int32_t xi = x[i];
        uint32_t k;
        const uint32_t end = row_start[i + 1];
        if (xi == 0) {{
            continue;
        }}
        for (k = row_start[i]; k < end; k++) {{
            acc[output[k]] += (int32_t)weight[k] * xi;
        }}
    }}
}}
"""

_RELU = """\
static void relu(float *h, int n)
{
    int j;
    for (j = 0; j < n; j++) {
        if (h[j] < 0.0f) {
            h[j] = 0.0f;
        }
    }
}
"""

_SOFTMAX = """\
/* Softmax of the logits z in place (maximum subtracted first); returns the first most probable class. */
static int softmax(float *z, int n, float *probabilities)
{
    int k, best = 0;
    float max = z[0], sum = 0.0f;
    for (k = 1; k < n; k++) {
        if (z[k] > max) {
            max = z[k];
        }
    }
    for (k = 0; k < n; k++) {
        z[k] = expf(z[k] - max);
        sum += z[k];
    }
    for (k = 0; k < n; k++) {
        z[k] /= sum;
        if (z[k] > z[best]) {
            best = k;
        }
        if (probabilities != NULL) {
            probabilities[k] = z[k];
        }
    }
    return best;
}
"""

_QUANTIZE = """\
/* Symmetric int8 of one activation vector: q = round(h / s) with s = max |h| / 127; returns s. */
static float quantize(const float *h, int n, int8_t *q)
{
    int j;
    float max = 0.0f, inverse;
    for (j = 0; j < n; j++) {
        const float a = h[j] < 0.0f ? -h[j] : h[j];
        if (a > max) {
            max = a;
        }
    }
    if (max == 0.0f) {
        for (j = 0; j < n; j++) {
            q[j] = 0;
        }
        return 0.0f;
    }
    inverse = 127.0f / max;
    for (j = 0; j < n; j++) {
        const float v = h[j] * inverse;
        int32_t r = v < 0.0f ? (int32_t)(v - 0.5f) : (int32_t)(v + 0.5f);
        r = r > 127 ? 127 : (r < -127 ? -127 : r);
        q[j] = (int8_t)r;
    }
    return max / 127.0f;
}

/* h = acc * (input scale * weight scale) + bias */
static void dequantize(const int32_t *acc, float input_scale, const float *weight_scale,
                       const float *bias, int n, float *h)
{
    int j;
    for (j = 0; j < n; j++) {
        h[j] = (float)acc[j] * (input_scale * weight_scale[j]) + bias[j];
    }
}
"""


def generate_c(model, name: str, quantize: str = "none") -> tuple[str, str]:
    """The text of ``NAME.h`` and ``NAME.c`` for ``model`` (validated; see the module docstring).

    Longer than most functions: it writes ``NAME.c`` top to bottom in the order the file reads
    (comment, input scaling, each layer's arrays, workspace, kernels, ``NAME_predict``); the header
    and the predict function are their own functions.
    """
    from .export import _check_model, _plain, _version  # export loads onnx: only C generation needs these

    _check_quantize(quantize)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise ConfigError(f"name must be a C identifier (letters, digits, '_'); got {name!r}")
    _check_model(model)
    for arr_name, arr in model.arrays().items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelFileError(f"cannot export this model: {arr_name} holds NaN or Inf values")
    if quantize == "int8":
        _check_int8_fanin(model)
    sizes = model.sizes
    classes = [str(_plain(c)) for c in model.classes]
    upper = name.upper()
    plan = plan_c(sizes, model.nnz, quantize, classes)
    acc = model.metrics.get("test_accuracy")
    cfg = model.config
    summary = [
        f"{name}: a sparse MLP exported by ctre-edge {_version()} as C99 (no heap, no recursion).",
        f"network {'-'.join(map(str, sizes))}, method {cfg.get('method', '?')}, epsilon {cfg.get('epsilon', '?')}, "
        f"{sum(model.nnz):,} connections (density {model.density:.4%})",
        f"test accuracy {acc:.4f} (float32, at training)" if isinstance(acc, (int, float)) else "test accuracy unknown",
        f"{sizes[0]} features (raw, scaled inside), {len(classes)} classes: "
        + _comment_text(", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")),
        "weights: " + ("float32" if quantize == "none" else
                       "int8 with a float32 scale per output neuron, int8 activations, int32 accumulation"),
        f"estimated Cortex-M size: {plan.flash_total:,} bytes of flash ({plan.flash['code']:,} of them code), "
        f"{plan.ram['workspace']:,} bytes of static RAM + about {STACK_BYTES} bytes of stack",
    ]
    comment = "/*\n" + "".join(f" * {line}\n" for line in summary) + " */\n"

    header = comment + _c_header(name, sizes, classes)
    src = [comment, f'#include "{name}.h"\n\n#include <math.h> /* expf, in the softmax only */\n'
                    "#include <stddef.h>\n#include <stdint.h>\n\n",
           f"#define MAX_WIDTH {max(sizes)}\n\n"]
    src.append(_array("float", "input_shift", model.shift, 6, _c_float, "x' = (x - shift) * scale"))
    src.append(_array("float", "input_scale", model.scale, 6, _c_float))
    kernels = {}
    for l, layer in enumerate(model.layers):
        ptr, idx = _kernel_types(layer.n_in, layer.n_out, layer.nnz)
        kernels.setdefault((ptr, idx), f"{'i8' if quantize == 'int8' else 'f32'}_{ptr[:-2].replace('int', '')}_"
                                        f"{idx[:-2].replace('int', '')}")
        src.append(f"\n/* layer {l}: {layer.n_in} -> {layer.n_out}, {layer.nnz:,} connections; "
                   f"the connections of input i are row_start[i] .. row_start[i + 1] - 1 */\n")
        src.append(_array(ptr, f"layer{l}_row_start", layer.indptr, 12))
        src.append(_array(idx, f"layer{l}_output", layer.indices, 12))
        if quantize == "int8":
            q, scale = quantize_layer(layer)
            src.append(_array("int8_t", f"layer{l}_weight", q, 16))
            src.append(_array("float", f"layer{l}_weight_scale", scale, 6, _c_float))
        else:
            src.append(_array("float", f"layer{l}_weight", layer.values, 6, _c_float))
        src.append(_array("float", f"layer{l}_bias", layer.bias, 6, _c_float))
    src.append(f"\nconst char *const {name}_class_names[{upper}_N_CLASSES] = {{\n"
               + ",\n".join(f"    {_c_string(c)}" for c in classes) + "\n};\n\n")
    if quantize == "int8":
        src.append("static float activation[MAX_WIDTH];\nstatic int32_t accumulator[MAX_WIDTH];\n"
                   "static int8_t quantized[MAX_WIDTH];\n\n")
    else:
        src.append("/* The workspace: two activation vectors, used in turn. */\n"
                   "static float workspace_a[MAX_WIDTH];\nstatic float workspace_b[MAX_WIDTH];\n\n")
    template = _INT8_KERNEL if quantize == "int8" else _FLOAT_KERNEL
    for (ptr, idx), tag in kernels.items():
        src.append(template.format(ptr=ptr, idx=idx, tag=tag) + "\n")
    if len(model.layers) > 1:
        src.append(_RELU + "\n")
    if quantize == "int8":
        src.append(_QUANTIZE + "\n")
    src.append(_SOFTMAX + "\n")
    src.append(_c_predict(model, name, kernels, quantize))
    return header, "".join(src)


def _c_header(name: str, sizes, classes) -> str:
    """NAME.h after its comment: the two defines, the class names and the predict declaration."""
    upper = name.upper()
    return f"""#ifndef {upper}_H
#define {upper}_H

#ifdef __cplusplus
extern "C" {{
#endif

#define {upper}_N_FEATURES {sizes[0]}
#define {upper}_N_CLASSES {len(classes)}

/* The class label of each output, in output order. */
extern const char *const {name}_class_names[{upper}_N_CLASSES];

/*
 * Predict one sample. x: {upper}_N_FEATURES raw features, as in the training data.
 * probabilities: {upper}_N_CLASSES floats to fill, or NULL. Returns the index of the most probable
 * class in {name}_class_names. Not reentrant: it uses one static workspace.
 */
int {name}_predict(const float *x, float *probabilities);

#ifdef __cplusplus
}}
#endif

#endif /* {upper}_H */
"""


def _c_predict(model, name: str, kernels: dict, quantize: str) -> str:
    """The C text of NAME_predict: scale the input, then each layer's kernel, ReLU between layers, softmax."""
    sizes, n_layers, src = model.sizes, len(model.layers), []
    src.append(f"int {name}_predict(const float *x, float *probabilities)\n{{\n")
    if quantize == "int8":
        src.append("    float *h = activation;\n    float s;\n    int j;\n"
                   f"    for (j = 0; j < {sizes[0]}; j++) {{\n"
                   "        h[j] = (x[j] - input_shift[j]) * input_scale[j];\n    }\n")
        for l, layer in enumerate(model.layers):
            tag = kernels[_kernel_types(layer.n_in, layer.n_out, layer.nnz)]
            src.append(f"    s = quantize(h, {layer.n_in}, quantized);\n"
                       f"    layer_{tag}(layer{l}_row_start, layer{l}_output, layer{l}_weight, {layer.n_in}, "
                       f"{layer.n_out}, quantized, accumulator);\n"
                       f"    dequantize(accumulator, s, layer{l}_weight_scale, layer{l}_bias, {layer.n_out}, h);\n")
            if l < n_layers - 1:
                src.append(f"    relu(h, {layer.n_out});\n")
        src.append(f"    return softmax(h, {sizes[-1]}, probabilities);\n}}\n")
    else:
        src.append("    float *h = workspace_a, *y = workspace_b" + (", *t" if n_layers > 1 else "") + ";\n    int j;\n"
                   f"    for (j = 0; j < {sizes[0]}; j++) {{\n"
                   "        h[j] = (x[j] - input_shift[j]) * input_scale[j];\n    }\n")
        for l, layer in enumerate(model.layers):
            tag = kernels[_kernel_types(layer.n_in, layer.n_out, layer.nnz)]
            src.append(f"    layer_{tag}(layer{l}_row_start, layer{l}_output, layer{l}_weight, layer{l}_bias, "
                       f"{layer.n_in}, {layer.n_out}, h, y);\n")
            if l < n_layers - 1:  # ReLU, then this layer's output is the next one's input
                src.append(f"    relu(y, {layer.n_out});\n    t = h;\n    h = y;\n    y = t;\n")
        src.append(f"    return softmax(y, {sizes[-1]}, probabilities);\n}}\n")
    return "".join(src)


# -- the export ------------------------------------------------------------------------------------

def export_c(model, out, *, quantize: str = "none", profile=None, force: bool = False, name: str | None = None,
             check=None, check_samples: int = 1000) -> dict:
    """Check and atomically write ``NAME.h`` and ``NAME.c``; return a report.

    Parameters
    ----------
    model : SparseMLP
    out : path
        ``NAME.c``, ``NAME.h`` or ``NAME``; both files are written next to each other.
    quantize : {"none", "int8"}, default="none"
    profile : Profile or None
        A microcontroller profile: a model whose flash or RAM exceeds it is refused (BudgetError)
        before anything is written.
    name : str or None
        The C prefix; default: from the file name (``c_name``).
    check : (X, labels) or None
        Samples with their true labels: the report gives float32 and int8 accuracy on them.
    check_samples : int, default=1000
        Deterministic inputs (``export.check_inputs``) on which int8 labels are compared with float32.

    Returns
    -------
    dict
        ``header``, ``source``, ``name``, ``quantize``, ``memory`` (``McuPlan.to_dict``), and for
        int8 ``agreement`` (share of labels equal to float32's on the deterministic inputs), plus
        ``accuracy_float32`` / ``accuracy_int8`` / ``check_count`` when ``check`` is given.
    """
    from .export import check_inputs  # export loads onnx: plans must not

    h_path, c_path = c_paths(out)
    for p in (h_path, c_path):
        if p.exists() and not force:
            raise OutputExistsError(f"{p} exists; pass --force to overwrite it or choose another path")
    name = name or c_name(c_path)
    _check_quantize(quantize)
    classes = [str(c) for c in model.classes]
    plan = plan_c(model.sizes, model.nnz, quantize, classes, profile)
    if profile is not None:
        refuse_unless_fits(plan, model.sizes, model.nnz, model.config.get("epsilon"))
    header, source = generate_c(model, name, quantize)
    report = {"header": str(h_path), "source": str(c_path), "name": name, "quantize": quantize,
              "memory": plan.to_dict()}
    if quantize == "int8":
        X = check_inputs(model, check_samples)
        want = np.argmax(model.predict_proba(X), axis=1)
        report["agreement"] = float(np.mean(np.argmax(predict_int8(model, X), axis=1) == want))
        report["agreement_samples"] = check_samples
    if check is not None:
        X, labels = check
        truth = np.asarray([str(c) for c in labels])
        names = np.asarray(classes)
        report["accuracy_float32"] = float(np.mean(names[np.argmax(model.predict_proba(X), axis=1)] == truth))
        if quantize == "int8":
            report["accuracy_int8"] = float(np.mean(names[np.argmax(predict_int8(model, X), axis=1)] == truth))
        report["check_count"] = int(len(truth))
        stored = model.metrics.get("test_accuracy")
        # train() measured the same split: a different float32 accuracy means other data or settings.
        report["split_matches_training"] = stored is None or abs(stored - report["accuracy_float32"]) < 1e-9
    atomic_write(h_path, lambda f: f.write(header.encode("ascii")), force=force)
    atomic_write(c_path, lambda f: f.write(source.encode("ascii")), force=force)
    report["header_bytes"], report["source_bytes"] = len(header), len(source)
    return report


def own_test_split(model, dataset):
    """(X, labels) of the model's own test split of ``dataset``: the file's test part, or the split
    ``train`` made, rebuilt from the model's seed and fractions. ConfigError if it cannot be rebuilt."""
    from .train import TrainConfig, split_data  # train loads numba: only export --data needs the split

    if dataset.n_features != model.n_features:
        raise ConfigError(f"--data has {dataset.n_features} features; the model expects {model.n_features}")
    config = TrainConfig.from_dict(model.config)
    if dataset.X_test is None and not model.config:
        raise ConfigError("the model has no training configuration, so its test split cannot be rebuilt; "
                          "pass --data with a test part (an .npz with X_test, y_test)")
    rng_split = np.random.default_rng(np.random.SeedSequence(config.seed).spawn(4)[0])  # as train() draws it
    _, _, X_test, y_test = split_data(dataset, config, rng_split)
    if X_test is None or len(y_test) == 0:
        raise ConfigError("the model was trained without a test split; pass --data with a test part")
    return X_test, [dataset.classes[c] for c in y_test]


def infer_format(out, fmt: str | None) -> str:
    """The export format: ``fmt`` if given (checked against the suffix), else from OUT's suffix."""
    suffix = Path(out).suffix.lower()
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    guessed = "c" if suffix in (".c", ".h") else "onnx" if suffix == ".onnx" else None
    if fmt is not None and guessed is not None and fmt != guessed:
        raise ConfigError(f"--format {fmt} does not match the file name {Path(out).name}; "
                          f"use a {'.c' if fmt == 'c' else '.onnx'} name or drop --format")
    return fmt or guessed or "onnx"
