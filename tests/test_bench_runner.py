"""Functional test of the benchmark runner (``nnfast.bench``): it runs, and writes a JSON
report with every contender, the sgemm bound and the ratios. No speed is asserted."""
import json
import math

import pytest

import nnfast as nf
from nnfast import bench


def test_flops_formula():
    # 6 * sum(in*out) - 2 * in1*out1 (no dX for the first layer)
    assert bench.train_flops_per_sample((64, 128, 10)) == 6 * (64 * 128 + 128 * 10) - 2 * 64 * 128
    assert bench.train_flops_per_sample((784, 256, 128, 10)) == 1_007_104
    assert bench.predict_flops_per_sample((64, 128, 10)) == 2 * (64 * 128 + 128 * 10)


def test_parse_cases():
    assert bench.parse_cases(None, "A/1, b/32") == [("A", 1), ("B", 32)]
    assert bench.parse_cases("C", None) == [("C", 256)]
    assert len(bench.parse_cases(None, None)) == 9
    for bad in ("D/1", "A", "A/x", "A/0"):
        with pytest.raises(ValueError):
            bench.parse_cases(None, bad)
    with pytest.raises(SystemExit):
        bench.main(["--cases", "Z/3"])


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads_before = nf.get_num_threads()
    rc = bench.main(["--quick", "--cases", "B/32", "--rounds", "1", "--json", str(out),
                     "--quiet"])
    assert rc == 0
    assert nf.get_num_threads() == threads_before  # the runner restores the thread policy
    printed = capsys.readouterr().out
    assert "sgemm peak" in printed and "ratio" in printed

    report = json.loads(out.read_text())
    assert report["gemm_peak_gflops"] > 0
    assert "import nnfast:" in printed
    imp = report["import_time"]
    assert 0 < imp["of_which_numpy_ms"] < imp["import_nnfast_ms"] and imp["runs"] == 2
    assert isinstance(imp["bytecode_cached"], bool)
    assert report["config"]["rounds"] == 1
    names = report["config"]["contenders"]
    assert {"nnfast", "numpy-1t", "numpy-2t"} <= set(names)
    if report["machine"]["torch"] is not None:
        assert {"torch-1t", "torch-2t"} <= set(names)
    (case,) = report["cases"]
    assert (case["workload"], case["batch"], case["sizes"]) == ("B", 32, [64, 128, 10])
    assert set(case["train"]) == set(names)
    for entry in case["train"].values():
        assert entry["samples_per_s"] > 0 and len(entry["rounds"]) == 1
        assert entry["n"] >= 32 and entry["reps"] >= 1
    s = case["train_summary"]
    assert s["flops_per_sample"] == bench.train_flops_per_sample((64, 128, 10))
    assert s["best_other"] in names and s["best_other"] != "nnfast"
    best = case["train"][s["best_other"]]["samples_per_s"]
    assert math.isclose(s["ratio"], case["train"]["nnfast"]["samples_per_s"] / best)
    assert math.isclose(s["gemm_bound"],
                        report["gemm_peak_gflops"] * 1e9 / s["flops_per_sample"])
    assert s["pct_of_bound"] > 0


def test_predict_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = bench.main(["--quick", "--cases", "B/256", "--contenders", "nnfast,numpy",
                     "--baseline-threads", "1", "--dtype", "float64", "--predict",
                     "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert report["config"]["dtype"] == "float64"
    assert set(case["predict"]) == {"nnfast", "numpy-1t"}
    assert case["predict_summary"]["ratio"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _case(rounds_by_name, probes_by_name):
    return {"workload": "B", "batch": 32, "N": 64, "sizes": [64, 128, 10],
            "train": {n: {"samples_per_s": bench.median(v), "rounds": v,
                          "probes_gflops": probes_by_name[n], "kind": n.split("-")[0]}
                      for n, v in rounds_by_name.items()}}


def test_steady_rounds_drop_rounds_with_a_slow_probe():
    # round 1 of numpy-1t had a slow probe (150 < 0.9 * 200): the whole round goes,
    # for every contender, so that the ratio compares like with like
    case = _case({"nnfast": [100.0, 50.0, 110.0], "numpy-1t": [10.0, 9.0, 30.0]},
                 {"nnfast": [[200, 199], [198, 200], [200, 200]],
                  "numpy-1t": [[199, 200], [150, 198], [200, 197]]})
    best = bench.steady_rounds([case])
    assert best == 200
    assert case["train_steady_rounds"] == 2
    assert case["train"]["nnfast"]["samples_per_s"] == 105.0        # rounds 0 and 2
    assert case["train"]["numpy-1t"]["samples_per_s"] == 20.0
    assert case["train"]["nnfast"]["samples_per_s_all_rounds"] == 100.0
    bench.add_ratios([case], 100.0)
    assert case["train_summary"]["ratio"] == 105.0 / 20.0


def test_steady_rounds_keep_all_rounds_when_none_is_steady():
    case = _case({"nnfast": [100.0, 50.0]}, {"nnfast": [[150, 200], [200, 120]]})
    bench.steady_rounds([case])
    assert case["train_steady_rounds"] == 0
    assert case["train"]["nnfast"]["samples_per_s"] == 75.0
    bench.add_ratios([case], 100.0)
    table = bench.format_table([case], ["nnfast"])
    assert "steady" in table.splitlines()[0] and "0/2" in table.splitlines()[2]


def test_quick_run_reports_probes(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--cases", "B/32", "--contenders", "nnfast",
                       "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["probe"]["best_gflops"] > 0
    (entry,) = report["cases"][0]["train"].values()
    assert len(entry["probes_gflops"]) == len(entry["rounds"]) == 1
    assert all(v > 0 for v in entry["probes_gflops"][0])
    assert 0 <= report["cases"][0]["train_steady_rounds"] <= 1


def test_unprobed_cases_show_no_steady_count():
    case = _case({"nnfast": [100.0]}, {"nnfast": [[None, None]]})
    assert bench.steady_rounds([case]) is None and "train_steady_rounds" not in case
    bench.add_ratios([case], 100.0)
    assert bench.format_table([case], ["nnfast"]).splitlines()[2].split()[-1] == "-"


def test_measurements_and_probes_are_kept_apart():
    """Idle OpenBLAS workers spin ~0.1 s after a call: no measurement may start within
    ``settle`` of the end of a probe, and no probe within ``settle`` of a measurement."""
    import time
    events = []   # (kind, start, end)

    class Fake(bench.Contender):
        def __init__(self, name):
            self.name, self.kind, self.threads = name, "nnfast", 1

        def setup(self, sizes, X, y, batch):
            pass

        def activate(self):
            pass

        def train(self, n, epochs):
            t0 = time.perf_counter()
            time.sleep(0.002)
            events.append(("run", t0, time.perf_counter()))
            return time.perf_counter() - t0

    def probe():
        t0 = time.perf_counter()
        events.append(("probe", t0, time.perf_counter()))
        return 100.0

    timing = bench.Timing(min_time=0.001, max_time=1.0, calib_time=0.001, rounds=2,
                          settle=0.03, probe=probe)
    case = bench._run_case("B", 32, (64, 128, 10), 64, None, None, [Fake("a"), Fake("b")],
                           timing, False, lambda msg: None)
    assert all(len(e["rounds"]) == 2 for e in case["train"].values())
    first_probe = next(i for i, e in enumerate(events) if e[0] == "probe")
    timed = events[first_probe:]          # before it: warm-up and calibration, not timed
    assert [k for k, _, _ in timed] == ["probe", "run"] * 4 + ["probe"]
    for (_, _, end), (_, start, _) in zip(timed, timed[1:]):
        assert start - end >= 0.03


def _scaling_case(rates):
    """A measured case as run_benchmarks returns it: rates = {(kind, threads): samples/s}."""
    train = {f"{kind}-{t}t": {"samples_per_s": v, "kind": kind, "threads": t, "rounds": [v]}
             for (kind, t), v in rates.items()}
    return {"workload": "C", "batch": 256, "sizes": [1024, 4096, 4096, 10], "train": train}


def test_scaling_summary_arithmetic():
    case = _scaling_case({("nnfast", 1): 100.0, ("nnfast", 4): 300.0, ("nnfast", 16): 800.0,
                          ("torch", 1): 50.0, ("torch", 4): 250.0, ("torch", 16): 200.0})
    (case,) = bench.add_scaling([case], [1, 4, 16])
    nn, tt = case["scaling"]["nnfast"], case["scaling"]["torch"]
    assert nn["speedup"] == {"1": 1.0, "4": 3.0, "16": 8.0}
    assert nn["efficiency"] == {"1": 1.0, "4": 0.75, "16": 0.5}
    assert (nn["best_threads"], tt["best_threads"]) == (16, 4)
    assert nn["best_over_torch_best"] == 800.0 / 250.0
    assert tt["efficiency"]["16"] == 200.0 / 50.0 / 16
    table = bench.format_scaling([case], [1, 4, 16])
    assert "3.20x" in table and "50%" in table and "16t" in table
    # swept from 2 threads: efficiency against 2, scaled by the thread ratio
    case2 = _scaling_case({("nnfast", 2): 100.0, ("nnfast", 8): 300.0})
    (case2,) = bench.add_scaling([case2], [2, 8])
    assert case2["scaling"]["nnfast"]["efficiency"]["8"] == 3.0 * 2 / 8


def test_quick_scaling_run(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    threads_before = nf.get_num_threads()
    rc = bench.main(["--quick", "--scaling", "2,1", "--cases", "B/32", "--contenders",
                     "nnfast,numpy", "--json", str(out), "--quiet"])
    assert rc == 0 and nf.get_num_threads() == threads_before
    printed = capsys.readouterr().out
    assert "thread scaling" in printed and "efficiency 2t" in printed
    report = json.loads(out.read_text())
    assert report["config"]["scaling"] == [1, 2]
    assert set(report["config"]["contenders"]) == {"nnfast-1t", "nnfast-2t", "numpy-1t",
                                                   "numpy-2t"}
    (case,) = report["cases"]
    sc = case["scaling"]
    assert set(sc) == {"nnfast", "numpy"}
    for kind in sc:
        for t in (1, 2):
            assert case["train"][f"{kind}-{t}t"]["threads"] == t
        assert sc[kind]["speedup"]["1"] == 1.0
    assert math.isclose(sc["nnfast"]["best_over_numpy_best"],
                        sc["nnfast"]["best_samples_per_s"] / sc["numpy"]["best_samples_per_s"])


def test_scaling_defaults_and_refusals():
    assert bench.SCALING_CASES == [("A", 512), ("C", 256)]
    with pytest.raises(SystemExit):
        bench.main(["--scaling", "1,2", "--threads", "2"])
    with pytest.raises(SystemExit):
        bench.main(["--scaling", "0,2"])
