"""The compiled backend equals the NumPy reference, operation by operation.

Every operation of the :class:`nnfast.backends.Backend` interface is run on both
backends with the same inputs (random shapes including batch 1, width 1 and odd sizes;
float32 and float64) and the outputs are compared: rtol 1e-5 for float32 and 1e-12 for
float64, with an absolute floor scaled to the magnitudes involved. Sizes that cross the
kernels' OpenMP thresholds are run with 1 and several threads, and the ``def`` entry
points of :mod:`nnfast._kernels` are checked to reject malformed input with an exception
instead of crashing.
"""
import zlib

import numpy as np
import pytest

from nnfast._compiled import kernels as _kernels
from nnfast import Dense, Sequential
from nnfast.backends import Workspace, get_backend
from nnfast.layers import IDENTITY, LEAKY_RELU, LEAKY_SLOPE, RELU, SIGMOID, SOFTMAX, TANH
from nnfast.losses import BINARY_CROSS_ENTROPY, CROSS_ENTROPY, CROSS_ENTROPY_PROBS, MSE

CY = get_backend("cython")
NP = get_backend("numpy")

DTYPES = [np.float32, np.float64]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

ACTS = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "tanh": TANH,
        "sigmoid": SIGMOID, "softmax": SOFTMAX}
HIDDEN_ACTS = {k: v for k, v in ACTS.items() if v != SOFTMAX}

# (M, in, out): batch 1, width 1, odd sizes
SHAPES = [(1, 1, 1), (1, 7, 3), (3, 1, 7), (7, 33, 1), (33, 3, 130), (130, 7, 33),
          (2, 130, 5), (1, 130, 130)]
ROW_SHAPES = [(1, 1), (1, 7), (3, 1), (7, 33), (33, 3), (130, 7), (2, 130)]
VEC_SIZES = [1, 3, 7, 33, 130, 1031]


def rng_for(*key):
    """A generator seeded from the test's parameters (stable across runs)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def assert_close(got, ref, dtype, scale=None, what=""):
    """|got - ref| <= rtol*|ref| + rtol*scale elementwise (scale defaults to max|ref|)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, what
    assert np.all(np.isfinite(got)) == np.all(np.isfinite(ref)), what
    rtol = RTOL[np.dtype(dtype)]
    if scale is None:
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               err_msg=what)


def act_ref(Z, act):
    """Independent float64 formulas of the activations."""
    Z = np.asarray(Z, dtype=np.float64)
    if act == IDENTITY:
        return Z.copy()
    if act == RELU:
        return np.maximum(Z, 0)
    if act == LEAKY_RELU:
        return np.where(Z > 0, Z, LEAKY_SLOPE * Z)
    if act == TANH:
        return np.tanh(Z)
    if act == SIGMOID:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-Z))
    if act == SOFTMAX:
        e = np.exp(Z - Z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise AssertionError(act)


def act_slope_ref(Z, act):
    """act'(z) from z, float64."""
    Z = np.asarray(Z, dtype=np.float64)
    if act == IDENTITY:
        return np.ones_like(Z)
    if act == RELU:
        return (Z > 0).astype(np.float64)
    if act == LEAKY_RELU:
        return np.where(Z > 0, 1.0, LEAKY_SLOPE)
    if act == TANH:
        return 1 - np.tanh(Z) ** 2
    if act == SIGMOID:
        s = 1.0 / (1.0 + np.exp(-Z))
        return s * (1 - s)
    raise AssertionError(act)


def both(fn):
    """Run fn(backend) on the NumPy and the Cython backend: (ref, got)."""
    return fn(NP), fn(CY)


@pytest.fixture
def restore_threads():
    before = _kernels.get_kernel_threads()
    yield
    _kernels.set_kernel_threads(before)
    assert _kernels.get_kernel_threads() == before


# ----------------------------------------------------------------------------------------
# dense_forward
# ----------------------------------------------------------------------------------------
def _forward(backend, X, W, b, act, inplace, dtype):
    M, N = X.shape[0], W.shape[1]
    Z = np.full((M, N), np.nan, dtype=dtype)   # outputs must be written, never read
    A = Z if inplace else np.full((M, N), np.nan, dtype=dtype)
    backend.dense_forward(X, W, b, Z, A, act)
    return Z, A


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_name", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_forward_matches_numpy(dtype, act_name, shape):
    act = ACTS[act_name]
    M, K, N = shape
    rng = rng_for("fwd", dtype, act_name, shape)
    X = rng.standard_normal((M, K)).astype(dtype)
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    for inplace in ([False, True] if act != SOFTMAX else [False]):
        (Zr, Ar), (Zc, Ac) = both(lambda be: _forward(be, X, W, b, act, inplace, dtype))
        assert Zc.dtype == dtype and Ac.dtype == dtype
        assert np.all(np.isfinite(Zc)) and np.all(np.isfinite(Ac))
        if not inplace:
            assert_close(Zc, Zr, dtype, what="Z")
        assert_close(Ac, Ar, dtype, what="A")
        # and against the math itself (float64 formula of the activation on X W + b)
        Zexact = X.astype(np.float64) @ W.astype(np.float64) + b
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(Ac, act_ref(Zexact, act), rtol=tol,
                                   atol=tol * max(1.0, np.abs(Zexact).max()))
    if act == SOFTMAX:
        np.testing.assert_allclose(Ac.sum(axis=1), 1.0, rtol=RTOL[np.dtype(dtype)] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_name", list(ACTS))
@pytest.mark.parametrize("magnitude", [100.0, 1e4, 1e30])
def test_dense_forward_extreme_inputs(dtype, act_name, magnitude):
    """|z| ~ 100, 1e4, 1e30: no overflow to inf/NaN, softmax rows still sum to 1."""
    act = ACTS[act_name]
    rng = rng_for("fwd-extreme", dtype, act_name, magnitude)
    M, N = 9, 5
    X = rng.uniform(-magnitude, magnitude, size=(M, N))
    X[0] = magnitude            # all equal and large
    X[1] = -magnitude           # all equal and very negative
    X[2] = [magnitude, -magnitude, 0.0, magnitude / 2, -magnitude / 2]
    X[3, 0] = magnitude         # one dominant entry
    X[3, 1:] = -magnitude
    X = X.astype(dtype)
    W = np.eye(N, dtype=dtype)  # Z == X exactly
    b = np.zeros(N, dtype=dtype)
    (Zr, Ar), (Zc, Ac) = both(lambda be: _forward(be, X, W, b, act, False, dtype))
    assert np.all(np.isfinite(Ac)), f"{act_name} overflowed on |z| ~ {magnitude}"
    assert np.all(np.isfinite(Ar))
    np.testing.assert_array_equal(Zc, X)
    assert_close(Ac, Ar, dtype)
    if act in (SIGMOID, SOFTMAX):
        assert np.all((Ac >= 0) & (Ac <= 1))
    if act == SOFTMAX:
        np.testing.assert_allclose(Ac.sum(axis=1), 1.0, rtol=1e-6)
        assert Ac[3, 0] == pytest.approx(1.0)
        np.testing.assert_allclose(Ac[0], 1.0 / N, rtol=1e-6)
    if act == TANH:
        assert Ac[0, 0] == pytest.approx(1.0) and Ac[1, 0] == pytest.approx(-1.0)
    if act == SIGMOID:
        assert Ac[0, 0] == pytest.approx(1.0) and Ac[1, 0] == pytest.approx(0.0, abs=1e-30)


# ----------------------------------------------------------------------------------------
# loss_gradient
# ----------------------------------------------------------------------------------------
LOSS_CASES = [("mse", MSE, a) for a in ("identity", "relu", "leaky_relu", "tanh", "sigmoid")]
LOSS_CASES += [("cross_entropy", CROSS_ENTROPY, "softmax"),
               ("cross_entropy_probs", CROSS_ENTROPY_PROBS, "softmax"),
               ("binary_cross_entropy", BINARY_CROSS_ENTROPY, "sigmoid")]


def _loss_inputs(rng, code, act, M, K, dtype, scale):
    Z = (rng.standard_normal((M, K)) * scale).astype(dtype)
    A = np.empty_like(Z)   # A = act(Z) in the model dtype (Z @ I is exact)
    NP.dense_forward(Z, np.eye(K, dtype=dtype), np.zeros(K, dtype=dtype), np.empty_like(Z), A,
                     act)
    labels = np.empty(0, dtype=np.int64)
    if code == MSE:
        T = (rng.standard_normal((M, K)) * max(1.0, scale / 3)).astype(dtype)
    elif code == CROSS_ENTROPY:
        T = np.empty((0, K), dtype=dtype)
        labels = rng.integers(0, K, size=M).astype(np.int64)
        labels[0] = int(np.argmax(Z[0]))   # a row where the label is the top logit
    elif code == CROSS_ENTROPY_PROBS:
        T = rng.dirichlet(np.ones(K), size=M).astype(dtype)
    else:  # binary cross-entropy: hard and soft targets
        T = rng.uniform(0, 1, size=(M, K))
        T[::2] = np.round(T[::2])
        T = T.astype(dtype)
    return Z, A, T, labels


def _assert_tanh_grad_close(got, Z, A, T, labels, code):
    """dZ = dL/dA * (1 - A^2) in float32 against the float64 evaluation of the same inputs.

    1 - A^2 cancels as |A| -> 1: rounding A*A to float32 alone moves the factor by up to
    eps*A^2, which relative to 1 - A^2 can exceed the float32 rtol. NumPy rounds A*A, a
    build with FMA contraction does not, so the two float32 results differ by that much
    and neither is the reference; both must be within it of the float64 value."""
    _, ref = _loss_call(NP, *(np.asarray(v, dtype=np.float64) for v in (Z, A, T)),
                        labels, code, TANH)
    a2 = A.astype(np.float64) ** 2
    slope = 1.0 - a2
    dl_da = np.divide(ref, slope, out=np.zeros_like(ref), where=slope != 0)
    eps = float(np.finfo(np.float32).eps)
    rtol = RTOL[np.dtype(np.float32)]
    scale = max(1.0, float(np.max(np.abs(ref))))
    allowed = rtol * (np.abs(ref) + scale) + 2 * eps * a2 * np.abs(dl_da)
    excess = np.abs(got.astype(np.float64) - ref) - allowed
    assert np.all(excess <= 0), f"dZ off by more than allowed at {np.argmax(excess)}"


def _loss_call(backend, Z, A, T, labels, code, act):
    dZ = np.full_like(Z, np.nan)
    total = backend.loss_gradient(Z, A, T, labels, dZ, code, act)
    return total, dZ


def _loss_scale(Z, T, ref_total):
    """Magnitude of the terms summed into the loss (for its absolute tolerance)."""
    zmax = float(np.max(np.abs(Z)))
    tmax = float(np.max(np.abs(T))) if T.size else 1.0
    return max(1.0, abs(ref_total), Z.size * max(zmax, 1.0) * max(tmax, 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOSS_CASES, ids=[f"{c[0]}-{c[2]}" for c in LOSS_CASES])
@pytest.mark.parametrize("shape", ROW_SHAPES + [(64, 10)])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_loss_gradient_matches_numpy(dtype, case, shape, scale):
    name, code, act_name = case
    act = ACTS[act_name]
    M, K = shape
    rng = rng_for("loss", dtype, name, act_name, shape, scale)
    Z, A, T, labels = _loss_inputs(rng, code, act, M, K, dtype, scale)
    Z0, A0, T0, l0 = Z.copy(), A.copy(), T.copy(), labels.copy()
    (tr, dr), (tc, dc) = both(lambda be: _loss_call(be, Z, A, T, labels, code, act))
    assert isinstance(tc, float)
    assert np.isfinite(tc), f"{name} loss overflowed at logit scale {scale}"
    assert np.all(np.isfinite(dc))
    assert tc >= -RTOL[np.dtype(dtype)] * _loss_scale(Z, T, tr)   # losses are >= 0
    assert_close(tc, tr, dtype, scale=_loss_scale(Z, T, tr), what="loss total")
    if act == TANH and dtype == np.float32:
        _assert_tanh_grad_close(dc, Z, A, T, labels, code)
    else:
        assert_close(dc, dr, dtype, scale=max(1.0, float(np.max(np.abs(dr)))), what="dZ")
    # inputs are not modified
    for before, after in ((Z0, Z), (A0, A), (T0, T), (l0, labels)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("case", LOSS_CASES, ids=[f"{c[0]}-{c[2]}" for c in LOSS_CASES])
def test_loss_gradient_formulas_float64(case):
    """The compiled loss kernel against the formulas of DESIGN §2, computed independently."""
    name, code, act_name = case
    act = ACTS[act_name]
    M, K = 11, 4
    rng = rng_for("loss-formula", name, act_name)
    Z = rng.standard_normal((M, K)) * 2
    A = act_ref(Z, act)
    labels = np.empty(0, dtype=np.int64)
    if code == MSE:
        T = rng.standard_normal((M, K))
        want = 0.5 * np.sum((A - T) ** 2)
        want_dz = (A - T) * act_slope_ref(Z, act)
    elif code == CROSS_ENTROPY:
        labels = rng.integers(0, K, size=M).astype(np.int64)
        T = np.empty((0, K))
        onehot = np.eye(K)[labels]
        want = -np.sum(onehot * np.log(A))
        want_dz = A - onehot
    elif code == CROSS_ENTROPY_PROBS:
        T = rng.dirichlet(np.ones(K), size=M)
        want = -np.sum(T * np.log(A))
        want_dz = A - T
    else:
        T = rng.uniform(0, 1, size=(M, K))
        want = -np.sum(T * np.log(A) + (1 - T) * np.log(1 - A))
        want_dz = A - T
    total, dZ = _loss_call(CY, Z, A, T, labels, code, act)
    assert total == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(dZ, want_dz, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_one_hot_probs_equal_integer_labels(dtype):
    rng = rng_for("ce-onehot", dtype)
    M, K = 13, 6
    Z = (rng.standard_normal((M, K)) * 5).astype(dtype)
    A = act_ref(Z, SOFTMAX).astype(dtype)
    labels = rng.integers(0, K, size=M).astype(np.int64)
    onehot = np.eye(K, dtype=dtype)[labels]
    t1, d1 = _loss_call(CY, Z, A, np.empty((0, K), dtype=dtype), labels, CROSS_ENTROPY, SOFTMAX)
    t2, d2 = _loss_call(CY, Z, A, onehot, np.empty(0, dtype=np.int64), CROSS_ENTROPY_PROBS,
                        SOFTMAX)
    assert t1 == pytest.approx(t2, rel=RTOL[np.dtype(dtype)])
    assert_close(d1, d2, dtype)


# ----------------------------------------------------------------------------------------
# dense_backward_params (adds into the gradient-sum buffers)
# ----------------------------------------------------------------------------------------
def _backward_params(backend, X, dZ, dW0, db0, calls):
    dW, db = dW0.copy(), db0.copy()
    for _ in range(calls):
        backend.dense_backward_params(X, dZ, dW, db)
    return dW, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_backward_params_accumulates(dtype, shape):
    M, K, N = shape
    rng = rng_for("bwd-params", dtype, shape)
    X = rng.standard_normal((M, K)).astype(dtype)
    dZ = rng.standard_normal((M, N)).astype(dtype)
    dW0 = rng.standard_normal((K, N)).astype(dtype)     # non-zero: the kernel must ADD
    db0 = rng.standard_normal(N).astype(dtype)
    for calls in (1, 2):
        (dWr, dbr), (dWc, dbc) = both(lambda be: _backward_params(be, X, dZ, dW0, db0, calls))
        assert_close(dWc, dWr, dtype, what="dW")
        assert_close(dbc, dbr, dtype, what="db")
        X64, dZ64 = X.astype(np.float64), dZ.astype(np.float64)
        want_dW = dW0 + calls * (X64.T @ dZ64)
        want_db = db0 + calls * dZ64.sum(axis=0)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(dWc, want_dW, rtol=tol, atol=tol * np.abs(want_dW).max() * 2)
        np.testing.assert_allclose(dbc, want_db, rtol=tol, atol=tol * np.abs(want_db).max() * 2)


# ----------------------------------------------------------------------------------------
# dense_backward_input
# ----------------------------------------------------------------------------------------
def _backward_input(backend, dZ, W, A_prev, act_prev):
    dZ_prev = np.full(A_prev.shape, np.nan, dtype=A_prev.dtype)
    backend.dense_backward_input(dZ, W, A_prev, dZ_prev, act_prev)
    return dZ_prev


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act_name", list(HIDDEN_ACTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_backward_input_matches_numpy(dtype, act_name, shape):
    act = ACTS[act_name]
    M, K, N = shape   # W is (K, N): dZ (M, N) -> dZ_prev (M, K)
    rng = rng_for("bwd-input", dtype, act_name, shape)
    Zp = rng.standard_normal((M, K)) * 2
    Zp[np.abs(Zp) < 1e-3] = 0.5
    A_prev = act_ref(Zp, act).astype(dtype)
    dZ = rng.standard_normal((M, N)).astype(dtype)
    W = rng.standard_normal((K, N)).astype(dtype)
    ref, got = both(lambda be: _backward_input(be, dZ, W, A_prev, act))
    assert np.all(np.isfinite(got))
    assert_close(got, ref, dtype)
    want = (dZ.astype(np.float64) @ W.astype(np.float64).T) * act_slope_ref(Zp, act)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------------------
# optimizer updates
# ----------------------------------------------------------------------------------------
SGD_CASES = [(0.0, False, 0.0), (0.0, False, 1e-2), (0.9, False, 0.0), (0.9, False, 1e-2),
             (0.9, True, 0.0), (0.5, True, 5e-2)]


def _sgd_run(backend, p0, grads, scales, lr, momentum, nesterov, wd):
    p = p0.copy()
    v = np.zeros_like(p0)
    trace = []
    for g, s in zip(grads, scales):
        gs = g.copy()
        backend.sgd_update(p, gs, v, s, lr, momentum, nesterov, wd)
        assert np.all(gs == 0), "grad_sum must be zeroed by the update"
        trace.append((p.copy(), v.copy()))
    return trace


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SGD_CASES, ids=[f"mom{c[0]}-nest{c[1]}-wd{c[2]}" for c in SGD_CASES])
@pytest.mark.parametrize("n", VEC_SIZES)
def test_sgd_update_matches_numpy(dtype, case, n):
    momentum, nesterov, wd = case
    rng = rng_for("sgd", dtype, case, n)
    p0 = rng.standard_normal(n).astype(dtype)
    counts = [1, 7, 3, 32]
    grads = [(rng.standard_normal(n) * c).astype(dtype) for c in counts]
    scales = [1.0 / c for c in counts]
    lr = 0.05
    ref, got = both(lambda be: _sgd_run(be, p0, grads, scales, lr, momentum, nesterov, wd))
    for step, ((pr, vr), (pc, vc)) in enumerate(zip(ref, got)):
        assert_close(pc, pr, dtype, what=f"param after step {step + 1}")
        if momentum:
            assert_close(vc, vr, dtype, what=f"velocity after step {step + 1}")
    # the parameters actually moved, and by the PyTorch formula on step 1
    g1 = grads[0].astype(np.float64) * scales[0] + wd * p0.astype(np.float64)
    if momentum and nesterov:
        g1 = g1 + momentum * g1
    want1 = p0 - lr * g1
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got[0][0], want1, rtol=tol, atol=tol * np.abs(want1).max())


ADAM_CASES = [(0.0, False), (1e-2, False), (1e-2, True), (0.0, True)]


def _adam_run(backend, p0, grads, scales, lr, b1, b2, eps, wd, decoupled):
    p = p0.copy()
    m1 = np.zeros_like(p0)
    m2 = np.zeros_like(p0)
    trace = []
    for step, (g, s) in enumerate(zip(grads, scales), start=1):
        gs = g.copy()
        backend.adam_update(p, gs, m1, m2, s, lr, b1, b2, eps, wd, decoupled, step)
        assert np.all(gs == 0), "grad_sum must be zeroed by the update"
        trace.append((p.copy(), m1.copy(), m2.copy()))
    return trace


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ADAM_CASES, ids=[f"wd{c[0]}-decoupled{c[1]}" for c in ADAM_CASES])
@pytest.mark.parametrize("n", VEC_SIZES)
def test_adam_update_matches_numpy(dtype, case, n):
    wd, decoupled = case
    rng = rng_for("adam", dtype, case, n)
    p0 = rng.standard_normal(n).astype(dtype)
    counts = [1, 5, 2, 16, 3]
    grads = [(rng.standard_normal(n) * c).astype(dtype) for c in counts]
    scales = [1.0 / c for c in counts]
    args = (1e-2, 0.9, 0.999, 1e-8, wd, decoupled)
    ref, got = both(lambda be: _adam_run(be, p0, grads, scales, *args))
    for step, ((pr, mr, vr), (pc, mc, vc)) in enumerate(zip(ref, got), start=1):
        assert_close(pc, pr, dtype, what=f"param after step {step}")
        assert_close(mc, mr, dtype, what=f"exp_avg after step {step}")
        assert_close(vc, vr, dtype, what=f"exp_avg_sq after step {step}")
    # step 1 of PyTorch's Adam: m = (1-b1) g, v = (1-b2) g^2, p -= lr * g/(|g| + eps') ~ lr*sign(g)
    g1 = grads[0].astype(np.float64) * scales[0]
    p_base = p0.astype(np.float64)
    if decoupled:
        p_base = p_base * (1 - 1e-2 * wd)
    else:
        g1 = g1 + wd * p0.astype(np.float64)
    want1 = p_base - 1e-2 * g1 / (np.abs(g1) + 1e-8)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got[0][0], want1, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------
# gather_rows
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 3), (1, 7, 4), (33, 7, 33), (130, 33, 7),
                                   (10, 3, 0)])
def test_gather_rows_matches_numpy(dtype, shape):
    N, d, m = shape
    rng = rng_for("gather", dtype, shape)
    X = rng.standard_normal((N, d)).astype(dtype)
    index = rng.integers(0, N, size=m).astype(np.int64)   # repeats allowed
    if m:
        index[-1] = N - 1
        index[0] = 0

    def run(be):
        out = np.full((m, d), np.nan, dtype=dtype)
        be.gather_rows(X, index, out)
        return out

    ref, got = both(run)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, X[index])


@pytest.mark.parametrize("ahead", [0, 1, 3, 50, 10**6])
def test_gather_prefetch_changes_nothing(ahead, restore_threads):
    """Rows asked into cache ahead of their copy (none, some, more than the batch): the
    batch is X[index] exactly, on one thread and split across three, whose chunks end
    before the prefetch distance does."""
    rng = rng_for("gather-ahead", ahead)
    X = rng.standard_normal((300, 70)).astype(np.float32)
    index = rng.integers(0, 300, size=1000).astype(np.int64)
    old = _kernels._set_gather_ahead(ahead)
    try:
        for threads in (1, 3):
            _kernels.set_kernel_threads(threads)
            out = np.full((1000, 70), np.nan, np.float32)
            _kernels.gather_rows(X, index, out)
            np.testing.assert_array_equal(out, X[index])
    finally:
        assert _kernels._set_gather_ahead(old) == ahead
    with pytest.raises(ValueError, match="rows"):
        _kernels._set_gather_ahead(-1)


# ----------------------------------------------------------------------------------------
# composed passes: forward / accumulate_gradients through Sequential on both backends
# ----------------------------------------------------------------------------------------
MODEL_LOSSES = [("mse", "identity", 3), ("mse", "sigmoid", 2),
                ("cross_entropy", "softmax", 4), ("cross_entropy_probs", "softmax", 4),
                ("binary_cross_entropy", "sigmoid", 3)]


def _targets(rng, loss, M, K):
    if loss == "mse":
        return rng.standard_normal((M, K))
    if loss == "cross_entropy":
        return rng.integers(0, K, size=M)
    if loss == "cross_entropy_probs":
        return rng.dirichlet(np.ones(K), size=M)
    return rng.uniform(0, 1, size=(M, K)).round(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", list(HIDDEN_ACTS))
@pytest.mark.parametrize("case", MODEL_LOSSES, ids=[c[0] for c in MODEL_LOSSES])
def test_model_passes_match_numpy(dtype, hidden, case):
    loss_key, last, K = case
    loss = "cross_entropy" if loss_key.startswith("cross_entropy") else loss_key
    rng = rng_for("model", dtype, hidden, case)

    def make(backend):
        return Sequential(Dense(5, 7, hidden), Dense(7, 33, hidden), Dense(33, K, last),
                          dtype=np.dtype(dtype).name, seed=11, backend=backend)

    m_np, m_cy = make("numpy"), make("cython")
    for wn, wc in zip(m_np.get_weights(), m_cy.get_weights()):
        np.testing.assert_array_equal(wn, wc)   # same seed, same network
    for M in (1, 7, 33):
        X = rng.standard_normal((M, 5))
        y = _targets(rng, loss_key, M, K)
        ln = m_np.compute_gradients(X, y, loss=loss)
        lc = m_cy.compute_gradients(X, y, loss=loss)
        assert ln == pytest.approx(lc, rel=RTOL[np.dtype(dtype)] * 10)
        pn, pc = m_np.predict(X), m_cy.predict(X)
        assert_close(pc, pn, dtype, scale=max(1.0, np.abs(pn).max()), what="predict")
    # accumulated over three batches (41 samples): sums/count agree
    assert m_cy.accumulated_samples == 41
    for i, (gn, gc) in enumerate(zip(m_np.gradients(), m_cy.gradients())):
        assert_close(gc, gn, dtype, scale=max(1e-3, np.abs(gn).max()) * 10, what=f"grad {i}")
        assert np.any(gc != 0) or np.all(gn == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_forward_and_accumulate_direct(dtype):
    """The interface's composed methods, called directly with a Workspace."""
    rng = rng_for("direct", dtype)
    layers_by = {}
    for name in ("numpy", "cython"):
        m = Sequential(Dense(6, 9, "leaky_relu"), Dense(9, 4, "softmax"),
                       dtype=np.dtype(dtype).name, seed=5, backend=name)
        layers_by[name] = m.layers
    X = rng.standard_normal((13, 6)).astype(dtype)
    labels = rng.integers(0, 4, size=13).astype(np.int64)
    T = np.empty((0, 4), dtype=dtype)
    outs, totals = {}, {}
    for name, be in (("numpy", NP), ("cython", CY)):
        layers = layers_by[name]
        ws = Workspace(layers, 20, dtype)
        Z, A, _ = ws.rows(13)
        outs[name] = be.forward(layers, X, Z, A).copy()
        totals[name] = be.accumulate_gradients(layers, X, T, labels, CROSS_ENTROPY, ws, 13)
    assert_close(outs["cython"], outs["numpy"], dtype)
    assert totals["cython"] == pytest.approx(totals["numpy"], rel=RTOL[np.dtype(dtype)] * 10)
    for ln, lc in zip(layers_by["numpy"], layers_by["cython"]):
        assert_close(lc.dW, ln.dW, dtype, scale=np.abs(ln.dW).max() * 10)
        assert_close(lc.db, ln.db, dtype, scale=np.abs(ln.db).max() * 10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [40, 64, 100, 257, 300])
def test_bias_sums_add_rows_in_order_on_any_thread_count(dtype, N, restore_threads):
    """db += the column sums of dZ, one row after another, whatever the thread count: the
    result is the sequential sum exactly (np.cumsum adds in row order), which a split of
    the rows across threads (partial sums added at the end) would not give."""
    M = 900
    assert M * N >= 32768   # PAR_MIN_ELEMS: large enough to split (from 64 columns)
    rng = rng_for("bias-sums", dtype, N)
    X = rng.standard_normal((M, 3)).astype(dtype)
    dZ = rng.standard_normal((M, N)).astype(dtype)
    db0 = rng.standard_normal(N).astype(dtype)
    want = np.cumsum(np.vstack([db0, dZ]), axis=0, dtype=dtype)[-1]
    for threads in (1, 2, 3):
        _kernels.set_kernel_threads(threads)
        dW, db = np.zeros((3, N), dtype=dtype), db0.copy()
        _kernels.dense_backward_params(X, dZ, dW, db)
        np.testing.assert_array_equal(db, want, err_msg=f"{threads} threads")


# ----------------------------------------------------------------------------------------
# threads: sizes past the parallel thresholds give the same result on 1 and n threads
# ----------------------------------------------------------------------------------------
def _all_ops_large(dtype, M, K, N, seed):
    """Run every operation at a size that crosses PAR_MIN_ELEMS / PAR_MIN_FLOPS."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, K)).astype(dtype)
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    out = {}
    for act_name, act in ACTS.items():
        Z = np.empty((M, N), dtype=dtype)
        A = np.empty((M, N), dtype=dtype) if act == SOFTMAX else Z
        CY.dense_forward(X, W, b, Z, A, act)
        out[f"forward-{act_name}"] = A.copy()
    Zl = (rng.standard_normal((M, N)) * 3).astype(dtype)
    for name, code, act_name in LOSS_CASES:
        act = ACTS[act_name]
        Al = act_ref(Zl, act).astype(dtype)
        labels = np.empty(0, dtype=np.int64)
        T = rng.uniform(0, 1, size=(M, N)).astype(dtype)
        if code == CROSS_ENTROPY:
            labels = rng.integers(0, N, size=M).astype(np.int64)
            T = np.empty((0, N), dtype=dtype)
        elif code == CROSS_ENTROPY_PROBS:
            T = (T / T.sum(axis=1, keepdims=True)).astype(dtype)
        dZ = np.empty_like(Zl)
        out[f"loss-{name}-{act_name}"] = np.array(CY.loss_gradient(Zl, Al, T, labels, dZ, code, act))
        out[f"dloss-{name}-{act_name}"] = dZ
    dZ = rng.standard_normal((M, N)).astype(dtype)
    dW = rng.standard_normal((K, N)).astype(dtype)
    db = rng.standard_normal(N).astype(dtype)
    CY.dense_backward_params(X, dZ, dW, db)
    out["dW"], out["db"] = dW, db
    for act_name, act in HIDDEN_ACTS.items():
        A_prev = act_ref(X, act).astype(dtype)
        dZp = np.empty((M, K), dtype=dtype)
        CY.dense_backward_input(dZ, W, A_prev, dZp, act)
        out[f"bwd-input-{act_name}"] = dZp
    n = M * N
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    v = np.zeros(n, dtype=dtype)
    for _ in range(2):
        CY.sgd_update(p, g.copy(), v, 0.5, 0.1, 0.9, True, 1e-3)
    out["sgd-p"], out["sgd-v"] = p, v
    p = rng.standard_normal(n).astype(dtype)
    m1, m2 = np.zeros(n, dtype=dtype), np.zeros(n, dtype=dtype)
    for step in (1, 2):
        CY.adam_update(p, g.copy(), m1, m2, 0.5, 1e-2, 0.9, 0.999, 1e-8, 1e-2, step == 2, step)
    out["adam-p"], out["adam-m"], out["adam-v"] = p, m1, m2
    idx = rng.integers(0, M, size=M).astype(np.int64)
    gathered = np.empty_like(X)
    CY.gather_rows(X, idx, gathered)
    out["gather"] = gathered
    return out


# (M, in, out), each past both thresholds for every operation: row splits (M >= out) and
# column splits (M < out) of the blocked gemm, odd sizes so the thread chunks are uneven.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(512, 300, 300), (257, 65, 129), (40, 151, 901)])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_same_result(dtype, shape, threads, restore_threads):
    M, K, N = shape
    assert M * N >= 32768 and 2 * M * N * K >= 4e6   # PAR_MIN_ELEMS, PAR_MIN_FLOPS
    _kernels.set_kernel_threads(1)
    assert _kernels.get_kernel_threads() == 1
    serial = _all_ops_large(dtype, M, K, N, seed=7)
    _kernels.set_kernel_threads(threads)
    assert _kernels.get_kernel_threads() == (threads if _kernels.openmp_enabled() else 1)
    parallel = _all_ops_large(dtype, M, K, N, seed=7)
    assert serial.keys() == parallel.keys()
    for key in serial:
        s, p = serial[key], parallel[key]
        assert np.all(np.isfinite(p)), key
        scale = float(np.max(np.abs(s)))
        if key.startswith("loss-"):
            scale = max(scale, M * N * 3.0)
        assert_close(p, s, dtype, scale=scale, what=key)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_large_sizes_match_numpy(dtype, restore_threads):
    """Past the thresholds, the parallel kernels still equal the NumPy reference."""
    _kernels.set_kernel_threads(2)
    M, K, N = 512, 300, 300
    rng = rng_for("threads-np", dtype)
    X = rng.standard_normal((M, K)).astype(dtype)
    W = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    for act in (RELU, TANH, SOFTMAX):
        (Zr, Ar), (Zc, Ac) = both(lambda be: _forward(be, X, W, b, act, False, dtype))
        assert_close(Zc, Zr, dtype)
        assert_close(Ac, Ar, dtype)
    labels = rng.integers(0, N, size=M).astype(np.int64)
    (tr, dr), (tc, dc) = both(lambda be: _loss_call(be, Zr, Ar, np.empty((0, N), dtype=dtype),
                                                    labels, CROSS_ENTROPY, SOFTMAX))
    assert_close(tc, tr, dtype, scale=_loss_scale(Zr, np.ones(1), tr))
    assert_close(dc, dr, dtype)
    dW0 = rng.standard_normal((K, N)).astype(dtype)
    db0 = rng.standard_normal(N).astype(dtype)
    (dWr, dbr), (dWc, dbc) = both(lambda be: _backward_params(be, X, dr, dW0, db0, 1))
    assert_close(dWc, dWr, dtype)
    assert_close(dbc, dbr, dtype)
    A_prev = act_ref(X, TANH).astype(dtype)
    ref, got = both(lambda be: _backward_input(be, dr, W, A_prev, TANH))
    assert_close(got, ref, dtype)


# ----------------------------------------------------------------------------------------
# malformed input is rejected, never a crash or a wild write
# ----------------------------------------------------------------------------------------
REJECT = (ValueError, TypeError)


def _fwd_args(dtype=np.float64, M=4, K=3, N=5):
    X = np.ones((M, K), dtype=dtype)
    W = np.ones((K, N), dtype=dtype)
    b = np.ones(N, dtype=dtype)
    Z = np.zeros((M, N), dtype=dtype)
    A = np.zeros((M, N), dtype=dtype)
    return [X, W, b, Z, A, IDENTITY]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_forward_rejects_bad_shapes(dtype):
    k = _kernels.dense_forward
    ok = _fwd_args(dtype)
    k(*ok)  # baseline works
    bad = {"W rows": 1, "W cols": 1, "b": 2, "Z": 3, "A": 4}
    replacements = {
        "W rows": np.ones((4, 5), dtype=dtype),
        "W cols": np.ones((3, 6), dtype=dtype),
        "b": np.ones(4, dtype=dtype),
        "Z": np.zeros((3, 5), dtype=dtype),
        "A": np.zeros((4, 4), dtype=dtype),
    }
    for what, pos in bad.items():
        args = list(ok)
        args[pos] = replacements[what]
        with pytest.raises(ValueError):
            k(*args)
    for act in (-1, 6, 99):
        args = list(ok)
        args[5] = act
        with pytest.raises(ValueError):
            k(*args)
    args = _fwd_args(dtype, M=0)
    with pytest.raises(ValueError):
        k(*args)


@pytest.mark.parametrize("pos", range(5))
def test_dense_forward_rejects_bad_dtypes_and_layouts(pos):
    ok = _fwd_args(np.float64)
    for bad in (ok[pos].astype(np.float32), ok[pos].astype(np.int64),
                np.asfortranarray(ok[pos]) if ok[pos].ndim == 2 and min(ok[pos].shape) > 1
                else ok[pos][::-1] if ok[pos].ndim == 1 else None):
        if bad is None:
            continue
        args = list(ok)
        args[pos] = bad
        with pytest.raises(REJECT):
            _kernels.dense_forward(*args)
    if pos >= 3:   # outputs must be writable
        args = list(ok)
        ro = ok[pos].copy()
        ro.flags.writeable = False
        args[pos] = ro
        with pytest.raises(REJECT):
            _kernels.dense_forward(*args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_gradient_rejects_bad_input(dtype):
    k = _kernels.loss_gradient
    M, K = 4, 3
    Z = np.zeros((M, K), dtype=dtype)
    A = np.full((M, K), 1.0 / K, dtype=dtype)
    T = np.full((M, K), 1.0 / K, dtype=dtype)
    none = np.empty(0, dtype=np.int64)
    dZ = np.zeros((M, K), dtype=dtype)
    k(Z, A, T, none, dZ, MSE, IDENTITY)
    k(Z, A, np.empty((0, K), dtype=dtype), np.arange(M) % K, dZ, CROSS_ENTROPY, SOFTMAX)
    for labels in (np.array([0, 1, 2, 3]), np.array([0, -1, 1, 2]), np.array([0, 1, 2]),
                   np.array([0, 1, 2, 0, 1])):
        dZ.fill(7)
        with pytest.raises(ValueError):
            k(Z, A, np.empty((0, K), dtype=dtype), labels.astype(np.int64), dZ,
              CROSS_ENTROPY, SOFTMAX)
        assert np.all(dZ == 7), "rejected call must not write"
    with pytest.raises(REJECT):   # labels of the wrong integer type
        k(Z, A, T, np.arange(M, dtype=np.int32) % K, dZ, CROSS_ENTROPY, SOFTMAX)
    for code in (MSE, CROSS_ENTROPY_PROBS, BINARY_CROSS_ENTROPY):
        for badT in (np.zeros((M, K + 1), dtype=dtype), np.zeros((M - 1, K), dtype=dtype),
                     np.empty((0, K), dtype=dtype)):
            with pytest.raises(ValueError):
                k(Z, A, badT, none, dZ, code, SIGMOID)
    for code in (-1, 4, 42):
        with pytest.raises(ValueError):
            k(Z, A, T, none, dZ, code, IDENTITY)
    with pytest.raises(ValueError):
        k(Z, A[:2], T, none, dZ, MSE, IDENTITY)
    with pytest.raises(ValueError):
        k(Z, A, T, none, np.zeros((M, K + 1), dtype=dtype), MSE, IDENTITY)
    with pytest.raises(ValueError):
        k(Z[:0], A[:0], T[:0], none, dZ[:0], MSE, IDENTITY)
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(REJECT):
        k(Z, A.astype(other), T, none, dZ, MSE, IDENTITY)
    with pytest.raises(REJECT):
        k(Z, A, T, none, dZ.astype(other), MSE, IDENTITY)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_backward_params_rejects_bad_input(dtype):
    k = _kernels.dense_backward_params
    M, K, N = 4, 3, 5
    X = np.ones((M, K), dtype=dtype)
    dZ = np.ones((M, N), dtype=dtype)
    dW = np.zeros((K, N), dtype=dtype)
    db = np.zeros(N, dtype=dtype)
    k(X, dZ, dW, db)
    for args in ((X, dZ[:3], dW, db), (X, dZ, dW[:2], db), (X, dZ, np.zeros((K, N + 1), dtype), db),
                 (X, dZ, dW, db[:4]), (X[:0], dZ[:0], dW, db)):
        with pytest.raises(ValueError):
            k(*args)
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(REJECT):
        k(X, dZ, dW.astype(other), db)
    with pytest.raises(REJECT):
        k(X.astype(np.int64), dZ, dW, db)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_backward_input_rejects_bad_input(dtype):
    k = _kernels.dense_backward_input
    M, K, N = 4, 3, 5
    dZ = np.ones((M, N), dtype=dtype)
    W = np.ones((K, N), dtype=dtype)
    A_prev = np.ones((M, K), dtype=dtype)
    out = np.zeros((M, K), dtype=dtype)
    k(dZ, W, A_prev, out, RELU)
    for args in ((dZ, np.ones((K, N + 1), dtype), A_prev, out, RELU),
                 (dZ, W, A_prev[:3], out, RELU),
                 (dZ, W, A_prev, np.zeros((M, K + 1), dtype), RELU),
                 (dZ, W, A_prev, out, SOFTMAX),
                 (dZ, W, A_prev, out, -1),
                 (dZ, W, A_prev, out, 17)):
        with pytest.raises(ValueError):
            k(*args)
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(REJECT):
        k(dZ, W.astype(other), A_prev, out, RELU)


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_kernels_reject_bad_input(dtype):
    n = 10
    p, g, v = (np.ones(n, dtype=dtype) for _ in range(3))
    _kernels.sgd_update(p, g, v, 1.0, 0.1, 0.9, False, 0.0)
    for args in ((p, g[:9], v), (p, g, v[:3]), (p[:0], g[:0], v[:0])):
        with pytest.raises(ValueError):
            _kernels.sgd_update(*args, 1.0, 0.1, 0.9, False, 0.0)
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(REJECT):
        _kernels.sgd_update(p, g.astype(other), v, 1.0, 0.1, 0.9, False, 0.0)
    with pytest.raises(REJECT):
        _kernels.sgd_update(p.reshape(2, 5), g, v, 1.0, 0.1, 0.9, False, 0.0)
    m1, m2 = np.zeros(n, dtype=dtype), np.zeros(n, dtype=dtype)
    _kernels.adam_update(p, g, m1, m2, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    for args in ((p, g[:9], m1, m2), (p, g, m1[:9], m2), (p, g, m1, m2[:1])):
        with pytest.raises(ValueError):
            _kernels.adam_update(*args, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1)
    p_before = p.copy()
    with pytest.raises(ValueError):
        _kernels.adam_update(p, g, m1, m2, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0)
    np.testing.assert_array_equal(p, p_before)
    with pytest.raises(REJECT):
        _kernels.adam_update(p, g, m1.astype(other), m2, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                             False, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_rejects_bad_input(dtype):
    k = _kernels.gather_rows
    X = np.arange(12, dtype=dtype).reshape(4, 3)
    out = np.full((3, 3), -1, dtype=dtype)
    for index in (np.array([0, 4, 1]), np.array([0, -1, 1]), np.array([0, 1, 2**40])):
        with pytest.raises(ValueError):
            k(X, index.astype(np.int64), out)
        assert np.all(out == -1), "rejected call must not write"
    with pytest.raises(ValueError):
        k(X, np.array([0, 1], dtype=np.int64), out)
    with pytest.raises(ValueError):
        k(X, np.array([0, 1, 2], dtype=np.int64), np.zeros((3, 2), dtype=dtype))
    with pytest.raises(REJECT):
        k(X, np.array([0, 1, 2], dtype=np.int32), out)
    other = np.float32 if dtype == np.float64 else np.float64
    with pytest.raises(REJECT):
        k(X, np.array([0, 1, 2], dtype=np.int64), out.astype(other))


def test_set_kernel_threads_rejects_zero(restore_threads):
    with pytest.raises(ValueError):
        _kernels.set_kernel_threads(0)
    with pytest.raises(ValueError):
        _kernels.set_kernel_threads(-3)
    assert isinstance(_kernels.openmp_enabled(), bool)


@pytest.mark.parametrize("width", [1, 2, 7, 8, 9, 10, 15, 16, 17, 33])
def test_float32_softmax_is_accurate(width):
    """The AVX2 build's vectorised exp: softmax of float32 logits within a few ulp of the
    float64 value of the same logits (differences z - max rounded to float32 as the
    kernel rounds them), across the whole range where exp is normal, and sums to 1."""
    rng = rng_for("softmax-ulp", width)
    M = 64
    Z = rng.uniform(-90.0, 10.0, size=(M, width)).astype(np.float32)
    Z[:, 0] = rng.uniform(0.0, 10.0, size=M).astype(np.float32)   # a maximum near 0..10
    Z[0] = np.linspace(-87.0, 0.0, width, dtype=np.float32)       # exp(-87) ~ 1.6e-38
    W = np.eye(width, dtype=np.float32)
    b = np.zeros(width, dtype=np.float32)
    _, A = _forward(get_backend("cython"), Z, W, b, SOFTMAX, False, np.float32)
    d = (Z - Z.max(axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
    e = np.exp(d)
    ref = e / e.sum(axis=1, keepdims=True)
    normal = ref > np.finfo(np.float32).tiny * 4
    np.testing.assert_allclose(A[normal], ref[normal], rtol=6e-7)  # measured: <= 3.1e-7
    assert np.all(A[~normal] <= np.finfo(np.float32).tiny * 4)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=2e-6)
