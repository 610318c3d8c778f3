"""distill --workers N under Ray Train: GPUs and NCCL where there is a GPU per worker, else CPU and gloo."""
import pytest
import torch

from distill.training import worker_device
from jobs.train_ray import plan_workers


def test_gpu_per_worker_means_nccl():
    assert plan_workers(2, 8, "auto") == (True, "nccl")
    assert plan_workers(4, 4, "cuda") == (True, "nccl")


def test_cpu_and_gloo_otherwise():
    assert plan_workers(2, 0, "auto") == (False, "gloo")
    assert plan_workers(4, 2, "auto") == (False, "gloo")   # not one GPU for each worker
    assert plan_workers(2, 8, "cpu") == (False, "gloo")


def test_cuda_without_enough_gpus_is_refused():
    with pytest.raises(RuntimeError, match="needs 3 GPUs"):
        plan_workers(3, 1, "cuda")


def test_worker_device_without_a_process_group_is_the_cpu():
    assert not torch.distributed.is_initialized()
    assert worker_device() == torch.device("cpu")
