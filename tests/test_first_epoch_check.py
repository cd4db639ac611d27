"""X's NaN/inf check in the first epoch (issue 4: one pass over X fewer).

On the compiled backend, where batches of more than the unit split's 64 rows are
gathered, a fit without callbacks, checkpoint or drop_last does not read all of X
before training: the kernels check each batch's rows as they gather them
(``run_iterations(..., check_x=True)``), a batch holding NaN or inf stops the run before
it is used, and fit then raises the ValueError of the up-front check with the model and
optimizer as they were before the call. These tests hold the kernels to stopping at
the right batch on every path they take, and fit to leaving nothing changed.
"""
import contextlib
import math

import numpy as np
import pytest

import nnfast as nf
import nnfast._validation as validation
from nnfast import losses
from nnfast._compiled import kernels as _kernels

pytestmark = pytest.mark.skipif(_kernels is None, reason="compiled kernels not built")

BAD_VALUES = [np.nan, np.inf, -np.inf]


@contextlib.contextmanager
def switches(opts):
    """The kernels' path switches of ``opts`` (``unit``: the unit split), put back after."""
    old = _kernels._set_unit_split(False)[0] if opts.get("unit") is False else None
    try:
        yield
    finally:
        if old is not None:
            _kernels._set_unit_split(old)


def make(sizes, dtype=np.float32, backend="cython"):
    layers = [nf.Dense(i, o, activation="relu") for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation="softmax"))
    return nf.Sequential(*layers, seed=4, dtype=dtype, backend=backend)


def data(sizes, n, dtype=np.float32, seed=6):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, sizes[0])).astype(dtype),
            rng.integers(0, sizes[-1], n))


def run(model, X, y, bs, order, check_x, it1=None):
    """One epoch's iterations 0..it1 through the backend, as fit runs them; returns
    (failed, steps, out_loss)."""
    n = X.shape[0]
    n_iters = -(-n // bs)
    it1 = n_iters if it1 is None else it1
    code, T, labels = losses.prepare_targets("cross_entropy", y, n, model.n_outputs,
                                             model.dtype)
    opt = nf.SGD(lr=0.05)
    opt._bind(model)
    model.zero_grad()
    out_loss = np.empty(n_iters)
    out_correct = np.zeros(n_iters, dtype=np.int64)
    failed, steps = model._backend.run_iterations(
        model, X, T, labels, order, bs, 0, it1, n_iters, 1, code, opt,
        np.zeros(2, dtype=np.int64), out_loss[:it1], out_correct[:it1], check_x)
    return failed, steps, out_loss


# (sizes, batch, path switches): the gathered gemm and hand-loop batches, the fused
# first-layer pass, the row split of small networks (gathered by its threads), the
# unit split's small batches (checked ahead of the run) and single rows read in place
PATHS = {
    "gather": ([50, 40, 10], 96, {}),
    "gather-wide": ([300, 64, 10], 200, {}),
    "fused-first-layer": ([300, 256, 7], 3, {"unit": False}),
    "row-split": ([12, 16, 3], 40, {"unit": False}),
    "unit-split": ([50, 40, 10], 4, {}),
    "unit-split-rows": ([50, 40, 10], 1, {}),
    "single-rows": ([50, 40, 10], 1, {"unit": False}),
}


def positive_first_layer(model):
    """W0 > 0: a -inf input then drives every first-layer unit to -inf, which ReLU makes
    0, so the loss stays finite and only the check can stop the batch."""
    ws = model.get_weights()
    ws[0] = np.abs(ws[0]) + 1e-3
    model.set_weights(ws)
    return model


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
@pytest.mark.parametrize("value", BAD_VALUES + ["silent"],
                         ids=["nan", "inf", "-inf", "-inf-finite-loss"])
def test_run_stops_at_the_batch_holding_the_bad_row(threads, path, shuffle, value):
    sizes, bs, opts = PATHS[path]
    prepare = positive_first_layer if value == "silent" else (lambda model: model)
    value = -np.inf if value == "silent" else value
    n = 24 * bs + bs // 2 + 1      # the unit split takes runs of 64 samples or more
    X, y = data(sizes, n)
    order = (np.random.default_rng(2).permutation(n).astype(np.int64) if shuffle
             else np.empty(0, dtype=np.int64))
    stop_at = 17
    pos = stop_at * bs + (bs - 1) // 2           # a row of iteration 17, mid-batch
    bad = X.copy()
    bad[order[pos] if shuffle else pos, sizes[0] // 3] = value
    with switches(opts):
        checked, clean = prepare(make(sizes)), prepare(make(sizes))
        failed, steps, out_loss = run(checked, bad, y, bs, order, True)
        # the same batches before it, on clean data, unchecked
        ref_failed, ref_steps, _ = run(clean, X, y, bs, order, False, it1=stop_at)
        # on clean data the check changes nothing
        whole, whole_ref = prepare(make(sizes)), prepare(make(sizes))
        assert run(whole, X, y, bs, order, True)[:2] == (-1, -(-n // bs))
        run(whole_ref, X, y, bs, order, False)
    assert failed == stop_at and steps == stop_at and math.isnan(out_loss[stop_at])
    assert (ref_failed, ref_steps) == (-1, stop_at)
    # the unit split hands a run holding a bad row to the other kernels, whose sums go in
    # another order: equal to rounding there, bit for bit elsewhere
    tol = dict(rtol=2e-5, atol=1e-6) if opts == {} and bs <= 64 else dict(rtol=0, atol=0)
    for a, b in zip(checked.get_weights(), clean.get_weights()):
        np.testing.assert_allclose(a, b, **tol)
    for a, b in zip(whole.get_weights(), whole_ref.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path,counter", [("unit-split", "unit_split_iterations"),
                                          ("unit-split-rows", "unit_split_iterations"),
                                          ("fused-first-layer", "fused_iterations")])
def test_the_paths_are_the_ones_named(path, counter):
    """On two threads the table above reaches the unit split and the fused first-layer
    pass (the plan's counters), so the tests run those paths' checks."""
    before = nf.get_num_threads()
    nf.set_num_threads(2)
    try:
        sizes, bs, opts = PATHS[path]
        n = 100 * bs
        X, y = data(sizes, n)
        model = make(sizes)
        with switches(opts):
            run(model, X, y, bs, np.random.default_rng(0).permutation(n), True)
    finally:
        nf.set_num_threads(before)
    assert getattr(model._workspace.plan, counter) > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_gather_rows_reports_non_finite_rows(threads, dtype, value):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 37)).astype(dtype)
    idx = rng.permutation(500)[:300].astype(np.int64)
    out = np.empty((300, 37), dtype=dtype)
    assert _kernels.gather_rows(X, idx, out, True) is True
    np.testing.assert_array_equal(out, X[idx])
    for r, c in ((0, 0), (150, 36), (299, 17)):
        bad = X.copy()
        bad[idx[r], c] = value
        assert _kernels.gather_rows(bad, idx, out, True) is False
        np.testing.assert_array_equal(out, bad[idx])   # copied all the same
        assert _kernels.gather_rows(bad, idx, out) is True   # no check asked
    # a bad row not gathered is not reported
    bad = X.copy()
    bad[np.setdiff1d(np.arange(500), idx)[0], 3] = value
    assert _kernels.gather_rows(bad, idx, out, True) is True


def test_numpy_backend_check_x_stops_where_the_kernels_do():
    sizes, bs = [50, 40, 10], 96
    n = 700
    X, y = data(sizes, n, np.float64)
    order = np.random.default_rng(3).permutation(n).astype(np.int64)
    X[order[4 * bs + 5], 7] = np.nan
    results = [run(make(sizes, np.float64, backend), X, y, bs, order, True)[:2]
               for backend in ("numpy", "cython")]
    assert results == [(4, 4), (4, 4)]


# ---- fit ------------------------------------------------------------------------------

def full_scans(monkeypatch, n_rows):
    """Calls of the NaN/inf check on an array of n_rows rows (the up-front pass)."""
    seen = []
    original = validation.check_finite

    def spy(arr, name):
        if name == "X" and arr.ndim == 2 and arr.shape[0] == n_rows:
            seen.append(arr.shape)
        return original(arr, name)

    monkeypatch.setattr(validation, "check_finite", spy)
    return seen


def test_large_batches_skip_the_pass_over_x(monkeypatch):
    X, y = data([30, 20, 4], 1000)
    seen = full_scans(monkeypatch, 1000)
    make([30, 20, 4]).fit(X, y, loss="cross_entropy", batch_size=128, seed=0)
    make([30, 20, 4]).fit(X, y, loss="cross_entropy", batch_size=None, seed=0)
    make([30, 20, 4]).fit(X, y, loss="cross_entropy", batch_size=np.int64(100), seed=0)
    assert seen == []


@pytest.mark.parametrize("case", ["small batch", "callback", "checkpoint", "drop_last",
                                  "numpy backend", "batch 64"])
def test_other_fits_check_x_before_training(monkeypatch, tmp_path, case):
    X, y = data([30, 20, 4], 1000)
    seen = full_scans(monkeypatch, 1000)
    kw = dict(loss="cross_entropy", batch_size=128, seed=0)
    backend = "cython"
    if case == "small batch":
        kw["batch_size"] = 16
    elif case == "batch 64":
        kw["batch_size"] = 64
    elif case == "callback":
        kw["callbacks"] = [nf.callbacks.EarlyStopping(monitor="loss", patience=3)]
    elif case == "checkpoint":
        kw["checkpoint"] = tmp_path / "ck.nnf"
    elif case == "drop_last":
        kw["drop_last"] = True
    else:
        backend = "numpy"
    make([30, 20, 4], backend=backend).fit(X, y, **kw)
    assert len(seen) == 1


def state_of(model, opt):
    return ([w.copy() for w in model.get_weights()],
            [{k: v.copy() for k, v in st.items()} for st in opt._state], opt.iterations)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("batch", [65, 128, None], ids=["65", "128", "full"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
def test_fit_raises_and_leaves_model_and_optimizer_as_they_were(threads, dtype, where,
                                                                 value, batch, shuffle):
    sizes = [30, 24, 4]
    X, y = data(sizes, 900, dtype)
    model = make(sizes, dtype)
    opt = nf.Adam(lr=0.01)
    first = model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=batch,
                      epochs=2, seed=0)
    before = state_of(model, opt)
    bad = X.copy()
    bad[{"first": 0, "middle": 450, "last": 899}[where], 11] = value
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        model.fit(bad, y, loss="cross_entropy", optimizer=opt,
                  batch_size=batch, epochs=3, seed=1, shuffle=shuffle)
    after = state_of(model, opt)
    for a, b in zip(after[0] + [v for st in after[1] for v in st.values()],
                    before[0] + [v for st in before[1] for v in st.values()]):
        np.testing.assert_array_equal(a, b)
    assert after[2] == before[2]
    assert model.history is first and model.loss == "cross_entropy"
    # and the model trains on as if the failed call had not been made
    twin, twin_opt = make(sizes, dtype), nf.Adam(lr=0.01)
    twin.fit(X, y, loss="cross_entropy", optimizer=twin_opt, batch_size=batch, epochs=2,
             seed=0)
    for m, o in ((model, opt), (twin, twin_opt)):
        m.fit(X, y, optimizer=o, batch_size=batch, seed=5)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_fresh_model_and_optimizer_stay_unfitted_and_unbound():
    sizes = [30, 24, 4]
    X, y = data(sizes, 600)
    X[300, 2] = np.nan
    model, opt = make(sizes), nf.SGD(lr=0.1, momentum=0.9)
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="X contains NaN or infinity") as info:
        model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=100, seed=0)
    assert not hasattr(info.value, "history")
    assert model.loss is None and model.history is None
    assert opt._model_ref is None and opt._state == [] and opt.iterations == 0
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    other = make([5, 3, 2])     # the optimizer is free for another model
    other.fit(np.ones((10, 5), np.float32), np.zeros(10, np.int64), loss="cross_entropy",
              optimizer=opt)


def test_bad_row_after_a_divergence_is_reported_as_bad_x():
    """The up-front check would have named X: so does the deferred one, when an earlier
    batch's loss turns non-finite before the bad row's batch is reached."""
    sizes = [30, 24, 4]
    X, y = data(sizes, 600)
    X[599, 0] = np.nan   # last batch, in order
    model = make(sizes)
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=1e30), batch_size=100,
                  shuffle=False)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    # and without the bad row, that fit diverges
    X[599, 0] = 0.0
    with pytest.raises(nf.DivergenceError):
        make(sizes).fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=1e30),
                        batch_size=100, shuffle=False)


def test_validation_rows_are_checked_before_training(monkeypatch):
    sizes = [30, 24, 4]
    X, y = data(sizes, 1000)
    X[950, 4] = np.inf    # in the validation split, which no epoch gathers
    model = make(sizes)
    weights = [w.copy() for w in model.get_weights()]
    trained = []
    original = type(model._backend).run_iterations
    monkeypatch.setattr(type(model._backend), "run_iterations",
                        lambda self, *a, **k: trained.append(1) or original(self, *a, **k))
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        model.fit(X, y, loss="cross_entropy", batch_size=128, validation_split=0.1)
    assert trained == []
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_bad_x_with_a_clean_validation_split_is_found_in_the_epoch(monkeypatch):
    sizes = [30, 24, 4]
    X, y = data(sizes, 1000)
    X[10, 4] = -np.inf
    model = make(sizes)
    first = model.fit(X[20:], y[20:], loss="cross_entropy", batch_size=128)
    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        model.fit(X, y, batch_size=128, validation_split=0.1, epochs=4)
    assert model.history is first
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accumulate", [2, 3])
def test_bad_row_inside_an_accumulation_group(threads, accumulate):
    sizes = [30, 24, 4]
    X, y = data(sizes, 1000)
    model, opt = make(sizes), nf.SGD(lr=0.05, momentum=0.9)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=100, seed=0)
    before = state_of(model, opt)
    bad = X.copy()
    bad[417, 3] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        model.fit(bad, y, optimizer=opt, batch_size=100, accumulate=accumulate, seed=3)
    after = state_of(model, opt)
    for a, b in zip(after[0] + [v for st in after[1] for v in st.values()],
                    before[0] + [v for st in before[1] for v in st.values()]):
        np.testing.assert_array_equal(a, b)
    assert after[2] == before[2] and model.accumulated_samples == 0
