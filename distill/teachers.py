"""Teachers: a VFM encoder from the encoder registry + a linear head for the target classes.

Adaptation on the labelled query set (Vemulapalli et al. 2024, sec. 3.1):
- `linear_probe`: the frozen encoder's features of the labelled images are computed once; a
  logistic-regression head (L2 penalty) is fit on them with full-batch LBFGS (deterministic).
- `finetune`: the whole model is trained with cross-entropy (AdamW + cosine, its own lr), using the
  same trainer as the student, so it checkpoints and resumes the same way.
The teacher normalises its own input (InputAdapter with the encoder's mean/std and image size).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from distill.adapter import InputAdapter
from distill.methods import decay_groups
from index.encoders import build_encoder, build_encoder_with_head, resolve_encoder


class Teacher(nn.Module):
    """forward(x in [0, 1]) -> logits; features(x) -> encoder features (pre-head)."""

    def __init__(self, encoder: nn.Module, spec: Any, num_classes: int):
        super().__init__()
        self.spec = spec
        self.adapter = InputAdapter(spec.mean, spec.std, spec.image_size)
        self.encoder = encoder
        self.head = nn.Linear(int(spec.embed_dim), num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.adapter(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f.float()), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x)[0]


def resolve_teacher_spec(name: str, weights: str | None = None, image_size: int | None = None) -> Any:
    return resolve_encoder(name, weights, image_size)


def build_teacher(name: str, num_classes: int, *, weights: str | None = None, image_size: int | None = None,
                  device: str | torch.device = "cpu") -> Teacher:
    spec = resolve_teacher_spec(name, weights, image_size)
    return Teacher(build_encoder(spec, device=device), spec, num_classes).to(device)


def build_source_teacher(name: str, *, weights: str | None = None, image_size: int | None = None,
                         device: str | torch.device = "cpu") -> Teacher:
    """A teacher whose head is the encoder's own pretrained classifier (its source label space), with
    the weights read once for both (index.encoders.build_encoder_with_head)."""
    spec = resolve_teacher_spec(name, weights, image_size)
    encoder, head = build_encoder_with_head(spec, device=device)
    teacher = Teacher(encoder, spec, head.out_features)
    teacher.head.load_state_dict(head.state_dict())
    return teacher.to(device)


def build_feature_model(name: str, *, weights: str | None = None, image_size: int | None = None,
                        device: str | torch.device = "cpu") -> nn.Module:
    """A pretrained (un-adapted) encoder behind its own InputAdapter: x in [0, 1] -> features."""
    spec = resolve_teacher_spec(name, weights, image_size)
    model = nn.Sequential(InputAdapter(spec.mean, spec.std, spec.image_size), build_encoder(spec, device=device))
    model.spec = spec  # type: ignore[attr-defined]
    return model.to(device).eval()


@torch.no_grad()
def extract(fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor],
            device: str | torch.device) -> torch.Tensor:
    return torch.cat([fn(x.to(device)).float().cpu() for x in batches])


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, steps: int = 100,
                    weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, CE + weight_decay/2 * ||W||^2, full-batch LBFGS from zero.

    Returns (weight [C, D], bias [C]). Pure: the same inputs give the same head.
    """
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)} do not match")
    x = features.double()
    y = labels.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float()


def linear_probe(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 100,
                 weight_decay: float = 1e-4, batch_size: int = 64) -> dict[str, float]:
    """Fit teacher.head on the frozen encoder's features of `images` ([N, 3, S, S] in [0, 1])."""
    device = next(teacher.parameters()).device
    teacher.eval()
    feats = extract(teacher.features, images.split(batch_size), device)
    w, b = fit_linear_head(feats, labels, teacher.head.out_features, steps=steps, weight_decay=weight_decay)
    with torch.no_grad():
        teacher.head.weight.copy_(w)
        teacher.head.bias.copy_(b)
        train_acc = (feats @ w.T + b).argmax(1).eq(labels).float().mean().item()
    return {"train_accuracy": train_acc, "num_labelled": int(labels.shape[0])}


def weights_hash(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes and bytes), for cache fingerprints."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class TeacherCETask(nn.Module):
    """Finetuning task for the teacher: cross-entropy on labelled batches (named losses, like a method)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss = F.cross_entropy(self.teacher(batch["image"]).float(), batch["label"])
        return {"loss": loss, "task_loss": loss.detach()}

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return decay_groups(self.teacher, lr, weight_decay)


