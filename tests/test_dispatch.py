"""The kernel builds (nnfast._compiled): the right one is picked, each one computes the
same results, and NNFAST_KERNELS chooses by hand.

Every other test runs on the build this machine picks; CI also runs the kernel tests
with NNFAST_KERNELS=generic. Here both builds are compared with each other and with the
NumPy backend, in-process for single kernels and in subprocesses for whole trainings.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nnfast as nf
from nnfast import _compiled
from nnfast.backends import get_backend
from nnfast.layers import RELU, SOFTMAX, TANH
from nnfast.losses import CROSS_ENTROPY, MSE

pytestmark = pytest.mark.skipif(_compiled.kernels is None, reason="kernels not built")

VARIANTS = _compiled.available_variants() if _compiled.kernels is not None else []
NP = get_backend("numpy")
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(nf.__file__)))


def _built(name):
    return importlib.util.find_spec(f"nnfast._kernels_{name}") is not None


def _run(code, *args, **env_extra):
    """Run ``code`` in a fresh interpreter that imports this same nnfast (from its own
    directory: ``-c`` puts the working directory first on sys.path, and in a checkout
    with an installed copy the source tree would shadow it)."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, **env_extra)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=PACKAGE_PARENT, timeout=300)


def test_the_chosen_build_is_the_best_this_cpu_runs():
    generic = _compiled.module_for("generic")
    assert generic.compiled_isa() == "generic"
    if generic.cpu_has_avx512() and _built("avx512"):
        expected = "avx512"
    elif generic.cpu_has_avx2_fma() and _built("avx2"):
        expected = "avx2"
    else:
        expected = "generic"
    if os.environ.get("NNFAST_KERNELS", "auto") in ("", "auto"):
        assert _compiled.variant == expected
    assert _compiled.kernels.compiled_isa() == _compiled.variant
    assert _compiled.variant in VARIANTS


@pytest.mark.skipif("avx2" not in VARIANTS, reason="no AVX2 build or CPU")
def test_the_avx2_build_is_compiled_for_avx2():
    assert _compiled.module_for("avx2").compiled_isa() == "avx2"


def test_the_cython_backend_uses_the_chosen_build():
    from nnfast.backends import cython_backend
    assert cython_backend._kernels is _compiled.kernels


@pytest.mark.skipif("avx512" not in VARIANTS, reason="no AVX-512 build or CPU")
def test_the_avx512_build_is_compiled_for_avx512():
    assert _compiled.module_for("avx512").compiled_isa() == "avx512"


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(VARIANTS),
                    reason="needs the AVX2 and the AVX-512 build and a CPU that runs both")
@pytest.mark.parametrize("form", ["nn", "tn", "nt"])
@pytest.mark.parametrize("m,n,k", [(1, 16, 5), (3, 17, 33), (13, 31, 300), (64, 32, 128),
                                   (65, 48, 129), (128, 256, 784), (128, 10, 128),
                                   (77, 40, 520), (100, 33, 7), (200, 64, 1)])
def test_the_avx512_and_avx2_hand_products_agree_bit_for_bit(form, m, n, k):
    # each element of C sums the same terms in the same order in both builds' tiles
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if form == "nt" else (k, n)).astype(np.float32)
    c0 = rng.standard_normal((m, n)).astype(np.float32)
    alpha, acc = (1.0, False) if form == "nt" else (0.5, True)
    out = {}
    for name in ("avx2", "avx512"):
        for threaded in (False, True):
            c = c0.copy()
            _compiled.module_for(name)._small_matmul(form, a, b, c, alpha=alpha,
                                                     accumulate=acc, threaded=threaded)
            out[name, threaded] = c
    ref = alpha * ((a.T if form == "tn" else a).astype(np.float64)
                   @ (b.T if form == "nt" else b).astype(np.float64)) + (c0 if acc else 0)
    np.testing.assert_allclose(out["avx512", False], ref, rtol=1e-4, atol=1e-3)
    for key, c in out.items():
        np.testing.assert_array_equal(c, out["avx512", False], err_msg=str(key))
    # and the layer products with their epilogues (nt: the packed panels of W^T)
    # (these follow each build's own choice of kernel: where one build's rule sends the
    # product to gemm and the other's to the hand kernels (the AVX2 build has no
    # weight-count rule, NNF_HAND_MAX_WEIGHTS in _smallgemm.h), the two sum in different orders and
    # agree to rounding only; where both take the same kernel, bit for bit)
    fused, hand = {}, {}
    for name in ("avx2", "avx512"):
        kern = _compiled.module_for(name)
        if form == "nn":
            c, act = np.empty((m, n), np.float32), np.empty((m, n), np.float32)
            hand[name] = kern._epilogue_product("nn", a, b, c, bias=c0[0].copy(), act=act)
            fused[name] = (c, act)
        elif form == "tn":
            c, colsum = c0.copy(), c0[-1].copy()
            hand[name] = kern._epilogue_product("tn", a, b, c, colsum=colsum, alpha=alpha,
                                                accumulate=True)
            fused[name] = (c, colsum)
        else:
            c = np.empty((m, n), np.float32)
            hand[name] = kern._epilogue_product("nt", a, b, c, slope=c0)
            fused[name] = (c,)
    if form == "nn":
        z = a.astype(np.float64) @ b.astype(np.float64) + c0[0]  # alpha 1, no accumulate
        expected = (z, np.maximum(z, 0))
    elif form == "tn":
        expected = (ref, c0[-1] + alpha * b.astype(np.float64).sum(axis=0))
    else:
        expected = (np.where(c0 > 0, ref, 0),)
    for name in ("avx2", "avx512"):
        for x, e in zip(fused[name], expected):
            np.testing.assert_allclose(x, e, rtol=1e-4, atol=1e-3, err_msg=name)
    if hand["avx2"] == hand["avx512"]:
        for x, y in zip(fused["avx2"], fused["avx512"]):
            np.testing.assert_array_equal(x, y)
    else:
        # only the AVX-512 build has the weight-count rule that sends more to the hand
        # kernels
        assert hand["avx512"] and not hand["avx2"], hand


@pytest.mark.parametrize("name", ["generic", "avx2", "avx512"])
def test_nnfast_kernels_selects_a_build(name):
    if name not in VARIANTS:
        pytest.skip(f"{name} build cannot run here")
    res = _run("from nnfast import _compiled as c; print(c.variant, c.kernels.compiled_isa())",
               NNFAST_KERNELS=name)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [name, name]


def test_a_bad_nnfast_kernels_value_is_refused_clearly():
    code = ("import nnfast as nf, numpy as np\n"
            "try:\n    nf.Sequential(nf.Dense(2, 2), backend='cython')\n"
            "except ImportError as e:\n    print('refused:', e)\n"
            "m = nf.Sequential(nf.Dense(2, 2), backend='numpy')\n"
            "print(m.predict(np.ones((1, 2))).shape)\n")
    res = _run(code, NNFAST_KERNELS="sse9")
    assert res.returncode == 0, res.stderr
    assert "refused:" in res.stdout and "NNFAST_KERNELS" in res.stdout
    assert "(1, 2)" in res.stdout    # the NumPy backend still works


def test_set_num_threads_reaches_every_loaded_build():
    modules = [_compiled.module_for(v) for v in VARIANTS]
    before = nf.get_num_threads()
    try:
        nf.set_num_threads(1)
        assert [m.get_kernel_threads() for m in modules] == [1] * len(modules)
        nf.set_num_threads(2)
        want = [2 if m.openmp_enabled() else 1 for m in modules]
        assert [m.get_kernel_threads() for m in modules] == want
    finally:
        nf.set_num_threads(before)


# ---- each build against the NumPy backend, kernel by kernel -------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 784, 256), (3, 33, 130), (64, 130, 7)])
@pytest.mark.parametrize("act", [RELU, TANH])
def test_dense_forward_of_each_build(variant, dtype, shape, act):
    k = _compiled.module_for(variant)
    m, i, o = shape
    rng = np.random.default_rng(m * 1000 + i)
    X = rng.standard_normal((m, i)).astype(dtype)
    W = (rng.standard_normal((i, o)) / np.sqrt(i)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    Z, A = np.empty((m, o), dtype), np.empty((m, o), dtype)
    Zr, Ar = np.empty_like(Z), np.empty_like(A)
    k.dense_forward(X, W, b, Z, A, act)
    NP.dense_forward(X, W, b, Zr, Ar, act)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(A, Ar, rtol=rtol, atol=rtol * np.abs(Ar).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_and_backward_of_each_build(variant, dtype):
    k = _compiled.module_for(variant)
    rng = np.random.default_rng(5)
    m, i, o = 37, 65, 10
    Z = (rng.standard_normal((m, o)) * 4).astype(dtype)
    A = np.empty_like(Z)
    NP.dense_forward(Z, np.eye(o, dtype=dtype), np.zeros(o, dtype), np.empty_like(Z), A, SOFTMAX)
    labels = rng.integers(0, o, m).astype(np.int64)
    T = np.empty((0, o), dtype)
    dZ, dZr = np.empty_like(Z), np.empty_like(Z)
    total = k.loss_gradient(Z, A, T, labels, dZ, CROSS_ENTROPY, SOFTMAX)
    total_r = NP.loss_gradient(Z, A, T, labels, dZr, CROSS_ENTROPY, SOFTMAX)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert abs(total - total_r) <= rtol * abs(total_r)
    np.testing.assert_allclose(dZ, dZr, rtol=rtol, atol=rtol)
    X = rng.standard_normal((m, i)).astype(dtype)
    W = rng.standard_normal((i, o)).astype(dtype)
    dW, db = np.zeros((i, o), dtype), np.zeros(o, dtype)
    dWr, dbr = np.zeros_like(dW), np.zeros_like(db)
    k.dense_backward_params(X, dZ, dW, db)
    NP.dense_backward_params(X, dZ, dWr, dbr)
    np.testing.assert_allclose(dW, dWr, rtol=rtol, atol=rtol * np.abs(dWr).max())
    np.testing.assert_allclose(db, dbr, rtol=rtol, atol=rtol * np.abs(dbr).max())


# ---- whole trainings, one subprocess per build --------------------------------------

_FIT = """
import json, sys, numpy as np, nnfast as nf
from nnfast import _compiled
dtype, batch, loss, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
hidden, momentum = int(sys.argv[5]), float(sys.argv[6])
rng = np.random.default_rng(0)
X = rng.random((96, 20)).astype(dtype)
y = rng.integers(0, 7, 96)
out_act = "softmax" if loss == "cross_entropy" else None
Y = y if loss == "cross_entropy" else np.eye(7, dtype=dtype)[y]
m = nf.Sequential(nf.Dense(20, hidden, activation="relu"),
                  nf.Dense(hidden, 17, activation="tanh"),
                  nf.Dense(17, 7, activation=out_act), dtype=dtype, seed=3, backend=backend)
nf.set_num_threads(2)
h = m.fit(X, Y, loss=loss, optimizer=nf.SGD(lr=0.05, momentum=momentum), epochs=2,
          batch_size=batch, seed=1)
print(json.dumps({"variant": _compiled.variant, "loss": h.history["loss"],
                  "params": [p.tolist() for l in m.layers for p in (l.W, l.b)]}))
"""


def _fit_in_subprocess(variant, dtype, batch, loss, backend="cython", hidden=33,
                       momentum=0.5):
    res = _run(_FIT, dtype, str(batch), loss, backend, str(hidden), str(momentum),
               NNFAST_KERNELS=variant)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_every_build_trains_like_the_numpy_backend(dtype, batch, loss, **net):
    ref = _fit_in_subprocess("generic", dtype, batch, loss, backend="numpy", **net)
    tol = 2e-4 if dtype == "float32" else 1e-10
    for variant in VARIANTS:
        got = _fit_in_subprocess(variant, dtype, batch, loss, **net)
        assert got["variant"] == variant
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=tol)
        for p, r in zip(got["params"], ref["params"]):
            np.testing.assert_allclose(np.array(p), np.array(r), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 3, 40])   # hand loops, hand loops, BLAS/row split
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_every_build_trains_like_the_numpy_backend(dtype, batch, loss):
    _assert_every_build_trains_like_the_numpy_backend(dtype, batch, loss)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("momentum", [0.0, 0.5])  # plain SGD: the fused update + forward
def test_every_build_trains_a_wide_layer_like_the_numpy_backend(dtype, batch, momentum):
    # 150 outputs: the small-batch loops' four-vector trips, one-vector trips and scalar
    # tail at every build's vector width (8 and 16 floats, 4 and 8 doubles)
    _assert_every_build_trains_like_the_numpy_backend(dtype, batch, "cross_entropy",
                                                      hidden=150, momentum=momentum)
