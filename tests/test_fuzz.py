"""Property-based fuzzing of the public API (issue 5, item 2).

Hypothesis drives ``fit``, ``predict``, ``evaluate``, ``compute_gradients``,
``set_weights`` and ``load`` with random shapes (including 0 and mismatched ones), dtypes
(float16/32/64, ints, bool, object, complex, str), values (NaN, inf, huge, tiny,
subnormal), memory orders and views. The property, for every call:

* it never crashes the process, never hangs, and raises nothing but the documented
  exceptions (``ValueError``/``TypeError`` for bad input, ``FloatingPointError`` such as
  ``nnfast.DivergenceError`` when training diverges; for ``load`` a ``ValueError`` for a
  file that is not a valid model, ``OSError`` for a missing or unreadable one);
* input that is invalid by construction is rejected (no silent acceptance), and a
  rejected call leaves the model as it was;
* valid input is accepted, and what comes back is sane: ``fit`` returns only with finite
  losses and finite weights (a step that overflows must raise ``DivergenceError``, not
  leave inf/NaN weights behind), ``predict``/``evaluate``/``compute_gradients`` are finite
  whenever the inputs are of moderate magnitude (|x| <= 1e4), views/orders give exactly
  the result of the C-contiguous array.

What the library may legitimately do with *huge* but finite input (1e30 in float32,
1e300 in float64): ``predict``/``evaluate``/``compute_gradients`` may return inf/NaN
(the math overflows, as in NumPy or PyTorch) or raise ``FloatingPointError``; ``fit``
must raise ``FloatingPointError`` or end with finite weights.

Every call runs in a long-lived worker *process* (this file run as a script), fed one
pickled case at a time over a pipe, so a segfault in a ``boundscheck(False)`` kernel
fails the test (reporting the case) instead of killing pytest; the worker is restarted
after a crash. The worker finds ``nnfast`` where this process found it.
"""
from __future__ import annotations

import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER_FLAG = "--nnfast-fuzz-worker"
CASE_TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------
# Shared by parent and worker: building arrays from small, shrinkable descriptions
# ---------------------------------------------------------------------------------------
SCALES = [1.0, 1e-30, 1e-40, 1e-310, 1e4, 1e30, 1e300]
SPECIALS = [None, float("nan"), float("inf"), float("-inf")]
FLOAT_DTYPES = ["float32", "float64", "float16"]
DTYPES = FLOAT_DTYPES + ["int64", "int32", "uint8", "bool", "object", "complex128", "str"]
LAYOUTS = ["C", "F", "cols", "rows", "neg", "T", "readonly", "list"]


def make_array(shape, dtype, scale=1.0, special=None, seed=0):
    """A deterministic array for the description (built in the parent, pickled over)."""
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    with np.errstate(all="ignore"):
        base = rng.standard_normal(shape) * scale
        if special is not None and base.size:
            base.flat[rng.integers(base.size)] = special
        if dtype in FLOAT_DTYPES:
            return base.astype(dtype)
        if dtype in ("int64", "int32"):
            hi = 2 ** 30 if scale >= 1e30 else 4
            return rng.integers(-hi, hi, size=shape).astype(dtype)
        if dtype == "uint8":
            return rng.integers(0, 7, size=shape).astype(np.uint8)
        if dtype == "bool":
            return rng.random(shape) < 0.5
        if dtype == "object":
            return base.astype(object)
        if dtype == "complex128":
            return base + 0.5j
        if dtype == "str":
            return base.astype(str)
    raise AssertionError(dtype)


def materialize(spec):
    """The array (or list) handed to nnfast: ``spec = {"base": ndarray|None, "layout"}``."""
    if spec is None:
        return None
    a = spec["base"]
    layout = spec["layout"]
    if a is None or not isinstance(a, np.ndarray):
        return a
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "cols" and a.ndim >= 1:
        shape = a.shape[:-1] + (2 * a.shape[-1] + 1,)
        wide = np.zeros(shape, dtype=a.dtype)
        wide[..., 1::2] = a
        return wide[..., 1::2]
    if layout == "rows" and a.ndim >= 1:
        tall = np.zeros((2 * a.shape[0] + 1,) + a.shape[1:], dtype=a.dtype)
        tall[1::2] = a
        return tall[1::2]
    if layout == "neg" and a.ndim >= 1:
        return a[::-1].copy()[::-1]
    if layout == "T" and a.ndim == 2:
        return np.ascontiguousarray(a.T).T
    if layout == "readonly":
        r = a.copy()
        r.setflags(write=False)
        return r
    if layout == "list":
        return a.tolist()
    return a


# ---------------------------------------------------------------------------------------
# Worker side (runs in the child process)
# ---------------------------------------------------------------------------------------
def _w_build(spec):
    import nnfast as nf
    layers = [nf.Dense(i, o, activation=a) for i, o, a in spec["layers"]]
    return nf.Sequential(*layers, dtype=spec["dtype"], seed=spec["seed"],
                         backend=spec["backend"])


def _w_finite_list(arrays):
    return all(np.isfinite(np.asarray(a, dtype=np.float64)).all() for a in arrays)


def _w_same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
                                    for x, y in zip(a, b))


def _w_exc(e, **extra):
    out = {"status": "raised", "exc": type(e).__name__,
           "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)[:400]}
    out.update(extra)
    return out


def _w_optimizer(spec):
    import nnfast as nf
    if spec is None:
        return None
    kind, lr, momentum = spec
    if kind == "sgd":
        return nf.SGD(lr=lr, momentum=momentum, nesterov=momentum > 0.5)
    return nf.Adam(lr=lr)


def _w_fit(case):
    model = _w_build(case["model"])
    X, y = materialize(case["X"]), materialize(case["y"])
    val = case["val"]
    vd = None if val is None else (materialize(val[0]), materialize(val[1]))
    before = model.get_weights()
    try:
        hist = model.fit(X, y, loss=case["loss"], optimizer=_w_optimizer(case["opt"]),
                         validation_data=vd, **case["kwargs"])
    except Exception as e:
        after = model.get_weights()
        return _w_exc(e, weights_unchanged=_w_same(before, after),
                      weights_finite=_w_finite_list(after))
    after = model.get_weights()
    # training losses must be finite when fit returns (a non-finite one raises); the
    # validation loss is reported as evaluate gives it, which can overflow with finite
    # weights (outputs of 1e200 on the validation rows)
    values = list(hist.batch_losses) + [v for k, vs in hist.history.items()
                                        if not k.startswith("val_") for v in vs]
    val_as_evaluate = True
    if vd is not None and hist.history.get("val_loss"):
        with np.errstate(all="ignore"):
            now = model.evaluate(*vd)["loss"]
        val_as_evaluate = bool(np.array_equal(now, hist.history["val_loss"][-1],
                                              equal_nan=True))
    return {"status": "ok", "losses_finite": bool(np.isfinite(values).all()),
            "val_as_evaluate": val_as_evaluate,
            "weights_finite": _w_finite_list(after),
            "max_abs_w": float(max(np.abs(w).max() for w in after)),
            "iterations": hist.iterations, "steps": hist.steps, "epochs": hist.epochs,
            "n_batch_losses": len(hist.batch_losses),
            "history_keys": sorted(hist.history),
            "accuracy_ok": all(0.0 <= a <= 1.0 for k in ("accuracy", "val_accuracy")
                               for a in hist.history.get(k, []))}


def _w_reference_X(case, model):
    base = case["X"]["base"]
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(np.asarray(base).astype(np.float64).astype(model.dtype))


def _w_predict(case):
    model = _w_build(case["model"])
    X = materialize(case["X"])
    try:
        out = model.predict(X)
    except Exception as e:
        return _w_exc(e)
    res = {"status": "ok", "shape": out.shape, "dtype": str(out.dtype),
           "type": type(out).__name__, "finite": bool(np.isfinite(out).all())}
    if case["compare"]:
        ref = model.predict(_w_reference_X(case, model))
        res["same_as_contiguous"] = bool(np.array_equal(out, ref, equal_nan=True))
    act = case["model"]["layers"][-1][2]
    with np.errstate(all="ignore"):
        if act in ("softmax", "sigmoid"):
            res["range_ok"] = bool(((out >= 0) & (out <= 1)).all())
        elif act == "tanh":
            res["range_ok"] = bool(((out >= -1) & (out <= 1)).all())
        else:
            res["range_ok"] = True
        if act == "softmax":
            res["range_ok"] &= bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-3))
    return res


def _w_evaluate(case):
    model = _w_build(case["model"])
    X, y = materialize(case["X"]), materialize(case["y"])
    try:
        r = model.evaluate(X, y, loss=case["loss"])
    except Exception as e:
        return _w_exc(e)
    return {"status": "ok", "keys": sorted(r), "loss": float(r["loss"]),
            "loss_type": type(r["loss"]).__name__,
            "accuracy": float(r["accuracy"]) if "accuracy" in r else None}


def _w_compute_gradients(case):
    model = _w_build(case["model"])
    X, y = materialize(case["X"]), materialize(case["y"])
    try:
        loss = model.compute_gradients(X, y, loss=case["loss"])
    except Exception as e:
        clean = model.accumulated_samples == 0 and all(
            not l.dW.any() and not l.db.any() for l in model.layers)
        return _w_exc(e, state_clean=bool(clean))
    grads = model.gradients()
    return {"status": "ok", "loss": float(loss), "grads_finite": _w_finite_list(grads),
            "count": model.accumulated_samples,
            "grad_shapes_ok": [g.shape for g in grads] == [w.shape for w in model.get_weights()]}


def _w_set_weights(case):
    model = _w_build(case["model"])
    items = [materialize(s) for s in case["weights"]]
    container = case["container"]
    if container == "tuple":
        ws = tuple(items)
    elif container == "ndarray":
        ws = np.empty(len(items), dtype=object)
        for i, w in enumerate(items):
            ws[i] = w
    elif container == "generator":
        ws = (w for w in items)
    elif container == "dict":
        ws = {i: w for i, w in enumerate(items)}
    else:
        ws = items
    before = model.get_weights()
    try:
        model.set_weights(ws)
    except Exception as e:
        return _w_exc(e, unchanged=_w_same(before, model.get_weights()))
    got = model.get_weights()
    res = {"status": "ok", "weights_finite": _w_finite_list(got),
           "shapes_ok": [w.shape for w in got] == [w.shape for w in before],
           "dtypes_ok": all(w.dtype == model.dtype for w in got)}
    with np.errstate(all="ignore"):
        expected = [np.asarray(w).astype(np.float64).astype(model.dtype) for w in items]
    res["roundtrip"] = _w_same(got, expected)
    res["predict_finite"] = bool(np.isfinite(model.predict(np.ones((3, model.n_inputs)))).all())
    return res


def _w_write_npz(path, arrays):
    import zipfile
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in arrays.items():
            with zf.open(k + ".npy", "w") as fh:
                np.lib.format.write_array(fh, np.asarray(v), allow_pickle=True)


def _w_edit_header(h, where, value):
    import copy
    h = copy.deepcopy(h)
    obj = h
    keys = where.split("/")
    for k in keys[:-1]:
        if isinstance(obj, list):
            k = int(k)
            if k >= len(obj):
                return h
        elif not isinstance(obj, dict) or k not in obj:
            return h
        obj = obj[k]
    last = keys[-1]
    if isinstance(obj, list):
        if int(last) < len(obj):
            obj[int(last)] = value
    elif isinstance(obj, dict):
        if value == "<delete>":
            obj.pop(last, None)
        else:
            obj[last] = value
    return h


def _w_load(case, tmpdir):
    import json
    import nnfast as nf
    model = _w_build(case["model"])
    path = os.path.join(tmpdir, "m.npz")
    for leftover in (path, path + ".npy"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    opt = None
    if case["with_opt"]:
        opt = nf.SGD(lr=0.1, momentum=0.9) if case["with_opt"] == "sgd" else nf.Adam()
        n_in = model.n_inputs
        Xs = np.ones((2, n_in))
        last = case["model"]["layers"][-1][2]
        loss = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy"}.get(last, "mse")
        ys = np.zeros(2, dtype=np.int64) if loss == "cross_entropy" else \
            np.zeros((2, model.n_outputs))
        model.compute_gradients(Xs, ys, loss=loss)
        opt.step(model)
    model.save(path, optimizer=opt)
    saved = model.get_weights()
    kind, arg = case["mutation"]
    if kind == "missing":
        path = os.path.join(tmpdir, "does-not-exist.npz")
    elif kind == "directory":
        path = tmpdir
    elif kind in ("truncate", "flip", "garbage", "empty"):
        raw = bytearray(open(path, "rb").read())
        if kind == "truncate":
            raw = raw[:int(len(raw) * arg)]
        elif kind == "flip":
            for frac, xor in arg:
                i = min(len(raw) - 1, int(len(raw) * frac))
                raw[i] ^= xor
        elif kind == "garbage":
            raw = bytearray(np.random.default_rng(arg).integers(0, 256, 300, dtype=np.uint8))
        else:
            raw = bytearray()
        with open(path, "wb") as f:
            f.write(bytes(raw))
    elif kind == "npy":
        np.save(path + ".npy", np.zeros((3, 3)))
        path = path + ".npy"
    elif kind != "none":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if kind == "header":
            where, value = arg
            h = json.loads(arrays["header"].tobytes().decode("utf-8"))
            h = _w_edit_header(h, where, value)
            arrays["header"] = np.frombuffer(json.dumps(h).encode("utf-8"), dtype=np.uint8)
        elif kind == "drop":
            names = sorted(arrays)
            arrays.pop(names[arg % len(names)])
        elif kind == "replace":
            which, how = arg
            names = sorted(k for k in arrays if k != "header")
            name = names[which % len(names)]
            a = arrays[name]
            with np.errstate(all="ignore"):
                if how == "T":
                    a = a.T.copy() if a.ndim == 2 else a[None]
                elif how == "flat":
                    a = a.reshape(-1)[:-1] if a.size > 1 else a.reshape(())
                elif how == "nan":
                    a = a.astype(np.float64).copy()
                    a.flat[0] = np.nan
                elif how == "huge":
                    a = a * 1e30
                elif how == "object":
                    a = a.astype(object)
                elif how == "str":
                    a = a.astype(str)
                else:  # a dtype name
                    a = a.astype(how)
            arrays[name] = a
        elif kind == "extra":
            arrays["zzz"] = np.array([1, "x", None], dtype=object) if arg == "object" \
                else np.zeros(3)
        _w_write_npz(path, arrays)
    try:
        result = nf.load(path, with_optimizer=bool(case["with_opt"]))
    except Exception as e:
        return _w_exc(e)
    loaded, lopt = result if case["with_opt"] else (result, None)
    ws = loaded.get_weights()
    res = {"status": "ok", "type": type(loaded).__name__,
           "weights_finite": _w_finite_list(ws),
           "shapes_ok": ([w.shape for w in ws] ==
                         [s for l in loaded.layers for s in ((l.in_features, l.units),
                                                             (l.units,))]),
           "dtypes_ok": all(w.dtype == loaded.dtype for w in ws),
           "same_as_saved": _w_same(ws, saved),
           "max_abs_w": float(max(np.abs(w).max() for w in ws))}
    with np.errstate(all="ignore"):
        res["predict_finite"] = bool(np.isfinite(
            loaded.predict(np.ones((2, loaded.n_inputs)))).all())
    res["opt_ok"] = True
    if lopt is not None:
        try:  # the optimizer must be usable with the loaded model
            n_in = loaded.n_inputs
            last = loaded.layers[-1].activation
            loss = {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy"}.get(last,
                                                                                      "mse")
            ys = np.zeros(2, dtype=np.int64) if loss == "cross_entropy" else \
                np.zeros((2, loaded.n_outputs))
            loaded.compute_gradients(np.ones((2, n_in)), ys, loss=loss)
            lopt.step(loaded)
        except Exception as e:
            res["opt_ok"] = f"{type(e).__name__}: {e}"
    return res


def _w_crash(case):
    import faulthandler
    faulthandler._sigsegv()   # the harness self-test: a real segfault inside a case


def _w_sleep(case):
    time.sleep(case["seconds"])  # the harness self-test: a hung case
    return {"status": "ok"}


def _w_session_data(model, loss, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, model.n_inputs))
    k = model.n_outputs
    if loss == "cross_entropy":
        y = rng.integers(0, k, size=n)
    elif loss == "binary_cross_entropy":
        y = (rng.random((n, k)) < 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, k))
    return X, y


def _w_close(a, b, dtype):
    tol = 1e-4 if dtype == np.float32 else 1e-10
    return bool(np.allclose(a, b, rtol=tol, atol=tol))


def _w_session(case):
    """Several valid calls on one model (its buffers grow and shrink in between); every
    result must match a fresh model holding the same weights."""
    import nnfast as nf
    model = _w_build(case["model"])
    loss = case["loss"]
    opt = nf.SGD(lr=0.05, momentum=0.5)
    problems = []
    for i, (kind, n, seed, extra) in enumerate(case["steps"]):
        X, y = _w_session_data(model, loss, n, seed)
        fresh = _w_build(case["model"])
        fresh.set_weights(model.get_weights())
        if kind == "fit":
            vd = _w_session_data(model, loss, extra["nv"], seed + 1) if extra["nv"] else None
            hist = model.fit(X, y, loss=loss, optimizer=opt, epochs=extra["epochs"],
                             batch_size=extra["bs"], accumulate=extra["acc"], seed=seed,
                             validation_data=vd)
            if not np.isfinite(hist.batch_losses).all():
                problems.append((i, kind, "non-finite batch loss"))
            if vd is not None:
                ev = model.evaluate(*vd, loss=loss)["loss"]
                if not _w_close(ev, hist.history["val_loss"][-1], model.dtype):
                    problems.append((i, kind, f"val_loss {hist.history['val_loss'][-1]} != "
                                              f"evaluate {ev}"))
        elif kind == "predict":
            a, b = model.predict(X), fresh.predict(X)
            if not _w_close(a, b, model.dtype):
                problems.append((i, kind, "differs from a fresh model"))
        elif kind == "evaluate":
            a, b = model.evaluate(X, y, loss=loss), fresh.evaluate(X, y, loss=loss)
            if not _w_close(a["loss"], b["loss"], model.dtype) or \
                    a.get("accuracy") != b.get("accuracy"):
                problems.append((i, kind, f"{a} != fresh {b}"))
        elif kind == "grad":
            model.zero_grad()
            la = model.compute_gradients(X, y, loss=loss)
            lb = fresh.compute_gradients(X, y, loss=loss)
            ga, gb = model.gradients(), fresh.gradients()
            if not _w_close(la, lb, model.dtype) or not all(
                    _w_close(p, q, model.dtype) for p, q in zip(ga, gb)):
                problems.append((i, kind, "gradients differ from a fresh model"))
            if extra.get("step"):
                opt.step(model)
        if not _w_finite_list(model.get_weights()):
            problems.append((i, kind, "non-finite weights"))
            break
    return {"status": "ok", "problems": problems}


_OPS = {"crash": _w_crash, "sleep": _w_sleep, "session": _w_session, "fit": _w_fit, "predict": _w_predict, "evaluate": _w_evaluate,
        "compute_gradients": _w_compute_gradients, "set_weights": _w_set_weights}


def worker_main():
    """Child process: read pickled cases from stdin, write pickled outcomes."""
    import faulthandler
    import shutil
    import warnings
    try:  # a crash is reported by the parent; no core file in the working tree
        import resource
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    faulthandler.enable()
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)               # stray prints (verbose fit) go to stderr, not the pipe
    warnings.simplefilter("ignore")
    inp = sys.stdin.buffer
    import nnfast  # noqa: F401  (fail early, visibly, if the package is not importable)
    tmpdir = tempfile.mkdtemp(prefix="nnfast-fuzz-")
    out.write(b"READY\n")
    out.flush()
    try:
        _w_serve(inp, out, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _w_serve(inp, out, tmpdir):
    import traceback
    while True:
        head = inp.read(8)
        if len(head) < 8:
            break
        (n,) = struct.unpack("<Q", head)
        case = pickle.loads(inp.read(n))
        try:
            if case["op"] == "load":
                res = _w_load(case, tmpdir)
            else:
                res = _OPS[case["op"]](case)
        except Exception as e:  # a failure of the harness itself or of set-up
            res = {"status": "error", "exc": type(e).__name__, "msg": str(e)[:400],
                   "tb": traceback.format_exc()[-3000:]}
        data = pickle.dumps(res)
        out.write(struct.pack("<Q", len(data)) + data)
        out.flush()


if __name__ == "__main__" and WORKER_FLAG in sys.argv:
    worker_main()
    sys.exit(0)

# ---------------------------------------------------------------------------------------
# Parent side: the worker handle
# ---------------------------------------------------------------------------------------
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nnfast as nf  # noqa: E402  (only to locate the package for the worker)


class WorkerCrashed(AssertionError):
    pass


class Worker:
    """A child process that runs cases; restarted after a crash or a hang."""

    def __init__(self, timeout=CASE_TIMEOUT_S):
        self.proc = None
        self.errfile = None
        self.crashes = 0
        self.timeout = timeout

    def _start(self):
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(nf.__file__)))
        env = dict(os.environ)
        parts = [pkg_root] + [p for p in sys.path if p and os.path.isdir(p)]
        if env.get("PYTHONPATH"):
            parts.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        env.setdefault("PYTHONFAULTHANDLER", "1")
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), WORKER_FLAG],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errfile, env=env, bufsize=0)
        try:
            line = self._read_exact(6, timeout=120)
        except (EOFError, TimeoutError):
            line = b""
        if line != b"READY\n":
            tail = self._stderr_tail()
            self._kill()
            raise RuntimeError("the fuzz worker process did not start:\n" + tail)

    def _stderr_tail(self, n=3000):
        if self.errfile is None:
            return ""
        self.errfile.seek(0, os.SEEK_END)
        size = self.errfile.tell()
        self.errfile.seek(max(0, size - n))
        return self.errfile.read().decode("utf-8", "replace")

    def _read_exact(self, n, timeout):
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _kill(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                pass
            self._kill()
        if self.errfile is not None:
            self.errfile.close()
            self.errfile = None

    def run(self, case):
        if self.proc is None or self.proc.poll() is not None:
            self._kill()
            self._start()
        data = pickle.dumps(case)
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            (n,) = struct.unpack("<Q", self._read_exact(8, self.timeout))
            return pickle.loads(self._read_exact(n, self.timeout))
        except TimeoutError:
            tail = self._stderr_tail()
            self._kill()
            self.crashes += 1
            return {"status": "hung", "stderr": tail}
        except (EOFError, BrokenPipeError, OSError):
            rc = self.proc.wait()
            tail = self._stderr_tail()
            self._kill()
            self.crashes += 1
            sig = ""
            if rc < 0:
                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = f"signal {-rc}"
            return {"status": "crashed", "returncode": rc, "signal": sig, "stderr": tail}


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def fuzz(n):
    return settings(FUZZ, max_examples=n)


# ---------------------------------------------------------------------------------------
# Parent side: the oracle (what each input should do)
# ---------------------------------------------------------------------------------------
VALID, INVALID, EITHER = "valid", "invalid", "either"
MODERATE = 1e4


def combine(*statuses):
    if INVALID in statuses:
        return INVALID
    if EITHER in statuses:
        return EITHER
    return VALID


def _as_float64(a):
    a = np.asarray(a)
    if a.dtype.kind == "c":
        return None
    with np.errstate(all="ignore"):
        try:
            return a.astype(np.float64)
        except (TypeError, ValueError):
            return None


def _finite_in(a, dtype):
    with np.errstate(all="ignore"):
        return bool(np.isfinite(np.asarray(a).astype(np.float64).astype(dtype)).all())


def array_kind_status(a):
    """numeric -> VALID, object of numbers -> EITHER, anything else -> INVALID."""
    if not isinstance(a, np.ndarray):
        return INVALID
    k = a.dtype.kind
    if k in "biuf":
        return VALID
    if k == "O":
        return EITHER if _as_float64(a) is not None else INVALID
    return INVALID


def x_status(a, n_inputs, dtype):
    st_ = array_kind_status(a)
    if st_ == INVALID or a.ndim != 2 or a.shape[0] == 0 or a.shape[1] != n_inputs:
        return INVALID
    if not _finite_in(a, dtype):
        return INVALID
    return st_


def magnitude(a):
    f = _as_float64(a)
    if f is None or f.size == 0:
        return 0.0
    with np.errstate(all="ignore"):
        return float(np.nanmax(np.abs(f))) if not np.isnan(f).all() else 0.0


def y_status(loss, a, n, k, dtype):
    if a is None:
        return INVALID
    st_ = array_kind_status(a)
    if st_ == INVALID or a.ndim not in (1, 2) or a.shape[0] != n:
        return INVALID
    f = _as_float64(a)
    if loss == "cross_entropy" and a.ndim == 1:
        if not np.isfinite(f).all() or (f != np.round(f)).any():
            return INVALID
        if f.size and (f.min() < 0 or f.max() >= k):
            return INVALID
        return st_
    cols = 1 if a.ndim == 1 else a.shape[1]
    if (a.ndim == 1 and k != 1) or cols != k:
        return INVALID
    if not _finite_in(a, dtype):
        return INVALID
    with np.errstate(all="ignore"):
        T = f.astype(dtype).astype(np.float64)
    if loss == "cross_entropy":
        if (T < 0).any():
            return INVALID
        err = np.abs(T.sum(axis=1) - 1.0).max() if T.size else 0.0
        if err > 1e-4:
            return INVALID
        if err > 1e-7:
            return combine(st_, EITHER)
    if loss == "binary_cross_entropy" and ((T < 0).any() or (T > 1).any()):
        return INVALID
    return st_


def loss_fits(loss, last_act):
    if loss == "cross_entropy":
        return last_act == "softmax"
    if loss == "binary_cross_entropy":
        return last_act == "sigmoid"
    return last_act != "softmax"


def describe(case):
    """A compact, readable description of a case for failure messages."""
    def arr(spec):
        if spec is None:
            return "None"
        g = spec.get("gen")
        b = spec["base"]
        shape = getattr(b, "shape", None)
        dt = getattr(b, "dtype", type(b).__name__)
        return f"<{dt} {shape} layout={spec['layout']} gen={g}>"
    parts = [f"op={case['op']}", f"model={case['model']}"]
    for key in ("loss", "kwargs", "opt", "compare", "container", "mutation", "with_opt"):
        if key in case:
            parts.append(f"{key}={case[key]!r}")
    for key in ("X", "y"):
        if key in case:
            parts.append(f"{key}={arr(case[key])}")
    if case.get("val"):
        parts.append(f"val=({arr(case['val'][0])}, {arr(case['val'][1])})")
    if "weights" in case:
        parts.append("weights=[" + ", ".join(arr(s) for s in case["weights"]) + "]")
    return "\n  ".join(parts)


def run_case(worker, case):
    out = worker.run(case)
    status = out["status"]
    if status in ("crashed", "hung"):
        raise WorkerCrashed(f"worker {status} ({out.get('signal') or out.get('returncode', '')})"
                            f" on case:\n  {describe(case)}\n--- worker stderr ---\n"
                            f"{out['stderr']}")
    if status == "error":
        raise AssertionError(f"harness/set-up error {out['exc']}: {out['msg']}\n{out['tb']}\n"
                             f"case:\n  {describe(case)}")
    return out


def check_exception(out, case, allowed):
    assert any(name in out["mro"] for name in allowed), (
        f"{case['op']} raised {out['exc']} ({out['msg']!r}); only {allowed} are documented"
        f"\ncase:\n  {describe(case)}")


def expect_outcome(out, case, expect, allowed_on_valid=()):
    """Invalid input must raise ValueError/TypeError; valid input must not (except the
    exceptions in ``allowed_on_valid``); EITHER may do anything documented."""
    bad_input = ("ValueError", "TypeError")
    if out["status"] == "raised":
        if expect == INVALID:
            check_exception(out, case, bad_input)
        elif expect == VALID:
            assert any(n in out["mro"] for n in allowed_on_valid), (
                f"{case['op']} rejected valid input: {out['exc']}: {out['msg']}"
                f"\ncase:\n  {describe(case)}")
        else:
            check_exception(out, case, bad_input + tuple(allowed_on_valid))
    else:
        assert expect != INVALID, (f"{case['op']} accepted invalid input silently"
                                   f"\ncase:\n  {describe(case)}")


# ---------------------------------------------------------------------------------------
# Parent side: strategies
# ---------------------------------------------------------------------------------------
def _weighted(good, bad, good_weight=6):
    return st.sampled_from(list(good) * good_weight + list(bad))


# Most cases are valid; a faulty case has exactly one thing wrong with it (so a missing
# check cannot hide behind another one that fires first).
GOOD_DTYPES = ["float32", "float64", "float32", "float64", "float16", "int64", "int32",
               "uint8", "bool"]
BAD_DTYPES = ["complex128", "str", "object"]


def fault_strategy(*faults, clean_weight=None):
    clean_weight = clean_weight or len(faults) * 2
    return st.sampled_from([None] * clean_weight + list(faults))


@st.composite
def array_desc(draw, shape, dtypes=None, scales=None, special=None, layouts=None):
    dtype = draw(st.sampled_from(dtypes or GOOD_DTYPES))
    scale = draw(st.sampled_from(scales or SCALES))
    if special is True:
        special = draw(st.sampled_from(SPECIALS[1:]))
    seed = draw(st.integers(0, 2 ** 16))
    layout = draw(st.sampled_from(layouts or LAYOUTS))
    gen = {"shape": tuple(shape), "dtype": dtype, "scale": scale, "special": special,
           "seed": seed}
    return {"base": make_array(**gen), "layout": layout, "gen": gen}


def spec_of(base, layout="C", gen=None):
    return {"base": base, "layout": layout, "gen": gen}


@st.composite
def model_desc(draw, last_act=None, max_depth=3):
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(1, 5)) for _ in range(depth + 1)]
    hidden = ["relu", "tanh", "sigmoid", "leaky_relu", "identity"]
    acts = [draw(st.sampled_from(hidden)) for _ in range(depth - 1)]
    acts.append(last_act if last_act is not None else
                draw(st.sampled_from(["identity", "softmax", "sigmoid", "tanh", "relu"])))
    return {"layers": [(widths[i], widths[i + 1], acts[i]) for i in range(depth)],
            "dtype": draw(st.sampled_from(["float32", "float64"])),
            "backend": draw(st.sampled_from(["cython", "numpy"])),
            "seed": draw(st.integers(0, 1000))}


@st.composite
def x_desc(draw, n_inputs, fault=None):
    """X for a model with ``n_inputs`` features; ``fault`` in (None, "shape", "dtype",
    "special") makes it wrong in that one way."""
    n = draw(st.integers(1, 9))
    shape = (n, n_inputs)
    if fault == "shape":
        shape = draw(st.sampled_from([(0, n_inputs), (n, n_inputs + 1), (n, n_inputs - 1),
                                      (n_inputs,), (n, n_inputs, 1), (), (0, 0)]))
    dtypes = BAD_DTYPES if fault == "dtype" else None
    return draw(array_desc(shape, dtypes=dtypes, special=fault == "special" or None))


def rows_of(spec):
    b = spec["base"]
    return b.shape[0] if isinstance(b, np.ndarray) and b.ndim >= 1 else 1


@st.composite
def y_desc(draw, loss, n, k, bad=False):
    """Targets for ``loss`` with ``n`` rows and ``k`` outputs; ``bad`` makes them wrong."""
    seed = draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    layout = draw(st.sampled_from(LAYOUTS))
    if loss == "mse":
        mode = draw(st.sampled_from(["len", "width", "1d", "3d", "none", "special", "dtype"]
                                    if bad else ["good"]))
        shape = {"len": (n + 1, k), "width": (n, k + 1), "1d": (n,),
                 "3d": (n, k, 1)}.get(mode, (n, k))
        if mode == "good" and k == 1 and draw(st.booleans()):
            shape = (n,)
        if mode == "none":
            return spec_of(None)
        return draw(array_desc(shape, dtypes=BAD_DTYPES if mode == "dtype" else None,
                               special=mode == "special" or None))
    labels = rng.integers(0, k, size=n)
    if loss == "cross_entropy":
        mode = draw(st.sampled_from(["bad_label", "bad_probs", "len", "width", "dtype"] if bad
                                    else ["labels", "labels", "onehot", "probs"]))
        gen = {"mode": mode, "seed": seed}
        if mode == "labels":
            dt = draw(st.sampled_from(["int64", "int32", "uint8", "int8", "float64", "float32",
                                       "bool", "object", "uint64"]))
            if dt == "bool":
                base = labels.astype(bool) if k >= 2 else np.zeros(n, bool)
            else:
                base = labels.astype(dt)
            gen["dtype"] = dt
        elif mode == "bad_label":
            bad_value = draw(st.sampled_from([k, -1, 0.5, float("nan"), float("inf"), 2 ** 63,
                                              k + 0.0, 1e30, -1e-9]))
            gen["bad"] = bad_value
            if bad_value == 2 ** 63:
                base = labels.astype(np.uint64)
                base[rng.integers(n)] = np.uint64(2 ** 63)
            else:
                base = labels.astype(np.float64 if isinstance(bad_value, float) else np.int64)
                base[rng.integers(n)] = bad_value
        elif mode == "onehot":
            dt = draw(st.sampled_from(["float32", "float64", "int64", "uint8", "bool",
                                       "float16"]))
            base = np.eye(k)[labels].astype(dt)
            gen["dtype"] = dt
        elif mode == "probs":
            dt = draw(st.sampled_from(["float64", "float32"]))
            base = rng.dirichlet(np.ones(k), size=n).astype(dt)
            gen["dtype"] = dt
        elif mode == "bad_probs":
            p = rng.dirichlet(np.ones(k), size=n)
            how = draw(st.sampled_from(["scale", "negative", "nan"]))
            gen["how"] = how
            if how == "scale":
                p = p * 0.9
            elif how == "negative":
                p[0] = 0.0
                if k > 1:
                    p[0, 0], p[0, -1] = 2.0, -1.0
                else:
                    p[0, 0] = -1.0
            else:
                p[0, 0] = np.nan
            base = p
        elif mode == "len":
            base = rng.integers(0, k, size=n + draw(st.sampled_from([1, -1])))
        elif mode == "dtype":
            base = labels.astype(draw(st.sampled_from(["complex128", "str"])))
        else:  # width
            base = np.eye(k + 1)[labels]
        return spec_of(base, layout, gen)
    # binary_cross_entropy
    mode = draw(st.sampled_from(["bad", "len", "width", "dtype"] if bad else ["good"]))
    gen = {"mode": mode, "seed": seed}
    shape = (n,) if k == 1 and draw(st.booleans()) else (n, k)
    dt = draw(st.sampled_from(["float32", "float64", "int64", "bool", "uint8", "float16"]))
    gen["dtype"] = dt
    if dt in ("float32", "float64", "float16"):
        base = rng.random(shape).astype(dt)
    else:
        base = (rng.random(shape) < 0.5).astype(dt)
    if mode == "bad":
        bad_value = draw(st.sampled_from([1.5, -0.5, float("nan"), float("inf"), 2.0, -1e-30]))
        gen["bad"] = bad_value
        base = base.astype(np.float64)
        base.flat[rng.integers(base.size)] = bad_value
    elif mode == "len":
        base = np.concatenate([base, base[:1]])
    elif mode == "width":
        base = np.concatenate([base.reshape(n, -1)] * 2, axis=1)
    elif mode == "dtype":
        base = base.astype(draw(st.sampled_from(["complex128", "str"])))
    return spec_of(base, layout, gen)


LOSS_LAST = {"mse": ["identity", "tanh", "relu", "sigmoid", "leaky_relu"],
             "cross_entropy": ["softmax"], "binary_cross_entropy": ["sigmoid"]}
MISMATCHED_LAST = {"mse": ["softmax"], "cross_entropy": ["identity", "sigmoid", "relu"],
                   "binary_cross_entropy": ["identity", "softmax", "tanh"]}
SUPERVISED_FAULTS = ("X-shape", "X-dtype", "X-special", "y", "loss-activation")


def supervised_status(case):
    """(expect, moderate) of a case with model, loss, X, y (and optional val)."""
    model = case["model"]
    n_in, k, last = model["layers"][0][0], model["layers"][-1][1], model["layers"][-1][2]
    dt, loss = model["dtype"], case["loss"]
    pairs = [(case["X"], case["y"])] + ([case["val"]] if case.get("val") else [])
    statuses = [VALID if loss_fits(loss, last) else INVALID]
    moderate = True
    for X, y in pairs:
        xs = x_status(X["base"], n_in, dt)
        statuses.append(xs)
        if xs != INVALID:
            statuses.append(y_status(loss, y["base"], rows_of(X), k, dt))
        moderate &= magnitude(X["base"]) <= MODERATE and magnitude(y["base"]) <= MODERATE
    expect = combine(*statuses)
    return expect, moderate and expect == VALID


@st.composite
def supervised_case(draw, op, fault=None):
    if fault is None:
        fault = draw(fault_strategy(*SUPERVISED_FAULTS))
    loss = draw(st.sampled_from(["mse", "cross_entropy", "binary_cross_entropy"]))
    last = draw(st.sampled_from((MISMATCHED_LAST if fault == "loss-activation" else
                                 LOSS_LAST)[loss]))
    model = draw(model_desc(last_act=last))
    n_in, k = model["layers"][0][0], model["layers"][-1][1]
    xfault = fault[2:] if fault and fault.startswith("X-") else None
    X = draw(x_desc(n_in, xfault))
    y = draw(y_desc(loss, rows_of(X), k, bad=fault == "y"))
    case = {"op": op, "model": model, "loss": loss, "X": X, "y": y, "fault": fault}
    expect, moderate = supervised_status(case)
    return case, expect, moderate


# ---------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------
BAD_INTS = [0, -1, 2.5, True, "3", None]


@st.composite
def fit_case(draw):
    fault = draw(fault_strategy(*SUPERVISED_FAULTS, "epochs", "batch_size", "accumulate",
                                "val", "split"))
    case, _, _ = draw(supervised_case("fit", fault=fault if fault in SUPERVISED_FAULTS
                                      else "none"))
    case["fault"] = fault
    ints = {"epochs": draw(st.sampled_from([1, 2, 3])),
            "batch_size": draw(st.sampled_from([None, 1, 2, 3, 4, 7, 32, 65])),
            "accumulate": draw(st.sampled_from([1, 1, 2, 3]))}
    if fault in ints:
        ints[fault] = draw(st.sampled_from(BAD_INTS[:-1] if fault == "batch_size"
                                           else BAD_INTS))
    drop_last = draw(st.sampled_from([False, False, False, True]))
    case["kwargs"] = dict(ints, shuffle=draw(st.booleans()),
                          seed=draw(st.sampled_from([None, 0, 7])), drop_last=drop_last)
    kind = draw(st.sampled_from(["sgd", "adam"]))
    lr = draw(_weighted([0.01, 0.1], [0.0, 1.0, 1e3, 1e30], 3))
    case["opt"] = (kind, lr, draw(st.sampled_from([0.0, 0.0, 0.9])))
    case["val"] = None
    if fault == "split":
        case["kwargs"]["validation_split"] = draw(st.sampled_from(
            [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.2", True, None]))
    elif draw(_weighted([False], [True], 6)):
        case["kwargs"]["validation_split"] = draw(st.sampled_from([0.25, 0.5, 0.9]))
    if fault == "val" or draw(_weighted([False], [True], 3)):
        model = case["model"]
        n_in, k = model["layers"][0][0], model["layers"][-1][1]
        vfault = draw(st.sampled_from(["X-shape", "X-dtype", "X-special", "y"])) \
            if fault == "val" else None
        Xv = draw(x_desc(n_in, vfault[2:] if vfault and vfault.startswith("X-") else None))
        yv = draw(y_desc(case["loss"], rows_of(Xv), k, bad=vfault == "y"))
        case["val"] = (Xv, yv)
    expect, moderate = supervised_status(case)
    for name, v in ints.items():
        if v is None and name == "batch_size":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            expect = INVALID
    n = rows_of(case["X"])
    bs = ints["batch_size"]
    bs_ok = isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1
    split = case["kwargs"].get("validation_split", 0.0)
    n_train = n - math.ceil(split * n) if isinstance(split, float) and 0 <= split < 1 else n
    if fault == "split":
        expect = INVALID
    elif split and (n_train < 1 or case["val"] is not None):
        expect = INVALID        # no training rows left, or both kinds of validation
    if drop_last and bs_ok and bs > n_train:
        expect = INVALID        # DESIGN §3: drop_last=True that leaves zero iterations
    return case, expect, moderate and expect == VALID


@fuzz(1000)
@given(fit_case())
def test_fuzz_fit(worker, data):
    case, expect, moderate = data
    out = run_case(worker, case)
    expect_outcome(out, case, expect, allowed_on_valid=("FloatingPointError",))
    if out["status"] == "raised":
        if "FloatingPointError" in out["mro"]:
            # DivergenceError: "the model keeps the last good step" -- finite weights
            assert out["weights_finite"], (
                "fit raised FloatingPointError but left non-finite weights in the model"
                f"\ncase:\n  {describe(case)}")
        else:
            assert out["weights_unchanged"], (
                f"fit rejected its input ({out['exc']}: {out['msg']}) after changing the "
                f"weights\ncase:\n  {describe(case)}")
        return
    # returned normally: everything it reports and leaves behind is finite
    assert out["losses_finite"], f"fit returned non-finite losses\ncase:\n  {describe(case)}"
    assert out["val_as_evaluate"], (
        f"the last val_loss is not evaluate's on the validation data\ncase:\n  {describe(case)}")
    assert out["weights_finite"], (
        "fit returned normally but left inf/NaN weights (an overflowing step must raise "
        f"DivergenceError)\ncase:\n  {describe(case)}")
    assert out["accuracy_ok"]
    kw = case["kwargs"]
    if expect == VALID:
        n = rows_of(case["X"])
        n -= math.ceil(kw.get("validation_split", 0.0) * n)
        bs = n if kw["batch_size"] is None else min(kw["batch_size"], n)
        ipe = n // bs if kw["drop_last"] else math.ceil(n / bs)
        assert out["epochs"] == kw["epochs"]
        assert out["iterations"] == out["n_batch_losses"] == kw["epochs"] * ipe, describe(case)
        assert out["steps"] == kw["epochs"] * math.ceil(ipe / kw["accumulate"]), describe(case)
        assert "loss" in out["history_keys"]
        if case["val"] is not None or kw.get("validation_split"):
            assert "val_loss" in out["history_keys"]


# ---------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------
@st.composite
def predict_case(draw):
    model = draw(model_desc())
    n_in = model["layers"][0][0]
    X = draw(x_desc(n_in, draw(fault_strategy("shape", "dtype", "special"))))
    expect = x_status(X["base"], n_in, model["dtype"])
    moderate = expect == VALID and magnitude(X["base"]) <= MODERATE
    case = {"op": "predict", "model": model, "X": X, "compare": expect == VALID}
    return case, expect, moderate


@fuzz(500)
@given(predict_case())
def test_fuzz_predict(worker, data):
    case, expect, moderate = data
    out = run_case(worker, case)
    expect_outcome(out, case, expect, allowed_on_valid=() if moderate else
                   ("FloatingPointError",))
    if out["status"] != "ok":
        return
    model = case["model"]
    n = rows_of(case["X"])
    assert out["type"] == "ndarray"
    if expect == VALID:
        assert out["shape"] == (n, model["layers"][-1][1]), describe(case)
        assert out["dtype"] == model["dtype"], describe(case)
        assert out["same_as_contiguous"], (
            f"predict on a {case['X']['layout']} array differs from the C-contiguous one"
            f"\ncase:\n  {describe(case)}")
    if moderate:
        assert out["finite"], f"predict returned inf/NaN for moderate input\n  {describe(case)}"
    if out["finite"]:
        assert out["range_ok"], f"output outside the activation's range\n  {describe(case)}"


# ---------------------------------------------------------------------------------------
# evaluate / compute_gradients
# ---------------------------------------------------------------------------------------
@fuzz(400)
@given(supervised_case("evaluate"))
def test_fuzz_evaluate(worker, data):
    case, expect, moderate = data
    out = run_case(worker, case)
    expect_outcome(out, case, expect, allowed_on_valid=() if moderate else
                   ("FloatingPointError",))
    if out["status"] != "ok":
        return
    assert out["loss_type"] == "float"
    if moderate:
        assert math.isfinite(out["loss"]), f"evaluate loss {out['loss']}\n  {describe(case)}"
        assert out["loss"] >= -1e-6, describe(case)
    if case["loss"] != "mse":
        assert "accuracy" in out["keys"]
        assert 0.0 <= out["accuracy"] <= 1.0, describe(case)


@fuzz(400)
@given(supervised_case("compute_gradients"))
def test_fuzz_compute_gradients(worker, data):
    case, expect, moderate = data
    out = run_case(worker, case)
    expect_outcome(out, case, expect, allowed_on_valid=() if moderate else
                   ("FloatingPointError",))
    if out["status"] == "raised":
        assert out["state_clean"], (f"a rejected compute_gradients left gradient sums "
                                    f"behind\ncase:\n  {describe(case)}")
        return
    assert out["grad_shapes_ok"]
    if expect == VALID:
        assert out["count"] == rows_of(case["X"])
    if moderate:
        assert math.isfinite(out["loss"]) and out["loss"] >= 0, describe(case)
        assert out["grads_finite"], f"non-finite gradients\ncase:\n  {describe(case)}"


# ---------------------------------------------------------------------------------------
# set_weights
# ---------------------------------------------------------------------------------------
@st.composite
def set_weights_case(draw):
    model = draw(model_desc())
    fault = draw(fault_strategy("count", "shape", "dtype", "special", "container"))
    shapes = [s for i, o, _ in model["layers"] for s in ((i, o), (o,))]
    if fault == "count":
        how = draw(st.sampled_from(["drop", "extra", "empty"]))
        shapes = {"drop": shapes[:-1], "extra": shapes + [shapes[-1]], "empty": []}[how]
    bad_index = draw(st.integers(0, max(0, len(shapes) - 1)))
    specs = []
    scales = [1.0, 1e-30, 1e-40, 10.0, 1e30, 1e300]
    for i, shp in enumerate(shapes):
        here = i == bad_index
        if fault == "shape" and here:
            how = draw(st.sampled_from(["T", "extra_dim", "flat", "scalar", "plus1"]))
            shp = {"T": shp[::-1], "extra_dim": shp + (1,), "flat": (int(np.prod(shp)),),
                   "scalar": (), "plus1": shp[:-1] + (shp[-1] + 1,)}[how]
        specs.append(draw(array_desc(
            shp, dtypes=BAD_DTYPES if fault == "dtype" and here else None, scales=scales,
            special=(fault == "special" and here) or None)))
    container = draw(st.sampled_from(["ndarray", "generator", "dict"]
                                     if fault == "container" else ["list", "tuple"]))
    true_shapes = [s for i, o, _ in model["layers"] for s in ((i, o), (o,))]
    if container in ("ndarray", "dict"):
        expect = INVALID
    elif container == "generator":
        expect = EITHER       # an iterable of arrays: rejecting or accepting both fine
    else:
        expect = VALID
    if len(specs) != len(true_shapes):
        expect = INVALID
    else:
        for spec, shp in zip(specs, true_shapes):
            b = spec["base"]
            s = array_kind_status(b)
            if s == INVALID or b.shape != shp or not _finite_in(b, model["dtype"]):
                expect = INVALID
            else:
                expect = combine(expect, s)
    moderate = expect == VALID and all(magnitude(s["base"]) <= 10 for s in specs)
    case = {"op": "set_weights", "model": model, "weights": specs, "container": container}
    return case, expect, moderate


@fuzz(400)
@given(set_weights_case())
def test_fuzz_set_weights(worker, data):
    case, expect, moderate = data
    out = run_case(worker, case)
    expect_outcome(out, case, expect)
    if out["status"] == "raised":
        assert out["unchanged"], (f"a rejected set_weights changed some weights (not "
                                  f"all-or-nothing)\ncase:\n  {describe(case)}")
        return
    assert out["weights_finite"], f"set_weights stored inf/NaN\ncase:\n  {describe(case)}"
    assert out["shapes_ok"] and out["dtypes_ok"], describe(case)
    if expect == VALID:
        assert out["roundtrip"], f"get_weights != what was set\ncase:\n  {describe(case)}"
    if moderate:
        assert out["predict_finite"], describe(case)


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------
_DIMS = [0, -1, 1, 2, 1.5, "3", None, True, 10 ** 12]
HEADER_EDITS = {
    # where in the JSON header -> values tried there (besides the generic ones)
    "format": ["keras", None, 1],
    "format_version": [0, 2, "1", None, 1.0, [1]],
    "model": [None, [], "x", {}],
    "model/dtype": ["float16", "float64", "int32", "complex64", None, 5, "x"],
    "model/backend": ["numpy", "cython", "torch", None, 5],
    "model/layers": [[], {}, 5, None, [{}], [[1, 2, "relu"]]],
    "model/layers/0": [None, 5, {}, {"in_features": 1, "units": 1}],
    "model/layers/0/in_features": _DIMS,
    "model/layers/0/units": _DIMS,
    "model/layers/1/in_features": _DIMS,
    "model/layers/0/activation": ["softmax", "sigmoid", "gelu", None, 5, ""],
    "model/layers/-1": [None],
    "loss": [0, None, [], "mse", "cross_entropy", "binary_cross_entropy", "hinge", "MSE"],
    "optimizer": [None, 5, "sgd", {}, {"name": "SGD"}, {"name": "Adam", "lr": -1}],
    "optimizer/name": ["Adam", "SGD", "RMSprop", None, 5],
    "optimizer/lr": [-1, float("nan"), float("inf"), "x", None, 1e300, [0.1]],
    "optimizer/momentum": [1.0, -1, 0.0, "x", None],
    "optimizer/betas": [[1, 2], [0.9], "x", None, [0.9, 0.999, 0.9]],
    "optimizer/bogus": [1],
    "optimizer_iterations": [-1, "x", [], 1.5, None, 10 ** 30, float("nan")],
    "nnfast_version": [None, 5, "99.0"],
}
GENERIC_VALUES = ["<delete>", None, 0, -1, "x", [], {}]


@st.composite
def load_case(draw):
    model = draw(model_desc())
    kind = draw(st.sampled_from(["none", "truncate", "flip", "flip", "garbage", "empty",
                                 "missing", "directory", "npy"] + ["header"] * 6 +
                                ["drop", "replace", "replace", "replace", "extra"]))
    arg = None
    if kind == "truncate":
        arg = draw(st.floats(0.0, 0.999))
    elif kind == "flip":
        arg = draw(st.lists(st.tuples(st.floats(0.0, 0.999), st.integers(1, 255)),
                            min_size=1, max_size=4))
    elif kind == "garbage":
        arg = draw(st.integers(0, 2 ** 16))
    elif kind == "header":
        where = draw(st.sampled_from(sorted(HEADER_EDITS)))
        arg = (where, draw(st.sampled_from(HEADER_EDITS[where] + GENERIC_VALUES)))
    elif kind == "drop":
        arg = draw(st.integers(0, 50))
    elif kind == "replace":
        arg = (draw(st.integers(0, 50)),
               draw(st.sampled_from(["T", "flat", "nan", "huge", "object", "str", "float16",
                                     "float64", "float32", "int64", "bool", "complex128"])))
    elif kind == "extra":
        arg = draw(st.sampled_from(["object", "zeros"]))
    with_opt = draw(st.sampled_from([None, None, "sgd", "adam"]))
    return {"op": "load", "model": model, "mutation": (kind, arg), "with_opt": with_opt}


@fuzz(600)
@given(load_case())
def test_fuzz_load(worker, case):
    out = run_case(worker, case)
    kind, arg = case["mutation"]
    if out["status"] == "raised":
        assert kind != "none", f"load of an untouched file failed: {out['msg']}\n" \
                               f"  {describe(case)}"
        if kind == "missing":
            check_exception(out, case, ("FileNotFoundError",))
        # DESIGN §3: ValueError for a file that is not a valid nnfast model, OSError for
        # one that cannot be read. Not TypeError/KeyError/MemoryError/...
        check_exception(out, case, ("ValueError", "OSError"))
        return
    assert kind not in ("missing", "directory", "empty", "garbage", "npy"), (
        f"load accepted a non-model file\n  {describe(case)}")
    assert out["type"] == "Sequential"
    assert out["weights_finite"], f"load produced inf/NaN weights\n  {describe(case)}"
    assert out["shapes_ok"] and out["dtypes_ok"], describe(case)
    assert out["opt_ok"] is True, f"loaded optimizer unusable: {out['opt_ok']}\n" \
                                  f"  {describe(case)}"
    if kind == "none":
        assert out["same_as_saved"], describe(case)
    if out["max_abs_w"] <= 1e3:
        assert out["predict_finite"], describe(case)


# ---------------------------------------------------------------------------------------
# sessions: many valid calls on one model (buffers reused, grown, shrunk)
# ---------------------------------------------------------------------------------------
@st.composite
def session_case(draw):
    loss = draw(st.sampled_from(["mse", "cross_entropy", "binary_cross_entropy"]))
    model = draw(model_desc(last_act=draw(st.sampled_from(LOSS_LAST[loss]))))
    steps = []
    for _ in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(["fit", "predict", "evaluate", "grad"]))
        n = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 40]))
        extra = {}
        if kind == "fit":
            extra = {"bs": draw(st.sampled_from([None, 1, 2, 3, 8, 64])),
                     "epochs": draw(st.integers(1, 2)), "acc": draw(st.integers(1, 3)),
                     "nv": draw(st.sampled_from([0, 0, 1, 7, 50]))}
        elif kind == "grad":
            extra = {"step": draw(st.booleans())}
        steps.append((kind, n, draw(st.integers(0, 10 ** 6)), extra))
    return {"op": "session", "model": model, "loss": loss, "steps": steps}


@fuzz(400)
@given(session_case())
def test_fuzz_session(worker, case):
    out = run_case(worker, case)
    if out["status"] == "raised":
        raise AssertionError(f"valid call sequence raised {out['exc']}: {out['msg']}\n"
                             f"  {describe(case)}\n  steps={case['steps']}")
    assert not out["problems"], f"{out['problems']}\n  {describe(case)}\n  steps={case['steps']}"


# ---------------------------------------------------------------------------------------
# The harness itself: a crash in the worker is caught and reported, then it restarts
# ---------------------------------------------------------------------------------------
def test_worker_reports_a_segfault_and_restarts(worker):
    case = {"op": "predict", "model": {"layers": [(2, 2, "identity")], "dtype": "float32",
                                       "backend": "numpy", "seed": 0},
            "X": spec_of(np.ones((2, 2), np.float32)), "compare": True}
    assert run_case(worker, case)["status"] == "ok"
    pid = worker.proc.pid
    with pytest.raises(WorkerCrashed, match="SIGSEGV") as info:
        run_case(worker, dict(case, op="crash"))
    assert "op=crash" in str(info.value)
    assert run_case(worker, case)["status"] == "ok"
    assert worker.proc.pid != pid


def test_worker_reports_a_hang_and_restarts():
    w = Worker(timeout=1.0)
    try:
        case = {"op": "sleep", "model": None, "seconds": 30}
        with pytest.raises(WorkerCrashed, match="hung"):
            run_case(w, case)
        assert run_case(w, dict(case, seconds=0))["status"] == "ok"
    finally:
        w.close()
