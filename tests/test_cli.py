"""``python -m nnfast train|bench``: end to end in subprocesses, and in-process for the
many error paths.

Subprocesses run with ``cwd=tmp_path``, so they import the interpreter's installed
nnfast (in a source checkout, point PYTHONPATH at it), never the source tree without
the compiled extension.
"""
import csv
import re
import subprocess
import sys

import numpy as np
import pytest

import nnfast as nf
from nnfast import cli
from nnfast.datasets import load_digits, train_test_split

ACC = re.compile(r"^test accuracy: (\d\.\d+) \((\d+)/(\d+)\)", re.M)


def run_cli(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nnfast", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def accuracy(stdout):
    m = ACC.search(stdout)
    assert m, stdout
    return float(m.group(1))


def assert_one_error_line(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("nnfast: error: "), lines[0]
    for frag in fragments:
        assert frag in lines[0], lines[0]


def blobs(n=240, k=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, size=n)
    X = centers[y] + rng.normal(size=(n, d)) * 0.5
    return (X / np.abs(X).max()).astype(np.float64), y


def write_csv(path, X, y, label="label", label_first=False):
    header = [f"f{i}" for i in range(X.shape[1])]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([label] + header) if label_first else (header + [label]))
        for row, t in zip(X, y):
            vals = [repr(float(v)) for v in row]
            w.writerow(([t] + vals) if label_first else (vals + [t]))


# --- end to end ------------------------------------------------------------------------------
def test_default_train(tmp_path):
    proc = run_cli(tmp_path, "train")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    assert "1797 samples, 64 features, 10 classes" in out
    assert "train 1437 / test 360" in out
    assert "64-128-10" in out
    assert accuracy(out) >= 0.95
    assert re.search(r"^time: [\d.]+ m?s to train \d+ epochs", out, re.M), out
    assert proc.stderr.strip(), "expected per-epoch progress on stderr"


def test_compare_numpy_prints_ratio(tmp_path):
    proc = run_cli(tmp_path, "train", "--compare-numpy", "--epochs", "2", "--repeats", "2",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "best of 2 runs" in out
    assert re.search(r"^  cython backend: .*samples/s", out, re.M), out
    assert re.search(r"^  numpy  backend: .*samples/s", out, re.M), out
    # the ratio itself depends on the machine; a loaded CI runner may even invert it
    m = re.search(r"^nnfast \(cython\) is (\d+\.\d)x (faster than the NumPy backend$|"
                  r"slower than the NumPy backend on this run$)", out, re.M)
    assert m, out
    assert float(m.group(1)) > 0
    assert proc.stderr == ""


def test_options_quick_config(tmp_path):
    proc = run_cli(tmp_path, "train", "--layers", "32,16", "--activation", "tanh",
                   "--optimizer", "adam", "--lr", "0.01", "--epochs", "3",
                   "--batch-size", "16", "--accumulate", "2", "--dtype", "float64",
                   "--backend", "numpy", "--weight-decay", "1e-4", "--seed", "1",
                   "--threads", "1", "--test-size", "0.25", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "64-32-16-10" in out and "float64" in out and "backend numpy" in out
    assert "Adam(lr=0.01" in out and "train 1347 / test 450" in out
    assert accuracy(out) > 0.8
    assert proc.stderr == ""


def test_data_npz_and_save(tmp_path):
    X, y = blobs()
    np.savez(tmp_path / "d.npz", X=X, y=y)
    proc = run_cli(tmp_path, "train", "--data", "d.npz", "--epochs", "5", "--layers", "16",
                   "--nesterov", "--save", "m.npz", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "240 samples, 5 features, 3 classes" in proc.stdout
    assert accuracy(proc.stdout) >= 0.9
    model = nf.load(tmp_path / "m.npz")
    assert [l.units for l in model.layers] == [16, 3]
    # the saved model reproduces the printed test accuracy on the same split
    _, Xte, _, yte = train_test_split(X, y, test_size=0.2, seed=0)
    res = model.evaluate(Xte, yte, loss="cross_entropy")
    assert res["accuracy"] == pytest.approx(accuracy(proc.stdout), abs=1e-4)


def test_data_csv_label_column(tmp_path):
    X, y = blobs(seed=1)
    names = np.array(["cat", "dog", "eel"])[y]
    write_csv(tmp_path / "d.csv", X, names, label="species", label_first=True)
    proc = run_cli(tmp_path, "train", "--data", "d.csv", "--label-column", "species",
                   "--epochs", "5", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "240 samples, 5 features, 3 classes" in proc.stdout
    assert "cat->0, dog->1, eel->2" in proc.stdout
    assert accuracy(proc.stdout) >= 0.9


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    proc = run_cli(tmp_path, "train", "--epochs", "2", "--plot", "curve.png", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_file(tmp_path):
    proc = run_cli(tmp_path, "train", "--data", "nope.npz")
    assert_one_error_line(proc, "not found", "nope.npz")
    assert proc.stdout == ""


def test_bad_column(tmp_path):
    X, y = blobs(n=20)
    write_csv(tmp_path / "d.csv", X, y)
    proc = run_cli(tmp_path, "train", "--data", "d.csv", "--label-column", "target")
    assert_one_error_line(proc, "'target'", "--label-column")


@pytest.mark.parametrize("args", [["train", "--epochs", "0"], ["train", "--activation", "x"],
                                  ["train", "--no-such-option"], ["frobnicate"]])
def test_bad_option(tmp_path, args):
    proc = run_cli(tmp_path, *args)
    assert_one_error_line(proc)
    assert proc.returncode == 2


def test_bench_forwards_or_fails_cleanly(tmp_path):
    proc = run_cli(tmp_path, "bench", "--help")
    assert "Traceback" not in proc.stderr
    if proc.returncode != 0:
        assert_one_error_line(proc, "benchmark")


def test_version_and_no_command(tmp_path):
    proc = run_cli(tmp_path, "--version")
    assert proc.returncode == 0 and nf.__version__ in proc.stdout
    proc = run_cli(tmp_path)
    assert proc.returncode == 2 and "train" in proc.stderr


# --- in-process: error paths (one line on stderr, non-zero status) --------------------------
def run_main(capsys, *args):
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc, err, *fragments):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnfast: error: "), err
    for frag in fragments:
        assert frag in lines[0], lines[0]


@pytest.mark.parametrize("content,fragment", [
    ("a,b,label\n1,2,0\n\n3,x,1\n", "line 4, column 'b'"),
    ("a,b,label\n1,2,0\n3,4\n", "line 3: 2 fields"),
    ("a,b,label\n1,2,0\n3,4,\n", "empty label"),
    ("a,b,label\n1,2,0\n3,4,0\n", "at least 2 classes"),
    ("a,b,label\n1,2,0.5\n3,4,1\n", "non-integer"),
    ("a,b,label\n", "no data rows"),
    ("", "is empty"),
    ("label\n1\n2\n", "no feature columns"),
])
def test_invalid_csv(tmp_path, capsys, content, fragment):
    path = tmp_path / "d.csv"
    path.write_text(content)
    rc, out, err = run_main(capsys, "train", "--data", str(path))
    assert_error(rc, err, fragment)


def test_invalid_npz(tmp_path, capsys):
    X, y = blobs(n=30)
    cases = {
        "noy.npz": ({"X": X, "labels": y}, "no array 'y'"),
        "len.npz": ({"X": X, "y": y[:-1]}, "30 samples but y has 29"),
        "nan.npz": ({"X": np.where(X > 0.5, np.nan, X), "y": y}, "NaN"),
        "obj.npz": ({"X": X, "y": np.array([{"a": 1}] * 30, dtype=object)}, "npz"),
    }
    for name, (arrays, fragment) in cases.items():
        np.savez(tmp_path / name, **arrays)
        rc, out, err = run_main(capsys, "train", "--data", str(tmp_path / name))
        assert_error(rc, err, fragment)
    (tmp_path / "junk.npz").write_text("not a zip")
    rc, out, err = run_main(capsys, "train", "--data", str(tmp_path / "junk.npz"))
    assert_error(rc, err, "not a .npz file")
    (tmp_path / "d.txt").write_text("1 2 3")
    rc, out, err = run_main(capsys, "train", "--data", str(tmp_path / "d.txt"))
    assert_error(rc, err, ".npz", ".csv")
    rc, out, err = run_main(capsys, "train", "--data", str(tmp_path))
    assert_error(rc, err, "folder")


@pytest.mark.parametrize("args,fragment", [
    (["--layers", "12,a"], "--layers"),
    (["--layers", "0"], "--layers"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--batch-size", "0"], "--batch-size"),
    (["--test-size", "1"], "--test-size"),
    (["--dtype", "float16"], "--dtype"),
    (["--backend", "torch"], "--backend"),
    (["--optimizer", "adam", "--momentum", "0.5"], "sgd only"),
    (["--momentum", "0", "--nesterov"], "momentum > 0"),
    (["--backend", "numpy", "--compare-numpy"], "cython"),
    (["--save", "/no/such/folder/m.npz"], "does not exist"),
])
def test_bad_option_values(capsys, args, fragment):
    with pytest.raises(SystemExit) as exc:  # argparse errors exit from inside parse
        rc = cli.main(["train", *args])
        raise SystemExit(rc)
    assert exc.value.code == 2
    _, err = capsys.readouterr()
    assert_error(2, err, fragment)


def test_divergence_is_one_line(tmp_path, capsys):
    X, y = blobs(n=64)
    np.savez(tmp_path / "big.npz", X=X * 1e18, y=y)
    rc, out, err = run_main(capsys, "train", "--data", str(tmp_path / "big.npz"),
                            "--epochs", "3", "--quiet")
    assert_error(rc, err, "diverged", "--lr")
    assert rc == 1


def test_in_process_run_leaves_logging_alone(capsys):
    import logging
    logger = logging.getLogger("nnfast")
    before = (list(logger.handlers), logger.level, logger.propagate)
    rc, out, err = run_main(capsys, "train", "--epochs", "1", "--layers", "8")
    assert rc == 0
    assert "epoch 1/1" in err or err.strip()  # progress went to stderr
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_full_batch_and_integer_labels_mapping(tmp_path, capsys):
    X, y = blobs(n=60, k=2)
    np.savez(tmp_path / "d.npz", X=X.reshape(60, 5, 1), y=(y * 2 + 1).astype(np.float32))
    rc, out, err = run_main(capsys, "train", "--data", str(tmp_path / "d.npz"),
                            "--batch-size", "full", "--epochs", "3", "--quiet")
    assert rc == 0, err
    assert "full batch" in out and "1->0, 3->1" in out and "60 samples, 5 features" in out


def test_bench_forwards_arguments(monkeypatch, capsys):
    import types
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    fake = types.ModuleType("nnfast.bench")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "nnfast.bench", fake)
    monkeypatch.setattr(nf, "bench", fake, raising=False)
    assert cli.main(["bench", "--json", "out.json", "--quick"]) == 3
    assert seen["argv"] == ["--json", "out.json", "--quick"]


def test_no_hidden_layer(capsys):
    rc, out, err = run_main(capsys, "train", "--layers", "", "--epochs", "2", "--quiet")
    assert rc == 0, err
    assert "64-10 (softmax output)" in out
    assert accuracy(out) > 0.8


def test_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path, capsys):
    """train --checkpoint for 2 epochs, then --resume to 4: the final weights equal those
    of one 4-epoch run."""
    ckpt, full = tmp_path / "run.npz", tmp_path / "full.npz"
    common = ["train", "--quiet", "--batch-size", "16", "--accumulate", "2", "--seed", "3"]
    assert cli.main(common + ["--epochs", "2", "--checkpoint", str(ckpt)]) == 0
    assert ckpt.exists() and len(nf.load(ckpt).get_weights()) == 4
    assert cli.main(common + ["--epochs", "4", "--checkpoint", str(ckpt), "--resume"]) == 0
    assert cli.main(common + ["--epochs", "4", "--save", str(full)]) == 0
    for a, b in zip(nf.load(ckpt).get_weights(), nf.load(full).get_weights()):
        assert np.array_equal(a, b)
    capsys.readouterr()


@pytest.mark.parametrize("args", [["--resume"], ["--checkpoint-every", "5"]])
def test_resume_options_need_checkpoint(args, capsys):
    assert cli.main(["train", "--quiet", "--epochs", "1"] + args) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "Traceback" not in err


def test_resume_with_other_options_is_one_line_error(tmp_path, capsys):
    ckpt = tmp_path / "run.npz"
    assert cli.main(["train", "--quiet", "--epochs", "1", "--checkpoint", str(ckpt)]) == 0
    rc = cli.main(["train", "--quiet", "--epochs", "2", "--batch-size", "64",
                   "--checkpoint", str(ckpt), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size" in err and err.count("\n") == 1
