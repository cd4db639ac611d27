"""Checks at the Python boundary: nothing malformed reaches a ``nogil`` kernel."""
from __future__ import annotations

import math

import numpy as np

_FINITE_CHUNK_ROWS = 8192  # bounded temporary for the NaN/inf scan


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise ValueError if ``arr`` holds NaN or inf (scanned in chunks of rows)."""
    if arr.dtype.kind not in "fc":
        return
    flat_rows = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    for start in range(0, flat_rows.shape[0], _FINITE_CHUNK_ROWS):
        if not np.isfinite(flat_rows[start:start + _FINITE_CHUNK_ROWS]).all():
            raise ValueError(f"{name} contains NaN or infinity")


def as_matrix(X, name: str, dtype, n_features: int | None = None) -> np.ndarray:
    """``X`` as a finite, C-contiguous 2-D array of ``dtype``.

    Fortran order, strided views, read-only arrays, other float or integer dtypes are
    converted (a copy only when needed); anything else is an error naming ``name``.
    """
    if X is None:
        raise ValueError(f"{name} is required, got None")
    arr = np.asarray(X)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got {arr.ndim}-D with "
                         f"shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features but the model expects "
                         f"{n_features}")
    out = np.ascontiguousarray(arr, dtype=dtype)
    check_finite(out, name)
    return out


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__} "
                        f"{value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


def real_number(value, name: str, low=None, high=None, low_open=False, high_open=False):
    """A finite real in the given range; the message names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt
