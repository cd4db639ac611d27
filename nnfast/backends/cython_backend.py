"""The compiled backend: each operation is one call into :mod:`nnfast._kernels`."""
from .. import _threads
from .base import Backend

try:
    from .. import _kernels
except ImportError as exc:  # pragma: no cover - depends on the build
    _kernels = None
    _IMPORT_ERROR = exc


class CythonBackend(Backend):
    name = "cython"

    def __init__(self):
        if _kernels is None:  # pragma: no cover
            raise ImportError(
                "nnfast's compiled kernels are not built (install with `pip install .`); "
                f"use backend='numpy' meanwhile. Import error: {_IMPORT_ERROR}")
        _threads.ensure_policy()

    dense_forward = staticmethod(_kernels.dense_forward) if _kernels else None
    loss_gradient = staticmethod(_kernels.loss_gradient) if _kernels else None
    dense_backward_params = staticmethod(_kernels.dense_backward_params) if _kernels else None
    dense_backward_input = staticmethod(_kernels.dense_backward_input) if _kernels else None
    sgd_update = staticmethod(_kernels.sgd_update) if _kernels else None
    adam_update = staticmethod(_kernels.adam_update) if _kernels else None
    gather_rows = staticmethod(_kernels.gather_rows) if _kernels else None
