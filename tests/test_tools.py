"""The benchmark and reproduction tools: each runs at its smallest setting and prints a markdown table.

The smoke tests run every tool in a subprocess (as a user would) with tiny settings, a few seconds
each; the fast tests check that the dense-masked baseline of ``tools/bench_train.py`` computes the
same training step as ctre-edge's kernels (``tools/dense_baseline.py``), so the benchmark compares like with like.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `tools` is a package at the repository root, not installed


def run_tool(name: str, *args: str, timeout: float = 120, check: bool = True):
    """Run ``python -m tools.NAME ARGS`` from the repository root, as the README says."""
    r = subprocess.run([sys.executable, "-m", f"tools.{name.removesuffix('.py')}", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{name} {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def table_rows(stdout: str) -> list[list[str]]:
    """The data rows of the first markdown table in ``stdout`` (asserting there is one)."""
    lines = stdout.splitlines()
    seps = [i for i, line in enumerate(lines) if line.startswith("|---")]
    assert seps, f"no markdown table in:\n{stdout}"
    start = seps[0]
    assert lines[start - 1].startswith("| ")
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert rows, f"empty table in:\n{stdout}"
    return rows


@pytest.fixture
def digits_npz(tmp_path):
    """The built-in digits written as an .npz file, so the tools need no shared data folder."""
    from ctre_edge.data import load_data

    d = load_data("builtin:digits")
    path = tmp_path / "digits.npz"
    np.savez(path, X=d.X, y=d.y)
    return path


@pytest.mark.slow
def test_bench_train_smoke():
    # This checkout doubles as the --base checkout: the base column must run through its own child.
    r = run_tool("bench_train.py", "--smoke", "--engines", "ctre,base,dense", "--base", str(REPO), timeout=300)
    phases = table_rows(r.stdout)  # the kernel phase table comes first: one row per layer and thread count
    assert [row[2] for row in phases[:4]] == ["784x64", "64x64", "64x64", "64x10"] and len(phases) % 4 == 0
    assert phases[0][4] == "1"
    assert all(float(row[c]) > 0 for row in phases for c in (5, 6, 7, 8, 9, 10)), phases
    rows = table_rows(r.stdout.split("engines:", 1)[1])
    assert len(rows) == 1 and rows[0][0] == "64"
    assert "GFLOP/s" in r.stdout and "CPU:" in r.stdout.splitlines()[0]
    assert all(cell != "-" for cell in rows[0][3:6]), "every engine must have produced a time"
    assert rows[0][6].endswith("x"), rows[0]  # the speed-up over base


@pytest.mark.slow
def test_reproduce_smoke_writes_json_and_refuses_to_overwrite(tmp_path, digits_npz):
    out = tmp_path / "results.json"
    r = run_tool("reproduce.py", "--smoke", str(digits_npz), "--out", str(out))
    rows = table_rows(r.stdout)
    assert [row[2] for row in rows] == ["ctre-sim", "ctre-seq", "set", "static", "dense"]
    doc = json.loads(out.read_text())
    assert len(doc["runs"]) == 5 and all(0 <= run["test_accuracy"] <= 1 for run in doc["runs"])
    assert doc["summary"][-1]["density"] == 1.0
    before = out.read_bytes()
    again = run_tool("reproduce.py", "--smoke", str(digits_npz), "--out", str(out), check=False)
    assert again.returncode != 0 and "--force" in again.stderr
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_scaling_smoke():
    r = run_tool("scaling.py", "--smoke")
    rows = table_rows(r.stdout)
    assert len(rows) == 1 and rows[0][0] == "64" and rows[0][3] != "-"
    assert "rpi-4b-2gb" in r.stdout


@pytest.mark.slow
def test_bench_layout_smoke():
    table_rows(run_tool("bench_layout.py", "--repeats", "2").stdout)


@pytest.mark.slow
def test_plan_vs_measured_smoke():
    rows = table_rows(run_tool("plan_vs_measured.py", "--quick", "--epochs", "1").stdout)
    assert not [row for row in rows if "failed" in row[-1]]


@pytest.mark.slow
def test_bench_infer_smoke():
    table_rows(run_tool("bench_infer.py", "--smoke").stdout)


# --- the dense-masked baseline computes what ctre-edge computes ------------------------------------------

def test_dense_masked_step_matches_ctre_kernels():
    from ctre_edge import kernels
    from ctre_edge.packed import PackedNet
    from ctre_edge.train import init_layers
    from tools import dense_baseline as bt

    rng = np.random.default_rng(3)
    sizes = [20, 16, 12, 5]
    layers = init_layers(sizes, 3.0, rng)
    layers = [layer._replace(bias=rng.normal(0, 0.1, layer.n_out).astype(np.float32)) for layer in layers]
    net = PackedNet.from_layers(layers)
    dense = bt.DenseMLP(layers)
    X = rng.integers(0, 256, size=(60, sizes[0])).astype(np.uint8)
    y = rng.integers(0, sizes[-1], size=60)
    shift = np.zeros(sizes[0], np.float32)
    scale = np.full(sizes[0], 1 / 255, np.float32)
    order = rng.permutation(60)
    bs = 25  # two full batches and a partial one
    lr, mom, l2 = np.float32(0.05), np.float32(0.9), np.float32(1e-3)
    act = np.empty(int(net.sizes.sum()) * bs, np.float32)
    delta_a = np.empty(int(net.sizes.max()) * bs, np.float32)
    delta_b = np.empty_like(delta_a)
    grad = np.empty(int(np.diff(net.nz_off).max()), np.float32)
    bias_grad = np.empty(int(net.sizes[1:].max()), np.float32)
    no_csc = (np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.int32))
    loss, correct = kernels.train_batches(X, y, order, bs, shift, scale, *net, act, delta_a, delta_b, grad, bias_grad,
                                          *no_csc, lr, mom, l2, 1)
    d_loss = d_correct = 0
    for s in range(0, 60, bs):
        rows = order[s:s + bs]
        part_loss, part_correct = dense.train_batch(bt.scaled(X, rows, shift, scale), y[rows], lr, mom, l2)
        d_loss += part_loss
        d_correct += part_correct
    assert d_loss == pytest.approx(loss, rel=1e-4) and d_correct == correct
    for l in range(len(layers)):
        layer = net.layer(l)
        W = dense.W[l]
        np.testing.assert_allclose(W[layer.rows(), layer.indices], layer.values, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(dense.b[l], layer.bias, rtol=1e-4, atol=1e-6)
        assert np.count_nonzero(W * (1 - dense.M[l])) == 0, "weights outside the mask must stay zero"


def test_dense_masked_set_update_keeps_counts():
    from ctre_edge.train import init_layers
    from tools import dense_baseline as bt

    rng = np.random.default_rng(4)
    dense = bt.DenseMLP(init_layers([30, 40, 6], 2.0, rng))
    before = [int(np.count_nonzero(m)) for m in dense.M]
    kept_weights = [w.copy() for w in dense.W]
    dense.set_update(0.2, rng)
    for l, m in enumerate(dense.M):
        assert int(np.count_nonzero(m)) == before[l]
        assert np.count_nonzero(dense.W[l] * (1 - m)) == 0
        assert np.count_nonzero(dense.V[l] * (1 - m)) == 0
        survived = (m == 1) & (kept_weights[l] != 0) & (dense.W[l] == kept_weights[l])
        assert survived.sum() >= before[l] - int(0.2 * before[l]) - 1  # the 80% strongest are untouched


def test_bench_threads_smoke():
    rows = table_rows(run_tool("bench_threads.py", "--epsilons", "1", "--epochs", "2").stdout)
    assert rows and all(row[-1] == "yes" for row in rows), rows


def test_soak_short_memory_stays_flat():
    """The soak tool at a tenth of its length: RSS after warm-up within 5% in both phases (exit 0)."""
    r = run_tool("soak.py", "--epochs", "50", "--predicts", "1000", "--hidden", "200,200", check=False)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    rows = table_rows(r.stdout)
    phases = [row[0] for row in rows]
    assert phases.count("train") == 11 and phases.count("predict") == 11
    assert "train: RSS after warm-up grew" in r.stdout and "(within 5%)" in r.stdout
    assert all(float(row[2]) > 10 for row in rows)  # real resident sizes in MiB, read from /proc


def test_soak_growth_is_measured_against_the_warm_up_sample():
    from tools.soak import growth

    rows = [(0, 50), (5, 100), (10, 104), (15, 101)]
    warm, last, peak = growth(rows, 5)
    assert warm == 100 and last == pytest.approx(0.01) and peak == pytest.approx(0.04)
    assert growth([(0, 50), (5, 100), (10, 106)], 5)[1] > 0.05  # a 6% rise is caught


def test_continue_halves_smoke():
    r = run_tool("continue_halves.py", "--data", "builtin:digits", "--hidden", "32", "--epochs", "3")
    rows = table_rows(r.stdout)
    assert len(rows) == 1 and rows[0][0] == "builtin:digits" and rows[0][1] == "719 / 719 / 359"
    assert all(0 < float(v) <= 1 for v in rows[0][2:6])


@pytest.mark.slow
def test_bench_ab_against_itself_gives_the_same_bits():
    """Both copies of the kernels train the same network on the same batches: the bits must agree."""
    r = subprocess.run([sys.executable, "-m", "tools.bench_ab", "--base", ".", "--data", "builtin:digits",
                        "--hidden", "40", "--batches", "3", "--passes", "2", "--epsilons", "2", "--threads", "1,2"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and all(row.rstrip().endswith("| yes |") for row in rows), r.stdout


@pytest.mark.slow
def test_bench_update_against_itself_gives_the_same_bits():
    """Both imports of the package update the same trained network with the same draws: same bits."""
    r = subprocess.run([sys.executable, "-m", "tools.bench_update", "--base", ".", "--data", "builtin:digits",
                        "--hidden", "60,60", "--epochs", "2", "--passes", "2", "--epsilon", "5"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 5 |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("| yes |"), r.stdout


def test_bench_update_phases_are_measured():
    """Where one update's time goes: every part is measured, and the sample's start fits in the whole
    (the other parts overlap on the threads, so they are thread time and need not)."""
    r = run_tool("bench_update.py", "--phases", "--data", "builtin:digits", "--hidden", "60,60", "--epochs", "2",
                 "--passes", "3", "--epsilon", "5")
    ms = [float(row[1]) for row in table_rows(r.stdout)]
    assert len(ms) == 4 and all(v > 0 for v in ms), ms
    assert ms[0] < ms[3], ms


def test_bench_scoring_gives_the_same_picks_with_either_prefilter():
    r = run_tool("bench_scoring.py", "--data", "builtin:digits", "--hidden", "60,60", "--epochs", "2",
                 "--repeats", "2")
    rows = table_rows(r.stdout)
    assert len(rows) == 4 and all(row[-1] == "yes" for row in rows[:3]), r.stdout  # three layers, then the sum


def test_bench_huge_smoke():
    r = run_tool("bench_huge.py", "--width", "300", "--epochs", "1", timeout=300)
    rows = table_rows(r.stdout)
    assert len(rows) == 1 and "SYNTHETIC" in r.stdout and "3312-300-300-300-5" in r.stdout
    measured, predicted = float(rows[0][4].replace(",", "")), float(rows[0][5].replace(",", ""))
    assert measured > 0 and predicted > 0 and rows[0][7] == "yes", rows


def test_bench_stride_times_every_stride_with_the_same_bits():
    r = run_tool("bench_stride.py", "--outputs", "64,300", "--per-row", "9", "--repeats", "2")
    rows = table_rows(r.stdout)
    assert [row[0] for row in rows] == ["64", "300"]
    assert all(float(c) > 0 for row in rows for c in row[2:5]) and all(row[5] == "yes" for row in rows), rows
