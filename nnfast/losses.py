"""Loss registry and label checks.

All three losses are per-sample sums over outputs, averaged over the batch
(DESIGN §2): ``L_B = (1/M) sum_i L_i``.

* ``"mse"``: ``L_i = 1/2 ||f(x_i) - y_i||^2``. Note PyTorch's ``MSELoss`` averages over
  outputs too and has no 1/2; this is the reference notes' (and scikit-learn's) form.
* ``"cross_entropy"``: softmax last layer; labels are integer classes (M,) or probability
  rows (M, K). ``L_i = -sum_k y_ik log p_ik``, computed from the logits with log-sum-exp.
* ``"binary_cross_entropy"``: sigmoid last layer; targets in [0, 1], shape (M,) for one
  output or (M, K); ``L_i = sum_k bce(z_ik, y_ik)`` from the logits.
"""
from __future__ import annotations

import numpy as np

from .layers import SIGMOID, SOFTMAX
from ._validation import as_array, cast_finite, check_finite

# Loss codes, shared with the kernels (nnfast/_kernels.pyx: enum Loss).
MSE, CROSS_ENTROPY, CROSS_ENTROPY_PROBS, BINARY_CROSS_ENTROPY = range(4)
LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")
_NO_LABELS = np.empty(0, dtype=np.int64)


def check_loss_name(loss) -> str:
    if not isinstance(loss, str):
        raise TypeError(f"loss must be one of {LOSSES}, got {type(loss).__name__}")
    key = loss.lower()
    if key not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return key


def check_loss_fits(loss: str, last_activation_code: int, last_activation: str) -> None:
    """Each loss's gradient is fused with a particular last activation."""
    if loss == "cross_entropy" and last_activation_code != SOFTMAX:
        raise ValueError("loss 'cross_entropy' needs activation='softmax' on the last layer, "
                         f"got {last_activation!r}")
    if loss == "binary_cross_entropy" and last_activation_code != SIGMOID:
        raise ValueError("loss 'binary_cross_entropy' needs activation='sigmoid' on the last "
                         f"layer, got {last_activation!r}")
    if loss == "mse" and last_activation_code == SOFTMAX:
        raise ValueError("loss 'mse' does not support a softmax last layer; use "
                         "'cross_entropy' (or another last activation)")


def is_classification(loss: str) -> bool:
    return loss in ("cross_entropy", "binary_cross_entropy")


def prepare_targets(loss: str, y, n_samples: int, n_outputs: int, dtype, name: str = "y",
                    x_name: str = "X"):
    """Validate ``y`` for ``loss`` and return ``(code, T, labels)`` for the kernels.

    ``T`` is a C-contiguous (M, K) array in the model dtype (an empty (0, K) array for
    integer labels); ``labels`` an int64 (M,) array (empty unless integer labels).
    """
    if y is None:
        raise ValueError(f"{name} is required")
    arr = as_array(y, name)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D or 2-D, got {arr.ndim}-D with shape {arr.shape}")
    if arr.shape[0] != n_samples:
        raise ValueError(f"{name} has {arr.shape[0]} rows but {x_name} has {n_samples}")

    if loss == "cross_entropy" and arr.ndim == 1:
        if arr.dtype.kind == "f":
            check_finite(arr, name)
            if not np.all(arr == np.round(arr)):
                raise ValueError(f"{name} holds class labels for 'cross_entropy' and must be "
                                 "integral")
        if arr.size and (arr.min() < 0 or arr.max() >= n_outputs):
            raise ValueError(f"{name} labels must be in [0, {n_outputs}) for a {n_outputs}-unit "
                             f"softmax, got range [{arr.min()}, {arr.max()}]")
        labels = np.ascontiguousarray(arr, dtype=np.int64)
        return CROSS_ENTROPY, np.empty((0, n_outputs), dtype=dtype), labels

    if arr.ndim == 1:
        if n_outputs != 1:
            raise ValueError(f"{name} has shape {arr.shape} but the model has {n_outputs} "
                             f"outputs; expected ({n_samples}, {n_outputs})")
        arr = arr.reshape(-1, 1)
    if arr.shape[1] != n_outputs:
        raise ValueError(f"{name} has {arr.shape[1]} columns but the model has {n_outputs} "
                         f"outputs")
    T = cast_finite(arr, dtype, name)
    if loss == "cross_entropy":
        sums = T.sum(axis=1, dtype=np.float64)
        if (T < 0).any() or not np.allclose(sums, 1.0, rtol=0, atol=1e-6 * max(1, n_outputs)
                                            if T.dtype == np.float64 else 1e-5):
            raise ValueError(f"{name} probability rows for 'cross_entropy' must be "
                             "non-negative and sum to 1")
        return CROSS_ENTROPY_PROBS, T, _NO_LABELS
    if loss == "binary_cross_entropy":
        if (T < 0).any() or (T > 1).any():
            raise ValueError(f"{name} targets for 'binary_cross_entropy' must be in [0, 1]")
        return BINARY_CROSS_ENTROPY, T, _NO_LABELS
    return MSE, T, _NO_LABELS
