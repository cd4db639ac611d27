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
