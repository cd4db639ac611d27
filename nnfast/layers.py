"""Dense layers and the activation registry.

A layer owns its parameters (``W`` of shape (in, out), ``b`` of shape (out,)) and the
buffers that accumulate gradient **sums** (``dW``, ``db``). It holds no loops over
numbers: the backend does the math.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import _memory
from ._validation import positive_int as _positive_int

# Activation codes, shared with the kernels (nnfast/_kernels.pyx: enum Activation).
IDENTITY, RELU, LEAKY_RELU, TANH, SIGMOID, SOFTMAX = range(6)
LEAKY_SLOPE = 0.01  # PyTorch's default negative slope
_INIT_BLOCK = 1 << 20  # values of W drawn at a time by build (8 MB of float64)

ACTIVATIONS = {
    "identity": IDENTITY,
    "linear": IDENTITY,
    "relu": RELU,
    "leaky_relu": LEAKY_RELU,
    "tanh": TANH,
    "sigmoid": SIGMOID,
    "softmax": SOFTMAX,
}
ACTIVATION_NAMES = {IDENTITY: "identity", RELU: "relu", LEAKY_RELU: "leaky_relu",
                    TANH: "tanh", SIGMOID: "sigmoid", SOFTMAX: "softmax"}
RELU_FAMILY = (RELU, LEAKY_RELU)


class Dense:
    """Fully connected layer ``A = activation(X @ W + b)``.

    Parameters
    ----------
    in_features : int
        Width of the input.
    units : int
        Width of the output.
    activation : str or None
        One of ``"identity"``/``"linear"`` (also ``None``), ``"relu"``,
        ``"leaky_relu"`` (slope 0.01), ``"tanh"``, ``"sigmoid"``, ``"softmax"``
        (last layer only).
    """

    def __init__(self, in_features: int, units: int, activation: Optional[str] = None):
        self.in_features = _positive_int(in_features, "in_features")
        self.units = _positive_int(units, "units")
        if activation is None:
            activation = "identity"
        if not isinstance(activation, str):
            raise TypeError(f"activation must be a string, got {type(activation).__name__}")
        key = activation.lower()
        if key not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = ACTIVATION_NAMES[ACTIVATIONS[key]]
        self.activation_code = ACTIVATIONS[key]
        self.W = self.b = self.dW = self.db = None

    def init_limit(self) -> float:
        """He-uniform after ReLU-family activations, Glorot-uniform otherwise."""
        if self.activation_code in RELU_FAMILY:
            return math.sqrt(6.0 / self.in_features)
        return math.sqrt(6.0 / (self.in_features + self.units))

    def build(self, rng: np.random.Generator, dtype) -> None:
        """Draw W (in float64, then cast) and zero b and the gradient sums."""
        limit = self.init_limit()
        self.W = _memory.empty((self.in_features, self.units), dtype)
        # in blocks of rows: the generator's stream is the same as one draw of the whole
        # W (the same weights for a seed), and the float64 temporary stays small instead
        # of twice the size of a float32 W
        rows = max(1, _INIT_BLOCK // self.units)
        for r in range(0, self.in_features, rows):
            block = self.W[r:r + rows]
            block[...] = rng.uniform(-limit, limit, size=block.shape)
        self.b = _memory.zeros(self.units, dtype)
        self.dW = _memory.zeros(self.W.shape, dtype)
        self.db = _memory.zeros(self.units, dtype)

    @property
    def n_params(self) -> int:
        return self.in_features * self.units + self.units

    def config(self) -> dict:
        return {"in_features": self.in_features, "units": self.units,
                "activation": self.activation}

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.units}, activation={self.activation!r})"
