"""JPEG decode on the CUDA device (``featurize.decode_device = gpu``), with a per-image fallback to the CPU decoder.

Work is split in two:

* DataLoader workers (``RawBytesDataset``, crash-contained as before) read each file, run the same guards as
  the CPU decoder (``preprocess.decode.check_header``: byte cap, format allowlist, pixel cap, scan cap) and
  look at the JPEG header (``gpu_fallback_reason``). A JPEG the GPU can take travels as its bytes; any other
  file (PNG, WebP..., or a JPEG that is CMYK, 12-bit, arithmetic-coded, lossless or stored as RGB) is decoded
  and resized right there by the CPU decoder, exactly as the CPU path does. Files failing the guards are
  rejects with the CPU path's reason. ``collate_raw`` packs a batch (``RawBatch``): one byte buffer with
  offsets, the header facts the main process needs, and the CPU-decoded images.
* The main process (``GpuDecoder``) decodes the JPEG bytes of a batch with one call of the decode function
  (``torchvision.io.decode_jpeg(list, device=cuda, mode=RGB)``, nvJPEG), applies the EXIF orientation, and
  resizes + crops on the device with the CPU path's geometry (``preprocess.transforms.resize_images``:
  ``shorter_side_dims``, ``int(round(...))`` crop offsets, letterbox and plain resize alike) and its
  antialiased bilinear filter: two separable passes (width, then height) of ``interpolate(antialias=True)`` in
  float32, each rounded half up to uint8 as the CPU's fixed-point uint8 kernel does (at most 1 of 255 apart, on
  about 0.2 % of the values, for photo-like frames; up to 2 on a few % for 4:1 frames resized to a square).
  Only ``preprocess.interpolation = linear`` runs on the device (``resolve_decode_device`` refuses the others
  for ``gpu``).

Per-image fallback, each counted by reason in ``GpuDecoder.fallbacks`` (and so in the run summary): the file
is not a JPEG or a JPEG the GPU does not take (decided in the worker, see ``gpu_fallback_reason``); the batch
call raises (the batch is split in halves until the failing images are alone: ``gpu_error``); the decoded shape
is not the manifest's width x height (``shape_mismatch``). Such an image is decoded by the CPU decoder
(``preprocess.decode.decode_image``, same config and limits) on the bytes already read; one failing both is a
reject with the CPU decoder's reason, as the CPU path reports it. A kind of JPEG (baseline or progressive,
colour or grey) that fails on the GPU ``LEARN_AFTER`` times without ever succeeding goes straight to the CPU
for the rest of the run (``gpu_unsupported_<kind>``). Those main-process CPU decodes are not crash-contained
(the header guards ran first, in the worker); they are rare by construction.

Large JPEGs: the CPU path decodes them at a reduced DCT scale where ``preprocess.reduced_decode`` allows, the
GPU always at full size before the antialiased resize; features agree at cosine >= 0.999 (tested on CUDA).
"""
from __future__ import annotations

import logging
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.hooks import fault_point
from imgfeat.metadata.contracts.sniff import sniff_format
from imgfeat.metadata.manifest.checks import read_bytes
from imgfeat.preprocess.dataset import Item, ManifestDataset, _column, _failure, batch_buffers
from imgfeat.preprocess.decode import DecodeError, check_header, decode_image, exif_orientation
from imgfeat.preprocess.transforms import needed_shorter_side, resize_image, shorter_side_dims

log = logging.getLogger(__name__)

DecodeFn = Callable[[list[torch.Tensor], torch.device], Sequence[torch.Tensor]]
"""Decode a list of 1-D uint8 CPU tensors (JPEG bytes) to RGB uint8 [3,H,W] tensors on the device; raises on
any failure of the call (as ``torchvision.io.decode_jpeg`` does: no partial results)."""

GPU_SOF = (0xC0, 0xC1, 0xC2)
"""Frame types sent to the GPU: baseline, extended sequential and progressive Huffman JPEG."""
LEARN_AFTER = 2
"""GPU failures of one kind of JPEG, with no success of that kind, after which the kind goes to the CPU."""
FLOAT_CHUNK_BYTES = 512 * 1024 * 1024
"""Largest float32 stack resized in one call (a group of big same-sized photos is cut into chunks)."""
META_FIELDS = 5
"""``RawBatch.meta`` columns: height, width (from the JPEG frame header), EXIF orientation, SOF marker, components."""


@dataclass(frozen=True)
class JpegLayout:
    """What the JPEG header says about how to decode the image (segments up to the first scan)."""

    width: int
    height: int
    components: int
    precision: int
    sof: int
    """The frame marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...)."""
    component_ids: tuple[int, ...]
    orientation: int = 1
    """The EXIF orientation (1..8; 1 when absent)."""
    adobe_transform: int | None = None
    """The Adobe APP14 colour transform flag (0: none, i.e. RGB or CMYK stored as is), when present."""

    @property
    def kind(self) -> str:
        """``baseline`` or ``progressive``, ``_grey`` for one component: the unit of learned fallbacks."""
        return ("progressive" if self.sof == 0xC2 else "baseline") + ("_grey" if self.components == 1 else "")


def jpeg_layout(data: bytes | memoryview) -> JpegLayout | None:
    """The ``JpegLayout`` of JPEG bytes, or None when the segments before the first scan do not parse."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    orientation, adobe = 1, None
    frame: tuple[int, int, int, int, int, tuple[int, ...]] | None = None
    try:
        while pos + 4 <= n:
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                pos += 2
                continue
            if marker in (0xD9, 0xDA):
                break
            (seg_len,) = struct.unpack_from(">H", data, pos + 2)
            if seg_len < 2:
                return None
            body = pos + 4
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and frame is None:
                precision, height, width, comps = struct.unpack_from(">BHHB", data, body)
                ids = tuple(data[body + 6 + 3 * c] for c in range(comps))
                frame = (marker, precision, height, width, comps, ids)
            elif marker == 0xE1 and bytes(data[body : body + 6]) == b"Exif\x00\x00" and orientation == 1:
                orientation = exif_orientation(bytes(data[body : pos + 2 + seg_len]))
            elif marker == 0xEE and bytes(data[body : body + 5]) == b"Adobe" and seg_len >= 14:
                adobe = data[body + 11]
            pos += 2 + seg_len
    except (struct.error, IndexError):
        return None
    if frame is None:
        return None
    marker, precision, height, width, comps, ids = frame
    return JpegLayout(width, height, comps, precision, marker, ids, orientation, adobe)


def gpu_fallback_reason(data: bytes | memoryview, layout: JpegLayout | None = None) -> str:
    """Why these bytes go to the CPU decoder instead of the GPU; "" when the GPU takes them.

    ``not_jpeg`` (another format), ``jpeg_header`` (segments unreadable), ``jpeg_frame`` (arithmetic-coded,
    lossless or hierarchical JPEG), ``jpeg_precision`` (12/16-bit samples), ``cmyk`` (4 components: CMYK or
    YCCK), ``jpeg_components`` (2 or more than 4), ``rgb_jpeg`` (3 components stored as RGB, not YCbCr: an
    Adobe marker with transform 0 or the component ids R, G, B; libjpeg honours those, nvJPEG may not)."""
    if sniff_format(bytes(data[:64])) != "jpeg":
        return "not_jpeg"
    layout = layout if layout is not None else jpeg_layout(data)
    if layout is None:
        return "jpeg_header"
    if layout.sof not in GPU_SOF:
        return "jpeg_frame"
    if layout.precision != 8:
        return "jpeg_precision"
    if layout.components == 4:
        return "cmyk"
    if layout.components not in (1, 3):
        return "jpeg_components"
    if layout.components == 3 and (layout.adobe_transform == 0 or layout.component_ids == (82, 71, 66)):
        return "rgb_jpeg"
    return ""


class RawBatch(NamedTuple):
    """A batch for the GPU decoder, made in a DataLoader worker by ``collate_raw``.

    Row ``k`` goes to the GPU when ``ok[k]`` and its bytes ``payload[offsets[k]:offsets[k+1]]`` are not empty;
    otherwise an ok row was decoded on the CPU in the worker (``images[k]``) and ``reasons[k]`` says why (the
    fallback reason), and a row that is not ok is a reject with its reason."""

    images: torch.Tensor
    """uint8 [B,3,S,S] (channels-last memory): the rows decoded on the CPU; zeros elsewhere."""
    indices: torch.Tensor
    ok: torch.Tensor
    reasons: list[str]
    payload: torch.Tensor
    """uint8 [N]: the JPEG bytes of the GPU rows, one after the other."""
    offsets: torch.Tensor
    """int64 [B+1]."""
    meta: torch.Tensor
    """int32 [B, META_FIELDS]: height, width, orientation, SOF marker, components of each GPU row (zeros elsewhere)."""


def collate_raw(items: Sequence[Item] | RawBatch) -> RawBatch:
    """Pack ``RawBytesDataset`` items into a ``RawBatch``. An item's tensor is either JPEG bytes (1-D, for the
    GPU) or a decoded image [3,S,S] (CPU fallback in the worker, or an empty image for a reject)."""
    if isinstance(items, RawBatch):
        return items
    n = len(items)
    # An all-JPEG batch has no decoded image to take the size from: its image block is empty (S = 0).
    size = next((int(it[0].shape[-1]) for it in items if it[0].dim() == 3), 0)
    images, indices, ok = batch_buffers(n, size, size)
    dst = images.numpy()
    sizes = [int(it[0].numel()) if it[0].dim() == 1 and it[2] else 0 for it in items]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    payload = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    buf = payload.numpy()
    meta = torch.zeros((n, META_FIELDS), dtype=torch.int32)
    meta_np = meta.numpy()
    reasons = []
    for k, (tensor, index, good, reason) in enumerate(items):
        indices[k] = int(index)
        ok[k] = bool(good)
        reasons.append(str(reason))
        if tensor.dim() == 3 and size:
            np.copyto(dst[k], tensor.permute(1, 2, 0).numpy())
        elif size:
            dst[k] = 0
        if sizes[k]:
            arr = tensor.numpy()
            buf[offsets[k] : offsets[k + 1]] = arr
            layout = jpeg_layout(arr.data)
            if layout is not None:
                meta_np[k] = (layout.height, layout.width, layout.orientation, layout.sof, layout.components)
    return RawBatch(images.permute(0, 3, 1, 2), indices, ok, reasons, payload, torch.from_numpy(offsets), meta)


class RawBytesDataset(ManifestDataset):
    """Manifest rows -> ``(JPEG bytes uint8 [N] | decoded uint8 [3,S,S], index, ok, reason)`` for the GPU decoder.

    The same reads, guards and reject reasons as ``ManifestDataset``; only the JPEGs the GPU takes stay bytes.
    For an ok row decoded here on the CPU, ``reason`` is the fallback reason (``gpu_fallback_reason``)."""

    def __init__(self, rows: pa.Table | Sequence[dict[str, Any]], cfg: PreprocessConfig, size: int | None = None,
                 policy: str | None = None, resize_shorter: int | None = None, limits: DecodeConfig | None = None) -> None:
        super().__init__(rows, cfg, size=size, policy=policy, resize_shorter=resize_shorter, limits=limits)
        self.widths: list[int | None] = [None if v is None else int(v) for v in _column(rows, "width")]
        self.heights: list[int | None] = [None if v is None else int(v) for v in _column(rows, "height")]

    def expected_shape(self, i: int) -> tuple[int, int] | None:
        """(height, width) of row ``i`` in the manifest, or None when the manifest does not say."""
        h, w = self.heights[i], self.widths[i]
        return (h, w) if h and w else None

    def __getitem__(self, i: int) -> Item:
        uri = self.paths[i]
        try:
            fault_point("decode", uri)
            try:
                data = read_bytes(uri, self.limits.max_bytes)
            except (OSError, ValueError) as exc:
                raise DecodeError("unreadable", f"read failed: {getattr(exc, 'strerror', None) or exc}") from None
            check_header(data, self.limits)  # the CPU decoder's guards and reasons, before anything else
            why = gpu_fallback_reason(data)
            if not why:
                return torch.from_numpy(np.frombuffer(data, np.uint8).copy()), i, True, ""
            target = needed_shorter_side(self.size, self.policy, self.resize_shorter)
            rgb = decode_image(data, self.cfg, target=target, limits=self.limits)
            img = resize_image(rgb, self.size, self.policy, self.cfg.interpolation, self.resize_shorter, self.cfg.background)
            return torch.from_numpy(img).permute(2, 0, 1), i, True, why
        except Exception as exc:  # never let one file take a worker down
            return self.empty_image(), i, False, _failure(exc)

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:  # type: ignore[override]
        """The items of ``indices`` (``collate_raw`` packs them)."""
        return [self[i] for i in indices]


def nvjpeg_decode(datas: list[torch.Tensor], device: torch.device) -> Sequence[torch.Tensor]:
    """``torchvision.io.decode_jpeg`` of a list on ``device`` (nvJPEG on CUDA), RGB output."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 marks its image IO deprecated (for TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    return out if isinstance(out, list) else [out]


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A [C,H,W] image stored with EXIF ``orientation`` turned upright (as ``preprocess.decode.apply_orientation``)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:  # 90 degrees clockwise
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # 90 degrees counter-clockwise
        return image.transpose(-1, -2).flip(-2)
    return image


def _aa_resize(stack: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """uint8 [N,3,H,W] -> [N,3,height,width]: antialiased bilinear, width pass then height pass, each rounded
    half up to uint8 (how the CPU's uint8 kernel and PIL do it, in fixed point)."""
    h, w = stack.shape[-2:]
    if (h, w) == (height, width):
        return stack
    x = stack.float()
    if w != width:
        x = torch.nn.functional.interpolate(x, size=(h, width), mode="bilinear", align_corners=False, antialias=True)
        x = x.add_(0.5).floor_().clamp_(0, 255)
    if h != height:
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        x = x.add_(0.5).floor_().clamp_(0, 255)
    return x.to(torch.uint8)


def resize_on_device(stack: torch.Tensor, size: int, policy: str = "resize_shorter+center_crop",
                     resize_shorter: int | None = None, background: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Same-sized uint8 images [N,3,H,W] on any device to [N,3,size,size] under ``policy``, with the geometry of
    ``preprocess.transforms.resize_images`` (interpolation ``linear``). Big stacks are resized in chunks."""
    n, _, h, w = stack.shape
    if policy == "resize":
        nw, nh = size, size
    elif policy == "letterbox":
        scale = size / max(w, h)
        nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    elif policy == "resize_shorter+center_crop":
        shorter = resize_shorter or size
        if shorter < size:
            raise ValueError(f"preprocess.resize_shorter ({shorter}) must be >= preprocess.size ({size})")
        nw, nh = shorter_side_dims(w, h, shorter)
    else:
        raise ValueError(f"preprocess.resize_policy: unknown policy {policy!r}")
    chunk = max(1, FLOAT_CHUNK_BYTES // max(1, 3 * h * w * 4))
    resized = torch.cat([_aa_resize(stack[i : i + chunk], nw, nh) for i in range(0, n, chunk)]) if n > chunk \
        else _aa_resize(stack, nw, nh)
    if policy == "resize":
        return resized
    if policy == "letterbox":
        out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=stack.device)
        out[:] = torch.tensor(list(background), dtype=torch.uint8, device=stack.device).view(1, 3, 1, 1)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[:, :, top : top + nh, left : left + nw] = resized
        return out
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return resized[:, :, top : top + size, left : left + size]


class GpuDecoder:
    """Decode ``RawBatch`` es on ``device``: JPEG rows with ``decode_fn`` (nvJPEG by default), the rest as the
    worker left them; per-image CPU fallback (see the module docstring). Keeps counts across batches:
    ``fallbacks`` (reason -> images), ``gpu_images`` (decoded on the device)."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device | str, limits: DecodeConfig | None = None,
                 decode_fn: DecodeFn | None = None) -> None:
        if cfg.interpolation != "linear":
            raise ValueError(f"featurize.decode_device = gpu resizes with preprocess.interpolation = linear only, "
                             f"got {cfg.interpolation!r}")
        self.cfg, self.device = cfg, torch.device(device)
        self.limits = limits or DecodeConfig()
        self.decode_fn: DecodeFn = decode_fn or nvjpeg_decode
        self.fallbacks: Counter[str] = Counter()
        self.gpu_images = 0
        self.kind_ok: Counter[str] = Counter()
        self.kind_failed: Counter[str] = Counter()
        self.cpu_kinds: set[str] = set()

    def decode(self, batch: RawBatch, dataset: RawBytesDataset) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(uint8 [B,3,S,S] on the device in channels-last memory, ok bool [B] on the CPU, reasons [B]) of ``batch``,
        whose rows are rows of ``dataset`` (its geometry, and its manifest width/height for the shape check)."""
        n, size = len(batch.reasons), dataset.size
        out = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=self.device).contiguous(memory_format=torch.channels_last)
        ok = batch.ok.clone()
        good = batch.ok.tolist()
        reasons = list(batch.reasons)
        offsets = batch.offsets.tolist()
        meta = batch.meta.tolist()
        indices = batch.indices.tolist()
        gpu_rows = [k for k in range(n) if good[k] and offsets[k + 1] > offsets[k]]
        worker_rows = [k for k in range(n) if good[k] and offsets[k + 1] == offsets[k]]
        if worker_rows:
            out[worker_rows] = batch.images[worker_rows].to(self.device, non_blocking=True)
            for k in worker_rows:
                self.fallbacks[reasons[k] or "cpu"] += 1
                reasons[k] = ""
        fallback: dict[int, str] = {}
        send = []
        for k in gpu_rows:
            kind = _kind(meta[k])
            if kind in self.cpu_kinds:
                fallback[k] = f"gpu_unsupported_{kind}"
            else:
                send.append(k)
        datas = [batch.payload[offsets[k] : offsets[k + 1]] for k in send]
        decoded = self._decode_isolating(datas)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for k, result in zip(send, decoded):  # successes first: a kind that works anywhere in the batch stays
            if not isinstance(result, BaseException):
                self.kind_ok[_kind(meta[k])] += 1
        for k, result in zip(send, decoded):
            kind = _kind(meta[k])
            if isinstance(result, BaseException):
                self.kind_failed[kind] += 1
                if self.kind_failed[kind] >= LEARN_AFTER and not self.kind_ok[kind] and kind not in self.cpu_kinds:
                    self.cpu_kinds.add(kind)
                    log.warning("GPU decode failed on %d %s JPEGs and never succeeded (last: %s: %s): those go to the "
                                "CPU decoder from now on", self.kind_failed[kind], kind, type(result).__name__, result)
                fallback[k] = "gpu_error"
                continue
            height, width, orientation = meta[k][0], meta[k][1], meta[k][2]
            want = dataset.expected_shape(indices[k]) or (height, width)
            if tuple(result.shape) != (3, *want):
                log.debug("GPU decode of %s gave shape %s, expected (3, %d, %d)", dataset.paths[indices[k]],
                          tuple(result.shape), *want)
                fallback[k] = "shape_mismatch"
                continue
            image = orient(result, orientation) if self.cfg.exif_orientation else result
            groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append((k, image))
        for members in groups.values():
            ks = [k for k, _ in members]
            stack = torch.stack([image for _, image in members])
            out[ks] = resize_on_device(stack, size, dataset.policy, dataset.resize_shorter, self.cfg.background)
            self.gpu_images += len(ks)
        for k, why in fallback.items():
            self.fallbacks[why] += 1
            image_or_reason = self._cpu_decode(batch.payload[offsets[k] : offsets[k + 1]], dataset)
            if isinstance(image_or_reason, str):
                ok[k] = False
                reasons[k] = image_or_reason
            else:
                out[k] = image_or_reason.to(self.device)
        return out, ok, reasons

    def _decode_isolating(self, datas: list[torch.Tensor]) -> list[torch.Tensor | BaseException]:
        """``decode_fn`` on ``datas`` in one call; when the call raises, on each half, down to single images, so
        one bad file costs its own fallback only (and about 2 log2(B) calls, not B)."""
        if not datas:
            return []
        try:
            images = list(self.decode_fn(datas, self.device))
            if len(images) != len(datas):
                raise RuntimeError(f"the decoder returned {len(images)} images for {len(datas)} inputs")
            return list(images)
        except Exception as exc:
            if len(datas) == 1:
                return [exc]
            mid = len(datas) // 2
            return self._decode_isolating(datas[:mid]) + self._decode_isolating(datas[mid:])

    def _cpu_decode(self, data: torch.Tensor, dataset: RawBytesDataset) -> torch.Tensor | str:
        """uint8 [3,S,S] (CPU) from the CPU decoder on the bytes, or the reject reason it gives."""
        try:
            target = needed_shorter_side(dataset.size, dataset.policy, dataset.resize_shorter)
            rgb = decode_image(data.numpy().tobytes(), self.cfg, target=target, limits=self.limits)
            img = resize_image(rgb, dataset.size, dataset.policy, self.cfg.interpolation, dataset.resize_shorter,
                               self.cfg.background)
            return torch.from_numpy(img).permute(2, 0, 1)
        except Exception as exc:
            return _failure(exc)


def _kind(meta_row: Sequence[int]) -> str:
    return ("progressive" if meta_row[3] == 0xC2 else "baseline") + ("_grey" if meta_row[4] == 1 else "")


def gpu_decode_available() -> str:
    """"" when torchvision can decode JPEGs on CUDA here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from torchvision.io.image import _has_image_ops

        if not _has_image_ops():
            return "torchvision's image extension is not loaded"
    except ImportError as exc:
        return f"torchvision.io: {exc}"
    return ""


def resolve_decode_device(setting: str, device: torch.device, cfg: PreprocessConfig) -> str:
    """``featurize.decode_device`` for a run on ``device``: ``cpu``, ``gpu`` or ``auto`` (to be measured).

    ``gpu`` on a CPU device, or with another interpolation than ``linear``, is a ValueError naming the key;
    ``auto`` there means ``cpu``."""
    if setting == "cpu":
        return "cpu"
    if setting not in ("gpu", "auto"):
        raise ValueError(f"featurize.decode_device must be one of cpu, gpu, auto; got {setting!r}")
    problem = ""
    if device.type != "cuda":
        problem = f"the model runs on {device}, not a CUDA device"
    elif cfg.interpolation != "linear":
        problem = f"preprocess.interpolation = {cfg.interpolation!r} (the device resize is linear only)"
    else:
        problem = gpu_decode_available()
    if not problem:
        return setting
    if setting == "gpu":
        raise ValueError(f"featurize.decode_device = gpu: {problem}; use cpu or auto")
    log.info("featurize.decode_device = auto: cpu (%s)", problem)
    return "cpu"


__all__ = ["JpegLayout", "jpeg_layout", "gpu_fallback_reason", "RawBatch", "collate_raw", "RawBytesDataset",
           "nvjpeg_decode", "orient", "resize_on_device", "GpuDecoder", "resolve_decode_device", "gpu_decode_available"]
