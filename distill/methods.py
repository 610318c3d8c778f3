"""METHODS: distillation methods as tasks (nn.Module) that map a batch to named losses.

A task sees two kinds of batches: labelled batches ("label" present) and transfer batches (cached
teacher outputs present, no label). Every task returns {"loss": total to minimise, "task_loss": CE
or 0, <method>_loss: its regulariser, unscaled}, and for the learning curves "accuracy" on labelled
batches and, for KD on transfer batches, "teacher_agreement" (the student's top class is the
teacher's); those two are detached and not minimised. Phases: an optional transfer phase on the transfer
set, then a finetune phase on the labelled set (Vemulapalli et al. 2024, Figure 2).

- labels_only   CE on the labelled set (the baseline).
- kd            transfer: T^2 KL(teacher || student) on cached teacher logits; finetune: CE.
- feature_kd    transfer: a linear projection of the student's features matched to the cached teacher
                features (cosine, and/or InfoNCE); finetune: CE. (Task-agnostic transfer.)
- aft           Qiu et al. 2024, Algorithm 1: CE + beta * ||K_phi - K_{mu psi}||_F / B with mu =
                diag(sigmoid(s)), s = 0 at start, in its own Adam group (lr aft_lr, no weight
                decay). The student's features enter the kernel directly (no learned map on them).
                Theta gets the gradient of CE + beta * delta, s the gradient of delta alone (the
                update of Algorithm 1, step 7). On the transfer set (no labels) only beta * delta.
                Several pretrained models: their features are concatenated (feature_encoders).
- kd_nearest    Borup et al. 2023, DistillNearest: the teachers are ranked by task similarity (PARC by
                default) on the labelled probe set; KD from the top-ranked one through an auxiliary head
                sized to that teacher's output space (its pseudo-labels need not be the target classes).
- kd_weighted   Borup et al. 2023, DistillWeighted (eq. 4): one auxiliary head per teacher, the KD losses
                summed with weights softmax(p * similarity) (p = weight_temperature: 0 equal, inf nearest).
                The auxiliary heads are discarded after training; finetune: CE on the main head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import aft_kernel_distance, feature_contrastive_loss, feature_cosine_loss, kd_loss, scale_grad
from index.core.errors import InputError
from index.core.registry import Registry

Batch = dict[str, Any]
Losses = dict[str, torch.Tensor]


def top1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose top logit is the target class (detached)."""
    return (logits.detach().argmax(dim=1) == target.to(logits.device)).float().mean()


def decay_groups(module: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices and kernels, none on biases and norm parameters."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Task(nn.Module):
    reg_name: str | None = None

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def _ce(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["label"])

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(self, lr, weight_decay)

    @torch.no_grad()
    def matched_targets(self, batch: Batch) -> Batch:
        """Cached-target values for this batch at which the regulariser is exactly zero (for tests)."""
        return {}

    @torch.no_grad()
    def feature_weights(self) -> torch.Tensor | None:
        """The learned weight of each pretrained feature (AFT's sigmoid(s)), or None: a method without."""
        return None


class LabelsOnly(Task):
    def forward(self, batch: Batch) -> Losses:
        if "label" not in batch:
            raise ValueError("labels_only trains on labelled batches only")
        logits = self.student(batch["image"])
        loss = self._ce(logits, batch)
        return {"loss": loss, "task_loss": loss.detach(), "accuracy": top1(logits, batch["label"])}


class KD(Task):
    reg_name = "kd_loss"

    def __init__(self, student: nn.Module, temperature: float = 1.0):
        super().__init__(student)
        self.temperature = temperature

    def forward(self, batch: Batch) -> Losses:
        logits = self.student(batch["image"])
        if "label" in batch:
            loss = self._ce(logits, batch)
            return {"loss": loss, "task_loss": loss.detach(), "accuracy": top1(logits, batch["label"])}
        teacher = batch["teacher_logits"].to(logits.device)
        kd = kd_loss(logits, teacher, self.temperature)
        return {"loss": kd, "task_loss": torch.zeros((), device=kd.device), "kd_loss": kd.detach(),
                "teacher_agreement": top1(logits, teacher.argmax(dim=1))}

    @torch.no_grad()
    def matched_targets(self, batch: Batch) -> Batch:
        return {"teacher_logits": self.student(batch["image"]).float()}


class FeatureKD(Task):
    reg_name = "feature_loss"

    def __init__(self, student: nn.Module, teacher_dim: int, loss: str = "cosine",
                 contrastive_temperature: float = 0.07):
        super().__init__(student)
        self.projection = nn.Linear(student.num_features, teacher_dim)
        self.loss_kind = loss
        self.contrastive_temperature = contrastive_temperature

    def forward(self, batch: Batch) -> Losses:
        if "label" in batch:
            logits = self.student(batch["image"])
            loss = self._ce(logits, batch)
            return {"loss": loss, "task_loss": loss.detach(), "accuracy": top1(logits, batch["label"])}
        pred = self.projection(self.student.forward_features(batch["image"]))
        target = batch["teacher_features"].to(pred.device)
        parts = {}
        if "cosine" in self.loss_kind:
            parts["cosine_loss"] = feature_cosine_loss(pred, target)
        if "contrastive" in self.loss_kind:
            parts["contrastive_loss"] = feature_contrastive_loss(pred, target, self.contrastive_temperature)
        loss = sum(parts.values())
        out = {"loss": loss, "task_loss": torch.zeros((), device=loss.device), "feature_loss": loss.detach()}
        out.update({k: v.detach() for k, v in parts.items()})
        return out

    @torch.no_grad()
    def matched_targets(self, batch: Batch) -> Batch:
        return {"teacher_features": self.projection(self.student.forward_features(batch["image"])).float()}


class AFT(Task):
    reg_name = "aft_loss"

    def __init__(self, student: nn.Module, pretrained_dim: int, beta: float = 10.0, s_lr: float = 1e-2):
        super().__init__(student)
        if beta <= 0:
            raise ValueError(f"AFT needs beta > 0, got {beta}")
        self.s = nn.Parameter(torch.zeros(pretrained_dim))
        self.beta = beta
        self.s_lr = s_lr

    def forward(self, batch: Batch) -> Losses:
        logits, feats = self.student.forward_both(batch["image"])
        zero = torch.zeros((), device=logits.device)
        loss, out = zero, {}
        if "label" in batch:
            ce = self._ce(logits, batch)
            loss = loss + ce
            out["task_loss"] = ce.detach()
            out["accuracy"] = top1(logits, batch["label"])
        else:
            out["task_loss"] = zero
        if "teacher_features" in batch:
            # s's gradient is that of delta alone (Algorithm 1, step 7), theta's that of beta * delta
            s = scale_grad(self.s, 1.0 / self.beta)
            delta = aft_kernel_distance(feats, batch["teacher_features"].to(feats.device), s)
            loss = loss + self.beta * delta
            out["aft_loss"] = delta.detach()
        elif "label" not in batch:
            raise ValueError("an AFT batch needs labels, cached pretrained features, or both")
        out["loss"] = loss
        return out

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(self.student, lr, weight_decay) + [
            {"params": [self.s], "lr": self.s_lr, "weight_decay": 0.0, "constant_lr": True}]

    @torch.no_grad()
    def feature_weights(self) -> torch.Tensor:
        return torch.sigmoid(self.s.detach()).cpu()

    @torch.no_grad()
    def matched_targets(self, batch: Batch) -> Batch:
        # coordinates of the centred student features in an orthonormal basis of their span have the
        # same kernel; dividing by sigmoid(s) undoes the scaling (exact when rank <= len(s))
        f = self.student.forward_features(batch["image"]).float()
        u, sv, _ = torch.linalg.svd(f - f.mean(0, keepdim=True), full_matrices=False)
        coords = u * sv
        r = min(coords.shape[1], self.s.numel())
        psi = torch.zeros(f.shape[0], self.s.numel(), device=f.device)
        psi[:, :r] = coords[:, :r]
        return {"teacher_features": psi / torch.sigmoid(self.s.detach().float())}


class WeightedKD(Task):
    """sum_t w_t * T^2 KL(teacher_t || head_t(student features)); teacher_logits holds the teachers' logits
    side by side ([B, sum of output sizes], in the order of `outputs`)."""
    reg_name = "kd_loss"

    def __init__(self, student: nn.Module, outputs: list[int], weights: list[float], temperature: float = 1.0):
        super().__init__(student)
        if len(outputs) != len(weights) or not outputs:
            raise ValueError(f"need one weight per teacher, got outputs {outputs} and weights {weights}")
        self.outputs = [int(c) for c in outputs]
        self.weights = [float(w) for w in weights]
        self.heads = nn.ModuleList(nn.Linear(student.num_features, c) for c in self.outputs)
        self.temperature = temperature

    def forward(self, batch: Batch) -> Losses:
        if "label" in batch:
            logits = self.student(batch["image"])
            loss = self._ce(logits, batch)
            return {"loss": loss, "task_loss": loss.detach(), "accuracy": top1(logits, batch["label"])}
        feats = self.student.forward_features(batch["image"])
        targets = batch["teacher_logits"].to(feats.device)
        if targets.shape[1] != sum(self.outputs):
            raise ValueError(f"teacher_logits has {targets.shape[1]} columns; the teachers give {self.outputs}")
        parts = [kd_loss(head(feats), t, self.temperature) for head, t in zip(self.heads, targets.split(self.outputs, 1))]
        kd = sum(w * p for w, p in zip(self.weights, parts))
        out = {"loss": kd, "task_loss": torch.zeros((), device=kd.device), "kd_loss": kd.detach()}
        if len(parts) > 1:
            out.update({f"kd_loss_{i}": p.detach() for i, p in enumerate(parts)})
        return out

    @torch.no_grad()
    def matched_targets(self, batch: Batch) -> Batch:
        feats = self.student.forward_features(batch["image"])
        return {"teacher_logits": torch.cat([h(feats) for h in self.heads], 1).float()}


@dataclass(frozen=True)
class TeacherMix:
    """The teachers a multi-teacher method distils from: output size and weight of each, in cache order."""
    names: list[str]
    outputs: list[int]
    weights: list[float]


def _weighted_kd(st: nn.Module, cfg: Any, dim: int, mix: TeacherMix | None) -> Task:
    if mix is None:   # one teacher in the target label space
        mix = TeacherMix(["teacher"], [st.head.out_features], [1.0])
    return WeightedKD(st, mix.outputs, mix.weights, cfg.temperature)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[..., Task]       # (student, cfg, feature_dim, teacher mix or None) -> Task
    transfer_needs: str | None       # what the transfer phase reads from the cache: logits | features | None
    labelled_needs: str | None       # what the finetune phase reads from the cache


METHODS: Registry[Method] = Registry("distillation method")
METHODS.register("labels_only", Method("labels_only", lambda st, cfg, dim, mix: LabelsOnly(st), None, None))
METHODS.register("kd", Method("kd", lambda st, cfg, dim, mix: KD(st, cfg.temperature), "logits", None))
METHODS.register("feature_kd", Method(
    "feature_kd", lambda st, cfg, dim, mix: FeatureKD(st, dim, cfg.feature_loss, cfg.contrastive_temperature),
    "features", None))
METHODS.register("aft", Method("aft", lambda st, cfg, dim, mix: AFT(st, dim, cfg.beta, cfg.aft_lr),
                               "features", "features"))
METHODS.register("kd_nearest", Method("kd_nearest", _weighted_kd, "logits", None))
METHODS.register("kd_weighted", Method("kd_weighted", _weighted_kd, "logits", None))
MULTI_TEACHER = ("kd_nearest", "kd_weighted")


def build_task(method: str, student: nn.Module, cfg: Any, feature_dim: int = 0, seed: int = 0,
               mix: TeacherMix | None = None) -> Task:
    """Extra parameters (projections, auxiliary heads) are initialised from `seed`, not from the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return METHODS.get(method).build(student, cfg, feature_dim, mix)


def phases(method: str, cfg: Any, has_transfer: bool) -> list[str]:
    """The training phases of a method, in order: "transfer" (transfer set) and/or "finetune" (labels)."""
    m = METHODS.get(method)
    if m.transfer_needs is None:
        return ["finetune"]
    if method == "aft" and not (cfg.aft_on_transfer and has_transfer):
        return ["finetune"]
    if not has_transfer:
        raise InputError(f"method {method!r} needs transfer shards (transfer-*.tar) in {cfg.transfer}")
    return ["transfer", "finetune"]
