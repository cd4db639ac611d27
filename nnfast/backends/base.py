"""The backend interface and the training step composed from its operations.

A backend provides seven operations on preallocated, C-contiguous arrays (the
``Ops`` of the engine). :class:`Backend` composes them into a forward pass and one
gradient-accumulating iteration; a backend may override those two with a fused
version (the Cython backend runs them in fewer, larger compiled calls).

Activation and loss codes are the integers defined in :mod:`nnfast.layers` and
:mod:`nnfast.losses`.
"""
import numpy as np

from ..layers import IDENTITY, SOFTMAX


class Workspace:
    """Buffers for one model and a batch capacity, allocated once and reused.

    For layer ``l``: ``Z[l]`` pre-activations, ``A[l]`` activations (the same array as
    ``Z[l]`` for hidden layers, whose activation is applied in place: backward needs
    only ``A``), ``G[l]`` the gradient w.r.t. ``Z[l]``. Rows ``[:m]`` serve a batch of
    ``m <= capacity``.
    """

    def __init__(self, layers, capacity, dtype):
        self.capacity = capacity
        self.Z, self.A, self.G = [], [], []
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            z = np.empty((capacity, layer.units), dtype=dtype)
            keep_z = i == last and layer.activation_code != IDENTITY
            a = np.empty_like(z) if keep_z else z
            self.Z.append(z)
            self.A.append(a)
            self.G.append(np.empty_like(z))
        self.x_batch = None   # gathered input rows (fit's shuffled batches)
        self.t_batch = None   # gathered target rows
        self.l_batch = None   # gathered integer labels

    def rows(self, m):
        """Views of the first ``m`` rows of every buffer: (Z, A, G) lists."""
        if m == self.capacity:
            return self.Z, self.A, self.G
        return ([z[:m] for z in self.Z], [a[:m] for a in self.A], [g[:m] for g in self.G])


class Backend:
    """Interface every backend implements; see the NumPy backend for the reference math."""

    name = "abstract"

    # --- the operations (one job each) -------------------------------------------------
    def dense_forward(self, X, W, b, Z, A, act):  # pragma: no cover - interface
        """Z = X @ W + b; A = act(Z)."""
        raise NotImplementedError

    def loss_gradient(self, Z, A, T, labels, dZ, loss, act):  # pragma: no cover
        """Return the summed loss of the rows; write dZ = dL_i/dZ_i (not divided by M)."""
        raise NotImplementedError

    def dense_backward_params(self, X, dZ, dW, db):  # pragma: no cover
        """dW += X^T dZ; db += column sums of dZ."""
        raise NotImplementedError

    def dense_backward_input(self, dZ, W, A_prev, dZ_prev, act_prev):  # pragma: no cover
        """dZ_prev = (dZ @ W^T) * act_prev'(A_prev)."""
        raise NotImplementedError

    def sgd_update(self, param, grad_sum, velocity, scale, lr, momentum, nesterov,
                   weight_decay):  # pragma: no cover
        """PyTorch SGD on g = grad_sum * scale (flat arrays); zero grad_sum."""
        raise NotImplementedError

    def adam_update(self, param, grad_sum, exp_avg, exp_avg_sq, scale, lr, beta1, beta2,
                    eps, weight_decay, decoupled, step):  # pragma: no cover
        """PyTorch Adam on g = grad_sum * scale (flat arrays); zero grad_sum."""
        raise NotImplementedError

    def gather_rows(self, X, index, out):  # pragma: no cover
        """out[i] = X[index[i]]."""
        raise NotImplementedError

    # --- composed passes ---------------------------------------------------------------
    def forward(self, layers, X, Z, A):
        """Run every layer; return the last activation (a view into A)."""
        inp = X
        for layer, z, a in zip(layers, Z, A):
            self.dense_forward(inp, layer.W, layer.b, z, a, layer.activation_code)
            inp = a
        return inp

    def accumulate_gradients(self, layers, X, T, labels, loss, ws, m):
        """One iteration on a batch of ``m`` rows: forward, loss, backward.

        Adds the per-sample gradients' sums to each layer's ``dW``/``db`` and returns
        the summed loss (the caller divides by ``m`` and counts the samples)."""
        Z, A, G = ws.rows(m)
        self.forward(layers, X, Z, A)
        last = layers[-1]
        total = self.loss_gradient(Z[-1], A[-1], T, labels, G[-1], loss, last.activation_code)
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            inp = X if i == 0 else A[i - 1]
            self.dense_backward_params(inp, G[i], layer.dW, layer.db)
            if i > 0:
                self.dense_backward_input(G[i], layer.W, A[i - 1], G[i - 1],
                                          layers[i - 1].activation_code)
        return total


__all__ = ["Backend", "Workspace", "IDENTITY", "SOFTMAX"]
