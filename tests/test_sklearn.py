"""scikit-learn estimators (issue 6, item 6): NNClassifier and NNRegressor.

Every check of ``sklearn.utils.estimator_checks`` (no expected failures declared),
Pipeline, GridSearchCV, label handling, output shapes, pickling, early stopping and
real accuracy on the bundled digits.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is an optional extra "
                              "(pip install 'nnfast[sklearn]')")

from sklearn.base import clone                                     # noqa: E402
from sklearn.model_selection import GridSearchCV                   # noqa: E402
from sklearn.pipeline import make_pipeline                         # noqa: E402
from sklearn.preprocessing import StandardScaler                   # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import nnfast as nf                                                # noqa: E402
from nnfast.sklearn import NNClassifier, NNRegressor               # noqa: E402

# The folder holding the nnfast this process imported (site-packages in CI, the checkout
# when run from a build in place): child processes must import the same one.
NNFAST_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(nf.__file__)))


def blobs(n=150, d=4, k=3, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)) * 3
    y = np.arange(n) % k
    X = centers[y] + spread * rng.standard_normal((n, d))
    return X, y


def smooth_regression(n=200, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(n, d))
    Y = np.column_stack([np.sin(X[:, 0]) + 0.5 * X[:, 1], X[:, 1] * X[:, 2] / 2])
    return X, Y


# --------------------------------------------------------------------------- sklearn's checks
@parametrize_with_checks([NNClassifier(), NNRegressor()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_every_check_passes_including_array_api_and_pandas(tmp_path):
    """``check_estimator`` with on_fail=None, in a subprocess with SCIPY_ARRAY_API=1 (which
    must be set before SciPy is imported) so that the array-API check runs too: every
    check must pass; only a check that needs pandas may be skipped, when it is missing."""
    code = r"""
import json
from sklearn.utils.estimator_checks import check_estimator
from nnfast.sklearn import NNClassifier, NNRegressor
bad = []
total = 0
for est in (NNClassifier(), NNRegressor()):
    for r in check_estimator(est, on_fail=None):
        total += 1
        if r["status"] == "passed":
            continue
        if r["status"] == "skipped" and "pandas is not installed" in str(r["exception"]):
            continue
        bad.append([type(est).__name__, r["check_name"], r["status"], repr(r["exception"])])
print(json.dumps({"total": total, "bad": bad}))
"""
    env = dict(os.environ, SCIPY_ARRAY_API="1")
    env["PYTHONPATH"] = NNFAST_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["total"] > 90
    assert result["bad"] == []


def test_import_nnfast_does_not_import_sklearn(tmp_path):
    code = ("import sys, nnfast; assert 'sklearn' not in sys.modules; "
            "import nnfast.sklearn; assert 'sklearn' in sys.modules")
    env = dict(os.environ)
    env["PYTHONPATH"] = NNFAST_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


# --------------------------------------------------------------------------- classifier
def test_digits_accuracy():
    X, y = nf.datasets.load_digits()
    X_train, X_test, y_train, y_test = nf.datasets.train_test_split(X, y, test_size=0.2, seed=0)
    clf = NNClassifier(random_state=0).fit(X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.95
    assert clf.n_features_in_ == 64
    np.testing.assert_array_equal(clf.classes_, np.arange(10))
    proba = clf.predict_proba(X_test)
    assert proba.shape == (X_test.shape[0], 10) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(X_test), np.argmax(proba, axis=1))
    assert 1 <= clf.n_iter_ <= clf.epochs and len(clf.loss_curve_) == clf.n_iter_
    assert isinstance(clf.model_, nf.Sequential)
    assert [layer.units for layer in clf.model_.layers] == [100, 10]


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "bird"]),
                                    np.array(["no", "yes"]),
                                    np.array([10, -3, 7]), np.array([1.0, 3.0])],
                         ids=["str3", "str2", "int", "float"])
def test_any_label_type(labels):
    X, y = blobs(k=len(labels))
    y_lab = labels[y]
    clf = NNClassifier(random_state=0, hidden_layer_sizes=(16,), learning_rate=1e-2)
    clf.fit(X, y_lab)
    np.testing.assert_array_equal(clf.classes_, np.sort(labels))
    pred = clf.predict(X)
    assert pred.dtype == y_lab.dtype and set(pred) <= set(labels)
    assert clf.score(X, y_lab) > 0.95
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), len(labels))      # softmax also for two classes
    # column j of predict_proba is classes_[j]
    np.testing.assert_array_equal(clf.classes_[np.argmax(proba, axis=1)], pred)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), proba, rtol=1e-12)


def test_one_class_and_list_input():
    X, _ = blobs(n=20)
    clf = NNClassifier(random_state=0, epochs=3).fit(X.tolist(), ["only"] * 20)
    assert list(clf.predict(X[:3])) == ["only"] * 3
    np.testing.assert_array_equal(clf.predict_proba(X[:3]), np.ones((3, 1)))


def test_classifier_rejects_continuous_and_multilabel_targets():
    X, _ = blobs(n=20)
    with pytest.raises(ValueError, match="Unknown label type"):
        NNClassifier(epochs=2).fit(X, np.linspace(0, 1, 20))
    with pytest.raises(ValueError):
        NNClassifier(epochs=2).fit(X, np.eye(2)[np.arange(20) % 2].astype(int))


def test_predict_before_fit():
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        NNClassifier().predict(np.zeros((2, 3)))
    with pytest.raises(NotFittedError):
        NNRegressor().predict(np.zeros((2, 3)))


@pytest.mark.parametrize("backend", ["cython", "numpy"])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_backends_solvers_and_determinism(backend, solver):
    X, y = blobs()
    params = dict(hidden_layer_sizes=(12, 8), solver=solver, backend=backend, random_state=3,
                  epochs=20, learning_rate=1e-2, dtype="float64", activation="tanh",
                  nesterov=solver == "sgd", weight_decay=1e-4, accumulate=2)
    a = NNClassifier(**params).fit(X, y)
    b = NNClassifier(**params).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.model_.backend == backend and a.model_.dtype == np.float64
    assert a.score(X, y) > 0.9
    c = NNClassifier(**dict(params, random_state=4)).fit(X, y)
    assert not np.array_equal(a.predict_proba(X), c.predict_proba(X))
    opt = a._optimizer()
    assert isinstance(opt, nf.Adam if solver == "adam" else nf.SGD)
    assert opt.lr == 1e-2 and opt.weight_decay == 1e-4


def test_the_two_backends_agree():
    X, y = blobs()
    params = dict(hidden_layer_sizes=(8,), random_state=0, epochs=5, dtype="float64", tol=None)
    a = NNClassifier(backend="cython", **params).fit(X, y)
    b = NNClassifier(backend="numpy", **params).fit(X, y)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-9, atol=1e-12)


def test_batch_size_options():
    X, y = blobs(n=60)
    for bs, iters in ((None, 1), ("auto", 1), (32, 2), (np.int64(7), 9)):
        clf = NNClassifier(batch_size=bs, epochs=3, tol=None, random_state=0).fit(X, y)
        assert clf.history_.iterations == 3 * iters, bs
    assert clf.history_.epochs == clf.n_iter_ == 3


def test_tol_stops_training_and_none_runs_all_epochs():
    X, y = blobs(n=60, spread=0.1)
    stopped = NNClassifier(epochs=500, tol=1e-2, n_iter_no_change=3, random_state=0).fit(X, y)
    assert stopped.n_iter_ < 500
    full = NNClassifier(epochs=30, tol=None, random_state=0).fit(X, y)
    assert full.n_iter_ == 30


def test_early_stopping_holds_out_a_validation_set():
    X, y = blobs(n=200, spread=2.0)          # overlapping classes: validation loss rises
    clf = NNClassifier(early_stopping=True, validation_fraction=0.2, n_iter_no_change=5,
                       tol=0.0, epochs=300, learning_rate=1e-2, hidden_layer_sizes=(64, 64),
                       random_state=0).fit(X, y)
    val = clf.validation_loss_curve_
    assert len(val) == clf.n_iter_ < 300
    assert clf.history_.iterations == clf.n_iter_ * 5        # 160 training rows / 32
    # stopped 5 epochs after the best validation loss (tol=0: any decrease counts)
    assert int(np.argmin(val)) == clf.n_iter_ - 1 - 5
    clf.set_params(early_stopping=False).fit(X, y)            # a refit forgets the curve
    assert not hasattr(clf, "validation_loss_curve_")


@pytest.mark.parametrize("bad, exc", [
    (dict(solver="lbfgs"), ValueError), (dict(activation="softmax"), ValueError),
    (dict(hidden_layer_sizes=(10, 0)), ValueError), (dict(hidden_layer_sizes="10"), ValueError),
    (dict(batch_size=0), ValueError), (dict(batch_size="big"), ValueError),
    (dict(epochs=0), ValueError), (dict(learning_rate=-1.0), ValueError),
    (dict(dtype="float16"), ValueError), (dict(backend="cuda"), ValueError),
    (dict(early_stopping=True, validation_fraction=1.0), ValueError),
    (dict(tol=-1.0), ValueError), (dict(n_iter_no_change=0), ValueError)])
def test_bad_parameters_fail_in_fit_not_in_init(bad, exc):
    X, y = blobs(n=20)
    clf = NNClassifier(**bad)                  # scikit-learn: no validation in __init__
    assert clf.get_params()[next(iter(bad))] == bad[next(iter(bad))]
    with pytest.raises(exc):
        clf.fit(X, y)


def test_bad_inputs():
    X, y = blobs(n=20)
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        NNClassifier().fit(Xn, y)
    clf = NNClassifier(epochs=2).fit(X, y)
    with pytest.raises(ValueError, match="4 features"):
        clf.predict(X[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        clf.predict(Xn)


def test_pickle_and_clone():
    X, y = blobs()
    clf = NNClassifier(random_state=0, epochs=10).fit(X, y)
    before = clf.predict_proba(X)
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(restored.predict_proba(X), before)
    # pickling must not strip the live estimator of its model
    np.testing.assert_array_equal(clf.predict_proba(X), before)
    import copy
    np.testing.assert_array_equal(copy.deepcopy(clf).predict_proba(X), before)
    fresh = clone(clf)
    assert fresh.get_params() == clf.get_params() and not hasattr(fresh, "model_")
    # the network inside can be saved with nnfast's own format
    reg = NNRegressor(random_state=0, epochs=5).fit(*smooth_regression())
    restored = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(restored.predict(X[:, :3]), reg.predict(X[:, :3]))


# --------------------------------------------------------------------------- regressor
def test_regressor_1d_and_2d_targets():
    X, Y = smooth_regression()
    multi = NNRegressor(random_state=0, learning_rate=1e-2).fit(X, Y)
    pred = multi.predict(X)
    assert pred.shape == Y.shape and pred.dtype == np.float64
    assert multi.n_outputs_ == 2 and multi.score(X, Y) > 0.9
    single = NNRegressor(random_state=0, learning_rate=1e-2).fit(X, Y[:, 0])
    assert single.predict(X).shape == (len(X),) and single.n_outputs_ == 1
    assert single.score(X, Y[:, 0]) > 0.9
    column = NNRegressor(random_state=0, learning_rate=1e-2).fit(X, Y[:, :1])
    assert column.predict(X).shape == (len(X), 1)
    # same data, same seed: the 1-D and (n, 1) fits are the same network
    np.testing.assert_array_equal(column.predict(X)[:, 0], single.predict(X))
    assert multi.model_.layers[-1].activation == "identity"
    assert multi.model_.loss == "mse"


def test_regressor_r2_matches_sklearn_metric():
    from sklearn.metrics import r2_score
    X, Y = smooth_regression()
    reg = NNRegressor(random_state=0, epochs=20).fit(X, Y[:, 0])
    assert reg.score(X, Y[:, 0]) == pytest.approx(r2_score(Y[:, 0], reg.predict(X)))


# --------------------------------------------------------------------------- composition
def test_pipeline_with_standard_scaler():
    X, y = blobs(n=300, spread=1.0)
    X = X * [1000.0, 0.001, 1.0, 50.0] + [5e4, 0.0, -3.0, 10.0]    # badly scaled features
    pipe = make_pipeline(StandardScaler(), NNClassifier(random_state=0))
    pipe.fit(X[:200], y[:200])
    assert pipe.score(X[200:], y[200:]) > 0.9
    assert pipe.predict_proba(X[200:]).shape == (100, 3)
    assert pipe.named_steps["nnclassifier"].n_features_in_ == 4
    Xr, Yr = smooth_regression()
    reg = make_pipeline(StandardScaler(), NNRegressor(random_state=0, learning_rate=1e-2))
    assert reg.fit(Xr[:150], Yr[:150]).score(Xr[150:], Yr[150:]) > 0.8


def test_grid_search():
    X, y = blobs(n=120, spread=1.5)
    grid = {"hidden_layer_sizes": [(4,), (32,)], "learning_rate": [1e-5, 1e-2]}
    search = GridSearchCV(NNClassifier(random_state=0, epochs=30), grid, cv=3)
    search.fit(X, y)
    assert len(search.cv_results_["params"]) == 4
    # lr=1e-5 barely moves the weights in 30 epochs: the search must pick 1e-2
    assert search.best_params_["learning_rate"] == 1e-2
    assert search.best_score_ > 0.8
    assert search.best_estimator_.learning_rate == 1e-2
    assert search.score(X, y) > 0.8


def test_grid_search_regressor_in_pipeline_parallel():
    X, Y = smooth_regression(n=120)
    pipe = make_pipeline(StandardScaler(), NNRegressor(random_state=0, epochs=30))
    search = GridSearchCV(pipe, {"nnregressor__hidden_layer_sizes": [(8,), (32, 32)],
                                 "nnregressor__solver": ["adam", "sgd"]}, cv=2, n_jobs=2)
    search.fit(X, Y[:, 0])
    assert len(search.cv_results_["params"]) == 4
    assert search.predict(X).shape == (120,)
