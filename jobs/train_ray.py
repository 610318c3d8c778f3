"""Data-parallel student training on Ray Train: TorchTrainer, one GPU a worker and NCCL where the
cluster has a GPU for every worker (and the config does not ask for the CPU), else CPU workers and gloo.

The `distill` command passes `train_with_ray` to distill.run.run_distill as its launcher when
`workers > 1`; each worker runs the same `distill.training.train_student` as the in-process path,
with its rank and the world size (the process group is set up by Ray Train; the model is wrapped
in DDP by the trainer). Rank 0 writes the student weights and train_result.json into OUT, which
this function returns.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distill.config import DistillConfig
from distill.training import TRAIN_RESULT, train_student
from index.core.allocator import tune_allocator
from index.core.atomic import read_json
from index.core.config import from_mapping


def _train_loop(config: dict[str, Any]) -> None:
    tune_allocator()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    train_student(from_mapping(DistillConfig, config["cfg"]), rank=dist.get_rank(), world=dist.get_world_size(),
                  distributed=True)


def plan_workers(num_workers: int, gpus: float, device: str | None) -> tuple[bool, str]:
    """(use_gpu, backend): GPUs and NCCL when the cluster has one for each worker and `device` is
    not 'cpu'; CPU and gloo otherwise. `device` 'cuda' without enough GPUs is an error."""
    enough = gpus >= num_workers
    if device == "cuda" and not enough:
        raise RuntimeError(f"device 'cuda' with {num_workers} workers needs {num_workers} GPUs; "
                           f"the Ray cluster has {gpus:g}")
    use_gpu = enough and device != "cpu"
    return use_gpu, "nccl" if use_gpu else "gloo"


def train_with_ray(cfg: dict[str, Any], num_workers: int, *, threads_per_worker: int = 1) -> dict[str, Any]:
    """Train on `num_workers` Ray Train workers (see `plan_workers`); returns the rank-0 train
    result (OUT/train_result.json)."""
    import ray  # lazy: ray
    from ray.train import RunConfig, ScalingConfig  # lazy: ray
    from ray.train.torch import TorchConfig, TorchTrainer  # lazy: ray

    out = Path(cfg["out"]).resolve()
    started = not ray.is_initialized()
    if started:
        repo = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=max(num_workers, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    (out / TRAIN_RESULT).unlink(missing_ok=True)
    use_gpu, backend = plan_workers(num_workers, ray.cluster_resources().get("GPU", 0), cfg.get("device"))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg, "threads_per_worker": threads_per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name="distill-train", storage_path=str(out / "ray")),
    )
    try:
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return read_json(out / TRAIN_RESULT)
