"""Executors: run one stage function over many tasks, in-process or on Ray, behind one interface.

    executor.map(make_worker, tasks, desc) -> results (in task order)

`make_worker()` builds the per-worker state once (e.g. an `Embedder` that loads its encoders) and
returns a callable applied to each task. `LocalExecutor` calls it once in this process;
`RayExecutor` calls it once per Ray actor, so each actor loads its models once. Tasks and results
are plain data. This module is the only place (with jobs/*) that imports ray.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

import torch

from index.core.allocator import tune_allocator
from index.core.errors import ConfigError
from index.core.executor import Executor, LocalExecutor, progress_bar  # noqa: F401 - re-exported: the in-process executor
from jobs.ray_data import embed_with_ray_data

T = TypeVar("T")
R = TypeVar("R")


class _Actor:
    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], torch_threads: int | None):
        tune_allocator()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.worker = make_worker()

    def run(self, task: Any) -> Any:
        return self.worker(task)


class RayExecutor:
    """A pool of Ray actors, each building its worker once; tasks are scheduled as actors free up.

    Connects to the cluster in RAY_ADDRESS (set by `ray job submit`) or `address`, else starts a
    local Ray instance.

    Each actor runs torch with `torch_threads` intra-op threads, by default the count this process
    uses, i.e. what `LocalExecutor` runs with. Ray would otherwise leave an actor one thread
    (OMP_NUM_THREADS = its CPUs), and torch's CPU reductions (e.g. the spatial means of pooling and
    squeeze-excite) sum in another order with one thread than with several, which changes float16
    embeddings in the last bit: Local and Ray runs would not write the same files. Under
    `ray job submit` the driver itself is started with OMP_NUM_THREADS=1, so its actors use one
    thread, and the files equal those of a local run with one thread.
    """

    name = "ray"

    def __init__(self, num_workers: int | None = None, address: str | None = None,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0, torch_threads: int | None = None):
        self.num_workers = num_workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.torch_threads = torch_threads

    def _init(self):
        import ray  # lazy: ray
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False,
                     include_dashboard=False if address is None else None)
        return ray

    def embed_shards(self, tasks: Sequence[Any], specs: tuple[Any, ...], device: str | None) -> list[Any]:
        """The embedding stage as a Ray Data stream (jobs.ray_data): shards read and decoded on CPU
        tasks, encoders in `num_workers` actors with `gpus_per_worker` GPUs each (default: one actor
        per GPU share; on CPU, half the CPUs, leaving the rest to the readers)."""
        if not tasks:
            return []
        ray = self._init()

        res = ray.cluster_resources()
        cpus = res.get("CPU", 1)
        if self.gpus_per_worker > 0:
            n = self.num_workers or max(1, int(res.get("GPU", 0) // self.gpus_per_worker))
        else:
            n = self.num_workers or max(1, int(cpus // (2 * self.cpus_per_worker)))
        n = max(1, min(n, int((cpus - 1) // self.cpus_per_worker)))  # one CPU stays for the readers
        return embed_with_ray_data(list(tasks), specs, device, num_encoders=n,
                                   gpus_per_encoder=self.gpus_per_worker, cpus_per_encoder=self.cpus_per_worker,
                                   torch_threads=self.torch_threads or _local_torch_threads())

    def map(self, make_worker: Callable[[], Callable[[T], R]], tasks: Sequence[T], desc: str = "",
            units: Sequence[int] | None = None, unit: str = "task") -> list[R]:
        if not tasks:
            return []
        ray = self._init()
        from ray.util import ActorPool  # lazy: ray

        n = self.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_worker))
        n = min(n, len(tasks))
        actor_cls = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)(_Actor)
        actors = [actor_cls.remote(make_worker, self.torch_threads or _local_torch_threads()) for _ in range(n)]
        pool = ActorPool(actors)
        bar, sizes = progress_bar(tasks, desc, units, unit)
        results = []
        with bar:
            for n, res in zip(sizes, pool.map(lambda a, t: a.run.remote(t), list(tasks))):
                results.append(res)
                bar.update(n)
        for a in actors:
            ray.kill(a)
        return results


def _local_torch_threads() -> int:
    return torch.get_num_threads()


EXECUTORS = ("local", "ray")


def make_executor(name: str, **kwargs: Any) -> Executor:
    """The executor `name` names; `kwargs` are RayExecutor's options (the local executor takes none)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**kwargs)
    raise ConfigError(f"unknown executor {name!r}; valid choices: {', '.join(EXECUTORS)}")
