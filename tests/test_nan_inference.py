"""NaN/Inf at inference: refused as in training, or imputed with the training file's recorded statistics.

Both inference paths are checked: the numpy/numba ``SparseMLP.predict`` and onnxruntime through
``runtime.OnnxModel`` (where the imputation happens, before the graph). The CLI runs as real
subprocesses.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from ctre_edge.data import load_data
from ctre_edge.errors import ConfigError, DataError
from ctre_edge.model import SparseMLP

TRAIN = ["--hidden", "32,32", "--epsilon", "4", "--epochs", "2", "--similarity-samples", "200", "--quiet",
         "--no-checkpoint"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ctre_edge.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ))


def one_line_error(r, code):
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """digits with 5% NaN in the training and the test part, trained with --nan-policy mean, exported."""
    d = tmp_path_factory.mktemp("nan")
    digits = load_data("builtin:digits")
    rng = np.random.default_rng(7)
    X = digits.X.astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    labels = np.asarray(digits.classes)[digits.y]
    np.savez(d / "data.npz", X=X[:1400], y=labels[:1400], X_test=X[1400:], y_test=labels[1400:])
    r = cli("train", "--data", str(d / "data.npz"), "--nan-policy", "mean", "--out", str(d / "m.ctre"), *TRAIN)
    assert r.returncode == 0, r.stderr
    r = cli("export", str(d / "m.ctre"), str(d / "m.onnx"))
    assert r.returncode == 0, r.stderr
    raw = X[1400:]
    np.save(d / "raw.npy", raw)
    imputed = load_data(str(d / "data.npz"), nan_policy="mean")  # the trainer's own imputation
    return d, raw, imputed


def test_model_records_the_training_statistics(trained):
    from ctre_edge.runtime import OnnxModel

    d, _, imputed = trained
    model = SparseMLP.load(d / "m.ctre")
    assert model.nan_policy == "mean"
    np.testing.assert_array_equal(model.nan_fill, imputed.nan_fill)
    onnx_model = OnnxModel(d / "m.onnx")
    assert onnx_model.nan_policy == "mean"
    np.testing.assert_array_equal(onnx_model.nan_fill, imputed.nan_fill)


def test_predict_refuses_nan_with_one_line(trained, tmp_path):
    d, _, _ = trained
    np.save(tmp_path / "allnan.npy", np.full((5, 64), np.nan, np.float32))
    r = cli("predict", str(d / "m.onnx"), "--data", str(tmp_path / "allnan.npy"))
    line = one_line_error(r, 4)
    assert "320 NaN/Inf" in line and "row 1, column 1" in line and "--nan-policy mean" in line
    assert r.stdout == ""
    X = np.ones((3, 64), np.float32)
    X[2, 5] = np.inf
    np.save(tmp_path / "inf.npy", X)
    r = cli("predict", str(d / "m.onnx"), "--data", str(tmp_path / "inf.npy"))
    assert "row 3, column 6" in one_line_error(r, 4)
    # a policy the model has no statistics for is an invalid option, not a silent guess
    line = one_line_error(cli("predict", str(d / "m.onnx"), "--data", str(tmp_path / "allnan.npy"),
                              "--nan-policy", "median"), 2)
    assert "records no median statistics" in line


def test_predict_with_policy_matches_the_trainers_imputation(trained):
    from ctre_edge.runtime import OnnxModel

    d, raw, imputed = trained
    assert np.isnan(raw).any() and np.isfinite(imputed.X_test).all()
    r = cli("predict", str(d / "m.onnx"), "--data", str(d / "raw.npy"), "--nan-policy", "mean", "--json")
    assert r.returncode == 0, r.stderr
    onnx_model = OnnxModel(d / "m.onnx")
    expected = onnx_model.predict(imputed.X_test)
    import json

    assert json.loads(r.stdout)["labels"] == expected.tolist()
    # both paths, in process: bit-identical probabilities to predicting the trainer-imputed rows
    np.testing.assert_array_equal(onnx_model.predict_proba(raw, nan_policy="mean"),
                                  onnx_model.predict_proba(imputed.X_test))
    model = SparseMLP.load(d / "m.ctre")
    np.testing.assert_array_equal(model.predict_proba(raw, nan_policy="mean"), model.predict_proba(imputed.X_test))
    np.testing.assert_array_equal(model.predict(raw, nan_policy="mean"), expected)
    # zero needs no statistics; the raw array is never changed in place
    before = raw.copy()
    zero = np.where(np.isfinite(raw), raw, 0).astype(np.float32)
    np.testing.assert_array_equal(model.predict_proba(raw, nan_policy="zero"), model.predict_proba(zero))
    np.testing.assert_array_equal(onnx_model.predict_proba(raw, nan_policy="zero"), onnx_model.predict_proba(zero))
    np.testing.assert_array_equal(raw, before)


def test_numpy_path_refuses_nan(trained):
    d, raw, _ = trained
    model = SparseMLP.load(d / "m.ctre")
    with pytest.raises(DataError, match=r"NaN/Inf value\(s\), the first at row \d+, column \d+"):
        model.predict(raw)
    with pytest.raises(ConfigError, match="records no median"):
        model.predict(raw, nan_policy="median")


def test_evaluate_uses_the_models_statistics(trained):
    d, _, imputed = trained
    line = one_line_error(cli("evaluate", str(d / "m.ctre"), "--data", str(d / "data.npz")), 4)
    assert "NaN/Inf" in line
    r = cli("evaluate", str(d / "m.ctre"), "--data", str(d / "data.npz"), "--nan-policy", "mean", "--json")
    assert r.returncode == 0, r.stderr
    import json

    model = SparseMLP.load(d / "m.ctre")
    hits = np.mean(model.predict(imputed.X_test) == np.asarray(imputed.classes)[imputed.y_test])
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(hits, abs=1e-12)


def test_default_policy_model_records_nothing():
    digits = load_data("builtin:digits")
    assert digits.nan_policy == "error" and digits.nan_fill is None
    clean = load_data("builtin:digits", nan_policy="median")
    assert clean.nan_policy == "median" and clean.nan_fill.shape == (64,)  # computed on clean data too
    np.testing.assert_array_equal(clean.nan_fill, np.median(digits.X.astype(np.float32), axis=0))
