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


# HAND_MAX_WEIGHTS as the AVX-512 build ships it (the AVX2 build ships 0: _smallgemm.h),
# for tests of the products that rule sends to the hand kernels past the row limits
RULE_MAX_WEIGHTS = 262144


@contextlib.contextmanager
def hand_weights_rule(max_weights=RULE_MAX_WEIGHTS):
    """HAND_MAX_WEIGHTS set to ``max_weights`` (the other routing limits unchanged)."""
    from nnfast._compiled import kernels
    old = kernels._set_hand_product_limits(0, 0, 0, 0)
    kernels._set_hand_product_limits(*old[:5], max_weights)
    try:
        yield old
    finally:
        kernels._set_hand_product_limits(*old)
