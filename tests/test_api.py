import inspect
from dataclasses import fields

import numpy as np
import pytest

from ctre_edge.api import SparseMLPClassifier
from ctre_edge.config import TrainConfig
from ctre_edge.data import load_data


def test_constructor_defaults_are_train_config_defaults():
    sig = inspect.signature(SparseMLPClassifier.__init__)
    assert set(sig.parameters) - {"self"} == {f.name for f in fields(TrainConfig)} - {"test_fraction"} | {"warm_start"}
    for f in fields(TrainConfig):
        if f.name != "test_fraction":
            assert sig.parameters[f.name].default == f.default, f.name


def test_fit_predict_score_save_load(tmp_path):
    d = load_data("builtin:digits")
    labels = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[d.y]
    clf = SparseMLPClassifier(hidden=(64, 64), epsilon=5, epochs=20, lr=0.05)
    clf.fit(d.X[:1500], labels[:1500], d.X[1500:], labels[1500:])
    assert set(clf.classes_) == set(labels)
    proba = clf.predict_proba(d.X[1500:])
    assert proba.shape == (297, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    assert clf.score(d.X[1500:], labels[1500:]) == pytest.approx(clf.test_accuracy_)
    clf.save(tmp_path / "c.ctre")
    again = SparseMLPClassifier.load(tmp_path / "c.ctre")
    assert again.epochs == 20 and again.hidden == (64, 64)
    np.testing.assert_array_equal(again.predict(d.X[1500:]), clf.predict(d.X[1500:]))


def test_unfitted_and_bad_params():
    with pytest.raises(AttributeError, match="not fitted"):
        SparseMLPClassifier().predict(np.ones((1, 3)))
    with pytest.raises(ValueError, match="'zeta' must be"):
        SparseMLPClassifier(zeta=-1).fit(np.ones((10, 2)), np.arange(10) % 2)
    with pytest.raises(ValueError, match="Invalid parameter 'gamma'"):
        SparseMLPClassifier().set_params(gamma=1)


def test_profile_refuses_an_oversized_run_as_the_cli_does():
    from typer.testing import CliRunner

    from ctre_edge.cli import app
    from ctre_edge.errors import BudgetError

    d = load_data("builtin:digits")
    with pytest.raises(BudgetError) as refused:
        SparseMLPClassifier(hidden=(20000, 20000), epochs=1).fit(d.X, d.y, profile="rpi-zero-2w")
    r = CliRunner().invoke(app, ["train", "--hidden", "20000,20000", "--epochs", "1", "--test-fraction", "0",
                                 "--profile", "rpi-zero-2w"])
    assert r.exit_code == refused.value.exit_code == 3
    assert str(refused.value) in r.stderr


def test_profile_threads_hold_for_the_run_only():
    import numba

    from ctre_edge.profiles import load_profile

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two numba threads")
    numba.set_num_threads(1)
    during = []
    d = load_data("builtin:digits")
    try:
        clf = SparseMLPClassifier(hidden=(16,), epochs=2).fit(
            d.X, d.y, profile="rpi-zero-2w", progress=lambda stats: during.append(numba.get_num_threads()))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert during == [min(load_profile("rpi-zero-2w").threads, numba.config.NUMBA_NUM_THREADS)] * 2
    assert clf.fit_changes_ == ["--similarity-samples 256 (was 1000; the rpi-zero-2w cap)"]
