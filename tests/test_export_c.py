"""Issue 16: the C export (ctre_edge.export_c) compiled by the host compiler and, where the tools exist,
by arm-none-eabi-gcc for Cortex-M7 and run on QEMU, against onnxruntime, the int8 twin and the planner.

Exported files stay under tmp_path, so a failing comparison leaves the C source to inspect.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctre_edge.cli import app
from ctre_edge.data import load_data
from ctre_edge.errors import ConfigError, OutputExistsError
from ctre_edge.export import export_onnx
from ctre_edge.export_c import (
    c_name,
    c_paths,
    export_c,
    generate_c,
    infer_format,
    own_test_split,
    predict_int8,
    quantize_layer,
)
from ctre_edge.layers import SparseLayer, erdos_renyi_layer
from ctre_edge.mcu_plan import c_int_type, plan_c
from ctre_edge.model import SparseMLP
from ctre_edge.runtime import OnnxModel
from ctre_edge.train import TrainConfig, train

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
from mcu_check import HOST_FLAGS, arm_size, missing_tools, run_host  # noqa: E402

TOL = 1e-5
METHODS = ("static", "set", "ctre-sim", "ctre-seq")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler (cc) on this machine")
needs_arm = pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None,
                               reason="arm-none-eabi-gcc not found (apt-get install gcc-arm-none-eabi "
                                      "libnewlib-arm-none-eabi)")
runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    return load_data("builtin:digits")


_trained = {}


def trained(digits, method, shape):
    """A model of ``shape`` trained briefly: "wide" 64-1000-1000-1000-10 at epsilon 1, "narrow" 64-32-10 at
    epsilon 5 (at epsilon 1 its first layer has 96 connections and its outputs stay close to ties)."""
    key = (method, shape)
    if key not in _trained:
        hidden, epochs, epsilon = ((1000, 1000, 1000), 4, 1.0) if shape == "wide" else ((32,), 40, 5.0)
        config = TrainConfig(hidden=hidden, epsilon=epsilon, method=method, epochs=epochs, seed=0,
                             similarity_samples=200)
        _trained[key] = train(digits, config).model
    return _trained[key]


def random_model(sizes, epsilon, seed=0, classes=None):
    rng = np.random.default_rng(seed)
    layers = [erdos_renyi_layer(a, b, epsilon, rng)._replace(bias=rng.normal(0, 0.3, b).astype(np.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    return SparseMLP(layers, rng.normal(0, 1, sizes[0]).astype(np.float32),
                     rng.uniform(0.5, 2, sizes[0]).astype(np.float32), classes or list(range(sizes[-1])),
                     {"method": "set", "epsilon": epsilon}, {"test_accuracy": 0.5})


def onnx_proba(model, X, tmp_path):
    export_onnx(model, tmp_path / "m.onnx", force=True)
    return OnnxModel(tmp_path / "m.onnx").predict_proba(X)


@needs_cc
@pytest.mark.parametrize("shape", [pytest.param("wide", marks=pytest.mark.slow), "narrow"])
@pytest.mark.parametrize("method", METHODS)
def test_host_build_matches_onnxruntime(digits, method, shape, tmp_path):
    model = trained(digits, method, shape)
    X = digits.X[:1000].astype(np.float32)
    want = onnx_proba(model, X, tmp_path)
    report = export_c(model, tmp_path / "model.c")
    labels, proba = run_host(report, X, 10, tmp_path)
    diff = float(np.abs(proba - want).max())
    assert diff <= TOL, f"{method} {shape}: max |C - onnxruntime| {diff:.2e}; source kept at {report['source']}"
    decided = np.diff(np.sort(want, axis=1)[:, -2:], axis=1)[:, 0] > TOL  # near-ties may break either way
    np.testing.assert_array_equal(labels[decided], np.argmax(want, axis=1)[decided])

    r8 = export_c(model, tmp_path / "model8.c", quantize="int8")
    labels8, proba8 = run_host(r8, X, 10, tmp_path)
    same = labels8 == np.argmax(want, axis=1)
    truth = digits.y[:1000]
    print(f"{method} {shape}: float32 max diff {diff:.1e}; int8 labels agree {same.mean():.1%}; accuracy on these "
          f"1000 samples {np.mean(labels == truth):.4f} (float32) -> {np.mean(labels8 == truth):.4f} (int8)")
    # Four epochs leave the wide net near chance, its outputs so close to uniform that any rounding flips labels:
    # there labels count only where float32 is at least 0.01 ahead (test_int8_on_a_wide_net_that_learned checks
    # all labels of a trained one). The narrow net learns in these epochs, so all its labels count.
    clear = np.diff(np.sort(want, axis=1)[:, -2:], axis=1)[:, 0] >= (0.01 if shape == "wide" else 0)
    if clear.any():
        assert same[clear].mean() >= 0.99, \
            f"int8 labels agree with onnxruntime on {same[clear].mean():.1%}; source kept at {r8['source']}"
    twin = predict_int8(model, X)  # the numpy twin computes what the C code computes
    assert float(np.abs(proba8 - twin).max()) <= 1e-6
    np.testing.assert_array_equal(labels8, np.argmax(twin, axis=1))


def declared_types(source):
    """{array name: C type} of the const arrays of a generated source."""
    return {name: ctype for ctype, name in re.findall(r"static const (\w+) (\w+)\[", source)}


@needs_cc
@pytest.mark.slow
def test_int8_on_a_wide_net_that_learned(digits, tmp_path):
    model = train(digits, TrainConfig(hidden=(1000, 1000, 1000), epsilon=1.0, method="ctre-sim", epochs=60, seed=0,
                                      similarity_samples=200)).model
    assert model.metrics["test_accuracy"] > 0.8
    X = digits.X[:1000].astype(np.float32)
    want = onnx_proba(model, X, tmp_path)
    labels, proba = run_host(export_c(model, tmp_path / "f.c"), X, 10, tmp_path)
    assert float(np.abs(proba - want).max()) <= TOL
    report = export_c(model, tmp_path / "q.c", quantize="int8", check=own_test_split(model, digits))
    labels8, _ = run_host(report, X, 10, tmp_path)
    agree = float(np.mean(labels8 == np.argmax(want, axis=1)))
    print(f"ctre-sim wide, 60 epochs: int8 labels agree {agree:.1%}; test split accuracy "
          f"{report['accuracy_float32']:.4f} (float32) -> {report['accuracy_int8']:.4f} (int8)")
    assert agree >= 0.99 and report["split_matches_training"]
    assert abs(report["accuracy_int8"] - report["accuracy_float32"]) <= 0.02


@needs_cc
def test_index_types_are_the_smallest_that_hold_them(tmp_path):
    assert [c_int_type(v)[0] for v in (0, 255, 256, 65535, 65536)] == ["uint8_t"] * 2 + ["uint16_t"] * 2 + ["uint32_t"]
    # layer0: 300 outputs (uint16), 266 connections (uint16 row starts); layer1: 10 outputs (uint8)
    model = random_model([20, 300, 10], 0.83, seed=3)
    assert min(model.nnz) > 255
    _, source = generate_c(model, "m")
    declared = declared_types(source)
    assert declared["layer0_row_start"] == "uint16_t" and declared["layer0_output"] == "uint16_t"
    assert declared["layer1_row_start"] == "uint16_t" and declared["layer1_output"] == "uint8_t"
    # a layer with more than 65,535 connections needs 32-bit row starts
    wide = random_model([2, 40000, 2], 1.0)
    assert wide.nnz[0] == 40002 and wide.nnz[1] == 40002
    _, source = generate_c(wide, "w")
    declared = declared_types(source)
    assert declared["layer0_row_start"] == "uint16_t" and declared["layer1_output"] == "uint8_t"
    X = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32) / wide.scale + wide.shift
    labels, proba = run_host(export_c(wide, tmp_path / "w.c"), X, 2, tmp_path)
    assert np.abs(proba - wide.predict_proba(X)).max() <= TOL
    many = SparseLayer(70000, 2, np.arange(70001, dtype=np.int64), np.zeros(70000, np.int32),
                       np.ones(70000, np.float32), np.zeros(2, np.float32))
    m = SparseMLP([many], np.zeros(70000, np.float32), np.ones(70000, np.float32), [0, 1])
    declared = declared_types(generate_c(m, "big")[1])
    assert declared["layer0_row_start"] == "uint32_t" and declared["layer0_output"] == "uint8_t"


@needs_cc
def test_same_model_same_bytes_and_a_readable_header(tmp_path):
    model = random_model([64, 100, 100, 10], 2.0, classes=["cat", 'say "hi"', "caf\u00e9", "a\\b"] + list("efghij"))
    (tmp_path / "a").mkdir()
    a = export_c(model, tmp_path / "a" / "net.c")
    b = export_c(model, tmp_path / "net.h")  # .h names the same pair
    for key in ("header", "source"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    header = Path(b["header"]).read_text()
    for text in ("ctre-edge", "64-100-100-10", "method set", "epsilon 2.0", "test accuracy 0.5000",
                 "64 features", "10 classes", "density", "float32", "int net_predict(const float *x, float *probabilities);",
                 "#define NET_N_CLASSES 10"):
        assert text in header, text
    # the class names table holds the labels exactly, whatever characters they have
    main = tmp_path / "names.c"
    main.write_text('#include <stdio.h>\n#include "net.h"\nint main(void) { int i; for (i = 0; i < NET_N_CLASSES; i++) '
                    '{ fputs(net_class_names[i], stdout); putchar(10); } return 0; }\n')
    exe = tmp_path / "names"
    subprocess.run(["cc", *HOST_FLAGS, "-o", str(exe), str(main), b["source"], "-lm"], check=True)
    assert subprocess.run([str(exe)], capture_output=True, check=True).stdout.decode("utf-8").splitlines() == \
        [str(c) for c in model.classes]
    # no heap, no external function but expf (and what a compiler may emit for loops)
    obj = tmp_path / "net.o"
    subprocess.run(["cc", *HOST_FLAGS, "-c", b["source"], "-o", str(obj)], check=True)
    undefined = set(subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout.split()) - {"U"}
    assert undefined <= {"expf", "memset", "memcpy"}, undefined
    source = Path(b["source"]).read_text()
    assert "malloc" not in source and "static float workspace_a[MAX_WIDTH];" in source
    assert re.search(r"\bnet_predict\b[^;]*\{[^}]*\bnet_predict\(", source) is None  # no recursion


def test_c_names_and_paths():
    assert c_name("out/2-digits v1.c") == "m_2_digits_v1"
    assert c_paths("out/net.c") == (Path("out/net.h"), Path("out/net.c"))
    assert c_paths("out/net") == (Path("out/net.h"), Path("out/net.c"))
    assert infer_format("m.c", None) == "c" and infer_format("m.h", None) == "c"
    assert infer_format("m.onnx", None) == "onnx" and infer_format("m.bin", "c") == "c"
    with pytest.raises(ConfigError, match="--format must be one of onnx, c; got 'tflite'"):
        infer_format("m.bin", "tflite")
    with pytest.raises(ConfigError, match="does not match"):
        infer_format("m.onnx", "c")
    with pytest.raises(ConfigError, match="name must be a C identifier"):
        generate_c(random_model([4, 3, 2], 1.0), "2bad")


def test_int8_weights_and_accumulator_bounds():
    layer = random_model([64, 100, 10], 3.0).layers[0]
    q, scale = quantize_layer(layer)
    assert q.dtype == np.int8 and scale.shape == (100,) and np.abs(q).max() == 127
    error = np.abs(q.astype(np.float64) * scale[layer.indices] - layer.values)
    assert np.all(error <= scale[layer.indices] / 2 * (1 + 1e-6))
    # a neuron with more than 2^31 / 127^2 inputs could overflow the int32 accumulator
    n = 140_000
    fan = SparseLayer(n, 1, np.arange(n + 1, dtype=np.int64), np.zeros(n, np.int32), np.ones(n, np.float32),
                      np.zeros(1, np.float32))
    m = SparseMLP([fan, SparseLayer(1, 2, np.array([0, 2]), np.array([0, 1], np.int32), np.ones(2, np.float32),
                                    np.zeros(2, np.float32))], np.zeros(n, np.float32), np.ones(n, np.float32), [0, 1])
    generate_c(m, "ok")  # float32 is fine
    with pytest.raises(ConfigError, match="overflow the int32 accumulator"):
        generate_c(m, "no", "int8")


def test_plan_counts_what_the_generator_writes():
    model = random_model([64, 1000, 1000, 10], 1.0)
    plan = plan_c(model.sizes, model.nnz)
    assert plan.flash["weights"] == 4 * sum(model.nnz)
    assert plan.ram["workspace"] == 2 * 4 * 1000
    q = plan_c(model.sizes, model.nnz, "int8")
    assert q.flash["weights"] == sum((z + 3) // 4 * 4 for z in model.nnz) + 4 * (1000 + 1000 + 10)
    assert q.flash_total < plan.flash_total and q.ram["workspace"] == 1000 + 8 * 1000


@needs_arm
def test_planner_matches_arm_none_eabi_size(tmp_path):
    shapes = [([64, 32, 10], 1.0), ([64, 1000, 1000, 1000, 10], 1.0), ([784, 300, 100, 10], 5.0), ([20, 5, 3], 1.0)]
    for sizes, eps in shapes:
        model = random_model(sizes, eps)
        for quantize in ("none", "int8"):
            report = export_c(model, tmp_path / "m.c", quantize=quantize, force=True)
            obj = tmp_path / "m.o"
            subprocess.run(["arm-none-eabi-gcc", "-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16",
                            "-Os", "-std=c99", "-Wall", "-Wextra", "-Werror", "-c", report["source"], "-o", str(obj)],
                           check=True)
            size, plan = arm_size(obj), report["memory"]
            flash_ratio = (size["text"] + size["data"]) / plan["flash_bytes"]
            assert 0.9 <= flash_ratio <= 1.1, (sizes, quantize, size, plan)
            assert size["bss"] == plan["ram"]["workspace"], (sizes, quantize, size, plan)
            symbols = subprocess.run(["arm-none-eabi-nm", str(obj)], capture_output=True, text=True).stdout
            assert "malloc" not in symbols


@pytest.mark.slow
def test_emulated_cortex_m7_matches_onnxruntime(digits, tmp_path):
    reason = missing_tools()
    if reason:
        pytest.skip(f"emulated check skipped: {reason}")
    model_path = tmp_path / "narrow.ctre"
    trained(digits, "ctre-sim", "narrow").save(model_path)
    r = subprocess.run([sys.executable, str(TOOLS / "mcu_check.py"), "--model", str(model_path), "--samples", "300",
                        "--json", "--keep", str(tmp_path / "build")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert [row["quantize"] for row in rows] == ["none", "int8"]
    for row in rows:
        assert row["labels_equal_reference"] == 1.0 and row["max_abs_diff_reference"] <= TOL, row
        assert row["heap_symbols"] == [] and set(row["undefined"]) <= {"expf", "memset", "memcpy"}, row
        assert 0.9 <= row["flash_ratio"] <= 1.1 and row["workspace_ratio"] == 1.0, row
        assert 0 < row["stack_measured"] <= row["planned_stack"], row
        assert row["instructions_per_inference"] > 0 and row.get("bit_identical_to_host", True), row
    assert rows[0]["labels_equal_onnxruntime"] == 1.0
    assert rows[1]["labels_equal_onnxruntime"] >= 0.99


def cli(*args):
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.slow
def test_rp2350_refuses_a_model_too_big_and_names_the_fix(digits, tmp_path):
    big = tmp_path / "big.ctre"
    train(digits, TrainConfig(hidden=(1000, 1000, 1000), epsilon=10.0, epochs=1, seed=0)).model.save(big)
    code, _, err = cli("export", str(big), str(tmp_path / "big.c"), "--profile", "rp2350")
    assert code == 3 and err.count("\n") == 1, err
    assert "rp2350" in err and "flash" in err and "float32 weights" in err
    assert "--quantize int8 fits" in err and "--epsilon" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.ctre"]  # nothing written
    code, _, err = cli("export", str(big), str(tmp_path / "big.c"), "--profile", "rp2350", "--quantize", "int8",
                       "--data", "builtin:digits")
    assert code == 0, err
    assert "rp2350 allows" in err and "test accuracy" in err and "points on the model's test split" in err
    eps = float(re.search(r"--epsilon ([0-9.]+) or lower", cli("export", str(big), str(tmp_path / "x.c"),
                                                                  "--profile", "rp2350")[2]).group(1))
    lower = tmp_path / "lower.ctre"
    train(digits, TrainConfig(hidden=(1000, 1000, 1000), epsilon=eps, epochs=1, seed=0)).model.save(lower)
    code, _, err = cli("export", str(lower), str(tmp_path / "lower.c"), "--profile", "rp2350")
    assert code == 0, err
    code, out, _ = cli("plan", "--profile", "rp2350", "--hidden", "1000,1000,1000", "--epsilon", "10", "--json")
    assert code == 3


def test_exporter_rejects_bad_input_with_one_line(tmp_path):
    model = random_model([64, 32, 10], 1.0)
    path = tmp_path / "m.ctre"
    model.save(path)
    (tmp_path / "cut.ctre").write_bytes(path.read_bytes()[:200])
    (tmp_path / "taken.h").write_text("precious")
    cases = [
        (["export", str(tmp_path / "cut.ctre"), str(tmp_path / "a.c")], 5, "corrupt"),
        (["export", str(tmp_path / "none.ctre"), str(tmp_path / "a.c")], 5, "not found"),
        (["export", str(path), str(tmp_path / "a.bin"), "--format", "tflite"], 2, "--format must be one of"),
        (["export", str(path), str(tmp_path / "a.onnx"), "--format", "c"], 2, "does not match"),
        (["export", str(path), str(tmp_path / "a.c"), "--quantize", "int4"], 2, "--quantize must be one of"),
        (["export", str(path), str(tmp_path / "a.onnx"), "--quantize", "int8"], 2, "apply to the C export"),
        (["export", str(path), str(tmp_path / "taken.c")], 6, "--force"),
        (["export", str(path), str(tmp_path / "a.c"), "--data", "builtin:nope"], 4, ""),
    ]
    for args, want, text in cases:
        code, _, err = cli(*args)
        assert code == want, (args, err)
        assert text in err and "Traceback" not in err and err.strip().count("\n") == 0, (args, err)
    assert (tmp_path / "taken.h").read_text() == "precious" and not (tmp_path / "taken.c").exists()
    assert not (tmp_path / "a.c").exists() and not (tmp_path / "a.h").exists()
    code, _, err = cli("export", str(path), str(tmp_path / "taken.c"), "--force")
    assert code == 0 and (tmp_path / "taken.h").read_text().startswith("/*")
    with pytest.raises(OutputExistsError):
        export_c(model, tmp_path / "taken.c")


def test_own_test_split_is_the_one_train_measured(digits):
    model = trained(digits, "set", "narrow")
    X, labels = own_test_split(model, digits)
    acc = np.mean(np.asarray(model.predict(X)) == np.asarray(labels))
    assert acc == pytest.approx(model.metrics["test_accuracy"], abs=1e-12)
    with pytest.raises(ConfigError, match="features"):
        own_test_split(random_model([20, 5, 10], 1.0), digits)
