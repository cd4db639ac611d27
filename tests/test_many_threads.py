"""Training on more kernel threads than this machine has cores: 16, as on the many-core
machine of issue 4 (item 6), and an odd 5.

Every path the kernels split across threads (the unit split at small batches, the row
and tail splits, the gemm path with its products split in panels, the epilogues) sizes
its blocks from the team; a team of 16 makes blocks that 2 or 3 threads never do (units
of W0 shared 16 ways, rows of a batch of 8 that some threads get none of). Those runs are
checked here against the NumPy backend, so that the first run on many cores is not where
they are tried first. Speed is not: 16 threads on 2 cores only take turns.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast._compiled import kernels as _kernels

pytestmark = pytest.mark.skipif(_kernels is None, reason="kernels not built")

# the workloads, C narrowed to keep the run short (its 4096 units -> 1024)
NETS = {"A": (784, 256, 128, 10), "B": (64, 128, 10), "C": (512, 1024, 1024, 10)}


@pytest.fixture(params=[16, 5], ids=["16t", "5t"])
def threads(request):
    before = nf.get_num_threads()
    yield request.param
    nf.set_num_threads(before)


def _model(sizes, backend, dtype):
    layers = [nf.Dense(i, o, activation="relu") for i, o in zip(sizes[:-2], sizes[1:-1])]
    layers.append(nf.Dense(sizes[-2], sizes[-1], activation="softmax"))
    return nf.Sequential(*layers, seed=2, dtype=dtype, backend=backend)


def _data(sizes, n, dtype):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    X[rng.random(X.shape) < 0.2] = 0   # zeros: the unit split skips them
    return X, rng.integers(0, sizes[-1], n)


def _fit_both(threads, net, batch, dtype="float32", optimizer=lambda: nf.SGD(lr=0.01),
              n=None, **kw):
    sizes = NETS[net]
    n = n or (40 if batch < 8 else 4 * batch + 7)   # a short last batch
    X, y = _data(sizes, n, dtype)
    ref = _model(sizes, "numpy", dtype)
    nf.set_num_threads(2)
    h_ref = ref.fit(X, y, loss="cross_entropy", optimizer=optimizer(), epochs=2,
                    batch_size=batch, seed=1, verbose=0, **kw)
    model = _model(sizes, "cython", dtype)
    nf.set_num_threads(threads)
    h = model.fit(X, y, loss="cross_entropy", optimizer=optimizer(), epochs=2,
                  batch_size=batch, seed=1, verbose=0, **kw)
    return model, ref, h, h_ref, X


def _close(model, ref, h, h_ref, X, dtype):
    tol = dict(rtol=2e-3, atol=2e-5) if dtype == "float32" else dict(rtol=1e-9, atol=1e-12)
    for w, w_ref in zip(model.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(w, w_ref, **tol)
    np.testing.assert_allclose(h.batch_losses, h_ref.batch_losses, rtol=tol["rtol"] * 5)
    np.testing.assert_allclose(model.predict(X), ref.predict(X), **tol)


@pytest.mark.parametrize("net, batch", [
    ("A", 1), ("A", 2), ("A", 8), ("A", 32), ("A", 128), ("A", 512),
    ("B", 1), ("B", 32), ("B", 256), ("C", 1), ("C", 64), ("C", 256),
])
def test_training_on_many_threads_matches_numpy(threads, net, batch):
    _close(*_fit_both(threads, net, batch), "float32")


@pytest.mark.parametrize("net, batch", [("A", 1), ("A", 32), ("B", 256), ("C", 64)])
def test_float64_on_many_threads_matches_numpy(threads, net, batch):
    _close(*_fit_both(threads, net, batch, dtype="float64"), "float64")


@pytest.mark.parametrize("net, batch", [("A", 1), ("A", 8), ("B", 32), ("C", 128)])
def test_accumulation_and_adam_on_many_threads_match_numpy(threads, net, batch):
    # float64: Adam turns float32's rounding in a near-zero gradient into a step of
    # about lr either way, which says nothing about how the work was split
    _close(*_fit_both(threads, net, batch, dtype="float64",
                      optimizer=lambda: nf.Adam(lr=1e-3), accumulate=3), "float64")


@pytest.fixture
def no_unit_split():
    """Small batches stepping every batch take the unit split on several threads; with it
    off they take the row and tail splits (rows of the batch shared out)."""
    old = _kernels._set_unit_split(False)[0]
    yield
    _kernels._set_unit_split(old)


@pytest.mark.parametrize("net, batch", [("A", 1), ("A", 8), ("A", 32), ("B", 1), ("B", 32),
                                        ("C", 64)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_row_and_tail_splits_on_many_threads_match_numpy(threads, no_unit_split, net, batch,
                                                         dtype):
    _close(*_fit_both(threads, net, batch, dtype=dtype), dtype)
