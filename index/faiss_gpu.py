"""IVF groups on the GPU with faiss's GPU indexes, where the `gpu` extra (faiss-gpu) is installed.

`ivf_to_gpu(index)` copies an IVF index (Flat or PQ lists) to GPU 0 and returns the GPU index, or
returns the index unchanged: when this faiss has no GPU support or sees no GPU, and for every
non-IVF index (flat groups are searched exactly in torch, index.torch_search) and for fast-scan PQ
(`PQ{m}x4fs`, which faiss's GPU indexes do not implement; its SIMD scan stays on the CPU and the
re-ranking of its candidates runs where the vectors are). faiss's GPU indexes
cap k at 2,048: `index.search.ShardedIndex` searches a CPU copy above that.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def _resources():
    import faiss  # lazy: faiss
    return faiss.StandardGpuResources()


def gpu_available() -> bool:
    import faiss  # lazy: faiss
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_to_gpu(index, device: int = 0):
    import faiss  # lazy: faiss
    if not gpu_available():
        return index
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return index
    if isinstance(ivf, faiss.IndexIVFFastScan):
        return index
    return faiss.index_cpu_to_gpu(_resources(), device, index)
