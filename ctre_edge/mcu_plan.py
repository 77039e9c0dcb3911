"""Flash and RAM of a model exported as C (``export_c.py``), part by part, against a microcontroller profile.

``plan_c`` counts what ``arm-none-eabi-size`` reports for the compiled ``NAME.o``: flash = ``text``
(the const arrays, each padded to 4 bytes, the class-name table with 32-bit pointers, and the code,
estimated per layer and per kernel from Cortex-M7 builds) and RAM = ``bss`` (the workspace) plus a
stack estimate (``-fstack-usage`` of the deepest call chain, ``expf`` included). ``tools/mcu_check.py``
prints planner against compiler. Needs numpy only, so ``plan`` and ``export --profile`` can refuse a
model before anything is generated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import QUANTIZATIONS
from .errors import BudgetError, ConfigError
from .layers import er_nnz

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

def c_int_type(max_value: int) -> tuple[str, int]:
    """(C type, bytes) of the smallest unsigned integer type that holds ``max_value``."""
    for limit, name, size in _INT_TYPES:
        if max_value <= limit:
            return name, size
    raise ConfigError(f"an index of {max_value} does not fit 32 bits; use a smaller network")


def _pad4(n: int) -> int:
    return (n + 3) // 4 * 4


def _kernel_types(n_in, n_out, nnz) -> tuple[str, str]:
    return c_int_type(nnz)[0], c_int_type(n_out - 1)[0]



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


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}; got {quantize!r}")
