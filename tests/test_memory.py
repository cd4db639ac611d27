"""Memory behaviour of training: no allocations per step, no copy of X, bounded RSS."""
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import nnfast as nf


def _model(backend="cython", dtype="float32"):
    return nf.Sequential(nf.Dense(64, 96, activation="relu"),
                         nf.Dense(96, 48, activation="tanh"),
                         nf.Dense(48, 10, activation="softmax"),
                         dtype=dtype, seed=0, backend=backend)


def _data(n, d=64, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d), dtype=dtype), rng.integers(0, 10, n)


@pytest.mark.parametrize("batch_size", [1, 2, 32, 256])
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_compiled_run_allocates_nothing_per_step(batch_size, optimizer):
    """A run of many iterations through the compiled path allocates nothing per step
    once the workspace exists (steady state): two steps or a whole epoch cost the same
    small, constant amount per call."""
    X, y = _data(4096)
    model = _model()
    opt = {"sgd": nf.SGD(lr=0.01), "momentum": nf.SGD(lr=0.01, momentum=0.9),
           "adam": nf.Adam()}[optimizer]
    model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=batch_size, epochs=1)
    backend = model._backend
    n_iters = nf.iterations_per_epoch(len(X), batch_size)
    order = np.random.default_rng(1).permutation(len(X)).astype(np.int64)
    labels = y.astype(np.int64)
    T = np.empty((0, 10), dtype=np.float32)
    out_loss = np.empty(n_iters)
    out_correct = np.zeros(n_iters, dtype=np.int64)
    group = np.zeros(2, dtype=np.int64)
    from nnfast.losses import CROSS_ENTROPY

    def traced_run(it1):
        group[:] = 0
        args = (model, X, T, labels, order, batch_size, 0, it1, n_iters, 1, CROSS_ENTROPY,
                opt, group, out_loss, out_correct)
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            failed, steps = backend.run_iterations(*args)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert failed == -1 and steps == (n_iters if it1 == n_iters else it1)
        return peak - before

    traced_run(n_iters)  # warm: optimizer state and batch buffers exist now
    # tracemalloc also sees other threads (left running by earlier tests), so take the
    # least of a few runs of each
    short = min(traced_run(2) for _ in range(3))
    full = min(traced_run(n_iters) for _ in range(3))
    # a constant per call (argument buffers, the returned tuple; a large step count is
    # one more int object than a small cached one), nothing per step
    assert abs(full - short) <= 64, f"{full} bytes over {n_iters} steps vs {short} over 2"
    assert full < 8192, full


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_fit_never_copies_X_and_allocates_per_epoch_only(backend):
    """fit's extra memory is per-epoch bookkeeping (permutation, per-iteration losses),
    far below one copy of X, and it does not grow with the number of steps."""
    X, y = _data(20_000)
    model = _model(backend)
    model.fit(X[:512], y[:512], loss="cross_entropy", batch_size=32)
    peaks = {}
    for bs in (64, 16):
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            model.fit(X, y, loss="cross_entropy", batch_size=bs, epochs=1, seed=0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        peaks[bs] = peak - before
    x_bytes = X.nbytes
    n = len(X)
    # permutation (8 B/sample) + finite-check chunk + per-iteration arrays and list
    for bs, extra in peaks.items():
        n_iters = -(-n // bs)
        bound = 8 * n + 8192 * 64 * 1 + n_iters * 120 + (256 << 10)
        assert extra < bound, (bs, extra, bound)
        assert extra < x_bytes / 4, (bs, extra, x_bytes)


def test_peak_rss_during_fit_is_bounded(tmp_path):
    """Peak RSS during fit <= data + 4 x parameters + 64 MB (measured in a fresh process)."""
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np
        import nnfast as nf
        rng = np.random.default_rng(0)
        X = rng.random((60_000, 784), dtype=np.float32)
        y = rng.integers(0, 10, 60_000)
        model = nf.Sequential(nf.Dense(784, 256, activation="relu"),
                              nf.Dense(256, 128, activation="relu"),
                              nf.Dense(128, 10, activation="softmax"), seed=0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model.fit(X, y, loss="cross_entropy", optimizer=nf.SGD(lr=0.01, momentum=0.9),
                  batch_size=128, epochs=1, seed=0)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        params = sum(w.nbytes for w in model.get_weights())
        print(before, after, params)
    """)
    path = tmp_path / "rss.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout.split()
    before, after, params = map(int, out)
    growth = after - before
    assert growth <= 4 * params + 64 * 2**20, (growth, params)


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_fit_reuses_its_copy_of_the_parameters(backend):
    """fit's copy of the parameters and optimizer state (what a divergence goes back to)
    lives on the model from one fit to the next: new buffers every fit are new pages,
    faulted in by the first copy (C/256: 38 ms of a 1.26 s epoch). A fit of another
    optimizer gets buffers of its shapes; copies and pickles of the model get none."""
    import copy
    import pickle
    X, y = _data(600)
    model = _model(backend)
    opt = nf.SGD(lr=0.01, momentum=0.9)
    model.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=100)
    kept = model._restart_copies
    params = [p for p, _ in model._params_and_grads()]
    assert len(kept) == 2 * len(params)          # parameters and momentum buffers
    ids = [id(a) for a in kept]
    model.fit(X, y, optimizer=opt, batch_size=50)
    assert [id(a) for a in model._restart_copies] == ids
    model.fit(X, y, optimizer=nf.Adam(), batch_size=50)
    assert len(model._restart_copies) == 3 * len(params)
    for twin in (copy.copy(model), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin._restart_copies is None

