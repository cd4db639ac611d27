"""Backends: the same small set of numeric operations, two implementations.

``"cython"`` (default) runs the compiled kernels in :mod:`nnfast._kernels`;
``"numpy"`` is the readable reference written in idiomatic NumPy. Model code never
branches on which one it holds: it calls the methods of :class:`Backend`.
"""
from .base import Backend, Workspace

_BACKENDS = {}


def get_backend(name):
    """Return the shared backend instance called ``name`` ("cython" or "numpy")."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be 'cython' or 'numpy', got {type(name).__name__}")
    key = name.lower()
    if key not in _BACKENDS:
        if key == "numpy":
            from .numpy_backend import NumpyBackend
            _BACKENDS[key] = NumpyBackend()
        elif key == "cython":
            from .cython_backend import CythonBackend
            _BACKENDS[key] = CythonBackend()
        else:
            raise ValueError(f"backend must be 'cython' or 'numpy', got {name!r}")
    return _BACKENDS[key]


__all__ = ["Backend", "Workspace", "get_backend"]
