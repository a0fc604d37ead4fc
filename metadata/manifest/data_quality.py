"""Data-quality figures of the checked rows for the manifest summary: quality outliers and near-duplicates.

Both run on Spark over the check job's output, before organize, and bring only aggregates to the driver:

* ``quality_summary``: per signal (``image_signals``) the number of ``ok`` rows past its outlier threshold
  (``image_signals.OUTLIER_THRESHOLDS``), the smallest such path as an example, and percentiles of each
  signal (one aggregation job; Spark's approximate percentiles, 1% accuracy).
* ``near_duplicate_summary``: exact duplicates collapsed to their original (``groupBy(content_hash)``),
  then ``near_duplicates.near_duplicate_search`` over the originals' perceptual hashes (its materialized
  groups carry each member's and representative's path and content hash): the number of groups and
  members and a few (member, representative) path pairs, and the near-duplicate map that organize reads
  (label conflicts and crossing splits are counted there, where splits are known), both written or taken
  from those groups with no join back to the originals.

Cost: one scan of the checked rows each, the shuffles of the near-duplicate search (see
``near_duplicates``), and at most ``EXAMPLES`` rows per list to the driver.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from imgfeat.metadata.manifest.image_signals import OUTLIER_THRESHOLDS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

EXAMPLES = 5
"""Example paths per list in the summary."""


def _outlier_conditions() -> dict[str, Column]:
    from pyspark.sql import functions as F

    t = OUTLIER_THRESHOLDS
    return {
        "blurry": F.col("blur") < t["blur_below"],
        "dark": F.col("brightness") < t["brightness_below"],
        "bright": F.col("brightness") > t["brightness_above"],
        "low_contrast": F.col("contrast") < t["contrast_below"],
        "low_entropy": F.col("entropy") < t["entropy_below"],
    }


def quality_summary(checked: DataFrame) -> dict[str, Any]:
    """Outlier counts, examples and signal percentiles of the ``ok`` rows of ``checked`` that have signals."""
    from pyspark.sql import functions as F

    ok = checked.where((F.col("status") == "ok") & F.col("phash").isNotNull())
    conds = _outlier_conditions()
    aggs = [F.count(F.lit(1)).alias("_n")]
    for name, cond in conds.items():
        aggs += [F.sum(F.when(cond, 1).otherwise(0)).alias(f"n_{name}"), F.min(F.when(cond, F.col("path"))).alias(f"x_{name}")]
    for col in ("blur", "brightness", "contrast", "entropy"):
        aggs.append(F.percentile_approx(col, [0.01, 0.5, 0.99], 100).alias(f"p_{col}"))
    row = ok.agg(*aggs).first()
    if row is None or not row["_n"]:
        return {"rows": 0, "thresholds": dict(OUTLIER_THRESHOLDS), "outliers": {}, "examples": {}, "percentiles": {}}
    return {
        "rows": int(row["_n"]),
        "thresholds": dict(OUTLIER_THRESHOLDS),
        "outliers": {name: int(row[f"n_{name}"] or 0) for name in conds},
        "examples": {name: row[f"x_{name}"] for name in conds if row[f"x_{name}"] is not None},
        "percentiles": {col: dict(zip(("p1", "p50", "p99"), (round(float(v), 3) for v in row[f"p_{col}"])))
                        for col in ("blur", "brightness", "contrast", "entropy") if row[f"p_{col}"] is not None},
    }


def near_duplicate_summary(spark: SparkSession, checked: DataFrame, distance: int,
                           scratch: str, max_pairs: int | None = None) -> tuple[dict[str, Any], str]:
    """Near-duplicate groups among the ``ok`` rows of ``checked`` (exact duplicates counted with their
    original): the summary's counts and example pairs, and the URL of the near-duplicate map under
    ``scratch`` (``organize.NEAR_SCHEMA``: per member original, its representative), which organize
    reads to keep each group in one split. ``max_pairs``: search at the largest distance up to ``distance``
    whose band join makes at most that many candidate pairs (``near_duplicates.fitting_distance``)."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.near_duplicates import materialize, near_duplicate_search
    from imgfeat.metadata.manifest.organize import NEAR_SCHEMA
    from imgfeat.metadata.spark.parquet import write_parquet_dataset
    from imgfeat.metadata.storage import join

    ok = checked.where((F.col("status") == "ok") & F.col("content_hash").isNotNull())
    # Read twice by the search (its hash table, its rows' join): computed once (Parquet under scratch).
    originals = materialize(ok.groupBy("content_hash").agg(F.min(F.struct("path", "image_id", "phash")).alias("f"))
                            .select("content_hash", "f.*"), scratch, "originals")
    # The groups carry each member's and its representative's path and content hash: no join back.
    found = near_duplicate_search(spark, originals, distance, scratch, max_pairs=max_pairs,
                                  carry=("path", "content_hash"))
    if found.distance < distance:
        log.warning("near duplicates: distance %d would make more than %d candidate pairs "
                    "(manifest.near_duplicate_max_pairs); searched at distance %d (%d pairs)",
                    distance, max_pairs, found.distance, found.candidate_pairs)
    url = join(scratch, "near_map")
    write_parquet_dataset(found.groups.select("content_hash", F.col("rep_content_hash").alias("rep_hash"),
                                              F.col("near_duplicate_of").alias("rep_id"), "rep_path"),
                          url, schema=NEAR_SCHEMA)
    examples = found.groups.orderBy("path").select("path", "rep_path").limit(EXAMPLES).collect()
    return {"distance": found.distance, "requested_distance": distance,
            "candidate_pairs": found.candidate_pairs, **found.counts,
            "examples": [{"path": r["path"], "near_duplicate_of": r["rep_path"]} for r in examples]}, url
