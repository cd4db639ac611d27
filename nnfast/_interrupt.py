"""Ctrl-C only at step boundaries.

An optimizer step updates the parameter arrays one after the other; a KeyboardInterrupt
landing between two of them would leave a model that no step sequence produces. While
:class:`deferred_sigint` is active, SIGINT only sets a flag (:func:`pending`); ``fit``
checks it at every step boundary and raises ``KeyboardInterrupt`` there, and a block that
ends with the flag set raises it on exit (so a single ``optimizer.step`` completes first).

Deferral happens only on the main thread (the only one Python delivers signals to) and
only while Python's default SIGINT handler is installed; a handler installed by the
application is left alone. Nested blocks share one flag.
"""
from __future__ import annotations

import _thread

try:  # the C module: its signal()/getsignal() skip the enum conversions (10x faster),
    import _signal as _sig  # and it imports in microseconds where signal takes 2 ms
except ImportError:  # pragma: no cover - other Python implementations
    import signal as _sig

_SIGINT = int(_sig.SIGINT)
_DEFAULT = _sig.default_int_handler
_state = {"depth": 0, "pending": False, "main": None}


def _on_main_thread() -> bool:
    if _state["main"] is None:  # threading is imported on first use, not by import nnfast
        import threading
        _state["main"] = threading.main_thread().ident
    return _thread.get_ident() == _state["main"]


def _handler(signum, frame):
    _state["pending"] = True


def pending() -> bool:
    """True when a SIGINT arrived during the active deferral (main thread only)."""
    return _state["pending"] and _on_main_thread()


def clear() -> None:
    """Forget a pending SIGINT (the caller raises KeyboardInterrupt itself)."""
    _state["pending"] = False


class deferred_sigint:
    """Context manager: hold SIGINT until the block ends, then raise KeyboardInterrupt."""

    __slots__ = ("_active",)

    def __enter__(self):
        self._active = False
        if not _on_main_thread():
            return self
        if _state["depth"] == 0:
            try:
                if _sig.getsignal(_SIGINT) is not _DEFAULT:
                    return self
                _sig.signal(_SIGINT, _handler)
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                return self
            _state["pending"] = False
        _state["depth"] += 1
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._active:
            return False
        _state["depth"] -= 1
        if _state["depth"]:
            return False
        _sig.signal(_SIGINT, _DEFAULT)
        if _state["pending"]:
            _state["pending"] = False
            if exc_type is None:
                raise KeyboardInterrupt
        return False
