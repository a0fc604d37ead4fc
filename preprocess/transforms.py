"""Resize policies on RGB uint8 arrays (OpenCV) and batch normalization on the device (torch).

Geometry follows torchvision: ``resize_shorter+center_crop`` is ``Resize(s)`` then ``CenterCrop(n)``
with the same rounding. Interpolation ``linear`` is bilinear when enlarging and area averaging when
shrinking: torchvision resizes PIL images with antialiasing, which plain INTER_LINEAR does not do
(it aliases badly below half size), while INTER_AREA diverges when enlarging.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from metadata.config import INTERPOLATIONS, RESIZE_POLICIES

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cv2() -> Any:
    from preprocess.decode import cv2_module
    from metadata.cv2_env import DEFAULT_MAX_PIXELS

    return cv2_module(DEFAULT_MAX_PIXELS)


def cv2_interpolation(interpolation: str, shrinking: bool) -> int:
    """The OpenCV flag for a config interpolation name, given the direction of the resize."""
    cv2 = _cv2()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"preprocess.interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if interpolation == "nearest":
        return cv2.INTER_NEAREST_EXACT
    if interpolation == "area" or shrinking:
        return cv2.INTER_AREA
    return {"linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}[interpolation]


def _resize(rgb: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (w, h) == (width, height):
        return rgb
    shrinking = width <= w and height <= h
    cv2 = _cv2()
    if interpolation == "linear" and not shrinking:
        # PIL (torchvision's reference) resizes one axis at a time with rounding to uint8 in between;
        # two separable INTER_LINEAR_EXACT passes reproduce its pixels (one-pass bilinear does not).
        wide = cv2.resize(rgb, (width, h), interpolation=cv2.INTER_LINEAR_EXACT) if width != w else rgb
        return cv2.resize(wide, (width, height), interpolation=cv2.INTER_LINEAR_EXACT) if height != h else wide
    return cv2.resize(rgb, (width, height), interpolation=cv2_interpolation(interpolation, shrinking))


def shorter_side_dims(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(w, h) with the shorter side at ``shorter``, the longer scaled as torchvision's Resize(int) does."""
    if width <= height:
        return shorter, max(1, int(shorter * height / width))
    return max(1, int(shorter * width / height)), shorter


def needed_shorter_side(size: int, policy: str, resize_shorter: int | None = None) -> int:
    """The smallest shorter side a source may be decoded at without losing detail for this policy."""
    if policy == "resize_shorter+center_crop":
        return max(resize_shorter or size, size)
    return size


def resize_image(rgb: np.ndarray, size: int, policy: str = "resize_shorter+center_crop",
                 interpolation: str = "linear", resize_shorter: int | None = None,
                 background: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Resize an HxWx3 uint8 array to ``size`` x ``size`` x 3 under ``policy``.

    - ``resize_shorter+center_crop``: shorter side to ``resize_shorter`` (default ``size``), then a
      centre crop of ``size`` (torchvision ``Resize(resize_shorter)`` + ``CenterCrop(size)``).
    - ``resize``: both sides to ``size``; the aspect ratio is not kept.
    - ``letterbox``: longer side to ``size``, the rest padded with ``background``, image centred.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"preprocess.resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if size < 1:
        raise ValueError("preprocess.size must be >= 1")
    h, w = rgb.shape[:2]
    if policy == "resize":
        out = _resize(rgb, size, size, interpolation)
    elif policy == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        inner = _resize(rgb, nw, nh, interpolation)
        out = np.empty((size, size, 3), np.uint8)
        out[...] = np.asarray(background, np.uint8)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top : top + nh, left : left + nw] = inner
    else:
        shorter = resize_shorter or size
        if shorter < size:
            raise ValueError(f"preprocess.resize_shorter ({shorter}) must be >= preprocess.size ({size})")
        nw, nh = shorter_side_dims(w, h, shorter)
        resized = _resize(rgb, nw, nh, interpolation)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out = resized[top : top + size, left : left + size]
    return np.ascontiguousarray(out)


def normalize_batch(batch: "torch.Tensor", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    dtype: "torch.dtype | None" = None, device: "torch.device | str | None" = None) -> "torch.Tensor":
    """uint8 NCHW -> normalized float on ``device`` in ``dtype``: ``(x/255 - mean) / std``.

    The uint8 batch travels to the device first (4x fewer bytes than float32); the arithmetic runs
    there in float32 and is cast to the model's dtype last, so bf16/fp16 lose nothing extra.
    """
    import torch

    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"normalize_batch wants a uint8 [N,3,H,W] tensor, got {batch.dtype} {tuple(batch.shape)}")
    device = torch.device(device) if device is not None else batch.device
    x = batch.to(device, non_blocking=True)
    scale = torch.tensor([255.0 * s for s in std], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    shift = torch.tensor([255.0 * m for m in mean], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    out = (x.to(torch.float32) - shift) / scale
    return out.to(dtype) if dtype is not None and dtype != torch.float32 else out

