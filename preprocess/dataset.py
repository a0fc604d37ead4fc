"""A map-style Dataset over manifest rows: bytes through fsspec, OpenCV decode, resize, uint8 CHW.

A row whose bytes fail now (the file changed or vanished since the manifest) comes back as
``(zeros, index, False, "reason: detail")``: never replaced by another image, never dropped, so the
caller can record it. Items carry the reason string because a Dataset attribute set in a worker
process never reaches the main process.

A DataLoader with automatic batching calls ``__getitems__``: the worker decodes the whole batch,
resizes each group of same-sized images in one call and writes them straight into one shared-memory
batch (``LoadedBatch``), which ``collate`` passes through; no per-item tensors, no per-item collate.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from imgfeat.metadata.config import RESIZE_POLICIES, DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.hooks import fault_point
from imgfeat.metadata.manifest.checks import read_bytes
from imgfeat.preprocess.decode import DecodeError, decode_image
from imgfeat.preprocess.transforms import needed_shorter_side, resize_image, resize_images

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, bool, str]
# Decoded images up to this size wait for their batch-mates to be resized together; larger ones are
# resized at once, so a batch never holds many full-size decodes in memory.
GROUP_MAX_BYTES = 4 * 1024 * 1024


class LoadedBatch(NamedTuple):
    """A batch: uint8 images [B,3,H,W] (channels-last memory), indices int64 [B], ok bool [B], reasons."""

    images: torch.Tensor
    indices: torch.Tensor
    ok: torch.Tensor
    reasons: list[str]


Batch = LoadedBatch


def decode_rgb(uri: str, cfg: PreprocessConfig, size: int, policy: str, resize_shorter: int,
               limits: DecodeConfig | None = None) -> np.ndarray:
    """Read, guard (``limits``: the ``[decode]`` section) and decode one file to HxWx3 RGB uint8 (JPEGs at
    a reduced scale where that is enough for ``size``); raises DecodeError."""
    limits = limits or DecodeConfig()
    fault_point("decode", uri)
    try:
        data = read_bytes(uri, limits.max_bytes)
    except (OSError, ValueError) as exc:
        raise DecodeError("unreadable", f"read failed: {getattr(exc, 'strerror', None) or exc}") from None
    return decode_image(data, cfg, target=needed_shorter_side(size, policy, resize_shorter), limits=limits)


def load_rgb(uri: str, cfg: PreprocessConfig, size: int, policy: str, resize_shorter: int,
             limits: DecodeConfig | None = None) -> np.ndarray:
    """Read, guard, decode and resize one file to ``size`` x ``size`` x 3 RGB uint8; raises DecodeError."""
    rgb = decode_rgb(uri, cfg, size, policy, resize_shorter, limits)
    return resize_image(rgb, size, policy, cfg.interpolation, resize_shorter, cfg.background)


def _failure(exc: Exception) -> str:
    if isinstance(exc, DecodeError):
        return f"{exc.reason}: {exc.detail}"
    return f"internal_error: {type(exc).__name__}: {exc}"


def _column(rows: Any, name: str, default: Any = None) -> list[Any]:
    if isinstance(rows, pa.Table):
        return rows.column(name).to_pylist() if name in rows.column_names else [default] * rows.num_rows
    return [r.get(name, default) for r in rows]


class ManifestDataset(Dataset):
    """Manifest rows (``image_id``, ``path``, optional ``label_index``) -> ``(uint8 [3,H,W], index, ok, reason)``.

    ``cfg`` is the ``[preprocess]`` section, ``limits`` the ``[decode]`` section (defaults when None)."""

    def __init__(self, rows: pa.Table | Sequence[dict[str, Any]], cfg: PreprocessConfig, size: int | None = None,
                 policy: str | None = None, resize_shorter: int | None = None, limits: DecodeConfig | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.limits = limits or DecodeConfig()
        self.limits.validate()
        self.size = int(size or cfg.size)
        self.policy = policy or cfg.resize_policy
        if self.policy not in RESIZE_POLICIES:
            raise ValueError(f"preprocess.resize_policy must be one of {RESIZE_POLICIES}, got {self.policy!r}")
        if self.size < 1:
            raise ValueError(f"preprocess.size must be >= 1, got {self.size}")
        if resize_shorter is None:
            # Keep the configured ratio (256/224 by default) when the size is overridden.
            resize_shorter = cfg.resize_shorter if self.size == cfg.size else round(self.size * cfg.resize_shorter / cfg.size)
        self.resize_shorter = max(int(resize_shorter), self.size)
        self.image_ids: list[str] = [str(v) for v in _column(rows, "image_id")]
        self.paths: list[str] = [str(v) for v in _column(rows, "path")]
        self.labels: list[int] = [-1 if v is None else int(v) for v in _column(rows, "label_index")]
        if any(v is None for v in _column(rows, "path")):
            raise ValueError("ManifestDataset: every row needs a path")

    @classmethod
    def from_manifest(cls, out: str, cfg: PreprocessConfig, split: str | None = None, labels: Iterable[str] | None = None,
                      shards: Iterable[int] | None = None, size: int | None = None, **kwargs: Any) -> "ManifestDataset":
        """The ``status == 'ok'`` rows of the manifest under ``out``, optionally one split, labels or shards."""
        table = read_ok_rows(out, split=split, labels=labels, shards=shards)
        return cls(table, cfg, size=size, **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, i: int) -> np.ndarray:
        """Row ``i`` read, guarded and decoded to HxWx3 RGB uint8, before the resize; raises DecodeError."""
        return decode_rgb(self.paths[i], self.cfg, self.size, self.policy, self.resize_shorter, self.limits)

    def __getitem__(self, i: int) -> Item:
        try:
            rgb = self._resize(self.decode(i)[None])[0]
            return torch.from_numpy(rgb).permute(2, 0, 1), i, True, ""
        except Exception as exc:  # never let one file take a worker down
            return self.empty_image(), i, False, _failure(exc)

    def __getitems__(self, indices: Sequence[int]) -> LoadedBatch:
        """The batch of ``indices``, pixel for pixel what ``collate([self[i] for i in indices])`` gives."""
        images, index_t, ok_t = batch_buffers(len(indices), self.size, self.size)
        dst, ok = images.numpy(), ok_t.numpy()
        index_t.numpy()[:] = indices
        ok[:] = False
        reasons = [""] * len(indices)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
        for k, i in enumerate(indices):
            try:
                rgb = self.decode(i)
                if rgb.nbytes > GROUP_MAX_BYTES:
                    dst[k] = self._resize(rgb[None])[0]
                    ok[k] = True
                else:
                    groups.setdefault(rgb.shape, []).append((k, rgb))
            except Exception as exc:  # never let one file take a worker down
                reasons[k] = _failure(exc)
        for members in groups.values():
            self._resize_group(members, dst, ok, reasons)
        dst[~ok] = 0
        return LoadedBatch(images.permute(0, 3, 1, 2), index_t, ok_t, reasons)

    def _resize(self, stack: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return resize_images(stack, self.size, self.policy, self.cfg.interpolation, self.resize_shorter,
                             self.cfg.background, out=out)

    def _resize_group(self, members: list[tuple[int, np.ndarray]], dst: np.ndarray, ok: np.ndarray,
                      reasons: list[str]) -> None:
        ks = [k for k, _ in members]
        try:
            if ks == list(range(len(dst))):  # the whole batch: resize straight into it
                self._resize(np.stack([rgb for _, rgb in members]), out=dst)
            else:
                dst[ks] = self._resize(np.stack([rgb for _, rgb in members]))
            ok[ks] = True
        except Exception as exc:
            log.debug("group resize failed (%s); resizing one image at a time", exc)
            for k, rgb in members:
                try:
                    dst[k] = self._resize(rgb[None])[0]
                    ok[k] = True
                except Exception as one_exc:
                    reasons[k] = _failure(one_exc)

    def empty_image(self) -> torch.Tensor:
        return torch.zeros((3, self.size, self.size), dtype=torch.uint8)


def read_ok_rows(out: str, split: str | None = None, labels: Iterable[str] | None = None,
                 shards: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Manifest rows with status ok and a shard (tiled images have none: their tiles are the tile table's), and
    the given filters, sorted by (shard, image_id) for a stable order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from imgfeat.metadata.contracts.schema import read_manifest

    cols = list(columns or ("image_id", "path", "label", "label_index", "split", "shard", "width", "height"))
    expr = (pads.field("status") == "ok") & pads.field("shard").is_valid()  # a tiled image's rows are its tiles
    if split:
        expr = expr & (pads.field("split") == split)
    if labels is not None:
        expr = expr & pads.field("label").isin(list(labels))
    if shards is not None:
        expr = expr & pads.field("shard").isin([int(s) for s in shards])
    table = read_manifest(out, columns=cols, filters=expr)
    if table.num_rows:
        order = pc.sort_indices(table, sort_keys=[("shard", "ascending"), ("image_id", "ascending")]) \
            if "shard" in table.column_names else pc.sort_indices(table, sort_keys=[("image_id", "ascending")])
        table = table.take(order)
    return table


def batch_buffers(n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialized images uint8 [n,height,width,3], indices int64 [n] and ok bool [n].

    Inside a DataLoader worker the three are views of one shared-memory block (as default_collate
    allocates its batch), so a batch crosses to the main process as one file descriptor, not three.
    """
    if torch.utils.data.get_worker_info() is None:
        return (torch.empty((n, height, width, 3), dtype=torch.uint8), torch.empty(n, dtype=torch.int64),
                torch.empty(n, dtype=torch.bool))
    index_at = -(-n * height * width * 3 // 8)  # in int64 elements, so the indices are 8-byte aligned
    storage = torch.UntypedStorage._new_shared(index_at * 8 + 9 * n)
    images = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n, height, width, 3), (height * width * 3, width * 3, 3, 1))
    indices = torch.empty(0, dtype=torch.int64).set_(storage, index_at, (n,), (1,))
    ok = torch.empty(0, dtype=torch.bool).set_(storage, index_at * 8 + 8 * n, (n,), (1,))
    return images, indices, ok


def collate(items: Sequence[Item] | LoadedBatch) -> Batch:
    """Stack items into ``(uint8 [B,3,H,W], indices int64 [B], ok bool [B], reasons)``.

    The image batch is laid out channels-last in memory (an NHWC buffer seen as NCHW): no transpose
    copy on the CPU, and the layout convolution models run fastest with. Call ``.contiguous()`` for
    plain NCHW memory.
    """
    if isinstance(items, LoadedBatch):  # __getitems__ built the batch already
        return items
    first = items[0][0]
    if first.shape[0] != 3:
        raise ValueError(f"collate wants [3,H,W] images, got {tuple(first.shape)}")
    out, indices, ok = batch_buffers(len(items), first.shape[1], first.shape[2])
    dst = out.numpy()
    for k, it in enumerate(items):
        # NumPy copies: torch's copy_ fans out to its intra-op thread pool, slow for 150 KB on a busy CPU.
        np.copyto(dst[k], it[0].permute(1, 2, 0).numpy())
    indices.numpy()[:] = [it[1] for it in items]
    ok.numpy()[:] = [bool(it[2]) for it in items]
    return LoadedBatch(out.permute(0, 3, 1, 2), indices, ok, [it[3] for it in items])
