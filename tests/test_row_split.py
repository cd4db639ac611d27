"""The row split of small networks (issue 4 fast paths).

Networks of at most ``ROW_SPLIT_MAX_PARAMS`` parameters train batches of at least
``ROW_SPLIT_MIN_BATCH`` rows in one parallel region per iteration: each thread takes a
block of the batch's rows through forward, loss and the backward rows, then (after a
barrier) a block of every parameter array through its gradient sum and step; the
products are small hand kernels (float32, AVX2 build) or gemm. Batches under
``2 * ROW_SPLIT_MIN_ROWS`` rows run the same code on one thread. These tests pin it to the
unsplit compiled path and to the NumPy backend: gradients, losses, accuracy counts and
trained weights, for every loss and optimizer kind, with uneven splits; determinism for a
fixed thread count; and that a non-finite loss leaves the gradient sums and weights
untouched.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

pytestmark = pytest.mark.skipif(not _kernels.openmp_enabled(),
                                reason="serial build: no threads, no row split")

LOSSES = {  # loss -> (last activation, targets maker)
    "cross_entropy": ("softmax", lambda rng, n, k: rng.integers(0, k, n)),
    "mse": ("identity", lambda rng, n, k: rng.standard_normal((n, k))),
    "binary_cross_entropy": ("sigmoid", lambda rng, n, k: (rng.random((n, k)) > 0.5) * 1.0),
}


@pytest.fixture
def threads3():
    """Three kernel threads (even on fewer cores: plans size their buffers for it)."""
    before = nf.get_num_threads()
    nf.set_num_threads(3)
    yield
    nf.set_num_threads(before)


@pytest.fixture
def no_split():
    """A factory that runs a callable with the row split off (plans made inside)."""
    def run(fn):
        old = _kernels._set_row_split_max_params(0)
        try:
            return fn()
        finally:
            _kernels._set_row_split_max_params(old)
    return run


def make_model(loss, dtype, backend="cython", seed=0, hidden_act="tanh"):
    return nf.Sequential(nf.Dense(7, 9, activation=hidden_act),
                         nf.Dense(9, 6, activation="relu"),
                         nf.Dense(6, 4, activation=LOSSES[loss][0]),
                         seed=seed, dtype=dtype, backend=backend)


def data(loss, n, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 7)).astype(dtype), LOSSES[loss][1](rng, n, 4)


def test_small_networks_get_split_buffers():
    # guards the premise of the other tests: their networks are below the limit
    m = make_model("mse", np.float64)
    n_params = sum(w.size for w in m.get_weights())
    limit = _kernels._set_row_split_max_params(0)
    _kernels._set_row_split_max_params(limit)
    assert n_params <= limit


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("m", [2, 5, 16, 24, 41, 100])  # 1 to 3 blocks, uneven last block
def test_gradients_equal_unsplit_and_numpy(loss, m, threads3, no_split):
    X, y = data(loss, m)
    split = make_model(loss, np.float64)
    loss_split = split.compute_gradients(X, y, loss=loss)
    whole = no_split(lambda: make_model(loss, np.float64))
    loss_whole = no_split(lambda: whole.compute_gradients(X, y, loss=loss))
    ref = make_model(loss, np.float64, backend="numpy")
    loss_ref = ref.compute_gradients(X, y, loss=loss)
    assert loss_split == pytest.approx(loss_whole, rel=1e-12)
    assert loss_split == pytest.approx(loss_ref, rel=1e-12)
    for gs, gw, gr in zip(split.gradients(), whole.gradients(), ref.gradients()):
        np.testing.assert_allclose(gs, gw, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(gs, gr, rtol=1e-11, atol=1e-13)


OPTIMIZERS = {
    "sgd": lambda: nf.SGD(lr=0.05),                       # folded into the reduction
    "momentum": lambda: nf.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: nf.Adam(lr=0.01, weight_decay=1e-3),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_equals_unsplit_and_numpy(opt, loss, accumulate, threads3, no_split):
    X, y = data(loss, 230)
    kw = dict(epochs=3, batch_size=40, accumulate=accumulate, loss=loss, seed=5, verbose=0)
    split = make_model(loss, np.float64)
    h_split = split.fit(X, y, optimizer=OPTIMIZERS[opt](), **kw)
    whole = no_split(lambda: make_model(loss, np.float64))
    h_whole = no_split(lambda: whole.fit(X, y, optimizer=OPTIMIZERS[opt](), **kw))
    ref = make_model(loss, np.float64, backend="numpy")
    ref.fit(X, y, optimizer=OPTIMIZERS[opt](), **kw)
    for ws, ww, wr in zip(split.get_weights(), whole.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(ws, ww, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ws, wr, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(h_split.batch_losses, h_whole.batch_losses, rtol=1e-10)
    if loss != "mse":
        assert h_split.history["accuracy"] == pytest.approx(h_whole.history["accuracy"])


def test_float32_split_matches_numpy(threads3):
    X, y = data("cross_entropy", 500, dtype=np.float32)
    kw = dict(epochs=2, batch_size=64, loss="cross_entropy", seed=3, verbose=0)
    a = make_model("cross_entropy", np.float32, hidden_act="relu")
    b = make_model("cross_entropy", np.float32, hidden_act="relu", backend="numpy")
    a.fit(X, y, optimizer=nf.SGD(lr=0.05), **kw)
    b.fit(X, y, optimizer=nf.SGD(lr=0.05), **kw)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


def test_split_is_deterministic_for_a_thread_count(threads3):
    X, y = data("cross_entropy", 300)
    runs = []
    for _ in range(2):
        m = make_model("cross_entropy", np.float64)
        m.fit(X, y, optimizer=nf.Adam(lr=0.01), epochs=2, batch_size=50,
              loss="cross_entropy", seed=9, verbose=0)
        runs.append(m.get_weights())
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


def test_non_finite_block_accumulates_nothing(threads3):
    # one row's output overflows the mse loss (inf); that row sits in one block only,
    # and no block may add its gradient: the sums stay exactly zero
    m = make_model("mse", np.float64)
    w = m.get_weights()
    w[-1] = np.full_like(w[-1], 1e200)   # last bias: every output 1e200 ...
    m.set_weights(w)
    X, y = data("mse", 30)
    y[-1] = -1e200                        # ... and the last target the far side of it
    total = m.compute_gradients(X, y, loss="mse")
    assert not np.isfinite(total)
    for layer in m.layers:
        assert not layer.dW.any() and not layer.db.any()


def test_divergence_in_split_fit_keeps_last_good_weights(threads3):
    m = make_model("mse", np.float64)
    X, y = data("mse", 64)
    y[40] = 1e300                         # its squared error overflows: batch 2 diverges
    before = m.get_weights()
    with pytest.raises(FloatingPointError):
        m.fit(X, y, optimizer=nf.SGD(lr=0.01), epochs=1, batch_size=32, shuffle=False,
              loss="mse", verbose=0)
    after = m.get_weights()
    # the first batch (rows 0..31, finite) was applied, the second was not
    one = make_model("mse", np.float64)
    one.fit(X[:32], y[:32], optimizer=nf.SGD(lr=0.01), epochs=1, batch_size=32,
            shuffle=False, loss="mse", verbose=0)
    for a, b, c in zip(after, one.get_weights(), before):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
