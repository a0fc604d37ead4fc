"""Join accounting: feature rows meet manifest rows by ``image_id``, and every row is counted.

A full outer join of the ids pass's feature rows with the manifest (read by tasks) puts every id in
one category: *matched* (a manifest row with features), *missing* (a manifest row without features,
with its reason: the manifest's status, the featurize reject, or not featurized) or *extra* (a
feature row without a manifest row). Ids in several feature rows keep their first copy (lowest
shard, row) and the others are counted as duplicates. All counts come from one aggregation job and
only they reach the driver; extra rows and duplicates are refused unless ``allow_extra``. The
counts are the ``rows`` object of the stage's summaries.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from imgfeat.metadata.contracts.schema import manifest_path, read_summary
from imgfeat.metadata.spark.parquet import read_parquet_dataset

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, Row, SparkSession

log = logging.getLogger(__name__)

MANIFEST_KEEP = ["image_id", "path", "label", "label_index", "split", "status"]
"""The manifest columns the join reads."""
_ROW_SPAN = 1 << 31
"""(shard_idx, row) packs into shard_idx * _ROW_SPAN + row (rows are int32)."""
_MANIFEST_ONLY_KEYS = ("manifest_rows", "without_features", "without_features_by_reason", "extra_feature_rows",
                       "matched_not_ok", "by_split")
"""Counts that only mean something with a manifest (dropped without one)."""


def read_manifest_df(spark: SparkSession, manifest: str) -> DataFrame:
    """The manifest under folder ``manifest`` as a DataFrame of :data:`MANIFEST_KEEP` (read by tasks)."""
    read_summary(manifest)  # a clear error when OUT holds no manifest
    return read_parquet_dataset(spark, manifest_path(manifest), columns=MANIFEST_KEEP)


def join_manifest(ids: DataFrame, man: DataFrame | None, allow_extra: bool,
                  rejects: int = 1) -> tuple[DataFrame, dict[str, Any], DataFrame]:
    """Full outer join of feature ids with the manifest: (matched rows, accounting, the persisted join).

    ``ids`` is the ids pass's DataFrame, ``rejects`` its number of reject rows (0 saves a shuffle).
    Without a manifest (``man`` None) every distinct feature id is matched. Ids present in several
    feature rows keep their first copy (lowest shard, row); the others are counted, and refused
    unless ``allow_extra``. All counts come from one aggregation job. Matched rows:
    ``image_id, shard_idx, row, path, label, label_index, split``.
    """
    from pyspark.sql import functions as F

    full = _categorized(ids, man, rejects)
    counts = (full.groupBy("_category", "_reason", "split", (F.col("status") == "ok").alias("_ok"))
              .agg(F.count(F.lit(1)).alias("n"), F.sum(F.coalesce(F.col("_copies"), F.lit(1)) - 1).alias("dups"),
                   F.sum((F.col("_copies") > 1).cast("int")).alias("dup_ids"))
              .collect())
    acc = _tally(counts, with_manifest=man is not None)
    problems = []
    if acc["duplicate_feature_rows"]:
        shards_hit = sorted(r[0] for r in ids.filter("kind = 'feature'").groupBy("image_id", "shard").count()
                            .join(full.filter("_copies > 1").select("image_id"), "image_id")
                            .select("shard").distinct().limit(10).collect())
        problems.append(f"{acc['duplicate_ids']} image id(s) appear in more than one feature row "
                        f"({acc['duplicate_feature_rows']} extra row(s), shards {', '.join(shards_hit)})")
    if acc.get("extra_feature_rows"):
        examples = [r[0] for r in full.filter("_category = 'extra'").select("image_id").limit(5).collect()]
        acc["extra_examples"] = examples
        problems.append(f"{acc['extra_feature_rows']} feature row(s) have no manifest row (e.g. {', '.join(examples)})")
    if problems:
        if not allow_extra:
            full.unpersist()
            raise ValueError("--features: " + "; ".join(problems) + "; pass --allow-extra (pca.allow_extra) to count "
                             "them and keep only the first copy of each manifest row")
        log.warning("%s; counted and dropped (allow_extra)", "; ".join(problems))
    matched = full.filter("_category = 'matched'").select("image_id", "shard_idx", "row", "path", "label",
                                                          "label_index", "split")
    return matched, acc, full


def _categorized(ids: DataFrame, man: DataFrame | None, rejects: int) -> DataFrame:
    """The persisted full outer join, one row per id, with ``_copies`` (feature rows of the id), ``_category``
    (matched, missing, extra) and ``_reason`` (why a manifest row has no features)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    # (shard_idx, row) packed into one long: a fixed-width minimum keeps this a (codegen) hash aggregate,
    # where a struct with a string made Spark sort every row twice.
    feats = (ids.filter("kind = 'feature'").groupBy("image_id")
             .agg(F.count(F.lit(1)).alias("_copies"),
                  F.min(F.col("shard_idx").cast("long") * F.lit(_ROW_SPAN) + F.col("row")).alias("_first"))
             .select("image_id", "_copies", (F.col("_first") / F.lit(_ROW_SPAN)).cast("int").alias("shard_idx"),
                     (F.col("_first") % F.lit(_ROW_SPAN)).cast("int").alias("row")))
    if man is None:
        full = feats.select("*", F.lit(True).alias("_in_manifest"), F.lit("ok").alias("status"),
                            *(F.lit(None).cast(t).alias(c) for c, t in
                              (("path", "string"), ("label", "string"), ("label_index", "int"), ("split", "string"),
                               ("reject_reason", "string"))))
    else:
        m = man.select("image_id", "path", "label", "label_index", "split", "status", F.lit(True).alias("_in_manifest"))
        full = feats.join(m, "image_id", "full_outer")
        if rejects:  # the featurize reasons of manifest rows without features (a shuffle saved when there are none)
            rej = (ids.filter("kind = 'reject' AND image_id IS NOT NULL")
                   .groupBy("image_id").agg(F.min("reason").alias("reject_reason")))
            full = full.join(rej, "image_id", "left_outer")
        else:
            full = full.withColumn("reject_reason", F.lit(None).cast("string"))
    category = (F.when(F.col("_in_manifest").isNull(), F.lit("extra"))
                .when(F.col("shard_idx").isNull(), F.lit("missing")).otherwise(F.lit("matched")))
    reason = (F.when(F.col("status") != "ok", F.concat(F.lit("manifest:"), F.col("status")))
              .when(F.col("reject_reason").isNotNull(), F.concat(F.lit("featurize:"), F.col("reject_reason")))
              .otherwise(F.lit("not_featurized")))
    return full.withColumn("_category", category).withColumn(
        "_reason", F.when(F.col("_category") == "missing", reason)).persist(StorageLevel.MEMORY_AND_DISK)


def _tally(counts: list[Row], with_manifest: bool = True) -> dict[str, Any]:
    """The accounting from the aggregated rows ``(_category, _reason, split, _ok, n, dups, dup_ids)``.

    Keys: ``manifest_rows``, ``with_features``, ``without_features`` (and ``..._by_reason``),
    ``extra_feature_rows``, ``duplicate_feature_rows``, ``duplicate_ids``, ``matched_not_ok``,
    ``by_split``, ``feature_rows``; without a manifest only ``with_features``, the duplicate counts and
    ``feature_rows``.
    """
    acc: dict[str, Any] = {"manifest_rows": 0, "with_features": 0, "without_features": 0, "without_features_by_reason": {},
                           "extra_feature_rows": 0, "duplicate_feature_rows": 0, "duplicate_ids": 0, "matched_not_ok": 0,
                           "by_split": {}}
    for r in counts:
        cat, n = r["_category"], int(r["n"])
        acc["duplicate_feature_rows"] += int(r["dups"] or 0)
        acc["duplicate_ids"] += int(r["dup_ids"] or 0)
        if cat == "extra":
            acc["extra_feature_rows"] += n
            continue
        acc["manifest_rows"] += n
        if cat == "matched":
            acc["with_features"] += n
            split = r["split"] if r["split"] is not None else ""
            acc["by_split"][split] = acc["by_split"].get(split, 0) + n
            if r["_ok"] is False:
                acc["matched_not_ok"] += n
        else:
            acc["without_features"] += n
            reasons = acc["without_features_by_reason"]
            reasons[r["_reason"]] = reasons.get(r["_reason"], 0) + n
    acc["feature_rows"] = acc["with_features"] + acc["extra_feature_rows"] + acc["duplicate_feature_rows"]
    if not with_manifest:
        for key in _MANIFEST_ONLY_KEYS:
            acc.pop(key)
    return acc
