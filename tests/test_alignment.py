"""Arrays the kernels split across threads start on a cache line (nnfast/_memory.py)."""
import numpy as np
import pytest

import nnfast as nf
from nnfast import _memory


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (784, 256), (0,), (2, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_empty_zeros_and_copy_are_line_aligned_contiguous_arrays(shape, dtype):
    for _ in range(5):  # several allocations: NumPy's start at varying offsets
        e = _memory.empty(shape, dtype)
        assert e.shape == shape and e.dtype == dtype
        assert e.flags.c_contiguous and e.flags.writeable
        assert e.size == 0 or e.ctypes.data % 64 == 0
        z = _memory.zeros(shape, dtype)
        assert z.ctypes.data % 64 == 0 or z.size == 0
        assert not z.any()
        src = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        c = _memory.copy(src)
        assert c.size == 0 or c.ctypes.data % 64 == 0
        np.testing.assert_array_equal(c, src)
        assert not np.shares_memory(c, src)


def test_model_parameters_workspace_and_optimizer_state_are_aligned():
    m = nf.Sequential(nf.Dense(203, 330), nf.Dense(330, 10, activation="softmax"), seed=0)
    rng = np.random.default_rng(0)
    X, y = rng.random((40, 203)).astype(np.float32), rng.integers(0, 10, 40)
    for opt in (nf.SGD(lr=0.01, momentum=0.9), nf.Adam()):
        m.fit(X, y, loss="cross_entropy", optimizer=opt, batch_size=8, epochs=1)
        arrays = [a for layer in m.layers for a in (layer.W, layer.b, layer.dW, layer.db)]
        ws = m._workspace
        arrays += ws.Z + ws.A + ws.G + [ws.x_batch, ws.t_batch, ws.l_batch]
        state = [a for _, a in opt.state_arrays()]
        assert len(state) == (4 if isinstance(opt, nf.SGD) else 8)
        arrays += state
        assert all(a.ctypes.data % 64 == 0 for a in arrays)
        assert all(a.flags.c_contiguous and a.flags.writeable for a in arrays)
