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

import signal
import threading

try:  # the C module: its signal()/getsignal() skip the enum conversions (10x faster)
    import _signal as _sig
except ImportError:  # pragma: no cover - other Python implementations
    _sig = signal

_SIGINT = int(signal.SIGINT)
_DEFAULT = signal.default_int_handler
_MAIN = threading.main_thread().ident
_state = {"depth": 0, "pending": False}


def _handler(signum, frame):
    _state["pending"] = True


def pending() -> bool:
    """True when a SIGINT arrived during the active deferral (main thread only)."""
    return _state["pending"] and threading.get_ident() == _MAIN


def clear() -> None:
    """Forget a pending SIGINT (the caller raises KeyboardInterrupt itself)."""
    _state["pending"] = False


class deferred_sigint:
    """Context manager: hold SIGINT until the block ends, then raise KeyboardInterrupt."""

    __slots__ = ("_active",)

    def __enter__(self):
        self._active = False
        if threading.get_ident() != _MAIN:
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
