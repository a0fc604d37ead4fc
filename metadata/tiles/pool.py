"""``imgfeat pool-tiles``: one vector per tiled image, the mean of its tiles' features, on Spark.

Order of work (:func:`pool_tiles`):

1. tasks read the committed tile feature shards (``pca.shard_io.features_dataframe``: each verifies and reads
   its own shards) and the tile table's ``(tile_id, image_id)``; a join by ``tile_id`` names each feature's
   image (a shuffle of both sides: nothing is broadcast or collected);
2. each task sums the vectors of every image it holds (numpy, float64) and emits one partial row per image;
   the tile table deals an image's tiles to neighbouring shards, so an image has few partials;
3. ``groupBy(image_id)`` adds the partials (``applyInPandas``: one group holds an image's partials, not its
   tiles) and divides by the tile count; written as Parquet ``POOLED/`` (``image_id, tiles, features``).

Cost: O(tiles x d) read once by tasks; O(tiled images x partials per image x d) shuffled; the driver sees the
file listing and the markers. Tiles rejected by featurize are left out of the mean (``tiles`` is the number
that went in).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.tiles import tiles_path
from imgfeat.metadata.storage import join, write_json_atomic

log = logging.getLogger(__name__)

POOLED_SCHEMA = pa.schema([("image_id", pa.string()), ("tiles", pa.int64()), ("features", pa.list_(pa.float32()))])
POOLED_SUMMARY = "_pooled.json"
"""The job's summary inside ``POOLED/`` (a leading ``_``: Parquet readers of the folder skip it)."""
_PARTIAL_DDL = "image_id string, tiles long, features array<double>"


def _partial_sums(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Rows ``(image_id, features)`` -> one ``(image_id, tiles, sum)`` per image of each batch."""
    for batch in batches:
        if not batch.num_rows:
            continue
        ids = np.asarray(batch.column(0).to_pylist(), dtype=object)
        lists = batch.column(1)
        d = len(lists[0].as_py()) if len(lists) else 0
        vecs = np.asarray(lists.flatten().to_numpy(zero_copy_only=False), np.float64).reshape(-1, d)
        names, inverse = np.unique(ids, return_inverse=True)
        sums = np.zeros((len(names), d), np.float64)
        np.add.at(sums, inverse, vecs)
        counts = np.bincount(inverse, minlength=len(names))
        flat = pa.array(sums.reshape(-1))
        offsets = pa.array(np.arange(0, len(names) * d + 1, d, dtype=np.int32))
        yield pa.RecordBatch.from_arrays([pa.array(names.tolist(), pa.string()), pa.array(counts, pa.int64()),
                                          pa.ListArray.from_arrays(offsets, flat)], names=["image_id", "tiles", "features"])


def _mean(frame: Any) -> Any:
    """One image's partial rows (a pandas frame) -> its mean vector."""
    import pandas as pd

    total = np.sum(np.stack(frame["features"].to_numpy()), axis=0)
    n = int(frame["tiles"].sum())
    return pd.DataFrame({"image_id": [frame["image_id"].iloc[0]], "tiles": [n],
                         "features": [(total / n).astype(np.float32)]})


def pool_tiles(cfg: Config, manifest: str, features: str, out: str, master: str | None = None) -> dict[str, Any]:
    """Write ``out`` (Parquet, ``POOLED_SCHEMA``): per tiled image of the manifest at ``manifest``, the mean of
    its tile features in ``features`` (from ``imgfeat featurize --tiles``); returns the summary."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.pca.shard_io import features_dataframe
    from imgfeat.metadata.spark.parquet import read_parquet_dataset, write_parquet_dataset
    from imgfeat.metadata.spark.session import get_spark, num_tasks

    spark = get_spark(cfg.spark, master)
    parts = num_tasks(spark, cfg.spark)
    feats = features_dataframe(spark, features, num_partitions=parts).select(F.col("image_id").alias("tile_id"), "features")
    tiles = read_parquet_dataset(spark, tiles_path(manifest), ["tile_id", "image_id"], parts)
    joined = feats.join(tiles, "tile_id").select("image_id", "features")
    partial = joined.mapInArrow(_partial_sums, _PARTIAL_DDL)
    pooled = partial.groupBy("image_id").applyInPandas(_mean, "image_id string, tiles long, features array<float>")
    written = write_parquet_dataset(pooled, out, schema=POOLED_SCHEMA)
    summary = {"manifest": manifest, "features": features, "images": written["rows"], "pooling": "mean"}
    write_json_atomic(join(out, POOLED_SUMMARY), summary)
    log.info("pool-tiles: %d images -> %s", written["rows"], out)
    return summary
