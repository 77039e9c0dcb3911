"""A scikit-learn style classifier over the same engine as the CLI (no scikit-learn dependency).

Examples
--------
>>> from ctre_edge.api import SparseMLPClassifier
>>> from ctre_edge.data import load_data
>>> d = load_data("builtin:digits")
>>> clf = SparseMLPClassifier(hidden=(64, 64), epsilon=5, epochs=3).fit(d.X, d.y)
>>> clf.predict(d.X[:3]).shape
(3,)
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from .data import make_dataset
from .model import SparseMLP
from .train import TrainConfig, train


class SparseMLPClassifier:
    """Sparse MLP trained with CTRE or SET; constructor arguments are ``TrainConfig``'s fields.

    ``fit`` uses all given samples for training and validation (``test_fraction`` is ignored; pass
    ``X_test``/``y_test`` to ``fit`` to have ``test_accuracy_`` computed at the best epoch).

    Attributes
    ----------
    model_ : SparseMLP
    classes_ : ndarray
    history_ : list of EpochStats
    best_epoch_ : int
    test_accuracy_ : float or None
    """

    def __init__(self, *, hidden=(1000, 1000, 1000), method="ctre-sim", epsilon=1.0, init="sparse", zeta=0.2, epochs=300,
                 early_stop=30, batch_size=100, lr=0.05, momentum=0.9, l2=1e-4, lr_drop_epoch=None, seed=0,
                 scaling="auto",
                 validation_fraction=0.1, test_fraction=0.2, patience=40, similarity="exact",
                 similarity_samples=1000, similarity_workspace_mib=32, sketch_dim=256,
                 eval_batch_size=1000):
        for name, value in locals().items():
            if name != "self":
                setattr(self, name, value)

    def get_params(self, deep: bool = True) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(TrainConfig)}

    def set_params(self, **params) -> "SparseMLPClassifier":
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"unknown parameter {k!r} for SparseMLPClassifier")
            setattr(self, k, v)
        return self

    def fit(self, X, y, X_test=None, y_test=None, progress=None) -> "SparseMLPClassifier":
        config = TrainConfig(**self.get_params()).validate()
        config.test_fraction = 0.0
        result = train(make_dataset(X, y, X_test, y_test, source="fit"), config, progress=progress)
        self._set_model(result.model)
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.test_accuracy_ = result.test_accuracy
        return self

    def _set_model(self, model: SparseMLP) -> None:
        self.model_ = model
        self.classes_ = np.asarray(model.classes)

    def _check_fitted(self) -> SparseMLP:
        if not hasattr(self, "model_"):
            raise AttributeError("this SparseMLPClassifier is not fitted yet; call fit(X, y) or load(path) first")
        return self.model_

    def predict_proba(self, X) -> np.ndarray:
        return self._check_fitted().predict_proba(X, self.eval_batch_size)

    def predict(self, X) -> np.ndarray:
        self._check_fitted()
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def score(self, X, y) -> float:
        """Mean accuracy of ``predict(X)`` against ``y``."""
        return float(np.mean(self.predict(X) == np.asarray(y)))

    def save(self, path, *, force: bool = False):
        return self._check_fitted().save(path, force=force)

    @classmethod
    def load(cls, path) -> "SparseMLPClassifier":
        model = SparseMLP.load(path)
        clf = cls(**vars(TrainConfig.from_dict(model.config)))
        clf._set_model(model)
        return clf
