"""Which build of the compiled kernels this process runs.

On x86-64, setup.py compiles ``_kernels.pyx`` at least twice: ``nnfast._kernels`` for any x86-64
CPU (SSE2) and ``nnfast._kernels_avx2`` with ``-mavx2 -mfma``. The hand-written loops
(small batches: one axpy or dot per weight row) and the elementwise epilogues are
twice as wide with AVX2 (measured at A/1, 784-256-128-10 at batch 1, one thread:
12.5K -> 19.5K samples/s). The portable build is imported first and asks the CPU; the AVX2
build is imported only when the CPU (and the OS) run AVX2 and FMA, since importing it
elsewhere would crash on an illegal instruction. A third build, ``nnfast._kernels_avx512``
(AVX-512 F, DQ, BW and VL as well), is picked over it where the CPU runs those: its hand
matrix products (``_smallgemm.h``) use 512-bit tiles, twice the FLOPs a cycle on CPUs
with two 512-bit FMA units.

``NNFAST_KERNELS`` chooses by hand: ``auto`` (default), ``generic``, ``avx2`` or ``avx512`` (an
``ImportError`` when this CPU or this build cannot run it).

``kernels`` is the chosen module (``None`` when nothing is built; ``IMPORT_ERROR`` says
why) and ``variant`` its name.
"""
from __future__ import annotations

import os

VARIANTS = ("generic", "avx2", "avx512")

kernels = None
variant = None
IMPORT_ERROR: Exception | None = None


def _requested() -> str:
    value = os.environ.get("NNFAST_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto",) + VARIANTS:
        raise ImportError(f"NNFAST_KERNELS must be auto, generic, avx2 or avx512, got {value!r}")
    return value


def _import_build(name: str):
    if name not in VARIANTS:
        raise ValueError(f"unknown kernel build {name!r}; expected one of {VARIANTS}")
    from . import _kernels   # the portable build: always importable, and asks the CPU
    if name == "generic":
        return _kernels
    if not _kernels.cpu_has_avx2_fma():
        raise ImportError("this CPU does not run AVX2 and FMA")
    if name == "avx2":
        from . import _kernels_avx2
        return _kernels_avx2
    if not _kernels.cpu_has_avx512():
        raise ImportError("this CPU (or OS) does not run AVX-512 F, DQ, BW and VL")
    from . import _kernels_avx512
    return _kernels_avx512


def module_for(name: str):
    """The kernel module of build ``name`` (``ImportError`` when it cannot run here),
    calling the BLAS that nnfast._blas chose if it chose one already."""
    module = _import_build(name)
    from . import _blas
    for loaded in loaded_modules():   # with the portable build it may have imported
        _blas.adopt(loaded)
    return module


def available_variants() -> list:
    """Names of the kernel builds this machine can run (for tests and benchmarks)."""
    names = []
    for name in VARIANTS:
        try:
            module_for(name)
        except ImportError:
            continue
        names.append(name)
    return names


def _load():
    """The best build this CPU runs, or the one NNFAST_KERNELS names."""
    requested = _requested()
    if requested != "auto":
        return module_for(requested), requested
    for name in ("avx512", "avx2"):
        try:
            return module_for(name), name
        except ImportError:
            pass
    return module_for("generic"), "generic"


def loaded_modules() -> list:
    """Every kernel module imported so far (thread counts are applied to all of them)."""
    import sys
    return [m for m in (sys.modules.get(f"{__package__}._kernels{suffix}")
                        for suffix in ("", "_avx2", "_avx512")) if m is not None]


try:
    kernels, variant = _load()
except ImportError as exc:  # not built (a NumPy-only checkout), or a bad NNFAST_KERNELS
    IMPORT_ERROR = exc
