"""Callbacks: hooks that ``fit`` calls around epochs and batches.

Subclass :class:`Callback` and override what you need. ``on_epoch_end`` may return True
to stop training after that epoch. A callback that overrides ``on_batch_end`` makes
``fit`` return to Python after every iteration, which turns off the compiled
whole-epoch fast path (one ``nogil`` call per run of iterations): use epoch-level hooks
where you can.
"""
from __future__ import annotations


class Callback:
    """Base class; every hook is a no-op."""

    def on_train_begin(self, model, history) -> None:
        """Before the first epoch; ``history`` is the History that ``fit`` will return."""

    def on_epoch_begin(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based)."""

    def on_batch_end(self, iteration: int, logs: dict) -> None:
        """After iteration ``iteration`` (0-based, counted over the fit); ``logs["loss"]``
        is that batch's mean loss."""

    def on_epoch_end(self, epoch: int, logs: dict):
        """After epoch ``epoch`` with its ``logs`` (loss, accuracy, val_loss, ...);
        return True to stop training."""

    def on_train_end(self, history) -> None:
        """After the last epoch (also when a callback stopped training)."""


def wants_batches(callback) -> bool:
    """True when ``callback`` needs Python after every iteration."""
    fn = getattr(type(callback), "on_batch_end", None)
    if fn is None:
        return False
    return fn is not Callback.on_batch_end


# --- built-in callbacks -------------------------------------------------------------------
import math as _math
import os as _os

_MODES = ("auto", "min", "max")


def _resolve_mode(mode, monitor: str) -> str:
    """Keras' rule: "auto" means "max" when the monitored name contains "acc", else "min"."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    return mode


def _check_monitor(monitor) -> str:
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"monitor must be a non-empty str such as 'val_loss', got {monitor!r}")
    return monitor


def _monitored(owner: str, monitor: str, logs: dict) -> float:
    """``logs[monitor]`` as a float, or a ValueError that lists what there is."""
    if monitor not in logs:
        hint = (" (val_* values need validation_data or validation_split in fit)"
                if monitor.startswith("val_") else "")
        raise ValueError(f"{owner}: monitor {monitor!r} is not in the epoch logs{hint}; "
                         f"available keys: {sorted(logs)}")
    return float(logs[monitor])


class _Improvement:
    """Best-so-far bookkeeping shared by EarlyStopping and ModelCheckpoint."""

    def __init__(self, monitor, mode, min_delta=0.0):
        self.monitor = _check_monitor(monitor)
        self.mode = _resolve_mode(mode, self.monitor)
        self.min_delta = min_delta
        self.reset()

    def reset(self):
        self.best = _math.inf if self.mode == "min" else -_math.inf

    def improved(self, value: float) -> bool:
        """Strictly better than the best by more than ``min_delta`` (NaN never is)."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback):
    """Stop training when ``monitor`` has stopped improving (Keras semantics).

    After every epoch the monitored value counts as an improvement when it beats the best
    so far by more than ``min_delta`` (lower for mode "min", higher for "max"). Training
    stops after ``patience`` epochs in a row brought no improvement; as in Keras,
    ``patience=0`` acts like 1 (stop at the first epoch that does not improve).

    Parameters
    ----------
    monitor : str
        Key of the epoch logs: "loss", "accuracy", "val_loss", "val_accuracy". The val_*
        keys need ``validation_data`` or ``validation_split`` in ``fit``; a key missing
        from the logs raises ValueError naming the available keys.
    patience : int >= 0
    min_delta : float >= 0
        Smallest change that counts as an improvement.
    mode : {"auto", "min", "max"}
        "auto" is "max" when ``monitor`` contains "acc", "min" otherwise.
    restore_best_weights : bool
        At the end of training (stopped early or not) put back the weights of the best
        epoch (``model.set_weights``).

    Attributes (after ``fit``)
    --------------------------
    best : float
        Best monitored value seen.
    best_epoch : int
        0-based epoch that gave ``best``.
    stopped_epoch : int
        0-based epoch after which training was stopped; 0 when it ran to the end.
    wait : int
        Epochs since the last improvement.

    Uses epoch-level hooks only, so ``fit`` keeps its compiled whole-epoch fast path.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0,
                 mode: str = "auto", restore_best_weights: bool = False):
        from ._validation import real_number
        import numpy as np
        from ._validation import check_bool
        if (isinstance(patience, (bool, np.bool_)) or not isinstance(patience, (int, np.integer))
                or patience < 0):
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.patience = int(patience)
        self.min_delta = real_number(min_delta, "min_delta", low=0)
        self.restore_best_weights = check_bool(restore_best_weights, "restore_best_weights")
        self._track = _Improvement(monitor, mode, self.min_delta)
        self.monitor = self._track.monitor
        self.mode = self._track.mode
        self._reset()

    def _reset(self):
        self._track.reset()
        self.best = self._track.best
        self.best_epoch = 0
        self.stopped_epoch = 0
        self.wait = 0
        self.best_weights = None
        self.model = None

    def on_train_begin(self, model, history) -> None:
        self._reset()
        self.model = model

    def on_epoch_end(self, epoch: int, logs: dict):
        value = _monitored("EarlyStopping", self.monitor, logs)
        self.wait += 1
        if self._track.improved(value):
            self._track.best = self.best = value
            self.best_epoch = epoch
            self.wait = 0
            if self.restore_best_weights and self.model is not None:
                self.best_weights = self.model.get_weights()
            return False
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, history) -> None:
        if self.stopped_epoch:
            import logging
            logging.getLogger("nnfast").info(
                "EarlyStopping: stopped after epoch %d (best %s = %.6g at epoch %d)",
                self.stopped_epoch + 1, self.monitor, self.best, self.best_epoch + 1)
        if self.restore_best_weights and self.best_weights is not None:
            self.model.set_weights(self.best_weights)

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
                f"min_delta={self.min_delta}, mode={self.mode!r}, "
                f"restore_best_weights={self.restore_best_weights})")


def _check_path_format(path: str) -> None:
    """Reject a ModelCheckpoint path that ``str.format`` cannot fill (a stray brace, a
    positional field, a format spec that fits neither an int epoch nor a float log value)
    before training rather than after the first epoch."""
    import string
    try:
        fields = {name.split(".")[0].split("[")[0]
                  for _, name, _, _ in string.Formatter().parse(path) if name is not None}
        if "" in fields:
            raise ValueError("positional field {}")
        path.format(**{f: 1.0 for f in fields if f != "epoch"}, epoch=1)
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"ModelCheckpoint: path {path!r} is not a valid format string "
                         f"({exc}); use fields such as {{epoch:03d}} or {{val_loss:.4f}}") \
            from None


class ModelCheckpoint(Callback):
    """Save the model after every epoch (or only when ``monitor`` improved).

    Parameters
    ----------
    path : str or os.PathLike
        Target file. It may hold ``str.format`` fields: ``{epoch}`` (1-based) and any key
        of the epoch logs, e.g. ``"ckpt-{epoch:03d}-{val_loss:.3f}.npz"``. Without fields
        the same file is overwritten. Written with :func:`nnfast.save`, which is atomic:
        a crash mid-write never leaves a half-written checkpoint.
    monitor : str
        Used only with ``save_best_only``; a key missing from the logs raises ValueError.
    save_best_only : bool
        Save only when ``monitor`` beats its best so far (the first epoch always does).
    mode : {"auto", "min", "max"}
        As in :class:`EarlyStopping`.
    optimizer : Optimizer or None
        Also store this optimizer's state (pass the instance given to ``fit``), so
        ``nnfast.load(path, with_optimizer=True)`` can resume training exactly.

    Attributes: ``best`` (best monitored value), ``last_path`` (file last written, or None),
    ``saved_epochs`` (0-based epochs that were saved in the last fit).
    """

    def __init__(self, path, monitor: str = "val_loss", save_best_only: bool = False,
                 mode: str = "auto", optimizer=None):
        from ._validation import check_bool
        from .io import _fspath
        self.path = _fspath(path)
        _check_path_format(self.path)
        self.save_best_only = check_bool(save_best_only, "save_best_only")
        self._track = _Improvement(monitor, mode)
        self.monitor = self._track.monitor
        self.mode = self._track.mode
        from .optim import Optimizer
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError("optimizer must be an nnfast Optimizer instance or None, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.model = None
        self._reset()

    def _reset(self):
        self._track.reset()
        self.best = self._track.best
        self.last_path = None
        self.saved_epochs = []

    def on_train_begin(self, model, history) -> None:
        # fail before training, not after the first epoch, when the folder is missing
        folder = _os.path.dirname(_os.path.abspath(self.path))
        if "{" not in folder and not _os.path.isdir(folder):
            raise FileNotFoundError(f"ModelCheckpoint: folder {folder!r} does not exist")
        if self.optimizer is not None:   # before training, not at the first save
            self.optimizer._check_fits(model)
        self._reset()
        self.model = model

    def _format(self, epoch: int, logs: dict) -> str:
        try:
            return self.path.format(**{**logs, "epoch": epoch + 1})
        except (KeyError, IndexError) as exc:
            raise ValueError(f"ModelCheckpoint: path {self.path!r} has field {exc} that is "
                             f"neither 'epoch' nor a key of the epoch logs {sorted(logs)}") \
                from None

    def on_epoch_end(self, epoch: int, logs: dict):
        if self.save_best_only:
            value = _monitored("ModelCheckpoint", self.monitor, logs)
            if not self._track.improved(value):
                return False
            self._track.best = self.best = value
        from .io import save
        target = self._format(epoch, logs)
        save(self.model, target, optimizer=self.optimizer)
        self.last_path = target
        self.saved_epochs.append(epoch)
        return False

    def __repr__(self):
        return (f"ModelCheckpoint({self.path!r}, monitor={self.monitor!r}, "
                f"save_best_only={self.save_best_only}, mode={self.mode!r})")
