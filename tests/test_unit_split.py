"""The unit split (issue 4, small-batch fast path on several threads).

At batches of 1 to 64 rows with any optimizer stepping every batch,
``_net_run`` hands a run of iterations to one parallel
region (``_unit_split_run``): each thread owns a block of the first hidden layer's units
(columns of W0 and b0, rows of W1), the threads meet once per batch to sum their
partials of layer 1's output, and every thread then runs the rest of the network (the
"tail") on its own copy of the tail's parameters. It must train what the row-split hand
loops and the NumPy backend train (the sums of layer 1's output are split by blocks, so
results agree to rounding, not bit for bit), stop where they stop on a non-finite loss,
give the same bits run after run whatever the arrays' alignment, and be taken only where
it applies.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels


class unit_split:
    """Context: the unit split on or off (the old setting is put back after)."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.old = _kernels._set_unit_split(self.on)[0]

    def __exit__(self, *exc):
        _kernels._set_unit_split(self.old)


@pytest.fixture(params=[2, 3], ids=["2t", "3t"])
def team(request):
    before = nf.get_num_threads()
    nf.set_num_threads(request.param)
    yield request.param
    nf.set_num_threads(before)


def make(sizes, dtype, hidden="relu", last="softmax", backend="cython"):
    layers = [nf.Dense(i, o, activation=hidden) for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation=last))
    return nf.Sequential(*layers, seed=3, dtype=dtype, backend=backend)


def data(sizes, dtype, zeros=False, n=150):
    rng = np.random.default_rng(5)
    X = rng.random((n, sizes[0]))
    if zeros:
        X[rng.random(X.shape) < 0.25] = 0.0
        X[:, :9] = 0.0
    return X.astype(dtype), rng.integers(0, sizes[-1], n)


def train(model, X, y, on, loss="cross_entropy", optimizer=None, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("batch_size", 1)
    kw.setdefault("seed", 1)
    with unit_split(on):
        h = model.fit(X, y, loss=loss, optimizer=optimizer or nf.SGD(lr=0.05), **kw)
    return h


# the serial build (no OpenMP) has one thread: there the unit split is never taken and
# these tests check that the hand loops it falls back to train the same
TAKEN = bool(_kernels.openmp_enabled())


def ran(model):
    return model._workspace.plan.unit_split_iterations


def assert_ran(model, iterations=None):
    if not TAKEN:
        assert ran(model) == 0
    elif iterations is None:
        assert ran(model) > 0
    else:
        assert ran(model) == iterations


def assert_close(m_a, m_b, h_a, h_b, rtol):
    for a, b in zip(m_a.get_weights(), m_b.get_weights()):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(h_a.batch_losses, h_b.batch_losses, rtol=rtol, atol=rtol)


def optimizer_state(opt):
    return [st[key] for st in opt._state for key in sorted(st)]


@pytest.fixture
def short_runs():
    """Runs of any length take the unit split (the tests' epochs are a few batches)."""
    old = _kernels._set_unit_split(True, -1, 1)
    yield
    _kernels._set_unit_split(*old)


def iterations(n, batch, epochs=2, drop_last=False):
    return epochs * (n // batch if drop_last else -(-n // batch))


def unit_iterations(sizes, n, batch, plain_sgd=True):
    """Iterations the unit split takes: all, but none at batch 2 (or 1, but for plain
    SGD) with a first layer of more than 65,536 weights (the hand loops win there)."""
    small = batch == 2 or (batch == 1 and not plain_sgd)
    return 0 if small and sizes[0] * sizes[1] > 65536 else iterations(n, batch)


# 203-330-10: units not a multiple of 16 (blocks end inside a vector); 64-128-10: two
# layers (the tail is b1 and the loss); 517-130-30-5: a tail of two layers;
# 100-40-3: the fewest units two threads take (16 and 24); 300-256-7: even blocks
@pytest.mark.parametrize("sizes", [(203, 330, 10), (64, 128, 10), (517, 130, 30, 5),
                                   (100, 40, 3), (300, 256, 7)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "ordered"])
def test_unit_split_trains_as_the_hand_loops_and_the_numpy_backend(team, sizes, zeros,
                                                                   shuffle):
    X, y = data(sizes, np.float64, zeros)
    m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
    h_on = train(m_on, X, y, True, shuffle=shuffle)
    h_off = train(m_off, X, y, False, shuffle=shuffle)
    # (100-40-3 on 3 threads: a team of 2, each thread needs 16 units)
    assert_ran(m_on, 2 * len(X))
    assert ran(m_off) == 0
    assert_close(m_on, m_off, h_on, h_off, 1e-9)
    ref = make(sizes, np.float64, backend="numpy")
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                    batch_size=1, seed=1, shuffle=shuffle)
    assert_close(m_on, ref, h_on, h_ref, 1e-9)
    assert (h_on.iterations, h_on.steps) == (h_ref.iterations, h_ref.steps)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("hidden", ["tanh", "sigmoid", "leaky_relu"])
def test_unit_split_with_other_hidden_activations(team, short_runs, hidden, batch):
    sizes = (120, 96, 24, 4)
    X, y = data(sizes, np.float64)
    m_on, m_off = make(sizes, np.float64, hidden), make(sizes, np.float64, hidden)
    h_on = train(m_on, X, y, True, batch_size=batch)
    h_off = train(m_off, X, y, False, batch_size=batch)
    assert_ran(m_on)
    assert_close(m_on, m_off, h_on, h_off, 1e-9)


@pytest.mark.parametrize("batch, shuffle", [(1, True), (16, True), (16, False)],
                         ids=["batch1", "batch16-shuffled", "batch16-ordered"])
@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy", "cross_entropy_probs"])
def test_unit_split_with_target_rows(team, short_runs, loss, batch, shuffle):
    rng = np.random.default_rng(11)
    X = rng.random((130, 90))
    if loss == "mse":
        last, T, name = "identity", rng.standard_normal((130, 6)), "mse"
    elif loss == "binary_cross_entropy":
        last, T, name = "sigmoid", (rng.random((130, 6)) < 0.4) * 1.0, "binary_cross_entropy"
    else:
        last, name = "softmax", "cross_entropy"
        T = rng.random((130, 6))
        T /= T.sum(axis=1, keepdims=True)
    models = [make((90, 64, 6), np.float64, last=last) for _ in range(2)]
    hists = [train(m, X, T, on, loss=name, optimizer=nf.SGD(lr=0.02), batch_size=batch,
                   shuffle=shuffle) for m, on in zip(models, (True, False))]
    assert_ran(models[0], iterations(130, batch))
    assert_close(*models, *hists, 1e-9)


def test_unit_split_in_float32_and_its_accuracy_counts(team):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32)
    m_on, m_off = make(sizes, np.float32), make(sizes, np.float32)
    h_on = train(m_on, X, y, True, validation_data=(X[:40], y[:40]))
    h_off = train(m_off, X, y, False, validation_data=(X[:40], y[:40]))
    assert_ran(m_on)
    assert_close(m_on, m_off, h_on, h_off, 2e-4)
    # the per-epoch training accuracy comes from the kernel's per-iteration counts
    # (float32 rounding may flip a near tie: at most one sample of 150 or 40)
    np.testing.assert_allclose(h_on.history["accuracy"], h_off.history["accuracy"],
                               atol=1 / 150 + 1e-12)
    assert 0 < h_on.history["accuracy"][-1] <= 1
    np.testing.assert_allclose(h_on.history["val_accuracy"], h_off.history["val_accuracy"],
                               atol=1 / 40 + 1e-12)


def off_line(arr, shift):
    """A copy of float32 ``arr`` starting ``shift`` floats after a 64-byte boundary."""
    buf = np.empty(arr.size + 64, dtype=np.float32)
    start = (-buf.ctypes.data // 4) % 16 + shift
    out = buf[start:start + arr.size].reshape(arr.shape)
    out[...] = arr
    return out


def assert_same_bits_at_every_alignment(shifts, optimizer=lambda: nf.SGD(lr=0.05), **fit):
    """W0, W2 and b1 of a 203-330-40-10 float32 model moved ``shift`` floats off a cache
    line: the same weights and losses, bit for bit, for every shift. The blocks' bounds
    and the tail copies' layout must not depend on where the arrays lie, or the sums
    (and the results) would change from process to process."""
    sizes = (203, 330, 40, 10)
    X, y = data(sizes, np.float32)
    results = []
    for shift in shifts:
        m = make(sizes, np.float32)
        m.layers[0].W = off_line(m.layers[0].W, shift)
        m.layers[2].W = off_line(m.layers[2].W, shift)
        m.layers[1].b = off_line(m.layers[1].b, shift)
        h = train(m, X, y, True, optimizer=optimizer(), **fit)
        assert_ran(m)
        results.append((m.get_weights(), h.batch_losses))
    for weights, losses in results[1:]:
        for a, b in zip(weights, results[0][0]):
            np.testing.assert_array_equal(a, b)
        assert losses == results[0][1]


def test_unit_split_is_deterministic_whatever_the_alignment(team):
    assert_same_bits_at_every_alignment((0, 4, 8, 12, 16))   # 0-64 bytes off


# batch 1: sample 71 mid-run, sample 99 the run's last; batches of 8 (the last holds rows
# 96..99): row 43 mid-run, row 97 in the last batch, row 61 with momentum
@pytest.mark.parametrize("batch, bad, opt", [(1, 71, "sgd"), (1, 99, "sgd"), (8, 43, "sgd"),
                                             (8, 97, "sgd"), (8, 61, "momentum")],
                         ids=["b1-mid-run", "b1-last", "b8-mid-run", "b8-last",
                              "b8-momentum"])
def test_divergence_stops_the_unit_split_where_the_hand_loops_stop(team, short_runs, batch,
                                                                   bad, opt):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32, n=100)
    X[bad, 5:45] = np.float32(3e38)      # this sample overflows the forward pass
    results = []
    for on in (True, False):
        m = make(sizes, np.float32)
        o = nf.SGD(lr=0.01, momentum=0.9 if opt == "momentum" else 0.0)
        with unit_split(on), pytest.raises(nf.DivergenceError) as err:
            m.fit(X, y, loss="cross_entropy", optimizer=o, epochs=1, batch_size=batch,
                  shuffle=False)
        results.append((m, o, err.value.history))
    (m_on, o_on, h_on), (m_off, o_off, h_off) = results
    assert_ran(m_on, bad // batch)
    # the History holds the good iterations before it; that batch changed nothing
    assert len(h_on.batch_losses) == bad // batch == len(h_off.batch_losses)
    assert_close(m_on, m_off, h_on, h_off, 2e-4)
    for a, b in zip(optimizer_state(o_on), optimizer_state(o_off)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


def test_workspace_holds_the_last_sample_after_a_unit_split_run(team):
    sizes = (64, 128, 10)
    X, y = data(sizes, np.float64)
    m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
    train(m_on, X, y, True, epochs=1, shuffle=False)
    train(m_off, X, y, False, epochs=1, shuffle=False)
    for name in ("Z", "A", "G"):
        for a, b in zip(getattr(m_on._workspace, name), getattr(m_off._workspace, name)):
            np.testing.assert_allclose(a[:1], b[:1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m_on.predict(X), m_off.predict(X), rtol=1e-9)


# (at batch 1, as here, the optimizers but plain SGD take it only for a first layer of
# at most 65,536 weights: here 76,800)
@pytest.mark.parametrize("case", ["accumulate", "momentum", "weight_decay", "adam",
                                  "batch65", "one_thread", "short_run", "few_units"])
def test_unit_split_is_taken_only_where_it_applies(case):
    sizes = {"few_units": (100, 24, 3), "momentum": (300, 256, 3),
             "weight_decay": (300, 256, 3), "adam": (300, 256, 3)}.get(case, (100, 64, 3))
    X, y = data(sizes, np.float64, n=40 if case == "short_run" else 150)
    opt = {"momentum": nf.SGD(lr=0.05, momentum=0.9),
           "weight_decay": nf.SGD(lr=0.05, weight_decay=1e-3),
           "adam": nf.Adam(lr=1e-3)}.get(case, nf.SGD(lr=0.05))
    kw = {"accumulate": 2} if case == "accumulate" else {}
    if case == "batch65":  # runs of 3 iterations allowed: only the batch size says no
        kw["batch_size"] = 65
        old = _kernels._set_unit_split(True, -1, 1)
    before = nf.get_num_threads()
    nf.set_num_threads(1 if case == "one_thread" else 2)
    try:
        m = make(sizes, np.float64)
        w0 = m.get_weights()
        h = train(m, X, y, True, optimizer=opt, **kw)
        assert ran(m) == 0
        assert h.steps > 0 and not np.array_equal(m.get_weights()[0], w0[0])
    finally:
        nf.set_num_threads(before)
        if case == "batch65":
            _kernels._set_unit_split(*old)


def test_unit_split_setting_returns_the_previous_one():
    old = _kernels._set_unit_split(False)
    try:
        assert _kernels._set_unit_split(True)[0] is False
        assert _kernels._set_unit_split(True, 5)[1] == old[1]
        assert _kernels._set_unit_split(True, old[1])[1] == 5
        assert _kernels._set_unit_split(True, -1, 7, 9)[2:] == old[2:]
        assert _kernels._set_unit_split(True, -1, old[2], old[3])[2:] == (7, 9)
    finally:
        _kernels._set_unit_split(*old)


# ---------------------------------------------------------------- batches of 2..64 rows
# The same split for a batch of m rows: each thread takes its units of every row, the
# threads meet once per batch (partials of z1 for the m rows), the tail runs for m rows
# on every thread's copy, and the steps are W -= lr/m * (sum over the rows).

@pytest.mark.parametrize("sizes", [(203, 330, 10), (64, 128, 10), (517, 130, 30, 5),
                                   (100, 40, 3)], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [2, 3, 8, 32, 64])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "ordered"])
def test_unit_split_of_batches_trains_as_the_hand_loops_and_the_numpy_backend(
        team, short_runs, sizes, batch, shuffle):
    # 150 rows: the last batch of each epoch is short (150 = 2*64 + 22 = 4*32 + 22 ...)
    X, y = data(sizes, np.float64, zeros=batch == 8)
    m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
    h_on = train(m_on, X, y, True, shuffle=shuffle, batch_size=batch)
    h_off = train(m_off, X, y, False, shuffle=shuffle, batch_size=batch)
    assert_ran(m_on, unit_iterations(sizes, len(X), batch))
    assert ran(m_off) == 0
    assert_close(m_on, m_off, h_on, h_off, 1e-9)
    ref = make(sizes, np.float64, backend="numpy")
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                    batch_size=batch, seed=1, shuffle=shuffle)
    assert_close(m_on, ref, h_on, h_ref, 1e-9)
    assert (h_on.iterations, h_on.steps) == (h_ref.iterations, h_ref.steps)


def test_unit_split_of_batches_with_drop_last(team, short_runs):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float64)
    m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
    h_on = train(m_on, X, y, True, batch_size=32, drop_last=True)
    h_off = train(m_off, X, y, False, batch_size=32, drop_last=True)
    assert_ran(m_on, iterations(len(X), 32, drop_last=True))
    assert_close(m_on, m_off, h_on, h_off, 1e-9)


def test_unit_split_of_batches_in_float32_and_its_accuracy_counts(team, short_runs):
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32)
    m_on, m_off = make(sizes, np.float32), make(sizes, np.float32)
    h_on = train(m_on, X, y, True, batch_size=16, validation_data=(X[:40], y[:40]))
    h_off = train(m_off, X, y, False, batch_size=16, validation_data=(X[:40], y[:40]))
    assert_ran(m_on)
    assert_close(m_on, m_off, h_on, h_off, 2e-4)
    np.testing.assert_allclose(h_on.history["accuracy"], h_off.history["accuracy"],
                               atol=1 / 150 + 1e-12)
    assert 0 < h_on.history["accuracy"][-1] <= 1


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_unit_split_of_batches_is_deterministic_whatever_the_alignment(team, short_runs,
                                                                       opt):
    assert_same_bits_at_every_alignment(
        (0, 4, 12), batch_size=8,
        optimizer=(lambda: nf.Adam(lr=1e-3)) if opt == "adam" else (lambda: nf.SGD(lr=0.05)))


def test_workspace_holds_the_last_batch_after_a_unit_split_run(team, short_runs):
    sizes = (64, 128, 10)
    X, y = data(sizes, np.float64)
    m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
    train(m_on, X, y, True, epochs=1, shuffle=False, batch_size=32)
    train(m_off, X, y, False, epochs=1, shuffle=False, batch_size=32)
    assert_ran(m_on)
    last = len(X) % 32   # the short last batch's rows
    for name in ("Z", "A", "G"):
        for a, b in zip(getattr(m_on._workspace, name), getattr(m_off._workspace, name)):
            np.testing.assert_allclose(a[:last], b[:last], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m_on.predict(X), m_off.predict(X), rtol=1e-9)


def test_a_wide_tail_holds_fewer_rows(team, short_runs):
    # layer 1 of 5,000 float64 units with nothing above it: a row of the tail's Z, A and G
    # is 120,000 bytes, so the copies (at most 1 MiB of rows) hold 8 rows
    sizes = (30, 64, 5000)
    X, y = data(sizes, np.float64, n=96)
    for batch, taken in ((8, True), (9, False)):
        m_on, m_off = make(sizes, np.float64), make(sizes, np.float64)
        h_on = train(m_on, X, y, True, batch_size=batch, epochs=1)
        h_off = train(m_off, X, y, False, batch_size=batch, epochs=1)
        if taken:
            assert_ran(m_on, iterations(len(X), batch, epochs=1))
        else:
            assert ran(m_on) == 0
        assert_close(m_on, m_off, h_on, h_off, 1e-9)


# ---------------------------------------------------------------- every optimizer, batches
# The unit split also takes the optimizers that keep gradient sums and state (at batch
# 1 too, through the batch worker): each thread steps its own columns of W0 and b0 (from private copies of their
# state), its rows of W1 (in place) and its copy of the tail (with a copy of the tail's
# state; thread 0's copy is the optimizer's own).
OPTIMIZERS = {
    "momentum": lambda: nf.SGD(lr=0.05, momentum=0.9),
    "nesterov_wd": lambda: nf.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "weight_decay": lambda: nf.SGD(lr=0.05, weight_decay=1e-2),
    "adam": lambda: nf.Adam(lr=1e-3, weight_decay=1e-3),
    "adamw": lambda: nf.Adam(lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("sizes", [(203, 330, 10), (517, 130, 30, 5), (100, 40, 3)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [1, 2, 8, 32])
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_unit_split_of_batches_with_every_optimizer(team, short_runs, sizes, batch, opt):
    X, y = data(sizes, np.float64)
    runs = []
    for on in (True, False):
        m, o = make(sizes, np.float64), OPTIMIZERS[opt]()
        h = train(m, X, y, on, optimizer=o, batch_size=batch)
        runs.append((m, o, h))
    (m_on, o_on, h_on), (m_off, o_off, h_off) = runs
    assert_ran(m_on, unit_iterations(sizes, len(X), batch, plain_sgd=False))
    assert ran(m_off) == 0
    assert_close(m_on, m_off, h_on, h_off, 1e-9)
    for a, b in zip(optimizer_state(o_on), optimizer_state(o_off)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert o_on.iterations == o_off.iterations == h_on.steps
    for layer in m_on.layers:   # the gradient sums are left at zero, as after any step
        assert not layer.dW.any() and not layer.db.any()
    ref, o_ref = make(sizes, np.float64, backend="numpy"), OPTIMIZERS[opt]()
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=o_ref, epochs=2,
                    batch_size=batch, seed=1)
    assert_close(m_on, ref, h_on, h_ref, 1e-9)


def test_unit_split_with_momentum_continues_across_fits(team, short_runs):
    # the velocity written back after one fit is where the next fit's run starts from
    sizes = (203, 330, 40, 10)
    X, y = data(sizes, np.float64)
    runs = []
    for on in (True, False):
        m, o = make(sizes, np.float64), nf.SGD(lr=0.02, momentum=0.9)
        for seed in (1, 2, 3):
            h = train(m, X, y, on, optimizer=o, batch_size=16, epochs=1, seed=seed)
        runs.append((m, o, h))
    assert_ran(runs[0][0])
    assert_close(runs[0][0], runs[1][0], runs[0][2], runs[1][2], 1e-9)
    for a, b in zip(optimizer_state(runs[0][1]), optimizer_state(runs[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)



# --- the lazy first layer (batch 1, plain SGD: the steps of W0 applied a block of
# samples at a time, the next block's z0 from W0 then and the samples' dot products) ---

class lazy_block:
    """Context: the unit split's lazy first layer with blocks of ``samples`` (0: off)."""

    def __init__(self, samples):
        self.samples = samples

    def __enter__(self):
        self.old = _kernels._set_unit_lazy_block(self.samples)

    def __exit__(self, *exc):
        _kernels._set_unit_lazy_block(self.old)


def passes(model):
    return model._workspace.plan.lazy_first_layer_passes


def expected_passes(n, block, runs):
    """One pass to start each run, one a block (the run's last included)."""
    return 0 if not TAKEN or not block else runs * (1 + -(-n // block))


@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("sizes", [(203, 330, 10), (517, 130, 30, 5), (100, 40, 3)],
                         ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "zeros"])
def test_lazy_first_layer_trains_as_a_step_every_sample(team, block, sizes, zeros):
    # 150 samples: the last block of each epoch holds 6 (block 8) or 2 (block 4)
    X, y = data(sizes, np.float64, zeros)
    runs = []
    for samples in (block, 0):
        m = make(sizes, np.float64)
        with lazy_block(samples):
            h = train(m, X, y, True)
        runs.append((m, h))
    (m_lazy, h_lazy), (m_each, h_each) = runs
    assert_ran(m_lazy, 2 * len(X))
    assert passes(m_lazy) == expected_passes(len(X), block, 2)
    assert passes(m_each) == 0
    assert_close(m_lazy, m_each, h_lazy, h_each, 1e-9)
    ref = make(sizes, np.float64, backend="numpy")
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                    batch_size=1, seed=1)
    assert_close(m_lazy, ref, h_lazy, h_ref, 1e-9)


def test_lazy_first_layer_in_float32_against_the_numpy_backend(team):
    # float32 rounding: the dot products are summed in another order than the forward
    # pass, so the comparison is to float32's precision over 300 steps
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float32)
    m = make(sizes, np.float32)
    with lazy_block(8):
        h = train(m, X, y, True)
    assert passes(m) == expected_passes(len(X), 8, 2)
    ref = make(sizes, np.float32, backend="numpy")
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.05), epochs=2,
                    batch_size=1, seed=1)
    assert_close(m, ref, h, h_ref, 2e-4)


class EveryBatch(nf.callbacks.Callback):
    """A per-batch callback: fit then runs one iteration per call."""

    def __init__(self):
        self.seen = 0

    def on_batch_end(self, iteration, logs):
        self.seen += 1


def test_lazy_first_layer_in_runs_of_one_sample(team, short_runs):
    # a per-batch callback makes every run a single sample: a block of one, started and
    # ended in the same run
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float64, n=40)
    runs = []
    for samples in (8, 0):
        m, cb = make(sizes, np.float64), EveryBatch()
        with lazy_block(samples):
            h = train(m, X, y, True, epochs=1, callbacks=[cb])
        assert cb.seen == len(X)
        runs.append((m, h))
    assert_ran(runs[0][0], len(X))
    assert passes(runs[0][0]) == expected_passes(1, 8, len(X))
    assert_close(runs[0][0], runs[1][0], runs[0][1], runs[1][1], 1e-9)


def test_lazy_first_layer_is_deterministic_whatever_the_alignment(team):
    with lazy_block(8):
        assert_same_bits_at_every_alignment((0, 4, 8, 12, 16))


@pytest.mark.parametrize("bad", [64, 71, 99], ids=["block-start", "block-end", "run-end"])
def test_divergence_inside_a_lazy_block_keeps_the_steps_before_it(team, short_runs, bad):
    # 100 samples in blocks of 8: sample 64 starts a block (nothing pending), 71 ends
    # one (7 steps pending), 99 is the last of the run's short block (3 pending). A
    # target of 1e200 makes the squared error infinite at that sample alone.
    sizes = (203, 330, 10)
    X, _ = data(sizes, np.float64, n=100)
    T = np.random.default_rng(7).random((100, 10))
    T[bad] = 1e200
    results = []
    for samples in (8, 0):
        m = make(sizes, np.float64, last="linear")
        with lazy_block(samples), unit_split(True), pytest.raises(nf.DivergenceError) as err:
            m.fit(X, T, loss="mse", optimizer=nf.SGD(lr=0.002), epochs=1, batch_size=1,
                  shuffle=False)
        assert len(err.value.history.batch_losses) == bad
        results.append((m, err.value.history))
    (m_lazy, h_lazy), (m_each, h_each) = results
    assert_ran(m_lazy, bad)
    pending = bad % 8
    assert passes(m_lazy) == (0 if not TAKEN else 1 + bad // 8 + (pending > 0))
    assert_close(m_lazy, m_each, h_lazy, h_each, 1e-9)


@pytest.mark.parametrize("bad", [64, 71], ids=["block-start", "block-end"])
def test_inputs_whose_dot_products_overflow_take_a_step_every_sample(team, short_runs, bad):
    # x . x overflows for the row of 1e308: the block holding it, and the rest of the
    # run, go one step a sample, and the run stops at that row as it does there (z0 is
    # infinite; in the block, inf - inf would have been NaN, which ReLU makes 0)
    sizes = (203, 330, 10)
    X, y = data(sizes, np.float64, n=100)
    X[bad] = 1e308
    results = []
    for samples in (8, 0):
        m = make(sizes, np.float64)
        with lazy_block(samples), unit_split(True), pytest.raises(nf.DivergenceError) as err:
            m.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.1), epochs=1,
                  batch_size=1, shuffle=False)
        assert len(err.value.history.batch_losses) == bad
        results.append((m, err.value.history))
    (m_lazy, h_lazy), (m_each, h_each) = results
    assert_ran(m_lazy, bad)
    assert passes(m_lazy) == (0 if not TAKEN else 1 + bad // 8)
    assert_close(m_lazy, m_each, h_lazy, h_each, 1e-9)


def test_lazy_block_setting_is_checked_and_returns_the_previous_one():
    old = _kernels._set_unit_lazy_block(4)
    try:
        assert _kernels._set_unit_lazy_block(0) == 4
        with pytest.raises(ValueError, match="samples"):
            _kernels._set_unit_lazy_block(3)
        assert _kernels._set_unit_lazy_block(8) == 0
    finally:
        _kernels._set_unit_lazy_block(old)
