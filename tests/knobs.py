"""The kernels' measurement knobs (``_kernels._set_*``) as context managers, for tests."""
import contextlib


@contextlib.contextmanager
def knob(setter, *value):
    """Apply ``setter(*value)`` and put the previous setting back on leaving."""
    old = setter(*value)
    try:
        yield old
    finally:
        if isinstance(old, tuple):
            setter(*old)
        else:
            setter(old)
