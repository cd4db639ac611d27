"""The fused first-layer pass (issue 4, batch-1 fast path).

On the hand loops (small batches), the first layer's backward pass steps W0 row by row,
and the next batch's forward product X_next @ W0 needs nothing else: ``_net_run`` hands
the next batch to that pass, which computes Z0 of the next iteration through each row
right after stepping it (``_first_layer_step_forward_rows``; at batch 1 with plain SGD
four rows at a time, ``nnf_*step_forward4``). Every element sees the same operations in
the same order as in the separate passes, so training with and without the fusion must
give bit-identical weights and losses, whatever the optimizer, accumulation, shuffling,
thread count, dtype and widths (vector tails, row counts not divisible by four, zero
inputs, which both paths skip row by row).
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

from knobs import knob


@pytest.fixture(autouse=True)
def _row_split_hand_loops():
    """These tests are about the hand loops' fused pass; batch-1 runs on several
    threads would take the unit split instead (tests/test_unit_split.py)."""
    old = _kernels._set_unit_split(False)
    yield
    _kernels._set_unit_split(*old)


def make(sizes, dtype, last="softmax"):
    layers = [nf.Dense(i, o, activation="relu") for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation=last))
    return nf.Sequential(*layers, seed=3, dtype=dtype)


def data(sizes, dtype, zeros, n=61):
    rng = np.random.default_rng(5)
    X = rng.random((n, sizes[0]))
    if zeros:
        X[rng.random(X.shape) < 0.25] = 0.0
        X[:, :9] = 0.0           # whole zero columns, as on the border of digit images
    return X.astype(dtype), rng.integers(0, sizes[-1], n)


def fit(sizes, dtype, X, y, on, batch, optimizer, **kw):
    m = make(sizes, dtype)
    with knob(_kernels._set_first_layer_fusion, on):
        h = m.fit(X, y, loss="cross_entropy", optimizer=optimizer(), epochs=2,
                  batch_size=batch, seed=1, **kw)
    return m, h


OPTIMIZERS = {"sgd": lambda: nf.SGD(lr=0.05),
              "momentum": lambda: nf.SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
              "adam": lambda: nf.Adam(lr=1e-3)}


# networks over 65,536 parameters (smaller ones take the row split from 2 rows);
# 203 and 517 inputs: first-layer rows not a multiple of four (per thread either);
# 330 and 130 units: vector tails; 256: whole four-vector trips
@pytest.mark.parametrize("sizes", [(203, 330, 10), (300, 256, 7), (517, 130, 30, 5)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
def test_fused_and_separate_passes_train_bit_identically(threads, sizes, dtype, batch, opt,
                                                         zeros):
    X, y = data(sizes, dtype, zeros)
    m_on, h_on = fit(sizes, dtype, X, y, True, batch, OPTIMIZERS[opt])
    m_off, h_off = fit(sizes, dtype, X, y, False, batch, OPTIMIZERS[opt])
    assert m_on._workspace.plan.fused_iterations > 0      # the fused path did run
    assert m_off._workspace.plan.fused_iterations == 0
    for a, b in zip(m_on.get_weights(), m_off.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h_on.batch_losses == h_off.batch_losses


@pytest.mark.parametrize("accumulate", [2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fusion_with_accumulation_and_without_shuffling(threads, accumulate, shuffle):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32, zeros=False)
    for opt in ("sgd", "momentum"):
        m_on, h_on = fit(sizes, np.float32, X, y, True, 1, OPTIMIZERS[opt],
                         accumulate=accumulate, shuffle=shuffle)
        m_off, h_off = fit(sizes, np.float32, X, y, False, 1, OPTIMIZERS[opt],
                           accumulate=accumulate, shuffle=shuffle)
        assert m_on._workspace.plan.fused_iterations > 0
        for a, b in zip(m_on.get_weights(), m_off.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert h_on.batch_losses == h_off.batch_losses
        assert (h_on.iterations, h_on.steps) == (h_off.iterations, h_off.steps)


def test_fused_batch_one_matches_the_numpy_backend(threads):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float64, zeros=True, n=40)
    m, h = fit(sizes, np.float64, X, y, True, 1, OPTIMIZERS["sgd"])
    assert m._workspace.plan.fused_iterations > 0
    ref = nf.Sequential(*make(sizes, np.float64).layers, seed=3, dtype="float64",
                        backend="numpy")
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                    batch_size=1, seed=1)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h.batch_losses, h_ref.batch_losses, rtol=1e-10)


def test_narrow_first_layer_and_row_split_batches_are_not_fused(threads):
    # a first layer of 10 units takes the narrow-row kernels (AVX2), which keep their
    # outputs in registers; a small network's batches of 2+ rows take the row split
    for sizes, batch in (((64, 10), 1), ((64, 128, 10), 4)):
        X, y = data(sizes, np.float32, zeros=False)
        m, _ = fit(sizes, np.float32, X, y, True, batch, OPTIMIZERS["sgd"])
        narrow = sizes[1] == 10 and _kernels.compiled_isa() != "generic"
        if narrow or batch > 1:
            assert m._workspace.plan.fused_iterations == 0
        m_off, _ = fit(sizes, np.float32, X, y, False, batch, OPTIMIZERS["sgd"])
        for a, b in zip(m.get_weights(), m_off.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_divergence_stops_before_the_fused_product_is_used():
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32, zeros=False, n=20)
    X[11, 5:45] = np.float32(3e38)       # sample 11 overflows the forward pass
    results = []
    for on in (True, False):
        m = make(sizes, np.float32)
        with knob(_kernels._set_first_layer_fusion, on), \
                pytest.raises(nf.DivergenceError) as err:
            m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01), epochs=1,
                  batch_size=1, shuffle=False)
        results.append((m.get_weights(), err.value.history.batch_losses))
    (w_on, l_on), (w_off, l_off) = results
    # the History holds the 11 good iterations; sample 11 changed nothing
    assert len(l_on) == 11 and l_on == l_off
    for a, b in zip(w_on, w_off):
        np.testing.assert_array_equal(a, b)


def test_setting_returns_the_previous_one():
    old = _kernels._set_first_layer_fusion(False)
    try:
        assert _kernels._set_first_layer_fusion(True) is False
    finally:
        _kernels._set_first_layer_fusion(old)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy_probs"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_fusion_with_target_rows(threads, loss, shuffle):
    # losses whose targets are rows of T: the next batch's targets are gathered into the
    # plan's second buffer while the current batch's are in use
    rng = np.random.default_rng(11)
    X = rng.random((45, 203)).astype(np.float32)
    if loss == "mse":
        last, T, name = "identity", rng.standard_normal((45, 6)), "mse"
    elif loss == "binary_cross_entropy":
        last, T, name = "sigmoid", (rng.random((45, 6)) < 0.4), "binary_cross_entropy"
    else:
        last, name = "softmax", "cross_entropy"
        T = rng.random((45, 6))
        T /= T.sum(axis=1, keepdims=True)
    T = T.astype(np.float32)
    results = []
    for on in (True, False):
        m = make((203, 330, 6), np.float32, last=last)
        with knob(_kernels._set_first_layer_fusion, on):
            h = m.fit(X, T, loss=name, optimizer=nf.SGD(lr=0.02), epochs=2, batch_size=1,
                      shuffle=shuffle, seed=2)
        results.append((m, h))
    (m_on, h_on), (m_off, h_off) = results
    assert m_on._workspace.plan.fused_iterations > 0
    for a, b in zip(m_on.get_weights(), m_off.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h_on.batch_losses == h_off.batch_losses
