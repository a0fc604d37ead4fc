"""Resize policies on RGB uint8 arrays and batch normalization on the device (torch).

Geometry follows torchvision: ``resize_shorter+center_crop`` is ``Resize(s)`` then ``CenterCrop(n)``
with the same rounding. Interpolation ``linear`` is torchvision's own: PIL's antialiased bilinear
(a triangle filter widened by the shrink factor, fixed-point, rounded to uint8 between the two
passes), which torch's uint8 ``interpolate(..., antialias=True)`` reproduces pixel for pixel. That
kernel runs on a whole stack of same-sized images in one call (``resize_images``), several times
faster per image than a call per image. The other interpolations use OpenCV one image at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.metadata.config import INTERPOLATIONS, RESIZE_POLICIES

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cv2() -> Any:
    from imgfeat.metadata.contracts.cv2_env import decoder_cv2

    return decoder_cv2()


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


def _resize_stack(stack: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    """[N,H,W,3] uint8 -> [N,height,width,3] uint8 (possibly a view of ``stack`` or a strided array)."""
    n, h, w = stack.shape[:3]
    if (w, h) == (width, height):
        return stack
    if interpolation == "linear":
        import torch

        x = torch.from_numpy(stack).permute(0, 3, 1, 2)  # NHWC memory: the channels-last uint8 kernel
        y = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                            antialias=True)
        return y.permute(0, 2, 3, 1).numpy()
    cv2 = _cv2()
    flag = cv2_interpolation(interpolation, width <= w and height <= h)
    out = np.empty((n, height, width, 3), np.uint8)
    for k in range(n):
        cv2.resize(stack[k], (width, height), dst=out[k], interpolation=flag)
    return out


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


def resize_images(stack: np.ndarray, size: int, policy: str = "resize_shorter+center_crop",
                  interpolation: str = "linear", resize_shorter: int | None = None,
                  background: Sequence[int] = (0, 0, 0), out: np.ndarray | None = None) -> np.ndarray:
    """Resize N same-sized images, ``[N,H,W,3]`` uint8, to ``[N,size,size,3]`` under ``policy``.

    - ``resize_shorter+center_crop``: shorter side to ``resize_shorter`` (default ``size``), then a
      centre crop of ``size`` (torchvision ``Resize(resize_shorter)`` + ``CenterCrop(size)``).
    - ``resize``: both sides to ``size``; the aspect ratio is not kept.
    - ``letterbox``: longer side to ``size``, the rest padded with ``background``, image centred.

    Each image comes out exactly as ``resize_image`` makes it alone. ``out`` (C-contiguous, the
    result's shape) receives the result when given.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"preprocess.resize_policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"preprocess.interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if size < 1:
        raise ValueError("preprocess.size must be >= 1")
    if stack.ndim != 4 or stack.shape[3] != 3 or stack.dtype != np.uint8:
        raise ValueError(f"resize_images wants a uint8 [N,H,W,3] array, got {stack.dtype} {stack.shape}")
    n, h, w = stack.shape[:3]
    if out is None:
        out = np.empty((n, size, size, 3), np.uint8)
    if policy == "resize":
        out[...] = _resize_stack(stack, size, size, interpolation)
    elif policy == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        top, left = (size - nh) // 2, (size - nw) // 2
        out[...] = np.asarray(background, np.uint8)
        out[:, top : top + nh, left : left + nw] = _resize_stack(stack, nw, nh, interpolation)
    else:
        shorter = resize_shorter or size
        if shorter < size:
            raise ValueError(f"preprocess.resize_shorter ({shorter}) must be >= preprocess.size ({size})")
        nw, nh = shorter_side_dims(w, h, shorter)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out[...] = _resize_stack(stack, nw, nh, interpolation)[:, top : top + size, left : left + size]
    return out


def resize_image(rgb: np.ndarray, size: int, policy: str = "resize_shorter+center_crop",
                 interpolation: str = "linear", resize_shorter: int | None = None,
                 background: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Resize one HxWx3 uint8 array to a C-contiguous ``size`` x ``size`` x 3 (policies: ``resize_images``)."""
    return resize_images(rgb[None], size, policy, interpolation, resize_shorter, background)[0]


class BatchNormalizer:
    """uint8 [N,3,H,W] -> ``(x - 255*mean) / (255*std)`` in float32 on ``device``, into one reused buffer.

    The uint8 batch travels to the device first (4x fewer bytes than float32) and the arithmetic runs
    there in place: no new 4-bytes-per-pixel tensors per batch, which on a CPU costs about as much as
    the arithmetic itself. ``channels_last`` sets the buffer's memory format (the model's)."""

    def __init__(self, device: "torch.device | str", channels_last: bool = False, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        import torch

        self.device, self.channels_last = torch.device(device), channels_last
        self.shift = torch.tensor([255.0 * m for m in mean], device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = torch.tensor([255.0 * s for s in std], device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.buf: "torch.Tensor | None" = None

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor":
        import torch

        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 [N,3,H,W] batch, got {images.dtype} {tuple(images.shape)}")
        if self.buf is None or self.buf.shape != images.shape:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            self.buf = torch.empty(images.shape, dtype=torch.float32, device=self.device, memory_format=fmt)
        src = images if images.device == self.device else images.to(self.device, non_blocking=True)  # uint8 travels
        self.buf.copy_(src)
        return self.buf.sub_(self.shift).div_(self.scale)


def normalize_batch(batch: "torch.Tensor", mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    dtype: "torch.dtype | None" = None, device: "torch.device | str | None" = None) -> "torch.Tensor":
    """One batch through a ``BatchNormalizer`` on ``device`` (default: the batch's), cast to ``dtype`` last,
    so bf16/fp16 lose nothing extra."""
    import torch

    out = BatchNormalizer(device if device is not None else batch.device, False, mean, std)(batch)
    return out.to(dtype) if dtype is not None and dtype != torch.float32 else out
