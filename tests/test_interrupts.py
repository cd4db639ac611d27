"""Divergence and interrupts (issue 5 item 4).

A non-finite loss (or an update that makes the parameters or the optimizer state
non-finite) raises ``nf.DivergenceError`` naming epoch and iteration, and the model keeps
the weights and optimizer state of the last good step. Ctrl-C (a real SIGINT, or a
KeyboardInterrupt from a callback) stops ``fit`` at a step boundary with the weights of a
prefix of the steps of an uninterrupted run; the History so far is ``exc.history`` (and
``model.history``) and the interrupt propagates. An optimizer step is never cut in half.
"""
import signal
import threading
import time

import numpy as np
import pytest

import nnfast as nf
from nnfast.backends import get_backend

BACKENDS = ["cython", "numpy"]


def regression(n=64, d=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((n, k))


def linear_net(backend, seed=0):
    return nf.Sequential(nf.Dense(4, 16), nf.Dense(16, 16), nf.Dense(16, 2), seed=seed,
                         backend=backend)


def classification(n=400, d=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)


def classifier(backend, seed=0):
    return nf.Sequential(nf.Dense(8, 32, activation="tanh"),
                         nf.Dense(32, 3, activation="softmax"), seed=seed, backend=backend)


def finite(arrays):
    return all(np.isfinite(a).all() for a in arrays)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


class Recorder(nf.Callback):
    """After every step: weights, optimizer state and iterations done (a per-batch
    callback, so the reference run goes through Python after every iteration)."""

    def __init__(self, opt):
        self.opt = opt

    def _state(self, iterations):
        return (self.model.get_weights(), [a.copy() for _, a in self.opt.state_arrays()],
                iterations)

    def on_train_begin(self, model, history):
        self.model = model
        self.start = self.opt.iterations
        self.steps = {0: self._state(0)}

    def on_batch_end(self, iteration, logs):
        self.steps.setdefault(self.opt.iterations - self.start, self._state(iteration + 1))


# --------------------------------------------------------------------------- divergence
DIVERGING = {   # optimizer, accumulate, batch_size, which check sees it first
    "sgd-update": (lambda: nf.SGD(lr=0.3, momentum=0.9), 1, 8, "update"),
    "sgd-loss": (lambda: nf.SGD(lr=0.5, momentum=0.9), 1, 8, "loss"),
    "sgd-acc3-loss": (lambda: nf.SGD(lr=0.3, momentum=0.9), 3, 8, "loss"),
    "sgd-acc3-update": (lambda: nf.SGD(lr=0.5, momentum=0.9), 3, 8, "update"),
    "adam-update": (lambda: nf.Adam(lr=1e4), 1, 8, "update"),
    "adam-acc3-update": (lambda: nf.Adam(lr=1e4), 3, 8, "update"),
    "adam-acc3-loss": (lambda: nf.Adam(lr=1e15), 3, 8, "loss"),
    "fullbatch-epoch-end": (lambda: nf.SGD(lr=0.5, momentum=0.9), 1, None, "update"),
}


@pytest.mark.filterwarnings("error::RuntimeWarning")  # fit is silent on overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DIVERGING))
def test_divergence_keeps_the_last_good_step(backend, case):
    make_opt, acc, bs, kind = DIVERGING[case]
    X, Y = regression()
    kw = dict(loss="mse", epochs=30, batch_size=bs, accumulate=acc, seed=0)
    # reference: the same run through Python after every iteration, recording each step
    ref_opt = make_opt()
    rec = Recorder(ref_opt)
    with pytest.raises(nf.DivergenceError) as ref_info:
        linear_net(backend).fit(X, Y, optimizer=ref_opt, callbacks=[rec], **kw)
    # the fast path
    model, opt = linear_net(backend), make_opt()
    with pytest.raises(nf.DivergenceError) as info:
        model.fit(X, Y, optimizer=opt, **kw)
    err = info.value
    assert isinstance(err, FloatingPointError)
    assert (err.epoch, err.iteration) == (ref_info.value.epoch, ref_info.value.iteration)
    assert f"epoch {err.epoch}, iteration {err.iteration}" in str(err)
    assert ("loss became" in str(err)) == (kind == "loss")
    hist = err.history
    assert model.history is hist
    steps = hist.steps
    weights, state, iterations = rec.steps[steps]
    assert_same(model.get_weights(), weights)                 # the last good step ...
    assert_same([a for _, a in opt.state_arrays()], state)    # ... its optimizer state
    assert opt.iterations == steps
    assert finite(model.get_weights()) and finite(state)
    if steps + 1 in rec.steps:                                # ... and the next one was bad
        assert not finite(rec.steps[steps + 1][0] + rec.steps[steps + 1][1])
    else:
        assert kind == "loss"
    assert hist.iterations == iterations == len(hist.batch_losses)
    assert all(np.isfinite(hist.batch_losses))
    assert model.accumulated_samples == 0


@pytest.mark.filterwarnings("error::RuntimeWarning")  # fit is silent on overflow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in DIVERGING if DIVERGING[c][3] == "update"])
def test_divergence_goes_back_right_through_copies_an_earlier_fit_left(backend, case):
    """fit keeps its copy of the parameters and optimizer state on the model from one
    fit to the next (training._kept_copies): going back to the last good step through
    those buffers gives what a model without them gets."""
    make_opt, acc, bs, _ = DIVERGING[case]
    X, Y = regression()
    kw = dict(loss="mse", epochs=30, batch_size=bs, accumulate=acc, seed=0)
    results = []
    for forget in (False, True):
        model, opt = linear_net(backend), make_opt()
        model.fit(X, Y, loss="mse", optimizer=nf.SGD(lr=1e-3), epochs=2, batch_size=16,
                  seed=1)
        assert model._restart_copies is not None
        if forget:
            model._restart_copies = None
        with pytest.raises(nf.DivergenceError) as info:
            model.fit(X, Y, optimizer=opt, **kw)
        results.append(((info.value.epoch, info.value.iteration), model.get_weights(),
                        [a for _, a in opt.state_arrays()]))
    (where, weights, state), (where_ref, weights_ref, state_ref) = results
    assert where == where_ref
    assert_same(weights, weights_ref)
    assert_same(state, state_ref)
    assert finite(weights) and finite(state)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # fit is silent on overflow
@pytest.mark.parametrize("backend", BACKENDS)
def test_divergence_never_reaches_a_checkpoint(tmp_path, backend):
    """The update that overflows is caught before the checkpoint after it is written:
    the file holds the last good step and resumes."""
    X, Y = regression()
    ckpt = tmp_path / "c.npz"
    model = linear_net(backend)
    with pytest.raises(nf.DivergenceError) as info:
        model.fit(X, Y, loss="mse", optimizer=nf.SGD(lr=0.3, momentum=0.9), epochs=30,
                  batch_size=8, seed=0, checkpoint=ckpt, checkpoint_every=1)
    saved, opt = nf.load(ckpt, with_optimizer=True)
    assert_same(saved.get_weights(), model.get_weights())
    assert opt.iterations == info.value.history.steps


# --------------------------------------------------------------------------- KeyboardInterrupt
class InterruptAt(nf.Callback):
    def __init__(self, iteration=None, epoch=None):
        self.iteration, self.epoch = iteration, epoch

    def on_batch_end(self, iteration, logs):
        if iteration == self.iteration:
            raise KeyboardInterrupt

    def on_epoch_end(self, epoch, logs):
        if epoch == self.epoch:
            raise KeyboardInterrupt


FIT = dict(loss="cross_entropy", epochs=3, batch_size=16, accumulate=3, seed=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", ["momentum", "adam"])
def test_keyboard_interrupt_from_batch_callback(backend, opt_name):
    """Raised in the middle of an accumulation group: the group is dropped, the weights
    are those of the last step, History covers exactly the steps taken."""
    make = {"momentum": lambda: nf.SGD(lr=0.1, momentum=0.9), "adam": lambda: nf.Adam()}
    X, y = classification()
    ref_opt = make[opt_name]()
    rec = Recorder(ref_opt)
    h_ref = classifier(backend).fit(X, y, optimizer=ref_opt, callbacks=[rec], **FIT)
    model, opt = classifier(backend), make[opt_name]()
    at = 25 + 10       # 25 iterations per epoch: epoch 2, iteration 11, 2 of its group done
    with pytest.raises(KeyboardInterrupt) as info:
        model.fit(X, y, optimizer=opt, callbacks=[InterruptAt(iteration=at)], **FIT)
    hist = info.value.history
    assert model.history is hist
    assert (hist.epochs, hist.iterations, hist.steps) == (1, 25 + 9, 9 + 3)
    assert hist.batch_losses == h_ref.batch_losses[:25 + 9]
    assert hist.history == {k: v[:1] for k, v in h_ref.history.items()}
    weights, state, _ = rec.steps[hist.steps]
    assert_same(model.get_weights(), weights)
    assert_same([a for _, a in opt.state_arrays()], state)
    assert opt.iterations == hist.steps and model.accumulated_samples == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_keyboard_interrupt_from_epoch_callback(backend):
    X, y = classification()
    ref = classifier(backend)
    ref.fit(X, y, optimizer=nf.SGD(lr=0.1, momentum=0.9), **dict(FIT, epochs=2))
    model = classifier(backend)
    with pytest.raises(KeyboardInterrupt) as info:
        model.fit(X, y, optimizer=nf.SGD(lr=0.1, momentum=0.9),
                  callbacks=[InterruptAt(epoch=1)], **FIT)
    hist = info.value.history
    assert (hist.epochs, hist.iterations, hist.steps) == (2, 50, 18)
    assert len(hist.history["loss"]) == 2
    assert_same(model.get_weights(), ref.get_weights())


def _interrupt_soon(delay):
    timer = threading.Timer(delay, lambda: signal.raise_signal(signal.SIGINT))
    timer.start()
    return timer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["fast-path", "per-batch"])
def test_real_sigint_stops_at_a_step_boundary(backend, per_batch):
    """SIGINT from another thread during a long fit: KeyboardInterrupt propagates soon,
    the weights are those of an uninterrupted run after the same number of steps."""
    X, y = classification(n=1000)
    kw = dict(FIT, epochs=10_000, accumulate=2, batch_size=8)

    class Quiet(nf.Callback):
        def on_batch_end(self, iteration, logs):
            pass

    model, opt = classifier(backend), nf.SGD(lr=0.01, momentum=0.9)
    timer = _interrupt_soon(0.3)
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            model.fit(X, y, optimizer=opt, callbacks=[Quiet()] if per_batch else [], **kw)
    finally:
        timer.cancel()
    assert time.perf_counter() - t0 < 3.0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    hist = info.value.history
    n_iters = 125
    assert hist.steps > 0 and opt.iterations == hist.steps
    in_epoch = hist.iterations - hist.epochs * n_iters
    assert in_epoch % 2 == 0 or in_epoch == n_iters                   # a step boundary
    assert hist.steps == hist.epochs * 63 + -(-in_epoch // 2)
    assert hist.iterations == len(hist.batch_losses)
    assert model.accumulated_samples == 0
    # the reference run stopped by a callback right after the same iteration
    ref = classifier(backend)
    with pytest.raises(KeyboardInterrupt) as ref_info:
        ref.fit(X, y, optimizer=nf.SGD(lr=0.01, momentum=0.9),
                callbacks=[InterruptAt(iteration=hist.iterations - 1)], **kw)
    assert ref_info.value.history.steps == hist.steps
    assert ref_info.value.history.batch_losses == hist.batch_losses
    assert_same(model.get_weights(), ref.get_weights())


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigint_inside_an_optimizer_step_waits_for_the_whole_step(backend, monkeypatch):
    """A Ctrl-C arriving between two parameter arrays' updates is held until the step is
    complete: never half a step (direct ``opt.step`` and inside ``fit``)."""
    X, y = classification(n=64)
    be = get_backend(backend)
    real = be.sgd_update
    calls = []

    def update_then_sigint(*args):
        real(*args)
        calls.append(1)
        if len(calls) == trigger:
            signal.raise_signal(signal.SIGINT)   # handled right here, between arrays

    monkeypatch.setattr(be, "sgd_update", update_then_sigint)
    ref, model = classifier(backend), classifier(backend)
    ref_opt, opt = nf.SGD(lr=0.1, momentum=0.9), nf.SGD(lr=0.1, momentum=0.9)
    trigger = 0
    ref.compute_gradients(X, y, loss="cross_entropy")
    ref_opt.step(ref)
    trigger = len(calls) + 1                      # after the first of the four arrays
    model.compute_gradients(X, y, loss="cross_entropy")
    with pytest.raises(KeyboardInterrupt):
        opt.step(model)
    assert_same(model.get_weights(), ref.get_weights())
    assert_same([a for _, a in opt.state_arrays()], [a for _, a in ref_opt.state_arrays()])
    assert opt.iterations == 1 and model.accumulated_samples == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if backend == "numpy":    # the Python loop of fit steps through opt.step too
        calls.clear()
        trigger = 4 + 2                           # second array of the second step
        model, opt = classifier(backend), nf.SGD(lr=0.1, momentum=0.9)
        with pytest.raises(KeyboardInterrupt) as info:
            model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=3, batch_size=16,
                      seed=0)
        hist = info.value.history
        assert hist.steps >= 2 and opt.iterations == hist.steps == hist.iterations
        monkeypatch.undo()
        ref = classifier(backend)
        with pytest.raises(KeyboardInterrupt):
            ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1, momentum=0.9),
                    epochs=3, batch_size=16, seed=0,
                    callbacks=[InterruptAt(iteration=hist.iterations - 1)])
        assert_same(model.get_weights(), ref.get_weights())


def test_application_sigint_handler_is_left_alone():
    X, y = classification(n=64)
    seen = []

    def handler(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGINT, handler)
    try:
        class Poke(nf.Callback):
            def on_batch_end(self, iteration, logs):
                if iteration == 1:
                    assert signal.getsignal(signal.SIGINT) is handler
                    signal.raise_signal(signal.SIGINT)

        hist = classifier("cython").fit(X, y, loss="cross_entropy", batch_size=16,
                                        callbacks=[Poke()])
        assert hist.iterations == 4 and seen == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, old)


def test_fit_outside_the_main_thread_ignores_signals():
    X, y = classification(n=64)
    out = {}

    def work():
        out["hist"] = classifier("cython").fit(X, y, loss="cross_entropy", batch_size=16)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out["hist"].iterations == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
