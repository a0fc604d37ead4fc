"""The tile table ``OUT/tiles/``: one row per tile of every tiled manifest row, written on Spark.

Order of work (:func:`write_tile_table`), none of it holding more than one partition's rows in a task:

1. the manifest's ok rows with a ``tiles`` count, read by tasks (``read_parquet_dataset``: a Delta manifest
   through its log), range-partitioned and sorted by ``image_id`` (``organize_spark._numbered``);
2. each image's first tile number: a running sum of ``tiles`` within its partition (a window partitioned by
   partition) plus the partition's offset (one total per partition reaches the driver);
3. tasks cut each image into its boxes (``contracts.tiles.tile_boxes``; the size of a pyramid level other
   than 0 is read from the TIFF's IFDs) and deal tile number ``g`` of ``T`` to shard ``g * S // T`` with
   ``S = ceil(T / rows_per_shard)``: shards differ by at most one tile, and an image's tiles sit in one or a
   few neighbouring shards (a decoder reading a whole JPEG once serves all of them);
4. written sorted by (shard, tile_id) into a staging folder, given a shard index keyed by ``tile_id``
   (``contracts.shard_index``), and moved to ``OUT/tiles/`` whole.

Cost: O(tiled images) rows read and sorted, O(tiles) rows written; the driver sees one number per partition.
"""
from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import pyarrow as pa

from imgfeat.metadata import storage
from imgfeat.metadata.config import TilesConfig
from imgfeat.metadata.contracts.shard_index import build_shard_index
from imgfeat.metadata.contracts.tiles import TILE_SCHEMA, Box, level_size, tile_boxes, tile_id_for, tiles_path

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_IMAGE_COLUMNS = ["image_id", "path", "format", "width", "height", "tiles", "label", "label_index", "split", "status"]


def level_dims(path: str, fmt: str | None, width: int, height: int, level: int) -> tuple[int, int]:
    """The size of pyramid ``level`` of the image at ``path``: from the TIFF's IFDs, else (level 0) as given."""
    if level == 0:
        return width, height
    if fmt == "tiff":
        from imgfeat.metadata.contracts.tiff_tiles import tiff_levels

        with fsspec.open(path, "rb") as f:
            chosen = tiff_levels(f)[level]
        return chosen.width, chosen.height
    return level_size(width, height, level)


def image_tiles(row: dict[str, Any], tiling: TilesConfig) -> list[tuple[str, Box]]:
    """``(tile_id, box)`` of every tile of the manifest ``row``, in grid order."""
    w, h = level_dims(row["path"], row["format"], row["width"], row["height"], tiling.level)
    return [(tile_id_for(row["image_id"], tiling.level, b), b)
            for b in tile_boxes(w, h, tiling.tile_size, tiling.overlap, tiling.edge)]


def _cut_task(tiling: TilesConfig, total: int, num_shards: int) -> Any:
    """The task that turns image rows (with ``_first``, their first tile number) into tile rows."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out: list[dict[str, Any]] = []
            for row in batch.to_pylist():
                tiles = image_tiles(row, tiling)
                if len(tiles) != row["tiles"]:  # the file changed since its check: its tiles are not trusted
                    raise ValueError(f"{row['path']}: {len(tiles)} tiles now, the manifest says {row['tiles']}; "
                                     "run `imgfeat manifest` again")
                for k, (tid, box) in enumerate(tiles):
                    g = row["_first"] + k
                    out.append({"tile_id": tid, "image_id": row["image_id"], "path": row["path"],
                                "format": row["format"], "level": tiling.level, "x": box.x, "y": box.y,
                                "width": box.width, "height": box.height, "label": row["label"],
                                "label_index": row["label_index"], "split": row["split"], "status": "ok",
                                "shard": g * num_shards // total})
            if out:
                yield pa.RecordBatch.from_pylist(out, schema=TILE_SCHEMA)

    return run


def write_tile_table(spark: SparkSession, manifest: str, out: str, tiling: TilesConfig, rows_per_shard: int,
                     partitions: int) -> dict[str, Any]:
    """Write ``OUT/tiles/`` for the tiled rows of the manifest dataset ``manifest`` (the published one) and
    return ``{"images", "tiles", "shards"}``; with no tiled rows, remove any ``OUT/tiles/`` left."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    from imgfeat.metadata.manifest.organize_spark import _number, _numbered, _offsets
    from imgfeat.metadata.spark.parquet import read_parquet_dataset, write_parquet_dataset

    url = tiles_path(out)
    frame = read_parquet_dataset(spark, manifest, None, partitions)
    if "tiles" not in frame.columns:
        storage.remove_folder(url)
        return {"images": 0, "tiles": 0, "shards": 0}
    images = frame.select(*_IMAGE_COLUMNS).where((F.col("status") == "ok") & F.col("tiles").isNotNull())
    numbered = _numbered(images, [F.col("image_id")], partitions).persist()
    try:
        per_part = numbered.groupBy("_p").agg(F.count(F.lit(1)).alias("n"), F.sum("tiles").alias("t")).collect()
        total = int(sum(r["t"] or 0 for r in per_part))
        n_images = int(sum(r["n"] for r in per_part))
        if not total:
            storage.remove_folder(url)
            return {"images": 0, "tiles": 0, "shards": 0}
        tile_offsets = _offsets([(r["_p"], int(r["t"] or 0)) for r in per_part])
        before = F.coalesce(F.sum("tiles").over(Window.partitionBy("_p").orderBy("_local")
                                                .rowsBetween(Window.unboundedPreceding, -1)), F.lit(0))
        first = _number(tile_offsets) - F.col("_local") + before
        num_shards = max(1, math.ceil(total / rows_per_shard))
        cut = numbered.select(*_IMAGE_COLUMNS, first.cast("long").alias("_first"))
        tiles_df = cut.mapInArrow(_cut_task(tiling, total, num_shards), from_arrow_schema(TILE_SCHEMA))
        tiles_df = tiles_df.repartitionByRange(max(1, min(partitions, num_shards)), "shard", "tile_id") \
            .sortWithinPartitions("shard", "tile_id")
        staging = storage.join(out, f"_tiles_staging-{uuid.uuid4().hex[:8]}")
        try:
            write_parquet_dataset(tiles_df, staging, schema=TILE_SCHEMA)
            build_shard_index(spark, staging, partitions, key="tile_id")
            storage.publish_folder(staging, url)
        finally:
            storage.remove_folder(staging)
    finally:
        numbered.unpersist()
    log.info("tiles: %d tiled images, %d tiles in %d shards -> %s", n_images, total, num_shards, url)
    return {"images": n_images, "tiles": total, "shards": num_shards}
