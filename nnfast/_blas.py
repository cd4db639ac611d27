"""Which BLAS the kernels' gemm calls go to.

The kernels call ``sgemm``/``dgemm`` single-threaded from inside their own OpenMP
blocks. By default that is SciPy's OpenBLAS, through ``scipy.linalg.cython_blas``. Where
the ``scipy-openblas32`` package (a dependency: the OpenBLAS that NumPy and SciPy build
against, with 32-bit integers as cython_blas has) is installed, its Fortran
``sgemm_``/``dgemm_`` are taken instead: a copy of its own, so running it on one thread
leaves NumPy's and SciPy's thread counts alone. Why: SciPy 1.17 bundles OpenBLAS 0.3.30,
whose SkylakeX sgemm ran C's forward product (256x4096 @ 4096x4096, one thread) at
100 GFLOP/s where 0.3.34 ran 122 (NumPy's 0.3.31: 119); in training (in-process A/B,
2 threads), C/256 1.16x; A and B, whose large products are on the hand kernels, within
2 %.

``NNFAST_BLAS=scipy`` keeps SciPy's. ``install()`` runs with the thread policy
(``nnfast._threads``), before the first kernel does; ``name()`` says which is in use.
"""
from __future__ import annotations

import os

_state = {"name": None, "addresses": (0, 0)}   # (0, 0): SciPy's


def _openblas32():
    """(label, sgemm address, dgemm address) of scipy-openblas32, or None. The library
    stays loaded: the scipy_openblas32 module holds it."""
    if os.environ.get("NNFAST_BLAS", "").strip().lower() == "scipy":
        return None
    try:
        import ctypes
        import scipy_openblas32
        scipy_openblas32.get_openblas_config()    # loads the library (once)
        lib = scipy_openblas32.dll
        lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
        lib.scipy_openblas_set_num_threads(1)
        sgemm = ctypes.cast(lib.scipy_sgemm_, ctypes.c_void_p).value
        dgemm = ctypes.cast(lib.scipy_dgemm_, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return None
    if not sgemm or not dgemm:
        return None
    return f"scipy-openblas32 {scipy_openblas32.__version__}", sgemm, dgemm


def install() -> str:
    """Choose the BLAS (once) and point every loaded kernel build at it; returns its
    name."""
    from . import _compiled
    if _state["name"] is None:
        found = _openblas32()
        if found is None:
            _state["name"] = "scipy (cython_blas)"
        else:
            _state["name"], *addresses = found
            _state["addresses"] = tuple(addresses)
    for module in _compiled.loaded_modules():
        adopt(module)
    return _state["name"]


def adopt(module) -> None:
    """Point a kernel build at the BLAS ``install`` chose (nothing before it has)."""
    if _state["name"] is not None:
        module._use_blas(*_state["addresses"])


def name() -> str:
    """The BLAS of the kernels' gemm calls (after ``install``; None before)."""
    return _state["name"]
