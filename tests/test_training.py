"""Training semantics (DESIGN §2-§3, issue 3 items 2-5 and 7).

Counting of iterations/steps/epochs, History contents, shuffling, exact gradient
accumulation (in ``fit`` and in the low-level loop), agreement of the two backends,
predict/evaluate (also in chunks), ``nf.batches`` and the low-level gradient API.
"""
import math
import warnings
import tracemalloc

import numpy as np
import pytest

import nnfast as nf

BACKENDS = ["cython", "numpy"]


# --------------------------------------------------------------------------- helpers
def make_classification(n=200, d=6, k=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    centers = rng.standard_normal((k, d)) * 1.5
    y = np.argmin(((X[:, None, :] - centers[None]) ** 2).sum(-1), axis=1).astype(np.int64)
    return X, y


def make_regression(n=200, d=6, k=2, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    Y = (np.sin(X[:, :k]) + 0.1 * rng.standard_normal((n, k))).astype(dtype)
    return X, Y


def clf_model(d=6, k=3, hidden=16, dtype="float64", seed=0, backend="cython"):
    return nf.Sequential(nf.Dense(d, hidden, activation="relu"),
                         nf.Dense(hidden, k, activation="softmax"),
                         dtype=dtype, seed=seed, backend=backend)


def reg_model(d=6, k=2, hidden=16, dtype="float64", seed=0, backend="cython"):
    return nf.Sequential(nf.Dense(d, hidden, activation="tanh"),
                         nf.Dense(hidden, k, activation="linear"),
                         dtype=dtype, seed=seed, backend=backend)


def assert_weights_close(ws_a, ws_b, rtol):
    assert len(ws_a) == len(ws_b)
    for a, b in zip(ws_a, ws_b):
        assert a.shape == b.shape
        scale = max(float(np.max(np.abs(a))), float(np.max(np.abs(b))), 1e-30)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale)


def assert_weights_equal(ws_a, ws_b):
    assert len(ws_a) == len(ws_b)
    for a, b in zip(ws_a, ws_b):
        np.testing.assert_array_equal(a, b)


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def manual_forward(weights, activations, X):
    """Float64 forward pass with NumPy from get_weights()."""
    a = np.asarray(X, dtype=np.float64)
    for i, act in enumerate(activations):
        W = weights[2 * i].astype(np.float64)
        b = weights[2 * i + 1].astype(np.float64)
        z = a @ W + b
        if act == "relu":
            a = np.maximum(z, 0)
        elif act == "tanh":
            a = np.tanh(z)
        elif act == "sigmoid":
            a = 1 / (1 + np.exp(-z))
        elif act == "softmax":
            a = softmax(z)
        elif act == "leaky_relu":
            a = np.where(z > 0, z, 0.01 * z)
        else:
            a = z
    return a


# --------------------------------------------------------------------------- counting
@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_1000_samples_batch_100_ten_epochs(backend):
    X, y = make_classification(n=1000)
    model = clf_model(backend=backend)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01), epochs=10,
                     batch_size=100, seed=0)
    assert hist.iterations == 100
    assert hist.steps == 100
    assert hist.epochs == 10
    for value in (hist.iterations, hist.steps, hist.epochs):
        assert type(value) is int
    assert len(hist.batch_losses) == 100
    assert len(hist.history["loss"]) == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_with_accumulate_3(backend):
    X, y = make_classification(n=1000)
    model = clf_model(backend=backend)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01), epochs=10,
                     batch_size=100, accumulate=3, seed=0)
    # 10 iterations per epoch, ceil(10 / 3) = 4 steps per epoch
    assert hist.iterations == 100
    assert hist.steps == 40
    assert hist.epochs == 10
    assert len(hist.batch_losses) == 100


@pytest.mark.parametrize("n, batch_size, accumulate, drop_last, iters, steps", [
    (1000, 300, 1, False, 4, 4),
    (1000, 300, 1, True, 3, 3),
    (1000, 300, 2, True, 3, 2),
    (1000, 300, 2, False, 4, 2),
    (1000, 250, 1, True, 4, 4),     # divides evenly: drop_last drops nothing
    (37, 5, 3, False, 8, 3),
    (37, 5, 3, True, 7, 3),
])
def test_counts_per_epoch_formulas(n, batch_size, accumulate, drop_last, iters, steps):
    X, y = make_classification(n=n)
    model = clf_model()
    epochs = 2
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01), epochs=epochs,
                     batch_size=batch_size, accumulate=accumulate, drop_last=drop_last, seed=1)
    assert iters == (n // batch_size if drop_last else math.ceil(n / batch_size))
    assert steps == math.ceil(iters / accumulate)
    assert hist.iterations == epochs * iters
    assert hist.steps == epochs * steps
    assert len(hist.batch_losses) == epochs * iters


def test_drop_last_that_leaves_no_iteration_is_rejected():
    # DESIGN §3: drop_last=True that would leave zero iterations is a ValueError
    # (batch 32 > 20 samples: floor(20 / 32) = 0 iterations)
    X, y = make_classification(n=20)
    model = clf_model()
    with pytest.raises(ValueError):
        model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01), batch_size=32,
                  drop_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_none_is_full_batch(backend):
    X, y = make_classification(n=150)
    model = clf_model(backend=backend)
    initial = model.evaluate(X, y, loss="cross_entropy")["loss"]
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=4,
                     batch_size=None, seed=0)
    assert hist.iterations == 4
    assert hist.steps == 4
    # the first full batch is the whole set at the initial weights
    assert hist.batch_losses[0] == pytest.approx(initial, rel=1e-12)
    # with one iteration per epoch, the epoch loss is that iteration's loss
    np.testing.assert_allclose(hist.history["loss"], hist.batch_losses, rtol=1e-12)


def test_batch_size_larger_than_n_is_full_batch():
    X, y = make_classification(n=150)
    a = clf_model()
    b = clf_model()
    ha = a.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1, momentum=0.9), epochs=3,
               batch_size=None, seed=0)
    hb = b.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1, momentum=0.9), epochs=3,
               batch_size=1000, seed=0)
    assert hb.iterations == 3 and hb.steps == 3
    np.testing.assert_allclose(hb.batch_losses, ha.batch_losses, rtol=1e-12)
    assert_weights_close(a.get_weights(), b.get_weights(), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_size_1_is_plain_sgd(backend):
    X, y = make_classification(n=20)
    model = clf_model(backend=backend)
    ref = clf_model(backend=backend)
    opt = nf.SGD(lr=0.05)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=1,
                     shuffle=False)
    assert hist.iterations == 40
    assert hist.steps == 40
    # one step per sample, in data order
    ref_opt = nf.SGD(lr=0.05)
    for _ in range(2):
        for i in range(20):
            ref.compute_gradients(X[i:i + 1], y[i:i + 1], loss="cross_entropy")
            ref_opt.step(ref)
    assert_weights_close(model.get_weights(), ref.get_weights(), rtol=1e-12)


# --------------------------------------------------------------------------- history
@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_loss_is_sample_weighted_mean_of_batch_losses(backend):
    X, y = make_classification(n=1000)
    model = clf_model(backend=backend)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=3,
                     batch_size=300, seed=0)
    sizes = np.array([300, 300, 300, 100], dtype=np.float64)
    losses = np.array(hist.batch_losses).reshape(3, 4)
    expected = (losses * sizes).sum(axis=1) / sizes.sum()
    np.testing.assert_allclose(hist.history["loss"], expected, rtol=1e-12)
    # and it differs from the plain mean of the batch losses (the short batch counts less)
    assert not np.allclose(hist.history["loss"], losses.mean(axis=1), rtol=1e-9, atol=0)


def test_history_keys_classification_with_validation():
    X, y = make_classification(n=300)
    model = clf_model()
    hist = model.fit(X[:200], y[:200], loss="cross_entropy", optimizer=nf.SGD(lr=0.1),
                     epochs=3, batch_size=32, seed=0, validation_data=(X[200:], y[200:]))
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in hist.history.items():
        assert len(values) == 3, key
        assert all(isinstance(v, float) for v in values), key
    for v in hist.history["accuracy"] + hist.history["val_accuracy"]:
        assert 0.0 <= v <= 1.0


def test_history_keys_classification_without_validation():
    X, y = make_classification(n=100)
    hist = clf_model().fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=2,
                           seed=0)
    assert set(hist.history) == {"loss", "accuracy"}


def test_history_keys_regression():
    X, Y = make_regression(n=300)
    model = reg_model()
    hist = model.fit(X[:200], Y[:200], loss="mse", optimizer=nf.SGD(lr=0.05), epochs=2,
                     seed=0, validation_data=(X[200:], Y[200:]))
    assert set(hist.history) == {"loss", "val_loss"}
    hist = reg_model().fit(X, Y, loss="mse", optimizer=nf.SGD(lr=0.05), epochs=2, seed=0)
    assert set(hist.history) == {"loss"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_val_loss_equals_evaluate_after_the_epoch(backend, loss):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((260, 5))
    if loss == "cross_entropy":
        y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
        last, k = "softmax", 3
    elif loss == "binary_cross_entropy":
        y = np.stack([X[:, 0] > 0, X[:, 2] < 0.3], axis=1).astype(np.float64)
        last, k = "sigmoid", 2
    else:
        y = np.stack([np.sin(X[:, 0]), X[:, 1] * X[:, 2]], axis=1)
        last, k = "linear", 2
    model = nf.Sequential(nf.Dense(5, 12, activation="tanh"), nf.Dense(12, k, activation=last),
                          dtype="float64", seed=1, backend=backend)
    Xt, yt, Xv, yv = X[:200], y[:200], X[200:], y[200:]
    opt = nf.Adam(lr=0.01)
    for epoch in range(3):   # epochs=1 repeatedly: val_loss is right after that epoch
        hist = model.fit(Xt, yt, loss=loss, optimizer=opt, epochs=1, batch_size=16,
                         seed=epoch, validation_data=(Xv, yv))
        res = model.evaluate(Xv, yv, loss=loss)
        assert hist.history["val_loss"][0] == pytest.approx(res["loss"], rel=1e-12)
        if loss != "mse":
            assert hist.history["val_accuracy"][0] == pytest.approx(res["accuracy"], rel=1e-12)
    # the validation loss is of the validation set, not of the training set
    assert hist.history["val_loss"][0] != pytest.approx(
        model.evaluate(Xt, yt, loss=loss)["loss"], rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_loss_and_accuracy_with_frozen_weights_equal_evaluate(backend):
    # lr=0: the weights never change, so the on-the-fly epoch loss/accuracy are those of
    # the whole set at the (fixed) weights
    X, y = make_classification(n=250)
    model = clf_model(backend=backend)
    before = model.evaluate(X, y, loss="cross_entropy")
    hist = model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.0), epochs=2,
                     batch_size=32, seed=0)
    for e in range(2):
        assert hist.history["loss"][e] == pytest.approx(before["loss"], rel=1e-12)
        assert hist.history["accuracy"][e] == pytest.approx(before["accuracy"], rel=1e-12)


# --------------------------------------------------------------------------- shuffling
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_bit_identical(backend, dtype):
    X, y = make_classification(n=300)
    ws = []
    for _ in range(2):
        model = clf_model(dtype=dtype, backend=backend, seed=4)
        model.fit(X, y, loss="cross_entropy", optimizer=nf.Adam(lr=0.01), epochs=3,
                  batch_size=32, shuffle=True, seed=11)
        ws.append(model.get_weights())
    assert_weights_equal(ws[0], ws[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_different_seed_gives_different_weights(backend):
    X, y = make_classification(n=300)
    ws = []
    for seed in (11, 12):
        model = clf_model(backend=backend, seed=4)
        model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                  batch_size=32, shuffle=True, seed=seed)
        ws.append(model.get_weights())
    assert not np.allclose(ws[0][0], ws[1][0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffle_false_keeps_data_order(backend):
    X, y = make_classification(n=110)
    model = clf_model(backend=backend)
    ref = clf_model(backend=backend)
    opt, ref_opt = nf.SGD(lr=0.05, momentum=0.9), nf.SGD(lr=0.05, momentum=0.9)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=25,
                     shuffle=False, seed=123)
    ref_losses = []
    for _ in range(2):
        for start in range(0, 110, 25):
            ref_losses.append(ref.compute_gradients(X[start:start + 25], y[start:start + 25],
                                                    loss="cross_entropy"))
            ref_opt.step(ref)
    np.testing.assert_allclose(hist.batch_losses, ref_losses, rtol=1e-12)
    assert_weights_close(model.get_weights(), ref.get_weights(), rtol=1e-12)
    # the seed does not matter without shuffling
    other = clf_model(backend=backend)
    other.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05, momentum=0.9), epochs=2,
              batch_size=25, shuffle=False, seed=999)
    assert_weights_equal(other.get_weights(), model.get_weights())


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffle_true_uses_one_rng_permutation_per_epoch(backend):
    # DESIGN §3: one rng = default_rng(seed) per fit; every epoch perm = rng.permutation(N),
    # cut into consecutive batches
    X, y = make_classification(n=110)
    model = clf_model(backend=backend)
    ref = clf_model(backend=backend)
    opt, ref_opt = nf.Adam(lr=0.01), nf.Adam(lr=0.01)
    hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=25,
                     shuffle=True, seed=5)
    rng = np.random.default_rng(5)
    ref_losses = []
    for _ in range(3):
        perm = rng.permutation(110)
        for start in range(0, 110, 25):
            idx = perm[start:start + 25]
            ref_losses.append(ref.compute_gradients(X[idx], y[idx], loss="cross_entropy"))
            ref_opt.step(ref)
    np.testing.assert_allclose(hist.batch_losses, ref_losses, rtol=1e-12)
    assert_weights_close(model.get_weights(), ref.get_weights(), rtol=1e-12)


# --------------------------------------------------------------------------- accumulation
OPTIMIZERS = {
    "sgd_momentum": lambda: nf.SGD(lr=0.05, momentum=0.9),
    "sgd_nesterov_wd": lambda: nf.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: nf.Adam(lr=0.01),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_accumulation_equals_larger_batch(backend, opt_name, loss):
    # N=100: batch 8 x accumulate 3 and batch 24 both step on 24, 24, 24, 24, 4 samples
    if loss == "cross_entropy":
        X, y = make_classification(n=100)
        make = clf_model
    else:
        X, y = make_regression(n=100)
        make = reg_model
    acc = make(backend=backend, seed=2)
    big = make(backend=backend, seed=2)
    h_acc = acc.fit(X, y, loss=loss, optimizer=OPTIMIZERS[opt_name](), epochs=3, batch_size=8,
                    accumulate=3, shuffle=True, seed=7)
    h_big = big.fit(X, y, loss=loss, optimizer=OPTIMIZERS[opt_name](), epochs=3, batch_size=24,
                    shuffle=True, seed=7)
    assert (h_acc.iterations, h_acc.steps) == (39, 15)
    assert (h_big.iterations, h_big.steps) == (15, 15)
    assert_weights_close(acc.get_weights(), big.get_weights(), rtol=1e-12)
    # the epoch losses are the same set of per-sample losses, grouped differently
    # (the weights only change at the steps, which coincide)
    np.testing.assert_allclose(h_acc.history["loss"], h_big.history["loss"], rtol=1e-12)
    # sanity: without accumulation, batch 8 is a different trajectory
    plain = make(backend=backend, seed=2)
    plain.fit(X, y, loss=loss, optimizer=OPTIMIZERS[opt_name](), epochs=3, batch_size=8,
              shuffle=True, seed=7)
    assert not np.allclose(plain.get_weights()[0], big.get_weights()[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_low_level_micro_batches_5_7_12_equal_one_step_on_24(backend, opt_name):
    X, y = make_classification(n=48)
    acc = clf_model(backend=backend, seed=3)
    one = clf_model(backend=backend, seed=3)
    opt_acc, opt_one = OPTIMIZERS[opt_name](), OPTIMIZERS[opt_name]()
    for base in (0, 24):   # two steps, so the optimizer state (momentum, moments) matters
        losses = []
        for a, b in ((0, 5), (5, 12), (12, 24)):
            losses.append(acc.compute_gradients(X[base + a:base + b], y[base + a:base + b],
                                                loss="cross_entropy"))
        big_loss = one.compute_gradients(X[base:base + 24], y[base:base + 24],
                                         loss="cross_entropy")
        # compute_gradients returns each batch's mean loss
        assert (5 * losses[0] + 7 * losses[1] + 12 * losses[2]) / 24 == pytest.approx(
            big_loss, rel=1e-12)
        assert_weights_close(acc.gradients(), one.gradients(), rtol=1e-12)
        opt_acc.step(acc)
        opt_one.step(one)
        assert_weights_close(acc.get_weights(), one.get_weights(), rtol=1e-12)


# --------------------------------------------------------------------------- backends
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_initial_weights_on_both_backends(dtype):
    def build(backend):
        return nf.Sequential(nf.Dense(7, 20, activation="relu"),
                             nf.Dense(20, 9, activation="tanh"),
                             nf.Dense(9, 4, activation="leaky_relu"),
                             nf.Dense(4, 3, activation="softmax"),
                             dtype=dtype, seed=42, backend=backend)
    c, n = build("cython"), build("numpy")
    assert_weights_equal(c.get_weights(), n.get_weights())
    # DESIGN §3: layer by layer W = rng.uniform(-limit, limit, (in, out)) in float64, cast;
    # He after ReLU-family, Glorot otherwise; biases zero
    rng = np.random.default_rng(42)
    shapes = [(7, 20, True), (20, 9, False), (9, 4, True), (4, 3, False)]
    ws = c.get_weights()
    for i, (fan_in, fan_out, he) in enumerate(shapes):
        limit = math.sqrt(6 / fan_in) if he else math.sqrt(6 / (fan_in + fan_out))
        expected = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)
        assert ws[2 * i].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(ws[2 * i], expected)
        np.testing.assert_array_equal(ws[2 * i + 1], np.zeros(fan_out, dtype=dtype))
    # a different seed gives a different network
    other = nf.Sequential(nf.Dense(7, 20, activation="relu"), nf.Dense(20, 9), dtype=dtype,
                          seed=43)
    assert not np.array_equal(other.get_weights()[0], ws[0])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
def test_backends_agree_after_three_shuffled_epochs_float32(loss, opt_name):
    if loss == "cross_entropy":
        X, y = make_classification(n=400, dtype=np.float32)
        make = clf_model
    else:
        X, y = make_regression(n=400, dtype=np.float32)
        make = reg_model
    models = {}
    for backend in BACKENDS:
        m = make(dtype="float32", backend=backend, seed=9)
        m.fit(X, y, loss=loss, optimizer=OPTIMIZERS[opt_name](), epochs=3, batch_size=32,
              shuffle=True, seed=3)
        models[backend] = m
    assert_weights_close(models["cython"].get_weights(), models["numpy"].get_weights(),
                         rtol=1e-4)
    np.testing.assert_allclose(models["cython"].predict(X), models["numpy"].predict(X),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- predict / evaluate
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_softmax_probabilities(backend, dtype):
    X, _ = make_classification(n=300, d=6, k=4)
    model = nf.Sequential(nf.Dense(6, 16, activation="relu"), nf.Dense(16, 4, activation="softmax"),
                          dtype=dtype, seed=0, backend=backend)
    P = model.predict(X)
    assert P.shape == (300, 4)
    assert P.dtype == np.dtype(dtype)
    assert np.all(P >= 0) and np.all(P <= 1)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=0, atol=1e-6 if dtype == "float32" else 1e-12)
    expected = manual_forward(model.get_weights(), ["relu", "softmax"], X.astype(dtype))
    np.testing.assert_allclose(P, expected, rtol=1e-5 if dtype == "float32" else 1e-12,
                               atol=1e-6 if dtype == "float32" else 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_sigmoid_and_linear_outputs(backend):
    X, _ = make_classification(n=200, d=6)
    sig = nf.Sequential(nf.Dense(6, 8, activation="tanh"), nf.Dense(8, 3, activation="sigmoid"),
                        dtype="float64", seed=1, backend=backend)
    P = sig.predict(X)
    assert P.shape == (200, 3)
    assert np.all(P > 0) and np.all(P < 1)
    np.testing.assert_allclose(P, manual_forward(sig.get_weights(), ["tanh", "sigmoid"], X),
                               rtol=1e-12)
    lin = nf.Sequential(nf.Dense(6, 8, activation="leaky_relu"), nf.Dense(8, 2),
                        dtype="float64", seed=1, backend=backend)
    out = lin.predict(X)
    np.testing.assert_allclose(out, manual_forward(lin.get_weights(), ["leaky_relu", "linear"], X),
                               rtol=1e-12, atol=1e-14)
    assert np.any(out < 0)   # raw outputs, not squashed


def _reference_losses(P, y, loss):
    if loss == "cross_entropy":
        per = -np.log(P[np.arange(len(y)), y])
        acc = np.mean(P.argmax(axis=1) == y)
    elif loss == "binary_cross_entropy":
        per = -(y * np.log(P) + (1 - y) * np.log(1 - P)).sum(axis=1)
        acc = np.mean((P > 0.5) == (y > 0.5))
    else:
        per = 0.5 * ((P - y) ** 2).sum(axis=1)
        acc = None
    return per.mean(), acc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_evaluate_matches_reference_losses(backend, loss):
    rng = np.random.default_rng(8)
    X = rng.standard_normal((300, 5))
    if loss == "cross_entropy":
        y, last, k = rng.integers(0, 4, 300), "softmax", 4
    elif loss == "binary_cross_entropy":
        y, last, k = (rng.random((300, 2)) > 0.5).astype(np.float64), "sigmoid", 2
    else:
        y, last, k = rng.standard_normal((300, 2)), "linear", 2
    model = nf.Sequential(nf.Dense(5, 10, activation="tanh"), nf.Dense(10, k, activation=last),
                          dtype="float64", seed=5, backend=backend)
    res = model.evaluate(X, y, loss=loss)
    P = manual_forward(model.get_weights(), ["tanh", last], X)
    ref_loss, ref_acc = _reference_losses(P, y, loss)
    assert res["loss"] == pytest.approx(ref_loss, rel=1e-10)
    if ref_acc is None:
        assert "accuracy" not in res
    else:
        assert res["accuracy"] == pytest.approx(ref_acc, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_and_evaluate_large_input_in_chunks(backend):
    n, d, k = 300_000, 8, 3
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, k, n)
    model = nf.Sequential(nf.Dense(d, 64, activation="relu"), nf.Dense(64, k, activation="softmax"),
                          dtype="float32", seed=0, backend=backend)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        P = model.predict(X)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert P.shape == (n, k)
    # unchunked, the hidden layer alone would need n * 64 * 4 bytes (77 MB) per temporary;
    # chunked, the peak is the output plus bounded buffers
    full_hidden = n * 64 * 4
    assert peak - base < full_hidden / 2, f"predict peaked at {(peak - base) / 1e6:.1f} MB"
    # equals a forward pass on small slices
    step = 4999
    parts = [model.predict(X[s:s + step]) for s in range(0, n, step)]
    np.testing.assert_allclose(P, np.concatenate(parts), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-5)
    sl = slice(123_456, 123_789)
    np.testing.assert_allclose(P[sl], manual_forward(model.get_weights(), ["relu", "softmax"],
                                                     X[sl]), rtol=1e-4, atol=1e-6)
    # evaluate over the whole set = sample-weighted combination of slices
    res = model.evaluate(X, y, loss="cross_entropy")
    total, correct = 0.0, 0.0
    for s in range(0, n, 50_000):
        r = model.evaluate(X[s:s + 50_000], y[s:s + 50_000], loss="cross_entropy")
        m = len(X[s:s + 50_000])
        total += r["loss"] * m
        correct += r["accuracy"] * m
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["accuracy"] == pytest.approx(correct / n, rel=1e-9)


# --------------------------------------------------------------------------- nf.batches
def test_batches_cover_all_samples_once_with_shapes():
    n, d = 103, 4
    X = np.arange(n * d, dtype=np.float64).reshape(n, d)
    y = np.arange(n)
    got = list(nf.batches(X, y, batch_size=10, shuffle=True, seed=3))
    assert len(got) == 11
    for i, (xb, yb) in enumerate(got):
        m = 10 if i < 10 else 3
        assert xb.shape == (m, d) and yb.shape == (m,)
        np.testing.assert_array_equal(xb, X[yb])       # rows stay paired with their labels
    order = np.concatenate([yb for _, yb in got])
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    assert not np.array_equal(order, np.arange(n))     # actually shuffled
    # the permutation is numpy.random.default_rng(seed).permutation(N), cut in order
    np.testing.assert_array_equal(order, np.random.default_rng(3).permutation(n))


def test_batches_seed_determinism():
    X = np.random.default_rng(0).standard_normal((50, 3))
    y = np.arange(50)
    a = [yb for _, yb in nf.batches(X, y, batch_size=7, shuffle=True, seed=1)]
    b = [yb for _, yb in nf.batches(X, y, batch_size=7, shuffle=True, seed=1)]
    c = [yb for _, yb in nf.batches(X, y, batch_size=7, shuffle=True, seed=2)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and len(a) == len(b) == 8
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))


def test_batches_without_shuffle_keep_order_and_drop_last():
    X = np.arange(46, dtype=np.float64).reshape(23, 2)
    y = np.arange(23)
    got = list(nf.batches(X, y, batch_size=5, shuffle=False))
    assert [len(yb) for _, yb in got] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in got]), X)
    dropped = list(nf.batches(X, y, batch_size=5, shuffle=False, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in dropped]), np.arange(20))
    shuffled = list(nf.batches(X, y, batch_size=5, shuffle=True, seed=0, drop_last=True))
    assert [len(yb) for _, yb in shuffled] == [5, 5, 5, 5]
    assert len(np.unique(np.concatenate([yb for _, yb in shuffled]))) == 20
    full = list(nf.batches(X, y, batch_size=None, shuffle=False))
    assert len(full) == 1 and full[0][0].shape == (23, 2)
    only_x = list(nf.batches(X, batch_size=10, shuffle=False))
    assert [xb.shape for xb in only_x] == [(10, 2), (10, 2), (3, 2)]


def test_batches_drop_last_that_leaves_no_batch_is_rejected():
    # DESIGN §3: drop_last=True that would leave zero iterations is a ValueError
    X = np.arange(46, dtype=np.float64).reshape(23, 2)
    y = np.arange(23)
    with pytest.raises(ValueError):
        list(nf.batches(X, y, batch_size=30, drop_last=True))


# --------------------------------------------------------------------------- evaluate(loss=None)
def test_evaluate_loss_none_uses_last_fit_loss():
    X, y = make_classification(n=100)
    model = clf_model()
    with pytest.raises(ValueError):
        model.evaluate(X, y)             # never fitted: the loss must be named
    model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=1, seed=0)
    assert model.evaluate(X, y) == model.evaluate(X, y, loss="cross_entropy")
    assert "accuracy" in model.evaluate(X, y)

    Xr, Yr = make_regression(n=100)
    reg = nf.Sequential(nf.Dense(6, 8, activation="tanh"), nf.Dense(8, 2, activation="sigmoid"),
                        dtype="float64", seed=0)
    Yb = (Yr > 0).astype(np.float64)
    reg.fit(Xr, Yb, loss="mse", optimizer=nf.SGD(lr=0.1), epochs=1, seed=0)
    res = reg.evaluate(Xr, Yb)
    assert set(res) == {"loss"}          # mse, not binary_cross_entropy
    assert res == reg.evaluate(Xr, Yb, loss="mse")
    reg.fit(Xr, Yb, loss="binary_cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=1, seed=0)
    assert reg.evaluate(Xr, Yb) == reg.evaluate(Xr, Yb, loss="binary_cross_entropy")


# --------------------------------------------------------------------------- weights, gradients
@pytest.mark.parametrize("backend", BACKENDS)
def test_get_weights_returns_copies(backend):
    X, _ = make_classification(n=20)
    model = clf_model(backend=backend)
    before = model.predict(X)
    ws = model.get_weights()
    saved = [w.copy() for w in ws]
    assert len(ws) == 4
    assert [w.shape for w in ws] == [(6, 16), (16,), (16, 3), (3,)]
    for w in ws:
        w += 1.0
    assert_weights_equal(model.get_weights(), saved)
    np.testing.assert_array_equal(model.predict(X), before)
    # set_weights copies in as well
    model.set_weights(ws)
    ws[0][...] = 0
    np.testing.assert_array_equal(model.get_weights()[0], saved[0] + 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_nothing_accumulated_raises(backend):
    X, y = make_classification(n=20)
    model = clf_model(backend=backend)
    for opt in (nf.SGD(lr=0.1), nf.Adam()):
        with pytest.raises(ValueError):
            opt.step(model)
    opt = nf.SGD(lr=0.1, momentum=0.9)
    model.compute_gradients(X, y, loss="cross_entropy")
    opt.step(model)
    with pytest.raises(ValueError):      # the step consumed the gradients
        opt.step(model)
    model.compute_gradients(X, y, loss="cross_entropy")
    model.zero_grad()
    before = model.get_weights()
    with pytest.raises(ValueError):      # zero_grad cleared them
        opt.step(model)
    assert_weights_equal(model.get_weights(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_sum_over_count(backend):
    X, y = make_classification(n=30)
    acc = clf_model(backend=backend)
    with pytest.raises(ValueError):
        acc.gradients()                  # nothing accumulated
    acc.compute_gradients(X[:4], y[:4], loss="cross_entropy")
    acc.compute_gradients(X[4:30], y[4:30], loss="cross_entropy")
    singles = []
    for sl in (slice(0, 4), slice(4, 30)):
        m = clf_model(backend=backend)
        m.compute_gradients(X[sl], y[sl], loss="cross_entropy")
        singles.append(m.gradients())
    expected = [(4 * a + 26 * b) / 30 for a, b in zip(*singles)]
    assert_weights_close(acc.gradients(), expected, rtol=1e-12)
    # gradients() does not consume the sums
    assert_weights_close(acc.gradients(), expected, rtol=1e-12)
    # layout like get_weights()
    assert [g.shape for g in acc.gradients()] == [w.shape for w in acc.get_weights()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy", "mse"])
def test_gradients_match_finite_differences(backend, loss):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((9, 4))
    if loss == "cross_entropy":
        y, last, k = rng.integers(0, 3, 9), "softmax", 3
    elif loss == "binary_cross_entropy":
        y, last, k = rng.random((9, 2)), "sigmoid", 2
    else:
        y, last, k = rng.standard_normal((9, 2)), "linear", 2
    model = nf.Sequential(nf.Dense(4, 5, activation="tanh"), nf.Dense(5, k, activation=last),
                          dtype="float64", seed=0, backend=backend)
    model.compute_gradients(X, y, loss=loss)
    grads = model.gradients()
    ws = model.get_weights()
    h = 1e-6
    for p, (w, g) in enumerate(zip(ws, grads)):
        num = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            vals = []
            for sign in (1, -1):
                trial = [x.copy() for x in ws]
                trial[p][idx] += sign * h
                model.set_weights(trial)
                vals.append(model.evaluate(X, y, loss=loss)["loss"])
            num[idx] = (vals[0] - vals[1]) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_and_step_clear_the_sums(backend):
    X, y = make_classification(n=40)
    model = clf_model(backend=backend)
    fresh = clf_model(backend=backend)
    model.compute_gradients(X[:20], y[:20], loss="cross_entropy")
    model.zero_grad()
    with pytest.raises(ValueError):
        model.gradients()
    model.compute_gradients(X[20:], y[20:], loss="cross_entropy")
    fresh.compute_gradients(X[20:], y[20:], loss="cross_entropy")
    assert_weights_close(model.gradients(), fresh.gradients(), rtol=1e-12)
    # after a step, the next gradient is that of the new weights alone
    nf.SGD(lr=0.1).step(model)
    model.compute_gradients(X[:20], y[:20], loss="cross_entropy")
    probe = clf_model(backend=backend)
    probe.set_weights(model.get_weights())
    probe.compute_gradients(X[:20], y[:20], loss="cross_entropy")
    assert_weights_close(model.gradients(), probe.gradients(), rtol=1e-12)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_overflowing_validation_loss_is_reported_not_raised(backend):
    """Training loss and weights finite, validation loss past float64's range: fit
    returns, and val_loss is not finite, as evaluate says (found by the fuzz tests)."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((1, 1)) * 1e30).astype(np.float32)
    y = rng.standard_normal((1, 2)).astype(np.float32)
    Xv = rng.standard_normal((1, 1)).astype(np.float32)
    yv = rng.standard_normal((1, 2)).astype(np.float32)
    model = nf.Sequential(nf.Dense(1, 5, activation="leaky_relu"),
                          nf.Dense(5, 3, activation="relu"), nf.Dense(3, 2, activation="relu"),
                          dtype="float64", seed=113, backend=backend)
    with warnings.catch_warnings():   # no RuntimeWarning either (the NumPy backend's
        warnings.simplefilter("error")  # matmul overflows: inf, then NaN)
        hist = model.fit(X, y, loss="mse", optimizer=nf.SGD(lr=0.01), epochs=2,
                         batch_size=None, shuffle=False, validation_data=(Xv, yv))
        now = model.evaluate(Xv, yv)["loss"]
    assert all(math.isfinite(v) for v in hist.history["loss"] + hist.batch_losses)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert math.isfinite(hist.history["val_loss"][0])
    assert not math.isfinite(hist.history["val_loss"][-1])
    assert np.array_equal(now, hist.history["val_loss"][-1], equal_nan=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_predict_in_chunks_of_the_workspace(dtype, chunk, monkeypatch):
    # predict's workspace holds `chunk` rows (chunks of at most _CHUNK_ELEMS values a
    # layer); the compiled predict runs all the chunks in one call (NetworkPlan.forward):
    # the hand loops for small chunks, gemm for large ones, a short last chunk; each row
    # must come out as the NumPy backend's
    from nnfast import model as model_module
    monkeypatch.setattr(model_module, "_CHUNK_ELEMS", 96 * chunk)   # 96: the widest layer
    rng = np.random.default_rng(3)
    X = rng.standard_normal((150, 20)).astype(dtype)
    fast, ref = [nf.Sequential(nf.Dense(20, 96, activation="relu"),
                               nf.Dense(96, 33, activation="tanh"),
                               nf.Dense(33, 4, activation="softmax"),
                               dtype=dtype, seed=5, backend=b) for b in BACKENDS]
    tol = dict(rtol=2e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    P = fast.predict(X)
    assert fast._workspace.capacity == chunk and P.shape == (150, 4) and P.dtype == dtype
    np.testing.assert_allclose(P, ref.predict(X), **tol)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, rtol=1e-5)
    for n in (1, chunk, chunk + 1):
        np.testing.assert_allclose(fast.predict(X[:n]), P[:n], **tol)
    # a larger workspace (a fit's batches) serves predict as it is
    fast.compute_gradients(X[:100], np.arange(100) % 4, "cross_entropy")
    fast.zero_grad()
    np.testing.assert_allclose(fast.predict(X), P, **tol)
    assert fast._workspace.capacity == 100


def test_the_plans_forward_checks_its_arrays():
    model = nf.Sequential(nf.Dense(6, 5, activation="relu"), nf.Dense(5, 3), seed=0)
    model.predict(np.zeros((4, 6), np.float32))
    plan = model._backend._plan(model.layers, model._workspace)
    X = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="out must be"):
        plan.forward(X, np.empty((4, 2), np.float32))
    with pytest.raises(ValueError, match="X width"):
        plan.forward(np.ones((4, 5), np.float32), np.empty((4, 3), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        plan.forward(X.astype(np.float64), np.empty((4, 3), np.float64))
    out = np.empty((4, 3), np.float32)
    plan.forward(X, out)
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-6)


@pytest.mark.parametrize("block", [1, 50, 1000, 1 << 20])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_initial_weights_drawn_in_blocks_are_one_draw(dtype, block, monkeypatch):
    # build draws W in blocks of rows (at least one row: a block smaller than a row still
    # takes whole rows); the generator's stream makes that the single draw of DESIGN §3
    from nnfast import layers as layers_module
    monkeypatch.setattr(layers_module, "_INIT_BLOCK", block)
    model = nf.Sequential(nf.Dense(37, 90, activation="relu"), nf.Dense(90, 3),
                          dtype=dtype, seed=7)
    rng = np.random.default_rng(7)
    for W, (fan_in, fan_out, he) in zip(model.get_weights()[::2],
                                        [(37, 90, True), (90, 3, False)]):
        limit = math.sqrt(6 / fan_in) if he else math.sqrt(6 / (fan_in + fan_out))
        np.testing.assert_array_equal(
            W, rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype))


def test_building_a_large_layer_needs_no_float64_copy_of_it():
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        model = nf.Sequential(nf.Dense(2048, 2048), seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    w_bytes = model.layers[0].W.nbytes            # 16 MB in float32
    # W and dW, plus one block of the draw (8 MB of float64); drawn whole, the float64
    # temporary alone would be 2 * w_bytes more
    assert peak - base < 2 * w_bytes + 10e6, f"peak {(peak - base) / 1e6:.1f} MB"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [5, 64, 1 << 14])
def test_evaluate_sees_the_outputs_predict_returns(backend, chunk, monkeypatch):
    # both run the same forward pass over the same chunks of rows (forward_rows /
    # NetworkPlan.forward on the compiled backend)
    from nnfast import model as model_module
    monkeypatch.setattr(model_module, "_CHUNK_ELEMS", 40 * chunk)   # 40: the widest layer
    rng = np.random.default_rng(8)
    X = rng.standard_normal((301, 12)).astype(np.float32)
    y = rng.integers(0, 5, 301)
    model = nf.Sequential(nf.Dense(12, 40, activation="relu"),
                          nf.Dense(40, 5, activation="softmax"), seed=1, backend=backend)
    res = model.evaluate(X, y, loss="cross_entropy")
    P = model.predict(X)
    assert res["accuracy"] == np.mean(P.argmax(axis=1) == y)
    expected = -np.mean(np.log(P.astype(np.float64)[np.arange(301), y]))
    assert res["loss"] == pytest.approx(expected, rel=1e-5)
    mse = nf.Sequential(nf.Dense(12, 40, activation="relu"), nf.Dense(40, 5),
                        seed=1, backend=backend)
    T = rng.standard_normal((301, 5)).astype(np.float32)
    expected = np.mean(np.sum((mse.predict(X).astype(np.float64) - T) ** 2, axis=1)) / 2
    assert mse.evaluate(X, T, loss="mse")["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_plans_forward_rows_checks_its_rows():
    model = nf.Sequential(nf.Dense(6, 5, activation="relu"), nf.Dense(5, 3), seed=0)
    model.predict(np.zeros((4, 6), np.float32))
    plan = model._backend._plan(model.layers, model._workspace)
    with pytest.raises(ValueError, match="capacity"):
        plan.forward_rows(np.ones((5, 6), np.float32))
    with pytest.raises(ValueError, match="X width"):
        plan.forward_rows(np.ones((4, 7), np.float32))
    plan.forward_rows(np.ones((3, 6), np.float32))
    np.testing.assert_allclose(model._workspace.A[-1][:3],
                               model.predict(np.ones((3, 6), np.float32)), rtol=1e-6)
