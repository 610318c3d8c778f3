"""One trained quantizer for every index group, and the search fan-out over groups.

Embedding shards are written directly (synthetic clustered vectors, float16 as the index stage
writes them), then the FAISS half of the indexing stage (`build_faiss_groups`) runs on them.
"""
from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import faiss_io, knn, store
from index.build import build_faiss_groups
from index.config import FaissConfig, IndexConfig
from index.core import contract
from index.core.atomic import FingerprintMismatch, write_json
from index.gallery_index import GalleryIndex
from index.search import ShardedIndex, plan_group_tasks, search_groups
from jobs.executors import LocalExecutor

DIM = 32
ENCODER = "synthetic"
SPEC = {"name": ENCODER, "family": "test", "arch": "none", "embed_dim": DIM, "image_size": 32,
        "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
FACTORY = "IVF32,PQ8x4"    # 4-bit PQ: 16 centroids per sub-quantizer, trainable on small groups


def clustered(n: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_embeddings(root: Path, x: np.ndarray, num_shards: int) -> list[dict]:
    entries, offset = [], 0
    for s, part in enumerate(np.array_split(x, num_shards)):
        name = f"{s:05d}"
        rows = [store.Row(id=f"{name}/{i}", crop=0, recipe={}) for i in range(len(part))]
        fp = f"fp-{name}-{len(part)}"
        store.write_shard(root, name, {ENCODER: part}, rows, {"fingerprint": fp})
        entries.append({"name": name, "offset": offset, "num_vectors": len(part), "num_images": len(part),
                        "fingerprint": fp})
        offset += len(part)
    return entries


def build(root: Path, x: np.ndarray, num_groups: int, shared: bool = True, factory: str = FACTORY,
          executor=None, seed: int = 0, shards_per_group: int = 2) -> dict:
    """An index directory of `num_groups` groups (2 shards each) over x, with its manifest."""
    entries = write_embeddings(root, x, num_groups * shards_per_group)
    cfg = FaissConfig(factory=factory, shards_per_group=shards_per_group, nprobe=4, shared_quantizer=shared)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)   # k-means on a busy 2-core machine: a second OpenMP thread only waits at barriers
    try:
        part = build_faiss_groups(root, entries, (ENCODER,), DIM, cfg, seed, executor or LocalExecutor())
    finally:
        faiss.omp_set_num_threads(threads)
    manifest = {"num_vectors": len(x), "encoders": [SPEC], "dim": DIM, "shards": entries, **part}
    write_json(root / contract.MANIFEST_FILE, manifest)
    return manifest


def assert_same_topk(got, want) -> None:
    """Same scores bit for bit, same ids wherever a score is above the row's k-th score.

    Among entries tied at the k-th score faiss keeps the ones its heap met first, which depends on
    how the lists were split into tasks; anything tied there is an equally good answer.
    """
    np.testing.assert_array_equal(got[0], want[0])
    above = got[0] > got[0][:, -1:]
    assert above.mean() > 0.8
    np.testing.assert_array_equal(np.where(above, got[1], -2), np.where(above, want[1], -2))


def groups_of(root: Path, manifest: dict) -> list:
    return [faiss_io.load_index(root / g["file"]) for g in manifest["groups"]]


def centroids(index) -> np.ndarray:
    ivf = faiss.extract_index_ivf(index)
    return ivf.quantizer.reconstruct_n(0, ivf.nlist)


def pq_centroids(index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(faiss.extract_index_ivf(index)).pq.centroids)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(8000, 40, seed=1)
    q = clustered(60, 40, seed=2).astype(np.float32)
    return x, q


@pytest.fixture(scope="module")
def shared8(data, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shared8")
    return root, build(root, data[0], 8)


# ---------------------------------------------------------------- the gallery-wide sample

def test_gallery_sample_rows_is_proportional_and_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(60):
        counts = [int(c) for c in rng.integers(0, 500, int(rng.integers(1, 30)))]
        size = int(rng.integers(0, 2 * sum(counts) + 2))
        plan = knn.gallery_sample_rows(counts, size, seed=3)
        assert sum(len(p) for p in plan) == min(size, sum(counts))
        for c, p in zip(counts, plan):
            assert len(np.unique(p)) == len(p) and (np.diff(p) > 0).all()
            assert len(p) == 0 or (p.min() >= 0 and p.max() < c)
            if sum(counts):
                assert abs(len(p) - c * min(size, sum(counts)) / sum(counts)) < 1 + 1e-9
        again = knn.gallery_sample_rows(counts, size, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    a = knn.gallery_sample_rows([1000, 1000], 100, seed=0)
    b = knn.gallery_sample_rows([1000, 1000], 100, seed=1)
    assert not np.array_equal(a[0], b[0])
    with pytest.raises(ValueError, match=">= 0"):
        knn.gallery_sample_rows([3, -1], 2)


def test_choose_factory_sizes_lists_for_the_whole_gallery():
    budget = 2**30
    per_group = knn.choose_factory(300_000, 64, 64 * 2**20, total_vectors=None)
    shared = knn.choose_factory(300_000, 64, 64 * 2**20, total_vectors=10_000_000)
    assert per_group.startswith(f"IVF{knn.ivf_nlist(300_000)},")
    assert shared.startswith(f"IVF{knn.ivf_nlist(10_000_000)},") and knn.ivf_nlist(10_000_000) == 16384
    # small groups of a large gallery are no longer exact: together they are one large index
    assert knn.choose_factory(10_000, 64, budget) == "Flat"
    assert knn.choose_factory(10_000, 64, budget, total_vectors=1_000_000) == "IVF4096,Flat"
    with pytest.raises(ValueError, match="total_vectors"):
        knn.choose_factory(1000, 64, budget, total_vectors=10)


# ---------------------------------------------------------------- one quantizer for every group

def test_groups_share_centroids_and_codebooks(shared8, data, tmp_path):
    root, manifest = shared8
    assert manifest["shared_quantizer"] is True
    assert manifest["trained_index"]["file"] == contract.TRAINED_INDEX_FILE
    trained = faiss_io.load_index(root / contract.TRAINED_INDEX_FILE)
    assert trained.ntotal == 0 and trained.is_trained
    groups = groups_of(root, manifest)
    assert sum(g.ntotal for g in groups) == len(data[0])
    for g in groups:
        np.testing.assert_array_equal(centroids(g), centroids(trained))
        np.testing.assert_array_equal(pq_centroids(g), pq_centroids(trained))
    # each group trained on its own sample: the centroids differ (the old layout)
    own_root = tmp_path / "own"
    own = groups_of(own_root, build(own_root, data[0], 8, shared=False))
    assert not (own_root / contract.TRAINED_INDEX_FILE).exists()
    assert not np.array_equal(centroids(own[0]), centroids(own[1]))


def test_train_sample_is_drawn_across_the_gallery(shared8):
    root, manifest = shared8
    record = manifest["trained_index"]
    assert record["num_train"] == min(knn.training_size(FACTORY), manifest["num_vectors"])
    from index.build import gallery_training_sample
    a = gallery_training_sample(root, manifest["shards"], [ENCODER], 500, seed=0)
    b = gallery_training_sample(root, manifest["shards"], [ENCODER], 500, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (500, DIM) and a.dtype == np.float32
    plan = knn.gallery_sample_rows([s["num_vectors"] for s in manifest["shards"]], 500, 0)
    want = np.concatenate([store.load_features(root, s["name"], ENCODER)[p].astype(np.float32)
                           for s, p in zip(manifest["shards"], plan)])
    np.testing.assert_array_equal(a, want)


def test_shared_search_equals_one_index_of_all_vectors(shared8, data):
    root, manifest = shared8
    x, q = data
    trained = faiss_io.load_index(root / contract.TRAINED_INDEX_FILE)
    one = knn.build_index([(np.arange(len(x), dtype=np.int64), x)], FACTORY, DIM, None, trained=trained)
    k, nprobe = 50, 4
    faiss.extract_index_ivf(one).nprobe = nprobe
    want_s, want_i = ShardedIndex([one]).search(q, k)
    got_s, got_i = GalleryIndex(root).search(q, k, nprobe)
    # the same lists are scanned with the same codebooks: the same scores, bit for bit
    np.testing.assert_array_equal(got_s, want_s)
    assert (got_i >= 0).all()
    # 4-bit PQ codes tie often; among entries tied at a row's k-th score faiss keeps whichever its
    # heap met first, so ids are compared above the k-th score, and tied ones by their score
    above = got_s > got_s[:, -1:]
    assert above.mean() > 0.8
    for r in range(len(q)):
        assert set(got_i[r][above[r]]) == set(want_i[r][above[r]]), r
    assert len(set(got_i.ravel()) - set(want_i.ravel())) < 0.05 * got_i.size


def test_vectors_scanned_per_query_do_not_grow_with_groups(data, tmp_path):
    x, q = data
    stats = faiss.cvar.indexIVF_stats
    scanned = {}
    for mode, groups in (("shared", 1), ("shared", 8), ("own", 8)):
        root = tmp_path / f"{mode}{groups}"
        # the automatic rule's list counts: for the gallery (shared) or for one group (own)
        factory = f"IVF{knn.ivf_nlist(len(x) if mode == 'shared' else len(x) // groups)},PQ8x4"
        build(root, x, groups, shared=mode == "shared", factory=factory,
              shards_per_group=1 if groups == 1 and mode == "shared" else 2)
        gi = GalleryIndex(root)
        gi.search(q, 10, 4)          # opens the groups
        stats.reset()
        gi.search(q, 20, 4)
        scanned[mode, groups] = stats.ndis / len(q)
    assert scanned["shared", 8] == scanned["shared", 1] > 0
    assert scanned["own", 8] > 4 * scanned["shared", 8]   # 8 groups x 4 lists of 62 vs 4 lists of 62


# ---------------------------------------------------------------- fan-out through an executor

def test_executor_fan_out_equals_in_process_search(shared8, data):
    root, manifest = shared8
    _, q = data
    want = GalleryIndex(root).search(q, 30, 4)
    files = [g["file"] for g in manifest["groups"]]
    one_group = os.path.getsize(root / files[0])
    for budget in (1, 3 * one_group, 1 << 40):    # 8 tasks, 3 tasks, 1 task
        gi = GalleryIndex(root, executor=LocalExecutor(), search_task_bytes=budget)
        got = gi.search(q, 30, 4)
        if budget == 1 << 40:   # all groups in one task: the same scan order as in-process
            np.testing.assert_array_equal(got[1], want[1])
        assert_same_topk(got, want)
        assert gi._faiss is None   # the fan-out opened no group in this process


def test_search_groups_opens_only_its_groups(shared8, data):
    root, manifest = shared8
    _, q = data
    files = [g["file"] for g in manifest["groups"]]
    part = search_groups(root, files[:2], q, 10)
    ids = part[1][part[1] >= 0]
    first_two = sum(g["num_vectors"] for g in manifest["groups"][:2])
    assert ids.size and ids.max() < first_two
    with pytest.raises(ValueError, match="at least one group"):
        search_groups(root, [], q, 10)


def test_old_per_group_index_still_searches(data, tmp_path):
    x, q = data
    root = tmp_path / "old"
    manifest = build(root, x, 4, shared=False, factory="IVF16,PQ8x4")
    manifest.pop("shared_quantizer")
    manifest.pop("trained_index")   # an index written before groups shared a quantizer
    write_json(root / contract.MANIFEST_FILE, manifest)
    want = ShardedIndex.from_dir(root).search(q, 25, 4)
    for gi in (GalleryIndex(root), GalleryIndex(root, executor=LocalExecutor(), search_task_bytes=1)):
        got = gi.search(q, 25, 4)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])


def test_flat_groups_fan_out_memory_mapped(data, tmp_path):
    x, q = data
    root = tmp_path / "flat"
    manifest = build(root, x, 3, factory="Flat")
    assert manifest["shared_quantizer"] is False and manifest["trained_index"] is None
    want = ShardedIndex.from_dir(root).search(q, 40)
    got = GalleryIndex(root, executor=LocalExecutor(), search_task_bytes=1).search(q, 40)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    exact = np.concatenate([store.combined(root, s["name"], [ENCODER]) for s in manifest["shards"]])
    order = np.argsort(-(q @ exact.T), axis=1, kind="stable")[:, :40]
    np.testing.assert_allclose(got[0], np.take_along_axis(q @ exact.T, order, axis=1), rtol=1e-5, atol=1e-6)


def test_deeper_searches_are_reused(shared8, data):
    root, _ = shared8
    _, q = data
    gi = GalleryIndex(root, executor=LocalExecutor())
    deep = gi.search(q, 40, 4)
    assert gi.searches == 1
    for k in (1, 10, 40):
        s, i = gi.search(q, k, 4)
        np.testing.assert_array_equal(i, deep[1][:, :k])
        np.testing.assert_array_equal(s, deep[0][:, :k])
    assert gi.searches == 1
    gi.search(q, 41, 4)
    gi.search(q, 10, 8)           # another nprobe is another search
    gi.search(q[:5], 10, 4)       # other queries too
    assert gi.searches == 4


def test_plan_group_tasks_property():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = [int(s) for s in rng.integers(0, 100, int(rng.integers(0, 30)))]
        budget = int(rng.integers(1, 300))
        tasks = plan_group_tasks(sizes, budget)
        assert [g for t in tasks for g in t] == list(range(len(sizes)))
        for t in tasks:
            assert len(t) == 1 or sum(sizes[g] for g in t) <= budget
        for a, b in zip(tasks[:-1], tasks[1:]):   # packed: the next group did not fit
            assert sum(sizes[g] for g in a) + sizes[b[0]] > budget
    with pytest.raises(ValueError):
        plan_group_tasks([1], 0)


@pytest.mark.slow
def test_search_groups_local_and_ray_identical(shared8, data, local_ray):
    from jobs.executors import RayExecutor

    root, _ = shared8
    _, q = data
    want = GalleryIndex(root, executor=LocalExecutor(), search_task_bytes=1).search(q, 30, 4)
    got = GalleryIndex(root, executor=RayExecutor(num_workers=2), search_task_bytes=1).search(q, 30, 4)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


# ---------------------------------------------------------------- the train step: resume, refusal

class DieAtGroups(LocalExecutor):
    """Runs the train step, then dies before the first group."""

    def __init__(self):
        self.descs: list[str] = []

    def map(self, make_worker, tasks, desc="", **progress):
        self.descs.append(desc)
        if desc == "build indexes":
            raise KeyboardInterrupt("killed before the groups")
        return super().map(make_worker, tasks, desc, **progress)


def test_train_step_resumes_and_refuses_by_fingerprint(shared8, data, tmp_path):
    ref_root, ref_manifest = shared8
    x, _ = data
    root = tmp_path / "idx"
    dying = DieAtGroups()
    with pytest.raises(KeyboardInterrupt):
        build(root, x, 8, executor=dying)
    assert dying.descs == ["train quantizer", "build indexes"]
    trained = root / contract.TRAINED_INDEX_FILE
    mtime = trained.stat().st_mtime_ns
    manifest = build(root, x, 8)
    assert trained.stat().st_mtime_ns == mtime                   # reused, not retrained
    assert trained.read_bytes() == (ref_root / contract.TRAINED_INDEX_FILE).read_bytes()
    for g in manifest["groups"]:
        assert (root / g["file"]).read_bytes() == (ref_root / g["file"]).read_bytes()
    assert manifest["trained_index"] == ref_manifest["trained_index"]
    with pytest.raises(FingerprintMismatch, match="trained.index.done.json"):
        build(root, x, 8, seed=1)


def test_faiss_config_validation():
    for bad in ({"shards_per_group": 0}, {"nprobe": 0}, {"nprobe": 2.5}, {"shared_quantizer": "yes"},
                {"train_size": 0}, {"memory_budget_gb": 0}, {"flat_threshold": -1}, {"factory": ""}):
        with pytest.raises(ValueError, match="faiss."):
            IndexConfig(faiss=bad)
    with pytest.raises(ValueError, match="unknown key"):
        IndexConfig(faiss={"shared_quantiser": True})
    cfg = IndexConfig(faiss={"shared_quantizer": False, "train_size": 1000})
    assert cfg.faiss.shared_quantizer is False and cfg.faiss.train_size == 1000
    assert IndexConfig().faiss.shared_quantizer is True
