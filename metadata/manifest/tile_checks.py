"""The manifest check of an image to be tiled (``[tiles] enabled``, a side >= ``tiles.min_side``).

Such a file is never decoded whole here. A TIFF is checked through its structure only
(``contracts.tiff_tiles.check_tiff``: the IFDs and the tile offset tables, every tile inside the file, the
chosen pyramid level present), opened through fsspec, so a file over ``decode.max_bytes`` is read in
chunks for its content hash and never held in memory. Another format (JPEG, PNG, ...) must fit
``decode.max_bytes``; its header was parsed by the ordinary check. The row is ``ok`` with ``tiles``, the
number of tiles of ``contracts.tiles.tile_boxes``, or has a reason.

Cost per tiled file: one streaming read (the content hash) and, for a TIFF, its IFDs and offset arrays.
"""
from __future__ import annotations

import hashlib
import io
from typing import Any, BinaryIO

import fsspec

from imgfeat.metadata.config import TilesConfig
from imgfeat.metadata.contracts.sniff import sniff_format
from imgfeat.metadata.contracts.tiff_tiles import check_tiff, tiff_levels
from imgfeat.metadata.contracts.tiles import tile_count

HASH_CHUNK = 8 << 20


def is_tiled(width: int | None, height: int | None, tiling: TilesConfig | None) -> bool:
    """Whether an image of this size is tiled under ``tiling`` (None: tiling off)."""
    return tiling is not None and tiling.enabled and max(width or 0, height or 0) >= tiling.min_side


def _streamed_hash(f: BinaryIO) -> tuple[str, int]:
    """``checks.content_hash`` of the whole file, read in chunks; and its size."""
    h, n = hashlib.sha256(), 0
    f.seek(0)
    while chunk := f.read(HASH_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest()[:32], n


def _tiff_row(row: dict[str, Any], f: BinaryIO, size: int, tiling: TilesConfig) -> dict[str, Any]:
    problem = check_tiff(f, size, tiling.level)
    if problem is not None:
        return dict(row, status=problem[0], status_detail=problem[1])
    levels = tiff_levels(f)
    full, chosen = levels[0], levels[tiling.level]
    row.update(format="tiff", width=full.width, height=full.height, channels=full.samples)
    if not is_tiled(full.width, full.height, tiling):
        return dict(row, status="too_large", status_detail=(
            f"{size} bytes is over the byte cap, and at {full.width}x{full.height} the image is not tiled "
            f"(tiles.min_side {tiling.min_side})"))
    return _counted(row, chosen.width, chosen.height, tiling)


def _counted(row: dict[str, Any], width: int, height: int, tiling: TilesConfig) -> dict[str, Any]:
    if width * height > tiling.max_pixels:
        return dict(row, status="too_large", status_detail=(
            f"level {tiling.level} is {width}x{height}, over the tiled-image pixel cap {tiling.max_pixels}"))
    return dict(row, tiles=tile_count(width, height, tiling.tile_size, tiling.overlap))


def check_large_file(row: dict[str, Any], path: str, size: int, tiling: TilesConfig) -> dict[str, Any]:
    """The row of a file over ``decode.max_bytes``: a TIFF to tile is checked from its structure and hashed
    in chunks; anything else stays ``too_large``."""
    with fsspec.open(path, "rb") as f:
        head = f.read(16)
        if sniff_format(head) != "tiff":
            return dict(row, status="too_large", status_detail=(
                f"{size} bytes is over the byte cap (only TIFF files are read tile by tile)"))
        digest, read = _streamed_hash(f)
        row = dict(row, content_hash=digest, size_bytes=read)
        return _tiff_row(row, f, read, tiling)


def check_tiled_bytes(row: dict[str, Any], data: bytes, tiling: TilesConfig) -> dict[str, Any]:
    """The row of a file read whole (within ``decode.max_bytes``) whose header says it is tiled."""
    if row["format"] == "tiff":
        return _tiff_row(row, io.BytesIO(data), len(data), tiling)
    if tiling.level:
        return dict(row, status="undecodable", status_detail=(
            f"pyramid level {tiling.level} does not exist ({row['format']} has one level)"))
    return _counted(row, row["width"], row["height"], tiling)
