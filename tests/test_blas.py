"""The BLAS behind the kernels' gemm calls (nnfast._blas): scipy-openblas32's own copy
of OpenBLAS where it is installed (a dependency), single-threaded whatever NumPy's BLAS
is set to, and SciPy's cython_blas with NNFAST_BLAS=scipy; the products and the training
they serve are right on both."""
import os
import subprocess
import sys

import numpy as np
import pytest

import nnfast as nf
from nnfast import _blas, _compiled
from nnfast._compiled import kernels as _kernels

from knobs import knob

GEMM_EVERYWHERE = (0, 0, 0, 0, -1, 0)


def _blas_libraries():
    from threadpoolctl import threadpool_info
    return {os.path.basename(i["filepath"]): i for i in threadpool_info()
            if i.get("user_api") == "blas"}


def test_the_kernels_call_their_own_single_threaded_openblas():
    import scipy_openblas32   # a dependency: its absence is a broken install
    old = nf.get_num_threads()
    nf.set_num_threads(2)
    try:
        assert _blas.name() == f"scipy-openblas32 {scipy_openblas32.__version__}"
        libs = _blas_libraries()
        ours = [i for i in libs.values()
                if "scipy_openblas32" in i["filepath"].replace("\\", "/")]
        assert len(ours) == 1 and ours[0]["num_threads"] == 1
        numpy_blas = [i for i in libs.values() if "numpy" in i["filepath"]]
        assert all(i["num_threads"] == 2 for i in numpy_blas)
        builds = [_compiled.module_for(v) for v in _compiled.available_variants()]
        assert builds and set(builds) == set(_compiled.loaded_modules())
        for module in builds:   # every build calls it, those imported later too
            addresses = module._use_blas()
            assert all(addresses)
            module._use_blas(*addresses)
    finally:
        nf.set_num_threads(old)


def test_nnfast_blas_scipy_keeps_cython_blas():
    code = ("import nnfast as nf; nf.set_num_threads(1); from nnfast import _blas; "
            "print(_blas.name())")
    env = dict(os.environ, NNFAST_BLAS="scipy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(__file__))
    assert out.stdout.strip() == "scipy (cython_blas)"


def _with_blas(use_ours, fn):
    """fn() with every loaded kernel build calling our OpenBLAS (True) or SciPy's."""
    nf.set_num_threads(nf.get_num_threads())      # installs ours
    try:
        for module in _compiled.loaded_modules():
            addresses = module._use_blas()            # SciPy's now; ours was in use
            assert all(addresses)
            if use_ours:
                module._use_blas(*addresses)
        return fn()
    finally:
        _blas.install()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["nn", "tn", "nt"])
def test_gemm_products_are_right_on_either_blas(form, dtype):
    rng = np.random.default_rng(5)
    m, n, k = 70, 45, 300
    A = rng.standard_normal((k, m) if form == "tn" else (m, k)).astype(dtype)
    B = rng.standard_normal((n, k) if form == "nt" else (k, n)).astype(dtype)
    A64, B64 = A.astype(np.float64), B.astype(np.float64)
    ref = {"nn": lambda: A64 @ B64, "tn": lambda: A64.T @ B64,
           "nt": lambda: A64 @ B64.T}[form]()
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for use_ours in (True, False):
        C = np.zeros((m, n), dtype)
        with knob(_kernels._set_hand_product_limits, *GEMM_EVERYWHERE):
            _with_blas(use_ours, lambda: _kernels._small_matmul(form, A, B, C))
        np.testing.assert_allclose(C, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_training_on_gemm_matches_the_numpy_backend_on_either_blas():
    """A layer too large for the hand kernels (1024 x 300 weights) trains on gemm."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((600, 1024)).astype(np.float32)
    y = rng.integers(0, 5, 600)

    def train(backend):
        m = nf.Sequential(nf.Dense(1024, 300, activation="relu"),
                          nf.Dense(300, 5, activation="softmax"), seed=3, backend=backend)
        m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.02, momentum=0.9),
              batch_size=256, epochs=2, seed=4)
        return m.get_weights()

    ref = train("numpy")
    for use_ours in (True, False):
        got = _with_blas(use_ours, lambda: train("cython"))
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_a_build_imported_later_calls_the_same_blas():
    """A build first imported after the BLAS was chosen (NNFAST_KERNELS=generic, then
    another build for a comparison) calls it too."""
    code = ("import nnfast as nf; nf.set_num_threads(1); from nnfast import _compiled; "
            "import sys; names = _compiled.available_variants(); "
            "print(len(names), all(all(_compiled.module_for(n)._use_blas()) for n in names))")
    env = dict(os.environ, NNFAST_KERNELS="generic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(__file__))
    count, every = out.stdout.split()
    assert int(count) >= 1 and every == "True"


_NUMPY_PRODUCTS = {"dot", "vdot", "inner", "outer", "matmul", "tensordot", "einsum"}


def _numpy_products_called(fn):
    """Names of NumPy's product functions and methods (BLAS behind them) that fn() calls
    from Python, as the profiler sees them (C calls by name: np.dot and ndarray.dot
    alike, also from inside Python helpers such as np.linalg.norm; the ``@`` operator is
    not a call and is not seen)."""
    called = []

    def profile(frame, event, arg):
        if event == "c_call":
            name = getattr(arg, "__name__", "")
            if name in _NUMPY_PRODUCTS:
                called.append(getattr(arg, "__qualname__", name))
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return called


@pytest.mark.skipif(_kernels is None, reason="needs the compiled kernels")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_fit_predict_and_evaluate_make_no_numpy_blas_call(dtype):
    # NumPy's BLAS is threaded: after a call its workers spin for a while on the cores
    # the next kernel runs on (a float64 dot per parameter array at each epoch's end
    # once halved A/1's 2-thread speed)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 20)).astype(dtype)
    y = rng.integers(0, 3, 300)
    model = nf.Sequential(nf.Dense(20, 16, activation="relu"),
                          nf.Dense(16, 3, activation="softmax"), dtype=dtype, seed=0)
    opt = nf.Adam(1e-3)
    called = _numpy_products_called(lambda: model.fit(
        X, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=32,
        validation_data=(X[:50], y[:50]), verbose=0))
    assert called == []
    assert _numpy_products_called(lambda: (model.predict(X), model.evaluate(
        X, y, loss="cross_entropy"))) == []
    # the check that replaced those dots still finds an overflowed parameter
    from nnfast.training import _Restart
    restart = _Restart(model, opt)
    assert restart.finite()
    model.layers[0].W[3, 4] = np.inf
    assert not restart.finite()
    model.layers[0].W[3, 4] = 0
    state = opt._state[1]
    state[sorted(state)[0]].reshape(-1)[0] = np.nan
    assert not restart.finite()
