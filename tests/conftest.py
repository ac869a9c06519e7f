import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: small ops gain little from 2, and the CI box runs many processes at
    once (measured: 4x faster under contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
