"""Fixtures shared by several test modules; the test session's allocator set as every command's."""
import pytest
import torch

from index.core.allocator import tune_allocator

tune_allocator()


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch thread (results independent of the core count), then restore."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch and one FAISS thread for a whole module: tiny models gain nothing from intra-op
    threads, and on a busy machine those only spin. Restored afterwards."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])
