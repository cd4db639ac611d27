"""pytest-benchmark suite for nnfast: ``pytest benchmarks/ --benchmark-only``.

Needs nnfast importable (installed, or the repository root on PYTHONPATH with the
extension built in place) and pytest-benchmark; PyTorch is optional.
"""
import pytest

pytest.importorskip("pytest_benchmark")


def pytest_report_header(config):
    import os

    import numpy as np

    import nnfast as nf
    from nnfast.bench import cpu_model, usable_cores

    from nnfast import _compiled
    omp = bool(_compiled.kernels.openmp_enabled()) if _compiled.kernels else None
    lines = [f"nnfast {nf.__version__} (openmp_enabled={omp}, kernels={_compiled.variant}), "
             f"numpy {np.__version__}, "
             f"CPU: {cpu_model()}, {usable_cores()} usable cores"]
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if k in os.environ:
            lines.append(f"note: {k} is set; it can slow NumPy's BLAS")
    return lines
