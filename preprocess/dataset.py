"""A map-style Dataset over manifest rows: bytes through fsspec, OpenCV decode, resize, uint8 CHW.

A row whose bytes fail now (the file changed or vanished since the manifest) comes back as
``(zeros, index, False, "reason: detail")``: never replaced by another image, never dropped, so the
caller can record it. Items carry the reason string because a Dataset attribute set in a worker
process never reaches the main process.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from metadata.checks import read_bytes
from metadata.config import RESIZE_POLICIES, PreprocessConfig
from preprocess.decode import DecodeError, decode_image
from preprocess.transforms import needed_shorter_side, resize_image

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, int, bool, str]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def load_rgb(uri: str, cfg: PreprocessConfig, size: int, policy: str, resize_shorter: int) -> np.ndarray:
    """Read, guard, decode and resize one file to ``size`` x ``size`` x 3 RGB uint8; raises DecodeError."""
    try:
        data = read_bytes(uri, cfg.max_bytes)
    except (OSError, ValueError) as exc:
        raise DecodeError("unreadable", f"read failed: {getattr(exc, 'strerror', None) or exc}") from None
    rgb = decode_image(data, cfg, target=needed_shorter_side(size, policy, resize_shorter))
    return resize_image(rgb, size, policy, cfg.interpolation, resize_shorter, cfg.background)


def _column(rows: Any, name: str, default: Any = None) -> list[Any]:
    if isinstance(rows, pa.Table):
        return rows.column(name).to_pylist() if name in rows.column_names else [default] * rows.num_rows
    return [r.get(name, default) for r in rows]


class ManifestDataset(Dataset):
    """Manifest rows (``image_id``, ``path``, optional ``label_index``) -> ``(uint8 [3,H,W], index, ok, reason)``."""

    def __init__(self, rows: pa.Table | Sequence[dict[str, Any]], cfg: PreprocessConfig, size: int | None = None,
                 policy: str | None = None, resize_shorter: int | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
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

    def __getitem__(self, i: int) -> Item:
        try:
            rgb = load_rgb(self.paths[i], self.cfg, self.size, self.policy, self.resize_shorter)
            return torch.from_numpy(rgb).permute(2, 0, 1), i, True, ""
        except DecodeError as exc:
            reason = f"{exc.reason}: {exc.detail}"
        except Exception as exc:  # never let one file take a worker down
            reason = f"undecodable: {type(exc).__name__}: {exc}"
        return self.empty_image(), i, False, reason

    def empty_image(self) -> torch.Tensor:
        return torch.zeros((3, self.size, self.size), dtype=torch.uint8)


def read_ok_rows(out: str, split: str | None = None, labels: Iterable[str] | None = None,
                 shards: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Manifest rows with status ok (and the given filters), sorted by (shard, image_id) for a stable order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from metadata.schema import read_manifest

    cols = list(columns or ("image_id", "path", "label", "label_index", "split", "shard", "width", "height"))
    expr = pads.field("status") == "ok"
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


def collate(items: Sequence[Item]) -> Batch:
    """Stack items into ``(uint8 [B,3,H,W], indices int64 [B], ok bool [B], reasons)``.

    The image batch is laid out channels-last in memory (an NHWC buffer seen as NCHW): no transpose
    copy on the CPU, and the layout convolution models run fastest with. Call ``.contiguous()`` for
    plain NCHW memory.
    """
    images = [it[0] for it in items]
    first = images[0]
    c, h, w = first.shape
    shape = (len(items), h, w, c)
    if torch.utils.data.get_worker_info() is not None:
        # Allocate in shared memory directly, as default_collate does, so the batch is not copied again.
        storage = first._typed_storage()._new_shared(int(np.prod(shape)), device=first.device)
        out = first.new(storage).resize_(*shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    dst = out.numpy()
    for k, img in enumerate(images):
        # NumPy copies: torch's copy_ fans out to its intra-op thread pool, slow for 150 KB on a busy CPU.
        np.copyto(dst[k], img.permute(1, 2, 0).numpy())
    indices = torch.tensor([it[1] for it in items], dtype=torch.int64)
    ok = torch.tensor([bool(it[2]) for it in items], dtype=torch.bool)
    return out.permute(0, 3, 1, 2), indices, ok, [it[3] for it in items]
