import inspect
from dataclasses import fields

import numpy as np
import pytest

from ctre_edge.api import SparseMLPClassifier
from ctre_edge.data import load_data
from ctre_edge.train import TrainConfig


def test_constructor_defaults_are_train_config_defaults():
    sig = inspect.signature(SparseMLPClassifier.__init__)
    for f in fields(TrainConfig):
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
    with pytest.raises(ValueError, match="unknown parameter"):
        SparseMLPClassifier().set_params(gamma=1)
