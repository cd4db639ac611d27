"""nnfast: a fast, minimal multilayer-perceptron engine for the CPU.

NumPy arrays in, NumPy arrays out; compiled Cython/OpenMP kernels underneath, and a
pure-NumPy backend with the same interface (``backend="numpy"``).
"""
__version__ = "0.1.0"

from ._threads import get_num_threads, set_num_threads
from .data import batches, iterations_per_epoch, steps_per_epoch
from .io import load, save
from .layers import Dense
from .model import Sequential
from .optim import SGD, Adam, Optimizer
from .training import DivergenceError, History, resume
from .callbacks import Callback, EarlyStopping, ModelCheckpoint
from . import callbacks, datasets

__all__ = [
    "Sequential", "Dense", "SGD", "Adam", "Optimizer", "History", "DivergenceError", "resume",
    "batches", "iterations_per_epoch", "steps_per_epoch", "load", "save",
    "set_num_threads", "get_num_threads", "Callback", "EarlyStopping", "ModelCheckpoint",
    "callbacks", "datasets", "__version__",
]
