"""save / load (DESIGN §1 io.py, §3; issue 3 item 8).

One ``.npz`` with a JSON header and plain arrays, readable with ``allow_pickle=False``;
loaded models predict bit-identically; the optimizer state round-trips so training
continues exactly; bad files are ``ValueError``, missing ones ``FileNotFoundError``;
writes are atomic.
"""
import json
import os
import stat
import time

import numpy as np
import pytest

import nnfast as nf

BACKENDS = ["cython", "numpy"]


def make_data(n=120, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.4).astype(int)
    return X, y


def make_model(dtype="float64", backend="cython", seed=0):
    return nf.Sequential(nf.Dense(5, 12, activation="relu"),
                         nf.Dense(12, 7, activation="tanh"),
                         nf.Dense(7, 3, activation="softmax"),
                         dtype=dtype, seed=seed, backend=backend)


def trained_model(dtype="float64", backend="cython", opt=None):
    X, y = make_data()
    model = make_model(dtype=dtype, backend=backend)
    opt = opt if opt is not None else nf.SGD(lr=0.1, momentum=0.9)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16, seed=0)
    return model, opt


def assert_weights_equal(ws_a, ws_b):
    assert len(ws_a) == len(ws_b)
    for a, b in zip(ws_a, ws_b):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def json_headers(path):
    """Every array in the .npz that decodes to a JSON object, as (name, dict)."""
    found = []
    with np.load(path, allow_pickle=False) as data:
        for name in data.files:
            arr = data[name]
            if arr.dtype == np.uint8:
                text = arr.tobytes()
            elif arr.dtype.kind in "US" and arr.size == 1:
                text = arr.reshape(()).item()
            else:
                continue
            try:
                obj = json.loads(text)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(obj, dict):
                found.append((name, obj))
    return found


def flat_values(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from flat_values(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from flat_values(v)
    else:
        yield obj


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_roundtrip_predicts_bit_identically(tmp_path, backend, dtype):
    model, _ = trained_model(dtype=dtype, backend=backend)
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = nf.load(path)
    assert isinstance(loaded, nf.Sequential)
    assert loaded.backend == backend
    assert_weights_equal(loaded.get_weights(), model.get_weights())
    X = np.random.default_rng(9).standard_normal((257, 5))
    P = loaded.predict(X)
    assert P.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(P, model.predict(X))
    # also with a str path, and a backend override
    other = "numpy" if backend == "cython" else "cython"
    swapped = nf.load(str(path), backend=other)
    assert swapped.backend == other
    assert_weights_equal(swapped.get_weights(), model.get_weights())


def test_roundtrip_keeps_architecture(tmp_path):
    model = nf.Sequential(nf.Dense(3, 4, activation="leaky_relu"),
                          nf.Dense(4, 5, activation="sigmoid"),
                          nf.Dense(5, 2), dtype="float32", seed=1)
    path = tmp_path / "arch.npz"
    nf.save(model, path)
    loaded = nf.load(path)
    assert [(l.in_features, l.units, l.activation) for l in loaded.layers] == \
        [(l.in_features, l.units, l.activation) for l in model.layers]
    assert loaded.dtype == np.float32
    X = np.random.default_rng(0).standard_normal((10, 3)) * 5
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_file_is_plain_npz_with_json_header(tmp_path):
    model, _ = trained_model(dtype="float32")
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}   # no pickle needed
    assert all(a.dtype != object for a in arrays.values())
    headers = json_headers(path)
    assert len(headers) == 1, f"expected one JSON header, found {[n for n, _ in headers]}"
    _, header = headers[0]
    values = list(flat_values(header))
    assert "float32" in values                                    # dtype
    assert any("version" in str(k) for k in values)               # a version field
    assert {"relu", "tanh", "softmax"} <= set(values)             # architecture
    assert {5, 12, 7, 3} <= {v for v in values if isinstance(v, int)}
    # the parameters are stored as plain arrays (every weight is in the file)
    stored = [a for n, a in arrays.items() if n != headers[0][0]]
    for w in model.get_weights():
        assert any(a.shape == w.shape and np.array_equal(a, w) for a in stored)


# --------------------------------------------------------------------------- optimizer state
OPTIMIZERS = {
    "sgd_momentum": lambda: nf.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda: nf.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-3),
    "adamw": lambda: nf.Adam(lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_roundtrip(tmp_path, opt_name):
    model, opt = trained_model(opt=OPTIMIZERS[opt_name]())
    path = tmp_path / "with_opt.npz"
    model.save(path, optimizer=opt)
    result = nf.load(path, with_optimizer=True)
    assert isinstance(result, tuple) and len(result) == 2
    loaded, opt2 = result
    assert type(opt2) is type(opt)
    assert_weights_equal(loaded.get_weights(), model.get_weights())
    if isinstance(opt, nf.SGD):
        assert (opt2.lr, opt2.momentum, opt2.nesterov, opt2.weight_decay) == \
            (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay)
    else:
        assert (opt2.lr, tuple(opt2.betas), opt2.eps, opt2.weight_decay,
                opt2.decoupled_weight_decay) == \
            (opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay, opt.decoupled_weight_decay)
    # without with_optimizer, just the model
    assert isinstance(nf.load(path), nf.Sequential)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_continuing_from_loaded_state_equals_uninterrupted(tmp_path, backend, opt_name, dtype):
    X, y = make_data(n=150)
    kw = dict(loss="cross_entropy", epochs=2, batch_size=16, shuffle=True)
    # uninterrupted: two fits with one optimizer
    a = make_model(dtype=dtype, backend=backend)
    opt_a = OPTIMIZERS[opt_name]()
    a.fit(X, y, optimizer=opt_a, seed=1, **kw)
    a.fit(X, y, optimizer=opt_a, seed=2, **kw)
    # interrupted: save after the first fit, load model + optimizer, go on
    b = make_model(dtype=dtype, backend=backend)
    opt_b = OPTIMIZERS[opt_name]()
    b.fit(X, y, optimizer=opt_b, seed=1, **kw)
    path = tmp_path / "ckpt.npz"
    b.save(path, optimizer=opt_b)
    del b, opt_b
    c, opt_c = nf.load(path, with_optimizer=True)
    c.fit(X, y, optimizer=opt_c, seed=2, **kw)
    assert_weights_equal(c.get_weights(), a.get_weights())
    # and the low-level loop continues identically too
    for model, opt in ((a, opt_a), (c, opt_c)):
        model.compute_gradients(X[:40], y[:40], loss="cross_entropy")
        opt.step(model)
    assert_weights_equal(c.get_weights(), a.get_weights())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_fresh_optimizer_after_load_differs(tmp_path, opt_name):
    # the state matters: a fresh optimizer does not reproduce the uninterrupted run
    X, y = make_data(n=150)
    kw = dict(loss="cross_entropy", epochs=2, batch_size=16, shuffle=True)
    a = make_model()
    opt_a = OPTIMIZERS[opt_name]()
    a.fit(X, y, optimizer=opt_a, seed=1, **kw)
    path = tmp_path / "ckpt.npz"
    a.save(path, optimizer=opt_a)
    a.fit(X, y, optimizer=opt_a, seed=2, **kw)
    c = nf.load(path)
    c.fit(X, y, optimizer=OPTIMIZERS[opt_name](), seed=2, **kw)
    assert not np.allclose(c.get_weights()[0], a.get_weights()[0], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- bad files
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        nf.load(tmp_path / "nope.npz")


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(ValueError):
        nf.load(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError):
        nf.load(path)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_file(tmp_path, fraction):
    model, opt = trained_model()
    good = tmp_path / "good.npz"
    model.save(good, optimizer=opt)
    data = good.read_bytes()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ValueError):
        nf.load(bad)


def test_npz_with_object_array(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, header=np.array([{"format": "nnfast-model"}], dtype=object),
             stuff=np.array([1, "a", None], dtype=object))
    with pytest.raises(ValueError):
        nf.load(path)


def test_npz_with_object_array_beside_valid_content(tmp_path):
    model, _ = trained_model()
    good = tmp_path / "good.npz"
    model.save(good)
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["evil"] = np.array([object()], dtype=object)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError):
        nf.load(bad)


def test_npz_without_header(tmp_path):
    model, _ = trained_model()
    path = tmp_path / "noheader.npz"
    np.savez(path, *model.get_weights())
    with pytest.raises(ValueError):
        nf.load(path)
    # the file's own arrays minus the JSON header
    good = tmp_path / "good.npz"
    model.save(good)
    (hname, _), = json_headers(good)
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name != hname}
    stripped = tmp_path / "stripped.npz"
    np.savez(stripped, **arrays)
    with pytest.raises(ValueError):
        nf.load(stripped)


def test_npz_with_foreign_or_corrupt_header(tmp_path):
    model, _ = trained_model()
    good = tmp_path / "good.npz"
    model.save(good)
    (hname, header), = json_headers(good)
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    # a JSON header that is not an nnfast one
    foreign = dict(arrays)
    foreign[hname] = np.frombuffer(json.dumps({"hello": "world"}).encode(), dtype=np.uint8) \
        if arrays[hname].dtype == np.uint8 else np.array(json.dumps({"hello": "world"}))
    np.savez(tmp_path / "foreign.npz", **foreign)
    with pytest.raises(ValueError):
        nf.load(tmp_path / "foreign.npz")
    # a header that is not JSON at all
    corrupt = dict(arrays)
    corrupt[hname] = np.frombuffer(b"\xff\xfe{not json", dtype=np.uint8) \
        if arrays[hname].dtype == np.uint8 else np.array("{not json")
    np.savez(tmp_path / "corrupt.npz", **corrupt)
    with pytest.raises(ValueError):
        nf.load(tmp_path / "corrupt.npz")


def test_npz_with_wrong_parameter_shape(tmp_path):
    model, _ = trained_model()
    good = tmp_path / "good.npz"
    model.save(good)
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    # transpose the (5, 12) weight matrix: same size, wrong shape
    (name,) = [n for n, a in arrays.items() if a.shape == (5, 12)]
    arrays[name] = np.ascontiguousarray(arrays[name].T)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError):
        nf.load(tmp_path / "bad.npz")
    # and a NaN parameter
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays[name] = arrays[name].copy()
    arrays[name][0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ValueError):
        nf.load(tmp_path / "nan.npz")


# --------------------------------------------------------------------------- atomic writes
def test_save_leaves_no_temporary_files(tmp_path):
    model, opt = trained_model()
    path = tmp_path / "m.npz"
    model.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    # overwriting replaces the file, still nothing else in the folder
    model2, opt2 = trained_model(opt=nf.Adam(lr=0.02))
    model2.save(path, optimizer=opt2)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    assert_weights_equal(nf.load(path).get_weights(), model2.get_weights())
    nf.save(model, tmp_path / "other.npz")
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "other.npz"]


def test_failed_save_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    old, _ = trained_model()
    path = tmp_path / "m.npz"
    old.save(path)
    before = path.read_bytes()

    new = make_model(seed=5)

    def broken_write_array(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    # np.savez / np.savez_compressed write each member with numpy.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", broken_write_array)
    with pytest.raises(RuntimeError, match="simulated crash"):
        new.save(path)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    assert path.read_bytes() == before
    assert_weights_equal(nf.load(path).get_weights(), old.get_weights())


def test_save_onto_a_directory_fails_cleanly(tmp_path):
    model, _ = trained_model()
    target = tmp_path / "m.npz"
    target.mkdir()
    with pytest.raises(OSError):
        model.save(target)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    assert target.is_dir() and os.listdir(target) == []


# --------------------------------------------------------------------------- permissions, leftovers
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and signals")


@posix_only
def test_saved_files_get_the_usual_permissions(tmp_path):
    """A new file gets 0o666 less the umask, like any file the user creates (not the
    0o600 of a mkstemp temporary); an existing file keeps its own mode."""
    model, _ = trained_model()
    old_umask = os.umask(0o027)
    try:
        model.save(tmp_path / "new.npz")
        assert stat.S_IMODE(os.stat(tmp_path / "new.npz").st_mode) == 0o640
        os.umask(0o022)
        model.save(tmp_path / "other.npz")
        assert stat.S_IMODE(os.stat(tmp_path / "other.npz").st_mode) == 0o644
        os.chmod(tmp_path / "other.npz", 0o600)
        model.save(tmp_path / "other.npz")
        assert stat.S_IMODE(os.stat(tmp_path / "other.npz").st_mode) == 0o600
        model.fit(*make_data(), loss="cross_entropy", epochs=1, checkpoint=tmp_path / "c.npz")
        assert stat.S_IMODE(os.stat(tmp_path / "c.npz").st_mode) == 0o644
    finally:
        os.umask(old_umask)


def _dead_pid():
    import subprocess
    import sys
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@posix_only
def test_next_save_removes_what_killed_writers_left(tmp_path):
    from nnfast import io as nio
    model, _ = trained_model()
    host, day = nio._host(), 86400
    stale = {
        "dead here": f".nnfast~m.npz~{host}~{_dead_pid()}~0badc0de.tmp",
        "old, other host": f".nnfast~m.npz~elsewhere~{os.getpid()}~00000001.tmp",
    }
    kept = {
        "alive here": f".nnfast~m.npz~{host}~{os.getppid()}~00000002.tmp",
        "this process": f".nnfast~m.npz~{host}~{os.getpid()}~00000003.tmp",
        "recent, other host": f".nnfast~m.npz~elsewhere~{_dead_pid()}~00000004.tmp",
        "another target": f".nnfast~n.npz~{host}~{_dead_pid()}~00000005.tmp",
        "not ours": f".nnfast~m.npz~{host}~notapid~00000006.tmp",
        "user file": "m.npz.tmp",
    }
    for name in list(stale.values()) + list(kept.values()):
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - 2 * day
    os.utime(tmp_path / stale["old, other host"], (old, old))
    model.save(tmp_path / "m.npz")
    left = set(os.listdir(tmp_path))
    assert left == {"m.npz"} | set(kept.values())
    assert_weights_equal(nf.load(tmp_path / "m.npz").get_weights(), model.get_weights())


@posix_only
def test_writer_killed_mid_write_leaves_old_file_and_next_save_cleans_up(tmp_path):
    """SIGKILL while the temporary file is being written: the target is the old model,
    whole; a temporary is left; the next save (another process) removes it."""
    import signal
    import subprocess
    import sys
    model, _ = trained_model()
    path = tmp_path / "m.npz"
    model.save(path)
    before = path.read_bytes()
    script = (
        "import sys, time, numpy as np, nnfast as nf\n"
        "def stall(*a, **k):\n"
        "    print('writing', flush=True); time.sleep(60)\n"
        "np.lib.format.write_array = stall\n"
        "m = nf.Sequential(nf.Dense(4, 3, activation='softmax'), seed=1, backend='numpy')\n"
        "m.save(sys.argv[1])\n")
    # run from tmp_path: from the repository root the child would import the unbuilt
    # source tree instead of the installed package
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=tmp_path,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temporaries = [n for n in os.listdir(tmp_path) if n.startswith(".nnfast~m.npz~")]
        assert len(temporaries) == 1
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert path.read_bytes() == before
    assert (tmp_path / temporaries[0]).exists()
    model.save(path)
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


# --------------------------------------------------------------------------- pickle and copy
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_model_and_optimizer_survive_pickle_and_deepcopy(opt_name, how):
    """A trained model with its optimizer, pickled (or deep-copied) together, goes on
    training exactly as the original does; the copies' arrays are back on cache lines,
    where the kernels split them across threads."""
    import copy
    import pickle
    opt = nf.SGD(lr=0.1, momentum=0.9) if opt_name == "momentum" else nf.Adam(lr=0.01)
    model, opt = trained_model(opt=opt)
    if how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        model2, opt2 = copy.deepcopy((model, opt))
    for layer in model2.layers:
        for arr in (layer.W, layer.b, layer.dW, layer.db):
            assert arr.ctypes.data % 64 == 0 and arr.flags.c_contiguous
    for _, arr in opt2.state_arrays():
        assert arr.ctypes.data % 64 == 0
    assert opt2.iterations == opt.iterations
    X, y = make_data(seed=3)
    for m, o in ((model, opt), (model2, opt2)):
        m.fit(X, y, loss="cross_entropy", optimizer=o, epochs=2, batch_size=16, seed=1)
    assert_weights_equal(model2.get_weights(), model.get_weights())
    for (na, a), (nb, b) in zip(opt.state_arrays(), opt2.state_arrays()):
        assert na == nb
        np.testing.assert_array_equal(a, b)


def test_copied_optimizer_state_must_fit_the_model_it_steps():
    import copy
    model, opt = trained_model()
    other = nf.Sequential(nf.Dense(5, 4, activation="relu"), nf.Dense(4, 3, activation="softmax"),
                          dtype="float64", seed=0)
    before = other.get_weights()
    with pytest.raises(ValueError, match="does not fit this model"):
        other.fit(*make_data(), loss="cross_entropy", optimizer=copy.deepcopy(opt), epochs=1)
    assert_weights_equal(other.get_weights(), before)
    # a fresh or plain-SGD optimizer has no shaped state: it binds anywhere
    other.fit(*make_data(), loss="cross_entropy", optimizer=copy.deepcopy(nf.SGD(lr=0.1)),
              epochs=1)


def test_shallow_copy_keeps_the_live_arrays():
    """copy.copy shares the layers; their arrays (which a live plan points at) must not be
    swapped for copies, or the original would train arrays nobody reads."""
    import copy
    model, opt = trained_model()
    ids = [id(a) for layer in model.layers for a in (layer.W, layer.b, layer.dW, layer.db)]
    copy.copy(model)
    assert [id(a) for layer in model.layers for a in (layer.W, layer.b, layer.dW, layer.db)] == ids
    model.fit(*make_data(), loss="cross_entropy", optimizer=opt, epochs=1)


@pytest.mark.parametrize("stem", ["m" * 236, "模型" * 39])
def test_save_under_a_name_near_the_length_limit(tmp_path, stem):
    """A 240-byte file name (one-byte or three-byte characters): the temporary's name
    (target, host, pid, random) must still fit in 255 bytes, and the leftovers of such a
    target are still found."""
    model, _ = trained_model()
    name = stem + ".npz"
    assert 230 <= len(name.encode()) <= 255
    model.save(tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == [name]
    assert_weights_equal(nf.load(tmp_path / name).get_weights(), model.get_weights())
    if os.name == "posix":
        from nnfast import io as nio
        stale = f".nnfast~{nio._tmp_target(name)}~{nio._host()}~{_dead_pid()}~0000000a.tmp"
        (tmp_path / stale).write_bytes(b"partial")
        model.save(tmp_path / name)
        assert sorted(os.listdir(tmp_path)) == [name]
