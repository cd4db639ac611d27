"""Save and load models as ``.npz`` files: a JSON header plus plain arrays.

Nothing is pickled: the header is stored as a uint8 array of UTF-8 JSON and the file
is read with ``allow_pickle=False``. Files are written atomically (temporary file in the
same folder, flush, fsync, ``os.replace``), so a crash never leaves half a model; what a
writer killed mid-write leaves behind is removed by the next save of the same file.
Training checkpoints (``fit(..., checkpoint=path)``) are model files whose header also
holds a ``"checkpoint"`` object and whose arrays also hold ``ckpt.*`` entries.
"""
from __future__ import annotations

import os

import numpy as np

FORMAT = "nnfast-model"
FORMAT_VERSION = 1


_TMP_PREFIX, _TMP_SUFFIX = ".nnfast~", ".tmp"
_FOREIGN_TMP_AGE = 86400.0  # seconds before another host's leftover counts as stale


def atomic_write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` as an .npz, atomically.

    The temporary file, in the same folder, is named for its target, host and process
    (``.nnfast~<target>~<host>~<pid>~<random>.tmp``), so that after a successful write
    the leftovers of writers of the same target that were killed mid-write are removed
    (those of this host whose process is gone, and those of other hosts once a day old).
    It is created like any new file (mode 0o666 less the umask, not ``mkstemp``'s 0o600);
    an existing target keeps its permissions."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        import stat
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    fd, tmp = _create_temporary(folder, base)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.chmod(tmp, mode)
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
    _remove_stale_temporaries(folder, base)


def _host() -> str:
    import socket  # here, not at module level: keeps `import nnfast` light
    return socket.gethostname().replace("~", "-") or "localhost"


def _tmp_target(base: str) -> str:
    """The target's name as it appears in its temporaries' names: shortened (with a CRC of
    the whole) when long, so that the temporary's name stays within the 255 bytes a file
    name may have."""
    raw = base.encode("utf-8", "surrogateescape")
    if len(raw) <= 96:
        return base
    import zlib
    head = raw[:48].decode("utf-8", "ignore")  # whole characters of at most 48 bytes
    return f"{head}-{zlib.crc32(raw):08x}"


def _create_temporary(folder: str, base: str):
    import secrets
    stem = f"{_TMP_PREFIX}{_tmp_target(base)}~{_host()}~{os.getpid()}~"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, stem + secrets.token_hex(4) + _TMP_SUFFIX)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder!r}")  # pragma: no cover


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(folder: str, base: str) -> None:
    """Delete the temporary files that writers of ``base`` killed mid-write left in
    ``folder``: this host's whose process is gone; another host's (a shared folder) only
    when a day old, since its process cannot be asked about. Never one of this process,
    which another thread may be writing."""
    import time
    prefix, host, now = f"{_TMP_PREFIX}{_tmp_target(base)}~", _host(), time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        parts = name[len(prefix):-len(_TMP_SUFFIX)].rsplit("~", 2)  # host, pid, random
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        full = os.path.join(folder, name)
        pid = int(parts[1])
        if parts[0] == host:
            if pid == os.getpid() or _process_alive(pid):
                continue
        else:
            try:
                if now - os.stat(full).st_mtime < _FOREIGN_TMP_AGE:
                    continue
            except OSError:
                continue
        try:
            os.unlink(full)
        except OSError:
            pass


def _header_array(header: dict) -> np.ndarray:
    import json  # here and below: not on the path of ``import nnfast`` (2 ms)
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
    from .model import Sequential
    from .optim import Optimizer
    if not isinstance(model, Sequential):
        raise TypeError(f"model must be an nnfast Sequential, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError("optimizer must be an nnfast Optimizer instance or None, got "
                        f"{type(optimizer).__name__}")
    if optimizer is not None:
        optimizer._check_fits(model)   # its state must be this model's, not another's
    atomic_write_npz(_fspath(path), model_arrays(model, optimizer))


def _fspath(path) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") \
            from None
    path = os.fsdecode(path) if isinstance(path, bytes) else path
    if not path:
        raise ValueError("path must not be empty")
    return path


def read_npz(path):
    """(header dict, {name: array}) of an nnfast file; ValueError if it is not one.

    Read with ``allow_pickle=False``: an object array in the file is a ValueError, never
    unpickled."""
    path = _fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):   # a plain .npy array
            raise ValueError("not an .npz archive")
        with data:
            arrays = {name: data[name] for name in data.files}
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path!r} is not a valid nnfast model file ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - zipfile/zlib/format errors of a bad file,
        # ValueError for object arrays (they refuse to load without pickle)
        raise ValueError(f"{path!r} is not a valid nnfast model file "
                         f"({type(exc).__name__}: {exc})") from None
    head = arrays.pop("header", None)
    if head is None or head.dtype != np.uint8 or head.ndim != 1:
        raise ValueError(f"{path!r} is not a valid nnfast model file (no header)")
    import json
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


def _header_value(entry: dict, key: str, kind: type):
    """``entry[key]``, which ``save`` wrote as a JSON ``kind`` (an int, not "8" or 8.0 or
    true: what else would a tampered header mean?)."""
    value = entry[key]
    if type(value) is not kind:
        raise TypeError(f"{key} must be a JSON {kind.__name__}, got {value!r}")
    return value


def model_from_header(header: dict, arrays: dict, backend=None, path="file"):
    from .layers import Dense
    from .model import Sequential
    try:
        cfg = header["model"]
        if not isinstance(cfg, dict) or not isinstance(cfg["layers"], list):
            raise TypeError("model must be an object with a list of layers")
        layers = [Dense(_header_value(l, "in_features", int), _header_value(l, "units", int),
                        activation=_header_value(l, "activation", str))
                  for l in cfg["layers"]]
        dtype = _header_value(cfg, "dtype", str)
        model_backend = backend or str(cfg.get("backend", "cython"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an invalid model description ({exc})") from None
    # the arrays must match the description before anything is allocated from it (a
    # tampered width must not make load allocate terabytes)
    for i, layer in enumerate(layers):
        for j, shape in ((2 * i, (layer.in_features, layer.units)), (2 * i + 1, (layer.units,))):
            key = f"param.{j}"
            if key not in arrays:
                raise ValueError(f"{path!r} is missing parameter array {key!r}")
            if arrays[key].shape != shape:
                raise ValueError(f"{path!r}: {key} has shape {arrays[key].shape}, the header "
                                 f"says {shape}")
    try:
        model = Sequential(*layers, dtype=dtype, seed=0, backend=model_backend)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has an invalid model description ({exc})") from None
    weights = []
    for i in range(2 * len(model.layers)):
        key = f"param.{i}"
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
        try:
            model.loss = model._check_loss(loss)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} has an invalid loss ({exc})") from None
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
    try:
        opt.load_state(model, header.get("optimizer_iterations", 0), state)
    except ValueError as exc:
        raise ValueError(f"{path!r} has an invalid optimizer state ({exc})") from None
    return opt


def load(path, backend=None, with_optimizer=False):
    """Read a model written by ``save``.

    Returns the model, or ``(model, optimizer)`` with ``with_optimizer=True`` (the
    optimizer is None when the file holds none). ``backend`` overrides the saved one.
    Raises FileNotFoundError for a missing file and ValueError for anything that is not
    a valid nnfast model file.
    """
    path = _fspath(path)
    header, arrays = read_npz(path)
    model = model_from_header(header, arrays, backend=backend, path=path)
    if with_optimizer:
        return model, optimizer_from_header(header, arrays, model, path=path)
    return model


# --- training checkpoints ------------------------------------------------------------------
CHECKPOINT_VERSION = 1


def write_checkpoint(path, model, optimizer, state: dict, arrays: dict) -> None:
    """Write a training checkpoint of ``fit`` atomically.

    The file is a model file (``load`` reads the model and optimizer from it) whose
    header also holds ``"checkpoint"``: ``state`` (JSON: fit configuration, counters, RNG
    state, History), and whose arrays also hold ``ckpt.<name>`` for every entry of
    ``arrays`` (plain numeric arrays: the epoch's permutation, losses so far)."""
    out = model_arrays(model, optimizer,
                       extra_header={"checkpoint": dict(state, version=CHECKPOINT_VERSION)})
    for name, arr in arrays.items():
        out[f"ckpt.{name}"] = np.ascontiguousarray(arr)
    atomic_write_npz(path, out)


def read_checkpoint(path):
    """(header, checkpoint state dict, {name: array} of the ``ckpt.`` arrays, all arrays)
    of a file written by :func:`write_checkpoint`; ValueError for anything else."""
    header, arrays = read_npz(path)
    state = header.get("checkpoint")
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)!r} is an nnfast model file but not a training "
                         "checkpoint (those are written by fit(..., checkpoint=path))")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has checkpoint version "
                         f"{state.get('version')!r}; this nnfast reads version "
                         f"{CHECKPOINT_VERSION}")
    extra = {k[len("ckpt."):]: v for k, v in arrays.items() if k.startswith("ckpt.")}
    return header, state, extra, arrays
