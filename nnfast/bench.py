"""Training (and inference) throughput benchmark: nnfast against its NumPy backend and
PyTorch CPU, interleaved in one run.

Run it as ``python -m nnfast bench``, ``python -m nnfast.bench`` or
``python benchmarks/run.py``; ``--help`` lists the options.

What is measured
----------------
Every case is one workload at one batch size (float32 unless ``--dtype float64``; ReLU
hidden layers, softmax + cross-entropy, plain SGD with lr 0.01, shuffled epochs over
synthetic data: X uniform in [0, 1), random integer labels)::

    A  784-256-128-10       batch 1, 8, 32, 128, 512
    B  64-128-10            batch 1, 32, 256
    C  1024-4096-4096-10    batch 256

Contenders, all timed in the same process and interleaved round by round (the order
rotates every round so that no contender always runs first):

* ``nnfast``   -- nnfast's compiled backend (``backend="cython"``) with ``--threads``
  threads (default: every usable core), trained through the public ``fit``;
* ``numpy-Nt`` -- nnfast's pure-NumPy reference backend with N BLAS threads
  (``nf.set_num_threads(N)``), N in ``--baseline-threads`` (default 1 and 2);
* ``torch-Nt`` -- an idiomatic PyTorch CPU loop (``nn.Sequential`` of ``Linear``/``ReLU``,
  ``F.cross_entropy``, ``torch.optim.SGD``, ``zero_grad``/``backward``/``step``, batches
  indexed from ``torch.randperm``) with ``torch.set_num_threads(N)``; only when torch is
  importable.

Each contender is warmed up with a short fit (workspaces, lazy initialisation), then its
speed is estimated with a calibration fit. A case holds ``N`` samples (60,000; 4,000 for
A/1, 16,000 for B/1, 2,048 for C). A measurement is ``epochs`` shuffled epochs over the
first ``n`` samples, where ``n = N`` unless one epoch would take longer than
``--max-time`` (then ``n`` is cut to fit, rounded to whole batches) and ``epochs`` is the
smallest count that lasts at least ``--min-time``. Throughput is samples/s =
``n * epochs / seconds``; the report gives the median over ``--rounds`` rounds (the
per-round values, ``n`` and ``epochs`` are in the JSON).

Steady rounds
-------------
This project's 2-core VM has slow spells: for seconds at a time, at random, a 2-thread
gemm drops from ~210 to ~171 GFLOP/s and a 2-thread A/32 epoch from 125K to 69K
samples/s (1-thread runs suffer less). So every measurement is bracketed by a small
threaded gemm probe (1024^3, best of 2); a round is *steady* when all its measurements
had both probes at >= 90 % of the best probe of the run, and a case's medians are taken
over its steady rounds (over all rounds when none was steady). The table says how many
rounds were steady; the JSON keeps every round, its probes and the all-rounds medians.
Idle OpenBLAS workers spin for about 0.1 s after their last call, so every measurement
and every probe is followed by a 0.15 s pause: without the pause after the probe, a
2-thread contender shares a core with the probe's spinning worker for the first 0.1 s of
its measurement (measured on A/128: 16-28 % fewer samples/s for nnfast).

sgemm bound
-----------
The machine's GEMM peak is measured with NumPy (``C = A @ B`` on ``--gemm-size``-square
matrices of the benchmark dtype, with the BLAS thread count of the nnfast contender,
best of several): ``peak = 2 n^3 / seconds``. A training step of a Dense stack of layers
``(in_l, out_l)`` performs, per sample, these matrix-product FLOPs (one multiply-add = 2
FLOPs)::

    forward   Z_l = X_l W_l             2 * in_l * out_l     every layer
    backward  dW_l = X_l^T dZ_l         2 * in_l * out_l     every layer
              dX_l = dZ_l W_l^T         2 * in_l * out_l     every layer but the first

    FLOPs/sample = 6 * sum_l in_l * out_l  -  2 * in_1 * out_1

(elementwise work -- bias, activations, loss, the SGD update -- is left out). The
"sgemm bound" of a case is ``peak / (FLOPs/sample)``: the samples/s if every matrix-product
FLOP of a step ran at the GEMM peak. For ``predict`` only the forward pass counts
(``2 * sum_l in_l * out_l``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

import nnfast as nf

WORKLOADS = {
    "A": (784, 256, 128, 10),
    "B": (64, 128, 10),
    "C": (1024, 4096, 4096, 10),
}
BATCHES = {"A": (1, 8, 32, 128, 512), "B": (1, 32, 256), "C": (256,)}
DEFAULT_N = 60_000
CASE_N = {("A", 1): 4_000, ("B", 1): 16_000, ("C", 256): 2_048}
QUICK_N = 1_024
LR = 0.01
MAX_EPOCHS = 200


# --------------------------------------------------------------------------- arithmetic
def layer_shapes(sizes):
    return list(zip(sizes[:-1], sizes[1:]))


def train_flops_per_sample(sizes) -> int:
    """Matrix-product FLOPs of one training step, per sample:
    ``6 * sum(in*out) - 2 * in_1*out_1`` (no dX for the first layer)."""
    shapes = layer_shapes(sizes)
    return 6 * sum(i * o for i, o in shapes) - 2 * shapes[0][0] * shapes[0][1]


def predict_flops_per_sample(sizes) -> int:
    """Matrix-product FLOPs of one forward pass, per sample: ``2 * sum(in*out)``."""
    return 2 * sum(i * o for i, o in layer_shapes(sizes))


def case_samples(workload: str, batch: int, quick: bool = False) -> int:
    n = CASE_N.get((workload, batch), DEFAULT_N)
    if quick:
        n = min(n, max(QUICK_N, 4 * batch))
    return n


def parse_cases(workloads: str | None, cases: str | None):
    """The (workload, batch) pairs asked for, in table order."""
    if cases is not None:
        out = []
        for item in cases.split(","):
            item = item.strip()
            if not item:
                continue
            w, sep, b = item.partition("/")
            w = w.strip().upper()
            if w not in WORKLOADS or not sep:
                raise ValueError(f"bad case {item!r}: expected WORKLOAD/BATCH with WORKLOAD "
                                 f"in {', '.join(WORKLOADS)}, e.g. A/32")
            try:
                bs = int(b)
            except ValueError:
                raise ValueError(f"bad case {item!r}: batch size must be an integer") from None
            if not 1 <= bs <= 1 << 20:
                raise ValueError(f"bad case {item!r}: batch size must be from 1 to {1 << 20}")
            if (w, bs) not in out:
                out.append((w, bs))
        if not out:
            raise ValueError("--cases named no case")
        return out
    names = [w.strip().upper() for w in (",".join(WORKLOADS) if workloads is None
                                         else workloads).split(",") if w.strip()]
    if not names:
        raise ValueError("--workloads named no workload")
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        raise ValueError(f"unknown workload(s) {bad}; choose from "
                         f"{', '.join(WORKLOADS)}")
    return [(w, b) for w in dict.fromkeys(names) for b in BATCHES[w]]


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def import_times(runs: int = 5) -> dict:
    """Milliseconds to ``import nnfast`` in a fresh interpreter, and how much of that is
    NumPy: each run is ``python -X importtime -c "import nnfast"`` (the interpreter's own
    per-module cumulative times), median of ``runs``. Run from the directory above the
    imported package so that this same nnfast is measured.

    One unmeasured run goes first, with PYTHONDONTWRITEBYTECODE cleared, so that nnfast's
    modules load from their bytecode cache as NumPy's do and as they do after any
    ``pip install``: with the variable set (some sandboxes set it) an editable checkout
    compiles nnfast's sources in every run, about 50 ms on a slow VM, which no user sees.
    ``bytecode_cached`` says whether the cache could be written (False: a read-only
    checkout, and the figure includes compiling)."""
    import importlib.util
    import re
    import subprocess
    package = os.path.dirname(os.path.abspath(nf.__file__))
    parent = os.path.dirname(package)
    env = dict(os.environ, PYTHONPATH=parent)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    command = [sys.executable, "-X", "importtime", "-c", "import nnfast"]
    subprocess.run(command, capture_output=True, env=env, cwd=parent, timeout=60)
    cached = all(os.path.exists(importlib.util.cache_from_source(os.path.join(package, name)))
                 for name in ("__init__.py", "training.py", "model.py"))
    totals, numpys = [], []
    for _ in range(runs):
        res = subprocess.run(command, capture_output=True, text=True, env=env, cwd=parent,
                             timeout=60)
        cumulative = {}
        for line in res.stderr.splitlines():
            m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s*(\S+)$", line)
            if m:
                cumulative[m.group(2)] = int(m.group(1))
        if res.returncode != 0 or "nnfast" not in cumulative:
            raise RuntimeError(f"import nnfast failed: {res.stderr[-500:]}")
        totals.append(cumulative["nnfast"] / 1000)
        numpys.append(cumulative.get("numpy", 0) / 1000)
    return {"import_nnfast_ms": statistics.median(totals),
            "of_which_numpy_ms": statistics.median(numpys), "runs": runs,
            "bytecode_cached": cached}


def machine_info(torch_mod=None, torch_error=None) -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "nnfast": nf.__version__,
    }
    from . import _compiled
    info["nnfast_compiled"] = _compiled.kernels is not None
    info["nnfast_openmp"] = bool(_compiled.kernels and _compiled.kernels.openmp_enabled())
    info["nnfast_kernels"] = _compiled.variant
    if _compiled.kernels is not None:
        from . import _blas
        info["nnfast_gemm"] = _blas.install()
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [
            {k: lib.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
            for lib in threadpool_info() if lib.get("user_api") == "blas"]
    except Exception:  # pragma: no cover - threadpoolctl is a dependency
        info["blas"] = []
    if torch_mod is not None:
        info["torch"] = torch_mod.__version__
    else:
        info["torch"] = None
        if torch_error:
            info["torch_unavailable"] = torch_error
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    info["env"] = {k: os.environ[k] for k in
                   ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    return info


def gemm_peak(dtype, size: int = 2048, repeats: int = 5, threads: int | None = None) -> float:
    """Best GFLOP/s of ``A @ B`` (square, ``size``) in NumPy with ``threads`` BLAS threads."""
    if threads is not None:
        nf.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float64).astype(dtype)
    b = rng.random((size, size), dtype=np.float64).astype(dtype)
    c = np.empty((size, size), dtype=dtype)
    np.matmul(a, b, out=c)  # warm-up: thread pool start, page faults
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best / 1e9


# --------------------------------------------------------------------------- contenders
def import_torch():
    """``(torch, None)`` or ``(None, reason)``."""
    try:
        import torch  # noqa: F401
        return torch, None
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"


def build_nnfast(sizes, dtype, backend):
    layers = [nf.Dense(i, o, activation="relu") for i, o in layer_shapes(sizes)[:-1]]
    i, o = layer_shapes(sizes)[-1]
    layers.append(nf.Dense(i, o, activation="softmax"))
    return nf.Sequential(*layers, dtype=dtype, seed=0, backend=backend)


class Contender:
    """One way of training: ``activate`` before every measurement (thread counts),
    ``train(n, epochs)`` and ``predict(n, reps)`` return elapsed seconds."""

    name = ""
    kind = ""
    threads = 1

    def setup(self, sizes, X, y, batch): ...

    def activate(self): ...

    def train(self, n, epochs): ...

    def predict(self, n, reps): ...

    def teardown(self):
        pass


class NnfastContender(Contender):
    def __init__(self, backend: str, threads: int, name: str):
        self.backend = backend
        self.threads = threads
        self.name = name
        self.kind = "nnfast" if backend == "cython" else "numpy"

    def setup(self, sizes, X, y, batch):
        self.model = build_nnfast(sizes, X.dtype, self.backend)
        self.opt = nf.SGD(lr=LR)
        self.X, self.y, self.batch = X, y, batch

    def activate(self):
        nf.set_num_threads(self.threads)

    def train(self, n, epochs):
        X, y = self.X[:n], self.y[:n]
        t0 = time.perf_counter()
        self.model.fit(X, y, loss="cross_entropy", optimizer=self.opt, epochs=epochs,
                       batch_size=self.batch, shuffle=True, seed=0)
        return time.perf_counter() - t0

    def predict(self, n, reps):
        X, bs, predict = self.X, self.batch, self.model.predict
        t0 = time.perf_counter()
        for _ in range(reps):
            for start in range(0, n, bs):
                predict(X[start:start + bs])
        return time.perf_counter() - t0

    def teardown(self):
        self.model = self.opt = self.X = self.y = None


class TorchContender(Contender):
    def __init__(self, torch_mod, threads: int):
        self.torch = torch_mod
        self.threads = threads
        self.name = f"torch-{threads}t"
        self.kind = "torch"

    def setup(self, sizes, X, y, batch):
        torch = self.torch
        nn = torch.nn
        torch.manual_seed(0)
        mods = []
        for k, (i, o) in enumerate(layer_shapes(sizes)):
            mods.append(nn.Linear(i, o))
            if k < len(sizes) - 2:
                mods.append(nn.ReLU())
        tdtype = torch.float64 if X.dtype == np.float64 else torch.float32
        self.net = nn.Sequential(*mods).to(tdtype)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=LR)
        self.X = torch.from_numpy(X)
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        self.batch = batch
        self.gen = torch.Generator().manual_seed(0)

    def activate(self):
        self.torch.set_num_threads(self.threads)

    def train(self, n, epochs):
        torch = self.torch
        F = torch.nn.functional
        net, opt, X, y, bs, gen = self.net, self.opt, self.X, self.y, self.batch, self.gen
        net.train()
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]
                xb, yb = X[idx], y[idx]
                opt.zero_grad()
                loss = F.cross_entropy(net(xb), yb)
                loss.backward()
                opt.step()
        return time.perf_counter() - t0

    def predict(self, n, reps):
        torch = self.torch
        F = torch.nn.functional
        net, X, bs = self.net, self.X, self.batch
        net.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(reps):
                for start in range(0, n, bs):
                    F.softmax(net(X[start:start + bs]), dim=1).numpy()
        return time.perf_counter() - t0

    def teardown(self):
        self.net = self.opt = self.X = self.y = None


def make_contenders(kinds, threads, baseline_threads, torch_mod):
    out = []
    if "nnfast" in kinds:
        out.append(NnfastContender("cython", threads, "nnfast"))
    if "numpy" in kinds:
        out += [NnfastContender("numpy", t, f"numpy-{t}t") for t in baseline_threads]
    if "torch" in kinds and torch_mod is not None:
        out += [TorchContender(torch_mod, t) for t in baseline_threads]
    return out


def make_scaling_contenders(kinds, thread_counts, torch_mod):
    """nnfast (and the NumPy backend and PyTorch, when asked) at every thread count."""
    out = []
    if "nnfast" in kinds:
        out += [NnfastContender("cython", t, f"nnfast-{t}t") for t in thread_counts]
    if "numpy" in kinds:
        out += [NnfastContender("numpy", t, f"numpy-{t}t") for t in thread_counts]
    if "torch" in kinds and torch_mod is not None:
        out += [TorchContender(torch_mod, t) for t in thread_counts]
    return out


# --------------------------------------------------------------------------- timing
@dataclass
class Plan:
    n: int
    reps: int  # epochs (training) or passes (predict)
    calibration_rate: float


@dataclass
class Timing:
    min_time: float
    max_time: float
    calib_time: float
    rounds: int
    settle: float = 0.15
    probe: object = None  # () -> GFLOP/s of a small threaded gemm, or None (see _run_case)


# A measurement counts as taken on a steady machine when the gemm probes right before and
# after it both reached this fraction of the best probe of the whole run. On the
# project's 2-core VM the probe has two levels, ~210 and ~171 GFLOP/s, and a 2-thread
# A/32 epoch ran 125K samples/s at the first and 69K at the second (the slow spells last
# seconds and come at random, so they hit some contenders of a round and not others).
STEADY_FRACTION = 0.9


def _timed(fn, *args):
    """``fn(*args)`` with the garbage collector paused (as ``timeit`` does)."""
    was = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if was:
            gc.enable()


def calibrate(run, N, batch, min_time, max_time, calib_time) -> Plan:
    """Warm ``run`` up, estimate its samples/s and choose (n, reps) for measurements."""
    n = min(N, 2 * batch)
    run(n, 1)  # warm-up: workspaces, thread pools, lazy init (not timed)
    while True:
        t = max(_timed(run, n, 1), 1e-9)
        if t >= calib_time or n >= N:
            break
        n = min(N, max(n + batch, int(n * min(8.0, 1.5 * calib_time / t)) // batch * batch))
    # a second estimate at the final size; the faster one wins, so that a burst of other
    # work during calibration does not shrink every later measurement
    t = min(t, max(_timed(run, n, 1), 1e-9))
    rate = n / t
    n_meas = N
    if N / rate > max_time:
        n_meas = max(batch, min(N, int(rate * max_time) // batch * batch))
    reps = max(1, min(MAX_EPOCHS, math.ceil(min_time * rate / n_meas)))
    return Plan(n_meas, reps, rate)


def median(values):
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- main loop
def run_benchmarks(cases, contenders, dtype, timing: Timing, predict: bool, quick: bool,
                   log=None):
    """Measure every case; returns a list of per-case dicts (see ``main`` JSON)."""
    log = log or (lambda msg: None)
    results = []
    by_workload = {}
    for w, b in cases:
        by_workload.setdefault(w, []).append(b)
    data_rng = np.random.default_rng(0)
    for w, batches in by_workload.items():
        sizes = WORKLOADS[w]
        n_max = max(case_samples(w, b, quick) for b in batches)
        X = data_rng.random((n_max, sizes[0]), dtype=np.float64 if dtype == "float64"
                            else np.float32)
        y = data_rng.integers(0, sizes[-1], n_max, dtype=np.int64)
        for b in batches:
            N = case_samples(w, b, quick)
            results.append(_run_case(w, b, sizes, N, X, y, contenders, timing, predict,
                                     log))
        del X, y
        gc.collect()
    return results


def _run_case(w, b, sizes, N, X, y, contenders, timing, predict, log):
    modes = ["train"] + (["predict"] if predict else [])
    rows = {mode: {} for mode in modes}
    plans = {mode: {} for mode in modes}
    for c in contenders:
        c.setup(sizes, X, y, b)
    try:
        for c in contenders:
            c.activate()
            for mode in modes:
                run = c.train if mode == "train" else c.predict
                plans[mode][c.name] = p = calibrate(run, N, b, timing.min_time,
                                                    timing.max_time, timing.calib_time)
                rows[mode][c.name] = []
                log(f"  {w}/{b} {mode:7s} {c.name:10s} ~{p.calibration_rate:,.0f} samples/s "
                    f"-> n={p.n} x {p.reps}")
        k = len(contenders)
        probes = {mode: {c.name: [] for c in contenders} for mode in modes}
        time.sleep(timing.settle)
        last_probe = _probe(timing)
        for r in range(timing.rounds):
            order = contenders[r % k:] + contenders[:r % k] if k else []
            for c in order:
                for mode in modes:
                    c.activate()
                    p = plans[mode][c.name]
                    run = c.train if mode == "train" else c.predict
                    t = _timed(run, p.n, p.reps)
                    rows[mode][c.name].append(p.n * p.reps / t)
                    # let the idle BLAS/OpenMP workers of this contender stop spinning
                    # (OpenBLAS spins ~0.1 s after its last call) before the probe;
                    # _probe pauses the same way before the next measurement
                    time.sleep(timing.settle)
                    after = _probe(timing)
                    probes[mode][c.name].append([last_probe, after])
                    last_probe = after
            log(f"  {w}/{b} round {r + 1}/{timing.rounds}: " + ", ".join(
                f"{name} {vals[-1]:,.0f}" for name, vals in rows["train"].items())
                + (f" (probe {last_probe:.0f} GFLOP/s)" if last_probe is not None else ""))
    finally:
        for c in contenders:
            c.teardown()
        gc.collect()
    case = {"workload": w, "sizes": list(sizes), "batch": b, "N": N}
    for mode in modes:
        case[mode] = {
            name: {"samples_per_s": median(vals), "rounds": vals,
                   "probes_gflops": probes[mode][name],
                   "n": plans[mode][name].n, "reps": plans[mode][name].reps,
                   "threads": next(c.threads for c in contenders if c.name == name),
                   "kind": next(c.kind for c in contenders if c.name == name)}
            for name, vals in rows[mode].items()}
    return case


def _probe(timing):
    """The probe's GFLOP/s, after which its BLAS workers are let stop spinning (OpenBLAS
    spins ~0.1 s after its last call): measured, a 2-thread A/128 epoch that starts
    right after the probe ran 119-139K samples/s, against 164-166K after the pause."""
    if timing.probe is None:
        return None
    gflops = timing.probe()
    time.sleep(timing.settle)
    return gflops


def steady_rounds(results):
    """Keep, per case, the rounds in which every contender was measured on a steady
    machine (both probes >= STEADY_FRACTION of the run's best probe): ``samples_per_s``
    becomes the median of those rounds (of all rounds, and ``steady_rounds`` 0, when no
    round qualifies). The medians of all rounds stay as ``samples_per_s_all_rounds``.
    Returns the best probe (None when nothing was probed)."""
    best = max((v for case in results for mode in ("train", "predict") if mode in case
                for e in case[mode].values() for pair in e.get("probes_gflops", [])
                for v in pair if v is not None), default=None)
    if best is None:
        return None
    for case in results:
        for mode in ("train", "predict"):
            if mode not in case:
                continue
            res = case[mode]
            n_rounds = min(len(e["rounds"]) for e in res.values())
            steady = [r for r in range(n_rounds)
                      if all(min(e["probes_gflops"][r]) >= STEADY_FRACTION * best
                             for e in res.values())]
            for e in res.values():
                e["samples_per_s_all_rounds"] = median(e["rounds"])
                if steady:
                    e["samples_per_s"] = median([e["rounds"][r] for r in steady])
            case[mode + "_steady_rounds"] = len(steady)
    return best


def add_ratios(results, peak_gflops):
    """Fill in the sgemm bound, % of bound, best other contender and nnfast's ratio."""
    for case in results:
        flops = {"train": train_flops_per_sample(case["sizes"]),
                 "predict": predict_flops_per_sample(case["sizes"])}
        for mode in ("train", "predict"):
            if mode not in case:
                continue
            res = case[mode]
            bound = peak_gflops * 1e9 / flops[mode]
            for entry in res.values():
                entry["pct_of_bound"] = 100.0 * entry["samples_per_s"] / bound
            others = {k: v["samples_per_s"] for k, v in res.items() if v["kind"] != "nnfast"}
            summary = {"flops_per_sample": flops[mode], "gemm_bound": bound,
                       "best_other": None, "ratio": None, "pct_of_bound": None}
            if others:
                best = max(others, key=others.get)
                summary["best_other"] = best
                summary["best_other_samples_per_s"] = others[best]
            if "nnfast" in res:
                summary["pct_of_bound"] = res["nnfast"]["pct_of_bound"]
                if others:
                    summary["ratio"] = res["nnfast"]["samples_per_s"] / others[best]
            case[mode + "_summary"] = summary
    return results


SCALING_CASES = [("A", 512), ("C", 256)]  # issue 4, item 6


def add_scaling(results, thread_counts):
    """Per case and kind (nnfast, numpy, torch): samples/s at every thread count, the
    speed-up and parallel efficiency against the fewest threads measured (1 when swept
    from 1: efficiency = speed-up / threads), the best thread count; and nnfast's best
    over each other kind's best."""
    base = min(thread_counts)
    for case in results:
        res = case["train"]
        by_kind = {}
        for name, e in res.items():
            by_kind.setdefault(e["kind"], {})[e["threads"]] = e["samples_per_s"]
        summary = {}
        for kind, rates in by_kind.items():
            if base not in rates:
                continue
            best_t = max(rates, key=rates.get)
            summary[kind] = {
                "samples_per_s": {str(t): rates[t] for t in sorted(rates)},
                "speedup": {str(t): rates[t] / rates[base] for t in sorted(rates)},
                "efficiency": {str(t): rates[t] / rates[base] * base / t
                               for t in sorted(rates)},
                "best_threads": best_t, "best_samples_per_s": rates[best_t]}
        if "nnfast" in summary:
            for kind in summary:
                if kind != "nnfast":
                    summary["nnfast"][f"best_over_{kind}_best"] = (
                        summary["nnfast"]["best_samples_per_s"]
                        / summary[kind]["best_samples_per_s"])
        case["scaling"] = summary
    return results


def format_scaling(results, thread_counts) -> str:
    """One line per case and kind: samples/s at each thread count, then the speed-up and
    efficiency at the most threads, the best thread count and nnfast's ratio."""
    top = max(thread_counts)
    header = (["case", "who"] + [f"{t}t" for t in thread_counts]
              + [f"speed-up {top}t", f"efficiency {top}t", "best", "nnfast best / best"])
    rows = []
    for case in results:
        for kind, sc in case.get("scaling", {}).items():
            rows.append([f"{case['workload']}/{case['batch']}", kind]
                        + [_fmt_rate(sc["samples_per_s"].get(str(t))) for t in thread_counts]
                        + [f"{sc['speedup'][str(top)]:.2f}x" if str(top) in sc["speedup"]
                           else "-",
                           f"{sc['efficiency'][str(top)]:.0%}" if str(top) in sc["efficiency"]
                           else "-",
                           f"{sc['best_threads']}t",
                           "-" if kind == "nnfast" else
                           (f"{case['scaling']['nnfast'][f'best_over_{kind}_best']:.2f}x"
                            if "nnfast" in case["scaling"] else "-")])
    return _aligned(header, rows, left={0, 1})


# --------------------------------------------------------------------------- output
def _fmt_rate(v):
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def format_table(results, names, mode="train", threads=None) -> str:
    label = {n: (f"nnfast {threads}t" if n == "nnfast" and threads else n) for n in names}
    header = (["workload", "batch", "N"] + [label[n] for n in names]
              + ["best other", "ratio", "gemm bound", "% bound", "steady"])
    rows = []
    for case in results:
        if mode not in case:
            continue
        res, s = case[mode], case[mode + "_summary"]
        row = [case["workload"], str(case["batch"]), f"{case['N']:,}"]
        row += [_fmt_rate(res[n]["samples_per_s"]) if n in res else "-" for n in names]
        row += [s["best_other"] or "-",
                f"{s['ratio']:.2f}x" if s["ratio"] is not None else "-",
                _fmt_rate(s["gemm_bound"]),
                f"{s['pct_of_bound']:.0f}%" if s["pct_of_bound"] is not None else "-"]
        n_rounds = min(len(e["rounds"]) for e in res.values())
        steady = case.get(mode + "_steady_rounds")  # absent when nothing was probed
        row.append("-" if steady is None else f"{steady}/{n_rounds}")
        rows.append(row)
    return _aligned(header, rows, left={0, len(header) - 5})


def _aligned(header, rows, left) -> str:
    """A plain-text table: columns as wide as their widest cell, those in ``left``
    left-aligned and the others right-aligned, a rule under the header."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(wd) if i in left else c.rjust(wd)
                         for i, (c, wd) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * wd for wd in widths])]
                     + [line(r) for r in rows])


def format_machine(info, threads) -> str:
    blas = ", ".join(f"{b.get('internal_api')} {b.get('version')}" for b in info.get("blas", [])
                     ) or "unknown"
    lines = [
        f"CPU: {info['cpu']} ({info['usable_cores']} usable cores of "
        f"{info['logical_cpus']} logical CPUs)",
        f"Python {info['python']}, NumPy {info['numpy']} (BLAS: {blas}), "
        f"torch {info['torch'] or 'not available'}",
        f"nnfast {info['nnfast']}: compiled={info['nnfast_compiled']}, "
        f"openmp_enabled={info['nnfast_openmp']}, kernels={info['nnfast_kernels']}, "
        f"gemm={info.get('nnfast_gemm')}, threads={threads}",
    ]
    if "load_average" in info:
        la = info["load_average"]
        lines.append(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
                     + ("  (other work may be running: timings would be noisy)"
                        if la[0] > 0.5 else ""))
    if info.get("torch_unavailable"):
        lines.append(f"torch skipped: {info['torch_unavailable']}")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if k in info["env"]:
            lines.append(f"note: {k}={info['env'][k]} is set; it can slow NumPy's BLAS")
    return "\n".join(lines)


def write_plot(path, results, names, peak_gflops, dtype, info):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    modes = [m for m in ("train", "predict") if any(m in c for c in results)]
    workloads = list(dict.fromkeys(c["workload"] for c in results))
    fig, axes = plt.subplots(len(modes), len(workloads), squeeze=False,
                             figsize=(max(7.0, 4.6 * len(workloads)), 3.8 * len(modes)))
    for r, mode in enumerate(modes):
        for col, w in enumerate(workloads):
            ax = axes[r][col]
            cases = sorted((c for c in results if c["workload"] == w and mode in c),
                           key=lambda c: c["batch"])
            bs = [c["batch"] for c in cases]
            for name in names:
                ys = [c[mode][name]["samples_per_s"] if name in c[mode] else np.nan
                      for c in cases]
                ax.plot(bs, ys, marker="o", label=name,
                        linewidth=2.2 if name == "nnfast" else 1.2)
            bound = [c[mode + "_summary"]["gemm_bound"] for c in cases]
            ax.plot(bs, bound, "k--", marker="_", markersize=16, linewidth=1,
                    label="gemm bound")
            ax.set_xscale("log", base=2)
            ax.set_xticks(bs, [str(v) for v in bs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel("samples/s")
            sizes = "-".join(map(str, WORKLOADS[w]))
            ax.set_title(f"{w} {sizes} ({mode})", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if r == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"nnfast {dtype} throughput - {info['cpu']}, {info['usable_cores']} cores, "
                 f"peak {peak_gflops:.0f} GFLOP/s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnfast bench",
        description="Training throughput (samples/s) of nnfast against its NumPy backend "
                    "and PyTorch CPU on the standard MLP workloads "
                    "(A 784-256-128-10, B 64-128-10, C 1024-4096-4096-10), interleaved "
                    "in one run; median of several rounds.")
    p.add_argument("--workloads", default=None,
                   help="comma-separated workloads (default: A,B,C with their batch sizes)")
    p.add_argument("--cases", default=None,
                   help="comma-separated WORKLOAD/BATCH cases, e.g. A/1,B/32 "
                        "(overrides --workloads)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per case (default 3; "
                   "1 with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for nnfast's compiled backend (default: all usable cores)")
    p.add_argument("--baseline-threads", default="1,2",
                   help="thread counts of the NumPy-backend and PyTorch contenders "
                        "(default 1,2)")
    p.add_argument("--contenders", default="nnfast,numpy,torch",
                   help="which contenders to run (default nnfast,numpy,torch; torch is "
                        "skipped when not importable)")
    p.add_argument("--scaling", metavar="T1,T2,...", default=None,
                   help="thread scaling sweep: every contender at each of these thread "
                        "counts (e.g. 1,2,4,8,16); prints samples/s, speed-up and parallel "
                        "efficiency against the fewest threads, and nnfast's best over "
                        "PyTorch's best. Cases default to A/512,C/256; --threads and "
                        "--baseline-threads do not apply")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--predict", action="store_true",
                   help="also measure predict() throughput (inference in batches of the "
                        "case's batch size)")
    p.add_argument("--quick", action="store_true",
                   help="small N, 1 round, short timings (for tests; numbers are rough)")
    p.add_argument("--min-time", type=float, default=None,
                   help="shortest measurement in seconds; more epochs are run to reach it "
                        "(default 0.25)")
    p.add_argument("--max-time", type=float, default=None,
                   help="longest single epoch in seconds; slower contenders train on fewer "
                        "samples (default 2.0)")
    p.add_argument("--gemm-size", type=int, default=None,
                   help="matrix size of the GEMM peak measurement (default 2048)")
    p.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="write a PNG of samples/s vs batch size (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _positive_ints(text, what, parser):
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"{what} must be comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        parser.error(f"{what} must be positive integers, got {text!r}")
    if max(vals) > nf._threads.MAX_THREADS:
        parser.error(f"{what}: at most {nf._threads.MAX_THREADS} threads, got {max(vals)}")
    return list(dict.fromkeys(vals))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    scaling = None
    if args.scaling is not None:
        scaling = sorted(_positive_ints(args.scaling, "--scaling", parser))
        if args.threads is not None:
            parser.error("--scaling sets the thread counts; leave out --threads")
    try:
        if scaling and args.workloads is None and args.cases is None:
            cases = list(SCALING_CASES)
        else:
            cases = parse_cases(args.workloads, args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads is not None and not 1 <= args.threads <= nf._threads.MAX_THREADS:
        parser.error(f"--threads must be from 1 to {nf._threads.MAX_THREADS}")
    baseline_threads = _positive_ints(args.baseline_threads, "--baseline-threads", parser)
    kinds = [k.strip().lower() for k in args.contenders.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ("nnfast", "numpy", "torch")]
    if bad or not kinds:
        parser.error(f"--contenders: unknown {bad or kinds}; choose from nnfast,numpy,torch")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        # before the cases run, not after minutes of them
        if path is None:
            continue
        if path == "":
            parser.error(f"{opt}: empty path")
        if os.path.isdir(path):
            parser.error(f"{opt}: {path} is a folder, give a file name")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"{opt}: folder {folder} does not exist")
    if args.json is not None and args.plot is not None and (
            os.path.realpath(args.json) == os.path.realpath(args.plot)):
        parser.error("--json and --plot name the same file")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib, or pip install 'nnfast[plot]')")
    min_time = args.min_time if args.min_time is not None else (0.01 if args.quick else 0.25)
    max_time = args.max_time if args.max_time is not None else (0.1 if args.quick else 2.0)
    if not (0 < min_time <= max_time <= 3600):
        parser.error("need 0 < --min-time <= --max-time <= 3600 (seconds)")
    if args.gemm_size is not None and not 1 <= args.gemm_size <= 16384:
        parser.error(f"--gemm-size must be from 1 to 16384, got {args.gemm_size}")
    gemm_size = args.gemm_size or (512 if args.quick else 2048)
    probe_size = 256 if args.quick else 1024
    timing = Timing(min_time=min_time, max_time=max_time,
                    calib_time=min(0.05, min_time / 2), rounds=rounds,
                    settle=0.01 if args.quick else 0.15)
    log = (lambda msg: None) if args.quiet else (
        lambda msg: print(msg, file=sys.stderr, flush=True))

    torch_mod, torch_error = (None, None)
    if "torch" in kinds:
        torch_mod, torch_error = import_torch()
    saved_threads = nf.get_num_threads()
    saved_torch_threads = torch_mod.get_num_threads() if torch_mod is not None else None
    threads = max(scaling) if scaling else (args.threads or saved_threads)
    try:
        contenders = (make_scaling_contenders(kinds, scaling, torch_mod) if scaling
                      else make_contenders(kinds, threads, baseline_threads, torch_mod))
        if not contenders:
            parser.error("no contender can run")
        names = [c.name for c in contenders]
        info = machine_info(torch_mod, torch_error)
        dtype = args.dtype
        timing.probe = lambda: gemm_peak(np.dtype(dtype), probe_size, repeats=2,
                                         threads=threads)
        peak = gemm_peak(np.dtype(dtype), gemm_size, repeats=3 if args.quick else 5,
                         threads=threads)
        print(format_machine(info, threads), flush=True)
        imports = import_times(runs=2 if args.quick else 5)
        print(f"import nnfast: {imports['import_nnfast_ms']:.0f} ms (of which NumPy "
              f"{imports['of_which_numpy_ms']:.0f} ms), fresh interpreter, median of "
              f"{imports['runs']}"
              + ("" if imports["bytecode_cached"] else ", nnfast compiled from source: "
                 "no bytecode cache could be written"), flush=True)
        log(f"running {len(cases)} case(s) x {len(contenders)} contender(s) x {rounds} "
            f"round(s) ...")
        results = run_benchmarks(cases, contenders, dtype, timing, args.predict,
                                 args.quick, log)
        # measured again at the end: a peak taken while something else ran is too low
        peak_end = gemm_peak(np.dtype(dtype), gemm_size, repeats=3 if args.quick else 5,
                             threads=threads)
        peaks = [peak, peak_end]
        peak = max(peaks)
        log(f"gemm peak at start {peaks[0]:.1f}, at end {peaks[1]:.1f} GFLOP/s; using "
            f"{peak:.1f}")
        best_probe = steady_rounds(results)
        add_ratios(results, peak)
        if scaling:
            add_scaling(results, scaling)
    finally:
        nf.set_num_threads(saved_threads)
        if torch_mod is not None:
            torch_mod.set_num_threads(saved_torch_threads)

    gemm = "sgemm" if dtype == "float32" else "dgemm"
    print(f"{gemm} peak ({gemm_size}^3 in NumPy, {threads} threads, best of "
          f"{3 if args.quick else 5}, measured before and after the cases): "
          f"{peak:.1f} GFLOP/s (before {peaks[0]:.1f}, after {peaks[1]:.1f})")
    print()
    print(f"steady rounds: those whose measurements all had a {probe_size}^3 {gemm} probe "
          f"before and after of >= {STEADY_FRACTION:.0%} of the best probe "
          f"({best_probe or 0:.1f} GFLOP/s); the medians are over the steady rounds "
          f"(over all rounds where none was steady)")
    print()
    if scaling:
        print(f"thread scaling, training samples/s ({dtype}, softmax CE, SGD lr {LR}, "
              f"median of {rounds} round(s)); speed-up and efficiency against "
              f"{min(scaling)} thread(s); % of the gemm bound at {threads} threads:")
        print(format_scaling(results, scaling))
        for case in results:
            e = case["train"].get(f"nnfast-{threads}t")
            if e is not None:
                print(f"  {case['workload']}/{case['batch']}: nnfast {threads}t at "
                      f"{e['pct_of_bound']:.0f}% of the gemm bound "
                      f"({_fmt_rate(case['train_summary']['gemm_bound'])} samples/s)")
    else:
        print(f"training throughput, samples/s ({dtype}, softmax CE, SGD lr {LR}, median "
              f"of {rounds} round(s)); ratio = nnfast / best other")
        print(format_table(results, names, "train", threads))
    if args.predict:
        print()
        print(f"predict() throughput, samples/s ({dtype}, in batches of the case's batch "
              f"size, median of {rounds} round(s))")
        print(format_table(results, names, "predict", threads))
    print()
    print("gemm bound = samples/s if every matrix-product FLOP ran at the measured gemm "
          "peak; training FLOPs/sample = 6*sum(in*out) - 2*in1*out1")

    report = {
        "machine": info,
        "config": {
            "dtype": dtype, "rounds": rounds, "threads": threads,
            "baseline_threads": baseline_threads, "contenders": names,
            "scaling": scaling,
            "quick": bool(args.quick), "predict": bool(args.predict), "lr": LR,
            "min_time": min_time, "max_time": max_time, "gemm_size": gemm_size,
            "argv": list(argv) if argv is not None else sys.argv[1:],
        },
        "gemm_peak_gflops": peak,
        "gemm_peak_gflops_before_after": peaks,
        "probe": {"size": probe_size, "best_gflops": best_probe,
                  "steady_fraction": STEADY_FRACTION},
        "import_time": imports,
        "cases": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, allow_nan=True)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, names, peak, dtype, info)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
