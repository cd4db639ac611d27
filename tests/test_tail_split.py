"""The tail split (issue 4): a narrow last layer and the loss in one parallel region.

Where the batch's layers take gemm (no row split, no hand loops), a last layer of at most
15 outputs and the loss run as one region split by rows (``_net_tail_split``): each thread
takes a block of rows through the layer's forward, the loss and the gradient below the
layer, then a block of the layer's parameters through the sum over all rows and the step.
Each row and each parameter goes through the same kind of product as on the general
path, but gemm on a block of rows may round differently from gemm on the whole (OpenBLAS
picks its small-matrix kernels by size), so the two paths are compared to rounding, and
the split is compared with the NumPy backend and with finite differences in float64.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

from knobs import knob


@pytest.fixture(autouse=True)
def _no_unit_split():
    """Batches of up to 64 rows stepping every batch on several threads take the unit
    split (tests/test_unit_split.py), which runs the whole network in one region of its
    own; here they take the general path, where the tail split applies."""
    old = _kernels._set_unit_split(False)
    yield
    _kernels._set_unit_split(*old)


LAST = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid", "mse": "identity"}
OPTIMIZERS = {"sgd": lambda: nf.SGD(lr=0.05),
              "momentum": lambda: nf.SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
              "adam": lambda: nf.Adam(lr=1e-3)}


def make(sizes, dtype, loss, backend="cython"):
    layers = [nf.Dense(i, o, activation="relu") for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation=LAST[loss]))
    return nf.Sequential(*layers, seed=3, dtype=dtype, backend=backend)


def data(sizes, dtype, loss, n):
    rng = np.random.default_rng(7)
    X = (0.2 * rng.standard_normal((n, sizes[0]))).astype(dtype)
    k = sizes[-1]
    if loss == "cross_entropy":
        y = rng.integers(0, k, n)
    elif loss == "binary_cross_entropy":
        y = rng.integers(0, 2, (n, k)).astype(dtype) if k > 1 else rng.integers(0, 2, n)
    else:
        y = rng.standard_normal((n, k)).astype(dtype)
    return X, y


TOL = {np.float32: dict(rtol=2e-4, atol=2e-6), np.float64: dict(rtol=1e-10, atol=1e-13)}


def same_weights(m_a, m_b, dtype):
    for a, b in zip(m_a.get_weights(), m_b.get_weights()):
        np.testing.assert_allclose(a, b, **TOL[dtype])


def fit(sizes, dtype, loss, X, y, on, batch, opt, **kw):
    m = make(sizes, dtype, loss)
    with knob(_kernels._set_tail_split, on):
        h = m.fit(X, y, loss=loss, optimizer=OPTIMIZERS[opt](), epochs=2, batch_size=batch,
                  seed=1, **kw)
    return m, h


# networks over 65,536 parameters (smaller ones take the row split of the whole network);
# last layers of 1 to 15 outputs over inputs that are and are not multiples of eight
@pytest.mark.parametrize("sizes", [(300, 256, 10), (517, 130, 3), (200, 300, 33, 15),
                                   (400, 200, 1)], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("loss", sorted(LAST))
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_tail_split_trains_as_the_general_path(threads, sizes, dtype,
                                                                loss, opt):
    X, y = data(sizes, dtype, loss, n=301)      # batches of 64, the last one 45 rows
    m_on, h_on = fit(sizes, dtype, loss, X, y, True, 64, opt)
    m_off, h_off = fit(sizes, dtype, loss, X, y, False, 64, opt)
    assert m_on._workspace.plan.tail_split_iterations == 10   # 5 batches x 2 epochs
    assert m_off._workspace.plan.tail_split_iterations == 0
    same_weights(m_on, m_off, dtype)
    tol = TOL[dtype]
    np.testing.assert_allclose(h_on.batch_losses, h_off.batch_losses, **tol)
    assert sorted(h_on.history) == sorted(h_off.history)
    for key in h_on.history:
        np.testing.assert_allclose(h_on.history[key], h_off.history[key], **tol)


@pytest.mark.parametrize("batch", [16, 17, 100, 333])
@pytest.mark.parametrize("accumulate", [1, 3])
def test_tail_split_with_accumulation_odd_batches_and_no_shuffle(threads, batch,
                                                                  accumulate):
    sizes = (300, 256, 10)
    X, y = data(sizes, np.float32, "cross_entropy", n=700)
    for shuffle in (True, False):
        kw = dict(accumulate=accumulate, shuffle=shuffle)
        m_on, h_on = fit(sizes, np.float32, "cross_entropy", X, y, True, batch, "momentum",
                         **kw)
        m_off, h_off = fit(sizes, np.float32, "cross_entropy", X, y, False, batch,
                           "momentum", **kw)
        assert m_on._workspace.plan.tail_split_iterations > 0
        same_weights(m_on, m_off, np.float32)
        assert (h_on.iterations, h_on.steps) == (h_off.iterations, h_off.steps)
        np.testing.assert_allclose(h_on.batch_losses, h_off.batch_losses,
                                   **TOL[np.float32])


def test_tail_split_matches_the_numpy_backend_and_counts_right_answers(threads):
    sizes = (300, 256, 10)
    X, y = data(sizes, np.float64, "cross_entropy", n=500)
    m = make(sizes, np.float64, "cross_entropy")
    ref = make(sizes, np.float64, "cross_entropy", backend="numpy")
    kw = dict(loss="cross_entropy", epochs=2, batch_size=50, seed=4)
    h = m.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.5), **kw)
    h_ref = ref.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.5), **kw)
    assert m._workspace.plan.tail_split_iterations == 20
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.batch_losses, h_ref.batch_losses, rtol=1e-10)
    np.testing.assert_allclose(h.history["accuracy"], h_ref.history["accuracy"])
    assert 0 < h.history["accuracy"][-1] < 1


def test_tail_split_gradients_match_finite_differences():
    sizes = (40, 24, 5)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((32, sizes[0]))
    y = rng.integers(0, sizes[-1], 32)
    m = make(sizes, np.float64, "cross_entropy")
    old = _kernels._set_row_split_max_params(0)   # a small network: the general path
    try:
        m.compute_gradients(X, y, loss="cross_entropy")
        assert m._workspace.plan.tail_split_iterations == 1
    finally:
        _kernels._set_row_split_max_params(old)
    grads = m.gradients()
    ref = make(sizes, np.float64, "cross_entropy", backend="numpy")
    ref.set_weights(m.get_weights())
    eps = 1e-6
    for i, arr in enumerate((ref.layers[-1].W, ref.layers[-1].b, ref.layers[0].W)):
        g = grads[(2, 3, 0)[i]]
        for idx in [(0, 0), (3, 2), (-1, -1)] if arr.ndim == 2 else [(0,), (2,), (-1,)]:
            keep = arr[idx]
            arr[idx] = keep + eps
            up = ref.evaluate(X, y, loss="cross_entropy")["loss"]
            arr[idx] = keep - eps
            down = ref.evaluate(X, y, loss="cross_entropy")["loss"]
            arr[idx] = keep
            assert g[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_a_non_finite_loss_in_the_tail_split_stops_as_on_the_general_path(threads):
    sizes = (300, 256, 10)
    X, y = data(sizes, np.float32, "cross_entropy", n=640)
    X[5 * 64 + 7, :40] = np.float32(3e38)   # batch 5's forward overflows
    results = []
    for on in (True, False):
        m = make(sizes, np.float32, "cross_entropy")
        opt = nf.Adam(lr=1e-3)
        with knob(_kernels._set_tail_split, on), pytest.raises(nf.DivergenceError) as err:
            m.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=64, shuffle=False)
        assert m._workspace.plan.tail_split_iterations == (6 if on else 0)
        results.append((m, err.value.history.batch_losses, opt.iterations))
    (m_on, l_on, it_on), (m_off, l_off, it_off) = results
    # five good steps, and the sixth undone (Adam's step count included)
    assert len(l_on) == len(l_off) == 5 and it_on == it_off == 5
    np.testing.assert_allclose(l_on, l_off, **TOL[np.float32])
    same_weights(m_on, m_off, np.float32)
    assert all(np.isfinite(w).all() for w in m_on.get_weights())


def test_small_batches_and_wide_last_layers_keep_the_general_path(threads):
    # batches below SMALL_BATCH rows take the hand loops; a 16-wide last layer is not narrow
    for sizes, batch in (((300, 256, 10), 2), ((300, 256, 16), 64)):
        X, y = data(sizes, np.float32, "cross_entropy", n=130)
        m, _ = fit(sizes, np.float32, "cross_entropy", X, y, True, batch, "sgd")
        assert m._workspace.plan.tail_split_iterations == 0


@pytest.mark.parametrize("batch", [4, 5, 6])
def test_tail_split_beside_the_fused_first_layer_pass(batch):
    """From 4 rows a small last layer leaves the hand loops while a large first layer on
    two threads keeps them, with the fused first-layer pass: both run in one iteration."""
    sizes = (784, 256, 128, 10)
    X, y = data(sizes, np.float32, "cross_entropy", n=120)
    old = nf.get_num_threads()
    nf.set_num_threads(2)
    try:
        runs = []
        for on in (True, False):
            m, h = fit(sizes, np.float32, "cross_entropy", X, y, on, batch, "momentum",
                       accumulate=2)
            runs.append((m, h))
    finally:
        nf.set_num_threads(old)
    (m_on, h_on), (m_off, h_off) = runs
    plan = m_on._workspace.plan
    assert plan.tail_split_iterations > 0 and plan.fused_iterations > 0
    same_weights(m_on, m_off, np.float32)
    np.testing.assert_allclose(h_on.batch_losses, h_off.batch_losses, **TOL[np.float32])
