"""No leaks (issue 5 item 5).

200 rounds of build -> fit -> predict -> save/load (and a checkpointed fit, and a fit
that diverges) keep the resident set size flat after warm-up, measured in a fresh
process so that nothing else moves it; models and their compiled plans are freed as soon
as the last reference goes (no reference cycles).
"""
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

import nnfast as nf

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="RSS is read from /proc/self/statm (Linux)")

DRIVER = textwrap.dedent("""
    import gc, json, os, sys, warnings
    import numpy as np
    import nnfast as nf

    warnings.simplefilter("ignore")
    PAGE = os.sysconf("SC_PAGE_SIZE")


    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE


    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 12)).astype(np.float32)
    y = rng.integers(0, 4, 256)
    Xr, Yr = rng.standard_normal((64, 4)), rng.standard_normal((64, 2))
    folder = sys.argv[1]


    def one_round(i):
        backend = "cython" if i % 2 == 0 else "numpy"
        model = nf.Sequential(nf.Dense(12, 64, activation="relu"),
                              nf.Dense(64, 4, activation="softmax"), seed=i,
                              backend=backend)
        opt = nf.Adam(lr=0.01) if i % 3 else nf.SGD(lr=0.05, momentum=0.9)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, epochs=2,
                  batch_size=16 + i % 5, accumulate=1 + i % 3, seed=i,
                  validation_data=(X[:64], y[:64]),
                  checkpoint=os.path.join(folder, "ck.npz") if i % 4 == 0 else None,
                  checkpoint_every=3 if i % 4 == 0 else None)
        p = model.predict(X)
        path = os.path.join(folder, "m.npz")
        model.save(path, optimizer=opt)
        again, opt2 = nf.load(path, with_optimizer=True)
        assert np.array_equal(again.predict(X), p)
        if i % 4 == 0:
            nf.load(os.path.join(folder, "ck.npz"))
        if i % 10 == 0:   # a fit that diverges (rolled back) and one interrupted
            net = nf.Sequential(nf.Dense(4, 16), nf.Dense(16, 2), seed=0,
                                backend=backend)
            try:
                net.fit(Xr, Yr, loss="mse", optimizer=nf.SGD(lr=0.5, momentum=0.9),
                        epochs=30, batch_size=8)
            except nf.DivergenceError:
                pass


    rounds, warmup = int(sys.argv[2]), int(sys.argv[3])
    samples = []
    for i in range(rounds + warmup):
        one_round(i)
        if i >= warmup - 1 and (i - warmup + 1) % 20 == 0:
            gc.collect()
            samples.append(rss())
    print(json.dumps({"samples": samples}))
""")


def test_rss_stays_flat_over_200_rounds(tmp_path):
    driver = tmp_path / "leak_driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run([sys.executable, str(driver), str(tmp_path), "200", "30"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    samples = json.loads(out.stdout.strip().splitlines()[-1])["samples"]
    base = samples[0]
    growth = (samples[-1] - base) / base
    spread = (max(samples) - min(samples)) / base
    print(f"RSS after warm-up {base / 2**20:.1f} MiB, after 200 more rounds "
          f"{samples[-1] / 2**20:.1f} MiB: {growth:+.2%} (spread {spread:.2%}; samples every "
          f"20 rounds: {[round(s / 2**20, 1) for s in samples]})")
    assert abs(growth) < 0.10, growth


@pytest.mark.parametrize("backend", ["cython", "numpy"])
def test_models_and_plans_are_freed(tmp_path, backend):
    """Without reference cycles: the model, its workspace and (compiled backend) its
    NetworkPlan go away with the last reference, also after an interrupted fit."""
    from nnfast._compiled import kernels as _kernels

    def plans():
        return sum(type(o) is _kernels.NetworkPlan for o in gc.get_objects())

    gc.collect()
    before = plans()
    X = np.random.default_rng(0).standard_normal((100, 5))
    y = (X[:, 0] > 0).astype(int)
    refs = []
    for i in range(3):
        model = nf.Sequential(nf.Dense(5, 8, activation="relu"),
                              nf.Dense(8, 2, activation="softmax"), backend=backend)
        opt = nf.SGD(lr=0.1, momentum=0.9)
        model.fit(X, y, loss="cross_entropy", optimizer=opt, validation_split=0.2,
                  checkpoint=tmp_path / "c.npz", checkpoint_every=2)
        model.predict(X)
        model.save(tmp_path / "m.npz", optimizer=opt)
        loaded = nf.load(tmp_path / "m.npz")
        loaded.predict(X)

        class Stop(nf.Callback):
            def on_batch_end(self, iteration, logs):
                raise KeyboardInterrupt

        try:
            loaded.fit(X, y, loss="cross_entropy", callbacks=[Stop()])
        except KeyboardInterrupt as exc:
            assert exc.history is loaded.history
            del exc
        refs += [weakref.ref(model), weakref.ref(model._workspace), weakref.ref(loaded),
                 weakref.ref(opt)]
        del model, loaded, opt
    assert [r() for r in refs] == [None] * len(refs)      # freed without gc.collect()
    gc.collect()
    assert plans() == before
