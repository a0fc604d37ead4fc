"""Data-quality figures of the checked rows for the manifest summary: quality outliers and near-duplicates.

Each comes twice: on Spark over the check job's output, before organize, bringing only aggregates to the
driver; and on an Arrow table in one task (``quality_summary_table``, ``near_duplicate_summary_table``), for
the manifest's one-task organize (up to ``job.ONE_TASK_ROWS`` rows), which holds every checked row anyway:
there the Spark jobs' fixed costs were most of the time (camera-size photos, 59,392 files, 2 cores: 11-13 s
of Spark jobs against about 1 s in the task; bench/RESULTS-quality-cost.md). Same keys and values (the
tests hold the two paths equal), but the percentiles, exact in one task and within 1 % of rank on Spark:

* ``originals`` (Spark): the ``ok`` rows, each content hash once at its smallest path (an exact duplicate is
  the same picture, counted once by both summaries): one ``groupBy(content_hash)`` shuffle, materialized,
  read by both summaries below.
* ``quality_summary``: per signal (``image_signals``) the number of ``ok`` images past its outlier threshold
  (``image_signals.OUTLIER_THRESHOLDS``), the smallest such path as an example, and percentiles of each
  signal, over the originals (one aggregation job; Spark's approximate percentiles, 1% accuracy).
* ``near_duplicate_summary``: ``near_duplicates.near_duplicate_search`` over the originals' perceptual
  hashes (its materialized
  groups carry each member's and representative's path and content hash): the number of groups and
  members and a few (member, representative) path pairs, and the near-duplicate map that organize reads
  (label conflicts and crossing splits are counted there, where splits are known), both written or taken
  from those groups with no join back to the originals.

Cost on Spark: one scan and one shuffle of the checked rows (``originals``), one scan of the originals per
summary, the shuffles of the near-duplicate search (see ``near_duplicates``), and at most ``EXAMPLES`` rows
per list to the driver.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from imgfeat.metadata.manifest.image_signals import OUTLIER_THRESHOLDS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

EXAMPLES = 5
"""Example paths per list in the summary."""


_OUTLIERS: dict[str, tuple[str, str, str]] = {
    "blurry": ("blur", "<", "blur_below"),
    "dark": ("brightness", "<", "brightness_below"),
    "bright": ("brightness", ">", "brightness_above"),
    "low_contrast": ("contrast", "<", "contrast_below"),
    "low_entropy": ("entropy", "<", "entropy_below"),
}
"""Each outlier: (signal column, comparison, its threshold's key in ``OUTLIER_THRESHOLDS``)."""

_SIGNALS = ("blur", "brightness", "contrast", "entropy")
_PERCENTILES = (("p1", 0.01), ("p50", 0.5), ("p99", 0.99))


def _outlier_conditions() -> dict[str, Column]:
    from pyspark.sql import functions as F

    return {name: (F.col(col) < OUTLIER_THRESHOLDS[key]) if op == "<" else (F.col(col) > OUTLIER_THRESHOLDS[key])
            for name, (col, op, key) in _OUTLIERS.items()}


def _empty_quality() -> dict[str, Any]:
    return {"rows": 0, "thresholds": dict(OUTLIER_THRESHOLDS), "outliers": {}, "examples": {}, "percentiles": {}}


def originals(checked: DataFrame, scratch: str | None) -> DataFrame:
    """The ``ok`` rows of ``checked`` with a content hash, each content hash once at its smallest path
    (``content_hash, path, image_id, phash`` and the signals): the one ``groupBy(content_hash)`` shuffle that
    both summaries read, materialized (Parquet ``scratch/originals``; a local checkpoint without ``scratch``)."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.near_duplicates import materialize

    ok = checked.where((F.col("status") == "ok") & F.col("content_hash").isNotNull())
    first = F.min(F.struct("path", "image_id", "phash", *_SIGNALS)).alias("f")
    return materialize(ok.groupBy("content_hash").agg(first).select("content_hash", "f.*"), scratch, "originals")


def quality_summary(originals: DataFrame) -> dict[str, Any]:
    """Outlier counts, examples and signal percentiles of the images of ``originals`` (``originals``: exact
    duplicates counted once) that have signals."""
    from pyspark.sql import functions as F

    ok = originals.where(F.col("phash").isNotNull())
    conds = _outlier_conditions()
    aggs = [F.count(F.lit(1)).alias("_n")]
    for name, cond in conds.items():
        aggs += [F.sum(F.when(cond, 1).otherwise(0)).alias(f"n_{name}"), F.min(F.when(cond, F.col("path"))).alias(f"x_{name}")]
    for col in _SIGNALS:
        aggs.append(F.percentile_approx(col, [q for _, q in _PERCENTILES], 100).alias(f"p_{col}"))
    row = ok.agg(*aggs).first()
    if row is None or not row["_n"]:
        return _empty_quality()
    return {
        "rows": int(row["_n"]),
        "thresholds": dict(OUTLIER_THRESHOLDS),
        "outliers": {name: int(row[f"n_{name}"] or 0) for name in conds},
        "examples": {name: row[f"x_{name}"] for name in conds if row[f"x_{name}"] is not None},
        "percentiles": {col: dict(zip((k for k, _ in _PERCENTILES), (round(float(v), 3) for v in row[f"p_{col}"])))
                        for col in _SIGNALS if row[f"p_{col}"] is not None},
    }


def near_duplicate_summary(spark: SparkSession, originals: DataFrame, distance: int,
                           scratch: str, max_pairs: int | None = None) -> tuple[dict[str, Any], str]:
    """Near-duplicate groups among ``originals`` (``originals``: exact duplicates stand for their copies):
    the summary's counts and example pairs, and the URL of the near-duplicate map under
    ``scratch`` (``organize.NEAR_SCHEMA``: per member original, its representative), which organize
    reads to keep each group in one split. ``max_pairs``: search at the largest distance up to ``distance``
    whose band join makes at most that many candidate pairs (``near_duplicates.fitting_distance``)."""
    from pyspark.sql import functions as F

    from imgfeat.metadata.manifest.near_duplicates import near_duplicate_search
    from imgfeat.metadata.manifest.organize import NEAR_SCHEMA
    from imgfeat.metadata.spark.parquet import write_parquet_dataset
    from imgfeat.metadata.storage import join

    originals = originals.select("content_hash", "path", "image_id", "phash")
    # The groups carry each member's and its representative's path and content hash: no join back.
    found = near_duplicate_search(spark, originals, distance, scratch, max_pairs=max_pairs,
                                  carry=("path", "content_hash"))
    url = join(scratch, "near_map")
    write_parquet_dataset(found.groups.select("content_hash", F.col("rep_content_hash").alias("rep_hash"),
                                              F.col("near_duplicate_of").alias("rep_id"), "rep_path"),
                          url, schema=NEAR_SCHEMA)
    examples = found.groups.orderBy("path").select("path", "rep_path").limit(EXAMPLES).collect()
    return {"distance": found.distance, "requested_distance": distance,
            "candidate_pairs": found.candidate_pairs, **found.counts,
            "examples": [{"path": r["path"], "near_duplicate_of": r["rep_path"]} for r in examples]}, url


def _percentile(values: np.ndarray, q: float) -> float:
    """The smallest value whose rank is at least ``q`` of ``values`` (sorted): what ``percentile_approx``
    approximates (its rank ``ceil(q * n)``), exactly."""
    return float(values[max(math.ceil(q * len(values)) - 1, 0)])


def _originals_table(keep: pa.ChunkedArray, checked: pa.Table, columns: list[str]) -> pa.Table:
    """The rows of ``checked`` where ``keep`` holds and that have a content hash, each content hash once, at its
    smallest path (paths are unique), with ``content_hash`` and ``columns``: what ``groupBy(content_hash)`` with
    ``min(struct(path, ...))`` keeps on Spark."""
    from imgfeat.metadata.manifest.organize import _group_starts

    rows = checked.filter(pc.and_(keep, pc.is_valid(checked["content_hash"])))
    rows = rows.select(list(dict.fromkeys(["content_hash", "path", *columns])))
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("content_hash", "ascending"), ("path", "ascending")]))
    heads = np.flatnonzero(_group_starts(rows["content_hash"].combine_chunks()))
    return rows.take(pa.array(heads, pa.int64())).select(list(dict.fromkeys(["content_hash", *columns])))


def quality_summary_table(checked: pa.Table) -> dict[str, Any]:
    """``quality_summary`` in one task, on an Arrow table of checked rows: the same keys, counts and
    examples; its percentiles exact where Spark's are within 1 % of rank."""
    ok = _originals_table(pc.and_(pc.equal(checked["status"], "ok"), pc.is_valid(checked["phash"])), checked,
                          ["path", *_SIGNALS])
    if not ok.num_rows:
        return _empty_quality()
    outliers, examples = {}, {}
    for name, (col, op, key) in _OUTLIERS.items():
        values = ok[col]
        hit = (pc.less if op == "<" else pc.greater)(values, OUTLIER_THRESHOLDS[key]).fill_null(False)
        outliers[name] = int(pc.sum(hit.cast(pa.int64())).as_py() or 0)
        first = pc.min(ok["path"].filter(hit)).as_py() if outliers[name] else None
        if first is not None:
            examples[name] = first
    percentiles = {}
    for col in _SIGNALS:
        values = np.sort(ok[col].drop_null().to_numpy())
        if len(values):
            percentiles[col] = {k: round(_percentile(values, q), 3) for k, q in _PERCENTILES}
    return {"rows": ok.num_rows, "thresholds": dict(OUTLIER_THRESHOLDS), "outliers": outliers, "examples": examples,
            "percentiles": percentiles}


def near_duplicate_summary_table(checked: pa.Table, distance: int,
                                 max_pairs: int | None = None) -> tuple[dict[str, Any], pa.Table]:
    """``near_duplicate_summary`` in one task, on an Arrow table of checked rows (for the manifest's one-task
    organize, which holds them all anyway): the same summary and the near-duplicate map as a table
    (``organize.NEAR_SCHEMA``), with no Spark job. Exact duplicates are collapsed to their original (the
    smallest path of each content hash) first, as there."""
    from imgfeat.metadata.manifest.near_duplicates import near_duplicate_search_table
    from imgfeat.metadata.manifest.organize import NEAR_SCHEMA

    originals = _originals_table(pc.equal(checked["status"], "ok"), checked, ["path", "image_id", "phash"])
    found = near_duplicate_search_table(originals, distance, max_pairs=max_pairs, carry=("path", "content_hash"))
    groups = found.groups
    near_map = pa.Table.from_arrays([groups["content_hash"], groups["rep_content_hash"], groups["near_duplicate_of"],
                                     groups["rep_path"]], schema=NEAR_SCHEMA)
    first = groups.take(pc.sort_indices(groups, sort_keys=[("path", "ascending")]))[:EXAMPLES]
    examples = [{"path": p, "near_duplicate_of": r} for p, r in zip(first["path"].to_pylist(), first["rep_path"].to_pylist())]
    return {"distance": found.distance, "requested_distance": distance, "candidate_pairs": found.candidate_pairs,
            **found.counts, "examples": examples}, near_map
