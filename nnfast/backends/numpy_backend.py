"""The NumPy backend: the reference implementation of every operation.

Idiomatic, vectorised NumPy that writes into the caller's buffers where NumPy
allows (``out=``). It is what the compiled kernels are tested against and the
baseline nnfast is benchmarked against, so it is kept honest, not slow on purpose.
"""
import numpy as np

from ..layers import IDENTITY, LEAKY_RELU, LEAKY_SLOPE, RELU, SIGMOID, SOFTMAX, TANH
from ..losses import BINARY_CROSS_ENTROPY, CROSS_ENTROPY, CROSS_ENTROPY_PROBS, MSE
from .base import Backend


def _sigmoid(Z, out):
    # exp of -|z| only, so nothing overflows
    e = np.exp(-np.abs(Z))
    np.divide(np.where(Z >= 0, 1.0, e), 1.0 + e, out=out)
    return out


def _activate(Z, A, act):
    if act == RELU:
        np.maximum(Z, 0, out=A)
    elif act == LEAKY_RELU:
        np.multiply(Z, np.where(Z > 0, 1.0, LEAKY_SLOPE).astype(Z.dtype), out=A)
    elif act == TANH:
        np.tanh(Z, out=A)
    elif act == SIGMOID:
        _sigmoid(Z, A)
    elif act == SOFTMAX:
        np.subtract(Z, Z.max(axis=1, keepdims=True), out=A)
        np.exp(A, out=A)
        A /= A.sum(axis=1, keepdims=True)
    elif A is not Z:
        A[...] = Z


def _activation_slope(A, act):
    """act'(z) written through a = act(z)."""
    if act == RELU:
        return (A > 0).astype(A.dtype)
    if act == LEAKY_RELU:
        return np.where(A > 0, 1.0, LEAKY_SLOPE).astype(A.dtype)
    if act == TANH:
        return 1 - A * A
    if act == SIGMOID:
        return A * (1 - A)
    return None


def _logsumexp_rows(Z):
    mx = Z.max(axis=1, keepdims=True)
    return (mx + np.log(np.exp(Z - mx).sum(axis=1, keepdims=True)))[:, 0]


class NumpyBackend(Backend):
    name = "numpy"

    def dense_forward(self, X, W, b, Z, A, act):
        np.matmul(X, W, out=Z)
        Z += b
        _activate(Z, A, act)

    def loss_gradient(self, Z, A, T, labels, dZ, loss, act):
        if loss == MSE:
            np.subtract(A, T, out=dZ)
            total = 0.5 * np.sum(np.square(dZ, dtype=np.float64))
            slope = _activation_slope(A, act)
            if slope is not None:
                dZ *= slope
            return float(total)
        if loss == BINARY_CROSS_ENTROPY:
            per_elem = np.maximum(Z, 0) - Z * T + np.log1p(np.exp(-np.abs(Z)))
            np.subtract(A, T, out=dZ)
            return float(per_elem.sum(dtype=np.float64))
        lse = _logsumexp_rows(Z)
        if loss == CROSS_ENTROPY:
            rows = np.arange(Z.shape[0])
            total = np.sum(lse - Z[rows, labels], dtype=np.float64)
            dZ[...] = A
            dZ[rows, labels] -= 1
            return float(total)
        if loss == CROSS_ENTROPY_PROBS:
            total = np.sum(T * (lse[:, None] - Z), dtype=np.float64)
            np.subtract(A, T, out=dZ)
            return float(total)
        raise ValueError(f"unknown loss code {loss}")

    def dense_backward_params(self, X, dZ, dW, db):
        dW += X.T @ dZ
        db += dZ.sum(axis=0)

    def dense_backward_input(self, dZ, W, A_prev, dZ_prev, act_prev):
        np.matmul(dZ, W.T, out=dZ_prev)
        slope = _activation_slope(A_prev, act_prev)
        if slope is not None:
            dZ_prev *= slope

    def sgd_update(self, param, grad_sum, velocity, scale, lr, momentum, nesterov,
                   weight_decay):
        g = grad_sum * scale
        if weight_decay != 0:
            g += weight_decay * param
        if momentum != 0:
            velocity *= momentum
            velocity += g
            if nesterov:
                g += momentum * velocity
            else:
                g = velocity
        param -= lr * g
        grad_sum.fill(0)

    def adam_update(self, param, grad_sum, exp_avg, exp_avg_sq, scale, lr, beta1, beta2,
                    eps, weight_decay, decoupled, step):
        g = grad_sum * scale
        if decoupled:
            param *= 1 - lr * weight_decay
        elif weight_decay != 0:
            g += weight_decay * param
        exp_avg *= beta1
        exp_avg += (1 - beta1) * g
        exp_avg_sq *= beta2
        exp_avg_sq += (1 - beta2) * g * g
        bias1 = 1 - beta1 ** step
        bias2_sqrt = np.sqrt(1 - beta2 ** step)
        denom = np.sqrt(exp_avg_sq) / bias2_sqrt + eps
        param -= (lr / bias1) * (exp_avg / denom)
        grad_sum.fill(0)

    def gather_rows(self, X, index, out):
        np.take(X, index, axis=0, out=out)
