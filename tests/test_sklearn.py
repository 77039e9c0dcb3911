"""SparseMLPClassifier as a scikit-learn estimator (issue 17), and its fallback without scikit-learn."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ctre_edge.api import EXPECTED_FAILED_CHECKS, HAVE_SKLEARN, SparseMLPClassifier
from ctre_edge.data import load_data
from ctre_edge.errors import DataError

needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed (pip install '.[sklearn]')")

# Small, fast settings for tests; the user-facing defaults (the paper's 1000-1000-1000 network) stay.
TINY = dict(hidden=(16,), epsilon=4, epochs=20, early_stop=0, batch_size=16, similarity_samples=64)


@pytest.fixture(scope="module")
def digits():
    d = load_data("builtin:digits")
    return d.X.astype(np.float64), d.y


def small(**changes):
    return SparseMLPClassifier(**{**TINY, **changes})


@needs_sklearn
def test_passes_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(small(), expected_failed_checks=EXPECTED_FAILED_CHECKS)


@needs_sklearn
def test_derives_from_the_scikit_learn_classes():
    from sklearn.base import BaseEstimator, ClassifierMixin, is_classifier

    clf = SparseMLPClassifier()
    assert isinstance(clf, BaseEstimator) and isinstance(clf, ClassifierMixin) and is_classifier(clf)
    assert repr(small(epochs=3)).startswith("SparseMLPClassifier(")


@needs_sklearn
def test_pipeline_grid_search_cross_val_score_and_clone(digits):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = digits[0][:600], digits[1][:600]
    pipe = make_pipeline(StandardScaler(), small(hidden=(32,), scaling="none"))
    assert pipe.fit(X, y).score(X, y) > 0.8
    scores = cross_val_score(small(hidden=(32,)), X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.7
    grid = GridSearchCV(small(), {"epochs": [1, 15]}, cv=2).fit(X, y)
    assert grid.best_params_ == {"epochs": 15}
    assert grid.best_estimator_.n_features_in_ == 64

    fitted = small(seed=3).fit(X, y)
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and not hasattr(copy, "model_")


@needs_sklearn
def test_string_and_integer_labels_give_the_same_predictions(digits):
    X, y = digits[0][:500], digits[1][:500]
    names = np.array([f"digit-{i}" for i in range(10)])  # sorts as 0..9 do: the same output units
    by_int = small().fit(X, y)
    by_name = small().fit(X, names[y])
    assert by_int.classes_.tolist() == list(range(10))
    assert by_name.classes_.tolist() == names.tolist()
    np.testing.assert_array_equal(names[by_int.predict(X)], by_name.predict(X))
    assert by_name.score(X, names[y]) == pytest.approx(np.mean(by_name.predict(X) == names[y]))
    proba = by_name.predict_proba(X[:7])
    assert proba.shape == (7, 10) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)


@needs_sklearn
def test_dataframe_feature_names_are_kept_and_checked(digits):
    pd = pytest.importorskip("pandas")
    X, y = digits[0][:400], digits[1][:400]
    columns = [f"pixel{i}" for i in range(64)]
    frame = pd.DataFrame(X, columns=columns)
    clf = small().fit(frame, y)
    assert clf.feature_names_in_.tolist() == columns and clf.n_features_in_ == 64
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        np.testing.assert_array_equal(clf.predict(frame), clf.predict(X))
    with pytest.raises(ValueError, match="feature names"):
        clf.predict(frame[columns[::-1]])
    with pytest.warns(UserWarning, match="feature names"):
        small().fit(X, y).predict(frame)


@pytest.mark.parametrize("make_bad, pattern", [
    (lambda X: X[:, :10], r"X has 10 features, but SparseMLPClassifier is expecting 64 features"),
    (lambda X: np.where(np.arange(64) == 5, np.nan, X), r"Input X contains NaN"),
    (lambda X: X[0], r"Expected 2D array"),
])
def test_errors_name_the_argument(digits, make_bad, pattern):
    X, y = digits[0][:300], digits[1][:300]
    clf = small(epochs=2).fit(X, y)
    with pytest.raises(ValueError, match=pattern):
        clf.predict(make_bad(X[:5]))
    if "features" not in pattern:
        with pytest.raises(ValueError, match=pattern):
            small(epochs=2).fit(make_bad(X), y if make_bad(X).ndim == 2 else y[:64])


def test_partial_fit_is_deterministic_and_continues_the_model(digits):
    X, y = digits
    a, b = slice(0, 900), slice(900, 1797)
    runs = []
    for _ in range(2):
        clf = small(hidden=(48,), method="set", epochs=10).fit(X[a], y[a])
        before = [layer.indices.copy() for layer in clf.model_.layers]
        clf.partial_fit(X[b], y[b])
        runs.append(clf)
    first, second = runs
    for la, lb in zip(first.model_.layers, second.model_.layers):
        np.testing.assert_array_equal(la.indices, lb.indices)
        np.testing.assert_array_equal(la.values, lb.values)
    # topology evolution ran on the new data: the first layer's connections moved
    assert not np.array_equal(before[0], first.model_.layers[0].indices)
    assert first.score(X[b], y[b]) > 0.8
    # the scaling fitted on the first data is kept
    np.testing.assert_array_equal(first.model_.shift, small(hidden=(48,), epochs=1).fit(X[a], y[a]).model_.shift)


def test_warm_start_fit_equals_partial_fit(digits):
    X, y = digits
    warm = small(hidden=(24,), warm_start=True).fit(X[:800], y[:800]).fit(X[800:], y[800:])
    part = small(hidden=(24,)).fit(X[:800], y[:800]).partial_fit(X[800:], y[800:])
    cold = small(hidden=(24,)).fit(X[:800], y[:800]).fit(X[800:], y[800:])
    np.testing.assert_array_equal(warm.model_.layers[0].values, part.model_.layers[0].values)
    assert not np.array_equal(warm.model_.shift, cold.model_.shift)  # cold refits scaling on the second half


def test_continuing_refuses_new_classes_and_other_widths_but_takes_a_subset(digits):
    X, y = digits
    low = y < 5
    clf = small(epochs=3).fit(X[low], y[low])
    with pytest.raises(DataError, match=r"label\(s\) 5, 6, 7, 8, 9 that the model to continue does not know"):
        clf.partial_fit(X[~low], y[~low])
    with pytest.raises(ValueError, match="X has 63 features, but SparseMLPClassifier is expecting 64"):
        clf.partial_fit(X[:, :63], y)
    subset = np.isin(y, [1, 3])
    clf.partial_fit(X[subset], y[subset])
    assert clf.classes_.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"classes=\[0, 1, 2\] but the first partial_fit's y holds \[0, 1\]"):
        small().partial_fit(X[y < 2], y[y < 2], classes=[0, 1, 2])


def test_without_scikit_learn_the_classifier_still_works(tmp_path):
    """With scikit-learn hidden, the class keeps its methods and messages and no sklearn module loads."""
    script = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # an import of sklearn now raises ImportError
        import numpy as np
        from ctre_edge import api
        from ctre_edge.data import load_data
        assert not api.HAVE_SKLEARN
        d = load_data("builtin:digits")
        clf = api.SparseMLPClassifier(hidden=(16,), epsilon=4, epochs=5, batch_size=16).fit(d.X[:400], d.y[:400])
        assert clf.n_features_in_ == 64 and clf.classes_.tolist() == list(range(10))
        assert clf.get_params()["epochs"] == 5 and clf.set_params(epochs=2).epochs == 2
        assert 0.5 < clf.score(d.X[:400], d.y[:400]) <= 1
        for bad, text in ((d.X[:3, :10], "X has 10 features, but SparseMLPClassifier is expecting 64"),
                          (d.X[0], "Expected 2D array"), (np.full((2, 64), np.nan), "Input X contains NaN")):
            try:
                clf.predict(bad)
            except ValueError as e:
                assert text in str(e), str(e)
            else:
                raise AssertionError(text)
        try:
            api.SparseMLPClassifier().predict(d.X[:1])
        except api.NotFittedError as e:
            assert "not fitted" in str(e) and isinstance(e, AttributeError)
        try:
            api.SparseMLPClassifier().set_params(gamma=1)
        except ValueError as e:
            assert "Invalid parameter 'gamma'" in str(e)
        print(repr(clf), "OK", [m for m in sys.modules if m.startswith("sklearn") and sys.modules[m] is not None])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "SparseMLPClassifier(hidden=(16,), epsilon=4, epochs=2, batch_size=16) OK []"
