"""The organize step (duplicates, splits, shards, summary counts) with Spark's distributed operations.

The same rules and the same results as ``organize.organize`` + ``organize.finish`` (pyarrow, one task),
computed so that no task and not the driver holds more than its share of the rows:

* duplicates: ``groupBy(group key).agg(min(struct(path, ...)), max(path), count)`` over the ``ok`` rows
  (the group key is the content hash; an ``ok`` row without one is its own group). The smallest path's
  row is the original, and the aggregate row already carries the original's columns, so the aggregate
  *is* the table of originals (one row per group);
* near-duplicates and label conflicts: the originals are joined with the near-duplicate map on the
  content hash (left join), which gives each member its representative; the family key (the
  representative's content hash, else the original's own) is shuffled once with the labels exploded
  from the duplicate groups (``countDistinct``), and the families with 2+ labels joined back;
* splits: the representatives and originals in no group without a folder split are sorted globally by (label, seeded hash, image_id,
  content hash) and numbered in that order (``_numbered``: a range-partitioned sort, persisted, then
  per-partition counts become offsets, as ``RDD.zipWithIndex`` does). Per label the driver gets its
  count and its first number, so a row's rank within its label is its number minus that start; the
  cut at the ratios is the same float arithmetic as ``organize.assign_splits``; a member takes its folder
  split, else its representative's (a join on the representative's content hash);
* shards: the originals without a previous shard are numbered in (size descending with missing sizes
  last, image_id, content hash) order; the number becomes the snake-dealt shard from ``base``. Rows with a
  previous shard keep it. The numbered frames carry the originals' columns, so the per-group plan is a
  union of projections (no join);
* the manifest: the checked rows joined with their group's plan on the group key (split, shard for the
  original, duplicate_of and the original's path for the others; other rows get a key no group has),
  written sorted by (shard, path), rows without a shard last, in small row groups so that the ``shard``
  statistics let a reader skip other shards.

Shuffles: the group-by of the ok rows (hash, ``spark.sql.shuffle.partitions``), the family count and its
join back (with the near-duplicate map: its join and the members' join to their representatives), two range sorts of
originals (each with Spark's sampling job), the join of the checked rows with the plan (hash, both
sides), the range sort of the manifest rows; the count aggregates shuffle only partial counts. The
checked files are read twice (narrow columns, persisted; every column for the write).

Ties break exactly as in ``organize.py``: its sorts are stable over the originals taken in (content
hash, path) order, so every sort key here ends with the content hash, which makes each order total and
the numbering independent of how rows are partitioned. The driver holds counts per status, label, split,
shard and sort partition, and the label names; never rows.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts.schema import MANIFEST_SCHEMA
from imgfeat.metadata.manifest import organize as org
from imgfeat.metadata.spark.parquet import conform_batch, file_batches, files_frame, read_parquet_dataset, write_parquet_dataset

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

ROW_GROUP_ROWS = 4096
"""Rows per Parquet row group of the manifest written here (its ``shard`` statistics let readers skip)."""

SORT_ROWS_PER_TASK = 2_000_000
"""At least this many rows make one more range partition of each global sort (and one more manifest file)."""

_NARROW_SCHEMA = pa.schema([
    ("path", pa.string()), ("image_id", pa.string()), ("status", pa.string()), ("label", pa.string()),
    ("folder_split", pa.string()), ("size_bytes", pa.int64()), ("content_hash", pa.string()),
    ("_pshard", pa.int32()), ("_kept", pa.bool_()), ("_prev", pa.bool_()), ("tiles", pa.int32()),
])
_NARROW_OUT = _NARROW_SCHEMA.append(pa.field("_h", pa.int64()))
_NARROW_DDL = ("path string, image_id string, status string, label string, folder_split string, size_bytes long, "
               "content_hash string, _pshard int, _kept boolean, _prev boolean, tiles int, _h long")
assert _NARROW_SCHEMA.names == org.NARROW_COLUMNS

_NO_ROWS: dict[str, Any] = {k: None for k in ("dups", "dup_example", "members", "dropped", "drop_example", "crossing",
                                               "families", "conflict_rows")}
"""The overall counts when no row is ok (a grouping set of no rows has no total row)."""

_SIGN = np.uint64(1 << 63)
_HEX16 = "^[0-9a-fA-F]{16}"


def organize_on_spark(spark: SparkSession, checked_files: list[str], staging: str, cfg: Config,
                      previous: str | None = None, previous_rows: int = 0, base: int | None = None,
                      partitions: int | None = None, near: str | None = None) -> dict[str, Any]:
    """Organize the checked rows in ``checked_files`` and write the manifest to ``staging``.

    Writes a ``MANIFEST_SCHEMA`` Parquet dataset at ``staging`` (``write_parquet_dataset``: executors write
    through fsspec, ``_SUCCESS`` last), rows sorted by (shard, path) with rows without a shard last, in row
    groups of ``ROW_GROUP_ROWS``. Returns the counts ``organize.organize`` returns (the ``organized.json``
    of the job). ``base``: the first free shard number (default: one past the largest shard of the
    ``previous`` manifest, 0 without one); ``previous_rows``: rows of the previous manifest (for the removed
    count); ``partitions``: tasks per stage (default ``[spark].partitions``, else the default parallelism);
    ``near``: the near-duplicate map (``organize.NEAR_SCHEMA`` Parquet dataset) or None.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not checked_files:
        raise ValueError("organize_on_spark: no checked files")
    mc = cfg.manifest
    n_part = max(1, partitions or cfg.spark.partitions or spark.sparkContext.defaultParallelism)
    if base is None:
        base = previous_base(spark, previous)
    names = list(mc.split_ratios)
    cum = np.cumsum([mc.split_ratios[k] for k in names])
    persisted: list[DataFrame] = []

    def keep(df: DataFrame) -> DataFrame:
        df = df.persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(df)
        return df

    try:
        narrow = keep(_read_checked(spark, checked_files, n_part, mc.split_seed))
        # Counts over every checked row: per (status, label), so O(statuses x labels) rows reach the driver.
        per_status = narrow.groupBy("status", "label").agg(
            F.count(F.lit(1)).alias("n"), F.min("path").alias("first"), F.sum("size_bytes").alias("bytes"),
            F.sum(F.col("_kept").cast("long")).alias("kept"), F.sum(F.col("_prev").cast("long")).alias("prev"),
            F.sum(F.when(~F.col("_kept") & ~F.col("_prev"), 1).otherwise(0)).alias("new"),
        ).collect()
        n_sort = max(n_part, math.ceil(sum(r["n"] for r in per_status) / SORT_ROWS_PER_TASK))

        # Duplicates: one aggregate row per group of ok rows with the same bytes; its smallest path is the original.
        ok = narrow.filter(_is_ok()).withColumn("_dkey", _group_key())
        first = F.min(F.struct("path", "image_id", "label", "folder_split", "size_bytes", "_pshard", "_h", "tiles"))
        originals = ok.groupBy("_dkey").agg(first.alias("f"), F.max("path").alias("_last"), F.count(F.lit(1)).alias("_n"),
                                            F.collect_set("label").alias("_labels")).select("_dkey", "_last", "_n", "_labels", "f.*")
        originals = keep(_with_families(spark, originals, near, n_part))
        carry = ["_dkey", "_last", "_n", "path", "image_id", "label", "size_bytes", "_pshard", "_rep", "_rep_id",
                 "_rep_path", "label_conflict", "tiles"]

        # Splits: the folder split, else the rank within the label in the seeded hash order, cut at the ratios;
        # a near-duplicate member: its folder split, else its representative's.
        lead = originals.filter(F.col("_rep").isNull())
        with_split = lead.filter(F.col("folder_split").isNotNull()).select(*carry, F.col("folder_split").alias("split"))
        need = lead.filter(F.col("folder_split").isNull()).select(
            *carry, "_h", F.coalesce(F.col("label"), F.lit("\x00")).alias("_lkey"))
        need = keep(_numbered(need, [F.col("_lkey"), F.col("_h"), F.col("image_id"), F.col("_dkey")], n_sort))
        stats = need.groupBy("_p", "_lkey").agg(F.count(F.lit(1)).alias("n"), F.min("_local").alias("lo")).collect()
        if stats:
            offsets = _offsets([(r["_p"], r["n"]) for r in stats])
            starts: dict[str, int] = {}
            sizes: Counter = Counter()
            for r in stats:
                at = offsets[r["_p"]] + r["lo"]
                starts[r["_lkey"]] = min(starts.get(r["_lkey"], at), at)
                sizes[r["_lkey"]] += r["n"]
            per_label = spark.createDataFrame([(k, starts[k], sizes[k]) for k in sorted(starts)],
                                              "_lkey string, _start long, _cnt long")
            rank = _number(offsets) - F.col("_start")
            frac = (rank.cast("double") + F.lit(0.5)) / F.col("_cnt").cast("double")
            picked = sum((F.when(F.lit(float(c)) <= frac, 1).otherwise(0) for c in cum[:-1]), F.lit(0))
            drawn = F.element_at(F.array(*[F.lit(s) for s in names]), picked + 1)
            with_split = with_split.unionByName(
                need.join(F.broadcast(per_label), "_lkey").select(*carry, drawn.alias("split")))
        with_split = with_split.withColumn("_rep_split", F.lit(None).cast("string"))
        if near is not None:
            rep_split = with_split.select(F.col("_dkey").alias("_rep"), F.col("split").alias("_rep_split"))
            members = originals.filter(F.col("_rep").isNotNull()).join(rep_split, "_rep", "left")
            with_split = with_split.unionByName(members.select(
                *carry, F.coalesce("folder_split", "_rep_split").alias("split"), "_rep_split"))
        drop = F.lit(mc.near_duplicates == "drop") & F.col("_rep").isNotNull()
        with_split = with_split.withColumn("_drop", drop)
        carry += ["_rep_split", "_drop"]

        # Shards: originals without a previous shard, largest first, snake-dealt over new shards from base
        # (dropped near-duplicates get none, nor do tiled images: their tiles have shards in OUT/tiles/).
        dealt_cond = ~F.col("_drop") & F.col("tiles").isNull()
        dealt = with_split.filter(dealt_cond)
        kept = dealt.filter(F.col("_pshard").isNotNull()).select("*", F.col("_pshard").alias("shard"))
        fresh = dealt.filter(F.col("_pshard").isNull())
        fresh = keep(_numbered(fresh, [F.col("size_bytes").desc_nulls_last(), F.col("image_id"), F.col("_dkey")], n_sort))
        counts = [(r["_p"], r["n"]) for r in fresh.groupBy("_p").agg(F.count(F.lit(1)).alias("n")).collect()]
        offsets = _offsets(counts)
        num = max(math.ceil(sum(n for _, n in counts) / mc.rows_per_shard), 1)
        number = _number(offsets)
        pos = number % F.lit(num)
        block = ((number - pos) / F.lit(num)).cast("long")  # exact: both are integers below 2**53
        snake = F.when(block % 2 == 0, pos).otherwise(F.lit(num - 1) - pos) + F.lit(base)
        plan = kept.unionByName(fresh.select(*carry, "split", snake.alias("shard"))).unionByName(
            with_split.filter(~dealt_cond).select(*carry, "split", F.lit(None).cast("int").alias("shard")))
        plan = keep(plan.select(*carry, "split", F.col("shard").cast("int"), F.col("path").alias("_first_path"),
                                F.col("image_id").alias("_first_id")))

        # One job for the per-(label, split), the per-shard and the overall counts.
        crossing = F.col("_rep").isNotNull() & ~F.col("split").eqNullSafe(F.col("_rep_split"))
        led = F.col("label_conflict") & F.col("_rep").isNull()  # one representative (lead) per family
        counted = F.when(~F.col("_drop"), 1).otherwise(0)
        both = plan.groupingSets([["label", "split"], ["shard"], []], "label", "split", "shard").agg(
            F.grouping_id().alias("_g"), F.sum(counted).alias("n"), F.sum(F.col("_n") - 1).alias("dups"),
            F.min(F.when(F.col("_n") > 1, F.col("_last"))).alias("dup_example"),
            F.sum(F.when(~F.col("_drop"), F.coalesce("size_bytes", F.lit(0))).otherwise(0)).alias("bytes"),
            F.sum(F.when(F.col("_rep").isNotNull(), 1).otherwise(0)).alias("members"),
            F.sum(F.when(F.col("_drop"), 1).otherwise(0)).alias("dropped"),
            F.min(F.when(F.col("_drop"), F.col("path"))).alias("drop_example"),
            F.sum(F.when(crossing, 1).otherwise(0)).alias("crossing"),
            F.sum(F.when(led, 1).otherwise(0)).alias("families"),
            F.sum(F.when(F.col("label_conflict"), F.col("_n")).otherwise(0)).alias("conflict_rows")).collect()
        by_pair = [r for r in both if r["_g"] == 1 and r["n"]]  # grouping_id: bit 0 set = shard not grouped
        by_shard = [r for r in both if r["_g"] == 6 and r["shard"] is not None]
        total = next((r for r in both if r["_g"] == 7), None) or _NO_ROWS
        counts_out = _summary(per_status, by_pair, by_shard, previous_rows, total)
        counts_out["leakage"]["crossing_examples"] = [
            {"path": r["path"], "split": r["split"], "near_duplicate_of": r["_rep_path"], "representative_split": r["_rep_split"]}
            for r in plan.filter(crossing).orderBy("path").limit(org.EXAMPLES).collect()] if total["crossing"] else []
        counts_out["label_conflicts"]["examples"] = [
            r["path"] for r in plan.filter(led).orderBy("path").select("path").limit(org.EXAMPLES).collect()
        ] if total["families"] else []

        _write_manifest(spark, checked_files, staging, plan, counts_out["label_names"], n_part, n_sort)
        return counts_out
    finally:
        for df in persisted:
            df.unpersist()


def _with_families(spark: SparkSession, originals: DataFrame, near: str | None, partitions: int) -> DataFrame:
    """The originals with their near-duplicate representative (``_rep``: its content hash, ``_rep_id``,
    ``_rep_path``; null for representatives and originals in no group, from the map at ``near``) and
    ``label_conflict``: their family (a representative, its members, all their exact duplicates) holds two
    or more labels (counted with a shuffle by family, never collected)."""
    from pyspark.sql import functions as F

    if near is not None:
        reps = read_parquet_dataset(spark, near, num_partitions=partitions).select(
            F.col("content_hash").alias("_dkey"), F.col("rep_hash").alias("_rep"), F.col("rep_id").alias("_rep_id"),
            F.col("rep_path").alias("_rep_path"))
        originals = originals.join(reps, "_dkey", "left")
    else:
        originals = originals.select("*", *[F.lit(None).cast("string").alias(c) for c in ("_rep", "_rep_id", "_rep_path")])
    originals = originals.withColumn("_fam", F.coalesce("_rep", "_dkey"))
    conflicted = (originals.select("_fam", F.explode("_labels").alias("_label")).groupBy("_fam")
                  .agg(F.countDistinct("_label").alias("_k")).where(F.col("_k") > 1).select("_fam", F.lit(True).alias("_c")))
    return originals.join(conflicted, "_fam", "left").select(
        *[c for c in originals.columns if c not in ("_fam", "_labels")], F.coalesce("_c", F.lit(False)).alias("label_conflict"))


def previous_base(spark: SparkSession, previous: str | None) -> int:
    """The first free shard number after the manifest at ``previous`` (0 without one), found by a Spark job."""
    from pyspark.sql import functions as F

    if previous is None:
        return 0
    top = read_parquet_dataset(spark, previous, ["shard"]).agg(F.max("shard")).first()
    return 0 if top is None or top[0] is None else int(top[0]) + 1


def _is_ok() -> Column:
    from pyspark.sql import functions as F

    return F.coalesce(F.col("status") == "ok", F.lit(False))


def _group_key() -> Column:
    """The duplicate group of an ok row: its content hash (an ok row without one is a group of its own)."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col("content_hash"), F.concat(F.lit("\x00"), F.col("path")))


def _numbered(df: DataFrame, order: list[Column], partitions: int) -> DataFrame:
    """``df`` sorted by ``order`` (a total order) into range partitions, with ``_p`` (the partition, in
    order) and ``_local`` (the row's position in it). Persist it before use: the position of a row is then
    ``offset(_p) + _local``, with the offsets from one count per partition over the same persisted rows
    (a recomputed sort could sample other range bounds)."""
    from pyspark.sql import functions as F

    ranged = df.repartitionByRange(partitions, *order).sortWithinPartitions(*order)
    part = F.spark_partition_id()
    return ranged.select("*", part.alias("_p"),
                         (F.monotonically_increasing_id() - F.shiftleft(part.cast("long"), 33)).alias("_local"))


def _offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
    """The number of the first row of each partition, from (partition, rows) pairs (a partition may repeat)."""
    per: Counter = Counter()
    for p, n in counts:
        per[p] += n
    offsets, at = {}, 0
    for p in sorted(per):
        offsets[p] = at
        at += per[p]
    return offsets


def _number(offsets: dict[int, int]) -> Column:
    """The global position of a row of a ``_numbered`` frame."""
    from pyspark.sql import functions as F

    table = [offsets.get(p, 0) for p in range(max(offsets, default=0) + 1)]
    return F.element_at(F.array(*[F.lit(v).cast("long") for v in table]), F.col("_p") + 1) + F.col("_local")


def _summary(per_status: list[Any], by_pair: list[Any], by_shard: list[Any], previous_rows: int,
             total_row: Any) -> dict[str, Any]:
    """The counts of ``organize.organize`` from the aggregate rows (same keys, same values; the example
    lists of ``leakage`` and ``label_conflicts`` are filled in by the caller)."""
    by_status: dict[str, int] = {}
    examples: dict[str, str] = {}
    firsts: dict[str, str] = {}
    names: set[str] = set()
    total = total_bytes = kept = prev = new = 0
    for r in per_status:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        firsts[r["status"]] = min(firsts.get(r["status"], r["first"]), r["first"])
        if r["label"] is not None and r["status"] != "bad_label":
            names.add(r["label"])
        total += r["n"]
        total_bytes += r["bytes"] or 0
        kept += r["kept"] or 0
        prev += r["prev"] or 0
        new += r["new"] or 0
    for status, path in firsts.items():
        if status != "ok":
            examples[status] = path
    if total_row["dups"]:
        org.count_as(by_status, examples, "duplicate", total_row["dups"], total_row["dup_example"])
    if total_row["dropped"]:
        org.count_as(by_status, examples, "near_duplicate", total_row["dropped"], total_row["drop_example"])
    pairs: Counter = Counter()
    for r in by_pair:
        pairs[(str(r["label"]), str(r["split"]))] += r["n"]
    rows = [r["n"] for r in by_shard]
    nbytes = [r["bytes"] for r in by_shard]
    return {
        "total": total,
        "by_status": dict(sorted(by_status.items())),
        **org.label_split_counts(pairs),
        "example_by_status": dict(sorted(examples.items())),
        "total_bytes": total_bytes,
        "labels": len(names),
        "label_names": sorted(names),
        "shard_rows": {"min": min(rows, default=None), "max": max(rows, default=None)},
        "shard_bytes": {"min": min(nbytes, default=None), "max": max(nbytes, default=None)},
        "num_shards": len(by_shard),
        "incremental": {"unchanged": kept, "new": new, "changed": total - kept - new,
                        "removed": previous_rows - prev},
        "leakage": {"near_duplicate_members": total_row["members"] or 0, "crossing_pairs": total_row["crossing"] or 0,
                    "crossing_examples": []},
        "label_conflicts": {"families": total_row["families"] or 0, "rows": total_row["conflict_rows"] or 0,
                            "examples": []},
    }


def _write_manifest(spark: SparkSession, files: list[str], staging: str, plan: DataFrame, label_names: list[str],
                    partitions: int, sort_partitions: int) -> None:
    """Checked rows + their group's plan -> manifest rows, sorted by (shard, path), written to ``staging``."""
    from pyspark.sql import functions as F

    full = _read_checked(spark, files, partitions)
    groups = plan.select("_dkey", "_first_path", "_first_id", "split", F.col("shard").alias("_shard"),
                         F.col("_rep_id").alias("near_duplicate_of"), "_rep_path", "_drop", F.col("label_conflict").alias("_conflict"))
    # Rows other than ok get a key no group has (spread by path, so no task gets all of them) and no plan.
    key = F.when(_is_ok(), _group_key()).otherwise(F.concat(F.lit("\x01"), F.col("path")))
    rows = full.withColumn("_dkey", key).join(groups, "_dkey", "left")
    dup = F.coalesce(F.col("path") != F.col("_first_path"), F.lit(False))
    dropped = ~dup & F.coalesce(F.col("_drop"), F.lit(False))
    rows = rows.select(
        *[F.col(c) for c in full.columns if c not in ("status", "status_detail")],
        "split", F.when(dup, F.lit(None)).otherwise(F.col("_shard")).cast("int").alias("shard"),
        F.when(dup, F.col("_first_id")).alias("duplicate_of"), "near_duplicate_of",
        F.coalesce("_conflict", F.lit(False)).alias("label_conflict"),
        F.when(dup, F.lit("duplicate")).when(dropped, F.lit("near_duplicate")).otherwise(F.col("status")).alias("status"),
        F.when(dup, F.concat(F.lit("same bytes as "), F.col("_first_path")))
        .when(dropped, F.concat(F.lit("near duplicate of "), F.col("_rep_path"))).otherwise(F.col("status_detail"))
        .alias("status_detail"))
    if label_names:
        index = spark.createDataFrame(list(enumerate(label_names)), "_index int, label string")
        rows = rows.join(F.broadcast(index), "label", "left")
    else:
        rows = rows.withColumn("_index", F.lit(None).cast("int"))
    rows = rows.withColumn("label_index", F.when(F.col("status") == "bad_label", F.lit(None)).otherwise(F.col("_index"))
                           .cast("int"))
    order = [F.col("shard").asc_nulls_last(), F.col("path")]
    rows = rows.select(*MANIFEST_SCHEMA.names).repartitionByRange(sort_partitions, *order).sortWithinPartitions(*order)
    write_parquet_dataset(rows, staging, schema=MANIFEST_SCHEMA, transform=_row_groups)


def _row_groups(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches re-cut to ``ROW_GROUP_ROWS`` rows each (the writer makes one row group per batch)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        if held >= ROW_GROUP_ROWS:
            cut = pa.Table.from_batches(pending).combine_chunks().to_batches(max_chunksize=ROW_GROUP_ROWS)
            done = held - held % ROW_GROUP_ROWS
            yield from cut[: done // ROW_GROUP_ROWS]
            pending = cut[done // ROW_GROUP_ROWS:]
            held -= done
    if held:
        yield from pa.Table.from_batches(pending).combine_chunks().to_batches(max_chunksize=ROW_GROUP_ROWS)


def _read_checked(spark: SparkSession, files: list[str], partitions: int, seed: str | None = None) -> DataFrame:
    """The checked rows of ``files``, read by tasks with pyarrow over fsspec.

    With ``seed``: the narrow columns (``organize.NARROW_COLUMNS``) plus ``_h``, the seeded hash order of
    an ok row's content hash (``organize.hash_order``) as a signed long that sorts like the unsigned key.
    Without: every column of the files."""
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    if seed is None:
        fs, first = fsspec.core.url_to_fs(files[0])
        with fs.open(first, "rb") as fh:
            file_schema = pq.read_schema(fh)
        spark_schema: Any = from_arrow_schema(file_schema)
        schema = to_arrow_schema(spark_schema)
    else:
        spark_schema, schema = _NARROW_DDL, _NARROW_SCHEMA
    cols = list(schema.names)

    def read(names: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for _, b in file_batches(names, cols):
            b = conform_batch(b, schema)
            yield b if seed is None else _with_hash(b, seed)

    return files_frame(spark, files, partitions).mapInArrow(read, spark_schema)


def _with_hash(batch: pa.RecordBatch, seed: str) -> pa.RecordBatch:
    ch = batch.column(batch.schema.get_field_index("content_hash"))
    usable = pc.and_kleene(pc.equal(batch.column(batch.schema.get_field_index("status")), "ok"),
                           pc.match_substring_regex(ch, _HEX16))
    where = np.flatnonzero(pc.fill_null(usable, False).to_numpy(zero_copy_only=False))
    keys = np.zeros(batch.num_rows, np.int64)
    if len(where):
        keys[where] = (org.hash_order(ch.take(pa.array(where)).to_pylist(), seed) ^ _SIGN).view(np.int64)
    mask = np.ones(batch.num_rows, bool)
    mask[where] = False
    return pa.RecordBatch.from_arrays([*batch.columns, pa.array(keys, pa.int64(), mask=mask)], schema=_NARROW_OUT)
