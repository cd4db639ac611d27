"""Fixtures shared by the test modules."""
import pytest

import nnfast as nf


@pytest.fixture(params=[1, 2], ids=["1t", "2t"])
def threads(request):
    """Run the test with nnfast on 1 and on 2 threads (the setting is put back after)."""
    before = nf.get_num_threads()
    nf.set_num_threads(request.param)
    yield request.param
    nf.set_num_threads(before)
