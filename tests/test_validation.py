"""Input validation at every public entry point (issue 5, item 1; DESIGN §3).

Two halves:

* bad input is rejected with ``ValueError``/``TypeError`` whose message names the
  argument, *before* anything reaches a kernel (so a rejected call leaves the model as it
  was);
* merely inconvenient input (Fortran order, strided views, read-only arrays, other
  numeric dtypes, Python lists, ``batch_size > N``) is accepted and gives exactly the
  result of the clean, C-contiguous array in the model dtype.

Everything model-related runs on both backends.
"""
import os
import pathlib
import zipfile

import numpy as np
import pytest

import nnfast as nf

BACKENDS = ["cython", "numpy"]
BAD = (ValueError, TypeError)
# Values that are not positive integers (batch_size / epochs / accumulate / n / units).
NOT_POSITIVE_INTS = [0, -1, 2.5, True, False, "3", None, 3.0, np.float64(2.0)]
NOT_POSITIVE_INTS_IDS = ["0", "-1", "2.5", "True", "False", "'3'", "None", "3.0", "np2.0"]


# ---------------------------------------------------------------------------------------
# fixtures and small helpers
# ---------------------------------------------------------------------------------------
@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def classifier(backend, dtype="float32", seed=0):
    return nf.Sequential(nf.Dense(4, 5, activation="relu"),
                         nf.Dense(5, 3, activation="softmax"),
                         dtype=dtype, seed=seed, backend=backend)


def regressor(backend, dtype="float32", seed=0):
    return nf.Sequential(nf.Dense(4, 5, activation="tanh"), nf.Dense(5, 2),
                         dtype=dtype, seed=seed, backend=backend)


def binary(backend, dtype="float32", seed=0, outputs=2):
    return nf.Sequential(nf.Dense(4, 5, activation="relu"),
                         nf.Dense(5, outputs, activation="sigmoid"),
                         dtype=dtype, seed=seed, backend=backend)


N = 12


@pytest.fixture
def data():
    rng = np.random.default_rng(123)
    X = rng.normal(size=(N, 4)).astype(np.float32)
    y_cls = rng.integers(0, 3, size=N)
    y_reg = rng.normal(size=(N, 2)).astype(np.float32)
    y_bin = (rng.random((N, 2)) < 0.5).astype(np.float32)
    return X, y_cls, y_reg, y_bin


def same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def assert_weights_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def rejects(callable_, *names, exc=BAD):
    """``callable_()`` raises ``exc`` and the message names every one of ``names``."""
    with pytest.raises(exc) as info:
        callable_()
    msg = str(info.value)
    for name in names:
        assert name in msg, f"message {msg!r} does not name {name!r}"
    return info.value


# ---------------------------------------------------------------------------------------
# nf.Dense
# ---------------------------------------------------------------------------------------
class TestDense:
    @pytest.mark.parametrize("bad", NOT_POSITIVE_INTS, ids=NOT_POSITIVE_INTS_IDS)
    def test_in_features_not_positive_int(self, bad):
        with pytest.raises(BAD, match="in_features"):
            nf.Dense(bad, 3)

    @pytest.mark.parametrize("bad", NOT_POSITIVE_INTS, ids=NOT_POSITIVE_INTS_IDS)
    def test_units_not_positive_int(self, bad):
        with pytest.raises(BAD, match="units"):
            nf.Dense(3, bad)

    @pytest.mark.parametrize("bad", ["gelu", "ReLu6", "", "soft max", 5, 1.0, ["relu"]])
    def test_unknown_activation(self, bad):
        with pytest.raises(BAD, match="activation"):
            nf.Dense(3, 3, activation=bad)

    @pytest.mark.parametrize("name", ["relu", "RELU", "tanh", "sigmoid", "leaky_relu",
                                      "linear", "identity", None, "softmax"])
    def test_known_activations_accepted(self, name):
        nf.Dense(3, 3, activation=name)

    def test_numpy_integer_sizes_accepted(self):
        layer = nf.Dense(np.int64(3), np.int32(2))
        assert layer.in_features == 3 and layer.units == 2


# ---------------------------------------------------------------------------------------
# nf.Sequential
# ---------------------------------------------------------------------------------------
class TestSequential:
    def test_no_layers(self, backend):
        with pytest.raises(ValueError, match="layer"):
            nf.Sequential(backend=backend)

    @pytest.mark.parametrize("bad", [None, 3, "dense", np.zeros((3, 3))],
                             ids=["None", "int", "str", "array"])
    def test_not_a_dense_layer(self, backend, bad):
        with pytest.raises(TypeError, match=r"layers\[1\]"):
            nf.Sequential(nf.Dense(3, 3), bad, backend=backend)

    def test_width_chain_mismatch(self, backend):
        with pytest.raises(ValueError, match=r"layers\[1\]"):
            nf.Sequential(nf.Dense(4, 5), nf.Dense(6, 2), backend=backend)

    def test_width_chain_mismatch_deeper(self, backend):
        with pytest.raises(ValueError, match=r"layers\[2\]"):
            nf.Sequential(nf.Dense(4, 5), nf.Dense(5, 3), nf.Dense(2, 2), backend=backend)

    @pytest.mark.parametrize("position", [0, 1])
    def test_softmax_not_last(self, backend, position):
        acts = ["relu", "relu", "softmax"]
        acts[position] = "softmax"
        with pytest.raises(ValueError, match="softmax"):
            nf.Sequential(nf.Dense(4, 5, activation=acts[0]), nf.Dense(5, 5, activation=acts[1]),
                          nf.Dense(5, 3, activation=acts[2]), backend=backend)

    def test_softmax_last_accepted(self, backend):
        classifier(backend)

    @pytest.mark.parametrize("bad", ["float16", "int32", "int64", "complex64", "foo", "f8x",
                                     np.int32, object, 3])
    def test_bad_dtype(self, backend, bad):
        with pytest.raises(BAD, match="dtype"):
            nf.Sequential(nf.Dense(3, 3), dtype=bad, backend=backend)

    def test_dtype_none_is_rejected_or_the_default(self, backend):
        # np.dtype(None) is float64: a model must not silently become float64 because
        # the caller passed None. Either reject it naming dtype, or mean the default.
        try:
            model = nf.Sequential(nf.Dense(3, 3), dtype=None, backend=backend)
        except BAD as exc:
            assert "dtype" in str(exc)
        else:
            assert model.dtype == np.float32, f"dtype=None gave a {model.dtype} model"

    @pytest.mark.parametrize("dtype", ["float32", "float64", np.float32, np.dtype("float64")])
    def test_good_dtypes(self, backend, dtype):
        nf.Sequential(nf.Dense(3, 3), dtype=dtype, backend=backend)

    @pytest.mark.parametrize("bad", ["torch", "", "Cythonn", "gpu"])
    def test_unknown_backend(self, bad):
        with pytest.raises(ValueError, match="backend"):
            nf.Sequential(nf.Dense(3, 3), backend=bad)

    @pytest.mark.parametrize("bad", [None, 3, ["cython"]], ids=["None", "int", "list"])
    def test_backend_wrong_type(self, bad):
        with pytest.raises(BAD, match="backend"):
            nf.Sequential(nf.Dense(3, 3), backend=bad)

    @pytest.mark.parametrize("bad", ["x", 1.5, True, [1, 2]], ids=["str", "float", "bool", "list"])
    def test_bad_seed(self, backend, bad):
        with pytest.raises(BAD, match="seed"):
            nf.Sequential(nf.Dense(3, 3), seed=bad, backend=backend)

    def test_same_layer_twice(self, backend):
        layer = nf.Dense(3, 3)
        with pytest.raises(ValueError):
            nf.Sequential(layer, layer, backend=backend)


# ---------------------------------------------------------------------------------------
# shared bad-X cases (fit, predict, evaluate, compute_gradients)
# ---------------------------------------------------------------------------------------
def bad_X_cases():
    X = np.random.default_rng(0).normal(size=(N, 4)).astype(np.float32)
    nan = X.copy(); nan[3, 2] = np.nan
    inf = X.copy(); inf[0, 0] = np.inf
    ninf = X.copy(); ninf[-1, -1] = -np.inf
    return [
        ("1-D", X[0], ValueError, "X"),
        ("3-D", X[None], ValueError, "X"),
        ("0-D", np.float32(1.0), ValueError, "X"),
        ("too few features", X[:, :3], ValueError, "X"),
        ("too many features", np.hstack([X, X[:, :1]]), ValueError, "X"),
        ("empty", np.empty((0, 4), np.float32), ValueError, "X"),
        ("empty no features", np.empty((0, 0), np.float32), ValueError, "X"),
        ("NaN", nan, ValueError, "X"),
        ("inf", inf, ValueError, "X"),
        ("-inf", ninf, ValueError, "X"),
        ("None", None, BAD, "X"),
        ("strings", X.astype(str), TypeError, "X"),
        ("complex", X.astype(np.complex64), TypeError, "X"),
        ("object", X.astype(object), BAD, "X"),
        ("ragged list", [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], BAD, "X"),
        ("float64 overflows float32", X.astype(np.float64) * 1e300, ValueError, "X"),
    ]


BAD_X = bad_X_cases()
BAD_X_IDS = [c[0] for c in BAD_X]


# ---------------------------------------------------------------------------------------
# model.fit
# ---------------------------------------------------------------------------------------
class TestFit:
    @pytest.mark.parametrize("case", BAD_X, ids=BAD_X_IDS)
    def test_bad_X(self, backend, data, case):
        _, X, exc, name = case
        _, y, _, _ = data
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy"), name, exc=exc)
        assert_weights_equal(model.get_weights(), before)

    def test_X_y_length_mismatch(self, backend, data):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y[:-1], loss="cross_entropy"), "y")
        rejects(lambda: classifier(backend).fit(X[:-1], y, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("label", [3, -1, 100, np.iinfo(np.int64).max])
    def test_labels_out_of_range(self, backend, data, label):
        X, y, _, _ = data
        y = y.copy(); y[5] = label
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy"), "y")
        assert_weights_equal(model.get_weights(), before)

    def test_labels_out_of_range_unsigned(self, backend, data):
        X, y, _, _ = data
        yu = y.astype(np.uint64); yu[0] = 2 ** 63 + 1   # would wrap to negative as int64
        rejects(lambda: classifier(backend).fit(X, yu, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("label", [0.5, 1.0000001, 2.9999])
    def test_labels_not_integral(self, backend, data, label):
        X, y, _, _ = data
        y = y.astype(np.float64); y[2] = label
        rejects(lambda: classifier(backend).fit(X, y, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
    def test_labels_non_finite(self, backend, data, value):
        X, y, _, _ = data
        y = y.astype(np.float64); y[1] = value
        rejects(lambda: classifier(backend).fit(X, y, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("bad", ["strings", "complex", "3-D", "0-D"])
    def test_labels_wrong_kind(self, backend, data, bad):
        X, y, _, _ = data
        yy = {"strings": y.astype(str), "complex": y.astype(complex),
              "3-D": y.reshape(N, 1, 1), "0-D": np.int64(1)}[bad]
        rejects(lambda: classifier(backend).fit(X, yy, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("width", [2, 4])
    def test_one_hot_width_mismatch(self, backend, data, width):
        X, y, _, _ = data
        onehot = np.eye(width)[np.minimum(y, width - 1)]
        rejects(lambda: classifier(backend).fit(X, onehot, loss="cross_entropy"), "y")

    def test_probability_rows_must_sum_to_one(self, backend, data):
        X, y, _, _ = data
        probs = np.eye(3)[y] * 0.9
        rejects(lambda: classifier(backend).fit(X, probs, loss="cross_entropy"), "y")

    def test_probability_rows_non_negative(self, backend, data):
        X, y, _, _ = data
        probs = np.eye(3)[y] * 2 - np.eye(3)[(y + 1) % 3]   # rows sum to 1, one entry -1
        rejects(lambda: classifier(backend).fit(X, probs, loss="cross_entropy"), "y")

    def test_probability_rows_nan(self, backend, data):
        X, y, _, _ = data
        probs = np.eye(3)[y]; probs[0, 0] = np.nan
        rejects(lambda: classifier(backend).fit(X, probs, loss="cross_entropy"), "y")

    @pytest.mark.parametrize("bad", ["above 1", "below 0", "nan", "width", "1-D for 2 outputs"])
    def test_bce_targets(self, backend, data, bad):
        X, _, _, y = data
        y = y.copy()
        if bad == "above 1":
            y[0, 0] = 1.5
        elif bad == "below 0":
            y[0, 1] = -0.1
        elif bad == "nan":
            y[3, 0] = np.nan
        elif bad == "width":
            y = np.hstack([y, y])
        else:
            y = y[:, 0]
        rejects(lambda: binary(backend).fit(X, y, loss="binary_cross_entropy"), "y")

    @pytest.mark.parametrize("bad", ["width", "1-D for 2 outputs", "nan", "inf", "3-D"])
    def test_mse_targets(self, backend, data, bad):
        X, _, y, _ = data
        y = y.copy()
        if bad == "width":
            y = y[:, :1]
        elif bad == "1-D for 2 outputs":
            y = y[:, 0]
        elif bad == "nan":
            y[4, 1] = np.nan
        elif bad == "inf":
            y[4, 1] = np.inf
        else:
            y = y[:, :, None]
        rejects(lambda: regressor(backend).fit(X, y, loss="mse"), "y")

    def test_y_none(self, backend, data):
        X, _, _, _ = data
        rejects(lambda: regressor(backend).fit(X, None, loss="mse"), "y")

    # -- validation_data --------------------------------------------------------------
    @pytest.mark.parametrize("bad", ["nan X", "inf X", "nan y", "features", "rows",
                                     "label range", "empty", "not a pair", "triple", "None X"])
    def test_validation_data(self, backend, data, bad):
        X, y, _, _ = data
        Xv, yv = X.copy(), y.copy()
        if bad == "nan X":
            Xv[0, 0] = np.nan
        elif bad == "inf X":
            Xv[0, 0] = -np.inf
        elif bad == "nan y":
            yv = yv.astype(float); yv[0] = np.nan
        elif bad == "features":
            Xv = Xv[:, :2]
        elif bad == "rows":
            yv = yv[:-2]
        elif bad == "label range":
            yv[0] = 7
        elif bad == "empty":
            Xv, yv = Xv[:0], yv[:0]
        elif bad == "None X":
            Xv = None
        vd = {"not a pair": Xv, "triple": (Xv, yv, yv)}.get(bad, (Xv, yv))
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy", validation_data=vd),
                "validation_data")
        # checked before training starts: nothing was updated
        assert_weights_equal(model.get_weights(), before)

    # -- integer arguments -------------------------------------------------------------
    @pytest.mark.parametrize("arg,bad", [
        pytest.param(arg, bad, id=f"{arg}-{bad_id}")
        for arg in ("epochs", "batch_size", "accumulate")
        for bad, bad_id in zip(NOT_POSITIVE_INTS, NOT_POSITIVE_INTS_IDS)
        if not (arg == "batch_size" and bad is None)])  # batch_size=None is full batch
    def test_not_positive_integers(self, backend, data, arg, bad):
        X, y, _, _ = data
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy", **{arg: bad}), arg)
        assert_weights_equal(model.get_weights(), before)

    @pytest.mark.parametrize("arg", ["epochs", "batch_size", "accumulate"])
    def test_numpy_integers_accepted(self, backend, data, arg):
        X, y, _, _ = data
        hist = classifier(backend).fit(X, y, loss="cross_entropy", **{arg: np.int64(2)})
        assert hist.iterations >= 1

    @pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, np.nan, np.inf, "0.2", True, None,
                                     [0.2]],
                             ids=["-0.1", "1.0", "1.5", "nan", "inf", "str", "True", "None",
                                  "list"])
    def test_bad_validation_split(self, backend, data, bad):
        X, y, _, _ = data
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy", validation_split=bad),
                "validation_split")
        assert_weights_equal(model.get_weights(), before)

    def test_validation_split_leaving_no_training_rows(self, backend, data):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X[:1], y[:1], loss="cross_entropy",
                                                validation_split=0.5), "validation_split")

    def test_validation_split_and_data_together(self, backend, data):
        X, y, _, _ = data
        with pytest.raises(ValueError, match="validation"):
            classifier(backend).fit(X, y, loss="cross_entropy", validation_split=0.25,
                                    validation_data=(X, y))

    def test_validation_split_is_the_tail(self, backend, data):
        X, y, _, _ = data
        a, b = classifier(backend), classifier(backend)
        ha = a.fit(X, y, loss="cross_entropy", validation_split=0.25, seed=0, epochs=2)
        hb = b.fit(X[:9], y[:9], loss="cross_entropy", validation_data=(X[9:], y[9:]),
                   seed=0, epochs=2)
        assert ha.history["val_loss"] == hb.history["val_loss"]
        assert_weights_equal(a.get_weights(), b.get_weights())

    def test_drop_last_zero_iterations(self, backend, data):
        X, y, _, _ = data
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy", batch_size=N + 1,
                                  drop_last=True), "drop_last")
        assert_weights_equal(model.get_weights(), before)

    def test_drop_last_exact_fit_is_fine(self, backend, data):
        X, y, _, _ = data
        hist = classifier(backend).fit(X, y, loss="cross_entropy", batch_size=N, drop_last=True,
                                       epochs=2)
        assert hist.iterations == 2

    # -- names ---------------------------------------------------------------------------
    @pytest.mark.parametrize("bad", ["hinge", "", "crossentropy", "MSE2"])
    def test_unknown_loss(self, backend, data, bad):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y, loss=bad), "loss")

    @pytest.mark.parametrize("bad", [5, ["mse"], object()], ids=["int", "list", "object"])
    def test_loss_wrong_type(self, backend, data, bad):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y, loss=bad), "loss")

    def test_loss_required_for_fresh_model(self, backend, data):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y), "loss")

    @pytest.mark.parametrize("factory,loss,which", [
        (regressor, "cross_entropy", "reg"),     # cross_entropy without softmax
        (binary, "cross_entropy", "bin"),        # cross_entropy after sigmoid
        (classifier, "binary_cross_entropy", "cls"),   # bce without sigmoid
        (regressor, "binary_cross_entropy", "reg"),
        (classifier, "mse", "cls"),              # mse with softmax
    ], ids=["ce-identity", "ce-sigmoid", "bce-softmax", "bce-identity", "mse-softmax"])
    def test_loss_does_not_fit_last_activation(self, backend, data, factory, loss, which):
        X, y_cls, y_reg, y_bin = data
        y = {"reg": y_reg, "bin": y_bin, "cls": y_cls}[which]
        if loss == "mse" and which == "cls":
            y = np.eye(3)[y_cls]
        if loss == "cross_entropy":
            y = y_cls % 2
        model = factory(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss=loss), "loss")
        assert_weights_equal(model.get_weights(), before)

    @pytest.mark.parametrize("bad", ["rmsprop", "", 5, 0.1, object()],
                             ids=["rmsprop", "empty", "int", "float", "object"])
    def test_bad_optimizer(self, backend, data, bad):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y, loss="cross_entropy", optimizer=bad),
                "optimizer")

    @pytest.mark.parametrize("bad", ["x", -1, 1.5], ids=["str", "negative", "float"])
    def test_bad_seed(self, backend, data, bad):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).fit(X, y, loss="cross_entropy", seed=bad), "seed")

    @pytest.mark.parametrize("bad", [5, "abc"], ids=["int", "str"])
    def test_bad_callbacks(self, backend, data, bad):
        X, y, _, _ = data
        model = classifier(backend)
        before = model.get_weights()
        rejects(lambda: model.fit(X, y, loss="cross_entropy", callbacks=bad), "callbacks")
        assert_weights_equal(model.get_weights(), before)


# ---------------------------------------------------------------------------------------
# predict / evaluate / compute_gradients
# ---------------------------------------------------------------------------------------
class TestPredict:
    @pytest.mark.parametrize("case", BAD_X, ids=BAD_X_IDS)
    def test_bad_X(self, backend, case):
        _, X, exc, name = case
        rejects(lambda: classifier(backend).predict(X), name, exc=exc)

    def test_float64_model_rejects_inf_but_takes_huge(self, backend):
        model = regressor(backend, dtype="float64")
        X = np.full((2, 4), 1e300)
        model.predict(X[:, :4] * 0 + 1.0)
        X[0, 0] = np.inf
        rejects(lambda: model.predict(X), "X")


class TestEvaluate:
    @pytest.mark.parametrize("case", BAD_X, ids=BAD_X_IDS)
    def test_bad_X(self, backend, data, case):
        _, X, exc, name = case
        _, y, _, _ = data
        rejects(lambda: classifier(backend).evaluate(X, y, loss="cross_entropy"), name, exc=exc)

    def test_length_mismatch(self, backend, data):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).evaluate(X, y[:5], loss="cross_entropy"), "y")

    @pytest.mark.parametrize("bad", ["range", "integral", "nan", "one-hot width", "sum"])
    def test_bad_labels(self, backend, data, bad):
        X, y, _, _ = data
        if bad == "range":
            yy = y.copy(); yy[0] = 3
        elif bad == "integral":
            yy = y.astype(float); yy[0] = 0.25
        elif bad == "nan":
            yy = y.astype(float); yy[0] = np.nan
        elif bad == "one-hot width":
            yy = np.eye(4)[y]
        else:
            yy = np.eye(3)[y] * 0.5
        rejects(lambda: classifier(backend).evaluate(X, yy, loss="cross_entropy"), "y")

    def test_mse_targets(self, backend, data):
        X, _, y, _ = data
        bad = y.copy(); bad[0, 0] = np.inf
        rejects(lambda: regressor(backend).evaluate(X, bad, loss="mse"), "y")
        rejects(lambda: regressor(backend).evaluate(X, y[:, :1], loss="mse"), "y")

    def test_loss_required_for_fresh_model(self, backend, data):
        X, y, _, _ = data
        rejects(lambda: classifier(backend).evaluate(X, y), "loss")

    def test_unknown_loss_and_mismatch(self, backend, data):
        X, y, y_reg, _ = data
        rejects(lambda: classifier(backend).evaluate(X, y, loss="hinge"), "loss")
        rejects(lambda: regressor(backend).evaluate(X, y % 2, loss="cross_entropy"), "loss")
        rejects(lambda: classifier(backend).evaluate(X, np.eye(3)[y], loss="mse"), "loss")
        rejects(lambda: regressor(backend).evaluate(X, y_reg, loss="binary_cross_entropy"),
                "loss")

    def test_loss_defaults_to_last_fit(self, backend, data):
        X, y, _, _ = data
        model = classifier(backend)
        model.fit(X, y, loss="cross_entropy")
        assert model.evaluate(X, y) == model.evaluate(X, y, loss="cross_entropy")


class TestComputeGradients:
    @pytest.mark.parametrize("case", BAD_X, ids=BAD_X_IDS)
    def test_bad_X(self, backend, data, case):
        _, X, exc, name = case
        _, y, _, _ = data
        model = classifier(backend)
        rejects(lambda: model.compute_gradients(X, y, loss="cross_entropy"), name, exc=exc)
        assert model.accumulated_samples == 0

    @pytest.mark.parametrize("bad", ["length", "range", "negative", "integral", "nan",
                                     "one-hot width"])
    def test_bad_y(self, backend, data, bad):
        X, y, _, _ = data
        yy = {"length": y[:-1], "range": np.where(y == 0, 3, y), "negative": y - 1,
              "integral": y + 0.5, "nan": np.where(y == 0, np.nan, y),
              "one-hot width": np.eye(2)[y % 2]}[bad]
        model = classifier(backend)
        rejects(lambda: model.compute_gradients(X, yy, loss="cross_entropy"), "y")
        assert model.accumulated_samples == 0
        assert all(not g.any() for g in (l.dW for l in model.layers))

    def test_loss_checks(self, backend, data):
        X, y, y_reg, _ = data
        rejects(lambda: classifier(backend).compute_gradients(X, y, loss="hinge"), "loss")
        rejects(lambda: classifier(backend).compute_gradients(X, y, loss=None), "loss")
        rejects(lambda: regressor(backend).compute_gradients(X, y % 2, loss="cross_entropy"),
                "loss")
        rejects(lambda: classifier(backend).compute_gradients(X, np.eye(3)[y], loss="mse"),
                "loss")
        rejects(lambda: regressor(backend).compute_gradients(X, y_reg,
                                                             loss="binary_cross_entropy"),
                "loss")

    def test_gradients_without_accumulation(self, backend):
        with pytest.raises(ValueError):
            classifier(backend).gradients()


# ---------------------------------------------------------------------------------------
# set_weights
# ---------------------------------------------------------------------------------------
class TestSetWeights:
    def test_wrong_count(self, backend):
        model = classifier(backend)
        ws = model.get_weights()
        rejects(lambda: model.set_weights(ws[:-1]), "weights")
        rejects(lambda: model.set_weights(ws + [ws[-1]]), "weights")
        rejects(lambda: model.set_weights([]), "weights")

    @pytest.mark.parametrize("bad", [None, 3, "weights", {"a": 1}],
                             ids=["None", "int", "str", "dict"])
    def test_not_a_list(self, backend, bad):
        rejects(lambda: classifier(backend).set_weights(bad), "weights")

    def test_single_ndarray_rejected(self, backend):
        model = classifier(backend)
        rejects(lambda: model.set_weights(model.get_weights()[0]), "weights")

    @pytest.mark.parametrize("index,shape", [(0, (5, 4)), (0, (4, 5, 1)), (0, (20,)),
                                             (1, (5, 1)), (1, (1, 5)), (1, (4,)), (1, ()),
                                             (2, (5, 2)), (3, (5,))])
    def test_wrong_shape(self, backend, index, shape):
        model = classifier(backend)
        ws = model.get_weights()
        before = model.get_weights()
        ws[index] = np.zeros(shape, dtype=np.float32)
        rejects(lambda: model.set_weights(ws), f"weights[{index}]")
        assert_weights_equal(model.get_weights(), before)

    @pytest.mark.parametrize("dtype", [object, complex, str, "datetime64[s]"],
                             ids=["object", "complex", "str", "datetime"])
    def test_wrong_dtype(self, backend, dtype):
        model = classifier(backend)
        ws = model.get_weights()
        ws[1] = ws[1].astype(dtype) if dtype != "datetime64[s]" else \
            np.zeros(ws[1].shape, dtype=dtype)
        rejects(lambda: model.set_weights(ws), "weights[1]", exc=BAD)

    @pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("index", [0, 1, 2, 3])
    def test_non_finite(self, backend, index, value):
        model = classifier(backend)
        ws = model.get_weights()
        before = model.get_weights()
        ws[index] = ws[index].copy()
        ws[index].flat[0] = value
        rejects(lambda: model.set_weights(ws), f"weights[{index}]")
        # all-or-nothing: the earlier, valid arrays were not copied in either
        assert_weights_equal(model.get_weights(), before)

    def test_float64_overflowing_float32(self, backend):
        model = classifier(backend)
        ws = [w.astype(np.float64) for w in model.get_weights()]
        ws[2] = ws[2] + 1e300
        rejects(lambda: model.set_weights(ws), "weights[2]")

    def test_inconvenient_weights_accepted(self, backend, data):
        X = data[0]
        model = classifier(backend)
        ref = [w * 0.5 for w in model.get_weights()]
        model.set_weights(ref)
        out_ref = model.predict(X)
        variants = [
            [np.asfortranarray(w) for w in ref],                      # Fortran order
            [w.astype(np.float64) for w in ref],                      # other float dtype
            [w.tolist() for w in ref],                                # Python lists
            tuple(ref),                                               # tuple container
            [np.repeat(w, 2, axis=-1)[..., ::2] for w in ref],        # strided views
        ]
        ro = [w.copy() for w in ref]
        for w in ro:
            w.setflags(write=False)
        variants.append(ro)
        for ws in variants:
            other = classifier(backend, seed=7)
            other.set_weights(ws)
            assert_weights_equal(other.get_weights(), ref)
            np.testing.assert_array_equal(other.predict(X), out_ref)

    def test_integer_weights_accepted(self, backend):
        model = classifier(backend)
        ints = [np.ones(w.shape, dtype=np.int64) for w in model.get_weights()]
        model.set_weights(ints)
        assert all(w.dtype == np.float32 and (w == 1).all() for w in model.get_weights())

    def test_set_weights_copies_and_get_weights_copies(self, backend):
        model = classifier(backend)
        ws = model.get_weights()
        model.set_weights(ws)
        ws[0][...] = 99
        assert not (model.get_weights()[0] == 99).any()
        got = model.get_weights()
        got[0][...] = 42
        assert not (model.get_weights()[0] == 42).any()


# ---------------------------------------------------------------------------------------
# nf.SGD / nf.Adam / opt.step
# ---------------------------------------------------------------------------------------
BAD_LR = [np.nan, np.inf, -np.inf, -1.0, -1e-12, "0.1", None, True, [0.1], 1 + 1j]
BAD_LR_IDS = ["nan", "inf", "-inf", "-1", "-tiny", "str", "None", "True", "list", "complex"]


class TestOptimizers:
    @pytest.mark.parametrize("bad", BAD_LR, ids=BAD_LR_IDS)
    @pytest.mark.parametrize("cls", [nf.SGD, nf.Adam], ids=["SGD", "Adam"])
    def test_bad_lr(self, cls, bad):
        with pytest.raises(BAD, match="lr"):
            cls(lr=bad)

    @pytest.mark.parametrize("cls", [nf.SGD, nf.Adam], ids=["SGD", "Adam"])
    def test_zero_and_numpy_lr_accepted(self, cls):
        cls(lr=0.0)
        cls(lr=np.float32(0.1))
        cls(lr=1)

    @pytest.mark.parametrize("bad", [-0.1, 1.0, 1, 1.5, np.nan, np.inf, "0.9", None, True],
                             ids=["-0.1", "1.0", "int1", "1.5", "nan", "inf", "str", "None",
                                  "True"])
    def test_momentum_outside_0_1(self, bad):
        with pytest.raises(BAD, match="momentum"):
            nf.SGD(lr=0.1, momentum=bad)

    def test_momentum_range_edges_accepted(self):
        nf.SGD(lr=0.1, momentum=0.0)
        nf.SGD(lr=0.1, momentum=0.999999)

    @pytest.mark.parametrize("cls", [nf.SGD, nf.Adam], ids=["SGD", "Adam"])
    @pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf, "0"], ids=["neg", "nan", "inf", "str"])
    def test_bad_weight_decay(self, cls, bad):
        with pytest.raises(BAD, match="weight_decay"):
            cls(lr=0.1, weight_decay=bad)

    def test_nesterov(self):
        with pytest.raises(ValueError, match="nesterov"):
            nf.SGD(lr=0.1, nesterov=True)
        with pytest.raises(TypeError, match="nesterov"):
            nf.SGD(lr=0.1, momentum=0.9, nesterov="yes")

    @pytest.mark.parametrize("bad", [(1.0, 0.999), (0.9, 1.0), (-0.1, 0.9), (0.9, np.nan),
                                     (0.9,), (0.9, 0.99, 0.9), "ab", 0.9, None],
                             ids=["b1=1", "b2=1", "b1<0", "nan", "one", "three", "str",
                                  "float", "None"])
    def test_bad_betas(self, bad):
        with pytest.raises(BAD, match="betas"):
            nf.Adam(betas=bad)

    @pytest.mark.parametrize("bad", [0.0, -1e-8, np.nan, np.inf, "1e-8"],
                             ids=["0", "neg", "nan", "inf", "str"])
    def test_bad_eps(self, bad):
        with pytest.raises(BAD, match="eps"):
            nf.Adam(eps=bad)

    @pytest.mark.parametrize("cls", [nf.SGD, nf.Adam], ids=["SGD", "Adam"])
    def test_step_with_nothing_accumulated(self, backend, data, cls):
        X, y, _, _ = data
        model = classifier(backend)
        opt = cls(lr=0.1)
        before = model.get_weights()
        with pytest.raises(ValueError, match="accumulated"):
            opt.step(model)
        assert_weights_equal(model.get_weights(), before)
        model.compute_gradients(X, y, loss="cross_entropy")
        opt.step(model)
        after = model.get_weights()
        with pytest.raises(ValueError, match="accumulated"):   # the step cleared it
            opt.step(model)
        assert_weights_equal(model.get_weights(), after)
        model.compute_gradients(X, y, loss="cross_entropy")
        model.zero_grad()
        with pytest.raises(ValueError, match="accumulated"):
            opt.step(model)

    @pytest.mark.parametrize("bad", [None, "model", 3, np.zeros(3)],
                             ids=["None", "str", "int", "array"])
    def test_step_on_something_that_is_not_a_model(self, bad):
        with pytest.raises(BAD, match="model"):
            nf.SGD(lr=0.1).step(bad)

    def test_one_optimizer_two_models(self, backend, data):
        X, y, _, _ = data
        a, b = classifier(backend), classifier(backend, seed=1)
        opt = nf.SGD(lr=0.1, momentum=0.9)
        a.compute_gradients(X, y, loss="cross_entropy")
        opt.step(a)
        b.compute_gradients(X, y, loss="cross_entropy")
        with pytest.raises(ValueError, match="model"):
            opt.step(b)


# ---------------------------------------------------------------------------------------
# nf.batches
# ---------------------------------------------------------------------------------------
class TestBatches:
    @pytest.mark.parametrize("bad", [b for b in NOT_POSITIVE_INTS if b is not None],
                             ids=[i for i in NOT_POSITIVE_INTS_IDS if i != "None"])
    def test_bad_batch_size(self, data, bad):
        X, y, _, _ = data
        with pytest.raises(BAD, match="batch_size"):
            list(nf.batches(X, y, batch_size=bad))

    def test_length_mismatch(self, data):
        X, y, _, _ = data
        with pytest.raises(ValueError, match="y"):
            list(nf.batches(X, y[:-1]))

    @pytest.mark.parametrize("X", [np.empty((0, 4)), np.float32(1.0), None, []],
                             ids=["empty", "0-D", "None", "empty list"])
    def test_empty_X(self, X):
        with pytest.raises(BAD, match="X"):
            list(nf.batches(X, batch_size=2))

    def test_drop_last_zero_batches(self, data):
        X, y, _, _ = data
        with pytest.raises(ValueError, match="drop_last"):
            list(nf.batches(X, y, batch_size=N + 1, drop_last=True))

    def test_batch_larger_than_n_is_one_full_batch(self, data):
        X, y, _, _ = data
        got = list(nf.batches(X, y, batch_size=10 * N, shuffle=False))
        assert len(got) == 1
        np.testing.assert_array_equal(got[0][0], X)
        np.testing.assert_array_equal(got[0][1], y)

    def test_lists_and_views_accepted(self, data):
        X, y, _, _ = data
        ref = list(nf.batches(X, y, batch_size=5, seed=3))
        for XX in (X.tolist(), np.asfortranarray(X)):
            got = list(nf.batches(XX, list(y), batch_size=5, seed=3))
            assert len(got) == len(ref)
            for (a, b), (c, d) in zip(got, ref):
                np.testing.assert_array_equal(np.asarray(a, dtype=np.float32), c)
                np.testing.assert_array_equal(b, d)


# ---------------------------------------------------------------------------------------
# nf.set_num_threads
# ---------------------------------------------------------------------------------------
class TestThreads:
    @pytest.mark.parametrize("bad", [0, -1, -8, 2.5, True, False, "2", None, 2.0],
                             ids=["0", "-1", "-8", "2.5", "True", "False", "str", "None", "2.0"])
    def test_bad_thread_count(self, bad):
        before = nf.get_num_threads()
        with pytest.raises(BAD, match=r"\bn\b|thread"):
            nf.set_num_threads(bad)
        assert nf.get_num_threads() == before


# ---------------------------------------------------------------------------------------
# nf.load
# ---------------------------------------------------------------------------------------
def _saved(tmp_path, backend, name="m.npz"):
    model = classifier(backend)
    path = tmp_path / name
    model.save(path)
    return model, path


def _rewrite(path, header=None, drop=(), extra=None):
    import json
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if header is not None:
        h = json.loads(arrays["header"].tobytes().decode())
        header(h)
        arrays["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)
    for k in drop:
        arrays.pop(k)
    arrays.update(extra or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


class TestLoad:
    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            nf.load(tmp_path / "nope.npz")

    def test_directory(self, tmp_path):
        with pytest.raises((OSError, ValueError)):
            nf.load(tmp_path)

    @pytest.mark.parametrize("bad", [None, 3, 2.5, ["m.npz"]], ids=["None", "int", "float", "list"])
    def test_path_wrong_type(self, bad):
        with pytest.raises(TypeError, match="path"):
            nf.load(bad)

    @pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04" + b"\0" * 40],
                             ids=["empty", "garbage", "zip-magic"])
    def test_not_a_model_file(self, tmp_path, content):
        p = tmp_path / "bad.npz"
        p.write_bytes(content)
        with pytest.raises(ValueError):
            nf.load(p)

    def test_truncated(self, tmp_path, backend):
        _, p = _saved(tmp_path, backend)
        raw = p.read_bytes()
        for cut in (10, len(raw) // 2, len(raw) - 5):
            q = tmp_path / f"cut{cut}.npz"
            q.write_bytes(raw[:cut])
            with pytest.raises(ValueError):
                nf.load(q)

    @pytest.mark.parametrize("field", ["compression method", "version needed"])
    def test_corrupt_zip_directory(self, tmp_path, backend, field):
        """One flipped field in the zip's central directory makes zipfile raise
        NotImplementedError; load must still answer with ValueError."""
        _, p = _saved(tmp_path, backend)
        raw = bytearray(p.read_bytes())
        cd = raw.index(b"PK\x01\x02")            # first central-directory entry
        if field == "compression method":
            raw[cd + 10:cd + 12] = (99).to_bytes(2, "little")
        else:
            raw[cd + 6:cd + 8] = (73).to_bytes(2, "little")   # "zip file version 7.3"
        p.write_bytes(bytes(raw))
        with pytest.raises(ValueError):
            nf.load(p)

    def test_plain_npy_and_foreign_npz(self, tmp_path):
        p = tmp_path / "a.npy"
        np.save(p, np.zeros(3))
        with pytest.raises(ValueError):
            nf.load(p)
        q = tmp_path / "b.npz"
        np.savez(q, a=np.zeros(3))
        with pytest.raises(ValueError):
            nf.load(q)

    def test_object_array_never_unpickled(self, tmp_path, backend):
        _, p = _saved(tmp_path, backend)
        marker = tmp_path / "unpickled"

        class Evil:
            def __reduce__(self):
                return (pathlib.Path.touch, (marker,))

        evil = np.empty(1, dtype=object)
        evil[0] = Evil()
        # an extra member, and a parameter replaced by an object array
        for name in ("extra", "param.0"):
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            arrays[name] = evil
            q = tmp_path / f"evil-{name}.npz"
            with zipfile.ZipFile(q, "w") as zf:
                for k, v in arrays.items():
                    with zf.open(k + ".npy", "w") as fh:
                        np.lib.format.write_array(fh, v, allow_pickle=True)
            with pytest.raises(ValueError):
                nf.load(q)
            assert not marker.exists(), "nf.load unpickled an object array"

    @pytest.mark.parametrize("edit", ["format", "version", "dtype", "backend", "activation",
                                      "layers-empty", "layers-int", "units-str", "units-neg",
                                      "loss-unknown", "loss-int", "loss-mismatch",
                                      "missing-model"])
    def test_tampered_header(self, tmp_path, backend, edit):
        _, p = _saved(tmp_path, backend)

        def change(h):
            L = h["model"]["layers"]
            if edit == "format":
                h["format"] = "keras"
            elif edit == "version":
                h["format_version"] = 99
            elif edit == "dtype":
                h["model"]["dtype"] = "float16"
            elif edit == "backend":
                h["model"]["backend"] = "torch"
            elif edit == "activation":
                L[0]["activation"] = "gelu"
            elif edit == "layers-empty":
                h["model"]["layers"] = []
            elif edit == "layers-int":
                h["model"]["layers"] = 3
            elif edit == "units-str":
                L[0]["units"] = "five"
            elif edit == "units-neg":
                L[0]["units"] = -5
            elif edit == "loss-unknown":
                h["loss"] = "hinge"
            elif edit == "loss-int":
                h["loss"] = 5
            elif edit == "loss-mismatch":
                h["loss"] = "mse"
            else:
                del h["model"]

        _rewrite(p, header=change)
        with pytest.raises(ValueError):
            nf.load(p)

    @pytest.mark.parametrize("value", [None, [], "x", {}], ids=["None", "list", "str", "dict"])
    def test_tampered_optimizer_iterations(self, tmp_path, backend, data, value):
        X, y, _, _ = data
        model = classifier(backend)
        opt = nf.SGD(lr=0.1, momentum=0.9)
        model.compute_gradients(X, y, loss="cross_entropy")
        opt.step(model)
        p = tmp_path / "m.npz"
        model.save(p, optimizer=opt)

        def change(h):
            h["optimizer_iterations"] = value

        _rewrite(p, header=change)
        with pytest.raises(ValueError):
            nf.load(p, with_optimizer=True)

    def test_tampered_header_huge_layer(self, tmp_path, backend):
        """A few-byte edit must not make load allocate terabytes (MemoryError / OOM):
        the parameter arrays in the file do not match, so it is a ValueError."""
        _, p = _saved(tmp_path, backend)

        def change(h):
            h["model"]["layers"][0]["in_features"] = 10 ** 7
            h["model"]["layers"][0]["units"] = 10 ** 7
            h["model"]["layers"][1]["in_features"] = 10 ** 7

        _rewrite(p, header=change)
        with pytest.raises(ValueError):
            nf.load(p)

    @pytest.mark.parametrize("edit", ["drop-param", "param-shape", "param-dtype", "param-nan",
                                      "param-inf", "header-int64", "header-2d", "no-header",
                                      "header-not-utf8", "header-not-json"])
    def test_tampered_arrays(self, tmp_path, backend, edit):
        model, p = _saved(tmp_path, backend)
        ws = model.get_weights()
        header = drop = extra = None
        if edit == "drop-param":
            drop = ["param.3"]
        elif edit == "param-shape":
            extra = {"param.0": ws[0].T.copy()}
        elif edit == "param-dtype":
            extra = {"param.1": ws[1].astype(np.float64)}
        elif edit in ("param-nan", "param-inf"):
            w = ws[2].copy(); w[0, 0] = np.nan if edit == "param-nan" else np.inf
            extra = {"param.2": w}
        else:
            with np.load(p) as f:
                raw = f["header"]
            extra = {"header-int64": {"header": raw.astype(np.int64)},
                     "header-2d": {"header": raw[None, :]},
                     "header-not-utf8": {"header": np.frombuffer(b"\xff\xfe{", np.uint8)},
                     "header-not-json": {"header": np.frombuffer(b"{nope", np.uint8)},
                     }.get(edit)
            if edit == "no-header":
                drop = ["header"]
        _rewrite(p, header=header, drop=drop or (), extra=extra)
        with pytest.raises(ValueError):
            nf.load(p)

    def test_round_trip(self, tmp_path, backend, data):
        X = data[0]
        model, p = _saved(tmp_path, backend)
        other = nf.load(p)
        assert_weights_equal(other.get_weights(), model.get_weights())
        np.testing.assert_array_equal(other.predict(X), model.predict(X))
        assert isinstance(os.fspath(p), str)


# ---------------------------------------------------------------------------------------
# Inconvenient but valid arrays: accepted, same result as the clean array
# ---------------------------------------------------------------------------------------
def x_variants(X):
    """(name, variant) pairs holding exactly X's values (as float32 after conversion)."""
    wide = np.zeros((X.shape[0], 2 * X.shape[1]), dtype=X.dtype)
    wide[:, ::2] = X
    tall = np.zeros((2 * X.shape[0], X.shape[1]), dtype=X.dtype)
    tall[::2] = X
    ro = X.copy()
    ro.setflags(write=False)
    rev = X[::-1].copy()[::-1]
    transposed = np.ascontiguousarray(X.T).T
    return [
        ("fortran", np.asfortranarray(X)),
        ("cols view", wide[:, ::2]),
        ("rows view", tall[::2]),
        ("negative strides", rev),
        ("transposed view", transposed),
        ("read-only", ro),
        ("float64", X.astype(np.float64)),
        ("list", X.tolist()),
        ("read-only fortran float64", _readonly(np.asfortranarray(X, dtype=np.float64))),
    ]


def _readonly(a):
    a.setflags(write=False)
    return a


X_VARIANT_NAMES = [n for n, _ in x_variants(np.zeros((2, 2), np.float32))]


def _ref_X():
    return np.random.default_rng(5).normal(size=(N, 4)).astype(np.float32)


class TestInconvenientArrays:
    @pytest.mark.parametrize("variant", X_VARIANT_NAMES)
    def test_predict(self, backend, variant):
        X = _ref_X()
        model = classifier(backend)
        ref = model.predict(X)
        got = model.predict(dict(x_variants(X))[variant])
        assert got.dtype == np.float32 and got.shape == (N, 3)
        np.testing.assert_array_equal(got, ref)

    @pytest.mark.parametrize("variant", X_VARIANT_NAMES)
    def test_evaluate(self, backend, data, variant):
        X = _ref_X()
        y = data[1]
        model = classifier(backend)
        ref = model.evaluate(X, y, loss="cross_entropy")
        got = model.evaluate(dict(x_variants(X))[variant], y, loss="cross_entropy")
        assert got == ref

    @pytest.mark.parametrize("variant", X_VARIANT_NAMES)
    def test_compute_gradients(self, backend, data, variant):
        X = _ref_X()
        y = data[1]
        a, b = classifier(backend), classifier(backend)
        la = a.compute_gradients(X, y, loss="cross_entropy")
        lb = b.compute_gradients(dict(x_variants(X))[variant], y, loss="cross_entropy")
        assert la == lb
        assert_weights_equal(a.gradients(), b.gradients())

    @pytest.mark.parametrize("variant", X_VARIANT_NAMES)
    def test_fit(self, backend, data, variant):
        X = _ref_X()
        y = data[1]
        a, b = classifier(backend), classifier(backend)
        ha = a.fit(X, y, loss="cross_entropy", epochs=2, batch_size=5, seed=1,
                   optimizer=nf.SGD(lr=0.1, momentum=0.9))
        hb = b.fit(dict(x_variants(X))[variant], y, loss="cross_entropy", epochs=2,
                   batch_size=5, seed=1, optimizer=nf.SGD(lr=0.1, momentum=0.9))
        assert ha.batch_losses == hb.batch_losses
        assert_weights_equal(a.get_weights(), b.get_weights())

    def test_fit_validation_data_views(self, backend, data):
        X = _ref_X()
        y = data[1]
        Xv = np.asfortranarray(X[::-1])
        a, b = classifier(backend), classifier(backend)
        ha = a.fit(X, y, loss="cross_entropy", validation_data=(np.ascontiguousarray(Xv),
                                                                y[::-1].copy()), seed=0)
        hb = b.fit(X, y, loss="cross_entropy", validation_data=(Xv, list(y[::-1])), seed=0)
        assert ha.history["val_loss"] == hb.history["val_loss"]

    @pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.uint16,
                                       np.bool_, np.float16])
    def test_integer_bool_half_X(self, backend, data, dtype):
        y = data[1]
        Xi = (np.random.default_rng(2).integers(0, 3, size=(N, 4))).astype(dtype)
        a, b = classifier(backend), classifier(backend)
        np.testing.assert_array_equal(a.predict(Xi), a.predict(Xi.astype(np.float32)))
        ha = a.fit(Xi, y, loss="cross_entropy", seed=0)
        hb = b.fit(Xi.astype(np.float32), y, loss="cross_entropy", seed=0)
        assert ha.batch_losses == hb.batch_losses
        assert_weights_equal(a.get_weights(), b.get_weights())

    def test_float32_X_into_float64_model(self, backend, data):
        X = _ref_X()
        model = classifier(backend, dtype="float64")
        np.testing.assert_array_equal(model.predict(X), model.predict(X.astype(np.float64)))
        assert model.predict(X).dtype == np.float64

    @pytest.mark.parametrize("variant", ["list", "float integral", "int32", "uint8",
                                         "read-only", "strided", "one-hot"])
    def test_label_variants(self, backend, data, variant):
        X, y, _, _ = data
        strided = np.zeros(2 * N, dtype=np.int64); strided[::2] = y
        yv = {"list": list(y), "float integral": y.astype(np.float64),
              "int32": y.astype(np.int32), "uint8": y.astype(np.uint8),
              "read-only": _readonly(y.copy()), "strided": strided[::2],
              "one-hot": np.eye(3)[y]}[variant]
        a, b = classifier(backend), classifier(backend)
        ha = a.fit(X, y, loss="cross_entropy", seed=0, epochs=2, batch_size=4)
        hb = b.fit(X, yv, loss="cross_entropy", seed=0, epochs=2, batch_size=4)
        np.testing.assert_allclose(hb.batch_losses, ha.batch_losses, rtol=1e-6)
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            np.testing.assert_allclose(wb, wa, rtol=1e-5, atol=1e-7)
        if variant != "one-hot":
            assert ha.batch_losses == hb.batch_losses
            assert_weights_equal(a.get_weights(), b.get_weights())

    @pytest.mark.parametrize("variant", ["fortran", "strided", "read-only", "float64", "list",
                                         "1-D for one output"])
    def test_target_variants_mse(self, backend, data, variant):
        X, _, y, _ = data
        if variant == "1-D for one output":
            mk = lambda: nf.Sequential(nf.Dense(4, 3, activation="tanh"), nf.Dense(3, 1),
                                       seed=0, backend=backend)
            ref_y, yv = y[:, :1].copy(), y[:, 0].copy()
        else:
            mk = lambda: regressor(backend)
            wide = np.zeros((N, 4), np.float32); wide[:, ::2] = y
            ref_y = y
            yv = {"fortran": np.asfortranarray(y), "strided": wide[:, ::2],
                  "read-only": _readonly(y.copy()), "float64": y.astype(np.float64),
                  "list": y.tolist()}[variant]
        a, b = mk(), mk()
        ha = a.fit(X, ref_y, loss="mse", seed=0, batch_size=5)
        hb = b.fit(X, yv, loss="mse", seed=0, batch_size=5)
        assert ha.batch_losses == hb.batch_losses
        assert_weights_equal(a.get_weights(), b.get_weights())

    def test_batch_size_larger_than_n_is_full_batch(self, backend, data):
        X, y, _, _ = data
        a, b, c = classifier(backend), classifier(backend), classifier(backend)
        ha = a.fit(X, y, loss="cross_entropy", epochs=3, batch_size=None, seed=0)
        hb = b.fit(X, y, loss="cross_entropy", epochs=3, batch_size=10 * N, seed=0)
        hc = c.fit(X, y, loss="cross_entropy", epochs=3, batch_size=N, seed=0)
        assert ha.iterations == hb.iterations == hc.iterations == 3
        assert ha.steps == hb.steps == 3
        assert ha.batch_losses == hb.batch_losses
        assert_weights_equal(a.get_weights(), b.get_weights())
        assert_weights_equal(a.get_weights(), c.get_weights())

    def test_inputs_are_not_modified(self, backend, data):
        X, y, _, _ = data
        Xc, yc = X.copy(), y.copy()
        model = classifier(backend)
        model.fit(X, y, loss="cross_entropy", validation_data=(X, y), epochs=2, batch_size=3)
        model.predict(X)
        model.evaluate(X, y)
        model.compute_gradients(X, y, loss="cross_entropy")
        np.testing.assert_array_equal(X, Xc)
        np.testing.assert_array_equal(y, yc)


# ---------------------------------------------------------------------------------------
# the NaN/inf scan itself: the compiled bit test against np.isfinite
# ---------------------------------------------------------------------------------------
def _kernel_builds():
    from nnfast import _compiled
    return [_compiled.module_for(name) for name in _compiled.available_variants()]


def _special_values(dtype):
    """Finite values at every edge of the exponent range, and every kind of non-finite
    one (quiet and signalling NaNs with payloads, either sign)."""
    info = np.finfo(dtype)
    uint = np.uint32 if dtype == np.float32 else np.uint64
    bits = 32 if dtype == np.float32 else 64
    mant = info.nmant
    exp_all_ones = ((1 << (bits - 1 - mant)) - 1) << mant
    sign = 1 << (bits - 1)
    nonfinite = [exp_all_ones, exp_all_ones | sign,                     # +inf, -inf
                 exp_all_ones | (1 << (mant - 1)), exp_all_ones | 1,     # quiet, signalling
                 exp_all_ones | sign | 1, exp_all_ones | ((1 << mant) - 1)]
    finite = [info.max, -info.max, info.tiny, info.tiny / 2, info.smallest_subnormal,
              -0.0, 0.0, 1.0, np.nextafter(info.max, 0, dtype=dtype)]
    return (np.array(finite, dtype=dtype),
            np.array(nonfinite, dtype=uint).view(dtype))


class TestFiniteScan:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_every_value_kind_matches_isfinite(self, dtype):
        finite, nonfinite = _special_values(dtype)
        assert np.isfinite(finite).all() and not np.isfinite(nonfinite).any()
        for k in _kernel_builds():
            assert k.all_finite(finite)
            for v in nonfinite:
                assert not k.all_finite(np.array([v], dtype=dtype)), (k.__name__, v)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    @pytest.mark.parametrize("where", ["first", "block end", "block start", "last"])
    def test_one_bad_entry_anywhere(self, dtype, where):
        block = 1 << 16  # the kernel's FINITE_BLOCK: scanned between looks for a hit
        n = 3 * block + 5
        pos = {"first": 0, "block end": block - 1, "block start": block,
               "last": n - 1}[where]
        rng = np.random.default_rng(pos)
        x = (rng.standard_normal(n) * 1e30).astype(dtype)
        _, nonfinite = _special_values(dtype)
        for k in _kernel_builds():
            assert k.all_finite(x)
            for v in nonfinite:
                y = x.copy()
                y[pos] = v
                assert not k.all_finite(y), (k.__name__, where, v)

    def test_empty_and_read_only(self):
        for k in _kernel_builds():
            assert k.all_finite(np.zeros(0, np.float32))
            x = np.full(10, np.inf)
            x.setflags(write=False)
            assert not k.all_finite(x)

    @pytest.mark.parametrize("layout", ["C", "F", "strided", "float16", "big-endian",
                                        "3-D", "1-D", "complex"])
    def test_check_finite_on_either_path(self, layout):
        """check_finite takes the compiled scan for contiguous float32/float64 and NumPy's
        chunks for everything else; both find a NaN anywhere and pass finite data."""
        from nnfast._validation import check_finite
        base = np.random.default_rng(1).standard_normal((20000, 6))
        arr = {"C": base.astype(np.float32), "F": np.asfortranarray(base),
               "strided": base[::3, ::2], "float16": base.astype(np.float16),
               "big-endian": base.astype(">f4"), "3-D": base.reshape(100, 200, 6),
               "1-D": base.reshape(-1), "complex": base.astype(np.complex64)}[layout]
        check_finite(arr, "X")
        for index in [(0,) * arr.ndim, tuple(s - 1 for s in arr.shape),
                      tuple(s // 2 for s in arr.shape)]:
            bad = arr.copy(order="K")
            bad[index] = np.nan
            with pytest.raises(ValueError, match="X contains NaN"):
                check_finite(bad, "X")
