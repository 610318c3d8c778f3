"""Each model normalises (and resizes) its own [0, 1] input: teachers with the encoder's mean/std,
students with timm's; students and teachers resolve by name with helpful errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.adapter import InputAdapter
from distill.students import STUDENTS, build_student, student_resolution
from distill.teachers import Teacher, build_teacher, fit_linear_head, linear_probe


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # deterministic float math across machines


class Probe(nn.Module):
    """Records its input; returns fixed-size features."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.seen: torch.Tensor | None = None
        self.dim = dim
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x.detach().clone()
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, : self.dim] + self.w


def test_adapter_normalises_with_its_own_mean_std():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    probe = Probe()
    model = nn.Sequential(InputAdapter(mean, std), probe)
    x = torch.rand(2, 3, 8, 8)
    model(x)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(probe.seen, expected, atol=1e-6)


def test_adapter_resizes_to_its_image_size():
    probe = Probe()
    model = nn.Sequential(InputAdapter((0.5,) * 3, (0.5,) * 3, image_size=20), probe)
    x = torch.full((1, 3, 12, 12), 0.75)
    model(x)
    assert probe.seen.shape == (1, 3, 20, 20)
    assert torch.allclose(probe.seen, torch.full_like(probe.seen, 0.5), atol=1e-5)   # (0.75 - 0.5) / 0.5
    with pytest.raises(ValueError, match="3 values"):
        InputAdapter((0.5, 0.5), (0.5, 0.5))


def test_teacher_and_student_see_their_own_normalisation_of_the_same_batch():
    spec = SimpleNamespace(name="fake", mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.4), image_size=24, embed_dim=4)
    probe = Probe()
    teacher = Teacher(probe, spec, num_classes=3)
    student = build_student("test-tiny-student", 3, resolution=16)
    seen = {}
    student.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    x = torch.full((2, 3, 16, 16), 0.6)
    teacher(x)
    student(x)
    t_expected = (0.6 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert probe.seen.shape == (2, 3, 24, 24)
    assert torch.allclose(probe.seen[0, :, 0, 0], t_expected, atol=1e-5)
    s_mean = torch.tensor(student.backbone.pretrained_cfg["mean"])
    s_std = torch.tensor(student.backbone.pretrained_cfg["std"])
    assert seen["x"].shape == (2, 3, 16, 16)
    assert torch.allclose(seen["x"][0, :, 0, 0], (0.6 - s_mean) / s_std, atol=1e-5)
    assert not torch.allclose(t_expected, (0.6 - s_mean) / s_std)


def test_registry_teacher_normalises_with_its_spec():
    teacher = build_teacher("test-tiny-timm", 3)
    spec = teacher.spec
    assert teacher.adapter.image_size == spec.image_size
    assert torch.allclose(teacher.adapter.mean.flatten(), torch.tensor(spec.mean))
    assert torch.allclose(teacher.adapter.std.flatten(), torch.tensor(spec.std))
    assert teacher(torch.rand(2, 3, 16, 16)).shape == (2, 3)


def test_student_resolution_and_names():
    assert "test-tiny-student" in STUDENTS
    assert student_resolution("test-tiny-student") == 32
    assert student_resolution("fastvit_s12") == 256
    assert student_resolution("resnet18", 64) == 64
    with pytest.raises(ValueError, match="fastvit_s12"):
        build_student("fastvit_s13", 3)
    with pytest.raises(FileNotFoundError):
        build_student("test-tiny-student", 3, weights="/nonexistent/weights.pth")


def test_student_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_student("test-tiny-student", 3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_student("test-tiny-student", 3, seed=7)
    c = build_student("test-tiny-student", 3, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_student_loads_local_weights(tmp_path):
    import timm

    torch.manual_seed(5)
    src = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    st = build_student("test-tiny-student", 3, weights=str(path), seed=0)
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in st.backbone.state_dict().items())


def test_linear_head_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(30) % 3
    x = centers[y] + 0.1 * torch.randn(30, 5, generator=g)
    w, b = fit_linear_head(x, y, 3, steps=50)
    assert (x @ w.T + b).argmax(1).eq(y).all()
    w2, b2 = fit_linear_head(x, y, 3, steps=50)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_linear_probe_trains_only_the_head():
    teacher = build_teacher("test-tiny-timm", 2)
    enc_before = {k: v.clone() for k, v in teacher.encoder.state_dict().items()}
    images = torch.cat([torch.full((4, 3, 16, 16), 0.1), torch.full((4, 3, 16, 16), 0.9)])
    labels = torch.tensor([0] * 4 + [1] * 4)
    info = linear_probe(teacher, images, labels, steps=50)
    assert info["train_accuracy"] == 1.0
    assert all(torch.equal(v, enc_before[k]) for k, v in teacher.encoder.state_dict().items())
    assert teacher.head.weight.abs().sum() > 0
