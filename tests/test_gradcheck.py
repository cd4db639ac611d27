"""Finite-difference gradient check of a 3-layer network, float64, both backends.

For every hidden activation x every loss (mse with an identity, sigmoid or tanh last
layer; cross_entropy with a softmax last layer and integer labels or probability rows;
binary_cross_entropy with a sigmoid last layer), the averaged gradient of
``compute_gradients`` / ``gradients()`` is compared with central differences of the
mean loss reported by ``evaluate``. The loss values themselves are checked against an
independent NumPy computation of the formulas in DESIGN §2.
"""
import zlib

import numpy as np
import pytest

import nnfast as nf

EPS = 1e-6
RTOL = 1e-6          # per coordinate, relative to the gradient's size
ATOL = 3e-9          # absolute floor: central differences of a float64 loss ~1 carry ~1e-9
NORM_RTOL = 1e-7     # whole-gradient relative error
KINK_MARGIN = 1e-3   # hidden pre-activations kept this far from relu's kink

HIDDEN = ["identity", "relu", "leaky_relu", "tanh", "sigmoid"]
# (id, loss name, last activation, outputs, target kind)
LOSSES = [
    ("mse-identity", "mse", "identity", 3, "real"),
    ("mse-sigmoid", "mse", "sigmoid", 3, "unit"),
    ("mse-tanh", "mse", "tanh", 2, "real"),
    ("ce-labels", "cross_entropy", "softmax", 4, "labels"),
    ("ce-probs", "cross_entropy", "softmax", 4, "probs"),
    ("bce", "binary_cross_entropy", "sigmoid", 3, "binary"),
    ("bce-1d", "binary_cross_entropy", "sigmoid", 1, "binary1d"),
]
BACKENDS = ["numpy", "cython"]
N_IN, H1, H2, M = 5, 7, 6, 9


def rng_for(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_targets(rng, kind, m, k):
    if kind == "real":
        return rng.standard_normal((m, k))
    if kind == "unit":
        return rng.uniform(0.05, 0.95, size=(m, k))
    if kind == "labels":
        y = rng.integers(0, k, size=m)
        y[:k] = np.arange(k)          # every class present
        return y
    if kind == "probs":
        return rng.dirichlet(np.ones(k), size=m)
    if kind == "binary":
        y = rng.uniform(0, 1, size=(m, k))
        y[::2] = np.round(y[::2])     # hard and soft targets
        return y
    if kind == "binary1d":
        return (rng.uniform(size=m) > 0.5).astype(np.float64)
    raise AssertionError(kind)


# --- an independent NumPy forward pass and the DESIGN §2 loss formulas -----------------
def act_np(z, name):
    if name == "identity":
        return z
    if name == "relu":
        return np.maximum(z, 0)
    if name == "leaky_relu":
        return np.where(z > 0, z, 0.01 * z)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise AssertionError(name)


def forward_np(weights, acts, X):
    """Pre-activations and activations of every layer, float64."""
    zs, a = [], np.asarray(X, dtype=np.float64)
    for i, act in enumerate(acts):
        z = a @ weights[2 * i] + weights[2 * i + 1]
        zs.append(z)
        a = act_np(z, act)
    return zs, a


def loss_np(weights, acts, X, y, loss):
    """Mean batch loss by the formulas: mse = mean_i ½‖f−y‖², ce = mean_i −Σ y log p,
    bce = mean_i Σ_k −(y log σ + (1−y) log(1−σ))."""
    zs, f = forward_np(weights, acts, X)
    y = np.asarray(y)
    m = X.shape[0]
    if loss == "mse":
        return np.sum(0.5 * np.sum((f - y.reshape(f.shape)) ** 2, axis=1)) / m
    if loss == "cross_entropy":
        z = zs[-1]
        logp = z - (z.max(axis=1, keepdims=True)
                    + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)))
        Y = np.eye(f.shape[1])[y] if y.ndim == 1 else y
        return np.mean(-np.sum(Y * logp, axis=1))
    if loss == "binary_cross_entropy":
        Y = y.reshape(f.shape)
        return np.mean(np.sum(-(Y * np.log(f) + (1 - Y) * np.log(1 - f)), axis=1))
    raise AssertionError(loss)


def build(hidden, last, k, backend, seed):
    return nf.Sequential(nf.Dense(N_IN, H1, hidden), nf.Dense(H1, H2, hidden),
                         nf.Dense(H2, k, last), dtype="float64", seed=seed, backend=backend)


def hidden_signs(weights, acts, X):
    zs, _ = forward_np(weights, acts, X)
    return [z > 0 for z in zs[:-1]]


def setup_case(hidden, case, backend):
    """Model, data and targets; for relu-family hidden layers, data whose hidden
    pre-activations stay at least KINK_MARGIN away from 0 (the kink)."""
    _, loss, last, k, kind = case
    acts = [hidden, hidden, last]
    for attempt in range(50):
        rng = rng_for("gradcheck", hidden, case[0], attempt)
        model = build(hidden, last, k, backend, seed=int(rng.integers(1 << 30)))
        # non-zero biases so that the bias gradients are exercised off the init point
        ws = model.get_weights()
        for i in range(1, len(ws), 2):
            ws[i] = rng.uniform(-0.3, 0.3, size=ws[i].shape)
        model.set_weights(ws)
        X = rng.standard_normal((M, N_IN))
        y = make_targets(rng, kind, M, k)
        zs, _ = forward_np(ws, acts, X)
        if hidden not in ("relu", "leaky_relu"):
            return model, X, y, loss, acts
        if min(np.abs(z).min() for z in zs[:-1]) > KINK_MARGIN:
            # and not a dead network: most hidden units are active for some sample
            if all((z > 0).any(axis=0).mean() >= 0.5 for z in zs[:-1]):
                return model, X, y, loss, acts
    raise AssertionError("no data found away from the relu kink")  # pragma: no cover


def finite_difference(model, X, y, loss, acts, check_kinks):
    """Central differences of evaluate()'s mean loss; mask of coordinates checked."""
    w0 = model.get_weights()
    signs0 = hidden_signs(w0, acts, X) if check_kinks else None
    grads, masks = [], []
    for i, w in enumerate(w0):
        g = np.zeros_like(w)
        ok = np.ones(w.shape, dtype=bool)
        for j in np.ndindex(w.shape):
            vals = []
            for sgn in (+1, -1):
                ws = [a.copy() for a in w0]
                ws[i][j] += sgn * EPS
                if check_kinks:
                    if any((s != s0).any() for s, s0 in zip(hidden_signs(ws, acts, X), signs0)):
                        ok[j] = False
                model.set_weights(ws)
                vals.append(model.evaluate(X, y, loss=loss)["loss"])
            g[j] = (vals[0] - vals[1]) / (2 * EPS)
        grads.append(g)
        masks.append(ok)
    model.set_weights(w0)
    return grads, masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=[c[0] for c in LOSSES])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_gradient_matches_finite_differences(hidden, case, backend):
    model, X, y, loss, acts = setup_case(hidden, case, backend)
    w0 = model.get_weights()
    model.zero_grad()
    batch_loss = model.compute_gradients(X, y, loss=loss)
    analytic = model.gradients()
    assert model.accumulated_samples == M
    # the weights are untouched by computing gradients
    for a, b in zip(model.get_weights(), w0):
        np.testing.assert_array_equal(a, b)
    assert [g.shape for g in analytic] == [w.shape for w in w0]
    assert all(g.dtype == np.float64 for g in analytic)

    assert batch_loss == pytest.approx(model.evaluate(X, y, loss=loss)["loss"], rel=1e-12)
    assert batch_loss == pytest.approx(loss_np(w0, acts, X, y, loss), rel=1e-10)

    numeric, masks = finite_difference(model, X, y, loss, acts,
                                       check_kinks=hidden in ("relu", "leaky_relu"))
    n_total = sum(mk.size for mk in masks)
    n_checked = sum(int(mk.sum()) for mk in masks)
    assert n_checked >= 0.95 * n_total, f"only {n_checked}/{n_total} coordinates checked"

    flat_a = np.concatenate([g[mk] for g, mk in zip(analytic, masks)])
    flat_n = np.concatenate([g[mk] for g, mk in zip(numeric, masks)])
    assert np.linalg.norm(flat_n) > 1e-3, "degenerate check: the gradient is ~0"
    err = np.abs(flat_a - flat_n)
    bound = RTOL * np.maximum(np.abs(flat_a), np.abs(flat_n)) + ATOL
    worst = int(np.argmax(err / bound))
    assert np.all(err <= bound), (
        f"max violation at flat index {worst}: analytic {flat_a[worst]!r}, "
        f"numeric {flat_n[worst]!r}")
    rel = np.linalg.norm(flat_a - flat_n) / max(np.linalg.norm(flat_a), np.linalg.norm(flat_n))
    assert rel <= NORM_RTOL, rel
    # every layer's W and b receives gradient
    for i, (g, mk) in enumerate(zip(analytic, masks)):
        if hidden != "relu" or i >= 4:
            assert np.abs(g[mk]).max() > 1e-8, f"gradient {i} is zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=[c[0] for c in LOSSES])
def test_loss_value_matches_formulas(case, backend):
    """The mean batch loss equals an independent NumPy computation of DESIGN §2."""
    _, loss, last, k, kind = case
    rng = rng_for("loss-value", case[0])
    model = build("tanh", last, k, backend, seed=3)
    X = rng.standard_normal((13, N_IN))
    y = make_targets(rng, kind, 13, k)
    w = model.get_weights()
    want = loss_np(w, ["tanh", "tanh", last], X, y, loss)
    got = model.compute_gradients(X, y, loss=loss)
    assert got == pytest.approx(want, rel=1e-12)
    assert model.evaluate(X, y, loss=loss)["loss"] == pytest.approx(want, rel=1e-12)
    _, f = forward_np(w, ["tanh", "tanh", last], X)
    np.testing.assert_allclose(model.predict(X), f, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_formulas_by_hand(backend):
    """One tiny network whose losses are written out in full (DESIGN §2)."""
    X = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0]])
    W1 = np.array([[0.3, -0.2, 0.1], [0.05, 0.4, -0.3]])
    b1 = np.array([0.1, -0.1, 0.2])
    W2 = np.array([[0.2, -0.5], [0.7, 0.1], [-0.3, 0.6]])
    b2 = np.array([0.05, -0.05])
    H = np.tanh(X @ W1 + b1)
    Z = H @ W2 + b2
    ws = [W1, b1, W2, b2]

    Y = np.array([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    m = nf.Sequential(nf.Dense(2, 3, "tanh"), nf.Dense(3, 2), dtype="float64", seed=0,
                      backend=backend)
    m.set_weights(ws)
    mse = np.mean([0.5 * np.sum((Z[i] - Y[i]) ** 2) for i in range(3)])
    assert m.compute_gradients(X, Y, loss="mse") == pytest.approx(mse, rel=1e-13)
    # ∂L_B/∂f = (f − y)/M, so the last bias gradient is the column mean of f − y
    np.testing.assert_allclose(m.gradients()[3], (Z - Y).mean(axis=0), rtol=1e-12)

    m = nf.Sequential(nf.Dense(2, 3, "tanh"), nf.Dense(3, 2, "softmax"), dtype="float64",
                      seed=0, backend=backend)
    m.set_weights(ws)
    labels = np.array([1, 0, 1])
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    ce = np.mean(-np.log(P[np.arange(3), labels]))
    assert m.compute_gradients(X, labels, loss="cross_entropy") == pytest.approx(ce, rel=1e-13)
    np.testing.assert_allclose(m.gradients()[3], (P - np.eye(2)[labels]).mean(axis=0),
                               rtol=1e-12)
    m.zero_grad()
    probs = np.array([[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    ce_p = np.mean(-np.sum(probs * np.log(P), axis=1))
    assert m.compute_gradients(X, probs, loss="cross_entropy") == pytest.approx(ce_p, rel=1e-13)

    m = nf.Sequential(nf.Dense(2, 3, "tanh"), nf.Dense(3, 2, "sigmoid"), dtype="float64",
                      seed=0, backend=backend)
    m.set_weights(ws)
    T = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.9]])
    S = 1 / (1 + np.exp(-Z))
    bce = np.mean(np.sum(-(T * np.log(S) + (1 - T) * np.log(1 - S)), axis=1))
    assert m.compute_gradients(X, T, loss="binary_cross_entropy") == pytest.approx(bce, rel=1e-13)
    np.testing.assert_allclose(m.gradients()[3], (S - T).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LOSSES, ids=[c[0] for c in LOSSES])
def test_split_batches_accumulate_to_full_batch_gradient(case, backend):
    """Gradient buffers hold sums and a count: uneven micro-batches give the full batch's
    averaged gradient (DESIGN §2, accumulation)."""
    _, loss, last, k, kind = case
    rng = rng_for("split", case[0])
    model = build("tanh", last, k, backend, seed=8)
    X = rng.standard_normal((11, N_IN))
    y = make_targets(rng, kind, 11, k)
    full_loss = model.compute_gradients(X, y, loss=loss)
    full = model.gradients()
    model.zero_grad()
    parts = [(0, 4), (4, 5), (5, 11)]
    losses = [model.compute_gradients(X[a:b], y[a:b], loss=loss) for a, b in parts]
    assert model.accumulated_samples == 11
    for g_split, g_full in zip(model.gradients(), full):
        np.testing.assert_allclose(g_split, g_full, rtol=1e-12, atol=1e-15)
    weighted = sum(l * (b - a) for l, (a, b) in zip(losses, parts)) / 11
    assert weighted == pytest.approx(full_loss, rel=1e-12)
