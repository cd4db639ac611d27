"""Small real datasets shipped with nnfast, and a deterministic train/test split.

``load_digits()`` reads the UCI "Optical Recognition of Handwritten Digits" data
(E. Alpaydin and C. Kaynak, 1998; CC BY 4.0), in the copy scikit-learn ships as
``sklearn/datasets/data/digits.csv.gz``: 1,797 images of 8x8 pixels with values 0..16,
ten classes. See ``LICENSE-digits.txt`` next to this file.

Nothing is read at import time; the file is parsed on the first call and kept.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from .._validation import check_bool, check_seed

__all__ = ["load_digits", "train_test_split"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_DIGITS_FILE = "digits.csv.gz"
_DIGITS_SHAPE = (1797, 65)
_cache: dict = {}


def _digits_raw() -> np.ndarray:
    raw = _cache.get("digits")
    if raw is None:
        import gzip
        path = os.path.join(_HERE, _DIGITS_FILE)
        with gzip.open(path, "rt", encoding="ascii") as f:
            raw = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
        if raw.shape != _DIGITS_SHAPE:  # pragma: no cover - damaged installation
            raise ValueError(f"{path} holds an array of shape {raw.shape}, expected "
                             f"{_DIGITS_SHAPE}; the nnfast installation is damaged")
        raw.setflags(write=False)
        _cache["digits"] = raw
    return raw


def load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """The handwritten-digits data: ``(X, y)``.

    Returns
    -------
    X : ndarray of float32, shape (1797, 64)
        Each row an 8x8 image flattened row by row, scaled from 0..16 to [0, 1].
    y : ndarray of int64, shape (1797,)
        The digit, 0..9 (about 180 samples per class).

    The arrays are new copies on every call. Source: UCI ML Repository, Alpaydin &
    Kaynak (1998), CC BY 4.0, via scikit-learn (``sklearn.datasets.load_digits``
    returns the same samples in the same order, unscaled).
    """
    raw = _digits_raw()
    X = raw[:, :-1].astype(np.float32)
    X /= np.float32(16.0)
    y = raw[:, -1].astype(np.int64)
    return X, y


def _test_count(n: int, test_size) -> int:
    if isinstance(test_size, (bool, np.bool_)):
        raise TypeError("test_size must be a float in (0, 1) or an int count, got a bool")
    if isinstance(test_size, (int, np.integer)):
        n_test = int(test_size)
        if not 1 <= n_test <= n - 1:
            raise ValueError(f"test_size={n_test} must leave at least one sample on each "
                             f"side of the split ({n} samples)")
        return n_test
    if isinstance(test_size, (float, np.floating)):
        frac = float(test_size)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"test_size must be a fraction in (0, 1), got {frac!r}")
        n_test = int(np.ceil(frac * n))
        if not 1 <= n_test <= n - 1:
            raise ValueError(f"test_size={frac!r} of {n} samples leaves one side of the "
                             "split empty")
        return n_test
    raise TypeError(f"test_size must be a float in (0, 1) or an int count, got "
                    f"{type(test_size).__name__}")


def _stratified_test_rows(y: np.ndarray, n_test: int, rng) -> np.ndarray:
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    # Test rows per class proportional to the class size (largest remainders, ties by
    # class order), so the total is exactly n_test.
    exact = counts * (n_test / y.shape[0])
    take = np.floor(exact).astype(np.int64)
    short = n_test - int(take.sum())
    if short:
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:short]] += 1
    perm = rng.permutation(y.shape[0])
    rows = []
    for k in range(classes.shape[0]):
        members = perm[inverse[perm] == k]
        rows.append(members[:take[k]])
    return np.concatenate(rows)


def train_test_split(X, y, test_size=0.2, seed: Optional[int] = 0, stratify: bool = False):
    """Split ``(X, y)`` into ``X_train, X_test, y_train, y_test`` (scikit-learn's order).

    Deterministic: the rows are shuffled with ``numpy.random.default_rng(seed)
    .permutation(N)``; the first ``ceil(test_size * N)`` rows of that permutation form
    the test set (both parts keep the permutation's order). ``test_size`` is a fraction
    in (0, 1) or a row count. With ``stratify=True`` every class contributes to the test
    set in proportion to its size (the total is the same).

    Returns new arrays (fancy-indexed copies).
    """
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim == 0 or y.ndim == 0:
        raise ValueError("X and y must be arrays with one row per sample")
    n = X.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"X has {n} rows but y has {y.shape[0]}")
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    seed = check_seed(seed)
    stratify = check_bool(stratify, "stratify")
    n_test = _test_count(n, test_size)
    rng = np.random.default_rng(seed)
    if stratify:
        if y.ndim != 1:
            raise ValueError("stratify=True needs a 1-D array of class labels y")
        test_rows = _stratified_test_rows(y, n_test, rng)
        is_test = np.zeros(n, dtype=bool)
        is_test[test_rows] = True
        perm = rng.permutation(n)
        test_idx = perm[is_test[perm]]
        train_idx = perm[~is_test[perm]]
    else:
        perm = rng.permutation(n)
        test_idx = perm[:n_test]
        train_idx = perm[n_test:]
    return X[train_idx], X[test_idx], y[train_idx], y[test_idx]
