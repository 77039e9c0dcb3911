"""A scikit-learn classifier over the same engine as the CLI; scikit-learn itself is optional.

With scikit-learn installed (``pip install ctre-edge[sklearn]``) ``SparseMLPClassifier`` derives from
``ClassifierMixin`` and ``BaseEstimator`` and validates its input with scikit-learn's own
``validate_data``: it passes ``sklearn.utils.estimator_checks.check_estimator`` (tests/test_sklearn.py)
and works in ``Pipeline``, ``GridSearchCV``, ``cross_val_score`` and ``clone``, with pandas
DataFrames (``feature_names_in_``). Without scikit-learn it keeps the same methods, attributes and
error messages through small fallbacks in this module; nothing else in the package imports it.

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

import inspect
from dataclasses import fields

import numpy as np

from . import run
from .config import TrainConfig
from .model import SparseMLP

try:  # the optional `sklearn` extra: with it the classifier is a scikit-learn estimator
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data

    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False

# The training settings are TrainConfig's fields, except the test split: ``fit`` trains (and
# validates) on all the samples it is given and tests on ``X_test``/``y_test`` when they are passed.
CONFIG_PARAMS = tuple(f.name for f in fields(TrainConfig) if f.name != "test_fraction")
PARAMS = CONFIG_PARAMS + ("warm_start",)

# scikit-learn checks this estimator does not pass, with the reason; tests/test_sklearn.py gives it
# to check_estimator(expected_failed_checks=...). Empty: every check passes.
EXPECTED_FAILED_CHECKS: dict[str, str] = {}

if not HAVE_SKLEARN:

    class NotFittedError(ValueError, AttributeError):
        """Raised by predict and friends before ``fit`` (scikit-learn's own class when it is installed)."""

    class BaseEstimator:
        """The part of scikit-learn's BaseEstimator the classifier needs: parameters by name."""

        def get_params(self, deep: bool = True) -> dict:
            return {name: getattr(self, name) for name in PARAMS}

        def set_params(self, **params):
            for k, v in params.items():
                if k not in PARAMS:
                    raise ValueError(f"Invalid parameter {k!r} for estimator {type(self).__name__}; "
                                     f"valid parameters are: {', '.join(PARAMS)}")
                setattr(self, k, v)
            return self

        def __repr__(self) -> str:
            changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v != _DEFAULTS[k]]
            return f"{type(self).__name__}({', '.join(changed)})"

    class ClassifierMixin:
        def score(self, X, y) -> float:
            """Mean accuracy of ``predict(X)`` against ``y``."""
            return float(np.mean(self.predict(X) == np.asarray(y)))


class SparseMLPClassifier(ClassifierMixin, BaseEstimator):
    """Sparse MLP trained with CTRE or SET; the training settings are ``TrainConfig``'s fields.

    ``fit`` uses all given samples for training and validation (pass ``X_test``/``y_test`` to have
    ``test_accuracy_`` computed at the best epoch), through the same run layer as ``ctre-edge
    train`` (``run.py``): with ``profile``, a run that does not fit the device is refused with the
    same BudgetError, and ``fit_to_profile`` shrinks it as ``--fit`` does.

    Parameters
    ----------
    hidden, method, epsilon, ... : see ``ctre_edge.config.TrainConfig`` (same names, same defaults).
    warm_start : bool, default=False
        When True, ``fit`` on a fitted classifier continues its model (weights, topology and input
        scaling) on the new data instead of starting over, as ``partial_fit`` does.

    Attributes
    ----------
    model_ : SparseMLP
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of str, only when X had string column names (a DataFrame)
    history_ : list of EpochStats
    best_epoch_ : int
    test_accuracy_ : float or None
    fit_changes_ : list of str
        The settings ``profile`` changed, as CLI flags.
    """

    def __init__(self, *, hidden=(1000, 1000, 1000), method="ctre-sim", epsilon=1.0, init="sparse", zeta=0.2,
                 epochs=300, early_stop=30, batch_size=100, lr=0.05, momentum=0.9, l2=1e-4, lr_drop_epoch=None,
                 seed=0, scaling="auto", validation_fraction=0.1, patience=40, similarity="exact",
                 similarity_samples=1000, similarity_workspace_mib=32, sketch_dim=256,
                 eval_batch_size=1000, warm_start=False):
        self.hidden = hidden
        self.method = method
        self.epsilon = epsilon
        self.init = init
        self.zeta = zeta
        self.epochs = epochs
        self.early_stop = early_stop
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.l2 = l2
        self.lr_drop_epoch = lr_drop_epoch
        self.seed = seed
        self.scaling = scaling
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.similarity = similarity
        self.similarity_samples = similarity_samples
        self.similarity_workspace_mib = similarity_workspace_mib
        self.sketch_dim = sketch_dim
        self.eval_batch_size = eval_batch_size
        self.warm_start = warm_start

    def fit(self, X, y, X_test=None, y_test=None, progress=None, *, profile=None,
            fit_to_profile: bool = False) -> "SparseMLPClassifier":
        """Train on (X, y); ``profile`` is a device profile name, a .toml path or a Profile.

        With ``warm_start=True`` and a fitted model, continues that model (see ``partial_fit``).
        Attributes set: ``model_``, ``classes_``, ``n_features_in_``, ``history_``, ``best_epoch_``,
        ``test_accuracy_`` and ``fit_changes_``.
        """
        start = self.model_ if self.warm_start and hasattr(self, "model_") else None
        return self._fit(X, y, X_test, y_test, progress, profile, fit_to_profile, start)

    def partial_fit(self, X, y, classes=None, *, progress=None, profile=None,
                    fit_to_profile: bool = False) -> "SparseMLPClassifier":
        """Continue the fitted model on new samples (X, y): one training run of ``epochs`` (with
        ``early_stop``) from its current weights, topology and input scaling, topology evolution
        included, deterministic for a given ``seed``. ``y`` may hold a subset of ``classes_`` but no
        new class. On an unfitted classifier it is ``fit``; ``classes``, if given, must then be the
        classes present in ``y`` (a network's output units are fixed when it is created).
        """
        if not hasattr(self, "model_"):
            if classes is not None:
                given, present = np.unique(np.asarray(classes)), np.unique(np.asarray(y))
                if given.shape != present.shape or np.any(given != present):
                    raise ValueError(f"classes={given.tolist()} but the first partial_fit's y holds "
                                     f"{present.tolist()}; the first call needs samples of every class")
            return self._fit(X, y, None, None, progress, profile, fit_to_profile, None)
        return self._fit(X, y, None, None, progress, profile, fit_to_profile, self.model_)

    def _fit(self, X, y, X_test, y_test, progress, profile, fit_to_profile, start: SparseMLP | None):
        X, y = self._validate(X, y, reset=start is None)
        if HAVE_SKLEARN:
            check_classification_targets(y)
        if y.dtype.kind == "O" and all(isinstance(v, str) for v in y):
            y = y.astype(str)
        if X.shape[0] < 2:
            raise ValueError(f"X has {X.shape[0]} sample(s); a classifier needs at least two samples of each class")
        if X_test is not None:
            X_test = self._validate(X_test, reset=False, name="X_test")
        config = TrainConfig(**{name: getattr(self, name) for name in CONFIG_PARAMS}, test_fraction=0.0)
        data = run.DataSpec("fit", arrays=(X, y, X_test, y_test))
        prepared = run.prepare(config, data, profile, fit_to_profile, start_from=start)
        result = run.execute(prepared, source="fit", progress=progress).result
        self.fit_changes_ = prepared.changes
        self._set_model(result.model)
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.test_accuracy_ = result.test_accuracy
        return self

    def _validate(self, X, y="no_validation", *, reset: bool, name: str = "X"):
        """scikit-learn's ``validate_data`` when installed; else the same checks and messages here.

        ``y`` "no_validation" (scikit-learn's sentinel) validates X alone; None is a missing y.
        """
        if HAVE_SKLEARN and name == "X":
            return validate_data(self, X, y, dtype="numeric", reset=reset)
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        names = _feature_names(X)
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"Expected 2D array for {name}, got {X.ndim}D array instead: reshape it with "
                             f"{name}.reshape(-1, 1) if it has a single feature or {name}.reshape(1, -1) "
                             "if it holds a single sample")
        if X.dtype.kind == "O":
            X = X.astype(np.float64)
        if X.dtype.kind == "f" and not np.all(np.isfinite(X)):
            raise ValueError(f"Input {name} contains NaN or infinity; clean it or impute the missing values")
        if reset:
            self.n_features_in_ = X.shape[1]
            if names is not None:
                self.feature_names_in_ = names
            elif hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        else:
            if X.shape[1] != self.n_features_in_:
                raise ValueError(f"{name} has {X.shape[1]} features, but {type(self).__name__} is expecting "
                                 f"{self.n_features_in_} features as input.")
            fitted = getattr(self, "feature_names_in_", None)
            if fitted is not None and names is not None and list(names) != list(fitted):
                raise ValueError(f"The feature names of {name} should match those that were passed during fit")
        if isinstance(y, str) and y == "no_validation":
            return X
        y = np.asarray(y)
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise ValueError(f"y must hold one label per sample of {name} ({X.shape[0]}), got shape {y.shape}")
        return X, y

    def _set_model(self, model: SparseMLP) -> None:
        self.model_ = model
        self.classes_ = np.asarray(model.classes)
        self.n_features_in_ = model.n_features

    def _check_fitted(self) -> SparseMLP:
        if HAVE_SKLEARN:
            check_is_fitted(self)
        elif not hasattr(self, "model_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; "
                                 "call fit(X, y) or load(path) first")
        return self.model_

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_samples, n_classes), in the order of ``classes_``."""
        model = self._check_fitted()
        return model.predict_proba(self._validate(X, reset=False), self.eval_batch_size)

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample (labels as in ``classes_``)."""
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(proba, axis=1)]

    def save(self, path, *, force: bool = False):
        return self._check_fitted().save(path, force=force)

    @classmethod
    def load(cls, path) -> "SparseMLPClassifier":
        """A fitted classifier from a model written by ``save`` or ``ctre-edge train --out``."""
        model = SparseMLP.load(path)
        config = vars(TrainConfig.from_dict(model.config))
        clf = cls(**{name: config[name] for name in CONFIG_PARAMS})
        clf._set_model(model)
        return clf


def _feature_names(X):
    """A DataFrame's column names when they are all strings (as scikit-learn keeps them), else None."""
    columns = getattr(X, "columns", None)
    if columns is None or not all(isinstance(c, str) for c in columns):
        return None
    return np.asarray(columns, dtype=object)


_DEFAULTS = {name: p.default for name, p in inspect.signature(SparseMLPClassifier).parameters.items()}
