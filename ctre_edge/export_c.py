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
``plan_c`` counts what ``arm-none-eabi-size`` reports for the compiled ``NAME.o``: flash =
``text`` (the const arrays, each padded to 4 bytes, the class-name table with 32-bit pointers,
and the code, estimated per layer and per kernel from Cortex-M7 builds) and RAM = ``bss`` (the
workspace) plus a stack estimate (``-fstack-usage`` of the deepest call chain, ``expf``
included). ``tools/mcu_check.py`` prints planner against compiler.

References
----------
Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018 (symmetric int8 with int32 accumulation; per-channel weight scales).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BudgetError, ConfigError, ModelFileError, OutputExistsError
from .fileio import atomic_write

QUANTIZE = ("none", "int8")
FORMATS = ("onnx", "c")
_INT_TYPES = ((0xFF, "uint8_t", 1), (0xFFFF, "uint16_t", 2), (0xFFFFFFFF, "uint32_t", 4))
# Code of NAME.o in bytes, arm-none-eabi-gcc 12.2 -mcpu=cortex-m7 -mthumb -mfloat-abi=hard -mfpu=fpv5-d16
# -Os: NAME_predict with the scaling and softmax, plus each distinct layer kernel (one per index-type
# pair), plus each layer's call. A least-squares fit over 18 builds per quantization (1 to 4 layers,
# 1 to 3 kernels; `python tools/mcu_check.py --fit-code`), largest error about 30 bytes.
CODE_BASE = {"none": 230, "int8": 460}
CODE_PER_KERNEL = {"none": 69, "int8": 75}
CODE_PER_LAYER = {"none": 51, "int8": 66}
# Stack of NAME_predict and what it calls, expf included: the emulated run's measured high-water mark
# is 68 to 92 bytes (tools/mcu_check.py prints it per build); rounded up.
STACK_BYTES = 96
_INT8_MAX_PRODUCT = 127 * 127


def c_int_type(max_value: int) -> tuple[str, int]:
    """(C type, bytes) of the smallest unsigned integer type that holds ``max_value``."""
    for limit, name, size in _INT_TYPES:
        if max_value <= limit:
            return name, size
    raise ConfigError(f"an index of {max_value} does not fit 32 bits; use a smaller network")


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


# -- memory plan ----------------------------------------------------------------------------------

PART_LABELS = {
    "weights": "weights",
    "indices": "output indices and row starts",
    "biases": "biases, input scaling and class names",
    "code": "code (estimate)",
    "workspace": "activation workspace (static)",
    "stack": "stack (estimate)",
}


@dataclass
class McuPlan:
    """Flash and RAM of the exported C model, part by part, against a profile's budgets.

    ``flash`` parts are what ``arm-none-eabi-size`` calls ``text`` of ``NAME.o``; ``ram`` parts are
    its ``bss`` plus the stack estimate. ``total`` is flash + RAM.
    """

    flash: dict[str, int]
    ram: dict[str, int]
    quantize: str = "none"
    flash_budget: int | None = None
    ram_budget: int | None = None
    profile: str | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def flash_total(self) -> int:
        return sum(self.flash.values())

    @property
    def ram_total(self) -> int:
        return sum(self.ram.values())

    @property
    def total(self) -> int:
        return self.flash_total + self.ram_total

    @property
    def parts(self) -> dict[str, int]:
        return {**self.flash, **self.ram}

    @property
    def fits(self) -> bool:
        return ((self.flash_budget is None or self.flash_total <= self.flash_budget)
                and (self.ram_budget is None or self.ram_total <= self.ram_budget))

    def to_dict(self) -> dict:
        return {"flash": dict(self.flash), "ram": dict(self.ram), "flash_bytes": self.flash_total,
                "ram_bytes": self.ram_total, "total_bytes": self.total, "quantize": self.quantize,
                "flash_budget_bytes": self.flash_budget, "ram_budget_bytes": self.ram_budget,
                "budget_bytes": self.flash_budget, "fits": self.fits, "profile": self.profile,
                "changes": list(self.changes)}


def plan_c(sizes, nnz, quantize: str = "none", class_names=None, profile=None) -> McuPlan:
    """Flash and RAM of the C export of a network with these layer ``sizes`` and connections ``nnz``.

    ``class_names`` defaults to the output indices as strings. With ``profile``, its
    ``model_budget_bytes`` bounds flash and ``workspace_budget_bytes`` (else ``ram_bytes``) RAM;
    nothing is refused here (see ``refuse_unless_fits``).
    """
    _check_quantize(quantize)
    sizes, nnz = [int(s) for s in sizes], [int(z) for z in nnz]
    names = [str(c) for c in (class_names if class_names is not None else range(sizes[-1]))]
    weights = indices = 0
    for n_in, n_out, z in zip(sizes[:-1], sizes[1:], nnz):
        weights += _pad4(z) if quantize == "int8" else 4 * z
        weights += 4 * n_out if quantize == "int8" else 0
        indices += _pad4(z * c_int_type(n_out - 1)[1]) + _pad4((n_in + 1) * c_int_type(z)[1])
    biases = 4 * sum(sizes[1:]) + 8 * sizes[0] + 4 * len(names) + sum(len(n.encode("utf-8")) + 1 for n in names)
    kernels = len({_kernel_types(a, b, z) for a, b, z in zip(sizes[:-1], sizes[1:], nnz)})
    code = CODE_BASE[quantize] + CODE_PER_KERNEL[quantize] * kernels + CODE_PER_LAYER[quantize] * len(nnz)
    width = max(sizes)
    workspace = 2 * 4 * width if quantize == "none" else _pad4(width) + 8 * width
    plan = McuPlan({"weights": weights, "indices": indices, "biases": biases, "code": code},
                   {"workspace": workspace, "stack": STACK_BYTES}, quantize)
    if profile is not None:
        plan.profile = profile.name
        plan.flash_budget = profile.model_budget_bytes
        plan.ram_budget = getattr(profile, "workspace_budget_bytes", None) or profile.ram_bytes
    return plan


def refuse_unless_fits(plan: McuPlan, sizes, nnz, epsilon: float | None = None) -> None:
    """BudgetError naming the part that is too big and the change that makes it fit, if it does not."""
    if plan.fits:
        return
    over_flash = plan.flash_budget is not None and plan.flash_total > plan.flash_budget
    where, total, budget = ("flash", plan.flash_total, plan.flash_budget) if over_flash else \
        ("RAM", plan.ram_total, plan.ram_budget)
    parts = plan.flash if over_flash else plan.ram
    big = max(parts, key=parts.get)
    fixes = []
    if over_flash:
        if plan.quantize == "none":
            q = plan_c(sizes, nnz, "int8")
            q.flash_budget, q.ram_budget = plan.flash_budget, plan.ram_budget
            if q.fits:
                fixes.append(f"exporting with --quantize int8 fits ({_kib(q.flash_total)} of flash)")
        eps = _epsilon_that_fits(plan, sizes, epsilon)
        if eps is not None:
            fixes.append(f"retrain with --epsilon {eps:g} or lower"
                         + (f" (this model has {epsilon:g})" if epsilon else ""))
        fixes.append("or use fewer or narrower --hidden layers")
    else:
        fixes.append("use narrower --hidden layers (the workspace holds the widest layer)")
    raise BudgetError(f"the exported C model needs about {_kib(plan.flash_total)} of flash and {_kib(plan.ram_total)} "
                      f"of RAM on {plan.profile}, which allows {_kib(plan.flash_budget)} and {_kib(plan.ram_budget)}: "
                      f"{where} is {_kib(total - budget)} over, its largest part is the {part_label(big, plan.quantize)} "
                      f"({_kib(parts[big])}); nothing was written; " + "; ".join(fixes))


def part_label(part: str, quantize: str) -> str:
    if part == "weights":
        return "float32 weights" if quantize == "none" else "int8 weights and their per-neuron scales"
    return PART_LABELS[part]


def _epsilon_that_fits(plan: McuPlan, sizes, epsilon) -> float | None:
    """The largest epsilon (two significant digits) whose Erdos-Renyi network fits, at this quantization."""
    from .layers import er_nnz

    def fits(eps):
        trial = plan_c(sizes, [er_nnz(a, b, eps) for a, b in zip(sizes[:-1], sizes[1:])], plan.quantize)
        trial.flash_budget, trial.ram_budget = plan.flash_budget, plan.ram_budget
        return trial.fits

    hi = float(epsilon) if epsilon else 1000.0
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo <= 0:
        return None
    digits = 1 - int(math.floor(math.log10(lo)))
    value = math.floor(lo * 10**digits) / 10**digits
    return value if value > 0 and fits(value) else None


def _kib(n) -> str:
    return "?" if n is None else f"{n / 1024:.1f} KiB"


# -- int8 -----------------------------------------------------------------------------------------

def quantize_layer(layer) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights in CSR order, float32 scale per output neuron): ``w ~= scale[output] * q``."""
    absmax = np.zeros(layer.n_out, dtype=np.float32)
    np.maximum.at(absmax, layer.indices, np.abs(layer.values))
    scale = (absmax / np.float32(127)).astype(np.float32)
    s = scale[layer.indices].astype(np.float64)
    q = np.where(s > 0, np.round(layer.values.astype(np.float64) / np.where(s > 0, s, 1)), 0)
    return np.clip(q, -127, 127).astype(np.int8), scale


def _quantize_activations(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 of float32 h (N, n): (q as int32, scale float32 (N,)), as the C code does it."""
    m = np.max(np.abs(h), axis=1)
    safe = np.where(m > 0, m, np.float32(1))
    inv = (np.float32(127) / safe).astype(np.float32)
    v = (h * inv[:, None]).astype(np.float32)
    half = np.float32(0.5)
    q = np.where(v < 0, np.trunc(v - half), np.trunc(v + half))
    q = np.where(m[:, None] > 0, np.clip(q, -127, 127), 0).astype(np.int32)
    return q, np.where(m > 0, m / np.float32(127), np.float32(0)).astype(np.float32)


def predict_int8(model, X, batch: int = 128) -> np.ndarray:
    """Class probabilities of the int8 C code, computed in numpy (float32 softmax via np.exp)."""
    X = np.ascontiguousarray(np.asarray(X), dtype=np.float32)
    quantized = [quantize_layer(layer) for layer in model.layers]
    out = np.empty((X.shape[0], model.layers[-1].n_out), dtype=np.float32)
    for start in range(0, X.shape[0], batch):
        h = ((X[start:start + batch] - model.shift) * model.scale).astype(np.float32)
        for l, (layer, (q_w, w_scale)) in enumerate(zip(model.layers, quantized)):
            q_x, s = _quantize_activations(h)
            acc = _sparse_int_product(layer, q_w, q_x)
            h = (acc.astype(np.float32) * (s[:, None] * w_scale[None, :])).astype(np.float32) + layer.bias
            if l < len(model.layers) - 1:
                h = np.maximum(h, np.float32(0))
        e = np.exp(h - h.max(axis=1, keepdims=True)).astype(np.float32)
        out[start:start + batch] = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
    return out


def _sparse_int_product(layer, q_w, q_x) -> np.ndarray:
    """acc (N, n_out) int64 = q_x @ W_q, by connection: O(N * nnz) memory, never N x n_in x n_out."""
    acc = np.zeros((q_x.shape[0], layer.n_out), dtype=np.int64)
    if layer.nnz == 0:
        return acc
    order = np.argsort(layer.indices, kind="stable")
    cols = layer.indices[order]
    products = q_x[:, layer.rows()[order]].astype(np.int64) * q_w[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    acc[:, cols[starts]] = np.add.reduceat(products, starts, axis=1)
    return acc


def _check_int8_fanin(model) -> None:
    for l, layer in enumerate(model.layers):
        fanin = int(np.bincount(layer.indices, minlength=layer.n_out).max(initial=0))
        if fanin * _INT8_MAX_PRODUCT > 2**31 - 1:
            raise ConfigError(f"layer{l} has a neuron with {fanin:,} inputs, which could overflow the int32 "
                              f"accumulator of --quantize int8; export it as float32")


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


def _kernel_types(n_in, n_out, nnz) -> tuple[str, str]:
    return c_int_type(nnz)[0], c_int_type(n_out - 1)[0]


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
    """The text of ``NAME.h`` and ``NAME.c`` for ``model`` (validated; see the module docstring)."""
    from .export import _check_model, _plain, _version

    _check_quantize(quantize)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name or ""):
        raise ConfigError(f"name must be a C identifier (letters, digits, '_'); got {name!r}")
    _check_model(model)
    for arr_name, arr in model.arrays().items():
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelFileError(f"cannot export this model: {arr_name} holds NaN or Inf values")
    if quantize == "int8":
        _check_int8_fanin(model)
    sizes, n_layers = model.sizes, len(model.layers)
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

    header = comment + f"""#ifndef {upper}_H
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
    if n_layers > 1:
        src.append(_RELU + "\n")
    if quantize == "int8":
        src.append(_QUANTIZE + "\n")
    src.append(_SOFTMAX + "\n")
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
    return header, "".join(src)


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
    from .export import check_inputs

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
    from .train import TrainConfig, split_data

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


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
