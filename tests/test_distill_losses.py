"""Golden and analytic tests of the distillation losses, and tests generated over the METHODS registry."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.losses import (aft_kernel_distance, center_normalize, feature_contrastive_loss, feature_cosine_loss,
                            kd_loss, scale_grad)
from distill.methods import AFT, METHODS, build_task
from distill.students import build_student
from distill.trainer import PhasePlan, make_optimizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # deterministic float math across machines


# ------------------------------------------------------------------ KD

def test_kd_of_identical_logits_is_zero():
    z = torch.randn(5, 7)
    for t in (0.5, 1.0, 4.0):
        assert kd_loss(z, z.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_matches_hand_computed_kl():
    s = torch.tensor([[0.0, math.log(3.0)]])    # p_s = (1/4, 3/4)
    t = torch.tensor([[math.log(3.0), 0.0]])    # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_temperature_squared_scaling():
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    for t in (2.0, 3.0, 8.0):
        # the same softened distributions at temperature t, times t^2
        assert kd_loss(a * t, b * t, t).item() == pytest.approx(t * t * kd_loss(a, b, 1.0).item(), rel=1e-4)


def test_kd_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="shapes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------ AFT

def test_aft_zero_when_student_equals_scaled_pretrained():
    psi = torch.randn(8, 6)
    s = torch.randn(6)
    phi = psi * torch.sigmoid(s)
    assert aft_kernel_distance(phi, psi, s).item() == pytest.approx(0.0, abs=1e-6)
    # any positive scale of the student features too (rows are normalised)
    assert aft_kernel_distance(3.0 * phi, psi, s).item() == pytest.approx(0.0, abs=1e-6)
    # and any orthogonal transform of them (the kernel is invariant), even into another dimension
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    phi10 = torch.cat([phi, torch.zeros(8, 4)], 1) @ q
    assert aft_kernel_distance(phi10, psi, s).item() == pytest.approx(0.0, abs=1e-5)


def test_aft_positive_otherwise_and_is_rms_of_kernel_difference():
    psi, phi, s = torch.randn(8, 6), torch.randn(8, 5), torch.zeros(6)
    d = aft_kernel_distance(phi, psi, s)
    assert d.item() > 0.05
    a, b = center_normalize(phi), center_normalize(psi * 0.5)
    rms = ((a @ a.T - b @ b.T) ** 2).mean().sqrt()
    assert d.item() == pytest.approx(rms.item(), rel=1e-5)


def test_aft_centres_on_the_batch_mean():
    psi, phi, s = torch.randn(8, 6), torch.randn(8, 6), torch.zeros(6)
    shifted = aft_kernel_distance(phi + 5.0, psi - 2.0, s)
    assert shifted.item() == pytest.approx(aft_kernel_distance(phi, psi, s).item(), rel=1e-5)


def test_aft_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="batch sizes"):
        aft_kernel_distance(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="s must have shape"):
        aft_kernel_distance(torch.randn(4, 3), torch.randn(4, 3), torch.zeros(2))


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, 0.1)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((4,), 0.1))


class _Linear(nn.Module):
    """A minimal 'student': features = MLP(x), logits = head(features)."""

    def __init__(self, d: int, h: int, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h))
        self.head = nn.Linear(h, c)
        self.num_features = h

    def forward_features(self, x):
        return self.body(x)

    def forward_both(self, x):
        f = self.body(x)
        return self.head(f), f

    def forward(self, x):
        return self.head(self.body(x))


def test_aft_task_gradients_follow_algorithm_1():
    """theta gets grad(CE + beta * delta); s gets grad(delta) (not beta times it); s starts at 0."""
    torch.manual_seed(0)
    task = AFT(_Linear(5, 8, 3), 6, beta=10.0)
    assert torch.equal(task.s.detach(), torch.zeros(6))
    x, y, psi = torch.randn(7, 5), torch.randint(0, 3, (7,)), torch.randn(7, 6)
    out = task({"image": x, "label": y, "teacher_features": psi})
    out["loss"].backward()
    s = task.s.detach().clone().requires_grad_(True)
    delta = aft_kernel_distance(task.student.forward_features(x).detach(), psi, s)
    (expected,) = torch.autograd.grad(delta, s)
    assert torch.allclose(task.s.grad, expected, atol=1e-6)
    assert out["loss"].item() == pytest.approx(out["task_loss"].item() + 10.0 * out["aft_loss"].item(), rel=1e-5)
    groups = task.param_groups(1e-3, 0.05)
    s_group = [g for g in groups if any(p is task.s for p in g["params"])]
    assert len(s_group) == 1 and s_group[0]["lr"] == 1e-2 and s_group[0]["weight_decay"] == 0.0
    assert len(s_group[0]["params"]) == 1


def test_aft_mu_drops_on_noise_columns():
    """Pretrained features = informative columns + pure noise columns: sigmoid(s) of the noise goes to ~0."""
    g = torch.Generator().manual_seed(0)
    n, d = 512, 8
    x = torch.randn(n, d, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:].sum(1) > 0).long()
    informative = x @ torch.randn(d, d, generator=g)
    noise = torch.randn(n, 8, generator=g) * informative.std()
    psi = torch.cat([informative, noise], 1)
    torch.manual_seed(0)
    task = AFT(_Linear(d, 16, 4), 16, beta=10.0, s_lr=1e-2)
    opt, sched = make_optimizer(task, PhasePlan("aft", 150, 150, 1e-2, 0.0, 0))
    for _ in range(150):
        idx = torch.randint(0, n, (64,), generator=g)
        out = task({"image": x[idx], "label": y[idx], "teacher_features": psi[idx]})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
    mu = torch.sigmoid(task.s.detach())
    assert mu[8:].max().item() < 0.35          # noise: from 0.5 down
    assert mu[:8].min().item() > 0.6           # informative: up
    assert mu[:8].mean() - mu[8:].mean() > 0.4


# ------------------------------------------------------------------ feature losses

def test_feature_losses():
    a = torch.randn(6, 4)
    assert feature_cosine_loss(a, 2.0 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    aligned = feature_contrastive_loss(a, a, temperature=0.01)
    shuffled = feature_contrastive_loss(a, a.roll(1, 0), temperature=0.01)
    assert aligned.item() < 0.1 < shuffled.item()


# ------------------------------------------------------------------ generated over METHODS

class _Cfg:
    temperature = 2.0
    beta = 10.0
    aft_lr = 1e-2
    feature_loss = "cosine"
    contrastive_temperature = 0.07


def _task(name: str):
    student = build_student("test-tiny-student", 3, resolution=16, seed=0)
    return build_task(name, student, _Cfg(), feature_dim=12, seed=0)


def _batch(labelled: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    b = {"image": torch.rand(6, 3, 16, 16, generator=g), "key": [f"k{i}" for i in range(6)]}
    if labelled:
        b["label"] = torch.tensor([0, 1, 2, 0, 1, 2])
    else:
        b["teacher_logits"] = torch.randn(6, 3, generator=g)
        b["teacher_features"] = torch.randn(6, 12, generator=g)
    return b


@pytest.mark.parametrize("name", METHODS.names())
def test_method_returns_named_losses_and_trains_the_student(name):
    task = _task(name)
    out = task(_batch(labelled=True))
    assert {"loss", "task_loss"} <= set(out)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in task.student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    method = METHODS.get(name)
    if method.transfer_needs is None:
        with pytest.raises(ValueError, match="labelled"):
            task(_batch(labelled=False))
    else:
        out = task(_batch(labelled=False))
        assert task.reg_name in out and out["task_loss"].item() == 0.0
        assert out[task.reg_name].item() > 0


@pytest.mark.parametrize("name", METHODS.names())
def test_method_regulariser_is_zero_at_its_fixed_point(name):
    task = _task(name)
    if task.reg_name is None:
        assert task.matched_targets(_batch(True)) == {}
        return
    batch = _batch(labelled=False)
    batch.update(task.matched_targets(batch))
    out = task(batch)
    assert out[task.reg_name].item() == pytest.approx(0.0, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", METHODS.names())
def test_only_aft_has_learned_feature_weights(name):
    weights = _task(name).feature_weights()
    if name == "aft":
        torch.testing.assert_close(weights, torch.full((12,), 0.5))   # sigmoid(s), s = 0 at the start
    else:
        assert weights is None


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="aft, feature_kd, kd, kd_nearest, kd_weighted, labels_only"):
        METHODS.get("kdd")
