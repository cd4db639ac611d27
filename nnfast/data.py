"""Epoch arithmetic and shuffled batches (DESIGN §2, the reference notes' terms).

* iteration: one batch through forward, loss and backward;
* step: one weight update (``accumulate`` iterations per step);
* epoch: every sample seen once: ``ceil(N / batch_size)`` iterations
  (``floor`` with ``drop_last=True``), ``ceil(iterations / accumulate)`` steps.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional

import numpy as np

from ._validation import check_bool, check_seed, positive_int


def resolve_batch_size(n_samples: int, batch_size: Optional[int]) -> int:
    """``None`` or anything larger than N means full batch."""
    n_samples = positive_int(n_samples, "n_samples")
    if batch_size is None:
        return n_samples
    return min(positive_int(batch_size, "batch_size"), n_samples)


def iterations_per_epoch(n_samples: int, batch_size: Optional[int],
                         drop_last: bool = False) -> int:
    bs = resolve_batch_size(n_samples, batch_size)
    return n_samples // bs if check_bool(drop_last, "drop_last") else math.ceil(n_samples / bs)


def steps_per_epoch(n_samples: int, batch_size: Optional[int], accumulate: int = 1,
                    drop_last: bool = False) -> int:
    return math.ceil(iterations_per_epoch(n_samples, batch_size, drop_last) /
                     positive_int(accumulate, "accumulate"))


def epoch_order(n_samples: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    """This epoch's sample order: ``rng.permutation(N)``, or 0..N-1 without shuffling."""
    if shuffle:
        return rng.permutation(n_samples)
    return np.arange(n_samples)


def batch_bounds(n_samples: int, batch_size: int, drop_last: bool) -> List[tuple]:
    """(start, stop) of each batch within the epoch order."""
    stop_at = (n_samples // batch_size) * batch_size if drop_last else n_samples
    return [(s, min(s + batch_size, n_samples)) for s in range(0, stop_at, batch_size)]


def batches(X, y=None, batch_size: Optional[int] = 32, shuffle: bool = True,
            seed: Optional[int] = None, drop_last: bool = False) -> Iterator:
    """One epoch of ``(X_batch, y_batch)`` pairs (or ``X_batch`` alone when y is None).

    Shuffled batches are new arrays gathered from a permutation drawn with
    ``numpy.random.default_rng(seed)``; unshuffled ones are views in data order.
    """
    X = np.asarray(X)
    if X.ndim < 1 or X.shape[0] == 0:
        raise ValueError("X must hold at least one sample")
    n = X.shape[0]
    if y is not None:
        y = np.asarray(y)
        if y.ndim < 1 or y.shape[0] != n:
            raise ValueError(f"y has {y.shape[0] if y.ndim else 0} rows but X has {n}")
    bs = resolve_batch_size(n, batch_size)
    shuffle = check_bool(shuffle, "shuffle")
    drop_last = check_bool(drop_last, "drop_last")
    seed = check_seed(seed)
    if drop_last and batch_size is not None and batch_size > n:
        raise ValueError(f"drop_last=True with batch_size={batch_size} > {n} samples leaves "
                         "no batch")
    order = epoch_order(n, np.random.default_rng(seed), shuffle)
    for start, stop in batch_bounds(n, bs, drop_last):
        if shuffle:
            idx = order[start:stop]
            xb = X[idx]
            yb = None if y is None else y[idx]
        else:
            xb = X[start:stop]
            yb = None if y is None else y[start:stop]
        yield xb if y is None else (xb, yb)
