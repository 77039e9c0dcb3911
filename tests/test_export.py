"""ONNX export (ctre_edge.export) and onnxruntime inference (ctre_edge.runtime) against the trainer.

Every exported file is written under tmp_path, so a failing comparison leaves the .onnx to inspect.
"""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from reference import dense_weights

from ctre_edge.errors import BudgetError, ConfigError, DataError, ModelFileError, OutputExistsError
from ctre_edge.export import KERNELS, build_onnx, choose_kernels, export_onnx, fanin_groups, fanin_widths, max_abs_diff
from ctre_edge.layers import erdos_renyi_layer
from ctre_edge.model import SparseMLP
from ctre_edge.runtime import OnnxModel

TOL = 1e-5
# 64x2000 at 4.8% and 500x10 are small enough for auto to make dense; 2000x500 at 0.75% is not.
SIZES = [64, 2000, 500, 10]


def make_model(sizes, epsilon, seed=0, classes=None):
    """An untrained network with random ER topology, random biases and random input scaling."""
    rng = np.random.default_rng(seed)
    layers = [erdos_renyi_layer(a, b, epsilon, rng)._replace(bias=rng.normal(0, 0.3, b).astype(np.float32))
              for a, b in zip(sizes[:-1], sizes[1:])]
    shift = rng.normal(0, 1, sizes[0]).astype(np.float32)
    scale = rng.uniform(0.5, 2, sizes[0]).astype(np.float32)
    return SparseMLP(layers, shift, scale, classes or list(range(sizes[-1])),
                     {"method": "ctre-sim", "epsilon": epsilon}, {"test_accuracy": 0.5})


def raw_inputs(model, n, seed=1):
    z = np.random.default_rng(seed).standard_normal((n, model.n_features))
    return (model.shift + 2 * z / model.scale).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return make_model(SIZES, 3)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """kernel -> (path, report) for every kernel."""
    out = tmp_path_factory.mktemp("onnx")
    return {k: (out / f"{k}.onnx", export_onnx(model, out / f"{k}.onnx", kernel=k)) for k in KERNELS}


def session(path, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads,repeats", [(1, 1), (4, 5)])
def test_onnxruntime_matches_trainer(model, exported, kernel, threads, repeats):
    path, report = exported[kernel]
    X = raw_inputs(model, 1000)
    want = model.predict_proba(X)
    decided = np.diff(np.sort(want, axis=1)[:, -2:], axis=1)[:, 0] > TOL  # labels of near-ties may differ
    assert decided.mean() > 0.99
    sess = session(path, threads)
    for _ in range(repeats):
        proba, label = sess.run(["probabilities", "label"], {"X": X})
        diff = np.abs(proba - want).max()
        assert diff <= TOL, f"{kernel}, {threads} threads: max |diff| {diff:.2e}; file kept at {path}"
        np.testing.assert_array_equal(label[decided], model.predict(X)[decided])
    assert report["max_abs_diff"] <= TOL


def test_kernels_reported_and_checker(exported, model):
    assert exported["auto"][1]["kernels"] == ["dense", "sparse-ops", "dense"]
    for kernel, (path, report) in exported.items():
        proto = onnx.load(path)
        if kernel == "sparse-initializer":
            assert len(proto.graph.sparse_initializer) == len(model.layers)
            onnx.checker.check_model(proto)
        else:
            assert not proto.graph.sparse_initializer
            onnx.checker.check_model(proto, full_check=True)
        assert report["file_bytes"] == path.stat().st_size
        assert (proto.ir_version, proto.opset_import[0].version) == (7, 13)
        if kernel != "auto":
            assert report["kernels"] == [kernel] * len(model.layers)


def test_metadata(exported, model):
    meta = OnnxModel(exported["auto"][0]).metadata
    assert json.loads(meta["classes"]) == model.classes
    assert json.loads(meta["kernels"]) == ["dense", "sparse-ops", "dense"]
    assert meta["n_features"] == "64" and meta["method"] == "ctre-sim" and meta["epsilon"] == "3"
    assert meta["test_accuracy"] == "0.5" and float(meta["density"]) == pytest.approx(model.density, rel=1e-5)
    import ctre_edge

    assert meta["ctre_edge_version"] == ctre_edge.__version__


def test_runtime_wrapper(exported, model):
    rt = OnnxModel(exported["sparse-ops"][0], threads=2)
    X = raw_inputs(model, 300, seed=5)
    assert rt.n_features == 64 and rt.classes == list(range(10))
    assert np.abs(rt.predict_proba(X) - model.predict_proba(X)).max() <= TOL
    # uint8 and float64 inputs are rounded to float32 the same way as the trainer does
    for Xt in (np.clip(X * 20, 0, 255).astype(np.uint8), X.astype(np.float64)):
        assert np.abs(rt.predict_proba(Xt) - model.predict_proba(Xt)).max() <= TOL
    assert rt.predict(X[0]).shape == (1,)
    assert rt.predict_proba(np.empty((0, 64), np.float32)).shape == (0, 10)


@pytest.mark.parametrize("budget", [0, 100_000, 600_000, 10**9])
def test_auto_respects_budget(model, budget):
    kernels = choose_kernels(model, "auto", budget)
    dense = [4 * L.n_in * L.n_out for L, k in zip(model.layers, kernels) if k != "sparse-ops"]
    assert sum(dense) <= budget
    if budget == 0:
        assert kernels == ["sparse-ops"] * 3


@pytest.mark.parametrize("kernel", ["dense", "sparse-initializer"])
def test_explicit_dense_form_over_budget(model, kernel, tmp_path):
    with pytest.raises(BudgetError, match="over budget_bytes=1000; use kernel"):
        export_onnx(model, tmp_path / "m.onnx", kernel=kernel, budget_bytes=1000)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ConfigError, match="kernel must be one of"):
        build_onnx(model, kernel="csr")
    with pytest.raises(ConfigError, match="opset"):
        build_onnx(model, opset=11)


def test_newer_opset(model, tmp_path):
    report = export_onnx(model, tmp_path / "m.onnx", opset=18)
    assert (report["opset"], report["ir_version"]) == (18, 8)


def test_same_model_same_bytes(tmp_path):
    a, b = make_model(SIZES, 3, seed=7), make_model(SIZES, 3, seed=7)
    export_onnx(a, tmp_path / "a.onnx")
    export_onnx(b, tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_string_labels(tmp_path):
    classes = ["cat", "dog", "bird", "fish", "frog"]
    m = make_model([30, 200, 5], 4, classes=classes)
    export_onnx(m, tmp_path / "s.onnx", kernel="sparse-ops")
    rt = OnnxModel(tmp_path / "s.onnx")
    X = raw_inputs(m, 200)
    assert rt.classes == classes
    np.testing.assert_array_equal(rt.predict(X), m.predict(X))


def test_unreadable_files(exported, tmp_path):
    data = exported["sparse-ops"][0].read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.onnx").write_bytes(b"PK\x03\x04 not an onnx file")
    node = onnx.helper.make_node("Identity", ["X"], ["Y"])
    vi = onnx.helper.make_tensor_value_info
    other = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [vi("X", 1, [2])], [vi("Y", 1, [2])]),
                                   opset_imports=[onnx.helper.make_opsetid("", 13)])
    other.ir_version = 7
    onnx.save(other, tmp_path / "other.onnx")
    for name, message in [("truncated", "not a loadable ONNX model"), ("foreign", "not a loadable ONNX model"),
                          ("other", "not a ctre-edge export"), ("missing", "not found")]:
        with pytest.raises(ModelFileError, match=message) as e:
            OnnxModel(tmp_path / f"{name}.onnx")
        assert "\n" not in str(e.value)


def test_bad_inputs(exported):
    rt = OnnxModel(exported["dense"][0])
    with pytest.raises(DataError, match="expects 64 features per sample, got 63"):
        rt.predict(np.zeros((2, 63), np.float32))
    with pytest.raises(DataError, match="must be numeric"):
        rt.predict_proba(np.full((2, 64), "a"))


def test_existing_output_needs_force(model, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        export_onnx(model, path)
    assert path.read_bytes() == b"old"
    export_onnx(model, path, force=True)
    assert OnnxModel(path).n_features == 64


def test_disagreement_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(SparseMLP, "predict_proba", lambda self, X: np.zeros((len(X), 10), np.float32))
    with pytest.raises(ModelFileError, match="disagrees with the trainer"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_in,n_out,epsilon", [(7, 5, 1), (40, 30, 2), (300, 200, 20), (50, 1, 1)])
def test_fanin_groups_rebuild_the_layer(n_in, n_out, epsilon):
    layer = erdos_renyi_layer(n_in, n_out, epsilon, np.random.default_rng(n_in))
    rebuilt = np.zeros((n_in, n_out))
    slots = 0
    for outputs, inputs, values in fanin_groups(layer):
        np.add.at(rebuilt, (inputs, np.broadcast_to(outputs, inputs.shape)), values)
        slots += inputs.size
    np.testing.assert_array_equal(rebuilt, dense_weights(layer))
    fan = np.maximum(np.bincount(layer.indices, minlength=n_out), 1)
    assert slots <= np.ceil(1.25 * fan).sum() + n_out  # padding stays within the 25% growth of widths


def test_fanin_widths():
    np.testing.assert_array_equal(fanin_widths(12), [1, 2, 3, 4, 5, 7, 9, 12])
    w = fanin_widths(5000)
    assert np.all(np.ceil(w[:-1] * 1.25) >= w[1:] - 1) and w[-1] >= 5000


def test_large_network_is_small_in_file_and_ram(tmp_path):
    m = make_model([784, 10000, 10000, 10000, 10], 1)
    report = export_onnx(m, tmp_path / "big.onnx")
    assert report["kernels"][:3] == ["sparse-ops"] * 3
    assert report["file_bytes"] < 5 * 2**20
    code = (
        "import sys, numpy as np, onnxruntime\n"
        "from ctre_edge.runtime import OnnxModel\n"
        "def rss(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "before = rss(); m = OnnxModel(sys.argv[1]); m.predict_proba(np.zeros((1, 784)))\n"
        "print((rss() - before) / 1024)\n"
    )
    grown = float(subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.onnx")], check=True,
                                 capture_output=True, text=True).stdout)
    assert grown < 50, f"loading the model grew RSS by {grown:.1f} MiB"


def test_runtime_imports_no_trainer():
    code = ("import sys, ctre_edge.runtime\n"
            "bad = [m for m in ('numba', 'onnx', 'ctre_edge.model', 'ctre_edge.kernels', 'ctre_edge.export')"
            " if m in sys.modules]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_max_abs_diff_helper(model, exported):
    data = exported["dense"][0].read_bytes()
    assert max_abs_diff(model, data, raw_inputs(model, 10)) <= TOL


@pytest.fixture(scope="module")
def trained_models():
    """One small model per training method, trained on builtin:digits (issue 5 acceptance)."""
    from ctre_edge.data import load_data
    from ctre_edge.train import TrainConfig, train

    data = load_data("builtin:digits")
    return {m: train(data, TrainConfig(hidden=(200, 100), epsilon=3, epochs=6, method=m, similarity_samples=300,
                                       patience=2)).model
            for m in ("static", "set", "ctre-sim", "ctre-seq")}


@pytest.mark.parametrize("method", ["static", "set", "ctre-sim", "ctre-seq"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_trained_models_export_exactly(trained_models, method, kernel, tmp_path):
    model = trained_models[method]
    path = tmp_path / f"{method}-{kernel}.onnx"
    export_onnx(model, path, kernel=kernel)
    X = np.random.default_rng(3).integers(0, 17, size=(1000, 64)).astype(np.float32)  # raw digits-like pixels
    want = model.predict_proba(X)
    for threads in (1, 3):
        proba = session(path, threads).run(["probabilities"], {"X": X})[0]
        diff = np.abs(proba - want).max()
        assert diff <= TOL, f"{method}/{kernel}, {threads} threads: max |diff| {diff:.2e}; file kept at {path}"
