"""The encoder forward: batches of pixels or whole images -> L2-normalised features, one matrix per encoder.

    encode(models, crops_uint8, device)         float16 [B, dim] per encoder (bf16 autocast on CUDA)
    encode_async(models, crops_uint8, device)   the same, returning at once on CUDA (then `resolve`)
    embed_images(models, pil_images)            whole images with each encoder's own preprocessing

The embedding stage (`index.embed`) runs the first two on crops; queries, references and gallery
originals (`curation.features`, `curation.calibrate`) go through `embed_images`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from index.encoders import Encoder, EncoderSpec, image_transform


def default_batch_size(device: str) -> int:
    """Crops per forward: 64 on CPU; 512 on CUDA, enough to keep a ViT-L/14 busy in bf16."""
    return 512 if device.startswith("cuda") else 64


def prepare(pixels: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """uint8 [B,H,W,3] crops -> the encoder's normalised input [B,3,S,S] (on the crops' device)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != spec.image_size or x.shape[-2] != spec.image_size:
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear",
                          antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _normalised(models: list[Encoder], pixels: np.ndarray | torch.Tensor, device: str) -> list[torch.Tensor]:
    t = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
    t = t.to(device, non_blocking=True)
    cuda = device.startswith("cuda")
    out = []
    for m in models:
        x = prepare(t, m.spec)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            f = m(x)
        out.append(F.normalize(f.float(), dim=-1))
    return out


@torch.no_grad()
def encode(models: list[Encoder], pixels: np.ndarray | torch.Tensor, device: str) -> list[np.ndarray]:
    """L2-normalised float16 features of a batch of uint8 [B,H,W,3] crops, one matrix per encoder.

    On CUDA the forward runs under bf16 autocast on channels-last input; on CPU in float32 as is."""
    return [f.cpu().numpy().astype(np.float16) for f in _normalised(models, pixels, device)]


class PendingFeatures:
    """`encode`'s result on CUDA while it is still being computed: the copy to (pinned) host memory
    is queued behind the forward, so the next batch is prepared while the GPU works."""

    def __init__(self, feats: list[torch.Tensor]):
        self.host = [torch.empty(f.shape, dtype=f.dtype, pin_memory=True) for f in feats]
        for h, f in zip(self.host, feats):
            h.copy_(f, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def result(self) -> list[np.ndarray]:
        self.event.synchronize()
        return [h.numpy().astype(np.float16) for h in self.host]


@torch.no_grad()
def encode_async(models: list[Encoder], pixels: np.ndarray | torch.Tensor,
                 device: str) -> list[np.ndarray] | PendingFeatures:
    """`encode`, returning at once on CUDA (call `resolve` on the result); as `encode` elsewhere."""
    if not device.startswith("cuda"):
        return encode(models, pixels, device)
    return PendingFeatures(_normalised(models, pixels, device))


def resolve(feats: list[np.ndarray] | PendingFeatures) -> list[np.ndarray]:
    return feats.result() if isinstance(feats, PendingFeatures) else feats


@torch.no_grad()
def embed_images(models: list[Encoder], images: list, batch_size: int = 64) -> list[np.ndarray]:
    """Whole images (resize + centre crop, each encoder's own preprocessing) -> one L2-normalised
    float32 matrix per encoder. This is how queries, references and original images are embedded."""
    out = []
    for m in models:
        tf = image_transform(m.spec)
        device = next(m.parameters()).device
        parts = [np.zeros((0, m.spec.embed_dim), np.float32)]
        for a in range(0, len(images), batch_size):
            x = torch.stack([tf(im) for im in images[a:a + batch_size]]).to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                f = m(x)
            parts.append(F.normalize(f.float(), dim=-1).cpu().numpy())
        out.append(np.concatenate(parts))
    return out
