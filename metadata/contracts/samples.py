"""Decoded samples to 8 bits, the one rule shared by the featurizer's decoder and the manifest's signals."""
from __future__ import annotations

import numpy as np


def to_uint8(img: np.ndarray) -> np.ndarray:
    """``img`` (any sample type ``cv2.imdecode`` returns) as uint8; ``ValueError`` for an unknown type.

    16-bit: ``(v + 128) // 257``, the nearest 8-bit value (65535 / 257 = 255), as libpng's strip-16 with
    rounding does; float: 0..1 scaled; other integers: their full range scaled to 0..255."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        return np.clip(np.nan_to_num(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        scaled = (img.astype(np.float64) - info.min) * (255.0 / (info.max - info.min))
        return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    raise ValueError(f"unsupported sample type {img.dtype}")
