"""The bundled digits data and the deterministic train/test split."""
import numpy as np
import pytest

import nnfast as nf
from nnfast.datasets import load_digits, train_test_split


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shape_dtype_range(digits):
    X, y = digits
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.flags.c_contiguous and X.flags.writeable
    assert X.min() == 0.0 and X.max() == 1.0
    assert np.isfinite(X).all()
    # pixel counts 0..16 divided by 16: every value is a multiple of 1/16
    np.testing.assert_array_equal(X * 16, np.round(X * 16))


def test_digits_class_counts(digits):
    _, y = digits
    counts = np.bincount(y)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert counts.sum() == 1797


def test_digits_known_rows(digits):
    X, y = digits
    assert y[:10].tolist() == list(range(10))
    first = (X[0] * 16).astype(int).reshape(8, 8)
    assert first[0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    assert first[7].tolist() == [0, 0, 6, 13, 10, 0, 0, 0]


def test_digits_fresh_copies(digits):
    X, y = digits
    X2, y2 = load_digits()
    assert not np.shares_memory(X, X2) and not np.shares_memory(y, y2)
    X2[0, 0] = 5.0
    y2[0] = 7
    X3, y3 = load_digits()
    assert X3[0, 0] == 0.0 and y3[0] == 0


def test_digits_match_scikit_learn(digits):
    skd = pytest.importorskip("sklearn.datasets")
    ref = skd.load_digits()
    X, y = digits
    np.testing.assert_array_equal(X, (ref.data / 16).astype(np.float32))
    np.testing.assert_array_equal(y, ref.target)


def test_datasets_reachable_from_package():
    assert nf.datasets.load_digits is load_digits
    assert "datasets" in nf.__all__


def test_split_sizes_and_order(digits):
    X, y = digits
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, seed=0)
    assert Xtr.shape == (1437, 64) and Xte.shape == (360, 64)
    assert ytr.shape == (1437,) and yte.shape == (360,)
    assert Xtr.dtype == X.dtype and ytr.dtype == y.dtype
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(Xte, X[perm[:360]])
    np.testing.assert_array_equal(ytr, y[perm[360:]])


@pytest.mark.parametrize("stratify", [False, True])
def test_split_disjoint_and_covering(stratify):
    n = 103
    X = np.arange(n, dtype=np.float64).reshape(n, 1) * np.ones((1, 3))
    y = np.arange(n) % 4
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, seed=3, stratify=stratify)
    tr, te = Xtr[:, 0].astype(int), Xte[:, 0].astype(int)
    assert len(te) == 26 and len(tr) == 77
    assert not set(tr) & set(te)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(n))
    # labels travel with their rows
    np.testing.assert_array_equal(ytr, tr % 4)
    np.testing.assert_array_equal(yte, te % 4)


def test_split_deterministic(digits):
    X, y = digits
    a = train_test_split(X, y, seed=5)
    b = train_test_split(X, y, seed=5)
    c = train_test_split(X, y, seed=6)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[3], c[3])


def test_split_stratified_proportions(digits):
    X, y = digits
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, seed=0, stratify=True)
    assert len(yte) == 360 and len(ytr) == 1437
    test_counts = np.bincount(yte, minlength=10)
    expected = np.bincount(y) * 0.2
    assert np.all(np.abs(test_counts - expected) < 1)
    again = train_test_split(X, y, test_size=0.2, seed=0, stratify=True)
    np.testing.assert_array_equal(again[3], yte)


def test_split_integer_test_size():
    X = np.zeros((10, 2))
    y = np.arange(10)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=3, seed=0)
    assert len(yte) == 3 and len(ytr) == 7


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.1, 1.5, 0, 10, 11])
def test_split_rejects_bad_test_size(test_size):
    with pytest.raises(ValueError):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_size=test_size)


def test_split_rejects_bad_inputs():
    with pytest.raises(ValueError, match="rows"):
        train_test_split(np.zeros((10, 2)), np.zeros(9))
    with pytest.raises(TypeError):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_size="0.2")
    with pytest.raises(TypeError):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_size=True)
    with pytest.raises(TypeError):
        train_test_split(np.zeros((10, 2)), np.zeros(10), seed=1.5)
    with pytest.raises(ValueError):
        train_test_split(np.zeros((1, 2)), np.zeros(1))


def test_import_does_not_read_the_file(tmp_path):
    import subprocess
    import sys
    code = ("import nnfast.datasets as d; assert not d._cache; "
            "d.load_digits(); assert 'digits' in d._cache")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
