"""Hand loops vs gemm (issue 4 fast paths).

Small batches run hand-written loops over W's rows instead of the layer products: below
4 rows for every layer and, for layers of at least 32,768 weights, up to 7 rows when
their rows are split across threads in the AVX2 build, up to 6 on one thread or two in
the SSE2 build (limits measured per build, ``_simd.h``). Whichever path a layer takes,
training must give the same result:
here each batch size from 1 to 12 is trained with the limits forcing gemm everywhere,
forcing the hand loops everywhere, and at the build's defaults, against each other and
the NumPy backend. The limits are module knobs; a plan made before they are raised must
not run the hand loops on more rows than its scratch holds.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

from knobs import RULE_MAX_WEIGHTS, hand_weights_rule, knob

GEMM_ONLY = (1, 1, 1)
HAND_ONLY = (16, 16, 16)
# _set_hand_product_limits: every product on the hand kernels (narrow ones too) / on gemm
HAND_EVERYWHERE = (10**9, 10**9, 10**9, 10**9, 0)
GEMM_EVERYWHERE = (0, 0, 0, 0, -1, 0)


def with_limits(limits, fn):
    old = _kernels._set_small_batch_limits(*limits)
    try:
        return fn()
    finally:
        _kernels._set_small_batch_limits(*old)


def make(dtype, backend="cython"):
    # the first two layers are "large" (>= 32,768 weights), the last is narrow
    return nf.Sequential(nf.Dense(200, 200, activation="relu"),
                         nf.Dense(200, 170, activation="tanh"),
                         nf.Dense(170, 6, activation="softmax"), seed=4, dtype=dtype,
                         backend=backend)


def data(dtype, n=37):
    rng = np.random.default_rng(9)
    X = rng.standard_normal((n, 200))
    X[rng.random(X.shape) < 0.3] = 0.0
    return X.astype(dtype), rng.integers(0, 6, n)


def train(dtype, batch, backend="cython", optimizer=None):
    m = make(dtype, backend)
    X, y = data(dtype)
    h = m.fit(X, y, loss="cross_entropy", optimizer=optimizer or nf.SGD(lr=0.05),
              epochs=2, batch_size=batch, seed=1)
    return m.get_weights(), h.history["loss"]


def test_default_limits_are_ordered():
    every, large, split = _kernels._small_batch_limits()
    assert 1 <= every <= large <= split
    if _kernels.compiled_isa() != "generic":
        assert split > every     # the measured AVX2 crossover is above 4 rows


@pytest.mark.parametrize("batch", range(1, 13))
@pytest.mark.parametrize("optimizer", [lambda: nf.SGD(lr=0.05),
                                       lambda: nf.SGD(lr=0.005, momentum=0.9)],
                         ids=["sgd", "momentum"])
def test_every_path_trains_alike(threads, batch, optimizer):
    ref_w, ref_loss = train(np.float64, batch, backend="numpy", optimizer=optimizer())
    for limits in (GEMM_ONLY, HAND_ONLY, _kernels._small_batch_limits()):
        w, loss = with_limits(limits, lambda: train(np.float64, batch, optimizer=optimizer()))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-10)
        for a, b in zip(w, ref_w):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("batch", range(1, 13))
def test_float32_paths_agree(threads, batch):
    ref_w, _ = train(np.float32, batch, backend="numpy")
    for limits in (GEMM_ONLY, HAND_ONLY):
        w, _ = with_limits(limits, lambda: train(np.float32, batch))
        for a, b in zip(w, ref_w):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_raising_the_limits_after_a_plan_exists_is_safe(threads):
    # the plan's scratch is sized for the limits at its creation (all gemm here); after
    # the limits are raised it must keep using gemm for batches its scratch cannot hold
    X, y = data(np.float64)
    m, ref = make(np.float64), make(np.float64, backend="numpy")

    def fit(model, epochs, seed):
        model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=epochs,
                  batch_size=12, seed=seed)

    with_limits(GEMM_ONLY, lambda: fit(m, 1, 1))          # the plan is made here
    with_limits((4096, 4096, 4096), lambda: fit(m, 2, 2))
    fit(ref, 1, 1)
    fit(ref, 2, 2)
    for a, b in zip(m.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


# The hand loops' dot and axpy run four vectors per trip, then single vectors, then
# scalars (_simd.h): each width below hits a different mix of those three parts (8 floats
# or 4 doubles per AVX2 vector, 16 or 8 per AVX-512 vector in the element-wise loops, 4
# or 2 per SSE2 vector).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33,
                                   36, 40, 41, 47, 48, 63, 64, 65, 79, 80, 81])
def test_hand_loops_at_every_vector_tail(width, dtype):
    rng = np.random.default_rng(width)
    X = rng.standard_normal((23, width)).astype(dtype)
    y = rng.integers(0, 3, 23)

    def fit(backend):
        m = nf.Sequential(nf.Dense(width, width + 3, activation="relu"),
                          nf.Dense(width + 3, width, activation="tanh"),
                          nf.Dense(width, 3, activation="softmax"), seed=2, dtype=dtype,
                          backend=backend)
        h = m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=2,
                  batch_size=3, seed=5)
        return m.get_weights(), h.history["loss"]

    ref_w, ref_loss = fit("numpy")
    split_limit = _kernels._set_row_split_max_params(0)  # small net: keep it off the split
    try:
        w, loss = with_limits(HAND_ONLY, lambda: fit("cython"))
    finally:
        _kernels._set_row_split_max_params(split_limit)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, **tol)
    for a, b in zip(w, ref_w):
        np.testing.assert_allclose(a, b, **tol)


# The small products of the row split (hand kernels for float32 in the AVX2 build, gemm
# otherwise): every row count of a tile (1-6 and beyond), every column tail (full 16-wide
# tiles, a masked second vector, a masked single vector), short and long inner
# dimensions (the nt form transposes B below 16), accumulate and alpha.
SMALL_M = [1, 2, 3, 4, 5, 6, 7, 11, 13]
SMALL_N = [1, 3, 7, 8, 9, 10, 15, 16, 17, 23, 24, 25, 31, 32, 33, 40]
SMALL_K = [1, 2, 7, 8, 9, 15, 16, 17, 18, 23, 24, 31, 40]


def _small_ref(form, A, B, C0, alpha, accumulate):
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    prod = {"nn": lambda: A64 @ B64, "tn": lambda: A64.T @ B64, "nt": lambda: A64 @ B64.T}[form]()
    return alpha * prod + (C0.astype(np.float64) if accumulate else 0.0)


@pytest.fixture
def narrow_on_hand_kernels():
    """Products of every width on the hand kernels (narrow ones take gemm by default)."""
    old = _kernels._set_hand_product_limits(0, 0, 0, 0)
    _kernels._set_hand_product_limits(*old[:4], 0)
    yield
    _kernels._set_hand_product_limits(*old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["nn", "tn", "nt"])
def test_small_products_at_every_tile_edge(form, dtype, narrow_on_hand_kernels):
    rng = np.random.default_rng(7)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    for m in SMALL_M:
        for n in SMALL_N:
            for k in SMALL_K:
                A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(dtype)
                B = rng.standard_normal((n, k) if form == "nt" else (k, n)).astype(dtype)
                cases = [(1.0, False)] if form == "nt" else [(1.0, False), (-0.25, True)]
                for alpha, accumulate in cases:
                    C0 = rng.standard_normal((m, n)).astype(dtype)
                    C = C0.copy() if accumulate else np.full((m, n), np.nan, dtype=dtype)
                    _kernels._small_matmul(form, A, B, C, alpha, accumulate)
                    ref = _small_ref(form, A, B, C0, alpha, accumulate)
                    scale = np.abs(A).max() * np.abs(B).max() * k + np.abs(C0).max()
                    np.testing.assert_allclose(
                        C, ref, rtol=tol, atol=tol * scale,
                        err_msg=f"{form} m={m} n={n} k={k} alpha={alpha} acc={accumulate}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("form", ["nn", "tn"])
def test_layer_sized_products_on_both_paths(form, threads):
    """The products of the larger layers as the crossovers send them, all on gemm (limits
    0) and all on the hand kernels (narrow ones too): inner dimensions across the hand
    kernels' 256-row blocks, rows on both sides of the crossovers, columns split in
    16-wide blocks across threads or, when narrow, rows."""
    rng = np.random.default_rng(11)
    old_threads = nf.get_num_threads()
    nf.set_num_threads(threads)
    try:
        for m, n, k in [(32, 256, 784), (7, 130, 257), (200, 64, 255), (129, 10, 512),
                        (784, 48, 33), (40, 33, 256), (1, 17, 600), (5, 20, 1)]:
            A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(np.float32)
            B = rng.standard_normal((k, n)).astype(np.float32)
            C0 = rng.standard_normal((m, n)).astype(np.float32)
            for limits in [None, GEMM_EVERYWHERE, HAND_EVERYWHERE]:
                old = _kernels._set_hand_product_limits(*limits) if limits else None
                try:
                    for alpha, accumulate in [(1.0, False), (-0.5, True)]:
                        C = C0.copy() if accumulate else np.full((m, n), np.nan, np.float32)
                        _kernels._small_matmul(form, A, B, C, alpha, accumulate, True)
                        ref = _small_ref(form, A, B, C0, alpha, accumulate)
                        scale = np.abs(A).max() * np.abs(B).max() * k + np.abs(C0).max()
                        np.testing.assert_allclose(
                            C, ref, rtol=2e-6, atol=2e-6 * scale,
                            err_msg=f"{form} m={m} n={n} k={k} limits={limits}")
                finally:
                    if old:
                        _kernels._set_hand_product_limits(*old)
    finally:
        nf.set_num_threads(old_threads)


def test_small_products_reject_bad_shapes():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="nn shapes"):
        _kernels._small_matmul("nn", a, np.ones((5, 2), np.float32), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="form"):
        _kernels._small_matmul("tt", a, a, a)


def test_hand_product_limits_knob_round_trips():
    old = _kernels._set_hand_product_limits(0, 0, 0, 0)
    try:
        # HAND_MIN_COLS and HAND_MAX_WEIGHTS as shipped (the weights rule only in the
        # AVX-512 build: _smallgemm.h)
        assert len(old) == 6 and old[4] == 16
        assert old[5] == (RULE_MAX_WEIGHTS if _kernels.compiled_isa() == "avx512" else 0)
        assert _kernels._set_hand_product_limits(1, 2, 3, 4, 7, 9)[:4] == (0, 0, 0, 0)
        assert _kernels._set_hand_product_limits(1, 2, 3, 4) == (1, 2, 3, 4, 7, 9)
        assert _kernels._set_hand_product_limits(1, 2, 3, 4)[4:] == (7, 9)  # -1: unchanged
        with pytest.raises(ValueError, match="min_cols"):
            _kernels._set_hand_product_limits(1, 2, 3, 4, -2)
        with pytest.raises(ValueError, match="max_weights"):
            _kernels._set_hand_product_limits(1, 2, 3, 4, -1, -2)
    finally:
        _kernels._set_hand_product_limits(*old)


def _by_route(form, A, B, C0):
    """C0 - 0.37 op(A) @ B as routed by default, all on gemm and all on the hand kernels
    (an inner dimension over 256 shows the route in the rounding: the hand kernels add
    each block of 256 terms into C in turn)."""
    out = {}
    for path, limits in [("default", None), ("gemm", GEMM_EVERYWHERE),
                         ("hand", HAND_EVERYWHERE)]:
        old = _kernels._set_hand_product_limits(*limits) if limits else None
        try:
            C = C0.copy()
            _kernels._small_matmul(form, A, B, C, -0.37, True)
            out[path] = C
        finally:
            if old:
                _kernels._set_hand_product_limits(*old)
    return out


@pytest.mark.parametrize("form", ["nn", "tn"])
def test_narrow_products_take_gemm_and_wide_ones_the_hand_kernels(form):
    """The routing as shipped, seen through the rounding: a 10-wide product equals the gemm
    path bit for bit, a 32-wide one the hand kernels' (over 300 terms the two paths round
    differently: the hand kernels add the first 256 into C, then the rest). The portable
    build has no hand products: there both widths are gemm's."""
    hand_kernels = _kernels.compiled_isa() != "generic"
    rng = np.random.default_rng(5)
    for n, want in [(10, "gemm"), (32, "hand" if hand_kernels else "gemm")]:
        m, k = 128, 300
        A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(np.float32)
        B = rng.standard_normal((k, n)).astype(np.float32)
        C0 = rng.standard_normal((m, n)).astype(np.float32)
        out = _by_route(form, A, B, C0)
        if hand_kernels:
            assert not np.array_equal(out["gemm"], out["hand"])
        else:   # "hand" limits change nothing where there are no hand kernels
            np.testing.assert_array_equal(out["hand"], out["gemm"])
        np.testing.assert_array_equal(out["default"], out[want])


@pytest.mark.parametrize("form", ["nn", "tn"])
@pytest.mark.parametrize("threaded", [False, True])
def test_packed_panels_change_nothing_but_the_speed(form, threaded):
    """Panels of B are packed from 64 rows of C and 128 of the inner dimension on: the
    products must be bit-identical with packing off, and right against float64, on both
    sides of those limits, across 256-row inner blocks and 16-wide column panels."""
    rng = np.random.default_rng(21)
    old = _kernels._set_hand_product_limits(*HAND_EVERYWHERE)
    try:
        for m, n, k in [(64, 256, 784), (63, 256, 784), (100, 40, 128), (130, 16, 127),
                        (784, 256, 128), (200, 33, 300), (70, 48, 513)]:
            A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(np.float32)
            B = rng.standard_normal((k, n)).astype(np.float32)
            C0 = rng.standard_normal((m, n)).astype(np.float32)
            for alpha, accumulate in [(1.0, False), (-0.37, True)]:
                out = []
                for on in (True, False):
                    C = C0.copy()
                    with knob(_kernels._set_panel_packing, on):
                        _kernels._small_matmul(form, A, B, C, alpha, accumulate, threaded)
                    out.append(C)
                np.testing.assert_array_equal(out[0], out[1])
                ref = _small_ref(form, A, B, C0, alpha, accumulate)
                scale = np.abs(A).max() * np.abs(B).max() * k + np.abs(C0).max()
                np.testing.assert_allclose(out[0], ref, rtol=2e-6, atol=2e-6 * scale,
                                           err_msg=f"{form} m={m} n={n} k={k}")
    finally:
        _kernels._set_hand_product_limits(*old)


@pytest.mark.parametrize("threaded, threads", [(False, 1), (True, 1), (True, 2), (True, 3)])
def test_packed_transposed_a_changes_nothing_but_the_speed(threaded, threads):
    """A^T of a weight gradient (X^T @ dZ) is copied into the row tiles' order where X's
    rows lie more than 512 floats apart, there are two column panels or more and a block
    of at least 64 of the inner dimension: bit-identical with the copy off and right
    against float64, on both sides of each limit, across blocks of 1024 rows (1030: a
    6-row second block), 256-deep inner blocks (300, 600: a short last block left as it
    lies) and partial panels; with B's column sums (the bias gradient) fused too, which
    must be added once however many row blocks there are. Split across threads, the
    packed products go by blocks of rows, the others by blocks of columns."""
    rng = np.random.default_rng(22)
    old = _kernels._set_hand_product_limits(*HAND_EVERYWHERE)
    old_threads = nf.get_num_threads()
    nf.set_num_threads(threads)
    try:
        for m, n, k in [(784, 256, 512), (513, 33, 64), (512, 64, 300), (1030, 40, 300),
                        (600, 100, 63), (700, 17, 600), (2100, 70, 130)]:
            A = rng.standard_normal((k, m)).astype(np.float32)
            B = rng.standard_normal((k, n)).astype(np.float32)
            C0 = rng.standard_normal((m, n)).astype(np.float32)
            s0 = rng.standard_normal(n).astype(np.float32)
            ref = _small_ref("tn", A, B, C0, -0.37, True)
            scale = np.abs(A).max() * np.abs(B).max() * k + np.abs(C0).max()
            out, fused, sums = [], [], []
            for on in (True, False):
                C, colsum = C0.copy(), s0.copy()
                with knob(_kernels._set_a_packing, on):
                    _kernels._small_matmul("tn", A, B, C, -0.37, True, threaded)
                    out.append(C)
                    C = C0.copy()
                    done = _kernels._epilogue_product("tn", A, B, C, colsum=colsum,
                                                      alpha=-0.37, accumulate=True)
                fused.append(C)
                sums.append((colsum, done))
            for got in (out, fused):
                np.testing.assert_array_equal(got[0], got[1])
                np.testing.assert_allclose(got[0], ref, rtol=2e-6, atol=2e-6 * scale,
                                           err_msg=f"m={m} n={n} k={k}")
            (s_on, done_on), (s_off, done_off) = sums
            assert done_on == done_off
            np.testing.assert_array_equal(s_on, s_off)
            np.testing.assert_allclose(s_on, s0 - 0.37 * B.astype(np.float64).sum(0),
                                       rtol=1e-5, atol=1e-5 * np.abs(B).sum(0).max())
    finally:
        _kernels._set_hand_product_limits(*old)
        nf.set_num_threads(old_threads)


@pytest.mark.skipif(_kernels.compiled_isa() == "generic",
                    reason="the portable build has no hand products")
@pytest.mark.parametrize("form", ["nn", "tn"])
@pytest.mark.parametrize("threads", [1, 2, 9])
def test_small_weights_take_the_hand_kernels_at_any_batch(form, threads):
    """A layer of at most HAND_MAX_WEIGHTS weights (A's 784 x 256) takes the hand kernels
    at 300 rows, far above the row limits, while its columns make two 16-wide panels a
    thread (not on 9 threads); a larger one (1024 x 300) keeps gemm there. That is the
    AVX-512 build as shipped; the AVX2 build ships the rule off, and both layers keep
    gemm. The route shows in the rounding (inner dimensions over 256: the hand kernels
    add the first 256 terms into C, then the rest)."""
    rng = np.random.default_rng(8)
    old_threads = nf.get_num_threads()
    nf.set_num_threads(threads)
    try:
        with hand_weights_rule():
            _small_weights_route(form, rng, "hand" if threads < 9 else "gemm")
        # as shipped: the AVX2 build has the rule off, so such a layer keeps gemm
        shipped = "hand" if _kernels.compiled_isa() == "avx512" and threads < 9 else "gemm"
        _small_weights_route(form, rng, shipped)
    finally:
        nf.set_num_threads(old_threads)


def _small_weights_route(form, rng, small):
    for (k_w, n_w), want in [((784, 256), small), ((1024, 300), "gemm")]:
        rows = 300
        if form == "nn":     # forward: C[rows, n_w] = X[rows, k_w] @ W
            m, n, k = rows, n_w, k_w
        else:                # update: C = W[k_w, n_w] += X^T @ dZ, inner = rows
            m, n, k = k_w, n_w, rows
        A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(np.float32)
        B = rng.standard_normal((k, n)).astype(np.float32)
        C0 = rng.standard_normal((m, n)).astype(np.float32)
        out = _by_route(form, A, B, C0)
        assert not np.array_equal(out["gemm"], out["hand"])
        np.testing.assert_array_equal(out["default"], out[want])


@pytest.mark.parametrize("packing", ["panels of B", "transposed A"])
@pytest.mark.parametrize("batch", [128, 300])
def test_training_is_bit_identical_with_and_without_packing(threads, batch, packing):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 784)).astype(np.float32)
    y = rng.integers(0, 10, 700)
    weights = []
    setter = {"panels of B": _kernels._set_panel_packing,
              "transposed A": _kernels._set_a_packing}[packing]
    for on in (True, False):
        m = nf.Sequential(nf.Dense(784, 256, activation="relu"),
                          nf.Dense(256, 128, activation="relu"),
                          nf.Dense(128, 10, activation="softmax"), seed=1)
        with knob(setter, on):
            m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05, momentum=0.9),
                  batch_size=batch, epochs=2, seed=2)
        weights.append(m.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["_set_panel_packing", "_set_a_packing"])
def test_packing_knobs_round_trip(name):
    setter = getattr(_kernels, name)
    old = setter(False)
    try:
        assert old is (_kernels.compiled_isa() != "generic")
        assert setter(True) is False
    finally:
        setter(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_gradient_below_a_layer_on_packed_transposed_panels(threads):
    """dZ @ W^T takes the hand kernels with panels of W^T packed from W's rows from 64
    rows on (for at most HAND_MAX_WEIGHTS weights), gemm below and above: right against
    float64 on both sides of the limits, for inner widths across the 8 x 8 transposes and
    the 256-deep blocks, with and without the hand path."""
    rng = np.random.default_rng(13)
    old_threads = nf.get_num_threads()
    nf.set_num_threads(threads)
    try:
        for m, k, n in [(64, 256, 128), (63, 256, 128), (100, 17, 10), (130, 40, 7),
                        (128, 784, 300), (200, 16, 257), (65, 130, 1), (513, 256, 8)]:
            dZ = rng.standard_normal((m, n)).astype(np.float32)
            W = rng.standard_normal((k, n)).astype(np.float32)
            A_prev = np.abs(rng.standard_normal((m, k))).astype(np.float32)
            A_prev[rng.random(A_prev.shape) < 0.3] = 0.0
            ref = (dZ.astype(np.float64) @ W.T.astype(np.float64)) * (A_prev > 0)
            scale = np.abs(dZ).max() * np.abs(W).max() * n
            for hand in (True, False):
                old = _kernels._set_hand_nt_packed(hand)
                try:
                    out = np.full((m, k), np.nan, np.float32)
                    _kernels.dense_backward_input(dZ, W, A_prev, out, 1)
                finally:
                    _kernels._set_hand_nt_packed(old)
                np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6 * scale,
                                           err_msg=f"m={m} k={k} n={n} hand={hand}")
    finally:
        nf.set_num_threads(old_threads)


def test_training_with_the_packed_gradient_matches_gemm_and_numpy(threads):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((600, 300)).astype(np.float32)
    y = rng.integers(0, 10, 600)
    weights = {}
    for path in ("hand", "gemm", "numpy"):
        m = nf.Sequential(nf.Dense(300, 256, activation="relu"),
                          nf.Dense(256, 128, activation="tanh"),
                          nf.Dense(128, 10, activation="softmax"), seed=1,
                          backend="numpy" if path == "numpy" else "cython")
        old = _kernels._set_hand_nt_packed(path == "hand")
        try:
            m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), batch_size=100,
                  epochs=2, seed=2)
        finally:
            _kernels._set_hand_nt_packed(old)
        weights[path] = m.get_weights()
    for a, b, c in zip(weights["hand"], weights["gemm"], weights["numpy"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)

