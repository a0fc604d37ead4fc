"""A Dataset over tile rows (``contracts.tiles``): each item is one tile's box of its image, resized as an image.

Rows are the tile table's as featurize reads them (``featurize.assign``: ``image_id`` is the tile's id,
``tile_of`` its image's; ``level, x, y, width, height`` its box). How a box is read:

* a TIFF: ``contracts.tiff_tiles.TiffRegionReader`` decodes only the TIFF tiles the box touches, so a
  worker holds a few tiles, never the image (whatever its size); the file stays open, its IFDs parsed once,
  while the next rows are boxes of the same file;
* another format (JPEG, PNG, ...), which has no random access: the image is decoded whole (within the
  ``[decode]`` caps) once and kept while the next rows are tiles of the same image; tile rows are sorted
  by shard, and the tile table deals an image's tiles to neighbouring shards, so a worker decodes each
  image about once per shard it meets.

A box reaching past the image (``tiles.edge = "pad"``) is padded with black on its right and bottom. A
failed read is that tile's reject (reason codes as for images), never the worker's end.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.feature_store import TILE_DTYPE
from imgfeat.metadata.contracts.tiff_tiles import TiffRegionReader, TiffTileError
from imgfeat.preprocess.dataset import ManifestDataset, _column, decode_rgb
from imgfeat.preprocess.decode import DecodeError

BOX_COLUMNS = ("level", "x", "y", "width", "height")
SEGMENT_CACHE_BYTES = 64 * 1024 * 1024
"""Decoded TIFF tiles a worker keeps (about a row of 512 px RGB tiles across 40,000 px): overlapping boxes read
in row order decode each TIFF tile about once (bench/RESULTS-tiles.md)."""


def _padded(region: np.ndarray, width: int, height: int) -> np.ndarray:
    """``region`` (the box clipped to the image) on a black ``height`` x ``width`` canvas, top-left aligned."""
    if region.shape[:2] == (height, width):
        return np.ascontiguousarray(region)
    canvas = np.zeros((height, width, 3), np.uint8)
    h, w = min(height, region.shape[0]), min(width, region.shape[1])
    canvas[:h, :w] = region[:h, :w]
    return canvas


def _as_decode_error(exc: Exception) -> DecodeError:
    if isinstance(exc, TiffTileError):
        return DecodeError(exc.reason, exc.detail)
    return DecodeError("unreadable", f"read failed: {getattr(exc, 'strerror', None) or exc}")


class TileDataset(ManifestDataset):
    """Tile rows -> ``(uint8 [3,size,size], index, ok, reason)``, as :class:`ManifestDataset` for images."""

    def __init__(self, rows: pa.Table | Sequence[dict[str, Any]], cfg: PreprocessConfig, size: int | None = None,
                 policy: str | None = None, resize_shorter: int | None = None,
                 limits: DecodeConfig | None = None) -> None:
        super().__init__(rows, cfg, size, policy, resize_shorter, limits)
        self.formats: list[str | None] = _column(rows, "format")
        self.tile_of: list[str] = [str(v) for v in _column(rows, "tile_of")]
        self.boxes = np.array([_column(rows, c) for c in BOX_COLUMNS], dtype=np.int64).T.reshape(-1, 5)
        self._whole: tuple[str, np.ndarray] | None = None
        self._tiff: tuple[str, TiffRegionReader] | None = None
        self.segment_cache_bytes = SEGMENT_CACHE_BYTES

    def tile_records(self, rows: np.ndarray) -> np.ndarray:
        """``feature_store.TILE_DTYPE`` records (image id and box) of the tiles at positions ``rows``."""
        out = np.zeros(len(rows), TILE_DTYPE)
        out["tile_of"] = [self.tile_of[i] for i in rows]
        for k, name in enumerate(BOX_COLUMNS):
            out[name] = self.boxes[rows, k]
        return out

    def _tiff_reader(self, path: str) -> TiffRegionReader:
        """The open reader of ``path`` (the previous file's is closed first)."""
        if self._tiff is not None and self._tiff[0] == path:
            return self._tiff[1]
        self.close_files()
        reader = TiffRegionReader(fsspec.open(path, "rb").open, cache_bytes=self.segment_cache_bytes)
        self._tiff = (path, reader)
        return reader

    def close_files(self) -> None:
        """Close the TIFF this dataset keeps open (it is reopened when needed)."""
        if self._tiff is not None:
            self._tiff[1].close()
            self._tiff = None

    def __getstate__(self) -> dict[str, Any]:
        # Open files and decoded images never cross a process boundary: each worker opens its own.
        return {**self.__dict__, "_whole": None, "_tiff": None}

    def decode(self, i: int) -> np.ndarray:
        """Tile ``i``'s pixels at its box size (before the resize); raises DecodeError."""
        level, x, y, width, height = (int(v) for v in self.boxes[i])
        path = self.paths[i]
        if self.formats[i] == "tiff":
            try:
                return _padded(self._tiff_reader(path).read(level, x, y, width, height), width, height)
            except (TiffTileError, OSError) as exc:
                self.close_files()
                raise _as_decode_error(exc) from None
        if level:
            raise DecodeError("undecodable", f"pyramid level {level} does not exist ({self.formats[i]} has one level)")
        if self._whole is None or self._whole[0] != path:
            self._whole = None  # the previous image goes before the next is decoded
            full = decode_rgb(path, self.cfg, 0, "resize", 0, self.limits)
            self._whole = (path, full)
        return _padded(self._whole[1][y:y + height, x:x + width], width, height)


def read_tile_rows(out: str, split: str | None = None) -> pa.Table:
    """The tile table's ok rows of the manifest folder ``out`` as the tile datasets read them (``tile_id`` as
    ``image_id``, the image's id as ``tile_of``), of ``split`` when given, sorted by (shard, tile id)."""
    import pyarrow.dataset as pads

    from imgfeat.metadata.contracts.tiles import tiles_path

    url = tiles_path(out)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ValueError(f"--manifest {out}: no tile table at {url}; run `imgfeat manifest` with [tiles] enabled = true")
    expr = pads.field("status") == "ok"
    if split:
        expr = expr & (pads.field("split") == split)
    return as_tile_rows(pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."]).to_table(filter=expr))


def as_tile_rows(table: pa.Table) -> pa.Table:
    """Tile table rows as the tile datasets read them: ``tile_id`` renamed ``image_id`` (the key of every feature
    or prep shard), the image's ``image_id`` renamed ``tile_of``; in reading order: by shard, then image and box
    row by row, so a worker reads neighbouring boxes of one file in turn (its open file and decoded TIFF tiles
    serve the next box)."""
    renamed = {"image_id": "tile_of", "tile_id": "image_id"}
    table = table.rename_columns([renamed.get(c, c) for c in table.column_names])
    return table.sort_by([("shard", "ascending"), ("tile_of", "ascending"), ("level", "ascending"),
                          ("y", "ascending"), ("x", "ascending")])
