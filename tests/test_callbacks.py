"""Callbacks, validation_split and training plots (issue 6, items 4 and 5).

EarlyStopping (Keras semantics: patience, min_delta, mode, restore_best_weights),
ModelCheckpoint (atomic nnfast.save, ``{epoch}`` paths, save_best_only), the per-batch
hook, ``validation_split`` (the last rows) and ``nnfast.plotting.plot_history``.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import nnfast as nf
from nnfast.callbacks import Callback, EarlyStopping, ModelCheckpoint, wants_batches

BACKENDS = ["cython", "numpy"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers
class Recorder(Callback):
    """Copies of the weights and the logs at the end of every epoch."""

    def on_train_begin(self, model, history):
        self.model, self.weights, self.logs = model, [], []

    def on_epoch_end(self, epoch, logs):
        self.weights.append(self.model.get_weights())
        self.logs.append(dict(logs))


def drive(cb, values, key="val_loss"):
    """Feed ``values`` as the monitored value of epochs 0, 1, ...; return the epoch at
    which ``cb`` asked to stop (None if it never did)."""
    cb.on_train_begin(None, None)
    for epoch, v in enumerate(values):
        if cb.on_epoch_end(epoch, {"loss": 1.0, key: v}):
            return epoch
    return None


def crafted(backend="cython", dtype="float64"):
    """A run whose validation loss falls for three epochs, then rises.

    One linear unit, full batch, trained on y = 2x from w = 0 with SGD(lr=0.2): every
    epoch ``w <- w - 0.2 (w - 2)`` (E[x^2] = 1, mean x = 0, so b stays 0), i.e. w = 0.4,
    0.72, 0.976, 1.18, 1.34, ... The validation targets are y = x, so val_loss =
    (w - 1)^2 / 2 is smallest at epoch 2 (0-based) and grows after it."""
    X = np.array([[1.0], [-1.0], [2.0], [-2.0]]) / np.sqrt(2.5)
    model = nf.Sequential(nf.Dense(1, 1, activation="linear"), dtype=dtype, seed=0,
                          backend=backend)
    model.set_weights([np.zeros((1, 1)), np.zeros(1)])
    kwargs = dict(loss="mse", optimizer=nf.SGD(lr=0.2), batch_size=None, shuffle=False,
                  validation_data=(X, X[:, 0].copy()))
    return model, X, 2 * X[:, 0], kwargs


def assert_weights_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def classification(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.argmax(X[:, :k], axis=1)
    return X, y


def classifier(d=5, k=3, backend="cython", seed=0):
    return nf.Sequential(nf.Dense(d, 8, activation="relu"), nf.Dense(8, k, activation="softmax"),
                         dtype="float64", seed=seed, backend=backend)


# --------------------------------------------------------------------------- EarlyStopping
class TestEarlyStoppingSemantics:
    def test_patience_zero_stops_at_first_epoch_without_improvement(self):
        cb = EarlyStopping(patience=0)
        assert drive(cb, [3.0, 2.0, 2.5, 1.0]) == 2
        assert cb.stopped_epoch == 2 and cb.best == 2.0 and cb.best_epoch == 1

    def test_patience_counts_epochs_in_a_row_without_improvement(self):
        # improvements at 0, 1, 3 (the wait resets), then 2 bad epochs in a row -> stop at 5
        cb = EarlyStopping(patience=2)
        assert drive(cb, [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 1.0]) == 5
        assert cb.best == 3.0 and cb.best_epoch == 3 and cb.wait == 2
        cb = EarlyStopping(patience=3)
        assert drive(cb, [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 1.0]) is None
        assert cb.stopped_epoch == 0 and cb.best == 1.0 and cb.best_epoch == 6

    def test_equal_value_is_no_improvement(self):
        assert drive(EarlyStopping(patience=1), [1.0, 1.0]) == 1

    def test_min_delta(self):
        values = [1.0, 0.95, 0.93, 0.5]
        assert drive(EarlyStopping(patience=1), values) is None      # every step improves
        cb = EarlyStopping(patience=1, min_delta=0.1)
        assert drive(cb, values) == 1                                # 0.05 < min_delta
        assert cb.best == 1.0
        cb = EarlyStopping(patience=2, min_delta=0.1)
        assert drive(cb, values) == 2 and cb.best == 1.0
        # an improvement by more than min_delta resets the wait and becomes the best
        cb = EarlyStopping(patience=2, min_delta=0.1)
        assert drive(cb, [1.0, 0.95, 0.85, 0.84, 0.83]) == 4
        assert cb.best == 0.85 and cb.best_epoch == 2

    @pytest.mark.parametrize("monitor, mode", [("val_loss", "min"), ("loss", "min"),
                                               ("accuracy", "max"), ("val_accuracy", "max")])
    def test_auto_mode(self, monitor, mode):
        assert EarlyStopping(monitor).mode == mode
        assert ModelCheckpoint("m.npz", monitor=monitor).mode == mode

    def test_max_mode_follows_rising_values(self):
        rising = [0.5, 0.6, 0.7, 0.8]
        assert drive(EarlyStopping("val_accuracy", patience=0), rising, "val_accuracy") is None
        assert drive(EarlyStopping("val_accuracy", patience=0), [0.5, 0.4], "val_accuracy") == 1
        # an explicit mode wins over the name
        assert drive(EarlyStopping("val_loss", mode="max"), rising) is None
        assert drive(EarlyStopping("val_loss", mode="min"), rising) == 1

    def test_nan_is_never_an_improvement(self):
        cb = EarlyStopping(patience=1)
        assert drive(cb, [1.0, float("nan")]) == 1 and cb.best == 1.0

    def test_missing_monitor_names_the_available_keys(self):
        cb = EarlyStopping("val_accuracy")
        cb.on_train_begin(None, None)
        with pytest.raises(ValueError, match=r"val_accuracy.*available keys.*'loss'"):
            cb.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5})

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_missing_monitor_in_fit(self, backend):
        X, y = classification()
        with pytest.raises(ValueError) as info:
            classifier(backend=backend).fit(X, y, loss="cross_entropy", epochs=2,
                                            callbacks=[EarlyStopping()])
        msg = str(info.value)
        assert "'val_loss'" in msg and "'loss'" in msg and "'accuracy'" in msg
        assert "validation_data or validation_split" in msg

    @pytest.mark.parametrize("kwargs, exc", [
        (dict(mode="best"), ValueError), (dict(patience=-1), ValueError),
        (dict(patience=1.5), ValueError), (dict(min_delta=-0.1), ValueError),
        (dict(min_delta="0.1"), TypeError), (dict(monitor=3), TypeError),
        (dict(monitor=""), TypeError)])
    def test_bad_arguments(self, kwargs, exc):
        with pytest.raises(exc):
            EarlyStopping(**kwargs)

    def test_state_is_reset_by_each_fit(self):
        cb = EarlyStopping(patience=0)
        assert drive(cb, [1.0, 2.0]) == 1
        assert drive(cb, [5.0, 4.0, 3.0]) is None       # best 1.0 from before is forgotten
        assert cb.best == 3.0 and cb.stopped_epoch == 0

    def test_keeps_the_fast_path(self):
        assert not wants_batches(EarlyStopping())
        assert not wants_batches(ModelCheckpoint("x.npz"))


@pytest.mark.parametrize("backend", BACKENDS)
class TestEarlyStoppingInFit:
    def test_crafted_run_val_loss_falls_then_rises(self, backend):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        hist = model.fit(X, y, epochs=10, callbacks=[rec], **kw)
        val = hist.history["val_loss"]
        assert int(np.argmin(val)) == 2
        assert all(np.diff(val[:3]) < 0) and all(np.diff(val[2:]) > 0)
        np.testing.assert_allclose(rec.weights[2][0], [[0.976]], rtol=1e-12)

    def test_stops_at_the_right_epoch(self, backend):
        model, X, y, kw = crafted(backend)
        es = EarlyStopping(patience=2)
        hist = model.fit(X, y, epochs=10, callbacks=[es], **kw)
        # best at epoch 2, no improvement at 3 and 4 -> stop after epoch 4 (5 epochs run)
        assert hist.epochs == 5 and len(hist.history["val_loss"]) == 5
        assert hist.steps == 5 and hist.iterations == 5
        assert es.stopped_epoch == 4 and es.best_epoch == 2
        assert es.best == hist.history["val_loss"][2]

    def test_patience_zero_stops_one_epoch_after_the_best(self, backend):
        model, X, y, kw = crafted(backend)
        hist = model.fit(X, y, epochs=10, callbacks=[EarlyStopping(patience=0)], **kw)
        assert hist.epochs == 4

    def test_restore_best_weights_restores_the_best_epoch_exactly(self, backend):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        es = EarlyStopping(patience=2, restore_best_weights=True)
        hist = model.fit(X, y, epochs=10, callbacks=[rec, es], **kw)
        assert hist.epochs == 5
        assert_weights_equal(model.get_weights(), rec.weights[2])
        # ... which differ from the last epoch's (what the model would hold otherwise)
        assert not np.array_equal(rec.weights[2][0], rec.weights[4][0])
        assert model.evaluate(*kw["validation_data"])["loss"] == pytest.approx(es.best,
                                                                                rel=1e-12)

    def test_without_restore_the_last_weights_stay(self, backend):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        model.fit(X, y, epochs=10, callbacks=[rec, EarlyStopping(patience=2)], **kw)
        assert_weights_equal(model.get_weights(), rec.weights[-1])

    def test_restore_also_when_training_runs_to_the_end(self, backend):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        es = EarlyStopping(patience=5, restore_best_weights=True)
        hist = model.fit(X, y, epochs=6, callbacks=[rec, es], **kw)
        assert hist.epochs == 6 and es.stopped_epoch == 0
        assert_weights_equal(model.get_weights(), rec.weights[2])

    def test_min_delta_in_fit(self, backend):
        # the crafted run's training loss (w - 2)^2 / 2, taken before each epoch's step,
        # shrinks by a factor 0.64: 2, 1.28, 0.819, 0.524, 0.336, 0.215, 0.137, ...; the
        # decrease from epoch 5 to 6 (0.077) is the first below min_delta=0.1
        model, X, y, kw = crafted(backend)
        kw.pop("validation_data")
        es = EarlyStopping("loss", patience=0, min_delta=0.1)
        hist = model.fit(X, y, epochs=10, callbacks=[es], **kw)
        np.testing.assert_allclose(hist.history["loss"], 2 * 0.64 ** np.arange(7), rtol=1e-12)
        assert hist.epochs == 7 and es.best_epoch == 5 and es.stopped_epoch == 6
        model, X, y, kw = crafted(backend)
        kw.pop("validation_data")
        hist = model.fit(X, y, epochs=10, callbacks=[EarlyStopping("loss", patience=0)], **kw)
        assert hist.epochs == 10

    def test_on_train_end_runs_after_a_stop(self, backend):
        calls = []

        class Ends(Callback):
            def on_train_end(self, history):
                calls.append(history.epochs)

        model, X, y, kw = crafted(backend)
        model.fit(X, y, epochs=10, callbacks=[EarlyStopping(patience=0), Ends()], **kw)
        assert calls == [4]


# --------------------------------------------------------------------------- ModelCheckpoint
@pytest.mark.parametrize("backend", BACKENDS)
class TestModelCheckpoint:
    def test_every_epoch_with_epoch_in_the_name(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        ck = ModelCheckpoint(tmp_path / "ckpt-{epoch}.npz")
        model.fit(X, y, epochs=3, callbacks=[rec, ck], **kw)
        assert sorted(os.listdir(tmp_path)) == ["ckpt-1.npz", "ckpt-2.npz", "ckpt-3.npz"]
        assert ck.saved_epochs == [0, 1, 2] and ck.last_path == str(tmp_path / "ckpt-3.npz")
        for epoch in range(3):
            loaded = nf.load(tmp_path / f"ckpt-{epoch + 1}.npz")
            assert_weights_equal(loaded.get_weights(), rec.weights[epoch])
            assert loaded.loss == "mse" and loaded.backend == backend
        # epochs differ, so the files are not all the same model
        assert not np.array_equal(nf.load(tmp_path / "ckpt-1.npz").get_weights()[0],
                                  nf.load(tmp_path / "ckpt-3.npz").get_weights()[0])

    def test_format_spec_and_log_fields(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        ck = ModelCheckpoint(str(tmp_path / "m-{epoch:03d}-{val_loss:.4f}.npz"))
        hist = model.fit(X, y, epochs=2, callbacks=[ck], **kw)
        expected = sorted(f"m-{e + 1:03d}-{v:.4f}.npz"
                          for e, v in enumerate(hist.history["val_loss"]))
        assert sorted(os.listdir(tmp_path)) == expected

    def test_fixed_name_is_overwritten_with_the_last_epoch(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        ck = ModelCheckpoint(tmp_path / "last.npz")
        model.fit(X, y, epochs=4, callbacks=[ck], **kw)
        assert os.listdir(tmp_path) == ["last.npz"]        # no temporary files left over
        assert_weights_equal(nf.load(tmp_path / "last.npz").get_weights(), model.get_weights())

    def test_save_best_only(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        rec = Recorder()
        ck = ModelCheckpoint(tmp_path / "best.npz", save_best_only=True)
        hist = model.fit(X, y, epochs=6, callbacks=[rec, ck], **kw)
        assert ck.saved_epochs == [0, 1, 2]                  # val_loss rises after epoch 2
        assert ck.best == hist.history["val_loss"][2]
        assert_weights_equal(nf.load(tmp_path / "best.npz").get_weights(), rec.weights[2])

    def test_save_best_only_with_epoch_names_and_max_mode(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        # "max" on val_loss = (w - 1)^2 / 2: epoch 0 (w = 0.4) is the first best; w passes
        # 1.6 (a larger val_loss) only at epoch 7 (w = 1.66), then keeps growing
        ck = ModelCheckpoint(tmp_path / "e{epoch}.npz", save_best_only=True, mode="max")
        model.fit(X, y, epochs=10, callbacks=[ck], **kw)
        assert sorted(os.listdir(tmp_path)) == ["e1.npz", "e10.npz", "e8.npz", "e9.npz"]
        assert ck.saved_epochs == [0, 7, 8, 9]

    def test_optimizer_state_is_saved(self, backend, tmp_path):
        X, y = classification()
        model = classifier(backend=backend)
        opt = nf.Adam(lr=1e-2)
        ck = ModelCheckpoint(tmp_path / "c{epoch}.npz", optimizer=opt)
        hist = model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=16,
                         callbacks=[ck])
        loaded, lopt = nf.load(tmp_path / "c2.npz", with_optimizer=True)
        assert isinstance(lopt, nf.Adam) and lopt.iterations == hist.steps == 8
        _, lopt1 = nf.load(tmp_path / "c1.npz", with_optimizer=True)
        assert lopt1.iterations == 4
        for (name, a), (name2, b) in zip(opt.state_arrays(), lopt.state_arrays()):
            assert name == name2
            np.testing.assert_array_equal(a, b)
        assert_weights_equal(loaded.get_weights(), model.get_weights())

    def test_missing_monitor(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        kw.pop("validation_data")
        with pytest.raises(ValueError, match="val_loss.*available keys"):
            model.fit(X, y, epochs=2, callbacks=[ModelCheckpoint(tmp_path / "m.npz",
                                                                 save_best_only=True)], **kw)
        # without save_best_only the monitor is not needed
        model.fit(X, y, epochs=1, callbacks=[ModelCheckpoint(tmp_path / "m.npz")], **kw)
        assert os.path.exists(tmp_path / "m.npz")

    def test_unknown_field_in_path(self, backend, tmp_path):
        model, X, y, kw = crafted(backend)
        with pytest.raises(ValueError, match="step"):
            model.fit(X, y, epochs=1, callbacks=[ModelCheckpoint(tmp_path / "m{step}.npz")],
                      **kw)


def test_checkpoint_into_a_missing_folder_fails_before_training(tmp_path):
    model, X, y, kw = crafted()
    before = model.get_weights()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.fit(X, y, epochs=2, callbacks=[ModelCheckpoint(tmp_path / "nope" / "m.npz")],
                  **kw)
    assert_weights_equal(model.get_weights(), before)


def test_checkpoint_bad_arguments():
    with pytest.raises(TypeError):
        ModelCheckpoint(3)
    with pytest.raises(TypeError):
        ModelCheckpoint("m.npz", optimizer="adam")
    with pytest.raises(ValueError):
        ModelCheckpoint("m.npz", mode="lowest")


def test_exported_at_top_level():
    assert nf.EarlyStopping is EarlyStopping and nf.ModelCheckpoint is ModelCheckpoint
    assert {"EarlyStopping", "ModelCheckpoint"} <= set(nf.__all__)


# --------------------------------------------------------------------------- per-batch hook
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_batch_callback_gets_one_call_per_iteration(backend):
    class Batches(Callback):
        def __init__(self):
            self.calls = []

        def on_batch_end(self, iteration, logs):
            self.calls.append((iteration, logs["loss"]))

    X, y = classification(n=10)
    cb = Batches()
    assert wants_batches(cb)
    hist = classifier(backend=backend).fit(X, y, loss="cross_entropy", epochs=3, batch_size=3,
                                           accumulate=2, callbacks=[cb])
    assert hist.iterations == 12                  # ceil(10 / 3) = 4 per epoch
    assert [i for i, _ in cb.calls] == list(range(12))
    assert [loss for _, loss in cb.calls] == hist.batch_losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_hooks_order(backend):
    events = []

    class Log(Callback):
        def on_train_begin(self, model, history):
            events.append("begin")

        def on_epoch_begin(self, epoch):
            events.append(f"e{epoch}")

        def on_epoch_end(self, epoch, logs):
            events.append(f"/e{epoch}")

        def on_train_end(self, history):
            events.append("end")

    X, y = classification()
    classifier(backend=backend).fit(X, y, loss="cross_entropy", epochs=2, callbacks=[Log()])
    assert events == ["begin", "e0", "/e0", "e1", "/e1", "end"]


# --------------------------------------------------------------------------- validation_split
@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_split_holds_out_the_last_rows(backend):
    X, y = classification(n=40)
    rec = Recorder()
    a = classifier(backend=backend)
    ha = a.fit(X, y, loss="cross_entropy", validation_split=0.25, epochs=3, batch_size=4,
               seed=1, callbacks=[rec])
    # 30 training rows -> 8 iterations per epoch; the last 10 rows are the validation set
    assert ha.iterations == 3 * 8
    for epoch in range(3):
        probe = classifier(backend=backend)
        probe.set_weights(rec.weights[epoch])
        expected = probe.evaluate(X[30:], y[30:], loss="cross_entropy")
        assert ha.history["val_loss"][epoch] == pytest.approx(expected["loss"], rel=1e-12)
        assert ha.history["val_accuracy"][epoch] == expected["accuracy"]
    # the same as training on the head with the tail as validation_data, bit for bit
    b = classifier(backend=backend)
    hb = b.fit(X[:30], y[:30], loss="cross_entropy", validation_data=(X[30:], y[30:]),
               epochs=3, batch_size=4, seed=1)
    assert ha.history == hb.history and ha.batch_losses == hb.batch_losses
    assert_weights_equal(a.get_weights(), b.get_weights())


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_split_with_early_stopping(backend):
    X, y = classification(n=40)
    es = EarlyStopping(patience=1, restore_best_weights=True)
    hist = classifier(backend=backend).fit(X, y, loss="cross_entropy", validation_split=0.2,
                                           epochs=50, callbacks=[es],
                                           optimizer=nf.SGD(lr=0.5))
    assert len(hist.history["val_loss"]) == hist.epochs
    assert es.best == min(hist.history["val_loss"])


# --------------------------------------------------------------------------- plotting
def test_import_nnfast_does_not_import_matplotlib():
    code = ("import sys, nnfast, nnfast.plotting, nnfast.callbacks; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def test_import_nnfast_leaves_slow_stdlib_modules_for_later():
    # logging, json, signal and threading took 10-15 ms of import nnfast's budget (issue 4:
    # under 150 ms, most of it NumPy's); they are imported where fit or save use them
    # (a .pth file of the environment may import some of them at startup: those are not
    # nnfast's doing, so only modules that import nnfast adds count)
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import nnfast\n"
            "late = [m for m in ('logging', 'json', 'signal', 'threading')\n"
            "        if m in sys.modules and m not in before]\n"
            "assert not late, late")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def test_plot_history_without_matplotlib_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import nnfast as nf\n"
            "from nnfast.plotting import plot_history\n"
            "try:\n"
            f"    plot_history({{'loss': [1.0, 0.5]}}, {str(tmp_path / 'x.png')!r})\n"
            "except ImportError as e:\n"
            "    assert 'pip install \"nnfast[plot]\"' in str(e), str(e)\n"
            "else:\n"
            "    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    assert not os.path.exists(tmp_path / "x.png")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("with_validation", [False, True])
def test_plot_history_writes_a_png(tmp_path, with_validation):
    pytest.importorskip("matplotlib", reason="plotting needs the optional matplotlib extra")
    from nnfast.plotting import plot_history
    X, y = classification()
    kw = dict(validation_split=0.25) if with_validation else {}
    hist = classifier().fit(X, y, loss="cross_entropy", epochs=3, **kw)
    out = plot_history(hist, tmp_path / "curves.png", title="test run")
    assert out == str(tmp_path / "curves.png")
    with open(out, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    # the accuracy subplot makes the figure wider (1000 px vs 550 px at dpi 100)
    width = int.from_bytes(data[16:20], "big")
    assert width == 1000
    # a regression history (loss only) and a plain dict are drawn on one axis
    out = plot_history({"loss": [1.0, 0.5, 0.25]}, tmp_path / "loss.png")
    with open(out, "rb") as f:
        head = f.read(24)
    assert head.startswith(PNG_MAGIC) and int.from_bytes(head[16:20], "big") == 550


def test_plot_history_rejects_a_history_without_loss(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the optional matplotlib extra")
    from nnfast.plotting import plot_history
    with pytest.raises(ValueError, match="loss"):
        plot_history(nf.History(), tmp_path / "x.png")
    with pytest.raises(TypeError):
        plot_history([1, 2, 3], tmp_path / "x.png")
    assert not os.path.exists(tmp_path / "x.png")


def test_plot_history_leaves_the_matplotlib_backend_alone(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting needs the optional matplotlib extra")
    code = ("import matplotlib; matplotlib.use('svg')\n"
            "from nnfast.plotting import plot_history\n"
            f"plot_history({{'loss': [1.0, 0.5]}}, {str(tmp_path / 'y.png')!r})\n"
            "assert matplotlib.get_backend().lower() == 'svg', matplotlib.get_backend()\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    assert os.path.exists(tmp_path / "y.png")
