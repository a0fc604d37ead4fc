"""Which committed feature shards of a run folder no longer hold current features, and removing them.

``imgfeat run`` calls these around the manifest stage: shard numbers with no usable manifest row
(orphans), and after a full manifest rebuild, shards holding a file whose bytes changed. Costs: the
orphan check reads the manifest's shard index (one row per shard); the change check is a Spark join of
(image_id, content_hash) before and after, with only the changed shard numbers collected. No step holds
the manifest's rows on the driver.
"""
from __future__ import annotations

import logging

import fsspec
import pyarrow.compute as pc

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.schema import STATUS_OK, manifest_path, read_manifest
from imgfeat.metadata.contracts.shard_index import read_shard_index
from imgfeat.metadata.contracts.shards import FEATURES_SUMMARY, MARKER_SUFFIX, remove_shard, shard_stem
from imgfeat.metadata.storage import join, remove_folder

log = logging.getLogger(__name__)

SNAPSHOT_DIR = ".rebuild-hashes"
"""Inside the run folder: the (image_id, content_hash) of the ok rows before a full manifest rebuild."""


def part_files(features: str) -> list[str]:
    """Names of the shard files (``part-*``) in the feature folder; empty when there is none."""
    fs, path = fsspec.core.url_to_fs(features)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return [e.rsplit("/", 1)[-1] for e in fs.ls(path, detail=False) if e.rsplit("/", 1)[-1].startswith("part-")]


def marker_count(features: str) -> int:
    """Committed feature shards (markers) in the feature folder."""
    return sum(name.endswith(MARKER_SUFFIX) for name in part_files(features))


def _drop(features: str, stems: set[str]) -> list[str]:
    for stem in sorted(stems):
        remove_shard(features, stem)
    return sorted(stems)


def _usable_shards(run: str) -> set[int]:
    """Shard numbers with at least one ok row: from the shard index (O(shards)); a run folder made before
    the index existed is read by its shard column."""
    index = read_shard_index(run)
    if index is not None:
        return {s for s, n in zip(index["shard"].to_pylist(), index["rows"].to_pylist()) if n}
    table = read_manifest(run, columns=["shard"], filters=pc.field("status") == STATUS_OK)
    return set(pc.unique(table["shard"].drop_null()).to_pylist())


def remove_orphan_features(run: str, features: str) -> list[str]:
    """Remove the feature shards whose number has no usable row in the run's manifest; return their stems.

    They hold removed (or moved) files: ``read_features`` and pca would include them and ``imgfeat verify``
    rejects them."""
    files = part_files(features)
    if not files:
        return []
    wanted = {shard_stem(s) for s in _usable_shards(run)}
    orphans = _drop(features, {name.split(".", 1)[0] for name in files} - wanted)
    if orphans:
        log.info("featurize: removed %d feature shards no longer in the manifest (%s)", len(orphans), orphans[0])
    return orphans


def snapshot_hashes(cfg: Config, run: str, master: str | None = None) -> str:
    """Before a full manifest rebuild: the ok rows' (image_id, content_hash) written by Spark tasks to
    ``RUN/.rebuild-hashes``; returns its URL for ``remove_changed_features``."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.spark.parquet import read_parquet_dataset, write_parquet_dataset
    from imgfeat.metadata.spark.session import get_spark

    spark = get_spark(cfg.spark, master)
    url = join(run, SNAPSHOT_DIR)
    rows = (read_parquet_dataset(spark, manifest_path(run), columns=["image_id", "content_hash", "status"])
            .where(F.col("status") == STATUS_OK).select("image_id", "content_hash"))
    write_parquet_dataset(rows, url)
    return url


def remove_changed_features(cfg: Config, run: str, features: str, before: str, master: str | None = None) -> list[str]:
    """After a full manifest rebuild: remove the feature shards not in the new manifest, and those holding a
    file whose bytes differ from the snapshot ``before`` (``snapshot_hashes``); the snapshot is removed.

    A shard whose members are the same ids as before passes the marker's members check, so its features
    are reused only when every member still has the content they were computed from."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.spark.parquet import read_parquet_dataset
    from imgfeat.metadata.spark.session import get_spark

    orphans = remove_orphan_features(run, features)
    spark = get_spark(cfg.spark, master)
    after = (read_parquet_dataset(spark, manifest_path(run), columns=["image_id", "content_hash", "shard", "status"])
             .where(F.col("status") == STATUS_OK))
    old = read_parquet_dataset(spark, before).withColumnRenamed("content_hash", "content_hash_before")
    changed = (after.join(old, "image_id").where(~F.col("content_hash").eqNullSafe(F.col("content_hash_before")))
               .select("shard").where(F.col("shard").isNotNull()).distinct().collect())  # O(shards) rows
    stems = {shard_stem(r["shard"]) for r in changed}
    stale = _drop(features, stems & {name.split(".", 1)[0] for name in part_files(features)})
    remove_folder(before)
    if stale:
        log.info("featurize: removed %d feature shards whose files changed since they were computed", len(stale))
    return orphans + stale


def clear_features(features: str) -> list[str]:
    """Remove every feature shard and the featurize summary; return the removed stems."""
    stems = _drop(features, {name.split(".", 1)[0] for name in part_files(features)})
    summary = join(features, FEATURES_SUMMARY)
    fs, path = fsspec.core.url_to_fs(summary)
    if fs.exists(path):
        fs.rm(path)
    if stems:
        log.info("featurize: full manifest rebuild, removed %d feature shards to recompute", len(stems))
    return stems
