"""Training curves as PNG files (matplotlib, an optional extra: ``pip install "nnfast[plot]"``).

matplotlib is imported only when a plot is drawn, so ``import nnfast`` never needs it.
Figures are drawn on the Agg canvas directly (no ``pyplot``, no change to the
application's matplotlib backend or global state).
"""
from __future__ import annotations

import math
import os

__all__ = ["plot_history"]


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError('plotting needs matplotlib, which is not installed: '
                          'pip install "nnfast[plot]" (or pip install matplotlib)') from None
    return Figure, FigureCanvasAgg, MaxNLocator


def _curves(history) -> dict:
    h = getattr(history, "history", history)
    if not isinstance(h, dict):
        raise TypeError("history must be an nnfast History (what fit returns) or its "
                        f".history dict of per-epoch lists, got {type(history).__name__}")
    if not h.get("loss"):
        raise ValueError("history holds no 'loss' values to plot (was the model fitted?)")
    out = {}
    for key, values in h.items():
        try:
            out[key] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise TypeError(f"history[{key!r}] must be a list of numbers") from None
    return out


def plot_history(history, path, title=None, val_label="validation", dpi=100):
    """Draw the loss curves of a fit (and its accuracy curves, when present) to a PNG.

    Parameters
    ----------
    history : History or dict
        What ``Sequential.fit`` returns, or its ``.history`` dict. ``"loss"`` (and
        ``"val_loss"``) go on the left plot, log-scaled when every value is positive;
        ``"accuracy"``/``"val_accuracy"`` on a second plot to the right when present.
    path : str or os.PathLike
        Output file (PNG; another extension picks that format).
    title : str, optional
        Figure title.
    val_label : str
        Word used in the legend for the ``val_*`` curves (e.g. "test").
    dpi : int

    Returns
    -------
    str : the path written.

    Raises ImportError (with the install command) when matplotlib is missing.
    """
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    h = _curves(history)
    path = os.fspath(path)
    has_acc = bool(h.get("accuracy") or h.get("val_accuracy"))
    fig = Figure(figsize=(10 if has_acc else 5.5, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2) if has_acc else [fig.subplots(1, 1)]

    def draw(ax, keys, ylabel):
        values = []
        for key, label in keys:
            ys = h.get(key)
            if ys:
                ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=label)
                values.extend(ys)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
        return values

    losses = draw(axes[0], (("loss", "train loss"), ("val_loss", f"{val_label} loss")), "loss")
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        axes[0].set_yscale("log")
    if has_acc:
        draw(axes[1], (("accuracy", "train accuracy"),
                       ("val_accuracy", f"{val_label} accuracy")), "accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
