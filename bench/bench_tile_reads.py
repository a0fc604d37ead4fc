"""Tile reads of a tiled TIFF: rows in hash order or in image/box order, with and without the decoded-segment cache.

    .venv/bin/python bench/bench_tile_reads.py [--side 8192] [--repeats 2]

Writes a ``--side`` square JPEG-tiled pyramidal TIFF (512 px tiles, a mosaic of the shared Fruits-360 photos,
``bench/make_gigapixel.py``) in a temporary folder, cuts it into the default grid (512 px, overlap 0.1, pad) and
times ``TileDataset.decode`` over every tile (no model, one process; best of ``--repeats``), for the four
combinations of row order and cache. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.make_gigapixel import load_photos, synthetic_photos, write_mosaic_tiff  # noqa: E402
from imgfeat.metadata.config import PreprocessConfig  # noqa: E402
from imgfeat.metadata.contracts.tiles import tile_boxes, tile_id_for  # noqa: E402
from imgfeat.preprocess.tile_dataset import SEGMENT_CACHE_BYTES, TileDataset, as_tile_rows  # noqa: E402

FRUITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "fruits360-100")


def tile_table(path: str, side: int) -> pa.Table:
    """The tile table's columns for the default grid of one ``side`` x ``side`` TIFF."""
    boxes = list(tile_boxes(side, side, 512, 0.1, "pad"))
    n = len(boxes)
    return pa.table({"tile_id": [tile_id_for("img", 0, b) for b in boxes], "image_id": ["img"] * n, "path": [path] * n,
                     "format": ["tiff"] * n, "level": [0] * n, "x": [b.x for b in boxes], "y": [b.y for b in boxes],
                     "width": [b.width for b in boxes], "height": [b.height for b in boxes], "shard": [0] * n})


def tiles_per_s(rows: pa.Table, cache_bytes: int, repeats: int) -> float:
    ds = TileDataset(rows, PreprocessConfig())
    ds.segment_cache_bytes = cache_bytes
    best = float("inf")
    for _ in range(repeats):
        ds.close_files()
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds.decode(i)
        best = min(best, time.perf_counter() - t0)
    ds.close_files()
    return len(ds) / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    photos = load_photos(FRUITS, limit=64) if os.path.isdir(FRUITS) else synthetic_photos(64)
    with tempfile.TemporaryDirectory(prefix="imgfeat-tile-reads-") as tmp:
        path = os.path.join(tmp, "mosaic.tif")
        write_mosaic_tiff(path, args.side, args.side, photos, tile=512)
        table = tile_table(path, args.side)
        hashed = as_tile_rows(table).sort_by("image_id")  # the order of the tile ids (hashes)
        ordered = as_tile_rows(table)
        print(f"{args.side}x{args.side} JPEG-tiled TIFF, {table.num_rows} tiles of 512 px (overlap 0.1), load "
              f"{os.getloadavg()[0]:.1f}\n\n| row order | segment cache | tiles/s |\n|---|---|---:|")
        for name, rows in (("tile id (hash)", hashed), ("image, then box row by row", ordered)):
            for cache in (0, SEGMENT_CACHE_BYTES):
                rate = tiles_per_s(rows, cache, args.repeats)
                print(f"| {name} | {cache >> 20} MiB | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
