"""open_clip models: `ARCH.TAG` (pretrained, the weights file on disk), `ARCH` + weights=PATH, and tiny
random-init test models from the project's configs (index/model_configs/*.json).

Preprocessing follows the pretrained tag's config (open_clip's PreprocessCfg: mean/std,
interpolation, resize mode 'shortest' | 'longest' | 'squash') and is built by open_clip's own
`image_transform`, so an index, its queries, references and originals see what the model saw in
training. test-tiny-clip-squash is the tiny model with 'squash' preprocessing, so the non-default
resize modes are exercised without pretrained weights.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch

from index.core.atomic import file_digest
from index.core.errors import ConfigError, MissingInputError
from index.encoder_family import FAMILIES, Built, Encoder, EncoderFamily, Transform
from index.encoder_spec import OPENAI_MEAN, OPENAI_STD, EncoderSpec, existing_file, weights_dir

TINY_CLIP_ARCH = "vfm-tiny-ViT"
TINY = {"test-tiny-clip": "shortest", "test-tiny-clip-squash": "squash"}   # name: resize mode
WEIGHT_EXTS = (".safetensors", ".bin", ".pt", ".pth")


def _open_clip():
    """open_clip, with the project's small configs (index/model_configs/*.json) made known to it."""
    import open_clip  # lazy: open_clip

    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).resolve().parent.parent / "model_configs")
    return open_clip


def pretrained_weights(arch: str, tag: str) -> str:
    """Find the weights of an open_clip pretrained tag on disk, or fail fast saying where to put them."""
    open_clip = _open_clip()
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
            from huggingface_hub import hf_hub_download  # lazy: huggingface_hub
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


class OpenClipFamily(EncoderFamily):
    name = "open_clip"
    fixed_names = tuple(TINY)
    pattern_hint = ("open_clip ARCH.TAG names (open_clip.list_pretrained(), e.g. ViT-L-14.datacomp_xl_s13b_b90k); "
                    "an open_clip ARCH with a weights path")

    def claims(self, name: str) -> bool:
        return name.partition(".")[0] in _open_clip().list_models()

    def suggestions(self) -> list[str]:
        return [f"{a}.{t}" for a, t in _open_clip().list_pretrained()]

    def resolve(self, name: str, weights: str | None) -> EncoderSpec:
        if name in TINY:
            if weights is not None:
                return self._spec(TINY_CLIP_ARCH, None, weights)
            return EncoderSpec(name=name, family=self.name, arch=TINY_CLIP_ARCH, embed_dim=32, image_size=64,
                               mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode=TINY[name], has_text_tower=True)
        arch, _, tag = name.partition(".")
        return self._spec(arch, tag or None, weights)

    def _spec(self, arch: str, tag: str | None, weights: str | None) -> EncoderSpec:
        open_clip = _open_clip()
        mcfg = open_clip.get_model_config(arch)
        if mcfg is None:
            raise ConfigError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        if tag is not None and weights is None:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if tag not in tags:
                close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
                raise ConfigError(f"unknown open_clip pretrained tag {tag!r} for {arch}; closest: {close}; "
                                 f"valid: {tags}")
            weights = pretrained_weights(arch, tag)
        if weights is None:
            raise ConfigError(f"open_clip architecture {arch!r} needs a pretrained tag (ARCH.TAG) or a weights path")
        weights = existing_file(weights)
        pcfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        vcfg = mcfg["vision_cfg"]
        size = vcfg["image_size"] if isinstance(vcfg["image_size"], int) else vcfg["image_size"][0]
        return EncoderSpec(name=f"{arch}.{tag}" if tag else arch, family=self.name, arch=arch,
                           embed_dim=int(mcfg["embed_dim"]), image_size=int(size),
                           mean=tuple(pcfg.get("mean", OPENAI_MEAN)), std=tuple(pcfg.get("std", OPENAI_STD)),
                           interpolation=pcfg.get("interpolation", "bicubic"),
                           resize_mode=pcfg.get("resize_mode", "shortest"), has_text_tower=True,
                           pretrained=tag or "file", weights=weights, weights_digest=file_digest(weights))

    def build(self, spec: EncoderSpec, with_head: bool = False) -> Built:
        if with_head:
            raise self.no_head(spec)
        open_clip = _open_clip()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-init test models are the same everywhere
            model = open_clip.create_model(spec.arch, pretrained=spec.weights)
        return Built(Encoder(spec, _ClipImage(model), text_model=model, tokenizer=open_clip.get_tokenizer(spec.arch)))

    def transform(self, spec: EncoderSpec) -> Transform:
        return _open_clip().image_transform(spec.image_size, is_train=False, mean=spec.mean, std=spec.std,
                                            resize_mode=spec.resize_mode, interpolation=spec.interpolation)


class _ClipImage(torch.nn.Module):
    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)


FAMILIES.register(OpenClipFamily.name, OpenClipFamily())
