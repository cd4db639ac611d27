"""One knob for every thread pool nnfast touches.

The compiled kernels parallelise with OpenMP and call SciPy's BLAS (through
``scipy.linalg.cython_blas``) single-threaded from inside their own parallel blocks:
an OpenMP region running beside a threaded BLAS call on the same cores was measured
10-15x slower, so the two never overlap. The NumPy backend's matrix products run in
NumPy's own BLAS, which gets the same thread count as the kernels.

``set_num_threads(n)`` therefore sets: OpenMP threads of the kernels = n, NumPy's BLAS
= n, SciPy's BLAS = 1 (the SciPy copy is used by nnfast's kernels; note that this also
makes ``scipy.linalg`` single-threaded in the process), and so is the scipy-openblas32
copy the kernels call instead where it is installed (``nnfast._blas``). threadpoolctl
(and that copy) are loaded only when a thread count is applied, so ``import nnfast``
stays fast.
"""
from __future__ import annotations

import os

from ._validation import positive_int

_state = {"threads": None, "applied": False}

# More threads than any machine this engine targets has cores (OpenMP would start them
# all); also keeps the count within the kernels' C int.
MAX_THREADS = 4096


def _default_threads() -> int:
    from ._compiled import kernels
    if kernels is not None:
        n = kernels.omp_max_threads() if kernels.openmp_enabled() else 1
    else:  # pragma: no cover - numpy-only install
        n = os.cpu_count() or 1
    return max(1, min(n, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def _apply(n: int) -> None:
    from . import _blas, _compiled
    _blas.install()   # first: its library is then one of those set to 1 thread below
    for module in _compiled.loaded_modules():
        module.set_kernel_threads(n)
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return
    controller = ThreadpoolController()
    for lib in controller.select(user_api="blas").lib_controllers:
        path = (lib.filepath or "").replace("\\", "/")
        lib.set_num_threads(1 if "/scipy" in path else n)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads: OpenMP in the kernels and BLAS in the NumPy backend.

    Raises ``ValueError``/``TypeError`` when ``n`` is not an integer from 1 to
    ``MAX_THREADS``.
    """
    n = positive_int(n, "n")
    if n > MAX_THREADS:
        raise ValueError(f"n must be at most {MAX_THREADS} threads, got {n}")
    _apply(n)
    _state["threads"] = n
    _state["applied"] = True


def get_num_threads() -> int:
    """The thread count in effect (the usable cores unless ``set_num_threads`` said)."""
    if _state["threads"] is None:
        _state["threads"] = _default_threads()
    return _state["threads"]


def ensure_policy() -> None:
    """Apply the thread policy once, before the first compiled kernel runs."""
    if not _state["applied"]:
        _apply(get_num_threads())
        _state["applied"] = True
