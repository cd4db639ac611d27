"""pytest-benchmark suite: one epoch of training per (workload, batch size) and contender.

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only -k "A-32"              # one case
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Contenders: nnfast's compiled backend, nnfast's NumPy backend and (when importable) an
idiomatic PyTorch CPU loop, all with the same thread count (nnfast's default: every
usable core). Workloads and loops are those of ``nnfast.bench`` (float32, ReLU hidden
layers, softmax cross-entropy, plain SGD lr 0.01, a shuffled epoch), on a modest N per
case so that the whole suite takes a few minutes at most. For the interleaved comparison
with 1- and 2-thread baselines, medians, ratios and the sgemm bound, use
``python -m nnfast bench``. Nothing here asserts a speed.
"""
import numpy as np
import pytest

import nnfast as nf
from nnfast import bench

# (workload, batch) -> samples per timed epoch
SUITE_N = {
    ("A", 1): 256, ("A", 8): 1024, ("A", 32): 2048, ("A", 128): 8192, ("A", 512): 8192,
    ("B", 1): 1024, ("B", 32): 8192, ("B", 256): 8192,
    ("C", 256): 512,
}
ROUNDS = 3

torch, _torch_error = bench.import_torch()
KINDS = ["nnfast", "numpy", "torch"]


@pytest.fixture(scope="module")
def data():
    """Synthetic data per workload, made once: X uniform in [0, 1), random labels."""
    cache = {}

    def get(workload):
        if workload not in cache:
            sizes = bench.WORKLOADS[workload]
            n = max(v for (w, _), v in SUITE_N.items() if w == workload)
            rng = np.random.default_rng(0)
            cache[workload] = (rng.random((n, sizes[0]), dtype=np.float32),
                               rng.integers(0, sizes[-1], n, dtype=np.int64))
        return cache[workload]

    return get


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    saved = nf.get_num_threads()
    saved_torch = torch.get_num_threads() if torch is not None else None
    yield
    nf.set_num_threads(saved)
    if torch is not None:
        torch.set_num_threads(saved_torch)


def _contender(kind, threads):
    if kind == "nnfast":
        return bench.NnfastContender("cython", threads, "nnfast")
    if kind == "numpy":
        return bench.NnfastContender("numpy", threads, f"numpy-{threads}t")
    if torch is None:
        pytest.skip(f"torch not importable ({_torch_error})")
    return bench.TorchContender(torch, threads)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("workload,batch", list(SUITE_N), ids=[f"{w}-{b}" for w, b in SUITE_N])
def test_train_epoch(benchmark, data, workload, batch, kind):
    sizes = bench.WORKLOADS[workload]
    n = SUITE_N[(workload, batch)]
    X, y = data(workload)
    threads = nf.get_num_threads()
    c = _contender(kind, threads)
    c.setup(sizes, X, y, batch)
    try:
        c.activate()
        c.train(min(n, 2 * batch), 1)  # warm-up: workspaces and thread pools, not timed
        benchmark.group = f"{workload}/{batch} ({'-'.join(map(str, sizes))})"
        benchmark.extra_info.update(workload=workload, batch=batch, samples=n,
                                    threads=threads, contender=c.name)
        benchmark.pedantic(c.train, args=(n, 1), rounds=ROUNDS, iterations=1)
        try:
            benchmark.extra_info["samples_per_s"] = n / benchmark.stats.stats.median
        except AttributeError:  # benchmarks disabled (--benchmark-disable)
            pass
    finally:
        c.teardown()


def test_import_nnfast(benchmark):
    """``import nnfast`` in a fresh interpreter (issue 4 asks for under 150 ms; NumPy's
    share is in ``extra_info``). Each round is one subprocess."""
    times = benchmark.pedantic(lambda: bench.import_times(runs=1), rounds=5, iterations=1)
    benchmark.extra_info.update(times)
