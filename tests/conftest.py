"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (results independent of the core count), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
