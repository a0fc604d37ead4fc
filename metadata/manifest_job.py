"""The manifest job on Spark: list, check on executors, label, find duplicates, split, shard, write.

Image bytes are read only inside executor tasks (``mapInArrow``); the driver sees folder names, label
names, and counts. Every file found becomes exactly one row.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from metadata import labels as labels_mod
from metadata.checks import check_entry, prefetched
from metadata.config import Config, dump_toml
from metadata.listing import Entry, Unit, check_source, list_unit, plan_units
from metadata.manifest_store import commit_manifest, load_previous
from metadata.schema import CONFIG_FILE, MANIFEST_SCHEMA, SUMMARY_FILE
from metadata.shards import write_bytes_atomic, write_json_atomic
from metadata.spark_session import get_spark, num_tasks

log = logging.getLogger(__name__)

UNIT_SCHEMA = pa.schema([("root", pa.string()), ("folder", pa.string()), ("recursive", pa.bool_())])
ENTRY_SCHEMA = pa.schema(
    [("root", pa.string()), ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("error", pa.string())]
)
CHECKED_SCHEMA = pa.schema(
    [f for f in MANIFEST_SCHEMA if f.name not in ("label_index", "split", "duplicate_of", "shard")]
    + [pa.field("folder_split", pa.string())]
)


def spark_schema(schema: pa.Schema):
    """The Spark StructType of an Arrow schema."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(schema)


def _list_units(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for unit in batch.to_pylist():
            rows = [e.__dict__ for e in list_unit(Unit(unit["root"], unit["folder"], unit["recursive"]))]
            for i in range(0, len(rows), 4096):
                yield pa.RecordBatch.from_pylist(rows[i : i + 4096], schema=ENTRY_SCHEMA)


def _make_checker(cfg: Config):
    mc = cfg.manifest
    validation, max_bytes, max_pixels, formats = mc.validation, mc.max_bytes, mc.max_pixels, tuple(mc.formats)
    max_scans = mc.max_jpeg_scans
    label_from, pattern = mc.label_from, (re.compile(mc.label_regex) if mc.label_from == "regex" else None)
    split_from_folders = mc.split_from_folders
    names = CHECKED_SCHEMA.names

    def check(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out: dict[str, list[Any]] = {n: [] for n in names}
            entries = (Entry(e["root"], e["path"], e["size"], e["mtime"], e["error"]) for e in batch.to_pylist())
            for entry, data in prefetched(entries, max_bytes):
                row = check_entry(entry, validation, max_bytes, max_pixels, formats, data, max_scans)
                rel = row["rel_path"]
                if label_from == "parent":
                    row["label"] = labels_mod.parent_label(rel)
                elif label_from == "regex":
                    row["label"] = labels_mod.regex_label(rel, pattern)
                    if row["label"] is None and row["status"] == "ok":
                        row["status"], row["status_detail"] = "bad_label", f"label_regex does not match {rel!r}"
                else:
                    row["label"] = None
                problem = labels_mod.label_problem(row["label"])
                if problem and row["status"] == "ok":
                    row["status"], row["status_detail"] = "bad_label", problem
                row["folder_split"] = labels_mod.folder_split(rel) if split_from_folders else None
                for n in names:
                    out[n].append(row.get(n))
            yield pa.RecordBatch.from_pydict(out, schema=CHECKED_SCHEMA)

    return check


def run_manifest(cfg: Config, sources: list[str], out: str, master: str | None = None,
                 incremental: bool = False) -> dict[str, Any]:
    """Build the manifest of ``sources`` under ``out``; return the summary (also written as JSON)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    if not sources:
        raise ValueError("SRC: give at least one source folder or URL")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    roots = sorted({check_source(s) for s in sources})
    for a in roots:
        for b in roots:
            if a != b and a.startswith(b.rstrip("/") + "/"):
                raise ValueError(f"SRC {a!r} is inside SRC {b!r}: give each folder once")
    spark = get_spark(cfg.spark, master)
    timings["spark_start_s"] = time.perf_counter() - t0
    tasks = num_tasks(spark, cfg.spark)
    previous = load_previous(spark, out, cfg.fingerprint("manifest")) if incremental else None

    units = [u for r in roots for u in plan_units(r)]
    timings["plan_s"] = time.perf_counter() - t0 - timings["spark_start_s"]
    units_df = spark.createDataFrame([(u.root, u.folder, u.recursive) for u in units], "root string, folder string, recursive boolean")
    entries = units_df.repartition(min(len(units), tasks)).mapInArrow(_list_units, spark_schema(ENTRY_SCHEMA))
    # Hash partitioning by path is deterministic, so task retries cannot lose or duplicate rows; an
    # explicit partition count also keeps adaptive execution from merging the checks into one task.
    entries = entries.repartition(tasks, "path")

    t1 = time.perf_counter()
    checker = _make_checker(cfg)
    if previous is not None:
        prev_key = previous.select("path", F.col("size_bytes").alias("_psize"), F.col("mtime").alias("_pmtime"))
        joined = entries.join(prev_key, "path", "left")
        same = F.coalesce((F.col("_psize") == F.col("size")) & (F.col("_pmtime") == F.col("mtime"))
                          & F.col("error").isNull(), F.lit(False))
        fresh = joined.where(~same).select(*ENTRY_SCHEMA.names).mapInArrow(checker, spark_schema(CHECKED_SCHEMA))
        kept = _keep_previous(previous, joined.where(same).select("path"))
        checked = fresh.withColumn("_kept", F.lit(False)).unionByName(kept.withColumn("_kept", F.lit(True)))
    else:
        checked = entries.mapInArrow(checker, spark_schema(CHECKED_SCHEMA)).withColumn("_kept", F.lit(False))
    if cfg.manifest.label_from == "csv":
        checked = _apply_csv_labels(spark, checked, cfg.manifest.labels_csv)
    checked = checked.persist(StorageLevel.MEMORY_AND_DISK)
    # One small aggregate instead of count(): totals, label names, examples, the unchanged count.
    groups = checked.groupBy("_kept", "status", "label").agg(
        F.count("*").alias("n"), F.sum("size_bytes").alias("b"), F.min("path").alias("example")).collect()
    total = sum(r["n"] for r in groups)
    names = sorted({r["label"] for r in groups if r["label"] is not None and r["status"] != "bad_label"})
    timings["check_s"] = time.perf_counter() - t1
    changes: dict[str, int] = {}
    if previous is not None:
        prev_paths = previous.select("path")
        unchanged = sum(r["n"] for r in groups if r["_kept"])
        new = checked.where(~F.col("_kept")).join(prev_paths, "path", "left_anti").count()
        changes = {"unchanged": unchanged, "new": new, "changed": total - unchanged - new,
                   "removed": prev_paths.join(checked.select("path"), "path", "left_anti").count()}
    t2 = time.perf_counter()
    rows, base = _with_previous_shards(checked.drop("_kept"), previous)
    originals = _organize(rows, cfg, base).persist(StorageLevel.MEMORY_AND_DISK)
    # The summary needs only the check's counts and the originals: no pass over the finished manifest.
    counts = _summarize(groups, originals.groupBy("label", "_split").agg(
        F.count("*").alias("n"), F.sum("size_bytes").alias("b"), F.min("_dup_example").alias("dup_example"),
        F.min("_shard_rows").alias("rows_min"), F.max("_shard_rows").alias("rows_max"),
        F.min("_shard_bytes").alias("bytes_min"), F.max("_shard_bytes").alias("bytes_max"),
        F.max("_shard_rank").alias("shards")).collect())
    num_shards = counts.pop("num_shards")
    manifest = _join_back(spark, rows, originals, names)
    timings["organize_s"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    version = commit_manifest(manifest, out, keep_history=incremental, rows=total)
    timings["write_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0
    for df in (checked, originals):
        df.unpersist()

    summary = {
        "version": version,
        "sources": roots,
        "total": total,
        **counts,
        "num_shards": num_shards,
        "validation": cfg.manifest.validation,
        "fingerprint": cfg.fingerprint("manifest"),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "files_per_s": round(total / timings["total_s"], 1) if timings["total_s"] else None,
        "incremental": changes or None,
        "master": spark.sparkContext.master,
    }
    write_json_atomic(out.rstrip("/") + "/" + SUMMARY_FILE, summary)
    write_bytes_atomic(out.rstrip("/") + "/" + CONFIG_FILE, dump_toml(cfg).encode())
    log.info("manifest v%d: %d files, %d ok, %d shards in %.1fs -> %s", version, total,
             counts["by_status"].get("ok", 0), num_shards, timings["total_s"], out)
    return summary


def _keep_previous(previous, kept_paths):
    """Rows of the previous manifest whose file did not change, in the checked layout.

    They keep their split (stable splits for unchanged files); duplicate rows go back to ``ok`` so
    that duplicates are found again over the new set of files.
    """
    from pyspark.sql import functions as F

    cols = [c for c in CHECKED_SCHEMA.names if c != "folder_split"]
    prev = previous.join(kept_paths, "path").select(*cols, F.col("split").alias("folder_split"))
    was_dup = F.col("status") == "duplicate"
    return prev.withColumn("status_detail", F.when(was_dup, F.lit("")).otherwise(F.col("status_detail"))) \
               .withColumn("status", F.when(was_dup, F.lit("ok")).otherwise(F.col("status")))


def _read_labels_csv(url: str) -> Iterator[tuple[str, str]]:
    import csv
    import io

    import fsspec

    with fsspec.open(url, "rb") as fh:
        reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", newline=""))
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"manifest.labels_csv {url}: needs a header with columns path,label")
        for row in reader:
            yield row["path"], row["label"]


def _apply_csv_labels(spark, checked, url: str):
    """Labels from a ``path,label`` CSV (path relative to SRC or a full URI), read inside one task."""
    from pyspark.sql import functions as F

    from metadata.listing import _local_path
    from metadata.schema import normalize_uri

    if url.startswith("file://") or "://" not in url:
        import os

        if not os.path.isfile(_local_path(normalize_uri(url))):
            raise ValueError(f"manifest.labels_csv: no such file {url!r}")
    rows = spark.sparkContext.parallelize([url], 1).flatMap(_read_labels_csv)
    csv_df = spark.createDataFrame(rows, "key string, _csv_label string").dropDuplicates(["key"])
    by_rel = csv_df.withColumnRenamed("key", "rel_path").withColumnRenamed("_csv_label", "_l1")
    by_uri = csv_df.withColumnRenamed("key", "path").withColumnRenamed("_csv_label", "_l2")
    df = checked.join(F.broadcast(by_rel), "rel_path", "left").join(F.broadcast(by_uri), "path", "left")
    label = F.coalesce("_l2", "_l1")
    problem = (F.when(label.isNull(), F.lit("file is not listed in manifest.labels_csv"))
               .when(F.trim(label) == "", F.lit("label is empty"))
               .when(label.contains(".."), F.concat(F.lit("label contains '..': "), label))
               .when(label.rlike(r"[/\\\\]"), F.concat(F.lit("label contains a path separator: "), label))
               .when(label.rlike("[\\x00-\\x1f\\x7f]"), F.lit("label contains control characters")))
    ok = F.col("status") == "ok"
    return (df.withColumn("label", label)
              .withColumn("status_detail", F.when(ok & problem.isNotNull(), problem).otherwise(F.col("status_detail")))
              .withColumn("status", F.when(ok & problem.isNotNull(), F.lit("bad_label")).otherwise(F.col("status")))
              .drop("_l1", "_l2"))


def _with_previous_shards(checked, previous):
    """``checked`` with ``_pshard``: the previous shard of unchanged ok files (same path and size), and
    the first shard number free for new shards (new shards come after the old, so feature shards stay valid)."""
    from pyspark.sql import functions as F

    if previous is None:
        return checked.withColumn("_pshard", F.lit(None).cast("int")), 0
    prev_ok = previous.where(F.col("status") == "ok").select("path", "size_bytes", F.col("shard").alias("_pshard"))
    base = (previous.agg(F.max("shard")).first()[0] or -1) + 1
    return checked.join(prev_ok, ["path", "size_bytes"], "left"), base


def _organize(checked, cfg: Config, base: int):
    """One row per distinct content among ok rows (its original), with ``_split``, ``_shard`` and shard stats.

    Grouping by content hash once finds the originals (the first path of a group); splits and shards
    are drawn on them, and one join (``_join_back``) takes them to every row, so duplicates follow
    their original's split with no second lookup.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # Shards first: their window runs in one task, which then also serves the later windows unshuffled.
    groups = _assign_splits(_assign_shards(_originals(checked), cfg, base), cfg)
    per_shard = Window.partitionBy("_shard")
    return (groups.withColumn("_shard_rows", F.count(F.lit(1)).over(per_shard))
                  .withColumn("_shard_bytes", F.sum("size_bytes").over(per_shard))
                  .withColumn("_shard_rank", F.dense_rank().over(Window.orderBy("_shard"))))


def _join_back(spark, checked, originals, label_names: list[str]):
    """The manifest: every checked row with its duplicate mark, split, shard and label index."""
    from pyspark.sql import functions as F

    ok = F.col("status") == "ok"
    index = spark.createDataFrame([(n, i) for i, n in enumerate(label_names)], "label string, _label_index int")
    df = (checked.withColumn("_ck", F.when(ok, F.col("content_hash")))
          .join(originals.select("_ck", "_first", "_first_path", "_split", "_shard"), "_ck", "left")
          .join(F.broadcast(index), "label", "left"))
    is_dup = ok & (F.col("_first") != F.col("image_id"))
    cols = {
        "label_index": F.when(F.col("status") != "bad_label", F.col("_label_index")),
        "split": F.when(ok, F.col("_split")),
        "duplicate_of": F.when(is_dup, F.col("_first")),
        "status": F.when(is_dup, F.lit("duplicate")).otherwise(F.col("status")),
        "status_detail": F.when(is_dup, F.concat(F.lit("same bytes as "), F.col("_first_path")))
                          .otherwise(F.col("status_detail")),
        "shard": F.when(ok & ~is_dup, F.col("_shard")).cast("int"),
    }
    return df.select(*[cols[n].alias(n) if n in cols else F.col(n) for n in MANIFEST_SCHEMA.names])


def _originals(checked):
    """One row per distinct content among ok rows: the first copy by path (``_first``) and its columns."""
    from pyspark.sql import functions as F

    first = F.min(F.struct("path", "image_id", "label", "folder_split", "size_bytes", "_pshard")).alias("o")
    # The last path of a group with copies is a duplicate: the summary's example of one.
    dup = F.when(F.count(F.lit(1)) > 1, F.max("path")).alias("_dup_example")
    return checked.where(F.col("status") == "ok").groupBy("content_hash").agg(first, dup).select(
        F.col("content_hash").alias("_ck"), F.col("o.path").alias("_first_path"), F.col("o.image_id").alias("_first"),
        "o.label", "o.folder_split", "o.size_bytes", "o._pshard", "_dup_example")


def _assign_splits(groups, cfg: Config):
    """``_split``: the folder split when the path has one; else exact per-label ratios over a seeded hash order."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    key = [F.col("folder_split").isNull(), F.coalesce(F.col("label"), F.lit("\x00"))]
    order = Window.partitionBy(*key).orderBy(F.xxhash64(F.lit(cfg.manifest.split_seed), F.col("_ck")), F.col("_first"))
    frac = (F.row_number().over(order) - F.lit(0.5)) / F.count(F.lit(1)).over(Window.partitionBy(*key))
    expr = None
    cum = 0.0
    items = list(cfg.manifest.split_ratios.items())
    for i, (name, ratio) in enumerate(items):
        cum += ratio
        cond = frac < F.lit(cum) if i < len(items) - 1 else F.lit(True)
        expr = F.when(cond, F.lit(name)) if expr is None else expr.when(cond, F.lit(name))
    return groups.withColumn("_split", F.coalesce(F.col("folder_split"), expr))


def _assign_shards(groups, cfg: Config, base: int):
    """``_shard``: balanced, deterministic shards of the originals, sorted by size and dealt out in a snake order.

    Shard sizes differ by at most one row, and the snake order spreads large and small files evenly
    over shards. Rows with a previous shard (``_pshard``, incremental runs) keep it; the others fill
    new shards numbered from ``base`` (so existing feature shards stay valid).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    fresh = F.col("_pshard").isNull()
    # One ordered pass over the originals only (fresh ones first): the other columns never move to one task.
    i = F.row_number().over(Window.orderBy(~fresh, F.col("size_bytes").desc(), F.col("_first"))) - 1
    num = F.greatest(F.ceil(F.sum(fresh.cast("long")).over(Window.partitionBy()) / F.lit(cfg.manifest.rows_per_shard)),
                     F.lit(1))
    block, pos = F.floor(i / num), i % num
    snake = F.when(block % 2 == 0, pos).otherwise(num - 1 - pos) + F.lit(base)
    return groups.withColumn("_shard", F.when(fresh, snake).otherwise(F.col("_pshard")))


def _summarize(checked: list[Any], originals: list[Any]) -> dict[str, Any]:
    """The summary counts from the check's groups and the originals' groups.

    ``checked``: rows of (status, label, n, b, example) before duplicates are marked; ``originals``:
    rows of (label, _split, n, b, dup_example, shard stats) over the ok rows that are not duplicates.
    Every ok row that is not an original is a duplicate.
    """
    by_status: dict[str, int] = {}
    examples: dict[str, str] = {}
    names: set[str] = set()
    total_bytes = 0
    for r in checked:
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        total_bytes += r["b"] or 0
        if r["label"] is not None and r["status"] != "bad_label":
            names.add(r["label"])
        if r["status"] != "ok" and (r["status"] not in examples or r["example"] < examples[r["status"]]):
            examples[r["status"]] = r["example"]
    by_label: dict[str, int] = {}
    by_split: dict[str, int] = {}
    by_label_split: dict[str, dict[str, int]] = {}
    n_ok = 0
    for r in originals:
        label, split = str(r["label"]), str(r["_split"])
        n_ok += r["n"]
        by_label[label] = by_label.get(label, 0) + r["n"]
        by_split[split] = by_split.get(split, 0) + r["n"]
        by_label_split.setdefault(label, {})[split] = r["n"]
    dups = by_status.pop("ok", 0) - n_ok
    if n_ok:
        by_status["ok"] = n_ok
    if dups:
        by_status["duplicate"] = dups
        examples["duplicate"] = min(r["dup_example"] for r in originals if r["dup_example"] is not None)

    def pick(key: str, fn):
        values = [r[key] for r in originals if r[key] is not None]
        return fn(values) if values else None

    return {
        "by_status": dict(sorted(by_status.items())),
        "by_label": dict(sorted(by_label.items())),
        "by_split": dict(sorted(by_split.items())),
        "by_label_split": dict(sorted(by_label_split.items())),
        "example_by_status": dict(sorted(examples.items())),
        "total_bytes": int(total_bytes),
        "labels": len(names),
        "shard_rows": {"min": pick("rows_min", min), "max": pick("rows_max", max)},
        "shard_bytes": {"min": pick("bytes_min", min), "max": pick("bytes_max", max)},
        "num_shards": pick("shards", max) or 0,
    }
