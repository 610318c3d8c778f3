"""Fixtures shared by several test modules; the test session's allocator set as every command's."""
import contextlib
import json

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


@contextlib.contextmanager
def _one_thread():
    """One torch and one FAISS thread inside the block, restored after it (a session fixture cannot use
    one_thread_per_module)."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch and one FAISS thread for a whole module: tiny models gain nothing from intra-op
    threads, and on a busy machine those only spin. Restored afterwards."""
    with _one_thread():
        yield


@pytest.fixture(scope="session")
def _local_ray_started():
    """Whether `local_ray` started the Ray instance of this process; shuts it down when the session ends."""
    started = []
    yield started
    if started:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def local_ray(_local_ray_started):
    """A local Ray instance in this process (2 CPUs, no dashboard), as the Local-vs-Ray tests run on. Starting one
    takes seconds, so the instance a test started stays up for the next test that asks for it and is shut down
    at the end of the session (or by `without_ray`)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        _local_ray_started.append(True)
    return ray


@pytest.fixture
def without_ray():
    """No Ray instance in this process: one `local_ray` left running is shut down first, so the code under test
    starts (and stops) its own, as it does for a user."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def gallery_world(tmp_path_factory):
    """fixtures_gallery's task and gallery, indexed with test-tiny-timm (fixtures_gallery.build_indexed_world),
    built once for the modules that curate from it (test_curate, test_ecosystem_readers), with one thread as
    they run. Tests write their runs under its root; the fixture, the index and the cache are theirs to read."""
    from fixtures_gallery import build_indexed_world

    with _one_thread():
        return build_indexed_world(tmp_path_factory.mktemp("gallery-world"))


@pytest.fixture(scope="session")
def curated_in_small_shards(gallery_world):
    """(directory, manifest) of `curate` of SMALL_SHARDS_SIZE items from gallery_world in transfer tars of
    SMALL_SHARD_SIZE samples, run once: test_curate checks the split, test_ecosystem_readers reads the set."""
    from curation import cli
    from fixtures_gallery import SMALL_SHARD_SIZE, SMALL_SHARDS_SIZE, curate_argv
    from index.core import contract

    out = gallery_world.root / "shards7"
    with _one_thread():
        rc = cli.main(curate_argv(gallery_world, out, SMALL_SHARDS_SIZE, "--shard-size", str(SMALL_SHARD_SIZE)))
    assert rc == 0
    return out, json.loads((out / contract.MANIFEST_FILE).read_text())
