"""EncoderSpec: what a name resolves to (architecture, weights, dims, preprocessing), frozen.

The spec is stored in every index manifest; querying an index with a different spec is an error
(`check_same_encoders`). It carries its own preprocessing, as open_clip's PreprocessCfg does:
image size, mean/std, interpolation and resize mode, so a model is never fed the wrong input.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index.core.errors import ConfigError, MissingInputError, UserError

Tuple3 = tuple[float, float, float]
OPENAI_MEAN: Tuple3 = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD: Tuple3 = (0.26862954, 0.26130258, 0.27577711)
# resize modes as open_clip names them: shorter side to image_size then centre crop; longer side to
# image_size then centre pad; both sides to image_size (aspect ratio not kept)
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "nearest-exact", "box", "hamming", "lanczos")  # torchvision


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    family: str                 # a key of index.encoder_family.FAMILIES
    arch: str
    embed_dim: int
    image_size: int
    mean: Tuple3
    std: Tuple3
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    has_text_tower: bool = False
    pretrained: str | None = None   # tag, 'wheel', 'file' or None (random init)
    weights: str | None = None      # local path actually loaded (not part of identity)
    weights_digest: str | None = None

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"encoder {self.name}: unknown resize_mode {self.resize_mode!r}; "
                             f"valid: {', '.join(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"encoder {self.name}: unknown interpolation {self.interpolation!r}; "
                             f"valid: {', '.join(INTERPOLATIONS)}")

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


def existing_file(path: str | os.PathLike) -> str:
    """The absolute path of a weights file that exists; a clear error naming it otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInputError(f"weights file not found: {p}")
    return str(p.resolve())
