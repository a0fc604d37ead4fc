"""The tile contract: how a very large image is cut into tiles, each tile's id, and the tile table.

A manifest row whose image has a side at or above ``tiles.min_side`` (with ``[tiles] enabled``) is ``ok``
with a ``tiles`` count and no image shard; its tiles are rows of the tile table ``OUT/tiles/`` (Parquet,
:data:`TILE_SCHEMA`, clustered by ``shard`` with a shard index like the manifest's), and featurize of
tiles writes one feature row per tile, keyed by ``tile_id``.

The grid (:func:`tile_starts`): squares of ``tile_size`` pixels of the chosen pyramid level, stepping by
``tile_size - round(tile_size * overlap)``, the last one placed so that the tiles cover the whole side. With
``edge = "clip"`` a tile past the edge is cut to the image (edge tiles are smaller); with ``"pad"`` every
tile is ``tile_size`` square and the part outside the image is black. Pure Python: both the Spark job and
the decoders import it.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import pyarrow as pa

from imgfeat.metadata.storage import join

TILES_DIR = "tiles"
TILE_EDGES = ("clip", "pad")

TILE_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("format", pa.string()),
        pa.field("level", pa.int32(), nullable=False),
        pa.field("x", pa.int32(), nullable=False),
        pa.field("y", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("label_index", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("shard", pa.int32()),
    ]
)
"""One row per tile: the box ``(x, y, width, height)`` in pixels of pyramid ``level`` of the image at
``path`` (``width``/``height`` of the box; with ``edge = "pad"`` a box may reach past the image, whose
part outside is black). ``status`` is ``ok`` (a tile's read can still fail in featurize: it is then a
reject of its feature shard, like an image's)."""


class Box(NamedTuple):
    x: int
    y: int
    width: int
    height: int


def tiles_path(out: str) -> str:
    """The tile table of the manifest folder ``out``."""
    return join(out, TILES_DIR)


def stride_of(tile_size: int, overlap: float) -> int:
    """Pixels between the starts of two neighbouring tiles (at least 1)."""
    return max(1, tile_size - round(tile_size * overlap))


def tile_starts(length: int, tile_size: int, overlap: float) -> list[int]:
    """Starts of the tiles along one side of ``length`` pixels: every ``stride_of`` pixels, and as many as
    it takes for the last tile to reach the end (a side no longer than a tile has one tile at 0)."""
    if length <= tile_size:
        return [0]
    stride = stride_of(tile_size, overlap)
    count = 1 + math.ceil((length - tile_size) / stride)
    return [i * stride for i in range(count)]


def tile_count(width: int, height: int, tile_size: int, overlap: float) -> int:
    """How many tiles :func:`tile_boxes` makes for a ``width`` x ``height`` image."""
    return len(tile_starts(width, tile_size, overlap)) * len(tile_starts(height, tile_size, overlap))


def tile_boxes(width: int, height: int, tile_size: int, overlap: float, edge: str) -> Iterator[Box]:
    """The tiles of a ``width`` x ``height`` image, row by row (``edge``: ``clip`` or ``pad``)."""
    if edge not in TILE_EDGES:
        raise ValueError(f"tiles.edge must be one of {TILE_EDGES}, got {edge!r}")
    for y in tile_starts(height, tile_size, overlap):
        for x in tile_starts(width, tile_size, overlap):
            if edge == "clip":
                yield Box(x, y, min(tile_size, width - x), min(tile_size, height - y))
            else:
                yield Box(x, y, tile_size, tile_size)


def tile_id_for(image_id: str, level: int, box: Box) -> str:
    """The stable id of a tile: 32 hex chars of sha256 over its image's id, level and box."""
    key = f"{image_id}/{level}/{box.x},{box.y},{box.width},{box.height}"
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:32]


def level_size(width: int, height: int, level: int) -> tuple[int, int]:
    """The size of pyramid ``level`` of a ``width`` x ``height`` image when the file does not say it: each
    level halves the previous one (rounding up), as TIFF pyramids and whole-slide formats do."""
    for _ in range(level):
        width, height = -(-width // 2), -(-height // 2)
    return width, height
