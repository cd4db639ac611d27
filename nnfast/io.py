"""Save and load models as ``.npz`` files: a JSON header plus plain arrays.

Nothing is pickled: the header is stored as a uint8 array of UTF-8 JSON and the file
is read with ``allow_pickle=False``. Files are written atomically (temporary file in the
same folder, flush, fsync, ``os.replace``), so a crash never leaves half a model.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "nnfast-model"
FORMAT_VERSION = 1


def atomic_write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` as an .npz, atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nnfast-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass


def _header_array(header: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def model_arrays(model, optimizer=None, extra_header=None) -> dict:
    """The arrays (and header) that describe ``model`` and optionally ``optimizer``."""
    from . import __version__
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "nnfast_version": __version__,
              "model": model.config(), "loss": model.loss}
    arrays = {}
    for i, w in enumerate(model.get_weights()):
        arrays[f"param.{i}"] = w
    if optimizer is not None:
        header["optimizer"] = optimizer.config()
        header["optimizer_iterations"] = optimizer.iterations
        for name, arr in optimizer.state_arrays():
            arrays[f"opt.{name}"] = arr
    if extra_header:
        header.update(extra_header)
    arrays["header"] = _header_array(header)
    return arrays


def save(model, path, optimizer=None) -> None:
    """Write ``model`` (and ``optimizer``'s state, if given) to ``path`` atomically."""
    atomic_write_npz(path, model_arrays(model, optimizer))


def read_npz(path):
    """(header dict, {name: array}) of an nnfast file; ValueError if it is not one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ValueError(f"{path!r} is not a valid nnfast model file ({exc})") from None
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise ValueError(f"{path!r} is not a valid nnfast model file ({exc})") from None
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path!r} is not a valid nnfast model file ({exc})") from None
    head = arrays.pop("header", None)
    if head is None or head.dtype != np.uint8 or head.ndim != 1:
        raise ValueError(f"{path!r} is not a valid nnfast model file (no header)")
    try:
        header = json.loads(head.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path!r} has a corrupt header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an nnfast model file")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r} has format version {header.get('format_version')!r}; "
                         f"this nnfast reads version {FORMAT_VERSION}")
    return header, arrays


def model_from_header(header: dict, arrays: dict, backend=None, path="file"):
    from .layers import Dense
    from .model import Sequential
    try:
        cfg = header["model"]
        layers = [Dense(int(l["in_features"]), int(l["units"]), activation=str(l["activation"]))
                  for l in cfg["layers"]]
        model = Sequential(*layers, dtype=str(cfg["dtype"]), seed=0,
                           backend=backend or str(cfg.get("backend", "cython")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an invalid model description ({exc})") from None
    weights = []
    for i in range(2 * len(model.layers)):
        key = f"param.{i}"
        if key not in arrays:
            raise ValueError(f"{path!r} is missing parameter array {key!r}")
        if arrays[key].dtype != model.dtype:
            raise ValueError(f"{path!r}: {key} has dtype {arrays[key].dtype}, the header says "
                             f"{model.dtype}")
        weights.append(arrays[key])
    try:
        model.set_weights(weights)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} holds invalid parameters: {exc}") from None
    loss = header.get("loss")
    if loss is not None:
        model.loss = model._check_loss(loss)
    return model


def optimizer_from_header(header: dict, arrays: dict, model, path="file"):
    from .optim import optimizer_from_config
    if "optimizer" not in header:
        return None
    try:
        opt = optimizer_from_config(header["optimizer"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an invalid optimizer description ({exc})") from None
    state = {k[len("opt."):]: v for k, v in arrays.items() if k.startswith("opt.")}
    opt.load_state(model, int(header.get("optimizer_iterations", 0)), state)
    return opt


def load(path, backend=None, with_optimizer=False):
    """Read a model written by ``save``.

    Returns the model, or ``(model, optimizer)`` with ``with_optimizer=True`` (the
    optimizer is None when the file holds none). ``backend`` overrides the saved one.
    Raises FileNotFoundError for a missing file and ValueError for anything that is not
    a valid nnfast model file.
    """
    header, arrays = read_npz(path)
    model = model_from_header(header, arrays, backend=backend, path=os.fspath(path))
    if with_optimizer:
        return model, optimizer_from_header(header, arrays, model, path=os.fspath(path))
    return model
