"""Training checkpoints and bit-identical resume (issue 5 items 3 and 7).

``fit(..., checkpoint=path, checkpoint_every=steps, resume=True)``: a process killed
with SIGKILL in the middle of an epoch and resumed in another process ends with the
weights and the History of an uninterrupted run, bit for bit. Checkpoints are written
atomically, hold plain arrays and a JSON header (never pickle), and a resume with a
different configuration is refused.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nnfast as nf

BACKENDS = ["cython", "numpy"]
OPTIMIZERS = {"momentum": lambda: nf.SGD(lr=0.05, momentum=0.9),
              "adam": lambda: nf.Adam(lr=0.01)}


def make_data(n=203, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    return X, y


def make_model(backend="cython", dtype="float32", seed=0):
    return nf.Sequential(nf.Dense(6, 16, activation="relu"),
                         nf.Dense(16, 3, activation="softmax"),
                         dtype=dtype, seed=seed, backend=backend)


FIT = dict(loss="cross_entropy", epochs=4, batch_size=8, accumulate=3, shuffle=True, seed=7)


def history_dict(h):
    return {"history": h.history, "batch_losses": h.batch_losses, "iterations": h.iterations,
            "steps": h.steps, "epochs": h.epochs}


def assert_same_weights(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y)


def read_checkpoint(path):
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays.pop("header").tobytes().decode("utf-8"))
    return header, arrays


class CopyAt(nf.Callback):
    """Copy the checkpoint file aside right after iteration ``at`` (a snapshot of what a
    crash at that moment would leave)."""

    def __init__(self, src, dst, at):
        self.src, self.dst, self.at = src, dst, at

    def on_batch_end(self, iteration, logs):
        if iteration == self.at:
            shutil.copy(self.src, self.dst)


# --------------------------------------------------------------------------- SIGKILL + resume
DRIVER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import nnfast as nf

    cfg = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    X = rng.standard_normal((203, 6))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    Xv, yv = X[:40] + 0.1, y[:40]


    class Progress(nf.Callback):
        def on_batch_end(self, iteration, logs):
            print(iteration, flush=True)
            time.sleep(0.01)


    for run in cfg["runs"]:
        model = nf.Sequential(nf.Dense(6, 16, activation="relu"),
                              nf.Dense(16, 3, activation="softmax"), seed=0,
                              backend=run["backend"])
        opt = (nf.SGD(lr=0.05, momentum=0.9) if run["opt"] == "momentum"
               else nf.Adam(lr=0.01))
        kw = dict(loss="cross_entropy", optimizer=opt, epochs=4, batch_size=8,
                  accumulate=3, shuffle=True, seed=7, validation_data=(Xv, yv))
        if cfg["mode"] == "full":
            hist = model.fit(X, y, **kw)
        else:
            hist = model.fit(X, y, checkpoint=run["ckpt"], checkpoint_every=2, resume=True,
                             callbacks=[Progress()] if cfg["mode"] == "killable" else [],
                             **kw)
        np.savez(run["out"] + ".npz", *model.get_weights())
        with open(run["out"] + ".json", "w") as f:
            json.dump({"history": hist.history, "batch_losses": hist.batch_losses,
                       "iterations": hist.iterations, "steps": hist.steps,
                       "epochs": hist.epochs, "opt_iterations": opt.iterations}, f)
""")


def _driver(tmp_path):
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def _load_result(out):
    with np.load(out + ".npz", allow_pickle=False) as data:
        weights = [data[f"arr_{i}"] for i in range(len(data.files))]
    with open(out + ".json") as f:
        return weights, json.load(f)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """For each backend x optimizer (shuffle, accumulate=3, validation data): a process
    writing a checkpoint every 2 steps is SIGKILLed in the middle of its second epoch;
    another process resumes from the file; weights and History equal an uninterrupted
    run's exactly."""
    driver = _driver(tmp_path)
    configs = [(b, o) for b in BACKENDS for o in OPTIMIZERS]
    refs = [{"backend": b, "opt": o, "out": str(tmp_path / f"ref-{b}-{o}")} for b, o in configs]
    subprocess.run([sys.executable, str(driver), json.dumps({"mode": "full", "runs": refs})],
                   cwd=tmp_path, check=True, timeout=120)
    kill_after = 40        # 26 iterations per epoch: iteration 40 is in the second epoch
    for (backend, opt), ref in zip(configs, refs):
        run = {"backend": backend, "opt": opt, "ckpt": str(tmp_path / f"ck-{backend}-{opt}.npz"),
               "out": str(tmp_path / f"res-{backend}-{opt}")}
        args = [sys.executable, str(driver)]
        proc = subprocess.Popen(args + [json.dumps({"mode": "killable", "runs": [run]})],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                if int(line) >= kill_after:
                    proc.kill()            # SIGKILL: no cleanup of any kind
                    break
        finally:
            proc.stdout.close()
            proc.wait(timeout=60)
        assert proc.returncode == -9, "the training process ended before it was killed"
        assert not os.path.exists(run["out"] + ".json")
        header, arrays = read_checkpoint(run["ckpt"])
        state = header["checkpoint"]
        assert state["epoch"] == 1 and 0 < state["iteration"] < 26, state   # mid-epoch
        assert state["iteration"] % 3 == 0                                   # step boundary

        subprocess.run(args + [json.dumps({"mode": "resume", "runs": [run]})], cwd=tmp_path,
                       check=True, timeout=120)
        w_ref, h_ref = _load_result(ref["out"])
        w_res, h_res = _load_result(run["out"])
        assert_same_weights(w_res, w_ref)
        assert h_res == h_ref
        assert h_res["epochs"] == 4 and h_res["iterations"] == 4 * 26
        assert h_res["steps"] == 4 * 9 == h_res["opt_iterations"]


# --------------------------------------------------------------------------- in-process resume
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("variant", [
    dict(accumulate=3),
    dict(accumulate=1, batch_size=10, validation_split=0.1),
    dict(accumulate=2, shuffle=False, drop_last=True),
    dict(accumulate=4, batch_size=None, epochs=12),
], ids=["acc3", "acc1-valsplit", "noshuffle-droplast", "fullbatch"])
def test_resume_from_any_snapshot_equals_uninterrupted(tmp_path, backend, opt_name, variant):
    X, y = make_data()
    kw = dict(FIT, **variant)
    ref = make_model(backend)
    h_ref = ref.fit(X, y, optimizer=OPTIMIZERS[opt_name](), **kw)
    ckpt, snap = tmp_path / "ck.npz", tmp_path / "snap.npz"
    at = h_ref.iterations // 2 + 1
    a = make_model(backend)
    h_a = a.fit(X, y, optimizer=OPTIMIZERS[opt_name](), checkpoint=ckpt, checkpoint_every=1,
                callbacks=[CopyAt(ckpt, snap, at)], **kw)
    # checkpointing (and the per-batch callback) changes nothing
    assert_same_weights(a.get_weights(), ref.get_weights())
    assert history_dict(h_a) == history_dict(h_ref)
    b = make_model(backend, seed=99)       # other initial weights: all come from the file
    h_b = b.fit(X, y, optimizer=OPTIMIZERS[opt_name](), checkpoint=snap, resume=True,
                checkpoint_every=1, **kw)
    assert_same_weights(b.get_weights(), ref.get_weights())
    assert history_dict(h_b) == history_dict(h_ref)
    assert b.history is h_b


def test_checkpoint_every_counts_optimizer_steps(tmp_path, monkeypatch):
    """Checkpoints land every ``checkpoint_every`` steps (also mid-epoch, always at step
    boundaries) and at the end of training; the default is once per epoch."""
    from nnfast import io as nio
    written = []
    real = nio.write_checkpoint

    def spy(path, model, optimizer, state, arrays):
        written.append((state["epoch"], state["iteration"], state["history"]["steps"]))
        real(path, model, optimizer, state, arrays)

    monkeypatch.setattr(nio, "write_checkpoint", spy)
    X, y = make_data()
    # 26 iterations per epoch, accumulate=3: steps end at iterations 3, 6, ..., 24, 26
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=tmp_path / "c.npz",
                     checkpoint_every=4, **dict(FIT, epochs=2))
    assert written == [(0, 12, 4), (0, 24, 8), (1, 9, 12), (1, 21, 16),
                       (2, 0, 18)]                       # the last one: end of training
    written.clear()
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=tmp_path / "d.npz",
                     **dict(FIT, epochs=3))
    assert written == [(1, 0, 9), (2, 0, 18), (3, 0, 27)]


def test_checkpoint_content(tmp_path):
    """Weights, optimizer state and step count, RNG state, the epoch's permutation and
    losses so far, counters, History and the fit configuration; plain arrays only."""
    X, y = make_data()
    ckpt, snap = tmp_path / "ck.npz", tmp_path / "snap.npz"
    model, opt = make_model(), nf.Adam(lr=0.01)
    hist = model.fit(X, y, optimizer=opt, checkpoint=ckpt, checkpoint_every=1,
                     callbacks=[CopyAt(ckpt, snap, 26 + 12 - 1)], **FIT)
    header, arrays = read_checkpoint(ckpt)
    assert all(a.dtype != object for a in arrays.values())
    state = header["checkpoint"]
    assert state["config"] == {"loss": "cross_entropy", "batch_size": 8, "accumulate": 3,
                               "shuffle": True, "drop_last": False, "n_samples": 203,
                               "n_features": 6, "dtype": "float32"}
    assert (state["epoch"], state["iteration"], state["stopped"]) == (4, 0, False)
    assert state["history"] == {"history": hist.history, "iterations": 104, "steps": 36,
                                "epochs": 4}
    assert arrays["ckpt.batch_losses"].tolist() == hist.batch_losses
    rng = np.random.default_rng(FIT["seed"])
    for _ in range(4):
        rng.permutation(203)
    assert state["rng"] == rng.bit_generator.state
    assert header["optimizer"] == opt.config()
    assert header["optimizer_iterations"] == opt.iterations == 36
    for name, arr in opt.state_arrays():
        assert np.array_equal(arrays[f"opt.{name}"], arr)
    # a checkpoint is also a model file
    loaded, lopt = nf.load(ckpt, with_optimizer=True)
    assert_same_weights(loaded.get_weights(), model.get_weights())
    assert lopt.iterations == 36
    # the mid-epoch snapshot: epoch 1, 12 iterations done (4 steps of 3)
    header, arrays = read_checkpoint(snap)
    state = header["checkpoint"]
    assert (state["epoch"], state["iteration"]) == (1, 12)
    assert state["history"]["iterations"] == 38 and state["history"]["steps"] == 13
    order = arrays["ckpt.order"]
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(203))
    rng = np.random.default_rng(FIT["seed"])
    rng.permutation(203)
    assert np.array_equal(order, rng.permutation(203))        # the epoch's permutation
    assert state["rng"] == rng.bit_generator.state               # drawn after it
    assert arrays["ckpt.epoch_loss"].shape == (12,)
    assert arrays["ckpt.epoch_correct"].shape == (12,)
    assert arrays["ckpt.batch_losses"].tolist() == hist.batch_losses[:38]


def test_resume_without_file_starts_afresh_and_finished_run_trains_nothing(tmp_path):
    X, y = make_data()
    ref = make_model()
    h_ref = ref.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), **FIT)
    ckpt = tmp_path / "c.npz"
    a = make_model()
    h_a = a.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt, resume=True,
                **FIT)
    assert_same_weights(a.get_weights(), ref.get_weights())
    assert history_dict(h_a) == history_dict(h_ref)
    # resuming a finished run: nothing to do, same weights and History
    b = make_model(seed=3)
    h_b = b.fit(X, y, checkpoint=ckpt, resume=True, **FIT)   # optimizer from the file
    assert_same_weights(b.get_weights(), ref.get_weights())
    assert history_dict(h_b) == history_dict(h_ref)
    # more epochs continue it: equal to a longer uninterrupted run
    longer = make_model()
    h_long = longer.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), **dict(FIT, epochs=6))
    c = make_model(seed=3)
    h_c = c.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt, resume=True,
                **dict(FIT, epochs=6))
    assert_same_weights(c.get_weights(), longer.get_weights())
    assert history_dict(h_c) == history_dict(h_long)
    # resume=False overwrites the checkpoint with a fresh run
    d = make_model()
    d.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt, **FIT)
    assert read_checkpoint(ckpt)[0]["checkpoint"]["epoch"] == 4


def test_nf_resume_rebuilds_model_and_optimizer(tmp_path):
    X, y = make_data()
    ref = make_model("numpy")
    h_ref = ref.fit(X, y, optimizer=nf.Adam(lr=0.01), validation_split=0.2, **FIT)
    ckpt, snap = tmp_path / "c.npz", tmp_path / "s.npz"
    make_model("numpy").fit(X, y, optimizer=nf.Adam(lr=0.01), validation_split=0.2,
                            checkpoint=ckpt, checkpoint_every=5,
                            callbacks=[CopyAt(ckpt, snap, 50)], **FIT)
    model, hist = nf.resume(snap, X, y)
    assert model.backend == "numpy" and model.loss == "cross_entropy"
    assert_same_weights(model.get_weights(), ref.get_weights())
    assert history_dict(hist) == history_dict(h_ref)


def test_stopped_run_stays_stopped(tmp_path):
    class StopAfter(nf.Callback):
        def on_epoch_end(self, epoch, logs):
            return epoch == 1

    X, y = make_data()
    ckpt = tmp_path / "c.npz"
    a = make_model()
    h_a = a.fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, callbacks=[StopAfter()],
                **FIT)
    assert h_a.epochs == 2 and read_checkpoint(ckpt)[0]["checkpoint"]["stopped"] is True
    b = make_model(seed=5)
    h_b = b.fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, resume=True, **FIT)
    assert history_dict(h_b) == history_dict(h_a)
    assert_same_weights(b.get_weights(), a.get_weights())


# --------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("change, key", [
    (dict(batch_size=16), "batch_size"),
    (dict(accumulate=2), "accumulate"),
    (dict(shuffle=False), "shuffle"),
    (dict(drop_last=True), "drop_last"),
    (dict(validation_split=0.25), "n_samples"),
    (dict(optimizer=nf.SGD(lr=0.01, momentum=0.9)), "optimizer"),
    (dict(optimizer=nf.Adam()), "optimizer"),
    (dict(epochs=1), "epochs"),
])
def test_resume_with_other_configuration_is_refused(tmp_path, change, key):
    X, y = make_data()
    ckpt = tmp_path / "c.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt, **FIT)
    model = make_model(seed=4)
    before = model.get_weights()
    kw = dict(FIT, optimizer=nf.SGD(lr=0.05, momentum=0.9))
    kw.update(change)
    opt = kw["optimizer"]
    with pytest.raises(ValueError, match=key):
        model.fit(X, y, checkpoint=ckpt, resume=True, **kw)
    assert_same_weights(model.get_weights(), before)          # nothing was loaded
    assert opt.iterations == 0 and opt.state_arrays() == []


@pytest.mark.parametrize("saved", [1000, 26])
def test_accumulate_beyond_the_epoch_resumes_as_the_epoch(tmp_path, saved):
    # a checkpoint of a build before the clamp was stored has the accumulate the user
    # passed (1000); groups never span epochs, so it resumes as the clamped 26 does
    X, y = make_data()                      # 203 rows in batches of 8: 26 iterations
    kw = dict(FIT, accumulate=1000, epochs=2)
    ckpt, old = tmp_path / "c.npz", tmp_path / "old.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, **kw)
    assert read_checkpoint(ckpt)[0]["checkpoint"]["config"]["accumulate"] == 26

    def edit(h):
        h["checkpoint"]["config"]["accumulate"] = saved
    _rewrite(ckpt, old, header=edit)
    longer = make_model()
    h_long = longer.fit(X, y, optimizer=nf.SGD(lr=0.05), **dict(kw, epochs=4))
    for accumulate in (1000, 26, 27):
        c = make_model(seed=3)
        h_c = c.fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=old, resume=True,
                    **dict(kw, epochs=4, accumulate=accumulate))
        assert_same_weights(c.get_weights(), longer.get_weights())
        assert history_dict(h_c) == history_dict(h_long)
        _rewrite(ckpt, old, header=edit)     # (the resumed fit wrote its own)
    with pytest.raises(ValueError, match="accumulate"):
        make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=old, resume=True,
                         **dict(kw, epochs=4, accumulate=25))


def test_resume_with_other_loss_is_refused(tmp_path):
    X, y = make_data()
    Y = np.eye(3)[y]

    def model():
        return nf.Sequential(nf.Dense(6, 8, activation="tanh"),
                             nf.Dense(8, 3, activation="sigmoid"), seed=0)

    ckpt = tmp_path / "c.npz"
    kw = dict(FIT, loss="binary_cross_entropy")
    model().fit(X, Y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, **kw)
    with pytest.raises(ValueError, match="loss"):
        model().fit(X, Y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, resume=True,
                    **dict(kw, loss="mse"))


@pytest.mark.parametrize("other", ["architecture", "dtype"])
def test_resume_into_another_model_is_refused(tmp_path, other):
    X, y = make_data()
    ckpt = tmp_path / "c.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, **FIT)
    if other == "dtype":
        model = make_model(dtype="float64")
    else:
        model = nf.Sequential(nf.Dense(6, 12, activation="relu"),
                              nf.Dense(12, 3, activation="softmax"), seed=0)
    with pytest.raises(ValueError, match="model"):
        model.fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, resume=True, **FIT)


def _other_data(X, y, change):
    X, y = X.copy(), y.copy()
    if change == "one value by one ulp":
        X[101, 3] = np.nextafter(np.float32(X[101, 3]), np.float32(np.inf))
    elif change == "two rows swapped":
        X[[5, 150]] = X[[150, 5]]
        y[[5, 150]] = y[[150, 5]]
    elif change == "one label":
        y[77] = (y[77] + 1) % 3
    return X, y


@pytest.mark.parametrize("change", ["one value by one ulp", "two rows swapped", "one label"])
def test_resume_on_other_data_is_refused(tmp_path, change):
    """The checkpoint keeps a CRC-32 of the training rows and targets: continuing the saved
    permutation on other data would silently train on something else."""
    X, y = make_data()
    ckpt = tmp_path / "c.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, **dict(FIT, epochs=2))
    X2, y2 = _other_data(X, y, change)
    model, opt = make_model(seed=4), nf.SGD(lr=0.05)
    before = model.get_weights()
    with pytest.raises(ValueError, match="other training data"):
        model.fit(X2, y2, optimizer=opt, checkpoint=ckpt, resume=True, **FIT)
    assert_same_weights(model.get_weights(), before)          # nothing was loaded
    assert opt.iterations == 0
    with pytest.raises(ValueError, match="other training data"):
        nf.resume(ckpt, X2, y2, epochs=4)


@pytest.mark.parametrize("same", ["float32 copy", "Fortran order", "int32 labels",
                                  "checkpoint without the CRC"])
def test_resume_on_the_same_data_in_another_form(tmp_path, same):
    """The fingerprint is of the data as trained on (the model's dtype, C order, int64
    labels), so the same values in another form resume; so do checkpoints written before
    the fingerprint existed. Either way the run equals the uninterrupted one."""
    X, y = make_data()
    ref = make_model()
    ref.fit(X, y, optimizer=nf.SGD(lr=0.05), **FIT)
    ckpt = tmp_path / "c.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, **dict(FIT, epochs=2))
    X2, y2 = X, y
    if same == "float32 copy":
        X2 = X.astype(np.float32)
    elif same == "Fortran order":
        X2 = np.asfortranarray(X)
    elif same == "int32 labels":
        y2 = y.astype(np.int32)
    else:
        old = tmp_path / "old.npz"
        _rewrite(ckpt, old, header=lambda h: h["checkpoint"].pop("data_crc32"))
        ckpt = old
    model = make_model(seed=4)
    model.fit(X2, y2, optimizer=nf.SGD(lr=0.05), checkpoint=ckpt, resume=True, **FIT)
    assert_same_weights(model.get_weights(), ref.get_weights())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(checkpoint_every=3), ValueError, "checkpoint_every"),
    (dict(resume=True), ValueError, "resume"),
    (dict(checkpoint="c.npz", checkpoint_every=0), ValueError, "checkpoint_every"),
    (dict(checkpoint="c.npz", checkpoint_every=2.5), TypeError, "checkpoint_every"),
    (dict(checkpoint="c.npz", resume="yes"), TypeError, "resume"),
    (dict(checkpoint=3), TypeError, "checkpoint"),
    (dict(checkpoint=""), ValueError, "checkpoint"),
])
def test_bad_checkpoint_arguments(tmp_path, monkeypatch, kwargs, exc, match):
    monkeypatch.chdir(tmp_path)
    X, y = make_data()
    with pytest.raises(exc, match=match):
        make_model().fit(X, y, loss="cross_entropy", **kwargs)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- atomic writes
def test_checkpoints_leave_no_temporary_files(tmp_path):
    X, y = make_data()
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=tmp_path / "c.npz",
                     checkpoint_every=1, **FIT)
    assert os.listdir(tmp_path) == ["c.npz"]


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    """A crash while the checkpoint is being written leaves the previous checkpoint
    intact (and no temporary file); the run can resume from it exactly."""
    X, y = make_data()
    ckpt = tmp_path / "c.npz"
    ref = make_model()
    h_ref = ref.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), **FIT)

    class BreakWritesAt(nf.Callback):
        def on_batch_end(self, iteration, logs):
            if iteration == 29:   # after the checkpoint at iteration 27 (step 10)
                def broken(*args, **kwargs):
                    raise RuntimeError("simulated crash while writing")
                monkeypatch.setattr(np.lib.format, "write_array", broken)

    model = make_model()
    with pytest.raises(RuntimeError, match="simulated crash") as info:
        model.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt,
                  checkpoint_every=2, callbacks=[BreakWritesAt()], **FIT)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.npz"]
    assert info.value.history.steps == 12          # the write of step 12 failed
    state = read_checkpoint(ckpt)[0]["checkpoint"]
    assert (state["epoch"], state["iteration"], state["history"]["steps"]) == (1, 3, 10)
    b = make_model()
    h_b = b.fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt, resume=True,
                **FIT)
    assert_same_weights(b.get_weights(), ref.get_weights())
    assert history_dict(h_b) == history_dict(h_ref)


# --------------------------------------------------------------------------- bad files
def _rewrite(path, out, header=None, arrays=None):
    with np.load(path, allow_pickle=False) as data:
        content = {k: data[k] for k in data.files}
    if header is not None:
        h = json.loads(content["header"].tobytes().decode())
        header(h)
        content["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)
    if arrays is not None:
        arrays(content)
    with open(out, "wb") as f:
        np.savez(f, **content)


def _set(path, value):
    def edit(h):
        *keys, last = path
        for k in keys:
            h = h[k]
        h[last] = value
    return edit


@pytest.mark.parametrize("edit", [
    dict(header=_set(["checkpoint", "iteration"], 13)),             # not a step boundary
    dict(header=_set(["checkpoint", "iteration"], 500)),
    dict(header=_set(["checkpoint", "epoch"], "1")),
    dict(header=_set(["checkpoint", "version"], 7)),
    dict(header=_set(["checkpoint", "rng"], {"bit_generator": "PCG64"})),
    dict(header=_set(["checkpoint", "history", "steps"], 3)),
    dict(header=_set(["checkpoint", "history", "history"], {"loss": ["x"]})),
    dict(header=lambda h: h.pop("checkpoint")),
    dict(header=_set(["optimizer_iterations"], -1)),
    dict(arrays=lambda a: a.update({"ckpt.order": np.zeros(203, dtype=np.int64)})),
    dict(arrays=lambda a: a.update({"ckpt.order": a["ckpt.order"][:-1]})),
    dict(arrays=lambda a: a.update({"ckpt.batch_losses": a["ckpt.batch_losses"][:-1]})),
    dict(arrays=lambda a: a.update({"ckpt.epoch_loss": a["ckpt.epoch_loss"] * np.nan})),
    dict(arrays=lambda a: a.update({"opt.0.velocity": a["opt.0.velocity"][:-1]})),
    dict(arrays=lambda a: a.update({"opt.1.velocity": a["opt.1.velocity"] * np.inf})),
    dict(arrays=lambda a: a.pop("opt.2.velocity")),
    dict(arrays=lambda a: a.update({"param.0": a["param.0"].astype(np.float64)})),
], ids=["iteration-boundary", "iteration-range", "epoch-str", "version", "rng",
        "steps", "history-values", "no-checkpoint", "opt-iterations", "order-not-perm",
        "order-short", "losses-short", "epoch-loss-nan", "opt-state-shape", "opt-state-inf",
        "opt-state-missing", "param-dtype"])
def test_tampered_checkpoint_is_refused(tmp_path, edit):
    X, y = make_data()
    ckpt, snap = tmp_path / "c.npz", tmp_path / "s.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt,
                     checkpoint_every=2, callbacks=[CopyAt(ckpt, snap, 26 + 12 - 1)], **FIT)
    bad = tmp_path / "bad.npz"
    _rewrite(snap, bad, **edit)
    model, opt = make_model(seed=4), nf.SGD(lr=0.05, momentum=0.9)
    before = model.get_weights()
    with pytest.raises(ValueError):
        model.fit(X, y, optimizer=opt, checkpoint=bad, resume=True, checkpoint_every=2,
                  **FIT)
    assert_same_weights(model.get_weights(), before)
    assert opt.iterations == 0


@pytest.mark.parametrize("name", ["param.0", "opt.0.velocity", "ckpt.order", "extra"])
def test_object_arrays_are_never_unpickled(tmp_path, monkeypatch, name):
    """An object array anywhere in a model or checkpoint file is a ValueError; pickle is
    never called (it is booby-trapped for the duration of the loads)."""
    X, y = make_data()
    ckpt, snap = tmp_path / "c.npz", tmp_path / "s.npz"
    make_model().fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=ckpt,
                     checkpoint_every=2, callbacks=[CopyAt(ckpt, snap, 26 + 12 - 1)], **FIT)
    evil = np.empty(3, dtype=object)
    evil[:] = [1, "two", None]
    bad = tmp_path / "bad.npz"
    _rewrite(snap, bad, arrays=lambda a: a.update({name: evil}))

    def trap(*args, **kwargs):
        raise AssertionError("pickle was used")

    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, trap)
    with pytest.raises(ValueError):
        nf.load(bad, with_optimizer=True)
    with pytest.raises(ValueError):
        make_model().fit(X, y, optimizer=nf.SGD(lr=0.05, momentum=0.9), checkpoint=bad,
                         resume=True, **FIT)
    with pytest.raises(ValueError):
        nf.resume(bad, X, y)
    # the good files still load with pickle booby-trapped
    nf.load(snap, with_optimizer=True)


@pytest.mark.parametrize("what", ["missing", "garbage", "truncated", "model-file"])
def test_resume_from_bad_file(tmp_path, what):
    X, y = make_data()
    path = tmp_path / "c.npz"
    model = make_model()
    if what == "garbage":
        path.write_bytes(b"not a checkpoint" * 50)
    elif what == "truncated":
        model.fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=path, **FIT)
        path.write_bytes(path.read_bytes()[:-100])
    elif what == "model-file":
        model.save(path)
    if what == "missing":
        with pytest.raises(FileNotFoundError):
            nf.resume(path, X, y)
        return
    with pytest.raises(ValueError):
        make_model().fit(X, y, optimizer=nf.SGD(lr=0.05), checkpoint=path, resume=True, **FIT)
    with pytest.raises(ValueError):
        nf.resume(path, X, y)


def test_load_rejects_tampered_optimizer_state(tmp_path):
    """Gaps of the model-file checks: optimizer state of the wrong shape or not finite."""
    X, y = make_data()
    model, opt = make_model(), nf.Adam(lr=0.01)
    model.fit(X, y, optimizer=opt, **FIT)
    good = tmp_path / "m.npz"
    model.save(good, optimizer=opt)
    for k, edit in enumerate([lambda a: a.update({"opt.0.exp_avg": a["opt.0.exp_avg"][:5]}),
                              lambda a: a.update({"opt.1.exp_avg_sq":
                                                  a["opt.1.exp_avg_sq"] * np.nan}),
                              lambda a: a.pop("opt.3.exp_avg")]):
        bad = tmp_path / f"bad{k}.npz"
        _rewrite(good, bad, arrays=edit)
        nf.load(bad)                                   # the model alone is fine
        with pytest.raises(ValueError, match="optimizer"):
            nf.load(bad, with_optimizer=True)


def test_the_package_never_loads_with_pickle():
    """Every np.load in nnfast passes allow_pickle=False, and nothing imports pickle."""
    import pathlib
    import re
    root = pathlib.Path(nf.__file__).parent
    sources = list(root.rglob("*.py")) + list(root.rglob("*.pyx"))
    assert sources
    for src in sources:
        text = src.read_text()
        for call in re.findall(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call, (src.name, call)
        assert "allow_pickle=True" not in text, src.name
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), \
            src.name
