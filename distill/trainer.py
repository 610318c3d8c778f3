"""One training phase: AdamW + cosine decay with linear warmup, AMP on CUDA, atomic checkpoints and
exact resume.

A checkpoint holds the task (student and method parameters), optimizer, scheduler, RNG states
(torch, numpy, python) and the data position (epoch, step in epoch). Data order is a pure function of
(seed, epoch) (see data.py), so a resumed phase asks for the epoch again with the done steps skipped
and continues with the same batches, weights and RNG state as an uninterrupted run. A finished phase
writes final.pt and then done.json (with the run fingerprint) last; a rerun loads it and moves on,
and a checkpoint from another configuration is refused.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from index.core.atomic import FingerprintMismatch, atomic_path, check_done, write_json
from index.core.errors import ConfigError

Batch = dict[str, Any]
BatchFn = Callable[[int, int], Iterator[Batch]]   # (epoch, batches to skip) -> batches
LAST, FINAL, DONE = "last.pt", "final.pt", "done.json"


@dataclass(frozen=True)
class PhasePlan:
    name: str
    total_steps: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    warmup_steps: int = 0


@dataclass
class PhaseResult:
    name: str
    completed: bool
    steps: int
    epochs: list[dict[str, float]] = field(default_factory=list)   # {"epoch", "seconds", "steps", losses...}
    step_loss: list[float] = field(default_factory=list)           # the loss of every step, in order
    resumed_from: int | None = None
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _save(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def make_optimizer(task: nn.Module, plan: PhasePlan) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over task.param_groups(); groups flagged constant_lr keep their lr, the rest follow the schedule."""
    groups = task.param_groups(plan.lr, plan.weight_decay)  # type: ignore[operator]
    opt = torch.optim.AdamW(groups, lr=plan.lr, weight_decay=plan.weight_decay)
    lambdas = [(lambda s: 1.0) if g.get("constant_lr") else
               (lambda s, t=plan.total_steps, w=plan.warmup_steps: lr_factor(s, t, w)) for g in groups]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def train_phase(task: nn.Module, plan: PhasePlan, batches: BatchFn, *, ckpt_dir: str | Path, run_fingerprint: str,
                seed: int, device: torch.device, amp: bool = True, checkpoint_every: int = 100,
                stop_at: int | None = None, is_main: bool = True, distributed: bool = False,
                progress: bool = True) -> PhaseResult:
    """Train `task` (a module mapping a batch to named losses with "loss") for plan.total_steps.

    `stop_at`: return after this many steps of the phase without saving anything, as a kill would;
    a rerun resumes from the last periodic checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    done = check_done(ckpt_dir / DONE, run_fingerprint)
    if done is not None:
        task.load_state_dict(torch.load(ckpt_dir / FINAL, map_location="cpu", weights_only=False)["task"])
        return PhaseResult(plan.name, True, done["steps"], done["epochs"], step_loss=done.get("step_loss", []),
                           reused=True)
    if plan.total_steps <= 0:
        raise ConfigError(f"phase {plan.name!r} has no steps (empty data or zero epochs)")

    task.to(device)
    opt, sched = make_optimizer(task, plan)
    step, epoch, in_epoch, epochs, step_loss, resumed_from = 0, 0, 0, [], [], None
    last = ckpt_dir / LAST
    if last.exists():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        if ck["fingerprint"] != run_fingerprint:
            raise FingerprintMismatch(f"{last} was written by a run with another configuration "
                                      f"({ck['fingerprint']} != {run_fingerprint}); use a new --out")
        task.load_state_dict(ck["task"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        step, epoch, in_epoch, epochs = ck["step"], ck["epoch"], ck["in_epoch"], ck["epochs"]
        step_loss = list(ck.get("step_loss", []))
        resumed_from = step
    else:
        seed_everything(seed)

    model: nn.Module = task
    if distributed:
        model = nn.parallel.DistributedDataParallel(task, find_unused_parameters=True)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    def checkpoint() -> None:
        if is_main:
            _save(last, {"task": task.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "rng": rng_state(), "step": step, "epoch": epoch, "in_epoch": in_epoch,
                         "epochs": epochs, "step_loss": step_loss, "fingerprint": run_fingerprint,
                         "phase": plan.name})

    bar = tqdm(total=plan.total_steps, initial=step, desc=plan.name, disable=not (is_main and progress),
               dynamic_ncols=True)
    task.train()
    try:
        while step < plan.total_steps:
            t0, n, sums = time.perf_counter(), 0, {}
            for batch in batches(epoch, in_epoch):
                if step >= plan.total_steps:
                    break
                if stop_at is not None and step >= stop_at:
                    return PhaseResult(plan.name, False, step, epochs, step_loss, resumed_from)
                batch = _to_device(batch, device)
                with autocast:
                    losses = model(batch)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                sched.step()
                step, in_epoch, n = step + 1, in_epoch + 1, n + 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                step_loss.append(float(f"{float(losses['loss'].detach()):.6g}"))
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", refresh=False)
                if checkpoint_every and step % checkpoint_every == 0 and step < plan.total_steps:
                    checkpoint()
            if n == 0 and in_epoch == 0:
                raise RuntimeError(f"phase {plan.name!r}: epoch {epoch} produced no batches")
            if n:
                epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "steps": n,
                               **{k: v / n for k, v in sums.items()}})
            epoch, in_epoch = epoch + 1, 0
    finally:
        bar.close()
    if is_main:
        _save(ckpt_dir / FINAL, {"task": task.state_dict(), "phase": plan.name, "steps": step})
        write_json(ckpt_dir / DONE, {"fingerprint": run_fingerprint, "steps": step, "epochs": epochs,
                                     "step_loss": step_loss, "plan": plan.__dict__})
        last.unlink(missing_ok=True)
    return PhaseResult(plan.name, True, step, epochs, step_loss, resumed_from)
