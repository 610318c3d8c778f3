"""Loss functions as pure functions of tensors (no module state), tested analytically.

- `kd_loss`: Hinton et al. KL(teacher || student) at temperature T, scaled by T^2 so gradient
  magnitudes do not shrink with T.
- `aft_kernel_distance`: Qiu et al. 2024, Algorithm 1, steps 3-6: scale the pretrained features by
  diag(sigmoid(s)), centre both feature sets on the batch mean, L2-normalise rows, and return
  ||K_student - K_pretrained||_F / B (the root mean square of the kernel difference). The student
  features enter as they are: there is no learned map on them (the only variational parameter is s).
- `feature_cosine_loss`, `feature_contrastive_loss`: task-agnostic feature distillation
  (Vemulapalli et al. 2024, A.4): cosine similarity, and InfoNCE over the batch (Tian et al.).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(t / T) || softmax(s / T))."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} "
                         f"vs teacher {tuple(teacher_logits.shape)}")
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * (t * t)


def center_normalize(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Subtract the batch mean, then scale every row to unit L2 norm."""
    f = features.float()
    f = f - f.mean(dim=0, keepdim=True)
    return f / f.norm(dim=1, keepdim=True).clamp_min(eps)


def aft_kernel_distance(student_features: torch.Tensor, pretrained_features: torch.Tensor,
                        s: torch.Tensor) -> torch.Tensor:
    """delta(theta, mu) of Algorithm 1 with mu = diag(sigmoid(s)); inputs [B, d_phi], [B, d_psi], [d_psi]."""
    b = student_features.shape[0]
    if pretrained_features.shape[0] != b:
        raise ValueError(f"batch sizes differ: {b} student rows vs {pretrained_features.shape[0]} pretrained rows")
    if s.shape != (pretrained_features.shape[1],):
        raise ValueError(f"s must have shape ({pretrained_features.shape[1]},), got {tuple(s.shape)}")
    phi = center_normalize(student_features)
    psi = center_normalize(pretrained_features.float() * torch.sigmoid(s.float()))
    k_phi = phi @ phi.T
    k_psi = psi @ psi.T
    return torch.linalg.matrix_norm(k_phi - k_psi, ord="fro") / b


def feature_cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(pred_i, target_i)."""
    return (1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


def feature_contrastive_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE: row i of pred must pick row i of target among the batch, and vice versa."""
    p = F.normalize(pred.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    logits = p @ t.T / temperature
    labels = torch.arange(p.shape[0], device=p.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `factor` in the backward pass."""
    return x.detach() + (x - x.detach()) * factor
