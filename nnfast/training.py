"""The fit loop: epochs, shuffled batches, gradient accumulation, history.

Per epoch: one permutation from the fit's RNG, cut into consecutive batches. Per
iteration: gather the batch rows, ``model._accumulate`` (forward, loss, backward into
the gradient sums). Every ``accumulate`` iterations, and at the end of the epoch with
whatever remains, one optimizer step on ``sum / samples``: so ``k`` micro-batches give
exactly the step of one batch of their combined size.

Failures stop at step boundaries. The backend runs the iterations in calls that end on
step boundaries; between calls ``fit`` writes checkpoints (atomically, with everything a
resume needs to continue bit-identically) and honours a Ctrl-C held back meanwhile
(:mod:`nnfast._interrupt`). A non-finite loss, or parameters / optimizer state made
non-finite by an update (checked at every epoch end and before every checkpoint), raise
DivergenceError after going back to the last good step: each epoch starts from a copy
of the parameters and optimizer state and, when needed, its steps are redone one at a
time up to the last finite one. The same copy undoes the first epoch when its batches
turn out to hold NaN or inf (where the kernels check X batch by batch instead of all of
it before training): fit then raises the ValueError of the up-front check.
"""
from __future__ import annotations

import math
import os
import zlib
from typing import Dict, List, Optional

import numpy as np

from . import _interrupt
from . import io as _io
from . import losses as _losses
from ._interrupt import deferred_sigint
from ._validation import (all_finite, as_matrix, check_bool, check_callbacks, check_finite,
                          check_seed, positive_int, real_number)
from .backends.base import Backend
from .callbacks import wants_batches
from .data import epoch_order, iterations_per_epoch, resolve_batch_size
from .optim import get_optimizer, optimizer_from_config

_SAMPLES_PER_CALL = 8192      # compiled backend: samples per nogil call
_PY_SAMPLES_PER_CALL = 512    # Python-loop backends: samples between interrupt checks


def _logger():
    """The "nnfast" logger. logging (and json below) are imported where they are used:
    together they were a third of what ``import nnfast`` adds to NumPy's import."""
    import logging
    return logging.getLogger("nnfast")


class DivergenceError(FloatingPointError):
    """The training loss became NaN or infinite (the model keeps the last good step).

    ``epoch`` and ``iteration`` (1-based, the iteration within its epoch) say where;
    ``history`` is the History so far."""

    def __init__(self, message, epoch=None, iteration=None):
        super().__init__(message)
        self.epoch = epoch
        self.iteration = iteration


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
        verbose=0, validation_split=0.0, checkpoint=None, checkpoint_every=None,
        resume=False):
    """Train ``model`` on ``(X, y)``.

    Parameters
    ----------
    loss : {"mse", "cross_entropy", "binary_cross_entropy"}
        Required unless the model was fitted before (then the same loss is reused).
    optimizer : Optimizer, "sgd", "adam" or None
        ``None`` means ``SGD(lr=0.01)`` (when resuming: the checkpoint's optimizer). The
        optimizer keeps its state across calls.
    epochs : int
        Passes over the data (when resuming: in total, counting those already done).
    batch_size : int or None
        Samples per iteration; ``None`` (or more than N) is full batch, 1 is plain SGD.
    accumulate : int
        Iterations per step; the step uses the average over all their samples.
    shuffle, seed : bool, int or None
        A fresh permutation every epoch from ``numpy.random.default_rng(seed)``.
    drop_last : bool
        Drop the last, short batch of each epoch.
    validation_data : (X_val, y_val) or None
        Evaluated after every epoch (``val_loss``, ``val_accuracy``), as ``evaluate``
        would: with finite weights whose outputs overflow on these rows, ``val_loss`` is
        ``inf`` (or NaN) and is reported so; only the training loss and the weights
        raise ``DivergenceError``.
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
    checkpoint : str, os.PathLike or None
        File of a training checkpoint, rewritten atomically (temporary file in the same
        folder, fsync, rename) at step boundaries: the weights, the optimizer (its
        configuration, state and step count), the RNG state and the current epoch's
        permutation, the epoch and iteration reached, the History so far and the fit
        configuration. It is also a model file: ``nnfast.load(checkpoint)`` reads it.
    checkpoint_every : int or None
        Write the checkpoint every this many optimizer steps (counted over the whole run,
        so also in the middle of an epoch; a step covers ``accumulate`` iterations), and
        when training ends. ``None`` (default): at the end of every epoch.
    resume : bool
        With ``checkpoint``: if the file exists, continue the run it holds instead of
        starting afresh; if it does not exist, start afresh (so the same call both starts
        and resumes a job). The model's architecture and dtype, ``loss``, ``batch_size``,
        ``accumulate``, ``shuffle``, ``drop_last``, the number of training rows and the
        optimizer's configuration must equal the checkpoint's (``ValueError`` otherwise);
        the weights, optimizer state and RNG state are taken from it (``seed`` is then
        irrelevant). ``X`` and ``y`` must be the training data of the original run: the
        checkpoint keeps a CRC-32 of its rows and targets (as trained on, after the
        validation split), and other data is refused with ``ValueError``.
        ``validation_data`` is not checked.
        With the same backend and thread count the final weights and the History are
        bit-identical to those of an uninterrupted run. A run stopped by a callback is
        finished: resuming it trains nothing. Callbacks' own state is not saved; they see
        ``on_train_begin`` and ``on_epoch_begin`` again for the resumed epoch.

    Returns
    -------
    History
        Of the whole run (a resumed run's History starts with the checkpoint's). The same
        object is ``model.history``, updated as training goes.

    Raises
    ------
    ValueError
        Invalid arguments or data; among them X or y holding NaN or infinity. On the
        compiled backend, in a fit without callbacks, checkpoint or ``drop_last``, X is
        checked batch by batch in the first epoch, as the kernels gather its rows, rather
        than in a pass over all of X before it; NaN or inf found there raises the same
        ValueError, with the model's parameters, ``loss`` and ``history`` and the
        optimizer's state and binding as they were before the call (the gradient
        buffers are cleared, as by any fit).
    DivergenceError
        A batch loss was NaN or infinite, or an update made the parameters or the
        optimizer state NaN or infinite (checked at every epoch end and before every
        checkpoint). The message names the epoch and iteration (also ``exc.epoch`` and
        ``exc.iteration``, 1-based, the iteration within its epoch); the model and the
        optimizer keep the state of the last good step (the last one whose losses and
        results were finite) and ``exc.history`` ends there.
    KeyboardInterrupt
        Ctrl-C stops training at the next step boundary (the compiled backend sees it
        between runs of iterations, a fraction of a second on usual sizes), with the
        weights of a completed step, and propagates.

    Notes
    -----
    Any exception leaving ``fit`` (KeyboardInterrupt, DivergenceError, a callback's
    error) carries the History so far as ``exc.history`` (it is ``model.history`` too).
    That History covers the completed steps: iterations of an unfinished accumulation
    group are dropped from it and their gradients discarded, so the weights are always
    the result of exactly ``history.steps`` steps of this fit.

    To go back to the last good step, ``fit`` keeps one copy of the parameters and the
    optimizer state, refreshed at the start of every epoch (its buffers stay with the
    model for the next fit).
    """
    with model._guard:  # one thread per model (RuntimeError otherwise)
        guard = model._guard   # shared by shallow copies, which share the arrays
        if guard.fitting:  # the guard lets the same thread in (a callback may predict)
            raise RuntimeError("fit was called on a model that is inside fit already (from "
                               "a callback?, or on a shallow copy sharing its layers); the "
                               "outer fit's history and accumulated gradients would be "
                               "lost: fit a deep copy, or train after fit")
        guard.fitting = True
        try:
            return _fit(model, X, y, loss, optimizer, epochs, batch_size, accumulate,
                        shuffle, seed, drop_last, validation_data, callbacks, verbose,
                        validation_split, checkpoint, checkpoint_every, resume)
        finally:
            guard.fitting = False


def _fit(model, X, y, loss, optimizer, epochs, batch_size, accumulate, shuffle, seed,
         drop_last, validation_data, callbacks, verbose, validation_split, checkpoint,
         checkpoint_every, resume):
    name = model._check_loss(loss)
    # where the kernels check each batch as they gather it, X's NaN/inf check is left to
    # the first epoch: a pass of its own reads all of X once more (in-process A/B,
    # deferred over up-front: A/512 1.003-1.031x, A/128 1.011x, B/256 1.007x). Only
    # where nothing outside fit sees that epoch before the error (no callbacks, no
    # checkpoint) and it gathers every row (no drop_last)
    defer_check = (checkpoint is None and not drop_last
                   and (callbacks is None or isinstance(callbacks, (list, tuple))
                        and len(callbacks) == 0)
                   and (batch_size is None or isinstance(batch_size, (int, np.integer))
                        and not isinstance(batch_size, bool) and batch_size > 0)
                   and model._backend.checks_batches(1 << 62 if batch_size is None
                                                     else min(int(batch_size), 1 << 62)))
    X = as_matrix(X, "X", model.dtype, model.n_inputs, finite=not defer_check)
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
        if defer_check:   # rows no epoch gathers
            check_finite(val[0], "X")
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
                                              "validation_data[1]", "validation_data[0]")
    path, every, resume = _check_checkpoint_args(checkpoint, checkpoint_every, resume)
    opt = None if optimizer is None and resume else get_optimizer(optimizer)
    callbacks = check_callbacks(callbacks)
    shuffle = check_bool(shuffle, "shuffle")
    drop_last = check_bool(drop_last, "drop_last")
    if isinstance(verbose, bool) or not isinstance(verbose, (int, np.integer)):
        raise TypeError(f"verbose must be 0, 1 or a larger integer, got {verbose!r}")
    if verbose < 0:
        raise ValueError(f"verbose must be 0, 1 or a larger integer, got {verbose!r}")
    if verbose:
        _ensure_log_handler()

    rng = np.random.default_rng(check_seed(seed))
    n_iters = iterations_per_epoch(n, bs, drop_last)
    # groups never span epochs, so more than an epoch's iterations is the same as all of
    # them (and then fits the kernels' C int)
    accumulate = min(accumulate, n_iters)
    sizes = np.minimum(bs, n - bs * np.arange(n_iters))      # rows of each iteration
    config = {"loss": name, "batch_size": int(bs), "accumulate": accumulate,
              "shuffle": bool(shuffle), "drop_last": bool(drop_last), "n_samples": int(n),
              "n_features": model.n_inputs, "dtype": model.dtype.name}
    data_crc = None if path is None else _data_fingerprint(X, T, labels)
    hist = History()
    start = None
    if resume and os.path.exists(path):
        opt, start = _restore(path, model, opt, config, data_crc, epochs, n_iters, rng,
                              hist)
    elif opt is None:
        opt = get_optimizer(None)
    before = (model.loss, model.history, opt._binding())   # what a bad X leaves as it was
    model.loss = name
    classification = _losses.is_classification(name)
    backend = model._backend
    # Iterations per call: whole runs of the epoch unless a callback needs Python after
    # every batch; bounded so Ctrl-C is honoured within a fraction of a second (the
    # compiled backend sees it between calls, the Python loop at the next step boundary
    # after its call). Whole steps per call, so calls end at step boundaries.
    per_batch = any(wants_batches(cb) for cb in callbacks)
    python_loop = type(backend).run_iterations is Backend.run_iterations
    chunk = 1 if per_batch else max(1, (_PY_SAMPLES_PER_CALL if python_loop
                                        else _SAMPLES_PER_CALL) // bs)
    if chunk > accumulate:
        chunk -= chunk % accumulate
    no_order = np.empty(0, dtype=np.int64)
    next_due = None if every is None else (hist.steps // every + 1) * every

    def save(epoch, it, order, out_loss, out_correct, stopped=False):
        _write_checkpoint(path, model, opt, config, data_crc, epochs, seed, every, split,
                          rng, hist, epoch, it, order, out_loss[:it], out_correct[:it],
                          stopped)

    def roll_back(epoch, stop):
        """The parameters or optimizer state are not finite: redo the epoch's steps up to
        iteration ``stop`` one at a time from the epoch's start, stopping before the first
        whose update is not finite. Returns the DivergenceError to raise."""
        nonlocal pos
        restart.restore(opt, hist)
        keep = _Restart(model, opt)
        a = b = restart.it0
        while a < stop:
            b = min(a + accumulate, n_iters)
            keep.take(a, opt, hist)
            failed, steps = backend.run_iterations(
                model, X, T, labels, order, bs, a, b, n_iters, accumulate, code, opt,
                np.zeros(2, dtype=np.int64), out_loss[a:b], out_correct[a:b])
            if failed >= 0 or not restart.finite():
                keep.restore(opt, hist)
                break
            hist.steps += steps
            hist.iterations += b - a
            hist.batch_losses.extend((out_loss[a:b] / sizes[a:b]).tolist())
            a = b
        pos = a
        if b == restart.it0:   # not made by this fit: nothing to go back to
            return DivergenceError(
                f"the parameters or the optimizer state were already NaN or infinite at "
                f"epoch {epoch + 1}, iteration {b + 1}", epoch=epoch + 1, iteration=b + 1)
        return DivergenceError(
            f"the update of the step ending at epoch {epoch + 1}, iteration {b} made the "
            "parameters or the optimizer state NaN or infinite; the model keeps the weights "
            "of the last good step", epoch=epoch + 1, iteration=b)

    opt._bind(model)          # optimizer state exists from here on (restart copies it)
    restart = _Restart(model, opt, kept=True)
    model.history = hist
    model._zero_grad()
    pos = 0            # iterations of the current epoch done (fit's position in it)
    bar = None         # the epoch's progress bar (verbose), closed on the way out
    try:
        _call(callbacks, "on_train_begin", model, hist)
        with deferred_sigint():
            stop = start is not None and start["stopped"]
            for epoch in range(start["epoch"] if start else 0, epochs):
                if stop:
                    break
                _call(callbacks, "on_epoch_begin", epoch)
                out_loss = np.empty(n_iters)
                out_correct = np.zeros(n_iters, dtype=np.int64)
                if start is not None and epoch == start["epoch"] and start["iteration"]:
                    it0 = start["iteration"]
                    order = start["order"] if shuffle else no_order
                    out_loss[:it0] = start["epoch_loss"]
                    out_correct[:it0] = start["epoch_correct"]
                else:
                    it0 = 0
                    order = (epoch_order(n, rng, shuffle).astype(np.int64, copy=False)
                             if shuffle else no_order)
                pos = it0
                check_x = defer_check and epoch == 0   # epoch 0 gathers every row once
                restart.take(it0, opt, hist)
                steps0 = hist.steps - -(-it0 // accumulate)   # steps at the epoch's start
                group = np.zeros(2, dtype=np.int64)
                bar = _progress_bar(n_iters, epoch, epochs) if verbose else None
                if bar is not None and it0:
                    bar.update(it0)
                while it0 < n_iters:
                    it1 = min(n_iters, it0 + chunk)
                    if next_due is not None:   # end the call where a checkpoint is due
                        it1 = min(it1, (next_due - steps0) * accumulate)
                    failed, steps = backend.run_iterations(
                        model, X, T, labels, order, bs, it0, it1, n_iters, accumulate, code,
                        opt, group, out_loss[it0:it1], out_correct[it0:it1], check_x)
                    hist.steps += steps
                    done = (failed if failed >= 0 else it1) - it0
                    hist.iterations += done
                    hist.batch_losses.extend(
                        (out_loss[it0:it0 + done] / sizes[it0:it0 + done]).tolist())
                    pos = it0 + done
                    if failed >= 0:
                        if check_x and not _finite(X):   # (also rows not reached yet)
                            raise _NonFiniteX
                        if not restart.finite():   # an earlier update overflowed
                            raise roll_back(epoch, failed - failed % accumulate)
                        raise DivergenceError(
                            f"loss became {out_loss[failed - it0]} at epoch {epoch + 1}, "
                            f"iteration {failed + 1}; the model keeps the weights of the last "
                            "good step", epoch=epoch + 1, iteration=failed + 1)
                    if bar is not None:
                        bar.update(done)
                        bar.set_postfix(loss=f"{out_loss[:it1].sum() / sizes[:it1].sum():.4f}",
                                        refresh=False)
                    it0 = it1
                    boundary = it1 % accumulate == 0 or it1 == n_iters
                    if (boundary and next_due is not None and hist.steps >= next_due
                            and it1 < n_iters):
                        if not restart.finite():
                            raise roll_back(epoch, it1)
                        save(epoch, it1, order, out_loss, out_correct)
                        next_due = (hist.steps // every + 1) * every
                    if per_batch:
                        _call(callbacks, "on_batch_end", hist.iterations - 1,
                              {"loss": hist.batch_losses[-1]})
                    if boundary and _interrupt.pending():
                        _interrupt.clear()
                        raise KeyboardInterrupt
                if bar is not None:
                    bar.close()
                if not restart.finite():
                    raise roll_back(epoch, n_iters)
                hist.epochs += 1
                seen = int(sizes.sum())
                logs = {"loss": float(out_loss.sum()) / seen}
                if classification:
                    per = seen * (model.n_outputs if code == _losses.BINARY_CROSS_ENTROPY
                                  else 1)
                    logs["accuracy"] = int(out_correct.sum()) / per
                if val is not None:
                    res = model._evaluate_prepared(val[0], val[1], val[2], val[3], name)
                    logs["val_loss"] = res["loss"]
                    if "accuracy" in res:
                        logs["val_accuracy"] = res["accuracy"]
                for key, value in logs.items():
                    hist._log(key, value)
                if verbose:
                    _logger().info("epoch %d/%d - %s", epoch + 1, epochs,
                                   " - ".join(f"{k}: {v:.4f}" for k, v in logs.items()))
                for cb in callbacks:
                    fn = getattr(cb, "on_epoch_end", None)
                    if fn is not None and fn(epoch, logs):
                        stop = True
                if path is not None and (every is None or stop or epoch == epochs - 1
                                         or hist.steps >= next_due):
                    save(epoch + 1, 0, no_order, out_loss, out_correct, stopped=stop)
                    if every is not None:
                        next_due = (hist.steps // every + 1) * every
                if _interrupt.pending():
                    _interrupt.clear()
                    raise KeyboardInterrupt
        _call(callbacks, "on_train_end", hist)
    except _NonFiniteX:
        # as if X had been checked before training: epoch 0's start is the fit's
        if bar is not None:
            bar.close()
        restart.restore(opt, hist)
        model.loss, model.history = before[0], before[1]
        opt._restore_binding(before[2])
        raise ValueError("X contains NaN or infinity") from None
    except BaseException as exc:
        if bar is not None:
            bar.close()
        # back to the last step boundary: drop an unfinished accumulation group
        open_group = pos % accumulate if pos < n_iters else 0
        if open_group:
            del hist.batch_losses[len(hist.batch_losses) - open_group:]
            hist.iterations -= open_group
        model._zero_grad()
        try:
            exc.history = hist
        except AttributeError:  # pragma: no cover - exceptions without a __dict__
            pass
        raise
    return hist


class _NonFiniteX(Exception):
    """A batch of epoch 0 held NaN or inf (``check_x``); fit raises ValueError for it."""


def _finite(X) -> bool:
    try:
        check_finite(X, "X")
    except ValueError:
        return False
    return True


class _Restart:
    """Copies of what an epoch's steps change (parameters, optimizer state and step
    count, History counters), taken when the epoch (or its resumed part) starts: if an
    update overflows, ``fit`` comes back here and redoes the steps up to the last good
    one. Costs one copy of the parameters and optimizer state per epoch."""

    def __init__(self, model, opt, kept=False):
        self.model = model
        self.arrays = [p for p, _ in model._params_and_grads()]
        self.arrays += [st[key] for st in opt._state for key in sorted(st)]
        self.copies = (_kept_copies(model, self.arrays) if kept
                       else [np.empty_like(a) for a in self.arrays])
        self.flat = [a.reshape(-1) for a in self.arrays]

    def take(self, it0, opt, hist):
        for copy, arr in zip(self.copies, self.arrays):
            np.copyto(copy, arr)
        self.it0, self.opt_iterations = it0, opt.iterations
        self.steps, self.iterations = hist.steps, hist.iterations

    def finite(self) -> bool:
        """True when every parameter and optimizer state array is finite. (Not NumPy's
        ``flat.dot(flat)``: for float64 that is a threaded BLAS call, whose threads then
        spun on the cores of the next epoch and halved A/1's 2-thread speed.)"""
        return all(all_finite(flat) for flat in self.flat)

    def restore(self, opt, hist):
        for copy, arr in zip(self.copies, self.arrays):
            np.copyto(arr, copy)
        opt.iterations = self.opt_iterations
        hist.steps = self.steps
        del hist.batch_losses[self.iterations:]
        hist.iterations = self.iterations
        self.model._zero_grad()


def _kept_copies(model, arrays):
    """Buffers for ``_Restart``'s copies of ``arrays``, kept on the model from one fit to
    the next. Fresh ones are new pages, which the first copy faults in: for C's 21 M
    parameters 38 ms, against 6 ms for a copy into pages already there (a C/256 epoch
    is 1.26 s; in-process A/B, C/256 1.037x)."""
    kept = getattr(model, "_restart_copies", None)
    if kept is None or [(c.shape, c.dtype) for c in kept] != [(a.shape, a.dtype)
                                                              for a in arrays]:
        kept = model._restart_copies = [np.empty_like(a) for a in arrays]
    return kept


def _check_checkpoint_args(checkpoint, checkpoint_every, resume):
    if checkpoint is not None:
        try:
            checkpoint = os.fspath(checkpoint)
        except TypeError:
            raise TypeError("checkpoint must be a path (str or os.PathLike) or None, got "
                            f"{type(checkpoint).__name__}") from None
        if isinstance(checkpoint, bytes):
            checkpoint = os.fsdecode(checkpoint)
        if not checkpoint:
            raise ValueError("checkpoint must be a non-empty path")
    every = None
    if checkpoint_every is not None:
        every = positive_int(checkpoint_every, "checkpoint_every")
        if checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=path")
    if not isinstance(resume, (bool, np.bool_)):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=path (the file to resume from)")
    return checkpoint, every, bool(resume)


def _data_fingerprint(X, T, labels) -> str:
    """CRC-32 of the training rows, their targets and their shapes (8 hex digits).

    A checkpoint keeps it so that resume can refuse other data: continuing bit-identically
    from the saved epoch's permutation needs the very rows of the original run. It covers
    every byte (zlib, about 4 GB/s: 45 ms for 60,000 x 784 float32), and is computed
    once per fit, only when the fit checkpoints."""
    crc = zlib.crc32(repr((X.shape, X.dtype.str, T.shape, T.dtype.str, labels.shape))
                     .encode())
    for arr in (X, T, labels):
        if arr.size:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B"), crc)
    return f"{crc:08x}"


def _write_checkpoint(path, model, opt, config, data_crc, epochs, seed, every, split, rng,
                      hist, epoch, it, order, epoch_loss, epoch_correct, stopped):
    state = {"config": config, "data_crc32": data_crc, "epoch": int(epoch),
             "iteration": int(it),
             "stopped": bool(stopped), "epochs": int(epochs),
             "seed": int(seed) if isinstance(seed, (int, np.integer)) else None,
             "checkpoint_every": every, "validation_split": float(split),
             "rng": rng.bit_generator.state,
             "history": {"history": hist.history, "iterations": hist.iterations,
                         "steps": hist.steps, "epochs": hist.epochs}}
    arrays = {"order": order if it else np.empty(0, dtype=np.int64),
              "batch_losses": np.asarray(hist.batch_losses, dtype=np.float64),
              "epoch_loss": np.asarray(epoch_loss, dtype=np.float64),
              "epoch_correct": np.asarray(epoch_correct, dtype=np.int64)}
    _io.write_checkpoint(path, model, opt, state, arrays)


def _restore(path, model, optimizer, config, data_crc, epochs, n_iters, rng, hist):
    """Check the checkpoint at ``path`` against this fit, then load it into ``model``, the
    optimizer, ``rng`` and ``hist``. Returns (optimizer, where to start)."""
    header, state, extra, arrays = _io.read_checkpoint(path)

    def bad(what):
        return ValueError(f"checkpoint {path!r}: {what}")

    # the same configuration
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise bad("no fit configuration")
    for key, value in config.items():
        theirs = saved.get(key)
        if key == "accumulate" and _is_int(theirs) and theirs > n_iters:
            theirs = n_iters   # written before the clamp was stored: the same groups
        if theirs != value:
            raise ValueError(f"checkpoint {path!r} was written by a fit with {key}="
                             f"{saved.get(key)!r}, this fit has {key}={value!r}; resume "
                             "needs the same configuration (or resume=False to start afresh)")
    saved_crc = state.get("data_crc32")   # absent from checkpoints of nnfast before it
    if saved_crc is not None and saved_crc != data_crc:
        raise ValueError(f"checkpoint {path!r} was written by a fit on other training data "
                         f"(CRC-32 {saved_crc}, this X and y give {data_crc}): resume "
                         "needs the rows and targets of the original run, in the same "
                         "order (or resume=False to start afresh)")
    mine = model.config()
    theirs = header.get("model")
    if (not isinstance(theirs, dict) or theirs.get("layers") != mine["layers"]
            or theirs.get("dtype") != mine["dtype"]):
        raise ValueError(f"checkpoint {path!r} holds a different model "
                         f"({theirs.get('layers') if isinstance(theirs, dict) else None}); "
                         f"this model is {mine['layers']}")
    if not isinstance(header.get("optimizer"), dict):
        raise bad("no optimizer")
    if optimizer is None:
        try:
            opt = optimizer_from_config(header["optimizer"])
        except (TypeError, ValueError) as exc:
            raise bad(f"invalid optimizer description ({exc})") from None
    else:
        opt = optimizer
        import json
        if json.loads(json.dumps(opt.config())) != header["optimizer"]:
            raise ValueError(f"checkpoint {path!r} was written with optimizer "
                             f"{header['optimizer']}, this fit has {opt.config()}; resume "
                             "needs the same optimizer settings")
    # counters and arrays, all checked before anything is changed
    k = config["accumulate"]
    epoch, it = state.get("epoch"), state.get("iteration")
    if not (_is_int(epoch) and _is_int(it) and 0 <= epoch and 0 <= it < n_iters
            and (it == 0 or it % k == 0)):
        raise bad(f"invalid position epoch={epoch!r}, iteration={it!r}")
    if epoch > epochs or (epoch == epochs and it):
        raise ValueError(f"checkpoint {path!r} has already trained {epoch} epoch(s), more "
                         f"than epochs={epochs}")
    h = state.get("history")
    spe = -(-n_iters // k)
    if not (isinstance(h, dict) and isinstance(h.get("history"), dict)
            and h.get("epochs") == epoch and h.get("iterations") == epoch * n_iters + it
            and h.get("steps") == epoch * spe + it // k
            and all(isinstance(key, str) and isinstance(v, list) and len(v) == epoch
                    and all(isinstance(x, (int, float)) for x in v)
                    for key, v in h["history"].items())):
        raise bad("History does not match its counters")
    if not isinstance(state.get("stopped"), bool):
        raise bad("invalid 'stopped' flag")
    order = extra.get("order")
    n = config["n_samples"]
    want = {"batch_losses": (np.float64, h["iterations"]), "epoch_loss": (np.float64, it),
            "epoch_correct": (np.int64, it),
            "order": (np.int64, n if it and config["shuffle"] else 0)}
    for key, (dtype, length) in want.items():
        arr = extra.get(key)
        if arr is None or arr.dtype != dtype or arr.shape != (length,):
            raise bad(f"array {key!r} missing or not ({length},) {np.dtype(dtype).name}")
    if order.shape[0] and not np.array_equal(np.sort(order), np.arange(n)):
        raise bad("the epoch's order is not a permutation of the rows")
    if not (np.isfinite(extra["batch_losses"]).all() and np.isfinite(extra["epoch_loss"]).all()):
        raise bad("losses must be finite")
    weights = []
    for i, (param, _) in enumerate(model._params_and_grads()):
        w = arrays.get(f"param.{i}")
        if (w is None or w.dtype != model.dtype or w.shape != param.shape
                or not np.isfinite(w).all()):
            raise bad(f"parameter array {i} missing or invalid")
        weights.append(w)
    probe = np.random.Generator(type(rng.bit_generator)())
    try:
        probe.bit_generator.state = state.get("rng")
    except (TypeError, ValueError, KeyError) as exc:
        raise bad(f"invalid RNG state ({exc})") from None
    # load: optimizer first (it validates everything before changing itself)
    opt._bind(model)
    opt_state = {key[len("opt."):]: v for key, v in arrays.items() if key.startswith("opt.")}
    try:
        opt.load_state(model, header.get("optimizer_iterations"), opt_state)
    except ValueError as exc:
        raise bad(str(exc)) from None
    model.set_weights(weights)
    rng.bit_generator.state = probe.bit_generator.state
    hist.history = {key: [float(x) for x in v] for key, v in h["history"].items()}
    hist.batch_losses = extra["batch_losses"].tolist()
    hist.iterations, hist.steps, hist.epochs = h["iterations"], h["steps"], h["epochs"]
    return opt, {"epoch": epoch, "iteration": it, "stopped": state["stopped"],
                 "order": order, "epoch_loss": extra["epoch_loss"],
                 "epoch_correct": extra["epoch_correct"]}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def resume(checkpoint, X, y, epochs=None, backend=None, validation_data=None, callbacks=(),
           verbose=0):
    """Continue the training run saved in ``checkpoint`` (written by ``fit(...,
    checkpoint=path)``), rebuilding the model and optimizer from the file.

    ``X``, ``y`` must be the data of the original run (checked through the CRC-32 the
    checkpoint keeps; ``validation_data`` is not checked); the fit
    configuration (loss, batch size, accumulation, shuffling, validation split, checkpoint
    interval) is the checkpoint's. ``epochs`` (total, as in ``fit``) defaults to the
    original run's. Returns ``(model, history)``; the History covers the whole run.
    """
    path = os.fspath(checkpoint)
    header, state, _, arrays = _io.read_checkpoint(path)
    model = _io.model_from_header(header, arrays, backend=backend, path=path)
    cfg = state.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint {path!r}: no fit configuration")
    try:
        kwargs = dict(loss=cfg["loss"], batch_size=cfg["batch_size"],
                      accumulate=cfg["accumulate"], shuffle=cfg["shuffle"],
                      drop_last=cfg["drop_last"],
                      validation_split=state.get("validation_split", 0.0),
                      checkpoint_every=state.get("checkpoint_every"),
                      epochs=state["epochs"] if epochs is None else epochs)
    except KeyError as exc:
        raise ValueError(f"checkpoint {path!r}: fit configuration lacks {exc}") from None
    hist = fit(model, X, y, optimizer=None, validation_data=validation_data,
               callbacks=callbacks, verbose=verbose, checkpoint=path, resume=True, **kwargs)
    return model, hist


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
    import logging
    logger = _logger()
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
