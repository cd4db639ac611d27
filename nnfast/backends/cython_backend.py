"""The compiled backend: each operation is one call into the kernels
(:mod:`nnfast._kernels`, or its AVX2 build; :mod:`nnfast._compiled` picks), and a whole
iteration (or a run of iterations of an epoch) is one ``nogil`` call through a
``NetworkPlan`` holding pointers to the model's buffers."""
import numpy as np

from .. import _compiled, _threads
from .base import Backend

_kernels = _compiled.kernels


def _missing_kernels_message() -> str:
    import os
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    msg = ("nnfast's compiled kernels are not built (install with `pip install .`); "
           "use backend='numpy' meanwhile.")
    if os.path.exists(os.path.join(os.path.dirname(package), "setup.py")):
        # `python -m nnfast` run inside the checkout imports the source tree, which
        # shadows the installed package
        msg += (f" nnfast was imported from the source tree {package}, which shadows an "
                "installed copy: run from another directory or use the `nnfast` command.")
    return f"{msg} Import error: {_compiled.IMPORT_ERROR}"


class CythonBackend(Backend):
    name = "cython"

    def __init__(self):
        if _kernels is None:  # pragma: no cover
            raise ImportError(_missing_kernels_message())
        _threads.ensure_policy()

    dense_forward = staticmethod(_kernels.dense_forward) if _kernels else None
    loss_gradient = staticmethod(_kernels.loss_gradient) if _kernels else None
    dense_backward_params = staticmethod(_kernels.dense_backward_params) if _kernels else None
    dense_backward_input = staticmethod(_kernels.dense_backward_input) if _kernels else None
    sgd_update = staticmethod(_kernels.sgd_update) if _kernels else None
    adam_update = staticmethod(_kernels.adam_update) if _kernels else None
    gather_rows = staticmethod(_kernels.gather_rows) if _kernels else None

    @staticmethod
    def _plan(layers, ws):
        if ws.plan is None:
            ws.plan = _kernels.NetworkPlan(
                [l.W for l in layers], [l.b for l in layers], [l.dW for l in layers],
                [l.db for l in layers], ws.Z, ws.A, ws.G, [l.activation_code for l in layers])
        return ws.plan

    # predict and evaluate on the training step's forward kernels (_net_forward)
    def forward_rows(self, layers, X, ws):
        self._plan(layers, ws).forward_rows(X)
        return ws.rows(X.shape[0])

    def predict(self, layers, X, ws, out):
        # every chunk of rows in one nogil call
        self._plan(layers, ws).forward(X, out)
        return out

    def accumulate_gradients(self, layers, X, T, labels, loss, ws, m):
        return self._plan(layers, ws).iteration(X, T, labels, loss)

    @staticmethod
    def checks_batches(batch_size):
        # the kernels check each batch's rows of X for NaN/inf as they gather them
        return _kernels.checks_batches_cheaply(batch_size)

    def run_iterations(self, model, X, T, labels, order, batch_size, it0, it1, n_iters,
                       accumulate, loss, optimizer, group, out_loss, out_correct,
                       check_x=False):
        ws = model._workspace_for(batch_size)
        xbuf, tbuf, lbuf = ws.batch_buffers(model.n_inputs, model.n_outputs, model.dtype)
        args, state1, state2 = optimizer.kernel_args(model)
        failed, steps = self._plan(model.layers, ws).run(
            X, T, labels, order, batch_size, it0, it1, n_iters, accumulate, loss, args,
            state1, state2, xbuf, tbuf, lbuf, out_loss, out_correct, group, check_x)
        optimizer.iterations += steps
        model._grad_count = int(group[1])
        return failed, steps
