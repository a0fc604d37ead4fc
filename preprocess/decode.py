"""Bytes to an RGB uint8 array with OpenCV, behind the guards that make untrusted input safe.

Order of work: byte cap, then the header (magic-byte allowlist, dimensions against the pixel cap,
JPEG scan count against the scan cap, whole-file check), then ``cv2.imdecode``. The header check runs first because OpenCV may return a
full-size grey image for a JPEG cut in half, and allocates before it refuses an oversized image.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from imgfeat.metadata.config import REDUCED_DECODE_MODES, DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.cv2_env import cv2_error_verdict, decoder_cv2, decoder_damage, quiet_decoder
from imgfeat.metadata.contracts.samples import to_uint8
from imgfeat.metadata.contracts.sniff import HeaderInfo, parse_header

DECODE_REASONS = ("unreadable", "not_image", "unsupported_format", "truncated", "undecodable", "too_large", "zero_bytes")
_REDUCED_SCALES = (8, 4, 2)
SAFE_MARGIN = 4
"""``reduced_decode = "safe"`` decodes at a reduced scale only while the result's shorter side stays at
least this many times the resize target (chosen from measurements: bench/RESULTS.md, "Decode modes on
real-size photos")."""


def split_reason(reason: str) -> tuple[str, str]:
    """A reject's ``"code: detail"`` text (``str(DecodeError)``, what crosses the loader) as ``(code, detail)``:
    how featurize and prep both record a reject."""
    code, _, detail = reason.partition(": ")
    return code or "undecodable", detail


class DecodeError(Exception):
    """A file that cannot become an image; ``reason`` is a manifest status code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:  # survive pickling across DataLoader workers
        return (DecodeError, (self.reason, self.detail))


def check_header(data: bytes, limits: DecodeConfig) -> HeaderInfo:
    """The guards before any decode; raises DecodeError, returns the header when the bytes may be decoded."""
    if len(data) > limits.max_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes is over the byte cap {limits.max_bytes}")
    info = parse_header(data, tuple(limits.formats), limits.max_jpeg_scans)
    if info.status != "ok":
        raise DecodeError(info.status, info.detail)
    if info.pixels > limits.max_pixels:
        raise DecodeError("too_large", f"{info.width}x{info.height} is over the pixel cap {limits.max_pixels}")
    return info


def reduced_scale(width: int, height: int, target: int | None, mode: str = "safe") -> int:
    """The JPEG DCT scale (8, 4, 2 or 1) to decode a ``width`` x ``height`` JPEG at, for ``target``.

    ``target`` is the smallest shorter side the resize needs; ``mode`` is ``preprocess.reduced_decode``:

    - ``off``: always 1 (full decode).
    - ``safe``: the largest scale that divides both sides (a reduced decode of a ragged size covers
      a few more source pixels than the image, which shifts the resize grid) and keeps the decoded
      shorter side at least ``SAFE_MARGIN`` x ``target`` (the DCT-scaled decode is not the
      antialiased resize; the margin lets the exact resize that follows wash the difference out).
    - ``fast``: the largest scale that keeps the decoded shorter side at or above ``target``.
    """
    if mode not in REDUCED_DECODE_MODES:
        raise ValueError(f"preprocess.reduced_decode must be one of {REDUCED_DECODE_MODES}, got {mode!r}")
    if mode == "off" or not target or target < 1:
        return 1
    shorter = min(width, height)
    for scale in _REDUCED_SCALES:
        if mode == "fast" and shorter // scale >= target:
            return scale
        if mode == "safe" and width % scale == 0 and height % scale == 0 and shorter >= SAFE_MARGIN * target * scale:
            return scale
    return 1


def decode_image(data: bytes, cfg: PreprocessConfig, target: int | None = None,
                 limits: DecodeConfig | None = None) -> np.ndarray:
    """Decode ``data`` to an HxWx3 RGB uint8 array; raises DecodeError with a manifest reason code.

    ``limits`` is the ``[decode]`` section (caps and formats; defaults when None).
    ``target`` is the smallest shorter side the caller needs; a JPEG large enough for it is decoded at
    1/2, 1/4 or 1/8 scale (OpenCV's IMREAD_REDUCED_*, much faster than a full decode) as
    ``cfg.reduced_decode`` allows (see ``reduced_scale``).
    """
    limits = limits or DecodeConfig()
    info = check_header(data, limits)
    cv2 = decoder_cv2(limits.max_pixels)
    buf = np.frombuffer(data, np.uint8)
    try:
        with quiet_decoder() as said:
            if info.format == "jpeg":
                img = _decode_jpeg(cv2, buf, info, cfg, target)
            else:
                img = _decode_other(cv2, buf, info, cfg)
    except cv2.error as exc:
        raise DecodeError(*cv2_error_verdict(exc)) from None
    if img is None or img.size == 0:
        raise DecodeError("undecodable", f"OpenCV could not decode the {info.format} data")
    damage = decoder_damage(said.text)
    if damage is not None:
        raise DecodeError(*damage)
    return to_rgb8(cv2, img, cfg)


def _decode_jpeg(cv2: Any, buf: np.ndarray, info: HeaderInfo, cfg: PreprocessConfig,
                 target: int | None) -> np.ndarray | None:
    # IMREAD_COLOR (and its reduced forms) converts grey and CMYK to BGR and applies the EXIF orientation.
    scale = reduced_scale(info.width or 0, info.height or 0, target, cfg.reduced_decode)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    if not cfg.exif_orientation:
        flag |= cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(buf, flag)
    return img if img is None else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_other(cv2: Any, buf: np.ndarray, info: HeaderInfo, cfg: PreprocessConfig) -> np.ndarray:
    # IMREAD_UNCHANGED keeps alpha and 16-bit samples so we convert them ourselves; it does not apply
    # the EXIF orientation (TIFF excepted: OpenCV's TIFF reader always applies it), so read it here.
    orientation = 1
    if cfg.exif_orientation and info.format in ("png", "webp"):
        img, types, blobs = cv2.imdecodeWithMetadata(buf, cv2.IMREAD_UNCHANGED)
        kinds = [] if types is None else np.asarray(types).reshape(-1).tolist()
        for kind, blob in zip(kinds, blobs if blobs is not None else ()):
            if int(kind) == cv2.IMAGE_METADATA_EXIF:
                orientation = exif_orientation(bytes(np.asarray(blob, np.uint8)))
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        return img
    img = _bgr_order_to_rgb(cv2, img)
    return apply_orientation(cv2, img, orientation)


def _bgr_order_to_rgb(cv2: Any, img: np.ndarray) -> np.ndarray:
    if img.ndim == 2 or img.shape[2] == 1:
        return img.reshape(img.shape[0], img.shape[1])
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    if img.shape[2] == 2:  # grey + alpha, if a decoder ever hands it over as such
        return img
    raise DecodeError("undecodable", f"unexpected channel count {img.shape[2]}")


def to_rgb8(cv2: Any, img: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Any decoded layout (grey, grey+alpha, RGB, RGBA; 8/16-bit, float) to HxWx3 RGB uint8."""
    if img.dtype != np.uint8:
        img = _to_uint8(img)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 3:
        return np.ascontiguousarray(img)
    if channels == 2:
        img = np.dstack([img[..., 0], img[..., 0], img[..., 0], img[..., 1]])
    if cfg.alpha == "drop":
        return np.ascontiguousarray(img[..., :3])
    return composite(img, cfg.background)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    try:
        return to_uint8(img)
    except ValueError as exc:
        raise DecodeError("undecodable", str(exc)) from None


def composite(rgba: np.ndarray, background: list[int] | tuple[int, int, int]) -> np.ndarray:
    """Alpha-composite RGBA uint8 over a solid background colour (straight alpha, sRGB values)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    bg = np.asarray(background, np.uint16).reshape(1, 1, 3)
    out = (rgb * alpha + bg * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def exif_orientation(blob: bytes) -> int:
    """The Orientation tag (1..8) of an EXIF block (TIFF header, optionally after ``Exif\\0\\0``); 1 if absent."""
    if blob.startswith(b"Exif\x00\x00"):
        blob = blob[6:]
    if len(blob) < 8 or blob[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    end = "<" if blob[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", blob[4:8])
        (count,) = struct.unpack(end + "H", blob[ifd : ifd + 2])
        for i in range(count):
            off = ifd + 2 + 12 * i
            tag, typ = struct.unpack(end + "HH", blob[off : off + 4])
            if tag == 0x0112:
                value = struct.unpack(end + "H", blob[off + 8 : off + 10])[0] if typ == 3 else \
                    struct.unpack(end + "I", blob[off + 8 : off + 12])[0]
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def apply_orientation(cv2: Any, img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an image stored with EXIF ``orientation`` upright (the same result as PIL's exif_transpose)."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return np.ascontiguousarray(np.swapaxes(img, 0, 1))
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(np.ascontiguousarray(np.swapaxes(img, 0, 1)), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img
