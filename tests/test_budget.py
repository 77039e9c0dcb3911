"""Issue 4: the memory planner, profiles in `train`/`plan`, and measured peaks within budget."""

import json
import subprocess
import sys
import time

import pytest
from conftest import copy_warmed_cache, evict_library_pages, shared_dataset

from ctre_edge.budget import MiB, RunShape, fit_to_budget, plan_inference, plan_training
from ctre_edge.errors import BudgetError
from ctre_edge.profiles import load_profile


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ctre_edge.cli", *args], capture_output=True, text=True, cwd=cwd)


def write_profile(path, budget_mib, **extra):
    fields = {"name": path.stem, "description": "test device", "arch": "x86_64", "cores": 2,
              "ram_bytes": 4 << 30, "can_train": True, "train_budget_bytes": budget_mib * MiB, "threads": 1,
              "max_params": 10**7, "max_layer_width": 100_000, "similarity_sample_cap": 500, **extra}
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    return path


def shape(**kw):
    base = dict(sizes=[784, 1000, 1000, 1000, 10], epsilon=1, method="ctre-sim", batch_size=100,
                eval_batch_size=1000, similarity_samples=1000, n_train=54000, n_val=6000, n_test=10000,
                data_bytes=55_000_000)
    return RunShape(**{**base, **kw})


def test_plan_parts_grow_with_what_they_depend_on():
    base = plan_training(shape())
    assert plan_training(shape(batch_size=400)).parts["batch"] > base.parts["batch"]
    assert plan_training(shape(epsilon=20)).parts["model"] > 10 * base.parts["model"]
    assert plan_training(shape(similarity_samples=4000)).parts["similarity"] > base.parts["similarity"]
    # Each scoring thread after the first holds its own top-k of the largest layer's k positions,
    # and the threads' lower bounds are joined; layers scored at once keep all their picks. Exact
    # scoring copies no activations (the sample packs each level's live rows in place); sketch
    # scoring copies the live neurons' sketches of the layer it scores. Each scoring thread's
    # product of 8-bit codes transposes its output level (S bytes a neuron of the widest level).
    k = max(int(0.2 * z) for z in shape().nnz)
    picks = 16 * sum(int(0.2 * z) for z in shape().nnz)
    assert (plan_training(shape(threads=3)).parts["similarity"] - base.parts["similarity"]
            == (2 * 40 + 3 * 8) * k + picks + 2 * 1000 * 1000)
    sketch = plan_training(shape(sketch_dim=64)).parts["similarity"]
    assert sketch - plan_training(shape(sketch_dim=32)).parts["similarity"] == 8 * 32 * sum(shape().sizes) + \
        4 * 32 * 2000
    assert "similarity" not in plan_training(shape(method="set")).parts
    assert plan_training(shape(), cold_cache=True).total > base.total
    # the two per-epoch parts never coexist: only the larger counts
    steady = sum(v for k, v in base.parts.items() if k not in ("similarity", "update"))
    assert base.total == steady + max(base.parts["similarity"], base.parts["update"])


def test_fit_shrinks_only_what_does_not_change_the_model():
    wide = shape(sizes=[784, 16000, 16000, 10], eval_batch_size=4000, similarity_samples=4000)
    budget = plan_training(wide).total - 200 * MiB
    fitted, plan = fit_to_budget(wide, budget, "test")
    assert plan.fits and plan.changes
    assert fitted.sizes == wide.sizes and fitted.epsilon == wide.epsilon and fitted.nnz == wide.nnz
    for change in plan.changes:
        assert change.split()[0] in ("--eval-batch-size", "--similarity-samples", "--similarity-workspace-mib",
                                     "--batch-size")


def test_inference_plan_for_microcontrollers():
    esp = load_profile("esp32-s3")
    small = plan_inference([64, 100, 100, 10], [164, 200, 110], esp)
    assert small.fits and small.total < esp.model_budget_bytes
    with pytest.raises(BudgetError, match="needs about .* on esp32-s3"):
        plan_inference([784, 10000, 10000, 10], [10784, 20000, 10010], esp)


def test_mcu_profile_refuses_and_accepts_in_the_cli(tmp_path):
    r = cli("plan", "--profile", "stm32h743", "--hidden", "100,100", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fits"]
    r = cli("plan", "--profile", "rp2350", "--hidden", "4000,4000", "--epsilon", "20")
    assert r.returncode == 3 and "rp2350" in r.stderr and r.stderr.count("\n") == 1
    r = cli("train", "--profile", "esp32-s3", "--out", str(tmp_path / "m.ctre"))
    assert r.returncode == 3 and "inference-only" in r.stderr
    assert not list(tmp_path.iterdir())


def test_run_that_cannot_fit_is_refused_fast_and_writes_nothing(tmp_path):
    t = time.perf_counter()
    r = cli("train", "--profile", "rpi-zero-2w", "--data", "builtin:digits", "--hidden", "200000,200000",
            "--epsilon", "20", "--out", str(tmp_path / "m.ctre"), cwd=tmp_path)
    elapsed = time.perf_counter() - t
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())
    print(f"refused in {elapsed:.2f} s (process start included)")


def test_refusal_names_the_part_and_the_fix(tmp_path):
    prof = write_profile(tmp_path / "tiny.toml", 222)
    r = cli("train", "--profile", str(prof), "--hidden", "1000,1000,1000", "--batch-size", "20000")
    assert r.returncode == 3
    assert "activations and gradients for one batch" in r.stderr and "--batch-size" in r.stderr


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, warmed_cache_template):
    """A kernel cache of these tests' own, filled by warmup (a copy of the session's): the budgets
    below leave no room for a cold compile (which the planner would rightly refuse), and a shared
    cache may be in any state."""
    cache = copy_warmed_cache(warmed_cache_template, tmp_path_factory.mktemp("kernel-cache") / "cache")
    return ["--cache-dir", str(cache)]


@pytest.mark.slow
def test_tight_profile_measured_peak_within_budget_and_fit(tmp_path, warm_cache):
    evict_library_pages()
    prof = write_profile(tmp_path / "tight.toml", 265)
    r = cli(*warm_cache, "train", "--profile", str(prof), "--hidden", "1000,1000,1000", "--epochs", "3",
            "--method", "ctre-sim",
            "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout)["memory"]
    assert mem["measured_peak_bytes"] <= mem["budget_bytes"]
    assert abs(mem["measured_peak_bytes"] / mem["predicted_peak_bytes"] - 1) < 0.25
    # --fit: a budget a batch of 1000 does not fit; fit shrinks it and the run fits. (This used a large
    # --eval-batch-size until evaluation buffers were sized by the rows they evaluate, so it no longer costs.)
    # --method set, the default when this was written: under ctre-sim the shrunk run's measured peak exceeded
    # this budget by 0.3% once (the planner under-predicts ctre-sim here by about 10%; not fixed yet).
    prof = write_profile(tmp_path / "tighter.toml", 228)
    args = [*warm_cache, "train", "--profile", str(prof), "--hidden", "4000,4000", "--epochs", "2",
            "--batch-size", "1000", "--method", "set",
            "--json", "--quiet"]
    assert cli(*args).returncode == 3
    r = cli(*args, "--fit")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["memory"]["fit_changes"] and doc["memory"]["measured_peak_bytes"] <= doc["memory"]["budget_bytes"]
    assert "--fit changed" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("profile, hidden", [("rpi-zero-2w", "1000,1000,1000"), ("rpi-3b-plus", "1000,1000,1000")])
def test_mnist_on_small_pi_profiles(profile, hidden, warm_cache):
    """Issue 4 acceptance: MNIST 784-1000-1000-1000-10 at epsilon 1 within the device budget, and the
    prediction within 25% of the measured peak (2 epochs; the peak is reached in the first)."""
    mnist = shared_dataset("mnist.npz")
    evict_library_pages()
    r = cli(*warm_cache, "train", "--profile", profile, "--data", str(mnist), "--method", "set", "--hidden", hidden,
            "--epochs", "2", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    mem = json.loads(r.stdout)["memory"]
    ratio = mem["measured_peak_bytes"] / mem["predicted_peak_bytes"]
    print(f"{profile}: measured {mem['measured_peak_bytes'] / MiB:.0f} MiB, predicted "
          f"{mem['predicted_peak_bytes'] / MiB:.0f} MiB (ratio {ratio:.2f}), "
          f"budget {mem['budget_bytes'] / MiB:.0f} MiB")
    assert mem["measured_peak_bytes"] < mem["budget_bytes"]
    assert abs(ratio - 1) < 0.25


def test_the_plan_counts_scipy_when_numba_will_import_it(monkeypatch):
    """numba imports scipy when it is installed; the plan then has a part for it, and warmup's plan too."""
    from dataclasses import replace

    from ctre_edge import budget, warmup
    from ctre_edge.errors import BudgetError
    from ctre_edge.profiles import load_profile

    shape = budget.RunShape(sizes=[64, 100, 10], epsilon=2.0, method="set", batch_size=50, eval_batch_size=100,
                            similarity_samples=100, n_train=1000, n_val=100, n_test=200, data_bytes=64000)
    monkeypatch.setattr(budget, "scipy_installed", lambda: False)
    without = budget.plan_training(shape)
    monkeypatch.setattr(budget, "scipy_installed", lambda: True)
    with_scipy = budget.plan_training(shape)
    assert "scipy" not in without.parts and with_scipy.parts["scipy"] == budget.SCIPY_BYTES
    assert with_scipy.total == without.total + budget.SCIPY_BYTES
    # a profile whose usable budget holds the largest warm-up step without scipy, but not with it
    step = warmup.WARMUP_STEP_PEAK_BYTES
    tight = replace(load_profile("rpi-zero-2w"), name="tight", train_budget_bytes=int((step + (8 << 20)) / 0.9))
    monkeypatch.setattr(warmup, "scipy_installed", lambda: False)
    assert warmup.plan_warmup(tight) == [[i] for i in range(len(warmup.STEPS))]
    monkeypatch.setattr(warmup, "scipy_installed", lambda: True)
    with pytest.raises(BudgetError, match="one step at a time"):
        warmup.plan_warmup(tight)


def test_the_8bit_prefilter_is_planned_only_where_the_run_uses_it():
    from ctre_edge.budget import INT8_RUNTIME_BYTES
    from ctre_edge.packed import INT8_MIN_PRODUCT, uses_int8_codes

    # MNIST's network at the default S uses it; a small one does not, nor does a sketch run.
    assert uses_int8_codes([784, 1000, 1000, 1000, 10], 1000, 32 << 20)
    assert not uses_int8_codes([64, 100, 10], 1000, 32 << 20)
    assert 784 * 1000 * 1000 >= INT8_MIN_PRODUCT > 64 * 100 * 1000
    base = plan_training(shape())
    assert base.parts["onnxruntime"] == INT8_RUNTIME_BYTES
    sketch = plan_training(shape(sketch_dim=64))
    assert "onnxruntime" not in sketch.parts
    # Each level's codes (S bytes a neuron) and stats are held beside its activations; with a
    # workspace too small for any level's codes, neither they nor onnxruntime.
    without = plan_training(shape(similarity_workspace_mib=0))
    assert "onnxruntime" not in without.parts
    assert base.parts["similarity"] - without.parts["similarity"] >= (1000 + 32) * (784 + 3000 + 10)
