"""Data-quality figures of the checked rows for the manifest summary: quality outliers and near-duplicates.

Both run on Spark over the check job's output, before organize, and bring only aggregates to the driver:

* ``quality_summary``: per signal (``image_signals``) the number of ``ok`` rows past its outlier threshold
  (``image_signals.OUTLIER_THRESHOLDS``), the smallest such path as an example, and percentiles of each
  signal (one aggregation job; Spark's approximate percentiles, 1% accuracy).
* ``near_duplicate_summary``: exact duplicates collapsed to their original (``groupBy(content_hash)``),
  then ``near_duplicates.near_duplicate_groups`` over the originals' perceptual hashes: the number of
  groups and members and a few (member, representative) path pairs; and the near-duplicate map that
  organize reads (label conflicts and crossing splits are counted there, where splits are known).

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


def candidate_pairs_at(hashes: DataFrame, distance: int) -> int:
    """How many candidate pairs the band join of the distinct ``phash`` values of ``hashes`` makes at
    ``distance``: the sum of n(n-1)/2 over its (band, value) buckets, one aggregation job (``B·U`` rows
    shuffled with partial counts; one number to the driver)."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.near_duplicates import band_key_rows

    if distance == 0:
        return 0
    sizes = band_key_rows(hashes.select("phash"), distance).groupBy("band", "value").agg(F.count(F.lit(1)).alias("n"))
    row = sizes.agg(F.sum(F.col("n") * (F.col("n") - 1) / 2).alias("p")).first()
    return int(row["p"] or 0) if row is not None else 0


def fitting_distance(hashes: DataFrame, requested: int, max_pairs: int) -> tuple[int, int]:
    """The largest distance up to ``requested`` whose band join makes at most ``max_pairs`` candidate
    pairs, and that count (``hashes``: distinct ``phash`` values). Fewer bits of distance mean fewer,
    wider bands, so the count falls steeply (for U uniform hashes about (d+1)·U²/2^(64/(d+1)+1))."""
    for distance in range(requested, -1, -1):
        pairs = candidate_pairs_at(hashes, distance)
        if pairs <= max_pairs:
            return distance, pairs
    return 0, 0


def near_duplicate_summary(spark: SparkSession, checked: DataFrame, distance: int,
                           scratch: str, max_pairs: int | None = None) -> tuple[dict[str, Any], str]:
    """Near-duplicate groups among the ``ok`` rows of ``checked`` (exact duplicates counted with their
    original): the summary's counts and example pairs, and the URL of the near-duplicate map under
    ``scratch`` (``organize.NEAR_SCHEMA``: per member original, its representative), which organize
    reads to keep each group in one split."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.near_duplicates import materialize, near_duplicate_counts, near_duplicate_groups
    from imgfeat.metadata.manifest.organize import NEAR_SCHEMA
    from imgfeat.metadata.spark.parquet import write_parquet_dataset
    from imgfeat.metadata.storage import join

    ok = checked.where((F.col("status") == "ok") & F.col("content_hash").isNotNull())
    # Read by several jobs below: computed once (Parquet under scratch).
    originals = materialize(ok.groupBy("content_hash").agg(F.min(F.struct("path", "image_id", "phash")).alias("f"))
                            .select("content_hash", "f.*"), scratch, "originals")
    requested, candidates = distance, None
    if max_pairs is not None:
        hashes = originals.where(F.col("phash").isNotNull()).select("phash").distinct()
        distance, candidates = fitting_distance(hashes, requested, max_pairs)
        if distance < requested:
            log.warning("near duplicates: distance %d would make more than %d candidate pairs "
                        "(manifest.near_duplicate_max_pairs); searched at distance %d (%d pairs)",
                        requested, max_pairs, distance, candidates)
    groups = materialize(near_duplicate_groups(spark, originals.select("image_id", "path", "phash"), distance, scratch),
                         scratch, "groups")
    counts = near_duplicate_counts(groups)
    reps = originals.select(F.col("image_id").alias("near_duplicate_of"), F.col("content_hash").alias("rep_hash"),
                            F.col("path").alias("rep_path"))
    pairs = groups.join(originals.select("image_id", "content_hash", "path"), "image_id").join(reps, "near_duplicate_of")
    url = join(scratch, "near_map")
    write_parquet_dataset(pairs.select("content_hash", "rep_hash", F.col("near_duplicate_of").alias("rep_id"), "rep_path"),
                          url, schema=NEAR_SCHEMA)
    examples = [(r["path"], r["rep_path"]) for r in pairs.orderBy("path").select("path", "rep_path").limit(EXAMPLES).collect()]
    return {"distance": distance, "requested_distance": requested, "candidate_pairs": candidates, **counts,
            "examples": [{"path": p, "near_duplicate_of": q} for p, q in examples]}, url
