"""Optimizers: per-parameter state plus one fused update kernel call per array.

``step(model)`` divides the accumulated gradient sums by the number of samples they
hold (inside the update pass), applies the update, and clears the sums. The formulas
are PyTorch's, so runs can be compared step for step (DESIGN §2).
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Tuple

import numpy as np

from . import _memory
from ._interrupt import deferred_sigint
from ._validation import check_bool, real_number

# the most steps a loaded state may claim (the kernels take the count as a C long)
MAX_ITERATIONS = 2 ** 62


class Optimizer:
    """Base class: binds to the first model it steps and keeps state per parameter."""

    def __init__(self):
        self.iterations = 0          # steps taken
        self._state: List[Dict[str, np.ndarray]] = []
        self._model_ref = None

    def _bind(self, model) -> None:
        if self._check_fits(model):
            return
        self._model_ref = weakref.ref(model)
        if not self._state:
            self._state = [self._new_state(p) for p, _ in model._params_and_grads()]

    def _check_fits(self, model) -> bool:
        """ValueError unless this optimizer's state can serve ``model``; True when it is
        bound to it already."""
        bound = self._model_ref() if self._model_ref is not None else None
        if bound is model:
            return True
        if bound is not None:
            raise ValueError("this optimizer already holds the state of another model; "
                             "create a new optimizer for each model")
        if self._state:  # state kept from a copy or a pickle: it must fit this model
            fresh = [self._new_state(p) for p, _ in model._params_and_grads()]
            theirs = [{k: v.shape for k, v in st.items()} for st in fresh]
            mine = [{k: v.shape for k, v in st.items()} for st in self._state]
            if theirs != mine:
                raise ValueError(f"this optimizer holds state of shapes {mine}, which does "
                                 f"not fit this model (it needs {theirs}); create a new "
                                 "optimizer for it")
            dtypes = {v.dtype.name for st in self._state for v in st.values()}
            if dtypes - {model.dtype.name}:
                raise ValueError(f"this optimizer holds {', '.join(sorted(dtypes))} state, "
                                 f"which does not fit this {model.dtype.name} model; create "
                                 "a new optimizer for it")
        return False

    def _binding(self):
        """The binding and state list, for ``_restore_binding`` (fit undoes its
        ``_bind`` when X turns out to hold NaN or inf)."""
        return self._model_ref, self._state

    def _restore_binding(self, binding) -> None:
        self._model_ref, self._state = binding

    # copy and pickle: the state goes along, the binding (a weak reference) does not; the
    # first model stepped afterwards is bound, if the state fits it
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model_ref"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = [{k: _memory.on_line(v) for k, v in st.items()} for st in self._state]

    def _new_state(self, param: np.ndarray) -> Dict[str, np.ndarray]:
        return {}

    _nonnegative_state = ()   # state keys that can never be negative (load_state checks)

    def step(self, model) -> None:
        """Update ``model``'s parameters with its averaged accumulated gradient, then
        clear the gradient sums. Raises ``ValueError`` if nothing was accumulated, and
        ``RuntimeError`` inside ``fit`` (e.g. from a callback: fit takes its own steps)."""
        guard = getattr(model, "_guard", None)
        if guard is None:
            raise TypeError("optimizer.step(model): model must be an nnfast Sequential, "
                            f"got {type(model).__name__}")
        with guard:   # another thread's fit: "in use"; this thread's (a callback): below
            if guard.fitting:
                raise RuntimeError("optimizer.step(model) was called inside fit (from a "
                                   "callback?): fit takes its own steps; use the low-level "
                                   "loop (compute_gradients, optimizer.step) outside fit")
            self._step(model)

    def _step(self, model) -> None:
        """``step`` without the inside-fit check (fit's Python loop steps through here)."""
        guard = model._guard
        # one thread per model, and Ctrl-C waits until every array is updated (a step
        # is all or nothing; see nnfast._interrupt)
        with guard, deferred_sigint():
            count = model._grad_count
            if count == 0:
                raise ValueError("optimizer.step: no gradients accumulated since the last "
                                 "step (call model.compute_gradients first)")
            self._bind(model)
            self.iterations += 1
            scale = 1.0 / count
            backend = model._backend
            for state, (param, grad) in zip(self._state, model._params_and_grads()):
                self._update(backend, param.reshape(-1), grad.reshape(-1), state, scale)
            model._grad_count = 0

    def _update(self, backend, param, grad, state, scale):  # pragma: no cover - interface
        raise NotImplementedError

    def kernel_args(self, model):
        """(hyper-parameter tuple, state arrays 1, state arrays 2) for the compiled
        training loop, which then applies this optimizer's updates itself."""
        self._bind(model)
        return self._kernel_args()

    def _kernel_args(self):  # pragma: no cover - interface
        raise NotImplementedError

    # --- state for save/checkpoint -------------------------------------------------------
    def config(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def state_arrays(self) -> List[Tuple[str, np.ndarray]]:
        """(name, array) pairs of the per-parameter state, in parameter order."""
        out = []
        for i, state in enumerate(self._state):
            for key in sorted(state):
                out.append((f"{i}.{key}", state[key]))
        return out

    def load_state(self, model, iterations: int, arrays: Dict[str, np.ndarray]) -> None:
        """Restore state saved by ``state_arrays`` (shapes checked against ``model``).

        Everything is checked before anything changes: on ValueError the optimizer is
        left as it was."""
        if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
                or not 0 <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"optimizer iterations must be an int in [0, {MAX_ITERATIONS}], "
                             f"got {iterations!r}")
        fresh = [self._new_state(p) for p, _ in model._params_and_grads()]
        for i, state in enumerate(fresh):
            for key in state:
                name = f"{i}.{key}"
                if name not in arrays:
                    raise ValueError(f"optimizer state is missing {name!r}")
                arr = arrays[name]
                if arr.shape != state[key].shape:
                    raise ValueError(f"optimizer state {name!r} has shape {arr.shape}, "
                                     f"expected {state[key].shape}")
                if arr.dtype != state[key].dtype:
                    raise ValueError(f"optimizer state {name!r} has dtype {arr.dtype}, "
                                     f"expected {state[key].dtype} (the model's)")
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"optimizer state {name!r} must hold finite numbers")
                if key in self._nonnegative_state and np.any(arr < 0):
                    raise ValueError(f"optimizer state {name!r} must be >= 0 (a running "
                                     "mean of squares)")
                state[key][...] = arr
        self._model_ref = None
        self._state = fresh
        self._bind(model)
        self.iterations = int(iterations)


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's momentum/Nesterov/weight-decay rules.

    ``g <- g + weight_decay * theta``; with momentum ``v <- momentum * v + g`` (v starts at
    zero) and ``g <- g + momentum * v`` (Nesterov) or ``g <- v``; ``theta <- theta - lr * g``.
    """

    def __init__(self, lr: float = 0.01, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__()
        self.lr = real_number(lr, "lr", low=0)
        self.momentum = real_number(momentum, "momentum", low=0, high=1, high_open=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)
        self.weight_decay = real_number(weight_decay, "weight_decay", low=0)

    def _new_state(self, param):
        return ({"velocity": _memory.zeros(param.size, param.dtype)} if self.momentum
                else {})

    def _update(self, backend, param, grad, state, scale):
        velocity = state.get("velocity", param)
        backend.sgd_update(param, grad, velocity, scale, self.lr, self.momentum,
                           self.nesterov, self.weight_decay)

    def _kernel_args(self):
        args = (1, self.lr, self.momentum, self.nesterov, self.weight_decay, 0.0, 0.0, 0.0,
                False, self.iterations)
        return args, [st["velocity"] for st in self._state if "velocity" in st], []

    def config(self) -> dict:
        return {"name": "SGD", "lr": self.lr, "momentum": self.momentum,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    def __repr__(self):
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")


class Adam(Optimizer):
    """Adam with PyTorch's bias-corrected formulas.

    ``weight_decay`` is L2 added to the gradient; with ``decoupled_weight_decay=True`` it
    is AdamW's decay ``theta <- theta * (1 - lr * weight_decay)`` instead.
    """

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False):
        super().__init__()
        self.lr = real_number(lr, "lr", low=0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (real_number(betas[0], "betas[0]", low=0, high=1, high_open=True),
                      real_number(betas[1], "betas[1]", low=0, high=1, high_open=True))
        self.eps = real_number(eps, "eps", low=0, low_open=True)
        self.weight_decay = real_number(weight_decay, "weight_decay", low=0)
        self.decoupled_weight_decay = check_bool(decoupled_weight_decay,
                                                 "decoupled_weight_decay")

    _nonnegative_state = ("exp_avg_sq",)

    def _new_state(self, param):
        return {"exp_avg": _memory.zeros(param.size, param.dtype),
                "exp_avg_sq": _memory.zeros(param.size, param.dtype)}

    def _update(self, backend, param, grad, state, scale):
        backend.adam_update(param, grad, state["exp_avg"], state["exp_avg_sq"], scale, self.lr,
                            self.betas[0], self.betas[1], self.eps, self.weight_decay,
                            self.decoupled_weight_decay, self.iterations)

    def _kernel_args(self):
        args = (2, self.lr, 0.0, False, self.weight_decay, self.betas[0], self.betas[1],
                self.eps, self.decoupled_weight_decay, self.iterations)
        return (args, [st["exp_avg"] for st in self._state],
                [st["exp_avg_sq"] for st in self._state])

    def config(self) -> dict:
        return {"name": "Adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay,
                "decoupled_weight_decay": self.decoupled_weight_decay}

    def __repr__(self):
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, "
                f"decoupled_weight_decay={self.decoupled_weight_decay})")


def optimizer_from_config(config: dict) -> Optimizer:
    kwargs = dict(config)
    name = kwargs.pop("name", None)
    if name == "SGD":
        return SGD(**kwargs)
    if name == "Adam":
        kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.999)))
        return Adam(**kwargs)
    raise ValueError(f"unknown optimizer {name!r}")


def get_optimizer(optimizer) -> Optimizer:
    """An Optimizer instance, or the name 'sgd'/'adam' with default settings."""
    if optimizer is None:
        return SGD(lr=0.01)
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key == "sgd":
            return SGD(lr=0.01)
        if key == "adam":
            return Adam()
        raise ValueError(f"optimizer must be 'sgd', 'adam' or an Optimizer, got {optimizer!r}")
    raise TypeError(f"optimizer must be an nnfast Optimizer, got {type(optimizer).__name__}")
