"""Fixtures shared by the multi-process tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The workers run with 1 thread; matmul blocking (hence rounding) can depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
