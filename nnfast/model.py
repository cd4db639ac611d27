"""Sequential: a stack of Dense layers, its forward pass, gradients and weights.

One training iteration, top to bottom::

    Sequential.compute_gradients(X, y, loss)      validate, pick the workspace
      -> Backend.accumulate_gradients(...)       forward, loss, backward
           -> _kernels.dense_forward / loss_gradient / dense_backward_*  (nogil)
    optimizer.step(model)                          average, update, clear
      -> _kernels.sgd_update / adam_update        (nogil)
"""
from __future__ import annotations

import _thread
import functools
import weakref
from typing import List, Optional, Sequence

import numpy as np

from . import _memory
from . import losses as _losses
from ._validation import as_array, as_matrix, cast_finite, check_dtype, check_seed
from .backends import Workspace, get_backend
from .backends.base import count_correct
from .layers import SOFTMAX, Dense

# Rows per chunk in predict/evaluate, so a large X never makes a giant temporary.
_CHUNK_ELEMS = 1 << 20

# layer -> the models it belongs to (a WeakSet: more than one after copy.copy(model),
# which shares the layers). A new model built from the same Dense would initialise its
# arrays afresh while the models holding it, and their compiled plans, still used the
# old ones: refused while any of them lives.
_LAYER_OWNERS = weakref.WeakKeyDictionary()


def _has_owner(layer) -> bool:
    return len(_LAYER_OWNERS.get(layer, ())) > 0


def _add_owner(layer, model) -> None:
    _LAYER_OWNERS.setdefault(layer, weakref.WeakSet()).add(model)


def _refuse_inside_fit(model, call: str) -> None:
    """``call`` changes the gradient sums (or the weights through them) that ``fit`` is
    accumulating for its current step: refused from a callback inside ``fit``."""
    if model._guard.fitting:
        raise RuntimeError(f"{call} was called inside fit (from a callback?): it would change "
                           "the gradient sums of the step fit is accumulating; use the "
                           "low-level loop (compute_gradients, optimizer.step) outside fit")


_IN_USE = ("this model is in use by another thread (fit, predict, evaluate, "
           "compute_gradients, an optimizer step or a weights call is running on it); use "
           "one model per thread or serialise the calls")


class _ModelGuard:
    """One thread at a time per model: the parameters, gradient sums and workspace buffers
    are shared by every call. Re-entrant for the owning thread (a callback may call
    ``predict`` inside ``fit``); another thread gets a RuntimeError instead of waiting or
    silently corrupting the buffers."""

    __slots__ = ("_lock", "fitting")

    def __init__(self):
        self._lock = _thread.RLock()
        self.fitting = False   # inside fit (training.py refuses a nested fit)

    def __enter__(self):
        if not self._lock.acquire(False):
            raise RuntimeError(_IN_USE)
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


def _exclusive(method):
    """Run ``method`` holding the model's guard (see :class:`_ModelGuard`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        lock = self._guard._lock
        if not lock.acquire(False):
            raise RuntimeError(_IN_USE)
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()
    return wrapper


class Sequential:
    """A multilayer perceptron: ``Dense`` layers applied in order.

    Parameters
    ----------
    *layers : Dense
        The layers; each one's ``in_features`` must equal the previous one's ``units``.
        ``softmax`` is allowed on the last layer only.
    dtype : {"float32", "float64"}
        Precision of parameters and computation.
    seed : int or None
        Seed of ``numpy.random.default_rng`` for the initial weights (Glorot/He uniform).
        The same seed gives the same network on either backend.
    backend : {"cython", "numpy"}
        Compiled kernels (default) or the NumPy reference.

    Notes
    -----
    Different models may be used from different threads at the same time (the kernels
    release the GIL). One model is used by one thread at a time: ``fit``, ``predict``,
    ``evaluate``, ``compute_gradients``, ``gradients``, ``zero_grad``, ``get_weights``,
    ``set_weights`` and ``optimizer.step(model)`` raise ``RuntimeError`` while another
    thread is inside one of them on the same model.
    """

    def __init__(self, *layers: Dense, dtype="float32", seed: Optional[int] = None,
                 backend: str = "cython"):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential needs at least one Dense layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"layers[{i}] must be nnfast.Dense, got {type(layer).__name__}")
            if i > 0 and layer.in_features != layers[i - 1].units:
                raise ValueError(f"layers[{i}] expects {layer.in_features} inputs but "
                                 f"layers[{i - 1}] has {layers[i - 1].units} units")
            if layer.activation_code == SOFTMAX and i != len(layers) - 1:
                raise ValueError(f"softmax is allowed on the last layer only (layers[{i}])")
        if len(set(map(id, layers))) != len(layers):
            raise ValueError("the same Dense instance appears twice in layers")
        for i, layer in enumerate(layers):
            if _has_owner(layer):
                raise ValueError(f"layers[{i}] already belongs to another model; layers "
                                 "cannot be shared between models: create new Dense layers "
                                 "(copy.deepcopy(model) copies a whole model)")
        seed = check_seed(seed)
        self.layers: List[Dense] = list(layers)
        self.dtype = check_dtype(dtype)
        self.seed = seed
        self._backend = get_backend(backend)
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.build(rng, self.dtype)
            _add_owner(layer, self)
        self._grad_count = 0
        self._workspace: Optional[Workspace] = None
        self._restart_copies = None       # fit's copies of the parameters (training.py)
        self._guard = _ModelGuard()
        self.loss: Optional[str] = None   # loss of the last fit / compute_gradients
        self.history = None               # History of the latest fit (updated as it runs)

    def __getstate__(self):
        # copy/pickle: the lock, the workspace (raw-pointer plan) and fit's scratch copies
        # are per instance
        state = dict(self.__dict__)
        state["_guard"] = None
        state["_workspace"] = None
        state["_restart_copies"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        # pickle's arrays start off a cache line; a shallow copy shares the layers (and
        # their aligned arrays, which must stay: a live plan points at them)
        for layer in self.layers:
            for name in ("W", "b", "dW", "db"):
                setattr(layer, name, _memory.on_line(getattr(layer, name)))
        # a shallow copy shares the layers' arrays, so it shares the guard too: one thread
        # and one fit at a time across all of them
        sharing = [m for layer in self.layers for m in _LAYER_OWNERS.get(layer, ())]
        self._guard = sharing[0]._guard if sharing else _ModelGuard()
        for layer in self.layers:
            _add_owner(layer, self)   # a copy's own layers, or a shallow copy's shared ones

    # --- description -------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def n_inputs(self) -> int:
        return self.layers[0].in_features

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].units

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers)

    def __repr__(self) -> str:
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential({inner}, dtype={self.dtype.name!r}, backend={self.backend!r})"

    # --- workspaces ----------------------------------------------------------------------
    def _workspace_for(self, m: int) -> Workspace:
        """Buffers for at least ``m`` rows, allocated once and grown only when needed."""
        ws = self._workspace
        if ws is None or ws.capacity < m:
            ws = self._workspace = Workspace(self.layers, m, self.dtype)
        return ws

    def _check_loss(self, loss) -> str:
        if loss is None:
            if self.loss is None:
                raise ValueError("loss is required: this model has not been fitted yet")
            return self.loss
        name = _losses.check_loss_name(loss)
        last = self.layers[-1]
        _losses.check_loss_fits(name, last.activation_code, last.activation)
        return name

    # --- inference -----------------------------------------------------------------------
    def _chunk_rows(self) -> int:
        widest = max(max(layer.units for layer in self.layers), self.n_inputs)
        return max(1, _CHUNK_ELEMS // widest)

    def _inference_workspace(self, n: int) -> Workspace:
        """The workspace predict and evaluate take ``n`` rows through, in chunks of its
        capacity: the training one when there is one, else one of at most _CHUNK_ELEMS
        values a layer."""
        ws = self._workspace
        if ws is None or ws.capacity < n:
            ws = self._workspace_for(min(n, self._chunk_rows()))
        return ws

    @_exclusive
    def predict(self, X) -> np.ndarray:
        """The last layer's activation for every row of ``X`` (probabilities for softmax
        and sigmoid), computed in chunks of rows. Returns a new (N, outputs) array."""
        X = as_matrix(X, "X", self.dtype, self.n_inputs)
        n = X.shape[0]
        out = np.empty((n, self.n_outputs), dtype=self.dtype)
        return self._backend.predict(self.layers, X, self._inference_workspace(n), out)

    @_exclusive
    def evaluate(self, X, y, loss: Optional[str] = None) -> dict:
        """Loss of the whole set at the current weights (sample mean), plus ``accuracy``
        for classification losses (argmax for cross-entropy, 0.5 threshold for binary).

        ``loss=None`` means the loss of the last ``fit``."""
        name = self._check_loss(loss)
        X = as_matrix(X, "X", self.dtype, self.n_inputs)
        code, T, labels = _losses.prepare_targets(name, y, X.shape[0], self.n_outputs,
                                                  self.dtype)
        return self._evaluate_prepared(X, code, T, labels, name)

    def _evaluate_prepared(self, X, code, T, labels, name) -> dict:
        n = X.shape[0]
        ws = self._inference_workspace(n)
        step = ws.capacity
        total = 0.0
        correct = 0
        last_act = self.layers[-1].activation_code
        # a loss past the float range is the result (inf or NaN), on either backend
        # without NumPy's RuntimeWarnings
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for start in range(0, n, step):
                stop = min(n, start + step)
                Z, A, G = self._backend.forward_rows(self.layers, X[start:stop], ws)
                out = A[-1]
                Tc = T[start:stop] if T.shape[0] else T
                lc = labels[start:stop] if labels.shape[0] else labels
                total += self._backend.loss_gradient(Z[-1], out, Tc, lc, G[-1], code,
                                                     last_act)
                if _losses.is_classification(name):
                    correct += count_correct(out, Tc, lc, code)
        result = {"loss": total / n}
        if _losses.is_classification(name):
            per_row = n if code != _losses.BINARY_CROSS_ENTROPY else n * self.n_outputs
            result["accuracy"] = correct / per_row
        return result

    # --- gradients (the low-level loop) --------------------------------------------------
    @_exclusive
    def compute_gradients(self, X, y, loss: str) -> float:
        """Forward + loss + backward on one batch; add the per-sample gradient sums.

        The buffers hold ``sum_i grad L_i`` and the number of samples seen, so several
        calls accumulate exactly (a short batch counts by its size). Returns the batch's
        mean loss. Follow with ``optimizer.step(model)``. Refused (RuntimeError) inside
        ``fit``, e.g. from a callback."""
        _refuse_inside_fit(self, "compute_gradients")
        name = self._check_loss(loss)
        X = as_matrix(X, "X", self.dtype, self.n_inputs)
        code, T, labels = _losses.prepare_targets(name, y, X.shape[0], self.n_outputs,
                                                  self.dtype)
        self.loss = name
        m = X.shape[0]
        return self._accumulate(X, T, labels, code, m) / m

    def _accumulate(self, X, T, labels, code, m) -> float:
        """Validated inputs of ``m`` rows: one iteration, returns the summed loss."""
        ws = self._workspace_for(m)
        total = self._backend.accumulate_gradients(self.layers, X, T, labels, code, ws, m)
        self._grad_count += m
        return total

    @property
    def accumulated_samples(self) -> int:
        """Samples whose gradients are summed in the buffers since the last step."""
        return self._grad_count

    @_exclusive
    def gradients(self) -> List[np.ndarray]:
        """The averaged gradients (sum / samples), laid out like ``get_weights()``."""
        if self._grad_count == 0:
            raise ValueError("no gradients accumulated: call compute_gradients first")
        scale = 1.0 / self._grad_count
        out = []
        for layer in self.layers:
            out.append(layer.dW * scale)
            out.append(layer.db * scale)
        return out

    @_exclusive
    def zero_grad(self) -> None:
        """Clear the gradient sums and the sample count. Refused (RuntimeError) inside
        ``fit``, e.g. from a callback."""
        _refuse_inside_fit(self, "zero_grad")
        self._zero_grad()

    def _zero_grad(self) -> None:
        for layer in self.layers:
            layer.dW.fill(0)
            layer.db.fill(0)
        self._grad_count = 0

    def _params_and_grads(self):
        for layer in self.layers:
            yield layer.W, layer.dW
            yield layer.b, layer.db

    # --- weights ---------------------------------------------------------------------------
    @_exclusive
    def get_weights(self) -> List[np.ndarray]:
        """Copies ``[W1 (in, out), b1 (out,), W2, b2, ...]``."""
        out = []
        for layer in self.layers:
            out.append(layer.W.copy())
            out.append(layer.b.copy())
        return out

    @_exclusive
    def set_weights(self, weights: Sequence[np.ndarray]) -> None:
        """Replace all parameters (copied in, cast to the model dtype), checked first."""
        if isinstance(weights, np.ndarray) or not isinstance(weights, (list, tuple)):
            raise TypeError("weights must be a list [W1, b1, W2, b2, ...] of arrays")
        expected = 2 * len(self.layers)
        if len(weights) != expected:
            raise ValueError(f"weights must hold {expected} arrays (W and b per layer), "
                             f"got {len(weights)}")
        checked = []
        for i, (layer, w) in enumerate(zip([l for l in self.layers for _ in (0, 1)], weights)):
            is_w = i % 2 == 0
            shape = layer.W.shape if is_w else layer.b.shape
            name = f"weights[{i}] ({'W' if is_w else 'b'} of layer {i // 2})"
            arr = as_array(w, name)
            if arr.dtype == object or arr.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
            if arr.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
            arr = cast_finite(arr, self.dtype, name)
            checked.append(np.array(arr, copy=True) if arr is w else arr)
        for i, layer in enumerate(self.layers):
            layer.W[...] = checked[2 * i]
            layer.b[...] = checked[2 * i + 1]

    # --- training and files ----------------------------------------------------------------
    def fit(self, X, y, loss: Optional[str] = None, optimizer=None, epochs: int = 1,
            batch_size: Optional[int] = 32, accumulate: int = 1, shuffle: bool = True,
            seed: Optional[int] = None, drop_last: bool = False, validation_data=None,
            callbacks=(), verbose: int = 0, validation_split: float = 0.0,
            checkpoint=None, checkpoint_every: Optional[int] = None, resume: bool = False):
        """Train; see :func:`nnfast.training.fit` for every argument. Returns a History."""
        from .training import fit
        return fit(self, X, y, loss=loss, optimizer=optimizer, epochs=epochs,
                   batch_size=batch_size, accumulate=accumulate, shuffle=shuffle, seed=seed,
                   drop_last=drop_last, validation_data=validation_data, callbacks=callbacks,
                   verbose=verbose, validation_split=validation_split, checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, resume=resume)

    def save(self, path, optimizer=None) -> None:
        """Write the model (and optionally ``optimizer``'s state) atomically to ``path``."""
        from .io import save
        save(self, path, optimizer=optimizer)

    def config(self) -> dict:
        return {"layers": [layer.config() for layer in self.layers],
                "dtype": self.dtype.name, "backend": self.backend}

