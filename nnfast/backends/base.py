"""The backend interface and the training step composed from its operations.

A backend provides seven operations on preallocated, C-contiguous arrays (the
``Ops`` of the engine). :class:`Backend` composes them into a forward pass and one
gradient-accumulating iteration; a backend may override those two with a fused
version (the Cython backend runs them in fewer, larger compiled calls).

Activation and loss codes are the integers defined in :mod:`nnfast.layers` and
:mod:`nnfast.losses`.
"""
import numpy as np

from .. import _memory
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
            z = _memory.empty((capacity, layer.units), dtype)
            keep_z = i == last and layer.activation_code != IDENTITY
            a = _memory.empty(z.shape, dtype) if keep_z else z
            self.Z.append(z)
            self.A.append(a)
            self.G.append(_memory.empty(z.shape, dtype))
        self.x_batch = None   # gathered input rows (fit's shuffled batches)
        self.t_batch = None   # gathered target rows
        self.l_batch = None   # gathered integer labels
        self.plan = None      # backend-specific handle on these buffers (compiled backend)

    def batch_buffers(self, n_inputs, n_outputs, dtype):
        """The gather buffers for shuffled batches, allocated on first use."""
        if self.x_batch is None:
            self.x_batch = _memory.empty((self.capacity, n_inputs), dtype)
            self.t_batch = _memory.empty((self.capacity, n_outputs), dtype)
            self.l_batch = _memory.empty(self.capacity, np.int64)
        return self.x_batch, self.t_batch, self.l_batch

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

    def forward_rows(self, layers, X, ws):
        """The forward pass of X's rows (at most ``ws.capacity``) into ``ws``; returns
        ``ws.rows(len(X))``, whose Z[-1] and A[-1] are the output layer's."""
        Z, A, G = ws.rows(X.shape[0])
        self.forward(layers, X, Z, A)
        return Z, A, G

    def predict(self, layers, X, ws, out):
        """out = the last activation of every row of X, through ``ws`` in chunks of its
        capacity; returns out."""
        n = X.shape[0]
        for start in range(0, n, ws.capacity):
            stop = min(n, start + ws.capacity)
            _, A, _ = self.forward_rows(layers, X[start:stop], ws)
            out[start:stop] = A[-1]
        return out

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


    @staticmethod
    def checks_batches(batch_size: int) -> bool:
        """Whether ``run_iterations``' ``check_x`` costs about nothing on batches of
        ``batch_size`` rows: ``fit`` then leaves X's NaN/inf check to its first epoch
        instead of reading all of X once more before it."""
        return False

    def run_iterations(self, model, X, T, labels, order, batch_size, it0, it1, n_iters,
                       accumulate, loss, optimizer, group, out_loss, out_correct,
                       check_x=False):
        """Iterations ``it0..it1-1`` of one epoch of ``fit``.

        Batch ``it`` is rows ``order[it*bs:(it+1)*bs]`` of X/T/labels (consecutive rows
        when ``order`` is empty). ``group`` = [micro-batches, samples] of the open
        accumulation group, updated in place; a step is taken when it reaches
        ``accumulate`` micro-batches and at the epoch's last iteration. Writes each
        iteration's summed loss and correct count; returns (index of the iteration whose
        loss was not finite, or -1; steps taken). With ``check_x``, a batch whose rows of
        X hold NaN or inf is not used: the run stops there as at a non-finite loss (the
        loss written is NaN)."""
        # overflow is reported the compiled kernels' way, as a non-finite loss or weights
        # (DivergenceError), not also as NumPy's RuntimeWarnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._run_iterations(model, X, T, labels, order, batch_size, it0, it1,
                                        n_iters, accumulate, loss, optimizer, group,
                                        out_loss, out_correct, check_x)

    def _run_iterations(self, model, X, T, labels, order, batch_size, it0, it1, n_iters,
                        accumulate, loss, optimizer, group, out_loss, out_correct, check_x):
        ws = model._workspace_for(batch_size)
        xbuf, tbuf, lbuf = ws.batch_buffers(model.n_inputs, model.n_outputs, model.dtype)
        n = X.shape[0]
        steps = 0
        for it in range(it0, it1):
            start = it * batch_size
            stop = min(n, start + batch_size)
            m = stop - start
            if order.shape[0]:
                idx = order[start:stop]
                xb = xbuf[:m]
                self.gather_rows(X, idx, xb)
                tb, lb = T, labels
                if T.shape[0]:
                    tb = tbuf[:m]
                    self.gather_rows(T, idx, tb)
                if labels.shape[0]:
                    lb = lbuf[:m]
                    np.take(labels, idx, out=lb)
            else:
                xb = X[start:stop]
                tb = T[start:stop] if T.shape[0] else T
                lb = labels[start:stop] if labels.shape[0] else labels
            if check_x and not np.isfinite(xb).all():
                out_loss[it - it0] = np.nan
                return it, steps
            total = model._accumulate(xb, tb, lb, loss, m)
            out_loss[it - it0] = total
            out_correct[it - it0] = count_correct(model._workspace.A[-1][:m], tb, lb, loss)
            if not np.isfinite(total):
                return it, steps
            group[0] += 1
            group[1] += m
            if group[0] == accumulate or it == n_iters - 1:
                optimizer._step(model)
                group[:] = 0
                steps += 1
        return -1, steps


def count_correct(out, T, labels, loss) -> int:
    """Rows classified right (argmax), or outputs on the right side of 0.5 (binary)."""
    from ..losses import BINARY_CROSS_ENTROPY, CROSS_ENTROPY, CROSS_ENTROPY_PROBS
    if loss == CROSS_ENTROPY:
        return int(np.count_nonzero(out.argmax(axis=1) == labels))
    if loss == CROSS_ENTROPY_PROBS:
        return int(np.count_nonzero(out.argmax(axis=1) == T.argmax(axis=1)))
    if loss == BINARY_CROSS_ENTROPY:
        return int(np.count_nonzero((out > 0.5) == (T > 0.5)))
    return 0


__all__ = ["Backend", "Workspace", "count_correct"]
