"""The hand products' epilogues (issue 4): work on a product's result done by its kernel.

Where a layer's products take the hand kernels (float32, AVX2 build), the forward product
of a ReLU layer adds the bias and writes the activation as it stores Z, the gradient below
a ReLU layer (dZ W^T) applies ReLU's slope as it stores it, and the weight gradient
(X^T dZ) adds dZ's column sums into the bias gradient (or, plain SGD, the bias) while it
packs dZ's panels. Each does the operation of the separate pass it replaces, so with the
epilogues on and off the results are bit-identical; both are also checked against
float64 references.
"""
import contextlib

import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

from knobs import hand_weights_rule, knob

hand_kernels = pytest.mark.skipif(not _kernels.compiled_isa() != "generic",
                                  reason="the portable build has no hand products")


@pytest.fixture(autouse=True)
def _weights_rule_on():
    """Products past the row limits take the hand kernels (and so their epilogues) under
    HAND_MAX_WEIGHTS, which the AVX2 build ships off: here it is on in every build, so
    that the same products are fused in both."""
    with hand_weights_rule():
        yield


@contextlib.contextmanager
def kernel_threads(n):
    before = nf.get_num_threads()
    nf.set_num_threads(n)
    try:
        yield
    finally:
        nf.set_num_threads(before)


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def run(form, A, B, m, n, fused, accumulate=False, alpha=1.0, seed=0):
    """The hook's outputs (C and the epilogue's array) and whether it fused."""
    rng = np.random.default_rng(seed)
    C = rand(rng, m, n) if accumulate else np.zeros((m, n), np.float32)
    extra = {}
    if form == "nn":
        extra = dict(bias=rand(rng, n), act=np.full((m, n), 7.0, np.float32))
        out = "act"
    elif form == "tn":
        extra = dict(colsum=rand(rng, n))
        out = "colsum"
    else:
        slope = np.maximum(rand(rng, m, n), 0)   # ReLU outputs: about half are zero
        slope[0, :] = 0.0                         # and a whole row of them
        extra = dict(slope=slope)
        out = "slope"
    before = {key: value.copy() for key, value in extra.items()}
    done = _kernels._epilogue_product(form, A, B, C, alpha=alpha, accumulate=accumulate,
                                      fused=fused, **extra)
    return C, extra[out], before, done


def limits():
    """The hand kernels' routing limits now (HAND_NN_ROWS, HAND_TN_ROWS, HAND_TN_INNER,
    HAND_NT_ROWS, HAND_MIN_COLS, HAND_MAX_WEIGHTS)."""
    old = _kernels._set_hand_product_limits(0, 0, 0, 0)
    _kernels._set_hand_product_limits(*old)
    return old


def takes_hand_kernels(form, m, n, k, threads):
    """Whether the product would take the hand kernels (``_hand_product``, and
    ``_matmul_nt``'s packed path), so that its epilogue runs in the kernel."""
    nn_rows, tn_rows, tn_inner, _, min_cols, max_weights = limits()
    if n < min_cols:
        return False
    if form == "nn":
        return m <= nn_rows or (k * n <= max_weights and n >= 32 * threads)
    if form == "tn":
        return (m <= tn_rows or k <= tn_inner
                or (m * n <= max_weights and n >= 32 * threads))
    return m >= 64 and n * k <= max_weights


# rows (64 and more: the packed dX kernel's limit), columns below, at and above 16-wide
# panels and two panels per thread, inner dimensions of one and of several 256-deep blocks
SHAPES = [(64, 16, 20), (97, 37, 128), (130, 64, 300), (128, 256, 784), (70, 130, 513),
          (128, 10, 64), (200, 300, 96)]


@hand_kernels
@pytest.mark.parametrize("form", ["nn", "tn", "nt"])
@pytest.mark.parametrize("threads", [1, 2, 9])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_epilogues_match_the_separate_passes_bit_for_bit(form, threads, shape):
    """Fused against product-then-pass on the same kernels: identical arrays, on 1 and 2
    threads (columns split) and 9 (rows split, where the column sums come after), and
    against float64. Products that take gemm (a 10-wide one; on 9 threads those whose
    columns give no thread two panels) fall back to the separate passes, which the hook
    reports."""
    m, n, k = shape
    rng = np.random.default_rng(m * n + k)
    if form == "nn":
        A, B = rand(rng, m, k), rand(rng, k, n, scale=0.1)
    elif form == "tn":
        A, B = rand(rng, k, m), rand(rng, k, n)
    else:
        A, B = rand(rng, m, k), rand(rng, n, k, scale=0.1)
    kw = dict(accumulate=True, alpha=-0.03) if form == "tn" else {}
    with kernel_threads(threads):
        C1, E1, before, done = run(form, A, B, m, n, True, **kw)
        C0, E0, _, done0 = run(form, A, B, m, n, False, **kw)
    assert not done0
    assert done == takes_hand_kernels(form, m, n, k, threads)
    np.testing.assert_array_equal(C1, C0)
    np.testing.assert_array_equal(E1, E0)
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    if form == "nn":
        bias = before["bias"].astype(np.float64)
        z = A64 @ B64 + bias
        np.testing.assert_allclose(C1, z, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(E1, np.maximum(C1, 0), rtol=0, atol=0)
    elif form == "tn":
        ref_sum = before["colsum"].astype(np.float64) - 0.03 * B64.sum(axis=0)
        np.testing.assert_allclose(E1, ref_sum, rtol=1e-4, atol=1e-4)
    else:
        ref = (A64 @ B64.T) * (before["slope"] > 0)
        np.testing.assert_allclose(C1, ref, rtol=1e-4, atol=1e-4)
        assert np.all(C1[before["slope"] <= 0] == 0)


@hand_kernels
@pytest.mark.parametrize("form", ["nn", "nt"])
def test_epilogues_treat_nan_and_inf_as_the_passes_do(form):
    """NaN and inf in a product's result (from NaN and inf in A) come out of the fused
    bias, ReLU and slope exactly as out of the separate passes (ReLU of NaN is 0)."""
    rng = np.random.default_rng(5)
    m, n, k = 96, 64, 150
    A = rand(rng, m, k)
    A[3, 7], A[40, 0], A[41, 149] = np.nan, np.inf, -np.inf
    B = rand(rng, k, n) if form == "nn" else rand(rng, n, k)
    C1, E1, _, done = run(form, A, B, m, n, True)
    C0, E0, _, _ = run(form, A, B, m, n, False)
    assert done
    assert not np.isfinite(C1).all()
    np.testing.assert_array_equal(C1, C0)   # (NaN where NaN)
    np.testing.assert_array_equal(E1, E0)


def test_epilogue_hook_checks_its_arguments():
    A = np.zeros((8, 4), np.float32)
    B = np.zeros((4, 16), np.float32)
    C = np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError, match="form"):
        _kernels._epilogue_product("xx", A, B, C)
    with pytest.raises(ValueError, match="bias"):
        _kernels._epilogue_product("nn", A, B, C)
    with pytest.raises(ValueError, match="overlap"):
        _kernels._epilogue_product("nn", A, B, C, bias=np.zeros(16, np.float32), act=C)
    with pytest.raises(ValueError, match="shapes"):
        _kernels._epilogue_product("tn", A, B, C, colsum=np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="alpha 1"):
        _kernels._epilogue_product("nn", A, B, C, bias=np.zeros(16, np.float32),
                                   act=np.zeros((8, 16), np.float32), alpha=0.5)


LAST = {"cross_entropy": "softmax", "mse": "identity"}


def train(sizes, on, batch, opt, loss="cross_entropy", epochs=2, accumulate=1, n=900,
          shuffle=True):
    rng = np.random.default_rng(11)
    X = rand(rng, n, sizes[0], scale=0.5)
    y = (rng.integers(0, sizes[-1], n) if loss == "cross_entropy"
         else rand(rng, n, sizes[-1]))
    layers = [nf.Dense(i, o, activation="relu") for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation=LAST[loss]))
    model = nf.Sequential(*layers, seed=2)
    optimizer = {"sgd": lambda: nf.SGD(lr=0.05),
                 "momentum": lambda: nf.SGD(lr=0.02, momentum=0.9, weight_decay=1e-3),
                 "adam": lambda: nf.Adam(lr=1e-3)}[opt]()
    count0 = _kernels._epilogue_products()
    with knob(_kernels._set_epilogues, on):
        hist = model.fit(X, y, loss=loss, optimizer=optimizer, epochs=epochs,
                         batch_size=batch, seed=4, accumulate=accumulate, shuffle=shuffle)
    return model, hist, _kernels._epilogue_products() - count0


@hand_kernels
# networks over 65,536 parameters (smaller ones take the row split of the whole network,
# whose kernels are its own); hidden layers of 16-wide panels and not
@pytest.mark.parametrize("sizes", [(784, 256, 128, 10), (517, 130, 37, 10),
                                   (300, 256, 3)], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("batch", [96, 128, 300])
def test_training_with_epilogues_is_bit_identical(threads, sizes, opt, batch):
    """fit with the epilogues on and off: the same weights, losses and accuracy, bit for
    bit (plain SGD folds the bias step into the column sums; the others sum the bias
    gradient), and the epilogues did run."""
    m_on, h_on, used_on = train(sizes, True, batch, opt)
    m_off, h_off, used_off = train(sizes, False, batch, opt)
    assert used_on > 0 and used_off == 0
    for a, b in zip(m_on.get_weights(), m_off.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h_on.batch_losses == h_off.batch_losses
    assert h_on.history["accuracy"] == h_off.history["accuracy"]


@hand_kernels
@pytest.mark.parametrize("accumulate,shuffle,loss", [(3, True, "cross_entropy"),
                                                     (1, False, "mse"),
                                                     (2, True, "mse")])
def test_epilogues_with_accumulation_short_batches_and_mse(threads, accumulate, shuffle,
                                                           loss):
    """Accumulated micro-batches (the bias gradient sums over several), a short last
    batch (900 = 7 x 128 + 4), no shuffle and a regression loss: still bit-identical,
    and the model learns the same as the NumPy backend does."""
    sizes = (300, 256, 64, 4)
    m_on, h_on, used = train(sizes, True, 128, "momentum", loss=loss, accumulate=accumulate,
                             shuffle=shuffle)
    m_off, h_off, _ = train(sizes, False, 128, "momentum", loss=loss, accumulate=accumulate,
                            shuffle=shuffle)
    assert used > 0
    for a, b in zip(m_on.get_weights(), m_off.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h_on.batch_losses == h_off.batch_losses


STEP_RTOL, STEP_ATOL = 3e-4, 3e-4


def _rows_clear_of_the_kink(weights, x, within=1e-4):
    """Which rows of x have every hidden pre-activation (in float64) farther than
    ``within`` from ReLU's kink, beyond float32 rounding's reach."""
    a, clear = x.astype(np.float64), np.ones(len(x), dtype=bool)
    for W, b in zip(weights[0:-2:2], weights[1:-2:2]):
        z = a @ W.astype(np.float64) + b
        clear &= (np.abs(z) >= within).all(axis=1)
        a = np.maximum(z, 0)
    return clear


def test_epilogues_against_the_numpy_backend(threads):
    """A-shaped training steps on the compiled backend (epilogues on, where the build has
    them: the forward's bias and ReLU, the gradient below each layer, the bias sums; with
    momentum, so the gradient sums and the update pass run too) against the NumPy
    backend, both from the compiled model's weights at every step: the same steps to
    float32 rounding. The batches leave out the rows with a pre-activation within
    rounding of ReLU's kink, where one backend may take the unit as active and the other
    not, so that the sample's gradient differs wholly in that unit and, through the
    layers below, in theirs (seen on a Zen 5: z1[107, 63] = 4e-8 moved W1[:, 63] by 1e-4
    in one step; over a whole epoch 415 of W0's weights ended apart)."""
    rng = np.random.default_rng(3)
    X = rand(rng, 640, 784, scale=0.5)
    y = rng.integers(0, 10, 640)
    models, opts = [], []
    for backend in ("cython", "numpy"):
        models.append(nf.Sequential(nf.Dense(784, 256, activation="relu"),
                                    nf.Dense(256, 128, activation="relu"),
                                    nf.Dense(128, 10, activation="softmax"), seed=6,
                                    backend=backend))
        opts.append(nf.SGD(lr=0.05, momentum=0.5))
    order = np.random.default_rng(1).permutation(640)
    for step in range(5):
        start = models[0].get_weights()
        models[1].set_weights(start)
        rows = order[step * 128:(step + 1) * 128]
        rows = rows[_rows_clear_of_the_kink(start, X[rows])]
        assert len(rows) >= 96  # (few rows left out: the batch stays on the same paths)
        for model, opt in zip(models, opts):
            model.fit(X[rows], y[rows], loss="cross_entropy", optimizer=opt,
                      batch_size=len(rows), shuffle=False)
        for i, (a, b, w) in enumerate(zip(models[0].get_weights(),
                                          models[1].get_weights(), start)):
            step_c = (a - w).astype(np.float64)
            step_n = (b - w).astype(np.float64)
            np.testing.assert_allclose(step_c, step_n, rtol=STEP_RTOL,
                                       atol=STEP_ATOL * np.abs(step_n).max(),
                                       err_msg=f"parameter {i} after step {step + 1}")
