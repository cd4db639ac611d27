"""scikit-learn estimators on top of nnfast: :class:`NNClassifier` and :class:`NNRegressor`.

scikit-learn is an optional extra (``pip install "nnfast[sklearn]"``); it is imported by
this module only, never by ``import nnfast``. Both estimators follow scikit-learn's
conventions (``get_params``/``set_params``, ``clone``, ``Pipeline``, ``GridSearchCV``,
pickling) and pass ``sklearn.utils.estimator_checks.check_estimator``.

Training is one call to :meth:`nnfast.Sequential.fit`, so it runs on the compiled fast
path; the fitted network is ``model_`` (an ordinary :class:`nnfast.Sequential`: save it
with ``nnfast.save``), its History ``history_``.
"""
from __future__ import annotations

import numbers

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets, type_of_target
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('nnfast.sklearn needs scikit-learn >= 1.6: pip install "nnfast[sklearn]" '
                      f"(or pip install scikit-learn) ({exc})") from None

from .callbacks import EarlyStopping
from .layers import Dense
from .model import Sequential
from .optim import SGD, Adam
from ._validation import check_bool

__all__ = ["NNClassifier", "NNRegressor"]

_SOLVERS = ("sgd", "adam")
_HIDDEN_ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")
_AUTO_BATCH = 200   # scikit-learn's MLP: batch_size="auto" is min(200, n_samples)


def _is_auto(value) -> bool:
    return isinstance(value, str) and value == "auto"


class _NNBase(BaseEstimator):
    """Shared parameters, validation, training and pickling of the two estimators."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", solver="adam",
                 batch_size=32, epochs=200, learning_rate=1e-3, momentum=0.9, nesterov=False,
                 weight_decay=0.0, accumulate=1, dtype="float32", backend="cython",
                 random_state=None, shuffle=True, verbose=0, early_stopping=False,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.batch_size = batch_size
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.accumulate = accumulate
        self.dtype = dtype
        self.backend = backend
        self.random_state = random_state
        self.shuffle = shuffle
        self.verbose = verbose
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol

    # --- parameters --------------------------------------------------------------------
    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
            sizes = (sizes,)
        try:
            sizes = tuple(sizes)
        except TypeError:
            raise TypeError("hidden_layer_sizes must be an int or a sequence of ints, got "
                            f"{self.hidden_layer_sizes!r}") from None
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
                raise ValueError("hidden_layer_sizes must hold positive ints, got "
                                 f"{self.hidden_layer_sizes!r}")
        return tuple(int(s) for s in sizes)

    def _check_params(self):
        if self.activation not in _HIDDEN_ACTIVATIONS:
            raise ValueError(f"activation must be one of {_HIDDEN_ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        bs = self.batch_size
        if not (bs is None or _is_auto(bs) or (isinstance(bs, numbers.Integral)
                                              and not isinstance(bs, bool) and bs >= 1)):
            raise ValueError(f"batch_size must be a positive int, 'auto' or None, got {bs!r}")
        check_bool(self.early_stopping, "early_stopping")
        if self.early_stopping:
            vf = self.validation_fraction
            if isinstance(vf, bool) or not isinstance(vf, numbers.Real) or not 0 < vf < 1:
                raise ValueError(f"validation_fraction must be in (0, 1), got {vf!r}")
        if self.tol is not None:
            if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) \
                    or not self.tol >= 0:
                raise ValueError(f"tol must be a number >= 0 or None, got {self.tol!r}")
            n = self.n_iter_no_change
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ValueError(f"n_iter_no_change must be a positive int, got {n!r}")

    def _batch_size(self, n):
        if self.batch_size is None:
            return None
        if _is_auto(self.batch_size):
            return min(_AUTO_BATCH, n)
        return int(self.batch_size)

    def _optimizer(self):
        if self.solver == "adam":
            return Adam(lr=self.learning_rate, weight_decay=self.weight_decay)
        return SGD(lr=self.learning_rate, momentum=self.momentum, nesterov=self.nesterov,
                   weight_decay=self.weight_decay)

    # --- training ------------------------------------------------------------------------
    def _fit_network(self, X, T, n_out, out_activation, loss, stratify=None):
        """Build ``model_`` and train it on validated ``X`` and prepared targets ``T``."""
        self._check_params()
        rng = check_random_state(self.random_state)
        model_seed, fit_seed = (int(s) for s in rng.randint(0, 2**31 - 1, size=2))
        sizes = (X.shape[1],) + self._hidden_sizes() + (n_out,)
        layers = [Dense(sizes[i], sizes[i + 1],
                        activation=self.activation if i < len(sizes) - 2 else out_activation)
                  for i in range(len(sizes) - 1)]
        model = Sequential(*layers, dtype=self.dtype, seed=model_seed, backend=self.backend)

        validation = None
        callbacks = []
        if self.early_stopping:
            X, T, validation = self._split(X, T, rng, stratify)
            if validation is not None:
                callbacks.append(EarlyStopping(
                    "val_loss", patience=self.n_iter_no_change,
                    min_delta=self.tol if self.tol is not None else 0.0,
                    restore_best_weights=True))
        if not callbacks and self.tol is not None:
            callbacks.append(EarlyStopping("loss", patience=self.n_iter_no_change,
                                           min_delta=self.tol))
        self.history_ = model.fit(
            X, T, loss=loss, optimizer=self._optimizer(), epochs=self.epochs,
            batch_size=self._batch_size(X.shape[0]), accumulate=self.accumulate,
            shuffle=check_bool(self.shuffle, "shuffle"), seed=fit_seed, validation_data=validation,
            callbacks=callbacks, verbose=self.verbose)
        self.model_ = model
        self.n_iter_ = self.history_.epochs
        self.loss_curve_ = list(self.history_.history["loss"])
        if validation is not None:
            self.validation_loss_curve_ = list(self.history_.history["val_loss"])
        elif hasattr(self, "validation_loss_curve_"):      # left from an earlier fit
            del self.validation_loss_curve_
        return self

    def _split(self, X, T, rng, stratify):
        """Hold out ``validation_fraction`` of the rows (shuffled, stratified by class for
        classifiers when every class has two rows). None when too few rows."""
        n = X.shape[0]
        n_val = int(np.ceil(self.validation_fraction * n))
        if n < 2 or n_val >= n:
            return X, T, None
        from sklearn.model_selection import train_test_split
        idx = np.arange(n)
        seed = int(rng.randint(0, 2**31 - 1))
        try:
            tr, va = train_test_split(idx, test_size=n_val, random_state=seed,
                                      stratify=stratify)
        except ValueError:   # a class too small to stratify
            tr, va = train_test_split(idx, test_size=n_val, random_state=seed)
        return X[tr], T[tr], (X[va], T[va])

    def _forward(self, X):
        """The network's output for ``X``, computed in float64.

        A float32 network is evaluated with its weights upcast exactly to float64: float32
        sums rounded differently for different numbers of rows (BLAS picks kernels by
        size) would make a row's prediction depend, by an ulp or two, on the rows
        predicted with it; in float64 those differences stay around 1e-16."""
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        model = self.model_
        if model.dtype != np.float64:
            model = _rebuild(model.config(), model.get_weights(), model.loss, "float64")
        return model.predict(X)

    # --- pickling: nnfast models are stored as their config and weights ------------------
    def __getstate__(self):
        state = dict(super().__getstate__())   # a copy: never alter the live estimator
        model = state.pop("model_", None)
        if model is not None:
            state["_nnfast_model"] = (model.config(), model.get_weights(), model.loss)
        return state

    def __setstate__(self, state):
        saved = state.pop("_nnfast_model", None)
        super().__setstate__(state)
        if saved is not None:
            self.model_ = _rebuild(*saved)


def _rebuild(config, weights, loss, dtype=None):
    """A Sequential from ``Sequential.config()`` and ``get_weights()`` (in ``dtype``)."""
    layers = [Dense(l["in_features"], l["units"], activation=l["activation"])
              for l in config["layers"]]
    model = Sequential(*layers, dtype=dtype or config["dtype"], seed=0,
                       backend=config["backend"])
    model.set_weights(weights)
    model.loss = loss
    return model


class NNClassifier(ClassifierMixin, _NNBase):
    """Multilayer-perceptron classifier: nnfast's compiled MLP as a scikit-learn estimator.

    Hidden ``Dense`` layers of ``hidden_layer_sizes`` units with ``activation``, then a
    softmax layer with one unit per class (also for two classes) trained with softmax
    cross-entropy. Labels may be of any type scikit-learn accepts (ints, strings, ...):
    they are encoded like ``LabelEncoder`` does and ``classes_`` holds them sorted.

    Parameters
    ----------
    hidden_layer_sizes : int or tuple of int, default=(100,)
        Units of each hidden layer; ``()`` gives multinomial logistic regression.
    activation : {"relu", "leaky_relu", "tanh", "sigmoid", "identity"}, default="relu"
    solver : {"adam", "sgd"}, default="adam"
        ``nnfast.Adam(lr=learning_rate)`` or ``nnfast.SGD(lr=learning_rate,
        momentum=momentum, nesterov=nesterov)``; both with ``weight_decay`` (L2).
    batch_size : int, "auto" or None, default=32
        Samples per iteration; "auto" is ``min(200, n_samples)``, None full batch.
    epochs : int, default=200
        Most passes over the data (see ``tol``).
    learning_rate : float, default=1e-3
    momentum : float, default=0.9
        SGD only.
    nesterov : bool, default=False
        SGD only.
    weight_decay : float, default=0.0
    accumulate : int, default=1
        Iterations whose gradients make one step (gradient accumulation).
    dtype : {"float32", "float64"}, default="float32"
    backend : {"cython", "numpy"}, default="cython"
    random_state : int, RandomState or None
        Seeds the initial weights and the shuffling.
    shuffle : bool, default=True
    verbose : int, default=0
        Passed to ``fit`` (progress bar and per-epoch log lines).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the training rows (stratified) and stop when
        their loss has not improved by more than ``tol`` for ``n_iter_no_change`` epochs;
        the weights of the best epoch are kept.
    validation_fraction : float, default=0.1
    n_iter_no_change : int, default=10
    tol : float or None, default=1e-4
        Without early stopping: stop when the training loss has not improved by more than
        ``tol`` for ``n_iter_no_change`` epochs (as scikit-learn's MLP). None: always run
        ``epochs`` epochs.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    feature_names_in_ : ndarray of str (only when X had string column names)
    model_ : nnfast.Sequential
        The trained network (predicts probabilities).
    history_ : nnfast.History
    loss_curve_ : list of float
        Training loss per epoch.
    n_iter_ : int
        Epochs run.
    """

    def fit(self, X, y):
        """Train on ``X`` (n_samples, n_features) and labels ``y`` (n_samples,)."""
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32))
        check_classification_targets(y)
        if type_of_target(y) not in ("binary", "multiclass"):
            raise ValueError("NNClassifier supports binary and multiclass targets, got "
                             f"{type_of_target(y)!r}")
        encoder = LabelEncoder()
        codes = encoder.fit_transform(y).astype(np.int64)
        self.classes_ = encoder.classes_
        return self._fit_network(X, codes, len(self.classes_), "softmax", "cross_entropy",
                                 stratify=codes)

    def predict_proba(self, X):
        """Class probabilities, shape (n_samples, n_classes), columns in ``classes_`` order."""
        proba = self._forward(X)
        proba /= proba.sum(axis=1, keepdims=True)   # exact row sums after the float64 cast
        return proba

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba` (``-inf`` where a probability underflowed)."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X):
        """The most probable class of each row (a value of ``classes_``)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


class NNRegressor(RegressorMixin, _NNBase):
    """Multilayer-perceptron regressor: nnfast's compiled MLP as a scikit-learn estimator.

    Hidden layers as in :class:`NNClassifier`, then an identity output layer with one
    unit per target, trained with nnfast's ``"mse"`` loss (``1/2 ||f(x) - y||^2`` averaged
    over samples, scikit-learn's MLP loss). ``y`` may be 1-D or 2-D; ``predict`` returns the
    same number of dimensions as the ``y`` given to ``fit``. ``score`` is R².

    Parameters are those of :class:`NNClassifier` (``early_stopping`` holds out a random
    ``validation_fraction``). Targets are used as given: standardize them (e.g. with
    ``sklearn.compose.TransformedTargetRegressor``) when they are far from unit scale.

    Attributes
    ----------
    n_features_in_ : int
    n_outputs_ : int
    model_ : nnfast.Sequential
    history_ : nnfast.History
    loss_curve_ : list of float
    n_iter_ : int
    """

    def fit(self, X, y):
        """Train on ``X`` (n_samples, n_features) and targets ``y`` (n_samples,) or
        (n_samples, n_outputs)."""
        X, y = validate_data(self, X, y, dtype=(np.float64, np.float32), multi_output=True,
                             y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self._y_ndim = y.ndim
        T = y.reshape(y.shape[0], -1)
        self.n_outputs_ = T.shape[1]
        return self._fit_network(X, T, self.n_outputs_, "identity", "mse")

    def predict(self, X):
        """Predictions, shape (n_samples,) or (n_samples, n_outputs) like ``y`` in fit."""
        out = self._forward(X)
        return out.ravel() if self._y_ndim == 1 else out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags
