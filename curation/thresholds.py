"""The thresholds a curation runs with: given numbers as they are, "auto" ones calibrated.

`Thresholds` is frozen and stored in the manifest under the keys ``dedup, leak, verify,
max_residual, key, verifier, neighbours, key_neighbours, source`` (`Thresholds.to_dict`); the
verification rule (`curation.verify.VerifyRule`) is derived from it, never stored beside it, so
the two cannot disagree.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.calibrate import Calibration, cached_calibration
from curation.pixelkey import Keys
from curation.verify import VerifyRule

log = logging.getLogger(__name__)
PAPER_DEDUP, PAPER_LEAK, DEFAULT_VERIFY = 0.99, 0.95, 0.9   # used when there is nothing to calibrate on


@dataclass(frozen=True)
class Thresholds:
    dedup: float                 # mean cosine above which two originals are duplicate candidates
    leak: float                  # max cosine over encoders above which an image is a leak candidate
    verify: float | None         # verification score limit (None: no verification)
    max_residual: float | None   # verification residual limit in grey levels (None: no limit)
    key: float | None            # pixel key similarity that makes candidates too (None: off)
    verifier: str                # "align" | "none"
    neighbours: int              # nearest references verified per leak candidate
    key_neighbours: int          # nearest references by pixel key joined to each candidate
    source: str                  # "calibrated" | "given" | "mixed"

    @property
    def rule(self) -> VerifyRule | None:
        return None if self.verify is None else VerifyRule.of(self.verify, self.max_residual)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Thresholds":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def limit_text(x: float | None) -> str:
    """A limit as the summary line, the log and the report print it: 4 significant digits, or "off" where
    it is off (None: no verification, no residual limit, no pixel key candidates)."""
    return "off" if x is None else f"{x:.4g}"


def limits_in_force(th: dict[str, Any]) -> dict[str, float | None]:
    """``dedup, leak, verify, max_residual, key`` of a `Thresholds.to_dict()`, None where a limit is off:
    also the pixel key at 1 or more (no similarity exceeds it, the documented way to turn it off)."""
    key = th.get("key")
    return {"dedup": th["dedup"], "leak": th["leak"], "verify": th.get("verify"),
            "max_residual": th.get("max_residual") if th.get("verify") is not None else None,
            "key": None if key is None or key >= 1.0 else key}


def resolve_thresholds(cfg, models, qs, ref_feats: list[np.ndarray], ref_keys: Keys | None,
                       cache_dir) -> tuple[Thresholds, Calibration | None]:
    """The thresholds in force for a `CurateConfig`: "auto" ones from a calibration on the query
    set's references (cached by encoders + sampled reference ids; see curation.calibrate).
    Retrieval by pixel key (``key``) serves verification only: None without it."""
    verifying = cfg.verify != "none"
    auto = [cfg.dedup_threshold == "auto", cfg.leak_threshold == "auto",
            verifying and "auto" in (cfg.verify_threshold, cfg.verify_max_residual, cfg.key_threshold)]
    cal = None
    if any(auto) and qs.references:
        cal, reused = cached_calibration(models, qs.references, ref_feats, cache_dir, size=cfg.calibration_images,
                                         recall=cfg.copy_recall, verify=cfg.verify,
                                         min_neighbours=cfg.leak_neighbours, batch_size=cfg.batch_size,
                                         ref_keys=None if ref_keys is None else ref_keys.keys, progress=True)
        log.info("calibration %s: leak %.4g dedup %.4g verify %s residual limit %s key %s, "
                 "estimated false-positive rate %.3g", "reused" if reused else "computed", cal.leak_threshold,
                 cal.dedup_threshold, limit_text(cal.verify_threshold), limit_text(cal.verify_max_residual),
                 limit_text(cal.pixel_threshold), cal.false_positive_rate)

    def pick(value, calibrated, paper):
        if value != "auto":
            return value
        return calibrated if cal is not None else paper   # no references: nothing to calibrate on

    verify = pick(cfg.verify_threshold, cal and cal.verify_threshold, DEFAULT_VERIFY) if verifying else None
    residual = pick(cfg.verify_max_residual, cal and cal.verify_max_residual, None) if verifying else None
    if verifying:   # stored as the rule stores it (no limit: None)
        residual = VerifyRule.of(verify, residual).to_dict()["max_residual"]
    th = Thresholds(
        dedup=pick(cfg.dedup_threshold, cal and cal.dedup_threshold, PAPER_DEDUP),
        leak=pick(cfg.leak_threshold, cal and cal.leak_threshold, PAPER_LEAK),
        verify=verify, max_residual=residual,
        key=pick(cfg.key_threshold, cal and cal.pixel_threshold, None) if verifying else None,
        verifier=cfg.verify,
        neighbours=max(cfg.leak_neighbours, cal.neighbours if cal and verifying else 0),
        key_neighbours=max(cfg.leak_neighbours, (cal.pixel_neighbours or 0) if cal and verifying else 0),
        source="calibrated" if all(auto[:2]) and cal else "given" if not any(auto) else "mixed")
    return th, cal
