"""The fit loop: epochs, shuffled batches, gradient accumulation, history.

Per epoch: one permutation from the fit's RNG, cut into consecutive batches. Per
iteration: gather the batch rows, ``model._accumulate`` (forward, loss, backward into
the gradient sums). Every ``accumulate`` iterations, and at the end of the epoch with
whatever remains, one optimizer step on ``sum / samples``: so ``k`` micro-batches give
exactly the step of one batch of their combined size.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional

import numpy as np

from . import losses as _losses
from ._validation import as_matrix, positive_int, real_number
from .callbacks import wants_batches
from .data import epoch_order, iterations_per_epoch, resolve_batch_size
from .optim import get_optimizer

logger = logging.getLogger("nnfast")
_SAMPLES_PER_CALL = 8192


class DivergenceError(FloatingPointError):
    """The training loss became NaN or infinite (the model keeps the last good step)."""


class History:
    """What ``fit`` returns.

    Attributes
    ----------
    history : dict of lists
        Per epoch: ``"loss"`` (sample-weighted mean of the epoch's batch losses), and
        ``"accuracy"``, ``"val_loss"``, ``"val_accuracy"`` where they apply.
    batch_losses : list of float
        One mean loss per iteration, over the whole fit.
    iterations, steps, epochs : int
        Totals over the fit.
    """

    def __init__(self):
        self.history: Dict[str, List[float]] = {}
        self.batch_losses: List[float] = []
        self.iterations = 0
        self.steps = 0
        self.epochs = 0

    def _log(self, key, value):
        self.history.setdefault(key, []).append(float(value))

    def __repr__(self):
        return (f"History(epochs={self.epochs}, iterations={self.iterations}, "
                f"steps={self.steps}, keys={sorted(self.history)})")


def fit(model, X, y, loss=None, optimizer=None, epochs=1, batch_size=32, accumulate=1,
        shuffle=True, seed=None, drop_last=False, validation_data=None, callbacks=(),
        verbose=0, validation_split=0.0):
    """Train ``model`` on ``(X, y)``.

    Parameters
    ----------
    loss : {"mse", "cross_entropy", "binary_cross_entropy"}
        Required unless the model was fitted before (then the same loss is reused).
    optimizer : Optimizer, "sgd", "adam" or None
        ``None`` means ``SGD(lr=0.01)``. The optimizer keeps its state across calls.
    epochs : int
        Passes over the data.
    batch_size : int or None
        Samples per iteration; ``None`` (or more than N) is full batch, 1 is plain SGD.
    accumulate : int
        Iterations per step; the step uses the average over all their samples.
    shuffle, seed : bool, int or None
        A fresh permutation every epoch from ``numpy.random.default_rng(seed)``.
    drop_last : bool
        Drop the last, short batch of each epoch.
    validation_data : (X_val, y_val) or None
        Evaluated after every epoch (``val_loss``, ``val_accuracy``).
    callbacks : sequence of Callback
        See :mod:`nnfast.callbacks`. A callback with ``on_batch_end`` turns off the
        whole-epoch fast path (Python runs after every iteration).
    verbose : int
        0 silent; 1 a progress bar per epoch (tqdm, when installed) and one log line per
        epoch through the ``"nnfast"`` logger (printed to stderr if the application
        configured no logging).
    validation_split : float
        Fraction in [0, 1) of the rows, taken from the END of X/y before any shuffling
        (as Keras does), held out as validation data. Not with ``validation_data``.

    Returns
    -------
    History
    """
    name = model._check_loss(loss)
    X = as_matrix(X, "X", model.dtype, model.n_inputs)
    code, T, labels = _losses.prepare_targets(name, y, X.shape[0], model.n_outputs,
                                              model.dtype)
    split = real_number(validation_split, "validation_split", low=0, high=1, high_open=True)
    if split:
        if validation_data is not None:
            raise ValueError("give validation_data or validation_split, not both")
        n_val = int(math.ceil(split * X.shape[0]))
        if n_val >= X.shape[0]:
            raise ValueError(f"validation_split={validation_split} leaves no training rows")
        cut = X.shape[0] - n_val
        val = (X[cut:], code, T[cut:] if T.shape[0] else T,
               labels[cut:] if labels.shape[0] else labels)
        X = X[:cut]
        T = T[:cut] if T.shape[0] else T
        labels = labels[:cut] if labels.shape[0] else labels
    n = X.shape[0]
    epochs = positive_int(epochs, "epochs")
    accumulate = positive_int(accumulate, "accumulate")
    bs = resolve_batch_size(n, batch_size)
    if drop_last and batch_size is not None and batch_size > n:
        raise ValueError(f"drop_last=True with batch_size={batch_size} > {n} samples leaves "
                         "no iteration")
    if not split:
        val = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        Xv = as_matrix(validation_data[0], "validation_data[0]", model.dtype, model.n_inputs)
        val = (Xv,) + _losses.prepare_targets(name, validation_data[1], Xv.shape[0],
                                              model.n_outputs, model.dtype,
                                              "validation_data[1]")
    opt = get_optimizer(optimizer)
    callbacks = list(callbacks or ())
    if verbose:
        _ensure_log_handler()
    model.loss = name
    classification = _losses.is_classification(name)

    rng = np.random.default_rng(seed)
    n_iters = iterations_per_epoch(n, bs, drop_last)
    sizes = np.minimum(bs, n - bs * np.arange(n_iters))      # rows of each iteration
    backend = model._backend
    # Iterations per compiled call: whole runs of the epoch unless a callback needs
    # Python after every batch; bounded so Ctrl-C is honoured within a fraction of a second.
    per_batch = any(wants_batches(cb) for cb in callbacks)
    chunk = 1 if per_batch else max(1, _SAMPLES_PER_CALL // bs)
    no_order = np.empty(0, dtype=np.int64)

    hist = History()
    model.zero_grad()
    _call(callbacks, "on_train_begin", model, hist)
    stop = False
    for epoch in range(epochs):
        _call(callbacks, "on_epoch_begin", epoch)
        order = epoch_order(n, rng, shuffle).astype(np.int64, copy=False) if shuffle else no_order
        out_loss = np.empty(n_iters)
        out_correct = np.zeros(n_iters, dtype=np.int64)
        group = np.zeros(2, dtype=np.int64)
        bar = _progress_bar(n_iters, epoch, epochs) if verbose else None
        for it0 in range(0, n_iters, chunk):
            it1 = min(n_iters, it0 + chunk)
            failed, steps = backend.run_iterations(
                model, X, T, labels, order, bs, it0, it1, n_iters, accumulate, code, opt,
                group, out_loss[it0:it1], out_correct[it0:it1])
            hist.steps += steps
            done = (failed if failed >= 0 else it1) - it0
            hist.iterations += done
            hist.batch_losses.extend((out_loss[it0:it0 + done] / sizes[it0:it0 + done]).tolist())
            if failed >= 0:
                model.zero_grad()
                raise DivergenceError(f"loss became {out_loss[failed - it0]} at epoch "
                                      f"{epoch + 1}, iteration {failed + 1}; weights are those "
                                      "of the last good step")
            if bar is not None:
                bar.update(done)
                bar.set_postfix(loss=f"{out_loss[:it1].sum() / sizes[:it1].sum():.4f}",
                                refresh=False)
            if per_batch:
                _call(callbacks, "on_batch_end", hist.iterations - 1,
                      {"loss": hist.batch_losses[-1]})
        if bar is not None:
            bar.close()
        hist.epochs += 1
        seen = int(sizes.sum())
        logs = {"loss": float(out_loss.sum()) / seen}
        if classification:
            per = seen * (model.n_outputs if code == _losses.BINARY_CROSS_ENTROPY else 1)
            logs["accuracy"] = int(out_correct.sum()) / per
        if val is not None:
            res = model._evaluate_prepared(val[0], val[1], val[2], val[3], name)
            logs["val_loss"] = res["loss"]
            if "accuracy" in res:
                logs["val_accuracy"] = res["accuracy"]
        for key, value in logs.items():
            hist._log(key, value)
        if verbose:
            logger.info("epoch %d/%d - %s", epoch + 1, epochs,
                        " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
        for cb in callbacks:
            fn = getattr(cb, "on_epoch_end", None)
            if fn is not None and fn(epoch, logs):
                stop = True
        if stop:
            break
    _call(callbacks, "on_train_end", hist)
    return hist


def _call(callbacks, method, *args):
    for cb in callbacks:
        fn = getattr(cb, method, None)
        if fn is not None:
            fn(*args)


def _progress_bar(total, epoch, epochs):
    """A tqdm bar for one epoch, or None when tqdm is not installed (the per-epoch log
    line is shown either way)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="it", leave=False)


def _ensure_log_handler():
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
