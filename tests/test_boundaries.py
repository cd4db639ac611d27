"""Inputs a fuzzing pass over the public API found slipping past the checks (2026-12-03):
each once gave a silently wrong result, a wrong exception type or a half-changed state.

* a Dense layer taken into a second model while the first lives (the second model
  re-initialised the arrays the first one's compiled plan kept training);
* thread counts beyond a C int; optimizer state of the wrong dtype or out of its range;
* save's argument types, bytes and empty paths; the epoch-arithmetic helpers' arguments;
* non-bool flags silently read as True; a fit nested inside a callback of a fit;
* ModelCheckpoint paths that only failed after the first epoch.

A third pass (2026-12-04): the low-level loop called from a callback inside fit, string
widths in a model file's header, masked entries, empty command-line paths and bench
output folders found missing only after the run.
"""
import copy
import gc
import json
import zipfile

import numpy as np
import pytest

import nnfast as nf

BACKENDS = ["cython", "numpy"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4)).astype(np.float32)
    return X, np.arange(50) % 3


def layers():
    return nf.Dense(4, 8, activation="relu"), nf.Dense(8, 3, activation="softmax")


# --- layers belong to one model -----------------------------------------------------------
def test_layer_of_a_live_model_is_refused(backend, data):
    X, y = data
    d1, d2 = layers()
    a = nf.Sequential(d1, d2, seed=0, backend=backend)
    a.fit(X, y, loss="cross_entropy", seed=0)
    before = a.get_weights()
    with pytest.raises(ValueError, match=r"layers\[0\] already belongs to another model"):
        nf.Sequential(d1, d2, seed=1, backend=backend)
    with pytest.raises(ValueError, match=r"layers\[1\] already belongs"):
        nf.Sequential(nf.Dense(4, 8, activation="relu"), d2, backend=backend)
    # the refused constructor left the first model alone, and it still trains what it shows
    for w, v in zip(before, a.get_weights()):
        np.testing.assert_array_equal(w, v)
    a.fit(X, y, optimizer=nf.SGD(0.5), epochs=3, seed=0)
    W0, b0, W1, b1 = a.get_weights()
    assert any(not np.array_equal(w, v) for w, v in zip(before, (W0, b0, W1, b1)))
    z = np.maximum(X @ W0 + b0, 0) @ W1 + b1           # what the visible weights predict
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(a.predict(X), p / p.sum(axis=1, keepdims=True), rtol=1e-4,
                               atol=1e-6)


def test_layers_are_free_again_once_their_models_are_gone(backend, data):
    X, y = data
    d1, d2 = layers()
    a = nf.Sequential(d1, d2, seed=0, backend=backend)
    shallow = copy.copy(a)          # shares the layers
    del a
    gc.collect()
    with pytest.raises(ValueError, match="already belongs"):
        nf.Sequential(d1, d2, backend=backend)
    del shallow
    gc.collect()
    m = nf.Sequential(d1, d2, seed=1, backend=backend)
    m.fit(X, y, loss="cross_entropy", seed=0)
    assert m.layers[0] is d1


def test_copies_own_their_layers(backend, data):
    X, y = data
    a = nf.Sequential(*layers(), seed=0, backend=backend)
    a.fit(X, y, loss="cross_entropy", seed=0)
    b = copy.deepcopy(a)
    with pytest.raises(ValueError, match="already belongs"):
        nf.Sequential(*b.layers, backend=backend)
    b.fit(X, y, seed=0)                        # each copy trains its own arrays
    a.fit(X, y, seed=0)
    for w, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(w, v)


# --- thread count -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2 ** 31, 2 ** 40, nf._threads.MAX_THREADS + 1])
def test_thread_count_beyond_the_limit(n):
    old = nf.get_num_threads()
    with pytest.raises(ValueError, match="n must be at most"):
        nf.set_num_threads(n)
    assert nf.get_num_threads() == old


# --- optimizer state ----------------------------------------------------------------------
def test_optimizer_state_of_another_dtype_is_refused(backend, data):
    X, y = data
    T = np.eye(3, dtype=np.float32)[y]
    opt = nf.SGD(0.1, momentum=0.9)
    nf.Sequential(nf.Dense(4, 3), seed=0, backend=backend).fit(X, T, loss="mse", optimizer=opt)
    m64 = nf.Sequential(nf.Dense(4, 3), dtype="float64", seed=0, backend=backend)
    before = m64.get_weights()
    with pytest.raises(ValueError, match="float32 state, which does not fit this float64"):
        m64.fit(X, T, loss="mse", optimizer=copy.deepcopy(opt))
    m64.compute_gradients(X, T, "mse")
    with pytest.raises(ValueError, match="float32 state"):
        copy.deepcopy(opt).step(m64)
    for w, v in zip(before, m64.get_weights()):
        np.testing.assert_array_equal(w, v)


def rewrite(path, out, header_change=None, arrays_change=None):
    """Copy the nnfast file ``path`` to ``out`` with its header and arrays changed."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(arrays["header"].tobytes().decode())
    if header_change:
        header_change(header)
    if arrays_change:
        arrays_change(arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(out, **arrays)
    return out


@pytest.fixture
def adam_file(tmp_path, data):
    X, y = data
    m = nf.Sequential(*layers(), seed=0)
    opt = nf.Adam(1e-2)
    m.fit(X, y, loss="cross_entropy", optimizer=opt, seed=0)
    path = tmp_path / "m.npz"
    m.save(path, optimizer=opt)
    assert nf.load(path, with_optimizer=True)[1].iterations == opt.iterations
    return path


def test_load_refuses_iterations_beyond_a_c_long(adam_file, tmp_path):
    bad = rewrite(adam_file, tmp_path / "bad.npz",
                  header_change=lambda h: h.update(optimizer_iterations=10 ** 30))
    with pytest.raises(ValueError, match="invalid optimizer state.*iterations"):
        nf.load(bad, with_optimizer=True)


def test_load_refuses_state_of_another_dtype(adam_file, tmp_path):
    def widen(arrays):
        arrays["opt.0.exp_avg"] = np.full(arrays["opt.0.exp_avg"].shape, 1e300)
    bad = rewrite(adam_file, tmp_path / "bad.npz", arrays_change=widen)
    with pytest.raises(ValueError, match="has dtype float64, expected float32"):
        nf.load(bad, with_optimizer=True)


def test_load_refuses_a_negative_mean_of_squares(adam_file, tmp_path):
    def negate(arrays):
        arrays["opt.1.exp_avg_sq"] = -np.abs(arrays["opt.1.exp_avg_sq"]) - 1
    bad = rewrite(adam_file, tmp_path / "bad.npz", arrays_change=negate)
    with pytest.raises(ValueError, match="exp_avg_sq.*must be >= 0"):
        nf.load(bad, with_optimizer=True)
    nf.load(adam_file, with_optimizer=True)   # the untouched file still loads


# --- save's arguments ---------------------------------------------------------------------
def test_save_takes_bytes_paths(tmp_path, data):
    X, y = data
    m = nf.Sequential(*layers(), seed=0)
    m.fit(X, y, loss="cross_entropy", seed=0)
    path = bytes(tmp_path / "m.npz")
    m.save(path)
    for w, v in zip(m.get_weights(), nf.load(path).get_weights()):
        np.testing.assert_array_equal(w, v)
    assert zipfile.is_zipfile(path.decode())


def test_save_argument_types(tmp_path):
    m = nf.Sequential(*layers(), seed=0)
    with pytest.raises(TypeError, match="model must be an nnfast Sequential"):
        nf.save(object(), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="optimizer must be an nnfast Optimizer"):
        m.save(tmp_path / "x.npz", optimizer="adam")
    with pytest.raises(ValueError, match="path must not be empty"):
        m.save("")
    assert list(tmp_path.iterdir()) == []


# --- epoch arithmetic and flags -----------------------------------------------------------
@pytest.mark.parametrize("n", [0, -5, 10.5, "10", None, True])
def test_epoch_helpers_check_n_samples(n):
    for call in (lambda: nf.iterations_per_epoch(n, 3), lambda: nf.iterations_per_epoch(n, None),
                 lambda: nf.steps_per_epoch(n, 3, 2)):
        with pytest.raises((ValueError, TypeError), match="n_samples"):
            call()


def test_epoch_helpers_still_count():
    assert nf.iterations_per_epoch(100, 32) == 4
    assert nf.iterations_per_epoch(100, 32, drop_last=True) == 3
    assert nf.iterations_per_epoch(100, None) == 1
    assert nf.steps_per_epoch(100, 8, 3) == 5


@pytest.mark.parametrize("make", [
    lambda v: nf.Adam(decoupled_weight_decay=v),
    lambda v: nf.EarlyStopping(restore_best_weights=v),
    lambda v: nf.ModelCheckpoint("m.npz", save_best_only=v),
    lambda v: list(nf.batches(np.zeros((4, 2)), shuffle=v)),
    lambda v: list(nf.batches(np.zeros((4, 2)), drop_last=v)),
    lambda v: nf.iterations_per_epoch(10, 3, drop_last=v),
], ids=["adam", "early_stopping", "checkpoint", "batches_shuffle", "batches_drop_last",
        "iterations_drop_last"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bools(make, value):
    with pytest.raises(TypeError, match="must be True or False"):
        make(value)


def test_flags_accept_numpy_bools():
    assert nf.Adam(decoupled_weight_decay=np.bool_(True)).decoupled_weight_decay is True
    assert nf.EarlyStopping(patience=np.int64(2)).patience == 2


@pytest.mark.parametrize("seed", [-1, 1.5, "3"])
def test_batches_seed_is_named(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        list(nf.batches(np.zeros((4, 2)), seed=seed))


def test_sklearn_shuffle_must_be_a_bool(data):
    pytest.importorskip("sklearn")
    from nnfast.sklearn import NNClassifier
    X, y = data
    with pytest.raises(TypeError, match="shuffle"):
        NNClassifier(shuffle="no").fit(X, y)


# --- fit inside fit; fit's small messages -------------------------------------------------
def test_fit_inside_a_callback_of_fit_is_refused(backend, data):
    X, y = data
    model = nf.Sequential(*layers(), seed=0, backend=backend)
    errors = []

    class Nested(nf.Callback):
        def on_epoch_end(self, epoch, logs):
            try:
                model.fit(X, y, epochs=1)
            except RuntimeError as exc:
                errors.append(str(exc))
            model.predict(X[:2])            # re-entrant reads stay allowed

    history = model.fit(X, y, loss="cross_entropy", batch_size=5, epochs=2, seed=0,
                        callbacks=[Nested()])
    assert len(errors) == 2 and "inside fit already" in errors[0]
    assert history.steps == 20 and model.history is history
    model.fit(X, y, epochs=1)               # and after it, fit works again


def test_validation_rows_mismatch_names_validation_x(data):
    X, y = data
    m = nf.Sequential(*layers(), seed=0)
    with pytest.raises(ValueError, match=r"validation_data\[1\] has 3 rows but "
                                         r"validation_data\[0\] has 5"):
        m.fit(X, y, loss="cross_entropy", validation_data=(X[:5], y[:3]))


def test_negative_verbose_is_a_value_error(data):
    X, y = data
    m = nf.Sequential(*layers(), seed=0)
    with pytest.raises(ValueError, match="verbose"):
        m.fit(X, y, loss="cross_entropy", verbose=-1)


@pytest.mark.parametrize("path", ["m{.npz", "m{}.npz", "m{epoch:zz}.npz", "m{loss:d}.npz",
                                  "m}{epoch}.npz"])
def test_checkpoint_path_format_checked_up_front(path, tmp_path):
    with pytest.raises(ValueError, match="not a valid format string"):
        nf.ModelCheckpoint(str(tmp_path / path))


def test_checkpoint_path_formats_that_work(tmp_path, data):
    X, y = data
    path = tmp_path / "m-{epoch:02d}-{loss:.3f}.npz"
    cb = nf.ModelCheckpoint(bytes(path), monitor="loss")
    m = nf.Sequential(*layers(), seed=0)
    m.fit(X, y, loss="cross_entropy", epochs=2, callbacks=[cb], seed=0)
    assert sorted(p.name[:4] for p in tmp_path.iterdir()) == ["m-01", "m-02"]


# --- second fuzzing pass ------------------------------------------------------------------
def test_a_shallow_copy_shares_the_guard(backend, data):
    X, y = data
    model = nf.Sequential(*layers(), seed=0, backend=backend)
    shallow = copy.copy(model)            # shares the layers' arrays
    assert shallow._guard is model._guard
    assert copy.deepcopy(model)._guard is not model._guard
    errors = []

    class Nested(nf.Callback):
        def on_batch_end(self, iteration, logs):
            try:
                shallow.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(0.0), shuffle=False)
            except RuntimeError as exc:
                errors.append(str(exc))

    alone = copy.deepcopy(model)
    args = dict(loss="cross_entropy", batch_size=16, accumulate=2, shuffle=False, epochs=1)
    model.fit(X, y, optimizer=nf.SGD(0.1), callbacks=[Nested()], **args)
    alone.fit(X, y, optimizer=nf.SGD(0.1), **args)
    assert errors and "inside fit already" in errors[0]
    for w, v in zip(model.get_weights(), alone.get_weights()):   # the outer step untouched
        np.testing.assert_array_equal(w, v)


@pytest.mark.parametrize("batch_size, accumulate", [(2 ** 63, 1), (2 ** 70, 1), (8, 2 ** 31),
                                                    (8, 2 ** 63)])
def test_huge_batch_size_and_accumulate_mean_all(backend, data, batch_size, accumulate):
    X, y = data
    a = nf.Sequential(*layers(), seed=0, backend=backend)
    b = copy.deepcopy(a)
    h = a.fit(X, y, loss="cross_entropy", batch_size=batch_size, accumulate=accumulate,
              epochs=2, seed=0)
    n_iters = nf.iterations_per_epoch(50, batch_size)
    b.fit(X, y, loss="cross_entropy", batch_size=min(batch_size, 50), accumulate=n_iters,
          epochs=2, seed=0)
    assert h.steps == 2
    for w, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(w, v)


def test_save_refuses_another_models_optimizer(tmp_path, data):
    X, y = data
    other = nf.Sequential(nf.Dense(4, 16, activation="relu"), nf.Dense(16, 3,
                          activation="softmax"), seed=0)
    opt = nf.SGD(0.1, momentum=0.9)
    other.fit(X, y, loss="cross_entropy", optimizer=opt)
    m = nf.Sequential(*layers(), seed=0)
    with pytest.raises(ValueError, match="state of another model"):
        nf.save(m, tmp_path / "x.npz", optimizer=opt)
    with pytest.raises(ValueError, match="state of another model"):
        m.fit(X, y, loss="cross_entropy", callbacks=[nf.ModelCheckpoint(
            str(tmp_path / "c.npz"), monitor="loss", optimizer=opt)])
    assert list(tmp_path.iterdir()) == []
    nf.save(other, tmp_path / "x.npz", optimizer=opt)      # its own model is fine


def test_more_flags_must_be_bools(data):
    X, y = data
    from nnfast.datasets import train_test_split
    for value in ("no", 1):
        with pytest.raises(TypeError, match="stratify must be True or False"):
            train_test_split(X, y, stratify=value)
    with pytest.raises(ValueError, match="seed"):
        train_test_split(X, y, seed=-1)
    pytest.importorskip("sklearn")
    from nnfast.sklearn import NNClassifier
    with pytest.raises(TypeError, match="early_stopping"):
        NNClassifier(early_stopping="no", epochs=1).fit(X, y)


def test_cli_refuses_to_overwrite_its_data(tmp_path, capsys):
    from nnfast import cli
    data = tmp_path / "d.npz"
    np.savez(data, X=np.random.default_rng(0).random((40, 4)), y=np.arange(40) % 2)
    before = data.read_bytes()
    for args in (["--checkpoint", str(data)], ["--save", str(data)],
                 ["--save", str(tmp_path / "m.npz"), "--checkpoint", str(tmp_path / "m.npz")]):
        assert cli.main(["train", "--quiet", "--epochs", "1", "--data", str(data)] + args) == 2
        err = capsys.readouterr().err
        assert ("--data file" in err or "same file" in err) and "Traceback" not in err
    assert data.read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    (["--min-time", "1e308", "--max-time", "1e308"], "3600"),
    (["--threads", "99999"], "--threads"),
    (["--baseline-threads", "99999"], "at most"),
    (["--gemm-size", "-5"], "--gemm-size"),
    (["--cases", "B/99999999999999999999"], "batch size"),
])
def test_bench_option_limits(args, fragment, capsys):
    from nnfast import bench
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"] + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# --- third pass (2026-12-04) --------------------------------------------------------------
def test_the_low_level_loop_is_refused_inside_fit(backend, data):
    # a callback's zero_grad / compute_gradients / step between the micro-batches of an
    # accumulation group would change the update fit is about to make
    X, y = data
    model = nf.Sequential(*layers(), seed=0, backend=backend)
    reference = nf.Sequential(*layers(), seed=0, backend=backend)
    opt = nf.SGD(lr=0.1)
    errors = []

    class Meddle(nf.Callback):
        def on_batch_end(self, iteration, logs):
            for call in (model.zero_grad,
                         lambda: model.compute_gradients(X[:3], y[:3], "cross_entropy"),
                         lambda: opt.step(model)):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(str(exc))

    kwargs = dict(loss="cross_entropy", batch_size=5, accumulate=3, epochs=2, seed=0)
    model.fit(X, y, optimizer=nf.SGD(lr=0.1), callbacks=[Meddle()], **kwargs)
    reference.fit(X, y, optimizer=nf.SGD(lr=0.1), **kwargs)
    assert len(errors) == 3 * 20
    assert all("inside fit" in e for e in errors)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    # outside fit the low-level loop works as before
    model.compute_gradients(X, y, "cross_entropy")
    opt.step(model)
    model.zero_grad()
    assert model.accumulated_samples == 0


def _rewrite_header(src, dst, edit):
    with zipfile.ZipFile(src) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    import io as _io
    head = np.load(_io.BytesIO(entries["header.npy"]))
    header = json.loads(head.tobytes().decode())
    edit(header)
    buf = _io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    entries["header.npy"] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for name, blob in entries.items():
            z.writestr(name, blob)


@pytest.mark.parametrize("key, value", [("units", "3"), ("units", 3.0), ("units", True),
                                        ("in_features", "4"), ("activation", 1)])
def test_load_takes_header_widths_only_as_json_ints(tmp_path, key, value):
    model = nf.Sequential(*layers(), seed=0)
    good, bad = tmp_path / "m.npz", tmp_path / "bad.npz"
    model.save(good)
    layer = 1 if key == "units" else 0

    def edit(header):
        header["model"]["layers"][layer][key] = value
    _rewrite_header(good, bad, edit)
    with pytest.raises(ValueError, match=f"invalid model description.*{key}"):
        nf.load(bad)
    _rewrite_header(good, bad, lambda header: None)      # the rewrite itself is sound
    for a, b in zip(nf.load(bad).get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_masked_entries_are_refused(backend, data):
    X, y = data
    model = nf.Sequential(*layers(), seed=0, backend=backend)
    masked = np.ma.masked_array(X, mask=np.zeros(X.shape, dtype=bool))
    masked[3, 1] = np.ma.masked
    with pytest.raises(ValueError, match="X is a masked array with 1 masked"):
        model.fit(masked, y, loss="cross_entropy", epochs=1)
    with pytest.raises(ValueError, match="X is a masked array"):
        model.predict(masked)
    y_masked = np.ma.masked_array(y, mask=np.arange(50) == 7)
    with pytest.raises(ValueError, match="y is a masked array"):
        model.fit(X, y_masked, loss="cross_entropy", epochs=1)
    # nothing masked: the same as the plain array
    plain = nf.Sequential(*layers(), seed=0, backend=backend)
    model.fit(np.ma.masked_array(X), y, loss="cross_entropy", epochs=1, seed=0)
    plain.fit(X, y, loss="cross_entropy", epochs=1, seed=0)
    for a, b in zip(model.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_cli_refuses_empty_paths(tmp_path, capsys):
    from nnfast import cli
    for opt in ("--data", "--save", "--plot", "--checkpoint"):
        assert cli.main(["train", "--quiet", "--epochs", "1", opt, ""]) == 2
        err = capsys.readouterr().err
        assert f"{opt}: empty path" in err and "Traceback" not in err


@pytest.mark.parametrize("args, fragment", [
    (["--workloads", ""], "named no workload"),
    (["--workloads", " , "], "named no workload"),
    (["--cases", ""], "named no case"),
    (["--json", ""], "--json: empty path"),
    (["--json", "/nonexistent-folder/b.json"], "does not exist"),
    (["--plot", "/nonexistent-folder/b.png"], "does not exist"),
    (["--json", "."], "is a folder"),
])
def test_bench_output_and_case_options_checked_first(args, fragment, capsys):
    from nnfast import bench
    with pytest.raises(SystemExit) as exc:
        # (the output checks with a case that would run: they come before it)
        bench.main(["--quick"] + args if args[0] in ("--workloads", "--cases")
                   else ["--quick", "--cases", "B/32"] + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
