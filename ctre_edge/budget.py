"""MemoryPlan: the peak memory of a training run, predicted part by part before any work.

Every part is a formula over the run's shapes (layer sizes, connections, batch, samples) plus one
measured constant, the resident memory of the interpreter with numpy, numba and the compiled
kernels loaded. ``tools/plan_vs_measured.py`` runs real trainings over a grid of shapes and prints
predicted against measured peak RSS; rerun it after changing anything here.

The parts that live for the whole run are summed; the two that come and go once per epoch
(similarity scoring and the topology update's temporaries) never coexist, so only the larger counts.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, replace

from .errors import BudgetError
from .layers import er_nnz
from .packed import row_stride, scores_layers_whole, uses_csc, uses_int8_codes

MiB = 1 << 20
# Resident set of `ctre-edge train` with every kernel loaded from a warm numba cache, before the
# data set: 176 MiB measured on x86-64 / Python 3.11 (the first row of tools/plan_vs_measured.py).
RUNTIME_BYTES = 176 * MiB
# numba imports scipy when it is installed (scikit-learn brings it), and a training process then maps
# more of it: 17-18 MiB more measured peak (`python -m tools.plan_vs_measured --data mnist.npz --quick`,
# first two rows, in one environment with scikit-learn installed and one without; x86-64, numba
# 0.68.1, scipy 1.17); rounded up.
SCIPY_BYTES = 20 * MiB
# onnxruntime, loaded where the exact topology update uses the 8-bit prefilter
# (packed.uses_int8_codes), with its one session: 20 MiB for the library and 12 for the session,
# resident, measured on x86-64 (onnxruntime 1.32, a one-off script reading /proc/self/statm); rounded up.
INT8_RUNTIME_BYTES = 36 * MiB


def scipy_installed() -> bool:
    """Whether numba will import scipy in a training process (looked up, not imported)."""
    return importlib.util.find_spec("scipy") is not None


# Extra peak while numba compiles the kernels on a cold cache (244 MiB vs 164 MiB, same tool).
COMPILE_EXTRA_BYTES = 80 * MiB
# Temporaries of one topology update per connection of the largest layer (positions, sort keys,
# the kept weights): 46.6 bytes of numpy arrays measured with tracemalloc around
# ``evolve.update_layer`` (SET, zeta 0.3) on ER epsilon-20 layers of 200,000 x 200,000 and
# 600,000 x 600,000 (a one-off script, 2026-12-04; 50.8 when first measured, at df76e4f),
# plus 4.8 in ``kernels.merge_topology`` (16 bytes per grown connection, which
# tracemalloc does not see); rounded up.
UPDATE_BYTES_PER_CONNECTION = 52
# A training plan fits when it stays under this share of the budget. The same run's measured peak
# varied by up to 13% on a busy machine (allocator and transparent huge pages), and a run that dies
# of out-of-memory after hours is the failure that matters; exported models (sizes known exactly)
# get no headroom.
TRAINING_HEADROOM = 0.9

PART_LABELS = {
    "runtime": "interpreter, numpy, numba and compiled kernels",
    "data": "data set and index arrays",
    "model": "weights + indices + momentum (live and best-epoch copy), gradients, CSC copy of the pattern",
    "batch": "activations and gradients for one batch",
    "evaluation": "evaluation buffers and probabilities",
    "similarity": "similarity scoring workspace (per epoch)",
    "update": "topology update temporaries (per epoch)",
    "compile": "numba compilation (cold cache only)",
    "scipy": "scipy, which numba imports when it is installed",
    "onnxruntime": "onnxruntime, for the topology update's 8-bit products",
}


@dataclass
class RunShape:
    """What the planner needs to know about a run: the network and the data, no arrays."""

    sizes: list[int]
    epsilon: float
    method: str
    batch_size: int
    eval_batch_size: int
    similarity_samples: int
    n_train: int
    n_val: int
    n_test: int
    data_bytes: int
    similarity_workspace_mib: int = 32
    sketch_dim: int = 0  # > 0: sketch scoring instead of an exact activation sample
    threads: int = 1  # kernel threads; each scoring thread keeps its own top-k

    @property
    def nnz(self) -> list[int]:
        return [er_nnz(a, b, self.epsilon) for a, b in zip(self.sizes[:-1], self.sizes[1:])]

    @property
    def params(self) -> int:
        return sum(self.nnz) + sum(self.sizes[1:])


@dataclass
class MemoryPlan:
    """Predicted peak memory, in bytes per part, against an optional budget."""

    parts: dict[str, int]
    budget: int | None = None
    profile: str | None = None
    changes: list[str] = field(default_factory=list)
    headroom: float = TRAINING_HEADROOM

    @property
    def total(self) -> int:
        transient = max(self.parts.get("similarity", 0), self.parts.get("update", 0))
        steady = sum(v for k, v in self.parts.items() if k not in ("similarity", "update"))
        return steady + transient

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.headroom * self.budget

    def largest_part(self) -> str:
        return max((k for k in self.parts if k != "runtime"), key=lambda k: self.parts[k])

    def to_dict(self) -> dict:
        return {"parts": dict(self.parts), "total_bytes": self.total, "budget_bytes": self.budget,
                "usable_bytes": None if self.budget is None else int(self.headroom * self.budget),
                "fits": self.fits, "profile": self.profile, "changes": list(self.changes)}


def plan_training(shape: RunShape, *, budget: int | None = None, profile: str | None = None,
                  cold_cache: bool = False) -> MemoryPlan:
    """Predict the peak resident memory of training ``shape``; see the module docstring."""
    sizes, nnz = shape.sizes, shape.nnz
    units, widest, n_layers = sum(sizes), max(sizes), len(sizes) - 1
    b, eb = shape.batch_size, shape.eval_batch_size
    n_samples = shape.n_train + shape.n_val + shape.n_test
    per_layer = sum(8 * (a + 1) + 12 * z for a, z in zip(sizes[:-1], nnz))  # indptr, indices, values, momentum
    snapshot = sum(8 * (a + 1) + 8 * z for a, z in zip(sizes[:-1], nnz))   # best epoch: indptr, indices, values
    biases = 12 * sum(sizes[1:])                                             # bias, its momentum, best copy
    parts = {
        "runtime": RUNTIME_BYTES,
        **({"scipy": SCIPY_BYTES} if scipy_installed() else {}),
        "data": shape.data_bytes + 16 * n_samples,  # + index arrays (split rows, shuffled order)
        # + the gradient buffers, and the CSC copy of the pattern that the forward pass reads by output
        # rows (int32 row and position per connection, int64 column pointers), allocated on any device
        # when a layer is small enough to use it (packed.uses_csc).
        "model": per_layer + snapshot + biases + 4 * max(nnz) + 4 * max(sizes[1:])
        + (8 * sum(nnz) + 8 * (sum(sizes[1:]) + n_layers) if uses_csc(nnz) else 0),
        "batch": (4 * units + 8 * widest) * row_stride(b),  # rows padded to whole lines
        "update": UPDATE_BYTES_PER_CONNECTION * max(nnz),
    }
    # Evaluation buffers hold at most as many rows as the larger of the parts they evaluate, but
    # while the topology updates run only the validation rows have touched them (np.empty pages are
    # not resident until written); the test part is evaluated after the last update has freed its
    # temporaries. So the peak is the larger of (validation + update) and (test), and this part is
    # what the test evaluation adds beyond the update. Not beyond the similarity workspace, which is
    # freed before the test evaluation too: the similarity phase's own peak runs above its estimate
    # (digits, ctre-sim: 210.5 MiB measured against 195.7 planned when it was subtracted), and the
    # evaluation term is the margin that covers it.
    rows = max(shape.n_val, shape.n_test)
    validation = 4 * max(1, min(eb, shape.n_val)) * units + 8 * shape.n_val * (sizes[-1] + 1)
    evaluation = 4 * max(1, min(eb, rows)) * units + 8 * rows * (sizes[-1] + 1)
    if shape.method.startswith("ctre"):
        s = min(shape.similarity_samples, shape.n_train)
        k = max(int(0.2 * z) for z in nnz)
        block = min(shape.similarity_workspace_mib * MiB, 4 * max(a * c for a, c in zip(sizes[:-1], sizes[1:])))
        # Exact: the activations of S samples at every level. Sketch: (n_in + n_out) x dim per layer.
        # (Exact ones sit in the validation buffer where that holds S rows, evolve.sample_activations;
        # counted here all the same, so the plan never grows when --fit shrinks the evaluation batch.)
        held = 8 * units * shape.sketch_dim if shape.sketch_dim else 4 * s * units
        if not shape.sketch_dim and uses_int8_codes(sizes, s, shape.similarity_workspace_mib * MiB):
            # + each level's 8-bit codes and their stats where they fit the workspace
            # (similarity.with_codes), the transposed codes onnxruntime makes of each scoring
            # thread's output level, and onnxruntime itself.
            held += sum((s + 32) * n for n in sizes if s * n <= shape.similarity_workspace_mib * MiB)
            held += s * widest * shape.threads
            parts["onnxruntime"] = INT8_RUNTIME_BYTES
        # Sketch: + copies of a layer's live neurons' sketches (similarity._live_levels), at most the
        # workspace. Exact: none, each level's live rows are packed in place (evolve.sample_activations);
        # where every layer's scores fit a thread's share of the workspace, as many layers as threads
        # may be scored at once, and they keep their picks (16 bytes each) until their drops have run
        # (evolve.TopologyPolicy._grow_scored_whole).
        workspace = shape.similarity_workspace_mib * MiB
        whole = not shape.sketch_dim and scores_layers_whole(sizes, workspace, shape.threads)
        live = min(workspace, 4 * shape.sketch_dim * max(a + c for a, c in zip(sizes[:-1], sizes[1:])))
        topk = 64 * k + (16 * sum(int(0.2 * z) for z in nnz) if whole else 0)
        if shape.threads > 1:
            # Each scoring thread after the first keeps its own top-k (12 bytes per entry) and lower
            # bounds (16), merging adds one more top-k (12), and the shares' lower bounds are joined
            # (8 per thread) to find the layer's bound: similarity._scan_topk.
            topk += (40 * (shape.threads - 1) + 8 * shape.threads) * k
        parts["similarity"] = held + block + live + topk + 4 * widest * n_layers
    parts["evaluation"] = max(validation, evaluation - parts["update"])
    if cold_cache:
        parts["compile"] = COMPILE_EXTRA_BYTES
    return MemoryPlan(parts, budget, profile)


def plan_inference(sizes: list[int], nnz: list[int], profile, quantize: str = "none",
                   epsilon: float | None = None):
    """Flash and RAM of the exported model on an inference-only device: the C export's ``McuPlan``.

    Counted as ``export --format c`` writes it (``export_c.plan_c``): flash = const CSR data with
    the smallest index types + code, RAM = static workspace + stack. Refuses (BudgetError) a
    network above the profile's parameter or width caps, or whose flash exceeds
    ``model_budget_bytes`` or RAM ``workspace_budget_bytes``, naming the part and the fix.
    """
    from .mcu_plan import plan_c, refuse_unless_fits  # local: its refuse_unless_fits is not this module's

    params = sum(nnz) + sum(sizes[1:])
    caps = []
    if params > profile.max_params:
        caps.append(f"{params:,} parameters exceed the cap of {profile.max_params:,}")
    if max(sizes[1:-1], default=0) > profile.max_layer_width:
        caps.append(f"a hidden layer exceeds the width cap of {profile.max_layer_width:,}")
    plan = plan_c(sizes, nnz, quantize, None, profile)
    if caps:
        raise BudgetError(f"the exported model needs about {plan.flash_total / 1024:.0f} KiB on {profile.name}, "
                          f"which allows {profile.model_budget_bytes / 1024:.0f} KiB ({'; '.join(caps)}); "
                          f"lower --epsilon or use fewer or narrower --hidden layers")
    refuse_unless_fits(plan, sizes, nnz, epsilon)
    return plan


def check_caps(shape: RunShape, profile) -> None:
    """Refuse a network above the profile's parameter or width caps (BudgetError, exit code 3)."""
    if not profile.can_train:
        raise BudgetError(f"profile {profile.name} is inference-only; train with a profile that can train "
                          f"and check the exported size with `ctre-edge plan --profile {profile.name}`")
    if shape.params > profile.max_params:
        raise BudgetError(f"the network has {shape.params:,} parameters, above the {profile.name} cap of "
                          f"{profile.max_params:,}; use fewer or narrower hidden layers or a lower --epsilon")
    wide = max(shape.sizes[1:-1], default=0)
    if wide > profile.max_layer_width:
        raise BudgetError(f"a hidden layer of {wide:,} neurons exceeds the {profile.name} width cap of "
                          f"{profile.max_layer_width:,}; use narrower --hidden layers")


def refuse_unless_fits(plan: MemoryPlan) -> None:
    """Raise BudgetError naming the largest part and what to change, if the plan exceeds its budget."""
    if plan.fits:
        return
    part = plan.largest_part()
    advice = {
        "data": "use a smaller data set or one with uint8 features",
        "model": "lower --epsilon or use narrower --hidden layers",
        "batch": "lower --batch-size (or pass --fit)",
        "evaluation": "pass --fit to shrink the evaluation batch",
        "similarity": "lower --similarity-samples (or pass --fit)",
        "update": "lower --epsilon or use narrower --hidden layers",
        "compile": "run `ctre-edge warmup` once so kernels load from the cache",
        "scipy": "train in an environment without scipy (scikit-learn brings it)",
        "onnxruntime": "lower --similarity-workspace-mib below one level's codes (S bytes a neuron)",
    }[part]
    raise BudgetError(f"the run needs about {plan.total / MiB:.0f} MiB but {plan.profile or 'the budget'} allows "
                      f"{plan.headroom * plan.budget / MiB:.0f} MiB ({plan.headroom:.0%} of its budget); "
                      f"the largest part is {PART_LABELS[part]} "
                      f"({plan.parts[part] / MiB:.0f} MiB): {advice}")


def fit_to_budget(shape: RunShape, budget: int, profile: str | None = None,
                  cold_cache: bool = False) -> tuple[RunShape, MemoryPlan]:
    """Shrink what can shrink without changing the model until the plan fits.

    Halves, in turn, the evaluation batch, the similarity sample count, the similarity workspace
    and the training batch, each no lower than a floor. The returned plan lists the changes as
    the flags that reproduce them; if even the floors do not fit, the plan still exceeds ``budget``.
    """
    original = shape
    floors = {"eval_batch_size": 16, "similarity_samples": 32, "similarity_workspace_mib": 1, "batch_size": 8}
    plan = plan_training(shape, budget=budget, profile=profile, cold_cache=cold_cache)
    while not plan.fits:
        # Shrink whichever knob currently costs the most and can still shrink.
        options = []
        for name, floor in floors.items():
            value = getattr(shape, name)
            if value // 2 >= floor:
                trial = replace(shape, **{name: value // 2})
                saved = plan.total - plan_training(trial, budget=budget, cold_cache=cold_cache).total
                if saved > 0:
                    options.append((saved, name, trial))
        if not options:
            break
        _, _, shape = max(options, key=lambda o: o[0])
        plan = plan_training(shape, budget=budget, profile=profile, cold_cache=cold_cache)
    plan.changes = [f"--{n.replace('_', '-')} {getattr(shape, n)} (was {getattr(original, n)})"
                    for n in floors if getattr(shape, n) != getattr(original, n)]
    return shape, plan


def shape_of(config, summary, data_bytes: int | None = None, threads: int = 1) -> RunShape:
    """The RunShape of a TrainConfig on a data set (``data.DataSummary``), splits as ``train.split_data``."""
    n = summary.n_samples
    n_test = summary.n_test
    copied = 0
    if n_test == 0 and config.test_fraction > 0:
        n_test = int(round(config.test_fraction * n))
        copied = n_test * (summary.min_bytes // max(n, 1))  # X[test] is a copy
        n -= n_test
    n_val = int(round(config.validation_fraction * n))
    sizes = [summary.n_features, *config.hidden, summary.n_classes]
    return RunShape(sizes, config.epsilon, config.method, config.batch_size, config.eval_batch_size,
                    config.similarity_samples, n - n_val, n_val, n_test,
                    (summary.min_bytes if data_bytes is None else data_bytes) + copied,
                    config.similarity_workspace_mib, config.sketch_dim if config.similarity == "sketch" else 0,
                    threads)


FIT_KNOBS = ("batch_size", "eval_batch_size", "similarity_samples", "similarity_workspace_mib")  # what --fit shrinks


def plan_run(config, summary, profile=None, *, fit: bool = False, cold_cache: bool = False,
             data_bytes: int | None = None, inference_only_ok: bool = False):
    """Plan ``config`` on ``summary`` against ``profile``; refuse (BudgetError) or, with ``fit``, shrink.

    Returns ``(config, plan)``: a new TrainConfig (the one given is not changed) and its plan.
    With a profile that can train, its similarity sample cap bounds ``similarity_samples`` and its
    caps on parameters and width are checked first; ``plan.changes`` lists every setting changed
    (the cap and what ``fit`` shrank) as the flags that reproduce it. For an inference-only profile
    and ``inference_only_ok``, the plan is the exported model's size against the device's model budget.
    """
    changes = []
    if profile is not None and profile.can_train and config.similarity_samples > profile.similarity_sample_cap:
        changes.append(f"--similarity-samples {profile.similarity_sample_cap} (was {config.similarity_samples}; "
                       f"the {profile.name} cap)")
        config = replace(config, similarity_samples=profile.similarity_sample_cap)
    # The run's kernel threads: the profile's, else numba's default of one per core.
    threads = profile.threads if profile is not None else max(1, os.cpu_count() or 1)
    shape = shape_of(config, summary, data_bytes, threads)
    if profile is not None and not profile.can_train and inference_only_ok:
        return config, plan_inference(shape.sizes, shape.nnz, profile, epsilon=shape.epsilon)
    if profile is None:
        return config, plan_training(shape, cold_cache=cold_cache)
    check_caps(shape, profile)
    budget = profile.train_budget_bytes
    if fit:
        shape, plan = fit_to_budget(shape, budget, profile.name, cold_cache)
        config = replace(config, **{name: getattr(shape, name) for name in FIT_KNOBS})
    else:
        plan = plan_training(shape, budget=budget, profile=profile.name, cold_cache=cold_cache)
    plan.changes = changes + plan.changes
    refuse_unless_fits(plan)
    return config, plan


def budget_bytes(profile, model=None) -> int | None:
    """The one rule from a device profile to a memory budget, for training and for export.

    A profile that can train gives its training budget. A microcontroller (inference only) gives
    its model budget, after checking that ``model`` (when given) fits it (BudgetError otherwise).
    No profile, no budget.
    """
    if profile is None:
        return None
    if profile.can_train:
        return profile.train_budget_bytes
    if model is not None:
        plan_inference(model.sizes, model.nnz, profile, epsilon=model.config.get("epsilon"))
    return profile.model_budget_bytes


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's ``VmHWM`` first: ``getrusage``'s ``ru_maxrss`` also counts the memory of the process
    that started us when it forked with vfork (the exec records the parent's peak), so a run
    started from a large parent would report the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # only where /proc is missing (not Linux)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
